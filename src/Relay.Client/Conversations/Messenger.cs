using System.Buffers.Binary;
using System.Runtime.CompilerServices;
using System.Security.Cryptography;
using System.Text;
using System.Threading.Channels;
using Relay.Client.EndToEnd;
using Relay.Client.Transport;
using Relay.Protocol;

namespace Relay.Client.Conversations;

/// <summary>Something that happened in a conversation.</summary>
public abstract record ConversationEvent(string Contact);
/// <summary>The invited side joined: the conversation is open both ways.</summary>
public sealed record ContactJoined(string Contact) : ConversationEvent(Contact);
/// <summary>
/// A message, decrypted and verified. Yielded once it is handled (a redelivery of it is absorbed); until
/// the app has asked for the next event (or called <see cref="Messenger.Acknowledge"/>) it is not, and
/// it comes again with the next <see cref="Messenger.ListenAsync"/>.
/// </summary>
public sealed record MessageReceived(string Contact, string Text, DateTimeOffset Hour, ulong Counter) : ConversationEvent(Contact);
/// <summary>An envelope refused (tampered, replayed, malformed); the conversation goes on.</summary>
public sealed record MessageRejected(string Contact, EnvelopeError Error, string Reason) : ConversationEvent(Contact);
/// <summary>Envelopes that never arrived before a later one did (dropped or reordered by the network or the relay).</summary>
public sealed record MessagesMissing(string Contact, ulong Count) : ConversationEvent(Contact);

/// <summary>
/// A contact's queue cannot be received from: its relay refused the SUB (the queue was deleted, say),
/// another device took it, or a connection to its relay failed: the relay cannot be reached, or the
/// server at its address is not the relay the address names (a <see cref="FingerprintMismatchException"/>:
/// the relay was replaced, or someone on the way answers for it; the reason says so). A failed
/// connection is reported for each contact subscribed on that relay, again only when the kind of
/// failure changes; the listener goes on trying, and once a connection is made the contacts are
/// reported as <see cref="ContactAvailable"/>. The other contacts go on.
/// <para>
/// Also reported for a contact whose JOIN arrived while the joiner's queue cannot be secured on the
/// joiner's relay (SKEY): that relay cannot be reached, is not the relay its address names, or refuses
/// for now (INTERNAL, FULL, LIMIT); the reason names the relay. Again only when the kind of failure
/// changes: the listener tries again with back-off, the JOIN (and what the contact sent behind it)
/// waiting unacknowledged and unsaved, and once the relay takes the SKEY the contact is reported as
/// <see cref="ContactJoined"/>, with no call of the app's.
/// </para>
/// </summary>
public sealed record ContactUnavailable(string Contact, string Reason) : ConversationEvent(Contact);

/// <summary>
/// A contact reported <see cref="ContactUnavailable"/> because a connection to its relay failed is
/// received from again: a connection to the relay was made and the contact's queue subscribed on it.
/// </summary>
public sealed record ContactAvailable(string Contact) : ConversationEvent(Contact);

/// <summary>
/// Messages to a contact wait in the profile's outbox: the contact's relay refused the oldest (its
/// queue is full: QUOTA; the relay's storage is full: FULL; …), cannot be reached (a connection attempt
/// failed, or no answer within <see cref="RelayClientOptions.ConnectTimeout"/>; whatever
/// <see cref="RelayClientOptions.RetryFor"/> is), or is not the relay its address names (a
/// <see cref="FingerprintMismatchException"/>); the reason says which and names the relay when it
/// cannot be reached. They are not lost: the listener keeps offering them, in
/// order and with back-off, until the relay takes them (reported again only when the kind of failure changes),
/// and the next <see cref="Messenger.SendAsync"/> or <see cref="Messenger.ListenAsync"/> sends them too.
/// A message a SendAsync leaves in the outbox while a listener runs is offered the same way.
/// The other contacts go on.
/// </summary>
public sealed record OutboxStalled(string Contact, int Waiting, string Reason) : ConversationEvent(Contact);

/// <summary>
/// A message to a contact taken out of the profile's outbox because the contact's relay refuses it for
/// good (TOO_LARGE: the envelope is over the relay's maximum message size, lowered after the message
/// was queued, say). It is never sent; the messages behind it go on, and the contact, when the next one
/// arrives, sees one message missing (<see cref="MessagesMissing"/>).
/// </summary>
public sealed record MessageDropped(string Contact, string Reason) : ConversationEvent(Contact);

/// <summary>
/// Private conversations over any relays: invitations, joins, end-to-end encrypted messages with a
/// per-direction key chain, and at-least-once listening: a message is saved as received and
/// acknowledged only after the app has handled it (so an app that fails or a crash gets it again, and
/// the counters absorb a message handled already).
/// </summary>
public sealed partial class Messenger : IAsyncDisposable
{
    private const byte ContentText = 1;
    private readonly IProfileStore _store;
    private readonly RelayClient _client;
    private readonly bool _ownsClient;
    // One outbox flush per contact at a time: two would race to send the same envelopes, and one could
    // send an envelope after the one behind it.
    private readonly System.Collections.Concurrent.ConcurrentDictionary<string, SemaphoreSlim> _flushing = new();
    // The largest message each relay announced (WELCOME) on the connections this messenger used, by address.
    private readonly System.Collections.Concurrent.ConcurrentDictionary<string, int> _maxMessage = new();
    // While ListenAsync runs: each contact's outbox sender, woken when the contact's outbox has work.
    private OutboxSenders? _senders;
    // While ListenAsync waits for the app to handle the events it yielded: what acknowledges them.
    private Action? _acknowledge;
    private int _listening;

    public Messenger(IProfileStore store, RelayClient client)
    {
        _store = store;
        _client = client;
    }

    public Messenger(IProfileStore store, RelayClientOptions? options = null)
        : this(store, new RelayClient(options)) => _ownsClient = true;

    public RelayClient Client => _client;

    public IReadOnlyList<ContactData> Contacts => _store.Load().Contacts;

    private static string UniqueName(ProfileData profile, string? wanted)
    {
        if (!string.IsNullOrWhiteSpace(wanted))
        {
            if (profile.Find(wanted) != null)
            {
                throw new ArgumentException($"there is already a contact named '{wanted}'");
            }
            return wanted;
        }
        for (int i = 1; ; i++)
        {
            var name = $"contact{i}";
            if (profile.Find(name) is null) return name;
        }
    }

    /// <summary>Creates a queue on <paramref name="relay"/> and returns the link to give to one person.</summary>
    public async Task<(string Link, string Name)> InviteAsync(RelayAddress relay, string? name = null, string? password = null,
        CancellationToken cancellationToken = default)
    {
        // The name and the profile are checked before the relay is asked for anything.
        _store.Update(profile => UniqueName(profile, name));
        var queue = await RunAsync(relay, c => c.CreateQueueAsync(password, cancellationToken), cancellationToken).ConfigureAwait(false);
        var own = new byte[32];
        var ownPublic = new byte[32];
        RelayCrypto.GenerateKeyPair(own, ownPublic);
        var contactName = _store.Update(profile =>
        {
            var n = UniqueName(profile, name);
            profile.Contacts.Add(new ContactData
            {
                Name = n,
                Status = ContactStatus.Invited,
                Inviter = true,
                OwnPrivate = own,
                OwnPublic = ownPublic,
                ReceiveRelay = relay.ToString(),
                RecipientId = queue.RecipientId,
                ReceiveSenderId = queue.SenderId,
                RecipientPrivate = queue.RecipientPrivateKey,
                DeliveryKey = queue.DeliveryKey,
            });
            return n;
        });
        return (new Invitation(relay, queue.SenderId, ownPublic).ToString(), contactName);
    }

    /// <summary>
    /// Joins the conversation of <paramref name="link"/>: creates this side's queue (on
    /// <paramref name="ownRelay"/>, default the inviter's relay), secures the inviter's queue with a new
    /// sender key, and sends this side's queue details through it. Returns the new contact's name.
    /// The contact is saved before the inviter's queue is secured: a join that stops after that (the
    /// relay cannot be reached, the process stops) is taken up again by the next JoinAsync of the same
    /// link, with the same keys and queue, or by the next <see cref="ListenAsync"/> or
    /// <see cref="SendAsync"/>, so the invitation is never used up by a join that did not finish.
    /// </summary>
    public async Task<string> JoinAsync(string link, RelayAddress? ownRelay = null, string? name = null, string? password = null,
        CancellationToken cancellationToken = default)
    {
        if (!Invitation.TryParse(link, out var invitation, out var error))
        {
            throw new FormatException(error);
        }
        string contactName;
        if (_store.Load().Contacts.FirstOrDefault(c => c.SendUnsecured && c.SendSenderId is { } id
                && id.AsSpan().SequenceEqual(invitation.SenderId)) is { } unfinished)
        {
            contactName = unfinished.Name;
        }
        else
        {
            var relay = ownRelay ?? invitation.Relay;
            var own = new byte[32];
            var ownPublic = new byte[32];
            RelayCrypto.GenerateKeyPair(own, ownPublic);
            var senderPrivate = new byte[32];
            RelayCrypto.GenerateKeyPair(senderPrivate, new byte[32]);
            var (j2i, i2j) = E2eCrypto.InitialChains(own, invitation.InviterKey, invitation.InviterKey, ownPublic);

            // The name and the profile are checked before the invitation is used: a refusal after SKEY would burn it.
            _store.Update(profile => UniqueName(profile, name));
            var queue = await RunAsync(relay, c => c.CreateQueueAsync(password, cancellationToken), cancellationToken).ConfigureAwait(false);

            // JOIN content: u16 addressLength ‖ relay address ‖ senderId[24] of this side's queue.
            var address = Encoding.UTF8.GetBytes(relay.ToString());
            var content = new byte[2 + address.Length + 24];
            BinaryPrimitives.WriteUInt16BigEndian(content, (ushort)address.Length);
            address.CopyTo(content, 2);
            queue.SenderId.CopyTo(content, 2 + address.Length);
            var envelope = E2eCrypto.Seal(E2eCrypto.KindJoin, 0, j2i, content, ownPublic);

            contactName = _store.Update(profile =>
            {
                var n = UniqueName(profile, name);
                profile.Contacts.Add(new ContactData
                {
                    Name = n,
                    Status = ContactStatus.Joined,
                    Inviter = false,
                    OwnPrivate = own,
                    OwnPublic = ownPublic,
                    PeerPublic = invitation.InviterKey,
                    ReceiveRelay = relay.ToString(),
                    RecipientId = queue.RecipientId,
                    ReceiveSenderId = queue.SenderId,
                    RecipientPrivate = queue.RecipientPrivateKey,
                    DeliveryKey = queue.DeliveryKey,
                    SendRelay = invitation.Relay.ToString(),
                    SendSenderId = invitation.SenderId,
                    SenderPrivate = senderPrivate,
                    SendUnsecured = true,
                    SendChain = j2i,
                    SendCounter = 1,
                    ReceiveChain = i2j,
                    ReceiveCounter = 0,
                    Outbox = [envelope],
                });
                return n;
            });
        }
        try
        {
            await SecureSendQueueAsync(contactName, attempt: false, cancellationToken).ConfigureAwait(false);
        }
        catch (RelayErrorException ex) when (ex.Code == ErrorCode.Auth)
        {
            // Secured with another key (the link was used by someone else) or gone: this join did not happen.
            _store.Update(profile => profile.Contacts.RemoveAll(c => c.Name == contactName));
            throw new InvalidOperationException("this invitation cannot be used: it was used already, or its queue no longer exists", ex);
        }
        await FlushOutboxAsync(contactName, cancellationToken).ConfigureAwait(false);
        return contactName;
    }

    /// <summary>
    /// Secures the queue a joined contact is sent to with the saved sender key, when that is not known
    /// to be done (<see cref="ContactData.SendUnsecured"/>); SKEY with the same key again answers OK.
    /// <paramref name="attempt"/>: one attempt (see <see cref="SendCommandAsync"/>).
    /// </summary>
    private async Task SecureSendQueueAsync(string contactName, bool attempt, CancellationToken cancellationToken)
    {
        if (_store.Load().Find(contactName) is not { SendUnsecured: true } contact)
        {
            return;
        }
        var relay = RelayAddress.Parse(contact.SendRelay!);
        await CommandAsync(relay, (c, token) => c.SecureAsync(contact.SendSenderId!, contact.SenderPrivate!, token), attempt, cancellationToken).ConfigureAwait(false);
        _store.Update(profile =>
        {
            if (profile.Find(contactName) is { } c)
            {
                c.SendUnsecured = false;
                c.SendMaxMessage = LearnedMaxMessage(relay) ?? c.SendMaxMessage;
            }
            return 0;
        });
    }

    /// <summary>
    /// Encrypts and sends a text message; completes when the relay has it on disk.
    /// <para>
    /// A message whose envelope is larger than the contact's relay takes (its maximum message size,
    /// announced when a connection is made, and kept in the profile) is refused before anything is
    /// sealed or saved: <see cref="MessageTooLargeException"/>. When the limit known is only the one
    /// saved in the profile (no connection to that relay in this process yet), the relay is asked first,
    /// as its operator may have raised it since; the saved limit decides when the relay cannot be reached
    /// within <see cref="RelayClientOptions.ConnectTimeout"/>. When that limit is not known (no
    /// connection to that relay has told it to this profile yet), the message is sealed and sent; a relay that refuses it as too large gets the same exception, with
    /// <see cref="MessageTooLargeException.Sealed"/> set: it is dropped, and the contact sees one
    /// message missing.
    /// </para>
    /// <para>
    /// Any other failure (the relay cannot be reached, refuses for now: QUOTA, FULL; the call is
    /// cancelled) leaves the sealed message in the profile's outbox: it goes out, once, with the next
    /// SendAsync or <see cref="ListenAsync"/>, and a listener running meanwhile sends it as soon as the
    /// relay takes it. While a listener is offering the contact's waiting messages to its relay, this
    /// call waits its turn; cancelled then, it saves nothing.
    /// </para>
    /// </summary>
    public async Task SendAsync(string contactName, string text, CancellationToken cancellationToken = default)
    {
        var content = new byte[1 + Encoding.UTF8.GetByteCount(text)];
        content[0] = ContentText;
        Encoding.UTF8.GetBytes(text, content.AsSpan(1));
        if (content.Length > E2eCrypto.MaxContent(E2eCrypto.KindMessage))
        {
            throw new ArgumentException($"message too long: at most {E2eCrypto.MaxContent(E2eCrypto.KindMessage) - 1} bytes of UTF-8");
        }
        int size = E2eCrypto.PaddedSizeFor(content.Length, E2eCrypto.MessageHeaderSize);
        await LearnMaxMessageAsync(contactName, size, cancellationToken).ConfigureAwait(false);
        // The contact's outbox is this call's from the sealing to the end of the sending: no other
        // flush (a listener's) sends this envelope meanwhile, so a refusal of it is this call's to report.
        var gate = Gate(contactName);
        await gate.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            var envelope = _store.Update(profile =>
            {
                var contact = profile.Find(contactName) ?? throw new ArgumentException($"no contact named '{contactName}'");
                if (contact.Status != ContactStatus.Joined || contact.SendChain is null)
                {
                    throw new InvalidOperationException($"'{contactName}' has not joined yet: run 'relay listen' until it says so");
                }
                if (KnownMaxMessage(contact) is { } max && size > max)
                {
                    throw new MessageTooLargeException(contactName, size, max, sealedAndDropped: false);
                }
                var chain = contact.SendChain;
                var sealedEnvelope = E2eCrypto.Seal(E2eCrypto.KindMessage, contact.SendCounter, chain, content);
                contact.Outbox.Add(sealedEnvelope);
                contact.SendChain = chain;
                contact.SendCounter++;
                return sealedEnvelope;
            });
            await FlushAndWakeAsync(contactName, envelope, cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            gate.Release();
        }
    }

    /// <summary>
    /// Sends every unacknowledged envelope of a contact, oldest first (identical bytes, so resends are
    /// absorbed as duplicates). One the relay refuses for good (TOO_LARGE) is taken out of the outbox
    /// and reported as <see cref="MessageDropped"/> by the listener (now, or the next one), and the
    /// ones behind it go on.
    /// </summary>
    public async Task FlushOutboxAsync(string contactName, CancellationToken cancellationToken = default)
    {
        var gate = Gate(contactName);
        await gate.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            await FlushAndWakeAsync(contactName, null, cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            gate.Release();
        }
    }

    // One outbox flush per contact at a time (see _flushing).
    private SemaphoreSlim Gate(string contactName) => _flushing.GetOrAdd(contactName, _ => new SemaphoreSlim(1, 1));

    /// <summary>
    /// A flush outside the listener's own outbox work: what it leaves to do (envelopes that did not go
    /// out, drops to report) becomes the listener's, if one is running.
    /// </summary>
    private async Task FlushAndWakeAsync(string contactName, byte[]? own, CancellationToken cancellationToken)
    {
        int dropped;
        try
        {
            dropped = await FlushOutboxLockedAsync(contactName, own, attempt: false, cancellationToken).ConfigureAwait(false);
        }
        catch
        {
            Volatile.Read(ref _senders)?.Wake(contactName);
            throw;
        }
        if (dropped > 0) Volatile.Read(ref _senders)?.Wake(contactName);
    }

    /// <summary>
    /// Sends the outbox (under the contact's gate); returns how many envelopes it dropped and left to a
    /// listener to report. <paramref name="own"/>: the envelope of the SendAsync calling, whose
    /// refusal for good that call reports itself (it throws <see cref="MessageTooLargeException"/>).
    /// <paramref name="attempt"/>: each command is one attempt (the listener's outbox sender, see
    /// <see cref="SendCommandAsync"/>), else it is retried as <see cref="RelayClient.RunAsync{T}"/> does.
    /// </summary>
    private async Task<int> FlushOutboxLockedAsync(string contactName, byte[]? own, bool attempt, CancellationToken cancellationToken)
    {
        // A join that stopped before its SKEY was answered: the queue is secured before the JOIN goes.
        await SecureSendQueueAsync(contactName, attempt, cancellationToken).ConfigureAwait(false);
        int dropped = 0;
        while (true)
        {
            var (relay, queue, envelope) = _store.Update(profile =>
            {
                var c = profile.Find(contactName) ?? throw new ArgumentException($"no contact named '{contactName}'");
                return c.Outbox.Count == 0 || c.SendRelay is null
                    ? (null, null, null)
                    : (RelayAddress.Parse(c.SendRelay), new SenderQueue(c.SendSenderId!, c.SenderPrivate), c.Outbox[0]);
            });
            if (envelope is null) return dropped;
            string? refused = null;
            try
            {
                await CommandAsync(relay!, (c, token) => c.SendAsync(queue!, envelope, 0, token), attempt, cancellationToken).ConfigureAwait(false);
            }
            catch (RelayErrorException ex) when (ex.Code == ErrorCode.TooLarge)
            {
                // For good: the relay's limit is below the envelope (lowered since it was queued, or not
                // known when it was sealed). Sending it again cannot help, and it would hold every
                // message behind it; the receiver's counters take the gap (PROTOCOL.md §11.4).
                refused = LearnedMaxMessage(relay!) is { } max
                    ? $"{ex.Message}: the envelope is {envelope.Length} bytes and the relay takes at most {max}; it is dropped and will not be sent"
                    : $"{ex.Message}: the envelope is {envelope.Length} bytes; it is dropped and will not be sent";
            }
            bool mine = refused != null && own != null && envelope.AsSpan().SequenceEqual(own);
            _store.Update(profile =>
            {
                var c = profile.Find(contactName)!;
                if (c.Outbox.Count > 0 && c.Outbox[0].AsSpan().SequenceEqual(envelope))
                {
                    c.Outbox.RemoveAt(0);
                    if (refused != null && !mine) c.Dropped.Add(refused);
                }
                c.SendMaxMessage = LearnedMaxMessage(relay!) ?? c.SendMaxMessage;
                return 0;
            });
            if (mine)
            {
                throw new MessageTooLargeException(contactName, envelope.Length, LearnedMaxMessage(relay!) ?? 0, sealedAndDropped: true);
            }
            if (refused != null) dropped++;
        }
    }

    /// <summary>Runs a command on the relay's connection (see <see cref="RelayClient.RunAsync{T}"/>), noting the relay's maximum message size.</summary>
    private Task<T> RunAsync<T>(RelayAddress relay, Func<RelayConnection, Task<T>> operation, CancellationToken cancellationToken) =>
        _client.RunAsync(relay, c =>
        {
            NoteMaxMessage(relay, c);
            return operation(c);
        }, cancellationToken);

    private Task RunAsync(RelayAddress relay, Func<RelayConnection, Task> operation, CancellationToken cancellationToken) =>
        RunAsync(relay, async c =>
        {
            await operation(c).ConfigureAwait(false);
            return true;
        }, cancellationToken);

    /// <summary>
    /// Runs a command on a relay, noting its maximum message size. Not an <paramref name="attempt"/>: as
    /// <see cref="RunAsync{T}"/> (retried while the relay cannot be reached, until
    /// <see cref="RelayClientOptions.RetryFor"/>). An attempt (the listener's outbox sender and a join's
    /// SKEY, which report and back off themselves): a connection is tried once (a failed attempt throws its
    /// <see cref="RelayConnectException"/> at once) and the whole is bounded by
    /// <see cref="RelayClientOptions.ConnectTimeout"/> (<see cref="OperationCanceledException"/> while
    /// <paramref name="cancellationToken"/> is not cancelled); a connection lost before the answer is
    /// replaced within that bound.
    /// </summary>
    private async Task CommandAsync(RelayAddress relay, Func<RelayConnection, CancellationToken, Task> operation, bool attempt,
        CancellationToken cancellationToken)
    {
        if (!attempt)
        {
            await RunAsync(relay, c => operation(c, cancellationToken), cancellationToken).ConfigureAwait(false);
            return;
        }
        using var bounded = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        bounded.CancelAfter(_client.Options.ConnectTimeout);
        while (true)
        {
            var connection = await _client.ConnectAsync(relay, bounded.Token).ConfigureAwait(false);
            NoteMaxMessage(relay, connection);
            try
            {
                await operation(connection, bounded.Token).ConfigureAwait(false);
                return;
            }
            catch (RelayConnectException) when (!bounded.IsCancellationRequested && connection.Failure is not null)
            {
                // Lost before the answer: the next connection is one more attempt (identical bytes
                // again, absorbed by the receiver if the first reached the relay).
                _client.Drop(relay, connection);
            }
        }
    }

    private void NoteMaxMessage(RelayAddress relay, RelayConnection connection) => _maxMessage[relay.ToString()] = connection.MaxMessage;

    /// <summary>The largest message the relay announced on the last connection this messenger used to it (null: none yet).</summary>
    private int? LearnedMaxMessage(RelayAddress relay) => _maxMessage.TryGetValue(relay.ToString(), out int max) ? max : null;

    /// <summary>
    /// When the only limit known for the contact's relay is the one saved in the profile and it is below
    /// <paramref name="size"/>, asks the relay (a PING, which learns the limit its connection announced):
    /// its operator may have raised the limit since. A relay that cannot be reached within
    /// <see cref="RelayClientOptions.ConnectTimeout"/> (or <see cref="RelayClientOptions.RetryFor"/>)
    /// leaves the decision to the saved limit.
    /// </summary>
    private async Task LearnMaxMessageAsync(string contactName, int size, CancellationToken cancellationToken)
    {
        if (_store.Load().Find(contactName) is not { SendRelay: { } sendRelay, SendMaxMessage: { } saved } || size <= saved
            || !RelayAddress.TryParse(sendRelay, out var relay, out _) || LearnedMaxMessage(relay) is not null)
        {
            return;
        }
        using var bounded = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        bounded.CancelAfter(_client.Options.ConnectTimeout);
        try
        {
            await RunAsync(relay, c => c.PingAsync(bounded.Token), bounded.Token).ConfigureAwait(false);
        }
        catch (OperationCanceledException) when (!cancellationToken.IsCancellationRequested)
        {
            // Not reached in time: the saved limit decides.
        }
        catch (RelayConnectException)
        {
            // Given up, or another relay answers at its address: the saved limit decides.
        }
        catch (RelayErrorException)
        {
            // The PING was refused; the limit, if a connection was made, is learned all the same.
        }
    }

    /// <summary>The largest message the contact's relay takes, as far as is known: from this process's connection, else from the profile.</summary>
    private int? KnownMaxMessage(ContactData contact) =>
        contact.SendRelay is { } relay && RelayAddress.TryParse(relay, out var address, out _) && LearnedMaxMessage(address) is { } max
            ? max
            : contact.SendMaxMessage;

    /// <summary>
    /// Subscribes to every contact's queue, sends what waits in their outboxes (and, while it runs, what
    /// a <see cref="SendAsync"/> could not send: the relay was down, say), and yields what arrives:
    /// joins, messages (each once; a redelivery is absorbed), refusals, contacts that cannot be received
    /// from (<see cref="ContactUnavailable"/>: their relay refused or ended the subscription, cannot be
    /// reached, or is not the relay its address names) and, after a failed connection, can again
    /// (<see cref="ContactAvailable"/>), outboxes whose relay refuses them for now, and messages dropped because their relay refuses
    /// them for good (<see cref="MessageDropped"/>). Contacts are independent: each
    /// one's subscription and outbox go on concurrently, so a relay that is down or refuses a
    /// contact's messages (QUOTA) holds up only the contacts whose queues are on it. So does the
    /// securing of a joiner's queue when its JOIN arrives: while the joiner's relay cannot take it
    /// (down, another server at its address, INTERNAL, …) the contact is reported as
    /// <see cref="ContactUnavailable"/> and the JOIN, with what the contact sent behind it, waits
    /// unacknowledged and unsaved (for the next listener too) while the other contacts go on; it is
    /// tried again with back-off and handled, followed by what waited behind it, once the relay takes it.
    /// <para>
    /// At least once: a delivery's events are yielded before anything is saved or acknowledged, and
    /// when the app asks for the event after them (the loop comes round again) the contact's new state
    /// is saved and the delivery acknowledged (the ACK is sent, its answer not awaited). So when the
    /// app's loop body throws, leaves the loop, or the process stops while it handles a
    /// <see cref="MessageReceived"/>, the message is neither saved nor acknowledged, and it comes again,
    /// first in line, with the next call (or from the relay, to the next process); the replay
    /// protection accepts it, as it was never recorded. An app that leaves the loop after handling an
    /// event calls <see cref="Acknowledge"/> first. Once the loop has come round, a message is never
    /// yielded again (a redelivery or a replay is absorbed or refused). A <see cref="ContactJoined"/>
    /// is the exception: the opened conversation is saved before it is yielded (so the app may send
    /// to the contact from its handler), and an app that fails to handle it finds the contact joined in
    /// <see cref="Contacts"/>. A delivery whose saving fails (the profile cannot be written, say) stays
    /// first in line too, and the exception ends listening.
    /// </para>
    /// <para>
    /// Listening ends, with no exception, when the <see cref="RelayClient"/> the messenger uses is
    /// disposed (an app that shares its own client with the messenger and disposes it): joins and
    /// outboxes still waiting for their relays are given up, unsaved and unacknowledged, for the next
    /// listener.
    /// </para>
    /// </summary>
    public async IAsyncEnumerable<ConversationEvent> ListenAsync([EnumeratorCancellation] CancellationToken cancellationToken = default)
    {
        var profile = _store.Load();
        // A queue lost while listening (taken by another device, deleted and refused after a
        // reconnection, or a delivery that fails its integrity check) is reported between
        // deliveries; the other contacts go on. Watched from before the first SUB.
        var notices = Channel.CreateUnbounded<ConversationEvent>();
        void Ended(RelayAddress relay, RecipientQueue queue) => Report(queue, "another device is receiving this contact's messages now (or the queue was deleted)");
        void Refused(RelayAddress relay, RecipientQueue queue, RelayErrorException error) => Report(queue, error.Message);
        void Rejected(RelayAddress relay, RecipientQueue queue, string reason) => Report(queue, reason);
        void Report(RecipientQueue queue, string reason)
        {
            var contact = _store.Load().Contacts.FirstOrDefault(c => c.RecipientId.AsSpan().SequenceEqual(queue.RecipientId));
            if (contact != null) notices.Writer.TryWrite(new ContactUnavailable(contact.Name, reason));
        }
        // A failed connection to a relay is reported for the contacts subscribed on it, again only when
        // the kind of failure changes (not at every attempt of the back-off); a connection made after
        // one reports them available. By relay address: the kind of failure reported last.
        var unreachable = new Dictionary<string, Type>();
        void ConnectionFailed(RelayAddress relay, Exception failure)
        {
            string reason = failure is FingerprintMismatchException
                ? $"the server at this contact's relay address is not the relay it names ({failure.Message}): the relay was replaced, or someone on the way answers for it; listening goes on trying"
                : $"this contact's relay cannot be reached ({failure.Message}); listening goes on trying";
            lock (unreachable)
            {
                if (unreachable.TryGetValue(relay.ToString(), out var last) && last == failure.GetType()) return;
                unreachable[relay.ToString()] = failure.GetType();
                foreach (var contact in ReceivingFrom(relay)) notices.Writer.TryWrite(new ContactUnavailable(contact.Name, reason));
            }
        }
        void ConnectionMade(RelayAddress relay)
        {
            lock (unreachable)
            {
                if (!unreachable.Remove(relay.ToString())) return;
                foreach (var contact in ReceivingFrom(relay)) notices.Writer.TryWrite(new ContactAvailable(contact.Name));
            }
        }
        // The contacts whose queue on the relay is subscribed (not refused, ended or rejected).
        IEnumerable<ContactData> ReceivingFrom(RelayAddress relay) =>
            _store.Load().Contacts.Where(c => RelayAddress.TryParse(c.ReceiveRelay, out var r, out _)
                && r.ToString() == relay.ToString() && _client.IsSubscribed(relay, c.RecipientId));
        // The only reader of the client's deliveries meanwhile (a second listener throws here).
        _client.BeginReadingDeliveries();
        Volatile.Write(ref _listening, 1);
        _client.SubscriptionEnded += Ended;
        _client.SubscriptionRefused += Refused;
        _client.DeliveryRejected += Rejected;
        _client.ConnectionFailed += ConnectionFailed;
        _client.ConnectionMade += ConnectionMade;
        using var stop = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        // Each contact's outbox is sent by a task of its own, started when it first has work: what
        // waits at the start, and whatever a SendAsync (or a join) meanwhile leaves unsent or drops.
        var senders = new OutboxSenders((name, wake) => Watch(SendOutboxAsync(name, wake, notices.Writer, stop.Token)));
        Volatile.Write(ref _senders, senders);
        // Deliveries are taken from the stream only when they are about to be handled: an app that
        // stops listening after an event leaves the next delivery there for the next listener.
        var deliveries = _client.Deliveries;
        Task<bool>? nextDelivery = null, nextNotice = null, nextSettled = null;
        // Joins whose SKEY of the joiner's queue settled (SecureJoinAsync): their held deliveries are handled next.
        var settled = Channel.CreateUnbounded<PendingJoin>();
        var acks = new List<Task>();
        // Each contact on its own: its subscription and its outbox go on concurrently with every other
        // contact's and with the deliveries, so a relay that is down, or one that refuses a contact's
        // envelopes, holds up only what goes through it. What they meet is reported between deliveries.
        var contactWork = new List<Task>();
        // Secures a joiner's queue for a JOIN, on a task of its own, like the outboxes.
        void Secure(PendingJoin join) => contactWork.Add(Watch(SecureJoinAsync(join, notices.Writer, settled.Writer, stop.Token)));
        // Saves a handled delivery's state, takes it from the stream (or from the join that held it) and
        // acknowledges it: once, when the app asks for the event after its last one (or calls Acknowledge).
        void Commit(Handled handled, PendingJoin? heldBy)
        {
            if (handled.Committed) return;
            if (handled.Contact is { } name && handled.Save is { } save)
            {
                ulong id = handled.Delivery.Delivery.MessageId;
                _store.Update(profile =>
                {
                    if (profile.Find(name) is { } c && id > c.ReceivedThrough) save(c);
                    return 0;
                });
            }
            handled.Committed = true;
            if (heldBy is null)
            {
                deliveries.TryRead(out _);
            }
            else
            {
                heldBy.Held.RemoveAt(0);
                if (heldBy.Held.Count == 0 && _joins.GetValueOrDefault(heldBy.Request.Contact) == heldBy) _joins.Remove(heldBy.Request.Contact);
            }
            // Acknowledged without waiting for the answer, so a backlog drains without a round trip
            // per message: ACKs leave in delivery order, and whatever becomes of one, the saved state
            // absorbs the message if it comes again.
            acks.Add(AckAsync(handled.Delivery, stop.Token));
        }
        async Task Watch(Task work)
        {
            try
            {
                await work.ConfigureAwait(false);
            }
            catch (OperationCanceledException) when (stop.IsCancellationRequested)
            {
            }
            catch (Exception ex)
            {
                // Not a relay's answer nor a lost connection (the profile cannot be saved, say): it
                // ends listening, as a failure of the deliveries' handling does.
                notices.Writer.TryComplete(ex);
            }
        }
        try
        {
            foreach (var contact in profile.Contacts)
            {
                contactWork.Add(Watch(SubscribeContactAsync(contact, notices.Writer, stop.Token)));
                if (contact.Outbox.Count > 0 || contact.Dropped.Count > 0)
                {
                    senders.Wake(contact.Name);
                }
            }
            // Joins an earlier listener left pending: secured again (their deliveries are held still).
            foreach (var join in _joins.Values)
            {
                if (!join.Settled) Secure(join);
            }
            nextDelivery = deliveries.WaitToReadAsync(stop.Token).AsTask();
            nextNotice = notices.Reader.WaitToReadAsync(stop.Token).AsTask();
            nextSettled = settled.Reader.WaitToReadAsync(stop.Token).AsTask();
            while (true)
            {
                if (nextNotice.IsCompleted)
                {
                    while (notices.Reader.TryRead(out var e))
                    {
                        yield return e;
                    }
                    await nextNotice.ConfigureAwait(false);   // throws if cancelled
                    nextNotice = notices.Reader.WaitToReadAsync(stop.Token).AsTask();
                    continue;
                }
                if (nextSettled.IsCompleted)
                {
                    // Only a wake-up: the settled joins are found by SettledJoin.
                    while (settled.Reader.TryRead(out _)) { }
                    await nextSettled.ConfigureAwait(false);   // throws if cancelled
                    nextSettled = settled.Reader.WaitToReadAsync(stop.Token).AsTask();
                    continue;
                }
                // A delivery to handle: first those a join held, once its SKEY settled, in order; else the
                // stream's first. A delivery leaves the stream (or the join) once the app has handled its
                // events (it asked for the next one) and the contact's new state is saved: if the app's
                // handling or the save fails, it stays first, and the next listener handles it before the
                // messages the relay pushed after it (with a delivery window several are waiting behind it).
                QueueDelivery delivery;
                var heldBy = SettledJoin();
                if (heldBy != null)
                {
                    delivery = heldBy.Held[0];
                }
                else
                {
                    if (!nextDelivery.IsCompleted)
                    {
                        await Task.WhenAny(nextDelivery, nextNotice, nextSettled).ConfigureAwait(false);
                        continue;
                    }
                    if (!await nextDelivery.ConfigureAwait(false)) break;   // the client was disposed
                    nextDelivery = deliveries.WaitToReadAsync(stop.Token).AsTask();
                    if (!deliveries.TryPeek(out delivery!)) continue;
                    if (HoldingQueue(delivery.Queue.RecipientId) is { } holding)
                    {
                        // Behind a JOIN whose SKEY is not settled (or whose held deliveries are not all
                        // handled): held after it, unacknowledged, so no other contact waits for it.
                        deliveries.TryRead(out _);
                        holding.Hold(delivery);
                        continue;
                    }
                }
                var handled = Process(delivery);
                if (handled.Join is { } request)
                {
                    if (heldBy is null)
                    {
                        deliveries.TryRead(out _);
                        var join = new PendingJoin(request);
                        join.Hold(delivery);
                        _joins[request.Contact] = join;
                        Secure(join);
                    }
                    else
                    {
                        // Another JOIN than the one settled (after one refused for good): secured in turn.
                        heldBy.Request = request;
                        heldBy.Unsettle();
                        Secure(heldBy);
                    }
                    continue;
                }
                Volatile.Write(ref _acknowledge, () => Commit(handled, heldBy));
                foreach (var e in handled.Events)
                {
                    yield return e;
                }
                Volatile.Write(ref _acknowledge, null);
                Commit(handled, heldBy);
                // After the events: the state behind them is saved whatever becomes of an ACK.
                await ObserveAcksAsync(acks).ConfigureAwait(false);
            }
        }
        finally
        {
            // Events yielded and not acknowledged (the app's loop threw or left): their delivery stays
            // first in line, unsaved and unacknowledged.
            Volatile.Write(ref _acknowledge, null);
            Volatile.Write(ref _listening, 0);
            Volatile.Write(ref _senders, null);
            contactWork.AddRange(senders.Close());
            _client.EndReadingDeliveries();
            _client.SubscriptionEnded -= Ended;
            _client.SubscriptionRefused -= Refused;
            _client.DeliveryRejected -= Rejected;
            _client.ConnectionFailed -= ConnectionFailed;
            _client.ConnectionMade -= ConnectionMade;
            // The waits hold registrations on the token and waiters on the channels: end them. ACKs
            // not sent yet (waiting for a connection) are given up: their messages come again later
            // and are absorbed.
            stop.Cancel();
            foreach (var wait in new[] { nextDelivery, nextNotice, nextSettled })
            {
                try
                {
                    if (wait != null) await wait.ConfigureAwait(false);
                }
                catch (OperationCanceledException)
                {
                }
            }
            foreach (var ack in acks)
            {
                try
                {
                    await ack.ConfigureAwait(false);
                }
                catch (Exception)
                {
                    // Listening is over; an ACK's failure changes nothing (see AckAsync).
                }
            }
            // Subscriptions and outboxes still waiting for their relays: given up (Watch absorbs the cancellation).
            await Task.WhenAll(contactWork).ConfigureAwait(false);
        }
    }

    /// <summary>Subscribes a contact's queue (retried while its relay cannot be reached); a refusal is reported for that contact only.</summary>
    private async Task SubscribeContactAsync(ContactData contact, ChannelWriter<ConversationEvent> events, CancellationToken cancellationToken)
    {
        try
        {
            await _client.SubscribeAsync(RelayAddress.Parse(contact.ReceiveRelay), ReceiveQueue(contact), cancellationToken).ConfigureAwait(false);
        }
        catch (RelayErrorException ex)
        {
            events.TryWrite(new ContactUnavailable(contact.Name, ex.Message));
        }
        catch (RelayConnectException) when (!cancellationToken.IsCancellationRequested)
        {
            // Given up after RetryFor (or the relay is not the one its address names, or refused the
            // handshake): reported when the attempt failed (RelayClient.ConnectionFailed, watched by ListenAsync). The queue stays
            // subscribed unless the relay refuses it: its messages come if the relay is reached later.
        }
    }

    /// <summary>
    /// While <see cref="ListenAsync"/> runs: a task per contact that sends the contact's outbox each time
    /// it is woken (<see cref="Wake"/>), started on the first wake-up.
    /// </summary>
    private sealed class OutboxSenders(Func<string, ChannelReader<bool>, Task> start)
    {
        private readonly Dictionary<string, Channel<bool>> _wakes = [];
        private readonly List<Task> _tasks = [];
        private bool _closed;

        /// <summary>The contact's outbox has work (envelopes to send, drops to report): its sender sends it, now or after the sending under way.</summary>
        public void Wake(string contactName)
        {
            lock (_wakes)
            {
                if (_closed) return;
                if (!_wakes.TryGetValue(contactName, out var wake))
                {
                    // One pending wake-up is enough: the sender reads the whole outbox.
                    wake = Channel.CreateBounded<bool>(new BoundedChannelOptions(1) { FullMode = BoundedChannelFullMode.DropWrite });
                    _wakes[contactName] = wake;
                    _tasks.Add(Task.Run(() => start(contactName, wake.Reader)));
                }
                wake.Writer.TryWrite(true);
            }
        }

        /// <summary>No sender starts after this; returns the ones started (they end with the listener's cancellation).</summary>
        public List<Task> Close()
        {
            lock (_wakes)
            {
                _closed = true;
                return [.. _tasks];
            }
        }
    }

    /// <summary>
    /// A contact's outbox sender while listening: each time it is woken, sends the outbox; while the
    /// relay refuses the oldest envelope for now (QUOTA, FULL, …), cannot be reached or is not the relay
    /// its address names, reports it as <see cref="OutboxStalled"/> (again only when the kind of failure
    /// changes) and tries again with back-off (from <see cref="RelayClientOptions.ReconnectMin"/> to
    /// <see cref="RelayClientOptions.ReconnectMax"/>) until the outbox is empty. Each try is one attempt
    /// (see <see cref="SendCommandAsync"/>), so the report does not wait for
    /// <see cref="RelayClientOptions.RetryFor"/>, unset by default (for ever). Envelopes
    /// the relay refuses for good are reported as <see cref="MessageDropped"/>.
    /// </summary>
    private async Task SendOutboxAsync(string contactName, ChannelReader<bool> wake, ChannelWriter<ConversationEvent> events, CancellationToken cancellationToken)
    {
        while (true)
        {
            await wake.ReadAsync(cancellationToken).ConfigureAwait(false);
            await SendOutboxOnceAsync(contactName, events, cancellationToken).ConfigureAwait(false);
        }
    }

    private async Task SendOutboxOnceAsync(string contactName, ChannelWriter<ConversationEvent> events, CancellationToken cancellationToken)
    {
        var wait = _client.Options.ReconnectMin;
        string? reported = null;
        while (true)
        {
            string kind, reason;
            var gate = Gate(contactName);
            await gate.WaitAsync(cancellationToken).ConfigureAwait(false);
            try
            {
                // Each command one attempt: this loop backs off and reports, so a relay that cannot be
                // reached is told to the app (RetryFor, which bounds the app's own calls, plays no part).
                await FlushOutboxLockedAsync(contactName, null, attempt: true, cancellationToken).ConfigureAwait(false);
                ReportDropped(contactName, events);
                return;
            }
            catch (Exception ex) when (AttemptFailed(ex, cancellationToken))
            {
                (kind, reason) = DescribeFailure(ex, $"this contact's relay {SendRelayOf(contactName)}");
                if (ex is not RelayErrorException)
                {
                    reason += "; listening goes on trying";
                }
            }
            finally
            {
                gate.Release();
            }
            ReportDropped(contactName, events);
            if (kind != reported)
            {
                int waiting = _store.Load().Find(contactName)?.Outbox.Count ?? 0;
                if (waiting == 0) return;
                events.TryWrite(new OutboxStalled(contactName, waiting, reason));
                reported = kind;
            }
            await Task.Delay(wait, cancellationToken).ConfigureAwait(false);
            wait = NextWait(wait);
        }
    }

    /// <summary>
    /// Whether <paramref name="ex"/> ended one attempt of a retried relay command (a listener's outbox
    /// sender, a join's SKEY) rather than the listener: the relay refused (any code; a caller tells
    /// refusals for good apart first), could not be reached, is not the relay its address names, or
    /// did not answer within the attempt's time.
    /// </summary>
    private static bool AttemptFailed(Exception ex, CancellationToken cancellationToken) =>
        ex is RelayErrorException || (ex is RelayConnectException or OperationCanceledException && !cancellationToken.IsCancellationRequested);

    /// <summary>
    /// A failed attempt (<see cref="AttemptFailed"/>) as a kind, reported once while it stays the same,
    /// and a reason for the app; <paramref name="relay"/> names the relay ("this contact's relay relay://…").
    /// </summary>
    private (string Kind, string Reason) DescribeFailure(Exception ex, string relay) => ex switch
    {
        RelayErrorException e => ($"refused {e.Code}", e.Message),
        FingerprintMismatchException => (nameof(FingerprintMismatchException),
            $"the server at the address of {relay} is not the relay it names ({ex.Message}): the relay was replaced, or someone on the way answers for it"),
        RelayConnectException => (nameof(RelayConnectException), $"{relay} cannot be reached ({ex.Message})"),
        _ => ("timeout", $"{relay} cannot be reached (no answer within {_client.Options.ConnectTimeout.TotalSeconds:0.#} s)"),
    };

    /// <summary>The next wait of a retry loop: twice the last, up to <see cref="RelayClientOptions.ReconnectMax"/>.</summary>
    private TimeSpan NextWait(TimeSpan wait)
    {
        long most = Math.Max(_client.Options.ReconnectMax.Ticks, TimeSpan.TicksPerMillisecond);
        return TimeSpan.FromTicks(Math.Clamp(wait.Ticks * 2, TimeSpan.TicksPerMillisecond, most));
    }

    /// <summary>The address of the relay the contact is sent to, as saved (for a report).</summary>
    private string SendRelayOf(string contactName) => _store.Load().Find(contactName)?.SendRelay ?? "(none)";

    /// <summary>Reports (once) the envelopes of the contact's outbox dropped since the last report.</summary>
    private void ReportDropped(string contactName, ChannelWriter<ConversationEvent> events)
    {
        if (_store.Load().Find(contactName) is not { Dropped.Count: > 0 }) return;
        var reasons = _store.Update(profile =>
        {
            if (profile.Find(contactName) is not { } c) return [];
            var taken = c.Dropped;
            c.Dropped = [];
            return taken;
        });
        foreach (var reason in reasons)
        {
            events.TryWrite(new MessageDropped(contactName, reason));
        }
    }

    /// <summary>
    /// Tells the listening <see cref="ListenAsync"/> that the app has handled the events it yielded
    /// last: their delivery is saved and acknowledged now, as it would be when the app asks for the
    /// next event. For an app that leaves the loop after handling an event (<c>break</c>, <c>return</c>):
    /// call it first, or the event comes again with the next <see cref="ListenAsync"/>. Call it from
    /// the loop's body; it does nothing for an event that needs no acknowledgement (a report on a
    /// contact), and throws <see cref="InvalidOperationException"/> when no ListenAsync is listening.
    /// A failure to save the state (the profile cannot be written) is thrown, and the events come again.
    /// </summary>
    public void Acknowledge()
    {
        if (Volatile.Read(ref _listening) == 0)
        {
            throw new InvalidOperationException("nothing to acknowledge: no ListenAsync is listening (acknowledge inside the loop, before leaving it)");
        }
        Volatile.Read(ref _acknowledge)?.Invoke();
    }

    /// <summary>Acknowledges a handled delivery; what the relay answers changes nothing for the saved state.</summary>
    private async Task AckAsync(QueueDelivery delivery, CancellationToken cancellationToken)
    {
        try
        {
            await RunAsync(delivery.Relay, c => c.AckAsync(delivery.Queue, delivery.Delivery.MessageId, cancellationToken), cancellationToken).ConfigureAwait(false);
        }
        catch (RelayErrorException ex) when (ex.Code is ErrorCode.NoMsg or ErrorCode.Internal or ErrorCode.Auth)
        {
            // NO_MSG: acknowledged through an earlier connection, or out of order after a reconnection.
            // INTERNAL: the relay could not write it and delivers the message again (PROTOCOL.md §6).
            // AUTH: the queue is gone or another device took it (reported as ContactUnavailable).
            // The state is saved either way: a message still stored comes again and is absorbed.
        }
        catch (FingerprintMismatchException)
        {
            // The server at the relay's address is another one (reported as ContactUnavailable): not
            // retried by RunAsync, and no reason to stop listening; the message comes again from the
            // real relay and is absorbed, as after a lost ACK.
        }
    }

    /// <summary>Drops finished ACKs; one that failed otherwise (the client given up or disposed) ends listening, as before.</summary>
    private static async Task ObserveAcksAsync(List<Task> acks)
    {
        for (int i = acks.Count - 1; i >= 0; i--)
        {
            if (!acks[i].IsCompleted) continue;
            var done = acks[i];
            acks.RemoveAt(i);
            await done.ConfigureAwait(false);
        }
    }

    /// <summary>The inviter's sender key for the joiner's queue: HMAC-SHA256(ownPrivate, "relay/1 join sender key" ‖ senderId).</summary>
    internal static byte[] JoinSenderKey(byte[] ownPrivate, ReadOnlySpan<byte> peerSenderId)
    {
        Span<byte> input = stackalloc byte[JoinSenderKeyLabel.Length + 24];
        JoinSenderKeyLabel.CopyTo(input);
        peerSenderId.CopyTo(input[JoinSenderKeyLabel.Length..]);
        return HMACSHA256.HashData(ownPrivate, input);
    }

    private static ReadOnlySpan<byte> JoinSenderKeyLabel => "relay/1 join sender key"u8;

    private static RecipientQueue ReceiveQueue(ContactData c) => new(c.RecipientId, c.ReceiveSenderId, c.RecipientPrivate, c.DeliveryKey);

    /// <summary>
    /// A delivery handled: the events to yield and the contact's new state, saved (by <see cref="Save"/>)
    /// only once the app has handled the events. A JOIN's state is saved before its event is yielded.
    /// A JOIN whose SKEY of the joiner's queue is not settled yet is not handled: <see cref="Join"/>
    /// says what to secure, and the delivery is held (see <see cref="PendingJoin"/>).
    /// </summary>
    private sealed class Handled(QueueDelivery delivery, List<ConversationEvent> events, string? contact = null, Action<ContactData>? save = null)
    {
        public QueueDelivery Delivery { get; } = delivery;
        public List<ConversationEvent> Events { get; } = events;
        public string? Contact { get; } = contact;
        public Action<ContactData>? Save { get; } = save;
        public JoinRequest? Join { get; init; }
        public bool Committed { get; set; }
    }

    private Handled Process(QueueDelivery delivery)
    {
        var envelope = delivery.Delivery.Body;
        var rid = delivery.Queue.RecipientId;
        var contact = _store.Load().Contacts.FirstOrDefault(c => c.RecipientId.AsSpan().SequenceEqual(rid));
        if (contact is null) return new Handled(delivery, []);
        var events = new List<ConversationEvent>();
        if (!E2eCrypto.TryReadHeader(envelope, out byte kind, out _, out var joinerKeySpan))
        {
            events.Add(new MessageRejected(contact.Name, EnvelopeError.Malformed, "not an envelope of this protocol (wrong length, version or kind)"));
            return new Handled(delivery, events);
        }
        if (kind == E2eCrypto.KindJoin && contact.Status == ContactStatus.Invited && contact.Inviter)
        {
            var joinerKey = joinerKeySpan.ToArray();
            byte[] j2i, i2j;
            try
            {
                (j2i, i2j) = E2eCrypto.InitialChains(contact.OwnPrivate, joinerKey, contact.OwnPublic, joinerKey);
            }
            catch (CryptographicException ex)
            {
                events.Add(new MessageRejected(contact.Name, EnvelopeError.Malformed, ex.Message));
                return new Handled(delivery, events);
            }
            ulong expected = 0;
            var error = E2eCrypto.TryOpen(envelope, ref expected, j2i, out var content, out _);
            if (error != EnvelopeError.None || content.Length < 2 + 24)
            {
                events.Add(new MessageRejected(contact.Name, error == EnvelopeError.None ? EnvelopeError.Malformed : error, "invalid join message"));
                return new Handled(delivery, events);
            }
            int addressLength = BinaryPrimitives.ReadUInt16BigEndian(content);
            if (content.Length != 2 + addressLength + 24 ||
                !RelayAddress.TryParse(Encoding.UTF8.GetString(content, 2, addressLength), out var peerRelay, out _))
            {
                events.Add(new MessageRejected(contact.Name, EnvelopeError.Malformed, "the join message names no valid relay"));
                return new Handled(delivery, events);
            }
            var peerSenderId = content.AsSpan(2 + addressLength, 24).ToArray();
            byte[] joinHash = SHA256.HashData(envelope);
            if (!_joins.TryGetValue(contact.Name, out var join) || !join.SettledFor(joinHash))
            {
                // The joiner's queue is secured away from the deliveries' handling (SecureJoinAsync): its
                // relay may be down, or refuse for now, which must hold up no other contact. The JOIN
                // is held meanwhile, neither saved nor acknowledged, and handled here again once settled.
                // The key is derived, not drawn: a JOIN processed again (the process stopped before
                // saving) secures the queue with the same key, which SKEY accepts again (PROTOCOL.md §11.1).
                var senderKey = JoinSenderKey(contact.OwnPrivate, peerSenderId);
                return new Handled(delivery, events) { Join = new JoinRequest(contact.Name, peerRelay, peerSenderId, senderKey, joinHash) };
            }
            if (join.Refused is { } refused)
            {
                // Secured with another key already (or no such queue): not this contact's JOIN to
                // complete. Any other refusal (INTERNAL, FULL, LIMIT) is tried again (SecureJoinAsync).
                events.Add(new MessageRejected(contact.Name, EnvelopeError.Malformed, "the joiner's queue cannot be secured: " + refused));
                return new Handled(delivery, events);
            }
            var senderPrivate = join.Request.SenderPrivate;
            _store.Update(profile =>
            {
                var c = profile.Find(contact.Name)!;
                c.Status = ContactStatus.Joined;
                c.ReceivedThrough = delivery.Delivery.MessageId;
                c.PeerPublic = joinerKey;
                c.SendRelay = peerRelay.ToString();
                c.SendSenderId = peerSenderId;
                c.SenderPrivate = senderPrivate;
                c.SendMaxMessage = LearnedMaxMessage(peerRelay);
                c.SendChain = i2j;
                c.SendCounter = 0;
                c.ReceiveChain = j2i;
                c.ReceiveCounter = expected;
                c.LastAccepted = joinHash;
                return 0;
            });
            events.Add(new ContactJoined(contact.Name));
            return new Handled(delivery, events);
        }
        if (contact.ReceiveChain is null)
        {
            events.Add(new MessageRejected(contact.Name, EnvelopeError.Malformed, "a message before the contact joined"));
            return new Handled(delivery, events);
        }
        // The contact's new receiving state is computed here and saved only once the app has handled
        // the events (see Handled): a message not handled is still new to the saved state when it comes again.
        var c = contact;
        ulong id = delivery.Delivery.MessageId;
        if (id <= c.ReceivedThrough)
        {
            // Delivered again (its ACK was lost, or the relay restarted before the delete was on
            // disk): processed already, so nothing to report; the caller acknowledges it again.
            return new Handled(delivery, events);
        }
        void Seen(ContactData saved) => saved.ReceivedThrough = id;
        byte[] hash = SHA256.HashData(envelope);
        if (c.LastAccepted is { } last && hash.AsSpan().SequenceEqual(last))
        {
            // The envelope accepted last, stored again: the contact sent it again after its SEND's
            // answer was lost (PROTOCOL.md §11.4). Processed already; acknowledged like a redelivery.
            return new Handled(delivery, events, c.Name, Seen);
        }
        var chain = (byte[])c.ReceiveChain!.Clone();
        ulong next = c.ReceiveCounter;
        if (kind == E2eCrypto.KindJoin)
        {
            // A JOIN after the conversation opened: a redelivery or a replay.
            events.Add(new MessageRejected(c.Name, EnvelopeError.Replayed, "replayed join message"));
            return new Handled(delivery, events, c.Name, Seen);
        }
        {
            var error = E2eCrypto.TryOpen(envelope, ref next, chain, out var content, out var skipped);
            switch (error)
            {
                case EnvelopeError.None:
                    if (skipped > 0) events.Add(new MessagesMissing(c.Name, skipped));
                    if (content.Length >= 1 && content[0] == ContentText)
                    {
                        var hour = DateTimeOffset.FromUnixTimeSeconds((long)delivery.Delivery.Hour * 3600);
                        events.Add(new MessageReceived(c.Name, Encoding.UTF8.GetString(content, 1, content.Length - 1), hour, next - 1));
                    }
                    break;
                case EnvelopeError.Replayed:
                    events.Add(new MessageRejected(c.Name, error, "replayed or reordered message: the conversation has already moved past it"));
                    break;
                case EnvelopeError.Tampered:
                    events.Add(new MessageRejected(c.Name, error, "message failed authentication: altered in transit or not from this contact"));
                    break;
                case EnvelopeError.Reordered:
                    events.Add(new MessageRejected(c.Name, error, $"message too far ahead (more than {E2eCrypto.MaxSkip} missing)"));
                    break;
                default:
                    events.Add(new MessageRejected(c.Name, error, "malformed message"));
                    break;
            }
            if (error != EnvelopeError.None)
            {
                // Refused: the state does not change, beyond the delivery being done with.
                return new Handled(delivery, events, c.Name, Seen);
            }
            return new Handled(delivery, events, c.Name, saved =>
            {
                saved.ReceivedThrough = id;
                saved.ReceiveChain = chain;
                saved.ReceiveCounter = next;
                saved.LastAccepted = hash;
            });
        }
    }

    public async ValueTask DisposeAsync()
    {
        if (_ownsClient)
        {
            await _client.DisposeAsync().ConfigureAwait(false);
        }
    }
}
