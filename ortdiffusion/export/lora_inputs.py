"""LoRA as graph inputs: rewrite an exported UNet / text encoder so that every adaptable layer has a
low-rank side branch whose weights are inputs fed per run (runtime/lora.py feeds them).

    x ─► MatMul(W) ─► y              becomes      x ─► MatMul(W) ─► y_base ─► Add ─► y
                                                   └► MatMul(down) ─► MatMul(up) ┘

`down` is (in, rank), `up` (rank, out) with `rank` symbolic; a 1×1 Conv gets two 1×1 Convs instead.
The branch sits in an `If` on `rank > 0`: fed rank-0 arrays (no LoRA on that layer) the layer's
output passes through untouched. Computing an empty branch instead cost ~6 % of a step (ONNX
Runtime still writes the full-size zero delta and adds it: 1×1 Convs 108 ms, Adds 53 ms, MatMuls
42 ms of a 3.2 s sd15-arch step at 256², by its profiler); the `If` skips that. So one graph serves
no LoRA, one, or a blend of several (concatenated along the rank) and switching between them
rebuilds nothing. Only the .onnx
file changes: external weights stay where they are. The layers adapted are the ones LoRA trainers
target (diffusers/PEFT's attention projections and kohya's transformer blocks), found by the module
path torch's exporter writes into node names (`/unet/down_blocks.0/.../attn1/to_q/MatMul`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

from ..runtime.errors import ExportError
from ..runtime.lora import DOWN, RANK_DIM, UP, canonical_layer
from ..runtime.manifest import (FEED_LORA, TEXT_ENCODER, TEXT_ENCODER_2, UNET, ComponentManifest, Manifest, TensorInfo,
                                file_record, load_manifest, write_manifest)
from .staging import staged

logger = logging.getLogger(__name__)

#: The manifest's `extra` key listing each component's adapted layers.
LORA_TARGETS = "lora_targets"

#: Last module names a LoRA adapts, per component (kohya's SD defaults; diffusers' are a subset).
ADAPTED = {
    UNET: ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"),
    TEXT_ENCODER: ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}
ADAPTED[TEXT_ENCODER_2] = ADAPTED[TEXT_ENCODER]

#: The shared int64 zero the `If` conditions compare each branch's rank against.
ZERO = "lora_rank_zero"

_NODE = re.compile(r"^/(?P<path>.+)/(?P<op>MatMul|Gemm|Conv)(_\d+)?$")


def _layer_of(component: str, node_name: str) -> str | None:
    """The canonical layer name of an adaptable node, else None."""
    m = _NODE.match(node_name)
    if m is None:
        return None
    parts = m.group("path").split("/")[1:]  # the wrapper's attribute (`unet`, `model`) first
    module = ".".join(parts)
    if not any(module == suffix or module.endswith("." + suffix) for suffix in ADAPTED.get(component, ())):
        return None
    return canonical_layer(component, module)


def _weight_info(graph, name: str, producers: dict, initializers: dict) -> tuple[tuple[int, ...], int]:
    """(dims, compute dtype) of a weight: an initializer, possibly through a Cast (fp16-stored fp32)."""
    if name in initializers:
        t = initializers[name]
        return tuple(t.dims), t.data_type
    node = producers.get(name)
    if node is not None and node.op_type == "Cast" and node.input[0] in initializers:
        to = next(a.i for a in node.attribute if a.name == "to")
        return tuple(initializers[node.input[0]].dims), to
    raise ExportError(f"{name}: a LoRA target's weight is not a constant of the graph")


def rewrite(path: Path, component: str) -> list[TensorInfo]:
    """Add the LoRA side branches to the graph at `path` in place; the new inputs, in order."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    if any(i.name.endswith(DOWN) for i in graph.input):
        raise ExportError(f"{path}: already has LoRA inputs")
    initializers = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    nodes, inputs, infos, seen = [], [], [], set()
    for node in graph.node:
        nodes.append(node)
        layer = _layer_of(component, node.name)
        if layer is None or layer in seen:
            continue
        dims, dtype = _weight_info(graph, node.input[1], producers, initializers)
        if node.op_type == "Conv" and dims[2:] != (1, 1):
            continue  # a LoRA on a k×k conv (LoCon) fuses at export only
        if node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            in_f, out_f = (dims[1], dims[0]) if trans_b else (dims[0], dims[1])
        elif node.op_type == "Conv":
            in_f, out_f = dims[1], dims[0]
        else:
            in_f, out_f = dims[0], dims[1]
        seen.add(layer)
        down, up = layer + DOWN, layer + UP
        if node.op_type == "Conv":
            down_shape, up_shape = [RANK_DIM, in_f, 1, 1], [out_f, RANK_DIM, 1, 1]
        else:
            down_shape, up_shape = [in_f, RANK_DIM], [RANK_DIM, out_f]
        inputs += [helper.make_tensor_value_info(down, dtype, down_shape),
                   helper.make_tensor_value_info(up, dtype, up_shape)]
        kind = "float16" if dtype == TensorProto.FLOAT16 else "float32"
        infos += [TensorInfo(down, kind, tuple(down_shape)), TensorInfo(up, kind, tuple(up_shape))]
        y = node.output[0]
        base, mid, delta, rank, active = (f"{y}/lora_{s}" for s in ("base", "mid", "delta", "rank", "active"))
        node.output[0] = base
        op = "Conv" if node.op_type == "Conv" else "MatMul"
        prefix = node.name.rsplit("/", 1)[0]
        at = 0 if op == "Conv" else 1  # where `down` keeps its rank
        adapted = helper.make_graph(
            [helper.make_node(op, [node.input[0], down], [mid], name=f"{prefix}/lora_down"),
             helper.make_node(op, [mid, up], [delta], name=f"{prefix}/lora_up"),
             helper.make_node("Add", [base, delta], [f"{y}/lora_sum"], name=f"{prefix}/lora_add")],
            f"{prefix}/lora", [], [helper.make_tensor_value_info(f"{y}/lora_sum", dtype, None)])
        untouched = helper.make_graph(
            [helper.make_node("Identity", [base], [f"{y}/lora_pass"], name=f"{prefix}/lora_pass")],
            f"{prefix}/no_lora", [], [helper.make_tensor_value_info(f"{y}/lora_pass", dtype, None)])
        nodes += [helper.make_node("Shape", [down], [rank], name=f"{prefix}/lora_rank", start=at, end=at + 1),
                  helper.make_node("Greater", [rank, ZERO], [active], name=f"{prefix}/lora_active"),
                  helper.make_node("If", [active], [y], name=f"{prefix}/lora_if",
                                   then_branch=adapted, else_branch=untouched)]
    if not inputs:
        raise ExportError(f"{path}: no layer a LoRA adapts was found by name ({', '.join(ADAPTED.get(component, ()))}); "
                          "the graph may have been fused (export with --target generic)")
    del graph.node[:]
    graph.node.extend(nodes)
    graph.input.extend(inputs)
    graph.initializer.append(helper.make_tensor(ZERO, TensorProto.INT64, [1], [0]))
    onnx.save(model, str(path))
    logger.info("%s: %d layers take LoRA inputs", component, len(inputs) // 2)
    return infos


def add_lora_inputs(bundle_dir: Path | str, components: tuple[str, ...] = (UNET, TEXT_ENCODER, TEXT_ENCODER_2),
                    out_dir: Path | str | None = None) -> Manifest:
    """Give a bundle's UNet and text encoder(s) LoRA inputs, every other file as it is; published
    over the bundle (or to `out_dir`) like an export."""
    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir)
    out = Path(out_dir) if out_dir is not None else bundle_dir
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged(out) as tmp:
        shutil.copytree(bundle_dir, tmp, dirs_exist_ok=True, copy_function=_link_weights)
        manifest = add_lora_inputs_in_place(tmp, manifest, components)
    return manifest


def _link_weights(src: str, dst: str) -> None:
    """External weight files are never rewritten here (only the graphs are): a hard link instead of
    gigabytes copied where the file system allows; everything else is copied."""
    if src.endswith(".data"):
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def add_lora_inputs_in_place(bundle_dir: Path, manifest: Manifest,
                             components: tuple[str, ...] = (UNET, TEXT_ENCODER, TEXT_ENCODER_2)) -> Manifest:
    """The rewrite on a bundle directory being written (export's staging folder); its new manifest."""
    updated: dict[str, ComponentManifest] = dict(manifest.components)
    feeds = dict(manifest.unet_feeds())
    targets = {}
    for name in components:
        if name not in manifest.components:
            continue
        c = manifest.components[name]
        if any(i.name.endswith(DOWN) for i in c.inputs):
            raise ExportError(f"{name}: already has LoRA inputs")
        new = rewrite(bundle_dir / c.model_file.path, name)
        files = (file_record(bundle_dir, bundle_dir / c.model_file.path), *c.files[1:])
        updated[name] = replace(c, inputs=(*c.inputs, *new), files=files)
        targets[name] = len(new) // 2
        if name == UNET:
            feeds.update({i.name: FEED_LORA for i in new})
    manifest = replace(manifest, components=updated, pipeline=replace(manifest.pipeline, unet_feeds=feeds),
                       extra={**manifest.extra, LORA_TARGETS: targets})
    write_manifest(bundle_dir, manifest)
    return manifest


__all__ = ["ADAPTED", "LORA_TARGETS", "add_lora_inputs", "add_lora_inputs_in_place", "rewrite"]
