"""BERT-conditioned latent diffusion (diffusers' LDMTextToImagePipeline: an LDMBert text encoder with
a WordPiece tokenizer, a UNet, a KL autoencoder called `vqvae`) through the same export and the same
loop: against diffusers' own pipeline on a tiny checkpoint (fp32, same latents, PSNR ≥ 40 dB)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import psnr

from ortdiffusion import Pipeline

PROMPT = "a red circle on the left"


@pytest.fixture(scope="module")
def ldm(tmp_path_factory):
    from ortdiffusion.export.bundle import export_checkpoint
    from ortdiffusion.export.presets import build_checkpoint

    checkpoint = build_checkpoint("tiny-ldm", tmp_path_factory.mktemp("ckpt") / "tiny-ldm")
    bundle = tmp_path_factory.mktemp("bundles") / "tiny-ldm"
    export_checkpoint(checkpoint, bundle)
    return checkpoint, Pipeline.load(bundle, providers="cpu")


def test_ldm_bundle_is_its_family_with_its_defaults(ldm):
    _, pipe = ldm
    p = pipe.manifest.pipeline
    assert (p.family, p.default_steps, p.default_guidance, p.vae_scale_factor) == ("latent-diffusion", 50, 6.0, 8)
    assert p.pad_token_id == 0  # BERT's [PAD], not CLIP's
    assert pipe.manifest.unet_feeds()["encoder_hidden_states"] == "text_encoder/last_hidden_state"


@pytest.mark.parametrize("guidance", [6.0, 1.0])
def test_ldm_matches_diffusers(ldm, guidance):
    from diffusers import LDMTextToImagePipeline

    checkpoint, pipe = ldm
    ref_pipe = LDMTextToImagePipeline.from_pretrained(str(checkpoint))
    ref_pipe.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(3).standard_normal((1, 4, 16, 16)).astype(np.float32)
    ref = ref_pipe(PROMPT, latents=torch.from_numpy(latents), num_inference_steps=8, guidance_scale=guidance).images[0]
    ours = pipe(PROMPT, latents=latents, num_inference_steps=8, guidance_scale=guidance, scheduler="ddim").images[0]
    assert ours.size == ref.size == (128, 128)
    assert np.asarray(ours).std() > 5, "a flat image would make the comparison meaningless"
    assert psnr(ours, ref) >= 40.0, f"PSNR {psnr(ours, ref):.1f} dB"


def test_compare_covers_ldm(ldm):
    from ortdiffusion.export.compare import compare

    checkpoint, pipe = ldm
    report = compare(checkpoint, pipe.bundle_dir, steps=4)
    assert report.passed, [line for line in report.lines if not line.passed]
