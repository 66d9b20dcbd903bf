using System.Net;
using System.Net.Sockets;
using Microsoft.Extensions.Logging;
using Relay.Server.Connections;

namespace Relay.Server.Hosting;

/// <summary>
/// The relay's TCP listener: accepts connections and hands each socket to the connection handler.
/// </summary>
/// <remarks>
/// The sessions read and write the socket themselves (through <see cref="System.Net.Security.SslStream"/>
/// for TLS): no transport pipes and copy loops between the socket and TLS, so an idle connection
/// holds only its socket, its TLS state and its session, and a frame crosses one thread hop fewer.
/// </remarks>
internal sealed class RelayListener
{
    private const int Backlog = 512;

    private readonly Socket _socket;
    private readonly RelayConnectionHandler _handler;
    private readonly ILogger _logger;
    private readonly object _lock = new();
    private ClientStream? _first;
    private int _count;
    private bool _stopping;
    private TaskCompletionSource? _drained;
    private Task _acceptLoop = Task.CompletedTask;

    public IPEndPoint EndPoint { get; }

    /// <summary>Binds and listens; throws <see cref="IOException"/> (with the <see cref="SocketException"/> inside) when it cannot.</summary>
    public RelayListener(IPEndPoint endPoint, RelayConnectionHandler handler, ILogger logger)
    {
        _handler = handler;
        _logger = logger;
        _socket = new Socket(endPoint.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
        try
        {
            if (endPoint.Address.Equals(IPAddress.IPv6Any))
            {
                _socket.DualMode = true;
            }
            // A restart binds again at once, whatever connections of the last run are still in TIME_WAIT.
            _socket.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.ReuseAddress, true);
            _socket.Bind(endPoint);
            _socket.Listen(Backlog);
        }
        catch (SocketException ex)
        {
            _socket.Dispose();
            throw new IOException($"Failed to bind to address {endPoint}: {ex.Message}", ex);
        }
        EndPoint = (IPEndPoint)_socket.LocalEndPoint!;
    }

    public void Start() => _acceptLoop = Task.Run(AcceptLoopAsync);

    private async Task AcceptLoopAsync()
    {
        while (true)
        {
            Socket socket;
            try
            {
                socket = await _socket.AcceptAsync();
            }
            catch (ObjectDisposedException)
            {
                return;
            }
            catch (SocketException ex)
            {
                if (Volatile.Read(ref _stopping))
                {
                    return;
                }
                // Out of file descriptors and the like: the next accept may succeed; do not spin.
                Log.AcceptFailed(_logger, ex.SocketErrorCode.ToString());
                await Task.Delay(50);
                continue;
            }
            socket.NoDelay = true;
            var connection = new ClientStream(socket);
            if (!Track(connection))
            {
                connection.Close(abort: true);
                continue;
            }
            // Off the accept loop: a TLS handshake must not delay the next accept.
            ThreadPool.UnsafeQueueUserWorkItem(static state => _ = state.Listener.RunAsync(state.Connection),
                (Listener: this, Connection: connection), preferLocal: false);
        }
    }

    private async Task RunAsync(ClientStream connection)
    {
        try
        {
            await _handler.OnConnectedAsync(connection);
        }
        catch (Exception ex)
        {
            // The handler answers every expected failure itself; this is the last guard of the process.
            Log.ConnectionFailed(_logger, ex.GetType().Name);
        }
        finally
        {
            connection.Close(abort: false);
            Untrack(connection);
        }
    }

    private bool Track(ClientStream connection)
    {
        lock (_lock)
        {
            if (_stopping)
            {
                return false;
            }
            connection.Next = _first;
            if (_first != null)
            {
                _first.Previous = connection;
            }
            _first = connection;
            _count++;
            return true;
        }
    }

    private void Untrack(ClientStream connection)
    {
        TaskCompletionSource? drained = null;
        lock (_lock)
        {
            if (connection.Previous != null)
            {
                connection.Previous.Next = connection.Next;
            }
            else if (_first == connection)
            {
                _first = connection.Next;
            }
            if (connection.Next != null)
            {
                connection.Next.Previous = connection.Previous;
            }
            connection.Previous = connection.Next = null;
            if (--_count == 0 && _stopping)
            {
                drained = _drained;
            }
        }
        drained?.TrySetResult();
    }

    /// <summary>
    /// Stops accepting, waits up to <paramref name="timeout"/> for the sessions (already told to stop)
    /// to finish, then aborts the rest. True when every session finished in time.
    /// </summary>
    public async Task<bool> StopAsync(TimeSpan timeout)
    {
        Task drained;
        lock (_lock)
        {
            _stopping = true;
            _drained = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            drained = _count == 0 ? Task.CompletedTask : _drained.Task;
        }
        _socket.Dispose();
        await _acceptLoop;
        if (await Task.WhenAny(drained, Task.Delay(timeout)) == drained)
        {
            return true;
        }
        List<ClientStream> open = [];
        lock (_lock)
        {
            for (var c = _first; c != null; c = c.Next)
            {
                open.Add(c);
            }
        }
        foreach (var c in open)
        {
            c.Close(abort: true);
        }
        // Aborted sessions end at once (their reads and writes fail); give them a moment to unwind.
        await Task.WhenAny(drained, Task.Delay(TimeSpan.FromSeconds(2)));
        return false;
    }
}
