"""Cold start of `ortdiffusion generate` on the built-in model: wall time per phase, two source trees
side by side in alternating order (the machine is shared, so ratios of neighbouring runs are what
to quote, not absolute times).

    git worktree add --detach /tmp/cold-base <baseline commit>
    python benchmarks/cold_start.py --tree base=/tmp/cold-base --tree new=. --runs 7 \\
        --json benchmarks/results/cold-start-cpu2.json

Each run is a fresh `python` process per tree, as `python -m ortdiffusion.cli generate PROMPT -o OUT -q`
(the tree's `cli.run` where it has one, else `sys.exit(cli.main())`) with that tree first on sys.path,
driven by a small probe that times the phases in-process by
wrapping the functions the CLI calls (so the CLI itself is unchanged); the parent measures the
process's wall time from spawn to exit. Phases:

    startup      spawn → the probe's first line (interpreter, site, .pth files)
    import       `import ortdiffusion.cli` (and what it imports at module level)
    parse        the argument parser (built per call) and parse_args
    resolve      from main() to Pipeline.load: model, manifest, request, prompt warnings
    load         Pipeline.load: manifest again, file hashes, tokenizer, sessions created at load
    generate     pipe.generate: tokenize … decode (and any session created on first use)
    write        encode and write the image
    exit         main() returned → process gone (interpreter teardown, sessions freed)

`sessions` breaks session creation down by component (wherever it happened: load or first use) and
`verify` is the manifest's file-hash check. Each tree gets its own ORTDIFFUSION_CACHE: `warm`
runs share one that an untimed run filled first (a user's second and later runs), `first` runs get an
empty one each time (a user's very first run: any cache is built during it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROBE = r"""
import json, os, sys, time
T0 = time.perf_counter(); W0 = time.time()
tree = os.environ["COLD_TREE"]; sys.path.insert(0, tree)
marks = {"startup": W0 - float(os.environ["COLD_SPAWN"])}
sessions = {}; extra = {"verify": 0.0}
t = time.perf_counter()
import ortdiffusion.cli as cli
marks["import"] = time.perf_counter() - t
from ortdiffusion.runtime import manifest as _manifest, session as _session, pipeline as _pipeline, png as _png
def wrap(owner, name, sink):
    original = getattr(owner, name)
    def timed(*a, **k):
        s = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            sink(time.perf_counter() - s, a)
    setattr(owner, name, timed)
clock = {}
def lap(key):
    def sink(dt, a):
        clock[key] = clock.get(key, 0.0) + dt
    return sink
def session_sink(dt, a):
    name = a[2].name
    sessions[name] = sessions.get(name, 0.0) + dt
def verify_sink(dt, a):
    extra["verify"] += dt
wrap(_session.Session, "__init__", session_sink)
for mod in (_manifest, _pipeline):
    if hasattr(mod, "verify_files"):
        wrap(mod, "verify_files", verify_sink)
load = _pipeline.Pipeline.load.__func__
def timed_load(cls, *a, **k):
    s = time.perf_counter(); clock["main_to_load"] = s - clock["main_start"]
    try:
        pipe = load(cls, *a, **k)
    finally:
        clock["load"] = time.perf_counter() - s
    gen = pipe.generate
    def timed_generate(*a, **k):
        s = time.perf_counter()
        try:
            return gen(*a, **k)
        finally:
            clock["generate"] = time.perf_counter() - s
            clock["after_generate"] = time.perf_counter()
    pipe.generate = timed_generate
    return pipe
_pipeline.Pipeline.load = classmethod(timed_load)
parser = cli.build_parser
def timed_parser():
    s = time.perf_counter()
    p = parser()
    original = p.parse_args
    def parse_args(*a, **k):
        r = original(*a, **k)
        clock["parse"] = time.perf_counter() - s
        clock["main_start"] = time.perf_counter()
        return r
    p.parse_args = parse_args
    return p
cli.build_parser = timed_parser
main = cli.main
def timed_main(argv=None):
    code = main(argv)
    end = time.perf_counter()
    marks["parse"] = clock["parse"]
    marks["resolve"] = clock["main_to_load"]
    marks["load"] = clock["load"]
    marks["generate"] = clock["generate"]
    marks["write"] = end - clock["after_generate"]
    with open(os.environ["COLD_OUT"], "w") as f:
        json.dump({"code": code, "phases": marks, "sessions": sessions, "verify": extra["verify"],
                   "main_end_wall": time.time()}, f)
    return code
cli.main = timed_main
if hasattr(cli, "run"):  # what `python -m ortdiffusion.cli` and the script run
    cli.run()
sys.exit(cli.main(sys.argv[1:]))
"""

PROMPT = "a red circle on the left"


def run_once(tree: Path, cache: Path, out_png: Path) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        record = Path(f.name)
    env = {**os.environ, "COLD_TREE": str(tree), "COLD_OUT": str(record), "ORTDIFFUSION_CACHE": str(cache),
           "PYTHONPATH": str(tree)}
    env["COLD_SPAWN"] = repr(time.time())
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE, "generate", PROMPT, "-o", str(out_png), "-q"],
                          cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    ended = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"{tree}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    data = json.loads(record.read_text())
    record.unlink()
    data["phases"]["exit"] = max(0.0, ended - data.pop("main_end_wall"))
    data["wall"] = wall
    data["cli_line"] = proc.stdout.strip().splitlines()[-1]
    return data


def summary(values: list[float]) -> dict:
    values = sorted(values)
    return {"median": statistics.median(values), "min": values[0], "max": values[-1],
            "iqr": [values[len(values) // 4], values[(3 * len(values)) // 4]] if len(values) > 3 else None}


def importtime(tree: Path, cache: Path) -> dict:
    """Self import time by top-level package (python -X importtime), one run."""
    env = {**os.environ, "PYTHONPATH": str(tree), "ORTDIFFUSION_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "ortdiffusion.cli", "generate", PROMPT, "-o",
                           str(cache / "importtime.png"), "-q"], cwd=tree, env=env, capture_output=True, text=True)
    by_package: dict[str, float] = {}
    modules = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _cumulative, name = (x.strip() for x in line.replace("import time:", "").split("|"))
        package = name.strip().split(".")[0]
        by_package[package] = by_package.get(package, 0.0) + int(self_us) / 1e6
        modules.append(name.strip())
    top = dict(sorted(by_package.items(), key=lambda kv: -kv[1])[:15])
    return {"total_s": sum(by_package.values()), "modules": len(modules), "by_package_s": top,
            "ortdiffusion_modules": sorted(m for m in modules if m.startswith("ortdiffusion"))}


def commit_of(tree: Path) -> str | None:
    """The tree's commit, `-dirty` where its files differ from it (None outside git)."""
    try:
        out = subprocess.run(["git", "-C", str(tree), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def prepare_bytecode(tree: Path, mode: str) -> None:
    """The tree's own modules byte-compiled (`compiled`) or with no bytecode at all (`source`).
    Why it matters: this machine sets PYTHONDONTWRITEBYTECODE=1, so a source tree's modules were
    compiled afresh in every run (a profile of the import: `compile` the largest self time), which a user's
    installed package never does: pip byte-compiles a wheel at install, and a source checkout
    writes its `__pycache__` on the first import. Installed packages (numpy, onnxruntime) have their
    bytecode either way."""
    import compileall
    import shutil

    package = tree / "ortdiffusion"
    if mode == "compiled":
        if not compileall.compile_dir(str(package), quiet=1):
            raise RuntimeError(f"{package}: byte-compilation failed")
    else:
        for cache in package.rglob("__pycache__"):
            shutil.rmtree(cache)
        os.environ["PYTHONDONTWRITEBYTECODE"] = "1"  # the children inherit it: nothing is written back


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH, repeatable; the first is the baseline")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--first-runs", type=int, default=3, help="runs with an empty cache (a user's first run)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--bytecode", choices=["compiled", "source"], default="compiled",
                        help="compiled (default): each tree's modules byte-compiled first, as `pip install` does "
                             "for a user; source: no bytecode, every module compiled from source in every run (what "
                             "a machine with PYTHONDONTWRITEBYTECODE=1 does to a source tree, as on this one)")
    args = parser.parse_args()
    trees = {name: Path(path).resolve() for name, path in (t.split("=", 1) for t in args.tree)}
    for tree in trees.values():
        prepare_bytecode(tree, args.bytecode)
    work = Path(tempfile.mkdtemp(prefix="cold-start-"))
    caches = {name: work / f"cache-{name}" for name in trees}
    results: dict[str, dict[str, list]] = {name: {"warm": [], "first": []} for name in trees}
    for name, tree in trees.items():  # fill each tree's cache (and the OS page cache) untimed
        run_once(tree, caches[name], work / f"{name}.png")
    order = list(trees)
    for i in range(args.runs):
        for name in (order if i % 2 == 0 else order[::-1]):
            r = run_once(trees[name], caches[name], work / f"{name}.png")
            results[name]["warm"].append(r)
            print(f"warm {i} {name}: {r['wall']:.2f} s  " + " ".join(f"{k} {v:.2f}" for k, v in r["phases"].items()),
                  file=sys.stderr)
    for i in range(args.first_runs):
        for name in (order if i % 2 == 0 else order[::-1]):
            r = run_once(trees[name], work / f"first-{name}-{i}", work / f"{name}.png")
            results[name]["first"].append(r)
            print(f"first {i} {name}: {r['wall']:.2f} s", file=sys.stderr)
    base = order[0]
    report = {"what": "ortdiffusion generate on the built-in model, cold process per run, trees alternating",
              "command": f"python -m ortdiffusion.cli generate {PROMPT!r} -o OUT -q",
              "machine": f"{os.cpu_count()} cores, shared (load average {os.getloadavg()[0]:.1f} at the end)",
              "trees": {name: str(path) for name, path in trees.items()}, "runs": args.runs,
              "commits": {name: commit_of(path) for name, path in trees.items()},
              "bytecode": args.bytecode, "trees_detail": {}}
    for name in trees:
        detail = {}
        for kind in ("warm", "first"):
            rs = results[name][kind]
            if not rs:
                continue
            phases = {k: summary([r["phases"][k] for r in rs]) ["median"] for k in rs[0]["phases"]}
            components = sorted({c for r in rs for c in r["sessions"]})
            detail[kind] = {"wall_s": summary([r["wall"] for r in rs]),
                            "phases_median_s": phases,
                            "sessions_median_s": {c: statistics.median([r["sessions"].get(c, 0.0) for r in rs])
                                                  for c in components},
                            "verify_median_s": statistics.median([r["verify"] for r in rs]),
                            "cli_lines": [r["cli_line"] for r in rs[:3]],
                            "runs": [{"wall_s": round(r["wall"], 3), **{k: round(v, 3) for k, v in r["phases"].items()}}
                                     for r in rs]}
        detail["importtime"] = importtime(trees[name], caches[name])
        report["trees_detail"][name] = detail
    for name in order[1:]:
        for kind in ("warm", "first"):
            pairs = list(zip(results[base][kind], results[name][kind]))
            if pairs:
                ratios = [b["wall"] / n["wall"] for b, n in pairs]
                report.setdefault("speedup_vs_" + base, {})[f"{name}_{kind}"] = summary(ratios)
                # the same pairs without the generate phase (tokenize … decode: the networks' work)
                outside = [(b["wall"] - b["phases"]["generate"]) / (n["wall"] - n["phases"]["generate"]) for b, n in pairs]
                report["speedup_vs_" + base][f"{name}_{kind}_outside_generate"] = summary(outside)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
