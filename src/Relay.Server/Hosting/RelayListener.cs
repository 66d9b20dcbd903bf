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
    /// <summary>Event 16: at most one line per socket error every 10 s.</summary>
    private readonly LogThrottle _acceptFailureLog = new(TimeProvider.System);
    private readonly long _idleMilliseconds;
    private readonly Action<ClientStream> _untrack;
    private Timer? _idleSweep;
    private readonly object _lock = new();
    private ClientStream? _first;
    private bool _stopping;
    private TaskCompletionSource? _drained;
    private Task _acceptLoop = Task.CompletedTask;

    public IPEndPoint EndPoint { get; }

    /// <summary>Binds and listens; throws <see cref="IOException"/> (with the <see cref="SocketException"/> inside) when it cannot.</summary>
    public RelayListener(IPEndPoint endPoint, TimeSpan idleTimeout, RelayConnectionHandler handler, ILogger logger)
    {
        _handler = handler;
        _logger = logger;
        _idleMilliseconds = (long)idleTimeout.TotalMilliseconds;
        _untrack = Untrack;
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

    public void Start()
    {
        // One timer for every connection (a timer per connection would cost each idle one about 600 bytes).
        var period = TimeSpan.FromMilliseconds(Math.Clamp(_idleMilliseconds / 4, 100, 1000));
        _idleSweep = new Timer(static state => ((RelayListener)state!).SweepIdle(), this, period, period);
        _acceptLoop = Task.Run(AcceptLoopAsync);
    }

    /// <summary>Ends reading on every connection that has not asked for bytes for the idle timeout.</summary>
    private void SweepIdle()
    {
        foreach (var c in Snapshot(lastReadBefore: Environment.TickCount64 - _idleMilliseconds))
        {
            c.EndReading(idle: true);
        }
    }

    /// <summary>The open connections that last asked for bytes before <paramref name="lastReadBefore"/> (all by default).</summary>
    private List<ClientStream> Snapshot(long lastReadBefore = long.MaxValue)
    {
        List<ClientStream> found = [];
        lock (_lock)
        {
            for (var c = _first; c != null; c = c.Next)
            {
                if (c.LastRead < lastReadBefore)
                {
                    found.Add(c);
                }
            }
        }
        return found;
    }

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
                // Out of file descriptors and the like: the next accept may succeed; do not spin, and
                // do not log the same failure twenty times a second.
                Log.AcceptFailed(_acceptFailureLog, _logger, ex.SocketErrorCode.ToString());
                await Task.Delay(50);
                continue;
            }
            // Over the limit: closed here, before the next accept, so refused connections never hold
            // descriptors (a flood arrives faster than the thread pool would get to them).
            if (!_handler.TryAdmit())
            {
                socket.Dispose();
                continue;
            }
            ClientStream connection;
            try
            {
                socket.NoDelay = true;
                connection = new ClientStream(socket, _untrack);
            }
            catch (Exception ex) when (ex is SocketException or IOException or ObjectDisposedException)
            {
                // Reset by the peer between accept and set-up: nothing to serve.
                _handler.Release();
                socket.Dispose();
                continue;
            }
            if (!Track(connection))
            {
                _handler.Release();
                socket.Dispose();
                continue;
            }
            // Off the accept loop: a TLS handshake must not delay the next accept. The handler closes
            // the connection when it is done, which takes it off the list.
            ThreadPool.UnsafeQueueUserWorkItem(static state => _ = state.Handler.OnConnectedAsync(state.Connection),
                (Handler: _handler, Connection: connection), preferLocal: false);
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
            if (_first == null && _stopping)
            {
                drained = _drained;
            }
        }
        drained?.TrySetResult();
    }

    /// <summary>
    /// Stops accepting and ends reading on every connection, so each session finishes what it has in
    /// flight, sends it and closes; waits up to <paramref name="timeout"/> for that, then aborts the
    /// rest. True when every session finished in time.
    /// </summary>
    public async Task<bool> StopAsync(TimeSpan timeout)
    {
        Task drained;
        lock (_lock)
        {
            _stopping = true;
            _drained = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            drained = _first == null ? Task.CompletedTask : _drained.Task;
        }
        _socket.Dispose();
        if (_idleSweep != null)
        {
            await _idleSweep.DisposeAsync();
        }
        await _acceptLoop;
        foreach (var c in Snapshot())
        {
            c.EndReading(idle: false);
        }
        if (await Task.WhenAny(drained, Task.Delay(timeout)) == drained)
        {
            return true;
        }
        foreach (var c in Snapshot())
        {
            c.Close(abort: true);
        }
        // Aborted sessions end at once (their reads and writes fail); give them a moment to unwind.
        await Task.WhenAny(drained, Task.Delay(TimeSpan.FromSeconds(2)));
        return false;
    }
}
