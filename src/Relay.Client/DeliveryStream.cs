using System.Threading.Channels;

namespace Relay.Client;

/// <summary>
/// The client's stream of deliveries, in arrival order, holding each message once while it waits to be
/// read. After a reconnection the relay pushes again every message of a queue that was not
/// acknowledged, including those the app has not read yet: those are already waiting here, and a second
/// copy is dropped instead of queued behind the first. An app that does not read while its connection
/// comes and goes therefore holds each message once, not once per reconnection, and does not ACK a
/// message twice. A message the app has read and not acknowledged is queued again when pushed again
/// (at-least-once delivery, as without the client in between).
/// </summary>
internal sealed class DeliveryStream : ChannelReader<QueueDelivery>
{
    private readonly Channel<QueueDelivery> _channel = Channel.CreateUnbounded<QueueDelivery>();
    // Queue (recipient id) and message id of every delivery in _channel; under its own lock with the
    // channel's writes and reads, so that the two agree.
    private readonly HashSet<(byte[] RecipientId, ulong MessageId)> _waiting = new(WaitingComparer.Instance);

    /// <summary>Queues <paramref name="delivery"/> unless a copy of it waits already; false then (or once completed).</summary>
    public bool TryWrite(QueueDelivery delivery)
    {
        var key = (delivery.Queue.RecipientId, delivery.Delivery.MessageId);
        lock (_waiting)
        {
            if (!_waiting.Add(key))
            {
                return false;
            }
            if (_channel.Writer.TryWrite(delivery))
            {
                return true;
            }
            _waiting.Remove(key);
            return false;
        }
    }

    /// <summary>No more deliveries: readers see the end once they have read what waits.</summary>
    public void Complete() => _channel.Writer.TryComplete();

    public override bool TryRead(out QueueDelivery item)
    {
        lock (_waiting)
        {
            if (!_channel.Reader.TryRead(out item!))
            {
                return false;
            }
            _waiting.Remove((item.Queue.RecipientId, item.Delivery.MessageId));
            return true;
        }
    }

    public override bool TryPeek(out QueueDelivery item) => _channel.Reader.TryPeek(out item!);

    public override bool CanPeek => true;

    public override bool CanCount => true;

    public override int Count => _channel.Reader.Count;

    public override ValueTask<bool> WaitToReadAsync(CancellationToken cancellationToken = default) =>
        _channel.Reader.WaitToReadAsync(cancellationToken);

    public override Task Completion => _channel.Reader.Completion;

    private sealed class WaitingComparer : IEqualityComparer<(byte[] RecipientId, ulong MessageId)>
    {
        public static readonly WaitingComparer Instance = new();

        public bool Equals((byte[] RecipientId, ulong MessageId) x, (byte[] RecipientId, ulong MessageId) y) =>
            x.MessageId == y.MessageId && IdComparer.Instance.Equals(x.RecipientId, y.RecipientId);

        public int GetHashCode((byte[] RecipientId, ulong MessageId) key) =>
            IdComparer.Instance.GetHashCode(key.RecipientId) ^ key.MessageId.GetHashCode();
    }
}
