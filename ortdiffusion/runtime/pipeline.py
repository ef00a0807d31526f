"""Prompt → images, top to bottom (DESIGN.md's diagram):

    prompt ─► tokenizer ─► text encoder ─► embeddings ─┐
                                                       ▼
    seeded noise ─► [ UNet step ─► guidance ─► scheduler step ] × N ─► latents ─► image decoder ─► PNG

Between the sessions the arrays pass through numpy on the host (`_networks_on_host`), or, where the
UNet runs on a GPU, stay on the device: guidance and the scheduler step then run as a small ONNX
graph and nothing crosses inside the loop (`device_loop.py`). Only onnxruntime, numpy, tokenizers and pillow are used here. One `Pipeline` may be called from
several threads at once: every call keeps its own scheduler, noise generators and buffers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from .. import __version__
from .components import Denoiser, ImageDecoder, TextEncoder
from .device_loop import DeviceLoop, GraphCache, Transfers
from .errors import BundleError, InvalidRequestError, NumericalError, ProviderError
from .manifest import (
    TEXT_ENCODER,
    UNET,
    VAE_DECODER,
    Manifest,
    load_manifest,
    verify_files,
)
from .png import encode_pngs, write_atomically
from .providers import ComponentSettings, CudaOptions, ProviderKind, ProviderPreference, default_preference
from .request import GenerationRequest, make_request
from .schedulers import SchedulerName, make_scheduler
from .session import Session
from .tokenizer import PromptTokenizer

logger = logging.getLogger(__name__)

#: Called after each denoising step with (step index, number of steps, the latents after it);
#: may raise to cancel. The latents are the pipeline's own array: copy them to keep them.
StepCallback = Callable[[int, int, np.ndarray], None]


@dataclass
class Timings:
    """Seconds spent in each stage of one call."""

    tokenize: float = 0.0
    text_encoder: float = 0.0
    unet_steps: list[float] = field(default_factory=list)
    scheduler: float = 0.0  # scheduler steps, guidance and input scaling together
    decoder: float = 0.0
    postprocess: float = 0.0
    total: float = 0.0

    @property
    def unet(self) -> float:
        return float(sum(self.unet_steps))


@dataclass
class PipelineResult:
    images: list[Image.Image]
    seeds: list[int]
    timings: Timings
    #: The provider each component really ran on, e.g. {"unet": "cpu", ...}.
    providers: dict[str, str]
    #: Per image: the parameters written into its PNG text chunks.
    metadata: list[dict[str, str]]
    #: Arrays that crossed between host and device (device_loop.Transfers).
    transfers: Transfers = field(default_factory=Transfers)

    def save(self, path: Path | str) -> list[Path]:
        """Save as PNG with parameters; several images get `-0`, `-1`, … before the suffix."""
        path = Path(path)
        paths = [path] if len(self.images) == 1 else [
            path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(len(self.images))]
        return [write_atomically(png, p) for png, p in zip(self.pngs(), paths)]

    def pngs(self) -> list[bytes]:
        """Each image as PNG bytes with its parameters in text chunks, encoded in parallel."""
        return encode_pngs(self.images, self.metadata)


class Pipeline:
    """A loaded bundle: its tokenizer, three sessions and constants."""

    def __init__(self, bundle_dir: Path, manifest: Manifest, preference: ProviderPreference, intra_op_threads: int = 0,
                 io_binding: bool | None = None, cuda_graphs: Sequence[tuple[int, int, int]] = (), max_cuda_graphs: int = 2,
                 component_settings: Mapping[str, ComponentSettings] | None = None):
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        c = manifest.pipeline
        self.tokenizer = PromptTokenizer(bundle_dir / manifest.tokenizer.path, c.tokenizer_max_length, c.pad_token_id)
        self.model_hash = manifest.bundle_sha256
        self.component_settings = dict(component_settings or {})
        sessions = {
            name: Session(bundle_dir, manifest.components[name], preference, intra_op_threads, self.model_hash,
                          settings=self.component_settings.get(name))
            for name in (TEXT_ENCODER, UNET, VAE_DECODER)
        }
        self.text_encoder = TextEncoder(sessions[TEXT_ENCODER])
        self.denoiser = Denoiser(sessions[UNET])
        self.image_decoder = ImageDecoder(sessions[VAE_DECODER])
        self.providers = {name: s.providers[0].value for name, s in sessions.items()}
        #: where each component's nodes run, provider -> count (checked at load: see providers.check_placement)
        self.placement = {name: dict(s.placement.nodes) for name, s in sessions.items() if s.placement is not None}
        # IO binding (the loop on the device): by default where the UNet runs on a GPU
        on_gpu = sessions[UNET].device[0] != "cpu"
        if io_binding is None:
            io_binding = on_gpu
        if io_binding and len({s.device for s in sessions.values()}) > 1:
            raise ProviderError(f"io_binding: the components run on different devices "
                                f"({ {n: s.device[0] for n, s in sessions.items()} }); it needs them on one")
        graphs = None
        if cuda_graphs:
            if not io_binding:
                raise ProviderError("cuda_graphs: needs io_binding (a CUDA graph replays into fixed device buffers)")
            graphs = self._graph_cache(sessions[UNET], preference, intra_op_threads, cuda_graphs, max_cuda_graphs)
        self.device_loop = (DeviceLoop(sessions[TEXT_ENCODER], sessions[UNET], sessions[VAE_DECODER], graphs)
                            if io_binding else None)

    def _graph_cache(self, unet: Session, preference: ProviderPreference, threads: int,
                     sizes: Sequence[tuple[int, int, int]], max_graphs: int) -> GraphCache:
        """Static-shape UNet sessions per bucket; on the CUDA provider each captures a CUDA graph.
        On the CPU provider (tests) they are the same sessions without the capture."""
        kind = unet.providers[0]
        if kind is ProviderKind.TENSORRT:
            raise ProviderError("cuda_graphs: for the cuda provider; the UNet runs on tensorrt "
                                "(TensorRT's own CUDA graph option is not wired up)")
        if kind is ProviderKind.CUDA:
            cuda = preference.options.get(ProviderKind.CUDA) or CudaOptions()
            preference = replace(preference, kinds=(ProviderKind.CUDA,),
                                 options={**preference.options, ProviderKind.CUDA: replace(cuda, enable_cuda_graph=True)})
        else:
            preference = replace(preference, kinds=(kind,))
        component, c = self.manifest.components[UNET], self.manifest.pipeline

        def make_session(dims: dict[str, int]) -> Session:
            return Session(self.bundle_dir, component, preference, threads, self.model_hash, fixed_dims=dims,
                           settings=self.component_settings.get(UNET))

        return GraphCache(sizes, max_graphs, make_session, component.inputs, component.outputs,
                          c.vae_scale_factor, unet.device)

    @classmethod
    def load(
        cls,
        path: Path | str,
        providers: str | Sequence[str] | ProviderPreference | None = None,
        allow_fallback: bool = False,
        intra_op_threads: int = 0,
        io_binding: bool | None = None,
        cuda_graphs: Sequence[tuple[int, int, int]] = (),
        max_cuda_graphs: int = 2,
        component_settings: Mapping[str, ComponentSettings | Mapping] | None = None,
    ) -> Pipeline:
        """Load a bundle directory; `providers` is an ordered preference ("cuda,cpu"), None to choose.
        `io_binding`: keep the denoising loop on the device (device_loop.py); None: where the UNet
        runs on a GPU. `cuda_graphs`: (images, height, width) buckets whose UNet runs as a captured
        CUDA graph, at most `max_cuda_graphs` kept at once (device_loop.GraphCache).
        `component_settings`: per component ("text_encoder", "unet", "vae_decoder") session settings
        over the preference's — CPU arena on or off, the CUDA arena's extend strategy and memory
        limit (providers.ComponentSettings, or a mapping of its fields). `path` is a bundle directory
        or a model name (`builtin`, a cached preset or checkpoint: ortdiffusion.models.find_bundle)."""
        from ..models import find_bundle  # lazily: models imports the runtime; torch-free

        path = find_bundle(path)
        if (path / "model_index.json").is_file() and not (path / "manifest.json").exists():
            raise BundleError(
                str(path), "is a diffusers checkpoint, not a bundle: export it first (`ortdiffusion export`), "
                "or use ortdiffusion.models.load_pipeline, which exports and caches it"
            )
        manifest = load_manifest(path)
        verify_files(path, manifest)
        preference = ProviderPreference.parse(providers, allow_fallback)
        if preference is None:
            preference = default_preference(manifest.components[UNET].providers)
        settings = {}
        for name, value in (component_settings or {}).items():
            if name not in (TEXT_ENCODER, UNET, VAE_DECODER):
                raise InvalidRequestError("component_settings", f"unknown component {name!r}; allowed: "
                                          f"{TEXT_ENCODER}, {UNET}, {VAE_DECODER}")
            settings[name] = ComponentSettings.parse(value, f"component_settings.{name}")
        pipe = cls(path, manifest, preference, intra_op_threads, io_binding, cuda_graphs, max_cuda_graphs, settings)
        logger.info("loaded %s on %s", path, pipe.providers)
        return pipe

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str | SchedulerName | None = None,
        seed: int | Sequence[int] | None = None,
        latents: np.ndarray | None = None,
        width: int | None = None,
        height: int | None = None,
        callback: StepCallback | None = None,
    ) -> PipelineResult:
        request = make_request(
            self.manifest, prompt, negative_prompt, num_images_per_prompt, num_inference_steps,
            guidance_scale, scheduler, seed, latents, width, height,
        )
        return self.generate(request, callback)

    def generate(self, request: GenerationRequest, callback: StepCallback | None = None) -> PipelineResult:
        c = self.manifest.pipeline
        timings = Timings()
        start = clock = time.perf_counter()

        def lap() -> float:
            nonlocal clock
            now = time.perf_counter()
            elapsed, clock = now - clock, now
            return elapsed

        # 1. tokenize: the negative prompts first, as diffusers stacks [uncond; cond]
        pairs = request.image_prompts()
        prompts = [p for p, _ in pairs]
        negatives = [n for _, n in pairs]
        ids = self.tokenizer(negatives + prompts if request.do_guidance else prompts)
        timings.tokenize = lap()

        # 2. scheduler and seeded noise: one generator per image, so an image depends only on its own seed
        scheduler = make_scheduler(request.scheduler, c.scheduler_config)
        scheduler.set_timesteps(request.steps)
        generators = [np.random.Generator(np.random.PCG64(s)) for s in request.seeds]
        latent_shape = (c.latent_channels, request.height // c.vae_scale_factor, request.width // c.vae_scale_factor)
        noise = request.latents if request.latents is not None else _draw(generators, latent_shape)
        latents = (noise * np.float32(scheduler.init_noise_sigma)).astype(np.float32)
        timings.scheduler += lap()

        def mark(stage: str) -> None:
            if stage == "unet":
                timings.unet_steps.append(lap())
            else:
                setattr(timings, stage, getattr(timings, stage) + lap())

        # 3–5. text encoder → denoising loop → image decoder: between the sessions the arrays pass
        # through the host, or, on a GPU, stay on the device (IO binding; device_loop.py)
        transfers = Transfers()
        if self.device_loop is None:
            pixels = self._networks_on_host(request, ids, scheduler, generators, latents, transfers, mark, callback)
        else:
            step_noise = None
            if scheduler.needs_noise:  # drawn up front, in the order the host loop draws it
                draws = [_draw(generators, latent_shape) for _ in range(request.steps)]
                step_noise = np.stack([*draws, np.zeros_like(latents)])
            pixels = self.device_loop(
                ids, latents, scheduler, request.guidance_scale if request.do_guidance else None, step_noise,
                c.vae_scaling_factor, c.vae_shift_factor, transfers, mark, callback)
            pixels = self.image_decoder.checked(pixels)
            mark("decoder")

        # 6. pixels → 8-bit images (diffusers' VaeImageProcessor.postprocess, to the rounding)
        array = np.clip(pixels / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
        images = [Image.fromarray(a) for a in (array * 255).round().astype(np.uint8)]
        metadata = [self._metadata(request, p, n, s) for (p, n), s in zip(pairs, request.seeds)]
        timings.postprocess = lap()
        timings.total = time.perf_counter() - start
        return PipelineResult(images, list(request.seeds), timings, dict(self.providers), metadata, transfers)

    def _networks_on_host(self, request: GenerationRequest, ids: np.ndarray, scheduler, generators, latents: np.ndarray,
                          transfers: Transfers, mark: Callable[[str], None], callback: StepCallback | None) -> np.ndarray:
        """Text encoder → denoising loop → image decoder with numpy arrays between the sessions."""
        c = self.manifest.pipeline
        # 3. text encoder → embeddings (one batch for both halves)
        embeddings = self.text_encoder(ids, transfers)
        mark("text_encoder")

        # 4. denoising loop: UNet step → guidance → scheduler step
        for i, t in enumerate(scheduler.timesteps):
            model_input = scheduler.scale_model_input(latents, i)
            if request.do_guidance:
                model_input = np.concatenate([model_input, model_input])
            mark("scheduler")
            with transfers.looping():
                prediction = self.denoiser(model_input, float(t), embeddings, last=i == len(scheduler.timesteps) - 1,
                                           transfers=transfers)
            mark("unet")
            if request.do_guidance:
                uncond, cond = np.split(prediction, 2)
                prediction = uncond + np.float32(request.guidance_scale) * (cond - uncond)
            step_noise = _draw(generators, latents.shape[1:]) if scheduler.needs_noise else None
            latents = scheduler.step(prediction, i, latents, noise=step_noise)
            if not np.isfinite(latents).all():
                raise NumericalError(f"unet: latents became non-finite (NaN/Inf) at denoising step {i + 1} of {request.steps}")
            mark("scheduler")
            if callback is not None:
                callback(i, request.steps, latents)

        # 5. image decoder: undo the VAE's latent scaling, decode to pixels in [-1, 1]
        latents = latents / np.float32(c.vae_scaling_factor)
        if c.vae_shift_factor is not None:
            latents = latents + np.float32(c.vae_shift_factor)
        pixels = self.image_decoder(latents.astype(np.float32), transfers)
        mark("decoder")
        return pixels

    def _metadata(self, request: GenerationRequest, prompt: str, negative: str, seed: int) -> dict[str, str]:
        return {
            "prompt": prompt, "negative_prompt": negative, "seed": str(seed), "steps": str(request.steps),
            "scheduler": request.scheduler.value, "guidance_scale": f"{request.guidance_scale:g}",
            "size": f"{request.width}x{request.height}", "model_hash": self.model_hash[:16],
            "software": f"ortdiffusion {__version__}",
        }


def _draw(generators: list[np.random.Generator], shape: tuple[int, ...]) -> np.ndarray:
    """One standard-normal array per image, stacked: (images, *shape) float32."""
    return np.stack([g.standard_normal(shape, dtype=np.float32) for g in generators])
