namespace Relay.Server.Hosting;

/// <summary>
/// Decides, once per tick, whether the relay should collect garbage now: when it has gone quiet
/// (allocated less than <paramref name="quietBytes"/> since the last tick) after allocating at least
/// <paramref name="leftBytes"/> since the last full collection. Handshakes leave about 12 KB of garbage
/// each; after a burst of them (a restart's reconnections) part of the collector's budget for new objects
/// (12 MiB) is garbage, and on a quiet relay nothing may trigger the next collection for hours. Counted
/// from the last full collection, not the last of any generation: what younger collections promoted
/// during the burst stays until a full one. The collection itself (RelayMaintenance) also gives the
/// collector's free memory back: 10,000 idle TLS connections measured 235–255 MB without it and 225 MB
/// with it (docs/PERFORMANCE.md, fifteenth and sixteenth rounds). The allocation rate that counts as
/// quiet bounds how often it can run: at most once per <paramref name="leftBytes"/> ÷
/// <paramref name="quietBytes"/> ticks (64 at the defaults), and never while traffic allocates (the
/// runtime then collects as usual).
/// </summary>
internal sealed class QuietCollector(long leftBytes = QuietCollector.DefaultLeftBytes, long quietBytes = QuietCollector.DefaultQuietBytes)
{
    /// <summary>Garbage worth a collection: a third of the collector's 12 MiB budget.</summary>
    public const long DefaultLeftBytes = 4L << 20;

    /// <summary>Allocation per tick (a second) that still counts as quiet: about 90 messages' worth.</summary>
    public const long DefaultQuietBytes = 64L << 10;

    /// <summary>Memory a compaction must give back to be worth its pause (see <see cref="WorthCompacting"/>).</summary>
    public const long DefaultCompactionGainBytes = 8L << 20;

    /// <summary>
    /// After the sweep: whether an aggressive, compacting collection is worth its pause (about as long
    /// again as the sweep's; 0.06–0.14 s at 10,000 connections). It gives back what the collector holds
    /// committed beyond its heap (<paramref name="committed"/> − <paramref name="heap"/>) and the free
    /// space inside the heap (<paramref name="fragmented"/>); at least <paramref name="gain"/> of it.
    /// After a burst of handshakes that was 9–27 MB; a relay that a light trickle keeps collecting this
    /// way is not made to pause twice each time for little.
    /// </summary>
    public static bool WorthCompacting(long committed, long heap, long fragmented, long gain = DefaultCompactionGainBytes)
        => Math.Max(0, committed - heap) + fragmented >= gain;

    private long _lastAllocated = -1;
    private long _allocatedAtCollection;
    private int _lastCollections = -1;

    /// <summary>
    /// One tick: <paramref name="allocated"/> is the process's total allocated bytes and
    /// <paramref name="collections"/> its count of full (generation-2) collections. True: collect now (then call
    /// <see cref="Collected"/> with both read again).
    /// </summary>
    public bool Tick(long allocated, int collections)
    {
        if (_lastAllocated < 0 || collections != _lastCollections)
        {
            // First tick, or the runtime collected fully since the last one: what is left is counted from
            // here (not what the tick's allocations after that collection left: never collect for
            // garbage that may not be there).
            _lastCollections = collections;
            _allocatedAtCollection = allocated;
            _lastAllocated = allocated;
            return false;
        }
        bool quiet = allocated - _lastAllocated < quietBytes;
        _lastAllocated = allocated;
        return quiet && allocated - _allocatedAtCollection >= leftBytes;
    }

    /// <summary>After a collection this decided on: nothing is left to collect for until more is allocated.</summary>
    public void Collected(long allocated, int collections)
    {
        _lastAllocated = allocated;
        _allocatedAtCollection = allocated;
        _lastCollections = collections;
    }
}
