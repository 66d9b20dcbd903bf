using System.Diagnostics.Tracing;
using System.Globalization;
using Relay.Client.Transport;

namespace Relay.Benchmarks;

/// <summary>
/// <c>allocations [tls] [MESSAGES] [--budget BYTES]</c>: which types the message path allocates. A relay in this
/// process (relaxed durability, data in the temp directory) and two SDK connections over loopback
/// pass MESSAGES messages (default 20,000) one at a time: SEND, the pushed MSG, ACK (not awaited,
/// as a consumer that goes on reading). Prints the bytes allocated per message by the whole
/// process (relay and SDK together, as BenchmarkDotNet's round trip counts them) and the types the
/// runtime's allocation sampling event (one sample per ~100 KB) attributes them to. Sampling counts
/// the type of the object that crossed each 100 KB mark, so large objects are over-represented:
/// a diagnostic of where bytes go, not a figure. With <c>--budget</c> it exits 1 when the bytes per
/// message exceed BYTES: CI holds the message path to an allocation budget, as Garnet's benchmarks do.
/// </summary>
internal static class Allocations
{
    public static async Task<int> RunAsync(string[] args)
    {
        bool tls = false;
        int messages = 20_000;
        double? budget = null;
        for (int i = 0; i < args.Length; i++)
        {
            if (args[i] == "tls") tls = true;
            else if (args[i] == "--budget" && i + 1 < args.Length) budget = double.Parse(args[++i], CultureInfo.InvariantCulture);
            else messages = int.Parse(args[i], CultureInfo.InvariantCulture);
        }
        await using var relay = await OneQueueRelay.StartAsync(tls, durable: false,
            (server, options) => RelayConnection.ConnectAsync(server.Address, options), deliveryWindow: 32);
        var (producer, consumer, recipient, sender) = (relay.Producer, relay.Consumer, relay.Recipient, relay.Sender);
        var body = Fixtures.Random(Fixtures.BodySize);
        // A cancellable token, as an app (and relay bench) passes one.
        using var cts = new CancellationTokenSource();

        async Task PassAsync(int count)
        {
            for (int i = 0; i < count; i++)
            {
                await producer.SendAsync(sender, body, 0, cts.Token);
                while (true)
                {
                    if (await consumer.Events.ReadAsync(cts.Token) is DeliveryEvent { Delivery: var d })
                    {
                        _ = consumer.AckAsync(recipient, d.MessageId, cts.Token);
                        break;
                    }
                }
            }
        }

        await PassAsync(2_000);   // warm: pools filled, connections' buffers grown
        await Task.Delay(200);
        using var sampler = new AllocationSampler();
        long before = GC.GetTotalAllocatedBytes(precise: true);
        await PassAsync(messages);
        await Task.Delay(100);
        long after = GC.GetTotalAllocatedBytes(precise: true);
        double perMessage = (after - before) / (double)messages;
        Console.WriteLine(string.Format(CultureInfo.InvariantCulture, "{0}: {1:0} bytes allocated per message (relay and SDK, whole process)",
            tls ? "TLS" : "plain TCP", perMessage));
        foreach (var (type, bytes) in sampler.ByType().Take(20))
        {
            Console.WriteLine(string.Format(CultureInfo.InvariantCulture, "{0,6:0.0}%  {1}", 100.0 * bytes / sampler.Total, type));
        }
        if (budget is { } limit)
        {
            bool within = perMessage <= limit;
            Console.WriteLine(string.Format(CultureInfo.InvariantCulture, "allocation budget {0:0} bytes per message: {1}", limit, within ? "within" : "EXCEEDED"));
            return within ? 0 : 1;
        }
        return 0;
    }

    /// <summary>The runtime's GCAllocationTick events, summed by type (byte arrays by size).</summary>
    private sealed class AllocationSampler : EventListener
    {
        private readonly Dictionary<string, long> _bytes = [];
        public long Total { get; private set; }

        public List<(string Type, long Bytes)> ByType()
        {
            lock (_bytes) return [.. _bytes.OrderByDescending(kv => kv.Value).Select(kv => (kv.Key, kv.Value))];
        }

        protected override void OnEventSourceCreated(EventSource source)
        {
            if (source.Name == "Microsoft-Windows-DotNETRuntime")
            {
                EnableEvents(source, EventLevel.Verbose, (EventKeywords)0x1);   // GC keyword
            }
        }

        protected override void OnEventWritten(EventWrittenEventArgs e)
        {
            if (e.EventName is null || !e.EventName.StartsWith("GCAllocationTick", StringComparison.Ordinal) || e.Payload is null || e.PayloadNames is null) return;
            string type = e.Payload[e.PayloadNames.IndexOf("TypeName")] as string ?? "?";
            if (type == "System.Byte[]" && e.PayloadNames.IndexOf("ObjectSize") is >= 0 and var size)
            {
                type += " of " + Convert.ToInt64(e.Payload[size], CultureInfo.InvariantCulture) + " bytes";
            }
            long amount = Convert.ToInt64(e.Payload[e.PayloadNames.IndexOf("AllocationAmount64")], CultureInfo.InvariantCulture);
            lock (_bytes)
            {
                _bytes[type] = _bytes.GetValueOrDefault(type) + amount;
                Total += amount;
            }
        }
    }
}
