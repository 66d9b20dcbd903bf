using System.Buffers.Binary;
using static Relay.Storage.Native.RocksDbNative;

namespace Relay.Storage;

/// <summary>
/// The mutations of one group-commit batch, kept in managed memory until the writer thread hands
/// them to RocksDB in one write. Point mutations go in grouped by column family and key prefix, and
/// in key-suffix order within a group (equal keys keep their call order): the keys of one queue's
/// messages share their first bytes (the queue's random id) and end with the message id, so a
/// queue's writes and deletes of one batch reach the memtable next to each other and in id order,
/// where in call order the keys of many queues interleave and each insert searches the skip list
/// further (docs/PERFORMANCE.md, fourth and twelfth rounds). The order is not RocksDB's key order
/// (it need not be: only equal keys must keep call order), so that sorting compares integers only.
/// A batch holding a range delete keeps call order throughout: a put moved across a range
/// tombstone would change what the tombstone covers.
/// </summary>
internal sealed unsafe class MutationBatch
{
    private const int ShrinkAbove = 8 * 1024 * 1024;

    private enum Kind : byte
    {
        Put,
        Delete,
        SingleDelete,
        DeleteRange,
    }

    /// <summary>Most mutations a batch sorts (the call order's index takes up to 20 bits of the 64-bit sort key); a larger one keeps call order.</summary>
    private const int MaxSorted = 1 << 20;

    private struct Entry
    {
        /// <summary>The key's first 8 bytes, big-endian (zero-padded), taken while the key is in cache.</summary>
        public ulong First;
        /// <summary>The key's last 8 bytes, big-endian (the whole key, right-aligned, when shorter).</summary>
        public ulong Last;
        public int KeyOffset;
        public int KeyLength;
        /// <summary>The value of a put; the end key of a range delete.</summary>
        public int ValueOffset;
        public int ValueLength;
        public byte Cf;
        public Kind Kind;
    }

    private byte[] _data = new byte[16 * 1024];
    private int _length;
    private Entry[] _entries = new Entry[64];
    /// <summary>Once sorted, per position: family ‖ key's first bits ‖ key's last bits ‖ entry index (see <see cref="Sort"/>).</summary>
    private ulong[] _order = new ulong[64];
    private int _indexBits;
    private int _count;
    private bool _hasRange;
    private bool _sorted;

    /// <summary>Mutations added since the last <see cref="Clear"/>.</summary>
    public int Count => _count;

    /// <summary>Bytes of keys and values added since the last <see cref="Clear"/>.</summary>
    public int Bytes => _length;

    public void Put(int cf, ReadOnlySpan<byte> key, ReadOnlySpan<byte> value) => Add(cf, Kind.Put, key, value, default);

    /// <summary>Puts a value made of two parts without first joining them.</summary>
    public void Put(int cf, ReadOnlySpan<byte> key, ReadOnlySpan<byte> value1, ReadOnlySpan<byte> value2) =>
        Add(cf, Kind.Put, key, value1, value2);

    public void Delete(int cf, ReadOnlySpan<byte> key) => Add(cf, Kind.Delete, key, default, default);

    /// <summary>
    /// Deletes a key that was put exactly once and is deleted only this once (RocksDB's
    /// SingleDelete): when the tombstone meets the value in a flush or compaction both vanish,
    /// instead of the tombstone being rewritten level after level. Never for a key that may be put
    /// again or also deleted with <see cref="Delete"/>: RocksDB leaves that undefined.
    /// </summary>
    public void SingleDelete(int cf, ReadOnlySpan<byte> key) => Add(cf, Kind.SingleDelete, key, default, default);

    public void DeleteRange(int cf, ReadOnlySpan<byte> start, ReadOnlySpan<byte> end)
    {
        _hasRange = true;
        Add(cf, Kind.DeleteRange, start, end, default);
    }

    private void Add(int cf, Kind kind, ReadOnlySpan<byte> key, ReadOnlySpan<byte> value1, ReadOnlySpan<byte> value2)
    {
        ArgumentOutOfRangeException.ThrowIfGreaterThan((uint)cf, 7u, nameof(cf));   // 3 bits of the sort key
        int size = key.Length + value1.Length + value2.Length;
        if (_data.Length - _length < size)
        {
            Array.Resize(ref _data, Math.Max(_data.Length * 2, _length + size));
        }
        if (_count == _entries.Length)
        {
            Array.Resize(ref _entries, _count * 2);
        }
        _sorted = false;
        ref Entry entry = ref _entries[_count];
        entry.First = FirstBytes(key);
        entry.Last = LastBytes(key);
        entry.Cf = (byte)cf;
        entry.Kind = kind;
        entry.KeyOffset = _length;
        entry.KeyLength = key.Length;
        key.CopyTo(_data.AsSpan(_length));
        _length += key.Length;
        entry.ValueOffset = _length;
        entry.ValueLength = value1.Length + value2.Length;
        value1.CopyTo(_data.AsSpan(_length));
        _length += value1.Length;
        value2.CopyTo(_data.AsSpan(_length));
        _length += value2.Length;
        _count++;
    }

    /// <summary>Puts the point mutations in the batch's order (see the class), unless the batch holds a range delete.</summary>
    public void Sort()
    {
        _sorted = false;
        if (_hasRange || _count < 2 || _count >= MaxSorted)
        {
            return;
        }
        // One 64-bit key per entry, so that the sort compares integers: from the top, the family
        // (3 bits), the key's first bits (a queue's random id), the key's last bits (a message id's
        // low bits), and the entry's index (call order) in as many bits as the batch needs. Equal
        // keys differ only in the index, so they keep call order; different keys may tie before
        // it, and then only their locality suffers.
        if (_order.Length < _count)
        {
            _order = new ulong[_entries.Length];
        }
        int indexBits = Math.Max(1, 32 - System.Numerics.BitOperations.LeadingZeroCount((uint)(_count - 1)));
        int lastBits = (61 - indexBits) / 2;
        int firstBits = 61 - indexBits - lastBits;
        ulong lastMask = (1UL << lastBits) - 1;
        Span<ulong> order = _order.AsSpan(0, _count);
        for (int i = 0; i < order.Length; i++)
        {
            ref readonly Entry entry = ref _entries[i];
            order[i] = ((ulong)entry.Cf << 61)
                | (entry.First >> (64 - firstBits) << (lastBits + indexBits))
                | ((entry.Last & lastMask) << indexBits)
                | (uint)i;
        }
        order.Sort();
        _indexBits = indexBits;
        _sorted = true;
    }

    /// <summary>The key's first 8 bytes, big-endian (zero-padded when shorter).</summary>
    private static ulong FirstBytes(ReadOnlySpan<byte> key)
    {
        if (key.Length >= 8)
        {
            return BinaryPrimitives.ReadUInt64BigEndian(key);
        }
        Span<byte> padded = stackalloc byte[8];
        padded.Clear();
        key.CopyTo(padded);
        return BinaryPrimitives.ReadUInt64BigEndian(padded);
    }

    /// <summary>The key's last 8 bytes, big-endian (the whole key, right-aligned, when shorter).</summary>
    private static ulong LastBytes(ReadOnlySpan<byte> key)
    {
        if (key.Length >= 8)
        {
            return BinaryPrimitives.ReadUInt64BigEndian(key[^8..]);
        }
        ulong value = 0;
        foreach (byte b in key)
        {
            value = (value << 8) | b;
        }
        return value;
    }

    /// <summary>Index of the entry at <paramref name="position"/> in the current order.</summary>
    private int EntryAt(int position) => _sorted ? (int)(_order[position] & ((1UL << _indexBits) - 1)) : position;

    /// <summary>Adds every mutation to the (empty) native batch, in the current order.</summary>
    public void WriteTo(nint nativeBatch, Native.RocksDb db)
    {
        fixed (byte* data = _data)
        {
            for (int i = 0; i < _count; i++)
            {
                ref readonly Entry entry = ref _entries[EntryAt(i)];
                nint cf = db[entry.Cf];
                byte* key = data + entry.KeyOffset;
                byte* value = data + entry.ValueOffset;
                switch (entry.Kind)
                {
                    case Kind.Put:
                        rocksdb_writebatch_put_cf(nativeBatch, cf, key, (nuint)entry.KeyLength, value, (nuint)entry.ValueLength);
                        break;
                    case Kind.Delete:
                        rocksdb_writebatch_delete_cf(nativeBatch, cf, key, (nuint)entry.KeyLength);
                        break;
                    case Kind.SingleDelete:
                        rocksdb_writebatch_singledelete_cf(nativeBatch, cf, key, (nuint)entry.KeyLength);
                        break;
                    default:
                        rocksdb_writebatch_delete_range_cf(nativeBatch, cf, key, (nuint)entry.KeyLength, value, (nuint)entry.ValueLength);
                        break;
                }
            }
        }
    }

    /// <summary>The mutations in their current order, as (column family, key, value) (tests).</summary>
    internal List<(int Cf, byte[] Key, byte[] Value)> Entries()
    {
        var list = new List<(int, byte[], byte[])>(_count);
        for (int i = 0; i < _count; i++)
        {
            ref readonly Entry entry = ref _entries[EntryAt(i)];
            list.Add((entry.Cf, _data.AsSpan(entry.KeyOffset, entry.KeyLength).ToArray(), _data.AsSpan(entry.ValueOffset, entry.ValueLength).ToArray()));
        }
        return list;
    }

    public void Clear()
    {
        _length = 0;
        _count = 0;
        _hasRange = false;
        _sorted = false;
        if (_data.Length > ShrinkAbove)
        {
            _data = new byte[16 * 1024];
        }
        if (_entries.Length > 4096)
        {
            _entries = new Entry[64];
            _order = new ulong[64];
        }
    }
}
