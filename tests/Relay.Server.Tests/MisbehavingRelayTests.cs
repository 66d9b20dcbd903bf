using Relay.Client;
using Relay.Client.Transport;
using Relay.Protocol;
using static Relay.Server.Tests.OperationsMetrics;
using static Relay.Server.Tests.ScriptedRelay.Session;

namespace Relay.Server.Tests;

/// <summary>
/// The SDK holds the relay to the delivery windows it granted (PROTOCOL.md §6): a relay that pushes a
/// queue's messages beyond the window, or messages of a queue the connection never subscribed, breaks
/// the protocol, and the connection fails with that error instead of letting the app's deliveries grow
/// without bound. What was delivered before stays readable. A relay that follows the protocol, with
/// its races (a push before the answer to the ACK that released it, an ACK that crosses a new SUB, a
/// subscription restarted after an ACK answered INTERNAL, an END that crosses a newer SUB), never
/// trips the check.
/// </summary>
public class MisbehavingRelayTests
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(10);

    /// <summary>Subscribes the queue with <paramref name="window"/>; the relay answers OK. Returns the SUB frame.</summary>
    private static async Task<RawFrame> SubscribeAsync(RelayConnection client, ScriptedRelay.Session relay, RecipientQueue queue, int window)
    {
        var subscribing = client.SubscribeAsync(queue, window);
        var sub = await relay.ExpectAsync(FrameType.Sub);
        await relay.SendAsync(Ok(sub.Correlation));
        await subscribing.WaitAsync(Timeout);
        return sub;
    }

    /// <summary>The deliveries read before the event stream ended, and the error it ended with (null: it completed).</summary>
    private static async Task<(List<Delivery> Delivered, Exception? Error)> DrainAsync(RelayConnection client)
    {
        var delivered = new List<Delivery>();
        using var cts = new CancellationTokenSource(Timeout);
        try
        {
            await foreach (var e in client.Events.ReadAllAsync(cts.Token))
            {
                if (e is DeliveryEvent d) delivered.Add(d.Delivery);
            }
            return (delivered, null);
        }
        catch (OperationCanceledException) when (cts.IsCancellationRequested)
        {
            throw new TimeoutException($"the event stream did not end ({delivered.Count} deliveries read)");
        }
        catch (Exception ex)
        {
            return (delivered, ex);
        }
    }

    /// <summary>What an app sees once the relay broke the protocol: the same clear error everywhere, and a closed connection.</summary>
    private static async Task<RelayConnectException> AssertBrokeTheProtocolAsync(RelayConnection client, ScriptedRelay.Session relay,
        Task pending, Exception? streamError, string reason)
    {
        var failed = await Assert.ThrowsAsync<RelayConnectException>(() => pending.WaitAsync(Timeout));
        await Assert.That(failed!.Message).StartsWith("the relay broke the protocol: ");
        await Assert.That(failed.Message).Contains(reason);
        await Assert.That(failed.Message).EndsWith("; the connection was closed");
        await Assert.That(failed.InnerException).IsTypeOf<ProtocolException>();
        await Assert.That(streamError).IsSameReferenceAs(failed);
        await Assert.That(client.Failure).IsSameReferenceAs(failed);
        await Assert.That(client.Closed.IsCancellationRequested).IsTrue();
        await Assert.That(await relay.ClosedByClientAsync(Timeout)).IsTrue();
        // A request after it fails at once with the same error.
        var later = await Assert.ThrowsAsync<RelayConnectException>(() => client.PingAsync());
        await Assert.That(later).IsSameReferenceAs(failed);
        return failed;
    }

    [Test]
    [Arguments(1)]
    [Arguments(2)]
    [Arguments(32)]
    public async Task A_relay_that_pushes_one_message_beyond_the_window_fails_the_connection_with_a_protocol_error(int window)
    {
        await using var fake = ScriptedRelay.Start();
        var (client, relay) = await fake.ConnectAsync();
        await using var _ = client;
        var queue = ScriptedRelay.NewQueue();
        var sub = await SubscribeAsync(client, relay, queue, window);
        // A window of 1 is the SUB of a relay/1 client without windows: no args.
        await Assert.That(sub.Payload.Length).IsEqualTo(ProtocolConstants.IdSize + (window == 1 ? 0 : 2) + ProtocolConstants.MacSize);

        var ping = client.PingAsync();
        await relay.ExpectAsync(FrameType.Ping);   // never answered
        var pushes = Enumerable.Range(1, window + 1).Select(i => relay.Msg(queue, 100 + (ulong)i)).ToArray();
        await relay.SendAsync(pushes);

        var (delivered, streamError) = await DrainAsync(client);
        await Assert.That(delivered.Select(d => d.MessageId)).IsEquivalentTo(Enumerable.Range(1, window).Select(i => 100 + (ulong)i));
        await AssertBrokeTheProtocolAsync(client, relay, ping, streamError, $"beyond the delivery window of {window}");
    }

    [Test]
    public async Task A_relay_that_pushes_beyond_a_window_above_the_maximum_is_held_to_the_window_it_grants()
    {
        // The relay grants at most 64, whatever the SUB asks for: the 65th push is one too many.
        await using var fake = ScriptedRelay.Start();
        var (client, relay) = await fake.ConnectAsync();
        await using var _ = client;
        var queue = ScriptedRelay.NewQueue();
        await SubscribeAsync(client, relay, queue, 1000);
        var ping = client.PingAsync();
        await relay.ExpectAsync(FrameType.Ping);
        await relay.SendAsync(Enumerable.Range(1, ProtocolConstants.MaxDeliveryWindow + 1).Select(i => relay.Msg(queue, (ulong)i)).ToArray());
        var (delivered, streamError) = await DrainAsync(client);
        await Assert.That(delivered.Count).IsEqualTo(ProtocolConstants.MaxDeliveryWindow);
        await AssertBrokeTheProtocolAsync(client, relay, ping, streamError, "beyond the delivery window of 64");
    }

    [Test]
    public async Task A_relay_that_pushes_a_message_of_a_queue_never_subscribed_fails_the_connection_with_a_protocol_error()
    {
        await using var fake = ScriptedRelay.Start();
        var (client, relay) = await fake.ConnectAsync();
        await using var _ = client;
        var subscribed = ScriptedRelay.NewQueue();
        await SubscribeAsync(client, relay, subscribed, 4);
        var ping = client.PingAsync();
        await relay.ExpectAsync(FrameType.Ping);
        await relay.SendAsync(relay.Msg(subscribed, 1), relay.Msg(ScriptedRelay.NewQueue(), 2));

        var (delivered, streamError) = await DrainAsync(client);
        await Assert.That(delivered.Select(d => d.MessageId)).IsEquivalentTo(new ulong[] { 1 });
        await AssertBrokeTheProtocolAsync(client, relay, ping, streamError, "a queue this connection has not subscribed");
    }

    [Test]
    public async Task A_relay_that_pushes_a_message_of_a_queue_whose_sub_it_refused_fails_the_connection_with_a_protocol_error()
    {
        await using var fake = ScriptedRelay.Start();
        var (client, relay) = await fake.ConnectAsync();
        await using var _ = client;
        var queue = ScriptedRelay.NewQueue();
        var subscribing = client.SubscribeAsync(queue, 8);
        var sub = await relay.ExpectAsync(FrameType.Sub);
        await relay.SendAsync(Error(sub.Correlation, ErrorCode.Auth));
        var refused = await Assert.ThrowsAsync<RelayErrorException>(() => subscribing.WaitAsync(Timeout));
        await Assert.That(refused!.Code).IsEqualTo(ErrorCode.Auth);

        var ping = client.PingAsync();
        await relay.ExpectAsync(FrameType.Ping);
        await relay.SendAsync(relay.Msg(queue, 1));
        var (delivered, streamError) = await DrainAsync(client);
        await Assert.That(delivered).IsEmpty();
        await AssertBrokeTheProtocolAsync(client, relay, ping, streamError, "a queue this connection has not subscribed");
    }

    [Test]
    public async Task A_relay_that_goes_on_pushing_after_it_ended_a_subscription_is_held_to_that_subscription_window()
    {
        await using var fake = ScriptedRelay.Start();
        var (client, relay) = await fake.ConnectAsync();
        await using var _ = client;
        var queue = ScriptedRelay.NewQueue();
        await SubscribeAsync(client, relay, queue, 2);
        var ping = client.PingAsync();
        await relay.ExpectAsync(FrameType.Ping);
        // One place is left after the END (an END may cross a newer SUB's pushes); the second push after it is one too many.
        await relay.SendAsync(relay.Msg(queue, 1), End(queue), relay.Msg(queue, 2), relay.Msg(queue, 3));

        var (delivered, streamError) = await DrainAsync(client);
        await Assert.That(delivered.Select(d => d.MessageId)).IsEquivalentTo(new ulong[] { 1 });
        await AssertBrokeTheProtocolAsync(client, relay, ping, streamError, "beyond the delivery window of 2");
    }

    /// <summary>A <see cref="RelayClient"/> over plain TCP that reconnects within half a second.</summary>
    private static RelayClient ReconnectingClient(int window) => new(new RelayClientOptions
    {
        Tls = false,
        DeliveryWindow = window,
        ReconnectMin = TimeSpan.FromMilliseconds(50),
        ReconnectMax = TimeSpan.FromMilliseconds(500),
    });

    [Test]
    public async Task A_relay_client_replaces_a_connection_whose_relay_broke_the_protocol_and_keeps_what_it_delivered()
    {
        await using var fake = ScriptedRelay.Start();
        await using var client = ReconnectingClient(window: 2);
        var queue = ScriptedRelay.NewQueue();
        var first = fake.AcceptOneAsync();
        var subscribing = client.SubscribeAsync(fake.Address, queue);
        var relay = await first;
        var sub = await relay.ExpectAsync(FrameType.Sub);
        var second = fake.AcceptOneAsync();
        await relay.SendAsync(Ok(sub.Correlation), relay.Msg(queue, 1), relay.Msg(queue, 2), relay.Msg(queue, 3));

        // The client connects again and renews the subscription; the two messages delivered before
        // the violation are there to read (the new connection's copies of them, pushed while they
        // wait unread, are not queued twice), and the message the new connection adds follows.
        var again = await second;
        var renewed = await again.ExpectAsync(FrameType.Sub);
        await again.SendAsync(Ok(renewed.Correlation), again.Msg(queue, 1), again.Msg(queue, 2));
        await subscribing.WaitAsync(Timeout);
        var ack = client.RunAsync(fake.Address, c => c.AckAsync(queue, 1));
        await again.SendAsync(Ok((await again.ExpectAsync(FrameType.Ack)).Correlation), again.Msg(queue, 3));
        await ack.WaitAsync(Timeout);
        using var cts = new CancellationTokenSource(Timeout);
        var read = new List<ulong>();
        await foreach (var d in client.DeliveriesAsync(cts.Token))
        {
            read.Add(d.Delivery.MessageId);
            if (d.Delivery.MessageId == 3) break;
        }
        await Assert.That(read).IsEquivalentTo(new ulong[] { 1, 2, 3 });
        await Assert.That(await relay.ClosedByClientAsync(Timeout)).IsTrue();
    }

    [Test]
    public async Task An_app_that_does_not_read_while_its_connection_comes_and_goes_holds_each_message_once()
    {
        await using var fake = ScriptedRelay.Start();
        await using var client = ReconnectingClient(window: 6);
        var queue = ScriptedRelay.NewQueue();
        var next = fake.AcceptOneAsync();
        var subscribing = client.SubscribeAsync(fake.Address, queue);
        // Three connections in turn, each lost after the relay pushed the unacknowledged messages
        // again (as a relay does for a new subscription) and one new message, the app reading none
        // of them meanwhile. The new one arriving shows the copies before it were handled.
        for (int connection = 1; connection <= 3; connection++)
        {
            var relay = await next;
            var sub = await relay.ExpectAsync(FrameType.Sub);
            next = fake.AcceptOneAsync();
            var pushes = new List<Action<System.Buffers.IBufferWriter<byte>>> { Ok(sub.Correlation) };
            for (ulong id = 1; id <= (ulong)(3 + connection); id++) pushes.Add(relay.Msg(queue, id));
            await relay.SendAsync([.. pushes]);
            await subscribing.WaitAsync(Timeout);
            int expected = 3 + connection;
            await Assert.That(await EventuallyAsync(() => Task.FromResult(client.Deliveries.Count >= expected))).IsTrue();
            await Assert.That(client.Deliveries.Count).IsEqualTo(expected);
            relay.Dispose();
        }

        // Each message once. Messages the app has read and not acknowledged are delivered again when
        // a new subscription pushes them again (at-least-once, as without the client in between).
        using var cts = new CancellationTokenSource(Timeout);
        var read = new List<ulong>();
        await foreach (var d in client.DeliveriesAsync(cts.Token))
        {
            read.Add(d.Delivery.MessageId);
            if (read.Count == 6)
            {
                await Assert.That(client.Deliveries.Count).IsEqualTo(0);
                var again = await next;
                var sub = await again.ExpectAsync(FrameType.Sub);
                await again.SendAsync([Ok(sub.Correlation), .. Enumerable.Range(1, 6).Select(id => again.Msg(queue, (ulong)id))]);
            }
            if (read.Count == 12) break;
        }
        await Assert.That(read).IsEquivalentTo(new ulong[] { 1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6 });
    }

    // A relay that follows the protocol, with its races: the check lets every push through.

    /// <summary>Reads <paramref name="count"/> deliveries; the connection must still be up.</summary>
    private static async Task<List<ulong>> ReadDeliveriesAsync(RelayConnection client, int count)
    {
        var ids = new List<ulong>();
        using var cts = new CancellationTokenSource(Timeout);
        while (ids.Count < count)
        {
            if (await client.Events.ReadAsync(cts.Token) is DeliveryEvent d) ids.Add(d.Delivery.MessageId);
        }
        return ids;
    }

    /// <summary>The connection is still up: a PING gets its PONG.</summary>
    private static async Task AssertStillUpAsync(RelayConnection client, ScriptedRelay.Session relay)
    {
        var ping = client.PingAsync();
        var frame = await relay.ExpectAsync(FrameType.Ping);
        await relay.SendAsync(w => FrameWriter.WriteEmpty(w, FrameType.Pong, frame.Correlation));
        await ping.WaitAsync(Timeout);
        await Assert.That(client.Failure).IsNull();
    }

    [Test]
    [Arguments(1, false)]
    [Arguments(3, false)]
    [Arguments(3, true)]
    public async Task Messages_pushed_as_an_ack_is_accepted_before_its_answer_are_within_the_window(int window, bool through)
    {
        await using var fake = ScriptedRelay.Start();
        var (client, relay) = await fake.ConnectAsync();
        await using var _ = client;
        var queue = ScriptedRelay.NewQueue();
        await SubscribeAsync(client, relay, queue, window);
        ulong next = 1;
        await relay.SendAsync(Enumerable.Range(0, window).Select(_ => relay.Msg(queue, next++)).ToArray());
        var delivered = await ReadDeliveriesAsync(client, window);
        for (int round = 0; round < 5; round++)
        {
            // The relay frees the places when it accepts the ACK and pushes the next messages at
            // once; the OK follows once the delete is on disk.
            var acking = through ? client.AckThroughAsync(queue, delivered[^1]) : client.AckAsync(queue, delivered[0]);
            var ack = await relay.ExpectAsync(FrameType.Ack);
            await Assert.That(AckOf(ack)).IsEqualTo((through ? delivered[^1] : delivered[0], through));
            int freed = through ? delivered.Count : 1;
            delivered.RemoveRange(0, freed);
            await relay.SendAsync([.. Enumerable.Range(0, freed).Select(_ => relay.Msg(queue, next++)), Ok(ack.Correlation)]);
            delivered.AddRange(await ReadDeliveriesAsync(client, freed));
            await acking.WaitAsync(Timeout);
        }
        await AssertStillUpAsync(client, relay);
    }

    [Test]
    public async Task An_ack_sent_after_a_new_sub_frees_places_of_the_new_subscription()
    {
        await using var fake = ScriptedRelay.Start();
        var (client, relay) = await fake.ConnectAsync();
        await using var _ = client;
        var queue = ScriptedRelay.NewQueue();
        await SubscribeAsync(client, relay, queue, 2);
        await relay.SendAsync(relay.Msg(queue, 1), relay.Msg(queue, 2));
        await ReadDeliveriesAsync(client, 2);

        // The app subscribes again and acknowledges message 1 right after: the relay takes the SUB
        // first (OK, then messages 1 and 2 again from the oldest), then the ACK, which frees the new
        // subscription's places up to 1: message 3 goes out before the ACK's OK.
        var resubscribing = client.SubscribeAsync(queue, 2);
        var acking = client.AckAsync(queue, 1);
        var sub = await relay.ExpectAsync(FrameType.Sub);
        var ack = await relay.ExpectAsync(FrameType.Ack);
        await relay.SendAsync(Ok(sub.Correlation), relay.Msg(queue, 1), relay.Msg(queue, 2), relay.Msg(queue, 3), Ok(ack.Correlation));
        await resubscribing.WaitAsync(Timeout);
        await acking.WaitAsync(Timeout);
        await Assert.That(await ReadDeliveriesAsync(client, 3)).IsEquivalentTo(new ulong[] { 1, 2, 3 });
        await AssertStillUpAsync(client, relay);
    }

    [Test]
    public async Task The_pushes_of_the_replaced_subscription_before_the_new_sub_answer_count_against_the_old_window()
    {
        await using var fake = ScriptedRelay.Start();
        var (client, relay) = await fake.ConnectAsync();
        await using var _ = client;
        var queue = ScriptedRelay.NewQueue();
        await SubscribeAsync(client, relay, queue, 4);
        await relay.SendAsync(relay.Msg(queue, 1), relay.Msg(queue, 2));
        var resubscribing = client.SubscribeAsync(queue, 1);
        var sub = await relay.ExpectAsync(FrameType.Sub);
        // Two more under the old window of 4 (crossing the SUB), then the new subscription: one message.
        await relay.SendAsync(relay.Msg(queue, 3), relay.Msg(queue, 4), Ok(sub.Correlation), relay.Msg(queue, 1));
        await resubscribing.WaitAsync(Timeout);
        await Assert.That(await ReadDeliveriesAsync(client, 5)).IsEquivalentTo(new ulong[] { 1, 2, 3, 4, 1 });
        await AssertStillUpAsync(client, relay);

        // The new window is 1: a second push before an ACK is one too many.
        var ping = client.PingAsync();
        await relay.ExpectAsync(FrameType.Ping);
        await relay.SendAsync(relay.Msg(queue, 2));
        var (_, streamError) = await DrainAsync(client);
        await AssertBrokeTheProtocolAsync(client, relay, ping, streamError, "beyond the delivery window of 1");
    }

    [Test]
    [Arguments(1)]
    [Arguments(2)]
    public async Task A_subscription_the_relay_starts_again_after_acks_answered_internal_delivers_its_window_again(int failedAcks)
    {
        await using var fake = ScriptedRelay.Start();
        var (client, relay) = await fake.ConnectAsync();
        await using var _ = client;
        var queue = ScriptedRelay.NewQueue();
        await SubscribeAsync(client, relay, queue, 2);
        await relay.SendAsync(relay.Msg(queue, 1), relay.Msg(queue, 2));
        await ReadDeliveriesAsync(client, 2);

        // ACK 1 is accepted (message 3 goes out at once) and then fails on the disk; ACK 2 is
        // refused while the store undoes it. Each INTERNAL restarts the subscription from the oldest
        // message (1, 2 each time), some time after the answer.
        var first = client.AckAsync(queue, 1);
        var ack1 = await relay.ExpectAsync(FrameType.Ack);
        await relay.SendAsync(relay.Msg(queue, 3));
        var second = failedAcks == 2 ? client.AckAsync(queue, 2) : null;
        if (second != null)
        {
            var ack2 = await relay.ExpectAsync(FrameType.Ack);
            await relay.SendAsync(Error(ack2.Correlation, ErrorCode.Internal));
        }
        await relay.SendAsync(Error(ack1.Correlation, ErrorCode.Internal));
        for (int restart = 0; restart < failedAcks; restart++)
        {
            await relay.SendAsync(relay.Msg(queue, 1), relay.Msg(queue, 2));
        }
        var failed = await Assert.ThrowsAsync<RelayErrorException>(() => first.WaitAsync(Timeout));
        await Assert.That(failed!.Code).IsEqualTo(ErrorCode.Internal);
        if (second != null) await Assert.That(async () => await second.WaitAsync(Timeout)).Throws<RelayErrorException>();
        var expected = new List<ulong> { 3 };
        for (int restart = 0; restart < failedAcks; restart++) expected.AddRange([1, 2]);
        await Assert.That(await ReadDeliveriesAsync(client, expected.Count)).IsEquivalentTo(expected);
        await AssertStillUpAsync(client, relay);

        // The restarted subscription is held to its window again.
        var ping = client.PingAsync();
        await relay.ExpectAsync(FrameType.Ping);
        await relay.SendAsync(relay.Msg(queue, 3));
        var (_, streamError) = await DrainAsync(client);
        await AssertBrokeTheProtocolAsync(client, relay, ping, streamError, "beyond the delivery window of 2");
    }

    [Test]
    public async Task An_end_that_crosses_the_answer_to_a_newer_sub_leaves_that_subscription_its_window()
    {
        await using var fake = ScriptedRelay.Start();
        var (client, relay) = await fake.ConnectAsync();
        await using var _ = client;
        var queue = ScriptedRelay.NewQueue();
        await SubscribeAsync(client, relay, queue, 2);
        await relay.SendAsync(relay.Msg(queue, 1));

        // Another device took the queue and this connection took it back; the END of the first
        // subscription is written after the second one's OK and first push.
        var resubscribing = client.SubscribeAsync(queue, 2);
        var sub = await relay.ExpectAsync(FrameType.Sub);
        await relay.SendAsync(Ok(sub.Correlation), relay.Msg(queue, 1), End(queue), relay.Msg(queue, 2));
        await resubscribing.WaitAsync(Timeout);
        await AssertStillUpAsync(client, relay);
    }

    [Test]
    public async Task An_end_read_while_a_newer_sub_awaits_its_answer_leaves_the_app_receiving_the_queue()
    {
        await using var fake = ScriptedRelay.Start();
        var (client, relay) = await fake.ConnectAsync();
        await using var _ = client;
        var queue = ScriptedRelay.NewQueue();
        await SubscribeAsync(client, relay, queue, 2);

        // Another device took the queue and this connection takes it back: the END of the first
        // subscription arrives before the OK of the second.
        var resubscribing = client.SubscribeAsync(queue, 2);
        var sub = await relay.ExpectAsync(FrameType.Sub);
        await relay.SendAsync(End(queue), Ok(sub.Correlation), relay.Msg(queue, 7));
        await resubscribing.WaitAsync(Timeout);

        await Assert.That(client.IsSubscribed(queue)).IsTrue();
        await Assert.That(await ReadDeliveriesAsync(client, 1)).IsEquivalentTo(new List<ulong> { 7 });
        await AssertStillUpAsync(client, relay);
    }

    [Test]
    public async Task A_sub_whose_caller_stopped_waiting_still_counts_the_window_the_relay_granted()
    {
        await using var fake = ScriptedRelay.Start();
        var (client, relay) = await fake.ConnectAsync();
        await using var _ = client;
        var queue = ScriptedRelay.NewQueue();
        using var cts = new CancellationTokenSource();
        var subscribing = client.SubscribeAsync(queue, 2, cts.Token);
        var sub = await relay.ExpectAsync(FrameType.Sub);
        await cts.CancelAsync();
        await Assert.That(async () => await subscribing.WaitAsync(Timeout)).Throws<OperationCanceledException>();
        await Assert.That(client.IsSubscribed(queue)).IsFalse();

        // The relay subscribed the queue all the same: its pushes within the window are no
        // violation (the app does not receive them), one more is.
        await relay.SendAsync(Ok(sub.Correlation), relay.Msg(queue, 1), relay.Msg(queue, 2));
        await AssertStillUpAsync(client, relay);
        var ping = client.PingAsync();
        await relay.ExpectAsync(FrameType.Ping);
        await relay.SendAsync(relay.Msg(queue, 3));
        var (delivered, streamError) = await DrainAsync(client);
        await Assert.That(delivered).IsEmpty();
        await AssertBrokeTheProtocolAsync(client, relay, ping, streamError, "beyond the delivery window of 2");
    }
}
