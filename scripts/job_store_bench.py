"""Measure what stored jobs cost an idle server: its CPU use, and how fast it lists them.

Run as:
    python scripts/job_store_bench.py [--jobs 2000] [--idle-seconds 20] [--requests 200]

Writes --jobs finished jobs (each with 100 inline examples, as a dashboard would send them)
into a temporary workspace through the job store, starts `mlx-surgical serve` on it, reads
the server process's CPU time from /proc over --idle-seconds with no requests, then times
GET /api/training/jobs (the default page of 100, and a page of 1,000) and prints p50/p99.
Linux only (/proc); loopback traffic only.
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from mlx_surgical.config import config_from_dict
from mlx_surgical.jobs import JobStore

EXAMPLES = [{"instruction": f"Write function number {i}", "response": f"def f{i}(x):\n    return x + {i}"}
            for i in range(100)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def fill(workspace: Path, count: int) -> None:
    store = JobStore(workspace)
    for i in range(count):
        config = config_from_dict({"model": {"path": "models/none"}, "data": {"examples": EXAMPLES},
                                   "output": {"dir": str(store.adapters), "name": f"job-{i}"}})
        job = store.create(config)
        with store.locked(job.id) as record:
            record.state, record.update, record.total_updates, record.loss = "succeeded", 100, 100, 0.5


def timed(client: httpx.Client, params: dict, count: int) -> list[float]:
    seconds = []
    for _ in range(count):
        start = time.perf_counter()
        client.get("/api/training/jobs", params=params).raise_for_status()
        seconds.append(time.perf_counter() - start)
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--idle-seconds", type=float, default=20)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Path(tmp) / "ws"
        start = time.perf_counter()
        fill(workspace, args.jobs)
        print(f"wrote {args.jobs} jobs in {time.perf_counter() - start:.1f} s")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "mlx_surgical", "serve", "--port", str(port),
                                   "--workspace", str(workspace), "--keep-jobs", str(args.jobs)])
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                deadline = time.time() + 60
                while True:
                    try:
                        client.get("/api/health").raise_for_status()
                        break
                    except httpx.TransportError:
                        if time.time() > deadline:
                            raise
                        time.sleep(0.2)
                total = client.get("/api/training/jobs", params={"limit": 1}).headers["X-Total-Count"]
                time.sleep(2)  # let start-up work settle
                before = cpu_seconds(server.pid)
                time.sleep(args.idle_seconds)
                idle = (cpu_seconds(server.pid) - before) / args.idle_seconds
                print(f"idle with {total} stored jobs: {idle:.2%} of a core over {args.idle_seconds:g} s")
                for params in ({}, {"limit": 1000}):
                    seconds = timed(client, params, args.requests)
                    print(f"GET /api/training/jobs {params or '(default page of 100)'}: "
                          f"p50 {percentile(seconds, 0.5) * 1e3:.1f} ms, p99 {percentile(seconds, 0.99) * 1e3:.1f} ms "
                          f"over {args.requests} requests")
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
