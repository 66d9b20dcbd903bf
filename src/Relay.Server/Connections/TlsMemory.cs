using System.Net.Security;
using System.Reflection;
using System.Runtime.InteropServices;

namespace Relay.Server.Connections;

/// <summary>
/// Lets OpenSSL free a connection's TLS record buffers while it is idle.
/// </summary>
/// <remarks>
/// OpenSSL keeps a read buffer (about 17 KB) and a write buffer (about 17 KB) per connection for its whole
/// life unless <c>SSL_MODE_RELEASE_BUFFERS</c> is set, which <see cref="SslStream"/> does not do: that is
/// most of what an idle subscribed connection costs. The mode only changes when OpenSSL allocates; it
/// changes no byte on the wire. The two memory BIOs through which <see cref="SslStream"/> feeds OpenSSL
/// keep the largest size they held (the handshake flights) and are started afresh after the handshake.
/// <see cref="SslStream"/> keeps its <c>SSL*</c> in a private field, read
/// here by reflection (the trimmer keeps the field it names). When a runtime no longer has
/// that field, or the handle is not OpenSSL's (another platform), nothing happens and
/// <see cref="TryReleaseBuffersWhenIdle"/> says so, so the relay still works, only with more memory.
/// </remarks>
internal static partial class TlsMemory
{
    private const int SslCtrlMode = 33;           // SSL_CTRL_MODE
    private const long SslModeReleaseBuffers = 0x10; // SSL_MODE_RELEASE_BUFFERS

    // A field of a type this assembly cannot name, so UnsafeAccessor cannot return it under NativeAOT;
    // the trimmer sees the literal name on a known type and keeps the field.
    private static readonly FieldInfo? s_securityContext =
        typeof(SslStream).GetField("_securityContext", BindingFlags.Instance | BindingFlags.NonPublic);

    private static int s_unavailable = OperatingSystem.IsLinux() && s_securityContext != null ? 0 : 1;

    private static int s_reported;

    /// <summary>Whether OpenSSL's handle can still be reached on this runtime.</summary>
    public static bool Available => Volatile.Read(ref s_unavailable) == 0;

    /// <summary>True once per process: the caller logs that buffers are kept.</summary>
    public static bool FirstFailure() => Interlocked.Exchange(ref s_reported, 1) == 0;

    private const int BioCtrlPending = 10;         // BIO_CTRL_PENDING
    private const int BioSetBufMem = 114;          // BIO_C_SET_BUF_MEM
    private const long BioClose = 1;               // BIO_CLOSE
    private const int BioTypeMem = 0x0401;         // BIO_TYPE_MEM

    [LibraryImport("libssl.so.3", EntryPoint = "SSL_ctrl")]
    private static partial long SslCtrl(IntPtr ssl, int cmd, long larg, IntPtr parg);

    [LibraryImport("libssl.so.3", EntryPoint = "SSL_get_rbio")]
    private static partial IntPtr SslGetReadBio(IntPtr ssl);

    [LibraryImport("libssl.so.3", EntryPoint = "SSL_get_wbio")]
    private static partial IntPtr SslGetWriteBio(IntPtr ssl);

    [LibraryImport("libcrypto.so.3", EntryPoint = "BIO_ctrl")]
    private static partial long BioCtrl(IntPtr bio, int cmd, long larg, IntPtr parg);

    [LibraryImport("libcrypto.so.3", EntryPoint = "BIO_method_type")]
    private static partial int BioMethodType(IntPtr bio);

    [LibraryImport("libcrypto.so.3", EntryPoint = "BUF_MEM_new")]
    private static partial IntPtr BufMemNew();

    [LibraryImport("libcrypto.so.3", EntryPoint = "BUF_MEM_free")]
    private static partial void BufMemFree(IntPtr buffer);

    /// <summary>Sets <c>SSL_MODE_RELEASE_BUFFERS</c> on an authenticated server stream and starts its memory BIOs afresh; false when it could not.</summary>
    public static bool TryReleaseBuffersWhenIdle(SslStream stream) => TryReleaseBuffersWhenIdle(stream, out _);

    /// <inheritdoc cref="TryReleaseBuffersWhenIdle(SslStream)"/>
    /// <param name="biosShrunk">How many of the stream's two memory BIOs were given a fresh buffer.</param>
    internal static bool TryReleaseBuffersWhenIdle(SslStream stream, out int biosShrunk)
    {
        biosShrunk = 0;
        if (!Available)
        {
            return false;
        }
        try
        {
            if (s_securityContext?.GetValue(stream) is not SafeHandle handle || handle.IsInvalid || handle.IsClosed)
            {
                return false;
            }
            bool added = false;
            handle.DangerousAddRef(ref added);
            try
            {
                IntPtr ssl = handle.DangerousGetHandle();
                long mode = SslCtrl(ssl, SslCtrlMode, SslModeReleaseBuffers, IntPtr.Zero);
                // SslStream moves bytes through two memory BIOs, which keep the largest size they
                // ever held (the handshake flights, about 1.8 KB together): start both afresh.
                biosShrunk = (ShrinkMemoryBio(SslGetReadBio(ssl)) ? 1 : 0) + (ShrinkMemoryBio(SslGetWriteBio(ssl)) ? 1 : 0);
                return (mode & SslModeReleaseBuffers) != 0;
            }
            finally
            {
                if (added) handle.DangerousRelease();
            }
        }
        catch (Exception)
        {
            Volatile.Write(ref s_unavailable, 1);
            return false;
        }
    }

    /// <summary>Gives an empty memory BIO a new, unallocated buffer (the BIO frees the old one); false when it did not.</summary>
    private static bool ShrinkMemoryBio(IntPtr bio)
    {
        if (bio == IntPtr.Zero || BioMethodType(bio) != BioTypeMem || BioCtrl(bio, BioCtrlPending, 0, IntPtr.Zero) != 0)
        {
            return false;
        }
        IntPtr fresh = BufMemNew();
        if (fresh == IntPtr.Zero)
        {
            return false;
        }
        if (BioCtrl(bio, BioSetBufMem, BioClose, fresh) == 1)
        {
            return true;
        }
        BufMemFree(fresh);
        return false;
    }
}
