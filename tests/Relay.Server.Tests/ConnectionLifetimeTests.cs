using System.Buffers.Binary;
using System.Diagnostics;
using System.Security.Cryptography;
using Relay.Protocol;
using static Relay.Server.Tests.OperationsMetrics;

namespace Relay.Server.Tests;

/// <summary>
/// How long a connection lives: the idle timeout closes a silent connection and spares one that
/// pings; a shutdown ends every connection after what it has in flight.
/// </summary>
public class ConnectionLifetimeTests
{
    [Test]
    public async Task A_silent_connection_is_closed_after_the_idle_timeout_and_a_pinging_one_stays()
    {
        await using var relay = await TestRelay.StartAsync(o => o.IdleTimeout = TimeSpan.FromSeconds(1));
        await using var silent = await RawClient.ConnectAsync(relay);
        await using var pinging = await RawClient.ConnectAsync(relay);

        var sinceLastPing = Stopwatch.StartNew();
        // The pinging client speaks every 300 ms for 3 s (three idle timeouts) and is answered each time.
        for (int i = 0; i < 10; i++)
        {
            uint corr = pinging.NextCorr();
            var pong = await pinging.RequestAsync(RawClient.Frame(FrameType.Ping, corr, []));
            await Assert.That(pong.Type).IsEqualTo(FrameType.Pong);
            sinceLastPing.Restart();
            await Task.Delay(300);
        }

        // Meanwhile the silent one was closed: between 1 s (the timeout) and the sweep's slack after it.
        var (closed, frames) = await silent.WaitForCloseAsync(TimeSpan.FromSeconds(1));
        await Assert.That(closed).IsTrue();
        await Assert.That(frames).IsEmpty();
        await Assert.That(relay.Logs.Lines.Any(l => l.Contains("Idle connection closed"))).IsTrue();

        // Once the pinging client falls silent, it is closed too, not before the timeout.
        var (closedLater, _) = await pinging.WaitForCloseAsync(TimeSpan.FromSeconds(5));
        await Assert.That(closedLater).IsTrue();
        await Assert.That(sinceLastPing.Elapsed).IsGreaterThanOrEqualTo(TimeSpan.FromSeconds(1));
        // And the relay counts no connection open any more.
        long open = -1;
        for (int i = 0; i < 50 && open != 0; i++)
        {
            open = relay.Server.Metrics.Snapshot(relay.Server.Store, relay.Server.Options, TimeSpan.Zero).ConnectionsOpen;
            if (open != 0) await Task.Delay(100);
        }
        await Assert.That(open).IsEqualTo(0);
    }

    [Test]
    public async Task A_client_that_does_not_read_its_answers_stops_being_read()
    {
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.Tls = false;
            o.MaxOutputBuffer = 64 * 1024;
        });
        await using var client = await RawClient.ConnectAsync(relay);

        // PINGs without ever reading a PONG: 1 MiB of frames per write.
        var ping = RawClient.Frame(FrameType.Ping, 7, []);
        var chunk = new byte[ping.Length * ((1 << 20) / ping.Length)];
        for (int i = 0; i + ping.Length <= chunk.Length; i += ping.Length)
        {
            ping.CopyTo(chunk, i);
        }
        long written = 0;
        const long Limit = 128L << 20;
        while (written < Limit)
        {
            var write = client.WriteAsync(chunk);
            if (await Task.WhenAny(write, Task.Delay(TimeSpan.FromSeconds(3))) != write)
            {
                // Left pending on purpose; it fails when the client is disposed.
                _ = write.ContinueWith(static t => _ = t.Exception, TaskContinuationOptions.OnlyOnFaulted);
                break;
            }
            await write; // the connection stays open: a failed write fails the test
            written += chunk.Length;
        }

        // The relay stopped reading once the unsent PONGs passed its output limit: what went in is what
        // the kernel buffers hold plus about 64 KiB worth of PINGs, not the 128 MiB offered.
        await Assert.That(written).IsLessThan(32L << 20);
        // And it still serves everyone else.
        await using var other = await RawClient.ConnectAsync(relay);
        var pong = await other.RequestAsync(RawClient.Frame(FrameType.Ping, other.NextCorr(), []));
        await Assert.That(pong.Type).IsEqualTo(FrameType.Pong);
    }

    [Test]
    [Arguments(0L)]
    [Arguments(1L << 20)]
    public async Task Clients_that_do_not_read_share_one_output_memory_budget(long budget)
    {
        const int Clients = 12, Gets = 300, Size = 60_000;
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.Tls = false;
            o.OutputMemoryBudget = budget;
        });
        await using var owner = await RawClient.ConnectAsync(relay);
        var queue = await owner.CreateQueueAsync();
        var sent = await owner.RequestAsync(owner.Send(owner.NextCorr(), queue.SenderId, new byte[Size]));
        await Assert.That(sent.Type).IsEqualTo(FrameType.Ok);

        // Each client asks for the 60 KB message 300 times (18 MB of answers, more than the kernel's
        // socket buffers of a loopback connection took here: about 10 MB) and never reads.
        var clients = new List<RawClient>();
        try
        {
            for (int c = 0; c < Clients; c++)
            {
                var client = await RawClient.ConnectAsync(relay);
                clients.Add(client);
                var gets = new List<byte>();
                for (int i = 0; i < Gets; i++)
                {
                    gets.AddRange(client.QueueCommand(FrameType.Get, client.NextCorr(), queue.RecipientId, [], queue.RecipientPrivate));
                }
                await client.WriteAsync([.. gets]);
            }
            // Held once it stops growing: each connection stopped being read at its limit.
            double held = await SettledValueAsync(relay, "relay_output_memory_bytes");
            await Assert.That(Value(await ScrapeAsync(relay), "relay_output_memory_budget_bytes")).IsEqualTo(budget);
            if (budget == 0)
            {
                // Without a relay-wide bound each connection buffers its own 1 MiB (and more for the
                // arrays' rounding and the write in progress).
                await Assert.That(held).IsGreaterThan(Clients * (1 << 20));
            }
            else
            {
                // With one: about the budget, then 32 KiB each (twice for the write in progress and
                // the arrays' rounding), far below 12 MiB.
                await Assert.That(held).IsLessThan(budget + (2 << 20) + Clients * 256 * 1024);
            }

            // Everyone else is served meanwhile, a 60 KB delivery included.
            await using var other = await RawClient.ConnectAsync(relay);
            var answer = await other.RequestAsync(other.QueueCommand(FrameType.Get, other.NextCorr(), queue.RecipientId, [], queue.RecipientPrivate));
            await Assert.That(answer.Type).IsEqualTo(FrameType.Msg);
            await Assert.That(RawClient.Open(queue, answer.Payload).Body.Length).IsEqualTo(Size);

            // And a client that was held back gets every answer once it reads.
            var reader = clients[^1];
            for (int i = 0; i < Gets; i++)
            {
                var frame = await reader.ReadFrameAsync(TimeSpan.FromSeconds(20));
                await Assert.That(frame?.Type).IsEqualTo(FrameType.Msg);
            }
        }
        finally
        {
            foreach (var client in clients)
            {
                await client.DisposeAsync();
            }
        }
        // Every buffer is given back once the connections are gone.
        await Assert.That(await EventuallyAsync(async () => Value(await ScrapeAsync(relay), "relay_output_memory_bytes") == 0)).IsTrue();
    }

    [Test]
    public async Task A_client_pipelining_large_messages_to_a_slow_disk_holds_no_more_than_its_in_flight_limit()
    {
        const int Size = 16 * 1024, Sends = 64, Limit = 256 * 1024;
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.Tls = false;
            o.MaxInFlightBytesPerConnection = Limit;
        });
        await using var recipient = await RawClient.ConnectAsync(relay);
        var queue = await recipient.CreateQueueAsync();
        await using var sender = await RawClient.ConnectAsync(relay);

        // The disk stalls on the first batch with a SEND in it, and reports each batch after it.
        using var release = new ManualResetEventSlim(false);
        var held = new TaskCompletionSource<int>(TaskCreationOptions.RunContinuationsAsynchronously);
        var batches = new System.Collections.Concurrent.ConcurrentQueue<int>();
        relay.Server.Store.BeforeWrite = (ops, bytes) =>
        {
            if (bytes < Size) return;   // not a batch with a message in it
            if (held.TrySetResult(ops))
            {
                release.Wait(TimeSpan.FromSeconds(30));
                return;
            }
            batches.Enqueue(ops);
        };

        // 1 MiB of SENDs, pipelined: four times what the relay will hold for one connection.
        var frames = new List<byte[]>();
        for (int i = 0; i < Sends; i++)
        {
            var body = new byte[Size];
            BinaryPrimitives.WriteInt32BigEndian(body, i);
            frames.Add(sender.Send(sender.NextCorr(), queue.SenderId, body));
        }
        var writing = sender.WriteAsync(frames.SelectMany(f => f).ToArray());
        int first = await held.Task.WaitAsync(TimeSpan.FromSeconds(10));
        await Task.Delay(2_000);   // time to read every frame, were it not for the limit
        release.Set();

        var answers = new List<RawFrame>();
        for (int i = 0; i < Sends; i++)
        {
            answers.Add(await sender.ReadResponseAsync());
        }
        await writing;
        // While the disk stalled, the relay read up to the limit (16 SENDs of 16 KB) and stopped: the
        // batch written after the stall holds what it read meanwhile, and no batch holds more.
        await Assert.That(batches).IsNotEmpty();
        await Assert.That(batches.Prepend(first).Max()).IsLessThanOrEqualTo(Limit / Size);
        // It did read while the disk stalled (the limit, not slowness, is what stopped it).
        await Assert.That(first + batches.First()).IsGreaterThanOrEqualTo(Limit / Size / 2);
        // And then it went on: every SEND answered OK, every message stored in order.
        await Assert.That(answers.All(a => a.Type == FrameType.Ok)).IsTrue();
        await Assert.That(relay.Server.Store.FindBySenderId(queue.SenderId)!.MessageCount).IsEqualTo(Sends);
    }

    [Test]
    [Arguments(0L)]
    [Arguments(256L * 1024)]
    public async Task Clients_pipelining_to_a_stalled_disk_share_one_in_flight_memory_budget(long budget)
    {
        const int Clients = 8, Sends = 64, Size = 16 * 1024, PerConnection = 512 * 1024, WhenShort = 32 * 1024;
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.Tls = false;
            o.MaxInFlightBytesPerConnection = PerConnection;
            o.InFlightMemoryBudget = budget;
            o.InFlightBytesWhenMemoryIsShort = WhenShort;
        });
        await using var owner = await RawClient.ConnectAsync(relay);
        var queues = new List<RawQueue>();
        for (int c = 0; c < Clients; c++)
        {
            queues.Add(await owner.CreateQueueAsync());
        }

        // The disk stalls on the first batch with a message in it until released.
        using var release = new ManualResetEventSlim(false);
        var held = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        relay.Server.Store.BeforeWrite = (ops, bytes) =>
        {
            if (bytes >= Size && held.TrySetResult())
            {
                release.Wait(TimeSpan.FromSeconds(30));
            }
        };

        // Each client pipelines 1 MiB of SENDs to its own queue: twice its own limit.
        var clients = new List<RawClient>();
        try
        {
            var writes = new List<Task>();
            for (int c = 0; c < Clients; c++)
            {
                var client = await RawClient.ConnectAsync(relay);
                clients.Add(client);
                var frames = new List<byte>();
                for (int i = 0; i < Sends; i++)
                {
                    var body = new byte[Size];
                    BinaryPrimitives.WriteInt32BigEndian(body, i);
                    frames.AddRange(client.Send(client.NextCorr(), queues[c].SenderId, body));
                }
                writes.Add(client.WriteAsync([.. frames]));
            }
            await held.Task.WaitAsync(TimeSpan.FromSeconds(10));
            // Held once it stops growing: each connection stopped being read at its limit.
            double inFlight = await SettledValueAsync(relay, "relay_inflight_memory_bytes");
            await Assert.That(Value(await ScrapeAsync(relay), "relay_inflight_memory_budget_bytes")).IsEqualTo(budget);
            if (budget == 0)
            {
                // Without a relay-wide bound each connection holds up to its own 512 KiB.
                await Assert.That(inFlight).IsGreaterThanOrEqualTo(Clients * (PerConnection - Size));
            }
            else
            {
                // With one: the budget, passed by at most what each connection may hold while it is
                // used up and the SENDs being read as it was reached, far below 8 × 512 KiB.
                await Assert.That(inFlight).IsLessThanOrEqualTo(budget + Clients * (WhenShort + 2 * Size));
                await Assert.That(inFlight).IsGreaterThanOrEqualTo(budget);
            }

            // Once the disk goes on, every SEND of every client is answered OK and stored.
            release.Set();
            await Task.WhenAll(writes);
            for (int c = 0; c < Clients; c++)
            {
                for (int i = 0; i < Sends; i++)
                {
                    var answer = await clients[c].ReadResponseAsync();
                    await Assert.That(answer.Type).IsEqualTo(FrameType.Ok);
                }
                await Assert.That(relay.Server.Store.FindBySenderId(queues[c].SenderId)!.MessageCount).IsEqualTo(Sends);
            }
            await Assert.That(await EventuallyAsync(async () => Value(await ScrapeAsync(relay), "relay_inflight_memory_bytes") == 0)).IsTrue();
        }
        finally
        {
            release.Set();
            foreach (var client in clients)
            {
                await client.DisposeAsync();
            }
        }
    }

    [Test]
    [Arguments(0L)]
    [Arguments(256L * 1024)]
    public async Task Clients_naming_many_missing_queues_share_one_key_memory_budget(long budget)
    {
        // Each SEND to an id that names no queue makes the relay derive and cache a decoy key (so that a
        // repeated probe costs what a repeated wrong key costs): four clients naming 1,500 ids each
        // would hold 6,000 keys (3 MB at 512 bytes each) without a relay-wide bound.
        const int Clients = 4, Ids = 1_500, WhenShort = 64;
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.Tls = false;
            o.KeyMemoryBudget = budget;
            o.KeysWhenMemoryIsShort = WhenShort;
        });
        await using var owner = await RawClient.ConnectAsync(relay);
        var queue = await owner.CreateQueueAsync();

        var clients = new List<RawClient>();
        try
        {
            for (int c = 0; c < Clients; c++)
            {
                var client = await RawClient.ConnectAsync(relay);
                clients.Add(client);
                var frames = new List<byte>();
                for (int i = 0; i < Ids; i++)
                {
                    frames.AddRange(client.Send(client.NextCorr(), RandomNumberGenerator.GetBytes(24), "probe"u8));
                }
                await client.WriteAsync([.. frames]);
            }
            foreach (var client in clients)
            {
                for (int i = 0; i < Ids; i++)
                {
                    await Assert.That((await client.ReadResponseAsync()).Error).IsEqualTo(ErrorCode.Auth);
                }
            }

            string metrics = await ScrapeAsync(relay);
            double keys = Value(metrics, "relay_key_memory_bytes");
            await Assert.That(Value(metrics, "relay_key_memory_budget_bytes")).IsEqualTo(budget);
            if (budget == 0)
            {
                await Assert.That(keys).IsGreaterThanOrEqualTo(Clients * Ids * 512.0);
            }
            else
            {
                // The budget, passed by at most the keys a connection may hold while it is used up.
                await Assert.That(keys).IsLessThanOrEqualTo(budget + (Clients + 1) * WhenShort * 512.0);
                // Each probing connection still holds at least the key it derived last.
                await Assert.That(keys).IsGreaterThanOrEqualTo(Clients * 512.0);
            }

            // A client with a real queue is served as before, on a new connection and on its old one.
            await using var sender = await RawClient.ConnectAsync(relay);
            await Assert.That((await sender.RequestAsync(sender.Send(sender.NextCorr(), queue.SenderId, "hello"u8))).Type).IsEqualTo(FrameType.Ok);
            await Assert.That((await owner.RequestAsync(owner.Send(owner.NextCorr(), queue.SenderId, "again"u8))).Type).IsEqualTo(FrameType.Ok);
            await Assert.That(relay.Server.Store.FindBySenderId(queue.SenderId)!.MessageCount).IsEqualTo(2);
        }
        finally
        {
            foreach (var client in clients)
            {
                await client.DisposeAsync();
            }
        }
        // Closed connections give their keys back.
        await Assert.That(await EventuallyAsync(async () => Value(await ScrapeAsync(relay), "relay_key_memory_bytes") <= 4 * 512)).IsTrue();
    }

    [Test]
    public async Task A_command_the_store_refuses_while_it_undoes_a_failed_write_is_answered_and_the_connection_goes_on()
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = false);
        await using var client = await RawClient.ConnectAsync(relay);
        var queue = await client.CreateQueueAsync();
        var other = await client.CreateQueueAsync();
        var (senderPrivate, senderPublic) = RawClient.KeyPair();

        // The disk fails the next write with a message in it; while the store undoes it, the test
        // sends SKEY (which the store refuses at once) and lets the undo finish once it is answered.
        var store = relay.Server.Store;
        var undoing = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        using var answered = new ManualResetEventSlim(false);
        int writes = 0;
        store.BeforeWrite = (ops, bytes) =>
        {
            if (bytes > 0 && Interlocked.Increment(ref writes) == 1) throw new IOException("injected write failure");
        };
        store.WhileUndoing = () =>
        {
            undoing.TrySetResult();
            answered.Wait(TimeSpan.FromSeconds(10));
        };
        uint sendCorr = client.NextCorr();
        await client.WriteAsync(client.Send(sendCorr, other.SenderId, "lost"u8));
        await undoing.Task.WaitAsync(TimeSpan.FromSeconds(10));
        uint skeyCorr = client.NextCorr();
        await client.WriteAsync(client.QueueCommand(FrameType.SKey, skeyCorr, queue.SenderId, senderPublic, senderPrivate));
        var refused = await client.ReadResponseAsync();   // the SEND is answered only after the undo
        answered.Set();
        var failed = await client.ReadResponseAsync();
        store.WhileUndoing = null;
        await Assert.That(refused.Correlation).IsEqualTo(skeyCorr);
        await Assert.That(refused.Error).IsEqualTo(ErrorCode.Internal);
        await Assert.That(failed.Correlation).IsEqualTo(sendCorr);
        await Assert.That(failed.Error).IsEqualTo(ErrorCode.Internal);

        // The connection goes on, and the same SKEY now succeeds.
        var pong = await client.RequestAsync(RawClient.Frame(FrameType.Ping, client.NextCorr(), []));
        await Assert.That(pong.Type).IsEqualTo(FrameType.Pong);
        var secured = await client.RequestAsync(client.QueueCommand(FrameType.SKey, client.NextCorr(), queue.SenderId, senderPublic, senderPrivate));
        await Assert.That(secured.Type).IsEqualTo(FrameType.Ok);
    }

    [Test]
    public async Task A_frame_trickled_slower_than_the_partial_frame_timeout_ends_the_connection_and_a_slow_one_within_it_does_not()
    {
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.Tls = false;
            o.PartialFrameTimeout = TimeSpan.FromSeconds(2);
        });
        // Within the timeout: a PING in three pieces, 300 ms apart, is answered.
        await using var slow = await RawClient.ConnectAsync(relay);
        var ping = RawClient.Frame(FrameType.Ping, slow.NextCorr(), []);
        for (int i = 0; i < ping.Length; i += 3)
        {
            await slow.WriteAsync(ping[i..Math.Min(ping.Length, i + 3)]);
            await Task.Delay(300);
        }
        await Assert.That((await slow.ReadResponseAsync()).Type).IsEqualTo(FrameType.Pong);

        // Beyond it: 10 bytes of a 1,000-byte frame, then one more byte 3 s later.
        await using var trickler = await RawClient.ConnectAsync(relay);
        var frame = new byte[14];
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(frame, 1_000);
        frame[4] = (byte)FrameType.Send;
        await trickler.WriteAsync(frame);
        await Task.Delay(3_000);
        await trickler.WriteAsync([0]);
        var (closed, frames) = await trickler.WaitForCloseAsync(TimeSpan.FromSeconds(10));
        await Assert.That(closed).IsTrue();
        await Assert.That(frames.Select(f => f.Error)).IsEquivalentTo(new ErrorCode?[] { ErrorCode.Syntax });
        await Assert.That(frames.Single().Correlation).IsEqualTo(0u);
    }

    [Test]
    public async Task A_frame_that_waited_while_the_relay_stopped_reading_is_not_counted_as_trickled()
    {
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.Tls = false;
            o.PartialFrameTimeout = TimeSpan.FromSeconds(1);
            o.MaxOutputBuffer = 16 * 1024;
        });
        // In process: the relay's sends wait once 64 KiB are unread, so two 60 KB messages stop its reading.
        await using var recipient = await RawClient.ConnectInProcessAsync(relay);
        var queue = await recipient.CreateQueueAsync();
        await using (var sender = await RawClient.ConnectAsync(relay))
        {
            var sent = await sender.RequestAsync(sender.Send(sender.NextCorr(), queue.SenderId, new byte[60_000]));
            await Assert.That(sent.Type).IsEqualTo(FrameType.Ok);
        }
        byte[] Get() => recipient.QueueCommand(FrameType.Get, recipient.NextCorr(), queue.RecipientId, [], queue.RecipientPrivate);
        var first = Get();
        var second = Get();
        var ping = RawClient.Frame(FrameType.Ping, recipient.NextCorr(), []);

        // A GET and the start of the next, then the rest of it and the start of a PING: the second
        // answer does not fit, and the relay stops reading with only the PING's start left over.
        await recipient.WriteAsync([.. first, .. second[..10]]);
        await Task.Delay(200);
        await recipient.WriteAsync([.. second[10..], .. ping[..5]]);
        // Longer than the partial-frame timeout, all of it the relay's own pause.
        await Task.Delay(2_500);
        for (int i = 0; i < 2; i++)
        {
            var message = await recipient.ReadResponseAsync();
            await Assert.That(message.Type).IsEqualTo(FrameType.Msg);
        }
        await recipient.WriteAsync(ping[5..]);
        var pong = await recipient.ReadResponseAsync();
        await Assert.That(pong.Type).IsEqualTo(FrameType.Pong);
    }

    [Test]
    public async Task A_subscriber_that_does_not_read_gets_no_more_than_its_output_limit_and_then_everything()
    {
        const int Queues = 50, PerQueue = 64, Size = 16 * 1024;
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.Tls = false;
            o.MaxOutputBuffer = 64 * 1024;
            o.QueueMaxMessages = PerQueue;
        });
        await using var recipient = await RawClient.ConnectAsync(relay);
        var queues = new List<RawQueue>();
        for (int q = 0; q < Queues; q++)
        {
            var queue = await recipient.CreateQueueAsync();
            var window = new byte[2];
            BinaryPrimitives.WriteUInt16BigEndian(window, PerQueue);
            var sub = await recipient.RequestAsync(recipient.QueueCommand(FrameType.Sub, recipient.NextCorr(), queue.RecipientId, window, queue.RecipientPrivate));
            await Assert.That(sub.Type).IsEqualTo(FrameType.Ok);
            queues.Add(queue);
        }

        // The recipient stops reading; 50 MiB arrive for its 50 subscriptions (window 64 each).
        await using var sender = await RawClient.ConnectAsync(relay);
        double deliveredBefore = Value(await ScrapeAsync(relay), "relay_deliveries_total");
        for (int i = 0; i < PerQueue; i++)
        {
            for (int q = 0; q < Queues; q++)
            {
                var body = new byte[Size];
                BinaryPrimitives.WriteInt32BigEndian(body, q);
                BinaryPrimitives.WriteInt32BigEndian(body.AsSpan(4), i);
                var ok = await sender.RequestAsync(sender.Send(sender.NextCorr(), queues[q].SenderId, body));
                await Assert.That(ok.Type).IsEqualTo(FrameType.Ok);
            }
        }

        // Pushed (written for the connection): what the kernel's socket buffers took plus about the
        // 64 KiB limit, far from the 50 MiB the windows allow. The rest waits in the store.
        double pushed = Value(await ScrapeAsync(relay), "relay_deliveries_total") - deliveredBefore;
        await Assert.That(pushed).IsLessThan(Queues * PerQueue / 2);
        await using (var other = await RawClient.ConnectAsync(relay))
        {
            var pong = await other.RequestAsync(RawClient.Frame(FrameType.Ping, other.NextCorr(), []));
            await Assert.That(pong.Type).IsEqualTo(FrameType.Pong);
        }

        // Once it reads, every message arrives, whole and in order per queue.
        var next = new int[Queues];
        for (int n = 0; n < Queues * PerQueue; n++)
        {
            var frame = await recipient.ReadFrameAsync(TimeSpan.FromSeconds(20));
            await Assert.That(frame).IsNotNull();
            await Assert.That(frame!.Type).IsEqualTo(FrameType.Msg);
            int q = queues.FindIndex(x => frame.Payload.AsSpan(0, ProtocolConstants.IdSize).SequenceEqual(x.RecipientId));
            var (_, _, body) = RawClient.Open(queues[q], frame.Payload);
            await Assert.That(body.Length).IsEqualTo(Size);
            await Assert.That(BinaryPrimitives.ReadInt32BigEndian(body)).IsEqualTo(q);
            await Assert.That(BinaryPrimitives.ReadInt32BigEndian(body.AsSpan(4))).IsEqualTo(next[q]++);
        }
        await Assert.That(Value(await ScrapeAsync(relay), "relay_deliveries_total") - deliveredBefore).IsEqualTo(Queues * PerQueue);
    }

    [Test]
    public async Task A_store_that_fails_to_read_a_held_back_delivery_is_logged_and_the_connection_goes_on()
    {
        const int Messages = 64, Size = 16 * 1024;
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.Tls = false;
            o.MaxOutputBuffer = 64 * 1024;
            o.DeliveryMemoryBytes = 0;   // every delivery is read from the store
        });
        await using var recipient = await RawClient.ConnectInProcessAsync(relay);
        var queue = await recipient.CreateQueueAsync();
        await using (var sender = await RawClient.ConnectAsync(relay))
        {
            for (int i = 0; i < Messages; i++)
            {
                var ok = await sender.RequestAsync(sender.Send(sender.NextCorr(), queue.SenderId, new byte[Size]));
                await Assert.That(ok.Type).IsEqualTo(FrameType.Ok);
            }
        }

        // Subscribed with room for all 64, but the recipient does not read: the deliveries over its
        // output limit are held back until the send loop has drained the output.
        var window = new byte[2];
        BinaryPrimitives.WriteUInt16BigEndian(window, Messages);
        await recipient.WriteAsync(recipient.QueueCommand(FrameType.Sub, recipient.NextCorr(), queue.RecipientId, window, queue.RecipientPrivate));
        double delivered = -1;
        await Assert.That(await EventuallyAsync(async () =>
        {
            double now = Value(await ScrapeAsync(relay), "relay_deliveries_total");
            bool settled = now > 0 && now == delivered;
            delivered = now;
            return settled;
        })).IsTrue();
        await Assert.That(delivered).IsLessThan(Messages);

        // From here on the store fails every read (closed under the relay); then the recipient reads,
        // the send loop drains its output and goes to the store for the held-back deliveries.
        using var unobserved = new UnobservedExceptions(e => e is ObjectDisposedException && e.StackTrace?.Contains("ResumeDeferred") == true);
        await relay.Server.Store.DisposeAsync();
        await recipient.WriteAsync(RawClient.Frame(FrameType.Ping, 7, []));
        RawFrame? frame;
        do
        {
            frame = await recipient.ReadFrameAsync();
        }
        while (frame is { Type: FrameType.Ok or FrameType.Msg });
        await Assert.That(frame?.Type).IsEqualTo(FrameType.Pong);
        await Assert.That(relay.Logs.Lines.Any(l => l.Contains("Store operation SUB failed: ObjectDisposedException"))).IsTrue();
        await Assert.That(await unobserved.CollectAsync()).IsEmpty();
    }
}
