using System.Buffers;
using System.IO.Pipelines;

namespace Relay.Server.Connections;

/// <summary>
/// One end of an in-memory byte stream pair: what one end writes, the other reads. Writes wait while
/// the other end has 64 KiB unread (the same backpressure a socket buffer gives).
/// </summary>
/// <remarks>
/// Not <c>PipeReader.AsStream()</c> with <c>PipeWriter.AsStream()</c>: there a cancelled read throws
/// and a write to a closed peer is dropped without error; a session needs what a socket gives, end
/// of stream when its reading is ended and an error when the peer is gone.
/// </remarks>
internal class PipeEndStream(PipeReader reader, PipeWriter writer) : Stream
{
    private int _disposed;

    public override bool CanRead => true;
    public override bool CanWrite => true;
    public override bool CanSeek => false;
    public override long Length => throw new NotSupportedException();
    public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }

    /// <summary>True when a read should return end of stream now, whatever is buffered.</summary>
    protected virtual bool ReadingStopped => false;

    public override async ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default)
    {
        while (true)
        {
            if (ReadingStopped)
            {
                return 0;
            }
            ReadResult result = await reader.ReadAsync(cancellationToken).ConfigureAwait(false);
            var data = result.Buffer;
            if (buffer.IsEmpty)
            {
                // A zero-byte read waits for data without taking any.
                reader.AdvanceTo(data.Start);
                return 0;
            }
            if (!data.IsEmpty && !ReadingStopped)
            {
                int n = (int)Math.Min(buffer.Length, data.Length);
                data.Slice(0, n).CopyTo(buffer.Span);
                reader.AdvanceTo(data.GetPosition(n));
                return n;
            }
            reader.AdvanceTo(data.Start, data.End);
            if (result.IsCompleted || result.IsCanceled)
            {
                return 0;
            }
        }
    }

    public override async ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken = default)
    {
        if (Volatile.Read(ref _disposed) != 0)
        {
            throw new ObjectDisposedException(nameof(PipeEndStream));
        }
        FlushResult result = await writer.WriteAsync(buffer, cancellationToken).ConfigureAwait(false);
        if (result.IsCompleted || result.IsCanceled)
        {
            throw new IOException(result.IsCanceled ? "The in-process connection was aborted." : "The other end of the in-process connection is closed.");
        }
    }

    public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
        ReadAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

    public override Task WriteAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
        WriteAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

    public override int Read(byte[] buffer, int offset, int count) => ReadAsync(buffer, offset, count).GetAwaiter().GetResult();

    public override void Write(byte[] buffer, int offset, int count) => WriteAsync(buffer, offset, count).GetAwaiter().GetResult();

    public override void Flush()
    {
    }

    public override Task FlushAsync(CancellationToken cancellationToken) => Task.CompletedTask;

    public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();

    public override void SetLength(long value) => throw new NotSupportedException();

    protected override void Dispose(bool disposing)
    {
        if (disposing && Interlocked.Exchange(ref _disposed, 1) == 0)
        {
            // The other end reads end of stream after what was written; its writes fail from now on.
            writer.Complete();
            reader.Complete();
        }
        base.Dispose(disposing);
    }
}

/// <summary>
/// The relay's end of an in-process connection (<see cref="Hosting.RelayServer.ConnectInProcess"/>):
/// a session runs over it exactly as over a socket. A shutdown ends its reading like a socket's.
/// </summary>
internal sealed class InProcessConnection : PipeEndStream, IConnectionState
{
    private readonly PipeReader _reader;
    private readonly PipeWriter _writer;
    private readonly CancellationTokenSource _ended = new();   // no timer: needs no Dispose
    private int _readingEnded;

    private InProcessConnection(PipeReader reader, PipeWriter writer) : base(reader, writer)
    {
        _reader = reader;
        _writer = writer;
    }

    /// <summary>A connected pair: the relay's end and the client's end.</summary>
    public static (InProcessConnection Relay, Stream Client) Create()
    {
        var toRelay = new Pipe();
        var toClient = new Pipe();
        return (new InProcessConnection(toRelay.Reader, toClient.Writer), new PipeEndStream(toClient.Reader, toRelay.Writer));
    }

    public bool IdleExpired => false;

    public bool ReadingEnded => Volatile.Read(ref _readingEnded) != 0;

    public CancellationToken Ended => _ended.Token;

    protected override bool ReadingStopped => ReadingEnded;

    /// <summary>Ends reading: a pending or later read returns end of stream. Writing still works.</summary>
    public void EndReading()
    {
        if (Interlocked.Exchange(ref _readingEnded, 1) == 0)
        {
            try
            {
                _reader.CancelPendingRead();
            }
            catch (InvalidOperationException)
            {
                // The connection closed meanwhile: nothing is reading.
            }
            _ended.Cancel();
        }
    }

    /// <summary>Ends the connection at once: reading ends and a send waiting for the client fails.</summary>
    public void Abort()
    {
        EndReading();
        try
        {
            _writer.CancelPendingFlush();
        }
        catch (InvalidOperationException)
        {
            // Already closed.
        }
        Dispose();
    }
}
