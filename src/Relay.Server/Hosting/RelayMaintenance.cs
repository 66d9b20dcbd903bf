using System.Diagnostics;
using Relay.Storage;

namespace Relay.Server.Hosting;

/// <summary>
/// The relay's background work, on timers of <see cref="RelayServerOptions.Clock"/>:
/// <list type="bullet">
/// <item>every <see cref="RelayServerOptions.SweepInterval"/>: the expiry sweep (messages past their
/// TTL, idle queues), timed and counted in metrics;</item>
/// <item>every <see cref="RelayServerOptions.MaintenanceInterval"/>: eviction of queue handles idle
/// for <see cref="RelayServerOptions.EvictIdleAfter"/>, and the disk budget: while the store is over
/// it and something was deleted since the last attempt, a flush and full compaction give the
/// space of acknowledged and deleted messages back, so NEW and SEND work again.</item>
/// <item>with <see cref="RelayServerOptions.CollectWhenQuiet"/>, every second: when the relay goes
/// quiet after allocating (<see cref="QuietCollector"/>), a full garbage collection, and a compacting
/// one that gives the collector's free memory back when that is worth it; timed and counted in
/// metrics.</item>
/// </list>
/// Each job runs at most once at a time; a failure is logged and counted, the next tick retries.
/// </summary>
internal sealed class RelayMaintenance : IAsyncDisposable
{
    private readonly RelayServerContext _context;
    private readonly QueueStore _store;
    private readonly RelayServerOptions _options;
    private readonly SemaphoreSlim _sweepGate = new(1, 1);
    private readonly SemaphoreSlim _maintenanceGate = new(1, 1);
    private ITimer? _sweepTimer;
    private ITimer? _maintenanceTimer;
    private ITimer? _quietTimer;
    private readonly QuietCollector _quiet = new();
    private Task _sweepTask = Task.CompletedTask;
    private Task _maintenanceTask = Task.CompletedTask;
    private volatile bool _stopping;
    private bool _wasFull;
    private long _deletedAtLastReclaim = -1;
    // A reclamation that left the store over its budget waits this many maintenance ticks before the
    // next (doubling up to MaxReclaimBackoff): a full compaction of a store full of live messages
    // every tick would cost every writer its disk for nothing.
    private int _reclaimBackoff = 1;
    private int _ticksUntilReclaim;
    private const int MaxReclaimBackoff = 32;

    private ITimer? _storeFailureTimer;
    private readonly Action _stopForStoreFailure;
    private int _storeFailed;

    /// <param name="stopForStoreFailure">Stops the relay with a failure once the store has failed every write for <see cref="RelayServerOptions.StoreFailureTimeout"/>.</param>
    public RelayMaintenance(RelayServerContext context, Action stopForStoreFailure)
    {
        _context = context;
        _store = context.Store;
        _options = context.Options;
        _stopForStoreFailure = stopForStoreFailure;
    }

    public void Start()
    {
        if (_options.SweepInterval > TimeSpan.Zero)
        {
            _sweepTimer = _options.Clock.CreateTimer(_ => OnTick(ref _sweepTask, SweepAsync), null, _options.SweepInterval, _options.SweepInterval);
        }
        if (_options.MaintenanceInterval > TimeSpan.Zero)
        {
            _maintenanceTimer = _options.Clock.CreateTimer(_ => OnTick(ref _maintenanceTask, MaintainAsync), null,
                _options.MaintenanceInterval, _options.MaintenanceInterval);
        }
        if (_options.StoreFailureTimeout > TimeSpan.Zero)
        {
            _storeFailureTimer = _options.Clock.CreateTimer(_ => CheckStoreFailure(), null, TimeSpan.FromSeconds(1), TimeSpan.FromSeconds(1));
        }
        if (_options.CollectWhenQuiet)
        {
            _quietTimer = _options.Clock.CreateTimer(_ => CollectIfQuiet(), null, TimeSpan.FromSeconds(1), TimeSpan.FromSeconds(1));
        }
    }

    /// <summary>
    /// Once a second: a store that has failed every write for the store failure timeout, and not
    /// because its disk is full (which ends by itself once space is free), does not write again
    /// before it is opened again. The relay stops (once) so that its service manager restarts it.
    /// </summary>
    private void CheckStoreFailure()
    {
        if (_stopping || _store.IsDiskFull || _store.WritesFailingFor < _options.StoreFailureTimeout)
        {
            return;
        }
        if (Interlocked.Exchange(ref _storeFailed, 1) == 0)
        {
            Log.StoreFailedForGood(_context.Logger, (int)_store.WritesFailingFor.TotalSeconds, _store.LastWriteError ?? "no error recorded");
            _stopForStoreFailure();
        }
    }

    /// <summary>The quiet collector's tick (a timer's callbacks may overlap: one at a time).</summary>
    private void CollectIfQuiet()
    {
        if (_stopping || !Monitor.TryEnter(_quiet)) return;
        try
        {
            if (_quiet.Tick(GC.GetTotalAllocatedBytes(), GC.CollectionCount(GC.MaxGeneration)))
            {
                var paused = GC.GetTotalPauseDuration();
                // First a full collection that only sweeps: it frees the garbage where it lies. Then, when
                // that leaves enough to give back, an aggressive one: it compacts what is left and gives
                // every free region back to the system. Either alone left memory behind
                // (docs/PERFORMANCE.md, sixteenth round): the sweep keeps the collector's free regions
                // committed (18–27 MB at 10,000 connections in some runs; the collector sometimes
                // compacts on its own, with the same result); the aggressive one alone, over a heap still
                // full of garbage, copied while the garbage was still resident (a peak of 254 MB). Both
                // together: 225 MB in every run, no peak above the burst's, 0.1–0.2 s of pause at
                // 10,000 connections.
                GC.Collect(GC.MaxGeneration, GCCollectionMode.Forced, blocking: true, compacting: false);
                var swept = GC.GetGCMemoryInfo(GCKind.FullBlocking);
                if (QuietCollector.WorthCompacting(swept.TotalCommittedBytes, swept.HeapSizeBytes, swept.FragmentedBytes))
                {
                    GC.Collect(GC.MaxGeneration, GCCollectionMode.Aggressive, blocking: true, compacting: true);
                }
                _context.Metrics.QuietCollection((GC.GetTotalPauseDuration() - paused).TotalSeconds);
                _quiet.Collected(GC.GetTotalAllocatedBytes(), GC.CollectionCount(GC.MaxGeneration));
            }
        }
        finally
        {
            Monitor.Exit(_quiet);
        }
    }

    private void OnTick(ref Task running, Func<Task> job)
    {
        if (_stopping || !running.IsCompleted)
        {
            return;
        }
        running = Task.Run(job);
    }

    /// <summary>One expiry sweep (also called by tests). Returns the messages expired.</summary>
    public async Task<int> SweepAsync()
    {
        await _sweepGate.WaitAsync();
        try
        {
            if (_stopping) return 0;
            return await SweepLockedAsync();
        }
        finally
        {
            _sweepGate.Release();
        }
    }

    /// <summary>The sweep, the caller holding the sweep gate.</summary>
    private async Task<int> SweepLockedAsync()
    {
        // What the sweep removed is read from the store's counts (only sweeps, one at a time, move
        // them): a sweep that fails part of the way, its expiry done and its idle-queue phase failed
        // say, has made what it removed until then durable, and its log line says how much.
        var stats = _store.Statistics;
        long expiredBefore = stats.MessagesExpired;
        long idleBefore = stats.IdleQueuesDeleted;
        try
        {
            long start = Stopwatch.GetTimestamp();
            int expired = await _store.SweepExpiredAsync();
            _context.Metrics.SweepCompleted(Stopwatch.GetElapsedTime(start).TotalSeconds);
            long idle = stats.IdleQueuesDeleted - idleBefore;
            if (expired > 0 || idle > 0)
            {
                Log.Swept(_context.Logger, expired, idle);
            }
            return expired;
        }
        catch (ObjectDisposedException) when (_stopping)
        {
            return 0;
        }
        catch (Exception ex)
        {
            _context.Metrics.SweepFailed();
            Log.SweepFailed(_context.Logger, stats.MessagesExpired - expiredBefore, stats.IdleQueuesDeleted - idleBefore, ex.GetType().Name);
            return 0;
        }
    }

    /// <summary>Eviction of idle handles and the disk budget (also called by tests).</summary>
    public async Task MaintainAsync()
    {
        await _maintenanceGate.WaitAsync();
        try
        {
            if (_stopping) return;
            int evicted = _store.EvictIdle(_options.EvictIdleAfter);
            if (evicted > 0)
            {
                _context.Metrics.Evicted(evicted);
                Log.Evicted(_context.Logger, evicted);
            }
            CheckDiskBudget();
        }
        catch (ObjectDisposedException) when (_stopping)
        {
        }
        catch (Exception ex)
        {
            Log.MaintenanceFailed(_context.Logger, ex.GetType().Name);
        }
        finally
        {
            _maintenanceGate.Release();
        }
    }

    private void CheckDiskBudget()
    {
        long budget = _options.DiskBudgetBytes;
        if (budget <= 0)
        {
            return;
        }
        bool full = _store.IsOverDiskBudget;
        ReportBudget(full, budget);
        if (!full)
        {
            _reclaimBackoff = 1;
            _ticksUntilReclaim = 0;
            return;
        }
        if (_ticksUntilReclaim > 0)
        {
            _ticksUntilReclaim--;
            return;
        }
        var stats = _store.Statistics;
        long deleted = stats.MessagesDeleted + stats.MessagesExpired + stats.QueuesDeleted;
        if (deleted != _deletedAtLastReclaim)
        {
            // Acked, expired and deleted messages still occupy the WAL and table files until
            // a flush and a compaction drop them; without deletions there is nothing to gain.
            _deletedAtLastReclaim = deleted;
            _context.Metrics.Reclaimed();
            long now = _store.ReclaimSpace();
            Log.Reclaimed(_context.Logger, now);
            bool stillFull = _store.IsOverDiskBudget;
            ReportBudget(stillFull, budget);
            if (stillFull)
            {
                _ticksUntilReclaim = _reclaimBackoff;
                _reclaimBackoff = Math.Min(_reclaimBackoff * 2, MaxReclaimBackoff);
            }
        }
    }

    private void ReportBudget(bool full, long budget)
    {
        if (full == _wasFull)
        {
            return;
        }
        _wasFull = full;
        long bytes = _store.Statistics.GetDiskBytes();
        if (full)
        {
            Log.StoreFull(_context.Logger, bytes, budget);
        }
        else
        {
            Log.StoreNotFull(_context.Logger, bytes, budget);
        }
    }

    public async ValueTask DisposeAsync()
    {
        _stopping = true;
        if (_sweepTimer is not null) await _sweepTimer.DisposeAsync();
        if (_maintenanceTimer is not null) await _maintenanceTimer.DisposeAsync();
        if (_quietTimer is not null) await _quietTimer.DisposeAsync();
        if (_storeFailureTimer is not null) await _storeFailureTimer.DisposeAsync();
        try
        {
            await Task.WhenAll(_sweepTask, _maintenanceTask);
        }
        catch (Exception)
        {
            // Logged by the jobs themselves.
        }
    }
}
