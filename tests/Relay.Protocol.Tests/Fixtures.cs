using System.Security.Cryptography;
using static Relay.Protocol.Tests.TestSequences;

namespace Relay.Protocol.Tests;

/// <summary>One wire frame of every kind FrameWriter produces, by name.</summary>
internal static class Fixtures
{
    public static readonly byte[] RecipientId = Pattern(ProtocolConstants.IdSize, 0x10);
    public static readonly byte[] SenderId = Pattern(ProtocolConstants.IdSize, 0x20);
    public static readonly byte[] SessionId = Pattern(ProtocolConstants.SessionIdSize, 0x30);
    public static readonly byte[] KeyA = Pattern(ProtocolConstants.KeySize, 0x40);
    public static readonly byte[] KeyB = Pattern(ProtocolConstants.KeySize, 0x50);
    public static readonly byte[] AuthKey = Pattern(ProtocolConstants.KeySize, 0x60);
    public static readonly byte[] DeliveryKey = Pattern(ProtocolConstants.KeySize, 0x70);

    private static readonly Dictionary<string, byte[]> All = Build();

    private static Dictionary<string, byte[]> Build()
    {
        using var cipher = new DeliveryCipher(DeliveryKey);
        var ack = new byte[8];
        System.Buffers.Binary.BinaryPrimitives.WriteUInt64BigEndian(ack, 0x0102030405060708);
        return new Dictionary<string, byte[]>
        {
            ["HELLO"] = Write(w => FrameWriter.WriteHello(w, 1, 1)),
            ["WELCOME"] = Write(w => FrameWriter.WriteWelcome(w, 1, ProtocolConstants.DefaultMaxFrame, ProtocolConstants.DefaultMaxMessage, SessionId, KeyA)),
            ["ERR"] = Write(w => FrameWriter.WriteError(w, 77, ErrorCode.Quota)),
            ["ERR VERSION"] = Write(w => FrameWriter.WriteVersionError(w, 1, 3)),
            ["OK"] = Write(w => FrameWriter.WriteEmpty(w, FrameType.Ok, 1)),
            ["PONG"] = Write(w => FrameWriter.WriteEmpty(w, FrameType.Pong, 2)),
            ["EMPTY"] = Write(w => FrameWriter.WriteEmpty(w, FrameType.Empty, 3)),
            ["PING"] = Write(w => FrameWriter.WriteEmpty(w, FrameType.Ping, uint.MaxValue)),
            ["IDS"] = Write(w => FrameWriter.WriteIds(w, 9, RecipientId, SenderId, KeyB)),
            ["END"] = Write(w => FrameWriter.WriteEnd(w, RecipientId)),
            ["MSG"] = Write(w => FrameWriter.WriteMsg(w, 0, RecipientId, 42, 480_000, 1, Pattern(300, 0x01), cipher)),
            ["MSG empty body"] = Write(w => FrameWriter.WriteMsg(w, 5, RecipientId, 1, 1, 0, [], cipher)),
            ["NEW"] = Write(w => FrameWriter.WriteNew(w, 11, KeyA, KeyB, "s3cret"u8)),
            ["SKEY"] = Write(w => FrameWriter.WriteQueueCommand(w, FrameType.SKey, 12, SenderId, KeyB, [], AuthKey)),
            ["SEND"] = Write(w => FrameWriter.WriteQueueCommand(w, FrameType.Send, 13, SenderId, [1], Pattern(200, 0x02), AuthKey)),
            ["SEND unsecured"] = Write(w => FrameWriter.WriteQueueCommand(w, FrameType.Send, 14, SenderId, [0], Pattern(3, 0x03), [])),
            ["SUB"] = Write(w => FrameWriter.WriteQueueCommand(w, FrameType.Sub, 15, RecipientId, [], [], AuthKey)),
            ["ACK"] = Write(w => FrameWriter.WriteQueueCommand(w, FrameType.Ack, 16, RecipientId, ack, [], AuthKey)),
            ["GET"] = Write(w => FrameWriter.WriteQueueCommand(w, FrameType.Get, 17, RecipientId, [], [], AuthKey)),
            ["OFF"] = Write(w => FrameWriter.WriteQueueCommand(w, FrameType.Off, 18, RecipientId, [], [], AuthKey)),
            ["DEL"] = Write(w => FrameWriter.WriteQueueCommand(w, FrameType.Del, 19, RecipientId, [], [], AuthKey)),
        };
    }

    public static IEnumerable<string> Names() => All.Keys;

    public static byte[] Get(string name) => All[name].ToArray();

    public static IEnumerable<byte[]> Frames() => All.Values.Select(f => f.ToArray());
}
