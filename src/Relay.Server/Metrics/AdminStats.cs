using System.Text.Json.Serialization;

namespace Relay.Server.Metrics;

/// <summary>The body of GET /admin/stats: store-wide counts only, never an id, key or address.</summary>
public sealed class AdminStats
{
    public long UptimeSeconds { get; init; }
    public long ConnectionsOpen { get; init; }
    public long ConnectionsAccepted { get; init; }
    public long Subscriptions { get; init; }
    /// <summary>RocksDB estimate.</summary>
    public long Queues { get; init; }
    /// <summary>RocksDB estimate.</summary>
    public long Messages { get; init; }
    /// <summary>RocksDB estimate.</summary>
    public long MessageBytes { get; init; }
    public long DiskBytes { get; init; }
    public long DiskBudgetBytes { get; init; }
    /// <summary>Over the disk budget.</summary>
    public bool StoreFull { get; init; }
    /// <summary>The store's file system is full (writes fail until space is free again).</summary>
    public bool DiskFull { get; init; }
    public long PendingCompactionBytes { get; init; }
    public long MessagesStored { get; init; }
    public long Deliveries { get; init; }
    public long MessagesAcked { get; init; }
    public long MessagesExpired { get; init; }
    public long QueuesCreated { get; init; }
    public long QueuesDeleted { get; init; }
    public bool NewQueuesEnabled { get; init; }
    public bool Durable { get; init; }
}

/// <summary>The body of POST /admin/queue-creation and of its answer.</summary>
public sealed class QueueCreationSwitch
{
    public bool Enabled { get; set; }
}

/// <summary>Source-generated (reflection-free, AOT-clean) JSON of the admin API: snake_case keys.</summary>
[JsonSourceGenerationOptions(PropertyNamingPolicy = JsonKnownNamingPolicy.SnakeCaseLower, WriteIndented = true)]
[JsonSerializable(typeof(AdminStats))]
[JsonSerializable(typeof(QueueCreationSwitch))]
[JsonSerializable(typeof(Relay.Server.Hosting.BackupResult))]
[JsonSerializable(typeof(AdminError))]
public sealed partial class AdminJsonContext : JsonSerializerContext;

/// <summary>An admin API request that could not be done: what went wrong, in words.</summary>
public sealed class AdminError
{
    public required string Error { get; init; }
}
