namespace Relay.Storage;

// What the writer thread does for each operation after its batch was written (OnCommitted) or
// failed (OnFailed). A failure undoes the operation's in-memory effects so the handle again
// describes what is on disk, and the caller gets the StoreException.
public sealed partial class QueueStore
{
    private void OnCommitted(WriteOp op)
    {
        QueueHandle? queue = op.Queue;
        switch (op.Kind)
        {
            case OpKind.Create:
                Interlocked.Increment(ref _statistics._queuesCreated);
                lock (_createLock)
                {
                    _pendingSenders.Remove(new QueueKey(queue!.SenderId));
                }
                break;
            case OpKind.Append:
                Interlocked.Increment(ref _statistics._messagesAppended);
                // Before the caller hears of it: from now on a delivery may hand this message out.
                // Only this thread writes it, and batches commit in id order.
                if (op.MessageId >= queue!.DurableNextId)
                {
                    Volatile.Write(ref queue.DurableNextId, op.MessageId + 1);
                }
                break;
            case OpKind.Ack:
                Interlocked.Add(ref _statistics._messagesDeleted, op.Count);
                break;
            case OpKind.Expire:
                Interlocked.Add(ref _statistics._messagesExpired, op.Count);
                break;
            case OpKind.Delete:
                Interlocked.Increment(ref _statistics._queuesDeleted);
                if (op.Idle)
                {
                    Interlocked.Increment(ref _statistics._idleQueuesDeleted);
                }
                lock (queue!.StoreLock)
                {
                    queue.Deletion = QueueDeletion.Done;
                }
                // Only now: until the deletion is durable the handle (marked Deleted) keeps Find
                // from loading the old record again.
                Interlocked.Increment(ref _handleRemovals);   // before the removal: see Load
                _queues.TryRemove(new KeyValuePair<QueueKey, QueueHandle>(new QueueKey(queue.RecipientId), queue));
                _senders.TryRemove(new QueueKey(queue.SenderId), out _);
                break;
        }
        if (queue is not null)
        {
            Interlocked.Decrement(ref queue.PendingOps);
        }
        op.Succeed(new AppendResult(StoreStatus.Ok, op.MessageId, op.Hour));
    }

    private void OnFailed(WriteOp op, Exception error)
    {
        QueueHandle? queue = op.Queue;
        if (queue is not null)
        {
            lock (queue.StoreLock)
            {
                Undo(op, queue);
            }
            Interlocked.Decrement(ref queue.PendingOps);
        }
        QueueHandle? putBack = op.Kind is OpKind.Ack or OpKind.Expire ? queue : null;   // read before the op goes back to its pool
        op.Fail(error);
        if (putBack is not null)
        {
            MessagesPutBack?.Invoke(putBack);
        }
    }

    private void Undo(WriteOp op, QueueHandle queue)
    {
        if (op.PreviousActiveHour != 0 && queue.LastActiveHour > op.PreviousActiveHour)
        {
            // The next activity writes the record and idle entry again.
            queue.LastActiveHour = op.PreviousActiveHour;
        }
        switch (op.Kind)
        {
            case OpKind.Create:
                queue.Deleted = true;
                Interlocked.Increment(ref _handleRemovals);   // before the removal: see Load
                _queues.TryRemove(new KeyValuePair<QueueKey, QueueHandle>(new QueueKey(queue.RecipientId), queue));
                _senders.TryRemove(new QueueKey(queue.SenderId), out _);
                lock (_createLock)
                {
                    _pendingSenders.Remove(new QueueKey(queue.SenderId));
                }
                break;
            case OpKind.Append:
                // The id stays used: ids only need to increase, and the next append may already have one.
                DropFromTail(queue, op.MessageId);
                queue.MessageCount--;
                queue.ByteCount -= op.Bytes;
                if (op.WroteExpiry && queue.LastExpiryHour == op.Hour)
                {
                    queue.LastExpiryHour = 0;
                }
                break;
            case OpKind.Ack:
            case OpKind.Expire:
                // The messages are still stored: make them visible again.
                queue.MessageCount += op.Count;
                queue.ByteCount += op.Bytes;
                queue.OldestBound = Math.Min(queue.OldestBound, op.MessageId);
                queue.Peeked?.Clear();   // the oldest is back: the recorded run no longer starts at it
                break;
            case OpKind.Secure:
                queue.SenderKey = null;
                break;
            case OpKind.Suspend:
                queue.Suspended = false;
                break;
            case OpKind.Delete:
                queue.Deletion = QueueDeletion.None;
                break;
        }
    }
}
