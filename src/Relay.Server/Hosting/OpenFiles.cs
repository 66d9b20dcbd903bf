using System.Runtime.InteropServices;

namespace Relay.Server.Hosting;

/// <summary>
/// The process's open files limit (RLIMIT_NOFILE) against the relay's connections. Every connection
/// is a file descriptor, and so is every file of the store: a relay whose connections take the last
/// descriptors leaves RocksDB none for its next log or table file, and RocksDB then fails every
/// write until it is opened again. So the relay raises its soft limit as far as its hard limit
/// allows for <see cref="RelayServerOptions.MaxConnections"/> plus <see cref="Reserved"/>, and
/// closes connections beyond what the limit leaves at once, as it does beyond the option.
/// </summary>
public static partial class OpenFiles
{
    /// <summary>
    /// Descriptors kept for everything but relay connections: RocksDB's table files (it keeps at most
    /// 512 open), its log, manifest and info log, the admin listener's connections (at most
    /// <see cref="AdminConnections"/>), the runtime's own.
    /// </summary>
    public const int Reserved = 768;

    /// <summary>Concurrent connections of the admin listener (health checks and scrapes need a few); more are closed at once.</summary>
    public const int AdminConnections = 64;

    /// <summary>The limit after raising it, as (soft, hard); null where it cannot be read (not Linux).</summary>
    public readonly record struct Limit(long Soft, long Hard);

    /// <summary>
    /// Raises the soft limit to <paramref name="maxConnections"/> + <see cref="Reserved"/>, or to the hard
    /// limit when that is lower (an unprivileged process cannot go past it); never lowers it.
    /// </summary>
    public static Limit? Raise(int maxConnections)
    {
        if (!OperatingSystem.IsLinux() || GetRLimit(RLimitNoFile, out var limit) != 0)
        {
            return null;
        }
        ulong wanted = (ulong)maxConnections + Reserved;
        if (limit.Current < wanted && limit.Current < limit.Maximum)
        {
            var raised = new RLimit { Current = Math.Min(wanted, limit.Maximum), Maximum = limit.Maximum };
            if (SetRLimit(RLimitNoFile, in raised) == 0)
            {
                limit = raised;
            }
        }
        return new Limit(Clamp(limit.Current), Clamp(limit.Maximum));
    }

    /// <summary>How many relay connections <paramref name="limit"/> leaves room for, at most <paramref name="maxConnections"/> (0: none).</summary>
    public static int ConnectionsAllowed(Limit? limit, int maxConnections) =>
        limit is { } l ? (int)Math.Clamp(l.Soft - Reserved, 0, maxConnections) : maxConnections;

    /// <summary>Why a limit that leaves no room for connections (<see cref="ConnectionsAllowed"/> 0) stops the start.</summary>
    public static string NoRoom(Limit limit) =>
        $"the open files limit ({limit.Soft}, hard limit {limit.Hard}) leaves no room for relay connections: the store and the " +
        $"admin listener keep up to {Reserved} files open; raise it (ulimit -n, LimitNOFILE) to at least {Reserved + 64}";

    private static long Clamp(ulong value) => value > long.MaxValue ? long.MaxValue : (long)value;

    private const int RLimitNoFile = 7;   // RLIMIT_NOFILE on Linux x86-64 and arm64

    [StructLayout(LayoutKind.Sequential)]
    private struct RLimit
    {
        public ulong Current;
        public ulong Maximum;
    }

    [LibraryImport("libc", EntryPoint = "getrlimit", SetLastError = true)]
    private static partial int GetRLimit(int resource, out RLimit limit);

    [LibraryImport("libc", EntryPoint = "setrlimit", SetLastError = true)]
    private static partial int SetRLimit(int resource, in RLimit limit);
}
