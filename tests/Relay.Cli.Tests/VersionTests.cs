namespace Relay.Cli.Tests;

/// <summary><c>relay --version</c> prints packaging/VERSION, the version the .deb carries; <c>relay --help</c> lists it.</summary>
[NotInParallel("console")]
public class VersionTests
{
    private static async Task<(int ExitCode, string Output)> RunAsync(params string[] args)
    {
        var output = new StringWriter();
        var previous = Console.Out;
#pragma warning disable TUnit0055 // restored below; these tests do not run in parallel with the others that redirect the console
        Console.SetOut(output);
        try
        {
            int code = await RelayCli.RunAsync(args);
            return (code, output.ToString());
        }
        finally
        {
            Console.SetOut(previous);
#pragma warning restore TUnit0055
        }
    }

    [Test]
    public async Task Version_prints_the_packaging_version_file()
    {
        var expected = (await File.ReadAllTextAsync(PrecedenceTests.RepositoryFile("packaging/VERSION"))).Trim();
        var (code, output) = await RunAsync("--version");
        await Assert.That(code).IsEqualTo(RelayCli.Ok);
        await Assert.That(output).IsEqualTo(expected + "\n");
    }

    [Test]
    public async Task The_main_help_lists_version_and_help()
    {
        var (code, output) = await RunAsync("--help");
        await Assert.That(code).IsEqualTo(RelayCli.Ok);
        await Assert.That(output).Contains("  --version  print the version\n");
        await Assert.That(output).Contains("  --help     show this help\n");
    }
}
