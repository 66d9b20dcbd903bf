using System.Buffers;
using System.Buffers.Binary;
using System.Runtime.InteropServices;
using System.Security.Cryptography;
using System.Text;
using Relay.Protocol;

namespace Relay.Client.Transport;

public sealed partial class RelayConnection
{
    /// <summary>The auth key this session shares with the relay for a client private key (docs/PROTOCOL.md §5).</summary>
    private MacKey AuthKeyFor(byte[] privateKey)
    {
        var id = Id.From(privateKey);
        lock (_pendingLock)
        {
            if (_authKeys.TryGetValue(id, out var cached)) return cached;
        }
        var key = new byte[ProtocolConstants.KeySize];
        if (!RelayCrypto.TryDeriveAuthKey(privateKey, _sessionKey, SessionId, key))
        {
            throw new RelayConnectException("the relay sent an invalid session key");
        }
        lock (_pendingLock)
        {
            // Written only under the write lock (MacKey is used by one writer at a time).
            if (_authKeys.TryGetValue(id, out var raced)) return raced;
            var macKey = new MacKey(key);
            _authKeys[id] = macKey;
            return macKey;
        }
    }

    private static void Expect(Response response, FrameType expected, string command)
    {
        if (response.Type == FrameType.Err)
        {
            throw new RelayErrorException(response.Payload.Length > 0 ? (ErrorCode)response.Payload[0] : ErrorCode.Syntax, command);
        }
        if (response.Type != expected)
        {
            throw new RelayConnectException($"the relay answered {command} with an unexpected frame 0x{(byte)response.Type:x2}");
        }
    }

    public async Task<TimeSpan> PingAsync(CancellationToken cancellationToken = default)
    {
        long start = System.Diagnostics.Stopwatch.GetTimestamp();
        var response = await RequestAsync(0, static (w, corr, _) => FrameWriter.WriteEmpty(w, FrameType.Ping, corr), cancellationToken).ConfigureAwait(false);
        Expect(response, FrameType.Pong, "PING");
        return System.Diagnostics.Stopwatch.GetElapsedTime(start);
    }

    /// <summary>NEW: creates a queue with fresh keys. The result holds everything its recipient needs.</summary>
    public async Task<RecipientQueue> CreateQueueAsync(string? password = null, CancellationToken cancellationToken = default)
    {
        var recipientPrivate = new byte[ProtocolConstants.KeySize];
        var recipientPublic = new byte[ProtocolConstants.KeySize];
        RelayCrypto.GenerateKeyPair(recipientPrivate, recipientPublic);
        var dhPrivate = new byte[ProtocolConstants.KeySize];
        var dhPublic = new byte[ProtocolConstants.KeySize];
        RelayCrypto.GenerateKeyPair(dhPrivate, dhPublic);
        var pw = Encoding.UTF8.GetBytes(password ?? "");
        var response = await RequestAsync((recipientPublic, dhPublic, pw),
            static (w, corr, s) => FrameWriter.WriteNew(w, corr, s.recipientPublic, s.dhPublic, s.pw), cancellationToken).ConfigureAwait(false);
        Expect(response, FrameType.Ids, "NEW");
        var p = response.Payload;
        if (p.Length != 2 * ProtocolConstants.IdSize + ProtocolConstants.KeySize)
        {
            throw new RelayConnectException("the relay sent a malformed IDS answer");
        }
        var recipientId = p.AsSpan(0, ProtocolConstants.IdSize).ToArray();
        var senderId = p.AsSpan(ProtocolConstants.IdSize, ProtocolConstants.IdSize).ToArray();
        var serverDh = p.AsSpan(2 * ProtocolConstants.IdSize, ProtocolConstants.KeySize);
        var deliveryKey = new byte[ProtocolConstants.KeySize];
        if (!RelayCrypto.TryDeriveDeliveryKey(dhPrivate, serverDh, recipientId, deliveryKey))
        {
            throw new RelayConnectException("the relay sent an invalid queue key");
        }
        CryptographicOperations.ZeroMemory(dhPrivate);
        return new RecipientQueue(recipientId, senderId, recipientPrivate, deliveryKey);
    }

    private ValueTask<Response> QueueCommandAsync(FrameType type, byte[] queueId, byte[]? privateKey, ReadOnlyMemory<byte> args1,
        ReadOnlyMemory<byte> args2, CancellationToken cancellationToken, in WindowEffect window = default)
    {
        var authKey = privateKey is null ? null : AuthKeyFor(privateKey);
        return RequestAsync((type, queueId, authKey, args1, args2), static (w, corr, s) =>
            FrameWriter.WriteQueueCommand(w, s.type, corr, s.queueId, s.args1.Span, s.args2.Span, s.authKey), window, cancellationToken);
    }

    // SEND and ACK, once per message: their few bytes of args travel in the state and are laid out
    // on the stack as the frame is written.

    /// <summary>SEND: <c>senderId ‖ u8 flags ‖ body ‖ mac</c>.</summary>
    private ValueTask<Response> SendCommandAsync(SenderQueue queue, byte flags, ReadOnlyMemory<byte> body, CancellationToken cancellationToken)
    {
        var authKey = queue.SenderPrivateKey is null ? null : AuthKeyFor(queue.SenderPrivateKey);
        return RequestAsync((queue.SenderId, authKey, flags, body), static (w, corr, s) =>
        {
            Span<byte> flags = stackalloc byte[1];
            flags[0] = s.flags;
            FrameWriter.WriteQueueCommand(w, FrameType.Send, corr, s.SenderId, flags, s.body.Span, s.authKey);
        }, cancellationToken);
    }

    /// <summary>ACK: <c>recipientId ‖ u64 messageId ‖ mac</c>, or <c>… ‖ u64 messageId ‖ u8 AckThrough ‖ mac</c>.</summary>
    private ValueTask<Response> AckCommandAsync(RecipientQueue queue, ulong messageId, bool through, CancellationToken cancellationToken)
    {
        var authKey = AuthKeyFor(queue.RecipientPrivateKey);
        return RequestAsync((queue.RecipientId, authKey, messageId, through), static (w, corr, s) =>
        {
            Span<byte> args = stackalloc byte[9];
            BinaryPrimitives.WriteUInt64BigEndian(args, s.messageId);
            args[8] = ProtocolConstants.AckThrough;
            FrameWriter.WriteQueueCommand(w, FrameType.Ack, corr, s.RecipientId, args.Slice(0, s.through ? 9 : 8), default, s.authKey);
        }, WindowEffect.Ack(Id.From(queue.RecipientId), messageId), cancellationToken);
    }

    /// <summary>SKEY: secures the queue with the sender's key; from now on every SEND must carry its MAC.</summary>
    public async Task SecureAsync(byte[] senderId, byte[] senderPrivateKey, CancellationToken cancellationToken = default)
    {
        var senderPublic = RelayCrypto.PublicKeyOf(senderPrivateKey);
        var response = await QueueCommandAsync(FrameType.SKey, senderId, senderPrivateKey, senderPublic, default, cancellationToken).ConfigureAwait(false);
        Expect(response, FrameType.Ok, "SKEY");
    }

    /// <summary>SEND: completes when the relay has the message on disk.</summary>
    public async Task SendAsync(SenderQueue queue, ReadOnlyMemory<byte> body, byte flags = 0, CancellationToken cancellationToken = default)
    {
        if (body.Length > MaxMessage)
        {
            // The relay's answer, given here: a frame over its limit would close the connection for
            // every request on it.
            throw new RelayErrorException(ErrorCode.TooLarge, "SEND");
        }
        var response = await SendCommandAsync(queue, flags, body, cancellationToken).ConfigureAwait(false);
        Expect(response, FrameType.Ok, "SEND");
    }

    /// <summary>True once SUB was sent for this queue on this connection (and no END, refusal, rejected delivery or <see cref="RelayClient.Unsubscribe"/> since).</summary>
    public bool IsSubscribed(RecipientQueue queue) => IsSubscribed(queue.RecipientId);

    /// <summary>Whether the queue with this recipient id is subscribed on this connection.</summary>
    public bool IsSubscribed(ReadOnlySpan<byte> recipientId)
    {
        lock (_pendingLock)
        {
            return _subscribed.TryGetValue(Id.From(recipientId), out var subscription) && subscription.Cipher != null;
        }
    }

    /// <summary>
    /// SUB: deliveries of this queue arrive on <see cref="Events"/>, one at a time (each after the ACK
    /// of the one before). The relay pushing a second before that ACK breaks the protocol (see <see cref="Events"/>).
    /// </summary>
    public Task SubscribeAsync(RecipientQueue queue, CancellationToken cancellationToken = default) =>
        SubscribeAsync(queue, 1, cancellationToken);

    /// <summary>
    /// SUB with a delivery window: up to <paramref name="window"/> messages of this queue arrive on
    /// <see cref="Events"/> before the first is ACKed (the relay grants at most
    /// <see cref="ProtocolConstants.MaxDeliveryWindow"/>). ACKs must follow delivery order. A window
    /// above 1 saves a round trip per message on a slow link (Tor) and when draining a backlog.
    /// The connection holds the relay to the window it grants: the queue's deliveries waiting on
    /// <see cref="Events"/> and not acknowledged are at most that many, and one more breaks the
    /// protocol (see <see cref="Events"/>). A SUB repeated on this connection replaces the window.
    /// </summary>
    public async Task SubscribeAsync(RecipientQueue queue, int window, CancellationToken cancellationToken = default)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(window, 1);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(window, ushort.MaxValue);
        // Registered before the SUB: its deliveries may follow the OK in the same read.
        var id = Id.From(queue.RecipientId);
        bool added;
        lock (_pendingLock)
        {
            added = (CollectionsMarshal.GetValueRefOrAddDefault(_subscribed, id, out _) ??= new Subscription()).StartReceivingLocked(queue);
        }
        // A window of 1 sends no args: the SUB of a relay/1 client without windows.
        byte[]? args = null;
        if (window > 1)
        {
            args = new byte[2];
            BinaryPrimitives.WriteUInt16BigEndian(args, (ushort)window);
        }
        Response response;
        try
        {
            response = await QueueCommandAsync(FrameType.Sub, queue.RecipientId, queue.RecipientPrivateKey, args, default, cancellationToken,
                WindowEffect.Sub(id, DeliveryWindow.Grant(window))).ConfigureAwait(false);
        }
        catch when (added)
        {
            Unsubscribed(id);
            throw;
        }
        if (response.Type != FrameType.Ok && added)
        {
            // Refused: the queue is not subscribed here (IsSubscribed says so).
            Unsubscribed(id);
        }
        Expect(response, FrameType.Ok, "SUB");
    }

    /// <summary>
    /// The app no longer receives the queue (<see cref="RelayClient.Unsubscribe"/>): its deliveries are
    /// dropped until a SUB of it, which the relay answers by delivering again from the oldest message.
    /// The relay's subscription stays, with the window it granted.
    /// </summary>
    internal void StopReceiving(ReadOnlySpan<byte> recipientId) => Unsubscribed(Id.From(recipientId));

    /// <summary>The app no longer receives the queue (its SUB was refused, or the caller stopped waiting); its window stays as the relay granted it.</summary>
    private void Unsubscribed(Id id)
    {
        DeliveryCipher? cipher;
        lock (_pendingLock)
        {
            if (!_subscribed.TryGetValue(id, out var subscription)) return;
            cipher = subscription.StopReceivingLocked();
            if (subscription.Window.Granted == 0)
            {
                _subscribed.Remove(id);
            }
        }
        if (cipher != null) DisposeCipher(cipher);
    }

    /// <summary>
    /// ACK: deletes <paramref name="messageId"/>, which must be the queue's oldest message. Frees the
    /// places of the queue's delivery window up to it as it is sent, whatever the answer.
    /// </summary>
    public async Task AckAsync(RecipientQueue queue, ulong messageId, CancellationToken cancellationToken = default)
    {
        var response = await AckCommandAsync(queue, messageId, through: false, cancellationToken).ConfigureAwait(false);
        Expect(response, FrameType.Ok, "ACK");
    }

    /// <summary>
    /// ACK through: deletes every message this connection's subscription to <paramref name="queue"/>
    /// has delivered and not yet acknowledged, up to and including <paramref name="messageId"/>, in
    /// one command (PROTOCOL.md §6 ACK). With a delivery window this costs one ACK per batch of
    /// deliveries instead of one per message.
    /// </summary>
    public async Task AckThroughAsync(RecipientQueue queue, ulong messageId, CancellationToken cancellationToken = default)
    {
        var response = await AckCommandAsync(queue, messageId, through: true, cancellationToken).ConfigureAwait(false);
        Expect(response, FrameType.Ok, "ACK");
    }

    /// <summary>GET: the oldest message, or null when the queue is empty. It stays until ACKed.</summary>
    public async Task<Delivery?> GetAsync(RecipientQueue queue, CancellationToken cancellationToken = default)
    {
        var response = await QueueCommandAsync(FrameType.Get, queue.RecipientId, queue.RecipientPrivateKey, default, default, cancellationToken).ConfigureAwait(false);
        if (response.Type == FrameType.Empty) return null;
        Expect(response, FrameType.Msg, "GET");
        using var cipher = new DeliveryCipher(queue.DeliveryKey);
        var body = new byte[Math.Max(0, response.Payload.Length - ProtocolConstants.MsgOverhead)];
        if (!RelayCrypto.TryOpenDelivery(cipher, response.Payload, body, out var messageId, out var hour, out var flags, out _))
        {
            throw new RelayConnectException("a delivery failed authentication with the queue's delivery key");
        }
        return new Delivery(queue.RecipientId, messageId, hour, flags, body);
    }

    public async Task SuspendAsync(RecipientQueue queue, CancellationToken cancellationToken = default)
    {
        var response = await QueueCommandAsync(FrameType.Off, queue.RecipientId, queue.RecipientPrivateKey, default, default, cancellationToken).ConfigureAwait(false);
        Expect(response, FrameType.Ok, "OFF");
    }

    public async Task DeleteAsync(RecipientQueue queue, CancellationToken cancellationToken = default)
    {
        var response = await QueueCommandAsync(FrameType.Del, queue.RecipientId, queue.RecipientPrivateKey, default, default, cancellationToken).ConfigureAwait(false);
        Expect(response, FrameType.Ok, "DEL");
    }
}
