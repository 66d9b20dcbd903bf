using System.Net.Security;
using System.Security.Authentication;
using System.Security.Cryptography.X509Certificates;
using Microsoft.Extensions.Logging;
using Relay.Protocol;

namespace Relay.Server.Hosting;

/// <summary>
/// The relay's TLS certificate (PROTOCOL.md §1): short-lived, signed by the identity key, made in the
/// background at start-up and made again while the relay runs, so that a relay serving for months
/// never presents an expired one. A handshake that finds the certificate older than
/// <see cref="RenewAfter"/> starts its renewal (in the background, one at a time) and goes on with
/// the current one; only a handshake that finds it expired (no handshake for a whole
/// <see cref="Lifetime"/>) waits for the new one. Times are the relay's clock.
/// </summary>
internal sealed class TlsCertificates : IDisposable
{
    /// <summary>How long a TLS certificate is valid (from an hour before it was made, for clients whose clock is behind).</summary>
    public static readonly TimeSpan Lifetime = TimeSpan.FromDays(30);

    /// <summary>The age at which the next handshake starts making a new certificate.</summary>
    public static readonly TimeSpan RenewAfter = TimeSpan.FromDays(1);

    /// <summary>After a renewal failed (event 40), the time before a handshake tries again.</summary>
    private static readonly TimeSpan RetryAfterFailure = TimeSpan.FromHours(1);

    private readonly RelayIdentity _identity;
    private readonly TimeProvider _clock;
    private readonly ILogger _logger;
    private readonly Lock _lock = new();
    private readonly Task<Issued> _first;
    private volatile Issued? _current;
    // The certificate before the current one: a handshake that took it just before a renewal may still
    // be using it, so it is disposed only at the next renewal (a day later) or with the relay.
    private Issued? _previous;
    private Task<Issued?>? _renewal;
    private DateTimeOffset _noRenewalBefore;
    private bool _disposed;

    /// <summary>Starts making the first certificate in the background.</summary>
    public TlsCertificates(RelayIdentity identity, TimeProvider clock, ILogger logger)
    {
        _identity = identity;
        _clock = clock;
        _logger = logger;
        _first = Task.Run(IssueFirst);
    }

    /// <summary>
    /// The first certificate's making: faults when the identity cannot sign a certificate, and the
    /// relay then cannot serve a single TLS client (event 7).
    /// </summary>
    public Task Started => _first;

    /// <summary>The settings for one TLS handshake, with a certificate that is valid now.</summary>
    public async ValueTask<SslServerAuthenticationOptions> OptionsAsync(CancellationToken cancellationToken)
    {
        Issued current = _current ?? await _first.WaitAsync(cancellationToken).ConfigureAwait(false);
        DateTimeOffset now = _clock.GetUtcNow();
        if (now - current.Made >= RenewAfter)
        {
            if (Renew(current, now) is not { } renewal)
            {
                // Renewed since it was read (or the relay stops): the newest one.
                current = _current ?? current;
            }
            else if (now >= current.NotAfter)
            {
                current = await renewal.WaitAsync(cancellationToken).ConfigureAwait(false) ?? current;
            }
        }
        return current.Options;
    }

    /// <summary>
    /// The renewal of <paramref name="due"/> in progress, started now unless one failed less than an
    /// hour ago; null once disposed, or when <paramref name="due"/> was renewed meanwhile (a handshake
    /// that read it just before a renewal put the next one in place must not start another).
    /// </summary>
    private Task<Issued?>? Renew(Issued due, DateTimeOffset now)
    {
        lock (_lock)
        {
            if (_disposed || (_renewal is null && !ReferenceEquals(_current, due)))
            {
                return null;
            }
            if (_renewal is null && now >= _noRenewalBefore)
            {
                _renewal = Task.Run(RenewCore);
            }
            return _renewal;
        }
    }

    private Issued IssueFirst()
    {
        Issued issued = Issue();
        lock (_lock)
        {
            if (_disposed)
            {
                issued.Dispose();
            }
            else
            {
                _current = issued;
            }
        }
        return issued;
    }

    /// <summary>
    /// Makes the next certificate and puts it in place. On a failure the current one stays (valid for
    /// weeks yet, unless no handshake came for a month): the failure is logged, retried an hour later,
    /// and the result is null, as it is once the relay stopped.
    /// </summary>
    private Issued? RenewCore()
    {
        Issued issued;
        try
        {
            issued = Issue();
        }
        catch (Exception ex)
        {
            Issued? kept;
            lock (_lock)
            {
                _renewal = null;
                _noRenewalBefore = _clock.GetUtcNow() + RetryAfterFailure;
                kept = _current;
            }
            if (kept is not null)
            {
                Log.TlsRenewalFailed(_logger, ex.GetType().Name, kept.NotAfter);
            }
            return null;
        }
        Issued? retired;
        lock (_lock)
        {
            _renewal = null;
            if (_disposed)
            {
                issued.Dispose();
                return null;
            }
            retired = _previous;
            _previous = _current;
            // Logged before it is handed out: a handshake that presents it finds the line written.
            Log.TlsRenewed(_logger, issued.NotAfter);
            _current = issued;
        }
        retired?.Dispose();
        return issued;
    }

    private Issued Issue()
    {
        DateTimeOffset now = _clock.GetUtcNow();
        X509Certificate2 certificate = _identity.CreateTlsCertificate(now, Lifetime);
        X509Certificate2? chainOnly = null;
        try
        {
            chainOnly = X509CertificateLoader.LoadCertificate(_identity.IdentityCertificate.RawData);
            var options = new SslServerAuthenticationOptions
            {
                ServerCertificateContext = SslStreamCertificateContext.Create(certificate, [chainOnly], offline: true),
                ApplicationProtocols = [new SslApplicationProtocol(ProtocolConstants.AlpnString)],
                EnabledSslProtocols = SslProtocols.Tls13,
                ClientCertificateRequired = false,
                CertificateRevocationCheckMode = X509RevocationMode.NoCheck,
            };
            return new Issued(certificate, chainOnly, options, now, now + Lifetime);
        }
        catch
        {
            certificate.Dispose();
            chainOnly?.Dispose();
            throw;
        }
    }

    /// <summary>Disposes the certificates made (one still being made is disposed when it is done).</summary>
    public void Dispose()
    {
        Issued? current, previous;
        lock (_lock)
        {
            if (_disposed)
            {
                return;
            }
            _disposed = true;
            current = _current;
            previous = _previous;
            _current = null;
            _previous = null;
        }
        current?.Dispose();
        previous?.Dispose();
    }

    private sealed class Issued(X509Certificate2 certificate, X509Certificate2 chainOnly, SslServerAuthenticationOptions options,
        DateTimeOffset made, DateTimeOffset notAfter) : IDisposable
    {
        public SslServerAuthenticationOptions Options { get; } = options;
        public DateTimeOffset Made { get; } = made;
        public DateTimeOffset NotAfter { get; } = notAfter;

        public void Dispose()
        {
            certificate.Dispose();
            chainOnly.Dispose();
        }
    }
}
