using System.Buffers;
using System.Buffers.Binary;
using System.Security.Cryptography;
using BenchmarkDotNet.Attributes;
using Relay.Protocol;

namespace Relay.Benchmarks;

/// <summary>
/// Parsing (FrameReader.TryRead + FrameView + QueueCommand.TryParse) and writing (FrameWriter) of
/// the four frames every message costs: SEND and its OK, the MSG push and its ACK (and OK).
/// 256-byte bodies. Every benchmark must show 0 B allocated.
/// </summary>
[MemoryDiagnoser]
public class FrameBenchmarks
{
    private readonly ArrayBufferWriter<byte> _writer = new(4096);
    private readonly byte[] _scratch = new byte[ProtocolConstants.DefaultMaxFrame];
    private byte[] _send = [];
    private byte[] _msg = [];
    private byte[] _ok = [];
    private byte[] _ack = [];
    private byte[] _authKey = [];
    private byte[] _queueId = [];
    private byte[] _body = [];
    private readonly byte[] _flags = [0];
    private readonly byte[] _messageIdBytes = new byte[8];
    private DeliveryCipher _cipher = null!;

    [GlobalSetup]
    public void Setup()
    {
        _authKey = Fixtures.Random(ProtocolConstants.KeySize);
        _queueId = Fixtures.Random(ProtocolConstants.IdSize);
        _body = Fixtures.Random(Fixtures.BodySize);
        _cipher = new DeliveryCipher(Fixtures.Random(ProtocolConstants.KeySize));
        BinaryPrimitives.WriteUInt64BigEndian(_messageIdBytes, 42);
        _send = Fixtures.Write(w => FrameWriter.WriteQueueCommand(w, FrameType.Send, 7, _queueId, _flags, _body, _authKey));
        _msg = Fixtures.Write(w => FrameWriter.WriteMsg(w, 0, _queueId, 42, 491_000, 0, _body, _cipher));
        _ok = Fixtures.Write(w => FrameWriter.WriteEmpty(w, FrameType.Ok, 7));
        _ack = Fixtures.Write(w => FrameWriter.WriteQueueCommand(w, FrameType.Ack, 8, _queueId, _messageIdBytes, default, _authKey));
    }

    [GlobalCleanup]
    public void Cleanup() => _cipher.Dispose();

    // ---- parsing: what the relay's read loop (SEND, ACK) and the client's (OK, MSG) do per frame ----

    [Benchmark]
    public int Parse_Send()
    {
        var buffer = new ReadOnlySequence<byte>(_send);
        FrameReader.TryRead(ref buffer, ProtocolConstants.DefaultMaxFrame, out var frame);
        var view = new FrameView(FrameReader.AsSpan(frame, _scratch));
        QueueCommand.TryParse(view, 1, int.MaxValue, out var command);
        return command.Args.Length + (int)view.CorrelationId + (int)view.Type;
    }

    [Benchmark]
    public int Parse_Ack()
    {
        var buffer = new ReadOnlySequence<byte>(_ack);
        FrameReader.TryRead(ref buffer, ProtocolConstants.DefaultMaxFrame, out var frame);
        var view = new FrameView(FrameReader.AsSpan(frame, _scratch));
        QueueCommand.TryParse(view, 8, 8, out var command);
        return (int)BinaryPrimitives.ReadUInt64BigEndian(command.Args) + (int)view.CorrelationId;
    }

    [Benchmark]
    public int Parse_Msg()
    {
        var buffer = new ReadOnlySequence<byte>(_msg);
        FrameReader.TryRead(ref buffer, ProtocolConstants.DefaultMaxFrame, out var frame);
        var view = new FrameView(FrameReader.AsSpan(frame, _scratch));
        return (int)BinaryPrimitives.ReadUInt64BigEndian(view.Payload.Slice(ProtocolConstants.IdSize)) + (int)view.Type;
    }

    [Benchmark]
    public int Parse_Ok()
    {
        var buffer = new ReadOnlySequence<byte>(_ok);
        FrameReader.TryRead(ref buffer, ProtocolConstants.DefaultMaxFrame, out var frame);
        var view = new FrameView(FrameReader.AsSpan(frame, _scratch));
        return (int)view.Type + (int)view.CorrelationId;
    }

    // ---- writing: one reused ArrayBufferWriter, reset per op ----

    /// <summary>SEND with its HMAC-SHA256 MAC computed in place (what a secured sender writes).</summary>
    [Benchmark]
    public int Write_Send()
    {
        _writer.ResetWrittenCount();
        FrameWriter.WriteQueueCommand(_writer, FrameType.Send, 7, _queueId, _flags, _body, _authKey);
        return _writer.WrittenCount;
    }

    /// <summary>SEND framing alone (empty key: zero MAC), to separate the copy from the MAC.</summary>
    [Benchmark]
    public int Write_Send_NoMac()
    {
        _writer.ResetWrittenCount();
        FrameWriter.WriteQueueCommand(_writer, FrameType.Send, 7, _queueId, _flags, _body, ReadOnlySpan<byte>.Empty);
        return _writer.WrittenCount;
    }

    /// <summary>MSG: includes the ChaCha20-Poly1305 sealing of the 256-byte body and a random nonce.</summary>
    [Benchmark]
    public int Write_Msg()
    {
        _writer.ResetWrittenCount();
        FrameWriter.WriteMsg(_writer, 0, _queueId, 42, 491_000, 0, _body, _cipher);
        return _writer.WrittenCount;
    }

    [Benchmark]
    public int Write_Ok()
    {
        _writer.ResetWrittenCount();
        FrameWriter.WriteEmpty(_writer, FrameType.Ok, 7);
        return _writer.WrittenCount;
    }

    [Benchmark]
    public int Write_Ack()
    {
        _writer.ResetWrittenCount();
        FrameWriter.WriteQueueCommand(_writer, FrameType.Ack, 8, _queueId, _messageIdBytes, default, _authKey);
        return _writer.WrittenCount;
    }
}
