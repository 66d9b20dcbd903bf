using Relay.Client;
using Relay.Client.Transport;

namespace Relay.Server.Tests;

/// <summary>
/// A <see cref="RelayClientOptions"/> or <see cref="RelayConnectionOptions"/> value the client cannot work with is refused where the app sets
/// it, naming the option, instead of making every connection, renewal or reconnection fail for as long
/// as the app runs.
/// </summary>
public class ClientOptionsTests
{
    private const long TicksPerMillisecond = TimeSpan.TicksPerMillisecond;
    private const long FortyNineDays = 49 * TimeSpan.TicksPerDay;

    /// <summary>
    /// The ConnectTimeout of RelayConnectionOptions (the transport's, of a bare connection), which took
    /// any value: zero made every ConnectAsync with it time out at once, and a negative value or one
    /// over the timers' ~49.7 days made it throw from CancelAfter. Checked as the client's times are.
    /// </summary>
    private const string ConnectionConnectTimeout = $"{nameof(RelayConnectionOptions)}.{nameof(RelayConnectionOptions.ConnectTimeout)}";

    private static object WithTime(string option, TimeSpan value) => option switch
    {
        nameof(RelayClientOptions.KeepAlive) => new RelayClientOptions { KeepAlive = value },
        nameof(RelayClientOptions.ConnectTimeout) => new RelayClientOptions { ConnectTimeout = value },
        nameof(RelayClientOptions.ReconnectMin) => new RelayClientOptions { ReconnectMin = value, ReconnectMax = TimeSpan.FromDays(49) },
        nameof(RelayClientOptions.ReconnectMax) => new RelayClientOptions { ReconnectMin = TimeSpan.FromMilliseconds(1), ReconnectMax = value },
        ConnectionConnectTimeout => new RelayConnectionOptions { ConnectTimeout = value },
        _ => throw new ArgumentException(option),
    };

    [Test]
    [Arguments(nameof(RelayClientOptions.KeepAlive), 0L)]
    [Arguments(nameof(RelayClientOptions.KeepAlive), -TimeSpan.TicksPerSecond)]
    [Arguments(nameof(RelayClientOptions.KeepAlive), -TicksPerMillisecond)]            // Timeout.InfiniteTimeSpan
    [Arguments(nameof(RelayClientOptions.KeepAlive), TicksPerMillisecond / 2)]
    [Arguments(nameof(RelayClientOptions.KeepAlive), FortyNineDays + 1)]
    [Arguments(nameof(RelayClientOptions.KeepAlive), long.MaxValue)]
    [Arguments(nameof(RelayClientOptions.ConnectTimeout), 0L)]
    [Arguments(nameof(RelayClientOptions.ConnectTimeout), -TimeSpan.TicksPerSecond)]
    [Arguments(nameof(RelayClientOptions.ConnectTimeout), -TicksPerMillisecond)]
    [Arguments(nameof(RelayClientOptions.ConnectTimeout), TicksPerMillisecond / 2)]
    [Arguments(nameof(RelayClientOptions.ConnectTimeout), FortyNineDays + 1)]
    [Arguments(nameof(RelayClientOptions.ReconnectMin), 0L)]
    [Arguments(nameof(RelayClientOptions.ReconnectMin), -TimeSpan.TicksPerSecond)]
    [Arguments(nameof(RelayClientOptions.ReconnectMin), -TicksPerMillisecond)]
    [Arguments(nameof(RelayClientOptions.ReconnectMin), TicksPerMillisecond / 2)]
    [Arguments(nameof(RelayClientOptions.ReconnectMin), FortyNineDays + 1)]
    [Arguments(nameof(RelayClientOptions.ReconnectMax), 0L)]
    [Arguments(nameof(RelayClientOptions.ReconnectMax), -TimeSpan.TicksPerSecond)]
    [Arguments(nameof(RelayClientOptions.ReconnectMax), -TicksPerMillisecond)]
    [Arguments(nameof(RelayClientOptions.ReconnectMax), FortyNineDays + 1)]
    [Arguments(ConnectionConnectTimeout, 0L)]
    [Arguments(ConnectionConnectTimeout, -TimeSpan.TicksPerSecond)]
    [Arguments(ConnectionConnectTimeout, -TicksPerMillisecond)]
    [Arguments(ConnectionConnectTimeout, TicksPerMillisecond / 2)]
    [Arguments(ConnectionConnectTimeout, FortyNineDays + 1)]
    [Arguments(ConnectionConnectTimeout, long.MaxValue)]
    public async Task A_time_out_of_range_is_refused_naming_its_option(string option, long ticks)
    {
        var refused = Assert.Throws<ArgumentOutOfRangeException>(() => WithTime(option, TimeSpan.FromTicks(ticks)));
        await Assert.That(refused.ParamName).IsEqualTo(option.Split('.')[^1]);
        await Assert.That(refused.Message).Contains("1 ms to 49 days");
    }

    [Test]
    [Arguments(nameof(RelayClientOptions.KeepAlive))]
    [Arguments(nameof(RelayClientOptions.ConnectTimeout))]
    [Arguments(nameof(RelayClientOptions.ReconnectMin))]
    [Arguments(nameof(RelayClientOptions.ReconnectMax))]
    [Arguments(ConnectionConnectTimeout)]
    public async Task A_time_at_either_end_of_its_range_is_taken(string option)
    {
        foreach (var value in new[] { TimeSpan.FromMilliseconds(1), TimeSpan.FromDays(49) })
        {
            if (WithTime(option, value) is RelayConnectionOptions connection)
            {
                await Assert.That(connection.ConnectTimeout).IsEqualTo(value);
                continue;
            }
            var options = (RelayClientOptions)WithTime(option, value);
            await using var client = new RelayClient(options);
            var taken = option switch
            {
                nameof(RelayClientOptions.KeepAlive) => client.Options.KeepAlive,
                nameof(RelayClientOptions.ConnectTimeout) => client.Options.ConnectTimeout,
                nameof(RelayClientOptions.ReconnectMin) => client.Options.ReconnectMin,
                _ => client.Options.ReconnectMax,
            };
            await Assert.That(taken).IsEqualTo(value);
        }
    }

    /// <summary>A window of 0 made every SUB, and so every renewal after a reconnection, fail; one over 64 is more than any relay grants.</summary>
    [Test]
    [Arguments(0)]
    [Arguments(-1)]
    [Arguments(65)]
    [Arguments(int.MaxValue)]
    public async Task A_delivery_window_out_of_range_is_refused(int window)
    {
        var refused = Assert.Throws<ArgumentOutOfRangeException>(() => new RelayClientOptions { DeliveryWindow = window });
        await Assert.That(refused.ParamName).IsEqualTo(nameof(RelayClientOptions.DeliveryWindow));
        await Assert.That(refused.Message).Contains("1 to 64");
    }

    [Test]
    [Arguments(1)]
    [Arguments(64)]
    public async Task A_delivery_window_at_either_end_of_its_range_is_taken(int window)
    {
        await Assert.That(new RelayClientOptions { DeliveryWindow = window }.DeliveryWindow).IsEqualTo(window);
    }

    /// <summary>A negative RetryFor gave up after one attempt; Timeout.InfiniteTimeSpan, which reads as "for ever", did the same.</summary>
    [Test]
    [Arguments(-TicksPerMillisecond)]
    [Arguments(-1L)]
    [Arguments(long.MinValue)]
    public async Task A_negative_RetryFor_is_refused(long ticks)
    {
        var refused = Assert.Throws<ArgumentOutOfRangeException>(() => new RelayClientOptions { RetryFor = TimeSpan.FromTicks(ticks) });
        await Assert.That(refused.ParamName).IsEqualTo(nameof(RelayClientOptions.RetryFor));
        await Assert.That(refused.Message).Contains("null to try for ever");
    }

    [Test]
    public async Task A_RetryFor_of_zero_or_null_is_taken()
    {
        await Assert.That(new RelayClientOptions { RetryFor = TimeSpan.Zero }.RetryFor).IsEqualTo(TimeSpan.Zero);
        await Assert.That(new RelayClientOptions { RetryFor = null }.RetryFor).IsNull();
    }

    [Test]
    public async Task A_ReconnectMin_above_ReconnectMax_is_refused_when_the_client_is_made()
    {
        var options = new RelayClientOptions { ReconnectMin = TimeSpan.FromSeconds(2), ReconnectMax = TimeSpan.FromSeconds(1) };
        var refused = Assert.Throws<ArgumentException>(() => new RelayClient(options));
        await Assert.That(refused.Message).Contains(nameof(RelayClientOptions.ReconnectMin));
        await Assert.That(refused.Message).Contains(nameof(RelayClientOptions.ReconnectMax));

        // Equal is a back-off of constant steps: taken.
        await using var client = new RelayClient(new RelayClientOptions { ReconnectMin = TimeSpan.FromSeconds(1), ReconnectMax = TimeSpan.FromSeconds(1) });
    }

    /// <summary>
    /// A Socks that is not host:port made every connection fail with a FormatException, for as long as
    /// the app ran; RelayConnectionOptions (the transport's, of a bare connection) took one without a word too.
    /// </summary>
    [Test]
    [Arguments("")]
    [Arguments("not a host")]
    [Arguments("proxy")]
    [Arguments("proxy:")]
    [Arguments(":1080")]
    [Arguments("[]:1080")]
    [Arguments("proxy:0")]
    [Arguments("proxy:99999")]
    [Arguments("proxy:-1")]
    [Arguments("proxy:+1080")]
    [Arguments("proxy:10 80")]
    [Arguments("not a host:1080")]
    public async Task A_Socks_that_is_not_host_and_port_is_refused_naming_it(string socks)
    {
        foreach (var set in new Action[] { () => _ = new RelayClientOptions { Socks = socks }, () => _ = new RelayConnectionOptions { Socks = socks } })
        {
            var refused = Assert.Throws<ArgumentException>(set);
            await Assert.That(refused.ParamName).IsEqualTo(nameof(RelayClientOptions.Socks));
            await Assert.That(refused.Message).Contains("HOST:PORT");
            await Assert.That(refused.Message).Contains(socks);
        }
    }

    [Test]
    [Arguments("127.0.0.1:9050")]
    [Arguments("localhost:1080")]
    [Arguments("ss-local:1")]
    [Arguments("proxy.example:65535")]
    [Arguments("[::1]:9050")]
    public async Task A_Socks_of_host_and_port_is_taken(string socks)
    {
        await using var client = new RelayClient(new RelayClientOptions { Socks = socks });
        await Assert.That(client.Options.Socks).IsEqualTo(socks);
        await Assert.That(new RelayClientOptions { Socks = null }.Socks).IsNull();
        await Assert.That(new RelayConnectionOptions { Socks = socks }.Socks).IsEqualTo(socks);
        await Assert.That(new RelayConnectionOptions { Socks = null }.Socks).IsNull();
    }
}
