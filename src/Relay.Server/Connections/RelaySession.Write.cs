using System.Buffers;
using System.Security.Cryptography;
using Relay.Protocol;
using Relay.Storage;

namespace Relay.Server.Connections;

internal sealed partial class RelaySession
{
    // Every frame to the client is written into _pending under _writeLock: by the read loop, by
    // request completions and by other connections' deliveries. One send loop at a time (_sending)
    // swaps _pending with the empty _inSend and writes it to the connection, so every frame written
    // meanwhile (say, the OKs of one group commit, or several deliveries) leaves in the same TLS
    // record and syscall. Writing never blocks (a delivery must not block the thread that makes it);
    // memory is bounded instead: the read loop stops reading requests while the backlog exceeds
    // MaxOutputBuffer (OutputBufferWhenMemoryIsShort while all connections' buffers are at their
    // budget, see SharedMemory), and deliveries stop there too (the subscription waits in _deferred and the
    // send loop resumes it once half is sent), so a subscriber that never reads holds at most about
    // the limit plus one message per thread delivering at that moment. An idle connection holds no
    // buffer and no pending operation for its output.
    private OutputBuffer _pending;
    private OutputBuffer _inSend;
    private Stream? _destination;
    private readonly Lock _writeLock = new();
    private bool _outputClosed;
    private bool _sending;
    private TaskCompletionSource? _sendsDone;
    private List<Subscription>? _deferred;   // subscriptions waiting for output to drain (under _writeLock)

    private int _inFlight;
    private long _inFlightBytes;   // message bytes of the SENDs in flight (held until their batch is written)
    private TaskCompletionSource? _capacityWaiter;
    private readonly Lock _capacityLock = new();

    private bool MustPause =>
        Volatile.Read(ref _inFlight) >= _options.MaxInFlightPerConnection
        || InFlightBytesAbove(1)
        || OutputAbove(1);

    /// <summary>
    /// Whether the message bytes of this connection's SENDs in flight are at its limit (divided by
    /// <paramref name="divisor"/>: 2 to resume at half): <see cref="RelayServerOptions.MaxInFlightBytesPerConnection"/>,
    /// or much less while the SENDs of all connections together hold their budget (a stalled disk);
    /// the shared total is read only above the smaller limit.
    /// </summary>
    private bool InFlightBytesAbove(int divisor)
    {
        long held = Volatile.Read(ref _inFlightBytes);
        // At the limit pauses; resuming waits until strictly below its fraction.
        bool Over(long limit) => divisor == 1 ? held >= limit : held > limit / divisor;
        if (!Over(Math.Min(_options.InFlightBytesWhenMemoryIsShort, _options.MaxInFlightBytesPerConnection)))
        {
            return false;
        }
        return Over(_options.MaxInFlightBytesPerConnection) || _context.InFlight.Short;
    }

    /// <summary>
    /// Whether the unsent output is above this connection's limit (divided by <paramref name="divisor"/>:
    /// 2 to resume at half). The limit is <see cref="RelayServerOptions.MaxOutputBuffer"/>, or much less
    /// while the output buffers of all connections together are at their budget; the shared total is
    /// read only when the backlog is above the smaller limit, so a connection whose client keeps up
    /// never touches it.
    /// </summary>
    private bool OutputAbove(int divisor)
    {
        long backlog = Backlog;
        if (backlog <= Math.Min(_options.OutputBufferWhenMemoryIsShort, _options.MaxOutputBuffer) / divisor)
        {
            return false;
        }
        return backlog > _options.MaxOutputBuffer / divisor || _context.Output.Short;
    }

    /// <summary>
    /// Bytes written and not yet sent: those waiting for the next send and those being sent (_inSend is
    /// emptied once its send returns). Read without the lock: an estimate, which is all a limit needs.
    /// </summary>
    private long Backlog => (long)Volatile.Read(ref _pending).Length + Volatile.Read(ref _inSend).Length;

    /// <summary>The send loop as a thread-pool work item: the session itself, so scheduling it allocates nothing.</summary>
    void IThreadPoolWorkItem.Execute() => _ = SendLoopAsync();

    /// <summary>Where output goes once the connection is established (TLS or plain).</summary>
    private void StartOutput(Stream destination) => _destination = destination;

    /// <summary>
    /// Makes written frames leave soon, without a send per frame: the first writer schedules the send
    /// loop on the thread pool (or, while a group commit's answers are being written, after them on
    /// this thread: <see cref="BatchedSends"/>), and every frame written before it swaps the buffers
    /// goes with them.
    /// </summary>
    private void FlushLocked()
    {
        if (_sending || _destination is null) return;
        _sending = true;
        if (!BatchedSends.TryAdd(this))
        {
            ThreadPool.UnsafeQueueUserWorkItem(this, preferLocal: true);
        }
    }

    /// <summary>Runs the send loop scheduled by <see cref="FlushLocked"/> on this thread (see <see cref="BatchedSends"/>).</summary>
    internal void SendNow() => _ = SendLoopAsync();

    /// <summary>The read loop, after a batch of requests: sends what they wrote from this thread.</summary>
    private void Flush()
    {
        lock (_writeLock)
        {
            if (_sending || _destination is null || _pending.Length == 0) return;
            _sending = true;
        }
        _ = SendLoopAsync();
    }

    /// <summary>Writes _pending to the connection until nothing is left; only one runs at a time.</summary>
    private async Task SendLoopAsync()
    {
        var destination = _destination!;
        while (true)
        {
            OutputBuffer batch;
            lock (_writeLock)
            {
                if (_pending.Length == 0)
                {
                    _sending = false;
                    if (_outputClosed)
                    {
                        _sendsDone?.TrySetResult();
                    }
                    break;
                }
                batch = _pending;
                _pending = _inSend;
                _inSend = batch;
            }
            try
            {
                await destination.WriteAsync(batch.WrittenMemory);
                await destination.FlushAsync();
            }
            catch (Exception)
            {
                // The peer is gone (or the connection was aborted): nothing more can be sent. The read
                // loop ends on its own read failing; drop what is pending and stop accepting writes.
                lock (_writeLock)
                {
                    _outputClosed = true;
                    _sending = false;
                    _pending.Reset();
                    _deferred = null;
                    _sendsDone?.TrySetResult();
                }
                batch.Reset();
                SignalCapacity();
                return;
            }
            batch.Reset();
            // The read loop first (the client's ACKs are what open its delivery windows), then the
            // deliveries held back, which may fill the buffer again.
            SignalCapacity();
            ResumeDeferred();
        }
        // Deliveries held back while the backlog was over the limit go on now that it is empty (a
        // new send loop starts for what they write).
        ResumeDeferred();
    }

    /// <summary>
    /// Called by a delivery (under the queue's lock) when the backlog is over the output limit:
    /// true when <paramref name="s"/> must wait, remembered to be resumed by the send loop.
    /// </summary>
    private bool DeferDelivery(Subscription s)
    {
        lock (_writeLock)
        {
            if (_outputClosed)
            {
                return true;
            }
            if (!OutputAbove(1))
            {
                return false;
            }
            if (!s.OutputDeferred)
            {
                s.OutputDeferred = true;
                (_deferred ??= []).Add(s);
            }
            return true;
        }
    }

    /// <summary>Delivers to the subscriptions held back by <see cref="DeferDelivery"/> once the backlog is down to half the limit.</summary>
    private void ResumeDeferred()
    {
        List<Subscription> resume;
        lock (_writeLock)
        {
            if (_deferred is null || _outputClosed || OutputAbove(2))
            {
                return;
            }
            resume = _deferred;
            _deferred = null;
            foreach (var s in resume)
            {
                s.OutputDeferred = false;
            }
        }
        foreach (var s in resume)
        {
            // A store that fails to read is logged there, not thrown: out of the send loop it would
            // leave that loop's task faulted and unobserved, and this connection's output stuck.
            lock (s.Queue.Sync)
            {
                DeliverNextLocked(s);
            }
        }
    }

    private void WriteEmpty(FrameType type, uint corr)
    {
        lock (_writeLock)
        {
            if (_outputClosed) return;
            FrameWriter.WriteEmpty(_pending, type, corr);
        }
    }

    private void WriteError(uint corr, ErrorCode code)
    {
        lock (_writeLock)
        {
            if (_outputClosed) return;
            FrameWriter.WriteError(_pending, corr, code);
            FlushLocked();
        }
    }

    /// <summary>Writes and flushes at once: used off the read loop (completions, deliveries).</summary>
    private void WriteEmptyNow(FrameType type, uint corr)
    {
        lock (_writeLock)
        {
            if (_outputClosed) return;
            FrameWriter.WriteEmpty(_pending, type, corr);
            FlushLocked();
        }
    }

    internal void WriteMessage(uint corr, QueueHandle queue, in StoredMessage message, DeliveryCipher cipher, NonceSequence? nonces = null)
    {
        lock (_writeLock)
        {
            if (_outputClosed) return;
            FrameWriter.WriteMsg(_pending, corr, queue.RecipientId, message.Id, message.Hour, message.Flags, message.Body, cipher, nonces);
            FlushLocked();
        }
    }

    internal void WriteEnd(ReadOnlySpan<byte> recipientId)
    {
        lock (_writeLock)
        {
            if (_outputClosed) return;
            FrameWriter.WriteEnd(_pending, recipientId);
            FlushLocked();
        }
    }

    /// <summary>Stops taking frames and completes when everything written so far has been sent (or cannot be).</summary>
    private Task CompleteOutputAsync()
    {
        lock (_writeLock)
        {
            _outputClosed = true;
            if (!_sending && (_pending.Length == 0 || _destination is null))
            {
                _pending.Reset();
                return Task.CompletedTask;
            }
            _sendsDone ??= new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            FlushLocked();
            return _sendsDone.Task;
        }
    }

    private void BeginInFlight() => Interlocked.Increment(ref _inFlight);

    private void EndInFlight()
    {
        Interlocked.Decrement(ref _inFlight);
        SignalCapacity();
    }

    /// <summary>
    /// The store could not take or make an operation durable (closing, a failed write, or one being
    /// undone): logged without the queue, answered INTERNAL. Because the disk is full (the write
    /// itself, or a refusal while one it failed is undone): a NEW or SEND answered FULL (nothing
    /// stored, retry later), another command INTERNAL, neither logged (the store's
    /// <see cref="QueueStore.DiskFullChanged"/> is, once).
    /// </summary>
    private void StoreFailed(FrameType type, uint corr, Exception ex)
    {
        if (ex is StoreException { DiskFull: true })
        {
            Fail(type, corr, type is FrameType.Send or FrameType.New ? ErrorCode.Full : ErrorCode.Internal);
            return;
        }
        Log.StoreFailed(_context, type.ToString().ToUpperInvariant(), ex);
        Fail(type, corr, ErrorCode.Internal);
    }

    /// <summary>A SEND: an operation in flight that also holds its message's bytes until written.</summary>
    private void BeginInFlight(int bytes)
    {
        Interlocked.Add(ref _inFlightBytes, bytes);
        _context.InFlight.Add(bytes);
        Interlocked.Increment(ref _inFlight);
    }

    private void EndInFlight(int bytes)
    {
        Interlocked.Add(ref _inFlightBytes, -bytes);
        _context.InFlight.Add(-bytes);
        EndInFlight();
    }

    private void SignalCapacity()
    {
        // Full fence between the caller's change (a send done, an operation ended) and reading the
        // waiter; WaitForCapacityAsync fences between publishing it and checking again. So either it
        // sees the change or this sees its waiter: a reader never sleeps through the last signal.
        Interlocked.MemoryBarrier();
        if (Volatile.Read(ref _capacityWaiter) is null) return;
        TaskCompletionSource? waiter = null;
        lock (_capacityLock)
        {
            if (_capacityWaiter != null && !MustPauseHalf)
            {
                waiter = _capacityWaiter;
                _capacityWaiter = null;
            }
        }
        waiter?.TrySetResult();
    }

    // Resume at half the limits, as Kestrel's pipes do, so that reading does not flap.
    private bool MustPauseHalf =>
        Volatile.Read(ref _inFlight) >= _options.MaxInFlightPerConnection / 2 + 1
        || InFlightBytesAbove(2)
        || OutputAbove(2);

    private async Task WaitForCapacityAsync(CancellationToken cancellationToken)
    {
        TaskCompletionSource waiter;
        lock (_capacityLock)
        {
            if (!MustPauseHalf) return;
            waiter = _capacityWaiter ??= new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            Interlocked.MemoryBarrier();
            if (!MustPauseHalf)
            {
                // The last send or operation ended between the check and the waiter's publication.
                _capacityWaiter = null;
                return;
            }
        }
        await waiter.Task.WaitAsync(cancellationToken);
    }

    private async Task WaitForInFlightAsync()
    {
        var deadline = DateTime.UtcNow.AddSeconds(30);
        while (Volatile.Read(ref _inFlight) > 0 && DateTime.UtcNow < deadline)
        {
            await Task.Delay(5);
        }
    }
}
