using System.Net;
using Relay.Client.Transport;
using Relay.Protocol;
using Relay.Server;
using Relay.Server.Hosting;

namespace Relay.Benchmarks;

/// <summary>
/// A relay in this process on a temporary directory with one secured queue, a producer connection
/// and a consumer connection subscribed to it: what the round-trip benchmarks and the allocation
/// profile pass messages through. <paramref name="connect"/> says how a connection reaches the relay.
/// </summary>
internal sealed class OneQueueRelay : IAsyncDisposable
{
    private readonly string _directory;

    public RelayServer Server { get; }
    public RelayConnection Producer { get; private set; } = null!;
    public RelayConnection Consumer { get; private set; } = null!;
    public RecipientQueue Recipient { get; private set; } = null!;
    public SenderQueue Sender { get; private set; } = null!;

    private OneQueueRelay(string directory, RelayServer server)
    {
        _directory = directory;
        Server = server;
    }

    public static async Task<OneQueueRelay> StartAsync(bool tls, bool durable,
        Func<RelayServer, RelayConnectionOptions, Task<RelayConnection>> connect, int deliveryWindow = 1)
    {
        var directory = Path.Combine(Path.GetTempPath(), "relay-bench-" + Guid.NewGuid().ToString("N"));
        var server = await RelayServer.StartAsync(new RelayServerOptions
        {
            DataDirectory = directory,
            Listen = new IPEndPoint(IPAddress.Loopback, 0),
            Admin = null,
            Tls = tls,
            Durable = durable,
        }, configureLogging: _ => { });
        var relay = new OneQueueRelay(directory, server);
        var options = new RelayConnectionOptions { Tls = tls };
        relay.Producer = await connect(server, options);
        relay.Consumer = await connect(server, options);
        relay.Recipient = await relay.Consumer.CreateQueueAsync();
        var senderKey = new byte[ProtocolConstants.KeySize];
        RelayCrypto.GenerateKeyPair(senderKey, new byte[ProtocolConstants.KeySize]);
        await relay.Producer.SecureAsync(relay.Recipient.SenderId, senderKey);
        relay.Sender = new SenderQueue(relay.Recipient.SenderId, senderKey);
        await relay.Consumer.SubscribeAsync(relay.Recipient, deliveryWindow);
        return relay;
    }

    public async ValueTask DisposeAsync()
    {
        await Producer.DisposeAsync();
        await Consumer.DisposeAsync();
        await Server.StopAsync();
        Directory.Delete(_directory, recursive: true);
    }
}
