using System.Buffers;
using System.Buffers.Binary;
using System.Net;
using System.Text;
using Relay.Server.Connections;

namespace Relay.Server.Tests;

/// <summary>
/// Issue 5, "PROXY protocol and per-source limits": the pure parser against valid and hostile headers
/// (every fixture whole, with trailing bytes, truncated at every offset, split at every offset, one byte
/// per segment; random input never throws).
/// </summary>
public class ProxyProtocolParserTests
{
    public sealed record Expected(int Version, bool IsLocal, string? Source, int SourcePort, string? Destination, int DestinationPort);

    private static byte[] Ascii(string s) => Encoding.ASCII.GetBytes(s);

    /// <summary>A v2 header: signature, version/command byte, family/protocol byte, big-endian length, block.</summary>
    public static byte[] V2(byte versionCommand, byte familyProtocol, byte[] block)
    {
        var bytes = new byte[16 + block.Length];
        ProxyProtocol.V2Signature.CopyTo(bytes);
        bytes[12] = versionCommand;
        bytes[13] = familyProtocol;
        BinaryPrimitives.WriteUInt16BigEndian(bytes.AsSpan(14), (ushort)block.Length);
        block.CopyTo(bytes, 16);
        return bytes;
    }

    /// <summary>A v2 PROXY over TCP from <paramref name="source"/> (IPv4 or IPv6), with optional TLVs.</summary>
    public static byte[] V2Tcp(string source, int sourcePort, string destination, int destinationPort, byte[]? tlvs = null)
    {
        var src = IPAddress.Parse(source).GetAddressBytes();
        var dst = IPAddress.Parse(destination).GetAddressBytes();
        var block = new List<byte>();
        block.AddRange(src);
        block.AddRange(dst);
        block.Add((byte)(sourcePort >> 8)); block.Add((byte)sourcePort);
        block.Add((byte)(destinationPort >> 8)); block.Add((byte)destinationPort);
        block.AddRange(tlvs ?? []);
        return V2(0x21, (byte)(src.Length == 4 ? 0x11 : 0x21), [.. block]);
    }

    private static byte[] Tlv(byte type, byte[] value) => [type, (byte)(value.Length >> 8), (byte)value.Length, .. value];

    public static readonly Dictionary<string, (byte[] Bytes, Expected Expected)> Valid = new()
    {
        ["v1-tcp4"] = (Ascii("PROXY TCP4 192.0.2.10 198.51.100.1 56324 443\r\n"), new(1, false, "192.0.2.10", 56324, "198.51.100.1", 443)),
        ["v1-tcp4-zero-port"] = (Ascii("PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n"), new(1, false, "0.0.0.0", 0, "255.255.255.255", 65535)),
        ["v1-tcp6"] = (Ascii("PROXY TCP6 2001:db8::1 2001:db8::2 65535 5223\r\n"), new(1, false, "2001:db8::1", 65535, "2001:db8::2", 5223)),
        ["v1-tcp6-mapped"] = (Ascii("PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2\r\n"), new(1, false, "::ffff:192.0.2.1", 1, "::1", 2)),
        ["v1-tcp6-longest"] = (Ascii("PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"),
            new(1, false, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)),
        // What Tor sends with HiddenServiceExportCircuitID haproxy: the circuit id in the source address.
        ["v1-tor-circuit"] = (Ascii("PROXY TCP6 fc00:dead:beef:4dad::0:1b ::1 27 5223\r\n"), new(1, false, "fc00:dead:beef:4dad::1b", 27, "::1", 5223)),
        ["v1-unknown"] = (Ascii("PROXY UNKNOWN\r\n"), new(1, false, null, 0, null, 0)),
        ["v1-unknown-with-fields"] = (Ascii("PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"), new(1, false, null, 0, null, 0)),
        ["v2-ipv4"] = (V2Tcp("203.0.113.7", 40000, "10.0.0.1", 443), new(2, false, "203.0.113.7", 40000, "10.0.0.1", 443)),
        ["v2-ipv6"] = (V2Tcp("2001:db8:1:2::42", 1, "2001:db8::1", 5223), new(2, false, "2001:db8:1:2::42", 1, "2001:db8::1", 5223)),
        ["v2-ipv4-tlvs"] = (V2Tcp("203.0.113.8", 65535, "10.0.0.1", 443,
            [.. Tlv(0x01, Ascii("relay/1")), .. Tlv(0x04, new byte[40]), .. Tlv(0x05, Ascii("unique-id")), .. Tlv(0x20, [0x07, 0, 0, 0, 0])]),
            new(2, false, "203.0.113.8", 65535, "10.0.0.1", 443)),
        ["v2-local"] = (V2(0x20, 0x00, []), new(2, true, null, 0, null, 0)),
        ["v2-local-with-block"] = (V2(0x20, 0x11, new byte[12]), new(2, true, null, 0, null, 0)),
        ["v2-local-unknown-family"] = (V2(0x20, 0xFF, [1, 2, 3]), new(2, true, null, 0, null, 0)),
        ["v2-unspec"] = (V2(0x21, 0x00, []), new(2, false, null, 0, null, 0)),
        ["v2-unspec-tlvs"] = (V2(0x21, 0x00, Tlv(0x04, [0, 0, 0])), new(2, false, null, 0, null, 0)),
        ["v2-unix"] = (V2(0x21, 0x31, new byte[216]), new(2, false, null, 0, null, 0)),
        ["v2-unix-unspec-protocol"] = (V2(0x21, 0x30, new byte[216]), new(2, false, null, 0, null, 0)),
    };

    public static IEnumerable<string> ValidNames() => Valid.Keys;

    /// <summary>Bytes that follow the header: the start of a TLS ClientHello.</summary>
    private static readonly byte[] Trailing = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xFC, 0x03, 0x03, (byte)'\r', (byte)'\n'];

    private static async Task AssertHeader(OperationStatus status, ProxyHeader header, int consumed, byte[] bytes, Expected e)
    {
        await Assert.That(status).IsEqualTo(OperationStatus.Done);
        await Assert.That(consumed).IsEqualTo(bytes.Length);
        await Assert.That(header.Version).IsEqualTo(e.Version);
        await Assert.That(header.IsLocal).IsEqualTo(e.IsLocal);
        await Assert.That(header.Source?.Address).IsEqualTo(e.Source is null ? null : IPAddress.Parse(e.Source));
        await Assert.That(header.Source?.Port ?? 0).IsEqualTo(e.SourcePort);
        await Assert.That(header.Destination?.Address).IsEqualTo(e.Destination is null ? null : IPAddress.Parse(e.Destination));
        await Assert.That(header.Destination?.Port ?? 0).IsEqualTo(e.DestinationPort);
        // Privacy: the header never prints its addresses.
        if (e.Source != null)
        {
            await Assert.That(header.ToString()).DoesNotContain(e.Source);
        }
    }

    [Test]
    [MethodDataSource(nameof(ValidNames))]
    public async Task Valid_header_whole_and_with_trailing_bytes(string name)
    {
        var (bytes, expected) = Valid[name];
        var status = ProxyProtocol.TryParse(new ReadOnlySequence<byte>(bytes), out var header, out int consumed);
        await AssertHeader(status, header, consumed, bytes, expected);

        byte[] followed = [.. bytes, .. Trailing];
        status = ProxyProtocol.TryParse(new ReadOnlySequence<byte>(followed), out header, out consumed);
        await AssertHeader(status, header, consumed, bytes, expected);
    }

    [Test]
    [MethodDataSource(nameof(ValidNames))]
    public async Task Valid_header_truncated_at_every_offset_needs_more_data(string name)
    {
        var (bytes, _) = Valid[name];
        for (int length = 0; length < bytes.Length; length++)
        {
            var status = ProxyProtocol.TryParse(new ReadOnlySequence<byte>(bytes, 0, length), out _, out int consumed);
            if (status != OperationStatus.NeedMoreData)
            {
                Assert.Fail($"{name} truncated to {length} bytes: {status}");
            }
            await Assert.That(consumed).IsEqualTo(0);
        }
    }

    [Test]
    [MethodDataSource(nameof(ValidNames))]
    public async Task Valid_header_split_at_every_offset_and_one_byte_per_segment(string name)
    {
        var (bytes, expected) = Valid[name];
        byte[] followed = [.. bytes, .. Trailing];
        for (int cut = 1; cut < followed.Length; cut++)
        {
            var sequence = Segments.Of(followed[..cut], followed[cut..]);
            var status = ProxyProtocol.TryParse(sequence, out var header, out int consumed);
            await AssertHeader(status, header, consumed, bytes, expected);
        }
        var bytewise = Segments.Of([.. followed.Select(b => new[] { b })]);
        var s = ProxyProtocol.TryParse(bytewise, out var h, out int c);
        await AssertHeader(s, h, c, bytes, expected);
    }

    public static IEnumerable<(string Name, byte[] Bytes)> Hostile()
    {
        // Wrong signature: other protocols, near misses.
        yield return ("tls-client-hello", [0x16, 0x03, 0x01, 0x00, 0xA5, 0x01, 0x00]);
        yield return ("http", Ascii("GET / HTTP/1.1\r\n"));
        yield return ("post", Ascii("POST / HTTP/1.1\r\n"));
        yield return ("lower-case", Ascii("proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n"));
        yield return ("proxz", Ascii("PROXZ TCP4 1.2.3.4 5.6.7.8 1 2\r\n"));
        yield return ("no-space", Ascii("PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n"));
        var signature = V2Tcp("1.2.3.4", 1, "5.6.7.8", 2);
        for (int i = 0; i < 12; i++)
        {
            var bad = (byte[])signature.Clone();
            bad[i] ^= 0x40;
            yield return ($"v2-signature-byte-{i}", bad);
        }
        // Version 1 with bad fields.
        yield return ("v1-unknown-protocol", Ascii("PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n"));
        yield return ("v1-udp", Ascii("PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n"));
        yield return ("v1-empty", Ascii("PROXY \r\n"));
        yield return ("v1-unknownx", Ascii("PROXY UNKNOWNX\r\n"));
        yield return ("v1-ipv4-octet-256", Ascii("PROXY TCP4 256.0.0.1 5.6.7.8 1 2\r\n"));
        yield return ("v1-ipv4-three-octets", Ascii("PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n"));
        yield return ("v1-ipv4-five-octets", Ascii("PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n"));
        yield return ("v1-ipv4-leading-zero", Ascii("PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n"));
        yield return ("v1-ipv4-empty-octet", Ascii("PROXY TCP4 1..3.4 5.6.7.8 1 2\r\n"));
        yield return ("v1-ipv4-hex", Ascii("PROXY TCP4 0x7f.0.0.1 5.6.7.8 1 2\r\n"));
        yield return ("v1-ipv4-single-number", Ascii("PROXY TCP4 16909060 5.6.7.8 1 2\r\n"));
        yield return ("v1-ipv6-in-tcp4", Ascii("PROXY TCP4 ::1 ::1 1 2\r\n"));
        yield return ("v1-ipv4-in-tcp6", Ascii("PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n"));
        yield return ("v1-ipv6-zone", Ascii("PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n"));
        yield return ("v1-ipv6-brackets", Ascii("PROXY TCP6 [::1] ::1 1 2\r\n"));
        yield return ("v1-ipv6-bad", Ascii("PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n"));
        yield return ("v1-ipv6-triple-colon", Ascii("PROXY TCP6 1:::2 ::1 1 2\r\n"));
        yield return ("v1-port-65536", Ascii("PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n"));
        yield return ("v1-port-99999", Ascii("PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n"));
        yield return ("v1-port-six-digits", Ascii("PROXY TCP4 1.2.3.4 5.6.7.8 1 100000\r\n"));
        yield return ("v1-port-negative", Ascii("PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n"));
        yield return ("v1-port-plus", Ascii("PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n"));
        yield return ("v1-port-leading-zero", Ascii("PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n"));
        yield return ("v1-port-hex", Ascii("PROXY TCP4 1.2.3.4 5.6.7.8 0x50 2\r\n"));
        yield return ("v1-three-fields", Ascii("PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"));
        yield return ("v1-five-fields", Ascii("PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n"));
        yield return ("v1-trailing-space", Ascii("PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n"));
        yield return ("v1-double-space", Ascii("PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n"));
        yield return ("v1-tab", Ascii("PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n"));
        yield return ("v1-missing-cr", Ascii("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"));
        yield return ("v1-cr-cr-lf", Ascii("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n"));
        yield return ("v1-cr-without-lf", Ascii("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX"));
        yield return ("v1-nul", Ascii("PROXY TCP4 1.2.3.4\0 5.6.7.8 1 2\r\n"));
        yield return ("v1-high-byte", [.. Ascii("PROXY TCP4 1.2.3.4 5.6.7.8 1 2"), 0xC3, 0xA9, 13, 10]);
        yield return ("v1-unknown-with-control", Ascii("PROXY UNKNOWN \u0001\r\n"));
        // Oversized version 1: no line end within 107 bytes, or a line end past it.
        yield return ("v1-107-bytes-no-lf", Ascii("PROXY " + new string('A', 101)));
        yield return ("v1-108-byte-line", Ascii("PROXY UNKNOWN " + new string('A', 92) + "\r\n"));
        yield return ("v1-endless", Ascii("PROXY TCP4 " + new string('1', 500)));
        // Version 2: bad version, command, family, protocol, lengths, TLVs.
        yield return ("v2-version-1", V2(0x11, 0x11, new byte[12]));
        yield return ("v2-version-3", V2(0x31, 0x11, new byte[12]));
        yield return ("v2-command-2", V2(0x22, 0x11, new byte[12]));
        yield return ("v2-command-15", V2(0x2F, 0x11, new byte[12]));
        yield return ("v2-family-4", V2(0x21, 0x41, new byte[12]));
        yield return ("v2-family-15", V2(0x21, 0xF1, new byte[12]));
        yield return ("v2-protocol-3", V2(0x21, 0x13, new byte[12]));
        yield return ("v2-inet-dgram", V2(0x21, 0x12, new byte[12]));
        yield return ("v2-inet-unspec-protocol", V2(0x21, 0x10, new byte[12]));
        yield return ("v2-inet6-dgram", V2(0x21, 0x22, new byte[36]));
        yield return ("v2-inet-block-11", V2(0x21, 0x11, new byte[11]));
        yield return ("v2-inet6-block-35", V2(0x21, 0x21, new byte[35]));
        yield return ("v2-inet6-block-12", V2(0x21, 0x21, new byte[12]));
        yield return ("v2-unix-block-215", V2(0x21, 0x31, new byte[215]));
        yield return ("v2-torn-tlv-header", V2Tcp("1.2.3.4", 1, "5.6.7.8", 2, [0x04, 0x00]));
        yield return ("v2-torn-tlv-value", V2Tcp("1.2.3.4", 1, "5.6.7.8", 2, [0x04, 0x00, 0x0A, 1, 2, 3, 4, 5]));
        yield return ("v2-oversized-4097", OversizedV2(4097));
        yield return ("v2-oversized-65535", OversizedV2(65535));
    }

    /// <summary>Only the 16 fixed bytes of a header claiming <paramref name="length"/>: refused before the body.</summary>
    private static byte[] OversizedV2(int length)
    {
        var bytes = V2(0x21, 0x11, []);
        BinaryPrimitives.WriteUInt16BigEndian(bytes.AsSpan(14), (ushort)length);
        return bytes;
    }

    public static IEnumerable<string> HostileNames() => Hostile().Select(h => h.Name);

    [Test]
    [MethodDataSource(nameof(HostileNames))]
    public async Task Hostile_header_is_invalid_whole_split_and_followed(string name)
    {
        var bytes = Hostile().Single(h => h.Name == name).Bytes;
        foreach (var sequence in new[] { new ReadOnlySequence<byte>(bytes), new ReadOnlySequence<byte>([.. bytes, .. Trailing, .. new byte[200]]),
                     Segments.Of([.. bytes.Select(b => new[] { b })]) })
        {
            var status = ProxyProtocol.TryParse(sequence, out _, out int consumed);
            await Assert.That(status).IsEqualTo(OperationStatus.InvalidData);
            await Assert.That(consumed).IsEqualTo(0);
        }
        // No prefix of hostile input is ever a complete header.
        for (int length = 0; length < bytes.Length; length++)
        {
            var status = ProxyProtocol.TryParse(new ReadOnlySequence<byte>(bytes, 0, length), out _, out _);
            if (status == OperationStatus.Done)
            {
                Assert.Fail($"{name} truncated to {length} bytes parsed as a header");
            }
        }
    }

    [Test]
    public async Task V1_waits_until_107_bytes_and_no_longer()
    {
        var line = Ascii("PROXY " + new string('A', 200));
        await Assert.That(ProxyProtocol.TryParse(line.AsSpan(0, 106), out _, out _)).IsEqualTo(OperationStatus.NeedMoreData);
        await Assert.That(ProxyProtocol.TryParse(line.AsSpan(0, 107), out _, out _)).IsEqualTo(OperationStatus.InvalidData);
    }

    [Test]
    public async Task V2_length_is_checked_before_the_body_is_awaited()
    {
        // 4096 is within the bound: the parser waits for the body.
        var header = V2(0x21, 0x11, []);
        BinaryPrimitives.WriteUInt16BigEndian(header.AsSpan(14), 4096);
        await Assert.That(ProxyProtocol.TryParse(header, out _, out _)).IsEqualTo(OperationStatus.NeedMoreData);
        var atLimit = V2Tcp("1.2.3.4", 1, "5.6.7.8", 2, Tlv(0x04, new byte[4096 - 12 - 3]));
        await Assert.That(ProxyProtocol.TryParse(atLimit, out _, out int consumed)).IsEqualTo(OperationStatus.Done);
        await Assert.That(consumed).IsEqualTo(16 + 4096);
        // One byte more is refused from the 16 fixed bytes alone.
        BinaryPrimitives.WriteUInt16BigEndian(header.AsSpan(14), 4097);
        await Assert.That(ProxyProtocol.TryParse(header, out _, out _)).IsEqualTo(OperationStatus.InvalidData);
    }

    [Test]
    public async Task Random_and_mutated_input_never_throws_nor_reads_past_the_buffer()
    {
        var random = new Random(20260505);
        var seeds = Valid.Values.Select(v => v.Bytes).Concat(Hostile().Select(h => h.Bytes)).ToArray();
        int done = 0;
        for (int i = 0; i < 100_000; i++)
        {
            byte[] input;
            switch (i % 4)
            {
                case 0:
                    input = new byte[random.Next(0, 300)];
                    random.NextBytes(input);
                    break;
                case 1:
                    input = [.. "PROXY "u8, .. RandomPrintable(random, random.Next(0, 120))];
                    break;
                case 2:
                    var tail = new byte[random.Next(0, 300)];
                    random.NextBytes(tail);
                    input = [.. ProxyProtocol.V2Signature, .. tail];
                    break;
                default:
                    input = (byte[])seeds[random.Next(seeds.Length)].Clone();
                    for (int m = random.Next(1, 4); m > 0 && input.Length > 0; m--)
                    {
                        input[random.Next(input.Length)] = (byte)random.Next(256);
                    }
                    input = input[..random.Next(input.Length + 1)];
                    break;
            }
            var status = ProxyProtocol.TryParse(input, out _, out int consumed);
            int cut = input.Length == 0 ? 0 : random.Next(input.Length);
            var split = ProxyProtocol.TryParse(Segments.Of(input[..cut], input[cut..]), out _, out int splitConsumed);
            if (split != status || splitConsumed != consumed)
            {
                Assert.Fail($"input {Convert.ToHexString(input)} split at {cut}: {split}/{splitConsumed} vs {status}/{consumed}");
            }
            if (status == OperationStatus.Done ? consumed <= 0 || consumed > input.Length : consumed != 0)
            {
                Assert.Fail($"input {Convert.ToHexString(input)}: {status} consumed {consumed}");
            }
            if (status == OperationStatus.Done) done++;
        }
        await Assert.That(done).IsGreaterThan(0);
    }

    private static byte[] RandomPrintable(Random random, int length)
    {
        const string alphabet = "TCP46UNKOWabcdef0123456789:. \r\n";
        var bytes = new byte[length];
        for (int i = 0; i < length; i++) bytes[i] = (byte)alphabet[random.Next(alphabet.Length)];
        return bytes;
    }
}

/// <summary>Builds multi-segment sequences for the fragmentation matrix.</summary>
internal static class Segments
{
    private sealed class Segment : ReadOnlySequenceSegment<byte>
    {
        public Segment(ReadOnlyMemory<byte> memory, long runningIndex)
        {
            Memory = memory;
            RunningIndex = runningIndex;
        }

        public Segment Append(ReadOnlyMemory<byte> memory)
        {
            var next = new Segment(memory, RunningIndex + Memory.Length);
            Next = next;
            return next;
        }
    }

    public static ReadOnlySequence<byte> Of(params byte[][] parts)
    {
        if (parts.Length == 0)
        {
            return ReadOnlySequence<byte>.Empty;
        }
        var first = new Segment(parts[0], 0);
        var last = first;
        foreach (var part in parts.Skip(1))
        {
            last = last.Append(part);
        }
        return new ReadOnlySequence<byte>(first, 0, last, last.Memory.Length);
    }
}

/// <summary>
/// A stand-in for haproxy: accepts TCP on loopback, connects to the relay, writes a PROXY header naming
/// the declared source, then copies bytes both ways. Modes: header alone; header and the client's first
/// bytes (the TLS ClientHello) in one write; header one byte per write.
/// </summary>
public sealed class HeaderProxy : IAsyncDisposable
{
    public enum Mode { Separate, Coalesced, Trickled }

    private readonly System.Net.Sockets.TcpListener _listener = new(IPAddress.Loopback, 0);
    private readonly IPEndPoint _target;
    private readonly byte[] _header;
    private readonly Mode _mode;
    private readonly CancellationTokenSource _stop = new();
    private readonly Task _accept;

    public int Port => ((IPEndPoint)_listener.LocalEndpoint).Port;

    public HeaderProxy(IPEndPoint target, byte[] header, Mode mode = Mode.Separate)
    {
        _target = target;
        _header = header;
        _mode = mode;
        _listener.Start();
        _accept = AcceptAsync();
    }

    public static byte[] V1(string source, int port = 40000) =>
        Encoding.ASCII.GetBytes($"PROXY {(source.Contains(':') ? "TCP6" : "TCP4")} {source} {(source.Contains(':') ? "::1" : "127.0.0.1")} {port} 5223\r\n");

    public static byte[] V2(string source, int port = 40000) =>
        ProxyProtocolParserTests.V2Tcp(source, port, source.Contains(':') ? "::1" : "127.0.0.1", 5223);

    public static byte[] V2Local() => ProxyProtocolParserTests.V2(0x20, 0x00, []);

    /// <summary>The relay's address with this proxy's port: what a client dials.</summary>
    public Relay.Protocol.RelayAddress AddressOf(TestRelay relay) => relay.Address with { Hosts = ["127.0.0.1"], Port = Port };

    private async Task AcceptAsync()
    {
        try
        {
            while (true)
            {
                var client = await _listener.AcceptTcpClientAsync(_stop.Token);
                _ = ForwardAsync(client);
            }
        }
        catch (Exception ex) when (ex is OperationCanceledException or ObjectDisposedException or System.Net.Sockets.SocketException)
        {
        }
    }

    private async Task ForwardAsync(System.Net.Sockets.TcpClient client)
    {
        using (client)
        using (var upstream = new System.Net.Sockets.TcpClient { NoDelay = true })
        {
            try
            {
                await upstream.ConnectAsync(_target, _stop.Token);
                var up = upstream.GetStream();
                var down = client.GetStream();
                switch (_mode)
                {
                    case Mode.Separate:
                        await up.WriteAsync(_header, _stop.Token);
                        break;
                    case Mode.Coalesced:
                        var first = new byte[16 * 1024];
                        int n = await down.ReadAsync(first, _stop.Token);
                        await up.WriteAsync((byte[])[.. _header, .. first.AsSpan(0, n)], _stop.Token);
                        break;
                    case Mode.Trickled:
                        foreach (byte b in _header)
                        {
                            await up.WriteAsync(new[] { b }, _stop.Token);
                            await up.FlushAsync(_stop.Token);
                            await Task.Delay(2, _stop.Token);
                        }
                        break;
                }
                var copies = new[] { down.CopyToAsync(up, _stop.Token), up.CopyToAsync(down, _stop.Token) };
                await Task.WhenAny(copies);
                // The other copy fails once the sockets close: looked at, so it is not left unobserved.
                foreach (var copy in copies) _ = copy.ContinueWith(static t => _ = t.Exception, TaskContinuationOptions.OnlyOnFaulted);
            }
            catch (Exception ex) when (ex is OperationCanceledException or IOException or ObjectDisposedException or System.Net.Sockets.SocketException)
            {
            }
        }
    }

    public async ValueTask DisposeAsync()
    {
        _stop.Cancel();
        _listener.Stop();
        await _accept;
    }
}

/// <summary>
/// Issue 5, in process over real TCP and TLS: a relay with the PROXY protocol behind <see cref="HeaderProxy"/>;
/// connections without a header closed and counted; the per-source connection limit and queue-creation rate.
/// </summary>
public class ProxyProtocolServerTests
{
    internal static async Task<Relay.Client.Transport.RelayConnection> ConnectThroughAsync(TestRelay relay, HeaderProxy proxy) =>
        await Relay.Client.Transport.RelayConnection.ConnectAsync(proxy.AddressOf(relay),
            new Relay.Client.Transport.RelayConnectionOptions { ConnectTimeout = TimeSpan.FromSeconds(10) });

    private static async Task<bool> FailsToConnectAsync(Func<Task<Relay.Client.Transport.RelayConnection>> connect)
    {
        try
        {
            await using var connection = await connect();
            // Connected: make sure the relay did not close it right after the handshake.
            await connection.PingAsync();
            return false;
        }
        catch (Exception)
        {
            return true;
        }
    }

    private static async Task<double> RejectedAsync(TestRelay relay, string reason) =>
        OperationsMetrics.Value(await OperationsMetrics.ScrapeAsync(relay), "relay_connections_rejected_total", $"reason=\"{reason}\"");

    private static async Task ExchangeAsync(Relay.Client.Transport.RelayConnection recipient, Relay.Client.Transport.RelayConnection sender, string text)
    {
        var queue = await recipient.CreateQueueAsync();
        var senderKey = new byte[32];
        Relay.Protocol.RelayCrypto.GenerateKeyPair(senderKey, new byte[32]);
        await sender.SecureAsync(queue.SenderId, senderKey);
        await sender.SendAsync(new Relay.Client.Transport.SenderQueue(queue.SenderId, senderKey), Encoding.UTF8.GetBytes(text));
        var got = await recipient.GetAsync(queue);
        await Assert.That(got).IsNotNull();
        await Assert.That(Encoding.UTF8.GetString(got!.Body)).IsEqualTo(text);
        await recipient.AckAsync(queue, got.MessageId);
        await Assert.That(await recipient.GetAsync(queue)).IsNull();
        await recipient.DeleteAsync(queue);
    }

    [Test]
    [Arguments(1, HeaderProxy.Mode.Separate)]
    [Arguments(2, HeaderProxy.Mode.Separate)]
    [Arguments(1, HeaderProxy.Mode.Coalesced)]
    [Arguments(2, HeaderProxy.Mode.Coalesced)]
    [Arguments(1, HeaderProxy.Mode.Trickled)]
    [Arguments(2, HeaderProxy.Mode.Trickled)]
    public async Task Full_exchange_through_a_proxy_that_sends_a_header(int version, HeaderProxy.Mode mode)
    {
        await using var relay = await TestRelay.StartAsync(o => o.ProxyProtocol = true);
        const string source = "203.0.113.77";
        await using var proxy = new HeaderProxy(relay.Server.RelayEndPoint, version == 1 ? HeaderProxy.V1(source) : HeaderProxy.V2(source), mode);
        await using var recipient = await ConnectThroughAsync(relay, proxy);
        await using var sender = await ConnectThroughAsync(relay, proxy);
        await ExchangeAsync(recipient, sender, $"through PROXY v{version} {mode}");

        await Assert.That(await RejectedAsync(relay, "proxy_header")).IsEqualTo(0);
        // The declared source lives in memory only: no log line names it (the relay's own address, printed
        // at start, is the only IP address in its logs).
        await Assert.That(relay.Logs.Lines.Any(l => l.Contains(source))).IsFalse();
        await Assert.That(relay.Logs.Lines.Count(l => l.Contains("127.0.0.1"))).IsEqualTo(relay.Logs.Lines.Count(l => l.Contains("Relay ready at")));
    }

    [Test]
    public async Task V2_local_command_is_accepted_with_no_source()
    {
        await using var relay = await TestRelay.StartAsync(o => o.ProxyProtocol = true);
        await using var proxy = new HeaderProxy(relay.Server.RelayEndPoint, HeaderProxy.V2Local());
        await using var connection = await ConnectThroughAsync(relay, proxy);
        await connection.PingAsync();
        await Assert.That(await RejectedAsync(relay, "proxy_header")).IsEqualTo(0);
    }

    [Test]
    public async Task Without_a_header_the_connection_is_closed_and_counted()
    {
        await using var relay = await TestRelay.StartAsync(o => o.ProxyProtocol = true);
        // A client that speaks TLS straight away: its ClientHello is not a PROXY header.
        await Assert.That(await FailsToConnectAsync(() => relay.ConnectAsync())).IsTrue();
        await Assert.That(await OperationsMetrics.EventuallyAsync(async () => await RejectedAsync(relay, "proxy_header") == 1, 10)).IsTrue();
        await Assert.That(OperationsMetrics.Value(await OperationsMetrics.ScrapeAsync(relay), "relay_connections_accepted_total")).IsEqualTo(0);
    }

    [Test]
    [Arguments("PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n")]
    [Arguments("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n")]
    [Arguments("PROXY TCP4 1.2.3")]
    public async Task Malformed_or_incomplete_header_closes_the_connection(string header)
    {
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.ProxyProtocol = true;
            o.ProxyHeaderTimeout = TimeSpan.FromMilliseconds(500);
        });
        using var tcp = new System.Net.Sockets.TcpClient();
        await tcp.ConnectAsync(relay.Server.RelayEndPoint);
        var stream = tcp.GetStream();
        await stream.WriteAsync(Encoding.ASCII.GetBytes(header));
        // Closed (by the malformed header at once, or the incomplete one at the timeout) without a byte sent.
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(5));
        int read;
        try
        {
            read = await stream.ReadAsync(new byte[16], cts.Token);
        }
        catch (IOException)
        {
            read = 0;
        }
        await Assert.That(read).IsEqualTo(0);
        await Assert.That(await OperationsMetrics.EventuallyAsync(async () => await RejectedAsync(relay, "proxy_header") == 1, 10)).IsTrue();
    }

    [Test]
    public async Task A_peer_that_closes_before_sending_a_byte_is_not_counted_as_a_header_failure()
    {
        await using var relay = await TestRelay.StartAsync(o => o.ProxyProtocol = true);
        // What a proxy does when its client gives up at once, or a port probe: connect, close.
        for (int i = 0; i < 3; i++)
        {
            using var tcp = new System.Net.Sockets.TcpClient();
            await tcp.ConnectAsync(relay.Server.RelayEndPoint);
        }
        await Assert.That(await OperationsMetrics.EventuallyAsync(
            () => Task.FromResult(relay.Logs.Lines.Count(l => l.Contains("proxy_header_closed")) == 3), 10)).IsTrue();
        await Assert.That(await RejectedAsync(relay, "proxy_header")).IsEqualTo(0);
    }

    [Test]
    public async Task Silent_connection_is_closed_at_the_header_timeout()
    {
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.ProxyProtocol = true;
            o.ProxyHeaderTimeout = TimeSpan.FromMilliseconds(300);
        });
        using var tcp = new System.Net.Sockets.TcpClient();
        await tcp.ConnectAsync(relay.Server.RelayEndPoint);
        var started = System.Diagnostics.Stopwatch.StartNew();
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(5));
        int read;
        try
        {
            read = await tcp.GetStream().ReadAsync(new byte[16], cts.Token);
        }
        catch (IOException)
        {
            read = 0;
        }
        await Assert.That(read).IsEqualTo(0);
        await Assert.That(started.Elapsed).IsLessThan(TimeSpan.FromSeconds(4));
        await Assert.That(await OperationsMetrics.EventuallyAsync(async () => await RejectedAsync(relay, "proxy_header") == 1, 10)).IsTrue();
    }

    [Test]
    [Arguments(1)]
    [Arguments(2)]
    public async Task Per_source_connection_limit_refuses_one_declared_source_while_another_connects(int version)
    {
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.ProxyProtocol = true;
            o.MaxConnectionsPerSource = 2;
        });
        Func<string, byte[]> header = version == 1 ? s => HeaderProxy.V1(s) : s => HeaderProxy.V2(s);
        await using var fromA = new HeaderProxy(relay.Server.RelayEndPoint, header("198.51.100.1"));
        await using var fromB = new HeaderProxy(relay.Server.RelayEndPoint, header("198.51.100.2"));

        var a1 = await ConnectThroughAsync(relay, fromA);
        await using var a2 = await ConnectThroughAsync(relay, fromA);
        await Assert.That(await FailsToConnectAsync(() => ConnectThroughAsync(relay, fromA))).IsTrue();
        await Assert.That(await RejectedAsync(relay, "max_connections_per_source")).IsEqualTo(1);

        // Another source is not affected, and the first ones keep working.
        await using var b1 = await ConnectThroughAsync(relay, fromB);
        await b1.PingAsync();
        await a2.PingAsync();

        // A closed connection frees its place.
        await a1.DisposeAsync();
        bool reconnected = await OperationsMetrics.EventuallyAsync(async () => !await FailsToConnectAsync(() => ConnectThroughAsync(relay, fromA)), 10);
        await Assert.That(reconnected).IsTrue();
    }

    [Test]
    public async Task Ipv6_sources_count_by_their_64_prefix()
    {
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.ProxyProtocol = true;
            o.MaxConnectionsPerSource = 1;
        });
        await using var host1 = new HeaderProxy(relay.Server.RelayEndPoint, HeaderProxy.V2("2001:db8:1:2::1"));
        await using var sameNetwork = new HeaderProxy(relay.Server.RelayEndPoint, HeaderProxy.V1("2001:db8:1:2:ffff:ffff:ffff:ffff"));
        await using var otherNetwork = new HeaderProxy(relay.Server.RelayEndPoint, HeaderProxy.V2("2001:db8:1:3::1"));
        // Tor circuits (HiddenServiceExportCircuitID): private addresses count whole, one per circuit.
        await using var circuit1 = new HeaderProxy(relay.Server.RelayEndPoint, HeaderProxy.V1("fc00:dead:beef:4dad::0:1b"));
        await using var circuit2 = new HeaderProxy(relay.Server.RelayEndPoint, HeaderProxy.V1("fc00:dead:beef:4dad::0:1c"));

        await using var c1 = await ConnectThroughAsync(relay, host1);
        await Assert.That(await FailsToConnectAsync(() => ConnectThroughAsync(relay, sameNetwork))).IsTrue();
        await using var c2 = await ConnectThroughAsync(relay, otherNetwork);
        await using var c3 = await ConnectThroughAsync(relay, circuit1);
        await using var c4 = await ConnectThroughAsync(relay, circuit2);
        await c4.PingAsync();
    }

    [Test]
    public async Task Queue_creation_rate_limit_answers_LIMIT_per_declared_source()
    {
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.ProxyProtocol = true;
            o.QueueCreationBurst = 3;
            o.QueueCreationRate = 1;
        });
        await using var fromA = new HeaderProxy(relay.Server.RelayEndPoint, HeaderProxy.V2("192.0.2.1"));
        await using var fromB = new HeaderProxy(relay.Server.RelayEndPoint, HeaderProxy.V1("192.0.2.2"));
        await using var a = await ConnectThroughAsync(relay, fromA);
        for (int i = 0; i < 3; i++)
        {
            await a.CreateQueueAsync();
        }
        var refused = await Assert.ThrowsAsync<Relay.Client.Transport.RelayErrorException>(() => a.CreateQueueAsync());
        await Assert.That(refused!.Code).IsEqualTo(Relay.Protocol.ErrorCode.Limit);
        // The bucket belongs to the source, not the connection: a new connection from A is refused too.
        await using var a2 = await ConnectThroughAsync(relay, fromA);
        var again = await Assert.ThrowsAsync<Relay.Client.Transport.RelayErrorException>(() => a2.CreateQueueAsync());
        await Assert.That(again!.Code).IsEqualTo(Relay.Protocol.ErrorCode.Limit);
        // The connection goes on, and another source still creates queues.
        await a.PingAsync();
        await using var b = await ConnectThroughAsync(relay, fromB);
        await b.CreateQueueAsync();
    }

    [Test]
    public async Task Without_the_proxy_protocol_the_socket_peer_is_the_source()
    {
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.MaxConnectionsPerSource = 2;
            o.QueueCreationBurst = 1;
            o.QueueCreationRate = 1;
        });
        await using var c1 = await relay.ConnectAsync();
        await using var c2 = await relay.ConnectAsync();
        await Assert.That(await FailsToConnectAsync(() => relay.ConnectAsync())).IsTrue();
        await Assert.That(await RejectedAsync(relay, "max_connections_per_source")).IsEqualTo(1);

        await c1.CreateQueueAsync();
        var refused = await Assert.ThrowsAsync<Relay.Client.Transport.RelayErrorException>(() => c2.CreateQueueAsync());
        await Assert.That(refused!.Code).IsEqualTo(Relay.Protocol.ErrorCode.Limit);
    }

    [Test]
    public async Task Limits_off_with_zero()
    {
        await using var relay = await TestRelay.StartAsync(o =>
        {
            o.ProxyProtocol = true;
            o.MaxConnectionsPerSource = 0;
            o.QueueCreationRate = 0;
            o.QueueCreationBurst = 1;
        });
        await using var proxy = new HeaderProxy(relay.Server.RelayEndPoint, HeaderProxy.V1("192.0.2.9"));
        var connections = new List<Relay.Client.Transport.RelayConnection>();
        try
        {
            for (int i = 0; i < 5; i++)
            {
                connections.Add(await ConnectThroughAsync(relay, proxy));
            }
            for (int i = 0; i < 5; i++)
            {
                await connections[i].CreateQueueAsync();
            }
        }
        finally
        {
            foreach (var c in connections) await c.DisposeAsync();
        }
    }
}
