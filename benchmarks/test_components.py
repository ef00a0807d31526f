"""Per-component and end-to-end timings of the tiny preset on the CPU provider."""

from __future__ import annotations

import numpy as np
import pytest

from ortdiffusion.runtime.png import encode_png, encode_pngs
from ortdiffusion.runtime.schedulers import SchedulerName, make_scheduler
from ortdiffusion.runtime.trace import Transfers


def test_tokenize(benchmark, pipe):
    benchmark(pipe.tokenizer, ["a red circle on the left", ""] * 4)


def test_text_encoder(benchmark, pipe):
    ids = pipe.tokenizer(["a red circle on the left", ""])
    benchmark(pipe.sessions["text_encoder"].run, {"input_ids": ids}, release_memory=True)


@pytest.mark.parametrize("batch", [1, 2, 8])
def test_unet_step(benchmark, pipe, batch):
    c = pipe.manifest.pipeline
    sample = np.random.default_rng(0).standard_normal((2 * batch, c.latent_channels, 16, 16)).astype(np.float32)
    ids = pipe.tokenizer(["a red circle"] * 2 * batch)
    emb = pipe.sessions["text_encoder"].run({"input_ids": ids})["last_hidden_state"]
    t = np.full((2 * batch,), 500.0, np.float32)
    benchmark(pipe.sessions["unet"].run, {"sample": sample, "timestep": t, "encoder_hidden_states": emb})


def test_image_decoder(benchmark, pipe):
    latents = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
    benchmark(pipe.image_decoder, latents, Transfers())


@pytest.mark.parametrize("name", [s.value for s in SchedulerName])
def test_scheduler_20_steps(benchmark, pipe, name):
    """A whole 20-step trajectory at SD's 64×64 latents (the scheduler's share of a generation)."""
    x = np.random.default_rng(0).standard_normal((2, 4, 64, 64)).astype(np.float32)

    def trajectory():
        scheduler = make_scheduler(name, pipe.manifest.pipeline.scheduler_config)
        scheduler.set_timesteps(20)
        sample = x
        for i in range(20):
            sample = scheduler.step(x, i, sample, noise=x if scheduler.needs_noise else None)

    benchmark(trajectory)


def test_png_encode(benchmark, pipe):
    result = pipe("a red circle", num_inference_steps=1, seed=0)
    benchmark(encode_png, result.images[0], result.metadata[0])


@pytest.mark.parametrize("how", ["one_by_one", "encode_pngs"])
def test_png_encode_four_512(benchmark, how):
    """A batch of four 512×512 pictures (SD's size; smooth colour fields with a little grain, which
    compress like photographs, unlike pure noise): one after another vs `encode_pngs` on threads."""
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:512, 0:512] / 512.0
    images, meta = [], []
    for k in range(4):
        field = np.stack([np.sin(6 * x + k), np.cos(5 * y - k), np.sin(4 * (x + y))], axis=-1) * 100 + 128
        images.append(Image.fromarray(np.clip(field + rng.normal(0, 4, field.shape), 0, 255).astype(np.uint8)))
        meta.append({"prompt": "a lighthouse at dusk", "seed": str(k)})
    if how == "one_by_one":
        benchmark(lambda: [encode_png(im, m) for im, m in zip(images, meta)])
    else:
        benchmark(encode_pngs, images, meta)


@pytest.mark.parametrize("batch", [1, 4])
def test_pipeline_end_to_end(benchmark, pipe, batch):
    benchmark(pipe, ["a red circle on the left"] * batch, seed=list(range(batch)), num_inference_steps=20)
