"""Fit a bundle's linear latent → RGB preview map against its own decoder, and write it into the
bundle's manifest (`pipeline.latent_rgb`, read by ortdiffusion/runtime/preview.py).

    python tools/fit_latent_rgb.py builtin            # the built-in bundle, in place
    python tools/fit_latent_rgb.py path/to/bundle --images 32

The map is fitted on the final latents of real generations (random captions of the built-in
model's scene grammar, so it suits the built-in model best) against the decoder's pixels, averaged
over the pixels each latent pixel decodes to. The manifest's field is not hashed (the bundle hash
covers the files the manifest lists), so writing it changes no model hash.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

from ortdiffusion import Pipeline
from ortdiffusion.builtin.scenes import caption_for, random_scene
from ortdiffusion.runtime.manifest import MANIFEST_NAME
from ortdiffusion.runtime.preview import fit_latent_rgb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a bundle directory or a model name (builtin)")
    parser.add_argument("--images", type=int, default=32, help="generations to fit on (default 32)")
    parser.add_argument("--seed", type=int, default=2028)
    args = parser.parse_args(argv)

    pipe = Pipeline.load(args.model, providers="cpu")
    rng = random.Random(args.seed)
    finals = []
    for k in range(args.images):
        seen: list[np.ndarray] = []
        pipe(caption_for(random_scene(rng), rng), seed=args.seed + k, callback=lambda i, n, x: seen.append(x.copy()))
        finals.append(seen[-1])
    latents = np.concatenate(finals)
    pixels = pipe._decode_scaled(latents)
    fitted = fit_latent_rgb(latents, pixels)

    n, _, h, w = latents.shape
    f = pixels.shape[2] // h
    pooled = pixels.reshape(n, 3, h, f, w, f).mean(axis=(3, 5))
    rmse = float(np.sqrt(((fitted(latents) - pooled) ** 2).mean()))
    print(f"fitted on {n} images: RMSE {rmse:.3f} on the [-1, 1] scale (the pixels' own std {pooled.std():.3f})")

    path = pipe.bundle_dir / MANIFEST_NAME
    data = json.loads(path.read_text(encoding="utf-8"))
    data["pipeline"]["latent_rgb"] = fitted.rows()
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")  # as Manifest.to_json writes it
    print(f"wrote pipeline.latent_rgb into {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
