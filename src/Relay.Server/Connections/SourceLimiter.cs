using System.Net;
using System.Net.Sockets;

namespace Relay.Server.Connections;

/// <summary>
/// Where a connection comes from, reduced to what the per-source limits need: an IPv4 address, or the
/// /64 prefix of a global IPv6 address (one host or home network gets a whole /64, so finer keys would
/// let it multiply its limits). Lives only in memory; ToString prints nothing of the address.
/// </summary>
internal readonly struct SourceKey : IEquatable<SourceKey>
{
    private readonly UInt128 _value;
    private readonly bool _known;

    private SourceKey(UInt128 value)
    {
        _value = value;
        _known = true;
    }

    /// <summary>No source (in-memory transports): exempt from the per-source limits.</summary>
    public static SourceKey None => default;

    public bool IsKnown => _known;

    public static SourceKey From(EndPoint? endPoint) => endPoint is IPEndPoint ip ? From(ip.Address) : None;

    public static SourceKey From(IPAddress address)
    {
        if (address.IsIPv4MappedToIPv6)
        {
            address = address.MapToIPv4();
        }
        Span<byte> bytes = stackalloc byte[16];
        if (address.AddressFamily == AddressFamily.InterNetwork)
        {
            // IPv4 as its IPv4-mapped IPv6 form, ::ffff:a.b.c.d, whole.
            bytes[10] = 0xFF;
            bytes[11] = 0xFF;
            address.TryWriteBytes(bytes[12..], out _);
        }
        else if (address.AddressFamily == AddressFamily.InterNetworkV6)
        {
            address.TryWriteBytes(bytes, out _);
            // Global unicast (2000::/3) by its /64. Other addresses whole: a proxy's private ones are not
            // hosts' prefixes (Tor's HiddenServiceExportCircuitID puts each circuit in fc00:dead:beef:4dad::/64).
            if ((bytes[0] & 0xE0) == 0x20)
            {
                bytes[8..].Clear();
            }
        }
        else
        {
            return None;
        }
        return new SourceKey(System.Buffers.Binary.BinaryPrimitives.ReadUInt128BigEndian(bytes));
    }

    public bool Equals(SourceKey other) => _known == other._known && _value == other._value;
    public override bool Equals(object? obj) => obj is SourceKey other && Equals(other);
    public override int GetHashCode() => _value.GetHashCode();
    public override string ToString() => _known ? "source" : "no source";
}

/// <summary>
/// Per-source limits: concurrent connections, a token bucket of queue creations, and one of key
/// agreements (the X25519 a connection's first use of a queue key costs the relay, real or decoy
/// alike). One lock around one dictionary: it is touched at connection open and close, at NEW and
/// at a key agreement (tens of microseconds of CPU each), never per message. Entries are dropped once
/// a source has no connection and full buckets (nothing left to remember), so memory follows the
/// sources active in the last few minutes, not every source ever seen.
/// </summary>
internal sealed class SourceLimiter(int maxConnectionsPerSource, double creationsPerMinute, int creationBurst, TimeProvider clock,
    double agreementsPerSecond = 0, int agreementBurst = 1)
{
    private sealed class Entry
    {
        public int Connections;
        public double Tokens;
        public long Stamp;
        public double Agreements;
        public long AgreementStamp;
    }

    private static readonly TimeSpan PruneInterval = TimeSpan.FromMinutes(1);

    /// <summary>What a connection waits beyond its source's debt of key agreements: a tenth of a second of refill.</summary>
    public static readonly TimeSpan AgreementRefill = TimeSpan.FromMilliseconds(100);

    private readonly Lock _lock = new();
    private readonly Dictionary<SourceKey, Entry> _entries = new();
    private readonly double _tokensPerTick = creationsPerMinute / 60.0 / clock.TimestampFrequency;
    private readonly double _agreementsPerTick = agreementsPerSecond / clock.TimestampFrequency;
    private long _lastPrune = clock.GetTimestamp();

    private bool LimitsConnections => maxConnectionsPerSource > 0;
    private bool LimitsCreation => creationsPerMinute > 0;
    private bool LimitsAgreements => agreementsPerSecond > 0;

    /// <summary>Sources remembered now (for tests).</summary>
    public int TrackedSources
    {
        get { lock (_lock) return _entries.Count; }
    }

    /// <summary>Counts a new connection from <paramref name="source"/>; false when it already has the maximum.</summary>
    public bool TryOpen(SourceKey source)
    {
        if (!source.IsKnown || !LimitsConnections)
        {
            return true;
        }
        lock (_lock)
        {
            var entry = GetOrAdd(source, clock.GetTimestamp());
            if (entry.Connections >= maxConnectionsPerSource)
            {
                return false;
            }
            entry.Connections++;
            return true;
        }
    }

    /// <summary>Ends a connection counted by a successful <see cref="TryOpen"/>.</summary>
    public void Close(SourceKey source)
    {
        if (!source.IsKnown || !LimitsConnections)
        {
            return;
        }
        lock (_lock)
        {
            if (_entries.TryGetValue(source, out var entry))
            {
                entry.Connections--;
                long now = clock.GetTimestamp();
                if (Forgettable(entry, now))
                {
                    _entries.Remove(source);
                }
                PruneIfDue(now);
            }
        }
    }

    /// <summary>Takes one queue creation from the source's bucket; false when it is empty.</summary>
    public bool TryCreateQueue(SourceKey source)
    {
        if (!source.IsKnown || !LimitsCreation)
        {
            return true;
        }
        lock (_lock)
        {
            long now = clock.GetTimestamp();
            var entry = GetOrAdd(source, now);
            if (Refill(entry, now) < 1)
            {
                return false;
            }
            entry.Tokens--;
            return true;
        }
    }

    /// <summary>
    /// Counts one key agreement made for <paramref name="source"/>. Returns how long its connection
    /// waits before it reads another request: zero while the source's bucket holds a token, else the
    /// time the bucket takes to refill what was taken beyond it and <see cref="AgreementRefill"/> more,
    /// so that a source held to the rate is woken about ten times a second, not once per agreement
    /// (a wake-up of a waiting connection cost the relay about 0.4 ms of CPU, several agreements'
    /// worth: docs/PERFORMANCE.md, twenty-sixth round).
    /// The agreement is made either way (the answer does not depend on the bucket), so what a client
    /// learns from its answers never depends on the limit; only how fast a source gets them does.
    /// </summary>
    public TimeSpan KeyAgreement(SourceKey source)
    {
        if (!source.IsKnown || !LimitsAgreements)
        {
            return TimeSpan.Zero;
        }
        lock (_lock)
        {
            long now = clock.GetTimestamp();
            var entry = GetOrAdd(source, now);
            double left = RefillAgreements(entry, now) - 1;
            entry.Agreements = left;
            return left >= 0 ? TimeSpan.Zero : TimeSpan.FromSeconds(-left / agreementsPerSecond) + AgreementRefill;
        }
    }

    private Entry GetOrAdd(SourceKey source, long now)
    {
        if (!_entries.TryGetValue(source, out var entry))
        {
            PruneIfDue(now);
            entry = new Entry { Tokens = creationBurst, Stamp = now, Agreements = agreementBurst, AgreementStamp = now };
            _entries.Add(source, entry);
        }
        return entry;
    }

    private double Refill(Entry entry, long now)
    {
        if (LimitsCreation)
        {
            entry.Tokens = Math.Min(creationBurst, entry.Tokens + (now - entry.Stamp) * _tokensPerTick);
        }
        else
        {
            entry.Tokens = creationBurst;
        }
        entry.Stamp = now;
        return entry.Tokens;
    }

    private double RefillAgreements(Entry entry, long now)
    {
        entry.Agreements = LimitsAgreements
            ? Math.Min(agreementBurst, entry.Agreements + Math.Max(0, now - entry.AgreementStamp) * _agreementsPerTick)
            : agreementBurst;
        entry.AgreementStamp = now;
        return entry.Agreements;
    }

    /// <summary>Nothing to remember: no connection, and both buckets full again.</summary>
    private bool Forgettable(Entry entry, long now) =>
        entry.Connections <= 0 && Refill(entry, now) >= creationBurst && RefillAgreements(entry, now) >= agreementBurst;

    /// <summary>At most once a minute: forgets sources with no connection whose buckets have refilled.</summary>
    private void PruneIfDue(long now)
    {
        if (clock.GetElapsedTime(_lastPrune, now) < PruneInterval)
        {
            return;
        }
        _lastPrune = now;
        foreach (var (key, entry) in _entries)
        {
            if (Forgettable(entry, now))
            {
                _entries.Remove(key);
            }
        }
    }
}
