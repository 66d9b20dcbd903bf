using System.Buffers;
using System.Buffers.Binary;
using static Relay.Protocol.Tests.TestSequences;

namespace Relay.Protocol.Tests;

public class FuzzTests
{
    private static readonly int[] Limits = [ProtocolConstants.HandshakeMaxFrame, ProtocolConstants.DefaultMaxFrame, 5, 64];

    private static byte[] RandomInput(Random random)
    {
        switch (random.Next(4))
        {
            case 0:
            {
                var bytes = new byte[random.Next(0, 64)];
                random.NextBytes(bytes);
                return bytes;
            }
            case 1:
            {
                var all = Fixtures.Frames().ToArray();
                var parts = new List<byte[]>();
                int count = random.Next(0, 6);
                for (int i = 0; i < count; i++)
                {
                    parts.Add(all[random.Next(all.Length)]);
                }
                var data = Concat(parts.ToArray());
                if (data.Length > 0 && random.Next(2) == 0)
                {
                    data[random.Next(data.Length)] ^= (byte)random.Next(1, 256);
                }
                if (data.Length > 0 && random.Next(3) == 0)
                {
                    data = data[..random.Next(data.Length)];
                }
                return data;
            }
            default:
            {
                var parts = new List<byte[]>();
                int count = random.Next(0, 8);
                for (int i = 0; i < count; i++)
                {
                    uint length = random.Next(5) switch
                    {
                        0 => (uint)random.Next(0, 6),
                        1 => (uint)random.Next(1018, 1030),
                        2 => (uint)random.Next(60, 70),
                        3 => unchecked((uint)random.Next()) | (uint)(random.Next(2) << 31),
                        _ => (uint)random.Next(5, 120),
                    };
                    int bodyLength = (int)Math.Min(length, (uint)random.Next(0, 200));
                    var body = new byte[bodyLength];
                    random.NextBytes(body);
                    parts.Add(LengthPrefix(length));
                    parts.Add(body);
                }
                return Concat(parts.ToArray());
            }
        }
    }

    private static ReadOnlySequence<byte> RandomShape(byte[] data, Random random) => random.Next(4) switch
    {
        0 => Single(data),
        1 => OneBytePerSegment(data),
        2 => SplitAt(data, random.Next(data.Length + 1)),
        _ => RandomSplit(data, random, random.Next(1, 24)),
    };

    private static string? RunOne(byte[] data, ReadOnlySequence<byte> buffer, int max)
    {
        var expected = Expected(data, max);
        var frames = new List<byte[]>();
        ErrorCode? error = null;
        long offset = 0;
        try
        {
            while (true)
            {
                long before = buffer.Length;
                var start = buffer.Start;
                if (!FrameReader.TryRead(ref buffer, max, out var frame))
                {
                    if (buffer.Length != before || !buffer.Start.Equals(start))
                    {
                        return $"returned false but moved the buffer from {before} to {buffer.Length} bytes";
                    }
                    break;
                }
                long consumed = before - buffer.Length;
                if (consumed != 4 + frame.Length)
                {
                    return $"consumed {consumed} bytes for a frame of {frame.Length}";
                }
                uint prefix = BinaryPrimitives.ReadUInt32BigEndian(data.AsSpan((int)offset));
                if (frame.Length != prefix)
                {
                    return $"frame of {frame.Length} bytes for a length prefix of {prefix}";
                }
                if (frame.Length > max || frame.Length < 5)
                {
                    return $"returned a frame of {frame.Length} bytes with limit {max}";
                }
                frames.Add(frame.ToArray());
                offset += consumed;
            }
        }
        catch (ProtocolException e)
        {
            error = e.Code;
        }
        catch (Exception e)
        {
            return $"threw {e.GetType().Name}: {e.Message}";
        }
        var actual = new ReadResult(frames, buffer.Length, error);
        if (!SameFrames(actual, expected) || actual.Remaining != expected.Remaining || actual.Error != expected.Error)
        {
            return $"got {Describe(actual)}, want {Describe(expected)}";
        }
        return null;
    }

    private static List<string> FuzzReader(int seed, int iterations)
    {
        var random = new Random(seed);
        var failures = new List<string>();
        for (int i = 0; i < iterations && failures.Count < 5; i++)
        {
            var data = RandomInput(random);
            int max = Limits[random.Next(Limits.Length)];
            var failure = RunOne(data, RandomShape(data, random), max);
            if (failure != null)
            {
                failures.Add($"seed {seed} iteration {i} max {max} input {Hex(data)}: {failure}");
            }
        }
        return failures;
    }

    [Test]
    [Arguments(1)]
    [Arguments(2)]
    [Arguments(3)]
    [Arguments(4)]
    [Arguments(987654321)]
    public async Task Reader_on_random_input_returns_frames_false_or_a_protocol_exception(int seed)
    {
        var failures = FuzzReader(seed, 5000);
        await Assert.That(string.Join("\n", failures)).IsEqualTo("");
    }

    [Test]
    public async Task Reader_on_random_input_with_a_fresh_seed()
    {
        int seed = Environment.TickCount;
        var failures = FuzzReader(seed, 5000);
        await Assert.That(string.Join("\n", failures)).IsEqualTo("").Because($"seed {seed}");
    }

    private static string? ParseOne(byte[] raw, int minArgs, int maxArgs)
    {
        try
        {
            var view = new FrameView(raw);
            bool parsed = QueueCommand.TryParse(view, minArgs, maxArgs, out var command);
            int argsLength = raw.Length - 5 - 24 - 16;
            bool shouldParse = argsLength >= minArgs && argsLength <= maxArgs && argsLength >= 0;
            if (parsed != shouldParse)
            {
                return $"TryParse returned {parsed} for {argsLength} args in [{minArgs}, {maxArgs}]";
            }
            if (parsed)
            {
                if (command.QueueId.Length != 24 || command.Mac.Length != 16 || command.Args.Length != argsLength ||
                    command.MacInput.Length != raw.Length - 16)
                {
                    return "field lengths do not add up";
                }
                if (!command.QueueId.SequenceEqual(raw.AsSpan(5, 24)) ||
                    !command.Args.SequenceEqual(raw.AsSpan(29, argsLength)) ||
                    !command.Mac.SequenceEqual(raw.AsSpan(raw.Length - 16)) ||
                    !command.MacInput.SequenceEqual(raw.AsSpan(0, raw.Length - 16)))
                {
                    return "fields do not point at the frame bytes";
                }
            }
            return null;
        }
        catch (Exception e)
        {
            return $"threw {e.GetType().Name}: {e.Message}";
        }
    }

    [Test]
    [Arguments(1)]
    [Arguments(2)]
    [Arguments(3)]
    public async Task Queue_command_parse_of_random_payloads_never_throws(int seed)
    {
        var random = new Random(seed);
        var failures = new List<string>();
        for (int i = 0; i < 20_000 && failures.Count < 5; i++)
        {
            var raw = new byte[random.Next(5, 5 + 24 + 16 + 80)];
            random.NextBytes(raw);
            int min = random.Next(0, 90);
            int max = random.Next(4) == 0 ? int.MaxValue : random.Next(0, 90);
            var failure = ParseOne(raw, min, max);
            if (failure != null)
            {
                failures.Add($"seed {seed} iteration {i} raw {Hex(raw)} min {min} max {max}: {failure}");
            }
        }

        await Assert.That(string.Join("\n", failures)).IsEqualTo("");
    }

    [Test]
    [Arguments(5)]
    [Arguments(6)]
    public async Task Frames_read_from_random_streams_parse_as_views_without_throwing(int seed)
    {
        var random = new Random(seed);
        var failures = new List<string>();
        for (int i = 0; i < 3000 && failures.Count < 5; i++)
        {
            var data = RandomInput(random);
            var result = ReadAll(RandomShape(data, random), ProtocolConstants.DefaultMaxFrame);
            foreach (var frame in result.Frames)
            {
                var failure = ParseOne(frame, random.Next(0, 40), random.Next(0, 40));
                if (failure != null)
                {
                    failures.Add($"seed {seed} iteration {i} frame {Hex(frame)}: {failure}");
                }
            }
        }

        await Assert.That(string.Join("\n", failures)).IsEqualTo("");
    }
}
