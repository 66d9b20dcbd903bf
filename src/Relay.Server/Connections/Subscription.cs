using System.Security.Cryptography;
using Relay.Protocol;
using Relay.Storage;

namespace Relay.Server.Connections;

/// <summary>
/// The one live subscription of a queue, hung on <see cref="QueueHandle.Tag"/>. Guarded by
/// <see cref="QueueHandle.Sync"/>: at most one message is outstanding (delivered, not yet acked).
/// </summary>
internal sealed class Subscription(RelaySession session, QueueHandle queue) : IDisposable
{
    private ChaCha20Poly1305? _cipher;
    private NonceSequence? _nonces;

    public RelaySession Session { get; } = session;
    public QueueHandle Queue { get; } = queue;
    /// <summary>Created at the first delivery: a subscriber that only waits holds no cipher context.</summary>
    public ChaCha20Poly1305 Cipher => _cipher ??= new(Queue.DeliveryKey);
    /// <summary>Nonces of this subscription's deliveries: one random start, then counting (PROTOCOL.md §7).</summary>
    public NonceSequence Nonces => _nonces ??= new();
    public bool HasOutstanding;
    public ulong Outstanding;
    public bool Ended;

    public void Dispose() => _cipher?.Dispose();
}
