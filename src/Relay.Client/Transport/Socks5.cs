using System.Net.Sockets;
using System.Text;

namespace Relay.Client.Transport;

/// <summary>Minimal SOCKS5 CONNECT (RFC 1928, no authentication), by host name so the proxy resolves it (Tor needs that for .onion).</summary>
public static class Socks5
{
    public static async Task<Stream> ConnectAsync(string proxyHost, int proxyPort, string host, int port, CancellationToken cancellationToken)
    {
        TcpClient? tcp = null;
        try
        {
            tcp = await TcpConnect.ConnectAsync(proxyHost, proxyPort, cancellationToken);
            var stream = tcp.GetStream();
            await stream.WriteAsync(new byte[] { 5, 1, 0 }, cancellationToken);
            var reply = new byte[2];
            await stream.ReadExactlyAsync(reply, cancellationToken);
            if (reply[0] != 5 || reply[1] != 0)
            {
                throw new RelayConnectException($"the SOCKS5 proxy {proxyHost}:{proxyPort} refused the no-authentication method");
            }
            var name = Encoding.ASCII.GetBytes(host);
            if (name.Length is 0 or > 255)
            {
                throw new RelayConnectException("host name too long for SOCKS5");
            }
            var request = new byte[7 + name.Length];
            request[0] = 5; request[1] = 1; request[2] = 0; request[3] = 3;
            request[4] = (byte)name.Length;
            name.CopyTo(request, 5);
            request[5 + name.Length] = (byte)(port >> 8);
            request[6 + name.Length] = (byte)port;
            await stream.WriteAsync(request, cancellationToken);
            var head = new byte[4];
            await stream.ReadExactlyAsync(head, cancellationToken);
            if (head[0] != 5 || head[1] != 0)
            {
                throw new RelayConnectException($"the SOCKS5 proxy could not connect to the relay (reply code {head[1]})");
            }
            int skip = head[3] switch
            {
                1 => 4,
                4 => 16,
                3 => (await ReadByteAsync(stream, cancellationToken)),
                _ => throw new RelayConnectException("the SOCKS5 proxy sent an unknown address type"),
            };
            var rest = new byte[skip + 2];
            await stream.ReadExactlyAsync(rest, cancellationToken);
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

    private static async Task<int> ReadByteAsync(Stream stream, CancellationToken cancellationToken)
    {
        var one = new byte[1];
        await stream.ReadExactlyAsync(one, cancellationToken);
        return one[0];
    }
}
