namespace Relay.Server.Connections;

/// <summary>What a session needs of its connection besides the bytes: whether reading was ended from outside.</summary>
internal interface IConnectionState
{
    /// <summary>True when the idle sweep ended the connection's reading.</summary>
    bool IdleExpired { get; }

    /// <summary>True once reading was ended from outside (idle or shutdown), or the connection closed.</summary>
    bool ReadingEnded { get; }

    /// <summary>Cancelled when reading is ended from outside: for waits other than reads.</summary>
    CancellationToken Ended { get; }
}
