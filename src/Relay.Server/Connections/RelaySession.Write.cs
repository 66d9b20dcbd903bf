using System.Buffers;
using System.IO.Pipelines;
using System.Security.Cryptography;
using Relay.Protocol;
using Relay.Storage;

namespace Relay.Server.Connections;

internal sealed partial class RelaySession
{
    // Every frame to the client goes through this pipe, written under _writeLock by the read loop,
    // by request completions and by other connections' deliveries. It never pauses the writer (a
    // delivery must not block the thread that makes it); memory is bounded instead by the read loop,
    // which stops reading requests while the backlog exceeds MaxOutputBuffer, and by the single
    // outstanding message per subscribed queue.
    private readonly Pipe _output = new(new PipeOptions(pauseWriterThreshold: 0, resumeWriterThreshold: 0,
        minimumSegmentSize: 4096, useSynchronizationContext: false));
    private readonly object _writeLock = new();
    private bool _outputClosed;
    private long _bytesWritten;
    private long _bytesSent;

    private int _inFlight;
    private TaskCompletionSource? _capacityWaiter;
    private readonly object _capacityLock = new();

    private bool MustPause =>
        Volatile.Read(ref _inFlight) >= _options.MaxInFlightPerConnection ||
        Interlocked.Read(ref _bytesWritten) - Interlocked.Read(ref _bytesSent) > _options.MaxOutputBuffer;

    private bool _flushScheduled;
    private static readonly Action<RelaySession> s_flush = static session => session.FlushScheduled();

    /// <summary>
    /// Makes written frames visible to the copy loop soon, without flushing per frame: the first
    /// writer schedules one flush on the thread pool, and every frame written before it runs (say,
    /// the OKs of one group commit, or several deliveries) leaves in the same TLS record and syscall.
    /// </summary>
    private void FlushLocked()
    {
        if (_flushScheduled) return;
        _flushScheduled = true;
        ThreadPool.UnsafeQueueUserWorkItem(s_flush, this, preferLocal: true);
    }

    private void FlushScheduled()
    {
        lock (_writeLock)
        {
            _flushScheduled = false;
            if (!_outputClosed && _output.Writer.UnflushedBytes > 0)
            {
                FlushNowLocked();
            }
        }
    }

    private void FlushNowLocked()
    {
        _bytesWritten += _output.Writer.UnflushedBytes;
        // Never pauses (no threshold), so this completes synchronously and only wakes the copy loop.
        _ = _output.Writer.FlushAsync();
    }

    private void Flush()
    {
        lock (_writeLock)
        {
            if (!_outputClosed && _output.Writer.UnflushedBytes > 0)
            {
                FlushNowLocked();
            }
        }
    }

    private void WriteEmpty(FrameType type, uint corr)
    {
        lock (_writeLock)
        {
            if (_outputClosed) return;
            FrameWriter.WriteEmpty(_output.Writer, type, corr);
        }
    }

    private void WriteError(uint corr, ErrorCode code)
    {
        lock (_writeLock)
        {
            if (_outputClosed) return;
            FrameWriter.WriteError(_output.Writer, corr, code);
            FlushLocked();
        }
    }

    /// <summary>Writes and flushes at once: used off the read loop (completions, deliveries).</summary>
    private void WriteEmptyNow(FrameType type, uint corr)
    {
        lock (_writeLock)
        {
            if (_outputClosed) return;
            FrameWriter.WriteEmpty(_output.Writer, type, corr);
            FlushLocked();
        }
    }

    internal void WriteMessage(uint corr, QueueHandle queue, in StoredMessage message, ChaCha20Poly1305 cipher, NonceSequence? nonces = null)
    {
        lock (_writeLock)
        {
            if (_outputClosed) return;
            FrameWriter.WriteMsg(_output.Writer, corr, queue.RecipientId, message.Id, message.Hour, message.Flags, message.Body, cipher, nonces);
            FlushLocked();
        }
    }

    internal void WriteEnd(ReadOnlySpan<byte> recipientId)
    {
        lock (_writeLock)
        {
            if (_outputClosed) return;
            FrameWriter.WriteEnd(_output.Writer, recipientId);
            FlushLocked();
        }
    }

    private void CompleteOutput()
    {
        lock (_writeLock)
        {
            if (_outputClosed) return;
            _outputClosed = true;
            FlushNowLocked();
            _output.Writer.Complete();
        }
    }

    /// <summary>Moves output to the connection (TLS or plain), coalescing small frames into few TLS records and syscalls.</summary>
    private async Task CopyOutputAsync(Stream destination)
    {
        var reader = _output.Reader;
        try
        {
            while (true)
            {
                var result = await reader.ReadAsync();
                var buffer = result.Buffer;
                long length = buffer.Length;
                if (length > 0)
                {
                    if (buffer.IsSingleSegment)
                    {
                        await destination.WriteAsync(buffer.First);
                    }
                    else
                    {
                        // One TLS record carries up to 16 KiB: gather segments into record-sized writes.
                        var chunk = ArrayPool<byte>.Shared.Rent(16 * 1024);
                        try
                        {
                            int filled = 0;
                            foreach (var segment in buffer)
                            {
                                var rest = segment;
                                while (!rest.IsEmpty)
                                {
                                    int n = Math.Min(rest.Length, chunk.Length - filled);
                                    rest.Span.Slice(0, n).CopyTo(chunk.AsSpan(filled));
                                    filled += n;
                                    rest = rest.Slice(n);
                                    if (filled == chunk.Length)
                                    {
                                        await destination.WriteAsync(chunk.AsMemory(0, filled));
                                        filled = 0;
                                    }
                                }
                            }
                            if (filled > 0)
                            {
                                await destination.WriteAsync(chunk.AsMemory(0, filled));
                            }
                        }
                        finally
                        {
                            ArrayPool<byte>.Shared.Return(chunk);
                        }
                    }
                    await destination.FlushAsync();
                }
                reader.AdvanceTo(buffer.End);
                OnSent(length);
                if (result.IsCompleted)
                {
                    break;
                }
            }
        }
        finally
        {
            await reader.CompleteAsync();
        }
    }

    private void OnSent(long length)
    {
        Interlocked.Add(ref _bytesSent, length);
        SignalCapacity();
    }

    private void BeginInFlight() => Interlocked.Increment(ref _inFlight);

    private void EndInFlight()
    {
        Interlocked.Decrement(ref _inFlight);
        SignalCapacity();
    }

    private void SignalCapacity()
    {
        if (Volatile.Read(ref _capacityWaiter) is null) return;
        TaskCompletionSource? waiter = null;
        lock (_capacityLock)
        {
            if (_capacityWaiter != null && !MustPauseHalf)
            {
                waiter = _capacityWaiter;
                _capacityWaiter = null;
            }
        }
        waiter?.TrySetResult();
    }

    // Resume at half the limits, as Kestrel's pipes do, so that reading does not flap.
    private bool MustPauseHalf =>
        Volatile.Read(ref _inFlight) >= _options.MaxInFlightPerConnection / 2 + 1 ||
        Interlocked.Read(ref _bytesWritten) - Interlocked.Read(ref _bytesSent) > _options.MaxOutputBuffer / 2;

    private async Task WaitForCapacityAsync(CancellationToken cancellationToken)
    {
        TaskCompletionSource waiter;
        lock (_capacityLock)
        {
            if (!MustPauseHalf) return;
            waiter = _capacityWaiter ??= new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        }
        await waiter.Task.WaitAsync(cancellationToken);
    }

    private async Task WaitForInFlightAsync()
    {
        var deadline = DateTime.UtcNow.AddSeconds(30);
        while (Volatile.Read(ref _inFlight) > 0 && DateTime.UtcNow < deadline)
        {
            await Task.Delay(5);
        }
    }
}
