using System.Buffers.Binary;
using System.Security.Cryptography;
using static Relay.Protocol.Tests.TestSequences;

namespace Relay.Protocol.Tests;

internal sealed record Opened(bool Ok, ulong MessageId, uint Hour, byte Flags, byte[] Body);

public class CryptoTests
{
    internal static Opened Open(byte[] deliveryKey, byte[] msgPayload)
    {
        using var cipher = new DeliveryCipher(deliveryKey);
        var body = new byte[Math.Max(0, msgPayload.Length)];
        bool ok = RelayCrypto.TryOpenDelivery(cipher, msgPayload, body, out var id, out var hour, out var flags, out var length);
        return new Opened(ok, id, hour, flags, ok ? body[..length] : []);
    }

    private static (bool Ok, byte[] Shared) Agree(byte[] privateKey, byte[] publicKey)
    {
        var shared = new byte[32];
        bool ok = RelayCrypto.TryAgree(privateKey, publicKey, shared);
        return (ok, shared);
    }

    private static (byte[] Private, byte[] Public) KeyPair()
    {
        var priv = new byte[32];
        var pub = new byte[32];
        RelayCrypto.GenerateKeyPair(priv, pub);
        return (priv, pub);
    }

    [Test]
    [Arguments("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
        "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
        "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552")]
    [Arguments("4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
        "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
        "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957")]
    public async Task X25519_matches_rfc7748_section_5_2(string scalar, string u, string expected)
    {
        var (ok, shared) = Agree(Hex(scalar), Hex(u));

        await Assert.That(ok).IsTrue();
        await Assert.That(Hex(shared)).IsEqualTo(expected.ToUpperInvariant());
    }

    [Test]
    public async Task X25519_matches_rfc7748_section_5_2_iterations()
    {
        var k = new byte[32];
        var u = new byte[32];
        k[0] = 9;
        u[0] = 9;
        string? afterOne = null;
        for (int i = 1; i <= 1000; i++)
        {
            var (ok, r) = Agree(k, u);
            if (!ok)
            {
                Assert.Fail($"agreement failed at iteration {i}");
            }
            u = k;
            k = r;
            if (i == 1)
            {
                afterOne = Hex(k);
            }
        }

        await Assert.That(afterOne).IsEqualTo("422C8E7A6227D7BCA1350B3E2BB7279F7897B87BB6854B783C60E80311AE3079");
        await Assert.That(Hex(k)).IsEqualTo("684CF59BA83309552800EF566F2F4D3C1C3887C49360E3875F2EB94D99532C51");
    }

    [Test]
    public async Task X25519_matches_rfc7748_section_6_1()
    {
        var alicePriv = Hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        var bobPriv = Hex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb");
        var alicePub = RelayCrypto.PublicKeyOf(alicePriv);
        var bobPub = RelayCrypto.PublicKeyOf(bobPriv);
        var (okA, sharedA) = Agree(alicePriv, bobPub);
        var (okB, sharedB) = Agree(bobPriv, alicePub);
        const string k = "4A5D9D5BA4CE2DE1728E3BF480350F25E07E21C947D19E3376F09B3C1E161742";

        await Assert.That(Hex(alicePub)).IsEqualTo("8520F0098930A754748B7DDCB43EF75A0DBF3A0D26381AF4EBA4A98EAA9B4E6A");
        await Assert.That(Hex(bobPub)).IsEqualTo("DE9EDB7D7B7DC1B4D35B61C2ECE435373F8343C85B78674DADFC7E146F882B4F");
        await Assert.That(okA).IsTrue();
        await Assert.That(okB).IsTrue();
        await Assert.That(Hex(sharedA)).IsEqualTo(k);
        await Assert.That(Hex(sharedB)).IsEqualTo(k);
    }

    [Test]
    public async Task Generated_key_pair_is_consistent()
    {
        var (priv, pub) = KeyPair();
        var (priv2, pub2) = KeyPair();

        await Assert.That(Hex(RelayCrypto.PublicKeyOf(priv))).IsEqualTo(Hex(pub));
        await Assert.That(Hex(priv)).IsNotEqualTo(Hex(priv2));
        await Assert.That(Hex(pub)).IsNotEqualTo(Hex(pub2));
    }

    [Test]
    [Arguments("0000000000000000000000000000000000000000000000000000000000000000")]
    [Arguments("0100000000000000000000000000000000000000000000000000000000000000")]
    [Arguments("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")]
    [Arguments("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157")]
    [Arguments("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f")]
    [Arguments("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f")]
    [Arguments("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f")]
    public async Task Small_order_public_keys_are_refused(string publicKeyHex)
    {
        var peer = Hex(publicKeyHex);
        var (priv, _) = KeyPair();
        var (ok, _) = Agree(priv, peer);
        var authKey = new byte[32];
        bool derived = RelayCrypto.TryDeriveAuthKey(priv, peer, Fixtures.SessionId, authKey);
        var deliveryKey = new byte[32];
        bool deliveryDerived = RelayCrypto.TryDeriveDeliveryKey(priv, peer, Fixtures.RecipientId, deliveryKey);

        await Assert.That(ok).IsFalse();
        await Assert.That(derived).IsFalse();
        await Assert.That(deliveryDerived).IsFalse();
    }

    [Test]
    [Arguments(31, 32)]
    [Arguments(33, 32)]
    [Arguments(32, 31)]
    [Arguments(32, 0)]
    public async Task Agreement_with_wrong_key_lengths_is_refused(int privateLength, int publicLength)
    {
        var (ok, _) = Agree(new byte[privateLength], Pattern(publicLength, 9));
        await Assert.That(ok).IsFalse();
    }

    [Test]
    public async Task Auth_key_is_symmetric_and_bound_to_the_session()
    {
        var client = KeyPair();
        var server = KeyPair();
        var sessionId = RandomNumberGenerator.GetBytes(32);
        var otherSessionId = RandomNumberGenerator.GetBytes(32);
        var clientSide = new byte[32];
        var serverSide = new byte[32];
        var otherSession = new byte[32];
        bool okClient = RelayCrypto.TryDeriveAuthKey(client.Private, server.Public, sessionId, clientSide);
        bool okServer = RelayCrypto.TryDeriveAuthKey(server.Private, client.Public, sessionId, serverSide);
        bool okOther = RelayCrypto.TryDeriveAuthKey(client.Private, server.Public, otherSessionId, otherSession);

        var (_, shared) = Agree(client.Private, server.Public);
        var specKey = HKDF.DeriveKey(HashAlgorithmName.SHA256, shared, 32, sessionId, "relay/1 auth"u8.ToArray());

        await Assert.That(okClient && okServer && okOther).IsTrue();
        await Assert.That(Hex(clientSide)).IsEqualTo(Hex(serverSide));
        await Assert.That(Hex(clientSide)).IsEqualTo(Hex(specKey));
        await Assert.That(Hex(otherSession)).IsNotEqualTo(Hex(clientSide));
    }

    [Test]
    public async Task Delivery_key_is_symmetric_and_bound_to_the_recipient_id()
    {
        var server = KeyPair();
        var recipient = KeyPair();
        var recipientId = RandomNumberGenerator.GetBytes(24);
        var serverSide = new byte[32];
        var recipientSide = new byte[32];
        var otherId = new byte[32];
        bool ok1 = RelayCrypto.TryDeriveDeliveryKey(server.Private, recipient.Public, recipientId, serverSide);
        bool ok2 = RelayCrypto.TryDeriveDeliveryKey(recipient.Private, server.Public, recipientId, recipientSide);
        bool ok3 = RelayCrypto.TryDeriveDeliveryKey(recipient.Private, server.Public, RandomNumberGenerator.GetBytes(24), otherId);
        var authKey = new byte[32];
        RelayCrypto.TryDeriveAuthKey(recipient.Private, server.Public, recipientId, authKey);

        var (_, shared) = Agree(server.Private, recipient.Public);
        var specKey = HKDF.DeriveKey(HashAlgorithmName.SHA256, shared, 32, recipientId, "relay/1 delivery"u8.ToArray());

        await Assert.That(ok1 && ok2 && ok3).IsTrue();
        await Assert.That(Hex(serverSide)).IsEqualTo(Hex(recipientSide));
        await Assert.That(Hex(serverSide)).IsEqualTo(Hex(specKey));
        await Assert.That(Hex(otherId)).IsNotEqualTo(Hex(serverSide));
        await Assert.That(Hex(authKey)).IsNotEqualTo(Hex(serverSide));
    }

    [Test]
    [Arguments(FrameType.Sub)]
    [Arguments(FrameType.Ack)]
    public async Task Command_signed_by_client_verifies_on_server_only_within_its_session(FrameType type)
    {
        var client = KeyPair();
        var server = KeyPair();
        var sessionId = RandomNumberGenerator.GetBytes(32);
        var clientAuth = new byte[32];
        var serverAuth = new byte[32];
        var otherSessionAuth = new byte[32];
        var otherServer = KeyPair();
        RelayCrypto.TryDeriveAuthKey(client.Private, server.Public, sessionId, clientAuth);
        RelayCrypto.TryDeriveAuthKey(server.Private, client.Public, sessionId, serverAuth);
        RelayCrypto.TryDeriveAuthKey(otherServer.Private, client.Public, RandomNumberGenerator.GetBytes(32), otherSessionAuth);

        byte[] args = type == FrameType.Ack ? new byte[8] : [];
        var raw = FrameCodecTests.ReadOne(Write(w => FrameWriter.WriteQueueCommand(w, type, 8, Fixtures.RecipientId, args, [], clientAuth))).Raw;
        var cmd = FrameCodecTests.ParseCommand(raw, args.Length, args.Length);

        await Assert.That(cmd.Parsed).IsTrue();
        await Assert.That(RelayCrypto.VerifyMac(serverAuth, cmd.MacInput, cmd.Mac)).IsTrue();
        await Assert.That(RelayCrypto.VerifyMac(otherSessionAuth, cmd.MacInput, cmd.Mac)).IsFalse();
    }

    private static (byte[] Key, byte[] RecipientId) DeliveryKey()
    {
        var server = KeyPair();
        var recipient = KeyPair();
        var recipientId = RandomNumberGenerator.GetBytes(24);
        var key = new byte[32];
        RelayCrypto.TryDeriveDeliveryKey(server.Private, recipient.Public, recipientId, key);
        return (key, recipientId);
    }

    private static byte[] SealedPayload(byte[] key, byte[] recipientId, ulong messageId, uint hour, byte flags, byte[] body)
    {
        using var cipher = new DeliveryCipher(key);
        var wire = Write(w => FrameWriter.WriteMsg(w, 0, recipientId, messageId, hour, flags, body, cipher));
        return wire[9..];
    }

    [Test]
    [Arguments(0, (byte)0)]
    [Arguments(64, (byte)1)]
    [Arguments(1000, (byte)0xFF)]
    public async Task Delivery_round_trips_between_relay_and_recipient(int bodyLength, byte flags)
    {
        var server = KeyPair();
        var recipient = KeyPair();
        var recipientId = RandomNumberGenerator.GetBytes(24);
        var relayKey = new byte[32];
        var recipientKey = new byte[32];
        RelayCrypto.TryDeriveDeliveryKey(server.Private, recipient.Public, recipientId, relayKey);
        RelayCrypto.TryDeriveDeliveryKey(recipient.Private, server.Public, recipientId, recipientKey);
        var body = RandomNumberGenerator.GetBytes(bodyLength);
        uint hour = (uint)(DateTimeOffset.UtcNow.ToUnixTimeSeconds() / 3600);

        var payload = SealedPayload(relayKey, recipientId, 123_456_789_012, hour, flags, body);
        var opened = Open(recipientKey, payload);

        await Assert.That(opened.Ok).IsTrue();
        await Assert.That(opened.MessageId).IsEqualTo(123_456_789_012ul);
        await Assert.That(opened.Hour).IsEqualTo(hour);
        await Assert.That(opened.Flags).IsEqualTo(flags);
        await Assert.That(Hex(opened.Body)).IsEqualTo(Hex(body));
    }

    [Test]
    public async Task Delivery_is_sealed_as_the_spec_says()
    {
        var (key, recipientId) = DeliveryKey();
        var body = Pattern(100, 3);
        var payload = SealedPayload(key, recipientId, 7, 500_000, 1, body);

        var aad = new byte[32];
        recipientId.CopyTo(aad, 0);
        BinaryPrimitives.WriteUInt64BigEndian(aad.AsSpan(24), 7);
        var nonce = payload[32..44];
        var ciphertext = payload[44..^16];
        var tag = payload[^16..];
        var plain = new byte[ciphertext.Length];
        // The BCL's own ChaCha20-Poly1305, independent of DeliveryCipher, opens what the relay sealed.
        using var cipher = new ChaCha20Poly1305(key);
        cipher.Decrypt(nonce, ciphertext, tag, plain, aad);

        await Assert.That(BinaryPrimitives.ReadUInt32BigEndian(plain)).IsEqualTo(500_000u);
        await Assert.That(plain[4]).IsEqualTo((byte)1);
        await Assert.That(Hex(plain.AsSpan(5))).IsEqualTo(Hex(body));
    }

    [Test]
    [Arguments(64)]
    [Arguments(700)]
    public async Task Sealed_delivery_never_contains_the_body(int bodyLength)
    {
        var (key, recipientId) = DeliveryKey();
        var body = Pattern(bodyLength, 0x61);
        using var cipher = new DeliveryCipher(key);
        var wire = Write(w => FrameWriter.WriteMsg(w, 0, recipientId, 1, 1, 0, body, cipher));
        var leaks = new List<int>();
        for (int i = 0; i + 16 <= body.Length; i++)
        {
            if (wire.AsSpan().IndexOf(body.AsSpan(i, 16)) >= 0)
            {
                leaks.Add(i);
            }
        }

        await Assert.That(wire.AsSpan().IndexOf(body) >= 0).IsFalse();
        await Assert.That(leaks.Count).IsEqualTo(0);
    }

    [Test]
    public async Task Two_deliveries_of_the_same_message_differ()
    {
        var (key, recipientId) = DeliveryKey();
        var body = Pattern(80, 1);
        var first = SealedPayload(key, recipientId, 9, 10, 0, body);
        var second = SealedPayload(key, recipientId, 9, 10, 0, body);

        await Assert.That(Hex(first.AsSpan(0, 32))).IsEqualTo(Hex(second.AsSpan(0, 32)));
        await Assert.That(Hex(first.AsSpan(32, 12))).IsNotEqualTo(Hex(second.AsSpan(32, 12)));
        await Assert.That(Hex(first.AsSpan(44))).IsNotEqualTo(Hex(second.AsSpan(44)));
        await Assert.That(Open(key, first).Ok && Open(key, second).Ok).IsTrue();
    }

    [Test]
    [Arguments(0)]
    [Arguments(70)]
    [Arguments(600)]
    public async Task Tampering_any_byte_of_a_delivery_is_detected(int bodyLength)
    {
        var (key, recipientId) = DeliveryKey();
        var payload = SealedPayload(key, recipientId, 77, 88, 1, RandomNumberGenerator.GetBytes(bodyLength));
        var accepted = new List<int>();
        for (int i = 0; i < payload.Length; i++)
        {
            var tampered = payload.ToArray();
            tampered[i] ^= 0x01;
            if (Open(key, tampered).Ok)
            {
                accepted.Add(i);
            }
        }

        await Assert.That(Open(key, payload).Ok).IsTrue();
        await Assert.That(string.Join(",", accepted)).IsEqualTo("");
    }

    [Test]
    public async Task Delivery_does_not_open_under_another_key_or_when_truncated()
    {
        var (key, recipientId) = DeliveryKey();
        var payload = SealedPayload(key, recipientId, 1, 2, 3, Pattern(50, 4));
        var (otherKey, _) = DeliveryKey();
        var truncatedResults = new List<int>();
        for (int length = 0; length < payload.Length; length++)
        {
            if (Open(key, payload[..length]).Ok)
            {
                truncatedResults.Add(length);
            }
        }

        await Assert.That(Open(otherKey, payload).Ok).IsFalse();
        await Assert.That(string.Join(",", truncatedResults)).IsEqualTo("");
    }
}
