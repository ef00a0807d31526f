"""The tiny decoder (diffusers' AutoencoderTiny, TAESD's architecture) as a bundle's second image
decoder, chosen per call: against diffusers' own pipeline with `vae=AutoencoderTiny` (fp32, same
latents, PSNR ≥ 40 dB), on both executors; refused by name where a bundle has none."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import psnr

from ortdiffusion import Pipeline
from ortdiffusion.runtime import InvalidRequestError
from ortdiffusion.runtime.errors import ExportError

PROMPT = "a red circle on the left"


@pytest.fixture(scope="module")
def taesd_dir(tmp_path_factory):
    """A random-weight AutoencoderTiny shaped for the tiny preset (4 latent channels, 4× upsampling)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    tiny = AutoencoderTiny(encoder_block_out_channels=(16, 16, 16), decoder_block_out_channels=(16, 16, 16),
                           num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1))
    out = tmp_path_factory.mktemp("taesd") / "taesd"
    tiny.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_bundle_with_taesd(tiny_bundle, tiny_checkpoint, taesd_dir, tmp_path_factory):
    from ortdiffusion.export.bundle import add_tiny_decoder

    bundle = tmp_path_factory.mktemp("bundles") / "tiny-taesd"
    shutil.copytree(tiny_bundle, bundle)
    add_tiny_decoder(taesd_dir, tiny_checkpoint, bundle)
    return bundle


def test_bundle_lists_the_tiny_decoder(tiny_bundle_with_taesd):
    pipe = Pipeline.load(tiny_bundle_with_taesd, providers="cpu")
    assert pipe.manifest.decoders() == ("full", "tiny")
    assert pipe.providers["vae_decoder_tiny"] == "cpu"


@pytest.mark.parametrize("io_binding", [False, True])
def test_tiny_decoder_matches_diffusers(tiny_bundle_with_taesd, tiny_checkpoint, taesd_dir, io_binding):
    from diffusers import AutoencoderTiny, DDIMScheduler, StableDiffusionPipeline

    ref_pipe = StableDiffusionPipeline.from_pretrained(str(tiny_checkpoint), vae=AutoencoderTiny.from_pretrained(taesd_dir),
                                                       safety_checker=None, requires_safety_checker=False)
    ref_pipe.scheduler = DDIMScheduler.from_config(ref_pipe.scheduler.config)
    ref_pipe.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(3).standard_normal((1, 4, 16, 16)).astype(np.float32)
    kwargs = dict(num_inference_steps=6, guidance_scale=5.0)
    ref = ref_pipe(PROMPT, latents=torch.from_numpy(latents), **kwargs).images[0]
    pipe = Pipeline.load(tiny_bundle_with_taesd, providers="cpu", io_binding=io_binding)
    tiny = pipe(PROMPT, latents=latents, scheduler="ddim", decoder="tiny", **kwargs)
    full = pipe(PROMPT, latents=latents, scheduler="ddim", **kwargs)
    assert np.asarray(tiny.images[0]).std() > 5
    assert psnr(full.images[0], tiny.images[0]) < 30, "the two decoders are different networks"
    assert psnr(tiny.images[0], ref) >= 40.0, f"PSNR {psnr(tiny.images[0], ref):.1f} dB"
    assert tiny.metadata[0]["decoder"] == "tiny" and "decoder" not in full.metadata[0]


def test_a_bundle_without_one_refuses_the_tiny_decoder_by_name(tiny_pipeline):
    with pytest.raises(InvalidRequestError, match=r"decoder: 'tiny' is not one of this bundle's decoders; allowed: full"):
        tiny_pipeline(PROMPT, decoder="tiny")


def test_export_refuses_a_tiny_decoder_that_is_not_one(tmp_path):
    from ortdiffusion.export.bundle import ExportOptions, check_options

    with pytest.raises(ExportError, match="not a diffusers AutoencoderTiny directory"):
        check_options(ExportOptions(tiny_decoder=tmp_path))


def test_compare_covers_the_tiny_decoder(tiny_bundle_with_taesd, tiny_checkpoint):
    from ortdiffusion.export.checkpoint import load_checkpoint
    from ortdiffusion.export.compare import TOLERANCES, compare_components
    from ortdiffusion.runtime.manifest import Precision, load_manifest

    lines = compare_components(load_checkpoint(tiny_checkpoint), tiny_bundle_with_taesd,
                               load_manifest(tiny_bundle_with_taesd), TOLERANCES[Precision.FP32], seed=1)
    tiny = [line for line in lines if line.what.startswith("vae_decoder_tiny.")]
    assert len(tiny) == 2 and all(line.passed for line in tiny), tiny
