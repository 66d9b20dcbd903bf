using System.Net;
using System.Net.Sockets;
using System.Text;

namespace Relay.Client.Transport;

/// <summary>
/// Minimal SOCKS5 CONNECT (RFC 1928, no authentication). A host name goes to the proxy as a name
/// (ATYP 3), so the proxy resolves it (Tor needs that for .onion); an IP address, IPv6 in brackets as
/// in a relay address, goes as an address (ATYP 1 or 4).
/// </summary>
public static class Socks5
{
    /// <summary>
    /// Opens a connection to <paramref name="host"/>:<paramref name="port"/> through the proxy.
    /// A host name must be ASCII, as a SOCKS5 request carries it: an internationalized name is given
    /// in its ASCII form (punycode, <c>xn--…</c>); another throws <see cref="ArgumentException"/>
    /// before the proxy is contacted. Proxy and network failures throw <see cref="RelayConnectException"/>.
    /// </summary>
    public static async Task<Stream> ConnectAsync(string proxyHost, int proxyPort, string host, int port, CancellationToken cancellationToken)
    {
        var destination = Destination(host);
        TcpClient? tcp = null;
        try
        {
            tcp = await TcpConnect.ConnectAsync(proxyHost, proxyPort, cancellationToken).ConfigureAwait(false);
            var stream = tcp.GetStream();
            await stream.WriteAsync(new byte[] { 5, 1, 0 }, cancellationToken).ConfigureAwait(false);
            var reply = new byte[2];
            await stream.ReadExactlyAsync(reply, cancellationToken).ConfigureAwait(false);
            if (reply[0] != 5 || reply[1] != 0)
            {
                throw new RelayConnectException($"the SOCKS5 proxy {proxyHost}:{proxyPort} refused the no-authentication method");
            }
            // VER CMD RSV ‖ ATYP DST.ADDR ‖ DST.PORT
            var request = new byte[3 + destination.Length + 2];
            request[0] = 5; request[1] = 1; request[2] = 0;
            destination.CopyTo(request, 3);
            request[^2] = (byte)(port >> 8);
            request[^1] = (byte)port;
            await stream.WriteAsync(request, cancellationToken).ConfigureAwait(false);
            var head = new byte[4];
            await stream.ReadExactlyAsync(head, cancellationToken).ConfigureAwait(false);
            if (head[0] != 5 || head[1] != 0)
            {
                throw new RelayConnectException($"the SOCKS5 proxy could not connect to the relay (reply code {head[1]})");
            }
            int skip = head[3] switch
            {
                1 => 4,
                4 => 16,
                3 => (await ReadByteAsync(stream, cancellationToken).ConfigureAwait(false)),
                _ => throw new RelayConnectException("the SOCKS5 proxy sent an unknown address type"),
            };
            var rest = new byte[skip + 2];
            await stream.ReadExactlyAsync(rest, cancellationToken).ConfigureAwait(false);
            return stream;
        }
        catch (Exception ex) when (ex is SocketException or IOException or EndOfStreamException)
        {
            tcp?.Dispose();
            throw new RelayConnectException($"cannot reach the relay through the SOCKS5 proxy {proxyHost}:{proxyPort}: {ex.Message}", ex);
        }
        catch
        {
            tcp?.Dispose();
            throw;
        }
    }

    /// <summary>ATYP ‖ DST.ADDR of a CONNECT request for <paramref name="host"/>.</summary>
    private static byte[] Destination(string host)
    {
        var literal = host.Length > 2 && host[0] == '[' && host[^1] == ']' ? host[1..^1] : host;
        if (IPAddress.TryParse(literal, out var ip))
        {
            // IPv6 (a scope id means nothing to the proxy and is not sent); IPv4 only as a dotted quad
            // (other forms that parse, such as "10.1", go as names, for the proxy to read as it does).
            if (ip.AddressFamily == AddressFamily.InterNetworkV6)
            {
                return [4, .. ip.GetAddressBytes()];
            }
            if (ip.AddressFamily == AddressFamily.InterNetwork && ip.ToString() == literal)
            {
                return [1, .. ip.GetAddressBytes()];
            }
        }
        if (!Ascii.IsValid(host))
        {
            throw new ArgumentException(
                $"the host name '{host}' is not ASCII, which a SOCKS5 request cannot carry: give it in its ASCII form (punycode, xn--…)", nameof(host));
        }
        if (host.Length is 0 or > 255)
        {
            throw new RelayConnectException("host name too long for SOCKS5");
        }
        return [3, (byte)host.Length, .. Encoding.ASCII.GetBytes(host)];
    }

    private static async Task<int> ReadByteAsync(Stream stream, CancellationToken cancellationToken)
    {
        var one = new byte[1];
        await stream.ReadExactlyAsync(one, cancellationToken).ConfigureAwait(false);
        return one[0];
    }
}
