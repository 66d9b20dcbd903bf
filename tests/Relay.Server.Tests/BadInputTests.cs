using System.Diagnostics;
using System.Net.Security;
using System.Net.Sockets;
using System.Security.Authentication;
using System.Security.Cryptography;
using System.Text;
using Relay.Protocol;

namespace Relay.Server.Tests;

/// <summary>
/// Issue 2, "Bad input, each case tested": over real TCP and TLS against an in-process relay.
/// Every case runs next to a well-behaved client (<see cref="Bystander"/>) that must keep working
/// and must get every message acknowledged before the bad input.
/// </summary>
public class BadInputTests
{
    private static readonly TimeSpan CloseWithin = TimeSpan.FromSeconds(5);

    /// <summary>ERR code with correlation id <paramref name="corr"/>, exactly 10 bytes on the wire.</summary>
    private static byte[] ErrWire(uint corr, ErrorCode code) => RawClient.Frame(FrameType.Err, corr, [(byte)code]);

    private static async Task AssertErrorThenClosed(RawClient client, ErrorCode code)
    {
        var (closed, frames) = await client.WaitForCloseAsync(CloseWithin);
        await Assert.That(frames.Count).IsEqualTo(1);
        await Assert.That(frames[0].Wire).IsEquivalentTo(ErrWire(0, code));
        await Assert.That(closed).IsTrue();
    }

    /// <summary>Stores one message over the raw connection (unsecured queue) and checks its OK.</summary>
    private static async Task SendAcknowledgedAsync(RawClient client, Bystander bystander, string text)
    {
        var answer = await client.RequestAsync(client.Send(client.NextCorr(), bystander.Queue.SenderId, Encoding.UTF8.GetBytes(text)));
        await Assert.That(answer.Type).IsEqualTo(FrameType.Ok);
        bystander.ExpectAcknowledged(text);
    }

    private static async Task AssertPingAnswers(RawClient client)
    {
        uint corr = client.NextCorr();
        var pong = await client.RequestAsync(RawClient.Frame(FrameType.Ping, corr, []));
        await Assert.That(pong.Wire).IsEquivalentTo(RawClient.Frame(FrameType.Pong, corr, []));
    }

    [Test]
    [Arguments(false)]
    [Arguments(true)]
    public async Task Frame_length_over_the_handshake_limit_is_refused_before_its_body(bool tls)
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = tls);
        await using var bystander = await Bystander.StartAsync(relay);
        await using var client = await RawClient.ConnectRawAsync(relay);

        // Only the 4-byte prefix: the relay must answer without waiting for 1,025 bytes of body.
        await client.WriteAsync([0x00, 0x00, 0x04, 0x01]);
        await AssertErrorThenClosed(client, ErrorCode.TooLarge);

        await bystander.VerifyAsync();
    }

    [Test]
    [Arguments(false, 65_537u)]
    [Arguments(true, 65_537u)]
    [Arguments(false, 0xFFFF_FFFFu)]
    [Arguments(true, 0xFFFF_FFFFu)]
    public async Task Frame_length_over_maxFrame_after_the_handshake_is_refused_before_its_body(bool tls, uint length)
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = tls);
        await using var bystander = await Bystander.StartAsync(relay);
        await using var client = await RawClient.ConnectAsync(relay);
        await Assert.That(client.MaxFrame).IsEqualTo(65_536);
        await SendAcknowledgedAsync(client, bystander, "bad-client-before");

        var prefix = new byte[4];
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(prefix, length);
        await client.WriteAsync(prefix);
        await AssertErrorThenClosed(client, ErrorCode.TooLarge);

        await bystander.VerifyAsync();
    }

    [Test]
    [Arguments(false)]
    [Arguments(true)]
    public async Task Http_request_instead_of_hello_is_refused_and_closed(bool tls)
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = tls);
        await using var bystander = await Bystander.StartAsync(relay);
        await using var client = await RawClient.ConnectRawAsync(relay);

        // "GET " read as a length is 0x47455420: far over the handshake limit.
        await client.WriteAsync("GET / HTTP/1.1\r\nHost: relay\r\n\r\n"u8.ToArray());
        await AssertErrorThenClosed(client, ErrorCode.TooLarge);

        await bystander.VerifyAsync();
    }

    private static byte[] NotAHello(string name) => name switch
    {
        "unknown type" => RawClient.Frame(0x42, 0, RandomNumberGenerator.GetBytes(20)),
        "PING before HELLO" => RawClient.Frame(FrameType.Ping, 1, []),
        "HELLO with 3-byte payload" => RawClient.Frame(FrameType.Hello, 0, [0, 1, 0]),
        "HELLO with 5-byte payload" => RawClient.Frame(FrameType.Hello, 0, [0, 1, 0, 1, 0]),
        "NEW before HELLO" => RawClient.Frame(FrameType.New, 1, new byte[65]),
        _ => throw new ArgumentOutOfRangeException(nameof(name)),
    };

    [Test]
    [Arguments(false, "unknown type")]
    [Arguments(true, "unknown type")]
    [Arguments(false, "PING before HELLO")]
    [Arguments(true, "HELLO with 3-byte payload")]
    [Arguments(false, "HELLO with 5-byte payload")]
    [Arguments(true, "NEW before HELLO")]
    public async Task Garbage_instead_of_hello_gets_syntax_and_closes(bool tls, string garbage)
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = tls);
        await using var bystander = await Bystander.StartAsync(relay);
        await using var client = await RawClient.ConnectRawAsync(relay);

        await client.WriteAsync(NotAHello(garbage));
        await AssertErrorThenClosed(client, ErrorCode.Syntax);

        await bystander.VerifyAsync();
    }

    [Test]
    [Arguments(false, (ushort)2, (ushort)7)]
    [Arguments(true, (ushort)2, (ushort)7)]
    [Arguments(false, (ushort)0, (ushort)0)]
    [Arguments(true, (ushort)3, (ushort)1)]
    public async Task Hello_without_a_common_version_gets_version_error_with_the_server_range(bool tls, ushort min, ushort max)
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = tls);
        await using var bystander = await Bystander.StartAsync(relay);
        await using var client = await RawClient.ConnectRawAsync(relay);

        await client.WriteAsync(RawClient.Hello(min, max));
        var (closed, frames) = await client.WaitForCloseAsync(CloseWithin);
        await Assert.That(frames.Count).IsEqualTo(1);
        // ERR, corr 0, code VERSION, server range 1..1.
        await Assert.That(frames[0].Wire).IsEquivalentTo(RawClient.Frame(FrameType.Err, 0, [0x02, 0x00, 0x01, 0x00, 0x01]));
        await Assert.That(closed).IsTrue();

        await bystander.VerifyAsync();
    }

    [Test]
    public async Task Hello_with_an_overlapping_range_negotiates_the_highest_common_version()
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = false);
        await using var client = await RawClient.ConnectRawAsync(relay);
        await client.WriteAsync(RawClient.Hello(1, 9));
        var welcome = await client.ReadResponseAsync();
        await Assert.That(welcome.Type).IsEqualTo(FrameType.Welcome);
        await Assert.That(welcome.Payload.AsSpan(0, 2).ToArray()).IsEquivalentTo(new byte[] { 0, 1 });
    }

    [Test]
    [Arguments(false, false)]
    [Arguments(true, false)]
    [Arguments(false, true)]
    [Arguments(true, true)]
    public async Task Frame_length_below_five_gets_syntax_and_closes(bool tls, bool afterHandshake)
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = tls);
        await using var bystander = await Bystander.StartAsync(relay);
        await using var client = afterHandshake ? await RawClient.ConnectAsync(relay) : await RawClient.ConnectRawAsync(relay);
        if (afterHandshake)
        {
            await SendAcknowledgedAsync(client, bystander, "bad-client-before");
        }

        await client.WriteAsync([0x00, 0x00, 0x00, 0x04, 0x03, 0x00, 0x00, 0x00]);
        await AssertErrorThenClosed(client, ErrorCode.Syntax);

        await bystander.VerifyAsync();
    }

    [Test]
    [Arguments(false)]
    [Arguments(true)]
    public async Task Truncated_frame_then_close_gets_syntax_and_stores_nothing(bool tls)
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = tls);
        await using var bystander = await Bystander.StartAsync(relay);
        await using var client = await RawClient.ConnectAsync(relay);
        await SendAcknowledgedAsync(client, bystander, "bad-client-before");

        // A SEND to the bystander's queue cut short: the relay must not store any part of it.
        var send = client.Send(client.NextCorr(), bystander.Queue.SenderId, "truncated"u8);
        await client.WriteAsync(send.AsSpan(0, send.Length - 10).ToArray());
        await client.ShutdownSendAsync();
        var (closed, frames) = await client.WaitForCloseAsync(CloseWithin);
        await Assert.That(closed).IsTrue();
        if (tls && frames.Count == 0)
        {
            // After the client's close_notify the ERR is best effort over TLS (PROTOCOL.md §3): the
            // relay closes either way; over plain TCP it is always there.
        }
        else
        {
            await Assert.That(frames.Count).IsEqualTo(1);
            await Assert.That(frames[0].Wire).IsEquivalentTo(ErrWire(0, ErrorCode.Syntax));
        }

        await bystander.VerifyAsync();
    }

    [Test]
    [Arguments(false)]
    [Arguments(true)]
    public async Task Truncated_hello_then_close_closes_without_welcome(bool tls)
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = tls);
        await using var bystander = await Bystander.StartAsync(relay);
        await using var client = await RawClient.ConnectRawAsync(relay);

        await client.WriteAsync(RawClient.Hello(1, 1).AsSpan(0, 6).ToArray());
        await client.ShutdownSendAsync();
        var (closed, frames) = await client.WaitForCloseAsync(CloseWithin);
        await Assert.That(frames.Any(f => f.Type == FrameType.Welcome)).IsFalse();
        await Assert.That(closed).IsTrue();

        await bystander.VerifyAsync();
    }

    [Test]
    [Arguments(false, (byte)0x7F)]
    [Arguments(true, (byte)0x7F)]
    [Arguments(false, (byte)0x00)]
    [Arguments(false, (byte)0x02)]
    [Arguments(false, (byte)0x81)]
    [Arguments(true, (byte)0xFF)]
    public async Task Unknown_command_gets_cmd_and_the_connection_goes_on(bool tls, byte type)
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = tls);
        await using var bystander = await Bystander.StartAsync(relay);
        await using var client = await RawClient.ConnectAsync(relay);

        uint corr = client.NextCorr();
        var answer = await client.RequestAsync(RawClient.Frame(type, corr, RandomNumberGenerator.GetBytes(40)));
        await Assert.That(answer.Wire).IsEquivalentTo(ErrWire(corr, ErrorCode.Cmd));
        await AssertPingAnswers(client);
        await SendAcknowledgedAsync(client, bystander, "after-unknown-command");

        await bystander.VerifyAsync();
    }

    [Test]
    [Arguments(false)]
    [Arguments(true)]
    public async Task Malformed_fields_get_syntax_and_the_connection_goes_on(bool tls)
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = tls);
        await using var bystander = await Bystander.StartAsync(relay);
        await using var client = await RawClient.ConnectAsync(relay);
        var queue = await client.CreateQueueAsync();
        var rid = queue.RecipientId;
        var key = queue.RecipientPrivate;

        var cases = new List<(string Name, Func<uint, byte[]> Frame)>
        {
            ("SUB with an extra byte", c => client.QueueCommand(FrameType.Sub, c, rid, [0], key)),
            ("SUB with three bytes of window", c => client.QueueCommand(FrameType.Sub, c, rid, [0, 0, 8], key)),
            ("SUB shorter than id + MAC", c => RawClient.Frame(FrameType.Sub, c, rid.AsSpan(0, 20))),
            ("GET with an extra byte", c => client.QueueCommand(FrameType.Get, c, rid, [0], key)),
            ("OFF with an extra byte", c => client.QueueCommand(FrameType.Off, c, rid, [0], key)),
            ("DEL with an extra byte", c => client.QueueCommand(FrameType.Del, c, rid, [0], key)),
            ("ACK with a 4-byte id", c => client.QueueCommand(FrameType.Ack, c, rid, [0, 0, 0, 1], key)),
            ("ACK with a 10-byte id", c => client.QueueCommand(FrameType.Ack, c, rid, new byte[10], key)),
            ("ACK with an unknown flag", c => client.QueueCommand(FrameType.Ack, c, rid, [0, 0, 0, 0, 0, 0, 0, 1, 0x02], key)),
            ("ACK through with an unknown flag", c => client.QueueCommand(FrameType.Ack, c, rid, [0, 0, 0, 0, 0, 0, 0, 1, 0x81], key)),
            ("ACK with no id", c => client.QueueCommand(FrameType.Ack, c, rid, [], key)),
            ("SKEY with a 31-byte key", c => client.QueueCommand(FrameType.SKey, c, queue.SenderId, new byte[31], key)),
            ("SKEY with a 33-byte key", c => client.QueueCommand(FrameType.SKey, c, queue.SenderId, new byte[33], key)),
            ("SEND without flags", c => client.QueueCommand(FrameType.Send, c, queue.SenderId, [], null)),
            ("NEW with 64 bytes", c => RawClient.Frame(FrameType.New, c, new byte[64])),
            ("NEW with a password length past the end", c =>
            {
                var p = new byte[67];
                RawClient.KeyPair().Public.CopyTo(p, 0);
                RawClient.KeyPair().Public.CopyTo(p, 32);
                p[64] = 5;
                return RawClient.Frame(FrameType.New, c, p);
            }),
            ("NEW with a small-order recipient key", c =>
            {
                var p = new byte[65];
                RawClient.KeyPair().Public.CopyTo(p, 32);
                return RawClient.Frame(FrameType.New, c, p);
            }),
            ("NEW with a small-order DH key", c =>
            {
                var p = new byte[65];
                RawClient.KeyPair().Public.CopyTo(p, 0);
                p[32] = 1;
                return RawClient.Frame(FrameType.New, c, p);
            }),
            ("NEW with trailing bytes", c =>
            {
                var p = new byte[70];
                RawClient.KeyPair().Public.CopyTo(p, 0);
                RawClient.KeyPair().Public.CopyTo(p, 32);
                return RawClient.Frame(FrameType.New, c, p);
            }),
        };

        var wrong = new List<string>();
        foreach (var (name, build) in cases)
        {
            uint corr = client.NextCorr();
            var answer = await client.RequestAsync(build(corr));
            if (!answer.Wire.SequenceEqual(ErrWire(corr, ErrorCode.Syntax)))
            {
                wrong.Add($"{name}: {answer}");
            }
        }
        await Assert.That(wrong).IsEmpty();

        // The connection goes on, and nothing malformed changed the queue.
        await AssertPingAnswers(client);
        var get = await client.RequestAsync(client.QueueCommand(FrameType.Get, client.NextCorr(), rid, [], key));
        await Assert.That(get.Type).IsEqualTo(FrameType.Empty);
        await SendAcknowledgedAsync(client, bystander, "after-malformed");

        await bystander.VerifyAsync();
    }

    [Test]
    public async Task The_largest_message_the_frame_limit_allows_is_delivered_whole_and_one_byte_more_is_refused()
    {
        // A delivery (MSG) carries 70 bytes besides the body: the largest body is the frame limit minus those.
        int largest = ProtocolConstants.LargestMessage(ProtocolConstants.DefaultMaxFrame);
        await Assert.That(largest).IsEqualTo(65_466);
        await using var relay = await TestRelay.StartAsync(o => o.MaxMessage = largest);
        await using var client = await RawClient.ConnectAsync(relay);
        await Assert.That(client.MaxMessage).IsEqualTo(largest);
        var queue = await client.CreateQueueAsync();

        uint over = client.NextCorr();
        var tooLarge = await client.RequestAsync(client.Send(over, queue.SenderId, new byte[largest + 1]));
        await Assert.That(tooLarge.Wire).IsEquivalentTo(ErrWire(over, ErrorCode.TooLarge));
        var body = RandomNumberGenerator.GetBytes(largest);
        await Assert.That((await client.RequestAsync(client.Send(client.NextCorr(), queue.SenderId, body))).Type).IsEqualTo(FrameType.Ok);

        // Pushed to a subscriber: one frame of exactly the limit, opened to the same bytes.
        await using var recipient = await RawClient.ConnectAsync(relay);
        await Assert.That((await recipient.RequestAsync(recipient.QueueCommand(FrameType.Sub, recipient.NextCorr(), queue.RecipientId, [], queue.RecipientPrivate))).Type).IsEqualTo(FrameType.Ok);
        var pushed = await recipient.ReadResponseAsync();
        await Assert.That(pushed.Type).IsEqualTo(FrameType.Msg);
        await Assert.That(pushed.Wire.Length).IsEqualTo(ProtocolConstants.LengthPrefixSize + ProtocolConstants.DefaultMaxFrame);
        var (_, _, opened) = RawClient.Open(queue, pushed.Payload);
        await Assert.That(opened).IsEquivalentTo(body);
    }

    [Test]
    public async Task A_message_limit_whose_delivery_would_not_fit_a_frame_is_refused_at_start()
    {
        int largest = ProtocolConstants.LargestMessage(ProtocolConstants.DefaultMaxFrame);
        var ex = await Assert.ThrowsAsync<ArgumentException>(async () =>
        {
            await using var relay = await TestRelay.StartAsync(o => o.MaxMessage = largest + 1);
        });
        await Assert.That(ex!.Message).Contains($"at most {largest}");
    }

    [Test]
    [Arguments(false)]
    [Arguments(true)]
    public async Task Request_level_errors_are_answered_and_the_connection_goes_on(bool tls)
    {
        // The bystander's queue holds 5 messages at the end; the raw client fills its own queue to the quota.
        const int Quota = 6;
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.Tls = tls;
            o.QueueMaxMessages = Quota;
        });
        await using var bystander = await Bystander.StartAsync(relay);
        await using var client = await RawClient.ConnectAsync(relay);
        var queue = await client.CreateQueueAsync();

        // Wrong MAC: a key that is not the queue's.
        uint c1 = client.NextCorr();
        var wrongKey = await client.RequestAsync(client.QueueCommand(FrameType.Sub, c1, queue.RecipientId, [], RawClient.KeyPair().Private));
        await Assert.That(wrongKey.Wire).IsEquivalentTo(ErrWire(c1, ErrorCode.Auth));

        // Unknown queue.
        uint c2 = client.NextCorr();
        var unknown = await client.RequestAsync(client.QueueCommand(FrameType.Get, c2, RandomNumberGenerator.GetBytes(24), [], queue.RecipientPrivate));
        await Assert.That(unknown.Wire).IsEquivalentTo(ErrWire(c2, ErrorCode.Auth));

        // Message too large, then the next request works.
        uint c3 = client.NextCorr();
        var tooLarge = await client.RequestAsync(client.Send(c3, queue.SenderId, new byte[client.MaxMessage + 1]));
        await Assert.That(tooLarge.Wire).IsEquivalentTo(ErrWire(c3, ErrorCode.TooLarge));
        var largest = RandomNumberGenerator.GetBytes(client.MaxMessage);
        var ok = await client.RequestAsync(client.Send(client.NextCorr(), queue.SenderId, largest));
        await Assert.That(ok.Type).IsEqualTo(FrameType.Ok);

        // Queue full at Quota messages: QUOTA, and the stored ones stay.
        for (int i = 0; i < Quota - 1; i++)
        {
            var sent = await client.RequestAsync(client.Send(client.NextCorr(), queue.SenderId, [(byte)i]));
            await Assert.That(sent.Type).IsEqualTo(FrameType.Ok);
        }
        uint c4 = client.NextCorr();
        var full = await client.RequestAsync(client.Send(c4, queue.SenderId, [9]));
        await Assert.That(full.Wire).IsEquivalentTo(ErrWire(c4, ErrorCode.Quota));

        // ACK of an id that is not the oldest: NO_MSG; the right id works.
        var first = await client.RequestAsync(client.QueueCommand(FrameType.Get, client.NextCorr(), queue.RecipientId, [], queue.RecipientPrivate));
        await Assert.That(first.Type).IsEqualTo(FrameType.Msg);
        var (id, _, body) = RawClient.Open(queue, first.Payload);
        await Assert.That(body).IsEquivalentTo(largest);
        uint c5 = client.NextCorr();
        var noMsg = await client.RequestAsync(client.QueueCommand(FrameType.Ack, c5, queue.RecipientId, RawClient.U64(id + 1), queue.RecipientPrivate));
        await Assert.That(noMsg.Wire).IsEquivalentTo(ErrWire(c5, ErrorCode.NoMsg));
        // ACK through without a subscription on this connection covers no more than the id itself.
        uint c5b = client.NextCorr();
        var throughNoSub = await client.RequestAsync(client.QueueCommand(FrameType.Ack, c5b, queue.RecipientId, [.. RawClient.U64(id + 1), ProtocolConstants.AckThrough], queue.RecipientPrivate));
        await Assert.That(throughNoSub.Wire).IsEquivalentTo(ErrWire(c5b, ErrorCode.NoMsg));
        var acked = await client.RequestAsync(client.QueueCommand(FrameType.Ack, client.NextCorr(), queue.RecipientId, [.. RawClient.U64(id), ProtocolConstants.AckThrough], queue.RecipientPrivate));
        await Assert.That(acked.Type).IsEqualTo(FrameType.Ok);
        uint c6 = client.NextCorr();
        var again = await client.RequestAsync(client.QueueCommand(FrameType.Ack, c6, queue.RecipientId, RawClient.U64(id), queue.RecipientPrivate));
        await Assert.That(again.Wire).IsEquivalentTo(ErrWire(c6, ErrorCode.NoMsg));

        // After the ACK the queue has room again, and the connection still works.
        var afterQuota = await client.RequestAsync(client.Send(client.NextCorr(), queue.SenderId, [10]));
        await Assert.That(afterQuota.Type).IsEqualTo(FrameType.Ok);
        await AssertPingAnswers(client);
        await SendAcknowledgedAsync(client, bystander, "after-request-errors");

        await bystander.VerifyAsync();
    }

    [Test]
    public async Task Wrong_key_and_missing_queue_answer_byte_identical_errors()
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = false);
        await using var client = await RawClient.ConnectAsync(relay);
        var queue = await client.CreateQueueAsync();
        var (senderPrivate, senderPublic) = RawClient.KeyPair();
        var secured = await client.RequestAsync(client.QueueCommand(FrameType.SKey, client.NextCorr(), queue.SenderId, senderPublic, senderPrivate));
        await Assert.That(secured.Type).IsEqualTo(FrameType.Ok);
        var stranger = RawClient.KeyPair();
        var missing = RandomNumberGenerator.GetBytes(24);

        var pairs = new List<(string Name, Func<uint, byte[]> WrongKey, Func<uint, byte[]> Missing)>
        {
            ("SUB", c => client.QueueCommand(FrameType.Sub, c, queue.RecipientId, [], stranger.Private),
                    c => client.QueueCommand(FrameType.Sub, c, missing, [], stranger.Private)),
            ("GET", c => client.QueueCommand(FrameType.Get, c, queue.RecipientId, [], stranger.Private),
                    c => client.QueueCommand(FrameType.Get, c, missing, [], queue.RecipientPrivate)),
            ("ACK", c => client.QueueCommand(FrameType.Ack, c, queue.RecipientId, RawClient.U64(1), stranger.Private),
                    c => client.QueueCommand(FrameType.Ack, c, missing, RawClient.U64(1), stranger.Private)),
            ("OFF", c => client.QueueCommand(FrameType.Off, c, queue.RecipientId, [], stranger.Private),
                    c => client.QueueCommand(FrameType.Off, c, missing, [], stranger.Private)),
            ("DEL", c => client.QueueCommand(FrameType.Del, c, queue.RecipientId, [], stranger.Private),
                    c => client.QueueCommand(FrameType.Del, c, missing, [], stranger.Private)),
            ("SUB by sender id (wrong role)", c => client.QueueCommand(FrameType.Sub, c, queue.SenderId, [], queue.RecipientPrivate),
                    c => client.QueueCommand(FrameType.Sub, c, missing, [], queue.RecipientPrivate)),
            ("SEND", c => client.Send(c, queue.SenderId, "x"u8, stranger.Private),
                     c => client.Send(c, missing, "x"u8, stranger.Private)),
            ("SKEY with another key", c => client.QueueCommand(FrameType.SKey, c, queue.SenderId, stranger.Public, stranger.Private),
                     c => client.QueueCommand(FrameType.SKey, c, missing, stranger.Public, stranger.Private)),
        };
        foreach (var (name, wrongKey, missingQueue) in pairs)
        {
            uint corr = client.NextCorr();
            var a = await client.RequestAsync(wrongKey(corr));
            var b = await client.RequestAsync(missingQueue(corr));
            await Assert.That(a.Wire).IsEquivalentTo(ErrWire(corr, ErrorCode.Auth)).Because(name);
            await Assert.That(b.Wire).IsEquivalentTo(a.Wire).Because(name);
        }
        // None of the refused commands changed the queue: it is still there and still secured by the sender.
        var get = await client.RequestAsync(client.QueueCommand(FrameType.Get, client.NextCorr(), queue.RecipientId, [], queue.RecipientPrivate));
        await Assert.That(get.Type).IsEqualTo(FrameType.Empty);
        var send = await client.RequestAsync(client.Send(client.NextCorr(), queue.SenderId, "y"u8, senderPrivate));
        await Assert.That(send.Type).IsEqualTo(FrameType.Ok);
    }

    [Test]
    [Arguments("none")]
    [Arguments("h2")]
    [Arguments("relay/2")]
    public async Task Tls_client_without_the_relay_alpn_is_refused(string offered)
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = true);
        await using var bystander = await Bystander.StartAsync(relay);
        List<SslApplicationProtocol> alpn = offered == "none" ? [] : [new SslApplicationProtocol(offered)];

        bool refused;
        RawClient? client = null;
        try
        {
            client = await RawClient.ConnectRawAsync(relay, alpn);
            // TLS completed: the relay must still refuse to speak the protocol on it.
            try
            {
                await client.WriteAsync(RawClient.Hello(1, 1));
                var (closed, frames) = await client.WaitForCloseAsync(CloseWithin);
                refused = closed && !frames.Any(f => f.Type == FrameType.Welcome);
            }
            catch (IOException)
            {
                refused = true;
            }
        }
        catch (Exception ex) when (ex is AuthenticationException or IOException)
        {
            refused = true;
        }
        finally
        {
            if (client != null) await client.DisposeAsync();
        }
        await Assert.That(refused).IsTrue();

        await bystander.VerifyAsync();
    }

    [Test]
    [Arguments(false, "nothing")]
    [Arguments(true, "nothing")]
    [Arguments(true, "tls only")]
    [Arguments(false, "half a hello")]
    [Arguments(true, "half a hello")]
    public async Task Handshake_timeout_closes_a_silent_connection(bool tls, string sent)
    {
        var timeout = TimeSpan.FromMilliseconds(800);
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.Tls = tls;
            o.HandshakeTimeout = timeout;
        });
        await using var bystander = await Bystander.StartAsync(relay);

        var watch = Stopwatch.StartNew();
        bool closed;
        if (sent == "nothing")
        {
            // A bare TCP connection: not even a TLS ClientHello.
            using var tcp = new TcpClient();
            await tcp.ConnectAsync(relay.Server.RelayEndPoint);
            watch.Restart();
            var buffer = new byte[64];
            using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(10));
            int n;
            try
            {
                n = await tcp.GetStream().ReadAsync(buffer, cts.Token);
            }
            catch (IOException)
            {
                n = 0;
            }
            closed = n == 0;
        }
        else
        {
            await using var client = await RawClient.ConnectRawAsync(relay);
            watch.Restart();
            if (sent == "half a hello")
            {
                await client.WriteAsync(RawClient.Hello(1, 1).AsSpan(0, 5).ToArray());
            }
            var (c, frames) = await client.WaitForCloseAsync(TimeSpan.FromSeconds(10));
            closed = c && !frames.Any(f => f.Type == FrameType.Welcome);
        }
        var elapsed = watch.Elapsed;
        await Assert.That(closed).IsTrue();
        await Assert.That(elapsed).IsGreaterThanOrEqualTo(timeout - TimeSpan.FromMilliseconds(200));
        await Assert.That(elapsed).IsLessThan(timeout + TimeSpan.FromSeconds(4));

        await bystander.VerifyAsync();
    }
}
