using System.Buffers;
using System.Buffers.Binary;
using System.Net.NetworkInformation;
using System.Net.Security;
using System.Net.Sockets;
using System.Security.Authentication;
using System.Security.Cryptography;
using System.Text;
using System.Text.RegularExpressions;
using Relay.Client.Transport;
using Relay.Protocol;
using static Relay.Server.Tests.OperationsMetrics;

namespace Relay.Server.Tests;

/// <summary>
/// DESIGN.md's privacy rule, tested: after a traffic run with every command and every error the
/// relay answers, no log line (captured at Debug) and no metric (scraped over HTTP) contains a peer
/// address, a client port, or any queue id or key in any encoding the relay could use.
/// </summary>
public partial class PrivacyTests
{
    private const string Password = "privacy password";
    private static readonly RelayConnectionOptions Loopback = new() { Host = "127.0.0.1" };

    [Test]
    public async Task No_log_line_or_metric_contains_an_address_a_port_an_id_or_a_key()
    {
        var secrets = new List<byte[]>();
        var clientPorts = new HashSet<int>();
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.PublicHosts = ["relay.invalid"];   // the relay's own address must not put 127.0.0.1 in the ready line
            o.CreatePassword = Password;
            o.QueueMaxMessages = 2;
            o.MaxMessage = 1024;
            o.MaxSubscriptionsPerConnection = 1;
        });
        await using var full = await TestRelay.StartAsync(o =>
        {
            o.PublicHosts = ["full.invalid"];
            o.DiskBudgetBytes = 128 * 1024;
        });

        await using var recipient = await relay.ConnectAsync(Loopback);
        await using var sender = await relay.ConnectAsync(Loopback);
        secrets.Add(recipient.SessionId);
        secrets.Add(sender.SessionId);
        RecordClientPorts(relay, clientPorts);

        // Every command, successfully.
        await recipient.PingAsync();
        var queue = await recipient.CreateQueueAsync(Password);
        var other = await recipient.CreateQueueAsync(Password);
        AddQueueSecrets(secrets, queue);
        AddQueueSecrets(secrets, other);
        var senderPrivate = new byte[32];
        var senderPublic = new byte[32];
        RelayCrypto.GenerateKeyPair(senderPrivate, senderPublic);
        secrets.Add(senderPrivate);
        secrets.Add(senderPublic);
        await sender.SecureAsync(queue.SenderId, senderPrivate);
        var to = new SenderQueue(queue.SenderId, senderPrivate);
        await sender.SendAsync(to, "one"u8.ToArray());
        await recipient.SubscribeAsync(queue);
        var delivery = await NextDeliveryAsync(recipient);
        await recipient.AckAsync(queue, delivery.MessageId);
        await sender.SendAsync(to, "two"u8.ToArray());
        var second = await NextDeliveryAsync(recipient);
        var polled = await recipient.GetAsync(queue);
        await recipient.AckAsync(queue, second.MessageId);
        await Assert.That(polled).IsNotNull();

        // Every error a client can provoke.
        await ExpectError(ErrorCode.Auth, () => recipient.CreateQueueAsync());                    // no password
        await ExpectError(ErrorCode.Auth, () => recipient.CreateQueueAsync("wrong"));             // wrong password
        await ExpectError(ErrorCode.Auth, () => sender.SendAsync(new SenderQueue(queue.SenderId, null), "x"u8.ToArray())); // no MAC
        await ExpectError(ErrorCode.Auth, () => sender.SecureAsync(queue.SenderId, RandomNumberGenerator.GetBytes(32)));  // secured already
        await ExpectError(ErrorCode.NoMsg, () => recipient.AckAsync(queue, 12345));
        await ExpectError(ErrorCode.TooLarge, () => sender.SendAsync(to, new byte[2000]));           // refused by the SDK itself
        var tooLarge = await sender.RequestAsync(other.SenderId, static (w, corr, id) =>                  // and by the relay
            FrameWriter.WriteQueueCommand(w, FrameType.Send, corr, id, [0], new byte[2000], ReadOnlySpan<byte>.Empty));
        await Assert.That(tooLarge.Type).IsEqualTo(FrameType.Err);
        await Assert.That((ErrorCode)tooLarge.Payload[0]).IsEqualTo(ErrorCode.TooLarge);
        await ExpectError(ErrorCode.Limit, () => recipient.SubscribeAsync(other));
        var otherTo = new SenderQueue(other.SenderId, null);
        await sender.SendAsync(otherTo, "a"u8.ToArray());
        await sender.SendAsync(otherTo, "b"u8.ToArray());
        await ExpectError(ErrorCode.Quota, () => sender.SendAsync(otherTo, "c"u8.ToArray()));
        var unknownType = await sender.RequestAsync(0, static (w, corr, _) => FrameWriter.WriteEmpty(w, (FrameType)0x7F, corr));
        await Assert.That(unknownType.Type).IsEqualTo(FrameType.Err);
        var badNew = await sender.RequestAsync(0, static (w, corr, _) => FrameWriter.WriteEmpty(w, FrameType.New, corr));
        await Assert.That(badNew.Type).IsEqualTo(FrameType.Err);
        relay.Server.Options.AllowNewQueues = false;
        await ExpectError(ErrorCode.Disabled, () => recipient.CreateQueueAsync(Password));
        relay.Server.Options.AllowNewQueues = true;
        await recipient.SuspendAsync(queue);
        await ExpectError(ErrorCode.Auth, () => sender.SendAsync(to, "x"u8.ToArray()));          // suspended
        await recipient.DeleteAsync(queue);
        await ExpectError(ErrorCode.Auth, () => recipient.GetAsync(queue));                         // deleted

        // Connection-level failures: a bad version, a hostile length, TLS garbage.
        await RawVersionMismatchAsync(relay, clientPorts);
        await RawHostileLengthAsync(relay, clientPorts);
        await RawTlsGarbageAsync(relay, clientPorts);

        // FULL, on a relay with a tiny disk budget.
        await using (var c = await full.ConnectAsync(Loopback))
        {
            RecordClientPorts(full, clientPorts);
            secrets.Add(c.SessionId);
            var q = await c.CreateQueueAsync();
            AddQueueSecrets(secrets, q);
            bool refused = false;
            for (int i = 0; i < 60 && !refused; i++)
            {
                try
                {
                    await c.SendAsync(new SenderQueue(q.SenderId, null), RandomNumberGenerator.GetBytes(30_000));
                    await Task.Delay(50);
                }
                catch (RelayErrorException e) when (e.Code == ErrorCode.Full)
                {
                    refused = true;
                }
            }
            await Assert.That(refused).IsTrue();
            await full.Server.MaintainNowAsync();
        }
        await relay.Server.SweepNowAsync();
        await relay.Server.MaintainNowAsync();

        var metrics = await ScrapeAsync(relay) + "\n" + await ScrapeAsync(full);
        await Assert.That(metrics).Contains("result=\"too_large\"");
        await Assert.That(metrics).Contains("result=\"full\"");
        var logs = relay.Logs.Lines.Concat(full.Logs.Lines).ToList();
        await Assert.That(logs.Count).IsGreaterThan(5);
        await Assert.That(logs.Any(l => l.Contains("[10]"))).IsTrue();   // the TLS failure was logged
        await Assert.That(metrics).Contains("relay_handshakes_total{result=\"version\"}");
        await Assert.That(metrics).Contains("relay_handshakes_total{result=\"tls\"}");

        // Stop the relays so their shutdown lines are checked too.
        await relay.Server.StopAsync();
        await full.Server.StopAsync();
        logs = [.. relay.Logs.Lines.Concat(full.Logs.Lines)];

        var labels = string.Join('\n', LabelSets().Matches(metrics).Select(m => m.Value));
        foreach (var address in new[] { "127.0.0.1", "::1", "localhost", "::ffff:" })
        {
            await Assert.That(logs.Where(l => l.Contains(address, StringComparison.OrdinalIgnoreCase))).IsEmpty();
            await Assert.That(metrics.Contains(address, StringComparison.OrdinalIgnoreCase)).IsFalse();
        }
        await Assert.That(clientPorts.Count).IsGreaterThanOrEqualTo(5);
        foreach (int port in clientPorts)
        {
            var pattern = new Regex($@"(?<![0-9]){port}(?![0-9])");
            await Assert.That(logs.Where(l => pattern.IsMatch(l))).IsEmpty();
            await Assert.That(pattern.IsMatch(labels)).IsFalse();
        }
        var logBytes = Encoding.UTF8.GetBytes(string.Join('\n', logs));
        var metricBytes = Encoding.UTF8.GetBytes(metrics);
        foreach (var secret in secrets)
        {
            await Assert.That(logBytes.AsSpan().IndexOf(secret) < 0).IsTrue();
            await Assert.That(metricBytes.AsSpan().IndexOf(secret) < 0).IsTrue();
            foreach (var encoded in Encodings(secret))
            {
                await Assert.That(logs.Where(l => l.Contains(encoded, StringComparison.Ordinal))).IsEmpty();
                await Assert.That(metrics.Contains(encoded, StringComparison.Ordinal)).IsFalse();
            }
        }
    }

    /// <summary>The whole value and its first 12 bytes, in hex (lower, upper), base64 and base64url.</summary>
    private static IEnumerable<string> Encodings(byte[] secret)
    {
        foreach (var bytes in new[] { secret, secret[..12] })
        {
            yield return Convert.ToHexStringLower(bytes);
            yield return Convert.ToHexString(bytes);
            var b64 = Convert.ToBase64String(bytes);
            yield return b64.TrimEnd('=');
            yield return b64.TrimEnd('=').Replace('+', '-').Replace('/', '_');
        }
    }

    private static void AddQueueSecrets(List<byte[]> secrets, RecipientQueue q)
    {
        secrets.Add(q.RecipientId);
        secrets.Add(q.SenderId);
        secrets.Add(q.RecipientPrivateKey);
        secrets.Add(RelayCrypto.PublicKeyOf(q.RecipientPrivateKey));
        secrets.Add(q.DeliveryKey);
    }

    /// <summary>The local ports of every open TCP connection to the relay (the clients' ephemeral ports).</summary>
    private static void RecordClientPorts(TestRelay relay, HashSet<int> ports)
    {
        int relayPort = relay.Server.RelayEndPoint.Port;
        foreach (var c in IPGlobalProperties.GetIPGlobalProperties().GetActiveTcpConnections())
        {
            if (c.RemoteEndPoint.Port == relayPort)
            {
                ports.Add(c.LocalEndPoint.Port);
            }
        }
    }

    private static async Task ExpectError(ErrorCode code, Func<Task> action)
    {
        var e = await Assert.ThrowsAsync<RelayErrorException>(action);
        await Assert.That(e!.Code).IsEqualTo(code);
    }

    private static async Task<Delivery> NextDeliveryAsync(RelayConnection connection)
    {
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(10));
        while (true)
        {
            if (await connection.Events.ReadAsync(cts.Token) is DeliveryEvent d) return d.Delivery;
        }
    }

    private static async Task<(TcpClient Tcp, Stream Stream)> RawTlsAsync(TestRelay relay, HashSet<int> ports)
    {
        var tcp = new TcpClient();
        await tcp.ConnectAsync(relay.Server.RelayEndPoint);
        ports.Add(((System.Net.IPEndPoint)tcp.Client.LocalEndPoint!).Port);
        var ssl = new SslStream(tcp.GetStream(), false);
        await ssl.AuthenticateAsClientAsync(new SslClientAuthenticationOptions
        {
            TargetHost = "relay",
            ApplicationProtocols = [new SslApplicationProtocol(ProtocolConstants.AlpnString)],
            EnabledSslProtocols = SslProtocols.Tls13,
            RemoteCertificateValidationCallback = (_, _, _, _) => true,
        });
        return (tcp, ssl);
    }

    /// <summary>Reads until the relay closes the connection (bounded).</summary>
    private static async Task DrainAsync(Stream stream)
    {
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(10));
        var buffer = new byte[4096];
        try
        {
            while (await stream.ReadAsync(buffer, cts.Token) > 0) { }
        }
        catch (IOException) { }
        catch (OperationCanceledException) { }
    }

    private static async Task RawVersionMismatchAsync(TestRelay relay, HashSet<int> ports)
    {
        var (tcp, stream) = await RawTlsAsync(relay, ports);
        using (tcp)
        await using (stream)
        {
            var w = new ArrayBufferWriter<byte>();
            FrameWriter.WriteHello(w, 90, 99);
            await stream.WriteAsync(w.WrittenMemory);
            await DrainAsync(stream);
        }
    }

    private static async Task RawHostileLengthAsync(TestRelay relay, HashSet<int> ports)
    {
        var (tcp, stream) = await RawTlsAsync(relay, ports);
        using (tcp)
        await using (stream)
        {
            var frame = new byte[9];
            BinaryPrimitives.WriteUInt32BigEndian(frame, 0x7FFF_FFFF);
            frame[4] = (byte)FrameType.Hello;
            await stream.WriteAsync(frame);
            await DrainAsync(stream);
        }
    }

    private static async Task RawTlsGarbageAsync(TestRelay relay, HashSet<int> ports)
    {
        using var tcp = new TcpClient();
        await tcp.ConnectAsync(relay.Server.RelayEndPoint);
        ports.Add(((System.Net.IPEndPoint)tcp.Client.LocalEndPoint!).Port);
        var stream = tcp.GetStream();
        await stream.WriteAsync(Encoding.ASCII.GetBytes("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"));
        await DrainAsync(stream);
    }

    [GeneratedRegex(@"\{[^}]*\}")]
    private static partial Regex LabelSets();
}
