"""What ControlNets cost (issue 27), against diffusers' own torch pipelines on the same machine.

    flock /tmp/heavy.lock python benchmarks/controlnet_cost.py --out benchmarks/results/controlnet-cost-tiny-cpu2.json

On the `tiny` preset (random weights) with random ControlNets made for its UNet
(`export.controlnet.random_controlnet`): three bundles — plain, one ControlNet, two ControlNets —
and diffusers' `StableDiffusionPipeline`, `StableDiffusionControlNetPipeline` with one ControlNet
and with a list of two (its MultiControlNetModel). Per round, every variant of both engines runs
once, in alternating order, so that all are measured under the same load (this machine's two cores
are shared: only ratios within one run mean anything). Reported: the median wall time of a
generation per variant and engine, torch / ortdiffusion per variant, and each engine's ControlNet
variants over its plain run. The machine's load average at start and end is recorded.

`--low-memory`, for SD 1.5-sized presets on a small machine (sd15-arch: a UNet is ~3.4 GB fp32,
a ControlNet ~1.4 GB; three bundles and three torch pipelines held at once would take >20 GB):

    flock /tmp/heavy.lock python benchmarks/controlnet_cost.py --preset sd15-arch --sizes 256 --low-memory \
        --checkpoint ~/.cache/ortdiffusion/checkpoints/sd15-arch --workdir /tmp/cn-sd15 \
        --out benchmarks/results/controlnet-cost-sd15-256-cpu2.json

- ortdiffusion exports one bundle, with both ControlNets, and runs all three variants on it:
  plain = no control image (its UNet gets zero residuals), ×1 = both images with conditioning
  scales (1, 0) (the runtime skips a ControlNet whose scale is 0: the same work as a one-ControlNet
  bundle), ×2 = both at scale 1;
- one engine is loaded at a time: ortdiffusion's rounds, then torch's (each alternating its
  variants per round), so the torch / ortdiffusion ratios compare two consecutive phases; the load
  average at the start and end of each phase is recorded with them.

The torch ControlNet pipelines always share the plain pipeline's modules (one UNet, one text
encoder, one VAE). `--checkpoint` reuses an existing diffusers checkpoint instead of building the
preset; `--workdir` keeps the ControlNets and bundles there (and reuses them when already exported)
instead of in a temporary directory. `--warmup-steps` runs the warm-up rounds with fewer steps
(same shapes, so every session and pipeline has run before the measured rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import gc
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

PROMPT = "a red circle on the left"


def edge_picture(size: int, shift: int) -> Image.Image:
    image = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.ellipse((size // 10, size // 10, size * 6 // 10, size * 6 // 10), outline=(255, 255, 255), width=3)
    draw.rectangle((size // 2 + shift, size // 3, size - 4, size - 6), outline=(255, 255, 255), width=2)
    return image


VARIANTS = ("plain", "controlnet x1", "controlnet x2")


def build(root: Path, preset: str, checkpoint: Path | None = None, low_memory: bool = False
          ) -> tuple[Path, list[Path], dict[str, Path]]:
    """The checkpoint, two random ControlNets for it and the bundles (plain, x1, x2; with
    `low_memory` the x2 bundle alone), under `root`; what is already there is reused."""
    from ortdiffusion.export.bundle import ExportOptions, export_checkpoint
    from ortdiffusion.export.controlnet import random_controlnet
    from ortdiffusion.export.presets import build_checkpoint

    if checkpoint is None:
        checkpoint = root / preset
        if not (checkpoint / "model_index.json").is_file():
            checkpoint = build_checkpoint(preset, checkpoint)
    vae = json.loads((checkpoint / "vae" / "config.json").read_text())
    scale = 2 ** (len(vae["block_out_channels"]) - 1)
    nets = []
    for k in range(2):
        net = root / f"controlnet{k}"
        if not (net / "config.json").is_file():
            random_controlnet(checkpoint / "unet", net, k, vae_scale=scale)
        nets.append(net)
        gc.collect()
    bundles = {}
    for name, used in (("plain", ()), ("controlnet x1", nets[:1]), ("controlnet x2", nets)):
        if low_memory and name != "controlnet x2":
            continue
        bundles[name] = root / name.replace(" ", "-")
        if not (bundles[name] / "manifest.json").is_file():
            export_checkpoint(checkpoint, bundles[name], ExportOptions(controlnets=tuple(used)))
        gc.collect()
    return checkpoint, nets, bundles


def load_ours(bundles: dict[str, Path]) -> dict:
    """Per variant: (pipeline, extra call arguments given the two control images)."""
    from ortdiffusion import Pipeline

    if set(bundles) == {"controlnet x2"}:  # --low-memory: one bundle for every variant
        pipe = Pipeline.load(bundles["controlnet x2"], providers="cpu")
        return {"plain": (pipe, lambda c: {}),
                "controlnet x1": (pipe, lambda c: {"control_image": c, "controlnet_conditioning_scale": [1.0, 0.0]}),
                "controlnet x2": (pipe, lambda c: {"control_image": c})}
    ours = {name: Pipeline.load(path, providers="cpu") for name, path in bundles.items()}
    return {"plain": (ours["plain"], lambda c: {}),
            "controlnet x1": (ours["controlnet x1"], lambda c: {"control_image": c[:1]}),
            "controlnet x2": (ours["controlnet x2"], lambda c: {"control_image": c})}


def load_torch(checkpoint: Path, nets: list[Path]) -> dict:
    """diffusers' pipelines; the ControlNet ones share the plain one's modules (one UNet in memory)."""
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    models = [ControlNetModel.from_pretrained(str(n)) for n in nets]
    plain = StableDiffusionPipeline.from_pretrained(str(checkpoint), safety_checker=None,
                                                    requires_safety_checker=False)
    plain.scheduler = DDIMScheduler.from_config(plain.scheduler.config)
    shared = dict(plain.components, requires_safety_checker=False)
    torch_pipes = {
        "plain": plain,
        "controlnet x1": StableDiffusionControlNetPipeline(**shared, controlnet=models[0]),
        "controlnet x2": StableDiffusionControlNetPipeline(**shared, controlnet=models),  # MultiControlNetModel
    }
    for pipe in torch_pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return torch_pipes


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release() -> None:
    """Give freed memory back to the system between phases (glibc keeps freed arenas otherwise)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def run_once(engine: str, name: str, entry, size: int, steps: int, controls: list[Image.Image]) -> float:
    start = time.perf_counter()
    if engine == "ortdiffusion":
        pipe, extra = entry
        pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, scheduler="ddim", seed=0, width=size, height=size,
             **extra(controls))
    else:
        control = {"plain": [], "controlnet x1": controls[:1], "controlnet x2": controls}[name]
        extra = {"image": control if len(control) > 1 else control[0]} if control else {}
        with torch.inference_mode():
            entry(PROMPT, num_inference_steps=steps, guidance_scale=7.5, width=size, height=size,
                  generator=torch.Generator().manual_seed(0), **extra)
    return time.perf_counter() - start


def measure_rounds(pipes: dict[str, dict], size: int, steps: int, rounds: int, warmup: int, warmup_steps: int
                   ) -> dict[tuple[str, str], list[float]]:
    """`pipes`: engine → variant → what run_once takes. Every variant of every engine given runs once
    per round, in alternating order."""
    controls = [edge_picture(size, 0), edge_picture(size, size // 16)]
    variants = [(engine, name) for name in VARIANTS for engine in ("ortdiffusion", "torch") if engine in pipes]
    times: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
    for r in range(warmup + rounds):
        order = variants if r % 2 == 0 else variants[::-1]  # alternate, so drift in load hits both alike
        for engine, name in order:
            seconds = run_once(engine, name, pipes[engine][name], size, warmup_steps if r < warmup else steps,
                               controls)
            if r >= warmup:
                times[(engine, name)].append(seconds)
    return times


def summarize(size: int, times: dict[tuple[str, str], list[float]]) -> dict:
    medians = {f"{engine} | {name}": statistics.median(t) for (engine, name), t in times.items()}
    out = {"size": size, "median_s": medians, "runs_s": {f"{e} | {n}": t for (e, n), t in times.items()}}
    out["torch_over_ortdiffusion"] = {name: medians[f"torch | {name}"] / medians[f"ortdiffusion | {name}"]
                                      for name in VARIANTS}
    out["over_plain"] = {engine: {name: medians[f"{engine} | {name}"] / medians[f"{engine} | plain"]
                                  for name in VARIANTS if name != "plain"} for engine in ("ortdiffusion", "torch")}
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# ControlNet cost: ortdiffusion against diffusers (torch), `{result['preset']}` preset",
             "", f"`{result['command']}`", "",
             f"{m['cpus']} CPUs, load average {m['load_average_at_start'][0]:.1f} at start, "
             f"{m['load_average_at_end'][0]:.1f} at end (shared machine: ratios within one run only); "
             f"torch {m['torch']} ({m['torch_threads']} threads), onnxruntime {m['onnxruntime']}; "
             f"{result['steps']} DDIM steps, guidance 7.5, {result['rounds']} rounds after {result['warmup']} warm-up "
             f"round{'s' if result['warmup'] != 1 else ''}"
             + (f" ({result['warmup_steps']} steps)" if result.get("warmup_steps", result["steps"]) != result["steps"]
                else "") + ", medians."
             + (f" Peak resident memory {m['peak_rss_mb'] / 1024:.1f} GB." if "peak_rss_mb" in m else ""), ""]
    if result.get("low_memory"):
        lines += ["Low-memory mode: ortdiffusion runs every variant on one bundle with both ControlNets (plain: no "
                  "control image, the UNet gets zero residuals; ×1: scales (1, 0), the second ControlNet is "
                  "skipped); the torch ControlNet pipelines share the plain pipeline's modules. One engine is "
                  "loaded at a time, so torch / ortdiffusion compares two consecutive phases:", ""]
        for phase in result["phases"]:
            lines.append(f"- {phase['engine']}: load average {phase['load_average_at_start'][0]:.1f} at start, "
                         f"{phase['load_average_at_end'][0]:.1f} at end, {phase['load_s']:.0f} s to load, "
                         f"{phase['seconds']:.0f} s of rounds")
        lines.append("")
    for r in result["results"]:
        lines += [f"## {r['size']}×{r['size']}", "",
                  "| variant | ortdiffusion s | torch s | torch / ortdiffusion | ortdiffusion over plain "
                  "| torch over plain |",
                  "|---|---|---|---|---|---|"]
        for name in r["torch_over_ortdiffusion"]:
            o, t = r["median_s"][f"ortdiffusion | {name}"], r["median_s"][f"torch | {name}"]
            over = r["over_plain"]
            lines.append(f"| {name} | {o:.3f} | {t:.3f} | {r['torch_over_ortdiffusion'][name]:.2f}× | "
                         f"{over['ortdiffusion'].get(name, 1.0):.2f}× | {over['torch'].get(name, 1.0):.2f}× |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--sizes", default="64,128", help="comma-separated image sides")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--warmup-steps", type=int, default=None, help="steps of the warm-up rounds (default: --steps)")
    parser.add_argument("--low-memory", action="store_true",
                        help="one bundle with both ControlNets for ortdiffusion, and one engine loaded at a time")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="an existing diffusers checkpoint of the preset (default: build it)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep (and reuse) the ControlNets and bundles here (default: a temporary directory)")
    parser.add_argument("--build-only", action="store_true", help="export into --workdir and stop")
    parser.add_argument("--out", type=Path, help="the JSON; the Markdown goes beside it (.md)")
    args = parser.parse_args()
    if args.out is None and not args.build_only:
        parser.error("--out is required")
    import onnxruntime

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warmup_steps = args.steps if args.warmup_steps is None else args.warmup_steps
    options = [("preset", args.preset), ("sizes", args.sizes), ("steps", args.steps), ("rounds", args.rounds)]
    options += [("warmup", args.warmup)] if args.warmup != 1 else []
    options += [("warmup-steps", warmup_steps)] if warmup_steps != args.steps else []
    options += [("checkpoint", args.checkpoint)] if args.checkpoint else []
    options += [("workdir", args.workdir)] if args.workdir else []
    command = "python benchmarks/controlnet_cost.py " + " ".join(f"--{k} {v}" for k, v in options)
    command += " --low-memory" if args.low_memory else ""
    result = {"benchmark": "controlnet_cost", "preset": args.preset, "steps": args.steps, "rounds": args.rounds,
              "warmup": args.warmup, "warmup_steps": warmup_steps, "low_memory": args.low_memory,
              "command": f"{command} --out {args.out}",
              "machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(),
                          "python": platform.python_version(), "torch": torch.__version__,
                          "torch_threads": torch.get_num_threads(), "onnxruntime": onnxruntime.__version__}}
    with tempfile.TemporaryDirectory(prefix="controlnet-cost-") as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        checkpoint, nets, bundles = build(root, args.preset, args.checkpoint, args.low_memory)
        release()
        if args.build_only:
            print(f"built in {root}: {', '.join(str(b) for b in bundles.values())}; peak {peak_rss_mb():.0f} MB")
            return
        sizes = [int(s) for s in args.sizes.split(",")]
        if args.low_memory:
            times: dict[int, dict] = {size: {} for size in sizes}
            result["phases"] = []
            for engine in ("ortdiffusion", "torch"):
                phase = {"engine": engine, "load_average_at_start": os.getloadavg()}
                start = time.perf_counter()
                pipes = load_ours(bundles) if engine == "ortdiffusion" else load_torch(checkpoint, nets)
                phase["load_s"] = time.perf_counter() - start
                start = time.perf_counter()
                for size in sizes:
                    times[size].update(measure_rounds({engine: pipes}, size, args.steps, args.rounds, args.warmup,
                                                      warmup_steps))
                phase["seconds"] = time.perf_counter() - start
                phase["load_average_at_end"] = os.getloadavg()
                phase["peak_rss_mb"] = peak_rss_mb()
                result["phases"].append(phase)
                del pipes
                release()
            result["results"] = [summarize(size, times[size]) for size in sizes]
        else:
            pipes = {"ortdiffusion": load_ours(bundles), "torch": load_torch(checkpoint, nets)}
            result["results"] = [summarize(size, measure_rounds(pipes, size, args.steps, args.rounds, args.warmup,
                                                                warmup_steps)) for size in sizes]
    result["machine"]["load_average_at_end"] = os.getloadavg()
    result["machine"]["peak_rss_mb"] = peak_rss_mb()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
