using System.Buffers;
using System.Diagnostics;
using System.Threading.Tasks.Sources;
using Relay.Storage.Native;
using static Relay.Storage.Native.RocksDbNative;

namespace Relay.Storage;

// Group commit. Callers copy their mutations into the open batch under _batchLock (so a caller's
// buffer is copied before its call returns, and operations enter the batch in call order) and
// register a pooled WriteOp. One writer thread takes whole batches, hands each to RocksDB in key
// order (MutationBatch) with one rocksdb_write (sync = Durable, i.e. one fsync per batch) and then
// completes every operation of the batch, in call order. While one batch is being fsynced the next
// one fills up.
public sealed partial class QueueStore
{
    private const int MaxOpsPerBatch = 4096;
    private const long MaxBytesPerBatch = 4L * 1024 * 1024;

    private readonly object _batchLock = new();
    private PendingBatch _current = null!;
    private readonly Queue<PendingBatch> _sealed = new();
    private readonly Stack<PendingBatch> _spareBatches = new();
    /// <summary>The native write batch, used by the writer thread only.</summary>
    private nint _nativeBatch;
    private bool _writerStopping;
    private bool _writerWaiting;
    private Thread _writer = null!;

    private readonly System.Collections.Concurrent.ConcurrentQueue<WriteOp> _opPool = new();
    private int _opPoolCount;

    /// <summary>
    /// Called on the writer thread before each batch is written, with its operation count and message
    /// bytes. Throwing fails the batch as a failed disk write would; blocking stands for a slow disk.
    /// For tests of what the layers above do then.
    /// </summary>
    internal Action<int, long>? BeforeWrite;

    /// <summary>Raised by the writer thread after each batch, before any of its operations is answered: operations in it and seconds spent writing (and fsyncing) it.</summary>
    public event Action<StoreCommit>? Committed;

    private void StartWriter()
    {
        _current = RentBatch();
        _nativeBatch = rocksdb_writebatch_create();
        _writer = new Thread(WriterLoop) { IsBackground = true, Name = "Relay.Storage writer" };
        _writer.Start();
    }

    /// <summary>Stops accepting writes, lets the writer finish every pending batch and waits for it.</summary>
    private void StopWriter()
    {
        lock (_batchLock)
        {
            _writerStopping = true;
            Monitor.Pulse(_batchLock);
        }
        _writer.Join();
        if (_nativeBatch != 0)
        {
            rocksdb_writebatch_destroy(_nativeBatch);
            _nativeBatch = 0;
        }
    }

    private PendingBatch RentBatch()
    {
        if (_spareBatches.TryPop(out PendingBatch? batch))
        {
            return batch;
        }
        return new PendingBatch();
    }

    /// <summary>Enters the batch lock. Throws <see cref="ObjectDisposedException"/> (holding nothing) once the store is closing.</summary>
    internal BatchScope BeginBatch()
    {
        Monitor.Enter(_batchLock);
        if (_writerStopping)
        {
            Monitor.Exit(_batchLock);
            throw new ObjectDisposedException(nameof(QueueStore));
        }
        return new BatchScope(this, _current);
    }

    /// <summary>Called by <see cref="BatchScope.Add"/> with the lock held.</summary>
    private void AddOp(PendingBatch batch, WriteOp op)
    {
        batch.Ops.Add(op);
        if (batch.Ops.Count >= MaxOpsPerBatch || batch.Mutations.Bytes >= MaxBytesPerBatch)
        {
            _sealed.Enqueue(batch);
            _current = RentBatch();
        }
        if (_writerWaiting)
        {
            Monitor.Pulse(_batchLock);
        }
    }

    private void WriterLoop()
    {
        while (true)
        {
            PendingBatch batch;
            lock (_batchLock)
            {
                while (true)
                {
                    if (_sealed.TryDequeue(out PendingBatch? full))
                    {
                        batch = full;
                        break;
                    }
                    if (_current.Ops.Count > 0)
                    {
                        batch = _current;
                        _current = RentBatch();
                        break;
                    }
                    if (_writerStopping)
                    {
                        return;
                    }
                    _writerWaiting = true;
                    Monitor.Wait(_batchLock);
                    _writerWaiting = false;
                }
            }

            Exception? error = null;
            long start = Stopwatch.GetTimestamp();
            try
            {
                BeforeWrite?.Invoke(batch.Ops.Count, batch.Mutations.Bytes);
                // An operation without mutations (a barrier) only needs the batches before it written.
                if (batch.Mutations.Count > 0)
                {
                    batch.Mutations.Sort();
                    batch.Mutations.WriteTo(_nativeBatch, _db);
                    _db.Write(_nativeBatch, _options.Durable);
                }
            }
            catch (Exception e)
            {
                error = e as StoreException ?? new StoreException("The write failed: " + e.Message, e);
                Interlocked.Increment(ref _statistics._writeFailures);
            }
            double seconds = Stopwatch.GetElapsedTime(start).TotalSeconds;
            int count = batch.Ops.Count;
            Interlocked.Increment(ref _statistics._batches);
            Interlocked.Add(ref _statistics._operations, count);

            foreach (WriteOp op in batch.Ops)
            {
                try
                {
                    if (error is null && op.Kind == OpKind.Barrier && Interlocked.Read(ref _statistics._writeFailures) != op.FailuresBefore)
                    {
                        // A batch failed after this barrier was made: the write it waits for (an SKEY
                        // or OFF retried) may have been in it, and was undone. Never answer OK for it.
                        OnFailed(op, new StoreException("An earlier write failed; the operation was not made durable."));
                    }
                    else if (error is null)
                    {
                        OnCommitted(op);
                    }
                    else
                    {
                        OnFailed(op, error);
                    }
                }
                catch (Exception e)
                {
                    // Bookkeeping must never stop the writer; the caller still gets an answer.
                    if (!op.Detached && !op.Staged)
                    {
                        op.Fail(e);
                    }
                }
            }
            // Before the callers hear of their operations: whoever awaited one sees its batch counted.
            try
            {
                Committed?.Invoke(new StoreCommit(count, seconds));
            }
            catch
            {
                // A failing subscriber must not stop the writer.
            }
            DispatchCompletions(batch.Ops);

            rocksdb_writebatch_clear(_nativeBatch);
            batch.Mutations.Clear();
            batch.Ops.Clear();
            lock (_batchLock)
            {
                _spareBatches.Push(batch);
            }
        }
    }

    private static readonly Action<(WriteOp[] Ops, int Count)> s_complete = static work =>
    {
        for (int i = 0; i < work.Count; i++)
        {
            work.Ops[i].Complete();
        }
        ArrayPool<WriteOp>.Shared.Return(work.Ops, clearArray: true);
    };

    /// <summary>Completes the staged operations of a committed batch together, on one thread-pool thread.</summary>
    private static void DispatchCompletions(List<WriteOp> ops)
    {
        int count = 0;
        WriteOp[] staged = ArrayPool<WriteOp>.Shared.Rent(Math.Max(1, ops.Count));
        foreach (WriteOp op in ops)
        {
            if (op.Staged)
            {
                staged[count++] = op;
            }
        }
        if (count == 0)
        {
            ArrayPool<WriteOp>.Shared.Return(staged);
            return;
        }
        ThreadPool.UnsafeQueueUserWorkItem(s_complete, (staged, count), preferLocal: false);
    }

    internal WriteOp RentOp(OpKind kind, QueueHandle? queue)
    {
        if (_opPool.TryDequeue(out WriteOp? op))
        {
            Interlocked.Decrement(ref _opPoolCount);
        }
        else
        {
            op = new WriteOp(this);
        }
        op.Kind = kind;
        op.Queue = queue;
        return op;
    }

    internal void ReturnOp(WriteOp op)
    {
        if (Interlocked.Increment(ref _opPoolCount) <= 1024)
        {
            _opPool.Enqueue(op);
        }
        else
        {
            Interlocked.Decrement(ref _opPoolCount);
        }
    }

    internal sealed class PendingBatch
    {
        public readonly MutationBatch Mutations = new();
        public readonly List<WriteOp> Ops = [];
    }

    /// <summary>
    /// Holds the batch lock while a caller adds its mutations and then its operation (<see cref="Add"/>,
    /// exactly once). Dispose releases the lock.
    /// </summary>
    internal ref struct BatchScope
    {
        private readonly QueueStore _store;
        private readonly PendingBatch _batch;

        internal BatchScope(QueueStore store, PendingBatch batch)
        {
            _store = store;
            _batch = batch;
        }

        public readonly void Put(int cf, ReadOnlySpan<byte> key, ReadOnlySpan<byte> value) => _batch.Mutations.Put(cf, key, value);

        /// <summary>Puts a value made of two parts without first joining them.</summary>
        public readonly void Put(int cf, ReadOnlySpan<byte> key, ReadOnlySpan<byte> value1, ReadOnlySpan<byte> value2) =>
            _batch.Mutations.Put(cf, key, value1, value2);

        public readonly void Delete(int cf, ReadOnlySpan<byte> key) => _batch.Mutations.Delete(cf, key);

        public readonly void DeleteRange(int cf, ReadOnlySpan<byte> start, ReadOnlySpan<byte> end) =>
            _batch.Mutations.DeleteRange(cf, start, end);

        public readonly void Add(WriteOp op)
        {
            if (op.Queue is { } queue)
            {
                Interlocked.Increment(ref queue.PendingOps);
            }
            _store.AddOp(_batch, op);
        }

        public readonly void Dispose() => Monitor.Exit(_store._batchLock);
    }
}

internal enum OpKind : byte
{
    /// <summary>No mutations: completes once everything enqueued before it is durable.</summary>
    Barrier,
    /// <summary>Store metadata (epoch), or cleanup without a queue handle.</summary>
    Meta,
    Create,
    Append,
    Ack,
    Secure,
    Suspend,
    Delete,
    Expire,
}

/// <summary>A pooled completion for one caller's write; awaited as a ValueTask without allocating.</summary>
internal sealed class WriteOp : IValueTaskSource<AppendResult>, IValueTaskSource<StoreStatus>
{
    // Continuations run where Complete is called: on the one work item that completes a whole batch.
    private ManualResetValueTaskSourceCore<AppendResult> _core = new() { RunContinuationsAsynchronously = false };
    private readonly QueueStore _store;

    public OpKind Kind;
    public QueueHandle? Queue;
    /// <summary>Append: the message id; Ack, Expire: the oldest deleted id.</summary>
    public ulong MessageId;
    public uint Hour;
    /// <summary>Body bytes appended, acked or expired (for rolling back counters).</summary>
    public long Bytes;
    /// <summary>Ack, Expire: messages deleted.</summary>
    public int Count;
    /// <summary>The operation moved the queue's last-active hour from this value (0: it did not).</summary>
    public uint PreviousActiveHour;
    /// <summary>The operation wrote the queue's expiry entry for <see cref="Hour"/>.</summary>
    public bool WroteExpiry;
    /// <summary>Delete: the queue was removed for idleness.</summary>
    public bool Idle;
    /// <summary>Barrier: the store's count of failed batches when it was made.</summary>
    public long FailuresBefore;
    /// <summary>Nobody awaits it: the writer recycles it.</summary>
    public bool Detached;

    public WriteOp(QueueStore store) => _store = store;

    public ValueTask<AppendResult> AsAppendTask() => new(this, _core.Version);

    public ValueTask<StoreStatus> AsStatusTask() => new(this, _core.Version);

    private AppendResult _result;
    private Exception? _error;

    /// <summary>Holds the outcome until <see cref="Complete"/>; true when the caller must be completed (not detached).</summary>
    public bool Staged { get; private set; }

    public void Succeed(AppendResult result)
    {
        if (Detached)
        {
            Recycle();
        }
        else
        {
            _result = result;
            Staged = true;
        }
    }

    public void Fail(Exception error)
    {
        if (Detached)
        {
            Recycle();
        }
        else
        {
            _error = error;
            Staged = true;
        }
    }

    /// <summary>
    /// Completes the caller with the staged outcome, running its continuation on this thread: the
    /// writer hands a whole batch's completions to one thread-pool work item, instead of one work
    /// item (and often one wake-up) per operation.
    /// </summary>
    public void Complete()
    {
        Exception? error = _error;
        AppendResult result = _result;
        _error = null;
        _result = default;
        Staged = false;
        if (error is null)
        {
            _core.SetResult(result);
        }
        else
        {
            _core.SetException(error);
        }
    }

    AppendResult IValueTaskSource<AppendResult>.GetResult(short token)
    {
        try
        {
            return _core.GetResult(token);
        }
        finally
        {
            Recycle();
        }
    }

    StoreStatus IValueTaskSource<StoreStatus>.GetResult(short token)
    {
        try
        {
            return _core.GetResult(token).Status;
        }
        finally
        {
            Recycle();
        }
    }

    public ValueTaskSourceStatus GetStatus(short token) => _core.GetStatus(token);

    public void OnCompleted(Action<object?> continuation, object? state, short token, ValueTaskSourceOnCompletedFlags flags)
        => _core.OnCompleted(continuation, state, token, flags);

    private void Recycle()
    {
        _core.Reset();
        Queue = null;
        MessageId = 0;
        Hour = 0;
        Bytes = 0;
        Count = 0;
        PreviousActiveHour = 0;
        WroteExpiry = false;
        Idle = false;
        FailuresBefore = 0;
        Detached = false;
        _store.ReturnOp(this);
    }
}
