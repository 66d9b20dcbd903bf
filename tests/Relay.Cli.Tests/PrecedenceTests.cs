using System.Net;

namespace Relay.Cli.Tests;

/// <summary>Defaults &lt; JSON file (--config or RELAY_CONFIG) &lt; RELAY_* environment &lt; flags, option by option.</summary>
public class PrecedenceTests
{
    private static ServeSettings Bind(string[] flags, Dictionary<string, string?> env) =>
        ServeSettings.Bind(CliArgs.Parse("serve", flags, ServeSettings.ValueOptionNames, ServeSettings.SwitchNames, 0), env);

    private const string Json = """
        {
          // comments and trailing commas are allowed
          "listen": "127.0.0.1:1111",
          "plainTcp": true,
          "newQueues": "off",
          "messageTtl": "2d",
          "idleQueueTtl": "72h",
          "queueMaxMessages": 10,
          "diskBudget": "2GiB",
          "durability": "relaxed",
          "adminToken": "json-token-0123456789",
          "shutdownTimeout": "3s",
          "host": ["a.example", "b.onion"],
        }
        """;

    [Test]
    public async Task Defaults_apply_without_any_source()
    {
        var s = Bind([], []);
        await Assert.That(s.Server.Listen).IsEqualTo(new IPEndPoint(IPAddress.Any, 5223));
        await Assert.That(s.Server.Admin).IsEqualTo(new IPEndPoint(IPAddress.Loopback, 5280));
        await Assert.That(s.Server.Tls).IsTrue();
        await Assert.That(s.Server.AllowNewQueues).IsTrue();
        await Assert.That(s.Server.MessageTtl).IsEqualTo(TimeSpan.FromDays(21));
        await Assert.That(s.Server.Durable).IsTrue();
        await Assert.That(s.Server.AdminToken).IsNull();
        await Assert.That(s.Server.ShutdownTimeout).IsEqualTo(TimeSpan.FromSeconds(10));
        await Assert.That(s.LogFormat).IsEqualTo("text");
    }

    [Test]
    public async Task The_in_flight_memory_budget_is_set_by_flag_environment_or_file_and_zero_turns_it_off()
    {
        await Assert.That(Bind([], []).Server.InFlightMemoryBudget).IsEqualTo(256L << 20);
        await Assert.That(Bind(["--inflight-memory", "64MiB"], []).Server.InFlightMemoryBudget).IsEqualTo(64L << 20);
        await Assert.That(Bind([], new() { ["RELAY_INFLIGHT_MEMORY"] = "0" }).Server.InFlightMemoryBudget).IsEqualTo(0);
        using var files = new SettingsFiles();
        var path = files.Write("relay.json", """{ "inflightMemory": "1GiB" }""");
        await Assert.That(Bind(["--config", path], []).Server.InFlightMemoryBudget).IsEqualTo(1L << 30);
    }

    [Test]
    public async Task The_key_memory_budget_is_set_by_flag_environment_or_file_and_zero_turns_it_off()
    {
        await Assert.That(Bind([], []).Server.KeyMemoryBudget).IsEqualTo(256L << 20);
        await Assert.That(Bind(["--key-memory", "32MiB"], []).Server.KeyMemoryBudget).IsEqualTo(32L << 20);
        await Assert.That(Bind([], new() { ["RELAY_KEY_MEMORY"] = "0" }).Server.KeyMemoryBudget).IsEqualTo(0);
        using var files = new SettingsFiles();
        var path = files.Write("relay.json", """{ "keyMemory": "1GiB" }""");
        await Assert.That(Bind(["--config", path], []).Server.KeyMemoryBudget).IsEqualTo(1L << 30);
    }

    [Test]
    public async Task Relay_serve_collects_when_quiet_unless_turned_off_by_flag_environment_or_file()
    {
        await Assert.That(new Relay.Server.RelayServerOptions().CollectWhenQuiet).IsFalse();  // a relay hosted in an app
        await Assert.That(Bind([], []).Server.CollectWhenQuiet).IsTrue();
        await Assert.That(Bind(["--collect-when-quiet", "off"], []).Server.CollectWhenQuiet).IsFalse();
        await Assert.That(Bind([], new() { ["RELAY_COLLECT_WHEN_QUIET"] = "off" }).Server.CollectWhenQuiet).IsFalse();
        using var files = new SettingsFiles();
        var path = files.Write("relay.json", """{ "collectWhenQuiet": false }""");
        await Assert.That(Bind(["--config", path], []).Server.CollectWhenQuiet).IsFalse();
    }

    [Test]
    public async Task Json_file_sets_every_kind_of_value()
    {
        using var files = new SettingsFiles();
        var path = files.Write("relay.json", Json);
        var s = Bind(["--config", path], []);
        await Assert.That(s.Server.Listen).IsEqualTo(new IPEndPoint(IPAddress.Loopback, 1111));
        await Assert.That(s.Server.Tls).IsFalse();
        await Assert.That(s.Server.AllowNewQueues).IsFalse();
        await Assert.That(s.Server.MessageTtl).IsEqualTo(TimeSpan.FromDays(2));
        await Assert.That(s.Server.IdleQueueTtl).IsEqualTo(TimeSpan.FromHours(72));
        await Assert.That(s.Server.QueueMaxMessages).IsEqualTo(10);
        await Assert.That(s.Server.DiskBudgetBytes).IsEqualTo(2L << 30);
        await Assert.That(s.Server.Durable).IsFalse();
        await Assert.That(s.Server.AdminToken).IsEqualTo("json-token-0123456789");
        await Assert.That(s.Server.ShutdownTimeout).IsEqualTo(TimeSpan.FromSeconds(3));
        await Assert.That(s.Server.PublicHosts.SequenceEqual(["a.example", "b.onion"])).IsTrue();
    }

    [Test]
    public async Task Environment_overrides_the_file_and_flags_override_the_environment()
    {
        using var files = new SettingsFiles();
        var path = files.Write("relay.json", Json);
        var env = new Dictionary<string, string?>
        {
            ["RELAY_LISTEN"] = "127.0.0.1:2222",
            ["RELAY_PLAIN_TCP"] = "false",
            ["RELAY_NEW_QUEUES"] = "on",
            ["RELAY_MESSAGE_TTL"] = "36h",
            ["RELAY_DURABILITY"] = "fsync",
            ["RELAY_ADMIN_TOKEN"] = "env-token-0123456789",
            ["RELAY_SHUTDOWN_TIMEOUT"] = "4s",
        };

        var fromEnv = Bind(["--config", path], env);
        await Assert.That(fromEnv.Server.Listen.Port).IsEqualTo(2222);
        await Assert.That(fromEnv.Server.Tls).IsTrue();
        await Assert.That(fromEnv.Server.AllowNewQueues).IsTrue();
        await Assert.That(fromEnv.Server.MessageTtl).IsEqualTo(TimeSpan.FromHours(36));
        await Assert.That(fromEnv.Server.Durable).IsTrue();
        await Assert.That(fromEnv.Server.AdminToken).IsEqualTo("env-token-0123456789");
        await Assert.That(fromEnv.Server.ShutdownTimeout).IsEqualTo(TimeSpan.FromSeconds(4));
        // Options set by the file only keep the file's value.
        await Assert.That(fromEnv.Server.QueueMaxMessages).IsEqualTo(10);

        var fromFlags = Bind(["--config", path, "--listen", "127.0.0.1:3333", "--plain-tcp", "--new-queues", "off",
            "--message-ttl=48h", "--durability", "relaxed", "--admin-token", "flag-token-0123456789", "--shutdown-timeout", "5s"], env);
        await Assert.That(fromFlags.Server.Listen.Port).IsEqualTo(3333);
        await Assert.That(fromFlags.Server.Tls).IsFalse();
        await Assert.That(fromFlags.Server.AllowNewQueues).IsFalse();
        await Assert.That(fromFlags.Server.MessageTtl).IsEqualTo(TimeSpan.FromHours(48));
        await Assert.That(fromFlags.Server.Durable).IsFalse();
        await Assert.That(fromFlags.Server.AdminToken).IsEqualTo("flag-token-0123456789");
        await Assert.That(fromFlags.Server.ShutdownTimeout).IsEqualTo(TimeSpan.FromSeconds(5));
    }

    [Test]
    public async Task A_switch_flag_set_to_false_overrides_a_true_from_the_environment()
    {
        var s = Bind(["--plain-tcp=false"], new() { ["RELAY_PLAIN_TCP"] = "true" });
        await Assert.That(s.Server.Tls).IsTrue();
    }

    [Test]
    public async Task RELAY_CONFIG_names_the_file_and_config_flag_wins_over_it()
    {
        using var files = new SettingsFiles();
        var a = files.Write("a.json", """{"listen": "127.0.0.1:1001"}""");
        var b = files.Write("b.json", """{"listen": "127.0.0.1:1002"}""");
        await Assert.That(Bind([], new() { ["RELAY_CONFIG"] = a }).Server.Listen.Port).IsEqualTo(1001);
        await Assert.That(Bind(["--config", b], new() { ["RELAY_CONFIG"] = a }).Server.Listen.Port).IsEqualTo(1002);
    }

    [Test]
    public async Task Every_option_has_a_flag_an_environment_variable_and_a_json_key()
    {
        foreach (var option in ServeSettings.Options)
        {
            await Assert.That(option.EnvName).IsEqualTo("RELAY_" + option.Name.ToUpperInvariant().Replace('-', '_'));
            await Assert.That(option.JsonName.Contains('-')).IsFalse();
        }
        var names = ServeSettings.Options.Select(o => o.Name).ToList();
        await Assert.That(names).Contains("admin-token");
        await Assert.That(names).Contains("shutdown-timeout");
        await Assert.That(names.Distinct().Count()).IsEqualTo(names.Count);
    }

    [Test]
    public async Task Every_option_is_documented_in_the_operations_guide()
    {
        // One row of the options table each: flag, environment variable and JSON key.
        var rows = File.ReadAllLines(RepositoryFile("docs/OPERATIONS.md")).Where(l => l.StartsWith("| `--", StringComparison.Ordinal)).ToList();
        foreach (var option in ServeSettings.Options)
        {
            var row = rows.FirstOrDefault(r => r.StartsWith($"| `--{option.Name} ", StringComparison.Ordinal) || r.StartsWith($"| `--{option.Name}`", StringComparison.Ordinal));
            await Assert.That(row).IsNotNull().Because($"--{option.Name} has no row in OPERATIONS.md");
            await Assert.That(row!).Contains($"`{option.EnvName}`");
            await Assert.That(row!).Contains($"`{option.JsonName}`");
        }
    }

    /// <summary>A file of this repository, found from the test's output directory upwards.</summary>
    internal static string RepositoryFile(string relative)
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir != null; dir = dir.Parent)
        {
            string candidate = Path.Combine(dir.FullName, relative);
            if (File.Exists(candidate)) return candidate;
        }
        throw new FileNotFoundException($"{relative} not found above {AppContext.BaseDirectory}");
    }
}
