using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using Microsoft.Extensions.Logging;
using Microsoft.Win32.SafeHandles;
using Relay.Protocol;
using Relay.Server.Metrics;
using Relay.Storage;

namespace Relay.Server.Hosting;

/// <summary>What a backup made: its directory, its files, and how long it took.</summary>
public sealed class BackupResult
{
    public required string Path { get; init; }
    public required int Files { get; init; }
    public required long Bytes { get; init; }
    public required double Seconds { get; init; }
    /// <summary>Older backups removed after this one to keep <c>--backup-keep</c> of them (full paths, oldest first).</summary>
    public required IReadOnlyList<string> Removed { get; init; }
}

/// <summary>
/// Backups of a relay: each a data directory of its own, <c>&lt;backup dir&gt;/&lt;UTC time&gt;/</c>
/// with <c>identity.pfx</c> and <c>queues/</c>, that <c>relay serve --data</c> starts from (same
/// address, every queue and message as at the backup). Made while the relay serves
/// (<c>POST /admin/backup</c>, one at a time) or of a stopped relay (<c>relay backup</c>,
/// <see cref="StoppedRelayBackup"/>). It is made as <c>&lt;name&gt;.partial</c> and renamed when
/// whole, so a directory without that suffix is always a complete backup. After each backup the
/// oldest are removed so that <see cref="Keep"/> remain. Backups into one directory (of relays
/// sharing it, or <c>relay backup</c> runs) are made one after the other: each holds the lock of
/// <see cref="LockFileName"/> there from its start to its removals.
/// </summary>
internal sealed partial class RelayBackups(QueueStore store, string dataDirectory, string? backupDirectory, int keep,
    TimeProvider clock, ILogger logger, RelayMetrics? metrics)
{
    private const string PartialSuffix = ".partial";
    private const UnixFileMode OwnerOnly = UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute;
    private readonly SemaphoreSlim _one = new(1, 1);

    /// <summary>Held while a backup is being made (tests hold it to be one).</summary>
    internal SemaphoreSlim Gate => _one;

    public string Root { get; } = backupDirectory ?? Path.Combine(dataDirectory, "backups");

    /// <summary>Called with the partial directory once it holds the whole backup, before its rename (tests).</summary>
    internal Action<string>? WhileMaking;

    /// <summary>Called when another backup into <see cref="Root"/> is being made and this one waits for it (tests).</summary>
    internal Action? WaitingForAnother;

    /// <summary>
    /// How long a backup waits for another one into <see cref="Root"/> (of another relay, or a
    /// <c>relay backup</c> run) before it gives up, the directory busy. Backups into one directory take
    /// milliseconds with hard links and a few minutes at most copied to another file system: a lock
    /// held for longer belongs to a backup that is stuck (a hung file system, a stopped process).
    /// </summary>
    internal TimeSpan WaitForAnotherAtMost { get; set; } = DefaultWaitForAnother;

    internal static readonly TimeSpan DefaultWaitForAnother = TimeSpan.FromMinutes(10);

    /// <summary>Complete backups kept after each backup, the newest; 0: every one.</summary>
    public int Keep { get; } = keep;

    /// <summary>Null when another backup is being made; throws <see cref="BackupException"/> when this one fails.</summary>
    public async Task<BackupResult?> CreateAsync()
    {
        if (!_one.Wait(0))
        {
            return null;
        }
        try
        {
            // The flush and the file copies block: off the admin listener's threads.
            return await Task.Run(Create).ConfigureAwait(false);
        }
        finally
        {
            _one.Release();
        }
    }

    /// <summary>Makes one backup, then removes the oldest beyond <see cref="Keep"/>; throws <see cref="BackupException"/> when it fails.</summary>
    internal BackupResult Create()
    {
        var watch = Stopwatch.StartNew();
        SafeFileHandle? held = null;
        try
        {
            string? partial = null;
            string path;
            int files;
            long bytes;
            try
            {
                DurableDirectory.Create(Root, OwnerOnly);
                // Every backup into Root holds its lock file, whichever relay or relay backup run
                // makes it: so a partial directory found here belongs to none in progress, and no
                // other backup takes a name, or removes one, until this one is done.
                held = LockRoot();
                RemovePartials();
                string name = NewName();
                partial = Path.Combine(Root, name + PartialSuffix);
                DurableDirectory.Create(partial, OwnerOnly);
                store.CreateBackup(Path.Combine(partial, "queues"));
                byte[] identity = File.ReadAllBytes(RelayIdentity.PathIn(dataDirectory));
                DurableDirectory.WritePrivateFile(RelayIdentity.PathIn(partial), s => s.Write(identity), overwrite: false);
                WhileMaking?.Invoke(partial);
                (files, bytes) = Measure(partial);
                path = Path.Combine(Root, name);
                Directory.Move(partial, path);
                partial = null;
                DurableDirectory.Sync(Root);
            }
            catch (Exception e) when (e is StoreException or IOException or UnauthorizedAccessException or ObjectDisposedException or TimeoutException)
            {
                if (partial is not null)
                {
                    TryDelete(partial);
                }
                metrics?.BackupFailed();
                string reason = e switch
                {
                    StoreException => e.Message,
                    ObjectDisposedException => "the relay is stopping",
                    TimeoutException => e.Message,
                    _ => $"{e.GetType().Name}: {e.Message}",
                };
                Log.BackupFailed(logger, reason);
                throw new BackupException(reason, e) { DirectoryBusy = e is TimeoutException };
            }
            double seconds = watch.Elapsed.TotalSeconds;
            metrics?.BackupMade(clock.GetUtcNow());
            string full = Path.GetFullPath(path);
            Log.BackupMade(logger, full, files, bytes, seconds);
            // The new backup is whole and counted before any older one goes.
            return new BackupResult { Path = full, Files = files, Bytes = bytes, Seconds = seconds, Removed = RemoveOldest(Path.GetFileName(path)) };
        }
        finally
        {
            held?.Dispose();
        }
    }

    /// <summary>In <see cref="Root"/>: held by every backup made into it while it is made.</summary>
    internal const string LockFileName = ".relay-backup.lock";

    /// <summary>
    /// Opens <see cref="LockFileName"/> in <see cref="Root"/> and takes its lock, waiting while
    /// another backup (of this or another relay, or a <c>relay backup</c> run) holds it, for
    /// <see cref="WaitForAnotherAtMost"/> at most (then <see cref="TimeoutException"/>). The lock is
    /// the system's (flock): it goes with the process that held it, so a crashed backup never leaves
    /// it taken.
    /// </summary>
    private SafeFileHandle LockRoot()
    {
        string path = Path.Combine(Root, LockFileName);
        var waited = Stopwatch.StartNew();
        if (!OperatingSystem.IsLinux())
        {
            // .NET's own lock of a file opened for no sharing (flock, or the sharing mode on Windows).
            for (bool waiting = false; ; waiting = true)
            {
                try
                {
                    return File.OpenHandle(path, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None);
                }
                catch (IOException) when (File.Exists(path))
                {
                    if (!waiting)
                    {
                        WaitingForAnother?.Invoke();
                    }
                    WaitForAnother(waited, path);
                }
            }
        }
        // Opened without .NET, which would take a shared lock of its own (that another backup's
        // open then fails on instead of waiting).
        int fd = Open(path, OpenReadWrite | OpenCreate | OpenCloseOnExec, 0b110_000_000);   // mode 0600
        if (fd < 0)
        {
            throw new IOException($"cannot open {path}: {Marshal.GetPInvokeErrorMessage(Marshal.GetLastPInvokeError())}");
        }
        var handle = new SafeFileHandle(fd, ownsHandle: true);
        try
        {
            // Without blocking, tried again until the limit: a blocking flock cannot be given up.
            for (bool waiting = false; Flock(handle, LockExclusive | LockNonBlocking) != 0; waiting = true)
            {
                int error = Marshal.GetLastPInvokeError();
                if (error == Interrupted)
                {
                    continue;
                }
                if (error != WouldBlock)
                {
                    throw new IOException($"cannot lock {path}: {Marshal.GetPInvokeErrorMessage(error)}");
                }
                if (!waiting)
                {
                    WaitingForAnother?.Invoke();
                }
                WaitForAnother(waited, path);
            }
            return handle;
        }
        catch
        {
            handle.Dispose();
            throw;
        }
    }

    /// <summary>Waits a moment before the lock is tried again; throws <see cref="TimeoutException"/> once <see cref="WaitForAnotherAtMost"/> has passed.</summary>
    private void WaitForAnother(Stopwatch waited, string path)
    {
        if (waited.Elapsed >= WaitForAnotherAtMost)
        {
            throw new TimeoutException($"the backup directory is busy: another backup into it (of another relay, or a relay backup run) has held {path} for {Math.Ceiling(WaitForAnotherAtMost.TotalSeconds)} s; try again when it is done");
        }
        Thread.Sleep(50);
    }

    // Linux's values.
    private const int OpenReadWrite = 2;
    private const int OpenCreate = 0x40;
    private const int OpenCloseOnExec = 0x80000;
    private const int LockExclusive = 2;
    private const int LockNonBlocking = 4;
    private const int Interrupted = 4;   // EINTR
    private const int WouldBlock = 11;   // EWOULDBLOCK

    [LibraryImport("libc", EntryPoint = "open", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int Open(string path, int flags, uint mode);

    [LibraryImport("libc", EntryPoint = "flock", SetLastError = true)]
    private static partial int Flock(SafeFileHandle file, int operation);

    private const string NameFormat = "yyyyMMdd'T'HHmmss'Z'";

    /// <summary>
    /// The time of the newest complete backup in <see cref="Root"/>, read from its name (so that the
    /// metric of the last backup outlives a restart); null when there is none or it cannot be read.
    /// </summary>
    public DateTimeOffset? Newest()
    {
        try
        {
            return Complete().Select(b => (DateTimeOffset?)b.Made).LastOrDefault();
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return null;
        }
    }

    /// <summary>
    /// This relay's complete backups in <see cref="Root"/>, oldest first: by time, then by the suffix
    /// of a second backup in the same second. Only directories named as this class names them and
    /// holding this relay's identity count: anything else there (an operator's files, a backup of
    /// another relay sharing the directory) is not this relay's backup and is left alone. Nor is the
    /// relay's own data directory (or one holding it), although it looks like a backup when the relay
    /// was restored by pointing <c>--data</c> at one: it is the relay's live store now.
    /// </summary>
    private List<(string Path, DateTimeOffset Made, int Number)> Complete()
    {
        var backups = new List<(string Path, DateTimeOffset Made, int Number)>();
        if (!Directory.Exists(Root))
        {
            return backups;
        }
        byte[] identity = File.ReadAllBytes(RelayIdentity.PathIn(dataDirectory));
        foreach (string dir in Directory.EnumerateDirectories(Root))
        {
            string name = Path.GetFileName(dir);
            int dash = name.IndexOf('-', StringComparison.Ordinal);
            string stamp = dash < 0 ? name : name[..dash];
            int number = 1;
            if (DateTimeOffset.TryParseExact(stamp, NameFormat, CultureInfo.InvariantCulture,
                    DateTimeStyles.AssumeUniversal | DateTimeStyles.AdjustToUniversal, out var made)
                && (dash < 0 || (int.TryParse(name.AsSpan(dash + 1), NumberStyles.None, CultureInfo.InvariantCulture, out number) && number >= 2))
                && HoldsIdentity(dir, identity)
                && !HoldsDataDirectory(dir))
            {
                backups.Add((dir, made, number));
            }
        }
        backups.Sort((a, b) => a.Made != b.Made ? a.Made.CompareTo(b.Made) : a.Number.CompareTo(b.Number));
        return backups;
    }

    /// <summary>
    /// True when <paramref name="directory"/> is the relay's data directory or one of its parents,
    /// also when either is reached through a symbolic link (a data directory linked to a backup).
    /// </summary>
    private bool HoldsDataDirectory(string directory)
    {
        string data = RealPath(dataDirectory);
        string dir = RealPath(directory);
        return data == dir || data.StartsWith(dir + Path.DirectorySeparatorChar, StringComparison.Ordinal);
    }

    /// <summary>The absolute path with every symbolic link resolved (where it cannot be resolved: the full path as given).</summary>
    private static string RealPath(string path)
    {
        string full = Path.TrimEndingDirectorySeparator(Path.GetFullPath(path));
        if (OperatingSystem.IsWindows())
        {
            return full;
        }
        byte[] resolved = new byte[4097];   // PATH_MAX and its terminating zero
        if (ResolvePath(full, resolved) == 0)
        {
            return full;
        }
        int length = Array.IndexOf(resolved, (byte)0);
        return System.Text.Encoding.UTF8.GetString(resolved, 0, length < 0 ? resolved.Length : length);
    }

    [LibraryImport("libc", EntryPoint = "realpath", StringMarshalling = StringMarshalling.Utf8)]
    private static partial nint ResolvePath(string path, byte[] resolved);

    private static bool HoldsIdentity(string backup, byte[] identity)
    {
        string path = RelayIdentity.PathIn(backup);
        return File.Exists(path) && new FileInfo(path).Length == identity.Length && File.ReadAllBytes(path).AsSpan().SequenceEqual(identity);
    }

    /// <summary>
    /// Removes the oldest complete backups so that <see cref="Keep"/> remain, never <paramref name="made"/>
    /// (the one just made, even with a clock set back behind older names). A backup that cannot be
    /// removed is logged (event 38) and left; the backup just made stands either way.
    /// </summary>
    private IReadOnlyList<string> RemoveOldest(string made)
    {
        if (Keep <= 0)
        {
            return [];
        }
        List<(string Path, DateTimeOffset Made, int Number)> backups;
        try
        {
            backups = Complete();
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            Log.BackupNotRemoved(logger, Root, e.Message);
            return [];
        }
        backups.RemoveAll(b => Path.GetFileName(b.Path) == made);
        var removed = new List<string>();
        for (int i = 0; i < backups.Count - (Keep - 1); i++)
        {
            string path = Path.GetFullPath(backups[i].Path);
            try
            {
                Directory.Delete(path, recursive: true);
                removed.Add(path);
                Log.BackupRemoved(logger, path, Keep);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                Log.BackupNotRemoved(logger, path, e.Message);
            }
        }
        if (removed.Count > 0)
        {
            TrySync(Root);
        }
        return removed;
    }

    private static void TrySync(string directory)
    {
        try
        {
            DurableDirectory.Sync(directory);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
        }
    }

    /// <summary>The UTC time to the second; a suffix when a backup of the same second exists.</summary>
    private string NewName()
    {
        string stamp = clock.GetUtcNow().UtcDateTime.ToString(NameFormat, CultureInfo.InvariantCulture);
        string name = stamp;
        for (int n = 2; Directory.Exists(Path.Combine(Root, name)); n++)
        {
            name = $"{stamp}-{n}";
        }
        return name;
    }

    /// <summary>
    /// What a backup cut short (a crash, a power loss) left: never a backup, removed. Called holding
    /// the lock of <see cref="Root"/>, so no backup in progress has a partial directory there.
    /// </summary>
    private void RemovePartials()
    {
        foreach (string left in Directory.EnumerateDirectories(Root, "*" + PartialSuffix))
        {
            TryDelete(left);
        }
    }

    private static void TryDelete(string path)
    {
        try
        {
            Directory.Delete(path, recursive: true);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
        }
    }

    private static (int Files, long Bytes) Measure(string path)
    {
        int files = 0;
        long bytes = 0;
        foreach (var file in new DirectoryInfo(path).EnumerateFiles("*", SearchOption.AllDirectories))
        {
            files++;
            bytes += file.Length;
        }
        return (files, bytes);
    }
}

/// <summary>A backup failed; the message says why (RocksDB's error or the file system's), and nothing of it is left.</summary>
public sealed class BackupException(string message, Exception? inner = null) : Exception(message, inner)
{
    /// <summary>True when another backup into the backup directory held it for too long: nothing was wrong with this one.</summary>
    public bool DirectoryBusy { get; init; }
}

/// <summary>
/// <c>relay backup</c>: a backup of a relay that is not running, into the same backup directory and
/// under the same names and retention as <c>POST /admin/backup</c> (for a relay without the admin
/// API, or before it is moved or upgraded). Opening the store advances its id epoch by one, as a
/// start does; nothing else in the data directory changes.
/// </summary>
public static partial class StoppedRelayBackup
{
    /// <summary>
    /// Run as root on a data directory that belongs to another user (the relay's service user, a
    /// systemd dynamic user): the process takes that user's ids (effective user and group, no
    /// supplementary groups), so that the store's new files and the backups belong to the relay as
    /// if it had made them, and a root-owned file never stands in its way later. Returns that user
    /// id, or null when nothing changed (not root, the directory is root's, or not Linux).
    /// </summary>
    public static uint? ActAsOwnerOf(string dataDirectory)
    {
        if (!OperatingSystem.IsLinux() || GetEffectiveUserId() != 0 || !Directory.Exists(dataDirectory))
        {
            return null;
        }
        // statx's layout is the same on every architecture: stx_uid at 20, stx_gid at 24.
        byte[] buffer = new byte[256];
        if (Statx(AtCurrentDirectory, dataDirectory, 0, StatxUid | StatxGid, buffer) != 0)
        {
            throw new BackupException($"cannot read the owner of {dataDirectory}: {Marshal.GetPInvokeErrorMessage(Marshal.GetLastPInvokeError())}");
        }
        uint uid = BitConverter.ToUInt32(buffer, 20);
        uint gid = BitConverter.ToUInt32(buffer, 24);
        if (uid == 0)
        {
            return null;
        }
        if (SetGroups(0, 0) != 0 || SetEffectiveGroupId(gid) != 0 || SetEffectiveUserId(uid) != 0)
        {
            throw new BackupException($"cannot act as the owner of {dataDirectory} (uid {uid}): {Marshal.GetPInvokeErrorMessage(Marshal.GetLastPInvokeError())}");
        }
        return uid;
    }

    private const int AtCurrentDirectory = -100;
    private const uint StatxUid = 0x8;
    private const uint StatxGid = 0x10;

    [LibraryImport("libc", EntryPoint = "statx", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int Statx(int directoryFd, string path, int flags, uint mask, byte[] buffer);

    [LibraryImport("libc", EntryPoint = "geteuid")]
    private static partial uint GetEffectiveUserId();

    [LibraryImport("libc", EntryPoint = "setgroups", SetLastError = true)]
    private static partial int SetGroups(nuint size, nint list);

    [LibraryImport("libc", EntryPoint = "setegid", SetLastError = true)]
    private static partial int SetEffectiveGroupId(uint gid);

    [LibraryImport("libc", EntryPoint = "seteuid", SetLastError = true)]
    private static partial int SetEffectiveUserId(uint uid);

    /// <summary>
    /// Makes one backup of the relay whose data directory is <paramref name="dataDirectory"/>. Throws
    /// <see cref="BackupException"/> saying why not: no relay there, its store locked (the relay is
    /// running, and <c>POST /admin/backup</c> makes a backup of a running relay, or another
    /// <c>relay backup</c> has it open), or the store or file system failed.
    /// </summary>
    public static BackupResult Make(string dataDirectory, string? backupDirectory, int keep, ILogger logger)
    {
        if (!RelayIdentity.Exists(dataDirectory))
        {
            throw new BackupException($"no relay identity in {dataDirectory}; is it the data directory of a relay?");
        }
        string queues = Path.Combine(dataDirectory, "queues");
        if (!Directory.Exists(queues))
        {
            throw new BackupException($"no queue store in {dataDirectory} (the relay has never run)");
        }
        QueueStore store;
        try
        {
            store = QueueStore.Open(new QueueStoreOptions
            {
                Path = queues,
                // Nothing but the backup: no sweeps, no compaction started.
                SweepInterval = TimeSpan.Zero,
                DeferCompactions = true,
            });
        }
        // RocksDB's "IO error: While lock file: …/LOCK: Resource temporarily unavailable" (not any
        // message with "lock" in it: "block checksum mismatch" is a damaged store, not a running relay).
        catch (StoreException e) when (e.Message.Contains("lock file", StringComparison.OrdinalIgnoreCase))
        {
            // The lock says only that another process has the store open: the relay, most of the time, or
            // another `relay backup` of the same directory.
            throw new BackupException($"the relay in {dataDirectory} is running, or another relay backup has its store open (the store is locked); make the backup of a running relay with POST /admin/backup", e);
        }
        catch (StoreException e)
        {
            throw new BackupException($"cannot open the store in {queues}: {e.Message}", e);
        }
        using (store)
        {
            return new RelayBackups(store, dataDirectory, backupDirectory, keep, TimeProvider.System, logger, metrics: null).Create();
        }
    }
}
