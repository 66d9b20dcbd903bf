namespace Relay.Bench;

public enum BenchScenario
{
    /// <summary>Consumers subscribed; producers pipeline with at most Window unacknowledged sends each.</summary>
    Live,
    /// <summary>Send N with no consumer, then subscribe and drain.</summary>
    Drain,
    /// <summary>A fixed total rate, for latency.</summary>
    Paced,
}

public sealed class BenchOptions
{
    public int Queues { get; set; } = 100;
    public int Producers { get; set; } = 4;
    public int Consumers { get; set; } = 4;
    public int Size { get; set; } = 256;
    public int Messages { get; set; } = 200_000;
    public int Window { get; set; } = 256;
    /// <summary>Messages each subscription may have outstanding (SUB's delivery window).</summary>
    public int DeliveryWindow { get; set; } = 32;
    /// <summary>Consumers acknowledge with ACK through (one per batch of deliveries read) instead of one ACK per message.</summary>
    public bool AckThrough { get; set; } = true;
    public BenchScenario Scenario { get; set; } = BenchScenario.Live;
    public int Rate { get; set; } = 5_000;
    public TimeSpan Duration { get; set; } = TimeSpan.FromSeconds(10);
    /// <summary>Paced: sent at the rate before <see cref="Duration"/>, checked for loss but not measured.</summary>
    public TimeSpan Warmup { get; set; } = TimeSpan.FromSeconds(1);
    public string? Socks { get; set; }
    public bool Tls { get; set; } = true;
    public int? RelayPid { get; set; }
}

public sealed record BenchResult
{
    public required string Scenario { get; init; }
    public long Sent { get; init; }
    public long Received { get; init; }
    public long Lost { get; init; }
    public long Duplicated { get; init; }
    public long QuotaRetries { get; init; }
    /// <summary>ACK commands the consumers sent (with --ack through, fewer than the messages).</summary>
    public long Acks { get; init; }
    /// <summary>Paced: messages of the warm-up, counted in Sent and Received and checked, left out of latency, rate and CPU.</summary>
    public long WarmupMessages { get; init; }
    /// <summary>Messages received but the warm-up's: what latency, rate and CPU are over.</summary>
    public long MeasuredMessages { get; init; }
    /// <summary>Garbage collections of this process (any generation) in the measured part, an in-process relay's included, and their total pause.</summary>
    public int GeneratorCollections { get; init; }
    public double GeneratorGcPauseMs { get; init; }
    /// <summary>Paced: how late after its due time the pacer sent a message, at p99 (latency is measured from the actual send).</summary>
    public double? PacerLagP99Ms { get; init; }
    public double Seconds { get; init; }
    public double MessagesPerSecond { get; init; }
    public double P50Ms { get; init; }
    public double P99Ms { get; init; }
    public double P999Ms { get; init; }
    public double MaxMs { get; init; }
    /// <summary>CPU of this process per message (relay included when it runs in-process).</summary>
    public double ProcessCpuUsPerMessage { get; init; }
    /// <summary>CPU of the relay process per message, when known (in-process: not separable; --relay-pid: exact).</summary>
    public double? RelayCpuUsPerMessage { get; init; }
    /// <summary>The relay process's context switches per message (waits and preemptions, all its threads), with --relay-pid.</summary>
    public SwitchesPerMessage? RelaySwitchesPerMessage { get; init; }
    public bool LocalRelay { get; init; }
    /// <summary>The in-process relay's group commits over the whole run (set-up and warm-up included); null with a relay elsewhere.</summary>
    public CommitSummary? Commits { get; init; }
}

/// <summary>A run that cannot go on as asked (the relay's limits do not fit the workload); the message says what to change.</summary>
public sealed class BenchException(string message) : Exception(message);

/// <summary>Context switches per message: waits (a thread woken again after it had nothing to do) and preemptions.</summary>
public readonly record struct SwitchesPerMessage(double Waits, double Preemptions);
