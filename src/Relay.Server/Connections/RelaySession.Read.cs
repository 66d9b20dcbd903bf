using System.Buffers;
using System.Buffers.Binary;
using Relay.Protocol;
using Relay.Server.Metrics;

namespace Relay.Server.Connections;

internal sealed partial class RelaySession
{
    // The request bytes: one array from the shared pool, rented when bytes arrive and returned when
    // every complete frame in it has been handled, so an idle connection holds none. Bytes
    // [_readStart, _readEnd) are received and not yet handled (at most the start of one frame).
    private byte[]? _readBuffer;
    private int _readStart;
    private int _readEnd;
    private const int ReadBufferSize = 16 * 1024;
    private const int MinimumReadSize = 4096;

    /// <summary>
    /// Waits for more request bytes. Without bytes pending it first waits with a zero-byte read (no
    /// buffer held while waiting), then rents one. False at the end of the stream. (The read loop does
    /// the same inline: one async method fewer pending per idle connection.)
    /// </summary>
    private async ValueTask<bool> ReadMoreAsync(Stream input, CancellationToken cancellationToken)
    {
        if (NothingPending())
        {
            // Returns when bytes arrive or the stream ends (the real read below tells which).
            _ = await input.ReadAsync(Memory<byte>.Empty, cancellationToken);
        }
        int n = await input.ReadAsync(ReadSpace(), cancellationToken);
        _readEnd += n;
        return n > 0;
    }

    private long _partialSince;   // when the frame now pending started to wait (0: none pending)

    /// <summary>
    /// A frame that stays incomplete for <see cref="RelayServerOptions.PartialFrameTimeout"/> while
    /// no other frame completes ends the connection (SYNTAX): a client trickling a large frame a byte
    /// at a time would otherwise hold its grown read buffer (up to twice maxFrame) for ever, since
    /// each byte resets the idle timeout. Checked when bytes arrive; the idle timeout covers silence.
    /// </summary>
    private void CheckFrameProgress(bool dispatched)
    {
        if (_readStart == _readEnd)
        {
            _partialSince = 0;
            return;
        }
        long now = Environment.TickCount64;
        if (dispatched || _partialSince == 0)
        {
            _partialSince = now;
        }
        else if (now - _partialSince > (long)_options.PartialFrameTimeout.TotalMilliseconds)
        {
            ProtocolException.Throw(ErrorCode.Syntax, "a frame stayed incomplete for too long");
        }
    }

    /// <summary>True (and the buffer returned) when no received byte is waiting to be handled.</summary>
    private bool NothingPending()
    {
        if (_readStart != _readEnd)
        {
            return false;
        }
        ReturnReadBuffer();
        return true;
    }

    /// <summary>Where the next read goes: after the pending bytes, with room made for at least a minimum read.</summary>
    private Memory<byte> ReadSpace()
    {
        if (_readBuffer is null)
        {
            _readBuffer = ArrayPool<byte>.Shared.Rent(ReadBufferSize);
        }
        else if (_readBuffer.Length - _readEnd < MinimumReadSize && (_readStart > 0 || _readEnd == _readBuffer.Length))
        {
            // Little room after the frame in progress: move it to the front, or grow for it (a frame
            // longer than the buffer; FrameReader has already refused any above the maximum).
            int pending = _readEnd - _readStart;
            var target = _readStart > 0 ? _readBuffer : ArrayPool<byte>.Shared.Rent(_readBuffer.Length * 2);
            _readBuffer.AsSpan(_readStart, pending).CopyTo(target);
            if (!ReferenceEquals(target, _readBuffer))
            {
                ArrayPool<byte>.Shared.Return(_readBuffer);
                _readBuffer = target;
            }
            _readStart = 0;
            _readEnd = pending;
        }
        return _readBuffer.AsMemory(_readEnd);
    }

    /// <summary>The received, unhandled bytes.</summary>
    private ReadOnlySequence<byte> Received => new(_readBuffer ?? [], _readStart, _readEnd - _readStart);

    /// <summary>Marks the bytes before <paramref name="rest"/> (a slice of <see cref="Received"/>) handled.</summary>
    private void Consumed(in ReadOnlySequence<byte> rest)
    {
        _readStart = _readEnd - (int)rest.Length;
        if (_readStart == _readEnd)
        {
            _readStart = _readEnd = 0;
        }
    }

    private void ReturnReadBuffer()
    {
        if (_readBuffer != null)
        {
            ArrayPool<byte>.Shared.Return(_readBuffer);
            _readBuffer = null;
        }
        _readStart = _readEnd = 0;
    }

    /// <summary>Reads HELLO and answers WELCOME. False when the client was refused (the error is written).</summary>
    private async ValueTask<bool> HandshakeAsync(Stream input, CancellationTokenSource cts)
    {
        while (true)
        {
            bool more;
            try
            {
                more = await ReadMoreAsync(input, cts.Token);
            }
            catch (OperationCanceledException)
            {
                _context.Metrics.HandshakeFailed("timeout");
                Log.HandshakeTimeout(_logger);
                return false;
            }
            catch (Exception ex) when (IsConnectionFailure(ex))
            {
                // Reset (a client killed, a proxy or NAT dropping the connection) or the socket closed
                // under the read rather than closed: the same for the count; the exception ends the
                // connection as any failed read does.
                _context.Metrics.HandshakeFailed(_readStart == _readEnd ? "closed" : "truncated");
                throw;
            }
            var buffer = Received;
            try
            {
                if (FrameReader.TryRead(ref buffer, ProtocolConstants.HandshakeMaxFrame, out var frameBytes))
                {
                    var frame = new FrameView(frameBytes.FirstSpan);
                    if (frame.Type != FrameType.Hello || frame.Payload.Length != 4)
                    {
                        _context.Metrics.HandshakeFailed("syntax");
                        WriteError(0, ErrorCode.Syntax);
                        return false;
                    }
                    ushort min = BinaryPrimitives.ReadUInt16BigEndian(frame.Payload);
                    ushort max = BinaryPrimitives.ReadUInt16BigEndian(frame.Payload.Slice(2));
                    ushort version = Math.Min(max, ProtocolConstants.MaxVersion);
                    if (min > max || version < min || version < ProtocolConstants.MinVersion)
                    {
                        _context.Metrics.HandshakeFailed("version");
                        lock (_writeLock)
                        {
                            if (!_outputClosed)
                            {
                                FrameWriter.WriteVersionError(_pending, ProtocolConstants.MinVersion, ProtocolConstants.MaxVersion);
                                FlushLocked();
                            }
                        }
                        return false;
                    }
                    lock (_writeLock)
                    {
                        FrameWriter.WriteWelcome(_pending, version, _options.MaxFrame, _options.MaxMessage, _sessionId, _sessionPublic);
                        FlushLocked();
                    }
                    Consumed(buffer);
                    return true;
                }
                if (!more)
                {
                    _context.Metrics.HandshakeFailed(buffer.IsEmpty ? "closed" : "truncated");
                    return false;
                }
            }
            catch (ProtocolException ex)
            {
                _context.Metrics.HandshakeFailed("syntax");
                WriteError(0, ex.Code);
                return false;
            }
        }
    }

    /// <summary>
    /// The read loop: handle every complete frame received, stop at the end of the stream, and treat
    /// leftover bytes at the end as a truncated frame.
    /// </summary>
    /// <remarks>
    /// Reads take no token: the listener's idle sweep and its shutdown end reading on the socket, so a
    /// read returns end of stream (an idle connection holds no timer or cancellation registration).
    /// </remarks>
    private async Task ReadLoopAsync(Stream input, IConnectionState connection)
    {
        // Frames that came with HELLO are handled before the first read.
        bool more = true;
        while (true)
        {
            var buffer = Received;
            bool paused = false;
            bool dispatched = false;
            try
            {
                while (FrameReader.TryRead(ref buffer, _options.MaxFrame, out var frameBytes))
                {
                    dispatched = true;
                    Dispatch(new FrameView(frameBytes.FirstSpan));
                    if (MustPause || _keyAgreementWait != TimeSpan.Zero)
                    {
                        paused = true;
                        break;
                    }
                }
                if (!more && !paused)
                {
                    if (!buffer.IsEmpty && !connection.ReadingEnded)
                    {
                        ProtocolException.Throw(ErrorCode.Syntax, "connection closed in the middle of a frame");
                    }
                    return;
                }
            }
            finally
            {
                Consumed(buffer);
                Flush();
            }
            if (paused)
            {
                if (_keyAgreementWait != TimeSpan.Zero)
                {
                    // The source made more key agreements than its budget: its answers so far are
                    // flushed, and the next request is read once the bucket has refilled.
                    var wait = _keyAgreementWait;
                    _keyAgreementWait = TimeSpan.Zero;
                    _context.KeyAgreementWaited(wait);
                    await Task.Delay(wait, _options.Clock, connection.Ended);
                }
                await WaitForCapacityAsync(connection.Ended);
                // The time the relay did not read is not the client's: a frame left over from before
                // the pause starts its partial-frame time now.
                _partialSince = 0;
                continue;
            }
            CheckFrameProgress(dispatched);
            if (NothingPending())
            {
                _ = await input.ReadAsync(Memory<byte>.Empty);
            }
            int n = await input.ReadAsync(ReadSpace());
            _readEnd += n;
            more = n > 0;
        }
    }

    private void Dispatch(in FrameView frame)
    {
        var type = frame.Type;
        uint corr = frame.CorrelationId;
        switch (type)
        {
            case FrameType.Ping:
                _context.Metrics.Command(type, CommandResult.Ok);
                WriteEmpty(FrameType.Pong, corr);
                break;
            case FrameType.New:
                HandleNew(frame);
                break;
            case FrameType.SKey:
                HandleSecure(frame);
                break;
            case FrameType.Send:
                HandleSend(frame);
                break;
            case FrameType.Sub:
                HandleSubscribe(frame);
                break;
            case FrameType.Ack:
                HandleAck(frame);
                break;
            case FrameType.Get:
                HandleGet(frame);
                break;
            case FrameType.Off:
                HandleSuspend(frame);
                break;
            case FrameType.Del:
                HandleDelete(frame);
                break;
            default:
                _context.Metrics.Command(null, CommandResult.Cmd);
                WriteError(corr, ErrorCode.Cmd);
                break;
        }
    }
}
