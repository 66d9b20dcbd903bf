using System.Buffers.Binary;
using System.Security.Cryptography;
using Relay.Storage.Native;
using static Relay.Storage.Native.RocksDbNative;

namespace Relay.Storage.Tests;

/// <summary>
/// A group-commit batch reaches RocksDB sorted by key (cheaper memtable inserts); what a reader sees
/// afterwards must be exactly what the mutations in call order would have left.
/// </summary>
public class MutationBatchTests
{
    private static readonly string[] Families = ["default", "a", "b"];

    [Test]
    public async Task Point_mutations_are_grouped_by_family_and_first_bytes_in_last_bytes_order_and_equal_keys_keep_call_order()
    {
        var batch = new MutationBatch();
        batch.Put(2, [0x01], [1]);
        batch.Put(1, [0x10, 0x00, 0, 0, 0, 0, 0, 0, 0x02], [2]);
        batch.Delete(1, [0x10, 0x00, 0, 0, 0, 0, 0, 0, 0x01]);
        batch.Put(1, [0x10], [3]);                       // same first bytes (zero-padded), last byte 0x10
        batch.Put(1, [0x10, 0x00, 0, 0, 0, 0, 0, 0, 0x01], [4]);   // same key as the delete, later
        batch.Put(1, [0x0F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF], [5]);
        batch.Put(1, [0x10], [6]);                       // same key again: after value 3

        batch.Sort();
        var order = batch.Entries().Select(e => (e.Cf, Convert.ToHexString(e.Key), e.Value.Length == 0 ? -1 : e.Value[0])).ToList();

        await Assert.That(order).IsEquivalentTo(new List<(int, string, int)>
        {
            (1, "0FFFFFFFFFFFFFFFFFFF", 5),
            (1, "100000000000000001", -1),
            (1, "100000000000000001", 4),
            (1, "100000000000000002", 2),
            (1, "10", 3),
            (1, "10", 6),
            (2, "01", 1),
        }, TUnit.Assertions.Enums.CollectionOrdering.Matching);
    }

    [Test]
    public async Task A_queue_s_message_writes_and_deletes_come_out_together_in_id_order()
    {
        // Message keys as the store writes them: 24-byte queue id, then the 8-byte message id.
        byte[][] queues = [RandomNumberGenerator.GetBytes(24), RandomNumberGenerator.GetBytes(24), RandomNumberGenerator.GetBytes(24)];
        static byte[] Key(byte[] queue, ulong id)
        {
            var key = new byte[32];
            queue.CopyTo(key, 0);
            BinaryPrimitives.WriteUInt64BigEndian(key.AsSpan(24), id);
            return key;
        }
        var batch = new MutationBatch();
        var calls = new List<(byte[] Key, int Value)>();
        // As a group commit receives them: appends and ACKs of three queues interleaved, one key
        // deleted and written again. (Ids far apart, as across an epoch, may come out of id order:
        // only their memtable inserts' locality depends on it.)
        ulong[] ids = [(7UL << 32) + 5, (7UL << 32) + 6, (7UL << 32) + 1_000_000, (7UL << 32) + 4, (7UL << 32) + 1_000_001];
        int value = 0;
        foreach (ulong id in ids)
        {
            foreach (byte[] queue in queues)
            {
                byte[] key = Key(queue, id);
                if ((id & 1) == 0)
                {
                    batch.Put(3, key, [(byte)++value]);
                    calls.Add((key, value));
                }
                else
                {
                    batch.Delete(3, key);
                    calls.Add((key, -1));
                }
            }
        }
        batch.Put(3, Key(queues[1], (7UL << 32) + 5), [(byte)++value]);   // after its delete above
        calls.Add((Key(queues[1], (7UL << 32) + 5), value));

        batch.Sort();
        var sorted = batch.Entries();

        // Each queue's mutations are contiguous, in id order; equal keys in call order.
        await Assert.That(sorted.Count).IsEqualTo(calls.Count);
        var byQueue = sorted.Select(e => Convert.ToHexString(e.Key, 0, 24)).ToList();
        foreach (byte[] queue in queues)
        {
            string hex = Convert.ToHexString(queue);
            int first = byQueue.IndexOf(hex), last = byQueue.LastIndexOf(hex);
            await Assert.That(last - first + 1).IsEqualTo(calls.Count(c => c.Key.AsSpan(0, 24).SequenceEqual(queue)));
            var run = sorted.Skip(first).Take(last - first + 1).ToList();
            var runIds = run.Select(e => BinaryPrimitives.ReadUInt64BigEndian(e.Key.AsSpan(24))).ToList();
            await Assert.That(runIds).IsEquivalentTo(runIds.Order().ToList(), TUnit.Assertions.Enums.CollectionOrdering.Matching);
            var inCallOrder = calls.Where(c => c.Key.AsSpan(0, 24).SequenceEqual(queue))
                .OrderBy(c => BinaryPrimitives.ReadUInt64BigEndian(c.Key.AsSpan(24)))   // stable: call order within an id
                .Select(c => c.Value).ToList();
            var values = run.Select(e => e.Value.Length == 0 ? -1 : (int)e.Value[0]).ToList();
            await Assert.That(values).IsEquivalentTo(inCallOrder, TUnit.Assertions.Enums.CollectionOrdering.Matching);
        }
    }

    [Test]
    public async Task A_batch_with_a_range_delete_keeps_call_order()
    {
        var batch = new MutationBatch();
        batch.Put(1, [9], [1]);
        batch.DeleteRange(1, [0], [10]);
        batch.Put(1, [3], [2]);

        batch.Sort();
        var keys = batch.Entries().Select(e => e.Key[0]).ToList();

        await Assert.That(keys).IsEquivalentTo(new List<byte> { 9, 0, 3 }, TUnit.Assertions.Enums.CollectionOrdering.Matching);
    }

    [Test]
    public async Task Written_to_RocksDB_the_result_is_that_of_call_order()
    {
        using var temp = new TempDb();
        RocksDb db = temp.Db;
        var batch = new MutationBatch();
        // Keys of two "queues" interleaved, as a group commit receives them.
        for (byte i = 0; i < 20; i++)
        {
            batch.Put(1, [(byte)(i % 2 == 0 ? 0xB0 : 0xA0), i], [i]);
        }
        batch.Delete(1, [0xB0, 4]);
        batch.Put(1, [0xA0, 5], [55]);          // overwritten: the later value wins
        batch.Delete(1, [0xA0, 7]);
        batch.Put(1, [0xA0, 7], [77]);          // deleted, then put again: present
        batch.Put(1, [0xB0, 8], [88]);
        batch.Delete(1, [0xB0, 8]);             // put again, then deleted: absent
        batch.Put(2, [0xA0, 5], [200]);         // same key, other family

        Write(db, batch);

        await Assert.That(Get(db, 1, [0xB0, 4])).IsEqualTo(-1);
        await Assert.That(Value(db, 1, [0xA0, 5])).IsEqualTo(55);
        await Assert.That(Value(db, 1, [0xA0, 7])).IsEqualTo(77);
        await Assert.That(Get(db, 1, [0xB0, 8])).IsEqualTo(-1);
        await Assert.That(Value(db, 1, [0xB0, 6])).IsEqualTo(6);
        await Assert.That(Value(db, 2, [0xA0, 5])).IsEqualTo(200);

        // A range delete in the batch: a put after it survives, a put before it does not.
        batch.Clear();
        batch.Put(1, [0xA0, 30], [30]);
        batch.DeleteRange(1, [0xA0], [0xA1]);
        batch.Put(1, [0xA0, 31], [31]);
        Write(db, batch);

        await Assert.That(Get(db, 1, [0xA0, 30])).IsEqualTo(-1);
        await Assert.That(Get(db, 1, [0xA0, 1])).IsEqualTo(-1);
        await Assert.That(Value(db, 1, [0xA0, 31])).IsEqualTo(31);
        await Assert.That(Value(db, 1, [0xB0, 2])).IsEqualTo(2);
    }

    [Test]
    public async Task A_single_delete_and_the_put_it_deletes_vanish_together_where_a_delete_leaves_its_tombstone_in_a_file()
    {
        using var temp = new TempDb();
        RocksDb db = temp.Db;
        var batch = new MutationBatch();
        for (byte i = 0; i < 100; i++)
        {
            batch.Put(1, [0xA0, i], [i]);
            batch.Put(2, [0xA0, i], [i]);
        }
        Write(db, batch);
        batch.Clear();
        for (byte i = 0; i < 100; i++)
        {
            batch.SingleDelete(1, [0xA0, i]);
            batch.Delete(2, [0xA0, i]);
        }
        Write(db, batch);
        db.FlushAll();

        for (byte i = 0; i < 100; i++)
        {
            await Assert.That(Get(db, 1, [0xA0, i])).IsEqualTo(-1);
            await Assert.That(Get(db, 2, [0xA0, i])).IsEqualTo(-1);
        }
        await Assert.That(db.PropertyLong(1, "rocksdb.num-files-at-level0")).IsEqualTo(0);
        await Assert.That(db.PropertyLong(2, "rocksdb.num-files-at-level0")).IsEqualTo(1);
    }

    [Test]
    [Arguments(3)]
    [Arguments(300)]
    [Arguments(5000)]
    public async Task Any_mix_of_writes_and_deletes_of_few_keys_leaves_what_call_order_leaves(int mutations)
    {
        using var temp = new TempDb();
        RocksDb db = temp.Db;
        var random = new Random(mutations);
        var batch = new MutationBatch();
        var model = new Dictionary<string, byte>();
        // 12 keys of 32 bytes in 3 "queues" and 4 short keys: every key is written and deleted
        // many times in one batch, so the order of equal keys decides the result.
        byte[][] keys = Enumerable.Range(0, 12)
            .Select(i => Enumerable.Repeat((byte)(0x40 + i / 4), 24).Concat(BitConverter.GetBytes((ulong)i).Reverse()).ToArray())
            .Concat(Enumerable.Range(0, 4).Select(i => new[] { (byte)(0x40 + i) }))
            .ToArray();
        for (int i = 0; i < mutations; i++)
        {
            byte[] key = keys[random.Next(keys.Length)];
            int cf = 1 + random.Next(2);
            string name = cf + ":" + Convert.ToHexString(key);
            if (random.Next(3) == 0)
            {
                batch.Delete(cf, key);
                model.Remove(name);
            }
            else
            {
                byte value = (byte)random.Next(256);
                batch.Put(cf, key, [value]);
                model[name] = value;
            }
        }

        Write(db, batch);

        foreach (byte[] key in keys)
        {
            for (int cf = 1; cf <= 2; cf++)
            {
                int expected = model.TryGetValue(cf + ":" + Convert.ToHexString(key), out byte v) ? v : -999;   // Value: -1000 - (-1) when absent
                await Assert.That(Value(db, cf, key)).IsEqualTo(expected);
            }
        }
    }

    private static void Write(RocksDb db, MutationBatch batch)
    {
        nint native = rocksdb_writebatch_create();
        try
        {
            batch.Sort();
            batch.WriteTo(native, db);
            db.Write(native, sync: false);
        }
        finally
        {
            rocksdb_writebatch_destroy(native);
        }
    }

    private static int Get(RocksDb db, int cf, byte[] key) => db.Get(cf, key, stackalloc byte[8]);

    private static int Value(RocksDb db, int cf, byte[] key)
    {
        Span<byte> value = stackalloc byte[8];
        int length = db.Get(cf, key, value);
        return length == 1 ? value[0] : -1000 - length;
    }

    /// <summary>A RocksDB with the test's column families in its own temporary directory, deleted on dispose.</summary>
    private sealed class TempDb : IDisposable
    {
        private readonly string _path = Path.Combine(Path.GetTempPath(), "relay-mutation-test-" + Guid.NewGuid().ToString("N"));

        public TempDb() => Db = RocksDb.Open(_path, Families, 1 << 20);

        public RocksDb Db { get; }

        public void Dispose()
        {
            Db.Dispose();
            Directory.Delete(_path, recursive: true);
        }
    }
}
