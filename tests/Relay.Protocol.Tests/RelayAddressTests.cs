using System.Net;
using System.Net.Sockets;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;

namespace Relay.Protocol.Tests;

public class RelayAddressTests
{
    private const string Fp = "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789-_ABCDE";

    [Test]
    public async Task IsFingerprint_accepts_exactly_43_base64url_characters()
    {
        await Assert.That(RelayAddress.IsFingerprint(Fp)).IsTrue();
        await Assert.That(RelayAddress.IsFingerprint(new string('_', 43))).IsTrue();
        await Assert.That(RelayAddress.IsFingerprint(Fp[..42])).IsFalse();
        await Assert.That(RelayAddress.IsFingerprint(Fp + "A")).IsFalse();
        await Assert.That(RelayAddress.IsFingerprint(Fp[..42] + "+")).IsFalse();
        await Assert.That(RelayAddress.IsFingerprint(Fp[..42] + "=")).IsFalse();
    }

    [Test]
    public async Task Single_host_address_round_trips()
    {
        var text = $"relay://{Fp}@relay.example.com:443";
        bool ok = RelayAddress.TryParse(text, out var address, out var error);

        await Assert.That(ok).IsTrue();
        await Assert.That(error).IsNull();
        await Assert.That(address!.Fingerprint).IsEqualTo(Fp);
        await Assert.That(string.Join("|", address.Hosts)).IsEqualTo("relay.example.com");
        await Assert.That(address.Host).IsEqualTo("relay.example.com");
        await Assert.That(address.Port).IsEqualTo(443);
        await Assert.That(address.ToString()).IsEqualTo(text);
    }

    [Test]
    public async Task Several_hosts_including_onion_round_trip()
    {
        const string onion = "vww6ybal4bd7szmgncyruucpgfkqahzddi37ktceo3ah7ngmcopnpyyd.onion";
        var text = $"relay://{Fp}@relay.example.com,{onion},10.0.0.7:5223";
        var address = RelayAddress.Parse(text);
        var again = RelayAddress.Parse(address.ToString());

        await Assert.That(string.Join("|", address.Hosts)).IsEqualTo($"relay.example.com|{onion}|10.0.0.7");
        await Assert.That(address.Host).IsEqualTo("relay.example.com");
        await Assert.That(address.Port).IsEqualTo(5223);
        await Assert.That(address.ToString()).IsEqualTo(text);
        await Assert.That(again.Fingerprint).IsEqualTo(address.Fingerprint);
        await Assert.That(string.Join("|", again.Hosts)).IsEqualTo(string.Join("|", address.Hosts));
        await Assert.That(again.Port).IsEqualTo(address.Port);
    }

    [Test]
    public async Task Onion_only_address_parses()
    {
        var address = RelayAddress.Parse($"relay://{Fp}@abcdefghijklmnopqrstuvwxyz234567abcdefghijklmnopqrstuv.onion:9000");

        await Assert.That(address.Host).IsEqualTo("abcdefghijklmnopqrstuvwxyz234567abcdefghijklmnopqrstuv.onion");
        await Assert.That(address.Port).IsEqualTo(9000);
    }

    [Test]
    [Arguments("relay.example.com")]
    [Arguments("a.example,b.onion")]
    public async Task Missing_port_means_the_default_port(string hosts)
    {
        var address = RelayAddress.Parse($"relay://{Fp}@{hosts}");

        await Assert.That(address.Port).IsEqualTo(RelayAddress.DefaultPort);
        await Assert.That(string.Join(",", address.Hosts)).IsEqualTo(hosts);
        await Assert.That(address.ToString()).IsEqualTo($"relay://{Fp}@{hosts}:{RelayAddress.DefaultPort}");
    }

    [Test]
    [Arguments("[::1]:443", "[::1]", 443)]
    [Arguments("[2001:db8::7]", "[2001:db8::7]", RelayAddress.DefaultPort)]
    public async Task Bracketed_ipv6_host_parses(string hostPort, string host, int port)
    {
        var address = RelayAddress.Parse($"relay://{Fp}@{hostPort}");

        await Assert.That(address.Host).IsEqualTo(host);
        await Assert.That(address.Port).IsEqualTo(port);
    }

    [Test]
    [Arguments("[2001:db8::1],x.onion", "[2001:db8::1]|x.onion", RelayAddress.DefaultPort)]
    [Arguments("[2001:db8::1],x.onion:443", "[2001:db8::1]|x.onion", 443)]
    [Arguments("x.onion,[2001:db8::1]", "x.onion|[2001:db8::1]", RelayAddress.DefaultPort)]
    [Arguments("x.onion,[2001:db8::1]:443", "x.onion|[2001:db8::1]", 443)]
    [Arguments("[2001:db8::1],[::1]", "[2001:db8::1]|[::1]", RelayAddress.DefaultPort)]
    [Arguments("[2001:db8::1],10.0.0.7:9000", "[2001:db8::1]|10.0.0.7", 9000)]
    public async Task The_port_is_read_only_after_the_last_host_so_ipv6_hosts_mix_with_others(string hostsPort, string hosts, int port)
    {
        var text = $"relay://{Fp}@{hostsPort}";
        var address = RelayAddress.Parse(text);
        var again = RelayAddress.Parse(address.ToString());

        await Assert.That(string.Join("|", address.Hosts)).IsEqualTo(hosts);
        await Assert.That(address.Port).IsEqualTo(port);
        await Assert.That(string.Join("|", again.Hosts)).IsEqualTo(hosts);
        await Assert.That(again.Port).IsEqualTo(port);
    }

    [Test]
    [Arguments(1)]
    [Arguments(65535)]
    public async Task Port_range_bounds_are_accepted(int port)
    {
        var address = RelayAddress.Parse($"relay://{Fp}@h:{port}");
        await Assert.That(address.Port).IsEqualTo(port);
    }

    public static IEnumerable<string> InvalidAddresses()
    {
        yield return "";
        yield return "   ";
        yield return $"{Fp}@relay.example.com:443";
        yield return $"https://{Fp}@relay.example.com:443";
        yield return $"relay:/{Fp}@relay.example.com:443";
        yield return "relay://relay.example.com:443";
        yield return $"relay://{Fp}relay.example.com:443";
        yield return "relay://@relay.example.com:443";
        yield return $"relay://{Fp[..42]}@relay.example.com:443";
        yield return $"relay://{Fp}A@relay.example.com:443";
        yield return $"relay://{Fp[..42]}+@relay.example.com:443";
        yield return $"relay://{Fp[..42]}/@relay.example.com:443";
        yield return $"relay://{Fp[..42]}=@relay.example.com:443";
        yield return $"relay://{Fp[..41]}==@relay.example.com:443";
        yield return $"relay://{Fp[..42]}é@relay.example.com:443";
        yield return $"relay://{Fp}@relay.example.com:0";
        yield return $"relay://{Fp}@relay.example.com:70000";
        yield return $"relay://{Fp}@relay.example.com:65536";
        yield return $"relay://{Fp}@relay.example.com:-1";
        yield return $"relay://{Fp}@relay.example.com:http";
        yield return $"relay://{Fp}@relay.example.com:";
        yield return $"relay://{Fp}@relay.example.com:99999999999";
        yield return $"relay://{Fp}@:443";
        yield return $"relay://{Fp}@";
        yield return $"relay://{Fp}@a.example,,b.example:443";
        yield return $"relay://{Fp}@a.example,:443";
        yield return $"relay://{Fp}@,a.example:443";
        yield return $"relay://{Fp}@relay example.com:443";
        yield return $"relay://{Fp}@a.example:1,b.example:2";
        yield return $"relay://{Fp}@relay.example.com:443:80";
        yield return $"relay://{Fp}@relay.example.com: 443";
        yield return $"relay://{Fp}@relay.example.com:+443";
        yield return $"relay://{Fp}@relay.example.com:0443x";
        yield return $"relay://{Fp}@::1:443";
        yield return $"relay://{Fp}@[::1]:";
        yield return $"relay://{Fp}@[::1]:http";
        yield return $"relay://{Fp}@[::1]x:443";
        yield return $"relay://{Fp}@[::1],:443";
        yield return $"relay://{Fp}@[::1]:443,x.onion";
        yield return $"relay://{Fp}@x.onion,2001:db8::1";
    }

    [Test]
    public async Task An_IPv6_host_without_brackets_is_refused_saying_how_to_write_it()
    {
        await Assert.That(RelayAddress.TryParse($"relay://{Fp}@::1:443", out _, out var error)).IsFalse();
        await Assert.That(error).Contains("in brackets");
    }

    [Test]
    [MethodDataSource(nameof(InvalidAddresses))]
    public async Task Invalid_address_is_rejected_with_a_reason(string text)
    {
        bool ok = RelayAddress.TryParse(text, out var address, out var error);
        var thrown = Assert.Throws<FormatException>(() => RelayAddress.Parse(text));

        await Assert.That(ok).IsFalse();
        await Assert.That(address).IsNull();
        await Assert.That(string.IsNullOrWhiteSpace(error)).IsFalse();
        await Assert.That(thrown.Message).IsEqualTo(error);
    }

    [Test]
    public async Task Null_address_is_rejected_with_a_reason()
    {
        bool ok = RelayAddress.TryParse(null, out _, out var error);

        await Assert.That(ok).IsFalse();
        await Assert.That(string.IsNullOrWhiteSpace(error)).IsFalse();
    }

    [Test]
    [Arguments(new byte[] { 0xFB, 0xFF }, "-_8")]
    [Arguments(new byte[] { 0x00 }, "AA")]
    [Arguments(new byte[] { 0x66, 0x6F, 0x6F, 0x62, 0x61 }, "Zm9vYmE")]
    public async Task Base64Url_has_no_padding_and_url_safe_characters(byte[] bytes, string expected)
    {
        await Assert.That(RelayAddress.Base64Url(bytes)).IsEqualTo(expected);
    }

    private static readonly DateTimeOffset Now = DateTimeOffset.UtcNow;

    private static X509Certificate2 CreateCa(ECDsa key, string name = "CN=relay identity")
    {
        var request = new CertificateRequest(name, key, HashAlgorithmName.SHA256);
        request.CertificateExtensions.Add(new X509BasicConstraintsExtension(true, true, 0, true));
        request.CertificateExtensions.Add(new X509KeyUsageExtension(X509KeyUsageFlags.KeyCertSign | X509KeyUsageFlags.CrlSign, true));
        request.CertificateExtensions.Add(new X509SubjectKeyIdentifierExtension(request.PublicKey, false));
        return request.CreateSelfSigned(Now.AddDays(-30), Now.AddYears(20));
    }

    private static X509Certificate2 CreateLeaf(X509Certificate2 issuer, DateTimeOffset notBefore, DateTimeOffset notAfter)
    {
        using var key = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        var request = new CertificateRequest("CN=relay", key, HashAlgorithmName.SHA256);
        request.CertificateExtensions.Add(new X509BasicConstraintsExtension(false, false, 0, true));
        request.CertificateExtensions.Add(new X509KeyUsageExtension(X509KeyUsageFlags.DigitalSignature, true));
        var serial = RandomNumberGenerator.GetBytes(12);
        serial[0] &= 0x7F;
        using var cert = request.Create(issuer, notBefore, notAfter, serial);
        return cert.CopyWithPrivateKey(key);
    }

    private static X509Certificate2 CreateSelfSignedLeaf(DateTimeOffset notBefore, DateTimeOffset notAfter)
    {
        using var key = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        var request = new CertificateRequest("CN=relay", key, HashAlgorithmName.SHA256);
        return request.CreateSelfSigned(notBefore, notAfter);
    }

    [Test]
    public async Task Fingerprint_is_base64url_sha256_of_the_public_key()
    {
        using var key = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        using var ca = CreateCa(key);
        using var rotated = CreateCa(key, "CN=renamed identity");
        using var otherKey = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        using var other = CreateCa(otherKey);
        var fingerprint = RelayAddress.FingerprintOf(ca);
        var expected = Convert.ToBase64String(SHA256.HashData(key.ExportSubjectPublicKeyInfo()))
            .TrimEnd('=').Replace('+', '-').Replace('/', '_');

        await Assert.That(fingerprint.Length).IsEqualTo(43);
        await Assert.That(RelayAddress.IsFingerprint(fingerprint)).IsTrue();
        await Assert.That(fingerprint).IsEqualTo(expected);
        await Assert.That(RelayAddress.FingerprintOf(rotated)).IsEqualTo(fingerprint);
        await Assert.That(RelayAddress.FingerprintOf(other)).IsNotEqualTo(fingerprint);
        await Assert.That(RelayAddress.Parse($"relay://{fingerprint}@h:1").Fingerprint).IsEqualTo(fingerprint);
    }

    [Test]
    public async Task Chain_with_a_leaf_signed_by_the_pinned_identity_is_accepted()
    {
        using var caKey = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        using var ca = CreateCa(caKey);
        using var leaf = CreateLeaf(ca, Now.AddHours(-1), Now.AddDays(30));
        var pin = RelayAddress.FingerprintOf(ca);

        await Assert.That(RelayAddress.VerifyChain(leaf, [leaf, ca], pin, DateTime.UtcNow)).IsTrue();
    }

    [Test]
    public async Task Self_pinned_leaf_is_accepted()
    {
        using var leaf = CreateSelfSignedLeaf(Now.AddHours(-1), Now.AddDays(30));
        var pin = RelayAddress.FingerprintOf(leaf);

        await Assert.That(RelayAddress.VerifyChain(leaf, [leaf], pin, DateTime.UtcNow)).IsTrue();
    }

    [Test]
    public async Task Chain_pinned_to_another_identity_is_rejected()
    {
        using var caKey = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        using var ca = CreateCa(caKey);
        using var otherKey = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        using var other = CreateCa(otherKey);
        using var leaf = CreateLeaf(ca, Now.AddHours(-1), Now.AddDays(30));
        var otherPin = RelayAddress.FingerprintOf(other);

        await Assert.That(RelayAddress.VerifyChain(leaf, [leaf, ca], otherPin, DateTime.UtcNow)).IsFalse();
        await Assert.That(RelayAddress.VerifyChain(leaf, [leaf, ca, other], otherPin, DateTime.UtcNow)).IsFalse();
        await Assert.That(RelayAddress.VerifyChain(leaf, [leaf, other], otherPin, DateTime.UtcNow)).IsFalse();
    }

    [Test]
    public async Task Leaf_signed_by_an_impostor_claiming_the_issuer_name_is_rejected()
    {
        using var caKey = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        using var ca = CreateCa(caKey);
        using var impostorKey = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        using var impostor = CreateCa(impostorKey);
        using var forged = CreateLeaf(impostor, Now.AddHours(-1), Now.AddDays(30));
        var pin = RelayAddress.FingerprintOf(ca);

        await Assert.That(forged.Issuer).IsEqualTo(ca.Subject);
        await Assert.That(RelayAddress.VerifyChain(forged, [forged, ca], pin, DateTime.UtcNow)).IsFalse();
        await Assert.That(RelayAddress.VerifyChain(forged, [forged, impostor, ca], pin, DateTime.UtcNow)).IsFalse();
    }

    [Test]
    public async Task Expired_or_not_yet_valid_leaf_is_rejected()
    {
        using var caKey = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        using var ca = CreateCa(caKey);
        using var expired = CreateLeaf(ca, Now.AddDays(-10), Now.AddDays(-1));
        using var future = CreateLeaf(ca, Now.AddDays(1), Now.AddDays(10));
        using var expiredSelf = CreateSelfSignedLeaf(Now.AddDays(-10), Now.AddDays(-1));
        var pin = RelayAddress.FingerprintOf(ca);

        await Assert.That(RelayAddress.VerifyChain(expired, [expired, ca], pin, DateTime.UtcNow)).IsFalse();
        await Assert.That(RelayAddress.VerifyChain(future, [future, ca], pin, DateTime.UtcNow)).IsFalse();
        await Assert.That(RelayAddress.VerifyChain(expiredSelf, [expiredSelf], RelayAddress.FingerprintOf(expiredSelf), DateTime.UtcNow)).IsFalse();
        await Assert.That(RelayAddress.VerifyChain(expired, [expired, ca], pin, DateTime.UtcNow.AddDays(-5))).IsTrue();
    }

    [Test]
    public async Task Verifying_a_chain_never_fetches_certificates_named_by_the_peer()
    {
        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        int port = ((IPEndPoint)listener.LocalEndpoint).Port;
        int connections = 0;
        using var stop = new CancellationTokenSource();
        var server = Task.Run(async () =>
        {
            try
            {
                while (true)
                {
                    using var client = await listener.AcceptTcpClientAsync(stop.Token);
                    Interlocked.Increment(ref connections);
                    await client.GetStream().WriteAsync("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"u8.ToArray(), stop.Token);
                }
            }
            catch (Exception) when (stop.IsCancellationRequested)
            {
                // Stopped (a loop that only now reaches its first accept finds the listener stopped).
            }
        });

        using var caKey = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        using var ca = CreateCa(caKey);
        using var strangerKey = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        using var stranger = CreateCa(strangerKey, "CN=somewhere else");
        using var leafKey = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        var request = new CertificateRequest("CN=relay", leafKey, HashAlgorithmName.SHA256);
        request.CertificateExtensions.Add(new X509AuthorityInformationAccessExtension(null, [$"http://127.0.0.1:{port}/issuer.cer"]));
        using var leaf = request.Create(stranger, Now.AddHours(-1), Now.AddDays(1), [1, 2, 3, 4]);
        bool accepted = RelayAddress.VerifyChain(leaf, [leaf, ca], RelayAddress.FingerprintOf(ca), DateTime.UtcNow);

        await stop.CancelAsync();
        listener.Stop();
        await server;

        await Assert.That(accepted).IsFalse();
        await Assert.That(Volatile.Read(ref connections)).IsEqualTo(0);
    }

    [Test]
    public async Task Signed_leaf_without_the_pinned_certificate_in_the_chain_is_rejected()
    {
        using var caKey = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        using var ca = CreateCa(caKey);
        using var leaf = CreateLeaf(ca, Now.AddHours(-1), Now.AddDays(30));
        var pin = RelayAddress.FingerprintOf(ca);

        await Assert.That(RelayAddress.VerifyChain(leaf, [leaf], pin, DateTime.UtcNow)).IsFalse();
    }
}
