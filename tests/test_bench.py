"""`ortdiffusion bench` writes the records the issue names, engines side by side."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from test_cli import run

STAGES = {"tokenize", "text_encoder", "unet_step", "scheduler", "decoder", "png_encode"}


def test_bench_records_ours_and_torch_with_stages_memory_and_env(tmp_path):
    out = tmp_path / "bench.json"
    proc = run("bench", "--model", "tiny", "--engines", "ortdiffusion,ortdiffusion-int8,torch,optimum", "--batch", "1,2",
               "--steps", "3", "--runs", "2", "--json", out, "--plot", tmp_path / "bench.png",
               "--markdown", tmp_path / "bench.md", cache=tmp_path / "cache")
    assert "| tiny | ortdiffusion | cpu | fp32 | ddim | 1 | 64x64 | 3 |" in proc.stdout
    report = json.loads(out.read_text())
    assert {"cpu", "cores", "packages"} <= set(report["env"])
    engines = {(r["engine"], r["batch"]) for r in report["records"]}
    assert engines == {(e, b) for e in ("ortdiffusion", "ortdiffusion-int8", "torch") for b in (1, 2)}
    assert report["env"]["fp32_matmul_gflops"] > 1
    precisions = {r["engine"]: r["precision"] for r in report["records"]}
    assert precisions == {"ortdiffusion": "fp32", "ortdiffusion-int8": "int8", "torch": "fp32"}
    for r in report["records"]:
        assert r["scheduler"] == "ddim"  # the tiny checkpoint's own, run by every engine
        assert {"engine", "model", "providers", "precision", "batch", "width", "height", "steps", "end_to_end_s",
                "stages_s", "cold_start_s", "images_per_s", "peak_host_mb", "peak_device_mb"} <= set(r)
        assert set(r["end_to_end_s"]) == {"p50", "p90", "p99", "mean", "runs"} and r["end_to_end_s"]["runs"] == 2
        assert STAGES <= set(r["stages_s"]) and r["stages_s"]["unet_step"]["runs"] == 2 * 3 * 1
        assert r["peak_host_mb"] > 50 and r["peak_device_mb"] is None
        assert (r["cold_start_s"] is not None) == (r["batch"] == 1)
        # FLOPs counted by torch for the setting; the rate and the share outside the networks
        assert r["unet_step_gflop"] > 0 and 0 < r["unet_fraction_of_matmul_rate"] < 5
        assert 0 <= r["outside_networks_fraction"] < 1
        # ours counts host<->device crossings (the host loop on the CPU: 4 per UNet step); torch does not
        if r["engine"] == "torch":
            assert r["transfers"] is None
        else:
            assert r["transfers"]["in_loop"] == 4 * 3
    # optimum is not installed in the test environment: said so, not faked
    assert report["skipped"] and report["skipped"][0]["engine"] == "optimum"
    assert Image.open(tmp_path / "bench.png").size[0] > 500


def test_bench_refuses_an_unknown_engine(tmp_path):
    proc = run("bench", "--engines", "ortdiffusion,tensorflow", check=False, cache=tmp_path / "cache")
    assert proc.returncode == 2 and "engines" in proc.stderr and "tensorflow" in proc.stderr


def test_our_worker_never_imports_torch(tiny_bundle):
    """Our engine's peak host memory is its own: asking for GPU memory must not import torch (that
    alone is ~190 MB resident, and it used to land in our peak)."""
    import subprocess
    import sys

    code = f"""
import sys
from ortdiffusion.bench.worker import OrtDiffusionEngine, peak_device_mb
from ortdiffusion.runtime.pipeline import Pipeline
engine = OrtDiffusionEngine.__new__(OrtDiffusionEngine)
engine.cuda_graphs, engine.scheduler = False, None
engine.pipe = Pipeline.load({str(tiny_bundle)!r}, providers="cpu")
engine.providers = engine.pipe.providers
engine.run(1, 64, 64, 2, 3.0)
print(peak_device_mb(engine), "torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "False"], out.stdout


def test_our_worker_measures_a_checkpoint_without_exporting_it_or_importing_torch(tiny_checkpoint, tmp_path):
    """A checkpoint is exported by `prepare` in a process of its own before its worker starts: the
    worker only looks the cached bundle up (torch-free), so neither the export's peak nor torch's
    ~190 MB lands in our engine's memory record or cold start."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "ORTDIFFUSION_CACHE": str(tmp_path / "cache")}
    code = f"""
import sys
from ortdiffusion.bench.worker import OrtDiffusionEngine
from ortdiffusion.runtime.errors import BundleError
try:
    OrtDiffusionEngine({str(tiny_checkpoint)!r}, "cpu", variant="ortdiffusion-cpu")
except BundleError as e:
    print("refused:", "export it first" in str(e))
else:
    engine = OrtDiffusionEngine({str(tiny_checkpoint)!r}, "cpu", variant="ortdiffusion-cpu")
    engine.run(1, 64, 64, 2, 3.0)
    print("torch imported:", "torch" in sys.modules)
"""
    before = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert before.stdout.split() == ["refused:", "True"], before.stdout + before.stderr
    prepared = subprocess.run([sys.executable, "-m", "ortdiffusion.bench.worker", "ortdiffusion-cpu",
                               str(tiny_checkpoint), "--prepare"], capture_output=True, text=True, check=True, env=env)
    assert json.loads(prepared.stdout)["prepared"].startswith(str(tmp_path / "cache"))
    after = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert after.stdout.split() == ["torch", "imported:", "False"], after.stdout + after.stderr


def test_flop_count_includes_attention_on_the_cpu():
    """torch's FlopCounterMode has no formula for SDPA's CPU kernel: the UNet's attention went
    uncounted on the CPU (678 of 804 GFLOP a step for SD 2.1 at 512×512)."""
    torch = pytest.importorskip("torch")
    from ortdiffusion.bench.diffusers_engines import flop_counter

    b, h, s, d = 1, 2, 64, 8
    q, k, v = (torch.randn(b, h, s, d) for _ in range(3))
    counter = flop_counter()
    with torch.no_grad(), counter:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == 2 * (2 * b * h * s * s * d)  # q·kᵀ and its product with v


def test_cuda_graph_engine_loads_one_bucket_per_setting(tiny_bundle):
    """`ortdiffusion-cuda-graphs` runs each setting with that setting's CUDA-graph bucket (on the CPU
    provider here: the same static-shape sessions and buffers, without the capture)."""
    from ortdiffusion.bench.worker import OrtDiffusionEngine

    engine = OrtDiffusionEngine.__new__(OrtDiffusionEngine)
    engine.bundle, engine.provider, engine.cuda_graphs = tiny_bundle, "cpu", True
    engine.pipe, engine.scheduler = None, None
    first = engine.run(1, 64, 64, 2, 3.0)
    pipe = engine.pipe
    assert pipe.device_loop.graphs.sizes == ((1, 64, 64),) and pipe.device_loop.graphs.built == 1
    assert first.transfers["in_loop"] == 0
    engine.run(1, 64, 64, 2, 3.0)
    assert engine.pipe is pipe and pipe.device_loop.graphs.built == 1  # same setting: same graph
    engine.run(2, 64, 64, 2, 3.0)
    assert engine.pipe.device_loop.graphs.sizes == ((2, 64, 64),)


def test_gpu_records_get_a_gpu_memory_column_and_no_cpu_rate_fraction():
    from ortdiffusion.bench.records import Record, Report, Stats
    from ortdiffusion.bench.report import markdown
    from ortdiffusion.bench.runner import add_compute_rates

    def record(engine, providers, device_mb):
        return Record(engine=engine, model="sd15-arch", providers={"unet": providers}, precision="fp16", batch=1,
                      width=512, height=512, steps=30, end_to_end_s=Stats(1.5, 1.6, 1.6, 1.5, 30),
                      stages_s={"unet_step": Stats(0.05, 0.05, 0.05, 0.05, 30)}, images_per_s=0.66, cold_start_s=9.0,
                      peak_host_mb=3000.0, peak_device_mb=device_mb, outside_networks_fraction=0.01,
                      unet_step_gflop=1358.0)

    records = [record("ortdiffusion-cuda", "cuda", 4100.0), record("torch", "cuda", None)]
    add_compute_rates(records, matmul=200.0)
    assert records[0].unet_gflops_per_s == 1358.0 / 0.05 and records[0].unet_fraction_of_matmul_rate is None
    text = markdown(Report(env={"fp32_matmul_gflops": 200.0}, plan={}, records=records))
    assert text.splitlines()[0].endswith("| peak host MB | peak GPU MB |")
    assert "| 27160 | 1.0% |" in text and text.splitlines()[2].endswith("| 3000 | 4100 |")
    assert text.splitlines()[3].endswith("| 3000 | – |")


def test_an_engine_that_cannot_load_is_skipped_with_its_reason(tmp_path):
    """Without a GPU, the CUDA-target engine cannot be exported here: the report says why, it does not crash."""
    import pytest

    from ortdiffusion.runtime.providers import ProviderKind, available_providers

    if ProviderKind.CUDA in available_providers():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "bench.json"
    run("bench", "--model", "tiny", "--engines", "ortdiffusion,ortdiffusion-cuda", "--steps", "2", "--runs", "1",
        "--warmup", "0", "--json", out, cache=tmp_path / "cache")
    report = json.loads(out.read_text())
    assert [r["engine"] for r in report["records"]] == ["ortdiffusion"]
    (skip,) = report["skipped"]
    assert skip["engine"] == "ortdiffusion-cuda"
    assert "could not export: ExportError: target cuda" in skip["reason"] and "CUDAExecutionProvider" in skip["reason"]


def test_every_engine_runs_the_scheduler_ours_runs(tiny_checkpoint, tmp_path):
    """A PNDM checkpoint (Stable Diffusion 1.5's own) left as it is makes diffusers call the UNet
    once more than its step count; ours runs DDIM for it. The bench gives torch the same DDIM, so
    both do the same work: as many UNet calls as steps, and the records say which scheduler ran."""
    import shutil

    checkpoint = tmp_path / "pndm"
    shutil.copytree(tiny_checkpoint, checkpoint)
    index = json.loads((checkpoint / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "PNDMScheduler"]
    (checkpoint / "model_index.json").write_text(json.dumps(index))
    config_path = checkpoint / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    (config_path).write_text(json.dumps({**config, "_class_name": "PNDMScheduler", "skip_prk_steps": True}))
    out = tmp_path / "bench.json"
    proc = run("bench", "--model", checkpoint, "--engines", "ortdiffusion,torch", "--steps", "3", "--runs", "1",
               "--warmup", "0", "--json", out, cache=tmp_path / "cache")
    report = json.loads(out.read_text())
    calls = {r["engine"]: (r["scheduler"], r["stages_s"]["unet_step"]["runs"]) for r in report["records"]}
    assert calls == {"ortdiffusion": ("ddim", 3), "torch": ("ddim", 3)}
    assert "| fp32 | ddim | 1 |" in proc.stdout


def test_bench_refuses_an_unknown_scheduler(tmp_path):
    proc = run("bench", "--scheduler", "pndm", check=False, cache=tmp_path / "cache")
    assert proc.returncode == 2 and "scheduler" in proc.stderr and "euler" in proc.stderr


def test_serve_png_benchmark_refuses_a_tree_that_is_not_label_and_checkout(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_png.py"
    for bad in ("before", f"before={tmp_path}"):
        proc = subprocess.run([sys.executable, script, "--tree", bad, "--out", tmp_path / "x.json"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "--tree" in proc.stderr and "LABEL=PATH" in proc.stderr, proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_a_comparison_whose_spread_exceeds_the_difference_is_marked_within_noise():
    """One loaded run of torch ranged 6.9–43.6 s: its p50 against ours said nothing, and nothing said so."""
    from ortdiffusion.bench.records import Record, Report, Spread, Stats
    from ortdiffusion.bench.report import markdown
    from ortdiffusion.bench.runner import comparisons

    def rec(engine, runs):
        return Record(engine=engine, model="m", batch=1, width=64, height=64, steps=20, providers={}, precision="fp32",
                      end_to_end_s=Stats.of(runs), spread_s=Spread.of(runs), images_per_s=1.0, peak_host_mb=1.0)

    quiet = [rec("ortdiffusion", [1.00, 1.01, 1.02]), rec("torch", [2.00, 2.01, 2.02])]
    noisy = [rec("ortdiffusion", [1.00, 1.01, 1.02]), rec("torch", [0.9, 1.2, 6.0])]
    (q,) = comparisons(quiet)
    (n,) = comparisons(noisy)
    assert not q.within_noise and q.ratio == pytest.approx(2.01 / 1.01)
    assert n.within_noise and n.spread_s == pytest.approx(5.1)
    env = {"fp32_matmul_gflops": 1, "cores": 2, "machine_load": {"start": {"load_1min": 3.0, "per_core": 1.5},
                                                                 "end": {"load_1min": 2.5, "per_core": 1.25}}}
    table = markdown(Report(env=env, plan={}, records=noisy, comparisons=[n]))
    assert "WITHIN NOISE" in table and "noisy: torch 64x64 batch 1 ranged 0.900–6.000 s" in table
    assert "busier than its cores" in table


@pytest.mark.parametrize("task", ["image-to-image", "inpainting"])
def test_bench_runs_the_image_tasks_against_diffusers_own_pipelines(tmp_path, task):
    """Ours and diffusers' img2img / inpainting pipelines on the same input image, mask and strength;
    the image encoder is a stage of its own and its share of the run is in the record."""
    out = tmp_path / "bench.json"
    proc = run("bench", "--model", "tiny", "--engines", "ortdiffusion,torch", "--task", task, "--steps", "4",
               "--runs", "1", "--warmup", "0", "--json", out, cache=tmp_path / "cache")
    report = json.loads(out.read_text())
    assert report["plan"]["task"] == task
    assert [r["engine"] for r in report["records"]] == ["ortdiffusion", "torch"]
    for r in report["records"]:
        assert r["task"] == task and 0 < r["image_encoder_fraction"] < 1
        assert r["stages_s"]["image_encoder"]["runs"] == 1
        # img2img at strength 0.8 runs int(4 × 0.8) = 3 of the 4 steps; inpainting at 1 all of them
        assert r["stages_s"]["unet_step"]["runs"] == (3 if task == "image-to-image" else 4)
    assert "the image encoder took" in proc.stdout


def test_bench_times_the_tiny_decoder_against_diffusers_with_the_same(tmp_path):
    """VAE against tiny decoder, ours and diffusers' (`pipe.vae = AutoencoderTiny`), same run: the
    preset's checkpoint carries an AutoencoderTiny, which its bundles get at export."""
    out = tmp_path / "bench.json"
    run("bench", "--model", "tiny", "--engines", "ortdiffusion,ortdiffusion-tiny,torch,torch-tiny", "--steps", "2",
        "--runs", "1", "--warmup", "0", "--json", out, cache=tmp_path / "cache")
    records = {r["engine"]: r for r in json.loads(out.read_text())["records"]}
    assert set(records) == {"ortdiffusion", "ortdiffusion-tiny", "torch", "torch-tiny"}
    assert records["ortdiffusion-tiny"]["providers"]["vae_decoder_tiny"] == "cpu"
    for r in records.values():
        assert r["stages_s"]["decoder"]["runs"] == 1


def test_torch_compile_engine_compiles_unet_and_decode_with_the_gpu_users_mode(tiny_checkpoint):
    """The engine a GPU user picks over eager: the UNet and the VAE's decode compiled (lazily: the
    first run compiles, inside the cold start), max-autotune on CUDA, the default mode on a CPU;
    FLOPs counted on the eager UNet. (A CPU run compiles for minutes: measured by the bench, not here.)"""
    import torch

    from ortdiffusion.bench.diffusers_engines import TorchEngine

    engine = TorchEngine(str(tiny_checkpoint), "cpu", compile_unet=True)
    assert engine.name == "torch-compile" and engine.compile_mode == "default"
    assert isinstance(engine.pipe.unet, torch._dynamo.eval_frame.OptimizedModule)
    assert not isinstance(engine.eager_unet, torch._dynamo.eval_frame.OptimizedModule)
    proc = run("bench", "--help")
    assert "torch-compile" in proc.stdout


@pytest.mark.gpu
def test_torch_compile_runs_on_the_gpu_in_max_autotune(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    out = tmp_path / "bench.json"
    run("bench", "--model", "tiny", "--engines", "torch-compile", "--provider", "cuda", "--steps", "2", "--runs", "1",
        "--json", out, cache=tmp_path / "cache")
    (record,) = json.loads(out.read_text())["records"]
    assert record["engine"] == "torch-compile" and record["precision"] == "fp16" and record["providers"]["unet"] == "cuda"
