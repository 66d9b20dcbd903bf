using Relay.Protocol;

namespace Relay.Server.Connections;

/// <summary>
/// One connection's derived auth keys (read loop only): real ones by the client's public key, and
/// decoys by the queue id (and the side, sender or recipient, it was looked up on) a request named
/// when no queue has it, so that a repeated probe of a missing queue costs what a repeated wrong key
/// costs. Both share one budget and are dropped together when it is reached: how long a key stays
/// cached never depends on whether its queue exists, and a connection that names many random ids
/// holds at most the capacity's worth of keys (about 200 bytes each, 450 once used often).
/// </summary>
internal sealed class SessionKeys(int capacity = SessionKeys.DefaultCapacity) : IDisposable
{
    /// <summary>More distinct queue keys than one client uses on a connection, small enough that 100 connections of one source hold a few hundred MB at most.</summary>
    public const int DefaultCapacity = 4_096;

    private readonly Dictionary<Key32, MacKey> _real = new();
    private Dictionary<DecoyKey, MacKey>? _decoys;

    public int Count => _real.Count + (_decoys?.Count ?? 0);

    public bool TryGetReal(in Key32 clientKey, out MacKey key) => _real.TryGetValue(clientKey, out key!);

    public MacKey AddReal(in Key32 clientKey, byte[] derived)
    {
        MakeRoom();
        return _real[clientKey] = new MacKey(derived);
    }

    public bool TryGetDecoy(in DecoyKey queueId, out MacKey key)
    {
        key = null!;
        return _decoys != null && _decoys.TryGetValue(queueId, out key!);
    }

    public MacKey AddDecoy(in DecoyKey queueId, byte[] derived)
    {
        MakeRoom();
        return (_decoys ??= new())[queueId] = new MacKey(derived);
    }

    private void MakeRoom()
    {
        if (Count >= capacity) Clear();
    }

    public void Clear()
    {
        Clear(_real);
        if (_decoys != null) Clear(_decoys);
    }

    private static void Clear<TKey>(Dictionary<TKey, MacKey> keys) where TKey : notnull
    {
        foreach (var key in keys.Values)
        {
            key.Dispose();
        }
        keys.Clear();
    }

    public void Dispose() => Clear();
}

/// <summary>A decoy's cache key: the id a request named and whether it was looked up as a sender id.</summary>
internal readonly record struct DecoyKey(Id24 Id, bool SenderSide);
