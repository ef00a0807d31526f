"""Where the built-in model's colours drift, and why (issue 30): ΔE2000 and the ±12° hue window of
`ortdiffusion.builtin.colour`, on three sets of images, through the engine:

1. the held-out evaluation prompts (one object, every attribute stated, and the held-out colour–shape
   pairs), at the defaults: what `tools/eval_builtin.py` reports
2. short prompts, "a {colour} {shape}" for all 32 pairs (the held-out pairs among them), the way a
   newcomer types them, across guidance scales and with `guidance_rescale`
3. the VAE alone: rendered scenes of every colour encoded and decoded (the bundle's own encoder and
   decoder), to tell the decoder's share of the drift from the denoiser's

    python benchmarks/builtin_colour.py --out benchmarks/results/builtin-colour-cpu2.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ortdiffusion.builtin import dataset
from ortdiffusion.builtin.colour import read_colour, summarise
from ortdiffusion.builtin.evaluate import draw_scenes
from ortdiffusion.builtin.scenes import ANCHORS, COLORS, HELD_OUT_PAIRS, SHAPES, Scene, SceneObject, render
from ortdiffusion.models import resolve_bundle
from ortdiffusion.runtime.pipeline import Pipeline


def _brief(summary: dict) -> dict:
    """The per-colour figures a reader compares, without the per-image lists."""
    return {"in_hue_window": round(summary["in_hue_window"], 3), "worst_delta_e_mean": summary["worst_delta_e_mean"],
            "targets_met": summary["targets"]["met"],
            "per_colour": {name: {k: e.get(k) for k in ("mean_rgb", "hue_of_mean", "delta_e_mean", "delta_e_max",
                                                         "in_hue_window", "found", "images")}
                           for name, e in summary["per_colour"].items()}}


def generated(pipe, scenes: list[Scene], seeds: int, **kwargs) -> dict:
    return summarise([read_colour(img, s, found) for img, s, found in draw_scenes(pipe, scenes, seeds, **kwargs)])


def vae_round_trip(bundle: Path) -> dict:
    encoder = ort.InferenceSession(str(bundle / "vae_encoder.onnx"), providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(bundle / "vae_decoder.onnx"), providers=["CPUExecutionProvider"])
    scenes = [Scene((SceneObject(c, s, z, *ANCHORS[p], position=p),))
              for c in COLORS for s in SHAPES for z in ("small", "large") for p in ("left", "center")]
    pixels = np.stack([np.asarray(render(s), np.float32) / 127.5 - 1 for s in scenes]).transpose(0, 3, 1, 2)
    mean = encoder.run(["latent_mean"], {"sample": pixels})[0]  # the mean of the posterior: no sampling noise
    out = decoder.run(None, {"latent_sample": mean})[0]
    images = ((out.transpose(0, 2, 3, 1) + 1) * 127.5).clip(0, 255).round().astype(np.uint8)
    return {"rendered": summarise([read_colour(render(s), s) for s in scenes]),
            "round_trip": summarise([read_colour(im, s) for im, s in zip(images, scenes)])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--guidance", default="1.5,3,5,7.5")
    p.add_argument("--rescale", default="0.7", help="guidance_rescale values tried at the default guidance")
    args = p.parse_args()
    bundle = resolve_bundle(args.model, print)
    pipe = Pipeline.load(bundle, providers="cpu")
    c = pipe.manifest.pipeline
    start = time.perf_counter()
    sets = dataset.eval_scenes()
    held_out_prompts = sets["one_object"] + sets["held_out_pairs"]
    short = [Scene((SceneObject(col, shape, "large", 32, 32),), caption=f"a {col} {shape}")
             for col in COLORS for shape in SHAPES]
    report = {"model_hash": pipe.model_hash[:16], "seeds": args.seeds,
              "defaults": {"guidance": c.default_guidance, "steps": c.default_steps, "scheduler": c.default_scheduler},
              "held_out_pairs": [list(pair) for pair in HELD_OUT_PAIRS]}
    report["held_out_prompts_at_defaults"] = _brief(generated(pipe, held_out_prompts, args.seeds))
    print("held-out prompts:", json.dumps(report["held_out_prompts_at_defaults"]["per_colour"]), flush=True)
    report["short_prompts"] = []
    tries = [(float(g), 0.0) for g in args.guidance.split(",")]
    tries += [(c.default_guidance, float(r)) for r in args.rescale.split(",") if r]
    for guidance, rescale in tries:
        row = _brief(generated(pipe, short, args.seeds, guidance_scale=guidance, guidance_rescale=rescale))
        row.update(guidance=guidance, guidance_rescale=rescale)
        report["short_prompts"].append(row)
        print(f"short prompts, guidance {guidance:g} rescale {rescale:g}: in window {row['in_hue_window']:.2f}, "
              f"worst mean dE {row['worst_delta_e_mean']:.1f}, " + ", ".join(
                  f"{n} {e['delta_e_mean']}/{e['in_hue_window']:.2f}" for n, e in row["per_colour"].items()), flush=True)
    vae = vae_round_trip(Path(bundle))
    report["vae"] = {k: _brief(v) for k, v in vae.items()}
    print("VAE round trip:", json.dumps(report["vae"]["round_trip"]["per_colour"]), flush=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
