using System.Diagnostics.CodeAnalysis;
using System.Globalization;
using System.Formats.Asn1;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;

namespace Relay.Protocol;

/// <summary>
/// <c>relay://&lt;fingerprint&gt;@host[,host2...][:port]</c> (docs/PROTOCOL.md §1). The fingerprint is
/// base64url(SHA-256(identity certificate SubjectPublicKeyInfo)), 43 characters. An IPv6 host is
/// written in brackets; the port, 5223 when absent, follows the last host.
/// </summary>
public sealed record RelayAddress(string Fingerprint, IReadOnlyList<string> Hosts, int Port)
{
    public const string Scheme = "relay://";
    public const int DefaultPort = 5223;

    public override string ToString() => $"{Scheme}{Fingerprint}@{string.Join(',', Hosts)}:{Port}";

    /// <summary>The first host, the one a client dials unless told otherwise.</summary>
    public string Host => Hosts[0];

    public static RelayAddress Parse(string text) =>
        TryParse(text, out var address, out var error) ? address : throw new FormatException(error);

    public static bool TryParse(string? text, [NotNullWhen(true)] out RelayAddress? address, [NotNullWhen(false)] out string? error)
    {
        address = null;
        if (string.IsNullOrWhiteSpace(text) || !text.StartsWith(Scheme, StringComparison.Ordinal))
        {
            error = $"a relay address starts with {Scheme}";
            return false;
        }
        var rest = text.AsSpan(Scheme.Length).TrimEnd('/');
        int at = rest.IndexOf('@');
        if (at <= 0)
        {
            error = "a relay address needs <fingerprint>@ before the host";
            return false;
        }
        var fingerprint = rest.Slice(0, at).ToString();
        if (!IsFingerprint(fingerprint))
        {
            error = "the fingerprint must be 43 base64url characters";
            return false;
        }
        var hostPort = rest.Slice(at + 1);
        // The port follows the last host: a ':' inside an IPv6 host's brackets, or in a host before
        // the last ',', is no port separator ([2001:db8::1],x.onion takes the default port).
        int lastHost = Math.Max(hostPort.LastIndexOf(']'), hostPort.LastIndexOf(',')) + 1;
        int colon = hostPort.Slice(lastHost).LastIndexOf(':');
        int port = DefaultPort;
        ReadOnlySpan<char> hostsPart = hostPort;
        if (colon >= 0)
        {
            colon += lastHost;
            if (!int.TryParse(hostPort.Slice(colon + 1), NumberStyles.None, CultureInfo.InvariantCulture, out port) || port is < 1 or > 65535)
            {
                error = "the port must be a number from 1 to 65535";
                return false;
            }
            hostsPart = hostPort.Slice(0, colon);
        }
        var hosts = hostsPart.ToString().Split(',', StringSplitOptions.TrimEntries);
        if (hosts.Any(IsUnbracketedIPv6))
        {
            error = "an IPv6 host is written in brackets, e.g. relay://<fingerprint>@[2001:db8::1]:5223";
            return false;
        }
        if (hosts.Length == 0 || !hosts.All(IsHost))
        {
            error = "the address needs at least one host name";
            return false;
        }
        address = new RelayAddress(fingerprint, hosts, port);
        error = null;
        return true;
    }

    /// <summary>A host as an address holds it: a name, an IPv4 address or an IPv6 address in brackets; no spaces, '/' or '@'.</summary>
    public static bool IsHost(string host) =>
        host.Length > 0 && !host.Any(c => char.IsWhiteSpace(c) || c is '/' or '@') && !IsUnbracketedIPv6(host);

    private static bool IsUnbracketedIPv6(string host) => host.Contains(':') && !(host.StartsWith('[') && host.EndsWith(']'));

    public static bool IsFingerprint(string s) =>
        s.Length == 43 && s.All(c => c is >= 'A' and <= 'Z' or >= 'a' and <= 'z' or >= '0' and <= '9' or '-' or '_');

    /// <summary>base64url(SHA-256(SubjectPublicKeyInfo)) of a certificate.</summary>
    public static string FingerprintOf(X509Certificate2 certificate)
    {
        Span<byte> hash = stackalloc byte[32];
        SHA256.HashData(certificate.PublicKey.ExportSubjectPublicKeyInfo(), hash);
        return Base64Url(hash);
    }

    public static string Base64Url(ReadOnlySpan<byte> bytes) =>
        Convert.ToBase64String(bytes).TrimEnd('=').Replace('+', '-').Replace('/', '_');

    /// <summary>
    /// The pinning rule of docs/PROTOCOL.md §2: some certificate of the presented chain has the
    /// fingerprint, and the leaf is that certificate or is signed by it and currently valid.
    /// </summary>
    public static bool VerifyChain(X509Certificate2 leaf, IEnumerable<X509Certificate2> presented, string fingerprint, DateTime utcNow)
    {
        if (utcNow < leaf.NotBefore.ToUniversalTime() || utcNow > leaf.NotAfter.ToUniversalTime())
        {
            return false;
        }
        if (FingerprintOf(leaf) == fingerprint)
        {
            return true;
        }
        foreach (var candidate in presented)
        {
            if (FingerprintOf(candidate) == fingerprint && IsSignedBy(leaf, candidate))
            {
                return true;
            }
        }
        return false;
    }

    /// <summary>
    /// True when <paramref name="certificate"/> names <paramref name="issuer"/> as its issuer and carries
    /// a valid ECDSA signature by the issuer's key over its TBSCertificate. Checked directly (not by the
    /// platform's chain builder) so that the rule is the same everywhere.
    /// </summary>
    public static bool IsSignedBy(X509Certificate2 certificate, X509Certificate2 issuer)
    {
        if (!certificate.IssuerName.RawData.AsSpan().SequenceEqual(issuer.SubjectName.RawData))
        {
            return false;
        }
        using var key = issuer.GetECDsaPublicKey();
        if (key is null)
        {
            return false;
        }
        try
        {
            var reader = new AsnReader(certificate.RawData, AsnEncodingRules.DER);
            var sequence = reader.ReadSequence();
            var tbs = sequence.ReadEncodedValue();
            var algorithm = sequence.ReadSequence();
            string oid = algorithm.ReadObjectIdentifier();
            var signature = sequence.ReadBitString(out int unused);
            if (unused != 0)
            {
                return false;
            }
            HashAlgorithmName? hash = oid switch
            {
                "1.2.840.10045.4.3.2" => HashAlgorithmName.SHA256,
                "1.2.840.10045.4.3.3" => HashAlgorithmName.SHA384,
                "1.2.840.10045.4.3.4" => HashAlgorithmName.SHA512,
                _ => null,
            };
            return hash is { } h && key.VerifyData(tbs.Span, signature, h, DSASignatureFormat.Rfc3279DerSequence);
        }
        catch (AsnContentException)
        {
            return false;
        }
        catch (CryptographicException)
        {
            return false;
        }
    }
}
