using System.Buffers.Binary;
using System.Diagnostics.CodeAnalysis;
using System.Text;
using Relay.Protocol;

namespace Relay.Client.Conversations;

/// <summary>
/// An invitation link, one line of text: <c>relay-invite:</c> followed by base64url of
/// <c>u8 version (1) ‖ inviterKey[32] ‖ senderId[24] ‖ u16 addressLength ‖ relay address (UTF-8)</c>.
/// Whoever holds it can join the conversation: share it privately.
/// </summary>
public sealed record Invitation(RelayAddress Relay, byte[] SenderId, byte[] InviterKey)
{
    public const string Prefix = "relay-invite:";

    public override string ToString()
    {
        var address = Encoding.UTF8.GetBytes(Relay.ToString());
        var bytes = new byte[1 + 32 + 24 + 2 + address.Length];
        bytes[0] = 1;
        InviterKey.CopyTo(bytes, 1);
        SenderId.CopyTo(bytes, 33);
        BinaryPrimitives.WriteUInt16BigEndian(bytes.AsSpan(57), (ushort)address.Length);
        address.CopyTo(bytes, 59);
        return Prefix + RelayAddress.Base64Url(bytes);
    }

    public static bool TryParse(string? text, [NotNullWhen(true)] out Invitation? invitation, [NotNullWhen(false)] out string? error)
    {
        invitation = null;
        text = text?.Trim();
        if (text is null || !text.StartsWith(Prefix, StringComparison.Ordinal))
        {
            error = $"an invitation link starts with {Prefix}";
            return false;
        }
        byte[] bytes;
        try
        {
            var b64 = text.Substring(Prefix.Length).Replace('-', '+').Replace('_', '/');
            bytes = Convert.FromBase64String(b64.PadRight(b64.Length + (4 - b64.Length % 4) % 4, '='));
        }
        catch (FormatException)
        {
            error = "the invitation link is damaged (not base64url)";
            return false;
        }
        if (bytes.Length < 59 || bytes[0] != 1 || BinaryPrimitives.ReadUInt16BigEndian(bytes.AsSpan(57)) != bytes.Length - 59)
        {
            error = "the invitation link is damaged or of an unknown version";
            return false;
        }
        if (!RelayAddress.TryParse(Encoding.UTF8.GetString(bytes, 59, bytes.Length - 59), out var relay, out var addressError))
        {
            error = "the invitation link holds an invalid relay address: " + addressError;
            return false;
        }
        invitation = new Invitation(relay, bytes.AsSpan(33, 24).ToArray(), bytes.AsSpan(1, 32).ToArray());
        error = null;
        return true;
    }
}
