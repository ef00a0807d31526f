"""`ortdiffusion bench`: engines side by side, run in alternating order, one process each."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from .records import Comparison, Record, Report, Sample, Skipped

ENGINES = ("ortdiffusion", "ortdiffusion-cpu", "ortdiffusion-int8", "ortdiffusion-fp16", "ortdiffusion-cuda",
           "ortdiffusion-cuda-graphs", "ortdiffusion-tiny", "ortdiffusion-int8-tiny", "torch", "torch-tiny", "torch-compile",
           "optimum", "openvino", "openvino-int8", "openvino-bf16")


@dataclass(frozen=True)
class Setting:
    batch: int
    width: int
    height: int
    steps: int


@dataclass(frozen=True)
class BenchPlan:
    models: tuple[str, ...]
    engines: tuple[str, ...]
    settings: tuple[Setting, ...]
    runs: int = 5
    warmup: int = 1
    provider: str | None = None
    guidance: float = 7.5
    #: Interpreters for engines that live in an environment of their own (Optimum pins transformers < 4.58).
    pythons: tuple[tuple[str, str], ...] = ()
    #: The scheduler every engine runs (ours' names); None: the one ours runs for the model by default.
    scheduler: str | None = None
    #: What every engine does: text-to-image, image-to-image or inpainting (bench/tasks.py's inputs).
    task: str = "text-to-image"


def prepare_answer(engine: str, model: str, python: str = sys.executable) -> dict[str, Any]:
    """Export the bundle `engine` needs, in a process of its own: {"error": why it cannot} or
    {"prepared": the bundle's path, or None for an engine that needs none}. The worker that then
    loads it measures its engine only, not the export's torch and peak memory."""
    proc = subprocess.run([python, "-m", "ortdiffusion.bench.worker", engine, model, "--prepare"],
                          stdout=subprocess.PIPE, text=True)
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {"error": f"{engine} export exited with {proc.returncode}"}


def prepare(engine: str, model: str, python: str = sys.executable) -> str | None:
    """`prepare_answer`'s error, or None once the engine's bundle is ready."""
    return prepare_answer(engine, model, python).get("error")


class Worker:
    def __init__(self, engine: str, model: str, provider: str | None, python: str = sys.executable,
                 scheduler: str | None = None, task: str = "text-to-image"):
        cmd = [python, "-m", "ortdiffusion.bench.worker", engine, model, "--task", task]
        if provider:
            cmd += ["--provider", provider]
        if scheduler:
            cmd += ["--scheduler", scheduler]
        self.engine = engine
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        hello = self._read()
        self.error = hello.get("error")
        self.load_s = hello.get("load_s", float("nan"))
        self.providers = hello.get("providers", {})
        self.precision = hello.get("precision")
        self.scheduler = hello.get("scheduler")

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            return {"error": f"{self.engine} worker exited with {self.proc.wait()}"}
        return json.loads(line)

    def run(self, s: Setting, guidance: float) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps({"batch": s.batch, "width": s.width, "height": s.height, "steps": s.steps,
                                          "guidance": guidance}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(60)


def machine_load() -> dict[str, float] | None:
    """The 1-minute load average against the cores: above 1 per core, other work shared them."""
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return None
    cores = os.cpu_count() or 1
    return {"load_1min": one, "load_5min": five, "per_core": one / cores}


def environment() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from ..runtime.providers import nvidia_smi

    gpu = nvidia_smi("--query-gpu=name,memory.total", "--format=csv,noheader")
    versions = {}
    for package in ("ortdiffusion", "onnxruntime", "onnxruntime-gpu", "numpy", "torch", "diffusers", "transformers",
                    "optimum", "optimum-onnx", "optimum-intel", "openvino", "openvino-genai", "nncf"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "platform": platform.platform(), "packages": versions, "fp32_matmul_gflops": matmul_gflops()}


def matmul_gflops(n: int = 4096, repeats: int = 3) -> float:
    """This machine's fp32 matrix-product rate (numpy's BLAS, best of `repeats`), the yardstick for
    how close the UNet steps come to the hardware."""
    import time

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up: thread pool, pages
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def add_compute_rates(records: list[Record], matmul: float) -> None:
    """Achieved UNet GFLOP/s per record, from the FLOPs torch counted for the same setting, and
    its fraction of the machine's (CPU, fp32) matrix-product rate — for CPU records only: a GPU
    record's fraction of a CPU rate would mean nothing."""
    from ..runtime.providers import runs_on_gpu

    flops = {(r.model, r.batch, r.width, r.height): r.unet_step_gflop for r in records if r.unet_step_gflop}
    for r in records:
        gflop = flops.get((r.model, r.batch, r.width, r.height))
        step = r.stages_s["unet_step"].p50 if "unet_step" in r.stages_s else None
        r.unet_step_gflop = gflop
        r.unet_gflops_per_s = gflop / step if gflop and step else None
        r.unet_fraction_of_matmul_rate = (r.unet_gflops_per_s / matmul
                                          if r.unet_gflops_per_s and not runs_on_gpu(r.providers) else None)


def comparisons(records: list[Record]) -> list[Comparison]:
    """Each engine against the first engine of the same model and setting (`Comparison`)."""
    groups: dict[tuple, list[Record]] = defaultdict(list)
    for r in records:
        groups[r.key].append(r)
    return [Comparison.of(group[0], other) for group in groups.values() for other in group[1:]]


def default_scheduler(model: str) -> str | None:
    """The scheduler ours runs for `model` by default (the checkpoint's own where we implement it,
    DDIM for PNDM): what every engine of a bench runs unless told otherwise. None where the
    model's checkpoint cannot be found (each engine then runs its own; the records say which)."""
    from ..models import resolve_checkpoint
    from ..runtime.errors import OrtDiffusionError
    from ..runtime.schedulers import default_scheduler_for

    try:
        config = json.loads((resolve_checkpoint(model) / "scheduler" / "scheduler_config.json").read_text())
    except (OrtDiffusionError, ImportError, OSError, ValueError):
        return None
    return default_scheduler_for(config.get("_class_name")).value


def run_bench(plan: BenchPlan, progress: Callable[[str], None] = print) -> Report:
    records: list[Record] = []
    skipped: list[Skipped] = []
    exports: list[dict[str, str]] = []
    load_at_start = machine_load()
    for model in plan.models:
        workers = []
        scheduler = plan.scheduler or default_scheduler(model)
        for name in plan.engines:
            python = dict(plan.pythons).get(name, sys.executable)
            answer = prepare_answer(name, model, python)
            error = answer.get("error")
            if answer.get("prepared"):
                exports.append({"engine": name, "model": model, "bundle": answer["prepared"]})
            if error is None:
                progress(f"{model}: starting {name}" + (f" ({scheduler})" if scheduler else ""))
                w = Worker(name, model, plan.provider, python, scheduler, plan.task)
                if w.error is None:
                    workers.append(w)
                    continue
                error = w.error
                w.close()
            progress(f"{model}: {name} skipped: {error}")
            skipped.append(Skipped(name, model, error))
        cold: dict[str, float] = {}
        measured_cold: set[str] = set()

        def run_or_drop(w: Worker, setting: Setting) -> Sample | None:
            answer = w.run(setting, plan.guidance)
            if "error" in answer:
                progress(f"{model}: {w.engine} dropped: {answer['error']}")
                skipped.append(Skipped(w.engine, model, answer["error"]))
                workers.remove(w)
                w.close()
                return None
            return Sample.from_json(answer)

        try:
            for setting in plan.settings if workers else ():  # every engine skipped: nothing to run
                for w in list(workers):
                    for k in range(plan.warmup):
                        first = run_or_drop(w, setting)
                        if first is None:
                            break
                        if w.engine not in measured_cold:  # load + the first image: the cold start
                            cold[w.engine] = w.load_s + first.end_to_end
                            measured_cold.add(w.engine)
                samples: dict[str, list[Sample]] = defaultdict(list)
                for r in range(plan.runs):
                    if not workers:  # every engine dropped out
                        break
                    order = workers[r % len(workers):] + workers[:r % len(workers)]  # rotate who goes first
                    for w in order:
                        answer = run_or_drop(w, setting)
                        if answer is not None:
                            samples[w.engine].append(answer)
                    order = [w for w in order if w in workers]
                    progress(f"{model} {setting.width}x{setting.height} batch {setting.batch}: run {r + 1}/{plan.runs} "
                             + " ".join(f"{w.engine}={samples[w.engine][-1].end_to_end:.2f}s" for w in order))
                for w in workers:
                    if samples[w.engine]:
                        records.append(Record.of(w.engine, model, w.providers, w.precision, w.scheduler, setting,
                                                 samples[w.engine], cold.pop(w.engine, None), machine_load(), plan.task))
        finally:
            for w in workers:
                w.close()
    env = environment()
    env["machine_load"] = {"start": load_at_start, "end": machine_load()}
    add_compute_rates(records, env["fp32_matmul_gflops"])
    return Report(env=env, plan={"runs": plan.runs, "warmup": plan.warmup, "guidance": plan.guidance, "task": plan.task},
                  records=records, skipped=skipped, exports=exports, comparisons=comparisons(records))
