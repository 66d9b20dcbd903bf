namespace Relay.Cli.Tests;

/// <summary>A temporary directory for settings files and data directories, deleted on dispose.</summary>
public sealed class SettingsFiles : IDisposable
{
    public string Directory { get; } = Path.Combine(Path.GetTempPath(), "relay-cli-test-" + Guid.NewGuid().ToString("N"));

    public SettingsFiles() => System.IO.Directory.CreateDirectory(Directory);

    public string Write(string name, string text)
    {
        var path = Path.Combine(Directory, name);
        File.WriteAllText(path, text);
        return path;
    }

    public string DataDirectory => Path.Combine(Directory, "data");

    public void Dispose()
    {
        try { System.IO.Directory.Delete(Directory, recursive: true); } catch (IOException) { }
    }
}
