using System.Buffers.Binary;
using static Relay.Storage.Native.RocksDbNative;

namespace Relay.Storage;

/// <summary>
/// The mutations of one group-commit batch, kept in managed memory until the writer thread hands
/// them to RocksDB in one write. Point mutations go in sorted by column family and key (equal keys
/// keep their call order). RocksDB's memtable skip list starts an insert from where the previous one
/// ended only when the new key sorts right after it; in call order the keys of many queues
/// interleave and nearly every insert searches from the top, in key order a queue's consecutive
/// messages in one batch insert next to each other (about 4% of the relay's CPU, docs/PERFORMANCE.md
/// fourth round). A batch holding a range delete keeps call order throughout: a put moved across a
/// range tombstone would change what the tombstone covers.
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

    private struct Entry
    {
        /// <summary>The key's first 8 bytes, big-endian (zero-padded): most comparisons end here.</summary>
        public ulong Prefix;
        /// <summary>Call order, which breaks ties between equal keys.</summary>
        public int Sequence;
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
    private int _count;
    private bool _hasRange;
    private readonly Comparison<Entry> _keyOrder;

    public MutationBatch() => _keyOrder = CompareKeys;

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
        int size = key.Length + value1.Length + value2.Length;
        if (_data.Length - _length < size)
        {
            Array.Resize(ref _data, Math.Max(_data.Length * 2, _length + size));
        }
        if (_count == _entries.Length)
        {
            Array.Resize(ref _entries, _count * 2);
        }
        ref Entry entry = ref _entries[_count];
        entry.Prefix = PrefixOf(key);
        entry.Sequence = _count;
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

    private static ulong PrefixOf(ReadOnlySpan<byte> key)
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

    /// <summary>Puts the point mutations in key order, unless the batch holds a range delete.</summary>
    public void Sort()
    {
        Span<Entry> entries = _entries.AsSpan(0, _count);
        if (!_hasRange && entries.Length > 1)
        {
            entries.Sort(_keyOrder);
        }
    }

    /// <summary>Adds every mutation to the (empty) native batch, in the current order.</summary>
    public void WriteTo(nint nativeBatch, Native.RocksDb db)
    {
        fixed (byte* data = _data)
        {
            foreach (ref readonly Entry entry in _entries.AsSpan(0, _count))
            {
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
        foreach (ref readonly Entry entry in _entries.AsSpan(0, _count))
        {
            list.Add((entry.Cf, _data.AsSpan(entry.KeyOffset, entry.KeyLength).ToArray(), _data.AsSpan(entry.ValueOffset, entry.ValueLength).ToArray()));
        }
        return list;
    }

    public void Clear()
    {
        _length = 0;
        _count = 0;
        _hasRange = false;
        if (_data.Length > ShrinkAbove)
        {
            _data = new byte[16 * 1024];
        }
        if (_entries.Length > 4096)
        {
            _entries = new Entry[64];
        }
    }

    /// <summary>RocksDB's order of the entries' keys (cached: a comparer made per sort allocates).</summary>
    private int CompareKeys(Entry x, Entry y)
    {
        int c = x.Cf.CompareTo(y.Cf);
        if (c != 0) return c;
        c = x.Prefix.CompareTo(y.Prefix);
        if (c != 0) return c;
        // RocksDB's default (bytewise) comparator: memcmp, then the shorter key first.
        c = _data.AsSpan(x.KeyOffset, x.KeyLength).SequenceCompareTo(_data.AsSpan(y.KeyOffset, y.KeyLength));
        return c != 0 ? c : x.Sequence.CompareTo(y.Sequence);
    }
}
