using System.Diagnostics;
using System.Security.Cryptography;
using Relay.Client.Transport;
using Relay.Protocol;
using Relay.Server.Connections;

namespace Relay.Server.Tests;

/// <summary>
/// The per-source key-agreement budget (--key-agreement-rate, --key-agreement-burst): a source that
/// names more queue keys than the budget allows gets its answers more slowly (never a different one),
/// real and missing queues are charged alike, keys already used on a connection are free, and other
/// sources are not slowed.
/// </summary>
public class KeyAgreementLimitTests
{
    private static RecipientQueue RandomQueue() => new(
        RandomNumberGenerator.GetBytes(ProtocolConstants.IdSize), RandomNumberGenerator.GetBytes(ProtocolConstants.IdSize),
        RandomNumberGenerator.GetBytes(ProtocolConstants.KeySize), RandomNumberGenerator.GetBytes(ProtocolConstants.KeySize));

    private static Task<RelayConnection> ConnectThroughAsync(TestRelay relay, HeaderProxy proxy) =>
        ProxyProtocolServerTests.ConnectThroughAsync(relay, proxy);

    private static async Task<double> WaitsAsync(TestRelay relay) =>
        OperationsMetrics.Value(await OperationsMetrics.ScrapeAsync(relay), "relay_key_agreement_waits_total");

    private static async Task<ErrorCode> RefusalAsync(Task<Delivery?> get)
    {
        var refused = await Assert.ThrowsAsync<RelayErrorException>(async () => await get);
        return refused!.Code;
    }

    [Test]
    public async Task Random_queue_ids_beyond_the_burst_are_answered_at_the_rate_and_another_source_is_not_slowed()
    {
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.ProxyProtocol = true;
            o.KeyAgreementBurst = 4;   // the connection's own, and 3 queue keys
            o.KeyAgreementRate = 1;
        });
        await using var fromA = new HeaderProxy(relay.Server.RelayEndPoint, HeaderProxy.V2("192.0.2.1"));
        await using var fromB = new HeaderProxy(relay.Server.RelayEndPoint, HeaderProxy.V2("192.0.2.2"));
        // The bucket refills from the first agreement on: time counts from before A connects.
        var watch = Stopwatch.StartNew();
        await using var a = await ConnectThroughAsync(relay, fromA);
        await using var b = await ConnectThroughAsync(relay, fromB);

        // Source A pipelines 7 GETs naming queues that do not exist: 3 within the burst (after its
        // connection's own), then 4 beyond it at 1 a second. Every answer is AUTH, as without the budget.
        var flood = Enumerable.Range(0, 7).Select(_ => RefusalAsync(a.GetAsync(RandomQueue()))).ToArray();
        await flood[2];
        await Assert.That(flood[6].IsCompleted).IsFalse();

        // Meanwhile source B, with its own bucket, is answered at once: its 3 probes and a PING
        // complete while A still waits.
        for (int i = 0; i < 3; i++)
        {
            await Assert.That(await RefusalAsync(b.GetAsync(RandomQueue()))).IsEqualTo(ErrorCode.Auth);
        }
        await b.PingAsync();
        await Assert.That(flood[6].IsCompleted).IsFalse();

        foreach (var code in await Task.WhenAll(flood))
        {
            await Assert.That(code).IsEqualTo(ErrorCode.Auth);
        }
        // 8 agreements (the connection and 7 keys) from a bucket of 4 refilling at 1 a second: the 7th
        // GET is read 3 seconds after the connection at the earliest (its own wait comes after its answer).
        await Assert.That(watch.Elapsed).IsGreaterThanOrEqualTo(TimeSpan.FromSeconds(2.9));
        await Assert.That(await WaitsAsync(relay)).IsEqualTo(4);
        // The operator is told once (event 41, at most a line every 10 s), with nothing of the source.
        var told = relay.Logs.Lines.Where(l => l.Contains("more key agreements than")).ToList();
        await Assert.That(told.Count).IsEqualTo(1);
        await Assert.That(told[0].Contains("192.0.2")).IsFalse();
        // The connection goes on.
        await a.PingAsync();
    }

    [Test]
    public async Task Real_queues_are_charged_like_missing_ones_and_keys_already_used_are_free()
    {
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.ProxyProtocol = true;
            o.KeyAgreementBurst = 4;   // the reader's connection, and 3 queue keys
            o.KeyAgreementRate = 2;
        });
        await using var owner = new HeaderProxy(relay.Server.RelayEndPoint, HeaderProxy.V2("192.0.2.10"));
        await using var reader = new HeaderProxy(relay.Server.RelayEndPoint, HeaderProxy.V2("192.0.2.11"));
        await using var creator = await ConnectThroughAsync(relay, owner);
        var queues = new List<RecipientQueue>();
        for (int i = 0; i < 5; i++)
        {
            queues.Add(await creator.CreateQueueAsync());
        }

        // Another source reads the 5 real queues: the first use of each key is an agreement, so the
        // 4th and 5th wait as a missing queue's would.
        await using var r = await ConnectThroughAsync(relay, reader);
        foreach (var q in queues)
        {
            await Assert.That(await r.GetAsync(q)).IsNull();
        }
        await Assert.That(await WaitsAsync(relay)).IsEqualTo(2);

        // The same keys again, many times: cached on the connection, never charged.
        for (int round = 0; round < 10; round++)
        {
            foreach (var q in queues)
            {
                await Assert.That(await r.GetAsync(q)).IsNull();
            }
        }
        await Assert.That(await WaitsAsync(relay)).IsEqualTo(2);
    }

    [Test]
    public async Task A_source_that_reconnects_beyond_the_burst_waits_before_each_handshake_and_others_do_not()
    {
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.ProxyProtocol = true;
            o.KeyAgreementBurst = 2;
            o.KeyAgreementRate = 1;
        });
        await using var fromA = new HeaderProxy(relay.Server.RelayEndPoint, HeaderProxy.V2("192.0.2.30"));
        await using var fromB = new HeaderProxy(relay.Server.RelayEndPoint, HeaderProxy.V2("192.0.2.31"));
        var watch = Stopwatch.StartNew();
        for (int i = 0; i < 4; i++)
        {
            await using var c = await ConnectThroughAsync(relay, fromA);
            await c.PingAsync();
        }
        // Two within the burst, then two more a second apart.
        await Assert.That(watch.Elapsed).IsGreaterThanOrEqualTo(TimeSpan.FromSeconds(1.9));
        await Assert.That(await WaitsAsync(relay)).IsEqualTo(2);

        // Another source connects without waiting.
        await using var b = await ConnectThroughAsync(relay, fromB);
        await b.PingAsync();
        await Assert.That(await WaitsAsync(relay)).IsEqualTo(2);
    }

    [Test]
    public async Task Limit_off_with_zero()
    {
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.ProxyProtocol = true;
            o.KeyAgreementBurst = 1;
            o.KeyAgreementRate = 0;
        });
        await using var proxy = new HeaderProxy(relay.Server.RelayEndPoint, HeaderProxy.V2("192.0.2.20"));
        await using var c = await ConnectThroughAsync(relay, proxy);
        for (int i = 0; i < 20; i++)
        {
            await Assert.That(await RefusalAsync(c.GetAsync(RandomQueue()))).IsEqualTo(ErrorCode.Auth);
        }
        await Assert.That(await WaitsAsync(relay)).IsEqualTo(0);
    }

    [Test]
    public async Task The_bucket_refills_at_the_rate_and_a_source_is_forgotten_once_it_is_full()
    {
        var clock = new FrozenClock();
        var limiter = new SourceLimiter(maxConnectionsPerSource: 10, creationsPerMinute: 30, creationBurst: 100, clock,
            agreementsPerSecond: 10, agreementBurst: 2);
        var source = SourceKey.From(System.Net.IPAddress.Parse("198.51.100.7"));
        await Assert.That(limiter.TryOpen(source)).IsTrue();

        var waits = new List<TimeSpan>();
        for (int i = 0; i < 4; i++)
        {
            waits.Add(limiter.KeyAgreement(source));
        }
        // Two within the burst; then each one more is a tenth of a second more debt, and a wait covers
        // the debt and a tenth of a second of refill beyond it.
        var refill = SourceLimiter.AgreementRefill;
        await Assert.That(waits).IsEquivalentTo([TimeSpan.Zero, TimeSpan.Zero, TimeSpan.FromMilliseconds(100) + refill, TimeSpan.FromMilliseconds(200) + refill]);
        // Half the debt paid: the next waits for the rest, its own, and the refill.
        clock.Advance(TimeSpan.FromMilliseconds(100));
        await Assert.That(limiter.KeyAgreement(source)).IsEqualTo(TimeSpan.FromMilliseconds(200) + refill);

        // Another source has its own bucket.
        await Assert.That(limiter.KeyAgreement(SourceKey.From(System.Net.IPAddress.Parse("198.51.100.8")))).IsEqualTo(TimeSpan.Zero);
        // An unknown source (in-process connections) is never charged.
        for (int i = 0; i < 10; i++)
        {
            await Assert.That(limiter.KeyAgreement(SourceKey.None)).IsEqualTo(TimeSpan.Zero);
        }

        // After the debt is paid and the burst refilled, the next is free again.
        clock.Advance(TimeSpan.FromSeconds(1));
        await Assert.That(limiter.KeyAgreement(source)).IsEqualTo(TimeSpan.Zero);

        // Closed with a bucket not yet full: remembered (a reconnect would get a fresh burst otherwise).
        limiter.Close(source);
        await Assert.That(limiter.TrackedSources).IsEqualTo(2);
        clock.Advance(TimeSpan.FromMinutes(2));
        await Assert.That(limiter.TryOpen(source)).IsTrue();
        limiter.Close(source);
        // Full again and no connection: forgotten (the other source too, at the next prune).
        await Assert.That(limiter.TrackedSources).IsEqualTo(0);
    }
}

/// <summary>A clock that moves only when told to.</summary>
internal sealed class FrozenClock : TimeProvider
{
    private long _timestamp = 1_000_000;
    public void Advance(TimeSpan by) => _timestamp += (long)(by.TotalSeconds * TimestampFrequency);
    public override long GetTimestamp() => _timestamp;
    public override DateTimeOffset GetUtcNow() => new DateTimeOffset(2026, 1, 1, 0, 0, 0, TimeSpan.Zero).AddSeconds((double)_timestamp / TimestampFrequency);
}
