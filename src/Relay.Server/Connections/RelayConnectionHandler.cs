using System.Buffers;

namespace Relay.Server.Connections;

/// <summary>
/// Accepts relay connections: enforces the connection limits, reads the PROXY header when configured,
/// and runs one session each.
/// </summary>
internal sealed class RelayConnectionHandler(RelayServerContext context)
{
    private int _open;

    public int OpenConnections => Volatile.Read(ref _open);

    /// <summary>
    /// Runs one connection that <see cref="TryAdmit"/> let in to its end and closes it (its slot given
    /// back); never throws.
    /// </summary>
    public async Task OnConnectedAsync(ClientStream connection)
    {
        try
        {
            // The source: the client address of the PROXY header, else the socket's peer. Memory only.
            var source = SourceKey.From(connection.RemoteEndPoint);
            if (context.Options.ProxyProtocol)
            {
                var (header, failure) = await ReadProxyHeaderAsync(connection);
                if (failure != null)
                {
                    Log.ConnectionFailed(context.Logger, failure);
                    if (failure != ClosedBeforeHeader && !context.Stopping.IsCancellationRequested)
                    {
                        context.Metrics.ConnectionRejected("proxy_header");
                    }
                    connection.Close(abort: true);
                    return;
                }
                // LOCAL (health checks), UNKNOWN, UNSPEC and UNIX name no client: the proxy's address stands in.
                if (header.Source != null)
                {
                    source = SourceKey.From(header.Source.Address);
                }
            }
            if (!context.Sources.TryOpen(source))
            {
                Refuse("max_connections_per_source");
                connection.Close(abort: true);
                return;
            }
            try
            {
                // A connection costs key agreements (TLS's, and the session key of HELLO's answer):
                // it is charged to the source's budget like a queue key, and beyond it waits before
                // its handshake, so a source that reconnects in a loop is slowed like one naming
                // random queue ids.
                var wait = context.Sources.KeyAgreement(source);
                if (wait != TimeSpan.Zero)
                {
                    context.KeyAgreementWaited(wait);
                    await Task.Delay(wait, context.Options.Clock, context.Stopping.Token);
                }
                await RunSessionAsync(connection, connection, source);
            }
            catch (OperationCanceledException) when (context.Stopping.IsCancellationRequested)
            {
                // Stopping while the connection waited for its source's budget: closed below.
            }
            finally
            {
                context.Sources.Close(source);
            }
        }
        catch (Exception ex)
        {
            // The session answers every expected failure itself; this is the last guard of the process.
            Log.ConnectionFailed(context.Logger, ex.GetType().Name);
        }
        finally
        {
            Interlocked.Decrement(ref _open);
            connection.Close(abort: false);
        }
    }

    /// <summary>
    /// Runs one in-process connection to its end and closes it; never throws. Counted against the
    /// connection limit like a socket; it has no source, so the per-source limits do not apply.
    /// </summary>
    public async Task OnConnectedAsync(InProcessConnection connection)
    {
        if (!TryAdmit())
        {
            connection.Dispose();
            return;
        }
        try
        {
            await RunSessionAsync(connection, connection, SourceKey.None);
        }
        catch (Exception ex)
        {
            Log.ConnectionFailed(context.Logger, ex.GetType().Name);
        }
        finally
        {
            Interlocked.Decrement(ref _open);
            connection.Dispose();
        }
    }

    /// <summary>
    /// Takes a connection slot; false (the refusal counted and logged) when the relay is full or
    /// stopping. The accept loop asks before it hands a socket on, and closes a refused one at once:
    /// under load the thread pool may run a queued connection much later, and refused sockets waiting
    /// for it would hold descriptors past the open files limit (which the store needs).
    /// </summary>
    public bool TryAdmit()
    {
        if (Interlocked.Increment(ref _open) <= context.ConnectionLimit && !context.Stopping.IsCancellationRequested)
        {
            return true;
        }
        Interlocked.Decrement(ref _open);
        Refuse(context.Stopping.IsCancellationRequested ? "stopping" : "max_connections");
        return false;
    }

    /// <summary>Gives back the slot of an admitted connection that will not run (reset before its set-up, or the relay is stopping).</summary>
    public void Release() => Interlocked.Decrement(ref _open);

    private void Refuse(string reason)
    {
        context.Metrics.ConnectionRejected(reason);
        Log.ConnectionRejected(context, reason);
    }

    // Not async: one state machine fewer per connection (the session counts itself open).
    private Task RunSessionAsync(Stream transport, IConnectionState state, SourceKey source)
        => new RelaySession(context, source).RunAsync(transport, state);

    /// <summary>
    /// Reads the PROXY header from the socket before TLS, within <see cref="RelayServerOptions.ProxyHeaderTimeout"/>.
    /// Consumes exactly the header: bytes read after it (the TLS ClientHello, often in the same packet) are
    /// put back for the session. Without a valid header, returns the reason (a word, no address); a peer
    /// that closed before sending a byte (a port probe, a client that gave up at the proxy) is no header failure.
    /// </summary>
    private async Task<(ProxyHeader Header, string? Failure)> ReadProxyHeaderAsync(ClientStream connection)
    {
        using var timeout = new CancellationTokenSource(context.Options.ProxyHeaderTimeout);
        using var linked = CancellationTokenSource.CreateLinkedTokenSource(timeout.Token, context.Stopping.Token);
        var buffer = ArrayPool<byte>.Shared.Rent(ProxyProtocol.MaxHeaderLength);
        int received = 0;
        try
        {
            while (true)
            {
                int n = await connection.ReadAsync(buffer.AsMemory(received, ProxyProtocol.MaxHeaderLength - received), linked.Token);
                received += n;
                var status = ProxyProtocol.TryParse(buffer.AsSpan(0, received), out var header, out int consumed);
                if (status == OperationStatus.Done)
                {
                    if (consumed < received)
                    {
                        connection.Unread(buffer.AsSpan(consumed, received - consumed).ToArray());
                    }
                    return (header, null);
                }
                if (status == OperationStatus.InvalidData)
                {
                    return (default, InvalidHeader);
                }
                if (n == 0 || received == ProxyProtocol.MaxHeaderLength)
                {
                    return (default, received == 0 ? ClosedBeforeHeader : MissingHeader);
                }
            }
        }
        catch (OperationCanceledException)
        {
            return (default, timeout.IsCancellationRequested ? HeaderTimeout : received == 0 ? ClosedBeforeHeader : MissingHeader);
        }
        catch (Exception ex) when (ex is IOException or System.Net.Sockets.SocketException or ObjectDisposedException or InvalidOperationException)
        {
            return (default, received == 0 ? ClosedBeforeHeader : MissingHeader);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    private const string InvalidHeader = "proxy_header_invalid";
    private const string MissingHeader = "proxy_header_missing";
    private const string HeaderTimeout = "proxy_header_timeout";
    private const string ClosedBeforeHeader = "proxy_header_closed";
}
