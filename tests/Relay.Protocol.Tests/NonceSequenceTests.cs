using System.Buffers;
using System.Security.Cryptography;
using Relay.Protocol;

namespace Relay.Protocol.Tests;

public class NonceSequenceTests
{
    [Test]
    public async Task Consecutive_nonces_count_up_by_one_as_a_96_bit_big_endian_number()
    {
        var nonces = new NonceSequence();
        var seen = new HashSet<string>();
        byte[] previous = new byte[12], current = new byte[12];
        nonces.Next(previous);
        seen.Add(Convert.ToHexString(previous));
        for (int i = 0; i < 10_000; i++)
        {
            nonces.Next(current);
            await Assert.That(seen.Add(Convert.ToHexString(current))).IsTrue();
            var expected = new System.Numerics.BigInteger(previous, isUnsigned: true, isBigEndian: true) + 1;
            await Assert.That(new System.Numerics.BigInteger(current, isUnsigned: true, isBigEndian: true)).IsEqualTo(expected);
            current.CopyTo(previous, 0);
        }
    }

    [Test]
    public async Task Two_sequences_start_at_different_random_points()
    {
        byte[] a = new byte[12], b = new byte[12];
        new NonceSequence().Next(a);
        new NonceSequence().Next(b);
        await Assert.That(a.AsSpan().SequenceEqual(b)).IsFalse();
    }

    [Test]
    public async Task Msg_frames_sealed_from_a_sequence_open_and_carry_distinct_nonces()
    {
        byte[] key = RandomNumberGenerator.GetBytes(32), recipientId = RandomNumberGenerator.GetBytes(24);
        using var cipher = new DeliveryCipher(key);
        var nonces = new NonceSequence();
        var frameNonces = new HashSet<string>();
        for (int i = 0; i < 3; i++)
        {
            var writer = new ArrayBufferWriter<byte>();
            byte[] body = RandomNumberGenerator.GetBytes(100 + i);
            FrameWriter.WriteMsg(writer, 0, recipientId, 42 + (ulong)i, 500_000, 1, body, cipher, nonces);
            var payload = writer.WrittenSpan.Slice(9);
            frameNonces.Add(Convert.ToHexString(payload.Slice(32, 12)));
            var opened = new byte[body.Length];
            await Assert.That(RelayCrypto.TryOpenDelivery(cipher, payload.ToArray(), opened, out ulong id, out uint hour, out byte flags, out int length)).IsTrue();
            await Assert.That(id).IsEqualTo(42 + (ulong)i);
            await Assert.That(hour).IsEqualTo(500_000u);
            await Assert.That(flags).IsEqualTo((byte)1);
            await Assert.That(opened.AsSpan(0, length).SequenceEqual(body)).IsTrue();
        }
        await Assert.That(frameNonces.Count).IsEqualTo(3);
    }
}
