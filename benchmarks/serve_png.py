"""PNG encoding in the service: how long a response's PNGs take, and whether the server stays
responsive meanwhile. Over real sockets, from a second process.

    python benchmarks/serve_png.py --out benchmarks/results/serve-png.json
    python benchmarks/serve_png.py --tree before=/tmp/old-checkout --tree after=. --out ...

Each `--tree` is a checkout of ortdiffusion whose server is started (its directory first on
PYTHONPATH); trees take turns, round after round, so that all are measured in one run on one
machine. In each round a client sends `--requests` generations of `--n` images of `--size` as
b64_json, back to back, while a prober reads /health/live every 10 ms: a server that encodes PNGs
on its event loop answers the probe only after them. Reported per tree: request latency, the
server's own compute time (x-ortdiffusion-compute-ms) and the difference, which is mostly PNG
encoding and base64; probe latency p50/p99/max under that load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import start_server  # noqa: E402


def start(tree: Path, model: str) -> tuple[subprocess.Popen, str]:
    """The server of the checkout at `tree`, with the service's default queue and batch limits."""
    # run from the tree too: `python -m` puts the working directory before PYTHONPATH
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    check = subprocess.run([sys.executable, "-c", "import ortdiffusion; print(ortdiffusion.__file__)"],
                           env=env, cwd=tree, capture_output=True, text=True, check=True).stdout.strip()
    if not Path(check).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"--tree {tree}: python imports ortdiffusion from {check} instead")
    return start_server(model, batching=True, max_queue=16, env=env, cwd=tree)


def tree_arg(text: str) -> tuple[str, str]:
    label, sep, path = text.partition("=")
    if not sep or not label or not (Path(path) / "ortdiffusion" / "__init__.py").is_file():
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL=PATH, PATH a checkout of ortdiffusion")
    return label, path


def generate(client: httpx.Client, url: str, size: str, n: int, steps: int, seed: int) -> tuple[float, float]:
    start = time.perf_counter()
    r = client.post(f"{url}/v1/images/generations", timeout=600, json={
        "prompt": "a red circle on the left", "n": n, "size": size, "steps": steps, "seed": seed,
        "response_format": "b64_json"})
    r.raise_for_status()
    assert len(r.json()["data"]) == n
    return time.perf_counter() - start, float(r.headers["x-ortdiffusion-compute-ms"]) / 1e3


def measure(url: str, size: str, n: int, steps: int, requests: int) -> dict:
    probes: list[float] = []
    stop = threading.Event()

    def prober() -> None:
        with httpx.Client() as client:
            while not stop.is_set():
                t = time.perf_counter()
                client.get(f"{url}/health/live", timeout=60).raise_for_status()
                probes.append(time.perf_counter() - t)
                stop.wait(0.01)

    with httpx.Client() as client:
        generate(client, url, size, n, steps, seed=0)  # warm-up
        thread = threading.Thread(target=prober)
        thread.start()
        rows = [generate(client, url, size, n, steps, seed=1 + i) for i in range(requests)]
        stop.set()
        thread.join()
    total, compute = np.array(rows).T
    p = np.array(probes) * 1e3
    return {"request_s": total.tolist(), "compute_s": compute.tolist(), "outside_compute_s": (total - compute).tolist(),
            "probe_ms": {"n": int(p.size), "p50": float(np.percentile(p, 50)), "p99": float(np.percentile(p, 99)),
                         "max": float(p.max())}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin")
    p.add_argument("--size", default="256x256")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--requests", type=int, default=4, help="per tree and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tree", action="append", default=[], type=tree_arg,
                   help="LABEL=PATH of a checkout (default: current=this one)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    trees = dict(args.tree) or {"current": str(Path(__file__).resolve().parents[1])}
    servers = {label: start(Path(path), args.model) for label, path in trees.items()}
    runs: dict[str, list[dict]] = {label: [] for label in trees}
    try:
        for r in range(args.rounds):
            for label, (_, url) in servers.items():
                runs[label].append(measure(url, args.size, args.n, args.steps, args.requests))
                m = runs[label][-1]
                print(f"round {r + 1} {label}: request p50 {np.median(m['request_s']):.3f} s, outside compute "
                      f"{np.median(m['outside_compute_s']) * 1e3:.0f} ms, probe max {m['probe_ms']['max']:.0f} ms", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(60)
    summary = {}
    for label, ms in runs.items():
        request = np.concatenate([m["request_s"] for m in ms])
        outside = np.concatenate([m["outside_compute_s"] for m in ms])
        probe_max = [m["probe_ms"]["max"] for m in ms]
        probe_p99 = [m["probe_ms"]["p99"] for m in ms]
        summary[label] = {"request_p50_s": float(np.median(request)), "outside_compute_p50_ms": float(np.median(outside) * 1e3),
                          "probe_p99_ms_median": float(np.median(probe_p99)), "probe_max_ms_median": float(np.median(probe_max))}
    report = {"env": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                      "python": platform.python_version()},
              "setting": {"model": args.model, "size": args.size, "n": args.n, "steps": args.steps,
                          "requests": args.requests, "rounds": args.rounds},
              "trees": trees, "summary": summary, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\n{args.model}, n={args.n} images of {args.size}, {args.steps} steps, b64_json; "
          f"{args.rounds} rounds × {args.requests} requests per tree")
    print("| tree | request p50 s | outside compute p50 ms | /health/live p99 ms | max ms |\n|---|---|---|---|---|")
    for label, s in summary.items():
        print(f"| {label} | {s['request_p50_s']:.3f} | {s['outside_compute_p50_ms']:.0f} | "
              f"{s['probe_p99_ms_median']:.1f} | {s['probe_max_ms_median']:.1f} |")


if __name__ == "__main__":
    main()
