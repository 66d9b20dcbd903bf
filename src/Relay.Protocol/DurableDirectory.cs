using System.Runtime.InteropServices;

namespace Relay.Protocol;

/// <summary>
/// Names that survive a power loss. A file's fsync makes its bytes durable, not its name: a new
/// directory, file or rename is durable once the directory holding the name is fsynced (POSIX; ext4
/// without a journal and others lose it otherwise). RocksDB does this for its own files; the relay
/// does it for the directories it makes and its identity file, the client for its profile
/// (<see cref="WritePrivateFile"/>).
/// </summary>
public static partial class DurableDirectory
{
    /// <summary>
    /// <see cref="Directory.CreateDirectory(string)"/>, then fsyncs the parent of every level it
    /// made, so that the directory is still there after a power loss. <paramref name="unixMode"/>:
    /// the mode of the levels it makes (not on Windows).
    /// </summary>
    public static void Create(string path, UnixFileMode? unixMode = null)
    {
        var full = Path.GetFullPath(path);
        // The levels that do not exist yet, the deepest first.
        var missing = new List<string>();
        for (var level = full; !string.IsNullOrEmpty(level) && !Directory.Exists(level); level = Path.GetDirectoryName(level))
        {
            missing.Add(level);
        }
        if (unixMode is { } mode && !OperatingSystem.IsWindows())
        {
            Directory.CreateDirectory(full, mode);
        }
        else
        {
            Directory.CreateDirectory(full);
        }
        for (int i = missing.Count - 1; i >= 0; i--)
        {
            if (Path.GetDirectoryName(missing[i]) is { Length: > 0 } parent)
            {
                Sync(parent);
            }
        }
    }

    /// <summary>
    /// Writes <paramref name="path"/> whole or not at all, and durably: <paramref name="write"/> fills
    /// a temporary file beside it (created, and kept, readable by its owner only), which is fsynced,
    /// renamed to <paramref name="path"/>, and the directory fsynced, so that after a power loss the
    /// file is the new one, never a torn or an older one. Without <paramref name="overwrite"/> an
    /// existing file is left as it is and <see cref="IOException"/> thrown.
    /// </summary>
    public static void WritePrivateFile(string path, Action<Stream> write, bool overwrite)
    {
        const UnixFileMode OwnerOnly = UnixFileMode.UserRead | UnixFileMode.UserWrite;
        var tmp = path + ".tmp";
        var options = new FileStreamOptions { Mode = FileMode.Create, Access = FileAccess.Write };
        if (!OperatingSystem.IsWindows()) options.UnixCreateMode = OwnerOnly;
        using (var stream = new FileStream(tmp, options))
        {
            write(stream);
            stream.Flush(flushToDisk: true);
        }
        // A temporary file left by an earlier run keeps its mode: set it again.
        if (!OperatingSystem.IsWindows()) File.SetUnixFileMode(tmp, OwnerOnly);
        File.Move(tmp, path, overwrite);
        Sync(Path.GetDirectoryName(Path.GetFullPath(path))!);
    }

    /// <summary>
    /// fsyncs a directory, so that the names made, renamed or removed in it so far survive a power
    /// loss. A file system that cannot fsync a directory (EINVAL) needs nothing, and a directory
    /// this user may write in but not read (mode -wx, EACCES) cannot be opened to fsync: both are
    /// left as they are. Other errors throw <see cref="IOException"/>.
    /// </summary>
    public static void Sync(string directory)
    {
        if (OperatingSystem.IsWindows())
        {
            return;   // NTFS journals names; there is no directory handle to flush
        }
        int fd = Open(directory, ReadOnly | CloseOnExec);
        if (fd < 0)
        {
            int errno = Marshal.GetLastPInvokeError();
            if (errno == EAcces)
            {
                return;
            }
            throw new IOException($"cannot open the directory {directory} to fsync it: {Marshal.GetPInvokeErrorMessage(errno)}");
        }
        try
        {
            if (Fsync(fd) != 0)
            {
                int errno = Marshal.GetLastPInvokeError();
                if (errno != EInval)
                {
                    throw new IOException($"fsync of the directory {directory} failed: {Marshal.GetPInvokeErrorMessage(errno)}");
                }
            }
        }
        finally
        {
            _ = Close(fd);
        }
    }

    // Linux values, the same on x86-64 and arm64 (O_DIRECTORY is not: a directory opens read-only without it).
    private const int ReadOnly = 0;
    private const int CloseOnExec = 0x80000;     // O_CLOEXEC
    private const int EAcces = 13;
    private const int EInval = 22;

    [LibraryImport("libc", EntryPoint = "open", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int Open(string path, int flags);

    [LibraryImport("libc", EntryPoint = "fsync", SetLastError = true)]
    private static partial int Fsync(int fd);

    [LibraryImport("libc", EntryPoint = "close", SetLastError = true)]
    private static partial int Close(int fd);
}
