"""SDXL base and refiner against diffusers' own `StableDiffusionXLPipeline` and
`StableDiffusionXLImg2ImgPipeline` on tiny random-weight checkpoints (fp32, PSNR ≥ 40 dB, the same
starting latents and noise): text-to-image, prompt_2 and the added conditions, zeroed negatives,
image-to-image, the refiner, and the ensemble of experts (denoising_end / denoising_start) as one
call with two bundles; through both executors of the plan."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import psnr
from PIL import Image, ImageDraw

from ortdiffusion import Pipeline
from ortdiffusion.export.reference import ancestral_noise_from_seeds, reference_scheduler
from ortdiffusion.runtime.errors import InvalidRequestError

PROMPT, SEED, STEPS = "a red circle on the left", 11, 8


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """{name: (checkpoint, bundle)} of the tiny SDXL base and refiner."""
    from ortdiffusion.export.bundle import export_checkpoint
    from ortdiffusion.export.presets import build_checkpoint

    out = {}
    for name in ("tiny-sdxl", "tiny-sdxl-refiner"):
        ckpt = build_checkpoint(name, tmp_path_factory.mktemp("ckpt") / name)
        bundle = tmp_path_factory.mktemp("bundles") / name
        export_checkpoint(ckpt, bundle)
        out[name] = (ckpt, bundle)
    return out


@pytest.fixture(scope="module")
def base(sdxl):
    return Pipeline.load(sdxl["tiny-sdxl"][1], providers="cpu")


@pytest.fixture(scope="module")
def ensemble(sdxl, base):
    return Pipeline.load(sdxl["tiny-sdxl"][1], providers="cpu", refiner=sdxl["tiny-sdxl-refiner"][1])


def _reference(cls, checkpoint):
    pipe = cls.from_pretrained(str(checkpoint))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ref_base(sdxl):
    from diffusers import StableDiffusionXLPipeline

    return _reference(StableDiffusionXLPipeline, sdxl["tiny-sdxl"][0])


@pytest.fixture(scope="module")
def ref_img2img(sdxl):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    return _reference(StableDiffusionXLImg2ImgPipeline, sdxl["tiny-sdxl"][0])


@pytest.fixture(scope="module")
def ref_refiner(sdxl):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    return _reference(StableDiffusionXLImg2ImgPipeline, sdxl["tiny-sdxl-refiner"][0])


def picture(size: int = 64) -> Image.Image:
    x = np.linspace(0, 255, size, dtype=np.float32)
    base = np.stack([np.add.outer(x, x) / 2, np.add.outer(x[::-1], x) / 2, np.full((size, size), 90.0)], axis=-1)
    image = Image.fromarray(base.astype(np.uint8))
    ImageDraw.Draw(image).ellipse((8, 8, 30, 30), fill=(230, 30, 30))
    return image


def run(pipe, scheduler: str, where: tuple[str, ...], **kwargs):
    pipe.scheduler = reference_scheduler(scheduler, pipe.scheduler.config)
    with ancestral_noise_from_seeds([SEED], where=("ancestral", *where)):
        return pipe(num_inference_steps=STEPS, **kwargs).images


def start_latents(seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, 16, 16)).astype(np.float32)


@pytest.mark.parametrize("scheduler", ["euler", "ddim", "euler-ancestral", "dpm++2m"])
@pytest.mark.parametrize("negative", [None, "blurry"])
def test_base_matches_diffusers(base, ref_base, scheduler, negative):
    """negative None: SDXL's force_zeros_for_empty_prompt zeroes the negative embeddings."""
    latents = start_latents()
    kw = dict(prompt=PROMPT, negative_prompt=negative, guidance_scale=5.0)
    ref = run(ref_base, scheduler, ("sdxl",), latents=torch.from_numpy(latents), **kw)[0]
    ours = base(latents=latents, seed=SEED, num_inference_steps=STEPS, scheduler=scheduler, **kw).images[0]
    assert np.asarray(ours).std() > 5, "a flat image would make the comparison meaningless"
    assert psnr(ours, ref) >= 40.0, f"{scheduler}: PSNR {psnr(ours, ref):.1f} dB"
    if negative is None:  # the zeroed negative embeddings are not the empty prompt's
        empty = base(latents=latents, num_inference_steps=STEPS, scheduler=scheduler, **{**kw, "negative_prompt": ""})
        assert psnr(ours, empty.images[0]) < 40.0


def test_prompt_2_and_added_conditions_match_diffusers(base, ref_base):
    latents = start_latents(5)
    kw = dict(prompt=PROMPT, prompt_2="a blue square", negative_prompt="blurry", negative_prompt_2="dark",
              guidance_scale=6.0, original_size=(128, 96), crops_coords_top_left=(8, 4), target_size=(64, 64),
              negative_original_size=(32, 32), negative_crops_coords_top_left=(2, 2), negative_target_size=(48, 64))
    ref = run(ref_base, "euler", ("sdxl",), latents=torch.from_numpy(latents), **kw)[0]
    ours = base(latents=latents, seed=SEED, num_inference_steps=STEPS, scheduler="euler", **kw).images[0]
    plain = base(PROMPT, negative_prompt="blurry", latents=latents, num_inference_steps=STEPS, guidance_scale=6.0,
                 scheduler="euler").images[0]
    assert psnr(ours, ref) >= 40.0, f"PSNR {psnr(ours, ref):.1f} dB"
    assert psnr(ours, plain) < 40.0, "prompt_2 and the sizes must change the image"


def test_batch_unguided_matches_diffusers(base, ref_base):
    prompts = ["a red circle", "a blue square on the right"]
    latents = np.random.default_rng(4).standard_normal((2, 4, 16, 16)).astype(np.float32)
    ref = run(ref_base, "euler", ("sdxl",), prompt=prompts, latents=torch.from_numpy(latents), guidance_scale=1.0)
    ours = base(prompts, latents=latents, num_inference_steps=STEPS, guidance_scale=1.0, scheduler="euler").images
    for a, b in zip(ours, ref):
        assert psnr(a, b) >= 40.0


@pytest.mark.parametrize("scheduler", ["euler", "euler-ancestral"])
@pytest.mark.parametrize("strength", [0.3, 0.75])
def test_img2img_matches_diffusers(base, ref_img2img, scheduler, strength):
    kw = dict(prompt=PROMPT, image=picture(), strength=strength, guidance_scale=5.0)
    ref = run(ref_img2img, scheduler, ("vae", "sdxl_img2img"), **kw)[0]
    ours = base(seed=SEED, num_inference_steps=STEPS, scheduler=scheduler, **kw).images[0]
    assert np.asarray(ours).std() > 5
    assert psnr(ours, ref) >= 40.0, f"{scheduler} strength {strength}: PSNR {psnr(ours, ref):.1f} dB"


@pytest.fixture(scope="module")
def ref_inpaint(sdxl):
    from diffusers import StableDiffusionXLInpaintPipeline

    return _reference(StableDiffusionXLInpaintPipeline, sdxl["tiny-sdxl"][0])


@pytest.mark.parametrize("scheduler", ["euler", "euler-ancestral"])
@pytest.mark.parametrize("strength", [1.0, 0.75])
def test_inpainting_matches_diffusers(base, ref_inpaint, scheduler, strength):
    """SDXL's plain UNet inpaints by blending, as `StableDiffusionXLInpaintPipeline`."""
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 31, 63), fill=255)
    kw = dict(prompt=PROMPT, image=picture(), mask_image=mask, strength=strength, guidance_scale=5.0)
    ref = run(ref_inpaint, scheduler, ("vae", "sdxl_inpaint"), **kw)[0]
    ours = base(seed=SEED, num_inference_steps=STEPS, scheduler=scheduler, **kw).images[0]
    assert psnr(ours, ref) >= 40.0, f"{scheduler} strength {strength}: PSNR {psnr(ours, ref):.1f} dB"


def test_refiner_img2img_matches_diffusers(sdxl, ref_refiner):
    """The refiner alone: text_encoder_2 reading `prompt`, aesthetic-score time ids."""
    refiner = Pipeline.load(sdxl["tiny-sdxl-refiner"][1], providers="cpu")
    assert "text_encoder" not in refiner.manifest.components
    kw = dict(prompt=PROMPT, image=picture(), strength=0.6, guidance_scale=5.0, aesthetic_score=7.0,
              negative_aesthetic_score=2.0)
    ref = run(ref_refiner, "euler", ("vae", "sdxl_img2img"), **kw)[0]
    ours = refiner(seed=SEED, num_inference_steps=STEPS, scheduler="euler", **kw).images[0]
    assert psnr(ours, ref) >= 40.0, f"PSNR {psnr(ours, ref):.1f} dB"


def _diffusers_ensemble(ref_base, ref_refiner, scheduler, latents, end, **kw):
    """diffusers' two calls; each with its own seeded noise, as each of ours draws from its seed."""
    handed = run(ref_base, scheduler, ("sdxl",), latents=torch.from_numpy(latents), denoising_end=end,
                 output_type="latent", **kw)
    more = {"denoising_start": end} if end is not None else {"strength": 0.3}
    return run(ref_refiner, scheduler, ("sdxl_img2img",), image=handed, **more, **kw)[0]


@pytest.mark.parametrize("scheduler", ["euler", "euler-ancestral", "dpm++2m"])
@pytest.mark.parametrize("end", [0.7, None])
def test_ensemble_of_experts_matches_diffusers(ensemble, ref_base, ref_refiner, scheduler, end):
    """One call, two bundles: the base to denoising_end, its latents to the refiner from there (or,
    without denoising_end, the refiner over the base's finished latents at strength 0.3)."""
    latents = start_latents(7)
    kw = dict(prompt=PROMPT, negative_prompt="blurry", guidance_scale=5.0)
    ref = _diffusers_ensemble(ref_base, ref_refiner, scheduler, latents, end, **kw)
    ours = ensemble(latents=latents, seed=SEED, num_inference_steps=STEPS, scheduler=scheduler, denoising_end=end,
                    **kw)
    assert ours.metadata[0]["refiner_hash"]
    assert psnr(ours.images[0], ref) >= 40.0, f"{scheduler} end {end}: PSNR {psnr(ours.images[0], ref):.1f} dB"


def test_denoising_end_splits_the_schedule(base, sdxl):
    """The base's steps to denoising_end and the refiner's from denoising_start add up to the whole."""
    seen = {}
    refiner = Pipeline.load(sdxl["tiny-sdxl-refiner"][1], providers="cpu")
    out = base(PROMPT, seed=1, num_inference_steps=10, denoising_end=0.8, output_type="latent",
               callback=lambda i, n, x: seen.__setitem__("base", n))
    assert out.images == [] and out.latents.shape == (1, 4, 16, 16)
    refiner(PROMPT, seed=1, num_inference_steps=10, image=out.latents, denoising_start=0.8,
            callback=lambda i, n, x: seen.__setitem__("refiner", n))
    assert seen["base"] + seen["refiner"] == 10 and seen["refiner"] in (2, 3)


def test_device_loop_runs_the_same_plan(sdxl, base):
    """IO binding (the device loop) on the CPU: zeroed negatives and latents out as the host loop."""
    device = Pipeline.load(sdxl["tiny-sdxl"][1], providers="cpu", io_binding=True)
    latents = start_latents(9)
    for kw in ({}, {"negative_prompt": "blurry"}):
        a = base(PROMPT, latents=latents, num_inference_steps=4, scheduler="euler", **kw).images[0]
        b = device(PROMPT, latents=latents, num_inference_steps=4, scheduler="euler", **kw).images[0]
        assert psnr(a, b) >= 50.0
    a = base(PROMPT, latents=latents, num_inference_steps=4, denoising_end=0.5, output_type="latent").latents
    b = device(PROMPT, latents=latents, num_inference_steps=4, denoising_end=0.5, output_type="latent").latents
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_bundle_carries_the_family_as_data(sdxl, base):
    m = base.manifest
    assert m.prompt_sources() == {"text_encoder": "prompt", "text_encoder_2": "prompt_2"}
    assert m.pipeline.force_zeros_for_empty_prompt and not m.pipeline.requires_aesthetics_score
    assert m.pipeline.vae_scaling_factor == pytest.approx(0.13025)
    # SDXL's second tokenizer pads with "!" (id 0), the first with its end token
    ids = base.tokenizers["text_encoder_2"](["a"])[0]
    assert ids[-1] == 0 and base.tokenizers["text_encoder"](["a"])[0][-1] != 0
    refiner = Pipeline.load(sdxl["tiny-sdxl-refiner"][1], providers="cpu").manifest
    assert refiner.prompt_sources() == {"text_encoder_2": "prompt"}
    assert refiner.pipeline.requires_aesthetics_score and refiner.unet_feeds()["time_ids"] == "time_ids"


@pytest.mark.parametrize("kwargs, field", [
    ({"denoising_start": 0.5}, "denoising_start"),
    ({"denoising_end": 1.5}, "denoising_end"),
    ({"original_size": (64,)}, "original_size"),
    ({"aesthetic_score": "high"}, "aesthetic_score"),
    ({"prompt_2": ["a", "b"]}, "prompt_2"),
    ({"output_type": "np"}, "output_type"),
    ({"no_such_argument": 1}, "no_such_argument"),
    ({"image": np.zeros((1, 3, 16, 16), np.float32)}, "image"),
])
def test_bad_sdxl_arguments_are_refused_by_name(base, kwargs, field):
    with pytest.raises(InvalidRequestError) as e:
        base(PROMPT, num_inference_steps=4, **kwargs)
    assert field in str(e.value)


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sdxl-refiner"])
def test_compare_covers_sdxl(sdxl, name):
    from ortdiffusion.export.compare import compare

    report = compare(*sdxl[name], steps=4)
    whats = " ".join(line.what for line in report.lines)
    assert report.passed, [line for line in report.lines if not line.passed]
    assert "text_encoder_2.text_embeds" in whats and "StableDiffusionXLImg2ImgPipeline" in whats
    assert "StableDiffusionXLInpaintPipeline" in whats


def test_service_takes_prompt_2_and_denoising_end_with_a_refiner(ensemble):
    """The HTTP service's extensions (diffusers' names), merged batches included: each image is the
    one the Python API draws for the same arguments."""
    import base64
    import io
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from test_serve import running

    bodies = [{"prompt": PROMPT, "prompt_2": "a blue square", "denoising_end": 0.8, "seed": 3},
              {"prompt": "a green star", "seed": 4, "negative_prompt": "blurry"}]
    with running(ensemble, model_name="tiny-sdxl") as url, ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda b: httpx.post(f"{url}/v1/images/generations", timeout=300, json={
            "steps": 4, "response_format": "b64_json", **b}), bodies))
    for body, answer in zip(bodies, answers):
        assert answer.status_code == 200, answer.text
        got = Image.open(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"])))
        want = ensemble(num_inference_steps=4, **body).images[0]
        assert psnr(got.convert("RGB"), want) >= 50.0
        assert got.text["refiner_hash"] == ensemble.refiner.model_hash[:16]


def test_chunks_and_merges_carry_prompt_2(base):
    from ortdiffusion.runtime.request import make_request
    from ortdiffusion.serve.budget import chunks

    request = make_request(base.manifest, ["a", "b", "c"], prompt_2=["x", "y", "z"], seed=1, num_inference_steps=2)
    parts = chunks(request, 2)
    assert [p.prompts_2 for p in parts] == [("x", "y"), ("z",)]
    assert [p.negative_prompts_2 for p in parts] == [("", ""), ("",)]


def test_cli_generate_takes_the_refiner_and_sdxl_names(sdxl, tmp_path):
    from ortdiffusion.cli import main

    out = tmp_path / "x.png"
    code = main(["generate", PROMPT, "--model", str(sdxl["tiny-sdxl"][1]), "--refiner", str(sdxl["tiny-sdxl-refiner"][1]),
                 "--denoising-end", "0.75", "--prompt-2", "a blue square", "--original-size", "128x96",
                 "--aesthetic-score", "7", "--steps", "4", "--seed", "2", "-q", "-o", str(out)])
    assert code == 0
    meta = Image.open(out).text
    assert meta["denoising_end"] == "0.75" and meta["refiner_hash"]


def test_sdxl_arch_is_sdxl_base_sized():
    """The `sdxl-arch` preset's configs make SDXL base's networks (built on the meta device: no
    memory), with its 6 time ids and the two encoders' 768 + 1280 hidden states feeding 2048."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ortdiffusion.export.presets import PRESETS
    from ortdiffusion.export.sdxl import time_id_count

    preset = PRESETS["sdxl-arch"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**preset.unet)
        te = CLIPTextModel(CLIPTextConfig(**preset.text_encoder))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**preset.text_encoder_2))
    millions = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (unet, te, te2)]
    assert 2560 < millions[0] < 2580 and 120 < millions[1] < 125 and 690 < millions[2] < 700, millions
    assert time_id_count(unet, te2.config.projection_dim) == 6
    assert te.config.hidden_size + te2.config.hidden_size == unet.config.cross_attention_dim


def test_an_fp16_export_keeps_sdxls_vae_fp32():
    """diffusers upcasts SDXL's VAE (`force_upcast`): it overflows fp16 (the black image)."""
    from types import SimpleNamespace

    from ortdiffusion.export.bundle import ExportOptions, _component_options
    from ortdiffusion.runtime.manifest import Precision

    fp16 = ExportOptions(precision=Precision.FP16)
    vae = SimpleNamespace(config=SimpleNamespace(force_upcast=True))
    sdxl_ckpt = SimpleNamespace(is_sdxl=True, vae=vae)
    assert _component_options(sdxl_ckpt, "vae_decoder", fp16).precision is Precision.FP32
    assert _component_options(sdxl_ckpt, "vae_encoder", fp16).precision is Precision.FP32
    assert _component_options(sdxl_ckpt, "unet", fp16).precision is Precision.FP16
    assert _component_options(SimpleNamespace(is_sdxl=False, vae=vae), "vae_decoder", fp16).precision is Precision.FP16


def test_long_prompts_match_diffusers_fed_the_same_windows(sdxl, base, ref_base):
    """Long prompts with two text encoders: each encoder's 75-token windows encoded one by one,
    their penultimate hidden states concatenated along the tokens (as many windows for both, here a
    prompt_2 longer than the prompt), the pooled `text_embeds` the first window's (as the web UIs
    do); the image matches diffusers' pipeline fed the same embeddings."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    checkpoint = sdxl["tiny-sdxl"][0]
    prompt_2 = " ".join([PROMPT] + ["and a large green star at the bottom right"] * 9)  # two windows
    negative = "blurry"
    ids_2, chunks = base.tokenizers["text_encoder_2"].chunked([negative, prompt_2], 4)
    ids_1, _ = base.tokenizers["text_encoder"].chunked([negative, PROMPT], 4, min_chunks=chunks)
    assert chunks == 2
    with torch.no_grad():
        first = CLIPTextModel.from_pretrained(str(checkpoint / "text_encoder"))
        second = CLIPTextModelWithProjection.from_pretrained(str(checkpoint / "text_encoder_2"))
        h1 = first(torch.from_numpy(ids_1), output_hidden_states=True).hidden_states[-2]
        out_2 = second(torch.from_numpy(ids_2), output_hidden_states=True)
        hidden = torch.cat([h1, out_2.hidden_states[-2]], dim=-1)
        hidden = hidden.reshape(2, chunks * hidden.shape[1], hidden.shape[2])
        pooled = out_2.text_embeds.reshape(2, chunks, -1)[:, 0]
    latents = start_latents(4)
    ref = run(ref_base, "euler", ("sdxl",), prompt_embeds=hidden[1:], negative_prompt_embeds=hidden[:1],
              pooled_prompt_embeds=pooled[1:], negative_pooled_prompt_embeds=pooled[:1],
              latents=torch.from_numpy(latents), guidance_scale=5.0)[0]
    ours = base(PROMPT, prompt_2=prompt_2, negative_prompt=negative, latents=latents, seed=SEED,
                num_inference_steps=STEPS, scheduler="euler", guidance_scale=5.0, long_prompts=True).images[0]
    assert np.asarray(ours).std() > 5
    assert psnr(ours, ref) >= 40.0, f"PSNR {psnr(ours, ref):.1f} dB"
    plain = base(PROMPT, prompt_2=prompt_2, negative_prompt=negative, latents=latents, seed=SEED,
                 num_inference_steps=STEPS, scheduler="euler", guidance_scale=5.0).images[0]
    assert psnr(ours, plain) < 60.0  # the second window counts (a few grey levels on this tiny random model)
