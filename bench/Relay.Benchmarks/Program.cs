using BenchmarkDotNet.Running;
using Relay.Benchmarks;

// `dotnet run -c Release --project bench/Relay.Benchmarks -- --filter '*Frame*' --job short`
// runs the benchmarks (any BenchmarkDotNet switch works). `-- fill ADDRESS COUNT [QUEUES]` is a
// second entry point: it stores COUNT messages in a separately running relay and keeps them there
// (for the start-up measurement in docs/PERFORMANCE.md). `-- allocations [tls] [MESSAGES]` prints
// what the message path allocates per message, by type, and `-- gc-trace FILE.nettrace` what each
// garbage collection in a trace cost (docs/PERFORMANCE.md, eleventh round).
if (args.Length > 0 && args[0] == "fill")
{
    return await Fill.RunAsync(args[1..]);
}
if (args.Length > 0 && args[0] == "allocations")
{
    return await Allocations.RunAsync(args[1..]);
}
if (args.Length > 0 && args[0] == "gc-trace")
{
    return GcTrace.Run(args[1..]);
}
BenchmarkSwitcher.FromAssembly(typeof(Fixtures).Assembly).Run(args);
return 0;
