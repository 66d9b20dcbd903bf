using System.Buffers;
using System.Buffers.Binary;
using System.Security.Cryptography;
using BenchmarkDotNet.Attributes;
using Relay.Protocol;

namespace Relay.Benchmarks;

/// <summary>
/// The relay's per-message CPU outside the store and the sockets, composed from the public pieces
/// the read loop calls in the same order (RelaySession.Dispatch itself is internal): a SEND is
/// parsed, its MAC verified and OK written; the stored body is sealed into a MSG; the ACK is parsed,
/// verified and answered with OK. Keys are the session's cached MacKeys (one reused HMAC context each)
/// and the MSG nonce comes from the subscription's NonceSequence, as in the relay. Must allocate nothing.
/// </summary>
[MemoryDiagnoser]
public class MessagePathBenchmarks
{
    private readonly ArrayBufferWriter<byte> _writer = new(4096);
    private readonly byte[] _scratch = new byte[ProtocolConstants.DefaultMaxFrame];
    private byte[] _send = [];
    private byte[] _ack = [];
    private byte[] _senderKey = [];
    private byte[] _recipientKey = [];
    private byte[] _recipientId = [];
    private byte[] _body = [];
    private DeliveryCipher _cipher = null!;
    private MacKey _senderMac = null!;
    private MacKey _recipientMac = null!;
    private readonly NonceSequence _nonces = new();

    [GlobalSetup]
    public void Setup()
    {
        _senderKey = Fixtures.Random(ProtocolConstants.KeySize);
        _recipientKey = Fixtures.Random(ProtocolConstants.KeySize);
        _recipientId = Fixtures.Random(ProtocolConstants.IdSize);
        _body = Fixtures.Random(Fixtures.BodySize);
        _cipher = new DeliveryCipher(Fixtures.Random(ProtocolConstants.KeySize));
        var id = new byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(id, 42);
        _send = Fixtures.Write(w => FrameWriter.WriteQueueCommand(w, FrameType.Send, 7, Fixtures.Random(ProtocolConstants.IdSize), [0], _body, _senderKey));
        _ack = Fixtures.Write(w => FrameWriter.WriteQueueCommand(w, FrameType.Ack, 8, _recipientId, id, default, _recipientKey));
        _senderMac = new MacKey((byte[])_senderKey.Clone());
        _recipientMac = new MacKey((byte[])_recipientKey.Clone());
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _cipher.Dispose();
        _senderMac.Dispose();
        _recipientMac.Dispose();
    }

    private bool ReceiveCommand(byte[] wire, MacKey key, int minArgs, int maxArgs)
    {
        var buffer = new ReadOnlySequence<byte>(wire);
        FrameReader.TryRead(ref buffer, ProtocolConstants.DefaultMaxFrame, out var frame);
        var view = new FrameView(FrameReader.AsSpan(frame, _scratch));
        if (!QueueCommand.TryParse(view, minArgs, maxArgs, out var command) || !key.Verify(command.MacInput, command.Mac))
        {
            return false;
        }
        FrameWriter.WriteEmpty(_writer, FrameType.Ok, view.CorrelationId);
        return true;
    }

    /// <summary>SEND in: parse, authorize, answer OK (the store append is measured in StoreBenchmarks).</summary>
    [Benchmark]
    public bool Relay_Send_Parse_Verify_Ok()
    {
        _writer.ResetWrittenCount();
        return ReceiveCommand(_send, _senderMac, 1, int.MaxValue);
    }

    /// <summary>MSG out: seal the stored body under the delivery key.</summary>
    [Benchmark]
    public int Relay_Deliver_WriteMsg()
    {
        _writer.ResetWrittenCount();
        FrameWriter.WriteMsg(_writer, 0, _recipientId, 42, 491_000, 0, _body, _cipher, _nonces);
        return _writer.WrittenCount;
    }

    /// <summary>ACK in: parse, authorize, answer OK.</summary>
    [Benchmark]
    public bool Relay_Ack_Parse_Verify_Ok()
    {
        _writer.ResetWrittenCount();
        return ReceiveCommand(_ack, _recipientMac, 8, 8);
    }

    /// <summary>All three: the relay's protocol and crypto CPU for one message, end to end.</summary>
    [Benchmark]
    public int Relay_PerMessage_AllThree()
    {
        _writer.ResetWrittenCount();
        ReceiveCommand(_send, _senderMac, 1, int.MaxValue);
        FrameWriter.WriteMsg(_writer, 0, _recipientId, 42, 491_000, 0, _body, _cipher, _nonces);
        ReceiveCommand(_ack, _recipientMac, 8, 8);
        return _writer.WrittenCount;
    }
}
