using System.Security.Cryptography;
using Relay.Protocol;
using Relay.Storage;

namespace Relay.Server.Connections;

/// <summary>
/// The one live subscription of a queue, hung on <see cref="QueueHandle.Tag"/>. Guarded by
/// <see cref="QueueHandle.Sync"/>: at most <see cref="Window"/> messages are outstanding (delivered,
/// not yet acked), in delivery order.
/// </summary>
internal sealed class Subscription(RelaySession session, QueueHandle queue, int window) : IDisposable
{
    private DeliveryCipher? _cipher;
    private NonceSequence? _nonces;
    private Queue<ulong>? _outstanding;   // the outstanding ids, oldest first

    public RelaySession Session { get; } = session;
    public QueueHandle Queue { get; } = queue;
    /// <summary>Messages that may be outstanding at once (1 to <see cref="ProtocolConstants.MaxDeliveryWindow"/>).</summary>
    public int Window { get; } = window;
    /// <summary>Created at the first delivery: a subscriber that only waits holds no cipher context.</summary>
    public DeliveryCipher Cipher => _cipher ??= new(Queue.DeliveryKey);
    /// <summary>Nonces of this subscription's deliveries: one random start, then counting (PROTOCOL.md §7).</summary>
    public NonceSequence Nonces => _nonces ??= new();
    /// <summary>Where the next delivery reads from: after the message delivered last, or the oldest (0).</summary>
    public ulong NextFrom { get; private set; }
    public bool Ended;
    /// <summary>Waiting for the session's output to drain before its next delivery (guarded by the session's write lock).</summary>
    public bool OutputDeferred;

    public bool HasRoom => (_outstanding?.Count ?? 0) < Window;

    /// <summary>True while a message pushed is not acknowledged.</summary>
    public bool HasOutstanding => _outstanding is { Count: > 0 };

    /// <summary>How many times <see cref="Restart"/> ran: an ACK answered INTERNAL restarts the subscription only if nothing else did since.</summary>
    public int Restarts { get; private set; }

    /// <summary>
    /// True when <paramref name="oldestStored"/>, the queue's oldest stored message, is one this
    /// subscription moved past without it being outstanding: a failed delete stored it again (only an
    /// undone delete puts a message back below the ids already handed out).
    /// </summary>
    public bool IsBehind(ulong oldestStored) =>
        oldestStored < NextFrom && !(_outstanding is not null && _outstanding.TryPeek(out ulong oldest) && oldest <= oldestStored);

    public void Delivered(ulong id)
    {
        (_outstanding ??= new Queue<ulong>(Window)).Enqueue(id);
        NextFrom = id + 1;
    }

    /// <summary>How many outstanding messages an ACK through <paramref name="id"/> covers: its place in delivery order (1 = the oldest), 0 when it is not outstanding.</summary>
    public int CountThrough(ulong id)
    {
        if (_outstanding is null)
        {
            return 0;
        }
        int n = 0;
        foreach (ulong outstanding in _outstanding)
        {
            n++;
            if (outstanding == id)
            {
                return n;
            }
            if (outstanding > id)
            {
                break;
            }
        }
        return 0;
    }

    /// <summary>Releases every outstanding message up to and including <paramref name="id"/>; false when none was.</summary>
    public bool TryReleaseThrough(ulong id)
    {
        bool released = false;
        while (_outstanding is not null && _outstanding.TryPeek(out ulong oldest) && oldest <= id)
        {
            _outstanding.Dequeue();
            released = true;
        }
        return released;
    }

    /// <summary>Starts again from the oldest stored message with nothing outstanding (as a SUB repeated on the same connection).</summary>
    public void Restart()
    {
        _outstanding?.Clear();
        NextFrom = 0;
        Restarts++;
    }

    /// <summary>
    /// Frees the cipher. Called wherever the subscription ends, which may be on two threads at once
    /// (its connection closing, another connection's SUB of the queue, a DEL): the cipher frees its
    /// native contexts on the first call only.
    /// </summary>
    public void Dispose() => _cipher?.Dispose();
}
