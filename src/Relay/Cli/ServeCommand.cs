using System.Net;
using System.Net.Sockets;
using Microsoft.Extensions.Logging;
using Relay.Protocol;
using Relay.Server.Hosting;

namespace Relay.Cli;

/// <summary><c>relay serve</c>: validates every setting, runs the relay until SIGINT/SIGTERM, exits 0.</summary>
public static class ServeCommand
{
    public static async Task<int> RunAsync(string[] args)
    {
        var a = CliArgs.Parse("serve", args, ServeSettings.ValueOptionNames, ServeSettings.SwitchNames, 0);
        if (a.Help)
        {
            Console.Out.Write(Help());
            return RelayCli.Ok;
        }
        var settings = ServeSettings.Bind(a);
        var options = settings.Server;

        CheckDataDirectory(options.DataDirectory);
        if (OpenFiles.Raise(options.MaxConnections) is { } limit && OpenFiles.ConnectionsAllowed(limit, options.MaxConnections) == 0)
        {
            throw new UsageException("--max-connections: " + OpenFiles.NoRoom(limit));
        }
        CheckPortFree("--listen", options.Listen);
        if (options.Admin != null)
        {
            CheckPortFree("--admin", options.Admin);
            if (options.Admin.Port != 0 && options.Admin.Port == options.Listen.Port &&
                (options.Admin.Address.Equals(options.Listen.Address) || IsAny(options.Admin.Address) || IsAny(options.Listen.Address)))
            {
                throw new UsageException($"--admin: cannot listen on {options.Admin}: --listen {options.Listen} takes the same port");
            }
        }

        var level = settings.LogLevel switch
        {
            "debug" => LogLevel.Debug,
            "warning" => LogLevel.Warning,
            "error" => LogLevel.Error,
            _ => LogLevel.Information,
        };
        RelayServer server;
        try
        {
            server = await RelayServer.StartAsync(options, logging =>
            {
                logging.SetMinimumLevel(level);
                logging.AddFilter("Relay", level);
                if (settings.LogFormat == "json")
                {
                    logging.AddJsonConsole(o =>
                    {
                        o.UseUtcTimestamp = true;
                        o.TimestampFormat = "yyyy-MM-ddTHH:mm:ssZ";
                    });
                }
                else
                {
                    logging.AddSimpleConsole(o =>
                    {
                        o.SingleLine = true;
                        o.UseUtcTimestamp = true;
                        o.TimestampFormat = "yyyy-MM-ddTHH:mm:ssZ ";
                    });
                }
            });
        }
        catch (Exception ex) when (ex is Relay.Storage.StoreException or InvalidDataException)
        {
            Console.Error.WriteLine($"relay: --data: {ex.Message}");
            return RelayCli.Usage;
        }
        catch (IOException ex) when (ex.InnerException is SocketException || ex.Message.Contains("address", StringComparison.OrdinalIgnoreCase))
        {
            Console.Error.WriteLine($"relay: cannot bind a listener: {ex.Message}");
            return RelayCli.Usage;
        }

        SystemdNotify.Send("READY=1");
        // Exit within a bounded time whatever happens: the connections get --shutdown-timeout, the
        // store's flush and close get a fixed grace after it. Past that the process exits with 1.
        var hardLimit = options.ShutdownTimeout + ShutdownGrace;
        using var watchdog = server.ShutdownRequested.Register(() =>
        {
            SystemdNotify.Send("STOPPING=1");
            _ = Task.Delay(hardLimit).ContinueWith(_ =>
            {
                Console.Error.WriteLine($"relay: shutdown did not finish within {hardLimit.TotalSeconds:0} s; exiting");
                Environment.Exit(RelayCli.Failed);
            }, TaskScheduler.Default);
        });
        await server.WaitForShutdownAsync();
        // The store failed every write for --store-failure-timeout (event 33): 1, so that systemd's
        // Restart=on-failure (or a container's restart policy) starts the relay again.
        return server.StoppedForStoreFailure ? RelayCli.Failed : RelayCli.Ok;
    }

    /// <summary>Time allowed after the shutdown timeout for the store to flush and close.</summary>
    private static readonly TimeSpan ShutdownGrace = TimeSpan.FromSeconds(20);

    private static void CheckDataDirectory(string path)
    {
        try
        {
            DurableDirectory.Create(path);
            var probe = Path.Combine(path, $".write-test-{Environment.ProcessId}");
            File.WriteAllBytes(probe, []);
            File.Delete(probe);
        }
        catch (Exception ex) when (ex is IOException or UnauthorizedAccessException)
        {
            throw new UsageException($"--data: the data directory {path} is not writable: {ex.Message}");
        }
    }

    private static bool IsAny(IPAddress address) => address.Equals(IPAddress.Any) || address.Equals(IPAddress.IPv6Any);

    private static void CheckPortFree(string option, IPEndPoint endPoint)
    {
        if (endPoint.Port == 0) return;
        using var socket = new Socket(endPoint.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
        try
        {
            socket.Bind(endPoint);
        }
        catch (SocketException ex)
        {
            throw new UsageException($"{option}: cannot listen on {endPoint}: {ex.Message}");
        }
    }

    private static string Help() =>
        RelayCli.CommandHelp("relay serve [options]",
            "Runs the relay. Settings come from --config FILE (JSON), then RELAY_* environment variables, then flags;\n" +
            "flags win. Each option below is also RELAY_<NAME> (e.g. RELAY_MESSAGE_TTL) and a camelCase JSON key.",
            ServeSettings.Options.Select(o => ("--" + o.Name + (o.IsSwitch ? "" : " " + o.Value), $"{o.Help} (default {o.Default})"))
                .Prepend(("--config FILE", "JSON settings file (keys: camelCase option names)")));
}

/// <summary>sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET.</summary>
internal static class SystemdNotify
{
    public static void Send(string state)
    {
        var path = Environment.GetEnvironmentVariable("NOTIFY_SOCKET");
        if (string.IsNullOrEmpty(path)) return;
        try
        {
            using var socket = new Socket(AddressFamily.Unix, SocketType.Dgram, ProtocolType.Unspecified);
            // A leading '@' names an abstract socket.
            var endPoint = new UnixDomainSocketEndPoint(path[0] == '@' ? "\0" + path.Substring(1) : path);
            socket.SendTo(System.Text.Encoding.ASCII.GetBytes(state), endPoint);
        }
        catch (SocketException)
        {
            // Not fatal: the service manager will time the start out and say so.
        }
    }
}
