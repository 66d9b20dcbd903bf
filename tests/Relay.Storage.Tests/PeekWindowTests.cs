using System.Security.Cryptography;

namespace Relay.Storage.Tests;

/// <summary>
/// TryPeek from an id: what a subscription with a delivery window reads. Messages come out in order
/// ahead of the unacknowledged ones, ACKs stay oldest-first, and the counts the store keeps (and
/// finds again after a restart) match what is stored, whichever path an ACK takes.
/// </summary>
public class PeekWindowTests
{
    private static async Task<List<byte[]>> AppendAsync(TestStore t, QueueHandle q, int count)
    {
        var sent = new List<byte[]>();
        for (int i = 0; i < count; i++)
        {
            byte[] body = RandomNumberGenerator.GetBytes(100 + i);
            await Assert.That((await t.Store.AppendAsync(q, 0, body)).Status).IsEqualTo(StoreStatus.Ok);
            sent.Add(body);
        }
        return sent;
    }

    private static (ulong Id, byte[] Body)? PeekFrom(TestStore t, QueueHandle q, ulong from)
    {
        if (!t.Store.TryPeek(q, from, out StoredMessage message))
        {
            return null;
        }
        var result = (message.Id, message.Body.ToArray());
        message.Return();
        return result;
    }

    /// <summary>Peeks up to <paramref name="n"/> messages as a delivery window does: from <paramref name="from"/>, then each after the previous.</summary>
    private static List<(ulong Id, byte[] Body)> PeekWindow(TestStore t, QueueHandle q, ulong from, int n)
    {
        var peeked = new List<(ulong Id, byte[] Body)>();
        while (peeked.Count < n && PeekFrom(t, q, from) is { } m)
        {
            peeked.Add(m);
            from = m.Id + 1;
        }
        return peeked;
    }

    [Test]
    [Arguments(true)]
    [Arguments(false)]
    public async Task Peeks_run_ahead_of_the_unacknowledged_and_acks_stay_oldest_first(bool keepTail)
    {
        await using TestStore t = TestStore.Create();
        QueueHandle q = await t.CreateQueueAsync();
        t.Store.KeepTail(q, keepTail);
        var sent = await AppendAsync(t, q, 6);

        // A window of three: the oldest, then each the one after the last.
        var window = PeekWindow(t, q, 0, 3);
        await Assert.That(window.Count).IsEqualTo(3);
        for (int i = 0; i < 3; i++)
        {
            await Assert.That(window[i].Body.AsSpan().SequenceEqual(sent[i])).IsTrue();
        }
        var ids = window.Select(m => m.Id).ToList();
        ulong from = ids[^1] + 1;

        // Only the oldest can be acknowledged.
        await Assert.That(await t.Store.AckAsync(q, ids[1])).IsEqualTo(StoreStatus.NotOldest);
        await Assert.That(await t.Store.AckAsync(q, ids[0])).IsEqualTo(StoreStatus.Ok);
        await Assert.That(await t.Store.AckAsync(q, ids[2])).IsEqualTo(StoreStatus.NotOldest);
        await Assert.That(await t.Store.AckAsync(q, ids[0])).IsEqualTo(StoreStatus.NotOldest);

        // A GET in between reads the oldest again; the window's ACKs still work.
        await Assert.That(t.Peek(q)!.Value.Id).IsEqualTo(ids[1]);
        await Assert.That(await t.Store.AckAsync(q, ids[1])).IsEqualTo(StoreStatus.Ok);
        await Assert.That(await t.Store.AckAsync(q, ids[2])).IsEqualTo(StoreStatus.Ok);

        // The rest, three ahead again, and nothing after them.
        var rest = PeekWindow(t, q, from, 4);
        await Assert.That(rest.Count).IsEqualTo(3);
        for (int i = 0; i < 3; i++)
        {
            await Assert.That(rest[i].Body.AsSpan().SequenceEqual(sent[3 + i])).IsTrue();
        }
        ids.AddRange(rest.Select(m => m.Id));
        await Assert.That(q.MessageCount).IsEqualTo(3);
        await Assert.That(q.ByteCount).IsEqualTo(sent.Skip(3).Sum(b => (long)b.Length));
        await Assert.That(await t.Store.AckAsync(q, ids[3])).IsEqualTo(StoreStatus.Ok);

        // A restart counts what is stored from the store itself: the same.
        long bytes = q.ByteCount;
        await t.ReopenAsync();
        QueueHandle again = t.Store.FindByRecipientId(q.RecipientId)!;
        await Assert.That(again.MessageCount).IsEqualTo(2);
        await Assert.That(again.ByteCount).IsEqualTo(bytes);
        var oldest = t.Peek(again);
        await Assert.That(oldest!.Value.Body.AsSpan().SequenceEqual(sent[4])).IsTrue();
    }

    [Test]
    public async Task A_peek_past_the_newest_finds_nothing_until_the_next_append()
    {
        await using TestStore t = TestStore.Create();
        QueueHandle q = await t.CreateQueueAsync();
        t.Store.KeepTail(q, true);
        var sent = await AppendAsync(t, q, 2);
        ulong first = PeekFrom(t, q, 0)!.Value.Id;
        ulong second = PeekFrom(t, q, first + 1)!.Value.Id;
        await Assert.That(PeekFrom(t, q, second + 1)).IsNull();

        byte[] third = RandomNumberGenerator.GetBytes(50);
        await Assert.That((await t.Store.AppendAsync(q, 0, third)).Status).IsEqualTo(StoreStatus.Ok);
        var m = PeekFrom(t, q, second + 1);
        await Assert.That(m!.Value.Body.AsSpan().SequenceEqual(third)).IsTrue();
        await Assert.That(PeekFrom(t, q, 0)!.Value.Body.AsSpan().SequenceEqual(sent[0])).IsTrue();
    }

    [Test]
    [Arguments(true)]
    [Arguments(false)]
    public async Task One_ack_deletes_the_oldest_messages_through_the_named_one(bool peekFirst)
    {
        await using TestStore t = TestStore.Create();
        QueueHandle q = await t.CreateQueueAsync();
        t.Store.KeepTail(q, true);
        var sent = await AppendAsync(t, q, 8);
        var ids = PeekWindow(t, q, 0, 6).Select(m => m.Id).ToList();
        await Assert.That(ids.Count).IsEqualTo(6);
        if (!peekFirst)
        {
            // Nothing handed out in this process: the store reads the oldest to check the ids.
            await t.ReopenAsync();
            q = t.Store.FindByRecipientId(q.RecipientId)!;
        }
        // Otherwise the messages handed out (their lengths known): the ACK needs no read.
        long deletedBefore = t.Store.Statistics.MessagesDeleted;

        await Assert.That(await t.Store.AckAsync(q, ids[3], 4, out int deleted)).IsEqualTo(StoreStatus.Ok);
        await Assert.That(deleted).IsEqualTo(4);
        await Assert.That(q.MessageCount).IsEqualTo(4);
        await Assert.That(q.ByteCount).IsEqualTo(sent.Skip(4).Sum(b => (long)b.Length));
        await Assert.That(t.Store.Statistics.MessagesDeleted - deletedBefore).IsEqualTo(4);
        await Assert.That(PeekFrom(t, q, 0)!.Value.Body.AsSpan().SequenceEqual(sent[4])).IsTrue();

        // The named id must be stored and within the count from the oldest: anything else deletes
        // nothing. Deleted ones are gone.
        await Assert.That(await t.Store.AckAsync(q, ids[5], 1, out deleted)).IsEqualTo(StoreStatus.NotOldest);
        await Assert.That(deleted).IsEqualTo(0);
        await Assert.That(await t.Store.AckAsync(q, ids[3], 1, out _)).IsEqualTo(StoreStatus.NotOldest);
        await Assert.That(await t.Store.AckAsync(q, ulong.MaxValue, 8, out _)).IsEqualTo(StoreStatus.NotOldest);
        await Assert.That(q.MessageCount).IsEqualTo(4);
        // A count above what is stored up to the id is only a bound.
        await Assert.That(await t.Store.AckAsync(q, ids[5], 5, out deleted)).IsEqualTo(StoreStatus.Ok);
        await Assert.That(deleted).IsEqualTo(2);

        // On disk: two left, the oldest the seventh.
        await t.ReopenAsync();
        QueueHandle again = t.Store.FindByRecipientId(q.RecipientId)!;
        await Assert.That(again.MessageCount).IsEqualTo(2);
        await Assert.That(again.ByteCount).IsEqualTo(sent.Skip(6).Sum(b => (long)b.Length));
        await Assert.That(t.Peek(again)!.Value.Body.AsSpan().SequenceEqual(sent[6])).IsTrue();
        await Assert.That(() => t.Store.AckAsync(again, ids[5], 0, out _).AsTask()).Throws<ArgumentOutOfRangeException>();
        await Assert.That(() => t.Store.AckAsync(again, ids[5], QueueStore.MaxAckCount + 1, out _).AsTask()).Throws<ArgumentOutOfRangeException>();
    }
}
