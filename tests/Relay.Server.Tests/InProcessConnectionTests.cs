using Relay.Client.Transport;
using Relay.Protocol;

namespace Relay.Server.Tests;

/// <summary>
/// <see cref="Hosting.RelayServer.ConnectInProcess"/>: a connection that goes through no socket
/// behaves as one over TCP (TLS, handshake, queues, delivery), counts against the connection limit,
/// and ends with the relay's shutdown.
/// </summary>
public class InProcessConnectionTests
{
    [Test]
    [Arguments(true)]
    [Arguments(false)]
    public async Task A_message_goes_from_producer_to_consumer_over_in_process_connections(bool tls)
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = tls);
        var options = new RelayConnectionOptions { Tls = tls };
        await using var consumer = await RelayConnection.ConnectAsync(relay.Address, relay.Server.ConnectInProcess(), options);
        await using var producer = await RelayConnection.ConnectAsync(relay.Address, relay.Server.ConnectInProcess(), options);

        var recipient = await consumer.CreateQueueAsync();
        var senderKey = new byte[ProtocolConstants.KeySize];
        RelayCrypto.GenerateKeyPair(senderKey, new byte[ProtocolConstants.KeySize]);
        await producer.SecureAsync(recipient.SenderId, senderKey);
        var sender = new SenderQueue(recipient.SenderId, senderKey);
        await consumer.SubscribeAsync(recipient);

        var body = "over no socket"u8.ToArray();
        await producer.SendAsync(sender, body);
        var delivery = await NextDeliveryAsync(consumer);
        await Assert.That(delivery.Body).IsEquivalentTo(body, TUnit.Assertions.Enums.CollectionOrdering.Matching);
        await consumer.AckAsync(recipient, delivery.MessageId);

        // Stored once, deleted by the ACK.
        await Assert.That(relay.Server.Store.Statistics.MessagesAppended).IsEqualTo(1);
        await Assert.That(relay.Server.Store.Statistics.MessagesDeleted).IsEqualTo(1);
        await Assert.That(OpenConnections(relay)).IsEqualTo(2);
    }

    [Test]
    public async Task A_pinned_fingerprint_that_does_not_match_is_refused_in_process_too()
    {
        await using var relay = await TestRelay.StartAsync();
        await using var other = await TestRelay.StartAsync();

        // The address of another relay: its fingerprint does not match this relay's certificate.
        await Assert.That(async () => await RelayConnection.ConnectAsync(other.Address, relay.Server.ConnectInProcess()))
            .Throws<FingerprintMismatchException>();
    }

    [Test]
    public async Task In_process_connections_count_against_the_connection_limit()
    {
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.Tls = false;
            o.MaxConnections = 1;
        });
        var options = new RelayConnectionOptions { Tls = false, ConnectTimeout = TimeSpan.FromSeconds(5) };
        await using var first = await RelayConnection.ConnectAsync(relay.Address, relay.Server.ConnectInProcess(), options);

        await Assert.That(async () => await RelayConnection.ConnectAsync(relay.Address, relay.Server.ConnectInProcess(), options))
            .Throws<RelayConnectException>();
        await Assert.That(relay.Logs.Lines.Any(l => l.Contains("max_connections"))).IsTrue();

        // The first one still works.
        await first.PingAsync();
    }

    [Test]
    public async Task Stopping_the_relay_ends_an_in_process_connection_and_closing_it_frees_its_slot()
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = false);
        var options = new RelayConnectionOptions { Tls = false };
        var closing = await RelayConnection.ConnectAsync(relay.Address, relay.Server.ConnectInProcess(), options);
        await closing.DisposeAsync();
        for (int i = 0; i < 50 && OpenConnections(relay) != 0; i++)
        {
            await Task.Delay(50);
        }
        await Assert.That(OpenConnections(relay)).IsEqualTo(0);

        await using var connection = await RelayConnection.ConnectAsync(relay.Address, relay.Server.ConnectInProcess(), options);
        await relay.Server.StopAsync();
        // The client sees its connection end (within 10 s; at once in practice).
        await Task.WhenAny(Task.Delay(Timeout.Infinite, connection.Closed), Task.Delay(TimeSpan.FromSeconds(10)));
        await Assert.That(connection.Closed.IsCancellationRequested).IsTrue();
        await Assert.That(() => relay.Server.ConnectInProcess()).Throws<ObjectDisposedException>();
    }

    [Test]
    public async Task A_client_that_stops_reading_cannot_hold_up_the_shutdown()
    {
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.Tls = false;
            o.ShutdownTimeout = TimeSpan.FromSeconds(1);
            o.MaxOutputBuffer = 64 * 1024;
        });
        await using var stream = relay.Server.ConnectInProcess();
        await stream.WriteAsync(RawClient.Hello(1, 1));
        // PINGs and never a read: the PONGs fill the in-memory stream and the relay's sends wait.
        var ping = RawClient.Frame(FrameType.Ping, 1, []);
        var chunk = new byte[ping.Length * 1024];
        for (int i = 0; i < 1024; i++)
        {
            ping.CopyTo(chunk, i * ping.Length);
        }
        bool stalled = false;
        for (int i = 0; i < 1000 && !stalled; i++)
        {
            var write = stream.WriteAsync(chunk).AsTask();
            // The relay stopped reading: its output is full.
            stalled = await Task.WhenAny(write, Task.Delay(TimeSpan.FromSeconds(2))) != write;
            if (stalled)
            {
                // Left pending on purpose; it fails when the relay closes its end.
                _ = write.ContinueWith(static t => _ = t.Exception, TaskContinuationOptions.OnlyOnFaulted);
            }
        }
        await Assert.That(stalled).IsTrue();

        var stopping = System.Diagnostics.Stopwatch.StartNew();
        await relay.Server.StopAsync();
        // The shutdown timeout (1 s), then the abort ends the session at once: neither the 5 s a
        // session gives its last sends nor the 2 s the shutdown waits for aborted sessions.
        await Assert.That(stopping.Elapsed).IsLessThan(TimeSpan.FromSeconds(2.5));
        await Assert.That(relay.Logs.Lines.Any(l => l.Contains("Shutdown timeout reached"))).IsTrue();
    }

    [Test]
    public async Task Closing_a_connection_whose_transport_fails_to_close_does_not_throw_and_disposes_its_keys()
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = false);
        var options = new RelayConnectionOptions { Tls = false };
        using var unobserved = new UnobservedExceptions(e => e is IOException && e.Message == FailingCloseStream.Failure);
        var transport = new FailingCloseStream(relay.Server.ConnectInProcess());
        var connection = await RelayConnection.ConnectAsync(relay.Address, transport, options);
        var queue = await connection.CreateQueueAsync();
        await connection.SubscribeAsync(queue);

        await connection.DisposeAsync();
        await Assert.That(transport.Closed).IsTrue();
        await Assert.That(connection.Closed.IsCancellationRequested).IsTrue();
        // The queue's delivery cipher and MAC key were disposed with it.
        await Assert.That(connection.IsSubscribed(queue)).IsFalse();

        // RelayClient closes a lost connection without awaiting DisposeAsync (RelayLink.Drop): it must not fault.
        var dropped = new FailingCloseStream(relay.Server.ConnectInProcess());
        DropWithoutWaiting(await RelayConnection.ConnectAsync(relay.Address, dropped, options));
        await Assert.That(await OperationsMetrics.EventuallyAsync(() => Task.FromResult(dropped.Closed), seconds: 10)).IsTrue();
        await Assert.That(await unobserved.CollectAsync()).IsEmpty();
    }

    private static void DropWithoutWaiting(RelayConnection connection) => _ = connection.DisposeAsync().AsTask();

    /// <summary>An in-process stream whose DisposeAsync closes it and then throws, as a wrapper that flushes to a peer that is gone.</summary>
    private sealed class FailingCloseStream(Stream inner) : PassThroughStream(inner)
    {
        public const string Failure = "the transport failed to close";
        private volatile bool _closed;
        public bool Closed => _closed;

        public override async ValueTask DisposeAsync()
        {
            await Inner.DisposeAsync();
            _closed = true;
            throw new IOException(Failure);
        }
    }

    private static long OpenConnections(TestRelay relay) =>
        relay.Server.Metrics.Snapshot(relay.Server.Store, relay.Server.Options, TimeSpan.Zero).ConnectionsOpen;

    private static async Task<Delivery> NextDeliveryAsync(RelayConnection connection)
    {
        using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(10));
        while (true)
        {
            if (await connection.Events.ReadAsync(timeout.Token) is DeliveryEvent { Delivery: var delivery })
            {
                return delivery;
            }
        }
    }
}
