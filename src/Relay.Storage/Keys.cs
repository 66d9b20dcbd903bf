using System.Buffers.Binary;

namespace Relay.Storage;

/// <summary>Column family indexes (order of <see cref="Keys.ColumnFamilies"/>).</summary>
internal static class Cf
{
    public const int Default = 0;
    public const int Queues = 1;
    public const int Senders = 2;
    public const int Messages = 3;
    public const int Expiry = 4;
    public const int Idle = 5;
}

/// <summary>Encoders of the on-disk keys and values described at the top of QueueStore.cs.</summary>
internal static class Keys
{
    public static readonly string[] ColumnFamilies = ["default", "queues", "senders", "messages", "expiry", "idle"];

    public const int Id = QueueHandle.IdLength;
    public const int MessageKeyLength = Id + 8;
    public const int HourKeyLength = 4 + Id;
    public const int MessageHeaderLength = 5;          // u32 hour ‖ u8 flags
    public const int QueueRecordLength = 2 + Id + 3 * QueueHandle.KeyLength + 8;
    public const byte QueueRecordVersion = 1;
    public const byte StatusSecured = 1;
    public const byte StatusSuspended = 2;

    public static ReadOnlySpan<byte> EpochKey => "epoch"u8;

    /// <summary>In a backup not started yet only: the whole hour (since the Unix epoch) it was made in.</summary>
    public static ReadOnlySpan<byte> BackupHourKey => "backup"u8;

    public static void MessageKey(Span<byte> key, ReadOnlySpan<byte> recipientId, ulong id)
    {
        recipientId.CopyTo(key);
        BinaryPrimitives.WriteUInt64BigEndian(key[Id..], id);
    }

    /// <summary>Exclusive upper bound of a queue's message keys: recipientId ‖ FF×9 sorts after every recipientId ‖ u64.</summary>
    public static void MessageUpperBound(Span<byte> bound, ReadOnlySpan<byte> recipientId)
    {
        recipientId.CopyTo(bound);
        bound.Slice(Id, 9).Fill(0xFF);
    }

    public static ulong MessageIdOf(ReadOnlySpan<byte> key) => BinaryPrimitives.ReadUInt64BigEndian(key[Id..]);

    /// <summary>hour BE ‖ recipientId: sorted by hour so a sweep reads only what is old enough.</summary>
    public static void HourKey(Span<byte> key, uint hour, ReadOnlySpan<byte> recipientId)
    {
        BinaryPrimitives.WriteUInt32BigEndian(key, hour);
        recipientId.CopyTo(key[4..]);
    }

    public static void QueueRecord(Span<byte> record, QueueHandle q)
    {
        record[0] = QueueRecordVersion;
        record[1] = (byte)((q.SenderKey is null ? 0 : StatusSecured) | (q.Suspended ? StatusSuspended : 0));
        q.SenderId.CopyTo(record[2..]);
        q.RecipientKey.CopyTo(record[(2 + Id)..]);
        q.DeliveryKey.CopyTo(record[(2 + Id + 32)..]);
        Span<byte> senderKey = record.Slice(2 + Id + 64, 32);
        if (q.SenderKey is null)
        {
            senderKey.Clear();
        }
        else
        {
            q.SenderKey.CopyTo(senderKey);
        }
        BinaryPrimitives.WriteUInt32BigEndian(record[(2 + Id + 96)..], q.CreatedHour);
        BinaryPrimitives.WriteUInt32BigEndian(record[(2 + Id + 100)..], q.LastActiveHour);
    }

    public static QueueHandle ParseQueueRecord(ReadOnlySpan<byte> recipientId, ReadOnlySpan<byte> record)
    {
        if (record.Length < QueueRecordLength || record[0] != QueueRecordVersion)
        {
            throw new StoreException($"Unsupported queue record (version {(record.Length > 0 ? record[0] : 0)}, {record.Length} bytes).");
        }
        byte status = record[1];
        return new QueueHandle
        {
            RecipientId = recipientId.ToArray(),
            SenderId = record.Slice(2, Id).ToArray(),
            RecipientKey = record.Slice(2 + Id, 32).ToArray(),
            DeliveryKey = record.Slice(2 + Id + 32, 32).ToArray(),
            SenderKey = (status & StatusSecured) != 0 ? record.Slice(2 + Id + 64, 32).ToArray() : null,
            Suspended = (status & StatusSuspended) != 0,
            CreatedHour = BinaryPrimitives.ReadUInt32BigEndian(record[(2 + Id + 96)..]),
            LastActiveHour = BinaryPrimitives.ReadUInt32BigEndian(record[(2 + Id + 100)..]),
        };
    }
}

/// <summary>Dictionary key over a 24-byte id, so lookups need no string or array allocation.</summary>
internal readonly struct QueueKey : IEquatable<QueueKey>
{
    private readonly ulong _a, _b, _c;

    public QueueKey(ReadOnlySpan<byte> id)
    {
        if (id.Length != QueueHandle.IdLength)
        {
            throw new ArgumentException($"A queue id is {QueueHandle.IdLength} bytes.", nameof(id));
        }
        _a = BinaryPrimitives.ReadUInt64LittleEndian(id);
        _b = BinaryPrimitives.ReadUInt64LittleEndian(id[8..]);
        _c = BinaryPrimitives.ReadUInt64LittleEndian(id[16..]);
    }

    public bool Equals(QueueKey other) => _a == other._a && _b == other._b && _c == other._c;

    public override bool Equals(object? obj) => obj is QueueKey other && Equals(other);

    // HashCode is seeded per process, so clients cannot choose ids that collide in the table.
    public override int GetHashCode() => HashCode.Combine(_a, _b, _c);
}
