using System.Text;
using Relay.Client.Transport;
using Relay.Protocol;
using static Relay.Server.Tests.EventWaits;

namespace Relay.Server.Tests;

/// <summary>
/// The SDK's check of the delivery windows (MisbehavingRelayTests) against the real relay: whatever
/// the window, the acknowledgement pattern or the subscriptions renewed on the way, a relay that
/// follows the protocol never trips it, and every message arrives.
/// </summary>
public class DeliveryWindowCheckTests
{
    private static async Task SendAllAsync(RelayConnection sender, RecipientQueue queue, int from, int count)
    {
        var to = new SenderQueue(queue.SenderId, null);
        // Pipelined, a hundred at a time: the order of the OKs is the order of the messages.
        for (int start = from; start < from + count; start += 100)
        {
            var batch = Enumerable.Range(start, Math.Min(100, from + count - start))
                .Select(i => sender.SendAsync(to, Encoding.UTF8.GetBytes($"m{i}")));
            await Task.WhenAll(batch);
        }
    }

    /// <summary>One at a time, in order, waiting while the queue is full (the relay's limit is 128 messages).</summary>
    private static async Task SendInOrderAsync(RelayConnection sender, RecipientQueue queue, int from, int count)
    {
        var to = new SenderQueue(queue.SenderId, null);
        for (int i = from; i < from + count; i++)
        {
            while (true)
            {
                try
                {
                    await sender.SendAsync(to, Encoding.UTF8.GetBytes($"m{i}"));
                    break;
                }
                catch (RelayErrorException ex) when (ex.Code == ErrorCode.Quota)
                {
                    await Task.Delay(5);
                }
            }
        }
    }

    private static int Number(Delivery d) => int.Parse(Encoding.UTF8.GetString(d.Body).AsSpan(1));

    /// <summary>ACKs sent without waiting for their answers (as Messenger and relay bench do); NO_MSG is expected after a SUB repeated.</summary>
    private static async Task ObserveAsync(List<Task> acks, bool noMsgExpected = false)
    {
        foreach (var ack in acks)
        {
            try
            {
                await ack.WaitAsync(TimeSpan.FromSeconds(10));
            }
            catch (RelayErrorException ex) when (noMsgExpected && ex.Code == ErrorCode.NoMsg)
            {
            }
        }
        acks.Clear();
    }

    private static async Task AssertDrainedAsync(TestRelay relay, RelayConnection recipient, RecipientQueue queue)
    {
        await Assert.That(recipient.Failure).IsNull();
        await Assert.That(recipient.Closed.IsCancellationRequested).IsFalse();
        await using var poller = await relay.ConnectAsync();
        await Assert.That(await poller.GetAsync(queue)).IsNull();
    }

    [Test]
    [Arguments(1)]
    [Arguments(2)]
    [Arguments(32)]
    [Arguments(64)]
    public async Task A_backlog_of_several_windows_arrives_in_order_acked_one_by_one_without_waiting(int window)
    {
        await using var relay = await TestRelay.StartAsync();
        await using var recipient = await relay.ConnectAsync();
        await using var sender = await relay.ConnectAsync();
        var queue = await recipient.CreateQueueAsync();
        int total = Math.Min(3 * window + 5, 128);   // 128: the relay's limit per queue
        await SendAllAsync(sender, queue, 1, total);

        await recipient.SubscribeAsync(queue, window);
        var acks = new List<Task>();
        for (int i = 1; i <= total; i++)
        {
            var d = await NextDeliveryAsync(recipient);
            await Assert.That(Number(d)).IsEqualTo(i);
            acks.Add(recipient.AckAsync(queue, d.MessageId));
        }
        await ObserveAsync(acks);
        await Assert.That(await NothingArrivesAsync(recipient, TimeSpan.FromMilliseconds(200))).IsTrue();
        await AssertDrainedAsync(relay, recipient, queue);
    }

    [Test]
    [Arguments(2)]
    [Arguments(32)]
    public async Task Messages_sent_while_subscribed_arrive_acked_through_in_batches(int window)
    {
        await using var relay = await TestRelay.StartAsync();
        await using var recipient = await relay.ConnectAsync();
        await using var sender = await relay.ConnectAsync();
        var queue = await recipient.CreateQueueAsync();
        const int Total = 500;
        await SendAllAsync(sender, queue, 1, window + 3);   // a backlog, then more while it drains
        await recipient.SubscribeAsync(queue, window);
        var sending = SendInOrderAsync(sender, queue, window + 4, Total - window - 3);

        // One ACK through the last message read, sent when half the window has gathered or nothing
        // more is waiting (as relay bench --ack through does).
        var acks = new List<Task>();
        int unacked = 0, next = 1;
        ulong last = 0;
        while (next <= Total)
        {
            var d = await NextDeliveryAsync(recipient);
            await Assert.That(Number(d)).IsEqualTo(next++);
            last = d.MessageId;
            if (++unacked >= Math.Max(1, window / 2) || !recipient.Events.TryPeek(out _))
            {
                acks.Add(recipient.AckThroughAsync(queue, last));
                unacked = 0;
            }
        }
        await sending;
        await ObserveAsync(acks);
        await AssertDrainedAsync(relay, recipient, queue);
    }

    [Test]
    public async Task Subscribing_again_with_other_windows_while_acks_are_in_flight_delivers_everything()
    {
        await using var relay = await TestRelay.StartAsync();
        await using var recipient = await relay.ConnectAsync();
        await using var sender = await relay.ConnectAsync();
        var queue = await recipient.CreateQueueAsync();
        const int Total = 120;
        await SendAllAsync(sender, queue, 1, Total);

        // Each delivery is acknowledged as it is read (ACK answers not awaited); every 20 deliveries
        // the queue is subscribed again with the next window, ACKs still in flight. The relay
        // delivers again from the oldest message not acknowledged, so some come twice.
        int[] windows = [4, 1, 32, 2, 64, 3];
        int w = 0;
        await recipient.SubscribeAsync(queue, windows[w]);
        var acks = new List<Task>();
        var seen = new SortedSet<int>();
        int read = 0;
        while (seen.Count < Total)
        {
            var d = await NextDeliveryAsync(recipient);
            seen.Add(Number(d));
            acks.Add(recipient.AckAsync(queue, d.MessageId));
            if (++read % 20 == 0)
            {
                await recipient.SubscribeAsync(queue, windows[++w % windows.Length]);
            }
        }
        await ObserveAsync(acks, noMsgExpected: true);
        await Assert.That(seen.First()).IsEqualTo(1);
        await Assert.That(seen.Last()).IsEqualTo(Total);

        // What a resubscription delivered again after the last ACK is still stored: acknowledge it.
        while (!await NothingArrivesAsync(recipient, TimeSpan.FromMilliseconds(300)))
        {
            acks.Add(recipient.AckAsync(queue, (await NextDeliveryAsync(recipient)).MessageId));
        }
        await ObserveAsync(acks, noMsgExpected: true);
        await AssertDrainedAsync(relay, recipient, queue);
    }
}
