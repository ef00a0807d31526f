"""OpenVINO GenAI as a bench engine (bench/openvino_engine.py): skipped with its reason where its
environment is not given; run for real where it is (ORTDIFFUSION_OPENVINO_PYTHON names the python
of an environment made as docs/benchmarks.md says — CI has none, so that test skips there)."""

from __future__ import annotations

import json
import os

import pytest
from test_cli import run


def test_openvino_without_its_environment_is_skipped_with_how_to_get_it(tmp_path):
    out = tmp_path / "bench.json"
    proc = run("bench", "--model", "tiny", "--engines", "openvino", "--steps", "2", "--runs", "1", "--warmup", "0",
               "--json", out, check=False, cache=tmp_path / "cache")
    assert proc.returncode == 1 and "no engine could run here" in proc.stderr
    report = json.loads(out.read_text())
    (skip,) = report["skipped"]
    assert skip["engine"] == "openvino" and "--openvino-python" in skip["reason"]
    assert not (tmp_path / "cache" / "openvino").exists()  # nothing half-made


def test_the_openvino_engines_are_listed_and_validated(tmp_path):
    proc = run("bench", "--help")
    assert "--openvino-python" in proc.stdout and "openvino-int8" in proc.stdout
    proc = run("bench", "--engines", "openvino-fp8", check=False, cache=tmp_path / "cache")
    assert proc.returncode == 2 and "openvino-bf16" in proc.stderr


@pytest.mark.skipif(not os.environ.get("ORTDIFFUSION_OPENVINO_PYTHON"),
                    reason="ORTDIFFUSION_OPENVINO_PYTHON names no OpenVINO environment (docs/benchmarks.md)")
def test_openvino_runs_beside_ours_with_its_stages_and_precision(tmp_path):
    out = tmp_path / "bench.json"
    run("bench", "--model", "tiny", "--engines", "ortdiffusion,openvino,openvino-int8,openvino-bf16", "--steps", "3",
        "--runs", "1", "--openvino-python", os.environ["ORTDIFFUSION_OPENVINO_PYTHON"], "--json", out,
        cache=tmp_path / "cache")
    report = json.loads(out.read_text())
    assert not report["skipped"], report["skipped"]
    records = {r["engine"]: r for r in report["records"]}
    precisions = {e: r["precision"] for e, r in records.items()}
    # bf16 where the CPU has it; otherwise OpenVINO computes f32 and the record says so
    assert precisions.pop("openvino-bf16") in ("bf16", "fp32 (no bf16 on this CPU)")
    assert precisions == {"ortdiffusion": "fp32", "openvino": "fp32", "openvino-int8": "int8-weights"}
    for engine in ("openvino", "openvino-int8", "openvino-bf16"):
        r = records[engine]
        assert r["scheduler"] == "ddim" and r["providers"]["unet"] == "cpu"
        # GenAI's own metrics: one UNet inference per step (guidance batches both halves in one)
        assert r["stages_s"]["unet_step"]["runs"] == 3
        assert 0 < r["stages_s"]["decoder"]["p50"] < r["end_to_end_s"]["p50"]
