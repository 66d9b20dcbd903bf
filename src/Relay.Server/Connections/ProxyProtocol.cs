using System.Buffers;
using System.Buffers.Binary;
using System.Net;
using System.Net.Sockets;
using System.Text;

namespace Relay.Server.Connections;

/// <summary>
/// What a PROXY protocol header says: the client's address as the proxy saw it, or none (a v2 LOCAL
/// command such as a proxy's health check, v1 UNKNOWN, v2 UNSPEC or UNIX). ToString prints no address.
/// </summary>
public readonly struct ProxyHeader(int version, bool isLocal, IPEndPoint? source, IPEndPoint? destination)
{
    /// <summary>1 (text) or 2 (binary).</summary>
    public int Version { get; } = version;

    /// <summary>A v2 LOCAL command: the proxy speaks for itself (health checks); no client address.</summary>
    public bool IsLocal { get; } = isLocal;

    /// <summary>The client's address and port; null when the header names none.</summary>
    public IPEndPoint? Source { get; } = source;

    /// <summary>The address the client connected to on the proxy; null when the header names none.</summary>
    public IPEndPoint? Destination { get; } = destination;

    public override string ToString() => $"PROXY v{Version}{(IsLocal ? " LOCAL" : "")}";
}

/// <summary>
/// Parser of the PROXY protocol header (haproxy's proxy-protocol.txt, versions 1 and 2) that a proxy
/// sends before anything else on a connection. Pure and synchronous: no I/O, no exceptions for bad
/// input, never reads past the header (the bytes after it belong to TLS).
/// </summary>
public static class ProxyProtocol
{
    /// <summary>The specification's limit of a v1 line, "PROXY" to CRLF included.</summary>
    public const int MaxV1Length = 107;

    /// <summary>
    /// Largest v2 address block (addresses plus TLVs) accepted. The addresses take at most 216 bytes
    /// (UNIX); haproxy's TLVs (ALPN, authority, unique id, SSL details) stay well under 1 KiB. 4 KiB
    /// leaves room for any real proxy while a hostile length is refused before its body is awaited.
    /// </summary>
    public const int MaxV2AddressBlock = 4096;

    /// <summary>Fixed part of a v2 header: signature, version/command, family/protocol, length.</summary>
    public const int V2FixedLength = 16;

    /// <summary>The longest header accepted, of either version.</summary>
    public const int MaxHeaderLength = V2FixedLength + MaxV2AddressBlock;

    /// <summary>The 12-byte v2 signature: \r\n\r\n\0\r\nQUIT\n.</summary>
    public static ReadOnlySpan<byte> V2Signature => [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];

    private static ReadOnlySpan<byte> V1Prefix => "PROXY "u8;

    /// <summary>
    /// Parses a header at the start of <paramref name="buffer"/>. Done: <paramref name="header"/> is set and
    /// <paramref name="consumed"/> is its length. NeedMoreData: everything so far is a valid start of a header
    /// within the limits. InvalidData: not a PROXY header, malformed, or over the limits.
    /// </summary>
    public static OperationStatus TryParse(in ReadOnlySequence<byte> buffer, out ProxyHeader header, out int consumed)
    {
        if (buffer.IsSingleSegment)
        {
            return TryParse(buffer.FirstSpan, out header, out consumed);
        }
        // Rare (a header split across segments): copy at most the longest header to the stack.
        Span<byte> copy = stackalloc byte[(int)Math.Min(buffer.Length, MaxHeaderLength)];
        buffer.Slice(0, copy.Length).CopyTo(copy);
        return TryParse(copy, out header, out consumed);
    }

    /// <inheritdoc cref="TryParse(in ReadOnlySequence{byte}, out ProxyHeader, out int)"/>
    public static OperationStatus TryParse(ReadOnlySpan<byte> buffer, out ProxyHeader header, out int consumed)
    {
        header = default;
        consumed = 0;
        if (buffer.IsEmpty)
        {
            return OperationStatus.NeedMoreData;
        }
        return buffer[0] switch
        {
            (byte)'P' => ParseV1(buffer, out header, out consumed),
            0x0D => ParseV2(buffer, out header, out consumed),
            _ => OperationStatus.InvalidData,
        };
    }

    /// <summary>True when <paramref name="buffer"/> starts with <paramref name="expected"/>, or is a prefix of it.</summary>
    private static bool MatchesSoFar(ReadOnlySpan<byte> buffer, ReadOnlySpan<byte> expected, out bool complete)
    {
        int n = Math.Min(buffer.Length, expected.Length);
        complete = n == expected.Length;
        return buffer[..n].SequenceEqual(expected[..n]);
    }

    // ---- Version 1 -------------------------------------------------------------------------------
    //
    //   "PROXY" SP ( "TCP4" | "TCP6" ) SP src-ip SP dst-ip SP src-port SP dst-port CRLF
    //   "PROXY" SP "UNKNOWN" [ anything but CRLF ] CRLF
    //
    // At most 107 bytes in all; single spaces; ports 0-65535 in decimal without leading zeros.

    private static OperationStatus ParseV1(ReadOnlySpan<byte> buffer, out ProxyHeader header, out int consumed)
    {
        header = default;
        consumed = 0;
        if (!MatchesSoFar(buffer, V1Prefix, out _))
        {
            return OperationStatus.InvalidData;
        }
        var window = buffer[..Math.Min(buffer.Length, MaxV1Length)];
        int lf = window.IndexOf((byte)'\n');
        if (lf < 0)
        {
            // Printable ASCII and a final CR only: binary garbage is refused without waiting for 107 bytes.
            foreach (byte b in window[..^1])
            {
                if (b is < 0x20 or > 0x7E) return OperationStatus.InvalidData;
            }
            if (window[^1] is not ((>= 0x20 and <= 0x7E) or 0x0D)) return OperationStatus.InvalidData;
            return buffer.Length >= MaxV1Length ? OperationStatus.InvalidData : OperationStatus.NeedMoreData;
        }
        if (lf < V1Prefix.Length + 1 || window[lf - 1] != '\r')
        {
            return OperationStatus.InvalidData;
        }
        var line = window[V1Prefix.Length..(lf - 1)];
        foreach (byte b in line)
        {
            if (b is < 0x20 or > 0x7E) return OperationStatus.InvalidData;
        }

        if (line.StartsWith("UNKNOWN"u8) && (line.Length == 7 || line[7] == ' '))
        {
            // The proxy could not tell the client's address: accepted, with no source (the rest is ignored).
            header = new ProxyHeader(1, false, null, null);
            consumed = lf + 1;
            return OperationStatus.Done;
        }

        AddressFamily family;
        if (line.StartsWith("TCP4 "u8)) family = AddressFamily.InterNetwork;
        else if (line.StartsWith("TCP6 "u8)) family = AddressFamily.InterNetworkV6;
        else return OperationStatus.InvalidData;

        Span<Range> fields = stackalloc Range[4];
        var rest = line[5..];
        if (SplitSpaces(rest, fields) != 4)
        {
            return OperationStatus.InvalidData;
        }
        if (!TryParseV1Address(rest[fields[0]], family, out var src)
            || !TryParseV1Address(rest[fields[1]], family, out var dst)
            || !TryParseV1Port(rest[fields[2]], out int srcPort)
            || !TryParseV1Port(rest[fields[3]], out int dstPort))
        {
            return OperationStatus.InvalidData;
        }
        header = new ProxyHeader(1, false, new IPEndPoint(src, srcPort), new IPEndPoint(dst, dstPort));
        consumed = lf + 1;
        return OperationStatus.Done;
    }

    /// <summary>Splits on single spaces into <paramref name="fields"/>; returns the field count (more than fits: fields.Length + 1).</summary>
    private static int SplitSpaces(ReadOnlySpan<byte> text, Span<Range> fields) => Split(text, (byte)' ', fields);

    private static int Split(ReadOnlySpan<byte> text, byte separator, Span<Range> fields)
    {
        int count = 0, start = 0;
        while (true)
        {
            int next = text[start..].IndexOf(separator);
            int end = next < 0 ? text.Length : start + next;
            if (count == fields.Length)
            {
                return count + 1;
            }
            fields[count++] = start..end;
            if (next < 0)
            {
                return count;
            }
            start = end + 1;
        }
    }

    private static bool TryParseV1Address(ReadOnlySpan<byte> text, AddressFamily family, out IPAddress address)
    {
        address = IPAddress.None;
        if (family == AddressFamily.InterNetwork)
        {
            // Strict dotted quad: four decimal octets without leading zeros (no "1", "0x7f.1" or "010.0.0.1"
            // forms that general parsers accept and read differently).
            Span<byte> octets = stackalloc byte[4];
            Span<Range> parts = stackalloc Range[4];
            if (Split(text, (byte)'.', parts) != 4)
            {
                return false;
            }
            for (int i = 0; i < 4; i++)
            {
                if (!TryParseDecimal(text[parts[i]], 3, out int value) || value > 255) return false;
                octets[i] = (byte)value;
            }
            address = new IPAddress(octets);
            return true;
        }
        // IPv6: hex digits, colons, and dots for an embedded IPv4 tail; no zone id, no brackets.
        if (text.Length is < 2 or > 45)
        {
            return false;
        }
        foreach (byte b in text)
        {
            if (!(char.IsAsciiHexDigit((char)b) || b == ':' || b == '.')) return false;
        }
        Span<char> chars = stackalloc char[text.Length];
        Encoding.ASCII.GetChars(text, chars);
        if (!IPAddress.TryParse(chars, out var parsed) || parsed.AddressFamily != AddressFamily.InterNetworkV6)
        {
            return false;
        }
        address = parsed;
        return true;
    }

    private static bool TryParseV1Port(ReadOnlySpan<byte> text, out int port) =>
        TryParseDecimal(text, 5, out port) && port <= 65535;

    /// <summary>1 to <paramref name="maxDigits"/> decimal digits, no sign, no leading zero (except "0" itself).</summary>
    private static bool TryParseDecimal(ReadOnlySpan<byte> text, int maxDigits, out int value)
    {
        value = 0;
        if (text.IsEmpty || text.Length > maxDigits || (text[0] == '0' && text.Length > 1))
        {
            return false;
        }
        foreach (byte b in text)
        {
            if (b is < (byte)'0' or > (byte)'9') return false;
            value = value * 10 + (b - '0');
        }
        return true;
    }

    // ---- Version 2 -------------------------------------------------------------------------------
    //
    //    0                   1                   2                   3
    //    0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    //   +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    //   |          signature: 0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A       |
    //   |                          (12 bytes)                           |
    //   +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    //   |ver=2 |  cmd  |family | proto |   length of what follows (BE)  |
    //   +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    //   | addresses: INET 4+4+2+2, INET6 16+16+2+2, UNIX 108+108, UNSPEC 0 |
    //   | then TLVs: type (1) | length (2, BE) | value (length)          |
    //   +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    //
    // cmd: 0 LOCAL, 1 PROXY. family: 0 UNSPEC, 1 INET, 2 INET6, 3 UNIX. proto: 0 UNSPEC, 1 STREAM, 2 DGRAM.

    private static OperationStatus ParseV2(ReadOnlySpan<byte> buffer, out ProxyHeader header, out int consumed)
    {
        header = default;
        consumed = 0;
        if (!MatchesSoFar(buffer, V2Signature, out bool complete))
        {
            return OperationStatus.InvalidData;
        }
        if (!complete)
        {
            return OperationStatus.NeedMoreData;
        }
        if (buffer.Length > 12 && buffer[12] is not (0x20 or 0x21))
        {
            return OperationStatus.InvalidData; // version other than 2, or a command other than LOCAL and PROXY
        }
        if (buffer.Length < V2FixedLength)
        {
            return OperationStatus.NeedMoreData;
        }
        bool local = buffer[12] == 0x20;
        int family = buffer[13] >> 4;
        int protocol = buffer[13] & 0x0F;
        int length = BinaryPrimitives.ReadUInt16BigEndian(buffer.Slice(14, 2));
        if (length > MaxV2AddressBlock)
        {
            return OperationStatus.InvalidData; // refused before its body is awaited
        }
        if (!local && (family > 3 || protocol > 2))
        {
            return OperationStatus.InvalidData;
        }
        int total = V2FixedLength + length;
        if (buffer.Length < total)
        {
            return OperationStatus.NeedMoreData;
        }
        var block = buffer.Slice(V2FixedLength, length);
        consumed = total;
        if (local)
        {
            // LOCAL: the proxy's own connection (health check). Its address block, whatever it holds, is ignored.
            header = new ProxyHeader(2, true, null, null);
            return OperationStatus.Done;
        }

        int addressLength = family switch { 1 => 12, 2 => 36, 3 => 216, _ => 0 };
        if (block.Length < addressLength || !TlvsWellFormed(block[addressLength..]))
        {
            consumed = 0;
            return OperationStatus.InvalidData;
        }
        IPEndPoint? source = null, destination = null;
        if (family is 1 or 2)
        {
            if (protocol != 1)
            {
                consumed = 0;
                return OperationStatus.InvalidData; // the relay is a stream service: DGRAM or UNSPEC over IP is nonsense
            }
            int size = family == 1 ? 4 : 16;
            var src = new IPAddress(block[..size]);
            var dst = new IPAddress(block.Slice(size, size));
            int srcPort = BinaryPrimitives.ReadUInt16BigEndian(block.Slice(2 * size, 2));
            int dstPort = BinaryPrimitives.ReadUInt16BigEndian(block.Slice(2 * size + 2, 2));
            source = new IPEndPoint(src, srcPort);
            destination = new IPEndPoint(dst, dstPort);
        }
        // UNSPEC and UNIX: accepted with no source (the proxy's own address stands in for it).
        header = new ProxyHeader(2, false, source, destination);
        return OperationStatus.Done;
    }

    /// <summary>TLVs are skipped, but each must fit in the block: a torn TLV means a torn header.</summary>
    private static bool TlvsWellFormed(ReadOnlySpan<byte> tlvs)
    {
        while (!tlvs.IsEmpty)
        {
            if (tlvs.Length < 3)
            {
                return false;
            }
            int length = BinaryPrimitives.ReadUInt16BigEndian(tlvs.Slice(1, 2));
            if (tlvs.Length < 3 + length)
            {
                return false;
            }
            tlvs = tlvs[(3 + length)..];
        }
        return true;
    }
}
