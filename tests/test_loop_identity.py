"""The denoising loop computes bit for bit what it computed before the runtime redesign (issue 23).

`tests/data/loop_hashes.json` holds the sha256 of the images (uint8) and of the final latents that
the pipeline drew on the commit before the redesign, for every scheduler × {guided, unguided} ×
{host loop, device loop (IO binding) on the CPU provider} × batch {1, 3}, on the built-in bundle.
Regenerate them only on purpose: `python tests/test_loop_identity.py --record-baseline` (draws them
with the commit before the redesign, on this machine, with today's built-in bundle).

ONNX Runtime's kernels round differently on another instruction set (the hashes recorded on one
machine's CPU all differed on an AMD EPYC's, images and latents alike, on the commit they were
recorded on), so the file is compared only on the machine (CPU model, onnxruntime and numpy
versions) and with the built-in bundle (its hash: the model is retrained and re-exported now and
then) that recorded it. On any other machine the test draws the baseline itself: it checks the
commit before the redesign out of git into a temporary directory and runs this same recording
there, so the check stays before-against-after on one machine; it skips, saying why, only where
git or that commit is missing (a source archive without history).
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HASHES = Path(__file__).resolve().parent / "data" / "loop_hashes.json"
#: The commit before the runtime redesign: the baseline this test compares against.
BEFORE = "d849eb1"
ROOT = Path(__file__).resolve().parents[1]
SCHEDULERS = ("ddim", "euler", "euler-ancestral", "dpm++2m", "dpm++2m-karras")
PROMPTS = ("a red circle on the left", "a blue square", "a green star above a yellow triangle")


def cases():
    for scheduler in SCHEDULERS:
        for guidance in (3.0, 1.0):
            for io_binding in (False, True):
                for batch in (1, 3):
                    yield f"{scheduler}/g{guidance:g}/{'device' if io_binding else 'host'}/b{batch}", (
                        scheduler, guidance, io_binding, batch)


def draw(pipes, scheduler: str, guidance: float, io_binding: bool, batch: int) -> dict[str, str]:
    last = []
    result = pipes[io_binding](list(PROMPTS[:batch]), seed=[7 + i for i in range(batch)], num_inference_steps=4,
                               scheduler=scheduler, guidance_scale=guidance,
                               callback=lambda i, n, x: last.append(np.array(x, copy=True)) if i == n - 1 else None)
    pixels = b"".join(np.asarray(im, np.uint8).tobytes() for im in result.images)
    return {"images": hashlib.sha256(pixels).hexdigest(),
            "latents": hashlib.sha256(np.ascontiguousarray(last[-1], np.float32).tobytes()).hexdigest()}


def versions() -> dict[str, str]:
    import onnxruntime

    from ortdiffusion.runtime.manifest import load_manifest
    from ortdiffusion.models import builtin_bundle

    return {"onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "cpu": cpu_model(),
            "model": load_manifest(builtin_bundle()).bundle_sha256[:16]}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def baseline_on_this_machine(tmp: Path) -> dict:
    """The hashes the commit before the redesign draws here: its tree from git, recorded there."""
    tree = tmp / "before"
    tree.mkdir()
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", BEFORE], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"hashes recorded on another machine, and the commit {BEFORE} is not in git here to redraw them: {e}")
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    # The same model on both sides: the built-in model is retrained now and then, the loop is not.
    from ortdiffusion.models import builtin_bundle

    shutil.rmtree(tree / "ortdiffusion" / "builtin" / "bundle")
    shutil.copytree(builtin_bundle(), tree / "ortdiffusion" / "builtin" / "bundle")
    env = {"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin", "HOME": str(tmp)}
    import os

    env = {**os.environ, **env}
    subprocess.run([sys.executable, "tests/test_loop_identity.py", "--record"], cwd=tree, env=env, check=True,
                   capture_output=True, timeout=900)
    return json.loads((tree / "tests" / "data" / "loop_hashes.json").read_text())


def load_pipelines():
    from ortdiffusion import Pipeline
    from ortdiffusion.models import builtin_bundle

    return {b: Pipeline.load(builtin_bundle(), providers="cpu", intra_op_threads=1, io_binding=b) for b in (False, True)}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    data = json.loads(HASHES.read_text())
    if data["versions"] != versions():  # recorded elsewhere: draw the baseline here
        data = baseline_on_this_machine(tmp_path_factory.mktemp("loop-identity"))
    return data


@pytest.fixture(scope="module")
def pipes():
    return load_pipelines()


@pytest.mark.parametrize("case", [c for c, _ in cases()])
def test_images_are_bit_identical_to_before_the_redesign(recorded, pipes, case):
    args = dict(cases())[case]
    assert draw(pipes, *args) == recorded["cases"][case]


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    pipes = load_pipelines()
    HASHES.write_text(json.dumps({"versions": versions(),
                                  "cases": {c: draw(pipes, *args) for c, args in cases()}}, indent=1) + "\n")
    print(HASHES)


if __name__ == "__main__" and sys.argv[1:] == ["--record-baseline"]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        baseline = baseline_on_this_machine(Path(tmp))
    HASHES.write_text(json.dumps({"versions": versions(), "cases": baseline["cases"]}, indent=1) + "\n")
    print(HASHES)
