using System.Diagnostics.CodeAnalysis;

namespace Relay.Protocol;

/// <summary>
/// A protocol violation that ends the connection. Carries the wire error code the peer is told
/// before the connection closes. Request-level failures are values (ERR frames), not this.
/// </summary>
public sealed class ProtocolException(ErrorCode code, string message) : Exception(message)
{
    public ErrorCode Code { get; } = code;

    [DoesNotReturn]
    public static void Throw(ErrorCode code, string message) => throw new ProtocolException(code, message);

    [DoesNotReturn]
    public static void ThrowFrameTooLarge(long length, int max) =>
        throw new ProtocolException(ErrorCode.TooLarge, $"frame length {length} exceeds the limit of {max} bytes");

    [DoesNotReturn]
    public static void ThrowFrameTooShort(long length) =>
        throw new ProtocolException(ErrorCode.Syntax, $"frame length {length} is shorter than the 5-byte header");
}
