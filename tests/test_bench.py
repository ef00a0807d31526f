"""`ortdiffusion bench` writes the records the issue names, engines side by side."""

from __future__ import annotations

import json

from PIL import Image
from test_cli import run

STAGES = {"tokenize", "text_encoder", "unet_step", "scheduler", "decoder", "png_encode"}


def test_bench_records_ours_and_torch_with_stages_memory_and_env(tmp_path):
    out = tmp_path / "bench.json"
    proc = run("bench", "--model", "tiny", "--engines", "ortdiffusion,torch,optimum", "--batch", "1,2",
               "--steps", "3", "--runs", "2", "--json", out, "--plot", tmp_path / "bench.png",
               "--markdown", tmp_path / "bench.md", cache=tmp_path / "cache")
    assert "| tiny | ortdiffusion | cpu | fp32 | 1 | 64x64 | 3 |" in proc.stdout
    report = json.loads(out.read_text())
    assert {"cpu", "cores", "packages"} <= set(report["env"])
    engines = {(r["engine"], r["batch"]) for r in report["records"]}
    assert engines == {("ortdiffusion", 1), ("ortdiffusion", 2), ("torch", 1), ("torch", 2)}
    for r in report["records"]:
        assert {"engine", "model", "providers", "precision", "batch", "width", "height", "steps", "end_to_end_s",
                "stages_s", "cold_start_s", "images_per_s", "peak_host_mb", "peak_device_mb"} <= set(r)
        assert set(r["end_to_end_s"]) == {"p50", "p90", "p99", "mean", "runs"} and r["end_to_end_s"]["runs"] == 2
        assert STAGES <= set(r["stages_s"]) and r["stages_s"]["unet_step"]["runs"] == 2 * 3 * 1
        assert r["peak_host_mb"] > 50 and r["peak_device_mb"] is None
        assert (r["cold_start_s"] is not None) == (r["batch"] == 1)
    # optimum is not installed in the test environment: said so, not faked
    assert report["skipped"] and report["skipped"][0]["engine"] == "optimum"
    assert Image.open(tmp_path / "bench.png").size[0] > 500
