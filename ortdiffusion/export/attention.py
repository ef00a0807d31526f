"""Attention fusion for the CPU target: diffusers' attention cores → ONNX Runtime's MultiHeadAttention.

Why by hand: ONNX Runtime's CPU MultiHeadAttention (com.microsoft) runs fp32 attention without a
mask through MLAS's flash-attention kernel, which never materialises the [heads, S, S] score
matrix. For an SD-1.5 UNet at 512×512 those matrices are the largest tensors of the step (1.07 GB
each for QKᵀ and its softmax at batch 2) and why ONNX Runtime needed more memory than torch, whose
SDPA never builds them. The ready-made fusions do not get there on the CPU:
- onnxruntime.transformers' UNet fusion (`FusionAttentionUnet`) writes self-attention as the
  `Attention` op (whose CPU kernel materialises the scores) or as packed-QKV MultiHeadAttention (CUDA
  only);
- onnxscript's `ort_fusions` need static shapes and constant scales, which a TorchScript export
  with dynamic batch and size does not have (its scale is computed from a Shape).

So this pass matches the one pattern `torch.onnx.export` writes for diffusers' `Attention` with
`AttnProcessor2_0` (`F.scaled_dot_product_attention` without a mask, scale left at its default):

    q = Transpose(Reshape(Xq, [B, -1, N, H]), 0 2 1 3) · √s      Xq, Xk, Xv: the projections [B, S, N·H]
    k = Transpose(Reshape(Xk, [B, -1, N, H]), 0 2 3 1) · √s      s = 1/√H, computed from Shape(q)
    v = Transpose(Reshape(Xv, [B, -1, N, H]), 0 2 1 3)
    Y = Reshape(Transpose(Softmax(q @ k) @ v, 0 2 1 3), [B, -1, N·H])

and replaces it by `MultiHeadAttention(Xq, Xk, Xv, num_heads=N)`, whose default scale is 1/√H.
Anything that differs (a mask, another scale, another layout) is left as it is. It works on the
graph alone: initializers, external or not, are untouched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"


@dataclass
class _Graph:
    """Producer and consumer lookups over a graph's nodes."""

    graph: onnx.GraphProto

    def __post_init__(self):
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.initializers = {i.name: i for i in self.graph.initializer}

    def parent(self, node: onnx.NodeProto, index: int, op_type: str) -> onnx.NodeProto | None:
        if index >= len(node.input):
            return None
        p = self.producer.get(node.input[index])
        return p if p is not None and p.op_type == op_type else None

    def only_consumer(self, node: onnx.NodeProto, op_type: str) -> onnx.NodeProto | None:
        users = self.consumers.get(node.output[0], [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None

    def constant(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        p = self.producer.get(name)
        if p is not None and p.op_type == "Constant" and p.attribute and p.attribute[0].name == "value":
            return numpy_helper.to_array(p.attribute[0].t)
        return None

    def skip_casts(self, name: str) -> onnx.NodeProto | None:
        p = self.producer.get(name)
        while p is not None and p.op_type == "Cast":
            p = self.producer.get(p.input[0])
        return p


def _perm(node: onnx.NodeProto | None) -> list[int] | None:
    if node is None:
        return None
    for a in node.attribute:
        if a.name == "perm":
            return list(a.ints)
    return None


def _split_heads(g: _Graph, transpose: onnx.NodeProto | None, perm: list[int]) -> tuple[str, int] | None:
    """(the [B, S, N·H] input, N) of `Transpose(Reshape(X, [B, -1, N, H]), perm)`."""
    if _perm(transpose) != perm:
        return None
    reshape = g.parent(transpose, 0, "Reshape")
    if reshape is None:
        return None
    concat = g.parent(reshape, 1, "Concat")
    heads = None
    if concat is not None and len(concat.input) == 4:
        value = g.constant(concat.input[2])
        heads = int(value.reshape(-1)[0]) if value is not None and value.size == 1 else None
    else:
        shape = g.constant(reshape.input[1])
        heads = int(shape[2]) if shape is not None and shape.size == 4 and shape[2] > 0 else None
    return (reshape.input[0], heads) if heads else None


def _default_scale_factor(g: _Graph, mul: onnx.NodeProto, q_transposed: str) -> str | None:
    """The name of √s if `mul` is `X · Sqrt(s)` with s = 1 / Sqrt(Shape(q)[-1]), the default scale."""
    root = g.parent(mul, 1, "Sqrt")
    div = g.skip_casts(root.input[0]) if root is not None else None
    if div is None or div.op_type != "Div":
        return None
    one = g.constant(div.input[0])
    if one is None or one.size != 1 or float(one.reshape(-1)[0]) != 1.0:
        return None
    sqrt = g.skip_casts(div.input[1])
    sl = g.skip_casts(sqrt.input[0]) if sqrt is not None and sqrt.op_type == "Sqrt" else None
    if sl is None or sl.op_type != "Slice":
        return None
    start = g.constant(sl.input[1])
    shape = g.producer.get(sl.input[0])
    if start is None or start.reshape(-1).tolist() != [-1] or shape is None or shape.op_type != "Shape":
        return None
    if shape.input[0] != q_transposed:
        return None
    return root.input[0]


def fuse_attention(model: onnx.ModelProto) -> int:
    """Fuse every matching attention core of `model` (in place); return how many were fused."""
    g = _Graph(model.graph)
    remove: set[int] = set()
    add: list[tuple[int, onnx.NodeProto]] = []  # (index of the node it replaces, new node)
    index = {id(n): i for i, n in enumerate(model.graph.node)}
    for softmax in [n for n in model.graph.node if n.op_type == "Softmax"]:
        axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
        if axis not in (-1, 3):
            continue
        scores = g.parent(softmax, 0, "MatMul")
        pv = g.only_consumer(softmax, "MatMul")
        if scores is None or pv is None or pv.input[0] != softmax.output[0]:
            continue
        q_mul, k_mul = g.parent(scores, 0, "Mul"), g.parent(scores, 1, "Mul")
        if q_mul is None or k_mul is None:
            continue
        q_t, k_t = g.parent(q_mul, 0, "Transpose"), g.parent(k_mul, 0, "Transpose")
        v_t = g.parent(pv, 1, "Transpose")
        q, k, v = (_split_heads(g, q_t, [0, 2, 1, 3]), _split_heads(g, k_t, [0, 2, 3, 1]),
                   _split_heads(g, v_t, [0, 2, 1, 3]))
        if not (q and k and v) or not (q[1] == k[1] == v[1]):
            continue
        sq = _default_scale_factor(g, q_mul, q_t.output[0])
        if sq is None or _default_scale_factor(g, k_mul, q_t.output[0]) != sq:
            continue
        out_t = g.only_consumer(pv, "Transpose")
        out = g.only_consumer(out_t, "Reshape") if _perm(out_t) == [0, 2, 1, 3] else None
        if out is None:
            continue
        # Intermediate results must not be used outside the core (they will be gone).
        inner = [q_mul, k_mul, scores, softmax, pv, out_t]
        if any(len(g.consumers.get(n.output[0], [])) != 1 for n in inner):
            continue
        name = softmax.name.rsplit("/", 1)[0] + "/MultiHeadAttention" if "/" in softmax.name else f"MHA_{len(add)}"
        mha = helper.make_node("MultiHeadAttention", [q[0], k[0], v[0]], [out.output[0]], name=name,
                               domain=MS_DOMAIN, num_heads=q[1])
        for n in (*inner, out):
            remove.add(index[id(n)])
        add.append((index[id(out)], mha))
    if not add:
        return 0
    by_place = dict(add)
    nodes = []
    for i, n in enumerate(model.graph.node):
        if i in by_place:
            nodes.append(by_place[i])
        if i not in remove:
            nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _remove_dead_nodes(model.graph)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    logger.info("fused %d attention cores into MultiHeadAttention", len(add))
    return len(add)


def _remove_dead_nodes(graph: onnx.GraphProto) -> None:
    """Drop nodes none of whose outputs is used (the reshapes' shape arithmetic, the scales)."""
    outputs = {o.name for o in graph.output}
    while True:
        used = outputs | {i for n in graph.node for i in n.input}
        keep = [n for n in graph.node if any(o in used for o in n.output if o)]
        if len(keep) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(keep)
