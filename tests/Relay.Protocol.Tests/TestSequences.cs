using System.Buffers;
using System.Buffers.Binary;

namespace Relay.Protocol.Tests;

internal sealed class BufferSegment : ReadOnlySequenceSegment<byte>
{
    public BufferSegment(ReadOnlyMemory<byte> memory)
    {
        Memory = memory;
    }

    public BufferSegment Append(ReadOnlyMemory<byte> memory)
    {
        var next = new BufferSegment(memory) { RunningIndex = RunningIndex + Memory.Length };
        Next = next;
        return next;
    }
}

internal sealed record ReadResult(IReadOnlyList<byte[]> Frames, long Remaining, ErrorCode? Error);

internal static class TestSequences
{
    private const byte Poison = 0xEE;

    public static byte[] Concat(params byte[][] parts)
    {
        var result = new byte[parts.Sum(p => p.Length)];
        int at = 0;
        foreach (var part in parts)
        {
            part.CopyTo(result, at);
            at += part.Length;
        }
        return result;
    }

    public static byte[] Hex(string hex) => Convert.FromHexString(hex);

    public static string Hex(ReadOnlySpan<byte> bytes) => Convert.ToHexString(bytes);

    public static byte[] Pattern(int length, byte seed)
    {
        var bytes = new byte[length];
        for (int i = 0; i < length; i++)
        {
            bytes[i] = unchecked((byte)(seed + i * 7));
        }
        return bytes;
    }

    public static byte[] Write(Action<ArrayBufferWriter<byte>> write)
    {
        var writer = new ArrayBufferWriter<byte>();
        write(writer);
        return writer.WrittenSpan.ToArray();
    }

    public static byte[] LengthPrefix(uint length)
    {
        var prefix = new byte[4];
        BinaryPrimitives.WriteUInt32BigEndian(prefix, length);
        return prefix;
    }

    /// <summary>Copies each part into its own array surrounded by poison bytes, so reads outside a segment see garbage.</summary>
    private static ReadOnlyMemory<byte> Isolated(ReadOnlySpan<byte> part)
    {
        var backing = new byte[part.Length + 16];
        backing.AsSpan().Fill(Poison);
        part.CopyTo(backing.AsSpan(8));
        return new ReadOnlyMemory<byte>(backing, 8, part.Length);
    }

    public static ReadOnlySequence<byte> FromParts(IReadOnlyList<byte[]> parts)
    {
        if (parts.Count == 0)
        {
            return ReadOnlySequence<byte>.Empty;
        }
        var first = new BufferSegment(Isolated(parts[0]));
        var last = first;
        for (int i = 1; i < parts.Count; i++)
        {
            last = last.Append(Isolated(parts[i]));
        }
        return new ReadOnlySequence<byte>(first, 0, last, last.Memory.Length);
    }

    public static ReadOnlySequence<byte> Single(byte[] data) => FromParts([data]);

    /// <summary>Segments ending at each of the ascending <paramref name="cuts"/>, then the rest.</summary>
    public static ReadOnlySequence<byte> SplitAt(byte[] data, params int[] cuts)
    {
        var parts = new List<byte[]>();
        int from = 0;
        foreach (int cut in cuts)
        {
            parts.Add(data[from..cut]);
            from = cut;
        }
        parts.Add(data[from..]);
        return FromParts(parts);
    }

    public static ReadOnlySequence<byte> OneBytePerSegment(byte[] data)
    {
        if (data.Length == 0)
        {
            return ReadOnlySequence<byte>.Empty;
        }
        return FromParts(data.Select(b => new[] { b }).ToList());
    }

    /// <summary>Random segment sizes from 0 (an empty segment) to <paramref name="maxSegment"/>.</summary>
    public static ReadOnlySequence<byte> RandomSplit(byte[] data, Random random, int maxSegment)
    {
        var parts = new List<byte[]>();
        int at = 0;
        while (at < data.Length)
        {
            int size = Math.Min(random.Next(0, maxSegment + 1), data.Length - at);
            parts.Add(data[at..(at + size)]);
            at += size;
        }
        if (parts.Count == 0)
        {
            parts.Add([]);
        }
        return FromParts(parts);
    }

    /// <summary>Reads frames until the reader wants more bytes or throws a <see cref="ProtocolException"/>.</summary>
    public static ReadResult ReadAll(ReadOnlySequence<byte> buffer, int maxFrameLength)
    {
        var frames = new List<byte[]>();
        try
        {
            while (FrameReader.TryRead(ref buffer, maxFrameLength, out var frame))
            {
                frames.Add(frame.ToArray());
            }
        }
        catch (ProtocolException e)
        {
            return new ReadResult(frames, buffer.Length, e.Code);
        }
        return new ReadResult(frames, buffer.Length, null);
    }

    /// <summary>What a correct reader must produce for <paramref name="data"/>, following docs/PROTOCOL.md §3.</summary>
    public static ReadResult Expected(byte[] data, int maxFrameLength)
    {
        var frames = new List<byte[]>();
        int at = 0;
        while (data.Length - at >= 4)
        {
            uint length = BinaryPrimitives.ReadUInt32BigEndian(data.AsSpan(at));
            if (length > (uint)maxFrameLength)
            {
                return new ReadResult(frames, data.Length - at, ErrorCode.TooLarge);
            }
            if (length < 5)
            {
                return new ReadResult(frames, data.Length - at, ErrorCode.Syntax);
            }
            if (data.Length - at - 4 < length)
            {
                break;
            }
            frames.Add(data[(at + 4)..(at + 4 + (int)length)]);
            at += 4 + (int)length;
        }
        return new ReadResult(frames, data.Length - at, null);
    }

    public static string Describe(ReadResult result) =>
        $"{result.Frames.Count} frames [{string.Join(",", result.Frames.Select(f => f.Length))}], " +
        $"remaining {result.Remaining}, error {result.Error?.ToString() ?? "none"}";

    public static bool SameFrames(ReadResult a, ReadResult b) =>
        a.Frames.Count == b.Frames.Count && a.Frames.Zip(b.Frames).All(p => p.First.AsSpan().SequenceEqual(p.Second));
}
