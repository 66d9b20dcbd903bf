using System.Buffers;

namespace Relay.Server.Connections;

/// <summary>
/// A connection's output bytes between sends: one contiguous array from the shared pool, rented when the
/// first frame is written and returned once it is sent, so an idle connection holds none. The arrays'
/// sizes are counted in <paramref name="memory"/>, the relay-wide total.
/// </summary>
internal sealed class OutputBuffer(SharedMemory? memory = null) : IBufferWriter<byte>
{
    private const int MinimumSize = 4096;

    private byte[]? _buffer;
    private int _written;

    public int Length => _written;

    public ReadOnlyMemory<byte> WrittenMemory => _buffer.AsMemory(0, _written);

    public void Advance(int count)
    {
        if ((uint)count > (uint)(Capacity - _written))
        {
            throw new ArgumentOutOfRangeException(nameof(count));
        }
        _written += count;
    }

    public Memory<byte> GetMemory(int sizeHint = 0)
    {
        Ensure(sizeHint);
        return _buffer.AsMemory(_written);
    }

    public Span<byte> GetSpan(int sizeHint = 0)
    {
        Ensure(sizeHint);
        return _buffer.AsSpan(_written);
    }

    /// <summary>Forgets the bytes and gives the array back to the pool.</summary>
    public void Reset()
    {
        _written = 0;
        if (_buffer != null)
        {
            memory?.Add(-_buffer.Length);
            ArrayPool<byte>.Shared.Return(_buffer);
            _buffer = null;
        }
    }

    private int Capacity => _buffer?.Length ?? 0;

    private void Ensure(int sizeHint)
    {
        int needed = _written + Math.Max(sizeHint, 1);
        if (needed <= Capacity)
        {
            return;
        }
        var larger = ArrayPool<byte>.Shared.Rent(Math.Max(needed, Math.Max(MinimumSize, Capacity * 2)));
        memory?.Add(larger.Length - Capacity);
        if (_buffer != null)
        {
            _buffer.AsSpan(0, _written).CopyTo(larger);
            ArrayPool<byte>.Shared.Return(_buffer);
        }
        _buffer = larger;
    }
}
