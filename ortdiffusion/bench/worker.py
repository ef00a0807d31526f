"""One engine in its own process, timed run by run on command (JSON lines on stdin/stdout).

    python -m ortdiffusion.bench.worker ENGINE MODEL [--provider P] [--scheduler NAME]

The runner keeps one worker per engine alive and asks them for runs in alternating order, so
machine noise falls on all engines alike, while each process's peak memory is its engine's own.
Commands: {"batch", "width", "height", "steps", "guidance"}; each answer: the stage timings of one
generation, the process's peak resident memory, and (first answer only) the cold start.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from .records import Sample

PROMPT = "a red circle on the left"


def peak_host_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_device_mb(engine) -> float | None:
    """Peak GPU memory of this process, None on the CPU. Where torch runs the model: its allocator's
    record. Where ONNX Runtime does (ours, Optimum's): what the process holds on the GPU after the run
    (nvidia-smi), which is the peak, since ONNX Runtime's CUDA arena keeps its high-water mark.
    torch is never imported just to ask: that alone adds ~190 MB to the host peak of an engine that
    does not use it (it did, before: ours' peak host memory read ~190 MB high)."""
    torch = sys.modules.get("torch")
    if getattr(engine, "device", None) == "cuda" and torch is not None:
        return torch.cuda.max_memory_allocated() / 2**20
    from ..runtime.providers import runs_on_gpu

    if not runs_on_gpu(engine.providers):
        return None
    import os

    from ..runtime.providers import nvidia_smi

    out = nvidia_smi("--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits")
    if out is None:
        return None
    used = [float(mb) for pid, mb in (line.split(",") for line in out.splitlines() if "," in line)
            if int(pid) == os.getpid()]
    return sum(used) if used else None


#: Engine names for our export variants: "ortdiffusion" (the generic fp32 bundle), "-cpu" (ONNX
#: Runtime's CPU fusions), "-int8" (CPU target, int8 UNet), "-fp16" (generic fp16), "-cuda" (the
#: CUDA target in fp16: GPU fusions), "-cuda-graphs" (that bundle with its UNet as a CUDA graph).
ORT_VARIANTS = {"ortdiffusion": ("generic", "fp32"), "ortdiffusion-cpu": ("cpu", "fp32"),
                "ortdiffusion-int8": ("cpu", "int8"), "ortdiffusion-fp16": ("generic", "fp16"),
                "ortdiffusion-cuda": ("cuda", "fp16"), "ortdiffusion-cuda-graphs": ("cuda", "fp16")}


class OrtDiffusionEngine:
    name = "ortdiffusion"

    def __init__(self, model: str, provider: str | None, variant: str = "ortdiffusion", scheduler: str | None = None):
        from ..models import resolve_bundle
        from ..runtime.pipeline import Pipeline
        from ..runtime.schedulers import SchedulerName

        target, precision = ORT_VARIANTS[variant]
        # The runner exported it beforehand (`prepare`): an export here would put torch and the
        # export's own peak into this engine's memory record and its cold start.
        self.bundle = resolve_bundle(model, target=target, precision=precision, allow_export=False)
        self.provider = provider
        self.cuda_graphs = variant.endswith("-graphs")
        self.pipe = Pipeline.load(self.bundle, providers=provider)
        self.providers = self.pipe.providers
        self.precision = self.pipe.manifest.components["unet"].precision.value
        self.scheduler = SchedulerName.parse(scheduler or self.pipe.manifest.pipeline.default_scheduler).value

    def _for_setting(self, batch: int, width: int, height: int):
        """The pipeline for a setting. With CUDA graphs, one whose graph bucket is this setting's
        (images, height, width): loaded when the setting changes, outside the timed run; the
        runner's warm-up run of the setting is the one that captures the graph."""
        from ..runtime.pipeline import Pipeline

        if self.cuda_graphs:
            bucket = (batch, height, width)
            loop = self.pipe.device_loop if self.pipe is not None else None
            if loop is None or loop.graphs is None or loop.graphs.sizes != (bucket,):
                self.pipe = None  # the old sessions go before the new ones come
                self.pipe = Pipeline.load(self.bundle, providers=self.provider, io_binding=True, cuda_graphs=[bucket])
        return self.pipe

    def run(self, batch: int, width: int, height: int, steps: int, guidance: float) -> Sample:
        pipe = self._for_setting(batch, width, height)
        start = time.perf_counter()
        result = pipe([PROMPT] * batch, seed=list(range(batch)), num_inference_steps=steps,
                      guidance_scale=guidance, width=width, height=height, scheduler=self.scheduler)
        png_start = time.perf_counter()
        result.pngs()  # as the service and `save` encode them: a batch in parallel
        end = time.perf_counter()
        t = result.timings
        stages = {"tokenize": [t.tokenize], "text_encoder": [t.text_encoder], "unet_step": list(t.unet_steps),
                  "scheduler": [t.scheduler], "decoder": [t.decoder], "postprocess": [t.postprocess],
                  "png_encode": [end - png_start]}
        return Sample(end_to_end=end - start, stages=stages, transfers=result.transfers.as_dict())


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
    pipe.tokenizer = _Timed(pipe.tokenizer, "tokenize", sink, host)
    pipe.text_encoder.forward = _Timed(pipe.text_encoder.forward, "text_encoder", sink, clock)
    pipe.unet.forward = _Timed(pipe.unet.forward, "unet_step", sink, clock)
    pipe.vae.decode = _Timed(pipe.vae.decode, "decoder", sink, clock)
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


def unet_step_gflop(unet, batch: int, width: int, height: int, guidance: float, text: int, width_text: int,
                    device: str, dtype) -> float:
    """FLOPs of one UNet call at this setting (guidance doubles the batch), counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    rows = batch * (2 if guidance > 1 else 1)
    latent = (rows, unet.config.in_channels, height // 8, width // 8)
    args = (torch.zeros(latent, device=device, dtype=dtype), torch.tensor(500, device=device),
            torch.zeros((rows, text, width_text), device=device, dtype=dtype))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        unet(*args)
    return counter.get_total_flops() / 1e9


class TorchEngine:
    """diffusers' own StableDiffusionPipeline, eager (fp32 on the CPU; fp16 with SDPA on a GPU)."""

    name = "torch"

    def __init__(self, model: str, provider: str | None, compile_unet: bool = False, scheduler: str | None = None):
        import torch
        from diffusers import StableDiffusionPipeline

        from ..models import resolve_checkpoint

        self.device = "cuda" if torch.cuda.is_available() and provider != "cpu" else "cpu"
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        with warnings.catch_warnings():  # current diffusers renamed `torch_dtype` to `dtype`; older ones take only the former
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = StableDiffusionPipeline.from_pretrained(str(resolve_checkpoint(model)), torch_dtype=dtype,
                                                           safety_checker=None, requires_safety_checker=False)
        pipe = pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        if compile_unet:
            pipe.unet = torch.compile(pipe.unet)
        self.scheduler = use_scheduler(pipe, scheduler)
        self.sink = instrument(pipe, CudaEventClock(torch) if self.device == "cuda" else None)
        self.pipe, self.torch = pipe, torch
        self.providers = {"text_encoder": self.device, "unet": self.device, "vae_decoder": self.device}
        self.precision = "fp16" if dtype == torch.float16 else "fp32"
        self.flops: dict[tuple, float] = {}

    def run(self, batch: int, width: int, height: int, steps: int, guidance: float) -> Sample:
        key = (batch, width, height, guidance > 1)
        if key not in self.flops:  # counted once per setting, outside the timed run
            unet = self.pipe.unet  # its timing wrapper's record is cleared when the timed run starts
            self.flops[key] = unet_step_gflop(unet, batch, width, height, guidance, self.pipe.tokenizer.model_max_length,
                                              unet.config.cross_attention_dim, self.device, unet.dtype)
        generators = [self.torch.Generator(self.device).manual_seed(i) for i in range(batch)]
        sync = self.torch.cuda.synchronize if self.device == "cuda" else None
        answer = run_diffusers_style(self.pipe, self.sink, sync, prompt=[PROMPT] * batch, generator=generators,
                                     num_inference_steps=steps, guidance_scale=guidance, width=width, height=height)
        return replace(answer, unet_step_gflop=self.flops[key])


class OptimumEngine:
    """Hugging Face Optimum's ONNX Runtime pipeline (where `optimum.onnxruntime` is installed)."""

    name = "optimum"

    def __init__(self, model: str, provider: str | None, scheduler: str | None = None):
        from optimum.onnxruntime import ORTStableDiffusionPipeline

        from ..models import cache_dir, resolve_checkpoint

        checkpoint = resolve_checkpoint(model)
        exported = cache_dir() / "optimum" / checkpoint.name
        if not (exported / "model_index.json").is_file():
            pipe = ORTStableDiffusionPipeline.from_pretrained(str(checkpoint), export=True)
            pipe.save_pretrained(str(exported))
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


ENGINES = {**{name: OrtDiffusionEngine for name in ORT_VARIANTS}, "torch": TorchEngine, "optimum": OptimumEngine}


def prepare(engine: str, model: str) -> dict[str, Any]:
    """Export the bundle an engine of ours needs (a no-op when it is cached), in a process of its
    own before the engine's worker starts; other engines need nothing."""
    if engine not in ORT_VARIANTS:
        return {"prepared": None}
    from ..models import resolve_bundle

    target, precision = ORT_VARIANTS[engine]
    start = time.perf_counter()
    try:
        bundle = resolve_bundle(model, target=target, precision=precision)
    except Exception as e:  # noqa: BLE001 - e.g. a CUDA export without CUDA: the runner records why it skipped
        return {"error": f"{engine} could not export: {type(e).__name__}: {str(e).splitlines()[0][:400] if str(e) else ''}"}
    return {"prepared": str(bundle), "s": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("engine", choices=list(ENGINES))
    p.add_argument("model")
    p.add_argument("--provider", default=None)
    p.add_argument("--scheduler", default=None, help="ours' name (ddim, euler, ...); default: each engine's own")
    p.add_argument("--prepare", action="store_true", help="export what the engine needs, answer one line, exit")
    args = p.parse_args()
    out = sys.stdout
    sys.stdout = sys.stderr  # libraries' prints must not corrupt the protocol
    if args.prepare:
        out.write(json.dumps(prepare(args.engine, args.model)) + "\n")
        out.flush()
        return
    start = time.perf_counter()
    try:
        extra = {"variant": args.engine} if args.engine in ORT_VARIANTS else {}
        engine = ENGINES[args.engine](args.model, args.provider, scheduler=args.scheduler, **extra)
    except ImportError as e:
        fix = {"torch": "pip install 'ortdiffusion[export]'",
               "optimum": "an environment with optimum[onnxruntime], given as --optimum-python (docs/benchmarks.md)"}
        hint = f" ({fix[args.engine]})" if args.engine in fix and "pip install" not in str(e) else ""
        out.write(json.dumps({"error": f"{args.engine} unavailable: {e}{hint}"}) + "\n")
        out.flush()
        return
    except Exception as e:  # noqa: BLE001 - e.g. no CUDA provider here: the runner records why it skipped
        message = str(e).splitlines()[0][:400] if str(e) else ""
        out.write(json.dumps({"error": f"{args.engine} could not load: {type(e).__name__}: {message}"}) + "\n")
        out.flush()
        return
    load_s = time.perf_counter() - start
    out.write(json.dumps({"ready": True, "load_s": load_s, "providers": engine.providers,
                          "precision": engine.precision, "scheduler": engine.scheduler}) + "\n")
    out.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            sample = engine.run(cmd["batch"], cmd["width"], cmd["height"], cmd["steps"], cmd.get("guidance", 7.5))
        except Exception as e:  # noqa: BLE001 - reported to the runner, which records the engine as failed
            out.write(json.dumps({"error": f"{args.engine} failed: {type(e).__name__}: {e}"}) + "\n")
            out.flush()
            continue
        sample = replace(sample, peak_host_mb=peak_host_mb(), peak_device_mb=peak_device_mb(engine))
        out.write(json.dumps(sample.to_json()) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
