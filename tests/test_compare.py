"""`ortdiffusion compare` judges: a bundle that does not compute what the checkpoint does must fail.

The CLI tests (test_cli.py) show a faithful export passing; here diffusers runs a checkpoint whose
UNet output is scaled, while ONNX Runtime runs the bundle of the unscaled one."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from ortdiffusion.export.compare import TOLERANCES, compare_end_to_end
from ortdiffusion.runtime.manifest import Precision


def scaled_unet(checkpoint, dest, scale):
    shutil.copytree(checkpoint, dest)
    (weights,) = (dest / "unet").glob("*.safetensors")
    state = load_file(weights)
    state["conv_out.weight"] = state["conv_out.weight"] * scale
    save_file(state, weights)
    return dest


def judge(checkpoint, bundle, precision):
    lines, divergence, _, _ = compare_end_to_end(checkpoint, bundle, "a red circle on the left", steps=6,
                                                 guidance=7.5, scheduler="ddim", seed=0, tol=TOLERANCES[precision])
    image, latents = lines
    assert image.what.startswith("image") and latents.what == "latents after the last step"
    return image, latents, divergence


def test_a_unet_2_percent_off_fails_on_its_latents_though_its_image_passes(tiny_checkpoint, tiny_bundle, tmp_path):
    image, latents, divergence = judge(scaled_unet(tiny_checkpoint, tmp_path / "off", 1.02), tiny_bundle, Precision.FP32)
    assert image.passed and image.figures["psnr_db"] >= 40
    assert not latents.passed, latents.figures
    assert 1e-3 < latents.figures["rel_l2_error"] < 1e-2  # the limit before was 1e-2: it passed
    # divergence grows step by step, as a wrong UNet's error accumulates
    assert divergence[-1]["rel_l2_error"] > divergence[0]["rel_l2_error"]


@pytest.mark.parametrize("precision, scale", [(Precision.FP16, 2.0), (Precision.INT8, 6.0)])
def test_fp16_and_int8_latent_limits_can_fail(tiny_checkpoint, tiny_bundle, tmp_path, precision, scale):
    """Their limits were 100× the component's (2 and 25): above the √2 between unrelated latents."""
    _, latents, _ = judge(scaled_unet(tiny_checkpoint, tmp_path / "off", scale), tiny_bundle, precision)
    assert not latents.passed, latents.figures
    assert latents.figures["rel_l2_error"] < 1.0


def test_a_checkpoint_saved_in_fp16_is_compared_in_fp32(tiny_checkpoint, tiny_bundle, tmp_path):
    """The built-in checkpoint is saved in fp16: diffusers loaded its text encoder in fp16 beside an
    fp32 UNet and compare died with `c10::Half != float`. The torch side now runs in fp32."""
    import torch

    half = tmp_path / "half"
    shutil.copytree(tiny_checkpoint, half)
    for weights in half.glob("*/*.safetensors"):
        save_file({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in load_file(weights).items()}, weights)
    config = half / "text_encoder" / "config.json"  # as transformers writes it for fp16 weights (the built-in's)
    config.write_text(json.dumps({**json.loads(config.read_text()), "dtype": "float16"}))
    image, latents, _ = judge(half, tiny_bundle, Precision.FP16)
    assert image.figures["psnr_db"] > 20, image.figures  # fp16-rounded weights against the fp32 export: close


def test_compare_covers_the_image_encoder_and_the_image_tasks(tiny_checkpoint, tiny_bundle):
    """The image encoder is compared like every component; img2img and inpainting end to end against
    diffusers' own pipelines — and a bundle without the encoder is compared without those lines."""
    from ortdiffusion.export.compare import compare

    report = compare(tiny_checkpoint, tiny_bundle, steps=6, guidance=5.0)
    names = [line.what for line in report.lines]
    assert any(n.startswith("vae_encoder.latent_mean") for n in names)
    tasks = [line for line in report.lines if line.what.startswith(("image-to-image", "inpainting"))]
    assert [t.what.split(" ")[0] for t in tasks] == ["image-to-image", "inpainting"]
    assert all(t.passed for t in tasks), [(t.what, t.figures) for t in tasks]
    assert report.passed
