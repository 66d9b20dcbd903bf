using System.Net;
using System.Net.Sockets;

namespace Relay.Server.Connections;

/// <summary>
/// One accepted relay connection: its socket as a stream, read by <see cref="System.Net.Security.SslStream"/>
/// (or the frame reader on plain TCP) straight from the socket. Bytes read past a PROXY header are
/// handed back with <see cref="Unread"/> and come first.
/// </summary>
internal sealed class ClientStream : NetworkStream, IConnectionState
{
    private ReadOnlyMemory<byte> _unread;
    private Action<ClientStream>? _onClosed;
    private CancellationTokenSource? _ended;
    private int _state; // 0 open, 1 reading ended (idle or shutdown), 2 closed
    private long _lastRead = Environment.TickCount64;

    // The listener's list of open connections (idle sweep, shutdown).
    internal ClientStream? Previous;
    internal ClientStream? Next;

    public ClientStream(Socket socket, Action<ClientStream>? onClosed = null) : base(socket, ownsSocket: true)
    {
        _onClosed = onClosed;
        // Synchronous sends must never wait (see WriteAsync); async reads and writes are unaffected.
        // (NetworkStream's constructor refuses a non-blocking socket, hence after it.)
        socket.Blocking = false;
    }

    /// <summary>When the connection last asked for bytes (<see cref="Environment.TickCount64"/>): its idle clock.</summary>
    internal long LastRead => Volatile.Read(ref _lastRead);

    /// <summary>True when the idle sweep ended the connection's reading.</summary>
    public bool IdleExpired { get; private set; }

    /// <summary>True once reading was ended from outside (idle or shutdown), or the connection closed.</summary>
    public bool ReadingEnded => Volatile.Read(ref _state) != 0;

    /// <summary>
    /// Cancelled when reading is ended from outside: for waits other than reads (a read just returns end
    /// of stream). Made on first use, so a connection that never waits for anything else has none.
    /// </summary>
    public CancellationToken Ended
    {
        get
        {
            var cts = Volatile.Read(ref _ended);
            if (cts == null)
            {
                var fresh = new CancellationTokenSource();
                cts = Interlocked.CompareExchange(ref _ended, fresh, null) ?? fresh;
                if (cts != fresh)
                {
                    fresh.Dispose();
                }
            }
            if (ReadingEnded)
            {
                cts.Cancel();
            }
            return cts.Token;
        }
    }

    /// <summary>
    /// Ends reading: a pending or later read returns end of stream, so the session finishes what it has
    /// in flight, sends what it wrote and closes. Writing still works. False when already ended.
    /// </summary>
    public bool EndReading(bool idle)
    {
        if (Interlocked.CompareExchange(ref _state, 1, 0) != 0)
        {
            return false;
        }
        IdleExpired = idle;
        try
        {
            Socket.Shutdown(SocketShutdown.Receive);
        }
        catch (Exception ex) when (ex is SocketException or ObjectDisposedException)
        {
            // Already gone.
        }
        Volatile.Read(ref _ended)?.Cancel();
        return true;
    }

    public EndPoint? RemoteEndPoint
    {
        get
        {
            try
            {
                return Socket.RemoteEndPoint;
            }
            catch (Exception ex) when (ex is SocketException or ObjectDisposedException)
            {
                return null;
            }
        }
    }

    /// <summary>Puts bytes back in front of the stream (what followed a PROXY header in the same read).</summary>
    public void Unread(ReadOnlyMemory<byte> bytes) => _unread = bytes;

    public override ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default)
    {
        _lastRead = Environment.TickCount64;
        if (!_unread.IsEmpty)
        {
            return new ValueTask<int>(TakeUnread(buffer.Span));
        }
        return cancellationToken.CanBeCanceled ? ReadUntilCancelledAsync(buffer, cancellationToken) : base.ReadAsync(buffer, default);
    }

    /// <summary>
    /// A read with a deadline (the TLS handshake and HELLO): cancellation ends reading on the socket, so
    /// the pending read returns, and then throws <see cref="OperationCanceledException"/>. The token is
    /// never handed to the socket, whose reusable receive operation would keep a reference to its
    /// registration (and the disposed source behind it) for the connection's whole life: about 200
    /// bytes per idle connection.
    /// </summary>
    private async ValueTask<int> ReadUntilCancelledAsync(Memory<byte> buffer, CancellationToken cancellationToken)
    {
        cancellationToken.ThrowIfCancellationRequested();
        int n;
        using (cancellationToken.UnsafeRegister(static s => ((ClientStream)s!).EndReading(idle: false), this))
        {
            n = await base.ReadAsync(buffer, default);
        }
        cancellationToken.ThrowIfCancellationRequested();
        return n;
    }

    public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken)
        => ReadAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

    public override int Read(Span<byte> buffer)
    {
        _lastRead = Environment.TickCount64;
        return _unread.IsEmpty ? base.Read(buffer) : TakeUnread(buffer);
    }

    public override int Read(byte[] buffer, int offset, int count) => Read(buffer.AsSpan(offset, count));

    /// <summary>
    /// Sends at once when the socket buffer has room (almost always), else waits asynchronously for the
    /// rest. An idle connection that only ever sent this way keeps no asynchronous send state.
    /// </summary>
    public override ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken = default)
    {
        int sent = Socket.Send(buffer.Span, SocketFlags.None, out SocketError error);
        if (error == SocketError.Success)
        {
            if (sent == buffer.Length)
            {
                return default;
            }
            buffer = buffer.Slice(sent);
        }
        else if (error != SocketError.WouldBlock)
        {
            return ValueTask.FromException(new IOException($"Unable to write data to the transport connection: {error}.", new SocketException((int)error)));
        }
        return base.WriteAsync(buffer, cancellationToken);
    }

    public override Task WriteAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken)
        => WriteAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

    private int TakeUnread(Span<byte> destination)
    {
        int n = Math.Min(destination.Length, _unread.Length);
        _unread.Span.Slice(0, n).CopyTo(destination);
        _unread = _unread.Slice(n);
        return n;
    }

    /// <summary>
    /// Ends the connection: in an orderly way (the peer still gets what was sent, then FIN), or at once.
    /// The first call also tells the listener.
    /// </summary>
    public void Close(bool abort)
    {
        if (Interlocked.Exchange(ref _state, 2) == 2)
        {
            if (abort)
            {
                Dispose();
            }
            return;
        }
        try
        {
            if (!abort)
            {
                Socket.Shutdown(SocketShutdown.Both);
            }
        }
        catch (Exception ex) when (ex is SocketException or ObjectDisposedException)
        {
            // Already gone.
        }
        Dispose();
        Interlocked.Exchange(ref _onClosed, null)?.Invoke(this);
    }
}
