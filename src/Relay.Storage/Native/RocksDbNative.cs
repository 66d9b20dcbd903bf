using System.Runtime.InteropServices;

namespace Relay.Storage.Native;

/// <summary>
/// Source-generated binding of the RocksDB C API (rocksdb/c.h). Every function here exists in both
/// RocksDB 7.8.3 (Debian, linked statically into the NativeAOT binary) and 11.12 (the NuGet package
/// used by tests), so the same code runs against either. All pointers are opaque <c>nint</c>s owned by
/// <see cref="RocksDb"/>; <c>errptr</c> arguments receive a malloc()ed message that
/// <see cref="RocksDb.Check"/> turns into a <see cref="StoreException"/> and frees.
/// </summary>
internal static unsafe partial class RocksDbNative
{
    private const string Lib = "rocksdb";

    // Values of the C enums used below.
    public const int InfoLogLevelWarn = 2;
    public const int NoCompression = 0;

    // --- options ---
    [LibraryImport(Lib)] public static partial nint rocksdb_options_create();
    [LibraryImport(Lib)] public static partial void rocksdb_options_destroy(nint options);
    [LibraryImport(Lib)] public static partial void rocksdb_options_set_create_if_missing(nint options, byte value);
    [LibraryImport(Lib)] public static partial void rocksdb_options_set_create_missing_column_families(nint options, byte value);
    [LibraryImport(Lib)] public static partial void rocksdb_options_set_info_log_level(nint options, int level);
    [LibraryImport(Lib)] public static partial void rocksdb_options_set_keep_log_file_num(nint options, nuint count);
    [LibraryImport(Lib)] public static partial void rocksdb_options_set_max_log_file_size(nint options, nuint bytes);
    [LibraryImport(Lib)] public static partial void rocksdb_options_set_max_total_wal_size(nint options, ulong bytes);
    [LibraryImport(Lib)] public static partial void rocksdb_options_set_write_buffer_size(nint options, nuint bytes);
    [LibraryImport(Lib)] public static partial void rocksdb_options_set_compression(nint options, int compression);
    [LibraryImport(Lib)] public static partial void rocksdb_options_set_disable_auto_compactions(nint options, int value);
    [LibraryImport(Lib)] public static partial void rocksdb_options_set_max_open_files(nint options, int value);
    [LibraryImport(Lib)] public static partial void rocksdb_options_increase_parallelism(nint options, int threads);
    [LibraryImport(Lib)] public static partial void rocksdb_options_set_block_based_table_factory(nint options, nint tableOptions);

    [LibraryImport(Lib)] public static partial nint rocksdb_block_based_options_create();
    [LibraryImport(Lib)] public static partial void rocksdb_block_based_options_destroy(nint tableOptions);
    [LibraryImport(Lib)] public static partial void rocksdb_block_based_options_set_format_version(nint tableOptions, int version);
    [LibraryImport(Lib)] public static partial void rocksdb_block_based_options_set_block_cache(nint tableOptions, nint cache);
    /// <summary>Takes ownership of <paramref name="policy"/>.</summary>
    [LibraryImport(Lib)] public static partial void rocksdb_block_based_options_set_filter_policy(nint tableOptions, nint policy);
    [LibraryImport(Lib)] public static partial nint rocksdb_filterpolicy_create_bloom_full(double bitsPerKey);
    [LibraryImport(Lib)] public static partial nint rocksdb_cache_create_lru(nuint capacity);
    [LibraryImport(Lib)] public static partial void rocksdb_cache_destroy(nint cache);

    [LibraryImport(Lib)] public static partial nint rocksdb_writeoptions_create();
    [LibraryImport(Lib)] public static partial void rocksdb_writeoptions_destroy(nint options);
    [LibraryImport(Lib)] public static partial void rocksdb_writeoptions_set_sync(nint options, byte value);

    [LibraryImport(Lib)] public static partial nint rocksdb_readoptions_create();
    [LibraryImport(Lib)] public static partial void rocksdb_readoptions_destroy(nint options);
    /// <summary>Keeps a pointer to <paramref name="key"/> (no copy): it must outlive the iterator.</summary>
    [LibraryImport(Lib)] public static partial void rocksdb_readoptions_set_iterate_upper_bound(nint options, byte* key, nuint keyLength);
    [LibraryImport(Lib)] public static partial void rocksdb_readoptions_set_fill_cache(nint options, byte fillCache);
    [LibraryImport(Lib, StringMarshalling = StringMarshalling.Utf8)] public static partial void rocksdb_get_options_from_string(nint baseOptions, string optionsString, nint newOptions, nint* err);
    /// <summary>Keeps a pointer to <paramref name="key"/> (no copy): it must outlive the iterator.</summary>
    [LibraryImport(Lib)] public static partial void rocksdb_readoptions_set_iterate_lower_bound(nint options, byte* key, nuint keyLength);

    [LibraryImport(Lib)] public static partial nint rocksdb_flushoptions_create();
    [LibraryImport(Lib)] public static partial void rocksdb_flushoptions_destroy(nint options);
    [LibraryImport(Lib)] public static partial void rocksdb_flushoptions_set_wait(nint options, byte value);

    // --- database ---
    [LibraryImport(Lib, StringMarshalling = StringMarshalling.Utf8)]
    public static partial nint rocksdb_open_column_families(
        nint options, string name, int count, nint* names, nint* cfOptions, nint* cfHandles, nint* errptr);
    [LibraryImport(Lib)] public static partial void rocksdb_close(nint db);
    [LibraryImport(Lib)] public static partial void rocksdb_set_options_cf(nint db, nint cf, int count, nint* keys, nint* values, nint* errptr);
    [LibraryImport(Lib)] public static partial void rocksdb_column_family_handle_destroy(nint cf);
    [LibraryImport(Lib)] public static partial void rocksdb_flush_cf(nint db, nint flushOptions, nint cf, nint* errptr);
    [LibraryImport(Lib)] public static partial void rocksdb_free(nint ptr);

    // --- checkpoint (an openable copy of the database: table files hard-linked, the rest copied) ---
    [LibraryImport(Lib)] public static partial nint rocksdb_checkpoint_object_create(nint db, nint* errptr);
    /// <summary>logSizeForFlush 0: the memtables are flushed first, so the copy needs little of the log.</summary>
    [LibraryImport(Lib, StringMarshalling = StringMarshalling.Utf8)]
    public static partial void rocksdb_checkpoint_create(nint checkpoint, string checkpointDir, ulong logSizeForFlush, nint* errptr);
    [LibraryImport(Lib)] public static partial void rocksdb_checkpoint_object_destroy(nint checkpoint);
    /// <summary>Null start and limit: the whole column family.</summary>
    [LibraryImport(Lib)] public static partial void rocksdb_compact_range_cf(nint db, nint cf, byte* start, nuint startLength, byte* limit, nuint limitLength);
    /// <summary>Null when the property is unknown, else a malloc()ed string to free with rocksdb_free.</summary>
    [LibraryImport(Lib, StringMarshalling = StringMarshalling.Utf8)]
    public static partial nint rocksdb_property_value_cf(nint db, nint cf, string name);

    // --- reads ---
    /// <summary>Null when not found; otherwise free with rocksdb_pinnableslice_destroy.</summary>
    [LibraryImport(Lib)] public static partial nint rocksdb_get_pinned_cf(nint db, nint readOptions, nint cf, byte* key, nuint keyLength, nint* errptr);
    [LibraryImport(Lib)] public static partial byte* rocksdb_pinnableslice_value(nint slice, nuint* length);
    [LibraryImport(Lib)] public static partial void rocksdb_pinnableslice_destroy(nint slice);

    [LibraryImport(Lib)] public static partial nint rocksdb_create_iterator_cf(nint db, nint readOptions, nint cf);
    [LibraryImport(Lib)] public static partial void rocksdb_iter_destroy(nint iterator);
    [LibraryImport(Lib)] public static partial byte rocksdb_iter_valid(nint iterator);
    [LibraryImport(Lib)] public static partial void rocksdb_iter_seek(nint iterator, byte* key, nuint keyLength);
    [LibraryImport(Lib)] public static partial void rocksdb_iter_seek_to_first(nint iterator);
    [LibraryImport(Lib)] public static partial void rocksdb_iter_seek_to_last(nint iterator);
    [LibraryImport(Lib)] public static partial void rocksdb_iter_next(nint iterator);
    [LibraryImport(Lib)] public static partial byte* rocksdb_iter_key(nint iterator, nuint* length);
    [LibraryImport(Lib)] public static partial byte* rocksdb_iter_value(nint iterator, nuint* length);
    [LibraryImport(Lib)] public static partial void rocksdb_iter_get_error(nint iterator, nint* errptr);

    // --- writes ---
    [LibraryImport(Lib)] public static partial nint rocksdb_writebatch_create();
    [LibraryImport(Lib)] public static partial void rocksdb_writebatch_destroy(nint batch);
    [LibraryImport(Lib)] public static partial void rocksdb_writebatch_clear(nint batch);
    [LibraryImport(Lib)] public static partial void rocksdb_writebatch_put_cf(nint batch, nint cf, byte* key, nuint keyLength, byte* value, nuint valueLength);
    [LibraryImport(Lib)] public static partial void rocksdb_writebatch_delete_cf(nint batch, nint cf, byte* key, nuint keyLength);
    [LibraryImport(Lib)] public static partial void rocksdb_writebatch_singledelete_cf(nint batch, nint cf, byte* key, nuint keyLength);
    [LibraryImport(Lib)] public static partial void rocksdb_writebatch_delete_range_cf(nint batch, nint cf, byte* startKey, nuint startLength, byte* endKey, nuint endLength);
    [LibraryImport(Lib)] public static partial void rocksdb_write(nint db, nint writeOptions, nint batch, nint* errptr);
}
