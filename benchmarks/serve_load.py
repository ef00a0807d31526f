"""Load sweep and soak of `ortdiffusion serve`, over real sockets, from a second process.

    python benchmarks/serve_load.py --model tiny --out benchmarks/results/serve-load.json

For each of batching on and off, a server is started; for concurrency 1..8, that many clients send
requests back to back; throughput and latency (p50/p90/p99, split into queue and compute time from
the service's own response headers) are recorded. Then a soak of `--soak` requests measures the
server's resident memory after warm-up and at the end. Writes JSON and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

PROMPTS = ["a red circle on the left", "a small blue square at the top", "a green triangle above a yellow star",
           "a large purple star in the center", "an orange circle to the right of a cyan square"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, batching: bool, max_queue: int, extra: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[subprocess.Popen, str]:
    """`ortdiffusion serve` in a process of its own (`env`, `cwd`: whose ortdiffusion it imports),
    once it says ready; its stderr as the error if it exits first."""
    port = free_port()
    cmd = [sys.executable, "-m", "ortdiffusion.cli", "serve", "--model", model, "--port", str(port),
           "--max-queue", str(max_queue), "--max-batch", "8", *extra]
    if not batching:
        cmd.append("--no-batching")
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    for _ in range(3000):
        try:
            if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode())
        time.sleep(0.1)
    raise RuntimeError("server did not become ready")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one(client: httpx.Client, url: str, i: int, steps: int) -> dict:
    start = time.perf_counter()
    r = client.post(f"{url}/v1/images/generations", timeout=600, json={
        "prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "steps": steps, "response_format": "b64_json"})
    total = time.perf_counter() - start
    if r.status_code != 200:
        return {"status": r.status_code, "total": total}
    return {"status": 200, "total": total, "queue": float(r.headers["x-ortdiffusion-queue-ms"]) / 1e3,
            "compute": float(r.headers["x-ortdiffusion-compute-ms"]) / 1e3}


def pct(values: list[float]) -> dict[str, float]:
    a = np.array(values) if values else np.array([np.nan])
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "mean": float(a.mean())}


def level(url: str, concurrency: int, per_client: int, steps: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    def client_loop(c: int) -> None:
        with httpx.Client() as client:
            for k in range(per_client):
                r = one(client, url, c * 1000 + k, steps)
                with lock:
                    results.append(r)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client_loop, range(concurrency)))
    wall = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200]
    return {
        "concurrency": concurrency, "requests": len(results), "ok": len(ok),
        "throughput_images_per_s": len(ok) / wall,
        "latency_s": pct([r["total"] for r in ok]), "queue_s": pct([r["queue"] for r in ok]),
        "compute_s": pct([r["compute"] for r in ok]),
    }


def soak(url: str, pid: int, total: int, steps: int, warmup: int = 50) -> dict:
    with httpx.Client() as client:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: one(client, url, i, steps), range(warmup)))
            after_warmup = rss_mb(pid)
            samples = []
            for start in range(warmup, total, 50):
                list(pool.map(lambda i: one(client, url, i, steps), range(start, min(start + 50, total))))
                samples.append(rss_mb(pid))
    return {"requests": total, "warmup_requests": warmup, "rss_after_warmup_mb": after_warmup,
            "rss_end_mb": samples[-1], "rss_max_mb": max(samples), "growth_mb": samples[-1] - after_warmup,
            "rss_samples_mb": samples}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--per-client", type=int, default=4, help="requests each client sends per level")
    p.add_argument("--levels", default="1,2,4,8")
    p.add_argument("--soak", type=int, default=500)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    model = args.model or "builtin"
    report = {"env": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                      "python": platform.python_version(), "model": model, "steps": args.steps},
              "sweep": [], "soak": None}
    for batching in (True, False):
        proc, url = start_server(model, batching, max_queue=64)
        try:
            for c in map(int, args.levels.split(",")):
                row = {"batching": batching, **level(url, c, args.per_client, args.steps)}
                report["sweep"].append(row)
                print(f"batching={batching} c={c}: {row['throughput_images_per_s']:.2f} img/s, "
                      f"p50 {row['latency_s']['p50']:.2f}s p99 {row['latency_s']['p99']:.2f}s", flush=True)
            if batching and args.soak:
                report["soak"] = soak(url, proc.pid, args.soak, args.steps)
                print(f"soak: growth {report['soak']['growth_mb']:.1f} MB", flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print("\n| batching | clients | images/s | p50 s | p90 s | p99 s | queue p50 s | compute p50 s |\n|---|---|---|---|---|---|---|---|")
    for r in report["sweep"]:
        print(f"| {'on' if r['batching'] else 'off'} | {r['concurrency']} | {r['throughput_images_per_s']:.2f} | "
              f"{r['latency_s']['p50']:.2f} | {r['latency_s']['p90']:.2f} | {r['latency_s']['p99']:.2f} | "
              f"{r['queue_s']['p50']:.2f} | {r['compute_s']['p50']:.2f} |")


if __name__ == "__main__":
    main()
