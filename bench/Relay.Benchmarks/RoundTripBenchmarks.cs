using BenchmarkDotNet.Attributes;
using Relay.Client.Transport;
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
    private OneQueueRelay _relay = null!;
    private byte[] _body = [];

    [Params(false, true)]
    public bool Durable { get; set; }

    protected abstract bool UseTls { get; }

    protected abstract Task<RelayConnection> ConnectAsync(RelayServer server, RelayConnectionOptions options);

    [GlobalSetup]
    public void Setup()
    {
        _relay = OneQueueRelay.StartAsync(UseTls, Durable, ConnectAsync).GetAwaiter().GetResult();
        _body = Fixtures.Random(Fixtures.BodySize);
    }

    [GlobalCleanup]
    public void Cleanup() => _relay.DisposeAsync().AsTask().GetAwaiter().GetResult();

    [Benchmark]
    public async Task<ulong> Send_Ok_Msg_Ack_Ok()
    {
        await _relay.Producer.SendAsync(_relay.Sender, _body);
        while (true)
        {
            var e = await _relay.Consumer.Events.ReadAsync();
            if (e is DeliveryEvent { Delivery: var d })
            {
                await _relay.Consumer.AckAsync(_relay.Recipient, d.MessageId);
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
