using System.Buffers.Binary;
using System.Security.Cryptography;
using Relay.Protocol;

namespace Relay.Client.EndToEnd;

/// <summary>Why a received envelope was refused. The conversation goes on after any of them.</summary>
public enum EnvelopeError
{
    None,
    /// <summary>Not an envelope of a known version and kind, or a length outside the padding set.</summary>
    Malformed,
    /// <summary>Authentication failed: altered in transit or not from this contact.</summary>
    Tampered,
    /// <summary>An envelope the conversation has moved past: a replay, a redelivery after a lost ACK, or one overtaken by a later envelope.</summary>
    Replayed,
    /// <summary>An envelope implausibly far ahead of the next expected one.</summary>
    Reordered,
}

/// <summary>
/// The end-to-end layer of docs/PROTOCOL.md §11: a per-direction symmetric key chain (each message
/// under a fresh key; the chain moves forward and old keys are erased, so a device's current state
/// does not decrypt its earlier messages), envelopes padded to fixed sizes, and counters that make
/// replays and reordering visible.
/// </summary>
public static class E2eCrypto
{
    public const byte Version = 1;
    public const byte KindJoin = 1;
    public const byte KindMessage = 2;

    /// <summary>Every envelope (SEND body) has one of these lengths.</summary>
    public static readonly int[] PaddedSizes = [256, 1024, 4096, 16384];

    public const int TagSize = 16;
    /// <summary>version, kind, u64 counter.</summary>
    public const int MessageHeaderSize = 1 + 1 + 8;
    /// <summary>version, kind, joiner key, u64 counter.</summary>
    public const int JoinHeaderSize = 1 + 1 + 32 + 8;
    /// <summary>u32 content length inside the sealed part.</summary>
    public const int LengthPrefixSize = 4;

    public static ReadOnlySpan<byte> JoinerToInviterInfo => "relay e2e v1 joiner->inviter"u8;
    public static ReadOnlySpan<byte> InviterToJoinerInfo => "relay e2e v1 inviter->joiner"u8;

    /// <summary>Largest content that fits the largest padded size.</summary>
    public static int MaxContent(byte kind) =>
        PaddedSizes[^1] - (kind == KindJoin ? JoinHeaderSize : MessageHeaderSize) - TagSize - LengthPrefixSize;

    /// <summary>
    /// The two initial chain keys of a conversation:
    /// <c>HKDF-SHA256(X25519(own, peer), salt = inviterKey ‖ joinerKey, info = direction)</c>.
    /// </summary>
    public static (byte[] JoinerToInviter, byte[] InviterToJoiner) InitialChains(ReadOnlySpan<byte> ownPrivate,
        ReadOnlySpan<byte> peerPublic, ReadOnlySpan<byte> inviterPublic, ReadOnlySpan<byte> joinerPublic)
    {
        Span<byte> shared = stackalloc byte[32];
        if (!RelayCrypto.TryAgree(ownPrivate, peerPublic, shared))
        {
            throw new CryptographicException("the contact's key is invalid (small-order point)");
        }
        Span<byte> salt = stackalloc byte[64];
        inviterPublic.CopyTo(salt);
        joinerPublic.CopyTo(salt.Slice(32));
        var j2i = new byte[32];
        var i2j = new byte[32];
        HKDF.DeriveKey(HashAlgorithmName.SHA256, shared, j2i, salt, JoinerToInviterInfo);
        HKDF.DeriveKey(HashAlgorithmName.SHA256, shared, i2j, salt, InviterToJoinerInfo);
        CryptographicOperations.ZeroMemory(shared);
        return (j2i, i2j);
    }

    /// <summary>
    /// One step of a chain: message key <c>HMAC(ck, 0x01)</c>, next chain key <c>HMAC(ck, 0x02)</c>.
    /// The old chain key is overwritten in place.
    /// </summary>
    public static void Step(Span<byte> chainKey, Span<byte> messageKey)
    {
        Span<byte> next = stackalloc byte[32];
        HMACSHA256.HashData(chainKey, [0x01], messageKey);
        HMACSHA256.HashData(chainKey, [0x02], next);
        next.CopyTo(chainKey);
        CryptographicOperations.ZeroMemory(next);
    }

    public static int PaddedSizeFor(int contentLength, int headerSize)
    {
        int needed = headerSize + LengthPrefixSize + contentLength + TagSize;
        foreach (var size in PaddedSizes)
        {
            if (needed <= size) return size;
        }
        throw new ArgumentException($"message too long: at most {PaddedSizes[^1] - headerSize - LengthPrefixSize - TagSize} bytes");
    }

    /// <summary>
    /// Seals <paramref name="content"/> as envelope number <paramref name="counter"/> with the chain
    /// key (advanced in place). JOIN envelopes carry the joiner's public key in the clear.
    /// </summary>
    public static byte[] Seal(byte kind, ulong counter, Span<byte> chainKey, ReadOnlySpan<byte> content, ReadOnlySpan<byte> joinerKey = default)
    {
        int headerSize = kind == KindJoin ? JoinHeaderSize : MessageHeaderSize;
        int size = PaddedSizeFor(content.Length, headerSize);
        var envelope = new byte[size];
        envelope[0] = Version;
        envelope[1] = kind;
        int at = 2;
        if (kind == KindJoin)
        {
            joinerKey.CopyTo(envelope.AsSpan(at, 32));
            at += 32;
        }
        BinaryPrimitives.WriteUInt64BigEndian(envelope.AsSpan(at), counter);
        var header = envelope.AsSpan(0, headerSize);
        var sealedPart = envelope.AsSpan(headerSize, size - headerSize - TagSize);
        BinaryPrimitives.WriteUInt32BigEndian(sealedPart, (uint)content.Length);
        content.CopyTo(sealedPart.Slice(LengthPrefixSize));
        Span<byte> messageKey = stackalloc byte[32];
        Step(chainKey, messageKey);
        using (var aead = new ChaCha20Poly1305(messageKey))
        {
            // Each message key seals exactly one envelope, so a fixed nonce is safe.
            Span<byte> nonce = stackalloc byte[12];
            aead.Encrypt(nonce, sealedPart, sealedPart, envelope.AsSpan(size - TagSize), header);
        }
        CryptographicOperations.ZeroMemory(messageKey);
        return envelope;
    }

    /// <summary>Reads the clear header of an envelope without opening it.</summary>
    public static bool TryReadHeader(ReadOnlySpan<byte> envelope, out byte kind, out ulong counter, out ReadOnlySpan<byte> joinerKey)
    {
        kind = 0; counter = 0; joinerKey = default;
        if (Array.IndexOf(PaddedSizes, envelope.Length) < 0 || envelope[0] != Version)
        {
            return false;
        }
        kind = envelope[1];
        if (kind == KindJoin)
        {
            joinerKey = envelope.Slice(2, 32);
            counter = BinaryPrimitives.ReadUInt64BigEndian(envelope.Slice(34));
            return true;
        }
        if (kind == KindMessage)
        {
            counter = BinaryPrimitives.ReadUInt64BigEndian(envelope.Slice(2));
            return true;
        }
        return false;
    }

    /// <summary>Largest number of envelopes a receiver skips over to catch up with a later one.</summary>
    public const ulong MaxSkip = 1000;

    /// <summary>
    /// Opens an envelope of a receiving chain whose next expected counter is <paramref name="expected"/>.
    /// An envelope behind it (a replay, a redelivery, or one overtaken by a later envelope) is refused
    /// before any key is used. An envelope ahead of it is opened by stepping the chain forward; the keys
    /// of the skipped envelopes are discarded and <paramref name="skipped"/> tells how many were lost
    /// or reordered. The chain key and counter change only on success.
    /// </summary>
    public static EnvelopeError TryOpen(ReadOnlySpan<byte> envelope, ref ulong expected, Span<byte> chainKey, out byte[] content, out ulong skipped)
    {
        content = [];
        skipped = 0;
        if (!TryReadHeader(envelope, out byte kind, out ulong counter, out _))
        {
            return EnvelopeError.Malformed;
        }
        if (counter < expected) return EnvelopeError.Replayed;
        if (counter - expected > MaxSkip) return EnvelopeError.Reordered;
        int headerSize = kind == KindJoin ? JoinHeaderSize : MessageHeaderSize;
        var header = envelope.Slice(0, headerSize);
        var sealedPart = envelope.Slice(headerSize, envelope.Length - headerSize - TagSize);
        var tag = envelope.Slice(envelope.Length - TagSize);
        Span<byte> candidate = stackalloc byte[32];
        chainKey.CopyTo(candidate);
        Span<byte> messageKey = stackalloc byte[32];
        for (ulong i = expected; i <= counter; i++)
        {
            Step(candidate, messageKey);
        }
        var plain = new byte[sealedPart.Length];
        try
        {
            using var aead = new ChaCha20Poly1305(messageKey);
            Span<byte> nonce = stackalloc byte[12];
            aead.Decrypt(nonce, sealedPart, tag, plain, header);
        }
        catch (AuthenticationTagMismatchException)
        {
            CryptographicOperations.ZeroMemory(candidate);
            return EnvelopeError.Tampered;
        }
        finally
        {
            CryptographicOperations.ZeroMemory(messageKey);
        }
        uint length = BinaryPrimitives.ReadUInt32BigEndian(plain);
        if (length > plain.Length - LengthPrefixSize)
        {
            CryptographicOperations.ZeroMemory(candidate);
            CryptographicOperations.ZeroMemory(plain);
            return EnvelopeError.Malformed;
        }
        candidate.CopyTo(chainKey);
        CryptographicOperations.ZeroMemory(candidate);
        skipped = counter - expected;
        expected = counter + 1;
        content = plain.AsSpan(LengthPrefixSize, (int)length).ToArray();
        CryptographicOperations.ZeroMemory(plain);
        return EnvelopeError.None;
    }
}
