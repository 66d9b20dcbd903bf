#!/usr/bin/env python3
"""What a flood of refused commands costs a relay and its other clients.

    auth_flood.py RELAY_ADDRESS RELAY_PID [--flooders N] [--seconds S] [--plain]

N connections (default 2) pipeline GETs naming random queue ids (every one answered AUTH: for each
new id the relay derives a decoy key, an X25519 agreement, as for a real queue) while another
connection PINGs every 10 ms. Prints one JSON object: refused commands per second, the relay's CPU
(cores, from /proc/PID/stat over the flood) and the PING round trips (ms) of the bystander.
The flooders and the bystander come from the same address (loopback), so with the per-source
key-agreement budget the flood is slowed; run the relay with --key-agreement-rate 0 to see it without.
Needs Python 3.11+ and python3-cryptography; uses tests/interop/relay_client.py.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "tests", "interop"))
from relay_client import ERR, GET, Connection  # noqa: E402

BATCH = 64


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def flood(address: str, tls: bool, stop: threading.Event, counts: list[int], index: int) -> None:
    c = Connection.connect(address, tls=tls)
    c.sock.settimeout(60)
    try:
        while not stop.is_set():
            frames = []
            corrs = []
            for _ in range(BATCH):
                corr = c.corr()
                corrs.append(corr)
                frames.append(c.queue_frame(GET, corr, os.urandom(24), b"", None))
            c.send_raw(b"".join(frames))
            for corr in corrs:
                frame = c.wait_for(corr)
                if frame.type != ERR or frame.payload[:1] != b"\x03":
                    raise SystemExit(f"a GET of a random id was answered {frame.name}, not ERR AUTH")
                counts[index] += 1
    finally:
        c.close()


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    opts = dict(a[2:].split("=", 1) if "=" in a else (a[2:], "1") for a in sys.argv[1:] if a.startswith("--"))
    if len(args) != 2:
        sys.exit(__doc__)
    address, pid = args[0], int(args[1])
    flooders = int(opts.get("flooders", 2))
    seconds = float(opts.get("seconds", 10))
    tls = "plain" not in opts

    bystander = Connection.connect(address, tls=tls)
    bystander.ping()
    stop = threading.Event()
    counts = [0] * flooders
    threads = [threading.Thread(target=flood, args=(address, tls, stop, counts, i), daemon=True) for i in range(flooders)]
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    for t in threads:
        t.start()
    pings: list[float] = []
    while time.monotonic() - t0 < seconds:
        start = time.perf_counter()
        bystander.ping()
        pings.append((time.perf_counter() - start) * 1000)
        time.sleep(0.01)
    cpu1, t1 = cpu_seconds(pid), time.monotonic()
    refused = sum(counts)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    bystander.close()
    print(json.dumps({
        "flooders": flooders,
        "seconds": round(t1 - t0, 2),
        "refused_per_second": round(refused / (t1 - t0), 1),
        "relay_cpu_cores": round((cpu1 - cpu0) / (t1 - t0), 3),
        "bystander_pings": len(pings),
        "ping_p50_ms": round(percentile(pings, 50), 2),
        "ping_p95_ms": round(percentile(pings, 95), 2),
        "ping_max_ms": round(max(pings), 2),
    }))


if __name__ == "__main__":
    main()
