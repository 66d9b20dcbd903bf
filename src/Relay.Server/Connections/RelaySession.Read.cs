using System.Buffers;
using System.Buffers.Binary;
using System.IO.Pipelines;
using Relay.Protocol;
using Relay.Server.Metrics;

namespace Relay.Server.Connections;

internal sealed partial class RelaySession
{
    private byte[]? _scratch;

    /// <summary>Reads HELLO and answers WELCOME. False when the client was refused (the error is written).</summary>
    private async ValueTask<bool> HandshakeAsync(PipeReader input, CancellationTokenSource cts)
    {
        while (true)
        {
            ReadResult result;
            try
            {
                result = await input.ReadAsync(cts.Token);
            }
            catch (OperationCanceledException)
            {
                _context.Metrics.HandshakeFailed("timeout");
                Log.HandshakeTimeout(_logger);
                return false;
            }
            var buffer = result.Buffer;
            try
            {
                if (FrameReader.TryRead(ref buffer, ProtocolConstants.HandshakeMaxFrame, out var frameBytes))
                {
                    Span<byte> copy = stackalloc byte[(int)frameBytes.Length];
                    frameBytes.CopyTo(copy);
                    var frame = new FrameView(copy);
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
                    return true;
                }
                if (result.IsCompleted)
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
            finally
            {
                input.AdvanceTo(buffer.Start, buffer.End);
            }
        }
    }

    /// <summary>
    /// The standard read loop: drain every complete frame, advance in a finally, stop on completion,
    /// and treat leftover bytes at the end of the stream as a truncated frame.
    /// </summary>
    /// <remarks>
    /// Reads take no token: the listener's idle sweep and its shutdown end reading on the socket, so a
    /// read returns end of stream (an idle connection holds no timer or cancellation registration).
    /// </remarks>
    private async Task ReadLoopAsync(PipeReader input, ClientStream connection)
    {
        while (true)
        {
            var result = await input.ReadAsync();
            var buffer = result.Buffer;
            bool paused = false;
            try
            {
                while (FrameReader.TryRead(ref buffer, _options.MaxFrame, out var frameBytes))
                {
                    var span = frameBytes.IsSingleSegment
                        ? frameBytes.FirstSpan
                        : FrameReader.AsSpan(frameBytes, _scratch ??= new byte[_options.MaxFrame]);
                    Dispatch(new FrameView(span));
                    if (MustPause)
                    {
                        paused = true;
                        break;
                    }
                }
                if (result.IsCompleted && !paused)
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
                if (paused)
                {
                    input.AdvanceTo(buffer.Start);
                }
                else
                {
                    input.AdvanceTo(buffer.Start, buffer.End);
                }
                Flush();
            }
            if (paused)
            {
                await WaitForCapacityAsync(connection.Ended);
            }
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
