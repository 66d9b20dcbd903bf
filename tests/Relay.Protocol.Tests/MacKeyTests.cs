using System.Security.Cryptography;
using Relay.Protocol;

namespace Relay.Protocol.Tests;

/// <summary>The cached MAC agrees with PROTOCOL.md §5 (RelayCrypto) on every use, before and after it keeps a context.</summary>
public class MacKeyTests
{
    [Test]
    public async Task Verifies_exactly_like_the_protocol_function_on_every_use()
    {
        byte[] key = RandomNumberGenerator.GetBytes(32);
        using var cached = new MacKey((byte[])key.Clone());
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
