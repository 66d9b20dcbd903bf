using System.Text;
using Relay.Client;
using Relay.Client.Transport;
using Relay.Protocol;

namespace Relay.Server.Tests;

/// <summary>
/// An ACK on one connection (or the expiry sweep) deletes messages that a subscriber on another
/// connection was pushed or is about to be pushed; the disk then refuses that delete, and the messages
/// are stored again. The
/// subscriber has meanwhile moved past them (its own ACK of one answered NO_MSG, or its subscription
/// started after them). It must still receive them, and its queue must not stall: PROTOCOL.md §6 ACK.
/// </summary>
public class PutBackMessagesTests
{
    private static readonly TimeSpan Quiet = TimeSpan.FromMilliseconds(500);

    /// <summary>The store's next write waits for <see cref="Release"/> and then fails; the writes after it succeed.</summary>
    private sealed class HeldWrite
    {
        private readonly SemaphoreSlim _entered = new(0);
        private readonly ManualResetEventSlim _release = new();
        private int _writes;

        public HeldWrite(TestRelay relay)
        {
            relay.Server.Store.BeforeWrite = (_, _) =>
            {
                if (Interlocked.Increment(ref _writes) != 1) return;
                _entered.Release();
                _release.Wait(TimeSpan.FromSeconds(30));
                throw new IOException("injected write failure");
            };
        }

        public async Task EnteredAsync()
        {
            if (!await _entered.WaitAsync(TimeSpan.FromSeconds(10))) throw new TimeoutException("the write never started");
        }

        public void Release() => _release.Set();
    }

    private static async Task SendAsync(RawClient sender, RawQueue queue, string text)
    {
        var answer = await RequestAsync(sender, sender.Send(sender.NextCorr(), queue.SenderId, Encoding.UTF8.GetBytes(text)));
        await Assert.That(answer.Type).IsEqualTo(FrameType.Ok);
    }

    private static async Task SubscribeAsync(RawClient recipient, RawQueue queue)
    {
        var answer = await RequestAsync(recipient, recipient.QueueCommand(FrameType.Sub, recipient.NextCorr(), queue.RecipientId, [], queue.RecipientPrivate));
        await Assert.That(answer.Type).IsEqualTo(FrameType.Ok);
    }

    /// <summary>Pushes read while waiting for an answer, per connection, oldest first.</summary>
    private static readonly System.Runtime.CompilerServices.ConditionalWeakTable<RawClient, List<RawFrame>> Pushes = new();

    private static Task<RawFrame> RequestAsync(RawClient client, byte[] frame) => client.RequestAsync(frame, Pushes.GetOrCreateValue(client));

    /// <summary>The next push (MSG with correlation 0), opened: one read while waiting for an answer, or the next frame.</summary>
    private static async Task<(ulong Id, string Text)> PushAsync(RawClient recipient, RawQueue queue)
    {
        var pending = Pushes.GetOrCreateValue(recipient);
        RawFrame? frame;
        if (pending.Count > 0)
        {
            frame = pending[0];
            pending.RemoveAt(0);
        }
        else
        {
            frame = await recipient.ReadFrameAsync();
        }
        await Assert.That(frame?.Type).IsEqualTo(FrameType.Msg);
        await Assert.That(frame!.Correlation).IsEqualTo(0u);
        var (id, _, body) = RawClient.Open(queue, frame.Payload);
        return (id, Encoding.UTF8.GetString(body));
    }

    /// <summary>Reads until the answer to <paramref name="corr"/>, keeping the pushes before it.</summary>
    private static async Task<RawFrame> AnswerAsync(RawClient client, uint corr)
    {
        while (true)
        {
            var frame = await client.ReadResponseAsync();
            if (frame.Correlation == corr) return frame;
            if (frame.Type == FrameType.Msg) Pushes.GetOrCreateValue(client).Add(frame);
        }
    }

    private static byte[] Ack(RawClient client, RawQueue queue, uint corr, ulong id) =>
        client.QueueCommand(FrameType.Ack, corr, queue.RecipientId, RawClient.U64(id), queue.RecipientPrivate);

    private static byte[] Get(RawClient client, RawQueue queue) =>
        client.QueueCommand(FrameType.Get, client.NextCorr(), queue.RecipientId, [], queue.RecipientPrivate);

    /// <summary>ACKs each pushed message in turn until <paramref name="count"/> were acknowledged with OK; returns the texts in the order they were pushed.</summary>
    private static async Task<List<string>> ReceiveAndAckAsync(RawClient recipient, RawQueue queue, int count)
    {
        var texts = new List<string>();
        int acked = 0;
        while (acked < count)
        {
            var (id, text) = await PushAsync(recipient, queue);
            texts.Add(text);
            var answer = await RequestAsync(recipient, Ack(recipient, queue, recipient.NextCorr(), id));
            if (answer.Type == FrameType.Ok) acked++;
        }
        return texts;
    }

    private static async Task AssertEmptyAsync(RawClient client, RawQueue queue)
    {
        var answer = await RequestAsync(client, Get(client, queue));
        await Assert.That(answer.Type).IsEqualTo(FrameType.Empty);
    }

    /// <summary>
    /// Another device of the recipient polls: GET gives it <paramref name="id"/>, the oldest, and its
    /// ACK of it is accepted, the delete held on its way to disk. Returns the hold and the ACK's correlation id.
    /// </summary>
    private static async Task<(HeldWrite Held, uint Ack)> PollerAcksWhileTheDiskWaitsAsync(TestRelay relay, RawClient poller, RawQueue queue, ulong id)
    {
        var got = await RequestAsync(poller, Get(poller, queue));
        await Assert.That(got.Type).IsEqualTo(FrameType.Msg);
        await Assert.That(RawClient.Open(queue, got.Payload).Id).IsEqualTo(id);
        var held = new HeldWrite(relay);
        uint ack = poller.NextCorr();
        await poller.WriteAsync(Ack(poller, queue, ack, id));
        await held.EnteredAsync();
        return (held, ack);
    }

    [Test]
    public async Task A_subscriber_whose_ack_found_the_message_deleted_by_a_poller_whose_delete_then_failed_still_receives_everything()
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = false);
        await using var subscriber = await RawClient.ConnectAsync(relay);
        var queue = await subscriber.CreateQueueAsync();
        await using var sender = await RawClient.ConnectAsync(relay);
        await using var poller = await RawClient.ConnectAsync(relay);
        await SendAsync(sender, queue, "m1");
        await SendAsync(sender, queue, "m2");
        await SubscribeAsync(subscriber, queue);
        var (m1, _) = await PushAsync(subscriber, queue);

        // The poller takes m1 too and acknowledges it; the delete waits on the disk.
        var (held, pollerAck) = await PollerAcksWhileTheDiskWaitsAsync(relay, poller, queue, m1);

        // The subscriber's ACK of m1 finds it deleted (NO_MSG) and m2 goes out.
        var answer = await RequestAsync(subscriber, Ack(subscriber, queue, subscriber.NextCorr(), m1));
        await Assert.That(answer.Error).IsEqualTo(ErrorCode.NoMsg);
        var (m2, text2) = await PushAsync(subscriber, queue);
        await Assert.That(text2).IsEqualTo("m2");

        // The disk refuses the poller's delete: m1 is stored again.
        held.Release();
        await Assert.That((await AnswerAsync(poller, pollerAck)).Error).IsEqualTo(ErrorCode.Internal);

        // The subscriber's ACK of m2 cannot delete it while m1 is older; it is answered NO_MSG, and
        // the subscription starts again from m1: both arrive and are acknowledged, nothing is left.
        answer = await RequestAsync(subscriber, Ack(subscriber, queue, subscriber.NextCorr(), m2));
        await Assert.That(answer.Error).IsEqualTo(ErrorCode.NoMsg);
        await Assert.That(await ReceiveAndAckAsync(subscriber, queue, 2)).IsEquivalentTo(new[] { "m1", "m2" });
        await AssertEmptyAsync(poller, queue);
    }

    [Test]
    public async Task A_subscriber_with_nothing_outstanding_receives_at_once_the_message_a_failed_delete_of_a_poller_put_back()
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = false);
        await using var subscriber = await RawClient.ConnectAsync(relay);
        var queue = await subscriber.CreateQueueAsync();
        await using var sender = await RawClient.ConnectAsync(relay);
        await using var poller = await RawClient.ConnectAsync(relay);
        await SendAsync(sender, queue, "m1");
        await SubscribeAsync(subscriber, queue);
        var (m1, _) = await PushAsync(subscriber, queue);

        var (held, pollerAck) = await PollerAcksWhileTheDiskWaitsAsync(relay, poller, queue, m1);
        var answer = await RequestAsync(subscriber, Ack(subscriber, queue, subscriber.NextCorr(), m1));
        await Assert.That(answer.Error).IsEqualTo(ErrorCode.NoMsg);
        await Assert.ThrowsAsync<TimeoutException>(async () => await subscriber.ReadFrameAsync(Quiet));

        // The delete fails; the subscriber, with nothing outstanding and no ACK to come, gets m1
        // again without waiting for another message to arrive.
        held.Release();
        await Assert.That((await AnswerAsync(poller, pollerAck)).Error).IsEqualTo(ErrorCode.Internal);
        await Assert.That(await ReceiveAndAckAsync(subscriber, queue, 1)).IsEquivalentTo(new[] { "m1" });
        await AssertEmptyAsync(poller, queue);
    }

    /// <summary>
    /// The expiry sweep deletes the message the subscriber was pushed, and its ACK answers NO_MSG (an
    /// expired message) while that delete is on its way to disk; the disk refuses the delete, which
    /// puts the message back. PROTOCOL.md §6 ACK: it is delivered again, at once when nothing is
    /// outstanding, else once the subscriber's ACK of what it was pushed meanwhile finds it.
    /// </summary>
    [Test]
    [Arguments(false)]
    [Arguments(true)]
    public async Task A_subscriber_that_moved_past_a_message_whose_expiry_failed_receives_it_again(bool youngerMessage)
    {
        var clock = new OperationsClock();
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.Tls = false;
            o.Clock = clock;
            o.MessageTtl = TimeSpan.FromHours(2);
            o.SweepInterval = TimeSpan.Zero;   // the test sweeps by hand
        });
        await using var subscriber = await RawClient.ConnectAsync(relay);
        var queue = await subscriber.CreateQueueAsync();
        await using var sender = await RawClient.ConnectAsync(relay);
        await SendAsync(sender, queue, "m1");
        await SubscribeAsync(subscriber, queue);
        var (m1, _) = await PushAsync(subscriber, queue);

        // Three hours on, m1 outlived its TTL: the sweep deletes it, the delete held on its way to disk.
        clock.Advance(TimeSpan.FromHours(3));
        if (youngerMessage) await SendAsync(sender, queue, "m2");
        var held = new HeldWrite(relay);
        var sweep = relay.Server.SweepNowAsync();
        await held.EnteredAsync();
        var answer = await RequestAsync(subscriber, Ack(subscriber, queue, subscriber.NextCorr(), m1));
        await Assert.That(answer.Error).IsEqualTo(ErrorCode.NoMsg);
        ulong m2 = 0;
        if (youngerMessage)
        {
            // The place m1 held is free: m2 goes out.
            var (id2, text2) = await PushAsync(subscriber, queue);
            await Assert.That(text2).IsEqualTo("m2");
            m2 = id2;
        }
        else
        {
            await Assert.ThrowsAsync<TimeoutException>(async () => await subscriber.ReadFrameAsync(Quiet));
        }

        // The delete fails and m1 is stored again. A subscriber with nothing outstanding and no ACK to
        // come gets it without waiting for another message to arrive; one with m2 outstanding has its
        // ACK of m2 answered NO_MSG (m1 is older) and then gets both.
        held.Release();
        await Assert.That(await sweep).IsEqualTo(0);
        if (youngerMessage)
        {
            answer = await RequestAsync(subscriber, Ack(subscriber, queue, subscriber.NextCorr(), m2));
            await Assert.That(answer.Error).IsEqualTo(ErrorCode.NoMsg);
        }
        string[] expected = youngerMessage ? ["m1", "m2"] : ["m1"];
        await Assert.That(await ReceiveAndAckAsync(subscriber, queue, expected.Length)).IsEquivalentTo(expected);
        await AssertEmptyAsync(subscriber, queue);
    }

    [Test]
    public async Task A_subscription_that_began_while_the_only_message_was_being_deleted_receives_it_once_the_failed_delete_puts_it_back()
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = false);
        await using var subscriber = await RawClient.ConnectAsync(relay);
        var queue = await subscriber.CreateQueueAsync();
        await using var sender = await RawClient.ConnectAsync(relay);
        await using var poller = await RawClient.ConnectAsync(relay);
        await SendAsync(sender, queue, "m1");

        // The poller acknowledges m1, its only message; the delete waits on the disk. A subscription
        // made meanwhile finds nothing to push.
        ulong m1 = RawClient.Open(queue, (await RequestAsync(poller, Get(poller, queue))).Payload).Id;
        var (held, pollerAck) = await PollerAcksWhileTheDiskWaitsAsync(relay, poller, queue, m1);
        await SubscribeAsync(subscriber, queue);
        await Assert.ThrowsAsync<TimeoutException>(async () => await subscriber.ReadFrameAsync(Quiet));

        // The delete fails: m1 is stored again and pushed to the subscriber, which has no ACK to make
        // and may wait for no other message.
        held.Release();
        await Assert.That((await AnswerAsync(poller, pollerAck)).Error).IsEqualTo(ErrorCode.Internal);
        await Assert.That(await ReceiveAndAckAsync(subscriber, queue, 1)).IsEquivalentTo(new[] { "m1" });
        await AssertEmptyAsync(poller, queue);
    }

    [Test]
    public async Task A_device_that_takes_a_queue_while_the_ack_of_the_device_before_fails_still_receives_everything()
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = false);
        await using var before = await RawClient.ConnectAsync(relay);
        var queue = await before.CreateQueueAsync();
        await using var sender = await RawClient.ConnectAsync(relay);
        await SendAsync(sender, queue, "m1");
        await SendAsync(sender, queue, "m2");
        await SubscribeAsync(before, queue);
        var (m1, _) = await PushAsync(before, queue);

        // The first device's ACK of m1 is accepted (m2 goes out to it) and waits on the disk.
        var held = new HeldWrite(relay);
        uint beforeAck = before.NextCorr();
        await before.WriteAsync(Ack(before, queue, beforeAck, m1));
        await held.EnteredAsync();
        await Assert.That((await PushAsync(before, queue)).Text).IsEqualTo("m2");

        // Another device takes the queue: its subscription starts at m2, m1 being deleted.
        await using var after = await RawClient.ConnectAsync(relay);
        await SubscribeAsync(after, queue);
        var (m2, text2) = await PushAsync(after, queue);
        await Assert.That(text2).IsEqualTo("m2");

        // The delete fails: m1 is stored again, older than what the new device was pushed.
        held.Release();
        await Assert.That((await AnswerAsync(before, beforeAck)).Error).IsEqualTo(ErrorCode.Internal);

        var answer = await RequestAsync(after, Ack(after, queue, after.NextCorr(), m2));
        await Assert.That(answer.Error).IsEqualTo(ErrorCode.NoMsg);
        await Assert.That(await ReceiveAndAckAsync(after, queue, 2)).IsEquivalentTo(new[] { "m1", "m2" });
        await AssertEmptyAsync(after, queue);
    }

    [Test]
    public async Task An_app_whose_client_holds_the_relay_to_its_window_receives_the_put_back_messages_on_the_same_connection()
    {
        await using var relay = await TestRelay.StartAsync();
        await using var owner = await RawClient.ConnectAsync(relay);
        var queue = await owner.CreateQueueAsync();
        var recipient = new RecipientQueue(queue.RecipientId, queue.SenderId, queue.RecipientPrivate, queue.DeliveryKey);
        await using var sender = await RawClient.ConnectAsync(relay);
        await using var poller = await RawClient.ConnectAsync(relay);
        await SendAsync(sender, queue, "m1");
        await SendAsync(sender, queue, "m2");

        await using var client = new RelayClient(new RelayClientOptions { DeliveryWindow = 1 });
        await client.SubscribeAsync(relay.Address, recipient);
        var connection = await client.ConnectAsync(relay.Address);
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(30));
        await using var deliveries = client.DeliveriesAsync(cts.Token).GetAsyncEnumerator(cts.Token);
        async Task<(ulong Id, string Text)> NextAsync()
        {
            await Assert.That(await deliveries.MoveNextAsync()).IsTrue();
            return (deliveries.Current.Delivery.MessageId, Encoding.UTF8.GetString(deliveries.Current.Delivery.Body));
        }
        Task AckAsync(ulong id) => client.RunAsync(relay.Address, c => c.AckAsync(recipient, id));

        var (m1, _) = await NextAsync();
        var (held, pollerAck) = await PollerAcksWhileTheDiskWaitsAsync(relay, poller, queue, m1);
        var gone = await Assert.ThrowsAsync<RelayErrorException>(() => AckAsync(m1));
        await Assert.That(gone!.Code).IsEqualTo(ErrorCode.NoMsg);
        var (m2, text2) = await NextAsync();
        await Assert.That(text2).IsEqualTo("m2");

        held.Release();
        await Assert.That((await AnswerAsync(poller, pollerAck)).Error).IsEqualTo(ErrorCode.Internal);
        var older = await Assert.ThrowsAsync<RelayErrorException>(() => AckAsync(m2));
        await Assert.That(older!.Code).IsEqualTo(ErrorCode.NoMsg);

        // Both come again, in order, on the connection they came on: the client found the pushes
        // within the window it counts.
        var again1 = await NextAsync();
        await Assert.That(again1).IsEqualTo((m1, "m1"));
        await AckAsync(m1);
        var again2 = await NextAsync();
        await Assert.That(again2).IsEqualTo((m2, "m2"));
        await AckAsync(m2);
        await Assert.That(await client.ConnectAsync(relay.Address)).IsSameReferenceAs(connection);
        await AssertEmptyAsync(poller, queue);
    }

    /// <summary>
    /// The subscriber's own ACK fails on the disk: the relay restarts its subscription once (the
    /// INTERNAL answer allows the client one restart), not a second time for the messages the failed
    /// delete put back, which would push beyond the window the client counts.
    /// </summary>
    [Test]
    [Arguments(1)]
    [Arguments(2)]
    public async Task An_app_whose_own_ack_the_disk_refuses_receives_the_messages_again_once_on_the_same_connection(int messages)
    {
        await using var relay = await TestRelay.StartAsync();
        await using var owner = await RawClient.ConnectAsync(relay);
        var queue = await owner.CreateQueueAsync();
        var recipient = new RecipientQueue(queue.RecipientId, queue.SenderId, queue.RecipientPrivate, queue.DeliveryKey);
        await using var sender = await RawClient.ConnectAsync(relay);
        for (int i = 1; i <= messages; i++) await SendAsync(sender, queue, $"m{i}");

        await using var client = new RelayClient(new RelayClientOptions { DeliveryWindow = 1 });
        await client.SubscribeAsync(relay.Address, recipient);
        var connection = await client.ConnectAsync(relay.Address);
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(30));
        await using var deliveries = client.DeliveriesAsync(cts.Token).GetAsyncEnumerator(cts.Token);
        async Task<string> NextAsync()
        {
            await Assert.That(await deliveries.MoveNextAsync()).IsTrue();
            return Encoding.UTF8.GetString(deliveries.Current.Delivery.Body);
        }

        await Assert.That(await NextAsync()).IsEqualTo("m1");
        var held = new HeldWrite(relay);
        var failing = client.RunAsync(relay.Address, c => c.AckAsync(recipient, deliveries.Current.Delivery.MessageId));
        await held.EnteredAsync();
        held.Release();
        var failed = await Assert.ThrowsAsync<RelayErrorException>(() => failing);
        await Assert.That(failed!.Code).IsEqualTo(ErrorCode.Internal);

        // What the window allowed before the failure (m2 went out when the ACK was accepted) and m1
        // again from the restart; each acknowledged in order until all are deleted, on the same connection.
        var received = new List<string> { "m1" };
        int deleted = 0;
        while (deleted < messages)
        {
            received.Add(await NextAsync());
            try
            {
                await client.RunAsync(relay.Address, c => c.AckAsync(recipient, deliveries.Current.Delivery.MessageId));
                deleted++;
            }
            catch (RelayErrorException ex) when (ex.Code == ErrorCode.NoMsg)
            {
                // m2 delivered before the restart: not the oldest once m1 is stored again.
            }
        }
        await AssertEmptyAsync(owner, queue);
        await Assert.That(await client.ConnectAsync(relay.Address)).IsSameReferenceAs(connection);
        await Assert.That(received.Count(t => t == "m1")).IsEqualTo(2);
    }
}
