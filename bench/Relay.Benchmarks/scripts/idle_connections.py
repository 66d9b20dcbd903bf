#!/usr/bin/env python3
"""Idle subscribed TLS connections against a separately running relay; prints the relay's VmRSS.

    idle_connections.py RELAY_ADDRESS RELAY_PID N1 [N2 ...] [--no-subscribe] [--admin=http://HOST:PORT]

Each connection: TCP, TLS 1.3 with ALPN relay/1 (chain checked against the address fingerprint),
HELLO/WELCOME, then NEW (its own queue) and SUB, and then nothing. After reaching each N it waits
5 s and reads VmRSS/VmHWM from /proc/PID/status. Uses tests/interop/relay_client.py (written from
docs/PROTOCOL.md, independent of the C# code). Needs `ulimit -n` above the largest N for both
this script and the relay. With --admin it also reads the relay's managed heap
(`dotnet_total_memory_bytes` from /metrics) and what the collector holds committed
(`relay_gc_committed_bytes`), so native and managed memory can be told apart.
"""

import os
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../../tests/interop"))
from relay_client import Connection  # noqa: E402


def rss(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM", "Threads")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


def managed_mb(admin: str | None) -> str:
    if not admin:
        return ""
    with urllib.request.urlopen(f"{admin}/metrics", timeout=10) as r:
        values = {line.split()[0]: float(line.split()[1]) for line in r.read().decode().splitlines()
                  if line.startswith(("dotnet_total_memory_bytes ", "relay_gc_committed_bytes "))}
    out = ""
    if "dotnet_total_memory_bytes" in values:
        out += f", managed heap {values['dotnet_total_memory_bytes'] / 1048576:.1f} MB"
    if "relay_gc_committed_bytes" in values:
        out += f" (collector committed {values['relay_gc_committed_bytes'] / 1048576:.1f} MB)"
    return out


def main() -> None:
    subscribe = "--no-subscribe" not in sys.argv
    admin = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--admin=")), None)
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    address, pid, targets = args[0], int(args[1]), [int(n) for n in args[2:]]

    def open_one(_: int) -> Connection:
        c = Connection.connect(address, timeout=60)
        if subscribe:
            c.subscribe(c.new_queue())
        c.sock.settimeout(None)
        return c

    before = rss(pid)
    print(f"idle: before: VmRSS {before['VmRSS'] / 1024:.1f} MB{managed_mb(admin)}", flush=True)
    conns: list[Connection] = []
    with ThreadPoolExecutor(max_workers=16) as pool:
        for target in targets:
            start = time.monotonic()
            conns.extend(pool.map(open_one, range(target - len(conns))))
            took = time.monotonic() - start
            time.sleep(5)
            now = rss(pid)
            per = (now["VmRSS"] - before["VmRSS"]) / max(1, len(conns))
            print(f"idle: {len(conns)} {'subscribed' if subscribe else 'handshaked'} TLS connections "
                  f"(opened in {took:.1f} s): VmRSS {now['VmRSS'] / 1024:.1f} MB, VmHWM {now['VmHWM'] / 1024:.1f} MB, "
                  f"threads {now['Threads']}, {per:.1f} KB per connection over the baseline{managed_mb(admin)}", flush=True)
    for c in conns:
        c.close()


if __name__ == "__main__":
    main()
