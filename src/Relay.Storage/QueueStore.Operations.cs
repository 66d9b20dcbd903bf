using System.Buffers;
using System.Buffers.Binary;
using System.Runtime.CompilerServices;
using Relay.Storage.Native;

namespace Relay.Storage;

// The queue operations. Each one decides under the queue's StoreLock, updates the handle at once
// (so concurrent callers see reserved quota, advanced bounds, new status) and enqueues its
// mutations in the same critical section, which keeps one queue's writes in call order. When the
// batch fails, OnFailed undoes the in-memory change (see QueueStore.Completion.cs).
public sealed partial class QueueStore
{
    /// <summary>
    /// Creates a queue. Ids are random from the caller; Conflict if either id exists; StoreFull over
    /// the disk budget or while the disk is full (<see cref="IsDiskFull"/>). Durable when completed.
    /// </summary>
    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder<>))]
    public async ValueTask<(StoreStatus Status, QueueHandle? Queue)> CreateQueueAsync(
        byte[] recipientId, byte[] senderId, byte[] recipientKey, byte[] deliveryKey)
    {
        CheckLength(recipientId, QueueHandle.IdLength, nameof(recipientId));
        CheckLength(senderId, QueueHandle.IdLength, nameof(senderId));
        CheckLength(recipientKey, QueueHandle.KeyLength, nameof(recipientKey));
        CheckLength(deliveryKey, QueueHandle.KeyLength, nameof(deliveryKey));
        if (_diskFull || IsOverDiskBudget)
        {
            return (StoreStatus.StoreFull, null);
        }

        var recipientKeyId = new QueueKey(recipientId);
        var senderKeyId = new QueueKey(senderId);
        QueueHandle queue;
        WriteOp op;
        lock (_createLock)
        {
            if (_queues.ContainsKey(recipientKeyId) || _pendingSenders.Contains(senderKeyId) || Exists(Cf.Queues, recipientId) || Exists(Cf.Senders, senderId))
            {
                return (StoreStatus.Conflict, null);
            }
            uint hour = NowHour();
            queue = new QueueHandle
            {
                RecipientId = (byte[])recipientId.Clone(),
                SenderId = (byte[])senderId.Clone(),
                RecipientKey = (byte[])recipientKey.Clone(),
                DeliveryKey = (byte[])deliveryKey.Clone(),
                CreatedHour = hour,
                LastActiveHour = hour,
                NextId = Volatile.Read(ref _epochBase),
                LastUsedTicks = Environment.TickCount64,
            };
            Span<byte> record = stackalloc byte[Keys.QueueRecordLength];
            Span<byte> idleKey = stackalloc byte[Keys.HourKeyLength];
            Keys.QueueRecord(record, queue);
            Keys.HourKey(idleKey, hour, recipientId);
            op = RentOp(OpKind.Create, queue);
            using (BatchScope batch = BeginBatch())
            {
                // Registered while the batch lock is held: BeginBatch throws (changing nothing) once closing.
                _queues[recipientKeyId] = queue;
                _pendingSenders.Add(senderKeyId);
                batch.Put(Cf.Queues, recipientId, record);
                batch.Put(Cf.Senders, senderId, recipientId);
                batch.Put(Cf.Idle, idleKey, []);
                batch.Add(op);
            }
        }
        StoreStatus status = await op.AsStatusTask().ConfigureAwait(false);
        return (status, status == StoreStatus.Ok ? queue : null);
    }

    /// <summary>
    /// Appends a message. <paramref name="body"/> is copied before this returns. NotFound (deleted),
    /// Deleting (its deletion being written), Suspended, StoreFull, QuotaExceeded; otherwise the new
    /// id and hour once durable.
    /// </summary>
    /// <param name="quickContinuation">
    /// The caller's continuation neither blocks nor runs long: it may then run on the writer thread
    /// (see <see cref="CompletionScope"/>). A blocking wait there for another write would never end.
    /// </param>
    public ValueTask<AppendResult> AppendAsync(QueueHandle queue, byte flags, ReadOnlySpan<byte> body, bool quickContinuation = false)
    {
        ArgumentNullException.ThrowIfNull(queue);
        if (!Acquire(queue))
        {
            return new(new AppendResult(StoreStatus.NotFound, 0, 0));
        }
        try
        {
            if (queue.Deleted)
            {
                return new(new AppendResult(Gone(queue), 0, 0));
            }
            if (queue.Suspended)
            {
                return new(new AppendResult(StoreStatus.Suspended, 0, 0));
            }
            if (_diskFull || IsOverDiskBudget)
            {
                return new(new AppendResult(StoreStatus.StoreFull, 0, 0));
            }
            if (queue.MessageCount + 1 > _options.MaxMessagesPerQueue || queue.ByteCount + body.Length > _options.MaxBytesPerQueue)
            {
                return new(new AppendResult(StoreStatus.QuotaExceeded, 0, 0));
            }

            uint hour = NowHour();
            Span<byte> key = stackalloc byte[Keys.MessageKeyLength];
            Span<byte> header = stackalloc byte[Keys.MessageHeaderLength];
            BinaryPrimitives.WriteUInt32BigEndian(header, hour);
            header[4] = flags;
            WriteOp op = RentOp(OpKind.Append, queue);
            op.Quick = quickContinuation;
            ulong id;
            using (BatchScope batch = BeginBatch())
            {
                id = queue.NextId++;
                if (queue.MessageCount == 0)
                {
                    // Nothing stored: no message is older than this one, so reads start right at it.
                    queue.OldestBound = Math.Max(queue.OldestBound, id);
                }
                queue.MessageCount++;
                queue.ByteCount += body.Length;
                op.MessageId = id;
                op.Hour = hour;
                op.Bytes = body.Length;
                Keys.MessageKey(key, queue.RecipientId, id);
                batch.Put(Cf.Messages, key, header, body);
                if (queue.LastExpiryHour != hour)
                {
                    Span<byte> expiryKey = stackalloc byte[Keys.HourKeyLength];
                    Keys.HourKey(expiryKey, hour, queue.RecipientId);
                    batch.Put(Cf.Expiry, expiryKey, []);
                    queue.LastExpiryHour = hour;
                    op.WroteExpiry = true;
                }
                TouchActivity(batch, queue, op, hour);
                batch.Add(op);
            }
            // After the batch lock (shared by every connection), still under the queue's lock: no
            // delivery of this queue can look before the entry is there.
            AddToTail(queue, id, hour, flags, body);
            return op.AsAppendTask();
        }
        finally
        {
            queue.StoreLock.Exit();
        }
    }

    /// <summary>
    /// Called before <see cref="TryPeek"/> reads a message from the database (one not held in memory).
    /// Throwing fails the read as a failed disk read would. For tests of what the layers above do then.
    /// </summary>
    internal Action? BeforeRead;

    /// <summary>
    /// Reads the oldest durable message of the queue; false when there is none. The body is in a
    /// pooled buffer (MessageBuffers): call <see cref="StoredMessage.Return"/>.
    /// </summary>
    public bool TryPeekOldest(QueueHandle queue, out StoredMessage message) => TryPeek(queue, 0, out message);

    /// <summary>
    /// Reads the first durable message whose id is at least <paramref name="from"/> (the oldest when
    /// <paramref name="from"/> is at or below it); false when there is none yet. A subscriber with a
    /// delivery window passes the id after the one it delivered last. The body is in a buffer rented
    /// from MessageBuffers: call <see cref="StoredMessage.Return"/>.
    /// </summary>
    public bool TryPeek(QueueHandle queue, ulong from, out StoredMessage message) => TryPeek(queue, from, memoryOnly: false, out message, out _);

    /// <summary>
    /// <see cref="TryPeek(QueueHandle, ulong, out StoredMessage)"/>, but with <paramref name="memoryOnly"/>
    /// it never reads the store: false with <paramref name="needsRead"/> set when the message is there
    /// but not in memory (for a caller on a thread that must not wait for the disk).
    /// </summary>
    public bool TryPeek(QueueHandle queue, ulong from, bool memoryOnly, out StoredMessage message, out bool needsRead)
    {
        ArgumentNullException.ThrowIfNull(queue);
        message = new StoredMessage { Buffer = [] };
        needsRead = false;
        if (!Acquire(queue))
        {
            return false;
        }
        try
        {
            ulong bound = Math.Max(from, queue.OldestBound);
            if (queue.Deleted || queue.MessageCount == 0 || bound >= Volatile.Read(ref queue.DurableNextId))
            {
                // Nothing durable at or after the bound: only appends still waiting for their commit.
                return false;
            }
            bool found;
            if (TryTakeFromTail(queue, bound, out message))
            {
                Interlocked.Increment(ref _statistics._peeksFromMemory);
                found = true;
            }
            else if (memoryOnly)
            {
                needsRead = true;
                return false;
            }
            else
            {
                Interlocked.Increment(ref _statistics._peeksFromStore);
                EnterRead();
                try
                {
                    BeforeRead?.Invoke();
                    if (queue.KeepTail)
                    {
                        // A subscriber behind its tail (a backlog): read the next messages in one pass.
                        found = ReadAheadIntoTail(queue, bound, out message);
                    }
                    else
                    {
                        // Ids of a queue are consecutive within a run, so the message wanted is usually at
                        // exactly the bound: one point read, much cheaper than creating an iterator.
                        found = TryReadAt(queue, bound, out message);
                        if (!found)
                        {
                            using RocksDb.Iterator it = OpenMessages(queue, bound);
                            found = it.Valid;
                            if (found)
                            {
                                message = ToMessage(it);
                            }
                        }
                    }
                }
                catch (Exception)
                {
                    Interlocked.Increment(ref _statistics._readFailures);
                    throw;
                }
                finally
                {
                    ExitRead();
                }
            }
            if (found)
            {
                RecordPeek(queue, bound, message);
            }
            return found;
        }
        finally
        {
            queue.StoreLock.Exit();
        }
    }

    /// <summary>Keeps the run of handed-out messages (see <see cref="PeekedMessages"/>). Caller holds StoreLock.</summary>
    private static void RecordPeek(QueueHandle queue, ulong bound, in StoredMessage message)
    {
        PeekedMessages peeked = queue.Peeked ??= new PeekedMessages();
        if (bound == queue.OldestBound)
        {
            // The oldest message: a run starts here.
            peeked.Clear();
            peeked.TryAdd(message.Id, message.Length);
            return;
        }
        peeked.RemoveBelow(queue.OldestBound);
        if (peeked.Count > 0 && bound == peeked.LastId + 1)
        {
            if (!peeked.TryAdd(message.Id, message.Length))
            {
                peeked.Clear();
            }
        }
        else
        {
            // Not a continuation of the recorded run (its start is unknown here): record nothing.
            peeked.Clear();
        }
    }

    /// <summary>Deletes the queue's oldest message, which must be <paramref name="messageId"/> (NotOldest otherwise).</summary>
    public ValueTask<StoreStatus> AckAsync(QueueHandle queue, ulong messageId) => AckAsync(queue, messageId, 1, out _);

    /// <summary>
    /// True when no message with an id up to <paramref name="messageId"/> is stored any more (all were
    /// acknowledged or expired): an ACK of such an id finds nothing, and nothing is left to wait for.
    /// Exact for the id of a message the store handed out (what a subscriber acknowledges); for an id
    /// never issued it may answer false with nothing stored up to it.
    /// </summary>
    public bool IsGone(QueueHandle queue, ulong messageId)
    {
        ArgumentNullException.ThrowIfNull(queue);
        lock (queue.StoreLock)
        {
            return messageId < queue.OldestBound || queue.MessageCount == 0;
        }
    }

    /// <summary>
    /// Deletes, in one operation, the queue's oldest messages up to and including <paramref name="lastId"/>:
    /// at most <paramref name="maxCount"/> of them, and <paramref name="lastId"/> must be among them
    /// (NotOldest and nothing deleted otherwise). <paramref name="deleted"/>: how many (0 unless Ok is
    /// to come). Messages that left the queue meanwhile (expired) simply are not among them.
    /// <paramref name="quickContinuation"/>: as for <see cref="AppendAsync"/>.
    /// </summary>
    public ValueTask<StoreStatus> AckAsync(QueueHandle queue, ulong lastId, int maxCount, out int deleted, bool quickContinuation = false)
    {
        ArgumentNullException.ThrowIfNull(queue);
        ArgumentOutOfRangeException.ThrowIfLessThan(maxCount, 1);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(maxCount, MaxAckCount);
        deleted = 0;
        if (!Acquire(queue))
        {
            return new(StoreStatus.NotFound);
        }
        try
        {
            if (queue.Deleted)
            {
                return new(Gone(queue));
            }
            if (queue.MessageCount == 0 || lastId < queue.OldestBound)
            {
                return new(StoreStatus.NotOldest);
            }
            Span<ulong> found = stackalloc ulong[maxCount];
            int count;
            long bytes;
            // The messages handed out start at the oldest stored (PeekedMessages' invariant) and carry
            // their lengths: when they reach lastId no read is needed.
            PeekedMessages? peeked = queue.Peeked;
            peeked?.RemoveBelow(queue.OldestBound);
            if (peeked is null || !peeked.TryTakeThrough(lastId, found, out count, out bytes))
            {
                peeked?.Clear();
                if (!TryReadThrough(queue, lastId, found, out count, out bytes))
                {
                    return new(StoreStatus.NotOldest);
                }
            }
            ReadOnlySpan<ulong> ids = found[..count];

            Span<byte> key = stackalloc byte[Keys.MessageKeyLength];
            WriteOp op = RentOp(OpKind.Ack, queue);
            op.Quick = quickContinuation;
            BatchScope batch;
            try
            {
                batch = BeginBatch();
            }
            catch
            {
                // Refused (closing, or undoing a failed write): the messages taken from the handed-out
                // run are still stored, so the run no longer starts at the oldest. Start it afresh.
                peeked?.Clear();
                throw;
            }
            deleted = count;
            using (batch)
            {
                queue.OldestBound = lastId + 1;
                queue.MessageCount -= count;
                queue.ByteCount -= bytes;
                op.MessageId = ids[0];
                op.Count = count;
                op.Bytes = bytes;
                foreach (ulong id in ids)
                {
                    Keys.MessageKey(key, queue.RecipientId, id);
                    batch.DeleteMessage(key);
                }
                TouchActivity(batch, queue, op, NowHour());
                batch.Add(op);
            }
            return op.AsStatusTask();
        }
        finally
        {
            queue.StoreLock.Exit();
        }
    }

    /// <summary>
    /// The ids (at most <c>ids.Length</c>) and body bytes of the queue's oldest messages up to
    /// <paramref name="lastId"/>; false unless the last of them is <paramref name="lastId"/>. Caller holds StoreLock.
    /// </summary>
    private bool TryReadThrough(QueueHandle queue, ulong lastId, Span<ulong> ids, out int count, out long bytes)
    {
        count = 0;
        bytes = 0;
        EnterRead();
        try
        {
            using RocksDb.Iterator it = OpenMessages(queue);
            for (; count < ids.Length && it.Valid; it.Next())
            {
                ulong id = Keys.MessageIdOf(it.Key);
                if (id > lastId)
                {
                    break;
                }
                ids[count++] = id;
                bytes += it.Value.Length - Keys.MessageHeaderLength;
            }
            return count > 0 && ids[count - 1] == lastId;
        }
        finally
        {
            ExitRead();
        }
    }

    /// <summary>Ok when the queue was unsecured (the key is set) or is secured with this key; Conflict for another key.</summary>
    public ValueTask<StoreStatus> SecureAsync(QueueHandle queue, ReadOnlySpan<byte> senderKey)
    {
        ArgumentNullException.ThrowIfNull(queue);
        if (senderKey.Length != QueueHandle.KeyLength)
        {
            throw new ArgumentException($"A sender key is {QueueHandle.KeyLength} bytes.", nameof(senderKey));
        }
        if (!Acquire(queue))
        {
            return new(StoreStatus.NotFound);
        }
        try
        {
            if (queue.Deleted)
            {
                return new(Gone(queue));
            }
            if (queue.SenderKey is not null)
            {
                // Same key: a retry. Answer once the first SKEY's write is durable too.
                return senderKey.SequenceEqual(queue.SenderKey) ? Barrier(queue) : new(StoreStatus.Conflict);
            }
            return WriteRecord(queue, OpKind.Secure, senderKey.ToArray(), suspend: false);
        }
        finally
        {
            queue.StoreLock.Exit();
        }
    }

    /// <summary>Refuses further appends (Suspended); stored messages stay readable.</summary>
    public ValueTask<StoreStatus> SuspendAsync(QueueHandle queue)
    {
        ArgumentNullException.ThrowIfNull(queue);
        if (!Acquire(queue))
        {
            return new(StoreStatus.NotFound);
        }
        try
        {
            if (queue.Deleted)
            {
                return new(Gone(queue));
            }
            return queue.Suspended ? Barrier(queue) : WriteRecord(queue, OpKind.Suspend, null, suspend: true);
        }
        finally
        {
            queue.StoreLock.Exit();
        }
    }

    /// <summary>
    /// Deletes the queue record, its sender index entry and all its messages; marks the handle Deleted
    /// (<see cref="QueueDeletion.Pending"/> until durable). Every operation on a deleted queue answers
    /// NotFound, or <see cref="StoreStatus.Deleting"/> while the deletion is being written.
    /// </summary>
    public ValueTask<StoreStatus> DeleteQueueAsync(QueueHandle queue)
    {
        ArgumentNullException.ThrowIfNull(queue);
        if (!Acquire(queue))
        {
            return new(StoreStatus.NotFound);
        }
        try
        {
            if (queue.Deleted)
            {
                return new(Gone(queue));
            }
            WriteOp op = RentOp(OpKind.Delete, queue);
            EnqueueDelete(queue, op);
            return op.AsStatusTask();
        }
        finally
        {
            queue.StoreLock.Exit();
        }
    }

    /// <summary>
    /// What an operation on a deleted queue answers: NotFound, or Deleting while its deletion is being
    /// written (it may yet fail, and the queue come back). Caller holds the queue's StoreLock.
    /// </summary>
    private static StoreStatus Gone(QueueHandle queue) =>
        queue.Deletion == QueueDeletion.Pending ? StoreStatus.Deleting : StoreStatus.NotFound;

    /// <summary>Caller holds the queue's StoreLock.</summary>
    private void EnqueueDelete(QueueHandle queue, WriteOp op)
    {
        Span<byte> end = stackalloc byte[Keys.MessageKeyLength + 1];
        Span<byte> idleKey = stackalloc byte[Keys.HourKeyLength];
        Keys.MessageUpperBound(end, queue.RecipientId);
        Keys.HourKey(idleKey, queue.LastActiveHour, queue.RecipientId);
        using BatchScope batch = BeginBatch(op);
        queue.Deletion = QueueDeletion.Pending;   // Done once durable, None again if undone
        ClearTail(queue);
        batch.Delete(Cf.Queues, queue.RecipientId);
        batch.Delete(Cf.Senders, queue.SenderId);
        // One range tombstone instead of a delete per message (and it covers appends still in flight).
        // It starts at the bare recipient id, which sorts before every message key of the queue and
        // after every key of a smaller one, and is shorter than the memtable hint prefix (QueueStore.Open).
        batch.DeleteRange(Cf.Messages, queue.RecipientId, end);
        batch.Delete(Cf.Idle, idleKey);
        // Expiry entries of the queue stay; the sweeper drops them when it finds no queue.
        batch.Add(op);
    }

    /// <summary>Caller holds the queue's StoreLock.</summary>
    private ValueTask<StoreStatus> WriteRecord(QueueHandle queue, OpKind kind, byte[]? senderKey, bool suspend)
    {
        Span<byte> record = stackalloc byte[Keys.QueueRecordLength];
        WriteOp op = RentOp(kind, queue);
        using (BatchScope batch = BeginBatch())
        {
            if (senderKey is not null)
            {
                queue.SenderKey = senderKey;
            }
            if (suspend)
            {
                queue.Suspended = true;
            }
            uint hour = NowHour();
            // TouchActivity writes the record itself when the hour moved; otherwise write it here.
            if (!TouchActivity(batch, queue, op, hour))
            {
                Keys.QueueRecord(record, queue);
                batch.Put(Cf.Queues, queue.RecipientId, record);
            }
            batch.Add(op);
        }
        return op.AsStatusTask();
    }

    /// <summary>
    /// Records that the queue's recipient used it without writing anything else (a SUB or a GET):
    /// moves its last-active hour, which idle-queue expiry reads, when the hour changed (at most one
    /// write per queue and hour, the same as a SEND's). Not awaited: no answer depends on it. Nothing
    /// is staged while writes fail (a full disk); the recipient's next use tries again.
    /// </summary>
    public void MarkActive(QueueHandle queue)
    {
        ArgumentNullException.ThrowIfNull(queue);
        uint hour = NowHour();
        if (queue.LastActiveHour >= hour || WritesFailing)
        {
            return;   // the usual case: a SUB or GET within the hour of the queue's last activity
        }
        if (!Acquire(queue))
        {
            return;
        }
        try
        {
            if (queue.Deleted || queue.LastActiveHour >= hour)
            {
                return;
            }
            WriteOp op = RentOp(OpKind.Activity, queue);
            op.Detached = true;
            StageActivity(queue, op, hour);
        }
        catch (Exception e) when (e is StoreException or ObjectDisposedException)
        {
            // Refused (a failed write being undone, the store closing): the hour stays as it is on disk.
        }
        finally
        {
            queue.StoreLock.Exit();
        }
    }

    /// <summary>Stages <paramref name="op"/> moving the queue's last-active hour to <paramref name="hour"/>, later than it is. Caller holds the queue's StoreLock.</summary>
    private void StageActivity(QueueHandle queue, WriteOp op, uint hour)
    {
        using BatchScope batch = BeginBatch(op);
        MoveActivity(batch, queue, op, hour);
        batch.Add(op);
    }

    /// <summary>An operation without mutations: completes when everything before it is durable.</summary>
    private ValueTask<StoreStatus> Barrier(QueueHandle queue)
    {
        WriteOp op = RentOp(OpKind.Barrier, queue);
        using (BatchScope batch = BeginBatch(op))
        {
            batch.Add(op);
        }
        return op.AsStatusTask();
    }

    /// <summary>
    /// Moves the queue's last-active hour (record and idle index) when it changed: at most one extra
    /// write per queue and hour. Caller holds the queue's StoreLock and the batch. True when the
    /// record was written.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static bool TouchActivity(BatchScope batch, QueueHandle queue, WriteOp op, uint hour) =>
        queue.LastActiveHour < hour && MoveActivity(batch, queue, op, hour);

    /// <summary>The write of <see cref="TouchActivity"/>, once an hour per queue (out of line: each SEND and ACK calls the check).</summary>
    private static bool MoveActivity(BatchScope batch, QueueHandle queue, WriteOp op, uint hour)
    {
        Span<byte> idleKey = stackalloc byte[Keys.HourKeyLength];
        Keys.HourKey(idleKey, queue.LastActiveHour, queue.RecipientId);
        batch.Delete(Cf.Idle, idleKey);
        Keys.HourKey(idleKey, hour, queue.RecipientId);
        batch.Put(Cf.Idle, idleKey, []);
        op.PreviousActiveHour = queue.LastActiveHour;
        queue.LastActiveHour = hour;
        Span<byte> record = stackalloc byte[Keys.QueueRecordLength];
        Keys.QueueRecord(record, queue);
        batch.Put(Cf.Queues, queue.RecipientId, record);
        return true;
    }

    /// <summary>Point read of message <paramref name="id"/> into a rented buffer. Caller holds StoreLock and a read.</summary>
    private bool TryReadAt(QueueHandle queue, ulong id, out StoredMessage message)
    {
        Span<byte> key = stackalloc byte[Keys.MessageKeyLength];
        Keys.MessageKey(key, queue.RecipientId, id);
        Span<byte> header = stackalloc byte[Keys.MessageHeaderLength];
        if (_db.TryGetRented(Cf.Messages, key, header, out byte[] rented, out int rentedLength))
        {
            message = new StoredMessage
            {
                Id = id,
                Hour = BinaryPrimitives.ReadUInt32BigEndian(header),
                Flags = header[4],
                Buffer = rented,
                Length = rentedLength,
            };
            return true;
        }
        message = new StoredMessage { Buffer = [] };
        return false;
    }

    /// <summary>An iterator positioned on the queue's oldest durable message (if any). Caller holds StoreLock and a read.</summary>
    private RocksDb.Iterator OpenMessages(QueueHandle queue) => OpenMessages(queue, queue.OldestBound);

    /// <summary>An iterator positioned on the queue's first message with an id of at least <paramref name="from"/>. Caller holds StoreLock and a read.</summary>
    private RocksDb.Iterator OpenMessages(QueueHandle queue, ulong from)
    {
        Span<byte> lower = stackalloc byte[Keys.MessageKeyLength];
        Span<byte> upper = stackalloc byte[Keys.MessageKeyLength + 1];
        Keys.MessageKey(lower, queue.RecipientId, from);
        Keys.MessageUpperBound(upper, queue.RecipientId);
        // Messages are read to be delivered and then deleted: their blocks are not worth a place in the
        // block cache (filling it made a fresh relay grow by its size while draining, a page fault per block).
        RocksDb.Iterator it = _db.CreateIterator(Cf.Messages, lower, upper, fillCache: false);
        it.SeekToFirst();
        return it;
    }

    private bool Exists(int cf, ReadOnlySpan<byte> key)
    {
        EnterRead();
        try
        {
            return _db.Get(cf, key, []) >= 0;
        }
        finally
        {
            ExitRead();
        }
    }

    private static void CheckLength(byte[] value, int length, string name)
    {
        ArgumentNullException.ThrowIfNull(value, name);
        if (value.Length != length)
        {
            throw new ArgumentException($"{name} must be {length} bytes.", name);
        }
    }
}
