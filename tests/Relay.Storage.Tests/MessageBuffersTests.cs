using System.Collections.Concurrent;

namespace Relay.Storage.Tests;

/// <summary>
/// The pool of message-body buffers: a returned buffer is reused by the next rent of its size, never
/// handed to two holders at once, and the pool keeps no more than its budget.
/// </summary>
public class MessageBuffersTests
{
    [Test]
    [Arguments(0, 256)]
    [Arguments(1, 256)]
    [Arguments(256, 256)]
    [Arguments(257, 512)]
    [Arguments(300, 512)]
    [Arguments(4096, 4096)]
    [Arguments(65_000, 65_536)]
    [Arguments(65_536, 65_536)]
    public async Task A_rent_gets_the_power_of_two_size_that_holds_it(int length, int expected)
    {
        var pool = new MessageBuffers(1024 * 1024);
        await Assert.That(pool.Rent(length).Length).IsEqualTo(expected);
    }

    [Test]
    public async Task A_rent_larger_than_any_size_gets_an_exact_buffer_the_pool_does_not_keep()
    {
        var pool = new MessageBuffers(1024 * 1024);
        byte[] large = pool.Rent(70_000);
        pool.Return(large);

        await Assert.That(large.Length).IsEqualTo(70_000);
        await Assert.That(pool.RetainedBytes).IsEqualTo(0);
    }

    [Test]
    public async Task A_returned_buffer_is_the_next_rent_of_its_size_and_not_of_another()
    {
        var pool = new MessageBuffers(1024 * 1024);
        byte[] first = pool.Rent(300);
        pool.Return(first);

        await Assert.That(pool.RetainedBytes).IsEqualTo(512);
        await Assert.That(pool.Rent(1000)).IsNotSameReferenceAs(first);
        await Assert.That(pool.Rent(400)).IsSameReferenceAs(first);
        await Assert.That(pool.RetainedBytes).IsEqualTo(0);
        await Assert.That(pool.Rent(400)).IsNotSameReferenceAs(first);
    }

    [Test]
    public async Task Arrays_of_other_sizes_are_not_kept()
    {
        var pool = new MessageBuffers(1024 * 1024);
        pool.Return(new byte[300]);
        pool.Return(new byte[128]);
        pool.Return(new byte[131_072]);

        await Assert.That(pool.RetainedBytes).IsEqualTo(0);
    }

    [Test]
    public async Task The_pool_keeps_no_more_than_its_budget_and_gives_back_what_it_kept()
    {
        var pool = new MessageBuffers(4 * 1024);
        var rented = Enumerable.Range(0, 20).Select(_ => pool.Rent(512)).ToList();
        foreach (byte[] buffer in rented)
        {
            pool.Return(buffer);
        }

        await Assert.That(pool.RetainedBytes).IsEqualTo(4 * 1024);
        var again = Enumerable.Range(0, 8).Select(_ => pool.Rent(512)).ToList();
        await Assert.That(again.All(b => rented.Contains(b))).IsTrue();
        await Assert.That(pool.RetainedBytes).IsEqualTo(0);
        await Assert.That(rented.Contains(pool.Rent(512))).IsFalse();
    }

    [Test]
    public async Task Threads_that_rent_and_return_across_each_other_never_share_a_buffer()
    {
        var pool = new MessageBuffers(64 * 1024);
        var handOver = new BlockingCollection<byte[]>(boundedCapacity: 64);
        var held = new ConcurrentDictionary<byte[], byte>(ReferenceEqualityComparer.Instance);
        int shared = 0;
        const int PerProducer = 20_000;

        var producers = Enumerable.Range(0, 2).Select(_ => Task.Run(() =>
        {
            for (int i = 0; i < PerProducer; i++)
            {
                byte[] buffer = pool.Rent(300);
                if (!held.TryAdd(buffer, 0))
                {
                    Interlocked.Increment(ref shared);
                }
                handOver.Add(buffer);
            }
        })).ToArray();
        var consumer = Task.Run(() =>
        {
            foreach (byte[] buffer in handOver.GetConsumingEnumerable())
            {
                held.TryRemove(buffer, out _);
                pool.Return(buffer);
            }
        });
        await Task.WhenAll(producers);
        handOver.CompleteAdding();
        await consumer;

        await Assert.That(shared).IsEqualTo(0);
        await Assert.That(pool.RetainedBytes).IsLessThanOrEqualTo(64 * 1024);
        await Assert.That(pool.RetainedBytes).IsGreaterThan(0);
    }
}
