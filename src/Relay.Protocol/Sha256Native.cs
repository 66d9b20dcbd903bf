using System.Runtime.InteropServices;
using System.Security.Cryptography;

namespace Relay.Protocol;

/// <summary>
/// SHA-256 from OpenSSL's libcrypto (3.x), called directly. It lets <see cref="MacKey"/> keep the two
/// keyed HMAC states (after the key's inner and outer block) and start every MAC from a copy of them:
/// four plain calls per MAC, no allocation. The BCL's HMAC reuse goes through .NET's OpenSSL shim
/// instead (update, final, reset: each clears OpenSSL's error queue and counts a SafeHandle, and the
/// reset allocates and frees a digest context), which on the relay's hot path cost more than the
/// hashing. <see cref="Available"/> is false where libcrypto.so.3 cannot be loaded or does not agree
/// with the BCL's HMAC on a known input; callers then use the BCL.
/// </summary>
internal static unsafe partial class Sha256Native
{
    private const string Lib = "libcrypto.so.3";

    /// <summary>sizeof(SHA256_CTX) in openssl/sha.h: u32 h[8], Nl, Nh, data[16], num, md_len.</summary>
    public const int ContextSize = 112;
    public const int BlockSize = 64;
    public const int HashSize = 32;

    [LibraryImport(Lib)] private static partial int SHA256_Init(byte* context);
    [LibraryImport(Lib)] private static partial int SHA256_Update(byte* context, byte* data, nuint length);
    [LibraryImport(Lib)] private static partial int SHA256_Final(byte* digest, byte* context);

    public static bool Available { get; } = Probe();

    /// <summary>
    /// Writes the HMAC-SHA256 states (inner, then outer) of <paramref name="key"/> into
    /// <paramref name="states"/> (2 × <see cref="ContextSize"/> bytes).
    /// </summary>
    public static void KeyStates(ReadOnlySpan<byte> key, Span<byte> states)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(states.Length, 2 * ContextSize, nameof(states));
        Span<byte> block = stackalloc byte[BlockSize];
        block.Clear();
        if (key.Length > BlockSize)
        {
            SHA256.HashData(key, block);
        }
        else
        {
            key.CopyTo(block);
        }
        Span<byte> pad = stackalloc byte[BlockSize];
        fixed (byte* s = states)
        fixed (byte* p = pad)
        {
            for (int i = 0; i < BlockSize; i++) pad[i] = (byte)(block[i] ^ 0x36);
            SHA256_Init(s);
            SHA256_Update(s, p, BlockSize);
            for (int i = 0; i < BlockSize; i++) pad[i] = (byte)(block[i] ^ 0x5c);
            SHA256_Init(s + ContextSize);
            SHA256_Update(s + ContextSize, p, BlockSize);
        }
        CryptographicOperations.ZeroMemory(block);
        CryptographicOperations.ZeroMemory(pad);
    }

    /// <summary>HMAC-SHA256 of <paramref name="input"/> from the states of <see cref="KeyStates"/>.</summary>
    public static void Hmac(ReadOnlySpan<byte> states, ReadOnlySpan<byte> input, Span<byte> mac)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(states.Length, 2 * ContextSize, nameof(states));
        ArgumentOutOfRangeException.ThrowIfLessThan(mac.Length, HashSize, nameof(mac));
        byte* context = stackalloc byte[ContextSize];
        fixed (byte* s = states)
        fixed (byte* data = input)
        fixed (byte* digest = mac)
        {
            Buffer.MemoryCopy(s, context, ContextSize, ContextSize);
            SHA256_Update(context, data, (nuint)input.Length);
            SHA256_Final(digest, context);
            Buffer.MemoryCopy(s + ContextSize, context, ContextSize, ContextSize);
            SHA256_Update(context, digest, HashSize);
            SHA256_Final(digest, context);
        }
    }

    private static bool Probe()
    {
        try
        {
            byte[] key = new byte[32];
            byte[] input = new byte[300];
            for (int i = 0; i < input.Length; i++) input[i] = (byte)i;
            for (int i = 0; i < key.Length; i++) key[i] = (byte)(255 - i);
            Span<byte> states = stackalloc byte[2 * ContextSize];
            Span<byte> mine = stackalloc byte[HashSize];
            Span<byte> theirs = stackalloc byte[HashSize];
            KeyStates(key, states);
            Hmac(states, input, mine);
            HMACSHA256.HashData(key, input, theirs);
            return mine.SequenceEqual(theirs);
        }
        catch (Exception ex) when (ex is DllNotFoundException or EntryPointNotFoundException or BadImageFormatException)
        {
            return false;
        }
    }
}
