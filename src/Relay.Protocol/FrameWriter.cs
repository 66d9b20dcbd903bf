using System.Buffers;
using System.Buffers.Binary;
using System.Security.Cryptography;

namespace Relay.Protocol;

/// <summary>
/// Writes whole frames into an <see cref="IBufferWriter{T}"/>. Each frame is written into one
/// contiguous span obtained with its exact size, so a MAC can be computed over it in place.
/// </summary>
public static class FrameWriter
{
    private static void CheckLength(ReadOnlySpan<byte> field, int length, string name)
    {
        if (field.Length != length)
        {
            throw new ArgumentException($"{name} must be {length} bytes, got {field.Length}", name);
        }
    }

    private static Span<byte> Begin(IBufferWriter<byte> writer, FrameType type, uint correlationId, int payloadLength, out int total)
    {
        total = ProtocolConstants.LengthPrefixSize + ProtocolConstants.HeaderSize + payloadLength;
        var span = writer.GetSpan(total).Slice(0, total);
        BinaryPrimitives.WriteUInt32BigEndian(span, (uint)(ProtocolConstants.HeaderSize + payloadLength));
        span[4] = (byte)type;
        BinaryPrimitives.WriteUInt32BigEndian(span.Slice(5), correlationId);
        return span;
    }

    /// <summary>A frame with an empty payload: OK, PONG, EMPTY, PING.</summary>
    public static void WriteEmpty(IBufferWriter<byte> writer, FrameType type, uint correlationId)
    {
        Begin(writer, type, correlationId, 0, out int total);
        writer.Advance(total);
    }

    public static void WriteError(IBufferWriter<byte> writer, uint correlationId, ErrorCode code)
    {
        var span = Begin(writer, FrameType.Err, correlationId, 1, out int total);
        span[9] = (byte)code;
        writer.Advance(total);
    }

    /// <summary>ERR VERSION with the server's supported range.</summary>
    public static void WriteVersionError(IBufferWriter<byte> writer, ushort min, ushort max)
    {
        var span = Begin(writer, FrameType.Err, 0, 5, out int total);
        span[9] = (byte)ErrorCode.Version;
        BinaryPrimitives.WriteUInt16BigEndian(span.Slice(10), min);
        BinaryPrimitives.WriteUInt16BigEndian(span.Slice(12), max);
        writer.Advance(total);
    }

    public static void WriteHello(IBufferWriter<byte> writer, ushort minVersion, ushort maxVersion)
    {
        var span = Begin(writer, FrameType.Hello, 0, 4, out int total);
        BinaryPrimitives.WriteUInt16BigEndian(span.Slice(9), minVersion);
        BinaryPrimitives.WriteUInt16BigEndian(span.Slice(11), maxVersion);
        writer.Advance(total);
    }

    public const int WelcomePayloadSize = 2 + 4 + 4 + ProtocolConstants.SessionIdSize + ProtocolConstants.KeySize;

    public static void WriteWelcome(IBufferWriter<byte> writer, ushort version, int maxFrame, int maxMessage,
        ReadOnlySpan<byte> sessionId, ReadOnlySpan<byte> sessionKey)
    {
        CheckLength(sessionId, ProtocolConstants.SessionIdSize, nameof(sessionId));
        CheckLength(sessionKey, ProtocolConstants.KeySize, nameof(sessionKey));
        var span = Begin(writer, FrameType.Welcome, 0, WelcomePayloadSize, out int total);
        var p = span.Slice(9);
        BinaryPrimitives.WriteUInt16BigEndian(p, version);
        BinaryPrimitives.WriteUInt32BigEndian(p.Slice(2), (uint)maxFrame);
        BinaryPrimitives.WriteUInt32BigEndian(p.Slice(6), (uint)maxMessage);
        sessionId.CopyTo(p.Slice(10, ProtocolConstants.SessionIdSize));
        sessionKey.CopyTo(p.Slice(10 + ProtocolConstants.SessionIdSize, ProtocolConstants.KeySize));
        writer.Advance(total);
    }

    public static void WriteIds(IBufferWriter<byte> writer, uint correlationId, ReadOnlySpan<byte> recipientId,
        ReadOnlySpan<byte> senderId, ReadOnlySpan<byte> serverDhKey)
    {
        CheckLength(recipientId, ProtocolConstants.IdSize, nameof(recipientId));
        CheckLength(senderId, ProtocolConstants.IdSize, nameof(senderId));
        CheckLength(serverDhKey, ProtocolConstants.KeySize, nameof(serverDhKey));
        var span = Begin(writer, FrameType.Ids, correlationId, 2 * ProtocolConstants.IdSize + ProtocolConstants.KeySize, out int total);
        var p = span.Slice(9);
        recipientId.CopyTo(p);
        senderId.CopyTo(p.Slice(ProtocolConstants.IdSize));
        serverDhKey.CopyTo(p.Slice(2 * ProtocolConstants.IdSize));
        writer.Advance(total);
    }

    public static void WriteEnd(IBufferWriter<byte> writer, ReadOnlySpan<byte> recipientId)
    {
        CheckLength(recipientId, ProtocolConstants.IdSize, nameof(recipientId));
        var span = Begin(writer, FrameType.End, 0, ProtocolConstants.IdSize, out int total);
        recipientId.CopyTo(span.Slice(9));
        writer.Advance(total);
    }

    /// <summary>
    /// MSG: <c>recipientId ‖ msgId ‖ nonce ‖ ChaCha20-Poly1305(hour ‖ flags ‖ body) ‖ tag</c>, sealed in place
    /// under the queue's delivery key with a fresh random nonce.
    /// </summary>
    public static void WriteMsg(IBufferWriter<byte> writer, uint correlationId, ReadOnlySpan<byte> recipientId,
        ulong messageId, uint hour, byte flags, ReadOnlySpan<byte> body, DeliveryCipher deliveryCipher) =>
        WriteMsg(writer, correlationId, recipientId, messageId, hour, flags, body, deliveryCipher, null);

    /// <summary>
    /// MSG sealed with the next nonce of <paramref name="nonces"/> (null: a fresh random nonce).
    /// </summary>
    public static void WriteMsg(IBufferWriter<byte> writer, uint correlationId, ReadOnlySpan<byte> recipientId,
        ulong messageId, uint hour, byte flags, ReadOnlySpan<byte> body, DeliveryCipher deliveryCipher, NonceSequence? nonces)
    {
        CheckLength(recipientId, ProtocolConstants.IdSize, nameof(recipientId));
        var span = Begin(writer, FrameType.Msg, correlationId, ProtocolConstants.MsgOverhead + body.Length, out int total);
        var p = span.Slice(9);
        recipientId.CopyTo(p);
        BinaryPrimitives.WriteUInt64BigEndian(p.Slice(ProtocolConstants.IdSize), messageId);
        var aad = p.Slice(0, ProtocolConstants.IdSize + 8);
        var nonce = p.Slice(ProtocolConstants.IdSize + 8, ProtocolConstants.NonceSize);
        if (nonces is null)
        {
            RandomNumberGenerator.Fill(nonce);
        }
        else
        {
            nonces.Next(nonce);
        }
        var sealedPart = p.Slice(ProtocolConstants.IdSize + 8 + ProtocolConstants.NonceSize);
        var plain = sealedPart.Slice(0, ProtocolConstants.DeliveryHeaderSize + body.Length);
        BinaryPrimitives.WriteUInt32BigEndian(plain, hour);
        plain[4] = flags;
        body.CopyTo(plain.Slice(ProtocolConstants.DeliveryHeaderSize));
        deliveryCipher.Encrypt(nonce, plain, plain, sealedPart.Slice(plain.Length, ProtocolConstants.TagSize), aad);
        writer.Advance(total);
    }

    /// <summary>NEW: <c>recipientKey ‖ recipientDhKey ‖ u8 passwordLength ‖ password</c>.</summary>
    public static void WriteNew(IBufferWriter<byte> writer, uint correlationId, ReadOnlySpan<byte> recipientKey,
        ReadOnlySpan<byte> recipientDhKey, ReadOnlySpan<byte> password)
    {
        if (password.Length > 255)
        {
            throw new ArgumentException("password longer than 255 bytes", nameof(password));
        }
        CheckLength(recipientKey, ProtocolConstants.KeySize, nameof(recipientKey));
        CheckLength(recipientDhKey, ProtocolConstants.KeySize, nameof(recipientDhKey));
        var span = Begin(writer, FrameType.New, correlationId, 2 * ProtocolConstants.KeySize + 1 + password.Length, out int total);
        var p = span.Slice(9);
        recipientKey.CopyTo(p);
        recipientDhKey.CopyTo(p.Slice(ProtocolConstants.KeySize));
        p[2 * ProtocolConstants.KeySize] = (byte)password.Length;
        password.CopyTo(p.Slice(2 * ProtocolConstants.KeySize + 1));
        writer.Advance(total);
    }

    /// <summary>
    /// A queue command <c>queueId ‖ args1 ‖ args2 ‖ mac</c>; the MAC is computed in place with
    /// <paramref name="authKey"/>, or left zero when the key is empty (unsecured SEND).
    /// </summary>
    public static void WriteQueueCommand(IBufferWriter<byte> writer, FrameType type, uint correlationId,
        ReadOnlySpan<byte> queueId, ReadOnlySpan<byte> args1, ReadOnlySpan<byte> args2, ReadOnlySpan<byte> authKey) =>
        WriteQueueCommand(writer, type, correlationId, queueId, args1, args2, authKey, null);

    /// <summary>A queue command whose MAC comes from <paramref name="macKey"/> (null: none, the MAC is zero).</summary>
    public static void WriteQueueCommand(IBufferWriter<byte> writer, FrameType type, uint correlationId,
        ReadOnlySpan<byte> queueId, ReadOnlySpan<byte> args1, ReadOnlySpan<byte> args2, MacKey? macKey) =>
        WriteQueueCommand(writer, type, correlationId, queueId, args1, args2, default, macKey);

    private static void WriteQueueCommand(IBufferWriter<byte> writer, FrameType type, uint correlationId,
        ReadOnlySpan<byte> queueId, ReadOnlySpan<byte> args1, ReadOnlySpan<byte> args2, ReadOnlySpan<byte> authKey, MacKey? macKey)
    {
        CheckLength(queueId, ProtocolConstants.IdSize, nameof(queueId));
        int payload = ProtocolConstants.IdSize + args1.Length + args2.Length + ProtocolConstants.MacSize;
        var span = Begin(writer, type, correlationId, payload, out int total);
        var p = span.Slice(9);
        queueId.CopyTo(p);
        args1.CopyTo(p.Slice(ProtocolConstants.IdSize));
        args2.CopyTo(p.Slice(ProtocolConstants.IdSize + args1.Length));
        var mac = span.Slice(total - ProtocolConstants.MacSize);
        if (macKey is not null)
        {
            macKey.Compute(span.Slice(4, total - 4 - ProtocolConstants.MacSize), mac);
        }
        else if (authKey.IsEmpty)
        {
            mac.Clear();
        }
        else
        {
            RelayCrypto.ComputeMac(authKey, span.Slice(4, total - 4 - ProtocolConstants.MacSize), mac);
        }
        writer.Advance(total);
    }
}
