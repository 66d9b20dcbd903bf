using System.Text;
using Relay.Client.Transport;
using Relay.Protocol;
using Relay.Server.Connections;
using static Relay.Server.Tests.EventWaits;

namespace Relay.Server.Tests;

/// <summary>END pushes of subscriptions that a newer one replaced.</summary>
public class SubscriptionEndTests
{
    [Test]
    public async Task The_end_of_a_replaced_subscription_is_not_written_to_a_connection_that_subscribed_the_queue_again()
    {
        await using var relay = await TestRelay.StartAsync();
        await using var recipient = await relay.ConnectAsync();
        await using var sender = await relay.ConnectAsync();
        var queue = await recipient.CreateQueueAsync();
        await recipient.SubscribeAsync(queue, 2);
        var first = (Subscription)relay.Server.Store.FindByRecipientId(queue.RecipientId)!.Tag!;

        // The connection subscribes again, and the end of its first subscription comes after that, as
        // when another device took the queue and this one took it back before the other device's
        // thread wrote the END: the newer subscription goes on, and the app hears of no end.
        await recipient.SubscribeAsync(queue, 2);
        first.Session.OnSubscriptionEnded(first, notify: true);

        await sender.SendAsync(new SenderQueue(queue.SenderId, null), Encoding.UTF8.GetBytes("after"));
        var delivery = await NextDeliveryAsync(recipient);
        await Assert.That(Encoding.UTF8.GetString(delivery.Body)).IsEqualTo("after");
        await Assert.That(recipient.IsSubscribed(queue)).IsTrue();
    }

    /// <summary>
    /// Another device deletes the queues while this one subscribes to them, every command pipelined:
    /// each SUB is refused (AUTH), or answered OK and followed by END. No subscriber is left waiting on
    /// a queue that no longer exists.
    /// </summary>
    [Test]
    public async Task A_SUB_racing_a_DEL_from_another_connection_is_refused_or_ended()
    {
        const int Queues = 100;
        await using var relay = await TestRelay.StartAsync(o => o.Tls = false);
        await using var owner = await RawClient.ConnectAsync(relay);
        await using var device = await RawClient.ConnectAsync(relay);
        var queues = new List<RawQueue>();
        for (int i = 0; i < Queues; i++)
        {
            queues.Add(await owner.CreateQueueAsync());
        }
        var subs = new Dictionary<uint, RawQueue>();
        var subFrames = new List<byte>();
        var delFrames = new List<byte>();
        foreach (var q in queues)
        {
            uint corr = device.NextCorr();
            subs[corr] = q;
            subFrames.AddRange(device.QueueCommand(FrameType.Sub, corr, q.RecipientId, [], q.RecipientPrivate));
            delFrames.AddRange(owner.QueueCommand(FrameType.Del, owner.NextCorr(), q.RecipientId, [], q.RecipientPrivate));
        }
        await Task.WhenAll(owner.WriteAsync([.. delFrames]), device.WriteAsync([.. subFrames]));
        for (int i = 0; i < Queues; i++)
        {
            await Assert.That((await owner.ReadResponseAsync()).Type).IsEqualTo(FrameType.Ok);
        }

        var subscribed = new HashSet<string>();
        var ended = new HashSet<string>();
        int answered = 0;
        while (answered < Queues || !subscribed.IsSubsetOf(ended))
        {
            var frame = await device.ReadResponseAsync();
            if (frame.Type == FrameType.End)
            {
                ended.Add(Convert.ToHexString(frame.Payload));
                continue;
            }
            await Assert.That(subs.ContainsKey(frame.Correlation)).IsTrue();
            answered++;
            if (frame.Type == FrameType.Ok)
            {
                subscribed.Add(Convert.ToHexString(subs[frame.Correlation].RecipientId));
            }
            else
            {
                await Assert.That(frame.Error).IsEqualTo(ErrorCode.Auth);
            }
        }
        // ReadResponseAsync throws after 10 s without a frame: a SUB answered OK and never ended fails the test there.
        await Assert.That(ended.IsSupersetOf(subscribed)).IsTrue();
    }
}
