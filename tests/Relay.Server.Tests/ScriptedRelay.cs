using System.Buffers;
using System.Buffers.Binary;
using System.Net;
using System.Net.Sockets;
using System.Security.Cryptography;
using Relay.Client.Transport;
using Relay.Protocol;

namespace Relay.Server.Tests;

/// <summary>
/// A relay that does what its test tells it: on loopback over plain TCP (the SDK connects with
/// <c>Tls = false</c>, as through <c>TamperingProxy</c>), it answers HELLO with a WELCOME and then
/// hands the test each frame the client sends; the test answers, pushes MSG and END frames, or
/// breaks the protocol. For the client-side checks of a relay that does not follow it.
/// </summary>
public sealed class ScriptedRelay : IAsyncDisposable
{
    private readonly TcpListener _listener = new(IPAddress.Loopback, 0);
    private readonly List<Session> _sessions = [];

    private ScriptedRelay() => _listener.Start();

    public static ScriptedRelay Start() => new();

    /// <summary>Any pin: over plain TCP nothing is checked against it.</summary>
    public RelayAddress Address => new(RelayAddress.Base64Url(new byte[32]), ["127.0.0.1"], ((IPEndPoint)_listener.LocalEndpoint).Port);

    public static RelayConnectionOptions ClientOptions => new() { Tls = false, ConnectTimeout = TimeSpan.FromSeconds(10) };

    /// <summary>A queue as its recipient keeps it, with fresh ids and keys (no relay created it).</summary>
    public static RecipientQueue NewQueue() => new(RandomNumberGenerator.GetBytes(ProtocolConstants.IdSize),
        RandomNumberGenerator.GetBytes(ProtocolConstants.IdSize), RandomNumberGenerator.GetBytes(ProtocolConstants.KeySize),
        RandomNumberGenerator.GetBytes(ProtocolConstants.KeySize));

    /// <summary>Connects an SDK client and completes the handshake: the client's connection and the relay's side of it.</summary>
    public async Task<(RelayConnection Client, Session Relay)> ConnectAsync()
    {
        var accepting = AcceptOneAsync();
        var client = await RelayConnection.ConnectAsync(Address, ClientOptions);
        return (client, await accepting);
    }

    /// <summary>The relay's side of the next connection a client makes, once it answered HELLO with WELCOME.</summary>
    public async Task<Session> AcceptOneAsync()
    {
        using var cts = new CancellationTokenSource(RawClient.DefaultTimeout);
        var session = new Session(await _listener.AcceptTcpClientAsync(cts.Token));
        lock (_sessions) _sessions.Add(session);
        var hello = await session.ReadAsync();
        if (hello.Type != FrameType.Hello) throw new InvalidOperationException($"expected HELLO, got {hello}");
        var sessionKey = new byte[ProtocolConstants.KeySize];
        RelayCrypto.GenerateKeyPair(new byte[ProtocolConstants.KeySize], sessionKey);
        await session.SendAsync(w => FrameWriter.WriteWelcome(w, 1, 65_536, 65_000, RandomNumberGenerator.GetBytes(ProtocolConstants.SessionIdSize), sessionKey));
        return session;
    }

    public async ValueTask DisposeAsync()
    {
        _listener.Stop();
        lock (_sessions)
        {
            foreach (var s in _sessions) s.Dispose();
        }
        await Task.CompletedTask;
    }

    /// <summary>The relay's side of one client connection.</summary>
    public sealed class Session : IDisposable
    {
        private readonly TcpClient _tcp;
        private readonly NetworkStream _stream;
        private readonly Dictionary<string, (DeliveryCipher Cipher, NonceSequence Nonces)> _ciphers = [];

        internal Session(TcpClient tcp)
        {
            _tcp = tcp;
            _stream = tcp.GetStream();
        }

        /// <summary>The client's next frame; null when it closed the connection.</summary>
        public async Task<RawFrame?> TryReadAsync(TimeSpan? timeout = null)
        {
            using var cts = new CancellationTokenSource(timeout ?? RawClient.DefaultTimeout);
            var prefix = new byte[4];
            try
            {
                await _stream.ReadExactlyAsync(prefix, cts.Token);
            }
            catch (EndOfStreamException)
            {
                return null;
            }
            catch (IOException)
            {
                return null;
            }
            var frame = new byte[BinaryPrimitives.ReadUInt32BigEndian(prefix)];
            await _stream.ReadExactlyAsync(frame, cts.Token);
            return new RawFrame((FrameType)frame[0], BinaryPrimitives.ReadUInt32BigEndian(frame.AsSpan(1)),
                frame.AsSpan(ProtocolConstants.HeaderSize).ToArray(), [.. prefix, .. frame]);
        }

        public async Task<RawFrame> ReadAsync(TimeSpan? timeout = null) =>
            await TryReadAsync(timeout) ?? throw new InvalidOperationException("the client closed the connection");

        /// <summary>The client's next frame, which must be of <paramref name="type"/>.</summary>
        public async Task<RawFrame> ExpectAsync(FrameType type)
        {
            var frame = await ReadAsync();
            return frame.Type == type ? frame : throw new InvalidOperationException($"expected {type}, got {frame}");
        }

        /// <summary>True when the client closes the connection (sending nothing more) within <paramref name="timeout"/>.</summary>
        public async Task<bool> ClosedByClientAsync(TimeSpan timeout)
        {
            try
            {
                return await TryReadAsync(timeout) is null;
            }
            catch (OperationCanceledException)
            {
                return false;
            }
        }

        /// <summary>Writes frames in one send, so the client reads them together.</summary>
        public async Task SendAsync(params Action<IBufferWriter<byte>>[] frames)
        {
            var buffer = new ArrayBufferWriter<byte>();
            foreach (var frame in frames) frame(buffer);
            await _stream.WriteAsync(buffer.WrittenMemory);
            await _stream.FlushAsync();
        }

        public static Action<IBufferWriter<byte>> Ok(uint corr) => w => FrameWriter.WriteEmpty(w, FrameType.Ok, corr);

        public static Action<IBufferWriter<byte>> Error(uint corr, ErrorCode code) => w => FrameWriter.WriteError(w, corr, code);

        public static Action<IBufferWriter<byte>> End(RecipientQueue queue) => w => FrameWriter.WriteEnd(w, queue.RecipientId);

        /// <summary>A MSG of <paramref name="queue"/> sealed with its delivery key (a push with correlation id 0 unless given).</summary>
        public Action<IBufferWriter<byte>> Msg(RecipientQueue queue, ulong messageId, uint corr = 0)
        {
            var key = Convert.ToHexString(queue.RecipientId);
            if (!_ciphers.TryGetValue(key, out var c))
            {
                _ciphers[key] = c = (new DeliveryCipher(queue.DeliveryKey), new NonceSequence());
            }
            var body = BitConverter.GetBytes(messageId);
            return w => FrameWriter.WriteMsg(w, corr, queue.RecipientId, messageId, 498_866, 0, body, c.Cipher, c.Nonces);
        }

        /// <summary>The message id an ACK names, and whether it is an ACK through.</summary>
        public static (ulong MessageId, bool Through) AckOf(RawFrame ack) =>
            (BinaryPrimitives.ReadUInt64BigEndian(ack.Payload.AsSpan(ProtocolConstants.IdSize)),
             ack.Payload.Length == ProtocolConstants.IdSize + 9 + ProtocolConstants.MacSize && ack.Payload[ProtocolConstants.IdSize + 8] == ProtocolConstants.AckThrough);

        public void Dispose()
        {
            foreach (var (cipher, _) in _ciphers.Values) cipher.Dispose();
            _tcp.Dispose();
        }
    }
}
