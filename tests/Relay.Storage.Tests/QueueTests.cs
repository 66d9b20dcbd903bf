using System.Security.Cryptography;

namespace Relay.Storage.Tests;

public class QueueTests
{
    [Test]
    public async Task Created_queue_is_found_by_both_ids_with_its_keys()
    {
        await using TestStore t = TestStore.Create();
        byte[] rid = RandomNumberGenerator.GetBytes(24), sid = RandomNumberGenerator.GetBytes(24);
        byte[] rkey = RandomNumberGenerator.GetBytes(32), dkey = RandomNumberGenerator.GetBytes(32);
        (StoreStatus status, QueueHandle? created) = await t.Store.CreateQueueAsync(rid, sid, rkey, dkey);
        await Assert.That(status).IsEqualTo(StoreStatus.Ok);

        await Assert.That(t.Store.FindByRecipientId(rid)).IsSameReferenceAs(created);
        await Assert.That(t.Store.FindBySenderId(sid)).IsSameReferenceAs(created);
        await Assert.That(t.Store.FindByRecipientId(sid)).IsNull();
        await Assert.That(t.Store.FindBySenderId(rid)).IsNull();
        await Assert.That(t.Store.FindByRecipientId(RandomNumberGenerator.GetBytes(24))).IsNull();
        await Assert.That(t.Store.FindByRecipientId(new byte[5])).IsNull();

        await t.ReopenAsync();
        QueueHandle? loaded = t.Store.FindBySenderId(sid);
        await Assert.That(loaded).IsNotNull();
        await Assert.That(loaded!.RecipientId.SequenceEqual(rid)).IsTrue();
        await Assert.That(loaded.RecipientKey.SequenceEqual(rkey)).IsTrue();
        await Assert.That(loaded.DeliveryKey.SequenceEqual(dkey)).IsTrue();
        await Assert.That(loaded.SenderKey).IsNull();
        await Assert.That(t.Store.FindByRecipientId(rid)).IsSameReferenceAs(loaded);
    }

    [Test]
    public async Task Create_with_an_existing_id_is_a_conflict()
    {
        await using TestStore t = TestStore.Create();
        QueueHandle q = await t.CreateQueueAsync();
        byte[] key = RandomNumberGenerator.GetBytes(32);

        var sameRecipient = await t.Store.CreateQueueAsync(q.RecipientId, RandomNumberGenerator.GetBytes(24), key, key);
        var sameSender = await t.Store.CreateQueueAsync(RandomNumberGenerator.GetBytes(24), q.SenderId, key, key);
        await Assert.That(sameRecipient.Status).IsEqualTo(StoreStatus.Conflict);
        await Assert.That(sameSender.Status).IsEqualTo(StoreStatus.Conflict);

        await t.ReopenAsync();   // also when the existing queue is only on disk
        sameSender = await t.Store.CreateQueueAsync(RandomNumberGenerator.GetBytes(24), q.SenderId, key, key);
        await Assert.That(sameSender.Status).IsEqualTo(StoreStatus.Conflict);
    }

    [Test]
    public async Task Ack_deletes_the_oldest_and_peek_returns_the_next()
    {
        await using TestStore t = TestStore.Create();
        QueueHandle q = await t.CreateQueueAsync();
        AppendResult first = await t.Store.AppendAsync(q, 0, "one"u8);
        AppendResult second = await t.Store.AppendAsync(q, 1, "two"u8);
        await Assert.That(second.MessageId).IsGreaterThan(first.MessageId);
        await Assert.That(q.MessageCount).IsEqualTo(2);
        await Assert.That(q.ByteCount).IsEqualTo(6);

        var peeked = t.Peek(q)!.Value;
        await Assert.That(peeked.Id).IsEqualTo(first.MessageId);
        await Assert.That(peeked.Hour).IsEqualTo(first.Hour);
        await Assert.That(peeked.Flags).IsEqualTo((byte)0);
        await Assert.That(t.Peek(q)!.Value.Id).IsEqualTo(first.MessageId);   // peek does not consume

        await Assert.That(await t.Store.AckAsync(q, first.MessageId)).IsEqualTo(StoreStatus.Ok);
        peeked = t.Peek(q)!.Value;
        await Assert.That(peeked.Id).IsEqualTo(second.MessageId);
        await Assert.That(peeked.Flags).IsEqualTo((byte)1);
        await Assert.That(peeked.Body.SequenceEqual("two"u8.ToArray())).IsTrue();

        await Assert.That(await t.Store.AckAsync(q, second.MessageId)).IsEqualTo(StoreStatus.Ok);
        await Assert.That(t.Peek(q)).IsNull();
        await Assert.That(q.MessageCount).IsEqualTo(0);
        await Assert.That(q.ByteCount).IsEqualTo(0);
        await Assert.That(t.Store.Statistics.MessagesDeleted).IsEqualTo(2);

        await t.ReopenAsync();
        await ReloadedEmptyAsync(t, q);
    }

    [Test]
    public async Task Messages_acknowledged_while_their_writes_are_in_memory_leave_nothing_in_the_files()
    {
        await using TestStore t = TestStore.Create();
        QueueHandle q = await t.CreateQueueAsync();
        ulong last = 0;
        for (int i = 0; i < 100; i++)
        {
            last = (await t.Store.AppendAsync(q, 0, new byte[300])).MessageId;
        }
        await Assert.That(await t.Store.AckAsync(q, last, 100, out int deleted)).IsEqualTo(StoreStatus.Ok);
        await Assert.That(deleted).IsEqualTo(100);

        await t.ReopenAsync();   // closing flushes the memtables

        // Neither the 100 messages nor 100 tombstones were written to a table file.
        await Assert.That(t.Store.Property(Cf.Messages, "rocksdb.total-sst-files-size")).IsEqualTo(0);
        await ReloadedEmptyAsync(t, q);
    }

    [Test]
    public async Task Acknowledged_messages_leave_the_store_files_whether_their_write_was_flushed_before_the_ack_or_not()
    {
        await using TestStore t = TestStore.Create();
        QueueHandle q = await t.CreateQueueAsync();
        var ids = new List<ulong>();
        for (int i = 0; i < 40; i++)
        {
            ids.Add((await t.Store.AppendAsync(q, 0, new byte[300])).MessageId);
        }
        t.Store.ReclaimSpace();   // the 40 writes now in a table file
        for (int i = 0; i < 40; i++)
        {
            ids.Add((await t.Store.AppendAsync(q, 0, new byte[300])).MessageId);
        }
        // Acknowledged: the first 30 (written to a file before), then 30 of those still in memory.
        await Assert.That(await t.Store.AckAsync(q, ids[29], 30, out int deleted)).IsEqualTo(StoreStatus.Ok);
        await Assert.That(deleted).IsEqualTo(30);
        for (int i = 30; i < 60; i++)
        {
            await Assert.That(t.Peek(q)!.Value.Id).IsEqualTo(ids[i]);
            await Assert.That(await t.Store.AckAsync(q, ids[i])).IsEqualTo(StoreStatus.Ok);
        }

        await t.ReopenAsync();
        QueueHandle reloaded = t.Store.FindByRecipientId(q.RecipientId)!;
        await Assert.That(reloaded.MessageCount).IsEqualTo(20);
        await Assert.That(t.Peek(reloaded)!.Value.Id).IsEqualTo(ids[60]);
        await Assert.That(t.Store.Property(Cf.Messages, "rocksdb.estimate-num-keys")).IsLessThanOrEqualTo(20 + 40);

        // The rest acknowledged and the space reclaimed: no message and no tombstone is left in a file.
        await Assert.That(await t.Store.AckAsync(reloaded, ids[79], 20, out deleted)).IsEqualTo(StoreStatus.Ok);
        await Assert.That(deleted).IsEqualTo(20);
        t.Store.ReclaimSpace();
        await Assert.That(t.Store.Property(Cf.Messages, "rocksdb.total-sst-files-size")).IsEqualTo(0);
        await t.ReopenAsync();
        reloaded = await ReloadedEmptyAsync(t, q);
        AppendResult next = await t.Store.AppendAsync(reloaded, 0, "after"u8);
        await Assert.That(next.MessageId).IsGreaterThan(ids[79]);
        await Assert.That(t.Peek(reloaded)!.Value.Id).IsEqualTo(next.MessageId);
    }

    [Test]
    public async Task Ack_of_anything_but_the_oldest_is_refused_and_deletes_nothing()
    {
        await using TestStore t = TestStore.Create();
        QueueHandle q = await t.CreateQueueAsync();
        AppendResult first = await t.Store.AppendAsync(q, 0, "one"u8);
        AppendResult second = await t.Store.AppendAsync(q, 0, "two"u8);

        await Assert.That(await t.Store.AckAsync(q, second.MessageId)).IsEqualTo(StoreStatus.NotOldest);
        await Assert.That(await t.Store.AckAsync(q, first.MessageId + 1000)).IsEqualTo(StoreStatus.NotOldest);
        await Assert.That(q.MessageCount).IsEqualTo(2);
        await Assert.That(t.Peek(q)!.Value.Id).IsEqualTo(first.MessageId);

        await Assert.That(await t.Store.AckAsync(q, first.MessageId)).IsEqualTo(StoreStatus.Ok);
        await Assert.That(await t.Store.AckAsync(q, first.MessageId)).IsEqualTo(StoreStatus.NotOldest);   // twice
        await Assert.That(t.Peek(q)!.Value.Id).IsEqualTo(second.MessageId);
    }

    [Test]
    public async Task Empty_queue_peeks_nothing_and_refuses_acks()
    {
        await using TestStore t = TestStore.Create();
        QueueHandle q = await t.CreateQueueAsync();
        await Assert.That(t.Peek(q)).IsNull();
        await Assert.That(await t.Store.AckAsync(q, 0)).IsEqualTo(StoreStatus.NotOldest);
    }

    [Test]
    public async Task Body_is_copied_before_append_returns()
    {
        await using TestStore t = TestStore.Create();
        QueueHandle q = await t.CreateQueueAsync();
        byte[] buffer = "original"u8.ToArray();
        ValueTask<AppendResult> pending = t.Store.AppendAsync(q, 0, buffer);
        "scribble"u8.CopyTo(buffer);   // the caller reuses its buffer at once
        await pending;
        await Assert.That(t.Peek(q)!.Value.Body.SequenceEqual("original"u8.ToArray())).IsTrue();
    }

    [Test]
    public async Task Empty_and_large_bodies_round_trip()
    {
        await using TestStore t = TestStore.Create();
        QueueHandle q = await t.CreateQueueAsync();
        byte[] large = RandomNumberGenerator.GetBytes(65_000);
        await t.Store.AppendAsync(q, 0, []);
        await t.Store.AppendAsync(q, 0, large);
        var empty = t.Peek(q)!.Value;
        await Assert.That(empty.Body.Length).IsEqualTo(0);
        await t.Store.AckAsync(q, empty.Id);
        await Assert.That(t.Peek(q)!.Value.Body.SequenceEqual(large)).IsTrue();
        await Assert.That(q.ByteCount).IsEqualTo(65_000);
    }

    [Test]
    public async Task Secure_sets_the_key_once_and_accepts_only_the_same_key_again()
    {
        await using TestStore t = TestStore.Create();
        QueueHandle q = await t.CreateQueueAsync();
        byte[] key = RandomNumberGenerator.GetBytes(32);

        await Assert.That(await t.Store.SecureAsync(q, key)).IsEqualTo(StoreStatus.Ok);
        await Assert.That(q.SenderKey!.SequenceEqual(key)).IsTrue();
        await Assert.That(await t.Store.SecureAsync(q, key)).IsEqualTo(StoreStatus.Ok);
        await Assert.That(await t.Store.SecureAsync(q, RandomNumberGenerator.GetBytes(32))).IsEqualTo(StoreStatus.Conflict);
        await Assert.That(q.SenderKey!.SequenceEqual(key)).IsTrue();

        await t.ReopenAsync();
        QueueHandle reloaded = t.Store.FindBySenderId(q.SenderId)!;
        await Assert.That(reloaded.SenderKey!.SequenceEqual(key)).IsTrue();
        await Assert.That(await t.Store.SecureAsync(reloaded, RandomNumberGenerator.GetBytes(32))).IsEqualTo(StoreStatus.Conflict);
        await Assert.That(await t.Store.SecureAsync(reloaded, key)).IsEqualTo(StoreStatus.Ok);
    }

    [Test]
    public async Task Suspended_queue_refuses_appends_but_keeps_its_messages()
    {
        await using TestStore t = TestStore.Create();
        QueueHandle q = await t.CreateQueueAsync();
        AppendResult stored = await t.Store.AppendAsync(q, 0, "kept"u8);

        await Assert.That(await t.Store.SuspendAsync(q)).IsEqualTo(StoreStatus.Ok);
        await Assert.That(q.Suspended).IsTrue();
        await Assert.That((await t.Store.AppendAsync(q, 0, "refused"u8)).Status).IsEqualTo(StoreStatus.Suspended);
        await Assert.That(await t.Store.SuspendAsync(q)).IsEqualTo(StoreStatus.Ok);

        await t.ReopenAsync();
        QueueHandle reloaded = t.Store.FindByRecipientId(q.RecipientId)!;
        await Assert.That(reloaded.Suspended).IsTrue();
        await Assert.That((await t.Store.AppendAsync(reloaded, 0, "refused"u8)).Status).IsEqualTo(StoreStatus.Suspended);
        await Assert.That(t.Peek(reloaded)!.Value.Id).IsEqualTo(stored.MessageId);
        await Assert.That(await t.Store.AckAsync(reloaded, stored.MessageId)).IsEqualTo(StoreStatus.Ok);
    }

    [Test]
    public async Task Delete_removes_the_queue_its_sender_index_and_its_messages()
    {
        await using TestStore t = TestStore.Create();
        QueueHandle q = await t.CreateQueueAsync();
        QueueHandle other = await t.CreateQueueAsync();
        for (int i = 0; i < 5; i++)
        {
            await t.Store.AppendAsync(q, 0, "x"u8);
        }
        AppendResult otherMessage = await t.Store.AppendAsync(other, 0, "y"u8);

        await Assert.That(await t.Store.DeleteQueueAsync(q)).IsEqualTo(StoreStatus.Ok);
        await Assert.That(q.Deleted).IsTrue();
        await Assert.That(t.Store.FindByRecipientId(q.RecipientId)).IsNull();
        await Assert.That(t.Store.FindBySenderId(q.SenderId)).IsNull();
        await Assert.That((await t.Store.AppendAsync(q, 0, "late"u8)).Status).IsEqualTo(StoreStatus.NotFound);
        await Assert.That(t.Peek(q)).IsNull();
        await Assert.That(await t.Store.DeleteQueueAsync(q)).IsEqualTo(StoreStatus.NotFound);

        await t.ReopenAsync();
        await Assert.That(t.Store.FindByRecipientId(q.RecipientId)).IsNull();
        await Assert.That(t.Store.FindBySenderId(q.SenderId)).IsNull();
        // The ids are free again, and a queue created with them starts empty.
        var recreated = await t.Store.CreateQueueAsync(q.RecipientId, q.SenderId, q.RecipientKey, q.DeliveryKey);
        await Assert.That(recreated.Status).IsEqualTo(StoreStatus.Ok);
        await Assert.That(recreated.Queue!.MessageCount).IsEqualTo(0);
        await Assert.That(t.Peek(recreated.Queue)).IsNull();
        // The neighbour is untouched.
        QueueHandle otherReloaded = t.Store.FindByRecipientId(other.RecipientId)!;
        await Assert.That(t.Peek(otherReloaded)!.Value.Id).IsEqualTo(otherMessage.MessageId);
    }

    [Test]
    public async Task Reopen_keeps_queues_messages_and_counters()
    {
        await using TestStore t = TestStore.Create();
        QueueHandle q = await t.CreateQueueAsync();
        var ids = new List<ulong>();
        for (int i = 0; i < 10; i++)
        {
            ids.Add((await t.Store.AppendAsync(q, (byte)i, new byte[i + 1])).MessageId);
        }
        await t.Store.AckAsync(q, ids[0]);
        await t.Store.AckAsync(q, ids[1]);

        await t.ReopenAsync();
        QueueHandle reloaded = t.Store.FindBySenderId(q.SenderId)!;
        await Assert.That(reloaded).IsNotSameReferenceAs(q);
        await Assert.That(reloaded.MessageCount).IsEqualTo(8);
        await Assert.That(reloaded.ByteCount).IsEqualTo(Enumerable.Range(3, 8).Sum());
        for (int i = 2; i < 10; i++)
        {
            var m = t.Peek(reloaded)!.Value;
            await Assert.That(m.Id).IsEqualTo(ids[i]);
            await Assert.That(m.Flags).IsEqualTo((byte)i);
            await Assert.That(m.Body.Length).IsEqualTo(i + 1);
            await Assert.That(await t.Store.AckAsync(reloaded, m.Id)).IsEqualTo(StoreStatus.Ok);
        }
        await Assert.That(t.Peek(reloaded)).IsNull();
    }

    [Test]
    public async Task Message_ids_are_never_reused_after_ack_all_and_reopen()
    {
        await using TestStore t = TestStore.Create();
        QueueHandle q = await t.CreateQueueAsync();
        ulong last = 0;
        for (int round = 0; round < 3; round++)
        {
            for (int i = 0; i < 3; i++)
            {
                AppendResult r = await t.Store.AppendAsync(q, 0, "m"u8);
                await Assert.That(r.MessageId).IsGreaterThan(last);
                last = r.MessageId;
            }
            while (t.Peek(q) is { } m)
            {
                await t.Store.AckAsync(q, m.Id);
            }
            await t.ReopenAsync();
            q = t.Store.FindByRecipientId(q.RecipientId)!;
            await Assert.That(q.MessageCount).IsEqualTo(0);
        }
    }

    [Test]
    public async Task Message_ids_are_never_reused_after_eviction_and_reload()
    {
        await using TestStore t = TestStore.Create();
        QueueHandle q = await t.CreateQueueAsync();
        AppendResult first = await t.Store.AppendAsync(q, 0, "m"u8);
        await t.Store.AckAsync(q, first.MessageId);

        await Assert.That(t.Store.EvictIdle(TimeSpan.Zero)).IsEqualTo(1);
        await Assert.That(t.Store.Statistics.LoadedQueues).IsEqualTo(0);
        QueueHandle reloaded = t.Store.FindByRecipientId(q.RecipientId)!;
        await Assert.That(reloaded).IsNotSameReferenceAs(q);
        AppendResult second = await t.Store.AppendAsync(reloaded, 0, "m"u8);
        await Assert.That(second.MessageId).IsGreaterThan(first.MessageId);

        // The evicted handle is stale now that another one is loaded.
        await Assert.That((await t.Store.AppendAsync(q, 0, "m"u8)).Status).IsEqualTo(StoreStatus.NotFound);

        await t.ReopenAsync();
        QueueHandle afterRestart = t.Store.FindByRecipientId(q.RecipientId)!;
        await t.Store.AckAsync(afterRestart, second.MessageId);
        AppendResult third = await t.Store.AppendAsync(afterRestart, 0, "m"u8);
        await Assert.That(third.MessageId).IsGreaterThan(second.MessageId);
    }

    [Test]
    public async Task Evicted_handle_comes_back_when_the_queue_was_not_reloaded()
    {
        await using TestStore t = TestStore.Create();
        QueueHandle q = await t.CreateQueueAsync();
        AppendResult first = await t.Store.AppendAsync(q, 0, "m"u8);
        q.Tag = "subscriber";
        await Assert.That(t.Store.EvictIdle(TimeSpan.Zero)).IsEqualTo(0);   // a Tag keeps it
        q.Tag = null;
        await Assert.That(t.Store.EvictIdle(TimeSpan.FromHours(1))).IsEqualTo(0);   // recently used
        await Assert.That(t.Store.EvictIdle(TimeSpan.Zero)).IsEqualTo(1);

        AppendResult second = await t.Store.AppendAsync(q, 0, "m"u8);
        await Assert.That(second.Status).IsEqualTo(StoreStatus.Ok);
        await Assert.That(second.MessageId).IsGreaterThan(first.MessageId);
        await Assert.That(t.Store.FindByRecipientId(q.RecipientId)).IsSameReferenceAs(q);
        await Assert.That(q.MessageCount).IsEqualTo(2);
    }

    [Test]
    public async Task Second_open_of_the_same_directory_fails_clearly()
    {
        await using TestStore t = TestStore.Create();
        StoreException? error = null;
        try
        {
            using QueueStore second = QueueStore.Open(new QueueStoreOptions { Path = t.Path });
        }
        catch (StoreException e)
        {
            error = e;
        }
        await Assert.That(error).IsNotNull();
        await Assert.That(error!.Message).Contains("in use");
        // The first store still works.
        QueueHandle q = await t.CreateQueueAsync();
        await Assert.That((await t.Store.AppendAsync(q, 0, "m"u8)).Status).IsEqualTo(StoreStatus.Ok);
    }

    [Test]
    public async Task Disposed_store_refuses_work_and_dispose_is_idempotent()
    {
        TestStore t = TestStore.Create();
        QueueHandle q = await t.CreateQueueAsync();
        await t.Store.DisposeAsync();
        t.Store.Dispose();
        await Assert.That(() => t.Store.AppendAsync(q, 0, "m"u8).AsTask()).Throws<ObjectDisposedException>();
        await Assert.That(() => t.Store.FindByRecipientId(RandomNumberGenerator.GetBytes(24))).Throws<ObjectDisposedException>();
        await t.DisposeAsync();
    }

    /// <summary>The queue's handle as the store has it now, once asserted to hold no message.</summary>
    private static async Task<QueueHandle> ReloadedEmptyAsync(TestStore t, QueueHandle q)
    {
        QueueHandle reloaded = t.Store.FindByRecipientId(q.RecipientId)!;
        await Assert.That(t.Peek(reloaded)).IsNull();
        await Assert.That(reloaded.MessageCount).IsEqualTo(0);
        return reloaded;
    }
}
