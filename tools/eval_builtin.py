"""Measure the built-in model's prompt adherence with the package's evaluator, through the engine.

    python tools/eval_builtin.py --model builtin --out benchmarks/results/builtin-quality.json \
        --grid docs/builtin-samples.png

The prompts are the held-out evaluation sets of `ortdiffusion.builtin.dataset` (never training
captions): one object with every attribute stated, two objects with a relation, and one object of
a colour–shape pair never drawn in training. Each is generated with `--seeds` seeds, for every
scheduler at 5, 10, 20 and 50 steps, and scored by `ortdiffusion.builtin.evaluate.score`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ortdiffusion.builtin import dataset
from ortdiffusion.builtin.colour import read_colour, summarise
from ortdiffusion.builtin.evaluate import draw_scenes, score
from ortdiffusion.runtime.quality import psnr
from ortdiffusion.models import resolve_bundle
from ortdiffusion.runtime.pipeline import Pipeline
from ortdiffusion.runtime.schedulers import SchedulerName

STEPS = (5, 10, 20, 50)
#: precision → the export variant (target, precision) of the model it is measured on.
PRECISIONS = {"fp32": ("generic", "fp32"), "fp16": ("generic", "fp16"), "int8": ("cpu", "int8")}


def adherence(pipe, scenes, seeds: int, steps: int, scheduler: str, guidance: float, batch: int = 32,
              colours: list | None = None) -> dict:
    """Share of images right per attribute; one-object images' colour readings go into `colours`."""
    rows = []
    for img, s, found in draw_scenes(pipe, scenes, seeds, batch, num_inference_steps=steps,
                                     guidance_scale=guidance, scheduler=scheduler):
        rows.append(score(img, s, found))
        if colours is not None and len(s.objects) == 1:
            colours.append(read_colour(img, s, found))
    out = {"n": len(rows), "all": float(np.mean([r["all"] for r in rows]))}
    for key in ("color", "shape", "position", "relation", "objects"):
        vals = [r[key] for r in rows if key in r]
        if vals:
            out[key] = float(np.mean(vals))
    if any("color" in r for r in rows):
        out["color_and_shape"] = float(np.mean([r["color"] and r["shape"] for r in rows]))
    return out


def grid(pipe, scenes, path: Path, steps: int, scheduler: str, guidance: float) -> None:
    result = pipe([s.caption for s in scenes], seed=list(range(len(scenes))), num_inference_steps=steps,
                  guidance_scale=guidance, scheduler=scheduler)
    cell, cols = 160, 4
    rows = (len(scenes) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * cell, rows * (cell + 28)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (img, s) in enumerate(zip(result.images, scenes)):
        x, y = (i % cols) * cell, (i // cols) * (cell + 28)
        canvas.paste(img.resize((cell - 8, cell - 8), Image.NEAREST), (x + 4, y + 4))
        words, line = s.caption.split(), ""
        lines = []
        for w in words:
            if len(line) + len(w) > 26:
                lines.append(line)
                line = ""
            line += w + " "
        lines.append(line)
        for j, text in enumerate(lines[:2]):
            draw.text((x + 4, y + cell - 2 + 12 * j), text.strip(), fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def evaluate(pipe, sets: dict, seeds: int, steps: int, scheduler: str, guidance: float, precision: str) -> dict:
    row = {"scheduler": scheduler, "steps": steps, "precision": precision, "seeds_per_prompt": seeds}
    start = time.perf_counter()
    colours: list = []
    for name, scenes in sets.items():
        row[name] = adherence(pipe, scenes, seeds, steps, scheduler, guidance, colours=colours)
    row["seconds"] = time.perf_counter() - start
    row["colour"] = summarise(colours)
    print(f"{precision} {scheduler:>16} {steps:>3} steps: one {row['one_object']['all']:.2f} "
          f"(colour+shape {row['one_object']['color_and_shape']:.2f}, position {row['one_object']['position']:.2f}) "
          f"two {row['two_objects']['all']:.2f} held-out {row['held_out_pairs']['all']:.2f} "
          f"colour: worst mean dE2000 {row['colour']['worst_delta_e_mean']:.1f}, "
          f"in hue window {row['colour']['in_hue_window']:.2f}", flush=True)
    return row


def psnr_against_fp32(pipes: dict, sets: dict, steps: int, scheduler: str, guidance: float, per_set: int = 10) -> dict:
    """How far each other precision's images are from fp32's, same prompts and seeds (PSNR, dB)."""
    scenes = [s for group in sets.values() for s in group[:per_set]]
    prompts, seeds = [s.caption for s in scenes], list(range(len(scenes)))

    def images(pipe) -> list[np.ndarray]:
        result = pipe(prompts, seed=seeds, num_inference_steps=steps, scheduler=scheduler, guidance_scale=guidance)
        return [np.asarray(im, np.float64) for im in result.images]

    reference = images(pipes["fp32"])
    out = {"images": len(scenes), "settings": f"defaults ({scheduler}, {steps} steps, guidance {guidance:g}), "
                                              f"{per_set} prompts per evaluation set, one seed each"}
    for name, pipe in pipes.items():
        if name == "fp32":
            continue
        values = [psnr(a, b) for a, b in zip(images(pipe), reference)]
        out[f"{name}_vs_fp32_psnr_db"] = {"median": float(np.median(values)), "min": float(np.min(values))}
    return out


def markdown(report: dict) -> str:
    """The README's tables: adherence by precision at the defaults, then by scheduler and steps."""
    def cells(row: dict) -> str:
        one, two, held = row["one_object"], row["two_objects"], row["held_out_pairs"]
        return (f"{one['color_and_shape']:.2f} | {one['position']:.2f} | {one['all']:.2f} | {two['all']:.2f} | "
                f"{held['color_and_shape']:.2f} | {held['all']:.2f}")

    head = ("one object: colour+shape | position | all | two objects: all | held-out pairs: colour+shape | all |\n"
            "|---|---|---|---|---|---|---|")
    d = report["defaults"]
    lines = [f"By precision ({d['scheduler']}, {d['steps']} steps, guidance {report['guidance_scale']:g}, "
             f"{report['by_precision'][0]['one_object']['n']} images per set):", "", "| precision | " + head]
    lines += [f"| {r['precision']} | {cells(r)} |" for r in report["by_precision"]]
    n = report["results"][0]["one_object"]["n"] if report["results"] else 0
    lines += ["", f"By scheduler and steps (fp32, {n} images per set):", "", "| scheduler | steps | " + head + "---|"]
    lines += [f"| {r['scheduler']} | {r['steps']} | {cells(r)} |" for r in report["results"]]
    return "\n".join(lines + ["", colour_table(report["by_precision"][0])])


def colour_table(row: dict) -> str:
    """Each palette colour as drawn (one-object and held-out-pair images at the defaults)."""
    c = row["colour"]
    lines = [f"Colour ({row['precision']}, {c['images']} one-object images; ΔE2000 of each image's mean object "
             f"colour against the palette; hue window ±{c['targets']['hue_window_degrees']:g}°):", "",
             "| colour | palette | drawn (mean) | hue: palette → drawn | ΔE2000 mean | median | max | in hue window |",
             "|---|---|---|---|---|---|---|---|"]
    for name, e in c["per_colour"].items():
        if "mean_rgb" not in e:
            lines.append(f"| {name} | {tuple(e['palette_rgb'])} | none found | | | | | {e['in_hue_window']:.2f} |")
            continue
        drawn = tuple(round(v) for v in e["mean_rgb"])
        lines.append(f"| {name} | {tuple(e['palette_rgb'])} | {drawn} | {e['palette_hue']:.0f}° → {e['hue_of_mean']:.0f}° | "
                     f"{e['delta_e_mean']:.1f} | {e['delta_e_median']:.1f} | {e['delta_e_max']:.1f} | "
                     f"{e['in_hue_window']:.2f} |")
    lines.append(f"\nAll colours: {c['in_hue_window']:.2f} in the hue window; worst mean ΔE2000 "
                 f"{c['worst_delta_e_mean']:.1f}; targets (≤ {c['targets']['delta_e_mean_each_colour_max']:g} each, "
                 f"≥ {c['targets']['in_hue_window_min']:.0%} in the window) {'met' if c['targets']['met'] else 'not met'}.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--grid", type=Path)
    p.add_argument("--seeds", type=int, default=2, help="seeds per prompt at the default settings")
    p.add_argument("--per-set", type=int, default=48, help="prompts per evaluation set (at most 48; 30 held-out)")
    p.add_argument("--precisions", default="fp32,fp16,int8", help="measured at the default scheduler and steps")
    p.add_argument("--table-seeds", type=int, default=1, help="seeds per prompt in the scheduler × steps table")
    p.add_argument("--table-per-set", type=int, default=24, help="prompts per set in the scheduler × steps table")
    p.add_argument("--guidance", type=float, default=None, help="default: the pipeline's default")
    p.add_argument("--schedulers", default=",".join(s.value for s in SchedulerName))
    p.add_argument("--steps", default=",".join(map(str, STEPS)))
    args = p.parse_args()
    pipes = {name: Pipeline.load(resolve_bundle(args.model, print, *PRECISIONS[name]), providers="cpu")
             for name in args.precisions.split(",")}
    pipe = pipes["fp32"]
    c = pipe.manifest.pipeline
    guidance = args.guidance if args.guidance is not None else c.default_guidance
    everything = dataset.eval_scenes()
    sets = {k: v[:args.per_set] for k, v in everything.items()}
    table_sets = {k: v[:args.table_per_set] for k, v in everything.items()}
    report = {"env": {"machine": platform.machine(), "cpu": _cpu(), "cores": os.cpu_count(),
                      "python": platform.python_version(),
                      "providers": pipe.providers, "model_hash": pipe.model_hash[:16]},
              "guidance_scale": guidance, "defaults": {"scheduler": c.default_scheduler, "steps": c.default_steps},
              "by_precision": [], "results": []}
    for name, variant in pipes.items():
        report["by_precision"].append(
            evaluate(variant, sets, args.seeds, c.default_steps, c.default_scheduler, guidance, name))
    if "fp32" in pipes and len(pipes) > 1:
        report["psnr_against_fp32"] = psnr_against_fp32(pipes, sets, c.default_steps, c.default_scheduler, guidance)
    for scheduler in args.schedulers.split(","):
        for steps in map(int, args.steps.split(",")):
            report["results"].append(evaluate(pipe, table_sets, args.table_seeds, steps, scheduler, guidance, "fp32"))
    one = dict(prompt="a red circle on the left", seed=0)
    pipe(**one)  # warm
    times = [pipe(**one).timings.total for _ in range(5)]
    report["speed"] = {"one_image_default_settings_s": float(np.median(times)), "runs": times,
                       "settings": {"steps": c.default_steps, "guidance": guidance,
                                    "scheduler": c.default_scheduler, "size": "64x64"}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(markdown(report))
    if args.grid:
        picks = sets["one_object"][:6] + sets["two_objects"][:4] + sets["held_out_pairs"][:2]
        grid(pipe, picks, args.grid, c.default_steps, c.default_scheduler, guidance)


if __name__ == "__main__":
    main()
