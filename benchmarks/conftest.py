"""Benchmarks of the components and the pipeline on the `tiny` preset (pytest-benchmark).

    python -m pytest benchmarks/                      # full: calibrated rounds
    python -m pytest benchmarks/ --benchmark-min-rounds=1 --benchmark-max-time=0.05   # CI's smoke run

Speed is measured here, never asserted in tests/. `ortdiffusion bench` is the tool for comparing
engines; these track the engine's own parts over time.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def bundle(tmp_path_factory):
    from ortdiffusion.export.bundle import export_checkpoint
    from ortdiffusion.export.presets import build_checkpoint

    ckpt = build_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny")
    out = tmp_path_factory.mktemp("bundle") / "tiny"
    export_checkpoint(ckpt, out)
    return out


@pytest.fixture(scope="session")
def pipe(bundle):
    from ortdiffusion import Pipeline

    return Pipeline.load(bundle, providers="cpu")
