"""LoRA: files as users have them (diffusers/PEFT and kohya, UNet and text encoder), fused at export
or switched per request on one loaded bundle, against diffusers' `load_lora_weights` + scales."""

from __future__ import annotations

import base64
import gc
import io
import resource
import shutil

import numpy as np
import pytest
import torch
from conftest import psnr
from lora_files import kohya_lora, peft_lora
from PIL import Image

from ortdiffusion import Pipeline
from ortdiffusion.runtime.errors import InvalidRequestError
from ortdiffusion.runtime.lora import LoraSpec, read_lora

PROMPT = "a red circle on the left"


@pytest.fixture(scope="module")
def lora_files(tiny_checkpoint, tmp_path_factory):
    """Three LoRAs of the tiny model: PEFT with UNet and text encoder parts (rank 4, alpha 8), PEFT
    on two UNet projections only (rank 2), kohya with attention, feed-forward, 1×1 projections and
    the text encoder's MLP (rank 4, alpha 2, fp16)."""
    out = tmp_path_factory.mktemp("loras")
    return {
        "peft-1": peft_lora(tiny_checkpoint, out, rank=4, alpha=8, seed=1),
        "peft-2": peft_lora(tiny_checkpoint, out, rank=2, alpha=2, seed=2, text_encoder=False,
                            unet_targets=["to_k", "to_v"]),
        "kohya-3": kohya_lora(tiny_checkpoint, out, rank=4, alpha=2, seed=3),
    }


@pytest.fixture(scope="module")
def lora_bundle(tiny_bundle, tmp_path_factory):
    from ortdiffusion.export.lora_inputs import add_lora_inputs

    out = tmp_path_factory.mktemp("lora-bundle") / "tiny-lora"
    add_lora_inputs(tiny_bundle, out_dir=out)
    return out


@pytest.fixture(scope="module")
def lora_pipeline(lora_bundle, lora_files):
    pipe = Pipeline.load(lora_bundle, providers="cpu")
    for name, path in lora_files.items():
        assert pipe.load_lora(path) == name
    return pipe


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """diffusers' own pipeline (a private one: LoRAs are loaded into it)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_checkpoint), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def _latents(seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, 16, 16)).astype(np.float32)


def test_reads_peft_and_kohya_files_with_their_alphas_and_ranks(lora_files):
    peft = read_lora(lora_files["peft-1"])
    assert set(peft.layers) == {"unet", "text_encoder"}
    layer = peft.layers["unet"]["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert layer.rank == 4 and layer.alpha == 8.0  # from diffusers' lora_adapter_metadata
    assert "encoder.layers.0.self_attn.q_proj" in peft.layers["text_encoder"]
    kohya = read_lora(lora_files["kohya-3"])
    assert set(kohya.layers) == {"unet", "text_encoder"}
    assert {l.alpha for c in kohya.layers.values() for l in c.values()} == {2.0}
    assert kohya.layers["unet"]["kohya:down_blocks_0_attentions_0_proj_in"].down.shape == (4, 32, 1, 1)
    assert LoraSpec.parse("C:/x/y.safetensors:0.8") == LoraSpec(LoraSpec.parse("C:/x/y.safetensors").path, 0.8)


@pytest.mark.parametrize("sets", [
    {"peft-1": 0.8},  # UNet + text encoder, PEFT
    {"kohya-3": 1.0},  # UNet (attention, ff, 1×1 conv) + text encoder (attention, MLP), kohya
    {"peft-1": 0.7, "kohya-3": 0.6},  # two layouts blended
], ids=["peft", "kohya", "peft+kohya"])
def test_matches_diffusers_load_lora_weights(lora_pipeline, reference, lora_files, sets):
    reference.unload_lora_weights()
    adapters = [name.replace("-", "_") for name in sets]
    for name, adapter in zip(sets, adapters):
        reference.load_lora_weights(str(lora_files[name]), adapter_name=adapter)
    reference.set_adapters(adapters, adapter_weights=list(sets.values()))
    latents = _latents()
    ref = reference(PROMPT, latents=torch.from_numpy(latents), num_inference_steps=8, guidance_scale=5.0).images[0]
    reference.unload_lora_weights()
    plain = reference(PROMPT, latents=torch.from_numpy(latents), num_inference_steps=8, guidance_scale=5.0).images[0]
    result = lora_pipeline(PROMPT, latents=latents, num_inference_steps=8, guidance_scale=5.0, scheduler="ddim",
                           lora=sets)
    ours = result.images[0]
    assert psnr(ref, plain) < 35, "the LoRA must change the image for the comparison to mean anything"
    assert psnr(ours, ref) >= 40.0, f"PSNR {psnr(ours, ref):.1f} dB"
    assert result.metadata[0]["lora"] == ",".join(f"{n}:{s:g}" for n, s in sorted(sets.items()))


def test_no_lora_gives_the_plain_bundles_image(lora_pipeline, tiny_pipeline):
    args = dict(num_inference_steps=4, seed=5)
    a = np.asarray(lora_pipeline(PROMPT, **args).images[0])
    b = np.asarray(tiny_pipeline(PROMPT, **args).images[0])
    assert np.array_equal(a, b)


def test_each_side_branch_is_skipped_where_its_rank_is_zero(lora_bundle):
    """No LoRA must cost (next to) nothing: every branch sits in an If on its own rank, so a layer fed
    rank-0 arrays passes its output through instead of adding a computed zero delta."""
    import onnx

    graph = onnx.load(str(lora_bundle / "unet.onnx"), load_external_data=False).graph
    downs = [i.name for i in graph.input if i.name.endswith(".lora_down")]
    gates = [n for n in graph.node if n.op_type == "If"]
    assert downs and len(gates) == len(downs)
    assert not any(n.name.endswith("/lora_add") for n in graph.node), "a branch outside its If"
    branches = {a.name: [m.op_type for m in a.g.node] for a in gates[0].attribute}
    assert branches == {"then_branch": ["MatMul", "MatMul", "Add"], "else_branch": ["Identity"]} or \
        branches == {"then_branch": ["Conv", "Conv", "Add"], "else_branch": ["Identity"]}


def test_unknown_lora_and_lora_without_inputs_are_refused(lora_pipeline, tiny_pipeline):
    with pytest.raises(InvalidRequestError) as info:
        lora_pipeline(PROMPT, num_inference_steps=1, lora={"nope": 1.0})
    assert info.value.field == "lora" and "kohya-3, peft-1, peft-2" in str(info.value)
    with pytest.raises(InvalidRequestError, match="scale must be a finite number"):
        lora_pipeline(PROMPT, num_inference_steps=1, lora={"peft-1": float("nan")})
    with pytest.raises(InvalidRequestError, match="no LoRA inputs"):
        tiny_pipeline(PROMPT, num_inference_steps=1, lora={"peft-1": 1.0})


def test_a_lora_for_other_layers_is_refused(lora_pipeline, tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "other.safetensors"
    save_file({"lora_unet_no_such_block_to_q.lora_down.weight": np.zeros((2, 8), np.float32),
               "lora_unet_no_such_block_to_q.lora_up.weight": np.zeros((8, 2), np.float32)}, str(path))
    with pytest.raises(InvalidRequestError, match="no_such_block_to_q is not one this bundle can adapt"):
        lora_pipeline.load_lora(path)


@pytest.fixture(scope="module")
def fused_bundles(tiny_checkpoint, lora_files, tmp_path_factory):
    """Each LoRA fused at export, by name; the first through the command line
    (`ortdiffusion export CKPT OUT --lora FILE:SCALE --lora-inputs`: fused, and still taking more)."""
    import subprocess
    import sys

    from ortdiffusion.export.bundle import ExportOptions, export_checkpoint
    from ortdiffusion.export.lora_fuse import FusedLora

    root = tmp_path_factory.mktemp("fused")
    bundles = {name: root / name for name in SWITCHED}
    first, *rest = SWITCHED
    r = subprocess.run([sys.executable, "-m", "ortdiffusion.cli", "export", str(tiny_checkpoint), str(bundles[first]),
                        "--lora", f"{lora_files[first]}:{SWITCHED[first]}", "--lora-inputs"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in rest:
        export_checkpoint(tiny_checkpoint, bundles[name],
                          ExportOptions(loras=(FusedLora(lora_files[name], SWITCHED[name]),)))
    return bundles


#: The three LoRAs the switching test alternates among, with their scales.
SWITCHED = {"peft-1": 0.8, "peft-2": 1.5, "kohya-3": 0.6}


def test_service_switches_among_three_loras_like_fused_exports(lora_bundle, lora_files, fused_bundles, tmp_path,
                                                               monkeypatch):
    """100 requests alternating among three LoRAs through the HTTP service (the OpenAI client, the
    `lora` extension) give each LoRA's fused-at-export image (≤ 1/255), with no session created
    after start and memory flat."""
    import onnxruntime as ort
    from openai import OpenAI
    from test_serve import running

    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    for name in SWITCHED:
        shutil.copy(lora_files[name], lora_dir / f"{name}.safetensors")
    args = dict(size="64x64", response_format="b64_json")
    body = {"steps": 2, "seed": 7}
    expected = {}
    for name, bundle in fused_bundles.items():
        fused = Pipeline.load(bundle, providers="cpu")
        expected[name] = np.asarray(fused(PROMPT, num_inference_steps=2, seed=7, width=64, height=64).images[0], int)
        del fused
    pipe = Pipeline.load(lora_bundle, providers="cpu")
    created = []
    real = ort.InferenceSession.__init__

    def counting(self, *a, **k):  # a spy: every session created from here on is counted
        created.append(a[0] if a else k.get("path_or_bytes"))
        real(self, *a, **k)

    monkeypatch.setattr(ort.InferenceSession, "__init__", counting)
    with running(pipe, lora_dir=str(lora_dir), max_batch_images=1) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        card = client.models.list().data[0]
        assert card.loras == sorted(SWITCHED)
        created.clear()  # the warm-up and start are done
        rss = []
        for i in range(100):
            name = list(SWITCHED)[i % 3]
            result = client.images.generate(model="tiny", prompt=PROMPT, **args,
                                            extra_body={**body, "lora": {name: SWITCHED[name]}})
            image = np.asarray(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).convert("RGB"), int)
            worst = np.abs(image - expected[name]).max()
            assert worst <= 1, f"request {i} ({name}): off by {worst}/255 from the fused export"
            if i % 10 == 9:
                gc.collect()
                rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        import openai

        with pytest.raises(openai.BadRequestError) as info:
            client.images.generate(model="tiny", prompt=PROMPT, extra_body={"lora": {"nope": 1}})
        assert info.value.body["param"] == "lora" and "peft-1" in info.value.body["message"]
    assert created == [], f"sessions created while switching: {created}"
    # peak RSS after the first 30 requests (every set seen, its arrays cached) grows no further
    assert rss[-1] - rss[2] < 20 * 1024, f"peak RSS grew {(rss[-1] - rss[2]) / 1024:.0f} MiB while switching"


def test_cli_generate_with_a_lora(lora_bundle, lora_files, lora_pipeline, tmp_path):
    """`generate --lora FILE:SCALE` on a bundle with LoRA inputs: the Python API's image."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "ortdiffusion.cli", "generate", PROMPT, "--model", str(lora_bundle),
                        "--steps", "3", "--seed", "4", "--size", "64x64", "-q",
                        "--lora", f"{lora_files['kohya-3']}:0.6", "-o", str(tmp_path / "x.png")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    ours = lora_pipeline(PROMPT, num_inference_steps=3, seed=4, width=64, height=64, lora={"kohya-3": 0.6}).images[0]
    image = Image.open(tmp_path / "x.png")
    assert image.text["lora"] == "kohya-3:0.6"
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(ours))


def test_compare_judges_a_bundle_run_with_a_lora(tiny_checkpoint, lora_bundle, lora_files):
    """`ortdiffusion compare CKPT BUNDLE --lora FILE:SCALE`'s end-to-end line: diffusers with the LoRA
    loaded against the bundle with it chosen per request."""
    from ortdiffusion.export.compare import TOLERANCES, compare_end_to_end
    from ortdiffusion.runtime.manifest import Precision

    lines, _, a, _ = compare_end_to_end(tiny_checkpoint, lora_bundle, PROMPT, 4, 5.0, "ddim", 0,
                                        TOLERANCES[Precision.FP32], "cpu", (LoraSpec(lora_files["kohya-3"], 0.7),))
    assert "LoRA kohya-3.safetensors×0.7" in lines[0].what
    assert all(line.passed for line in lines), [(line.what, line.figures) for line in lines]


def test_device_loop_binds_the_lora_inputs_itself(lora_bundle, lora_files, lora_pipeline):
    """IO binding (the GPU's loop, here on the CPU provider): the same images as the host loop, with
    a LoRA, with another, and with none (ONNX Runtime's own adapters are not applied to bound runs)."""
    bound = Pipeline.load(lora_bundle, providers="cpu", io_binding=True)
    assert bound.device_loop is not None
    for name, path in lora_files.items():
        bound.load_lora(path, name)
    for lora in ({"peft-1": 0.8, "kohya-3": 0.5}, {"peft-2": 1.0}, None):
        args = dict(num_inference_steps=3, seed=9, width=64, height=64, lora=lora)
        a = np.asarray(bound(PROMPT, **args).images[0], int)
        b = np.asarray(lora_pipeline(PROMPT, **args).images[0], int)
        assert np.abs(a - b).max() <= 1, lora


def test_batches_gather_only_requests_with_the_same_lora_set(lora_pipeline):
    """Requests with another LoRA set run other weights: the batcher's compatibility key tells them apart."""
    from dataclasses import replace

    from ortdiffusion.runtime.request import make_request
    from ortdiffusion.serve.batcher import Job

    base = make_request(lora_pipeline.manifest, PROMPT, num_inference_steps=2)
    keys = [Job(replace(base, lora=lora_pipeline.loras.selection(lora)), deadline=0).compat_key
            for lora in ({"peft-1": 0.8}, {"peft-1": 0.8}, {"peft-1": 0.5}, {"kohya-3": 0.8}, None)]
    assert keys[0] == keys[1] and len(set(keys)) == 4
    # the same set named in another order is the same set
    assert lora_pipeline.loras.selection({"peft-1": 1, "kohya-3": 2}) == lora_pipeline.loras.selection(
        {"kohya-3": 2, "peft-1": 1})
