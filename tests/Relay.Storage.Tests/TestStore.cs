using System.Security.Cryptography;

namespace Relay.Storage.Tests;

/// <summary>A clock the test moves by hand.</summary>
internal sealed class ManualClock : TimeProvider
{
    public DateTimeOffset Now { get; set; } = new(2025, 6, 1, 12, 30, 0, TimeSpan.Zero);

    public override DateTimeOffset GetUtcNow() => Now;

    public void Advance(TimeSpan by) => Now += by;
}

/// <summary>A store in its own temporary directory (RocksDB locks a directory), deleted on dispose.</summary>
internal sealed class TestStore : IAsyncDisposable
{
    public string Path { get; }
    public QueueStoreOptions Options { get; private set; }
    public QueueStore Store { get; private set; }

    private TestStore(string path, QueueStoreOptions options)
    {
        Path = path;
        Options = options;
        Store = QueueStore.Open(options);
    }

    public static TestStore Create(Func<string, QueueStoreOptions>? configure = null)
    {
        string path = System.IO.Path.Combine(System.IO.Path.GetTempPath(), "relay-storage-test-" + Guid.NewGuid().ToString("N"));
        return new TestStore(path, configure?.Invoke(path) ?? new QueueStoreOptions { Path = path });
    }

    /// <summary>Closes and opens the same directory again (a restart).</summary>
    public async Task ReopenAsync()
    {
        await Store.DisposeAsync();
        Store = QueueStore.Open(Options);
    }

    public async Task<QueueHandle> CreateQueueAsync()
    {
        (StoreStatus status, QueueHandle? queue) = await Store.CreateQueueAsync(
            RandomNumberGenerator.GetBytes(24), RandomNumberGenerator.GetBytes(24),
            RandomNumberGenerator.GetBytes(32), RandomNumberGenerator.GetBytes(32));
        if (status != StoreStatus.Ok || queue is null)
        {
            throw new InvalidOperationException($"CreateQueueAsync: {status}");
        }
        return queue;
    }

    public async ValueTask DisposeAsync()
    {
        await Store.DisposeAsync();
        try
        {
            Directory.Delete(Path, recursive: true);
        }
        catch (IOException)
        {
        }
    }

    /// <summary>Peeks, copies and returns the buffer.</summary>
    public (ulong Id, uint Hour, byte Flags, byte[] Body)? Peek(QueueHandle queue)
    {
        if (!Store.TryPeekOldest(queue, out StoredMessage message))
        {
            return null;
        }
        var result = (message.Id, message.Hour, message.Flags, message.Body.ToArray());
        message.Return();
        return result;
    }
}
