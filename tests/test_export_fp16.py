"""fp16: measured block lists keep what overflows in fp32; fp16 bundles generate like fp32."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ortdiffusion.export.bundle import (
    ExportOptions,
    export_checkpoint,
    export_component,
)
from ortdiffusion.export.specs import (
    ComponentSpec,
    InputSpec,
)
from ortdiffusion.runtime.manifest import DimRange, TensorInfo


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

    # Measured one batch row at a time (export's way: one row's activations held, not the batch's),
    # every tensor's largest value is the whole batch's.
    from ortdiffusion.export.fp16 import one_row_at_a_time

    assert len(feeds[0]["sample"]) == 2
    rows = one_row_at_a_time(feeds, spec)
    assert len(rows) == 2 and all(len(r["sample"]) == 1 for r in rows)
    by_rows = tensor_ranges(structure, files[0], rows)
    assert by_rows.keys() == ranges.keys()
    for name, value in ranges.items():
        assert by_rows[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


def test_fp16_bundle_generates_like_fp32(tiny_checkpoint, tiny_pipeline, tmp_path):
    from ortdiffusion import Pipeline
    from ortdiffusion.runtime.manifest import Precision

    from conftest import psnr

    out = tmp_path / "fp16"
    manifest = export_checkpoint(tiny_checkpoint, out, ExportOptions(precision=Precision.FP16))
    assert manifest.components["unet"].precision is Precision.FP16
    assert manifest.components["vae_decoder"].precision in (Precision.FP16, Precision.FP32)
    pipe = Pipeline.load(out, providers="cpu")
    half = pipe("a red circle", num_inference_steps=10, seed=3).images[0]
    full = tiny_pipeline("a red circle", num_inference_steps=10, seed=3).images[0]
    assert psnr(half, full) >= 28.0
    check_fp32_decoder_retry(manifest, pipe)


def check_fp32_decoder_retry(manifest, pipe):
    """DESIGN.md's precision rule: an fp16 decoder's export keeps an fp32 copy, and pixels the fp16
    one overflowed (latents far past fp16's range: inf from the first Cast) are decoded again by
    it; without the copy the same latents raise NumericalError, never a black image."""
    from ortdiffusion.runtime.decoder import ImageDecoder
    from ortdiffusion.runtime.errors import NumericalError
    from ortdiffusion.runtime.manifest import Precision
    from ortdiffusion.runtime.trace import Transfers

    assert manifest.components["vae_decoder"].precision is Precision.FP16, "the tiny decoder passes fp16 parity"
    assert manifest.components["vae_decoder_fp32"].precision is Precision.FP32
    latents = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32) * 1e5
    raw = pipe.sessions["vae_decoder"].run({"latent_sample": latents})["sample"]
    assert not np.isfinite(raw).all(), "the fp16 decoder must overflow for this check to mean anything"
    before = pipe.image_decoder.retries
    pixels = pipe.image_decoder(latents, Transfers())
    assert np.isfinite(pixels).all() and pipe.image_decoder.retries == before + 1
    with pytest.raises(NumericalError, match="vae_decoder: 12288 non-finite pixel values"):
        ImageDecoder(pipe.sessions["vae_decoder"])(latents, Transfers())


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


def test_fp16_vae_whose_activations_leave_fp16s_range(tiny_checkpoint, tmp_path):
    """SDXL's VAE in small: a real diffusers AutoencoderKL decoder with activations past fp16's
    largest value inside it (SDXL's VAE reaches ~1e5 in its decoder, hence the black images), and
    an ordinary output, because a GroupNorm follows them. The measured block list keeps the
    overflowing convolutions fp32 and the decoder matches fp32; the naive conversion of the same
    graph gives NaN/inf, which the runtime's guard (`check_fp32_decoder_retry` above) catches."""
    import onnx
    from onnx.reference import ReferenceEvaluator
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from ortdiffusion.export.bundle import pipeline_components
    from ortdiffusion.export.checkpoint import load_checkpoint
    from ortdiffusion.export.fp16 import FP16_MAX, topological_sort
    from ortdiffusion.runtime.manifest import Precision

    spec, decoder = next((s, m) for s, m in pipeline_components(load_checkpoint(tiny_checkpoint)) if s.name == "vae_decoder")
    resnet = decoder.vae.decoder.mid_block.resnets[0] if hasattr(decoder, "vae") else decoder.decoder.mid_block.resnets[0]
    with torch.no_grad():  # conv1 feeds norm2: scaling it changes the values inside, not the image
        resnet.conv1.weight.mul_(1e5)
        resnet.conv1.bias.mul_(1e5)
    latents = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32))
    inside = {}

    def record(module, args, output) -> None:
        inside["max"] = float(output.abs().max())

    hook = resnet.conv1.register_forward_hook(record)
    with torch.no_grad():
        ref = decoder(latents)
        ref = (ref[0] if isinstance(ref, tuple) else ref).numpy()
    hook.remove()
    assert inside["max"] > FP16_MAX, f"the activations must leave fp16's range ({inside['max']:.3g})"
    assert np.isfinite(ref).all() and np.abs(ref).max() < 100

    entry = export_component(spec, decoder, tmp_path, ExportOptions(precision=Precision.FP16))
    assert entry.precision is Precision.FP16 and entry.fp32_nodes, "the overflowing convolution stays fp32"
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    plain = export_component(spec, decoder, plain_dir)
    feeds = {spec.input_names[0]: latents.numpy()}

    def run_as_written(model) -> np.ndarray:  # each node in its own dtype, as a GPU would run it
        topological_sort(model.graph)
        return ReferenceEvaluator(model).run(None, feeds)[0]

    measured = run_as_written(onnx.load(str(tmp_path / entry.files[0].path)))
    with np.errstate(all="ignore"):  # inf − inf inside the naive graph's GroupNorm
        naive = run_as_written(convert_float_to_float16(onnx.load(str(plain_dir / plain.files[0].path)), keep_io_types=True))
    assert not np.isfinite(naive).all(), "fp16 throughout overflows: the black image"
    assert np.isfinite(measured).all()
    rel = np.linalg.norm(measured - ref) / np.linalg.norm(ref)
    assert rel <= 2e-2, rel


def test_weights_wait_on_disk_while_the_graph_is_converted(tmp_path):
    """`offloaded`: inside, the module holds no weights (meta tensors); after, the same values
    (non-persistent buffers and requires_grad included), the same outputs, and no file left behind."""
    import torch

    from ortdiffusion.export.weights import offloaded

    module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GroupNorm(2, 8))
    module.register_buffer("scale", torch.linspace(0, 1, 8), persistent=False)
    module[0].weight.requires_grad_(False)
    module[1].weight = module[0].bias  # a tied weight stays one storage
    x = torch.randn(3, 8)
    before = module(x) * module.scale
    with offloaded(module, tmp_path):
        assert all(t.is_meta for t in [*module.parameters(), *module.buffers()])
        assert len(list(tmp_path.iterdir())) == 1
    assert torch.equal(module(x) * module.scale, before)
    assert not module[0].weight.requires_grad and module[0].bias.requires_grad
    assert module[1].weight.data_ptr() == module[0].bias.data_ptr()
    assert list(tmp_path.iterdir()) == []


def test_offloaded_weights_leave_memory(tmp_path):
    """Inside `offloaded`, nothing keeps the module's own tensors alive: one leftover reference to a
    tensor of a memory-mapped checkpoint kept the whole file's mapping resident (3.4 GB for an
    SD-1.5 UNet), so the offload freed nothing."""
    import gc
    import weakref

    import torch

    from ortdiffusion.export.weights import offloaded

    module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Conv2d(8, 8, 1))
    module.register_buffer("last", torch.ones(4))  # the last tensor the offload walks
    refs = [weakref.ref(t) for t in [*module.parameters(), *module.buffers()]]
    with offloaded(module, tmp_path):
        gc.collect()
        alive = [r() for r in refs if r() is not None]
        assert alive == [], f"{len(alive)} of the module's own tensors still referenced while offloaded"
    assert torch.equal(module.last, torch.ones(4))


def test_fp16_conversion_of_external_weights_is_streamed_and_equals_onnxruntimes(tiny_checkpoint, tmp_path, monkeypatch):
    """A graph whose weights are in a data file is converted without loading them (the SDXL UNet's
    in-memory conversion was OOM-killed at 21.7 GiB): the converter runs on the weight-less graph,
    the weights are converted one by one on their way into the new data file. The result is ONNX
    Runtime's own in-memory conversion of the same graph, node for node and weight for weight."""
    import shutil

    import onnx
    from onnx import external_data_helper, numpy_helper

    from ortdiffusion.export import onnx_export
    from ortdiffusion.export.bundle import pipeline_components
    from ortdiffusion.export.checkpoint import load_checkpoint
    from ortdiffusion.export.fp16 import convert_to_fp16, measure_ranges

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    spec, module = next((s, m) for s, m in pipeline_components(load_checkpoint(tiny_checkpoint)) if s.name == "unet")
    streamed_dir, inline_dir = tmp_path / "streamed", tmp_path / "inline"
    streamed_dir.mkdir()
    files = onnx_export.export_onnx(spec, module, streamed_dir / "unet.onnx")
    assert [f.name for f in files] == ["unet.onnx", "unet.onnx.data"]
    ranges = measure_ranges(files, spec)
    # a measured-large tensor, so that a node stays fp32 and its weights with it
    structure = onnx.load(str(files[0]), load_external_data=False)
    conv = next(n for n in structure.graph.node if n.op_type == "Conv")
    ranges = {**ranges, conv.output[0]: 1e9}
    inline_dir.mkdir()
    onnx.save(onnx.load(str(files[0])), str(inline_dir / "unet.onnx"))  # the weights inside the graph
    inline_keep, inline_files = convert_to_fp16([inline_dir / "unet.onnx"], spec, ranges)

    def no_loading(*_args, **_kwargs):
        raise AssertionError("a weight was loaded into memory")

    with monkeypatch.context() as m:
        m.setattr(external_data_helper, "load_external_data_for_tensor", no_loading)
        m.setattr(external_data_helper, "_read_external_data_bytes", no_loading)
        keep, out = convert_to_fp16(files, spec, ranges)
    assert keep == inline_keep and conv.name in keep
    assert sorted(p.name for p in streamed_dir.iterdir()) == ["unet.onnx", "unet.onnx.data"]
    on_disk = onnx.load(str(out[0]), load_external_data=False).graph.initializer
    assert any(t.data_type == onnx.TensorProto.FLOAT16 and t.data_location == onnx.TensorProto.EXTERNAL for t in on_disk)
    streamed, inline = onnx.load(str(out[0])), onnx.load(str(inline_files[0]))
    assert [(n.op_type, list(n.input), list(n.output)) for n in streamed.graph.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in inline.graph.node]
    weights = {t.name: numpy_helper.to_array(t) for t in inline.graph.initializer}
    mine = {t.name: numpy_helper.to_array(t) for t in streamed.graph.initializer}
    assert mine.keys() == weights.keys()
    dtypes = set()
    for name, value in weights.items():
        assert mine[name].dtype == value.dtype, name
        np.testing.assert_array_equal(mine[name], value)
        dtypes.add(value.dtype)
    assert {np.dtype(np.float16), np.dtype(np.float32)} <= dtypes  # the kept Conv's weights stayed fp32
    feed = {s.info.name: t.numpy() for s, t in zip(spec.inputs, spec.sample_inputs(spec.parity_points()[0], 0))}
    run = [ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]).run(None, feed)[0]
           for f in (out[0], inline_files[0])]
    np.testing.assert_array_equal(run[0], run[1])


def test_streamed_fp16_conversion_halves_a_constants_external_value_and_leaves_nothing_when_it_fails(tmp_path, monkeypatch):
    """Tensors outside the initializers live in the data file too (a Constant node's value past
    1 KiB): the streamed conversion halves what the converter retyped wherever it is, by where its
    bytes are, not by name; and a conversion that fails midway leaves the graph and its data as they
    were, with no partial file beside them."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from onnxruntime.transformers import float16

    from ortdiffusion.export import weights
    from ortdiffusion.export.fp16 import convert_to_fp16

    rng = np.random.default_rng(0)
    shift, w = rng.standard_normal((1, 512)).astype(np.float32), rng.standard_normal((512, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["shift"], value=numpy_helper.from_array(shift, "shift_value"), name="shift"),
         helper.make_node("Add", ["x", "shift"], ["moved"], name="add"),
         helper.make_node("MatMul", ["moved", "w"], ["y"], name="matmul")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "g.onnx"
    weights.gather_external_data(model, tmp_path, path)  # as the CUDA optimizer writes its graph: attributes too
    stored = onnx.load(str(path), load_external_data=False)
    assert stored.graph.node[0].attribute[0].t.data_location == TensorProto.EXTERNAL  # the Constant's value too
    spec = _large_inside_spec()
    x = rng.standard_normal((1, 512)).astype(np.float32)
    expected = (x + shift) @ w
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken(*_args, **_kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(float16, "convert_np_to_float16", broken)  # a failure while the weights are copied
        with pytest.raises(OSError, match="disk full"):
            convert_to_fp16([path, tmp_path / "g.onnx.data"], spec, ranges={})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    keep, files = convert_to_fp16([path, tmp_path / "g.onnx.data"], spec, ranges={})
    assert keep == [] and sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx", "g.onnx.data"]
    converted = onnx.load(str(files[0]), load_external_data=False)
    value = converted.graph.node[[n.op_type for n in converted.graph.node].index("Constant")].attribute[0].t
    assert value.data_type == TensorProto.FLOAT16 and value.data_location == TensorProto.EXTERNAL
    got = ort.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=2e-2, atol=0.3)
