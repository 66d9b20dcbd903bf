using System.Buffers.Binary;

namespace Relay.Server.Connections;

/// <summary>A 32-byte key as a dictionary key, without allocating.</summary>
internal readonly record struct Key32(ulong A, ulong B, ulong C, ulong D)
{
    public static Key32 From(ReadOnlySpan<byte> s) => new(
        BinaryPrimitives.ReadUInt64LittleEndian(s),
        BinaryPrimitives.ReadUInt64LittleEndian(s.Slice(8)),
        BinaryPrimitives.ReadUInt64LittleEndian(s.Slice(16)),
        BinaryPrimitives.ReadUInt64LittleEndian(s.Slice(24)));
}

/// <summary>A 24-byte queue id as a dictionary key, without allocating.</summary>
internal readonly record struct Id24(ulong A, ulong B, ulong C)
{
    public static Id24 From(ReadOnlySpan<byte> s) => new(
        BinaryPrimitives.ReadUInt64LittleEndian(s),
        BinaryPrimitives.ReadUInt64LittleEndian(s.Slice(8)),
        BinaryPrimitives.ReadUInt64LittleEndian(s.Slice(16)));
}
