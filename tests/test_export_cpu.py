"""The CPU target: ONNX Runtime's fusions and our attention fusion, parity kept, external data too."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ortdiffusion.export.bundle import (
    ExportOptions,
    export_checkpoint,
)


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
