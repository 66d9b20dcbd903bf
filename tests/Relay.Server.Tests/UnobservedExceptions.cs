using System.Collections.Concurrent;

namespace Relay.Server.Tests;

/// <summary>
/// The unobserved task exceptions (a faulted task nobody awaited, reported when it is collected)
/// that match <c>match</c>, from its creation to its disposal. Tests run in parallel and the event
/// is process-wide: the filter keeps only the exception the test is about.
/// </summary>
public sealed class UnobservedExceptions : IDisposable
{
    private readonly Func<Exception, bool> _match;
    private readonly ConcurrentQueue<Exception> _seen = new();

    public UnobservedExceptions(Func<Exception, bool> match)
    {
        _match = match;
        TaskScheduler.UnobservedTaskException += OnUnobserved;
    }

    private void OnUnobserved(object? sender, UnobservedTaskExceptionEventArgs e)
    {
        foreach (var ex in e.Exception.Flatten().InnerExceptions)
        {
            if (_match(ex))
            {
                _seen.Enqueue(ex);
            }
        }
    }

    /// <summary>
    /// Collects garbage until a matching exception shows up or <paramref name="seconds"/> pass: what
    /// held the abandoned task (a thread pool thread, a closing socket) may let go of it only later.
    /// </summary>
    public async Task<Exception[]> CollectAsync(double seconds = 3)
    {
        var end = DateTime.UtcNow.AddSeconds(seconds);
        do
        {
            GC.Collect();
            GC.WaitForPendingFinalizers();
            GC.Collect();
            if (!_seen.IsEmpty)
            {
                break;
            }
            await Task.Delay(100);
        }
        while (DateTime.UtcNow < end);
        return [.. _seen];
    }

    public void Dispose() => TaskScheduler.UnobservedTaskException -= OnUnobserved;
}
