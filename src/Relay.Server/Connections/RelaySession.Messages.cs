using System.Runtime.InteropServices;
using System.Buffers.Binary;
using System.Runtime.CompilerServices;
using System.Security.Cryptography;
using Relay.Protocol;
using Relay.Server.Metrics;
using Relay.Storage;

namespace Relay.Server.Connections;

/// <summary>Message flow: SEND, SUB, ACK, GET and the delivery of the next message to a subscriber.</summary>
internal sealed partial class RelaySession
{
    // SEND: senderId[24] ‖ u8 flags ‖ body ‖ mac
    private void HandleSend(in FrameView frame)
    {
        long arrived = System.Diagnostics.Stopwatch.GetTimestamp();   // metrics: send-to-delivery latency
        uint corr = frame.CorrelationId;
        if (!QueueCommand.TryParse(frame, 1, int.MaxValue, out var command))
        {
            Fail(FrameType.Send, corr, ErrorCode.Syntax);
            return;
        }
        if (command.Args.Length - 1 > _options.MaxMessage)
        {
            Fail(FrameType.Send, corr, ErrorCode.TooLarge);
            return;
        }
        if (!TryFindQueue(FrameType.Send, corr, command.QueueId, senderSide: true, out var queue, out bool deleting))
        {
            return;
        }
        if (queue is null)
        {
            Authorize(command, null, senderSide: true);
            Fail(FrameType.Send, corr, ErrorCode.Auth);
            return;
        }
        var senderKey = queue.SenderKey;
        // An unsecured queue takes its first messages without a MAC: they carry the sender's key.
        if ((senderKey != null && !Authorize(command, senderKey, senderSide: true)) || queue.Suspended)
        {
            Fail(FrameType.Send, corr, ErrorCode.Auth);
            return;
        }
        if (deleting)
        {
            FailWhileDeleting(FrameType.Send, corr, queue);
            return;
        }
        ValueTask<AppendResult> append;
        try
        {
            append = _store.AppendAsync(queue, command.Args[0], command.Args.Slice(1), quickContinuation: true);
        }
        catch (Exception ex)
        {
            StoreFailed(FrameType.Send, corr, ex);
            return;
        }
        int length = command.Args.Length - 1;
        BeginInFlight(length);
        StoreCompletion.AfterSend(this, corr, queue, append, length, arrived);
    }

    /// <summary>
    /// A SEND's write is durable or failed: answers it, then pushes the message to a subscriber
    /// waiting for it. Called by <see cref="StoreCompletion"/>: on the thread that completed the
    /// commit, or on the read loop when the store answered at once.
    /// </summary>
    private void CompleteSend(uint corr, QueueHandle queue, ValueTask<AppendResult> append, int length, long arrived)
    {
        try
        {
            AppendResult result;
            try
            {
                result = append.GetAwaiter().GetResult();
            }
            catch (Exception ex)
            {
                StoreFailed(FrameType.Send, corr, ex);
                return;
            }
            if (result.Status != StoreStatus.Ok)
            {
                Fail(FrameType.Send, corr, ErrorFor(result.Status));
                return;
            }
            // The one answer; what follows is the subscriber's delivery, whose failures are its own.
            _context.Metrics.MessageStored(length);
            Succeed(FrameType.Send, corr);
            if (queue.Tag is Subscription)
            {
                lock (queue.Sync)
                {
                    if (queue.Tag is Subscription s)
                    {
                        // Pushes the messages from NextFrom on. The message went to a waiting subscriber
                        // if it is behind NextFrom now: pushed by this call, or by a SUB or an ACK of the
                        // queue that ran between its commit and this completion.
                        s.Session.DeliverNextLocked(s);
                        if (result.MessageId < s.NextFrom)
                        {
                            _context.Metrics.DeliveredAfter(arrived);
                        }
                    }
                }
            }
        }
        finally
        {
            EndInFlight(length);
        }
    }

    /// <summary>
    /// Pushes the next stored messages to <paramref name="s"/> while its window has room: the oldest
    /// first, then each the one after the message delivered last. The caller holds <c>s.Queue.Sync</c>.
    /// Never throws for the store: it is called after a request was answered (SEND, ACK, SUB) or from
    /// the send loop, where an exception would answer a request twice, end the read loop or be lost.
    /// </summary>
    internal void DeliverNextLocked(Subscription s)
    {
        while (s.HasRoom && !s.Ended && !s.Queue.Deleted && ReferenceEquals(s.Queue.Tag, s))
        {
            // A subscriber that does not read its socket gets no more than the output limit: the
            // messages stay in the store and go out as the send loop drains (ResumeDeferred).
            if (OutputAbove(1) && DeferDelivery(s))
            {
                return;
            }
            StoredMessage message;
            try
            {
                // On the store's writer thread (answering a small batch, BatchedSends) a message that is
                // not in memory is not read there: the read would hold up every connection's next commit.
                if (!_store.TryPeek(s.Queue, s.NextFrom, memoryOnly: BatchedSends.Active, out message, out bool needsRead))
                {
                    if (needsRead)
                    {
                        ThreadPool.UnsafeQueueUserWorkItem(static s =>
                        {
                            lock (s.Queue.Sync)
                            {
                                s.Session.DeliverNextLocked(s);
                            }
                        }, s, preferLocal: false);
                    }
                    return;
                }
            }
            catch (Exception ex)
            {
                // The store failed to read the next message (a disk error, or closing). Nothing
                // changed: the message stays stored and the subscription where it was, so its
                // deliveries go on with the queue's next ACK or message (or a new SUB).
                Log.StoreFailed(_context, "SUB", ex);
                return;
            }
            try
            {
                s.Delivered(message.Id);
                WriteMessage(0, s.Queue, message, s.Cipher, s.Nonces);
                _context.Metrics.Delivered();
            }
            finally
            {
                message.Return();
            }
        }
    }

    private void HandleSubscribe(in FrameView frame)
    {
        // Args: none (a window of 1) or u16 window (PROTOCOL.md §6 SUB).
        uint corr = frame.CorrelationId;
        int argsLength = frame.Payload.Length - ProtocolConstants.IdSize - ProtocolConstants.MacSize;
        if (argsLength is not (0 or 2))
        {
            Fail(FrameType.Sub, corr, ErrorCode.Syntax);
            return;
        }
        var queue = RecipientCommand(frame, argsLength, out var command);
        if (queue is null) return;
        int window = command.Args.Length == 2
            ? Math.Clamp((int)BinaryPrimitives.ReadUInt16BigEndian(command.Args), 1, ProtocolConstants.MaxDeliveryWindow)
            : 1;

        Subscription? replaced = null;
        bool added;
        lock (_subLock)
        {
            if (!_subscriptions.ContainsKey(queue) && _subscriptions.Count >= _options.MaxSubscriptionsPerConnection)
            {
                Fail(FrameType.Sub, corr, ErrorCode.Limit);
                return;
            }
        }
        var subscription = new Subscription(this, queue, window);
        lock (queue.Sync)
        {
            QueueDeletion deletion = queue.Deletion;
            if (deletion != QueueDeletion.None)
            {
                // A DEL on another connection, or the idle-queue sweep, came between the lookup and
                // here: once durable it ends the queue's subscriptions (a DEL's did already), and this
                // one would never get its END. While that deletion is being written it may yet fail,
                // and the client is told to try again (FailWhileDeleting).
                Fail(FrameType.Sub, corr, deletion == QueueDeletion.Pending ? ErrorCode.Internal : ErrorCode.Auth);
                return;
            }
            if (queue.Tag is Subscription old)
            {
                old.Ended = true;
                replaced = old;
            }
            queue.Tag = subscription;
            _store.KeepTail(queue, true);   // live deliveries straight from memory (DESIGN.md, performance rules)
            lock (_subLock)
            {
                // The gauge counts entries of the connections' tables: this one may still hold a
                // subscription another connection took, whose end has not reached it yet.
                ref Subscription? entry = ref CollectionsMarshal.GetValueRefOrAddDefault(_subscriptions, queue, out bool existed);
                entry = subscription;
                added = !existed;
            }
            // OK first, then the first waiting message, both in order on this connection.
            _context.Metrics.Command(FrameType.Sub, CommandResult.Ok);
            WriteEmptyNow(FrameType.Ok, corr);
            DeliverNextLocked(subscription);
        }
        // A subscribed queue is in use even when nobody sends to it (idle-queue expiry, OPERATIONS.md).
        _store.MarkActive(queue);
        if (added)
        {
            _context.Metrics.SubscriptionsChanged(1);
        }
        if (replaced != null)
        {
            if (ReferenceEquals(replaced.Session, this))
            {
                // Re-subscribing on the same connection restarts delivery from the oldest message.
                replaced.Dispose();
            }
            else
            {
                replaced.Session.OnSubscriptionEnded(replaced, notify: true);
            }
        }
    }

    // ACK: recipientId[24] ‖ u64 msgId ‖ [u8 flags] ‖ mac
    private void HandleAck(in FrameView frame)
    {
        uint corr = frame.CorrelationId;
        var queue = RecipientCommand(frame, 8, 9, out var command);
        if (queue is null) return;
        ulong id = BinaryPrimitives.ReadUInt64BigEndian(command.Args);
        int count = 1;
        if (command.Args.Length == 9)
        {
            byte flags = command.Args[8];
            if ((flags & ~ProtocolConstants.AckThrough) != 0)
            {
                Fail(FrameType.Ack, corr, ErrorCode.Syntax);
                return;
            }
            if ((flags & ProtocolConstants.AckThrough) != 0)
            {
                // Every message this connection's subscription has outstanding, up to and including id.
                lock (queue.Sync)
                {
                    if (queue.Tag is Subscription s && ReferenceEquals(s.Session, this))
                    {
                        count = s.CountThrough(id);
                    }
                }
                if (count == 0)
                {
                    Fail(FrameType.Ack, corr, ErrorCode.NoMsg);
                    return;
                }
            }
        }
        ValueTask<StoreStatus> ack;
        try
        {
            // count is an upper bound: an outstanding message may have expired meanwhile.
            ack = _store.AckAsync(queue, id, count, out count, quickContinuation: true);
        }
        catch (Exception ex)
        {
            // Refused before it was staged (closing, or undoing another write that failed): nothing
            // was deleted, and INTERNAL restarts the subscription as for a failed write. Without the
            // restart the messages it covers would stay outstanding for good: the client does not
            // ACK them again, and a full window pushes nothing more. The restart waits for the undo:
            // an earlier ACK of this queue may not be taken back yet, and restarting before it would
            // push from the middle of the queue.
            StoreFailed(FrameType.Ack, corr, ex);
            RestartAfterFailedAck(queue);
            return;
        }
        if (!ack.IsCompleted)
        {
            // The store accepted the ACK and moved past the messages in memory; the deletes are on
            // their way to disk. Release the next messages now rather than after that fsync: if the
            // relay crashed before the deletes are durable, the acknowledged messages would be
            // delivered again, which at-least-once delivery allows and clients absorb.
            ReleaseThrough(queue, id);
        }
        BeginInFlight();
        StoreCompletion.AfterAck(this, corr, queue, id, count, ack);
    }

    /// <summary>
    /// This connection's ACK through <paramref name="id"/> was accepted (or found the messages gone):
    /// frees the places of this connection's subscription, if it has one, and pushes the next
    /// messages. Another connection's ACK deletes the messages it covers but frees no place of a
    /// subscription elsewhere: a subscriber's window counts what it was pushed and has not
    /// acknowledged itself (its own ACK of a message deleted meanwhile answers NO_MSG and frees the
    /// place), so that a client can hold the relay to it.
    /// </summary>
    private void ReleaseThrough(QueueHandle queue, ulong id)
    {
        lock (queue.Sync)
        {
            if (queue.Tag is Subscription s && ReferenceEquals(s.Session, this) && s.TryReleaseThrough(id))
            {
                DeliverNextLocked(s);
            }
        }
    }

    /// <summary>An ACK's deletes are durable or failed: answers it and releases the next messages.</summary>
    private void CompleteAck(uint corr, QueueHandle queue, ulong id, int count, ValueTask<StoreStatus> ack)
    {
        try
        {
            StoreStatus status;
            try
            {
                status = ack.GetAwaiter().GetResult();
            }
            catch (Exception ex)
            {
                // The write failed and was undone: the messages are stored again, oldest first, but
                // the subscription moved past them when the ACK was accepted.
                StoreFailed(FrameType.Ack, corr, ex);
                RestartAfterFailedAck(queue);
                return;
            }
            if (status == StoreStatus.Deleting)
            {
                FailWhileDeleting(FrameType.Ack, corr, queue);
                return;
            }
            if (status != StoreStatus.Ok)
            {
                bool older = false;
                if (status == StoreStatus.NotOldest)
                {
                    if (_store.IsGone(queue, id))
                    {
                        // Outstanding messages that expired (or another connection's ACK deleted)
                        // before their ACK: nothing to delete, but their places in the window are
                        // free, so the next messages can go out.
                        ReleaseThrough(queue, id);
                    }
                    else
                    {
                        older = true;
                    }
                }
                Fail(FrameType.Ack, corr, status == StoreStatus.NotFound && !queue.Deleted ? ErrorCode.NoMsg : ErrorFor(status));
                if (older)
                {
                    StartAgainIfPutBack(queue, id);
                }
                return;
            }
            _context.Metrics.MessagesAcked(count);
            // Released before the answer (as HandleAck does for an ACK still being written): a client
            // that hears OK finds its window free, and a SEND it makes then goes straight out.
            ReleaseThrough(queue, id);
            Succeed(FrameType.Ack, corr);
        }
        finally
        {
            EndInFlight();
        }
    }

    /// <summary>
    /// After an ACK answered INTERNAL (the answer just written): restarts this connection's
    /// subscription of the queue once the store writes again, from the oldest stored message with its
    /// window empty (PROTOCOL.md §6 ACK), so the client receives the messages that ACK covered again
    /// and acknowledges them again. Without the restart they would stay outstanding for good: the
    /// client freed their places and does not ACK them again, and a full window pushes nothing more.
    /// The answer allows the client one restart: none is made if the subscription was started again
    /// meanwhile (<see cref="StartAgainIfBehindLocked"/>, after the failed delete put messages back),
    /// and none if the connection had no subscription of the queue (a GET client) or subscribes it again
    /// meanwhile: the subscription it makes starts from the oldest stored message (or, made while the
    /// failed delete was in memory, starts again when the messages are put back), and starting it
    /// again, maybe while another connection's delete hides the oldest messages, could push above the
    /// last message pushed into a window the client counts as full.
    /// </summary>
    private void RestartAfterFailedAck(QueueHandle queue)
    {
        Subscription? failed;
        int restarts;
        lock (queue.Sync)
        {
            failed = queue.Tag is Subscription s && ReferenceEquals(s.Session, this) ? s : null;
            restarts = failed?.Restarts ?? 0;
        }
        if (failed is not null)
        {
            _ = RestartWhenWritableAsync(queue, failed, restarts);
        }
    }

    /// <summary>
    /// The restart waits for the undo (an earlier ACK of this queue may not be taken back yet, and
    /// restarting before it would push from the middle of the queue), and until a write succeeded
    /// (at once after a one-off failure; while the disk is full or fails every write, when it works
    /// again). Restarting at once would push the same messages again and again while writes keep
    /// failing, each answered by an ACK that fails too, at the speed of the round trip; waiting costs
    /// the subscriber nothing it could have had.
    /// </summary>
    private async Task RestartWhenWritableAsync(QueueHandle queue, Subscription failed, int restarts)
    {
        await _store.WhenWritesAgain();
        lock (queue.Sync)
        {
            if (queue.Tag is Subscription s && ReferenceEquals(s, failed) && s.Restarts == restarts)
            {
                s.Restart();
                DeliverNextLocked(s);
            }
        }
    }

    /// <summary>
    /// The store put messages of <paramref name="queue"/> back after a failed delete
    /// (<see cref="QueueStore.MessagesPutBack"/>): another connection's ACK of them, or their expiry.
    /// Its subscriber may have moved past them (its own ACK of one answered NO_MSG while the delete
    /// was being written, or its SUB started after them); once the store writes again, a subscriber
    /// with nothing outstanding starts again from the oldest, and one with messages outstanding does
    /// when its ACK of them finds the older messages (<see cref="StartAgainIfPutBack"/>).
    /// </summary>
    internal static async Task StartSubscriberAgainWhenWritableAsync(QueueStore store, QueueHandle queue)
    {
        await store.WhenWritesAgain();
        lock (queue.Sync)
        {
            if (queue.Tag is Subscription s)
            {
                s.Session.StartAgainIfBehindLocked(s);
            }
        }
    }

    /// <summary>
    /// This connection's ACK of <paramref name="id"/> was answered NO_MSG because an older message is
    /// stored: if that message is one the subscription moved past (a failed delete put it back) and
    /// <paramref name="id"/> is outstanding, frees the places up to <paramref name="id"/> as the client
    /// did, and once nothing is outstanding starts the subscription again from the oldest stored
    /// message (PROTOCOL.md §6 ACK). Any other ACK answered NO_MSG (out of order) changes nothing.
    /// </summary>
    private void StartAgainIfPutBack(QueueHandle queue, ulong id)
    {
        lock (queue.Sync)
        {
            if (!(queue.Tag is Subscription s && ReferenceEquals(s.Session, this) && s.CountThrough(id) > 0
                && OldestStored(queue) is ulong oldest && s.IsBehind(oldest)))
            {
                return;
            }
            s.TryReleaseThrough(id);
        }
        // The restart waits, as after an ACK answered INTERNAL, until the store writes again: while
        // the disk is full the put-back messages would otherwise go out again and again, each ACK of
        // them failing once more, at the speed of the round trip.
        _ = StartSubscriberAgainWhenWritableAsync(_store, queue);
    }

    /// <summary>
    /// Messages were stored again: starts <paramref name="s"/> (this connection's) again from the
    /// oldest stored message when it has nothing outstanding and moved past one of them. The client's
    /// count of the window is empty too then, so the pushes from the oldest fit it. A subscription that
    /// has not moved past them (it began, or last looked for a message, while they were deleted in
    /// memory, and found none) is pushed them now as far as its window allows: nothing else would
    /// wake it before the queue's next message. Caller holds <c>s.Queue.Sync</c>.
    /// </summary>
    private void StartAgainIfBehindLocked(Subscription s)
    {
        if (s.Ended || OldestStored(s.Queue) is not ulong oldest)
        {
            return;
        }
        if (s.IsBehind(oldest))
        {
            if (s.HasOutstanding)
            {
                return;   // started again when the ACKs of what is outstanding find the older messages (StartAgainIfPutBack)
            }
            s.Restart();
        }
        DeliverNextLocked(s);
    }

    /// <summary>The id of the queue's oldest stored message; null when there is none or the store failed to read it (logged).</summary>
    private ulong? OldestStored(QueueHandle queue)
    {
        try
        {
            if (!_store.TryPeekOldest(queue, out StoredMessage message))
            {
                return null;
            }
            ulong id = message.Id;
            message.Return();
            return id;
        }
        catch (Exception ex)
        {
            Log.StoreFailed(_context, "SUB", ex);
            return null;
        }
    }

    private void HandleGet(in FrameView frame)
    {
        var queue = RecipientCommand(frame, 0, out _);
        if (queue is null) return;
        uint corr = frame.CorrelationId;
        _store.MarkActive(queue);   // a recipient that polls uses its queue (idle-queue expiry)
        StoredMessage message;
        try
        {
            if (!_store.TryPeekOldest(queue, out message))
            {
                _context.Metrics.Command(FrameType.Get, CommandResult.Ok);
                WriteEmpty(FrameType.Empty, corr);
                return;
            }
        }
        catch (Exception ex)
        {
            StoreFailed(FrameType.Get, corr, ex);
            return;
        }
        try
        {
            using var cipher = new DeliveryCipher(queue.DeliveryKey);
            _context.Metrics.Command(FrameType.Get, CommandResult.Ok);
            WriteMessage(corr, queue, message, cipher);
        }
        finally
        {
            message.Return();
        }
    }
}
