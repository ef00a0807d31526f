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

ENGINES = ("ortdiffusion", "ortdiffusion-cpu", "ortdiffusion-int8", "ortdiffusion-fp16", "ortdiffusion-cuda",
           "ortdiffusion-cuda-graphs", "torch", "optimum")
#: The stages that are the three networks; everything else is overhead the engine itself adds.
NETWORK_STAGES = ("text_encoder", "unet_step", "decoder")


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
                 scheduler: str | None = None):
        cmd = [python, "-m", "ortdiffusion.bench.worker", engine, model]
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


def stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "mean": float(a.mean()), "runs": int(a.size)}


#: A record whose runs spread more than this fraction of their median is flagged noisy.
NOISY_SPREAD = 0.10


def spread(values: list[float]) -> dict[str, float]:
    """How far a record's runs lie apart: min, max, max − min (s) and that as a fraction of the median.
    One loaded run of torch ranged 6.9–43.6 s: a p50 alone hid it."""
    a = np.asarray(values, dtype=np.float64)
    median = float(np.median(a))
    return {"min": float(a.min()), "max": float(a.max()), "range": float(a.max() - a.min()),
            "relative": float((a.max() - a.min()) / median) if median > 0 else 0.0}


def machine_load() -> dict[str, float] | None:
    """The 1-minute load average against the cores: above 1 per core, other work shared them."""
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return None
    cores = os.cpu_count() or 1
    return {"load_1min": one, "load_5min": five, "per_core": one / cores}


def comparisons(records: list[dict]) -> list[dict]:
    """Each engine against the first engine of the same model and setting: the ratio of end-to-end
    medians, and `within_noise` when either side's spread (max − min) exceeds the difference between
    the medians — then the ratio says nothing, and the run should be repeated on a quiet machine."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["model"], r["batch"], r["width"], r["height"], r["steps"])].append(r)
    out = []
    for (model, batch, width, height, steps), group in groups.items():
        base = group[0]
        for other in group[1:]:
            a, b = base["end_to_end_s"]["p50"], other["end_to_end_s"]["p50"]
            noise = max(base["spread_s"]["range"], other["spread_s"]["range"])
            out.append({"model": model, "batch": batch, "width": width, "height": height, "steps": steps,
                        "engine": other["engine"], "against": base["engine"], "ratio": b / a if a > 0 else None,
                        "difference_s": abs(b - a), "spread_s": noise, "within_noise": noise > abs(b - a)})
    return out


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
                    "optimum", "optimum-onnx"):
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


def record(engine: Worker, model: str, setting: Setting, samples: list[dict], cold_start_s: float | None) -> dict:
    per_stage: dict[str, list[float]] = defaultdict(list)
    for sample in samples:
        for stage, values in sample["stages"].items():
            per_stage[stage] += values if stage == "unet_step" else [sum(values)]
    end_to_end = stats([s["end_to_end"] for s in samples])
    networks = sum(sum(sum(s["stages"].get(k, [])) for k in NETWORK_STAGES) for s in samples)
    total = sum(s["end_to_end"] for s in samples)
    return {
        "engine": engine.engine, "model": model, "providers": engine.providers, "precision": engine.precision,
        "scheduler": engine.scheduler, "batch": setting.batch, "width": setting.width, "height": setting.height, "steps": setting.steps,
        "end_to_end_s": end_to_end, "stages_s": {k: stats(v) for k, v in per_stage.items()},
        "spread_s": spread([s["end_to_end"] for s in samples]), "machine_load": machine_load(),
        "cold_start_s": cold_start_s, "images_per_s": setting.batch / end_to_end["mean"],
        "peak_host_mb": max(s["peak_host_mb"] for s in samples),
        "peak_device_mb": max((s["peak_device_mb"] for s in samples if s["peak_device_mb"] is not None), default=None),
        # Time outside the three networks (tokenizer, scheduler, guidance, copies, PNG), as a share.
        "outside_networks_fraction": max(0.0, 1 - networks / total) if total > 0 else None,
        "unet_step_gflop": next((s["unet_step_gflop"] for s in samples if "unet_step_gflop" in s), None),
        # ours only: arrays that crossed host <-> device in one generation (device_loop.Transfers)
        "transfers": next((s["transfers"] for s in samples if "transfers" in s), None),
    }


def add_compute_rates(records: list[dict], matmul: float) -> None:
    """Achieved UNet GFLOP/s per record, from the FLOPs torch counted for the same setting, and
    its fraction of the machine's (CPU, fp32) matrix-product rate — for CPU records only: a GPU
    record's fraction of a CPU rate would mean nothing."""
    from ..runtime.providers import runs_on_gpu

    flops = {(r["model"], r["batch"], r["width"], r["height"]): r["unet_step_gflop"]
             for r in records if r.get("unet_step_gflop")}
    for r in records:
        gflop = flops.get((r["model"], r["batch"], r["width"], r["height"]))
        step = r["stages_s"].get("unet_step", {}).get("p50")
        r["unet_step_gflop"] = gflop
        r["unet_gflops_per_s"] = gflop / step if gflop and step else None
        r["unet_fraction_of_matmul_rate"] = (r["unet_gflops_per_s"] / matmul
                                             if r["unet_gflops_per_s"] and not runs_on_gpu(r["providers"]) else None)


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


def run_bench(plan: BenchPlan, progress: Callable[[str], None] = print) -> dict[str, Any]:
    records, skipped, exports = [], [], []
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
                w = Worker(name, model, plan.provider, python, scheduler)
                if w.error is None:
                    workers.append(w)
                    continue
                error = w.error
                w.close()
            progress(f"{model}: {name} skipped: {error}")
            skipped.append({"engine": name, "model": model, "reason": error})
        cold: dict[str, float] = {}
        measured_cold: set[str] = set()

        def run_or_drop(w: Worker, setting: Setting) -> dict | None:
            answer = w.run(setting, plan.guidance)
            if "error" in answer:
                progress(f"{model}: {w.engine} dropped: {answer['error']}")
                skipped.append({"engine": w.engine, "model": model, "reason": answer["error"]})
                workers.remove(w)
                w.close()
                return None
            return answer

        try:
            for setting in plan.settings if workers else ():  # every engine skipped: nothing to run
                for w in list(workers):
                    for k in range(plan.warmup):
                        first = run_or_drop(w, setting)
                        if first is None:
                            break
                        if w.engine not in measured_cold:  # load + the first image: the cold start
                            cold[w.engine] = w.load_s + first["end_to_end"]
                            measured_cold.add(w.engine)
                samples: dict[str, list[dict]] = defaultdict(list)
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
                             + " ".join(f"{w.engine}={samples[w.engine][-1]['end_to_end']:.2f}s" for w in order))
                for w in workers:
                    if samples[w.engine]:
                        records.append(record(w, model, setting, samples[w.engine], cold.pop(w.engine, None)))
        finally:
            for w in workers:
                w.close()
    env = environment()
    env["machine_load"] = {"start": load_at_start, "end": machine_load()}
    add_compute_rates(records, env["fp32_matmul_gflops"])
    return {"env": env, "plan": {"runs": plan.runs, "warmup": plan.warmup, "guidance": plan.guidance},
            "records": records, "skipped": skipped, "exports": exports, "comparisons": comparisons(records)}


def markdown(report: dict[str, Any]) -> str:
    rows = ["| model | engine | providers | precision | scheduler | batch | size | steps | end to end p50 s | p90 s | "
            "UNet step p50 ms | UNet GFLOP/s (of matmul) | outside networks | images/s | cold start s | peak host MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    gpu = any(r.get("peak_device_mb") is not None for r in report["records"])
    if gpu:
        rows[0] += " peak GPU MB |"
        rows[1] += "---|"
    for r in report["records"]:
        unet = r["stages_s"].get("unet_step", {}).get("p50", float("nan")) * 1e3
        providers = ",".join(sorted(set(r["providers"].values())))
        cold = f"{r['cold_start_s']:.2f}" if r["cold_start_s"] is not None else "–"
        rate = f"{r['unet_gflops_per_s']:.0f}" if r.get("unet_gflops_per_s") else "–"
        if r.get("unet_fraction_of_matmul_rate"):
            rate += f" ({r['unet_fraction_of_matmul_rate']:.0%})"
        outside = f"{r['outside_networks_fraction']:.1%}" if r.get("outside_networks_fraction") is not None else "–"
        rows.append(f"| {r['model']} | {r['engine']} | {providers} | {r['precision']} | {r.get('scheduler') or '–'} | {r['batch']} | "
                    f"{r['width']}x{r['height']} | {r['steps']} | {r['end_to_end_s']['p50']:.3f} | "
                    f"{r['end_to_end_s']['p90']:.3f} | {unet:.1f} | {rate} | {outside} | {r['images_per_s']:.3f} | {cold} | "
                    f"{r['peak_host_mb']:.0f} |" + (f" {r['peak_device_mb']:.0f} |" if r.get("peak_device_mb") is not None
                                                    else (" – |" if gpu else "")))
    rows.append(f"\nfp32 matrix-product rate of this machine (numpy, 4096²): {report['env'].get('fp32_matmul_gflops', 0):.0f} GFLOP/s")
    rows += noise_lines(report)
    for s in report.get("skipped", []):
        rows.append(f"\n{s['engine']} on {s['model']} skipped: {s['reason']}")
    return "\n".join(rows)


def noise_lines(report: dict[str, Any]) -> list[str]:
    """The spread of each record, the machine's load, and each comparison marked when it is within noise."""
    rows = []
    for r in report["records"]:
        s = r.get("spread_s")
        if s and s["relative"] > NOISY_SPREAD:
            rows.append(f"\nnoisy: {r['engine']} {r['width']}x{r['height']} batch {r['batch']} ranged "
                        f"{s['min']:.3f}–{s['max']:.3f} s ({s['relative']:.0%} of its median)")
    load = report["env"].get("machine_load") or {}
    start, end = load.get("start"), load.get("end")
    if start and end:
        busy = " (busier than its cores: other work shared them)" if max(start["per_core"], end["per_core"]) > 1 else ""
        rows.append(f"\nmachine load (1 min) {start['load_1min']:.2f} at the start, {end['load_1min']:.2f} at the end, "
                    f"{report['env'].get('cores')} cores{busy}")
    for c in report.get("comparisons", []):
        ratio = f"{c['ratio']:.2f}×" if c["ratio"] else "–"
        verdict = ("WITHIN NOISE: the spread exceeds the difference; repeat on a quiet machine" if c["within_noise"]
                   else "outside the spread")
        rows.append(f"\n{c['engine']} / {c['against']} ({c['width']}x{c['height']} batch {c['batch']}): {ratio}, "
                    f"difference {c['difference_s']:.3f} s, spread {c['spread_s']:.3f} s — {verdict}")
    return rows


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = report["records"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    labels, bottoms = [], []
    stages = ["tokenize", "text_encoder", "unet_step", "scheduler", "decoder", "postprocess", "png_encode"]
    for i, r in enumerate(records):
        labels.append(f"{r['engine']}\n{r['width']}x{r['height']} b{r['batch']}")
        bottom = 0.0
        for j, stage in enumerate(stages):
            s = r["stages_s"].get(stage)
            if not s:
                continue
            value = s["mean"] * (r["steps"] if stage == "unet_step" else 1)
            axes[0].bar(i, value, bottom=bottom, color=f"C{j}", label=stage if i == 0 or stage not in bottoms else None)
            bottoms.append(stage)
            bottom += value
    axes[0].set_xticks(range(len(labels)), labels, fontsize=7)
    axes[0].set_ylabel("seconds per generation (mean)")
    axes[0].set_title("per-stage breakdown")
    handles, names = axes[0].get_legend_handles_labels()
    unique = dict(zip(names, handles))
    axes[0].legend(unique.values(), unique.keys(), fontsize=7)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["engine"], r["model"], r["width"], r["height"])].append(r)
    for (engine, model, w, h), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["batch"])
        batches = [r["batch"] for r in rs]
        axes[1].plot(batches, [r["end_to_end_s"]["p50"] for r in rs], marker="o", label=f"{engine} {model} {w}x{h}")
        axes[2].plot(batches, [r["images_per_s"] for r in rs], marker="o", label=f"{engine} {model} {w}x{h}")
    axes[1].set_xlabel("batch")
    axes[1].set_ylabel("end-to-end latency p50 (s)")
    axes[2].set_xlabel("batch")
    axes[2].set_ylabel("images per second")
    for ax in axes[1:]:
        ax.legend(fontsize=7)
        ax.set_xscale("log", base=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
