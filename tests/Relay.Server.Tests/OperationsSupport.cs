using System.Globalization;
using System.Net.Http.Headers;
using System.Text.RegularExpressions;

namespace Relay.Server.Tests;

/// <summary>Scrapes and reads the relay's /metrics (Prometheus text format) over real HTTP.</summary>
public static partial class OperationsMetrics
{
    public static HttpClient AdminClient(TestRelay relay, string? token = null)
    {
        var ep = relay.Server.AdminEndPoint!;
        var client = new HttpClient { BaseAddress = new Uri($"http://{ep.Address}:{ep.Port}/"), Timeout = TimeSpan.FromSeconds(10) };
        if (token != null)
        {
            client.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", token);
        }
        return client;
    }

    public static async Task<string> ScrapeAsync(TestRelay relay)
    {
        using var client = AdminClient(relay);
        return await client.GetStringAsync("metrics");
    }

    /// <summary>The value of one sample, e.g. Value(text, "relay_commands_total", "command=\"send\",result=\"ok\""); 0 when absent.</summary>
    public static double Value(string text, string name, string? labels = null)
    {
        string prefix = labels is null ? name + " " : name + "{" + labels + "} ";
        foreach (var line in text.Split('\n'))
        {
            if (line.StartsWith(prefix, StringComparison.Ordinal))
            {
                return double.Parse(line.AsSpan(prefix.Length).Trim(), NumberStyles.Float, CultureInfo.InvariantCulture);
            }
        }
        return 0;
    }

    /// <summary>Names of every metric family declared by a # TYPE line.</summary>
    public static IReadOnlyList<string> Families(string text) =>
        [.. TypeLine().Matches(text).Select(m => m.Groups[1].Value)];

    [GeneratedRegex(@"^# TYPE (\S+) ", RegexOptions.Multiline)]
    private static partial Regex TypeLine();

    /// <summary>
    /// The value of a gauge once it stops changing (the same in two scrapes half a second apart), or
    /// its last value after <paramref name="seconds"/>: what connections held once each stopped being read.
    /// </summary>
    public static async Task<double> SettledValueAsync(TestRelay relay, string name, double seconds = 20)
    {
        double value = -1, last;
        var deadline = DateTime.UtcNow.AddSeconds(seconds);
        do
        {
            last = value;
            await Task.Delay(500);
            value = Value(await ScrapeAsync(relay), name);
        }
        while (value != last && DateTime.UtcNow < deadline);
        return value;
    }

    /// <summary>Polls <paramref name="condition"/> until it holds or <paramref name="seconds"/> pass.</summary>
    public static async Task<bool> EventuallyAsync(Func<Task<bool>> condition, double seconds = 20)
    {
        var deadline = DateTime.UtcNow.AddSeconds(seconds);
        while (DateTime.UtcNow < deadline)
        {
            if (await condition()) return true;
            await Task.Delay(100);
        }
        return await condition();
    }
}

/// <summary>A clock the test moves by hand (timers stay real: only "now" is fake).</summary>
public sealed class OperationsClock : TimeProvider
{
    private long _offsetTicks;
    public void Advance(TimeSpan by) => Interlocked.Add(ref _offsetTicks, by.Ticks);
    public override DateTimeOffset GetUtcNow() => base.GetUtcNow().AddTicks(Interlocked.Read(ref _offsetTicks));
    // In 128 bits: days of ticks times the timestamp frequency overflow 64.
    public override long GetTimestamp() =>
        base.GetTimestamp() + (long)((Int128)Interlocked.Read(ref _offsetTicks) * TimestampFrequency / TimeSpan.TicksPerSecond);
}
