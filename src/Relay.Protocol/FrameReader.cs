using System.Buffers;
using System.Buffers.Binary;

namespace Relay.Protocol;

/// <summary>
/// Pure frame splitter: no I/O, no allocation.
/// <code>
/// +--------------------+---------+------------------+-----------------------+
/// | length (u32, BE)   | type u8 | correlation u32  | payload (length - 5)  |
/// +--------------------+---------+------------------+-----------------------+
/// </code>
/// </summary>
public static class FrameReader
{
    /// <summary>
    /// Slices one complete frame (type, correlation id and payload, without the length prefix) off the
    /// front of <paramref name="buffer"/>. Returns false when more bytes are needed. Throws
    /// <see cref="ProtocolException"/> as soon as the length prefix is known to be out of range, before
    /// any of the body is waited for.
    /// </summary>
    public static bool TryRead(ref ReadOnlySequence<byte> buffer, int maxFrameLength, out ReadOnlySequence<byte> frame)
    {
        if (buffer.Length < ProtocolConstants.LengthPrefixSize)
        {
            frame = default;
            return false;
        }

        uint length;
        var first = buffer.FirstSpan;
        if (first.Length >= ProtocolConstants.LengthPrefixSize)
        {
            length = BinaryPrimitives.ReadUInt32BigEndian(first);
        }
        else
        {
            Span<byte> prefix = stackalloc byte[ProtocolConstants.LengthPrefixSize];
            buffer.Slice(0, ProtocolConstants.LengthPrefixSize).CopyTo(prefix);
            length = BinaryPrimitives.ReadUInt32BigEndian(prefix);
        }

        if (length > (uint)maxFrameLength)
        {
            ProtocolException.ThrowFrameTooLarge(length, maxFrameLength);
        }
        if (length < ProtocolConstants.HeaderSize)
        {
            ProtocolException.ThrowFrameTooShort(length);
        }

        long total = ProtocolConstants.LengthPrefixSize + (long)length;
        if (buffer.Length < total)
        {
            frame = default;
            return false;
        }

        frame = buffer.Slice(ProtocolConstants.LengthPrefixSize, length);
        buffer = buffer.Slice(total);
        return true;
    }

    /// <summary>
    /// Returns the frame as one span: the sequence's own memory when it is one segment, else a copy
    /// into <paramref name="scratch"/> (which must hold <c>maxFrameLength</c> bytes).
    /// </summary>
    public static ReadOnlySpan<byte> AsSpan(in ReadOnlySequence<byte> frame, byte[] scratch)
    {
        if (frame.IsSingleSegment)
        {
            return frame.FirstSpan;
        }
        frame.CopyTo(scratch);
        return scratch.AsSpan(0, (int)frame.Length);
    }
}

/// <summary>A parsed frame over contiguous bytes: type, correlation id and payload.</summary>
public readonly ref struct FrameView
{
    /// <summary>The frame from the type byte to its end (the MAC input starts here).</summary>
    public readonly ReadOnlySpan<byte> Raw;

    public FrameView(ReadOnlySpan<byte> raw)
    {
        if (raw.Length < ProtocolConstants.HeaderSize)
        {
            ProtocolException.ThrowFrameTooShort(raw.Length);
        }
        Raw = raw;
    }

    public FrameType Type => (FrameType)Raw[0];
    public uint CorrelationId => BinaryPrimitives.ReadUInt32BigEndian(Raw.Slice(1));
    public ReadOnlySpan<byte> Payload => Raw.Slice(ProtocolConstants.HeaderSize);
}

/// <summary>
/// A queue command: <c>queueId[24] ‖ args ‖ mac[16]</c> (docs/PROTOCOL.md §6).
/// </summary>
public readonly ref struct QueueCommand
{
    public readonly ReadOnlySpan<byte> QueueId;
    public readonly ReadOnlySpan<byte> Args;
    public readonly ReadOnlySpan<byte> Mac;
    /// <summary>type ‖ corr ‖ queueId ‖ args: the bytes the MAC covers.</summary>
    public readonly ReadOnlySpan<byte> MacInput;

    private QueueCommand(ReadOnlySpan<byte> raw)
    {
        var payload = raw.Slice(ProtocolConstants.HeaderSize);
        QueueId = payload.Slice(0, ProtocolConstants.IdSize);
        Args = payload.Slice(ProtocolConstants.IdSize, payload.Length - ProtocolConstants.IdSize - ProtocolConstants.MacSize);
        Mac = payload.Slice(payload.Length - ProtocolConstants.MacSize);
        MacInput = raw.Slice(0, raw.Length - ProtocolConstants.MacSize);
    }

    /// <summary>Parses the queue header; false when the payload is shorter than id + MAC + <paramref name="minArgs"/>.</summary>
    public static bool TryParse(in FrameView frame, int minArgs, int maxArgs, out QueueCommand command)
    {
        int argsLength = frame.Payload.Length - ProtocolConstants.IdSize - ProtocolConstants.MacSize;
        if (argsLength < 0 || argsLength < minArgs || argsLength > maxArgs)
        {
            command = default;
            return false;
        }
        command = new QueueCommand(frame.Raw);
        return true;
    }
}
