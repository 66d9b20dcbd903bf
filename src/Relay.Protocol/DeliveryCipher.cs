using System.Runtime.InteropServices;
using System.Security.Cryptography;

namespace Relay.Protocol;

/// <summary>
/// ChaCha20-Poly1305 (RFC 8439) under one delivery key (PROTOCOL.md §7): the relay seals every MSG
/// with it and the recipient opens it. It drives libcrypto's EVP interface directly with one context
/// per direction, keyed once: per message only the nonce is set, then AAD, data, final and tag. The
/// BCL's <see cref="ChaCha20Poly1305"/> makes the same calls through .NET's OpenSSL shim, whose per-call
/// overhead was most of the cost of sealing a small message (1,319 vs 711 ns for 256 bytes,
/// DeliveryBenchmarks). Where libcrypto 3 cannot be called directly, or disagrees with the BCL on a
/// known input, the BCL type does the work. Not thread-safe: one user at a time (a subscription under
/// its queue's lock, a connection's read loop). <see cref="Dispose"/> is the exception: it may be called
/// again, and on several threads at once.
/// </summary>
public sealed unsafe class DeliveryCipher : IDisposable
{
    private readonly byte[] _key;
    private nint _seal;
    private nint _open;
    private ChaCha20Poly1305? _bcl;
    private int _disposed;   // 1 once Dispose has begun
    private int _contextsFreed;

    private readonly bool _native;

    public DeliveryCipher(ReadOnlySpan<byte> key)
        : this(key, EvpChaCha20Poly1305.Available)
    {
    }

    /// <summary>With <paramref name="native"/> false: the BCL path, as where libcrypto 3 is missing (tests).</summary>
    internal DeliveryCipher(ReadOnlySpan<byte> key, bool native)
    {
        if (key.Length != ProtocolConstants.KeySize)
        {
            throw new ArgumentException($"a delivery key is {ProtocolConstants.KeySize} bytes", nameof(key));
        }
        _key = key.ToArray();
        _native = native;
    }

    /// <summary>Seals <paramref name="plaintext"/> into <paramref name="ciphertext"/> (same length; may be the same memory) and writes the 16-byte tag.</summary>
    public void Encrypt(ReadOnlySpan<byte> nonce, ReadOnlySpan<byte> plaintext, Span<byte> ciphertext, Span<byte> tag, ReadOnlySpan<byte> aad)
    {
        CheckSizes(nonce, plaintext.Length, ciphertext.Length, tag.Length);
        ObjectDisposedException.ThrowIf(_disposed != 0, this);
        if (!_native)
        {
            (_bcl ??= new ChaCha20Poly1305(_key)).Encrypt(nonce, plaintext, ciphertext, tag, aad);
            return;
        }
        if (_seal == 0)
        {
            _seal = EvpChaCha20Poly1305.NewContext(_key, encrypt: true);
        }
        EvpChaCha20Poly1305.Seal(_seal, nonce, plaintext, ciphertext, tag, aad);
    }

    /// <summary>Opens <paramref name="ciphertext"/> into <paramref name="plaintext"/>; false (and <paramref name="plaintext"/> cleared) when the tag does not match.</summary>
    public bool TryDecrypt(ReadOnlySpan<byte> nonce, ReadOnlySpan<byte> ciphertext, ReadOnlySpan<byte> tag, Span<byte> plaintext, ReadOnlySpan<byte> aad)
    {
        CheckSizes(nonce, ciphertext.Length, plaintext.Length, tag.Length);
        ObjectDisposedException.ThrowIf(_disposed != 0, this);
        bool ok;
        if (!_native)
        {
            try
            {
                (_bcl ??= new ChaCha20Poly1305(_key)).Decrypt(nonce, ciphertext, tag, plaintext, aad);
                ok = true;
            }
            catch (AuthenticationTagMismatchException)
            {
                ok = false;
            }
        }
        else
        {
            if (_open == 0)
            {
                _open = EvpChaCha20Poly1305.NewContext(_key, encrypt: false);
            }
            ok = EvpChaCha20Poly1305.Open(_open, nonce, ciphertext, tag, plaintext, aad);
        }
        if (!ok)
        {
            CryptographicOperations.ZeroMemory(plaintext);
        }
        return ok;
    }

    private static void CheckSizes(ReadOnlySpan<byte> nonce, int inLength, int outLength, int tagLength)
    {
        if (nonce.Length != ProtocolConstants.NonceSize || tagLength != ProtocolConstants.TagSize || inLength != outLength)
        {
            throw new ArgumentException("ChaCha20-Poly1305 takes a 12-byte nonce, a 16-byte tag and an output as long as its input");
        }
    }

    /// <summary>True once disposed (its native contexts are freed).</summary>
    public bool IsDisposed => Volatile.Read(ref _disposed) != 0;

    /// <summary>Native contexts this cipher's <see cref="Dispose"/> freed: one per direction used, never more.</summary>
    internal int ContextsFreed => Volatile.Read(ref _contextsFreed);

    public void Dispose()
    {
        // Only the first call frees, whichever thread makes it: a subscription can end on two threads
        // at once (its connection closing while another's SUB takes the queue or a DEL removes it),
        // and a context freed twice corrupts the native heap.
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
        {
            return;
        }
        if (EvpChaCha20Poly1305.Free(ref _seal)) Interlocked.Increment(ref _contextsFreed);
        if (EvpChaCha20Poly1305.Free(ref _open)) Interlocked.Increment(ref _contextsFreed);
        _bcl?.Dispose();
        CryptographicOperations.ZeroMemory(_key);
        GC.SuppressFinalize(this);
    }

    /// <summary>A cipher nobody disposed still frees its native contexts.</summary>
    ~DeliveryCipher()
    {
        EvpChaCha20Poly1305.Free(ref _seal);
        EvpChaCha20Poly1305.Free(ref _open);
    }
}

/// <summary>libcrypto's EVP calls for ChaCha20-Poly1305, and the check that they can be used here.</summary>
internal static unsafe partial class EvpChaCha20Poly1305
{
    private const string Lib = "libcrypto.so.3";
    private const int CtrlAeadGetTag = 0x10;
    private const int CtrlAeadSetTag = 0x11;

    [LibraryImport(Lib)] private static partial nint EVP_CIPHER_CTX_new();
    [LibraryImport(Lib)] private static partial void EVP_CIPHER_CTX_free(nint context);
    [LibraryImport(Lib)] private static partial nint EVP_chacha20_poly1305();
    [LibraryImport(Lib)] private static partial int EVP_CipherInit_ex(nint context, nint cipher, nint engine, byte* key, byte* iv, int encrypt);
    [LibraryImport(Lib)] private static partial int EVP_CipherUpdate(nint context, byte* output, int* outputLength, byte* input, int inputLength);
    [LibraryImport(Lib)] private static partial int EVP_CipherFinal_ex(nint context, byte* output, int* outputLength);
    [LibraryImport(Lib)] private static partial int EVP_CIPHER_CTX_ctrl(nint context, int type, int arg, void* pointer);

    public static bool Available { get; } = Probe();

    public static nint NewContext(ReadOnlySpan<byte> key, bool encrypt)
    {
        nint context = EVP_CIPHER_CTX_new();
        if (context == 0)
        {
            throw new CryptographicException("libcrypto could not allocate a cipher context");
        }
        fixed (byte* k = key)
        {
            if (EVP_CipherInit_ex(context, EVP_chacha20_poly1305(), 0, k, null, encrypt ? 1 : 0) != 1)
            {
                EVP_CIPHER_CTX_free(context);
                throw new CryptographicException("libcrypto refused the ChaCha20-Poly1305 key");
            }
        }
        return context;
    }

    /// <summary>Frees <paramref name="context"/> when it is set, and clears it; true when it freed one.</summary>
    public static bool Free(ref nint context)
    {
        if (context != 0)
        {
            EVP_CIPHER_CTX_free(context);   // also clears the key schedule
            context = 0;
            return true;
        }
        return false;
    }

    public static void Seal(nint context, ReadOnlySpan<byte> nonce, ReadOnlySpan<byte> plaintext, Span<byte> ciphertext, Span<byte> tag, ReadOnlySpan<byte> aad)
    {
        fixed (byte* c = ciphertext)
        fixed (byte* t = tag)
        {
            int last = 0;
            if (!Update(context, nonce, aad, plaintext, c, out int written)
                || EVP_CipherFinal_ex(context, c + written, &last) != 1
                || written + last != plaintext.Length
                || EVP_CIPHER_CTX_ctrl(context, CtrlAeadGetTag, ProtocolConstants.TagSize, t) != 1)
            {
                throw new CryptographicException("libcrypto failed to seal with ChaCha20-Poly1305");
            }
        }
    }

    public static bool Open(nint context, ReadOnlySpan<byte> nonce, ReadOnlySpan<byte> ciphertext, ReadOnlySpan<byte> tag, Span<byte> plaintext, ReadOnlySpan<byte> aad)
    {
        fixed (byte* p = plaintext)
        fixed (byte* t = tag)
        {
            if (!Update(context, nonce, aad, ciphertext, p, out int written)
                || EVP_CIPHER_CTX_ctrl(context, CtrlAeadSetTag, ProtocolConstants.TagSize, t) != 1)
            {
                throw new CryptographicException("libcrypto failed to open with ChaCha20-Poly1305");
            }
            // The tag is checked here: 1 when it matches.
            int last = 0;
            return EVP_CipherFinal_ex(context, p + written, &last) == 1 && written + last == ciphertext.Length;
        }
    }

    /// <summary>Starts a message under <paramref name="nonce"/> (the key stays) and runs the AAD and <paramref name="input"/> through it.</summary>
    private static bool Update(nint context, ReadOnlySpan<byte> nonce, ReadOnlySpan<byte> aad, ReadOnlySpan<byte> input, byte* output, out int written)
    {
        written = 0;
        int n = 0;
        fixed (byte* iv = nonce)
        fixed (byte* a = aad)
        fixed (byte* i = input)
        {
            bool ok = EVP_CipherInit_ex(context, 0, 0, null, iv, -1) == 1
                && (aad.Length == 0 || EVP_CipherUpdate(context, null, &n, a, aad.Length) == 1)
                && EVP_CipherUpdate(context, output, &n, i, input.Length) == 1;
            written = n;
            return ok;
        }
    }

    /// <summary>Seals and opens one input both here and with the BCL: usable only when all agree.</summary>
    private static bool Probe()
    {
        nint seal = 0, open = 0;
        try
        {
            byte[] key = new byte[32], nonce = new byte[12], aad = new byte[32], plain = new byte[261];
            for (int i = 0; i < plain.Length; i++) plain[i] = (byte)i;
            for (int i = 0; i < key.Length; i++) key[i] = (byte)(7 * i + 1);
            nonce[11] = 9;
            aad[0] = 5;
            byte[] mine = new byte[plain.Length], mineTag = new byte[16], theirs = new byte[plain.Length], theirTag = new byte[16];
            seal = NewContext(key, encrypt: true);
            open = NewContext(key, encrypt: false);
            Seal(seal, nonce, plain, mine, mineTag, aad);
            using (var bcl = new ChaCha20Poly1305(key))
            {
                bcl.Encrypt(nonce, plain, theirs, theirTag, aad);
            }
            byte[] opened = new byte[plain.Length];
            bool agree = mine.AsSpan().SequenceEqual(theirs) && mineTag.AsSpan().SequenceEqual(theirTag)
                && Open(open, nonce, theirs, theirTag, opened, aad) && opened.AsSpan().SequenceEqual(plain);
            theirTag[0] ^= 1;
            return agree && !Open(open, nonce, theirs, theirTag, opened, aad);
        }
        catch (Exception ex) when (ex is DllNotFoundException or EntryPointNotFoundException or BadImageFormatException or CryptographicException)
        {
            return false;
        }
        finally
        {
            Free(ref seal);
            Free(ref open);
        }
    }
}
