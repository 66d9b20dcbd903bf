namespace Relay.Protocol;

/// <summary>Numbers fixed by docs/PROTOCOL.md.</summary>
public static class ProtocolConstants
{
    public const ushort MinVersion = 1;
    public const ushort MaxVersion = 1;

    /// <summary>ALPN protocol id negotiated in TLS.</summary>
    public static ReadOnlySpan<byte> Alpn => "relay/1"u8;
    public const string AlpnString = "relay/1";

    /// <summary>Length prefix (u32).</summary>
    public const int LengthPrefixSize = 4;
    /// <summary>Type (u8) + correlation id (u32).</summary>
    public const int HeaderSize = 5;

    /// <summary>Largest frame length accepted before the handshake: a HELLO is 9 bytes.</summary>
    public const int HandshakeMaxFrame = 1024;
    /// <summary>Default largest frame length: one padded message plus headers, bounding per-connection buffering.</summary>
    public const int DefaultMaxFrame = 65_536;
    /// <summary>Default largest SEND body: DefaultMaxFrame minus SEND's header bytes, rounded down.</summary>
    public const int DefaultMaxMessage = 65_000;

    public const int IdSize = 24;
    public const int KeySize = 32;
    public const int MacSize = 16;
    public const int SessionIdSize = 32;
    public const int NonceSize = 12;
    public const int TagSize = 16;

    /// <summary>Bytes of a SEND frame besides the body: type, corr, sender id, flags, mac.</summary>
    public const int SendOverhead = HeaderSize + IdSize + 1 + MacSize;

    /// <summary>Largest delivery window a SUB can ask for (PROTOCOL.md §6 SUB); larger requests get this.</summary>
    public const int MaxDeliveryWindow = 64;

    /// <summary>ACK flags bit 0 (PROTOCOL.md §6 ACK): every outstanding message up to and including the id.</summary>
    public const byte AckThrough = 0x01;

    /// <summary>Plaintext header inside a sealed delivery: u32 hour, u8 flags.</summary>
    public const int DeliveryHeaderSize = 5;

    /// <summary>MSG payload bytes besides the sealed body: recipient id, msg id, nonce, delivery header, tag.</summary>
    public const int MsgOverhead = IdSize + 8 + NonceSize + DeliveryHeaderSize + TagSize;

    /// <summary>
    /// Largest SEND body a relay can take with a frame limit of <paramref name="maxFrame"/>: its
    /// delivery (MSG: header, recipient id, msg id, nonce, delivery header, tag) must fit one frame.
    /// </summary>
    public static int LargestMessage(int maxFrame) => maxFrame - HeaderSize - MsgOverhead;
}

/// <summary>Frame types (docs/PROTOCOL.md §4, §6, §8).</summary>
public enum FrameType : byte
{
    Hello = 0x01,
    Welcome = 0x02,
    Ping = 0x03,
    New = 0x10,
    SKey = 0x11,
    Send = 0x12,
    Sub = 0x13,
    Ack = 0x14,
    Get = 0x15,
    Off = 0x16,
    Del = 0x17,
    Err = 0x80,
    Ok = 0x81,
    Pong = 0x83,
    Ids = 0x90,
    Msg = 0x92,
    Empty = 0x93,
    End = 0x94,
}

/// <summary>Error codes carried by ERR frames (docs/PROTOCOL.md §9).</summary>
public enum ErrorCode : byte
{
    Syntax = 0x01,
    Version = 0x02,
    Auth = 0x03,
    NoQueue = 0x04,
    Quota = 0x05,
    TooLarge = 0x06,
    Limit = 0x07,
    Internal = 0x08,
    NoMsg = 0x09,
    Cmd = 0x0A,
    Full = 0x0B,
    Disabled = 0x0C,
}
