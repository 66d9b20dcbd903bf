using System.Collections.Concurrent;
using System.Net;
using Relay.Bench;
using Relay.Client.Transport;
using Relay.Server;
using Relay.Server.Hosting;
using Relay.Storage;

namespace Relay.Cli.Tests;

/// <summary>The load generator of <c>relay bench</c> against an in-process relay.</summary>
public class BenchTests
{
    [Test]
    public async Task ACKs_the_relay_fails_are_counted_and_reported_not_left_unobserved_and_the_drain_still_gets_every_message()
    {
        using var files = new SettingsFiles();
        await using var relay = await StartRelayAsync(files);
        var unobserved = new ConcurrentQueue<Exception>();
        EventHandler<UnobservedTaskExceptionEventArgs> onUnobserved = (_, e) =>
        {
            // Only this test's failure (INTERNAL answers to ACKs): tests run in parallel, and the event is process-wide.
            foreach (var ex in e.Exception.InnerExceptions.OfType<RelayErrorException>().Where(x => x.Code == Relay.Protocol.ErrorCode.Internal)) unobserved.Enqueue(ex);
        };
        TaskScheduler.UnobservedTaskException += onUnobserved;
        try
        {
            // Drain: every message is stored first, so the writes after "draining" are the ACKs'.
            // The first of them fails on the relay's disk: those ACKs are answered INTERNAL, and so
            // are the ACKs the store refuses while it undoes that write. Each restarts its queue's
            // subscription from the oldest message (PROTOCOL.md §6 ACK), so the drain goes on: the
            // messages those ACKs covered come again (duplicates), none is lost.
            var progress = new ProgressWriter(() => FailFirstWrite(relay.Store));
            var options = Small(BenchScenario.Drain);
            options.DeliveryWindow = 8;
            var result = await new LoadGenerator(relay.Address, options, progress).RunAsync(CancellationToken.None);

            await Assert.That(progress.ToString()).Contains("ACKs failed");
            await Assert.That(result.Sent).IsEqualTo(200);
            await Assert.That(result.Received).IsEqualTo(200);
            await Assert.That(result.Lost).IsEqualTo(0);
            for (int i = 0; i < 10; i++)
            {
                GC.Collect();
                GC.WaitForPendingFinalizers();
                await Task.Delay(100);
            }
            await Assert.That(unobserved).IsEmpty();
        }
        finally
        {
            TaskScheduler.UnobservedTaskException -= onUnobserved;
        }
    }

    [Test]
    public async Task With_the_relays_pid_a_run_reports_its_cpu_and_context_switches_per_message_and_without_it_neither()
    {
        using var files = new SettingsFiles();
        await using var relay = await StartRelayAsync(files);
        // The relay runs in this process: its PID is this one's, and its threads wait for every message.
        var options = Small(BenchScenario.Live);
        options.RelayPid = Environment.ProcessId;
        var result = await new LoadGenerator(relay.Address, options, TextWriter.Null).RunAsync(CancellationToken.None);
        await Assert.That(result.Lost).IsEqualTo(0);
        await Assert.That(result.RelaySwitchesPerMessage).IsNotNull();
        await Assert.That(result.RelaySwitchesPerMessage!.Value.Waits).IsGreaterThan(0);
        await Assert.That(result.RelayCpuUsPerMessage).IsNotNull();

        var without = await new LoadGenerator(relay.Address, Small(BenchScenario.Live), TextWriter.Null).RunAsync(CancellationToken.None);
        await Assert.That(without.RelaySwitchesPerMessage).IsNull();
        await Assert.That(without.RelayCpuUsPerMessage).IsNull();
    }

    [Test]
    public async Task Context_switches_between_two_readings_count_threads_that_started_and_never_go_negative()
    {
        var before = new Dictionary<int, ContextSwitches> { [1] = new(100, 10), [2] = new(50, 5), [3] = new(900, 90) };
        // Thread 2 went on, thread 3 ended (its counts are gone), thread 4 started, thread 1's id was
        // reused by a new thread (its counts went down).
        var after = new Dictionary<int, ContextSwitches> { [1] = new(7, 1), [2] = new(80, 6), [4] = new(20, 2) };
        await Assert.That(ContextSwitches.Between(before, after)).IsEqualTo(new ContextSwitches(7 + 30 + 20, 1 + 1 + 2));
    }

    [Test]
    public async Task The_commit_recorder_reports_count_operations_and_percentiles_of_the_commits_it_saw()
    {
        var recorder = new CommitRecorder();
        await Assert.That(recorder.Summarize()).IsNull();
        // 100 commits of 1..100 ms in shuffled order, 3 operations each but one of 103.
        foreach (int ms in Enumerable.Range(1, 100).OrderBy(i => (i * 37) % 101))
        {
            recorder.Record(new StoreCommit(ms == 50 ? 103 : 3, ms / 1000.0));
        }
        var summary = recorder.Summarize()!.Value;
        await Assert.That(summary.Commits).IsEqualTo(100);
        await Assert.That(summary.OperationsPerCommit).IsEqualTo(4.0);
        await Assert.That(summary.P50Ms).IsEqualTo(50.0).Within(1e-9);
        await Assert.That(summary.P99Ms).IsEqualTo(99.0).Within(1e-9);
        await Assert.That(summary.MaxMs).IsEqualTo(100.0).Within(1e-9);
    }

    [Test]
    public async Task A_drain_larger_than_the_relays_queues_hold_stops_at_once_and_says_which_limit_to_raise()
    {
        using var files = new SettingsFiles();
        await using var relay = await StartRelayAsync(files, queueMaxMessages: 50);
        var started = System.Diagnostics.Stopwatch.StartNew();
        // 200 messages over 2 queues need 100 places each; nothing reads while drain fills them, so
        // retrying QUOTA would wait for ever.
        var failed = await Assert.ThrowsAsync<BenchException>(() =>
            new LoadGenerator(relay.Address, Small(BenchScenario.Drain), TextWriter.Null).RunAsync(CancellationToken.None));

        await Assert.That(failed!.Message).Contains("QUOTA");
        await Assert.That(failed.Message).Contains("--queue-max-messages 100");
        await Assert.That(started.Elapsed).IsLessThan(TimeSpan.FromSeconds(10));
    }

    [Test]
    public async Task A_cancelled_paced_run_ends_at_once_although_its_pacer_waits_for_messages_due_much_later()
    {
        using var files = new SettingsFiles();
        await using var relay = await StartRelayAsync(files);
        // At 10 messages/s for 60 s the pacer sleeps between messages, and sends are in flight: the
        // run must not wait for the rest of its schedule once cancelled.
        using var cancel = new CancellationTokenSource(TimeSpan.FromSeconds(1.5));
        var started = System.Diagnostics.Stopwatch.StartNew();
        var options = Small(BenchScenario.Paced);
        options.Rate = 10;
        options.Duration = TimeSpan.FromSeconds(60);
        options.Warmup = TimeSpan.Zero;
        options.Window = 256;
        var run = new LoadGenerator(relay.Address, options, TextWriter.Null).RunAsync(cancel.Token);

        await Assert.ThrowsAsync<OperationCanceledException>(() => run);
        await Assert.That(started.Elapsed).IsLessThan(TimeSpan.FromSeconds(10));
    }

    [Test]
    public async Task A_paced_run_keeps_to_its_rate_and_checks_every_message_it_sent()
    {
        using var files = new SettingsFiles();
        await using var relay = await StartRelayAsync(files);
        var options = Small(BenchScenario.Paced);
        options.Rate = 1000;
        options.Duration = TimeSpan.FromSeconds(1);
        options.Warmup = TimeSpan.FromSeconds(0.2);
        var result = await new LoadGenerator(relay.Address, options, TextWriter.Null).RunAsync(CancellationToken.None);

        await Assert.That(result.Sent).IsEqualTo(1200);
        await Assert.That(result.Received).IsEqualTo(1200);
        await Assert.That(result.Lost).IsEqualTo(0);
        await Assert.That(result.Duplicated).IsEqualTo(0);
        await Assert.That(result.MeasuredMessages).IsEqualTo(1000);
        // No message leaves before its due time: the measured thousand take at least their second.
        await Assert.That(result.Seconds).IsGreaterThanOrEqualTo(0.99);
        await Assert.That(result.MessagesPerSecond).IsLessThanOrEqualTo(1010);
        await Assert.That(result.PacerLagP99Ms).IsNotNull();
        await Assert.That(result.PacerLagP99Ms!.Value).IsGreaterThanOrEqualTo(0);
    }

    [Test]
    public async Task A_paced_send_the_relay_answers_QUOTA_goes_again_until_it_is_taken_and_arrives_once()
    {
        using var files = new SettingsFiles();
        // One place per queue: a message due while the one before is still unacknowledged is refused.
        await using var relay = await StartRelayAsync(files, queueMaxMessages: 1);
        var options = Small(BenchScenario.Paced);
        options.Queues = 1;
        options.Rate = 2000;
        options.Duration = TimeSpan.FromSeconds(0.1);
        options.Warmup = TimeSpan.Zero;
        var result = await new LoadGenerator(relay.Address, options, TextWriter.Null).RunAsync(CancellationToken.None);

        await Assert.That(result.QuotaRetries).IsGreaterThan(0);
        await Assert.That(result.Sent).IsEqualTo(200);
        await Assert.That(result.Received).IsEqualTo(200);
        await Assert.That(result.Lost).IsEqualTo(0);
        await Assert.That(result.Duplicated).IsEqualTo(0);
    }

    /// <summary>A small run over plain TCP: 200 messages of 64 bytes, 2 queues, one producer and one consumer.</summary>
    private static BenchOptions Small(BenchScenario scenario) => new()
    {
        Scenario = scenario,
        Queues = 2,
        Producers = 1,
        Consumers = 1,
        Messages = 200,
        Size = 64,
        Window = 16,
        Tls = false,
    };

    /// <summary>An in-process relay without TLS on ephemeral ports (test projects run in parallel).</summary>
    private static Task<RelayServer> StartRelayAsync(SettingsFiles files, int? queueMaxMessages = null)
    {
        var options = new RelayServerOptions
        {
            DataDirectory = files.DataDirectory,
            Listen = new IPEndPoint(IPAddress.Loopback, 0),
            Admin = new IPEndPoint(IPAddress.Loopback, 0),
            Tls = false,
            SweepInterval = TimeSpan.Zero,
            MaintenanceInterval = TimeSpan.Zero,
        };
        if (queueMaxMessages is { } max) options.QueueMaxMessages = max;
        return RelayServer.StartAsync(options, logging => { });
    }

    /// <summary>Makes the store's next write batch fail.</summary>
    private static void FailFirstWrite(QueueStore store)
    {
        int failed = 0;
        store.BeforeWrite = (_, _) =>
        {
            if (Interlocked.Exchange(ref failed, 1) == 0) throw new IOException("injected write failure");
        };
    }

    /// <summary>The bench's progress output, calling <c>onDraining</c> when the drain starts.</summary>
    private sealed class ProgressWriter(Action onDraining) : StringWriter
    {
        private int _drained;

        public override void WriteLine(string? value)
        {
            if (value?.Contains("draining") == true && Interlocked.Exchange(ref _drained, 1) == 0)
            {
                onDraining();
            }
            lock (this)
            {
                base.WriteLine(value);
            }
        }

        public override void Write(string? value)
        {
            lock (this)
            {
                base.Write(value);
            }
        }

        public override void Write(char value)
        {
            lock (this)
            {
                base.Write(value);
            }
        }

        public override void Write(char[] buffer, int index, int count)
        {
            lock (this)
            {
                base.Write(buffer, index, count);
            }
        }

        public override string ToString()
        {
            lock (this)
            {
                return base.ToString();
            }
        }
    }
}
