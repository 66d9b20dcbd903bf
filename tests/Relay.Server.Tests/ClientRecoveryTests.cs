using System.Buffers.Binary;
using System.Collections.Concurrent;
using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Text;
using Relay.Client;
using Relay.Client.Transport;
using Relay.Protocol;

namespace Relay.Server.Tests;

/// <summary>
/// How the client SDK recovers: a subscription another device took is let go, a delivery that fails
/// its integrity check closes the connection, and reconnections back off with jitter.
/// </summary>
public class ClientRecoveryTests
{
    /// <summary>A client of a relay without TLS (behind the tests' proxies) that reconnects quickly.</summary>
    private static RelayClientOptions PlainFast => new()
    {
        Tls = false,
        ReconnectMin = TimeSpan.FromMilliseconds(50),
        ReconnectMax = TimeSpan.FromMilliseconds(500),
    };

    /// <summary>A client whose next connection after a lost one waits 30 s or more: a test can act while it waits.</summary>
    private static RelayClientOptions SlowBackOff => new()
    {
        ReconnectMin = TimeSpan.FromSeconds(30),
        ReconnectMax = TimeSpan.FromSeconds(60),
    };

    private static string Text(Delivery d) => Encoding.UTF8.GetString(d.Body);

    /// <summary>An address of a port of this machine, with any pin (nothing checks it over plain TCP, or before a connection is made).</summary>
    private static RelayAddress LoopbackAddress(int port) => new(RelayAddress.Base64Url(new byte[32]), ["127.0.0.1"], port);

    [Test]
    public async Task A_subscription_taken_by_another_device_is_reported_and_not_taken_back_after_a_reconnection()
    {
        await using var relay = await TestRelay.StartAsync();
        await using var owner = await relay.ConnectAsync();
        var queue = await owner.CreateQueueAsync();
        var options = new RelayClientOptions
        {
            ReconnectMin = TimeSpan.FromMilliseconds(50),
            ReconnectMax = TimeSpan.FromMilliseconds(500),
        };
        await using var phone = new RelayClient(options);
        await using var laptop = new RelayClient(options);
        var ended = new TaskCompletionSource<RecipientQueue>(TaskCreationOptions.RunContinuationsAsynchronously);
        phone.SubscriptionEnded += (_, q) => ended.TrySetResult(q);
        int phoneEnds = 0, laptopEnds = 0;
        phone.SubscriptionEnded += (_, _) => Interlocked.Increment(ref phoneEnds);
        laptop.SubscriptionEnded += (_, _) => Interlocked.Increment(ref laptopEnds);

        await phone.SubscribeAsync(relay.Address, queue);
        await laptop.SubscribeAsync(relay.Address, queue);   // the relay ends the phone's subscription (END)
        var endedQueue = await ended.Task.WaitAsync(TimeSpan.FromSeconds(10));
        await Assert.That(endedQueue.RecipientId).IsEquivalentTo(queue.RecipientId);

        // Both lose their connection and come back; the phone does not take the queue back, so the
        // laptop keeps receiving and the phone gets nothing.
        await relay.RestartAsync();
        await phone.RunAsync(relay.Address, c => c.PingAsync());
        await laptop.RunAsync(relay.Address, c => c.PingAsync());
        await Task.Delay(300);
        await using var sender = await relay.ConnectAsync();
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(20));
        await using var laptopDeliveries = laptop.DeliveriesAsync(cts.Token).GetAsyncEnumerator(cts.Token);
        await using var phoneDeliveries = phone.DeliveriesAsync(cts.Token).GetAsyncEnumerator(cts.Token);
        var phoneNext = phoneDeliveries.MoveNextAsync().AsTask();
        for (int i = 1; i <= 3; i++)
        {
            await sender.SendAsync(new SenderQueue(queue.SenderId, null), Encoding.UTF8.GetBytes($"m{i}"));
            await Assert.That(await laptopDeliveries.MoveNextAsync()).IsTrue();
            await Assert.That(Text(laptopDeliveries.Current.Delivery)).IsEqualTo($"m{i}");
            await laptop.RunAsync(relay.Address, c => c.AckAsync(queue, laptopDeliveries.Current.Delivery.MessageId));
        }
        await Assert.That(await Task.WhenAny(phoneNext, Task.Delay(300)) == phoneNext).IsFalse();
        await Assert.That(Volatile.Read(ref laptopEnds)).IsEqualTo(0);
        // Had the phone subscribed again after the restart, one of the two would have had a second END.
        await Assert.That(Volatile.Read(ref phoneEnds)).IsEqualTo(1);

        // The phone takes it back when its app asks: then the laptop is told.
        var laptopTold = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        laptop.SubscriptionEnded += (_, _) => laptopTold.TrySetResult();
        await phone.SubscribeAsync(relay.Address, queue);
        await laptopTold.Task.WaitAsync(TimeSpan.FromSeconds(10));
        await sender.SendAsync(new SenderQueue(queue.SenderId, null), "m4"u8.ToArray());
        await Assert.That(await phoneNext.WaitAsync(TimeSpan.FromSeconds(10))).IsTrue();
        await Assert.That(Text(phoneDeliveries.Current.Delivery)).IsEqualTo("m4");
    }

    /// <summary>
    /// The relay ends the phone's subscription of a queue (the laptop took it) just before the phone's
    /// connection is dropped (as the keep-alive drops one), and the phone's delivery pump gets to that
    /// END only afterwards. The END was ignored, as if it concerned a subscription renewed since, and the
    /// phone's next connection took the queue back from the laptop. It lets the queue go: the phone is
    /// told, its next connection renews nothing, and the laptop keeps receiving.
    /// </summary>
    [Test]
    public async Task An_END_the_client_gets_to_after_its_connection_was_lost_lets_the_queue_go()
    {
        await using var scene = await StaleEndScene.StartAsync();
        scene.Phone.Drop(scene.Relay.Address, scene.Lost);
        scene.HandleEnds();
        await scene.QueueEnded.WaitAsync(TimeSpan.FromSeconds(10));

        await scene.Phone.RunAsync(scene.Relay.Address, c => c.PingAsync());
        await scene.Owner.SendAsync(new SenderQueue(scene.Queue.SenderId, null), "after"u8.ToArray());
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(10));
        await using var deliveries = scene.Laptop.DeliveriesAsync(cts.Token).GetAsyncEnumerator(cts.Token);
        await Assert.That(await deliveries.MoveNextAsync()).IsTrue();
        await Assert.That(Text(deliveries.Current.Delivery)).IsEqualTo("after");
        await Assert.That(scene.LaptopEnds).IsEqualTo(0);
        await Assert.That(scene.Phone.IsSubscribed(scene.Relay.Address, scene.Queue.RecipientId)).IsFalse();
    }

    /// <summary>
    /// As above, with the phone connecting again (an app's call) before its delivery pump gets to the
    /// END: the new connection renewed the queue, which took it back from the laptop (told by an END of
    /// its own). The old END does not let it go then: the new subscription would stay on the relay with
    /// its deliveries dropped by the phone, and nobody would receive the queue.
    /// </summary>
    [Test]
    public async Task An_END_the_client_gets_to_after_the_queue_was_renewed_on_a_new_connection_leaves_it_subscribed()
    {
        await using var scene = await StaleEndScene.StartAsync();
        scene.Phone.Drop(scene.Relay.Address, scene.Lost);
        await scene.Phone.RunAsync(scene.Relay.Address, c => c.PingAsync());
        scene.HandleEnds();

        await scene.Owner.SendAsync(new SenderQueue(scene.Queue.SenderId, null), "after"u8.ToArray());
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(10));
        await using var deliveries = scene.Phone.DeliveriesAsync(cts.Token).GetAsyncEnumerator(cts.Token);
        await Assert.That(await deliveries.MoveNextAsync()).IsTrue();
        await Assert.That(Text(deliveries.Current.Delivery)).IsEqualTo("after");
        // The pump handled the old END before it read the new connection's delivery.
        await Assert.That(scene.QueueEnded.IsCompleted).IsFalse();
    }

    /// <summary>
    /// A phone and a laptop subscribed to two queues on one relay, the phone first. The laptop takes
    /// both; the handler of the first END holds the phone's delivery pump, so the second END
    /// (<see cref="Queue"/>'s) waits, read, on the phone's connection (<see cref="Lost"/>).
    /// </summary>
    private sealed class StaleEndScene : IAsyncDisposable
    {
        private readonly ManualResetEventSlim _holding = new();
        private readonly ManualResetEventSlim _release = new();
        private readonly TaskCompletionSource _queueEnded = new(TaskCreationOptions.RunContinuationsAsynchronously);
        private int _laptopEnds;

        public required TestRelay Relay { get; init; }
        public required RelayConnection Owner { get; init; }
        public required RelayClient Phone { get; init; }
        public required RelayClient Laptop { get; init; }
        public RecipientQueue Queue { get; private set; } = null!;
        public RelayConnection Lost { get; private set; } = null!;

        /// <summary>Completes when the phone was told that the queue's subscription ended.</summary>
        public Task QueueEnded => _queueEnded.Task;

        public int LaptopEnds => Volatile.Read(ref _laptopEnds);

        public static async Task<StaleEndScene> StartAsync()
        {
            var relay = await TestRelay.StartAsync(o => o.Tls = false);
            var scene = new StaleEndScene
            {
                Relay = relay,
                Owner = await relay.ConnectAsync(),
                Phone = new RelayClient(PlainFast),
                Laptop = new RelayClient(PlainFast),
            };
            await scene.SetUpAsync();
            return scene;
        }

        private async Task SetUpAsync()
        {
            var first = await Owner.CreateQueueAsync();
            Queue = await Owner.CreateQueueAsync();
            Phone.SubscriptionEnded += (_, q) =>
            {
                if (q.RecipientId.AsSpan().SequenceEqual(first.RecipientId))
                {
                    _holding.Set();
                    _release.Wait(TimeSpan.FromSeconds(20));
                }
                else if (q.RecipientId.AsSpan().SequenceEqual(Queue.RecipientId))
                {
                    _queueEnded.TrySetResult();
                }
            };
            Laptop.SubscriptionEnded += (_, _) => Interlocked.Increment(ref _laptopEnds);
            await Phone.SubscribeAsync(Relay.Address, first);
            await Phone.SubscribeAsync(Relay.Address, Queue);
            Lost = await Phone.ConnectAsync(Relay.Address);
            await Laptop.SubscribeAsync(Relay.Address, first);
            if (!_holding.Wait(TimeSpan.FromSeconds(10))) throw new TimeoutException("the first END was not handled");
            await Laptop.SubscribeAsync(Relay.Address, Queue);
            if (!await OperationsMetrics.EventuallyAsync(() => Task.FromResult(!Lost.IsSubscribed(Queue)), seconds: 10))
            {
                throw new TimeoutException("the queue's END was not read");
            }
        }

        /// <summary>Lets the phone's delivery pump go on: it handles the queue's END, read before.</summary>
        public void HandleEnds() => _release.Set();

        public async ValueTask DisposeAsync()
        {
            _release.Set();
            await Phone.DisposeAsync();
            await Laptop.DisposeAsync();
            await Owner.DisposeAsync();
            await Relay.DisposeAsync();
            _holding.Dispose();
            _release.Dispose();
        }
    }

    /// <summary>
    /// Two devices subscribe a queue at the same moment: the relay serves the one whose SUB it read
    /// last and ends the other's subscription (END) right after answering its SUB. The device whose
    /// subscription ended is told every time, though its SubscribeAsync may not have returned yet,
    /// and it does not take the queue back after a reconnection: the other one keeps receiving.
    /// </summary>
    [Test]
    public async Task Of_two_devices_subscribing_a_queue_at_once_the_one_whose_subscription_ended_is_told()
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = false);
        await using var owner = await relay.ConnectAsync();
        await using var phone = new RelayClient(PlainFast);
        await using var laptop = new RelayClient(PlainFast);
        var ended = new ConcurrentDictionary<string, ConcurrentQueue<RelayClient>>();
        void Told(RelayClient device, RecipientQueue queue) =>
            ended.GetOrAdd(Convert.ToHexString(queue.RecipientId), _ => new()).Enqueue(device);
        phone.SubscriptionEnded += (_, q) => Told(phone, q);
        laptop.SubscriptionEnded += (_, q) => Told(laptop, q);
        await phone.RunAsync(relay.Address, c => c.PingAsync());
        await laptop.RunAsync(relay.Address, c => c.PingAsync());

        // The client reads the END just after the OK, before the SubscribeAsync has returned: with a
        // hundred queues subscribed by both at once, that happens for some of them.
        const int Rounds = 10, QueuesPerRound = 10, Queues = Rounds * QueuesPerRound;
        var queues = new List<RecipientQueue>();
        for (int round = 0; round < Rounds; round++)
        {
            var batch = new List<RecipientQueue>();
            for (int i = 0; i < QueuesPerRound; i++) batch.Add(await owner.CreateQueueAsync());
            queues.AddRange(batch);
            await Task.WhenAll(batch.SelectMany(q => new[] { phone.SubscribeAsync(relay.Address, q), laptop.SubscribeAsync(relay.Address, q) }));
        }
        await OperationsMetrics.EventuallyAsync(() => Task.FromResult(ended.Count == Queues), seconds: 10);
        await Assert.That(ended.Count).IsEqualTo(Queues);

        // Each queue's END was told once, to one device; after both reconnect, the other device gets
        // the queue's messages and the told one none.
        await relay.RestartAsync();
        await phone.RunAsync(relay.Address, c => c.PingAsync());
        await laptop.RunAsync(relay.Address, c => c.PingAsync());
        await using var sender = await relay.ConnectAsync();
        foreach (var queue in queues)
        {
            await sender.SendAsync(new SenderQueue(queue.SenderId, null), queue.RecipientId);
        }
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(20));
        var received = new ConcurrentDictionary<string, ConcurrentQueue<RelayClient>>();
        async Task ReceiveAsync(RelayClient device)
        {
            try
            {
                await foreach (var d in device.DeliveriesAsync(cts.Token))
                {
                    received.GetOrAdd(Convert.ToHexString(d.Queue.RecipientId), _ => new()).Enqueue(device);
                    await device.RunAsync(relay.Address, c => c.AckAsync(d.Queue, d.Delivery.MessageId));
                    if (received.Count == Queues) await Task.Delay(300, cts.Token);   // anything more would come meanwhile
                    if (received.Count == Queues) return;
                }
            }
            catch (OperationCanceledException)
            {
            }
        }
        await Task.WhenAll(ReceiveAsync(phone), ReceiveAsync(laptop));
        foreach (var queue in queues)
        {
            var id = Convert.ToHexString(queue.RecipientId);
            await Assert.That(ended[id].Count).IsEqualTo(1);
            await Assert.That(received.TryGetValue(id, out var by) ? by.ToArray() : []).IsEquivalentTo(new[] { ended[id].Single() == phone ? laptop : phone });
        }
    }

    [Test]
    public async Task A_delivery_that_fails_its_integrity_check_drops_that_queue_only_and_stays_stored()
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = false);
        await using var proxy = TamperingProxy.Start(relay.Server.RelayEndPoint);
        await using var owner = await relay.ConnectAsync();
        var queue = await owner.CreateQueueAsync();
        var other = await owner.CreateQueueAsync();
        await owner.SendAsync(new SenderQueue(queue.SenderId, null), "stored"u8.ToArray());

        var through = proxy.AddressOf(relay);
        await using var client = new RelayClient(PlainFast);
        var rejected = new TaskCompletionSource<(RecipientQueue Queue, string Reason)>(TaskCreationOptions.RunContinuationsAsynchronously);
        client.DeliveryRejected += (_, q, reason) => rejected.TrySetResult((q, reason));
        await client.SubscribeAsync(through, other);
        proxy.TamperWith(queue.RecipientId);
        await client.SubscribeAsync(through, queue);

        // The proxy altered the MSG of one queue: that queue is reported and dropped, nothing of it
        // is handed out, and the connection goes on for the others (no reconnection loop).
        var (droppedQueue, reason) = await rejected.Task.WaitAsync(TimeSpan.FromSeconds(10));
        await Assert.That(droppedQueue.RecipientId).IsEquivalentTo(queue.RecipientId);
        await Assert.That(reason).Contains("integrity");
        await client.RunAsync(through, c => c.PingAsync());
        await owner.SendAsync(new SenderQueue(other.SenderId, null), "unaltered"u8.ToArray());
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(10));
        await using var deliveries = client.DeliveriesAsync(cts.Token).GetAsyncEnumerator(cts.Token);
        await Assert.That(await deliveries.MoveNextAsync()).IsTrue();
        await Assert.That(Text(deliveries.Current.Delivery)).IsEqualTo("unaltered");
        await Assert.That(proxy.Accepted).IsEqualTo(1);

        // The message is still stored: a connection that is not tampered with gets it.
        await using var direct = await relay.ConnectAsync();
        await direct.SubscribeAsync(queue);
        var delivered = await direct.Events.ReadAsync().AsTask().WaitAsync(TimeSpan.FromSeconds(10));
        await Assert.That(Text(((DeliveryEvent)delivered).Delivery)).IsEqualTo("stored");
    }

    /// <summary>
    /// A queue the app subscribes again after one of its deliveries failed the integrity check, before
    /// the client got to that failure, stays subscribed: the failure concerned the subscription it
    /// replaced. Its messages come, rather than being dropped until the connection is replaced.
    /// </summary>
    [Test]
    public async Task A_queue_subscribed_again_before_its_rejected_delivery_is_handled_stays_subscribed()
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = false);
        await using var proxy = TamperingProxy.Start(relay.Server.RelayEndPoint);
        await using var owner = await relay.ConnectAsync();
        var first = await owner.CreateQueueAsync();
        var queue = await owner.CreateQueueAsync();
        await owner.SendAsync(new SenderQueue(first.SenderId, null), "first"u8.ToArray());
        await owner.SendAsync(new SenderQueue(queue.SenderId, null), "stored"u8.ToArray());
        var through = proxy.AddressOf(relay);
        await using var client = new RelayClient(PlainFast);
        // The handler of the first queue's rejection holds the client's delivery pump: what the
        // connection reads meanwhile waits for it.
        using var holding = new ManualResetEventSlim();
        using var release = new ManualResetEventSlim();
        var rejected = new ConcurrentQueue<RecipientQueue>();
        client.DeliveryRejected += (_, q, _) =>
        {
            rejected.Enqueue(q);
            if (q.RecipientId.AsSpan().SequenceEqual(first.RecipientId))
            {
                holding.Set();
                release.Wait(TimeSpan.FromSeconds(20));
            }
        };
        try
        {
            proxy.TamperWith(first.RecipientId);
            await client.SubscribeAsync(through, first);
            await Assert.That(holding.Wait(TimeSpan.FromSeconds(10))).IsTrue();

            // The queue's delivery fails its check; the app subscribes it again (the way to the relay
            // is sound again) before the client has handled that failure.
            proxy.TamperWith(queue.RecipientId);
            await client.SubscribeAsync(through, queue);
            var connection = await client.ConnectAsync(through);
            await Assert.That(await OperationsMetrics.EventuallyAsync(() => Task.FromResult(!connection.IsSubscribed(queue)), seconds: 10)).IsTrue();
            proxy.TamperWith(new byte[ProtocolConstants.IdSize]);
            await client.SubscribeAsync(through, queue);
        }
        finally
        {
            release.Set();
        }

        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(10));
        await using var deliveries = client.DeliveriesAsync(cts.Token).GetAsyncEnumerator(cts.Token);
        await Assert.That(await deliveries.MoveNextAsync()).IsTrue();
        await Assert.That(Text(deliveries.Current.Delivery)).IsEqualTo("stored");
        // Only the first queue's rejection is reported: the other's concerned a subscription replaced.
        await Assert.That(rejected.Count).IsEqualTo(1);
    }

    /// <summary>
    /// A queue whose delivery failed its integrity check on a connection that was then lost, and that
    /// the app subscribes again, stays subscribed when the client handles that failure while the
    /// SubscribeAsync waits for the next connection (its SUB not sent yet): the failure concerned the
    /// subscription replaced. Another queue rejected alike, which the app leaves, is reported and let go.
    /// </summary>
    [Test]
    public async Task A_rejected_delivery_handled_while_SubscribeAsync_waits_for_a_connection_leaves_the_queue_subscribed()
    {
        await using var scene = await StaleRejectionScene.StartAsync();
        var (proxy, client) = (scene.Proxy, scene.Client);
        proxy.HoldNewConnections();
        proxy.DropAll();
        await Assert.That(await OperationsMetrics.EventuallyAsync(() => Task.FromResult(scene.Lost.Closed.IsCancellationRequested), seconds: 10)).IsTrue();
        var subscribing = client.SubscribeAsync(scene.Through, scene.Queue);
        await Assert.That(await OperationsMetrics.EventuallyAsync(() => Task.FromResult(proxy.Accepted == 2), seconds: 10)).IsTrue();

        // The client handles the rejections read on the lost connection; the SubscribeAsync waits for
        // its connection meanwhile.
        scene.HandleRejections();
        await scene.OtherRejectionHandled.WaitAsync(TimeSpan.FromSeconds(10));
        await Assert.That(subscribing.IsCompleted).IsFalse();
        proxy.ForwardHeld();
        await subscribing.WaitAsync(TimeSpan.FromSeconds(10));

        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(10));
        await using var deliveries = client.DeliveriesAsync(cts.Token).GetAsyncEnumerator(cts.Token);
        await Assert.That(await deliveries.MoveNextAsync()).IsTrue();
        await Assert.That(Text(deliveries.Current.Delivery)).IsEqualTo("stored");
        await Assert.That(scene.Rejected()).IsEquivalentTo(["first", "other"]);
    }

    /// <summary>
    /// As above, with the client handling the failure only after the SubscribeAsync was done on the
    /// connection that replaced the lost one: the queue stays subscribed, and so does the other queue,
    /// renewed there too. Neither failure is reported: both concerned subscriptions replaced.
    /// </summary>
    [Test]
    public async Task A_rejected_delivery_handled_after_the_queue_was_subscribed_again_on_a_new_connection_leaves_it_subscribed()
    {
        await using var scene = await StaleRejectionScene.StartAsync();
        var client = scene.Client;
        scene.Proxy.DropAll();
        await Assert.That(await OperationsMetrics.EventuallyAsync(() => Task.FromResult(scene.Lost.Closed.IsCancellationRequested), seconds: 10)).IsTrue();
        await client.SubscribeAsync(scene.Through, scene.Queue).WaitAsync(TimeSpan.FromSeconds(10));
        scene.HandleRejections();

        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(10));
        await using var deliveries = client.DeliveriesAsync(cts.Token).GetAsyncEnumerator(cts.Token);
        var texts = new List<string>();
        for (int i = 0; i < 2; i++)
        {
            await Assert.That(await deliveries.MoveNextAsync()).IsTrue();
            texts.Add(Text(deliveries.Current.Delivery));
        }
        await Assert.That(texts).IsEquivalentTo(["stored", "other"]);
        await Assert.That(scene.Rejected()).IsEquivalentTo(["first"]);
    }

    /// <summary>
    /// A client whose handling of rejected deliveries is held back (the handler of the first queue's
    /// rejection holds its delivery pump) while the deliveries of two more queues, each with a message
    /// stored, fail their integrity check on its connection (<see cref="Lost"/>); the way to the relay is
    /// sound again afterwards.
    /// </summary>
    private sealed class StaleRejectionScene : IAsyncDisposable
    {
        private readonly ManualResetEventSlim _holding = new();
        private readonly ManualResetEventSlim _release = new();
        private readonly ConcurrentQueue<string> _rejected = new();
        private readonly TaskCompletionSource _otherHandled = new(TaskCreationOptions.RunContinuationsAsynchronously);
        private readonly Dictionary<string, string> _names = [];

        public required TestRelay Relay { get; init; }
        public required TamperingProxy Proxy { get; init; }
        public required RelayClient Client { get; init; }
        public RelayAddress Through => Proxy.AddressOf(Relay);
        public RecipientQueue Queue { get; private set; } = null!;
        public RelayConnection Lost { get; private set; } = null!;

        /// <summary>Completes when the client handled the other queue's rejection (after the queue's).</summary>
        public Task OtherRejectionHandled => _otherHandled.Task;

        /// <summary>The queues reported through DeliveryRejected, by name.</summary>
        public string[] Rejected() => [.. _rejected];

        public static async Task<StaleRejectionScene> StartAsync()
        {
            var relay = await TestRelay.StartAsync(o => o.Tls = false);
            var scene = new StaleRejectionScene
            {
                Relay = relay,
                Proxy = TamperingProxy.Start(relay.Server.RelayEndPoint),
                Client = new RelayClient(PlainFast),
            };
            await scene.SetUpAsync();
            return scene;
        }

        private async Task SetUpAsync()
        {
            await using var owner = await Relay.ConnectAsync();
            var first = await owner.CreateQueueAsync();
            Queue = await owner.CreateQueueAsync();
            var other = await owner.CreateQueueAsync();
            foreach (var (queue, name) in new[] { (first, "first"), (Queue, "stored"), (other, "other") })
            {
                _names[Convert.ToHexString(queue.RecipientId)] = name == "stored" ? "queue" : name;
                await owner.SendAsync(new SenderQueue(queue.SenderId, null), Encoding.UTF8.GetBytes(name));
            }
            Client.DeliveryRejected += (_, q, _) =>
            {
                var name = _names[Convert.ToHexString(q.RecipientId)];
                _rejected.Enqueue(name);
                if (name == "first")
                {
                    _holding.Set();
                    _release.Wait(TimeSpan.FromSeconds(20));
                }
                else if (name == "other")
                {
                    _otherHandled.TrySetResult();
                }
            };
            Proxy.TamperWith(first.RecipientId);
            await Client.SubscribeAsync(Through, first);
            if (!_holding.Wait(TimeSpan.FromSeconds(10))) throw new TimeoutException("the first queue's rejection was not handled");
            Lost = await Client.ConnectAsync(Through);
            foreach (var queue in new[] { Queue, other })
            {
                Proxy.TamperWith(queue.RecipientId);
                await Client.SubscribeAsync(Through, queue);
                if (!await OperationsMetrics.EventuallyAsync(() => Task.FromResult(!Lost.IsSubscribed(queue)), seconds: 10))
                {
                    throw new TimeoutException("a tampered delivery was not rejected");
                }
            }
            Proxy.TamperWith(new byte[ProtocolConstants.IdSize]);
        }

        /// <summary>Lets the client handle the rejections it read (the queue's, then the other's).</summary>
        public void HandleRejections() => _release.Set();

        public async ValueTask DisposeAsync()
        {
            _release.Set();
            Proxy.ForwardHeld();
            await Client.DisposeAsync();
            await Proxy.DisposeAsync();
            await Relay.DisposeAsync();
            _holding.Dispose();
            _release.Dispose();
        }
    }

    [Test]
    public async Task A_relay_that_never_answers_the_renewed_subscriptions_does_not_hold_the_client_for_ever()
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = false);
        await using var proxy = TamperingProxy.Start(relay.Server.RelayEndPoint);
        await using var owner = await relay.ConnectAsync();
        var queue = await owner.CreateQueueAsync();
        var through = proxy.AddressOf(relay);
        await using var client = new RelayClient(new RelayClientOptions
        {
            Tls = false,
            ConnectTimeout = TimeSpan.FromSeconds(2),
            ReconnectMin = TimeSpan.FromMilliseconds(50),
            ReconnectMax = TimeSpan.FromMilliseconds(500),
        });
        await client.SubscribeAsync(through, queue);

        // The connection is lost, and for a while the relay (here: the path to it) answers the
        // handshake but never the renewed SUB. Once it answers again the client is back.
        proxy.DropSubs = true;
        await relay.RestartAsync();
        await Task.Delay(TimeSpan.FromSeconds(3));
        proxy.DropSubs = false;
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(20));
        await client.RunAsync(through, c => c.PingAsync(), cts.Token);
        await using var sender = await relay.ConnectAsync();
        await sender.SendAsync(new SenderQueue(queue.SenderId, null), "back"u8.ToArray());
        await using var deliveries = client.DeliveriesAsync(cts.Token).GetAsyncEnumerator(cts.Token);
        await Assert.That(await deliveries.MoveNextAsync()).IsTrue();
        await Assert.That(Text(deliveries.Current.Delivery)).IsEqualTo("back");
    }

    [Test]
    public async Task Deliveries_come_back_by_themselves_after_another_relay_answered_for_the_relay_a_while()
    {
        await using var relay = await TestRelay.StartAsync();
        await using var impostor = await TestRelay.StartAsync();
        await using var path = SwitchingProxy.Start(relay.Server.RelayEndPoint);
        var address = relay.Address with { Hosts = ["127.0.0.1"], Port = path.Port };
        await using var owner = await relay.ConnectAsync();
        var queue = await owner.CreateQueueAsync();
        await using var client = new RelayClient(new RelayClientOptions
        {
            ReconnectMin = TimeSpan.FromMilliseconds(50),
            ReconnectMax = TimeSpan.FromMilliseconds(500),
        });
        await client.SubscribeAsync(address, queue);

        // For a while the way to the relay leads to another one (a hostile network on the way): the
        // app is told at once, and the client's own reconnections meet it too.
        path.Target = impostor.Server.RelayEndPoint;
        path.DropAll();
        await Assert.ThrowsAsync<FingerprintMismatchException>(() => client.RunAsync(address, c => c.PingAsync()));
        await Assert.That(await OperationsMetrics.EventuallyAsync(() => Task.FromResult(path.ConnectionsTo(impostor.Server.RelayEndPoint) >= 2), seconds: 10)).IsTrue();

        // The way leads to the relay again: the subscription is renewed and its deliveries arrive
        // without the app doing anything.
        path.Target = relay.Server.RelayEndPoint;
        await owner.SendAsync(new SenderQueue(queue.SenderId, null), "after"u8.ToArray());
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(20));
        await using var deliveries = client.DeliveriesAsync(cts.Token).GetAsyncEnumerator(cts.Token);
        await Assert.That(await deliveries.MoveNextAsync()).IsTrue();
        await Assert.That(Text(deliveries.Current.Delivery)).IsEqualTo("after");
    }

    /// <summary>
    /// An app that makes no call of its own (it only reads the deliveries of its subscriptions) is told
    /// of each failed attempt of the client's reconnections: here the server at the relay's address is
    /// another relay, whose identity is not the address's.
    /// </summary>
    [Test]
    public async Task A_subscriber_that_makes_no_call_is_told_of_each_failed_connection_to_a_relay_that_is_not_the_one_its_address_names()
    {
        await using var relay = await TestRelay.StartAsync();
        await using var impostor = await TestRelay.StartAsync();
        await using var path = SwitchingProxy.Start(relay.Server.RelayEndPoint);
        var address = relay.Address with { Hosts = ["127.0.0.1"], Port = path.Port };
        await using var owner = await relay.ConnectAsync();
        var queue = await owner.CreateQueueAsync();
        await using var client = new RelayClient(new RelayClientOptions
        {
            ReconnectMin = TimeSpan.FromMilliseconds(50),
            ReconnectMax = TimeSpan.FromMilliseconds(500),
        });
        var failures = System.Threading.Channels.Channel.CreateUnbounded<(RelayAddress Relay, Exception Failure)>();
        int made = 0;
        client.ConnectionFailed += (r, ex) => failures.Writer.TryWrite((r, ex));
        client.ConnectionMade += _ => Interlocked.Increment(ref made);
        await client.SubscribeAsync(address, queue);
        await Assert.That(Volatile.Read(ref made)).IsEqualTo(1);

        // The relay is replaced at its address (or a network on the way answers for it).
        path.Target = impostor.Server.RelayEndPoint;
        path.DropAll();
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(20));
        for (int i = 0; i < 3; i++)
        {
            var (failedRelay, failure) = await failures.Reader.ReadAsync(cts.Token);
            await Assert.That(failedRelay.ToString()).IsEqualTo(address.ToString());
            await Assert.That(failure).IsTypeOf<FingerprintMismatchException>();
        }
        await Assert.That(Volatile.Read(ref made)).IsEqualTo(1);

        // The real relay answers again: the connection is made and the deliveries come.
        path.Target = relay.Server.RelayEndPoint;
        await owner.SendAsync(new SenderQueue(queue.SenderId, null), "after"u8.ToArray());
        await using var deliveries = client.DeliveriesAsync(cts.Token).GetAsyncEnumerator(cts.Token);
        await Assert.That(await deliveries.MoveNextAsync()).IsTrue();
        await Assert.That(Text(deliveries.Current.Delivery)).IsEqualTo("after");
        await Assert.That(Volatile.Read(ref made)).IsEqualTo(2);
    }

    /// <summary>
    /// While a subscriber's relay is down, each reconnection attempt that fails is reported with its
    /// cause; when the relay is back, the connection is reported made and the deliveries resume.
    /// </summary>
    [Test]
    public async Task A_subscriber_is_told_of_each_failed_connection_while_its_relay_is_down_and_its_deliveries_resume_when_it_is_back()
    {
        await using var relay = await TestRelay.StartAsync();
        var queue = await CreateQueueAsync(relay);
        await using var client = new RelayClient(new RelayClientOptions
        {
            ReconnectMin = TimeSpan.FromMilliseconds(50),
            ReconnectMax = TimeSpan.FromMilliseconds(500),
        });
        var failures = new ConcurrentQueue<(RelayAddress Relay, Exception Failure)>();
        int made = 0;
        client.ConnectionFailed += (r, ex) => failures.Enqueue((r, ex));
        client.ConnectionMade += _ => Interlocked.Increment(ref made);
        await client.SubscribeAsync(relay.Address, queue);

        await relay.RestartAsync(async () =>
        {
            await Assert.That(await OperationsMetrics.EventuallyAsync(() => Task.FromResult(failures.Count >= 3), seconds: 10)).IsTrue();
        });
        foreach (var (failedRelay, failure) in failures)
        {
            await Assert.That(failedRelay.ToString()).IsEqualTo(relay.Address.ToString());
            await Assert.That(failure is RelayConnectException and not FingerprintMismatchException).IsTrue();
            await Assert.That(failure.Message).Contains("cannot connect to");
        }

        await using var sender = await relay.ConnectAsync();
        await sender.SendAsync(new SenderQueue(queue.SenderId, null), "back"u8.ToArray());
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(20));
        await using var deliveries = client.DeliveriesAsync(cts.Token).GetAsyncEnumerator(cts.Token);
        await Assert.That(await deliveries.MoveNextAsync()).IsTrue();
        await Assert.That(Text(deliveries.Current.Delivery)).IsEqualTo("back");
        await Assert.That(Volatile.Read(ref made)).IsEqualTo(2);
    }

    private static async Task<RecipientQueue> CreateQueueAsync(TestRelay relay)
    {
        await using var owner = await relay.ConnectAsync();
        return await owner.CreateQueueAsync();
    }

    [Test]
    public async Task RunAsync_retries_a_request_made_while_its_connection_is_closing()
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = false);
        await using var client = new RelayClient(PlainFast);
        var connection = await client.ConnectAsync(relay.Address);

        // A request still being written holds the connection's close halfway: it refuses new
        // requests already, and is not marked closed yet.
        using var writing = new ManualResetEventSlim();
        using var written = new ManualResetEventSlim();
        var slow = Task.Run(async () =>
        {
            try
            {
                await connection.RequestAsync(0, (w, corr, _) =>
                {
                    writing.Set();
                    written.Wait(TimeSpan.FromSeconds(30));
                    FrameWriter.WriteEmpty(w, FrameType.Ping, corr);
                });
            }
            catch (RelayConnectException)
            {
                // Closed under it.
            }
        });
        await Assert.That(writing.Wait(TimeSpan.FromSeconds(10))).IsTrue();
        var closing = Task.Run(async () => await connection.DisposeAsync());
        await Assert.That(await OperationsMetrics.EventuallyAsync(() => Task.FromResult(connection.Failure != null), seconds: 10)).IsTrue();
        await Assert.That(connection.Closed.IsCancellationRequested).IsFalse();

        // A PING run now meets the closing connection: it runs again on a new one.
        var ping = client.RunAsync(relay.Address, c => c.PingAsync());
        await Task.WhenAny(ping, Task.Delay(200));
        written.Set();
        await ping.WaitAsync(TimeSpan.FromSeconds(10));
        await closing.WaitAsync(TimeSpan.FromSeconds(10));
        await slow.WaitAsync(TimeSpan.FromSeconds(10));
        await Assert.That(await client.ConnectAsync(relay.Address)).IsNotSameReferenceAs(connection);
    }

    [Test]
    public async Task A_welcome_announcing_an_oversized_frame_is_refused()
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = false);
        await using var proxy = TamperingProxy.Start(relay.Server.RelayEndPoint);
        proxy.AnnounceMaxFrame = int.MaxValue;
        var through = proxy.AddressOf(relay);
        var refused = await Assert.ThrowsAsync<RelayConnectException>(() => RelayConnection.ConnectAsync(through, new RelayConnectionOptions { Tls = false }));
        await Assert.That(refused!.Message).Contains("maxFrame 2147483647");
    }

    [Test]
    public async Task An_error_without_a_correlation_id_ends_the_connection_at_once()
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = false);
        await using var proxy = TamperingProxy.Start(relay.Server.RelayEndPoint);
        var through = proxy.AddressOf(relay);
        await using var connection = await RelayConnection.ConnectAsync(through, new RelayConnectionOptions { Tls = false });
        proxy.PongAsConnectionError = true;
        var failed = await Assert.ThrowsAsync<RelayConnectException>(() => connection.PingAsync().WaitAsync(TimeSpan.FromSeconds(10)));
        await Assert.That(failed!.Message).Contains("closed the connection");
        await Assert.That(connection.Closed.IsCancellationRequested).IsTrue();
    }

    [Test]
    public async Task A_keep_alive_ping_answered_with_an_error_replaces_the_connection_and_keeps_alive()
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = false);
        await using var proxy = TamperingProxy.Start(relay.Server.RelayEndPoint);
        var through = proxy.AddressOf(relay);
        await using var client = new RelayClient(new RelayClientOptions
        {
            Tls = false,
            KeepAlive = TimeSpan.FromMilliseconds(200),
            ReconnectMin = TimeSpan.FromMilliseconds(50),
            ReconnectMax = TimeSpan.FromMilliseconds(500),
        });
        await using var owner = await relay.ConnectAsync();
        var queue = await owner.CreateQueueAsync();
        await client.SubscribeAsync(through, queue);
        double Accepted(string metrics) => OperationsMetrics.Value(metrics, "relay_connections_accepted_total");
        double before = Accepted(await OperationsMetrics.ScrapeAsync(relay));

        // Every PONG becomes an ERR for a while: the keep-alive replaces the subscriber's connection
        // each time instead of ending for good.
        proxy.PongAsError = true;
        await Assert.That(await OperationsMetrics.EventuallyAsync(async () => Accepted(await OperationsMetrics.ScrapeAsync(relay)) >= before + 2, seconds: 10)).IsTrue();
        proxy.PongAsError = false;
        await Assert.That(await OperationsMetrics.EventuallyAsync(async () =>
        {
            try
            {
                await client.RunAsync(through, c => c.PingAsync()).WaitAsync(TimeSpan.FromSeconds(2));
                return true;
            }
            catch (Exception)
            {
                return false;
            }
        }, seconds: 10)).IsTrue();
    }

    [Test]
    public async Task Reconnection_waits_grow_with_failures_and_with_connections_that_do_not_last_and_are_spread()
    {
        var min = TimeSpan.FromSeconds(1);
        var max = TimeSpan.FromSeconds(8);
        double draw = 1.0;
        var clock = new OperationsClock();
        var backoff = new ReconnectBackoff(min, max, () => draw, clock);

        // The first connection goes at once; failed attempts double the step up to max.
        await Assert.That(backoff.BeforeConnect()).IsEqualTo(TimeSpan.Zero);
        var steps = Enumerable.Range(0, 6).Select(_ => backoff.Failed().TotalSeconds).ToList();
        await Assert.That(steps).IsEquivalentTo(new List<double> { 1, 2, 4, 8, 8, 8 }, TUnit.Assertions.Enums.CollectionOrdering.Matching);

        // A connection lost soon after it was made counts as a failure: the step does not start again.
        backoff.Connected();
        clock.Advance(max / 2);
        await Assert.That(backoff.BeforeConnect()).IsEqualTo(max);

        // One that lasted max: the next connection comes after about min, and failures start from min.
        backoff.Connected();
        clock.Advance(max);
        await Assert.That(backoff.BeforeConnect()).IsEqualTo(min);
        await Assert.That(backoff.Failed()).IsEqualTo(min);
        await Assert.That(backoff.Failed()).IsEqualTo(2 * min);

        // Attempts given up (RetryFor, the caller's cancellation) are not forgotten: the next call
        // waits for the step they reached instead of connecting at once.
        var givenUp = new ReconnectBackoff(min, max, () => 1.0);
        givenUp.Failed(); givenUp.Failed(); givenUp.Failed();
        await Assert.That(givenUp.BeforeConnect()).IsEqualTo(4 * min);

        // Each wait is drawn from the upper half of its step.
        draw = 0.0;
        await Assert.That(backoff.Failed()).IsEqualTo(2 * min);       // step 4 s, drawn at its half
        draw = 0.5;
        await Assert.That(backoff.Failed()).IsEqualTo(TimeSpan.FromSeconds(6));   // step 8 s
        var spread = new ReconnectBackoff(min, max);
        var waits = new List<TimeSpan>();
        for (int i = 0; i < 200; i++)
        {
            var wait = spread.Failed();
            if (i >= 3) waits.Add(wait);   // steps 1, 2, 4 s, then 8 s from the fourth on
        }
        await Assert.That(waits.Min()).IsGreaterThanOrEqualTo(max / 2);
        await Assert.That(waits.Max()).IsLessThanOrEqualTo(max);
        await Assert.That(waits.Distinct().Count()).IsGreaterThan(100);
    }

    /// <summary>
    /// A RunAsync whose operation met a lost connection after the app cancelled its token threw the
    /// lost connection's RelayConnectException: the app, which cancelled, was told the relay could not
    /// be reached. It is told OperationCanceledException, as it would be a moment later.
    /// </summary>
    [Test]
    public async Task RunAsync_cancelled_while_its_connection_is_lost_throws_OperationCanceledException()
    {
        await using var relay = await TestRelay.StartAsync();
        await using var path = SwitchingProxy.Start(relay.Server.RelayEndPoint);
        var address = relay.Address with { Hosts = ["127.0.0.1"], Port = path.Port };
        await using var client = new RelayClient(SlowBackOff);
        var entered = new TaskCompletionSource<RelayConnection>(TaskCreationOptions.RunContinuationsAsynchronously);
        var carryOn = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        int runs = 0;
        using var cts = new CancellationTokenSource();
        var run = client.RunAsync(address, async c =>
        {
            Interlocked.Increment(ref runs);
            entered.TrySetResult(c);
            await carryOn.Task;
            await c.PingAsync();
            return true;
        }, cts.Token);

        // The connection is lost while the operation runs; the app cancels before the operation
        // meets the loss (its PING then fails at once).
        var connection = await entered.Task.WaitAsync(TimeSpan.FromSeconds(10));
        path.DropAll();
        await Assert.That(await OperationsMetrics.EventuallyAsync(() => Task.FromResult(connection.Closed.IsCancellationRequested), seconds: 10)).IsTrue();
        await cts.CancelAsync();
        carryOn.SetResult();

        var thrown = await Assert.ThrowsAsync<OperationCanceledException>(() => run.WaitAsync(TimeSpan.FromSeconds(5)));
        await Assert.That(thrown!.CancellationToken).IsEqualTo(cts.Token);
        await Assert.That(runs).IsEqualTo(1);
    }

    /// <summary>A RunAsync cancelled while the client waits its back-off before connecting again (30 s and more here) stops at once with OperationCanceledException.</summary>
    [Test]
    public async Task RunAsync_cancelled_during_the_back_off_after_a_lost_connection_throws_OperationCanceledException()
    {
        await using var relay = await TestRelay.StartAsync();
        await using var path = SwitchingProxy.Start(relay.Server.RelayEndPoint);
        var address = relay.Address with { Hosts = ["127.0.0.1"], Port = path.Port };
        await using var client = new RelayClient(SlowBackOff);
        var first = await client.ConnectAsync(address).WaitAsync(TimeSpan.FromSeconds(10));
        path.DropAll();
        await Assert.That(await OperationsMetrics.EventuallyAsync(() => Task.FromResult(first.Closed.IsCancellationRequested), seconds: 10)).IsTrue();

        using var cts = new CancellationTokenSource();
        var run = client.RunAsync(address, c => c.PingAsync(), cts.Token);
        await Task.Delay(TimeSpan.FromMilliseconds(300));
        await Assert.That(run.IsCompleted).IsFalse();
        await cts.CancelAsync();
        await Assert.ThrowsAsync<OperationCanceledException>(() => run.WaitAsync(TimeSpan.FromSeconds(5)));
        await Assert.That(path.ConnectionsTo(relay.Server.RelayEndPoint)).IsEqualTo(1);
    }

    /// <summary>
    /// A ConnectAsync or RunAsync whose attempt to connect failed as the app cancelled its token (here
    /// the app cancels on hearing of the failure through ConnectionFailed, which runs before the call
    /// hears of it) threw the attempt's RelayConnectException: the app, which cancelled, was told the
    /// relay could not be reached. It is told OperationCanceledException for its token, the failure as
    /// its inner exception, as RunAsync tells it when its operation meets a lost connection.
    /// </summary>
    [Test]
    [Arguments(false)]
    [Arguments(true)]
    public async Task A_call_cancelled_as_its_attempt_to_connect_fails_throws_OperationCanceledException(bool run)
    {
        // Nothing listens there: the attempt is refused at once.
        var address = LoopbackAddress(TestPorts.Free());
        await using var client = new RelayClient(PlainFast);
        using var cts = new CancellationTokenSource();
        int failures = 0;
        client.ConnectionFailed += (_, _) =>
        {
            Interlocked.Increment(ref failures);
            cts.Cancel();
        };
        Task call = run ? client.RunAsync(address, c => c.PingAsync(), cts.Token) : client.ConnectAsync(address, cts.Token);

        var thrown = await Assert.ThrowsAsync<OperationCanceledException>(() => call.WaitAsync(TimeSpan.FromSeconds(10)));
        await Assert.That(thrown!.CancellationToken).IsEqualTo(cts.Token);
        await Assert.That(thrown.InnerException).IsTypeOf<RelayConnectException>();
        await Assert.That(Volatile.Read(ref failures)).IsEqualTo(1);
    }

    /// <summary>
    /// A ConnectAsync or RunAsync whose attempt to connect failed as the app disposed the client (here
    /// on hearing of the failure through ConnectionFailed, which runs before the call hears of it)
    /// threw the attempt's RelayConnectException, as if the relay could not be reached; a call made
    /// after DisposeAsync throws ObjectDisposedException, and so does this one now.
    /// </summary>
    [Test]
    [Arguments(false)]
    [Arguments(true)]
    public async Task A_call_whose_attempt_to_connect_fails_as_the_client_is_disposed_throws_ObjectDisposedException(bool run)
    {
        // Nothing listens there: the attempt is refused at once.
        var address = LoopbackAddress(TestPorts.Free());
        var client = new RelayClient(PlainFast);
        Task? disposing = null;
        client.ConnectionFailed += (_, _) => disposing ??= client.DisposeAsync().AsTask();
        Task call = run ? client.RunAsync(address, c => c.PingAsync()) : client.ConnectAsync(address);

        await Assert.ThrowsAsync<ObjectDisposedException>(() => call.WaitAsync(TimeSpan.FromSeconds(10)));
        await disposing!.WaitAsync(TimeSpan.FromSeconds(10));
    }

    /// <summary>
    /// A ConnectAsync or RunAsync whose attempt the relay refused (ERR VERSION to its HELLO) as the app
    /// cancelled its token or disposed the client (on hearing of it through ConnectionFailed) threw
    /// the relay's RelayErrorException, where a refused TCP connection at that moment throws
    /// OperationCanceledException or ObjectDisposedException: now it throws those too.
    /// </summary>
    [Test]
    [Arguments(false, false)]
    [Arguments(true, false)]
    [Arguments(false, true)]
    [Arguments(true, true)]
    public async Task A_call_whose_handshake_is_refused_as_it_is_cancelled_or_the_client_disposed_is_told_so(bool run, bool dispose)
    {
        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        using var stop = new CancellationTokenSource(TimeSpan.FromSeconds(20));
        var refusing = Task.Run(async () =>
        {
            while (!stop.IsCancellationRequested)
            {
                using var session = new ScriptedRelay.Session(await listener.AcceptTcpClientAsync(stop.Token));
                await session.ExpectAsync(FrameType.Hello);
                await session.SendAsync(w => FrameWriter.WriteVersionError(w, 2, 3));
            }
        });
        var address = LoopbackAddress(((IPEndPoint)listener.LocalEndpoint).Port);
        var client = new RelayClient(PlainFast);
        using var cts = new CancellationTokenSource();
        Task? disposing = null;
        client.ConnectionFailed += (_, failure) =>
        {
            if (failure is not RelayErrorException) return;
            if (dispose) disposing ??= client.DisposeAsync().AsTask();
            else cts.Cancel();
        };
        try
        {
            Task call = run ? client.RunAsync(address, c => c.PingAsync(), cts.Token) : client.ConnectAsync(address, cts.Token);
            if (dispose)
            {
                await Assert.ThrowsAsync<ObjectDisposedException>(() => call.WaitAsync(TimeSpan.FromSeconds(10)));
                await disposing!.WaitAsync(TimeSpan.FromSeconds(10));
            }
            else
            {
                var thrown = await Assert.ThrowsAsync<OperationCanceledException>(() => call.WaitAsync(TimeSpan.FromSeconds(10)));
                await Assert.That(thrown!.CancellationToken).IsEqualTo(cts.Token);
                await Assert.That(thrown.InnerException).IsTypeOf<RelayErrorException>();
            }
        }
        finally
        {
            await client.DisposeAsync();
            await stop.CancelAsync();
            listener.Stop();
            try { await refusing; } catch (Exception) { }
        }
    }

    /// <summary>
    /// Calls waiting on an attempt to connect that the relay does not answer (it accepts the TCP
    /// connection and never answers HELLO): one cancelled by the app threw OperationCanceledException
    /// for a token of the client's own, not the app's; the one whose attempt it was, when the client is
    /// disposed, threw OperationCanceledException for no token the app gave it. Now the first is told
    /// of its own token, and the second ObjectDisposedException, both promptly.
    /// </summary>
    [Test]
    [Arguments(false)]
    [Arguments(true)]
    public async Task Calls_waiting_on_an_attempt_to_connect_end_as_their_token_is_cancelled_or_the_client_disposed(bool run)
    {
        using var silent = new TcpListener(IPAddress.Loopback, 0);
        silent.Start();
        var address = LoopbackAddress(((IPEndPoint)silent.LocalEndpoint).Port);
        var client = new RelayClient(PlainFast);   // ConnectTimeout 30 s: longer than the test waits
        // Takes the connect lock at once, its attempt waiting for the relay's WELCOME.
        Task attempting = run ? client.RunAsync(address, c => c.PingAsync()) : client.ConnectAsync(address);
        using var cts = new CancellationTokenSource();
        var waiting = client.RunAsync(address, c => c.PingAsync(), cts.Token);
        await Assert.That(waiting.IsCompleted).IsFalse();

        await cts.CancelAsync();
        var cancelled = await Assert.ThrowsAsync<OperationCanceledException>(() => waiting.WaitAsync(TimeSpan.FromSeconds(10)));
        await Assert.That(cancelled!.CancellationToken).IsEqualTo(cts.Token);
        await Assert.That(attempting.IsCompleted).IsFalse();

        var disposing = client.DisposeAsync().AsTask();
        await Assert.ThrowsAsync<ObjectDisposedException>(() => attempting.WaitAsync(TimeSpan.FromSeconds(10)));
        await disposing.WaitAsync(TimeSpan.FromSeconds(10));
    }

    /// <summary>
    /// DisposeAsync while a RunAsync or SubscribeAsync waits out the back-off between attempts to reach
    /// a relay that cannot be reached ends it at once with ObjectDisposedException; the wait threw
    /// OperationCanceledException for a token of the client's own, not one the app gave it.
    /// </summary>
    [Test]
    [Arguments(false)]
    [Arguments(true)]
    public async Task Disposing_the_client_ends_a_call_waiting_out_the_back_off(bool subscribe)
    {
        // Nothing listens there: the attempt is refused at once, and the next waits 15 s or more.
        var address = LoopbackAddress(TestPorts.Free());
        var client = new RelayClient(SlowBackOff);
        var failed = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        client.ConnectionFailed += (_, _) => failed.TrySetResult();
        var call = subscribe ? client.SubscribeAsync(address, ScriptedRelay.NewQueue()) : client.RunAsync(address, c => c.PingAsync());
        await failed.Task.WaitAsync(TimeSpan.FromSeconds(10));
        await Assert.That(call.IsCompleted).IsFalse();

        var disposing = client.DisposeAsync().AsTask();
        await Assert.ThrowsAsync<ObjectDisposedException>(() => call.WaitAsync(TimeSpan.FromSeconds(5)));
        await disposing.WaitAsync(TimeSpan.FromSeconds(10));
    }

    /// <summary>
    /// DisposeAsync while the app's calls wait on the relay (a SubscribeAsync and a RunAsync whose SUBs
    /// the relay never answers, a DeliveriesAsync waiting for a message) ends each promptly: the calls
    /// with ObjectDisposedException, as a call made after DisposeAsync, and the deliveries at their end.
    /// The calls go back for a new connection after the one disposed; one that got there while the
    /// client was still disposing met a cancelled token of the client's own, and threw
    /// OperationCanceledException for no token the app gave it.
    /// </summary>
    [Test]
    public async Task Disposing_the_client_ends_the_calls_waiting_on_the_relay_promptly()
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = false);
        await using var proxy = TamperingProxy.Start(relay.Server.RelayEndPoint);
        await using var owner = await relay.ConnectAsync();
        var queue = await owner.CreateQueueAsync();
        var other = await owner.CreateQueueAsync();
        var through = proxy.AddressOf(relay);
        var client = new RelayClient(PlainFast);
        var connection = await client.ConnectAsync(through);
        proxy.DropSubs = true;
        await using var deliveries = client.DeliveriesAsync().GetAsyncEnumerator();
        var reading = deliveries.MoveNextAsync().AsTask();
        var subscribing = client.SubscribeAsync(through, queue);
        var running = client.RunAsync(through, c => c.SubscribeAsync(other, 1));
        // Both SUBs are sent (registered on the connection before they are written), and unanswered.
        var sent = Stopwatch.StartNew();
        while (!(connection.IsSubscribed(queue) && connection.IsSubscribed(other)) && sent.Elapsed < TimeSpan.FromSeconds(10))
        {
            await Task.Delay(10);
        }
        await Assert.That(connection.IsSubscribed(queue) && connection.IsSubscribed(other)).IsTrue();
        await Assert.That(subscribing.IsCompleted || running.IsCompleted || reading.IsCompleted).IsFalse();

        var disposing = client.DisposeAsync().AsTask();
        await Assert.ThrowsAsync<ObjectDisposedException>(() => subscribing.WaitAsync(TimeSpan.FromSeconds(10)));
        await Assert.ThrowsAsync<ObjectDisposedException>(() => running.WaitAsync(TimeSpan.FromSeconds(10)));
        await Assert.That(await reading.WaitAsync(TimeSpan.FromSeconds(10))).IsFalse();
        await disposing.WaitAsync(TimeSpan.FromSeconds(10));
        // Named for the client (they named the client's own CancellationTokenSource, which the app never saw).
        var after = new[]
        {
            await Assert.ThrowsAsync<ObjectDisposedException>(() => client.ConnectAsync(through)),
            await Assert.ThrowsAsync<ObjectDisposedException>(() => client.RunAsync(through, c => c.PingAsync())),
            await Assert.ThrowsAsync<ObjectDisposedException>(() => client.SubscribeAsync(through, queue)),
        };
        foreach (var disposed in after)
        {
            await Assert.That(disposed!.ObjectName).IsEqualTo(nameof(RelayClient));
        }
    }

    /// <summary>Forwards TCP both ways to a target that can change; a connection goes to the target of when it was accepted.</summary>
    internal sealed class SwitchingProxy : IAsyncDisposable
    {
        private readonly TcpListener _listener = new(IPAddress.Loopback, 0);
        private readonly CancellationTokenSource _stop = new();
        private readonly List<TcpClient> _open = [];
        private readonly ConcurrentDictionary<IPEndPoint, int> _connections = new();
        private volatile IPEndPoint _target;

        private SwitchingProxy(IPEndPoint target)
        {
            _target = target;
            _listener.Start();
            _ = AcceptAsync();
        }

        public static SwitchingProxy Start(IPEndPoint target) => new(target);

        public int Port => ((IPEndPoint)_listener.LocalEndpoint).Port;

        public IPEndPoint Target
        {
            get => _target;
            set => _target = value;
        }

        /// <summary>How many connections went to <paramref name="target"/>.</summary>
        public int ConnectionsTo(IPEndPoint target) => _connections.GetValueOrDefault(target);

        /// <summary>Closes every connection forwarded so far.</summary>
        public void DropAll()
        {
            lock (_open)
            {
                foreach (var c in _open) c.Dispose();
                _open.Clear();
            }
        }

        private async Task AcceptAsync()
        {
            try
            {
                while (true)
                {
                    var client = await _listener.AcceptTcpClientAsync(_stop.Token);
                    var target = _target;
                    _connections.AddOrUpdate(target, 1, (_, n) => n + 1);
                    var upstream = new TcpClient();
                    try
                    {
                        await upstream.ConnectAsync(target, _stop.Token);
                    }
                    catch (SocketException)
                    {
                        client.Dispose();
                        upstream.Dispose();
                        continue;
                    }
                    lock (_open) _open.AddRange([client, upstream]);
                    _ = ForwardAsync(client, upstream);
                    _ = ForwardAsync(upstream, client);
                }
            }
            catch (Exception) when (_stop.IsCancellationRequested)
            {
            }
        }

        private static async Task ForwardAsync(TcpClient from, TcpClient to)
        {
            try
            {
                await from.GetStream().CopyToAsync(to.GetStream());
            }
            catch (Exception)
            {
                // Dropped, or the other side went away.
            }
            from.Dispose();
            to.Dispose();
        }

        public async ValueTask DisposeAsync()
        {
            await _stop.CancelAsync();
            _listener.Stop();
            DropAll();
            _stop.Dispose();
        }
    }

    /// <summary>Forwards a relay's plain TCP both ways, flipping the last byte of every MSG frame of the chosen queue it passes to the client.</summary>
    private sealed class TamperingProxy : IAsyncDisposable
    {
        private readonly TcpListener _listener;
        private readonly IPEndPoint _relay;
        private readonly CancellationTokenSource _stop = new();
        private readonly List<TcpClient> _open = [];
        private byte[]? _victim;
        private int _accepted;

        public int Accepted => Volatile.Read(ref _accepted);

        public void TamperWith(byte[] recipientId) => Volatile.Write(ref _victim, recipientId);

        private TaskCompletionSource? _held;

        /// <summary>Connections accepted from now on wait (the client's handshake unanswered) until <see cref="ForwardHeld"/>.</summary>
        public void HoldNewConnections() => Volatile.Write(ref _held, new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously));

        /// <summary>The held connections, and those accepted from now on, go to the relay.</summary>
        public void ForwardHeld() => Interlocked.Exchange(ref _held, null)?.TrySetResult();

        /// <summary>Closes every connection forwarded so far (a way to the relay that was lost).</summary>
        public void DropAll()
        {
            lock (_open)
            {
                foreach (var c in _open) c.Dispose();
                _open.Clear();
            }
        }

        /// <summary>SUB frames from clients are dropped (a relay that never answers them).</summary>
        public volatile bool DropSubs;
        /// <summary>WELCOME announces this maxFrame instead of the relay's.</summary>
        public volatile int AnnounceMaxFrame;
        /// <summary>PONG frames are replaced by an ERR with correlation id 0 (code SYNTAX), as when a relay ends a connection.</summary>
        public volatile bool PongAsConnectionError;

        /// <summary>PONG frames are replaced by an ERR answering the PING (its correlation id, code SYNTAX): a relay that does not follow the protocol.</summary>
        public volatile bool PongAsError;

        private TamperingProxy(IPEndPoint relay)
        {
            _relay = relay;
            _listener = new TcpListener(IPAddress.Loopback, 0);
            _listener.Start();
            _ = AcceptAsync();
        }

        public int Port => ((IPEndPoint)_listener.LocalEndpoint).Port;

        /// <summary>The relay's address with this proxy as its host and port.</summary>
        public RelayAddress AddressOf(TestRelay relay) => relay.Address with { Hosts = ["127.0.0.1"], Port = Port };

        public static TamperingProxy Start(IPEndPoint relay) => new(relay);

        private async Task AcceptAsync()
        {
            try
            {
                while (true)
                {
                    var client = await _listener.AcceptTcpClientAsync(_stop.Token);
                    Interlocked.Increment(ref _accepted);
                    lock (_open) _open.Add(client);
                    if (Volatile.Read(ref _held) is { } held) await held.Task.WaitAsync(_stop.Token);
                    var upstream = new TcpClient();
                    try
                    {
                        await upstream.ConnectAsync(_relay, _stop.Token);
                    }
                    catch (SocketException)
                    {
                        // The relay is down (restarting): this client's connection fails, the next may not.
                        client.Dispose();
                        upstream.Dispose();
                        continue;
                    }
                    lock (_open) _open.Add(upstream);
                    _ = ForwardAsync(client.GetStream(), upstream.GetStream(), toClient: false);
                    _ = ForwardAsync(upstream.GetStream(), client.GetStream(), toClient: true);
                }
            }
            catch (Exception) when (_stop.IsCancellationRequested)
            {
            }
        }

        private async Task ForwardAsync(NetworkStream from, NetworkStream to, bool toClient)
        {
            var prefix = new byte[4];
            try
            {
                while (true)
                {
                    await from.ReadExactlyAsync(prefix, _stop.Token);
                    var frame = new byte[BinaryPrimitives.ReadUInt32BigEndian(prefix)];
                    await from.ReadExactlyAsync(frame, _stop.Token);
                    var type = (FrameType)frame[0];
                    if (!toClient)
                    {
                        if (DropSubs && type == FrameType.Sub) continue;
                    }
                    else if (type == FrameType.Msg && frame.Length > ProtocolConstants.HeaderSize + ProtocolConstants.IdSize
                        && Volatile.Read(ref _victim) is { } victim && frame.AsSpan(ProtocolConstants.HeaderSize, ProtocolConstants.IdSize).SequenceEqual(victim))
                    {
                        frame[^1] ^= 0x01;
                    }
                    else if (type == FrameType.Welcome && AnnounceMaxFrame != 0)
                    {
                        BinaryPrimitives.WriteUInt32BigEndian(frame.AsSpan(ProtocolConstants.HeaderSize + 2), (uint)AnnounceMaxFrame);
                    }
                    else if (type == FrameType.Pong && PongAsError)
                    {
                        frame = [(byte)FrameType.Err, frame[1], frame[2], frame[3], frame[4], (byte)ErrorCode.Syntax];
                        BinaryPrimitives.WriteUInt32BigEndian(prefix, (uint)frame.Length);
                    }
                    else if (type == FrameType.Pong && PongAsConnectionError)
                    {
                        frame = [(byte)FrameType.Err, 0, 0, 0, 0, (byte)ErrorCode.Syntax];
                        BinaryPrimitives.WriteUInt32BigEndian(prefix, (uint)frame.Length);
                    }
                    await to.WriteAsync(prefix, _stop.Token);
                    await to.WriteAsync(frame, _stop.Token);
                }
            }
            catch (Exception)
            {
                try
                {
                    to.Socket.Shutdown(SocketShutdown.Send);
                }
                catch (Exception)
                {
                    // Disposed with the proxy already.
                }
            }
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
