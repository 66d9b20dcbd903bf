using Prometheus;
using Relay.Protocol;
using Relay.Storage;

namespace Relay.Server.Metrics;

/// <summary>Result label of relay_commands_total: "ok" or the lower-case error name.</summary>
public static class CommandResult
{
    public const string Ok = "ok";
    public const string Cmd = "cmd";
    public static string From(ErrorCode code) => code switch
    {
        ErrorCode.Syntax => "syntax",
        ErrorCode.Version => "version",
        ErrorCode.Auth => "auth",
        ErrorCode.NoQueue => "no_queue",
        ErrorCode.Quota => "quota",
        ErrorCode.TooLarge => "too_large",
        ErrorCode.Limit => "limit",
        ErrorCode.Internal => "internal",
        ErrorCode.NoMsg => "no_msg",
        ErrorCode.Cmd => "cmd",
        ErrorCode.Full => "full",
        ErrorCode.Disabled => "disabled",
        _ => "other",
    };
}

/// <summary>
/// The relay's Prometheus metrics, on a registry of its own (several relays may share a process in
/// tests). Labels carry only command names, results and reasons: never an id, key or address.
/// </summary>
public sealed class RelayMetrics
{
    public CollectorRegistry Registry { get; } = Prometheus.Metrics.NewCustomRegistry();

    private readonly Gauge _connectionsOpen;
    private readonly Counter _connectionsAccepted;
    private readonly Counter _connectionsRejected;
    private readonly Counter _handshakes;
    private readonly Counter _commands;
    private readonly Counter _protocolErrors;
    private readonly Gauge _subscriptions;
    private readonly Counter _messagesStored;
    private readonly Counter _bytesStored;
    private readonly Counter _deliveries;
    private readonly Counter _acked;
    private readonly Histogram _batchSize;
    private readonly Histogram _fsync;
    private readonly Counter.Child _handshakeOk;
    private readonly Dictionary<(FrameType?, string), Counter.Child> _commandChildren = new();
    private readonly object _childLock = new();

    public RelayMetrics()
    {
        var f = Prometheus.Metrics.WithCustomRegistry(Registry);
        DotNetStats.Register(Registry);
        _connectionsOpen = f.CreateGauge("relay_connections_open", "Relay connections currently open.");
        _connectionsAccepted = f.CreateCounter("relay_connections_accepted_total", "Relay connections accepted.");
        _connectionsRejected = f.CreateCounter("relay_connections_rejected_total", "Relay connections closed at once by a limit.", "reason");
        _handshakes = f.CreateCounter("relay_handshakes_total", "Handshakes by result: ok, or the reason of the failure.", "result");
        _commands = f.CreateCounter("relay_commands_total", "Commands by type and result (ok or the error code).", "command", "result");
        _protocolErrors = f.CreateCounter("relay_protocol_errors_total", "Connections closed for a protocol violation, by error code.", "code");
        _subscriptions = f.CreateGauge("relay_subscriptions", "Queues with a live subscriber.");
        _messagesStored = f.CreateCounter("relay_messages_stored_total", "Messages accepted (durable) by SEND.");
        _bytesStored = f.CreateCounter("relay_message_bytes_stored_total", "Body bytes accepted by SEND.");
        _deliveries = f.CreateCounter("relay_deliveries_total", "Messages pushed to subscribers.");
        _acked = f.CreateCounter("relay_messages_acked_total", "Messages acknowledged and deleted.");
        _batchSize = f.CreateHistogram("relay_store_commit_operations", "Write operations per group-commit batch.",
            new HistogramConfiguration { Buckets = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096] });
        _fsync = f.CreateHistogram("relay_store_commit_seconds", "Time of one group-commit batch write including its fsync.",
            new HistogramConfiguration { Buckets = Histogram.ExponentialBuckets(0.00005, 2, 16) });
        _handshakeOk = _handshakes.WithLabels("ok");
    }

    public void ConnectionOpened()
    {
        _connectionsAccepted.Inc();
        _connectionsOpen.Inc();
    }

    public void ConnectionClosed() => _connectionsOpen.Dec();
    public void ConnectionRejected(string reason) => _connectionsRejected.WithLabels(reason).Inc();
    public void HandshakeSucceeded() => _handshakeOk.Inc();
    public void HandshakeFailed(string reason) => _handshakes.WithLabels(reason).Inc();
    public void ProtocolError(ErrorCode code) => _protocolErrors.WithLabels(CommandResult.From(code)).Inc();
    public void SubscriptionsChanged(int delta) => _subscriptions.Inc(delta);
    public void Delivered() => _deliveries.Inc();
    public void MessageAcked() => _acked.Inc();

    public void MessageStored(int bytes)
    {
        _messagesStored.Inc();
        _bytesStored.Inc(bytes);
    }

    public void Command(FrameType? type, string result)
    {
        Counter.Child? child;
        lock (_childLock)
        {
            if (!_commandChildren.TryGetValue((type, result), out child))
            {
                child = _commands.WithLabels(CommandName(type), result);
                _commandChildren[(type, result)] = child;
            }
        }
        child.Inc();
    }

    public void Committed(StoreCommit commit)
    {
        _batchSize.Observe(commit.Operations);
        _fsync.Observe(commit.FsyncSeconds);
    }

    private static string CommandName(FrameType? type) => type switch
    {
        FrameType.Ping => "ping",
        FrameType.New => "new",
        FrameType.SKey => "skey",
        FrameType.Send => "send",
        FrameType.Sub => "sub",
        FrameType.Ack => "ack",
        FrameType.Get => "get",
        FrameType.Off => "off",
        FrameType.Del => "del",
        _ => "unknown",
    };
}
