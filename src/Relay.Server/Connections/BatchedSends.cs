namespace Relay.Server.Connections;

/// <summary>
/// The sends that a group commit's answers call for, made once the whole batch is answered, by the
/// thread that answered it (<see cref="Relay.Storage.QueueStore.CompletionScope"/>). A batch answers
/// SENDs and ACKs of many connections and pushes their messages to subscribers: each connection
/// written to gets one send of everything written to it, with no thread-pool work item (and often no
/// thread woken) per connection. At a low rate the writer thread answers small batches itself, so a
/// message then goes from the disk's flush to the subscriber's socket without changing threads.
/// </summary>
internal static class BatchedSends
{
    [ThreadStatic] private static List<RelaySession>? t_sessions;
    [ThreadStatic] private static bool t_active;

    /// <summary>Runs <paramref name="complete"/> (a batch's completions), then the send loops they scheduled.</summary>
    public static void Run(Action complete)
    {
        if (t_active)
        {
            // Nested (a completion completing another batch): the outer scope sends.
            complete();
            return;
        }
        List<RelaySession> sessions = t_sessions ??= [];
        t_active = true;
        try
        {
            complete();
        }
        finally
        {
            t_active = false;
            // Each send loop was claimed (its session's _sending set) by TryAdd: it must run, or the
            // connection's output would stop for good.
            for (int i = 0; i < sessions.Count; i++)
            {
                sessions[i].SendNow();
            }
            sessions.Clear();
        }
    }

    /// <summary>Called under the session's write lock after it claimed its send loop: true when the loop runs after the batch.</summary>
    public static bool TryAdd(RelaySession session)
    {
        if (!t_active)
        {
            return false;
        }
        t_sessions!.Add(session);
        return true;
    }
}
