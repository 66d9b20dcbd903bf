using System.Net;
using System.Net.Sockets;

namespace Relay.Client.Transport;

/// <summary>The TCP connect of the relay connection and of the SOCKS5 proxy connection.</summary>
internal static class TcpConnect
{
    /// <summary>
    /// A connected <see cref="TcpClient"/> with Nagle off, whose unsent bytes the kernel holds few of
    /// (<see cref="LimitUnsent"/>). A connection to a port of this machine on
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
            LimitUnsent(tcp.Client);
            return tcp;
        }
        catch
        {
            tcp.Dispose();
            throw;
        }
    }

    /// <summary>The most of what the client wrote and the link has not sent yet that the kernel holds (TCP_NOTSENT_LOWAT).</summary>
    internal const int UnsentLimit = 16 * 1024;

    /// <summary>
    /// Has the kernel take the client's writes only while it holds less than <see cref="UnsentLimit"/>
    /// of them not yet sent (TCP_NOTSENT_LOWAT; Linux, Android and Apple systems; elsewhere the
    /// kernel's own send buffer applies). Otherwise a send buffer of megabytes (what Linux grows it to
    /// on loopback, the way to a local Tor or ss-local) takes a large upload at once, a write
    /// completing says nothing of the link, and a PING written after it waits there unseen: the
    /// keep-alive (RelayConnection.KeepAlive.cs) could tell neither a link that moves slowly from
    /// one that stopped, nor when its PING left. The bytes wait in the connection's output instead.
    /// In flight on the link, TCP sends as much as ever.
    /// </summary>
    internal static void LimitUnsent(Socket socket)
    {
        int option = OperatingSystem.IsLinux() || OperatingSystem.IsAndroid() ? 25
            : OperatingSystem.IsMacOS() || OperatingSystem.IsIOS() || OperatingSystem.IsTvOS() || OperatingSystem.IsMacCatalyst() ? 0x201
            : 0;
        if (option == 0) return;
        Span<byte> value = stackalloc byte[sizeof(int)];
        BitConverter.TryWriteBytes(value, UnsentLimit);
        try
        {
            socket.SetRawSocketOption((int)SocketOptionLevel.Tcp, option, value);
        }
        catch (SocketException)
        {
            // An older kernel without it: its send buffer applies, as elsewhere.
        }
    }

    /// <summary>True when the socket's two ends are one address and port (a TCP simultaneous open with itself).</summary>
    internal static bool IsConnectedToItself(Socket socket) =>
        socket.LocalEndPoint is IPEndPoint local && socket.RemoteEndPoint is IPEndPoint remote && local.Equals(remote);
}
