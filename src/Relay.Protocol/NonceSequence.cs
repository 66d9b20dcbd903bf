using System.Buffers.Binary;
using System.Security.Cryptography;

namespace Relay.Protocol;

/// <summary>
/// Nonces for one sender of AEAD messages under one key: a random 96-bit start, then counting up.
/// Every nonce it gives is distinct; two sequences under the same key (a queue subscribed again)
/// overlap only if their random starts fall within the number of messages of each other, which at
/// 2^96 possible starts does not happen. One random draw per sequence instead of one per message.
/// Not thread-safe: the caller orders its calls (the relay holds the queue's lock).
/// </summary>
public sealed class NonceSequence
{
    private ulong _high;   // first 8 bytes, big-endian
    private uint _low;     // last 4 bytes, big-endian

    public NonceSequence()
    {
        Span<byte> start = stackalloc byte[ProtocolConstants.NonceSize];
        RandomNumberGenerator.Fill(start);
        _high = BinaryPrimitives.ReadUInt64BigEndian(start);
        _low = BinaryPrimitives.ReadUInt32BigEndian(start.Slice(8));
    }

    /// <summary>Writes the next 12-byte nonce.</summary>
    public void Next(Span<byte> nonce)
    {
        BinaryPrimitives.WriteUInt64BigEndian(nonce, _high);
        BinaryPrimitives.WriteUInt32BigEndian(nonce.Slice(8), _low);
        if (++_low == 0)
        {
            _high++;   // wraps after 2^96 nonces, far beyond any subscription
        }
    }
}
