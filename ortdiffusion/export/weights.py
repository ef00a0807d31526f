"""Storing fp32 weights in half the bytes when that loses nothing.

A checkpoint saved in fp16 (like the built-in model's) is exported from fp32 modules whose weights
are all exactly representable in fp16. Such initializers are stored as fp16 with a Cast back to
fp32 in front of their users; ONNX Runtime folds the Cast when it loads the graph, so the graph
computes in fp32 exactly as before (parity is measured after this step) at half the file size.
Weights that fp16 cannot hold exactly stay fp32.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

MIN_ELEMENTS = 64  # a Cast node per tiny tensor costs more than it saves


def store_exact_fp32_weights_as_fp16(path: Path) -> int:
    """Rewrite `path` in place; return the number of initializers converted."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    kept, casts, converted = [], [], 0
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            kept.append(init)
            continue
        values = numpy_helper.to_array(init)
        half = values.astype(np.float16)
        if values.size < MIN_ELEMENTS or not np.array_equal(half.astype(np.float32), values):
            kept.append(init)
            continue
        stored = numpy_helper.from_array(half, f"{init.name}__fp16")
        kept.append(stored)
        casts.append(helper.make_node("Cast", [stored.name], [init.name], to=onnx.TensorProto.FLOAT,
                                      name=f"{init.name}__to_fp32"))
        converted += 1
    if converted:
        del graph.initializer[:]
        graph.initializer.extend(kept)
        nodes = list(graph.node)
        del graph.node[:]
        graph.node.extend(casts + nodes)  # Casts first keeps the graph topologically sorted
        onnx.save(model, str(path))
    logger.info("%s: %d initializers stored as fp16 (exactly representable)", path.name, converted)
    return converted
