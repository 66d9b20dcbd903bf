using System.Collections.Concurrent;
using System.Text;
using Relay.Client;
using Relay.Client.Transport;

namespace Relay.Server.Tests;

/// <summary>
/// An app's UI thread (WPF, WinForms, MAUI) has a synchronization context that runs one thing at a
/// time; an app that blocks it on an SDK call (sync over async) must get its answer, which only holds
/// when no await inside the SDK resumes on that context.
/// </summary>
public class UiThreadTests
{
    [Test]
    public async Task Blocking_calls_on_a_thread_with_a_single_threaded_context_complete()
    {
        await using var relay = await TestRelay.StartAsync();
        await using var owner = await relay.ConnectAsync();
        await using var client = new RelayClient(new RelayClientOptions
        {
            ReconnectMin = TimeSpan.FromMilliseconds(50),
            ReconnectMax = TimeSpan.FromMilliseconds(500),
        });
        var done = new TaskCompletionSource<string>(TaskCreationOptions.RunContinuationsAsynchronously);
        var timeout = TimeSpan.FromSeconds(10);
        UiThread.Run(() =>
        {
            try
            {
                string Step(string name, Task task) => task.Wait(timeout) ? "" : $"{name} did not complete; ";
                var created = client.RunAsync(relay.Address, c => c.CreateQueueAsync());
                string failed = Step("CreateQueueAsync", created);
                if (failed.Length > 0)
                {
                    done.TrySetResult(failed);
                    return;
                }
                var queue = created.Result;
                failed += Step("PingAsync", client.RunAsync(relay.Address, c => c.PingAsync()));
                failed += Step("SendAsync", client.RunAsync(relay.Address, c => c.SendAsync(new SenderQueue(queue.SenderId, null), "from the UI thread"u8.ToArray())));
                failed += Step("SubscribeAsync", client.SubscribeAsync(relay.Address, queue));
                var deliveries = client.DeliveriesAsync().GetAsyncEnumerator();
                var next = deliveries.MoveNextAsync().AsTask();
                failed += Step("the next delivery", next);
                if (failed.Length == 0 && Encoding.UTF8.GetString(deliveries.Current.Delivery.Body) != "from the UI thread")
                {
                    failed += "another delivery came; ";
                }
                done.TrySetResult(failed);
            }
            catch (Exception ex)
            {
                done.TrySetException(ex);
            }
        });
        await Assert.That(await done.Task.WaitAsync(TimeSpan.FromSeconds(60))).IsEqualTo("");
    }

    /// <summary>A thread whose synchronization context queues what is posted to it, as a UI thread's does; the queue runs only when the thread is free, and it never is here.</summary>
    private sealed class UiThread : SynchronizationContext
    {
        private readonly BlockingCollection<(SendOrPostCallback, object?)> _posted = new();

        public override void Post(SendOrPostCallback d, object? state) => _posted.Add((d, state));

        public static void Run(Action action)
        {
            var thread = new Thread(() =>
            {
                SetSynchronizationContext(new UiThread());
                action();
            })
            { IsBackground = true };
            thread.Start();
        }
    }
}
