using System.Diagnostics;
using System.Globalization;
using Relay.Protocol;
using Relay.Storage;

namespace Relay.Server.Hosting;

/// <summary>What a backup made: its directory, its files, and how long it took.</summary>
public sealed class BackupResult
{
    public required string Path { get; init; }
    public required int Files { get; init; }
    public required long Bytes { get; init; }
    public required double Seconds { get; init; }
}

/// <summary>
/// Backups of a serving relay (<c>POST /admin/backup</c>): each a data directory of its own,
/// <c>&lt;backup dir&gt;/&lt;UTC time&gt;/</c> with <c>identity.pfx</c> and <c>queues/</c>, that
/// <c>relay serve --data</c> starts from (same address, every queue and message as at the backup).
/// One at a time. It is made as <c>&lt;name&gt;.partial</c> and renamed when whole, so a directory
/// without that suffix is always a complete backup.
/// </summary>
internal sealed class RelayBackups(RelayServerContext context)
{
    private const string PartialSuffix = ".partial";
    private const UnixFileMode OwnerOnly = UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute;
    private readonly SemaphoreSlim _one = new(1, 1);

    /// <summary>Held while a backup is being made (tests hold it to be one).</summary>
    internal SemaphoreSlim Gate => _one;

    public string Root { get; } = context.Options.BackupDirectory ?? Path.Combine(context.Options.DataDirectory, "backups");

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

    private BackupResult Create()
    {
        var watch = Stopwatch.StartNew();
        string? partial = null;
        try
        {
            DurableDirectory.Create(Root, OwnerOnly);
            RemovePartials();
            string name = NewName();
            partial = Path.Combine(Root, name + PartialSuffix);
            DurableDirectory.Create(partial, OwnerOnly);
            context.Store.CreateBackup(Path.Combine(partial, "queues"));
            byte[] identity = File.ReadAllBytes(RelayIdentity.PathIn(context.Options.DataDirectory));
            DurableDirectory.WritePrivateFile(RelayIdentity.PathIn(partial), s => s.Write(identity), overwrite: false);
            string path = Path.Combine(Root, name);
            Directory.Move(partial, path);
            partial = null;
            DurableDirectory.Sync(Root);
            (int files, long bytes) = Measure(path);
            var result = new BackupResult { Path = Path.GetFullPath(path), Files = files, Bytes = bytes, Seconds = watch.Elapsed.TotalSeconds };
            context.Metrics.BackupMade(context.Options.Clock.GetUtcNow());
            Log.BackupMade(context.Logger, result.Path, files, bytes, result.Seconds);
            return result;
        }
        catch (Exception e) when (e is StoreException or IOException or UnauthorizedAccessException or ObjectDisposedException)
        {
            if (partial is not null)
            {
                TryDelete(partial);
            }
            context.Metrics.BackupFailed();
            string reason = e switch
            {
                StoreException => e.Message,
                ObjectDisposedException => "the relay is stopping",
                _ => $"{e.GetType().Name}: {e.Message}",
            };
            Log.BackupFailed(context.Logger, reason);
            throw new BackupException(reason, e);
        }
    }

    private const string NameFormat = "yyyyMMdd'T'HHmmss'Z'";

    /// <summary>
    /// The time of the newest complete backup in <see cref="Root"/>, read from its name (so that the
    /// metric of the last backup outlives a restart); null when there is none or it cannot be read.
    /// </summary>
    public DateTimeOffset? Newest()
    {
        DateTimeOffset? newest = null;
        try
        {
            if (!Directory.Exists(Root))
            {
                return null;
            }
            foreach (string dir in Directory.EnumerateDirectories(Root))
            {
                string name = Path.GetFileName(dir);
                int dash = name.IndexOf('-', StringComparison.Ordinal);
                string stamp = dash < 0 ? name : name[..dash];
                if (DateTimeOffset.TryParseExact(stamp, NameFormat, CultureInfo.InvariantCulture,
                        DateTimeStyles.AssumeUniversal | DateTimeStyles.AdjustToUniversal, out var made)
                    && (newest is null || made > newest))
                {
                    newest = made;
                }
            }
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return null;
        }
        return newest;
    }

    /// <summary>The UTC time to the second; a suffix when a backup of the same second exists.</summary>
    private string NewName()
    {
        string stamp = context.Options.Clock.GetUtcNow().UtcDateTime.ToString(NameFormat, CultureInfo.InvariantCulture);
        string name = stamp;
        for (int n = 2; Directory.Exists(Path.Combine(Root, name)); n++)
        {
            name = $"{stamp}-{n}";
        }
        return name;
    }

    /// <summary>What a backup cut short (a crash, a power loss) left: never a backup, removed.</summary>
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
internal sealed class BackupException(string message, Exception inner) : Exception(message, inner);
