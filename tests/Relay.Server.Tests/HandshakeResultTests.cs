using System.Net.Security;
using System.Net.Sockets;
using System.Security.Authentication;
using Relay.Protocol;
using Relay.Server.Connections;
using static Relay.Server.Tests.OperationsMetrics;

namespace Relay.Server.Tests;

/// <summary>
/// relay_handshakes_total: every connection the relay accepted and that did not complete its handshake
/// is counted under exactly one result, whatever point the client went away at and however.
/// </summary>
public class HandshakeResultTests
{
    /// <summary>Where the client resets its connection.</summary>
    public enum ResetPoint
    {
        /// <summary>At once after TCP connect, before any byte.</summary>
        Connected,
        /// <summary>After the first bytes of a TLS ClientHello.</summary>
        InTls,
        /// <summary>In the middle of HELLO.</summary>
        InHello,
    }

    private static double Handshakes(string text) => text.Split('\n')
        .Where(l => l.StartsWith("relay_handshakes_total{", StringComparison.Ordinal))
        .Sum(l => double.Parse(l[(l.LastIndexOf(' ') + 1)..], System.Globalization.CultureInfo.InvariantCulture));

    [Test]
    [Arguments(true, ResetPoint.Connected, "tls")]
    [Arguments(true, ResetPoint.InTls, "tls")]
    [Arguments(true, ResetPoint.InHello, "truncated")]
    [Arguments(false, ResetPoint.Connected, "closed")]
    [Arguments(false, ResetPoint.InHello, "truncated")]
    public async Task A_connection_reset_before_its_handshake_completes_is_counted_under_one_result(bool tls, ResetPoint point, string result)
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = tls);
        var before = await ScrapeAsync(relay);
        const int connections = 8;
        for (int i = 0; i < connections; i++)
        {
            await ConnectAndResetAsync(relay, point);
        }

        // Every session has ended once no connection is open.
        string after = before;
        await Assert.That(await EventuallyAsync(async () => Value(after = await ScrapeAsync(relay), "relay_connections_open") == 0, seconds: 15)).IsTrue();
        double accepted = Value(after, "relay_connections_accepted_total") - Value(before, "relay_connections_accepted_total");
        double counted = Handshakes(after) - Handshakes(before);
        double underResult = Value(after, "relay_handshakes_total", $"result=\"{result}\"") - Value(before, "relay_handshakes_total", $"result=\"{result}\"");
        // A reset that arrives before the relay has set the socket up ends it unserved (neither accepted
        // nor counted); every connection that was served is counted once, under the expected result.
        await Assert.That(accepted).IsGreaterThan(0);
        await Assert.That(counted).IsEqualTo(accepted);
        await Assert.That(underResult).IsEqualTo(accepted);
        await Assert.That(Value(after, "relay_handshakes_total", "result=\"ok\"") - Value(before, "relay_handshakes_total", "result=\"ok\"")).IsEqualTo(0);
    }

    private static async Task ConnectAndResetAsync(TestRelay relay, ResetPoint point)
    {
        if (point == ResetPoint.InHello && relay.Server.Options.Tls)
        {
            var client = await RawClient.ConnectRawAsync(relay);
            // The relay's side of TLS is done once its session tickets arrive (sent after it has read
            // the client's Finished): going away before then would be a TLS failure.
            await Assert.That(await EventuallyAsync(() => Task.FromResult(client.Socket.Available > 0), seconds: 10)).IsTrue();
            await client.WriteAsync(RawClient.Hello(1, 1)[..5]);
            await WaitForTheRelayToReadAsync();
            Reset(client.Socket);
            await client.DisposeAsync();
            return;
        }
        using var socket = new Socket(SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
        await socket.ConnectAsync(relay.Server.RelayEndPoint);
        switch (point)
        {
            case ResetPoint.InTls:
                // A TLS record header announcing a ClientHello, and no more.
                await socket.SendAsync(new byte[] { 0x16, 0x03, 0x01, 0x00, 0xF0, 0x01 });
                break;
            case ResetPoint.InHello:
                await socket.SendAsync(RawClient.Hello(1, 1)[..5]);
                break;
        }
        await WaitForTheRelayToReadAsync();
        Reset(socket);
    }

    // The session is waiting for more bytes when the reset arrives (not a guarantee: either way the count must hold).
    private static Task WaitForTheRelayToReadAsync() => Task.Delay(100);

    /// <summary>RST instead of FIN: a client killed, or a proxy or NAT dropping the connection.</summary>
    private static void Reset(Socket socket)
    {
        socket.LingerState = new LingerOption(true, 0);
        socket.Close();
    }

    /// <summary>Where the relay's transport fails.</summary>
    public enum FailurePoint
    {
        /// <summary>The first read: before TLS, or before HELLO without TLS.</summary>
        FirstRead,
        /// <summary>After TLS, before any byte of HELLO.</summary>
        BeforeHello,
        /// <summary>In the middle of HELLO (without TLS).</summary>
        InHello,
    }

    /// <summary>
    /// The relay's transport throws what a socket closed or disposed under a read throws, rather than
    /// the IOException of a reset: the handshake is still counted, once.
    /// </summary>
    [Test]
    [MethodDataSource(nameof(TransportFailures))]
    public async Task A_transport_that_fails_before_the_handshake_completes_is_counted_under_one_result(bool tls, FailurePoint point, string failure, string result)
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = tls);
        var before = await ScrapeAsync(relay);
        var (relayEnd, clientEnd) = InProcessConnection.Create();
        var transport = new FailingStream(relayEnd);
        var session = new RelaySession(relay.Server.Context).RunAsync(transport, relayEnd);
        Stream client = clientEnd;
        if (point == FailurePoint.BeforeHello)
        {
            var ssl = new SslStream(clientEnd);
            using var cts = new CancellationTokenSource(RawClient.DefaultTimeout);
            await ssl.AuthenticateAsClientAsync(new SslClientAuthenticationOptions
            {
                TargetHost = "relay",
                ApplicationProtocols = [new SslApplicationProtocol(ProtocolConstants.AlpnString)],
                EnabledSslProtocols = SslProtocols.Tls13,
                RemoteCertificateValidationCallback = (_, _, _, _) => true,
            }, cts.Token);
            client = ssl;
        }
        if (point == FailurePoint.InHello)
        {
            await client.WriteAsync(RawClient.Hello(1, 1).AsMemory(0, 5));
        }
        // The relay waits for the next bytes: a read in progress; after TLS, its zero-byte wait for HELLO,
        // which comes after its second flight (the session tickets, sent once it has read the client's Finished).
        int reads = point switch { FailurePoint.FirstRead => 1, FailurePoint.InHello => 3, _ => 0 };
        await Assert.That(await EventuallyAsync(() => Task.FromResult(reads == 0 ? transport.WritesBeforeLastZeroByteRead >= 2 : transport.Reads >= reads), seconds: 10)).IsTrue();
        transport.Failure = failure switch
        {
            nameof(SocketException) => new SocketException((int)SocketError.ConnectionReset),
            nameof(ObjectDisposedException) => new ObjectDisposedException(nameof(Socket)),
            _ => new InvalidOperationException("Reading is not allowed after reader was completed."),
        };
        await clientEnd.WriteAsync(new byte[] { 0x16 });   // wakes the read up, which fails
        await session.WaitAsync(TimeSpan.FromSeconds(10));
        await clientEnd.DisposeAsync();
        await relayEnd.DisposeAsync();

        var after = await ScrapeAsync(relay);
        await Assert.That(Handshakes(after) - Handshakes(before)).IsEqualTo(1);
        await Assert.That(Value(after, "relay_handshakes_total", $"result=\"{result}\"") - Value(before, "relay_handshakes_total", $"result=\"{result}\"")).IsEqualTo(1);
    }

    public static IEnumerable<Func<(bool, FailurePoint, string, string)>> TransportFailures()
    {
        foreach (string failure in new[] { nameof(SocketException), nameof(ObjectDisposedException), nameof(InvalidOperationException) })
        {
            yield return () => (true, FailurePoint.FirstRead, failure, "tls");
            yield return () => (true, FailurePoint.BeforeHello, failure, "closed");
            yield return () => (false, FailurePoint.FirstRead, failure, "closed");
            yield return () => (false, FailurePoint.InHello, failure, "truncated");
        }
    }

    /// <summary>The relay's end of an in-process connection whose reads throw <see cref="Failure"/> once it is set.</summary>
    private sealed class FailingStream(Stream inner) : PassThroughStream(inner)
    {
        private int _reads;
        private int _writes;
        private int _writesBeforeLastZeroByteRead;

        public volatile Exception? Failure;

        public int Reads => Volatile.Read(ref _reads);

        /// <summary>How many writes the relay had made when it last began a zero-byte read.</summary>
        public int WritesBeforeLastZeroByteRead => Volatile.Read(ref _writesBeforeLastZeroByteRead);

        public override async ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default)
        {
            Interlocked.Increment(ref _reads);
            if (buffer.IsEmpty) Volatile.Write(ref _writesBeforeLastZeroByteRead, Volatile.Read(ref _writes));
            int n = await Inner.ReadAsync(buffer, cancellationToken);
            if (Failure is { } failure) throw failure;
            return n;
        }

        public override ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken = default)
        {
            Interlocked.Increment(ref _writes);
            return base.WriteAsync(buffer, cancellationToken);
        }
    }
}
