using Microsoft.Extensions.Logging;
using Relay.Protocol;

namespace Relay.Server;

/// <summary>
/// Every log line of the relay, with stable event ids. No line carries an address, queue id, key
/// or message byte: arguments are counts, reasons, error names and exception type names only.
/// </summary>
internal static partial class Log
{
    [LoggerMessage(1, LogLevel.Information, "Relay ready at {Address}")]
    public static partial void Ready(ILogger logger, string address);

    [LoggerMessage(2, LogLevel.Information, "Created relay identity in the data directory")]
    public static partial void IdentityCreated(ILogger logger);

    [LoggerMessage(3, LogLevel.Information, "Stopping: finishing requests in flight")]
    public static partial void Stopping(ILogger logger);

    [LoggerMessage(4, LogLevel.Information, "Stopped")]
    public static partial void Stopped(ILogger logger);

    [LoggerMessage(5, LogLevel.Information, "Queue store open ({Mode})")]
    public static partial void StoreOpened(ILogger logger, string mode);

    [LoggerMessage(10, LogLevel.Debug, "TLS handshake failed: {Reason}")]
    public static partial void TlsFailed(ILogger logger, string reason);

    [LoggerMessage(11, LogLevel.Debug, "Handshake timed out")]
    public static partial void HandshakeTimeout(ILogger logger);

    [LoggerMessage(12, LogLevel.Debug, "Connection closed for a protocol violation {Code}: {Reason}")]
    public static partial void ProtocolViolation(ILogger logger, ErrorCode code, string reason);

    [LoggerMessage(13, LogLevel.Debug, "Idle connection closed")]
    public static partial void IdleClosed(ILogger logger);

    [LoggerMessage(14, LogLevel.Debug, "Connection failed: {Reason}")]
    public static partial void ConnectionFailed(ILogger logger, string reason);

    [LoggerMessage(15, LogLevel.Warning, "Connection refused: {Reason}")]
    public static partial void ConnectionRejected(ILogger logger, string reason);

    [LoggerMessage(20, LogLevel.Error, "Store operation {Command} failed: {Error}")]
    public static partial void StoreFailed(ILogger logger, string command, string error);

    [LoggerMessage(21, LogLevel.Information, "Expiry sweep removed {Count} messages")]
    public static partial void Swept(ILogger logger, int count);

    [LoggerMessage(22, LogLevel.Error, "Expiry sweep failed: {Error}")]
    public static partial void SweepFailed(ILogger logger, string error);
}
