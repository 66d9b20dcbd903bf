using System.Security.Cryptography;

namespace Relay.Protocol;

/// <summary>
/// A session's derived auth key (PROTOCOL.md §5) with the MAC of §5: HMAC-SHA256 truncated to 16 bytes,
/// the same bytes as <see cref="RelayCrypto.ComputeMac"/>. A key used more than a couple of times keeps
/// one HMAC context and reuses it, instead of setting OpenSSL up for every frame (most of an HMAC's
/// cost for a small frame); a key used once or twice (an idle subscriber) holds no native context.
/// The relay passes its decoy keys through the same class, so a missing queue and a wrong key cost the
/// same. Not thread-safe: one user at a time (the relay's read loop, the client's write lock).
/// </summary>
public sealed class MacKey(byte[] key) : IDisposable
{
    private const int ReuseAfter = 3;

    private readonly byte[] _key = key;
    private IncrementalHash? _hmac;
    private int _uses;

    /// <summary>Constant-time check of a 16-byte MAC over <paramref name="input"/>.</summary>
    public bool Verify(ReadOnlySpan<byte> input, ReadOnlySpan<byte> mac)
    {
        Span<byte> full = stackalloc byte[32];
        Hash(input, full);
        return mac.Length == ProtocolConstants.MacSize && CryptographicOperations.FixedTimeEquals(full.Slice(0, ProtocolConstants.MacSize), mac);
    }

    /// <summary>Writes the 16-byte MAC of <paramref name="input"/>.</summary>
    public void Compute(ReadOnlySpan<byte> input, Span<byte> mac)
    {
        Span<byte> full = stackalloc byte[32];
        Hash(input, full);
        full.Slice(0, ProtocolConstants.MacSize).CopyTo(mac);
    }

    private void Hash(ReadOnlySpan<byte> input, Span<byte> full)
    {
        if (_hmac is null && ++_uses >= ReuseAfter)
        {
            _hmac = IncrementalHash.CreateHMAC(HashAlgorithmName.SHA256, _key);
        }
        if (_hmac is null)
        {
            HMACSHA256.HashData(_key, input, full);
        }
        else
        {
            _hmac.AppendData(input);
            _hmac.GetHashAndReset(full);
        }
    }

    public void Dispose()
    {
        _hmac?.Dispose();
        CryptographicOperations.ZeroMemory(_key);
    }
}
