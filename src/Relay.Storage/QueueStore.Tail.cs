using System.Buffers;
using System.Buffers.Binary;
using Relay.Storage.Native;

namespace Relay.Storage;

/// <summary>One message of a queue held in memory: its id, header fields and a rented copy of the body.</summary>
internal struct TailEntry
{
    public ulong Id;
    public uint Hour;
    public byte Flags;
    public byte[]? Buffer;   // null: dropped (its append failed)
    public int Length;
}

/// <summary>The in-memory messages of one subscribed queue, in id order (a ring). Guarded by the queue's StoreLock.</summary>
internal sealed class DeliveryTail
{
    private TailEntry[] _items = new TailEntry[4];
    private int _head;
    private int _count;

    public int Count => _count;
    public ref TailEntry Front => ref _items[_head];
    public ref TailEntry Back => ref _items[(_head + _count - 1) % _items.Length];
    public ref TailEntry this[int i] => ref _items[(_head + i) % _items.Length];

    public bool CanGrow(int max) => _count < _items.Length || _items.Length < max;

    public void PushBack(in TailEntry entry)
    {
        Grow();
        _items[(_head + _count) % _items.Length] = entry;
        _count++;
    }

    public void PushFront(in TailEntry entry)
    {
        Grow();
        _head = (_head - 1 + _items.Length) % _items.Length;
        _items[_head] = entry;
        _count++;
    }

    public void PopFront()
    {
        _items[_head] = default;
        _head = (_head + 1) % _items.Length;
        _count--;
    }

    private void Grow()
    {
        if (_count < _items.Length)
        {
            return;
        }
        var larger = new TailEntry[_items.Length * 2];
        for (int i = 0; i < _count; i++)
        {
            larger[i] = _items[(_head + i) % _items.Length];
        }
        _items = larger;
        _head = 0;
    }
}

/// <summary>
/// The messages a queue handed out for delivery and not yet acknowledged, in id order, with their
/// body lengths: an ACK of the first one needs no read to know it is the oldest and how large it is.
/// Invariant: the first entry was the queue's oldest stored message when it was read, and each
/// later entry the first stored message after the one before it. Only an ACK of the oldest, an
/// expiry (a prefix) or a deletion removes stored messages, so while the entries at or above
/// OldestBound are kept, the first of them is still the oldest. Anything that could break this
/// (an undone ACK or expiry, a peek that does not continue the run) empties it: a miss costs a read,
/// never a wrong answer. Guarded by the queue's StoreLock.
/// </summary>
internal sealed class PeekedMessages
{
    /// <summary>Most entries kept; a longer run stops being recorded (its ACKs read instead).</summary>
    public const int Capacity = 256;

    private readonly Queue<(ulong Id, int Length)> _run = new();

    public int Count => _run.Count;
    /// <summary>Id of the entry added last (valid while <see cref="Count"/> &gt; 0).</summary>
    public ulong LastId { get; private set; }

    public void Clear() => _run.Clear();

    /// <summary>False when full (the caller clears: a gap would break the invariant).</summary>
    public bool TryAdd(ulong id, int length)
    {
        if (_run.Count == Capacity)
        {
            return false;
        }
        _run.Enqueue((id, length));
        LastId = id;
        return true;
    }

    /// <summary>
    /// Takes the entries up to <paramref name="lastId"/> (at most <c>ids.Length</c>) when the last of
    /// them is <paramref name="lastId"/>: their ids, count and body bytes. False (nothing taken)
    /// when the run ends before it or it is not in the run.
    /// </summary>
    public bool TryTakeThrough(ulong lastId, Span<ulong> ids, out int count, out long bytes)
    {
        count = 0;
        bytes = 0;
        foreach (var (id, length) in _run)
        {
            if (count == ids.Length || id > lastId)
            {
                break;
            }
            ids[count++] = id;
            bytes += length;
        }
        if (count == 0 || ids[count - 1] != lastId)
        {
            count = 0;
            bytes = 0;
            return false;
        }
        for (int i = 0; i < count; i++)
        {
            _run.Dequeue();
        }
        return true;
    }

    /// <summary>Drops entries below <paramref name="bound"/> (expired or acknowledged).</summary>
    public void RemoveBelow(ulong bound)
    {
        while (_run.TryPeek(out var first) && first.Id < bound)
        {
            _run.Dequeue();
        }
    }
}

// The delivery tail: while a queue has a live subscriber, its messages are also held in memory in id
// order, so a delivery after a commit or an ACK is served without reading RocksDB. Two sources fill
// it: each append (a copy of the body, taken when the append is queued), and, when a delivery finds
// the next message missing (a backlog stored before the subscription, or over the budget), one
// iterator that reads the next messages ahead in a single pass instead of one point read each. An
// entry is only handed out once its append is durable (id < DurableNextId), so a subscriber never
// sees a message before its sender's OK could be sent. RocksDB stays the source of truth: a missing
// entry costs a read, never a message; memory is bounded by QueueStoreOptions.DeliveryTailBytes.
public sealed partial class QueueStore
{
    /// <summary>Messages read ahead by one iterator when a delivery misses the tail.</summary>
    internal const int ReadAhead = 64;

    /// <summary>Most messages one queue's tail holds.</summary>
    internal const int MaxTailEntries = 4096;

    /// <summary>Most messages one <see cref="AckAsync(QueueHandle, ulong, int, out int)"/> deletes.</summary>
    public const int MaxAckCount = PeekedMessages.Capacity;

    private long _tailBytes;

    /// <summary>
    /// Keeps (true) or stops keeping (false) the queue's messages in memory for delivery.
    /// The server turns it on while the queue has a subscriber.
    /// </summary>
    public void KeepTail(QueueHandle queue, bool keep)
    {
        ArgumentNullException.ThrowIfNull(queue);
        lock (queue.StoreLock)
        {
            queue.KeepTail = keep;
            if (!keep)
            {
                ClearTail(queue);
            }
        }
    }

    /// <summary>Bytes of message bodies held by delivery tails now.</summary>
    internal long TailBytes => Interlocked.Read(ref _tailBytes);

    private bool TailHasRoom(int bytes) => Interlocked.Read(ref _tailBytes) + bytes <= _options.DeliveryTailBytes;

    /// <summary>Caller holds StoreLock and has assigned <paramref name="id"/> (the queue's newest) to the append.</summary>
    private void AddToTail(QueueHandle queue, ulong id, uint hour, byte flags, ReadOnlySpan<byte> body)
    {
        if (!queue.KeepTail || !TailHasRoom(body.Length))
        {
            return;
        }
        DeliveryTail tail = queue.Tail ??= new DeliveryTail();
        if (!tail.CanGrow(MaxTailEntries))
        {
            return;
        }
        tail.PushBack(NewEntry(id, hour, flags, body));
    }

    private TailEntry NewEntry(ulong id, uint hour, byte flags, ReadOnlySpan<byte> body)
    {
        byte[] buffer = MessageBuffers.Shared.Rent(body.Length);
        body.CopyTo(buffer);
        Interlocked.Add(ref _tailBytes, body.Length);
        return new TailEntry { Id = id, Hour = hour, Flags = flags, Buffer = buffer, Length = body.Length };
    }

    /// <summary>
    /// Takes the message <paramref name="id"/> from the tail when it is there and durable; the caller
    /// owns the buffer afterwards. Entries below <paramref name="id"/> (acknowledged, expired or
    /// dropped) are released on the way. Caller holds StoreLock.
    /// </summary>
    private bool TryTakeFromTail(QueueHandle queue, ulong id, out StoredMessage message)
    {
        message = default;
        DeliveryTail? tail = queue.Tail;
        if (tail is null)
        {
            return false;
        }
        while (tail.Count > 0 && (tail.Front.Id < id || tail.Front.Buffer is null))
        {
            Release(ref tail.Front);
            tail.PopFront();
        }
        if (tail.Count == 0 || tail.Front.Id != id || id >= Volatile.Read(ref queue.DurableNextId))
        {
            return false;
        }
        ref TailEntry front = ref tail.Front;
        message = new StoredMessage { Id = id, Hour = front.Hour, Flags = front.Flags, Buffer = front.Buffer!, Length = front.Length };
        Interlocked.Add(ref _tailBytes, -front.Length);
        tail.PopFront();
        return true;
    }

    /// <summary>
    /// Reads the first stored message at or after <paramref name="from"/> with one iterator and puts up
    /// to <see cref="ReadAhead"/> of the messages after it (those not in the tail already) into the
    /// tail. Caller holds StoreLock and the read lock; the queue keeps a tail.
    /// </summary>
    private bool ReadAheadIntoTail(QueueHandle queue, ulong from, out StoredMessage message)
    {
        message = default;
        DeliveryTail tail = queue.Tail ??= new DeliveryTail();
        ulong stopAt = tail.Count > 0 ? tail.Front.Id : ulong.MaxValue;
        TailEntry[] ahead = ArrayPool<TailEntry>.Shared.Rent(ReadAhead);
        int n = 0;
        using (RocksDb.Iterator it = OpenMessages(queue, from))
        {
            if (!it.Valid)
            {
                ArrayPool<TailEntry>.Shared.Return(ahead);
                return false;
            }
            message = ToMessage(it);
            for (it.Next(); n < ReadAhead && it.Valid; it.Next())
            {
                ulong id = Keys.MessageIdOf(it.Key);
                ReadOnlySpan<byte> value = it.Value;
                if (id >= stopAt || !TailHasRoom(value.Length) || !tail.CanGrow(MaxTailEntries))
                {
                    break;
                }
                ahead[n++] = NewEntry(id, BinaryPrimitives.ReadUInt32BigEndian(value), value[4], value[Keys.MessageHeaderLength..]);
            }
        }
        for (int i = n - 1; i >= 0; i--)
        {
            tail.PushFront(ahead[i]);
        }
        ArrayPool<TailEntry>.Shared.Return(ahead, clearArray: true);
        return true;
    }

    private static StoredMessage ToMessage(RocksDb.Iterator it)
    {
        ReadOnlySpan<byte> value = it.Value;
        ReadOnlySpan<byte> body = value[Keys.MessageHeaderLength..];
        byte[] buffer = MessageBuffers.Shared.Rent(body.Length);
        body.CopyTo(buffer);
        return new StoredMessage
        {
            Id = Keys.MessageIdOf(it.Key),
            Hour = BinaryPrimitives.ReadUInt32BigEndian(value),
            Flags = value[4],
            Buffer = buffer,
            Length = body.Length,
        };
    }

    /// <summary>Drops the entry of an append that failed. Caller holds StoreLock.</summary>
    private void DropFromTail(QueueHandle queue, ulong id)
    {
        DeliveryTail? tail = queue.Tail;
        if (tail is null)
        {
            return;
        }
        for (int i = tail.Count - 1; i >= 0; i--)
        {
            ref TailEntry entry = ref tail[i];
            if (entry.Id == id)
            {
                Release(ref entry);   // leaves a hole that TryTakeFromTail skips
                return;
            }
            if (entry.Id < id)
            {
                return;
            }
        }
    }

    /// <summary>Caller holds StoreLock.</summary>
    private void ClearTail(QueueHandle queue)
    {
        DeliveryTail? tail = queue.Tail;
        if (tail is null)
        {
            return;
        }
        while (tail.Count > 0)
        {
            Release(ref tail.Front);
            tail.PopFront();
        }
        queue.Tail = null;
    }

    private void Release(ref TailEntry entry)
    {
        if (entry.Buffer is not null)
        {
            Interlocked.Add(ref _tailBytes, -entry.Length);
            MessageBuffers.Shared.Return(entry.Buffer);
        }
        entry.Buffer = null;
        entry.Length = 0;
    }
}
