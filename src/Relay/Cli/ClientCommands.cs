using System.Diagnostics;
using Relay.Client;
using Relay.Client.Conversations;
using Relay.Client.Transport;
using Relay.Protocol;

namespace Relay.Cli;

/// <summary>The commands for people: invite, join, send, listen, contacts; and ping, check for operators.</summary>
public static class ClientCommands
{
    private static readonly (string, string) SocksHelp = ("--socks HOST:PORT", "reach relays through this SOCKS5 proxy (Tor, ss-local)");
    private static readonly (string, string) PlainHelp = ("--plain-tcp", "the relay serves plain TCP (no TLS)");
    private static readonly (string, string) ProfileHelp = ("--profile DIR", "profile directory: contacts and private keys (created with mode 0700)");

    /// <summary>How long invite, join and send try to reach a relay before they give up (listen keeps trying).</summary>
    private static readonly TimeSpan OneShotRetry = TimeSpan.FromSeconds(15);

    private static RelayClientOptions ClientOptions(CliArgs a, TimeSpan? retryFor = null)
    {
        var socks = a.Get("socks") is { } value ? CheckSocks(value) : null;
        return new RelayClientOptions { Socks = socks, Tls = !a.Switch("plain-tcp"), RetryFor = retryFor };
    }

    /// <summary>The --socks value, checked to be HOST:PORT as the SDK's options check it.</summary>
    internal static string CheckSocks(string value)
    {
        try
        {
            return new RelayConnectionOptions { Socks = value }.Socks!;
        }
        catch (ArgumentException)
        {
            throw new UsageException($"--socks must be HOST:PORT, got '{value}'");
        }
    }

    private static RelayAddress ParseAddress(string what, string value) =>
        RelayAddress.TryParse(value, out var address, out var error) ? address : throw new UsageException($"{what}: {error}");

    private static FileProfileStore Profile(CliArgs a) => new(a.Require("profile"));

    /// <summary>Runs a client command, turning expected failures into one clear line and exit code 1.</summary>
    private static async Task<int> Guard(Func<Task<int>> body)
    {
        try
        {
            return await body();
        }
        catch (Exception ex) when (ex is RelayConnectException or RelayErrorException or ProfileException
                                       or InvalidOperationException or ArgumentException or FormatException)
        {
            Console.Error.WriteLine($"relay: {ex.Message}");
            return RelayCli.Failed;
        }
    }

    public static Task<int> Invite(string[] args)
    {
        var a = CliArgs.Parse("invite", args, new HashSet<string> { "profile", "relay", "name", "socks", "password" }, new HashSet<string> { "plain-tcp" }, 0);
        if (a.Help)
        {
            Console.Out.Write(RelayCli.CommandHelp("relay invite --profile DIR --relay ADDRESS [--name NAME]",
                "Creates a queue on the relay and prints an invitation link (the only line on stdout). Give it to one person;\n" +
                "they run 'relay join LINK'. 'relay listen' then reports '* NAME joined'.",
                [ProfileHelp, ("--relay ADDRESS", "relay that holds your receiving queue"), ("--name NAME", "your name for the person you invite"),
                 ("--password TEXT", "queue-creation password, when the relay requires one"), SocksHelp, PlainHelp]));
            return Task.FromResult(RelayCli.Ok);
        }
        var relay = ParseAddress("--relay", a.Require("relay"));
        var options = ClientOptions(a, OneShotRetry);
        var store = Profile(a);
        return Guard(async () =>
        {
            await using var messenger = new Messenger(store, options);
            var (link, name) = await messenger.InviteAsync(relay, a.Get("name"), a.Get("password"));
            Console.Error.WriteLine($"invitation for '{name}' created; give this link to them privately:");
            Console.Out.WriteLine(link);
            return RelayCli.Ok;
        });
    }

    public static Task<int> Join(string[] args)
    {
        var a = CliArgs.Parse("join", args, new HashSet<string> { "profile", "relay", "name", "socks", "password" }, new HashSet<string> { "plain-tcp" }, 1);
        if (a.Help || a.Positional.Count == 0)
        {
            if (!a.Help) throw new UsageException("join needs the invitation LINK");
            Console.Out.Write(RelayCli.CommandHelp("relay join LINK --profile DIR [--relay ADDRESS] [--name NAME]",
                "Joins the conversation of an invitation link and prints the new contact's name.",
                [ProfileHelp, ("--relay ADDRESS", "relay for your receiving queue (default: the inviter's relay)"),
                 ("--name NAME", "your name for the inviter"), ("--password TEXT", "queue-creation password of your relay"), SocksHelp, PlainHelp]));
            return Task.FromResult(RelayCli.Ok);
        }
        var link = a.Positional[0];
        if (!Invitation.TryParse(link, out _, out var linkError)) throw new UsageException(linkError);
        var relay = a.Get("relay") is { } r ? ParseAddress("--relay", r) : null;
        var options = ClientOptions(a, OneShotRetry);
        var store = Profile(a);
        return Guard(async () =>
        {
            await using var messenger = new Messenger(store, options);
            var name = await messenger.JoinAsync(link, relay, a.Get("name"), a.Get("password"));
            Console.Out.WriteLine(name);
            return RelayCli.Ok;
        });
    }

    public static Task<int> Send(string[] args)
    {
        var a = CliArgs.Parse("send", args, new HashSet<string> { "profile", "to", "socks" }, new HashSet<string> { "plain-tcp" }, 1);
        if (a.Help)
        {
            Console.Out.Write(RelayCli.CommandHelp("relay send --profile DIR --to NAME [TEXT]",
                "Sends TEXT (or standard input) to a contact, end-to-end encrypted; returns once the relay has it on disk.\n" +
                "A message the relay did not take (unreachable, or FULL) is kept in the profile and goes out, once, with the\n" +
                "next 'relay send' or 'relay listen' of this profile: do not send it again.",
                [ProfileHelp, ("--to NAME", "the contact"), SocksHelp, PlainHelp]));
            return Task.FromResult(RelayCli.Ok);
        }
        var to = a.Require("to");
        var text = a.Positional.Count > 0 ? a.Positional[0] : Console.In.ReadToEnd().TrimEnd('\n', '\r');
        var options = ClientOptions(a, OneShotRetry);
        var store = Profile(a);
        return Guard(async () =>
        {
            await using var messenger = new Messenger(store, options);
            try
            {
                await messenger.SendAsync(to, text);
            }
            catch (Exception ex) when (ex is RelayConnectException or RelayErrorException
                                       && messenger.Contacts.FirstOrDefault(c => c.Name == to)?.Outbox.Count > 0)
            {
                // Sealed and kept before the relay refused it: sending the text again would deliver it twice.
                Console.Error.WriteLine($"relay: {ex.Message}");
                Console.Error.WriteLine("relay: the message is kept and goes out with the next 'relay send' or 'relay listen' of this profile; do not send it again");
                return RelayCli.Failed;
            }
            return RelayCli.Ok;
        });
    }

    public static Task<int> Listen(string[] args)
    {
        var a = CliArgs.Parse("listen", args, new HashSet<string> { "profile", "timeout", "socks" }, new HashSet<string> { "once", "plain-tcp" }, 0);
        if (a.Help)
        {
            Console.Out.Write(RelayCli.CommandHelp("relay listen --profile DIR [--once] [--timeout SECONDS]",
                "Prints each arriving message as 'NAME: TEXT' and acknowledges it; completes pending joins ('* NAME joined').",
                [ProfileHelp, ("--once", "exit after the first message"), ("--timeout SECONDS", "exit with code 1 when nothing arrived in time"), SocksHelp, PlainHelp]));
            return Task.FromResult(RelayCli.Ok);
        }
        bool once = a.Switch("once");
        // At most what a timer takes (about 49.7 days): 49 days.
        int timeout = a.GetInt("timeout", 0, 1, (int)ServeSettings.LongestTimer.TotalSeconds);
        var options = ClientOptions(a);
        var store = Profile(a);
        return Guard(async () =>
        {
            await using var messenger = new Messenger(store, options);
            if (messenger.Contacts.Count == 0)
            {
                Console.Error.WriteLine("relay: no contacts yet: create one with 'relay invite' or 'relay join'");
                return RelayCli.Failed;
            }
            using var stop = new CancellationTokenSource();
            Console.CancelKeyPress += (_, e) => { e.Cancel = true; stop.Cancel(); };
            using var idle = CancellationTokenSource.CreateLinkedTokenSource(stop.Token);
            if (timeout > 0) idle.CancelAfter(TimeSpan.FromSeconds(timeout));
            bool gotMessage = false;
            try
            {
                await foreach (var e in messenger.ListenAsync(idle.Token))
                {
                    switch (e)
                    {
                        case MessageReceived m:
                            Console.Out.WriteLine($"{Printable(m.Contact)}: {Printable(m.Text)}");
                            Console.Out.Flush();
                            gotMessage = true;
                            if (timeout > 0) idle.CancelAfter(TimeSpan.FromSeconds(timeout));
                            break;
                        case ContactJoined j:
                            Console.Out.WriteLine($"* {Printable(j.Contact)} joined");
                            Console.Out.Flush();
                            break;
                        case MessageRejected r:
                            Console.Error.WriteLine($"relay: rejected a message from {Printable(r.Contact)}: {r.Reason}");
                            break;
                        case MessagesMissing g:
                            Console.Error.WriteLine($"relay: {g.Count} message(s) from {Printable(g.Contact)} never arrived before a later one");
                            break;
                        case ContactUnavailable u:
                            Console.Error.WriteLine($"relay: {Printable(u.Contact)} is unavailable: {u.Reason}");
                            break;
                        case ContactAvailable v:
                            Console.Error.WriteLine($"relay: receiving from {Printable(v.Contact)} again");
                            break;
                        case OutboxStalled o:
                            Console.Error.WriteLine($"relay: {o.Waiting} message(s) to {Printable(o.Contact)} wait and will be sent again: {o.Reason}");
                            break;
                        case MessageDropped d:
                            Console.Error.WriteLine($"relay: a message to {Printable(d.Contact)} was dropped, never sent: {d.Reason}");
                            break;
                    }
                    if (once && gotMessage)
                    {
                        // Printed: saved and acknowledged before leaving, or it would come again.
                        messenger.Acknowledge();
                        return RelayCli.Ok;
                    }
                }
            }
            catch (OperationCanceledException) when (!stop.IsCancellationRequested)
            {
                if (!gotMessage)
                {
                    Console.Error.WriteLine($"relay: no message within {timeout} s");
                    return RelayCli.Failed;
                }
            }
            catch (OperationCanceledException)
            {
            }
            return RelayCli.Ok;
        });
    }

    /// <summary>
    /// Text from a contact, made safe for one terminal line: control characters (newlines, escape
    /// sequences) and bidirectional overrides appear escaped (\n, \t, \u001b…), so a message can
    /// neither forge further lines nor drive the terminal.
    /// </summary>
    public static string Printable(string text)
    {
        static bool Unsafe(char c) => char.IsControl(c) || c is >= '\u202A' and <= '\u202E' or >= '\u2066' and <= '\u2069';
        if (!text.Any(Unsafe)) return text;
        var b = new System.Text.StringBuilder(text.Length + 8);
        foreach (char c in text)
        {
            if (!Unsafe(c)) b.Append(c);
            else if (c == '\n') b.Append("\\n");
            else if (c == '\t') b.Append("\\t");
            else if (c == '\r') b.Append("\\r");
            else b.Append("\\u").Append(((int)c).ToString("x4", System.Globalization.CultureInfo.InvariantCulture));
        }
        return b.ToString();
    }

    public static int Contacts(string[] args)
    {
        var a = CliArgs.Parse("contacts", args, new HashSet<string> { "profile" }, new HashSet<string>(), 0);
        if (a.Help)
        {
            Console.Out.Write(RelayCli.CommandHelp("relay contacts --profile DIR", "Lists the contacts of a profile with their state.", [ProfileHelp]));
            return RelayCli.Ok;
        }
        try
        {
            foreach (var c in Profile(a).Load().Contacts)
            {
                Console.Out.WriteLine($"{Printable(c.Name)}\t{c.Status}");
            }
            return RelayCli.Ok;
        }
        catch (ProfileException ex)
        {
            Console.Error.WriteLine($"relay: {ex.Message}");
            return RelayCli.Failed;
        }
    }

    public static Task<int> Ping(string[] args)
    {
        var a = CliArgs.Parse("ping", args, new HashSet<string> { "socks", "count", "timeout" }, new HashSet<string> { "plain-tcp" }, 1);
        if (a.Help || a.Positional.Count == 0)
        {
            if (!a.Help) throw new UsageException("ping needs the relay ADDRESS");
            Console.Out.Write(RelayCli.CommandHelp("relay ping ADDRESS [--count N] [--timeout SECONDS]", "Connects (TLS, pinned identity, handshake) and measures PING round trips.",
                [("--count N", "round trips (default 3)"), ("--timeout SECONDS", "for the connection and for each round trip (default 10); exit 1 when it passes"), SocksHelp, PlainHelp]));
            return Task.FromResult(RelayCli.Ok);
        }
        var address = ParseAddress("ADDRESS", a.Positional[0]);
        int count = a.GetInt("count", 3, 1, 1_000_000);
        var timeout = TimeSpan.FromSeconds(a.GetInt("timeout", 10, 1, 3600));
        var options = ClientOptions(a);
        return Guard(async () =>
        {
            long start = Stopwatch.GetTimestamp();
            await using var connection = await RelayConnection.ConnectAsync(address, new RelayConnectionOptions { Socks = options.Socks, Tls = options.Tls, ConnectTimeout = timeout });
            Console.Out.WriteLine($"connected to {address.Host}:{address.Port} (protocol {connection.Version}, {(options.Tls ? "identity verified" : "plain TCP: identity not checked")}) in {Ms(Stopwatch.GetElapsedTime(start))}");
            for (int i = 0; i < count; i++)
            {
                using var wait = new CancellationTokenSource(timeout);
                TimeSpan rtt;
                try
                {
                    rtt = await connection.PingAsync(wait.Token);
                }
                catch (OperationCanceledException) when (wait.IsCancellationRequested)
                {
                    Console.Error.WriteLine($"relay: no PONG within {timeout.TotalSeconds:0} s");
                    return RelayCli.Failed;
                }
                Console.Out.WriteLine($"pong: {Ms(rtt)}");
            }
            return RelayCli.Ok;
        });
    }

    public static Task<int> Check(string[] args)
    {
        var a = CliArgs.Parse("check", args, new HashSet<string> { "socks", "timeout", "password" }, new HashSet<string> { "plain-tcp" }, 1);
        if (a.Help || a.Positional.Count == 0)
        {
            if (!a.Help) throw new UsageException("check needs the relay ADDRESS");
            Console.Out.Write(RelayCli.CommandHelp("relay check ADDRESS [--timeout SECONDS]",
                "End-to-end self-test of a deployment: connect, create a queue, secure it, send, receive, ack, delete,\n" +
                "printing each step with its time. Exit 0 on success; 1 naming the step that failed.",
                [("--timeout SECONDS", "for the whole check (default 30)"), ("--password TEXT", "queue-creation password of the relay"), SocksHelp, PlainHelp]));
            return Task.FromResult(RelayCli.Ok);
        }
        var address = ParseAddress("ADDRESS", a.Positional[0]);
        int timeout = a.GetInt("timeout", 30, 1, 3600);
        var options = ClientOptions(a);
        return CheckAsync(address, options, a.Get("password"), TimeSpan.FromSeconds(timeout));
    }

    private static async Task<int> CheckAsync(RelayAddress address, RelayClientOptions options, string? password, TimeSpan timeout)
    {
        using var cts = new CancellationTokenSource(timeout);
        var token = cts.Token;
        string step = "connect";
        long total = Stopwatch.GetTimestamp();
        RelayConnection? connection = null;
        try
        {
            async Task Step(string name, Func<Task> action)
            {
                step = name;
                long t = Stopwatch.GetTimestamp();
                await action();
                Console.Out.WriteLine($"ok   {name,-9} {Ms(Stopwatch.GetElapsedTime(t))}");
            }
            await Step("connect", async () => connection = await RelayConnection.ConnectAsync(address,
                new RelayConnectionOptions { Socks = options.Socks, Tls = options.Tls, ConnectTimeout = timeout }, token));
            RecipientQueue queue = null!;
            await Step("create", async () => queue = await connection!.CreateQueueAsync(password, token));
            var senderKey = new byte[32];
            RelayCrypto.GenerateKeyPair(senderKey, new byte[32]);
            await Step("secure", () => connection!.SecureAsync(queue.SenderId, senderKey, token));
            var probe = System.Security.Cryptography.RandomNumberGenerator.GetBytes(64);
            await Step("send", () => connection!.SendAsync(new SenderQueue(queue.SenderId, senderKey), probe, 0, token));
            Delivery? delivery = null;
            await Step("receive", async () =>
            {
                await connection!.SubscribeAsync(queue, token);
                while (delivery is null)
                {
                    if (await connection.Events.ReadAsync(token) is DeliveryEvent d && d.Delivery.RecipientId.AsSpan().SequenceEqual(queue.RecipientId))
                    {
                        delivery = d.Delivery;
                    }
                }
                if (!delivery.Body.AsSpan().SequenceEqual(probe))
                {
                    throw new InvalidOperationException("the received message differs from the one sent");
                }
            });
            await Step("ack", () => connection!.AckAsync(queue, delivery!.MessageId, token));
            await Step("delete", () => connection!.DeleteAsync(queue, token));
            Console.Out.WriteLine($"relay {address} works end to end ({Ms(Stopwatch.GetElapsedTime(total))})");
            return RelayCli.Ok;
        }
        catch (Exception ex) when (ex is RelayConnectException or RelayErrorException or InvalidOperationException or OperationCanceledException
                                       or System.Threading.Channels.ChannelClosedException)
        {
            string reason = ex switch
            {
                OperationCanceledException => $"timed out after {timeout.TotalSeconds:0} s",
                System.Threading.Channels.ChannelClosedException => connection?.Failure?.Message ?? "the connection closed",
                _ => ex.Message,
            };
            Console.Out.WriteLine($"FAIL {step,-9} {reason}");
            Console.Error.WriteLine($"relay: check failed at step '{step}': {reason}");
            return RelayCli.Failed;
        }
        finally
        {
            if (connection != null) await connection.DisposeAsync();
        }
    }

    private static string Ms(TimeSpan t) => $"{t.TotalMilliseconds:0.0} ms";
}
