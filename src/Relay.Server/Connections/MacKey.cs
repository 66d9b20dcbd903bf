using System.Security.Cryptography;
using Relay.Protocol;

namespace Relay.Server.Connections;

/// <summary>
/// A session's derived auth key (PROTOCOL.md §5) with its MAC check. A key used more than a couple of
/// times keeps one HMAC context and reuses it, instead of setting OpenSSL up for every frame (most of an
/// HMAC's cost for a small frame); a key used once or twice (an idle subscriber) holds no native context.
/// Decoy keys go through the same class, so a missing queue and a wrong key still cost the same.
/// Used only by the session's read loop.
/// </summary>
internal sealed class MacKey(byte[] key) : IDisposable
{
    private const int ReuseAfter = 3;

    private readonly byte[] _key = key;
    private IncrementalHash? _hmac;
    private int _uses;

    public bool Verify(ReadOnlySpan<byte> input, ReadOnlySpan<byte> mac)
    {
        Span<byte> full = stackalloc byte[32];
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
        return mac.Length == ProtocolConstants.MacSize && CryptographicOperations.FixedTimeEquals(full.Slice(0, ProtocolConstants.MacSize), mac);
    }

    public void Dispose()
    {
        _hmac?.Dispose();
        CryptographicOperations.ZeroMemory(_key);
    }
}
