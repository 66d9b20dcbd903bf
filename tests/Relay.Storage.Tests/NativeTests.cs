using Relay.Storage.Native;
using static Relay.Storage.Native.RocksDbNative;

namespace Relay.Storage.Tests;

public class NativeTests
{
    private static readonly string[] Families = ["default", "a", "b"];

    [Test]
    public async Task Batch_get_bounded_iteration_range_delete_and_properties()
    {
        string path = Path.Combine(Path.GetTempPath(), "relay-native-test-" + Guid.NewGuid().ToString("N"));
        try
        {
            using (RocksDb db = RocksDb.Open(path, Families, 1 << 20))
            {
                nint batch = rocksdb_writebatch_create();
                try
                {
                    for (byte i = 0; i < 10; i++)
                    {
                        Put(db, batch, 1, [i], [i, i]);
                    }
                    Put(db, batch, 2, [5], [42]);   // same key, other family
                    db.Write(batch, sync: true);
                    rocksdb_writebatch_clear(batch);
                    DeleteRange(db, batch, 1, [2], [4]);   // deletes 2 and 3
                    db.Write(batch, sync: false);
                }
                finally
                {
                    rocksdb_writebatch_destroy(batch);
                }

                await Assert.That(Get(db, 1, [7])).IsEqualTo(2);
                await Assert.That(Get(db, 2, [5])).IsEqualTo(1);
                await Assert.That(Get(db, 2, [7])).IsEqualTo(-1);
                await Assert.That(Get(db, 1, [3])).IsEqualTo(-1);

                var keys = new List<byte>();
                using (RocksDb.Iterator it = db.CreateIterator(1, [1], [6]))
                {
                    for (it.SeekToFirst(); it.Valid; it.Next())
                    {
                        keys.Add(it.Key[0]);
                        if (it.Value[0] != it.Key[0])
                        {
                            throw new InvalidOperationException("value mismatch");
                        }
                    }
                }
                await Assert.That(keys).IsEquivalentTo(new List<byte> { 1, 4, 5 });

                db.FlushAll();
                await Assert.That(db.PropertyLong(1, "rocksdb.total-sst-files-size")).IsGreaterThan(0);
                await Assert.That(db.PropertyLong(1, "rocksdb.no-such-property")).IsEqualTo(0);
            }

            // Reopened: the data is there, and a second open while it is held fails clearly.
            using (RocksDb db = RocksDb.Open(path, Families, 1 << 20))
            {
                await Assert.That(Get(db, 1, [9])).IsEqualTo(2);
                await Assert.That(() => RocksDb.Open(path, Families, 1 << 20)).Throws<StoreException>();
            }
        }
        finally
        {
            Directory.Delete(path, recursive: true);
        }
    }

    [Test]
    public async Task Insert_hints_by_prefix_keep_every_key_in_order()
    {
        // Column family 1 gets memtable insert hints on a 5-byte prefix. Keys go in as a relay writes
        // them (increasing within a prefix, prefixes interleaved), but also out of order, with deletes,
        // keys shorter than the prefix and range deletes that start shorter than the prefix (as a
        // queue's deletion does): what is read back must be exactly the model, before and after a
        // flush and a reopen.
        string path = Path.Combine(Path.GetTempPath(), "relay-native-test-" + Guid.NewGuid().ToString("N"));
        var random = new Random(7);
        var model = new SortedSet<byte[]>(Comparer<byte[]>.Create((x, y) => x.AsSpan().SequenceCompareTo(y)));
        try
        {
            using (RocksDb db = RocksDb.Open(path, Families, 1 << 20, appendOnlyPrefix: (1, 5)))
            {
                nint batch = rocksdb_writebatch_create();
                try
                {
                    for (int round = 0; round < 40; round++)
                    {
                        for (int q = 0; q < 25; q++)
                        {
                            byte[] key = [0, 0, 0, (byte)q, 0, (byte)round];
                            Put(db, batch, 1, key, [1]);
                            model.Add(key);
                        }
                        // One key far behind in some prefix, one short key, and deletes of the oldest.
                        byte[] behind = [0, 0, 0, (byte)random.Next(25), 0, 0, 1];
                        Put(db, batch, 1, behind, [2]);
                        model.Add(behind);
                        byte[] shortKey = [(byte)round];
                        Put(db, batch, 1, shortKey, [3]);
                        model.Add(shortKey);
                        if (round % 10 == 9)
                        {
                            byte q = (byte)random.Next(25);
                            byte[] start = [0, 0, 0, q];
                            byte[] end = [0, 0, 0, q, 0xFF, 0xFF, 0xFF];
                            DeleteRange(db, batch, 1, start, end);
                            model.RemoveWhere(k => k.AsSpan().SequenceCompareTo(start) >= 0 && k.AsSpan().SequenceCompareTo(end) < 0);
                        }
                        if (round > 5)
                        {
                            byte[] old = [0, 0, 0, (byte)random.Next(25), 0, (byte)(round - 5)];
                            Delete(db, batch, 1, old);
                            model.Remove(old);
                        }
                        db.Write(batch, sync: false);
                        rocksdb_writebatch_clear(batch);
                    }
                }
                finally
                {
                    rocksdb_writebatch_destroy(batch);
                }
                await Assert.That(Keys(db, 1)).IsEquivalentTo(model.ToList(), TUnit.Assertions.Enums.CollectionOrdering.Matching);
                db.FlushAll();
                await Assert.That(Keys(db, 1)).IsEquivalentTo(model.ToList(), TUnit.Assertions.Enums.CollectionOrdering.Matching);
            }
            using (RocksDb db = RocksDb.Open(path, Families, 1 << 20, appendOnlyPrefix: (1, 5)))
            {
                await Assert.That(Keys(db, 1)).IsEquivalentTo(model.ToList(), TUnit.Assertions.Enums.CollectionOrdering.Matching);
            }
            // The option is set where it was asked for, and only there.
            string options = File.ReadAllText(Directory.GetFiles(path, "OPTIONS-*").Max()!);
            await Assert.That(options).Contains("memtable_insert_with_hint_prefix_extractor=rocksdb.FixedPrefix.5");
            await Assert.That(options.Split("memtable_insert_with_hint_prefix_extractor=nullptr").Length - 1).IsEqualTo(Families.Length - 1);
            // A store reopened after a crash replays its log into memtables without flushing them first.
            await Assert.That(options).Contains("avoid_flush_during_recovery=true");
        }
        finally
        {
            Directory.Delete(path, recursive: true);
        }
    }

    private static List<byte[]> Keys(RocksDb db, int cf)
    {
        var keys = new List<byte[]>();
        using RocksDb.Iterator it = db.CreateIterator(cf, [], []);
        for (it.SeekToFirst(); it.Valid; it.Next())
        {
            keys.Add(it.Key.ToArray());
        }
        return keys;
    }

    private static int Get(RocksDb db, int cf, byte[] key) => db.Get(cf, key, stackalloc byte[8]);

    private static unsafe void Delete(RocksDb db, nint batch, int cf, byte[] key)
    {
        fixed (byte* k = key)
        {
            rocksdb_writebatch_delete_cf(batch, db[cf], k, (nuint)key.Length);
        }
    }

    private static unsafe void Put(RocksDb db, nint batch, int cf, byte[] key, byte[] value)
    {
        fixed (byte* k = key, v = value)
        {
            rocksdb_writebatch_put_cf(batch, db[cf], k, (nuint)key.Length, v, (nuint)value.Length);
        }
    }

    private static unsafe void DeleteRange(RocksDb db, nint batch, int cf, byte[] start, byte[] end)
    {
        fixed (byte* s = start, e = end)
        {
            rocksdb_writebatch_delete_range_cf(batch, db[cf], s, (nuint)start.Length, e, (nuint)end.Length);
        }
    }
}
