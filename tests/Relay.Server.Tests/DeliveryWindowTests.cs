using System.Text;
using Relay.Client;
using Relay.Client.Transport;
using Relay.Protocol;
using static Relay.Server.Tests.EventWaits;
using static Relay.Server.Tests.OperationsMetrics;

namespace Relay.Server.Tests;

/// <summary>
/// SUB with a delivery window (PROTOCOL.md §6 SUB): up to W messages outstanding, in order, each ACK
/// (oldest first) releasing the next; over real TCP and TLS through the client SDK.
/// </summary>
public class DeliveryWindowTests
{
    private static async Task SendAllAsync(RelayConnection sender, RecipientQueue queue, int from, int count)
    {
        var to = new SenderQueue(queue.SenderId, null);
        for (int i = from; i < from + count; i++)
        {
            await sender.SendAsync(to, Encoding.UTF8.GetBytes($"m{i}"));
        }
    }

    private static string Text(Delivery d) => Encoding.UTF8.GetString(d.Body);

    /// <summary>The next <paramref name="count"/> deliveries, by queue (the last of each queue's).</summary>
    private static async Task<Dictionary<RecipientQueue, Delivery>> DeliveriesByQueueAsync(RelayConnection connection, int count)
    {
        var deliveries = new Dictionary<RecipientQueue, Delivery>(ReferenceEqualityComparer.Instance);
        for (int i = 0; i < count; i++)
        {
            var e = await NextEventAsync(connection);
            var d = e as DeliveryEvent ?? throw new InvalidOperationException($"expected a delivery, got {e}");
            deliveries[d.Queue] = d.Delivery;
        }
        return deliveries;
    }

    [Test]
    [Arguments(false)]
    [Arguments(true)]
    public async Task Up_to_the_window_arrives_before_any_ack_and_each_ack_releases_one_more(bool tls)
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = tls);
        await using var recipient = await relay.ConnectAsync();
        await using var sender = await relay.ConnectAsync();
        var queue = await recipient.CreateQueueAsync();
        await SendAllAsync(sender, queue, 1, 6);          // stored before the SUB

        await recipient.SubscribeAsync(queue, window: 4);
        var outstanding = new List<Delivery>();
        for (int i = 1; i <= 4; i++)
        {
            var d = await NextDeliveryAsync(recipient);
            await Assert.That(Text(d)).IsEqualTo($"m{i}");
            outstanding.Add(d);
        }
        await Assert.That(await NothingArrivesAsync(recipient, TimeSpan.FromMilliseconds(300))).IsTrue();

        await recipient.AckAsync(queue, outstanding[0].MessageId);
        var fifth = await NextDeliveryAsync(recipient);
        await Assert.That(Text(fifth)).IsEqualTo("m5");
        outstanding.Add(fifth);
        await Assert.That(await NothingArrivesAsync(recipient, TimeSpan.FromMilliseconds(300))).IsTrue();

        // Messages sent while subscribed fill the window as it frees up: one per ACK, in order.
        await SendAllAsync(sender, queue, 7, 6);
        int next = 6;
        for (int k = 1; k < 12; k++)
        {
            await recipient.AckAsync(queue, outstanding[k].MessageId);
            if (next <= 12)
            {
                var d = await NextDeliveryAsync(recipient);
                await Assert.That(Text(d)).IsEqualTo($"m{next}");
                await Assert.That(d.MessageId).IsGreaterThan(outstanding[^1].MessageId);
                outstanding.Add(d);
                next++;
            }
        }
        await Assert.That(outstanding.Count).IsEqualTo(12);
        await Assert.That(await recipient.GetAsync(queue)).IsNull();
    }

    [Test]
    [Arguments(1, false)]
    [Arguments(2, true)]
    public async Task A_message_that_expired_while_outstanding_frees_its_place_when_acked(int window, bool through)
    {
        var clock = new OperationsClock();
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.Clock = clock;
            o.MessageTtl = TimeSpan.FromHours(2);
            o.SweepInterval = TimeSpan.Zero;   // the test sweeps by hand
        });
        await using var recipient = await relay.ConnectAsync();
        await using var sender = await relay.ConnectAsync();
        var queue = await recipient.CreateQueueAsync();
        await SendAllAsync(sender, queue, 1, window);
        await recipient.SubscribeAsync(queue, window);
        var outstanding = new List<Delivery>();
        for (int i = 1; i <= window; i++)
        {
            outstanding.Add(await NextDeliveryAsync(recipient));
        }

        // The outstanding messages outlive their TTL without an ACK; a fresh one waits behind them.
        clock.Advance(TimeSpan.FromHours(3));
        await SendAllAsync(sender, queue, 100, 1);
        await Assert.That(await relay.Server.SweepNowAsync()).IsEqualTo(window);
        await Assert.That(await NothingArrivesAsync(recipient, TimeSpan.FromMilliseconds(300))).IsTrue();

        // Their ACK finds nothing to delete (NO_MSG) but frees the window: the fresh message arrives.
        var ack = through
            ? recipient.AckThroughAsync(queue, outstanding[^1].MessageId)
            : recipient.AckAsync(queue, outstanding[^1].MessageId);
        var error = await Assert.ThrowsAsync<RelayErrorException>(async () => await ack);
        await Assert.That(error!.Code).IsEqualTo(ErrorCode.NoMsg);
        var fresh = await NextDeliveryAsync(recipient);
        await Assert.That(Text(fresh)).IsEqualTo("m100");
        await recipient.AckAsync(queue, fresh.MessageId);
        await Assert.That(await recipient.GetAsync(queue)).IsNull();
    }

    [Test]
    [Arguments(false)]
    [Arguments(true)]
    public async Task An_ack_out_of_order_is_refused_and_loses_nothing(bool tls)
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = tls);
        await using var recipient = await relay.ConnectAsync();
        await using var sender = await relay.ConnectAsync();
        var queue = await recipient.CreateQueueAsync();
        await SendAllAsync(sender, queue, 1, 5);

        await recipient.SubscribeAsync(queue, window: 3);
        var d1 = await NextDeliveryAsync(recipient);
        var d2 = await NextDeliveryAsync(recipient);
        var d3 = await NextDeliveryAsync(recipient);

        var refused = await Assert.That(() => recipient.AckAsync(queue, d2.MessageId)).Throws<RelayErrorException>();
        await Assert.That(refused!.Code).IsEqualTo(ErrorCode.NoMsg);
        // The refused ACK released nothing.
        await Assert.That(await NothingArrivesAsync(recipient, TimeSpan.FromMilliseconds(300))).IsTrue();

        await recipient.AckAsync(queue, d1.MessageId);
        await Assert.That(Text(await NextDeliveryAsync(recipient))).IsEqualTo("m4");
        await recipient.AckAsync(queue, d2.MessageId);
        await Assert.That(Text(await NextDeliveryAsync(recipient))).IsEqualTo("m5");
        await recipient.AckAsync(queue, d3.MessageId);
        await Assert.That(Text(d1) + Text(d2) + Text(d3)).IsEqualTo("m1m2m3");
        var m4 = await recipient.GetAsync(queue);
        await Assert.That(Text(m4!)).IsEqualTo("m4");
    }

    [Test]
    [Arguments(false)]
    [Arguments(true)]
    public async Task A_new_sub_delivers_again_from_the_oldest_unacknowledged(bool tls)
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = tls);
        await using var recipient = await relay.ConnectAsync();
        await using var sender = await relay.ConnectAsync();
        var queue = await recipient.CreateQueueAsync();
        await SendAllAsync(sender, queue, 1, 6);

        await recipient.SubscribeAsync(queue, window: 4);
        var first = new List<Delivery>();
        for (int i = 0; i < 4; i++) first.Add(await NextDeliveryAsync(recipient));
        await recipient.AckAsync(queue, first[0].MessageId);
        await Assert.That(Text(await NextDeliveryAsync(recipient))).IsEqualTo("m5");

        // A SUB again (a smaller window): m2 onwards again, two at a time.
        await recipient.SubscribeAsync(queue, window: 2);
        var again1 = await NextDeliveryAsync(recipient);
        var again2 = await NextDeliveryAsync(recipient);
        await Assert.That(Text(again1) + Text(again2)).IsEqualTo("m2m3");
        await Assert.That(again1.MessageId).IsEqualTo(first[1].MessageId);
        await Assert.That(await NothingArrivesAsync(recipient, TimeSpan.FromMilliseconds(300))).IsTrue();

        // Another connection takes over with the default window of one.
        await using var other = await relay.ConnectAsync();
        await other.SubscribeAsync(queue);
        await Assert.That(Text(await NextDeliveryAsync(other))).IsEqualTo("m2");
        await Assert.That(await NothingArrivesAsync(other, TimeSpan.FromMilliseconds(300))).IsTrue();
    }

    [Test]
    [Arguments(false)]
    [Arguments(true)]
    public async Task One_ack_through_deletes_every_outstanding_message_up_to_it(bool tls)
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = tls);
        await using var recipient = await relay.ConnectAsync();
        await using var sender = await relay.ConnectAsync();
        var queue = await recipient.CreateQueueAsync();
        await SendAllAsync(sender, queue, 1, 10);
        double ackedBefore = Value(await ScrapeAsync(relay), "relay_messages_acked_total");

        await recipient.SubscribeAsync(queue, window: 6);
        var outstanding = new List<Delivery>();
        for (int i = 1; i <= 6; i++) outstanding.Add(await NextDeliveryAsync(recipient));
        await Assert.That(await NothingArrivesAsync(recipient, TimeSpan.FromMilliseconds(300))).IsTrue();

        // Through the fourth: four deleted, four places free, m7..m10 follow.
        await recipient.AckThroughAsync(queue, outstanding[3].MessageId);
        var next = new List<Delivery>();
        for (int i = 0; i < 4; i++) next.Add(await NextDeliveryAsync(recipient));
        await Assert.That(next.Select(Text)).IsEquivalentTo(["m7", "m8", "m9", "m10"], TUnit.Assertions.Enums.CollectionOrdering.Matching);
        await recipient.PingAsync();
        await Assert.That(Value(await ScrapeAsync(relay), "relay_messages_acked_total") - ackedBefore).IsEqualTo(4);
        await using (var other = await relay.ConnectAsync())
        {
            await Assert.That(Text((await other.GetAsync(queue))!)).IsEqualTo("m5");
        }

        // What was acknowledged stays deleted across a restart; the rest comes again, from m5.
        await relay.RestartAsync();
        await using var again = await relay.ConnectAsync();
        await again.SubscribeAsync(queue, window: 8);
        var redelivered = new List<Delivery>();
        for (int i = 0; i < 6; i++) redelivered.Add(await NextDeliveryAsync(again));
        await Assert.That(redelivered.Select(Text)).IsEquivalentTo(["m5", "m6", "m7", "m8", "m9", "m10"], TUnit.Assertions.Enums.CollectionOrdering.Matching);
        await again.AckThroughAsync(queue, redelivered[^1].MessageId);
        await Assert.That(await again.GetAsync(queue)).IsNull();
    }

    [Test]
    [Arguments(false)]
    [Arguments(true)]
    public async Task An_ack_through_a_message_not_outstanding_here_is_refused_and_loses_nothing(bool tls)
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = tls);
        await using var recipient = await relay.ConnectAsync();
        await using var sender = await relay.ConnectAsync();
        var queue = await recipient.CreateQueueAsync();
        await SendAllAsync(sender, queue, 1, 6);

        await recipient.SubscribeAsync(queue, window: 3);
        var d1 = await NextDeliveryAsync(recipient);
        var d2 = await NextDeliveryAsync(recipient);
        var d3 = await NextDeliveryAsync(recipient);

        // m4 is stored but not delivered yet: its id is not outstanding, nor is one past the newest.
        foreach (ulong id in new[] { d3.MessageId + 1, d3.MessageId + 100, d1.MessageId - 1 })
        {
            var refused = await Assert.That(() => recipient.AckThroughAsync(queue, id)).Throws<RelayErrorException>();
            await Assert.That(refused!.Code).IsEqualTo(ErrorCode.NoMsg);
        }
        // On another connection nothing is outstanding: an ACK through covers the named id only,
        // which must be the oldest.
        await using var other = await relay.ConnectAsync();
        var elsewhere = await Assert.That(() => other.AckThroughAsync(queue, d2.MessageId)).Throws<RelayErrorException>();
        await Assert.That(elsewhere!.Code).IsEqualTo(ErrorCode.NoMsg);
        await Assert.That(await NothingArrivesAsync(recipient, TimeSpan.FromMilliseconds(300))).IsTrue();
        await Assert.That(Text((await other.GetAsync(queue))!)).IsEqualTo("m1");

        // Acknowledged there, m1 is deleted; its place in the subscriber's window stays taken until
        // the subscriber acknowledges it too (here through m3).
        await other.AckThroughAsync(queue, d1.MessageId);
        await Assert.That(await NothingArrivesAsync(recipient, TimeSpan.FromMilliseconds(300))).IsTrue();
        await recipient.AckThroughAsync(queue, d3.MessageId);
        var rest = new[] { await NextDeliveryAsync(recipient), await NextDeliveryAsync(recipient), await NextDeliveryAsync(recipient) };
        await Assert.That(Text(rest[0]) + Text(rest[1]) + Text(rest[2])).IsEqualTo("m4m5m6");
        await Assert.That(Text((await other.GetAsync(queue))!)).IsEqualTo("m4");
    }

    [Test]
    public async Task Delivery_latency_observes_the_messages_pushed_straight_after_their_send()
    {
        await using var relay = await TestRelay.StartAsync();
        await using var recipient = await relay.ConnectAsync();
        await using var sender = await relay.ConnectAsync();
        var queue = await recipient.CreateQueueAsync();
        await recipient.SubscribeAsync(queue, window: 4);
        double before = Value(await ScrapeAsync(relay), "relay_delivery_latency_seconds_count");

        // Six sends, no ACK: the first four go out as they arrive, the last two wait in the queue.
        await SendAllAsync(sender, queue, 1, 6);
        for (int i = 1; i <= 4; i++) await Assert.That(Text(await NextDeliveryAsync(recipient))).IsEqualTo($"m{i}");
        await recipient.PingAsync();
        double after = Value(await ScrapeAsync(relay), "relay_delivery_latency_seconds_count");
        await Assert.That(after - before).IsEqualTo(4);
    }

    [Test]
    public async Task A_window_above_the_maximum_gets_the_maximum()
    {
        int n = ProtocolConstants.MaxDeliveryWindow + 10;
        await using var relay = await TestRelay.StartAsync();
        await using var recipient = await relay.ConnectAsync();
        await using var sender = await relay.ConnectAsync();
        var queue = await recipient.CreateQueueAsync();
        await SendAllAsync(sender, queue, 1, n);

        await recipient.SubscribeAsync(queue, window: ushort.MaxValue);
        var received = new List<Delivery>();
        for (int i = 0; i < ProtocolConstants.MaxDeliveryWindow; i++) received.Add(await NextDeliveryAsync(recipient));
        await Assert.That(await NothingArrivesAsync(recipient, TimeSpan.FromMilliseconds(300))).IsTrue();
        await Assert.That(received.Select(Text)).IsEquivalentTo(Enumerable.Range(1, ProtocolConstants.MaxDeliveryWindow).Select(i => $"m{i}"), TUnit.Assertions.Enums.CollectionOrdering.Matching);

        await Assert.That(() => recipient.SubscribeAsync(queue, window: 0)).Throws<ArgumentOutOfRangeException>();
    }
    [Test]
    public async Task RelayClient_subscribes_with_its_window_and_again_after_a_relay_restart()
    {
        await using var relay = await TestRelay.StartAsync();
        await using var sender = await relay.ConnectAsync();
        RecipientQueue queue;
        await using (var setup = await relay.ConnectAsync())
        {
            queue = await setup.CreateQueueAsync();
        }
        await SendAllAsync(sender, queue, 1, 6);

        await using var client = new RelayClient(new RelayClientOptions
        {
            DeliveryWindow = 3,
            ReconnectMin = TimeSpan.FromMilliseconds(50),
            ReconnectMax = TimeSpan.FromMilliseconds(500),
        });
        await client.SubscribeAsync(relay.Address, queue);
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(20));
        await using var deliveries = client.DeliveriesAsync(cts.Token).GetAsyncEnumerator(cts.Token);
        async Task<Delivery> NextAsync()
        {
            if (!await deliveries.MoveNextAsync()) throw new InvalidOperationException("the delivery stream ended");
            return deliveries.Current.Delivery;
        }

        var first = new List<Delivery>();
        for (int i = 0; i < 3; i++) first.Add(await NextAsync());
        await Assert.That(first.Select(Text)).IsEquivalentTo(["m1", "m2", "m3"], TUnit.Assertions.Enums.CollectionOrdering.Matching);
        var early = deliveries.MoveNextAsync().AsTask();
        await Assert.That(await Task.WhenAny(early, Task.Delay(300)) != early).IsTrue();

        await client.RunAsync(relay.Address, c => c.AckAsync(queue, first[0].MessageId));
        await Assert.That(await early).IsTrue();
        await Assert.That(Text(deliveries.Current.Delivery)).IsEqualTo("m4");

        // A restart: the client reconnects and subscribes again with its window, from the oldest.
        await relay.RestartAsync();
        var again = new List<Delivery>();
        for (int i = 0; i < 3; i++) again.Add(await NextAsync());
        await Assert.That(again.Select(Text)).IsEquivalentTo(["m2", "m3", "m4"], TUnit.Assertions.Enums.CollectionOrdering.Matching);
        foreach (var d in again)
        {
            await client.RunAsync(relay.Address, c => c.AckAsync(queue, d.MessageId));
        }
        await Assert.That(Text(await NextAsync()) + Text(await NextAsync())).IsEqualTo("m5m6");
    }

    [Test]
    public async Task An_ack_on_another_connection_deletes_the_message_but_frees_no_place_of_the_subscribers_window()
    {
        // Another device of the recipient polls (GET, ACK) while this one is subscribed, or acknowledges
        // what it received before its subscription was taken: the messages are deleted, and the
        // subscriber's window still holds them until it acknowledges them itself.
        await using var relay = await TestRelay.StartAsync();
        await using var subscriber = await relay.ConnectAsync();
        await using var poller = await relay.ConnectAsync();
        await using var sender = await relay.ConnectAsync();
        var queue = await subscriber.CreateQueueAsync();
        await SendAllAsync(sender, queue, 1, 5);
        await subscriber.SubscribeAsync(queue, window: 2);
        var first = await NextDeliveryAsync(subscriber);
        var second = await NextDeliveryAsync(subscriber);

        var polled = await poller.GetAsync(queue);
        await Assert.That(polled!.MessageId).IsEqualTo(first.MessageId);
        await poller.AckAsync(queue, polled.MessageId);
        await Assert.That(await NothingArrivesAsync(subscriber, TimeSpan.FromMilliseconds(300))).IsTrue();

        // The subscriber's own ACK of the deleted message finds nothing (NO_MSG) and frees its place.
        var gone = await Assert.ThrowsAsync<RelayErrorException>(() => subscriber.AckAsync(queue, first.MessageId));
        await Assert.That(gone!.Code).IsEqualTo(ErrorCode.NoMsg);
        var third = await NextDeliveryAsync(subscriber);
        await Assert.That(Text(third)).IsEqualTo("m3");
        await subscriber.AckThroughAsync(queue, third.MessageId);   // covers the second too
        var fourth = await NextDeliveryAsync(subscriber);
        var fifth = await NextDeliveryAsync(subscriber);
        await Assert.That((Text(second), Text(fourth), Text(fifth))).IsEqualTo(("m2", "m4", "m5"));
        await subscriber.AckThroughAsync(queue, fifth.MessageId);
        await Assert.That(await poller.GetAsync(queue)).IsNull();
    }

    [Test]
    public async Task An_ack_whose_write_fails_is_an_error_and_the_subscription_delivers_again_from_the_oldest()
    {
        await using var relay = await TestRelay.StartAsync();
        await using var recipient = await relay.ConnectAsync();
        await using var sender = await relay.ConnectAsync();
        var queue = await recipient.CreateQueueAsync();
        await SendAllAsync(sender, queue, 1, 3);
        await recipient.SubscribeAsync(queue, window: 1);
        var first = await NextDeliveryAsync(recipient);
        await Assert.That(Text(first)).IsEqualTo("m1");

        // The disk fails the ACK's write: the relay answers an error, and m1 is still stored.
        int writes = 0;
        relay.Server.Store.BeforeWrite = (ops, bytes) =>
        {
            if (Interlocked.Increment(ref writes) == 1) throw new IOException("injected write failure");
        };
        var failed = await Assert.ThrowsAsync<RelayErrorException>(() => recipient.AckAsync(queue, first.MessageId));
        await Assert.That(failed!.Code).IsEqualTo(ErrorCode.Internal);
        relay.Server.Store.BeforeWrite = null;

        // Without a new SUB, deliveries start again from the oldest (m1, perhaps after m2 pushed
        // when the ACK was accepted), and acknowledging in order drains the queue.
        var seen = new List<string>();
        Delivery d;
        do
        {
            d = await NextDeliveryAsync(recipient);
            seen.Add(Text(d));
        }
        while (Text(d) != "m1" && seen.Count < 3);
        await Assert.That(seen.SequenceEqual(["m1"]) || seen.SequenceEqual(["m2", "m1"])).IsTrue();
        for (int i = 2; i <= 3; i++)
        {
            await recipient.AckAsync(queue, d.MessageId);
            d = await NextDeliveryAsync(recipient);
            await Assert.That(Text(d)).IsEqualTo($"m{i}");
        }
        await recipient.AckAsync(queue, d.MessageId);
        await Assert.That(await NothingArrivesAsync(recipient, TimeSpan.FromMilliseconds(300))).IsTrue();
    }

    /// <summary>
    /// The disk fails the write of the first ACK; while the store undoes it (held until the second
    /// is answered), the second ACK is refused before it is staged. Both must be answered INTERNAL.
    /// </summary>
    private static async Task FailFirstAckAndRefuseSecondWhileUndoingAsync(TestRelay relay, RelayConnection recipient,
        (RecipientQueue Queue, ulong Id) failing, (RecipientQueue Queue, ulong Id) refused)
    {
        var store = relay.Server.Store;
        var undoing = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        using var answered = new ManualResetEventSlim(false);
        int writes = 0;
        store.BeforeWrite = (ops, bytes) =>
        {
            if (Interlocked.Increment(ref writes) == 1) throw new IOException("injected write failure");
        };
        store.WhileUndoing = () =>
        {
            undoing.TrySetResult();
            answered.Wait(TimeSpan.FromSeconds(10));
        };
        try
        {
            var failedAck = recipient.AckAsync(failing.Queue, failing.Id);
            try
            {
                await undoing.Task.WaitAsync(TimeSpan.FromSeconds(10));
                var refusal = await Assert.ThrowsAsync<RelayErrorException>(() => recipient.AckAsync(refused.Queue, refused.Id));
                await Assert.That(refusal!.Code).IsEqualTo(ErrorCode.Internal);
            }
            finally
            {
                answered.Set();
            }
            var failure = await Assert.ThrowsAsync<RelayErrorException>(() => failedAck);
            await Assert.That(failure!.Code).IsEqualTo(ErrorCode.Internal);
        }
        finally
        {
            store.BeforeWrite = null;
            store.WhileUndoing = null;
        }
    }

    [Test]
    public async Task An_ack_the_store_refuses_while_it_undoes_another_failed_write_is_an_error_and_that_subscription_delivers_again_from_the_oldest()
    {
        // `relay bench` drain stalled (108 of 200, two queues of 100, window 8) this way: one queue's
        // ACK failed on the disk, the other queue's ACKs arrived while the store undid it and were
        // refused, and that queue kept its window full of messages the client had acknowledged.
        await using var relay = await TestRelay.StartAsync();
        await using var recipient = await relay.ConnectAsync();
        await using var sender = await relay.ConnectAsync();
        var failing = await recipient.CreateQueueAsync();
        var refused = await recipient.CreateQueueAsync();
        await SendAllAsync(sender, failing, 1, 1);
        await SendAllAsync(sender, refused, 1, 2);
        await recipient.SubscribeAsync(failing, window: 1);
        await recipient.SubscribeAsync(refused, window: 1);
        var firsts = await DeliveriesByQueueAsync(recipient, 2);

        // The disk fails the write of the first queue's ACK; while the store undoes it, the second
        // queue's ACK is refused (INTERNAL) before it is staged.
        await FailFirstAckAndRefuseSecondWhileUndoingAsync(relay, recipient,
            (failing, firsts[failing].MessageId), (refused, firsts[refused].MessageId));

        // Both ACKs answered INTERNAL: both subscriptions start again from their oldest message
        // (PROTOCOL.md §6 ACK). The refused queue's m1 comes again, and acknowledging it releases m2.
        var again = await DeliveriesByQueueAsync(recipient, 2);
        await Assert.That(again.Count).IsEqualTo(2);
        await Assert.That(again[refused].MessageId).IsEqualTo(firsts[refused].MessageId);
        await Assert.That(again[failing].MessageId).IsEqualTo(firsts[failing].MessageId);
        await recipient.AckAsync(refused, again[refused].MessageId);
        await Assert.That(Text(await NextDeliveryAsync(recipient))).IsEqualTo("m2");
        await recipient.AckAsync(failing, again[failing].MessageId);
        await Assert.That(await NothingArrivesAsync(recipient, TimeSpan.FromMilliseconds(300))).IsTrue();
    }

    [Test]
    public async Task An_ack_refused_while_an_earlier_ack_of_the_same_queue_is_undone_delivers_again_from_the_oldest_in_order()
    {
        await using var relay = await TestRelay.StartAsync();
        await using var recipient = await relay.ConnectAsync();
        await using var sender = await relay.ConnectAsync();
        var queue = await recipient.CreateQueueAsync();
        await SendAllAsync(sender, queue, 1, 4);
        await recipient.SubscribeAsync(queue, window: 4);
        var first = new List<Delivery>();
        for (int i = 0; i < 4; i++) first.Add(await NextDeliveryAsync(recipient));

        // The ACK of m1 fails on the disk; while the store undoes it, the ACK of m2 (the oldest once
        // m1's was accepted) is refused. Restarting at that moment would push from m2: m1's delete
        // is not taken back yet.
        await FailFirstAckAndRefuseSecondWhileUndoingAsync(relay, recipient,
            (queue, first[0].MessageId), (queue, first[1].MessageId));

        // Both INTERNAL answers restart the subscription from m1: every push comes in queue order,
        // each run from m1 (PROTOCOL.md §6 ACK), and nothing was deleted.
        var again = new List<string>();
        while (!await NothingArrivesAsync(recipient, TimeSpan.FromMilliseconds(500)))
        {
            again.Add(Text(await NextDeliveryAsync(recipient)));
        }
        await Assert.That(again.Count).IsGreaterThanOrEqualTo(4);
        await Assert.That(again.Count % 4).IsEqualTo(0);
        for (int i = 0; i < again.Count; i++)
        {
            await Assert.That(again[i]).IsEqualTo($"m{i % 4 + 1}");
        }
        var oldest = await relay.ConnectAsync();
        await using (oldest)
        {
            var polled = await oldest.GetAsync(queue);
            await Assert.That(polled is null ? null : Text(polled)).IsEqualTo("m1");
        }
    }

    [Test]
    public async Task A_queue_the_relay_refuses_after_a_reconnection_is_reported_and_the_others_go_on()
    {
        await using var relay = await TestRelay.StartAsync();
        await using var owner = await relay.ConnectAsync();
        await using var sender = await relay.ConnectAsync();
        var kept = await owner.CreateQueueAsync();
        var deleted = await owner.CreateQueueAsync();

        await using var client = new RelayClient(new RelayClientOptions
        {
            ReconnectMin = TimeSpan.FromMilliseconds(50),
            ReconnectMax = TimeSpan.FromMilliseconds(500),
        });
        var refused = new TaskCompletionSource<(RecipientQueue Queue, ErrorCode Code)>(TaskCreationOptions.RunContinuationsAsynchronously);
        client.SubscriptionRefused += (_, queue, error) => refused.TrySetResult((queue, error.Code));
        await client.SubscribeAsync(relay.Address, kept);
        await client.SubscribeAsync(relay.Address, deleted);

        // Deleted while the client was away (the relay stopped): the renewal of its SUB is refused.
        await relay.RestartAsync(async () =>
        {
            await using var store = relay.OpenStore();
            var handle = store.FindByRecipientId(deleted.RecipientId)!;
            await Assert.That(await store.DeleteQueueAsync(handle)).IsEqualTo(Storage.StoreStatus.Ok);
        });
        var (queue, code) = await refused.Task.WaitAsync(TimeSpan.FromSeconds(20));
        await Assert.That(queue.RecipientId).IsEquivalentTo(deleted.RecipientId);
        await Assert.That(code).IsEqualTo(ErrorCode.Auth);

        // The other queue of that relay still delivers, and requests on the connection work.
        await using var again = await relay.ConnectAsync();
        await again.SendAsync(new SenderQueue(kept.SenderId, null), "after"u8.ToArray());
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(20));
        await using var deliveries = client.DeliveriesAsync(cts.Token).GetAsyncEnumerator(cts.Token);
        await Assert.That(await deliveries.MoveNextAsync()).IsTrue();
        await Assert.That(Text(deliveries.Current.Delivery)).IsEqualTo("after");
        await client.RunAsync(relay.Address, c => c.PingAsync());
    }
}
