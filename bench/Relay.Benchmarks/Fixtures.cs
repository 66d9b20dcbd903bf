using System.Buffers;
using System.Security.Cryptography;
using Relay.Protocol;

namespace Relay.Benchmarks;

/// <summary>Wire bytes and keys shared by the benchmarks, built once with the production writers.</summary>
internal static class Fixtures
{
    /// <summary>The body size of issue 6's workload.</summary>
    public const int BodySize = 256;

    public static byte[] Random(int length)
    {
        var bytes = new byte[length];
        RandomNumberGenerator.Fill(bytes);
        return bytes;
    }

    public static byte[] Write(Action<ArrayBufferWriter<byte>> write)
    {
        var writer = new ArrayBufferWriter<byte>();
        write(writer);
        return writer.WrittenSpan.ToArray();
    }

    /// <summary>A session's auth key as both sides derive it (X25519 + HKDF, docs/PROTOCOL.md §5).</summary>
    public static byte[] AuthKey(out byte[] clientPrivate, out byte[] relayPublic, out byte[] sessionId)
    {
        clientPrivate = new byte[ProtocolConstants.KeySize];
        RelayCrypto.GenerateKeyPair(clientPrivate, new byte[ProtocolConstants.KeySize]);
        var relayPrivate = new byte[ProtocolConstants.KeySize];
        relayPublic = new byte[ProtocolConstants.KeySize];
        RelayCrypto.GenerateKeyPair(relayPrivate, relayPublic);
        sessionId = Random(ProtocolConstants.SessionIdSize);
        var key = new byte[ProtocolConstants.KeySize];
        if (!RelayCrypto.TryDeriveAuthKey(clientPrivate, relayPublic, sessionId, key))
        {
            throw new InvalidOperationException("key agreement failed");
        }
        return key;
    }
}
