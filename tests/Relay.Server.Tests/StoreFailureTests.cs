using System.Text;
using Relay.Protocol;
using Relay.Storage;
using static Relay.Server.Tests.OperationsMetrics;

namespace Relay.Server.Tests;

/// <summary>
/// A store that fails to read the next message for a subscriber after a request of the same flow
/// succeeded (SEND, ACK) or failed (an ACK's write): the request gets exactly one answer (PROTOCOL.md
/// §3, one response per correlation id), the failure is logged, and the connection goes on.
/// </summary>
public class StoreFailureTests
{
    private static void EveryDeliveryReadFromTheStore(RelayServerOptions o)
    {
        o.Tls = false;
        o.DeliveryMemoryBytes = 0;   // no delivery is served from memory: each one reads the store
    }

    private static void FailReads(TestRelay relay) =>
        relay.Server.Store.BeforeRead = () => throw new StoreException("injected read failure");

    /// <summary>
    /// PING, then every frame up to its PONG and any that follows within 300 ms: a second answer to an
    /// earlier request is written right after its first, so it is among them.
    /// </summary>
    private static async Task<List<RawFrame>> FramesUntilQuietAsync(RawClient client)
    {
        uint ping = client.NextCorr();
        await client.WriteAsync(RawClient.Frame(FrameType.Ping, ping, []));
        var frames = new List<RawFrame>();
        RawFrame? frame;
        do
        {
            frame = await client.ReadFrameAsync() ?? throw new InvalidOperationException("the relay closed the connection");
            frames.Add(frame);
        }
        while (frame.Type != FrameType.Pong || frame.Correlation != ping);
        try
        {
            while (await client.ReadFrameAsync(TimeSpan.FromMilliseconds(300)) is { } late)
            {
                frames.Add(late);
            }
        }
        catch (TimeoutException)
        {
        }
        return frames;
    }

    private static async Task<RawFrame> SubscribeAsync(RawClient recipient, RawQueue queue)
    {
        var answer = await recipient.RequestAsync(recipient.QueueCommand(FrameType.Sub, recipient.NextCorr(), queue.RecipientId, [], queue.RecipientPrivate));
        await Assert.That(answer.Type).IsEqualTo(FrameType.Ok);
        return answer;
    }

    private static async Task SendAsync(RawClient sender, RawQueue queue, string text)
    {
        var answer = await sender.RequestAsync(sender.Send(sender.NextCorr(), queue.SenderId, Encoding.UTF8.GetBytes(text)));
        await Assert.That(answer.Type).IsEqualTo(FrameType.Ok);
    }

    private static async Task<(ulong Id, string Text)> NextMessageAsync(RawClient recipient, RawQueue queue)
    {
        var frame = await recipient.ReadFrameAsync();
        await Assert.That(frame?.Type).IsEqualTo(FrameType.Msg);
        var (id, _, body) = RawClient.Open(queue, frame!.Payload);
        return (id, Encoding.UTF8.GetString(body));
    }

    private static byte[] Ack(RawClient recipient, RawQueue queue, uint corr, ulong id) =>
        recipient.QueueCommand(FrameType.Ack, corr, queue.RecipientId, RawClient.U64(id), queue.RecipientPrivate);

    private static byte[] Get(RawClient recipient, RawQueue queue) =>
        recipient.QueueCommand(FrameType.Get, recipient.NextCorr(), queue.RecipientId, [], queue.RecipientPrivate);

    /// <summary>A relay whose writer tries a failed write again every <paramref name="probeInterval"/>, a queue, its recipient and a sender that stored <paramref name="messages"/>.</summary>
    private sealed class FailingDisk : IAsyncDisposable
    {
        public required TestRelay Relay { get; init; }
        public required RawClient Recipient { get; init; }
        public required RawQueue Queue { get; init; }
        public required RawClient Sender { get; init; }

        public static async Task<FailingDisk> StartAsync(TimeSpan probeInterval, params string[] messages)
        {
            var relay = await TestRelay.StartAsync(o => o.Tls = false);
            relay.Server.Store.FailedWriteProbeInterval = probeInterval;
            var recipient = await RawClient.ConnectAsync(relay);
            var queue = await recipient.CreateQueueAsync();
            var sender = await RawClient.ConnectAsync(relay);
            foreach (string text in messages)
            {
                await SendAsync(sender, queue, text);
            }
            return new FailingDisk { Relay = relay, Recipient = recipient, Queue = queue, Sender = sender };
        }

        public async ValueTask DisposeAsync()
        {
            await Sender.DisposeAsync();
            await Recipient.DisposeAsync();
            await Relay.DisposeAsync();
        }
    }

    private static Task<bool> LoggedAsync(TestRelay relay, string text) =>
        EventuallyAsync(() => Task.FromResult(relay.Logs.Lines.Any(l => l.Contains(text))), seconds: 10);

    [Test]
    public async Task A_delivery_that_reads_the_store_is_not_read_on_the_writer_thread_and_still_arrives()
    {
        await using var relay = await TestRelay.StartAsync(EveryDeliveryReadFromTheStore);
        await using var recipient = await RawClient.ConnectAsync(relay);
        var queue = await recipient.CreateQueueAsync();
        await using var sender = await RawClient.ConnectAsync(relay);
        var readers = new System.Collections.Concurrent.ConcurrentQueue<string?>();
        relay.Server.Store.BeforeRead = () => readers.Enqueue(Thread.CurrentThread.Name);
        await SubscribeAsync(recipient, queue);
        for (int i = 0; i < 20; i++)
        {
            // One at a time: each SEND is a batch of its own, answered by the store's writer thread,
            // which pushes the message to the waiting subscriber; the push reads the message back.
            await SendAsync(sender, queue, $"m{i}");
            var (id, text) = await NextMessageAsync(recipient, queue);
            await Assert.That(text).IsEqualTo($"m{i}");
            var ack = await recipient.RequestAsync(Ack(recipient, queue, recipient.NextCorr(), id));
            await Assert.That(ack.Type).IsEqualTo(FrameType.Ok);
        }
        // Every delivery read the store, and none of those reads held up the writer (and with it
        // every connection's next commit).
        await Assert.That(readers.Count).IsGreaterThanOrEqualTo(20);
        await Assert.That(readers.Count(name => name == "Relay.Storage writer")).IsEqualTo(0);
    }

    [Test]
    public async Task A_send_whose_delivery_the_store_fails_to_read_is_answered_once_and_the_failure_logged()
    {
        await using var relay = await TestRelay.StartAsync(EveryDeliveryReadFromTheStore);
        await using var recipient = await RawClient.ConnectAsync(relay);
        var queue = await recipient.CreateQueueAsync();
        await SubscribeAsync(recipient, queue);

        // The message is written (OK); reading it for the subscriber fails.
        FailReads(relay);
        await using var sender = await RawClient.ConnectAsync(relay);
        uint send = sender.NextCorr();
        await sender.WriteAsync(sender.Send(send, queue.SenderId, "one"u8));
        var first = await sender.ReadResponseAsync();
        await Assert.That(first.Correlation).IsEqualTo(send);
        await Assert.That(first.Type).IsEqualTo(FrameType.Ok);
        var rest = await FramesUntilQuietAsync(sender);
        await Assert.That(rest.Where(f => f.Correlation == send)).IsEmpty();
        await Assert.That(await LoggedAsync(relay, "Store operation SUB failed: injected read failure")).IsTrue();
        await Assert.That(relay.Logs.Lines.Any(l => l.Contains("Store operation SEND failed"))).IsFalse();
        await Assert.That(Value(await ScrapeAsync(relay), "relay_store_read_failures_total")).IsGreaterThanOrEqualTo(1);

        // The message stays stored and goes out with the queue's next message.
        relay.Server.Store.BeforeRead = null;
        await SendAsync(sender, queue, "two");
        await Assert.That((await NextMessageAsync(recipient, queue)).Text).IsEqualTo("one");
    }

    [Test]
    public async Task An_ack_whose_next_delivery_the_store_fails_to_read_is_answered_once_and_the_connection_goes_on()
    {
        await using var relay = await TestRelay.StartAsync(EveryDeliveryReadFromTheStore);
        await using var recipient = await RawClient.ConnectAsync(relay);
        var queue = await recipient.CreateQueueAsync();
        await using var sender = await RawClient.ConnectAsync(relay);
        await SendAsync(sender, queue, "m1");
        await SendAsync(sender, queue, "m2");
        await SubscribeAsync(recipient, queue);
        var (m1, _) = await NextMessageAsync(recipient, queue);

        // The ACK is accepted (and then written); reading m2, released by it, fails.
        FailReads(relay);
        uint ack = recipient.NextCorr();
        await recipient.WriteAsync(Ack(recipient, queue, ack, m1));
        var frames = await FramesUntilQuietAsync(recipient);
        var answers = frames.Where(f => f.Correlation == ack).ToList();
        await Assert.That(answers.Count).IsEqualTo(1);
        await Assert.That(answers[0].Type).IsEqualTo(FrameType.Ok);
        await Assert.That(await LoggedAsync(relay, "Store operation SUB failed: injected read failure")).IsTrue();

        // m2 stays stored and goes out with the queue's next message.
        relay.Server.Store.BeforeRead = null;
        await SendAsync(sender, queue, "m3");
        await Assert.That((await NextMessageAsync(recipient, queue)).Text).IsEqualTo("m2");
    }

    [Test]
    public async Task An_ack_whose_write_fails_and_whose_redelivery_the_store_fails_to_read_is_answered_once_and_both_failures_logged()
    {
        await using var relay = await TestRelay.StartAsync(EveryDeliveryReadFromTheStore);
        await using var recipient = await RawClient.ConnectAsync(relay);
        var queue = await recipient.CreateQueueAsync();
        await using var sender = await RawClient.ConnectAsync(relay);
        await SendAsync(sender, queue, "m1");
        await SubscribeAsync(recipient, queue);
        var (m1, _) = await NextMessageAsync(recipient, queue);

        // The ACK's write fails (INTERNAL); delivering m1 again from the oldest then fails to read.
        int writes = 0;
        relay.Server.Store.BeforeWrite = (_, _) =>
        {
            if (Interlocked.Increment(ref writes) == 1) throw new IOException("injected write failure");
        };
        FailReads(relay);
        uint ack = recipient.NextCorr();
        await recipient.WriteAsync(Ack(recipient, queue, ack, m1));
        var first = await recipient.ReadResponseAsync();
        await Assert.That(first.Correlation).IsEqualTo(ack);
        await Assert.That(first.Error).IsEqualTo(ErrorCode.Internal);
        var rest = await FramesUntilQuietAsync(recipient);
        await Assert.That(rest.Where(f => f.Correlation == ack)).IsEmpty();
        await Assert.That(relay.Logs.Lines.Any(l => l.Contains("Store operation ACK failed: The write failed: injected write failure"))).IsTrue();
        await Assert.That(await LoggedAsync(relay, "Store operation SUB failed: injected read failure")).IsTrue();

        // m1, still stored, goes out again with the queue's next message.
        relay.Server.Store.BeforeWrite = null;
        relay.Server.Store.BeforeRead = null;
        await SendAsync(sender, queue, "m2");
        await Assert.That((await NextMessageAsync(recipient, queue)).Text).IsEqualTo("m1");
    }

    [Test]
    public async Task A_get_the_store_fails_to_read_is_answered_internal_and_the_connection_goes_on()
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = false);
        await using var recipient = await RawClient.ConnectAsync(relay);
        var queue = await recipient.CreateQueueAsync();
        await using var sender = await RawClient.ConnectAsync(relay);
        await SendAsync(sender, queue, "m1");

        FailReads(relay);
        uint get = recipient.NextCorr();
        await recipient.WriteAsync(recipient.QueueCommand(FrameType.Get, get, queue.RecipientId, [], queue.RecipientPrivate));
        var frames = await FramesUntilQuietAsync(recipient);
        var answers = frames.Where(f => f.Correlation == get).ToList();
        await Assert.That(answers.Count).IsEqualTo(1);
        await Assert.That(answers[0].Error).IsEqualTo(ErrorCode.Internal);
        await Assert.That(relay.Logs.Lines.Any(l => l.Contains("Store operation GET failed: injected read failure"))).IsTrue();
        await Assert.That(Value(await ScrapeAsync(relay), "relay_store_read_failures_total")).IsEqualTo(1);

        relay.Server.Store.BeforeRead = null;
        var again = await recipient.RequestAsync(recipient.QueueCommand(FrameType.Get, recipient.NextCorr(), queue.RecipientId, [], queue.RecipientPrivate));
        await Assert.That(again.Type).IsEqualTo(FrameType.Msg);
        await Assert.That(Encoding.UTF8.GetString(RawClient.Open(queue, again.Payload).Body)).IsEqualTo("m1");
    }

    [Test]
    public async Task Commands_whose_queue_the_store_fails_to_look_up_are_answered_internal_and_the_connection_goes_on()
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = false);
        RawQueue queue;
        await using (var creator = await RawClient.ConnectAsync(relay))
        {
            queue = await creator.CreateQueueAsync();
        }
        // Started again, the relay holds no queue in memory: a command naming one looks it up in the store.
        await relay.RestartAsync();
        relay.Server.Store.BeforeLookupRead = () => throw new StoreException("injected lookup failure");
        await using var client = await RawClient.ConnectAsync(relay);
        uint send = client.NextCorr(), sub = client.NextCorr();
        await client.WriteAsync(client.Send(send, queue.SenderId, "m1"u8));
        await client.WriteAsync(client.QueueCommand(FrameType.Sub, sub, queue.RecipientId, [], queue.RecipientPrivate));

        // Each request gets its one answer, INTERNAL, and the PING after them its PONG.
        var frames = await FramesUntilQuietAsync(client);
        var sendAnswers = frames.Where(f => f.Correlation == send).ToList();
        var subAnswers = frames.Where(f => f.Correlation == sub).ToList();
        await Assert.That(sendAnswers.Count).IsEqualTo(1);
        await Assert.That(sendAnswers[0].Error).IsEqualTo(ErrorCode.Internal);
        await Assert.That(subAnswers.Count).IsEqualTo(1);
        await Assert.That(subAnswers[0].Error).IsEqualTo(ErrorCode.Internal);
        await Assert.That(await LoggedAsync(relay, "Store operation SEND failed: injected lookup failure")).IsTrue();
        await Assert.That(await LoggedAsync(relay, "Store operation SUB failed: injected lookup failure")).IsTrue();
        var metrics = await ScrapeAsync(relay);
        await Assert.That(Value(metrics, "relay_commands_total", "command=\"send\",result=\"internal\"")).IsEqualTo(1);
        await Assert.That(Value(metrics, "relay_commands_total", "command=\"sub\",result=\"internal\"")).IsEqualTo(1);

        // The store reads again: the same connection sends, subscribes and receives.
        relay.Server.Store.BeforeLookupRead = null;
        await SendAsync(client, queue, "m2");
        await SubscribeAsync(client, queue);
        await Assert.That((await NextMessageAsync(client, queue)).Text).IsEqualTo("m2");
    }

    [Test]
    public async Task A_disk_that_fails_every_write_is_logged_once_per_command_and_ten_seconds_with_a_count_of_the_rest()
    {
        var clock = new OperationsClock();
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.Tls = false;
            o.Clock = clock;
        });
        await using var recipient = await RawClient.ConnectAsync(relay);
        var queue = await recipient.CreateQueueAsync();
        await using var sender = await RawClient.ConnectAsync(relay);
        relay.Server.Store.BeforeWrite = (_, _) => throw new IOException("injected write failure");

        for (int i = 0; i < 5; i++)
        {
            var answer = await sender.RequestAsync(sender.Send(sender.NextCorr(), queue.SenderId, "m"u8.ToArray()));
            await Assert.That(answer.Error).IsEqualTo(ErrorCode.Internal);
        }
        var lines = relay.Logs.Lines.Where(l => l.Contains("Store operation SEND failed")).ToList();
        await Assert.That(lines.Count).IsEqualTo(1);
        await Assert.That(lines[0]).Contains("Store operation SEND failed: The write failed: injected write failure");

        // Ten seconds on, the next failure is logged with the count of the ones left out.
        clock.Advance(TimeSpan.FromSeconds(11));
        var last = await sender.RequestAsync(sender.Send(sender.NextCorr(), queue.SenderId, "m"u8.ToArray()));
        await Assert.That(last.Error).IsEqualTo(ErrorCode.Internal);
        lines = relay.Logs.Lines.Where(l => l.Contains("Store operation SEND failed")).ToList();
        await Assert.That(lines.Count).IsEqualTo(2);
        await Assert.That(lines[1]).Contains("(4 more failures of SEND since the last such line, not logged)");
        await Assert.That(Value(await ScrapeAsync(relay), "relay_commands_total", "command=\"send\",result=\"internal\"")).IsEqualTo(6);
    }

    [Test]
    public async Task A_store_that_fails_every_write_for_the_store_failure_timeout_stops_the_relay_as_a_failure()
    {
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.Tls = false;
            o.StoreFailureTimeout = TimeSpan.FromSeconds(2);
        });
        relay.Server.Store.FailedWriteProbeInterval = TimeSpan.FromMilliseconds(100);
        await using var recipient = await RawClient.ConnectAsync(relay);
        var queue = await recipient.CreateQueueAsync();
        await using var sender = await RawClient.ConnectAsync(relay);

        // A failure that passes (the writer's next try succeeds) does not stop the relay.
        int failures = 1;
        relay.Server.Store.BeforeWrite = (_, _) =>
        {
            if (Interlocked.Decrement(ref failures) >= 0) throw new IOException("injected write failure");
        };
        var failed = await sender.RequestAsync(sender.Send(sender.NextCorr(), queue.SenderId, "m1"u8.ToArray()));
        await Assert.That(failed.Error).IsEqualTo(ErrorCode.Internal);
        await Task.Delay(TimeSpan.FromSeconds(3));
        await Assert.That(relay.Server.ShutdownRequested.IsCancellationRequested).IsFalse();
        await SendAsync(sender, queue, "m2");

        // Every write fails from now on (RocksDB stays in error after an I/O error until it is opened
        // again): after the timeout the relay says so once and stops, as a failure.
        relay.Server.Store.BeforeWrite = (_, _) => throw new IOException("injected write failure");
        var refused = await sender.RequestAsync(sender.Send(sender.NextCorr(), queue.SenderId, "m3"u8.ToArray()));
        await Assert.That(refused.Error).IsEqualTo(ErrorCode.Internal);
        await Assert.That(relay.Server.ShutdownRequested.IsCancellationRequested).IsFalse();
        await Assert.That(await EventuallyAsync(() => Task.FromResult(relay.Server.ShutdownRequested.IsCancellationRequested), seconds: 10)).IsTrue();
        await Assert.That(relay.Server.StoppedForStoreFailure).IsTrue();
        var lines = relay.Logs.Lines.Where(l => l.Contains("[33]")).ToList();
        await Assert.That(lines.Count).IsEqualTo(1);
        await Assert.That(lines[0]).Contains("failed every write for 2 s, and not for a full disk (").And.Contains("injected write failure): the relay stops with exit code 1");
    }

    [Test]
    public async Task An_ack_that_a_failing_disk_refuses_is_not_followed_by_the_same_pushes_again_until_writes_work()
    {
        await using var setup = await FailingDisk.StartAsync(TimeSpan.FromMilliseconds(100), "m1");
        var (relay, recipient, queue) = (setup.Relay, setup.Recipient, setup.Queue);
        await SubscribeAsync(recipient, queue);
        var (m1, _) = await NextMessageAsync(recipient, queue);

        // Every write fails (an I/O error, not a full disk): the ACK is answered INTERNAL, and m1 is
        // not pushed again while writes keep failing (each push would be ACKed and fail once more).
        relay.Server.Store.BeforeWrite = (_, _) => throw new IOException("injected write failure");
        var ack = await recipient.RequestAsync(Ack(recipient, queue, recipient.NextCorr(), m1));
        await Assert.That(ack.Error).IsEqualTo(ErrorCode.Internal);
        await Assert.ThrowsAsync<TimeoutException>(async () => await recipient.ReadFrameAsync(TimeSpan.FromMilliseconds(600)));

        // Writes work again: the writer's next try succeeds, the subscription starts again from m1.
        relay.Server.Store.BeforeWrite = null;
        var (again, text) = await NextMessageAsync(recipient, queue);
        await Assert.That(again).IsEqualTo(m1);
        await Assert.That(text).IsEqualTo("m1");
        var acked = await recipient.RequestAsync(Ack(recipient, queue, recipient.NextCorr(), again));
        await Assert.That(acked.Type).IsEqualTo(FrameType.Ok);
    }

    /// <summary>
    /// A connection without a subscription (a GET client) acknowledges a message and the disk refuses
    /// it; then it subscribes. The INTERNAL answer restarts no subscription (there was none), so the
    /// one made after it is not started again once writes work: that would push the message again
    /// into a window the client counts as full (PROTOCOL.md §7).
    /// </summary>
    [Test]
    public async Task An_ack_that_the_disk_refuses_on_a_connection_without_a_subscription_does_not_restart_the_subscription_it_makes_next()
    {
        await using var setup = await FailingDisk.StartAsync(TimeSpan.FromMilliseconds(100), "m1");
        var (relay, recipient, queue) = (setup.Relay, setup.Recipient, setup.Queue);
        var got = await recipient.RequestAsync(Get(recipient, queue));
        ulong m1 = RawClient.Open(queue, got.Payload).Id;

        // Every write fails: the ACK is answered INTERNAL, and m1 stays stored.
        relay.Server.Store.BeforeWrite = (_, _) => throw new IOException("injected write failure");
        var ack = await recipient.RequestAsync(Ack(recipient, queue, recipient.NextCorr(), m1));
        await Assert.That(ack.Error).IsEqualTo(ErrorCode.Internal);

        // The subscription made next starts from m1 and fills its window of 1.
        await SubscribeAsync(recipient, queue);
        var (pushed, _) = await NextMessageAsync(recipient, queue);
        await Assert.That(pushed).IsEqualTo(m1);

        // Writes work again: nothing more comes until m1 is acknowledged.
        relay.Server.Store.BeforeWrite = null;
        await Assert.That(await EventuallyAsync(() => Task.FromResult(relay.Server.Store.WritesFailingFor == TimeSpan.Zero), seconds: 10)).IsTrue();
        await Assert.ThrowsAsync<TimeoutException>(async () => await recipient.ReadFrameAsync(TimeSpan.FromMilliseconds(600)));
        var acked = await recipient.RequestAsync(Ack(recipient, queue, recipient.NextCorr(), m1));
        await Assert.That(acked.Type).IsEqualTo(FrameType.Ok);
        var empty = await recipient.RequestAsync(Get(recipient, queue));
        await Assert.That(empty.Type).IsEqualTo(FrameType.Empty);
    }

    /// <summary>
    /// A subscriber's ACK is answered INTERNAL, and before writes work again it subscribes the queue
    /// again (window 1), which pushes m1 from the oldest. A GET client then deletes m1, the first write
    /// that works. The restart that INTERNAL asked for concerned the subscription the SUB replaced: the
    /// new one, its window full with m1, gets nothing more until it acknowledges m1. (Restarted, it
    /// was pushed m2, above m1, into a window the client counts as full: PROTOCOL.md §7.)
    /// </summary>
    [Test]
    public async Task An_ack_that_the_disk_refuses_does_not_restart_the_subscription_that_a_sub_repeated_after_it_made()
    {
        // The writer does not try again by itself: the GET client's ACK is the first write that works.
        await using var setup = await FailingDisk.StartAsync(TimeSpan.FromSeconds(30), "m1", "m2");
        var (relay, recipient, queue) = (setup.Relay, setup.Recipient, setup.Queue);
        await using var poller = await RawClient.ConnectAsync(relay);
        await SubscribeAsync(recipient, queue);
        var (m1, _) = await NextMessageAsync(recipient, queue);

        int failing = 1;
        relay.Server.Store.BeforeWrite = (_, _) =>
        {
            if (Volatile.Read(ref failing) != 0) throw new IOException("injected write failure");
        };
        var pushes = new List<RawFrame>();
        var ack = await recipient.RequestAsync(Ack(recipient, queue, recipient.NextCorr(), m1), pushes);
        await Assert.That(ack.Error).IsEqualTo(ErrorCode.Internal);
        var sub = await recipient.RequestAsync(recipient.QueueCommand(FrameType.Sub, recipient.NextCorr(), queue.RecipientId, [], queue.RecipientPrivate), pushes);
        await Assert.That(sub.Type).IsEqualTo(FrameType.Ok);
        var (again, _) = await NextMessageAsync(recipient, queue);
        await Assert.That(again).IsEqualTo(m1);

        var got = await poller.RequestAsync(Get(poller, queue));
        await Assert.That(RawClient.Open(queue, got.Payload).Id).IsEqualTo(m1);
        Volatile.Write(ref failing, 0);
        var deleted = await poller.RequestAsync(Ack(poller, queue, poller.NextCorr(), m1));
        await Assert.That(deleted.Type).IsEqualTo(FrameType.Ok);
        await Assert.ThrowsAsync<TimeoutException>(async () => await recipient.ReadFrameAsync(TimeSpan.FromMilliseconds(600)));

        // Its ACK of m1 finds it deleted (NO_MSG) and frees the place: m2 comes (before that answer).
        pushes.Clear();
        var gone = await recipient.RequestAsync(Ack(recipient, queue, recipient.NextCorr(), m1), pushes);
        await Assert.That(gone.Error).IsEqualTo(ErrorCode.NoMsg);
        await Assert.That(pushes.Count).IsEqualTo(1);
        var (next, _, body) = RawClient.Open(queue, pushes[0].Payload);
        await Assert.That(Encoding.UTF8.GetString(body)).IsEqualTo("m2");
        var acked = await recipient.RequestAsync(Ack(recipient, queue, recipient.NextCorr(), next));
        await Assert.That(acked.Type).IsEqualTo(FrameType.Ok);
    }
}
