using System.Buffers;
using System.Security.Cryptography;
using BenchmarkDotNet.Attributes;
using Relay.Protocol;

namespace Relay.Benchmarks;

/// <summary>
/// The per-message authorization (HMAC-SHA256 over a SEND's MAC input, truncated to 16 bytes and
/// compared in constant time) and, separately, the auth-key derivation (X25519 + HKDF-SHA256) that
/// the relay does once per session and client key and then caches.
/// </summary>
[MemoryDiagnoser]
public class AuthBenchmarks
{
    private byte[] _send = [];
    private byte[] _authKey = [];
    private byte[] _clientPrivate = [];
    private byte[] _relayPublic = [];
    private byte[] _sessionId = [];
    private readonly byte[] _derived = new byte[ProtocolConstants.KeySize];
    private MacKey _macKey = null!;
    private IncrementalHash _hmac = null!;

    [GlobalSetup]
    public void Setup()
    {
        _authKey = Fixtures.AuthKey(out _clientPrivate, out _relayPublic, out _sessionId);
        var body = Fixtures.Random(Fixtures.BodySize);
        _send = Fixtures.Write(w => FrameWriter.WriteQueueCommand(w, FrameType.Send, 7,
            Fixtures.Random(ProtocolConstants.IdSize), [0], body, _authKey));
        _macKey = new MacKey((byte[])_authKey.Clone());
        _hmac = IncrementalHash.CreateHMAC(HashAlgorithmName.SHA256, _authKey);
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _macKey.Dispose();
        _hmac.Dispose();
    }

    /// <summary>Per SEND: VerifyMac over type ‖ corr ‖ senderId ‖ flags ‖ 256-byte body.</summary>
    [Benchmark]
    public bool VerifyMac_Send256()
    {
        var view = new FrameView(_send.AsSpan(ProtocolConstants.LengthPrefixSize));
        QueueCommand.TryParse(view, 1, int.MaxValue, out var command);
        return RelayCrypto.VerifyMac(_authKey, command.MacInput, command.Mac);
    }

    /// <summary>Per SEND as the relay does it: the session's MacKey for that key, which keeps one HMAC context.</summary>
    [Benchmark]
    public bool VerifyMac_Send256_MacKey()
    {
        var view = new FrameView(_send.AsSpan(ProtocolConstants.LengthPrefixSize));
        QueueCommand.TryParse(view, 1, int.MaxValue, out var command);
        return _macKey.Verify(command.MacInput, command.Mac);
    }

    /// <summary>The same with one reused BCL HMAC context (MacKey's fallback without direct libcrypto calls).</summary>
    [Benchmark]
    public bool VerifyMac_Send256_IncrementalHash()
    {
        var view = new FrameView(_send.AsSpan(ProtocolConstants.LengthPrefixSize));
        QueueCommand.TryParse(view, 1, int.MaxValue, out var command);
        Span<byte> full = stackalloc byte[32];
        _hmac.AppendData(command.MacInput);
        _hmac.GetHashAndReset(full);
        return CryptographicOperations.FixedTimeEquals(full.Slice(0, ProtocolConstants.MacSize), command.Mac);
    }

    /// <summary>Once per session and client key: X25519 agreement + HKDF-SHA256.</summary>
    [Benchmark]
    public bool DeriveAuthKey_PerSessionAndQueue() =>
        RelayCrypto.TryDeriveAuthKey(_clientPrivate, _relayPublic, _sessionId, _derived);
}

/// <summary>
/// The delivery re-encryption: the relay seals every stored body under the queue's delivery key
/// (FrameWriter.WriteMsg, ChaCha20-Poly1305, fresh random nonce) and the recipient opens it
/// (RelayCrypto.TryOpenDelivery).
/// </summary>
[MemoryDiagnoser]
public class DeliveryBenchmarks
{
    private readonly ArrayBufferWriter<byte> _writer = new(70_000);
    private DeliveryCipher _cipher = null!;
    private byte[] _recipientId = [];
    private byte[] _body = [];
    private byte[] _msgPayload = [];
    private byte[] _opened = [];
    private readonly NonceSequence _nonces = new();

    [Params(256, 4096)]
    public int Size { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        _cipher = new DeliveryCipher(Fixtures.Random(ProtocolConstants.KeySize));
        _recipientId = Fixtures.Random(ProtocolConstants.IdSize);
        _body = Fixtures.Random(Size);
        _opened = new byte[Size];
        var frame = Fixtures.Write(w => FrameWriter.WriteMsg(w, 0, _recipientId, 42, 491_000, 0, _body, _cipher));
        _msgPayload = frame.AsSpan(ProtocolConstants.LengthPrefixSize + ProtocolConstants.HeaderSize).ToArray();
    }

    [GlobalCleanup]
    public void Cleanup() => _cipher.Dispose();

    [Benchmark]
    public int Seal_WriteMsg()
    {
        _writer.ResetWrittenCount();
        FrameWriter.WriteMsg(_writer, 0, _recipientId, 42, 491_000, 0, _body, _cipher);
        return _writer.WrittenCount;
    }

    /// <summary>As the relay seals for a subscriber: the nonce counted from the subscription's random start.</summary>
    [Benchmark]
    public int Seal_WriteMsg_NonceSequence()
    {
        _writer.ResetWrittenCount();
        FrameWriter.WriteMsg(_writer, 0, _recipientId, 42, 491_000, 0, _body, _cipher, _nonces);
        return _writer.WrittenCount;
    }

    [Benchmark]
    public int Open_TryOpenDelivery()
    {
        RelayCrypto.TryOpenDelivery(_cipher, _msgPayload, _opened, out _, out _, out _, out int length);
        return length;
    }
}
