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
from dataclasses import replace
from typing import Any

from .diffusers_engines import OptimumEngine, TorchEngine
from .records import Sample
from .tasks import PROMPT, TASKS, task_inputs

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
                "ortdiffusion-cuda": ("cuda", "fp16"), "ortdiffusion-cuda-graphs": ("cuda", "fp16"),
                "ortdiffusion-tiny": ("generic", "fp32"), "ortdiffusion-int8-tiny": ("cpu", "int8")}
#: The variants that decode with the bundle's tiny decoder (AutoencoderTiny) instead of the VAE's.
TINY_DECODER_VARIANTS = ("ortdiffusion-tiny", "ortdiffusion-int8-tiny")


class OrtDiffusionEngine:
    name = "ortdiffusion"

    def __init__(self, model: str, provider: str | None, variant: str = "ortdiffusion", scheduler: str | None = None,
                 task: str = "text-to-image"):
        from ..models import resolve_bundle
        from ..runtime.pipeline import Pipeline
        from ..runtime.schedulers import SchedulerName

        target, precision = ORT_VARIANTS[variant]
        # The runner exported it beforehand (`prepare`): an export here would put torch and the
        # export's own peak into this engine's memory record and its cold start.
        self.bundle = resolve_bundle(model, target=target, precision=precision, allow_export=False)
        self.provider = provider
        self.cuda_graphs = variant.endswith("-graphs")
        self.decoder = "tiny" if variant in TINY_DECODER_VARIANTS else None
        self.task = task
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
        inputs = task_inputs(getattr(self, "task", "text-to-image"), width, height)  # made before the clock starts
        start = time.perf_counter()
        result = pipe([PROMPT] * batch, seed=list(range(batch)), num_inference_steps=steps,
                      guidance_scale=guidance, width=width, height=height, scheduler=self.scheduler,
                      decoder=getattr(self, "decoder", None), **inputs)
        png_start = time.perf_counter()
        result.pngs()  # as the service and `save` encode them: a batch in parallel
        end = time.perf_counter()
        t = result.timings
        stages = {"tokenize": [t.tokenize], "text_encoder": [t.text_encoder], "image_encoder": [t.image_encoder],
                  "unet_step": list(t.unet_steps),
                  "scheduler": [t.scheduler], "decoder": [t.decoder], "postprocess": [t.postprocess],
                  "png_encode": [end - png_start]}
        return Sample(end_to_end=end - start, stages=stages, transfers=result.transfers.as_dict())


def _openvino(model: str, provider: str | None, **kwargs):
    from .openvino_engine import OpenVINOEngine  # only OpenVINO's own environment has openvino_genai

    return OpenVINOEngine(model, provider, **kwargs)


#: OpenVINO GenAI's variants (bench/openvino_engine.py): fp32, int8 weights, its default bf16 compute.
OPENVINO_VARIANTS = ("openvino", "openvino-int8", "openvino-bf16")
ENGINES = {**{name: OrtDiffusionEngine for name in ORT_VARIANTS}, "torch": TorchEngine, "torch-tiny": TorchEngine,
           "torch-compile": TorchEngine,
           "optimum": OptimumEngine, **{name: _openvino for name in OPENVINO_VARIANTS}}


def prepare(engine: str, model: str) -> dict[str, Any]:
    """Export the bundle an engine of ours needs (a no-op when it is cached), in a process of its
    own before the engine's worker starts (OpenVINO's: its IR, by optimum-intel); others need nothing."""
    if engine in OPENVINO_VARIANTS:
        from .openvino_engine import prepare as prepare_openvino

        return prepare_openvino(engine, model)
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
    p.add_argument("--task", default="text-to-image", choices=[t.value for t in TASKS])
    args = p.parse_args()
    out = sys.stdout
    sys.stdout = sys.stderr  # libraries' prints must not corrupt the protocol
    if args.prepare:
        out.write(json.dumps(prepare(args.engine, args.model)) + "\n")
        out.flush()
        return
    start = time.perf_counter()
    try:
        variant = args.engine in ORT_VARIANTS or args.engine in OPENVINO_VARIANTS
        extra = {"variant": args.engine, "task": args.task} if variant else {"task": args.task}
        if args.engine == "torch-tiny":
            extra["tiny_decoder"] = True
        if args.engine == "torch-compile":
            extra["compile_unet"] = True
        engine = ENGINES[args.engine](args.model, args.provider, scheduler=args.scheduler, **extra)
    except ImportError as e:
        fix = {"torch": "pip install 'ortdiffusion[export]'",
               "optimum": "an environment with optimum[onnxruntime], given as --optimum-python (docs/benchmarks.md)",
               **{name: "an environment with optimum-intel and openvino-genai, given as --openvino-python "
                        "(docs/benchmarks.md)" for name in OPENVINO_VARIANTS}}
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
