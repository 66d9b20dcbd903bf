using System.Net;
using System.Net.Sockets;

namespace Relay.Cli.Tests;

/// <summary>
/// Every validation error of <c>relay serve</c> through the real entry point (RelayCli.RunAsync):
/// exit code 2, exactly one line on stderr, naming the option in the form the operator used
/// (--flag, RELAY_VAR or the JSON key). Not in parallel: the process's stderr and environment are shared.
/// </summary>
[NotInParallel("console")]
public class ValidationTests
{
    private static async Task<(int ExitCode, string Error)> RunAsync(params string[] args)
    {
        var error = new StringWriter();
        var previous = Console.Error;
#pragma warning disable TUnit0055 // restored below; these tests do not run in parallel with each other
        Console.SetError(error);
        try
        {
            int code = await RelayCli.RunAsync(args);
            return (code, error.ToString());
        }
        finally
        {
            Console.SetError(previous);
#pragma warning restore TUnit0055
        }
    }

    private static async Task AssertUsageError(string mustName, params string[] args)
    {
        var (code, error) = await RunAsync(args);
        await Assert.That(code).IsEqualTo(RelayCli.Usage);
        var lines = error.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        await Assert.That(lines.Length).IsEqualTo(1);
        await Assert.That(lines[0]).StartsWith("relay: ");
        await Assert.That(lines[0]).Contains(mustName);
    }

    [Test]
    [Arguments("--listen", "nonsense")]
    [Arguments("--listen", "127.0.0.1:70000")]
    [Arguments("--listen", "not-an-ip:5223")]
    [Arguments("--admin", "127.0.0.1")]
    [Arguments("--plain-tcp=maybe", null)]
    [Arguments("--durability", "sometimes")]
    [Arguments("--message-ttl", "soon")]
    [Arguments("--message-ttl", "5m")]
    [Arguments("--idle-queue-ttl", "-1h")]
    [Arguments("--queue-max-messages", "0")]
    [Arguments("--backup-keep", "-1")]
    [Arguments("--backup-keep", "seven")]
    [Arguments("--queue-max-messages", "many")]
    [Arguments("--queue-max-bytes", "12")]
    [Arguments("--disk-budget", "huge")]
    [Arguments("--disk-budget", "10KB")]
    [Arguments("--max-message", "10")]
    [Arguments("--message-ttl", "nan")]
    [Arguments("--sweep-interval", "NaN")]
    [Arguments("--shutdown-timeout", "nan")]
    [Arguments("--delivery-memory", "nan")]
    [Arguments("--inflight-memory", "512KiB")]
    [Arguments("--inflight-memory", "lots")]
    [Arguments("--key-memory", "512KiB")]
    [Arguments("--key-memory", "-1")]
    [Arguments("--max-connections", "0")]
    [Arguments("--max-subscriptions", "-3")]
    [Arguments("--handshake-timeout", "1ms")]
    [Arguments("--idle-timeout", "0s")]
    [Arguments("--idle-timeout", "59s")]
    [Arguments("--new-queues", "perhaps")]
    [Arguments("--sweep-interval", "0.1s")]
    [Arguments("--admin-token", "short")]
    [Arguments("--admin-token", "has spaces in the token")]
    [Arguments("--shutdown-timeout", "forever")]
    [Arguments("--log-format", "xml")]
    [Arguments("--log-level", "loud")]
    public async Task A_bad_flag_value_is_a_one_line_error_naming_the_flag(string flag, string? value)
    {
        using var files = new SettingsFiles();
        string[] args = value is null
            ? ["serve", "--data", files.DataDirectory, flag]
            : ["serve", "--data", files.DataDirectory, flag, value];
        await AssertUsageError(flag.Split('=')[0], args);
    }

    private static ServeSettings Bind(string[] flags, Dictionary<string, string?> environment) =>
        ServeSettings.Bind(CliArgs.Parse("serve", flags, ServeSettings.ValueOptionNames, ServeSettings.SwitchNames, 0), environment);

    [Test]
    [Arguments("bad host")]
    [Arguments("::1")]
    [Arguments("relay.example,fe80::1")]
    [Arguments("relay.example,a/b")]
    [Arguments("user@relay.example")]
    [Arguments(",")]
    public async Task A_host_no_client_could_parse_is_refused_naming_the_option_it_came_from(string host)
    {
        // The same rule as relay init and relay address, and as clients parse the printed address.
        var fromFlag = Assert.Throws<UsageException>(() => Bind(["--host", host], []));
        await Assert.That(fromFlag!.Message).StartsWith("--host must be one or more host names");
        var fromEnvironment = Assert.Throws<UsageException>(() => Bind([], new() { ["RELAY_HOST"] = host }));
        await Assert.That(fromEnvironment!.Message).StartsWith("RELAY_HOST must be one or more host names");

        using var files = new SettingsFiles();
        await AssertUsageError("--host", "serve", "--data", files.DataDirectory, "--listen", "127.0.0.1:0", "--admin", "off", "--host", host);
        await Assert.That(Directory.Exists(files.DataDirectory)).IsFalse();
    }

    [Test]
    public async Task Hosts_clients_parse_are_taken_and_an_empty_value_leaves_the_listeners_host()
    {
        await Assert.That(Bind(["--host", "relay.example, [2001:db8::1] ,abc.onion"], []).Server.PublicHosts)
            .IsEquivalentTo(new[] { "relay.example", "[2001:db8::1]", "abc.onion" });
        await Assert.That(Bind([], new() { ["RELAY_HOST"] = "" }).Server.PublicHosts).IsEmpty();
    }

    [Test]
    public async Task An_empty_data_directory_is_a_one_line_error_naming_where_it_came_from()
    {
        await AssertUsageError("--data must name a directory", "serve", "--data", "", "--listen", "127.0.0.1:0", "--admin", "off");
        await AssertUsageError("--data must name a directory", "serve", "--data=", "--listen", "127.0.0.1:0", "--admin", "off");
        var fromEnvironment = Assert.Throws<UsageException>(() => Bind([], new() { ["RELAY_DATA"] = "" }));
        await Assert.That(fromEnvironment!.Message).StartsWith("RELAY_DATA must name a directory");
    }

    [Test]
    [Arguments("--message-ttl", "30m", "--message-ttl must be at least 1h, got '30m'")]
    [Arguments("--idle-queue-ttl", "59m", "--idle-queue-ttl must be at least 1h, got '59m'")]
    [Arguments("--proxy-header-timeout", "50ms", "--proxy-header-timeout must be at least 100ms, got '50ms'")]
    [Arguments("--handshake-timeout", "0.05", "--handshake-timeout must be at least 100ms, got '0.05'")]
    [Arguments("--idle-timeout", "59s", "--idle-timeout must be at least 1m, got '59s'")]
    [Arguments("--sweep-interval", "0.1s", "--sweep-interval must be at least 1s, got '0.1s'")]
    [Arguments("--message-ttl", "40000d", "--message-ttl must be at most 36500d, got '40000d'")]
    [Arguments("--shutdown-timeout", "1e300", "--shutdown-timeout must be at most 49d, got '1e300'")]
    [Arguments("--store-failure-timeout", "1e400h", "--store-failure-timeout must be at most 36500d, got '1e400h'")]
    [Arguments("--message-ttl", "soon", "--message-ttl must be a duration such as 45s, 30m, 12h or 21d, got 'soon'")]
    [Arguments("--sweep-interval", "50d", "--sweep-interval must be at most 49d, got '50d'")]
    public async Task A_duration_out_of_range_names_the_bound_in_the_units_the_options_take(string flag, string value, string message)
    {
        using var files = new SettingsFiles();
        var (code, error) = await RunAsync("serve", "--data", files.DataDirectory, flag, value);
        await Assert.That(code).IsEqualTo(RelayCli.Usage);
        await Assert.That(error.Trim()).IsEqualTo("relay: " + message);
    }

    /// <summary>
    /// Durations the relay waits out with a timer end at 49d, what the runtime's timers take: a longer
    /// one failed the start (sweep interval), closed every connection in its handshake without a word
    /// (handshake and PROXY header timeouts) or crashed the shutdown (shutdown timeout).
    /// </summary>
    [Test]
    [Arguments("--sweep-interval", "sweepInterval", "RELAY_SWEEP_INTERVAL")]
    [Arguments("--handshake-timeout", "handshakeTimeout", "RELAY_HANDSHAKE_TIMEOUT")]
    [Arguments("--proxy-header-timeout", "proxyHeaderTimeout", "RELAY_PROXY_HEADER_TIMEOUT")]
    [Arguments("--shutdown-timeout", "shutdownTimeout", "RELAY_SHUTDOWN_TIMEOUT")]
    public async Task A_timer_duration_longer_than_a_timer_takes_is_a_usage_error_from_every_source(string flag, string key, string variable)
    {
        var fromFlag = Assert.Throws<UsageException>(() => Bind([flag, "100d"], []));
        await Assert.That(fromFlag!.Message).IsEqualTo($"{flag} must be at most 49d, got '100d'");
        var fromEnvironment = Assert.Throws<UsageException>(() => Bind([], new() { [variable] = "1200h" }));
        await Assert.That(fromEnvironment!.Message).IsEqualTo($"{variable} must be at most 49d, got '1200h'");
        using var files = new SettingsFiles();
        string config = files.Write("relay.json", $"{{\"{key}\": \"50d\"}}");
        var fromFile = Assert.Throws<UsageException>(() => Bind(["--config", config], []));
        await Assert.That(fromFile!.Message).IsEqualTo($"'{key}' in {config} must be at most 49d, got '50d'");
        // The bound itself is taken.
        var server = Bind([flag, "49d"], []).Server;
        TimeSpan taken = flag switch
        {
            "--sweep-interval" => server.SweepInterval,
            "--handshake-timeout" => server.HandshakeTimeout,
            "--proxy-header-timeout" => server.ProxyHeaderTimeout,
            _ => server.ShutdownTimeout,
        };
        await Assert.That(taken).IsEqualTo(TimeSpan.FromDays(49));
    }

    [Test]
    public async Task Listen_refuses_a_timeout_longer_than_a_timer_takes()
    {
        using var files = new SettingsFiles();
        var (code, error) = await RunAsync("listen", "--profile", files.DataDirectory, "--timeout", "31536000");
        await Assert.That(code).IsEqualTo(RelayCli.Usage);
        await Assert.That(error.Trim()).IsEqualTo("relay: option --timeout must be a whole number from 1 to 4233600, got '31536000'");
    }

    [Test]
    public async Task The_longest_duration_is_taken_and_durations_print_in_their_largest_whole_unit()
    {
        await Assert.That(Bind(["--message-ttl", "36500d"], []).Server.MessageTtl).IsEqualTo(TimeSpan.FromDays(36500));
        await Assert.That(ServeSettings.FormatDuration(TimeSpan.FromHours(1))).IsEqualTo("1h");
        await Assert.That(ServeSettings.FormatDuration(TimeSpan.FromMinutes(90))).IsEqualTo("90m");
        await Assert.That(ServeSettings.FormatDuration(TimeSpan.FromDays(21))).IsEqualTo("21d");
        await Assert.That(ServeSettings.FormatDuration(TimeSpan.FromMilliseconds(100))).IsEqualTo("100ms");
        await Assert.That(ServeSettings.FormatDuration(TimeSpan.FromMilliseconds(1500))).IsEqualTo("1500ms");
        await Assert.That(ServeSettings.FormatDuration(TimeSpan.Zero)).IsEqualTo("0s");
    }

    [Test]
    public async Task The_relay_and_admin_listeners_on_one_port_are_refused_before_anything_starts()
    {
        using var files = new SettingsFiles();
        int port;
        using (var probe = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp))
        {
            probe.Bind(new IPEndPoint(IPAddress.Loopback, 0));
            port = ((IPEndPoint)probe.LocalEndPoint!).Port;
        }
        await AssertUsageError("--admin", "serve", "--data", files.DataDirectory, "--listen", $"127.0.0.1:{port}", "--admin", $"127.0.0.1:{port}");
        await AssertUsageError("--admin", "serve", "--data", files.DataDirectory, "--listen", $"0.0.0.0:{port}", "--admin", $"127.0.0.1:{port}");
    }

    [Test]
    [Arguments("plain text", "plain text")]
    [Arguments("two\nlines", "two\\nlines")]
    [Arguments("tab\there", "tab\\there")]
    [Arguments("\u001b[31mred", "\\u001b[31mred")]
    [Arguments("evil\u202Etxt.exe", "evil\\u202etxt.exe")]
    [Arguments("emoji 👍🏽 and ümlauts", "emoji 👍🏽 and ümlauts")]
    public async Task Text_from_contacts_prints_on_one_line_without_control_characters(string text, string printed)
    {
        await Assert.That(ClientCommands.Printable(text)).IsEqualTo(printed);
    }

    [Test]
    public async Task The_largest_max_message_is_the_one_whose_delivery_fits_a_frame()
    {
        using var files = new SettingsFiles();
        var (code, error) = await RunAsync("serve", "--data", files.DataDirectory, "--max-message", "65467");
        await Assert.That(code).IsEqualTo(RelayCli.Usage);
        await Assert.That(error.Trim()).IsEqualTo("relay: --max-message must be a whole number from 256 to 65466, got '65467'");
    }

    [Test]
    [Arguments("garbage")]
    [Arguments("")]
    public async Task An_unreadable_identity_file_is_a_one_line_error_for_serve_and_address(string content)
    {
        using var files = new SettingsFiles();
        Directory.CreateDirectory(files.DataDirectory);
        var identity = Path.Combine(files.DataDirectory, "identity.pfx");
        await File.WriteAllTextAsync(identity, content);
        await AssertUsageError("--data: " + identity + " is not a relay identity", "serve", "--data", files.DataDirectory,
            "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0");
        await AssertUsageError("--data: " + identity + " is not a relay identity", "address", "--data", files.DataDirectory);
        await AssertUsageError("--data: " + identity + " is not a relay identity", "init", "--data", files.DataDirectory);
        // Nothing was overwritten: the operator still has the file to restore or inspect.
        await Assert.That(await File.ReadAllTextAsync(identity)).IsEqualTo(content);
    }

    [Test]
    public async Task A_create_password_longer_than_the_protocol_allows_is_refused()
    {
        using var files = new SettingsFiles();
        await AssertUsageError("--create-password", "serve", "--data", files.DataDirectory, "--create-password", new string('p', 256));
    }

    [Test]
    public async Task A_bad_environment_value_names_the_variable()
    {
        using var files = new SettingsFiles();
        Environment.SetEnvironmentVariable("RELAY_MESSAGE_TTL", "eventually");
        try
        {
            await AssertUsageError("RELAY_MESSAGE_TTL", "serve", "--data", files.DataDirectory);
        }
        finally
        {
            Environment.SetEnvironmentVariable("RELAY_MESSAGE_TTL", null);
        }
    }

    [Test]
    public async Task A_bad_json_value_names_the_key_and_the_file()
    {
        using var files = new SettingsFiles();
        var path = files.Write("relay.json", """{"queueMaxBytes": "lots"}""");
        await AssertUsageError("'queueMaxBytes' in " + path, "serve", "--data", files.DataDirectory, "--config", path);
    }

    [Test]
    public async Task An_unknown_json_key_is_refused()
    {
        using var files = new SettingsFiles();
        var path = files.Write("relay.json", """{"listen": "127.0.0.1:0", "lisen": "127.0.0.1:1"}""");
        await AssertUsageError("unknown setting 'lisen'", "serve", "--data", files.DataDirectory, "--config", path);
    }

    [Test]
    [Arguments("{\"listen\": ")]
    [Arguments("not json at all")]
    [Arguments("")]
    public async Task Invalid_json_is_refused(string text)
    {
        using var files = new SettingsFiles();
        var path = files.Write("relay.json", text);
        await AssertUsageError("--config", "serve", "--data", files.DataDirectory, "--config", path);
    }

    [Test]
    public async Task A_json_array_or_a_nested_object_is_refused()
    {
        using var files = new SettingsFiles();
        var array = files.Write("array.json", "[1, 2]");
        await AssertUsageError("must hold a JSON object", "serve", "--data", files.DataDirectory, "--config", array);
        var nested = files.Write("nested.json", """{"listen": {"host": "x"}}""");
        await AssertUsageError("'listen'", "serve", "--data", files.DataDirectory, "--config", nested);
    }

    [Test]
    public async Task A_missing_config_file_is_refused()
    {
        using var files = new SettingsFiles();
        await AssertUsageError("--config", "serve", "--data", files.DataDirectory, "--config", Path.Combine(files.Directory, "missing.json"));
    }

    [Test]
    public async Task An_unknown_flag_and_a_flag_without_value_are_refused()
    {
        await AssertUsageError("--bogus", "serve", "--bogus");
        await AssertUsageError("--listen", "serve", "--listen");
    }

    [Test]
    public async Task An_unwritable_data_directory_is_refused()
    {
        using var files = new SettingsFiles();
        // A path below a regular file can never be created, even by root.
        var file = files.Write("plain-file", "x");
        await AssertUsageError("--data", "serve", "--data", Path.Combine(file, "data"), "--listen", "127.0.0.1:0", "--admin", "off");
    }

    [Test]
    [Arguments("--listen")]
    [Arguments("--admin")]
    public async Task A_port_in_use_is_refused_naming_the_listener(string option)
    {
        using var files = new SettingsFiles();
        using var busy = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        busy.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        busy.Listen();
        string taken = "127.0.0.1:" + ((IPEndPoint)busy.LocalEndPoint!).Port;
        string[] args = option == "--listen"
            ? ["serve", "--data", files.DataDirectory, "--listen", taken, "--admin", "127.0.0.1:0"]
            : ["serve", "--data", files.DataDirectory, "--listen", "127.0.0.1:0", "--admin", taken];
        await AssertUsageError(option, args);
    }

    /// <summary>
    /// A --socks that the client SDK refuses (a port with a sign, a host with a space) is a usage
    /// error, as one without a port: the command's own looser check let it through, to fail as an
    /// unexpected error when the command connected.
    /// </summary>
    [Test]
    [Arguments("proxy:+1080")]
    [Arguments("my proxy:1080")]
    [Arguments("nonsense")]
    public async Task A_socks_proxy_that_is_not_host_and_port_is_a_usage_error(string socks)
    {
        await AssertUsageError("--socks must be HOST:PORT", "ping", $"relay://{new string('A', 43)}@127.0.0.1:5223", "--socks", socks);
    }
}
