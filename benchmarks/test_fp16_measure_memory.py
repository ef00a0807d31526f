"""Peak memory of the fp16 range measurement (export/fp16.py): measured here, not in tests/.

Measuring a graph's tensors must not keep them all alive (SD-1.5's UNet took over 24 GB that way);
benchmarks/export_memory.py measures the whole export of a real UNet, this the mechanism on a chain.
"""

from __future__ import annotations

import onnx


def _chain_graph(length: int):
    """x → `length` Adds in a chain → y: every link a tensor the size of x."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Add", [f"t{i}", "x"], [f"t{i + 1}"]) for i in range(length)]
    nodes.insert(0, helper.make_node("Identity", ["x"], ["t0"]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                              [helper.make_tensor_value_info(f"t{length}", TensorProto.FLOAT, ["n"])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])



def test_fp16_measurement_holds_no_more_than_a_plain_run(tmp_path):
    """Measuring a graph's tensors must not keep them all alive (SD-1.5's UNet took over 24 GB that
    way). A chain of 40 tensors of 64 MB each: read back whole they would take 2.5 GB."""
    import subprocess
    import sys


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
