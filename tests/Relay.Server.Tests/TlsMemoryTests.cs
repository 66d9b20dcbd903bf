using System.Net;
using System.Net.Security;
using System.Net.Sockets;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using Relay.Server.Connections;

namespace Relay.Server.Tests;

/// <summary>
/// An idle TLS connection should not keep OpenSSL's record buffers: the relay sets
/// SSL_MODE_RELEASE_BUFFERS on each server stream. If a runtime update hides the handle this fails,
/// instead of idle connections silently costing more memory.
/// </summary>
public class TlsMemoryTests
{
    [Test]
    public async Task Release_buffers_is_set_on_an_authenticated_server_stream_and_traffic_still_flows()
    {
        if (!OperatingSystem.IsLinux())
        {
            return;
        }
        using var key = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        var request = new CertificateRequest("CN=tls-memory-test", key, HashAlgorithmName.SHA256);
        using var ephemeral = request.CreateSelfSigned(DateTimeOffset.UtcNow.AddMinutes(-5), DateTimeOffset.UtcNow.AddHours(1));
        using var certificate = X509CertificateLoader.LoadPkcs12(ephemeral.Export(X509ContentType.Pfx), null);

        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        using var clientSocket = new TcpClient();
        await clientSocket.ConnectAsync(IPAddress.Loopback, ((IPEndPoint)listener.LocalEndpoint).Port);
        using var serverSocket = await listener.AcceptTcpClientAsync();

        await using var server = new SslStream(serverSocket.GetStream());
        await using var client = new SslStream(clientSocket.GetStream(), false, (_, _, _, _) => true);
        await Task.WhenAll(
            server.AuthenticateAsServerAsync(new SslServerAuthenticationOptions { ServerCertificate = certificate }),
            client.AuthenticateAsClientAsync(new SslClientAuthenticationOptions { TargetHost = "tls-memory-test" }));

        await Assert.That(TlsMemory.TryReleaseBuffersWhenIdle(server, out int biosShrunk)).IsTrue();
        // Both memory BIOs of this stream (the handshake flights grew them) were given fresh, empty buffers.
        await Assert.That(biosShrunk).IsEqualTo(2);
        await Assert.That(TlsMemory.Available).IsTrue();

        // Buffers come and go with traffic now: large and small records in both directions arrive intact.
        var payload = RandomNumberGenerator.GetBytes(100_000);
        foreach (var (from, to) in new[] { (client, server), (server, client) })
        {
            var write = from.WriteAsync(payload).AsTask();
            var received = new byte[payload.Length];
            await to.ReadExactlyAsync(received);
            await write;
            await Assert.That(received.AsSpan().SequenceEqual(payload)).IsTrue();
            await from.WriteAsync(new byte[] { 42 });
            var one = new byte[1];
            await to.ReadExactlyAsync(one);
            await Assert.That(one[0]).IsEqualTo((byte)42);
        }
    }
}
