"""Time and host memory of each step of a UNet's fp16 export that runs on the CPU, in one process,
to find where an SD-sized export's memory goes.

    python benchmarks/export_memory.py --model sd15-arch --out benchmarks/results/export-memory-sd15-cpu2.json
    python benchmarks/export_memory.py --model sd15-arch --target cpu --out benchmarks/results/export-memory-sd15-cpu-target-cpu2.json

Steps, in the order `export_component` runs them for `--target cuda --precision fp16` (the CUDA
parity check, which needs a GPU, is left out); with `--target cpu`, the TorchScript export and the
CPU optimization (the transformer optimizer's CPU fusions, then ONNX Runtime's own optimizer saving
the graph): the TorchScript export, the fp16 range measurement
on the plain graph (`fp16.measure_ranges`), ONNX Runtime's transformer optimizer with the CUDA
fusions (`optimize.optimize_graph`), the fp16 conversion (`fp16.convert_to_fp16`). For each: wall
time, the process's peak resident memory during it (sampled every 50 ms), and what stays resident
after it once the C allocator has handed free memory back (`malloc_trim`). The generic fp16 export
runs the same steps but the optimizer's. As in the export, the torch module's weights wait on disk
(`weights.offloaded`) from the optimizer to the conversion; the last step runs the module on a
parity input, its weights mapped back, as the parity check does next.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def anon_mb() -> float:
    """Resident memory not backed by a file: what the kernel cannot drop under pressure. A checkpoint
    loaded memory-mapped (safetensors) counts in the resident size as clean file pages, which it can."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * PAGE / 2**20


class PeakSampler:
    """The largest resident size (and anonymous part) seen since the last `reset`, sampled on a thread."""

    def __init__(self, every_s: float = 0.05):
        self.peak, self.peak_anon = rss_mb(), anon_mb()
        self._every = every_s
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            self.peak, self.peak_anon = max(self.peak, rss_mb()), max(self.peak_anon, anon_mb())
            time.sleep(self._every)

    def reset(self) -> None:
        self.peak, self.peak_anon = rss_mb(), anon_mb()


def _memory_cgroup() -> Path | None:
    """This process's folder of cgroup v1's memory controller (None on cgroup v2 or without one:
    then no limit is recorded)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        path = next(line.split(":", 2)[2] for line in lines if line.split(":", 2)[1] == "memory")
    except (OSError, StopIteration, IndexError):
        return None
    group = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
    return group if (group / "memory.limit_in_bytes").exists() else None


def reset_cgroup_peak() -> None:
    """Start the cgroup's peak afresh (it would carry an earlier run's otherwise)."""
    group = _memory_cgroup()
    try:
        if group is not None:
            (group / "memory.max_usage_in_bytes").write_text("0")
    except OSError:
        pass


def cgroup_memory() -> dict | None:
    """The memory limit of this process's cgroup (v1) and the most the cgroup used since
    `reset_cgroup_peak`, page cache charged to it included; None where there is no limit. A run
    inside a cgroup limited to N GiB shows that the steps complete in N GiB, the kernel dropping file
    pages as it must — the resident sizes count a memory-mapped checkpoint's pages, which it can.
    Pages already cached before the run (the checkpoint read by an earlier one) stay charged where
    they were first read; a peak resident size above the limit shows that."""
    group = _memory_cgroup()
    try:
        limit = int((group / "memory.limit_in_bytes").read_text()) if group else 2**63
        used = int((group / "memory.max_usage_in_bytes").read_text()) if group else 0
    except (OSError, ValueError):
        return None
    if limit >= 2**60:  # no limit set
        return None
    return {"cgroup_version": 1, "limit_mb": round(limit / 2**20), "max_usage_mb": round(used / 2**20)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd15-arch", help="a checkpoint directory or preset")
    p.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    p.add_argument("--target", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--export-only", action="store_true", help="the TorchScript export step alone")
    p.add_argument("--skip-ranges", action="store_true",
                   help="leave out the fp16 range measurement (SDXL's UNet: 54 min on 2 cores): the conversion "
                        "then keeps no node fp32 by measurement, which changes which weights it halves, not how "
                        "it holds them")
    args = p.parse_args()

    import onnxruntime
    import torch

    from ortdiffusion.export.bundle import pipeline_components
    from ortdiffusion.export.checkpoint import load_checkpoint
    from ortdiffusion.export.fp16 import convert_to_fp16, measure_ranges
    from ortdiffusion.export.onnx_export import export_onnx
    from ortdiffusion.export.optimize import Target, cuda_fusions_fit, optimize_graph
    from ortdiffusion.export.weights import offloaded
    from ortdiffusion.models import resolve_checkpoint

    libc = ctypes.CDLL("libc.so.6")
    reset_cgroup_peak()
    sampler = PeakSampler()
    steps: list[dict] = []

    def step(name: str, run):
        sampler.reset()
        start = time.perf_counter()
        result = run()
        seconds = time.perf_counter() - start
        libc.malloc_trim(0)
        steps.append({"step": name, "seconds": round(seconds, 1), "peak_mb": round(sampler.peak),
                      "peak_anonymous_mb": round(sampler.peak_anon), "resident_after_mb": round(rss_mb())})
        print(f"{name}: {seconds:.1f} s, peak {sampler.peak:.0f} MB ({sampler.peak_anon:.0f} MB anonymous), "
              f"resident after {rss_mb():.0f} MB", flush=True)
        return result

    ckpt = load_checkpoint(resolve_checkpoint(args.model))
    spec, module = next((s, m) for s, m in pipeline_components(ckpt) if s.name == "unet")
    del ckpt
    work = Path(tempfile.mkdtemp(prefix="export-memory-"))
    try:
        files = step("torchscript export", lambda: export_onnx(spec, module, work / "unet.onnx"))
        if args.export_only:
            pass
        elif args.target == "cpu":  # as bundle.export_component runs it: the module's weights on disk meanwhile
            with offloaded(module, work):
                step("optimizer, CPU fusions + ONNX Runtime", lambda: optimize_graph(files, "unet", Target.CPU))
        else:  # as bundle._to_fp16 runs them: the torch module's weights on disk meanwhile
            fits = cuda_fusions_fit(module)
            with offloaded(module, work):
                ranges = {} if args.skip_ranges else step("fp16 range measurement", lambda: measure_ranges(files, spec))
                step("optimizer, CUDA fusions", lambda: optimize_graph(files, "unet", Target.CUDA, fp16=True, fits=fits))
                step("fp16 conversion", lambda: convert_to_fp16(files, spec, ranges))
            with torch.no_grad():  # what parity runs next: the module, its weights mapped back from disk
                step("torch module on parity inputs (weights mapped back)",
                     lambda: module(*spec.sample_inputs(spec.parity_points()[0], 0)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record = {"model": args.model, "component": "unet", "target": args.target, "steps": steps,
              "export_only": args.export_only, "skip_ranges": args.skip_ranges, "cgroup": cgroup_memory(),
              "parity_shapes": [dict(d) for d in spec.parity_points()],
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__}}
    if args.out:
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
