using System.Security.Cryptography;

namespace Relay.Storage.Tests;

/// <summary>
/// A caller that looked a queue up and used its handle only after the handle was evicted, the queue
/// loaded again as another handle, and that one evicted (or the queue deleted) in turn: the stale
/// handle must behave as a freshly loaded one would.
/// </summary>
public class StaleHandleTests
{
    [Test]
    public async Task Stale_handle_continues_the_ids_of_the_handle_that_replaced_it()
    {
        await using TestStore t = TestStore.Create();
        QueueHandle stale = await t.CreateQueueAsync();
        AppendResult first = await t.Store.AppendAsync(stale, 0, "m1"u8);
        await Assert.That(first.Status).IsEqualTo(StoreStatus.Ok);
        await Assert.That(t.Store.EvictIdle(TimeSpan.Zero)).IsEqualTo(1);

        // The queue is used again meanwhile: a new handle delivers m1, then takes m2 and m3.
        QueueHandle reloaded = t.Store.FindByRecipientId(stale.RecipientId)!;
        await Assert.That(reloaded).IsNotSameReferenceAs(stale);
        await Assert.That(await t.Store.AckAsync(reloaded, first.MessageId)).IsEqualTo(StoreStatus.Ok);
        await Assert.That((await t.Store.AppendAsync(reloaded, 0, "m2"u8)).Status).IsEqualTo(StoreStatus.Ok);
        await Assert.That((await t.Store.AppendAsync(reloaded, 0, "m3"u8)).Status).IsEqualTo(StoreStatus.Ok);
        await Assert.That(t.Store.EvictIdle(TimeSpan.Zero)).IsEqualTo(1);

        // The first caller goes on with the handle it looked up before all that.
        AppendResult late = await t.Store.AppendAsync(stale, 0, "m4"u8);
        await Assert.That(late.Status).IsEqualTo(StoreStatus.Ok);

        QueueHandle receiver = t.Store.FindByRecipientId(stale.RecipientId)!;
        await AssertReadsInOrder(t, receiver, "m2", "m3", "m4");
        await t.ReopenAsync();
        receiver = t.Store.FindByRecipientId(stale.RecipientId)!;
        await AssertReadsInOrder(t, receiver, "m2", "m3", "m4");

        // And ids go on increasing after the restart.
        AppendResult afterRestart = await t.Store.AppendAsync(receiver, 0, "m5"u8);
        await Assert.That(afterRestart.MessageId).IsGreaterThan(late.MessageId);
        await AssertReadsInOrder(t, receiver, "m2", "m3", "m4", "m5");
    }

    [Test]
    public async Task Stale_handle_of_a_deleted_queue_answers_not_found_and_the_queue_stays_deleted()
    {
        await using TestStore t = TestStore.Create();
        QueueHandle stale = await t.CreateQueueAsync();
        await Assert.That((await t.Store.AppendAsync(stale, 0, "m1"u8)).Status).IsEqualTo(StoreStatus.Ok);
        await Assert.That(t.Store.EvictIdle(TimeSpan.Zero)).IsEqualTo(1);

        QueueHandle reloaded = t.Store.FindByRecipientId(stale.RecipientId)!;
        await Assert.That(reloaded).IsNotSameReferenceAs(stale);
        await Assert.That(await t.Store.DeleteQueueAsync(reloaded)).IsEqualTo(StoreStatus.Ok);

        await Assert.That((await t.Store.AppendAsync(stale, 0, "m2"u8)).Status).IsEqualTo(StoreStatus.NotFound);
        await Assert.That(t.Store.TryPeekOldest(stale, out _)).IsFalse();
        await Assert.That(await t.Store.SecureAsync(stale, RandomNumberGenerator.GetBytes(32))).IsEqualTo(StoreStatus.NotFound);
        await Assert.That(await t.Store.SuspendAsync(stale)).IsEqualTo(StoreStatus.NotFound);
        await Assert.That(await t.Store.DeleteQueueAsync(stale)).IsEqualTo(StoreStatus.NotFound);
        await Assert.That(t.Store.FindByRecipientId(stale.RecipientId)).IsNull();
        await Assert.That(t.Store.FindBySenderId(stale.SenderId)).IsNull();
        await Assert.That(t.Store.Statistics.LoadedQueues).IsEqualTo(0);

        await t.ReopenAsync();
        await Assert.That(t.Store.FindByRecipientId(stale.RecipientId)).IsNull();
        await Assert.That(t.Store.FindBySenderId(stale.SenderId)).IsNull();
    }

    [Test]
    public async Task Stale_handle_of_a_queue_the_sweeper_deleted_for_idleness_answers_not_found()
    {
        var clock = new ManualClock();
        await using TestStore t = TestStore.Create(p => new QueueStoreOptions { Path = p, Clock = clock, IdleQueueTtl = TimeSpan.FromDays(30) });
        QueueHandle stale = await t.CreateQueueAsync();
        await Assert.That(t.Store.EvictIdle(TimeSpan.Zero)).IsEqualTo(1);

        // The sweeper loads the idle queue as a new handle of its own and deletes it.
        clock.Advance(TimeSpan.FromDays(31));
        await t.Store.SweepExpiredAsync();
        await Assert.That(t.Store.Statistics.QueuesDeleted).IsEqualTo(1);

        await Assert.That((await t.Store.AppendAsync(stale, 0, "m1"u8)).Status).IsEqualTo(StoreStatus.NotFound);
        await Assert.That(t.Store.TryPeekOldest(stale, out _)).IsFalse();
        await Assert.That(t.Store.FindByRecipientId(stale.RecipientId)).IsNull();
        await Assert.That(t.Store.FindBySenderId(stale.SenderId)).IsNull();

        await t.ReopenAsync();
        await Assert.That(t.Store.FindByRecipientId(stale.RecipientId)).IsNull();
    }

    [Test]
    public async Task Stale_handle_sees_the_sender_key_and_suspension_set_through_the_handle_that_replaced_it()
    {
        await using TestStore t = TestStore.Create();
        QueueHandle stale = await t.CreateQueueAsync();
        await Assert.That(t.Store.EvictIdle(TimeSpan.Zero)).IsEqualTo(1);

        byte[] senderKey = RandomNumberGenerator.GetBytes(32);
        QueueHandle reloaded = t.Store.FindByRecipientId(stale.RecipientId)!;
        await Assert.That(await t.Store.SecureAsync(reloaded, senderKey)).IsEqualTo(StoreStatus.Ok);
        await Assert.That(await t.Store.SuspendAsync(reloaded)).IsEqualTo(StoreStatus.Ok);
        await Assert.That(t.Store.EvictIdle(TimeSpan.Zero)).IsEqualTo(1);

        await Assert.That(await t.Store.SecureAsync(stale, RandomNumberGenerator.GetBytes(32))).IsEqualTo(StoreStatus.Conflict);
        await Assert.That((await t.Store.AppendAsync(stale, 0, "m1"u8)).Status).IsEqualTo(StoreStatus.Suspended);

        await t.ReopenAsync();
        QueueHandle afterRestart = t.Store.FindByRecipientId(stale.RecipientId)!;
        await Assert.That(afterRestart.SenderKey!.SequenceEqual(senderKey)).IsTrue();
        await Assert.That(afterRestart.Suspended).IsTrue();
    }

    /// <summary>Reads every stored message without acknowledging it: the bodies in this order, ids strictly increasing.</summary>
    private static async Task AssertReadsInOrder(TestStore t, QueueHandle queue, params string[] bodies)
    {
        var read = new List<string>();
        ulong from = 0, last = 0;
        while (t.Store.TryPeek(queue, from, out StoredMessage message))
        {
            ulong id = message.Id;
            read.Add(System.Text.Encoding.UTF8.GetString(message.Body));
            message.Return();
            if (read.Count > 1)
            {
                await Assert.That(id).IsGreaterThan(last);
            }
            last = id;
            from = id + 1;
        }
        await Assert.That(read).IsEquivalentTo(bodies, TUnit.Assertions.Enums.CollectionOrdering.Matching);
        await Assert.That(queue.MessageCount).IsEqualTo(bodies.Length);
    }
}
