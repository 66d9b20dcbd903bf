namespace Relay.Storage;

/// <summary>Counters since the store was opened. Thread-safe; read them for metrics.</summary>
public sealed class StoreStatistics
{
    private readonly QueueStore _store;
    internal long _batches;
    internal long _operations;
    internal long _messagesAppended;
    internal long _messagesDeleted;
    internal long _messagesExpired;
    internal long _queuesCreated;
    internal long _queuesDeleted;
    internal long _idleQueuesDeleted;
    internal long _writeFailures;
    internal long _readFailures;
    internal long _sweepFailures;
    internal long _peeksFromMemory;
    internal long _peeksFromStore;

    internal StoreStatistics(QueueStore store) => _store = store;

    /// <summary>Write batches committed (one fsync each in durable mode).</summary>
    public long Batches => Interlocked.Read(ref _batches);
    /// <summary>Operations committed (each caller's write is one operation).</summary>
    public long Operations => Interlocked.Read(ref _operations);
    public long MessagesAppended => Interlocked.Read(ref _messagesAppended);
    /// <summary>Messages deleted by ACK.</summary>
    public long MessagesDeleted => Interlocked.Read(ref _messagesDeleted);
    /// <summary>Messages deleted because they outlived the message TTL.</summary>
    public long MessagesExpired => Interlocked.Read(ref _messagesExpired);
    public long QueuesCreated => Interlocked.Read(ref _queuesCreated);
    /// <summary>Queues deleted by their recipient or for idleness.</summary>
    public long QueuesDeleted => Interlocked.Read(ref _queuesDeleted);
    /// <summary>The part of <see cref="QueuesDeleted"/> removed for idleness.</summary>
    public long IdleQueuesDeleted => Interlocked.Read(ref _idleQueuesDeleted);
    /// <summary>Batches whose write failed (their callers got an exception).</summary>
    public long WriteFailures => Interlocked.Read(ref _writeFailures);
    /// <summary>Reads of a stored message from RocksDB that failed (a delivery or GET answered otherwise).</summary>
    public long ReadFailures => Interlocked.Read(ref _readFailures);
    /// <summary>Timer-driven sweeps that failed.</summary>
    public long SweepFailures => Interlocked.Read(ref _sweepFailures);
    /// <summary>Deliveries whose message came from the in-memory delivery tail (no store read).</summary>
    public long DeliveriesFromMemory => Interlocked.Read(ref _peeksFromMemory);
    /// <summary>Deliveries (and polls) whose message was read from RocksDB.</summary>
    public long DeliveriesFromStore => Interlocked.Read(ref _peeksFromStore);
    /// <summary>Body bytes held in memory by delivery tails now.</summary>
    public long DeliveryTailBytes => _store.TailBytes;
    /// <summary>Queue handles currently in memory.</summary>
    public int LoadedQueues => _store.LoadedQueueCount;

    /// <summary>On-disk bytes counted against the disk budget: SST files of every column family plus WAL files. Computed now.</summary>
    public long GetDiskBytes() => _store.ComputeDiskBytes();

    /// <summary>RocksDB's estimate of the queues stored (rocksdb.estimate-num-keys of the queues column family).</summary>
    public long EstimateQueues() => _store.Property(Cf.Queues, "rocksdb.estimate-num-keys");

    /// <summary>RocksDB's estimate of the messages stored (rocksdb.estimate-num-keys of the messages column family).</summary>
    public long EstimateMessages() => _store.Property(Cf.Messages, "rocksdb.estimate-num-keys");

    /// <summary>Estimated bytes of stored messages: live table data plus memtables of the messages column family.</summary>
    public long EstimateMessageBytes() =>
        _store.Property(Cf.Messages, "rocksdb.estimate-live-data-size") + _store.Property(Cf.Messages, "rocksdb.cur-size-all-mem-tables");

    /// <summary>Bytes RocksDB estimates compaction still has to rewrite (rocksdb.estimate-pending-compaction-bytes, all column families).</summary>
    public long GetPendingCompactionBytes() => _store.SumProperty("rocksdb.estimate-pending-compaction-bytes");
}
