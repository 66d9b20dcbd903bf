using System.Buffers;
using System.Threading.Channels;
using Relay.Client;
using Relay.Client.Conversations;
using Relay.Client.EndToEnd;
using Relay.Client.Transport;
using Relay.Protocol;

namespace Relay.Server.Tests;

/// <summary>The SDK end to end: invitations, conversations both ways, offline delivery, relay restarts, and hostile ciphertext.</summary>
public class ConversationTests
{
    private static RelayClientOptions Fast => new() { ReconnectMin = TimeSpan.FromMilliseconds(50), ReconnectMax = TimeSpan.FromMilliseconds(500) };

    /// <summary>Runs Messenger.ListenAsync in the background and hands its events to the test.</summary>
    private sealed class Listener : IAsyncDisposable
    {
        private readonly CancellationTokenSource _stop = new();
        private readonly Channel<ConversationEvent> _events = Channel.CreateUnbounded<ConversationEvent>();
        private readonly Task _loop;
        public List<ConversationEvent> Seen { get; } = [];

        public Listener(Messenger messenger)
        {
            _loop = Task.Run(async () =>
            {
                try
                {
                    await foreach (var e in messenger.ListenAsync(_stop.Token)) _events.Writer.TryWrite(e);
                    // Listening ended by itself: the test's next read says so (ChannelClosedException).
                    _events.Writer.TryComplete();
                }
                catch (OperationCanceledException) { _events.Writer.TryComplete(); }
                // What ended listening reaches the test's next read.
                catch (Exception ex) { _events.Writer.TryComplete(ex); }
            });
        }

        public async Task<T> NextAsync<T>(int seconds = 20) where T : ConversationEvent
        {
            using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(seconds));
            while (true)
            {
                var e = await _events.Reader.ReadAsync(cts.Token);
                Seen.Add(e);
                if (e is T t) return t;
            }
        }

        /// <summary>Events that arrive within a short quiet period (to prove nothing more came).</summary>
        public async Task<List<ConversationEvent>> DrainAsync(int milliseconds = 500)
        {
            var list = new List<ConversationEvent>();
            using var cts = new CancellationTokenSource(milliseconds);
            try
            {
                while (true) list.Add(await _events.Reader.ReadAsync(cts.Token));
            }
            catch (OperationCanceledException) { }
            Seen.AddRange(list);
            return list;
        }

        public async ValueTask DisposeAsync()
        {
            _stop.Cancel();
            try { await _loop; } catch (Exception) { }
        }
    }

    /// <summary>Alice invites Bob and Bob joins; Alice has not handled the JOIN yet (her first listener does).</summary>
    private static async Task<(Messenger Alice, Messenger Bob, IProfileStore AliceStore, IProfileStore BobStore)> ConnectedPairAsync(TestRelay relay,
        IProfileStore? aliceProfile = null, RelayClientOptions? options = null)
    {
        var aliceStore = aliceProfile ?? new MemoryProfileStore();
        var bobStore = new MemoryProfileStore();
        var alice = new Messenger(aliceStore, options ?? Fast);
        var bob = new Messenger(bobStore, options ?? Fast);
        var (link, name) = await alice.InviteAsync(relay.Address, "bob");
        await Assert.That(name).IsEqualTo("bob");
        await Assert.That(await bob.JoinAsync(link, name: "alice")).IsEqualTo("alice");
        return (alice, bob, aliceStore, bobStore);
    }

    [Test]
    public async Task A_join_under_a_name_already_taken_is_refused_before_the_invitation_is_used()
    {
        await using var relay = await TestRelay.StartAsync();
        var bobStore = new MemoryProfileStore();
        await using var alice = new Messenger(new MemoryProfileStore(), Fast);
        await using var bob = new Messenger(bobStore, Fast);
        var (first, _) = await alice.InviteAsync(relay.Address, "bob");
        await bob.JoinAsync(first, name: "alice");
        var (second, _) = await alice.InviteAsync(relay.Address, "bob2");

        var refused = await Assert.ThrowsAsync<ArgumentException>(() => bob.JoinAsync(second, name: "alice"));
        await Assert.That(refused!.Message).Contains("already a contact named 'alice'");
        await Assert.That(bobStore.Load().Contacts.Count).IsEqualTo(1);
        // The invitation was not used: joining it under another name works.
        await Assert.That(await bob.JoinAsync(second, name: "alice-again")).IsEqualTo("alice-again");
    }

    /// <summary>A profile in memory whose save number <see cref="FailingUpdate"/> (counted from 1) fails, once.</summary>
    private sealed class FailOnceProfileStore : IProfileStore
    {
        private readonly MemoryProfileStore _inner = new();
        private int _updates;
        public int FailingUpdate;

        public ProfileData Load() => _inner.Load();

        public T Update<T>(Func<ProfileData, T> change)
        {
            if (Interlocked.Increment(ref _updates) == FailingUpdate) throw new IOException("injected: no space left on device");
            return _inner.Update(change);
        }
    }

    /// <summary>
    /// Joining saves the contact (once its queue is made), secures the inviter's queue, then saves
    /// that it did: whichever of those saves fails, the same link joined again opens the conversation,
    /// the invitation not used up by the join that stopped.
    /// </summary>
    [Test]
    [Arguments(2)]
    [Arguments(3)]
    public async Task A_join_that_stopped_at_a_failed_save_is_finished_by_joining_the_same_link_again(int failingSave)
    {
        await using var relay = await TestRelay.StartAsync();
        var bobStore = new FailOnceProfileStore { FailingUpdate = failingSave };
        await using var alice = new Messenger(new MemoryProfileStore(), Fast);
        await using var bob = new Messenger(bobStore, Fast);
        var (link, _) = await alice.InviteAsync(relay.Address, "bob");

        await Assert.ThrowsAsync<IOException>(() => bob.JoinAsync(link, name: "alice"));
        await Assert.That(await bob.JoinAsync(link, name: "alice")).IsEqualTo("alice");
        await Assert.That(bobStore.Load().Contacts.Select(c => c.Name)).IsEquivalentTo(new[] { "alice" });

        await using var listener = new Listener(alice);
        await Assert.That((await listener.NextAsync<ContactJoined>()).Contact).IsEqualTo("bob");
        await bob.SendAsync("alice", "joined at the second try");
        await Assert.That((await listener.NextAsync<MessageReceived>()).Text).IsEqualTo("joined at the second try");
    }

    [Test]
    public async Task A_join_processed_again_after_the_inviter_stopped_before_saving_still_opens_the_conversation()
    {
        await using var relay = await TestRelay.StartAsync();
        var (alice, bob, aliceStore, bobStore) = await ConnectedPairAsync(relay);
        await using (alice)
        await using (bob)
        {
            // Alice's first run secured Bob's queue (with the key PROTOCOL.md §11.1 derives), then
            // stopped before saving or acknowledging the JOIN.
            var ownPrivate = aliceStore.Load().Find("bob")!.OwnPrivate;
            var bobSenderId = bobStore.Load().Find("alice")!.ReceiveSenderId;
            byte[] label = [.. "relay/1 join sender key"u8, .. bobSenderId];
            var key = System.Security.Cryptography.HMACSHA256.HashData(ownPrivate, label);
            await using (var crashed = await relay.ConnectAsync())
            {
                await crashed.SecureAsync(bobSenderId, key);
            }

            // The JOIN arrives again: the same key secures the queue again, and both ways work.
            await using var aliceListener = new Listener(alice);
            await Assert.That((await aliceListener.NextAsync<ContactJoined>()).Contact).IsEqualTo("bob");
            await alice.SendAsync("bob", "hello bob");
            await using var bobListener = new Listener(bob);
            await Assert.That((await bobListener.NextAsync<MessageReceived>()).Text).IsEqualTo("hello bob");
        }
    }

    [Test]
    public async Task A_contact_whose_queue_is_gone_is_reported_and_the_others_still_arrive()
    {
        await using var relay = await TestRelay.StartAsync();
        var (alice, bob, aliceStore, _) = await ConnectedPairAsync(relay);
        await using (alice)
        await using (bob)
        {
            var (_, ghost) = await alice.InviteAsync(relay.Address, "ghost");
            var ghostQueue = aliceStore.Load().Find(ghost)!;
            await using (var other = await relay.ConnectAsync())
            {
                await other.DeleteAsync(new RecipientQueue(ghostQueue.RecipientId, ghostQueue.ReceiveSenderId, ghostQueue.RecipientPrivate, ghostQueue.DeliveryKey));
            }

            await using var aliceListener = new Listener(alice);
            var unavailable = await aliceListener.NextAsync<ContactUnavailable>();
            await Assert.That(unavailable.Contact).IsEqualTo("ghost");
            await Assert.That(unavailable.Reason).Contains("AUTH");
            // Contacts are independent: Bob's JOIN may come before or after the report on the ghost.
            var joined = aliceListener.Seen.OfType<ContactJoined>().FirstOrDefault() ?? await aliceListener.NextAsync<ContactJoined>();
            await Assert.That(joined.Contact).IsEqualTo("bob");
            await bob.SendAsync("alice", "still here");
            await Assert.That((await aliceListener.NextAsync<MessageReceived>()).Text).IsEqualTo("still here");
        }
    }

    /// <summary>
    /// While the server at a contact's relay address is another relay (the relay replaced, or someone
    /// on the way answering for it), the listener says so for that contact, once rather than at every
    /// attempt, and says when it receives from the contact again.
    /// </summary>
    [Test]
    public async Task A_listener_is_told_when_a_contacts_relay_is_not_the_one_its_address_names_and_when_it_is_back()
    {
        await using var relay = await TestRelay.StartAsync();
        await using var impostor = await TestRelay.StartAsync();
        await using var path = ClientRecoveryTests.SwitchingProxy.Start(relay.Server.RelayEndPoint);
        var address = relay.Address with { Hosts = ["127.0.0.1"], Port = path.Port };
        await using var alice = new Messenger(new MemoryProfileStore(), Fast);
        await using var bob = new Messenger(new MemoryProfileStore(), Fast);
        var (link, _) = await alice.InviteAsync(address, "bob");
        await bob.JoinAsync(link, ownRelay: relay.Address, name: "alice");
        await using var listener = new Listener(alice);
        await listener.NextAsync<ContactJoined>();

        path.Target = impostor.Server.RelayEndPoint;
        path.DropAll();
        var unavailable = await listener.NextAsync<ContactUnavailable>();
        await Assert.That(unavailable.Contact).IsEqualTo("bob");
        await Assert.That(unavailable.Reason).Contains("not the relay it names");
        await Assert.That(unavailable.Reason).Contains(relay.Address.Fingerprint);
        await Assert.That(await OperationsMetrics.EventuallyAsync(() => Task.FromResult(path.ConnectionsTo(impostor.Server.RelayEndPoint) >= 3), seconds: 10)).IsTrue();
        await listener.DrainAsync();
        await Assert.That(listener.Seen.OfType<ContactUnavailable>().Count()).IsEqualTo(1);

        path.Target = relay.Server.RelayEndPoint;
        await Assert.That((await listener.NextAsync<ContactAvailable>()).Contact).IsEqualTo("bob");
        await bob.SendAsync("alice", "after");
        await Assert.That((await listener.NextAsync<MessageReceived>()).Text).IsEqualTo("after");
    }

    [Test]
    public async Task A_listener_whose_contact_queue_another_device_takes_is_told_and_the_other_device_receives()
    {
        await using var relay = await TestRelay.StartAsync();
        var (alice, bob, aliceStore, _) = await ConnectedPairAsync(relay);
        await using (alice)
        await using (bob)
        {
            await using var aliceListener = new Listener(alice);
            await Assert.That((await aliceListener.NextAsync<ContactJoined>()).Contact).IsEqualTo("bob");

            // Alice's profile copied to a second device, which starts listening: it takes the queue.
            var secondStore = new MemoryProfileStore();
            var copy = aliceStore.Load();
            secondStore.Update(p => { p.Contacts = copy.Contacts; return true; });
            await using var second = new Messenger(secondStore, Fast);
            await using var secondListener = new Listener(second);
            var told = await aliceListener.NextAsync<ContactUnavailable>();
            await Assert.That(told.Contact).IsEqualTo("bob");
            await Assert.That(told.Reason).Contains("another device");

            // Bob's messages go to the device that listens now; and after both reconnect (a relay
            // restart) the first device does not take the queue back.
            await bob.SendAsync("alice", "to the second device");
            await Assert.That((await secondListener.NextAsync<MessageReceived>()).Text).IsEqualTo("to the second device");
            await relay.RestartAsync();
            await alice.Client.RunAsync(relay.Address, c => c.PingAsync());
            await second.Client.RunAsync(relay.Address, c => c.PingAsync());
            await bob.SendAsync("alice", "after the restart");
            await Assert.That((await secondListener.NextAsync<MessageReceived>()).Text).IsEqualTo("after the restart");
            var firstDevice = await aliceListener.DrainAsync();
            await Assert.That(firstDevice.OfType<MessageReceived>()).IsEmpty();
            await Assert.That(firstDevice.OfType<ContactUnavailable>()).IsEmpty();   // told once, above
        }
    }

    [Test]
    public async Task A_listener_goes_on_when_the_relay_cannot_write_an_ack_and_reports_the_message_once()
    {
        await using var relay = await TestRelay.StartAsync();
        var (alice, bob, _, _) = await ConnectedPairAsync(relay);
        await using (alice)
        await using (bob)
        {
            await using var aliceListener = new Listener(alice);
            await Assert.That((await aliceListener.NextAsync<ContactJoined>()).Contact).IsEqualTo("bob");
            // The JOIN's ACK (sent without waiting for its answer) is written before the failure is armed.
            await Assert.That(await OperationsMetrics.EventuallyAsync(async () =>
                OperationsMetrics.Value(await OperationsMetrics.ScrapeAsync(relay), "relay_messages_acked_total") >= 1)).IsTrue();

            // The relay's disk fails the next write with a deletion in it: the ACK of "one".
            int failures = 0;
            relay.Server.Store.BeforeWrite = (ops, bytes) =>
            {
                // A batch without a message in it (a message is over 256 bytes): the ACK.
                if (bytes < 200 && Interlocked.Increment(ref failures) == 1) throw new IOException("injected write failure");
            };
            await bob.SendAsync("alice", "one");
            await Assert.That((await aliceListener.NextAsync<MessageReceived>()).Text).IsEqualTo("one");
            // "two" is sent once the failed ACK is answered: while the store undoes a failed write it
            // refuses new ones (and fails those staged behind it), so an earlier SEND could get INTERNAL.
            await Assert.That(await OperationsMetrics.EventuallyAsync(async () => OperationsMetrics.Value(
                await OperationsMetrics.ScrapeAsync(relay), "relay_commands_total", "command=\"ack\",result=\"internal\"") >= 1)).IsTrue();
            await bob.SendAsync("alice", "two");
            await Assert.That((await aliceListener.NextAsync<MessageReceived>()).Text).IsEqualTo("two");
            relay.Server.Store.BeforeWrite = null;
            // The injected failure was the ACK's (answered INTERNAL), and "one" was delivered again
            // after it: three deliveries for two messages.
            var metrics = await OperationsMetrics.ScrapeAsync(relay);
            await Assert.That(OperationsMetrics.Value(metrics, "relay_commands_total", "command=\"ack\",result=\"internal\"")).IsEqualTo(1);
            await Assert.That(OperationsMetrics.Value(metrics, "relay_deliveries_total")).IsGreaterThanOrEqualTo(3);
            // ... and absorbed: reported once.
            var rest = await aliceListener.DrainAsync();
            await Assert.That(aliceListener.Seen.OfType<MessageReceived>().Count(m => m.Text == "one")).IsEqualTo(1);
            await Assert.That(rest.OfType<MessageRejected>()).IsEmpty();
        }
    }

    /// <summary>A profile in memory whose next saves can be made to fail (a full disk, say).</summary>
    private sealed class FailingProfileStore : IProfileStore
    {
        private readonly MemoryProfileStore _inner = new();
        public int FailNextUpdates;

        public ProfileData Load() => _inner.Load();

        public T Update<T>(Func<ProfileData, T> change)
        {
            if (Interlocked.Decrement(ref FailNextUpdates) >= 0) throw new IOException("injected: no space left on device");
            return _inner.Update(change);
        }
    }

    [Test]
    public async Task A_message_whose_handling_failed_is_handled_first_by_the_next_listener()
    {
        await using var relay = await TestRelay.StartAsync();
        var aliceStore = new FailingProfileStore();
        var (alice, bob, _, _) = await ConnectedPairAsync(relay, aliceStore);
        await using (alice)
        await using (bob)
        {
            await using (var joined = new Listener(alice))
            {
                await Assert.That((await joined.NextAsync<ContactJoined>()).Contact).IsEqualTo("bob");
            }

            // Three messages wait; with the delivery window all three are pushed at once, and saving
            // the state after the first fails.
            foreach (var text in new[] { "one", "two", "three" })
            {
                await bob.SendAsync("alice", text);
            }
            aliceStore.FailNextUpdates = 1;
            using (var cts = new CancellationTokenSource(TimeSpan.FromSeconds(20)))
            {
                var failed = await Assert.ThrowsAsync<IOException>(async () =>
                {
                    await foreach (var _ in alice.ListenAsync(cts.Token)) { }
                });
                await Assert.That(failed!.Message).Contains("injected");
            }

            // The next listener handles "one" first: nothing is missing, nothing is lost.
            await using var listener = new Listener(alice);
            var received = new List<string>();
            for (int i = 0; i < 3; i++) received.Add((await listener.NextAsync<MessageReceived>()).Text);
            await Assert.That(received).IsEquivalentTo(new[] { "one", "two", "three" }, TUnit.Assertions.Enums.CollectionOrdering.Matching);
            await listener.DrainAsync();
            await Assert.That(listener.Seen.OfType<MessagesMissing>()).IsEmpty();
            await Assert.That(listener.Seen.OfType<MessageRejected>()).IsEmpty();
        }
    }

    /// <summary>
    /// SKEY of the joiner's queue answered INTERNAL (the relay's disk fails): no reason to give the JOIN
    /// up, nor to stop listening. It is reported and tried again; a listener that stops meanwhile
    /// leaves it unacknowledged, and the next one (of the same messenger, or of another process on the
    /// same profile) completes the join.
    /// </summary>
    [Test]
    [Arguments(false)]
    [Arguments(true)]
    public async Task A_join_the_relay_could_not_secure_for_now_is_retried_and_completed_by_the_next_listener(bool newProcess)
    {
        await using var relay = await TestRelay.StartAsync();
        var (alice, bob, aliceStore, _) = await ConnectedPairAsync(relay);
        await using (alice)
        await using (bob)
        {
            // The relay's disk fails every batch without a message in it (a message is over 256 bytes):
            // Alice's SKEY of Bob's queue, each time she tries it.
            relay.Server.Store.BeforeWrite = (ops, bytes) =>
            {
                if (bytes < 200) throw new IOException("injected write failure");
            };
            await using (var first = new Listener(alice))
            {
                var unavailable = await first.NextAsync<ContactUnavailable>();
                await Assert.That(unavailable.Contact).IsEqualTo("bob");
                await Assert.That(unavailable.Reason).Contains("INTERNAL");
                await Assert.That(unavailable.Reason).Contains(relay.Address.ToString());
                // Tried again with back-off, reported once, and listening goes on.
                await Assert.That(await OperationsMetrics.EventuallyAsync(async () => OperationsMetrics.Value(
                    await OperationsMetrics.ScrapeAsync(relay), "relay_commands_total", "command=\"skey\",result=\"internal\"") >= 3)).IsTrue();
                await first.DrainAsync();
                await Assert.That(first.Seen.OfType<ContactUnavailable>().Count()).IsEqualTo(1);
                await Assert.That(first.Seen.OfType<MessageRejected>()).IsEmpty();
                await Assert.That(first.Seen.OfType<ContactJoined>()).IsEmpty();
            }
            relay.Server.Store.BeforeWrite = null;

            await using var again = newProcess ? new Messenger(aliceStore, Fast) : null;
            var inviter = again ?? alice;
            await using var listener = new Listener(inviter);
            await Assert.That((await listener.NextAsync<ContactJoined>()).Contact).IsEqualTo("bob");
            await inviter.SendAsync("bob", "hello bob");
            await using var bobListener = new Listener(bob);
            await Assert.That((await bobListener.NextAsync<MessageReceived>()).Text).IsEqualTo("hello bob");
            await listener.DrainAsync();
            await Assert.That(listener.Seen.OfType<MessageRejected>()).IsEmpty();
        }
    }

    /// <summary>
    /// The inviter's listener gets a JOIN while the joiner's relay is down, so the joiner's queue cannot
    /// be secured there: the listener says so for that contact, naming the relay, and goes on (another
    /// contact's messages arrive meanwhile). Once the relay is back the join completes with no further
    /// call, the message the joiner sent behind its JOIN follows it, and both ways work.
    /// </summary>
    [Test]
    public async Task A_join_whose_joiners_relay_is_down_completes_once_it_is_back_while_the_other_contacts_go_on()
    {
        await using var relay = await TestRelay.StartAsync();
        await using var other = await TestRelay.StartAsync();
        await using var alice = new Messenger(new MemoryProfileStore(), Fast);
        await using var bob = new Messenger(new MemoryProfileStore(), Fast);
        await using var carol = await JoinedContactAsync(alice, relay, "carol");
        var (link, _) = await alice.InviteAsync(relay.Address, "bob");
        await bob.JoinAsync(link, other.Address, "alice");   // Bob receives on the other relay
        await bob.SendAsync("alice", "sent right after joining");   // behind the JOIN in Alice's queue
        Listener? listener = null;
        try
        {
            await other.RestartAsync(async () =>
            {
                listener = new Listener(alice);
                var unavailable = await listener.NextAsync<ContactUnavailable>(10);
                await Assert.That(unavailable.Contact).IsEqualTo("bob");
                await Assert.That(unavailable.Reason).Contains(other.Address.ToString());
                await Assert.That(unavailable.Reason).Contains("cannot be reached");
                await carol.SendAsync("alice", "from carol meanwhile");
                var fromCarol = await listener.NextAsync<MessageReceived>(10);
                await Assert.That(fromCarol.Contact).IsEqualTo("carol");
                await Assert.That(fromCarol.Text).IsEqualTo("from carol meanwhile");
                await Assert.That(alice.Contacts.First(c => c.Name == "bob").Status).IsEqualTo(ContactStatus.Invited);
            });

            // Bob's relay is back: the same listener completes the join, then hands on what followed it.
            await Assert.That((await listener!.NextAsync<ContactJoined>()).Contact).IsEqualTo("bob");
            var fromBob = await listener.NextAsync<MessageReceived>();
            await Assert.That(fromBob.Contact).IsEqualTo("bob");
            await Assert.That(fromBob.Text).IsEqualTo("sent right after joining");
            await alice.SendAsync("bob", "hello bob");
            await using var bobListener = new Listener(bob);
            await Assert.That((await bobListener.NextAsync<MessageReceived>()).Text).IsEqualTo("hello bob");
            await bob.SendAsync("alice", "and back");
            await Assert.That((await listener.NextAsync<MessageReceived>()).Text).IsEqualTo("and back");
            await listener.DrainAsync();
            await Assert.That(listener.Seen.OfType<MessageRejected>()).IsEmpty();
            await Assert.That(listener.Seen.OfType<MessagesMissing>()).IsEmpty();
            await Assert.That(listener.Seen.OfType<ContactJoined>().Count(j => j.Contact == "bob")).IsEqualTo(1);
        }
        finally
        {
            if (listener != null) await listener.DisposeAsync();
        }
    }
    /// <summary>
    /// The inviter's listener gets a JOIN while another server answers at the joiner's relay address:
    /// listening does not end; the contact is reported (once), the other contacts go on, and the join
    /// completes once the way to the real relay is back.
    /// </summary>
    [Test]
    public async Task A_join_whose_joiners_relay_address_answers_another_server_does_not_end_listening()
    {
        await using var relay = await TestRelay.StartAsync();
        await using var other = await TestRelay.StartAsync();
        await using var impostor = await TestRelay.StartAsync();
        await using var path = ClientRecoveryTests.SwitchingProxy.Start(other.Server.RelayEndPoint);
        var bobRelay = other.Address with { Hosts = ["127.0.0.1"], Port = path.Port };
        await using var alice = new Messenger(new MemoryProfileStore(), Fast);
        await using var bob = new Messenger(new MemoryProfileStore(), Fast);
        await using var carol = await JoinedContactAsync(alice, relay, "carol");
        var (link, _) = await alice.InviteAsync(relay.Address, "bob");
        await bob.JoinAsync(link, bobRelay, "alice");

        path.Target = impostor.Server.RelayEndPoint;
        path.DropAll();
        await using var listener = new Listener(alice);
        var unavailable = await listener.NextAsync<ContactUnavailable>(10);
        await Assert.That(unavailable.Contact).IsEqualTo("bob");
        await Assert.That(unavailable.Reason).Contains("not the relay it names");
        await Assert.That(unavailable.Reason).Contains(other.Address.Fingerprint);
        await carol.SendAsync("alice", "from carol meanwhile");
        await Assert.That((await listener.NextAsync<MessageReceived>(10)).Text).IsEqualTo("from carol meanwhile");
        await Assert.That(await OperationsMetrics.EventuallyAsync(() => Task.FromResult(path.ConnectionsTo(impostor.Server.RelayEndPoint) >= 3), seconds: 10)).IsTrue();
        await listener.DrainAsync();
        await Assert.That(listener.Seen.OfType<ContactUnavailable>().Count()).IsEqualTo(1);

        path.Target = other.Server.RelayEndPoint;
        await Assert.That((await listener.NextAsync<ContactJoined>()).Contact).IsEqualTo("bob");
        await alice.SendAsync("bob", "hello bob");
        await using var bobListener = new Listener(bob);
        await Assert.That((await bobListener.NextAsync<MessageReceived>()).Text).IsEqualTo("hello bob");
        await bob.SendAsync("alice", "hello alice");
        await Assert.That((await listener.NextAsync<MessageReceived>()).Text).IsEqualTo("hello alice");
    }

    /// <summary>A contact named <paramref name="name"/> of <paramref name="inviter"/>, on <paramref name="relay"/>, joined and its JOIN handled.</summary>
    private static async Task<Messenger> JoinedContactAsync(Messenger inviter, TestRelay relay, string name)
    {
        var contact = new Messenger(new MemoryProfileStore(), Fast);
        var (link, _) = await inviter.InviteAsync(relay.Address, name);
        await contact.JoinAsync(link, name: "alice");
        await using var joined = new Listener(inviter);
        await Assert.That((await joined.NextAsync<ContactJoined>()).Contact).IsEqualTo(name);
        return contact;
    }

    [Test]
    public async Task A_contact_whose_queue_is_full_is_reported_and_retried_while_the_others_arrive()
    {
        await using var relay = await TestRelay.StartAsync(o => o.QueueMaxMessages = 2);
        var (alice, bob, _, _) = await ConnectedPairAsync(relay);
        await using (alice)
        await using (bob)
        {
            await using var carol = new Messenger(new MemoryProfileStore(), Fast);
            var (link, _) = await alice.InviteAsync(relay.Address, "carol");
            await carol.JoinAsync(link, name: "alice");
            await using (var joins = new Listener(alice))
            {
                await joins.NextAsync<ContactJoined>();
                await joins.NextAsync<ContactJoined>();
            }

            // Bob is offline: his queue takes two messages, and the relay refuses the third.
            await alice.SendAsync("bob", "one");
            await alice.SendAsync("bob", "two");
            var refused = await Assert.ThrowsAsync<RelayErrorException>(() => alice.SendAsync("bob", "three"));
            await Assert.That(refused!.Code).IsEqualTo(ErrorCode.Quota);
            await carol.SendAsync("alice", "from carol");

            // Alice listens: Carol's message arrives, and the message waiting for Bob is reported.
            await using var listener = new Listener(alice);
            await Assert.That((await listener.NextAsync<MessageReceived>()).Text).IsEqualTo("from carol");
            var stalled = listener.Seen.OfType<OutboxStalled>().FirstOrDefault() ?? await listener.NextAsync<OutboxStalled>();
            await Assert.That(stalled.Contact).IsEqualTo("bob");
            await Assert.That(stalled.Waiting).IsEqualTo(1);
            await Assert.That(stalled.Reason).Contains("QUOTA");

            // Bob reads his queue, which frees room: the waiting message follows, in order.
            await using var bobListener = new Listener(bob);
            var received = new List<string>();
            for (int i = 0; i < 3; i++) received.Add((await bobListener.NextAsync<MessageReceived>()).Text);
            await Assert.That(received).IsEquivalentTo(new[] { "one", "two", "three" }, TUnit.Assertions.Enums.CollectionOrdering.Matching);
            await bobListener.DrainAsync();
            await Assert.That(bobListener.Seen.OfType<MessagesMissing>()).IsEmpty();
            await Assert.That(bobListener.Seen.OfType<MessageRejected>()).IsEmpty();
        }
    }

    [Test]
    public async Task A_relay_that_is_down_holds_up_only_the_contacts_that_receive_on_it()
    {
        await using var relay = await TestRelay.StartAsync();
        await using var other = await TestRelay.StartAsync();
        var (alice, bob, _, _) = await ConnectedPairAsync(relay);
        await using (alice)
        await using (bob)
        {
            // Carol's JOIN waits on the other relay, which then stops.
            await using var carol = new Messenger(new MemoryProfileStore(), Fast);
            var (link, _) = await alice.InviteAsync(other.Address, "carol");
            await carol.JoinAsync(link, name: "alice");
            Listener? listener = null;
            try
            {
                await other.RestartAsync(async () =>
                {
                    listener = new Listener(alice);
                    await Assert.That((await listener.NextAsync<ContactJoined>(10)).Contact).IsEqualTo("bob");
                    await bob.SendAsync("alice", "while the other relay is down");
                    await Assert.That((await listener.NextAsync<MessageReceived>(10)).Text).IsEqualTo("while the other relay is down");
                });
                // The relay is back: the same listener gets Carol's JOIN.
                await Assert.That((await listener!.NextAsync<ContactJoined>()).Contact).IsEqualTo("carol");
            }
            finally
            {
                if (listener != null) await listener.DisposeAsync();
            }
        }
    }

    [Test]
    public async Task A_relay_that_is_down_holds_up_only_the_messages_to_send_to_it()
    {
        await using var relay = await TestRelay.StartAsync();
        await using var other = await TestRelay.StartAsync();
        await using var alice = new Messenger(new MemoryProfileStore(), Fast);
        await using var bob = new Messenger(new MemoryProfileStore(), Fast);
        var (link, _) = await alice.InviteAsync(relay.Address, "bob");
        await bob.JoinAsync(link, other.Address, "alice");   // Bob receives on the other relay
        await using (var joined = new Listener(alice))
        {
            await joined.NextAsync<ContactJoined>();
        }
        Listener? listener = null;
        try
        {
            await other.RestartAsync(async () =>
            {
                // A message to Bob waits in Alice's profile: his relay is down.
                using (var giveUp = new CancellationTokenSource(TimeSpan.FromSeconds(1)))
                {
                    await Assert.ThrowsAsync<OperationCanceledException>(() => alice.SendAsync("bob", "waited", giveUp.Token));
                }
                await bob.SendAsync("alice", "hello alice");
                listener = new Listener(alice);
                await Assert.That((await listener.NextAsync<MessageReceived>(10)).Text).IsEqualTo("hello alice");
            });
            // Bob's relay is back: Alice's listener sends what waited.
            await using var bobListener = new Listener(bob);
            await Assert.That((await bobListener.NextAsync<MessageReceived>()).Text).IsEqualTo("waited");
        }
        finally
        {
            if (listener != null) await listener.DisposeAsync();
        }
    }

    /// <summary>
    /// A message the app sends while it listens, which cannot go out (its contact's relay is down), is
    /// reported as waiting (OutboxStalled naming the relay, once, whether or not RetryFor bounds the
    /// app's calls) and sent by the listener once the relay is back: the app calls nothing more.
    /// </summary>
    [Test]
    [Arguments(false)]
    [Arguments(true)]
    public async Task A_message_sent_while_listening_that_could_not_go_out_is_reported_and_sent_by_the_listener_once_the_relay_is_back(bool retryBounded)
    {
        await using var relay = await TestRelay.StartAsync();
        await using var other = await TestRelay.StartAsync();
        var options = retryBounded
            ? new RelayClientOptions { ReconnectMin = Fast.ReconnectMin, ReconnectMax = Fast.ReconnectMax, RetryFor = TimeSpan.FromMilliseconds(500) }
            : Fast;
        await using var alice = new Messenger(new MemoryProfileStore(), options);
        await using var bob = new Messenger(new MemoryProfileStore(), Fast);
        var (link, _) = await alice.InviteAsync(relay.Address, "bob");
        await bob.JoinAsync(link, other.Address, "alice");   // Bob receives on the other relay
        await using var listener = new Listener(alice);
        await listener.NextAsync<ContactJoined>();

        await other.RestartAsync(async () =>
        {
            // Bob's relay is down: the message waits in Alice's profile (SendAsync gives up, or the app stops waiting).
            if (retryBounded)
            {
                await Assert.ThrowsAsync<RelayConnectException>(() => alice.SendAsync("bob", "sent while listening"));
            }
            else
            {
                using var giveUp = new CancellationTokenSource(TimeSpan.FromSeconds(1));
                await Assert.ThrowsAsync<OperationCanceledException>(() => alice.SendAsync("bob", "sent while listening", giveUp.Token));
            }
            // The listener tells the app that the message waits, and why: Bob's relay cannot be reached.
            var stalled = await listener.NextAsync<OutboxStalled>(10);
            await Assert.That(stalled.Contact).IsEqualTo("bob");
            await Assert.That(stalled.Waiting).IsEqualTo(1);
            await Assert.That(stalled.Reason).Contains("cannot be reached");
            await Assert.That(stalled.Reason).Contains(other.Address.ToString());
            // Once, not at every attempt of the back-off.
            await listener.DrainAsync(1500);
            await Assert.That(listener.Seen.OfType<OutboxStalled>().Count()).IsEqualTo(1);
        });

        // Bob's relay is back: Alice's listener sends the message, with no further call.
        await using var bobListener = new Listener(bob);
        await Assert.That((await bobListener.NextAsync<MessageReceived>()).Text).IsEqualTo("sent while listening");
    }

    /// <summary>
    /// The relay a listener both receives on and sends through stops: while the listener's connection
    /// is being made again (its back-off), a message sent meanwhile is reported as waiting at once, with
    /// what the reconnection meets (the relay cannot be reached: connection refused), not after a
    /// connection's timeout; it goes out once the relay is back.
    /// </summary>
    [Test]
    public async Task A_message_waiting_for_the_relay_the_listener_reconnects_to_is_reported_at_once_with_the_reason()
    {
        await using var relay = await TestRelay.StartAsync();
        var (alice, bob, _, _) = await ConnectedPairAsync(relay);
        await using (alice)
        await using (bob)
        {
            await using var listener = new Listener(alice);
            await listener.NextAsync<ContactJoined>();
            await relay.RestartAsync(async () =>
            {
                // The listener's connection is lost and is being made again.
                await Assert.That((await listener.NextAsync<ContactUnavailable>(10)).Reason).Contains("cannot be reached");
                using (var giveUp = new CancellationTokenSource(TimeSpan.FromSeconds(1)))
                {
                    await Assert.ThrowsAsync<OperationCanceledException>(() => alice.SendAsync("bob", "waited", giveUp.Token));
                }
                // Well within the client's ConnectTimeout (30 s).
                var stalled = await listener.NextAsync<OutboxStalled>(5);
                await Assert.That(stalled.Contact).IsEqualTo("bob");
                await Assert.That(stalled.Reason).Contains($"{relay.Address} cannot be reached (");
                await Assert.That(stalled.Reason).DoesNotContain("no answer within");
            });
            await using var bobListener = new Listener(bob);
            await Assert.That((await bobListener.NextAsync<MessageReceived>()).Text).IsEqualTo("waited");
        }
    }

    /// <summary>
    /// Another server answers at the address of the relay a listener both receives on and sends
    /// through: a message sent meanwhile is reported as waiting, saying that the server there is not
    /// the relay the address names (not that the relay cannot be reached), and goes out once the way
    /// to the real relay is back.
    /// </summary>
    [Test]
    public async Task A_message_waiting_while_another_server_answers_at_the_relays_address_is_reported_as_such()
    {
        await using var relay = await TestRelay.StartAsync();
        await using var impostor = await TestRelay.StartAsync();
        await using var path = ClientRecoveryTests.SwitchingProxy.Start(relay.Server.RelayEndPoint);
        var address = relay.Address with { Hosts = ["127.0.0.1"], Port = path.Port };
        await using var alice = new Messenger(new MemoryProfileStore(), Fast);
        await using var bob = new Messenger(new MemoryProfileStore(), Fast);
        var (link, _) = await alice.InviteAsync(address, "bob");
        await bob.JoinAsync(link, address, "alice");
        await using var listener = new Listener(alice);
        await listener.NextAsync<ContactJoined>();

        path.Target = impostor.Server.RelayEndPoint;
        path.DropAll();
        await Assert.That((await listener.NextAsync<ContactUnavailable>(10)).Reason).Contains("not the relay it names");
        try
        {
            using var giveUp = new CancellationTokenSource(TimeSpan.FromSeconds(1));
            await alice.SendAsync("bob", "waited", giveUp.Token);
            throw new InvalidOperationException("the message was sent through a server that is not the relay");
        }
        catch (Exception ex) when (ex is FingerprintMismatchException or OperationCanceledException)
        {
        }
        var stalled = await listener.NextAsync<OutboxStalled>(5);
        await Assert.That(stalled.Contact).IsEqualTo("bob");
        await Assert.That(stalled.Reason).Contains("is not the relay it names");
        await Assert.That(stalled.Reason).Contains(relay.Address.Fingerprint);

        path.Target = relay.Server.RelayEndPoint;
        await using var bobListener = new Listener(bob);
        await Assert.That((await bobListener.NextAsync<MessageReceived>()).Text).IsEqualTo("waited");
    }

    /// <summary>
    /// An app that shares its RelayClient with a Messenger and disposes it while the Messenger listens
    /// (with a join waiting for a relay that is down) ends the listening, with no exception; the join
    /// waits, unsaved, for the next listener.
    /// </summary>
    [Test]
    public async Task Listening_ends_when_the_app_disposes_the_client_it_shares()
    {
        await using var relay = await TestRelay.StartAsync();
        await using var other = await TestRelay.StartAsync();
        var client = new RelayClient(Fast);
        var aliceStore = new MemoryProfileStore();
        await using var alice = new Messenger(aliceStore, client);
        await using var bob = new Messenger(new MemoryProfileStore(), Fast);
        await using var carol = await JoinedContactAsync(alice, relay, "carol");
        var (link, _) = await alice.InviteAsync(relay.Address, "bob");
        await bob.JoinAsync(link, other.Address, "alice");   // Bob receives on the other relay
        Exception? ended = null;
        await other.RestartAsync(async () =>
        {
            await using var listener = new Listener(alice);
            // Bob's JOIN waits for the other relay.
            await Assert.That((await listener.NextAsync<ContactUnavailable>(10)).Contact).IsEqualTo("bob");
            await client.DisposeAsync();
            try
            {
                while (true) await listener.NextAsync<ConversationEvent>(10);
            }
            catch (Exception ex)
            {
                ended = ex;
            }
        });
        await Assert.That(ended is ChannelClosedException { InnerException: null }).IsTrue().Because($"listening ended with {ended}");
        // Bob's JOIN was neither saved nor acknowledged: another listener, on a client of its own, handles it.
        await using var again = new Messenger(aliceStore, Fast);
        await using var next = new Listener(again);
        await Assert.That((await next.NextAsync<ContactJoined>()).Contact).IsEqualTo("bob");
    }

    /// <summary>A text of 1,500 bytes: a 4,096-byte envelope.</summary>
    private static readonly string LargeText = new('x', 1500);

    /// <summary>
    /// A message whose envelope is over the maximum message size the contact's relay announced is
    /// refused before it is sealed: no chain step saved, nothing queued, and the next message is the
    /// next in line (no gap at the receiver). A later process knows the limit from the profile.
    /// </summary>
    [Test]
    public async Task A_message_over_the_relays_limit_is_refused_before_it_is_sealed()
    {
        await using var relay = await TestRelay.StartAsync(o => o.MaxMessage = 1000);
        var (alice, bob, aliceStore, bobStore) = await ConnectedPairAsync(relay);
        await using (alice)
        await using (bob)
        {
            await using var listener = new Listener(alice);
            await listener.NextAsync<ContactJoined>();
            var before = bobStore.Load().Find("alice")!;

            var refused = await Assert.ThrowsAsync<MessageTooLargeException>(() => bob.SendAsync("alice", LargeText));
            await Assert.That(refused!.Contact).IsEqualTo("alice");
            await Assert.That(refused.EnvelopeSize).IsEqualTo(4096);
            await Assert.That(refused.MaxMessage).IsEqualTo(1000);
            await Assert.That(refused.Sealed).IsFalse();
            await Assert.That(refused.MaxTextBytes).IsEqualTo(256 - 10 - 4 - 16 - 1);
            var after = bobStore.Load().Find("alice")!;
            await Assert.That(after.SendCounter).IsEqualTo(before.SendCounter);
            await Assert.That(after.SendChain).IsEquivalentTo(before.SendChain!);
            await Assert.That(after.Outbox).IsEmpty();

            // The inviter's side knows its contact's relay's limit too.
            await Assert.ThrowsAsync<MessageTooLargeException>(() => alice.SendAsync("bob", LargeText));
            await Assert.That(aliceStore.Load().Find("bob")!.Outbox).IsEmpty();

            // The longest text that fits goes out as the next message in line.
            await bob.SendAsync("alice", new string('y', refused.MaxTextBytes));
            var received = await listener.NextAsync<MessageReceived>();
            await Assert.That(received.Text.Length).IsEqualTo(refused.MaxTextBytes);
            await Assert.That(received.Counter).IsEqualTo(before.SendCounter);

            // Another process of Bob's profile refuses it too: the limit saved in the profile, which
            // the relay confirms.
            await using (var bobAgain = new Messenger(bobStore, Fast))
            {
                await Assert.ThrowsAsync<MessageTooLargeException>(() => bobAgain.SendAsync("alice", LargeText));
                await Assert.That(bobStore.Load().Find("alice")!.SendCounter).IsEqualTo(before.SendCounter + 1);
                await bobAgain.SendAsync("alice", "short");
            }
            await Assert.That((await listener.NextAsync<MessageReceived>()).Text).IsEqualTo("short");
            await listener.DrainAsync();
            await Assert.That(listener.Seen.OfType<MessagesMissing>()).IsEmpty();
            await Assert.That(listener.Seen.OfType<MessageRejected>()).IsEmpty();
        }
    }

    /// <summary>
    /// A profile that saved a relay's limit does not refuse a message over it on that alone: the limit
    /// may have been raised since, so the relay is asked first; only when it cannot be reached does the
    /// saved limit decide.
    /// </summary>
    [Test]
    public async Task A_message_over_the_limit_saved_in_the_profile_goes_out_when_the_relay_has_raised_it_since()
    {
        int maxMessage = 1000;
        await using var relay = await TestRelay.StartAsync(o => o.MaxMessage = maxMessage);
        var (alice, bob, _, bobStore) = await ConnectedPairAsync(relay);
        await using (alice)
        await using (bob)
        {
            await using var listener = new Listener(alice);
            await listener.NextAsync<ContactJoined>();
            await Assert.That(bobStore.Load().Find("alice")!.SendMaxMessage).IsEqualTo(1000);

            await relay.RestartAsync(async () =>
            {
                // Its operator raises the limit. While the relay is down, the saved limit decides.
                maxMessage = ProtocolConstants.DefaultMaxMessage;
                await using var offline = new Messenger(bobStore, new RelayClientOptions
                {
                    ConnectTimeout = TimeSpan.FromSeconds(1),
                    ReconnectMin = TimeSpan.FromMilliseconds(50),
                    ReconnectMax = TimeSpan.FromMilliseconds(500),
                });
                var refused = await Assert.ThrowsAsync<MessageTooLargeException>(() => offline.SendAsync("alice", LargeText));
                await Assert.That(refused!.MaxMessage).IsEqualTo(1000);
                await Assert.That(refused.Sealed).IsFalse();
            });

            // Another process of Bob's profile, which has not connected to the relay yet, asks it first.
            await using var bobAgain = new Messenger(bobStore, Fast);
            await bobAgain.SendAsync("alice", LargeText);
            await Assert.That((await listener.NextAsync<MessageReceived>()).Text).IsEqualTo(LargeText);
            await Assert.That(bobStore.Load().Find("alice")!.SendMaxMessage).IsEqualTo(ProtocolConstants.DefaultMaxMessage);
            await Assert.That(listener.Seen.OfType<MessagesMissing>()).IsEmpty();
        }
    }

    /// <summary>
    /// A message sealed before the relay's limit was known (a profile that never learned it) and
    /// refused by it is dropped, SendAsync says so, and the next message still arrives.
    /// </summary>
    [Test]
    public async Task A_message_sealed_before_the_relays_limit_was_known_is_dropped_and_SendAsync_says_so()
    {
        await using var relay = await TestRelay.StartAsync(o => o.MaxMessage = 1000);
        var (alice, bob, _, bobStore) = await ConnectedPairAsync(relay);
        await using (alice)
        await using (bob)
        {
            await using var listener = new Listener(alice);
            await listener.NextAsync<ContactJoined>();
            bobStore.Update(profile => profile.Find("alice")!.SendMaxMessage = null);

            await using var bobAgain = new Messenger(bobStore, Fast);
            var refused = await Assert.ThrowsAsync<MessageTooLargeException>(() => bobAgain.SendAsync("alice", LargeText));
            await Assert.That(refused!.Sealed).IsTrue();
            await Assert.That(refused.MaxMessage).IsEqualTo(1000);
            await Assert.That(bobStore.Load().Find("alice")!.Outbox).IsEmpty();
            // SendAsync told the app: no listener reports it again.
            await Assert.That(bobStore.Load().Find("alice")!.Dropped).IsEmpty();

            await bobAgain.SendAsync("alice", "next");
            var missing = await listener.NextAsync<MessagesMissing>();
            await Assert.That(missing.Count).IsEqualTo(1UL);
            await Assert.That((await listener.NextAsync<MessageReceived>()).Text).IsEqualTo("next");
        }
    }

    /// <summary>
    /// An envelope queued while the relay's limit allowed it, which the relay then refuses for good
    /// (its operator lowered the limit), is dropped from the outbox and reported as MessageDropped, and
    /// the messages behind it go on; the receiver reports the gap and decrypts the next message. The
    /// drop happens in the listener's outbox work, or in the next SendAsync (and the next listener reports it).
    /// </summary>
    [Test]
    [Arguments(true)]
    [Arguments(false)]
    public async Task An_envelope_the_relay_refuses_for_good_is_dropped_and_reported_and_the_next_ones_go_on(bool listening)
    {
        int maxMessage = ProtocolConstants.DefaultMaxMessage;
        await using var relay = await TestRelay.StartAsync(o => o.MaxMessage = maxMessage);
        var (alice, bob, _, bobStore) = await ConnectedPairAsync(relay);
        await using (alice)
        await using (bob)
        {
            await using (var joins = new Listener(alice))
            {
                await joins.NextAsync<ContactJoined>();
            }
            await relay.RestartAsync(async () =>
            {
                // Queued while the relay is down; its operator then lowers its limit.
                foreach (var text in new[] { LargeText, "behind the large one" })
                {
                    using var giveUp = new CancellationTokenSource(TimeSpan.FromMilliseconds(500));
                    await Assert.ThrowsAsync<OperationCanceledException>(() => bob.SendAsync("alice", text, giveUp.Token));
                }
                maxMessage = 1000;
            });
            await Assert.That(bobStore.Load().Find("alice")!.Outbox.Count).IsEqualTo(2);

            if (!listening)
            {
                await bob.SendAsync("alice", "sent after the restart");
            }
            await using var bobListener = new Listener(bob);
            var dropped = await bobListener.NextAsync<MessageDropped>();
            await Assert.That(dropped.Contact).IsEqualTo("alice");
            await Assert.That(dropped.Reason).Contains("TOO_LARGE");

            await using var aliceListener = new Listener(alice);
            var missing = await aliceListener.NextAsync<MessagesMissing>();
            await Assert.That(missing.Count).IsEqualTo(1UL);
            await Assert.That((await aliceListener.NextAsync<MessageReceived>()).Text).IsEqualTo("behind the large one");
            if (!listening)
            {
                await Assert.That((await aliceListener.NextAsync<MessageReceived>()).Text).IsEqualTo("sent after the restart");
            }
            await bobListener.DrainAsync();
            await Assert.That(bobListener.Seen.OfType<MessageDropped>().Count()).IsEqualTo(1);
            await Assert.That(bobListener.Seen.OfType<OutboxStalled>()).IsEmpty();
            await Assert.That(bobStore.Load().Find("alice")!.Outbox).IsEmpty();
            // The relay's new limit is known now: the large message is refused before it is sealed.
            await Assert.ThrowsAsync<MessageTooLargeException>(() => bob.SendAsync("alice", LargeText));
        }
    }

    [Test]
    public async Task A_message_comes_again_until_the_app_has_asked_for_the_event_after_it()
    {
        await using var relay = await TestRelay.StartAsync();
        var (alice, bob, aliceStore, _) = await ConnectedPairAsync(relay);
        await using (bob)
        {
            await using (alice)
            {
                await using (var joined = new Listener(alice))
                {
                    await joined.NextAsync<ContactJoined>();
                }
                await bob.SendAsync("alice", "important");

                // The app's handling of the message throws: the next listener gets it again.
                using (var cts = new CancellationTokenSource(TimeSpan.FromSeconds(20)))
                {
                    await Assert.ThrowsAsync<IOException>(async () =>
                    {
                        await foreach (var e in alice.ListenAsync(cts.Token))
                        {
                            if (e is MessageReceived) throw new IOException("the app's database is full");
                        }
                    });
                }
                // The app leaves the loop after the message without acknowledging it: it comes again.
                await Assert.That(await FirstMessageAsync(alice)).IsEqualTo("important");
            }

            // The app's process ended there: the next one gets the message from the relay again, and
            // handles it (acknowledging it before it leaves the loop).
            await using (var restarted = new Messenger(aliceStore, Fast))
            {
                await Assert.That(await FirstMessageAsync(restarted, acknowledge: true)).IsEqualTo("important");
            }

            // Handled: it never comes again, and the conversation goes on.
            await using var again = new Messenger(aliceStore, Fast);
            await using var listener = new Listener(again);
            await bob.SendAsync("alice", "next");
            await Assert.That((await listener.NextAsync<MessageReceived>()).Text).IsEqualTo("next");
            await listener.DrainAsync();
            await Assert.That(listener.Seen.OfType<MessageReceived>().Count()).IsEqualTo(1);
            await Assert.That(listener.Seen.OfType<MessageRejected>()).IsEmpty();
            await Assert.That(listener.Seen.OfType<MessagesMissing>()).IsEmpty();
        }
    }

    /// <summary>Listens until the first message and leaves the loop there (acknowledging it first if asked).</summary>
    private static async Task<string?> FirstMessageAsync(Messenger messenger, bool acknowledge = false)
    {
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(20));
        await foreach (var e in messenger.ListenAsync(cts.Token))
        {
            if (e is MessageReceived m)
            {
                if (acknowledge) messenger.Acknowledge();
                return m.Text;
            }
        }
        return null;
    }

    [Test]
    public async Task A_second_listener_on_the_same_client_is_refused_and_the_first_goes_on()
    {
        await using var relay = await TestRelay.StartAsync();
        var (alice, bob, _, _) = await ConnectedPairAsync(relay);
        await using (alice)
        await using (bob)
        {
            await using var first = new Listener(alice);
            await Assert.That((await first.NextAsync<ContactJoined>()).Contact).IsEqualTo("bob");
            using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(20));
            await Assert.ThrowsAsync<InvalidOperationException>(async () =>
            {
                await foreach (var _ in alice.ListenAsync(cts.Token)) { }
            });
            await bob.SendAsync("alice", "still here");
            await Assert.That((await first.NextAsync<MessageReceived>()).Text).IsEqualTo("still here");
        }
    }

    [Test]
    public async Task Two_clients_converse_both_ways_and_offline_messages_arrive_in_order()
    {
        await using var relay = await TestRelay.StartAsync();
        var (alice, bob, aliceStore, _) = await ConnectedPairAsync(relay);
        await using (bob)
        {
            await using (var aliceListener = new Listener(alice))
            {
                await Assert.That((await aliceListener.NextAsync<ContactJoined>()).Contact).IsEqualTo("bob");
                await bob.SendAsync("alice", "hello alice");
                await Assert.That((await aliceListener.NextAsync<MessageReceived>()).Text).IsEqualTo("hello alice");
            }
            await alice.DisposeAsync();

            // Alice is offline: Bob writes three messages.
            foreach (var text in new[] { "one", "two", "three" })
            {
                await bob.SendAsync("alice", text);
            }

            // Alice comes back with her saved profile and gets them in order, then answers.
            await using var aliceAgain = new Messenger(aliceStore, Fast);
            await using var listener = new Listener(aliceAgain);
            var received = new List<string>();
            for (int i = 0; i < 3; i++) received.Add((await listener.NextAsync<MessageReceived>()).Text);
            await Assert.That(received).IsEquivalentTo(new[] { "one", "two", "three" }, TUnit.Assertions.Enums.CollectionOrdering.Matching);

            await aliceAgain.SendAsync("bob", "hi bob");
            await using var bobListener = new Listener(bob);
            var reply = await bobListener.NextAsync<MessageReceived>();
            await Assert.That(reply.Text).IsEqualTo("hi bob");
            await Assert.That(reply.Contact).IsEqualTo("alice");
            await Assert.That((await listener.DrainAsync()).OfType<MessageRejected>().Count()).IsEqualTo(0);
        }
    }

    [Test]
    public async Task Relay_restart_mid_conversation_delivers_every_message_exactly_once()
    {
        await using var relay = await TestRelay.StartAsync();
        var (alice, bob, _, _) = await ConnectedPairAsync(relay);
        await using (alice)
        await using (bob)
        {
            await using var listener = new Listener(alice);
            await listener.NextAsync<ContactJoined>();
            const int total = 40;
            var sender = Task.Run(async () =>
            {
                for (int i = 0; i < total; i++)
                {
                    await bob.SendAsync("alice", $"m{i}");
                    await Task.Delay(10);
                }
            });
            await Task.Delay(150);
            await relay.RestartAsync();
            await sender.WaitAsync(TimeSpan.FromSeconds(60));

            var texts = new List<string>();
            for (int i = 0; i < total; i++) texts.Add((await listener.NextAsync<MessageReceived>(30)).Text);
            await Assert.That(texts).IsEquivalentTo(Enumerable.Range(0, total).Select(i => $"m{i}"), TUnit.Assertions.Enums.CollectionOrdering.Matching);
            var extra = await listener.DrainAsync(1000);
            await Assert.That(extra.OfType<MessageReceived>().Count()).IsEqualTo(0);
        }
    }

    [Test]
    public async Task Downloaded_bytes_differ_from_uploaded_and_every_envelope_length_is_a_padding_size()
    {
        // Plain TCP, so the bytes recorded below are the frames themselves (under TLS they would be
        // TLS records, which differ from anything trivially).
        await using var relay = await TestRelay.StartAsync(o => o.Tls = false);
        var plain = new RelayClientOptions { ReconnectMin = Fast.ReconnectMin, ReconnectMax = Fast.ReconnectMax, Tls = false };
        var (alice, bob, aliceStore, _) = await ConnectedPairAsync(relay, options: plain);
        await using (alice)
        await using (bob)
        {
            var lengths = new[] { 0, 1, 100, 226, 227, 1000, 3000, 5000, 16000 };
            foreach (var n in lengths)
            {
                await bob.SendAsync("alice", new string('x', n));
            }
            var contact = aliceStore.Load().Find("bob")!;
            var queue = new RecipientQueue(contact.RecipientId, contact.ReceiveSenderId, contact.RecipientPrivate, contact.DeliveryKey);
            var wire = new RecordingStream(relay.Server.ConnectInProcess());
            await using var raw = await RelayConnection.ConnectAsync(relay.Address, wire, new RelayConnectionOptions { Tls = false });
            await raw.SubscribeAsync(queue);
            using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(20));
            var envelopes = new List<byte[]>();
            for (int i = 0; i < lengths.Length + 1; i++) // the JOIN, then every message
            {
                var e = await raw.Events.ReadAsync(cts.Token);
                var d = ((DeliveryEvent)e).Delivery;
                await Assert.That(E2eCrypto.PaddedSizes.Contains(d.Body.Length)).IsTrue();
                envelopes.Add(d.Body);
                await raw.AckAsync(queue, d.MessageId);
            }

            // Every MSG frame that came down carries one envelope plus the delivery seal, and the
            // uploaded envelope appears nowhere in the downloaded bytes (not even 32 bytes of it).
            var downloaded = wire.Received();
            var msgPayloads = RecordingStream.Frames(downloaded).Where(f => f.Type == FrameType.Msg).Select(f => f.PayloadLength).ToList();
            await Assert.That(msgPayloads).IsEquivalentTo(envelopes.Select(b => b.Length + ProtocolConstants.MsgOverhead).ToList());
            foreach (var envelope in envelopes)
            {
                for (int at = 0; at + 32 <= envelope.Length; at += 32)
                {
                    await Assert.That(downloaded.AsSpan().IndexOf(envelope.AsSpan(at, 32)) < 0).IsTrue();
                }
            }
            var tooLong = await Assert.ThrowsAsync<ArgumentException>(() => bob.SendAsync("alice", new string('x', 17000)));
            await Assert.That(tooLong!.Message).Contains("too long");
        }
    }

    /// <summary>A transport that keeps a copy of every byte it reads (what the relay sent).</summary>
    private sealed class RecordingStream(Stream inner) : PassThroughStream(inner)
    {
        private readonly MemoryStream _received = new();

        public byte[] Received()
        {
            lock (_received) return _received.ToArray();
        }

        /// <summary>The frames in <paramref name="bytes"/>: type and payload length (docs/PROTOCOL.md §2).</summary>
        public static List<(FrameType Type, int PayloadLength)> Frames(byte[] bytes)
        {
            var frames = new List<(FrameType, int)>();
            var rest = new ReadOnlySequence<byte>(bytes);
            while (FrameReader.TryRead(ref rest, int.MaxValue, out var frame))
            {
                var view = new FrameView(frame.ToArray());
                frames.Add((view.Type, view.Payload.Length));
            }
            return frames;
        }

        public override async ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default)
        {
            int n = await Inner.ReadAsync(buffer, cancellationToken);
            lock (_received) _received.Write(buffer.Span.Slice(0, n));
            return n;
        }
    }

    [Test]
    public async Task Tampered_replayed_and_reordered_ciphertext_is_rejected_and_the_conversation_goes_on()
    {
        await using var relay = await TestRelay.StartAsync();
        var (alice, bob, _, bobStore) = await ConnectedPairAsync(relay);
        await using (alice)
        await using (bob)
        {
            await using var listener = new Listener(alice);
            await listener.NextAsync<ContactJoined>();

            // Seal three envelopes with Bob's real chain, as his device would, and deliver them ourselves.
            var envelopes = bobStore.Update(p =>
            {
                var c = p.Find("alice")!;
                var list = new List<byte[]>();
                for (int i = 0; i < 3; i++)
                {
                    var chain = c.SendChain!;
                    list.Add(E2eCrypto.Seal(E2eCrypto.KindMessage, c.SendCounter, chain, [1, .. "e"u8.ToArray(), (byte)('0' + i)]));
                    c.SendChain = chain;
                    c.SendCounter++;
                }
                return list;
            });
            var bobContact = bobStore.Load().Find("alice")!;
            var senderQueue = new SenderQueue(bobContact.SendSenderId!, bobContact.SenderPrivate);
            await using var wire = await relay.ConnectAsync();

            var tampered = (byte[])envelopes[0].Clone();
            tampered[40] ^= 0x01;
            await wire.SendAsync(senderQueue, tampered);
            var rejected = await listener.NextAsync<MessageRejected>();
            await Assert.That(rejected.Error).IsEqualTo(EnvelopeError.Tampered);
            await Assert.That(rejected.Reason).Contains("authentication");

            await wire.SendAsync(senderQueue, envelopes[0]);
            await Assert.That((await listener.NextAsync<MessageReceived>()).Text).IsEqualTo("e0");

            // The same envelope again, as its sender sends it after a SEND whose answer was lost (the
            // relay stores it again): absorbed, no event.
            await wire.SendAsync(senderQueue, envelopes[0]);

            // Reordered: the third arrives before the second.
            await wire.SendAsync(senderQueue, envelopes[2]);
            var gap = await listener.NextAsync<MessagesMissing>();
            await Assert.That(gap.Count).IsEqualTo(1UL);
            await Assert.That((await listener.NextAsync<MessageReceived>()).Text).IsEqualTo("e2");
            await Assert.That(listener.Seen.OfType<MessageRejected>().Count()).IsEqualTo(1).Because("only the tampered envelope was refused");

            // A replay of an envelope older than the last one accepted is refused.
            await wire.SendAsync(senderQueue, envelopes[0]);
            var replay = await listener.NextAsync<MessageRejected>();
            await Assert.That(replay.Error).IsEqualTo(EnvelopeError.Replayed);
            await Assert.That(replay.Reason).Contains("replayed");
            await wire.SendAsync(senderQueue, envelopes[1]);
            await Assert.That((await listener.NextAsync<MessageRejected>()).Error).IsEqualTo(EnvelopeError.Replayed);

            var garbage = new byte[256];
            await wire.SendAsync(senderQueue, garbage);
            await Assert.That((await listener.NextAsync<MessageRejected>()).Error).IsEqualTo(EnvelopeError.Malformed);

            // And the conversation goes on.
            await bob.SendAsync("alice", "still here");
            await Assert.That((await listener.NextAsync<MessageReceived>()).Text).IsEqualTo("still here");
        }
    }

    [Test]
    public async Task Queues_of_one_conversation_may_live_on_different_relays()
    {
        await using var relayA = await TestRelay.StartAsync();
        await using var relayB = await TestRelay.StartAsync();
        await using var alice = new Messenger(new MemoryProfileStore(), Fast);
        await using var bob = new Messenger(new MemoryProfileStore(), Fast);
        var (link, _) = await alice.InviteAsync(relayA.Address, "bob");
        await bob.JoinAsync(link, relayB.Address, "alice");
        await using var aliceListener = new Listener(alice);
        await aliceListener.NextAsync<ContactJoined>();
        await alice.SendAsync("bob", "via relay B");
        await using var bobListener = new Listener(bob);
        await Assert.That((await bobListener.NextAsync<MessageReceived>()).Text).IsEqualTo("via relay B");
        await Assert.That(relayB.Server.Store.Statistics.MessagesAppended).IsGreaterThan(0);
    }
}
