"""int8 UNets for the CPU, and where weights live (external data beside the graph)."""

from __future__ import annotations

import numpy as np

from ortdiffusion.export.bundle import (
    ExportOptions,
    export_checkpoint,
)


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


def test_gathering_external_data_copies_every_weight_without_loading_them_all(tmp_path):
    """`gather_external_data` turns a graph whose weights sit in other files (the exporter's one file
    per tensor, or a fused graph that refers to the original data) into one graph + one data file,
    tensor by tensor: same values, page-aligned offsets, the sources left as they were."""
    import onnx
    from onnx import helper, numpy_helper

    from ortdiffusion.export.weights import DATA_ALIGNMENT, gather_external_data

    rng = np.random.default_rng(0)
    weights = {f"w{k}": rng.standard_normal((33, 17 + k), dtype=np.float32) for k in range(4)}
    nodes, previous = [], "x"
    for k, (name, w) in enumerate(weights.items()):
        nodes.append(helper.make_node("MatMul", [previous, name], [f"y{k}"]))
        nodes.append(helper.make_node("Slice", [f"y{k}", "zero", "end", "one"], [f"s{k}"]))
        previous = f"s{k}"
    small = {"zero": np.array([0], np.int64), "end": np.array([33], np.int64), "one": np.array([1], np.int64)}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 33])],
                              [helper.make_tensor_value_info(previous, onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in {**weights, **small}.items()])
    src = tmp_path / "src"
    src.mkdir()
    # two source files, as a fused graph has: the original data and the fusions' own
    model = helper.make_model(graph)
    onnx.save_model(model, str(src / "a.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=1024)
    structure = onnx.load(str(src / "a.onnx"), load_external_data=False)
    assert sum(t.data_location == onnx.TensorProto.EXTERNAL for t in structure.graph.initializer) == 4
    out = tmp_path / "out"
    out.mkdir()
    data = gather_external_data(structure, src, out / "g.onnx")
    assert sorted(p.name for p in out.iterdir()) == ["g.onnx", "g.onnx.data"] and data == out / "g.onnx.data"
    gathered = onnx.load(str(out / "g.onnx"), load_external_data=False)
    for tensor in gathered.graph.initializer:
        if tensor.name in weights:
            info = {e.key: e.value for e in tensor.external_data}
            assert info["location"] == "g.onnx.data" and int(info["offset"]) % DATA_ALIGNMENT == 0
    loaded = onnx.load(str(out / "g.onnx"))
    for tensor in loaded.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), {**weights, **small}[tensor.name])
    assert len(list(src.iterdir())) == 5  # the graph and its four per-tensor files, untouched
