using System.Net;
using System.Net.Sockets;

namespace Relay.Client.Transport;

/// <summary>The TCP connect of the relay connection and of the SOCKS5 proxy connection.</summary>
internal static class TcpConnect
{
    /// <summary>
    /// A connected <see cref="TcpClient"/> with Nagle off. A connection to a port of this machine on
    /// which nothing listens can connect to itself, when the kernel picks that same port as its source
    /// port (any port in the ephemeral range, 32768–60999 by default). It would hold the port the
    /// relay is about to listen on again and fail as a TLS error, so it is refused here as what it
    /// is: nothing listens there.
    /// </summary>
    public static async Task<TcpClient> ConnectAsync(string host, int port, CancellationToken cancellationToken)
    {
        var tcp = new TcpClient { NoDelay = true };
        try
        {
            await tcp.ConnectAsync(host, port, cancellationToken).ConfigureAwait(false);
            if (IsConnectedToItself(tcp.Client))
            {
                throw new SocketException((int)SocketError.ConnectionRefused);
            }
            return tcp;
        }
        catch
        {
            tcp.Dispose();
            throw;
        }
    }

    /// <summary>True when the socket's two ends are one address and port (a TCP simultaneous open with itself).</summary>
    internal static bool IsConnectedToItself(Socket socket) =>
        socket.LocalEndPoint is IPEndPoint local && socket.RemoteEndPoint is IPEndPoint remote && local.Equals(remote);
}
