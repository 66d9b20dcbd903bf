using Microsoft.Extensions.Logging;
using Relay.Protocol;
using Relay.Storage;

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

    [LoggerMessage(8, LogLevel.Warning, "The relay identity {Path} is accessible by other users (mode {Mode}): whoever can read it can pose as this relay; run 'chmod 600 {Path}', and if others may have copied it, make a new identity (a new relay address)")]
    public static partial void IdentityExposed(ILogger logger, string path, string mode);

    [LoggerMessage(3, LogLevel.Information, "Stopping: finishing requests in flight")]
    public static partial void Stopping(ILogger logger);

    [LoggerMessage(4, LogLevel.Information, "Stopped")]
    public static partial void Stopped(ILogger logger);

    [LoggerMessage(5, LogLevel.Information, "Queue store open ({Mode})")]
    public static partial void StoreOpened(ILogger logger, string mode);

    [LoggerMessage(7, LogLevel.Error, "Building the TLS context from the relay identity failed: {Error}; the relay cannot serve TLS and stops")]
    public static partial void TlsSetupFailed(ILogger logger, string error);

    [LoggerMessage(39, LogLevel.Information, "TLS certificate renewed, valid until {NotAfter:u}")]
    public static partial void TlsRenewed(ILogger logger, DateTimeOffset notAfter);

    [LoggerMessage(40, LogLevel.Error, "Renewing the TLS certificate failed: {Error}; the current one, valid until {NotAfter:u}, stays and the renewal is tried again in an hour")]
    public static partial void TlsRenewalFailed(ILogger logger, string error, DateTimeOffset notAfter);

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
    private static partial void ConnectionRejected(ILogger logger, string reason);

    [LoggerMessage(15, LogLevel.Warning, "Connection refused: {Reason} ({Left} more refusals for it since the last such line, not logged)")]
    private static partial void ConnectionRejectedAgain(ILogger logger, string reason, long left);

    /// <summary>Event 15, at most one line per reason every 10 s (a flood of connections must not flood the log; the metric counts each).</summary>
    public static void ConnectionRejected(RelayServerContext context, string reason) =>
        context.ConnectionRefusalLog.Write(reason, context.Logger, reason, ConnectionRejected, ConnectionRejectedAgain);

    [LoggerMessage(41, LogLevel.Warning, "A source made more key agreements than --key-agreement-burst and --key-agreement-rate allow: its connections wait before they are read (behind a proxy without the PROXY protocol, every client is one source)")]
    private static partial void KeyAgreementWait(ILogger logger);

    [LoggerMessage(41, LogLevel.Warning, "A source made more key agreements than --key-agreement-burst and --key-agreement-rate allow: its connections wait before they are read (behind a proxy without the PROXY protocol, every client is one source; {Left} more waits since the last such line, not logged)")]
    private static partial void KeyAgreementWaitAgain(ILogger logger, long left);

    /// <summary>Event 41, at most one line every 10 s (the metrics count each wait and its time).</summary>
    public static void KeyAgreementWait(RelayServerContext context) =>
        context.KeyAgreementLog.Write("key-agreement", context.Logger, 0,
            static (logger, _) => KeyAgreementWait(logger), static (logger, _, left) => KeyAgreementWaitAgain(logger, left));

    [LoggerMessage(16, LogLevel.Warning, "Accepting a connection failed: {Reason}")]
    private static partial void AcceptFailed(ILogger logger, string reason);

    [LoggerMessage(16, LogLevel.Warning, "Accepting a connection failed: {Reason} ({Left} more failures since the last such line, not logged)")]
    private static partial void AcceptFailedAgain(ILogger logger, string reason, long left);

    /// <summary>Event 16, at most one line per socket error every 10 s (out of descriptors, the accept loop retries every 50 ms).</summary>
    public static void AcceptFailed(LogThrottle throttle, ILogger logger, string reason) =>
        throttle.Write(reason, logger, reason, AcceptFailed, AcceptFailedAgain);

    [LoggerMessage(35, LogLevel.Information, "Backup made in {Path}: {Files} files, {Bytes} bytes, {Seconds:0.000} s")]
    public static partial void BackupMade(ILogger logger, string path, int files, long bytes, double seconds);

    [LoggerMessage(36, LogLevel.Error, "Backup failed: {Reason}; nothing of it was left")]
    public static partial void BackupFailed(ILogger logger, string reason);

    [LoggerMessage(37, LogLevel.Information, "Backup removed (--backup-keep {Keep}): {Path}")]
    public static partial void BackupRemoved(ILogger logger, string path, int keep);

    [LoggerMessage(38, LogLevel.Warning, "Removing an old backup failed: {Path}: {Reason}; it is left as it is")]
    public static partial void BackupNotRemoved(ILogger logger, string path, string reason);

    [LoggerMessage(34, LogLevel.Warning, "The open files limit ({Soft}, hard limit {Hard}) leaves room for {Allowed} relay connections, fewer than --max-connections {Requested}: more are closed at once. Raise the limit to {Needed} (ulimit -n, systemd LimitNOFILE, docker run --ulimit nofile)")]
    public static partial void OpenFilesLimit(ILogger logger, long soft, long hard, int allowed, int requested, long needed);

    [LoggerMessage(17, LogLevel.Error, "Answering a {Command} once its store write was done failed unexpectedly: {Error}; the request may stay unanswered")]
    public static partial void CompletionFailed(ILogger logger, string command, string error);

    [LoggerMessage(20, LogLevel.Error, "Store operation {Command} failed: {Error}")]
    private static partial void StoreFailed(ILogger logger, string command, string error);

    [LoggerMessage(20, LogLevel.Error, "Store operation {Command} failed: {Error} ({Left} more failures of {Command} since the last such line, not logged)")]
    private static partial void StoreFailedAgain(ILogger logger, string command, string error, long left);

    /// <summary>Event 20, at most once per command every <see cref="LogThrottle.Interval"/> (a failing disk fails every request).</summary>
    public static void StoreFailed(RelayServerContext context, string command, Exception ex) =>
        context.StoreFailureLog.Write(command, context.Logger, (Command: command, Error: ex),
            static (logger, s) => StoreFailed(logger, s.Command, Reason(s.Error)),
            static (logger, s, left) => StoreFailedAgain(logger, s.Command, Reason(s.Error), left));

    [LoggerMessage(28, LogLevel.Error, "The store's disk is full (no space left on device): NEW and SEND answer FULL and other writes fail until space is free again; every acknowledged message is kept")]
    public static partial void DiskFull(ILogger logger);

    [LoggerMessage(33, LogLevel.Critical, "The store has failed every write for {Seconds} s, and not for a full disk ({Error}): the relay stops with exit code 1 so that its service manager starts it again; the store recovers from its log on open, and every acknowledged message is on disk (--store-failure-timeout)")]
    public static partial void StoreFailedForGood(ILogger logger, int seconds, string error);

    [LoggerMessage(29, LogLevel.Information, "The store writes again: the disk has space")]
    public static partial void DiskNotFull(ILogger logger);

    /// <summary>
    /// What to log of a store failure: the store's own message (RocksDB's status text: an error kind
    /// and a file name of the data directory, never a key or value, which RocksDB leaves out of its
    /// errors unless allow_data_in_errors is set), else the exception's type name.
    /// </summary>
    public static string Reason(Exception ex) => ex switch
    {
        // A write refused because an earlier one failed: name that failure too (it may be the only
        // line a throttled command logs).
        StoreException { InnerException: StoreException cause } => $"{ex.Message} ({cause.Message})",
        StoreException => ex.Message,
        _ => ex.GetType().Name,
    };

    [LoggerMessage(21, LogLevel.Information, "Expiry sweep removed {Count} messages and {Queues} idle queues")]
    public static partial void Swept(ILogger logger, long count, long queues);

    /// <summary>A sweep failed; what it removed before (made durable, not undone) is counted.</summary>
    [LoggerMessage(22, LogLevel.Error, "Expiry sweep failed after it removed {Count} messages and {Queues} idle queues: {Error}")]
    public static partial void SweepFailed(ILogger logger, long count, long queues, string error);

    [LoggerMessage(23, LogLevel.Warning, "Store is over its disk budget ({DiskBytes} of {BudgetBytes} bytes): NEW and SEND answer FULL")]
    public static partial void StoreFull(ILogger logger, long diskBytes, long budgetBytes);

    [LoggerMessage(24, LogLevel.Information, "Store is below its disk budget again ({DiskBytes} of {BudgetBytes} bytes)")]
    public static partial void StoreNotFull(ILogger logger, long diskBytes, long budgetBytes);

    [LoggerMessage(25, LogLevel.Information, "Reclaimed space by flush and compaction: {DiskBytes} bytes on disk")]
    public static partial void Reclaimed(ILogger logger, long diskBytes);

    [LoggerMessage(26, LogLevel.Error, "Maintenance failed: {Error}")]
    public static partial void MaintenanceFailed(ILogger logger, string error);

    [LoggerMessage(27, LogLevel.Debug, "Evicted {Count} idle queue handles from memory")]
    public static partial void Evicted(ILogger logger, int count);

    [LoggerMessage(30, LogLevel.Warning, "Admin API: new queue creation {State}")]
    public static partial void QueueCreationSwitched(ILogger logger, string state);

    [LoggerMessage(31, LogLevel.Debug, "Admin API: request refused without a valid token")]
    public static partial void AdminUnauthorized(ILogger logger);

    [LoggerMessage(6, LogLevel.Warning, "Shutdown timeout reached: aborting the connections still open")]
    public static partial void ShutdownTimedOut(ILogger logger);

    [LoggerMessage(32, LogLevel.Warning, "TLS record buffers cannot be released while connections are idle on this runtime: each idle TLS connection keeps its OpenSSL record buffers")]
    public static partial void TlsBuffersKept(ILogger logger);
}
