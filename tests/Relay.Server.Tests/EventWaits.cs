using Relay.Client.Transport;

namespace Relay.Server.Tests;

/// <summary>Waiting for what a relay pushes to an SDK connection (deliveries, END), with a timeout.</summary>
internal static class EventWaits
{
    public static async Task<RelayEvent> NextEventAsync(RelayConnection connection, TimeSpan? timeout = null)
    {
        using var cts = new CancellationTokenSource(timeout ?? TimeSpan.FromSeconds(10));
        return await connection.Events.ReadAsync(cts.Token);
    }

    public static async Task<Delivery> NextDeliveryAsync(RelayConnection connection)
    {
        var e = await NextEventAsync(connection);
        return e is DeliveryEvent d ? d.Delivery : throw new InvalidOperationException($"expected a delivery, got {e}");
    }

    /// <summary>True when no event arrives within <paramref name="wait"/>.</summary>
    public static async Task<bool> NothingArrivesAsync(RelayConnection connection, TimeSpan wait)
    {
        using var cts = new CancellationTokenSource(wait);
        try
        {
            await connection.Events.WaitToReadAsync(cts.Token);
            return !connection.Events.TryPeek(out _);
        }
        catch (OperationCanceledException)
        {
            return true;
        }
    }
}
