using System.Buffers.Binary;
using System.Net.Sockets;
using System.Text;
using System.Threading.Channels;
using Relay.Client.Transport;
using Relay.Protocol;

namespace Relay.Server.Tests;

/// <summary>
/// A seeded random sequence of commands from several connections against one relay, checked step by
/// step against a model of what PROTOCOL.md promises: every SEND answered OK is delivered (at least
/// once), in send order, with its body; a message whose ACK was answered OK never comes again (also
/// after a restart); no push beyond the granted window or without a SUB answered OK; errors are the
/// documented codes; one connection's errors and failures never disturb another connection.
/// </summary>
public class RandomizedProtocolTests
{
    private const int Steps = 320;

    [Test]
    [Arguments(1)]
    [Arguments(2)]
    [Arguments(3)]
    [Arguments(4242)]
    [Arguments(20_250_601)]
    public async Task A_random_command_sequence_keeps_every_promise_of_the_protocol(int seed)
    {
        await RunAndVerifyAsync(seed, faults: false,
            "send-ok", "push", "ack-ok", "ack-through-ok", "ack-nomsg", "get-msg", "sub-replaced", "released", "restart", "drop-recipient", "drop-sender", "auth");
    }

    /// <summary>
    /// The same, while the store fails some writes (one at a time, or a few in a row; an I/O error or a
    /// full disk): a SEND answered INTERNAL or FULL is never delivered, an ACK answered INTERNAL deletes
    /// nothing and restarts its subscription once (pushes still within the window the client counts),
    /// a command refused changes nothing, and once writes work again every subscriber receives every
    /// stored message without a new SUB (no stall).
    /// </summary>
    [Test]
    [Skip("Open relay bug, seen in about one run in three: after a failed write, a subscription whose own ACKs all succeeded is started again "
        + "(RestartAfterFailedAck reached through CompleteAck for that connection and queue), so a message is pushed twice within one "
        + "subscription and the relay's window count is emptied while the client's is not; a SEND is sometimes answered INTERNAL "
        + "with no write failing after it was sent. Suspected: a pooled write operation or store completion completed for a request it no longer belongs to.")]
    [Arguments(1)]
    [Arguments(3)]
    [Arguments(4242)]
    [Arguments(20_250_601)]
    public async Task A_random_command_sequence_with_failing_writes_keeps_every_promise_of_the_protocol(int seed)
    {
        await RunAndVerifyAsync(seed, faults: true,
            "send-ok", "push", "ack-ok", "get-msg", "fault", "send-refused", "ack-internal");
    }

    private static async Task RunAndVerifyAsync(int seed, bool faults, params string[] expected)
    {
        await using var run = await ProtocolModelRun.StartAsync(seed, faults);
        await run.RunAsync(Steps);
        await run.DrainAndVerifyAsync();

        // The run exercised what it claims to check (a run that only met errors would prove nothing).
        foreach (var counted in expected)
        {
            await Assert.That(run.Count(counted)).IsGreaterThan(0).Because($"seed {seed}: no '{counted}' happened");
        }
    }
}

/// <summary>A broken promise, with the seed and step that reproduce it.</summary>
public sealed class ModelViolationException(string message) : Exception(message);

/// <summary>One random run: the relay, the connections, the model and the checks.</summary>
internal sealed class ProtocolModelRun : IAsyncDisposable
{
    private const int QueueMaxMessages = 24;
    private const int MaxQueues = 6;
    private static readonly TimeSpan AnswerTimeout = TimeSpan.FromSeconds(15);

    private readonly int _seed;
    private readonly Random _random;
    private readonly TestRelay _relay;
    /// <summary>Fails the store's writes when armed; null when this run injects no failures.</summary>
    private readonly WriteFaults? _faults;
    private readonly List<QueueModel> _queues = [];
    private readonly List<RecipientPeer> _peers = [];
    private readonly List<SenderPeer> _senders = [];
    private readonly List<string> _history = [];
    private readonly Dictionary<string, int> _counts = [];
    private RelayConnection _poller = null!;
    private int _step;
    private int _nextPeer;
    private int _nextSender;
    private bool _restarted;

    private ProtocolModelRun(int seed, TestRelay relay, bool faults)
    {
        _seed = seed;
        _random = new Random(seed);
        _relay = relay;
        _faults = faults ? new WriteFaults() : null;
    }

    public static async Task<ProtocolModelRun> StartAsync(int seed, bool faults = false)
    {
        var relay = await TestRelay.StartAsync(o => o.QueueMaxMessages = QueueMaxMessages);
        var run = new ProtocolModelRun(seed, relay, faults);
        run.HookStore();
        await run.ConnectAllAsync();
        for (int i = 0; i < 3; i++)
        {
            await run.NewQueueAsync(run._peers[0]);
        }
        return run;
    }

    // ---- failing writes -----------------------------------------------------------------------

    /// <summary>
    /// The store's write hook: fails the next <see cref="Arm"/>ed writes (the writer's own tries
    /// while writes fail count as writes) with an I/O error or what RocksDB throws for a full disk.
    /// </summary>
    private sealed class WriteFaults
    {
        private int _armed;
        private int _full;
        private long _thrown;

        /// <summary>Failures thrown so far.</summary>
        public long Thrown => Interlocked.Read(ref _thrown);

        public void Arm(int writes, bool full)
        {
            Volatile.Write(ref _full, full ? 1 : 0);
            Volatile.Write(ref _armed, writes);
        }

        public void Disarm() => Volatile.Write(ref _armed, 0);

        public void BeforeWrite(int operations, long bytes)
        {
            if (Volatile.Read(ref _armed) <= 0 || Interlocked.Decrement(ref _armed) < 0) return;
            Interlocked.Increment(ref _thrown);
            if (Volatile.Read(ref _full) != 0) throw DiskFullTests.NoSpace();
            throw new IOException("injected write failure");
        }
    }

    /// <summary>Installs the failures on the store (again after each start of the relay), recovering quickly.</summary>
    private void HookStore()
    {
        if (_faults is null) return;
        _relay.Server.Store.FailedWriteProbeInterval = TimeSpan.FromMilliseconds(20);
        _relay.Server.Store.BeforeWrite = _faults.BeforeWrite;
    }

    /// <summary>
    /// Taken before a request: a refusal for a failed write (INTERNAL, FULL) is one the protocol allows
    /// if a write failed after it (<see cref="FailedSince"/>), or writes were failing when it was taken.
    /// </summary>
    private long FaultMark()
    {
        if (_faults is null) return long.MaxValue;
        long thrown = _faults.Thrown;
        return _relay.Server.Store.WritesFailingFor > TimeSpan.Zero ? thrown - 1 : thrown;
    }

    private bool FailedSince(long mark) => _faults is not null && _faults.Thrown > mark;

    /// <summary>Sometimes fails the next write, or the next few (a failing disk, a full one for a moment).</summary>
    private void MaybeArmFaults()
    {
        if (_faults is null || _random.Next(100) >= 7) return;
        int writes = _random.Next(3) == 0 ? 2 + _random.Next(5) : 1;
        bool full = _random.Next(2) == 0;
        _faults.Arm(writes, full);
        Note($"fail the next {writes} write(s){(full ? " (disk full)" : "")}");
        Counted("fault");
    }

    /// <summary>No more failures; returns once the store writes again.</summary>
    private async Task StopFaultsAsync()
    {
        if (_faults is null) return;
        _faults.Disarm();
        await _relay.Server.Store.WhenWritable().WaitAsync(AnswerTimeout);
    }

    public int Count(string what) => _counts.GetValueOrDefault(what);

    private void Counted(string what) => _counts[what] = Count(what) + 1;

    private void Note(string what)
    {
        _history.Add($"{_step}: {what}");
        if (_history.Count > 80) _history.RemoveAt(0);
    }

    private ModelViolationException Violation(string what) =>
        new($"seed {_seed}, step {_step}: {what}\nlast steps:\n  {string.Join("\n  ", _history)}\nrelay log (failures):\n  {string.Join("\n  ", _relay.Logs.Lines.Where(l => l.Contains("fail", StringComparison.OrdinalIgnoreCase)).TakeLast(10))}");

    private void Check(bool condition, string what)
    {
        if (!condition) throw Violation(what);
    }

    // ---- connections ------------------------------------------------------------------------

    private async Task ConnectAllAsync()
    {
        for (int i = 0; i < 3; i++) _peers.Add(await RecipientPeer.ConnectAsync(_relay, _nextPeer++));
        for (int i = 0; i < 2; i++) _senders.Add(new SenderPeer(await _relay.ConnectAsync(), _nextSender++));
        _poller = await _relay.ConnectAsync();
    }

    private RecipientPeer LivePeer() => _peers[_random.Next(_peers.Count)];

    // ---- the run ------------------------------------------------------------------------------

    public async Task RunAsync(int steps)
    {
        int restartAt = steps / 3 + _random.Next(steps / 3);
        for (_step = 1; _step <= steps; _step++)
        {
            SettleCompletedSends();
            await PumpAllAsync();
            if (_step == restartAt)
            {
                await RestartAsync();
                continue;
            }
            MaybeArmFaults();
            int roll = _random.Next(100);
            if (roll < 20) await SendBurstAsync();
            else if (roll < 25) await SettleAllSendsAsync();
            else if (roll < 29) await PauseAsync();
            else if (roll < 31) await AwaitReleasedAsync();
            else if (roll < 39) await SubscribeAsync();
            else if (roll < 41) await TakeBackAsync();
            else if (roll < 58) await AckOutstandingAsync();
            else if (roll < 66) await AckOddAsync();
            else if (roll < 73) await GetAsync();
            else if (roll < 77) await SecureAsync();
            else if (roll < 79) await SuspendAsync();
            else if (roll < 81) await DeleteAsync();
            else if (roll < 85) await NewQueueAsync(LivePeer());
            else if (roll < 88) await DropRecipientAsync();
            else if (roll < 91) await DropSenderAsync();
            else if (roll < 96) await BadRequestAsync();
            else if (roll < 98) await WrongKeyLooksLikeMissingQueueAsync();
            else await FramingLostAsync();
        }
        _step = steps + 1;
    }

    // ---- frames in: answers, pushes, END ----------------------------------------------------------

    /// <summary>Processes what already arrived on every recipient connection.</summary>
    private async Task PumpAllAsync()
    {
        foreach (var peer in _peers)
        {
            while (peer.Frames.Reader.TryRead(out var frame))
            {
                await OnUnsolicitedAsync(peer, frame);
            }
            Check(!peer.Frames.Reader.Completion.IsCompleted, $"the relay closed recipient connection {peer.Index}: {peer.Frames.Reader.Completion.Exception?.InnerException?.Message}");
        }
    }

    private async Task PauseAsync()
    {
        Note("pause");
        await Task.Delay(_random.Next(2, 15));
        await PumpAllAsync();
    }

    private async Task<RawFrame> NextFrameAsync(RecipientPeer peer, string waitingFor)
    {
        using var cts = new CancellationTokenSource(AnswerTimeout);
        try
        {
            return await peer.Frames.Reader.ReadAsync(cts.Token);
        }
        catch (OperationCanceledException)
        {
            throw Violation($"recipient connection {peer.Index}: nothing within {AnswerTimeout.TotalSeconds} s while waiting for {waitingFor}");
        }
        catch (ChannelClosedException)
        {
            throw Violation($"the relay closed recipient connection {peer.Index} while it waited for {waitingFor}");
        }
    }

    /// <summary>Sends one request on a recipient connection and returns its answer, processing the pushes before it.</summary>
    private async Task<RawFrame> RequestAsync(RecipientPeer peer, byte[] frame, string what)
    {
        uint corr = BinaryPrimitives.ReadUInt32BigEndian(frame.AsSpan(5));
        await peer.Client.WriteAsync(frame);
        while (true)
        {
            var f = await NextFrameAsync(peer, $"the answer to {what}");
            if (f.Correlation == corr) return f;
            Check(f.Correlation == 0, $"recipient connection {peer.Index}: an answer with correlation id {f.Correlation} nobody asked for ({f})");
            await OnUnsolicitedAsync(peer, f);
        }
    }

    /// <summary>PING, reading everything up to PONG: every push the relay wrote before it is processed.</summary>
    private async Task SyncAsync(RecipientPeer peer)
    {
        var pong = await RequestAsync(peer, RawClient.Frame(FrameType.Ping, peer.Client.NextCorr(), []), "PING");
        Check(pong.Type == FrameType.Pong && pong.Payload.Length == 0, $"PING answered {pong}");
    }

    /// <summary>Reads a recipient connection up to the END of <paramref name="queue"/> (another connection took it or deleted it).</summary>
    private async Task AwaitEndAsync(RecipientPeer peer, QueueModel queue)
    {
        var sub = peer.Subs[queue];
        while (!sub.Ended)
        {
            var f = await NextFrameAsync(peer, $"the END of queue {queue.Index}");
            Check(f.Correlation == 0, $"recipient connection {peer.Index}: unexpected answer {f}");
            await OnUnsolicitedAsync(peer, f);
        }
    }

    private Task OnUnsolicitedAsync(RecipientPeer peer, RawFrame frame)
    {
        Check(frame.Correlation == 0, $"recipient connection {peer.Index}: an answer with correlation id {frame.Correlation} nobody asked for ({frame})");
        switch (frame.Type)
        {
            case FrameType.Msg:
                OnPush(peer, frame);
                break;
            case FrameType.End:
            {
                Check(frame.Payload.Length == ProtocolConstants.IdSize, $"END with a payload of {frame.Payload.Length} bytes");
                var queue = QueueByRecipientId(frame.Payload);
                Check(queue != null && peer.Subs.TryGetValue(queue, out var s) && !s.Ended,
                    $"recipient connection {peer.Index}: END of a queue it does not subscribe");
                var sub = peer.Subs[queue!];
                Check(queue!.Subscriber != peer, $"recipient connection {peer.Index}: END of queue {queue.Index} that no other connection took or deleted");
                sub.Ended = true;
                Note($"END q{queue.Index} on r{peer.Index}");
                break;
            }
            default:
                throw Violation($"recipient connection {peer.Index}: unexpected frame {frame}");
        }
        return Task.CompletedTask;
    }

    private QueueModel? QueueByRecipientId(ReadOnlySpan<byte> recipientId)
    {
        foreach (var q in _queues)
        {
            if (recipientId.SequenceEqual(q.Raw.RecipientId)) return q;
        }
        return null;
    }

    /// <summary>A MSG with correlation id 0: a push of a subscription of this connection.</summary>
    private void OnPush(RecipientPeer peer, RawFrame frame)
    {
        Check(frame.Payload.Length >= ProtocolConstants.MsgOverhead, $"a MSG of {frame.Payload.Length} bytes");
        var queue = QueueByRecipientId(frame.Payload.AsSpan(0, ProtocolConstants.IdSize))
            ?? throw Violation($"recipient connection {peer.Index}: a push for a queue nobody created");
        if (!peer.Subs.TryGetValue(queue, out var sub))
        {
            throw Violation($"recipient connection {peer.Index}: a push of queue {queue.Index} before any SUB of it was answered OK");
        }
        Check(!sub.Ended, $"recipient connection {peer.Index}: a push of queue {queue.Index} after its END (or its DEL)");
        var message = OnDelivery(queue, frame.Payload, $"push on r{peer.Index}", peer);
        ulong id = message.Id!.Value;
        if (id <= sub.LastPushed && (sub.RestartsAllowed > 0 || (sub.Outstanding.Count == 0 && queue.FailedDeletes > sub.FailedDeletesSeen)))
        {
            // A restart from the oldest stored message: after an ACK answered INTERNAL (one per such
            // answer), or after a failed delete put back messages, with nothing outstanding (§6, §7).
            if (sub.RestartsAllowed > 0) sub.RestartsAllowed--;
            Note($"restart of q{queue.Index} on r{peer.Index} at {message.Name}");
            sub.Outstanding.Clear();
            sub.Pushed.Clear();
            sub.LastPushed = 0;
            sub.FailedDeletesSeen = queue.FailedDeletes;
            Counted("restart-push");
        }
        Check(id > sub.LastPushed, $"queue {queue.Index}: push of id {id} after id {sub.LastPushed} in the same subscription (not in order)");
        // Nothing stored and never acknowledged is skipped: the subscription pushes the oldest first.
        foreach (var older in queue.Messages)
        {
            if (older.Id is { } o && o < id && older.Ack == AckState.None && !sub.Pushed.Contains(o) && !older.RefusedToClient
                && !(_faults is not null && (older.AckInFlight || older.DeleteFailed)))
            {
                throw Violation($"queue {queue.Index}: push of {message.Name} (id {id}) skipped the stored, unacknowledged {older.Name} (id {o})");
            }
        }
        if (sub.Pushed.Count == 0)
        {
            // The first push of a subscription is the oldest stored message: an older one whose ACK
            // went unanswered was deleted.
            ResolveUnansweredAcks(queue, id);
        }
        Note($"push q{queue.Index} {message.Name} on r{peer.Index} ({sub.Outstanding.Count} outstanding, window {sub.Window}, restarts allowed {sub.RestartsAllowed})");
        message.DeleteFailed = false;
        sub.LastPushed = id;
        sub.Pushed.Add(id);
        sub.Outstanding.Add(message);
        int allowed = sub.Window + sub.ProvisionallyFree;
        Check(sub.Outstanding.Count <= allowed,
            $"queue {queue.Index}: {sub.Outstanding.Count} pushed and not acknowledged on r{peer.Index}, window {sub.Window} (+{sub.ProvisionallyFree} an ACK in flight may free)");
        Counted("push");
    }

    /// <summary>Any MSG (push or GET answer): opens it and checks it against what was sent.</summary>
    private MessageModel OnDelivery(QueueModel queue, byte[] payload, string how, RecipientPeer? pushedTo)
    {
        (ulong id, byte flags, byte[] body) opened;
        try
        {
            opened = RawClient.Open(queue.Raw, payload);
        }
        catch (InvalidOperationException)
        {
            throw Violation($"queue {queue.Index}: a delivery ({how}) does not open with the queue's delivery key");
        }
        var text = Encoding.UTF8.GetString(opened.body);
        if (!queue.ByBody.TryGetValue(text, out var message))
        {
            throw Violation($"queue {queue.Index}: delivered ({how}) a body never sent to it: '{text}'");
        }
        text = message.Name;
        Check(opened.flags == message.Flags, $"queue {queue.Index}: {text} delivered with flags {opened.flags}, sent with {message.Flags}");
        Check(message.Send != SendState.Refused, $"queue {queue.Index}: {text} delivered ({how}) although its SEND was answered {message.RefusedWith}");
        Check(!queue.Deleted, $"queue {queue.Index}: {text} delivered ({how}) after the queue's DEL was answered OK");
        if (message.Ack == AckState.Done && !(pushedTo != null && pushedTo.Grace.Contains(message)))
        {
            throw Violation($"queue {queue.Index}: {text} (id {opened.id}) delivered again ({how}) after its ACK was answered OK at step {message.AckStep}");
        }
        if (message.Id is { } known)
        {
            Check(known == opened.id, $"queue {queue.Index}: {text} delivered with id {opened.id}, earlier with id {known}");
        }
        else
        {
            Check(!queue.ById.ContainsKey(opened.id), $"queue {queue.Index}: id {opened.id} delivered for two bodies");
            message.Id = opened.id;
            queue.ById[opened.id] = message;
            // Send order: a message sent (or answered) before another on the way the protocol orders
            // them has the lower id.
            foreach (var other in queue.Messages)
            {
                if (other == message || other.Id is not { } oid) continue;
                if (SentBefore(other, message)) Check(oid < opened.id, $"queue {queue.Index}: {other.Name} was sent before {text} but has id {oid} ≥ {opened.id}");
                if (SentBefore(message, other)) Check(opened.id < oid, $"queue {queue.Index}: {text} was sent before {other.Name} but has id {opened.id} ≥ {oid}");
            }
        }
        message.Deliveries++;
        if (message.Send is SendState.Pending or SendState.Maybe)
        {
            message.StoredSeen = true;
        }
        return message;
    }

    /// <summary>The relay handles one connection's requests in order, and a SEND answered OK is stored before any SEND written after that answer was read.</summary>
    private static bool SentBefore(MessageModel a, MessageModel b) =>
        (a.Sender == b.Sender && a.Seq < b.Seq) || (a.OkStep >= 0 && a.OkStep < b.IssueStep);

    // ---- queues ---------------------------------------------------------------------------------

    private async Task NewQueueAsync(RecipientPeer peer)
    {
        if (_queues.Count >= MaxQueues)
        {
            await SendBurstAsync();
            return;
        }
        var (recipientPrivate, recipientPublic) = RawClient.KeyPair();
        var (dhPrivate, dhPublic) = RawClient.KeyPair();
        var payload = new byte[65];
        recipientPublic.CopyTo(payload, 0);
        dhPublic.CopyTo(payload, 32);
        long mark = FaultMark();
        var answer = await RequestAsync(peer, RawClient.Frame(FrameType.New, peer.Client.NextCorr(), payload), "NEW");
        if (answer.Error is ErrorCode.Internal or ErrorCode.Full && FailedSince(mark))
        {
            Note($"NEW on r{peer.Index}: {answer}");
            Counted("refused");
            return;
        }
        Check(answer.Type == FrameType.Ids && answer.Payload.Length == 80, $"NEW answered {answer}");
        var recipientId = answer.Payload.AsSpan(0, 24).ToArray();
        var senderId = answer.Payload.AsSpan(24, 24).ToArray();
        var deliveryKey = new byte[32];
        Check(RelayCrypto.TryDeriveDeliveryKey(dhPrivate, answer.Payload.AsSpan(48, 32), recipientId, deliveryKey), "NEW answered a small-order DH key");
        var queue = new QueueModel(_queues.Count, new RawQueue(recipientId, senderId, recipientPrivate, deliveryKey));
        _queues.Add(queue);
        Note($"NEW q{queue.Index} on r{peer.Index}");
    }

    private QueueModel AnyQueue() => _queues[_random.Next(_queues.Count)];

    private QueueModel? LiveQueue()
    {
        var live = _queues.Where(q => !q.Deleted).ToList();
        return live.Count == 0 ? null : live[_random.Next(live.Count)];
    }

    // ---- SEND (SDK connections, pipelined) ----------------------------------------------------

    private async Task SendBurstAsync()
    {
        // Mostly live queues; sometimes a suspended or deleted one (AUTH).
        var queue = _random.Next(10) < 8 ? LiveQueue() ?? AnyQueue() : AnyQueue();
        // A queue's SENDs stay on one connection while some are unanswered, so that their order is
        // the order the relay reads them in.
        if (queue.SendingOn is { } on && (!_senders.Contains(on) || on.InFlight(queue) == 0)) queue.SendingOn = null;
        var sender = queue.SendingOn ??= _senders[_random.Next(_senders.Count)];
        int count = 1 + _random.Next(_random.Next(4) == 0 ? 12 : 4);
        bool wrongKey = queue.SenderPrivate != null && _random.Next(12) == 0;
        var key = wrongKey ? RawClient.KeyPair().Private : queue.SenderPrivate;
        Note($"SEND x{count} q{queue.Index} on s{sender.Index}{(wrongKey ? " (wrong key)" : "")}");
        for (int i = 0; i < count; i++)
        {
            int seq = queue.NextSeq++;
            string body = $"s{_seed}-q{queue.Index}-m{seq}." + new string((char)('a' + _random.Next(26)), _random.Next(0, 300));
            byte flags = (byte)_random.Next(2);
            var message = new MessageModel(queue, body, flags, seq, sender.Index, _step)
            {
                Epoch = queue.Epoch,
                ExpectAuth = queue.Deleted || queue.Suspended || wrongKey,
                FaultMark = FaultMark(),
                UpperBound = queue.Messages.Count(m => m.Send is SendState.Ok or SendState.Pending or SendState.Maybe && m.Ack != AckState.Done),
            };
            queue.Messages.Add(message);
            queue.ByBody[body] = message;
            message.Task = sender.Connection.SendAsync(new SenderQueue(queue.Raw.SenderId, key), Encoding.UTF8.GetBytes(body), flags);
            sender.Pending.Add(message);
        }
        if (_random.Next(3) == 0) await SettleAllSendsAsync();
    }

    /// <summary>Takes the answers of SENDs that have one.</summary>
    private void SettleCompletedSends()
    {
        foreach (var sender in _senders)
        {
            for (int i = 0; i < sender.Pending.Count; i++)
            {
                if (sender.Pending[i].Task!.IsCompleted)
                {
                    Settle(sender.Pending[i]);
                    sender.Pending.RemoveAt(i--);
                }
            }
        }
    }

    private async Task SettleAllSendsAsync()
    {
        Note("settle SENDs");
        foreach (var sender in _senders)
        {
            foreach (var message in sender.Pending)
            {
                var done = await Task.WhenAny(message.Task!, Task.Delay(AnswerTimeout));
                Check(done == message.Task, $"SEND of {message.Name} unanswered after {AnswerTimeout.TotalSeconds} s");
                Settle(message);
            }
            sender.Pending.Clear();
        }
    }

    private void Settle(MessageModel message)
    {
        var queue = message.Queue;
        var task = message.Task!;
        bool lenient = message.Epoch != queue.Epoch;   // OFF, DEL or SKEY while it was in flight
        if (task.IsCanceled)
        {
            Check(message.DroppedSender, $"queue {queue.Index}: SEND of {message.Name} was cancelled on a connection nobody dropped");
            message.Send = SendState.Maybe;
            return;
        }
        if (task.IsCompletedSuccessfully)
        {
            Check(!message.ExpectAuth || lenient, $"queue {queue.Index}: SEND of {message.Name} answered OK, expected AUTH (deleted {queue.Deleted}, suspended {queue.Suspended}, or a wrong key)");
            message.Send = SendState.Ok;
            message.OkStep = _step;
            Counted("send-ok");
            return;
        }
        var error = task.Exception!.InnerException;
        if (error is RelayErrorException relayError)
        {
            message.Send = SendState.Refused;
            message.RefusedWith = relayError.Code;
            Check(!message.StoredSeen, $"queue {queue.Index}: SEND of {message.Name} answered {relayError.Code} after it was delivered");
            switch (relayError.Code)
            {
                case ErrorCode.Auth:
                    Check(message.ExpectAuth || lenient, $"queue {queue.Index}: SEND of {message.Name} answered AUTH on a live queue with the right key");
                    Counted("auth");
                    break;
                case ErrorCode.Quota:
                    Check(message.UpperBound >= QueueMaxMessages, $"queue {queue.Index}: SEND answered QUOTA with at most {message.UpperBound} of {QueueMaxMessages} messages stored");
                    Counted("quota");
                    break;
                case ErrorCode.Internal or ErrorCode.Full when FailedSince(message.FaultMark):
                    // Nothing stored (PROTOCOL.md §6 SEND, §9): never delivered, checked on every delivery.
                    Counted("send-refused");
                    break;
                default:
                    throw Violation($"queue {queue.Index}: SEND of {message.Name} answered {relayError.Code}");
            }
            return;
        }
        // The connection ended first (dropped or the relay restarted): stored or not, nobody knows.
        Check(message.DroppedSender, $"queue {queue.Index}: SEND of {message.Name} failed on a connection nobody dropped: {error?.GetType().Name}: {error?.Message}");
        message.Send = SendState.Maybe;
    }

    // ---- SKEY, OFF, DEL -------------------------------------------------------------------------

    private async Task SecureAsync()
    {
        var queue = AnyQueue();
        var sender = _senders[_random.Next(_senders.Count)];
        byte[] key;
        bool expectOk;
        if (queue.SenderPrivate is null || _random.Next(3) == 0)
        {
            key = queue.SenderPrivate ?? RawClient.KeyPair().Private;   // first SKEY, or the same key again: OK
            expectOk = true;
        }
        else
        {
            key = RawClient.KeyPair().Private;   // another key on a secured queue: AUTH
            expectOk = false;
        }
        if (queue.Deleted) expectOk = false;
        Note($"SKEY q{queue.Index} on s{sender.Index} (expect {(expectOk ? "OK" : "AUTH")}, suspended {queue.Suspended})");
        long mark = FaultMark();
        try
        {
            await sender.Connection.SecureAsync(queue.Raw.SenderId, key).WaitAsync(AnswerTimeout);
            if (queue.Suspended && !queue.Deleted && expectOk)
            {
                Counted("skey-suspended-ok");
            }
            Check(expectOk, $"queue {queue.Index}: SKEY with another key answered OK (secured {queue.SenderPrivate != null}, deleted {queue.Deleted})");
            if (queue.SenderPrivate is null) queue.Epoch++;
            queue.SenderPrivate = key;
        }
        catch (RelayErrorException e) when (e.Code == ErrorCode.Internal && FailedSince(mark))
        {
            // Nothing changed; a SEND in flight may have met the key while the failed write was undone.
            Note($"SKEY q{queue.Index}: {e.Code}");
            queue.Epoch++;
            Counted("refused");
        }
        catch (RelayErrorException e)
        {
            Check(e.Code == ErrorCode.Auth, $"queue {queue.Index}: SKEY answered {e.Code}");
            Check(!expectOk || queue.Suspended, $"queue {queue.Index}: SKEY answered AUTH, expected OK");
            Counted("auth");
        }
    }

    private async Task SuspendAsync()
    {
        var queue = AnyQueue();
        var peer = LivePeer();
        long mark = FaultMark();
        var answer = await RequestAsync(peer, peer.Client.QueueCommand(FrameType.Off, peer.Client.NextCorr(), queue.Raw.RecipientId, [], queue.Raw.RecipientPrivate), "OFF");
        Note($"OFF q{queue.Index} on r{peer.Index}: {answer}");
        if (!queue.Deleted && answer.Error == ErrorCode.Internal && FailedSince(mark))
        {
            // Not suspended; a SEND in flight may have met it suspended while the failed write was undone.
            queue.Epoch++;
            Counted("refused");
            return;
        }
        if (queue.Deleted)
        {
            ExpectError(answer, ErrorCode.Auth, $"OFF of deleted queue {queue.Index}");
            return;
        }
        Check(answer.Type == FrameType.Ok, $"queue {queue.Index}: OFF answered {answer}");
        queue.Suspended = true;
        queue.Epoch++;
    }

    private async Task DeleteAsync()
    {
        // A live queue while at least three are; otherwise DEL again of a deleted one (AUTH).
        var live = _queues.Where(q => !q.Deleted).ToList();
        var deleted = _queues.Where(q => q.Deleted).ToList();
        QueueModel queue;
        if (live.Count > 2 && (deleted.Count == 0 || _random.Next(2) == 0)) queue = live[_random.Next(live.Count)];
        else if (deleted.Count > 0) queue = deleted[_random.Next(deleted.Count)];
        else
        {
            await PauseAsync();
            return;
        }
        var peer = LivePeer();
        long mark = FaultMark();
        var answer = await RequestAsync(peer, peer.Client.QueueCommand(FrameType.Del, peer.Client.NextCorr(), queue.Raw.RecipientId, [], queue.Raw.RecipientPrivate), "DEL");
        Note($"DEL q{queue.Index} on r{peer.Index}: {answer}");
        if (!queue.Deleted && answer.Error == ErrorCode.Internal && FailedSince(mark))
        {
            // Not deleted: its subscriber goes on (an END now is a violation), a SEND in flight may
            // have met it deleted while the failed write was undone.
            queue.Epoch++;
            Counted("refused");
            return;
        }
        if (queue.Deleted)
        {
            ExpectError(answer, ErrorCode.Auth, $"DEL of deleted queue {queue.Index}");
            return;
        }
        Check(answer.Type == FrameType.Ok, $"queue {queue.Index}: DEL answered {answer}");
        queue.Epoch++;
        var subscriber = queue.Subscriber;
        queue.Subscriber = null;
        if (subscriber == peer)
        {
            subscriber.Subs[queue].Ended = true;   // its own subscription is gone with the queue, no END
        }
        else if (subscriber != null)
        {
            // What it was pushed before the END was pushed before the DEL.
            await AwaitEndAsync(subscriber, queue);
        }
        queue.Deleted = true;
    }

    // ---- SUB ------------------------------------------------------------------------------------

    private async Task SubscribeAsync()
    {
        var queue = _random.Next(12) == 0 ? AnyQueue() : LiveQueue() ?? AnyQueue();
        var peer = LivePeer();
        await SubscribeAsync(peer, queue, _random.Next(9) switch
        {
            0 => null,
            1 => 0,
            2 => 1,
            3 => 2,
            4 => 3,
            5 => 5,
            6 => 16,
            7 => 64,
            _ => _random.Next(2) == 0 ? 65 : 65_535,
        });
    }

    /// <summary>
    /// Another connection takes a subscribed queue, and the first takes it back before reading its
    /// END: that END, if the relay writes it, comes before the OK of the SUB that takes it back, and
    /// none after; the other connection hears END.
    /// </summary>
    private async Task TakeBackAsync()
    {
        var queue = _queues.FirstOrDefault(q => q.Subscriber != null && !q.Deleted);
        if (queue is null)
        {
            await SubscribeAsync();
            return;
        }
        var first = queue.Subscriber!;
        var others = _peers.Where(p => p != first).ToList();
        var second = others[_random.Next(others.Count)];
        await SubscribeAsync(second, queue, 1 + _random.Next(4), awaitPreviousEnd: false);
        await SubscribeAsync(first, queue, 1 + _random.Next(4));
        Counted("take-back");
    }

    private async Task SubscribeAsync(RecipientPeer peer, QueueModel queue, int? window, bool awaitPreviousEnd = true)
    {
        byte[] args = [];
        if (window is { } w)
        {
            args = new byte[2];
            BinaryPrimitives.WriteUInt16BigEndian(args, (ushort)w);
        }
        var answer = await RequestAsync(peer, peer.Client.QueueCommand(FrameType.Sub, peer.Client.NextCorr(), queue.Raw.RecipientId, args, queue.Raw.RecipientPrivate), "SUB");
        Note($"SUB q{queue.Index} on r{peer.Index} window {window?.ToString() ?? "none"}: {answer.Type}");
        if (queue.Deleted)
        {
            ExpectError(answer, ErrorCode.Auth, $"SUB of deleted queue {queue.Index}");
            Counted("auth");
            return;
        }
        Check(answer.Type == FrameType.Ok && answer.Payload.Length == 0, $"queue {queue.Index}: SUB answered {answer}");
        var previous = queue.Subscriber;
        peer.Subs[queue] = new SubscriptionModel(Math.Clamp(window ?? 1, 1, ProtocolConstants.MaxDeliveryWindow), queue.FailedDeletes)
        {
            // An ACK answered INTERNAL before this SUB still allows its restart, which the relay then
            // makes of this subscription (§7: each such answer allows one; a SUB does not take it back).
            RestartsAllowed = peer.Subs.TryGetValue(queue, out var before) ? before.RestartsAllowed : 0,
        };
        queue.Subscriber = peer;
        if (previous != null && previous != peer && awaitPreviousEnd)
        {
            // The older subscriber hears END; what it was pushed before counts against its own window.
            await AwaitEndAsync(previous, queue);
            Counted("sub-replaced");
        }
    }

    /// <summary>
    /// A subscription with room in its window receives the stored messages it was not pushed yet:
    /// each ACK releases the next, and a message stored while the window has room goes out at once.
    /// </summary>
    private async Task AwaitReleasedAsync()
    {
        await SettleAllSendsAsync();
        foreach (var queue in _queues.Where(q => q.Subscriber != null && !q.Deleted))
        {
            var peer = queue.Subscriber!;
            var sub = peer.Subs[queue];
            var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(5);
            while (true)
            {
                var waiting = queue.Messages.FirstOrDefault(m => m.Send == SendState.Ok && m.Ack == AckState.None && !(m.Id is { } id && sub.Pushed.Contains(id)));
                if (waiting is null || sub.Ended || sub.Outstanding.Count >= sub.Window) break;
                Check(DateTime.UtcNow < deadline, $"queue {queue.Index}: {waiting.Name} (answered OK at step {waiting.OkStep}) not pushed to r{peer.Index} within 5 s, {sub.Outstanding.Count} outstanding of window {sub.Window}");
                using var cts = new CancellationTokenSource(TimeSpan.FromMilliseconds(50));
                try
                {
                    var frame = await peer.Frames.Reader.ReadAsync(cts.Token);
                    await OnUnsolicitedAsync(peer, frame);
                }
                catch (OperationCanceledException)
                {
                }
            }
        }
        Note("pushes released");
        Counted("released");
    }

    // ---- ACK ------------------------------------------------------------------------------------

    /// <summary>ACK (or ACK through) of what a subscriber was pushed, in order: the common case.</summary>
    private async Task AckOutstandingAsync()
    {
        var candidates = _peers.SelectMany(p => p.Subs.Where(s => !s.Value.Ended && s.Value.Outstanding.Count > 0).Select(s => (p, s.Key, s.Value))).ToList();
        if (candidates.Count == 0)
        {
            await PauseAsync();
            return;
        }
        var (peer, queue, sub) = candidates[_random.Next(candidates.Count)];
        if (_random.Next(2) == 0)
        {
            await AckAsync(peer, queue, sub.Outstanding[0].Id!.Value, through: false);
        }
        else
        {
            await AckAsync(peer, queue, sub.Outstanding[_random.Next(sub.Outstanding.Count)].Id!.Value, through: true);
        }
    }

    /// <summary>ACKs the protocol refuses or that another connection makes: out of order, duplicate, unknown id, wrong key, GET client.</summary>
    private async Task AckOddAsync()
    {
        var queue = AnyQueue();
        var peer = LivePeer();
        var known = queue.Messages.Where(m => m.Id != null).ToList();
        switch (_random.Next(5))
        {
            case 0:
                await AckAsync(peer, queue, (ulong)_random.NextInt64(), through: _random.Next(2) == 0);
                break;
            case 1 when known.Count > 0:
                // Any message ever delivered: acknowledged already, not the oldest, or the oldest.
                await AckAsync(peer, queue, known[_random.Next(known.Count)].Id!.Value, through: _random.Next(2) == 0);
                break;
            case 2:
            {
                // Wrong recipient key: AUTH, whatever the id.
                var id = known.Count > 0 ? known[^1].Id!.Value : 1;
                var args = RawClient.U64(id);
                var answer = await RequestAsync(peer, peer.Client.QueueCommand(FrameType.Ack, peer.Client.NextCorr(), queue.Raw.RecipientId, args, RawClient.KeyPair().Private), "ACK with a wrong key");
                Note($"ACK q{queue.Index} wrong key on r{peer.Index}: {answer}");
                ExpectError(answer, ErrorCode.Auth, $"ACK with a wrong key on queue {queue.Index}");
                Counted("auth");
                break;
            }
            default:
            {
                // The oldest stored message, from another connection than its subscriber's.
                var oldest = OldestStored(queue);
                if (oldest?.Id is { } id)
                {
                    var other = _peers.Where(p => p != queue.Subscriber).ToList();
                    await AckAsync(other[_random.Next(other.Count)], queue, id, through: _random.Next(2) == 0);
                }
                break;
            }
        }
    }

    /// <summary>The oldest stored message has id <paramref name="oldest"/>: older ones whose ACK went unanswered were deleted by it.</summary>
    private void ResolveUnansweredAcks(QueueModel queue, ulong oldest)
    {
        foreach (var m in queue.Messages)
        {
            if (m.Ack == AckState.Maybe && m.Id < oldest)
            {
                m.Ack = AckState.Done;
                m.AckStep = _step;
            }
        }
    }

    /// <summary>The oldest message the model knows stored (delivered, never acknowledged), or null; Uncertain when an unanswered ACK may have deleted an older one.</summary>
    private static MessageModel? OldestStored(QueueModel queue) =>
        queue.Messages.Where(m => m.Id != null && m.Ack != AckState.Done && m.Send != SendState.Refused).MinBy(m => m.Id!.Value);

    /// <summary>A message is stored that is older than what <paramref name="sub"/> has outstanding, and not outstanding itself.</summary>
    private static bool MovedPastStored(QueueModel queue, SubscriptionModel sub) =>
        sub.Outstanding.Count > 0 && OldestStored(queue) is { Id: { } oldest } && oldest < sub.Outstanding[0].Id!.Value;

    private async Task AckAsync(RecipientPeer peer, QueueModel queue, ulong id, bool through)
    {
        peer.Subs.TryGetValue(queue, out var sub);
        bool subscribed = sub != null && !sub.Ended && queue.Subscriber == peer;
        queue.ById.TryGetValue(id, out var target);
        var oldest = OldestStored(queue);
        // An ACK written just before its connection was dropped may or may not have deleted its message.
        bool uncertain = queue.Messages.Any(m => m.Ack == AckState.Maybe && m.Id <= id);

        // What the protocol says the answer is (§6 ACK), and what it frees.
        FrameType? expectType;
        ErrorCode? expectError = null;
        List<MessageModel> deletes = [];
        if (queue.Deleted)
        {
            expectType = FrameType.Err;
            expectError = ErrorCode.Auth;
        }
        else if (through && subscribed)
        {
            int at = sub!.Outstanding.FindIndex(m => m.Id == id);
            if (at >= 0 && target!.Ack != AckState.Done)
            {
                expectType = FrameType.Ok;
                deletes = sub.Outstanding.Take(at + 1).Where(m => m.Ack != AckState.Done).ToList();
            }
            else
            {
                expectType = FrameType.Err;
                expectError = ErrorCode.NoMsg;
            }
        }
        else if (target != null && target == oldest && target.Ack != AckState.Done)
        {
            expectType = FrameType.Ok;
            deletes = [target];
        }
        else
        {
            expectType = FrameType.Err;
            expectError = ErrorCode.NoMsg;
        }
        if (uncertain && !queue.Deleted) expectType = null;

        // Places the ACK may free while it is in flight (the relay may push the next one before the OK).
        if (subscribed)
        {
            sub!.ProvisionallyFree = sub.Outstanding.Count(m => m.Id <= id);
        }
        byte[] args = through ? [.. RawClient.U64(id), ProtocolConstants.AckThrough] : RawClient.U64(id);
        long mark = FaultMark();
        List<MessageModel> covered = through && subscribed ? sub!.Outstanding.Where(m => m.Id <= id).ToList() : target is null ? [] : [target];
        covered.ForEach(m => m.AckInFlight = true);
        var answer = await RequestAsync(peer, peer.Client.QueueCommand(FrameType.Ack, peer.Client.NextCorr(), queue.Raw.RecipientId, args, queue.Raw.RecipientPrivate), "ACK");
        Note($"ACK{(through ? " through" : "")} q{queue.Index} id {id} ({target?.Name ?? "unknown"}) on r{peer.Index}{(subscribed ? " (subscriber)" : "")}: {answer}");
        if (subscribed) sub!.ProvisionallyFree = 0;
        covered.ForEach(m => m.AckInFlight = false);

        if (!queue.Deleted && answer.Error == ErrorCode.Internal && FailedSince(mark))
        {
            // Nothing deleted (PROTOCOL.md §6 ACK). The subscription starts again from the oldest
            // stored message with an empty window once the store writes: the client's count starts
            // afresh at the answer, and again at the first push not above the one before it (§7).
            Counted("ack-internal");
            queue.FailedDeletes++;
            covered.ForEach(m => m.DeleteFailed = true);
            if (subscribed)
            {
                sub!.Outstanding.Clear();
                sub.RestartsAllowed++;
            }
            return;
        }

        if (expectType == FrameType.Ok)
        {
            Check(answer.Type == FrameType.Ok, $"queue {queue.Index}: ACK{(through ? " through" : "")} of id {id}, the oldest stored ({target?.Name}), answered {answer}");
        }
        else if (expectType == FrameType.Err)
        {
            ExpectError(answer, expectError!.Value, $"ACK{(through ? " through" : "")} of id {id} on queue {queue.Index} ({target?.Name ?? "unknown id"}, oldest stored {oldest?.Name ?? "none"})");
        }
        else
        {
            Check(answer.Type == FrameType.Ok || answer.Error == ErrorCode.NoMsg, $"queue {queue.Index}: ACK answered {answer}");
        }

        if (answer.Type == FrameType.Ok)
        {
            if (expectType == null)
            {
                deletes = through && subscribed ? sub!.Outstanding.Where(m => m.Id <= id).ToList() : target is null ? [] : [target];
            }
            foreach (var m in deletes)
            {
                m.Ack = AckState.Done;
                m.AckStep = _step;
            }
            Counted(through ? "ack-through-ok" : "ack-ok");
            if (subscribed) sub!.Outstanding.RemoveAll(m => m.Id <= id);
            // A subscriber elsewhere may have been pushed these before the ACK was taken: what it
            // reads up to a PING's answer is allowed to hold them, nothing after.
            if (queue.Subscriber is { } elsewhere && elsewhere != peer && deletes.Count > 0)
            {
                elsewhere.Grace.UnionWith(deletes);
                await SyncAsync(elsewhere);
                elsewhere.Grace.Clear();
            }
        }
        else if (answer.Error == ErrorCode.NoMsg)
        {
            Counted("ack-nomsg");
            // A message deleted meanwhile (by another connection) frees its place and those before
            // it in the subscriber's own ACK; anything else changes nothing.
            if (subscribed && target is { Ack: AckState.Done })
            {
                sub!.Outstanding.RemoveAll(m => m.Id <= id);
            }
            else if (_faults is not null && subscribed && target is not null && sub!.Outstanding.Contains(target) && MovedPastStored(queue, sub))
            {
                // A failed delete put back messages this subscription had moved past: its ACK of an
                // outstanding message finds an older one stored, and the relay frees the places up to
                // it, as the client does (§6 ACK); with nothing outstanding it starts again.
                sub.Outstanding.RemoveAll(m => m.Id <= id);
                Counted("ack-nomsg-put-back");
            }
            else if (subscribed)
            {
                Check(sub!.Outstanding.Count <= sub.Window, $"queue {queue.Index}: ACK answered NO_MSG (nothing freed) but {sub.Outstanding.Count} were pushed with window {sub.Window}");
            }
        }
        else if (answer.Error == ErrorCode.Auth)
        {
            Counted("auth");
        }
    }

    // ---- GET --------------------------------------------------------------------------------------

    private async Task GetAsync()
    {
        var queue = _random.Next(10) == 0 ? AnyQueue() : LiveQueue() ?? AnyQueue();
        var oldest = OldestStored(queue);
        bool mayBeEmpty = !queue.Messages.Any(m => m.Send == SendState.Ok && m.Ack == AckState.None);
        if (_random.Next(2) == 0)
        {
            // SDK GET, and the SDK connection acknowledges it (a device polling).
            Delivery? got;
            try
            {
                got = await _poller.GetAsync(new RecipientQueue(queue.Raw.RecipientId, queue.Raw.SenderId, queue.Raw.RecipientPrivate, queue.Raw.DeliveryKey)).WaitAsync(AnswerTimeout);
            }
            catch (RelayErrorException e)
            {
                Check(queue.Deleted && e.Code == ErrorCode.Auth, $"queue {queue.Index}: GET answered {e.Code}");
                Counted("auth");
                return;
            }
            Check(!queue.Deleted, $"queue {queue.Index}: GET of a deleted queue answered {(got is null ? "EMPTY" : "MSG")}");
            Note($"GET q{queue.Index} (SDK): {(got is null ? "EMPTY" : got.MessageId)}");
            if (got is null)
            {
                Check(mayBeEmpty, $"queue {queue.Index}: GET answered EMPTY with stored messages ({oldest?.Name})");
                ResolveUnansweredAcks(queue, ulong.MaxValue);
                return;
            }
            var message = CheckGetAnswer(queue, got.MessageId, got.Body, got.Flags, oldest);
            if (_random.Next(3) != 0 && message.Ack != AckState.Done && OldestStored(queue) == message)
            {
                long mark = FaultMark();
                message.AckInFlight = true;
                try
                {
                    await _poller.AckAsync(new RecipientQueue(queue.Raw.RecipientId, queue.Raw.SenderId, queue.Raw.RecipientPrivate, queue.Raw.DeliveryKey), got.MessageId).WaitAsync(AnswerTimeout);
                }
                catch (RelayErrorException e) when (e.Code == ErrorCode.Internal && FailedSince(mark))
                {
                    // Nothing deleted: the message stays the oldest, for the subscriber too.
                    Note($"GET client's ACK q{queue.Index} {message.Name}: {e.Code}");
                    queue.FailedDeletes++;
                    message.DeleteFailed = true;
                    Counted("ack-internal");
                    return;
                }
                catch (RelayErrorException e)
                {
                    throw Violation($"queue {queue.Index}: the GET client's ACK of the oldest message {message.Name} answered {e.Code}");
                }
                finally
                {
                    message.AckInFlight = false;
                }
                message.Ack = AckState.Done;
                message.AckStep = _step;
                Counted("ack-ok");
                if (queue.Subscriber is { } subscriber)
                {
                    subscriber.Grace.Add(message);
                    await SyncAsync(subscriber);
                    subscriber.Grace.Clear();
                }
            }
            return;
        }
        var peer = LivePeer();
        var answer = await RequestAsync(peer, peer.Client.QueueCommand(FrameType.Get, peer.Client.NextCorr(), queue.Raw.RecipientId, [], queue.Raw.RecipientPrivate), "GET");
        Note($"GET q{queue.Index} on r{peer.Index}: {answer}");
        if (queue.Deleted)
        {
            ExpectError(answer, ErrorCode.Auth, $"GET of deleted queue {queue.Index}");
            Counted("auth");
            return;
        }
        if (answer.Type == FrameType.Empty)
        {
            Check(mayBeEmpty && answer.Payload.Length == 0, $"queue {queue.Index}: GET answered EMPTY with stored messages ({oldest?.Name})");
            ResolveUnansweredAcks(queue, ulong.MaxValue);
            return;
        }
        Check(answer.Type == FrameType.Msg, $"queue {queue.Index}: GET answered {answer}");
        var opened = RawClient.Open(queue.Raw, answer.Payload);
        CheckGetAnswer(queue, opened.Id, opened.Body, opened.Flags, oldest);
        // The message stays stored: the same GET gives the same message while nobody ACKs it.
    }

    private MessageModel CheckGetAnswer(QueueModel queue, ulong id, byte[] body, byte flags, MessageModel? oldestBefore)
    {
        var text = Encoding.UTF8.GetString(body);
        if (!queue.ByBody.TryGetValue(text, out var message))
        {
            throw Violation($"queue {queue.Index}: GET answered a body never sent: '{text}'");
        }
        ResolveUnansweredAcks(queue, id);
        text = message.Name;
        Check(message.Flags == flags, $"queue {queue.Index}: GET answered {text} with flags {flags}");
        Check(message.Send != SendState.Refused, $"queue {queue.Index}: GET answered {text}, whose SEND was refused");
        Check(message.Ack != AckState.Done, $"queue {queue.Index}: GET answered {text} after its ACK was answered OK at step {message.AckStep}");
        if (message.Id is { } known) Check(known == id, $"queue {queue.Index}: GET answered {text} with id {id}, earlier {known}");
        if (oldestBefore?.Id is { } o && oldestBefore.Ack == AckState.None)
        {
            Check(id <= o, $"queue {queue.Index}: GET answered id {id} ({text}), but {oldestBefore.Name} (id {o}) is older and stored");
        }
        // Reuses the delivery bookkeeping (ids, send order) without a cipher round trip.
        if (message.Id is null)
        {
            Check(!queue.ById.ContainsKey(id), $"queue {queue.Index}: id {id} delivered for two bodies");
            message.Id = id;
            queue.ById[id] = message;
            foreach (var other in queue.Messages)
            {
                if (other == message || other.Id is not { } oid) continue;
                if (SentBefore(other, message)) Check(oid < id, $"queue {queue.Index}: {other.Name} was sent before {text} but has id {oid} ≥ {id}");
                if (SentBefore(message, other)) Check(id < oid, $"queue {queue.Index}: {text} was sent before {other.Name} but has id {id} ≥ {oid}");
            }
        }
        if (message.Send is SendState.Pending or SendState.Maybe) message.StoredSeen = true;
        message.Deliveries++;
        Counted("get-msg");
        return message;
    }

    // ---- errors that concern one request ------------------------------------------------------

    private void ExpectError(RawFrame answer, ErrorCode code, string what)
    {
        Check(answer.Type == FrameType.Err && answer.Payload.Length == 1 && answer.Error == code, $"{what}: expected ERR {code}, got {answer}");
    }

    /// <summary>Malformed args and unknown commands: answered, and the connection goes on.</summary>
    private async Task BadRequestAsync()
    {
        var peer = LivePeer();
        var queue = AnyQueue();
        switch (_random.Next(4))
        {
            case 0:
            {
                var answer = await RequestAsync(peer, RawClient.Frame(0x7E, peer.Client.NextCorr(), new byte[40]), "an unknown command");
                Note($"unknown command on r{peer.Index}: {answer}");
                ExpectError(answer, ErrorCode.Cmd, "unknown command 0x7E");
                break;
            }
            case 1:
            {
                var answer = await RequestAsync(peer, peer.Client.QueueCommand(FrameType.Sub, peer.Client.NextCorr(), queue.Raw.RecipientId, new byte[3], queue.Raw.RecipientPrivate), "SUB with 3 bytes of args");
                Note($"SUB with 3 bytes of args on r{peer.Index}: {answer}");
                ExpectError(answer, ErrorCode.Syntax, "SUB with 3 bytes of args");
                break;
            }
            case 2:
            {
                byte[] args = [.. RawClient.U64(1), 0x02];
                var answer = await RequestAsync(peer, peer.Client.QueueCommand(FrameType.Ack, peer.Client.NextCorr(), queue.Raw.RecipientId, args, queue.Raw.RecipientPrivate), "ACK with a reserved flag");
                Note($"ACK with reserved flag on r{peer.Index}: {answer}");
                if (queue.Deleted) Check(answer.Error is ErrorCode.Auth or ErrorCode.Syntax, $"ACK with a reserved flag on a deleted queue answered {answer}");
                else ExpectError(answer, ErrorCode.Syntax, "ACK with a reserved flag bit");
                break;
            }
            default:
            {
                // A SEND whose sender id is a recipient id: AUTH (no such sender id).
                var answer = await RequestAsync(peer, peer.Client.Send(peer.Client.NextCorr(), queue.Raw.RecipientId, "x"u8), "SEND to a recipient id");
                Note($"SEND to a recipient id on r{peer.Index}: {answer}");
                ExpectError(answer, ErrorCode.Auth, "SEND to a recipient id");
                Counted("auth");
                break;
            }
        }
    }

    /// <summary>A wrong key on an existing queue and a queue that does not exist answer the same bytes.</summary>
    private async Task WrongKeyLooksLikeMissingQueueAsync()
    {
        var peer = LivePeer();
        var queue = LiveQueue() ?? AnyQueue();
        var type = _random.Next(3) switch { 0 => FrameType.Get, 1 => FrameType.Sub, _ => FrameType.Off };
        var wrongKey = await RequestAsync(peer, peer.Client.QueueCommand(type, peer.Client.NextCorr(), queue.Raw.RecipientId, [], RawClient.KeyPair().Private), $"{type} with a wrong key");
        var missingId = new byte[24];
        _random.NextBytes(missingId);
        var missing = await RequestAsync(peer, peer.Client.QueueCommand(type, peer.Client.NextCorr(), missingId, [], queue.Raw.RecipientPrivate), $"{type} of a missing queue");
        // The sender id of a live queue is no recipient id either.
        var senderId = await RequestAsync(peer, peer.Client.QueueCommand(type, peer.Client.NextCorr(), queue.Raw.SenderId, [], queue.Raw.RecipientPrivate), $"{type} with a sender id");
        Note($"{type} wrong key / missing queue / sender id on r{peer.Index}: {wrongKey} / {missing} / {senderId}");
        ExpectError(wrongKey, ErrorCode.Auth, $"{type} with a wrong key");
        Check(wrongKey.Wire.AsSpan(9).SequenceEqual(missing.Wire.AsSpan(9)) && wrongKey.Wire.AsSpan(0, 5).SequenceEqual(missing.Wire.AsSpan(0, 5)),
            $"{type}: a wrong key answered {wrongKey}, a missing queue {missing}");
        Check(wrongKey.Wire.AsSpan(9).SequenceEqual(senderId.Wire.AsSpan(9)) && wrongKey.Wire.AsSpan(0, 5).SequenceEqual(senderId.Wire.AsSpan(0, 5)),
            $"{type}: a wrong key answered {wrongKey}, a sender id {senderId}");
        Counted("auth");
    }

    /// <summary>A connection that loses framing is closed with ERR SYNTAX; nobody else notices (the other steps go on).</summary>
    private async Task FramingLostAsync()
    {
        Note("framing lost on a throwaway connection");
        await using var bad = await RawClient.ConnectAsync(_relay);
        await bad.WriteAsync([0, 0, 0, 3, 0x03, 0, 0]);
        var (closed, frames) = await bad.WaitForCloseAsync(AnswerTimeout);
        Check(closed && frames.Count == 1 && frames[0].Type == FrameType.Err && frames[0].Correlation == 0 && frames[0].Error == ErrorCode.Syntax,
            $"a frame length of 3: closed {closed}, frames [{string.Join(", ", frames)}]");
    }

    // ---- connections lost, relay restarted ----------------------------------------------------

    /// <summary>A recipient connection reset in the middle of a frame, possibly with an ACK unanswered.</summary>
    private async Task DropRecipientAsync()
    {
        var peer = LivePeer();
        var withAck = peer.Subs.Where(s => !s.Value.Ended && s.Value.Outstanding.Count > 0 && s.Key.Subscriber == peer).ToList();
        // Not while writes fail: an unanswered ACK counts as done once a later delivery shows its message
        // gone, but a failing write may still put it back then.
        if (_faults is null && withAck.Count > 0 && _random.Next(2) == 0)
        {
            // An ACK written, its answer never read: the message may or may not be deleted.
            var (queue, sub) = withAck[_random.Next(withAck.Count)];
            var message = sub.Outstanding[0];
            await peer.Client.WriteAsync(peer.Client.QueueCommand(FrameType.Ack, peer.Client.NextCorr(), queue.Raw.RecipientId, RawClient.U64(message.Id!.Value), queue.Raw.RecipientPrivate));
            if (message.Ack == AckState.None) message.Ack = AckState.Maybe;
            Note($"ACK q{queue.Index} {message.Name} unanswered on r{peer.Index}");
        }
        // Half a frame, then a reset.
        var partial = peer.Client.QueueCommand(FrameType.Get, peer.Client.NextCorr(), _queues[0].Raw.RecipientId, [], _queues[0].Raw.RecipientPrivate);
        await peer.Client.WriteAsync(partial.AsSpan(0, 1 + _random.Next(partial.Length - 1)).ToArray());
        Note($"drop r{peer.Index}");
        await peer.AbortAsync();
        foreach (var queue in _queues.Where(q => q.Subscriber == peer)) queue.Subscriber = null;
        _peers[_peers.IndexOf(peer)] = await RecipientPeer.ConnectAsync(_relay, _nextPeer++);
        Counted("drop-recipient");
    }

    /// <summary>An SDK sender connection closed with SENDs in flight: each is stored or not, never half.</summary>
    private async Task DropSenderAsync()
    {
        var sender = _senders[_random.Next(_senders.Count)];
        Note($"drop s{sender.Index} with {sender.Pending.Count} SENDs in flight");
        foreach (var m in sender.Pending) m.DroppedSender = true;
        await sender.Connection.DisposeAsync();
        foreach (var m in sender.Pending)
        {
            var done = await Task.WhenAny(m.Task!, Task.Delay(AnswerTimeout));
            Check(done == m.Task, "a SEND in flight on a closed connection never completed");
            Settle(m);
        }
        sender.Pending.Clear();
        _senders[_senders.IndexOf(sender)] = new SenderPeer(await _relay.ConnectAsync(), _nextSender++);
        Counted("drop-sender");
    }

    /// <summary>The relay stops and starts again on the same data directory, SENDs in flight.</summary>
    private async Task RestartAsync()
    {
        if (_random.Next(2) == 0) await SendBurstAsync();
        Note("restart");
        foreach (var s in _senders)
        {
            foreach (var m in s.Pending) m.DroppedSender = true;
        }
        _faults?.Disarm();
        await _relay.RestartAsync();
        HookStore();
        foreach (var s in _senders)
        {
            foreach (var m in s.Pending)
            {
                var done = await Task.WhenAny(m.Task!, Task.Delay(AnswerTimeout));
                Check(done == m.Task, "a SEND in flight when the relay stopped never completed");
                Settle(m);
            }
            s.Pending.Clear();
            await s.Connection.DisposeAsync();
        }
        // What the recipients read before the stop is still checked; then they are gone.
        foreach (var peer in _peers)
        {
            while (peer.Frames.Reader.TryRead(out var frame)) await OnUnsolicitedAsync(peer, frame);
            await peer.AbortAsync();
        }
        await _poller.DisposeAsync();
        foreach (var queue in _queues) queue.Subscriber = null;
        _peers.Clear();
        _senders.Clear();
        await ConnectAllAsync();
        _restarted = true;
        Counted("restart");
    }

    // ---- the end: everything acknowledged is there ----------------------------------------------

    /// <summary>
    /// Every connection still works, and each queue still holds every message answered OK and never
    /// acknowledged: a new subscriber receives them, in order, and after that the queue is empty.
    /// </summary>
    public async Task DrainAndVerifyAsync()
    {
        if (_faults is not null) await DrainSubscribersAsync();
        if (!_restarted) await RestartAsync();
        await SettleAllSendsAsync();
        await PumpAllAsync();
        foreach (var peer in _peers) await SyncAsync(peer);
        foreach (var sender in _senders) await sender.Connection.PingAsync().WaitAsync(AnswerTimeout);
        await AwaitReleasedAsync();
        await _poller.PingAsync().WaitAsync(AnswerTimeout);

        var drainer = await RecipientPeer.ConnectAsync(_relay, _nextPeer++);
        _peers.Add(drainer);
        foreach (var queue in _queues.Where(q => !q.Deleted))
        {
            Note($"drain q{queue.Index}");
            await SubscribeAsync(drainer, queue, ProtocolConstants.MaxDeliveryWindow);
            var sub = drainer.Subs[queue];
            var quietSince = DateTime.UtcNow;
            while (true)
            {
                while (drainer.Frames.Reader.TryRead(out var frame))
                {
                    await OnUnsolicitedAsync(drainer, frame);
                    quietSince = DateTime.UtcNow;
                }
                if (sub.Outstanding.Count > 0)
                {
                    await AckAsync(drainer, queue, sub.Outstanding[^1].Id!.Value, through: true);
                    quietSince = DateTime.UtcNow;
                    continue;
                }
                var oldest = OldestStored(queue);
                var get = await RequestAsync(drainer, drainer.Client.QueueCommand(FrameType.Get, drainer.Client.NextCorr(), queue.Raw.RecipientId, [], queue.Raw.RecipientPrivate), "GET");
                if (get.Type == FrameType.Empty && sub.Outstanding.Count == 0) break;
                Check(get.Type == FrameType.Msg, $"queue {queue.Index}: GET answered {get}");
                var opened = RawClient.Open(queue.Raw, get.Payload);
                CheckGetAnswer(queue, opened.Id, opened.Body, opened.Flags, oldest);
                Check(DateTime.UtcNow - quietSince < AnswerTimeout, $"queue {queue.Index}: GET answers {get} but nothing was pushed to an empty window of {sub.Window} for {AnswerTimeout.TotalSeconds} s");
                await Task.Delay(5);
            }
            foreach (var m in queue.Messages.Where(m => m.Send == SendState.Ok))
            {
                Check(m.Ack != AckState.None, $"queue {queue.Index}: {m.Name} was answered OK at step {m.OkStep} and never delivered (lost)");
            }
        }
        _step = int.MaxValue;
    }

    /// <summary>
    /// Writes work again: every live subscription, as the failures left it (no new SUB, no restart of
    /// the relay), receives every message answered OK and not acknowledged, each within a few seconds
    /// of the last progress, as its subscriber acknowledges what it was pushed. A subscription that
    /// stalls (its window empty at both ends, messages stored, nothing pushed) breaks the protocol.
    /// </summary>
    private async Task DrainSubscribersAsync()
    {
        Note("writes work again");
        await StopFaultsAsync();
        await SettleAllSendsAsync();
        await PumpAllAsync();
        var stallLimit = TimeSpan.FromSeconds(5);
        foreach (var queue in _queues.Where(q => q.Subscriber != null && !q.Deleted))
        {
            var peer = queue.Subscriber!;
            var sub = peer.Subs[queue];
            Note($"drain q{queue.Index} on r{peer.Index}");
            var progress = DateTime.UtcNow;
            while (!sub.Ended)
            {
                if (sub.Outstanding.Count > 0)
                {
                    await AckAsync(peer, queue, sub.Outstanding[^1].Id!.Value, through: true);
                    progress = DateTime.UtcNow;
                    continue;
                }
                var waiting = queue.Messages.FirstOrDefault(m => m.Send == SendState.Ok && m.Ack == AckState.None);
                if (waiting is null) break;
                Check(DateTime.UtcNow - progress < stallLimit,
                    $"queue {queue.Index}: {waiting.Name} (answered OK at step {waiting.OkStep}) stored, and nothing pushed to r{peer.Index} for {stallLimit.TotalSeconds} s with nothing outstanding (window {sub.Window}): the subscription stalled");
                using var cts = new CancellationTokenSource(TimeSpan.FromMilliseconds(50));
                try
                {
                    var frame = await peer.Frames.Reader.ReadAsync(cts.Token);
                    await OnUnsolicitedAsync(peer, frame);
                    progress = DateTime.UtcNow;
                }
                catch (OperationCanceledException)
                {
                }
            }
            Counted("subscribers-drained");
        }
    }

    public async ValueTask DisposeAsync()
    {
        foreach (var s in _senders)
        {
            try { await s.Connection.DisposeAsync(); } catch (Exception) { }
            // A run that stopped at a violation leaves SENDs unanswered: their failures are observed here.
            foreach (var m in s.Pending)
            {
                try { await m.Task!.WaitAsync(AnswerTimeout); } catch (Exception) { }
            }
        }
        foreach (var p in _peers) await p.AbortAsync();
        if (_poller != null) await _poller.DisposeAsync();
        await _relay.DisposeAsync();
    }

    // ---- the model ------------------------------------------------------------------------------

    private enum SendState { Pending, Ok, Refused, Maybe }

    private enum AckState { None, Maybe, Done }

    private sealed class MessageModel(QueueModel queue, string body, byte flags, int seq, int sender, int issueStep)
    {
        public QueueModel Queue { get; } = queue;
        public string Body { get; } = body;
        public byte Flags { get; } = flags;
        public int Seq { get; } = seq;
        public int Sender { get; } = sender;
        public int IssueStep { get; } = issueStep;
        public Task? Task;
        public int Epoch;
        public bool ExpectAuth;
        public int UpperBound;
        public long FaultMark;
        public SendState Send = SendState.Pending;
        public ErrorCode? RefusedWith;
        public bool RefusedToClient => Send == SendState.Refused;
        public bool DroppedSender;
        public bool StoredSeen;
        public int OkStep = -1;
        public ulong? Id;
        public AckState Ack = AckState.None;
        public int AckStep = -1;
        /// <summary>An ACK of it is unanswered: its delete may be made in memory, or taken back.</summary>
        public bool AckInFlight;
        /// <summary>An ACK of it was answered INTERNAL, and it was not pushed since: a subscription may have moved past it while it was deleted in memory (§6 ACK).</summary>
        public bool DeleteFailed;
        public int Deliveries;
        public override string ToString() => Body;
        public string Name => Body[..Body.IndexOf('.')];
    }

    private sealed class QueueModel(int index, RawQueue raw)
    {
        public int Index { get; } = index;
        public RawQueue Raw { get; } = raw;
        public List<MessageModel> Messages { get; } = [];
        public Dictionary<string, MessageModel> ByBody { get; } = [];
        public Dictionary<ulong, MessageModel> ById { get; } = [];
        public byte[]? SenderPrivate;
        public bool Suspended;
        public bool Deleted;
        /// <summary>Changes with OFF, DEL and the first SKEY: a SEND in flight across one may get either answer.</summary>
        public int Epoch;
        public int NextSeq;
        public RecipientPeer? Subscriber;
        public SenderPeer? SendingOn;
        /// <summary>ACKs of this queue answered INTERNAL: each put back what it deleted.</summary>
        public int FailedDeletes;
    }

    /// <summary>What one connection's subscription to a queue has been pushed and not acknowledged.</summary>
    private sealed class SubscriptionModel(int window, int failedDeletesSeen)
    {
        public int Window { get; } = window;
        /// <summary>The queue's failed deletes this subscription started after (or restarted after).</summary>
        public int FailedDeletesSeen = failedDeletesSeen;
        public List<MessageModel> Outstanding { get; } = [];
        public HashSet<ulong> Pushed { get; } = [];
        public ulong LastPushed;
        public int ProvisionallyFree;
        /// <summary>ACKs of this subscription answered INTERNAL whose restart has not been seen yet: each allows one.</summary>
        public int RestartsAllowed;
        public bool Ended;
    }

    private sealed class SenderPeer(RelayConnection connection, int index)
    {
        public RelayConnection Connection { get; } = connection;
        public int Index { get; } = index;
        public List<MessageModel> Pending { get; } = [];
        public int InFlight(QueueModel queue) => Pending.Count(m => m.Queue == queue);
    }

    /// <summary>A raw recipient connection; a reader task hands its frames over in order.</summary>
    private sealed class RecipientPeer
    {
        public int Index { get; }
        public RawClient Client { get; }
        public Channel<RawFrame> Frames { get; } = Channel.CreateUnbounded<RawFrame>(new UnboundedChannelOptions { SingleReader = true, SingleWriter = true });
        public Dictionary<QueueModel, SubscriptionModel> Subs { get; } = [];
        /// <summary>Messages acknowledged elsewhere that a push already on its way may still carry.</summary>
        public HashSet<MessageModel> Grace { get; } = [];
        private readonly Task _reader;
        private bool _aborted;

        private RecipientPeer(int index, RawClient client)
        {
            Index = index;
            Client = client;
            _reader = Task.Run(ReadAsync);
        }

        public static async Task<RecipientPeer> ConnectAsync(TestRelay relay, int index) => new(index, await RawClient.ConnectAsync(relay));

        private async Task ReadAsync()
        {
            try
            {
                while (await Client.ReadFrameAsync(TimeSpan.FromMinutes(10)) is { } frame)
                {
                    Frames.Writer.TryWrite(frame);
                }
                Frames.Writer.TryComplete(new IOException("closed by the relay"));
            }
            catch (Exception ex)
            {
                Frames.Writer.TryComplete(ex);
            }
        }

        /// <summary>Resets the TCP connection (no TLS close_notify, no FIN).</summary>
        public async Task AbortAsync()
        {
            if (_aborted) return;
            _aborted = true;
            try
            {
                Client.Socket.LingerState = new LingerOption(true, 0);
                Client.Socket.Close();
            }
            catch (ObjectDisposedException)
            {
            }
            await Client.DisposeAsync();
            await _reader;
        }
    }
}
