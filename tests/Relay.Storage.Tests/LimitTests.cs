using System.Collections.Concurrent;
using System.Security.Cryptography;

namespace Relay.Storage.Tests;

public class LimitTests
{
    [Test]
    public async Task Count_quota_refuses_the_next_message_and_loses_nothing()
    {
        await using TestStore t = TestStore.Create(p => new QueueStoreOptions { Path = p, MaxMessagesPerQueue = 3 });
        QueueHandle q = await t.CreateQueueAsync();
        var ids = new List<ulong>();
        for (int i = 0; i < 3; i++)
        {
            ids.Add((await t.Store.AppendAsync(q, 0, [(byte)i])).MessageId);
        }
        await Assert.That((await t.Store.AppendAsync(q, 0, [9])).Status).IsEqualTo(StoreStatus.QuotaExceeded);
        await Assert.That(q.MessageCount).IsEqualTo(3);

        // After the recipient drains one, there is room for one more.
        await t.Store.AckAsync(q, ids[0]);
        await Assert.That((await t.Store.AppendAsync(q, 0, [3])).Status).IsEqualTo(StoreStatus.Ok);
        await Assert.That((await t.Store.AppendAsync(q, 0, [4])).Status).IsEqualTo(StoreStatus.QuotaExceeded);

        await t.ReopenAsync();   // the quota holds for a reloaded queue too
        q = t.Store.FindByRecipientId(q.RecipientId)!;
        await Assert.That((await t.Store.AppendAsync(q, 0, [5])).Status).IsEqualTo(StoreStatus.QuotaExceeded);
        var bodies = new List<byte>();
        while (t.Peek(q) is { } m)
        {
            bodies.Add(m.Body[0]);
            await t.Store.AckAsync(q, m.Id);
        }
        await Assert.That(bodies).IsEquivalentTo(new List<byte> { 1, 2, 3 });
    }

    [Test]
    public async Task Byte_quota_refuses_a_body_that_does_not_fit()
    {
        await using TestStore t = TestStore.Create(p => new QueueStoreOptions { Path = p, MaxBytesPerQueue = 100 });
        QueueHandle q = await t.CreateQueueAsync();
        await Assert.That((await t.Store.AppendAsync(q, 0, new byte[60])).Status).IsEqualTo(StoreStatus.Ok);
        await Assert.That((await t.Store.AppendAsync(q, 0, new byte[41])).Status).IsEqualTo(StoreStatus.QuotaExceeded);
        await Assert.That((await t.Store.AppendAsync(q, 0, new byte[40])).Status).IsEqualTo(StoreStatus.Ok);
        await Assert.That((await t.Store.AppendAsync(q, 0, new byte[1])).Status).IsEqualTo(StoreStatus.QuotaExceeded);
        await Assert.That(q.ByteCount).IsEqualTo(100);
        await Assert.That(q.MessageCount).IsEqualTo(2);
        await Assert.That(t.Peek(q)!.Value.Body.Length).IsEqualTo(60);
    }

    [Test]
    public async Task Concurrent_appends_never_overshoot_the_quota_and_get_unique_increasing_ids()
    {
        const int quota = 50;
        await using TestStore t = TestStore.Create(p => new QueueStoreOptions { Path = p, MaxMessagesPerQueue = quota });
        QueueHandle q = await t.CreateQueueAsync();
        var accepted = new ConcurrentBag<ulong>();
        int refused = 0;
        await Task.WhenAll(Enumerable.Range(0, 16).Select(worker => Task.Run(async () =>
        {
            for (int i = 0; i < 10; i++)
            {
                AppendResult r = await t.Store.AppendAsync(q, 0, [(byte)worker, (byte)i]);
                if (r.Status == StoreStatus.Ok)
                {
                    accepted.Add(r.MessageId);
                }
                else if (r.Status == StoreStatus.QuotaExceeded)
                {
                    Interlocked.Increment(ref refused);
                }
            }
        })));

        await Assert.That(accepted.Count).IsEqualTo(quota);
        await Assert.That(refused).IsEqualTo(160 - quota);
        await Assert.That(accepted.Distinct().Count()).IsEqualTo(quota);
        await Assert.That(q.MessageCount).IsEqualTo(quota);

        // Stored in id order, and every accepted message is there.
        var stored = new List<ulong>();
        while (t.Peek(q) is { } m)
        {
            stored.Add(m.Id);
            await Assert.That(await t.Store.AckAsync(q, m.Id)).IsEqualTo(StoreStatus.Ok);
        }
        await Assert.That(stored).IsEquivalentTo(accepted.OrderBy(id => id).ToList());
        await Assert.That(stored.SequenceEqual(stored.Order())).IsTrue();
    }

    [Test]
    public async Task Appends_of_one_caller_get_increasing_ids_in_call_order()
    {
        await using TestStore t = TestStore.Create();
        QueueHandle q = await t.CreateQueueAsync();
        // Issued without awaiting in between: they share batches but keep their order.
        ValueTask<AppendResult>[] pending = Enumerable.Range(0, 20).Select(i => t.Store.AppendAsync(q, 0, [(byte)i])).ToArray();
        var results = new List<AppendResult>();
        foreach (ValueTask<AppendResult> p in pending)
        {
            results.Add(await p);
        }
        await Assert.That(results.Select(r => r.MessageId).SequenceEqual(results.Select(r => r.MessageId).Order())).IsTrue();
        for (int i = 0; i < 20; i++)
        {
            var m = t.Peek(q)!.Value;
            await Assert.That(m.Body[0]).IsEqualTo((byte)i);
            await t.Store.AckAsync(q, m.Id);
        }
    }

    [Test]
    public async Task Tiny_disk_budget_answers_store_full_and_stores_nothing()
    {
        await using TestStore t = TestStore.Create(p => new QueueStoreOptions { Path = p, DiskBudgetBytes = 64 * 1024 });
        QueueHandle q = await t.CreateQueueAsync();
        await Assert.That(t.Store.IsOverDiskBudget).IsFalse();

        // Fill the WAL past the budget.
        for (int i = 0; i < 4; i++)
        {
            await Assert.That((await t.Store.AppendAsync(q, 0, RandomNumberGenerator.GetBytes(30_000))).Status).IsEqualTo(StoreStatus.Ok);
        }
        await Assert.That(t.Store.Statistics.GetDiskBytes()).IsGreaterThanOrEqualTo(64 * 1024);
        t.Store.RefreshDiskBudget();
        await Assert.That(t.Store.IsOverDiskBudget).IsTrue();
        await Assert.That((await t.Store.AppendAsync(q, 0, "m"u8)).Status).IsEqualTo(StoreStatus.StoreFull);
        byte[] key = RandomNumberGenerator.GetBytes(32);
        var created = await t.Store.CreateQueueAsync(RandomNumberGenerator.GetBytes(24), RandomNumberGenerator.GetBytes(24), key, key);
        await Assert.That(created.Status).IsEqualTo(StoreStatus.StoreFull);
        await Assert.That(q.MessageCount).IsEqualTo(4);
        // What was acknowledged stays readable and can be drained.
        var first = t.Peek(q)!.Value;
        await Assert.That(await t.Store.AckAsync(q, first.Id)).IsEqualTo(StoreStatus.Ok);
    }

    [Test]
    public async Task Group_commit_puts_many_concurrent_operations_in_fewer_batches()
    {
        await using TestStore t = TestStore.Create();
        QueueHandle[] queues = await Task.WhenAll(Enumerable.Range(0, 8).Select(_ => t.CreateQueueAsync()));
        long batchesBefore = t.Store.Statistics.Batches;
        long opsBefore = t.Store.Statistics.Operations;
        var commits = new ConcurrentBag<StoreCommit>();
        t.Store.Committed += commits.Add;

        await Task.WhenAll(Enumerable.Range(0, 400).Select(i => Task.Run(async () =>
        {
            AppendResult r = await t.Store.AppendAsync(queues[i % 8], 0, "m"u8);
            if (r.Status != StoreStatus.Ok)
            {
                throw new InvalidOperationException(r.Status.ToString());
            }
        })));

        long batches = t.Store.Statistics.Batches - batchesBefore;
        long operations = t.Store.Statistics.Operations - opsBefore;
        await Assert.That(operations).IsEqualTo(400);
        await Assert.That(batches).IsLessThan(400);
        await Assert.That(commits.Sum(c => c.Operations)).IsEqualTo(400);
        await Assert.That(commits.All(c => c.FsyncSeconds >= 0)).IsTrue();
        await Assert.That(t.Store.Statistics.MessagesAppended).IsEqualTo(400);
        await Assert.That(queues.Sum(q => q.MessageCount)).IsEqualTo(400);
    }

    [Test]
    public async Task Relaxed_mode_stores_and_reopens()
    {
        await using TestStore t = TestStore.Create(p => new QueueStoreOptions { Path = p, Durable = false });
        QueueHandle q = await t.CreateQueueAsync();
        await Task.WhenAll(Enumerable.Range(0, 50).Select(i => t.Store.AppendAsync(q, 0, [(byte)i]).AsTask()));
        await Assert.That(q.MessageCount).IsEqualTo(50);
        await t.ReopenAsync();
        QueueHandle reloaded = t.Store.FindByRecipientId(q.RecipientId)!;
        await Assert.That(reloaded.MessageCount).IsEqualTo(50);
        await Assert.That(t.Peek(reloaded)).IsNotNull();
    }
}
