using System.Runtime.InteropServices;
using Relay.Protocol;

namespace Relay.Client.Transport;

/// <summary>
/// The relay held to the delivery windows it granted (PROTOCOL.md §6): each subscribed queue's
/// <see cref="DeliveryWindow"/>, kept up to date from the SUBs and ACKs this connection sends and the
/// answers and pushes it reads, all under <c>_pendingLock</c>, which the read loop takes for each
/// frame anyway.
/// </summary>
public sealed partial class RelayConnection
{
    /// <summary>One queue subscribed on this connection.</summary>
    private sealed class Subscription
    {
        /// <summary>The app's side: set while the app receives the queue's deliveries (from SubscribeAsync to an END, a refusal or a rejected delivery).</summary>
        public DeliveryCipher? Cipher;
        public RecipientQueue? Queue;

        /// <summary>The relay's side: kept for as long as the connection lasts, once a SUB was answered OK.</summary>
        public readonly DeliveryWindow Window = new();

        /// <summary>True when the app did not receive the queue yet (a cipher was made for it).</summary>
        public bool StartReceivingLocked(RecipientQueue queue)
        {
            if (Cipher != null) return false;
            Cipher = new DeliveryCipher(queue.DeliveryKey);
            Queue = queue;
            return true;
        }

        /// <summary>The app stops receiving the queue: the cipher to dispose, or null when it did not receive it.</summary>
        public DeliveryCipher? StopReceivingLocked()
        {
            var cipher = Cipher;
            Cipher = null;
            Queue = null;
            return cipher;
        }
    }

    private enum RequestKind : byte { Other, Sub, Ack }

    /// <summary>What a SUB or an ACK does to a queue's delivery window: <c>Value</c> is the SUB's granted window, or the ACK's message id.</summary>
    private readonly record struct WindowEffect(RequestKind Kind, Id Queue, ulong Value)
    {
        public static WindowEffect Sub(Id queue, int granted) => new(RequestKind.Sub, queue, (ulong)granted);
        public static WindowEffect Ack(Id queue, ulong messageId) => new(RequestKind.Ack, queue, messageId);
    }

    /// <summary>
    /// A request awaiting its answer. <see cref="Caller"/> is null once the caller stopped waiting; a
    /// SUB or an ACK stays until its answer all the same, which the queue's window needs.
    /// </summary>
    private struct InFlight(PendingRequest caller, in WindowEffect window)
    {
        public PendingRequest? Caller = caller;
        public readonly RequestKind Kind = window.Kind;
        public readonly Id Queue = window.Queue;
        public readonly ulong Value = window.Value;
        /// <summary>An ACK's places it may still free for pushes read after it was sent (<see cref="DeliveryWindow"/>).</summary>
        public int MayFree = window.Kind == RequestKind.Ack ? ProtocolConstants.MaxDeliveryWindow : 0;
    }

    /// <summary>The caller of request <paramref name="corr"/> stopped waiting; true when it was still in flight.</summary>
    private bool AbandonLocked(uint corr, PendingRequest caller)
    {
        ref var request = ref CollectionsMarshal.GetValueRefOrNullRef(_pending, corr);
        if (System.Runtime.CompilerServices.Unsafe.IsNullRef(ref request) || !ReferenceEquals(request.Caller, caller))
        {
            return false;
        }
        if (request.Kind == RequestKind.Other)
        {
            _pending.Remove(corr);
        }
        else
        {
            request.Caller = null;
        }
        return true;
    }

    /// <summary>True when a SUB of <paramref name="queue"/> was sent and its answer not read yet.</summary>
    private bool SubInFlightLocked(Id queue)
    {
        foreach (var request in _pending.Values)
        {
            if (request.Kind == RequestKind.Sub && request.Queue == queue) return true;
        }
        return false;
    }

    /// <summary>A request is about to be written: an ACK frees its places now (the relay may push the next message before it answers).</summary>
    private void SendingLocked(in WindowEffect window)
    {
        if (window.Kind == RequestKind.Ack && _subscribed.TryGetValue(window.Queue, out var subscription))
        {
            subscription.Window.ReleaseThrough(window.Value);
        }
    }

    /// <summary>A SUB's or an ACK's answer, read in stream order.</summary>
    private void AnsweredLocked(in InFlight request, in FrameView answer)
    {
        if (request.Kind == RequestKind.Sub)
        {
            if (answer.Type == FrameType.Ok)
            {
                // The relay wrote this OK before the new subscription's first push.
                var subscription = CollectionsMarshal.GetValueRefOrAddDefault(_subscribed, request.Queue, out _) ??= new Subscription();
                subscription.Window.Subscribed((int)request.Value);
            }
        }
        else if (_subscribed.TryGetValue(request.Queue, out var subscription))
        {
            // The relay may free the places when it answers (an ACK that crossed a SUB, a message
            // that expired); whatever the answer, they are free here.
            subscription.Window.ReleaseThrough(request.Value);
            if (answer.Type == FrameType.Err && answer.Payload.Length > 0 && (ErrorCode)answer.Payload[0] == ErrorCode.Internal)
            {
                // Nothing was deleted, and the relay starts the subscription again from the oldest message.
                subscription.Window.AckFailed();
            }
        }
    }

    /// <summary>
    /// Counts a push of message <paramref name="messageId"/> of queue <paramref name="queue"/>; throws
    /// <see cref="ProtocolException"/> when the relay was not allowed to push it.
    /// </summary>
    private Subscription CountPushLocked(Id queue, ulong messageId)
    {
        if (!_subscribed.TryGetValue(queue, out var subscription) || subscription.Window.Granted == 0)
        {
            ProtocolException.Throw(ErrorCode.Syntax, "it pushed a message of a queue this connection has not subscribed");
        }
        var window = subscription.Window;
        if (window.StartsAgainAt(messageId))
        {
            window.StartedAgain();
        }
        if (window.IsFull && !FreedByAcksInFlightLocked(queue, window))
        {
            ProtocolException.Throw(ErrorCode.Limit,
                $"it pushed a message of a queue beyond the delivery window of {window.Granted} it granted to this connection's subscription");
        }
        window.Push(messageId);
        return subscription;
    }

    /// <summary>
    /// A push found the window full: the queue's unanswered ACKs may have freed places at the relay
    /// that this count has not freed yet (a message pushed after the ACK was sent; see
    /// <see cref="DeliveryWindow"/>). Frees them, within what each ACK may still free; true when a
    /// place is free then. Looks at every request in flight, but only for a push that finds the
    /// window full: after a SUB repeated, or from a relay that breaks the protocol.
    /// </summary>
    private bool FreedByAcksInFlightLocked(Id queue, DeliveryWindow window)
    {
        foreach (uint corr in _pending.Keys)
        {
            ref var request = ref CollectionsMarshal.GetValueRefOrNullRef(_pending, corr);
            if (request.Kind == RequestKind.Ack && request.MayFree > 0 && request.Queue == queue)
            {
                request.MayFree -= window.ReleaseThrough(request.Value, request.MayFree);
                if (!window.IsFull) return true;
            }
        }
        return false;
    }
}
