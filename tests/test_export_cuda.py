"""The CUDA and TensorRT targets: what runs without a GPU (tests/test_gpu.py runs the rest)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ortdiffusion.export.bundle import (
    ExportOptions,
    export_checkpoint,
)
from ortdiffusion.export.onnx_export import Exporter
from ortdiffusion.runtime.errors import ExportError


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
    from ortdiffusion.export.onnx_export import DEFAULT_OPSET, export_onnx
    from ortdiffusion.export.optimize import Target, optimize_graph

    ckpt = load_checkpoint(tiny_checkpoint)
    specs = {spec.name: (spec, module) for spec, module in pipeline_components(ckpt)}
    # CLIP's causal-masked SDPA attention (transformers 5) is not a pattern the optimizer knows; the
    # text encoder runs once per image, so it stays unfused.
    expected = {"text_encoder": {"SkipLayerNormalization", "QuickGelu"},
                "unet": {"MultiHeadAttention", "GroupNorm", "BiasSplitGelu", "NhwcConv", "SkipLayerNormalization"},
                "vae_decoder": {"GroupNorm"}, "vae_encoder": {"GroupNorm"}}
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
    from ortdiffusion.export.onnx_export import DEFAULT_OPSET, export_onnx
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


def test_cuda_fusions_of_a_graph_with_external_weights_leave_one_data_file(tiny_checkpoint, tmp_path, monkeypatch):
    """The SD-sized path: the fusions run on the graph without its weights loaded, and the fused
    graph's weights (the untouched ones read from the original file, tensor by tensor) end in one
    data file beside it, nothing else left in the folder; the weights keep their values."""
    import onnx
    from onnx import numpy_helper

    from ortdiffusion.export import onnx_export
    from ortdiffusion.export.bundle import pipeline_components
    from ortdiffusion.export.checkpoint import load_checkpoint
    from ortdiffusion.export.optimize import Target, optimize_graph

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    spec, module = next((s, m) for s, m in pipeline_components(load_checkpoint(tiny_checkpoint)) if s.name == "unet")
    files = onnx_export.export_onnx(spec, module, tmp_path / "unet.onnx")
    assert [f.name for f in files] == ["unet.onnx", "unet.onnx.data"]
    before = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(files[0])).graph.initializer}
    optimize_graph(files, "unet", Target.CUDA)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.onnx", "unet.onnx.data"]
    graph = onnx.load(str(files[0]), load_external_data=False).graph
    assert "MultiHeadAttention" in {n.op_type for n in graph.node}
    assert {e.value for t in graph.initializer for e in t.external_data if e.key == "location"} == {"unet.onnx.data"}
    after = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(files[0])).graph.initializer}
    kept = before.keys() & after.keys()
    assert len(kept) > len(before) // 2
    for name in kept:
        np.testing.assert_array_equal(after[name], before[name])
