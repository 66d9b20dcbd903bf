using System.Net;
using System.Net.Sockets;
using System.Security.Cryptography;
using Relay.Client.Conversations;

namespace Relay.Cli.Tests;

/// <summary>
/// What <c>relay listen</c> prints about its contacts, through the real entry point (RelayCli.RunAsync).
/// Not in parallel: the process's stdout and stderr are shared.
/// </summary>
[NotInParallel("console")]
public class ListenOutputTests
{
    /// <summary>
    /// A contact reported unavailable is printed in words that fit every reason (a relay that cannot be
    /// reached, a refused or ended subscription, a pending join's SKEY on the joiner's relay), not as
    /// something this side "cannot receive from".
    /// </summary>
    [Test]
    public async Task A_contact_whose_relay_cannot_be_reached_is_printed_as_unavailable_with_the_reason()
    {
        using var files = new SettingsFiles();
        // A port bound and not listening: every connection to it is refused.
        using var closed = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        closed.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        string relay = $"relay://{new string('A', 43)}@127.0.0.1:{((IPEndPoint)closed.LocalEndPoint!).Port}";
        var profile = Path.Combine(files.Directory, "profile");
        new FileProfileStore(profile).Update(p =>
        {
            p.Contacts.Add(new ContactData
            {
                Name = "bob",
                OwnPrivate = RandomNumberGenerator.GetBytes(32),
                OwnPublic = RandomNumberGenerator.GetBytes(32),
                ReceiveRelay = relay,
                RecipientId = RandomNumberGenerator.GetBytes(24),
                ReceiveSenderId = RandomNumberGenerator.GetBytes(24),
                RecipientPrivate = RandomNumberGenerator.GetBytes(32),
                DeliveryKey = RandomNumberGenerator.GetBytes(32),
            });
            return 0;
        });

        var error = new StringWriter();
        var previous = Console.Error;
#pragma warning disable TUnit0055 // restored below; these tests do not run in parallel with each other
        Console.SetError(error);
        int code;
        try
        {
            code = await RelayCli.RunAsync(["listen", "--profile", profile, "--plain-tcp", "--timeout", "2"]);
        }
        finally
        {
            Console.SetError(previous);
#pragma warning restore TUnit0055
        }

        await Assert.That(code).IsEqualTo(RelayCli.Failed);
        var lines = error.ToString().Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        var unavailable = lines.Where(l => l.StartsWith("relay: bob is unavailable: ", StringComparison.Ordinal)).ToList();
        await Assert.That(unavailable.Count).IsEqualTo(1);
        await Assert.That(unavailable[0]).Contains("cannot be reached");
        await Assert.That(error.ToString()).DoesNotContain("cannot receive from");
    }
}
