using System.Runtime.InteropServices;
using static Relay.Storage.Native.RocksDbNative;

namespace Relay.Storage.Native;

/// <summary>
/// An open RocksDB database with its column families. Owns every native object it creates and frees
/// them in <see cref="Dispose"/>. Reads are thread-safe; the write batch passed to <see cref="Write"/>
/// belongs to the caller.
/// </summary>
internal sealed unsafe class RocksDb : IDisposable
{
    private nint _db;
    private readonly nint[] _cfs;
    private readonly nint _options;
    private readonly nint _cache;
    private readonly nint _readOptions;
    private readonly nint _syncWrite;
    private readonly nint _noSyncWrite;

    /// <summary>SST format readable and written by both RocksDB 7.8.3 and 11.x.</summary>
    public const int FormatVersion = 5;

    private RocksDb(nint db, nint[] cfs, nint options, nint cache)
    {
        _db = db;
        _cfs = cfs;
        _options = options;
        _cache = cache;
        _readOptions = rocksdb_readoptions_create();
        _syncWrite = rocksdb_writeoptions_create();
        rocksdb_writeoptions_set_sync(_syncWrite, 1);
        _noSyncWrite = rocksdb_writeoptions_create();
        rocksdb_writeoptions_set_sync(_noSyncWrite, 0);
    }

    /// <summary>Column family handle by its index in the names passed to <see cref="Open"/>.</summary>
    public nint this[int cf] => _cfs[cf];

    public int ColumnFamilyCount => _cfs.Length;

    /// <param name="deferCompactions">Open with automatic compactions off (see <see cref="EnableAutoCompactions"/>).</param>
    /// <param name="appendOnlyPrefix">A column family whose keys mostly arrive in increasing order within a fixed-length prefix, and that prefix's length (memtable insert hints).</param>
    public static RocksDb Open(string path, IReadOnlyList<string> columnFamilies, long blockCacheBytes, bool deferCompactions = false, (int Cf, int PrefixLength)? appendOnlyPrefix = null)
    {
        // The release binary's RocksDB computes CRC32C with SSE4.2 and PCLMULQDQ
        // (packaging/rocksdb/build-rocksdb.sh): on a CPU without them it would stop at its first log
        // write with an illegal instruction. Refused here, in words, before anything is opened.
        if (RuntimeInformation.ProcessArchitecture == Architecture.X64
            && !(System.Runtime.Intrinsics.X86.Sse42.IsSupported && System.Runtime.Intrinsics.X86.Pclmulqdq.IsSupported))
        {
            throw new StoreException("This CPU lacks SSE4.2 or PCLMULQDQ, which the relay's store needs (every x86-64 CPU since 2010 has both).");
        }
        nint options = rocksdb_options_create();
        rocksdb_options_set_create_if_missing(options, 1);
        rocksdb_options_set_create_missing_column_families(options, 1);
        rocksdb_options_set_info_log_level(options, InfoLogLevelWarn);
        rocksdb_options_set_keep_log_file_num(options, 3);
        rocksdb_options_set_max_log_file_size(options, 4 * 1024 * 1024);
        // Bounds the WAL (counted in the disk budget): older memtables get flushed when it is reached.
        rocksdb_options_set_max_total_wal_size(options, 64UL * 1024 * 1024);
        rocksdb_options_set_write_buffer_size(options, 16 * 1024 * 1024);
        rocksdb_options_increase_parallelism(options, Math.Max(2, Environment.ProcessorCount / 2));
        // Message bodies are ciphertext and keys are random: compression would only cost CPU, and
        // leaving it off keeps the files independent of which codecs a RocksDB build includes.
        rocksdb_options_set_compression(options, NoCompression);
        // A bounded table cache: with the default (-1) RocksDB opens every table file and reads its
        // index and filter at open, so start-up grew with the data (about 20 ms per file here).
        // Bounded, it opens a few at start and the rest on first use. 512 files of 64 MiB cover
        // 32 GiB of live data without reopening.
        rocksdb_options_set_max_open_files(options, 512);
        if (deferCompactions)
        {
            rocksdb_options_set_disable_auto_compactions(options, 1);
        }

        nint cache = rocksdb_cache_create_lru((nuint)blockCacheBytes);
        nint table = rocksdb_block_based_options_create();
        rocksdb_block_based_options_set_format_version(table, FormatVersion);
        rocksdb_block_based_options_set_block_cache(table, cache);
        rocksdb_block_based_options_set_filter_policy(table, rocksdb_filterpolicy_create_bloom_full(10));
        rocksdb_options_set_block_based_table_factory(options, table); // copies the table options
        rocksdb_block_based_options_destroy(table);

        int n = columnFamilies.Count;
        var names = new nint[n];
        var cfOptions = new nint[n];
        var handles = new nint[n];
        nint hintOptions = 0;
        try
        {
            // After a crash the log is replayed into memtables, which are then flushed when they fill,
            // as in normal work, instead of being written to table files before the store opens:
            // start-up after a crash costs the replay only. The C API has no setter for it.
            nint recovering = FromString(options, "avoid_flush_during_recovery=true");
            rocksdb_options_destroy(options);
            options = recovering;
            for (int i = 0; i < n; i++)
            {
                names[i] = Marshal.StringToCoTaskMemUTF8(columnFamilies[i]);
                cfOptions[i] = options;
            }
            if (appendOnlyPrefix is var (hintCf, prefixLength))
            {
                // Keys of this column family grow within each prefix (a queue's messages): RocksDB keeps
                // the memtable position of each prefix's last insert and starts the next one there,
                // instead of searching the skip list from its top. The C API has no setter for it.
                hintOptions = FromString(options, $"memtable_insert_with_hint_prefix_extractor=rocksdb.FixedPrefix.{prefixLength}");
                cfOptions[hintCf] = hintOptions;
            }
            nint err = 0;
            nint db;
            fixed (nint* pNames = names, pOpts = cfOptions, pHandles = handles)
            {
                db = rocksdb_open_column_families(options, path, n, pNames, pOpts, pHandles, &err);
            }
            if (err != 0)
            {
                string message = TakeError(err);
                throw new StoreException(
                    message.Contains("lock", StringComparison.OrdinalIgnoreCase)
                        ? $"The store directory {path} is in use by another process (or another open store): {message}"
                        : $"Cannot open the store in {path}: {message}");
            }
            return new RocksDb(db, handles, options, cache);
        }
        catch
        {
            rocksdb_options_destroy(options);
            rocksdb_cache_destroy(cache);
            throw;
        }
        finally
        {
            if (hintOptions != 0)
            {
                rocksdb_options_destroy(hintOptions);   // the open copied it
            }
            foreach (nint name in names)
            {
                Marshal.FreeCoTaskMem(name);
            }
        }
    }

    /// <summary>New options: a copy of <paramref name="options"/> with <paramref name="settings"/> (RocksDB's option string) applied.</summary>
    private static nint FromString(nint options, string settings)
    {
        nint changed = rocksdb_options_create();
        nint err = 0;
        rocksdb_get_options_from_string(options, settings, changed, &err);
        if (err != 0)
        {
            rocksdb_options_destroy(changed);
            Check(err);
        }
        return changed;
    }

    /// <summary>Turns automatic compactions on in every column family (after an open that deferred them).</summary>
    public void EnableAutoCompactions()
    {
        nint key = Marshal.StringToCoTaskMemUTF8("disable_auto_compactions");
        nint value = Marshal.StringToCoTaskMemUTF8("false");
        try
        {
            foreach (nint cf in _cfs)
            {
                nint err = 0;
                rocksdb_set_options_cf(_db, cf, 1, &key, &value, &err);
                Check(err);
            }
        }
        finally
        {
            Marshal.FreeCoTaskMem(key);
            Marshal.FreeCoTaskMem(value);
        }
    }

    /// <summary>Throws a <see cref="StoreException"/> when <paramref name="err"/> is set, freeing it.</summary>
    public static void Check(nint err)
    {
        if (err != 0)
        {
            throw Error(TakeError(err));
        }
    }

    /// <summary>
    /// The exception for a RocksDB error status, <see cref="StoreException.DiskFull"/> when it is
    /// RocksDB's text for IOStatus::NoSpace (an ENOSPC of any file it writes, now or in a background
    /// flush that stopped the store's writes since), which does not depend on the locale.
    /// </summary>
    internal static StoreException Error(string status) =>
        new("RocksDB: " + status) { DiskFull = status.Contains("No space left on device", StringComparison.Ordinal) };

    private static string TakeError(nint err)
    {
        string message = Marshal.PtrToStringUTF8(err) ?? "unknown error";
        rocksdb_free(err);
        return message;
    }

    /// <summary>A point read's pinned slice (0 when the key is absent); free it with rocksdb_pinnableslice_destroy.</summary>
    private nint GetPinned(int cf, ReadOnlySpan<byte> key)
    {
        nint err = 0;
        nint slice;
        fixed (byte* k = key)
        {
            slice = rocksdb_get_pinned_cf(_db, _readOptions, _cfs[cf], k, (nuint)key.Length, &err);
        }
        Check(err);
        return slice;
    }

    private static ReadOnlySpan<byte> ValueOf(nint slice)
    {
        nuint size;
        byte* value = rocksdb_pinnableslice_value(slice, &size);
        return new ReadOnlySpan<byte>(value, checked((int)size));
    }

    /// <summary>
    /// Point read that copies the first <c>header.Length</c> bytes of the value into
    /// <paramref name="header"/> and the rest into a buffer rented from MessageBuffers.
    /// False when the key does not exist (or the value is shorter than the header).
    /// </summary>
    public bool TryGetRented(int cf, ReadOnlySpan<byte> key, Span<byte> header, out byte[] buffer, out int length)
    {
        buffer = [];
        length = 0;
        nint slice = GetPinned(cf, key);
        if (slice == 0)
        {
            return false;
        }
        try
        {
            var span = ValueOf(slice);
            if (span.Length < header.Length)
            {
                return false;
            }
            span.Slice(0, header.Length).CopyTo(header);
            var body = span.Slice(header.Length);
            buffer = MessageBuffers.Shared.Rent(body.Length);
            body.CopyTo(buffer);
            length = body.Length;
            return true;
        }
        finally
        {
            rocksdb_pinnableslice_destroy(slice);
        }
    }

    /// <summary>Point read. Copies the value into <paramref name="destination"/> when it fits; returns the value length, or -1 when absent.</summary>
    public int Get(int cf, ReadOnlySpan<byte> key, Span<byte> destination)
    {
        nint slice = GetPinned(cf, key);
        if (slice == 0)
        {
            return -1;
        }
        try
        {
            var span = ValueOf(slice);
            if (span.Length <= destination.Length)
            {
                span.CopyTo(destination);
            }
            return span.Length;
        }
        finally
        {
            rocksdb_pinnableslice_destroy(slice);
        }
    }

    public void Write(nint batch, bool sync)
    {
        nint err = 0;
        rocksdb_write(_db, sync ? _syncWrite : _noSyncWrite, batch, &err);
        Check(err);
    }

    /// <summary>
    /// Writes one key with fsync, outside the group commit (while opening, and the writer's probe of a
    /// failed store); in the same batch deletes <paramref name="deleteKey"/> when it is not empty.
    /// </summary>
    public void PutSync(int cf, ReadOnlySpan<byte> key, ReadOnlySpan<byte> value, ReadOnlySpan<byte> deleteKey = default)
    {
        nint batch = rocksdb_writebatch_create();
        try
        {
            fixed (byte* k = key, v = value, d = deleteKey)
            {
                rocksdb_writebatch_put_cf(batch, _cfs[cf], k, (nuint)key.Length, v, (nuint)value.Length);
                if (!deleteKey.IsEmpty)
                {
                    rocksdb_writebatch_delete_cf(batch, _cfs[cf], d, (nuint)deleteKey.Length);
                }
            }
            Write(batch, sync: true);
        }
        finally
        {
            rocksdb_writebatch_destroy(batch);
        }
    }

    /// <summary>An iterator over keys in [lower, upper) of one column family (either bound may be empty: open).</summary>
    /// <param name="fillCache">False: the data blocks this iterator reads do not go into the block cache (data read once).</param>
    public Iterator CreateIterator(int cf, ReadOnlySpan<byte> lower, ReadOnlySpan<byte> upper, bool fillCache = true) => new(this, cf, lower, upper, fillCache);

    public long PropertyLong(int cf, string name)
    {
        nint value = rocksdb_property_value_cf(_db, _cfs[cf], name);
        if (value == 0)
        {
            return 0;
        }
        string? text = Marshal.PtrToStringUTF8(value);
        rocksdb_free(value);
        return long.TryParse(text, out long result) ? result : 0;
    }

    /// <summary>Compacts every column family fully: drops deleted entries and their tombstones from the files.</summary>
    public void CompactAll()
    {
        foreach (nint cf in _cfs)
        {
            rocksdb_compact_range_cf(_db, cf, null, 0, null, 0);
        }
    }

    /// <summary>
    /// Makes <paramref name="directory"/> (which must not exist) an openable copy of the database as
    /// it is now: the memtables are flushed, table files hard-linked (copied when the directory is
    /// on another file system), the rest copied, all of it fsynced. Safe while writes go on.
    /// </summary>
    public void Checkpoint(string directory)
    {
        nint err = 0;
        nint checkpoint = rocksdb_checkpoint_object_create(_db, &err);
        Check(err);
        try
        {
            rocksdb_checkpoint_create(checkpoint, directory, 0, &err);
            Check(err);
        }
        finally
        {
            rocksdb_checkpoint_object_destroy(checkpoint);
        }
    }

    public void FlushAll()
    {
        nint flush = rocksdb_flushoptions_create();
        try
        {
            rocksdb_flushoptions_set_wait(flush, 1);
            foreach (nint cf in _cfs)
            {
                nint err = 0;
                rocksdb_flush_cf(_db, flush, cf, &err);
                Check(err);
            }
        }
        finally
        {
            rocksdb_flushoptions_destroy(flush);
        }
    }

    public void Dispose()
    {
        if (_db == 0)
        {
            return;
        }
        foreach (nint cf in _cfs)
        {
            rocksdb_column_family_handle_destroy(cf);
        }
        rocksdb_close(_db);
        _db = 0;
        rocksdb_readoptions_destroy(_readOptions);
        rocksdb_writeoptions_destroy(_syncWrite);
        rocksdb_writeoptions_destroy(_noSyncWrite);
        rocksdb_options_destroy(_options);
        rocksdb_cache_destroy(_cache);
    }

    /// <summary>
    /// A bounded iterator. The bounds are copied to native memory because the C API keeps pointers to
    /// them for the iterator's lifetime.
    /// </summary>
    public struct Iterator : IDisposable
    {
        private nint _iterator;
        private nint _readOptions;
        private byte* _bounds;

        internal Iterator(RocksDb db, int cf, ReadOnlySpan<byte> lower, ReadOnlySpan<byte> upper, bool fillCache)
        {
            _readOptions = rocksdb_readoptions_create();
            if (!fillCache)
            {
                rocksdb_readoptions_set_fill_cache(_readOptions, 0);
            }
            _bounds = (byte*)NativeMemory.Alloc((nuint)Math.Max(1, lower.Length + upper.Length));
            lower.CopyTo(new Span<byte>(_bounds, lower.Length));
            upper.CopyTo(new Span<byte>(_bounds + lower.Length, upper.Length));
            if (lower.Length > 0)
            {
                rocksdb_readoptions_set_iterate_lower_bound(_readOptions, _bounds, (nuint)lower.Length);
            }
            if (upper.Length > 0)
            {
                rocksdb_readoptions_set_iterate_upper_bound(_readOptions, _bounds + lower.Length, (nuint)upper.Length);
            }
            _iterator = rocksdb_create_iterator_cf(db._db, _readOptions, db._cfs[cf]);
        }

        public readonly void Seek(ReadOnlySpan<byte> key)
        {
            fixed (byte* k = key)
            {
                rocksdb_iter_seek(_iterator, k, (nuint)key.Length);
            }
        }

        public readonly void SeekToFirst() => rocksdb_iter_seek_to_first(_iterator);

        public readonly void SeekToLast() => rocksdb_iter_seek_to_last(_iterator);

        /// <summary>False at the end; throws when the iterator stopped because of an error.</summary>
        public readonly bool Valid
        {
            get
            {
                if (rocksdb_iter_valid(_iterator) != 0)
                {
                    return true;
                }
                nint err = 0;
                rocksdb_iter_get_error(_iterator, &err);
                Check(err);
                return false;
            }
        }

        public readonly void Next() => rocksdb_iter_next(_iterator);

        /// <summary>Valid until the iterator moves.</summary>
        public readonly ReadOnlySpan<byte> Key
        {
            get
            {
                nuint length;
                byte* key = rocksdb_iter_key(_iterator, &length);
                return new ReadOnlySpan<byte>(key, (int)length);
            }
        }

        /// <summary>Valid until the iterator moves.</summary>
        public readonly ReadOnlySpan<byte> Value
        {
            get
            {
                nuint length;
                byte* value = rocksdb_iter_value(_iterator, &length);
                return new ReadOnlySpan<byte>(value, (int)length);
            }
        }

        public void Dispose()
        {
            if (_iterator != 0)
            {
                rocksdb_iter_destroy(_iterator);
                _iterator = 0;
            }
            if (_readOptions != 0)
            {
                rocksdb_readoptions_destroy(_readOptions);
                _readOptions = 0;
            }
            if (_bounds != null)
            {
                NativeMemory.Free(_bounds);
                _bounds = null;
            }
        }
    }
}
