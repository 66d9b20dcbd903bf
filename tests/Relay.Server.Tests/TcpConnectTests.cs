using System.Net;
using System.Net.Sockets;
using Relay.Client.Transport;

namespace Relay.Server.Tests;

/// <summary>
/// A client's connect to a port of its own machine on which nothing listens can connect to itself
/// (the kernel picked that port as its source port). The client refuses such a connection; the
/// e2e check in tests/e2e/client.sh makes the kernel do it to the published binary.
/// </summary>
public class TcpConnectTests
{
    [Test]
    public async Task A_socket_connected_to_itself_is_told_apart_from_a_connection_to_a_listener()
    {
        // Bound to a port and connected to that same port with nothing listening: TCP's simultaneous
        // open with itself, what the kernel's choice of source port can do to any connect.
        int port;
        using (var probe = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp))
        {
            probe.Bind(new IPEndPoint(IPAddress.Loopback, 0));
            port = ((IPEndPoint)probe.LocalEndPoint!).Port;
        }
        using var self = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        self.Bind(new IPEndPoint(IPAddress.Loopback, port));
        await self.ConnectAsync(new IPEndPoint(IPAddress.Loopback, port));
        await Assert.That(self.Connected).IsTrue();
        await Assert.That(TcpConnect.IsConnectedToItself(self)).IsTrue();

        using var listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        listener.Listen();
        using var client = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        await client.ConnectAsync(listener.LocalEndPoint!);
        using var accepted = await listener.AcceptAsync();
        await Assert.That(TcpConnect.IsConnectedToItself(client)).IsFalse();
        await Assert.That(TcpConnect.IsConnectedToItself(accepted)).IsFalse();
    }
}
