using System.Security.Cryptography;
using Relay.Protocol;

namespace Relay.Protocol.Tests;

/// <summary>DeliveryCipher is ChaCha20-Poly1305 exactly: the RFC 8439 vector, the BCL both ways, context reuse.</summary>
public class DeliveryCipherTests
{
    private static readonly byte[] RfcKey = Enumerable.Range(0x80, 32).Select(i => (byte)i).ToArray();
    private static readonly byte[] RfcNonce = Convert.FromHexString("070000004041424344454647");
    private static readonly byte[] RfcAad = Convert.FromHexString("50515253c0c1c2c3c4c5c6c7");
    private static readonly byte[] RfcPlain = "Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it."u8.ToArray();
    private const string RfcCipher = "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d63dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b3692ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc3ff4def08e4b7a9de576d26586cec64b6116";
    private const string RfcTag = "1ae10b594f09e26a7e902ecbd0600691";

    [Test]
    public async Task Libcrypto_is_called_directly_here()
    {
        await Assert.That(EvpChaCha20Poly1305.Available).IsTrue();
    }

    [Test]
    [Arguments(true)]
    [Arguments(false)]
    public async Task Seals_and_opens_the_RFC_8439_vector(bool native)
    {
        using var cipher = new DeliveryCipher(RfcKey, native);
        var sealedBytes = new byte[RfcPlain.Length];
        var tag = new byte[16];
        cipher.Encrypt(RfcNonce, RfcPlain, sealedBytes, tag, RfcAad);
        await Assert.That(Convert.ToHexStringLower(sealedBytes)).IsEqualTo(RfcCipher);
        await Assert.That(Convert.ToHexStringLower(tag)).IsEqualTo(RfcTag);

        var opened = new byte[RfcPlain.Length];
        await Assert.That(cipher.TryDecrypt(RfcNonce, sealedBytes, tag, opened, RfcAad)).IsTrue();
        await Assert.That(opened.AsSpan().SequenceEqual(RfcPlain)).IsTrue();

        // A wrong tag, AAD or nonce: refused, and nothing of the plaintext is left in the output.
        var wrongTag = (byte[])tag.Clone();
        wrongTag[15] ^= 1;
        await Assert.That(cipher.TryDecrypt(RfcNonce, sealedBytes, wrongTag, opened, RfcAad)).IsFalse();
        await Assert.That(opened.All(b => b == 0)).IsTrue();
        var wrongAad = (byte[])RfcAad.Clone();
        wrongAad[0] ^= 1;
        await Assert.That(cipher.TryDecrypt(RfcNonce, sealedBytes, tag, opened, wrongAad)).IsFalse();
        var wrongNonce = (byte[])RfcNonce.Clone();
        wrongNonce[11] ^= 1;
        await Assert.That(cipher.TryDecrypt(wrongNonce, sealedBytes, tag, opened, RfcAad)).IsFalse();

        // The same context opens again after the refusals.
        await Assert.That(cipher.TryDecrypt(RfcNonce, sealedBytes, tag, opened, RfcAad)).IsTrue();
        await Assert.That(opened.AsSpan().SequenceEqual(RfcPlain)).IsTrue();
    }

    [Test]
    [Arguments(true)]
    [Arguments(false)]
    public async Task Agrees_with_the_BCL_both_ways_on_every_length_and_in_place(bool native)
    {
        var wrong = new List<string>();
        byte[] key = RandomNumberGenerator.GetBytes(32);
        using var mine = new DeliveryCipher(key, native);
        using var bcl = new ChaCha20Poly1305(key);
        foreach (int length in new[] { 0, 1, 15, 16, 63, 64, 65, 256, 261, 4096, 65_000 })
        {
            byte[] nonce = RandomNumberGenerator.GetBytes(12), aad = RandomNumberGenerator.GetBytes(32), plain = RandomNumberGenerator.GetBytes(length);
            byte[] a = new byte[length], aTag = new byte[16], b = new byte[length], bTag = new byte[16];
            mine.Encrypt(nonce, plain, a, aTag, aad);
            bcl.Encrypt(nonce, plain, b, bTag, aad);
            if (!a.AsSpan().SequenceEqual(b) || !aTag.AsSpan().SequenceEqual(bTag)) wrong.Add($"seal {length}");

            byte[] inPlace = (byte[])plain.Clone(), inPlaceTag = new byte[16];
            mine.Encrypt(nonce, inPlace, inPlace, inPlaceTag, aad);
            if (!inPlace.AsSpan().SequenceEqual(b) || !inPlaceTag.AsSpan().SequenceEqual(bTag)) wrong.Add($"seal in place {length}");

            byte[] opened = new byte[length];
            if (!mine.TryDecrypt(nonce, b, bTag, opened, aad) || !opened.AsSpan().SequenceEqual(plain)) wrong.Add($"open {length}");
            byte[] theirs = new byte[length];
            bcl.Decrypt(nonce, a, aTag, theirs, aad);
            if (!theirs.AsSpan().SequenceEqual(plain)) wrong.Add($"BCL open {length}");
        }
        await Assert.That(wrong).IsEmpty();
    }

    [Test]
    [Arguments(true)]
    [Arguments(false)]
    public async Task Refuses_wrong_sizes_and_use_after_dispose(bool native)
    {
        await Assert.That(() => new DeliveryCipher(new byte[31], native)).Throws<ArgumentException>();
        var cipher = new DeliveryCipher(RfcKey, native);
        await Assert.That(() => cipher.Encrypt(new byte[11], new byte[4], new byte[4], new byte[16], [])).Throws<ArgumentException>();
        await Assert.That(() => cipher.Encrypt(new byte[12], new byte[4], new byte[5], new byte[16], [])).Throws<ArgumentException>();
        await Assert.That(() => cipher.Encrypt(new byte[12], new byte[4], new byte[4], new byte[15], [])).Throws<ArgumentException>();
        cipher.Dispose();
        await Assert.That(() => cipher.Encrypt(new byte[12], new byte[4], new byte[4], new byte[16], [])).Throws<ObjectDisposedException>();
    }
    /// <summary>
    /// The relay disposes a subscription's cipher wherever the subscription ends, and a subscription can
    /// end on two threads at once (its connection closing while another connection's SUB takes the queue
    /// or a DEL removes it). Each native context is freed exactly once: a second free of the same
    /// context corrupts the native heap (and usually aborts the process).
    /// </summary>
    [Test]
    public async Task Disposed_on_several_threads_at_once_frees_each_native_context_once()
    {
        const int Ciphers = 20_000;
        int threads = Math.Max(2, Environment.ProcessorCount);
        var ciphers = new DeliveryCipher[Ciphers];
        byte[] nonce = new byte[12], data = new byte[64], tag = new byte[16];
        for (int i = 0; i < Ciphers; i++)
        {
            // Both directions used: a sealing and an opening context to free.
            ciphers[i] = new DeliveryCipher(RfcKey, native: true);
            ciphers[i].Encrypt(nonce, data, data, tag, []);
            ciphers[i].TryDecrypt(nonce, data, tag, data, []);
        }
        // Each cipher is disposed by every thread at the same moment: the threads meet, spinning,
        // before each one (a blocking barrier wakes them one after another, too late to meet).
        int arrived = 0;
        var failures = new System.Collections.Concurrent.ConcurrentQueue<Exception>();
        var workers = Enumerable.Range(0, threads).Select(_ => new Thread(() =>
        {
            for (int round = 1; round <= Ciphers; round++)
            {
                Interlocked.Increment(ref arrived);
                for (int spins = 1; Volatile.Read(ref arrived) < round * threads; spins++)
                {
                    // Yielding now and then lets a thread that has no core of its own arrive.
                    if (spins % 4096 == 0) Thread.Yield();
                    else Thread.SpinWait(1);
                }
                try
                {
                    ciphers[round - 1].Dispose();
                }
                catch (Exception ex)
                {
                    failures.Enqueue(ex);
                }
            }
        })).ToArray();
        foreach (var worker in workers) worker.Start();
        foreach (var worker in workers) worker.Join();

        await Assert.That(failures).IsEmpty();
        await Assert.That(ciphers.All(c => c.IsDisposed)).IsTrue();
        var freedOtherThanTwice = ciphers.Select(c => c.ContextsFreed).Where(n => n != 2).ToList();
        await Assert.That(freedOtherThanTwice).IsEmpty();
    }
}
