using System.Collections.Concurrent;
using System.Net;
using Microsoft.Extensions.Logging;
using Relay.Client.Transport;
using Relay.Protocol;
using Relay.Server;
using Relay.Server.Hosting;

namespace Relay.Server.Tests;

/// <summary>An in-process relay on port 0 with its own temporary data directory and captured logs.</summary>
public sealed class TestRelay : IAsyncDisposable
{
    private readonly Action<RelayServerOptions>? _configure;
    public string DataDirectory { get; }
    public RelayServer Server { get; private set; } = null!;
    public CapturedLogs Logs { get; } = new();
    public RelayAddress Address => Server.Address;
    public bool OwnsDirectory { get; init; } = true;

    private TestRelay(string dataDirectory, Action<RelayServerOptions>? configure)
    {
        DataDirectory = dataDirectory;
        _configure = configure;
    }

    public static async Task<TestRelay> StartAsync(Action<RelayServerOptions>? configure = null)
    {
        var dir = Path.Combine(Path.GetTempPath(), "relay-test-" + Guid.NewGuid().ToString("N"));
        var relay = new TestRelay(dir, configure);
        await relay.StartServerAsync(0);
        return relay;
    }

    /// <summary>A relay on port 0 serving <paramref name="dataDirectory"/> as it is (kept on dispose).</summary>
    public static async Task<TestRelay> StartInAsync(string dataDirectory, Action<RelayServerOptions>? configure = null)
    {
        var relay = new TestRelay(dataDirectory, configure) { OwnsDirectory = false };
        await relay.StartServerAsync(0);
        return relay;
    }

    private async Task StartServerAsync(int port)
    {
        var options = new RelayServerOptions
        {
            DataDirectory = DataDirectory,
            Listen = new IPEndPoint(IPAddress.Loopback, port),
            Admin = new IPEndPoint(IPAddress.Loopback, 0),
        };
        _configure?.Invoke(options);
        Server = await RelayServer.StartAsync(options, logging =>
        {
            logging.SetMinimumLevel(LogLevel.Debug);
            logging.AddFilter("Relay", LogLevel.Debug);
            logging.AddProvider(Logs);
        });
    }

    /// <summary>Stops the relay and starts it again on the same port and data directory (running <paramref name="whileStopped"/> in between).</summary>
    public async Task RestartAsync(Func<Task>? whileStopped = null)
    {
        int port = Server.RelayEndPoint.Port;
        await Server.StopAsync();
        if (whileStopped != null) await whileStopped();
        for (int attempt = 0; ; attempt++)
        {
            try
            {
                await StartServerAsync(port);
                return;
            }
            catch (IOException) when (attempt < 50)
            {
                await Task.Delay(100);
            }
        }
    }

    /// <summary>Opens the stopped relay's queue store (what an operator's offline tool would do).</summary>
    public Storage.QueueStore OpenStore() => Storage.QueueStore.Open(new Storage.QueueStoreOptions { Path = Path.Combine(DataDirectory, "queues") });

    public Task<RelayConnection> ConnectAsync(RelayConnectionOptions? options = null) =>
        RelayConnection.ConnectAsync(Address, options ?? new RelayConnectionOptions { Tls = Server.Options.Tls });

    public async ValueTask DisposeAsync()
    {
        await Server.StopAsync();
        if (OwnsDirectory)
        {
            try { Directory.Delete(DataDirectory, recursive: true); } catch (IOException) { }
        }
    }
}

/// <summary>Every log line the relay wrote, formatted, for the privacy assertions.</summary>
public sealed class CapturedLogs : ILoggerProvider
{
    public ConcurrentQueue<string> Lines { get; } = new();

    public ILogger CreateLogger(string categoryName) => new Logger(this, categoryName);

    public void Dispose() { }

    private sealed class Logger(CapturedLogs owner, string category) : ILogger
    {
        public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;
        public bool IsEnabled(LogLevel logLevel) => true;
        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
            => owner.Lines.Enqueue($"{logLevel} {category}[{eventId.Id}] {formatter(state, exception)} {exception}");
    }
}
