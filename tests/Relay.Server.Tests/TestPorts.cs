using System.Net;
using System.Net.Sockets;

namespace Relay.Server.Tests;

/// <summary>Ports for relay processes that tests stop and start again on the same port.</summary>
internal static class TestPorts
{
    /// <summary>
    /// A free port on loopback below the kernel's ephemeral range (32768 and up). A port from that
    /// range (what binding port 0 gives) can be taken, while its relay is down, as the source port
    /// of any outgoing connection on the machine, a client's reconnect to that very port included
    /// (TCP connects to itself), and the restart on the same port then fails with "address in use".
    /// </summary>
    public static int Free()
    {
        for (int attempt = 0; attempt < 200; attempt++)
        {
            int port = Random.Shared.Next(20000, 32000);
            var l = new TcpListener(IPAddress.Loopback, port);
            try
            {
                l.Start();
                return port;
            }
            catch (SocketException)
            {
            }
            finally
            {
                l.Stop();
            }
        }
        throw new InvalidOperationException("no free port between 20000 and 32000 on 127.0.0.1");
    }
}
