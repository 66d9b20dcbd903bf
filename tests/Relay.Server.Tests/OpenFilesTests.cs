using Relay.Server.Hosting;

namespace Relay.Server.Tests;

/// <summary>
/// The relay's connections against its open files limit: what a limit leaves room for, and the
/// raise of the soft limit. tests/e2e/openfiles.sh runs the published binary under prlimit.
/// </summary>
public class OpenFilesTests
{
    [Test]
    [Arguments(100_000L, 20_000, 20_000)]       // room for all: the option decides
    [Arguments(20_000L, 20_000, 19_232)]        // a hard limit of 20,000: the store's share comes off
    [Arguments(1_000L, 20_000, 232)]
    [Arguments(768L, 20_000, 0)]                // no room at all (serve refuses to start)
    [Arguments(500L, 100, 0)]
    public async Task A_limit_leaves_room_for_connections_after_the_store_and_the_admin_listener(long soft, int maxConnections, int allowed)
    {
        await Assert.That(OpenFiles.ConnectionsAllowed(new OpenFiles.Limit(soft, soft), maxConnections)).IsEqualTo(allowed);
    }

    [Test]
    public async Task Where_the_limit_cannot_be_read_the_option_decides()
    {
        await Assert.That(OpenFiles.ConnectionsAllowed(null, 20_000)).IsEqualTo(20_000);
    }

    [Test]
    public async Task Raise_lifts_the_soft_limit_as_far_as_the_hard_limit_allows_and_never_lowers_it()
    {
        var before = OpenFiles.Raise(0);
        await Assert.That(before).IsNotNull();
        var after = OpenFiles.Raise(4_000);
        await Assert.That(after!.Value.Hard).IsEqualTo(before!.Value.Hard);
        await Assert.That(after.Value.Soft).IsEqualTo(Math.Max(before.Value.Soft, Math.Min(4_000L + OpenFiles.Reserved, before.Value.Hard)));
        var again = OpenFiles.Raise(1);
        await Assert.That(again!.Value.Soft).IsEqualTo(after.Value.Soft);
    }
}
