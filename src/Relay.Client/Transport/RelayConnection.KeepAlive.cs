using System.Diagnostics;
using Relay.Protocol;

namespace Relay.Client.Transport;

/// <summary>
/// The keep-alive's PING and the signs of life it waits for. A PING goes out behind whatever was
/// written before it: on a slow link, behind an upload that takes many times the keep-alive's patience
/// (a 1 MiB SEND at 20 KB/s takes 50 s), and its answer cannot come before all of that reached the
/// relay. So the connection counts as dead only when it shows no sign of life for that long: none of
/// the bytes up to the PING's last was taken by the transport (the copy loop's writes complete as the
/// link moves them; see <see cref="TcpConnect"/> for why that is close to the wire), and nothing came
/// from the relay. Once the PING is written, only what comes from the relay counts: its PONG, or any
/// other frame. A link that stops moving is thus found after the patience, whatever is in front of the
/// PING, and one that moves is kept, however long the upload.
/// </summary>
public sealed partial class RelayConnection
{
    private long _flushed;          // bytes flushed to the output pipe, under _writeLock
    private long _pingEnd;          // output position just after the last keep-alive PING
    private long _sent;             // bytes the transport took, copy loop only
    private long _pingProgressAt;   // timestamp: the transport last took bytes up to _pingEnd
    private long _readAt;           // timestamp: bytes last came from the relay

    /// <summary>
    /// Sends a PING and waits for its PONG while the connection shows signs of life (see above);
    /// throws <see cref="RelayConnectException"/> when it shows none for <paramref name="patience"/>,
    /// counted from the PING, or when the answer is no PONG.
    /// </summary>
    internal async Task PingWhileAliveAsync(TimeSpan patience, CancellationToken cancellationToken)
    {
        long queuedAt = Stopwatch.GetTimestamp();
        using var waiting = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        var answer = RequestAsync(this, static (w, corr, c) =>
        {
            FrameWriter.WriteEmpty(w, FrameType.Ping, corr);
            // Under the write lock, as every write and flush of the output pipe.
            Volatile.Write(ref c._pingEnd, c._flushed + c._output.Writer.UnflushedBytes);
        }, waiting.Token).AsTask();
        while (!answer.IsCompleted)
        {
            long lastSign = Math.Max(queuedAt, Math.Max(Volatile.Read(ref _pingProgressAt), Volatile.Read(ref _readAt)));
            var quiet = Stopwatch.GetElapsedTime(lastSign);
            if (quiet >= patience)
            {
                // Given up: its answer, should it come, is dropped.
                await waiting.CancelAsync().ConfigureAwait(false);
                try
                {
                    await answer.ConfigureAwait(false);
                }
                catch (Exception)
                {
                    // Cancelled, or failed with the connection.
                }
                throw new RelayConnectException($"the relay did not answer a PING, and nothing moved on the connection, for {patience.TotalSeconds:0.###} s");
            }
            await Task.WhenAny(answer, Task.Delay(patience - quiet, waiting.Token)).ConfigureAwait(false);
        }
        // The last delay's timer goes.
        await waiting.CancelAsync().ConfigureAwait(false);
        Expect(await answer.ConfigureAwait(false), FrameType.Pong, "PING");
    }

    /// <summary>The copy loop's write of <paramref name="count"/> bytes completed: the transport took them.</summary>
    private void OnWritten(int count)
    {
        long before = _sent;
        _sent = before + count;
        if (before < Volatile.Read(ref _pingEnd))
        {
            Volatile.Write(ref _pingProgressAt, Stopwatch.GetTimestamp());
        }
    }

    /// <summary>The read loop got bytes from the relay.</summary>
    private void OnRead() => Volatile.Write(ref _readAt, Stopwatch.GetTimestamp());
}
