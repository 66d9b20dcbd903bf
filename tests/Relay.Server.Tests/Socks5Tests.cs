using System.Net;
using System.Net.Sockets;
using Relay.Client.Transport;
using Relay.Protocol;

namespace Relay.Server.Tests;

/// <summary>
/// The SOCKS5 CONNECT request a client sends its proxy (RFC 1928 §4): a relay's IP address as an
/// address (ATYP 1 or 4), any other host as a name the proxy resolves (ATYP 3, what Tor needs for a
/// .onion), and a host that no SOCKS5 request can carry refused before anything is sent.
/// </summary>
public class Socks5Tests
{
    private const string Fp = "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789-_ABCDE";

    public static IEnumerable<Func<(string Host, byte[] Destination)>> Destinations()
    {
        // ATYP ‖ DST.ADDR
        yield return () => ("[2001:db8::1]", [4, 0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        yield return () => ("[::1]", [4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        yield return () => ("10.0.0.7", [1, 10, 0, 0, 7]);
        yield return () => ("relay.example.com", Name("relay.example.com"));
        yield return () => ("abcdefghijklmnopqrstuvwxyz234567abcdefghijklmnopqrstuv.onion", Name("abcdefghijklmnopqrstuvwxyz234567abcdefghijklmnopqrstuv.onion"));
    }

    private static byte[] Name(string name) => [3, (byte)name.Length, .. System.Text.Encoding.ASCII.GetBytes(name)];

    [Test]
    [MethodDataSource(nameof(Destinations))]
    public async Task The_connect_request_carries_an_ip_address_as_an_address_and_a_name_as_a_name(string host, byte[] destination)
    {
        await using var proxy = RecordingSocksProxy.Start();
        var address = RelayAddress.Parse($"relay://{Fp}@{host}:5223");

        await using var stream = await Socks5.ConnectAsync("127.0.0.1", proxy.Port, address.Host, address.Port, CancellationToken.None);
        var request = await proxy.Request.WaitAsync(TimeSpan.FromSeconds(10));

        byte[] expected = [5, 1, 0, .. destination, 5223 >> 8, 5223 & 0xFF];
        await Assert.That(Convert.ToHexString(request)).IsEqualTo(Convert.ToHexString(expected));
    }

    [Test]
    public async Task A_host_name_that_is_not_ascii_is_refused_before_the_proxy_is_asked()
    {
        await using var proxy = RecordingSocksProxy.Start();

        var refused = await Assert.ThrowsAsync<ArgumentException>(() =>
            Socks5.ConnectAsync("127.0.0.1", proxy.Port, "bücher.example", 5223, CancellationToken.None));

        await Assert.That(refused!.Message).Contains("xn--");
        await Assert.That(proxy.Accepted).IsEqualTo(0);
    }

    /// <summary>A SOCKS5 proxy on port 0 that accepts no authentication, records the CONNECT request and answers success.</summary>
    private sealed class RecordingSocksProxy : IAsyncDisposable
    {
        private readonly TcpListener _listener = new(IPAddress.Loopback, 0);
        private readonly CancellationTokenSource _stop = new();
        private readonly TaskCompletionSource<byte[]> _request = new(TaskCreationOptions.RunContinuationsAsynchronously);
        private readonly Task _serve;
        private int _accepted;

        private RecordingSocksProxy()
        {
            _listener.Start();
            _serve = ServeAsync();
        }

        public static RecordingSocksProxy Start() => new();

        public int Port => ((IPEndPoint)_listener.LocalEndpoint).Port;

        public int Accepted => Volatile.Read(ref _accepted);

        /// <summary>The first CONNECT request, whole: VER CMD RSV ATYP DST.ADDR DST.PORT.</summary>
        public Task<byte[]> Request => _request.Task;

        private async Task ServeAsync()
        {
            try
            {
                using var client = await _listener.AcceptTcpClientAsync(_stop.Token);
                Interlocked.Increment(ref _accepted);
                var stream = client.GetStream();
                var greeting = new byte[3];
                await stream.ReadExactlyAsync(greeting, _stop.Token);
                await stream.WriteAsync(new byte[] { 5, 0 }, _stop.Token);
                var head = new byte[4];
                await stream.ReadExactlyAsync(head, _stop.Token);
                int length = head[3] switch
                {
                    1 => 4,
                    4 => 16,
                    3 => 1 + (await ReadByteAsync(stream)),
                    _ => 0,
                };
                var rest = new byte[length + 2];
                if (head[3] == 3)
                {
                    rest[0] = (byte)(length - 1);
                    await stream.ReadExactlyAsync(rest.AsMemory(1), _stop.Token);
                }
                else
                {
                    await stream.ReadExactlyAsync(rest, _stop.Token);
                }
                _request.TrySetResult([.. head, .. rest]);
                await stream.WriteAsync(new byte[] { 5, 0, 0, 1, 0, 0, 0, 0, 0, 0 }, _stop.Token);
                await Task.Delay(Timeout.Infinite, _stop.Token);
            }
            catch (Exception) when (_stop.IsCancellationRequested)
            {
                _request.TrySetCanceled();
            }
            catch (Exception ex)
            {
                _request.TrySetException(ex);
            }
        }

        private async Task<int> ReadByteAsync(NetworkStream stream)
        {
            var one = new byte[1];
            await stream.ReadExactlyAsync(one, _stop.Token);
            return one[0];
        }

        public async ValueTask DisposeAsync()
        {
            await _stop.CancelAsync();
            _listener.Stop();
            await _serve;
            _stop.Dispose();
        }
    }
}
