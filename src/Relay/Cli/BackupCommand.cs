using Microsoft.Extensions.Logging;
using Relay.Server.Hosting;

namespace Relay.Cli;

/// <summary>
/// <c>relay backup</c>: a backup of a stopped relay, where and as <c>POST /admin/backup</c> makes
/// them (the same settings: --config, RELAY_* and the flags below). Prints the backup's path on stdout.
/// </summary>
public static class BackupCommand
{
    private static readonly string[] Settings = ["data", "backup-dir", "backup-keep"];

    public static int Run(string[] args)
    {
        var a = CliArgs.Parse("backup", args, new HashSet<string>(Settings) { "config" }, new HashSet<string>(), 0);
        if (a.Help)
        {
            Console.Out.Write(RelayCli.CommandHelp("relay backup [--data DIR] [--backup-dir DIR] [--backup-keep N] [--config FILE]",
                "Makes a backup of a relay that is not running: a data directory of its own (identity.pfx and queues/)\n" +
                "in the backup directory, which 'relay serve --data' starts from. Prints its path. Reads the settings as\n" +
                "'relay serve' does (--config FILE, RELAY_* variables, flags). A running relay's backups: POST /admin/backup.",
                ServeSettings.Options.Where(o => Settings.Contains(o.Name))
                    .Select(o => ("--" + o.Name + " " + o.Value, $"{o.Help} (default {o.Default})"))
                    .Append(("--config FILE", "JSON settings file of relay serve"))));
            return RelayCli.Ok;
        }
        var options = ServeSettings.Bind(a).Server;
        BackupResult made;
        try
        {
            if (StoppedRelayBackup.ActAsOwnerOf(options.DataDirectory) is { } owner)
            {
                Console.Error.WriteLine($"relay: acting as the owner of {options.DataDirectory} (uid {owner}), as the relay does");
            }
            made = StoppedRelayBackup.Make(options.DataDirectory, options.BackupDirectory, options.BackupKeep, new StandardErrorLogger());
        }
        catch (BackupException e)
        {
            Console.Error.WriteLine($"relay: backup failed: {e.Message}");
            return RelayCli.Failed;
        }
        Console.Out.WriteLine(made.Path);
        return RelayCli.Ok;
    }

    /// <summary>The backup's log lines (made, an old one removed or not), one per line on stderr.</summary>
    private sealed class StandardErrorLogger : ILogger
    {
        public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;
        public bool IsEnabled(LogLevel logLevel) => logLevel >= LogLevel.Information;
        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
        {
            // Event 36 (failed) is the command's own last line.
            if (IsEnabled(logLevel) && eventId.Id != 36)
            {
                Console.Error.WriteLine("relay: " + formatter(state, exception));
            }
        }
    }
}
