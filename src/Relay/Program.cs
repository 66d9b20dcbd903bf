using Relay.Cli;

return await RelayCli.RunAsync(args);
