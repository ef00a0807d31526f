"""torch against ONNX Runtime, per component and end to end, on identical inputs.

The reference is the checkpoint run by transformers and diffusers themselves (diffusers'
`StableDiffusionPipeline` for the end-to-end image); the candidate is the bundle run by this
engine. Every figure is judged against a tolerance of the bundle's precision and the report says
pass or fail per line.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..runtime.errors import BundleError
from ..runtime.lora import LoraRegistry, LoraSpec
from ..runtime.manifest import Precision, load_manifest, verify_files
from ..runtime.quality import psnr
from ..runtime.session import Session
from .bundle import pipeline_components
from .checkpoint import load_checkpoint, weights_sha256
from .parity import error_figures

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerances:
    rel_l2: float  # per component output
    min_psnr_db: float  # final image
    min_ssim: float
    # the latents after the last step, against diffusers' (rel L2). Two unrelated latents of equal
    # norm are √2 apart, so a limit must stay well below that to say anything. fp16 and int8 are set
    # where they agree with the image limits: a tiny UNet whose output is scaled by 2 (3) leaves its
    # latents 0.28 (0.47) apart and its image at 26.6 (22.2) dB. fp32's is 10× its component limit:
    # a UNet 2% off (latents 6.6e-3 apart) still makes a 55 dB image, which only this line catches.
    max_latent_rel_l2: float


TOLERANCES = {
    Precision.FP32: Tolerances(rel_l2=1e-4, min_psnr_db=40.0, min_ssim=0.99, max_latent_rel_l2=1e-3),
    Precision.FP16: Tolerances(rel_l2=2e-2, min_psnr_db=28.0, min_ssim=0.95, max_latent_rel_l2=0.2),
    # int8 changes the image visibly but keeps its content; the evaluator judges adherence.
    Precision.INT8: Tolerances(rel_l2=0.25, min_psnr_db=20.0, min_ssim=0.80, max_latent_rel_l2=0.6),
}


@dataclass
class Line:
    what: str
    figures: dict[str, float]
    passed: bool
    limit: str


@dataclass
class CompareReport:
    checkpoint: str
    bundle: str
    precision: str
    lines: list[Line] = field(default_factory=list)
    latent_divergence: list[dict[str, float]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(line.passed for line in self.lines)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def _gaussian_blur(x: np.ndarray, sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    x = np.apply_along_axis(lambda r: np.convolve(r, k, mode="valid"), 0, x)
    return np.apply_along_axis(lambda r: np.convolve(r, k, mode="valid"), 1, x)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM over channels (Wang et al. 2004: 11-tap Gaussian window, σ = 1.5, K1 = .01, K2 = .03)."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    scores = []
    for ch in range(a.shape[-1]):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        if min(x.shape) < 11:
            return float("nan")
        mx, my = _gaussian_blur(x), _gaussian_blur(y)
        sxx = _gaussian_blur(x * x) - mx**2
        syy = _gaussian_blur(y * y) - my**2
        sxy = _gaussian_blur(x * y) - mx * my
        m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
        scores.append(m.mean())
    return float(np.mean(scores))


def _counts(a: np.ndarray) -> dict[str, float]:
    return {"nan": float(np.isnan(a).sum()), "inf": float(np.isinf(a).sum())}


def default_provider(manifest) -> str:
    """The provider a bundle is compared on: the CPU where every component runs there (a generic or
    CPU export), else the one its components were exported for (a CUDA export runs on CUDA only)."""
    components = manifest.components.values()
    if all("cpu" in c.providers for c in components):
        return "cpu"
    return next(iter(components)).providers[0]


def as_exported(spec, component):
    """`spec` with the input shapes and dims the bundle's component was exported with."""
    shapes = {i.name: i for i in component.inputs}
    inputs = tuple(replace(i, info=shapes.get(i.info.name, i.info)) for i in spec.inputs)
    return replace(spec, inputs=inputs, dims={d: r for d, r in component.dims.items()})


def _tiny_decoder_component(ckpt, manifest) -> list:
    """The tiny decoder's spec and module where the bundle has one and its source is on this machine."""
    from ..runtime.manifest import VAE_DECODER_TINY
    from .bundle import TINY_DECODER_SOURCE
    from .specs import tiny_decoder_component

    source = manifest.extra.get(TINY_DECODER_SOURCE)
    if VAE_DECODER_TINY not in manifest.components or not source or not Path(source).is_dir():
        return []
    from diffusers import AutoencoderTiny

    tiny = AutoencoderTiny.from_pretrained(source).eval()
    return [tiny_decoder_component(tiny, float(ckpt.vae.config.scaling_factor), int(ckpt.unet.config.sample_size))]


def _with_controlnets(components: list, ckpt, manifest) -> list:
    """The pipeline's specs as a ControlNet bundle has them: the UNet with residual inputs and each
    ControlNet (from its recorded source directory; BundleError where that is not on this machine)."""
    if not manifest.controlnets:
        return components
    from .controlnet import with_controlnets

    sources = [Path(c.source) for c in manifest.controlnets]
    missing = [str(s) for s in sources if not s.is_dir()]
    if missing:
        raise BundleError(missing[0], "the ControlNet this bundle was exported from is not on this machine; "
                                      "compare needs it (manifest.json: controlnets[].source)")
    return with_controlnets(components, tuple(sources), 2 ** (len(ckpt.vae.config.block_out_channels) - 1))[0]


def compare_controlnets(ckpt_dir: Path, bundle_dir: Path, manifest, image: np.ndarray, prompt: str, steps: int,
                        guidance: float, scheduler: str, seed: int, tol: Tolerances,
                        provider: str = "cpu") -> list[Line]:
    """The bundle's ControlNets on the Canny edges of `image` against diffusers'
    `StableDiffusionControlNetPipeline` (a list of ControlNets: its MultiControlNetModel), the same
    latents, edges and noise fed to both."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from ..runtime.canny import canny_edges
    from ..runtime.pipeline import Pipeline
    from .reference import ancestral_noise_from_seeds, reference_scheduler

    ours = Pipeline.load(bundle_dir, providers=provider)
    edges = canny_edges(Image.fromarray(image))
    controls = [edges] * len(manifest.controlnets)
    c = manifest.pipeline
    shape = (1, c.latent_channels, image.shape[0] // c.vae_scale_factor, image.shape[1] // c.vae_scale_factor)
    latents = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    got = np.asarray(ours(prompt, control_image=controls, latents=latents, seed=seed, num_inference_steps=steps,
                          guidance_scale=guidance, scheduler=scheduler).images[0])
    nets = [ControlNetModel.from_pretrained(info.source, torch_dtype=torch.float32) for info in manifest.controlnets]
    ref = StableDiffusionControlNetPipeline.from_pretrained(
        str(ckpt_dir), controlnet=nets if len(nets) > 1 else nets[0], safety_checker=None, requires_safety_checker=False)
    ref.to(torch.float32)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = reference_scheduler(scheduler, ref.scheduler.config)
    with ancestral_noise_from_seeds([seed]):
        want = np.asarray(ref(prompt, image=controls if len(nets) > 1 else controls[0],
                              latents=torch.from_numpy(latents), num_inference_steps=steps, guidance_scale=guidance,
                              height=image.shape[0], width=image.shape[1]).images[0])
    figures = {"psnr_db": psnr(want, got), "ssim": ssim(want, got)}
    return [Line(f"controlnet ×{len(nets)} [{prompt!r}, {scheduler}, {steps} steps, Canny edges, "
                 f"{type(ref).__name__}]", figures,
                 figures["psnr_db"] >= tol.min_psnr_db and figures["ssim"] >= tol.min_ssim,
                 f"PSNR ≥ {tol.min_psnr_db:g} dB, SSIM ≥ {tol.min_ssim:g}")]


def compare_components(ckpt, bundle_dir: Path, manifest, tol: Tolerances, seed: int, provider: str = "cpu") -> list[Line]:
    from ..runtime.providers import ProviderPreference

    lines = []
    preference = ProviderPreference.parse(provider)
    no_lora = LoraRegistry(manifest).feeds(())
    components = _with_controlnets(pipeline_components(ckpt), ckpt, manifest) + _tiny_decoder_component(ckpt, manifest)
    for spec, module in components:
        if spec.name not in manifest.components:  # a bundle from before the image encoder
            continue
        # at the shapes the bundle takes: one exported before a dim became symbolic keeps it fixed
        spec = as_exported(spec, manifest.components[spec.name])
        session = Session(bundle_dir, manifest.components[spec.name], preference)
        extra = no_lora.get(spec.name, {})  # a bundle with LoRA inputs: rank 0, the checkpoint's own weights
        for k, dims in enumerate(spec.parity_points()):
            inputs = spec.sample_inputs(dims, seed=seed + k)
            if spec.name == "unet" and manifest.extra.get("one_timestep_per_batch"):
                # an imported UNet that takes one (scalar) timestep gets it as the loop gives it: the same for every row
                inputs = tuple(t.fill_(float(t[0])) if n == "timestep" else t for n, t in zip(spec.input_names, inputs))
            with torch.no_grad():
                ref = module(*inputs)
            ref = ref if isinstance(ref, tuple) else (ref,)
            got = list(session.run({**{n: t.numpy() for n, t in zip(spec.input_names, inputs)}, **extra}).values())
            for name, g, r in zip(spec.output_names, got, ref):
                max_abs, rel_l2, cosine = error_figures(g, r.numpy())
                figures = {"max_abs_error": max_abs, "rel_l2_error": rel_l2, "cosine_similarity": cosine, **_counts(g)}
                ok = rel_l2 <= tol.rel_l2 and figures["nan"] == 0 and figures["inf"] == 0
                shape = " ".join(f"{d}={v}" for d, v in dims.items())
                lines.append(Line(f"{spec.name}.{name} [{shape}]", figures, ok, f"rel L2 ≤ {tol.rel_l2:g}, no NaN/Inf"))
    return lines


def _class_name(ckpt_dir: Path) -> str:
    return json.loads((Path(ckpt_dir) / "model_index.json").read_text(encoding="utf-8"))["_class_name"]


def reference_pipeline(ckpt_dir: Path, task: str = "text-to-image"):
    """diffusers' own pipeline of the checkpoint's family for `task` (text-to-image, image-to-image,
    inpainting), fp32, or None where diffusers has none (an SDXL refiner does image-to-image only)."""
    import diffusers

    sdxl = _class_name(ckpt_dir).startswith("StableDiffusionXL")
    # text-to-image: the checkpoint's own pipeline class (StableDiffusionPipeline,
    # LatentConsistencyModelPipeline, LDMTextToImagePipeline, …), as model_index.json names it
    names = {"text-to-image": "DiffusionPipeline", "image-to-image": "StableDiffusionImg2ImgPipeline",
             "inpainting": "StableDiffusionInpaintPipeline"}
    if sdxl:
        if task == "text-to-image" and _class_name(ckpt_dir) != "StableDiffusionXLPipeline":
            return None
        names = {"text-to-image": "StableDiffusionXLPipeline", "image-to-image": "StableDiffusionXLImg2ImgPipeline",
                 "inpainting": "StableDiffusionXLInpaintPipeline"}
    no_safety = not sdxl and _class_name(ckpt_dir) != "LDMTextToImagePipeline"
    kwargs = {"safety_checker": None, "requires_safety_checker": False} if no_safety else {}
    ref = getattr(diffusers, names[task]).from_pretrained(str(ckpt_dir), **kwargs)
    ref.to(torch.float32)  # positional: every diffusers version takes it (the keyword was renamed)
    ref.set_progress_bar_config(disable=True)
    return ref


def compare_end_to_end(ckpt_dir: Path, bundle_dir: Path, prompt: str, steps: int, guidance: float,
                       scheduler: str, seed: int, tol: Tolerances, provider: str = "cpu",
                       loras: tuple[LoraSpec, ...] = ()) -> tuple[list[Line], list[dict], np.ndarray, np.ndarray]:
    import inspect

    from ..runtime.pipeline import Pipeline
    from .reference import ancestral_noise_from_seeds, reference_scheduler

    ours = Pipeline.load(bundle_dir, providers=provider)
    c = ours.manifest.pipeline
    shape = (1, c.latent_channels, c.default_height // c.vae_scale_factor, c.default_width // c.vae_scale_factor)
    latents = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    ours_steps: list[np.ndarray] = []
    chosen = {ours.load_lora(spec.path, f"lora{k}"): spec.scale for k, spec in enumerate(loras)}
    result = ours(prompt, latents=latents, seed=seed, num_inference_steps=steps, guidance_scale=guidance,
                  scheduler=scheduler, callback=lambda i, n, x: ours_steps.append(x.copy()), lora=chosen or None)

    # fp32 whatever dtype the weights were saved in: a checkpoint saved in fp16 (the built-in one)
    # otherwise loads its text encoder in fp16 (transformers 5 keeps the saved dtype) beside an fp32
    # UNet, and the first cross-attention fails with "c10::Half != float".
    ref = reference_pipeline(ckpt_dir)
    ref.scheduler = reference_scheduler(scheduler, ref.scheduler.config)
    if chosen:  # diffusers' own LoRA loading (PEFT), the same scales
        for name, spec in zip(chosen, loras):
            ref.load_lora_weights(str(spec.path), adapter_name=name)
        ref.set_adapters(list(chosen), adapter_weights=list(chosen.values()))
    ref_steps: list[np.ndarray] = []

    def keep(pipe, i, t, kwargs):
        ref_steps.append(kwargs["latents"].numpy().copy())
        return kwargs

    # per-step latents where the pipeline hands them out (LDM's has no step callback)
    per_step = {"callback_on_step_end": keep} if "callback_on_step_end" in inspect.signature(ref.__call__).parameters else {}
    with ancestral_noise_from_seeds([seed], where=("ancestral", "lcm")):
        image_ref = ref(prompt, latents=torch.from_numpy(latents), num_inference_steps=steps, guidance_scale=guidance,
                        **per_step).images[0]
    a, b = np.asarray(image_ref), np.asarray(result.images[0])
    divergence = []
    for i, (x, y) in enumerate(zip(ref_steps, ours_steps)):
        max_abs, rel_l2, cosine = error_figures(y, x)
        divergence.append({"step": i + 1, "max_abs_error": max_abs, "rel_l2_error": rel_l2, "cosine_similarity": cosine})
    figures = {"psnr_db": psnr(a, b), "ssim": ssim(a, b), "max_abs_error": float(np.abs(a.astype(int) - b.astype(int)).max())}
    with_lora = ", LoRA " + " + ".join(f"{spec.path.name}×{spec.scale:g}" for spec in loras) if loras else ""
    lines = [Line(f"image [{prompt!r}, {scheduler}, {steps} steps{with_lora}]", figures,
                  figures["psnr_db"] >= tol.min_psnr_db and figures["ssim"] >= tol.min_ssim,
                  f"PSNR ≥ {tol.min_psnr_db:g} dB, SSIM ≥ {tol.min_ssim:g}")]
    if divergence:
        last = divergence[-1]
        lines.append(Line("latents after the last step", {k: v for k, v in last.items() if k != "step"},
                          last["rel_l2_error"] <= tol.max_latent_rel_l2, f"rel L2 ≤ {tol.max_latent_rel_l2:g}"))
    return lines, divergence, a, b


def compare_image_tasks(ckpt_dir: Path, bundle_dir: Path, image: np.ndarray, prompt: str, steps: int, guidance: float,
                        scheduler: str, seed: int, tol: Tolerances, provider: str = "cpu") -> list[Line]:
    """Image-to-image (strength 0.6) and inpainting (the left half, strength 1) of `image` against
    diffusers' `StableDiffusionImg2ImgPipeline` and `StableDiffusionInpaintPipeline`, the same noise
    fed to both (`ancestral_noise_from_seeds`)."""
    from ..runtime.pipeline import Pipeline
    from .reference import ancestral_noise_from_seeds, reference_scheduler

    ours = Pipeline.load(bundle_dir, providers=provider)
    source = Image.fromarray(image)
    mask = np.zeros(image.shape[:2], np.uint8)
    mask[:, : image.shape[1] // 2] = 255
    inpaint = ("inpainting", "inpaint", {"image": source, "mask_image": Image.fromarray(mask), "strength": 1.0})
    img2img = ("image-to-image", "img2img", {"image": source, "strength": 0.6})
    # an inpainting UNet does inpainting only; any other UNet both; SDXL: image-to-image (its own pipeline)
    tasks = [inpaint] if "inpaint_condition" in ours.manifest.unet_feeds() else [img2img, inpaint]
    if ours.manifest.pipeline.family.startswith("stable-diffusion-xl"):
        tasks = [("image-to-image", "sdxl_img2img", img2img[2]), ("inpainting", "sdxl_inpaint", inpaint[2])]
    lines = []
    for task, where, kwargs in tasks:
        got = np.asarray(ours(prompt, seed=seed, num_inference_steps=steps, guidance_scale=guidance,
                              scheduler=scheduler, **kwargs).images[0])
        ref = reference_pipeline(ckpt_dir, task)
        cls = type(ref)
        ref.scheduler = reference_scheduler(scheduler, ref.scheduler.config)
        with ancestral_noise_from_seeds([seed], where=("ancestral", "vae", where)):
            want = np.asarray(ref(prompt, num_inference_steps=steps, guidance_scale=guidance, **kwargs).images[0])
        figures = {"psnr_db": psnr(want, got), "ssim": ssim(want, got)}
        lines.append(Line(f"{task} [{prompt!r}, {scheduler}, {steps} steps, {cls.__name__}]", figures,
                          figures["psnr_db"] >= tol.min_psnr_db and figures["ssim"] >= tol.min_ssim,
                          f"PSNR ≥ {tol.min_psnr_db:g} dB, SSIM ≥ {tol.min_ssim:g}"))
    return lines


def _test_picture(height: int, width: int) -> np.ndarray:
    """A gradient with a disc: structure for an image encoder and decoder to get right."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([x / width * 255, y / height * 255, np.full_like(x, 90.0)], axis=-1)
    image[(x - width / 3) ** 2 + (y - height / 3) ** 2 < (min(height, width) / 5) ** 2] = (230, 30, 30)
    return image.astype(np.uint8)


def side_by_side(a: np.ndarray, b: np.ndarray, path: Path, amplify: float = 10.0) -> None:
    diff = np.clip(np.abs(a.astype(int) - b.astype(int)) * amplify, 0, 255).astype(np.uint8)
    Image.fromarray(np.concatenate([a, b, diff], axis=1)).save(path)


def compare(checkpoint: Path | str, bundle: Path | str, prompt: str = "a red circle on the left", steps: int = 20,
            guidance: float = 7.5, scheduler: str | None = None, seed: int = 0, image_path: Path | None = None,
            provider: str | None = None, loras: tuple[LoraSpec, ...] = ()) -> CompareReport:
    """torch (fp32, CPU) against the bundle run on `provider` (default: `default_provider`).
    `loras`: LoRA files and scales applied to the end-to-end image on both sides (diffusers'
    `load_lora_weights` + `set_adapters`; ours per request: a bundle exported with --lora-inputs)."""
    checkpoint, bundle = Path(checkpoint), Path(bundle)
    manifest = load_manifest(bundle)
    verify_files(bundle, manifest)
    actual = weights_sha256(checkpoint)
    # An imported ONNX export records the hash of its own files, so nothing ties it to a checkpoint
    # but this comparison: it is what judges the import.
    if actual != manifest.source.weights_sha256 and not manifest.extra.get("imported_from"):
        raise BundleError(
            str(bundle), f"was not exported from {checkpoint}: its manifest records weights "
            f"{manifest.source.weights_sha256[:12]}…, the checkpoint's weights hash to {actual[:12]}… (not compared)"
        )
    precision = manifest.components["unet"].precision
    tol = TOLERANCES[precision]
    ckpt = load_checkpoint(checkpoint)
    report = CompareReport(str(checkpoint), str(bundle), precision.value)
    provider = provider or default_provider(manifest)
    report.lines += compare_components(ckpt, bundle, manifest, tol, seed=7000 + seed, provider=provider)
    if _class_name(checkpoint) != "StableDiffusionXLImg2ImgPipeline":
        lines, divergence, a, b = compare_end_to_end(
            checkpoint, bundle, prompt, steps, guidance, scheduler or manifest.pipeline.default_scheduler, seed, tol,
            provider, tuple(loras))
        report.lines += lines
        report.latent_divergence = divergence
    else:  # an SDXL refiner: image-to-image only, on a picture of its own
        c = manifest.pipeline
        a = b = _test_picture(c.default_height, c.default_width)
    # the image tasks, on diffusers' own image as the input, where diffusers has the Stable Diffusion
    # family's (or SDXL's) img2img and inpainting pipelines to judge them by
    if "vae_encoder" in manifest.components and manifest.pipeline.family.startswith("stable-diffusion"):
        report.lines += compare_image_tasks(checkpoint, bundle, a, prompt, steps, guidance,
                                            scheduler or manifest.pipeline.default_scheduler, seed, tol, provider)
    if manifest.controlnets:  # on the picture the image tasks use, as edges
        c = manifest.pipeline
        picture = _test_picture(c.default_height, c.default_width)
        report.lines += compare_controlnets(checkpoint, bundle, manifest, picture, prompt, steps, guidance,
                                            scheduler or manifest.pipeline.default_scheduler, seed, tol, provider)
    if image_path is not None:
        side_by_side(a, b, image_path)
    return report
