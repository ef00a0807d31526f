"""ControlNet: exported as components beside a UNet that takes their residuals, run as diffusers'
`StableDiffusionControlNetPipeline` runs one ControlNet or a list of them (`MultiControlNetModel`)
on the same tiny checkpoint, latents and control images (fp32, PSNR ≥ 40 dB); the CLI's flags, the
HTTP field over a real socket, and every bad input refused by name."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import torch
from conftest import psnr
from PIL import Image, ImageDraw
from test_serve import running

from ortdiffusion import Pipeline
from ortdiffusion.export.reference import reference_scheduler
from ortdiffusion.runtime.errors import InvalidRequestError

PROMPT, STEPS, GUIDANCE = "a red circle on the left", 6, 7.5


def control_picture(shift: int = 0, size: int = 64) -> Image.Image:
    """White outlines on black, as an edge map is."""
    image = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.ellipse((6, 6, 38, 38), outline=(255, 255, 255), width=3)
    draw.rectangle((28 + shift, 20, 60, 58), outline=(255, 255, 255), width=2)
    return image


@pytest.fixture(scope="module")
def controlnet_dirs(tiny_checkpoint, tmp_path_factory):
    """Two ControlNets for the tiny UNet, at the tiny VAE's 4× scale, with random zero convolutions."""
    from ortdiffusion.export.controlnet import random_controlnet

    root = tmp_path_factory.mktemp("controlnets")
    return [random_controlnet(tiny_checkpoint / "unet", root / f"cn{k}", k, vae_scale=4) for k in range(2)]


@pytest.fixture(scope="module")
def one_bundle(tiny_checkpoint, controlnet_dirs, tmp_path_factory):
    """Exported through the CLI: `ortdiffusion export CKPT OUT --controlnet DIR`."""
    from ortdiffusion.cli import main

    out = tmp_path_factory.mktemp("bundles") / "one-controlnet"
    assert main(["export", str(tiny_checkpoint), str(out), "--controlnet", str(controlnet_dirs[0])]) == 0
    return out


@pytest.fixture(scope="module")
def two_bundle(tiny_checkpoint, controlnet_dirs, tmp_path_factory):
    from ortdiffusion.export.bundle import ExportOptions, export_checkpoint

    out = tmp_path_factory.mktemp("bundles") / "two-controlnets"
    export_checkpoint(tiny_checkpoint, out, ExportOptions(controlnets=tuple(controlnet_dirs)))
    return out


@pytest.fixture(scope="module")
def one_pipeline(one_bundle):
    return Pipeline.load(one_bundle, providers="cpu")


@pytest.fixture(scope="module")
def two_pipeline(two_bundle):
    return Pipeline.load(two_bundle, providers="cpu")


@pytest.fixture(scope="module")
def one_reference(tiny_checkpoint, controlnet_dirs):
    from diffusers import ControlNetModel

    return reference(tiny_checkpoint, ControlNetModel.from_pretrained(str(controlnet_dirs[0])))


@pytest.fixture(scope="module")
def two_reference(tiny_checkpoint, controlnet_dirs):
    """diffusers' multi-ControlNet: a list of ControlNetModels (a MultiControlNetModel inside)."""
    from diffusers import ControlNetModel

    return reference(tiny_checkpoint, [ControlNetModel.from_pretrained(str(d)) for d in controlnet_dirs])


def reference(checkpoint, controlnet):
    from diffusers import StableDiffusionControlNetPipeline

    pipe = StableDiffusionControlNetPipeline.from_pretrained(str(checkpoint), controlnet=controlnet,
                                                             safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = reference_scheduler("ddim", pipe.scheduler.config)
    return pipe


def latents(seed: int = 3, images: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((images, 4, 16, 16)).astype(np.float32)


# -- export ---------------------------------------------------------------------------------------


def test_export_adds_controlnet_components_and_residual_inputs(two_bundle, tiny_bundle):
    from ortdiffusion.runtime.manifest import load_manifest

    m, plain = load_manifest(two_bundle), load_manifest(tiny_bundle)
    assert [c.component for c in m.controlnets] == ["controlnet_0", "controlnet_1"]
    residuals = [n for n, source in m.pipeline.unet_feeds.items() if source == "controlnet"]
    # the tiny UNet: conv_in, one resnet per block, one downsampler, and the mid block
    assert residuals == [f"down_block_additional_residual_{i}" for i in range(4)] + ["mid_block_additional_residual"]
    for k in (0, 1):
        component = m.components[f"controlnet_{k}"]
        assert [o.name for o in component.outputs] == residuals
        assert component.inputs[3].shape == ("batch", 3, "height*4", "width*4")  # the tiny VAE's 4× scale
        assert max(r.rel_l2_error for r in component.parity) <= 1e-4
    shapes = {i.name: i.shape for i in m.components["unet"].inputs}
    assert shapes["down_block_additional_residual_2"] == ("batch", 32, "height/2", "width/2")
    assert max(r.rel_l2_error for r in m.components["unet"].parity) <= 1e-4
    # a bundle exported without ControlNets keeps the plain UNet: no residual inputs to feed
    assert not plain.controlnets and len(plain.components["unet"].inputs) == 3


# -- parity with diffusers ------------------------------------------------------------------------

ONE = {
    "default": {},
    "scale-window": {"controlnet_conditioning_scale": 0.6, "control_guidance_start": 0.25,
                     "control_guidance_end": 0.75},
    "guess-mode": {"guess_mode": True},
}


@pytest.mark.parametrize("kwargs", list(ONE.values()), ids=list(ONE))
def test_one_controlnet_matches_diffusers(one_pipeline, one_reference, kwargs):
    pipe = one_reference
    x, image = latents(), control_picture()
    ref = pipe(PROMPT, image=image, latents=torch.from_numpy(x), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
               **kwargs).images[0]
    ours = one_pipeline(PROMPT, control_image=image, latents=x, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                        scheduler="ddim", **kwargs).images[0]
    assert np.asarray(ours).std() > 5
    if not kwargs:
        plain = one_pipeline(PROMPT, latents=x, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                             scheduler="ddim").images[0]
        assert psnr(ours, plain) < 35, "the ControlNet must change the picture for the comparison to mean anything"
    assert psnr(ours, ref) >= 40.0, f"{kwargs}: PSNR {psnr(ours, ref):.1f} dB"


TWO = {
    "default": {},
    "per-net": {"controlnet_conditioning_scale": [0.5, 1.5], "control_guidance_start": [0.0, 0.3],
                "control_guidance_end": [0.6, 1.0]},
    "guess-mode-two-images": {"guess_mode": True, "num_images_per_prompt": 2},
}


@pytest.mark.parametrize("kwargs", list(TWO.values()), ids=list(TWO))
def test_two_controlnets_match_diffusers_multicontrolnet(two_pipeline, two_reference, kwargs):
    from diffusers.models.controlnets import MultiControlNetModel

    pipe = two_reference
    assert isinstance(pipe.controlnet, MultiControlNetModel)
    images = kwargs.get("num_images_per_prompt", 1)
    x, control = latents(5, images), [control_picture(0), control_picture(3)]
    ref = pipe(PROMPT, image=control, latents=torch.from_numpy(x), num_inference_steps=STEPS,
               guidance_scale=GUIDANCE, **kwargs).images
    ours = two_pipeline(PROMPT, control_image=control, latents=x, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                        scheduler="ddim", **kwargs).images
    assert len(ours) == len(ref) == images
    for a, b in zip(ours, ref):
        assert psnr(a, b) >= 40.0, f"{kwargs}: PSNR {psnr(a, b):.1f} dB"


def test_two_controlnets_on_img2img_match_diffusers(two_pipeline, tiny_checkpoint, controlnet_dirs):
    """Image-to-image with ControlNets, as `StableDiffusionControlNetImg2ImgPipeline` (its default
    conditioning scale, 0.8, on both sides), the same image, noise and ancestral noise."""
    from diffusers import ControlNetModel, StableDiffusionControlNetImg2ImgPipeline
    from test_image_inputs import picture

    from ortdiffusion.export.reference import ancestral_noise_from_seeds

    pipe = StableDiffusionControlNetImg2ImgPipeline.from_pretrained(
        str(tiny_checkpoint), controlnet=[ControlNetModel.from_pretrained(str(d)) for d in controlnet_dirs],
        safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = reference_scheduler("euler-ancestral", pipe.scheduler.config)
    control = [control_picture(0), control_picture(3)]
    with ancestral_noise_from_seeds([11], where=("ancestral", "vae", "controlnet_img2img")):
        ref = pipe(PROMPT, image=picture(), control_image=control, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   strength=0.6).images[0]
    ours = two_pipeline(PROMPT, image=picture(), control_image=control, seed=11, num_inference_steps=STEPS,
                        guidance_scale=GUIDANCE, scheduler="euler-ancestral", strength=0.6)
    assert psnr(ours.images[0], ref) >= 40.0, f"PSNR {psnr(ours.images[0], ref):.1f} dB"
    assert ours.metadata[0]["controlnet_conditioning_scale"] == "0.8,0.8"


def test_without_a_control_image_a_controlnet_bundle_draws_as_the_plain_one(two_pipeline, tiny_pipeline):
    x = latents(7)
    a = two_pipeline(PROMPT, latents=x, num_inference_steps=4, scheduler="ddim", seed=1).images[0]
    b = tiny_pipeline(PROMPT, latents=x, num_inference_steps=4, scheduler="ddim", seed=1).images[0]
    assert psnr(a, b) >= 50.0  # zero residuals: the same UNet


def test_the_device_loop_hands_control_requests_to_the_host_loop(two_bundle, two_pipeline):
    device = Pipeline.load(two_bundle, providers="cpu", io_binding=True)
    assert device.device_loop is not None
    args = dict(control_image=[control_picture(0), control_picture(3)], latents=latents(9), num_inference_steps=4,
                scheduler="ddim")
    a, b = device(PROMPT, **args).images[0], two_pipeline(PROMPT, **args).images[0]
    assert psnr(a, b) >= 50.0


def test_control_settings_are_recorded_in_the_metadata(one_pipeline):
    result = one_pipeline(PROMPT, control_image=control_picture(), num_inference_steps=2, seed=1,
                          controlnet_conditioning_scale=0.5, control_guidance_end=0.5, canny=True)
    meta = result.metadata[0]
    assert meta["controlnet_conditioning_scale"] == "0.5" and meta["control_guidance"] == "0-0.5"
    assert meta["control_preprocessor"] == "canny"


# -- Canny ----------------------------------------------------------------------------------------


def test_canny_edges_outline_shapes_and_leave_flat_areas_empty():
    from ortdiffusion.runtime.canny import canny_edges

    image = Image.new("RGB", (64, 64), (20, 40, 60))
    ImageDraw.Draw(image).rectangle((16, 16, 47, 47), fill=(230, 200, 30))
    edges = np.asarray(canny_edges(image))
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) <= {0, 255}
    on = edges[..., 0] > 0
    assert not on[20:44, 20:44].any() and not on[:10].any()  # inside and far outside: flat
    border = np.zeros_like(on)
    border[14:50, 14:50], border[18:46, 18:46] = True, False
    assert on[border].sum() >= 100 and on[~border].sum() == 0  # a closed outline along the square's edge


# -- bad input ------------------------------------------------------------------------------------


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


BAD = [
    ({"control_image": [b"not an image", control_picture()]}, "control_image[0]", "is not an image"),
    # the worst a caller can send: a few kB that declare 2.5 billion pixels, refused before decoding
    ({"control_image": [control_picture(), _png(Image.new("1", (50_000, 50_000)))]}, "control_image[1]",
     "pixels; at most"),
    ({"control_image": [control_picture()]}, "control_image", "one control image per ControlNet of this model (2)"),
    ({"controlnet_conditioning_scale": [1.0]}, "controlnet_conditioning_scale", "one per ControlNet (2)"),
    ({"control_guidance_start": 0.8, "control_guidance_end": 0.2}, "control_guidance_start", "before"),
    ({"controlnet_conditioning_scale": float("nan")}, "controlnet_conditioning_scale", "from 0 to 10"),
    ({"image": control_picture(), "mask_image": control_picture()}, "control_image", "not with a mask_image"),
]


@pytest.mark.parametrize("kwargs, field, message", BAD, ids=[b[1] + "-" + str(i) for i, b in enumerate(BAD)])
def test_bad_control_inputs_are_refused_by_name(two_pipeline, kwargs, field, message):
    args = {"control_image": [control_picture(), control_picture(3)], **kwargs}
    with pytest.raises(InvalidRequestError) as info:
        two_pipeline(PROMPT, num_inference_steps=2, **args)
    assert info.value.field == field and message in str(info.value)


def test_a_bundle_without_controlnets_says_how_to_get_one(tiny_pipeline):
    with pytest.raises(InvalidRequestError) as info:
        tiny_pipeline(PROMPT, control_image=control_picture(), num_inference_steps=2)
    assert info.value.field == "control_image" and "--controlnet" in str(info.value)


# -- CLI ------------------------------------------------------------------------------------------


def test_cli_generate_with_a_control_image_and_canny(one_bundle, tmp_path, capsys):
    from ortdiffusion.cli import main

    source = tmp_path / "photo.png"
    image = Image.new("RGB", (64, 64), (30, 60, 200))
    ImageDraw.Draw(image).ellipse((10, 10, 40, 40), fill=(250, 240, 20))
    image.save(source)
    out = tmp_path / "out.png"
    assert main(["generate", PROMPT, "--model", str(one_bundle), "--control-image", str(source), "--canny",
                 "--controlnet-scale", "0.8", "--control-start", "0", "--control-end", "0.9", "--guess-mode",
                 "--steps", "3", "--seed", "4", "-o", str(out), "-q"]) == 0
    text = Image.open(out).text
    assert text["control_preprocessor"] == "canny" and text["guess_mode"] == "true"
    capsys.readouterr()
    assert main(["generate", PROMPT, "--model", str(one_bundle), "--control-image", str(source), "--control-image",
                 str(source), "--steps", "2", "-o", str(out), "-q"]) == 2
    assert "--control-image: give one control image per ControlNet of this model (1), got 2" in capsys.readouterr().err


# -- HTTP -----------------------------------------------------------------------------------------


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def post(url, **body):
    return httpx.post(f"{url}/v1/images/generations", json={"prompt": PROMPT, "steps": 3, "seed": 5,
                                                            "response_format": "b64_json", **body}, timeout=120)


def pixels(response) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))).convert("RGB"))


def test_http_control_image_field_over_a_real_socket(one_pipeline, tiny_pipeline):
    control = b64(control_picture())
    with running(one_pipeline) as url:
        plain = post(url)
        controlled = post(url, control_image=control, controlnet_conditioning_scale=1.0, guess_mode=False)
        as_list = post(url, control_image=[f"data:image/png;base64,{control}"], control_guidance_end=[1.0])
        assert plain.status_code == controlled.status_code == as_list.status_code == 200, controlled.text
        direct = one_pipeline(PROMPT, control_image=control_picture(), num_inference_steps=3, seed=5).images[0]
        assert psnr(Image.fromarray(pixels(controlled)), direct) >= 50.0
        assert np.array_equal(pixels(controlled), pixels(as_list))
        assert psnr(Image.fromarray(pixels(controlled)), Image.fromarray(pixels(plain))) < 35
        for body, param in [({"control_image": "%%% not base64"}, "control_image"),
                            ({"control_image": base64.b64encode(b"text, not an image").decode()}, "control_image"),
                            ({"control_image": [control, control]}, "control_image"),
                            ({"guess_mode": True}, "guess_mode"),
                            ({"control_image": control, "control_guidance_start": 2}, "control_guidance_start")]:
            response = post(url, **body)
            assert response.status_code == 400, (body, response.text)
            assert response.json()["error"]["param"] == param, response.text
        assert post(url).status_code == 200  # still serving
    with running(tiny_pipeline) as url:
        response = post(url, control_image=control)
        assert response.status_code == 400 and response.json()["error"]["param"] == "control_image"
        assert "no ControlNet" in json.dumps(response.json())


# -- compare --------------------------------------------------------------------------------------


def test_compare_judges_a_controlnet_bundle_against_diffusers(one_bundle, tiny_checkpoint):
    """`ortdiffusion compare` adds a ControlNet line (the whole command ran on the two-ControlNet bundle
    by hand: every line passes); here the line itself."""
    from ortdiffusion.export.compare import TOLERANCES, _test_picture, compare_controlnets
    from ortdiffusion.runtime.manifest import Precision, load_manifest

    manifest = load_manifest(one_bundle)
    picture = _test_picture(64, 64)
    (line,) = compare_controlnets(tiny_checkpoint, one_bundle, manifest, picture, PROMPT, 3, GUIDANCE, "ddim", 0,
                                  TOLERANCES[Precision.FP32])
    assert line.passed and line.what.startswith("controlnet ×1"), line


def test_compare_needs_the_controlnet_source(two_bundle, tmp_path):
    import shutil

    from ortdiffusion.export.compare import _with_controlnets
    from ortdiffusion.runtime.errors import BundleError
    from ortdiffusion.runtime.manifest import load_manifest

    manifest = load_manifest(two_bundle)
    moved = tmp_path / "gone"
    shutil.move(manifest.controlnets[1].source, moved)
    try:
        with pytest.raises(BundleError, match="controlnets"):
            _with_controlnets([], None, manifest)
    finally:
        shutil.move(moved, manifest.controlnets[1].source)


def test_control_requests_batch_only_with_their_own_chunks(one_pipeline):
    from ortdiffusion.runtime.control import make_control
    from ortdiffusion.runtime.request import make_request
    from ortdiffusion.serve.batcher import Job
    from ortdiffusion.serve.budget import chunks

    m = one_pipeline.manifest

    def job(request):
        return Job(request, deadline=0.0)

    plain = [job(make_request(m, PROMPT, num_inference_steps=2, seed=s)) for s in (1, 2)]
    controlled = [job(make_request(m, PROMPT, num_inference_steps=2, seed=s,
                                   control=make_control(m, control_picture()))) for s in (1, 2)]
    assert plain[0].compat_key == plain[1].compat_key  # as before: plain requests merge
    assert controlled[0].compat_key != controlled[1].compat_key != plain[0].compat_key
    big = make_request(m, PROMPT, num_images_per_prompt=4, num_inference_steps=2, seed=1,
                       control=make_control(m, control_picture()))
    parts = [job(r) for r in chunks(big, 2)]
    assert len(parts) == 2 and parts[0].compat_key == parts[1].compat_key
