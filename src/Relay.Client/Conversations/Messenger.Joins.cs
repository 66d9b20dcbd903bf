using System.Threading.Channels;
using Relay.Client.Transport;
using Relay.Protocol;

namespace Relay.Client.Conversations;

// The inviter's side of a join: securing the joiner's queue (SKEY on the joiner's relay) away from the
// deliveries' handling, so that a joiner's relay that cannot take it for now holds up only that contact.
public sealed partial class Messenger
{
    // Joins of contacts this side invited whose JOIN arrived and whose SKEY of the joiner's queue is not
    // settled yet, or whose deliveries held meanwhile are not all handled yet; by contact name. Used by
    // the listening ListenAsync only (one at a time), and kept for the next one: what it holds is neither
    // saved nor acknowledged.
    private readonly Dictionary<string, PendingJoin> _joins = [];

    /// <summary>What a JOIN asks of the inviter: the SKEY of the joiner's queue, on the joiner's relay.</summary>
    private sealed record JoinRequest(string Contact, RelayAddress PeerRelay, byte[] PeerSenderId, byte[] SenderPrivate, byte[] JoinHash);

    /// <summary>
    /// A contact's JOIN waiting for its SKEY (<see cref="Settled"/> false), or settled and with
    /// deliveries still to hand on. <see cref="Held"/> is the contact's queue's deliveries from the JOIN
    /// on, in order: taken from the client's stream (so they hold up no other contact) but neither
    /// saved nor acknowledged, so the relay keeps them, and the ones after them wait on the relay
    /// (delivery window). They are handled, in order, once the SKEY is settled.
    /// </summary>
    private sealed class PendingJoin(JoinRequest request)
    {
        public JoinRequest Request { get; set; } = request;
        public List<QueueDelivery> Held { get; } = [];
        private volatile bool _settled;
        private volatile string? _refused;

        /// <summary>The SKEY was answered OK, or refused for good (<see cref="Refused"/>).</summary>
        public bool Settled => _settled;

        /// <summary>Why the joiner's relay refused the SKEY for good (AUTH); null when it took it.</summary>
        public string? Refused => _refused;

        public void Settle(string? refused)
        {
            _refused = refused;
            _settled = true;
        }

        /// <summary>Another JOIN (<see cref="Request"/>, replaced) is to be secured.</summary>
        public void Unsettle()
        {
            _settled = false;
            _refused = null;
        }

        /// <summary>Holds a delivery of the contact's queue, once (the relay pushes again after a reconnection what is not acknowledged).</summary>
        public void Hold(QueueDelivery delivery)
        {
            if (!Held.Exists(d => d.Delivery.MessageId == delivery.Delivery.MessageId)) Held.Add(delivery);
        }

        /// <summary>Whether the held JOIN is <paramref name="joinHash"/> and its SKEY is settled.</summary>
        public bool SettledFor(ReadOnlySpan<byte> joinHash) => Settled && joinHash.SequenceEqual(Request.JoinHash);
    }

    /// <summary>The pending join that holds the deliveries of <paramref name="recipientId"/>, if any.</summary>
    private PendingJoin? HoldingQueue(byte[] recipientId)
    {
        foreach (var join in _joins.Values)
        {
            if (join.Held.Count > 0 && join.Held[0].Queue.RecipientId.AsSpan().SequenceEqual(recipientId)) return join;
        }
        return null;
    }

    /// <summary>A settled join with deliveries to hand on, if any: they come before anything else of its queue.</summary>
    private PendingJoin? SettledJoin()
    {
        foreach (var join in _joins.Values)
        {
            if (join.Settled && join.Held.Count > 0) return join;
        }
        return null;
    }

    /// <summary>
    /// Secures the joiner's queue (SKEY with the key derived for it) on the joiner's relay, trying again
    /// with back-off while the relay cannot be reached, is not the relay its address names, or refuses
    /// for now (INTERNAL, FULL, LIMIT, …); each kind of failure is reported once as
    /// <see cref="ContactUnavailable"/>, naming the relay. Settles the join when the relay answers OK
    /// or refuses for good (AUTH), then tells the listener through <paramref name="settled"/>.
    /// </summary>
    private async Task SecureJoinAsync(PendingJoin join, ChannelWriter<ConversationEvent> events, ChannelWriter<PendingJoin> settled,
        CancellationToken cancellationToken)
    {
        var request = join.Request;
        var relay = request.PeerRelay;
        var wait = _client.Options.ReconnectMin;
        string? reported = null;
        while (true)
        {
            string kind, reason;
            // One attempt at a time, bounded like a connection (CommandAsync): the back-off and the reports are this loop's.
            try
            {
                await CommandAsync(relay, (c, token) => c.SecureAsync(request.PeerSenderId, request.SenderPrivate, token),
                    attempt: true, cancellationToken).ConfigureAwait(false);
                join.Settle(null);
                settled.TryWrite(join);
                return;
            }
            catch (RelayErrorException ex) when (ex.Code == ErrorCode.Auth)
            {
                // Secured with another key already (or no such queue): not this contact's JOIN to complete.
                join.Settle(ex.Message);
                settled.TryWrite(join);
                return;
            }
            catch (Exception ex) when (AttemptFailed(ex, cancellationToken))
            {
                (kind, reason) = DescribeFailure(ex, $"the joiner's relay {relay}");
                if (ex is RelayErrorException)
                {
                    reason = $"the joiner's relay {relay} refuses for now to secure the joiner's queue ({ex.Message})";
                }
            }
            if (kind != reported)
            {
                events.TryWrite(new ContactUnavailable(request.Contact,
                    reason + "; the join completes once that relay takes the key that secures the joiner's queue (SKEY), and listening goes on trying"));
                reported = kind;
            }
            await Task.Delay(wait, cancellationToken).ConfigureAwait(false);
            wait = NextWait(wait);
        }
    }
}
