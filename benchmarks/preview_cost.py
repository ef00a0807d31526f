"""What live previews cost (issue 28: under 5 % of the run), with and without them in one run.

    python benchmarks/preview_cost.py --out benchmarks/results/preview-cost-cpu2.json

Two measurements, each alternating its variants round after round so that all are measured under
the same load (this machine's cores are shared: only within-run ratios mean anything):

1. service: `ortdiffusion serve` in its own process, one client over a socket. Per round, the same
   generation (same prompt, seed, steps, size) three ways: a plain request (`b64_json`), a stream
   without previews (`stream: true`, `partial_images: 0`), and a stream as the page asks for it
   (`partial_images: 3`, a progress event every step). The client's wall time per request:
   everything the service does for previews — the projection on the worker thread, encoding and
   sending them — is inside it.
2. pipeline: `Pipeline.__call__` in this process with no callback and with a callback that does
   the worker thread's preview work (the latent → RGB projection at the three preview steps), to
   isolate the share of the denoising loop itself.
3. the preview work alone (projection, upscale, PNG encoding), timed in a loop, as a share of the
   run without previews: the least noisy of the three where the machine is shared.

Reported: medians per variant, the ratio of medians and the median of the per-round ratios (with
previews / without; `overhead_pct` is from the latter).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import start_server  # noqa: E402

PROMPT = "a small blue square above a yellow star"


def timed_request(client: httpx.Client, url: str, body: dict) -> tuple[float, dict]:
    start = time.perf_counter()
    if not body.get("stream"):
        r = client.post(f"{url}/v1/images/generations", json=body, timeout=600)
        r.raise_for_status()
        return time.perf_counter() - start, {"events": 0}
    counts: dict[str, int] = {}
    with client.stream("POST", f"{url}/v1/images/generations", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line.split(": ", 1)[1]
                counts[name] = counts.get(name, 0) + 1
    assert counts.get("image_generation.completed") == body.get("n", 1), counts
    return time.perf_counter() - start, counts


def service_rounds(model: str, rounds: int, steps: int, size: str) -> dict:
    base = {"prompt": PROMPT, "seed": 11, "steps": steps, "size": size, "response_format": "b64_json"}
    variants = {
        "plain": base,
        "stream_no_previews": {**base, "stream": True, "partial_images": 0},
        "stream_previews": {**base, "stream": True, "partial_images": 3, "progress": True},
    }
    proc, url = start_server(model, batching=True, max_queue=16)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    events = {}
    try:
        with httpx.Client() as client:
            for body in variants.values():  # warm: first requests pay one-time costs (the preview map)
                timed_request(client, url, body)
            for k in range(rounds):
                order = list(variants) if k % 2 == 0 else list(reversed(variants))
                for name in order:
                    elapsed, counts = timed_request(client, url, variants[name])
                    seconds[name].append(elapsed)
                    events[name] = counts
    finally:
        proc.terminate()
        proc.wait(30)
    return summarize(seconds, with_="stream_previews", without="stream_no_previews") | {"events": events}


def pipeline_rounds(model: str, rounds: int, steps: int, size: str) -> dict:
    from ortdiffusion import Pipeline
    from ortdiffusion.serve.stream import preview_steps

    pipe = Pipeline.load(model, providers="cpu")
    width, height = (int(v) for v in size.split("x"))
    previews = []

    def callback(i, n, latents):
        if i in preview_steps(n, 3):
            previews.append(pipe.previewer.pixels(latents))

    def run(cb) -> float:
        start = time.perf_counter()
        pipe(PROMPT, seed=11, num_inference_steps=steps, width=width, height=height, callback=cb)
        return time.perf_counter() - start

    run(callback)
    seconds = {"no_callback": [], "preview_callback": []}
    for k in range(rounds):
        for name in (["no_callback", "preview_callback"] if k % 2 == 0 else ["preview_callback", "no_callback"]):
            seconds[name].append(run(callback if name == "preview_callback" else None))
    # 3. the preview work itself, timed alone: the projection (worker thread) and the upscale and
    # PNG encoding (event loop) of one preview, 3 per image; against the run without previews.
    from ortdiffusion.runtime.png import encode_images

    kept = []
    pipe(PROMPT, seed=11, num_inference_steps=steps, width=width, height=height,
         callback=lambda i, n, x: i in preview_steps(n, 3) and kept.append(x.copy()))
    repeats, start = 50, time.perf_counter()
    for _ in range(repeats):
        for latents in kept:
            encode_images(pipe.previewer.upscale(pipe.previewer.pixels(latents)), [{}])
    per_preview = (time.perf_counter() - start) / (repeats * len(kept))
    summary = summarize(seconds, with_="preview_callback", without="no_callback")
    alone = {"seconds_per_preview": per_preview, "previews_per_image": len(kept),
             "share_of_run_pct": 100 * per_preview * len(kept) / summary["median_s"]["no_callback"]}
    return summary | {"previews_made": len(previews), "preview_work_alone": alone}


def summarize(seconds: dict[str, list[float]], with_: str, without: str) -> dict:
    """Medians, and the median of each round's own ratio (its two variants ran back to back)."""
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    paired = statistics.median(a / b for a, b in zip(seconds[with_], seconds[without]))
    return {"seconds": seconds, "median_s": medians, "ratio_of_medians": medians[with_] / medians[without],
            "median_paired_ratio": paired, "overhead_pct": 100 * (paired - 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    result = {
        "benchmark": "preview_cost", "model": args.model, "steps": args.steps, "size": args.size,
        "rounds": args.rounds, "partial_images": 3, "machine": {
            "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(), "python": platform.python_version()},
        "service": service_rounds(args.model, args.rounds, args.steps, args.size),
        "pipeline": pipeline_rounds(args.model, args.rounds, args.steps, args.size),
    }
    result["machine"]["load_average_at_end"] = os.getloadavg()
    alone = result["pipeline"]["preview_work_alone"]
    print(f"preview work alone: {alone['seconds_per_preview'] * 1e3:.2f} ms a preview, "
          f"{alone['share_of_run_pct']:.2f} % of the run for {alone['previews_per_image']}")
    for part in ("service", "pipeline"):
        print(f"{part}: medians {({k: round(v, 3) for k, v in result[part]['median_s'].items()})} "
              f"→ previews cost {result[part]['overhead_pct']:+.1f} % (median of per-round ratios)")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
