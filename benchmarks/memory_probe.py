"""Peak host memory of one UNet step, ONNX Runtime (with session variants) against torch eager,
each in a fresh process, to find where the pipeline's memory goes.

    python benchmarks/memory_probe.py --model sd15-arch --size 512 --out benchmarks/results/memory-sd15-cpu2.json

One denoising step at batch 2 (guidance), 77 text tokens; resident memory after loading and the
process's peak. Variants: ONNX Runtime's defaults on the generic export, on the `--target cpu`
export (fused, attention as MultiHeadAttention), its CPU memory arena off, arena and memory
pattern off; torch eager fp32 (diffusers' UNet2DConditionModel).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

VARIANTS = ("ort-default", "ort-cpu-target", "ort-no-arena", "ort-no-arena-no-pattern", "torch")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def probe(variant: str, model: str, side: int) -> dict:
    """Runs in the child process."""
    from ortdiffusion.models import resolve_bundle, resolve_checkpoint

    latent = side // 8
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, latent, latent), dtype=np.float32)
    start = time.perf_counter()
    if variant == "torch":
        import torch
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(str(resolve_checkpoint(model) / "unet")).eval()
        text = rng.standard_normal((2, 77, unet.config.cross_attention_dim), dtype=np.float32)
        loaded = rss_mb()
        step_start = time.perf_counter()
        with torch.no_grad():
            unet(torch.from_numpy(sample), torch.tensor(500), encoder_hidden_states=torch.from_numpy(text))
    else:
        import onnxruntime as ort

        bundle = resolve_bundle(model, target="cpu" if variant == "ort-cpu-target" else "generic")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_cpu_mem_arena = "no-arena" not in variant
        options.enable_mem_pattern = "no-pattern" not in variant
        session = ort.InferenceSession(str(bundle / "unet.onnx"), options, providers=["CPUExecutionProvider"])
        width = session.get_inputs()[2].shape[2]
        text = rng.standard_normal((2, 77, width), dtype=np.float32)
        loaded = rss_mb()
        step_start = time.perf_counter()
        session.run(None, {"sample": sample, "timestep": np.array([500, 500], np.float32), "encoder_hidden_states": text})
    return {"variant": variant, "size": side, "rss_after_load_mb": loaded,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "load_and_step_s": time.perf_counter() - start, "step_s": time.perf_counter() - step_start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd15-arch")
    p.add_argument("--size", default="256,512")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", type=Path)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(probe(args.child[0], args.child[1], int(args.child[2]))))
        return
    rows = []
    for side in map(int, args.size.split(",")):
        for variant in args.variants.split(","):
            out = subprocess.run([sys.executable, __file__, "--child", variant, args.model, str(side)],
                                 capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{side}: {variant:<24} after load {r['rss_after_load_mb']:7.0f} MB, peak {r['peak_mb']:7.0f} MB, "
                  f"step {r['step_s']:.2f} s", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
