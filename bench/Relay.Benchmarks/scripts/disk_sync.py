#!/usr/bin/env python3
"""How long the disk under a data directory takes to make a small write durable.

Every acknowledged SEND waits for one group commit: a write to the store's log plus fdatasync.
This measures the same on its own, so an operator can tell before deploying what the disk adds to
send-to-receive latency (about one and a half commits: the commit in flight, then its own).

    disk_sync.py [DIRECTORY] [--count N] [--size BYTES] [--gap-ms MS] [--parallel SECONDS]

Two patterns, each N times: "append" grows a file with each write (what the store's log does:
the data, the file's size and a cache flush reach the disk), "overwrite" writes into a file that
already has its size (no size change to record). Prints percentiles in milliseconds, and the CPU
time this process spent per write (the system call's work in the kernel: on a virtual machine each
request to the disk is an exit to the hypervisor, which the relay pays as CPU on every commit).

--parallel SECONDS: instead, whether the disk serves flushes at the same time: 1, 2 and 4 writers,
each appending with fdatasync as fast as it can for that long, on files of their own and (2 and 4)
on one shared file. A disk that does serves more flushes a second with more writers at about the
same latency each; one log (RocksDB syncs one at a time) cannot use that.
"""
import argparse
import os
import tempfile
import threading
import time


def measure(directory, pattern, count, size, gap):
    fd, path = tempfile.mkstemp(prefix="disk-sync-", dir=directory)
    try:
        if pattern == "overwrite":
            os.write(fd, b"\0" * (count * size + 4096))
            os.fsync(fd)
            os.lseek(fd, 0, os.SEEK_SET)
        record = b"x" * size
        took = []
        cpu = 0.0
        for _ in range(count):
            start = time.perf_counter()
            start_cpu = time.process_time()
            os.write(fd, record)
            os.fdatasync(fd)
            cpu += time.process_time() - start_cpu
            took.append((time.perf_counter() - start) * 1000)
            time.sleep(gap)
        return sorted(took), cpu / count * 1e6
    finally:
        os.close(fd)
        os.unlink(path)


def parallel(directory, writers, shared, size, seconds):
    """writers threads appending size bytes with fdatasync until seconds pass; latencies in ms, sorted."""
    count = 1 if shared else writers
    files = [tempfile.mkstemp(prefix="disk-sync-", dir=directory) for _ in range(count)]
    took = [[] for _ in range(writers)]
    lock = threading.Lock()
    end = [0]
    stop = time.perf_counter() + seconds

    def run(i):
        fd = files[0 if shared else i][0]
        record = b"x" * size
        while time.perf_counter() < stop:
            start = time.perf_counter()
            with lock:
                offset = end[0] if shared else None
                end[0] += size
            if shared:
                os.pwrite(fd, record, offset)
            else:
                os.write(fd, record)
            os.fdatasync(fd)
            took[i].append((time.perf_counter() - start) * 1000)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for fd, path in files:
        os.close(fd)
        os.unlink(path)
    return sorted(x for t in took for x in t)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", nargs="?", default=".", help="a directory on the disk to measure (default: .)")
    parser.add_argument("--count", type=int, default=2000, help="writes per pattern (default 2000)")
    parser.add_argument("--size", type=int, default=600, help="bytes per write (default 600: two 256-byte messages with their keys)")
    parser.add_argument("--gap-ms", type=float, default=0.5, help="pause between writes (default 0.5 ms)")
    parser.add_argument("--parallel", type=float, metavar="SECONDS",
                        help="measure 1, 2 and 4 writers at once for SECONDS each (see above)")
    args = parser.parse_args()
    if args.count < 10 or args.size < 1:
        parser.error("--count must be at least 10 and --size at least 1")
    if args.parallel:
        for writers, shared in ((1, False), (2, False), (2, True), (4, False), (4, True)):
            took = parallel(args.directory, writers, shared, args.size, args.parallel)
            n = len(took)
            pick = lambda q: took[min(n - 1, int(q * n))]
            where = "one shared file" if shared else ("its own file" if writers == 1 else "files of their own")
            print(f"{writers} writer(s), {where:18}: {n / args.parallel:8.0f} fdatasync/s, p50 {pick(0.5):.3f}  "
                  f"p99 {pick(0.99):.3f}  p99.9 {pick(0.999):.3f}  mean {sum(took) / n:.3f} ms")
        return
    for pattern in ("append", "overwrite"):
        took, cpu_us = measure(args.directory, pattern, args.count, args.size, args.gap_ms / 1000)
        n = len(took)
        pick = lambda q: took[min(n - 1, int(q * n))]
        print(f"{pattern:9} write+fdatasync ms: p50 {pick(0.5):.3f}  p90 {pick(0.9):.3f}  "
              f"p99 {pick(0.99):.3f}  p99.9 {pick(0.999):.3f}  mean {sum(took) / n:.3f}  ({n} writes of {args.size} B; "
              f"CPU {cpu_us:.0f} us each)")


if __name__ == "__main__":
    main()
