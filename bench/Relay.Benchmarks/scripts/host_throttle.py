#!/usr/bin/env python3
"""Does the host pause this machine when it is busy?

A probe sleeps 0.5 ms at a time and records how late it wakes up: alone, beside a busy loop on every
CPU (or --busy N of them), beside a loop of 600-byte appends with fdatasync on DIRECTORY's disk (what the relay's commits
do), and beside both. A host that gives a virtual machine a CPU quota per period (a cgroup's cpu.max
on the host, which the guest does not see: no steal time is reported) stops every CPU of the machine
for milliseconds at the end of each period in which the machine, with the host's own work for its
disk requests, used up its quota; the probe's late wake-ups then fall at one phase of that period.
Everything that runs on such a machine waits out those pauses, a relay's latency tail included
(docs/PERFORMANCE.md, twenty-seventh round).

    python3 host_throttle.py DIRECTORY [--seconds 5] [--period-ms 100] [--busy N] [--during COMMAND]
    python3 bench/Relay.Benchmarks/scripts/host_throttle.py /var/tmp
    python3 bench/Relay.Benchmarks/scripts/host_throttle.py /var/tmp --during "relay bench --scenario paced --rate 5000 --duration 8"

With --during, the probe runs once, beside COMMAND (started by the shell, its output passed on;
the probe starts 2 s after it and the script waits for it to end) instead of the four loads.

Prints one line per load: wake-ups, how many were more than 2 ms late, the latest, the time lost to
them per second, the share of the late wake-ups that fell in the busiest fifth of --period-ms
(two adjacent tenths: about 0.2 when they are spread evenly, most of them when a periodic pause
makes them) and their count in each tenth, then a verdict line.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

BUSY = "while True: pass"
SYNC = """
import os, sys, time
f = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
record = b"x" * 600
n = 0
while True:
    os.write(f, record)
    os.fdatasync(f)
    n += 1
    if n % 20000 == 0:
        os.ftruncate(f, 0)
"""


def probe(seconds, period_ms):
    late = []
    phases = [0] * 10
    count = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.time()
        began = time.monotonic()
        time.sleep(0.0005)
        over = (time.monotonic() - began) * 1000.0 - 0.5
        count += 1
        if over > 2.0:
            late.append(over)
            phases[int((start * 1000.0 % period_ms) / period_ms * 10) % 10] += 1
    return count, late, phases


def run(label, busy, sync_dir, args):
    children = []
    try:
        for _ in range(busy):
            children.append(subprocess.Popen([sys.executable, "-c", BUSY]))
        if sync_dir:
            children.append(subprocess.Popen([sys.executable, "-c", SYNC, os.path.join(sync_dir, "sync.dat")]))
        time.sleep(0.5)
        count, late, phases = probe(args.seconds, args.period_ms)
    finally:
        for child in children:
            child.kill()
            child.wait()
    # Two adjacent tenths (a fifth of the period, around the end): a pause of 10-20 ms straddles them.
    share = max(phases[i] + phases[(i + 1) % 10] for i in range(10)) / len(late) if late else 0.0
    print(f"{label:<24} wake-ups {count:6d}  late >2 ms {len(late):4d}  latest {max(late, default=0.0):5.1f} ms"
          f"  lost {sum(late) / args.seconds:5.1f} ms/s  in the busiest fifth of {args.period_ms:g} ms {share:.2f}"
          f"  by tenth {phases}", flush=True)
    return len(late), share


def main():
    parser = argparse.ArgumentParser(description="Whether the host pauses this machine when it is busy (a CPU quota per period).")
    parser.add_argument("directory", help="a directory on the disk the relay's store would use (a file is written there and removed)")
    parser.add_argument("--seconds", type=float, default=5.0, help="how long each load runs (default 5)")
    parser.add_argument("--period-ms", type=float, default=100.0, help="the host's quota period to look for (default 100, the Linux default)")
    parser.add_argument("--busy", type=int, help="how many busy loops (default: one per CPU)")
    parser.add_argument("--during", metavar="COMMAND", help="probe once beside this shell command (a relay under load, say) instead of the four loads")
    args = parser.parse_args()
    if args.seconds < 1 or args.period_ms < 10 or (args.busy is not None and args.busy < 1):
        parser.error("--seconds must be at least 1, --period-ms at least 10 and --busy at least 1")
    if not os.path.isdir(args.directory):
        parser.error(f"{args.directory} is not a directory")
    cpus = os.cpu_count() or 1
    busy = args.busy or cpus
    if args.during:
        print(f"{cpus} CPUs, {args.seconds:g} s beside: {args.during}", flush=True)
        command = subprocess.Popen(args.during, shell=True)
        try:
            time.sleep(2.0)
            late, share = run("beside the command", 0, None, args)
        finally:
            code = command.wait()
        if code != 0:
            print(f"the command exited with {code}", file=sys.stderr)
    else:
        work = tempfile.mkdtemp(prefix="host_throttle.", dir=args.directory)
        try:
            print(f"{cpus} CPUs, {args.seconds:g} s per load, disk: {args.directory}", flush=True)
            run("alone", 0, None, args)
            run(f"{busy} busy loops", busy, None, args)
            run("fdatasync loop", 0, work, args)
            late, share = run(f"{busy} busy loops + fdatasync", busy, work, args)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if late >= args.seconds * 1000.0 / args.period_ms / 2 and share >= 0.6:
        print(f"paused: busy, this machine stops for milliseconds once every {args.period_ms:g} ms (a CPU quota the host does not report)")
    else:
        print(f"not paused: no pause once every {args.period_ms:g} ms under these loads")


if __name__ == "__main__":
    main()
