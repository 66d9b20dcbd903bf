using Relay.Client.EndToEnd;

namespace Relay.Client.Conversations;

/// <summary>
/// A message whose envelope (its padded size, docs/PROTOCOL.md §11.3) is larger than the contact's
/// relay takes: the relay's maximum message size, announced when a connection is made (WELCOME). The
/// relay would refuse it for good (TOO_LARGE), so it is not sent; a shorter text may fit
/// (<see cref="MaxTextBytes"/>).
/// </summary>
public sealed class MessageTooLargeException : ArgumentException
{
    public MessageTooLargeException(string contact, int envelopeSize, int maxMessage, bool sealedAndDropped)
        : base(Describe(contact, envelopeSize, maxMessage, sealedAndDropped))
    {
        Contact = contact;
        EnvelopeSize = envelopeSize;
        MaxMessage = maxMessage;
        Sealed = sealedAndDropped;
    }

    public string Contact { get; }

    /// <summary>The padded size of the message's envelope, in bytes.</summary>
    public int EnvelopeSize { get; }

    /// <summary>The largest message the contact's relay takes, in bytes.</summary>
    public int MaxMessage { get; }

    /// <summary>
    /// False (the usual case): refused before it was sealed, nothing saved, sent or queued. True: the
    /// relay's limit was not known yet when the message was sealed (no connection to that relay had
    /// told it), so it was sealed and queued, then taken out of the outbox when the relay refused it:
    /// the contact sees one message missing when the next one arrives.
    /// </summary>
    public bool Sealed { get; }

    /// <summary>The longest text, in bytes of UTF-8, whose envelope the relay takes (0 when none does).</summary>
    public int MaxTextBytes => MaxTextBytesFor(MaxMessage);

    internal static int MaxTextBytesFor(int maxMessage)
    {
        int largest = 0;
        foreach (var size in E2eCrypto.PaddedSizes)
        {
            if (size <= maxMessage) largest = size;
        }
        // Less the header, the length prefix, the tag and the content type byte.
        return largest == 0 ? 0 : largest - E2eCrypto.MessageHeaderSize - E2eCrypto.LengthPrefixSize - E2eCrypto.TagSize - 1;
    }

    private static string Describe(string contact, int envelopeSize, int maxMessage, bool sealedAndDropped)
    {
        var what = $"message too large for the relay of '{contact}': its envelope is {envelopeSize} bytes and the relay takes at most {maxMessage}";
        var fits = MaxTextBytesFor(maxMessage) is > 0 and var n ? $"; at most {n} bytes of UTF-8 fit" : "; no message of this protocol fits";
        return sealedAndDropped
            ? what + fits + " (it was sealed before the relay's limit was known, and is dropped: the contact sees one message missing)"
            : what + fits + "; nothing was sent";
    }
}
