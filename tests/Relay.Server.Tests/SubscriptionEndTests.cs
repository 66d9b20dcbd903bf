using System.Text;
using Relay.Client.Transport;
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
}
