using System.Text;
using Relay.Client.Transport;
using Relay.Protocol;

namespace Relay.Server.Tests;

public class QueueLifecycleTests
{
    private static async Task<Delivery> NextDeliveryAsync(RelayConnection connection, TimeSpan? timeout = null)
    {
        using var cts = new CancellationTokenSource(timeout ?? TimeSpan.FromSeconds(10));
        while (true)
        {
            var e = await connection.Events.ReadAsync(cts.Token);
            if (e is DeliveryEvent d) return d.Delivery;
        }
    }

    [Test]
    [Arguments(true)]
    [Arguments(false)]
    public async Task Full_lifecycle_create_secure_send_subscribe_ack_get_suspend_delete(bool tls)
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = tls);
        await using var recipient = await relay.ConnectAsync();
        await using var sender = await relay.ConnectAsync();

        var queue = await recipient.CreateQueueAsync();
        await Assert.That(queue.RecipientId.SequenceEqual(queue.SenderId)).IsFalse();

        var senderKey = new byte[32];
        RelayCrypto.GenerateKeyPair(senderKey, new byte[32]);
        await sender.SecureAsync(queue.SenderId, senderKey);
        var secured = new SenderQueue(queue.SenderId, senderKey);

        await sender.SendAsync(secured, Encoding.UTF8.GetBytes("first"));
        await sender.SendAsync(secured, Encoding.UTF8.GetBytes("second"));

        await recipient.SubscribeAsync(queue);
        var first = await NextDeliveryAsync(recipient);
        await Assert.That(Encoding.UTF8.GetString(first.Body)).IsEqualTo("first");
        await recipient.AckAsync(queue, first.MessageId);
        var second = await NextDeliveryAsync(recipient);
        await Assert.That(Encoding.UTF8.GetString(second.Body)).IsEqualTo("second");
        await Assert.That(second.MessageId).IsGreaterThan(first.MessageId);
        await recipient.AckAsync(queue, second.MessageId);

        await sender.SendAsync(secured, Encoding.UTF8.GetBytes("live"));
        var live = await NextDeliveryAsync(recipient);
        await Assert.That(Encoding.UTF8.GetString(live.Body)).IsEqualTo("live");

        var polled = await recipient.GetAsync(queue);
        await Assert.That(polled).IsNotNull();
        await Assert.That(polled!.MessageId).IsEqualTo(live.MessageId);
        await recipient.AckAsync(queue, live.MessageId);
        await Assert.That(await recipient.GetAsync(queue)).IsNull();

        await recipient.SuspendAsync(queue);
        var suspended = await Assert.ThrowsAsync<RelayErrorException>(() => sender.SendAsync(secured, new byte[] { 1 }));
        await Assert.That(suspended!.Code).IsEqualTo(ErrorCode.Auth);

        await recipient.DeleteAsync(queue);
        var deleted = await Assert.ThrowsAsync<RelayErrorException>(() => recipient.GetAsync(queue));
        await Assert.That(deleted!.Code).IsEqualTo(ErrorCode.Auth);
    }
}
