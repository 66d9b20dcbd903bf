using Relay.Storage;

namespace Relay.Bench;

/// <summary>The group commits of an in-process relay during a run: how many, how many operations each, how long each took.</summary>
public readonly record struct CommitSummary(int Commits, double OperationsPerCommit, double P50Ms, double P99Ms, double MaxMs);

/// <summary>
/// Records an in-process relay's group commits (the store's <see cref="QueueStore.Committed"/>: the
/// batch's write and fsync), so that a run's latency can be read against what its disk did: a paced
/// p99 of several milliseconds with commits at p99 0.3 ms is the relay's; with commits at p99 5 ms it
/// is the disk's.
/// </summary>
public sealed class CommitRecorder
{
    private readonly Lock _lock = new();
    private readonly List<double> _seconds = [];
    private long _operations;

    /// <summary>For <see cref="QueueStore.Committed"/> (raised on the store's writer thread).</summary>
    public void Record(StoreCommit commit)
    {
        lock (_lock)
        {
            _seconds.Add(commit.FsyncSeconds);
            _operations += commit.Operations;
        }
    }

    /// <summary>The commits so far; null when there were none.</summary>
    public CommitSummary? Summarize()
    {
        double[] sorted;
        long operations;
        lock (_lock)
        {
            sorted = [.. _seconds];
            operations = _operations;
        }
        if (sorted.Length == 0)
        {
            return null;
        }
        Array.Sort(sorted);
        return new CommitSummary(sorted.Length, (double)operations / sorted.Length,
            Rank.Of(sorted, 0.50) * 1000.0, Rank.Of(sorted, 0.99) * 1000.0, sorted[^1] * 1000.0);
    }
}

/// <summary>Percentiles by nearest rank, as every figure of <c>relay bench</c> is reported.</summary>
public static class Rank
{
    /// <summary>The value at or below which a fraction <paramref name="p"/> of <paramref name="sorted"/> (ascending, not empty) lies.</summary>
    public static T Of<T>(IReadOnlyList<T> sorted, double p) => sorted[Math.Min(sorted.Count - 1, Math.Max(0, (int)Math.Ceiling(p * sorted.Count) - 1))];
}
