using System.Buffers;
using System.Threading.Tasks.Sources;

namespace Relay.Client.Transport;

public sealed partial class RelayConnection
{
    // Request objects whose answer was read, kept for the next requests (under _pendingLock). As many
    // as a busy connection has in flight at once (a load generator's window of SENDs); beyond that a
    // burst allocates and the extra objects are left to the GC.
    private const int MaxPooledRequests = 256;
    private readonly Stack<PendingRequest> _requestPool = new();

    private uint NextCorrelation()
    {
        uint id;
        do
        {
            id = Interlocked.Increment(ref _nextCorrelation);
        }
        while (id == 0);
        return id;
    }

    /// <summary>
    /// Sends one request written by <paramref name="write"/> and waits for its answer. Any number of
    /// requests may be in flight at once; answers are matched by correlation id. A token already
    /// cancelled sends nothing; one cancelled while the answer is awaited ends the wait (the answer,
    /// when it comes, is dropped). The result is awaited once, as every <see cref="ValueTask{TResult}"/>.
    /// SUB and ACK go through <see cref="SubscribeAsync(RecipientQueue, int, CancellationToken)"/>,
    /// <see cref="AckAsync"/> and <see cref="AckThroughAsync"/>, which count the queue's delivery
    /// window (<see cref="Events"/>): one sent here is not counted, and the pushes it allows break
    /// the protocol as far as this connection knows.
    /// </summary>
    public ValueTask<Response> RequestAsync<TState>(TState state, Action<IBufferWriter<byte>, uint, TState> write, CancellationToken cancellationToken = default) =>
        RequestAsync(state, write, default, cancellationToken);

    /// <summary>A request; <paramref name="window"/> says what its sending and its answer do to a queue's delivery window.</summary>
    private ValueTask<Response> RequestAsync<TState>(TState state, Action<IBufferWriter<byte>, uint, TState> write, in WindowEffect window,
        CancellationToken cancellationToken)
    {
        uint corr = NextCorrelation();
        PendingRequest request;
        lock (_pendingLock)
        {
            if (_failing)
            {
                return ValueTask.FromException<Response>(_failure ?? new RelayConnectException("the connection is closed"));
            }
            if (cancellationToken.IsCancellationRequested)
            {
                return ValueTask.FromCanceled<Response>(cancellationToken);
            }
            request = _requestPool.TryPop(out var pooled) ? pooled : new PendingRequest(this);
            request.Correlation = corr;
            _pending[corr] = new InFlight(request, window);
            // Before the request can leave: the relay may act on it (an ACK frees places of the
            // window) before its answer.
            SendingLocked(window);
        }
        try
        {
            lock (_writeLock)
            {
                // Closed in between: Fail took this request with the others in flight and fails it.
                if (!_disposed)
                {
                    write(_output.Writer, corr, state);
                    ScheduleFlushLocked();
                }
            }
        }
        catch
        {
            // A request that could not be written is not in flight. (Had Fail taken it meanwhile, it
            // fails an object nobody holds: the object is not pooled again either way.)
            lock (_pendingLock) _pending.Remove(corr);
            throw;
        }
        return request.Start(cancellationToken);
    }

    private void ReturnToPool(PendingRequest request)
    {
        lock (_pendingLock)
        {
            if (_requestPool.Count < MaxPooledRequests)
            {
                _requestPool.Push(request);
            }
        }
    }

    /// <summary>
    /// One request in flight, awaited through the <see cref="ValueTask{TResult}"/> that
    /// <see cref="RequestAsync"/> returns, and reused for a later request once its result was read.
    /// </summary>
    /// <remarks>
    /// Exactly one of three completes it: the answer (<see cref="OnFrame"/>), the connection's failure
    /// (<see cref="Fail"/>) or the caller's cancellation; the one that takes it from its entry in
    /// <c>_pending</c> under <c>_pendingLock</c>. The others find no entry (or an entry without it: a
    /// SUB or ACK whose answer still counts for a delivery window) and leave it alone. Continuations
    /// run on the thread pool, never inline on the read loop or on the thread that cancels. Before it
    /// goes back to the pool, the registration on the caller's token is disposed (which waits for a
    /// cancellation callback running on another thread), so no late callback touches the next request.
    /// </remarks>
    private sealed class PendingRequest : IValueTaskSource<Response>
    {
        private static readonly Action<object?, CancellationToken> s_cancel =
            static (state, token) => ((PendingRequest)state!).Cancel(token);

        private readonly RelayConnection _owner;
        private ManualResetValueTaskSourceCore<Response> _core;
        private CancellationTokenRegistration _cancellation;

        /// <summary>Set under _pendingLock before the request is added to _pending.</summary>
        public uint Correlation;

        public PendingRequest(RelayConnection owner)
        {
            _owner = owner;
            _core.RunContinuationsAsynchronously = true;
        }

        public ValueTask<Response> Start(CancellationToken cancellationToken)
        {
            if (cancellationToken.CanBeCanceled)
            {
                // Cancelled since the check in RequestAsync: the callback runs here, at once.
                _cancellation = cancellationToken.UnsafeRegister(s_cancel, this);
            }
            return new ValueTask<Response>(this, _core.Version);
        }

        /// <summary>By the one that removed it from _pending.</summary>
        public void SetResult(Response response) => _core.SetResult(response);

        /// <summary>By the one that removed it from _pending.</summary>
        public void SetException(Exception failure) => _core.SetException(failure);

        private void Cancel(CancellationToken cancellationToken)
        {
            bool removed;
            lock (_owner._pendingLock)
            {
                removed = _owner.AbandonLocked(Correlation, this);
            }
            if (removed)
            {
                // As an awaited task cancelled by the token: a TaskCanceledException that carries it.
                _core.SetException(new TaskCanceledException("A task was canceled.", null, cancellationToken));
            }
        }

        public ValueTaskSourceStatus GetStatus(short token) => _core.GetStatus(token);

        public void OnCompleted(Action<object?> continuation, object? state, short token, ValueTaskSourceOnCompletedFlags flags) =>
            _core.OnCompleted(continuation, state, token, flags);

        public Response GetResult(short token)
        {
            if (_core.GetStatus(token) == ValueTaskSourceStatus.Pending)
            {
                // Read before it completed (it is still in _pending): throws, and the object stays as it is.
                return _core.GetResult(token);
            }
            try
            {
                return _core.GetResult(token);
            }
            finally
            {
                _cancellation.Dispose();
                _cancellation = default;
                _core.Reset();
                _owner.ReturnToPool(this);
            }
        }
    }
}
