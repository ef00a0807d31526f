"""The engines a bench runs that are diffusers-style pipelines (diffusers' own in torch, Optimum's
ONNX Runtime subclass of it), timed stage by stage by wrapping their networks.

Kept apart from `worker.py` so that our engine's process never imports them (nor torch).
"""

from __future__ import annotations

import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from .records import Sample
from .tasks import PROMPT, Task, task_inputs


class HostClock:
    """Stage times on the host's clock: right where a stage's work is done when its call returns
    (the CPU; ONNX Runtime sessions, which synchronize at the end of a run)."""

    def mark(self) -> float:
        return time.perf_counter()

    def seconds(self, start: float, end: float) -> float:
        return end - start


class CudaEventClock:
    """Stage times of torch's asynchronous CUDA work: an event recorded on the current stream at
    each end of a stage, read after the run's final synchronize. The host's clock would measure
    kernel launches, and charge a stage with the queued work of the one before it whenever the
    launch queue is full (at batch 4 on the H100, torch's "scheduler" stage, a few small kernels a
    step, took 108 ms). Events do not stall the stream, so the run itself is timed as before."""

    def __init__(self, torch):
        self.torch = torch

    def mark(self):
        event = self.torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3  # milliseconds between the two events on the GPU


class _Timed:
    """Wrap a callable so the two ends of each call are recorded under `stage` (`Stages.seconds`
    turns them into durations once the run is over)."""

    def __init__(self, fn: Callable, stage: str, sink: Stages, clock: HostClock | CudaEventClock):
        self.fn, self.stage, self.sink, self.clock = fn, stage, sink, clock

    def __call__(self, *args, **kwargs):
        start = self.clock.mark()
        out = self.fn(*args, **kwargs)
        self.sink.record(self.stage, self.clock, start, self.clock.mark())
        return out

    def __getattr__(self, name):  # a tokenizer proxied this way keeps its attributes
        return getattr(self.fn, name)


class Stages:
    """The stage records of one run, kept as clock marks until the run's work is done."""

    def __init__(self):
        self.marks: dict[str, list[tuple]] = defaultdict(list)

    def record(self, stage: str, clock, start, end) -> None:
        self.marks[stage].append((clock, start, end))

    def clear(self) -> None:
        self.marks.clear()

    def seconds(self) -> dict[str, list[float]]:
        """Each stage's durations; for CUDA events, only after the device has synchronized."""
        return {stage: [clock.seconds(start, end) for clock, start, end in marks] for stage, marks in self.marks.items()}


def use_scheduler(pipe, scheduler: str | None) -> str:
    """Give a diffusers-style pipeline the diffusers scheduler our `scheduler` mirrors (built from
    the checkpoint's own config), so that every engine in a bench does the same work: a PNDM
    checkpoint left as it is runs PNDM, which makes one UNet call more than its step count (21 for
    20), against our 20. Returns the name the record carries: ours, or the class kept."""
    if scheduler is None:
        return type(pipe.scheduler).__name__
    from ..export.reference import reference_scheduler

    pipe.scheduler = reference_scheduler(scheduler, pipe.scheduler.config)
    return scheduler


def instrument(pipe, clock: HostClock | CudaEventClock | None = None) -> Stages:
    """Time the stages of a diffusers-style pipeline (diffusers' own, or Optimum's subclass of it):
    the networks and the scheduler by `clock`, the tokenizer (host work) by the host's."""
    sink, host = Stages(), HostClock()
    clock = clock or host
    if pipe.tokenizer is not None:
        pipe.tokenizer = _Timed(pipe.tokenizer, "tokenize", sink, host)
    for name in ("text_encoder", "text_encoder_2"):  # SDXL has two (its refiner only the second)
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).forward = _Timed(getattr(pipe, name).forward, "text_encoder", sink, clock)
    if getattr(pipe, "tokenizer_2", None) is not None:
        pipe.tokenizer_2 = _Timed(pipe.tokenizer_2, "tokenize", sink, host)
    pipe.unet.forward = _Timed(pipe.unet.forward, "unet_step", sink, clock)
    pipe.vae.decode = _Timed(pipe.vae.decode, "decoder", sink, clock)
    if hasattr(pipe.vae, "encode"):  # the image tasks' encoder (Optimum's ONNX VAE has none to time here)
        pipe.vae.encode = _Timed(pipe.vae.encode, "image_encoder", sink, clock)
    pipe.scheduler.step = _Timed(pipe.scheduler.step, "scheduler", sink, clock)
    return sink


def run_diffusers_style(pipe, sink: Stages, sync: Callable[[], None] | None, **call: Any) -> Sample:
    """One timed generation of an instrumented diffusers-style pipeline, PNG encoding included."""
    from ..runtime.png import encode_png

    sink.clear()
    start = time.perf_counter()
    images = pipe(**call).images
    if sync is not None:
        sync()
    png_start = time.perf_counter()
    for image in images:  # one after another, as a diffusers user's `image.save(...)` loop does
        encode_png(image, {})
    end = time.perf_counter()
    stages = sink.seconds()
    stages["png_encode"] = [end - png_start]
    return Sample(end_to_end=end - start, stages=stages)


def sdxl_checkpoint(checkpoint) -> bool:
    import json
    from pathlib import Path

    index = json.loads((Path(checkpoint) / "model_index.json").read_text(encoding="utf-8"))
    return str(index.get("_class_name", "")).startswith("StableDiffusionXL")


def unet_step_gflop(unet, batch: int, width: int, height: int, guidance: float, text: int, width_text: int,
                    device: str, dtype, pooled: int | None = None) -> float:
    """FLOPs of one UNet call at this setting (guidance doubles the batch), counted by torch."""
    import torch

    rows = batch * (2 if guidance > 1 else 1)
    latent = (rows, unet.config.in_channels, height // 8, width // 8)
    args = (torch.zeros(latent, device=device, dtype=dtype), torch.tensor(500, device=device),
            torch.zeros((rows, text, width_text), device=device, dtype=dtype))
    kwargs = {}
    c = unet.config
    if c.addition_embed_type == "text_time":  # SDXL's added conditions: `pooled` embeddings and time ids
        ids = (int(c.projection_class_embeddings_input_dim) - pooled) // int(c.addition_time_embed_dim)
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.zeros((rows, pooled), device=device, dtype=dtype),
                                       "time_ids": torch.zeros((rows, ids), device=device, dtype=dtype)}
    counter = flop_counter()
    with torch.no_grad(), counter:
        unet(*args, **kwargs)
    return counter.get_total_flops() / 1e9


def flop_counter():
    """torch's FlopCounterMode, also counting attention on the CPU: torch's SDPA runs there as
    `_scaled_dot_product_flash_attention_for_cpu`, which the counter has no formula for, so the
    attention's two products went uncounted (an SD 2.1 UNet at 512×512 read 678 GFLOP a step,
    804 with them: the UNet's GFLOP/s, and its fraction of the matmul rate, read 16 % low)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    cpu_attention = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_attention is None:
        return FlopCounterMode(display=False)

    def attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    return FlopCounterMode(display=False, custom_mapping={cpu_attention: attention})


class TorchEngine:
    """diffusers' own pipeline for the task and the checkpoint's family (StableDiffusionPipeline,
    …Img2ImgPipeline, …InpaintPipeline, LatentConsistencyModelPipeline, …), eager (fp32 on the CPU; fp16 with SDPA on a GPU)."""

    name = "torch"

    def __init__(self, model: str, provider: str | None, compile_unet: bool = False, scheduler: str | None = None,
                 task: str = "text-to-image", tiny_decoder: bool = False):
        """`tiny_decoder`: decode with the checkpoint's AutoencoderTiny (`<checkpoint>/taesd`, as the
        presets carry one), as a diffusers user does with `pipe.vae = AutoencoderTiny...`."""
        import diffusers
        import torch

        self.task = Task(task)
        # diffusers' auto pipelines pick the checkpoint's own family for the task (Stable Diffusion's,
        # LCM's, SDXL's ...), as a diffusers user's `AutoPipelineFor...` call does
        pipeline_class = getattr(diffusers, {Task.TEXT_TO_IMAGE: "AutoPipelineForText2Image",
                                             Task.IMAGE_TO_IMAGE: "AutoPipelineForImage2Image",
                                             Task.INPAINTING: "AutoPipelineForInpainting"}[self.task])

        from ..models import resolve_checkpoint

        checkpoint = resolve_checkpoint(model)
        # SDXL's pipelines have no safety checker to switch off
        extra = {} if sdxl_checkpoint(checkpoint) else {"safety_checker": None, "requires_safety_checker": False}

        self.device = "cuda" if torch.cuda.is_available() and provider != "cpu" else "cpu"
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        with warnings.catch_warnings():  # current diffusers renamed `torch_dtype` to `dtype`; older ones take only the former
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = pipeline_class.from_pretrained(str(checkpoint), torch_dtype=dtype, **extra)
        if tiny_decoder:
            from ..export.presets import TINY_DECODER_DIR

            pipe.vae = diffusers.AutoencoderTiny.from_pretrained(str(checkpoint / TINY_DECODER_DIR), torch_dtype=dtype)
            self.name = "torch-tiny"
        pipe = pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        self.compile_mode, self.eager_unet = None, pipe.unet  # FLOPs are counted on the eager module
        if compile_unet:
            # What a GPU user picks over eager (diffusers' own guide to speeding up inference): the
            # UNet and the VAE's decode compiled, "max-autotune" (Triton kernels tuned per shape,
            # CUDA graphs) on a GPU. On a CPU the default mode: max-autotune there tunes GEMM
            # templates for many minutes and CUDA graphs do not apply.
            self.compile_mode = "max-autotune" if self.device == "cuda" else "default"
            pipe.unet = torch.compile(pipe.unet, mode=self.compile_mode, fullgraph=True)
            pipe.vae.decode = torch.compile(pipe.vae.decode, mode=self.compile_mode, fullgraph=True)
            self.name = "torch-compile"
        self.scheduler = use_scheduler(pipe, scheduler)
        self.sink = instrument(pipe, CudaEventClock(torch) if self.device == "cuda" else None)
        self.pipe, self.torch = pipe, torch
        self.providers = {"text_encoder": self.device, "unet": self.device, "vae_decoder": self.device}
        self.precision = "fp16" if dtype == torch.float16 else "fp32"
        self.flops: dict[tuple, float] = {}

    def run(self, batch: int, width: int, height: int, steps: int, guidance: float) -> Sample:
        key = (batch, width, height, guidance > 1)
        if key not in self.flops:  # counted once per setting, outside the timed run
            # its timing wrapper's record is cleared when the timed run starts; a compiled UNet's FLOPs
            # are its eager module's (torch's FLOP counter cannot run inside a compiled graph)
            unet = self.eager_unet
            tokenizer = self.pipe.tokenizer or self.pipe.tokenizer_2
            self.flops[key] = unet_step_gflop(unet, batch, width, height, guidance, tokenizer.model_max_length,
                                              unet.config.cross_attention_dim, self.device, unet.dtype,
                                              getattr(getattr(self.pipe, "text_encoder_2", None), "config", None)
                                              and self.pipe.text_encoder_2.config.projection_dim)
        generators = [self.torch.Generator(self.device).manual_seed(i) for i in range(batch)]
        sync = self.torch.cuda.synchronize if self.device == "cuda" else None
        # img2img takes its size from the image (its __call__ has no width/height)
        size = {} if self.task is Task.IMAGE_TO_IMAGE else {"width": width, "height": height}
        answer = run_diffusers_style(self.pipe, self.sink, sync, prompt=[PROMPT] * batch, generator=generators,
                                     **task_inputs(self.task, width, height), **size,
                                     num_inference_steps=steps, guidance_scale=guidance)
        return replace(answer, unet_step_gflop=self.flops[key])


class OptimumEngine:
    """Hugging Face Optimum's ONNX Runtime pipeline (where `optimum.onnxruntime` is installed)."""

    name = "optimum"

    def __init__(self, model: str, provider: str | None, scheduler: str | None = None, task: str = "text-to-image"):
        if Task(task) is not Task.TEXT_TO_IMAGE:
            raise ValueError(f"the bench runs Optimum for text-to-image only, not {task}")
        import optimum.onnxruntime

        from ..models import cache_dir, resolve_checkpoint

        checkpoint = resolve_checkpoint(model)
        ORTStableDiffusionPipeline = getattr(optimum.onnxruntime, "ORTStableDiffusionXLPipeline"  # noqa: N806
                                             if sdxl_checkpoint(checkpoint) else "ORTStableDiffusionPipeline")
        exported = cache_dir() / "optimum" / checkpoint.name
        if not (exported / "model_index.json").is_file():
            pipe = ORTStableDiffusionPipeline.from_pretrained(str(checkpoint), export=True)
            pipe.save_pretrained(str(exported))
            # freed before the pipeline below loads: held, the exporting pipeline and the loaded
            # one sat side by side (sd-turbo-arch at 512: the worker reached 13.4 GB on its first run)
            del pipe
            import gc

            gc.collect()
        ort_provider = {"cuda": "CUDAExecutionProvider"}.get(provider or "cpu", "CPUExecutionProvider")
        self.pipe = ORTStableDiffusionPipeline.from_pretrained(str(exported), provider=ort_provider)
        self.pipe.set_progress_bar_config(disable=True)
        self.scheduler = use_scheduler(self.pipe, scheduler)
        self.sink = instrument(self.pipe)
        self.providers = {"text_encoder": provider or "cpu", "unet": provider or "cpu", "vae_decoder": provider or "cpu"}
        self.precision = "fp32"

    def run(self, batch: int, width: int, height: int, steps: int, guidance: float) -> Sample:
        import torch

        return run_diffusers_style(self.pipe, self.sink, None, prompt=[PROMPT] * batch,
                                   generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
                                   guidance_scale=guidance, width=width, height=height)
