"""The plan and its two executors: a new UNet conditioning input is data (issue 23).

A class-conditioned UNet (diffusers' `num_class_embeds`: `class_labels` as a UNet input) needs, on
the runtime side, nothing but its manifest entry (`unet_feeds["class_labels"] = "request"`): the plan
builder takes the labels from the call, doubles them for guidance, and both executors feed every
UNet input the manifest names. Checked against diffusers' own pipeline with the same labels.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import psnr

from ortdiffusion import Pipeline
from ortdiffusion.runtime.errors import BundleError, InvalidRequestError


@pytest.fixture(scope="module")
def class_checkpoint(tmp_path_factory):
    from ortdiffusion.export.presets import PRESETS, build_checkpoint

    tiny = PRESETS["tiny"]
    preset = dataclasses.replace(tiny, name="tiny-classes", unet={**tiny.unet, "num_class_embeds": 4})
    return build_checkpoint(preset, tmp_path_factory.mktemp("ckpt") / "classes")


@pytest.fixture(scope="module")
def class_bundle(class_checkpoint, tmp_path_factory):
    from ortdiffusion.export.bundle import export_checkpoint

    out = tmp_path_factory.mktemp("bundles") / "classes"
    manifest = export_checkpoint(class_checkpoint, out)
    assert manifest.pipeline.unet_feeds["class_labels"] == "request"
    return out


@pytest.fixture(scope="module")
def class_pipes(class_bundle):
    return {loop: Pipeline.load(class_bundle, providers="cpu", io_binding=loop == "device") for loop in ("host", "device")}


def draw(pipe, labels, **kwargs):
    call = dict(seed=[5, 6], num_inference_steps=4, scheduler="euler-ancestral", guidance_scale=4.0)
    result = pipe(["a red circle", "a blue square"], conditioning={"class_labels": np.array(labels)}, **{**call, **kwargs})
    return [np.asarray(im, np.int16) for im in result.images]


@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_class_labels_run_through_both_executors(class_pipes, guidance):
    host, device = (draw(class_pipes[loop], [1, 3], guidance_scale=guidance) for loop in ("host", "device"))
    for a, b in zip(host, device):
        assert np.abs(a - b).max() <= 1
    other = draw(class_pipes["host"], [0, 2], guidance_scale=guidance)
    assert all(np.abs(a - b).max() > 10 for a, b in zip(host, other)), "the labels must change the picture"


def test_class_labels_run_through_a_cuda_graph_bucket(class_bundle, class_pipes):
    bucketed = Pipeline.load(class_bundle, providers="cpu", io_binding=True, cuda_graphs=[(3, 64, 64)])
    for a, b in zip(draw(bucketed, [1, 3]), draw(class_pipes["host"], [1, 3])):  # 2 images padded to 3
        assert np.abs(a - b).max() <= 1


def test_class_labels_match_diffusers(class_checkpoint, class_pipes):
    from diffusers import StableDiffusionPipeline

    from ortdiffusion.export.reference import reference_scheduler

    ref = StableDiffusionPipeline.from_pretrained(str(class_checkpoint), safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = reference_scheduler("ddim", ref.scheduler.config)
    labels = torch.tensor([2, 2])  # [uncond; cond] rows: diffusers' pipeline calls the UNet with both halves
    forward = ref.unet.forward
    ref.unet.forward = lambda *args, **kwargs: forward(*args, class_labels=labels, **kwargs)
    latents = np.random.default_rng(3).standard_normal((1, 4, 16, 16)).astype(np.float32)
    expected = ref("a red circle", latents=torch.from_numpy(latents), num_inference_steps=8, guidance_scale=5.0).images[0]
    ours = class_pipes["host"]("a red circle", latents=latents, num_inference_steps=8, guidance_scale=5.0,
                               scheduler="ddim", conditioning={"class_labels": np.array([2])}).images[0]
    assert np.asarray(ours).std() > 5 and psnr(ours, expected) >= 40.0, psnr(ours, expected)


def test_conditioning_inputs_are_checked_by_name(class_pipes, tiny_pipeline):
    pipe = class_pipes["host"]
    with pytest.raises(InvalidRequestError, match=r"^conditioning.class_labels: required by this bundle's UNet"):
        pipe("a cat", num_inference_steps=1)
    with pytest.raises(InvalidRequestError, match=r"^conditioning.class_labels: must be a int64 array of shape \(2\)"):
        pipe("a cat", num_images_per_prompt=2, num_inference_steps=1, conditioning={"class_labels": [1.5, 2.0]})
    with pytest.raises(InvalidRequestError, match=r"^conditioning.mask: not an input .* \(it takes: none for this bundle\)"):
        tiny_pipeline("a cat", num_inference_steps=1, conditioning={"mask": np.zeros(1)})


def test_a_manifest_whose_feeds_miss_a_unet_input_is_refused(class_bundle, tmp_path):
    import json
    import shutil

    from ortdiffusion.runtime.manifest import load_manifest

    copy = tmp_path / "b"
    shutil.copytree(class_bundle, copy)
    data = json.loads((copy / "manifest.json").read_text())
    del data["pipeline"]["unet_feeds"]["class_labels"]
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="unet_feeds names .* the UNet's inputs are"):
        load_manifest(copy)
