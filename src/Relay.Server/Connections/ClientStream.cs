using System.Net;
using System.Net.Sockets;

namespace Relay.Server.Connections;

/// <summary>
/// One accepted relay connection: its socket as a stream, read by <see cref="System.Net.Security.SslStream"/>
/// (or the frame reader on plain TCP) straight from the socket. Bytes read past a PROXY header are
/// handed back with <see cref="Unread"/> and come first.
/// </summary>
internal sealed class ClientStream(Socket socket) : NetworkStream(socket, ownsSocket: true)
{
    private ReadOnlyMemory<byte> _unread;

    // The listener's list of open connections (for the abort at the end of a shutdown).
    internal ClientStream? Previous;
    internal ClientStream? Next;

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
        if (!_unread.IsEmpty)
        {
            return new ValueTask<int>(TakeUnread(buffer.Span));
        }
        return base.ReadAsync(buffer, cancellationToken);
    }

    public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken)
        => ReadAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

    public override int Read(Span<byte> buffer) => _unread.IsEmpty ? base.Read(buffer) : TakeUnread(buffer);

    public override int Read(byte[] buffer, int offset, int count) => Read(buffer.AsSpan(offset, count));

    private int TakeUnread(Span<byte> destination)
    {
        int n = Math.Min(destination.Length, _unread.Length);
        _unread.Span.Slice(0, n).CopyTo(destination);
        _unread = _unread.Slice(n);
        return n;
    }

    /// <summary>Ends the connection in an orderly way: the peer still gets what was sent, then FIN.</summary>
    public void Close(bool abort)
    {
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
    }
}
