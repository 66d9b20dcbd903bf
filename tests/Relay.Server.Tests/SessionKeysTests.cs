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

    [Test]
    public async Task Cached_keys_are_counted_relay_wide_and_given_back()
    {
        var shared = new SharedMemory(budget: 0);
        var keys = new SessionKeys(capacity: 8, shared);
        var k = RandomKey();
        keys.AddReal(k, Derived());
        keys.AddReal(k, Derived()); // the same key again replaces it: counted once
        keys.AddDecoy(RandomId(), Derived());
        await Assert.That(shared.Held).IsEqualTo(2L * SessionKeys.BytesPerKey);
        for (int i = 0; i < 7; i++) keys.AddDecoy(RandomId(), Derived()); // the ninth key drops the eight
        await Assert.That(keys.Count).IsEqualTo(1);
        await Assert.That(shared.Held).IsEqualTo((long)SessionKeys.BytesPerKey);
        keys.Dispose();
        await Assert.That(shared.Held).IsEqualTo(0L);
    }

    [Test]
    public async Task While_the_relay_wide_budget_is_used_up_a_connection_at_the_small_limit_drops_its_keys()
    {
        var shared = new SharedMemory(budget: 6 * SessionKeys.BytesPerKey);
        using var big = new SessionKeys(capacity: 100, shared, keysWhenShort: 3);
        using var small = new SessionKeys(capacity: 100, shared, keysWhenShort: 3);
        var bigKeys = Enumerable.Range(0, 4).Select(_ => RandomKey()).ToList();
        foreach (var k in bigKeys) big.AddReal(k, Derived());
        var smallKeys = Enumerable.Range(0, 2).Select(_ => RandomKey()).ToList();
        foreach (var k in smallKeys) small.AddReal(k, Derived());
        await Assert.That(shared.Short).IsTrue();

        // Looking keys up costs nothing and drops nothing.
        await Assert.That(bigKeys.All(k => big.TryGetReal(k, out _))).IsTrue();
        // Below the small limit a connection still adds (2 → 3 keys).
        small.AddReal(RandomKey(), Derived());
        await Assert.That(small.Count).IsEqualTo(3);
        await Assert.That(smallKeys.All(k => small.TryGetReal(k, out _))).IsTrue();
        // At or above it, a new key first drops the connection's keys.
        big.AddDecoy(RandomId(), Derived());
        await Assert.That(big.Count).IsEqualTo(1);
        await Assert.That(bigKeys.Any(k => big.TryGetReal(k, out _))).IsFalse();
        await Assert.That(shared.Held).IsEqualTo(4L * SessionKeys.BytesPerKey);
        await Assert.That(shared.Short).IsFalse();
        // With room again, the limit no longer applies.
        big.AddReal(RandomKey(), Derived());
        big.AddReal(RandomKey(), Derived());
        await Assert.That(big.Count).IsEqualTo(3);
    }
}
