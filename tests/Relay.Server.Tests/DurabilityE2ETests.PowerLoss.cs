using System.Collections.Concurrent;
using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Text;
using Relay.Client.Transport;
using Relay.Protocol;

namespace Relay.Server.Tests;

/// <summary>
/// Power losses under load, against the published binary: the data directory is on lossyfs
/// (PowerLoss/lossyfs.py, a FUSE file system that forgets every write not yet fsynced when the power
/// goes), and each cycle kills the relay with SENDs and ACKs in flight, cuts the power, mounts the
/// disk as it came back and starts the relay again. Needs root, /dev/fuse and Debian's
/// python3-fusepy (.ci/run installs it).
/// </summary>
public partial class DurabilityE2ETests
{
    private const int PowerLossQueues = 8;
    /// <summary>Queues 0 to 5 have a subscriber that ACKs every message; 6 and 7 only store theirs until the end.</summary>
    private const int LiveQueues = 6;

    [Test]
    [Timeout(300_000)]
    public async Task Acknowledged_messages_and_acks_survive_six_power_losses_under_load(CancellationToken cancellationToken)
    {
        var run = await RunPowerLossesAsync(durable: true, cycles: 6, seed: Environment.TickCount, cancellationToken);
        string context = run.Describe();
        Console.WriteLine(context);

        await Assert.That(run.Failures).IsEmpty().Because(context);
        // The relay's identity (its address) survives too: the first start made it.
        await Assert.That(run.Fingerprints.Distinct().Count()).IsEqualTo(1).Because($"relay addresses {string.Join(", ", run.Fingerprints)}; {context}");
        // Not vacuous: every cycle had acknowledged sends and deliveries when the power went, and
        // the power losses undid writes the relay had not synced (its RocksDB info log at least).
        await Assert.That(run.Cycles.All(c => c.Acknowledged > 0 && c.Delivered > 0)).IsTrue().Because(context);
        await Assert.That(run.Cycles.Sum(c => c.BytesLost)).IsGreaterThan(0).Because(context);
        await Assert.That(run.FinalDrain.Count).IsGreaterThan(0).Because(context);
        await Assert.That(run.TableFiles).IsGreaterThan(0).Because($"no memtable was flushed to a table file between the power losses; {context}");

        // Every SEND answered OK is still there, unless its recipient ACKed it (an ACK whose delete was
        // written when the power went may have had no answer yet: its message may be gone).
        var lost = run.Lost.Order().Take(10).ToList();
        await Assert.That(lost).IsEmpty().Because($"acknowledged sends missing after the power losses; {context}");
        // An ACK answered OK stays done: that message never comes back.
        var back = run.AckedOk.Where(run.FinalDrain.ContainsKey).Order().Take(10).ToList();
        await Assert.That(back).IsEmpty().Because($"acknowledged deliveries delivered again; {context}");
    }

    [Test]
    [Timeout(300_000)]
    public async Task Relaxed_durability_loses_acknowledged_messages_to_a_power_loss(CancellationToken cancellationToken)
    {
        // The same power losses against --durability relaxed, which OPERATIONS.md says may lose
        // acknowledged messages on a power loss: it does, so the instrument above sees a loss.
        var run = await RunPowerLossesAsync(durable: false, cycles: 2, seed: Environment.TickCount, cancellationToken);
        string context = run.Describe();
        Console.WriteLine(context);
        await Assert.That(run.Cycles.All(c => c.Acknowledged > 0)).IsTrue().Because(context);
        int lost = run.Lost.Count();
        await Assert.That(lost).IsGreaterThan(0).Because(context);
    }

    [Test]
    [Arguments("log")]
    [Arguments("sst")]
    [Timeout(300_000)]
    public async Task A_failed_fsync_is_never_acknowledged_and_stops_the_relay_for_a_restart(string file, CancellationToken cancellationToken)
    {
        // A write whose fsync fails may be gone after a power loss even if a later fsync of the same
        // file succeeds (Linux reports a failed writeback once). Of the log ("log"): that write and
        // nothing after it may be answered OK. Of a table file that a memtable flush writes ("sst"):
        // the log it replaces must stay. Either way the relay answers INTERNAL from then on, exits 1
        // after --store-failure-timeout, and every SEND it acknowledged is there after the power
        // loss and a restart.
        var binary = Binary();
        LossyMount.Require();
        var run = new PowerLossRun(0, durable: true);
        var (root, backing, mountPoint) = NewLossyDirectories();
        try
        {
            var data = Path.Combine(mountPoint, "data");
            List<RecipientQueue> queues = [];
            var next = new int[PowerLossQueues];
            var stats = new PowerLossCycle();
            await using (var mount = await LossyMount.MountAsync(backing, mountPoint))
            {
                await using var relay = await RelayProcess.StartAsync(binary, data, "--store-failure-timeout", "2s", "--queue-max-bytes", "1GB");
                await using (var connection = await RelayConnection.ConnectAsync(relay.Address, cancellationToken: cancellationToken))
                {
                    for (int q = 0; q < PowerLossQueues; q++)
                    {
                        queues.Add(await connection.CreateQueueAsync(cancellationToken: cancellationToken));
                    }
                    var failAfter = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
                    var sending = SendAsync(connection, queues, next, run, stats, 1_000, failAfter, 1);
                    await failAfter.Task.WaitAsync(TimeSpan.FromSeconds(60), cancellationToken);
                    int before = stats.Acknowledged;
                    mount.FailNextFsync(file);
                    // Sends go on until the relay stops by itself (with "sst", once a memtable is
                    // flushed: 16 MiB of messages later).
                    var exit = await relay.WaitForExitAsync(TimeSpan.FromSeconds(60));
                    await sending.WaitAsync(TimeSpan.FromSeconds(30), cancellationToken);
                    string context = $"{file}: exit {exit}, {run.Sent} sent, {run.AcknowledgedSet.Count} acknowledged ({before} before the failure), answers {string.Join(", ", run.Failures.CountBy(f => f).Select(p => $"{p.Key} ×{p.Value}"))}, " +
                        $"{run.Errors} refused:\n{relay.Output}";
                    Console.WriteLine(context);
                    await Assert.That(exit).IsEqualTo(1).Because(context);
                    await Assert.That(relay.Output).Contains("Relay[33]").Because(context);
                    await Assert.That(run.Errors).IsGreaterThan(0).Because(context);
                    await Assert.That(run.Failures.All(f => f == $"SEND answered {ErrorCode.Internal}")).IsTrue().Because(context);
                }
                await mount.PowerOffAsync();
            }

            await using (var mount = await LossyMount.MountAsync(backing, mountPoint))
            await using (var relay = await RelayProcess.StartAsync(binary, data))
            {
                var stored = new HashSet<string>();
                await using var connection = await RelayConnection.ConnectAsync(relay.Address, cancellationToken: cancellationToken);
                foreach (var queue in queues)
                {
                    stored.UnionWith(await DrainAsync(connection, queue, cancellationToken));
                }
                var lost = run.Acknowledged.Where(b => !stored.Contains(b)).Order().Take(10).ToList();
                await Assert.That(lost).IsEmpty().Because($"{run.AcknowledgedSet.Count} acknowledged, {stored.Count} stored after the power loss");
                await Assert.That(stored.Count).IsGreaterThanOrEqualTo(1_000);
            }
        }
        finally
        {
            TryDelete(root);
        }
    }

    [Test]
    [Timeout(300_000)]
    public async Task Every_acknowledged_queue_change_survives_power_losses(CancellationToken cancellationToken)
    {
        // Each cycle: NEW, SKEY and three SENDs to a new queue, OFF of another, DEL of the queue the
        // cycle before made; the power goes right after the last answer. The next start finds each
        // change as it was answered.
        var binary = Binary();
        LossyMount.Require();
        var (root, backing, mountPoint) = NewLossyDirectories();
        try
        {
            var data = Path.Combine(mountPoint, "data");
            const int Cycles = 4;
            var secured = new List<(RecipientQueue Queue, SenderQueue Sender)>();
            var suspended = new List<RecipientQueue>();
            var deleted = new List<RecipientQueue>();
            for (int cycle = 0; cycle <= Cycles; cycle++)
            {
                await using var mount = await LossyMount.MountAsync(backing, mountPoint);
                await using var relay = await RelayProcess.StartAsync(binary, data);
                await using (var connection = await RelayConnection.ConnectAsync(relay.Address, cancellationToken: cancellationToken))
                {
                    // What the cycles before changed.
                    for (int i = 0; i < secured.Count; i++)
                    {
                        var (queue, keyed) = secured[i];
                        bool gone = deleted.Contains(queue);
                        var unsigned = await AnswerOfAsync(connection.SendAsync(new SenderQueue(queue.SenderId, null), "unsigned"u8.ToArray(), cancellationToken: cancellationToken));
                        await Assert.That(unsigned).IsEqualTo(ErrorCode.Auth).Because($"cycle {cycle}: a SEND without the key to queue {i} (secured{(gone ? ", deleted" : "")})");
                        var signedAnswer = await AnswerOfAsync(connection.SendAsync(keyed, "signed"u8.ToArray(), cancellationToken: cancellationToken));
                        await Assert.That(signedAnswer).IsEqualTo(gone ? ErrorCode.Auth : (ErrorCode?)null).Because($"cycle {cycle}: a SEND with the key to queue {i}{(gone ? " (deleted)" : "")}");
                        var get = await AnswerOfAsync(connection.GetAsync(queue, cancellationToken));
                        await Assert.That(get).IsEqualTo(gone ? ErrorCode.Auth : (ErrorCode?)null).Because($"cycle {cycle}: GET of queue {i}");
                    }
                    foreach (var queue in suspended)
                    {
                        var answer = await AnswerOfAsync(connection.SendAsync(new SenderQueue(queue.SenderId, null), "late"u8.ToArray(), cancellationToken: cancellationToken));
                        await Assert.That(answer).IsEqualTo(ErrorCode.Auth).Because($"cycle {cycle}: a SEND to a suspended queue");
                        await Assert.That(await connection.GetAsync(queue, cancellationToken)).IsNotNull().Because($"cycle {cycle}: a suspended queue keeps its message");
                    }
                    if (cycle == Cycles)
                    {
                        break;
                    }

                    // This cycle's changes, each answered OK; then the power goes.
                    var created = await connection.CreateQueueAsync(cancellationToken: cancellationToken);
                    var key = new byte[ProtocolConstants.KeySize];
                    RelayCrypto.GenerateKeyPair(key, new byte[ProtocolConstants.KeySize]);
                    await connection.SecureAsync(created.SenderId, key, cancellationToken);
                    var sender = new SenderQueue(created.SenderId, key);
                    for (int m = 0; m < 3; m++)
                    {
                        await connection.SendAsync(sender, Encoding.UTF8.GetBytes($"cycle {cycle} message {m}"), cancellationToken: cancellationToken);
                    }
                    var toSuspend = await connection.CreateQueueAsync(cancellationToken: cancellationToken);
                    await connection.SendAsync(new SenderQueue(toSuspend.SenderId, null), "kept"u8.ToArray(), cancellationToken: cancellationToken);
                    await connection.SuspendAsync(toSuspend, cancellationToken);
                    if (secured.Count > 0)
                    {
                        await connection.DeleteAsync(secured[^1].Queue, cancellationToken);
                        deleted.Add(secured[^1].Queue);
                    }
                    secured.Add((created, sender));
                    suspended.Add(toSuspend);
                }
                relay.Kill();
                await relay.WaitForExitAsync(TimeSpan.FromSeconds(10));
                await mount.PowerOffAsync();
            }
        }
        finally
        {
            TryDelete(root);
        }
    }

    [Test]
    [Timeout(300_000)]
    public async Task A_conversation_goes_on_through_power_losses_of_its_relay_with_every_message_once_and_in_order(CancellationToken cancellationToken)
    {
        // The SDK as an app uses it: Bob's Messenger sends messages one after another while the relay
        // (on lossyfs, the same address every time) loses power six times, every 0.2–0.6 s, and comes back;
        // Alice's Messenger listens throughout. Sends wait for the relay (RelayClient retries), an
        // envelope whose SEND got no answer is sent again (the same bytes), and Alice gets each
        // message exactly once, in order, with nothing reported missing or rejected (only the relay's
        // outages: unavailable, then available again).
        var binary = Binary();
        LossyMount.Require();
        var (root, backing, mountPoint) = NewLossyDirectories();
        var data = Path.Combine(mountPoint, "data");
        int port = RelayProcess.FreePort();
        var options = new Relay.Client.RelayClientOptions { ReconnectMin = TimeSpan.FromMilliseconds(50), ReconnectMax = TimeSpan.FromMilliseconds(500) };
        LossyMount? mount = await LossyMount.MountAsync(backing, mountPoint);
        RelayProcess? relay = await RelayProcess.StartAsync(binary, data, port, []);
        var address = relay.Address;
        var heard = new List<Relay.Client.Conversations.ConversationEvent>();
        int cuts = 0, sent = 0;
        const int Cuts = 6;
        try
        {
            await using var alice = new Relay.Client.Conversations.Messenger(new Relay.Client.Conversations.MemoryProfileStore(), options);
            await using var bob = new Relay.Client.Conversations.Messenger(new Relay.Client.Conversations.MemoryProfileStore(), options);
            var (link, _) = await alice.InviteAsync(address, "bob", cancellationToken: cancellationToken);
            await bob.JoinAsync(link, name: "alice", cancellationToken: cancellationToken);

            using var stop = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
            var allHeard = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            Task? sending = null;
            var sendingDone = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            sending = sendingDone.Task;
            var listening = Task.Run(async () =>
            {
                try
                {
                    await foreach (var e in alice.ListenAsync(stop.Token))
                    {
                        lock (heard)
                        {
                            heard.Add(e);
                            if (sending!.IsCompleted && heard.Count(h => h is Relay.Client.Conversations.MessageReceived) >= Volatile.Read(ref sent)) allHeard.TrySetResult();
                        }
                    }
                }
                catch (OperationCanceledException) { }
            });
            using var enough = new CancellationTokenSource();
            var sender = Task.Run(async () =>
            {
                while (!enough.IsCancellationRequested)
                {
                    await bob.SendAsync("alice", $"m{sent:D4}", stop.Token);
                    Interlocked.Increment(ref sent);
                }
            });
            var random = new Random();
            while (cuts < Cuts && !sender.IsCompleted)
            {
                await Task.Delay(random.Next(200, 600), cancellationToken);
                relay!.Kill();
                await relay.WaitForExitAsync(TimeSpan.FromSeconds(10));
                await relay.DisposeAsync();
                relay = null;
                await mount!.PowerOffAsync();
                await mount.DisposeAsync();
                mount = null;
                cuts++;
                mount = await LossyMount.MountAsync(backing, mountPoint);
                relay = await RelayProcess.StartAsync(binary, data, port, []);
                await Assert.That(relay.Address.ToString()).IsEqualTo(address.ToString());
            }
            enough.Cancel();
            await sender.WaitAsync(TimeSpan.FromSeconds(120), cancellationToken);
            sendingDone.TrySetResult();
            lock (heard)
            {
                if (heard.Count(h => h is Relay.Client.Conversations.MessageReceived) >= sent) allHeard.TrySetResult();
            }
            await allHeard.Task.WaitAsync(TimeSpan.FromSeconds(60), cancellationToken);
            await Task.Delay(500, cancellationToken);   // a duplicate would show up now
            stop.Cancel();
            await listening;

            List<Relay.Client.Conversations.ConversationEvent> events;
            lock (heard) events = [.. heard];
            var texts = events.OfType<Relay.Client.Conversations.MessageReceived>().Select(m => m.Text).ToList();
            // While the relay is down, the listener is told (ContactUnavailable: it cannot be reached) and
            // told again when it is back (ContactAvailable); nothing else but messages.
            static bool Outage(Relay.Client.Conversations.ConversationEvent e) =>
                e is Relay.Client.Conversations.ContactAvailable
                || e is Relay.Client.Conversations.ContactUnavailable u && u.Reason.Contains("cannot be reached", StringComparison.Ordinal);
            var other = events.Where(e => e is not Relay.Client.Conversations.MessageReceived and not Relay.Client.Conversations.ContactJoined && !Outage(e))
                .Select(e => e.ToString()).ToList();
            var lastOutage = events.LastOrDefault(Outage);
            string context = $"{sent} messages, {cuts} power losses; events other than messages: {string.Join("; ", other)}";
            Console.WriteLine(context);
            await Assert.That(cuts).IsEqualTo(Cuts).Because(context);
            await Assert.That(sent).IsGreaterThan(Cuts).Because(context);
            await Assert.That(texts).IsEquivalentTo(Enumerable.Range(0, sent).Select(i => $"m{i:D4}").ToList(),
                TUnit.Assertions.Enums.CollectionOrdering.Matching).Because(context);
            await Assert.That(other).IsEmpty().Because(context);
            await Assert.That(lastOutage is null or Relay.Client.Conversations.ContactAvailable).IsTrue().Because(context);
        }
        finally
        {
            if (relay != null) await relay.DisposeAsync();
            if (mount != null) await mount.DisposeAsync();
            TryDelete(root);
        }
    }

    /// <summary>null when the command was answered OK (or a message), else the error code it was answered.</summary>
    private static async Task<ErrorCode?> AnswerOfAsync(Task command)
    {
        try
        {
            await command;
            return null;
        }
        catch (RelayErrorException e)
        {
            return e.Code;
        }
    }

    [Test]
    [Timeout(300_000)]
    public async Task A_client_profile_keeps_what_each_command_wrote_through_a_power_loss(CancellationToken cancellationToken)
    {
        // A profile that a power loss took back to before a send would seal the next message with
        // the message key (and nonce) of the one already sent. Alice's and Bob's profiles are on
        // lossyfs, the relay on the real disk; the power goes after every command.
        var binary = Binary();
        LossyMount.Require();
        var (root, backing, mountPoint) = NewLossyDirectories();
        try
        {
            await using var relay = await RelayProcess.StartAsync(binary, Path.Combine(root, "relay"));
            string alice = Path.Combine(mountPoint, "profiles", "alice"), bob = Path.Combine(mountPoint, "profiles", "bob");
            string? link = null;
            // listen --timeout exits 1 when no message came (a join is not one).
            var commands = new List<(string Who, Func<string[]> Args, int Code)>
            {
                ("alice invites", () => ["invite", "--profile", alice, "--relay", relay.Address.ToString(), "--name", "bob"], 0),
                ("bob joins", () => ["join", link!, "--profile", bob, "--name", "alice"], 0),
                ("alice hears bob join", () => ["listen", "--profile", alice, "--timeout", "3"], 1),
                ("bob sends one", () => ["send", "--profile", bob, "--to", "alice", "one"], 0),
                ("bob sends two", () => ["send", "--profile", bob, "--to", "alice", "two"], 0),
                ("alice reads one", () => ["listen", "--profile", alice, "--once"], 0),
                ("bob sends three", () => ["send", "--profile", bob, "--to", "alice", "three"], 0),
                ("alice reads the rest", () => ["listen", "--profile", alice, "--timeout", "3"], 0),
            };
            var heard = new StringBuilder();
            foreach (var (who, args, expected) in commands)
            {
                await using var mount = await LossyMount.MountAsync(backing, mountPoint);
                var (code, stdout, stderr) = await RunCliAsync(binary, args());
                await Assert.That(code).IsEqualTo(expected).Because($"{who}: {stdout}{stderr}");
                link ??= System.Text.RegularExpressions.Regex.Match(stdout, @"\S+").Value;
                if (args()[0] == "listen") heard.Append(stdout);
                var before = Snapshot(alice, bob);
                var (bytes, names) = await mount.PowerOffAsync();
                await using var again = await LossyMount.MountAsync(backing, mountPoint);
                var after = Snapshot(alice, bob);
                await Assert.That(after).IsEqualTo(before).Because($"the profiles after '{who}' and a power loss ({bytes} bytes and {names} name changes undone)");
            }
            var lines = heard.ToString().Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
            await Assert.That(lines).IsEquivalentTo(new[] { "* bob joined", "bob: one", "bob: two", "bob: three" },
                TUnit.Assertions.Enums.CollectionOrdering.Matching).Because(heard.ToString());
        }
        finally
        {
            TryDelete(root);
        }
    }

    /// <summary>A test's directory, with the backing directory of lossyfs and its mount point in it.</summary>
    private static (string Root, string Backing, string MountPoint) NewLossyDirectories()
    {
        var root = NewDataDirectory();
        var backing = Path.Combine(root, "disk");
        var mountPoint = Path.Combine(root, "mnt");
        Directory.CreateDirectory(backing);
        Directory.CreateDirectory(mountPoint);
        return (root, backing, mountPoint);
    }

    /// <summary>Both profile files as text ("(none)" when missing).</summary>
    private static string Snapshot(params string[] profiles) =>
        string.Join("\n", profiles.Select(p => Path.Combine(p, "profile.json")).Select(f => File.Exists(f) ? File.ReadAllText(f) : "(none)"));

    private static async Task<(int Code, string Stdout, string Stderr)> RunCliAsync(string binary, string[] args)
    {
        var psi = new ProcessStartInfo(binary) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in args) psi.ArgumentList.Add(a);
        using var process = Process.Start(psi) ?? throw new InvalidOperationException("cannot start " + binary);
        var stdout = process.StandardOutput.ReadToEndAsync();
        var stderr = process.StandardError.ReadToEndAsync();
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(60));
        await process.WaitForExitAsync(cts.Token);
        return (process.ExitCode, await stdout, await stderr);
    }

    private sealed class PowerLossCycle
    {
        public int Acknowledged;
        public int Delivered;
        public int AckedOk;
        public long BytesLost;
        public int NamesLost;
    }

    private sealed class PowerLossRun(int seed, bool durable)
    {
        public readonly List<PowerLossCycle> Cycles = [];
        /// <summary>Bodies whose SEND was answered OK.</summary>
        public readonly ConcurrentDictionary<string, bool> AcknowledgedSet = new();
        public IEnumerable<string> Acknowledged => AcknowledgedSet.Keys;
        /// <summary>
        /// Acknowledged SENDs not in the store at the end whose recipient never ACKed them (an ACK
        /// whose delete was written when the power went may have had no answer yet).
        /// </summary>
        public IEnumerable<string> Lost => Acknowledged.Where(b => !AckSent.ContainsKey(b) && !FinalDrain.ContainsKey(b));
        /// <summary>Bodies whose ACK was sent, answered or not.</summary>
        public readonly ConcurrentDictionary<string, bool> AckSent = new();
        /// <summary>Bodies whose ACK was answered OK.</summary>
        public readonly HashSet<string> AckedOk = [];
        /// <summary>Every body in the store after the last power loss, with its message id.</summary>
        public readonly Dictionary<string, ulong> FinalDrain = [];
        public readonly List<string> Failures = [];
        /// <summary>The relay address's fingerprint at each start after a power loss (the first cycle's start included).</summary>
        public readonly List<string> Fingerprints = [];
        /// <summary>Per queue: message id → body, from every delivery seen.</summary>
        public readonly Dictionary<ulong, string>[] IdToBody = Enumerable.Range(0, PowerLossQueues).Select(_ => new Dictionary<ulong, string>()).ToArray();
        public int Sent;
        public int Errors;
        /// <summary>Table files in the store after the last power loss: memtables flushed between the power losses.</summary>
        public int TableFiles;
        public string RelayOutput = "";

        public void Seen(int queue, ulong id, string body, string where)
        {
            if (!body.StartsWith($"q{queue}-", StringComparison.Ordinal) || !SentSet.ContainsKey(body))
            {
                Failures.Add($"{where}: queue {queue} delivered a body never sent to it: '{Clip(body)}'");
                return;
            }
            lock (IdToBody)
            {
                if (IdToBody[queue].TryGetValue(id, out var before) && before != body)
                {
                    Failures.Add($"{where}: queue {queue} message id {id} was '{Clip(before)}' and is now '{Clip(body)}' (an id used twice)");
                }
                IdToBody[queue][id] = body;
            }
        }

        /// <summary>Bodies sent, answered or not.</summary>
        public readonly ConcurrentDictionary<string, bool> SentSet = new();

        /// <summary>Ids follow the order of the sends: sorted by id, each queue's bodies count up.</summary>
        public void CheckOrder()
        {
            for (int q = 0; q < PowerLossQueues; q++)
            {
                int last = -1;
                foreach (var (id, body) in IdToBody[q].OrderBy(p => p.Key))
                {
                    int n = Number(body);
                    if (n <= last)
                    {
                        Failures.Add($"queue {q}: message {id} holds number {n}, after number {last} at a lower id");
                    }
                    last = n;
                }
            }
        }

        public string Describe() =>
            $"seed {seed}, {(durable ? "fsync" : "relaxed")}: {Sent} sent, {AcknowledgedSet.Count} acknowledged, {AckSent.Count} ACKs sent, {AckedOk.Count} answered OK, " +
            $"{FinalDrain.Count} in the store at the end, {TableFiles} table files, {Errors} error answers; cycles (acknowledged/delivered/acked/bytes and name changes the power loss undid): " +
            string.Join(", ", Cycles.Select(c => $"{c.Acknowledged}/{c.Delivered}/{c.AckedOk}/{c.BytesLost}/{c.NamesLost}")) +
            (Failures.Count > 0 ? "; failures: " + string.Join("; ", Failures.Take(10)) : "") +
            "\nlast relay output:\n" + RelayOutput;

        private static string Clip(string body) => body.Length > 24 ? body[..24] + "…" : body;
    }

    private static int Number(string body)
    {
        int dash = body.IndexOf('-');
        int end = body.IndexOf('-', dash + 1);
        return int.Parse(body.AsSpan(dash + 1, end - dash - 1));
    }

    private static async Task<PowerLossRun> RunPowerLossesAsync(bool durable, int cycles, int seed, CancellationToken cancellationToken)
    {
        var binary = Binary();
        LossyMount.Require();
        var random = new Random(seed);
        var run = new PowerLossRun(seed, durable);
        var (root, backing, mountPoint) = NewLossyDirectories();
        string[] relayOptions = ["--durability", durable ? "fsync" : "relaxed", "--queue-max-bytes", "1GB"];
        try
        {
            var data = Path.Combine(mountPoint, "data");
            List<RecipientQueue> queues = [];
            var next = new int[PowerLossQueues];
            if (!durable)
            {
                // Without fsync a power loss takes new queues too: these are made before, in a relay
                // that stops cleanly (its store flushes everything on close).
                await using var mount = await LossyMount.MountAsync(backing, mountPoint);
                await using var relay = await RelayProcess.StartAsync(binary, data, relayOptions);
                await using (var connection = await RelayConnection.ConnectAsync(relay.Address, cancellationToken: cancellationToken))
                {
                    for (int q = 0; q < PowerLossQueues; q++)
                    {
                        queues.Add(await connection.CreateQueueAsync(cancellationToken: cancellationToken));
                    }
                }
                relay.Signal(Sigterm);
                await relay.WaitForExitAsync(TimeSpan.FromSeconds(30));
            }
            for (int cycle = 0; cycle < cycles; cycle++)
            {
                await using var mount = await LossyMount.MountAsync(backing, mountPoint);
                var stats = new PowerLossCycle();
                await using (var relay = await RelayProcess.StartAsync(binary, data, relayOptions))
                {
                    run.Fingerprints.Add(relay.Address.Fingerprint);
                    var sender = await RelayConnection.ConnectAsync(relay.Address, cancellationToken: cancellationToken);
                    var recipient = await RelayConnection.ConnectAsync(relay.Address, cancellationToken: cancellationToken);
                    try
                    {
                        if (queues.Count == 0)
                        {
                            for (int q = 0; q < PowerLossQueues; q++)
                            {
                                queues.Add(await recipient.CreateQueueAsync(cancellationToken: cancellationToken));
                            }
                        }
                        for (int q = 0; q < LiveQueues; q++)
                        {
                            await recipient.SubscribeAsync(queues[q], window: 16, cancellationToken);
                        }
                        // The power goes after a random number of acknowledged sends, with up to 32
                        // more SENDs and the recipient's ACKs in flight.
                        int cutAfter = random.Next(2_000, 8_000);
                        var cut = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
                        var receiving = ReceiveAsync(recipient, queues, run, stats, cycle);
                        var sending = SendAsync(sender, queues, next, run, stats, cutAfter, cut, random.Next());
                        await cut.Task.WaitAsync(TimeSpan.FromSeconds(120), cancellationToken);
                        relay.Kill();
                        await relay.WaitForExitAsync(TimeSpan.FromSeconds(10));
                        (stats.BytesLost, stats.NamesLost) = await mount.PowerOffAsync();
                        await Task.WhenAll(sending, receiving).WaitAsync(TimeSpan.FromSeconds(30), cancellationToken);
                        run.RelayOutput = relay.Output;
                    }
                    finally
                    {
                        await sender.DisposeAsync();
                        await recipient.DisposeAsync();
                    }
                }
                run.Cycles.Add(stats);
            }

            run.TableFiles = Directory.EnumerateFiles(Path.Combine(backing, "data", "queues"), "*.sst").Count();
            // The disk as the last power loss left it: every queue's messages, oldest first.
            await using (var mount = await LossyMount.MountAsync(backing, mountPoint))
            await using (var relay = await RelayProcess.StartAsync(binary, data, relayOptions))
            {
                run.Fingerprints.Add(relay.Address.Fingerprint);
                var drains = queues.Select(async (queue, q) =>
                {
                    await using var connection = await RelayConnection.ConnectAsync(relay.Address, cancellationToken: cancellationToken);
                    var found = new List<(ulong Id, string Body)>();
                    while (await connection.GetAsync(queue, cancellationToken) is { } d)
                    {
                        found.Add((d.MessageId, Encoding.UTF8.GetString(d.Body)));
                        await connection.AckAsync(queue, d.MessageId, cancellationToken);
                    }
                    return found;
                }).ToList();
                for (int q = 0; q < PowerLossQueues; q++)
                {
                    foreach (var (id, body) in await drains[q])
                    {
                        run.Seen(q, id, body, "after the last power loss");
                        if (!run.FinalDrain.TryAdd(body, id))
                        {
                            run.Failures.Add($"queue {q} holds '{body}' twice");
                        }
                    }
                }
                relay.Signal(Sigterm);
                await relay.WaitForExitAsync(TimeSpan.FromSeconds(30));
                run.RelayOutput = relay.Output;
            }
            run.CheckOrder();
            return run;
        }
        finally
        {
            TryDelete(root);
        }
    }

    /// <summary>Round-robin SENDs with at most 32 unanswered, until the connection goes.</summary>
    private static async Task SendAsync(RelayConnection connection, List<RecipientQueue> queues, int[] next, PowerLossRun run,
        PowerLossCycle stats, int cutAfter, TaskCompletionSource cut, int seed)
    {
        var random = new Random(seed);
        using var window = new SemaphoreSlim(32);
        var inFlight = new List<Task>();
        int q = 0;
        while (!connection.Closed.IsCancellationRequested)
        {
            if (!await window.WaitAsync(TimeSpan.FromSeconds(30)))
            {
                run.Failures.Add("32 SENDs unanswered for 30 s");
                cut.TrySetResult();
                break;
            }
            if (connection.Closed.IsCancellationRequested)
            {
                break;
            }
            q = (q + 1) % PowerLossQueues;
            // Bodies of 100 to 4,000 bytes: six cycles of at least 2,000 acknowledged sends fill the
            // store's 16 MiB memtable, which is flushed to a table file between power losses.
            var body = $"q{q}-{next[q]++:D6}-" + new string('x', random.Next(90, 3990));
            run.SentSet[body] = true;
            Interlocked.Increment(ref run.Sent);
            inFlight.Add(SendOnePowerLossAsync(connection, queues[q], body, run, stats, cutAfter, cut, window));
        }
        await Task.WhenAll(inFlight);
    }

    private static async Task SendOnePowerLossAsync(RelayConnection connection, RecipientQueue queue, string body, PowerLossRun run,
        PowerLossCycle stats, int cutAfter, TaskCompletionSource cut, SemaphoreSlim window)
    {
        try
        {
            await connection.SendAsync(new SenderQueue(queue.SenderId, null), Encoding.UTF8.GetBytes(body));
            run.AcknowledgedSet[body] = true;
            if (Interlocked.Increment(ref stats.Acknowledged) >= cutAfter)
            {
                cut.TrySetResult();
            }
        }
        catch (RelayConnectException)
        {
            // The relay went away before answering: not acknowledged.
        }
        catch (RelayErrorException e)
        {
            lock (run.Failures) run.Failures.Add($"SEND answered {e.Code}");
            Interlocked.Increment(ref run.Errors);
        }
        finally
        {
            window.Release();
        }
    }

    /// <summary>Takes each delivery of the subscribed queues and ACKs it (pipelined, in delivery order), until the connection goes.</summary>
    private static async Task ReceiveAsync(RelayConnection connection, List<RecipientQueue> queues, PowerLossRun run, PowerLossCycle stats, int cycle)
    {
        var lastId = new ulong[PowerLossQueues];
        var acks = new List<Task>();
        try
        {
            await foreach (var e in connection.Events.ReadAllAsync())
            {
                if (e is not DeliveryEvent { Delivery: var d, Queue: var queue })
                {
                    continue;
                }
                var body = Encoding.UTF8.GetString(d.Body);
                // The queue it came on, not the one its body names: Seen checks that they agree.
                int q = queues.FindIndex(x => x.RecipientId.AsSpan().SequenceEqual(queue.RecipientId));
                lock (run.Failures)
                {
                    if (d.MessageId <= lastId[q])
                    {
                        run.Failures.Add($"cycle {cycle}: queue {q} delivered message id {d.MessageId} after {lastId[q]}");
                    }
                    lastId[q] = d.MessageId;
                    run.Seen(q, d.MessageId, body, $"cycle {cycle}");
                    stats.Delivered++;
                }
                acks.Add(AckOneAsync(connection, queue, d.MessageId, body, run, stats, cycle));
            }
        }
        catch (Exception ex) when (ex is RelayConnectException or IOException or OperationCanceledException)
        {
            // The relay went away.
        }
        await Task.WhenAll(acks);
    }

    private static async Task AckOneAsync(RelayConnection connection, RecipientQueue queue, ulong id, string body, PowerLossRun run,
        PowerLossCycle stats, int cycle)
    {
        run.AckSent[body] = true;
        try
        {
            await connection.AckAsync(queue, id);
        }
        catch (RelayConnectException)
        {
            return;
        }
        catch (RelayErrorException ex)
        {
            lock (run.Failures) run.Failures.Add($"cycle {cycle}: ACK answered {ex.Code}");
            Interlocked.Increment(ref run.Errors);
            return;
        }
        lock (run.AckedOk)
        {
            run.AckedOk.Add(body);
            stats.AckedOk++;
        }
    }

    /// <summary>lossyfs mounted over a backing directory (PowerLoss/lossyfs.py).</summary>
    private sealed partial class LossyMount : IAsyncDisposable
    {
        private const string Python = "/usr/bin/python3";
        private readonly Process _process;
        private readonly string _mountPoint;
        private readonly StringBuilder _stderr = new();
        private bool _mounted = true;

        private LossyMount(Process process, string mountPoint)
        {
            _process = process;
            _mountPoint = mountPoint;
        }

        private static string Script => Path.Combine(AppContext.BaseDirectory, "PowerLoss", "lossyfs.py");

        [LibraryImport("libc", EntryPoint = "geteuid")]
        private static partial uint GetEuid();

        /// <summary>Root, /dev/fuse and python3-fusepy: missing, the test fails and says what to install.</summary>
        public static void Require()
        {
            if (GetEuid() != 0 || !File.Exists("/dev/fuse"))
            {
                throw new InvalidOperationException("power-loss tests mount a FUSE file system: run them as root on a machine with /dev/fuse");
            }
            var check = Process.Start(new ProcessStartInfo(Python, ["-c", "import fusepy"]) { RedirectStandardError = true });
            check?.WaitForExit();
            if (check is null || check.ExitCode != 0 || !File.Exists(Script))
            {
                throw new InvalidOperationException($"power-loss tests need {Python} with fusepy (apt-get install python3-fusepy fuse3) and {Script}");
            }
        }

        public static async Task<LossyMount> MountAsync(string backing, string mountPoint)
        {
            var psi = new ProcessStartInfo(Python) { RedirectStandardError = true, RedirectStandardOutput = true, UseShellExecute = false };
            psi.ArgumentList.Add(Script);
            psi.ArgumentList.Add(backing);
            psi.ArgumentList.Add(mountPoint);
            var process = Process.Start(psi) ?? throw new InvalidOperationException("cannot start lossyfs");
            var mount = new LossyMount(process, mountPoint);
            process.ErrorDataReceived += (_, e) => { if (e.Data != null) lock (mount._stderr) mount._stderr.AppendLine(e.Data); };
            process.OutputDataReceived += (_, _) => { };
            process.BeginErrorReadLine();
            process.BeginOutputReadLine();
            var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(15);
            while (!IsMounted(mountPoint))
            {
                if (process.HasExited || DateTime.UtcNow > deadline)
                {
                    await mount.DisposeAsync();
                    throw new InvalidOperationException("lossyfs did not mount:\n" + mount.Stderr);
                }
                await Task.Delay(20);
            }
            return mount;
        }

        private string Stderr { get { lock (_stderr) return _stderr.ToString(); } }

        private static bool IsMounted(string mountPoint) =>
            File.ReadLines("/proc/self/mountinfo").Any(l => l.Split(' ')[4] == mountPoint);

        /// <summary>
        /// The next fsync of a file whose name ends in .<paramref name="extension"/> ("log": RocksDB's
        /// write-ahead log, "sst": a table file) fails with EIO; see lossyfs.py.
        /// </summary>
        public void FailNextFsync(string extension)
        {
            try
            {
                Directory.CreateDirectory(Path.Combine(_mountPoint, ".fail-next-fsync-" + extension));
            }
            catch (IOException)
            {
                // EEXIST: done.
            }
            string taken = $"the next fsync of a .{extension} file fails";
            for (int i = 0; i < 50 && !Stderr.Contains(taken, StringComparison.Ordinal); i++)
            {
                Thread.Sleep(20);
            }
            if (!Stderr.Contains(taken, StringComparison.Ordinal))
            {
                throw new InvalidOperationException("lossyfs did not take the failure:\n" + Stderr);
            }
        }

        /// <summary>
        /// Cuts the power (every write since its file's last sync is undone, every name change since its
        /// directory's last sync) and unmounts; the bytes and name changes undone.
        /// </summary>
        public async Task<(long Bytes, int Names)> PowerOffAsync()
        {
            try
            {
                Directory.CreateDirectory(Path.Combine(_mountPoint, ".power-off"));
            }
            catch (IOException)
            {
                // The power went: the mkdir's own lookup fails.
            }
            await UnmountAsync();
            var line = Stderr.Split('\n').FirstOrDefault(l => l.StartsWith("lossyfs: power off:", StringComparison.Ordinal))
                ?? throw new InvalidOperationException("lossyfs did not cut the power:\n" + Stderr);
            // "lossyfs: power off: F files put back to their last sync, B bytes lost, N name changes undone"
            var match = System.Text.RegularExpressions.Regex.Match(line, @"(\d+) bytes lost, (\d+) name changes undone");
            if (!match.Success)
            {
                throw new InvalidOperationException("lossyfs said: " + line);
            }
            return (long.Parse(match.Groups[1].Value), int.Parse(match.Groups[2].Value));
        }

        private async Task UnmountAsync()
        {
            if (!_mounted) return;
            _mounted = false;
            using (var umount = Process.Start(new ProcessStartInfo("umount", [_mountPoint]) { RedirectStandardError = true }))
            {
                await umount!.WaitForExitAsync();
            }
            using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(10));
            try
            {
                await _process.WaitForExitAsync(cts.Token);
            }
            catch (OperationCanceledException)
            {
                _process.Kill();
                using (var lazy = Process.Start(new ProcessStartInfo("umount", ["-l", _mountPoint]) { RedirectStandardError = true }))
                {
                    await lazy!.WaitForExitAsync();
                }
                await _process.WaitForExitAsync();
            }
        }

        public async ValueTask DisposeAsync()
        {
            if (_mounted && IsMounted(_mountPoint))
            {
                await UnmountAsync();
            }
            if (!_process.HasExited)
            {
                _process.Kill();
                await _process.WaitForExitAsync();
            }
            _process.Dispose();
        }
    }
}
