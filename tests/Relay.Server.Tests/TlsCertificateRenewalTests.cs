using Relay.Protocol;

namespace Relay.Server.Tests;

/// <summary>
/// The TLS certificate lives 30 days (PROTOCOL.md §1); a relay that runs longer renews it, so a client
/// whose clock agrees with the relay's always gets one that is valid now. The relay's clock is moved
/// by hand; every check is what a client sees in the handshake.
/// </summary>
public class TlsCertificateRenewalTests
{
    private static readonly TimeSpan Lifetime = TimeSpan.FromDays(30);

    [Test]
    public async Task A_relay_that_runs_for_weeks_presents_a_renewed_certificate_and_keeps_its_connections()
    {
        var clock = new OperationsClock();
        await using var relay = await TestRelay.StartAsync(o => o.Clock = clock);
        await using var first = await RawClient.ConnectAsync(relay);
        var original = first.ServerCertificate!;
        await Assert.That(Valid(relay, first, clock)).IsTrue();
        await Assert.That(original.NotAfter.ToUniversalTime()).IsBetween(
            clock.GetUtcNow().UtcDateTime + Lifetime - TimeSpan.FromMinutes(5), clock.GetUtcNow().UtcDateTime + Lifetime);

        // A day and an hour on: a handshake starts the renewal; the next ones get the new certificate.
        clock.Advance(TimeSpan.FromHours(25));
        RawClient? renewed = null;
        await Assert.That(await OperationsMetrics.EventuallyAsync(async () =>
        {
            var client = await RawClient.ConnectAsync(relay);
            if (client.ServerCertificate!.SerialNumber != original.SerialNumber)
            {
                renewed = client;
                return true;
            }
            await client.DisposeAsync();
            return false;
        })).IsTrue();
        await using (renewed)
        {
            await Assert.That(Valid(relay, renewed!, clock)).IsTrue();
            // Valid for 30 days from the renewal, a day past the first one's end.
            await Assert.That(renewed!.ServerCertificate!.NotAfter.ToUniversalTime())
                .IsGreaterThan(original.NotAfter.ToUniversalTime() + TimeSpan.FromHours(24));
            await Assert.That(relay.Logs.Lines.Count(l => l.Contains("[39]"))).IsEqualTo(1);

            // The connections made with the old certificate go on.
            var pong = await first.RequestAsync(RawClient.Frame(FrameType.Ping, first.NextCorr(), []));
            await Assert.That(pong.Type).IsEqualTo(FrameType.Pong);
        }
    }

    [Test]
    public async Task After_a_month_without_a_handshake_the_next_one_gets_a_certificate_valid_now()
    {
        var clock = new OperationsClock();
        await using var relay = await TestRelay.StartAsync(o => o.Clock = clock);
        await using (var client = await RawClient.ConnectAsync(relay))
        {
            await Assert.That(Valid(relay, client, clock)).IsTrue();
        }

        // The certificate expired while nobody connected: the handshake waits for a new one.
        clock.Advance(Lifetime + TimeSpan.FromDays(1));
        await using var late = await RawClient.ConnectAsync(relay);
        await Assert.That(Valid(relay, late, clock)).IsTrue();
        var pong = await late.RequestAsync(RawClient.Frame(FrameType.Ping, late.NextCorr(), []));
        await Assert.That(pong.Type).IsEqualTo(FrameType.Pong);
    }

    /// <summary>
    /// Handshakes that come together while the certificate is due make one renewal between them:
    /// one line of event 39, and every handshake after it presents the same new certificate.
    /// </summary>
    [Test]
    public async Task Handshakes_that_come_together_at_the_renewal_renew_the_certificate_once()
    {
        var clock = new OperationsClock();
        await using var relay = await TestRelay.StartAsync(o => o.Clock = clock);
        string original;
        await using (var first = await RawClient.ConnectAsync(relay))
        {
            original = first.ServerCertificate!.SerialNumber;
        }
        clock.Advance(TimeSpan.FromHours(25));
        var serials = new System.Collections.Concurrent.ConcurrentBag<string>();
        using var deadline = new CancellationTokenSource(TimeSpan.FromSeconds(20));
        async Task HandshakeUntilRenewedAsync()
        {
            while (!deadline.IsCancellationRequested)
            {
                await using var client = await RawClient.ConnectAsync(relay);
                string serial = client.ServerCertificate!.SerialNumber;
                if (serial != original)
                {
                    serials.Add(serial);
                    return;
                }
            }
        }
        await Task.WhenAll(Enumerable.Range(0, 8).Select(_ => Task.Run(HandshakeUntilRenewedAsync)));
        await Assert.That(serials.Count).IsEqualTo(8);
        await using (var after = await RawClient.ConnectAsync(relay))
        {
            serials.Add(after.ServerCertificate!.SerialNumber);
        }
        await Assert.That(serials.Distinct().Count()).IsEqualTo(1);
        await Assert.That(relay.Logs.Lines.Count(l => l.Contains("[39]"))).IsEqualTo(1);
    }

    /// <summary>The client's check (PROTOCOL.md §2) with the relay's clock as the client's.</summary>
    private static bool Valid(TestRelay relay, RawClient client, OperationsClock clock) =>
        RelayAddress.VerifyChain(client.ServerCertificate!, client.PresentedChain, relay.Server.Fingerprint, clock.GetUtcNow().UtcDateTime);
}
