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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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


def build(root: Path, preset: str) -> tuple[Path, list[Path], dict[str, Path]]:
    from ortdiffusion.export.bundle import ExportOptions, export_checkpoint
    from ortdiffusion.export.controlnet import random_controlnet
    from ortdiffusion.export.presets import build_checkpoint

    checkpoint = build_checkpoint(preset, root / preset)
    vae = json.loads((checkpoint / "vae" / "config.json").read_text())
    scale = 2 ** (len(vae["block_out_channels"]) - 1)
    nets = [random_controlnet(checkpoint / "unet", root / f"controlnet{k}", k, vae_scale=scale) for k in range(2)]
    bundles = {}
    for name, used in (("plain", ()), ("controlnet x1", nets[:1]), ("controlnet x2", nets)):
        bundles[name] = root / name.replace(" ", "-")
        export_checkpoint(checkpoint, bundles[name], ExportOptions(controlnets=tuple(used)))
    return checkpoint, nets, bundles


def engines(checkpoint: Path, nets: list[Path], bundles: dict[str, Path]):
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    from ortdiffusion import Pipeline

    ours = {name: Pipeline.load(path, providers="cpu") for name, path in bundles.items()}
    models = [ControlNetModel.from_pretrained(str(n)) for n in nets]
    kwargs = {"safety_checker": None, "requires_safety_checker": False}
    torch_pipes = {
        "plain": StableDiffusionPipeline.from_pretrained(str(checkpoint), **kwargs),
        "controlnet x1": StableDiffusionControlNetPipeline.from_pretrained(str(checkpoint), controlnet=models[0],
                                                                          **kwargs),
        "controlnet x2": StableDiffusionControlNetPipeline.from_pretrained(str(checkpoint), controlnet=models,
                                                                          **kwargs),
    }
    for pipe in torch_pipes.values():
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return ours, torch_pipes


def run_once(engine: str, name: str, pipe, size: int, steps: int, controls: list[Image.Image]) -> float:
    control = {"plain": [], "controlnet x1": controls[:1], "controlnet x2": controls}[name]
    start = time.perf_counter()
    if engine == "ortdiffusion":
        extra = {"control_image": control} if control else {}
        pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, scheduler="ddim", seed=0, width=size, height=size,
             **extra)
    else:
        extra = {"image": control if len(control) > 1 else control[0]} if control else {}
        with torch.inference_mode():
            pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, width=size, height=size,
                 generator=torch.Generator().manual_seed(0), **extra)
    return time.perf_counter() - start


def measure(ours: dict, torch_pipes: dict, size: int, steps: int, rounds: int, warmup: int) -> dict:
    controls = [edge_picture(size, 0), edge_picture(size, size // 16)]
    variants = [(engine, name) for name in ours for engine in ("ortdiffusion", "torch")]
    times: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
    for r in range(warmup + rounds):
        order = variants if r % 2 == 0 else variants[::-1]  # alternate, so drift in load hits both alike
        for engine, name in order:
            pipe = ours[name] if engine == "ortdiffusion" else torch_pipes[name]
            seconds = run_once(engine, name, pipe, size, steps, controls)
            if r >= warmup:
                times[(engine, name)].append(seconds)
    medians = {f"{engine} | {name}": statistics.median(t) for (engine, name), t in times.items()}
    out = {"size": size, "median_s": medians, "runs_s": {f"{e} | {n}": t for (e, n), t in times.items()}}
    out["torch_over_ortdiffusion"] = {name: medians[f"torch | {name}"] / medians[f"ortdiffusion | {name}"]
                                      for name in ours}
    out["over_plain"] = {engine: {name: medians[f"{engine} | {name}"] / medians[f"{engine} | plain"]
                                  for name in ours if name != "plain"} for engine in ("ortdiffusion", "torch")}
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# ControlNet cost: ortdiffusion against diffusers (torch), `{result['preset']}` preset",
             "", f"`{result['command']}`", "",
             f"{m['cpus']} CPUs, load average {m['load_average_at_start'][0]:.1f} at start, "
             f"{m['load_average_at_end'][0]:.1f} at end (shared machine: ratios within one run only); "
             f"torch {m['torch']} ({m['torch_threads']} threads), onnxruntime {m['onnxruntime']}; "
             f"{result['steps']} DDIM steps, guidance 7.5, {result['rounds']} rounds after {result['warmup']} warm-up, "
             "medians.", ""]
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
    parser.add_argument("--out", type=Path, required=True, help="the JSON; the Markdown goes beside it (.md)")
    args = parser.parse_args()
    import onnxruntime

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = {"benchmark": "controlnet_cost", "preset": args.preset, "steps": args.steps, "rounds": args.rounds,
              "warmup": args.warmup, "command": "python benchmarks/controlnet_cost.py " + " ".join(
                  f"--{k} {v}" for k, v in (("preset", args.preset), ("sizes", args.sizes), ("steps", args.steps),
                                            ("rounds", args.rounds), ("out", args.out))),
              "machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(),
                          "python": platform.python_version(), "torch": torch.__version__,
                          "torch_threads": torch.get_num_threads(), "onnxruntime": onnxruntime.__version__}}
    with tempfile.TemporaryDirectory(prefix="controlnet-cost-") as tmp:
        checkpoint, nets, bundles = build(Path(tmp), args.preset)
        ours, torch_pipes = engines(checkpoint, nets, bundles)
        result["results"] = [measure(ours, torch_pipes, int(s), args.steps, args.rounds, args.warmup)
                             for s in args.sizes.split(",")]
    result["machine"]["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
