using Relay.Server.Hosting;

namespace Relay.Server.Tests;

/// <summary>
/// When the relay collects garbage by itself: once, when it goes quiet after allocating enough since
/// the last full collection (the counts passed are of full collections: younger ones do not reset it).
/// </summary>
public class QuietCollectorTests
{
    private const long MiB = 1 << 20;

    [Test]
    public async Task A_burst_then_quiet_collects_once_and_not_again_while_quiet()
    {
        var quiet = new QuietCollector(leftBytes: 4 * MiB, quietBytes: 64 * 1024);
        long allocated = 100 * MiB;
        int collections = 7;
        await Assert.That(quiet.Tick(allocated, collections)).IsFalse();     // first look
        allocated += 3 * MiB;
        await Assert.That(quiet.Tick(allocated, collections)).IsFalse();     // busy (handshakes)
        allocated += 3 * MiB;
        await Assert.That(quiet.Tick(allocated, collections)).IsFalse();     // busy: 6 MiB left, still allocating
        allocated += 10 * 1024;
        await Assert.That(quiet.Tick(allocated, collections)).IsTrue();      // quiet with 6 MiB left: collect
        quiet.Collected(allocated, collections + 1);
        for (int i = 0; i < 5; i++)
        {
            allocated += 10 * 1024;
            await Assert.That(quiet.Tick(allocated, collections + 1)).IsFalse(); // nothing left worth it
        }
    }

    [Test]
    public async Task Too_little_left_or_never_quiet_collects_nothing()
    {
        var little = new QuietCollector(leftBytes: 4 * MiB, quietBytes: 64 * 1024);
        long allocated = 0;
        little.Tick(allocated, 0);
        allocated += 3 * MiB;
        little.Tick(allocated, 0);
        await Assert.That(little.Tick(allocated + 1024, 0)).IsFalse();       // quiet, but 3 MiB left

        var busy = new QuietCollector(leftBytes: 4 * MiB, quietBytes: 64 * 1024);
        allocated = 0;
        busy.Tick(allocated, 0);
        for (int i = 0; i < 20; i++)
        {
            allocated += 1 * MiB;   // steady traffic: the runtime collects as usual
            await Assert.That(busy.Tick(allocated, i / 12)).IsFalse();
        }
    }

    [Test]
    public async Task What_a_full_collection_of_the_runtime_left_is_counted_from_the_tick_that_saw_it()
    {
        var quiet = new QuietCollector(leftBytes: 4 * MiB, quietBytes: 64 * 1024);
        long allocated = 0;
        quiet.Tick(allocated, 0);
        allocated += 20 * MiB;
        await Assert.That(quiet.Tick(allocated, 1)).IsFalse();               // the runtime collected fully meanwhile
        allocated += 2 * MiB;
        await Assert.That(quiet.Tick(allocated, 1)).IsFalse();               // 2 MiB since: busy anyway
        allocated += 1024;
        await Assert.That(quiet.Tick(allocated, 1)).IsFalse();               // quiet, 2 MiB left: not worth it
        allocated += 3 * MiB;
        await Assert.That(quiet.Tick(allocated, 1)).IsFalse();               // busy again
        await Assert.That(quiet.Tick(allocated + 1024, 1)).IsTrue();         // quiet, 5 MiB left
    }

    [Test]
    public async Task A_trickle_below_quiet_collects_at_most_once_per_leftBytes_over_quietBytes_ticks()
    {
        var quiet = new QuietCollector(leftBytes: 4 * MiB, quietBytes: 64 * 1024);
        long allocated = 0;
        int collections = 0, ticks = 1_000, collected = 0;
        quiet.Tick(allocated, collections);
        for (int i = 0; i < ticks; i++)
        {
            allocated += 63 * 1024;   // just quiet, every tick
            if (quiet.Tick(allocated, collections))
            {
                collected++;
                quiet.Collected(allocated, ++collections);
            }
        }
        // 4 MiB at 63 KiB a tick: one collection per 66 ticks.
        await Assert.That(collected).IsEqualTo(ticks / 66);
    }

    [Test]
    [Arguments(70.6, 47.3, 0.3, true)]    // the collector compacted by itself and kept the old regions (sixteenth round)
    [Arguments(62.5, 44.3, 0.5, true)]    // it swept and kept 18 MB of free regions
    [Arguments(56.5, 54.2, 7.3, true)]    // it swept and left 7.3 MB of holes in its heap
    [Arguments(45.0, 44.0, 2.0, false)]   // 3 MB to give back: not worth a second pause
    [Arguments(44.0, 44.5, 7.9, false)]   // committed below the heap (read at different moments) counts as nothing
    public async Task A_compaction_follows_the_sweep_only_when_it_gives_back_8_MiB(double committedMiB, double heapMiB, double fragmentedMiB, bool worth)
    {
        static long Bytes(double mib) => (long)(mib * MiB);
        await Assert.That(QuietCollector.WorthCompacting(Bytes(committedMiB), Bytes(heapMiB), Bytes(fragmentedMiB))).IsEqualTo(worth);
    }
}
