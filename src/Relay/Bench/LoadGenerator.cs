using System.Buffers.Binary;
using System.Diagnostics;
using System.Globalization;
using System.Runtime.CompilerServices;
using System.Runtime.ExceptionServices;
using System.Runtime.InteropServices;
using Relay.Client.Transport;
using Relay.Protocol;

namespace Relay.Bench;

/// <summary>
/// The load generator behind <c>relay bench</c>. Every message carries its number and its send time,
/// so the consumers count losses and duplicates and measure send-to-receive latency.
/// </summary>
public sealed partial class LoadGenerator(RelayAddress address, BenchOptions options, TextWriter progress)
{
    private RelayConnectionOptions ConnectionOptions => new() { Socks = options.Socks, Tls = options.Tls };

    private sealed class QueueInfo(RecipientQueue recipient, SenderQueue sender)
    {
        public RecipientQueue Recipient { get; } = recipient;
        public SenderQueue Sender { get; } = sender;
    }

    private long _sent;
    private long _received;
    private long _duplicated;
    private long _quotaRetries;
    private long _acks;
    private long _failedAcks;
    private Exception? _firstAckFailure;
    private int[] _seen = [];
    private long[] _latencyTicks = [];
    private int _warmup;   // paced: sequence numbers below this are the warm-up

    /// <summary>
    /// Where the measured part of a run starts: time, CPU of both processes, and this process's
    /// garbage collections of any generation (each pauses the messages it has in flight).
    /// </summary>
    private readonly record struct Mark(long Timestamp, TimeSpan Cpu, TimeSpan? RelayCpu, Dictionary<int, ContextSwitches>? RelaySwitches, int Collections, TimeSpan GcPause);

    private Mark MarkNow() =>
        new(Stopwatch.GetTimestamp(), Process.GetCurrentProcess().TotalProcessorTime, RelayCpu(), RelaySwitches(),
            GC.CollectionCount(0), GC.GetTotalPauseDuration());

    public async Task<BenchResult> RunAsync(CancellationToken cancellationToken)
    {
        bool paced = options.Scenario == BenchScenario.Paced;
        _warmup = paced ? (int)Math.Ceiling(options.Rate * options.Warmup.TotalSeconds) : 0;
        int total = paced ? _warmup + (int)Math.Ceiling(options.Rate * options.Duration.TotalSeconds) : options.Messages;
        _seen = new int[total];
        _latencyTicks = new long[total];

        var producers = new RelayConnection[options.Producers];
        var consumers = new RelayConnection[options.Consumers];
        for (int i = 0; i < producers.Length; i++) producers[i] = await RelayConnection.ConnectAsync(address, ConnectionOptions, cancellationToken);
        for (int i = 0; i < consumers.Length; i++) consumers[i] = await RelayConnection.ConnectAsync(address, ConnectionOptions, cancellationToken);
        try
        {
            progress.WriteLine($"bench: creating {options.Queues} queues on {address.Host}:{address.Port}");
            var queues = new QueueInfo[options.Queues];
            var setup = new List<Task>();
            for (int q = 0; q < queues.Length; q++)
            {
                int index = q;
                setup.Add(Task.Run(async () =>
                {
                    var consumer = consumers[index % consumers.Length];
                    var producer = producers[index % producers.Length];
                    var recipient = await consumer.CreateQueueAsync(null, cancellationToken);
                    var senderKey = new byte[32];
                    RelayCrypto.GenerateKeyPair(senderKey, new byte[32]);
                    await producer.SecureAsync(recipient.SenderId, senderKey, cancellationToken);
                    queues[index] = new QueueInfo(recipient, new SenderQueue(recipient.SenderId, senderKey));
                }, cancellationToken));
            }
            await Task.WhenAll(setup);

            var consumerTasks = new List<Task>();
            using var stopConsumers = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
            var mark = MarkNow();

            if (options.Scenario != BenchScenario.Drain)
            {
                await SubscribeAllAsync(consumers, queues, cancellationToken);
                for (int c = 0; c < consumers.Length; c++) consumerTasks.Add(ConsumeAsync(consumers[c], stopConsumers.Token));
            }

            using var reporter = new Timer(_ => progress.Write(
                $"\rbench {options.Scenario.ToString().ToLowerInvariant()}: sent {Interlocked.Read(ref _sent)}, received {Interlocked.Read(ref _received)}   "),
                null, 1000, 1000);

            long produceStart = Stopwatch.GetTimestamp();
            // Paced: the measured part starts when the first message after the warm-up is due.
            var warmupEnd = _warmup > 0 ? MarkAtAsync(produceStart + (long)(_warmup * (double)Stopwatch.Frequency / options.Rate), cancellationToken) : null;
            await ProduceAsync(producers, queues, total, produceStart, cancellationToken);
            double produceSeconds = Stopwatch.GetElapsedTime(produceStart).TotalSeconds;

            if (options.Scenario == BenchScenario.Drain)
            {
                progress.WriteLine($"\rbench drain: {total} messages stored in {produceSeconds:0.00} s ({total / produceSeconds:0} msg/s); draining");
                mark = MarkNow();
                for (int c = 0; c < consumers.Length; c++) consumerTasks.Add(ConsumeAsync(consumers[c], stopConsumers.Token));
                await SubscribeAllAsync(consumers, queues, cancellationToken);
            }

            // Wait until everything sent has arrived, or nothing arrived for 10 s.
            long lastReceived = -1;
            long lastChange = Stopwatch.GetTimestamp();
            while (Interlocked.Read(ref _received) + Interlocked.Read(ref _duplicated) < Interlocked.Read(ref _sent) ||
                   Interlocked.Read(ref _received) < Interlocked.Read(ref _sent))
            {
                long now = Interlocked.Read(ref _received);
                if (now != lastReceived)
                {
                    lastReceived = now;
                    lastChange = Stopwatch.GetTimestamp();
                }
                else if (Stopwatch.GetElapsedTime(lastChange) > TimeSpan.FromSeconds(10))
                {
                    break;
                }
                await Task.Delay(1, cancellationToken);
            }
            var end = MarkNow();
            if (warmupEnd is not null) mark = await warmupEnd;
            // (At least a millisecond: a one-message measured part may end as it starts.)
            double seconds = Math.Max(0.001, Stopwatch.GetElapsedTime(mark.Timestamp, end.Timestamp).TotalSeconds);
            var cpu = end.Cpu - mark.Cpu;
            var relayCpu = end.RelayCpu - mark.RelayCpu;
            var relaySwitches = end.RelaySwitches is { } e && mark.RelaySwitches is { } b ? ContextSwitches.Between(b, e) : (ContextSwitches?)null;
            await Task.Delay(200, cancellationToken); // late duplicates
            stopConsumers.Cancel();
            await Task.WhenAll(consumerTasks);   // each has looked at its last ACKs
            progress.WriteLine();
            if (Interlocked.Read(ref _failedAcks) is > 0 and var failedAcks)
            {
                progress.WriteLine($"bench: {failedAcks} ACKs failed; the first: {_firstAckFailure?.Message}");
            }

            long received = Interlocked.Read(ref _received);
            long sent = Interlocked.Read(ref _sent);
            var latencies = new List<long>((int)received);
            for (int i = _warmup; i < _seen.Length; i++)
            {
                if (_seen[i] > 0) latencies.Add(_latencyTicks[i]);
            }
            // The measured messages: every one received but the warm-up's (all of them in live and drain).
            long measured = latencies.Count;
            latencies.Sort();
            double Percentile(double p) => latencies.Count == 0 ? 0
                : Rank.Of(latencies, p) * 1000.0 / Stopwatch.Frequency;
            double? pacerLagP99 = null;
            if (_paceLagTicks.Length == total && total > _warmup)
            {
                var lags = _paceLagTicks.AsSpan(_warmup).ToArray();
                Array.Sort(lags);
                pacerLagP99 = Rank.Of(lags, 0.99) * 1000.0 / Stopwatch.Frequency;
            }
            return new BenchResult
            {
                PacerLagP99Ms = pacerLagP99,
                Scenario = options.Scenario.ToString().ToLowerInvariant(),
                Sent = sent,
                Received = received,
                Lost = sent - received,
                Duplicated = Interlocked.Read(ref _duplicated),
                QuotaRetries = Interlocked.Read(ref _quotaRetries),
                Acks = Interlocked.Read(ref _acks),
                WarmupMessages = _warmup,
                MeasuredMessages = measured,
                GeneratorCollections = end.Collections - mark.Collections,
                GeneratorGcPauseMs = (end.GcPause - mark.GcPause).TotalMilliseconds,
                Seconds = seconds,
                MessagesPerSecond = measured / seconds,
                P50Ms = Percentile(0.50),
                P99Ms = Percentile(0.99),
                P999Ms = Percentile(0.999),
                MaxMs = Percentile(1.0),
                ProcessCpuUsPerMessage = measured <= 0 ? 0 : cpu.TotalMicroseconds / measured,
                RelayCpuUsPerMessage = relayCpu is { } r && measured > 0 ? r.TotalMicroseconds / measured : null,
                RelaySwitchesPerMessage = relaySwitches is { } sw && measured > 0
                    ? new SwitchesPerMessage((double)sw.Voluntary / measured, (double)sw.Involuntary / measured) : null,
            };
        }
        finally
        {
            foreach (var c in producers.Concat(consumers)) await c.DisposeAsync();
        }
    }

    private async Task SubscribeAllAsync(RelayConnection[] consumers, QueueInfo[] queues, CancellationToken cancellationToken)
    {
        var subs = new List<Task>();
        for (int q = 0; q < queues.Length; q++)
        {
            subs.Add(consumers[q % consumers.Length].SubscribeAsync(queues[q].Recipient, options.DeliveryWindow, cancellationToken));
        }
        await Task.WhenAll(subs);
    }

    private async Task<Mark> MarkAtAsync(long timestamp, CancellationToken cancellationToken)
    {
        long wait = timestamp - Stopwatch.GetTimestamp();
        if (wait > 0) await Task.Delay(Stopwatch.GetElapsedTime(0, wait), cancellationToken);
        // The measured part starts at the schedule's boundary, also when the timer fired late (on a
        // busy machine by tens of milliseconds, which made a paced run look shorter and faster than
        // its schedule): the clock counts from the boundary, the CPU counters from when it fired.
        return MarkNow() with { Timestamp = timestamp };
    }

    private TimeSpan? RelayCpu()
    {
        if (options.RelayPid is not { } pid) return null;
        try
        {
            // /proc/PID/stat fields 14 and 15: user and system time in clock ticks (100 Hz on Linux).
            var stat = File.ReadAllText($"/proc/{pid}/stat");
            var fields = stat.Substring(stat.LastIndexOf(')') + 2).Split(' ');
            long ticks = long.Parse(fields[11]) + long.Parse(fields[12]);
            return TimeSpan.FromSeconds(ticks / 100.0);
        }
        catch (IOException)
        {
            return null;
        }
    }

    /// <summary>
    /// The relay process's context switches so far, per thread (/proc/PID/task/TID/status): voluntary
    /// ones are waits (a thread that had nothing to do and was woken again), involuntary ones preemptions.
    /// Per thread, because threads come and go (the thread pool retires idle workers): a sum over the
    /// threads alive at each end would lose the counts of those that ended between.
    /// </summary>
    private Dictionary<int, ContextSwitches>? RelaySwitches()
    {
        if (options.RelayPid is not { } pid) return null;
        try
        {
            var threads = new Dictionary<int, ContextSwitches>();
            foreach (var task in Directory.EnumerateDirectories($"/proc/{pid}/task"))
            {
                if (!int.TryParse(Path.GetFileName(task), NumberStyles.None, CultureInfo.InvariantCulture, out int tid)) continue;
                try
                {
                    long voluntary = 0, involuntary = 0;
                    foreach (var line in File.ReadLines(Path.Combine(task, "status")))
                    {
                        if (line.StartsWith("voluntary_ctxt_switches:", StringComparison.Ordinal)) voluntary = Value(line);
                        else if (line.StartsWith("nonvoluntary_ctxt_switches:", StringComparison.Ordinal)) involuntary = Value(line);
                    }
                    threads[tid] = new ContextSwitches(voluntary, involuntary);
                }
                catch (IOException)
                {
                    // That thread ended as it was read.
                }
            }
            return threads;
        }
        catch (IOException)
        {
            return null;
        }

        static long Value(string line) => long.Parse(line.AsSpan(line.IndexOf(':') + 1).Trim(), CultureInfo.InvariantCulture);
    }

    private async Task ProduceAsync(RelayConnection[] producers, QueueInfo[] queues, int total, long paceStart, CancellationToken cancellationToken)
    {
        if (options.Scenario == BenchScenario.Paced)
        {
            await PaceAsync(producers, queues, total, paceStart, cancellationToken);
            return;
        }
        var workers = new List<Task>();
        for (int p = 0; p < producers.Length; p++)
        {
            var producer = producers[p];
            int producerIndex = p;
            var own = queues.Where((_, i) => i % producers.Length == producerIndex % producers.Length).ToArray();
            if (own.Length == 0) own = queues;
            // Producer p sends sequence numbers p, p + P, p + 2P, ... and spreads them evenly over its
            // own queues, so every queue gets exactly its share (drain fills queues to their quota).
            var turn = new StrongBox<int>(-1);
            for (int w = 0; w < options.Window; w++)
            {
                workers.Add(Task.Run(async () =>
                {
                    var body = new byte[Math.Max(options.Size, 16)];
                    while (true)
                    {
                        int k = Interlocked.Increment(ref turn.Value);
                        long seqLong = producerIndex + (long)k * producers.Length;
                        if (seqLong >= total) return;
                        int seq = (int)seqLong;
                        var queue = own[k % own.Length];
                        BinaryPrimitives.WriteInt32BigEndian(body, seq);
                        while (true)
                        {
                            BinaryPrimitives.WriteInt64BigEndian(body.AsSpan(8), Stopwatch.GetTimestamp());
                            try
                            {
                                await producer.SendAsync(queue.Sender, body, 0, cancellationToken);
                                Interlocked.Increment(ref _sent);
                                break;
                            }
                            catch (RelayErrorException ex) when (ex.Code == ErrorCode.Quota)
                            {
                                if (options.Scenario == BenchScenario.Drain)
                                {
                                    // Nothing reads while drain fills: a full queue stays full.
                                    throw new BenchException(QueueTooSmall());
                                }
                                Interlocked.Increment(ref _quotaRetries);
                                await Task.Delay(5, cancellationToken);
                            }
                        }
                    }
                }, cancellationToken));
            }
        }
        await Task.WhenAll(workers);
    }

    private string QueueTooSmall()
    {
        int perQueue = (options.Messages + options.Queues - 1) / options.Queues;
        return $"the relay answered SEND with QUOTA while drain was filling the queues: {options.Messages} messages over " +
            $"{options.Queues} queues need room for {perQueue} messages per queue (relay serve --queue-max-messages {perQueue} " +
            $"--queue-max-bytes {(long)perQueue * (options.Size + 64) / (1 << 20) + 1}MB), or fewer --messages or more --queues";
    }

    private async Task ConsumeAsync(RelayConnection consumer, CancellationToken cancellationToken)
    {
        // With --ack through, one ACK covers every delivery of a queue read so far: sent when nothing
        // more is waiting to be read, or when half a delivery window has gathered (so the relay can go on).
        var unacked = new Dictionary<RecipientQueue, (ulong Last, int Count)>(ReferenceEqualityComparer.Instance);
        int ackEvery = Math.Max(1, options.DeliveryWindow / 2);
        var events = consumer.Events;
        var acks = new AckTracker(this);
        try
        {
            while (await events.WaitToReadAsync(cancellationToken))
            {
                while (events.TryRead(out var e))
                {
                    if (e is not DeliveryEvent { Delivery: var d, Queue: var queue }) continue;
                    long now = Stopwatch.GetTimestamp();
                    if (!options.AckThrough)
                    {
                        // Counted before the message: the run ends when the last one is recorded.
                        acks.Add(Ack(consumer, queue, d.MessageId, 1, cancellationToken));
                        Record(d, now);
                        continue;
                    }
                    Record(d, now);
                    int count = unacked.GetValueOrDefault(queue).Count + 1;
                    if (count >= ackEvery)
                    {
                        unacked.Remove(queue);
                        acks.Add(Ack(consumer, queue, d.MessageId, count, cancellationToken));
                    }
                    else
                    {
                        unacked[queue] = (d.MessageId, count);
                    }
                }
                foreach (var (queue, (last, count)) in unacked)
                {
                    acks.Add(Ack(consumer, queue, last, count, cancellationToken));
                }
                unacked.Clear();
            }
        }
        catch (OperationCanceledException)
        {
        }
        finally
        {
            await acks.ObserveAllAsync();
        }
    }

    /// <summary>Sends an ACK without waiting for its answer: the consumer goes on reading.</summary>
    private Task Ack(RelayConnection consumer, RecipientQueue queue, ulong last, int count, CancellationToken cancellationToken)
    {
        Interlocked.Increment(ref _acks);
        return count == 1 ? consumer.AckAsync(queue, last, cancellationToken) : consumer.AckThroughAsync(queue, last, cancellationToken);
    }

    /// <summary>
    /// A consumer's recent ACKs, looked at when they leave a ring of 16: a failed one is counted and
    /// reported. Without a continuation per ACK (allocated per message, it would make the load
    /// generator collect garbage more often, and each collection pauses it with messages in flight).
    /// Small, because whatever the ring holds survives the next collection: 256 per consumer made
    /// every gen-0 collection promote about 160 KB of answered ACKs and take 1.5–2 ms.
    /// </summary>
    private sealed class AckTracker(LoadGenerator owner)
    {
        private readonly Task?[] _recent = new Task?[16];
        // ACKs that left the ring unanswered (under live load about 4 in 10: 16 later ACKs take a few
        // milliseconds): looked at again whenever the list would grow, so it holds only ACKs still in flight.
        private readonly List<Task> _late = [];
        private int _next;

        public void Add(Task ack)
        {
            if (_recent[_next] is { } old && !Looked(old))
            {
                if (_late.Count == _late.Capacity) PruneLate();
                _late.Add(old);
            }
            _recent[_next] = ack;
            _next = (_next + 1) % _recent.Length;
        }

        /// <summary>False while the ACK is unanswered; once answered, a failure is counted.</summary>
        private bool Looked(Task ack)
        {
            if (!ack.IsCompleted) return false;
            if (ack.IsFaulted) owner.AckFailed(ack.Exception!.InnerException!);
            return true;
        }

        private void PruneLate()
        {
            int kept = 0;
            for (int i = 0; i < _late.Count; i++)
            {
                if (!Looked(_late[i])) _late[kept++] = _late[i];
            }
            _late.RemoveRange(kept, _late.Count - kept);
        }

        /// <summary>At the end of the run, when the ACKs still waiting are cancelled: counts the failed ones before the report.</summary>
        public async Task ObserveAllAsync()
        {
            foreach (var ack in _recent.Concat(_late))
            {
                if (ack is null) continue;
                try
                {
                    await ack;
                }
                catch (OperationCanceledException)
                {
                }
                catch (Exception ex)
                {
                    owner.AckFailed(ex);
                }
            }
            Array.Clear(_recent);
            _late.Clear();
        }
    }

    private void AckFailed(Exception failure)
    {
        Interlocked.CompareExchange(ref _firstAckFailure, failure, null);
        Interlocked.Increment(ref _failedAcks);
    }

    private void Record(Delivery d, long now)
    {
        int seq = BinaryPrimitives.ReadInt32BigEndian(d.Body);
        long sentAt = BinaryPrimitives.ReadInt64BigEndian(d.Body.AsSpan(8));
        if ((uint)seq < (uint)_seen.Length)
        {
            if (Interlocked.Increment(ref _seen[seq]) == 1)
            {
                _latencyTicks[seq] = now - sentAt;
                Interlocked.Increment(ref _received);
            }
            else
            {
                Interlocked.Increment(ref _duplicated);
            }
        }
    }

    private int BodySize => Math.Max(options.Size, 16);
    private long[] _paceLagTicks = [];   // paced: how long after its due time each message was sent
    private Exception? _paceFailure;

    /// <summary>
    /// Paced: one thread hands every message to its producer connection at its due time, sleeping on
    /// the kernel's high-resolution timer in between, so the messages leave evenly instead of in
    /// bunches whenever a coarse timer fires. Sends are not awaited
    /// one by one: at most <see cref="BenchOptions.Window"/> per producer are unanswered; while a
    /// producer's are all out the pacer waits and falls behind, which the pacer lag reports.
    /// </summary>
    private Task PaceAsync(RelayConnection[] producers, QueueInfo[] queues, int total, long paceStart, CancellationToken cancellationToken)
    {
        _paceLagTicks = new long[total];
        var done = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var pacer = new Thread(() =>
        {
            try
            {
                Pace(producers, queues, total, paceStart, cancellationToken);
                done.TrySetResult();
            }
            catch (OperationCanceledException ex)
            {
                done.TrySetCanceled(ex.CancellationToken);
            }
            catch (Exception ex)
            {
                done.TrySetException(ex);
            }
        })
        { IsBackground = true, Name = "relay bench pacer" };
        pacer.Start();
        return done.Task;
    }

    private void Pace(RelayConnection[] producers, QueueInfo[] queues, int total, long paceStart, CancellationToken cancellationToken)
    {
        double perMessageTicks = Stopwatch.Frequency / (double)options.Rate;
        int p = producers.Length;
        var own = new QueueInfo[p][];
        var free = new Stack<PacedSend>[p];
        var slots = new List<PacedSend>();
        for (int i = 0; i < p; i++)
        {
            int producerIndex = i;
            // Producer i sends sequence numbers i, i + P, ... over its own queues, as in live.
            own[i] = queues.Where((_, q) => q % p == producerIndex % p).ToArray();
            if (own[i].Length == 0) own[i] = queues;
            free[i] = new Stack<PacedSend>();
            for (int w = 0; w < options.Window; w++)
            {
                var slot = new PacedSend(this, producers[i], free[i], cancellationToken);
                free[i].Push(slot);
                slots.Add(slot);
            }
        }
        var body = new byte[Math.Max(options.Size, 16)];
        for (int seq = 0; seq < total; seq++)
        {
            long due = paceStart + (long)(seq * perMessageTicks);
            SleepUntil(due, cancellationToken);
            int producer = seq % p;
            PacedSend? slot;
            while (true)
            {
                if (Volatile.Read(ref _paceFailure) is { } failure) ExceptionDispatchInfo.Throw(failure);
                lock (free[producer])
                {
                    free[producer].TryPop(out slot);
                }
                if (slot is not null) break;
                SleepUntil(Stopwatch.GetTimestamp() + Stopwatch.Frequency / 20_000, cancellationToken);   // 50 us
            }
            var queue = own[producer][seq / p % own[producer].Length];
            BinaryPrimitives.WriteInt32BigEndian(body, seq);
            long now = Stopwatch.GetTimestamp();
            BinaryPrimitives.WriteInt64BigEndian(body.AsSpan(8), now);
            _paceLagTicks[seq] = Math.Max(0, now - due);
            // The body is copied into the connection's output before SendAsync returns.
            slot.Start(queue.Sender, seq, producers[producer].SendAsync(queue.Sender, body, 0, cancellationToken));
        }
        // Every send answered (or failed) before the run counts what arrived.
        foreach (var slot in slots) slot.WaitIdle(cancellationToken);
        if (Volatile.Read(ref _paceFailure) is { } failed) ExceptionDispatchInfo.Throw(failed);
    }

    private void PaceFailed(Exception failure) => Interlocked.CompareExchange(ref _paceFailure, failure, null);

    /// <summary>Sleeps until <paramref name="timestamp"/> (a <see cref="Stopwatch"/> timestamp), in steps of at most 10 ms so cancellation is seen.</summary>
    private static void SleepUntil(long timestamp, CancellationToken cancellationToken)
    {
        while (true)
        {
            cancellationToken.ThrowIfCancellationRequested();
            long wait = timestamp - Stopwatch.GetTimestamp();
            if (wait <= 0) return;
            long nanoseconds = Math.Min((long)(wait * (1e9 / Stopwatch.Frequency)), 10_000_000);
            if (OperatingSystem.IsLinux())
            {
                NanoSleep(nanoseconds);
            }
            else
            {
                Thread.Sleep(TimeSpan.FromTicks(Math.Max(TimeSpan.TicksPerMillisecond, nanoseconds / 100)));
            }
        }
    }

    private static unsafe void NanoSleep(long nanoseconds)
    {
        var request = new Timespec { Seconds = nanoseconds / 1_000_000_000, Nanoseconds = nanoseconds % 1_000_000_000 };
        _ = nanosleep(&request, null);   // interrupted early (EINTR): the caller's loop sleeps again
    }

    private struct Timespec
    {
        public long Seconds;
        public long Nanoseconds;
    }

    [LibraryImport("libc", SetLastError = false)]
    private static unsafe partial int nanosleep(Timespec* request, Timespec* remaining);

    /// <summary>
    /// One paced SEND in flight: its answer is observed by a continuation kept with the slot (no
    /// allocation per message), and the slot goes back to its producer's free list. A QUOTA answer is
    /// retried after 5 ms, as live does; any other failure ends the run.
    /// </summary>
    private sealed class PacedSend
    {
        private readonly LoadGenerator _owner;
        private readonly RelayConnection _producer;
        private readonly Stack<PacedSend> _free;
        private readonly CancellationToken _cancellation;
        private readonly Action _onAnswered;
        private SenderQueue? _queue;
        private int _seq;
        private Task _send = Task.CompletedTask;
        private int _busy;

        public PacedSend(LoadGenerator owner, RelayConnection producer, Stack<PacedSend> free, CancellationToken cancellation)
        {
            _owner = owner;
            _producer = producer;
            _free = free;
            _cancellation = cancellation;
            _onAnswered = OnAnswered;
        }

        public void Start(SenderQueue queue, int seq, Task send)
        {
            _queue = queue;
            _seq = seq;
            _send = send;
            Volatile.Write(ref _busy, 1);
            send.ConfigureAwait(false).GetAwaiter().UnsafeOnCompleted(_onAnswered);
        }

        private void OnAnswered()
        {
            var send = _send;
            if (send.IsCompletedSuccessfully)
            {
                Interlocked.Increment(ref _owner._sent);
                Release();
            }
            else if (send.Exception?.InnerException is RelayErrorException { Code: ErrorCode.Quota })
            {
                _ = RetryAsync();
            }
            else
            {
                _owner.PaceFailed(send.Exception?.InnerException ?? new OperationCanceledException(_cancellation));
                Release();
            }
        }

        private async Task RetryAsync()
        {
            Interlocked.Increment(ref _owner._quotaRetries);
            try
            {
                await Task.Delay(5, _cancellation);
                var body = new byte[_owner.BodySize];
                BinaryPrimitives.WriteInt32BigEndian(body, _seq);
                BinaryPrimitives.WriteInt64BigEndian(body.AsSpan(8), Stopwatch.GetTimestamp());
                Start(_queue!, _seq, _producer.SendAsync(_queue!, body, 0, _cancellation));
            }
            catch (Exception ex)
            {
                _owner.PaceFailed(ex);
                Release();
            }
        }

        private void Release()
        {
            _send = Task.CompletedTask;
            Volatile.Write(ref _busy, 0);
            lock (_free)
            {
                _free.Push(this);
            }
        }

        public void WaitIdle(CancellationToken cancellationToken)
        {
            while (Volatile.Read(ref _busy) != 0)
            {
                cancellationToken.ThrowIfCancellationRequested();
                Thread.Sleep(1);
            }
        }
    }
}

/// <summary>Context switches of a thread or a process: waits (voluntary) and preemptions (involuntary).</summary>
public readonly record struct ContextSwitches(long Voluntary, long Involuntary)
{
    /// <summary>
    /// The switches between two readings of a process's threads: a thread in both counts its increase,
    /// one that started since (absent before, or a reused id whose counts went down) counts all of its
    /// own; one that ended since is not seen (so the total is never negative, and low by what such
    /// threads did).
    /// </summary>
    public static ContextSwitches Between(Dictionary<int, ContextSwitches> before, Dictionary<int, ContextSwitches> after)
    {
        long voluntary = 0, involuntary = 0;
        foreach (var (tid, now) in after)
        {
            if (before.TryGetValue(tid, out var then) && now.Voluntary >= then.Voluntary && now.Involuntary >= then.Involuntary)
            {
                voluntary += now.Voluntary - then.Voluntary;
                involuntary += now.Involuntary - then.Involuntary;
            }
            else
            {
                voluntary += now.Voluntary;
                involuntary += now.Involuntary;
            }
        }
        return new ContextSwitches(voluntary, involuntary);
    }
}
