using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Runtime.CompilerServices;
using Relay.Client;
using Relay.Client.Transport;

namespace Relay.Server.Tests;

/// <summary>
/// The keep-alive of <see cref="RelayClient"/> on a slow uplink: a connection whose upload moves is
/// kept, however many KeepAlive periods the upload takes; one whose link stopped is replaced.
/// </summary>
public class ClientKeepAliveTests
{
    private static readonly TimeSpan KeepAlive = TimeSpan.FromMilliseconds(500);

    // 768 KiB at 256 KiB/s: three seconds, six KeepAlive periods. Once the PING is written, what is
    // in front of it (TcpConnect.UnsentLimit and the last write, the proxy's buffers: some 40 KiB)
    // takes under 0.2 s.
    private const int UploadRate = 256 * 1024;
    private const int Upload = 768 * 1024;

    private static RelayClientOptions Options => new()
    {
        KeepAlive = KeepAlive,
        ReconnectMin = TimeSpan.FromMilliseconds(50),
        ReconnectMax = TimeSpan.FromMilliseconds(500),
    };

    /// <summary>A relay that takes a SEND of <see cref="Upload"/> bytes.</summary>
    private static Task<TestRelay> StartRelayAsync() => TestRelay.StartAsync(o =>
    {
        o.MaxFrame = 1 << 20;
        o.MaxMessage = Upload;
    });

    [Test]
    public async Task A_SEND_that_takes_many_keep_alive_periods_to_upload_is_answered_once_on_one_connection()
    {
        await using var relay = await StartRelayAsync();
        await using var proxy = ThrottlingProxy.Start(relay.Server.RelayEndPoint, UploadRate);
        var through = relay.Address with { Hosts = ["127.0.0.1"], Port = proxy.Port };
        await using var owner = await relay.ConnectAsync();
        var queue = await owner.CreateQueueAsync();
        await using var client = new RelayClient(Options);
        int connections = 0;
        client.ConnectionMade += _ => Interlocked.Increment(ref connections);
        await client.RunAsync(through, c => c.PingAsync());

        var body = new byte[Upload];
        Random.Shared.NextBytes(body);
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(20));
        var took = Stopwatch.StartNew();
        await client.RunAsync(through, c => c.SendAsync(new SenderQueue(queue.SenderId, null), body), cts.Token);
        took.Stop();

        // The upload took several KeepAlive periods (what this test is about), on the one connection.
        await Assert.That(took.Elapsed).IsGreaterThan(KeepAlive * 5);
        await Assert.That(Volatile.Read(ref connections)).IsEqualTo(1);
        await Assert.That(proxy.Accepted).IsEqualTo(1);
        // Stored once.
        var stored = await owner.GetAsync(queue);
        await Assert.That(stored!.Body).IsEquivalentTo(body);
        await owner.AckAsync(queue, stored.MessageId);
        await Assert.That(await owner.GetAsync(queue)).IsNull();
    }

    /// <summary>
    /// An upload whose link stops taking bytes is given up after about KeepAlive (the connection
    /// replaced, the SEND sent again on the next), rather than after the kernel's TCP timeout (many
    /// minutes).
    /// </summary>
    [Test]
    public async Task An_upload_whose_link_stops_is_given_up_and_sent_again_on_a_new_connection()
    {
        await using var relay = await StartRelayAsync();
        await using var proxy = ThrottlingProxy.Start(relay.Server.RelayEndPoint, UploadRate);
        var through = relay.Address with { Hosts = ["127.0.0.1"], Port = proxy.Port };
        await using var owner = await relay.ConnectAsync();
        var queue = await owner.CreateQueueAsync();
        await using var client = new RelayClient(Options);
        int connections = 0;
        client.ConnectionMade += _ => Interlocked.Increment(ref connections);
        await client.RunAsync(through, c => c.PingAsync());

        proxy.StallOpenConnections();
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(20));
        var body = new byte[Upload];
        Random.Shared.NextBytes(body);
        await client.RunAsync(through, c => c.SendAsync(new SenderQueue(queue.SenderId, null), body), cts.Token);

        await Assert.That(Volatile.Read(ref connections)).IsEqualTo(2);
        var stored = await owner.GetAsync(queue);
        await Assert.That(stored!.Body).IsEquivalentTo(body);
        await owner.AckAsync(queue, stored.MessageId);
        await Assert.That(await owner.GetAsync(queue)).IsNull();
    }

    /// <summary>
    /// Forwards TCP both ways, the client's bytes at most <c>rate</c> bytes a second (a slow uplink), or
    /// none on a connection stalled (<see cref="StallOpenConnections"/>). Its sockets towards clients
    /// have a small receive buffer, so a client's writes wait for this link as they would for a slow one.
    /// </summary>
    private sealed class ThrottlingProxy : IAsyncDisposable
    {
        private const int Piece = 2048;
        private readonly TcpListener _listener = new(IPAddress.Loopback, 0);
        private readonly IPEndPoint _target;
        private readonly int _rate;
        private readonly CancellationTokenSource _stop = new();
        private readonly List<TcpClient> _open = [];
        private readonly List<StrongBox<bool>> _stalls = [];
        private int _accepted;

        /// <summary>The connections open now stop forwarding the client's bytes (a link that stopped); later ones move.</summary>
        public void StallOpenConnections()
        {
            lock (_open)
            {
                foreach (var stalled in _stalls) Volatile.Write(ref stalled.Value, true);
            }
        }

        public int Accepted => Volatile.Read(ref _accepted);

        public int Port => ((IPEndPoint)_listener.LocalEndpoint).Port;

        private ThrottlingProxy(IPEndPoint target, int rate)
        {
            _target = target;
            _rate = rate;
            // Inherited by the accepted sockets (set before listening, so the TCP window is sized by it).
            _listener.Server.ReceiveBufferSize = 4096;
            _listener.Start();
            _ = AcceptAsync();
        }

        public static ThrottlingProxy Start(IPEndPoint target, int rate) => new(target, rate);

        private async Task AcceptAsync()
        {
            try
            {
                while (true)
                {
                    var client = await _listener.AcceptTcpClientAsync(_stop.Token);
                    Interlocked.Increment(ref _accepted);
                    var upstream = new TcpClient { NoDelay = true };
                    await upstream.ConnectAsync(_target, _stop.Token);
                    var stalled = new StrongBox<bool>();
                    lock (_open)
                    {
                        _open.AddRange([client, upstream]);
                        _stalls.Add(stalled);
                    }
                    _ = UploadAsync(client, upstream, stalled);
                    _ = DownloadAsync(upstream, client);
                }
            }
            catch (Exception) when (_stop.IsCancellationRequested)
            {
            }
        }

        private async Task UploadAsync(TcpClient from, TcpClient to, StrongBox<bool> stalled)
        {
            var buffer = new byte[Piece];
            var clock = Stopwatch.StartNew();
            long forwarded = 0;
            try
            {
                while (true)
                {
                    while (Volatile.Read(ref stalled.Value)) await Task.Delay(10, _stop.Token);
                    int n = await from.GetStream().ReadAsync(buffer, _stop.Token);
                    if (n == 0) break;
                    await to.GetStream().WriteAsync(buffer.AsMemory(0, n), _stop.Token);
                    forwarded += n;
                    var due = TimeSpan.FromSeconds((double)forwarded / _rate) - clock.Elapsed;
                    if (due > TimeSpan.Zero) await Task.Delay(due, _stop.Token);
                    else if (due < TimeSpan.FromSeconds(-1))
                    {
                        // Idle a while: no burst after it.
                        clock.Restart();
                        forwarded = 0;
                    }
                }
            }
            catch (Exception)
            {
                // Closed, or the proxy stopped.
            }
            from.Dispose();
            to.Dispose();
        }

        private static async Task DownloadAsync(TcpClient from, TcpClient to)
        {
            try
            {
                await from.GetStream().CopyToAsync(to.GetStream());
            }
            catch (Exception)
            {
                // Closed, or the proxy stopped.
            }
            from.Dispose();
            to.Dispose();
        }

        public async ValueTask DisposeAsync()
        {
            await _stop.CancelAsync();
            _listener.Stop();
            lock (_open)
            {
                foreach (var c in _open) c.Dispose();
            }
            _stop.Dispose();
        }
    }
}
