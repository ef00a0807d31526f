"""The shipped model: a genuine diffusers checkpoint and the bundle exported from it."""

from __future__ import annotations

import pytest

from ortdiffusion.models import builtin_bundle, builtin_checkpoint

pytestmark = pytest.mark.skipif(not (builtin_bundle() / "manifest.json").is_file(), reason="no built-in model shipped yet")


def test_shipped_bundle_was_exported_from_the_shipped_weights():
    from ortdiffusion.export.checkpoint import weights_sha256
    from ortdiffusion.runtime.manifest import load_manifest, verify_files

    manifest = load_manifest(builtin_bundle())
    verify_files(builtin_bundle(), manifest, remember=False)  # every byte, not what a load remembered
    assert manifest.source.weights_sha256 == weights_sha256(builtin_checkpoint())


def test_shipped_checkpoint_loads_in_diffusers_offline():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(builtin_checkpoint()), local_files_only=True)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64


def test_package_data_fits_in_40_mb():
    size = sum(f.stat().st_size for d in (builtin_bundle(), builtin_checkpoint()) for f in d.rglob("*") if f.is_file())
    assert size <= 40 * 2**20, f"{size / 2**20:.1f} MiB"


def test_builtin_draws_what_it_is_asked():
    """Not a quality benchmark (that is tools/eval_builtin.py): a red circle comes out red and round."""
    from ortdiffusion import Pipeline
    from ortdiffusion.builtin.evaluate import read_objects

    pipe = Pipeline.load(builtin_bundle())
    images = pipe("a red circle", seed=list(range(4)), num_images_per_prompt=4).images
    found = [read_objects(img, max_objects=1) for img in images]
    assert sum(bool(f) and f[0].color == "red" for f in found) >= 3


def test_builtin_puts_the_object_where_the_prompt_says():
    """The position words steer the layout, not the seed: the same seeds, "on the left" and "on the
    right", give objects on either side (the model before session 4 drew the same picture for both)."""
    from ortdiffusion import Pipeline
    from ortdiffusion.builtin.evaluate import read_objects

    pipe = Pipeline.load(builtin_bundle())
    seeds = list(range(6))
    sides = {}
    for side in ("left", "right"):
        images = pipe(f"a red circle on the {side}", seed=seeds, num_images_per_prompt=len(seeds)).images
        sides[side] = [objs[0].x if (objs := read_objects(img, max_objects=1)) else None for img in images]
    assert sum(x is not None and x < 32 for x in sides["left"]) >= 4, sides
    assert sum(x is not None and x > 32 for x in sides["right"]) >= 4, sides


def test_draw_scenes_seeds_each_job_and_reads_it_once():
    """The evaluators' one drawing loop: jobs in scene-major order, each job's seed 1000 * k + its
    index (job 3 lands alone in the last batch of 3, so it is drawn exactly as a call of its own), and
    the objects it hands on are what `score` and `read_colour` read."""
    import numpy as np

    from ortdiffusion import Pipeline
    from ortdiffusion.builtin.colour import read_colour
    from ortdiffusion.builtin.evaluate import draw_scenes, score
    from ortdiffusion.builtin.scenes import Scene, SceneObject

    pipe = Pipeline.load(builtin_bundle())
    scenes = [Scene((SceneObject(c, "circle", "large", 32, 32),), caption=f"a {c} circle") for c in ("red", "blue")]
    out = list(draw_scenes(pipe, scenes, seeds=2, batch=3, num_inference_steps=4))
    assert [s.caption for _, s, _ in out] == ["a red circle", "a red circle", "a blue circle", "a blue circle"]
    # job 3 is (blue, k=1): seed 1000 + 3
    alone = pipe("a blue circle", seed=1003, num_inference_steps=4).images[0]
    assert np.array_equal(np.asarray(alone), np.asarray(out[3][0]))
    for image, scene, found in out:
        assert score(image, scene, found) == score(image, scene)
        assert read_colour(image, scene, found) == read_colour(image, scene)
