namespace Relay.Storage.Tests;

public class RetentionTests
{
    private static Func<string, QueueStoreOptions> With(ManualClock clock, TimeSpan? idle = null) => p => new QueueStoreOptions
    {
        Path = p,
        Clock = clock,
        MessageTtl = TimeSpan.FromDays(21),
        IdleQueueTtl = idle ?? TimeSpan.Zero,
    };

    [Test]
    public async Task Stored_hour_is_the_coarse_arrival_hour()
    {
        var clock = new ManualClock { Now = new DateTimeOffset(2025, 6, 1, 12, 59, 59, TimeSpan.Zero) };
        await using TestStore t = TestStore.Create(With(clock));
        QueueHandle q = await t.CreateQueueAsync();
        AppendResult r = await t.Store.AppendAsync(q, 0, "m"u8);
        uint expected = (uint)(new DateTimeOffset(2025, 6, 1, 12, 0, 0, TimeSpan.Zero).ToUnixTimeSeconds() / 3600);
        await Assert.That(r.Hour).IsEqualTo(expected);
        await Assert.That(t.Peek(q)!.Value.Hour).IsEqualTo(expected);
    }

    [Test]
    public async Task Messages_expire_after_the_ttl_and_not_before()
    {
        var clock = new ManualClock();
        await using TestStore t = TestStore.Create(With(clock));
        QueueHandle q = await t.CreateQueueAsync();
        QueueHandle unloaded = await t.CreateQueueAsync();
        await t.Store.AppendAsync(q, 0, "old-1"u8);
        await t.Store.AppendAsync(q, 0, "old-2"u8);
        await t.Store.AppendAsync(unloaded, 0, "old-3"u8);
        clock.Advance(TimeSpan.FromDays(10));
        AppendResult young = await t.Store.AppendAsync(q, 0, "young"u8);

        clock.Advance(TimeSpan.FromDays(11) - TimeSpan.FromHours(1));   // 21 days minus an hour after the first
        await Assert.That(await t.Store.SweepExpiredAsync()).IsEqualTo(0);
        await Assert.That(q.MessageCount).IsEqualTo(3);

        clock.Advance(TimeSpan.FromHours(2));   // now past 21 days (plus the hour's rounding)
        await t.ReopenAsync();   // the sweep works from the index, for queues not in memory too
        q = t.Store.FindByRecipientId(q.RecipientId)!;
        await Assert.That(await t.Store.SweepExpiredAsync()).IsEqualTo(3);
        await Assert.That(t.Store.Statistics.MessagesExpired).IsEqualTo(3);
        await Assert.That(q.MessageCount).IsEqualTo(1);
        await Assert.That(q.ByteCount).IsEqualTo(5);
        await Assert.That(t.Peek(q)!.Value.Id).IsEqualTo(young.MessageId);
        QueueHandle other = t.Store.FindByRecipientId(unloaded.RecipientId)!;
        await Assert.That(other.MessageCount).IsEqualTo(0);
        await Assert.That(t.Peek(other)).IsNull();

        await Assert.That(await t.Store.SweepExpiredAsync()).IsEqualTo(0);   // the index entries are gone
        clock.Advance(TimeSpan.FromDays(11));
        await Assert.That(await t.Store.SweepExpiredAsync()).IsEqualTo(1);
        await Assert.That(t.Peek(q)).IsNull();
        // The queue itself stays (no idle expiry configured) and accepts new messages.
        await Assert.That((await t.Store.AppendAsync(q, 0, "new"u8)).Status).IsEqualTo(StoreStatus.Ok);
    }

    [Test]
    [Arguments(true)]
    [Arguments(false)]
    public async Task An_ack_through_skips_what_expired_after_it_was_handed_out(bool handedOutHere)
    {
        var clock = new ManualClock();
        await using TestStore t = TestStore.Create(With(clock));
        QueueHandle q = await t.CreateQueueAsync();
        t.Store.KeepTail(q, true);
        AppendResult old = await t.Store.AppendAsync(q, 0, "old"u8);
        clock.Advance(TimeSpan.FromDays(20));
        AppendResult second = await t.Store.AppendAsync(q, 0, "second"u8);
        AppendResult third = await t.Store.AppendAsync(q, 0, "third!"u8);
        // A subscriber with a window holds all three, then the oldest expires before its ACK.
        ulong from = 0;
        for (int i = 0; i < 3; i++)
        {
            await Assert.That(t.Store.TryPeek(q, from, out StoredMessage m)).IsTrue();
            from = m.Id + 1;
            m.Return();
        }
        if (!handedOutHere)
        {
            await t.ReopenAsync();
            q = t.Store.FindByRecipientId(q.RecipientId)!;
        }
        clock.Advance(TimeSpan.FromDays(2));
        await Assert.That(await t.Store.SweepExpiredAsync()).IsEqualTo(1);

        // The ACK through the third covers three outstanding; two are still stored, both go.
        await Assert.That(await t.Store.AckAsync(q, third.MessageId, 3, out int deleted)).IsEqualTo(StoreStatus.Ok);
        await Assert.That(deleted).IsEqualTo(2);
        await Assert.That(q.MessageCount).IsEqualTo(0);
        await Assert.That(q.ByteCount).IsEqualTo(0);
        await Assert.That(t.Peek(q)).IsNull();
        await Assert.That(old.MessageId).IsLessThan(second.MessageId);
    }

    [Test]
    public async Task Expiry_of_a_deleted_queue_just_drops_its_index_entry()
    {
        var clock = new ManualClock();
        await using TestStore t = TestStore.Create(With(clock));
        QueueHandle q = await t.CreateQueueAsync();
        await t.Store.AppendAsync(q, 0, "m"u8);
        await t.Store.DeleteQueueAsync(q);
        clock.Advance(TimeSpan.FromDays(30));
        await Assert.That(await t.Store.SweepExpiredAsync()).IsEqualTo(0);
        await Assert.That(t.Store.FindByRecipientId(q.RecipientId)).IsNull();
    }

    [Test]
    public async Task Idle_queues_behind_a_full_chunk_of_subscribed_ones_are_deleted_too()
    {
        var clock = new ManualClock();
        await using TestStore t = TestStore.Create(With(clock, idle: TimeSpan.FromDays(30)));
        // More subscribed idle queues than one sweep chunk (1,024), all sorting before the idle ones
        // (the index is ordered by hour, then recipient id).
        var subscribed = new List<byte[]>();
        var idle = new List<byte[]>();
        for (int i = 0; i < 1_030; i++)
        {
            byte[] rid = System.Security.Cryptography.RandomNumberGenerator.GetBytes(24);
            rid[0] = (byte)(i < 1_025 ? 0x10 : 0xF0);
            var key = System.Security.Cryptography.RandomNumberGenerator.GetBytes(32);
            var (status, _) = await t.Store.CreateQueueAsync(rid, System.Security.Cryptography.RandomNumberGenerator.GetBytes(24), key, key);
            await Assert.That(status).IsEqualTo(StoreStatus.Ok);
            (i < 1_025 ? subscribed : idle).Add(rid);
        }
        clock.Advance(TimeSpan.FromDays(31));
        foreach (var rid in subscribed)
        {
            t.Store.FindByRecipientId(rid)!.Tag = "subscriber";
        }

        await t.Store.SweepExpiredAsync();
        await Assert.That(idle.All(rid => t.Store.FindByRecipientId(rid) is null)).IsTrue();
        await Assert.That(subscribed.All(rid => t.Store.FindByRecipientId(rid) is not null)).IsTrue();
        await Assert.That(t.Store.Statistics.IdleQueuesDeleted).IsEqualTo(5);
    }

    [Test]
    public async Task Message_expiry_goes_on_past_a_whole_chunk_of_stale_handles()
    {
        var clock = new ManualClock();
        await using TestStore t = TestStore.Create(With(clock));
        QueueHandle[] queues = await Task.WhenAll(Enumerable.Range(0, QueueStore.SweepChunk + 1).Select(_ => t.CreateQueueAsync()));
        await Task.WhenAll(queues.Select(q => t.Store.AppendAsync(q, 0, "old"u8).AsTask()));
        clock.Advance(TimeSpan.FromDays(22));

        // The handle the sweep finds for each entry of its first chunk goes stale before it takes the
        // queue's lock (evicted, and another handle of the queue loaded): those entries stay.
        int found = 0;
        t.Store.BeforeExpire = handle =>
        {
            if (found++ < QueueStore.SweepChunk)
            {
                t.Store.EvictIdle(TimeSpan.Zero);
                t.Store.FindByRecipientId(handle.RecipientId);
            }
        };
        // The entry after that chunk is expired all the same.
        await Assert.That(await t.Store.SweepExpiredAsync()).IsEqualTo(1);
        await Assert.That(found).IsEqualTo(QueueStore.SweepChunk + 1);

        // The next sweep finds the current handles of the others.
        t.Store.BeforeExpire = null;
        await Assert.That(await t.Store.SweepExpiredAsync()).IsEqualTo(QueueStore.SweepChunk);
        await Assert.That(await t.Store.SweepExpiredAsync()).IsEqualTo(0);
        await Assert.That(t.Store.Statistics.MessagesExpired).IsEqualTo(QueueStore.SweepChunk + 1);
    }

    [Test]
    public async Task A_queue_whose_idle_deletion_failed_to_write_stays_usable_and_the_next_sweep_deletes_it()
    {
        var clock = new ManualClock();
        await using TestStore t = TestStore.Create(With(clock, idle: TimeSpan.FromDays(10)));
        QueueHandle q = await t.CreateQueueAsync();
        await t.Store.AppendAsync(q, 0, "m"u8);
        clock.Advance(TimeSpan.FromDays(11));

        t.Store.BeforeWrite = (_, _) => throw new IOException("injected write failure");
        await Assert.ThrowsAsync<StoreException>(async () => await t.Store.SweepExpiredAsync());
        t.Store.BeforeWrite = null;

        // Nothing was deleted: the queue is found by either id, with its message, and counted as not deleted.
        await Assert.That(t.Store.FindByRecipientId(q.RecipientId)).IsSameReferenceAs(q);
        await Assert.That(t.Store.FindBySenderId(q.SenderId)).IsSameReferenceAs(q);
        await Assert.That(q.Deleted).IsFalse();
        await Assert.That(t.Peek(q)!.Value.Body).IsEquivalentTo("m"u8.ToArray());
        await Assert.That(t.Store.Statistics.QueuesDeleted).IsEqualTo(0);
        await Assert.That(t.Store.Statistics.IdleQueuesDeleted).IsEqualTo(0);

        // Still idle: the next sweep deletes it, once.
        await t.Store.SweepExpiredAsync();
        await Assert.That(t.Store.FindByRecipientId(q.RecipientId)).IsNull();
        await Assert.That(t.Store.FindBySenderId(q.SenderId)).IsNull();
        await Assert.That(t.Store.Statistics.IdleQueuesDeleted).IsEqualTo(1);
        await t.ReopenAsync();
        await Assert.That(t.Store.FindByRecipientId(q.RecipientId)).IsNull();
    }

    [Test]
    public async Task Operations_on_a_queue_whose_deletion_is_being_written_answer_Deleting_until_it_ends()
    {
        var clock = new ManualClock();
        await using TestStore t = TestStore.Create(With(clock, idle: TimeSpan.FromDays(10)));
        QueueHandle q = await t.CreateQueueAsync();
        AppendResult m = await t.Store.AppendAsync(q, 0, "m"u8);
        clock.Advance(TimeSpan.FromDays(11));

        // The idle deletion's write waits (a slow disk), then fails.
        using var release = new ManualResetEventSlim();
        int writes = 0;
        t.Store.BeforeIdleDelete = _ => t.Store.BeforeWrite = (_, _) =>
        {
            if (Interlocked.Increment(ref writes) == 1)
            {
                release.Wait(TimeSpan.FromSeconds(30));
                throw new IOException("injected write failure");
            }
        };
        Task<int> sweep = t.Store.SweepExpiredAsync().AsTask();
        var waited = System.Diagnostics.Stopwatch.StartNew();
        while (q.Deletion != QueueDeletion.Pending && waited.Elapsed < TimeSpan.FromSeconds(10))
        {
            await Task.Delay(1);
        }
        try
        {
            await Assert.That(q.Deletion).IsEqualTo(QueueDeletion.Pending);
            await Assert.That(t.Store.Find(q.RecipientId, senderSide: false, out QueueHandle? byRecipient)).IsEqualTo(StoreStatus.Deleting);
            await Assert.That(byRecipient).IsSameReferenceAs(q);
            await Assert.That(t.Store.Find(q.SenderId, senderSide: true, out QueueHandle? bySender)).IsEqualTo(StoreStatus.Deleting);
            await Assert.That(bySender).IsSameReferenceAs(q);
            await Assert.That(t.Store.FindByRecipientId(q.RecipientId)).IsNull();
            await Assert.That((await t.Store.AppendAsync(q, 0, "x"u8)).Status).IsEqualTo(StoreStatus.Deleting);
            await Assert.That(await t.Store.AckAsync(q, m.MessageId)).IsEqualTo(StoreStatus.Deleting);
            await Assert.That(await t.Store.SecureAsync(q, new byte[QueueHandle.KeyLength])).IsEqualTo(StoreStatus.Deleting);
            await Assert.That(await t.Store.SuspendAsync(q)).IsEqualTo(StoreStatus.Deleting);
            await Assert.That(await t.Store.DeleteQueueAsync(q)).IsEqualTo(StoreStatus.Deleting);
        }
        finally
        {
            release.Set();
            await Assert.ThrowsAsync<StoreException>(async () => await sweep);
            t.Store.BeforeIdleDelete = null;
            t.Store.BeforeWrite = null;
        }

        // Undone: the queue is back as it was.
        await Assert.That(q.Deletion).IsEqualTo(QueueDeletion.None);
        await Assert.That(t.Store.Find(q.SenderId, senderSide: true, out _)).IsEqualTo(StoreStatus.Ok);
        await Assert.That(t.Peek(q)!.Value.Id).IsEqualTo(m.MessageId);

        // Deleted for good by the next sweep: NotFound from then on.
        await t.Store.SweepExpiredAsync();
        await Assert.That(q.Deletion).IsEqualTo(QueueDeletion.Done);
        await Assert.That(t.Store.Find(q.RecipientId, senderSide: false, out QueueHandle? gone)).IsEqualTo(StoreStatus.NotFound);
        await Assert.That(gone).IsNull();
        await Assert.That(await t.Store.SuspendAsync(q)).IsEqualTo(StoreStatus.NotFound);
    }

    [Test]
    public async Task A_queue_whose_idle_deletion_failed_to_write_takes_messages_again()
    {
        var clock = new ManualClock();
        await using TestStore t = TestStore.Create(With(clock, idle: TimeSpan.FromDays(10)));
        QueueHandle q = await t.CreateQueueAsync();
        clock.Advance(TimeSpan.FromDays(11));

        t.Store.BeforeWrite = (_, _) => throw new IOException("injected write failure");
        await Assert.ThrowsAsync<StoreException>(async () => await t.Store.SweepExpiredAsync());
        t.Store.BeforeWrite = null;

        AppendResult r = await t.Store.AppendAsync(q, 0, "after"u8);
        await Assert.That(r.Status).IsEqualTo(StoreStatus.Ok);
        await t.Store.SweepExpiredAsync();   // used since: kept
        await t.ReopenAsync();
        q = t.Store.FindByRecipientId(q.RecipientId)!;
        await Assert.That(q).IsNotNull();
        await Assert.That(t.Peek(q)!.Value.Body).IsEquivalentTo("after"u8.ToArray());
    }

    [Test]
    public async Task A_sweep_whose_expiry_write_failed_hands_back_every_operation_it_staged()
    {
        var clock = new ManualClock();
        await using TestStore t = TestStore.Create(With(clock));
        for (int i = 0; i < 3; i++)
        {
            await t.Store.AppendAsync(await t.CreateQueueAsync(), 0, "m"u8);
        }
        clock.Advance(TimeSpan.FromDays(30));

        t.Store.BeforeWrite = (_, _) => throw new IOException("injected write failure");
        await Assert.ThrowsAsync<StoreException>(async () => await t.Store.SweepExpiredAsync());
        t.Store.BeforeWrite = null;

        // The three expiry writes all failed; each went back to the pool, none is left behind.
        await t.Store.WhenUndone();
        await Assert.That(t.Store.PooledOps).IsEqualTo(t.Store.CreatedOps);
        await Assert.That(await t.Store.SweepExpiredAsync()).IsEqualTo(3);
        await Assert.That(t.Store.PooledOps).IsEqualTo(t.Store.CreatedOps);
    }

    [Test]
    public async Task A_sweep_whose_idle_deletion_failed_hands_back_every_operation_it_staged()
    {
        var clock = new ManualClock();
        await using TestStore t = TestStore.Create(With(clock, idle: TimeSpan.FromDays(10)));
        for (int i = 0; i < 3; i++)
        {
            await t.CreateQueueAsync();
        }
        clock.Advance(TimeSpan.FromDays(11));

        t.Store.BeforeWrite = (_, _) => throw new IOException("injected write failure");
        await Assert.ThrowsAsync<StoreException>(async () => await t.Store.SweepExpiredAsync());
        t.Store.BeforeWrite = null;

        await t.Store.WhenUndone();
        await Assert.That(t.Store.PooledOps).IsEqualTo(t.Store.CreatedOps);
        await t.Store.SweepExpiredAsync();
        await Assert.That(t.Store.Statistics.IdleQueuesDeleted).IsEqualTo(3);
        await Assert.That(t.Store.PooledOps).IsEqualTo(t.Store.CreatedOps);
    }

    [Test]
    public async Task Idle_queues_are_deleted_and_active_ones_kept()
    {
        var clock = new ManualClock();
        await using TestStore t = TestStore.Create(With(clock, idle: TimeSpan.FromDays(30)));
        QueueHandle idle = await t.CreateQueueAsync();
        QueueHandle active = await t.CreateQueueAsync();
        QueueHandle subscribed = await t.CreateQueueAsync();
        await t.Store.AppendAsync(idle, 0, "m"u8);

        clock.Advance(TimeSpan.FromDays(20));
        await t.Store.AppendAsync(active, 0, "m"u8);   // activity moves its last-active hour
        clock.Advance(TimeSpan.FromDays(11));
        await t.ReopenAsync();
        t.Store.FindByRecipientId(subscribed.RecipientId)!.Tag = "subscriber";

        await t.Store.SweepExpiredAsync();
        await Assert.That(t.Store.FindByRecipientId(idle.RecipientId)).IsNull();
        await Assert.That(t.Store.FindBySenderId(idle.SenderId)).IsNull();
        await Assert.That(t.Store.FindByRecipientId(active.RecipientId)).IsNotNull();
        await Assert.That(t.Store.FindByRecipientId(subscribed.RecipientId)).IsNotNull();
        await Assert.That(t.Store.Statistics.IdleQueuesDeleted).IsEqualTo(1);

        clock.Advance(TimeSpan.FromDays(20));
        await t.Store.SweepExpiredAsync();
        await Assert.That(t.Store.FindByRecipientId(active.RecipientId)).IsNull();
    }

    [Test]
    public async Task A_queue_its_recipient_subscribes_or_polls_is_not_idle()
    {
        var clock = new ManualClock();
        await using TestStore t = TestStore.Create(With(clock, idle: TimeSpan.FromDays(30)));
        QueueHandle used = await t.CreateQueueAsync();
        QueueHandle untouched = await t.CreateQueueAsync();

        clock.Advance(TimeSpan.FromDays(20));
        t.Store.MarkActive(used);   // what the relay does for a SUB or a GET
        clock.Advance(TimeSpan.FromDays(11));
        await t.ReopenAsync();      // the moved hour is on disk, not only in the handle
        await t.Store.SweepExpiredAsync();
        await Assert.That(t.Store.FindByRecipientId(untouched.RecipientId)).IsNull();
        await Assert.That(t.Store.FindByRecipientId(used.RecipientId)).IsNotNull();

        clock.Advance(TimeSpan.FromDays(20));
        await t.Store.SweepExpiredAsync();
        await Assert.That(t.Store.FindByRecipientId(used.RecipientId)).IsNull();
        await Assert.That(t.Store.Statistics.IdleQueuesDeleted).IsEqualTo(2);
    }

    [Test]
    public async Task A_subscribed_queue_gets_the_whole_idle_ttl_again_when_its_subscriber_leaves()
    {
        var clock = new ManualClock();
        await using TestStore t = TestStore.Create(With(clock, idle: TimeSpan.FromDays(30)));
        QueueHandle q = await t.CreateQueueAsync();
        clock.Advance(TimeSpan.FromDays(31));
        q.Tag = "subscriber";   // subscribed, with no traffic for longer than the idle TTL
        await t.Store.SweepExpiredAsync();
        await Assert.That(t.Store.FindByRecipientId(q.RecipientId)).IsNotNull();

        // The subscriber leaves (its connection dropped, say) just before the next sweep: the queue
        // was in use until then, so it is not deleted now.
        q.Tag = null;
        clock.Advance(TimeSpan.FromHours(1));
        await t.Store.SweepExpiredAsync();
        await Assert.That(t.Store.FindByRecipientId(q.RecipientId)).IsNotNull();
        await t.ReopenAsync();
        clock.Advance(TimeSpan.FromDays(29));
        await t.Store.SweepExpiredAsync();
        await Assert.That(t.Store.FindByRecipientId(q.RecipientId)).IsNotNull();

        clock.Advance(TimeSpan.FromDays(2));
        await t.Store.SweepExpiredAsync();
        await Assert.That(t.Store.FindByRecipientId(q.RecipientId)).IsNull();
        await Assert.That(t.Store.Statistics.IdleQueuesDeleted).IsEqualTo(1);
    }

    [Test]
    public async Task Sweep_runs_on_its_timer()
    {
        var clock = new ManualClock();
        await using TestStore t = TestStore.Create(p => new QueueStoreOptions
        {
            Path = p,
            Clock = new TimerOnlyClock(clock),
            SweepInterval = TimeSpan.FromMilliseconds(50),
        });
        QueueHandle q = await t.CreateQueueAsync();
        await t.Store.AppendAsync(q, 0, "m"u8);
        clock.Advance(TimeSpan.FromDays(22));
        for (int i = 0; i < 100 && t.Store.Statistics.MessagesExpired == 0; i++)
        {
            await Task.Delay(20);
        }
        await Assert.That(t.Store.Statistics.MessagesExpired).IsEqualTo(1);
        await Assert.That(q.MessageCount).IsEqualTo(0);
    }

    /// <summary>Manual time, real timers.</summary>
    private sealed class TimerOnlyClock(ManualClock clock) : TimeProvider
    {
        public override DateTimeOffset GetUtcNow() => clock.GetUtcNow();
    }
}
