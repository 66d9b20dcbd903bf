using Relay.Protocol;

namespace Relay.Client.Transport;

/// <summary>
/// One queue's delivery window on one connection, counted as the relay counts it (PROTOCOL.md §6):
/// the ids of the messages the relay pushed under the queue's subscription and this connection has not
/// acknowledged, oldest first; an ACK of <c>id</c>, with or without the through flag, frees every one
/// of them up to <c>id</c>. The relay pushes only while its own count has room, so a push that finds
/// this one full breaks the protocol, and so does a push of a queue no SUB was granted for.
/// </summary>
/// <remarks>
/// <para>
/// The relay and the client see each change at different moments; each is taken where the relay
/// cannot be ahead of the client, so that a relay that follows the protocol never finds the count full
/// (where the order is not known the client frees a place rather than keep it: the check may let a
/// push through that the relay should have held, never refuse one it was allowed):
/// </para>
/// <list type="bullet">
/// <item>A SUB answered OK starts the count afresh with the window the relay grants (1 to
/// <see cref="ProtocolConstants.MaxDeliveryWindow"/>): the relay writes that OK before the new
/// subscription's first push, so the pushes read before it belong to the subscription it replaced and
/// count against that one's window.</item>
/// <item>An ACK of <c>id</c> frees the places up to <c>id</c> when it is sent (the relay may push the
/// next message as soon as it has accepted the ACK, before its answer, but never before the ACK is
/// sent) and again when its answer is read, whatever the answer (the relay may free them when it
/// answers). Meanwhile the relay may push a message up to <c>id</c> that the client had not read when
/// it sent the ACK (after a SUB repeated, the relay delivers again from the oldest message, and the app
/// acknowledges the copies delivered before), and then free its place when the ACK arrives: so a push
/// that finds the count full first frees the places up to each unanswered ACK of the queue, at most
/// <see cref="ProtocolConstants.MaxDeliveryWindow"/> per ACK (no more than one ACK frees at the
/// relay). An ACK the relay refuses (NO_MSG) thus frees places the relay keeps.</item>
/// <item>An ACK answered INTERNAL makes the relay start the subscription again from the oldest stored
/// message with its window empty, some time after it wrote the answer: the count starts afresh at the
/// answer, and again at the first push whose id is not above the one pushed before it (the relay's
/// restart: a subscription pushes in increasing id order). Each such answer allows one such
/// restart.</item>
/// <item>An END changes nothing here: an END can cross the answer to a newer SUB of the same queue on
/// the same connection, so the pushes after it still count against the window of the last SUB
/// answered OK.</item>
/// <item>GET answers (MSG with a correlation id) are not pushes and are not counted.</item>
/// </list>
/// <para>
/// So the app's deliveries of a queue not yet acknowledged are at most the window (and, for a
/// relay that does not follow the protocol, whatever the app's own SUBs and ACKs allow besides). Nothing
/// here allocates once the window is granted. Not thread-safe: the connection guards it with the lock
/// its read loop takes for each push.
/// </para>
/// </remarks>
internal sealed class DeliveryWindow
{
    private ulong[] _outstanding = [];   // ring, oldest at _head
    private int _head;
    private int _count;
    private ulong _lastPushed;
    private bool _pushed;                // since the last SUB answered OK
    private int _restartsExpected;       // ACKs answered INTERNAL whose restart has not been seen

    /// <summary>The window the relay granted with the last SUB answered OK; 0 while none was.</summary>
    public int Granted { get; private set; }

    /// <summary>Messages pushed and not acknowledged.</summary>
    public int Outstanding => _count;

    /// <summary>True when the relay may push nothing more before a place is freed.</summary>
    public bool IsFull => _count >= Granted;

    /// <summary>The window a relay grants for a SUB asking for <paramref name="requested"/> (a larger value gets the maximum, 0 counts as 1).</summary>
    public static int Grant(int requested) => Math.Clamp(requested, 1, ProtocolConstants.MaxDeliveryWindow);

    /// <summary>A SUB was answered OK (read in stream order).</summary>
    public void Subscribed(int granted)
    {
        Granted = granted;
        if (_outstanding.Length < granted)
        {
            _outstanding = new ulong[granted];
        }
        _pushed = false;
        StartAfresh();
    }

    /// <summary>An ACK of this queue was answered INTERNAL: the relay starts the subscription again.</summary>
    public void AckFailed()
    {
        if (Granted == 0) return;
        _restartsExpected++;
        StartAfresh();
    }

    /// <summary>True when a push of <paramref name="messageId"/> is the relay starting the subscription again after an ACK answered INTERNAL.</summary>
    public bool StartsAgainAt(ulong messageId) => _restartsExpected > 0 && _pushed && messageId <= _lastPushed;

    /// <summary>The push <see cref="StartsAgainAt"/> recognised: the count starts afresh before it.</summary>
    public void StartedAgain()
    {
        _restartsExpected--;
        StartAfresh();
    }

    /// <summary>Counts a push; the caller checked <see cref="IsFull"/>.</summary>
    public void Push(ulong messageId)
    {
        int tail = _head + _count;
        _outstanding[tail < _outstanding.Length ? tail : tail - _outstanding.Length] = messageId;
        _count++;
        _lastPushed = messageId;
        _pushed = true;
    }

    /// <summary>
    /// As the relay frees places for an ACK: from the oldest while it is not above
    /// <paramref name="messageId"/>, at most <paramref name="most"/>. Returns how many.
    /// </summary>
    public int ReleaseThrough(ulong messageId, int most = int.MaxValue)
    {
        int released = 0;
        while (_count > 0 && released < most && _outstanding[_head] <= messageId)
        {
            _head = _head + 1 == _outstanding.Length ? 0 : _head + 1;
            _count--;
            released++;
        }
        return released;
    }

    private void StartAfresh()
    {
        _head = 0;
        _count = 0;
    }
}
