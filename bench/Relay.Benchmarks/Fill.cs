using System.Diagnostics;
using Relay.Client.Transport;
using Relay.Protocol;

namespace Relay.Benchmarks;

/// <summary>
/// <c>fill ADDRESS COUNT [QUEUES] [--plain-tcp]</c>: stores COUNT 256-byte messages spread over QUEUES
/// new queues (default 200) of a separately running relay and leaves them stored, for the start-up
/// measurement. The relay needs a quota of at least COUNT/QUEUES messages per queue.
/// </summary>
internal static class Fill
{
    public static async Task<int> RunAsync(string[] args)
    {
        var address = RelayAddress.Parse(args[0]);
        int count = int.Parse(args[1], System.Globalization.CultureInfo.InvariantCulture);
        int queueCount = args.Length > 2 && !args[2].StartsWith('-') ? int.Parse(args[2], System.Globalization.CultureInfo.InvariantCulture) : 200;
        var options = new RelayConnectionOptions { Tls = !args.Contains("--plain-tcp") };
        const int connections = 4, window = 64;
        var producers = new RelayConnection[connections];
        for (int i = 0; i < connections; i++) producers[i] = await RelayConnection.ConnectAsync(address, options);
        var senders = new SenderQueue[queueCount];
        for (int q = 0; q < queueCount; q++)
        {
            var recipient = await producers[q % connections].CreateQueueAsync();
            var senderKey = new byte[ProtocolConstants.KeySize];
            RelayCrypto.GenerateKeyPair(senderKey, new byte[ProtocolConstants.KeySize]);
            await producers[q % connections].SecureAsync(recipient.SenderId, senderKey);
            senders[q] = new SenderQueue(recipient.SenderId, senderKey);
        }
        int next = -1;
        long start = Stopwatch.GetTimestamp();
        var workers = new List<Task>();
        for (int p = 0; p < connections * window; p++)
        {
            var producer = producers[p % connections];
            workers.Add(Task.Run(async () =>
            {
                var body = new byte[Fixtures.BodySize];
                int seq;
                while ((seq = Interlocked.Increment(ref next)) < count)
                {
                    System.Buffers.Binary.BinaryPrimitives.WriteInt32BigEndian(body, seq);
                    await producer.SendAsync(senders[seq % queueCount], body);
                    if (seq % 100_000 == 0) Console.Error.WriteLine($"fill: {seq} sent");
                }
            }));
        }
        await Task.WhenAll(workers);
        double seconds = Stopwatch.GetElapsedTime(start).TotalSeconds;
        Console.WriteLine($"fill: stored {count} messages in {queueCount} queues in {seconds:0.0} s ({count / seconds:0} msg/s)");
        foreach (var p in producers) await p.DisposeAsync();
        return 0;
    }
}
