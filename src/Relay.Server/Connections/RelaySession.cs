using System.Buffers;
using System.Net.Security;
using System.Security.Authentication;
using System.Security.Cryptography;
using Microsoft.Extensions.Logging;
using Relay.Protocol;
using Relay.Storage;

namespace Relay.Server.Connections;

/// <summary>
/// One client connection: TLS (optional), the handshake, the read loop that parses and dispatches
/// frames, and the output pipe that every response and push goes through.
/// Split by facet: .Read.cs (read loop), .Write.cs (output), .Queues.cs and .Messages.cs (commands),
/// .Completions.cs (answering what waited for a group commit).
/// </summary>
internal sealed partial class RelaySession : IThreadPoolWorkItem
{
    private readonly RelayServerContext _context;
    private readonly QueueStore _store;
    private readonly RelayServerOptions _options;
    private readonly ILogger _logger;

    private readonly byte[] _sessionId = new byte[ProtocolConstants.SessionIdSize];
    private readonly byte[] _sessionPrivate = new byte[ProtocolConstants.KeySize];
    private readonly byte[] _sessionPublic = new byte[ProtocolConstants.KeySize];

    // Derived auth keys, real and decoy (read loop only).
    private readonly SessionKeys _keys;

    // How long the read loop waits after the request it is handling: the source's key agreements
    // beyond its budget (read loop only; zero almost always).
    private TimeSpan _keyAgreementWait;

    private readonly Lock _subLock = new();
    private readonly Dictionary<QueueHandle, Subscription> _subscriptions = new(ReferenceEqualityComparer.Instance);

    /// <summary>The client's source (PROXY header or socket peer), for the per-source limits only: never logged.</summary>
    public SourceKey Source { get; }

    public RelaySession(RelayServerContext context, SourceKey source = default)
    {
        Source = source;
        _context = context;
        _store = context.Store;
        _options = context.Options;
        _logger = context.Logger;
        _pending = new OutputBuffer(context.Output);
        _inSend = new OutputBuffer(context.Output);
        _keys = new SessionKeys(SessionKeys.DefaultCapacity, context.Keys, _options.KeysWhenMemoryIsShort);
        RandomNumberGenerator.Fill(_sessionId);
        RelayCrypto.GenerateKeyPair(_sessionPrivate, _sessionPublic);
    }

    /// <summary>Runs the session over <paramref name="transport"/> (a socket, or an in-process stream) to its end, counted in the open connections.</summary>
    public async Task RunAsync(Stream transport, IConnectionState connection)
    {
        _context.Metrics.ConnectionOpened();
        try
        {
            // One deadline for TLS and HELLO together: a client cannot hold a connection for longer.
            // Disposed (and dropped) once HELLO is answered: an established session keeps no timer.
            CancellationTokenSource? handshakeTimeout = new(_options.HandshakeTimeout);
            SslStream? ssl = null;
            Stream input = transport;
            try
            {
                if (_options.Tls)
                {
                    ssl = new SslStream(transport, leaveInnerStreamOpen: true);
                    await ssl.AuthenticateAsServerAsync(await _context.Tls!.OptionsAsync(handshakeTimeout.Token), handshakeTimeout.Token);
                    // A client that offers no ALPN at all completes TLS without one: refuse it too (PROTOCOL.md §2).
                    if (!ssl.NegotiatedApplicationProtocol.Protocol.Span.SequenceEqual(ProtocolConstants.Alpn))
                    {
                        throw new AuthenticationException("the client did not offer ALPN relay/1");
                    }
                    if (!TlsMemory.TryReleaseBuffersWhenIdle(ssl) && TlsMemory.FirstFailure())
                    {
                        Log.TlsBuffersKept(_logger);
                    }
                    input = ssl;
                }
                StartOutput(input);
            }
            catch (Exception ex) when (ex is OperationCanceledException or AuthenticationException || IsConnectionFailure(ex))
            {
                _context.Metrics.HandshakeFailed("tls");
                Log.TlsFailed(_logger, ex.GetType().Name);
                handshakeTimeout.Dispose();
                if (ssl != null) await ssl.DisposeAsync();
                return;
            }

            try
            {
                bool welcomed;
                try
                {
                    welcomed = await HandshakeAsync(input, handshakeTimeout);
                }
                finally
                {
                    handshakeTimeout.Dispose();
                    handshakeTimeout = null;
                }
                if (welcomed)
                {
                    _context.Metrics.HandshakeSucceeded();
                    await ReadLoopAsync(input, connection);
                    if (connection.IdleExpired)
                    {
                        Log.IdleClosed(_logger);
                    }
                }
            }
            catch (ProtocolException ex)
            {
                Log.ProtocolViolation(_logger, ex.Code, ex.Message);
                _context.Metrics.ProtocolError(ex.Code);
                WriteError(0, ex.Code);
            }
            catch (OperationCanceledException)
            {
                // A paused read loop whose reading was ended (idle sweep or shutdown) while it waited.
                if (connection.IdleExpired)
                {
                    Log.IdleClosed(_logger);
                }
            }
            catch (Exception ex) when (IsConnectionFailure(ex))
            {
                Log.ConnectionFailed(_logger, ex.GetType().Name);
            }
            finally
            {
                EndAllSubscriptions();
                await WaitForInFlightAsync();
                _keys.Dispose();
                try
                {
                    await CompleteOutputAsync().WaitAsync(TimeSpan.FromSeconds(5));
                }
                catch (Exception)
                {
                    // The peer is gone or too slow; the connection is closing anyway.
                }
                ReturnReadBuffer();
                if (ssl != null)
                {
                    await ssl.DisposeAsync();
                }
            }
        }
        finally
        {
            _context.Metrics.ConnectionClosed();
        }
    }

    /// <summary>
    /// A failure of the transport that ends the connection (a reset, a socket closed or disposed under
    /// a read or write): caught by the session, never the relay's problem. The handshake counts it
    /// (every connection that does not complete its handshake is counted under one result).
    /// </summary>
    private static bool IsConnectionFailure(Exception ex) =>
        ex is IOException or System.Net.Sockets.SocketException or ObjectDisposedException or InvalidOperationException;

    private void EndAllSubscriptions()
    {
        Subscription[] subs;
        lock (_subLock)
        {
            subs = [.. _subscriptions.Values];
            _subscriptions.Clear();
        }
        foreach (var s in subs)
        {
            lock (s.Queue.Sync)
            {
                if (ReferenceEquals(s.Queue.Tag, s))
                {
                    s.Queue.Tag = null;
                    _store.KeepTail(s.Queue, false);
                }
                s.Ended = true;
            }
            s.Dispose();
        }
        _context.Metrics.SubscriptionsChanged(-subs.Length);
    }
}


