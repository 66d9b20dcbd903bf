using System.Globalization;
using Microsoft.Diagnostics.Tracing;

namespace Relay.Benchmarks;

/// <summary>
/// <c>gc-trace FILE.nettrace</c>: one line per garbage collection in an EventPipe trace of a .NET
/// process (the runtime's GC events): how long the runtime took to suspend the threads, the
/// collection itself, the restart, and what the collection left: generation sizes and the bytes it
/// promoted. Record a trace of a JIT-run `relay bench` (NativeAOT carries no EventPipe) with
/// <c>DOTNET_EnableEventPipe=1 DOTNET_EventPipeOutputPath=FILE
/// DOTNET_EventPipeConfig=Microsoft-Windows-DotNETRuntime:0x1:4</c> (docs/PERFORMANCE.md, eleventh round).
/// </summary>
internal static class GcTrace
{
    public static int Run(string[] args)
    {
        using var source = new EventPipeEventSource(args[0]);
        double suspendStart = 0, suspended = 0, gcStart = 0, gcEnd = 0, restartStart = 0;
        int generation = -1;
        string heap = "";
        var c = CultureInfo.InvariantCulture;
        source.Clr.GCSuspendEEStart += e => suspendStart = e.TimeStampRelativeMSec;
        source.Clr.GCSuspendEEStop += e => suspended = e.TimeStampRelativeMSec;
        source.Clr.GCStart += e => { gcStart = e.TimeStampRelativeMSec; generation = e.Depth; };
        source.Clr.GCStop += e => gcEnd = e.TimeStampRelativeMSec;
        source.Clr.GCHeapStats += e => heap = string.Format(c,
            "gen0 {0} KB, gen1 {1} KB, gen2 {2} KB, large {3} KB; promoted from gen0 {4} KB, from gen1 {5} KB; pinned objects {6}",
            e.GenerationSize0 / 1024, e.GenerationSize1 / 1024, e.GenerationSize2 / 1024, e.GenerationSize3 / 1024,
            e.TotalPromotedSize0 / 1024, e.TotalPromotedSize1 / 1024, e.PinnedObjectCount);
        source.Clr.GCRestartEEStart += e => restartStart = e.TimeStampRelativeMSec;
        source.Clr.GCRestartEEStop += e => Console.WriteLine(string.Format(c,
            "{0,9:0.0} ms  gen{1}: pause {2:0.000} ms = suspend {3:0.000} + collection {4:0.000} + restart {5:0.000}; after it: {6}",
            suspendStart, generation, e.TimeStampRelativeMSec - suspendStart, suspended - suspendStart, gcEnd - gcStart,
            e.TimeStampRelativeMSec - restartStart, heap));
        source.Process();
        return 0;
    }
}
