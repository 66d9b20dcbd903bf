using System.Buffers.Binary;
using System.Security.Cryptography;
using System.Text;
using Relay.Client.Transport;
using Relay.Protocol;
using static Relay.Server.Tests.EventWaits;

namespace Relay.Server.Tests;

/// <summary>Protocol behaviour over real TCP and TLS: takeover, pipelining, session binding, unlinkability, flow control, pinning.</summary>
public class ProtocolBehaviourTests
{
    /// <summary>The next push (corr 0): one already set aside by <see cref="RawClient.RequestAsync"/>, else the next from the socket.</summary>
    private static async Task<RawFrame> NextPushAsync(RawClient client, List<RawFrame>? setAside = null)
    {
        if (setAside is { Count: > 0 })
        {
            var first = setAside[0];
            setAside.RemoveAt(0);
            return first;
        }
        while (true)
        {
            var f = await client.ReadResponseAsync();
            if (f.Correlation == 0) return f;
        }
    }

    private static bool Contains(byte[] haystack, byte[] needle) => haystack.AsSpan().IndexOf(needle) >= 0;

    [Test]
    [Arguments(false)]
    [Arguments(true)]
    public async Task Second_subscriber_takes_over_and_the_first_gets_end(bool tls)
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = tls);
        await using var first = await relay.ConnectAsync();
        await using var second = await relay.ConnectAsync();
        await using var sender = await relay.ConnectAsync();
        var queue = await first.CreateQueueAsync();
        var to = new SenderQueue(queue.SenderId, null);

        await first.SubscribeAsync(queue);
        await sender.SendAsync(to, "m0"u8.ToArray());
        var m0 = await NextDeliveryAsync(first);
        await Assert.That(Encoding.UTF8.GetString(m0.Body)).IsEqualTo("m0");

        // m0 is not acknowledged: the new subscriber gets it again (at-least-once).
        await second.SubscribeAsync(queue);
        var end = await NextEventAsync(first);
        await Assert.That(end).IsTypeOf<SubscriptionEndedEvent>();
        await Assert.That(((SubscriptionEndedEvent)end).RecipientId).IsEquivalentTo(queue.RecipientId);
        var again = await NextDeliveryAsync(second);
        await Assert.That(again.MessageId).IsEqualTo(m0.MessageId);
        await second.AckAsync(queue, again.MessageId);

        await sender.SendAsync(to, "m1"u8.ToArray());
        var m1 = await NextDeliveryAsync(second);
        await Assert.That(Encoding.UTF8.GetString(m1.Body)).IsEqualTo("m1");
        await Assert.That(await NothingArrivesAsync(first, TimeSpan.FromMilliseconds(300))).IsTrue();

        // The old subscriber's ACK of a message it no longer holds does not disturb the new one.
        var stale = await Assert.ThrowsAsync<RelayErrorException>(() => first.AckAsync(queue, m0.MessageId));
        await Assert.That(stale!.Code).IsEqualTo(ErrorCode.NoMsg);
    }

    [Test]
    [Arguments(false)]
    [Arguments(true)]
    public async Task Pipelined_sends_are_all_acknowledged_then_delivered_once_in_order(bool tls)
    {
        const int N = 2_000;
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.Tls = tls;
            o.QueueMaxMessages = N + 10;
        });
        await using var owner = await RawClient.ConnectAsync(relay);
        var queue = await owner.CreateQueueAsync();
        await using var sender = await RawClient.ConnectAsync(relay);

        // Every SEND written before reading a single answer (more than the relay's in-flight limit of 1,024).
        var all = new MemoryStream();
        for (uint i = 1; i <= N; i++)
        {
            all.Write(sender.Send(i, queue.SenderId, Encoding.UTF8.GetBytes($"msg-{i}")));
        }
        await sender.WriteAsync(all.ToArray());
        var answered = new HashSet<uint>();
        for (int i = 0; i < N; i++)
        {
            var f = await sender.ReadResponseAsync();
            await Assert.That(f.Type).IsEqualTo(FrameType.Ok);
            await Assert.That(answered.Add(f.Correlation)).IsTrue();
        }
        await Assert.That(answered.Min()).IsEqualTo(1u);
        await Assert.That(answered.Max()).IsEqualTo((uint)N);

        await using var recipient = await RawClient.ConnectAsync(relay);
        var sub = await recipient.RequestAsync(recipient.QueueCommand(FrameType.Sub, recipient.NextCorr(), queue.RecipientId, [], queue.RecipientPrivate));
        await Assert.That(sub.Type).IsEqualTo(FrameType.Ok);
        ulong lastId = 0;
        int received = 0;
        while (received < N)
        {
            var f = await recipient.ReadResponseAsync();
            if (f.Type == FrameType.Ok) continue;
            await Assert.That(f.Type).IsEqualTo(FrameType.Msg);
            await Assert.That(f.Correlation).IsEqualTo(0u);
            var (id, _, body) = RawClient.Open(queue, f.Payload);
            received++;
            await Assert.That(Encoding.UTF8.GetString(body)).IsEqualTo($"msg-{received}");
            await Assert.That(id).IsGreaterThan(lastId);
            lastId = id;
            await recipient.WriteAsync(recipient.QueueCommand(FrameType.Ack, recipient.NextCorr(), queue.RecipientId, RawClient.U64(id), queue.RecipientPrivate));
        }
        // Exactly once: the queue is empty, and everything that arrives before GET's answer is an ACK's OK, no MSG.
        var others = new List<RawFrame>();
        var empty = await recipient.RequestAsync(recipient.QueueCommand(FrameType.Get, recipient.NextCorr(), queue.RecipientId, [], queue.RecipientPrivate), others);
        await Assert.That(empty.Type).IsEqualTo(FrameType.Empty);
        await Assert.That(others.All(f => f.Type == FrameType.Ok)).IsTrue();
    }

    [Test]
    [Arguments(false)]
    [Arguments(true)]
    public async Task Pipelined_sends_through_the_sdk_complete_in_any_order_and_arrive_in_order(bool tls)
    {
        const int N = 2_000;
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.Tls = tls;
            o.QueueMaxMessages = N;
        });
        await using var recipient = await relay.ConnectAsync();
        await using var sender = await relay.ConnectAsync();
        var queue = await recipient.CreateQueueAsync();
        var to = new SenderQueue(queue.SenderId, null);
        var sends = Enumerable.Range(1, N).Select(i => sender.SendAsync(to, Encoding.UTF8.GetBytes($"m{i}"))).ToArray();
        await Task.WhenAll(sends);

        await recipient.SubscribeAsync(queue);
        ulong lastId = 0;
        for (int i = 1; i <= N; i++)
        {
            var d = await NextDeliveryAsync(recipient);
            await Assert.That(Encoding.UTF8.GetString(d.Body)).IsEqualTo($"m{i}");
            await Assert.That(d.MessageId).IsGreaterThan(lastId);
            lastId = d.MessageId;
            await recipient.AckAsync(queue, d.MessageId);
        }
        await Assert.That(await recipient.GetAsync(queue)).IsNull();
    }

    [Test]
    [Arguments(false)]
    [Arguments(true)]
    public async Task Mac_captured_on_one_connection_fails_on_another(bool tls)
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = tls);
        await using var a = await RawClient.ConnectAsync(relay);
        await using var b = await RawClient.ConnectAsync(relay);
        var queue = await a.CreateQueueAsync();
        var (senderPrivate, senderPublic) = RawClient.KeyPair();

        var skey = a.QueueCommand(FrameType.SKey, 7, queue.SenderId, senderPublic, senderPrivate);
        await Assert.That((await a.RequestAsync(skey)).Type).IsEqualTo(FrameType.Ok);
        var send = a.Send(8, queue.SenderId, "original"u8, senderPrivate);
        await Assert.That((await a.RequestAsync(send)).Type).IsEqualTo(FrameType.Ok);
        var get = a.QueueCommand(FrameType.Get, 9, queue.RecipientId, [], queue.RecipientPrivate);
        await Assert.That((await a.RequestAsync(get)).Type).IsEqualTo(FrameType.Msg);

        // The same bytes, replayed on another connection: each is refused.
        foreach (var (name, frame) in new[] { ("SKEY", skey), ("SEND", send), ("GET", get) })
        {
            uint corr = BinaryPrimitives.ReadUInt32BigEndian(frame.AsSpan(5));
            var answer = await b.RequestAsync(frame);
            await Assert.That(answer.Wire).IsEquivalentTo(RawClient.Frame(FrameType.Err, corr, [(byte)ErrorCode.Auth])).Because(name);
        }
        // The replayed SEND stored nothing: one message, then (after its ACK) none.
        var msg = await a.RequestAsync(a.QueueCommand(FrameType.Get, a.NextCorr(), queue.RecipientId, [], queue.RecipientPrivate));
        var (id, _, body) = RawClient.Open(queue, msg.Payload);
        await Assert.That(Encoding.UTF8.GetString(body)).IsEqualTo("original");
        await Assert.That((await a.RequestAsync(a.QueueCommand(FrameType.Ack, a.NextCorr(), queue.RecipientId, RawClient.U64(id), queue.RecipientPrivate))).Type).IsEqualTo(FrameType.Ok);
        await Assert.That((await a.RequestAsync(a.QueueCommand(FrameType.Get, a.NextCorr(), queue.RecipientId, [], queue.RecipientPrivate))).Type).IsEqualTo(FrameType.Empty);

        // With its own session key, connection B is authorized.
        var own = await b.RequestAsync(b.QueueCommand(FrameType.Get, b.NextCorr(), queue.RecipientId, [], queue.RecipientPrivate));
        await Assert.That(own.Type).IsEqualTo(FrameType.Empty);
    }

    [Test]
    [Arguments(false)]
    [Arguments(true)]
    public async Task Downloaded_bytes_never_contain_the_uploaded_body(bool tls)
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = tls);
        await using var client = await RawClient.ConnectAsync(relay);
        var queue = await client.CreateQueueAsync();
        var bodies = new[] { RandomNumberGenerator.GetBytes(300), Enumerable.Repeat((byte)'A', 300).ToArray() };
        foreach (var body in bodies)
        {
            await Assert.That((await client.RequestAsync(client.Send(client.NextCorr(), queue.SenderId, body))).Type).IsEqualTo(FrameType.Ok);
        }

        var sub = await client.RequestAsync(client.QueueCommand(FrameType.Sub, client.NextCorr(), queue.RecipientId, [], queue.RecipientPrivate));
        await Assert.That(sub.Type).IsEqualTo(FrameType.Ok);
        foreach (var body in bodies)
        {
            var pushed = await NextPushAsync(client);
            await Assert.That(pushed.Type).IsEqualTo(FrameType.Msg);
            var polled = await client.RequestAsync(client.QueueCommand(FrameType.Get, client.NextCorr(), queue.RecipientId, [], queue.RecipientPrivate));
            await Assert.That(polled.Type).IsEqualTo(FrameType.Msg);

            await Assert.That(Contains(pushed.Wire, body)).IsFalse();
            await Assert.That(Contains(polled.Wire, body)).IsFalse();
            await Assert.That(Contains(pushed.Wire, body.AsSpan(0, 16).ToArray())).IsFalse();
            // Two deliveries of the same message differ too (fresh nonce), and both open to the body.
            await Assert.That(pushed.Payload.AsSpan(32).SequenceEqual(polled.Payload.AsSpan(32))).IsFalse();
            var (id1, _, b1) = RawClient.Open(queue, pushed.Payload);
            var (id2, _, b2) = RawClient.Open(queue, polled.Payload);
            await Assert.That(id1).IsEqualTo(id2);
            await Assert.That(b1).IsEquivalentTo(body);
            await Assert.That(b2).IsEquivalentTo(body);
            await client.WriteAsync(client.QueueCommand(FrameType.Ack, client.NextCorr(), queue.RecipientId, RawClient.U64(id1), queue.RecipientPrivate));
        }
    }

    [Test]
    [Arguments(false)]
    [Arguments(true)]
    public async Task Slow_subscriber_holds_one_outstanding_message_and_sends_succeed_up_to_the_quota(bool tls)
    {
        const int Quota = 10;
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.Tls = tls;
            o.QueueMaxMessages = Quota;
        });
        await using var recipient = await relay.ConnectAsync();
        await using var sender = await relay.ConnectAsync();
        var queue = await recipient.CreateQueueAsync();
        var to = new SenderQueue(queue.SenderId, null);
        await recipient.SubscribeAsync(queue);

        for (int i = 1; i <= Quota; i++)
        {
            await sender.SendAsync(to, Encoding.UTF8.GetBytes($"s{i}"));
        }
        var full = await Assert.ThrowsAsync<RelayErrorException>(() => sender.SendAsync(to, "over"u8.ToArray()));
        await Assert.That(full!.Code).IsEqualTo(ErrorCode.Quota);

        var first = await NextDeliveryAsync(recipient);
        await Assert.That(Encoding.UTF8.GetString(first.Body)).IsEqualTo("s1");
        // Without an ACK nothing else is pushed.
        await Assert.That(await NothingArrivesAsync(recipient, TimeSpan.FromMilliseconds(500))).IsTrue();

        await recipient.AckAsync(queue, first.MessageId);
        await sender.SendAsync(to, "s11"u8.ToArray());
        var order = new List<string> { "s1" };
        ulong last = first.MessageId;
        for (int i = 2; i <= Quota + 1; i++)
        {
            var d = await NextDeliveryAsync(recipient);
            await Assert.That(d.MessageId).IsGreaterThan(last);
            last = d.MessageId;
            order.Add(Encoding.UTF8.GetString(d.Body));
            await Assert.That(await NothingArrivesAsync(recipient, TimeSpan.FromMilliseconds(20))).IsTrue();
            await recipient.AckAsync(queue, d.MessageId);
        }
        await Assert.That(order).IsEquivalentTo(Enumerable.Range(1, Quota + 1).Select(i => $"s{i}").ToList());
    }

    [Test]
    public async Task TLS_to_a_plain_TCP_relay_fails_as_such_and_not_as_an_identity_mismatch()
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = false);
        var error = await Assert.ThrowsAsync<RelayConnectException>(() =>
            RelayConnection.ConnectAsync(relay.Address, new RelayConnectionOptions { Tls = true, ConnectTimeout = TimeSpan.FromSeconds(10) }));
        await Assert.That(error).IsNotTypeOf<FingerprintMismatchException>();
        await Assert.That(error!.Message).Contains("plain-TCP");
    }

    [Test]
    public async Task Address_with_another_fingerprint_is_refused_by_the_client()
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = true);
        await using var other = await TestRelay.StartAsync(o => o.Tls = true);
        var real = relay.Address;

        foreach (var fingerprint in new[] { RelayAddress.Base64Url(RandomNumberGenerator.GetBytes(32)), other.Address.Fingerprint })
        {
            var wrong = real with { Fingerprint = fingerprint };
            await Assert.ThrowsAsync<FingerprintMismatchException>(() => RelayConnection.ConnectAsync(wrong));
        }
        // The right fingerprint connects.
        await using var ok = await RelayConnection.ConnectAsync(real);
        await ok.PingAsync();
    }

    [Test]
    [Arguments(false)]
    [Arguments(true)]
    public async Task Delete_ends_another_connections_subscription(bool tls)
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = tls);
        await using var subscriber = await relay.ConnectAsync();
        await using var deleter = await relay.ConnectAsync();
        await using var sender = await relay.ConnectAsync();
        var queue = await subscriber.CreateQueueAsync();
        await subscriber.SubscribeAsync(queue);

        await deleter.DeleteAsync(queue);
        var end = await NextEventAsync(subscriber);
        await Assert.That(end).IsTypeOf<SubscriptionEndedEvent>();
        await Assert.That(((SubscriptionEndedEvent)end).RecipientId).IsEquivalentTo(queue.RecipientId);

        var send = await Assert.ThrowsAsync<RelayErrorException>(() => sender.SendAsync(new SenderQueue(queue.SenderId, null), "x"u8.ToArray()));
        await Assert.That(send!.Code).IsEqualTo(ErrorCode.Auth);
        await subscriber.PingAsync();
    }

    [Test]
    [Arguments(false)]
    [Arguments(true)]
    public async Task Resubscribe_on_the_same_connection_redelivers_the_outstanding_message(bool tls)
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = tls);
        await using var client = await RawClient.ConnectAsync(relay);
        var queue = await client.CreateQueueAsync();
        foreach (var text in new[] { "one", "two" })
        {
            await Assert.That((await client.RequestAsync(client.Send(client.NextCorr(), queue.SenderId, Encoding.UTF8.GetBytes(text)))).Type).IsEqualTo(FrameType.Ok);
        }

        var sub = client.QueueCommand(FrameType.Sub, client.NextCorr(), queue.RecipientId, [], queue.RecipientPrivate);
        await Assert.That((await client.RequestAsync(sub)).Type).IsEqualTo(FrameType.Ok);
        var first = RawClient.Open(queue, (await NextPushAsync(client)).Payload);
        await Assert.That(Encoding.UTF8.GetString(first.Body)).IsEqualTo("one");

        var resub = client.QueueCommand(FrameType.Sub, client.NextCorr(), queue.RecipientId, [], queue.RecipientPrivate);
        var pushes = new List<RawFrame>();
        await Assert.That((await client.RequestAsync(resub, pushes)).Type).IsEqualTo(FrameType.Ok);
        await Assert.That(pushes).IsEmpty();
        var again = RawClient.Open(queue, (await NextPushAsync(client)).Payload);
        await Assert.That(again.Id).IsEqualTo(first.Id);
        await Assert.That(Encoding.UTF8.GetString(again.Body)).IsEqualTo("one");

        // The next push may come before or after the ACK's OK (PROTOCOL.md §6 ACK).
        var ack = await client.RequestAsync(client.QueueCommand(FrameType.Ack, client.NextCorr(), queue.RecipientId, RawClient.U64(first.Id), queue.RecipientPrivate), pushes);
        await Assert.That(ack.Type).IsEqualTo(FrameType.Ok);
        var second = RawClient.Open(queue, (await NextPushAsync(client, pushes)).Payload);
        await Assert.That(Encoding.UTF8.GetString(second.Body)).IsEqualTo("two");
        await Assert.That(second.Id).IsGreaterThan(first.Id);
        // No END for a re-subscription on the same connection.
        await Assert.That(pushes.Any(p => p.Type == FrameType.End)).IsFalse();
    }
}
