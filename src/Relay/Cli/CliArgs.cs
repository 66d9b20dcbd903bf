using System.Diagnostics.CodeAnalysis;

namespace Relay.Cli;

/// <summary>A usage error: printed as one line on stderr, exit code 2.</summary>
public sealed class UsageException(string message) : Exception(message);

/// <summary>
/// The parsed command line of one subcommand: <c>--name value</c>, <c>--name=value</c>, bare
/// switches, and positional arguments. Every option must be declared by the command.
/// </summary>
public sealed class CliArgs
{
    private readonly Dictionary<string, string> _values = new(StringComparer.Ordinal);
    private readonly List<string> _positional = [];

    public IReadOnlyList<string> Positional => _positional;
    public bool Help { get; private set; }

    /// <param name="valueOptions">options that take a value</param>
    /// <param name="switches">options that take none (a bare switch means true; --x=false is allowed)</param>
    public static CliArgs Parse(string command, IReadOnlyList<string> args, ISet<string> valueOptions, ISet<string> switches, int maxPositional)
    {
        var result = new CliArgs();
        for (int i = 0; i < args.Count; i++)
        {
            var arg = args[i];
            if (arg is "--help" or "-h")
            {
                result.Help = true;
                continue;
            }
            if (arg == "--")
            {
                for (i++; i < args.Count; i++) result._positional.Add(args[i]);
                break;
            }
            if (arg.StartsWith("--", StringComparison.Ordinal) && arg.Length > 2)
            {
                string name = arg.Substring(2);
                string? value = null;
                int eq = name.IndexOf('=');
                if (eq >= 0)
                {
                    value = name.Substring(eq + 1);
                    name = name.Substring(0, eq);
                }
                if (switches.Contains(name))
                {
                    result._values[name] = value ?? "true";
                }
                else if (valueOptions.Contains(name))
                {
                    if (value is null)
                    {
                        if (i + 1 >= args.Count)
                        {
                            throw new UsageException($"option --{name} needs a value");
                        }
                        value = args[++i];
                    }
                    result._values[name] = value;
                }
                else
                {
                    throw new UsageException($"unknown option --{name} for 'relay {command}' (see relay {command} --help)");
                }
                continue;
            }
            if (arg.StartsWith('-') && arg.Length > 1)
            {
                throw new UsageException($"unknown option {arg} for 'relay {command}' (see relay {command} --help)");
            }
            result._positional.Add(arg);
        }
        if (!result.Help && result._positional.Count > maxPositional)
        {
            throw new UsageException($"unexpected argument '{result._positional[maxPositional]}' for 'relay {command}'");
        }
        return result;
    }

    public bool TryGet(string name, [NotNullWhen(true)] out string? value) => _values.TryGetValue(name, out value);

    public string? Get(string name) => _values.GetValueOrDefault(name);

    public string Require(string name) =>
        _values.TryGetValue(name, out var v) && v.Length > 0 ? v : throw new UsageException($"option --{name} is required");

    public bool Switch(string name)
    {
        if (!_values.TryGetValue(name, out var v)) return false;
        return ParseBool($"--{name}", v);
    }

    public int GetInt(string name, int defaultValue, int min, int max)
    {
        if (!_values.TryGetValue(name, out var v)) return defaultValue;
        if (!int.TryParse(v, out int n) || n < min || n > max)
        {
            throw new UsageException($"option --{name} must be a whole number from {min} to {max}, got '{v}'");
        }
        return n;
    }

    public static bool ParseBool(string what, string v) => v.ToLowerInvariant() switch
    {
        "true" or "1" or "yes" or "on" => true,
        "false" or "0" or "no" or "off" => false,
        _ => throw new UsageException($"{what} must be true or false, got '{v}'"),
    };
}
