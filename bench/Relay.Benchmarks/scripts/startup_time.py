#!/usr/bin/env python3
"""Start-up to ready: launches `relay serve`, polls GET /readyz every 2 ms, prints the milliseconds.

    startup_time.py RELAY_BINARY DATA_DIR RUNS [extra serve arguments...]

Each run starts the relay on free loopback ports, measures from just before the process is created
to the first 200 answer of /readyz on the admin port (a raw HTTP/1.1 request per poll, so the
poller itself costs well under a millisecond), then stops the relay with SIGTERM and waits for it.
Prints one line per run and the median.
"""

import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def main() -> None:
    binary, data, runs, extra = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    times = []
    for run in range(runs):
        relay_port, admin_port = free_port(), free_port()
        args = [binary, "serve", "--data", data, "--listen", f"127.0.0.1:{relay_port}",
                "--admin", f"127.0.0.1:{admin_port}", *extra]
        start = time.perf_counter()
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not ready(admin_port):
            if proc.poll() is not None:
                sys.exit(f"startup_time: relay exited with {proc.returncode}")
            time.sleep(0.002)
        took = (time.perf_counter() - start) * 1000
        times.append(took)
        print(f"startup: run {run + 1}: {took:.0f} ms", flush=True)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        time.sleep(0.5)
    times.sort()
    print(f"startup: median {times[len(times) // 2]:.0f} ms of {runs} (min {times[0]:.0f}, max {times[-1]:.0f})")


if __name__ == "__main__":
    main()
