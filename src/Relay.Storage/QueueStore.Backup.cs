using System.Buffers.Binary;
using Relay.Storage.Native;

namespace Relay.Storage;

// Backups: an openable copy of the store, made while it serves.
public sealed partial class QueueStore
{
    /// <summary>
    /// Epochs the first open of a backup jumps ahead of the backup's, besides one per second since the
    /// backup was made (see <see cref="NextEpochOfBackup"/>).
    /// </summary>
    public const ulong BackupEpochJump = 1UL << 20;

    /// <summary>
    /// Makes <paramref name="directory"/> (which must not exist; its parent must) a copy of the store
    /// as it is now, which <see cref="Open"/> opens as a store of its own: every write done so far
    /// (each answered one included), table files hard-linked when the directory is on the same file
    /// system (they take space only as this store compacts them away) and copied otherwise, fsynced.
    /// Marked as a backup (the hour it was made in), so that its first open moves its id epoch far
    /// enough ahead (<see cref="NextEpochOfBackup"/>). Writes go on meanwhile; the memtables' flush it
    /// starts runs beside them. Throws <see cref="StoreException"/> with RocksDB's error (a full disk,
    /// a directory that exists or cannot be made), leaving nothing of the copy.
    /// </summary>
    public void CreateBackup(string directory)
    {
        ArgumentException.ThrowIfNullOrEmpty(directory);
        EnterRead();
        try
        {
            _db.Checkpoint(directory);
        }
        finally
        {
            ExitRead();
        }
        try
        {
            // The store's own options, and a small block cache: one key is written.
            using RocksDb copy = RocksDb.Open(directory, Keys.ColumnFamilies, 1 << 20, appendOnlyPrefix: (Cf.Messages, MessageHintPrefix));
            Span<byte> hour = stackalloc byte[4];
            BinaryPrimitives.WriteUInt32BigEndian(hour, NowHour());
            copy.PutSync(Cf.Default, Keys.BackupHourKey, hour);
        }
        catch
        {
            // Unmarked, the copy is not safe to start from: none rather than that one.
            try
            {
                Directory.Delete(directory, recursive: true);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
            }
            throw;
        }
    }

    /// <summary>
    /// The id epoch of a backup's first open. It must not give a queue an id that was given after the
    /// backup was made, by the store it was copied from or by another copy of the same backup started
    /// earlier: a client that received such an id takes a new message with the same or a lower id for
    /// one it processed already, and drops it. A store advances its epoch by one at each open and at
    /// most once per idle-handle eviction (every 30 s). So the backup's epoch jumps by
    /// <see cref="BackupEpochJump"/> (2^20 opens or evictions of the store it was copied from) plus
    /// one per second since the hour the backup was made in: a copy started later is ahead of one
    /// started earlier as long as that one opened less than about once a second. Ids are epoch ‖ a
    /// 32-bit count, so the epoch stays below 2^32: about 136 years of seconds.
    /// </summary>
    internal static ulong NextEpochOfBackup(ulong epoch, uint backupHour, DateTimeOffset now)
    {
        long seconds = Math.Max(0, now.ToUnixTimeSeconds() - (long)backupHour * 3600);
        ulong next = epoch + BackupEpochJump + (ulong)seconds;
        if (next >= MaxEpoch)
        {
            throw new StoreException($"Cannot start from this backup: its message ids would pass their limit (epoch {epoch}, made {seconds} s ago).");
        }
        return next;
    }

    /// <summary>Ids are epoch &lt;&lt; 32 plus a count: the epoch must stay below 2^32 with room for opens after it.</summary>
    private const ulong MaxEpoch = (1UL << 32) - (1UL << 20);
}
