using System.Buffers;
using static Relay.Protocol.Tests.TestSequences;

namespace Relay.Protocol.Tests;

public class FragmentationTests
{
    private const int Max = ProtocolConstants.DefaultMaxFrame;

    public static IEnumerable<string> FixtureNames() => Fixtures.Names();

    private static string CheckSingleFrame(ReadOnlySequence<byte> buffer, byte[] wire, byte[] trailing)
    {
        if (!FrameReader.TryRead(ref buffer, Max, out var frame))
        {
            return "TryRead returned false on a complete frame";
        }
        if (!frame.ToArray().AsSpan().SequenceEqual(wire.AsSpan(4)))
        {
            return $"frame bytes differ: {Hex(frame.ToArray())}";
        }
        if (!buffer.ToArray().AsSpan().SequenceEqual(trailing))
        {
            return $"left {Hex(buffer.ToArray())}, expected {Hex(trailing)}";
        }
        return "";
    }

    [Test]
    [MethodDataSource(nameof(FixtureNames))]
    public async Task Whole_frame_is_read(string fixture)
    {
        var wire = Fixtures.Get(fixture);
        await Assert.That(CheckSingleFrame(Single(wire), wire, [])).IsEqualTo("");
    }

    [Test]
    [MethodDataSource(nameof(FixtureNames))]
    public async Task Trailing_bytes_are_left_in_the_buffer(string fixture)
    {
        var wire = Fixtures.Get(fixture);
        var failures = new List<string>();
        byte[][] trailers =
        [
            [0xAA],
            [0x00, 0x00, 0x00],
            Fixtures.Get("PING")[..7],
            Fixtures.Get("HELLO"),
            Fixtures.Get(fixture),
        ];
        foreach (var trailing in trailers)
        {
            var data = Concat(wire, trailing);
            var result = CheckSingleFrame(Single(data), wire, trailing);
            if (result.Length > 0)
            {
                failures.Add($"trailing {Hex(trailing)}: {result}");
            }
            result = CheckSingleFrame(SplitAt(data, wire.Length), wire, trailing);
            if (result.Length > 0)
            {
                failures.Add($"trailing {Hex(trailing)} in its own segment: {result}");
            }
        }

        await Assert.That(string.Join("\n", failures)).IsEqualTo("");
    }

    [Test]
    [MethodDataSource(nameof(FixtureNames))]
    public async Task Frame_split_in_two_at_every_offset_is_read(string fixture)
    {
        var wire = Fixtures.Get(fixture);
        var trailing = new byte[] { 1, 2, 3, 4, 5 };
        var data = Concat(wire, trailing);
        var failures = new List<string>();
        for (int cut = 0; cut <= data.Length; cut++)
        {
            var result = CheckSingleFrame(SplitAt(data, cut), wire, trailing);
            if (result.Length > 0)
            {
                failures.Add($"cut at {cut}: {result}");
            }
        }

        await Assert.That(string.Join("\n", failures)).IsEqualTo("");
    }

    [Test]
    [MethodDataSource(nameof(FixtureNames))]
    public async Task Frame_split_in_three_at_every_pair_of_offsets_is_read(string fixture)
    {
        var wire = Fixtures.Get(fixture);
        int limit = Math.Min(wire.Length, 64);
        var failures = new List<string>();
        for (int a = 0; a <= limit; a++)
        {
            for (int b = a; b <= limit; b++)
            {
                var result = CheckSingleFrame(SplitAt(wire, a, b), wire, []);
                if (result.Length > 0)
                {
                    failures.Add($"cuts at {a},{b}: {result}");
                }
            }
        }

        await Assert.That(string.Join("\n", failures)).IsEqualTo("");
    }

    [Test]
    [MethodDataSource(nameof(FixtureNames))]
    public async Task Frame_with_one_byte_per_segment_is_read(string fixture)
    {
        var wire = Fixtures.Get(fixture);
        var trailing = new byte[] { 9, 9 };
        await Assert.That(CheckSingleFrame(OneBytePerSegment(wire), wire, [])).IsEqualTo("");
        await Assert.That(CheckSingleFrame(OneBytePerSegment(Concat(wire, trailing)), wire, trailing)).IsEqualTo("");
    }

    [Test]
    [MethodDataSource(nameof(FixtureNames))]
    public async Task Incomplete_frame_returns_false_and_leaves_the_buffer_unchanged(string fixture)
    {
        var wire = Fixtures.Get(fixture);
        var failures = new List<string>();
        for (int k = 0; k < wire.Length; k++)
        {
            var prefix = wire[..k];
            foreach (var (shape, before) in new[] { ("single", Single(prefix)), ("bytewise", OneBytePerSegment(prefix)) })
            {
                var buffer = before;
                bool read = FrameReader.TryRead(ref buffer, Max, out _);
                if (read)
                {
                    failures.Add($"{shape} k={k}: returned a frame");
                }
                if (buffer.Length != k || !buffer.Start.Equals(before.Start) || !buffer.End.Equals(before.End))
                {
                    failures.Add($"{shape} k={k}: buffer changed to length {buffer.Length}");
                }
            }
        }
        var whole = Single(wire);
        bool completes = FrameReader.TryRead(ref whole, Max, out _);

        await Assert.That(string.Join("\n", failures)).IsEqualTo("");
        await Assert.That(completes).IsTrue();
        await Assert.That(whole.Length).IsEqualTo(0L);
    }

    private static (byte[] Stream, List<byte[]> Frames) RandomStream(Random random, int count)
    {
        var all = Fixtures.Frames().ToArray();
        var frames = new List<byte[]>();
        for (int i = 0; i < count; i++)
        {
            frames.Add(all[random.Next(all.Length)]);
        }
        return (Concat(frames.ToArray()), frames.Select(f => f[4..]).ToList());
    }

    [Test]
    [Arguments(1)]
    [Arguments(2)]
    [Arguments(3)]
    [Arguments(20240601)]
    public async Task Many_frames_split_randomly_are_all_read_in_order(int seed)
    {
        var random = new Random(seed);
        var failures = new List<string>();
        for (int round = 0; round < 50; round++)
        {
            var (stream, expected) = RandomStream(random, random.Next(1, 60));
            int maxSegment = random.Next(1, 40);
            var result = ReadAll(RandomSplit(stream, random, maxSegment), Max);
            var want = new ReadResult(expected, 0, null);
            if (!SameFrames(result, want) || result.Remaining != 0 || result.Error != null)
            {
                failures.Add($"seed {seed} round {round}: got {Describe(result)}, want {Describe(want)}");
            }
        }

        await Assert.That(string.Join("\n", failures)).IsEqualTo("");
    }

    [Test]
    [Arguments(11)]
    [Arguments(12)]
    [Arguments(13)]
    public async Task Frames_arriving_in_random_chunks_are_read_like_a_pipe(int seed)
    {
        var random = new Random(seed);
        var (stream, expected) = RandomStream(random, 200);
        var got = new List<byte[]>();
        int consumed = 0;
        int available = 0;
        string failure = "";
        while (available < stream.Length)
        {
            available = Math.Min(stream.Length, available + random.Next(0, 50));
            var buffer = RandomSplit(stream[consumed..available], random, 17);
            long before = buffer.Length;
            while (FrameReader.TryRead(ref buffer, Max, out var frame))
            {
                got.Add(frame.ToArray());
            }
            consumed += (int)(before - buffer.Length);
            if (buffer.Length >= 4 + 5 + 80 + 65536)
            {
                failure = $"seed {seed}: reader stalled at {consumed}";
                break;
            }
        }
        var result = new ReadResult(got, stream.Length - consumed, null);
        var want = new ReadResult(expected, 0, null);

        await Assert.That(failure).IsEqualTo("");
        await Assert.That(SameFrames(result, want)).IsTrue().Because($"seed {seed}: got {Describe(result)}, want {Describe(want)}");
        await Assert.That(consumed).IsEqualTo(stream.Length);
    }
}
