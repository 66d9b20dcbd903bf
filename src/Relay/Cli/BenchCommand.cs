using System.Globalization;
using System.Net;
using System.Text;
using System.Text.Json;
using Microsoft.Extensions.Logging;
using Relay.Bench;
using Relay.Protocol;
using Relay.Server;
using Relay.Server.Hosting;

namespace Relay.Cli;

/// <summary><c>relay bench</c>: the load generator; without ADDRESS it measures an in-process relay on a temporary directory.</summary>
public static class BenchCommand
{
    public static async Task<int> RunAsync(string[] args)
    {
        var a = CliArgs.Parse("bench", args,
            new HashSet<string> { "queues", "producers", "consumers", "size", "messages", "window", "delivery-window", "ack", "scenario", "rate", "duration", "warmup", "socks", "durability", "relay-pid" },
            new HashSet<string> { "json", "plain-tcp" }, 1);
        if (a.Help)
        {
            Console.Out.Write(RelayCli.CommandHelp(
                "relay bench [ADDRESS] [--queues Q] [--producers P] [--consumers C] [--size BYTES] [--messages N]\n" +
                "                   [--window W] [--delivery-window D] [--ack each|through] [--scenario live|drain|paced] [--rate R] [--duration S]\n" +
                "                   [--warmup S] [--json]",
                "Measures a relay: messages per second, send-to-receive latency, lost and duplicated messages.\n" +
                "Without ADDRESS it starts a relay in this process on a temporary directory (TLS, fsync per acknowledged write).",
                [
                    ("--queues Q", "queues (default 100)"),
                    ("--producers P", "producer connections (default 4)"),
                    ("--consumers C", "consumer connections (default 4)"),
                    ("--size BYTES", "message body size (default 256)"),
                    ("--messages N", "messages for live and drain (default 200000)"),
                    ("--window W", "unacknowledged sends per producer (default 256; paced: the pacer waits while a producer has W out)"),
                    ("--delivery-window D", $"messages each subscription may have outstanding before its ACK (SUB's window; default 32 as in the SDK, at most {ProtocolConstants.MaxDeliveryWindow})"),
                    ("--ack MODE", "through: one ACK covers every delivery a consumer has read so far (default); each: one ACK per message"),
                    ("--scenario S", "live: consumers subscribed; drain: send N, then subscribe and drain; paced: fixed rate, each message sent at its due time (default live)"),
                    ("--rate R", "paced: total messages per second (default 5000)"),
                    ("--duration S", "paced: seconds measured (default 10)"),
                    ("--warmup S", "paced: seconds sent at the rate before the measured ones, checked for loss but left out of latency and CPU (default 1; 0 for none)"),
                    ("--durability MODE", "in-process relay: fsync (default) or relaxed"),
                    ("--relay-pid PID", "with ADDRESS: also report that process's CPU and context switches per message (/proc)"),
                    ("--json", "print one JSON object as the last line of stdout"),
                    ("--socks HOST:PORT", "reach the relay through this SOCKS5 proxy"),
                    ("--plain-tcp", "plain TCP instead of TLS"),
                ]));
            return RelayCli.Ok;
        }
        var options = new BenchOptions
        {
            Queues = a.GetInt("queues", 100, 1, 1_000_000),
            Producers = a.GetInt("producers", 4, 1, 10_000),
            Consumers = a.GetInt("consumers", 4, 1, 10_000),
            Size = a.GetInt("size", 256, 16, 65_000),
            Messages = a.GetInt("messages", 200_000, 1, 100_000_000),
            Window = a.GetInt("window", 256, 1, 100_000),
            DeliveryWindow = a.GetInt("delivery-window", 32, 1, ProtocolConstants.MaxDeliveryWindow),
            Rate = a.GetInt("rate", 5_000, 1, 10_000_000),
            Duration = TimeSpan.FromSeconds(a.GetInt("duration", 10, 1, 86_400)),
            Warmup = TimeSpan.FromSeconds(a.GetInt("warmup", 1, 0, 3_600)),
            Socks = a.Get("socks") is { } socks ? ClientCommands.CheckSocks(socks) : null,
            Tls = !a.Switch("plain-tcp"),
            RelayPid = a.TryGet("relay-pid", out _) ? a.GetInt("relay-pid", 0, 1, int.MaxValue) : null,
            AckThrough = (a.Get("ack") ?? "through") switch
            {
                "through" => true,
                "each" => false,
                var m => throw new UsageException($"--ack must be each or through, got '{m}'"),
            },
            Scenario = (a.Get("scenario") ?? "live") switch
            {
                "live" => BenchScenario.Live,
                "drain" => BenchScenario.Drain,
                "paced" => BenchScenario.Paced,
                var s => throw new UsageException($"--scenario must be live, drain or paced, got '{s}'"),
            },
        };
        bool durable = (a.Get("durability") ?? "fsync") switch
        {
            "fsync" => true,
            "relaxed" => false,
            var d => throw new UsageException($"--durability must be fsync or relaxed, got '{d}'"),
        };
        bool json = a.Switch("json");

        RelayServer? local = null;
        var commits = new CommitRecorder();
        string? directory = null;
        RelayAddress address;
        if (a.Positional.Count > 0)
        {
            if (!RelayAddress.TryParse(a.Positional[0], out var parsed, out var error)) throw new UsageException($"ADDRESS: {error}");
            address = parsed;
        }
        else
        {
            directory = Path.Combine(Path.GetTempPath(), "relay-bench-" + Guid.NewGuid().ToString("N"));
            int perQueue = options.Scenario == BenchScenario.Drain
                ? (options.Messages + options.Queues - 1) / options.Queues + 1
                : options.Producers * options.Window + 128;
            local = await RelayServer.StartAsync(new RelayServerOptions
            {
                DataDirectory = directory,
                Listen = new IPEndPoint(IPAddress.Loopback, 0),
                Admin = null,
                Tls = options.Tls,
                Durable = durable,
                QueueMaxMessages = Math.Max(128, perQueue),
                QueueMaxBytes = Math.Max(8L << 20, (long)Math.Max(128, perQueue) * (options.Size + 64)),
                MaxInFlightPerConnection = Math.Max(1024, options.Window * 2),
                MaxInFlightBytesPerConnection = (int)Math.Min(int.MaxValue, Math.Max(1L << 20, 2L * options.Window * options.Size)),
                // Every bench connection comes from loopback: the per-source limits would cap the load.
                MaxConnectionsPerSource = 0,
                // The bench's own connections and a margin: no open files limit to raise for 20,000.
                MaxConnections = options.Producers + options.Consumers + 64,
                QueueCreationRate = 0,
                KeyAgreementRate = 0,
            }, logging => logging.SetMinimumLevel(LogLevel.Warning).AddSimpleConsole(o => o.SingleLine = true));
            address = local.Address;
            local.Store.Committed += commits.Record;
            options.RelayPid = null;
        }

        try
        {
            Console.Error.WriteLine($"bench: {options.Scenario.ToString().ToLowerInvariant()}, {options.Queues} queues, {options.Producers} producers, " +
                $"{options.Consumers} consumers, {options.Size}-byte messages, window {options.Window}, delivery window {options.DeliveryWindow}, ack {(options.AckThrough ? "through" : "each")}, " +
                (local != null ? $"in-process relay ({(options.Tls ? "TLS" : "plain TCP")}, {(durable ? "fsync" : "relaxed")})" : address.ToString()));
            var result = await new LoadGenerator(address, options, Console.Error).RunAsync(CancellationToken.None);
            result = result with { LocalRelay = local != null, Commits = local != null ? commits.Summarize() : null };
            Print(result);
            if (json) Console.Out.WriteLine(ToJson(result));
            return result.Lost == 0 && result.Duplicated == 0 ? RelayCli.Ok : RelayCli.Failed;
        }
        catch (Exception ex) when (ex is Relay.Client.Transport.RelayConnectException or Relay.Client.Transport.RelayErrorException or BenchException)
        {
            Console.Error.WriteLine($"relay: bench failed: {ex.Message}");
            return RelayCli.Failed;
        }
        finally
        {
            if (local != null)
            {
                await local.StopAsync();
                try { Directory.Delete(directory!, recursive: true); } catch (IOException) { }
            }
        }
    }

    private static void Print(BenchResult r)
    {
        var c = CultureInfo.InvariantCulture;
        Console.Out.WriteLine(r.WarmupMessages > 0
            ? string.Format(c, "{0}: {1:N0} messages, {2:N0} of them after the warm-up, in {3:0.00} s = {4:N0} msg/s", r.Scenario, r.Received, r.MeasuredMessages, r.Seconds, r.MessagesPerSecond)
            : string.Format(c, "{0}: {1:N0} messages in {2:0.00} s = {3:N0} msg/s", r.Scenario, r.Received, r.Seconds, r.MessagesPerSecond));
        Console.Out.WriteLine(string.Format(c, "latency send->receive: p50 {0:0.000} ms, p99 {1:0.000} ms, p99.9 {2:0.000} ms, max {3:0.000} ms", r.P50Ms, r.P99Ms, r.P999Ms, r.MaxMs));
        Console.Out.WriteLine(string.Format(c, "lost {0}, duplicated {1}, quota retries {2}, ACKs sent {3}", r.Lost, r.Duplicated, r.QuotaRetries, r.Acks));
        if (r.WarmupMessages > 0)
        {
            Console.Out.WriteLine(string.Format(c, "warm-up: the first {0:N0} messages are in the counts above and not in latency, rate or CPU", r.WarmupMessages));
        }
        if (r.PacerLagP99Ms is { } lag)
        {
            Console.Out.WriteLine(string.Format(c, "pacer: p99 {0:0.000} ms after the due time (latency is measured from each actual send)", lag));
        }
        Console.Out.WriteLine(string.Format(c, "CPU per message: {0:0.00} us in this process{1}{2}", r.ProcessCpuUsPerMessage,
            r.LocalRelay ? " (relay and load generator together)" : "",
            r.RelayCpuUsPerMessage is { } rc ? string.Format(c, "; relay process {0:0.00} us", rc) : ""));
        if (r.RelaySwitchesPerMessage is { } sw)
        {
            Console.Out.WriteLine(string.Format(c, "relay context switches per message: {0:0.00} ({1:0.00} waits woken, {2:0.00} preemptions)",
                sw.Waits + sw.Preemptions, sw.Waits, sw.Preemptions));
        }
        Console.Out.WriteLine(string.Format(c, "garbage collections in this process: {0} ({1:0.0} ms of pauses)", r.GeneratorCollections, r.GeneratorGcPauseMs));
        if (r.Commits is { } k)
        {
            Console.Out.WriteLine(string.Format(c, "group commits of the relay (whole run): {0:N0}, {1:0.0} operations each; write and fsync p50 {2:0.000} ms, p99 {3:0.000} ms, max {4:0.000} ms",
                k.Commits, k.OperationsPerCommit, k.P50Ms, k.P99Ms, k.MaxMs));
        }
    }

    private static string ToJson(BenchResult r)
    {
        using var stream = new MemoryStream();
        using (var w = new Utf8JsonWriter(stream))
        {
            w.WriteStartObject();
            w.WriteString("scenario", r.Scenario);
            w.WriteNumber("messages", r.Received);
            w.WriteNumber("sent", r.Sent);
            w.WriteNumber("seconds", Math.Round(r.Seconds, 3));
            w.WriteNumber("messages_per_second", Math.Round(r.MessagesPerSecond, 1));
            w.WriteNumber("p50_ms", Math.Round(r.P50Ms, 3));
            w.WriteNumber("p99_ms", Math.Round(r.P99Ms, 3));
            w.WriteNumber("p999_ms", Math.Round(r.P999Ms, 3));
            w.WriteNumber("max_ms", Math.Round(r.MaxMs, 3));
            w.WriteNumber("lost", r.Lost);
            w.WriteNumber("duplicated", r.Duplicated);
            w.WriteNumber("quota_retries", r.QuotaRetries);
            w.WriteNumber("acks", r.Acks);
            w.WriteNumber("warmup_messages", r.WarmupMessages);
            w.WriteNumber("measured_messages", r.MeasuredMessages);
            w.WriteNumber("process_cpu_us_per_message", Math.Round(r.ProcessCpuUsPerMessage, 2));
            if (r.RelayCpuUsPerMessage is { } rc) w.WriteNumber("relay_cpu_us_per_message", Math.Round(rc, 2));
            if (r.RelaySwitchesPerMessage is { } sw)
            {
                w.WriteNumber("relay_waits_per_message", Math.Round(sw.Waits, 3));
                w.WriteNumber("relay_preemptions_per_message", Math.Round(sw.Preemptions, 3));
            }
            w.WriteNumber("generator_gc_collections", r.GeneratorCollections);
            w.WriteNumber("generator_gc_pause_ms", Math.Round(r.GeneratorGcPauseMs, 1));
            if (r.PacerLagP99Ms is { } lag) w.WriteNumber("pacer_lag_p99_ms", Math.Round(lag, 3));
            w.WriteBoolean("local_relay", r.LocalRelay);
            if (r.Commits is { } k)
            {
                w.WriteNumber("commits", k.Commits);
                w.WriteNumber("operations_per_commit", Math.Round(k.OperationsPerCommit, 2));
                w.WriteNumber("commit_p50_ms", Math.Round(k.P50Ms, 3));
                w.WriteNumber("commit_p99_ms", Math.Round(k.P99Ms, 3));
                w.WriteNumber("commit_max_ms", Math.Round(k.MaxMs, 3));
            }
            w.WriteEndObject();
        }
        return Encoding.UTF8.GetString(stream.ToArray());
    }
}
