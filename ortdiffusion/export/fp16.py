"""fp16 export: a graph converted to float16 except the nodes whose values leave fp16's range.

The block list is measured, not written by hand: the fp32 graph runs on calibration inputs (the
component spec's sample inputs at its parity shapes, plus the extremes of any bounded input, such
as the first and last timestep) with every intermediate tensor made a graph output; a node whose
inputs or outputs reach `OVERFLOW_FRACTION` of fp16's largest value stays fp32. The conversion
itself is ONNX Runtime's (`onnxruntime.transformers.float16`), with inputs and outputs kept fp32 so
the runtime feeds an fp16 component exactly like an fp32 one; its own default list of operators
without fp16 kernels applies as well. The list of nodes kept fp32 goes into the manifest.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..runtime.providers import session_options
from .specs import ComponentSpec, Distribution

logger = logging.getLogger(__name__)

FP16_MAX = 65504.0
#: Values beyond this fraction of fp16's range on calibration inputs keep a node in fp32: the
#: headroom covers real inputs a little beyond the calibration set.
OVERFLOW_FRACTION = 0.25
#: Relative L2 error against torch fp32 above which an fp16 component fails parity (the same
#: per-component tolerance `ortdiffusion compare` applies to fp16 bundles).
FP16_TOLERANCE = 2e-2


def calibration_feeds(spec: ComponentSpec, seed: int = 500) -> list[dict[str, np.ndarray]]:
    """Sample inputs at each parity shape, and again with every bounded input at either end."""
    feeds = []
    for k, dims in enumerate(spec.parity_points()):
        inputs = spec.sample_inputs(dims, seed=seed + k)
        base = {s.info.name: t.numpy() for s, t in zip(spec.inputs, inputs)}
        feeds.append(base)
        bounded = [s for s in spec.inputs if s.distribution is Distribution.UNIFORM]
        for end in ("low", "high") if bounded else ():
            feeds.append({**base, **{s.info.name: np.full_like(base[s.info.name], getattr(s, end)) for s in bounded}})
    return feeds


def one_row_at_a_time(feeds: list[dict[str, np.ndarray]], spec: ComponentSpec) -> list[dict[str, np.ndarray]]:
    """The feeds split into one batch row each. The networks exported here compute each row on its
    own (no operator mixes the batch: GroupNorm, attention and LayerNorm are per sample), so the
    largest |value| over the rows is the batch's; a run then holds one row's activations instead of
    three (the SD-1.5-sized UNet's range measurement peaked at 13.8 GB at its parity shapes)."""
    batched = {s.info.name for s in spec.inputs if s.info.shape and s.info.shape[0] == "batch"}
    rows = []
    for feed in feeds:
        count = {len(v) for k, v in feed.items() if k in batched}
        if len(count) != 1:  # inputs that disagree on the batch: run the feed as it is
            rows.append(feed)
            continue
        rows += [{k: v[r:r + 1] if k in batched else v for k, v in feed.items()} for r in range(count.pop())]
    return rows


def name_nodes(model) -> None:
    """Give every unnamed node a unique, deterministic name: block lists address nodes by name."""
    seen = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


#: What `tensor_ranges` reads of each tensor: the largest |value| is max(ReduceMax, -ReduceMin).
REDUCTIONS = ("ReduceMax", "ReduceMin", "ReduceSum")


def tensor_ranges(structure, path: Path, feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """The largest |value| of every float tensor of `structure` (the graph at `path`, loaded
    without its weights) over the feeds.

    Each float tensor gets reductions (`REDUCTIONS`) right after the node that writes it, and only
    those scalars become graph outputs, so a run holds about what an ordinary run of the graph
    holds. The same augmentation as `onnxruntime.quantization`'s MinMaxCalibrater; that class is not
    used because it loads the weights and saves a copy of them (3.4 GB for SD's UNet), and looks up
    each tensor's consumer in the whole node list (quadratic in the nodes). Making the tensors
    themselves outputs, as before, kept every one of them alive until the run returned: SD-1.5's
    UNet at its parity shapes took over 24 GB and was killed."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    model = onnx.ModelProto()
    model.CopyFrom(structure)
    inferred = onnx.shape_inference.infer_shapes(model)
    floats = {vi.name for vi in inferred.graph.value_info if vi.type.tensor_type.elem_type == TensorProto.FLOAT}
    floats |= {o.name for o in model.graph.output if o.type.tensor_type.elem_type == TensorProto.FLOAT}
    reduced: dict[str, str] = {}  # tensor → the prefix of its reductions' output names
    nodes = []
    for node in model.graph.node:
        nodes.append(node)
        for name in node.output:
            if name in floats and name not in reduced:
                out = reduced[name] = f"{name}__range_{len(reduced)}"
                # Reductions only, which allocate nothing the size of the tensor (an Abs would: a
                # copy of a 3 GB attention score matrix). ReduceMax/ReduceMin skip a NaN (ONNX
                # Runtime's CPU kernels), a sum does not. keepdims: ONNX Runtime refuses to drop a
                # dimension of size 0 (an empty tensor).
                nodes += [helper.make_node(op, [name], [f"{out}_{op}"], keepdims=1) for op in REDUCTIONS]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.output[:]
    names = [f"{out}_{op}" for out in reduced.values() for op in REDUCTIONS]
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    # Saved beside the original so that its external data (if any) resolves; removed afterwards.
    probe = path.with_name(f".{path.stem}.probe-{uuid.uuid4().hex[:8]}.onnx")
    onnx.save(model, str(probe))
    try:
        # No optimization: keep every tensor. ONNX Runtime's default order ran the reductions late,
        # every tensor alive until then (measured: SD-1.5's UNet at 32×32 latents 5.3 GB against
        # 3.6 GB for a plain run); the priority-based order runs each as soon as its tensor is
        # written (3.7 GB).
        options = session_options(optimization="disable", priority_order=True)
        session = ort.InferenceSession(str(probe), options, providers=["CPUExecutionProvider"])
        # The feeds come in two shapes: without handing the arena back after each run, the larger
        # shape's working memory was added to the smaller one's (SD-1.5's UNet: 18.9 GB, against
        # 10.2 GB for one run at the larger shape).
        shrink = ort.RunOptions()
        shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        ranges: dict[str, float] = defaultdict(float)
        for feed in feeds:
            values = iter(session.run(names, feed, shrink))
            for name in reduced:
                high, low, total = (float(next(values).ravel()[0]) for _ in REDUCTIONS)
                # An empty tensor reduces to (-inf, inf, 0): nothing to overflow. A NaN or an inf
                # makes the sum so, and counts as inf.
                largest = max(high, -low, 0.0) if np.isfinite(total) else np.inf
                ranges[name] = max(ranges[name], largest)
            for name, value in feed.items():
                if value.dtype == np.float32:
                    ranges[name] = max(ranges[name], float(np.abs(value).max()))
    finally:
        probe.unlink(missing_ok=True)
    return dict(ranges)


def overflow_nodes(model, ranges: dict[str, float], limit: float = FP16_MAX * OVERFLOW_FRACTION) -> list[str]:
    """Nodes with an input or output whose measured magnitude reaches `limit` or is not finite."""
    from onnx import TensorProto, numpy_helper

    big = {name for name, r in ranges.items() if not np.isfinite(r) or r >= limit}
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT and not init.external_data:
            values = numpy_helper.to_array(init)
            if values.size and float(np.abs(values).max()) >= limit:
                big.add(init.name)
    return [n.name for n in model.graph.node if big.intersection(n.input) or big.intersection(n.output)]


def remove_fp16_round_trips(model) -> int:
    """Let an edge between two fp32 nodes stay fp32.

    onnxruntime's converter (1.31; unchanged in 1.32.0) puts a Cast to fp16 after every output of a blocked node and a
    Cast back to fp32 before every blocked consumer, even when both ends are blocked: a value the
    block list exists to protect still passes through fp16 and overflows (measured in
    tests/test_export_fp16.py). Each Cast(fp32→fp16)→Cast(fp16→fp32) pair is bypassed here, so the fp32
    consumer reads the fp32 producer directly; Casts left without consumers are removed. It also
    writes one Cast twice when a node reads the same tensor twice (x·x); the copy is dropped.
    """
    from onnx import TensorProto

    graph = model.graph
    written: set[str] = set()
    unique = []
    for node in graph.node:
        if node.op_type == "Cast" and node.output[0] in written:
            continue
        written.update(node.output)
        unique.append(node)
    duplicates = len(graph.node) - len(unique)
    del graph.node[:]
    graph.node.extend(unique)
    outputs = {o.name for o in graph.output}
    by_output = {out: node for node in graph.node for out in node.output if out}
    consumers: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    def cast_to(node) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    rename: dict[str, str] = {}
    dropped = set()
    for back in graph.node:
        if cast_to(back) != TensorProto.FLOAT or back.output[0] in outputs:
            continue
        down = by_output.get(back.input[0])
        if down is None or cast_to(down) != TensorProto.FLOAT16:
            continue
        source = down.input[0]
        producer = by_output.get(source)
        if producer is not None and producer.op_type == "Cast":
            continue  # keep the converter's own input casts as they are
        rename[back.output[0]] = source
        dropped.add(id(back))
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    # A down-cast whose every consumer was bypassed has no use left.
    still_used = {name for node in graph.node if id(node) not in dropped for name in node.input} | outputs
    for node in graph.node:
        if cast_to(node) == TensorProto.FLOAT16 and node.output[0] not in still_used:
            dropped.add(id(node))
    kept = [node for node in graph.node if id(node) not in dropped]
    removed = len(graph.node) - len(kept) + duplicates
    del graph.node[:]
    graph.node.extend(kept)
    return removed


def topological_sort(graph) -> None:
    """Order the nodes so each comes after the producers of its inputs, as ONNX requires (the
    converter appends its Casts at the end; ONNX Runtime sorts at load, other tools do not).
    Kahn's algorithm, keeping the original order among nodes that are ready together."""
    import heapq

    nodes = list(graph.node)
    # "" names an omitted optional input or output (fused operators have many), not a tensor.
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    waiting = [0] * len(nodes)
    users: dict[int, list[int]] = defaultdict(list)
    for i, node in enumerate(nodes):
        for source in {producer[name] for name in node.input if name and name in producer}:
            waiting[i] += 1
            users[source].append(i)
    ready = [i for i, n in enumerate(waiting) if n == 0]
    heapq.heapify(ready)
    ordered = []
    while ready:
        i = heapq.heappop(ready)
        ordered.append(nodes[i])
        for j in users[i]:
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    if len(ordered) != len(nodes):
        raise ValueError("graph has a cycle")
    del graph.node[:]
    graph.node.extend(ordered)


def measure_ranges(files: list[Path], spec: ComponentSpec) -> dict[str, float]:
    """The largest |value| of every float tensor of the graph in `files` on the spec's calibration
    inputs (run on the CPU provider)."""
    import onnx

    structure = onnx.load(str(files[0]), load_external_data=False)
    return tensor_ranges(structure, files[0], one_row_at_a_time(calibration_feeds(spec), spec))


def add_value_types(model, structure) -> None:
    """Record the element type of every tensor of `model`, contrib operators' outputs included, as
    ONNX Runtime's own fp16 conversion of fused graphs does (`OnnxModel.convert_float_to_float16`):
    the converter decides what to cast by these types, and its own shape inference is off where it
    cannot run — ONNX's does not know com.microsoft operators, and cannot take a graph past
    protobuf's 2 GB. Without them it leaves fp32-only inputs (Resize's scales, a kept node's
    constants) in fp16 and the graph does not load. The types are inferred on `structure`, the same
    graph without its external weights (ONNX Runtime's symbolic shape inference, which knows the
    contrib operators), and only the types are kept, not the shapes."""
    from onnx import ModelProto, TensorProto, ValueInfoProto, helper
    from onnxruntime.transformers.shape_infer_helper import SymbolicShapeInferenceHelper

    # The external weights become typed inputs: inference needs their types and shapes, not their
    # values (it would read them from the working directory otherwise).
    typed_from = ModelProto()
    typed_from.CopyFrom(structure)
    weights = typed_from.graph.initializer
    external = [t for t in weights if t.data_location == TensorProto.EXTERNAL]
    typed_from.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in external)
    kept = [t for t in weights if t.data_location != TensorProto.EXTERNAL]
    del weights[:]
    weights.extend(kept)
    inferred = SymbolicShapeInferenceHelper(typed_from).infer_shapes(typed_from, auto_merge=True, guess_output_rank=False)
    known = {vi.name for vi in model.graph.value_info}
    for vi in inferred.graph.value_info if inferred is not None else ():
        if vi.name and vi.name not in known and vi.type.tensor_type.elem_type != TensorProto.UNDEFINED:
            typed = ValueInfoProto()
            typed.CopyFrom(vi)
            typed.type.tensor_type.ClearField("shape")
            model.graph.value_info.append(typed)


def convert_to_fp16(files: list[Path], spec: ComponentSpec,
                    ranges: dict[str, float] | None = None) -> tuple[list[str], list[Path]]:
    """Convert the exported graph (`files`: the graph, then its external data if any) to fp16 in
    place. Returns the nodes kept fp32 by measurement and the files now making up the graph.

    `ranges`: tensor magnitudes measured beforehand, on the plain graph, for a graph fused with
    operators the CPU provider lacks (the CUDA target). Its nodes are matched by the tensors they
    read and write, whose names the fusions keep; what a fused kernel computes inside (attention
    scores, GroupNorm's statistics) it accumulates in fp32 itself."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    path = files[0]
    structure = onnx.load(str(path), load_external_data=False)
    name_nodes(structure)
    if ranges is None:
        ranges = tensor_ranges(structure, path, one_row_at_a_time(calibration_feeds(spec), spec))
    keep = overflow_nodes(structure, ranges)
    logger.info("%s: largest |value| on calibration inputs %.3g; %d of %d nodes stay fp32",
                spec.name, max(ranges.values(), default=0.0), len(keep), len(structure.graph.node))
    large = len(files) > 1
    if large:
        return keep, _convert_external(files, structure, keep, spec)
    model = onnx.load(str(path))
    name_nodes(model)
    fused = any(n.domain == "com.microsoft" for n in model.graph.node)
    if fused:  # the converter cannot infer a fused graph's types itself: it reads the ones recorded here
        add_value_types(model, structure)
    converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=keep, disable_shape_infer=fused)
    removed = remove_fp16_round_trips(converted)
    logger.info("%s: %d fp32 → fp16 → fp32 round trips between fp32 nodes removed", spec.name, removed)
    topological_sort(converted.graph)
    onnx.save(converted, str(path))
    return keep, [path]


_PATCH_LOCK = threading.Lock()


@contextmanager
def _value_info_from_dims() -> Iterator[None]:
    """ONNX Runtime's converter records each weight it converts by reading the weight into numpy for
    its shape (`float16.make_value_info_from_tensor`), which for a weight in an external data file
    means loading it. The shape is in the tensor's dims; this reads it from there for the
    conversion's duration (one conversion at a time: the patch is the module's, not the call's)."""
    from onnx import helper
    from onnxruntime.transformers import float16

    with _PATCH_LOCK:
        original = float16.make_value_info_from_tensor
        float16.make_value_info_from_tensor = lambda t: helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        try:
            yield
        finally:
            float16.make_value_info_from_tensor = original


def _external_types(model) -> dict[tuple[str, int], int]:
    """The element type of every tensor of `model` stored in an external data file, by where its
    bytes are (file, offset): initializers, subgraphs' and node attributes' tensors (a Constant's
    value) alike, whatever their names."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    types = {}
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            info = ExternalDataInfo(tensor)
            types[(info.location, int(info.offset or 0))] = tensor.data_type
    return types


def _convert_external(files: list[Path], structure, keep: list[str], spec: ComponentSpec) -> list[Path]:
    """The fp16 conversion of a graph whose weights are in external data files, streamed: the
    converter runs on the graph without its weights (what it decides — which weights become fp16,
    where casts go — needs only their types and users), then the weights are copied into one new
    data file one tensor at a time, the ones it retyped fp32 → fp16 converted on the way with its own
    rounding (`convert_np_to_float16`: clamped to fp16's range, tiny values kept non-zero).
    Why by hand: the converter converts weights held in memory, so the SDXL UNet's conversion held
    its 10 GB of fp32 weights and their 5 GB of fp16 copies together and was OOM-killed at 21.7 GiB
    on a 24 GiB machine (`benchmarks/results/export-memory-sdxl-cuda-target-cpu2.log`); this way it
    holds the graph's structure and one weight. The files come back as the graph and one data file
    (`store_weights_externally` would put an fp16 graph of this size in one anyway)."""
    import onnx
    from onnx import TensorProto
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data
    from onnxruntime.transformers.float16 import convert_float_to_float16, convert_np_to_float16

    from .optimize import external_data_readable_from
    from .weights import gather_external_data

    path = files[0]
    model = onnx.ModelProto()
    model.CopyFrom(structure)  # weights referenced, not loaded; nodes already named
    before = _external_types(model)
    # (type inference reads a Constant's value, the one kind of tensor it needs, from the graph's folder)
    with external_data_readable_from(path.parent):
        add_value_types(model, structure)
    with _value_info_from_dims():
        converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=keep, disable_shape_infer=True)
    removed = remove_fp16_round_trips(converted)
    logger.info("%s: %d fp32 → fp16 → fp32 round trips between fp32 nodes removed", spec.name, removed)
    topological_sort(converted.graph)
    halved = []

    def to_fp16(tensor, blob: bytes) -> bytes:
        if not uses_external_data(tensor):
            return blob  # held in the graph: the converter converted it itself
        info = ExternalDataInfo(tensor)
        was = before.get((info.location, int(info.offset or 0)))
        if was == TensorProto.FLOAT and tensor.data_type == TensorProto.FLOAT16:
            blob = convert_np_to_float16(np.frombuffer(blob, dtype=np.float32)).tobytes()
            halved.append(tensor.name)
        elif was != tensor.data_type:
            raise ValueError(f"{spec.name}: tensor {tensor.name!r} retyped {was} → {tensor.data_type}, "
                             "which the streamed fp16 conversion does not know how to write")
        size = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize * int(np.prod(tensor.dims, dtype=np.int64))
        if len(blob) != size:
            raise ValueError(f"{spec.name}: tensor {tensor.name!r} has {len(blob)} bytes for {size}")
        return blob

    data = gather_external_data(converted, path.parent, path, transform=to_fp16)
    for extra in files[1:]:
        if extra.resolve() != data.resolve():
            extra.unlink(missing_ok=True)
    logger.info("%s: %d of %d external tensors converted to fp16, streamed", spec.name, len(halved), len(before))
    return [path, data]
