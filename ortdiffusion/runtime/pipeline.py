"""Prompt → images, top to bottom (DESIGN.md's diagram):

    prompt ─► tokenizer ─► text encoder ─► embeddings ─┐
    (input image ─► image encoder ─► its latents) ─┐   │
                                                   ▼   ▼
    plan: timesteps, step coefficients, seeded noise ─► [ UNet step ─► guidance ─► scheduler step ] × N
                                                       ─► latents ─► image decoder ─► PNG

`Pipeline.generate` tokenizes, builds the request's plan (`plan.py`) and hands it to one of two
executors of the same plan: the host loop (`host_loop.py`, numpy between the sessions) or, where the
UNet runs on a GPU, the device loop (`device_loop.py`: guidance and the scheduler step as a small ONNX
graph, nothing crosses inside the loop). Only onnxruntime, numpy, tokenizers and pillow are used
here. One `Pipeline` may be called from several threads at once: every call has its own plan,
trace and buffers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .. import __version__
from .cache import cache_dir
from .control import make_control
from .decoder import ImageDecoder
from .errors import BundleError, InvalidRequestError, ProviderError
from .host_loop import HostLoop
from .image_input import ImageSource
from .lora import LoraRegistry
from .manifest import (
    UNET,
    VAE_DECODER,
    VAE_DECODER_FP32,
    VAE_DECODER_TINY,
    VAE_ENCODER,
    Manifest,
    Task,
    load_manifest,
    verify_files,
)
from .plan import Executor, ImageLatents, StepCallback, build_plan
from .preview import Previewer
from .png import encode_pngs, write_atomically
from .providers import ComponentSettings, CudaOptions, ProviderKind, ProviderPreference, default_preference
from .request import DEFAULT_STRENGTH_IMAGE, MAX_PROMPT_CHUNKS, GenerationRequest, make_request
from .schedulers import SchedulerName
from .session import Session, Sessions, expected_provider
from .tokenizer import PromptTokenizer
from .trace import Stage, Timings, Trace, Transfers

if TYPE_CHECKING:  # imported where IO binding asks for them: a CPU run never needs them
    from .device_loop import DeviceLoop
    from .graph_cache import GraphCache

logger = logging.getLogger(__name__)

#: Components whose sessions are created on first use, not at load: the image encoder runs only for
#: image inputs (img2img, inpainting). `Pipeline.providers` reports them before then as the provider
#: their session is asked for first; creating one checks it like any other (`Session`).
LAZY_COMPONENTS = frozenset({VAE_ENCODER})


@dataclass
class PipelineResult:
    images: list[Image.Image]
    seeds: list[int]
    timings: Timings
    #: The provider each component really ran on, e.g. {"unet": "cpu", ...}.
    providers: dict[str, str]
    #: Per image: the parameters written into its PNG text chunks.
    metadata: list[dict[str, str]]
    #: Arrays that crossed between host and device (trace.Transfers).
    transfers: Transfers = field(default_factory=Transfers)
    #: output_type="latent": the final latents (images, C, h, w) as the UNet sees them, and no images.
    latents: np.ndarray | None = None

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
    """A loaded bundle: its tokenizer, its sessions and constants."""

    def __init__(self, bundle_dir: Path, manifest: Manifest, preference: ProviderPreference, intra_op_threads: int = 0,
                 io_binding: bool | None = None, cuda_graphs: Sequence[tuple[int, int, int]] = (), max_cuda_graphs: int = 2,
                 component_settings: Mapping[str, ComponentSettings] | None = None, graph_cache: bool = True):
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        c = manifest.pipeline
        #: one tokenizer per text encoder (SDXL: two; its second pads with another token)
        self.tokenizers = {
            component: PromptTokenizer(bundle_dir / record.path, c.tokenizer_max_length, pad)
            for component, (record, pad) in ((n, manifest.tokenizer_of(n)) for n in manifest.prompt_sources())
        }
        self.tokenizer = next(iter(self.tokenizers.values()))
        #: diffusers' ensemble of experts: the SDXL refiner this base hands its latents to (`load(refiner=)`)
        self.refiner: Pipeline | None = None
        self.model_hash = manifest.bundle_sha256
        self.component_settings = dict(component_settings or {})
        graphs_dir = cache_dir() / "graphs" if graph_cache else None  # optimized_graphs.py

        def load(name: str, settings_of: str | None = None) -> Session:
            return Session(bundle_dir, manifest.components[name], preference, intra_op_threads, self.model_hash,
                           settings=self.component_settings.get(settings_of or name), graph_cache=graphs_dir)

        names = [name for name in manifest.components if name != VAE_DECODER_FP32]
        lazy = LAZY_COMPONENTS if not io_binding else frozenset()  # the device loop checks every device at load
        #: where each lazy component will run until its session exists (raises now if it cannot run anywhere)
        self._expected = {name: expected_provider(manifest.components[name], preference) for name in names if name in lazy}
        #: one session per component, the lazy ones created on first use (the fp32 decoder is loaded
        #: only if the NaN guard needs it)
        # made side by side where all made now will run on the CPU (Sessions says why); where that
        # cannot be told beforehand, one at a time, and each Session raises its own error
        try:
            parallel = all(expected_provider(manifest.components[name], preference) is ProviderKind.CPU
                           for name in names if name not in lazy)
        except Exception:  # noqa: BLE001 - only the choice of order is at stake here
            parallel = False
        self.sessions: Sessions = Sessions(names, load, lazy, parallel=parallel)
        sessions = self.sessions
        load_fp32 = None
        if VAE_DECODER_FP32 in manifest.components:
            def load_fp32() -> Session:
                return load(VAE_DECODER_FP32, VAE_DECODER)
        self.image_decoder = ImageDecoder(sessions[VAE_DECODER], load_fp32)
        #: what a call's `decoder` names → the decoder: the VAE's, and the tiny one where there is one
        self.decoders = {"full": self.image_decoder}
        if VAE_DECODER_TINY in sessions:
            self.decoders["tiny"] = ImageDecoder(sessions[VAE_DECODER_TINY])
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
        self._previewer: Previewer | None = None
        #: the LoRAs this bundle knows by name (`load_lora`), fed per request where it has LoRA inputs
        self.loras = LoraRegistry(manifest)
        #: what runs the plans: the device loop (IO binding) or the host loop
        if io_binding:
            from .device_loop import DeviceLoop

            self.executor: Executor = DeviceLoop(sessions, self.decoders, graphs)
        else:
            self.executor = HostLoop(sessions, self.decoders)

    @property
    def providers(self) -> dict[str, str]:
        """The provider each component runs on, e.g. {"unet": "cpu", ...}: its session's, checked at
        its creation; a lazy component not created yet (LAZY_COMPONENTS), the one it will be asked for."""
        loaded = self.sessions.loaded()
        return {name: loaded[name].providers[0].value if name in loaded else self._expected[name].value
                for name in self.sessions}

    @property
    def placement(self) -> dict[str, dict[str, int]]:
        """Where each component's nodes run, provider -> count (checked at load: providers.check_placement).
        ONNX Runtime's record of a real session: reading it creates any lazy session not created yet."""
        return {name: dict(s.placement.nodes) for name, s in self.sessions.items() if s.placement is not None}

    @property
    def previewer(self) -> Previewer:
        """Latents of the loop (a step callback's) → preview images (runtime/preview.py); made on first use."""
        if self._previewer is None:
            tiny = (lambda latents: self._decode_scaled(latents, "tiny")) if "tiny" in self.decoders else None
            self._previewer = Previewer(self.manifest, self._decode_scaled, tiny)
        return self._previewer

    def _decode_scaled(self, latents: np.ndarray, decoder: str = "full") -> np.ndarray:
        """A decoder on the loop's latents (previews, and fitting a preview map)."""
        c = self.manifest.pipeline
        latents = latents / np.float32(c.vae_scaling_factor)
        if c.vae_shift_factor is not None:
            latents = latents + np.float32(c.vae_shift_factor)
        return self.decoders[decoder](latents.astype(np.float32), Transfers())

    @property
    def device_loop(self) -> DeviceLoop | None:
        """The executor where it is the device loop (IO binding), else None."""
        return None if isinstance(self.executor, HostLoop) else self.executor

    def _graph_cache(self, unet: Session, preference: ProviderPreference, threads: int,
                     sizes: Sequence[tuple[int, int, int]], max_graphs: int) -> GraphCache:
        """Static-shape UNet sessions per bucket; on the CUDA provider each captures a CUDA graph.
        On the CPU provider (tests) they are the same sessions without the capture."""
        from .graph_cache import GraphCache

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

        text_dims = {d: r.min for d, r in component.dims.items() if d not in ("batch", "height", "width")}
        return GraphCache(sizes, max_graphs, make_session, component.inputs, component.outputs,
                          c.vae_scale_factor, unet.device, text_dims)

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
        refiner: Path | str | Pipeline | None = None,
        graph_cache: bool = True,
    ) -> Pipeline:
        """Load a bundle directory; `providers` is an ordered preference ("cuda,cpu"), None to choose.
        `io_binding`: keep the denoising loop on the device (device_loop.py); None: where the UNet
        runs on a GPU. `cuda_graphs`: (images, height, width) buckets whose UNet runs as a captured
        CUDA graph, at most `max_cuda_graphs` kept at once (device_loop.GraphCache).
        `component_settings`: per component ("text_encoder", "unet", "vae_decoder") session settings
        over the preference's — CPU arena on or off, the CUDA arena's extend strategy and memory
        limit (providers.ComponentSettings, or a mapping of its fields). `path` is a bundle directory
        or a model name (`builtin`, a cached preset or checkpoint: ortdiffusion.models.find_bundle).
        `refiner`: an SDXL refiner (a bundle, model name or loaded Pipeline) that every call of this
        one hands its latents to: diffusers' ensemble of experts (see `__call__`).
        `graph_cache`: keep the graphs ONNX Runtime optimizes in the cache and load them from there
        next time (CPU provider; runtime/optimized_graphs.py): the same outputs, a faster load."""
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
        names = [n for n in manifest.components if n != VAE_DECODER_FP32]
        for name, value in (component_settings or {}).items():
            if name not in names:
                raise InvalidRequestError("component_settings", f"unknown component {name!r}; allowed: "
                                          f"{', '.join(names)}")
            settings[name] = ComponentSettings.parse(value, f"component_settings.{name}")
        pipe = cls(path, manifest, preference, intra_op_threads, io_binding, cuda_graphs, max_cuda_graphs, settings,
                   graph_cache)
        logger.info("loaded %s on %s", path, pipe.providers)
        if refiner is not None:
            pipe.refiner = refiner if isinstance(refiner, Pipeline) else cls.load(
                refiner, providers, allow_fallback, intra_op_threads, io_binding, graph_cache=graph_cache)
            a, b = manifest.pipeline, pipe.refiner.manifest.pipeline
            if (a.latent_channels, a.vae_scale_factor) != (b.latent_channels, b.vae_scale_factor):
                raise BundleError(str(pipe.refiner.bundle_dir), f"a refiner must share the base's latent space: it has "
                                  f"{b.latent_channels} channels at 1/{b.vae_scale_factor}, the base "
                                  f"{a.latent_channels} at 1/{a.vae_scale_factor}")
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
        conditioning: Mapping[str, np.ndarray] | None = None,
        image: ImageSource | None = None,
        mask_image: ImageSource | None = None,
        strength: float | None = None,
        keep_unmasked: bool = False,
        guidance_rescale: float | None = None,
        decoder: str | None = None,
        long_prompts: bool = False,
        prompt_2: str | Sequence[str] | None = None,
        negative_prompt_2: str | Sequence[str] | None = None,
        denoising_end: float | None = None,
        denoising_start: float | None = None,
        output_type: str = "pil",
        lora: Mapping[str, float] | None = None,
        control_image: ImageSource | Sequence[ImageSource] | None = None,
        controlnet_conditioning_scale: float | Sequence[float] | None = None,
        control_guidance_start: float | Sequence[float] = 0.0,
        control_guidance_end: float | Sequence[float] = 1.0,
        guess_mode: bool = False,
        canny: bool = False,
        **added_conditions: object,
    ) -> PipelineResult:
        """diffusers' argument names. `conditioning`: the UNet inputs a bundle's family takes from
        the caller (manifest `unet_feeds` "request", e.g. class labels), one row per image.
        `image` (a path, bytes, PIL image or uint8 array): image-to-image, as diffusers'
        `StableDiffusionImg2ImgPipeline`, with `strength` (default 0.8) of the schedule run on it;
        with `mask_image` (white repaints): inpainting, as `StableDiffusionInpaintPipeline`
        (default strength 1); `keep_unmasked` pastes the input's pixels back outside the mask
        (OpenAI's edits). Without width and height the image's own size is used.
        `guidance_rescale` (0–1): diffusers' rescale of the guided prediction (zero-terminal-SNR models).
        `decoder`: "full" (default, the VAE's) or "tiny" where the bundle has a tiny decoder (TAESD:
        a fraction of the VAE decoder's work, slightly softer detail). `long_prompts`: prompts past the
        tokenizer's 77 tokens are encoded in windows and concatenated, as the well-known web UIs do,
        instead of truncated (bundles exported with a text length range: `request.long_prompt_capable`).

        SDXL, by diffusers' names: `prompt_2` / `negative_prompt_2` (the second text encoder's;
        default: the first's), `added_conditions` (original_size, crops_coords_top_left, target_size,
        their negative_ forms, aesthetic_score, negative_aesthetic_score: `request.AddedConditions`),
        `image` may be latents (the base's, for a refiner), `denoising_end` / `denoising_start`
        (the ensemble of experts' hand-off) and output_type="latent" (`PipelineResult.latents`).
        With a refiner loaded (`load(..., refiner=)`) one call runs both (`generate`).

        `lora`: {name: scale} of LoRAs loaded with `load_lora`, blended (a bundle exported with
        `--lora-inputs`); each call may name another set, nothing is rebuilt.

        ControlNet, by diffusers' names (`StableDiffusionControlNetPipeline`; bundles exported with
        `--controlnet`): `control_image`, one per ControlNet (a list for several), and per ControlNet
        (one number, or a list) `controlnet_conditioning_scale`, `control_guidance_start` / `_end`;
        `guess_mode`; `canny` turns the control images into Canny edges first (runtime/canny.py). The
        scale's default is diffusers': 1, or 0.8 with an input `image` (its ControlNet img2img pipeline's)."""
        control = make_control(self.manifest, control_image, controlnet_conditioning_scale, control_guidance_start,
                               control_guidance_end, guess_mode, canny, image_input=image is not None)
        schedule = {"denoising_start": denoising_start, "denoising_end": denoising_end, "output_type": output_type}
        request = make_request(
            self.manifest, prompt, negative_prompt, num_images_per_prompt, num_inference_steps,
            guidance_scale, scheduler, seed, latents, width, height, conditioning, image, mask_image, strength,
            keep_unmasked, guidance_rescale, decoder, long_prompts, prompt_2, negative_prompt_2, added_conditions,
            schedule, control,
        )
        if lora:
            request = replace(request, lora=self.loras.selection(lora))
        return self.generate(request, callback)

    def load_lora(self, path: Path | str, name: str | None = None) -> str:
        """Read a LoRA file (diffusers/PEFT or kohya safetensors) and know it by `name` (default: the
        file's stem) for calls' `lora={name: scale}`; the bundle needs LoRA inputs (`--lora-inputs`)."""
        name = name or Path(path).stem
        self.loras.register(name, path)
        return name

    @property
    def tasks(self) -> tuple[Task, ...]:
        """What this bundle can do: text-to-image, and image inputs where it has the image encoder."""
        return self.manifest.tasks()

    def generate(self, request: GenerationRequest, callback: StepCallback | None = None) -> PipelineResult:
        """Run `request`; with a refiner loaded, diffusers' ensemble of experts in one call: this
        base to `denoising_end` (its latents), then the refiner from there (`denoising_start`) on
        them, as diffusers' `base(..., denoising_end=f, output_type="latent")` and
        `refiner(..., image=latents, denoising_start=f)`. Without `denoising_end` the refiner refines
        the base's finished latents at its default strength (0.3; at least one step), diffusers' other
        documented use."""
        if self.refiner is not None and request.output_type != "latent":
            return self._ensemble(request, callback)
        return self._generate(request, callback)

    def _ensemble(self, request: GenerationRequest, callback: StepCallback | None) -> PipelineResult:
        first = self._generate(replace(request, output_type="latent", keep_unmasked=False), callback)
        refiner = self.refiner
        refine = make_request(
            refiner.manifest, list(request.prompts),
            list(request.negative_prompts) if request.negative_prompt_given else None,
            request.num_images_per_prompt, request.steps, request.guidance_scale, request.scheduler.value,
            list(request.seeds), image=first.latents, strength=None if request.denoising_end is not None else max(
                refiner.manifest.pipeline.default_strength or DEFAULT_STRENGTH_IMAGE, 1 / request.steps),  # ≥ 1 step
            **({"prompt_2": request.prompts_2, "negative_prompt_2": request.negative_prompts_2}
               if "prompt_2" in refiner.manifest.prompt_sources().values() else {}),  # the refiner has one encoder
            added={k: v for k, v in vars(request.added).items() if v is not None},
            guidance_rescale=request.guidance_rescale, decoder=request.decoder,
            schedule={"denoising_start": request.denoising_end})
        result = refiner._generate(refine, callback)
        for stage, seconds in first.timings.stages.items():  # both runs' stages, the base's steps first
            result.timings.stages[stage] += seconds
        result.timings.unet_steps[:0] = first.timings.unet_steps
        result.timings.total += first.timings.total
        result.providers = {**first.providers, **{f"refiner.{k}": v for k, v in result.providers.items()}}
        for meta, base_meta in zip(result.metadata, first.metadata):  # what the caller asked, and both models
            meta.clear()
            meta.update(base_meta, refiner_hash=refiner.model_hash[:16])
            if request.denoising_end is not None:
                meta["denoising_end"] = f"{request.denoising_end:g}"
        return result

    def _generate(self, request: GenerationRequest, callback: StepCallback | None = None) -> PipelineResult:
        trace = Trace()
        # 1. tokenize for each text encoder its prompts (SDXL: `prompt_2` for the second), the
        #    negative prompts first, as diffusers stacks [uncond; cond]
        pairs = request.image_prompts()
        text_inputs, chunks, texts_of = {}, 1, {}
        for component, source in self.manifest.prompt_sources().items():
            prompts, negatives = request.texts(source)
            texts_of[component] = negatives + prompts if request.do_guidance else prompts
        if request.long_prompts:  # every text encoder gives the UNet as many windows (SDXL: prompt_2 may be longer)
            windows = {c: self.tokenizers[c].chunked(t, MAX_PROMPT_CHUNKS) for c, t in texts_of.items()}
            chunks = max(k for _, k in windows.values())
        for component, texts in texts_of.items():
            if request.long_prompts:
                ids, k = windows[component]
                if k < chunks:  # fewer windows than another encoder's: padded with empty ones
                    ids, _ = self.tokenizers[component].chunked(texts, MAX_PROMPT_CHUNKS, min_chunks=chunks)
                batch = self.manifest.components[component].dims["batch"].max
                if len(ids) > batch:
                    raise InvalidRequestError("num_images_per_prompt", f"{len(texts)} prompts × {chunks} windows of a "
                                              f"long prompt pass the text encoder's batch of {batch}; ask for fewer images")
            else:
                ids = self.tokenizers[component](texts)
            text_inputs[component] = {self.manifest.components[component].inputs[0].name: ids}
        trace.lap(Stage.TOKENIZE)

        # 2. an input image (and, when inpainting, its masked copy) → the image encoder's latents
        encoded = self._encode_images(request, trace) if request.image is not None else None

        # 3. the plan: timesteps, step coefficients, seeded noise, starting latents, conditioning
        plan = build_plan(self.manifest, request, text_inputs, encoded, chunks)
        if self.loras.enabled:  # the LoRA set's side-branch weights (rank 0 without one)
            plan = replace(plan, adapter_feeds=self.loras.feeds(request.lora))
        trace.lap(Stage.SCHEDULER)

        # 4–6. text encoder → denoising loop → image decoder, on the host or on the device (ControlNets:
        #      on the host: the device loop binds the UNet alone)
        pixels = self._executor_for(plan)(plan, trace, callback)
        if not plan.decode:  # output_type="latent": the latents, for a refiner
            return PipelineResult([], list(request.seeds), trace.finish(), dict(self.providers),
                                  [self._metadata(request, p, n, s) for (p, n), s in zip(pairs, request.seeds)],
                                  trace.transfers, latents=pixels)

        # 7. pixels → 8-bit images (diffusers' VaeImageProcessor.postprocess, to the rounding); the
        #    device loop has done it on the device already (runtime/graphs/to_uint8.onnx, same bytes)
        if pixels.dtype == np.uint8:
            array = pixels
        else:
            array = (np.clip(pixels / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)
        if request.keep_unmasked:  # the input's own pixels outside the mask
            original = ((request.image[0].transpose(1, 2, 0) + 1) / 2 * 255).round().astype(np.uint8)
            array = np.where(request.mask[0, 0][..., None] > 0.5, array, original)
        images = [Image.fromarray(a) for a in array]
        metadata = [self._metadata(request, p, n, s) for (p, n), s in zip(pairs, request.seeds)]
        trace.lap(Stage.POSTPROCESS)
        return PipelineResult(images, list(request.seeds), trace.finish(), dict(self.providers), metadata,
                              trace.transfers)

    def _executor_for(self, plan) -> Executor:
        """The pipeline's executor; the host loop for a plan with ControlNets where that is the device
        loop (it binds the UNet's inputs alone; docs/families.md says so)."""
        if plan.control is None or isinstance(self.executor, HostLoop):
            return self.executor
        return HostLoop(self.sessions, self.decoders)

    def _encode_images(self, request: GenerationRequest, trace: Trace) -> dict[str, ImageLatents]:
        """The image encoder's latent distribution of the input image and, with a mask, of the image
        with the region to repaint blacked out (diffusers' `image * (mask < 0.5)`), in one batch."""
        images = {"image": request.image}
        if request.mask is not None:
            images["masked_image"] = request.image * (request.mask < 0.5)
        session = self.sessions[VAE_ENCODER]
        batch = np.concatenate(list(images.values())).astype(np.float32)
        trace.transfers.sent(batch)
        out = session.run({self.manifest.components[VAE_ENCODER].inputs[0].name: batch}, release_memory=True)
        mean, std = (out[name] for name in session.output_names[:2])
        trace.lap(Stage.IMAGE_ENCODER)
        return {name: ImageLatents(mean[k:k + 1], std[k:k + 1]) for k, name in enumerate(images)}

    def _metadata(self, request: GenerationRequest, prompt: str, negative: str, seed: int) -> dict[str, str]:
        meta = {
            "prompt": prompt, "negative_prompt": negative, "seed": str(seed), "steps": str(request.steps),
            "scheduler": request.scheduler.value, "guidance_scale": f"{request.guidance_scale:g}",
            "size": f"{request.width}x{request.height}", "model_hash": self.model_hash[:16],
            "software": f"ortdiffusion {__version__}",
        }
        if request.lora:
            meta["lora"] = ",".join(f"{name}:{scale:g}" for name, scale in request.lora)
        if request.long_prompts:
            meta["long_prompts"] = "true"
        if request.decoder != "full":
            meta["decoder"] = request.decoder
        if request.guidance_rescale and request.do_guidance:
            meta["guidance_rescale"] = f"{request.guidance_rescale:g}"
        if request.control is not None:
            c = request.control
            meta["controlnet_conditioning_scale"] = ",".join(f"{v:g}" for v in c.scales)
            if c.starts != (0.0,) * len(c.starts) or c.ends != (1.0,) * len(c.ends):
                meta["control_guidance"] = ",".join(f"{s:g}-{e:g}" for s, e in zip(c.starts, c.ends))
            if c.guess_mode:
                meta["guess_mode"] = "true"
            if c.canny:
                meta["control_preprocessor"] = "canny"
        if request.has_image:
            meta["task"] = (Task.INPAINTING if request.mask is not None else Task.IMAGE_TO_IMAGE).value
            meta["strength"] = f"{request.strength:g}"
        return meta

