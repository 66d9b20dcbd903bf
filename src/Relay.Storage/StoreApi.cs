namespace Relay.Storage;

/// <summary>Outcome of a store operation. Expected outcomes are values, not exceptions.</summary>
public enum StoreStatus : byte
{
    Ok = 0,
    /// <summary>No such queue or message.</summary>
    NotFound,
    /// <summary>The queue holds its maximum number of messages or bytes.</summary>
    QuotaExceeded,
    /// <summary>The server-wide disk budget is reached, or the store's file system is full (<see cref="QueueStore.IsDiskFull"/>).</summary>
    StoreFull,
    /// <summary>The queue is already secured with a different sender key.</summary>
    Conflict,
    /// <summary>The queue is suspended (sends refused).</summary>
    Suspended,
    /// <summary>The message is not the oldest of its queue (ACK out of order).</summary>
    NotOldest,
    /// <summary>
    /// The queue's deletion is being written (<see cref="QueueDeletion.Pending"/>): nothing was done.
    /// Whether the queue is gone is not known until that write ends (a failed one undoes the deletion);
    /// the caller tries again.
    /// </summary>
    Deleting,
}

public sealed class QueueStoreOptions
{
    /// <summary>Directory of the RocksDB database (created when missing).</summary>
    public required string Path { get; init; }

    /// <summary>Messages older than this are deleted by the sweeper. Default 21 days.</summary>
    public TimeSpan MessageTtl { get; init; } = TimeSpan.FromDays(21);

    /// <summary>Queues with no activity for this long are deleted with their messages. Zero: never.</summary>
    public TimeSpan IdleQueueTtl { get; init; } = TimeSpan.Zero;

    /// <summary>Per-queue quota in messages. Default 128.</summary>
    public int MaxMessagesPerQueue { get; init; } = 128;

    /// <summary>Per-queue quota in body bytes. Default 8 MiB.</summary>
    public long MaxBytesPerQueue { get; init; } = 8L * 1024 * 1024;

    /// <summary>Server-wide budget of on-disk bytes (SST + WAL). Zero: unlimited.</summary>
    public long DiskBudgetBytes { get; init; }

    /// <summary>True (default): every acknowledged write is fsynced (group commit). False: relaxed mode, no fsync.</summary>
    public bool Durable { get; init; } = true;

    /// <summary>How often the expiry sweeper runs. Default 10 minutes.</summary>
    public TimeSpan SweepInterval { get; init; } = TimeSpan.FromMinutes(10);

    /// <summary>
    /// Memory for the delivery tails (recent appends of subscribed queues, delivered without a store
    /// read). Zero: every delivery reads the store. Default 16 MiB.
    /// </summary>
    public long DeliveryTailBytes { get; init; } = 16L * 1024 * 1024;

    /// <summary>
    /// Opens with RocksDB's automatic compactions off until <see cref="QueueStore.ResumeCompactions"/>, so that
    /// a compaction due at open (table files left by earlier runs) does not compete with start-up.
    /// </summary>
    public bool DeferCompactions { get; init; }

    /// <summary>Clock, replaceable in tests.</summary>
    public TimeProvider Clock { get; init; } = TimeProvider.System;
}

/// <summary>A message read from the store. <see cref="Body"/> is in a pooled buffer; call <see cref="Return"/> when done with it.</summary>
public struct StoredMessage
{
    public ulong Id;
    /// <summary>Coarse arrival time: whole hours since the Unix epoch.</summary>
    public uint Hour;
    public byte Flags;
    public byte[] Buffer;
    public int Length;
    public readonly ReadOnlySpan<byte> Body => Buffer.AsSpan(0, Length);
    public void Return() { if (Buffer is { Length: > 0 }) MessageBuffers.Shared.Return(Buffer); Buffer = []; }
}

public readonly record struct AppendResult(StoreStatus Status, ulong MessageId, uint Hour);

public readonly record struct StoreCommit(int Operations, double FsyncSeconds);

/// <summary>The store failed: the directory cannot be opened (missing permissions, locked by another
/// process) or RocksDB reported an I/O error. The affected operation stored nothing.</summary>
public sealed class StoreException : Exception
{
    public StoreException(string message) : base(message) { }

    public StoreException(string message, Exception inner) : base(message, inner)
    {
        DiskFull = inner is StoreException { DiskFull: true };
    }

    /// <summary>
    /// The file system of the store has no space left (RocksDB's "No space left on device"): the
    /// operation stored nothing, and writes fail until space is free again (see <see cref="QueueStore.IsDiskFull"/>).
    /// </summary>
    public bool DiskFull { get; internal init; }
}
