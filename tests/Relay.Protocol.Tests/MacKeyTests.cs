using System.Security.Cryptography;
using Relay.Protocol;

namespace Relay.Protocol.Tests;

/// <summary>The cached MAC agrees with PROTOCOL.md §5 (RelayCrypto) on every use, before and after it keeps a context.</summary>
public class MacKeyTests
{
    [Test]
    [Arguments(true)]
    [Arguments(false)]
    public async Task Verifies_exactly_like_the_protocol_function_on_every_use(bool native)
    {
        byte[] key = RandomNumberGenerator.GetBytes(32);
        using var cached = new MacKey((byte[])key.Clone(), native);
        for (int use = 0; use < 12; use++)
        {
            byte[] input = RandomNumberGenerator.GetBytes(use * 37 + 1);
            byte[] mac = new byte[ProtocolConstants.MacSize];
            RelayCrypto.ComputeMac(key, input, mac);
            await Assert.That(cached.Verify(input, mac)).IsTrue();
            byte[] computed = new byte[ProtocolConstants.MacSize];
            cached.Compute(input, computed);
            await Assert.That(computed.AsSpan().SequenceEqual(mac)).IsTrue();
            await Assert.That(RelayCrypto.VerifyMac(key, input, mac)).IsTrue();

            byte[] wrong = (byte[])mac.Clone();
            wrong[use % wrong.Length] ^= 1;
            await Assert.That(cached.Verify(input, wrong)).IsFalse();
            byte[] otherInput = (byte[])input.Clone();
            otherInput[0] ^= 0x80;
            await Assert.That(cached.Verify(otherInput, mac)).IsFalse();
            await Assert.That(cached.Verify(input, mac.AsSpan(0, 15))).IsFalse();
        }
    }
}

/// <summary>The keyed SHA-256 states behind MacKey: HMAC-SHA256 exactly, for any key and input length.</summary>
public class Sha256NativeTests
{
    [Test]
    public async Task Libcrypto_is_called_directly_here()
    {
        // The relay's platform (Debian, OpenSSL 3): MacKey's fast path must be the one that runs.
        await Assert.That(Sha256Native.Available).IsTrue();
    }

    [Test]
    public async Task Agrees_with_the_BCL_across_block_boundaries_and_key_lengths()
    {
        var wrong = new List<string>();
        byte[] states = new byte[2 * Sha256Native.ContextSize];
        byte[] mine = new byte[32];
        foreach (int keyLength in new[] { 0, 1, 16, 32, 63, 64, 65, 131 })
        {
            byte[] key = RandomNumberGenerator.GetBytes(keyLength);
            Sha256Native.KeyStates(key, states);
            foreach (int inputLength in new[] { 0, 1, 31, 55, 56, 63, 64, 65, 119, 120, 128, 286, 1000, 65_536 })
            {
                byte[] input = RandomNumberGenerator.GetBytes(inputLength);
                Sha256Native.Hmac(states, input, mine);
                if (!mine.AsSpan().SequenceEqual(HMACSHA256.HashData(key, input)))
                {
                    wrong.Add($"key {keyLength}, input {inputLength}");
                }
            }
        }
        await Assert.That(wrong).IsEmpty();
    }

    [Test]
    [Arguments("0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b", "4869205468657265", "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7")]
    [Arguments("4a656665", "7768617420646f2079612077616e7420666f72206e6f7468696e673f", "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")]
    [Arguments("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd", "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe")]
    [Arguments("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "54657374205573696e67204c6172676572205468616e20426c6f636b2d53697a65204b6579202d2048617368204b6579204669727374", "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54")]
    public async Task Matches_the_RFC_4231_vectors(string keyHex, string dataHex, string macHex)
    {
        byte[] states = new byte[2 * Sha256Native.ContextSize];
        byte[] mac = new byte[32];
        Sha256Native.KeyStates(Convert.FromHexString(keyHex), states);
        Sha256Native.Hmac(states, Convert.FromHexString(dataHex), mac);
        await Assert.That(Convert.ToHexStringLower(mac)).IsEqualTo(macHex);
    }
}
