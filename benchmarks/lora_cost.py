"""What LoRA as graph inputs costs (issue 27): step time with no LoRA, one, three; the plain bundle's
step time beside them; the cost of switching to a new LoRA set; memory per loaded LoRA.

    flock /tmp/heavy.lock python benchmarks/lora_cost.py --bundle PLAIN_SD15_BUNDLE \\
        --out benchmarks/results/lora-sd15-256-cpu2.json

PLAIN_SD15_BUNDLE is a generic fp32 export of the `sd15-arch` preset (real SD-1.5 sizes, random
weights). The script adds LoRA inputs to a copy of it (`add_lora_inputs`, weights hard-linked) and
writes three rank-16 LoRA files of the SD-1.5 shapes, kohya's layer set (attention, feed-forward, 1×1
projections, text encoder attention and MLP), from the bundle's own input shapes.

The variants are measured in alternating rounds in one process, so that all see the same load
(this machine's cores are shared: only within-run ratios mean anything): the plain bundle, the
LoRA bundle with no LoRA, with one, with three blended. Reported: the median UNet step per variant
and per-round ratios against the plain bundle (median, min, max). Switching: the first run of a
new set builds its blended arrays (`LoraRegistry.feeds`, timed alone, cold) and later runs find
them ready (timed, warm). Memory: each LoRA's arrays as read, and the RSS growth of registering it.
The alternative, ONNX Runtime's own LoRA adapter format fed through `RunOptions`, is timed on the
same session (`ort_adapter_format`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = "a lighthouse on a cliff at dusk, oil painting"


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def write_loras(pipe, out: Path, count: int, rank: int) -> list[Path]:
    """`count` PEFT-layout LoRA files covering every layer the bundle adapts, at `rank`."""
    from safetensors.numpy import save_file

    prefix = {"unet": "unet.", "text_encoder": "text_encoder.text_model."}
    paths = []
    for k in range(count):
        rng = np.random.default_rng(k)
        tensors = {}
        for component, targets in pipe.loras.targets.items():
            for layer, t in targets.items():
                down = rng.standard_normal((rank, t.in_features, *((1, 1) if t.conv else ())), np.float32)
                up = rng.standard_normal((t.out_features, rank, *((1, 1) if t.conv else ())), np.float32)
                key = prefix[component] + layer
                tensors[f"{key}.lora_A.weight"] = (down / np.sqrt(t.in_features)).astype(np.float16)
                tensors[f"{key}.lora_B.weight"] = (up * 0.01).astype(np.float16)
        paths.append(out / f"lora-{k}.safetensors")
        save_file(tensors, str(paths[-1]))
    return paths


def ort_adapter_format(pipe, lora: dict[str, float], work: Path, size: int, images: int,
                       rounds: int = 3) -> dict[str, float]:
    """The alternative the issue names: ONNX Runtime's LoRA adapter format (`AdapterFormat`, a file of
    named arrays; `RunOptions.add_active_adapter` feeds them as the graph's inputs). Same graph, same
    LoRA, same session as ours; timed: writing and loading the adapter, activating it, and one UNet run
    fed either way. An adapter holds one set of arrays, so a blend is a new file; and ONNX Runtime
    documents that adapters do not apply to runs with IO binding (the device loop)."""
    import onnxruntime as ort

    from ortdiffusion.runtime.manifest import UNET

    session = pipe.sessions[UNET]._session
    arrays = pipe.loras.feeds(pipe.loras.selection(lora))[UNET]
    side = size // 8
    rng = np.random.default_rng(0)
    text = next(i for i in session.get_inputs() if i.name == "encoder_hidden_states").shape[-1]
    base = {"sample": rng.standard_normal((2 * images, 4, side, side), dtype=np.float32),
            "timestep": np.full((2 * images,), 500, np.float32),
            "encoder_hidden_states": rng.standard_normal((2 * images, 77, text), dtype=np.float32)}
    path = work / "lora-0.onnx_adapter"
    start = time.perf_counter()
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})
    fmt.export_adapter(str(path))
    exported = time.perf_counter()
    adapter = ort.LoraAdapter()
    adapter.Load(str(path))
    loaded = time.perf_counter()
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    activated = time.perf_counter()
    fed, adapted = [], []
    outputs = None
    for r in range(rounds + 1):
        for how in (("feeds", "adapter") if r % 2 == 0 else ("adapter", "feeds")):
            start_run = time.perf_counter()
            if how == "feeds":
                out_feeds = session.run(None, {**base, **arrays})
            else:
                # the C++ run merges the adapter's arrays into the feeds; Python's wrapper would refuse
                # the LoRA inputs as missing before it got there (they have no default in our graph)
                out_adapter = session._sess.run([o.name for o in session.get_outputs()], base, options)
            if r:  # the first round warms both up
                (fed if how == "feeds" else adapted).append(time.perf_counter() - start_run)
    outputs = float(np.abs(out_feeds[0] - out_adapter[0]).max())
    record = {"export_ms": (exported - start) * 1e3, "load_ms": (loaded - exported) * 1e3,
              "activate_ms": (activated - loaded) * 1e3, "file_mib": path.stat().st_size / 2**20,
              "feeds_run_ms": statistics.median(fed) * 1e3, "adapter_run_ms": statistics.median(adapted) * 1e3,
              "max_abs_difference": outputs, "rounds": rounds}
    path.unlink()
    return record


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, required=True, help="a plain generic fp32 sd15-arch bundle")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lora_bench"))
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--images", type=int, default=1, help="images per run (the UNet batch is twice that, guided)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from ortdiffusion import Pipeline
    from ortdiffusion.export.lora_inputs import add_lora_inputs

    lora_bundle = args.work / "with-lora-inputs"
    shutil.rmtree(lora_bundle, ignore_errors=True)  # graphs only (weights hard-linked): always today's rewrite
    add_lora_inputs(args.bundle, out_dir=lora_bundle)
    plain = Pipeline.load(args.bundle, providers="cpu", intra_op_threads=args.threads)
    pipe = Pipeline.load(lora_bundle, providers="cpu", intra_op_threads=args.threads)
    files_dir = args.work / "loras"
    files_dir.mkdir(parents=True, exist_ok=True)
    paths = write_loras(pipe, files_dir, 3, args.rank)

    # memory per loaded LoRA: its arrays, and what registering it added to the resident set
    memory = []
    for path in paths:
        before = rss_mib()
        name = pipe.load_lora(path)
        memory.append({"name": name, "file_mib": path.stat().st_size / 2**20,
                       "arrays_mib": pipe.loras.nbytes(name) / 2**20, "rss_growth_mib": rss_mib() - before})
    names = pipe.loras.names

    # switching: a new set's blend, cold, then found ready
    switch = {}
    for label, sel in (("1 LoRA", {names[0]: 0.8}), ("3 LoRAs", {n: 0.5 for n in names})):
        selection = pipe.loras.selection(sel)
        start = time.perf_counter()
        ready = pipe.loras.feeds(selection)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        pipe.loras.feeds(selection)
        warm = time.perf_counter() - start
        blended = sum(a.nbytes for feeds in ready.values() for a in feeds.values()) / 2**20
        switch[label] = {"new_set_ms": cold * 1e3, "cached_set_ms": warm * 1e3, "blended_arrays_mib": blended}
        pipe.loras._cache.clear()  # the rounds below start cold too, once per set

    adapter = ort_adapter_format(pipe, {names[0]: 0.8}, args.work, args.size, args.images)

    variants = {
        "plain bundle": (plain, None),
        "LoRA inputs, no LoRA": (pipe, None),
        "1 LoRA": (pipe, {names[0]: 0.8}),
        "3 LoRAs": (pipe, {n: 0.5 for n in names}),
    }
    call = dict(num_inference_steps=args.steps, width=args.size, height=args.size, seed=1,
                num_images_per_prompt=args.images)
    for p, lora in variants.values():  # warm-up: arenas, the blended sets
        p(PROMPT, **{**call, "num_inference_steps": 1}, **({"lora": lora} if lora else {}))
    steps: dict[str, list[float]] = {k: [] for k in variants}
    loads = []
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for label in order:
            p, lora = variants[label]
            result = p(PROMPT, **call, **({"lora": lora} if lora else {}))
            steps[label].append(statistics.median(result.timings.unet_steps))
        loads.append(os.getloadavg()[0])
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in steps.items()),
              flush=True)
    base = steps["plain bundle"]
    table = {}
    for label, values in steps.items():
        ratios = [v / b for v, b in zip(values, base)]
        table[label] = {"median_step_ms": statistics.median(values) * 1e3, "ratio_median": statistics.median(ratios),
                        "ratio_min": min(ratios), "ratio_max": max(ratios), "steps_ms": [v * 1e3 for v in values]}
    record = {
        "what": "LoRA as graph inputs: UNet step time, switch cost, memory per LoRA (benchmarks/lora_cost.py)",
        "model": "sd15-arch (SD-1.5 sizes, random weights), generic fp32 bundle",
        "size": args.size, "images": args.images, "unet_batch": 2 * args.images, "steps": args.steps,
        "rounds": args.rounds, "rank": args.rank, "threads": args.threads or "ORT default",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_per_round": loads},
        "step_time": table, "switch": switch, "memory_per_lora": memory, "ort_adapter_format": adapter,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# LoRA cost, sd15-arch {args.size}×{args.size}, UNet batch {2 * args.images}, "
             f"{os.cpu_count()} CPUs (load average {statistics.median(loads):.1f} during the rounds)", "",
             "| variant | median UNet step | vs plain bundle (median of rounds) | min–max |", "|---|---|---|---|"]
    for label, t in table.items():
        lines.append(f"| {label} | {t['median_step_ms']:.0f} ms | {t['ratio_median']:.3f} | "
                     f"{t['ratio_min']:.2f}–{t['ratio_max']:.2f} |")
    lines += ["", "| switch to a new set | blend (cold) | ready (cached) | blended arrays |", "|---|---|---|---|"]
    for label, s in switch.items():
        lines.append(f"| {label} | {s['new_set_ms']:.1f} ms | {s['cached_set_ms']:.3f} ms | "
                     f"{s['blended_arrays_mib']:.1f} MiB |")
    lines += ["", f"| LoRA (rank {args.rank}) | file | arrays held | RSS growth on register |", "|---|---|---|---|"]
    for m in memory:
        lines.append(f"| {m['name']} | {m['file_mib']:.1f} MiB | {m['arrays_mib']:.1f} MiB | "
                     f"{m['rss_growth_mib']:.1f} MiB |")
    lines += ["", "ONNX Runtime's LoRA adapter format, the same LoRA on the same UNet session "
              f"({adapter['rounds']} alternating rounds of one UNet run at batch {2 * args.images}):", "",
              "| feeding the LoRA's arrays | UNet run | build (cold) | activate |", "|---|---|---|---|",
              f"| as inputs (ours) | {adapter['feeds_run_ms']:.0f} ms | {switch['1 LoRA']['new_set_ms']:.0f} ms "
              f"(blend) | 0 (next run's feeds) |",
              f"| `RunOptions.add_active_adapter` | {adapter['adapter_run_ms']:.0f} ms | "
              f"{adapter['export_ms'] + adapter['load_ms']:.0f} ms (write {adapter['export_ms']:.0f} + load "
              f"{adapter['load_ms']:.0f}; {adapter['file_mib']:.1f} MiB file) | {adapter['activate_ms']:.3f} ms |"]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
