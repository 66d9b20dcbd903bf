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

    private static int Get(RocksDb db, int cf, byte[] key) => db.Get(cf, key, stackalloc byte[8]);

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
