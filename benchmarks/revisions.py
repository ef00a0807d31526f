"""The same hot-path benchmark on two source trees in one run: is a change slower?

    python benchmarks/revisions.py BEFORE_TREE AFTER_TREE --out benchmarks/results/revisions-cpu2.json

Each tree runs in its own worker process (PYTHONPATH=tree) on one tiny-preset bundle, exported once
by the AFTER tree; the workers alternate round by round so that the machine's drift falls on both.
Measured per tree: the pipeline end to end (20 steps, batch 1 and 4) with the host loop and with the
device loop (IO binding on the CPU provider), and from the same calls the median UNet step and the
scheduler stage (`PipelineResult.timings`, which both trees record). The report gives medians over
all rounds and the ratio after / before of each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = r"""
import json, sys, time
from ortdiffusion import Pipeline
bundle, reps = sys.argv[1], int(sys.argv[2])
out = {}
for loop in ("host", "device"):
    pipe = Pipeline.load(bundle, providers="cpu", io_binding=loop == "device")
    for batch in (1, 4):
        call = dict(prompt=["a red circle on the left"] * batch, seed=list(range(batch)), num_inference_steps=20)
        pipe(**call)  # warm-up
        runs = []
        for _ in range(reps):
            start = time.perf_counter()
            r = pipe(**call)
            runs.append({"end_to_end": time.perf_counter() - start, "unet_step": sorted(r.timings.unet_steps)[10],
                         "scheduler": r.timings.scheduler})
        out[f"{loop}/b{batch}"] = runs
print(json.dumps(out))
"""


def run_worker(tree: Path, bundle: Path, reps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, "-c", WORKER, str(bundle), str(reps)], env=env, check=True,
                          capture_output=True, text=True, cwd=tempfile.gettempdir())
    return json.loads(done.stdout.strip().splitlines()[-1])


def export_bundle(tree: Path, out: Path) -> None:
    script = ("import sys; from ortdiffusion.export.presets import build_checkpoint; "
              "from ortdiffusion.export.bundle import export_checkpoint; "
              "export_checkpoint(build_checkpoint('tiny', sys.argv[1] + '/ckpt'), sys.argv[1] + '/bundle')")
    subprocess.run([sys.executable, "-c", script, str(out)], env={**os.environ, "PYTHONPATH": str(tree)}, check=True,
                   capture_output=True, cwd=tempfile.gettempdir())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5, help="timed calls per setting per round")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    with tempfile.TemporaryDirectory() as tmp:
        export_bundle(trees["after"], Path(tmp))
        samples: dict[str, dict[str, list[dict]]] = {name: {} for name in trees}
        for r in range(args.rounds):
            for name in (("before", "after") if r % 2 == 0 else ("after", "before")):
                for setting, runs in run_worker(trees[name], Path(tmp) / "bundle", args.reps).items():
                    samples[name].setdefault(setting, []).extend(runs)
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "load_after": os.getloadavg()}, "rounds": args.rounds, "reps": args.reps,
              "trees": {k: str(v) for k, v in trees.items()}, "settings": {}}
    for setting in samples["before"]:
        row = {}
        for metric in ("end_to_end", "unet_step", "scheduler"):
            medians = {name: statistics.median(s[metric] for s in samples[name][setting]) for name in trees}
            row[metric] = {**{f"{k}_s": round(v, 6) for k, v in medians.items()},
                           "ratio_after_over_before": round(medians["after"] / medians["before"], 4)}
        report["settings"][setting] = row
        print(f"{setting:10s} " + "  ".join(f"{m} {v['before_s'] * 1e3:.2f} → {v['after_s'] * 1e3:.2f} ms "
                                            f"(×{v['ratio_after_over_before']:.3f})" for m, v in row.items()))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
