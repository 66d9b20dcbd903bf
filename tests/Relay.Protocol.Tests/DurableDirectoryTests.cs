namespace Relay.Protocol.Tests;

/// <summary>
/// DurableDirectory's own behaviour; that the names it syncs survive a power loss is shown against
/// the release binary by DurabilityE2ETests.PowerLoss (lossyfs).
/// </summary>
public class DurableDirectoryTests
{
    [Test]
    public async Task Create_makes_every_missing_level_with_the_mode_given_and_leaves_an_existing_one_alone()
    {
        var root = Path.Combine(Path.GetTempPath(), "relay-durable-" + Guid.NewGuid().ToString("N"));
        try
        {
            var deep = Path.Combine(root, "a", "b", "c");
            DurableDirectory.Create(deep, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
            await Assert.That(Directory.Exists(deep)).IsTrue();
            if (!OperatingSystem.IsWindows())
            {
                await Assert.That(File.GetUnixFileMode(deep)).IsEqualTo(UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
            }
            File.WriteAllText(Path.Combine(deep, "kept"), "x");
            DurableDirectory.Create(deep);
            await Assert.That(File.ReadAllText(Path.Combine(deep, "kept"))).IsEqualTo("x");
            DurableDirectory.Sync(deep);
        }
        finally
        {
            Directory.Delete(root, recursive: true);
        }
    }

    [Test]
    public async Task Sync_of_a_directory_that_is_not_there_names_it()
    {
        if (OperatingSystem.IsWindows()) return;
        var missing = Path.Combine(Path.GetTempPath(), "relay-durable-" + Guid.NewGuid().ToString("N"));
        var error = Assert.Throws<IOException>(() => DurableDirectory.Sync(missing));
        await Assert.That(error.Message).Contains(missing);
        await Assert.That(error.Message).Contains("No such file or directory");
    }
}
