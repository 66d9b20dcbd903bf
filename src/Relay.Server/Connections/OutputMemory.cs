namespace Relay.Server.Connections;

/// <summary>
/// The output buffers of every connection of one relay, counted together: the arrays they hold for
/// frames written and not yet sent. Each connection may buffer up to
/// <see cref="RelayServerOptions.MaxOutputBuffer"/> for a client that reads slowly; while the total is
/// at the budget, a connection buffers at most <see cref="RelayServerOptions.OutputBufferWhenMemoryIsShort"/>
/// before it stops reading requests and taking deliveries, so clients that do not read cannot make the
/// relay hold the per-connection maximum many times over. A client that reads is never stuck: its
/// buffer empties as it reads and it goes on.
/// </summary>
internal sealed class OutputMemory(long budget)
{
    private long _held;

    /// <summary>The configured budget; 0: no relay-wide bound.</summary>
    public long Budget { get; } = budget;

    /// <summary>Bytes of arrays output buffers hold now.</summary>
    public long Held => Volatile.Read(ref _held);

    public bool Short => Budget > 0 && Volatile.Read(ref _held) >= Budget;

    /// <summary>An output buffer grew (positive) or gave its array back (negative).</summary>
    public void Add(long bytes) => Interlocked.Add(ref _held, bytes);
}
