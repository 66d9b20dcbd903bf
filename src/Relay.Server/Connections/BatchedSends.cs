namespace Relay.Server.Connections;

/// <summary>
/// The sends that a group commit's answers call for, made once the whole batch is answered, on the
/// thread that answered it: the store's writer, for the small batches it answers itself
/// (<see cref="Relay.Storage.QueueStore.CompletionScope"/>). A batch answers SENDs and ACKs and
/// pushes their messages to subscribers: each connection written to gets one send of everything
/// written to it, with no thread-pool work item (and no thread woken) for it, so at a low rate a
/// message goes from the disk's flush to the subscriber's socket without changing threads. Batches
/// answered on the thread pool (large ones) still hand each connection's send to a work item of its
/// own, so that those sends run in parallel.
/// </summary>
internal static class BatchedSends
{
    [ThreadStatic] private static List<RelaySession>? t_sessions;
    [ThreadStatic] private static bool t_active;

    /// <summary>True on a thread answering a batch (the store's writer): nothing there may wait for the disk.</summary>
    public static bool Active => t_active;

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
            try
            {
                // Each send loop was claimed (its session's _sending set) by TryAdd: it must run, or the
                // connection's output would stop for good. Still in the scope: what a send resumes (held-back
                // deliveries) neither reads the disk here nor leaves another session's send behind (it is
                // added to the list and sent in this loop).
                for (int i = 0; i < sessions.Count; i++)
                {
                    sessions[i].SendNow();
                }
            }
            finally
            {
                sessions.Clear();
                t_active = false;
            }
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
