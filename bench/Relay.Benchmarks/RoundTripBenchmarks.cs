using System.Net;
using BenchmarkDotNet.Attributes;
using Relay.Client.Transport;
using Relay.Protocol;
using Relay.Server;
using Relay.Server.Hosting;

namespace Relay.Benchmarks;

/// <summary>
/// One message through a relay in the same process, awaited step by step: SEND → OK (after the
/// store commit) → MSG push → ACK → OK, with Relay.Client's RelayConnection (a producer and a
/// consumer connection). Allocated counts the whole process (client SDK and relay together), since
/// BenchmarkDotNet reads the process-wide allocation counter. Durable=true includes two fsyncs per
/// round trip. The subclasses differ only in how the two connections reach the relay.
/// </summary>
public abstract class RoundTripBenchmarks
{
    private string _directory = "";
    private RelayServer _server = null!;
    private RelayConnection _producer = null!;
    private RelayConnection _consumer = null!;
    private RecipientQueue _recipient = null!;
    private SenderQueue _sender = null!;
    private byte[] _body = [];

    [Params(false, true)]
    public bool Durable { get; set; }

    protected abstract bool UseTls { get; }

    protected abstract Task<RelayConnection> ConnectAsync(RelayServer server, RelayConnectionOptions options);

    [GlobalSetup]
    public void Setup() => SetupAsync().GetAwaiter().GetResult();

    private async Task SetupAsync()
    {
        _directory = Path.Combine(Path.GetTempPath(), "relay-bench-rt-" + Guid.NewGuid().ToString("N"));
        _server = await RelayServer.StartAsync(new RelayServerOptions
        {
            DataDirectory = _directory,
            Listen = new IPEndPoint(IPAddress.Loopback, 0),
            Admin = null,
            Tls = UseTls,
            Durable = Durable,
        }, configureLogging: _ => { });
        var options = new RelayConnectionOptions { Tls = UseTls };
        _producer = await ConnectAsync(_server, options);
        _consumer = await ConnectAsync(_server, options);
        _recipient = await _consumer.CreateQueueAsync();
        var senderKey = new byte[ProtocolConstants.KeySize];
        RelayCrypto.GenerateKeyPair(senderKey, new byte[ProtocolConstants.KeySize]);
        await _producer.SecureAsync(_recipient.SenderId, senderKey);
        _sender = new SenderQueue(_recipient.SenderId, senderKey);
        await _consumer.SubscribeAsync(_recipient);
        _body = Fixtures.Random(Fixtures.BodySize);
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _producer.DisposeAsync().AsTask().GetAwaiter().GetResult();
        _consumer.DisposeAsync().AsTask().GetAwaiter().GetResult();
        _server.StopAsync().GetAwaiter().GetResult();
        Directory.Delete(_directory, recursive: true);
    }

    [Benchmark]
    public async Task<ulong> Send_Ok_Msg_Ack_Ok()
    {
        await _producer.SendAsync(_sender, _body);
        while (true)
        {
            var e = await _consumer.Events.ReadAsync();
            if (e is DeliveryEvent { Delivery: var d })
            {
                await _consumer.AckAsync(_recipient, d.MessageId);
                return d.MessageId;
            }
        }
    }
}

/// <summary>The round trip over plain TCP on 127.0.0.1 (compare <see cref="EmbeddedRoundTripBenchmarks"/>).</summary>
[MemoryDiagnoser]
public class LoopbackRoundTripBenchmarks : RoundTripBenchmarks
{
    protected override bool UseTls => false;

    protected override Task<RelayConnection> ConnectAsync(RelayServer server, RelayConnectionOptions options) =>
        RelayConnection.ConnectAsync(server.Address, options);
}

/// <summary>
/// The embedded round trip: the connections go through <c>RelayServer.ConnectInProcess()</c>, so no
/// socket and no kernel is involved: the relay's session, store and group commit, and the client
/// SDK, with or without TLS.
/// </summary>
[MemoryDiagnoser]
public class EmbeddedRoundTripBenchmarks : RoundTripBenchmarks
{
    [Params(false, true)]
    public bool Tls { get; set; }

    protected override bool UseTls => Tls;

    protected override Task<RelayConnection> ConnectAsync(RelayServer server, RelayConnectionOptions options) =>
        RelayConnection.ConnectAsync(server.Address, server.ConnectInProcess(), options);
}
