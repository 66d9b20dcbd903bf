using System.Net;
using Relay.Protocol;

namespace Relay.Server;

/// <summary>Every setting of a running relay. docs/OPERATIONS.md describes each with its default.</summary>
public sealed class RelayServerOptions
{
    /// <summary>Data directory: identity and queue store.</summary>
    public string DataDirectory { get; set; } = "relay-data";

    /// <summary>Relay listener. Port 0 picks a free port (tests).</summary>
    public IPEndPoint Listen { get; set; } = new(IPAddress.Any, RelayAddress.DefaultPort);

    /// <summary>Admin HTTP listener (health, metrics, admin API). Null: no admin listener.</summary>
    public IPEndPoint? Admin { get; set; } = new(IPAddress.Loopback, 5280);

    /// <summary>TLS 1.3 on the relay listener. False only for a loopback hop behind a TLS proxy, or benchmarks.</summary>
    public bool Tls { get; set; } = true;

    /// <summary>Host names put in the printed relay address. Empty: derived from the listener.</summary>
    public List<string> PublicHosts { get; set; } = [];

    /// <summary>Largest frame length accepted after the handshake.</summary>
    public int MaxFrame { get; set; } = ProtocolConstants.DefaultMaxFrame;

    /// <summary>Largest SEND body; at most <see cref="ProtocolConstants.LargestMessage"/> of <see cref="MaxFrame"/> (checked at start).</summary>
    public int MaxMessage { get; set; } = ProtocolConstants.DefaultMaxMessage;

    /// <summary>Time allowed for TLS plus HELLO. Slow links (Tor) need well under 10 s.</summary>
    public TimeSpan HandshakeTimeout { get; set; } = TimeSpan.FromSeconds(10);

    /// <summary>A connection that sends nothing for this long is closed. The client SDK PINGs every 30 s.</summary>
    public TimeSpan IdleTimeout { get; set; } = TimeSpan.FromSeconds(300);

    /// <summary>
    /// Time a started frame may stay incomplete while no other frame of the connection completes;
    /// then the connection ends (SYNTAX). A 64 KB frame takes seconds even over Tor.
    /// </summary>
    public TimeSpan PartialFrameTimeout { get; set; } = TimeSpan.FromSeconds(60);

    /// <summary>Concurrent connections; further ones are closed at once. Bounds memory (about 20 KB per idle TLS connection, more while active).</summary>
    public int MaxConnections { get; set; } = 20_000;

    /// <summary>
    /// True: every relay connection must start with a PROXY protocol header (v1 or v2, before TLS), and
    /// the client address it carries is the connection's source for the per-source limits. Only behind
    /// a proxy that sends it (haproxy send-proxy-v2, stunnel protocol = proxy, Tor HiddenServiceExportCircuitID).
    /// </summary>
    public bool ProxyProtocol { get; set; }

    /// <summary>
    /// Time allowed for the PROXY header. A proxy sends it with the first packet, so 5 s is generous even
    /// over a slow link, while a connection that sends nothing holds a slot for no longer.
    /// </summary>
    public TimeSpan ProxyHeaderTimeout { get; set; } = TimeSpan.FromSeconds(5);

    /// <summary>
    /// Concurrent connections from one source (an IPv4 address or an IPv6 /64); 0: no limit. A client holds
    /// one connection per relay, so 100 leaves room for a carrier-grade NAT address shared by dozens of
    /// people, while one host can take at most 0.5 % of the default <see cref="MaxConnections"/>.
    /// </summary>
    public int MaxConnectionsPerSource { get; set; } = 100;

    /// <summary>
    /// Queue creations (NEW) per minute and source, refilling a bucket of <see cref="QueueCreationBurst"/>;
    /// 0: no limit. A person creates a queue per contact and rotation, a few a day: 30 a minute sustained
    /// covers many people behind one NAT, while one address cannot fill the disk with empty queues quickly.
    /// </summary>
    public double QueueCreationRate { get; set; } = 30;

    /// <summary>
    /// Queue creations a source may make at once before the rate applies. A new user joining a group or
    /// restoring many contacts creates dozens of queues in a burst; 100 covers that.
    /// </summary>
    public int QueueCreationBurst { get; set; } = 100;

    /// <summary>
    /// Key agreements per second and source once <see cref="KeyAgreementBurst"/> is spent; 0: no limit.
    /// The first use of a queue key on a connection (SUB, GET, SEND, ACK, … naming it), real or for a
    /// queue that does not exist, costs the relay an X25519 agreement (about 50 µs of CPU), and a new
    /// connection counts as one; beyond the burst the source's connections wait before their next
    /// request is read, a new one before its handshake (never an error, never a different answer). 200 a second is 1 % of a core per source, and a person's client makes one
    /// per queue when it connects; without it one address naming random queue ids keeps cores busy.
    /// </summary>
    public double KeyAgreementRate { get; set; } = 200;

    /// <summary>Key agreements a source may make at once before the rate applies: a client with thousands of queues subscribes to all of them at once.</summary>
    public int KeyAgreementBurst { get; set; } = Connections.SessionKeys.DefaultCapacity;

    /// <summary>Subscriptions one connection may hold.</summary>
    public int MaxSubscriptionsPerConnection { get; set; } = 10_000;

    /// <summary>Requests one connection may have in flight (waiting for the disk); more are read when these complete.</summary>
    public int MaxInFlightPerConnection { get; set; } = 1024;

    /// <summary>
    /// Message bytes of one connection's SENDs in flight (held in memory until their batch is written);
    /// more are read when these complete. With <see cref="MaxOutputBuffer"/> it bounds what one connection
    /// makes the relay hold: without it, 1,024 SENDs of 64 KB would be 64 MiB.
    /// </summary>
    public int MaxInFlightBytesPerConnection { get; set; } = 1 << 20;

    /// <summary>
    /// Memory for the message bytes of all connections' SENDs in flight together (0: no relay-wide
    /// bound). While they hold this much (a disk that stalls under many senders), each connection
    /// holds at most <see cref="InFlightBytesWhenMemoryIsShort"/> instead of
    /// <see cref="MaxInFlightBytesPerConnection"/> before the relay stops reading its requests.
    /// </summary>
    public long InFlightMemoryBudget { get; set; } = 256L << 20;

    /// <summary>Message bytes of SENDs in flight a connection may hold while <see cref="InFlightMemoryBudget"/> is used up.</summary>
    public int InFlightBytesWhenMemoryIsShort { get; set; } = 32 * 1024;

    /// <summary>
    /// Memory for the derived auth keys all connections cache (0: no relay-wide bound), each counted as
    /// <see cref="Connections.SessionKeys.BytesPerKey"/> bytes. A connection caches up to 4,096 (about
    /// 2 MB); while all of them hold this much (many connections naming many queue ids), a connection
    /// holding <see cref="KeysWhenMemoryIsShort"/> or more drops its keys before it derives another.
    /// </summary>
    public long KeyMemoryBudget { get; set; } = 256L << 20;

    /// <summary>Keys a connection may cache while <see cref="KeyMemoryBudget"/> is used up.</summary>
    public int KeysWhenMemoryIsShort { get; set; } = Connections.SessionKeys.DefaultKeysWhenShort;

    /// <summary>Unsent output a connection may buffer before the relay stops reading its requests.</summary>
    public int MaxOutputBuffer { get; set; } = 1 << 20;

    /// <summary>
    /// Memory for the output buffers of all connections together (0: no relay-wide bound). While they
    /// hold this much, each connection buffers at most <see cref="OutputBufferWhenMemoryIsShort"/>
    /// instead of <see cref="MaxOutputBuffer"/>: many clients that do not read cannot each make the
    /// relay hold the per-connection maximum.
    /// </summary>
    public long OutputMemoryBudget { get; set; } = 256L << 20;

    /// <summary>Unsent output a connection may buffer while <see cref="OutputMemoryBudget"/> is used up.</summary>
    public int OutputBufferWhenMemoryIsShort { get; set; } = 32 * 1024;

    public TimeSpan MessageTtl { get; set; } = TimeSpan.FromDays(21);
    public TimeSpan IdleQueueTtl { get; set; } = TimeSpan.Zero;
    public int QueueMaxMessages { get; set; } = 128;
    public long QueueMaxBytes { get; set; } = 8L * 1024 * 1024;
    public long DiskBudgetBytes { get; set; }
    /// <summary>Memory for the delivery tails of subscribed queues (messages delivered without a store read). 0: always read.</summary>
    public long DeliveryMemoryBytes { get; set; } = 16L * 1024 * 1024;

    /// <summary>True: every acknowledged write is fsynced. False: the relaxed mode (no fsync).</summary>
    public bool Durable { get; set; } = true;

    /// <summary>Password required by NEW; null or empty: none.</summary>
    public string? CreatePassword { get; set; }

    /// <summary>False: NEW answers DISABLED while existing queues keep working.</summary>
    /// <remarks>Volatile: the admin API flips it at runtime (POST /admin/queue-creation).</remarks>
    public bool AllowNewQueues { get => Volatile.Read(ref _allowNewQueues); set => Volatile.Write(ref _allowNewQueues, value); }
    private bool _allowNewQueues = true;

    /// <summary>
    /// Where <c>POST /admin/backup</c> makes its backups, one directory each; null: <c>backups</c> in
    /// the data directory. On the store's file system a backup hard-links the store's table files.
    /// </summary>
    public string? BackupDirectory { get; set; }

    /// <summary>
    /// Complete backups kept in <see cref="BackupDirectory"/>: after each backup the oldest are removed
    /// so that this many remain (the one just made among them); 0 keeps every one.
    /// </summary>
    public int BackupKeep { get; set; } = 7;

    /// <summary>How often the relay sweeps expired messages and idle queues (and counts them in metrics).</summary>
    public TimeSpan SweepInterval { get; set; } = TimeSpan.FromMinutes(10);

    /// <summary>
    /// Bearer token of the admin API (/admin/*). Null or empty: the admin API is off (404).
    /// Health, readiness and metrics never need it.
    /// </summary>
    public string? AdminToken { get; set; }

    /// <summary>
    /// On SIGTERM/SIGINT, time allowed for connections to finish what they have in flight before they
    /// are aborted. The store is then flushed and closed; acknowledged messages are durable either way.
    /// </summary>
    public TimeSpan ShutdownTimeout { get; set; } = TimeSpan.FromSeconds(10);

    /// <summary>
    /// When the store has failed every write for this long for another reason than a full disk (an
    /// I/O error, a file system gone read-only: RocksDB does not recover from those without being
    /// opened again), the relay logs event 33 and stops with exit code 1, so that its service manager
    /// (systemd's <c>Restart=on-failure</c>, a container restart policy) starts it again: the store is
    /// opened afresh from its log, every acknowledged message on disk. Zero: the relay keeps running
    /// (answering INTERNAL to writes) until someone restarts it.
    /// </summary>
    public TimeSpan StoreFailureTimeout { get; set; } = TimeSpan.FromSeconds(60);

    /// <summary>
    /// How often the maintenance loop runs: evicts queue handles idle for <see cref="EvictIdleAfter"/>,
    /// and reclaims space (flush and compaction) when the store is over its disk budget and something
    /// was deleted since the last time.
    /// </summary>
    public TimeSpan MaintenanceInterval { get; set; } = TimeSpan.FromSeconds(30);

    /// <summary>
    /// When the relay goes quiet (under 64 KiB allocated in a second) after allocating 4 MiB or more since
    /// the last full collection, a full collection frees that garbage and, when 8 MiB or more is left to
    /// give back, a compacting one returns the collector's free memory to the system
    /// (Hosting.QuietCollector, Hosting.RelayMaintenance): after a burst of handshakes nothing else
    /// would, on a quiet relay. Off by
    /// default for a relay hosted in an app's process (it collects the whole process); <c>relay serve</c>
    /// turns it on.
    /// </summary>
    public bool CollectWhenQuiet { get; set; }

    /// <summary>Queue handles unused for this long are dropped from memory (they are reloaded on use).</summary>
    public TimeSpan EvictIdleAfter { get; set; } = TimeSpan.FromMinutes(5);

    /// <summary>Clock of the store's retention (message TTL, idle queues) and of the maintenance timers; replaceable in tests.</summary>
    public TimeProvider Clock { get; set; } = TimeProvider.System;
}
