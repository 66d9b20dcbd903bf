namespace Relay.Storage.Tests;

/// <summary>
/// Where a committed write's caller is answered: the writer thread completes a small batch of
/// operations marked quick itself (no thread woken for it), inside <see cref="QueueStore.CompletionScope"/>:
/// up to 32 when nothing waits to be written, up to 4 when the next batch waits; everything else is
/// completed on the thread pool, so a continuation that blocks or runs long never holds up the next write.
/// </summary>
public class CompletionThreadTests
{
    private const string WriterThread = "Relay.Storage writer";

    /// <summary>Where and how one operation's continuation ran.</summary>
    private sealed class Observed
    {
        private readonly TaskCompletionSource _ran = new(TaskCreationOptions.RunContinuationsAsynchronously);
        public string? ThreadName { get; private set; }
        public bool PoolThread { get; private set; }
        public bool InScope { get; private set; }

        /// <summary>Registers on the pending operation (the caller holds the writer so it cannot be done yet).</summary>
        public static Observed On<T>(ValueTask<T> operation)
        {
            var observed = new Observed();
            if (operation.IsCompleted) throw new InvalidOperationException("completed before its continuation was registered");
            operation.GetAwaiter().UnsafeOnCompleted(() =>
            {
                observed.ThreadName = Thread.CurrentThread.Name;
                observed.PoolThread = Thread.CurrentThread.IsThreadPoolThread;
                observed.InScope = Scope.Active;
                observed._ran.TrySetResult();
            });
            return observed;
        }

        public Task RanAsync() => _ran.Task.WaitAsync(TimeSpan.FromSeconds(10));
    }

    /// <summary>A completion scope that counts its uses and marks the thread while it runs.</summary>
    private sealed class Scope
    {
        [ThreadStatic] private static bool t_active;
        private int _uses;

        public static bool Active => t_active;
        public int Uses => Volatile.Read(ref _uses);

        public void Run(Action complete)
        {
            Interlocked.Increment(ref _uses);
            t_active = true;
            try
            {
                complete();
            }
            finally
            {
                t_active = false;
            }
        }
    }

    /// <summary>
    /// Holds the writer in its first batches (before each is written) until each is released; optionally
    /// fails the first.
    /// </summary>
    private sealed class Gate
    {
        private readonly ManualResetEventSlim[] _release;
        private readonly TaskCompletionSource[] _held;
        private readonly bool _fail;
        private int _calls;

        public Gate(QueueStore store, int batches = 1, bool fail = false)
        {
            _fail = fail;
            _release = Enumerable.Range(0, batches).Select(_ => new ManualResetEventSlim(false)).ToArray();
            _held = Enumerable.Range(0, batches).Select(_ => new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously)).ToArray();
            store.BeforeWrite = (_, _) =>
            {
                int call = Interlocked.Increment(ref _calls) - 1;
                if (call >= _held.Length) return;
                _held[call].TrySetResult();
                if (!_release[call].Wait(TimeSpan.FromSeconds(30))) throw new TimeoutException("never released");
                if (_fail && call == 0) throw new IOException("injected write failure");
            };
        }

        /// <summary>Until the writer is held in its <paramref name="batch"/>th batch (1 the first).</summary>
        public Task HeldAsync(int batch = 1) => _held[batch - 1].Task.WaitAsync(TimeSpan.FromSeconds(10));

        public void Release(int batch = 1) => _release[batch - 1].Set();
    }

    private static async Task<(TestStore Store, QueueHandle Queue, Scope Scope)> OpenAsync()
    {
        TestStore t = TestStore.Create();
        QueueHandle q = await t.CreateQueueAsync();
        var scope = new Scope();
        t.Store.CompletionScope = scope.Run;
        return (t, q, scope);
    }

    /// <summary>
    /// Starts one operation while the writer is held before its batch (so that it cannot be done before
    /// its continuation is registered), lets the batch go and waits for the continuation.
    /// </summary>
    private static async Task<(ValueTask<T> Operation, Observed Observed)> ObserveAloneAsync<T>(QueueStore store, Func<ValueTask<T>> start, bool fail = false)
    {
        var gate = new Gate(store, fail: fail);
        var operation = start();
        await gate.HeldAsync();
        var observed = Observed.On(operation);
        gate.Release();
        await observed.RanAsync();
        return (operation, observed);
    }

    [Test]
    public async Task A_lone_quick_append_is_answered_by_the_writer_inside_the_scope()
    {
        var (t, q, scope) = await OpenAsync();
        await using (t)
        {
            var (append, observed) = await ObserveAloneAsync(t.Store, () => t.Store.AppendAsync(q, 0, [1, 2, 3], quickContinuation: true));

            await Assert.That(observed.ThreadName).IsEqualTo(WriterThread);
            await Assert.That(observed.InScope).IsTrue();
            await Assert.That(scope.Uses).IsEqualTo(1);
            await Assert.That(append.Result.Status).IsEqualTo(StoreStatus.Ok);
        }
    }

    [Test]
    public async Task An_append_not_marked_quick_is_answered_on_the_thread_pool_without_the_scope()
    {
        var (t, q, scope) = await OpenAsync();
        await using (t)
        {
            var (_, observed) = await ObserveAloneAsync(t.Store, () => t.Store.AppendAsync(q, 0, [1, 2, 3]));

            await Assert.That(observed.PoolThread).IsTrue();
            await Assert.That(observed.ThreadName).IsNotEqualTo(WriterThread);
            await Assert.That(observed.InScope).IsFalse();
            await Assert.That(scope.Uses).IsEqualTo(0);
        }
    }

    [Test]
    public async Task A_quick_ack_is_answered_by_the_writer_too()
    {
        var (t, q, scope) = await OpenAsync();
        await using (t)
        {
            var stored = await t.Store.AppendAsync(q, 0, [7]);
            int deleted = 0;
            var (ack, observed) = await ObserveAloneAsync(t.Store, () => t.Store.AckAsync(q, stored.MessageId, 1, out deleted, quickContinuation: true));

            await Assert.That(deleted).IsEqualTo(1);
            await Assert.That(observed.ThreadName).IsEqualTo(WriterThread);
            await Assert.That(ack.Result).IsEqualTo(StoreStatus.Ok);
            await Assert.That(scope.Uses).IsEqualTo(1);
        }
    }

    [Test]
    public async Task A_few_quick_operations_are_answered_by_the_writer_even_with_writes_waiting_behind_them()
    {
        var (t, q, scope) = await OpenAsync();
        await using (t)
        {
            var gate = new Gate(t.Store);
            var first = t.Store.AppendAsync(q, 0, [1], quickContinuation: true);
            await gate.HeldAsync();
            // Staged while the first batch is being written: it waits for the next one.
            var second = t.Store.AppendAsync(q, 0, [2], quickContinuation: true);
            var firstObserved = Observed.On(first);
            var secondObserved = Observed.On(second);
            gate.Release();
            await firstObserved.RanAsync();
            await secondObserved.RanAsync();

            await Assert.That(firstObserved.ThreadName).IsEqualTo(WriterThread);
            await Assert.That(secondObserved.ThreadName).IsEqualTo(WriterThread);
            await Assert.That(firstObserved.InScope && secondObserved.InScope).IsTrue();
            await Assert.That(scope.Uses).IsEqualTo(2);
        }
    }

    [Test]
    public async Task More_than_a_few_with_writes_waiting_behind_them_are_answered_on_the_pool_and_the_last_by_the_writer()
    {
        var (t, q, scope) = await OpenAsync();
        await using (t)
        {
            var gate = new Gate(t.Store, batches: 2);
            // The first batch holds the writer while six appends form the second.
            var holder = t.Store.AppendAsync(q, 0, [0]);
            await gate.HeldAsync(1);
            var six = Enumerable.Range(1, 6).Select(i => t.Store.AppendAsync(q, 0, [(byte)i], quickContinuation: true)).ToList();
            var sixObserved = six.Select(a => Observed.On(a)).ToList();
            gate.Release(1);
            await holder;
            // While the six are being written, one more waits for the third batch.
            await gate.HeldAsync(2);
            var last = t.Store.AppendAsync(q, 0, [7], quickContinuation: true);
            var lastObserved = Observed.On(last);
            gate.Release(2);
            foreach (var o in sixObserved) await o.RanAsync();
            await lastObserved.RanAsync();

            // The writer went on to write the third batch while the pool answered the six.
            await Assert.That(sixObserved.All(o => o.PoolThread && !o.InScope)).IsTrue();
            await Assert.That(lastObserved.ThreadName).IsEqualTo(WriterThread);
            await Assert.That(lastObserved.InScope).IsTrue();
            await Assert.That(scope.Uses).IsEqualTo(1);
            await Assert.That(q.MessageCount).IsEqualTo(8);
        }
    }

    [Test]
    public async Task A_batch_mixing_quick_and_other_operations_is_answered_on_the_pool()
    {
        var (t, q, scope) = await OpenAsync();
        await using (t)
        {
            var gate = new Gate(t.Store);
            // A barrier batch holds the writer while the two appends join the next batch together.
            var holder = t.Store.AppendAsync(q, 0, [0]);
            await gate.HeldAsync();
            var quick = t.Store.AppendAsync(q, 0, [1], quickContinuation: true);
            var slow = t.Store.AppendAsync(q, 0, [2]);
            var quickObserved = Observed.On(quick);
            var slowObserved = Observed.On(slow);
            gate.Release();
            await quickObserved.RanAsync();
            await slowObserved.RanAsync();
            await holder;

            await Assert.That(quickObserved.PoolThread).IsTrue();
            await Assert.That(slowObserved.PoolThread).IsTrue();
            await Assert.That(scope.Uses).IsEqualTo(0);
        }
    }

    [Test]
    public async Task A_large_batch_of_quick_operations_is_answered_on_the_pool()
    {
        var (t, q, scope) = await OpenAsync();
        await using (t)
        {
            var gate = new Gate(t.Store);
            var holder = t.Store.AppendAsync(q, 0, [0]);
            await gate.HeldAsync();
            var appends = new List<ValueTask<AppendResult>>();
            for (int i = 0; i < 40; i++)
            {
                appends.Add(t.Store.AppendAsync(q, 0, [(byte)i], quickContinuation: true));
            }
            var observed = appends.Select(a => Observed.On(a)).ToList();
            gate.Release();
            foreach (var o in observed) await o.RanAsync();
            await holder;

            await Assert.That(observed.All(o => o.PoolThread)).IsTrue();
            await Assert.That(scope.Uses).IsEqualTo(0);
            await Assert.That(q.MessageCount).IsEqualTo(41);
        }
    }

    [Test]
    public async Task A_failed_quick_append_is_answered_on_the_pool_with_its_error()
    {
        var (t, q, scope) = await OpenAsync();
        await using (t)
        {
            var (append, observed) = await ObserveAloneAsync(t.Store, () => t.Store.AppendAsync(q, 0, [1], quickContinuation: true), fail: true);

            await Assert.That(observed.PoolThread).IsTrue();
            await Assert.That(scope.Uses).IsEqualTo(0);
            await Assert.ThrowsAsync<StoreException>(async () => await append);
            await Assert.That(q.MessageCount).IsEqualTo(0);
        }
    }
}
