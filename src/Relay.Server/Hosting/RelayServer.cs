using System.Net;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Connections;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using Prometheus;
using Relay.Protocol;
using Relay.Server.Connections;
using Relay.Server.Metrics;
using Relay.Storage;

namespace Relay.Server.Hosting;

/// <summary>
/// One relay: the queue store, the relay listener (<see cref="RelayListener"/>: sockets straight into
/// the sessions) and the admin HTTP listener (health, readiness, metrics) in a Kestrel host.
/// </summary>
public sealed class RelayServer : IAsyncDisposable
{
    private readonly WebApplication _app;
    private readonly RelayServerContext _context;
    private readonly RelayIdentity _identity;
    private readonly RelayListener _relayListener;
    private readonly RelayConnectionHandler _handler;
    // Open in-process connections and the ends of their sessions, under its own lock. A connection
    // is registered only while _stopped is 0, and the shutdown sets _stopped before it takes its
    // snapshot under the same lock: none is registered after the snapshot.
    private readonly Dictionary<InProcessConnection, Task> _inProcess = new(ReferenceEqualityComparer.Instance);
    private readonly ListenOptions? _adminListen;
    private readonly TlsCertificates? _tls;
    private readonly ILogger _logger;
    private readonly RelayMaintenance _maintenance;
    private volatile bool _ready;
    private int _stopped;

    public RelayServerOptions Options { get; }
    public QueueStore Store { get; }
    public RelayMetrics Metrics { get; }
    public string Fingerprint => _identity.Fingerprint;
    public bool IsReady => _ready;

    /// <summary>
    /// True once the relay stopped because its store failed every write for
    /// <see cref="RelayServerOptions.StoreFailureTimeout"/> (event 33): <c>relay serve</c> then exits with 1.
    /// </summary>
    public bool StoppedForStoreFailure { get; private set; }

    /// <summary>Starts the shutdown, as SIGTERM does, marked as a failure (see <see cref="StoppedForStoreFailure"/>).</summary>
    private void StopForStoreFailure()
    {
        StoppedForStoreFailure = true;
        _app.Lifetime.StopApplication();
    }

    /// <summary>Cancelled when SIGTERM/SIGINT (or <see cref="StopAsync"/>) starts the shutdown.</summary>
    public CancellationToken ShutdownRequested => _app.Lifetime.ApplicationStopping;

    /// <summary>The bound relay endpoint (the real port when configured with port 0).</summary>
    public IPEndPoint RelayEndPoint => _relayListener.EndPoint;
    public IPEndPoint? AdminEndPoint => (IPEndPoint?)_adminListen?.EndPoint;

    /// <summary>The address clients use: the configured public hosts, else the listener's host (an IPv6 one in brackets).</summary>
    public RelayAddress Address
    {
        get
        {
            var ep = RelayEndPoint;
            IReadOnlyList<string> hosts = Options.PublicHosts.Count > 0 ? Options.PublicHosts : [HostOf(ep.Address)];
            return _identity.AddressFor(hosts, ep.Port);
        }
    }

    /// <summary>A listener's address as a host of the relay address: localhost for any address, an IPv6 address in brackets.</summary>
    private static string HostOf(IPAddress address) =>
        address.Equals(IPAddress.Any) || address.Equals(IPAddress.IPv6Any) ? "localhost"
        : address.AddressFamily == System.Net.Sockets.AddressFamily.InterNetworkV6 ? $"[{address}]"
        : address.ToString();

    private RelayServer(RelayServerOptions options, WebApplication app, RelayServerContext context, RelayIdentity identity,
        RelayListener relayListener, RelayConnectionHandler handler, ListenOptions? adminListen, TlsCertificates? tls, RelayMaintenance maintenance)
    {
        _maintenance = maintenance;
        Options = options;
        _app = app;
        _context = context;
        _identity = identity;
        _relayListener = relayListener;
        _handler = handler;
        _adminListen = adminListen;
        _tls = tls;
        Store = context.Store;
        Metrics = context.Metrics;
        _logger = context.Logger;
    }

    /// <summary>The backups <c>POST /admin/backup</c> makes.</summary>
    internal RelayBackups Backups => _context.Backups;

    /// <summary>
    /// Opens the store, binds both listeners and starts serving. Throws when a port is taken, the store
    /// cannot open, or the identity cannot make the TLS certificate (<see cref="InvalidDataException"/>).
    /// </summary>
    public static async Task<RelayServer> StartAsync(RelayServerOptions options, Action<ILoggingBuilder>? configureLogging = null,
        CancellationToken cancellationToken = default)
    {
        // The identity and TLS context (PKCS#12 load, certificate signing, the chain build that reads
        // the system certificate store) and the RocksDB open each take a few hundred milliseconds:
        // do them at the same time.
        int largestMessage = ProtocolConstants.LargestMessage(options.MaxFrame);
        if (options.MaxMessage > largestMessage)
        {
            throw new ArgumentException(
                $"MaxMessage {options.MaxMessage} does not fit a delivery into MaxFrame {options.MaxFrame}: at most {largestMessage}", nameof(options));
        }
        // Before the store opens its files: connections must not take the descriptors it needs.
        var openFiles = OpenFiles.Raise(options.MaxConnections);
        int connectionLimit = OpenFiles.ConnectionsAllowed(openFiles, options.MaxConnections);
        if (connectionLimit == 0)
        {
            throw new InvalidOperationException(OpenFiles.NoRoom(openFiles!.Value));
        }
        DurableDirectory.Create(options.DataDirectory);
        var identityTask = Task.Run(() =>
        {
            var id = RelayIdentity.LoadOrCreate(options.DataDirectory, out bool isNew);
            return (Identity: id, Created: isNew);
        }, cancellationToken);
        TlsCertificates? tls = null;
        QueueStore? store = null;
        RelayIdentity? identity = null;
        RelayListener? relayListener = null;
        try
        {
            store = QueueStore.Open(new QueueStoreOptions
            {
                Path = Path.Combine(options.DataDirectory, "queues"),
                MessageTtl = options.MessageTtl,
                IdleQueueTtl = options.IdleQueueTtl,
                MaxMessagesPerQueue = options.QueueMaxMessages,
                MaxBytesPerQueue = options.QueueMaxBytes,
                DiskBudgetBytes = options.DiskBudgetBytes,
                DeliveryTailBytes = options.DeliveryMemoryBytes,
                Durable = options.Durable,
                DeferCompactions = true,
                // The relay runs the sweeps itself (RelayMaintenance), timed and counted in metrics.
                SweepInterval = TimeSpan.Zero,
                Clock = options.Clock,
            });

            // The empty builder reads no appsettings files and so watches no directory for changes
            // (the slim builder watched the working directory recursively, costing CPU and inotify
            // watches); every setting comes from RelayServerOptions.
            var builder = WebApplication.CreateEmptyBuilder(new WebApplicationOptions { ContentRootPath = AppContext.BaseDirectory });
            if (options.Admin != null)
            {
                builder.WebHost.UseKestrelCore();
            }
            else
            {
                // Kestrel without an endpoint would listen on localhost:5000: no HTTP server at all.
                builder.Services.AddSingleton<Microsoft.AspNetCore.Hosting.Server.IServer, NoHttpServer>();
            }
            builder.Services.AddRoutingCore();
            builder.Logging.ClearProviders();
            builder.Logging.AddFilter("Microsoft", LogLevel.Warning);
            builder.Logging.AddFilter("System", LogLevel.Warning);
            // Kestrel warns (event 24) of every connection its MaxConcurrentConnections refuses, one
            // line each: a flood of the admin port would flood the log. Its other events of this
            // category are debug lines; errors still pass.
            builder.Logging.AddFilter("Microsoft.AspNetCore.Server.Kestrel.Connections", LogLevel.Error);
            if (configureLogging != null)
            {
                configureLogging(builder.Logging);
            }
            else
            {
                builder.Logging.AddSimpleConsole(o =>
                {
                    o.SingleLine = true;
                    o.UseUtcTimestamp = true;
                    o.TimestampFormat = "yyyy-MM-ddTHH:mm:ssZ ";
                });
            }
            builder.Services.Configure<HostOptions>(o => o.ShutdownTimeout = options.ShutdownTimeout);

            var metrics = new RelayMetrics();
            store.Committed += metrics.Committed;
            store.CompletionScope = BatchedSends.Run;
            store.MessagesPutBack += queue => _ = RelaySession.StartSubscriberAgainWhenWritableAsync(store, queue);
            metrics.Bind(store, options);

            var started = await identityTask;
            identity = started.Identity;
            bool created = started.Created;
            // The logger category is the product, not a type name: operators filter on "Relay".
            var loggerHolder = new LoggerHolder();
            // The first TLS certificate is made in the background; the handshakes wait for it, and a
            // failure to make it ends the start (RequireTlsAsync).
            tls = options.Tls ? new TlsCertificates(identity, options.Clock, loggerHolder) : null;
            var context = new RelayServerContext(options, store, metrics, loggerHolder, tls) { ConnectionLimit = connectionLimit };
            store.DiskFullChanged += full =>
            {
                if (full) Log.DiskFull(context.Logger);
                else Log.DiskNotFull(context.Logger);
            };
            metrics.BindMemory(context.Output, context.InFlight, context.Keys);
            metrics.BindConnectionLimit(connectionLimit);
            if (context.Backups.Newest() is { } newestBackup)
            {
                metrics.BackupFound(newestBackup);
            }
            var handler = new RelayConnectionHandler(context);

            // Bound before the host starts, so that a taken port fails the start; accepting starts once ready to serve.
            relayListener = new RelayListener(options.Listen, options.IdleTimeout, handler, loggerHolder);
            ListenOptions? adminListen = null;
            if (options.Admin != null)
            {
                builder.WebHost.ConfigureKestrel(k =>
                {
                    k.AddServerHeader = false;
                    // Part of the descriptors OpenFiles.Reserved keeps: a flood of the admin port
                    // (one exposed for a remote Prometheus) cannot take the store's.
                    k.Limits.MaxConcurrentConnections = OpenFiles.AdminConnections;
                    k.Listen(options.Admin, lo =>
                    {
                        adminListen = lo;
                        lo.Protocols = HttpProtocols.Http1;
                    });
                });
            }

            var app = builder.Build();
            // SIGTERM/SIGINT: end every session's read loop first, so Kestrel's stop finds them finishing.
            app.Lifetime.ApplicationStopping.Register(context.Stopping.Cancel);
            loggerHolder.Inner = app.Services.GetRequiredService<ILoggerFactory>().CreateLogger("Relay");
            RelayServer? server = null;
            MapAdmin(app, context, () => server?._ready == true);
            await app.StartAsync(cancellationToken);
            var maintenance = new RelayMaintenance(context, () => server?.StopForStoreFailure());
            server = new RelayServer(options, app, context, identity, relayListener, handler, adminListen, tls, maintenance);
            relayListener.Start();
            maintenance.Start();
            if (created)
            {
                Log.IdentityCreated(context.Logger);
            }
            else if (RelayIdentity.ExposedMode(options.DataDirectory) is { } mode)
            {
                Log.IdentityExposed(context.Logger, RelayIdentity.PathIn(options.DataDirectory), mode);
            }
            if (connectionLimit < options.MaxConnections)
            {
                Log.OpenFilesLimit(context.Logger, openFiles!.Value.Soft, openFiles.Value.Hard, connectionLimit, options.MaxConnections,
                    (long)options.MaxConnections + OpenFiles.Reserved);
            }
            Log.StoreOpened(context.Logger, options.Durable ? "durable: every acknowledged write is fsynced" : "relaxed: no fsync");
            server._ready = true;
            // Announced with /readyz (scripts read the address from this line once it answers 200);
            // the TLS context may still be in the making: the first handshakes wait for it.
            Log.Ready(context.Logger, server.Address.ToString());
            await server.RequireTlsAsync();
            // Compaction due since an earlier run waits until the relay is serving (see QueueStoreOptions).
            store.ResumeCompactions();
            return server;
        }
        catch
        {
            if (relayListener != null)
            {
                await relayListener.StopAsync(TimeSpan.Zero);
            }
            store?.Dispose();
            try
            {
                var leftover = await identityTask;
                leftover.Identity.Dispose();
                tls?.Dispose();
            }
            catch (Exception)
            {
                // The identity failed too; the first error is the one to report.
            }
            throw;
        }
    }

    /// <summary>
    /// Waits for the TLS context built in the background (readiness does not: the first handshakes
    /// wait for it). A relay that cannot build it cannot serve a single client: the failure is logged,
    /// the relay stopped and the start fails, rather than every handshake failing unseen.
    /// </summary>
    private async Task RequireTlsAsync()
    {
        if (_tls is null)
        {
            return;
        }
        try
        {
            await _tls.Started;
        }
        catch (Exception ex)
        {
            Log.TlsSetupFailed(_logger, ex.GetType().Name);
            await StopAsync();
            throw new InvalidDataException(
                $"cannot make a TLS certificate with the relay identity {RelayIdentity.PathIn(Options.DataDirectory)}: {ex.Message}", ex);
        }
    }

    private static void MapAdmin(WebApplication app, RelayServerContext context, Func<bool> ready)
    {
        AdminApi.Map(app, context, DateTime.UtcNow);
        RequestDelegate health = ctx => ctx.Response.WriteAsync("ok\n");
        RequestDelegate readiness = ctx =>
        {
            if (ready())
            {
                return ctx.Response.WriteAsync("ready\n");
            }
            ctx.Response.StatusCode = StatusCodes.Status503ServiceUnavailable;
            return ctx.Response.WriteAsync("not ready\n");
        };
        app.MapGet("/healthz", health);
        app.MapGet("/readyz", readiness);
        app.MapMetrics("/metrics", context.Metrics.Registry);
    }

    /// <summary>
    /// Opens a connection to this relay that goes through no socket: the returned stream is the
    /// client's end, carrying exactly what a TCP connection would (TLS first when
    /// <see cref="RelayServerOptions.Tls"/> is on, then relay/1 frames). For a process that hosts its
    /// own relay, and for tests and benchmarks; <c>RelayConnection.ConnectAsync(address, stream)</c>
    /// of the client SDK speaks over it. Counted against <see cref="RelayServerOptions.MaxConnections"/>;
    /// it has no source address, so the per-source limits do not apply, and no idle timeout ends it
    /// (its other end is in this process). Disposing the stream closes the connection; stopping the
    /// relay ends it like a socket's.
    /// </summary>
    /// <exception cref="ObjectDisposedException">The relay is stopping or stopped.</exception>
    public Stream ConnectInProcess()
    {
        var (relay, client) = InProcessConnection.Create();
        // Registered before it runs: a connection refused at once must not be registered after its removal.
        var ended = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        lock (_inProcess)
        {
            ObjectDisposedException.ThrowIf(Volatile.Read(ref _stopped) != 0, this);
            _inProcess[relay] = ended.Task;
        }
        _ = Task.Run(async () =>
        {
            try
            {
                await _handler.OnConnectedAsync(relay);
            }
            finally
            {
                lock (_inProcess)
                {
                    _inProcess.Remove(relay);
                }
                ended.TrySetResult();
            }
        });
        return client;
    }

    /// <summary>What the sessions share (store, options, metrics): for tests that run a session over a transport of their own.</summary>
    internal RelayServerContext Context => _context;

    /// <summary>Ends reading on every in-process connection, waits for them, then aborts what is left.</summary>
    private async Task<bool> StopInProcessAsync(TimeSpan timeout)
    {
        KeyValuePair<InProcessConnection, Task>[] open;
        lock (_inProcess)
        {
            open = [.. _inProcess];
        }
        foreach (var (connection, _) in open)
        {
            connection.EndReading();
        }
        var all = Task.WhenAll(open.Select(c => c.Value));
        if (await Task.WhenAny(all, Task.Delay(timeout)) == all)
        {
            return true;
        }
        foreach (var (connection, _) in open)
        {
            connection.Abort();
        }
        await Task.WhenAny(all, Task.Delay(TimeSpan.FromSeconds(2)));
        return false;
    }

    /// <summary>
    /// Stops accepting, lets every connection finish what it has in flight and closes it, then
    /// flushes and closes the store. Every acknowledged message is on disk when this returns.
    /// </summary>
    public async Task StopAsync()
    {
        if (Interlocked.Exchange(ref _stopped, 1) != 0)
        {
            return;
        }
        _ready = false;
        Log.Stopping(_logger);
        _context.Stopping.Cancel();
        try
        {
            // Bounded by RelayServerOptions.ShutdownTimeout: the connections still open then are aborted.
            var relayStopped = _relayListener.StopAsync(Options.ShutdownTimeout);
            var inProcessStopped = StopInProcessAsync(Options.ShutdownTimeout);
            long start = System.Diagnostics.Stopwatch.GetTimestamp();
            await _app.StopAsync();
            bool relayDrained = await relayStopped;
            bool inProcessDrained = await inProcessStopped;
            if (!relayDrained || !inProcessDrained || System.Diagnostics.Stopwatch.GetElapsedTime(start) >= Options.ShutdownTimeout)
            {
                Log.ShutdownTimedOut(_logger);
            }
        }
        finally
        {
            await _maintenance.DisposeAsync();
            // A store whose writes fail cannot close cleanly (its last flush fails): the rest is
            // still released, then the caller hears of it (relay serve exits with 1).
            Exception? storeError = null;
            try
            {
                await Store.DisposeAsync();
            }
            catch (Exception ex)
            {
                storeError = ex;
            }
            await _app.DisposeAsync();
            _tls?.Dispose();
            _identity.Dispose();
            Log.Stopped(_logger);
            if (storeError is not null)
            {
                System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(storeError);
            }
        }
    }

    /// <summary>Runs until SIGINT/SIGTERM (or <paramref name="cancellationToken"/>), then stops gracefully.</summary>
    public async Task WaitForShutdownAsync(CancellationToken cancellationToken = default)
    {
        await _app.WaitForShutdownAsync(cancellationToken);
        await StopAsync();
    }

    public ValueTask DisposeAsync() => new(StopAsync());

    /// <summary>Runs one expiry sweep now (as the sweep timer does); returns the messages expired.</summary>
    public Task<int> SweepNowAsync() => _maintenance.SweepAsync();

    /// <summary>Runs the maintenance job now (handle eviction, disk budget and space reclamation).</summary>
    public Task MaintainNowAsync() => _maintenance.MaintainAsync();

    /// <summary>The host's server when there is no admin listener: serves nothing.</summary>
    private sealed class NoHttpServer : Microsoft.AspNetCore.Hosting.Server.IServer
    {
        public Microsoft.AspNetCore.Http.Features.IFeatureCollection Features { get; } = new Microsoft.AspNetCore.Http.Features.FeatureCollection();
        public Task StartAsync<TContext>(Microsoft.AspNetCore.Hosting.Server.IHttpApplication<TContext> application, CancellationToken cancellationToken) where TContext : notnull
            => Task.CompletedTask;
        public Task StopAsync(CancellationToken cancellationToken) => Task.CompletedTask;
        public void Dispose()
        {
        }
    }

    /// <summary>Forwards to the host's logger once it exists (the context is built before the host).</summary>
    private sealed class LoggerHolder : ILogger
    {
        public ILogger Inner { get; set; } = Microsoft.Extensions.Logging.Abstractions.NullLogger.Instance;
        public IDisposable? BeginScope<TState>(TState state) where TState : notnull => Inner.BeginScope(state);
        public bool IsEnabled(LogLevel logLevel) => Inner.IsEnabled(logLevel);
        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
            => Inner.Log(logLevel, eventId, state, exception, formatter);
    }
}
