using System.Security.Cryptography;

namespace Relay.Protocol;

/// <summary>
/// A session's derived auth key (PROTOCOL.md §5) with the MAC of §5: HMAC-SHA256 truncated to 16 bytes,
/// the same bytes as <see cref="RelayCrypto.ComputeMac"/>. A key used more than a couple of times keeps
/// its two keyed SHA-256 states (224 bytes, <see cref="Sha256Native"/>) and starts each MAC from a
/// copy of them, about half the cost of the BCL's reused HMAC context (a SEND of 256 bytes: 421 vs
/// 780 ns, AuthBenchmarks); where libcrypto 3 cannot be called directly it keeps one BCL HMAC context
/// instead. A key used once or twice (an idle subscriber) keeps neither.
/// The relay passes its decoy keys through the same class, so a missing queue and a wrong key cost the
/// same. Not thread-safe: one user at a time (the relay's read loop, the client's write lock).
/// </summary>
public sealed class MacKey : IDisposable
{
    private const int ReuseAfter = 3;

    private readonly byte[] _key;
    private readonly bool _native;
    private byte[]? _states;          // keyed SHA-256 states (Sha256Native), when libcrypto is there
    private IncrementalHash? _hmac;   // otherwise one reused BCL HMAC context
    private int _uses;

    public MacKey(byte[] key)
        : this(key, Sha256Native.Available)
    {
    }

    /// <summary>With <paramref name="native"/> false: the BCL path, as where libcrypto 3 is missing (tests).</summary>
    internal MacKey(byte[] key, bool native)
    {
        _key = key;
        _native = native;
    }

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
        if (_states is not null)
        {
            Sha256Native.Hmac(_states, input, full);
            return;
        }
        if (_hmac is null && ++_uses >= ReuseAfter)
        {
            if (_native)
            {
                _states = new byte[2 * Sha256Native.ContextSize];
                Sha256Native.KeyStates(_key, _states);
                Sha256Native.Hmac(_states, input, full);
                return;
            }
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
        if (_states is not null)
        {
            CryptographicOperations.ZeroMemory(_states);
        }
        _hmac?.Dispose();
        CryptographicOperations.ZeroMemory(_key);
    }
}
