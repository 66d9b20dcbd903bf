using Microsoft.AspNetCore.Connections;

namespace Relay.Server.Connections;

/// <summary>Accepts relay connections: enforces the connection limit and runs one session each.</summary>
internal sealed class RelayConnectionHandler(RelayServerContext context)
{
    private int _open;

    public int OpenConnections => Volatile.Read(ref _open);

    public async Task OnConnectedAsync(ConnectionContext connection)
    {
        if (Interlocked.Increment(ref _open) > context.Options.MaxConnections || context.Stopping.IsCancellationRequested)
        {
            Interlocked.Decrement(ref _open);
            var reason = context.Stopping.IsCancellationRequested ? "stopping" : "max_connections";
            context.Metrics.ConnectionRejected(reason);
            Log.ConnectionRejected(context.Logger, reason);
            connection.Abort();
            return;
        }
        context.Metrics.ConnectionOpened();
        try
        {
            await new RelaySession(context).RunAsync(connection);
        }
        finally
        {
            Interlocked.Decrement(ref _open);
            context.Metrics.ConnectionClosed();
        }
    }
}
