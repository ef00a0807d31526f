"""The model files users already have (issue 31): a hub name in the local hub cache, a single-file
checkpoint in the original key layout, an ONNX export in Optimum's layout — each built offline from
the tiny model, resolved by the one resolver, and its images checked against diffusers (fp32,
PSNR ≥ 40 dB); the errors for a missing hub model, an unknown single-file layout and a partial ONNX
folder name the file and what is missing; `ortdiffusion cache list|prune`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import psnr

from ortdiffusion.runtime.errors import BundleError

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle on the left"
STEPS, GUIDANCE = 8, 5.0
LATENTS = np.random.default_rng(31).standard_normal((1, 4, 16, 16)).astype(np.float32)


def diffusers_image(pipe):
    import torch
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, latents=torch.from_numpy(LATENTS), num_inference_steps=STEPS, guidance_scale=GUIDANCE).images[0]


def ours_image(pipeline):
    return pipeline(PROMPT, latents=LATENTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, scheduler="ddim").images[0]


def assert_matches(ours, ref, what: str) -> None:
    assert np.asarray(ours).std() > 5, "a flat image would make the comparison meaningless"
    print(f"{what}: PSNR {psnr(ours, ref):.1f} dB")  # shown with -s
    assert psnr(ours, ref) >= 40.0, f"{what}: PSNR {psnr(ours, ref):.1f} dB"


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    """A private ortdiffusion cache and hub cache, offline."""
    monkeypatch.setenv("ORTDIFFUSION_CACHE", str(tmp_path / "ortdiffusion"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "ortdiffusion"


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_checkpoint), safety_checker=None, requires_safety_checker=False)
    return diffusers_image(pipe)


# -- hub names ------------------------------------------------------------------------------------


def test_hub_name_resolves_from_the_local_hub_cache(cache, tiny_checkpoint, tiny_bundle, tmp_path):
    from diffusers import StableDiffusionPipeline
    from hub_cache_helpers import populate_hub_cache

    from ortdiffusion import Pipeline
    from ortdiffusion.export.checkpoint import weights_sha256
    from ortdiffusion.models import find_bundle, resolve_bundle, resolve_checkpoint

    hub = tmp_path / "hf" / "hub"
    snapshot = populate_hub_cache(hub, "testorg/tiny-sd", tiny_checkpoint)
    assert resolve_checkpoint("testorg/tiny-sd") == snapshot
    # Its export is keyed by the weights' hash: the tiny bundle, put there, is found for the name.
    exported = cache / "bundles" / weights_sha256(snapshot)[:16]
    shutil.copytree(tiny_bundle, exported)
    assert resolve_bundle("testorg/tiny-sd", allow_export=False) == exported
    assert find_bundle("testorg/tiny-sd") == exported
    ref = diffusers_image(StableDiffusionPipeline.from_pretrained(
        "testorg/tiny-sd", cache_dir=str(hub), local_files_only=True, safety_checker=None, requires_safety_checker=False))
    assert_matches(ours_image(Pipeline.load("testorg/tiny-sd", providers="cpu")), ref, "hub name")
    # The runtime finds it without torch (huggingface_hub reads the cache)
    code = ("import sys; from ortdiffusion import Pipeline; Pipeline.load('testorg/tiny-sd')('a red circle', "
            "num_inference_steps=2, seed=0); print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'diffusers', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]", out.stdout


def test_a_missing_hub_model_names_the_model_and_the_cache(cache, tmp_path):
    from ortdiffusion.models import find_bundle, resolve_bundle

    for resolve in (resolve_bundle, find_bundle):
        with pytest.raises(BundleError) as e:
            resolve("testorg/absent-model")
        message = str(e.value)
        assert "testorg/absent-model" in message and str(tmp_path / "hf" / "hub") in message, message
        assert "HF_HUB_OFFLINE" in message or "not allowed" in message, message


# -- single-file checkpoints ------------------------------------------------------------------------


def test_single_file_checkpoint_exports_and_matches_diffusers(cache, tiny_checkpoint, tmp_path):
    from diffusers import StableDiffusionPipeline
    from single_file_helpers import write_single_file

    from ortdiffusion import Pipeline
    from ortdiffusion.models import find_bundle, needs_export, resolve_bundle

    single = write_single_file(tiny_checkpoint, tmp_path / "tiny-sd.safetensors")
    assert needs_export(str(single))
    bundle = resolve_bundle(str(single), config=str(tiny_checkpoint))
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert all(c["parity"] for c in manifest["components"].values()), "the same parity gate as any export"
    ref = diffusers_image(StableDiffusionPipeline.from_single_file(
        str(single), config=str(tiny_checkpoint), local_files_only=True, safety_checker=None,
        requires_safety_checker=False))
    assert_matches(ours_image(Pipeline.load(bundle, providers="cpu")), ref, "single file")
    assert resolve_bundle(str(single), config=str(tiny_checkpoint), allow_export=False) == bundle  # cached
    assert not needs_export(str(single), config=str(tiny_checkpoint))
    # without --config it is another conversion (the inferred configs), not this one
    with pytest.raises(BundleError, match="single-file checkpoint"):
        find_bundle(str(single))


def test_an_unknown_single_file_layout_names_the_file_and_the_keys(cache, tmp_path):
    import torch
    from safetensors.torch import save_file

    from ortdiffusion.models import resolve_bundle

    single = tmp_path / "not-sd.safetensors"
    save_file({"encoder.layers.0.weight": torch.zeros(2, 2), "first_stage_model.decoder.conv_in.weight": torch.zeros(1)},
              str(single))
    with pytest.raises(BundleError) as e:
        resolve_bundle(str(single))
    message = str(e.value)
    assert str(single) in message and "unknown single-file layout" in message
    assert "UNet" in message and "model.diffusion_model.*" in message and "VAE" not in message.split("keys")[0], message


# -- ONNX exports in Optimum's layout -----------------------------------------------------------------


@pytest.fixture(scope="module")
def optimum_dir(tiny_bundle, tiny_checkpoint, tmp_path_factory) -> Path:
    """Our tiny bundle written in Optimum's layout (`export --layout optimum`'s writer)."""
    from ortdiffusion.export.optimum_layout import write_optimum_layout

    return write_optimum_layout(tiny_bundle, tmp_path_factory.mktemp("optimum") / "tiny-onnx", tiny_checkpoint)


def test_optimum_layout_written_has_optimums_files(optimum_dir):
    import onnxruntime as ort

    for folder in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        assert (optimum_dir / folder / "model.onnx").is_file() and (optimum_dir / folder / "config.json").is_file()
    for f in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt"):
        assert (optimum_dir / f).is_file(), f
    names = {f: ([i.name for i in s.get_inputs()], [o.name for o in s.get_outputs()]) for f in ("text_encoder", "vae_encoder")
             for s in [ort.InferenceSession(str(optimum_dir / f / "model.onnx"), providers=["CPUExecutionProvider"])]}
    assert names["text_encoder"] == (["input_ids"], ["last_hidden_state", "pooler_output"])
    assert names["vae_encoder"] == (["sample"], ["latent_parameters"])


def test_optimum_export_imports_without_torch_and_matches_diffusers(cache, optimum_dir, tiny_pipeline, reference, tmp_path):
    from ortdiffusion import Pipeline
    from ortdiffusion.runtime.manifest import Task, load_manifest

    source = tmp_path / "from-optimum"
    shutil.copytree(optimum_dir, source)
    (source / "tokenizer" / "tokenizer.json").unlink()  # as Optimum's exports hold it: vocab.json and merges.txt
    pipe = Pipeline.load(source, providers="cpu")  # the resolver imports it into the cache
    manifest = load_manifest(pipe.bundle_dir)
    assert manifest.extra["imported_from"] == "optimum-layout" and Task.IMAGE_TO_IMAGE in manifest.tasks()
    ours = ours_image(pipe)
    assert_matches(ours, reference, "Optimum-layout import")
    assert np.array_equal(np.asarray(ours), np.asarray(ours_image(tiny_pipeline))), "the same graphs, the same image"
    from PIL import Image

    image = Image.new("RGB", (64, 64), (200, 40, 40))
    a = pipe(PROMPT, image=image, strength=0.6, num_inference_steps=4, seed=2).images[0]
    b = tiny_pipeline(PROMPT, image=image, strength=0.6, num_inference_steps=4, seed=2).images[0]
    assert psnr(a, b) >= 60, "the encoder's latent_parameters split back into mean and std"
    code = (f"import sys; from ortdiffusion.models import find_bundle; find_bundle({str(source)!r}); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]", out.stdout


def test_converted_tokenizer_matches_transformers(optimum_dir, tmp_path):
    from transformers import CLIPTokenizer

    from ortdiffusion.export.bundle import TOKENIZER_PROBES
    from ortdiffusion.export.optimum_layout import _tokenizer
    from ortdiffusion.runtime.tokenizer import PromptTokenizer

    folder = tmp_path / "tokenizer"
    shutil.copytree(optimum_dir / "tokenizer", folder)
    (folder / "tokenizer.json").unlink()
    text, max_length, pad = _tokenizer(folder)
    (tmp_path / "tokenizer.json").write_text(text)
    ours = PromptTokenizer(tmp_path / "tokenizer.json", max_length, pad)(list(TOKENIZER_PROBES), warn_truncation=False)
    ref = CLIPTokenizer.from_pretrained(str(optimum_dir / "tokenizer"))(
        list(TOKENIZER_PROBES), padding="max_length", max_length=max_length, truncation=True, return_tensors="np").input_ids
    assert (ours == ref).all()


def test_partial_onnx_folder_names_the_missing_file(cache, optimum_dir, tmp_path):
    import onnx

    from ortdiffusion.models import resolve_bundle

    partial = tmp_path / "partial"
    shutil.copytree(optimum_dir, partial)
    (partial / "vae_decoder" / "model.onnx").unlink()
    with pytest.raises(BundleError) as e:
        resolve_bundle(str(partial))
    assert str(partial / "vae_decoder" / "model.onnx") in str(e.value) and "missing" in str(e.value)
    # a graph whose weights file is gone
    shutil.copytree(optimum_dir / "vae_decoder", partial / "vae_decoder", dirs_exist_ok=True)
    unet = partial / "unet" / "model.onnx"
    onnx.save(onnx.load(str(unet)), str(unet), save_as_external_data=True, location="model.onnx_data", size_threshold=0)
    # with its weights beside it, as Optimum keeps a large UNet's, it imports (linked as unet.onnx.data) and runs
    from ortdiffusion import Pipeline
    from ortdiffusion.export.optimum_layout import import_optimum

    manifest = import_optimum(partial, tmp_path / "with-data")
    assert [f.path for f in manifest.components["unet"].files] == ["unet.onnx", "unet.onnx.data"]
    assert Pipeline.load(tmp_path / "with-data", providers="cpu")("a red circle", num_inference_steps=2).images
    (partial / "unet" / "model.onnx_data").unlink()
    with pytest.raises(BundleError) as e:
        resolve_bundle(str(partial))
    assert str(partial / "unet" / "model.onnx_data") in str(e.value) and "missing" in str(e.value), str(e.value)
    (partial / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(BundleError, match="scheduler_config.json: missing"):
        resolve_bundle(str(partial))


def test_cli_imports_compares_and_lists_and_prunes_the_cache(cache, optimum_dir, tiny_checkpoint, tmp_path, capsys):
    from ortdiffusion.cli import main

    assert main(["export", str(optimum_dir), str(tmp_path / "imported")]) == 0
    assert (tmp_path / "imported" / "manifest.json").is_file()
    # the import against the checkpoint it was made from, per component and end to end
    assert main(["compare", str(tiny_checkpoint), str(optimum_dir), "--steps", "2"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("PASS")
    assert main(["generate", "a red circle", "--model", str(optimum_dir), "--steps", "2", "-q",
                 "-o", str(tmp_path / "out.png")]) == 0
    (cache / "bundles" / ".x.partial-1").mkdir()
    capsys.readouterr()
    assert main(["cache", "list"]) == 0
    listing = capsys.readouterr().out
    assert "bundles/onnx-" in listing and "MB" in listing and f"from {optimum_dir.resolve()}" in listing, listing
    assert main(["cache", "prune"]) == 0
    assert "removed bundles/.x.partial-1" in capsys.readouterr().out
    assert main(["cache", "prune", "--all", "--dry-run"]) == 0
    assert "would remove bundles/onnx-" in capsys.readouterr().out
    assert main(["cache", "prune", "--all"]) == 0
    assert not any((cache / "bundles").iterdir())


def test_optimums_dtypes_are_adapted_at_the_edges(cache, optimum_dir, tiny_pipeline, tmp_path):
    """Optimum's own exports take int32 token ids and (newer ones) an int64 scalar timestep: the
    import casts ours to theirs inside the graph, and the image is the same."""
    import onnx
    from onnx import TensorProto, helper

    from ortdiffusion import Pipeline

    source = tmp_path / "optimum-dtypes"
    shutil.copytree(optimum_dir, source)

    def retype(folder: str, name: str, elem: int, shape: list, convert: list) -> None:
        path = source / folder / "model.onnx"
        model = onnx.load(str(path))
        graph = model.graph
        for node in graph.node:
            node.input[:] = [f"{name}__ours" if i == name else i for i in node.input]
        for n, node in enumerate(convert):
            graph.node.insert(n, node)
        old = next(v for v in graph.input if v.name == name)
        graph.input.remove(old)
        graph.input.append(helper.make_tensor_value_info(name, elem, shape))
        onnx.save(model, str(path))

    retype("text_encoder", "input_ids", TensorProto.INT32, ["batch_size", "sequence_length"],
           [helper.make_node("Cast", ["input_ids"], ["input_ids__ours"], to=TensorProto.INT64)])
    retype("unet", "timestep", TensorProto.INT64, [],
           [helper.make_node("Cast", ["timestep"], ["timestep__float"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["timestep__float", "timestep__axes"], ["timestep__ours"])])
    unet = onnx.load(str(source / "unet" / "model.onnx"))
    unet.graph.initializer.append(helper.make_tensor("timestep__axes", TensorProto.INT64, [1], [0]))
    onnx.save(unet, str(source / "unet" / "model.onnx"))

    pipe = Pipeline.load(source, providers="cpu")
    unet = onnx.load(str(pipe.bundle_dir / "unet.onnx"))
    timestep = next(i for i in unet.graph.input if i.name == "timestep").type.tensor_type
    assert timestep.elem_type == TensorProto.FLOAT and [d.dim_param for d in timestep.shape.dim] == ["batch"]
    # DDIM's timesteps are integers: the int64 graph sees exactly what the float one did
    assert np.array_equal(np.asarray(ours_image(pipe)), np.asarray(ours_image(tiny_pipeline)))


def test_fp16_edges_are_cast_and_recorded(cache, optimum_dir, tiny_pipeline, tmp_path):
    """An fp16 export (Optimum's `--dtype fp16`, ONNX Runtime's published ones) takes and gives
    float16: the import casts at the edges, records fp16, and the runtime still feeds fp32."""
    import onnx
    from onnx import TensorProto, helper

    from ortdiffusion import Pipeline
    from ortdiffusion.runtime.manifest import load_manifest

    source = tmp_path / "optimum-fp16"
    shutil.copytree(optimum_dir, source)
    for folder in ("unet", "vae_decoder"):
        path = source / folder / "model.onnx"
        model = onnx.load(str(path))
        graph = model.graph
        for value in [*graph.input, *graph.output]:
            if value.type.tensor_type.elem_type != TensorProto.FLOAT:
                continue
            inner = f"{value.name}__fp32"
            for node in graph.node:
                node.input[:] = [inner if i == value.name else i for i in node.input]
                node.output[:] = [inner if o == value.name else o for o in node.output]
            if value in graph.input:
                graph.node.insert(0, helper.make_node("Cast", [value.name], [inner], to=TensorProto.FLOAT))
            else:
                graph.node.append(helper.make_node("Cast", [inner], [value.name], to=TensorProto.FLOAT16))
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
        onnx.save(model, str(path))
    pipe = Pipeline.load(source, providers="cpu")
    manifest = load_manifest(pipe.bundle_dir)
    assert {k: c.precision.value for k, c in manifest.components.items()} == {
        "text_encoder": "fp32", "unet": "fp16", "vae_decoder": "fp16", "vae_encoder": "fp32"}
    assert {i.dtype for c in manifest.components.values() for i in (*c.inputs, *c.outputs)} == {"float32", "int64"}
    # the latents rounded to fp16 at each step's edges: close to the fp32 image, not equal
    assert psnr(ours_image(pipe), ours_image(tiny_pipeline)) >= 30


# -- Optimum itself, in its own environment -----------------------------------------------------------


def optimum_python() -> str | None:
    """The python of an environment with optimum[onnxruntime] (docs/benchmarks.md shows how it is
    made): ORTDIFFUSION_OPTIMUM_PYTHON, else .venv-optimum in the repository."""
    candidate = os.environ.get("ORTDIFFUSION_OPTIMUM_PYTHON") or str(ROOT / ".venv-optimum" / "bin" / "python")
    if not Path(candidate).is_file():
        return None
    ok = subprocess.run([candidate, "-c", "import optimum.onnxruntime"], capture_output=True).returncode == 0
    return candidate if ok else None


needs_optimum = pytest.mark.skipif(
    optimum_python() is None, reason="no Optimum environment (.venv-optimum or ORTDIFFUSION_OPTIMUM_PYTHON, made as "
    "docs/benchmarks.md shows); the round trip through our own writer above runs without it")

OPTIMUM_RUN = """
import sys, numpy as np, torch
from diffusers import DDIMScheduler
from optimum.onnxruntime import ORTStableDiffusionPipeline
pipe = ORTStableDiffusionPipeline.from_pretrained(sys.argv[1])
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
latents = torch.from_numpy(np.load(sys.argv[2]))
image = pipe(sys.argv[3], latents=latents, num_inference_steps=int(sys.argv[4]), guidance_scale=float(sys.argv[5])).images[0]
image.save(sys.argv[6])
"""


@needs_optimum
def test_optimum_loads_our_optimum_layout(optimum_dir, tiny_pipeline, tmp_path):
    from PIL import Image

    np.save(tmp_path / "latents.npy", LATENTS)
    (tmp_path / "run.py").write_text(OPTIMUM_RUN)
    subprocess.run([optimum_python(), str(tmp_path / "run.py"), str(optimum_dir), str(tmp_path / "latents.npy"), PROMPT,
                    str(STEPS), str(GUIDANCE), str(tmp_path / "optimum.png")], check=True, capture_output=True, timeout=600)
    assert_matches(ours_image(tiny_pipeline), Image.open(tmp_path / "optimum.png"), "Optimum running our layout")


@pytest.fixture(scope="module")
def tiny_checkpoint_for_optimum(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint with its text encoder's weights under `text_model.`, as transformers < 5.6
    (Optimum's environment pins 4.x) saves and reads them: it would load the flattened keys
    transformers 5 writes as missing and export a randomly initialised text encoder."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("for-optimum") / "tiny"
    shutil.copytree(tiny_checkpoint, out)
    weights = out / "text_encoder" / "model.safetensors"
    state = load_file(str(weights))
    save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}, str(weights),
              metadata={"format": "pt"})
    return out


@needs_optimum
def test_an_export_made_by_optimum_imports_and_matches_diffusers(cache, tiny_checkpoint_for_optimum, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    from ortdiffusion import Pipeline
    from ortdiffusion.cli import main

    out = tmp_path / "optimum-export"
    done = subprocess.run([optimum_python(), "-m", "optimum.exporters.onnx", "--model", str(tiny_checkpoint_for_optimum),
                           "--task", "text-to-image", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    ref = diffusers_image(StableDiffusionPipeline.from_pretrained(
        str(tiny_checkpoint_for_optimum), safety_checker=None, requires_safety_checker=False))
    assert_matches(ours_image(Pipeline.load(out, providers="cpu")), ref, "Optimum's own export, imported")
    # and `compare` judges the import per component (Optimum's scalar timestep fed as the loop does) and end to end
    capsys.readouterr()
    assert main(["compare", str(tiny_checkpoint_for_optimum), str(out), "--steps", "4"]) == 0, capsys.readouterr().out
