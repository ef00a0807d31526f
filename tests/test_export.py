"""Export: spec-driven, parity-checked, atomic; any text encoder; a user's own module."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
import transformers
from tokenizers import Tokenizer

from ortdiffusion.export.bundle import (
    ExportOptions,
    export_checkpoint,
    export_component,
)
from ortdiffusion.export.onnx_export import Exporter
from ortdiffusion.export.specs import (
    ComponentSpec,
    InputSpec,
    text_encoder_component,
    unet_component,
)
from ortdiffusion.runtime.errors import BundleError, ExportError
from ortdiffusion.runtime.manifest import DimRange, TensorInfo, load_manifest


def test_manifest_records_parity_at_two_shapes(tiny_bundle):
    manifest = load_manifest(tiny_bundle)
    for name, comp in manifest.components.items():
        shapes = {tuple(sorted(r.shape.items())) for r in comp.parity}
        assert len(shapes) == 2, f"{name}: parity at two different shapes"
        assert all(r.rel_l2_error <= 1e-4 and r.cosine_similarity > 0.9999 for r in comp.parity)
    unet = manifest.components["unet"]
    assert [i.name for i in unet.inputs] == ["sample", "timestep", "encoder_hidden_states"]
    assert unet.inputs[0].shape == ("batch", 4, "height", "width")
    assert manifest.components["text_encoder"].inputs[0].shape == ("batch", 77)  # fixed sequence length
    assert [o.name for o in manifest.components["text_encoder"].outputs] == ["last_hidden_state", "pooled_output"]
    assert manifest.pipeline.scheduler_config["beta_schedule"] == "scaled_linear"
    assert manifest.source.weights_sha256 and (tiny_bundle / "tokenizer.json").is_file()


TEXT_ENCODERS = {
    "CLIPTextModel": lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, eos_token_id=2)),
    "CLIPTextModelWithProjection": lambda: transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, projection_dim=24, eos_token_id=2)),
    "T5EncoderModel": lambda: transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)),
    "BertModel": lambda: transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16)),
    "GPT2Model": lambda: transformers.GPT2Model(transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=16)),
}
POOLED = {"CLIPTextModel": 32, "CLIPTextModelWithProjection": 24, "BertModel": 32}


@pytest.mark.parametrize("family", list(TEXT_ENCODERS))
def test_text_encoder_spec_fits_any_transformers_encoder(family, tmp_path):
    torch.manual_seed(0)
    model = TEXT_ENCODERS[family]().eval()
    spec, module = text_encoder_component(model, max_length=16)
    entry = export_component(spec, module, tmp_path)
    assert [o.name for o in entry.outputs] == (["last_hidden_state", "pooled_output"] if family in POOLED else ["last_hidden_state"])
    if family in POOLED:
        assert entry.outputs[1].shape == ("batch", POOLED[family])
    assert max(r.rel_l2_error for r in entry.parity) <= 1e-4
    # the graph reproduces transformers on ids it never saw, at a batch size it was not traced at
    ids = np.random.default_rng(0).integers(0, 100, (5, 16))
    got = ort.InferenceSession(str(tmp_path / "text_encoder.onnx")).run(None, {"input_ids": ids})[0]
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


class ConvTransposeDecoder(torch.nn.Module):
    """A user's own image decoder: latents (b, 4, h, w) → image (b, 3, 4h, 4w)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.ConvTranspose2d(4, 16, 4, stride=2, padding=1), torch.nn.SiLU(),
            torch.nn.ConvTranspose2d(16, 3, 4, stride=2, padding=1), torch.nn.Tanh(),
        )

    def forward(self, latents):
        return self.net(latents)


def test_users_own_module_exports_through_the_same_spec_machinery(tmp_path):
    spec = ComponentSpec(
        name="my_decoder",
        inputs=(InputSpec(TensorInfo("latents", "float32", ("batch", 4, "height", "width"))),),
        outputs=(TensorInfo("image", "float32", ("batch", 3, "image_height", "image_width")),),
        dims={"batch": DimRange(1, 1, 8), "height": DimRange(1, 8, 32), "width": DimRange(1, 8, 32)},
    )
    torch.manual_seed(0)
    entry = export_component(spec, ConvTransposeDecoder().eval(), tmp_path)
    assert entry.files[0].path == "my_decoder.onnx"
    assert {tuple(sorted(r.shape.items())) for r in entry.parity} == {
        (("batch", 1), ("height", 8), ("width", 8)), (("batch", 2), ("height", 9), ("width", 10))}
    out = ort.InferenceSession(str(tmp_path / "my_decoder.onnx")).run(None, {"latents": np.zeros((3, 4, 5, 7), np.float32)})[0]
    assert out.shape == (3, 3, 20, 28)


def test_dynamo_exporter_gives_the_same_unet(tiny_checkpoint, tmp_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_checkpoint / "unet")).eval()
    spec, module = unet_component(unet, text_length=77)
    entry = export_component(spec, module, tmp_path, ExportOptions(exporter=Exporter.DYNAMO))
    assert max(r.rel_l2_error for r in entry.parity) <= 1e-4


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


def test_sd2_style_checkpoint_v_prediction_1024_wide_per_block_heads(tmp_path):
    """SD 2.x's shape of config, scaled down but for its 1024-wide text encoder and cross-attention:
    v-prediction, linear projections, per-block head counts, "!" as the pad token."""
    from ortdiffusion.export.presets import PRESETS, Preset, build_checkpoint

    base = PRESETS["tiny"]
    sd2_like = Preset(
        name="tiny-sd2",
        text_encoder={**base.text_encoder, "hidden_size": 1024, "intermediate_size": 1024, "num_hidden_layers": 1,
                      "num_attention_heads": 16, "hidden_act": "gelu"},
        unet={**base.unet, "cross_attention_dim": 1024, "attention_head_dim": [2, 4], "use_linear_projection": True},
        vae=base.vae, scheduler={**base.scheduler, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
        scheduler_class="EulerDiscreteScheduler", pad_token="!", vocab_words=base.vocab_words,
    )
    ckpt = build_checkpoint(sd2_like, tmp_path / "ckpt")
    manifest = export_checkpoint(ckpt, tmp_path / "bundle")
    assert manifest.pipeline.prediction_type == "v_prediction"
    assert manifest.pipeline.default_scheduler == "euler"
    assert manifest.components["unet"].inputs[2].shape == ("batch", 77, 1024)
    assert Tokenizer.from_file(str(tmp_path / "bundle" / "tokenizer.json")).token_to_id("!") == manifest.pipeline.pad_token_id

    # and the image matches diffusers' own pipeline on it (v-prediction through Euler)
    from conftest import psnr
    from diffusers import StableDiffusionPipeline

    from ortdiffusion import Pipeline

    ref = StableDiffusionPipeline.from_pretrained(str(ckpt), safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
    expected = ref("a red circle", latents=torch.from_numpy(latents), num_inference_steps=10).images[0]
    got = Pipeline.load(tmp_path / "bundle")("a red circle", latents=latents, num_inference_steps=10).images[0]
    assert psnr(got, expected) >= 40.0


@pytest.mark.slow
def test_sd15_sized_unet_exports_with_external_data(tmp_path):
    """An SD-1.5-sized UNet (random weights, SD 1.5's config) is past 2 GB: one external data file."""
    from diffusers import UNet2DConditionModel

    from ortdiffusion.export.presets import SD15

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**SD15.unet, "sample_size": 16}).eval()
    spec, module = unet_component(unet, text_length=77, batch=DimRange(1, 1, 2))
    entry = export_component(spec, module, tmp_path)
    assert [f.path for f in entry.files] == ["unet.onnx", "unet.onnx.data"]
    assert entry.files[1].size > 3_000_000_000
    assert max(r.rel_l2_error for r in entry.parity) <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.onnx", "unet.onnx.data"]


def test_cpu_target_fuses_with_onnxruntimes_optimizer_and_keeps_parity(tiny_checkpoint, tmp_path):
    """`--target cpu`: the transformer optimizer's fusions and our attention fusion plus the
    extended graph optimizations, saved; dynamic shapes kept; parity still ≤ 1e-4; CPU-only."""
    import onnx

    from ortdiffusion import Pipeline
    from ortdiffusion.export.optimize import Target

    manifest = export_checkpoint(tiny_checkpoint, tmp_path / "cpu", ExportOptions(target=Target.CPU))
    unet = onnx.load(str(tmp_path / "cpu" / "unet.onnx"))
    ops = {n.op_type for n in unet.graph.node}
    assert "SkipLayerNormalization" in ops
    for name in ("unet", "vae_decoder"):  # every attention core is MultiHeadAttention (flash attention on the CPU)
        graph = onnx.load(str(tmp_path / "cpu" / f"{name}.onnx"), load_external_data=False).graph
        assert "MultiHeadAttention" in {n.op_type for n in graph.node}
        assert "Softmax" not in {n.op_type for n in graph.node}
    assert all(c.providers == ("cpu",) for c in manifest.components.values())
    assert all(r.rel_l2_error <= 1e-4 for c in manifest.components.values() for r in c.parity)
    image = Pipeline.load(tmp_path / "cpu")("a red circle", seed=1, num_inference_steps=3, width=96, height=64).images[0]
    assert image.size == (96, 64)


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_attention_fusion_computes_what_diffusers_attention_does(cross, tmp_path):
    """A diffusers `Attention` exported as the engine exports it, fused to MultiHeadAttention, run
    by ONNX Runtime at shapes other than the exported ones, against the module itself; the same
    module called with a mask (another pattern) is left unfused and still right."""
    import onnx
    from diffusers.models.attention_processor import Attention

    from ortdiffusion.export.attention import fuse_attention

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=24 if cross else None, heads=4, dim_head=8).eval()

    class Call(torch.nn.Module):
        def __init__(self, masked: bool):
            super().__init__()
            self.attn, self.masked = attn, masked

        def forward(self, x, ctx):
            if not cross:
                return self.attn(x) + 0 * ctx.sum()
            mask = torch.zeros(x.shape[0], 1, ctx.shape[1]) if self.masked else None
            return self.attn(x, ctx, attention_mask=mask)

    x, ctx = torch.randn(2, 16, 32), torch.randn(2, 5, 24 if cross else 32)
    axes = {"x": {0: "b", 1: "s"}, "ctx": {0: "b", 1: "l"}, "y": {0: "b", 1: "s"}}
    x2, ctx2 = torch.randn(3, 40, 32), torch.randn(3, 7, ctx.shape[2])
    for module, fusable in ((Call(masked=False), 1), (Call(masked=True), 0 if cross else 1)):
        path = tmp_path / f"{module.masked}.onnx"
        torch.onnx.export(module, (x, ctx), str(path), input_names=["x", "ctx"], output_names=["y"],
                          dynamic_axes=axes, opset_version=18, dynamo=False)
        model = onnx.load(str(path))
        assert fuse_attention(model) == fusable
        assert ("MultiHeadAttention" in {n.op_type for n in model.graph.node}) == bool(fusable)
        onnx.save(model, str(path))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (y,) = session.run(None, {"x": x2.numpy(), "ctx": ctx2.numpy()})
        with torch.no_grad():
            expected = module(x2, ctx2).numpy()
        np.testing.assert_allclose(y, expected, atol=2e-5, rtol=1e-4)


def test_cpu_target_optimizes_graphs_with_external_data_too(tiny_checkpoint, tmp_path, monkeypatch):
    """A graph past the external-data threshold (SD-sized UNets) gets the same fusions, its weights
    staying in one data file beside it (the threshold is lowered so the tiny model takes that path)."""
    import onnx

    from ortdiffusion import Pipeline
    from ortdiffusion.export import onnx_export
    from ortdiffusion.export.optimize import Target

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    manifest = export_checkpoint(tiny_checkpoint, tmp_path / "cpu", ExportOptions(target=Target.CPU))
    unet = manifest.components["unet"]
    assert [f.path for f in unet.files] == ["unet.onnx", "unet.onnx.data"]
    graph = onnx.load(str(tmp_path / "cpu" / "unet.onnx"), load_external_data=False)
    assert "SkipLayerNormalization" in {n.op_type for n in graph.graph.node}
    big = [i for i in graph.graph.initializer if int(np.prod(i.dims)) * 4 >= 4096]
    assert big and all(i.data_location == onnx.TensorProto.EXTERNAL for i in big)
    assert sorted(p.name for p in (tmp_path / "cpu").iterdir() if p.name.startswith(("unet", "."))) == [
        "unet.onnx", "unet.onnx.data"]
    assert all(r.rel_l2_error <= 1e-4 for r in unet.parity)
    assert Pipeline.load(tmp_path / "cpu")("a red circle", seed=1, num_inference_steps=2).images[0].size == (64, 64)


# -- the CUDA and TensorRT targets (what runs without a GPU; tests/test_gpu.py runs the rest) ------


def test_cuda_target_export_needs_the_cuda_provider_and_leaves_nothing(tiny_checkpoint, tmp_path):
    """Parity of a CUDA-fused graph can only be checked on CUDA: without it the export stops before
    any work, naming the provider and the way out; int8 is refused for GPU targets."""
    from ortdiffusion.export.optimize import Target
    from ortdiffusion.runtime.manifest import Precision

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    with pytest.raises(ExportError, match="CUDAExecutionProvider.*--target generic"):
        export_checkpoint(tiny_checkpoint, tmp_path / "cuda", ExportOptions(target=Target.CUDA, precision=Precision.FP16))
    with pytest.raises(ExportError, match="int8 is for the CPU provider"):
        export_checkpoint(tiny_checkpoint, tmp_path / "cuda", ExportOptions(target=Target.CUDA, precision=Precision.INT8))
    assert list(tmp_path.iterdir()) == []


def test_cuda_target_fuses_as_onnxruntimes_stable_diffusion_script(tiny_checkpoint, tmp_path):
    """The GPU fusions of ONNX Runtime's transformer optimizer on our TorchScript export: attention
    (with the heads of the model: the NumPy-2 workaround's job), GroupNorm, BiasSplitGelu, NHWC
    convolution, SkipLayerNorm; packed QKV for fp16. Then the fp16 conversion of the fused graph by
    the block list measured on the plain one: a node reading a measured-large tensor stays fp32."""
    import onnx

    from ortdiffusion.export.bundle import pipeline_components
    from ortdiffusion.export.checkpoint import load_checkpoint
    from ortdiffusion.export.fp16 import convert_to_fp16, measure_ranges
    from ortdiffusion.export.onnx_export import DEFAULT_OPSET, Exporter, export_onnx
    from ortdiffusion.export.optimize import Target, optimize_graph

    ckpt = load_checkpoint(tiny_checkpoint)
    specs = {spec.name: (spec, module) for spec, module in pipeline_components(ckpt)}
    # CLIP's causal-masked SDPA attention (transformers 5) is not a pattern the optimizer knows; the
    # text encoder runs once per image, so it stays unfused.
    expected = {"text_encoder": {"SkipLayerNormalization", "QuickGelu"},
                "unet": {"MultiHeadAttention", "GroupNorm", "BiasSplitGelu", "NhwcConv", "SkipLayerNormalization"},
                "vae_decoder": {"GroupNorm"}}
    for name, (spec, module) in specs.items():
        files = export_onnx(spec, module, tmp_path / f"{name}.onnx", DEFAULT_OPSET, Exporter.TORCHSCRIPT)
        ranges = measure_ranges(files, spec)
        fused = optimize_graph(files, name, Target.CUDA, fp16=True)
        graph = onnx.load(str(files[0])).graph
        ops = {n.op_type for n in graph.node}
        assert expected[name] <= ops, (name, fused)
        if name == "unet":
            heads = {a.i for n in graph.node if n.op_type == "MultiHeadAttention" for a in n.attribute if a.name == "num_heads"}
            assert heads == {ckpt.unet.config.attention_head_dim}  # diffusers' legacy name: the heads count
            assert "Softmax" not in ops
            # a tensor a fused node reads, made "large": that node must stay fp32
            victim = next(n for n in graph.node if n.op_type == "BiasSplitGelu")
            ranges = {**ranges, victim.input[0]: 1e9}
        keep, out = convert_to_fp16(files, spec, ranges)
        model = onnx.load(str(out[0]))
        assert {i.type.tensor_type.elem_type for i in [*model.graph.input, *model.graph.output]
                if i.type.tensor_type.elem_type in (1, 10)} == {onnx.TensorProto.FLOAT}  # fp32 in and out
        assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
        if name == "unet":
            assert victim.name in keep
            producer = {o: n for n in model.graph.node for o in n.output}
            kept = next(n for n in model.graph.node if n.name == victim.name)
            source = producer.get(kept.input[0])
            assert not (source is not None and source.op_type == "Cast"
                        and source.attribute[0].i == onnx.TensorProto.FLOAT16)  # it reads fp32



def test_cuda_fusions_are_left_out_where_the_kernels_refuse_the_shapes(tiny_checkpoint, tmp_path):
    """ONNX Runtime's CUDA GroupNorm, BiasSplitGelu and BiasAdd kernels take SD's sizes only and
    refuse others at run time (seen on an H100 with the tiny model: one channel per group, GEGLU
    hidden size 256). Export asks the module's shapes first: SD-sized blocks fuse, the tiny UNet's
    stay standard ONNX, and attention is fused either way."""
    import onnx
    from diffusers.models.activations import GEGLU

    from ortdiffusion.export.bundle import pipeline_components
    from ortdiffusion.export.checkpoint import load_checkpoint
    from ortdiffusion.export.onnx_export import DEFAULT_OPSET, Exporter, export_onnx
    from ortdiffusion.export.optimize import Target, cuda_fusions_fit, optimize_graph

    sd_block = torch.nn.Sequential(torch.nn.GroupNorm(32, 320), GEGLU(320, 1280))
    assert all(cuda_fusions_fit(sd_block).values())
    assert cuda_fusions_fit(torch.nn.GroupNorm(32, 32)) == {
        "enable_group_norm": False, "enable_skip_group_norm": False, "enable_bias_splitgelu": True, "enable_bias_add": True}
    assert not cuda_fusions_fit(GEGLU(32, 128))["enable_bias_splitgelu"]

    ckpt = load_checkpoint(tiny_checkpoint)
    spec, module = next((s, m) for s, m in pipeline_components(ckpt) if s.name == "unet")
    fits = cuda_fusions_fit(module)
    assert not any(fits.values()), fits
    files = export_onnx(spec, module, tmp_path / "unet.onnx", DEFAULT_OPSET, Exporter.TORCHSCRIPT)
    optimize_graph(files, "unet", Target.CUDA, fp16=True, fits=fits)
    ops = {n.op_type for n in onnx.load(str(files[0])).graph.node}
    assert {"MultiHeadAttention", "NhwcConv"} <= ops
    assert not ops & {"GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd"}, ops


# -- fp16 ---------------------------------------------------------------------------------------


class LargeInside(torch.nn.Module):
    """Values beyond fp16's range in the middle of an otherwise small computation, as in a
    norm computed from unscaled squares: small in, small out, ~1e6 in between."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, latents):
        big = self.conv(latents) * 1000.0
        squares = big * big  # up to ~1e6: inf in fp16
        rms = torch.sqrt(squares.mean(dim=1, keepdim=True)) / 1000.0
        return latents * rms


def _large_inside_spec() -> ComponentSpec:
    return ComponentSpec(
        name="large_inside",
        inputs=(InputSpec(TensorInfo("latents", "float32", ("batch", 4, "height", "width"))),),
        outputs=(TensorInfo("out", "float32", ("batch", 4, "height", "width")),),
        dims={"batch": DimRange(1, 1, 4), "height": DimRange(1, 8, 32), "width": DimRange(1, 8, 32)},
    )


def test_fp16_keeps_measured_overflow_nodes_in_fp32(tmp_path):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from ortdiffusion.runtime.manifest import Precision

    torch.manual_seed(0)
    module = LargeInside().eval()
    entry = export_component(_large_inside_spec(), module, tmp_path, ExportOptions(precision=Precision.FP16))
    assert entry.precision is Precision.FP16
    assert entry.fp32_nodes, "the ×3e5 region must have been measured and kept fp32"
    assert max(r.rel_l2_error for r in entry.parity) <= 2e-2
    import onnx

    model = onnx.load(str(tmp_path / "large_inside.onnx"))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer), "the rest is fp16"

    # The same conversion without the measured block list overflows: the list is what saves it.
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    plain = export_component(_large_inside_spec(), module, plain_dir)
    naive = convert_float_to_float16(onnx.load(str(plain_dir / plain.files[0].path)), keep_io_types=True)
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    # ONNX's reference evaluator computes each node in the dtype it is given, as a GPU provider
    # would; ONNX Runtime's CPU provider runs fp16 chains without fp16 kernels in fp32 and would
    # hide the overflow.
    from onnx.reference import ReferenceEvaluator

    from ortdiffusion.export.fp16 import topological_sort

    def run_as_written(model) -> np.ndarray:
        topological_sort(model.graph)  # the converter appends its Casts; the evaluator needs order
        return ReferenceEvaluator(model).run(None, {"latents": x})[0]

    got = run_as_written(naive)
    measured = run_as_written(onnx.load(str(tmp_path / "large_inside.onnx")))
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    assert not np.isfinite(got).all() or not np.allclose(got, ref, atol=1e-2), "naive fp16 should overflow"
    np.testing.assert_allclose(measured, ref, atol=2e-2, rtol=2e-2)


def _chain_graph(length: int):
    """x → `length` Adds in a chain → y: every link a tensor the size of x."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Add", [f"t{i}", "x"], [f"t{i + 1}"]) for i in range(length)]
    nodes.insert(0, helper.make_node("Identity", ["x"], ["t0"]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                              [helper.make_tensor_value_info(f"t{length}", TensorProto.FLOAT, ["n"])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_fp16_measurement_finds_each_tensors_largest_value_nan_and_inf_included(tiny_checkpoint, tmp_path):
    """Every float tensor's largest |value|, as the tensors themselves say; a NaN or an inf (which
    ONNX Runtime's ReduceMax may skip) counts as out of range, and blocks its nodes."""
    import onnx
    from onnx import TensorProto, helper

    from ortdiffusion.export.fp16 import overflow_nodes, tensor_ranges

    nodes = [helper.make_node("Mul", ["x", "big"], ["scaled"], name="scale"),
             helper.make_node("Sub", ["x", "x"], ["zero"], name="zero"),
             helper.make_node("Div", ["zero", "zero"], ["nan"], name="nan"),  # 0/0 everywhere
             helper.make_node("Add", ["scaled", "nan"], ["y"], name="sum"),
             helper.make_node("Slice", ["x", "zero_i", "zero_i"], ["empty"], name="empty")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3]), helper.make_tensor_value_info("empty", TensorProto.FLOAT, [0])],
        [helper.make_tensor("big", TensorProto.FLOAT, [], [3e5]), helper.make_tensor("zero_i", TensorProto.INT64, [1], [0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    x = np.array([1.0, -2.0, 0.5], np.float32)
    ranges = tensor_ranges(model, path, [{"x": x}, {"x": x / 4}])
    assert ranges["scaled"] == pytest.approx(6e5) and ranges["zero"] == 0.0 and ranges["x"] == 2.0
    assert ranges["nan"] == np.inf and ranges["y"] == np.inf and ranges["empty"] == 0.0
    assert set(overflow_nodes(model, ranges)) == {"scale", "nan", "sum"}
    assert [p.name for p in tmp_path.iterdir()] == ["g.onnx"], "the probe graph is removed"

    # The same figures as every intermediate tensor read back whole, on a real UNet graph.
    from ortdiffusion.export.bundle import pipeline_components
    from ortdiffusion.export.checkpoint import load_checkpoint
    from ortdiffusion.export.onnx_export import export_onnx

    spec, module = next((s, m) for s, m in pipeline_components(load_checkpoint(tiny_checkpoint)) if s.name == "unet")
    files = export_onnx(spec, module, tmp_path / "unet.onnx")
    structure = onnx.load(str(files[0]))
    inputs = spec.sample_inputs(spec.parity_points()[0], seed=3)
    feeds = [{i.info.name: t.numpy() for i, t in zip(spec.inputs, inputs)}]
    ranges = tensor_ranges(structure, files[0], feeds)
    inferred = onnx.shape_inference.infer_shapes(structure)
    floats = [vi.name for vi in inferred.graph.value_info if vi.type.tensor_type.elem_type == TensorProto.FLOAT]
    everything = onnx.ModelProto()
    everything.CopyFrom(structure)
    everything.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in floats)
    as_written = ort.SessionOptions()
    as_written.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no fusion changes a value
    values = ort.InferenceSession(everything.SerializeToString(), as_written, providers=["CPUExecutionProvider"]).run(
        floats, feeds[0])
    assert len(floats) > 100
    for name, value in zip(floats, values):
        assert ranges[name] == pytest.approx(float(np.abs(value).max()) if value.size else 0.0, rel=1e-6), name


def test_fp16_measurement_holds_no_more_than_a_plain_run(tmp_path):
    """Measuring a graph's tensors must not keep them all alive (SD-1.5's UNet took over 24 GB that
    way). A chain of 40 tensors of 64 MB each: read back whole they would take 2.5 GB."""
    import subprocess
    import sys

    import onnx

    path = tmp_path / "chain.onnx"
    onnx.save(_chain_graph(40), str(path))
    script = """
import resource, sys, numpy as np, onnx, onnxruntime as ort
from pathlib import Path
from ortdiffusion.export.fp16 import tensor_ranges
path, mode = Path(sys.argv[1]), sys.argv[2]
x = {"x": np.ones(16 * 2**20, np.float32)}
if mode == "plain":
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, x)
else:
    assert tensor_ranges(onnx.load(str(path)), path, [x])["t40"] == 41.0
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""
    peak = {mode: int(subprocess.run([sys.executable, "-c", script, str(path), mode], check=True, capture_output=True,
                                     text=True).stdout.split()[-1]) for mode in ("plain", "measure")}
    assert peak["measure"] < peak["plain"] + 512, peak


def test_fp16_bundle_generates_like_fp32(tiny_checkpoint, tiny_pipeline, tmp_path):
    from ortdiffusion import Pipeline
    from ortdiffusion.runtime.manifest import Precision

    from conftest import psnr

    out = tmp_path / "fp16"
    manifest = export_checkpoint(tiny_checkpoint, out, ExportOptions(precision=Precision.FP16))
    assert manifest.components["unet"].precision is Precision.FP16
    assert manifest.components["vae_decoder"].precision in (Precision.FP16, Precision.FP32)
    half = Pipeline.load(out, providers="cpu")("a red circle", num_inference_steps=10, seed=3).images[0]
    full = tiny_pipeline("a red circle", num_inference_steps=10, seed=3).images[0]
    assert psnr(half, full) >= 28.0


def test_fp16_converts_graphs_whose_weights_live_outside_them(tiny_checkpoint, tiny_pipeline, tmp_path, monkeypatch):
    """A graph past protobuf's 2 GB (an SD-sized UNet) is converted with the converter's own shape
    inference off; the types it casts by are then inferred on the weight-less graph. Without them
    it left Resize's scales and the kept nodes' constants in fp16 and the graph did not load. The
    tiny model takes that path with the exporter's threshold lowered."""
    from ortdiffusion import Pipeline
    from ortdiffusion.export import onnx_export
    from ortdiffusion.runtime.manifest import Precision

    from conftest import psnr

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / "fp16-external"
    manifest = export_checkpoint(tiny_checkpoint, out, ExportOptions(precision=Precision.FP16))
    assert [f.path for f in manifest.components["unet"].files] == ["unet.onnx", "unet.onnx.data"]
    assert manifest.components["unet"].precision is Precision.FP16
    half = Pipeline.load(out, providers="cpu")("a red circle", num_inference_steps=10, seed=3).images[0]
    full = tiny_pipeline("a red circle", num_inference_steps=10, seed=3).images[0]
    assert psnr(half, full) >= 28.0


# -- int8 ---------------------------------------------------------------------------------------


def test_int8_quantizes_the_unet_statically_for_the_cpu(tiny_checkpoint, tiny_pipeline, tmp_path):
    import onnx

    from ortdiffusion import Pipeline
    from ortdiffusion.export.quantize import Calibration
    from ortdiffusion.runtime.manifest import Precision

    from conftest import psnr

    out = tmp_path / "int8"
    options = ExportOptions(precision=Precision.INT8, calibration=Calibration(prompts=("a red circle", "a blue square"), steps=3))
    manifest = export_checkpoint(tiny_checkpoint, out, options)
    unet = manifest.components["unet"]
    assert unet.precision is Precision.INT8 and unet.providers == ("cpu",)
    assert manifest.components["text_encoder"].precision is Precision.FP32
    assert manifest.components["vae_decoder"].precision is Precision.FP32
    nodes = onnx.load(str(out / "unet.onnx")).graph.node
    ops = {n.op_type for n in nodes}
    assert {"QuantizeLinear", "DequantizeLinear", "MultiHeadAttention"} <= ops and "Softmax" not in ops
    # every projection MatMul/Conv reads int8 weights; attention itself stays fp32 (MultiHeadAttention)
    dq = {o for n in nodes if n.op_type == "DequantizeLinear" for o in n.output}
    assert all(n.input[1] in dq for n in nodes if n.op_type in ("MatMul", "Conv"))
    # ... and so does the attention output projection, reading MultiHeadAttention's output quantized
    after_attention = [n for n in nodes if n.op_type == "MatMul" and "to_out" in n.name]
    assert after_attention and all(n.input[0] in dq for n in after_attention)
    assert max(r.rel_l2_error for r in unet.parity) <= 0.25
    quantized = Pipeline.load(out, providers="cpu")("a red circle", num_inference_steps=10, seed=3).images[0]
    full = tiny_pipeline("a red circle", num_inference_steps=10, seed=3).images[0]
    assert psnr(quantized, full) >= 20.0


def test_a_graph_external_already_gets_its_data_file_as_readable_as_itself(tmp_path):
    """A graph past 2 GB comes to the last step external already, its data file written by onnx or
    ONNX Runtime's optimizer (the CUDA target's fp32 UNet), owner-only: it is published readable."""
    from ortdiffusion.export.weights import store_weights_externally

    graph, data = tmp_path / "unet.onnx", tmp_path / "unet.onnx.data"
    graph.write_bytes(b"graph")
    data.write_bytes(b"weights")
    graph.chmod(0o644)
    data.chmod(0o600)
    assert store_weights_externally([graph, data]) == [graph, data]
    assert data.stat().st_mode & 0o777 == 0o644


def test_weights_past_the_threshold_live_beside_the_graph_and_compute_the_same(tiny_checkpoint, tiny_pipeline, tmp_path):
    """Every component's weights in `<component>.onnx.data` (the threshold lowered so the tiny model
    takes that path; SD-sized text encoders and decoders do by default): ONNX Runtime maps them
    instead of copying them, and the images are the very same."""
    import onnx

    from ortdiffusion import Pipeline

    manifest = export_checkpoint(tiny_checkpoint, tmp_path / "ext", ExportOptions(external_weights_min_bytes=0))
    for name, component in manifest.components.items():
        assert [f.path for f in component.files] == [f"{name}.onnx", f"{name}.onnx.data"]
        graph = onnx.load(str(tmp_path / "ext" / f"{name}.onnx"), load_external_data=False)
        big = [i for i in graph.graph.initializer if int(np.prod(i.dims)) * 4 >= 4096]
        assert big and all(i.data_location == onnx.TensorProto.EXTERNAL for i in big)
    assert not [p for p in (tmp_path / "ext").iterdir() if p.name.startswith(".")]
    modes = {p.stat().st_mode & 0o777 for p in (tmp_path / "ext").glob("*.onnx*")}
    assert len(modes) == 1  # the data files as readable as their graphs (onnx writes them owner-only)
    ours = Pipeline.load(tmp_path / "ext", providers="cpu")("a red circle", num_inference_steps=3, seed=5).images[0]
    reference = tiny_pipeline("a red circle", num_inference_steps=3, seed=5).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(reference))
    # below the threshold (the default, for a model this small) a graph stays one file
    assert [f.path for f in tiny_pipeline.manifest.components["unet"].files] == ["unet.onnx"]
