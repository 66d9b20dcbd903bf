using System.Runtime.CompilerServices;
using BenchmarkDotNet.Attributes;
using Relay.Protocol;
using Relay.Storage;

namespace Relay.Benchmarks;

/// <summary>A real RocksDB store in a temporary directory, with <c>count</c> queues.</summary>
internal sealed class TempStore : IAsyncDisposable
{
    public string Path { get; } = System.IO.Path.Combine(System.IO.Path.GetTempPath(), "relay-bench-" + Guid.NewGuid().ToString("N"));
    public QueueStore Store { get; }
    public QueueHandle[] Queues { get; }

    public TempStore(bool durable, int count)
    {
        Store = QueueStore.Open(new QueueStoreOptions { Path = Path, Durable = durable });
        Queues = new QueueHandle[count];
        for (int i = 0; i < count; i++)
        {
            var (status, queue) = Store.CreateQueueAsync(
                Fixtures.Random(ProtocolConstants.IdSize), Fixtures.Random(ProtocolConstants.IdSize),
                Fixtures.Random(ProtocolConstants.KeySize), Fixtures.Random(ProtocolConstants.KeySize)).AsTask().GetAwaiter().GetResult();
            Queues[i] = status == StoreStatus.Ok ? queue! : throw new InvalidOperationException($"create: {status}");
        }
    }

    public async ValueTask DisposeAsync()
    {
        await Store.DisposeAsync();
        Directory.Delete(Path, recursive: true);
    }
}

/// <summary>
/// One message's life in the store, awaited in sequence: AppendAsync (durable when it completes),
/// TryPeekOldest (the point read the delivery does), AckAsync (the delete). Durable=true waits for
/// two group commits, each with an fsync of the WAL: it measures fsync latency on this disk, not CPU.
/// Durable=false (relaxed) writes the WAL without fsync.
/// </summary>
[MemoryDiagnoser]
public class StoreBenchmarks
{
    private TempStore _store = null!;
    private byte[] _body = [];

    [Params(false, true)]
    public bool Durable { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        _body = Fixtures.Random(Fixtures.BodySize);
        _store = new TempStore(Durable, 1);
    }

    [GlobalCleanup]
    public void Cleanup() => _store.DisposeAsync().AsTask().GetAwaiter().GetResult();

    [Benchmark]
    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    public async ValueTask Append_Peek_Ack()
    {
        var store = _store.Store;
        var queue = _store.Queues[0];
        var appended = await store.AppendAsync(queue, 0, _body);
        if (appended.Status != StoreStatus.Ok) throw new InvalidOperationException($"append: {appended.Status}");
        if (!store.TryPeekOldest(queue, out var message)) throw new InvalidOperationException("peek: empty");
        ulong id = message.Id;
        message.Return();
        var acked = await store.AckAsync(queue, id);
        if (acked != StoreStatus.Ok) throw new InvalidOperationException($"ack: {acked}");
    }
}

/// <summary>
/// Group commit: N appends to N queues issued together and awaited together, then their N peeks
/// and N ACKs likewise, so one op (reported per op through OperationsPerInvoke) is one append plus
/// one delete of a 256-byte message. With fsync, N=1 pays two fsyncs per message; N=256 shares them.
/// </summary>
[MemoryDiagnoser]
public class GroupCommitBenchmarks
{
    private const int MaxBatch = 256;
    private TempStore _store = null!;
    private byte[] _body = [];
    private readonly ValueTask<AppendResult>[] _appends = new ValueTask<AppendResult>[MaxBatch];
    private readonly ValueTask<StoreStatus>[] _acks = new ValueTask<StoreStatus>[MaxBatch];

    [Params(false, true)]
    public bool Durable { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        _body = Fixtures.Random(Fixtures.BodySize);
        _store = new TempStore(Durable, MaxBatch);
    }

    [GlobalCleanup]
    public void Cleanup() => _store.DisposeAsync().AsTask().GetAwaiter().GetResult();

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask BatchAsync(int n)
    {
        var store = _store.Store;
        var queues = _store.Queues;
        for (int i = 0; i < n; i++)
        {
            _appends[i] = store.AppendAsync(queues[i], 0, _body);
        }
        for (int i = 0; i < n; i++)
        {
            var r = await _appends[i];
            if (r.Status != StoreStatus.Ok) throw new InvalidOperationException($"append: {r.Status}");
        }
        for (int i = 0; i < n; i++)
        {
            if (!store.TryPeekOldest(queues[i], out var message)) throw new InvalidOperationException("peek: empty");
            ulong id = message.Id;
            message.Return();
            _acks[i] = store.AckAsync(queues[i], id);
        }
        for (int i = 0; i < n; i++)
        {
            var s = await _acks[i];
            if (s != StoreStatus.Ok) throw new InvalidOperationException($"ack: {s}");
        }
    }

    [Benchmark(OperationsPerInvoke = 1)]
    public ValueTask Batch_N1() => BatchAsync(1);

    [Benchmark(OperationsPerInvoke = 16)]
    public ValueTask Batch_N16() => BatchAsync(16);

    [Benchmark(OperationsPerInvoke = 256)]
    public ValueTask Batch_N256() => BatchAsync(256);
}

/// <summary>
/// The writer's sort of one group-commit batch before it goes to RocksDB (MutationBatch.Sort), alone:
/// a batch as a live relay commits one, a message write and a delete (of an older message) for each
/// of 100 queues in arrival order, message keys as the store writes them.
/// </summary>
[MemoryDiagnoser]
public class MutationBatchBenchmarks
{
    private const int Queues = 100;
    private readonly MutationBatch _batch = new();
    private byte[][] _keys = [];
    private byte[] _value = [];

    [Params(200, 2000)]
    public int Mutations { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        var random = new Random(5);
        _value = Fixtures.Random(Fixtures.BodySize + 5);
        var queueIds = Enumerable.Range(0, Queues).Select(_ => Fixtures.Random(24)).ToArray();
        var nextId = new ulong[Queues];
        _keys = new byte[Mutations][];
        for (int i = 0; i < Mutations; i++)
        {
            int q = random.Next(Queues);
            var key = new byte[32];
            queueIds[q].CopyTo(key, 0);
            // Even: a write of the queue's next message; odd: the delete of one 20 messages older.
            ulong id = (7UL << 32) + (i % 2 == 0 ? nextId[q]++ + 20 : nextId[q]);
            System.Buffers.Binary.BinaryPrimitives.WriteUInt64BigEndian(key.AsSpan(24), id);
            _keys[i] = key;
        }
    }

    [Benchmark]
    public int Fill_and_sort()
    {
        _batch.Clear();
        for (int i = 0; i < _keys.Length; i++)
        {
            if (i % 2 == 0)
            {
                _batch.Put(3, _keys[i], _value);
            }
            else
            {
                _batch.SingleDelete(3, _keys[i]);
            }
        }
        _batch.Sort();
        return _batch.Count;
    }
}
