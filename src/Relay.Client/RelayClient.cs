using System.Collections.Concurrent;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Threading.Channels;
using Relay.Client.Transport;
using Relay.Protocol;

namespace Relay.Client;

/// <summary>
/// How a <see cref="RelayClient"/> connects and keeps its connections. A value out of its documented
/// range is refused when it is set (<see cref="ArgumentOutOfRangeException"/> naming the option), and
/// a <see cref="ReconnectMin"/> above <see cref="ReconnectMax"/> when the client is made
/// (<see cref="ArgumentException"/>): such a value would otherwise make every connection or every
/// renewed subscription fail, or the reconnections spin, for as long as the app runs.
/// </summary>
public sealed class RelayClientOptions
{
    /// <summary>
    /// SOCKS5 proxy (host:port) for every relay connection: Tor, shadowsocks' ss-local. The proxy
    /// resolves the relay's host name (see <see cref="Transport.Socks5"/>: an internationalized name
    /// must be written in its ASCII form, xn--…). Null (the default) connects directly. A value that is
    /// not host:port (an IPv6 address in brackets, the port 1 to 65535) is refused when it is set
    /// (<see cref="ArgumentException"/> naming the option).
    /// </summary>
    public string? Socks { get; init => field = RelayConnectionOptions.CheckSocks(value); }

    /// <summary>False only for relays run with plain TCP.</summary>
    public bool Tls { get; init; } = true;

    /// <summary>
    /// PING interval, and how long a connection may show no sign of life after a PING before it is
    /// replaced. Signs of life: any frame from the relay (the PONG among them), and, until the PING is
    /// written, the link taking the bytes written before it. So the wait for the PONG counts from when
    /// the PING was written to the connection, not from when it was queued behind an upload: a SEND
    /// that takes many KeepAlive periods on a slow link (1 MiB at 20 KB/s) keeps its connection while
    /// the link moves, and a link that stops is still found within KeepAlive. Keep it under 60 s: a
    /// relay closes a connection it has read nothing from for its idle timeout, which may be as short
    /// as 60 s (deliveries to the client do not count; PROTOCOL.md §3). From 1 ms to 49 days.
    /// </summary>
    public TimeSpan KeepAlive { get; init => field = Timer(value, nameof(KeepAlive)); } = TimeSpan.FromSeconds(30);

    /// <summary>
    /// How long an attempt to connect may take (TCP or SOCKS5, TLS, the handshake), and then the renewal
    /// of the subscriptions on the connection it made. From 1 ms to 49 days.
    /// </summary>
    public TimeSpan ConnectTimeout { get; init => field = Timer(value, nameof(ConnectTimeout)); } = TimeSpan.FromSeconds(30);

    /// <summary>
    /// Back-off between reconnection attempts: doubles from the first value up to the second, each wait
    /// drawn from the upper half of its step; a connection lost before it lasted the second value counts
    /// as a failed attempt (the back-off goes on growing), one that lasted is replaced after about the first.
    /// Each from 1 ms to 49 days, the first not above the second (checked when the client is made).
    /// </summary>
    public TimeSpan ReconnectMin { get; init => field = Timer(value, nameof(ReconnectMin)); } = TimeSpan.FromMilliseconds(100);

    /// <inheritdoc cref="ReconnectMin"/>
    public TimeSpan ReconnectMax { get; init => field = Timer(value, nameof(ReconnectMax)); } = TimeSpan.FromSeconds(10);

    /// <summary>
    /// Messages of each subscribed queue that may arrive before the first is ACKed (SUB's delivery
    /// window, 1 to 64). The default, 32, saves a round trip per message when a backlog drains (over
    /// Tor about 1.6 times faster); 1 delivers one at a time. ACKs must follow delivery order.
    /// </summary>
    public int DeliveryWindow
    {
        get;
        init
        {
            if (value < 1 || value > ProtocolConstants.MaxDeliveryWindow)
            {
                throw new ArgumentOutOfRangeException(nameof(DeliveryWindow), value,
                    $"{nameof(DeliveryWindow)} must be from 1 to {ProtocolConstants.MaxDeliveryWindow}");
            }
            field = value;
        }
    } = 32;

    /// <summary>
    /// How long <see cref="RelayClient.RunAsync{T}"/> and subscriptions keep trying to reach a relay
    /// before they give up with the last <see cref="RelayConnectException"/>, counted from the call (calls
    /// made together give up together: a call that waited that long for another's attempts is told
    /// their failure). Null (the default):
    /// for ever, with back-off (a long-running app); a one-shot tool sets a bound. Zero makes one attempt;
    /// a negative value is refused (null, not <see cref="Timeout.InfiniteTimeSpan"/>, means for ever).
    /// </summary>
    public TimeSpan? RetryFor
    {
        get;
        init
        {
            if (value < TimeSpan.Zero)
            {
                throw new ArgumentOutOfRangeException(nameof(RetryFor), value,
                    $"{nameof(RetryFor)} must be zero or more, or null to try for ever");
            }
            field = value;
        }
    }

    // The times set timers (1 ms to 49 days): the check RelayConnectionOptions.ConnectTimeout uses.
    private static TimeSpan Timer(TimeSpan value, string name) => RelayConnectionOptions.CheckTimer(value, name);

    /// <summary>What cannot be checked as each option is set: throws <see cref="ArgumentException"/>.</summary>
    internal void Check()
    {
        if (ReconnectMin > ReconnectMax)
        {
            throw new ArgumentException(
                $"{nameof(ReconnectMin)} ({ReconnectMin}) must not be above {nameof(ReconnectMax)} ({ReconnectMax})", "options");
        }
    }
}

/// <summary>A message that arrived on one of the subscribed queues of some relay.</summary>
public sealed record QueueDelivery(RelayAddress Relay, RecipientQueue Queue, Delivery Delivery);

/// <summary>
/// Connections to many relays at once: one per relay, opened on first use, re-opened with back-off
/// when lost, with every subscription renewed, and kept alive with PINGs. Deliveries of all
/// subscribed queues of all relays arrive on one stream. Of an address with several hosts the first
/// is dialled, and after a failed attempt the next, in turn. A relay that does not present the identity
/// of its address (<see cref="FingerprintMismatchException"/>: a relay replaced, or a hostile network on
/// the way) is never used: <see cref="ConnectAsync"/>, <see cref="RunAsync{T}"/> and
/// <see cref="SubscribeAsync"/> throw that at once, while the connection that brings the deliveries
/// goes on trying with back-off, so the subscriptions come back when the way to the real relay does.
/// Every failed attempt to connect, whoever made it (an app's call or the reconnection that brings
/// the deliveries), is reported through <see cref="ConnectionFailed"/>, and every connection made
/// through <see cref="ConnectionMade"/>: an app that only reads <see cref="DeliveriesAsync"/> learns
/// from them that a relay cannot be reached, or is not the one its address names.
/// </summary>
public sealed class RelayClient : IAsyncDisposable
{
    private readonly ConcurrentDictionary<string, RelayLink> _links = new();
    private readonly DeliveryStream _deliveries = new();
    private readonly CancellationTokenSource _disposed = new();

    public RelayClientOptions Options { get; }

    /// <summary>
    /// A client with <paramref name="options"/> (the defaults when null). Throws
    /// <see cref="ArgumentException"/> for a <see cref="RelayClientOptions.ReconnectMin"/> above
    /// <see cref="RelayClientOptions.ReconnectMax"/>.
    /// </summary>
    public RelayClient(RelayClientOptions? options = null)
    {
        Options = options ?? new RelayClientOptions();
        Options.Check();
    }

    private RelayLink Link(RelayAddress relay) =>
        _links.GetOrAdd(relay.ToString(), _ => new RelayLink(this, relay));

    /// <summary>
    /// The live connection to <paramref name="relay"/>, connecting (once) if there is none. While the
    /// client is connecting to it again already (the connection that brings the deliveries, through its
    /// back-off), this throws at once what that connection's last attempt met (or its next, if none
    /// failed yet), rather than waiting for it. Cancelled, it throws <see cref="OperationCanceledException"/>
    /// for <paramref name="cancellationToken"/>, also when the attempt failed as the token was
    /// cancelled (that failure, reported through <see cref="ConnectionFailed"/>, its inner exception);
    /// stopped by <see cref="DisposeAsync"/>, <see cref="ObjectDisposedException"/>.
    /// </summary>
    public Task<RelayConnection> ConnectAsync(RelayAddress relay, CancellationToken cancellationToken = default) =>
        Link(relay).GetAsync(retry: false, cancellationToken);

    /// <summary>
    /// Runs <paramref name="operation"/> on the relay's connection; when the connection is lost
    /// before an answer, reconnects and runs it again (until cancelled). Relay errors (ERR) are not retried.
    /// Cancelled, it throws <see cref="OperationCanceledException"/> for <paramref name="cancellationToken"/>,
    /// also when the connection was lost, or an attempt to connect failed, as the token was cancelled
    /// (that failure its inner exception); stopped by <see cref="DisposeAsync"/>, <see cref="ObjectDisposedException"/>.
    /// </summary>
    public async Task<T> RunAsync<T>(RelayAddress relay, Func<RelayConnection, Task<T>> operation, CancellationToken cancellationToken = default)
    {
        var link = Link(relay);
        while (true)
        {
            var connection = await link.GetAsync(retry: true, cancellationToken).ConfigureAwait(false);
            try
            {
                return await operation(connection).ConfigureAwait(false);
            }
            // Lost: the connection's Failure is set before any request fails for it, and before
            // Closed is cancelled (a request made in between fails at once).
            catch (RelayConnectException lost) when (connection.Failure is not null)
            {
                link.Drop(connection);
                // Cancelled meanwhile: the app's token, not the lost connection, is why this call
                // stops here (it would otherwise run the operation again on the next connection).
                if (cancellationToken.IsCancellationRequested)
                {
                    throw new OperationCanceledException(lost.Message, lost, cancellationToken);
                }
            }
        }
    }

    public Task RunAsync(RelayAddress relay, Func<RelayConnection, Task> operation, CancellationToken cancellationToken = default) =>
        RunAsync(relay, async c => { await operation(c).ConfigureAwait(false); return true; }, cancellationToken);

    /// <summary>Forgets a connection of <see cref="ConnectAsync"/> found lost (its Failure set), if it is still the current one, so the next call connects anew.</summary>
    internal void Drop(RelayAddress relay, RelayConnection connection) => Link(relay).Drop(connection);

    /// <summary>
    /// Subscribes a queue; it stays subscribed across reconnections until <see cref="Unsubscribe"/>.
    /// Cancelled (<see cref="OperationCanceledException"/>), it leaves a queue that was not subscribed
    /// unsubscribed, as if it had not been called (a SUB that reached the relay meanwhile is let go:
    /// its deliveries are not handed out, and the next call subscribes again), and one that was, or
    /// that another call is subscribing, as it is. A relay that refuses the SUB (AUTH, LIMIT) throws its
    /// <see cref="RelayErrorException"/>, and the queue is not subscribed. A relay that refuses the
    /// handshake (ERR VERSION, say) has refused a connection, not the queue: that is thrown as a
    /// <see cref="RelayConnectException"/> whose inner exception is the relay's
    /// <see cref="RelayErrorException"/>, and the queue stays subscribed, subscribed on the relay once a
    /// connection is made.
    /// </summary>
    public async Task SubscribeAsync(RelayAddress relay, RecipientQueue queue, CancellationToken cancellationToken = default)
    {
        var link = Link(relay);
        bool wasSubscribed = link.BeginSubscribing(queue);
        link.EnsurePump();
        // The SUB's own refusal, told from a refusal of the handshake (which comes before any operation).
        RelayErrorException? refused = null;
        bool decided = false;
        void Decide(bool value)
        {
            if (decided == value) return;
            decided = value;
            link.Decided(queue, value);
        }
        async Task Subscribe(RelayConnection c)
        {
            // The connection registers the queue before it writes the SUB: from here on it receives it.
            var subscribed = c.IsSubscribed(queue) ? Task.CompletedTask : c.SubscribeAsync(queue, Options.DeliveryWindow, cancellationToken);
            Decide(true);
            try
            {
                await subscribed.ConfigureAwait(false);
            }
            catch (RelayErrorException ex)
            {
                refused = ex;
                throw;
            }
            catch (RelayConnectException)
            {
                // Lost before the answer: RunAsync tries again on the next connection, where this call
                // finds the queue renewed or sends its SUB anew.
                Decide(false);
                throw;
            }
        }
        try
        {
            await RunAsync(relay, Subscribe, cancellationToken).ConfigureAwait(false);
        }
        catch (RelayErrorException ex) when (ex == refused)
        {
            // Refused (AUTH, LIMIT): not subscribed, and not renewed after a reconnection either.
            link.Forget(queue.RecipientId);
            throw;
        }
        catch (RelayErrorException handshake)
        {
            // The relay refused the handshake: a failed connection (reported through ConnectionFailed),
            // after which the delivery pump tries again; the queue is renewed on the connection it makes.
            throw new RelayConnectException(handshake.Message, handshake);
        }
        catch (OperationCanceledException)
        {
            link.SubscribeCancelled(queue, wasSubscribed);
            throw;
        }
        finally
        {
            link.EndSubscribing(queue, decided);
        }
    }

    /// <summary>
    /// Stops handing the queue's deliveries to the app and renewing its subscription. Its messages
    /// stay on the relay (relay/1 has no command that ends a subscription: the relay's lasts until the
    /// connection ends); a later <see cref="SubscribeAsync"/> subscribes it again, and the relay
    /// delivers again from its oldest message not acknowledged, so nothing that arrived meanwhile is missed.
    /// </summary>
    public void Unsubscribe(RelayAddress relay, RecipientQueue queue) =>
        Link(relay).Forget(queue.RecipientId);

    /// <summary>
    /// Raised when a relay refuses to renew a subscription after a reconnection (the queue was deleted
    /// meanwhile: AUTH; too many subscriptions: LIMIT). The queue is no longer subscribed; the other
    /// queues of that relay go on. Runs on the reconnecting task: keep it short.
    /// </summary>
    public event Action<RelayAddress, RecipientQueue, RelayErrorException>? SubscriptionRefused;

    /// <summary>Runs an app's event handlers; one that throws must not stop the reconnection or the deliveries.</summary>
    private static void Raise(Action raise)
    {
        try
        {
            raise();
        }
        catch
        {
            // The app's problem: the queue's state is already what the event says.
        }
    }

    private void OnSubscriptionRefused(RelayAddress relay, RecipientQueue queue, RelayErrorException refused) =>
        Raise(() => SubscriptionRefused?.Invoke(relay, queue, refused));

    /// <summary>
    /// Raised when a relay ends a subscription (END): another connection subscribed the queue (another
    /// device of the same recipient) or the queue was deleted. The queue is no longer subscribed and is
    /// not renewed after a reconnection, so two devices do not take it from each other for ever;
    /// <see cref="SubscribeAsync"/> takes it back. Raised also for an END read just before its
    /// connection was lost (the keep-alive replacing it), unless the connection that replaced it had
    /// already renewed the queue (taken it back: the other device is told then), and for the
    /// subscription a SubscribeAsync has just made, possibly before that call returns (two devices
    /// subscribing at the same moment: the relay keeps the SUB it read last). Runs on the delivery
    /// pump: keep it short.
    /// </summary>
    public event Action<RelayAddress, RecipientQueue>? SubscriptionEnded;

    private void OnSubscriptionEnded(RelayAddress relay, RecipientQueue queue) =>
        Raise(() => SubscriptionEnded?.Invoke(relay, queue));

    /// <summary>
    /// Raised when a delivery of a subscribed queue fails its integrity check: the app's delivery key
    /// for it is not the queue's (damaged or mixed-up data), or the relay does not follow the protocol.
    /// The queue is no longer subscribed (retrying cannot help) and its messages stay on the relay; the
    /// other queues go on. Not raised for a failure the client handles once the queue is subscribed
    /// again (by a <see cref="SubscribeAsync"/> under way or done, or renewed on a connection that
    /// replaced the one that read the delivery): it concerned the subscription replaced, and the queue
    /// stays subscribed, its new subscription's deliveries checked alike. Runs on the delivery pump:
    /// keep it short.
    /// </summary>
    public event Action<RelayAddress, RecipientQueue, string>? DeliveryRejected;

    private void OnDeliveryRejected(RelayAddress relay, RecipientQueue queue, string reason) =>
        Raise(() => DeliveryRejected?.Invoke(relay, queue, reason));

    /// <summary>
    /// Raised on every failed attempt to connect to a relay, whoever made it: a call of the app's
    /// (<see cref="ConnectAsync"/>, <see cref="RunAsync{T}"/>, <see cref="SubscribeAsync"/>) or the
    /// reconnection that brings a relay's deliveries, which goes on with back-off after it. The exception
    /// says why: a <see cref="FingerprintMismatchException"/> (the server at the address is not the relay
    /// it names: the relay was replaced, or someone on the way answers for it; nothing is sent to it),
    /// another <see cref="RelayConnectException"/> (network, proxy, TLS, a timeout, a relay that does not
    /// answer the renewed subscriptions), or a <see cref="RelayErrorException"/> (the relay refused the
    /// handshake). A call the app cancels is not a failure. With <see cref="ConnectionMade"/> it tells an
    /// app whether each relay is reachable ("offline" after this, "online" after that). Runs on the
    /// connecting task, before the attempt's caller hears of it: keep it short, and do not wait there for
    /// this client.
    /// </summary>
    public event Action<RelayAddress, Exception>? ConnectionFailed;

    private void OnConnectionFailed(RelayAddress relay, Exception failure) =>
        Raise(() => ConnectionFailed?.Invoke(relay, failure));

    /// <summary>
    /// Raised when a connection to a relay is made (the first, and each one that replaces a connection
    /// lost), once the subscriptions of that relay are renewed on it. Runs on the connecting task: keep
    /// it short, and do not wait there for this client.
    /// </summary>
    public event Action<RelayAddress>? ConnectionMade;

    private void OnConnectionMade(RelayAddress relay) =>
        Raise(() => ConnectionMade?.Invoke(relay));

    /// <summary>Whether <paramref name="recipientId"/> is among the subscriptions kept for <paramref name="relay"/>.</summary>
    internal bool IsSubscribed(RelayAddress relay, byte[] recipientId) =>
        _links.TryGetValue(relay.ToString(), out var link) && link.Subscriptions.ContainsKey(recipientId);

    /// <summary>
    /// Every delivery of every subscribed queue, in arrival order per queue. One reader at a time
    /// (this or a <see cref="Conversations.Messenger"/> listening through this client): two would
    /// each miss what the other took. A second one throws <see cref="InvalidOperationException"/>.
    /// </summary>
    public async IAsyncEnumerable<QueueDelivery> DeliveriesAsync([EnumeratorCancellation] CancellationToken cancellationToken = default)
    {
        BeginReadingDeliveries();
        try
        {
            await foreach (var delivery in _deliveries.ReadAllAsync(cancellationToken).ConfigureAwait(false))
            {
                yield return delivery;
            }
        }
        finally
        {
            EndReadingDeliveries();
        }
    }

    /// <summary>The delivery stream itself, for a reader that takes an item only when it is ready to handle it.</summary>
    internal ChannelReader<QueueDelivery> Deliveries => _deliveries;

    private int _deliveryReader;

    /// <summary>Claims the delivery stream for one reader (see <see cref="DeliveriesAsync"/>).</summary>
    internal void BeginReadingDeliveries()
    {
        if (Interlocked.Exchange(ref _deliveryReader, 1) != 0)
        {
            throw new InvalidOperationException("this client's deliveries already have a reader: one DeliveriesAsync or Messenger.ListenAsync at a time");
        }
    }

    internal void EndReadingDeliveries() => Volatile.Write(ref _deliveryReader, 0);

    private int _disposeCalled;

    /// <summary>Closes every connection and ends the delivery stream. A second call does nothing.</summary>
    public async ValueTask DisposeAsync()
    {
        // The token source is disposed by the first call: cancelling it again would throw.
        if (Interlocked.Exchange(ref _disposeCalled, 1) != 0) return;
        _disposed.Cancel();
        foreach (var link in _links.Values)
        {
            await link.DisposeAsync().ConfigureAwait(false);
        }
        _deliveries.Complete();
        _disposed.Dispose();
    }

    /// <summary>Everything about one relay: its current connection and its subscriptions.</summary>
    private sealed class RelayLink(RelayClient owner, RelayAddress relay) : IAsyncDisposable
    {
        private readonly SemaphoreSlim _connectLock = new(1, 1);
        private readonly ReconnectBackoff _backoff = new(owner.Options.ReconnectMin, owner.Options.ReconnectMax);   // under _connectLock
        private RelayConnection? _current;
        // Which of the address's hosts the next connection dials (under _connectLock): the first, and
        // after a failed attempt the next, so an address naming a clearnet and an .onion host reaches
        // the relay by whichever way is open.
        private int _host;
        private Task? _pump;
        private Task? _keepAlive;
        // The failure of the last attempt to connect of the caller that holds the connect lock (null
        // until one fails), and a signal for the next one: a caller of one attempt (ConnectAsync) that
        // finds another caller reconnecting (the delivery pump, through its back-off) is told why at
        // once, rather than waiting for the lock until its own time is up.
        private RelayConnectException? _lastFailure;
        private TaskCompletionSource _nextFailure = new(TaskCreationOptions.RunContinuationsAsynchronously);
        public ConcurrentDictionary<byte[], RecipientQueue> Subscriptions { get; } = new(IdComparer.Instance);
        // The SubscribeAsync calls under way, by queue, under _subscribing's lock (see SubscribeCalls).
        private readonly Dictionary<byte[], SubscribeCalls> _subscribing = new(IdComparer.Instance);
        // The queues renewed, or about to be, by the attempts to replace a lost connection since the last
        // connection was made current (under _subscribing's lock): an attempt that failed may have had
        // its SUB read by the relay, so the queue counts as subscribed anew until a connection is current.
        private readonly HashSet<byte[]> _renewing = new(IdComparer.Instance);

        /// <summary>The SubscribeAsync calls of one queue under way.</summary>
        private sealed class SubscribeCalls
        {
            /// <summary>How many (a cancelled one lets the queue go only when it is the only one).</summary>
            public int UnderWay;

            /// <summary>
            /// How many have not had the queue received on a connection yet (sent its SUB, or found it
            /// received there): each will when it gets a connection. An END or a rejected delivery read
            /// before then concerns the subscription these calls replace, not the one they make.
            /// </summary>
            public int Undecided;
        }

        /// <summary>A SubscribeAsync starts; true when the queue was subscribed already.</summary>
        public bool BeginSubscribing(RecipientQueue queue)
        {
            lock (_subscribing)
            {
                bool subscribed = Subscriptions.ContainsKey(queue.RecipientId);
                Subscriptions[queue.RecipientId] = queue;
                ref var calls = ref CollectionsMarshal.GetValueRefOrAddDefault(_subscribing, queue.RecipientId, out _);
                calls ??= new SubscribeCalls();
                calls.UnderWay++;
                calls.Undecided++;
                return subscribed;
            }
        }

        /// <summary>
        /// A SubscribeAsync had the queue received on a connection (it sent its SUB there, which
        /// registers the queue before the SUB is written, or found it received there), or, with
        /// <paramref name="decided"/> false, lost that connection before the SUB's answer and tries again.
        /// </summary>
        public void Decided(RecipientQueue queue, bool decided)
        {
            lock (_subscribing)
            {
                _subscribing[queue.RecipientId].Undecided += decided ? -1 : 1;
            }
        }

        /// <summary>
        /// The queue is no longer subscribed: not renewed, and the current connection stops receiving
        /// it, so a later SubscribeAsync sends SUB again (a connection not yet current is seen to
        /// when it becomes current, <see cref="GetAsync"/>).
        /// </summary>
        public void Forget(byte[] recipientId)
        {
            lock (_subscribing)
            {
                Subscriptions.TryRemove(recipientId, out _);
                Volatile.Read(ref _current)?.StopReceiving(recipientId);
            }
        }

        /// <summary>A SubscribeAsync was cancelled: a queue it was to subscribe goes back to unsubscribed, unless another call is subscribing it.</summary>
        public void SubscribeCancelled(RecipientQueue queue, bool wasSubscribed)
        {
            lock (_subscribing)
            {
                if (!wasSubscribed && _subscribing[queue.RecipientId].UnderWay <= 1)
                {
                    Forget(queue.RecipientId);
                }
            }
        }

        /// <summary>A SubscribeAsync ends; <paramref name="decided"/>: it is counted as decided (<see cref="Decided"/>).</summary>
        public void EndSubscribing(RecipientQueue queue, bool decided)
        {
            lock (_subscribing)
            {
                var calls = _subscribing[queue.RecipientId];
                if (!decided) calls.Undecided--;
                if (--calls.UnderWay == 0) _subscribing.Remove(queue.RecipientId);
            }
        }

        /// <summary>
        /// True when the queue was subscribed anew after an END or a rejected delivery stopped a
        /// connection receiving it: the current connection receives it again, a SubscribeAsync of it
        /// has yet to find it received or send its SUB (it will send one), or the connection being made
        /// to replace a lost one has renewed it (<see cref="_renewing"/>). Under _subscribing's lock.
        /// </summary>
        private bool SubscribedAnewLocked(byte[] recipientId) =>
            Volatile.Read(ref _current)?.IsSubscribed(recipientId) == true
            || (_subscribing.TryGetValue(recipientId, out var calls) && calls.Undecided > 0)
            || _renewing.Contains(recipientId);

        /// <summary>
        /// The relay ended a connection's subscription of the queue (END), or a delivery of it failed its
        /// integrity check: let the queue go (not renewed on the next connection), unless it was
        /// subscribed anew since (<see cref="SubscribedAnewLocked"/>), on that connection or on one that
        /// replaced it; also when the SubscribeAsync that made the subscription has not returned yet.
        /// <para>
        /// The same whether that connection is still the current one or was lost meanwhile (dropped by
        /// the keep-alive while the delivery pump still read its last events): its END tells that another
        /// connection (another device) took the queue, or that the queue was deleted. Renewed on the next
        /// connection, the queue would be taken back from that device, and the devices would take it
        /// from each other after every reconnection. A connection that replaced it and renewed the queue
        /// (marked in <see cref="_renewing"/> before its SUB is sent) may have caused that END, and has
        /// taken the queue back in any case (the other device got an END of its own): letting the queue
        /// go then would leave that subscription on the relay with its deliveries dropped here, and the
        /// queue received by nobody, so it stays subscribed.
        /// </para>
        /// <para>
        /// Letting a queue go that was subscribed anew would leave it received with its deliveries
        /// dropped, filling its window (a later SubscribeAsync, finding it received, would send no SUB
        /// to have them delivered again), or let a SubscribeAsync about to send its SUB subscribe a
        /// queue the client no longer hands out.
        /// </para>
        /// </summary>
        private RecipientQueue? LetGo(byte[] recipientId)
        {
            lock (_subscribing)
            {
                if (SubscribedAnewLocked(recipientId))
                {
                    return null;
                }
                return Subscriptions.TryRemove(recipientId, out var queue) ? queue : null;
            }
        }

        /// <summary>
        /// The current connection, or a new one (<paramref name="retry"/>: with back-off until
        /// <see cref="RelayClientOptions.RetryFor"/>; otherwise one attempt). Whatever path it was on
        /// (waiting for the lock or the back-off, an attempt cut short, failed or refused, an earlier caller's
        /// failure given as its answer), a call that stops as its token is cancelled throws
        /// <see cref="OperationCanceledException"/> for that token, and one that stops as the client is
        /// disposed <see cref="ObjectDisposedException"/>, as a call made after DisposeAsync does: neither
        /// is told that the relay could not be reached.
        /// </summary>
        public async Task<RelayConnection> GetAsync(bool retry, CancellationToken cancellationToken)
        {
            // Named for the client, not for the token source of its own that DisposeAsync disposes.
            if (Volatile.Read(ref owner._disposeCalled) != 0) throw new ObjectDisposedException(nameof(RelayClient));
            var current = Volatile.Read(ref _current);
            if (current is { Closed.IsCancellationRequested: false }) return current;
            try
            {
                return await ConnectOrWaitAsync(retry, cancellationToken).ConfigureAwait(false);
            }
            // An attempt's failure (RelayErrorException: the relay refused the handshake) counts as one.
            catch (Exception ex) when (ex is OperationCanceledException or RelayConnectException or RelayErrorException && cancellationToken.IsCancellationRequested)
            {
                if (ex is OperationCanceledException cancelled && cancelled.CancellationToken == cancellationToken) throw;
                throw new OperationCanceledException(ex.Message, ex, cancellationToken);
            }
            catch (Exception ex) when (ex is OperationCanceledException or RelayConnectException or RelayErrorException && owner._disposed.IsCancellationRequested)
            {
                throw new ObjectDisposedException(nameof(RelayClient));
            }
        }

        /// <summary><see cref="GetAsync"/> once no current connection is found.</summary>
        private async Task<RelayConnection> ConnectOrWaitAsync(bool retry, CancellationToken cancellationToken)
        {
            RelayConnection? current;
            // RetryFor counts from here: the time spent waiting for another caller's attempts (the
            // delivery pump's, another RunAsync's) is time spent trying, or callers queued behind one
            // another would each try for RetryFor in turn.
            long started = System.Diagnostics.Stopwatch.GetTimestamp();
            bool MayRetry() => owner.Options.RetryFor is not { } limit || System.Diagnostics.Stopwatch.GetElapsedTime(started) < limit;
            using var linked = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken, owner._disposed.Token);
            if (retry)
            {
                await _connectLock.WaitAsync(linked.Token).ConfigureAwait(false);
            }
            else
            {
                await LockForOneAttemptAsync(linked.Token).ConfigureAwait(false);
            }
            try
            {
                current = _current;
                if (current is { Closed.IsCancellationRequested: false }) return current;
                if (retry && !MayRetry() && Volatile.Read(ref _lastFailure) is { } earlier)
                {
                    // Given up while an earlier holder tried: its last failure is this caller's answer
                    // (and, left in place, the answer of the callers after it).
                    throw Again(earlier);
                }
                // What the attempts of an earlier holder met says nothing of this one's (the relay may be back).
                Volatile.Write(ref _lastFailure, null);
                if (current != null)
                {
                    Interlocked.CompareExchange(ref _current, null, current);
                    await current.DisposeAsync().ConfigureAwait(false);
                }
                if (retry)
                {
                    // After a connection that was lost soon after it was made, the back-off goes on
                    // growing rather than starting again: a relay that accepts and then drops (full,
                    // restarting) is not hammered, and no two clients come back in step.
                    var wait = _backoff.BeforeConnect();
                    if (wait > TimeSpan.Zero) await Task.Delay(wait, linked.Token).ConfigureAwait(false);
                }
                while (true)
                {
                    try
                    {
                        List<byte[]> renewed;
                        var connection = await RelayConnection.ConnectAsync(relay, new RelayConnectionOptions
                        {
                            Socks = owner.Options.Socks,
                            Tls = owner.Options.Tls,
                            ConnectTimeout = owner.Options.ConnectTimeout,
                            Host = relay.Hosts[_host],
                        }, linked.Token).ConfigureAwait(false);
                        try
                        {
                            // A relay that answers the handshake but not the SUBs must not hold this
                            // link (and every request waiting for it) for ever: bounded like a connect.
                            using var renewal = CancellationTokenSource.CreateLinkedTokenSource(linked.Token);
                            renewal.CancelAfter(owner.Options.ConnectTimeout);
                            try
                            {
                                renewed = await ResubscribeAsync(connection, renewal.Token).ConfigureAwait(false);
                            }
                            catch (OperationCanceledException) when (!linked.IsCancellationRequested)
                            {
                                throw new RelayConnectException($"the relay did not answer the renewal of {Subscriptions.Count} subscription(s) within {owner.Options.ConnectTimeout.TotalSeconds:0.#} s");
                            }
                        }
                        catch
                        {
                            await connection.DisposeAsync().ConfigureAwait(false);
                            throw;
                        }
                        lock (_subscribing)
                        {
                            // A queue let go while it was being renewed (Unsubscribe, a cancelled
                            // SubscribeAsync) is not received here either.
                            foreach (var id in renewed)
                            {
                                if (!Subscriptions.ContainsKey(id)) connection.StopReceiving(id);
                            }
                            Volatile.Write(ref _current, connection);
                            _renewing.Clear();   // the current connection tells from here on (SubscribedAnewLocked)
                        }
                        _backoff.Connected();
                        _keepAlive ??= KeepAliveAsync();
                        owner.OnConnectionMade(relay);
                        return connection;
                    }
                    catch (RelayConnectException ex)
                    {
                        AttemptFailed(ex);
                        owner.OnConnectionFailed(relay, ex);
                        // The next attempt goes to the address's next host (a clearnet name and an
                        // .onion name of one relay: the way to one may be blocked or down).
                        _host = (_host + 1) % relay.Hosts.Count;
                        // Cancelled or disposed meanwhile (a socket aborted under the attempt, or the
                        // app cancelled or disposed as it failed): GetAsync tells the caller so.
                        if (!retry)
                        {
                            throw;
                        }
                        if (ex is FingerprintMismatchException)
                        {
                            // Not retried here: the caller is told at once. The next attempt (the
                            // delivery pump's) waits for the back-off all the same.
                            _backoff.Failed();
                            throw;
                        }
                        if (linked.IsCancellationRequested || !MayRetry())
                        {
                            throw;
                        }
                        await Task.Delay(_backoff.Failed(), linked.Token).ConfigureAwait(false);
                    }
                    catch (Exception ex) when (ex is not OperationCanceledException)
                    {
                        // Not retried here (the relay refused the handshake: RelayErrorException): the
                        // caller is told, and the delivery pump tries again later.
                        owner.OnConnectionFailed(relay, ex);
                        throw;
                    }
                }
            }
            finally
            {
                _connectLock.Release();
            }
        }

        private void AttemptFailed(RelayConnectException failure)
        {
            Volatile.Write(ref _lastFailure, failure);
            Interlocked.Exchange(ref _nextFailure, new(TaskCreationOptions.RunContinuationsAsynchronously)).TrySetResult();
        }

        /// <summary>
        /// Takes the connect lock for one attempt. While another caller holds it to connect again (the
        /// delivery pump, between its attempts), the failure of its last attempt, or else of its next,
        /// is thrown at once (as a <see cref="RelayConnectException"/> of the same kind): the relay
        /// cannot be reached now, and another attempt of this caller's would only repeat it.
        /// </summary>
        private async Task LockForOneAttemptAsync(CancellationToken cancellationToken)
        {
            if (_connectLock.Wait(0)) return;
            using var waiting = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
            var locked = _connectLock.WaitAsync(waiting.Token);
            while (true)
            {
                var next = Volatile.Read(ref _nextFailure).Task;
                if (!locked.IsCompleted && Volatile.Read(ref _lastFailure) is { } failure)
                {
                    waiting.Cancel();
                    try
                    {
                        await locked.ConfigureAwait(false);
                        _connectLock.Release();   // taken meanwhile after all: not this caller's
                    }
                    catch (OperationCanceledException)
                    {
                    }
                    if (cancellationToken.IsCancellationRequested) throw new OperationCanceledException(cancellationToken);
                    throw Again(failure);
                }
                if (await Task.WhenAny(locked, next).ConfigureAwait(false) == locked)
                {
                    await locked.ConfigureAwait(false);   // throws when cancelled
                    return;
                }
            }
        }

        /// <summary>Another caller's failure to connect, thrown to this one as a <see cref="RelayConnectException"/> of the same kind.</summary>
        private static RelayConnectException Again(RelayConnectException failure) =>
            failure is FingerprintMismatchException mismatch
                ? new FingerprintMismatchException(mismatch.Expected)
                : new RelayConnectException(failure.Message, failure);

        /// <summary>
        /// Renews every subscription on a new connection. A queue the relay refuses (deleted meanwhile:
        /// AUTH; too many subscriptions: LIMIT) is dropped from the subscriptions and reported through
        /// <see cref="RelayClient.SubscriptionRefused"/>; the others go on. Returns the queues renewed.
        /// </summary>
        private async Task<List<byte[]>> ResubscribeAsync(RelayConnection connection, CancellationToken cancellationToken)
        {
            var renewed = new List<byte[]>();
            foreach (var (id, queue) in Subscriptions)
            {
                lock (_subscribing)
                {
                    // Let go meanwhile (an END read on the connection this one replaces, Unsubscribe):
                    // not renewed. Marked before its SUB is sent: an END read on the connection
                    // replaced no longer lets it go (LetGo).
                    if (!Subscriptions.ContainsKey(id)) continue;
                    _renewing.Add(id);
                }
                try
                {
                    await connection.SubscribeAsync(queue, owner.Options.DeliveryWindow, cancellationToken).ConfigureAwait(false);
                    renewed.Add(id);
                }
                catch (RelayErrorException refused)
                {
                    Subscriptions.TryRemove(id, out _);
                    owner.OnSubscriptionRefused(relay, queue, refused);
                }
            }
            return renewed;
        }

        /// <summary>Forgets a lost connection (if it is still the current one) and closes it.</summary>
        public void Drop(RelayConnection connection)
        {
            if (Interlocked.CompareExchange(ref _current, null, connection) == connection)
            {
                // Not awaited: DisposeAsync never throws (it closes anyway).
                _ = connection.DisposeAsync().AsTask();
            }
        }

        public void EnsurePump()
        {
            lock (this)
            {
                // Not once the client is disposed (a SubscribeAsync after DisposeAsync, which throws
                // ObjectDisposedException to its caller): the pump would fault at once, with nobody to see it.
                if (owner._disposed.IsCancellationRequested) return;
                _pump ??= PumpAsync();
            }
        }

        /// <summary>Moves deliveries from whichever connection is current to the client's stream; reconnects when it is lost.</summary>
        private async Task PumpAsync()
        {
            var token = owner._disposed.Token;
            while (!token.IsCancellationRequested)
            {
                RelayConnection connection;
                try
                {
                    connection = await GetAsync(retry: true, token).ConfigureAwait(false);
                }
                catch (OperationCanceledException)
                {
                    return;
                }
                catch (FingerprintMismatchException)
                {
                    // Another relay answered: maybe a hostile network on the way, which may not last.
                    // The app's own calls were told; the next attempt waits for the back-off (GetAsync).
                    continue;
                }
                catch (Exception)
                {
                    // Anything else (not retried inside GetAsync): wait, then try again; the pump must
                    // not end while queues are subscribed.
                    try
                    {
                        await Task.Delay(owner.Options.ReconnectMax, token).ConfigureAwait(false);
                    }
                    catch (OperationCanceledException)
                    {
                        return;
                    }
                    continue;
                }
                try
                {
                    await foreach (var e in connection.Events.ReadAllAsync(token).ConfigureAwait(false))
                    {
                        if (e is DeliveryEvent d && Subscriptions.ContainsKey(d.Queue.RecipientId))
                        {
                            owner._deliveries.TryWrite(new QueueDelivery(relay, d.Queue, d.Delivery));
                        }
                        else if (e is SubscriptionEndedEvent ended && LetGo(ended.RecipientId) is { } queue)
                        {
                            owner.OnSubscriptionEnded(relay, queue);
                        }
                        else if (e is DeliveryRejectedEvent rejected && LetGo(rejected.Queue.RecipientId) is { } dropped)
                        {
                            owner.OnDeliveryRejected(relay, dropped, rejected.Reason);
                        }
                    }
                }
                catch (OperationCanceledException)
                {
                    return;
                }
                catch (RelayConnectException)
                {
                    // The relay broke the protocol (the connection's Failure): the deliveries before
                    // it were moved on above; the next connection starts afresh.
                }
                Drop(connection);
            }
        }

        private async Task KeepAliveAsync()
        {
            var token = owner._disposed.Token;
            try
            {
                while (!token.IsCancellationRequested)
                {
                    await Task.Delay(owner.Options.KeepAlive, token).ConfigureAwait(false);
                    var current = Volatile.Read(ref _current);
                    if (current is null || current.Closed.IsCancellationRequested) continue;
                    try
                    {
                        await current.PingWhileAliveAsync(owner.Options.KeepAlive, token).ConfigureAwait(false);
                    }
                    catch (Exception) when (!token.IsCancellationRequested)
                    {
                        // No sign of life in time, the connection failed, or an answer that is no PONG
                        // (a relay that does not follow the protocol): replace the connection. Anything
                        // else let through would end the keep-alive of this relay for good.
                        Drop(current);
                        await current.DisposeAsync().ConfigureAwait(false);
                    }
                }
            }
            catch (OperationCanceledException)
            {
            }
        }

        public async ValueTask DisposeAsync()
        {
            // A connection being made (under the lock) ends at once, the client's token being
            // cancelled, or it would be put in place after the one taken here and left open.
            bool locked = await _connectLock.WaitAsync(TimeSpan.FromSeconds(5)).ConfigureAwait(false);
            var current = Interlocked.Exchange(ref _current, null);
            if (locked) _connectLock.Release();
            if (current != null) await current.DisposeAsync().ConfigureAwait(false);
            foreach (var t in new[] { _pump, _keepAlive })
            {
                if (t is null) continue;
                try { await t.WaitAsync(TimeSpan.FromSeconds(5)).ConfigureAwait(false); } catch (Exception) { }
            }
        }
    }
}

/// <summary>
/// How long a client waits before it connects to a relay again: nothing the first time; after a failed
/// attempt, or a connection lost before it lasted <c>max</c>, a step that doubles from <c>min</c> up to
/// <c>max</c>; after a connection that lasted, about <c>min</c>. Each wait is drawn from the upper half
/// of its step, so clients that lost the same relay at the same moment do not return together.
/// </summary>
internal sealed class ReconnectBackoff(TimeSpan min, TimeSpan max, Func<double>? random = null, TimeProvider? clock = null)
{
    private readonly Func<double> _random = random ?? Random.Shared.NextDouble;
    private readonly TimeProvider _clock = clock ?? TimeProvider.System;
    private TimeSpan _step;          // zero: nothing failed since the last connection that lasted
    private long _connectedAt;       // when the current connection was made; 0: none since the last wait

    public void Connected() => _connectedAt = _clock.GetTimestamp();

    /// <summary>The wait before connecting again (zero before the first connection and after one that lasted).</summary>
    public TimeSpan BeforeConnect()
    {
        if (_connectedAt == 0)
        {
            // No connection since the last wait: the first ever (step zero), or attempts that failed
            // and were given up (the caller's cancellation, RetryFor): go on from their step.
            return _step == TimeSpan.Zero ? TimeSpan.Zero : Spread(_step);
        }
        var lasted = _clock.GetElapsedTime(_connectedAt);
        _connectedAt = 0;
        if (lasted >= max)
        {
            _step = TimeSpan.Zero;
            return Spread(min);
        }
        return Failed();
    }

    /// <summary>The wait after a failed attempt.</summary>
    public TimeSpan Failed()
    {
        _step = _step == TimeSpan.Zero ? min : TimeSpan.FromTicks(Math.Min(_step.Ticks * 2, max.Ticks));
        return Spread(_step);
    }

    private TimeSpan Spread(TimeSpan step) => TimeSpan.FromTicks((long)(step.Ticks * (0.5 + 0.5 * _random())));
}

/// <summary>Queue ids (random bytes) as dictionary keys, compared by content.</summary>
internal sealed class IdComparer : IEqualityComparer<byte[]>
{
    public static readonly IdComparer Instance = new();

    public bool Equals(byte[]? x, byte[]? y) => x.AsSpan().SequenceEqual(y);

    // Ids are uniformly random: their first bytes are a good hash.
    public int GetHashCode(byte[] obj) => obj.Length >= 4 ? System.Buffers.Binary.BinaryPrimitives.ReadInt32LittleEndian(obj) : obj.Length;
}
