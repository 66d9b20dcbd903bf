using System.Runtime.InteropServices;
using Relay.Protocol;

namespace Relay.Server.Connections;

/// <summary>
/// One connection's derived auth keys (read loop only): real ones by the client's public key, and
/// decoys by the queue id (and the side, sender or recipient, it was looked up on) a request named
/// when no queue has it, so that a repeated probe of a missing queue costs what a repeated wrong key
/// costs. Both share one budget and are dropped together when it is reached: how long a key stays
/// cached never depends on whether its queue exists, and a connection that names many random ids
/// holds at most the capacity's worth of keys (about 200 bytes each, 450 once used often).
/// All connections' keys are also counted together (<paramref name="shared"/>, <see cref="BytesPerKey"/>
/// each): while that relay-wide budget is used up, a connection that holds
/// <paramref name="keysWhenShort"/> keys or more drops them before it caches another, so many
/// connections naming many ids cannot each hold the capacity. A connection that keeps using the keys
/// it has is not touched; one that needs more pays a fresh derivation per new key instead of memory.
/// </summary>
internal sealed class SessionKeys(int capacity = SessionKeys.DefaultCapacity, SharedMemory? shared = null,
    int keysWhenShort = SessionKeys.DefaultKeysWhenShort) : IDisposable
{
    /// <summary>More distinct queue keys than one client uses on a connection, small enough that 100 connections of one source hold a few hundred MB at most.</summary>
    public const int DefaultCapacity = 4_096;

    /// <summary>Keys a connection may hold while the relay-wide budget is used up (32 KiB at <see cref="BytesPerKey"/>).</summary>
    public const int DefaultKeysWhenShort = 64;

    /// <summary>
    /// What one cached key is counted as against the relay-wide budget: its dictionary entry, its
    /// <see cref="MacKey"/> and key bytes, and, once used often, its HMAC context (about 200 bytes, 450
    /// once used often, rounded up).
    /// </summary>
    public const int BytesPerKey = 512;

    private readonly Dictionary<Key32, MacKey> _real = new();
    private Dictionary<DecoyKey, MacKey>? _decoys;

    public int Count => _real.Count + (_decoys?.Count ?? 0);

    public bool TryGetReal(in Key32 clientKey, out MacKey key) => _real.TryGetValue(clientKey, out key!);

    public MacKey AddReal(in Key32 clientKey, byte[] derived)
    {
        MakeRoom();
        return Put(_real, clientKey, derived);
    }

    public bool TryGetDecoy(in DecoyKey queueId, out MacKey key)
    {
        key = null!;
        return _decoys != null && _decoys.TryGetValue(queueId, out key!);
    }

    public MacKey AddDecoy(in DecoyKey queueId, byte[] derived)
    {
        MakeRoom();
        return Put(_decoys ??= new(), queueId, derived);
    }

    private MacKey Put<TKey>(Dictionary<TKey, MacKey> keys, TKey id, byte[] derived) where TKey : notnull
    {
        ref MacKey? slot = ref CollectionsMarshal.GetValueRefOrAddDefault(keys, id, out bool exists);
        if (exists)
        {
            slot!.Dispose();
        }
        else
        {
            shared?.Add(BytesPerKey);
        }
        return slot = new MacKey(derived);
    }

    private void MakeRoom()
    {
        int count = Count;
        if (count >= capacity || (count >= keysWhenShort && shared is { Short: true })) Clear();
    }

    public void Clear()
    {
        shared?.Add(-(long)Count * BytesPerKey);
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
