using System.Runtime.CompilerServices;
using System.Security.Cryptography;
using Relay.Protocol;
using Relay.Server.Metrics;
using Relay.Storage;

namespace Relay.Server.Connections;

/// <summary>Queue management: NEW, SKEY, OFF, DEL, and the authorization every queue command goes through.</summary>
internal sealed partial class RelaySession
{
    /// <summary>
    /// Verifies the MAC of <paramref name="command"/> under the key the session shares with
    /// <paramref name="clientKey"/>. For a missing queue (null) the same work is done under a decoy
    /// key, so that "no such queue" and "wrong key" cannot be told apart by content or time. A decoy
    /// is cached by the id and the side it was looked up on (<paramref name="senderSide"/>: sender
    /// ids, else recipient ids), so it is found again exactly when a real queue's key would be: a
    /// decoy made for a recipient id cannot speed up a SEND naming the same bytes.
    /// </summary>
    private bool Authorize(in QueueCommand command, byte[]? clientKey, bool senderSide)
    {
        MacKey? key;
        if (clientKey is null)
        {
            var id = new DecoyKey(Id24.From(command.QueueId), senderSide);
            if (!_keys.TryGetDecoy(id, out key))
            {
                var bytes = new byte[ProtocolConstants.KeySize];
                Span<byte> decoy = stackalloc byte[ProtocolConstants.KeySize];
                RandomNumberGenerator.Fill(decoy);
                RelayCrypto.TryDeriveAuthKey(_sessionPrivate, decoy, _sessionId, bytes);
                key = _keys.AddDecoy(id, bytes);
                CountKeyAgreement();
            }
            key.Verify(command.MacInput, command.Mac);
            return false;
        }
        var k = Key32.From(clientKey);
        if (!_keys.TryGetReal(k, out key))
        {
            var bytes = new byte[ProtocolConstants.KeySize];
            bool agreed = RelayCrypto.TryDeriveAuthKey(_sessionPrivate, clientKey, _sessionId, bytes);
            CountKeyAgreement();
            if (!agreed)
            {
                return false;
            }
            key = _keys.AddReal(k, bytes);
        }
        return key.Verify(command.MacInput, command.Mac);
    }

    /// <summary>
    /// Charges a key agreement just made to the source's budget (<see cref="RelayServerOptions.KeyAgreementRate"/>):
    /// beyond it, the read loop waits after this request before it reads the next one. Real and decoy
    /// agreements are charged alike, after the work is done, so the wait tells nothing of a queue.
    /// </summary>
    private void CountKeyAgreement()
    {
        var wait = _context.Sources.KeyAgreement(Source);
        if (wait > _keyAgreementWait)
        {
            _keyAgreementWait = wait;
        }
    }

    /// <summary>Parses a recipient command and authorizes it; answers the error itself and returns null on failure.</summary>
    private QueueHandle? RecipientCommand(in FrameView frame, int argsLength, out QueueCommand command)
        => RecipientCommand(frame, argsLength, argsLength, out command);

    /// <summary>A recipient command with <paramref name="minArgs"/> to <paramref name="maxArgs"/> args bytes: SYNTAX otherwise, then the recipient key's MAC (AUTH).</summary>
    private QueueHandle? RecipientCommand(in FrameView frame, int minArgs, int maxArgs, out QueueCommand command)
    {
        if (!QueueCommand.TryParse(frame, minArgs, maxArgs, out command))
        {
            Fail(frame.Type, frame.CorrelationId, ErrorCode.Syntax);
            return null;
        }
        if (!TryFindQueue(frame.Type, frame.CorrelationId, command.QueueId, senderSide: false, out var queue, out bool deleting))
        {
            return null;
        }
        if (!Authorize(command, queue?.RecipientKey, senderSide: false) || queue is null)
        {
            Fail(frame.Type, frame.CorrelationId, ErrorCode.Auth);
            return null;
        }
        if (deleting)
        {
            FailWhileDeleting(frame.Type, frame.CorrelationId, queue);
            return null;
        }
        return queue;
    }

    /// <summary>
    /// Answers a command on a queue whose deletion is being written (<see cref="StoreStatus.Deleting"/>)
    /// INTERNAL, which the client retries (PROTOCOL.md §6): that write may yet fail and the queue come
    /// back, so AUTH (final for a client) would be wrong until it is durable. An ACK so answered
    /// restarts the connection's subscription as after any ACK answered INTERNAL.
    /// </summary>
    private void FailWhileDeleting(FrameType type, uint corr, QueueHandle queue)
    {
        Fail(type, corr, ErrorCode.Internal);
        if (type == FrameType.Ack)
        {
            RestartAfterFailedAck(queue);
        }
    }

    /// <summary>
    /// Finds the queue of a sender id (<paramref name="senderSide"/>) or recipient id; null when there
    /// is none. <paramref name="deleting"/>: the queue's deletion is being written (the caller checks
    /// the command's authorization, then answers <see cref="FailWhileDeleting"/>). A queue not in
    /// memory is read from the store: false when that read failed, the request answered INTERNAL and
    /// the failure logged. (Thrown on, the failure would end the connection with this request and
    /// every one after it unanswered.)
    /// </summary>
    private bool TryFindQueue(FrameType type, uint corr, ReadOnlySpan<byte> id, bool senderSide, out QueueHandle? queue, out bool deleting)
    {
        try
        {
            deleting = _store.Find(id, senderSide, out queue) == StoreStatus.Deleting;
            return true;
        }
        catch (Exception ex)
        {
            queue = null;
            deleting = false;
            StoreFailed(type, corr, ex);
            return false;
        }
    }

    private void Fail(FrameType type, uint corr, ErrorCode code)
    {
        _context.Metrics.Command(type, CommandResult.From(code));
        WriteError(corr, code);
    }

    private void Succeed(FrameType type, uint corr)
    {
        _context.Metrics.Command(type, CommandResult.Ok);
        WriteEmptyNow(FrameType.Ok, corr);
    }

    private static ErrorCode ErrorFor(StoreStatus status) => status switch
    {
        StoreStatus.NotFound or StoreStatus.Suspended or StoreStatus.Conflict => ErrorCode.Auth,
        StoreStatus.Deleting => ErrorCode.Internal,   // see FailWhileDeleting
        StoreStatus.QuotaExceeded => ErrorCode.Quota,
        StoreStatus.StoreFull => ErrorCode.Full,
        StoreStatus.NotOldest => ErrorCode.NoMsg,
        _ => ErrorCode.Internal,
    };

    // NEW: recipientKey[32] ‖ recipientDhKey[32] ‖ u8 passwordLength ‖ password
    private void HandleNew(in FrameView frame)
    {
        var p = frame.Payload;
        uint corr = frame.CorrelationId;
        const int fixedPart = 2 * ProtocolConstants.KeySize + 1;
        if (p.Length < fixedPart || p.Length != fixedPart + p[fixedPart - 1])
        {
            Fail(FrameType.New, corr, ErrorCode.Syntax);
            return;
        }
        if (!_options.AllowNewQueues)
        {
            Fail(FrameType.New, corr, ErrorCode.Disabled);
            return;
        }
        var password = p.Slice(fixedPart);
        if (!_context.CheckCreatePassword(password))
        {
            Fail(FrameType.New, corr, ErrorCode.Auth);
            return;
        }
        if (!_context.AllowQueueCreation(this))
        {
            Fail(FrameType.New, corr, ErrorCode.Limit);
            return;
        }
        var recipientKey = p.Slice(0, ProtocolConstants.KeySize).ToArray();
        var recipientDhKey = p.Slice(ProtocolConstants.KeySize, ProtocolConstants.KeySize);

        var recipientId = RandomNumberGenerator.GetBytes(ProtocolConstants.IdSize);
        var senderId = RandomNumberGenerator.GetBytes(ProtocolConstants.IdSize);
        Span<byte> serverDhPrivate = stackalloc byte[ProtocolConstants.KeySize];
        var serverDhPublic = new byte[ProtocolConstants.KeySize];
        RelayCrypto.GenerateKeyPair(serverDhPrivate, serverDhPublic);
        var deliveryKey = new byte[ProtocolConstants.KeySize];
        bool ok = RelayCrypto.TryDeriveDeliveryKey(serverDhPrivate, recipientDhKey, recipientId, deliveryKey);
        CryptographicOperations.ZeroMemory(serverDhPrivate);
        Span<byte> probe = stackalloc byte[ProtocolConstants.KeySize];
        if (!ok || !RelayCrypto.TryAgree(_sessionPrivate, recipientKey, probe))
        {
            // A small-order key would make every later MAC or delivery key predictable.
            Fail(FrameType.New, corr, ErrorCode.Syntax);
            return;
        }
        BeginInFlight();
        _ = CreateQueueAsync(corr, recipientId, senderId, recipientKey, deliveryKey, serverDhPublic);
    }

    private async Task CreateQueueAsync(uint corr, byte[] recipientId, byte[] senderId, byte[] recipientKey, byte[] deliveryKey, byte[] serverDhPublic)
    {
        try
        {
            var (status, _) = await _store.CreateQueueAsync(recipientId, senderId, recipientKey, deliveryKey);
            if (status == StoreStatus.Ok)
            {
                _context.Metrics.Command(FrameType.New, CommandResult.Ok);
                lock (_writeLock)
                {
                    if (_outputClosed) return;
                    FrameWriter.WriteIds(_pending, corr, recipientId, senderId, serverDhPublic);
                    FlushLocked();
                }
            }
            else
            {
                Fail(FrameType.New, corr, status == StoreStatus.Conflict ? ErrorCode.Internal : ErrorFor(status));
            }
        }
        catch (Exception ex)
        {
            StoreFailed(FrameType.New, corr, ex);
        }
        finally
        {
            EndInFlight();
        }
    }

    // SKEY: senderId[24] ‖ senderKey[32] ‖ mac (made with senderKey itself)
    private void HandleSecure(in FrameView frame)
    {
        uint corr = frame.CorrelationId;
        if (!QueueCommand.TryParse(frame, ProtocolConstants.KeySize, ProtocolConstants.KeySize, out var command))
        {
            Fail(FrameType.SKey, corr, ErrorCode.Syntax);
            return;
        }
        if (!TryFindQueue(FrameType.SKey, corr, command.QueueId, senderSide: true, out var queue, out bool deleting))
        {
            return;
        }
        var senderKey = command.Args.ToArray();
        // The MAC key comes from the key in the request, whether the queue exists or not: the same
        // derivation, cached under the same key, in both cases (a decoy here would be told apart by
        // a client that sent the same key for a queue of its own first).
        if (!Authorize(command, senderKey, senderSide: true) || queue is null)
        {
            Fail(FrameType.SKey, corr, ErrorCode.Auth);
            return;
        }
        if (deleting)
        {
            FailWhileDeleting(FrameType.SKey, corr, queue);
            return;
        }
        ValueTask<StoreStatus> secure;
        try
        {
            secure = _store.SecureAsync(queue, senderKey);
        }
        catch (Exception ex)
        {
            StoreFailed(FrameType.SKey, corr, ex);
            return;
        }
        BeginInFlight();
        _ = CompleteAsync(FrameType.SKey, corr, secure);
    }

    private void HandleSuspend(in FrameView frame)
    {
        var queue = RecipientCommand(frame, 0, out _);
        if (queue is null) return;
        ValueTask<StoreStatus> suspend;
        try
        {
            suspend = _store.SuspendAsync(queue);
        }
        catch (Exception ex)
        {
            StoreFailed(FrameType.Off, frame.CorrelationId, ex);
            return;
        }
        BeginInFlight();
        _ = CompleteAsync(FrameType.Off, frame.CorrelationId, suspend);
    }

    private void HandleDelete(in FrameView frame)
    {
        var queue = RecipientCommand(frame, 0, out _);
        if (queue is null) return;
        BeginInFlight();
        _ = DeleteAsync(frame.CorrelationId, queue);
    }

    private async Task DeleteAsync(uint corr, QueueHandle queue)
    {
        try
        {
            var status = await _store.DeleteQueueAsync(queue);
            if (status != StoreStatus.Ok)
            {
                Fail(FrameType.Del, corr, ErrorFor(status));
                return;
            }
            Subscription? ended = null;
            lock (queue.Sync)
            {
                if (queue.Tag is Subscription s)
                {
                    queue.Tag = null;
                    _store.KeepTail(queue, false);
                    s.Ended = true;
                    ended = s;
                }
            }
            Succeed(FrameType.Del, corr);
            if (ended != null)
            {
                ended.Session.OnSubscriptionEnded(ended, notify: !ReferenceEquals(ended.Session, this));
            }
        }
        catch (Exception ex)
        {
            StoreFailed(FrameType.Del, corr, ex);
        }
        finally
        {
            EndInFlight();
        }
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask CompleteAsync(FrameType type, uint corr, ValueTask<StoreStatus> operation)
    {
        try
        {
            var status = await operation;
            if (status == StoreStatus.Ok)
            {
                Succeed(type, corr);
            }
            else
            {
                Fail(type, corr, ErrorFor(status));
            }
        }
        catch (Exception ex)
        {
            StoreFailed(type, corr, ex);
        }
        finally
        {
            EndInFlight();
        }
    }

    /// <summary>Called (without locks held) when another connection took or deleted a subscription of this one.</summary>
    internal void OnSubscriptionEnded(Subscription subscription, bool notify)
    {
        bool removed = false;
        lock (_subLock)
        {
            if (_subscriptions.TryGetValue(subscription.Queue, out var current) && ReferenceEquals(current, subscription))
            {
                _subscriptions.Remove(subscription.Queue);
                removed = true;
                // Not when this connection subscribed the queue again meanwhile: its newer subscription
                // goes on. Written under the lock: a SUB of the queue on this connection adds its entry
                // under it before it writes its OK, so this END goes out before that OK, where the
                // client takes it for the end of the subscription that SUB replaces. Written after the
                // OK, it would end the newer subscription in the client's eyes while the relay pushes on.
                if (notify)
                {
                    WriteEnd(subscription.Queue.RecipientId);
                }
            }
        }
        if (removed)
        {
            _context.Metrics.SubscriptionsChanged(-1);
        }
        subscription.Dispose();
    }
}
