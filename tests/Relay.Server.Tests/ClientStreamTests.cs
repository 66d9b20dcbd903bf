using System.Net;
using System.Net.Sockets;
using System.Runtime.CompilerServices;
using Relay.Server.Connections;

namespace Relay.Server.Tests;

/// <summary>
/// A relay connection's socket stream: a read with a deadline (the TLS handshake and HELLO) ends like
/// a cancelled read, and leaves nothing of its deadline behind for the connection's idle life.
/// </summary>
public class ClientStreamTests
{
    private static async Task<(ClientStream Server, Socket Client)> PairAsync()
    {
        using var listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        listener.Listen();
        var client = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        await client.ConnectAsync(listener.LocalEndPoint!);
        var accepted = await listener.AcceptAsync();
        return (new ClientStream(accepted), client);
    }

    [Test]
    public async Task A_read_whose_deadline_passes_throws_cancelled_and_ends_reading()
    {
        var (server, client) = await PairAsync();
        using (client)
        await using (server)
        {
            using var deadline = new CancellationTokenSource(TimeSpan.FromMilliseconds(200));
            var read = server.ReadAsync(new byte[16], deadline.Token).AsTask();
            await Assert.That(async () => await read).Throws<OperationCanceledException>();
            await Assert.That(server.ReadingEnded).IsTrue();
            await Assert.That(server.IdleExpired).IsFalse();
        }
    }

    [Test]
    public async Task A_read_with_a_deadline_that_gets_its_bytes_returns_them()
    {
        var (server, client) = await PairAsync();
        using (client)
        await using (server)
        {
            using var deadline = new CancellationTokenSource(TimeSpan.FromSeconds(30));
            var buffer = new byte[16];
            var read = server.ReadAsync(buffer, deadline.Token).AsTask();
            await client.SendAsync(new byte[] { 1, 2, 3 });
            await Assert.That(await read).IsEqualTo(3);
            await Assert.That(buffer[2]).IsEqualTo((byte)3);
            await Assert.That(server.ReadingEnded).IsFalse();
        }
    }

    [Test]
    public async Task A_pending_read_after_a_read_with_a_deadline_keeps_nothing_of_that_deadline()
    {
        var (server, client) = await PairAsync();
        using (client)
        await using (server)
        {
            var handshake = await ReadWithDeadlineAsync(server, client);
            // The connection goes idle: a read without a token waits for its next bytes.
            var idle = server.ReadAsync(new byte[16]).AsTask();
            // A thread of the pool may still hold it on its stack for a moment after the read's continuation ran.
            for (int i = 0; i < 50 && handshake.IsAlive; i++)
            {
                GC.Collect();
                GC.WaitForPendingFinalizers();
                await Task.Delay(20);
            }
            // The deadline's source was disposed and dropped: nothing the idle read holds may keep it.
            await Assert.That(handshake.IsAlive).IsFalse();
            await client.SendAsync(new byte[] { 9 });
            await Assert.That(await idle).IsEqualTo(1);
        }
    }

    // Not inlined, so no local of the caller holds the source.
    [MethodImpl(MethodImplOptions.NoInlining)]
    private static async Task<WeakReference> ReadWithDeadlineAsync(ClientStream server, Socket client)
    {
        var deadline = new CancellationTokenSource(TimeSpan.FromSeconds(30));
        var read = server.ReadAsync(new byte[16], deadline.Token).AsTask();
        await client.SendAsync(new byte[] { 1 });
        await read;
        deadline.Dispose();
        return new WeakReference(deadline);
    }
}
