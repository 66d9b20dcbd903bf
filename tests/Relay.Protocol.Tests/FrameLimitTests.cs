using System.Buffers;
using static Relay.Protocol.Tests.TestSequences;

namespace Relay.Protocol.Tests;

public class FrameLimitTests
{
    private static ProtocolException? ReadError(ReadOnlySequence<byte> buffer, int max)
    {
        try
        {
            FrameReader.TryRead(ref buffer, max, out _);
            return null;
        }
        catch (ProtocolException e)
        {
            return e;
        }
    }

    [Test]
    [Arguments(0x7FFFFFFFu, ProtocolConstants.DefaultMaxFrame)]
    [Arguments(0xFFFFFFFFu, ProtocolConstants.DefaultMaxFrame)]
    [Arguments(0x80000000u, ProtocolConstants.DefaultMaxFrame)]
    [Arguments((uint)ProtocolConstants.DefaultMaxFrame + 1, ProtocolConstants.DefaultMaxFrame)]
    [Arguments((uint)ProtocolConstants.HandshakeMaxFrame + 1, ProtocolConstants.HandshakeMaxFrame)]
    [Arguments((uint)ProtocolConstants.DefaultMaxFrame, ProtocolConstants.HandshakeMaxFrame)]
    [Arguments(6u, 5)]
    public async Task Length_over_the_limit_is_refused_from_the_prefix_alone(uint length, int max)
    {
        var prefix = LengthPrefix(length);
        var single = ReadError(Single(prefix), max);
        var bytewise = ReadError(OneBytePerSegment(prefix), max);
        var withSomeBody = ReadError(Single(Concat(prefix, [(byte)FrameType.Send, 0, 0, 0, 1])), max);

        await Assert.That(single).IsNotNull();
        await Assert.That(single!.Code).IsEqualTo(ErrorCode.TooLarge);
        await Assert.That(bytewise?.Code).IsEqualTo(ErrorCode.TooLarge);
        await Assert.That(withSomeBody?.Code).IsEqualTo(ErrorCode.TooLarge);
    }

    [Test]
    [Arguments(0u)]
    [Arguments(1u)]
    [Arguments(2u)]
    [Arguments(3u)]
    [Arguments(4u)]
    public async Task Length_shorter_than_the_header_is_a_syntax_error(uint length)
    {
        var prefix = LengthPrefix(length);
        var alone = ReadError(Single(prefix), ProtocolConstants.DefaultMaxFrame);
        var followed = ReadError(Single(Concat(prefix, Pattern(20, 1))), ProtocolConstants.HandshakeMaxFrame);
        var bytewise = ReadError(OneBytePerSegment(Concat(prefix, [1, 2, 3, 4, 5])), ProtocolConstants.DefaultMaxFrame);

        await Assert.That(alone?.Code).IsEqualTo(ErrorCode.Syntax);
        await Assert.That(followed?.Code).IsEqualTo(ErrorCode.Syntax);
        await Assert.That(bytewise?.Code).IsEqualTo(ErrorCode.Syntax);
    }

    [Test]
    [Arguments(ProtocolConstants.DefaultMaxFrame)]
    [Arguments(ProtocolConstants.HandshakeMaxFrame)]
    [Arguments(5)]
    public async Task Length_exactly_at_the_limit_is_accepted(int max)
    {
        var prefix = LengthPrefix((uint)max);
        var body = Pattern(max, 0x33);
        var wire = Concat(prefix, body, [0xAB]);

        var waiting = Single(prefix);
        bool readPrefixOnly = FrameReader.TryRead(ref waiting, max, out _);
        var almost = Single(wire[..^2]);
        bool readAlmost = FrameReader.TryRead(ref almost, max, out _);
        var buffer = RandomSplit(wire, new Random(max), 4096);
        bool read = FrameReader.TryRead(ref buffer, max, out var frame);
        var frameBytes = frame.ToArray();

        await Assert.That(readPrefixOnly).IsFalse();
        await Assert.That(waiting.Length).IsEqualTo(4L);
        await Assert.That(readAlmost).IsFalse();
        await Assert.That(read).IsTrue();
        await Assert.That(frameBytes.Length).IsEqualTo(max);
        await Assert.That(Hex(frameBytes)).IsEqualTo(Hex(body));
        await Assert.That(Hex(buffer.ToArray())).IsEqualTo("AB");
    }

    [Test]
    public async Task Handshake_limit_refuses_a_frame_the_default_limit_accepts()
    {
        var wire = Write(w => FrameWriter.WriteQueueCommand(w, FrameType.Send, 1, Fixtures.SenderId, [0], new byte[2000], Fixtures.AuthKey));
        var atHandshake = ReadError(Single(wire), ProtocolConstants.HandshakeMaxFrame);
        var afterHandshake = ReadAll(Single(wire), ProtocolConstants.DefaultMaxFrame);

        await Assert.That(atHandshake?.Code).IsEqualTo(ErrorCode.TooLarge);
        await Assert.That(afterHandshake.Frames.Count).IsEqualTo(1);
        await Assert.That(afterHandshake.Error).IsNull();
    }

    [Test]
    public async Task Every_handshake_frame_fits_the_handshake_limit()
    {
        var frames = new[] { Fixtures.Get("HELLO"), Fixtures.Get("WELCOME"), Fixtures.Get("ERR VERSION") };
        var result = ReadAll(Single(Concat(frames)), ProtocolConstants.HandshakeMaxFrame);

        await Assert.That(result.Frames.Count).IsEqualTo(3);
        await Assert.That(result.Error).IsNull();
        await Assert.That(result.Remaining).IsEqualTo(0L);
    }

    [Test]
    public async Task Oversized_frame_after_good_frames_is_refused_once_reached()
    {
        var good = Fixtures.Get("PING");
        var data = Concat(good, good, LengthPrefix(ProtocolConstants.DefaultMaxFrame + 1));
        var result = ReadAll(OneBytePerSegment(data), ProtocolConstants.DefaultMaxFrame);

        await Assert.That(result.Frames.Count).IsEqualTo(2);
        await Assert.That(result.Error).IsEqualTo(ErrorCode.TooLarge);
        await Assert.That(result.Remaining).IsEqualTo(4L);
    }
}
