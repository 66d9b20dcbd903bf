using System.Runtime.CompilerServices;

[assembly: InternalsVisibleTo("Relay.Storage.Tests")]
