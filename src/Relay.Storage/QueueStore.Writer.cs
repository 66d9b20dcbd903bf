using System.Buffers;
using System.Buffers.Binary;
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
    /// <summary>
    /// Set while a failed batch's operations and every one staged after it are being undone (no new
    /// staging meanwhile), completed and cleared when that ends. Under <see cref="_batchLock"/>.
    /// </summary>
    private TaskCompletionSource? _undone;
    /// <summary>The failure being undone while <see cref="_undone"/> is set. Under <see cref="_batchLock"/>.</summary>
    private Exception? _undoCause;
    /// <summary>The last epoch bump was in a failed batch: the next batch written carries the epoch (writer thread only).</summary>
    private bool _epochUnwritten;
    private bool _writerWaiting;
    private Thread _writer = null!;

    private readonly System.Collections.Concurrent.ConcurrentQueue<WriteOp> _opPool = new();
    private int _opPoolCount;
    private readonly System.Collections.Concurrent.ConcurrentQueue<CompletionBatch> _completionPool = new();

    /// <summary>
    /// Called on the writer thread before each batch is written, with its operation count and message
    /// bytes. Throwing fails the batch as a failed disk write would; blocking stands for a slow disk.
    /// For tests of what the layers above do then.
    /// </summary>
    internal Action<int, long>? BeforeWrite;

    /// <summary>Called on the writer thread while a failed write is being undone (staging is refused then). For tests.</summary>
    internal Action? WhileUndoing;

    /// <summary>
    /// Raised by the writer thread when a failed write was undone that deleted messages of the queue
    /// (an ACK, or expiry): they are stored again, the oldest of the queue once more, after a
    /// subscriber may have moved past them. Raised after the operation's caller heard of the failure,
    /// with no lock held; the handler must be quick (it runs while the writer undoes the batch).
    /// </summary>
    public event Action<QueueHandle>? MessagesPutBack;

    /// <summary>Raised by the writer thread after each batch, before any of its operations is answered: operations in it and seconds spent writing (and fsyncing) it.</summary>
    public event Action<StoreCommit>? Committed;

    /// <summary>
    /// Set by the writer when a write failed because the file system is full, cleared by the next
    /// write that succeeds (see <see cref="IsDiskFull"/>). Whether writes fail at all is
    /// <see cref="WritesFailing"/>. Written under <see cref="_batchLock"/> by the writer thread only.
    /// </summary>
    private volatile bool _diskFull;

    /// <summary>
    /// True from a write that failed because the store's file system is full (RocksDB's "No space
    /// left on device", then its writes stop) until a write succeeds again: meanwhile NEW and SEND
    /// answer <see cref="StoreStatus.StoreFull"/> without being staged. RocksDB resumes by itself once
    /// the file system has room for a memtable again; while the store is idle the writer tries a
    /// one-key write (the id epoch, unchanged) every <see cref="FailedWriteProbeInterval"/> to notice.
    /// </summary>
    public bool IsDiskFull => _diskFull;

    /// <summary>Raised by the writer thread when <see cref="IsDiskFull"/> changes, before the operations of the batch that changed it are answered.</summary>
    public event Action<bool>? DiskFullChanged;

    /// <summary>
    /// When the current run of failed writes began (a <see cref="Stopwatch"/> timestamp): set by the
    /// writer when a write failed, 0 again once one succeeds (see <see cref="WhenWritable"/>). Written
    /// under <see cref="_batchLock"/> by the writer thread only.
    /// </summary>
    private long _failingSince;

    private bool WritesFailing => Volatile.Read(ref _failingSince) != 0;

    /// <summary>
    /// How long every write has failed, the writer's tries included (zero while the store writes). A
    /// full disk ends by itself once space is free (<see cref="IsDiskFull"/>); RocksDB does not recover
    /// from another I/O error without being opened again.
    /// </summary>
    public TimeSpan WritesFailingFor
    {
        get
        {
            long since = Volatile.Read(ref _failingSince);
            return since == 0 ? TimeSpan.Zero : Stopwatch.GetElapsedTime(since);
        }
    }

    private volatile string? _lastWriteError;

    /// <summary>Why the last write (or the writer's try) failed while <see cref="WritesFailingFor"/> is above zero (RocksDB's status text); null while the store writes.</summary>
    public string? LastWriteError => _lastWriteError;

    /// <summary>How often the idle writer tries a write while the last one failed. For tests.</summary>
    internal TimeSpan FailedWriteProbeInterval = TimeSpan.FromSeconds(1);

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

    /// <summary>
    /// <see cref="BeginBatch(bool)"/> for <paramref name="op"/>, rented beforehand: refused, it goes back to
    /// the pool (nobody will await it).
    /// </summary>
    internal BatchScope BeginBatch(WriteOp op)
    {
        try
        {
            return BeginBatch();
        }
        catch
        {
            op.Discard();
            throw;
        }
    }

    /// <summary>
    /// Enters the batch lock. Throws (holding nothing, changing nothing) <see cref="ObjectDisposedException"/>
    /// once the store is closing, and <see cref="StoreException"/> while a failed write is being undone.
    /// </summary>
    /// <param name="evenWhileUndoing">
    /// For a write that copies no queue state (the id epoch, which only goes up): staged even while a
    /// failed write is being undone, since refusing it would leave ids of the new epoch unrecorded.
    /// </param>
    internal BatchScope BeginBatch(bool evenWhileUndoing = false)
    {
        Monitor.Enter(_batchLock);
        if (_writerStopping)
        {
            Monitor.Exit(_batchLock);
            throw new ObjectDisposedException(nameof(QueueStore));
        }
        if (_undone is not null && !evenWhileUndoing)
        {
            // What is staged now could copy state that the undo is about to take back (a queue
            // record with a sender key whose write failed) and make it durable after all.
            Monitor.Exit(_batchLock);
            // With the failure as its inner exception: a log line of the refusal names the cause.
            throw new StoreException("A write failed and is being undone; try again.", _undoCause!)
            {
                DiskFull = _undoCause is StoreException { DiskFull: true },
            };
        }
        return new BatchScope(this, _current);
    }

    /// <summary>
    /// Completes once no failed write is being undone (at once when none is). A write refused with
    /// <see cref="StoreException"/> meanwhile may be retried then; state read before it (a queue's
    /// oldest message, say) may still show operations the undo has yet to take back.
    /// </summary>
    public Task WhenUndone()
    {
        lock (_batchLock)
        {
            return _undone?.Task ?? Task.CompletedTask;
        }
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
        // After a failed batch the idle writer tries a write at once (a failure of one write alone
        // ends now, not in a second), then every FailedWriteProbeInterval while writes keep failing.
        bool probeDue = false;
        while (true)
        {
            PendingBatch? batch = null;
            ulong probeEpoch = 0;
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
                    if (probeDue && WritesFailing)
                    {
                        // Read under the lock: an epoch bump increments and stages together under it.
                        probeEpoch = _epoch;
                        break;
                    }
                    _writerWaiting = true;
                    if (WritesFailing)
                    {
                        probeDue = !Monitor.Wait(_batchLock, FailedWriteProbeInterval);
                    }
                    else
                    {
                        Monitor.Wait(_batchLock);
                    }
                    _writerWaiting = false;
                }
            }
            probeDue = false;
            if (batch is null)
            {
                ProbeFailedWrites(probeEpoch);
                continue;
            }

            Exception? error = null;
            long start = Stopwatch.GetTimestamp();
            try
            {
                BeforeWrite?.Invoke(batch.Ops.Count, batch.Mutations.Bytes);
                // An operation without mutations (a barrier) only needs the batches before it written.
                if (batch.Mutations.Count > 0)
                {
                    if (_epochUnwritten)
                    {
                        // Ids of this batch may come from an epoch whose bump failed: make it durable with them.
                        PutEpoch(batch.Mutations);
                    }
                    batch.Mutations.Sort();
                    batch.Mutations.WriteTo(_nativeBatch, _db);
                    _db.Write(_nativeBatch, _options.Durable);
                }
            }
            catch (Exception e)
            {
                error = e as StoreException ?? new StoreException("The write failed: " + e.Message, e);
            }
            double seconds = Stopwatch.GetElapsedTime(start).TotalSeconds;
            int count = batch.Ops.Count;
            Interlocked.Increment(ref _statistics._batches);
            Interlocked.Add(ref _statistics._operations, count);

            if (error is null)
            {
                if (batch.Mutations.Count > 0)
                {
                    _epochUnwritten = false;   // written with this batch
                    SetWriteState(null);
                }
                // A barrier here is answered OK rightly: the write it waits for (an SKEY or OFF
                // retried) was staged before it, so it is in this batch or an earlier one, all written
                // (had one failed, FailFrom would have failed this batch too).
                foreach (WriteOp op in batch.Ops)
                {
                    Finish(op, null);
                }
            }
            else
            {
                // Before the answers: a NEW or SEND that arrives after its client heard FULL is refused at once.
                SetWriteState(error);
                probeDue = true;
                FailFrom(batch, error);
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
            DispatchCompletions(batch.Ops, mayRunHere: error is null);

            rocksdb_writebatch_clear(_nativeBatch);
            batch.Mutations.Clear();
            batch.Ops.Clear();
            lock (_batchLock)
            {
                _spareBatches.Push(batch);
            }
        }
    }

    /// <summary>
    /// While the last write failed and nothing is to be written: writes the id epoch (its current
    /// value, which changes nothing) to learn whether RocksDB writes again.
    /// </summary>
    private void ProbeFailedWrites(ulong epoch)
    {
        Exception? error = null;
        try
        {
            BeforeWrite?.Invoke(0, 0);
            Span<byte> value = stackalloc byte[8];
            BinaryPrimitives.WriteUInt64BigEndian(value, epoch);
            _db.PutSync(Cf.Default, Keys.EpochKey, value);
            _epochUnwritten = false;
        }
        catch (Exception e)
        {
            error = e;
        }
        SetWriteState(error);
    }

    /// <summary>
    /// Completes once the store writes (at once unless its last write failed): when a write or the
    /// writer's own try (every <see cref="FailedWriteProbeInterval"/> while idle) succeeded. Not
    /// completed by closing the store.
    /// </summary>
    public Task WhenWritable()
    {
        lock (_batchLock)
        {
            if (!WritesFailing)
            {
                return Task.CompletedTask;
            }
            _writable ??= new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            return _writable.Task;
        }
    }

    /// <summary>
    /// Completes once no failed write is being undone and the store writes (<see cref="WhenUndone"/>,
    /// then <see cref="WhenWritable"/>): what a failed write put back is stored again, and what is
    /// delivered from it now can be acknowledged for good.
    /// </summary>
    public async Task WhenWritesAgain()
    {
        await WhenUndone().ConfigureAwait(false);
        await WhenWritable().ConfigureAwait(false);
    }

    /// <summary>Completed when a write succeeds again; under <see cref="_batchLock"/>.</summary>
    private TaskCompletionSource? _writable;

    /// <summary>After a write (or the writer's try) that failed with <paramref name="error"/> or succeeded (null). Writer thread only.</summary>
    private void SetWriteState(Exception? error)
    {
        bool failing = error is not null;
        bool full = error is StoreException { DiskFull: true };
        _lastWriteError = error?.Message;
        if (WritesFailing == failing && _diskFull == full)
        {
            return;
        }
        bool fullChanged = _diskFull != full;
        TaskCompletionSource? writable;
        lock (_batchLock)
        {
            if (failing != WritesFailing)
            {
                Volatile.Write(ref _failingSince, failing ? Stopwatch.GetTimestamp() : 0);
            }
            _diskFull = full;
            writable = failing ? null : _writable;
            if (!failing) _writable = null;
        }
        if (fullChanged)
        {
            try
            {
                DiskFullChanged?.Invoke(full);
            }
            catch
            {
                // A failing subscriber must not stop the writer.
            }
        }
        // After the event: whoever waited hears of the change after its subscribers (the log's line first).
        writable?.TrySetResult();
    }

    private void PutEpoch(MutationBatch mutations)
    {
        Span<byte> epoch = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(epoch, Volatile.Read(ref _epoch));
        mutations.Put(Cf.Default, Keys.EpochKey, epoch);
    }

    /// <summary>Commits or fails one operation's bookkeeping; never throws (the caller still gets an answer).</summary>
    private void Finish(WriteOp op, Exception? error)
    {
        try
        {
            if (error is null)
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
            if (!op.Detached && !op.Staged)
            {
                op.Fail(e);
            }
        }
    }

    /// <summary>
    /// A batch failed: it and every batch staged after it fail together, newest operation first, so
    /// each undo restores what the operation before it left. A later batch may hold state copied
    /// from a failed one (a queue record with the sender key of a failed SKEY, an append that relied
    /// on the expiry entry or the activity hour of a failed one, quota that a failed ACK released)
    /// and must not reach the disk. Staging is refused meanwhile: what is staged after the undo sees
    /// the state as it is on disk (a retried SKEY whose first write failed writes again rather than
    /// waiting on a barrier).
    /// </summary>
    private void FailFrom(PendingBatch failed, Exception error)
    {
        var later = new List<PendingBatch>();
        lock (_batchLock)
        {
            _undone = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            _undoCause = error;
            while (_sealed.TryDequeue(out PendingBatch? next))
            {
                later.Add(next);
            }
            if (_current.Ops.Count > 0)
            {
                later.Add(_current);
                _current = RentBatch();
            }
        }
        try
        {
            WhileUndoing?.Invoke();
            var after = new StoreException("An earlier write failed; the operation was not made durable.", error);
            for (int b = later.Count - 1; b >= 0; b--)
            {
                UndoAll(later[b], after);
            }
            UndoAll(failed, error);
        }
        finally
        {
            Interlocked.Increment(ref _statistics._writeFailures);
            TaskCompletionSource? undone;
            lock (_batchLock)
            {
                undone = _undone;
                _undone = null;
                _undoCause = null;
            }
            undone?.TrySetResult();
        }
        // The later batches are answered here (never written: not counted as batches); the failed
        // one by the caller, as a written one is.
        foreach (PendingBatch batch in later)
        {
            DispatchCompletions(batch.Ops);
            batch.Mutations.Clear();
            batch.Ops.Clear();
            lock (_batchLock)
            {
                _spareBatches.Push(batch);
            }
        }
    }

    private void UndoAll(PendingBatch batch, Exception error)
    {
        for (int i = batch.Ops.Count - 1; i >= 0; i--)
        {
            WriteOp op = batch.Ops[i];
            if (op.Kind == OpKind.Epoch)
            {
                _epochUnwritten = true;
            }
            Finish(op, error);
        }
    }

    /// <summary>
    /// Completes the staged operations of a committed batch together: on one thread-pool thread, or on
    /// this (the writer) thread when <paramref name="mayRunHere"/>, every operation in the batch is
    /// <see cref="WriteOp.Quick"/> and the batch is small: up to <see cref="MaxOpsCompletedByWriter"/>
    /// when nothing waits to be written, up to <see cref="MaxOpsCompletedWhileOthersWait"/> when the next
    /// batch waits (their answers take less than waking a pool thread would, and delay its write by
    /// that). At a low rate that saves a thread wake-up per batch, and with <see cref="CompletionScope"/>
    /// the ones for the answers' sends; under load the pool completes one batch while the next is written.
    /// </summary>
    private void DispatchCompletions(List<WriteOp> ops, bool mayRunHere = false)
    {
        CompletionBatch? work = null;
        bool quick = mayRunHere && ops.Count <= MaxOpsCompletedByWriter;
        foreach (WriteOp op in ops)
        {
            if (op.Staged)
            {
                work ??= RentCompletionBatch(ops.Count);
                work.Ops[work.Count++] = op;
                quick &= op.Quick;
            }
        }
        if (work is null)
        {
            return;
        }
        if (quick && (work.Count <= MaxOpsCompletedWhileOthersWait || NothingToWrite()))
        {
            try
            {
                work.Execute(CompletionScope);
            }
            catch
            {
                // Continuations do not throw (StoreCompletion catches, an async method keeps its exception); a failing scope must not stop the writer.
            }
            return;
        }
        ThreadPool.UnsafeQueueUserWorkItem(work, preferLocal: false);
    }

    /// <summary>Most operations of a batch the writer completes itself (see <see cref="DispatchCompletions"/>).</summary>
    private const int MaxOpsCompletedByWriter = 32;

    /// <summary>Most operations the writer completes itself while the next batch waits to be written.</summary>
    private const int MaxOpsCompletedWhileOthersWait = 4;

    private bool NothingToWrite()
    {
        lock (_batchLock)
        {
            return _sealed.Count == 0 && _current.Ops.Count == 0;
        }
    }

    /// <summary>
    /// Wraps the completion of a batch the writer thread completes itself (see <see cref="DispatchCompletions"/>):
    /// given the work, it must run it exactly once. For a caller whose continuations gather work better
    /// done once per batch (the relay sends each connection's answers after the batch, on that thread,
    /// instead of waking a pool thread for them). Set before the first write; null runs the completions
    /// as they are. Batches completed on the thread pool run without it: there the answers' sends go on
    /// pool threads of their own, in parallel with the rest of the batch.
    /// </summary>
    public Action<Action>? CompletionScope { get; set; }

    private const int MaxPooledCompletionOps = 4096;

    private CompletionBatch RentCompletionBatch(int capacity)
    {
        if (!_completionPool.TryDequeue(out CompletionBatch? work))
        {
            work = new CompletionBatch(this);
        }
        if (work.Ops.Length < capacity)
        {
            // Doubling stops at the largest array kept in the pool; a bigger batch gets its own.
            work.Ops = new WriteOp[Math.Max(capacity, Math.Min(2 * work.Ops.Length, MaxPooledCompletionOps))];
        }
        return work;
    }

    /// <summary>
    /// One committed batch's staged operations, completed by one thread-pool work item (or by the
    /// writer, see <see cref="DispatchCompletions"/>). Pooled: the writer hands one out per commit.
    /// Batches in flight at once are few (each is done in microseconds).
    /// </summary>
    private sealed class CompletionBatch : IThreadPoolWorkItem
    {
        private readonly QueueStore _store;
        private readonly Action _completeAll;
        public WriteOp[] Ops = new WriteOp[16];
        public int Count;

        public CompletionBatch(QueueStore store)
        {
            _store = store;
            _completeAll = CompleteAll;
        }

        private void CompleteAll()
        {
            for (int i = 0; i < Count; i++)
            {
                Ops[i].Complete();
            }
        }

        public void Execute() => Execute(null);

        public void Execute(Action<Action>? scope)
        {
            try
            {
                if (scope is not null)
                {
                    scope(_completeAll);
                }
                else
                {
                    CompleteAll();
                }
            }
            finally
            {
                Array.Clear(Ops, 0, Count);
                Count = 0;
                if (Ops.Length <= MaxPooledCompletionOps)
                {
                    _store._completionPool.Enqueue(this);
                }
            }
        }
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
            Interlocked.Increment(ref _opsCreated);
        }
        op.Kind = kind;
        op.Queue = queue;
        return op;
    }

    /// <summary>Completions waiting in the pool for reuse. For tests: every awaited operation goes back.</summary>
    internal int PooledOps => Volatile.Read(ref _opPoolCount);

    private int _opsCreated;

    /// <summary>Completions made so far (the pool was empty). For tests: while nothing is in flight, all are pooled.</summary>
    internal int CreatedOps => Volatile.Read(ref _opsCreated);

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

        /// <summary>Deletes a stored message: its key is put once (ids are never reused, see the epoch) and deleted once.</summary>
        public readonly void DeleteMessage(ReadOnlySpan<byte> key) => _batch.Mutations.SingleDelete(Cf.Messages, key);

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
    /// <summary>Cleanup without a queue handle.</summary>
    Meta,
    /// <summary>The id epoch, bumped when a queue with ids of the current epoch leaves memory.</summary>
    Epoch,
    /// <summary>The queue's last-active hour moved, nothing else (a SUB, a GET, a subscribed queue found by the idle sweep).</summary>
    Activity,
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
    // Continuations run where Complete is called: where a whole batch is completed (a pool work item or the writer).
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
    /// <summary>Nobody awaits it: the writer recycles it.</summary>
    public bool Detached;
    /// <summary>Its continuation neither blocks nor runs long: the writer may complete it itself.</summary>
    public bool Quick;

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

    /// <summary>Back to the pool unused: the operation was rented but never staged (staging was refused).</summary>
    public void Discard() => Recycle();

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
        Detached = false;
        Quick = false;
        _store.ReturnOp(this);
    }
}
