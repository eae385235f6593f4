"""Measure how fast the REST server answers status calls, idle and while a job trains.

Run as:
    python scripts/server_latency.py [--requests 300]

Starts `mlx-surgical serve` on a free loopback port with a temporary workspace, builds the
quickstart's tiny model, and times GET /api/training/jobs (p50/p99) with the server idle,
then that route and GET /api/training/jobs/{id} while a job trains in the worker process.
Only loopback traffic, a bounded number of requests.
"""

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from mlx_surgical.tiny import QUICKSTART_SHAPE, build_tiny_model


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed_gets(client: httpx.Client, path: str, count: int) -> list[float]:
    seconds = []
    for _ in range(count):
        start = time.perf_counter()
        client.get(path).raise_for_status()
        seconds.append(time.perf_counter() - start)
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "tiny", QUICKSTART_SHAPE)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "mlx_surgical", "serve", "--port", str(port),
                                   "--workspace", str(Path(tmp) / "ws")])
        try:
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
            for _ in range(300):
                try:
                    client.get("/api/health")
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            config = {"model": {"path": str(model), "dtype": "float32"},
                      "data": {"train": "bundled:train"},
                      "training": {"iters": 100_000, "learning_rate": 5e-3, "max_seq_length": 512},
                      "output": {"name": "latency"}}
            timed_gets(client, "/api/training/jobs", 20)  # warm-up
            idle = timed_gets(client, "/api/training/jobs", args.requests)
            job_id = client.post("/api/training/start", json=config).json()["id"]
            while client.get(f"/api/training/jobs/{job_id}").json()["update"] < 2:
                time.sleep(0.1)
            busy_list = timed_gets(client, "/api/training/jobs", args.requests)
            busy = timed_gets(client, f"/api/training/jobs/{job_id}", args.requests)
            job = client.get(f"/api/training/jobs/{job_id}").json()
            client.post(f"/api/training/jobs/{job_id}/stop")
        finally:
            server.terminate()
            server.wait(timeout=60)
    rows = [("GET /jobs, idle", idle), ("GET /jobs, training", busy_list), ("GET /jobs/{id}, training", busy)]
    print(f"{'request':<26} {'p50 ms':>8} {'p99 ms':>8}")
    for name, seconds in rows:
        print(f"{name:<26} {1000 * percentile(seconds, 0.5):>8.2f} {1000 * percentile(seconds, 0.99):>8.2f}")
    print(f"the job trained {job['update']} updates at {job['tokens_per_second']:.0f} tokens/s while polled; "
          f"p99 training/idle on GET /jobs: {percentile(busy_list, 0.99) / percentile(idle, 0.99):.2f}")


if __name__ == "__main__":
    main()
