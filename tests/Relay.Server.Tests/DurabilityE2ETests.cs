using System.Collections.Concurrent;
using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.RegularExpressions;
using Relay.Client.Transport;
using Relay.Protocol;

namespace Relay.Server.Tests;

/// <summary>
/// Durability against the published binary (env RELAY_BINARY): every message the relay acknowledged
/// survives SIGKILL right after the acknowledgements, and a SIGTERM while sends are in flight.
/// Without RELAY_BINARY these tests are reported skipped (never silently passed).
/// .ci/run: <c>RELAY_BINARY=$RELAY dotnet test --project tests/Relay.Server.Tests -- --treenode-filter '/*/*/*E2E*/*'</c>.
/// </summary>
public partial class DurabilityE2ETests
{
    private const int Queues = 8;

    private static string Binary()
    {
        var binary = Environment.GetEnvironmentVariable("RELAY_BINARY");
        Skip.When(string.IsNullOrEmpty(binary), "RELAY_BINARY is not set: these tests run against the published relay binary (see .ci/run)");
        if (!File.Exists(binary))
        {
            throw new FileNotFoundException($"RELAY_BINARY={binary} does not exist");
        }
        return Path.GetFullPath(binary!);
    }

    [Test]
    [Timeout(180_000)]
    public async Task Acknowledged_messages_survive_sigkill_right_after_the_acknowledgements_twice_in_a_row(CancellationToken cancellationToken)
    {
        var binary = Binary();
        var data = NewDataDirectory();
        try
        {
            const int N = 2_000;
            List<RecipientQueue> queues = [];
            var expected = new List<string>[Queues];
            for (int q = 0; q < Queues; q++)
            {
                expected[q] = [];
            }
            // The second run starts by replaying the first one's log into memory without writing it to
            // table files, and is killed before anything is flushed: both runs' messages must be there.
            for (int run = 0; run < 2; run++)
            {
                await using var relay = await RelayProcess.StartAsync(binary, data);
                await using var connection = await RelayConnection.ConnectAsync(relay.Address, cancellationToken: cancellationToken);
                if (run == 0)
                {
                    for (int q = 0; q < Queues; q++)
                    {
                        queues.Add(await connection.CreateQueueAsync(cancellationToken: cancellationToken));
                    }
                }
                // Pipelined: every SEND is written before any OK is awaited.
                var sends = new List<Task>(N);
                for (int i = 0; i < N; i++)
                {
                    int q = i % Queues;
                    var body = $"q{q}-{expected[q].Count:D5}";
                    expected[q].Add(body);
                    sends.Add(connection.SendAsync(new SenderQueue(queues[q].SenderId, null), Encoding.UTF8.GetBytes(body), cancellationToken: cancellationToken));
                }
                await Task.WhenAll(sends);

                // Every OK is in: kill at once, no chance to flush anything more.
                relay.Kill();
                await relay.WaitForExitAsync(TimeSpan.FromSeconds(10));
                await Assert.That(relay.ExitedBySignal).IsTrue();
            }

            await using (var relay = await RelayProcess.StartAsync(binary, data))
            {
                await using var connection = await RelayConnection.ConnectAsync(relay.Address, cancellationToken: cancellationToken);
                for (int q = 0; q < Queues; q++)
                {
                    var received = await DrainAsync(connection, queues[q], cancellationToken);
                    await Assert.That(received).IsEquivalentTo(expected[q]).Because($"queue {q} after two SIGKILLs");
                }
            }
        }
        finally
        {
            TryDelete(data);
        }
    }

    [Test]
    [Timeout(180_000)]
    public async Task Sigterm_while_sends_are_in_flight_exits_0_and_keeps_every_acknowledged_message(CancellationToken cancellationToken)
    {
        var binary = Binary();
        var data = NewDataDirectory();
        try
        {
            List<RecipientQueue> queues = [];
            var acknowledged = new ConcurrentDictionary<string, bool>();
            int sent = 0;
            await using (var relay = await RelayProcess.StartAsync(binary, data))
            {
                await using var connection = await RelayConnection.ConnectAsync(relay.Address, cancellationToken: cancellationToken);
                for (int q = 0; q < Queues; q++)
                {
                    queues.Add(await connection.CreateQueueAsync(cancellationToken: cancellationToken));
                }

                // Keep up to 256 SENDs in flight until the relay goes away.
                using var window = new SemaphoreSlim(256);
                var next = new int[Queues];
                var inFlight = new List<Task>();
                var signalled = false;
                var watch = Stopwatch.StartNew();
                while (!connection.Closed.IsCancellationRequested && sent < 50_000 && watch.Elapsed < TimeSpan.FromSeconds(60))
                {
                    if (!await window.WaitAsync(TimeSpan.FromSeconds(20), cancellationToken)) break;
                    int q = sent % Queues;
                    var body = $"q{q}-{next[q]++:D5}";
                    sent++;
                    inFlight.Add(SendOneAsync(connection, queues[q], body, acknowledged, window));
                    if (!signalled && acknowledged.Count >= 500)
                    {
                        signalled = true;
                        relay.Signal(Sigterm);
                    }
                }
                await Assert.That(signalled).IsTrue();
                await Task.WhenAll(inFlight);

                var exit = await relay.WaitForExitAsync(TimeSpan.FromSeconds(15));
                await Assert.That(exit).IsEqualTo(0).Because(relay.Output);
            }
            await Assert.That(acknowledged.Count).IsGreaterThanOrEqualTo(500);

            await using (var relay = await RelayProcess.StartAsync(binary, data))
            {
                await using var connection = await RelayConnection.ConnectAsync(relay.Address, cancellationToken: cancellationToken);
                var delivered = new HashSet<string>();
                for (int q = 0; q < Queues; q++)
                {
                    var received = await DrainAsync(connection, queues[q], cancellationToken);
                    // In order, each at most once; a message that got no OK may or may not be there.
                    var numbers = received.Select(b => int.Parse(b.AsSpan(b.IndexOf('-') + 1))).ToList();
                    await Assert.That(numbers).IsEquivalentTo(numbers.Order().Distinct().ToList(), TUnit.Assertions.Enums.CollectionOrdering.Matching).Because($"queue {q} in order, once each");
                    await Assert.That(received.All(b => b.StartsWith($"q{q}-", StringComparison.Ordinal))).IsTrue();
                    delivered.UnionWith(received);
                }
                var lost = acknowledged.Keys.Where(k => !delivered.Contains(k)).Order().Take(10).ToList();
                await Assert.That(lost).IsEmpty().Because($"{acknowledged.Count} acknowledged of {sent} sent");
            }
        }
        finally
        {
            TryDelete(data);
        }
    }

    private static async Task SendOneAsync(RelayConnection connection, RecipientQueue queue, string body,
        ConcurrentDictionary<string, bool> acknowledged, SemaphoreSlim window)
    {
        try
        {
            await connection.SendAsync(new SenderQueue(queue.SenderId, null), Encoding.UTF8.GetBytes(body));
            acknowledged[body] = true;
        }
        catch (RelayConnectException)
        {
            // The relay went away before answering: not acknowledged.
        }
        finally
        {
            window.Release();
        }
    }

    /// <summary>Every stored message of the queue, oldest first, each ACKed after it is read (GET until EMPTY).</summary>
    private static async Task<List<string>> DrainAsync(RelayConnection connection, RecipientQueue queue, CancellationToken cancellationToken)
    {
        var received = new List<string>();
        ulong last = 0;
        while (await connection.GetAsync(queue, cancellationToken) is { } d)
        {
            if (d.MessageId <= last)
            {
                throw new InvalidOperationException($"message id {d.MessageId} after {last}");
            }
            last = d.MessageId;
            received.Add(Encoding.UTF8.GetString(d.Body));
            await connection.AckAsync(queue, d.MessageId, cancellationToken);
        }
        return received;
    }

    private static string NewDataDirectory() => Path.Combine(Path.GetTempPath(), "relay-e2e-" + Guid.NewGuid().ToString("N"));

    private static void TryDelete(string dir)
    {
        try { Directory.Delete(dir, recursive: true); } catch (IOException) { } catch (UnauthorizedAccessException) { }
    }

    private const int Sigterm = 15;

    [LibraryImport("libc", EntryPoint = "kill", SetLastError = true)]
    private static partial int SysKill(int pid, int signal);

    /// <summary>The relay binary as a child process: <c>relay serve --data --listen --admin</c>, ready when /readyz answers 200.</summary>
    private sealed partial class RelayProcess : IAsyncDisposable
    {
        private readonly Process _process;
        private readonly StringBuilder _output = new();
        public RelayAddress Address { get; private set; } = null!;
        public string Output { get { lock (_output) return _output.ToString(); } }
        public bool ExitedBySignal => _process.HasExited && _process.ExitCode >= 128;

        private RelayProcess(Process process)
        {
            _process = process;
        }

        [GeneratedRegex(@"Relay ready at (relay://\S+)")]
        private static partial Regex ReadyLine();

        public static async Task<RelayProcess> StartAsync(string binary, string data, params string[] extra) => await StartAsync(binary, data, 0, extra);

        /// <summary>As above, on relay port <paramref name="fixedPort"/> (0: a free one).</summary>
        public static async Task<RelayProcess> StartAsync(string binary, string data, int fixedPort, string[] extra)
        {
            for (int attempt = 0; ; attempt++)
            {
                int port = fixedPort != 0 ? fixedPort : FreePort(), admin = FreePort();
                var psi = new ProcessStartInfo(binary)
                {
                    RedirectStandardOutput = true,
                    RedirectStandardError = true,
                    UseShellExecute = false,
                };
                foreach (var a in new[] { "serve", "--data", data, "--listen", $"127.0.0.1:{port}", "--admin", $"127.0.0.1:{admin}",
                                          "--queue-max-messages", "100000", "--log-format", "text" }.Concat(extra))
                {
                    psi.ArgumentList.Add(a);
                }
                var process = Process.Start(psi) ?? throw new InvalidOperationException("cannot start " + binary);
                var relay = new RelayProcess(process);
                process.OutputDataReceived += (_, e) => relay.Append(e.Data);
                process.ErrorDataReceived += (_, e) => relay.Append(e.Data);
                process.BeginOutputReadLine();
                process.BeginErrorReadLine();
                if (await relay.WaitReadyAsync(admin, TimeSpan.FromSeconds(30)))
                {
                    var match = ReadyLine().Match(relay.Output);
                    if (!match.Success)
                    {
                        await relay.DisposeAsync();
                        throw new InvalidOperationException("ready, but no 'Relay ready at' line:\n" + relay.Output);
                    }
                    relay.Address = RelayAddress.Parse(match.Groups[1].Value);
                    return relay;
                }
                var output = relay.Output;
                await relay.DisposeAsync();
                if (attempt >= 3)
                {
                    throw new InvalidOperationException("the relay did not become ready:\n" + output);
                }
            }
        }

        private void Append(string? line)
        {
            if (line is null) return;
            lock (_output) _output.AppendLine(line);
        }

        private async Task<bool> WaitReadyAsync(int admin, TimeSpan timeout)
        {
            using var http = new HttpClient { Timeout = TimeSpan.FromSeconds(2) };
            var deadline = DateTime.UtcNow + timeout;
            while (DateTime.UtcNow < deadline && !_process.HasExited)
            {
                try
                {
                    using var response = await http.GetAsync($"http://127.0.0.1:{admin}/readyz");
                    if (response.StatusCode == HttpStatusCode.OK)
                    {
                        // The ready line is logged right before readiness; give the reader a moment.
                        for (int i = 0; i < 50 && !ReadyLine().IsMatch(Output); i++) await Task.Delay(20);
                        return true;
                    }
                }
                catch (HttpRequestException) { }
                catch (TaskCanceledException) { }
                await Task.Delay(50);
            }
            return false;
        }

        public static int FreePort() => TestPorts.Free();

        /// <summary>SIGKILL.</summary>
        public void Kill() => _process.Kill();

        public void Signal(int signal)
        {
            if (SysKill(_process.Id, signal) != 0)
            {
                throw new InvalidOperationException($"kill({_process.Id}, {signal}) failed: errno {Marshal.GetLastPInvokeError()}");
            }
        }

        /// <summary>The exit code, or throws when the process is still running after <paramref name="timeout"/>.</summary>
        public async Task<int> WaitForExitAsync(TimeSpan timeout)
        {
            using var cts = new CancellationTokenSource(timeout);
            try
            {
                await _process.WaitForExitAsync(cts.Token);
            }
            catch (OperationCanceledException)
            {
                throw new TimeoutException($"the relay did not exit within {timeout}:\n{Output}");
            }
            return _process.ExitCode;
        }

        public async ValueTask DisposeAsync()
        {
            if (!_process.HasExited)
            {
                try { _process.Kill(); } catch (InvalidOperationException) { }
                await _process.WaitForExitAsync();
            }
            _process.Dispose();
        }
    }
}
