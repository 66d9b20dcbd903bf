using System.Text.Json;
using System.Text.Json.Serialization;
using Relay.Protocol;

namespace Relay.Client.Conversations;

/// <summary>Everything a person's device keeps: its contacts, their queues, keys and chain states.</summary>
public sealed class ProfileData
{
    public int Version { get; set; } = 1;
    public List<ContactData> Contacts { get; set; } = [];

    public ContactData? Find(string name) => Contacts.FirstOrDefault(c => c.Name == name);
}

public static class ContactStatus
{
    /// <summary>Invitation made; waiting for the other side to join.</summary>
    public const string Invited = "invited";
    /// <summary>Both queues known and secured: messages flow both ways.</summary>
    public const string Joined = "joined";
}

/// <summary>One conversation: a pair of one-way queues, possibly on different relays.</summary>
public sealed class ContactData
{
    public string Name { get; set; } = "";
    public string Status { get; set; } = ContactStatus.Invited;
    public bool Inviter { get; set; }

    // This side's conversation key pair (X25519).
    public byte[] OwnPrivate { get; set; } = [];
    public byte[] OwnPublic { get; set; } = [];
    public byte[]? PeerPublic { get; set; }

    // The queue this side receives on.
    public string ReceiveRelay { get; set; } = "";
    public byte[] RecipientId { get; set; } = [];
    public byte[] ReceiveSenderId { get; set; } = [];
    public byte[] RecipientPrivate { get; set; } = [];
    public byte[] DeliveryKey { get; set; } = [];

    // The queue this side sends to, and the private key that secures it.
    public string? SendRelay { get; set; }
    public byte[]? SendSenderId { get; set; }
    public byte[]? SenderPrivate { get; set; }
    /// <summary>
    /// True while the queue this side sends to is not yet known to be secured with
    /// <see cref="SenderPrivate"/>: a join saves the contact before its SKEY, so that no failure after
    /// the SKEY can use the invitation up, and that SKEY, repeated with the same key (which the relay
    /// accepts again), comes before the first envelope leaves.
    /// </summary>
    public bool SendUnsecured { get; set; }

    // Key chains (docs/PROTOCOL.md §11): the next counter and chain key of each direction.
    public byte[]? SendChain { get; set; }
    public ulong SendCounter { get; set; }
    public byte[]? ReceiveChain { get; set; }
    public ulong ReceiveCounter { get; set; }
    /// <summary>The relay's id of the last delivery processed from this contact's queue: a redelivery (at-least-once) is recognised and absorbed.</summary>
    public ulong ReceivedThrough { get; set; }
    /// <summary>
    /// SHA-256 of the last envelope accepted from this contact (its JOIN or a message): the same
    /// envelope again, which the relay stores under a new id when the contact sends it again after
    /// a SEND whose answer was lost, is absorbed like a redelivery instead of reported as replayed.
    /// </summary>
    public byte[]? LastAccepted { get; set; }

    /// <summary>Sealed envelopes not yet acknowledged by the relay, oldest first; sent again as they are.</summary>
    public List<byte[]> Outbox { get; set; } = [];

    /// <summary>
    /// The largest message the relay of <see cref="SendRelay"/> announced the last time this profile
    /// talked to it (null: not known yet): a message whose envelope is larger is refused before it is sealed.
    /// </summary>
    public int? SendMaxMessage { get; set; }

    /// <summary>
    /// Why each envelope taken out of <see cref="Outbox"/> was (the relay refused it for good), for the
    /// ones not yet reported as <see cref="MessageDropped"/> by a listener.
    /// </summary>
    public List<string> Dropped { get; set; } = [];
}

[JsonSourceGenerationOptions(WriteIndented = true, PropertyNamingPolicy = JsonKnownNamingPolicy.CamelCase)]
[JsonSerializable(typeof(ProfileData))]
internal sealed partial class ProfileJsonContext : JsonSerializerContext;

/// <summary>Where a profile lives. Every change is a load-change-save under the store's lock.</summary>
public interface IProfileStore
{
    ProfileData Load();
    T Update<T>(Func<ProfileData, T> change);
}

/// <summary>A profile in memory (tests, embedding).</summary>
public sealed class MemoryProfileStore : IProfileStore
{
    private readonly object _lock = new();
    private byte[] _json = JsonSerializer.SerializeToUtf8Bytes(new ProfileData(), ProfileJsonContext.Default.ProfileData);

    public ProfileData Load()
    {
        lock (_lock) return JsonSerializer.Deserialize(_json, ProfileJsonContext.Default.ProfileData)!;
    }

    public T Update<T>(Func<ProfileData, T> change)
    {
        lock (_lock)
        {
            var profile = JsonSerializer.Deserialize(_json, ProfileJsonContext.Default.ProfileData)!;
            var result = change(profile);
            _json = JsonSerializer.SerializeToUtf8Bytes(profile, ProfileJsonContext.Default.ProfileData);
            return result;
        }
    }
}

/// <summary>The profile refuses to load: its key file is readable by others, or it is damaged.</summary>
public sealed class ProfileException(string message) : Exception(message);

/// <summary>
/// A profile directory: <c>profile.json</c> (private keys included) with mode 0600 in a 0700
/// directory, written atomically, and a lock file that serializes the commands of several processes.
/// A profile whose file is readable or writable by group or others is refused.
/// </summary>
public sealed class FileProfileStore : IProfileStore
{
    public const string FileName = "profile.json";
    private const UnixFileMode Private = UnixFileMode.UserRead | UnixFileMode.UserWrite;
    private readonly string _directory;
    private readonly string _path;

    public FileProfileStore(string directory)
    {
        _directory = directory;
        _path = Path.Combine(directory, FileName);
        DurableDirectory.Create(directory, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
    }


    public ProfileData Load()
    {
        using var _ = Lock();
        return Read();
    }

    public T Update<T>(Func<ProfileData, T> change)
    {
        using var _ = Lock();
        var profile = Read();
        var result = change(profile);
        Write(profile);
        return result;
    }

    private ProfileData Read()
    {
        if (!File.Exists(_path))
        {
            return new ProfileData();
        }
        if (!OperatingSystem.IsWindows())
        {
            var mode = File.GetUnixFileMode(_path);
            if ((mode & ~(UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute)) != 0)
            {
                throw new ProfileException($"{_path} holds private keys but is accessible by other users (mode {Convert.ToString((int)mode, 8)}); run 'chmod 600 {_path}' if you trust that nobody copied it");
            }
        }
        ProfileData profile;
        try
        {
            profile = JsonSerializer.Deserialize(File.ReadAllBytes(_path), ProfileJsonContext.Default.ProfileData)
                ?? throw new ProfileException($"{_path} is empty");
        }
        catch (JsonException ex)
        {
            throw new ProfileException($"{_path} is damaged: {ex.Message}");
        }
        Check(profile);
        return profile;
    }

    /// <summary>What the JSON parser lets through but the profile cannot work with: a damaged file, said as such.</summary>
    private void Check(ProfileData profile)
    {
        if (profile.Version != 1)
        {
            throw new ProfileException($"{_path} is a profile of version {profile.Version}; this relay understands version 1");
        }
        // The parser puts null wherever the file says null, whatever the declared types.
        if (profile.Contacts is null)
        {
            throw new ProfileException($"{_path} is damaged: it has no contact list");
        }
        foreach (ContactData? c in profile.Contacts)
        {
            if (c is null || string.IsNullOrEmpty(c.Name) || c.OwnPrivate is not { Length: 32 } ||
                c.RecipientId is not { Length: 24 } || c.RecipientPrivate is not { Length: 32 } || c.DeliveryKey is not { Length: 32 } ||
                c.ReceiveRelay is null || !RelayAddress.TryParse(c.ReceiveRelay, out _, out _) || c.Outbox is null)
            {
                throw new ProfileException($"{_path} is damaged: a contact is missing or incomplete");
            }
        }
    }

    /// <summary>
    /// Replaces profile.json durably (rename and directory included) before anything this profile now
    /// says goes out: a power loss that took it back to the old profile would seal the next message
    /// with a message key already used.
    /// </summary>
    private void Write(ProfileData profile) =>
        DurableDirectory.WritePrivateFile(_path, stream => JsonSerializer.Serialize(stream, profile, ProfileJsonContext.Default.ProfileData), overwrite: true);

    /// <summary>An exclusive lock on profile.lock, waited for (another command may hold it briefly).</summary>
    private FileStream Lock()
    {
        var lockPath = Path.Combine(_directory, "profile.lock");
        var deadline = DateTime.UtcNow.AddSeconds(30);
        while (true)
        {
            try
            {
                var options = new FileStreamOptions { Mode = FileMode.OpenOrCreate, Access = FileAccess.ReadWrite, Share = FileShare.None };
                if (!OperatingSystem.IsWindows()) options.UnixCreateMode = Private;
                return new FileStream(lockPath, options);
            }
            catch (IOException) when (DateTime.UtcNow < deadline)
            {
                Thread.Sleep(20);
            }
        }
    }
}
