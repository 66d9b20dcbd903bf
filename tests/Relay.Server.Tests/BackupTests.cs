using System.Net;
using System.Text;
using System.Text.Json;
using Relay.Client.Transport;
using Relay.Server.Hosting;
using static Relay.Server.Tests.OperationsMetrics;

namespace Relay.Server.Tests;

/// <summary>POST /admin/backup: a data directory the relay starts from, made while it serves.</summary>
public class BackupTests
{
    private const string Token = "test-admin-token-0123456789";

    private static async Task<JsonElement> PostBackupAsync(HttpClient admin, HttpStatusCode expected)
    {
        var response = await admin.PostAsync("admin/backup", null);
        string body = await response.Content.ReadAsStringAsync();
        await Assert.That(response.StatusCode).IsEqualTo(expected);
        await Assert.That(response.Content.Headers.ContentType!.MediaType).IsEqualTo("application/json");
        return JsonDocument.Parse(body).RootElement.Clone();
    }

    [Test]
    public async Task A_backup_starts_as_the_same_relay_with_what_it_held_at_the_backup()
    {
        await using var relay = await TestRelay.StartAsync(o => o.AdminToken = Token);
        using var admin = AdminClient(relay, Token);
        RecipientQueue queue;
        await using (var client = await relay.ConnectAsync())
        {
            queue = await client.CreateQueueAsync();
            await client.SendAsync(new SenderQueue(queue.SenderId, null), "kept"u8.ToArray());
        }

        JsonElement made = await PostBackupAsync(admin, HttpStatusCode.OK);
        string path = made.GetProperty("path").GetString()!;
        await Assert.That(Path.GetDirectoryName(path)).IsEqualTo(Path.GetFullPath(Path.Combine(relay.DataDirectory, "backups")));
        await Assert.That(made.GetProperty("files").GetInt32()).IsGreaterThan(3);
        await Assert.That(made.GetProperty("bytes").GetInt64()).IsGreaterThan(0);
        await Assert.That(made.GetProperty("seconds").GetDouble()).IsGreaterThanOrEqualTo(0);
        if (!OperatingSystem.IsWindows())
        {
            await Assert.That(File.GetUnixFileMode(Path.Combine(path, "identity.pfx"))).IsEqualTo(UnixFileMode.UserRead | UnixFileMode.UserWrite);
            await Assert.That(File.GetUnixFileMode(path)).IsEqualTo(UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
        }
        await Assert.That(File.ReadAllBytes(Path.Combine(path, "identity.pfx")).SequenceEqual(File.ReadAllBytes(Path.Combine(relay.DataDirectory, "identity.pfx")))).IsTrue();
        string metrics = await ScrapeAsync(relay);
        await Assert.That(Value(metrics, "relay_backups_total", "result=\"ok\"")).IsEqualTo(1);
        await Assert.That(Value(metrics, "relay_backups_total", "result=\"failed\"")).IsEqualTo(0);
        await Assert.That(Value(metrics, "relay_backup_last_success_timestamp_seconds")).IsGreaterThan(DateTimeOffset.UtcNow.AddMinutes(-5).ToUnixTimeSeconds());
        await Assert.That(relay.Logs.Lines.Any(l => l.Contains("[35]") && l.Contains("Backup made in " + path))).IsTrue();

        // What the relay takes after the backup is not in it.
        await using (var client = await relay.ConnectAsync())
        {
            await client.SendAsync(new SenderQueue(queue.SenderId, null), "after"u8.ToArray());
        }

        // Started from the backup (the original still serving its own directory): the same address,
        // the queue and the message the backup held, and only that.
        await using var restored = await TestRelay.StartInAsync(path);
        await Assert.That(restored.Address.Fingerprint).IsEqualTo(relay.Address.Fingerprint);
        await using (var client = await restored.ConnectAsync())
        {
            var first = await client.GetAsync(queue);
            await Assert.That(first).IsNotNull();
            await Assert.That(Encoding.UTF8.GetString(first!.Body)).IsEqualTo("kept");
            await client.AckAsync(queue, first.MessageId);
            await Assert.That(await client.GetAsync(queue)).IsNull();
            await client.SendAsync(new SenderQueue(queue.SenderId, null), "restored"u8.ToArray());
            var next = await client.GetAsync(queue);
            await Assert.That(next!.MessageId).IsGreaterThan(first.MessageId);
        }
    }

    [Test]
    public async Task A_backup_that_fails_answers_why_leaves_nothing_and_the_relay_goes_on()
    {
        string notADirectory = Path.Combine(Path.GetTempPath(), "relay-backup-file-" + Guid.NewGuid().ToString("N"));
        File.WriteAllText(notADirectory, "a file where the backups would go");
        try
        {
            await using var relay = await TestRelay.StartAsync(o =>
            {
                o.AdminToken = Token;
                o.BackupDirectory = Path.Combine(notADirectory, "backups");
            });
            using var admin = AdminClient(relay, Token);

            JsonElement failed = await PostBackupAsync(admin, HttpStatusCode.InternalServerError);
            await Assert.That(failed.GetProperty("error").GetString()).StartsWith("backup failed: ");
            string metrics = await ScrapeAsync(relay);
            await Assert.That(Value(metrics, "relay_backups_total", "result=\"failed\"")).IsEqualTo(1);
            await Assert.That(Value(metrics, "relay_backups_total", "result=\"ok\"")).IsEqualTo(0);
            await Assert.That(Value(metrics, "relay_backup_last_success_timestamp_seconds")).IsEqualTo(0);
            await Assert.That(relay.Logs.Lines.Any(l => l.Contains("[36]") && l.Contains("Backup failed"))).IsTrue();
            await Assert.That(File.ReadAllText(notADirectory)).IsEqualTo("a file where the backups would go");

            await using var client = await relay.ConnectAsync();
            var queue = await client.CreateQueueAsync();
            await client.SendAsync(new SenderQueue(queue.SenderId, null), "on"u8.ToArray());
            await Assert.That(await client.GetAsync(queue)).IsNotNull();
        }
        finally
        {
            File.Delete(notADirectory);
        }
    }

    [Test]
    public async Task One_backup_at_a_time_and_one_cut_short_is_removed()
    {
        await using var relay = await TestRelay.StartAsync(o => o.AdminToken = Token);
        string root = relay.Server.Backups.Root;
        string cutShort = Path.Combine(root, "20260101T000000Z.partial");
        Directory.CreateDirectory(Path.Combine(cutShort, "queues.tmp"));

        using var admin = AdminClient(relay, Token);
        RelayBackups backups = relay.Server.Backups;
        await backups.Gate.WaitAsync();   // as while a backup is being made
        try
        {
            await Assert.That(await backups.CreateAsync()).IsNull();
            JsonElement busy = await PostBackupAsync(admin, HttpStatusCode.Conflict);
            await Assert.That(busy.GetProperty("error").GetString()).Contains("a backup is being made");
            await Assert.That(Directory.Exists(cutShort)).IsTrue();
        }
        finally
        {
            backups.Gate.Release();
        }
        await Assert.That(await backups.CreateAsync()).IsNotNull();
        await Assert.That(Directory.Exists(cutShort)).IsFalse();
        await PostBackupAsync(admin, HttpStatusCode.OK);

        // Two in the same second get names of their own; only whole backups are left.
        string[] names = [.. Directory.GetDirectories(root).Select(Path.GetFileName).Order()!];
        await Assert.That(names.Length).IsGreaterThanOrEqualTo(2);
        await Assert.That(names.All(n => !n!.EndsWith(".partial", StringComparison.Ordinal))).IsTrue();
        await Assert.That(names.Distinct().Count()).IsEqualTo(names.Length);
    }

    [Test]
    public async Task Two_relays_backing_up_into_one_directory_in_the_same_second_both_make_a_whole_backup()
    {
        string shared = Path.Combine(Path.GetTempPath(), "relay-shared-backups-" + Guid.NewGuid().ToString("N"));
        try
        {
            await using var first = await TestRelay.StartAsync();
            await using var second = await TestRelay.StartAsync();
            // Both relays' backups run in the same second (a cron job each), and a backup cut short
            // by a crash is left in the directory.
            var now = new SameSecondClock(DateTimeOffset.UtcNow);
            var logger = Microsoft.Extensions.Logging.Abstractions.NullLogger.Instance;
            var a = new RelayBackups(first.Server.Store, first.DataDirectory, shared, 0, now, logger, null);
            var b = new RelayBackups(second.Server.Store, second.DataDirectory, shared, 0, now, logger, null);
            string cutShort = Path.Combine(shared, "20200101T000000Z.partial");
            Directory.CreateDirectory(Path.Combine(cutShort, "queues.tmp"));

            // The second relay's backup starts while the first one's is being made.
            Task<BackupResult>? other = null;
            var otherWaits = new TaskCompletionSource();
            b.WaitingForAnother = () => otherWaits.TrySetResult();
            a.WhileMaking = _ =>
            {
                other = Task.Run(b.Create);
                Task.WhenAny(other, otherWaits.Task).Wait(TimeSpan.FromSeconds(30));
            };
            BackupResult madeA = await Task.Run(a.Create);
            await Assert.That(other is not null).IsTrue();
            BackupResult madeB = await other!;

            string stamp = now.GetUtcNow().UtcDateTime.ToString("yyyyMMdd'T'HHmmss'Z'", System.Globalization.CultureInfo.InvariantCulture);
            string[] names = [.. Directory.GetDirectories(shared).Select(d => Path.GetFileName(d)!).Order(StringComparer.Ordinal)];
            await Assert.That(names).IsEquivalentTo(new[] { stamp, stamp + "-2" });
            await Assert.That(new[] { madeA.Path, madeB.Path }.Select(p => Path.GetFileName(p)!).Order(StringComparer.Ordinal)).IsEquivalentTo(names);
            // Each is whole and its own relay's: it starts as that relay.
            foreach ((BackupResult made, TestRelay relay) in new[] { (madeA, first), (madeB, second) })
            {
                await Assert.That(File.ReadAllBytes(Path.Combine(made.Path, "identity.pfx")).SequenceEqual(File.ReadAllBytes(Path.Combine(relay.DataDirectory, "identity.pfx")))).IsTrue();
                await using var restored = await TestRelay.StartInAsync(made.Path);
                await Assert.That(restored.Address.Fingerprint).IsEqualTo(relay.Address.Fingerprint);
            }
        }
        finally
        {
            if (Directory.Exists(shared))
            {
                Directory.Delete(shared, recursive: true);
            }
        }
    }

    [Test]
    public async Task A_backup_directory_whose_lock_another_process_holds_for_ever_gets_a_busy_answer_in_bounded_time()
    {
        await using var relay = await TestRelay.StartAsync(o => o.AdminToken = Token);
        using var admin = AdminClient(relay, Token);
        var backups = relay.Server.Backups;
        await Assert.That(backups.WaitForAnotherAtMost).IsEqualTo(RelayBackups.DefaultWaitForAnother);
        backups.WaitForAnotherAtMost = TimeSpan.FromSeconds(1);
        Directory.CreateDirectory(backups.Root);
        string lockPath = Path.Combine(backups.Root, RelayBackups.LockFileName);
        var waiting = new TaskCompletionSource();
        backups.WaitingForAnother = () => waiting.TrySetResult();
        var watch = System.Diagnostics.Stopwatch.StartNew();
        // Another process's backup, stuck: its lock (a flock of the file opened for no sharing) is never let go.
        using (new FileStream(lockPath, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None))
        {
            var busy = await PostBackupAsync(admin, HttpStatusCode.Conflict);
            await Assert.That(watch.Elapsed).IsLessThan(TimeSpan.FromSeconds(8));
            await Assert.That(waiting.Task.IsCompleted).IsTrue();
            string error = busy.GetProperty("error").GetString()!;
            await Assert.That(error).Contains("the backup directory is busy");
            await Assert.That(error).Contains(RelayBackups.LockFileName);
            // Nothing was made, and the relay's own backups are free for the next request.
            await Assert.That(Directory.GetDirectories(backups.Root)).IsEmpty();
            await Assert.That(backups.Gate.CurrentCount).IsEqualTo(1);
        }
        // Once the other backup is done, the next one is made.
        await PostBackupAsync(admin, HttpStatusCode.OK);
        await Assert.That(Directory.GetDirectories(backups.Root).Length).IsEqualTo(1);
    }

    private sealed class SameSecondClock(DateTimeOffset at) : TimeProvider
    {
        public override DateTimeOffset GetUtcNow() => at;
    }

    [Test]
    public async Task The_time_of_the_newest_backup_outlives_a_restart()
    {
        await using var relay = await TestRelay.StartAsync(o => o.AdminToken = Token);
        using (var admin = AdminClient(relay, Token))
        {
            await PostBackupAsync(admin, HttpStatusCode.OK);
        }
        string root = relay.Server.Backups.Root;
        // An older one, and a later one cut short (never a backup): neither counts.
        Directory.CreateDirectory(Path.Combine(root, "20200101T000000Z"));
        Directory.CreateDirectory(Path.Combine(root, "29991231T000000Z.partial"));
        string newest = Path.GetFileName(Directory.GetDirectories(root).Where(d => !d.EndsWith(".partial", StringComparison.Ordinal)).Max()!);
        long expected = DateTimeOffset.ParseExact(newest, "yyyyMMdd'T'HHmmss'Z'", System.Globalization.CultureInfo.InvariantCulture,
            System.Globalization.DateTimeStyles.AssumeUniversal).ToUnixTimeSeconds();

        await relay.RestartAsync();
        string metrics = await ScrapeAsync(relay);
        await Assert.That(Value(metrics, "relay_backup_last_success_timestamp_seconds")).IsEqualTo(expected);
        await Assert.That(Value(metrics, "relay_backups_total", "result=\"ok\"")).IsEqualTo(0);
    }

    private static Task<TestRelay> StartKeepingAsync(int keep) => TestRelay.StartAsync(o =>
    {
        o.AdminToken = Token;
        o.BackupKeep = keep;
    });

    /// <summary>A directory in the relay's backup directory that counts as one of its backups: a name it gives, its identity.</summary>
    private static string OlderBackup(TestRelay relay, string name)
    {
        string path = Path.Combine(relay.Server.Backups.Root, name);
        Directory.CreateDirectory(Path.Combine(path, "queues"));
        File.Copy(Path.Combine(relay.DataDirectory, "identity.pfx"), Path.Combine(path, "identity.pfx"));
        return path;
    }

    private static string[] Removed(JsonElement made) => [.. made.GetProperty("removed").EnumerateArray().Select(e => e.GetString()!)];

    [Test]
    public async Task After_a_backup_the_oldest_go_so_that_the_kept_number_remain_and_nothing_else_is_touched()
    {
        await using var relay = await StartKeepingAsync(2);
        string root = relay.Server.Backups.Root;
        // Two older backups (the second of the same second), and what is not a backup of this relay:
        // names it does not give, and one of another relay sharing the directory.
        string[] older = ["20200101T000000Z", "20200101T000000Z-2"];
        string[] notBackups = ["weekly", "20200101T000000Z-x", "20200101", "20200101T000000Z-1", "20190101T000000Z"];
        foreach (string name in older.Concat(notBackups))
        {
            OlderBackup(relay, name);
        }
        byte[] another = File.ReadAllBytes(Path.Combine(relay.DataDirectory, "identity.pfx"));
        another[^1] ^= 1;
        File.WriteAllBytes(Path.Combine(root, "20190101T000000Z", "identity.pfx"), another);
        File.WriteAllText(Path.Combine(root, "19990101T000000Z"), "a file, not a backup");
        using var admin = AdminClient(relay, Token);

        JsonElement first = await PostBackupAsync(admin, HttpStatusCode.OK);
        string[] removed = Removed(first);
        await Assert.That(removed).IsEquivalentTo(new[] { Path.GetFullPath(Path.Combine(root, older[0])) });
        await Assert.That(Directory.Exists(Path.Combine(root, older[0]))).IsFalse();
        await Assert.That(Directory.Exists(Path.Combine(root, older[1]))).IsTrue();
        await Assert.That(relay.Logs.Lines.Any(l => l.Contains("[37]") && l.Contains(removed[0]))).IsTrue();

        JsonElement second = await PostBackupAsync(admin, HttpStatusCode.OK);
        await Assert.That(Removed(second))
            .IsEquivalentTo(new[] { Path.GetFullPath(Path.Combine(root, older[1])) });
        JsonElement third = await PostBackupAsync(admin, HttpStatusCode.OK);
        await Assert.That(Removed(third))
            .IsEquivalentTo(new[] { first.GetProperty("path").GetString() });

        // The two newest backups, each whole, and everything that is not a backup, untouched.
        string[] left = [.. Directory.GetDirectories(root).Select(Path.GetFileName)!];
        await Assert.That(left).IsEquivalentTo(notBackups.Append(Path.GetFileName(second.GetProperty("path").GetString()!))
            .Append(Path.GetFileName(third.GetProperty("path").GetString()!)).ToArray());
        await Assert.That(File.ReadAllText(Path.Combine(root, "19990101T000000Z"))).IsEqualTo("a file, not a backup");
        await using var restored = await TestRelay.StartInAsync(second.GetProperty("path").GetString()!);
        await Assert.That(restored.Address.Fingerprint).IsEqualTo(relay.Address.Fingerprint);
    }

    [Test]
    [Arguments(false)]
    [Arguments(true)]
    public async Task A_relay_restored_by_pointing_data_at_a_backup_never_removes_its_own_data_directory(bool throughLink)
    {
        await using var relay = await StartKeepingAsync(1);
        string root = relay.Server.Backups.Root;
        string backup;
        using (var admin = AdminClient(relay, Token))
        {
            backup = (await PostBackupAsync(admin, HttpStatusCode.OK)).GetProperty("path").GetString()!;
        }

        // Restored as OPERATIONS.md allows: --data pointing at the backup (or at a link to it), the
        // rest of the settings (a config file's backupDir and backupKeep) as they were.
        string data = backup;
        if (throughLink)
        {
            data = Path.Combine(relay.DataDirectory, "restored");
            Directory.CreateSymbolicLink(data, backup);
        }
        await using var restored = await TestRelay.StartInAsync(data, o =>
        {
            o.AdminToken = Token;
            o.BackupDirectory = root;
            o.BackupKeep = 1;
        });
        RecipientQueue queue;
        await using (var client = await restored.ConnectAsync())
        {
            queue = await client.CreateQueueAsync();
            await client.SendAsync(new SenderQueue(queue.SenderId, null), "after the restore"u8.ToArray());
        }
        using (var admin = AdminClient(restored, Token))
        {
            // Its data directory is named and holds the identity as a backup does, but it is the relay.
            JsonElement made = await PostBackupAsync(admin, HttpStatusCode.OK);
            await Assert.That(Removed(made)).IsEmpty();
        }
        await Assert.That(Directory.Exists(Path.Combine(backup, "queues"))).IsTrue();

        await restored.RestartAsync();
        await using (var client = await restored.ConnectAsync())
        {
            var kept = await client.GetAsync(queue);
            await Assert.That(kept).IsNotNull();
            await Assert.That(Encoding.UTF8.GetString(kept!.Body)).IsEqualTo("after the restore");
        }
    }

    [Test]
    public async Task With_keep_0_every_backup_stays()
    {
        await using var relay = await StartKeepingAsync(0);
        string root = relay.Server.Backups.Root;
        OlderBackup(relay, "20200101T000000Z");
        using var admin = AdminClient(relay, Token);
        for (int i = 0; i < 3; i++)
        {
            JsonElement made = await PostBackupAsync(admin, HttpStatusCode.OK);
            await Assert.That(Removed(made)).IsEmpty();
        }
        await Assert.That(Directory.GetDirectories(root).Length).IsEqualTo(4);
    }

    [Test]
    public async Task A_clock_set_back_never_removes_the_backup_just_made()
    {
        await using var relay = await StartKeepingAsync(1);
        // Named later than now, as after the clock was set back: by name it is the newest, but the
        // one just made is kept whatever its name, and with 1 to keep the other goes.
        string future = OlderBackup(relay, "29991231T235959Z");
        using var admin = AdminClient(relay, Token);
        JsonElement made = await PostBackupAsync(admin, HttpStatusCode.OK);
        await Assert.That(Directory.Exists(made.GetProperty("path").GetString()!)).IsTrue();
        await Assert.That(Removed(made))
            .IsEquivalentTo(new[] { Path.GetFullPath(future) });
    }

    [Test]
    public async Task An_old_backup_that_cannot_be_removed_stays_and_the_new_one_stands()
    {
        await using var relay = await StartKeepingAsync(1);
        string old = OlderBackup(relay, "20200101T000000Z");
        // An immutable file (root on ext4, as CI runs): nothing, not even root, removes its directory.
        string pinned = Path.Combine(old, "pinned");
        File.WriteAllText(pinned, "x");
        Skip.When(!Attributes("+i", pinned), "needs root and a file system with chattr +i (CI runs the tests as root on ext4)");
        try
        {
            using var admin = AdminClient(relay, Token);
            JsonElement made = await PostBackupAsync(admin, HttpStatusCode.OK);
            await Assert.That(Removed(made)).IsEmpty();
            await Assert.That(Directory.Exists(made.GetProperty("path").GetString()!)).IsTrue();
            await Assert.That(File.Exists(pinned)).IsTrue();
            await Assert.That(relay.Logs.Lines.Any(l => l.Contains("[38]") && l.Contains("Removing an old backup failed: " + old))).IsTrue();
            string metrics = await ScrapeAsync(relay);
            await Assert.That(Value(metrics, "relay_backups_total", "result=\"ok\"")).IsEqualTo(1);
        }
        finally
        {
            Attributes("-i", pinned);
        }
    }

    private static bool Attributes(string change, string path)
    {
        try
        {
            using var chattr = System.Diagnostics.Process.Start(new System.Diagnostics.ProcessStartInfo("chattr", [change, path])
            {
                RedirectStandardError = true,
            })!;
            chattr.WaitForExit();
            return chattr.ExitCode == 0;
        }
        catch (System.ComponentModel.Win32Exception)
        {
            return false;
        }
    }

    [Test]
    public async Task Without_the_token_no_backup_is_made()
    {
        await using var relay = await TestRelay.StartAsync(o => o.AdminToken = Token);
        using var anonymous = AdminClient(relay);
        using var wrong = AdminClient(relay, "another-token-0123456789");
        await Assert.That((await anonymous.PostAsync("admin/backup", null)).StatusCode).IsEqualTo(HttpStatusCode.Unauthorized);
        await Assert.That((await wrong.PostAsync("admin/backup", null)).StatusCode).IsEqualTo(HttpStatusCode.Unauthorized);
        await Assert.That(Directory.Exists(Path.Combine(relay.DataDirectory, "backups"))).IsFalse();

        await using var closed = await TestRelay.StartAsync();
        using var none = AdminClient(closed);
        await Assert.That((await none.PostAsync("admin/backup", null)).StatusCode).IsEqualTo(HttpStatusCode.NotFound);
        await Assert.That(Directory.Exists(Path.Combine(closed.DataDirectory, "backups"))).IsFalse();
    }
}
