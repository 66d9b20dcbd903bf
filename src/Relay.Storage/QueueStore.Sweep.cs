using System.Buffers.Binary;
using Relay.Storage.Native;

namespace Relay.Storage;

// Retention (message TTL, idle queues), the disk budget and eviction of idle handles.
public sealed partial class QueueStore
{
    /// <summary>Entries of the expiry or idle index handled per round; each round waits for its writes.</summary>
    internal const int SweepChunk = 1024;

    private readonly SemaphoreSlim _sweepLock = new(1, 1);
    private ITimer? _sweepTimer;
    private Task _timerSweep = Task.CompletedTask;
    private int _timerSweepRunning;

    private long _diskCheckedAt = long.MinValue;
    private bool _overDiskBudget;

    /// <summary>
    /// Called by the idle-queue sweep once it found a queue idle and unsubscribed, before it deletes
    /// it. For tests of what a SUB arriving then gets.
    /// </summary>
    internal Action<QueueHandle>? BeforeIdleDelete;

    /// <summary>
    /// Called by the message expiry with the handle it found for an entry of the expiry index, before
    /// it takes the queue's lock. For tests of a handle that goes stale then.
    /// </summary>
    internal Action<QueueHandle>? BeforeExpire;

    private void StartSweepTimer()
    {
        if (_options.SweepInterval > TimeSpan.Zero)
        {
            _sweepTimer = _options.Clock.CreateTimer(_ => OnSweepTimer(), null, _options.SweepInterval, _options.SweepInterval);
        }
    }

    private void OnSweepTimer()
    {
        if (Volatile.Read(ref _disposed) != 0 || Interlocked.CompareExchange(ref _timerSweepRunning, 1, 0) != 0)
        {
            return;
        }
        _timerSweep = Task.Run(async () =>
        {
            try
            {
                await SweepExpiredAsync().ConfigureAwait(false);
            }
            catch (Exception)
            {
                // Counted; the next tick retries. Nothing was lost: a failed sweep deletes nothing.
                Interlocked.Increment(ref _statistics._sweepFailures);
            }
            finally
            {
                Volatile.Write(ref _timerSweepRunning, 0);
            }
        });
    }

    private async ValueTask StopSweepTimerAsync()
    {
        if (_sweepTimer is not null)
        {
            await _sweepTimer.DisposeAsync().ConfigureAwait(false);
        }
        await _timerSweep.ConfigureAwait(false);
    }

    /// <summary>
    /// Deletes messages older than <see cref="QueueStoreOptions.MessageTtl"/> and, when
    /// <see cref="QueueStoreOptions.IdleQueueTtl"/> is set, queues without activity for that long.
    /// Returns the number of messages expired. Also runs every <see cref="QueueStoreOptions.SweepInterval"/>.
    /// </summary>
    public async ValueTask<int> SweepExpiredAsync()
    {
        ObjectDisposedException.ThrowIf(Volatile.Read(ref _closing) != 0, this);
        await _sweepLock.WaitAsync().ConfigureAwait(false);
        try
        {
            uint now = NowHour();
            int expired = 0;
            // A message of hour h expires once hour h has ended more than the TTL ago: never early.
            uint ttlHours = (uint)Math.Ceiling(_options.MessageTtl.TotalHours);
            if (now > ttlHours)
            {
                expired = await ExpireMessagesAsync(now - ttlHours).ConfigureAwait(false);
            }
            uint idleHours = (uint)Math.Ceiling(_options.IdleQueueTtl.TotalHours);
            if (_options.IdleQueueTtl > TimeSpan.Zero && now > idleHours)
            {
                await ExpireIdleQueuesAsync(now - idleHours).ConfigureAwait(false);
            }
            return expired;
        }
        finally
        {
            _sweepLock.Release();
        }
    }

    /// <summary>Deletes every message with hour &lt; cutoff, guided by the expiry index.</summary>
    private async ValueTask<int> ExpireMessagesAsync(uint cutoff)
    {
        int expired = 0;
        var entries = new List<(uint Hour, byte[] RecipientId)>();
        var ops = new List<WriteOp>();
        (uint, byte[])? after = null;
        // Each chunk goes on after the last entry of the one before, as in ExpireIdleQueuesAsync: the
        // entries of stale handles stay, and a whole chunk of them must not end the sweep (from the
        // first entry again, it would read the same chunk for ever).
        while (ReadHourIndex(Cf.Expiry, cutoff, entries, after) > 0)
        {
            after = entries[^1];
            int count = 0;
            try
            {
                foreach ((uint hour, byte[] recipientId) in entries)
                {
                    QueueHandle? queue = FindByRecipientId(recipientId);
                    if (queue is null)
                    {
                        ops.Add(DeleteIndexEntry(Cf.Expiry, hour, recipientId));
                        continue;
                    }
                    BeforeExpire?.Invoke(queue);
                    if (Acquire(queue))
                    {
                        WriteOp op = ExpireQueueMessages(queue, hour, cutoff);
                        count += op.Count;   // read before the op goes back to its pool
                        ops.Add(op);
                    }
                    // else: the handle went stale in between (evicted, then replaced or the queue
                    // deleted); the entry stays, and the next sweep finds the current handle or none.
                }
            }
            catch
            {
                // Staging refused (a failed write is being undone, the store closing): the ones staged
                // are awaited all the same, so that each goes back to its pool.
                await AwaitAllAsync(ops, rethrow: false).ConfigureAwait(false);
                throw;
            }
            await AwaitAllAsync(ops, rethrow: true).ConfigureAwait(false);
            expired += count;
        }
        return expired;
    }

    /// <summary>
    /// Awaits every operation in <paramref name="ops"/> (an awaited one goes back to its pool) and
    /// clears the list; then throws the first failure when <paramref name="rethrow"/>.
    /// </summary>
    private static async ValueTask AwaitAllAsync(List<WriteOp> ops, bool rethrow)
    {
        Exception? first = null;
        foreach (WriteOp op in ops)
        {
            try
            {
                await op.AsStatusTask().ConfigureAwait(false);
            }
            catch (Exception e)
            {
                first ??= e;
            }
        }
        ops.Clear();
        if (rethrow && first is not null)
        {
            System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(first);
        }
    }

    /// <summary>Called holding the queue's StoreLock (released here).</summary>
    private WriteOp ExpireQueueMessages(QueueHandle queue, uint entryHour, uint cutoff)
    {
        try
        {
            WriteOp op;
            Span<byte> key = stackalloc byte[Keys.MessageKeyLength];
            Span<byte> expiryKey = stackalloc byte[Keys.HourKeyLength];
            Keys.HourKey(expiryKey, entryHour, queue.RecipientId);
            EnterRead();
            try
            {
                // The old messages are found first, holding only this queue's lock: reading them may
                // go to disk, and every other writer waits while the batch lock is held.
                List<ulong>? ids = null;
                long bytes = 0;
                if (!queue.Deleted)
                {
                    using RocksDb.Iterator it = OpenMessages(queue);
                    // Ids and hours both increase within a queue: stop at the first young message.
                    for (; it.Valid; it.Next())
                    {
                        ReadOnlySpan<byte> value = it.Value;
                        if (BinaryPrimitives.ReadUInt32BigEndian(value) >= cutoff)
                        {
                            break;
                        }
                        (ids ??= []).Add(Keys.MessageIdOf(it.Key));
                        bytes += value.Length - Keys.MessageHeaderLength;
                    }
                }
                // Rented only now: a failed read above leaves nothing behind.
                op = RentOp(OpKind.Expire, queue);
                using BatchScope batch = BeginBatch(op);
                op.MessageId = queue.OldestBound;
                if (ids is not null)
                {
                    foreach (ulong id in ids)
                    {
                        Keys.MessageKey(key, queue.RecipientId, id);
                        batch.DeleteMessage(key);
                    }
                    op.Count = ids.Count;
                    op.Bytes = bytes;
                    queue.OldestBound = ids[^1] + 1;
                    queue.MessageCount -= op.Count;
                    queue.ByteCount -= op.Bytes;
                }
                batch.Delete(Cf.Expiry, expiryKey);
                batch.Add(op);
            }
            finally
            {
                ExitRead();
            }
            return op;
        }
        finally
        {
            queue.StoreLock.Exit();
        }
    }

    /// <summary>Deletes queues whose last activity is before <paramref name="cutoff"/>, guided by the idle index.</summary>
    private async ValueTask ExpireIdleQueuesAsync(uint cutoff)
    {
        var entries = new List<(uint Hour, byte[] RecipientId)>();
        var ops = new List<WriteOp>();
        (uint, byte[])? after = null;
        // Each chunk goes on after the last entry of the one before: entries that stay (queues with a
        // subscriber) never hide the ones behind them.
        while (ReadHourIndex(Cf.Idle, cutoff, entries, after) > 0)
        {
            after = entries[^1];
            try
            {
                foreach ((uint hour, byte[] recipientId) in entries)
                {
                    QueueHandle? queue = FindByRecipientId(recipientId);
                    if (queue is null)
                    {
                        ops.Add(DeleteIndexEntry(Cf.Idle, hour, recipientId));
                        continue;
                    }
                    if (!Acquire(queue))
                    {
                        // The handle went stale in between (evicted, then replaced or the queue deleted):
                        // the entry stays for the next sweep, which finds the current handle or none
                        // (dropping it while the queue exists would exempt the queue for ever).
                        continue;
                    }
                    bool idle = false;
                    try
                    {
                        if (queue.LastActiveHour != hour)
                        {
                            // Stale entry (a failed write left it): drop it and make sure the current one exists.
                            ops.Add(FixIdleEntry(queue, hour));
                        }
                        else if (queue.Tag is not null && !queue.Deleted)
                        {
                            ops.Add(KeepSubscribed(queue));
                        }
                        else if (!queue.Deleted)
                        {
                            idle = true;
                        }
                    }
                    finally
                    {
                        queue.StoreLock.Exit();
                    }
                    if (idle)
                    {
                        BeforeIdleDelete?.Invoke(queue);
                        if (DeleteIdleQueue(queue, hour) is WriteOp op)
                        {
                            ops.Add(op);
                        }
                    }
                }
            }
            catch
            {
                // Staging refused: the ones staged are awaited all the same (see ExpireMessagesAsync).
                await AwaitAllAsync(ops, rethrow: false).ConfigureAwait(false);
                throw;
            }
            await AwaitAllAsync(ops, rethrow: true).ConfigureAwait(false);
        }
    }

    /// <summary>
    /// A queue with a live subscriber is in use even without traffic: it is active now, so once its
    /// subscriber leaves it has the whole idle TTL again (not a deletion at the next sweep). Caller
    /// holds the queue's StoreLock.
    /// </summary>
    private WriteOp KeepSubscribed(QueueHandle queue)
    {
        WriteOp op = RentOp(OpKind.Activity, queue);
        StageActivity(queue, op, NowHour());
        return op;
    }

    /// <summary>
    /// Deletes a queue the sweep found idle (last active in <paramref name="hour"/>) and without a
    /// subscriber, unless it was used, subscribed or deleted since; null when it was not deleted.
    /// </summary>
    private WriteOp? DeleteIdleQueue(QueueHandle queue, uint hour)
    {
        // The server subscribes a queue (sets its Tag) under its Sync lock, where it refuses a queue
        // already deleted. Holding Sync here from the check to the delete, a SUB comes either before
        // (the queue is in use and kept) or after (it finds the queue deleted and is refused); never
        // between, where it would be answered OK for a queue about to be deleted, without an END.
        // Sync before StoreLock: the order the server takes them in.
        lock (queue.Sync)
        {
            if (!Acquire(queue))
            {
                return null;   // stale meanwhile: the next sweep decides on the current handle
            }
            try
            {
                if (queue.Deleted || queue.LastActiveHour != hour)
                {
                    return null;   // deleted by its recipient, or used, meanwhile
                }
                if (queue.Tag is not null)
                {
                    return KeepSubscribed(queue);
                }
                WriteOp op = RentOp(OpKind.Delete, queue);
                op.Idle = true;
                EnqueueDelete(queue, op);
                return op;
            }
            finally
            {
                queue.StoreLock.Exit();
            }
        }
    }

    private WriteOp FixIdleEntry(QueueHandle queue, uint staleHour)
    {
        Span<byte> key = stackalloc byte[Keys.HourKeyLength];
        WriteOp op = RentOp(OpKind.Meta, null);
        using BatchScope batch = BeginBatch(op);
        Keys.HourKey(key, staleHour, queue.RecipientId);
        batch.Delete(Cf.Idle, key);
        Keys.HourKey(key, queue.LastActiveHour, queue.RecipientId);
        batch.Put(Cf.Idle, key, []);
        batch.Add(op);
        return op;
    }

    private WriteOp DeleteIndexEntry(int cf, uint hour, ReadOnlySpan<byte> recipientId)
    {
        Span<byte> key = stackalloc byte[Keys.HourKeyLength];
        Keys.HourKey(key, hour, recipientId);
        WriteOp op = RentOp(OpKind.Meta, null);
        using BatchScope batch = BeginBatch(op);
        batch.Delete(cf, key);
        batch.Add(op);
        return op;
    }

    /// <summary>Reads up to <see cref="SweepChunk"/> entries with hour &lt; cutoff from an hour index, from its first or from the one after <paramref name="after"/>.</summary>
    private int ReadHourIndex(int cf, uint cutoff, List<(uint Hour, byte[] RecipientId)> entries, (uint Hour, byte[] RecipientId)? after = null)
    {
        entries.Clear();
        Span<byte> upper = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32BigEndian(upper, cutoff);
        Span<byte> from = stackalloc byte[Keys.HourKeyLength];
        EnterRead();
        try
        {
            using RocksDb.Iterator it = _db.CreateIterator(cf, [], upper);
            if (after is var (afterHour, afterId))
            {
                Keys.HourKey(from, afterHour, afterId);
                it.Seek(from);
                if (it.Valid && it.Key.SequenceEqual(from))
                {
                    it.Next();
                }
            }
            else
            {
                it.SeekToFirst();
            }
            for (; it.Valid && entries.Count < SweepChunk; it.Next())
            {
                ReadOnlySpan<byte> key = it.Key;
                if (key.Length == Keys.HourKeyLength)
                {
                    entries.Add((BinaryPrimitives.ReadUInt32BigEndian(key), key[4..].ToArray()));
                }
            }
        }
        finally
        {
            ExitRead();
        }
        return entries.Count;
    }

    /// <summary>
    /// True when the store's files (SST plus WAL) reached <see cref="QueueStoreOptions.DiskBudgetBytes"/>.
    /// Recomputed at most once a second.
    /// </summary>
    public bool IsOverDiskBudget
    {
        get
        {
            if (_options.DiskBudgetBytes <= 0)
            {
                return false;
            }
            long now = Environment.TickCount64;
            long last = Volatile.Read(ref _diskCheckedAt);
            if ((last == long.MinValue || now - last >= 1000) && Interlocked.CompareExchange(ref _diskCheckedAt, now, last) == last)
            {
                Volatile.Write(ref _overDiskBudget, ComputeDiskBytes() >= _options.DiskBudgetBytes);
            }
            return Volatile.Read(ref _overDiskBudget);
        }
    }

    /// <summary>Forgets the cached disk-budget answer (tests; after an operator freed space).</summary>
    internal void RefreshDiskBudget() => Volatile.Write(ref _diskCheckedAt, long.MinValue);

    internal long ComputeDiskBytes()
    {
        long total = 0;
        EnterRead();
        try
        {
            for (int cf = 0; cf < _db.ColumnFamilyCount; cf++)
            {
                total += _db.PropertyLong(cf, "rocksdb.total-sst-files-size");
            }
        }
        finally
        {
            ExitRead();
        }
        try
        {
            foreach (FileInfo file in new DirectoryInfo(_options.Path).EnumerateFiles("*.log"))
            {
                try
                {
                    total += file.Length;
                }
                catch (FileNotFoundException)
                {
                    // A WAL file recycled meanwhile.
                }
            }
        }
        catch (IOException)
        {
        }
        return total;
    }

    /// <summary>
    /// Drops from memory the handles without a <see cref="QueueHandle.Tag"/>, without writes in flight
    /// and not used for <paramref name="minIdle"/>; returns how many. The server calls it periodically
    /// and must not keep a handle without a Tag for longer than <paramref name="minIdle"/>: a stale
    /// handle comes back to life on its next use, its state read again from the store as a fresh
    /// load's is (another handle may have used the queue meanwhile), unless another handle of the
    /// queue is loaded then or the queue was deleted, in which case its operations answer NotFound.
    /// </summary>
    public int EvictIdle(TimeSpan minIdle)
    {
        long now = Environment.TickCount64;
        long idleMs = (long)minIdle.TotalMilliseconds;
        int evicted = 0;
        bool issuedIds = false;
        lock (_loadLock)
        {
            foreach (KeyValuePair<QueueKey, QueueHandle> entry in _queues)
            {
                QueueHandle queue = entry.Value;
                if (now - Volatile.Read(ref queue.LastUsedTicks) < idleMs)
                {
                    continue;
                }
                lock (queue.StoreLock)
                {
                    if (queue.Tag is not null || Volatile.Read(ref queue.PendingOps) != 0 || queue.Deleted)
                    {
                        continue;
                    }
                    queue.Evicted = true;
                    ClearTail(queue);
                    Interlocked.Increment(ref _handleRemovals);   // before the removal: see Load
                    _queues.TryRemove(entry);
                    _senders.TryRemove(new QueueKey(queue.SenderId), out _);
                    evicted++;
                    issuedIds |= queue.NextId > Volatile.Read(ref _epochBase);
                }
            }
            if (issuedIds)
            {
                // A handle loaded again (or this one revived) may find no stored message (all
                // acked): a new epoch keeps its next ids above the ones it issued. Enqueued before any reload (which needs
                // _loadLock), so no id of the new epoch is durable before the epoch itself.
                BumpEpoch();
            }
        }
        return evicted;
    }

    /// <summary>Caller holds _loadLock.</summary>
    private void BumpEpoch()
    {
        Span<byte> value = stackalloc byte[8];
        WriteOp op = RentOp(OpKind.Epoch, null);
        op.Detached = true;
        using BatchScope batch = BeginBatch(evenWhileUndoing: true);
        ulong epoch = ++_epoch;
        BinaryPrimitives.WriteUInt64BigEndian(value, epoch);
        batch.Put(Cf.Default, Keys.EpochKey, value);
        batch.Add(op);
        Volatile.Write(ref _epochBase, epoch << 32);
    }
}

// Space reclamation and store-wide estimates (for the server's maintenance loop and metrics).
public sealed partial class QueueStore
{
    /// <summary>
    /// Flushes the memtables (so the WAL files holding them are deleted) and compacts every column
    /// family (so acknowledged, expired and deleted messages leave the table files), then recomputes
    /// the disk-budget answer. Blocking and I/O-heavy: the server calls it from its maintenance loop
    /// only when the store is over its disk budget and something was deleted since the last call.
    /// Returns the on-disk bytes afterwards.
    /// </summary>
    public long ReclaimSpace()
    {
        EnterRead();
        try
        {
            _db.FlushAll();
            _db.CompactAll();
        }
        finally
        {
            ExitRead();
        }
        RefreshDiskBudget();
        return ComputeDiskBytes();
    }

    /// <summary>Sum over every column family of an integer RocksDB property (0 where unknown).</summary>
    internal long SumProperty(string name)
    {
        long total = 0;
        EnterRead();
        try
        {
            for (int cf = 0; cf < _db.ColumnFamilyCount; cf++)
            {
                total += _db.PropertyLong(cf, name);
            }
        }
        finally
        {
            ExitRead();
        }
        return total;
    }

    internal long Property(int cf, string name)
    {
        EnterRead();
        try
        {
            return _db.PropertyLong(cf, name);
        }
        finally
        {
            ExitRead();
        }
    }
}
