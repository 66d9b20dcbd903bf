using System.Text;
using Relay.Client.Transport;

namespace Relay.Server.Tests;

/// <summary>
/// Requests in flight on one <see cref="RelayConnection"/>, whose request objects are reused: a wait
/// that is cancelled ends with the cancellation and its late answer goes to no other request, a
/// connection that fails fails every request in flight with its failure, and a request whose token
/// is already cancelled is not sent.
/// </summary>
public class RequestsInFlightTests
{
    private static string Text(Delivery? d) => d is null ? "(empty)" : Encoding.UTF8.GetString(d.Body);

    [Test]
    public async Task A_request_cancelled_while_waiting_throws_the_cancellation_and_its_late_answer_answers_no_other_request()
    {
        await using var held = await HeldConnection.StartAsync();
        var (transport, connection) = (held.Transport, held.Connection);
        var full = await connection.CreateQueueAsync();
        var empty = await connection.CreateQueueAsync();
        await connection.SendAsync(new SenderQueue(full.SenderId, null), "stored"u8.ToArray());

        // The relay's answers wait in the transport: the GET's answer cannot come before the cancellation.
        transport.Hold();
        using var cts = new CancellationTokenSource();
        var cancelled = connection.GetAsync(full, cts.Token);
        cts.Cancel();
        var thrown = await Assert.That(() => cancelled).ThrowsExactly<TaskCanceledException>();
        await Assert.That(thrown!.CancellationToken).IsEqualTo(cts.Token);

        // The next request takes the place of the cancelled one; the cancelled GET's answer (the
        // stored message) arrives first and is dropped, and the next GET gets its own (the queue is empty).
        var next = connection.GetAsync(empty);
        transport.Release();
        await Assert.That(Text(await next.WaitAsync(TimeSpan.FromSeconds(10)))).IsEqualTo("(empty)");
        await Assert.That(Text(await connection.GetAsync(full))).IsEqualTo("stored");
        await connection.PingAsync();
    }

    [Test]
    public async Task Cancelling_the_token_of_an_answered_request_touches_no_later_request()
    {
        await using var held = await HeldConnection.StartAsync();
        var (transport, connection) = (held.Transport, held.Connection);
        var queue = await connection.CreateQueueAsync();
        await connection.SendAsync(new SenderQueue(queue.SenderId, null), "stored"u8.ToArray());

        using var answered = new CancellationTokenSource();
        await connection.PingAsync(answered.Token);
        // The next request takes the answered one's place and waits; then the answered one's token is cancelled.
        transport.Hold();
        var next = connection.GetAsync(queue);
        answered.Cancel();
        transport.Release();
        await Assert.That(Text(await next.WaitAsync(TimeSpan.FromSeconds(10)))).IsEqualTo("stored");
    }

    [Test]
    [Arguments(false)]
    [Arguments(true)]
    public async Task Cancellations_racing_their_answers_leave_every_other_request_its_own_answer(bool tls)
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = tls);
        await using var connection = await relay.ConnectAsync();
        const int Queues = 8;
        var queues = new RecipientQueue[Queues];
        for (int q = 0; q < Queues; q++)
        {
            queues[q] = await connection.CreateQueueAsync();
            await connection.SendAsync(new SenderQueue(queues[q].SenderId, null), Encoding.UTF8.GetBytes($"q{q}"));
        }

        // Batches of GETs (each queue answers with its own message) and PINGs in flight together; every
        // other one is cancelled right after it is sent, racing its answer. Each request ends either
        // cancelled (only those that were) or with its own answer: a mix-up shows as a wrong message,
        // a GET that cannot open a PING's answer or a PING answered with a message.
        int cancelledCount = 0, answered = 0;
        for (int round = 0; round < 40; round++)
        {
            var requests = new List<(Task<string> Request, string Expected, CancellationTokenSource? Cancel)>();
            for (int i = 0; i < 64; i++)
            {
                var cancel = i % 2 == 0 ? new CancellationTokenSource() : null;
                var token = cancel?.Token ?? default;
                int q = (round + i) % Queues;
                requests.Add(i % 5 == 4
                    ? (PingAsync(connection, token), "pong", cancel)
                    : (GetTextAsync(connection, queues[q], token), $"q{q}", cancel));
                cancel?.Cancel();
            }
            foreach (var (request, expected, cancel) in requests)
            {
                try
                {
                    await Assert.That(await request.WaitAsync(TimeSpan.FromSeconds(10))).IsEqualTo(expected);
                    answered++;
                }
                catch (TaskCanceledException ex) when (cancel is not null && ex.CancellationToken == cancel.Token)
                {
                    cancelledCount++;
                }
                cancel?.Dispose();
            }
        }
        await Assert.That(cancelledCount + answered).IsEqualTo(40 * 64);
        await Assert.That(answered).IsGreaterThanOrEqualTo(40 * 32);

        for (int q = 0; q < Queues; q++)
        {
            await Assert.That(await GetTextAsync(connection, queues[q], default)).IsEqualTo($"q{q}");
        }
    }

    private static async Task<string> GetTextAsync(RelayConnection connection, RecipientQueue queue, CancellationToken cancellationToken) =>
        Text(await connection.GetAsync(queue, cancellationToken));

    private static async Task<string> PingAsync(RelayConnection connection, CancellationToken cancellationToken)
    {
        await connection.PingAsync(cancellationToken);
        return "pong";
    }

    [Test]
    public async Task Requests_in_flight_when_the_connection_fails_all_fail_with_the_connections_failure()
    {
        await using var held = await HeldConnection.StartAsync();
        var (transport, connection) = (held.Transport, held.Connection);
        var queue = await connection.CreateQueueAsync();
        var sender = new SenderQueue(queue.SenderId, null);
        await connection.SendAsync(sender, "stored"u8.ToArray());

        transport.Hold();
        using var notCancelled = new CancellationTokenSource();
        Task[] inFlight =
        [
            connection.PingAsync(),
            connection.GetAsync(queue),
            connection.SendAsync(sender, "second"u8.ToArray(), 0, notCancelled.Token),
            connection.PingAsync(notCancelled.Token),
        ];
        transport.Break();

        foreach (var request in inFlight)
        {
            var failure = await Assert.That(() => request.WaitAsync(TimeSpan.FromSeconds(10))).Throws<RelayConnectException>();
            await Assert.That(failure).IsSameReferenceAs(connection.Failure);
        }
        await Assert.That(connection.Closed.IsCancellationRequested).IsTrue();
        await Assert.That(connection.Failure!.InnerException).IsTypeOf<IOException>();

        // Cancelling a token of a failed request changes nothing; a new request fails the same way.
        notCancelled.Cancel();
        var later = await Assert.That(() => connection.PingAsync()).Throws<RelayConnectException>();
        await Assert.That(later).IsSameReferenceAs(connection.Failure);
    }

    [Test]
    public async Task A_request_whose_token_is_already_cancelled_is_not_sent_and_throws_the_cancellation()
    {
        await using var relay = await TestRelay.StartAsync(o => o.Tls = false);
        await using var connection = await relay.ConnectAsync();
        var queue = await connection.CreateQueueAsync();
        using var cts = new CancellationTokenSource();
        cts.Cancel();

        var thrown = await Assert.That(() => connection.SendAsync(new SenderQueue(queue.SenderId, null), "never sent"u8.ToArray(), 0, cts.Token))
            .ThrowsExactly<TaskCanceledException>();
        await Assert.That(thrown!.CancellationToken).IsEqualTo(cts.Token);
        await Assert.That(() => connection.PingAsync(cts.Token)).ThrowsExactly<TaskCanceledException>();

        // The relay never got the SEND, and the connection goes on.
        await Assert.That(await connection.GetAsync(queue)).IsNull();
        await Assert.That(relay.Server.Store.Statistics.MessagesAppended).IsEqualTo(0);
        await connection.PingAsync();
    }

    /// <summary>A relay without TLS and one connection to it through a <see cref="HoldingStream"/>.</summary>
    private sealed class HeldConnection : IAsyncDisposable
    {
        public required TestRelay Relay { get; init; }
        public required HoldingStream Transport { get; init; }
        public required RelayConnection Connection { get; init; }

        public static async Task<HeldConnection> StartAsync()
        {
            var relay = await TestRelay.StartAsync(o => o.Tls = false);
            var transport = new HoldingStream(relay.Server.ConnectInProcess());
            var connection = await RelayConnection.ConnectAsync(relay.Address, transport, new RelayConnectionOptions { Tls = false });
            return new HeldConnection { Relay = relay, Transport = transport, Connection = connection };
        }

        public async ValueTask DisposeAsync()
        {
            await Connection.DisposeAsync();
            await Relay.DisposeAsync();
        }
    }

    /// <summary>
    /// An in-process transport whose incoming bytes can be held back (the relay's answers wait here
    /// until released) or broken (the read under way throws, as a lost connection).
    /// </summary>
    private sealed class HoldingStream(Stream inner) : PassThroughStream(inner)
    {
        public const string Broken = "the transport broke";
        private readonly Lock _lock = new();
        private readonly TaskCompletionSource _broken = new(TaskCreationOptions.RunContinuationsAsynchronously);
        private TaskCompletionSource _open = Opened();

        private static TaskCompletionSource Opened()
        {
            var open = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            open.SetResult();
            return open;
        }

        /// <summary>From now on what the relay sends waits, including what a read under way receives.</summary>
        public void Hold()
        {
            lock (_lock)
            {
                if (_open.Task.IsCompleted) _open = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            }
        }

        public void Release()
        {
            lock (_lock) _open.TrySetResult();
        }

        public void Break() => _broken.TrySetResult();

        public override async ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default)
        {
            var read = Inner.ReadAsync(buffer, cancellationToken).AsTask();
            // A read given up when the transport breaks still ends (when the stream is closed): observed.
            _ = read.ContinueWith(static t => _ = t.Exception, TaskContinuationOptions.OnlyOnFaulted);
            await Task.WhenAny(read, _broken.Task);
            ThrowIfBroken();
            int n = await read;
            Task open;
            lock (_lock) open = _open.Task;
            await Task.WhenAny(open, _broken.Task).WaitAsync(cancellationToken);
            ThrowIfBroken();
            return n;
        }

        private void ThrowIfBroken()
        {
            if (_broken.Task.IsCompleted) throw new IOException(Broken);
        }
    }
}
