using System.Net;
using System.Net.Sockets;
using System.Security.Cryptography;
using System.Text;
using Relay.Client;
using Relay.Client.Transport;
using Relay.Protocol;

namespace Relay.Server.Tests;

/// <summary>
/// What an app sees of <see cref="RelayClient.SubscribeAsync"/> and <see cref="RelayClient.Unsubscribe"/>:
/// a queue is delivered while it is subscribed, and nothing that arrives while it is not is lost.
/// </summary>
public class ClientSubscriptionTests
{
    private static RelayClientOptions Options => new()
    {
        ReconnectMin = TimeSpan.FromMilliseconds(50),
        ReconnectMax = TimeSpan.FromMilliseconds(500),
    };

    private static string Text(QueueDelivery d) => Encoding.UTF8.GetString(d.Delivery.Body);

    /// <summary>
    /// A relay that refuses the handshake (it answers HELLO with ERR VERSION) has not refused the queue:
    /// the failed connection is thrown to the caller (a RelayConnectException, its inner exception the
    /// relay's refusal), the queue stays subscribed, and its SUB is sent once a connection is made.
    /// </summary>
    [Test]
    public async Task A_relay_that_refuses_the_handshake_leaves_the_queue_subscribed_for_the_next_connection()
    {
        var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        try
        {
            var address = new RelayAddress(RelayAddress.Base64Url(new byte[32]), ["127.0.0.1"], ((IPEndPoint)listener.LocalEndpoint).Port);
            var queue = ScriptedRelay.NewQueue();
            await using var client = new RelayClient(new RelayClientOptions
            {
                Tls = false,
                ReconnectMin = TimeSpan.FromMilliseconds(50),
                ReconnectMax = TimeSpan.FromMilliseconds(500),
            });
            using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(20));
            // Every connection's HELLO is answered with ERR VERSION and the range of versions the relay
            // speaks (2 to 3) until the call has failed; then with WELCOME, and the SUB that follows is noted.
            bool refuse = true;
            var subscribed = new TaskCompletionSource<RawFrame>(TaskCreationOptions.RunContinuationsAsynchronously);
            var sessions = new List<ScriptedRelay.Session>();
            var accepting = Task.Run(async () =>
            {
                while (!timeout.IsCancellationRequested)
                {
                    var session = new ScriptedRelay.Session(await listener.AcceptTcpClientAsync(timeout.Token));
                    sessions.Add(session);
                    await session.ExpectAsync(FrameType.Hello);
                    if (Volatile.Read(ref refuse))
                    {
                        await session.SendAsync(w => FrameWriter.WriteVersionError(w, 2, 3));
                        session.Dispose();
                        continue;
                    }
                    var sessionKey = new byte[ProtocolConstants.KeySize];
                    RelayCrypto.GenerateKeyPair(new byte[ProtocolConstants.KeySize], sessionKey);
                    await session.SendAsync(w => FrameWriter.WriteWelcome(w, 1, 65_536, 65_000, RandomNumberGenerator.GetBytes(ProtocolConstants.SessionIdSize), sessionKey));
                    subscribed.TrySetResult(await session.ReadAsync(TimeSpan.FromSeconds(5)));
                    return;
                }
            });
            try
            {
                var failed = await Assert.ThrowsAsync<RelayConnectException>(() => client.SubscribeAsync(address, queue, timeout.Token));
                await Assert.That(failed!.InnerException).IsTypeOf<RelayErrorException>();
                await Assert.That(((RelayErrorException)failed.InnerException!).Code).IsEqualTo(ErrorCode.Version);

                // The next connection (the client's reconnection) is answered: the queue is subscribed on it.
                Volatile.Write(ref refuse, false);
                var sub = await subscribed.Task.WaitAsync(timeout.Token);
                await Assert.That(sub.Type).IsEqualTo(FrameType.Sub);
                await Assert.That(sub.Payload.AsSpan().IndexOf(queue.RecipientId) >= 0).IsTrue();
            }
            finally
            {
                await timeout.CancelAsync();
                listener.Stop();
                try { await accepting; } catch (Exception) { }
                foreach (var session in sessions) session.Dispose();
            }
        }
        finally
        {
            listener.Stop();
        }
    }

    [Test]
    public async Task A_cancelled_SubscribeAsync_leaves_the_queue_unsubscribed_and_a_later_one_subscribes_it()
    {
        await using var relay = await TestRelay.StartAsync();
        await using var owner = await relay.ConnectAsync();
        var queue = await owner.CreateQueueAsync();
        await owner.SendAsync(new SenderQueue(queue.SenderId, null), "stored"u8.ToArray());
        await using var client = new RelayClient(Options);

        await Assert.ThrowsAsync<OperationCanceledException>(() => client.SubscribeAsync(relay.Address, queue, new CancellationToken(true)));

        // The client is connected (its deliveries' connection was started), and the queue is not delivered.
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(20));
        await using var deliveries = client.DeliveriesAsync(cts.Token).GetAsyncEnumerator(cts.Token);
        var next = deliveries.MoveNextAsync().AsTask();
        await Assert.That(await Task.WhenAny(next, Task.Delay(TimeSpan.FromSeconds(1.5))) == next).IsFalse();
        var connection = await client.ConnectAsync(relay.Address);
        await Assert.That(connection.IsSubscribed(queue)).IsFalse();

        // Subscribed when the app asks again: the message comes, once, and its ACK is taken.
        await client.SubscribeAsync(relay.Address, queue);
        await Assert.That(await next.WaitAsync(TimeSpan.FromSeconds(10))).IsTrue();
        await Assert.That(Text(deliveries.Current)).IsEqualTo("stored");
        await client.RunAsync(relay.Address, c => c.AckAsync(queue, deliveries.Current.Delivery.MessageId));
        var again = deliveries.MoveNextAsync().AsTask();
        await Assert.That(await Task.WhenAny(again, Task.Delay(500)) == again).IsFalse();
        await cts.CancelAsync();
        await Assert.That(async () => await again).Throws<OperationCanceledException>();
    }

    [Test]
    public async Task A_queue_subscribed_again_after_Unsubscribe_gets_what_arrived_meanwhile()
    {
        await using var relay = await TestRelay.StartAsync();
        await using var owner = await relay.ConnectAsync();
        var queue = await owner.CreateQueueAsync();
        var sender = new SenderQueue(queue.SenderId, null);
        await using var client = new RelayClient(Options);
        await client.SubscribeAsync(relay.Address, queue);
        var connection = await client.ConnectAsync(relay.Address);

        // Unsubscribed: what arrives is not handed to the app.
        client.Unsubscribe(relay.Address, queue);
        await Assert.That(connection.IsSubscribed(queue)).IsFalse();
        await owner.SendAsync(sender, "meanwhile"u8.ToArray());
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(20));
        await using var deliveries = client.DeliveriesAsync(cts.Token).GetAsyncEnumerator(cts.Token);
        var next = deliveries.MoveNextAsync().AsTask();
        await Assert.That(await Task.WhenAny(next, Task.Delay(500)) == next).IsFalse();

        // Subscribed again on the same connection: what arrived meanwhile comes first, then the
        // rest, and the ACKs are taken.
        await client.SubscribeAsync(relay.Address, queue);
        await owner.SendAsync(sender, "after"u8.ToArray());
        await Assert.That(await client.ConnectAsync(relay.Address)).IsSameReferenceAs(connection);
        await Assert.That(await next.WaitAsync(TimeSpan.FromSeconds(10))).IsTrue();
        await Assert.That(Text(deliveries.Current)).IsEqualTo("meanwhile");
        await client.RunAsync(relay.Address, c => c.AckAsync(queue, deliveries.Current.Delivery.MessageId));
        await Assert.That(await deliveries.MoveNextAsync()).IsTrue();
        await Assert.That(Text(deliveries.Current)).IsEqualTo("after");
        await client.RunAsync(relay.Address, c => c.AckAsync(queue, deliveries.Current.Delivery.MessageId));
    }

    [Test]
    public async Task An_address_whose_first_host_cannot_be_reached_is_reached_through_its_next()
    {
        await using var relay = await TestRelay.StartAsync();
        await using var owner = await relay.ConnectAsync();
        var queue = await owner.CreateQueueAsync();
        await owner.SendAsync(new SenderQueue(queue.SenderId, null), "by the second host"u8.ToArray());
        // 127.0.0.2 is this machine too, but nothing listens there: the relay listens on 127.0.0.1 only.
        var address = new RelayAddress(relay.Address.Fingerprint, ["127.0.0.2", "127.0.0.1"], relay.Address.Port);
        await using var client = new RelayClient(new RelayClientOptions
        {
            ReconnectMin = TimeSpan.FromMilliseconds(50),
            ReconnectMax = TimeSpan.FromMilliseconds(500),
            RetryFor = TimeSpan.FromSeconds(10),
        });

        await client.RunAsync(address, c => c.PingAsync());
        await client.SubscribeAsync(address, queue);
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(20));
        await foreach (var delivery in client.DeliveriesAsync(cts.Token))
        {
            await Assert.That(Text(delivery)).IsEqualTo("by the second host");
            break;
        }
    }

    /// <summary>
    /// A subscription asked for once the client is disposed (an app's last call, racing its shutdown)
    /// throws <see cref="ObjectDisposedException"/> to its caller, and nothing else: no task of the
    /// client's faults with nobody to see it.
    /// </summary>
    [Test]
    public async Task A_subscription_asked_for_after_the_client_is_disposed_throws_and_leaves_no_exception_unobserved()
    {
        await using var relay = await TestRelay.StartAsync();
        await using var owner = await relay.ConnectAsync();
        var queue = await owner.CreateQueueAsync();
        using var unobserved = new UnobservedExceptions(e => e is ObjectDisposedException && e.StackTrace?.Contains("PumpAsync") == true);
        for (int i = 0; i < 3; i++)
        {
            var client = new RelayClient(Options);
            await client.DisposeAsync();
            await Assert.ThrowsAsync<ObjectDisposedException>(() => client.SubscribeAsync(relay.Address, queue));
        }
        await Assert.That(await unobserved.CollectAsync()).IsEmpty();
    }

    /// <summary>
    /// Calls made at once to a relay that cannot be reached (a subscription, whose delivery pump tries
    /// too, and several RunAsync) all give up after about <see cref="RelayClientOptions.RetryFor"/>,
    /// with what the attempts met, rather than one after another, each trying for RetryFor in turn.
    /// </summary>
    [Test]
    public async Task Calls_to_a_relay_that_cannot_be_reached_give_up_together_after_RetryFor()
    {
        // Nothing listens there: each attempt is refused at once.
        var address = new RelayAddress(RelayAddress.Base64Url(new byte[32]), ["127.0.0.1"], TestPorts.Free());
        await using var client = new RelayClient(new RelayClientOptions
        {
            ReconnectMin = TimeSpan.FromMilliseconds(50),
            ReconnectMax = TimeSpan.FromMilliseconds(500),
            RetryFor = TimeSpan.FromSeconds(1),
        });
        var clock = System.Diagnostics.Stopwatch.StartNew();
        async Task<(double Seconds, Exception? Failure)> Timed(Func<Task> call)
        {
            try
            {
                await call();
                return (clock.Elapsed.TotalSeconds, null);
            }
            catch (Exception ex)
            {
                return (clock.Elapsed.TotalSeconds, ex);
            }
        }
        var calls = new List<Task<(double Seconds, Exception? Failure)>> { Timed(() => client.SubscribeAsync(address, ScriptedRelay.NewQueue())) };
        for (int i = 0; i < 3; i++)
        {
            calls.Add(Timed(() => client.RunAsync(address, c => c.PingAsync())));
        }
        foreach (var (seconds, failure) in await Task.WhenAll(calls).WaitAsync(TimeSpan.FromSeconds(30)))
        {
            await Assert.That(failure).IsTypeOf<RelayConnectException>();
            await Assert.That(failure!.Message).Contains("cannot connect to");
            await Assert.That(seconds).IsLessThan(3.0);
        }
    }

    /// <summary>
    /// A client disposed twice (an app's shutdown path besides its <c>await using</c>) closes once and
    /// ignores the second call, as every <see cref="IAsyncDisposable"/>.
    /// </summary>
    [Test]
    public async Task A_client_disposed_twice_ignores_the_second_call()
    {
        await using var relay = await TestRelay.StartAsync();
        await using var owner = await relay.ConnectAsync();
        var queue = await owner.CreateQueueAsync();
        var client = new RelayClient(Options);
        await client.SubscribeAsync(relay.Address, queue);
        await client.DisposeAsync();
        await client.DisposeAsync();
        await Assert.That(await OperationsMetrics.EventuallyAsync(async () =>
            OperationsMetrics.Value(await OperationsMetrics.ScrapeAsync(relay), "relay_connections_open") == 1, seconds: 10)).IsTrue();
    }

    [Test]
    public async Task A_client_disposed_while_it_connects_leaves_no_connection_open()
    {
        await using var relay = await TestRelay.StartAsync();
        await using var owner = await relay.ConnectAsync();
        var queue = await owner.CreateQueueAsync();
        for (int i = 0; i < 40; i++)
        {
            var client = new RelayClient(Options);
            // The subscription's connection is being made (TLS, HELLO, SUB) when the app disposes the client.
            var subscribing = client.SubscribeAsync(relay.Address, queue);
            await Task.Delay(i % 8 * 3);
            await client.DisposeAsync();
            try
            {
                await subscribing;
            }
            catch (Exception ex) when (ex is OperationCanceledException or ObjectDisposedException or RelayConnectException)
            {
            }
        }
        // Only the owner's connection stays.
        await Assert.That(await OperationsMetrics.EventuallyAsync(async () =>
            OperationsMetrics.Value(await OperationsMetrics.ScrapeAsync(relay), "relay_connections_open") == 1, seconds: 10)).IsTrue();
    }
}
