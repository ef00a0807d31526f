"""The denoising loop computes bit for bit what it computed before the runtime redesign (issue 23).

`tests/data/loop_hashes.json` holds the sha256 of the images (uint8) and of the final latents that
the pipeline drew on the commit before the redesign, for every scheduler × {guided, unguided} ×
{host loop, device loop (IO binding) on the CPU provider} × batch {1, 3}, on the built-in bundle.
Regenerate them only on purpose: `python tests/test_loop_identity.py --record`.

ONNX Runtime's kernels may round differently on another version or another instruction set, so
the hashes are compared only where the recorded onnxruntime and numpy versions are the ones
installed; elsewhere the test says why it skips.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

HASHES = Path(__file__).resolve().parent / "data" / "loop_hashes.json"
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

    return {"onnxruntime": onnxruntime.__version__, "numpy": np.__version__}


def load_pipelines():
    from ortdiffusion import Pipeline
    from ortdiffusion.models import builtin_bundle

    return {b: Pipeline.load(builtin_bundle(), providers="cpu", intra_op_threads=1, io_binding=b) for b in (False, True)}


@pytest.fixture(scope="module")
def recorded():
    data = json.loads(HASHES.read_text())
    if data["versions"] != versions():
        pytest.skip(f"hashes recorded with {data['versions']}, this machine has {versions()}")
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
