using System.Buffers.Binary;
using System.Collections.Concurrent;
using Relay.Protocol;
using Relay.Storage.Native;

namespace Relay.Storage;

// On-disk layout (RocksDB, one column family per kind of record; all integers big-endian):
//
//   default   "epoch" → u64. Incremented and written (fsynced) once per Open, and again whenever
//             idle queue handles are evicted from memory. Message ids of a queue handle start at
//             max(last stored id + 1, epoch << 32), so ids are never reused by a queue, not even
//             after every message was acknowledged and the relay restarted, without writing
//             anything per message besides the message itself. The first open of a backup
//             jumps it ahead instead (see "backup").
//             "backup" → u32 hour. Only in a backup not opened yet: the hour it was made in.
//   queues    recipientId(24) → u8 version (1) ‖ u8 status (bit 0 secured, bit 1 suspended)
//             ‖ senderId(24) ‖ recipientKey(32) ‖ deliveryKey(32) ‖ senderKey(32, zeros while
//             unsecured) ‖ u32 createdHour ‖ u32 lastActiveHour                      (130 bytes)
//   senders   senderId(24) → recipientId(24)
//   messages  recipientId(24) ‖ u64 messageId → u32 hour ‖ u8 flags ‖ body
//   expiry    u32 hour ‖ recipientId(24) → empty. Written with the first message of a queue in
//             each hour, so the sweeper finds queues holding old messages without scanning messages.
//   idle      u32 lastActiveHour ‖ recipientId(24) → empty. Moved when lastActiveHour changes (at
//             most once per hour per queue), so idle-queue expiry reads only what is old enough.
//
// Hours are whole hours since the Unix epoch; nothing finer is stored. Table files use block-based
// format_version 5 and no compression, readable by RocksDB 7.8 and 11.x alike.

/// <summary>
/// In-memory handle of a queue that has been touched since start-up (loaded lazily by a point read;
/// start-up never scans the store). One handle per queue at a time; the server hangs its
/// subscription state on <see cref="Tag"/> and uses <see cref="Sync"/> to order its own work.
/// </summary>
public sealed class QueueHandle
{
    public const int IdLength = 24;
    public const int KeyLength = 32;

    public required byte[] RecipientId { get; init; }   // 24 bytes
    public required byte[] SenderId { get; init; }      // 24 bytes
    public required byte[] RecipientKey { get; init; }  // 32 bytes, X25519 public
    public required byte[] DeliveryKey { get; init; }   // 32 bytes, symmetric
    public byte[]? SenderKey { get; internal set; }      // 32 bytes once secured
    public bool Suspended { get; internal set; }

    /// <summary>
    /// The queue takes no more commands: it is deleted, or its deletion is being written
    /// (<see cref="Deletion"/> tells the two apart).
    /// </summary>
    public bool Deleted
    {
        get => _deletion != QueueDeletion.None;
        internal set => _deletion = value ? QueueDeletion.Done : QueueDeletion.None;
    }

    /// <summary>
    /// Whether the queue is deleted, or its deletion is staged and not durable yet (then a failed write
    /// undoes it and the queue comes back). One read, so the two never mix: changed under the store's
    /// lock of the queue.
    /// </summary>
    public QueueDeletion Deletion
    {
        get => _deletion;
        internal set => _deletion = value;
    }

    private volatile QueueDeletion _deletion;
    /// <summary>Messages stored or being stored (appends reserve their place before they are durable).</summary>
    public int MessageCount { get; internal set; }
    /// <summary>Body bytes stored or being stored.</summary>
    public long ByteCount { get; internal set; }

    /// <summary>
    /// Lock for the server's per-queue ordering (subscription, delivery state). The store takes it
    /// only to delete an idle queue (its check of <see cref="Tag"/> and the delete as one step to a
    /// SUB), before its own lock: whoever holds Sync may call the store, never the other way round.
    /// </summary>
    public Lock Sync { get; } = new();

    /// <summary>Server-owned state (the subscription); the store never touches it.</summary>
    public object? Tag { get; set; }

    // Store-owned state, guarded by StoreLock (PendingOps and LastUsedTicks are also read without it).
    internal readonly Lock StoreLock = new();
    internal uint CreatedHour;
    internal uint LastActiveHour;
    /// <summary>Hour of the last expiry entry this handle wrote (0: none yet since loaded).</summary>
    internal uint LastExpiryHour;
    internal ulong NextId;
    /// <summary>No stored message has a smaller id: reads seek here and skip the tombstones of acked messages.</summary>
    internal ulong OldestBound;
    /// <summary>Ids and body lengths of the messages handed out by TryPeek, so their ACKs need no read (QueueStore.Tail.cs).</summary>
    internal PeekedMessages? Peeked;
    internal int PendingOps;
    internal bool Evicted;
    /// <summary>Ids below this are durable: set by the writer thread after each committed append.</summary>
    internal ulong DurableNextId;
    /// <summary>Messages held in memory for a live subscriber (null: none); see QueueStore.Tail.cs.</summary>
    internal DeliveryTail? Tail;
    internal bool KeepTail;
    internal long LastUsedTicks;
}

/// <summary>Where a queue stands with its deletion (<see cref="QueueHandle.Deletion"/>).</summary>
public enum QueueDeletion : byte
{
    /// <summary>Not deleted.</summary>
    None,
    /// <summary>
    /// Its deletion (its recipient's, or the idle-queue sweep's) is staged and not durable yet: if the
    /// write fails, the deletion is undone and the queue is back. Commands on it answer
    /// <see cref="StoreStatus.Deleting"/> meanwhile, not NotFound: whether it is gone is not known yet.
    /// </summary>
    Pending,
    /// <summary>Deleted for good (durably, or its creation undone, or found gone from the store).</summary>
    Done,
}

/// <summary>The RocksDB queue store. Thread-safe. See docs/OPERATIONS.md for the on-disk layout.</summary>
public sealed partial class QueueStore : IAsyncDisposable, IDisposable
{
    private const long BlockCacheBytes = 64L * 1024 * 1024;
    internal const int MessageHintPrefix = Keys.Id + 1;

    private readonly QueueStoreOptions _options;
    private readonly RocksDb _db;
    private readonly StoreStatistics _statistics;
    private readonly ConcurrentDictionary<QueueKey, QueueHandle> _queues = new();
    /// <summary>Sender id to recipient id of the loaded queues, so a SEND needs no index read (the pair never changes).</summary>
    private readonly ConcurrentDictionary<QueueKey, byte[]> _senders = new();
    /// <summary>Serializes loading, resurrecting and evicting handles, so at most one handle per queue exists.</summary>
    private readonly Lock _loadLock = new();
    /// <summary>Serializes queue creation (existence checks and the registration of new ids).</summary>
    private readonly Lock _createLock = new();
    private readonly HashSet<QueueKey> _pendingSenders = [];
    private ulong _epoch;
    private ulong _epochBase;
    // Handles taken out of _queues (deleted, creation undone, evicted); counted before each removal.
    private long _handleRemovals;

    // Native reads in flight; Dispose waits for them before closing the database.
    private int _readers;
    private int _closing;
    private int _disposed;

    private QueueStore(QueueStoreOptions options, RocksDb db, ulong epoch)
    {
        _options = options;
        _db = db;
        _epoch = epoch;
        _epochBase = epoch << 32;
        _statistics = new StoreStatistics(this);
    }

    public StoreStatistics Statistics => _statistics;

    internal int LoadedQueueCount => _queues.Count;

    /// <summary>
    /// Opens or creates the store. Throws <see cref="StoreException"/> with a clear message when the
    /// directory is unusable or already open (in this or another process).
    /// </summary>
    public static QueueStore Open(QueueStoreOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        if (options.MaxMessagesPerQueue <= 0 || options.MaxBytesPerQueue <= 0)
        {
            throw new ArgumentException("Queue quotas must be positive.", nameof(options));
        }
        try
        {
            // Its name survives a power loss: RocksDB syncs the directory's contents, not its name.
            DurableDirectory.Create(options.Path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new StoreException($"Cannot create the store directory {options.Path}: {e.Message}", e);
        }

        // A queue's message keys (recipient id ‖ increasing id) grow within their prefix: the recipient
        // id and the id's first byte (0 until the epoch reaches 2^24: that many opens, or 16 restored
        // backups; see NextEpochOfBackup). One byte longer than the recipient id because a queue's
        // range delete starts at the bare recipient id, outside the prefix's domain: RocksDB 7.8 would
        // otherwise use the point keys' hint for the range tombstone (its MemTable::Add does not keep
        // the two apart; later versions do) and crash.
        RocksDb db = RocksDb.Open(options.Path, Keys.ColumnFamilies, BlockCacheBytes, options.DeferCompactions, (Cf.Messages, MessageHintPrefix));
        QueueStore store;
        try
        {
            Span<byte> value = stackalloc byte[8];
            ulong epoch = db.Get(Cf.Default, Keys.EpochKey, value) == 8 ? BinaryPrimitives.ReadUInt64BigEndian(value) : 0;
            // The first start of a backup (its mark, the hour it was made in, is deleted with the write):
            // far enough ahead of every id given since (see NextEpochOfBackup).
            bool backup = db.Get(Cf.Default, Keys.BackupHourKey, value) == 4;
            epoch = backup ? NextEpochOfBackup(epoch, BinaryPrimitives.ReadUInt32BigEndian(value), options.Clock.GetUtcNow()) : epoch + 1;
            BinaryPrimitives.WriteUInt64BigEndian(value, epoch);
            db.PutSync(Cf.Default, Keys.EpochKey, value, backup ? Keys.BackupHourKey : default);
            store = new QueueStore(options, db, epoch);
        }
        catch
        {
            db.Dispose();
            throw;
        }
        store.StartWriter();
        store.StartSweepTimer();
        return store;
    }

    private int _compactionsResumed;

    /// <summary>Turns RocksDB's automatic compactions on after an open with <see cref="QueueStoreOptions.DeferCompactions"/>.</summary>
    public void ResumeCompactions()
    {
        if (_options.DeferCompactions && Interlocked.Exchange(ref _compactionsResumed, 1) == 0)
        {
            EnterRead();
            try
            {
                _db.EnableAutoCompactions();
            }
            finally
            {
                ExitRead();
            }
        }
    }

    internal uint NowHour() => (uint)(_options.Clock.GetUtcNow().ToUnixTimeSeconds() / 3600);

    /// <summary>
    /// Called before a lookup reads the database because the queue it names is not in memory (its
    /// record, or a sender id's index entry). Throwing fails the lookup as a failed disk read would.
    /// For tests of what the layers above do then; a lookup served from memory never calls it.
    /// </summary>
    internal Action? BeforeLookupRead;

    /// <summary>The queue of a recipient id; null when there is none, or it is deleted or being deleted.</summary>
    public QueueHandle? FindByRecipientId(ReadOnlySpan<byte> recipientId) => Live(LookUp(recipientId));

    /// <summary>The queue of a sender id; null when there is none, or it is deleted or being deleted.</summary>
    public QueueHandle? FindBySenderId(ReadOnlySpan<byte> senderId) => Live(LookUpSender(senderId));

    /// <summary>
    /// Finds the queue of a sender id (<paramref name="senderSide"/>) or recipient id: Ok with its
    /// handle; NotFound (null) when there is none or it is deleted; <see cref="StoreStatus.Deleting"/>
    /// with its handle while its deletion is being written and may yet be undone, so that the caller
    /// can check a command's authorization against the queue's keys before it answers "try again".
    /// </summary>
    public StoreStatus Find(ReadOnlySpan<byte> id, bool senderSide, out QueueHandle? queue)
    {
        queue = senderSide ? LookUpSender(id) : LookUp(id);
        switch (queue?.Deletion)
        {
            case QueueDeletion.None:
                return StoreStatus.Ok;
            case QueueDeletion.Pending:
                return StoreStatus.Deleting;
            default:
                queue = null;
                return StoreStatus.NotFound;
        }
    }

    private static QueueHandle? Live(QueueHandle? queue) => queue is null || queue.Deleted ? null : queue;

    /// <summary>The handle of a recipient id, deleted or not (null: no such queue).</summary>
    private QueueHandle? LookUp(ReadOnlySpan<byte> recipientId)
    {
        if (recipientId.Length != QueueHandle.IdLength)
        {
            return null;
        }
        var key = new QueueKey(recipientId);
        if (!_queues.TryGetValue(key, out QueueHandle? queue))
        {
            queue = Load(recipientId, key);
        }
        if (queue is not null)
        {
            Volatile.Write(ref queue.LastUsedTicks, Environment.TickCount64);
        }
        return queue;
    }

    /// <summary>The handle of a sender id, deleted or not (null: no such queue).</summary>
    private QueueHandle? LookUpSender(ReadOnlySpan<byte> senderId)
    {
        if (senderId.Length != QueueHandle.IdLength)
        {
            return null;
        }
        var senderKey = new QueueKey(senderId);
        if (_senders.TryGetValue(senderKey, out byte[]? known))
        {
            QueueHandle? loaded = LookUp(known);
            if (loaded is not null && senderId.SequenceEqual(loaded.SenderId))
            {
                return loaded;
            }
        }
        Span<byte> recipientId = stackalloc byte[QueueHandle.IdLength];
        EnterRead();
        int length;
        try
        {
            BeforeLookupRead?.Invoke();
            length = _db.Get(Cf.Senders, senderId, recipientId);
        }
        finally
        {
            ExitRead();
        }
        if (length != QueueHandle.IdLength)
        {
            return null;
        }
        QueueHandle? queue = LookUp(recipientId);
        if (queue is null || !senderId.SequenceEqual(queue.SenderId))
        {
            return null;
        }
        if (!queue.Deleted)
        {
            _senders[senderKey] = queue.RecipientId;
        }
        return queue;
    }

    /// <summary>Reads a queue record and its messages' totals into a new handle (null when there is no such queue).</summary>
    private QueueHandle? Load(ReadOnlySpan<byte> recipientId, QueueKey key)
    {
        EnterRead();
        try
        {
            // The reads happen outside _loadLock: a lookup of an unknown id (any client can send one)
            // or the count of a long queue must not hold up every other load and eviction. Without a
            // handle in memory nothing writes the queue, so what is read stays true, unless a handle
            // that existed meanwhile was removed (a DEL made durable, say): then it is read again
            // under the lock, as every load was before.
            BeforeLookupRead?.Invoke();
            long removals = Interlocked.Read(ref _handleRemovals);
            Span<byte> record = stackalloc byte[Keys.QueueRecordLength];
            bool found = Read(recipientId, record, out var totals);
            lock (_loadLock)
            {
                if (_queues.TryGetValue(key, out QueueHandle? existing))
                {
                    return existing;
                }
                if (Interlocked.Read(ref _handleRemovals) != removals)
                {
                    found = Read(recipientId, record, out totals);
                }
                if (!found)
                {
                    return null;
                }
                QueueHandle queue = Keys.ParseQueueRecord(recipientId, record);
                SetTotals(queue, totals);
                _queues[key] = queue;
                return queue;
            }
        }
        finally
        {
            ExitRead();
        }
    }

    /// <summary>
    /// Sets what a handle knows of its messages from their stored totals, and its next id above every
    /// id issued before. Caller holds _loadLock, under which evictions bump the epoch: read here, the
    /// epoch base is above every id an evicted handle issued, so no id is issued twice.
    /// </summary>
    private void SetTotals(QueueHandle queue, (int Count, long Bytes, ulong First, ulong Last) totals)
    {
        var (count, bytes, first, last) = totals;
        ulong epochBase = Volatile.Read(ref _epochBase);
        queue.MessageCount = count;
        queue.ByteCount = bytes;
        queue.OldestBound = first;
        queue.NextId = count > 0 ? Math.Max(last + 1, epochBase) : epochBase;
        queue.DurableNextId = queue.NextId;
    }

    /// <summary>The queue's record (false: none) and, when there is one, its messages' totals.</summary>
    private bool Read(ReadOnlySpan<byte> recipientId, Span<byte> record, out (int Count, long Bytes, ulong First, ulong Last) totals)
    {
        bool found = _db.Get(Cf.Queues, recipientId, record) == Keys.QueueRecordLength;
        totals = found ? ReadMessageTotals(recipientId) : default;
        return found;
    }

    /// <summary>Counts a queue's stored messages (at most a quota's worth): count, body bytes, first and last id.</summary>
    private (int Count, long Bytes, ulong First, ulong Last) ReadMessageTotals(ReadOnlySpan<byte> recipientId)
    {
        Span<byte> lower = stackalloc byte[Keys.MessageKeyLength];
        Span<byte> upper = stackalloc byte[Keys.MessageKeyLength + 1];
        Keys.MessageKey(lower, recipientId, 0);
        Keys.MessageUpperBound(upper, recipientId);
        using RocksDb.Iterator it = _db.CreateIterator(Cf.Messages, lower, upper);
        int count = 0;
        long bytes = 0;
        ulong first = 0, last = 0;
        for (it.SeekToFirst(); it.Valid; it.Next())
        {
            ulong id = Keys.MessageIdOf(it.Key);
            if (count == 0)
            {
                first = id;
            }
            last = id;
            count++;
            bytes += it.Value.Length - Keys.MessageHeaderLength;
        }
        return (count, bytes, first, last);
    }

    /// <summary>
    /// Enters the queue's store lock. An evicted handle first comes back to life as a fresh load
    /// would make it (see <see cref="Revive"/>). False: the handle is stale, because another handle of
    /// the queue is loaded or the queue no longer exists; the caller answers NotFound.
    /// </summary>
    private bool Acquire(QueueHandle queue)
    {
        Volatile.Write(ref queue.LastUsedTicks, Environment.TickCount64);
        while (true)
        {
            queue.StoreLock.Enter();
            if (!queue.Evicted)
            {
                return true;
            }
            queue.StoreLock.Exit();
            if (!Revive(queue))
            {
                return false;
            }
        }
    }

    /// <summary>
    /// Puts an evicted handle back into use with its state read again from the store: while it was
    /// out, other handles of the queue may have been loaded, used and evicted in turn (moving the
    /// queue's messages, its sender key and status), or deleted the queue. Its next id continues
    /// above every id issued before, as a fresh load's does. False: another handle of the queue is
    /// loaded, or its record is gone or belongs to another queue (the handle is marked Deleted).
    /// True: the handle is in use again (or already was); the caller checks again.
    /// </summary>
    private bool Revive(QueueHandle queue)
    {
        if (queue.Deleted)
        {
            return false;
        }
        var key = new QueueKey(queue.RecipientId);
        EnterRead();
        try
        {
            // Read outside _loadLock and again under it if a handle was removed meanwhile, as in Load.
            long removals = Interlocked.Read(ref _handleRemovals);
            Span<byte> record = stackalloc byte[Keys.QueueRecordLength];
            bool found = Read(queue.RecipientId, record, out var totals);
            lock (_loadLock)
            {
                lock (queue.StoreLock)
                {
                    if (!queue.Evicted)
                    {
                        return true;
                    }
                    if (queue.Deleted || _queues.ContainsKey(key))
                    {
                        return false;
                    }
                    if (Interlocked.Read(ref _handleRemovals) != removals)
                    {
                        found = Read(queue.RecipientId, record, out totals);
                    }
                    QueueHandle? stored = found ? Keys.ParseQueueRecord(queue.RecipientId, record) : null;
                    if (stored is null
                        || !stored.SenderId.AsSpan().SequenceEqual(queue.SenderId)
                        || !stored.RecipientKey.AsSpan().SequenceEqual(queue.RecipientKey)
                        || !stored.DeliveryKey.AsSpan().SequenceEqual(queue.DeliveryKey))
                    {
                        queue.Deleted = true;
                        return false;
                    }
                    queue.SenderKey = stored.SenderKey;
                    queue.Suspended = stored.Suspended;
                    queue.CreatedHour = stored.CreatedHour;
                    queue.LastActiveHour = stored.LastActiveHour;
                    queue.LastExpiryHour = 0;
                    queue.Peeked?.Clear();
                    ClearTail(queue);
                    SetTotals(queue, totals);
                    if (!_queues.TryAdd(key, queue))
                    {
                        return false;   // a queue created meanwhile under this id (creation does not take _loadLock)
                    }
                    queue.Evicted = false;
                    return true;
                }
            }
        }
        finally
        {
            ExitRead();
        }
    }

    private void EnterRead()
    {
        Interlocked.Increment(ref _readers);
        if (Volatile.Read(ref _closing) != 0)
        {
            Interlocked.Decrement(ref _readers);
            throw new ObjectDisposedException(nameof(QueueStore));
        }
    }

    private void ExitRead() => Interlocked.Decrement(ref _readers);

    /// <summary>Finishes pending writes, stops the sweeper, flushes and closes the database. Idempotent.</summary>
    public void Dispose() => DisposeAsync().AsTask().GetAwaiter().GetResult();

    public async ValueTask DisposeAsync()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
        {
            return;
        }
        await StopSweepTimerAsync().ConfigureAwait(false);
        StopWriter();
        Interlocked.Exchange(ref _closing, 1);
        SpinWait spin = default;
        while (Volatile.Read(ref _readers) != 0)
        {
            spin.SpinOnce();
        }
        try
        {
            _db.FlushAll();
        }
        finally
        {
            _db.Dispose();
        }
    }
}
