using System.Globalization;
using System.Net;
using System.Text.Json;
using Relay.Protocol;
using Relay.Server;

namespace Relay.Cli;

/// <summary>
/// Every setting of <c>relay serve</c>, bound from (lowest to highest precedence) defaults, the JSON
/// file given by --config, RELAY_* environment variables, and command-line flags. One table drives
/// all three sources and the help text, without reflection (AOT-clean).
/// </summary>
public sealed class ServeSettings
{
    public RelayServerOptions Server { get; } = new() { CollectWhenQuiet = true };
    public string LogFormat { get; set; } = "text";
    public string LogLevel { get; set; } = "information";
    public string? ConfigFile { get; set; }

    public sealed record Option(string Name, string Value, string Default, string Help, Action<ServeSettings, string, string> Apply)
    {
        /// <summary>RELAY_ + upper-case name with '-' as '_'.</summary>
        public string EnvName => "RELAY_" + Name.ToUpperInvariant().Replace('-', '_');
        /// <summary>camelCase key in the JSON file.</summary>
        public string JsonName
        {
            get
            {
                var parts = Name.Split('-');
                return parts[0] + string.Concat(parts.Skip(1).Select(p => char.ToUpperInvariant(p[0]) + p.Substring(1)));
            }
        }
        public bool IsSwitch => Value == "";
    }

    public static readonly Option[] Options =
    [
        new("data", "DIR", "./relay-data", "data directory: identity and queue store",
            (s, v, src) => s.Server.DataDirectory = v.Trim().Length > 0 ? v : throw new UsageException($"{src} must name a directory, got an empty value")),
        new("listen", "HOST:PORT", "0.0.0.0:5223", "relay listener",
            (s, v, src) => s.Server.Listen = ParseEndPoint(src, v)),
        new("admin", "HOST:PORT|off", "127.0.0.1:5280", "admin HTTP listener (health, readiness, metrics, admin API)",
            (s, v, src) => s.Server.Admin = v == "off" ? null : ParseEndPoint(src, v)),
        new("host", "HOST[,HOST2...]", "the listener's host", "public host names printed in the relay address (e.g. a domain and a .onion)",
            (s, v, src) => s.Server.PublicHosts = [.. ParseHosts(src, v)]),
        new("plain-tcp", "", "false", "serve the relay protocol without TLS (only behind a TLS-terminating proxy on loopback, or for benchmarks)",
            (s, v, src) => s.Server.Tls = !CliArgs.ParseBool(src, v)),
        new("durability", "fsync|relaxed", "fsync", "fsync: a SEND is answered only after its write is fsynced; relaxed: no fsync (a power loss may lose acknowledged messages)",
            (s, v, src) => s.Server.Durable = v switch { "fsync" => true, "relaxed" => false, _ => throw new UsageException($"{src} must be fsync or relaxed, got '{v}'") }),
        new("message-ttl", "DURATION", "21d", "messages older than this are deleted",
            (s, v, src) => s.Server.MessageTtl = ParseDuration(src, v, TimeSpan.FromHours(1))),
        new("idle-queue-ttl", "DURATION", "0 (never)", "queues untouched for this long are deleted with their messages",
            (s, v, src) => s.Server.IdleQueueTtl = v == "0" ? TimeSpan.Zero : ParseDuration(src, v, TimeSpan.FromHours(1))),
        new("queue-max-messages", "N", "128", "messages a queue holds before SEND answers QUOTA",
            (s, v, src) => s.Server.QueueMaxMessages = (int)ParseNumber(src, v, 1, 1_000_000)),
        new("queue-max-bytes", "SIZE", "8MiB", "body bytes a queue holds before SEND answers QUOTA",
            (s, v, src) => s.Server.QueueMaxBytes = ParseSize(src, v, 1024)),
        new("disk-budget", "SIZE", "0 (unlimited)", "above this much data on disk, new queues and sends answer FULL until space returns",
            (s, v, src) => s.Server.DiskBudgetBytes = v == "0" ? 0 : ParseSize(src, v, 1 << 20)),
        new("delivery-memory", "SIZE", "16MiB", "memory for messages of subscribed queues, delivered without a store read (0: always read)",
            (s, v, src) => s.Server.DeliveryMemoryBytes = v == "0" ? 0 : ParseSize(src, v, 0)),
        new("output-memory", "SIZE", "256MiB", "memory for output waiting for clients that read slowly, all connections together; while it is used up, a connection with more than 32 KiB unsent (instead of 1 MiB) is not read until its client reads (0: no such bound)",
            (s, v, src) => s.Server.OutputMemoryBudget = v == "0" ? 0 : ParseSize(src, v, 1 << 20)),
        new("inflight-memory", "SIZE", "256MiB", "memory for the bodies of SENDs waiting for their group commit, all connections together; while it is used up (a stalled disk), a connection with more than 32 KiB waiting (instead of 1 MiB) is not read until its SENDs are answered (0: no such bound)",
            (s, v, src) => s.Server.InFlightMemoryBudget = v == "0" ? 0 : ParseSize(src, v, 1 << 20)),
        new("key-memory", "SIZE", "256MiB", "memory for the derived auth keys connections cache (512 bytes each), all connections together; while it is used up, a connection holding 64 keys or more drops them before it derives another (0: no such bound)",
            (s, v, src) => s.Server.KeyMemoryBudget = v == "0" ? 0 : ParseSize(src, v, 1 << 20)),
        new("max-message", "BYTES", "65000", "largest SEND body",
            (s, v, src) => s.Server.MaxMessage = (int)ParseNumber(src, v, 256, ProtocolConstants.LargestMessage(ProtocolConstants.DefaultMaxFrame))),
        new("max-connections", "N", "20000", "concurrent relay connections; more are closed at once",
            (s, v, src) => s.Server.MaxConnections = (int)ParseNumber(src, v, 1, 10_000_000)),
        new("proxy-protocol", "", "false", "require a PROXY protocol v1 or v2 header (haproxy send-proxy-v2, stunnel protocol = proxy) on every relay connection, before TLS; its client address feeds the per-source limits, in memory only",
            (s, v, src) => s.Server.ProxyProtocol = CliArgs.ParseBool(src, v)),
        new("proxy-header-timeout", "DURATION", "5s", "time allowed for the PROXY header",
            (s, v, src) => s.Server.ProxyHeaderTimeout = ParseDuration(src, v, TimeSpan.FromMilliseconds(100), LongestTimer)),
        new("max-connections-per-source", "N", "100", "concurrent relay connections from one source (IPv4 address or IPv6 /64); 0: no limit",
            (s, v, src) => s.Server.MaxConnectionsPerSource = (int)ParseNumber(src, v, 0, 10_000_000)),
        new("queue-creation-rate", "N", "30", "queues (NEW) one source may create per minute once its burst is spent (LIMIT beyond); 0: no limit",
            (s, v, src) => s.Server.QueueCreationRate = ParseNumber(src, v, 0, 1_000_000)),
        new("queue-creation-burst", "N", "100", "queues one source may create at once before the rate applies",
            (s, v, src) => s.Server.QueueCreationBurst = (int)ParseNumber(src, v, 1, 1_000_000)),
        new("key-agreement-rate", "N", "200", "key agreements (a queue key's first use on a connection, a new connection; about 50 µs of CPU each) one source may make per second once its burst is spent; its connections wait beyond; 0: no limit",
            (s, v, src) => s.Server.KeyAgreementRate = ParseNumber(src, v, 0, 1_000_000)),
        new("key-agreement-burst", "N", "4096", "key agreements one source may make at once before the rate applies",
            (s, v, src) => s.Server.KeyAgreementBurst = (int)ParseNumber(src, v, 1, 10_000_000)),
        new("max-subscriptions", "N", "10000", "subscriptions per connection",
            (s, v, src) => s.Server.MaxSubscriptionsPerConnection = (int)ParseNumber(src, v, 1, 10_000_000)),
        new("handshake-timeout", "DURATION", "10s", "time allowed for TLS and HELLO",
            (s, v, src) => s.Server.HandshakeTimeout = ParseDuration(src, v, TimeSpan.FromMilliseconds(100), LongestTimer)),
        new("idle-timeout", "DURATION", "300s", "a connection the relay has read nothing from for this long is closed (at least 60s: clients PING at least every 60 s)",
            (s, v, src) => s.Server.IdleTimeout = ParseDuration(src, v, TimeSpan.FromSeconds(60))),
        new("create-password", "TEXT", "none", "password clients must give to create queues (at most 255 UTF-8 bytes)",
            (s, v, src) => s.Server.CreatePassword = v.Length == 0 ? null
                : System.Text.Encoding.UTF8.GetByteCount(v) <= 255 ? v : throw new UsageException($"{src} must be at most 255 UTF-8 bytes (the protocol's limit)")),
        new("new-queues", "on|off", "on", "off: refuse new queues (DISABLED) while existing queues keep working",
            (s, v, src) => s.Server.AllowNewQueues = CliArgs.ParseBool(src, v)),
        new("collect-when-quiet", "on|off", "on", "when the relay goes quiet after allocating 4 MiB or more, it collects its garbage and gives the collector's free memory back (at most about once a minute; its pause, 0.1–0.2 s with 10,000 connections, is in relay_quiet_collection_pause_seconds_total)",
            (s, v, src) => s.Server.CollectWhenQuiet = CliArgs.ParseBool(src, v)),
        new("sweep-interval", "DURATION", "10m", "how often expired messages and idle queues are removed",
            (s, v, src) => s.Server.SweepInterval = ParseDuration(src, v, TimeSpan.FromSeconds(1), LongestTimer)),
        new("admin-token", "TOKEN", "none (admin API off)", "bearer token of the admin API (/admin/*); at least 16 characters, no spaces; without it /admin/* answers 404",
            (s, v, src) => s.Server.AdminToken = v.Length == 0 ? null
                : v.Length >= 16 && !v.Any(char.IsWhiteSpace) && !v.Any(char.IsControl) ? v
                : throw new UsageException($"{src} must be at least 16 characters without spaces (e.g. from: openssl rand -hex 32)")),
        new("backup-dir", "DIR", "DATA/backups", "where POST /admin/backup and relay backup make backups, one directory each (on the store's file system its table files are hard-linked, not copied)",
            (s, v, _) => s.Server.BackupDirectory = v.Length == 0 ? null : v),
        new("backup-keep", "N", "7", "complete backups kept in the backup directory: after each backup the oldest are removed so that this many remain, the new one among them (0: keep every one)",
            (s, v, src) => s.Server.BackupKeep = (int)ParseNumber(src, v, 0, 1_000_000)),
        new("shutdown-timeout", "DURATION", "10s", "on SIGTERM/SIGINT, time connections get to finish what is in flight before they are aborted",
            (s, v, src) => s.Server.ShutdownTimeout = ParseDuration(src, v, TimeSpan.Zero, LongestTimer)),
        new("store-failure-timeout", "DURATION", "60s", "when every store write has failed this long (an I/O error, not a full disk, which passes by itself), the relay exits with 1 so that its service manager restarts it and the store recovers from its log (0: keep running)",
            (s, v, src) => s.Server.StoreFailureTimeout = v == "0" ? TimeSpan.Zero : ParseDuration(src, v, TimeSpan.FromSeconds(1))),
        new("log-format", "text|json", "text", "log line format on stdout",
            (s, v, src) => s.LogFormat = v is "text" or "json" ? v : throw new UsageException($"{src} must be text or json, got '{v}'")),
        new("log-level", "LEVEL", "information", "debug, information, warning or error",
            (s, v, src) => s.LogLevel = v is "debug" or "information" or "warning" or "error" ? v : throw new UsageException($"{src} must be debug, information, warning or error, got '{v}'")),
    ];

    public static ISet<string> ValueOptionNames => Options.Where(o => !o.IsSwitch).Select(o => o.Name).Append("config").ToHashSet();
    public static ISet<string> SwitchNames => Options.Where(o => o.IsSwitch).Select(o => o.Name).ToHashSet();

    /// <summary>Binds defaults, then the config file, then this process's environment, then the flags.</summary>
    public static ServeSettings Bind(CliArgs args)
    {
        var environment = new Dictionary<string, string?>(StringComparer.Ordinal);
        foreach (System.Collections.DictionaryEntry e in Environment.GetEnvironmentVariables())
        {
            environment[(string)e.Key] = e.Value as string;
        }
        return Bind(args, environment);
    }

    /// <summary>Binds defaults, then the config file, then the environment, then the flags.</summary>
    public static ServeSettings Bind(CliArgs args, IDictionary<string, string?> environment)
    {
        var settings = new ServeSettings();
        var configFile = args.Get("config") ?? (environment.TryGetValue("RELAY_CONFIG", out var fromEnv) ? fromEnv : null);
        if (configFile != null)
        {
            settings.ConfigFile = configFile;
            ApplyJson(settings, configFile);
        }
        foreach (var option in Options)
        {
            if (environment.TryGetValue(option.EnvName, out var value) && value != null)
            {
                option.Apply(settings, value, option.EnvName);
            }
        }
        foreach (var option in Options)
        {
            if (args.TryGet(option.Name, out var value))
            {
                option.Apply(settings, value, "--" + option.Name);
            }
        }
        return settings;
    }

    private static void ApplyJson(ServeSettings settings, string path)
    {
        JsonDocument document;
        try
        {
            document = JsonDocument.Parse(File.ReadAllBytes(path), new JsonDocumentOptions { CommentHandling = JsonCommentHandling.Skip, AllowTrailingCommas = true });
        }
        catch (Exception ex) when (ex is IOException or UnauthorizedAccessException)
        {
            throw new UsageException($"--config: cannot read {path}: {ex.Message}");
        }
        catch (JsonException ex)
        {
            throw new UsageException($"--config: {path} is not valid JSON: {ex.Message}");
        }
        using (document)
        {
            if (document.RootElement.ValueKind != JsonValueKind.Object)
            {
                throw new UsageException($"--config: {path} must hold a JSON object");
            }
            foreach (var property in document.RootElement.EnumerateObject())
            {
                var option = Options.FirstOrDefault(o => o.JsonName == property.Name)
                    ?? throw new UsageException($"--config: unknown setting '{property.Name}' in {path}");
                string value = property.Value.ValueKind switch
                {
                    JsonValueKind.String => property.Value.GetString()!,
                    JsonValueKind.Number => property.Value.GetRawText(),
                    JsonValueKind.True => "true",
                    JsonValueKind.False => "false",
                    JsonValueKind.Array => string.Join(',', property.Value.EnumerateArray().Select(e => e.ToString())),
                    _ => throw new UsageException($"--config: setting '{property.Name}' in {path} has an unsupported value"),
                };
                option.Apply(settings, value, $"'{property.Name}' in {path}");
            }
        }
    }

    public static IPEndPoint ParseEndPoint(string what, string value)
    {
        int colon = value.LastIndexOf(':');
        if (colon <= 0 || !int.TryParse(value.AsSpan(colon + 1), NumberStyles.None, CultureInfo.InvariantCulture, out int port) || port > 65535)
        {
            throw new UsageException($"{what} must be HOST:PORT with a port from 0 to 65535, got '{value}'");
        }
        var host = value.Substring(0, colon).Trim('[', ']');
        IPAddress? address = host switch
        {
            "*" or "0.0.0.0" => IPAddress.Any,
            "::" => IPAddress.IPv6Any,
            "localhost" => IPAddress.Loopback,
            _ => IPAddress.TryParse(host, out var a) ? a : null,
        };
        return address is null
            ? throw new UsageException($"{what} must name an IP address (or localhost, or *), got '{host}'")
            : new IPEndPoint(address, port);
    }

    /// <summary>
    /// The public hosts of the relay address: names, IPv4 addresses or IPv6 addresses in brackets,
    /// as <see cref="RelayAddress.IsHost"/> (and so every client) accepts them. An empty value
    /// leaves the listener's host.
    /// </summary>
    public static string[] ParseHosts(string what, string value)
    {
        if (value.Trim().Length == 0)
        {
            return [];
        }
        var hosts = value.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        return hosts.Length > 0 && hosts.All(RelayAddress.IsHost) ? hosts
            : throw new UsageException($"{what} must be one or more host names separated by commas (an IPv6 address in brackets: [2001:db8::1]), got '{value}'");
    }

    /// <param name="max">the longest value taken (default <see cref="LongestDuration"/>)</param>
    public static TimeSpan ParseDuration(string what, string value, TimeSpan min, TimeSpan? max = null)
    {
        TimeSpan longest = max ?? LongestDuration;
        var v = value.Trim().ToLowerInvariant();
        (string number, double unit) = v switch
        {
            _ when v.EndsWith("ms", StringComparison.Ordinal) => (v[..^2], 0.001),
            _ when v.EndsWith('s') => (v[..^1], 1),
            _ when v.EndsWith('m') => (v[..^1], 60),
            _ when v.EndsWith('h') => (v[..^1], 3600),
            _ when v.EndsWith('d') => (v[..^1], 86400),
            _ => (v, 1),
        };
        if (!double.TryParse(number, NumberStyles.Float, CultureInfo.InvariantCulture, out double n) || !(n >= 0))
        {
            throw new UsageException($"{what} must be a duration such as 45s, 30m, 12h or 21d, got '{value}'");
        }
        if (double.IsInfinity(n) || n * unit > longest.TotalSeconds)
        {
            throw new UsageException($"{what} must be at most {FormatDuration(longest)}, got '{value}'");
        }
        var result = TimeSpan.FromSeconds(n * unit);
        return result < min ? throw new UsageException($"{what} must be at least {FormatDuration(min)}, got '{value}'") : result;
    }

    /// <summary>The longest duration any option takes: 36500d (100 years).</summary>
    public static readonly TimeSpan LongestDuration = TimeSpan.FromDays(100 * 365);

    /// <summary>
    /// The longest duration of an option the relay waits out with a timer (the sweep interval, the
    /// handshake, PROXY header and shutdown timeouts): 49d. The runtime's timers take at most about
    /// 49.7 days (2^32 - 2 ms); a longer one failed the start, every connection or the shutdown.
    /// </summary>
    public static readonly TimeSpan LongestTimer = TimeSpan.FromDays(49);

    /// <summary>A duration in the units the options take: the largest of d, h, m, s and ms that gives a whole number (1h, 100ms, 36500d).</summary>
    public static string FormatDuration(TimeSpan duration)
    {
        foreach (var (unit, length) in (ReadOnlySpan<(string, TimeSpan)>)[("d", TimeSpan.FromDays(1)), ("h", TimeSpan.FromHours(1)), ("m", TimeSpan.FromMinutes(1)), ("s", TimeSpan.FromSeconds(1))])
        {
            if (duration >= length && duration.Ticks % length.Ticks == 0)
            {
                return (duration.Ticks / length.Ticks).ToString(CultureInfo.InvariantCulture) + unit;
            }
        }
        return duration == TimeSpan.Zero ? "0s" : duration.TotalMilliseconds.ToString(CultureInfo.InvariantCulture) + "ms";
    }

    public static long ParseNumber(string what, string value, long min, long max)
    {
        if (!long.TryParse(value, NumberStyles.None, CultureInfo.InvariantCulture, out long n) || n < min || n > max)
        {
            throw new UsageException($"{what} must be a whole number from {min} to {max}, got '{value}'");
        }
        return n;
    }

    public static long ParseSize(string what, string value, long min)
    {
        var v = value.Trim();
        (string number, long unit) = v.ToUpperInvariant() switch
        {
            var u when u.EndsWith("KIB", StringComparison.Ordinal) => (v[..^3], 1L << 10),
            var u when u.EndsWith("MIB", StringComparison.Ordinal) => (v[..^3], 1L << 20),
            var u when u.EndsWith("GIB", StringComparison.Ordinal) => (v[..^3], 1L << 30),
            var u when u.EndsWith("TIB", StringComparison.Ordinal) => (v[..^3], 1L << 40),
            var u when u.EndsWith("KB", StringComparison.Ordinal) => (v[..^2], 1000L),
            var u when u.EndsWith("MB", StringComparison.Ordinal) => (v[..^2], 1000_000L),
            var u when u.EndsWith("GB", StringComparison.Ordinal) => (v[..^2], 1000_000_000L),
            var u when u.EndsWith("TB", StringComparison.Ordinal) => (v[..^2], 1000_000_000_000L),
            var u when u.EndsWith('B') => (v[..^1], 1L),
            _ => (v, 1L),
        };
        if (!double.TryParse(number, NumberStyles.Float, CultureInfo.InvariantCulture, out double n) || !(n >= 0) || n * unit > long.MaxValue / 2)
        {
            throw new UsageException($"{what} must be a size such as 500MB, 8MiB or 10GB, got '{value}'");
        }
        long bytes = (long)(n * unit);
        return bytes < min ? throw new UsageException($"{what} must be at least {min} bytes, got '{value}'") : bytes;
    }
}
