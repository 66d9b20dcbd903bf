using System.Buffers;
using System.Buffers.Binary;
using System.Diagnostics.CodeAnalysis;
using System.Globalization;
using System.IO.Pipelines;
using System.Net.Security;
using System.Net.Sockets;
using System.Security.Authentication;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using System.Threading.Channels;
using Relay.Protocol;

namespace Relay.Client.Transport;

/// <summary>
/// How <see cref="RelayConnection.ConnectAsync(RelayAddress, RelayConnectionOptions?, CancellationToken)"/>
/// connects. A value out of its documented range is refused when it is set (<see cref="ArgumentException"/>
/// or <see cref="ArgumentOutOfRangeException"/> naming the option), by the checks
/// <see cref="RelayClientOptions"/> uses, rather than by every connection made with it.
/// </summary>
public sealed class RelayConnectionOptions
{
    // The times below set timers, which count whole milliseconds (a positive value under 1 ms would
    // be none) up to 2^32 - 2 ms (about 49.7 days): the documented range is 1 ms to 49 days.
    private static readonly TimeSpan ShortestTimer = TimeSpan.FromMilliseconds(1);
    private static readonly TimeSpan LongestTimer = TimeSpan.FromDays(49);

    /// <summary>
    /// SOCKS5 proxy as host:port (Tor, shadowsocks' ss-local); null connects directly. The relay's
    /// host goes to the proxy as a name it resolves, or as an address when it is one (<see cref="Socks5"/>).
    /// A value that is not host:port (an IPv6 address in brackets, the port 1 to 65535) is refused when
    /// it is set (<see cref="ArgumentException"/> naming the option), rather than by every connection.
    /// </summary>
    public string? Socks { get; init => field = CheckSocks(value); }

    /// <summary>
    /// <paramref name="value"/> when it is null or host:port (<see cref="RelayConnection.TryParseHostPort"/>);
    /// otherwise throws <see cref="ArgumentException"/> naming the option. The check of this Socks and
    /// of <see cref="RelayClientOptions.Socks"/>.
    /// </summary>
    internal static string? CheckSocks(string? value) =>
        value is null || RelayConnection.TryParseHostPort(value, out _, out _, out var error)
            ? value
            : throw new ArgumentException($"{nameof(Socks)}: {error}", nameof(Socks));

    /// <summary>False for a relay configured with plain TCP (loopback hop, benchmarks).</summary>
    public bool Tls { get; init; } = true;

    /// <summary>
    /// How long an attempt to connect may take (TCP or SOCKS5, TLS, the handshake). From 1 ms to 49 days:
    /// outside that range it is refused when it is set (<see cref="ArgumentOutOfRangeException"/> naming it).
    /// </summary>
    public TimeSpan ConnectTimeout { get; init => field = CheckTimer(value, nameof(ConnectTimeout)); } = TimeSpan.FromSeconds(30);

    /// <summary>
    /// <paramref name="value"/> when it is from 1 ms to 49 days; otherwise throws
    /// <see cref="ArgumentOutOfRangeException"/> naming the option <paramref name="name"/>. The check of
    /// this ConnectTimeout and of the times of <see cref="RelayClientOptions"/>.
    /// </summary>
    internal static TimeSpan CheckTimer(TimeSpan value, string name) =>
        value >= ShortestTimer && value <= LongestTimer
            ? value
            : throw new ArgumentOutOfRangeException(name, value, $"{name} must be from 1 ms to 49 days");

    /// <summary>Which of the address's hosts to dial; default the first.</summary>
    public string? Host { get; init; }
}

/// <summary>
/// One connection to one relay: TLS with fingerprint pinning, the handshake, pipelined requests
/// matched by correlation id, and pushed events. The transport layer of the SDK.
/// Split by facet: this file (connect, read, write), RelayConnection.Requests.cs (requests in flight),
/// RelayConnection.Commands.cs (the commands), RelayConnection.KeepAlive.cs (the keep-alive's PING).
/// </summary>
public sealed partial class RelayConnection : IAsyncDisposable
{
    private readonly Stream _stream;
    private readonly Pipe _output = new(new PipeOptions(pauseWriterThreshold: 0, resumeWriterThreshold: 0, useSynchronizationContext: false));
    private readonly Lock _writeLock = new();
    private readonly Lock _pendingLock = new();
    private readonly Dictionary<uint, InFlight> _pending = new();
    // Queues subscribed on this connection, by recipient id: their delivery ciphers while the app
    // receives them, and the delivery window the relay granted (RelayConnection.Window.cs).
    private readonly Dictionary<Id, Subscription> _subscribed = new();
    private readonly Dictionary<Id, MacKey> _authKeys = new();
    private readonly Channel<RelayEvent> _events = Channel.CreateUnbounded<RelayEvent>(new UnboundedChannelOptions { SingleReader = false, SingleWriter = true });
    private readonly CancellationTokenSource _closed = new();
    private readonly Task _readLoop;
    private readonly Task _copyLoop;
    private uint _nextCorrelation;
    private Exception? _failure;
    private bool _disposed;
    private bool _failing;   // under _pendingLock: Fail has taken the pending requests

    public RelayAddress Address { get; }
    public ushort Version { get; }
    public int MaxFrame { get; }
    public int MaxMessage { get; }
    public byte[] SessionId { get; }
    private readonly byte[] _sessionKey;

    /// <summary>
    /// Events pushed by the relay (deliveries, ended subscriptions). Bounded by the delivery windows
    /// the relay granted: it may push a queue's messages only while fewer than the window of the
    /// queue's last SUB are delivered and not acknowledged on this connection (a SUB repeated, or an
    /// ACK answered INTERNAL, makes the relay deliver again from the oldest stored message), and the
    /// connection holds it to that. A push beyond the window, or of a queue this connection has not
    /// subscribed, breaks the protocol: the connection fails with a
    /// <see cref="RelayConnectException"/> whose inner exception is a <see cref="ProtocolException"/>.
    /// Completes when the connection ends, after the events received before: normally when it was
    /// lost or closed (<see cref="Failure"/> says why), with that exception when the relay broke the
    /// protocol.
    /// </summary>
    public ChannelReader<RelayEvent> Events => _events.Reader;

    /// <summary>Cancelled when the connection is lost or disposed.</summary>
    public CancellationToken Closed => _closed.Token;

    /// <summary>Why the connection ended, once it has.</summary>
    public Exception? Failure => _failure;

    public readonly record struct Response(FrameType Type, byte[] Payload);

    private RelayConnection(RelayAddress address, Stream stream, PipeReader input, ushort version, int maxFrame, int maxMessage,
        byte[] sessionId, byte[] sessionKey)
    {
        Address = address;
        _stream = stream;
        Version = version;
        MaxFrame = maxFrame;
        MaxMessage = maxMessage;
        SessionId = sessionId;
        _sessionKey = sessionKey;
        _flush = new FlushWorkItem(this);
        _copyLoop = CopyOutputAsync();
        _readLoop = ReadLoopAsync(input);
    }

    /// <summary>The largest maxFrame a relay may announce to this client (the default is 65,536; no option raises it).</summary>
    public const int MaxAnnouncedFrame = 1 << 20;

    public static async Task<RelayConnection> ConnectAsync(RelayAddress address, RelayConnectionOptions? options = null,
        CancellationToken cancellationToken = default)
    {
        options ??= new RelayConnectionOptions();
        using var timeout = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        timeout.CancelAfter(options.ConnectTimeout);
        var host = options.Host ?? address.Host;
        Stream stream;
        try
        {
            if (options.Socks is { } socks)
            {
                var (proxyHost, proxyPort) = ParseHostPort(socks);
                stream = await Socks5.ConnectAsync(proxyHost, proxyPort, host, address.Port, timeout.Token).ConfigureAwait(false);
            }
            else
            {
                var tcp = await TcpConnect.ConnectAsync(host, address.Port, timeout.Token).ConfigureAwait(false);
                stream = tcp.GetStream();
            }
        }
        catch (OperationCanceledException) when (!cancellationToken.IsCancellationRequested)
        {
            throw new RelayConnectException($"timed out connecting to {host}:{address.Port}");
        }
        catch (SocketException ex)
        {
            throw new RelayConnectException($"cannot connect to {host}:{address.Port}: {ex.Message}", ex);
        }
        return await HandshakeAsync(address, host, stream, options, timeout.Token, cancellationToken).ConfigureAwait(false);
    }

    /// <summary>
    /// Speaks relay/1 over a byte stream the caller opened (a Unix socket, a tunnel, or
    /// <c>RelayServer.ConnectInProcess()</c> of a relay in the same process): TLS first when
    /// <see cref="RelayConnectionOptions.Tls"/> is on (the relay's certificate pinned to the address's
    /// fingerprint as over TCP), then the handshake. The connection owns the stream from here on and
    /// disposes it; <see cref="RelayConnectionOptions.Socks"/> does not apply.
    /// </summary>
    public static async Task<RelayConnection> ConnectAsync(RelayAddress address, Stream transport, RelayConnectionOptions? options = null,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(transport);
        options ??= new RelayConnectionOptions();
        using var timeout = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        timeout.CancelAfter(options.ConnectTimeout);
        return await HandshakeAsync(address, options.Host ?? address.Host, transport, options, timeout.Token, cancellationToken).ConfigureAwait(false);
    }

    /// <summary>TLS (when on) and HELLO over an open stream; disposes the stream when either fails.</summary>
    private static async Task<RelayConnection> HandshakeAsync(RelayAddress address, string host, Stream stream,
        RelayConnectionOptions options, CancellationToken timeout, CancellationToken cancellationToken)
    {
        try
        {
            if (options.Tls)
            {
                var ssl = new SslStream(stream, leaveInnerStreamOpen: false);
                bool pinned = false, checkedCertificate = false;
                var tlsOptions = new SslClientAuthenticationOptions
                {
                    TargetHost = host.EndsWith(".onion", StringComparison.OrdinalIgnoreCase) || !host.Any(char.IsLetter) ? "relay" : host,
                    ApplicationProtocols = [new SslApplicationProtocol(ProtocolConstants.AlpnString)],
                    EnabledSslProtocols = SslProtocols.Tls13,
                    CertificateRevocationCheckMode = X509RevocationMode.NoCheck,
                    RemoteCertificateValidationCallback = (_, certificate, chain, _) =>
                    {
                        if (certificate is null) return false;
                        checkedCertificate = true;
                        var leaf = certificate as X509Certificate2 ?? X509CertificateLoader.LoadCertificate(certificate.GetRawCertData());
                        var presented = chain?.ChainPolicy.ExtraStore.Cast<X509Certificate2>().ToList() ?? [];
                        pinned = RelayAddress.VerifyChain(leaf, presented, address.Fingerprint, DateTime.UtcNow);
                        return pinned;
                    },
                };
                try
                {
                    await ssl.AuthenticateAsClientAsync(tlsOptions, timeout).ConfigureAwait(false);
                }
                catch (AuthenticationException) when (!pinned && checkedCertificate)
                {
                    await ssl.DisposeAsync().ConfigureAwait(false);
                    throw new FingerprintMismatchException(address.Fingerprint);
                }
                catch (AuthenticationException ex)
                {
                    // No certificate got as far as the pin check: no TLS at all (a plain-TCP relay?) or
                    // no common TLS 1.3 setup; not an identity mismatch.
                    await ssl.DisposeAsync().ConfigureAwait(false);
                    throw new RelayConnectException($"the TLS handshake with {host}:{address.Port} failed before the relay's identity could be checked (is it a plain-TCP relay?): {ex.Message}", ex);
                }
                if (ssl.NegotiatedApplicationProtocol.ToString() != ProtocolConstants.AlpnString)
                {
                    await ssl.DisposeAsync().ConfigureAwait(false);
                    throw new RelayConnectException("the server did not agree to the relay/1 protocol (ALPN)");
                }
                stream = ssl;
            }

            var input = PipeReader.Create(stream, new StreamPipeReaderOptions(bufferSize: 64 * 1024, leaveOpen: true));
            var hello = new ArrayBufferWriter<byte>(16);
            FrameWriter.WriteHello(hello, ProtocolConstants.MinVersion, ProtocolConstants.MaxVersion);
            await stream.WriteAsync(hello.WrittenMemory, timeout).ConfigureAwait(false);
            await stream.FlushAsync(timeout).ConfigureAwait(false);
            var (type, payload) = await ReadOneFrameAsync(input, timeout).ConfigureAwait(false);
            if (type == FrameType.Err)
            {
                var code = payload.Length > 0 ? (ErrorCode)payload[0] : ErrorCode.Syntax;
                throw new RelayErrorException(code, "the handshake");
            }
            if (type != FrameType.Welcome || payload.Length != FrameWriter.WelcomePayloadSize)
            {
                throw new RelayConnectException("the relay answered the handshake with something unexpected");
            }
            ushort version = BinaryPrimitives.ReadUInt16BigEndian(payload);
            uint maxFrameField = BinaryPrimitives.ReadUInt32BigEndian(payload.AsSpan(2));
            uint maxMessageField = BinaryPrimitives.ReadUInt32BigEndian(payload.AsSpan(6));
            // What the relay announces sizes the client's buffers: refuse what no relay following
            // PROTOCOL.md announces (a frame over 1 MiB, a message that does not fit a delivery frame).
            if (version < ProtocolConstants.MinVersion || version > ProtocolConstants.MaxVersion
                || maxFrameField < ProtocolConstants.HandshakeMaxFrame || maxFrameField > MaxAnnouncedFrame
                || maxMessageField < 1 || maxMessageField > (uint)ProtocolConstants.LargestMessage((int)maxFrameField))
            {
                throw new RelayConnectException($"the relay announced limits this client does not accept (version {version}, maxFrame {maxFrameField}, maxMessage {maxMessageField})");
            }
            int maxFrame = (int)maxFrameField;
            int maxMessage = (int)maxMessageField;
            var sessionId = payload.AsSpan(10, ProtocolConstants.SessionIdSize).ToArray();
            var sessionKey = payload.AsSpan(10 + ProtocolConstants.SessionIdSize, ProtocolConstants.KeySize).ToArray();
            return new RelayConnection(address, stream, input, version, maxFrame, maxMessage, sessionId, sessionKey);
        }
        catch (OperationCanceledException) when (!cancellationToken.IsCancellationRequested)
        {
            await stream.DisposeAsync().ConfigureAwait(false);
            throw new RelayConnectException($"timed out during the handshake with {host}:{address.Port}");
        }
        catch (Exception ex) when (ex is IOException or AuthenticationException or ProtocolException)
        {
            await stream.DisposeAsync().ConfigureAwait(false);
            throw new RelayConnectException($"the connection to {host}:{address.Port} failed during the handshake: {ex.Message}", ex);
        }
        catch
        {
            await stream.DisposeAsync().ConfigureAwait(false);
            throw;
        }
    }

    /// <summary>
    /// A proxy's HOST:PORT (an IPv6 address in brackets): the host non-empty, without spaces or control
    /// characters, the port 1 to 65535. Throws <see cref="FormatException"/> saying what is wrong.
    /// </summary>
    internal static (string Host, int Port) ParseHostPort(string value)
    {
        if (!TryParseHostPort(value, out var host, out int port, out var error))
        {
            throw new FormatException(error);
        }
        return (host, port);
    }

    internal static bool TryParseHostPort(string value, out string host, out int port, [NotNullWhen(false)] out string? error)
    {
        host = "";
        port = 0;
        int colon = value.LastIndexOf(':');
        if (colon < 0)
        {
            error = $"expected HOST:PORT, got '{value}' (no port)";
            return false;
        }
        var portText = value.AsSpan(colon + 1);
        if (portText.Length == 0 || !int.TryParse(portText, NumberStyles.None, CultureInfo.InvariantCulture, out port) || port is < 1 or > 65535)
        {
            port = 0;
            error = $"expected HOST:PORT with a port from 1 to 65535, got '{value}'";
            return false;
        }
        host = value.Substring(0, colon).Trim('[', ']');
        if (host.Length == 0 || host.Any(c => char.IsWhiteSpace(c) || char.IsControl(c)))
        {
            host = "";
            port = 0;
            error = $"expected HOST:PORT with a host name or address, got '{value}'";
            return false;
        }
        error = null;
        return true;
    }

    private static async Task<(FrameType, byte[])> ReadOneFrameAsync(PipeReader input, CancellationToken cancellationToken)
    {
        while (true)
        {
            var result = await input.ReadAsync(cancellationToken).ConfigureAwait(false);
            var buffer = result.Buffer;
            try
            {
                if (FrameReader.TryRead(ref buffer, ProtocolConstants.HandshakeMaxFrame, out var frame))
                {
                    var bytes = frame.ToArray();
                    return ((FrameType)bytes[0], bytes.AsSpan(ProtocolConstants.HeaderSize).ToArray());
                }
                if (result.IsCompleted)
                {
                    throw new RelayConnectException("the relay closed the connection during the handshake");
                }
            }
            finally
            {
                input.AdvanceTo(buffer.Start, buffer.End);
            }
        }
    }

    private async Task ReadLoopAsync(PipeReader input)
    {
        Exception? failure = null;
        bool brokeProtocol = false;
        try
        {
            while (true)
            {
                var result = await input.ReadAsync(_closed.Token).ConfigureAwait(false);
                var buffer = result.Buffer;
                OnRead();
                try
                {
                    while (FrameReader.TryRead(ref buffer, Math.Max(MaxFrame, ProtocolConstants.HandshakeMaxFrame), out var frame))
                    {
                        OnFrame(frame);
                    }
                    if (result.IsCompleted)
                    {
                        failure = new RelayConnectException("the relay closed the connection");
                        return;
                    }
                }
                finally
                {
                    input.AdvanceTo(buffer.Start, buffer.End);
                }
            }
        }
        catch (OperationCanceledException)
        {
            failure = new RelayConnectException("the connection was closed");
        }
        catch (ProtocolException ex)
        {
            // A frame no relay following PROTOCOL.md sends: nothing after it is to be trusted. The
            // event stream ends with this error, after the events received before it.
            failure = new RelayConnectException($"the relay broke the protocol: {ex.Message}; the connection was closed", ex);
            brokeProtocol = true;
        }
        catch (Exception ex)
        {
            failure = ex is RelayConnectException ? ex : new RelayConnectException($"the connection to the relay was lost: {ex.Message}", ex);
        }
        finally
        {
            await input.CompleteAsync().ConfigureAwait(false);
            Fail(failure ?? new RelayConnectException("the connection was closed"), brokeProtocol);
            if (brokeProtocol)
            {
                // Closed at once rather than when the app disposes the connection: the relay sees it gone.
                await CloseTransportAsync().ConfigureAwait(false);
            }
        }
    }

    private void OnFrame(in ReadOnlySequence<byte> frameBytes)
    {
        var rented = ArrayPool<byte>.Shared.Rent((int)frameBytes.Length);
        try
        {
            frameBytes.CopyTo(rented);
            var frame = new FrameView(rented.AsSpan(0, (int)frameBytes.Length));
            uint corr = frame.CorrelationId;
            if (corr == 0)
            {
                OnPush(frame);
                return;
            }
            PendingRequest? pending = null;
            lock (_pendingLock)
            {
                // Not there: the caller's wait was cancelled, the answer is dropped. A SUB's or an
                // ACK's answer still counts for the queue's delivery window, read here in stream order.
                if (_pending.Remove(corr, out var request))
                {
                    pending = request.Caller;
                    if (request.Kind != RequestKind.Other)
                    {
                        AnsweredLocked(request, frame);
                    }
                }
            }
            pending?.SetResult(new Response(frame.Type, frame.Payload.ToArray()));
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(rented);
        }
    }

    private void OnPush(in FrameView frame)
    {
        switch (frame.Type)
        {
            case FrameType.Msg:
                if (TryOpen(frame.Payload, out var delivery, out var queue))
                {
                    _events.Writer.TryWrite(new DeliveryEvent(delivery, queue));
                }
                break;
            case FrameType.End when frame.Payload.Length == ProtocolConstants.IdSize:
                var id = frame.Payload.ToArray();
                DeliveryCipher? ended;
                lock (_pendingLock)
                {
                    // The app stops receiving the queue; its window stays as the last SUB granted it
                    // (RelayConnection.Window.cs). An END read while a SUB of the queue awaits its
                    // answer ends the subscription that SUB replaces (another device took the queue
                    // and this one took it back): the app goes on receiving it.
                    var queueId = Id.From(id);
                    ended = _subscribed.TryGetValue(queueId, out var subscription) && !SubInFlightLocked(queueId)
                        ? subscription.StopReceivingLocked()
                        : null;
                }
                if (ended != null)
                {
                    // (An END for a queue not subscribed here tells the app nothing: dropped.)
                    DisposeCipher(ended);
                    _events.Writer.TryWrite(new SubscriptionEndedEvent(id));
                }
                break;
            case FrameType.Err:
                var code = frame.Payload.Length > 0 ? (ErrorCode)frame.Payload[0] : ErrorCode.Syntax;
                // The relay ends the connection: the read loop stops here (nothing after it is to be
                // trusted) and every request fails as a lost connection (RunAsync retries those),
                // with the relay's reason inside.
                throw new RelayConnectException($"the relay closed the connection: {RelayErrorException.Describe(code)}",
                    new RelayErrorException(code, "the connection"));
        }
    }

    private bool TryOpen(ReadOnlySpan<byte> payload, out Delivery delivery, out RecipientQueue queue)
    {
        delivery = null!;
        queue = null!;
        if (payload.Length < ProtocolConstants.IdSize + 8)
        {
            ProtocolException.Throw(ErrorCode.Syntax, "it sent a delivery too short to name its queue and message");
        }
        var id = Id.From(payload.Slice(0, ProtocolConstants.IdSize));
        ulong pushedId = BinaryPrimitives.ReadUInt64BigEndian(payload.Slice(ProtocolConstants.IdSize));
        DeliveryCipher? cipher;
        RecipientQueue? subscribedQueue;
        lock (_pendingLock)
        {
            var subscription = CountPushLocked(id, pushedId);
            // Not received by the app (any more): a push that crossed an END, a rejected delivery, a
            // SUB whose caller stopped waiting. Counted above all the same.
            cipher = subscription.Cipher;
            subscribedQueue = subscription.Queue;
            if (cipher is null || subscribedQueue is null) return false;
        }
        var body = new byte[Math.Max(0, payload.Length - ProtocolConstants.MsgOverhead)];
        bool opened;
        ulong messageId;
        uint hour;
        byte flags;
        // A refused or cancelled SUB removes and disposes the cipher from another thread: decrypting
        // and disposing take its lock, so a freed native context is never used.
        lock (cipher)
        {
            if (cipher.IsDisposed) return false;
            opened = RelayCrypto.TryOpenDelivery(cipher, payload, body, out messageId, out hour, out flags, out _);
        }
        if (!opened)
        {
            // Not sealed with this queue's delivery key: the app's key for it is wrong, or the relay
            // does not follow the protocol. Retrying cannot help, and skipping the message would
            // leave it holding a place of the window: the queue stops here, the others go on.
            bool stopped;
            lock (_pendingLock)
            {
                stopped = _subscribed.TryGetValue(id, out var subscription) && ReferenceEquals(subscription.Cipher, cipher)
                    && subscription.StopReceivingLocked() != null;
            }
            if (!stopped) return false;
            DisposeCipher(cipher);
            _events.Writer.TryWrite(new DeliveryRejectedEvent(subscribedQueue,
                "a delivery failed its integrity check (wrong delivery key, or a relay that does not follow the protocol); the queue is no longer subscribed and its messages stay on the relay"));
            return false;
        }
        queue = subscribedQueue;
        delivery = new Delivery(queue.RecipientId, messageId, hour, flags, body);
        return true;
    }

    private static void DisposeCipher(DeliveryCipher cipher)
    {
        lock (cipher)
        {
            cipher.Dispose();
        }
    }

    /// <summary>Ends the connection: every request in flight fails with the first failure, and the event stream completes (with that failure when <paramref name="brokeProtocol"/>).</summary>
    private void Fail(Exception failure, bool brokeProtocol = false)
    {
        List<PendingRequest> pending = [];
        lock (_pendingLock)
        {
            // From here on RequestAsync refuses new requests: none can slip in after the copy below.
            brokeProtocol &= _failure is null;
            _failure ??= failure;
            _failing = true;
            foreach (var request in _pending.Values)
            {
                if (request.Caller != null) pending.Add(request.Caller);
            }
            _pending.Clear();
        }
        lock (_writeLock)
        {
            if (!_disposed)
            {
                _disposed = true;
                _output.Writer.Complete();
            }
        }
        // Closed before the failures: a caller that sees one sees the connection closed (RunAsync retries).
        try { _closed.Cancel(); } catch (AggregateException) { /* a caller's callback threw: the connection is closed anyway */ }
        // (A request whose caller's wait was cancelled has no caller in _pending then: it is not among these.)
        foreach (var p in pending)
        {
            p.SetException(_failure);
        }
        _events.Writer.TryComplete(brokeProtocol ? _failure : null);
    }

    private async Task CopyOutputAsync()
    {
        var reader = _output.Reader;
        try
        {
            while (true)
            {
                var result = await reader.ReadAsync().ConfigureAwait(false);
                var buffer = result.Buffer;
                if (buffer.IsSingleSegment)
                {
                    await WriteInPiecesAsync(buffer.First).ConfigureAwait(false);
                }
                else
                {
                    await WriteGatheredAsync(buffer).ConfigureAwait(false);
                }
                if (!buffer.IsEmpty)
                {
                    await _stream.FlushAsync().ConfigureAwait(false);
                }
                reader.AdvanceTo(buffer.End);
                if (result.IsCompleted) break;
            }
        }
        catch (Exception ex)
        {
            Fail(new RelayConnectException($"the connection to the relay was lost: {ex.Message}", ex));
        }
        finally
        {
            await reader.CompleteAsync().ConfigureAwait(false);
        }
    }

    // The largest write to the transport: one TLS record. The keep-alive sees the link move as each
    // write completes (RelayConnection.KeepAlive.cs), so a large frame (a SEND of up to 1 MiB) is not
    // written in one piece either.
    private const int WritePiece = 16 * 1024;

    /// <summary>Writes one segment in writes of up to <see cref="WritePiece"/>.</summary>
    private async ValueTask WriteInPiecesAsync(ReadOnlyMemory<byte> segment)
    {
        while (!segment.IsEmpty)
        {
            var piece = segment.Slice(0, Math.Min(segment.Length, WritePiece));
            await _stream.WriteAsync(piece).ConfigureAwait(false);
            OnWritten(piece.Length);
            segment = segment.Slice(piece.Length);
        }
    }

    /// <summary>
    /// Writes a multi-segment buffer in writes of up to <see cref="WritePiece"/>: one TLS record and
    /// one send each, instead of one per 4 KiB pipe segment.
    /// </summary>
    private async ValueTask WriteGatheredAsync(ReadOnlySequence<byte> buffer)
    {
        var chunk = ArrayPool<byte>.Shared.Rent(WritePiece);
        try
        {
            int filled = 0;
            foreach (var segment in buffer)
            {
                var rest = segment;
                while (!rest.IsEmpty)
                {
                    int n = Math.Min(rest.Length, WritePiece - filled);
                    rest.Span.Slice(0, n).CopyTo(chunk.AsSpan(filled));
                    filled += n;
                    rest = rest.Slice(n);
                    if (filled == WritePiece)
                    {
                        await _stream.WriteAsync(chunk.AsMemory(0, filled)).ConfigureAwait(false);
                        OnWritten(filled);
                        filled = 0;
                    }
                }
            }
            if (filled > 0)
            {
                await _stream.WriteAsync(chunk.AsMemory(0, filled)).ConfigureAwait(false);
                OnWritten(filled);
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(chunk);
        }
    }

    private bool _flushScheduled;
    private readonly FlushWorkItem _flush;

    // Requests written before the scheduled flush runs leave together: one TLS record, one syscall.
    private void ScheduleFlushLocked()
    {
        if (_flushScheduled) return;
        _flushScheduled = true;
        ThreadPool.UnsafeQueueUserWorkItem(_flush, preferLocal: true);
    }

    /// <summary>
    /// The scheduled flush as a thread-pool work item, one per connection: queued as it is, with no
    /// wrapper per flush. Nested, so Execute is not a member of the connection.
    /// </summary>
    private sealed class FlushWorkItem(RelayConnection connection) : IThreadPoolWorkItem
    {
        public void Execute() => connection.FlushScheduled();
    }

    private void FlushScheduled()
    {
        lock (_writeLock)
        {
            _flushScheduled = false;
            if (!_disposed)
            {
                _flushed += _output.Writer.UnflushedBytes;
                _ = _output.Writer.FlushAsync();
            }
        }
    }

    /// <summary>Closes the connection: fails the requests in flight, closes the transport and disposes the queues' keys. Never throws.</summary>
    public async ValueTask DisposeAsync()
    {
        Fail(new RelayConnectException("the connection was closed"));
        await CloseTransportAsync().ConfigureAwait(false);
        try
        {
            await _readLoop.WaitAsync(TimeSpan.FromSeconds(5)).ConfigureAwait(false);
        }
        catch (Exception)
        {
            // Closing anyway.
        }
        lock (_writeLock)
        lock (_pendingLock)
        {
            foreach (var subscription in _subscribed.Values)
            {
                if (subscription.StopReceivingLocked() is { } cipher) DisposeCipher(cipher);
            }
            _subscribed.Clear();
            foreach (var key in _authKeys.Values) key.Dispose();
            _authKeys.Clear();
        }
        // _closed is not disposed: Closed stays readable (and cancelled) after disposal.
    }

    /// <summary>After <see cref="Fail"/>: lets the copy loop finish, then closes the transport. Never throws.</summary>
    private async Task CloseTransportAsync()
    {
        try
        {
            await _copyLoop.WaitAsync(TimeSpan.FromSeconds(5)).ConfigureAwait(false);
        }
        catch (Exception)
        {
            // Closing anyway.
        }
        try
        {
            await _stream.DisposeAsync().ConfigureAwait(false);
        }
        catch (Exception)
        {
            // Closing anyway: a transport that fails to close (a caller's stream that flushes to a
            // peer that is gone) must neither keep the keys from being disposed nor fault a
            // DisposeAsync that nobody awaits (RelayClient closes a lost connection without waiting).
        }
    }

    /// <summary>A 24- or 32-byte value as a dictionary key.</summary>
    private readonly record struct Id(ulong A, ulong B, ulong C, ulong D)
    {
        public static Id From(ReadOnlySpan<byte> s) => new(
            BinaryPrimitives.ReadUInt64LittleEndian(s),
            BinaryPrimitives.ReadUInt64LittleEndian(s.Slice(8)),
            BinaryPrimitives.ReadUInt64LittleEndian(s.Slice(16)),
            s.Length >= 32 ? BinaryPrimitives.ReadUInt64LittleEndian(s.Slice(24)) : 0);
    }
}
