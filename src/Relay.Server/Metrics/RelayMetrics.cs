using System.Diagnostics;
using Prometheus;
using Relay.Protocol;
using Relay.Server.Connections;
using Relay.Storage;

namespace Relay.Server.Metrics;

/// <summary>Result label of relay_commands_total: "ok" or the lower-case error name.</summary>
public static class CommandResult
{
    public const string Ok = "ok";
    public const string Cmd = "cmd";
    public static string From(ErrorCode code) => code switch
    {
        ErrorCode.Syntax => "syntax",
        ErrorCode.Version => "version",
        ErrorCode.Auth => "auth",
        ErrorCode.NoQueue => "no_queue",
        ErrorCode.Quota => "quota",
        ErrorCode.TooLarge => "too_large",
        ErrorCode.Limit => "limit",
        ErrorCode.Internal => "internal",
        ErrorCode.NoMsg => "no_msg",
        ErrorCode.Cmd => "cmd",
        ErrorCode.Full => "full",
        ErrorCode.Disabled => "disabled",
        _ => "other",
    };
}

/// <summary>
/// The relay's Prometheus metrics, on a registry of its own (several relays may share a process in
/// tests). Labels carry only command names, results and reasons: never an id, key or address.
/// Store-wide gauges (queues, messages, bytes, disk) are read from the store's statistics and RocksDB
/// properties when Prometheus scrapes (a before-collect callback), never kept per queue.
/// docs/OPERATIONS.md lists every metric; packaging/monitoring uses them.
/// </summary>
public sealed class RelayMetrics
{
    public CollectorRegistry Registry { get; } = Prometheus.Metrics.NewCustomRegistry();

    private readonly Gauge _connectionsOpen;
    private readonly Counter _connectionsAccepted;
    private readonly Counter _connectionsRejected;
    private readonly Counter _keyAgreementWaits;
    private readonly Counter _keyAgreementWaitSeconds;
    private readonly Counter _handshakes;
    private readonly Counter _commands;
    private readonly Counter _protocolErrors;
    private readonly Gauge _subscriptions;
    private readonly Counter _messagesStored;
    private readonly Counter _bytesStored;
    private readonly Counter _deliveries;
    private readonly Counter _acked;
    private readonly Histogram _batchSize;
    private readonly Histogram _fsync;
    private readonly Histogram _deliveryLatency;
    private readonly Counter _sweeps;
    private readonly Counter _quietCollections;
    private readonly Counter _quietCollectionPause;
    private readonly Counter _sweepFailures;
    private readonly Histogram _sweepSeconds;
    private readonly Counter _reclaims;
    private readonly Counter _backups;
    private readonly Gauge _lastBackup;
    private readonly Counter _evicted;
    private readonly Gauge _outputMemory;
    private readonly Gauge _outputMemoryBudget;
    private readonly Gauge _inFlightMemory;
    private readonly Gauge _inFlightMemoryBudget;
    private readonly Gauge _keyMemory;
    private readonly Gauge _keyMemoryBudget;
    private readonly Gauge _gcCommitted;
    private SharedMemory? _inFlight;
    private SharedMemory? _output;
    private SharedMemory? _keys;
    private readonly Gauge _queues;
    private readonly Gauge _messages;
    private readonly Gauge _messageBytes;
    private readonly Gauge _diskBytes;
    private readonly Gauge _diskBudget;
    private readonly Gauge _overBudget;
    private readonly Gauge _diskFull;
    private readonly Gauge _pendingCompaction;
    private readonly Gauge _loadedQueues;
    private readonly Gauge _newQueuesEnabled;
    private readonly Counter _queuesCreated;
    private readonly Gauge _connectionsLimit;
    private readonly Counter _queuesDeleted;
    private readonly Counter _messagesExpired;
    private readonly Counter _deliveryReads;
    private readonly Gauge _deliveryTailBytes;
    private readonly Counter _writeFailures;
    private readonly Counter _readFailures;
    private readonly Counter.Child _handshakeOk;
    private QueueStore? _store;
    private RelayServerOptions? _options;
    private readonly object _childLock = new();

    public RelayMetrics()
    {
        var f = Prometheus.Metrics.WithCustomRegistry(Registry);
        DotNetStats.Register(Registry);
        _connectionsOpen = f.CreateGauge("relay_connections_open", "Relay connections currently open.");
        _connectionsLimit = f.CreateGauge("relay_connections_limit",
            "Relay connections served at once: --max-connections, or fewer when the open files limit leaves room for fewer.");
        _connectionsAccepted = f.CreateCounter("relay_connections_accepted_total", "Relay connections accepted.");
        _connectionsRejected = f.CreateCounter("relay_connections_rejected_total", "Relay connections closed at once by a limit.", "reason");
        _keyAgreementWaits = f.CreateCounter("relay_key_agreement_waits_total", "Times a connection waited (before its handshake, or before reading its next request) because its source made more key agreements than --key-agreement-burst and --key-agreement-rate allow.");
        _keyAgreementWaitSeconds = f.CreateCounter("relay_key_agreement_wait_seconds_total", "Time connections waited for their sources' key-agreement budget.");
        _handshakes = f.CreateCounter("relay_handshakes_total", "Handshakes by result: ok, or the reason of the failure.", "result");
        _commands = f.CreateCounter("relay_commands_total", "Commands by type and result (ok or the error code).", "command", "result");
        _protocolErrors = f.CreateCounter("relay_protocol_errors_total", "Connections closed for a protocol violation, by error code.", "code");
        _subscriptions = f.CreateGauge("relay_subscriptions", "Queues with a live subscriber.");
        _messagesStored = f.CreateCounter("relay_messages_stored_total", "Messages accepted (durable) by SEND.");
        _bytesStored = f.CreateCounter("relay_messages_stored_bytes_total", "Body bytes accepted by SEND.");
        _deliveries = f.CreateCounter("relay_deliveries_total", "Messages pushed to subscribers.");
        _acked = f.CreateCounter("relay_messages_acked_total", "Messages acknowledged and deleted.");
        _batchSize = f.CreateHistogram("relay_store_commit_operations", "Write operations per group-commit batch.",
            new HistogramConfiguration { Buckets = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096] });
        _fsync = f.CreateHistogram("relay_store_commit_seconds", "Time of one group-commit batch write including its fsync.",
            new HistogramConfiguration { Buckets = Histogram.ExponentialBuckets(0.00005, 2, 16) });
        _deliveryLatency = f.CreateHistogram("relay_delivery_latency_seconds",
            "From a SEND arriving to its message being pushed to a subscriber waiting for it (messages that wait in a queue are not observed).",
            new HistogramConfiguration { Buckets = Histogram.ExponentialBuckets(0.0001, 2, 16) });
        _sweeps = f.CreateCounter("relay_store_sweeps_total", "Expiry sweeps run (expired messages and idle queues).");
        _quietCollections = f.CreateCounter("relay_quiet_collections_total", "Times the relay collected garbage when it went quiet after allocating (a full collection, and a compacting one when it gives back 8 MiB or more).");
        _quietCollectionPause = f.CreateCounter("relay_quiet_collection_pause_seconds_total", "Time the relay's threads were paused by those collections.");
        _sweepFailures = f.CreateCounter("relay_store_sweep_failures_total", "Expiry sweeps that failed (retried at the next interval; nothing is lost).");
        _sweepSeconds = f.CreateHistogram("relay_store_sweep_seconds", "Duration of one expiry sweep.",
            new HistogramConfiguration { Buckets = Histogram.ExponentialBuckets(0.001, 4, 10) });
        _messagesExpired = f.CreateCounter("relay_messages_expired_total", "Messages deleted because they outlived the message TTL.");
        _backups = f.CreateCounter("relay_backups_total", "Backups made through the admin API, by result: ok or failed.", "result");
        _backups.WithLabels("ok");      // both series from the start, so that an alert on "failed" sees its increase
        _backups.WithLabels("failed");
        _lastBackup = f.CreateGauge("relay_backup_last_success_timestamp_seconds", "Unix time of the newest backup: made since the relay started, or found in the backup directory at start (0: none).");
        _reclaims = f.CreateCounter("relay_store_reclaims_total", "Flush-and-compaction runs started because the store was over its disk budget.");
        _evicted = f.CreateCounter("relay_store_handles_evicted_total", "Idle queue handles dropped from memory.");
        _queues = f.CreateGauge("relay_store_queues", "Queues stored (RocksDB estimate).");
        _messages = f.CreateGauge("relay_store_messages", "Messages stored (RocksDB estimate).");
        _messageBytes = f.CreateGauge("relay_store_messages_bytes", "Bytes of stored messages (RocksDB estimate: live table data and memtables).");
        _diskBytes = f.CreateGauge("relay_store_disk_bytes", "Bytes of the store's files counted against the disk budget (table files and WAL).");
        _diskBudget = f.CreateGauge("relay_store_disk_budget_bytes", "The configured disk budget; 0 means unlimited.");
        _overBudget = f.CreateGauge("relay_store_full", "1 while the store is over its disk budget (NEW and SEND answer FULL), else 0.");
        _diskFull = f.CreateGauge("relay_store_disk_full", "1 while the store's file system is full (NEW and SEND answer FULL, other writes fail), else 0.");
        _pendingCompaction = f.CreateGauge("relay_store_pending_compaction_bytes", "Bytes RocksDB estimates compaction still has to rewrite.");
        _deliveryReads = f.CreateCounter("relay_delivery_reads_total",
            "Messages taken for delivery or GET, by source: memory (the delivery tail of a subscribed queue) or store (a RocksDB read).", "source");
        _deliveryTailBytes = f.CreateGauge("relay_delivery_tail_bytes", "Message bytes held in memory by delivery tails (bounded by the store's tail budget).");
        _loadedQueues = f.CreateGauge("relay_store_loaded_queues", "Queue handles in memory (touched recently).");
        _newQueuesEnabled = f.CreateGauge("relay_new_queues_enabled", "1 while NEW may create queues, 0 while the new-queues switch is off.");
        _queuesCreated = f.CreateCounter("relay_store_queues_created_total", "Queues created.");
        _queuesDeleted = f.CreateCounter("relay_store_queues_deleted_total", "Queues deleted, by reason: recipient (DEL) or idle (idle-queue expiry).", "reason");
        _writeFailures = f.CreateCounter("relay_store_write_failures_total", "Group-commit batches whose write failed.");
        _readFailures = f.CreateCounter("relay_store_read_failures_total", "Reads of a stored message that failed.");
        _outputMemory = f.CreateGauge("relay_output_memory_bytes", "Memory the output buffers of all connections hold (frames written and not yet sent).");
        _outputMemoryBudget = f.CreateGauge("relay_output_memory_budget_bytes", "The configured output memory budget; 0 means unlimited.");
        _inFlightMemory = f.CreateGauge("relay_inflight_memory_bytes", "Message bytes of all connections' SENDs in flight (read, waiting for their group commit).");
        _inFlightMemoryBudget = f.CreateGauge("relay_inflight_memory_budget_bytes", "The configured in-flight memory budget; 0 means unlimited.");
        _keyMemory = f.CreateGauge("relay_key_memory_bytes", "Derived auth keys all connections cache, counted at 512 bytes each.");
        _keyMemoryBudget = f.CreateGauge("relay_key_memory_budget_bytes", "The configured key memory budget; 0 means unlimited.");
        _gcCommitted = f.CreateGauge("relay_gc_committed_bytes",
            "Memory the process's .NET garbage collector held committed after its last collection (0 before the first): its heap and the free memory it keeps for new objects.");
        _handshakeOk = _handshakes.WithLabels("ok");
        Registry.AddBeforeCollectCallback(UpdateStoreGauges);
    }

    /// <summary>Reads the store-wide gauges from <paramref name="store"/> at every scrape.</summary>
    public void Bind(QueueStore store, RelayServerOptions options)
    {
        _options = options;
        _store = store;
        _diskBudget.Set(options.DiskBudgetBytes);
    }

    /// <summary>The relay connections served at once (<see cref="RelayServerContext.ConnectionLimit"/>).</summary>
    internal void BindConnectionLimit(int limit) => _connectionsLimit.Set(limit);

    /// <summary>Reads the connections' output, in-flight and key memory at every scrape.</summary>
    internal void BindMemory(SharedMemory output, SharedMemory inFlight, SharedMemory keys)
    {
        _output = output;
        _outputMemoryBudget.Set(output.Budget);
        _inFlight = inFlight;
        _inFlightMemoryBudget.Set(inFlight.Budget);
        _keys = keys;
        _keyMemoryBudget.Set(keys.Budget);
    }

    private void UpdateStoreGauges()
    {
        if (_output is { } output)
        {
            _outputMemory.Set(output.Held);
        }
        if (_inFlight is { } inFlight)
        {
            _inFlightMemory.Set(inFlight.Held);
        }
        if (_keys is { } keys)
        {
            _keyMemory.Set(keys.Held);
        }
        _gcCommitted.Set(GC.GetGCMemoryInfo().TotalCommittedBytes);
        var store = _store;
        if (store is null)
        {
            return;
        }
        try
        {
            var stats = store.Statistics;
            _queues.Set(stats.EstimateQueues());
            _messages.Set(stats.EstimateMessages());
            _messageBytes.Set(stats.EstimateMessageBytes());
            _diskBytes.Set(stats.GetDiskBytes());
            _pendingCompaction.Set(stats.GetPendingCompactionBytes());
            _overBudget.Set(store.IsOverDiskBudget ? 1 : 0);
            _diskFull.Set(store.IsDiskFull ? 1 : 0);
            _loadedQueues.Set(stats.LoadedQueues);
            _queuesCreated.IncTo(stats.QueuesCreated);
            _queuesDeleted.WithLabels("idle").IncTo(stats.IdleQueuesDeleted);
            _queuesDeleted.WithLabels("recipient").IncTo(stats.QueuesDeleted - stats.IdleQueuesDeleted);
            _messagesExpired.IncTo(stats.MessagesExpired);
            _deliveryReads.WithLabels("memory").IncTo(stats.DeliveriesFromMemory);
            _deliveryReads.WithLabels("store").IncTo(stats.DeliveriesFromStore);
            _deliveryTailBytes.Set(stats.DeliveryTailBytes);
            _writeFailures.IncTo(stats.WriteFailures);
            _readFailures.IncTo(stats.ReadFailures);
            _newQueuesEnabled.Set(_options?.AllowNewQueues == false ? 0 : 1);
        }
        catch (ObjectDisposedException)
        {
            // Scraped while stopping: keep the last values.
        }
    }

    /// <summary>Store-wide values for GET /admin/stats (computed now).</summary>
    public AdminStats Snapshot(QueueStore store, RelayServerOptions options, TimeSpan uptime)
    {
        UpdateStoreGauges();
        var stats = store.Statistics;
        return new AdminStats
        {
            UptimeSeconds = (long)uptime.TotalSeconds,
            ConnectionsOpen = (long)_connectionsOpen.Value,
            ConnectionsAccepted = (long)_connectionsAccepted.Value,
            Subscriptions = (long)_subscriptions.Value,
            Queues = (long)_queues.Value,
            Messages = (long)_messages.Value,
            MessageBytes = (long)_messageBytes.Value,
            DiskBytes = (long)_diskBytes.Value,
            DiskBudgetBytes = options.DiskBudgetBytes,
            StoreFull = _overBudget.Value != 0,
            DiskFull = _diskFull.Value != 0,
            PendingCompactionBytes = (long)_pendingCompaction.Value,
            MessagesStored = (long)_messagesStored.Value,
            Deliveries = (long)_deliveries.Value,
            MessagesAcked = (long)_acked.Value,
            MessagesExpired = stats.MessagesExpired,
            QueuesCreated = stats.QueuesCreated,
            QueuesDeleted = stats.QueuesDeleted,
            NewQueuesEnabled = options.AllowNewQueues,
            Durable = options.Durable,
        };
    }

    /// <summary>A SEND that arrived at <paramref name="arrivedTimestamp"/> (Stopwatch ticks) was just pushed to its subscriber.</summary>
    public void DeliveredAfter(long arrivedTimestamp) => _deliveryLatency.Observe(Stopwatch.GetElapsedTime(arrivedTimestamp).TotalSeconds);

    public void SweepCompleted(double seconds)
    {
        _sweeps.Inc();
        _sweepSeconds.Observe(seconds);
    }

    public void SweepFailed() => _sweepFailures.Inc();

    /// <summary>The relay collected garbage once quiet; <paramref name="pauseSeconds"/> it paused for.</summary>
    public void QuietCollection(double pauseSeconds)
    {
        _quietCollections.Inc();
        _quietCollectionPause.Inc(pauseSeconds);
    }
    public void Reclaimed() => _reclaims.Inc();

    public void BackupMade(DateTimeOffset now)
    {
        _backups.WithLabels("ok").Inc();
        _lastBackup.Set(now.ToUnixTimeSeconds());
    }

    public void BackupFailed() => _backups.WithLabels("failed").Inc();

    /// <summary>At start: the time of the newest backup already in the backup directory.</summary>
    public void BackupFound(DateTimeOffset made) => _lastBackup.Set(made.ToUnixTimeSeconds());

    public void Evicted(int count) => _evicted.Inc(count);

    public void ConnectionOpened()
    {
        _connectionsAccepted.Inc();
        _connectionsOpen.Inc();
    }

    public void ConnectionClosed() => _connectionsOpen.Dec();
    public void ConnectionRejected(string reason) => _connectionsRejected.WithLabels(reason).Inc();

    internal void KeyAgreementWait(TimeSpan wait)
    {
        _keyAgreementWaits.Inc();
        _keyAgreementWaitSeconds.Inc(wait.TotalSeconds);
    }
    public void HandshakeSucceeded() => _handshakeOk.Inc();
    public void HandshakeFailed(string reason) => _handshakes.WithLabels(reason).Inc();
    public void ProtocolError(ErrorCode code) => _protocolErrors.WithLabels(CommandResult.From(code)).Inc();
    public void SubscriptionsChanged(int delta) => _subscriptions.Inc(delta);
    public void Delivered() => _deliveries.Inc();
    public void MessagesAcked(int count) => _acked.Inc(count);

    public void MessageStored(int bytes)
    {
        _messagesStored.Inc();
        _bytesStored.Inc(bytes);
    }

    // Children of relay_commands_total by (frame type byte, result): read without a lock on every
    // command; created once per combination under the lock.
    private readonly Dictionary<string, Counter.Child>?[] _commandByType = new Dictionary<string, Counter.Child>?[257];

    public void Command(FrameType? type, string result)
    {
        int slot = type is { } t ? (byte)t : 256;
        var byResult = Volatile.Read(ref _commandByType[slot]);
        if (byResult is null || !byResult.TryGetValue(result, out var child))
        {
            lock (_childLock)
            {
                var current = _commandByType[slot];
                if (current is null || !current.TryGetValue(result, out child))
                {
                    child = _commands.WithLabels(CommandName(type), result);
                    // Copy on write, so readers never see a dictionary being changed.
                    Volatile.Write(ref _commandByType[slot], new Dictionary<string, Counter.Child>(
                        current ?? new Dictionary<string, Counter.Child>(), StringComparer.Ordinal) { [result] = child });
                }
            }
        }
        child.Inc();
    }

    public void Committed(StoreCommit commit)
    {
        _batchSize.Observe(commit.Operations);
        _fsync.Observe(commit.FsyncSeconds);
    }

    private static string CommandName(FrameType? type) => type switch
    {
        FrameType.Ping => "ping",
        FrameType.New => "new",
        FrameType.SKey => "skey",
        FrameType.Send => "send",
        FrameType.Sub => "sub",
        FrameType.Ack => "ack",
        FrameType.Get => "get",
        FrameType.Off => "off",
        FrameType.Del => "del",
        _ => "unknown",
    };
}
