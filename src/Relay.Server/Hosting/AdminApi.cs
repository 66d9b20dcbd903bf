using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Http;
using Relay.Server.Metrics;

namespace Relay.Server.Hosting;

/// <summary>
/// The token-protected admin API on the admin listener. Every /admin/* request needs
/// <c>Authorization: Bearer &lt;admin token&gt;</c> (compared in constant time); without a configured
/// token the whole /admin/* space answers 404, as if it did not exist. Health, readiness and
/// metrics are not under /admin and need no token.
/// <list type="bullet">
/// <item>GET /admin/stats: store-wide counts as JSON (<see cref="AdminStats"/>).</item>
/// <item>GET /admin/queue-creation: <c>{"enabled": true|false}</c>.</item>
/// <item>POST /admin/queue-creation with <c>{"enabled": false}</c>: flips the new-queues switch at
/// runtime (NEW answers DISABLED; existing queues keep working). Not persisted across restarts.</item>
/// <item>POST /admin/backup: makes a backup (<see cref="RelayBackups"/>) and answers where, or 409
/// while another is being made (or another process's backup into the same directory held it for too
/// long), or 500 with the reason it failed.</item>
/// </list>
/// </summary>
internal static class AdminApi
{
    private const string Prefix = "/admin";

    public static void Map(WebApplication app, RelayServerContext context, DateTime startedUtc)
    {
        var options = context.Options;
        byte[]? tokenHash = string.IsNullOrEmpty(options.AdminToken) ? null : SHA256.HashData(Encoding.UTF8.GetBytes(options.AdminToken));

        app.Use(async (ctx, next) =>
        {
            if (!ctx.Request.Path.StartsWithSegments(Prefix, StringComparison.Ordinal))
            {
                await next(ctx);
                return;
            }
            if (tokenHash is null)
            {
                ctx.Response.StatusCode = StatusCodes.Status404NotFound;
                return;
            }
            if (!Authorized(ctx.Request, tokenHash))
            {
                Log.AdminUnauthorized(context.Logger);
                ctx.Response.StatusCode = StatusCodes.Status401Unauthorized;
                ctx.Response.Headers.WWWAuthenticate = "Bearer";
                return;
            }
            ctx.Response.Headers.CacheControl = "no-store";
            await next(ctx);
        });
        if (tokenHash is null)
        {
            return;
        }

        app.MapGet(Prefix + "/stats", (RequestDelegate)(ctx =>
        {
            var stats = context.Metrics.Snapshot(context.Store, options, DateTime.UtcNow - startedUtc);
            return ctx.Response.WriteAsJsonAsync(stats, AdminJsonContext.Default.AdminStats);
        }));
        app.MapGet(Prefix + "/queue-creation", (RequestDelegate)(ctx =>
            ctx.Response.WriteAsJsonAsync(new QueueCreationSwitch { Enabled = options.AllowNewQueues }, AdminJsonContext.Default.QueueCreationSwitch)));
        app.MapPost(Prefix + "/queue-creation", (RequestDelegate)(async ctx =>
        {
            QueueCreationSwitch? body;
            try
            {
                body = await JsonSerializer.DeserializeAsync(ctx.Request.Body, AdminJsonContext.Default.QueueCreationSwitch, ctx.RequestAborted);
            }
            catch (JsonException)
            {
                body = null;
            }
            if (body is null)
            {
                ctx.Response.StatusCode = StatusCodes.Status400BadRequest;
                await ctx.Response.WriteAsync("expected {\"enabled\": true|false}\n");
                return;
            }
            if (options.AllowNewQueues != body.Enabled)
            {
                options.AllowNewQueues = body.Enabled;
                Log.QueueCreationSwitched(context.Logger, body.Enabled ? "enabled" : "disabled");
            }
            await ctx.Response.WriteAsJsonAsync(new QueueCreationSwitch { Enabled = options.AllowNewQueues }, AdminJsonContext.Default.QueueCreationSwitch);
        }));
        app.MapPost(Prefix + "/backup", (RequestDelegate)(ctx => Backup(ctx, context.Backups)));
    }

    private static async Task Backup(HttpContext ctx, RelayBackups backups)
    {
        BackupResult? made;
        try
        {
            made = await backups.CreateAsync();
        }
        catch (BackupException e) when (e.DirectoryBusy)
        {
            ctx.Response.StatusCode = StatusCodes.Status409Conflict;
            await ctx.Response.WriteAsJsonAsync(new AdminError { Error = e.Message }, AdminJsonContext.Default.AdminError);
            return;
        }
        catch (BackupException e)
        {
            ctx.Response.StatusCode = StatusCodes.Status500InternalServerError;
            await ctx.Response.WriteAsJsonAsync(new AdminError { Error = "backup failed: " + e.Message }, AdminJsonContext.Default.AdminError);
            return;
        }
        if (made is null)
        {
            ctx.Response.StatusCode = StatusCodes.Status409Conflict;
            await ctx.Response.WriteAsJsonAsync(new AdminError { Error = "a backup is being made; try again when it is done" }, AdminJsonContext.Default.AdminError);
            return;
        }
        await ctx.Response.WriteAsJsonAsync(made, AdminJsonContext.Default.BackupResult);
    }

    /// <summary>Constant-time comparison of the bearer token (hashes of equal length, whatever was sent).</summary>
    private static bool Authorized(HttpRequest request, byte[] tokenHash)
    {
        string? header = request.Headers.Authorization;
        const string scheme = "Bearer ";
        if (header is null || !header.StartsWith(scheme, StringComparison.OrdinalIgnoreCase))
        {
            return false;
        }
        Span<byte> hash = stackalloc byte[32];
        SHA256.HashData(Encoding.UTF8.GetBytes(header.AsSpan(scheme.Length).Trim().ToString()), hash);
        return CryptographicOperations.FixedTimeEquals(hash, tokenHash);
    }
}
