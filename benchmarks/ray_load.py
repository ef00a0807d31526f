"""Throughput of the service on Ray Serve with 1 and 2 replicas, and the per-request overhead of
going through Ray Serve's proxy compared with the single-machine service, in one run.

    python benchmarks/ray_load.py --out benchmarks/results/ray-serve-cpu2.json

Overhead: one client, requests back to back, 1 denoising step, so that the fixed cost of the hop
(proxy → replica → shared image store not involved: b64 responses) is a visible part of the time.
Throughput: `--clients` clients at the model's default steps against the single-machine service
(2 threads), Ray with 1 replica of 2 CPUs, and Ray with 2 replicas of 1 CPU each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from serve_load import level, start_server


def measure(name: str, model: str, extra: tuple[str, ...], args) -> dict:
    proc, url = start_server(model, batching=True, max_queue=64, extra=extra)
    try:
        level(url, 1, 3, 1)  # warm-up: first requests through each replica
        overhead = level(url, 1, args.overhead_requests, 1)
        load = level(url, args.clients, args.per_client, args.steps)
    finally:
        proc.terminate()
        proc.wait(120)
    row = {"setup": name, "light_requests": overhead, "load": load}
    print(f"{name}: 1-step p50 {overhead['latency_s']['p50'] * 1e3:.1f} ms (compute {overhead['compute_s']['p50'] * 1e3:.1f} ms); "
          f"{args.clients} clients × {args.steps} steps: {load['throughput_images_per_s']:.2f} img/s", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--per-client", type=int, default=8)
    p.add_argument("--overhead-requests", type=int, default=40)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    import ray

    setups = [
        ("single-machine service", ()),
        ("ray, 1 replica × 2 CPUs", ("--ray", "--replicas", "1", "--cpus-per-replica", "2")),
        ("ray, 2 replicas × 1 CPU", ("--ray", "--replicas", "2", "--cpus-per-replica", "1")),
    ]
    rows = []
    for name, extra in setups:
        rows.append(measure(name, args.model, extra, args))
        time.sleep(2)
    base = rows[0]["light_requests"]["latency_s"]["p50"]
    for r in rows:
        r["overhead_ms_vs_single"] = (r["light_requests"]["latency_s"]["p50"] - base) * 1e3
    report = {"env": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                      "python": platform.python_version(), "ray": ray.__version__, "model": args.model,
                      "steps": args.steps, "clients": args.clients}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print("\n| setup | 1-step latency p50 ms | overhead vs single ms | images/s (4 clients, 20 steps) | p50 s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setup']} | {r['light_requests']['latency_s']['p50'] * 1e3:.1f} | {r['overhead_ms_vs_single']:.1f} | "
              f"{r['load']['throughput_images_per_s']:.2f} | {r['load']['latency_s']['p50']:.2f} |")


if __name__ == "__main__":
    main()
