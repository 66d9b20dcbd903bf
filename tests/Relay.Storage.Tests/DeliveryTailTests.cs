using System.Security.Cryptography;

namespace Relay.Storage.Tests;

/// <summary>
/// The delivery tail: a subscribed queue's messages are handed out from memory, in order, exactly as
/// stored, within the memory budget, and the store stays the source of truth when memory misses.
/// </summary>
public class DeliveryTailTests
{
    private static async Task<List<byte[]>> DrainAsync(TestStore t, QueueHandle q)
    {
        var bodies = new List<byte[]>();
        ulong last = 0;
        while (t.Peek(q) is { } m)
        {
            await Assert.That(m.Id).IsGreaterThan(last);
            last = m.Id;
            bodies.Add(m.Body);
            await Assert.That(await t.Store.AckAsync(q, m.Id)).IsEqualTo(StoreStatus.Ok);
        }
        return bodies;
    }

    private static async Task<List<byte[]>> AppendAsync(TestStore t, QueueHandle q, int count, int size)
    {
        var sent = new List<byte[]>();
        for (int i = 0; i < count; i++)
        {
            byte[] body = RandomNumberGenerator.GetBytes(size);
            await Assert.That((await t.Store.AppendAsync(q, (byte)(i % 3), body)).Status).IsEqualTo(StoreStatus.Ok);
            sent.Add(body);
        }
        return sent;
    }

    private static async Task AssertSameAsync(List<byte[]> expected, List<byte[]> actual)
    {
        await Assert.That(actual.Count).IsEqualTo(expected.Count);
        for (int i = 0; i < expected.Count; i++)
        {
            await Assert.That(actual[i].AsSpan().SequenceEqual(expected[i])).IsTrue();
        }
    }

    [Test]
    public async Task Messages_appended_while_subscribed_are_delivered_from_memory_in_order()
    {
        await using TestStore t = TestStore.Create();
        QueueHandle q = await t.CreateQueueAsync();
        t.Store.KeepTail(q, true);
        var sent = await AppendAsync(t, q, 20, 256);

        await AssertSameAsync(sent, await DrainAsync(t, q));
        await Assert.That(t.Store.Statistics.DeliveriesFromMemory).IsEqualTo(20);
        await Assert.That(t.Store.Statistics.DeliveriesFromStore).IsEqualTo(0);
        await Assert.That(t.Store.Statistics.DeliveryTailBytes).IsEqualTo(0);
        await Assert.That(q.MessageCount).IsEqualTo(0);
    }

    [Test]
    public async Task A_memory_only_peek_takes_a_message_held_in_memory_and_says_when_one_would_need_a_read()
    {
        await using TestStore t = TestStore.Create();
        QueueHandle q = await t.CreateQueueAsync();
        // Stored before the subscription: not in memory.
        var stored = await t.Store.AppendAsync(q, 0, [1, 2, 3]);

        await Assert.That(t.Store.TryPeek(q, 0, memoryOnly: true, out StoredMessage none, out bool needsRead)).IsFalse();
        await Assert.That(needsRead).IsTrue();
        await Assert.That(t.Store.Statistics.DeliveriesFromStore).IsEqualTo(0);   // nothing was read

        // Appended while subscribed: held in memory, taken without a read.
        t.Store.KeepTail(q, true);
        await t.Store.AckAsync(q, stored.MessageId);
        var held = await t.Store.AppendAsync(q, 0, [4, 5]);
        await Assert.That(t.Store.TryPeek(q, 0, memoryOnly: true, out StoredMessage message, out needsRead)).IsTrue();
        await Assert.That(needsRead).IsFalse();
        await Assert.That(message.Id).IsEqualTo(held.MessageId);
        await Assert.That(message.Body.ToArray()).IsEquivalentTo(new byte[] { 4, 5 });
        message.Return();
        await Assert.That(t.Store.Statistics.DeliveriesFromMemory).IsEqualTo(1);

        // Nothing further: false, and no read would find anything either.
        await Assert.That(t.Store.TryPeek(q, held.MessageId + 1, memoryOnly: true, out _, out needsRead)).IsFalse();
        await Assert.That(needsRead).IsFalse();
    }

    [Test]
    public async Task A_backlog_stored_before_the_subscription_is_read_ahead_in_few_store_reads()
    {
        await using TestStore t = TestStore.Create(path => new QueueStoreOptions { Path = path, MaxMessagesPerQueue = 1000 });
        QueueHandle q = await t.CreateQueueAsync();
        var sent = await AppendAsync(t, q, 200, 100);
        t.Store.KeepTail(q, true);
        sent.AddRange(await AppendAsync(t, q, 10, 100));   // and newer ones, already in memory

        await AssertSameAsync(sent, await DrainAsync(t, q));
        long fromStore = t.Store.Statistics.DeliveriesFromStore;
        await Assert.That(fromStore).IsGreaterThan(0);
        await Assert.That(fromStore).IsLessThanOrEqualTo(200 / QueueStore.ReadAhead + 1);
        await Assert.That(t.Store.Statistics.DeliveriesFromMemory + fromStore).IsEqualTo(210);
        await Assert.That(t.Store.Statistics.DeliveryTailBytes).IsEqualTo(0);
    }

    [Test]
    public async Task The_tail_stays_within_its_budget_and_the_store_serves_the_rest()
    {
        await using TestStore t = TestStore.Create(path => new QueueStoreOptions { Path = path, DeliveryTailBytes = 1000 });
        QueueHandle q = await t.CreateQueueAsync();
        t.Store.KeepTail(q, true);
        var sent = await AppendAsync(t, q, 10, 300);
        await Assert.That(t.Store.Statistics.DeliveryTailBytes).IsLessThanOrEqualTo(1000);
        await Assert.That(t.Store.Statistics.DeliveryTailBytes).IsEqualTo(900);

        await AssertSameAsync(sent, await DrainAsync(t, q));
        await Assert.That(t.Store.Statistics.DeliveriesFromStore).IsGreaterThan(0);
        await Assert.That(t.Store.Statistics.DeliveryTailBytes).IsEqualTo(0);
    }

    [Test]
    public async Task Unsubscribing_releases_the_memory_and_delivery_goes_on_from_the_store()
    {
        await using TestStore t = TestStore.Create();
        QueueHandle q = await t.CreateQueueAsync();
        t.Store.KeepTail(q, true);
        var sent = await AppendAsync(t, q, 5, 1000);
        await Assert.That(t.Store.Statistics.DeliveryTailBytes).IsEqualTo(5000);
        t.Store.KeepTail(q, false);
        await Assert.That(t.Store.Statistics.DeliveryTailBytes).IsEqualTo(0);

        await AssertSameAsync(sent, await DrainAsync(t, q));
        await Assert.That(t.Store.Statistics.DeliveriesFromMemory).IsEqualTo(0);
        await Assert.That(t.Store.Statistics.DeliveriesFromStore).IsEqualTo(5);
    }

    [Test]
    public async Task Messages_survive_a_restart_and_a_deleted_queue_frees_its_tail()
    {
        await using TestStore t = TestStore.Create();
        QueueHandle q = await t.CreateQueueAsync();
        t.Store.KeepTail(q, true);
        var sent = await AppendAsync(t, q, 30, 64);
        await t.ReopenAsync();
        QueueHandle loaded = t.Store.FindByRecipientId(q.RecipientId)!;
        t.Store.KeepTail(loaded, true);
        var more = await AppendAsync(t, loaded, 3, 64);
        sent.AddRange(more);
        var first = t.Peek(loaded)!.Value;
        await Assert.That(first.Body.AsSpan().SequenceEqual(sent[0])).IsTrue();
        await Assert.That(t.Store.Statistics.DeliveryTailBytes).IsGreaterThan(0);

        await Assert.That(await t.Store.DeleteQueueAsync(loaded)).IsEqualTo(StoreStatus.Ok);
        await Assert.That(t.Store.Statistics.DeliveryTailBytes).IsEqualTo(0);
        await Assert.That(t.Store.TryPeekOldest(loaded, out _)).IsFalse();
    }

    [Test]
    public async Task Appends_interleaved_with_acks_arrive_once_each_in_order()
    {
        await using TestStore t = TestStore.Create();
        QueueHandle q = await t.CreateQueueAsync();
        t.Store.KeepTail(q, true);
        var sent = new List<byte[]>();
        var received = new List<byte[]>();
        for (int round = 0; round < 50; round++)
        {
            sent.AddRange(await AppendAsync(t, q, round % 4, 50));
            if (t.Peek(q) is { } m)
            {
                received.Add(m.Body);
                await Assert.That(await t.Store.AckAsync(q, m.Id)).IsEqualTo(StoreStatus.Ok);
            }
        }
        received.AddRange(await DrainAsync(t, q));
        await AssertSameAsync(sent, received);
        await Assert.That(t.Store.Statistics.DeliveriesFromStore).IsEqualTo(0);
    }
}

public class DeferredCompactionTests
{
    [Test]
    public async Task Compactions_wait_for_ResumeCompactions_and_then_run()
    {
        await using TestStore t = TestStore.Create(path => new QueueStoreOptions { Path = path, DeferCompactions = true });
        // Each open writes the epoch and each close flushes it: one more level-0 table file per run.
        for (int run = 0; run < 6; run++)
        {
            await t.ReopenAsync();
        }
        long before = t.Store.Property(Cf.Default, "rocksdb.num-files-at-level0");
        await Assert.That(before).IsGreaterThanOrEqualTo(5);   // above the trigger (4): nothing compacted them

        t.Store.ResumeCompactions();
        t.Store.ResumeCompactions();   // once is enough; again is harmless
        long after = before;
        for (int i = 0; i < 200 && after >= 4; i++)
        {
            await Task.Delay(50);
            after = t.Store.Property(Cf.Default, "rocksdb.num-files-at-level0");
        }
        await Assert.That(after).IsLessThan(4);
    }
}
