namespace Relay.Storage.Tests;

/// <summary>
/// A long seeded random walk over the store's API (create, secure, append, peek, ack, ack-through,
/// suspend, delete, clock moves with sweeps, evictions, restarts, writes in flight together), each
/// answer predicted by a small in-memory model of the documented behaviour (docs/PROTOCOL.md §6,
/// docs/OPERATIONS.md "Retention and limits", the API's doc comments). A failure names the seed
/// and the step, and lists the operations that led to it.
/// </summary>
public class ModelTests
{
    private const int Steps = 2500;

    /// <param name="longQueues">
    /// False: queues of a dozen messages, quickly full. True: queues of hundreds of small messages,
    /// longer than a read-ahead, an ACK's most and the run of handed-out messages the store remembers.
    /// </param>
    /// <param name="durable">False: the relaxed mode (no fsync), which answers the same.</param>
    [Test]
    [Arguments(1, false, true)]
    [Arguments(2, false, true)]
    [Arguments(3, false, true)]
    [Arguments(42, false, true)]
    [Arguments(1234, false, false)]
    [Arguments(7, true, true)]
    [Arguments(99, true, false)]
    [Arguments(98765, true, true)]
    public async Task Store_answers_as_the_model_predicts(int seed, bool longQueues, bool durable)
    {
        await using var run = new ModelRun(seed, longQueues, durable);
        await run.RunAsync(Steps);
    }
}

/// <summary>The store's answer differed from the model's.</summary>
internal sealed class ModelMismatchException(string message) : Exception(message);

internal sealed class ModelRun : IAsyncDisposable
{
    private const int MaxLiveQueues = 6;
    private const ulong Pending = ulong.MaxValue;   // id of a model message whose append is in flight
    // Whole hours: a message of hour h is then more than the TTL old exactly from the end of hour h plus the TTL.
    private static readonly TimeSpan Ttl = TimeSpan.FromDays(3);
    private static readonly TimeSpan IdleTtl = TimeSpan.FromDays(5);

    private readonly int _maxMessages;
    private readonly long _maxBytes;
    private readonly bool _longQueues;

    private readonly int _seed;
    private readonly Random _rng;
    private readonly ManualClock _clock = new();
    private readonly TestStore _t;
    private readonly List<ModelQueue> _live = [];
    private readonly List<ModelQueue> _deleted = [];
    private readonly Queue<string> _recent = new();
    private int _step;
    private int _queueNames;

    public ModelRun(int seed, bool longQueues, bool durable)
    {
        _seed = seed;
        _longQueues = longQueues;
        _maxMessages = longQueues ? 300 : 12;
        _maxBytes = longQueues ? 40_000 : 8000;
        _rng = new Random(seed);
        _t = TestStore.Create(p => new QueueStoreOptions
        {
            Path = p,
            Clock = _clock,
            MessageTtl = Ttl,
            IdleQueueTtl = IdleTtl,
            MaxMessagesPerQueue = _maxMessages,
            MaxBytesPerQueue = _maxBytes,
            Durable = durable,
            SweepInterval = TimeSpan.Zero,   // the walk sweeps by hand
            DeliveryTailBytes = 16 * 1024,   // small: deliveries come from memory and from the store
        });
    }

    private QueueStore Store => _t.Store;

    public ValueTask DisposeAsync() => _t.DisposeAsync();

    public async Task RunAsync(int steps)
    {
        for (_step = 1; _step <= steps; _step++)
        {
            await StepAsync();
            if (_step % 16 == 0)
            {
                VerifyAll();
            }
        }
        await ReopenAsync(withWritesInFlight: false);
        CheckCoverage();
    }

    private async Task StepAsync()
    {
        if (_live.Count < 2)
        {
            await CreateAsync();
            return;
        }
        int r = _rng.Next(100);
        switch (r)
        {
            case < 4: if (_live.Count < MaxLiveQueues) { await CreateAsync(); } else { await AppendAsync(); } break;
            case < 5: await CreateConflictAsync(); break;
            case < 6: if (_rng.Next(2) == 0) { await CreateOverDeletedAsync(); } else { await ReplaceAsync(); } break;
            case < 9: await SecureAsync(); break;
            case < 31: await AppendAsync(); break;
            case < 37: await BurstAsync(); break;
            case < 39: await ParallelAsync(); break;
            case < 45: PeekOldest(); break;
            case < 49: PeekFrom(); break;
            case < 53: await WindowAsync(); break;
            case < 60: await AckOldestAsync(); break;
            case < 64: await AckWrongAsync(); break;
            case < 70: await AckThroughAsync(); break;
            case < 72: IsGone(); break;
            case < 73: await SuspendAsync(); break;
            case < 76: await DeleteAsync(); break;
            case < 79: ToggleSubscriber(); break;
            case < 85: AdvanceClock(TimeSpan.FromMinutes(_rng.Next(0, 150))); break;
            case < 86: AdvanceClock(TimeSpan.FromDays(_rng.Next(1, 7)) + TimeSpan.FromMinutes(_rng.Next(0, 1440))); await SweepAsync(); break;
            case < 88: await SweepAsync(); break;
            case < 91: if (_rng.Next(6) == 0) { Reclaim(); } else { Evict(); } break;
            case < 95: Find(); break;
            case < 96: await ReopenAsync(withWritesInFlight: _rng.Next(2) == 0); break;
            case < 98: await StaleAndDeletedAsync(); break;
            default: await MaintenanceWhileWritingAsync(); break;
        }
    }

    // ---- the model ----

    private sealed class ModelQueue
    {
        public required string Name { get; init; }
        public required byte[] RecipientId { get; init; }
        public required byte[] SenderId { get; init; }
        public required byte[] RecipientKey { get; init; }
        public required byte[] DeliveryKey { get; init; }
        public byte[]? SenderKey;
        public bool Suspended;
        public bool Deleted;
        /// <summary>Its deletion is staged and its answer not awaited yet: it may not be durable.</summary>
        public bool DeleteInFlight;
        public readonly List<ModelMessage> Messages = [];
        public uint LastActiveHour;
        /// <summary>Highest id the store issued to this queue (0: none yet).</summary>
        public ulong LastId;
        /// <summary>Every id the store issued to this queue.</summary>
        public readonly List<ulong> Issued = [];
        /// <summary>Handles of this store instance the walk holds (the loaded one and stale ones).</summary>
        public readonly List<QueueHandle> Handles = [];
        /// <summary>The handle the store holds in memory for the queue (null: none, after an eviction).</summary>
        public QueueHandle? Loaded;
        public bool Subscribed;

        public long Bytes => Messages.Sum(m => (long)m.Body.Length);

        public override string ToString() => Name;
    }

    private sealed class ModelMessage
    {
        public ulong Id = Pending;
        public required uint Hour { get; init; }
        public required byte Flags { get; init; }
        public required byte[] Body { get; init; }
    }

    private uint NowHour => (uint)(_clock.Now.ToUnixTimeSeconds() / 3600);

    /// <summary>Activity (create, secure, send, ack) moves the queue's last-active hour.</summary>
    private void Touch(ModelQueue q) => q.LastActiveHour = Math.Max(q.LastActiveHour, NowHour);

    /// <summary>
    /// Whether an operation through <paramref name="h"/> acts on the queue (false: NotFound). A handle
    /// the store dropped from memory comes back to life on use, unless another handle of the queue
    /// was loaded meanwhile; a deleted queue answers NotFound through every handle.
    /// </summary>
    private bool Resolve(ModelQueue q, QueueHandle h)
    {
        if (q.Deleted)
        {
            Seen("a deleted queue");
            return false;
        }
        if (ReferenceEquals(q.Loaded, h))
        {
            return true;
        }
        if (q.Loaded is null)
        {
            Seen("a handle back from eviction");
            q.Loaded = h;
            return true;
        }
        Seen("a stale handle");
        return false;
    }

    /// <summary>
    /// What an operation that <see cref="Resolve"/> refused answers: through the queue's handle while
    /// its deletion may still be being written, Deleting or NotFound (<see cref="ExpectEqual(StoreStatus, StoreStatus, string)"/>
    /// takes either); otherwise NotFound (a stale handle, or a deletion durable).
    /// </summary>
    private static StoreStatus Refused(ModelQueue q, QueueHandle h) =>
        q.Deleted && q.DeleteInFlight && ReferenceEquals(q.Loaded, h) ? StoreStatus.Deleting : StoreStatus.NotFound;

    /// <summary>A message arrived in hour h is more than the TTL old once the hour ended a TTL ago.</summary>
    private bool IsExpired(ModelMessage m) =>
        _clock.Now.ToUnixTimeSeconds() >= ((long)m.Hour + 1) * 3600 + (long)Ttl.TotalSeconds;

    private bool IsIdle(ModelQueue q) =>
        _clock.Now.ToUnixTimeSeconds() >= ((long)q.LastActiveHour + 1) * 3600 + (long)IdleTtl.TotalSeconds;

    private StoreStatus PredictAppend(ModelQueue q, QueueHandle h, byte flags, byte[] body, out ModelMessage? message)
    {
        message = null;
        if (!Resolve(q, h))
        {
            return Refused(q, h);
        }
        if (q.Suspended)
        {
            Seen("append Suspended");
            return StoreStatus.Suspended;
        }
        if (q.Messages.Count + 1 > _maxMessages || q.Bytes + body.Length > _maxBytes)
        {
            Seen(q.Messages.Count + 1 > _maxMessages ? "append over the message quota" : "append over the byte quota");
            return StoreStatus.QuotaExceeded;
        }
        Seen("append Ok");
        message = new ModelMessage { Hour = NowHour, Flags = flags, Body = body };
        q.Messages.Add(message);
        Touch(q);
        return StoreStatus.Ok;
    }

    private void CheckAppend(ModelQueue q, StoreStatus expected, ModelMessage? message, AppendResult result)
    {
        ExpectEqual(expected, result.Status, $"append to {q}: status");
        if (message is null)
        {
            return;
        }
        Expect(result.MessageId > q.LastId, $"append to {q}: id {result.MessageId} not above the last id issued, {q.LastId}");
        ExpectEqual(message.Hour, result.Hour, $"append to {q}: hour");
        message.Id = result.MessageId;
        q.LastId = result.MessageId;
        q.Issued.Add(result.MessageId);
    }

    /// <summary>ACK (through) of <paramref name="lastId"/>: the oldest messages up to it, at most maxCount, and it must be the last of them.</summary>
    private StoreStatus PredictAck(ModelQueue q, QueueHandle h, ulong lastId, int maxCount, out int deleted)
    {
        deleted = 0;
        if (!Resolve(q, h))
        {
            return Refused(q, h);
        }
        int n = 0;
        while (n < q.Messages.Count && q.Messages[n].Id <= lastId)
        {
            n++;
        }
        if (n == 0 || n > maxCount || q.Messages[n - 1].Id != lastId)
        {
            Seen(n == 0 ? "ack NotOldest (nothing up to it)" : n > maxCount ? "ack NotOldest (over its count)" : "ack NotOldest (not stored)");
            return StoreStatus.NotOldest;
        }
        Seen(n > 1 ? "ack through several" : "ack Ok");
        q.Messages.RemoveRange(0, n);
        Touch(q);
        deleted = n;
        return StoreStatus.Ok;
    }

    private StoreStatus PredictSecure(ModelQueue q, QueueHandle h, byte[] key)
    {
        if (!Resolve(q, h))
        {
            return Refused(q, h);
        }
        if (q.SenderKey is null)
        {
            Seen("secure Ok");
            q.SenderKey = key;
            Touch(q);
            return StoreStatus.Ok;
        }
        bool same = q.SenderKey.AsSpan().SequenceEqual(key);
        Seen(same ? "secure again with the same key" : "secure Conflict");
        return same ? StoreStatus.Ok : StoreStatus.Conflict;
    }

    private StoreStatus PredictSuspend(ModelQueue q, QueueHandle h)
    {
        if (!Resolve(q, h))
        {
            return Refused(q, h);
        }
        if (!q.Suspended)
        {
            q.Suspended = true;
            Touch(q);
        }
        return StoreStatus.Ok;
    }

    private StoreStatus PredictDelete(ModelQueue q, QueueHandle h)
    {
        if (!Resolve(q, h))
        {
            return Refused(q, h);
        }
        q.Deleted = true;
        q.Messages.Clear();
        q.Subscribed = false;
        _live.Remove(q);
        _deleted.Add(q);
        return StoreStatus.Ok;
    }

    // ---- choices ----

    private ModelQueue PickLive() => _live[_rng.Next(_live.Count)];

    /// <summary>Mostly a live queue; now and then a deleted one whose handles the walk still holds.</summary>
    private ModelQueue PickQueue()
    {
        if (_rng.Next(20) == 0)
        {
            var withHandles = _deleted.Where(q => q.Handles.Count > 0).ToList();
            if (withHandles.Count > 0)
            {
                return withHandles[_rng.Next(withHandles.Count)];
            }
        }
        return PickLive();
    }

    /// <summary>Mostly the loaded handle; sometimes any handle held (a stale one, or one to revive).</summary>
    private QueueHandle PickHandle(ModelQueue q)
    {
        if (q.Handles.Count == 0)
        {
            return FindChecked(q, bySender: false)!;
        }
        if (q.Loaded is not null && _rng.Next(5) != 0)
        {
            return q.Loaded;
        }
        return q.Handles[_rng.Next(q.Handles.Count)];
    }

    private (byte Flags, byte[] Body) NewBody(Random rng)
    {
        int size = _longQueues
            ? rng.Next(40) switch
            {
                0 => 0,
                1 => rng.Next(2000, 6000),
                _ => rng.Next(1, 120),
            }
            : rng.Next(10) switch
            {
                0 => 0,
                < 7 => rng.Next(1, 200),
                _ => rng.Next(800, 3000),
            };
        byte[] body = new byte[size];
        rng.NextBytes(body);
        return ((byte)rng.Next(4), body);
    }

    private byte[] RandomBytes(int n)
    {
        byte[] b = new byte[n];
        _rng.NextBytes(b);
        return b;
    }

    // ---- operations ----

    private Task CreateAsync() => CreateAsync(RandomBytes(QueueHandle.IdLength));

    private async Task CreateAsync(byte[] recipientId)
    {
        var q = new ModelQueue
        {
            Name = "q" + ++_queueNames,
            RecipientId = recipientId,
            SenderId = RandomBytes(QueueHandle.IdLength),
            RecipientKey = RandomBytes(QueueHandle.KeyLength),
            DeliveryKey = RandomBytes(QueueHandle.KeyLength),
        };
        Note($"create {q}");
        (StoreStatus status, QueueHandle? handle) = await Store.CreateQueueAsync(q.RecipientId, q.SenderId, q.RecipientKey, q.DeliveryKey);
        ExpectEqual(StoreStatus.Ok, status, $"create {q}");
        Expect(handle is not null, $"create {q}: no handle");
        q.LastActiveHour = NowHour;
        q.Loaded = handle;
        q.Handles.Add(handle!);
        _live.Add(q);
        FindChecked(q, bySender: _rng.Next(2) == 0);
    }

    /// <summary>
    /// A new queue under the recipient id of a deleted one (its other ids and keys new): a new, empty
    /// queue, which the deleted queue's old handles do not reach.
    /// </summary>
    private async Task CreateOverDeletedAsync()
    {
        var reusable = _deleted.Where(d => !_live.Any(l => l.RecipientId.AsSpan().SequenceEqual(d.RecipientId))).ToList();
        if (reusable.Count == 0 || _live.Count >= MaxLiveQueues)
        {
            return;
        }
        ModelQueue old = reusable[_rng.Next(reusable.Count)];
        Note($"create under the recipient id of deleted {old}");
        Seen("a queue created under a deleted queue's recipient id");
        await CreateAsync(old.RecipientId);
    }

    /// <summary>
    /// A caller keeps a queue's handle while the handle is dropped from memory, the queue is looked up
    /// again and deleted, a new queue is created under its recipient id and dropped from memory in
    /// turn: the old handle must not come back to life as the new queue.
    /// </summary>
    private async Task ReplaceAsync()
    {
        ModelQueue q = PickLive();
        if (q.Subscribed || _live.Count >= MaxLiveQueues)
        {
            return;
        }
        Note($"replace {q}");
        Evict();
        QueueHandle kept = q.Handles[^1];
        QueueHandle h = FindChecked(q, bySender: _rng.Next(2) == 0)!;
        ExpectEqual(StoreStatus.Ok, await Store.DeleteQueueAsync(h), $"delete {q}");
        PredictDelete(q, h);
        await CreateAsync(q.RecipientId);
        Evict();
        Seen("an old handle after its queue was replaced");
        (byte flags, byte[] body) = NewBody(_rng);
        ExpectEqual(StoreStatus.NotFound, (await Store.AppendAsync(kept, flags, body)).Status, $"append through an old handle of replaced {q}");
        Expect(!Store.TryPeekOldest(kept, out _), $"peek through an old handle of replaced {q} found a message");
        ExpectEqual(StoreStatus.NotFound, await Store.SuspendAsync(kept), $"suspend through an old handle of replaced {q}");
        VerifyAll();
    }

    private async Task CreateConflictAsync()
    {
        ModelQueue q = PickLive();
        bool sameRecipient = _rng.Next(2) == 0;
        Note($"create with the {(sameRecipient ? "recipient" : "sender")} id of {q}");
        byte[] key = RandomBytes(QueueHandle.KeyLength);
        (StoreStatus status, QueueHandle? handle) = sameRecipient
            ? await Store.CreateQueueAsync(q.RecipientId, RandomBytes(QueueHandle.IdLength), key, key)
            : await Store.CreateQueueAsync(RandomBytes(QueueHandle.IdLength), q.SenderId, key, key);
        ExpectEqual(StoreStatus.Conflict, status, $"create with an id of {q}");
        Expect(handle is null, "a refused create returned a handle");
    }

    private async Task SecureAsync()
    {
        ModelQueue q = PickQueue();
        QueueHandle h = PickHandle(q);
        byte[] key = q.SenderKey is not null && _rng.Next(2) == 0 ? q.SenderKey : RandomBytes(QueueHandle.KeyLength);
        Note($"secure {q}{Which(q, h)}");
        StoreStatus expected = PredictSecure(q, h, key);
        ExpectEqual(expected, await Store.SecureAsync(h, key), $"secure {q}");
    }

    private async Task AppendAsync()
    {
        ModelQueue q = PickQueue();
        QueueHandle h = PickHandle(q);
        (byte flags, byte[] body) = NewBody(_rng);
        Note($"append {body.Length} bytes to {q}{Which(q, h)}");
        StoreStatus expected = PredictAppend(q, h, flags, body, out ModelMessage? message);
        CheckAppend(q, expected, message, await Store.AppendAsync(h, flags, body));
    }

    private void PeekOldest()
    {
        ModelQueue q = PickQueue();
        QueueHandle h = PickHandle(q);
        Note($"peek the oldest of {q}{Which(q, h)}");
        ModelMessage? expected = Resolve(q, h) ? q.Messages.FirstOrDefault() : null;
        bool found = Store.TryPeekOldest(h, out StoredMessage message);
        CheckPeek(q, expected, found, ref message, "peek the oldest");
    }

    private void PeekFrom()
    {
        ModelQueue q = PickQueue();
        QueueHandle h = PickHandle(q);
        ulong from = _rng.Next(5) switch
        {
            0 => 0,
            1 when q.Issued.Count > 0 => q.Issued[_rng.Next(q.Issued.Count)],
            2 when q.Issued.Count > 0 => q.Issued[_rng.Next(q.Issued.Count)] + 1,
            3 => q.LastId + 1,
            _ => q.Messages.Count > 0 ? q.Messages[_rng.Next(q.Messages.Count)].Id : q.LastId,
        };
        Note($"peek {q} from {from}{Which(q, h)}");
        ModelMessage? expected = Resolve(q, h) ? q.Messages.FirstOrDefault(m => m.Id >= from) : null;
        bool found = Store.TryPeek(h, from, out StoredMessage message);
        CheckPeek(q, expected, found, ref message, $"peek from {from}");
    }

    /// <summary>
    /// A subscriber with a delivery window: it is handed the oldest messages one after the other (each
    /// read from the id after the one before), then acknowledges through one of them, now or later.
    /// </summary>
    private async Task WindowAsync()
    {
        ModelQueue q = PickQueue();
        QueueHandle h = PickHandle(q);
        int window = _rng.Next(1, _longQueues && _rng.Next(3) == 0 ? _maxMessages : 8);
        Note($"hand out up to {window} messages of {q}{Which(q, h)}");
        bool acts = Resolve(q, h);
        var handedOut = new List<ulong>();
        ulong from = 0;
        for (int i = 0; i < window; i++)
        {
            ModelMessage? expected = acts ? q.Messages.FirstOrDefault(m => m.Id >= from) : null;
            bool found = Store.TryPeek(h, from, out StoredMessage message);
            CheckPeek(q, expected, found, ref message, $"hand out from {from}");
            if (expected is null)
            {
                break;
            }
            handedOut.Add(expected.Id);
            from = expected.Id + 1;
        }
        if (handedOut.Count > 0 && _rng.Next(2) == 0)
        {
            ulong lastId = handedOut[_rng.Next(handedOut.Count)];
            int maxCount = Math.Min(handedOut.Count, QueueStore.MaxAckCount);
            Note($"ack {q} through {lastId}, at most {maxCount}");
            StoreStatus expected = PredictAck(q, h, lastId, maxCount, out int expectedDeleted);
            StoreStatus status = await Store.AckAsync(h, lastId, maxCount, out int deleted);
            ExpectEqual(expected, status, $"ack {q} through {lastId}");
            ExpectEqual(expectedDeleted, deleted, $"ack {q} through {lastId}: messages deleted");
        }
    }

    private void CheckPeek(ModelQueue q, ModelMessage? expected, bool found, ref StoredMessage message, string what)
    {
        try
        {
            Expect(found == expected is not null,
                $"{what} of {q}: expected {(expected is null ? "nothing" : "message " + expected.Id)}, got {(found ? "message " + message.Id : "nothing")}");
            if (expected is not null)
            {
                CheckMessage(q, expected, message, what);
            }
        }
        finally
        {
            message.Return();
        }
    }

    private void CheckMessage(ModelQueue q, ModelMessage expected, in StoredMessage message, string what)
    {
        ExpectEqual(expected.Id, message.Id, $"{what} of {q}: id");
        ExpectEqual(expected.Hour, message.Hour, $"{what} of {q}: hour of {expected.Id}");
        ExpectEqual(expected.Flags, message.Flags, $"{what} of {q}: flags of {expected.Id}");
        Expect(message.Body.SequenceEqual(expected.Body), $"{what} of {q}: body of {expected.Id} ({message.Length} bytes, expected {expected.Body.Length})");
    }

    private async Task AckOldestAsync()
    {
        ModelQueue q = PickQueue();
        QueueHandle h = PickHandle(q);
        ulong id = q.Messages.Count > 0 ? q.Messages[0].Id : q.LastId;
        Note($"ack {id} of {q}{Which(q, h)}");
        StoreStatus expected = PredictAck(q, h, id, 1, out _);
        ExpectEqual(expected, await Store.AckAsync(h, id), $"ack {id} of {q}");
    }

    /// <summary>ACKs that must change nothing: an id already acknowledged or expired, one not the oldest, one never issued.</summary>
    private async Task AckWrongAsync()
    {
        ModelQueue q = PickQueue();
        QueueHandle h = PickHandle(q);
        var stored = q.Messages.Select(m => m.Id).ToHashSet();
        var gone = q.Issued.Where(id => !stored.Contains(id)).ToList();
        ulong id = _rng.Next(4) switch
        {
            0 when gone.Count > 0 => gone[_rng.Next(gone.Count)],
            1 when q.Messages.Count > 1 => q.Messages[_rng.Next(1, q.Messages.Count)].Id,
            2 => q.LastId + 1 + (ulong)_rng.Next(3),
            _ => (ulong)_rng.Next(3),
        };
        Note($"ack {id} of {q}{Which(q, h)}");
        StoreStatus expected = PredictAck(q, h, id, 1, out _);
        ExpectEqual(expected, await Store.AckAsync(h, id), $"ack {id} of {q}");
    }

    private async Task AckThroughAsync()
    {
        ModelQueue q = PickQueue();
        QueueHandle h = PickHandle(q);
        ulong lastId;
        if (q.Messages.Count > 0 && _rng.Next(6) != 0)
        {
            lastId = q.Messages[_rng.Next(q.Messages.Count)].Id;
        }
        else
        {
            lastId = q.Issued.Count > 0 && _rng.Next(2) == 0 ? q.Issued[_rng.Next(q.Issued.Count)] : q.LastId + 1;
        }
        int maxCount = _rng.Next(1, Math.Min(_maxMessages + 3, QueueStore.MaxAckCount + 1));
        Note($"ack {q} through {lastId}, at most {maxCount}{Which(q, h)}");
        StoreStatus expected = PredictAck(q, h, lastId, maxCount, out int expectedDeleted);
        StoreStatus status = await Store.AckAsync(h, lastId, maxCount, out int deleted);
        ExpectEqual(expected, status, $"ack {q} through {lastId}");
        ExpectEqual(expectedDeleted, deleted, $"ack {q} through {lastId}: messages deleted");
    }

    private void IsGone()
    {
        ModelQueue q = PickLive();
        if (q.Loaded is null || q.Issued.Count == 0)
        {
            return;
        }
        ulong id = q.Issued[_rng.Next(q.Issued.Count)];
        Note($"is {id} of {q} gone");
        bool expected = !q.Messages.Any(m => m.Id <= id);
        ExpectEqual(expected, Store.IsGone(q.Loaded, id), $"is {id} of {q} gone");
    }

    private async Task SuspendAsync()
    {
        ModelQueue q = PickQueue();
        QueueHandle h = PickHandle(q);
        Note($"suspend {q}{Which(q, h)}");
        StoreStatus expected = PredictSuspend(q, h);
        ExpectEqual(expected, await Store.SuspendAsync(h), $"suspend {q}");
    }

    private async Task DeleteAsync()
    {
        var suspended = _live.Where(x => x.Suspended).ToList();
        ModelQueue q = suspended.Count > 0 && _rng.Next(2) == 0 ? suspended[_rng.Next(suspended.Count)] : PickQueue();
        QueueHandle h = PickHandle(q);
        Note($"delete {q}{Which(q, h)}");
        StoreStatus expected = PredictDelete(q, h);
        ExpectEqual(expected, await Store.DeleteQueueAsync(h), $"delete {q}");
        if (q.Deleted)
        {
            CheckGone(q);
        }
    }

    /// <summary>A subscriber holds the queue's handle (Tag set, messages kept in memory) until it leaves.</summary>
    private void ToggleSubscriber()
    {
        ModelQueue q = PickLive();
        if (!q.Subscribed)
        {
            Note($"subscribe to {q}");
            QueueHandle h = FindChecked(q, bySender: false)!;
            h.Tag = "subscriber";
            Store.KeepTail(h, true);
            q.Subscribed = true;
        }
        else
        {
            Note($"unsubscribe from {q}");
            QueueHandle h = q.Loaded!;
            h.Tag = null;
            Store.KeepTail(h, false);
            q.Subscribed = false;
        }
    }

    private void AdvanceClock(TimeSpan by)
    {
        Note($"advance the clock by {by}");
        _clock.Advance(by);
    }

    private async Task SweepAsync()
    {
        Note($"sweep at {_clock.Now:yyyy-MM-dd HH:mm}");
        (int expectedExpired, List<ModelQueue> idle) = PredictSweep();
        ExpectEqual(expectedExpired, await Store.SweepExpiredAsync(), "sweep: messages expired");
        AfterSweep(expectedExpired, idle);
    }

    /// <summary>Messages past the TTL go; queues idle for the idle TTL go, unless a subscriber holds them.</summary>
    private (int Expired, List<ModelQueue> Idle) PredictSweep()
    {
        int expectedExpired = 0;
        foreach (ModelQueue q in _live)
        {
            expectedExpired += q.Messages.RemoveAll(IsExpired);
        }
        // A queue with a live subscriber is in use even without traffic: it stays, and is active as
        // of this sweep (once its subscriber leaves, it has the whole idle TTL again).
        foreach (ModelQueue q in _live.Where(q => IsIdle(q) && q.Subscribed))
        {
            Seen("an idle queue kept for its subscriber");
            Touch(q);
        }
        var idle = _live.Where(q => IsIdle(q) && !q.Subscribed).ToList();
        foreach (ModelQueue q in idle)
        {
            q.Deleted = true;
            q.Messages.Clear();
            _live.Remove(q);
            _deleted.Add(q);
        }
        return (expectedExpired, idle);
    }

    private void AfterSweep(int expectedExpired, List<ModelQueue> idle)
    {
        Seen(expectedExpired > 0 ? "a sweep that expired messages" : "a sweep that expired nothing");
        if (idle.Count > 0)
        {
            Seen("idle queues deleted");
        }
        foreach (ModelQueue q in idle)
        {
            CheckGone(q);
        }
        // The sweep loads the queues it looks at: a handle dropped from memory before it may have
        // been replaced. Look each such queue up again, as the relay would.
        foreach (ModelQueue q in _live.Where(q => q.Loaded is null).ToList())
        {
            FindChecked(q, bySender: false);
        }
        VerifyAll();
    }

    /// <summary>
    /// A sweep or an eviction while appends are in flight, to queues the sweep leaves alone (nothing
    /// of theirs expires, they are not idle): the appends are answered as without it, the sweep does
    /// what it would do alone, and the eviction drops every handle without writes in flight.
    /// </summary>
    private async Task MaintenanceWhileWritingAsync()
    {
        bool sweep = _rng.Next(2) == 0;
        if (sweep && _rng.Next(2) == 0)
        {
            AdvanceClock(TimeSpan.FromDays(_rng.Next(1, 4)));
        }
        var targets = _live.Where(q => q.Loaded is not null && !q.Suspended && !IsIdle(q) && !q.Messages.Any(IsExpired)).ToList();
        if (targets.Count == 0)
        {
            return;
        }
        int n = _rng.Next(4, 40);
        Note($"{(sweep ? "sweep" : "evict")} while {n} appends to {string.Join(", ", targets)} are in flight");
        var answers = new List<Func<Task>>(n);
        void Issue(HashSet<ModelQueue> touched)
        {
            ModelQueue q = targets[_rng.Next(targets.Count)];
            touched.Add(q);
            (byte flags, byte[] body) = NewBody(_rng);
            StoreStatus expected = PredictAppend(q, q.Loaded!, flags, body, out ModelMessage? message);
            ValueTask<AppendResult> answer = Store.AppendAsync(q.Loaded!, flags, body);
            answers.Add(async () => CheckAppend(q, expected, message, await answer));
        }
        var before = new HashSet<ModelQueue>();
        var after = new HashSet<ModelQueue>();
        if (sweep)
        {
            Seen("a sweep while appends are in flight");
            (int expectedExpired, List<ModelQueue> idle) = PredictSweep();
            Task<int> sweeping = Task.Run(async () => await Store.SweepExpiredAsync());
            for (int i = 0; i < n; i++)
            {
                Issue(before);
            }
            foreach (Func<Task> answer in answers)
            {
                await answer();
            }
            ExpectEqual(expectedExpired, await sweeping, "sweep while appends are in flight: messages expired");
            AfterSweep(expectedExpired, idle);
            return;
        }

        Seen("an eviction while appends are in flight");
        var loaded = _live.Where(q => q.Loaded is not null && !q.Subscribed).ToList();
        for (int i = 0; i < n / 2; i++)
        {
            Issue(before);
        }
        int evicted = Store.EvictIdle(TimeSpan.Zero);
        for (int i = n / 2; i < n; i++)
        {
            Issue(after);
        }
        foreach (Func<Task> answer in answers)
        {
            await answer();
        }
        int replaced = 0;
        foreach (ModelQueue q in loaded)
        {
            QueueHandle? found = Store.FindByRecipientId(q.RecipientId);
            Expect(found is not null, $"{q} is not found after an eviction");
            if (ReferenceEquals(found, q.Loaded))
            {
                // Kept (writes in flight), or dropped and brought back by a later append through it.
                Expect(before.Contains(q) || after.Contains(q), $"{q}: its handle, without writes in flight, was not evicted");
                continue;
            }
            Expect(!after.Contains(q), $"{q}: used after the eviction, yet another handle is loaded");
            CheckHandle(q, found!);
            replaced++;
        }
        Expect(evicted >= replaced && evicted <= loaded.Count, $"evicted {evicted} handles, expected {replaced} to {loaded.Count}");
        // Which handles that eviction dropped depended on timing; one more, with nothing in flight,
        // drops them all, so that the walk goes on the same way whatever the timing was.
        ExpectEqual(loaded.Count, Store.EvictIdle(TimeSpan.Zero), "evicted handles, nothing in flight");
        foreach (ModelQueue q in loaded)
        {
            q.Loaded = null;
        }
        VerifyAll();
    }

    /// <summary>Flushes and compacts everything (acknowledged, expired and deleted messages leave the table files); nothing visible changes.</summary>
    private void Reclaim()
    {
        Note("reclaim space");
        Seen("space reclaimed");
        Store.ReclaimSpace();
        VerifyAll();
    }

    private void Evict()
    {
        int expected = _live.Count(q => q.Loaded is not null && !q.Subscribed);
        Note($"evict idle handles ({expected} expected)");
        ExpectEqual(expected, Store.EvictIdle(TimeSpan.Zero), "evicted handles");
        Seen(expected > 0 ? "handles evicted" : "an eviction of nothing");
        foreach (ModelQueue q in _live.Where(q => !q.Subscribed))
        {
            q.Loaded = null;
        }
        ExpectEqual(_live.Count(q => q.Subscribed), Store.Statistics.LoadedQueues, "loaded handles after the eviction");
    }

    private void Find()
    {
        ModelQueue q = _deleted.Count > 0 && _rng.Next(8) == 0 ? _deleted[_rng.Next(_deleted.Count)] : PickLive();
        bool bySender = _rng.Next(2) == 0;
        Note($"find {q} by its {(bySender ? "sender" : "recipient")} id");
        FindChecked(q, bySender);
    }

    /// <summary>Looks the queue up and checks what the handle says of it.</summary>
    private QueueHandle? FindChecked(ModelQueue q, bool bySender)
    {
        if (q.Deleted)
        {
            CheckGone(q);
            return null;
        }
        QueueHandle? found = bySender ? Store.FindBySenderId(q.SenderId) : Store.FindByRecipientId(q.RecipientId);
        Expect(found is not null, $"{q} is not found by its {(bySender ? "sender" : "recipient")} id");
        if (q.Loaded is not null)
        {
            Expect(ReferenceEquals(found, q.Loaded), $"{q}: the lookup returned another handle than the loaded one");
        }
        else
        {
            Expect(!q.Handles.Contains(found!), $"{q}: the lookup returned a handle that was dropped from memory");
            q.Loaded = found;
            q.Handles.Add(found!);
            if (q.Handles.Count > 4)
            {
                q.Handles.Remove(q.Handles.First(x => !ReferenceEquals(x, q.Loaded)));
            }
        }
        CheckHandle(q, found!);
        return found;
    }

    /// <summary>What a loaded handle tells of its queue.</summary>
    private void CheckHandle(ModelQueue q, QueueHandle h)
    {
        Expect(h.RecipientId.AsSpan().SequenceEqual(q.RecipientId), $"{q}: recipient id");
        Expect(h.SenderId.AsSpan().SequenceEqual(q.SenderId), $"{q}: sender id");
        Expect(h.RecipientKey.AsSpan().SequenceEqual(q.RecipientKey), $"{q}: recipient key");
        Expect(h.DeliveryKey.AsSpan().SequenceEqual(q.DeliveryKey), $"{q}: delivery key");
        Expect(q.SenderKey is null ? h.SenderKey is null : h.SenderKey is not null && h.SenderKey.AsSpan().SequenceEqual(q.SenderKey),
            $"{q}: sender key");
        ExpectEqual(q.Suspended, h.Suspended, $"{q}: suspended");
        ExpectEqual(q.Messages.Count, h.MessageCount, $"{q}: message count");
        ExpectEqual(q.Bytes, h.ByteCount, $"{q}: byte count");
    }

    private void CheckGone(ModelQueue q)
    {
        ModelQueue? successor = _live.FirstOrDefault(l => l.RecipientId.AsSpan().SequenceEqual(q.RecipientId));
        if (successor is null)
        {
            Expect(Store.FindByRecipientId(q.RecipientId) is null, $"deleted {q} is found by its recipient id");
        }
        else
        {
            // Its recipient id names a newer queue now (and the lookup may load it).
            FindChecked(successor, bySender: false);
        }
        Expect(Store.FindBySenderId(q.SenderId) is null, $"deleted {q} is found by its sender id");
    }

    /// <summary>Every operation through a stale handle, or on a deleted queue, answers NotFound and changes nothing.</summary>
    private async Task StaleAndDeletedAsync()
    {
        ModelQueue q = PickQueue();
        QueueHandle h = PickHandle(q);
        Note($"every operation on {q}{Which(q, h)}");
        (byte flags, byte[] body) = NewBody(_rng);
        StoreStatus expected = PredictAppend(q, h, flags, body, out ModelMessage? message);
        CheckAppend(q, expected, message, await Store.AppendAsync(h, flags, body));
        ModelMessage? oldest = Resolve(q, h) ? q.Messages.FirstOrDefault() : null;
        bool found = Store.TryPeekOldest(h, out StoredMessage peeked);
        CheckPeek(q, oldest, found, ref peeked, "peek the oldest");
        if (oldest is not null)
        {
            ExpectEqual(PredictAck(q, h, oldest.Id, 1, out _), await Store.AckAsync(h, oldest.Id), $"ack {oldest.Id} of {q}");
        }
        byte[] key = q.SenderKey ?? RandomBytes(QueueHandle.KeyLength);
        ExpectEqual(PredictSecure(q, h, key), await Store.SecureAsync(h, key), $"secure {q}");
        if (q.Deleted)
        {
            CheckGone(q);
        }
    }

    /// <summary>
    /// Operations issued together without waiting for each other (the writer commits them in batches):
    /// each is decided when it is called, in call order, and answered once durable.
    /// </summary>
    private async Task BurstAsync()
    {
        // Long queues fill up by floods of one queue.
        List<Func<Task>> answers = _longQueues && _rng.Next(3) == 0
            ? IssueTogether(_rng.Next(50, 300), _live.Where(q => !q.Suspended).MaxBy(q => q.Messages.Count) ?? PickLive())
            : IssueTogether(_rng.Next(2, 10));
        foreach (Func<Task> answer in answers)
        {
            await answer();
        }
    }

    /// <summary>Issues operations without waiting for their answers; returns the checks of the answers, in call order.</summary>
    private List<Func<Task>> IssueTogether(int n, ModelQueue? only = null)
    {
        var answers = new List<Func<Task>>(n);
        var names = new List<string>(n);
        for (int i = 0; i < n && _live.Count > 0; i++)
        {
            ModelQueue q = only ?? PickQueue();
            QueueHandle h = PickHandle(q);
            // A flood of one queue: appends, and now and then a peek.
            int kind = only is null ? _rng.Next(22) : _rng.Next(20) == 0 ? 21 : 0;
            if (kind >= 20)
            {
                // A durable message is handed out; one still being written may be, once it is durable.
                names.Add($"peek the oldest of {q}{Which(q, h)}");
                ModelMessage? oldest = Resolve(q, h) ? q.Messages.FirstOrDefault() : null;
                bool found = Store.TryPeekOldest(h, out StoredMessage message);
                if (oldest is null || oldest.Id != Pending)
                {
                    CheckPeek(q, oldest, found, ref message, "peek the oldest (with writes in flight)");
                    continue;
                }
                Seen("a peek while the oldest message is being written");
                (ulong Id, uint Hour, byte Flags, byte[] Body)? seen = found ? (message.Id, message.Hour, message.Flags, message.Body.ToArray()) : null;
                message.Return();
                answers.Add(() =>
                {
                    // Checked once the append has its id.
                    if (seen is var (id, hour, flags, body))
                    {
                        ExpectEqual(oldest.Id, id, $"peek the oldest of {q} while it was being written: id");
                        ExpectEqual(oldest.Hour, hour, $"peek the oldest of {q} while it was being written: hour");
                        ExpectEqual(oldest.Flags, flags, $"peek the oldest of {q} while it was being written: flags");
                        Expect(body.AsSpan().SequenceEqual(oldest.Body), $"peek the oldest of {q} while it was being written: body");
                    }
                    return Task.CompletedTask;
                });
            }
            else if (kind < 14)
            {
                (byte flags, byte[] body) = NewBody(_rng);
                names.Add($"append {body.Length} bytes to {q}{Which(q, h)}");
                StoreStatus expected = PredictAppend(q, h, flags, body, out ModelMessage? message);
                ValueTask<AppendResult> answer = Store.AppendAsync(h, flags, body);
                answers.Add(async () => CheckAppend(q, expected, message, await answer));
            }
            else if (kind < 17)
            {
                // Through a message whose append is already answered (a pending one has no id yet).
                var durable = q.Messages.Where(m => m.Id != Pending).ToList();
                ulong lastId = durable.Count > 0 ? durable[_rng.Next(durable.Count)].Id : q.LastId;
                int maxCount = _rng.Next(1, Math.Min(_maxMessages + 1, QueueStore.MaxAckCount + 1));
                names.Add($"ack {q} through {lastId}, at most {maxCount}{Which(q, h)}");
                StoreStatus expected = PredictAck(q, h, lastId, maxCount, out int expectedDeleted);
                ValueTask<StoreStatus> answer = Store.AckAsync(h, lastId, maxCount, out int deleted);
                ExpectEqual(expectedDeleted, deleted, $"ack {q} through {lastId} (in a burst): messages deleted");
                answers.Add(async () => ExpectEqual(expected, await answer, $"ack {q} through {lastId} (in a burst)"));
            }
            else if (kind < 18)
            {
                byte[] key = q.SenderKey is not null && _rng.Next(2) == 0 ? q.SenderKey : RandomBytes(QueueHandle.KeyLength);
                names.Add($"secure {q}{Which(q, h)}");
                StoreStatus expected = PredictSecure(q, h, key);
                ValueTask<StoreStatus> answer = Store.SecureAsync(h, key);
                answers.Add(async () => ExpectEqual(expected, await answer, $"secure {q} (in a burst)"));
            }
            else if (kind < 19)
            {
                names.Add($"suspend {q}{Which(q, h)}");
                StoreStatus expected = PredictSuspend(q, h);
                ValueTask<StoreStatus> answer = Store.SuspendAsync(h);
                answers.Add(async () => ExpectEqual(expected, await answer, $"suspend {q} (in a burst)"));
            }
            else
            {
                names.Add($"delete {q}{Which(q, h)}");
                StoreStatus expected = PredictDelete(q, h);
                ValueTask<StoreStatus> answer = Store.DeleteQueueAsync(h);
                // Until its answer is awaited, the operations after it may find it still being written.
                q.DeleteInFlight |= expected == StoreStatus.Ok;
                answers.Add(async () =>
                {
                    ExpectEqual(expected, await answer, $"delete {q} (in a burst)");
                    if (expected == StoreStatus.Ok)
                    {
                        q.DeleteInFlight = false;
                    }
                });
            }
        }
        Note("together: " + string.Join("; ", names));
        Seen("operations in flight together");
        return answers;
    }

    /// <summary>Several queues used at once from thread-pool threads, each by its own sequence of operations.</summary>
    private async Task ParallelAsync()
    {
        var queues = _live.OrderBy(_ => _rng.Next()).Take(_rng.Next(2, 4)).ToList();
        var workers = new List<Task>();
        foreach (ModelQueue q in queues)
        {
            QueueHandle h = q.Loaded ?? FindChecked(q, bySender: false)!;
            var rng = new Random(_rng.Next());
            int ops = rng.Next(3, 9);
            Note($"in parallel: {ops} operations on {q}");
            workers.Add(Task.Run(async () =>
            {
                for (int i = 0; i < ops; i++)
                {
                    int kind = rng.Next(10);
                    if (kind < 6)
                    {
                        (byte flags, byte[] body) = NewBody(rng);
                        StoreStatus expected = PredictAppend(q, h, flags, body, out ModelMessage? message);
                        CheckAppend(q, expected, message, await Store.AppendAsync(h, flags, body));
                    }
                    else if (kind < 8)
                    {
                        ulong id = q.Messages.Count > 0 ? q.Messages[0].Id : q.LastId;
                        StoreStatus expected = PredictAck(q, h, id, 1, out _);
                        ExpectEqual(expected, await Store.AckAsync(h, id), $"ack {id} of {q} (in parallel)");
                    }
                    else
                    {
                        ModelMessage? expected = q.Messages.FirstOrDefault();
                        bool found = Store.TryPeekOldest(h, out StoredMessage message);
                        CheckPeek(q, expected, found, ref message, "peek the oldest (in parallel)");
                    }
                }
            }));
        }
        await Task.WhenAll(workers);
        Seen("queues used in parallel");
    }

    /// <summary>
    /// Closes and opens the store. With writes in flight: operations issued just before the close are
    /// answered by it (it finishes every pending write), and what they did is there after the restart.
    /// </summary>
    private async Task ReopenAsync(bool withWritesInFlight)
    {
        List<Func<Task>> answers = withWritesInFlight ? IssueTogether(_rng.Next(3, 12)) : [];
        Note($"restart{(withWritesInFlight ? $" with {answers.Count} operations in flight" : "")}");
        Seen(answers.Count > 0 ? "a restart with operations in flight" : "a restart");
        await _t.ReopenAsync();
        foreach (Func<Task> answer in answers)
        {
            await answer();
        }
        // Handles belong to the store instance that made them.
        foreach (ModelQueue q in _live.Concat(_deleted))
        {
            q.Handles.Clear();
            q.Loaded = null;
            q.Subscribed = false;
        }
        foreach (ModelQueue q in _deleted)
        {
            CheckGone(q);
        }
        foreach (ModelQueue q in _live)
        {
            FindChecked(q, bySender: _rng.Next(2) == 0);
        }
        VerifyAll();
    }

    /// <summary>Reads every live queue in full and compares it with the model; deleted queues stay gone.</summary>
    private void VerifyAll()
    {
        foreach (ModelQueue q in _live)
        {
            QueueHandle h = q.Loaded ?? FindChecked(q, bySender: false)!;
            var read = new List<ulong>();
            ulong from = 0;
            while (Store.TryPeek(h, from, out StoredMessage message))
            {
                try
                {
                    int i = read.Count;
                    Expect(i < q.Messages.Count, $"check {q}: message {message.Id} read after the {q.Messages.Count} expected");
                    CheckMessage(q, q.Messages[i], message, "check");
                    read.Add(message.Id);
                    from = message.Id + 1;
                }
                finally
                {
                    message.Return();
                }
            }
            ExpectEqual(q.Messages.Count, read.Count, $"check {q}: messages read");
            CheckHandle(q, h);
        }
        foreach (ModelQueue q in _deleted.Skip(Math.Max(0, _deleted.Count - 8)))
        {
            CheckGone(q);
        }
    }

    // ---- reporting ----

    private readonly System.Collections.Concurrent.ConcurrentDictionary<string, int> _seen = new();

    private void Seen(string what) => _seen.AddOrUpdate(what, 1, (_, n) => n + 1);

    /// <summary>What every seed's walk must have gone through, so that a change of the walk cannot quietly test less.</summary>
    private static readonly string[] MustSee =
    [
        "append Ok", "append Suspended", "append over the message quota", "append over the byte quota",
        "a deleted queue", "a stale handle", "a handle back from eviction",
        "ack Ok", "ack through several", "ack NotOldest (nothing up to it)", "ack NotOldest (over its count)", "ack NotOldest (not stored)",
        "secure Ok", "secure again with the same key", "secure Conflict",
        "a sweep that expired messages", "idle queues deleted", "an idle queue kept for its subscriber",
        "handles evicted", "a restart", "a restart with operations in flight", "a peek while the oldest message is being written",
        "operations in flight together", "queues used in parallel", "a queue created under a deleted queue's recipient id",
        "an old handle after its queue was replaced",
        "a sweep while appends are in flight", "space reclaimed", "an eviction while appends are in flight",
    ];

    private void CheckCoverage()
    {
        Console.WriteLine($"seed {_seed}: " + string.Join(", ", _seen.OrderBy(e => e.Key).Select(e => $"{e.Key}: {e.Value}")));
        string[] missing = MustSee.Where(what => !_seen.ContainsKey(what)).ToArray();
        if (missing.Length > 0)
        {
            throw new ModelMismatchException($"seed {_seed}: the walk never went through: {string.Join(", ", missing)}");
        }
    }

    private static string Which(ModelQueue q, QueueHandle h) =>
        ReferenceEquals(q.Loaded, h) ? "" : q.Loaded is null ? " (through a handle dropped from memory)" : " (through a stale handle)";

    private void Note(string what)
    {
        lock (_recent)
        {
            _recent.Enqueue($"{_step}: {what}");
            if (_recent.Count > 25)
            {
                _recent.Dequeue();
            }
        }
    }

    private ModelMismatchException Mismatch(string what)
    {
        string recent;
        lock (_recent)
        {
            recent = string.Join("\n  ", _recent);
        }
        return new ModelMismatchException($"seed {_seed}, step {_step}: {what}\nlast operations:\n  {recent}");
    }

    private void Expect(bool condition, string what)
    {
        if (!condition)
        {
            throw Mismatch(what);
        }
    }

    /// <summary>As the generic one; Deleting expected takes NotFound too (the deletion became durable first).</summary>
    private void ExpectEqual(StoreStatus expected, StoreStatus actual, string what)
    {
        if (expected == StoreStatus.Deleting && actual == StoreStatus.NotFound)
        {
            Seen("an operation after a deletion in flight became durable");
            return;
        }
        if (expected == StoreStatus.Deleting && actual == expected)
        {
            Seen("an operation while the queue's deletion is being written");
        }
        ExpectEqual<StoreStatus>(expected, actual, what);
    }

    private void ExpectEqual<T>(T expected, T actual, string what)
    {
        if (!EqualityComparer<T>.Default.Equals(expected, actual))
        {
            throw Mismatch($"{what}: expected {expected}, got {actual}");
        }
    }
}
