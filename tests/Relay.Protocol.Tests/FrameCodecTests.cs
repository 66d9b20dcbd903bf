using System.Buffers;
using System.Buffers.Binary;
using System.Security.Cryptography;
using System.Text;
using static Relay.Protocol.Tests.TestSequences;

namespace Relay.Protocol.Tests;

internal sealed record ParsedFrame(FrameType Type, uint CorrelationId, byte[] Payload, byte[] Raw, long Remaining, bool Read);

internal sealed record ParsedCommand(bool Parsed, byte[] QueueId, byte[] Args, byte[] Mac, byte[] MacInput);

public class FrameCodecTests
{
    internal static ParsedFrame ReadOne(byte[] wire, int maxFrameLength = ProtocolConstants.DefaultMaxFrame)
    {
        var buffer = Single(wire);
        if (!FrameReader.TryRead(ref buffer, maxFrameLength, out var frame))
        {
            return new ParsedFrame(0, 0, [], [], buffer.Length, false);
        }
        var raw = frame.ToArray();
        var view = new FrameView(raw);
        return new ParsedFrame(view.Type, view.CorrelationId, view.Payload.ToArray(), raw, buffer.Length, true);
    }

    internal static ParsedCommand ParseCommand(byte[] raw, int minArgs, int maxArgs)
    {
        var view = new FrameView(raw);
        if (!QueueCommand.TryParse(view, minArgs, maxArgs, out var command))
        {
            return new ParsedCommand(false, [], [], [], []);
        }
        return new ParsedCommand(true, command.QueueId.ToArray(), command.Args.ToArray(), command.Mac.ToArray(), command.MacInput.ToArray());
    }

    private static byte[] SpecMac(byte[] authKey, FrameType type, uint corr, byte[] queueId, byte[] args)
    {
        var header = new byte[5];
        header[0] = (byte)type;
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(1), corr);
        return HMACSHA256.HashData(authKey, Concat(header, queueId, args))[..16];
    }

    [Test]
    [Arguments("HELLO", "00000009" + "01" + "00000000" + "0001" + "0001")]
    [Arguments("ERR VERSION", "0000000A" + "80" + "00000000" + "02" + "0001" + "0003")]
    [Arguments("ERR", "00000006" + "80" + "0000004D" + "05")]
    [Arguments("PING", "00000005" + "03" + "FFFFFFFF")]
    [Arguments("OK", "00000005" + "81" + "00000001")]
    [Arguments("PONG", "00000005" + "83" + "00000002")]
    [Arguments("EMPTY", "00000005" + "93" + "00000003")]
    public async Task Frames_are_byte_exact_as_in_the_spec(string fixture, string expectedHex)
    {
        await Assert.That(Hex(Fixtures.Get(fixture))).IsEqualTo(expectedHex);
    }

    [Test]
    [Arguments((ushort)1, (ushort)1)]
    [Arguments((ushort)0, (ushort)65535)]
    [Arguments((ushort)513, (ushort)2)]
    public async Task Hello_round_trips(ushort min, ushort max)
    {
        var wire = Write(w => FrameWriter.WriteHello(w, min, max));
        var f = ReadOne(wire, ProtocolConstants.HandshakeMaxFrame);

        await Assert.That(f.Read).IsTrue();
        await Assert.That(wire.Length).IsEqualTo(13);
        await Assert.That(f.Remaining).IsEqualTo(0L);
        await Assert.That(f.Type).IsEqualTo(FrameType.Hello);
        await Assert.That(f.CorrelationId).IsEqualTo(0u);
        await Assert.That(f.Payload.Length).IsEqualTo(4);
        await Assert.That(BinaryPrimitives.ReadUInt16BigEndian(f.Payload)).IsEqualTo(min);
        await Assert.That(BinaryPrimitives.ReadUInt16BigEndian(f.Payload.AsSpan(2))).IsEqualTo(max);
    }

    [Test]
    [Arguments((ushort)1, ProtocolConstants.DefaultMaxFrame, ProtocolConstants.DefaultMaxMessage)]
    [Arguments((ushort)0xABCD, int.MaxValue, 7)]
    public async Task Welcome_round_trips(ushort version, int maxFrame, int maxMessage)
    {
        var sessionId = RandomNumberGenerator.GetBytes(32);
        var sessionKey = RandomNumberGenerator.GetBytes(32);
        var wire = Write(w => FrameWriter.WriteWelcome(w, version, maxFrame, maxMessage, sessionId, sessionKey));
        var f = ReadOne(wire, ProtocolConstants.HandshakeMaxFrame);

        await Assert.That(f.Read).IsTrue();
        await Assert.That(f.Type).IsEqualTo(FrameType.Welcome);
        await Assert.That(f.CorrelationId).IsEqualTo(0u);
        await Assert.That(f.Payload.Length).IsEqualTo(2 + 4 + 4 + 32 + 32);
        await Assert.That(f.Payload.Length).IsEqualTo(FrameWriter.WelcomePayloadSize);
        await Assert.That(BinaryPrimitives.ReadUInt16BigEndian(f.Payload)).IsEqualTo(version);
        await Assert.That(BinaryPrimitives.ReadUInt32BigEndian(f.Payload.AsSpan(2))).IsEqualTo((uint)maxFrame);
        await Assert.That(BinaryPrimitives.ReadUInt32BigEndian(f.Payload.AsSpan(6))).IsEqualTo((uint)maxMessage);
        await Assert.That(Hex(f.Payload.AsSpan(10, 32))).IsEqualTo(Hex(sessionId));
        await Assert.That(Hex(f.Payload.AsSpan(42, 32))).IsEqualTo(Hex(sessionKey));
    }

    public static IEnumerable<ErrorCode> AllErrorCodes() => Enum.GetValues<ErrorCode>();

    [Test]
    [MethodDataSource(nameof(AllErrorCodes))]
    public async Task Err_round_trips_every_code(ErrorCode code)
    {
        const uint corr = 0xDEADBEEF;
        var f = ReadOne(Write(w => FrameWriter.WriteError(w, corr, code)));

        await Assert.That(f.Read).IsTrue();
        await Assert.That(f.Type).IsEqualTo(FrameType.Err);
        await Assert.That(f.CorrelationId).IsEqualTo(corr);
        await Assert.That(f.Payload.Length).IsEqualTo(1);
        await Assert.That((ErrorCode)f.Payload[0]).IsEqualTo(code);
    }

    [Test]
    [Arguments((ushort)1, (ushort)1)]
    [Arguments((ushort)2, (ushort)0xFFFE)]
    public async Task Err_version_carries_the_server_range(ushort min, ushort max)
    {
        var f = ReadOne(Write(w => FrameWriter.WriteVersionError(w, min, max)), ProtocolConstants.HandshakeMaxFrame);

        await Assert.That(f.Read).IsTrue();
        await Assert.That(f.Type).IsEqualTo(FrameType.Err);
        await Assert.That(f.CorrelationId).IsEqualTo(0u);
        await Assert.That(f.Payload.Length).IsEqualTo(5);
        await Assert.That((ErrorCode)f.Payload[0]).IsEqualTo(ErrorCode.Version);
        await Assert.That(BinaryPrimitives.ReadUInt16BigEndian(f.Payload.AsSpan(1))).IsEqualTo(min);
        await Assert.That(BinaryPrimitives.ReadUInt16BigEndian(f.Payload.AsSpan(3))).IsEqualTo(max);
    }

    [Test]
    [Arguments(FrameType.Ok, 1u)]
    [Arguments(FrameType.Pong, 0x01020304u)]
    [Arguments(FrameType.Empty, uint.MaxValue)]
    [Arguments(FrameType.Ping, 0u)]
    public async Task Empty_frames_round_trip(FrameType type, uint corr)
    {
        var wire = Write(w => FrameWriter.WriteEmpty(w, type, corr));
        var f = ReadOne(wire);

        await Assert.That(wire.Length).IsEqualTo(9);
        await Assert.That(f.Read).IsTrue();
        await Assert.That(f.Type).IsEqualTo(type);
        await Assert.That(f.CorrelationId).IsEqualTo(corr);
        await Assert.That(f.Payload.Length).IsEqualTo(0);
    }

    [Test]
    public async Task Ids_round_trips()
    {
        var recipientId = RandomNumberGenerator.GetBytes(24);
        var senderId = RandomNumberGenerator.GetBytes(24);
        var serverDhKey = RandomNumberGenerator.GetBytes(32);
        var f = ReadOne(Write(w => FrameWriter.WriteIds(w, 4242, recipientId, senderId, serverDhKey)));

        await Assert.That(f.Type).IsEqualTo(FrameType.Ids);
        await Assert.That(f.CorrelationId).IsEqualTo(4242u);
        await Assert.That(f.Payload.Length).IsEqualTo(24 + 24 + 32);
        await Assert.That(Hex(f.Payload.AsSpan(0, 24))).IsEqualTo(Hex(recipientId));
        await Assert.That(Hex(f.Payload.AsSpan(24, 24))).IsEqualTo(Hex(senderId));
        await Assert.That(Hex(f.Payload.AsSpan(48, 32))).IsEqualTo(Hex(serverDhKey));
    }

    [Test]
    public async Task End_round_trips_as_a_push()
    {
        var recipientId = RandomNumberGenerator.GetBytes(24);
        var f = ReadOne(Write(w => FrameWriter.WriteEnd(w, recipientId)));

        await Assert.That(f.Type).IsEqualTo(FrameType.End);
        await Assert.That(f.CorrelationId).IsEqualTo(0u);
        await Assert.That(Hex(f.Payload)).IsEqualTo(Hex(recipientId));
    }

    [Test]
    [Arguments("")]
    [Arguments("hunter2")]
    [Arguments("pässwörd ✓")]
    public async Task New_round_trips(string password)
    {
        var passwordBytes = Encoding.UTF8.GetBytes(password);
        var recipientKey = RandomNumberGenerator.GetBytes(32);
        var recipientDhKey = RandomNumberGenerator.GetBytes(32);
        var f = ReadOne(Write(w => FrameWriter.WriteNew(w, 99, recipientKey, recipientDhKey, passwordBytes)));

        await Assert.That(f.Type).IsEqualTo(FrameType.New);
        await Assert.That(f.CorrelationId).IsEqualTo(99u);
        await Assert.That(f.Payload.Length).IsEqualTo(32 + 32 + 1 + passwordBytes.Length);
        await Assert.That(Hex(f.Payload.AsSpan(0, 32))).IsEqualTo(Hex(recipientKey));
        await Assert.That(Hex(f.Payload.AsSpan(32, 32))).IsEqualTo(Hex(recipientDhKey));
        await Assert.That((int)f.Payload[64]).IsEqualTo(passwordBytes.Length);
        await Assert.That(Encoding.UTF8.GetString(f.Payload.AsSpan(65))).IsEqualTo(password);
    }

    [Test]
    public async Task New_accepts_a_255_byte_password_and_rejects_256()
    {
        var password = Pattern(255, 0x41);
        var f = ReadOne(Write(w => FrameWriter.WriteNew(w, 1, Fixtures.KeyA, Fixtures.KeyB, password)));
        await Assert.That((int)f.Payload[64]).IsEqualTo(255);
        await Assert.That(Hex(f.Payload.AsSpan(65))).IsEqualTo(Hex(password));

        var writer = new ArrayBufferWriter<byte>();
        Assert.Throws<ArgumentException>(() => FrameWriter.WriteNew(writer, 1, Fixtures.KeyA, Fixtures.KeyB, new byte[256]));
        await Assert.That(writer.WrittenCount).IsEqualTo(0);
    }

    [Test]
    [Arguments(0)]
    [Arguments(1)]
    [Arguments(507)]
    [Arguments(508)]
    [Arguments(4096)]
    [Arguments(ProtocolConstants.DefaultMaxMessage)]
    public async Task Msg_round_trips_and_fits_the_default_frame(int bodyLength)
    {
        var recipientId = RandomNumberGenerator.GetBytes(24);
        var body = RandomNumberGenerator.GetBytes(bodyLength);
        using var cipher = new DeliveryCipher(Fixtures.DeliveryKey);
        var f = ReadOne(Write(w => FrameWriter.WriteMsg(w, 31, recipientId, 0x1122334455667788, 491_234, 0x81, body, cipher)));

        await Assert.That(f.Read).IsTrue();
        await Assert.That(f.Type).IsEqualTo(FrameType.Msg);
        await Assert.That(f.CorrelationId).IsEqualTo(31u);
        await Assert.That(f.Payload.Length).IsEqualTo(24 + 8 + 12 + 4 + 1 + bodyLength + 16);
        await Assert.That(Hex(f.Payload.AsSpan(0, 24))).IsEqualTo(Hex(recipientId));
        await Assert.That(BinaryPrimitives.ReadUInt64BigEndian(f.Payload.AsSpan(24))).IsEqualTo(0x1122334455667788ul);

        var opened = CryptoTests.Open(Fixtures.DeliveryKey, f.Payload);
        await Assert.That(opened.Ok).IsTrue();
        await Assert.That(opened.MessageId).IsEqualTo(0x1122334455667788ul);
        await Assert.That(opened.Hour).IsEqualTo(491_234u);
        await Assert.That(opened.Flags).IsEqualTo((byte)0x81);
        await Assert.That(Hex(opened.Body)).IsEqualTo(Hex(body));
    }

    [Test]
    public async Task Send_of_max_message_fits_the_default_frame()
    {
        var body = new byte[ProtocolConstants.DefaultMaxMessage];
        var wire = Write(w => FrameWriter.WriteQueueCommand(w, FrameType.Send, 1, Fixtures.SenderId, [0], body, Fixtures.AuthKey));
        var f = ReadOne(wire);

        await Assert.That(f.Read).IsTrue();
        await Assert.That(f.Raw.Length).IsEqualTo(ProtocolConstants.SendOverhead + ProtocolConstants.DefaultMaxMessage);
        var cmd = ParseCommand(f.Raw, 1, 1 + ProtocolConstants.DefaultMaxMessage);
        await Assert.That(cmd.Parsed).IsTrue();
        await Assert.That(cmd.Args.Length).IsEqualTo(1 + ProtocolConstants.DefaultMaxMessage);
    }

    private static (byte[] Args1, byte[] Args2, int Min, int Max) QueueArgs(FrameType type) => type switch
    {
        FrameType.SKey => (RandomNumberGenerator.GetBytes(32), [], 32, 32),
        FrameType.Send => ([0x01], RandomNumberGenerator.GetBytes(77), 1, 1 + ProtocolConstants.DefaultMaxMessage),
        FrameType.Ack => (LongBytes(0x0000_0100_0000_00FF), [], 8, 8),
        _ => ([], [], 0, 0),
    };

    private static byte[] LongBytes(ulong value)
    {
        var bytes = new byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(bytes, value);
        return bytes;
    }

    [Test]
    [Arguments(FrameType.SKey)]
    [Arguments(FrameType.Send)]
    [Arguments(FrameType.Sub)]
    [Arguments(FrameType.Ack)]
    [Arguments(FrameType.Get)]
    [Arguments(FrameType.Off)]
    [Arguments(FrameType.Del)]
    public async Task Queue_command_round_trips_with_a_valid_mac(FrameType type)
    {
        var (args1, args2, min, max) = QueueArgs(type);
        var queueId = RandomNumberGenerator.GetBytes(24);
        var authKey = RandomNumberGenerator.GetBytes(32);
        const uint corr = 0x7000_0001;
        var wire = Write(w => FrameWriter.WriteQueueCommand(w, type, corr, queueId, args1, args2, authKey));
        var f = ReadOne(wire);
        var cmd = ParseCommand(f.Raw, min, max);
        var args = Concat(args1, args2);

        await Assert.That(f.Read).IsTrue();
        await Assert.That(f.Remaining).IsEqualTo(0L);
        await Assert.That(f.Type).IsEqualTo(type);
        await Assert.That(f.CorrelationId).IsEqualTo(corr);
        await Assert.That(f.Payload.Length).IsEqualTo(24 + args.Length + 16);
        await Assert.That(cmd.Parsed).IsTrue();
        await Assert.That(Hex(cmd.QueueId)).IsEqualTo(Hex(queueId));
        await Assert.That(Hex(cmd.Args)).IsEqualTo(Hex(args));
        await Assert.That(Hex(cmd.MacInput)).IsEqualTo(Hex(f.Raw.AsSpan(0, f.Raw.Length - 16)));
        await Assert.That(Hex(cmd.Mac)).IsEqualTo(Hex(SpecMac(authKey, type, corr, queueId, args)));
        await Assert.That(RelayCrypto.VerifyMac(authKey, cmd.MacInput, cmd.Mac)).IsTrue();
        await Assert.That(RelayCrypto.VerifyMac(RandomNumberGenerator.GetBytes(32), cmd.MacInput, cmd.Mac)).IsFalse();
    }

    [Test]
    [Arguments(FrameType.SKey)]
    [Arguments(FrameType.Send)]
    [Arguments(FrameType.Sub)]
    [Arguments(FrameType.Ack)]
    [Arguments(FrameType.Get)]
    [Arguments(FrameType.Off)]
    [Arguments(FrameType.Del)]
    public async Task Queue_command_mac_fails_after_any_single_byte_flip(FrameType type)
    {
        var (args1, args2, min, max) = QueueArgs(type);
        var authKey = RandomNumberGenerator.GetBytes(32);
        var raw = ReadOne(Write(w => FrameWriter.WriteQueueCommand(w, type, 5, Fixtures.RecipientId, args1, args2, authKey))).Raw;
        var accepted = new List<string>();
        foreach (byte mask in new byte[] { 0x01, 0x80, 0xFF })
        {
            for (int i = 0; i < raw.Length; i++)
            {
                var tampered = raw.ToArray();
                tampered[i] ^= mask;
                var cmd = ParseCommand(tampered, min, max);
                if (cmd.Parsed && RelayCrypto.VerifyMac(authKey, cmd.MacInput, cmd.Mac))
                {
                    accepted.Add($"byte {i} ^ 0x{mask:X2}");
                }
            }
        }

        await Assert.That(ParseCommand(raw, min, max).Parsed).IsTrue();
        await Assert.That(string.Join("; ", accepted)).IsEqualTo("");
    }

    [Test]
    public async Task Unsecured_send_has_sixteen_zero_mac_bytes()
    {
        var body = Pattern(40, 9);
        var raw = ReadOne(Write(w => FrameWriter.WriteQueueCommand(w, FrameType.Send, 3, Fixtures.SenderId, [0], body, ReadOnlySpan<byte>.Empty))).Raw;
        var cmd = ParseCommand(raw, 1, 100);

        await Assert.That(cmd.Parsed).IsTrue();
        await Assert.That(Hex(cmd.Mac)).IsEqualTo(new string('0', 32));
        await Assert.That(Hex(cmd.Args)).IsEqualTo(Hex(Concat([0], body)));
        await Assert.That(Hex(raw.AsSpan(raw.Length - 16))).IsEqualTo(new string('0', 32));
    }

    [Test]
    [Arguments(0, 0, 0, true)]
    [Arguments(0, 1, 0, false)]
    [Arguments(8, 8, 8, true)]
    [Arguments(7, 8, 8, false)]
    [Arguments(9, 8, 8, false)]
    [Arguments(32, 0, 31, false)]
    [Arguments(32, 0, 32, true)]
    public async Task Queue_command_parse_enforces_argument_bounds(int argsLength, int min, int max, bool expected)
    {
        var raw = ReadOne(Write(w => FrameWriter.WriteQueueCommand(w, FrameType.Ack, 1, Fixtures.RecipientId, new byte[argsLength], [], Fixtures.AuthKey))).Raw;
        var cmd = ParseCommand(raw, min, max);

        await Assert.That(cmd.Parsed).IsEqualTo(expected);
        if (expected)
        {
            await Assert.That(cmd.Args.Length).IsEqualTo(argsLength);
        }
    }

    [Test]
    [Arguments(0)]
    [Arguments(1)]
    [Arguments(23)]
    [Arguments(39)]
    public async Task Queue_command_parse_rejects_a_payload_shorter_than_id_and_mac(int payloadLength)
    {
        var raw = new byte[5 + payloadLength];
        raw[0] = (byte)FrameType.Sub;

        await Assert.That(ParseCommand(raw, 0, 0).Parsed).IsFalse();
        await Assert.That(ParseCommand(raw, 0, int.MaxValue).Parsed).IsFalse();
    }

    [Test]
    [Arguments(0)]
    [Arguments(1)]
    [Arguments(4)]
    public async Task FrameView_rejects_less_than_a_header(int length)
    {
        var raw = new byte[length];
        var e = Assert.Throws<ProtocolException>(() => _ = new FrameView(raw));
        await Assert.That(e.Code).IsEqualTo(ErrorCode.Syntax);
    }

    [Test]
    public async Task AsSpan_copies_a_multi_segment_frame_into_scratch()
    {
        var wire = Fixtures.Get("SEND");
        var buffer = OneBytePerSegment(wire);
        var scratch = new byte[ProtocolConstants.DefaultMaxFrame];
        bool read = FrameReader.TryRead(ref buffer, ProtocolConstants.DefaultMaxFrame, out var frame);
        var copied = FrameReader.AsSpan(frame, scratch).ToArray();

        await Assert.That(read).IsTrue();
        await Assert.That(frame.IsSingleSegment).IsFalse();
        await Assert.That(Hex(copied)).IsEqualTo(Hex(wire.AsSpan(4)));
    }

    [Test]
    public async Task AsSpan_returns_a_single_segment_frame_without_copying()
    {
        var wire = Fixtures.Get("IDS");
        var buffer = new ReadOnlySequence<byte>(wire);
        var scratch = new byte[ProtocolConstants.DefaultMaxFrame];
        bool read = FrameReader.TryRead(ref buffer, ProtocolConstants.DefaultMaxFrame, out var frame);
        var span = FrameReader.AsSpan(frame, scratch);
        bool aliasesInput = span.Overlaps(wire);
        var bytes = span.ToArray();

        await Assert.That(read).IsTrue();
        await Assert.That(aliasesInput).IsTrue();
        await Assert.That(Hex(bytes)).IsEqualTo(Hex(wire.AsSpan(4)));
    }
}
