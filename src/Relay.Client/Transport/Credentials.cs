namespace Relay.Client.Transport;

/// <summary>What the recipient of a queue keeps: its id, its private X25519 keys and the delivery key.</summary>
public sealed record RecipientQueue(byte[] RecipientId, byte[] SenderId, byte[] RecipientPrivateKey, byte[] DeliveryKey);

/// <summary>What a sender keeps: the sender id and, once it secured the queue, its private key.</summary>
public sealed record SenderQueue(byte[] SenderId, byte[]? SenderPrivateKey);

/// <summary>A message pushed to a subscription or returned by GET, opened with the queue's delivery key.</summary>
public sealed record Delivery(byte[] RecipientId, ulong MessageId, uint Hour, byte Flags, byte[] Body);

/// <summary>Something the relay pushed: a delivery, or the end of a subscription.</summary>
public abstract record RelayEvent;
/// <summary>A delivery, with the subscribed queue it belongs to (the one given to SubscribeAsync).</summary>
public sealed record DeliveryEvent(Delivery Delivery, RecipientQueue Queue) : RelayEvent;
public sealed record SubscriptionEndedEvent(byte[] RecipientId) : RelayEvent;
/// <summary>
/// A delivery of this subscribed queue failed its integrity check (a delivery key that is not the
/// queue's, or a relay that does not follow the protocol): the queue is no longer subscribed on this
/// connection, and the message stays stored on the relay.
/// </summary>
public sealed record DeliveryRejectedEvent(RecipientQueue Queue, string Reason) : RelayEvent;
