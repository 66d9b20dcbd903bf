using System.Security.Cryptography;

namespace Relay.Storage.Tests;

/// <summary>
/// What callers see when a batch cannot be written (the disk fails): its operations fail, nothing of
/// them stays visible, and nothing that depended on them is answered as done.
/// </summary>
public class WriteFailureTests
{
    /// <summary>Holds the store's writer in its next batch until released; then fails that batch or lets it through.</summary>
    private sealed class FaultyDisk
    {
        private readonly ManualResetEventSlim _release = new(false);
        private readonly TaskCompletionSource _held = new(TaskCreationOptions.RunContinuationsAsynchronously);
        private readonly bool _failHeldBatch;
        private int _calls;

        private FaultyDisk(bool failHeldBatch) => _failHeldBatch = failHeldBatch;

        /// <summary>Puts the faulty disk under <paramref name="store"/>'s writer.</summary>
        public static FaultyDisk Under(QueueStore store, bool failHeldBatch)
        {
            var disk = new FaultyDisk(failHeldBatch);
            store.BeforeWrite = disk.BeforeWrite;
            return disk;
        }

        private void BeforeWrite(int ops, long bytes)
        {
            if (Interlocked.Increment(ref _calls) != 1) return;
            _held.TrySetResult();
            if (!_release.Wait(TimeSpan.FromSeconds(30))) throw new TimeoutException("never released");
            if (_failHeldBatch) throw new IOException("injected write failure");
        }

        /// <summary>Until the writer is held in a batch.</summary>
        public Task HeldAsync() => _held.Task.WaitAsync(TimeSpan.FromSeconds(10));

        public void Release() => _release.Set();
    }

    [Test]
    public async Task A_failed_append_is_an_error_and_leaves_no_message()
    {
        await using TestStore t = TestStore.Create();
        QueueHandle q = await t.CreateQueueAsync();
        var disk = FaultyDisk.Under(t.Store, failHeldBatch: true);

        var append = t.Store.AppendAsync(q, 0, [1, 2, 3]).AsTask();
        await disk.HeldAsync();
        disk.Release();
        await Assert.ThrowsAsync<StoreException>(async () => await append);

        await Assert.That(q.MessageCount).IsEqualTo(0);
        await Assert.That(q.ByteCount).IsEqualTo(0);
        await Assert.That(t.Peek(q)).IsNull();
        await Assert.That(t.Store.Statistics.WriteFailures).IsEqualTo(1);

        // The store goes on: the next append is written and found after a restart.
        var next = await t.Store.AppendAsync(q, 0, [4]);
        await Assert.That(next.Status).IsEqualTo(StoreStatus.Ok);
        await t.ReopenAsync();
        q = t.Store.FindByRecipientId(q.RecipientId)!;
        await Assert.That(t.Peek(q)!.Value.Body).IsEquivalentTo(new byte[] { 4 });
    }

    [Test]
    public async Task A_retried_sender_key_is_not_confirmed_when_the_first_write_failed()
    {
        await using TestStore t = TestStore.Create();
        QueueHandle q = await t.CreateQueueAsync();
        byte[] key = RandomNumberGenerator.GetBytes(QueueHandle.KeyLength);
        var disk = FaultyDisk.Under(t.Store, failHeldBatch: true);

        // The first SKEY's write is on its way to the disk when the client, having heard nothing,
        // sends the same SKEY again: the retry waits for the first write rather than writing again.
        var first = t.Store.SecureAsync(q, key).AsTask();
        await disk.HeldAsync();
        var retry = t.Store.SecureAsync(q, key).AsTask();
        disk.Release();

        await Assert.ThrowsAsync<StoreException>(async () => await first);
        // The write it waited for was undone: the retry must not answer OK.
        await Assert.ThrowsAsync<StoreException>(async () => await retry);
        await Assert.That(q.SenderKey).IsNull();

        // A third attempt writes the key, and it survives a restart.
        await Assert.That(await t.Store.SecureAsync(q, key)).IsEqualTo(StoreStatus.Ok);
        await t.ReopenAsync();
        q = t.Store.FindByRecipientId(q.RecipientId)!;
        await Assert.That(q.SenderKey).IsEquivalentTo(key);
    }

    [Test]
    public async Task A_write_staged_after_a_failed_one_fails_with_it_and_cannot_make_it_durable()
    {
        await using TestStore t = TestStore.Create();
        QueueHandle q = await t.CreateQueueAsync();
        byte[] key = RandomNumberGenerator.GetBytes(QueueHandle.KeyLength);
        var disk = FaultyDisk.Under(t.Store, failHeldBatch: true);

        // SKEY's batch is on its way to the disk; OFF, staged meanwhile, writes the queue's record,
        // which at that moment carries the new sender key.
        var secure = t.Store.SecureAsync(q, key).AsTask();
        await disk.HeldAsync();
        var suspend = t.Store.SuspendAsync(q).AsTask();
        disk.Release();

        await Assert.ThrowsAsync<StoreException>(async () => await secure);
        var later = await Assert.ThrowsAsync<StoreException>(async () => await suspend);
        await Assert.That(later!.Message).Contains("earlier write failed");
        await Assert.That(q.SenderKey).IsNull();
        await Assert.That(q.Suspended).IsFalse();

        // On disk too: after a restart the queue is neither secured nor suspended, and takes a key.
        await t.ReopenAsync();
        q = t.Store.FindByRecipientId(q.RecipientId)!;
        await Assert.That(q.SenderKey).IsNull();
        await Assert.That(q.Suspended).IsFalse();
        byte[] other = RandomNumberGenerator.GetBytes(QueueHandle.KeyLength);
        await Assert.That(await t.Store.SecureAsync(q, other)).IsEqualTo(StoreStatus.Ok);
    }

    [Test]
    public async Task Appends_staged_after_a_failed_append_fail_too_and_the_counts_stay_true()
    {
        await using TestStore t = TestStore.Create(p => new QueueStoreOptions { Path = p, MaxMessagesPerQueue = 3 });
        QueueHandle q = await t.CreateQueueAsync();
        var disk = FaultyDisk.Under(t.Store, failHeldBatch: true);

        var first = t.Store.AppendAsync(q, 0, [1]).AsTask();
        await disk.HeldAsync();
        var second = t.Store.AppendAsync(q, 0, [2]).AsTask();
        var third = t.Store.AppendAsync(q, 0, [3]).AsTask();
        disk.Release();
        foreach (var append in new[] { first, second, third })
        {
            await Assert.ThrowsAsync<StoreException>(async () => await append);
        }
        await Assert.That(q.MessageCount).IsEqualTo(0);
        await Assert.That(q.ByteCount).IsEqualTo(0);
        await Assert.That(t.Store.Statistics.WriteFailures).IsEqualTo(1);

        // The whole quota is free again, and what is written now is all there is after a restart.
        for (byte b = 4; b <= 6; b++)
        {
            await Assert.That((await t.Store.AppendAsync(q, 0, [b])).Status).IsEqualTo(StoreStatus.Ok);
        }
        await t.ReopenAsync();
        q = t.Store.FindByRecipientId(q.RecipientId)!;
        await Assert.That(q.MessageCount).IsEqualTo(3);
        var bodies = new List<byte>();
        while (t.Peek(q) is { } m)
        {
            bodies.Add(m.Body[0]);
            await t.Store.AckAsync(q, m.Id);
        }
        await Assert.That(bodies).IsEquivalentTo(new List<byte> { 4, 5, 6 }, TUnit.Assertions.Enums.CollectionOrdering.Matching);
    }

    [Test]
    public async Task While_a_failed_write_is_undone_new_writes_are_refused_and_an_ack_refused_then_changes_nothing()
    {
        await using TestStore t = TestStore.Create();
        QueueHandle q = await t.CreateQueueAsync();
        QueueHandle other = await t.CreateQueueAsync();
        var ids = new List<ulong>();
        for (byte b = 1; b <= 3; b++)
        {
            ids.Add((await t.Store.AppendAsync(q, 0, [b])).MessageId);
        }
        // The first two are handed out, as to a subscriber with a window (the run an ACK takes from).
        await Assert.That(t.Store.TryPeekOldest(q, out var m1)).IsTrue();
        m1.Return();
        await Assert.That(t.Store.TryPeek(q, ids[0] + 1, out var m2)).IsTrue();
        m2.Return();

        var disk = FaultyDisk.Under(t.Store, failHeldBatch: true);
        Exception? refusedAck = null, refusedAppend = null;
        t.Store.WhileUndoing = () =>
        {
            try { _ = t.Store.AckAsync(q, ids[0]); } catch (Exception e) { refusedAck = e; }
            try { _ = t.Store.AppendAsync(q, 0, [9]); } catch (Exception e) { refusedAppend = e; }
        };
        var failing = t.Store.AppendAsync(other, 0, [7]).AsTask();
        await disk.HeldAsync();
        disk.Release();
        await Assert.ThrowsAsync<StoreException>(async () => await failing);
        t.Store.WhileUndoing = null;

        await Assert.That(refusedAck).IsTypeOf<StoreException>();
        await Assert.That(refusedAppend).IsTypeOf<StoreException>();
        // The refused ACK deleted nothing and left the order intact: the second message cannot be
        // acknowledged before the first, and all three arrive in order.
        await Assert.That(q.MessageCount).IsEqualTo(3);
        await Assert.That(await t.Store.AckAsync(q, ids[1])).IsEqualTo(StoreStatus.NotOldest);
        var bodies = new List<byte>();
        while (t.Peek(q) is { } m)
        {
            bodies.Add(m.Body[0]);
            await Assert.That(await t.Store.AckAsync(q, m.Id)).IsEqualTo(StoreStatus.Ok);
        }
        await Assert.That(bodies).IsEquivalentTo(new List<byte> { 1, 2, 3 }, TUnit.Assertions.Enums.CollectionOrdering.Matching);
    }

    [Test]
    public async Task A_retried_sender_key_is_confirmed_once_the_first_write_is_durable()
    {
        await using TestStore t = TestStore.Create();
        QueueHandle q = await t.CreateQueueAsync();
        byte[] key = RandomNumberGenerator.GetBytes(QueueHandle.KeyLength);
        var disk = FaultyDisk.Under(t.Store, failHeldBatch: false);

        var first = t.Store.SecureAsync(q, key).AsTask();
        await disk.HeldAsync();
        var retry = t.Store.SecureAsync(q, key).AsTask();
        await Task.Delay(100);
        // Not before the first write is done.
        await Assert.That(retry.IsCompleted).IsFalse();
        disk.Release();
        await Assert.That(await first).IsEqualTo(StoreStatus.Ok);
        await Assert.That(await retry).IsEqualTo(StoreStatus.Ok);
    }
}
