using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using Relay.Protocol;

namespace Relay.Server.Hosting;

/// <summary>
/// The relay's long-lived identity certificate (its SPKI hash is the address fingerprint) and a
/// short-lived TLS certificate it signs. The TLS certificate is made fresh at every start, so
/// rotating it never changes the address.
/// </summary>
public sealed class RelayIdentity : IDisposable
{
    public const string FileName = "identity.pfx";

    public X509Certificate2 IdentityCertificate { get; }
    public string Fingerprint { get; }

    private RelayIdentity(X509Certificate2 identity)
    {
        IdentityCertificate = identity;
        Fingerprint = RelayAddress.FingerprintOf(identity);
    }

    public static string PathIn(string dataDirectory) => Path.Combine(dataDirectory, FileName);

    public static bool Exists(string dataDirectory) => File.Exists(PathIn(dataDirectory));

    /// <summary>
    /// The identity file's mode (octal, e.g. "644") when users other than its owner may read or
    /// write it, else null (and on Windows). relay init writes it 0600; a copy or a restore may not.
    /// </summary>
    public static string? ExposedMode(string dataDirectory)
    {
        if (OperatingSystem.IsWindows())
        {
            return null;
        }
        try
        {
            var mode = File.GetUnixFileMode(PathIn(dataDirectory));
            const UnixFileMode others = UnixFileMode.GroupRead | UnixFileMode.GroupWrite | UnixFileMode.OtherRead | UnixFileMode.OtherWrite;
            return (mode & others) != 0 ? Convert.ToString((int)mode, 8) : null;
        }
        catch (Exception ex) when (ex is IOException or UnauthorizedAccessException)
        {
            return null;
        }
    }

    /// <summary>Loads the identity, creating it (file mode 0600) when it does not exist yet.</summary>
    public static RelayIdentity LoadOrCreate(string dataDirectory, out bool created)
    {
        DurableDirectory.Create(dataDirectory);
        var path = PathIn(dataDirectory);
        created = false;
        if (!File.Exists(path))
        {
            // The identity is issued by a throwaway root whose key is discarded at once: TLS stacks
            // send intermediates but drop self-signed roots from the presented chain, and the client
            // needs the identity certificate in the chain to check the pin.
            using var rootKey = ECDsa.Create(ECCurve.NamedCurves.nistP256);
            var rootRequest = new CertificateRequest("CN=relay root", rootKey, HashAlgorithmName.SHA256);
            rootRequest.CertificateExtensions.Add(new X509BasicConstraintsExtension(true, false, 0, true));
            var now = DateTimeOffset.UtcNow;
            using var root = rootRequest.CreateSelfSigned(now.AddDays(-1), now.AddYears(100));
            using var key = ECDsa.Create(ECCurve.NamedCurves.nistP256);
            var request = new CertificateRequest("CN=relay identity", key, HashAlgorithmName.SHA256);
            request.CertificateExtensions.Add(new X509BasicConstraintsExtension(true, true, 0, true));
            request.CertificateExtensions.Add(new X509KeyUsageExtension(X509KeyUsageFlags.KeyCertSign, true));
            Span<byte> serial = stackalloc byte[16];
            RandomNumberGenerator.Fill(serial);
            serial[0] &= 0x7F;
            using var issued = request.Create(root, now.AddDays(-1), now.AddYears(99), serial);
            using var cert = issued.CopyWithPrivateKey(key);
            // Readable by the relay's user only; the new name durable too: without it a power loss
            // can take the identity, and the next start would make another one (another address).
            DurableDirectory.WritePrivateFile(path, stream => stream.Write(cert.Export(X509ContentType.Pkcs12)), overwrite: false);
            created = true;
        }
        byte[] pkcs12;
        try
        {
            pkcs12 = File.ReadAllBytes(path);
        }
        catch (Exception ex) when (ex is IOException or UnauthorizedAccessException)
        {
            // Not readable (say, by another user): the file may be fine, so never suggest it is damaged.
            throw new InvalidDataException($"cannot read the relay identity {path}: {ex.Message}", ex);
        }
        X509Certificate2 loaded;
        try
        {
            loaded = X509CertificateLoader.LoadPkcs12(pkcs12, password: null,
                X509KeyStorageFlags.EphemeralKeySet | X509KeyStorageFlags.Exportable);
        }
        catch (CryptographicException ex)
        {
            throw new InvalidDataException($"{path} is not a relay identity (the PKCS#12 file relay init writes): {ex.Message}", ex);
        }
        if (!loaded.HasPrivateKey)
        {
            loaded.Dispose();
            throw new InvalidDataException($"{path} is not a relay identity: it holds no private key");
        }
        return new RelayIdentity(loaded);
    }

    /// <summary>
    /// A TLS certificate valid from an hour before <paramref name="now"/> (for clients whose clock is
    /// behind) to <paramref name="now"/> + <paramref name="lifetime"/>, signed by the identity key.
    /// </summary>
    public X509Certificate2 CreateTlsCertificate(DateTimeOffset now, TimeSpan lifetime)
    {
        using var key = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        var request = new CertificateRequest("CN=relay", key, HashAlgorithmName.SHA256);
        request.CertificateExtensions.Add(new X509BasicConstraintsExtension(false, false, 0, true));
        request.CertificateExtensions.Add(new X509KeyUsageExtension(X509KeyUsageFlags.DigitalSignature, true));
        request.CertificateExtensions.Add(new X509EnhancedKeyUsageExtension([new Oid("1.3.6.1.5.5.7.3.1")], false));
        Span<byte> serial = stackalloc byte[16];
        RandomNumberGenerator.Fill(serial);
        serial[0] &= 0x7F;
        using var signed = request.Create(IdentityCertificate, now.AddHours(-1), now.Add(lifetime), serial);
        using var withKey = signed.CopyWithPrivateKey(key);
        // Round-trip through PKCS#12 so the key is usable by the TLS stack on every platform.
        return X509CertificateLoader.LoadPkcs12(withKey.Export(X509ContentType.Pkcs12), null, X509KeyStorageFlags.EphemeralKeySet);
    }

    public RelayAddress AddressFor(IReadOnlyList<string> hosts, int port) => new(Fingerprint, hosts, port);

    public void Dispose() => IdentityCertificate.Dispose();
}
