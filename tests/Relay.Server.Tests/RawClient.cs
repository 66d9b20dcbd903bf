using System.Buffers;
using System.Buffers.Binary;
using System.Net.Security;
using System.Net.Sockets;
using System.Security.Authentication;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using System.Text;
using Relay.Client.Transport;
using Relay.Protocol;

namespace Relay.Server.Tests;

/// <summary>One frame as received: type, correlation id, payload, and the exact bytes on the wire.</summary>
public sealed record RawFrame(FrameType Type, uint Correlation, byte[] Payload, byte[] Wire)
{
    public ErrorCode? Error => Type == FrameType.Err && Payload.Length > 0 ? (ErrorCode)Payload[0] : null;
    public override string ToString() => $"{Type} corr={Correlation} payload={Convert.ToHexString(Payload.AsSpan(0, Math.Min(Payload.Length, 16)))}";
}

/// <summary>A queue created over a raw connection, with every key the tests need.</summary>
public sealed record RawQueue(byte[] RecipientId, byte[] SenderId, byte[] RecipientPrivate, byte[] DeliveryKey);

/// <summary>
/// A raw socket (plain TCP or TLS with ALPN relay/1) that writes arbitrary bytes and reads frames
/// exactly as they arrive, for the bad-input and protocol tests. It trusts any certificate:
/// the tests that matter for pinning use the SDK.
/// </summary>
public sealed class RawClient : IAsyncDisposable
{
    private readonly TcpClient? _tcp;   // null over an in-process connection
    private readonly Stream _stream;
    private readonly byte[] _buffer = new byte[256 * 1024];
    private int _start;
    private int _end;
    private uint _nextCorr = 1000;

    public static readonly TimeSpan DefaultTimeout = TimeSpan.FromSeconds(10);

    public byte[] SessionId { get; private set; } = [];
    public byte[] SessionKey { get; private set; } = [];
    public int MaxFrame { get; private set; }
    public int MaxMessage { get; private set; }
    public ushort Version { get; private set; }
    public Socket Socket => _tcp?.Client ?? throw new InvalidOperationException("an in-process connection has no socket");
    /// <summary>The TLS (leaf) certificate the relay presented; null without TLS.</summary>
    public X509Certificate2? ServerCertificate => (_stream as SslStream)?.RemoteCertificate as X509Certificate2;
    /// <summary>The certificates the relay presented with its leaf (PROTOCOL.md §2: the identity certificate).</summary>
    public IReadOnlyList<X509Certificate2> PresentedChain { get; private set; } = [];

    private RawClient(TcpClient? tcp, Stream stream)
    {
        _tcp = tcp;
        _stream = stream;
    }

    /// <summary>Connects (and TLS when the relay uses it), without the relay handshake.</summary>
    public static async Task<RawClient> ConnectRawAsync(TestRelay relay, List<SslApplicationProtocol>? alpn = null)
    {
        var tcp = new TcpClient { NoDelay = true };
        await tcp.ConnectAsync(relay.Server.RelayEndPoint.Address, relay.Server.RelayEndPoint.Port);
        Stream stream = tcp.GetStream();
        if (relay.Server.Options.Tls)
        {
            var ssl = new SslStream(stream, leaveInnerStreamOpen: false);
            using var cts = new CancellationTokenSource(DefaultTimeout);
            List<X509Certificate2> presented = [];
            await ssl.AuthenticateAsClientAsync(new SslClientAuthenticationOptions
            {
                TargetHost = "relay",
                ApplicationProtocols = alpn ?? [new SslApplicationProtocol(ProtocolConstants.AlpnString)],
                EnabledSslProtocols = SslProtocols.Tls13,
                RemoteCertificateValidationCallback = (_, _, chain, _) =>
                {
                    presented = chain?.ChainPolicy.ExtraStore.Cast<X509Certificate2>().ToList() ?? [];
                    return true;
                },
            }, cts.Token);
            return new RawClient(tcp, ssl) { PresentedChain = presented };
        }
        return new RawClient(tcp, stream);
    }

    /// <summary>Connects and completes HELLO/WELCOME.</summary>
    public static async Task<RawClient> ConnectAsync(TestRelay relay)
    {
        var client = await ConnectRawAsync(relay);
        await client.HandshakeAsync();
        return client;
    }

    /// <summary>
    /// Connects through <see cref="Hosting.RelayServer.ConnectInProcess"/> (a relay without TLS) and
    /// completes HELLO/WELCOME: the relay's writes wait once 64 KiB are unread, with no kernel buffers.
    /// </summary>
    public static async Task<RawClient> ConnectInProcessAsync(TestRelay relay)
    {
        var client = new RawClient(null, relay.Server.ConnectInProcess());
        await client.HandshakeAsync();
        return client;
    }

    public async Task HandshakeAsync()
    {
        await WriteAsync(Hello(1, 1));
        var welcome = await ReadFrameAsync() ?? throw new InvalidOperationException("closed during the handshake");
        if (welcome.Type != FrameType.Welcome || welcome.Payload.Length != FrameWriter.WelcomePayloadSize)
        {
            throw new InvalidOperationException($"expected WELCOME, got {welcome}");
        }
        var p = welcome.Payload;
        Version = BinaryPrimitives.ReadUInt16BigEndian(p);
        MaxFrame = (int)BinaryPrimitives.ReadUInt32BigEndian(p.AsSpan(2));
        MaxMessage = (int)BinaryPrimitives.ReadUInt32BigEndian(p.AsSpan(6));
        SessionId = p.AsSpan(10, 32).ToArray();
        SessionKey = p.AsSpan(42, 32).ToArray();
    }

    public uint NextCorr() => ++_nextCorr;

    public async Task WriteAsync(byte[] bytes)
    {
        await _stream.WriteAsync(bytes);
        await _stream.FlushAsync();
    }

    /// <summary>Half-closes the sending side (TCP FIN, or TLS close_notify then FIN).</summary>
    public async Task ShutdownSendAsync()
    {
        if (_stream is SslStream ssl)
        {
            await ssl.ShutdownAsync();
        }
        Socket.Shutdown(SocketShutdown.Send);
    }

    /// <summary>The next frame, or null when the peer closed (EOF or reset). Throws on timeout.</summary>
    public async Task<RawFrame?> ReadFrameAsync(TimeSpan? timeout = null)
    {
        using var cts = new CancellationTokenSource(timeout ?? DefaultTimeout);
        while (true)
        {
            int available = _end - _start;
            if (available >= 4)
            {
                uint length = BinaryPrimitives.ReadUInt32BigEndian(_buffer.AsSpan(_start));
                if (length < 5 || length > _buffer.Length - 4)
                {
                    throw new InvalidDataException($"the relay sent a frame length of {length}");
                }
                if (available >= 4 + length)
                {
                    var wire = _buffer.AsSpan(_start, 4 + (int)length).ToArray();
                    _start += 4 + (int)length;
                    return new RawFrame((FrameType)wire[4], BinaryPrimitives.ReadUInt32BigEndian(wire.AsSpan(5)), wire.AsSpan(9).ToArray(), wire);
                }
            }
            if (_start > 0)
            {
                Buffer.BlockCopy(_buffer, _start, _buffer, 0, available);
                _start = 0;
                _end = available;
            }
            int n;
            try
            {
                n = await _stream.ReadAsync(_buffer.AsMemory(_end), cts.Token);
            }
            catch (OperationCanceledException) when (cts.IsCancellationRequested)
            {
                throw new TimeoutException($"no frame from the relay within {timeout ?? DefaultTimeout}");
            }
            catch (IOException)
            {
                return null;
            }
            if (n == 0)
            {
                if (_end - _start > 0)
                {
                    throw new InvalidDataException($"the relay closed in the middle of a frame ({_end - _start} bytes)");
                }
                return null;
            }
            _end += n;
        }
    }

    /// <summary>The next frame that is not a push (corr 0 MSG/END), or throws when the connection closed.</summary>
    public async Task<RawFrame> ReadResponseAsync(TimeSpan? timeout = null)
    {
        var frame = await ReadFrameAsync(timeout) ?? throw new InvalidOperationException("the relay closed the connection");
        return frame;
    }

    /// <summary>True when the relay closes the connection within <paramref name="timeout"/> (any frames before are returned).</summary>
    public async Task<(bool Closed, List<RawFrame> Frames)> WaitForCloseAsync(TimeSpan timeout)
    {
        var frames = new List<RawFrame>();
        var deadline = DateTime.UtcNow + timeout;
        while (true)
        {
            var left = deadline - DateTime.UtcNow;
            if (left <= TimeSpan.Zero) return (false, frames);
            RawFrame? frame;
            try
            {
                frame = await ReadFrameAsync(left);
            }
            catch (TimeoutException)
            {
                return (false, frames);
            }
            if (frame is null) return (true, frames);
            frames.Add(frame);
        }
    }

    /// <summary>Sends one request and reads its answer (the next frame with that correlation id; pushes are kept aside).</summary>
    public async Task<RawFrame> RequestAsync(byte[] frame, List<RawFrame>? pushes = null)
    {
        uint corr = BinaryPrimitives.ReadUInt32BigEndian(frame.AsSpan(5));
        await WriteAsync(frame);
        while (true)
        {
            var answer = await ReadResponseAsync();
            if (answer.Correlation == corr) return answer;
            pushes?.Add(answer);
        }
    }

    // ---- frame builders -------------------------------------------------------------------------

    public static byte[] Frame(FrameType type, uint corr, ReadOnlySpan<byte> payload) => Frame((byte)type, corr, payload);

    public static byte[] Frame(byte type, uint corr, ReadOnlySpan<byte> payload)
    {
        var bytes = new byte[9 + payload.Length];
        BinaryPrimitives.WriteUInt32BigEndian(bytes, (uint)(5 + payload.Length));
        bytes[4] = type;
        BinaryPrimitives.WriteUInt32BigEndian(bytes.AsSpan(5), corr);
        payload.CopyTo(bytes.AsSpan(9));
        return bytes;
    }

    public static byte[] Hello(ushort min, ushort max)
    {
        var p = new byte[4];
        BinaryPrimitives.WriteUInt16BigEndian(p, min);
        BinaryPrimitives.WriteUInt16BigEndian(p.AsSpan(2), max);
        return Frame(FrameType.Hello, 0, p);
    }

    /// <summary>authKey for <paramref name="privateKey"/> on this connection (docs/PROTOCOL.md §5).</summary>
    public byte[] AuthKey(byte[] privateKey)
    {
        var key = new byte[32];
        if (!RelayCrypto.TryDeriveAuthKey(privateKey, SessionKey, SessionId, key))
        {
            throw new InvalidOperationException("small-order session key");
        }
        return key;
    }

    /// <summary>queueId ‖ args ‖ MAC under this session's key for <paramref name="privateKey"/> (zero MAC when null).</summary>
    public byte[] QueueCommand(FrameType type, uint corr, byte[] queueId, ReadOnlySpan<byte> args, byte[]? privateKey)
    {
        var w = new ArrayBufferWriter<byte>();
        FrameWriter.WriteQueueCommand(w, type, corr, queueId, args, default, privateKey is null ? default : AuthKey(privateKey));
        return w.WrittenSpan.ToArray();
    }

    public static (byte[] Private, byte[] Public) KeyPair()
    {
        var priv = new byte[32];
        var pub = new byte[32];
        RelayCrypto.GenerateKeyPair(priv, pub);
        return (priv, pub);
    }

    public static byte[] U64(ulong value)
    {
        var b = new byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(b, value);
        return b;
    }

    /// <summary>NEW over this connection; returns the queue with its keys.</summary>
    public async Task<RawQueue> CreateQueueAsync()
    {
        var (recipientPrivate, recipientPublic) = KeyPair();
        var (dhPrivate, dhPublic) = KeyPair();
        var payload = new byte[65];
        recipientPublic.CopyTo(payload, 0);
        dhPublic.CopyTo(payload, 32);
        var answer = await RequestAsync(Frame(FrameType.New, NextCorr(), payload));
        if (answer.Type != FrameType.Ids)
        {
            throw new InvalidOperationException($"NEW answered {answer}");
        }
        var recipientId = answer.Payload.AsSpan(0, 24).ToArray();
        var senderId = answer.Payload.AsSpan(24, 24).ToArray();
        var deliveryKey = new byte[32];
        if (!RelayCrypto.TryDeriveDeliveryKey(dhPrivate, answer.Payload.AsSpan(48, 32), recipientId, deliveryKey))
        {
            throw new InvalidOperationException("bad server DH key");
        }
        return new RawQueue(recipientId, senderId, recipientPrivate, deliveryKey);
    }

    /// <summary>An unsecured SEND (no MAC) of <paramref name="body"/>.</summary>
    public byte[] Send(uint corr, byte[] senderId, ReadOnlySpan<byte> body, byte[]? senderPrivate = null)
    {
        var args = new byte[1 + body.Length];
        body.CopyTo(args.AsSpan(1));
        return QueueCommand(FrameType.Send, corr, senderId, args, senderPrivate);
    }

    /// <summary>Opens a MSG payload with the queue's delivery key: (msgId, flags, body).</summary>
    public static (ulong Id, byte Flags, byte[] Body) Open(RawQueue queue, byte[] msgPayload)
    {
        using var cipher = new DeliveryCipher(queue.DeliveryKey);
        var body = new byte[msgPayload.Length - ProtocolConstants.MsgOverhead];
        if (!RelayCrypto.TryOpenDelivery(cipher, msgPayload, body, out var id, out _, out var flags, out _))
        {
            throw new InvalidOperationException("delivery failed authentication");
        }
        return (id, flags, body);
    }

    public async ValueTask DisposeAsync()
    {
        try { await _stream.DisposeAsync(); } catch (Exception) { }
        _tcp?.Dispose();
    }
}
/// <summary>
/// A well-behaved client that is connected in parallel while another connection misbehaves. It
/// stores messages before the bad input and checks afterwards that it kept working (create, send,
/// receive) and that every acknowledged message is delivered exactly once, in order.
/// </summary>
public sealed class Bystander : IAsyncDisposable
{
    private readonly TestRelay _relay;
    private readonly List<string> _expected = [];
    public RelayConnection Recipient { get; }
    public RelayConnection Sender { get; }
    public RecipientQueue Queue { get; }

    private Bystander(TestRelay relay, RelayConnection recipient, RelayConnection sender, RecipientQueue queue)
    {
        _relay = relay;
        Recipient = recipient;
        Sender = sender;
        Queue = queue;
    }

    /// <summary>Connects, creates an (unsecured) queue and stores three acknowledged messages.</summary>
    public static async Task<Bystander> StartAsync(TestRelay relay)
    {
        var recipient = await relay.ConnectAsync();
        var sender = await relay.ConnectAsync();
        var queue = await recipient.CreateQueueAsync();
        var b = new Bystander(relay, recipient, sender, queue);
        for (int i = 1; i <= 3; i++)
        {
            await b.SendAsync($"before-{i}");
        }
        return b;
    }

    public async Task SendAsync(string text)
    {
        await Sender.SendAsync(new SenderQueue(Queue.SenderId, null), Encoding.UTF8.GetBytes(text));
        _expected.Add(text);
    }

    /// <summary>A message the misbehaving connection stored (and got OK for) before its bad input.</summary>
    public void ExpectAcknowledged(string text) => _expected.Add(text);

    /// <summary>
    /// The bystander's connections still work, a new queue can be created and used, and the queue
    /// holds exactly the acknowledged messages, delivered once each and in order.
    /// </summary>
    public async Task VerifyAsync()
    {
        await Recipient.PingAsync();
        await Sender.PingAsync();
        await SendAsync("after-1");

        var fresh = await Recipient.CreateQueueAsync();
        await Sender.SendAsync(new SenderQueue(fresh.SenderId, null), "fresh"u8.ToArray());
        var got = await Recipient.GetAsync(fresh);
        if (got is null || Encoding.UTF8.GetString(got.Body) != "fresh")
        {
            throw new InvalidOperationException("a fresh queue did not return its message");
        }

        await Recipient.SubscribeAsync(Queue);
        var received = new List<string>();
        ulong last = 0;
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(15));
        while (received.Count < _expected.Count)
        {
            var e = await Recipient.Events.ReadAsync(cts.Token);
            if (e is not DeliveryEvent d) continue;
            if (d.Delivery.MessageId <= last)
            {
                throw new InvalidOperationException($"message id {d.Delivery.MessageId} after {last}");
            }
            last = d.Delivery.MessageId;
            received.Add(Encoding.UTF8.GetString(d.Delivery.Body));
            await Recipient.AckAsync(Queue, d.Delivery.MessageId);
        }
        if (!received.SequenceEqual(_expected))
        {
            throw new InvalidOperationException($"expected [{string.Join(",", _expected)}], received [{string.Join(",", received)}]");
        }
        // Nothing else was stored (no truncated or refused SEND slipped in).
        var extra = await Recipient.GetAsync(Queue);
        if (extra != null)
        {
            throw new InvalidOperationException($"an extra message was stored: {Encoding.UTF8.GetString(extra.Body)}");
        }
    }

    public async ValueTask DisposeAsync()
    {
        await Recipient.DisposeAsync();
        await Sender.DisposeAsync();
    }
}
