using Relay.Protocol;

namespace Relay.Client.Transport;

/// <summary>The relay answered a request with ERR.</summary>
public sealed class RelayErrorException(ErrorCode code, string command)
    : Exception($"the relay refused {command}: {Describe(code)}")
{
    public ErrorCode Code { get; } = code;

    public static string Describe(ErrorCode code) => code switch
    {
        ErrorCode.Syntax => "SYNTAX (malformed request)",
        ErrorCode.Version => "VERSION (no common protocol version)",
        ErrorCode.Auth => "AUTH (unknown queue or wrong key)",
        ErrorCode.NoQueue => "NO_QUEUE (the queue no longer exists)",
        ErrorCode.Quota => "QUOTA (the queue is full; retry after the recipient reads it)",
        ErrorCode.TooLarge => "TOO_LARGE (message over the relay's limit)",
        ErrorCode.Limit => "LIMIT (a relay limit was reached)",
        ErrorCode.Internal => "INTERNAL (relay failure; nothing was stored)",
        ErrorCode.NoMsg => "NO_MSG (no such outstanding message)",
        ErrorCode.Cmd => "CMD (unknown command)",
        ErrorCode.Full => "FULL (the relay's storage is full; retry later)",
        ErrorCode.Disabled => "DISABLED (the relay does not accept new queues)",
        _ => $"error 0x{(byte)code:x2}",
    };
}

/// <summary>The connection could not be made or was lost: network, proxy, TLS or fingerprint.</summary>
public class RelayConnectException(string message, Exception? inner = null) : Exception(message, inner);

/// <summary>The relay presented a certificate that does not match the pinned fingerprint.</summary>
public sealed class FingerprintMismatchException(string expected)
    : RelayConnectException($"the relay's identity does not match the fingerprint {expected} in its address; refusing to talk to it")
{
    /// <summary>The fingerprint the relay's address names.</summary>
    public string Expected { get; } = expected;
}
