"""Export of a checkpoint into a bundle: atomic, refusing what it cannot export, naming what is missing."""

from __future__ import annotations

import json
import shutil

import pytest

from ortdiffusion.export.bundle import (
    ExportOptions,
    export_checkpoint,
)
from ortdiffusion.runtime.errors import BundleError, ExportError


def test_failed_parity_leaves_nothing_behind(tiny_checkpoint, tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(ExportError, match=r"text_encoder: parity failed .* relative L2 error .* exceeds 0"):
        export_checkpoint(tiny_checkpoint, out, ExportOptions(parity_tolerance=0.0))
    assert list(tmp_path.iterdir()) == [], "neither the bundle nor its temporary directory remain"


def test_existing_output_is_refused_then_replaced_on_request(tiny_checkpoint, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="already exists"):
        export_checkpoint(tiny_checkpoint, out)
    assert (out / "keep.txt").exists()
    export_checkpoint(tiny_checkpoint, out, ExportOptions(overwrite=True))
    assert (out / "manifest.json").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


@pytest.mark.parametrize("component", ["unet", "tokenizer", "scheduler"])
def test_checkpoint_missing_a_component_is_named(tiny_checkpoint, tmp_path, component):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    shutil.rmtree(ckpt / component)
    with pytest.raises(BundleError, match=rf"{component}: missing"):
        export_checkpoint(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_another_pipeline_is_refused(tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    index = json.loads((ckpt / "model_index.json").read_text())
    (ckpt / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(BundleError, match="FluxPipeline.*not supported"):
        export_checkpoint(ckpt, tmp_path / "out")
