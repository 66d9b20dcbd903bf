using System.Security.Cryptography;
using Relay.Server.Connections;

namespace Relay.Server.Tests;

/// <summary>A connection's cache of derived auth keys: bounded, and the same for queues that exist and ids that name none.</summary>
public class SessionKeysTests
{
    private static Key32 RandomKey() => Key32.From(RandomNumberGenerator.GetBytes(32));
    private static DecoyKey RandomId() => new(Id24.From(RandomNumberGenerator.GetBytes(24)), SenderSide: false);
    private static byte[] Derived() => RandomNumberGenerator.GetBytes(32);

    [Test]
    public async Task Real_and_decoy_keys_share_one_budget_and_leave_together()
    {
        using var keys = new SessionKeys(capacity: 8);
        var real = Enumerable.Range(0, 5).Select(_ => RandomKey()).ToList();
        var decoys = Enumerable.Range(0, 3).Select(_ => RandomId()).ToList();
        foreach (var k in real) keys.AddReal(k, Derived());
        foreach (var id in decoys) keys.AddDecoy(id, Derived());
        await Assert.That(keys.Count).IsEqualTo(8);
        await Assert.That(real.All(k => keys.TryGetReal(k, out _))).IsTrue();
        await Assert.That(decoys.All(id => keys.TryGetDecoy(id, out _))).IsTrue();

        // The ninth key, whichever kind, drops all eight: a probed real queue's key and a probed
        // missing id's decoy are evicted at the same moment.
        var ninth = RandomId();
        keys.AddDecoy(ninth, Derived());
        await Assert.That(keys.Count).IsEqualTo(1);
        await Assert.That(real.Any(k => keys.TryGetReal(k, out _))).IsFalse();
        await Assert.That(decoys.Any(id => keys.TryGetDecoy(id, out _))).IsFalse();
        await Assert.That(keys.TryGetDecoy(ninth, out _)).IsTrue();
    }

    [Test]
    public async Task A_decoy_made_for_a_recipient_id_is_not_found_for_the_same_bytes_as_a_sender_id()
    {
        // Otherwise a recipient command on X followed by a SEND on X would be fast when X names no
        // queue and slow (a fresh derivation) when X is an existing queue's sender id.
        using var keys = new SessionKeys();
        var id = Id24.From(RandomNumberGenerator.GetBytes(24));
        keys.AddDecoy(new DecoyKey(id, SenderSide: false), Derived());
        await Assert.That(keys.TryGetDecoy(new DecoyKey(id, SenderSide: true), out _)).IsFalse();
        await Assert.That(keys.TryGetDecoy(new DecoyKey(id, SenderSide: false), out _)).IsTrue();
    }

    [Test]
    public async Task A_connection_naming_ever_new_ids_holds_no_more_than_the_capacity()
    {
        using var keys = new SessionKeys();
        int most = 0;
        for (int i = 0; i < 3 * SessionKeys.DefaultCapacity; i++)
        {
            keys.AddDecoy(RandomId(), Derived());
            most = Math.Max(most, keys.Count);
        }
        await Assert.That(most).IsEqualTo(SessionKeys.DefaultCapacity);
    }
}
