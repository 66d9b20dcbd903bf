using Relay.Protocol;
using Relay.Server.Hosting;

namespace Relay.Cli;

/// <summary><c>relay init</c> and <c>relay address</c>.</summary>
public static class IdentityCommands
{
    private static readonly (string, string)[] AddressOptions =
    [
        ("--data DIR", "data directory (default ./relay-data)"),
        ("--host HOST[,HOST2...]", "host names clients dial, e.g. a domain and a .onion (default localhost)"),
        ("--port PORT", $"relay port clients dial (default {RelayAddress.DefaultPort})"),
    ];

    public static int Init(string[] args)
    {
        var a = CliArgs.Parse("init", args, new HashSet<string> { "data", "host", "port" }, new HashSet<string>(), 0);
        if (a.Help)
        {
            Console.Out.Write(RelayCli.CommandHelp("relay init [--data DIR] [--host HOST[,HOST2...]] [--port PORT]",
                "Creates the relay identity in the data directory if it does not exist, and prints the relay address.", AddressOptions));
            return RelayCli.Ok;
        }
        var data = a.Get("data") ?? "relay-data";
        var (hosts, port) = HostsAndPort(a);
        using var identity = Load(data, out bool created);
        if (identity is null)
        {
            return RelayCli.Usage;
        }
        Console.Error.WriteLine(created ? $"created a relay identity in {data}" : $"the relay identity in {data} already exists");
        Console.Out.WriteLine(identity.AddressFor(hosts, port));
        return RelayCli.Ok;
    }

    public static int Address(string[] args)
    {
        var a = CliArgs.Parse("address", args, new HashSet<string> { "data", "host", "port" }, new HashSet<string>(), 0);
        if (a.Help)
        {
            Console.Out.Write(RelayCli.CommandHelp("relay address [--data DIR] [--host HOST[,HOST2...]] [--port PORT]",
                "Prints the relay address, relay://<fingerprint>@<hosts>:<port>, and nothing else.", AddressOptions));
            return RelayCli.Ok;
        }
        var data = a.Get("data") ?? "relay-data";
        var (hosts, port) = HostsAndPort(a);
        if (!RelayIdentity.Exists(data))
        {
            Console.Error.WriteLine($"relay: no relay identity in {data}; create one with 'relay init --data {data}'");
            return RelayCli.Failed;
        }
        using var identity = Load(data, out _);
        if (identity is null)
        {
            return RelayCli.Usage;
        }
        Console.Out.WriteLine(identity.AddressFor(hosts, port));
        return RelayCli.Ok;
    }

    /// <summary>The identity in <paramref name="data"/> (created if missing), or null after one line on stderr saying why not.</summary>
    private static RelayIdentity? Load(string data, out bool created)
    {
        created = false;
        try
        {
            return RelayIdentity.LoadOrCreate(data, out created);
        }
        catch (InvalidDataException ex)
        {
            Console.Error.WriteLine($"relay: --data: {ex.Message}");
        }
        catch (Exception ex) when (ex is IOException or UnauthorizedAccessException or System.Security.Cryptography.CryptographicException)
        {
            Console.Error.WriteLine($"relay: --data: cannot use {data}: {ex.Message}");
        }
        return null;
    }

    private static (IReadOnlyList<string> Hosts, int Port) HostsAndPort(CliArgs a)
    {
        var value = a.Get("host") ?? "localhost";
        var hosts = ServeSettings.ParseHosts("--host", value);
        if (hosts.Length == 0)
        {
            throw new UsageException($"--host must be one or more host names separated by commas (an IPv6 address in brackets: [2001:db8::1]), got '{value}'");
        }
        int port = a.GetInt("port", RelayAddress.DefaultPort, 1, 65535);
        return (hosts, port);
    }
}
