using System.Net;
using System.Net.Http.Json;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using System.Text;
using System.Text.Json;
using Microsoft.Extensions.Logging;
using Relay.Client.Transport;
using Relay.Protocol;
using Relay.Server.Hosting;
using static Relay.Server.Tests.OperationsMetrics;

namespace Relay.Server.Tests;

/// <summary>Issue 4: metrics under a known workload, the admin API, retention and limits, end to end through a real relay.</summary>
public class OperationsTests
{
    private const string Token = "test-admin-token-0123456789";

    private static async Task<Delivery> NextDeliveryAsync(RelayConnection connection)
    {
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(10));
        while (true)
        {
            if (await connection.Events.ReadAsync(cts.Token) is DeliveryEvent d) return d.Delivery;
        }
    }

    private static async Task<ErrorCode?> ErrorOf(Func<Task> action)
    {
        try
        {
            await action();
            return null;
        }
        catch (RelayErrorException e)
        {
            return e.Code;
        }
    }

    [Test]
    public async Task Metrics_move_as_expected_under_a_known_workload()
    {
        await using var relay = await TestRelay.StartAsync();
        await using var recipient = await relay.ConnectAsync();
        await using var sender = await relay.ConnectAsync();
        var before = await ScrapeAsync(relay);

        var queue = await recipient.CreateQueueAsync();
        var to = new SenderQueue(queue.SenderId, null);
        await recipient.SubscribeAsync(queue);
        const int n = 7;
        for (int i = 0; i < n; i++)
        {
            await sender.SendAsync(to, Encoding.UTF8.GetBytes("message " + i));
            var d = await NextDeliveryAsync(recipient);
            await recipient.AckAsync(queue, d.MessageId);
        }
        await recipient.PingAsync();
        GC.Collect();   // relay_gc_committed_bytes is as of the last collection
        var after = await ScrapeAsync(relay);

        double Delta(string name, string? labels = null) => Value(after, name, labels) - Value(before, name, labels);
        await Assert.That(Delta("relay_commands_total", "command=\"send\",result=\"ok\"")).IsEqualTo(n);
        await Assert.That(Delta("relay_commands_total", "command=\"ack\",result=\"ok\"")).IsEqualTo(n);
        await Assert.That(Delta("relay_commands_total", "command=\"new\",result=\"ok\"")).IsEqualTo(1);
        await Assert.That(Delta("relay_commands_total", "command=\"ping\",result=\"ok\"")).IsEqualTo(1);
        await Assert.That(Delta("relay_messages_stored_total")).IsEqualTo(n);
        await Assert.That(Delta("relay_messages_acked_total")).IsEqualTo(n);
        await Assert.That(Delta("relay_deliveries_total")).IsEqualTo(n);
        await Assert.That(Delta("relay_messages_stored_bytes_total")).IsEqualTo(Enumerable.Range(0, n).Sum(i => ("message " + i).Length));
        // Each message was pushed to a waiting subscriber straight after its SEND.
        await Assert.That(Delta("relay_delivery_latency_seconds_count")).IsEqualTo(n);
        await Assert.That(Value(after, "relay_connections_open")).IsEqualTo(2);
        await Assert.That(Delta("relay_connections_accepted_total")).IsEqualTo(0);
        await Assert.That(Value(after, "relay_handshakes_total", "result=\"ok\"")).IsEqualTo(2);
        await Assert.That(Value(after, "relay_subscriptions")).IsEqualTo(1);
        await Assert.That(Delta("relay_store_commit_operations_count")).IsGreaterThanOrEqualTo(2 * n + 1);
        await Assert.That(Value(after, "relay_store_commit_seconds_count")).IsGreaterThan(0);
        await Assert.That(Value(after, "relay_store_queues_created_total")).IsEqualTo(1);
        await Assert.That(Value(after, "relay_store_disk_bytes")).IsGreaterThan(0);
        await Assert.That(Value(after, "relay_new_queues_enabled")).IsEqualTo(1);
        // A live subscriber gets each message from memory (the delivery tail), not from a store read.
        await Assert.That(Delta("relay_delivery_reads_total", "source=\"memory\"")).IsEqualTo(n);
        await Assert.That(Delta("relay_delivery_reads_total", "source=\"store\"")).IsEqualTo(0);
        await Assert.That(Value(after, "relay_delivery_tail_bytes")).IsEqualTo(0);
        // The collector holds at least its heap's objects committed.
        await Assert.That(Value(after, "relay_gc_committed_bytes")).IsGreaterThanOrEqualTo(Value(after, "dotnet_total_memory_bytes") / 2);
        await Assert.That(Value(after, "relay_gc_committed_bytes")).IsGreaterThan(0);

        var families = Families(after);
        foreach (var name in new[] { "relay_store_queues", "relay_store_messages", "relay_store_messages_bytes", "relay_store_pending_compaction_bytes",
                     "relay_store_disk_budget_bytes", "relay_store_full", "relay_store_sweeps_total", "relay_messages_expired_total",
                     "relay_connections_rejected_total", "process_cpu_seconds_total", "dotnet_collection_count_total" })
        {
            await Assert.That(families).Contains(name);
        }
        // Every family of the relay's own is explained to operators (named whole, in backticks: a
        // longer name that starts with it does not count).
        string guide = await File.ReadAllTextAsync(RepositoryFile("docs/OPERATIONS.md"));
        foreach (var name in families.Where(f => f.StartsWith("relay_", StringComparison.Ordinal)))
        {
            await Assert.That(guide).Contains($"`{name}`");
        }
    }

    /// <summary>A file of this repository, found from the test's output directory upwards.</summary>
    private static string RepositoryFile(string relative)
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir != null; dir = dir.Parent)
        {
            string candidate = Path.Combine(dir.FullName, relative);
            if (File.Exists(candidate)) return candidate;
        }
        throw new FileNotFoundException($"{relative} not found above {AppContext.BaseDirectory}");
    }

    [Test]
    public async Task Admin_api_is_off_without_a_token()
    {
        await using var relay = await TestRelay.StartAsync();
        using var anonymous = AdminClient(relay);
        using var withToken = AdminClient(relay, Token);
        await Assert.That((await anonymous.GetAsync("admin/stats")).StatusCode).IsEqualTo(HttpStatusCode.NotFound);
        await Assert.That((await withToken.GetAsync("admin/stats")).StatusCode).IsEqualTo(HttpStatusCode.NotFound);
        await Assert.That((await anonymous.GetAsync("healthz")).StatusCode).IsEqualTo(HttpStatusCode.OK);
        await Assert.That((await anonymous.GetAsync("metrics")).StatusCode).IsEqualTo(HttpStatusCode.OK);
    }

    [Test]
    public async Task Admin_api_needs_the_bearer_token_and_reports_stats()
    {
        await using var relay = await TestRelay.StartAsync(o => o.AdminToken = Token);
        using var anonymous = AdminClient(relay);
        using var wrong = AdminClient(relay, Token + "x");
        using var admin = AdminClient(relay, Token);

        var refused = await anonymous.GetAsync("admin/stats");
        await Assert.That(refused.StatusCode).IsEqualTo(HttpStatusCode.Unauthorized);
        await Assert.That(refused.Headers.WwwAuthenticate.ToString()).IsEqualTo("Bearer");
        await Assert.That((await wrong.GetAsync("admin/stats")).StatusCode).IsEqualTo(HttpStatusCode.Unauthorized);
        await Assert.That((await anonymous.GetAsync("admin/anything-else")).StatusCode).IsEqualTo(HttpStatusCode.Unauthorized);
        await Assert.That((await anonymous.GetAsync("metrics")).StatusCode).IsEqualTo(HttpStatusCode.OK);
        await Assert.That((await anonymous.GetAsync("readyz")).StatusCode).IsEqualTo(HttpStatusCode.OK);

        await using var client = await relay.ConnectAsync();
        var queue = await client.CreateQueueAsync();
        await client.SendAsync(new SenderQueue(queue.SenderId, null), "hello"u8.ToArray());

        var ok = await admin.GetAsync("admin/stats");
        await Assert.That(ok.StatusCode).IsEqualTo(HttpStatusCode.OK);
        await Assert.That(ok.Content.Headers.ContentType!.MediaType).IsEqualTo("application/json");
        using var json = JsonDocument.Parse(await ok.Content.ReadAsStringAsync());
        var root = json.RootElement;
        await Assert.That(root.GetProperty("queues_created").GetInt64()).IsEqualTo(1);
        await Assert.That(root.GetProperty("messages_stored").GetInt64()).IsEqualTo(1);
        await Assert.That(root.GetProperty("connections_open").GetInt64()).IsEqualTo(1);
        await Assert.That(root.GetProperty("disk_bytes").GetInt64()).IsGreaterThan(0);
        await Assert.That(root.GetProperty("new_queues_enabled").GetBoolean()).IsTrue();
        await Assert.That(root.GetProperty("durable").GetBoolean()).IsTrue();
    }

    [Test]
    public async Task Queue_creation_switch_flips_at_runtime_and_existing_queues_keep_working()
    {
        await using var relay = await TestRelay.StartAsync(o => o.AdminToken = Token);
        using var admin = AdminClient(relay, Token);
        using var anonymous = AdminClient(relay);
        await using var client = await relay.ConnectAsync();
        var existing = await client.CreateQueueAsync();

        var unauthorized = await anonymous.PostAsync("admin/queue-creation", JsonContent.Create(new { enabled = false }));
        await Assert.That(unauthorized.StatusCode).IsEqualTo(HttpStatusCode.Unauthorized);
        var bad = await admin.PostAsync("admin/queue-creation", new StringContent("nonsense", Encoding.UTF8, "application/json"));
        await Assert.That(bad.StatusCode).IsEqualTo(HttpStatusCode.BadRequest);

        var off = await admin.PostAsync("admin/queue-creation", new StringContent("""{"enabled": false}""", Encoding.UTF8, "application/json"));
        await Assert.That(off.StatusCode).IsEqualTo(HttpStatusCode.OK);
        await Assert.That(await off.Content.ReadAsStringAsync()).Contains("\"enabled\": false");
        await Assert.That(await ErrorOf(() => client.CreateQueueAsync())).IsEqualTo(ErrorCode.Disabled);
        await Assert.That(Value(await ScrapeAsync(relay), "relay_new_queues_enabled")).IsEqualTo(0);

        // Existing queues keep working.
        await client.SendAsync(new SenderQueue(existing.SenderId, null), "still"u8.ToArray());
        var got = await client.GetAsync(existing);
        await Assert.That(got).IsNotNull();
        await client.AckAsync(existing, got!.MessageId);

        var on = await admin.PostAsync("admin/queue-creation", new StringContent("""{"enabled": true}""", Encoding.UTF8, "application/json"));
        await Assert.That(on.StatusCode).IsEqualTo(HttpStatusCode.OK);
        await client.CreateQueueAsync();
        await Assert.That(relay.Logs.Lines.Any(l => l.Contains("[30]") && l.Contains("disabled"))).IsTrue();
    }

    [Test]
    public async Task New_queues_switch_off_in_configuration_answers_DISABLED()
    {
        await using var relay = await TestRelay.StartAsync(o => o.AllowNewQueues = false);
        await using var client = await relay.ConnectAsync();
        await Assert.That(await ErrorOf(() => client.CreateQueueAsync())).IsEqualTo(ErrorCode.Disabled);
        await Assert.That(await ErrorOf(() => client.CreateQueueAsync("any password"))).IsEqualTo(ErrorCode.Disabled);
        await client.PingAsync();
    }

    [Test]
    public async Task Queue_creation_password_is_required_when_configured()
    {
        await using var relay = await TestRelay.StartAsync(o => o.CreatePassword = "open sesame");
        await using var client = await relay.ConnectAsync();
        await Assert.That(await ErrorOf(() => client.CreateQueueAsync())).IsEqualTo(ErrorCode.Auth);
        await Assert.That(await ErrorOf(() => client.CreateQueueAsync("open sesamE"))).IsEqualTo(ErrorCode.Auth);
        await Assert.That(await ErrorOf(() => client.CreateQueueAsync("open sesame "))).IsEqualTo(ErrorCode.Auth);
        var queue = await client.CreateQueueAsync("open sesame");
        // Only creation needs it: the queue then works as any other, on the same connection.
        await client.SendAsync(new SenderQueue(queue.SenderId, null), "x"u8.ToArray());
        await Assert.That(await client.GetAsync(queue)).IsNotNull();
        var text = await ScrapeAsync(relay);
        await Assert.That(Value(text, "relay_commands_total", "command=\"new\",result=\"auth\"")).IsEqualTo(3);
    }

    [Test]
    public async Task Disk_budget_refuses_new_queues_and_sends_then_recovers_once_messages_are_acked()
    {
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.DiskBudgetBytes = 256 * 1024;
            o.MaintenanceInterval = TimeSpan.FromMilliseconds(200);
        });
        await using var client = await relay.ConnectAsync();
        var queue = await client.CreateQueueAsync();
        var to = new SenderQueue(queue.SenderId, null);

        // Fill the store past the budget with incompressible bodies; the budget is re-read at most once a second.
        int stored = 0;
        ErrorCode? refusal = null;
        for (int i = 0; i < 100 && refusal is null; i++)
        {
            refusal = await ErrorOf(() => client.SendAsync(to, RandomNumberGenerator.GetBytes(30_000)));
            if (refusal is null) stored++;
            else break;
            await Task.Delay(50);
        }
        await Assert.That(refusal).IsEqualTo(ErrorCode.Full);
        await Assert.That(stored).IsGreaterThanOrEqualTo(8);
        await Assert.That(await ErrorOf(() => client.CreateQueueAsync())).IsEqualTo(ErrorCode.Full);
        await Assert.That(await OperationsMetrics.EventuallyAsync(async () => Value(await ScrapeAsync(relay), "relay_store_full") == 1)).IsTrue();

        // Nothing acknowledged was dropped: every stored message is still there, in order.
        for (int i = 0; i < stored; i++)
        {
            var m = await client.GetAsync(queue);
            await Assert.That(m).IsNotNull();
            await Assert.That(m!.Body.Length).IsEqualTo(30_000);
            await client.AckAsync(queue, m.MessageId);
        }
        await Assert.That(await client.GetAsync(queue)).IsNull();

        // The maintenance loop flushes and compacts; the refusals end.
        bool recovered = await OperationsMetrics.EventuallyAsync(async () => await ErrorOf(() => client.CreateQueueAsync()) is null, 30);
        await Assert.That(recovered).IsTrue();
        await client.SendAsync(to, "after"u8.ToArray());
        var text = await ScrapeAsync(relay);
        await Assert.That(Value(text, "relay_store_full")).IsEqualTo(0);
        await Assert.That(Value(text, "relay_store_reclaims_total")).IsGreaterThanOrEqualTo(1);
        await Assert.That(Value(text, "relay_commands_total", "command=\"send\",result=\"full\"")).IsGreaterThanOrEqualTo(1);
        await Assert.That(Value(text, "relay_store_disk_budget_bytes")).IsEqualTo(256 * 1024);
        await Assert.That(relay.Logs.Lines.Any(l => l.Contains("[23]"))).IsTrue();
        await Assert.That(relay.Logs.Lines.Any(l => l.Contains("[24]"))).IsTrue();
    }

    [Test]
    public async Task Idle_queues_and_old_messages_expire_by_the_relays_clock()
    {
        var clock = new OperationsClock();
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.Clock = clock;
            o.IdleQueueTtl = TimeSpan.FromHours(24);
            o.MessageTtl = TimeSpan.FromHours(2);
            o.SweepInterval = TimeSpan.Zero;   // the test sweeps by hand
        });
        await using var client = await relay.ConnectAsync();
        var idle = await client.CreateQueueAsync();
        var busy = await client.CreateQueueAsync();
        await client.SendAsync(new SenderQueue(busy.SenderId, null), "old"u8.ToArray());

        // Three hours on: the message outlived its TTL, the queues are not idle yet.
        clock.Advance(TimeSpan.FromHours(3));
        await Assert.That(await relay.Server.SweepNowAsync()).IsEqualTo(1);
        await Assert.That(await client.GetAsync(busy)).IsNull();
        await Assert.That(await client.GetAsync(idle)).IsNull();

        // A day later: the queue used meanwhile survives, the untouched one is gone.
        clock.Advance(TimeSpan.FromHours(20));
        await client.SendAsync(new SenderQueue(busy.SenderId, null), "fresh"u8.ToArray());
        clock.Advance(TimeSpan.FromHours(6));
        await relay.Server.SweepNowAsync();
        await Assert.That(await ErrorOf(() => client.GetAsync(idle))).IsEqualTo(ErrorCode.Auth);
        // The used queue still exists (its message, 6 h old, outlived the 2 h TTL meanwhile).
        await Assert.That(await ErrorOf(() => client.GetAsync(busy))).IsNull();

        var text = await ScrapeAsync(relay);
        await Assert.That(Value(text, "relay_messages_expired_total")).IsEqualTo(2);
        await Assert.That(Value(text, "relay_store_queues_deleted_total", "reason=\"idle\"")).IsEqualTo(1);
        await Assert.That(Value(text, "relay_store_sweeps_total")).IsEqualTo(2);
        await Assert.That(Value(text, "relay_store_sweep_seconds_count")).IsEqualTo(2);
    }

    [Test]
    public async Task A_queue_its_recipient_subscribes_to_is_not_idle()
    {
        var clock = new OperationsClock();
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.Clock = clock;
            o.IdleQueueTtl = TimeSpan.FromHours(24);
            o.SweepInterval = TimeSpan.Zero;   // the test sweeps by hand
            // The relay's clock runs days ahead of the clients' here, and so do the TLS certificates
            // it makes with it once it renews them (TlsCertificateRenewalTests): a client would find
            // them not yet valid. Expiry is the subject; plain TCP keeps the clients out of it.
            o.Tls = false;
        });
        await using var owner = await relay.ConnectAsync();
        var listened = await owner.CreateQueueAsync();
        var polled = await owner.CreateQueueAsync();
        var untouched = await owner.CreateQueueAsync();

        // 20 hours on, the recipient subscribes to one queue and polls the other, nobody sends.
        clock.Advance(TimeSpan.FromHours(20));
        await using (var device = await relay.ConnectAsync())
        {
            await device.SubscribeAsync(listened);
            await Assert.That(await device.GetAsync(polled)).IsNull();
        }
        await Assert.That(await OperationsMetrics.EventuallyAsync(async () => Value(await ScrapeAsync(relay), "relay_subscriptions") == 0)).IsTrue();

        // 30 hours after the queues were made: only the one nobody used is gone.
        clock.Advance(TimeSpan.FromHours(10));
        await relay.Server.SweepNowAsync();
        await using var check = await relay.ConnectAsync();
        await Assert.That(await ErrorOf(() => check.GetAsync(untouched))).IsEqualTo(ErrorCode.Auth);
        await Assert.That(await ErrorOf(() => check.SubscribeAsync(listened))).IsNull();

        // Subscribed for two days with no traffic, then the subscriber leaves just before a sweep:
        // the queue was in use until then and is kept (for the whole idle TTL from that sweep on).
        clock.Advance(TimeSpan.FromHours(48));
        await relay.Server.SweepNowAsync();
        await check.DisposeAsync();
        await Assert.That(await OperationsMetrics.EventuallyAsync(async () => Value(await ScrapeAsync(relay), "relay_subscriptions") == 0)).IsTrue();
        clock.Advance(TimeSpan.FromHours(1));
        await relay.Server.SweepNowAsync();
        await Assert.That(Value(await ScrapeAsync(relay), "relay_store_queues_deleted_total", "reason=\"idle\"")).IsEqualTo(2);   // untouched, and polled (unused for 78 hours)
        await using var last = await relay.ConnectAsync();
        await Assert.That(await ErrorOf(() => last.GetAsync(polled))).IsEqualTo(ErrorCode.Auth);
        await Assert.That(await ErrorOf(() => last.GetAsync(listened))).IsNull();
    }

    /// <summary>
    /// A relay on <paramref name="clock"/> whose queues expire after 24 idle hours, swept by the test
    /// only, over plain TCP: its clock runs days ahead (see A_queue_its_recipient_subscribes_to_is_not_idle).
    /// </summary>
    private static Task<TestRelay> StartSweptByHandAsync(OperationsClock clock, Action<RelayServerOptions>? configure = null) =>
        TestRelay.StartAsync(o =>
        {
            o.Clock = clock;
            o.IdleQueueTtl = TimeSpan.FromHours(24);
            o.SweepInterval = TimeSpan.Zero;
            o.Tls = false;
            configure?.Invoke(o);
        });

    [Test]
    public async Task A_SUB_that_arrives_while_the_sweep_deletes_its_queue_as_idle_keeps_the_queue()
    {
        var clock = new OperationsClock();
        await using var relay = await StartSweptByHandAsync(clock);
        await using var owner = await relay.ConnectAsync();
        var untouched = await owner.CreateQueueAsync();
        var queue = await owner.CreateQueueAsync();
        await using var device = await relay.ConnectAsync();
        await using var sender = await relay.ConnectAsync();

        // 30 hours on nobody used either queue; the recipient's SUB arrives just as the sweep found
        // the queue idle and unsubscribed, before it deleted it.
        clock.Advance(TimeSpan.FromHours(30));
        Task? subscribed = null;
        relay.Server.Store.BeforeIdleDelete = handle =>
        {
            if (subscribed is null && handle.RecipientId.AsSpan().SequenceEqual(queue.RecipientId))
            {
                subscribed = device.SubscribeAsync(queue);
                // Until the relay took the SUB in (it may not answer before the sweep goes on).
                var waited = System.Diagnostics.Stopwatch.StartNew();
                while (handle.Tag is null && waited.Elapsed < TimeSpan.FromSeconds(10))
                {
                    Thread.Sleep(1);
                }
            }
        };
        await relay.Server.SweepNowAsync();
        relay.Server.Store.BeforeIdleDelete = null;
        await Assert.That(subscribed).IsNotNull();
        await Assert.That(await ErrorOf(() => subscribed!)).IsNull();

        // The recipient was told OK: the queue is in use and kept, and its subscription delivers.
        await Assert.That(await ErrorOf(() => sender.SendAsync(new SenderQueue(queue.SenderId, null), "still here"u8.ToArray()))).IsNull();
        var delivery = await NextDeliveryAsync(device);
        await Assert.That(Encoding.UTF8.GetString(delivery.Body)).IsEqualTo("still here");
        await Assert.That(await ErrorOf(() => owner.GetAsync(untouched))).IsEqualTo(ErrorCode.Auth);
        await Assert.That(Value(await ScrapeAsync(relay), "relay_store_queues_deleted_total", "reason=\"idle\"")).IsEqualTo(1);
    }

    [Test]
    public async Task Commands_on_a_queue_whose_idle_deletion_is_being_written_answer_INTERNAL_and_work_once_it_failed()
    {
        var clock = new OperationsClock();
        await using var relay = await StartSweptByHandAsync(clock);
        await using var owner = await relay.ConnectAsync();
        var queue = await owner.CreateQueueAsync();
        await using var device = await relay.ConnectAsync();
        await using var sender = await relay.ConnectAsync();
        var to = new SenderQueue(queue.SenderId, null);

        // 30 hours on the sweep deletes the queue as idle; the write of that deletion waits (a slow
        // disk), then fails.
        clock.Advance(TimeSpan.FromHours(30));
        var store = relay.Server.Store;
        using var release = new ManualResetEventSlim();
        int writes = 0;
        Relay.Storage.QueueHandle? deleted = null;
        store.BeforeIdleDelete = handle =>
        {
            deleted = handle;
            store.BeforeWrite = (_, _) =>
            {
                if (Interlocked.Increment(ref writes) == 1)
                {
                    release.Wait(TimeSpan.FromSeconds(30));
                    throw new IOException("injected write failure");
                }
            };
        };
        var sweep = relay.Server.SweepNowAsync();
        try
        {
            await Assert.That(await EventuallyAsync(() => Task.FromResult(deleted?.Deletion == Relay.Storage.QueueDeletion.Pending))).IsTrue();

            // Whether the queue is gone is not known yet: not AUTH (final for a client), but INTERNAL
            // (try again later), by sender and recipient alike.
            await Assert.That(await ErrorOf(() => sender.SendAsync(to, "meanwhile"u8.ToArray()))).IsEqualTo(ErrorCode.Internal);
            await Assert.That(await ErrorOf(() => device.SubscribeAsync(queue))).IsEqualTo(ErrorCode.Internal);
            await Assert.That(await ErrorOf(() => owner.GetAsync(queue))).IsEqualTo(ErrorCode.Internal);
            await Assert.That(await ErrorOf(() => owner.DeleteAsync(queue))).IsEqualTo(ErrorCode.Internal);
        }
        finally
        {
            release.Set();
            await sweep;
            store.BeforeIdleDelete = null;
            store.BeforeWrite = null;
        }

        // The deletion was undone: the queue is back, and the same commands tried again work.
        await Assert.That(await ErrorOf(() => sender.SendAsync(to, "after"u8.ToArray()))).IsNull();
        await Assert.That(await ErrorOf(() => device.SubscribeAsync(queue))).IsNull();
        var delivery = await NextDeliveryAsync(device);
        await Assert.That(Encoding.UTF8.GetString(delivery.Body)).IsEqualTo("after");
        await Assert.That(Value(await ScrapeAsync(relay), "relay_store_queues_deleted_total", "reason=\"idle\"")).IsEqualTo(0);
        await Assert.That(Value(await ScrapeAsync(relay), "relay_store_sweep_failures_total")).IsEqualTo(1);
    }

    [Test]
    public async Task A_sweep_that_fails_deleting_idle_queues_logs_the_messages_it_expired_before()
    {
        var clock = new OperationsClock();
        await using var relay = await StartSweptByHandAsync(clock, o => o.MessageTtl = TimeSpan.FromHours(2));
        await using var client = await relay.ConnectAsync();
        var queue = await client.CreateQueueAsync();
        await client.SendAsync(new SenderQueue(queue.SenderId, null), "old"u8.ToArray());

        // 30 hours on: the message expires, then the queue's deletion as idle fails to write.
        clock.Advance(TimeSpan.FromHours(30));
        var store = relay.Server.Store;
        store.BeforeIdleDelete = _ => store.BeforeWrite = (_, _) => throw new IOException("injected write failure");
        await relay.Server.SweepNowAsync();
        store.BeforeIdleDelete = null;
        store.BeforeWrite = null;

        var failed = relay.Logs.Lines.Single(l => l.Contains("Expiry sweep failed"));
        await Assert.That(failed).Contains("Expiry sweep failed after it removed 1 messages and 0 idle queues: StoreException");
        await Assert.That(relay.Logs.Lines.Any(l => l.Contains("Expiry sweep removed"))).IsFalse();
        await Assert.That(Value(await ScrapeAsync(relay), "relay_messages_expired_total")).IsEqualTo(1);
        await Assert.That(Value(await ScrapeAsync(relay), "relay_store_sweep_failures_total")).IsEqualTo(1);
    }

    [Test]
    public async Task The_sweep_timer_runs_on_its_own()
    {
        await using var relay = await TestRelay.StartAsync(o => o.SweepInterval = TimeSpan.FromMilliseconds(100));
        await Assert.That(await OperationsMetrics.EventuallyAsync(async () => Value(await ScrapeAsync(relay), "relay_store_sweeps_total") >= 2)).IsTrue();
    }

    [Test]
    public async Task Stop_is_bounded_by_the_shutdown_timeout_with_clients_connected()
    {
        var relay = await TestRelay.StartAsync(o => o.ShutdownTimeout = TimeSpan.FromSeconds(2));
        await using var client = await relay.ConnectAsync();
        var queue = await client.CreateQueueAsync();
        await client.SubscribeAsync(queue);
        var started = System.Diagnostics.Stopwatch.StartNew();
        await relay.DisposeAsync();
        await Assert.That(started.Elapsed).IsLessThan(TimeSpan.FromSeconds(10));
    }

    [Test]
    public async Task An_identity_that_cannot_sign_the_TLS_certificate_fails_the_start_with_a_clear_error()
    {
        var dir = Path.Combine(Path.GetTempPath(), "relay-test-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dir);
        try
        {
            // A certificate with its key that is no CA: it loads as the identity, but signs no TLS certificate.
            using (var key = ECDsa.Create(ECCurve.NamedCurves.nistP256))
            {
                var request = new CertificateRequest("CN=not a CA", key, HashAlgorithmName.SHA256);
                request.CertificateExtensions.Add(new X509BasicConstraintsExtension(false, false, 0, true));
                using var certificate = request.CreateSelfSigned(DateTimeOffset.UtcNow.AddDays(-1), DateTimeOffset.UtcNow.AddYears(1));
                await File.WriteAllBytesAsync(RelayIdentity.PathIn(dir), certificate.Export(X509ContentType.Pkcs12));
            }
            using var unobserved = new UnobservedExceptions(e => e is ArgumentException && e.Message.Contains("Basic Constraints"));
            var logs = new CapturedLogs();

            // No client connects, so no handshake would ever have looked at the failure.
            var failed = await Assert.ThrowsAsync<InvalidDataException>(() => RelayServer.StartAsync(new RelayServerOptions
            {
                DataDirectory = dir,
                Listen = new IPEndPoint(IPAddress.Loopback, 0),
                Admin = new IPEndPoint(IPAddress.Loopback, 0),
            }, logging => logging.AddProvider(logs)));

            await Assert.That(failed!.Message).Contains("TLS certificate");
            await Assert.That(failed.Message).Contains(RelayIdentity.PathIn(dir));
            await Assert.That(logs.Lines.Any(l => l.StartsWith("Error Relay[7] ", StringComparison.Ordinal))).IsTrue();
            // Stopped again: readiness (and its log line) came before the TLS context was done.
            await Assert.That(logs.Lines.Any(l => l.Contains("Stopping: finishing requests in flight", StringComparison.Ordinal))).IsTrue();
            await Assert.That(await unobserved.CollectAsync()).IsEmpty();
        }
        finally
        {
            try { Directory.Delete(dir, recursive: true); } catch (IOException) { }
        }
    }

    [Test]
    [Arguments(UnixFileMode.UserRead | UnixFileMode.UserWrite, false)]
    [Arguments(UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.GroupRead | UnixFileMode.OtherRead, true)]
    [Arguments(UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.GroupRead, true)]
    [System.Runtime.Versioning.UnsupportedOSPlatform("windows")]
    public async Task An_identity_file_others_can_read_is_warned_about_at_start(UnixFileMode mode, bool warned)
    {
        var dir = Path.Combine(Path.GetTempPath(), "relay-test-" + Guid.NewGuid().ToString("N"));
        try
        {
            RelayIdentity.LoadOrCreate(dir, out _).Dispose();
            File.SetUnixFileMode(RelayIdentity.PathIn(dir), mode);
            var logs = new CapturedLogs();
            await using (var server = await RelayServer.StartAsync(new RelayServerOptions
            {
                DataDirectory = dir,
                Listen = new IPEndPoint(IPAddress.Loopback, 0),
                Admin = null,
                Tls = false,
            }, logging => logging.AddProvider(logs)))
            {
                var warning = logs.Lines.Where(l => l.StartsWith("Warning Relay[8] ", StringComparison.Ordinal)).ToList();
                await Assert.That(warning.Count).IsEqualTo(warned ? 1 : 0);
                if (warned)
                {
                    await Assert.That(warning[0]).Contains($"mode {Convert.ToString((int)mode, 8)}");
                    await Assert.That(warning[0]).Contains($"chmod 600 {RelayIdentity.PathIn(dir)}");
                }
            }
        }
        finally
        {
            try { Directory.Delete(dir, recursive: true); } catch (IOException) { }
        }
    }

    [Test]
    public async Task A_relay_listening_on_an_IPv6_address_gives_that_address_in_brackets_and_clients_reach_it()
    {
        await using var relay = await TestRelay.StartAsync(o => o.Listen = new IPEndPoint(IPAddress.IPv6Loopback, 0));
        var printed = relay.Address.ToString();
        await Assert.That(printed).EndsWith($"@[::1]:{relay.Server.RelayEndPoint.Port}");
        await Assert.That(relay.Logs.Lines.Any(l => l.StartsWith("Information Relay[1] ", StringComparison.Ordinal) && l.Contains(printed, StringComparison.Ordinal))).IsTrue();
        // What an operator copies from the log is what a client takes.
        var parsed = RelayAddress.Parse(printed);
        await using var client = await RelayConnection.ConnectAsync(parsed);
        await client.PingAsync();
    }

    [Test]
    public async Task Admin_connections_beyond_its_limit_are_closed_at_once_without_a_log_line_each()
    {
        await using var relay = await TestRelay.StartAsync();
        var admin = relay.Server.AdminEndPoint!;
        const int extra = 20;
        var sockets = new List<System.Net.Sockets.Socket>();
        try
        {
            for (int i = 0; i < OpenFiles.AdminConnections + extra; i++)
            {
                var socket = new System.Net.Sockets.Socket(admin.AddressFamily, System.Net.Sockets.SocketType.Stream, System.Net.Sockets.ProtocolType.Tcp);
                sockets.Add(socket);
                await socket.ConnectAsync(admin);
            }
            // The listener holds its 64 and closes the others at once: a read of theirs sees the end.
            var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(10);
            int closed;
            do
            {
                await Task.Delay(50);
                closed = sockets.Count(s => s.Poll(0, System.Net.Sockets.SelectMode.SelectRead) && s.Available == 0);
            }
            while (closed < extra && DateTime.UtcNow < deadline);
            await Assert.That(closed).IsEqualTo(extra);
            // Kestrel's warning for each refused connection (event 24) would let a flood of the admin port flood the log.
            var kestrelConnections = relay.Logs.Lines.Where(l => l.Contains("Microsoft.AspNetCore.Server.Kestrel.Connections", StringComparison.Ordinal)).ToList();
            await Assert.That(kestrelConnections).IsEmpty();
        }
        finally
        {
            foreach (var socket in sockets) socket.Dispose();
        }
    }
    [Test]
    [Arguments(false)]
    [Arguments(true)]
    public async Task A_client_that_goes_away_after_TLS_before_HELLO_is_counted_once_as_a_closed_handshake(bool reset)
    {
        await using var relay = await TestRelay.StartAsync();
        var before = await ScrapeAsync(relay);
        var client = await RawClient.ConnectRawAsync(relay);   // TLS done, no HELLO
        // The relay's side of TLS is done too once its session tickets arrive (it sends them after it
        // has read the client's Finished): going away before then is a TLS failure.
        await Assert.That(await EventuallyAsync(() => Task.FromResult(client.Socket.Available > 0), seconds: 10)).IsTrue();
        if (reset)
        {
            // RST instead of FIN: a client killed, or a proxy or NAT dropping the connection.
            client.Socket.LingerState = new System.Net.Sockets.LingerOption(true, 0);
            client.Socket.Close();
        }
        else
        {
            await client.ShutdownSendAsync();
        }
        await client.DisposeAsync();

        static double Handshakes(string text) => text.Split('\n').Where(l => l.StartsWith("relay_handshakes_total{", StringComparison.Ordinal))
            .Sum(l => double.Parse(l[(l.LastIndexOf(' ') + 1)..], System.Globalization.CultureInfo.InvariantCulture));
        string after = before;
        await EventuallyAsync(async () => Handshakes(after = await ScrapeAsync(relay)) > Handshakes(before), seconds: 10);
        await Assert.That(Value(after, "relay_handshakes_total", "result=\"closed\"") - Value(before, "relay_handshakes_total", "result=\"closed\"")).IsEqualTo(1);
        // Counted under that one result: a scrape a moment later finds no other.
        await Task.Delay(300);
        await Assert.That(Handshakes(await ScrapeAsync(relay)) - Handshakes(before)).IsEqualTo(1);
    }
}
