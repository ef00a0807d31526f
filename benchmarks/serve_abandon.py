"""How soon the service serves again after its clients abandon work (moved here from tests/:
wall-clock comparisons are measured, not asserted in tests).

    python benchmarks/serve_abandon.py --out benchmarks/results/serve-abandon-cpu2.json

A request's time is measured before and after 50 clients each send the costliest request the
defaults admit (one 256x256 image, 20 steps) and leave after 20 ms; run in full, those would hold
the worker for many minutes. Records the time until the worker is idle again and the ratio.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import httpx

from reliability import start


def timed(url: str) -> float:
    start_ = time.perf_counter()
    r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "a red circle", "steps": 10, "seed": 1}, timeout=600)
    assert r.status_code == 200, r.text
    return time.perf_counter() - start_


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--log", default="/tmp/serve-abandon.log")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    proc, url, _ = start(args)
    try:
        before = timed(url)
        for i in range(50):
            try:
                httpx.post(f"{url}/v1/images/generations", timeout=0.02,
                           json={"prompt": "abandoned", "steps": 20, "size": "256x256", "seed": i})
            except httpx.TimeoutException:
                pass
        left = time.perf_counter()
        while time.perf_counter() - left < 120:
            text = httpx.get(f"{url}/metrics").text
            if "ortdiffusion_queue_depth 0.0" in text and "ortdiffusion_in_flight 0.0" in text:
                break
            time.sleep(0.05)
        idle_after = time.perf_counter() - left
        after = timed(url)
    finally:
        proc.terminate()
        proc.wait(60)
    result = {"request_s_before": round(before, 3), "idle_after_abandonment_s": round(idle_after, 3),
              "request_s_after": round(after, 3), "ratio_after_before": round(after / before, 2)}
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
