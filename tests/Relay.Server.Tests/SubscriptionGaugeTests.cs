using System.Buffers.Binary;
using Relay.Protocol;
using static Relay.Server.Tests.OperationsMetrics;

namespace Relay.Server.Tests;

/// <summary><c>relay_subscriptions</c> counts the subscriptions that exist, whatever order they were taken in.</summary>
public class SubscriptionGaugeTests
{
    /// <summary>
    /// Devices of one recipient keep taking the same queues from each other (PROTOCOL.md §6), each
    /// pipelining its SUBs, while a correspondent sends: a connection subscribes a queue again before
    /// another connection's thread has ended its older subscription there. Once every connection
    /// has closed, the gauge is 0 again.
    /// </summary>
    [Test]
    public async Task The_gauge_returns_to_zero_after_connections_took_the_same_queues_from_each_other()
    {
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.Tls = false;
            o.Durable = false;
        });
        List<RawQueue> queues = [];
        await using (var setup = await RawClient.ConnectAsync(relay))
        {
            for (int i = 0; i < 50; i++)
            {
                queues.Add(await setup.CreateQueueAsync());
            }
        }

        using var stop = new CancellationTokenSource();
        var sending = Task.Run(async () =>
        {
            await using var sender = await RawClient.ConnectAsync(relay);
            for (int i = 0; !stop.IsCancellationRequested; i++)
            {
                // QUOTA once a queue is full: the answer does not matter, the traffic does.
                await sender.RequestAsync(sender.Send(sender.NextCorr(), queues[i % queues.Count].SenderId, "m"u8));
            }
        });
        await Task.WhenAll(Enumerable.Range(0, 4).Select(_ => Fight(relay, queues)));
        await stop.CancelAsync();
        await sending;

        await Assert.That(await EventuallyAsync(async () => Value(await ScrapeAsync(relay), "relay_connections_open") == 0)).IsTrue();
        await Assert.That(Value(await ScrapeAsync(relay), "relay_subscriptions")).IsEqualTo(0);
    }

    /// <summary>200 rounds of SUB (window 4) to every queue, each round written at once, the answers read meanwhile.</summary>
    private static async Task Fight(TestRelay relay, List<RawQueue> queues)
    {
        await using var device = await RawClient.ConnectAsync(relay);
        const uint Last = 0x7FFFFFFF;
        var reading = Task.Run(async () =>
        {
            while (await device.ReadFrameAsync() is { } frame)
            {
                if (frame.Type == FrameType.Pong && frame.Correlation == Last) return;
            }
            throw new InvalidOperationException("the relay closed the connection");
        });
        var window = new byte[2];
        BinaryPrimitives.WriteUInt16BigEndian(window, 4);
        for (int round = 0; round < 200; round++)
        {
            var frames = new List<byte>();
            foreach (var q in queues)
            {
                frames.AddRange(device.QueueCommand(FrameType.Sub, device.NextCorr(), q.RecipientId, window, q.RecipientPrivate));
            }
            await device.WriteAsync([.. frames]);
        }
        await device.WriteAsync(RawClient.Frame(FrameType.Ping, Last, []));
        await reading;
    }
}
