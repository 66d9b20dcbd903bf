using Microsoft.Extensions.Logging;

namespace Relay.Server;

/// <summary>
/// At most one log line per key (a command name) and <see cref="Interval"/>; counts the ones left
/// out, for the next line. For errors that a failing disk repeats for every request: the first is
/// logged at once, the rest as a count, so that the log stays readable and small while metrics
/// count every one.
/// </summary>
internal sealed class LogThrottle(TimeProvider clock)
{
    public static readonly TimeSpan Interval = TimeSpan.FromSeconds(10);

    private readonly Dictionary<string, (long At, long Left)> _keys = new(StringComparer.Ordinal);

    /// <summary>
    /// Writes the line for <paramref name="key"/> when one may be written now: <paramref name="first"/>
    /// when none was left out since the last one, else <paramref name="again"/> with how many were.
    /// (Pass static methods or lambdas: their delegates are cached, so a refusal costs no allocation.)
    /// </summary>
    public void Write<T>(string key, ILogger logger, T state, Action<ILogger, T> first, Action<ILogger, T, long> again)
    {
        if (!TryLog(key, out long left))
        {
            return;
        }
        if (left == 0)
        {
            first(logger, state);
        }
        else
        {
            again(logger, state, left);
        }
    }

    /// <summary>True when a line for <paramref name="key"/> may be written now; <paramref name="left"/>: the lines left out since the last one.</summary>
    private bool TryLog(string key, out long left)
    {
        long now = clock.GetTimestamp();
        lock (_keys)
        {
            if (_keys.TryGetValue(key, out var state) && clock.GetElapsedTime(state.At, now) < Interval)
            {
                _keys[key] = (state.At, state.Left + 1);
                left = 0;
                return false;
            }
            left = state.Left;
            _keys[key] = (now, 0);
            return true;
        }
    }
}
