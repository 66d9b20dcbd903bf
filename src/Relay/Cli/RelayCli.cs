using System.Reflection;

namespace Relay.Cli;

/// <summary>The <c>relay</c> executable: one subcommand per file under Cli/.</summary>
public static class RelayCli
{
    public const int Ok = 0;
    public const int Failed = 1;
    public const int Usage = 2;

    private static readonly (string Name, string Summary)[] Commands =
    [
        ("serve", "run the relay"),
        ("init", "create the relay identity if missing and print the relay address"),
        ("address", "print the relay address"),
        ("backup", "make a backup of a stopped relay (a running one: POST /admin/backup)"),
        ("invite", "create an invitation link for a private conversation"),
        ("join", "join a conversation from an invitation link"),
        ("send", "send an end-to-end encrypted message to a contact"),
        ("listen", "print arriving messages and completed joins"),
        ("contacts", "list the contacts of a profile"),
        ("ping", "measure the round trip to a relay"),
        ("check", "end-to-end self-test of a relay deployment"),
        ("bench", "load generator: throughput, latency, lost and duplicated messages"),
    ];

    public static async Task<int> RunAsync(string[] args)
    {
        try
        {
            if (args.Length == 0)
            {
                // A usage error: the help goes where errors go.
                Console.Error.Write(MainHelp());
                return Usage;
            }
            if (args[0] is "--help" or "-h" or "help")
            {
                Console.Out.Write(MainHelp());
                return Ok;
            }
            if (args[0] is "--version")
            {
                Console.Out.WriteLine(Version);
                return Ok;
            }
            var rest = args.Skip(1).ToArray();
            return args[0] switch
            {
                "serve" => await ServeCommand.RunAsync(rest),
                "init" => IdentityCommands.Init(rest),
                "address" => IdentityCommands.Address(rest),
                "backup" => BackupCommand.Run(rest),
                "invite" => await ClientCommands.Invite(rest),
                "join" => await ClientCommands.Join(rest),
                "send" => await ClientCommands.Send(rest),
                "listen" => await ClientCommands.Listen(rest),
                "contacts" => ClientCommands.Contacts(rest),
                "ping" => await ClientCommands.Ping(rest),
                "check" => await ClientCommands.Check(rest),
                "bench" => await BenchCommand.RunAsync(rest),
                _ => throw new UsageException($"unknown command '{args[0]}' (see relay --help)"),
            };
        }
        catch (UsageException ex)
        {
            Console.Error.WriteLine($"relay: {ex.Message}");
            return Usage;
        }
        catch (Exception ex)
        {
            // Anything unforeseen: one line and exit code 1, not a runtime crash report.
            Console.Error.WriteLine($"relay: {ex.Message} ({ex.GetType().Name})");
            return Failed;
        }
    }

    /// <summary>The relay's version: packaging/VERSION, which every build stamps into the assembly.</summary>
    public static string Version =>
        typeof(RelayCli).Assembly.GetCustomAttribute<AssemblyInformationalVersionAttribute>()?.InformationalVersion ?? "unknown";

    private static string MainHelp()
    {
        var lines = new List<string>
        {
            "relay: a store-and-forward relay for end-to-end-encrypted messages",
            "",
            "Usage: relay <command> [options]",
            "",
            "Commands:",
        };
        lines.AddRange(Commands.Select(c => $"  {c.Name,-10} {c.Summary}"));
        lines.Add("");
        lines.Add("Options:");
        lines.Add($"  {"--help",-10} show this help");
        lines.Add($"  {"--version",-10} print the version");
        lines.Add("");
        lines.Add("Run 'relay <command> --help' for the options of a command.");
        return string.Join('\n', lines) + "\n";
    }

    /// <summary>Help text of one command: usage line, then one line per option.</summary>
    public static string CommandHelp(string usage, string summary, IEnumerable<(string Option, string Help)> options)
    {
        var list = options.ToList();
        int width = Math.Max(24, list.Count == 0 ? 0 : list.Max(o => o.Option.Length) + 2);
        var lines = new List<string> { $"Usage: {usage}", "", summary, "", "Options:" };
        lines.AddRange(list.Select(o => "  " + o.Option.PadRight(width) + o.Help));
        lines.Add("  " + "--help".PadRight(width) + "show this help");
        return string.Join('\n', lines) + "\n";
    }
}
