using System.Buffers.Binary;
using System.Security.Cryptography;
using Org.BouncyCastle.Math.EC.Rfc7748;

namespace Relay.Protocol;

/// <summary>
/// The protocol's key agreement, derivations and MACs (docs/PROTOCOL.md §5, §7).
/// X25519 is BouncyCastle's managed RFC 7748 code (AOT-clean); HKDF, HMAC and ChaCha20-Poly1305 are the BCL's.
/// </summary>
public static class RelayCrypto
{
    public static ReadOnlySpan<byte> AuthInfo => "relay/1 auth"u8;
    public static ReadOnlySpan<byte> DeliveryInfo => "relay/1 delivery"u8;

    /// <summary>Fills a fresh X25519 private key and its public key.</summary>
    public static void GenerateKeyPair(Span<byte> privateKey, Span<byte> publicKey)
    {
        RandomNumberGenerator.Fill(privateKey.Slice(0, ProtocolConstants.KeySize));
        X25519.GeneratePublicKey(privateKey.Slice(0, ProtocolConstants.KeySize), publicKey.Slice(0, ProtocolConstants.KeySize));
    }

    public static byte[] PublicKeyOf(ReadOnlySpan<byte> privateKey)
    {
        var pub = new byte[ProtocolConstants.KeySize];
        X25519.GeneratePublicKey(privateKey, pub);
        return pub;
    }

    /// <summary>X25519; false for a small-order peer key (all-zero shared secret) or wrong lengths.</summary>
    public static bool TryAgree(ReadOnlySpan<byte> privateKey, ReadOnlySpan<byte> peerPublicKey, Span<byte> shared)
    {
        if (privateKey.Length != ProtocolConstants.KeySize || peerPublicKey.Length != ProtocolConstants.KeySize || shared.Length < ProtocolConstants.KeySize)
        {
            return false;
        }
        return X25519.CalculateAgreement(privateKey, peerPublicKey, shared.Slice(0, ProtocolConstants.KeySize));
    }

    /// <summary>authKey = HKDF-SHA256(X25519(priv, peer), salt = sessionId, info = "relay/1 auth").</summary>
    public static bool TryDeriveAuthKey(ReadOnlySpan<byte> privateKey, ReadOnlySpan<byte> peerPublicKey,
        ReadOnlySpan<byte> sessionId, Span<byte> authKey)
    {
        Span<byte> shared = stackalloc byte[ProtocolConstants.KeySize];
        bool ok = TryAgree(privateKey, peerPublicKey, shared);
        if (ok)
        {
            HKDF.DeriveKey(HashAlgorithmName.SHA256, shared, authKey.Slice(0, ProtocolConstants.KeySize), sessionId, AuthInfo);
        }
        CryptographicOperations.ZeroMemory(shared);
        return ok;
    }

    /// <summary>deliveryKey = HKDF-SHA256(X25519(priv, peer), salt = recipientId, info = "relay/1 delivery").</summary>
    public static bool TryDeriveDeliveryKey(ReadOnlySpan<byte> privateKey, ReadOnlySpan<byte> peerPublicKey,
        ReadOnlySpan<byte> recipientId, Span<byte> deliveryKey)
    {
        Span<byte> shared = stackalloc byte[ProtocolConstants.KeySize];
        bool ok = TryAgree(privateKey, peerPublicKey, shared);
        if (ok)
        {
            HKDF.DeriveKey(HashAlgorithmName.SHA256, shared, deliveryKey.Slice(0, ProtocolConstants.KeySize), recipientId, DeliveryInfo);
        }
        CryptographicOperations.ZeroMemory(shared);
        return ok;
    }

    /// <summary>mac = HMAC-SHA256(authKey, input)[0..16].</summary>
    public static void ComputeMac(ReadOnlySpan<byte> authKey, ReadOnlySpan<byte> input, Span<byte> mac)
    {
        Span<byte> full = stackalloc byte[32];
        HMACSHA256.HashData(authKey, input, full);
        full.Slice(0, ProtocolConstants.MacSize).CopyTo(mac);
    }

    /// <summary>Constant-time check of a 16-byte MAC.</summary>
    public static bool VerifyMac(ReadOnlySpan<byte> authKey, ReadOnlySpan<byte> input, ReadOnlySpan<byte> mac)
    {
        Span<byte> full = stackalloc byte[32];
        HMACSHA256.HashData(authKey, input, full);
        return CryptographicOperations.FixedTimeEquals(full.Slice(0, ProtocolConstants.MacSize), mac);
    }

    /// <summary>
    /// Opens a MSG payload (<c>recipientId ‖ msgId ‖ nonce ‖ sealed ‖ tag</c>) into
    /// <paramref name="body"/>. False when authentication fails.
    /// </summary>
    public static bool TryOpenDelivery(DeliveryCipher cipher, ReadOnlySpan<byte> msgPayload, Span<byte> body,
        out ulong messageId, out uint hour, out byte flags, out int bodyLength)
    {
        messageId = 0; hour = 0; flags = 0; bodyLength = 0;
        if (msgPayload.Length < ProtocolConstants.MsgOverhead)
        {
            return false;
        }
        var aad = msgPayload.Slice(0, ProtocolConstants.IdSize + 8);
        var nonce = msgPayload.Slice(ProtocolConstants.IdSize + 8, ProtocolConstants.NonceSize);
        var sealedPart = msgPayload.Slice(ProtocolConstants.IdSize + 8 + ProtocolConstants.NonceSize);
        var ciphertext = sealedPart.Slice(0, sealedPart.Length - ProtocolConstants.TagSize);
        var tag = sealedPart.Slice(ciphertext.Length);
        byte[]? rented = null;
        Span<byte> plain = ciphertext.Length <= 512 ? stackalloc byte[ciphertext.Length]
            : (rented = System.Buffers.ArrayPool<byte>.Shared.Rent(ciphertext.Length)).AsSpan(0, ciphertext.Length);
        if (!cipher.TryDecrypt(nonce, ciphertext, tag, plain, aad))
        {
            if (rented != null) System.Buffers.ArrayPool<byte>.Shared.Return(rented);
            return false;
        }
        messageId = BinaryPrimitives.ReadUInt64BigEndian(msgPayload.Slice(ProtocolConstants.IdSize));
        hour = BinaryPrimitives.ReadUInt32BigEndian(plain);
        flags = plain[4];
        bodyLength = plain.Length - ProtocolConstants.DeliveryHeaderSize;
        plain.Slice(ProtocolConstants.DeliveryHeaderSize).CopyTo(body);
        CryptographicOperations.ZeroMemory(plain);
        if (rented != null) System.Buffers.ArrayPool<byte>.Shared.Return(rented);
        return true;
    }
}
