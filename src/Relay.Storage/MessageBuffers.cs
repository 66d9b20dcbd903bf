namespace Relay.Storage;

/// <summary>
/// The buffers that hold message bodies in memory between an append (or a read) and the delivery
/// that writes them out: the delivery tails and <see cref="StoredMessage"/>. ArrayPool&lt;byte&gt;.Shared
/// keeps a few dozen arrays of a size per core; a live relay has thousands of messages between
/// append and delivery, so most of its rents allocated and most of its returns were dropped (about 4%
/// of the relay's CPU in a live run, and fresh pages for the collector; docs/PERFORMANCE.md, twelfth
/// round). Here each power-of-two size from 256 bytes to 64 KiB has a stack, and together they keep up
/// to a fixed number of bytes (32 MiB for <see cref="Shared"/>): what a burst needed stays for the next one, no more.
/// Thread-safe; a buffer may be returned by another thread than the one that rented it.
/// </summary>
internal sealed class MessageBuffers
{
    private const int MinShift = 8;    // 256 bytes
    private const int MaxShift = 16;   // 64 KiB: the largest message (ProtocolConstants.DefaultMaxMessage) fits

    /// <summary>Most bytes <see cref="Shared"/> keeps in all its stacks together.</summary>
    internal const long DefaultMaxRetainedBytes = 32L * 1024 * 1024;

    /// <summary>The pool of every store in the process.</summary>
    public static MessageBuffers Shared { get; } = new(DefaultMaxRetainedBytes);

    private readonly Bucket[] _buckets = CreateBuckets();
    private readonly long _maxRetainedBytes;
    private long _retainedBytes;

    internal MessageBuffers(long maxRetainedBytes) => _maxRetainedBytes = maxRetainedBytes;

    /// <summary>Bytes held in the stacks now.</summary>
    internal long RetainedBytes => Interlocked.Read(ref _retainedBytes);

    /// <summary>A buffer of at least <paramref name="length"/> bytes (at least one), its contents undefined.</summary>
    public byte[] Rent(int length)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        int index = BucketIndex(length);
        if (index < 0)
        {
            return GC.AllocateUninitializedArray<byte>(length);
        }
        byte[]? buffer = _buckets[index].TryPop();
        if (buffer is not null)
        {
            Interlocked.Add(ref _retainedBytes, -buffer.Length);
            return buffer;
        }
        return GC.AllocateUninitializedArray<byte>(1 << (index + MinShift));
    }

    /// <summary>Takes back a buffer from <see cref="Rent"/>; one of another size or over the budget is left to the collector.</summary>
    public void Return(byte[] buffer)
    {
        int length = buffer.Length;
        if (length < 1 << MinShift || length > 1 << MaxShift || (length & (length - 1)) != 0)
        {
            return;
        }
        if (Interlocked.Add(ref _retainedBytes, length) > _maxRetainedBytes)
        {
            Interlocked.Add(ref _retainedBytes, -length);
            return;
        }
        _buckets[BucketIndex(length)].Push(buffer);
    }

    /// <summary>The bucket for a request of <paramref name="length"/> bytes, or -1 when it is larger than any.</summary>
    private static int BucketIndex(int length)
    {
        if (length <= 1 << MinShift)
        {
            return 0;
        }
        if (length > 1 << MaxShift)
        {
            return -1;
        }
        return 32 - System.Numerics.BitOperations.LeadingZeroCount((uint)length - 1) - MinShift;
    }

    private static Bucket[] CreateBuckets()
    {
        var buckets = new Bucket[MaxShift - MinShift + 1];
        for (int i = 0; i < buckets.Length; i++)
        {
            buckets[i] = new Bucket();
        }
        return buckets;
    }

    private sealed class Bucket
    {
        private readonly Lock _lock = new();
        private byte[]?[] _items = new byte[]?[16];
        private int _count;

        public byte[]? TryPop()
        {
            lock (_lock)
            {
                if (_count == 0)
                {
                    return null;
                }
                byte[]? buffer = _items[--_count];
                _items[_count] = null;
                return buffer;
            }
        }

        public void Push(byte[] buffer)
        {
            lock (_lock)
            {
                if (_count == _items.Length)
                {
                    Array.Resize(ref _items, _items.Length * 2);
                }
                _items[_count++] = buffer;
            }
        }
    }
}
