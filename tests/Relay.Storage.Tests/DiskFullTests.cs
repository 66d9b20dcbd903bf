using System.Security.Cryptography;
using Relay.Storage.Native;

namespace Relay.Storage.Tests;

/// <summary>
/// A file system that fills up under the store (the store's own writes, or anything else on the
/// same disk): appends and creations are refused as full without being staged, other writes still
/// fail, nothing acknowledged is lost, and the refusals end by themselves once a write succeeds.
/// The disk is simulated here (the writer's test hook throws the error the store makes of RocksDB's ENOSPC status);
/// tests/e2e/diskfull.sh fills a real file system under the published binary.
/// </summary>
public class DiskFullTests
{
    /// <summary>A disk that answers every write with RocksDB's "No space left on device" while <see cref="Full"/>.</summary>
    private sealed class FillingDisk
    {
        private int _full;
        public int Writes;
        public int Probes;

        public bool Full
        {
            get => Volatile.Read(ref _full) != 0;
            set => Volatile.Write(ref _full, value ? 1 : 0);
        }

        public void BeforeWrite(int ops, long bytes)
        {
            Interlocked.Increment(ref ops == 0 ? ref Probes : ref Writes);
            if (Full)
            {
                throw RocksDb.Error("IO error: No space left on device: While appending to file: 000042.sst: No space left on device");
            }
        }
    }

    [Test]
    public async Task A_full_disk_refuses_appends_and_creations_until_a_write_succeeds_and_loses_nothing()
    {
        await using TestStore t = TestStore.Create();
        QueueHandle q = await t.CreateQueueAsync();
        await Assert.That((await t.Store.AppendAsync(q, 0, [1])).Status).IsEqualTo(StoreStatus.Ok);
        var changes = new System.Collections.Concurrent.ConcurrentQueue<bool>();
        t.Store.DiskFullChanged += changes.Enqueue;
        var disk = new FillingDisk { Full = true };
        t.Store.FailedWriteProbeInterval = TimeSpan.FromMilliseconds(50);
        t.Store.BeforeWrite = disk.BeforeWrite;
        // A write refused while the failed one is undone says the full disk is why, too.
        Exception? refusedWhileUndoing = null;
        t.Store.WhileUndoing = () =>
        {
            try
            {
                var suspend = t.Store.SuspendAsync(q).AsTask();
                refusedWhileUndoing = suspend.IsFaulted ? suspend.Exception!.InnerException : null;
            }
            catch (Exception e)
            {
                refusedWhileUndoing = e;
            }
        };

        // The append that meets the full disk fails as a failed write does, and says why.
        var failed = await Assert.ThrowsAsync<StoreException>(async () => await t.Store.AppendAsync(q, 0, [2]));
        await Assert.That(failed!.DiskFull).IsTrue();
        await Assert.That(refusedWhileUndoing is StoreException { DiskFull: true }).IsTrue();
        // ... and carries the failure itself, so that a log line of the refusal names RocksDB's error.
        await Assert.That(refusedWhileUndoing!.InnerException).IsSameReferenceAs(failed);
        t.Store.WhileUndoing = null;
        await Assert.That(t.Store.IsDiskFull).IsTrue();
        await Assert.That(changes).IsEquivalentTo(new[] { true });
        Task notFull = t.Store.WhenWritable();
        await Assert.That(notFull.IsCompleted).IsFalse();

        // Later appends and creations are refused at once: nothing staged, nothing written.
        int writes = Volatile.Read(ref disk.Writes);
        var refused = t.Store.AppendAsync(q, 0, [3]);
        await Assert.That(refused.IsCompleted).IsTrue();
        await Assert.That((await refused).Status).IsEqualTo(StoreStatus.StoreFull);
        var (created, queue) = await t.Store.CreateQueueAsync(RandomNumberGenerator.GetBytes(24), RandomNumberGenerator.GetBytes(24),
            RandomNumberGenerator.GetBytes(32), RandomNumberGenerator.GetBytes(32));
        await Assert.That(created).IsEqualTo(StoreStatus.StoreFull);
        await Assert.That(queue).IsNull();
        await Assert.That(Volatile.Read(ref disk.Writes)).IsEqualTo(writes);

        // Other writes are still tried (one that succeeds ends the refusals) and fail while it is full:
        // the acknowledged message stays.
        ulong first = t.Peek(q)!.Value.Id;
        var ack = await Assert.ThrowsAsync<StoreException>(async () => await t.Store.AckAsync(q, first));
        await Assert.That(ack!.DiskFull).IsTrue();
        await Assert.That(t.Peek(q)!.Value.Body).IsEquivalentTo(new byte[] { 1 });

        // While nothing else is written, the writer tries a write of its own now and then.
        int probes = Volatile.Read(ref disk.Probes);
        await Task.Delay(300);
        await Assert.That(Volatile.Read(ref disk.Probes)).IsGreaterThan(probes);
        await Assert.That(t.Store.IsDiskFull).IsTrue();

        // Space returns: the next try succeeds, and the refusals end without any other write.
        disk.Full = false;
        await notFull.WaitAsync(TimeSpan.FromSeconds(10));
        await Assert.That(t.Store.IsDiskFull).IsFalse();
        await Assert.That(changes).IsEquivalentTo(new[] { true, false });
        await Assert.That(t.Store.WhenWritable().IsCompleted).IsTrue();
        await Assert.That((await t.Store.AppendAsync(q, 0, [4])).Status).IsEqualTo(StoreStatus.Ok);

        // The refused and failed messages were never stored; the acknowledged ones survive a restart.
        t.Store.BeforeWrite = null;
        await t.ReopenAsync();
        q = t.Store.FindByRecipientId(q.RecipientId)!;
        await Assert.That(q.MessageCount).IsEqualTo(2);
        await Assert.That(t.Peek(q)!.Value.Body).IsEquivalentTo(new byte[] { 1 });
        await Assert.That(await t.Store.AckAsync(q, t.Peek(q)!.Value.Id)).IsEqualTo(StoreStatus.Ok);
        await Assert.That(t.Peek(q)!.Value.Body).IsEquivalentTo(new byte[] { 4 });
    }

    [Test]
    public async Task Another_write_failure_is_not_taken_for_a_full_disk_and_ends_the_refusals()
    {
        await using TestStore t = TestStore.Create();
        QueueHandle q = await t.CreateQueueAsync();
        var disk = new FillingDisk { Full = true };
        t.Store.BeforeWrite = disk.BeforeWrite;
        await Assert.ThrowsAsync<StoreException>(async () => await t.Store.AppendAsync(q, 0, [1]));
        await Assert.That(t.Store.IsDiskFull).IsTrue();

        // The disk now fails otherwise (an I/O error): the next write that fails so says it, and
        // appends are tried again (and fail with their own error) rather than answered full.
        t.Store.BeforeWrite = (_, _) => throw new IOException("injected I/O error");
        var other = await Assert.ThrowsAsync<StoreException>(async () => await t.Store.SuspendAsync(q));
        await Assert.That(other!.DiskFull).IsFalse();
        await Assert.That(t.Store.IsDiskFull).IsFalse();
        var append = await Assert.ThrowsAsync<StoreException>(async () => await t.Store.AppendAsync(q, 0, [2]));
        await Assert.That(append!.DiskFull).IsFalse();
    }
}
