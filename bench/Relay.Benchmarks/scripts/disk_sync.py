#!/usr/bin/env python3
"""How long the disk under a data directory takes to make a small write durable.

Every acknowledged SEND waits for one group commit: a write to the store's log plus fdatasync.
This measures the same on its own, so an operator can tell before deploying what the disk adds to
send-to-receive latency (about one and a half commits: the commit in flight, then its own).

    disk_sync.py [DIRECTORY] [--count N] [--size BYTES] [--gap-ms MS]

Two patterns, each N times: "append" grows a file with each write (what the store's log does:
the data, the file's size and a cache flush reach the disk), "overwrite" writes into a file that
already has its size (no size change to record). Prints percentiles in milliseconds.
"""
import argparse
import os
import tempfile
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
        for _ in range(count):
            start = time.perf_counter()
            os.write(fd, record)
            os.fdatasync(fd)
            took.append((time.perf_counter() - start) * 1000)
            time.sleep(gap)
        return sorted(took)
    finally:
        os.close(fd)
        os.unlink(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", nargs="?", default=".", help="a directory on the disk to measure (default: .)")
    parser.add_argument("--count", type=int, default=2000, help="writes per pattern (default 2000)")
    parser.add_argument("--size", type=int, default=600, help="bytes per write (default 600: two 256-byte messages with their keys)")
    parser.add_argument("--gap-ms", type=float, default=0.5, help="pause between writes (default 0.5 ms)")
    args = parser.parse_args()
    if args.count < 10 or args.size < 1:
        parser.error("--count must be at least 10 and --size at least 1")
    for pattern in ("append", "overwrite"):
        took = measure(args.directory, pattern, args.count, args.size, args.gap_ms / 1000)
        n = len(took)
        pick = lambda q: took[min(n - 1, int(q * n))]
        print(f"{pattern:9} write+fdatasync ms: p50 {pick(0.5):.3f}  p90 {pick(0.9):.3f}  "
              f"p99 {pick(0.99):.3f}  p99.9 {pick(0.999):.3f}  mean {sum(took) / n:.3f}  ({n} writes of {args.size} B)")


if __name__ == "__main__":
    main()
