"""Where one UNet step's time goes, by ONNX Runtime's own profiler (CPU provider).

    python benchmarks/profile_unet.py --model sd15-arch --target cpu --size 256 \
        --out benchmarks/results/profile-unet-sd15-256-cpu2.json

One step at batch 2 (guidance) after two unprofiled warm-up runs; kernel time summed by operator
type, and the convolutions' time by UNet block (3×3 against 1×1), each with its share of the step.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15-arch")
    parser.add_argument("--target", default="cpu", choices=["generic", "cpu"])
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--size", type=int, default=256, help="image side; the latents are side / 8")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: one per core)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import onnxruntime as ort

    from ortdiffusion.models import resolve_bundle

    bundle = resolve_bundle(args.model, target=args.target, precision=args.precision)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(bundle / "unet.onnx"), options, providers=["CPUExecutionProvider"])
    text = next(i for i in session.get_inputs() if i.name == "encoder_hidden_states").shape[-1]
    side = args.size // 8
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, side, side), dtype=np.float32),
             "timestep": np.array([500, 500], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, text), dtype=np.float32)}
    for _ in range(2):
        session.run(None, feeds)
    options.enable_profiling = True
    scratch = tempfile.mkdtemp(prefix="profile-unet-")  # ONNX Runtime writes its trace here, not into the cwd
    options.profile_file_prefix = str(Path(scratch) / "unet")
    session = ort.InferenceSession(str(bundle / "unet.onnx"), options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)  # the first profiled run pays one-time costs
    session.run(None, feeds)
    trace = session.end_profiling()
    events = json.loads(Path(trace).read_text())
    shutil.rmtree(scratch, ignore_errors=True)
    run = [e for e in events if e.get("name") == "model_run"][-1]
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
             and run["ts"] <= e["ts"] <= run["ts"] + run["dur"]]
    by_op, by_block = Counter(), Counter()
    for e in nodes:
        op = e["args"]["op_name"]
        by_op[op] += e["dur"]
        if op in ("Conv", "FusedConv"):
            block = re.search(r"(down_blocks\.\d|up_blocks\.\d|mid_block|conv_in|conv_out|time_embedding)", e["name"])
            kernel = "1x1" if re.search(r"proj_in|proj_out|conv_shortcut", e["name"]) else "3x3"
            by_block[f"{block.group(1) if block else 'other'} {kernel}"] += e["dur"]
    step_ms = run["dur"] / 1e3
    report = {"bundle": str(bundle), "size": args.size, "step_ms": step_ms,
              "by_op_ms": {k: v / 1e3 for k, v in by_op.most_common()},
              "conv_by_block_ms": {k: v / 1e3 for k, v in sorted(by_block.items())}}
    print(f"one UNet step: {step_ms:.0f} ms ({args.model}, {args.target}, {args.size}×{args.size}, batch 2)")
    for op, us in by_op.most_common(12):
        print(f"  {op:26s} {us / 1e3:8.1f} ms  {100 * us / run['dur']:5.1f} %")
    print("convolutions by block:")
    for block, us in sorted(by_block.items()):
        print(f"  {block:26s} {us / 1e3:8.1f} ms  {100 * us / run['dur']:5.1f} %")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
