using System.Buffers.Binary;
using Relay.Storage.Native;

namespace Relay.Storage;

// Backups: an openable copy of the store, made while it serves.
public sealed partial class QueueStore
{
    /// <summary>
    /// Epochs a backup's copy is ahead of the store it was made from. A store started from a backup
    /// must not give a queue an id that the store it was copied from gave after the backup: a client
    /// that received that id takes a new message with the same or a lower id for one it processed
    /// already, and drops it. The store it was copied from advances its epoch at each open and at
    /// most once per idle-handle eviction (every 30 s), so 2^24 epochs cover about 16 years of it;
    /// the 32-bit epoch leaves room for 255 such restores.
    /// </summary>
    public const ulong BackupEpochMargin = 1UL << 24;

    /// <summary>
    /// Makes <paramref name="directory"/> (which must not exist; its parent must) a copy of the store
    /// as it is now, which <see cref="Open"/> opens as a store of its own: every write done so far
    /// (each answered one included), table files hard-linked when the directory is on the same file
    /// system (they take space only as this store compacts them away) and copied otherwise, fsynced.
    /// Its id epoch is <see cref="BackupEpochMargin"/> ahead, so that a store started from it never
    /// gives a queue an id the store went on to give after the copy. Writes go on meanwhile; the
    /// memtables' flush it starts costs them a little latency. Throws <see cref="StoreException"/>
    /// with RocksDB's error (a full disk, a directory that exists or cannot be made).
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
            AdvanceEpoch(directory, BackupEpochMargin);
        }
        catch
        {
            // Without its epoch ahead the copy is not safe to start from: none rather than that one.
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

    /// <summary>Raises the id epoch stored in the store at <paramref name="directory"/> (not open) by <paramref name="margin"/>, fsynced.</summary>
    internal static void AdvanceEpoch(string directory, ulong margin)
    {
        // The store's own options, and a small block cache: only the one key is read.
        using RocksDb copy = RocksDb.Open(directory, Keys.ColumnFamilies, 1 << 20, appendOnlyPrefix: (Cf.Messages, MessageHintPrefix));
        Span<byte> value = stackalloc byte[8];
        ulong epoch = copy.Get(Cf.Default, Keys.EpochKey, value) == 8 ? BinaryPrimitives.ReadUInt64BigEndian(value) : 0;
        ulong advanced = epoch + margin;
        if (advanced >= MaxEpoch)
        {
            throw new StoreException($"The store's message ids are used up for backups (epoch {epoch}): a store started from this copy could repeat ids.");
        }
        BinaryPrimitives.WriteUInt64BigEndian(value, advanced);
        copy.PutSync(Cf.Default, Keys.EpochKey, value);
    }

    /// <summary>Ids are epoch &lt;&lt; 32 plus a count: the epoch must stay below 2^32 with room for opens after it.</summary>
    private const ulong MaxEpoch = (1UL << 32) - (1UL << 20);
}
