"""Image inputs — img2img, inpainting with a plain UNet, inpainting with a 9-channel inpainting UNet —
against diffusers' own pipelines on the same tiny checkpoints, inputs and noise (fp32, PSNR ≥ 40 dB),
through both executors of the plan; and every bad input refused by name."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import psnr
from PIL import Image, ImageDraw

from ortdiffusion import Pipeline
from ortdiffusion.export.reference import ancestral_noise_from_seeds, reference_scheduler
from ortdiffusion.runtime.errors import InvalidRequestError

SCHEDULERS = ["ddim", "euler", "euler-ancestral", "dpm++2m"]
STRENGTHS = [0.3, 0.75, 1.0]
PROMPT, SEED, STEPS = "a red circle on the left", 11, 12


def picture(size: int = 64) -> Image.Image:
    """A structured input: a gradient with two shapes, so encoder and decoder have work to do."""
    x = np.linspace(0, 255, size, dtype=np.float32)
    base = np.stack([np.add.outer(x, x) / 2, np.add.outer(x[::-1], x) / 2, np.full((size, size), 90.0)], axis=-1)
    image = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((8, 8, 30, 30), fill=(230, 30, 30))
    draw.rectangle((36, 30, 58, 56), fill=(30, 40, 220))
    return image


def left_half_mask(size: int = 64) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, size // 2 - 1, size - 1), fill=255)  # white: repaint
    return mask


@pytest.fixture(scope="module")
def inpaint_checkpoint(tmp_path_factory):
    from ortdiffusion.export.presets import build_checkpoint

    return build_checkpoint("tiny-inpaint", tmp_path_factory.mktemp("ckpt") / "tiny-inpaint")


@pytest.fixture(scope="module")
def inpaint_pipeline(inpaint_checkpoint, tmp_path_factory):
    from ortdiffusion.export.bundle import export_checkpoint

    out = tmp_path_factory.mktemp("bundles") / "tiny-inpaint"
    export_checkpoint(inpaint_checkpoint, out)
    return Pipeline.load(out, providers="cpu")


def _reference(cls, checkpoint):
    pipe = cls.from_pretrained(str(checkpoint), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def img2img_reference(tiny_checkpoint):
    from diffusers import StableDiffusionImg2ImgPipeline

    return _reference(StableDiffusionImg2ImgPipeline, tiny_checkpoint)


@pytest.fixture(scope="module")
def inpaint_reference(tiny_checkpoint):
    from diffusers import StableDiffusionInpaintPipeline

    return _reference(StableDiffusionInpaintPipeline, tiny_checkpoint)


@pytest.fixture(scope="module")
def inpaint_unet_reference(inpaint_checkpoint):
    from diffusers import StableDiffusionInpaintPipeline

    return _reference(StableDiffusionInpaintPipeline, inpaint_checkpoint)


def run_reference(pipe, scheduler: str, task: str, guidance: float, **kwargs) -> Image.Image:
    pipe.scheduler = reference_scheduler(scheduler, pipe.scheduler.config)
    with ancestral_noise_from_seeds([SEED], where=("ancestral", "vae", task)):
        return pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=guidance, output_type="pil", **kwargs).images[0]


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_img2img_matches_diffusers(tiny_pipeline, img2img_reference, scheduler, strength):
    ref = run_reference(img2img_reference, scheduler, "img2img", 7.5, image=picture(), strength=strength)
    ours = tiny_pipeline(PROMPT, image=picture(), strength=strength, seed=SEED, num_inference_steps=STEPS,
                         guidance_scale=7.5, scheduler=scheduler).images[0]
    assert np.asarray(ours).std() > 5, "a flat image would make the comparison meaningless"
    assert psnr(ours, ref) >= 40.0, f"{scheduler} strength {strength}: PSNR {psnr(ours, ref):.1f} dB"


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_inpainting_a_plain_unet_matches_diffusers(tiny_pipeline, inpaint_reference, scheduler, strength):
    """A plain (4-channel) UNet: the kept region's latents are blended back after every step."""
    kw = dict(image=picture(), mask_image=left_half_mask(), strength=strength)
    ref = run_reference(inpaint_reference, scheduler, "inpaint", 7.5, **kw)
    ours = tiny_pipeline(PROMPT, seed=SEED, num_inference_steps=STEPS, guidance_scale=7.5, scheduler=scheduler,
                         **kw).images[0]
    assert psnr(ours, ref) >= 40.0, f"{scheduler} strength {strength}: PSNR {psnr(ours, ref):.1f} dB"


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("scheduler", ["ddim", "euler-ancestral", "dpm++2m"])
def test_inpainting_unet_matches_diffusers(inpaint_pipeline, inpaint_unet_reference, scheduler, strength):
    """A 9-channel inpainting UNet: mask and masked-image latents as its `inpaint_condition` input."""
    kw = dict(image=picture(), mask_image=left_half_mask(), strength=strength)
    ref = run_reference(inpaint_unet_reference, scheduler, "inpaint", 5.0, **kw)
    ours = inpaint_pipeline(PROMPT, seed=SEED, num_inference_steps=STEPS, guidance_scale=5.0, scheduler=scheduler,
                            **kw).images[0]
    assert np.asarray(ours).std() > 5
    assert psnr(ours, ref) >= 40.0, f"{scheduler} strength {strength}: PSNR {psnr(ours, ref):.1f} dB"


def test_unguided_img2img_matches_diffusers(tiny_pipeline, img2img_reference):
    ref = run_reference(img2img_reference, "euler", "img2img", 1.0, image=picture(), strength=0.6)
    ours = tiny_pipeline(PROMPT, image=picture(), strength=0.6, seed=SEED, num_inference_steps=STEPS,
                         guidance_scale=1.0, scheduler="euler").images[0]
    assert psnr(ours, ref) >= 40.0


@pytest.fixture(scope="module")
def device_pipelines(tiny_bundle, inpaint_pipeline):
    return {"plain": Pipeline.load(tiny_bundle, providers="cpu", io_binding=True),
            "inpaint": Pipeline.load(inpaint_pipeline.bundle_dir, providers="cpu", io_binding=True)}


@pytest.mark.parametrize("task", ["img2img", "blend", "inpaint-unet"])
@pytest.mark.parametrize("batch", [1, 3])
def test_the_device_loop_runs_image_inputs_as_the_host_loop_does(tiny_pipeline, inpaint_pipeline, device_pipelines,
                                                                 task, batch):
    """The same plan through IO binding and the step graph (the blend variant for a plain UNet's
    inpainting) gives the host loop's images."""
    host, device = ((inpaint_pipeline, device_pipelines["inpaint"]) if task == "inpaint-unet"
                    else (tiny_pipeline, device_pipelines["plain"]))
    kw = dict(image=picture(), strength=0.7, seed=list(range(batch)), num_images_per_prompt=batch,
              num_inference_steps=8, scheduler="euler-ancestral")
    if task != "img2img":
        kw["mask_image"] = left_half_mask()
    a, b = host(PROMPT, **kw), device(PROMPT, **kw)
    assert b.transfers.in_loop == 0
    for x, y in zip(a.images, b.images):
        assert psnr(x, y) >= 50.0


def test_inpainting_keeps_the_unmasked_region(tiny_pipeline):
    """Outside the mask the output is the input image through the VAE (encoder → decoder), not new content."""
    out = tiny_pipeline(PROMPT, image=picture(), mask_image=left_half_mask(), seed=3, num_inference_steps=8).images[0]
    again = tiny_pipeline(PROMPT, image=picture(), mask_image=left_half_mask(), seed=4, num_inference_steps=8).images[0]
    kept_a, kept_b = np.asarray(out)[:, 40:], np.asarray(again)[:, 40:]
    assert psnr(Image.fromarray(kept_a), Image.fromarray(kept_b)) > 30  # seeds change the repainted half only
    assert np.abs(np.asarray(out)[:, :24].astype(int) - np.asarray(again)[:, :24]).mean() > 1


def test_image_inputs_are_recorded_in_the_metadata_and_timed(tiny_pipeline):
    result = tiny_pipeline(PROMPT, image=picture(), strength=0.5, seed=1, num_inference_steps=10)
    assert result.metadata[0]["task"] == "image-to-image" and result.metadata[0]["strength"] == "0.5"
    assert result.timings.image_encoder > 0
    assert len(result.timings.unet_steps) == 5  # strength 0.5 of 10 steps
    assert tiny_pipeline.tasks[:2] == ("text-to-image", "image-to-image")


def test_a_variation_is_img2img_with_the_empty_prompt(tiny_pipeline):
    result = tiny_pipeline("", image=picture(), strength=0.7, seed=2, num_inference_steps=10)
    assert result.images[0].size == (64, 64)
    with pytest.raises(InvalidRequestError, match="prompt"):
        tiny_pipeline("", seed=2, num_inference_steps=2)  # without an image the prompt must say something


# -- bad input: each refused by name, nothing crashes -----------------------------------------------


def png_bytes(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def refused(pipe, field: str, match: str, **kw):
    with pytest.raises(InvalidRequestError, match=match) as e:
        pipe(PROMPT, num_inference_steps=4, seed=0, **kw)
    assert e.value.field == field, e.value


def test_bad_images_are_refused_by_name(tiny_pipeline):
    refused(tiny_pipeline, "image", "not an image", image=b"hello, I am text")
    refused(tiny_pipeline, "image", "truncated or corrupt", image=png_bytes(picture())[:300])
    bomb = png_bytes(Image.new("1", (50_000, 50_000)))  # a few kB that declare 2.5 billion pixels
    refused(tiny_pipeline, "image", "pixels; at most", image=bomb)
    big = png_bytes(Image.new("1", (5000, 5000)))  # under Pillow's own bomb limit, over ours
    refused(tiny_pipeline, "image", "declares 5000×5000 pixels; at most", image=big)
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    refused(tiny_pipeline, "image", "2 frames", image=gif.getvalue())
    refused(tiny_pipeline, "image", "no such file", image="/nonexistent/in.png")
    refused(tiny_pipeline, "image", "must be an image", image=3.5)
    refused(tiny_pipeline, "strength", "from 0 to 1", image=picture(), strength=1.5)
    refused(tiny_pipeline, "strength", "from 0 to 1", image=picture(), strength=-0.1)
    refused(tiny_pipeline, "strength", "leaves no denoising step", image=picture(), strength=0.1)
    refused(tiny_pipeline, "strength", "only with an input image", strength=0.5)
    refused(tiny_pipeline, "mask_image", "without an image", mask_image=left_half_mask())
    refused(tiny_pipeline, "mask_image", "the image's size", image=picture(), mask_image=left_half_mask(32))
    refused(tiny_pipeline, "image", "give width and height", image=picture(1000))


def test_convertible_images_are_converted_as_pillow_users_expect(tiny_pipeline):
    """CMYK, 16-bit, palette and grey+alpha inputs are converted; an EXIF rotation is applied."""
    rgb = picture()
    runs = {}
    for name, image in {"rgb": rgb, "cmyk": rgb.convert("CMYK"), "palette": rgb.convert("P"),
                        "la": rgb.convert("LA"), "grey16": Image.fromarray((np.asarray(rgb.convert("L")).astype(np.uint16) * 257))}.items():
        runs[name] = tiny_pipeline(PROMPT, image=image, strength=0.3, seed=0, num_inference_steps=4).images[0]
    assert psnr(runs["cmyk"], runs["rgb"]) > 30
    assert runs["grey16"].size == (64, 64) and runs["la"].size == (64, 64) and runs["palette"].size == (64, 64)
    # a JPEG stored sideways with EXIF orientation 6 (rotate 90° clockwise to view)
    sideways = rgb.rotate(90, expand=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    jpeg = png_bytes(sideways, "JPEG", exif=exif, quality=95)
    from ortdiffusion.runtime.image_input import open_image

    upright = open_image(jpeg, "image")
    assert np.abs(np.asarray(upright, dtype=int) - np.asarray(rgb, dtype=int)).mean() < 12


def test_a_bundle_without_the_image_encoder_says_how_to_get_one(bundle_copy):
    import json

    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    del manifest["components"]["vae_encoder"]
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    pipe = Pipeline.load(bundle_copy, providers="cpu")
    assert [t.value for t in pipe.tasks] == ["text-to-image"]
    refused(pipe, "image", "no image encoder.*export it again", image=picture())


def test_an_inpainting_unet_needs_an_image_and_a_mask(inpaint_pipeline):
    assert [t.value for t in inpaint_pipeline.tasks] == ["inpainting"]
    refused(inpaint_pipeline, "image", "inpainting UNet")
    refused(inpaint_pipeline, "mask_image", "inpainting UNet", image=picture())


def test_the_image_encoder_matches_diffusers(tiny_bundle):
    import json

    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    encoder = manifest["components"]["vae_encoder"]
    assert [o["name"] for o in encoder["outputs"]] == ["latent_mean", "latent_std"]
    assert max(p["rel_l2_error"] for p in encoder["parity"]) <= 1e-4


def test_torch_is_only_the_reference_here():
    """The runtime's image path imports no torch (the light runtime)."""
    import subprocess
    import sys

    code = ("import sys; import ortdiffusion.runtime.image_input, ortdiffusion.runtime.plan; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert torch is not None


# -- the command line ---------------------------------------------------------------------------------


def test_cli_generate_with_an_image_and_a_mask_and_vary(tiny_bundle, tmp_path):
    from test_cli import run

    from ortdiffusion.runtime.png import read_png_metadata

    picture().save(tmp_path / "in.png")
    left_half_mask().save(tmp_path / "mask.png")
    run("generate", PROMPT, "--model", tiny_bundle, "--image", tmp_path / "in.png", "--mask", tmp_path / "mask.png",
        "--steps", "4", "--seed", "1", "-o", tmp_path / "edit.png")
    meta = read_png_metadata(tmp_path / "edit.png")
    assert meta["task"] == "inpainting" and meta["strength"] == "1"
    proc = run("vary", tmp_path / "in.png", "--model", tiny_bundle, "--steps", "4", "--num-images", "2",
               "-o", tmp_path / "v.png")
    assert (tmp_path / "v-0.png").is_file() and (tmp_path / "v-1.png").is_file(), proc.stdout
    assert read_png_metadata(tmp_path / "v-0.png")["strength"] == "0.7"


@pytest.mark.parametrize("args, flag", [
    (["--strength", "1.5"], "--strength"),
    (["--image", "/nonexistent/in.png"], "--image"),
    (["--mask", "MASK"], "--mask"),
])
def test_cli_image_mistakes_name_the_flag(tiny_bundle, tmp_path, args, flag):
    from test_cli import run

    picture().save(tmp_path / "in.png")
    args = [str(tmp_path / "in.png") if a == "MASK" else a for a in args]
    if "--image" not in args and flag != "--image":
        args = ["--image", str(tmp_path / "in.png"), *args] if flag == "--strength" else args
    proc = run("generate", PROMPT, "--model", tiny_bundle, "--steps", "4", *args, "-o", tmp_path / "x.png", check=False)
    assert proc.returncode == 2 and flag in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "x.png").exists()
