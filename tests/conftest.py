"""Shared fixtures: a tiny random-weight checkpoint built from configs, exported once per session.

Nothing downloads: the checkpoint comes from `ortdiffusion.export.presets`' `tiny` configs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ortdiffusion.runtime.quality import psnr  # noqa: F401  (the tests' `from conftest import psnr`)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from ortdiffusion.export.presets import build_checkpoint

    return build_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    from ortdiffusion.export.bundle import export_checkpoint

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_checkpoint(tiny_checkpoint, out)
    return out


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_bundle):
    from ortdiffusion import Pipeline

    return Pipeline.load(tiny_bundle, providers="cpu")


@pytest.fixture(scope="session")
def reference_pipeline(tiny_checkpoint):
    """diffusers' own StableDiffusionPipeline on the same checkpoint: the reference for parity."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_checkpoint), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture()
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    """A private copy of the tiny bundle that a test may damage."""
    import shutil

    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where ONNX Runtime offers the CUDA provider."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and onnxruntime-gpu (CUDAExecutionProvider not available)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
