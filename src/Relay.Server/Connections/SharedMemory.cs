namespace Relay.Server.Connections;

/// <summary>
/// Memory that every connection of one relay holds for one purpose, counted together against a
/// budget. Three are kept (RelayServerContext): the output buffers (frames written and not yet sent),
/// the bodies of SENDs in flight (read, not yet answered: waiting for their group commit), and the
/// derived auth keys connections cache (<see cref="SessionKeys"/>, which drops a connection's keys
/// instead of pausing it). For the first two, each
/// connection may hold up to its own limit (<see cref="RelayServerOptions.MaxOutputBuffer"/>,
/// <see cref="RelayServerOptions.MaxInFlightBytesPerConnection"/>); while the total is at the budget,
/// a connection holds at most a small limit (<see cref="RelayServerOptions.OutputBufferWhenMemoryIsShort"/>,
/// <see cref="RelayServerOptions.InFlightBytesWhenMemoryIsShort"/>) before it stops reading requests
/// (and, for output, taking deliveries), so many connections cannot make the relay hold the
/// per-connection maximum many times over. A connection is never stuck: what it holds goes as its
/// client reads or as its writes are committed, and it goes on.
/// </summary>
internal sealed class SharedMemory(long budget)
{
    private long _held;

    /// <summary>The configured budget; 0: no relay-wide bound.</summary>
    public long Budget { get; } = budget;

    /// <summary>Bytes held now.</summary>
    public long Held => Volatile.Read(ref _held);

    public bool Short => Budget > 0 && Volatile.Read(ref _held) >= Budget;

    /// <summary>A connection took (positive) or gave back (negative) bytes.</summary>
    public void Add(long bytes) => Interlocked.Add(ref _held, bytes);
}
