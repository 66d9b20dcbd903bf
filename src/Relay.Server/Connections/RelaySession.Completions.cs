using System.Collections.Concurrent;
using Relay.Storage;

namespace Relay.Server.Connections;

internal sealed partial class RelaySession
{
    /// <summary>
    /// What a SEND or an ACK does once the group commit that carries it is done. Nearly every such
    /// request waits for a commit, so an async method per request would allocate its state machine
    /// each time; these continuations are pooled instead. Each one is registered on the store's
    /// pooled operation, copies its request out and returns to the pool before it answers, and never
    /// throws: it usually runs inside the loop that completes a whole batch (on the read loop when
    /// the store answered at once, e.g. QUOTA).
    /// </summary>
    private sealed class StoreCompletion
    {
        private const int PoolLimit = 1024;
        private static readonly ConcurrentQueue<StoreCompletion> s_pool = new();
        private static int s_pooled;

        private readonly Action _run;
        private RelaySession? _session;
        private QueueHandle? _queue;
        private ValueTask<AppendResult> _append;
        private ValueTask<StoreStatus> _ack;
        private bool _isAck;
        private uint _corr;
        private int _length;   // SEND: body bytes; ACK: messages covered
        private ulong _id;     // ACK: the last message covered
        private long _arrived; // SEND: when it arrived (delivery latency)

        private StoreCompletion() => _run = Run;

        public static void AfterSend(RelaySession session, uint corr, QueueHandle queue, ValueTask<AppendResult> append, int length, long arrived)
        {
            var c = Rent(session, corr, queue, length);
            c._append = append;
            c._arrived = arrived;
            if (append.IsCompleted) c.Run();
            else append.GetAwaiter().UnsafeOnCompleted(c._run);
        }

        public static void AfterAck(RelaySession session, uint corr, QueueHandle queue, ulong id, int count, ValueTask<StoreStatus> ack)
        {
            var c = Rent(session, corr, queue, count);
            c._isAck = true;
            c._ack = ack;
            c._id = id;
            if (ack.IsCompleted) c.Run();
            else ack.GetAwaiter().UnsafeOnCompleted(c._run);
        }

        private static StoreCompletion Rent(RelaySession session, uint corr, QueueHandle queue, int length)
        {
            if (s_pool.TryDequeue(out var c))
            {
                Interlocked.Decrement(ref s_pooled);
            }
            else
            {
                c = new StoreCompletion();
            }
            c._session = session;
            c._corr = corr;
            c._queue = queue;
            c._length = length;
            return c;
        }

        private void Run()
        {
            RelaySession session = _session!;
            QueueHandle queue = _queue!;
            (bool isAck, uint corr, int length, ulong id, long arrived) = (_isAck, _corr, _length, _id, _arrived);
            ValueTask<AppendResult> append = _append;
            ValueTask<StoreStatus> ack = _ack;
            _session = null;
            _queue = null;
            _append = default;
            _ack = default;
            _isAck = false;
            if (Interlocked.Increment(ref s_pooled) <= PoolLimit)
            {
                s_pool.Enqueue(this);
            }
            else
            {
                Interlocked.Decrement(ref s_pooled);
            }
            try
            {
                if (isAck) session.CompleteAck(corr, queue, id, length, ack);
                else session.CompleteSend(corr, queue, append, length, arrived);
            }
            catch (Exception ex)
            {
                // A bug, not the store's failures (those are answered inside): logged, and kept from
                // the completions of the rest of the batch, which belong to other connections.
                Log.CompletionFailed(session._logger, isAck ? "ACK" : "SEND", ex.GetType().Name);
            }
        }
    }
}
