"""The newcomer's path (issue 24): every mistake gets a clear answer early, one resolver for model
names, missing extras named. Each test runs the command line as a user does, in a subprocess, on the
built-in model (no export, no torch), so the file runs in well under a minute."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from ortdiffusion.models import builtin_bundle

ROOT = Path(__file__).resolve().parents[1]

BLOCKER = """
import os, sys
for name in os.environ.get("ORTDIFFUSION_TEST_BLOCK", "").split(","):
    if name:
        sys.modules[name] = None  # `import name` now fails as if it were not installed
"""


def cli(*args, block: str = "", cache: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`ortdiffusion ARGS` in a subprocess; `block`: modules to make look uninstalled (a sitecustomize
    on PYTHONPATH, as a runtime-only or torch-less install would be)."""
    env = dict(os.environ)
    paths = [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if block:
        blocker = (cache or Path(os.environ.get("TMPDIR", "/tmp"))) / "blocker"
        blocker.mkdir(parents=True, exist_ok=True)
        (blocker / "sitecustomize.py").write_text(BLOCKER)
        paths.insert(0, str(blocker))
        env["ORTDIFFUSION_TEST_BLOCK"] = block
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if cache is not None:
        env["ORTDIFFUSION_CACHE"] = str(cache)
    return subprocess.run([sys.executable, "-m", "ortdiffusion.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def one_clear_line(proc: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


# -- 3. one resolver --------------------------------------------------------------------------------


def test_pipeline_load_takes_a_model_name_without_importing_torch():
    code = """
import sys
from ortdiffusion import Pipeline
from ortdiffusion.runtime.errors import BundleError
pipe = Pipeline.load("builtin", providers="cpu")
try:
    Pipeline.load("no-such-model")
except BundleError as e:
    print("refused:", e)
print(pipe.bundle_dir.name, "torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert out.splitlines()[-1] == "bundle False"
    assert "refused: no-such-model" in out and "'builtin', a preset (tiny, sd15-arch, sd21-arch, sd-turbo-arch, sdxl-arch" in out


def test_info_takes_builtin_and_its_json_is_pure_json():
    proc = cli("info", "builtin")
    assert proc.returncode == 0 and "pipeline      " in proc.stdout and str(builtin_bundle()) in proc.stdout
    doc = json.loads(cli("info", "builtin", "--json").stdout)  # nothing before or after the document
    assert doc["bundle"] == str(builtin_bundle()) and "cpu" in doc["available_providers"]
    assert set(doc["manifest"]["components"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}


def test_info_json_into_a_closed_pipe_ends_quietly():
    """`ortdiffusion info --json | head -1`: the reader goes away; no BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "ortdiffusion.cli", "info", "builtin", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    proc.stdout.close()  # before it writes anything
    stderr = proc.stderr.read()
    proc.wait(60)
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    assert proc.returncode in (0, 141)


def test_export_takes_builtin(tmp_path):
    """`export builtin OUT` exports the shipped checkpoint (before: 'builtin: not a directory')."""
    pytest.importorskip("torch")
    proc = cli("export", "builtin", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    exported = json.loads((tmp_path / "out" / "manifest.json").read_text())
    shipped = json.loads((builtin_bundle() / "manifest.json").read_text())
    assert exported["source"]["weights_sha256"] == shipped["source"]["weights_sha256"]


def test_an_unknown_model_lists_what_a_model_can_be(tmp_path):
    proc = cli("generate", "a red circle", "--model", "sd-turbo", "-o", tmp_path / "x.png")
    one_clear_line(proc, 1, "sd-turbo", "builtin", "tiny")


# -- 4. output paths, before any compute ------------------------------------------------------------


@pytest.mark.parametrize("target, fragments", [
    ("missing/x.png", ("does not exist", "mkdir -p")),
    (".", ("is a directory",)),
    ("x.gif", ("suffix .gif", ".png, .jpg/.jpeg or .webp")),
])
def test_a_bad_output_path_is_refused_before_the_model_loads(tmp_path, target, fragments):
    out = tmp_path / target if target != "." else tmp_path
    start = time.perf_counter()
    proc = cli("generate", "a red circle", "-o", out, "-v")
    one_clear_line(proc, 2, "-o:", *fragments)
    assert "loaded" not in proc.stderr  # Pipeline.load logs "loaded …" at -v: it never ran
    assert time.perf_counter() - start < 30
    assert list(tmp_path.iterdir()) in ([], [tmp_path / "blocker"])


def test_an_unwritable_output_directory_is_refused_before_the_model_loads():
    # /proc refuses new files even to root (a read-only mount answers the same way: EROFS)
    proc = cli("generate", "a red circle", "-o", "/proc/ortdiffusion-test.png", "-v")
    one_clear_line(proc, 2, "-o:", "cannot write in '/proc'")
    assert "loaded" not in proc.stderr


@pytest.mark.parametrize("name, fmt", [("pic.jpg", "JPEG"), ("pic.jpeg", "JPEG"), ("pic.webp", "WEBP"), ("pic.png", "PNG")])
def test_the_output_suffix_names_the_format(tmp_path, name, fmt):
    from ortdiffusion.runtime.png import read_png_metadata

    proc = cli("generate", "a red circle on the left", "--steps", "2", "--seed", "3", "-q", "-o", tmp_path / name)
    assert proc.returncode == 0, proc.stderr
    with Image.open(tmp_path / name) as image:
        assert image.format == fmt and image.size == (64, 64)
    assert read_png_metadata(tmp_path / name)["seed"] == "3"


# -- 10. errors name the flag, before the load; fallback; one steps limit; empty prompt -------------


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps: must be from 1 to 150"),
    (["--steps", "151"], "--steps: must be from 1 to 150"),
    (["--guidance", "nan"], "--guidance: must be a finite number"),
    (["--num-images", "0"], "--num-images: must be from 1 to 32"),
    (["--size", "60x64"], "--size: width must be a multiple of 16"),
])
def test_errors_name_the_flag_typed_and_come_before_the_load(tmp_path, args, message):
    proc = cli("generate", "a red circle", "-o", tmp_path / "x.png", "-v", *args)
    line = one_clear_line(proc, 2, message)
    assert "num_inference_steps" not in line and "guidance_scale" not in line
    assert "loaded" not in proc.stderr


def test_the_steps_limit_is_one_number_for_the_cli_api_and_service():
    from ortdiffusion import Pipeline
    from ortdiffusion.runtime.errors import InvalidRequestError
    from ortdiffusion.runtime.request import MAX_STEPS

    assert MAX_STEPS == 150
    with pytest.raises(InvalidRequestError, match="num_inference_steps: must be from 1 to 150"):
        Pipeline.load("builtin")("a red circle", num_inference_steps=151)


def test_an_empty_prompt_is_refused_the_same_in_the_cli_and_the_python_api(tmp_path):
    from ortdiffusion import Pipeline
    from ortdiffusion.runtime.errors import InvalidRequestError

    one_clear_line(cli("generate", "  ", "-o", tmp_path / "x.png"), 2, "prompt: is empty")
    pipe = Pipeline.load("builtin")
    for prompt, field in (("", "prompt"), ([" ", "a red circle"], r"prompt\[0\]")):
        with pytest.raises(InvalidRequestError, match=f"{field}: is empty"):
            pipe(prompt, num_inference_steps=1)
    assert pipe("a red circle", negative_prompt="", num_inference_steps=1).images  # negative prompts may be empty


def test_allow_fallback_falls_back_from_cuda_to_the_cpu(tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA: nothing to fall back from")
    refused = cli("generate", "a red circle", "--provider", "cuda", "--steps", "1", "-o", tmp_path / "a.png")
    one_clear_line(refused, 1, "cuda", "--allow-fallback")
    proc = cli("generate", "a red circle", "--provider", "cuda", "--allow-fallback", "--steps", "1", "-q",
               "-o", tmp_path / "b.png")
    assert proc.returncode == 0, proc.stderr
    assert "falling back to cpu" in proc.stderr and "unet=cpu" in proc.stdout


# -- 11. -v after the subcommand ---------------------------------------------------------------------


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_works_before_and_after_the_subcommand(tmp_path, where):
    args = ["generate", "a red circle", "--steps", "1", "-q", "-o", tmp_path / "x.png"]
    proc = cli(*(["-v", *args] if where == "before" else [*args, "-v"]))
    assert proc.returncode == 0, proc.stderr
    assert "INFO ortdiffusion.runtime.pipeline: loaded" in proc.stderr


# -- 7. the built-in model's vocabulary -------------------------------------------------------------


def test_the_shipped_vocabulary_is_the_scene_generators():
    from ortdiffusion.builtin.vocabulary import vocabulary

    shipped = json.loads((builtin_bundle() / "vocabulary.json").read_text())
    assert shipped == vocabulary()
    assert {"red", "circle", "star", "left", "above", "small"} <= set(shipped["words"])
    assert shipped["sizes"] == [[64, 64]] and shipped["max_objects"] == 2


def test_prompts_outside_the_vocabulary_warn_and_known_ones_do_not(tmp_path):
    from ortdiffusion.runtime.vocabulary import prompt_warnings

    bundle = builtin_bundle()
    assert prompt_warnings(bundle, ["a red circle on the left", "a small blue square above a yellow star"], 64, 64) == []
    (words,) = prompt_warnings(bundle, ["two red circles"], 64, 64)
    assert "'two', 'circles'" in words and "one or two objects" in words
    (size,) = prompt_warnings(bundle, ["a red circle"], 128, 128)
    assert "trained at 64x64 only" in size and "128x128" in size
    assert prompt_warnings(tmp_path, ["two red circles"], 128, 128) == []  # a bundle without a vocabulary


def test_generate_warns_outside_the_vocabulary(tmp_path):
    proc = cli("generate", "two red circles", "--size", "128x128", "--steps", "1", "-q", "-o", tmp_path / "x.png")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "'two', 'circles'" in warnings[0] and "64x64" in warnings[1]
    quiet = cli("generate", "a red circle on the left", "--steps", "1", "-q", "-o", tmp_path / "y.png")
    assert "warning" not in quiet.stderr


# -- 6. missing extras name the extra, before any work ----------------------------------------------


@pytest.mark.parametrize("args", [
    ("generate", "a red circle", "--model", "tiny"),
    ("info", "tiny"),
    ("export", "builtin", "OUT"),
    ("compare", "builtin"),
])
def test_without_torch_the_export_extra_is_named_before_any_work(tmp_path, args):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    start = time.perf_counter()
    if args[0] == "generate":
        args += ["-o", str(tmp_path / "x.png")]
    proc = cli(*args, block="torch", cache=tmp_path)  # a fresh cache: `tiny` is neither built nor exported yet
    one_clear_line(proc, 1, "pip install 'ortdiffusion[export]'", "torch")
    assert time.perf_counter() - start < 60
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.png").exists()


def test_without_onnxruntime_the_cpu_extra_is_named(tmp_path):
    proc = cli("generate", "a red circle", "-o", tmp_path / "x.png", block="onnxruntime", cache=tmp_path)
    one_clear_line(proc, 1, "pip install 'ortdiffusion[cpu]'")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "blocker"), str(ROOT)]),
           "ORTDIFFUSION_TEST_BLOCK": "onnxruntime"}
    api = subprocess.run([sys.executable, "-c", "from ortdiffusion import Pipeline; Pipeline.load('builtin')"],
                         capture_output=True, text=True, env=env)
    assert api.returncode == 1 and "pip install 'ortdiffusion[cpu]'" in api.stderr


# -- 5, 11. bench in a runtime-only install ----------------------------------------------------------


def test_bench_with_every_engine_skipped_says_so_without_a_traceback(tmp_path):
    proc = cli("bench", "--model", "builtin", "--engines", "torch,optimum", "--runs", "1", "--steps", "1",
               block="torch", cache=tmp_path)
    one_clear_line(proc, 1, "no engine could run here")
    assert "ZeroDivisionError" not in proc.stderr and "torch on builtin skipped" in proc.stdout
    assert "pip install 'ortdiffusion[export]'" in proc.stdout


def test_bench_plot_without_matplotlib_is_refused_before_the_run(tmp_path):
    start = time.perf_counter()
    proc = cli("bench", "--model", "builtin", "--engines", "ortdiffusion", "--plot", tmp_path / "p.png",
               block="matplotlib", cache=tmp_path)
    one_clear_line(proc, 1, "matplotlib", "pip install 'ortdiffusion[bench]'")
    assert "run 1/" not in proc.stderr and time.perf_counter() - start < 20


def test_bench_says_which_bundle_it_used_and_where_exports_are_cached(tmp_path):
    proc = cli("bench", "--model", "builtin", "--engines", "ortdiffusion", "--runs", "2", "--warmup", "0", "--steps", "1",
               "--json", tmp_path / "b.json", cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    assert f"builtin: ortdiffusion used the bundle {builtin_bundle()}" in proc.stderr
    assert f"exports are cached in {tmp_path / 'cache' / 'bundles'}" in proc.stderr
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["exports"] == [{"engine": "ortdiffusion", "model": "builtin", "bundle": str(builtin_bundle())}]
    (record,) = report["records"]
    assert set(record["spread_s"]) == {"min", "max", "range", "relative"} and record["machine_load"]["load_1min"] >= 0
    assert "machine load (1 min)" in proc.stdout
