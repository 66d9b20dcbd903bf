using System.Text;
using Relay.Protocol;
using Relay.Storage;
using static Relay.Server.Tests.OperationsMetrics;

namespace Relay.Server.Tests;

/// <summary>
/// The store's file system fills up under a serving relay (simulated: the writer's test hook throws
/// what RocksDB throws for ENOSPC; tests/e2e/diskfull.sh fills a real one under the published
/// binary). Senders hear FULL (retry later) rather than INTERNAL, the log says it once, a subscriber
/// whose ACK cannot be written is not pushed the same messages again and again, and everything
/// goes on by itself once space returns.
/// </summary>
public class DiskFullTests
{
    /// <summary>What RocksDB reports when a write meets ENOSPC, as the store classifies it.</summary>
    internal static StoreException NoSpace() =>
        Relay.Storage.Native.RocksDb.Error("IO error: No space left on device: While appending to file: 000042.sst: No space left on device");

    private static byte[] Ack(RawClient recipient, RawQueue queue, uint corr, ulong id) =>
        recipient.QueueCommand(FrameType.Ack, corr, queue.RecipientId, RawClient.U64(id), queue.RecipientPrivate);

    private static async Task<(ulong Id, string Text)> NextMessageAsync(RawClient recipient, RawQueue queue)
    {
        var frame = await recipient.ReadFrameAsync();
        await Assert.That(frame?.Type).IsEqualTo(FrameType.Msg);
        var (id, _, body) = RawClient.Open(queue, frame!.Payload);
        return (id, Encoding.UTF8.GetString(body));
    }

    [Test]
    public async Task A_full_disk_answers_senders_full_logs_it_once_pauses_redelivery_and_ends_by_itself()
    {
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.Tls = false;
            o.StoreFailureTimeout = TimeSpan.FromSeconds(1);
        });
        var store = relay.Server.Store;
        store.FailedWriteProbeInterval = TimeSpan.FromMilliseconds(50);
        await using var recipient = await RawClient.ConnectAsync(relay);
        var queue = await recipient.CreateQueueAsync();
        await using var sender = await RawClient.ConnectAsync(relay);
        var sub = await recipient.RequestAsync(recipient.QueueCommand(FrameType.Sub, recipient.NextCorr(), queue.RecipientId, [], queue.RecipientPrivate));
        await Assert.That(sub.Type).IsEqualTo(FrameType.Ok);
        var ok = await sender.RequestAsync(sender.Send(sender.NextCorr(), queue.SenderId, "one"u8.ToArray()));
        await Assert.That(ok.Type).IsEqualTo(FrameType.Ok);
        var (one, text) = await NextMessageAsync(recipient, queue);
        await Assert.That(text).IsEqualTo("one");

        int full = 1;
        store.BeforeWrite = (_, _) =>
        {
            if (Volatile.Read(ref full) != 0) throw NoSpace();
        };

        // The SEND that meets the full disk, and the ones after it, hear FULL: nothing stored, retry later.
        for (int i = 0; i < 3; i++)
        {
            var refused = await sender.RequestAsync(sender.Send(sender.NextCorr(), queue.SenderId, Encoding.UTF8.GetBytes($"lost {i}")));
            await Assert.That(refused.Error).IsEqualTo(ErrorCode.Full);
        }
        var creation = await Assert.ThrowsAsync<InvalidOperationException>(async () => await sender.CreateQueueAsync());
        await Assert.That(creation!.Message).Contains("Err").And.Contains("payload=0B");

        // The ACK cannot be written: INTERNAL. The relay does not push "one" again while the disk is
        // full (the client would ACK it again, and fail again, at the speed of the round trip).
        var ack = await recipient.RequestAsync(Ack(recipient, queue, recipient.NextCorr(), one));
        await Assert.That(ack.Error).IsEqualTo(ErrorCode.Internal);
        await Assert.ThrowsAsync<TimeoutException>(async () => await recipient.ReadFrameAsync(TimeSpan.FromMilliseconds(500)));

        // One line says it, and what it means; no line per refused request. A gauge shows it.
        await Assert.That(relay.Logs.Lines.Count(l => l.Contains("disk is full"))).IsEqualTo(1);
        await Assert.That(relay.Logs.Lines.Single(l => l.Contains("disk is full"))).Contains("NEW and SEND answer FULL");
        await Assert.That(relay.Logs.Lines.Any(l => l.Contains("Store operation"))).IsFalse();
        var metrics = await ScrapeAsync(relay);
        await Assert.That(Value(metrics, "relay_store_disk_full")).IsEqualTo(1);
        await Assert.That(Value(metrics, "relay_commands_total", "command=\"send\",result=\"full\"")).IsEqualTo(3);

        // A full disk ends by itself once space is free: however long it lasts, the relay does not
        // stop for it (the store failure timeout is for failures RocksDB does not recover from).
        await Task.Delay(TimeSpan.FromSeconds(2));
        await Assert.That(store.WritesFailingFor).IsGreaterThanOrEqualTo(TimeSpan.FromSeconds(1));
        await Assert.That(relay.Server.ShutdownRequested.IsCancellationRequested).IsFalse();

        // Space returns: the relay notices by itself, says so, pushes "one" again (still stored) and
        // takes SENDs again.
        Volatile.Write(ref full, 0);
        await Assert.That(await EventuallyAsync(() => Task.FromResult(relay.Logs.Lines.Any(l => l.Contains("writes again"))), seconds: 10)).IsTrue();
        var (again, againText) = await NextMessageAsync(recipient, queue);
        await Assert.That(again).IsEqualTo(one);
        await Assert.That(againText).IsEqualTo("one");
        var acked = await recipient.RequestAsync(Ack(recipient, queue, recipient.NextCorr(), again));
        await Assert.That(acked.Type).IsEqualTo(FrameType.Ok);
        var taken = await sender.RequestAsync(sender.Send(sender.NextCorr(), queue.SenderId, "two"u8.ToArray()));
        await Assert.That(taken.Type).IsEqualTo(FrameType.Ok);
        await Assert.That((await NextMessageAsync(recipient, queue)).Text).IsEqualTo("two");
        await Assert.That(Value(await ScrapeAsync(relay), "relay_store_disk_full")).IsEqualTo(0);
    }

    /// <summary>
    /// A subscriber with a window of 3 ACKs its three messages in one write (mode 0), while the
    /// failed write is being undone (1: the undo takes 20 ms, so later ACKs are refused before they
    /// are staged or find m1 put back), or one by one 2 ms apart (2). Every answer is an error, no
    /// push comes while the disk is full, and once it has room the three messages come again.
    /// </summary>
    [Test]
    [Arguments(0)]
    [Arguments(1)]
    [Arguments(2)]
    public async Task Pipelined_acks_that_a_full_disk_refuses_are_followed_by_no_push_until_writes_work_then_by_every_message_again(int mode)
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = false);
        var store = relay.Server.Store;
        store.FailedWriteProbeInterval = TimeSpan.FromMilliseconds(100);
        await using var recipient = await RawClient.ConnectAsync(relay);
        var queue = await recipient.CreateQueueAsync();
        await using var sender = await RawClient.ConnectAsync(relay);
        foreach (string text in new[] { "m1", "m2", "m3" })
        {
            var sent = await sender.RequestAsync(sender.Send(sender.NextCorr(), queue.SenderId, Encoding.UTF8.GetBytes(text)));
            await Assert.That(sent.Type).IsEqualTo(FrameType.Ok);
        }
        var sub = await recipient.RequestAsync(recipient.QueueCommand(FrameType.Sub, recipient.NextCorr(), queue.RecipientId, [0, 3], queue.RecipientPrivate));
        await Assert.That(sub.Type).IsEqualTo(FrameType.Ok);
        var ids = new List<ulong>();
        for (int i = 0; i < 3; i++)
        {
            ids.Add((await NextMessageAsync(recipient, queue)).Id);
        }

        int full = 1;
        store.BeforeWrite = (_, _) =>
        {
            if (Volatile.Read(ref full) != 0) throw NoSpace();
        };
        if (mode == 1) store.WhileUndoing = () => Thread.Sleep(20);
        if (mode == 2)
        {
            foreach (ulong id in ids)
            {
                await recipient.WriteAsync(Ack(recipient, queue, recipient.NextCorr(), id));
                await Task.Delay(2);
            }
        }
        else
        {
            await recipient.WriteAsync(ids.SelectMany(id => Ack(recipient, queue, recipient.NextCorr(), id)).ToArray());
        }
        var answers = new List<RawFrame>();
        for (int i = 0; i < 3; i++)
        {
            answers.Add((await recipient.ReadFrameAsync())!);
        }
        await Assert.That(answers.All(a => a.Type == FrameType.Err)).IsTrue().Because(string.Join(", ", answers));
        await Assert.ThrowsAsync<TimeoutException>(async () => await recipient.ReadFrameAsync(TimeSpan.FromMilliseconds(600)));

        Volatile.Write(ref full, 0);
        var again = new List<string>();
        for (int i = 0; i < 3; i++)
        {
            again.Add((await NextMessageAsync(recipient, queue)).Text);
        }
        await Assert.That(again).IsEquivalentTo(new[] { "m1", "m2", "m3" });
    }
}
