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
    /// Two devices take the same queues from each other, round after round, each pipelining its SUBs.
    /// A device follows PROTOCOL.md §6: an END read while a SUB of the queue awaits its answer ends
    /// the subscription that SUB replaces, any other END ends its subscription. Once both connections
    /// are quiet, exactly one of them holds each queue: no END of an older subscription is written
    /// after the OK of the newer one that took the queue back.
    /// </summary>
    [Test]
    public async Task Devices_taking_queues_from_each_other_always_leave_exactly_one_subscriber_per_queue()
    {
        const int Queues = 100;
        const int Rounds = 200;
        await using var relay = await TestRelay.StartAsync(o => o.Tls = false);
        var queues = new List<RawQueue>();
        await using (var setup = await RawClient.ConnectAsync(relay))
        {
            for (int i = 0; i < Queues; i++)
            {
                var queue = await setup.CreateQueueAsync();
                queues.Add(queue);
                // Each SUB pushes a large message: a connection's output is busy while it subscribes.
                var stored = await setup.RequestAsync(setup.Send(setup.NextCorr(), queue.SenderId, new byte[60 * 1024]));
                await Assert.That(stored.Type).IsEqualTo(FrameType.Ok);
            }
        }
        var devices = new[] { new Device(await RawClient.ConnectAsync(relay), Queues), new Device(await RawClient.ConnectAsync(relay), Queues) };
        try
        {
            for (int round = 0; round < Rounds; round++)
            {
                await Task.WhenAll(devices.Select(d => d.SubscribeAllAsync(queues)));
                // Quiet: an END one connection's SUB causes is written on the other before the first
                // one's next answer, so two PING rounds on both connections bring every END in.
                for (int i = 0; i < 2; i++)
                {
                    await Task.WhenAll(devices.Select(d => d.PingAsync()));
                }
                for (int q = 0; q < Queues; q++)
                {
                    int holders = devices.Count(d => d.Subscribed[q]);
                    await Assert.That(holders).IsEqualTo(1).Because($"round {round}, queue {q}");
                }
            }
        }
        finally
        {
            foreach (var d in devices)
            {
                await d.Client.DisposeAsync();
            }
        }
    }

    /// <summary>A device's view of its subscriptions, from the frames it reads in order.</summary>
    private sealed class Device(RawClient client, int queues)
    {
        public RawClient Client { get; } = client;
        public bool[] Subscribed { get; } = new bool[queues];
        private readonly int[] _pending = new int[queues];
        private readonly Dictionary<uint, int> _subs = [];
        private readonly Dictionary<string, int> _index = [];

        public async Task SubscribeAllAsync(List<RawQueue> queues)
        {
            var frames = new List<byte>();
            for (int q = 0; q < queues.Count; q++)
            {
                _index[Convert.ToHexString(queues[q].RecipientId)] = q;
                uint corr = Client.NextCorr();
                _subs[corr] = q;
                _pending[q]++;
                frames.AddRange(Client.QueueCommand(FrameType.Sub, corr, queues[q].RecipientId, [], queues[q].RecipientPrivate));
            }
            await Client.WriteAsync([.. frames]);
            while (_subs.Count > 0)
            {
                Handle(await Client.ReadResponseAsync());
            }
        }

        public async Task PingAsync()
        {
            uint corr = Client.NextCorr();
            await Client.WriteAsync(RawClient.Frame(FrameType.Ping, corr, []));
            RawFrame frame;
            while ((frame = await Client.ReadResponseAsync()).Type != FrameType.Pong || frame.Correlation != corr)
            {
                Handle(frame);
            }
        }

        private void Handle(RawFrame frame)
        {
            if (frame.Type == FrameType.Msg && frame.Correlation == 0)
            {
                return;
            }
            if (frame.Type == FrameType.End)
            {
                int q = _index[Convert.ToHexString(frame.Payload)];
                if (_pending[q] == 0)
                {
                    Subscribed[q] = false;
                }
                return;
            }
            if (!_subs.Remove(frame.Correlation, out int sub) || frame.Type != FrameType.Ok)
            {
                throw new InvalidOperationException($"unexpected {frame}");
            }
            _pending[sub]--;
            Subscribed[sub] = true;
        }
    }

    /// <summary>
    /// Another device deletes the queues while this one subscribes to them, every command pipelined:
    /// each SUB is refused (AUTH, or INTERNAL while the DEL is being written, and AUTH when tried
    /// again), or answered OK and followed by END. No subscriber is left waiting on a queue that no
    /// longer exists.
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
        var retried = new List<RawQueue>();
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
                // AUTH, or INTERNAL (try again) while the queue's DEL was being written.
                await Assert.That(frame.Error is ErrorCode.Auth or ErrorCode.Internal).IsTrue();
                if (frame.Error == ErrorCode.Internal)
                {
                    retried.Add(subs[frame.Correlation]);
                }
            }
        }
        // ReadResponseAsync throws after 10 s without a frame: a SUB answered OK and never ended fails the test there.
        await Assert.That(ended.IsSupersetOf(subscribed)).IsTrue();
        // Every DEL is durable now (answered OK): a SUB told to try again is refused for good.
        foreach (var q in retried)
        {
            await device.WriteAsync(device.QueueCommand(FrameType.Sub, device.NextCorr(), q.RecipientId, [], q.RecipientPrivate));
            await Assert.That((await device.ReadResponseAsync()).Error).IsEqualTo(ErrorCode.Auth);
        }
    }
}
