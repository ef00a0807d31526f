"""The runtime never imports torch, diffusers or transformers (DESIGN.md)."""

from __future__ import annotations

import subprocess
import sys


def test_runtime_and_generation_import_no_torch(tiny_bundle):
    code = f"""
import sys
import ortdiffusion, ortdiffusion.runtime, ortdiffusion.cli, ortdiffusion.models
from ortdiffusion import Pipeline
Pipeline.load({str(tiny_bundle)!r})("a red circle", num_inference_steps=2, seed=0)
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers', 'onnx'))
print(heavy)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
