namespace Relay.Storage.Tests;

public class BackupTests
{
    private static string NewPath() => Path.Combine(Path.GetTempPath(), "relay-backup-test-" + Guid.NewGuid().ToString("N"));

    /// <summary>A path for a backup, deleted with what is in it on dispose.</summary>
    private sealed class Scratch : IDisposable
    {
        public string Path { get; } = NewPath();

        public void Dispose()
        {
            try
            {
                Directory.Delete(Path, recursive: true);
            }
            catch (DirectoryNotFoundException)
            {
            }
        }
    }

    [Test]
    public async Task A_backup_holds_what_was_written_before_it_and_opens_as_a_store_of_its_own()
    {
        await using TestStore t = TestStore.Create();
        using var scratch = new Scratch();
        string backup = scratch.Path;
        QueueHandle q = await t.CreateQueueAsync();
        AppendResult one = await t.Store.AppendAsync(q, 0, "one"u8);
        AppendResult two = await t.Store.AppendAsync(q, 0, "two"u8);
        await Assert.That(await t.Store.AckAsync(q, one.MessageId)).IsEqualTo(StoreStatus.Ok);

        t.Store.CreateBackup(backup);

        // The store goes on after it; what it does then is not in the backup.
        AppendResult three = await t.Store.AppendAsync(q, 0, "three"u8);
        await Assert.That(three.Status).IsEqualTo(StoreStatus.Ok);
        QueueHandle later = await t.CreateQueueAsync();

        await using QueueStore copy = QueueStore.Open(new QueueStoreOptions { Path = backup });
        QueueHandle? restored = copy.FindBySenderId(q.SenderId);
        await Assert.That(restored).IsNotNull();
        await Assert.That(restored!.RecipientKey.SequenceEqual(q.RecipientKey)).IsTrue();
        await Assert.That(restored.MessageCount).IsEqualTo(1);
        await Assert.That(copy.TryPeekOldest(restored, out StoredMessage message)).IsTrue();
        (ulong id, byte[] body) = (message.Id, message.Body.ToArray());
        message.Return();
        await Assert.That(id).IsEqualTo(two.MessageId);
        await Assert.That(body.SequenceEqual("two"u8.ToArray())).IsTrue();
        await Assert.That(copy.FindByRecipientId(later.RecipientId)).IsNull();

        // Both stores take writes, each its own.
        await Assert.That((await copy.AppendAsync(restored, 0, "four"u8)).Status).IsEqualTo(StoreStatus.Ok);
        await Assert.That(restored.MessageCount).IsEqualTo(2);
        await Assert.That(q.MessageCount).IsEqualTo(2);
    }

    [Test]
    public async Task A_store_started_from_a_backup_gives_ids_above_every_id_given_after_the_backup()
    {
        await using TestStore t = TestStore.Create();
        using var scratch = new Scratch();
        string backup = scratch.Path;
        QueueHandle q = await t.CreateQueueAsync();
        AppendResult first = await t.Store.AppendAsync(q, 0, "before"u8);
        await Assert.That(await t.Store.AckAsync(q, first.MessageId)).IsEqualTo(StoreStatus.Ok);
        t.Store.CreateBackup(backup);

        // The original goes on through restarts (each a new epoch) and gives an id there, which a
        // client receives and acknowledges; then its disk is lost.
        await t.ReopenAsync();
        await t.ReopenAsync();
        QueueHandle again = t.Store.FindBySenderId(q.SenderId)!;
        AppendResult afterBackup = await t.Store.AppendAsync(again, 0, "after"u8);
        await Assert.That(await t.Store.AckAsync(again, afterBackup.MessageId)).IsEqualTo(StoreStatus.Ok);

        // Started from the backup, and restarted, the queue's next ids are above it.
        await using (QueueStore restored = QueueStore.Open(new QueueStoreOptions { Path = backup }))
        {
            AppendResult next = await restored.AppendAsync(restored.FindBySenderId(q.SenderId)!, 0, "restored"u8);
            await Assert.That(next.Status).IsEqualTo(StoreStatus.Ok);
            await Assert.That(next.MessageId).IsGreaterThan(afterBackup.MessageId);
            await Assert.That(next.MessageId).IsGreaterThan(first.MessageId);
        }
        await using (QueueStore restarted = QueueStore.Open(new QueueStoreOptions { Path = backup }))
        {
            QueueHandle queue = restarted.FindBySenderId(q.SenderId)!;
            AppendResult next = await restarted.AppendAsync(queue, 0, "restarted"u8);
            await Assert.That(next.MessageId).IsGreaterThan(afterBackup.MessageId);
            await Assert.That(queue.MessageCount).IsEqualTo(2);
        }
    }

    private static void CopyDirectory(string from, string to)
    {
        Directory.CreateDirectory(to);
        foreach (string file in Directory.GetFiles(from))
        {
            File.Copy(file, Path.Combine(to, Path.GetFileName(file)));
        }
        foreach (string dir in Directory.GetDirectories(from))
        {
            CopyDirectory(dir, Path.Combine(to, Path.GetFileName(dir)));
        }
    }

    /// <summary>The id a queue with no stored message gets next: the store's epoch &lt;&lt; 32.</summary>
    private static async Task<ulong> NextIdOfEmptyQueueAsync(QueueStore store, QueueHandle queue)
    {
        AppendResult r = await store.AppendAsync(store.FindBySenderId(queue.SenderId)!, 0, "probe"u8);
        await Assert.That(await store.AckAsync(store.FindBySenderId(queue.SenderId)!, r.MessageId)).IsEqualTo(StoreStatus.Ok);
        return r.MessageId;
    }

    [Test]
    public async Task Two_copies_of_one_backup_started_one_after_the_other_give_ids_of_their_own()
    {
        var clock = new ManualClock();
        await using TestStore t = TestStore.Create(path => new QueueStoreOptions { Path = path, Clock = clock });
        using var scratch = new Scratch();
        using var first = new Scratch();
        using var second = new Scratch();
        QueueHandle q = await t.CreateQueueAsync();
        t.Store.CreateBackup(scratch.Path);
        CopyDirectory(scratch.Path, first.Path);
        CopyDirectory(scratch.Path, second.Path);

        // The first copy serves for ten minutes, restarted every minute; the last id it gives is
        // what a client holds when that machine is lost too.
        ulong lastOfFirst = 0;
        clock.Advance(TimeSpan.FromMinutes(30));
        for (int i = 0; i < 10; i++)
        {
            await using QueueStore copy = QueueStore.Open(new QueueStoreOptions { Path = first.Path, Clock = clock });
            lastOfFirst = await NextIdOfEmptyQueueAsync(copy, q);
            clock.Advance(TimeSpan.FromMinutes(1));
        }

        // The second copy of the same backup, started after it, gives ids above all of them.
        await using (QueueStore copy = QueueStore.Open(new QueueStoreOptions { Path = second.Path, Clock = clock }))
        {
            await Assert.That(await NextIdOfEmptyQueueAsync(copy, q)).IsGreaterThan(lastOfFirst);
        }

        // Once started, a copy is a store like any other: its next open adds one epoch, no jump.
        ulong before, after;
        await using (QueueStore copy = QueueStore.Open(new QueueStoreOptions { Path = second.Path, Clock = clock }))
        {
            before = await NextIdOfEmptyQueueAsync(copy, q);
        }
        clock.Advance(TimeSpan.FromHours(5));
        await using (QueueStore copy = QueueStore.Open(new QueueStoreOptions { Path = second.Path, Clock = clock }))
        {
            after = await NextIdOfEmptyQueueAsync(copy, q);
        }
        await Assert.That(after >> 32).IsEqualTo((before >> 32) + 1);
    }

    [Test]
    public async Task The_jump_of_a_backup_counts_seconds_since_its_hour_and_not_a_clock_behind_it()
    {
        var made = new DateTimeOffset(2026, 12, 1, 5, 0, 0, TimeSpan.Zero);
        uint hour = (uint)(made.ToUnixTimeSeconds() / 3600);
        await Assert.That(QueueStore.NextEpochOfBackup(7, hour, made.AddMinutes(30))).IsEqualTo(7 + QueueStore.BackupEpochJump + 1800);
        await Assert.That(QueueStore.NextEpochOfBackup(7, hour, made.AddDays(-1))).IsEqualTo(7 + QueueStore.BackupEpochJump);
        await Assert.That(() => QueueStore.NextEpochOfBackup(uint.MaxValue - 10, hour, made)).Throws<StoreException>();
    }

    [Test]
    public async Task Every_write_answered_before_a_backup_under_load_is_in_it()
    {
        // Queues that take every append (nothing is acknowledged): each id answered before the backup
        // must be in it, and none is missing for a reason the test would have to allow.
        await using TestStore t = TestStore.Create(path => new QueueStoreOptions { Path = path, MaxMessagesPerQueue = 1_000_000 });
        using var scratch = new Scratch();
        string backup = scratch.Path;
        QueueHandle[] queues = [await t.CreateQueueAsync(), await t.CreateQueueAsync(), await t.CreateQueueAsync()];
        using var stop = new CancellationTokenSource();
        var answered = new System.Collections.Concurrent.ConcurrentQueue<(int Queue, ulong Id)>();
        Task[] writers = queues.Select((queue, index) => Task.Run(async () =>
        {
            while (!stop.IsCancellationRequested)
            {
                AppendResult r = await t.Store.AppendAsync(queue, 0, "load"u8);
                if (r.Status != StoreStatus.Ok)
                {
                    throw new InvalidOperationException($"append: {r.Status}");
                }
                answered.Enqueue((index, r.MessageId));
            }
        })).ToArray();
        await Task.Delay(200);
        var answeredBefore = answered.ToArray();   // answered, so written, before the backup starts
        t.Store.CreateBackup(backup);
        await Task.Delay(100);
        await stop.CancelAsync();
        await Task.WhenAll(writers);
        await Assert.That(answeredBefore.Length).IsGreaterThan(10);

        await using QueueStore copy = QueueStore.Open(new QueueStoreOptions { Path = backup, MaxMessagesPerQueue = 1_000_000 });
        for (int i = 0; i < queues.Length; i++)
        {
            QueueHandle queue = copy.FindBySenderId(queues[i].SenderId)!;
            var ids = new HashSet<ulong>();
            while (copy.TryPeekOldest(queue, out StoredMessage m))
            {
                ulong id = m.Id;
                m.Return();
                ids.Add(id);
                await Assert.That(await copy.AckAsync(queue, id)).IsEqualTo(StoreStatus.Ok);
            }
            int index = i;
            var missing = answeredBefore.Where(a => a.Queue == index && !ids.Contains(a.Id)).ToList();
            await Assert.That(missing.Count).IsEqualTo(0);
        }
    }

    [Test]
    public async Task A_backup_into_an_existing_directory_fails_and_leaves_it_as_it_was()
    {
        await using TestStore t = TestStore.Create();
        using var scratch = new Scratch();
        string existing = scratch.Path;
        Directory.CreateDirectory(existing);
        File.WriteAllText(Path.Combine(existing, "keep"), "mine");
        await Assert.That(() => t.Store.CreateBackup(existing)).Throws<StoreException>();
        await Assert.That(File.ReadAllText(Path.Combine(existing, "keep"))).IsEqualTo("mine");
        await Assert.That(Directory.GetFileSystemEntries(existing).Length).IsEqualTo(1);
        await Assert.That(Directory.Exists(existing + ".tmp")).IsFalse();

        // A parent that does not exist: an error too, and the store goes on.
        await Assert.That(() => t.Store.CreateBackup(Path.Combine(NewPath(), "deeper"))).Throws<StoreException>();
        QueueHandle q = await t.CreateQueueAsync();
        await Assert.That((await t.Store.AppendAsync(q, 0, "still"u8)).Status).IsEqualTo(StoreStatus.Ok);
    }

    [Test]
    public async Task A_closed_store_makes_no_backup()
    {
        TestStore t = TestStore.Create();
        string backup = NewPath();
        await t.Store.DisposeAsync();
        try
        {
            await Assert.That(() => t.Store.CreateBackup(backup)).Throws<ObjectDisposedException>();
            await Assert.That(Directory.Exists(backup)).IsFalse();
        }
        finally
        {
            await t.DisposeAsync();
        }
    }
}
