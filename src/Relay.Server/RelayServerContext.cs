using System.Security.Cryptography;
using System.Text;
using Microsoft.Extensions.Logging;
using Relay.Server.Connections;
using Relay.Server.Metrics;
using Relay.Storage;

namespace Relay.Server;

/// <summary>What every connection of one relay shares.</summary>
internal sealed class RelayServerContext(RelayServerOptions options, QueueStore store, RelayMetrics metrics,
    ILogger logger, Hosting.TlsCertificates? tls)
{
    private readonly byte[] _passwordHash = string.IsNullOrEmpty(options.CreatePassword)
        ? [] : SHA256.HashData(Encoding.UTF8.GetBytes(options.CreatePassword));

    public RelayServerOptions Options { get; } = options;
    public QueueStore Store { get; } = store;
    public RelayMetrics Metrics { get; } = metrics;
    public ILogger Logger { get; } = logger;
    /// <summary>
    /// The TLS certificate and settings (null without TLS), made in the background at start-up
    /// (signing the certificate and building its chain takes a few hundred milliseconds; the first
    /// handshakes wait for it) and renewed while the relay runs.
    /// </summary>
    public Hosting.TlsCertificates? Tls { get; } = tls;
    public CancellationTokenSource Stopping { get; } = new();

    /// <summary>
    /// Relay connections served at once: <see cref="RelayServerOptions.MaxConnections"/>, or fewer when
    /// the open files limit leaves room for fewer (<see cref="Hosting.OpenFiles"/>).
    /// </summary>
    public int ConnectionLimit { get; init; } = options.MaxConnections;

    /// <summary>The output buffers of all connections, counted against <see cref="RelayServerOptions.OutputMemoryBudget"/>.</summary>
    public SharedMemory Output { get; } = new(options.OutputMemoryBudget);

    /// <summary>The message bytes of all connections' SENDs in flight, counted against <see cref="RelayServerOptions.InFlightMemoryBudget"/>.</summary>
    public SharedMemory InFlight { get; } = new(options.InFlightMemoryBudget);

    /// <summary>The derived auth keys all connections cache, counted against <see cref="RelayServerOptions.KeyMemoryBudget"/>.</summary>
    public SharedMemory Keys { get; } = new(options.KeyMemoryBudget);

    /// <summary>Event 20 (a store operation failed): at most one line per command every 10 s.</summary>
    public LogThrottle StoreFailureLog { get; } = new(options.Clock);

    /// <summary>Event 41 (a source's connections wait for its key-agreement budget): at most one line every 10 s.</summary>
    public LogThrottle KeyAgreementLog { get; } = new(options.Clock);

    /// <summary>A connection of a source over its key-agreement budget waits <paramref name="wait"/>: counted, and logged (throttled).</summary>
    public void KeyAgreementWaited(TimeSpan wait)
    {
        Metrics.KeyAgreementWait(wait);
        Log.KeyAgreementWait(this);
    }

    /// <summary>Event 15 (a connection refused by a limit): at most one line per reason every 10 s.</summary>
    public LogThrottle ConnectionRefusalLog { get; } = new(options.Clock);

    /// <summary>Per-source connection count, queue-creation and key-agreement buckets; sources live only here, in memory.</summary>
    public SourceLimiter Sources { get; } = new(options.MaxConnectionsPerSource, options.QueueCreationRate,
        options.QueueCreationBurst, options.Clock,
        options.KeyAgreementRate, options.KeyAgreementBurst);

    /// <summary>Backups of the store and identity (<c>POST /admin/backup</c>), one at a time.</summary>
    public Hosting.RelayBackups Backups { get; } = new(store, options.DataDirectory, options.BackupDirectory, options.BackupKeep,
        options.Clock, logger, metrics);

    /// <summary>Constant-time check of the queue-creation password (empty when none is configured).</summary>
    public bool CheckCreatePassword(ReadOnlySpan<byte> password)
    {
        if (_passwordHash.Length == 0)
        {
            return true;
        }
        Span<byte> hash = stackalloc byte[32];
        SHA256.HashData(password, hash);
        return CryptographicOperations.FixedTimeEquals(hash, _passwordHash);
    }

    /// <summary>
    /// Per-source queue-creation rate limit: the session's source is the PROXY header's client address,
    /// else the socket's peer (behind a proxy without PROXY, that is the proxy, shared by every client).
    /// </summary>
    public bool AllowQueueCreation(RelaySession session) => Sources.TryCreateQueue(session.Source);
}
