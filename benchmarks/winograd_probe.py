"""Would Winograd convolutions make the fp32 CPU UNet faster? One 3×3 convolution at each shape the
SD-1.5 UNet (256×256 images, batch 2 for guidance) and VAE decoder run, on ONNX Runtime's CPU
provider: the plain Conv (MLAS's NCHWc kernel) against the same convolution written as Winograd
F(2×2, 3×3) and F(4×4, 3×3) out of standard ONNX operators.

    python benchmarks/winograd_probe.py --out benchmarks/results/winograd-probe-cpu2.json

Why this probe (issue 7): the profile of a UNet step puts convolutions at 56 % and MatMuls at 31 %
of the time, both at about this machine's matrix-product rate, so fp32 can only get faster by doing
fewer multiplications. Winograd F(m×m, 3×3) does 9m²/(m+2)² times fewer (2.25× for m = 2, 4× for
m = 4) at the price of transforms and of weights stored transformed, (m+2)²/9 times larger.

The Winograd graph (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2015):
  input transform  Bᵀ d B per (m+2)² tile, stride m: a depthwise Conv with fixed kernels
  products         per tile position, a MatMul over channels with U = G g Gᵀ (precomputed)
  output transform Aᵀ M A: a grouped 1×1 Conv, then DepthToSpace
with the transposes between them kept to moves of whole rows (the innermost axis unchanged):
an element-wise transpose made the first version slower than the plain Conv.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

# F(2,3) and F(4,3) with the interpolation points 0, ±1 (, ±2) and ∞ (Lavin & Gray, section 4)
MATRICES = {
    2: (np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], float),
        np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], float),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], float)),
    4: (np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                  [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], float),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], float),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], float)),
}

# (batch, in channels, out channels, side): the UNet's levels at 256×256 (latents 32×32), then the VAE decoder's
SHAPES = [(2, 320, 320, 32), (2, 640, 640, 16), (2, 1280, 1280, 8), (2, 1280, 1280, 4),
          (1, 512, 512, 32), (1, 256, 256, 128), (1, 128, 128, 256)]


def conv_graph(n: int, c: int, k: int, side: int, m: int | None, weight: np.ndarray, bias: np.ndarray):
    """A model computing Conv(x, weight, bias, pads 1) directly (m None) or as Winograd F(m, 3)."""
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, c, side, side])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, k, side, side])
    inits, nodes = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    if m is None:
        nodes.append(helper.make_node("Conv", ["x", const("w", weight), const("b", bias)], ["y"], pads=[1, 1, 1, 1]))
    else:
        bt, g, at = MATRICES[m]
        a, tiles = m + 2, (side // m) ** 2
        kin = np.einsum("iu,jv->ijuv", bt, bt).reshape(a * a, 1, a, a)
        u = np.einsum("iu,kcuv,jv->ijkc", g, weight.astype(float), g).reshape(a * a, k, c)
        kout = np.einsum("iu,jv->ijuv", at, at).reshape(m * m, a * a, 1, 1)
        nodes += [
            helper.make_node("Conv", ["x", const("bt", np.tile(kin, (c, 1, 1, 1)).astype(np.float32))], ["v"],
                             group=c, strides=[m, m], pads=[1, 1, 1, 1], kernel_shape=[a, a]),
            helper.make_node("Reshape", ["v", const("s1", np.array([n, c, a * a, tiles]))], ["v1"]),
            helper.make_node("Transpose", ["v1"], ["v2"], perm=[2, 1, 0, 3]),  # [a², C, N, T]
            helper.make_node("Reshape", ["v2", const("s2", np.array([a * a, c, n * tiles]))], ["v3"]),
            helper.make_node("MatMul", [const("u", u.astype(np.float32)), "v3"], ["p"]),  # [a², K, N·T]
            helper.make_node("Reshape", ["p", const("s3", np.array([a * a, k, n, tiles]))], ["p1"]),
            helper.make_node("Transpose", ["p1"], ["p2"], perm=[2, 1, 0, 3]),  # [N, K, a², T]
            helper.make_node("Reshape", ["p2", const("s4", np.array([n, k * a * a, side // m, side // m]))], ["p3"]),
            helper.make_node("Conv", ["p3", const("at", np.tile(kout, (k, 1, 1, 1)).astype(np.float32)),
                                      const("bo", np.repeat(bias, m * m).astype(np.float32))], ["y1"],
                             group=k, kernel_shape=[1, 1]),
            helper.make_node("DepthToSpace", ["y1"], ["y"], blocksize=m, mode="CRD"),
        ]
    graph = helper.make_graph(nodes, "conv", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def time_model(model, x: np.ndarray, runs: int) -> tuple[float, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": x})[0]
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    return float(np.median(times)), y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for n, c, k, side in SHAPES:
        weight = (rng.standard_normal((k, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
        bias = rng.standard_normal(k).astype(np.float32)
        x = rng.standard_normal((n, c, side, side)).astype(np.float32)
        direct_s, direct_y = time_model(conv_graph(n, c, k, side, None, weight, bias), x, args.runs)
        row = {"batch": n, "channels_in": c, "channels_out": k, "side": side, "direct_ms": direct_s * 1e3,
               "gflop": 2 * n * side * side * 9 * c * k / 1e9}
        for m in (2, 4):
            if side % m:
                continue
            s, y = time_model(conv_graph(n, c, k, side, m, weight, bias), x, args.runs)
            row[f"F{m}_ms"] = s * 1e3
            row[f"F{m}_speedup"] = direct_s / s
            row[f"F{m}_rel_l2"] = float(np.linalg.norm(y - direct_y) / np.linalg.norm(direct_y))
            row[f"F{m}_weight_factor"] = (m + 2) ** 2 / 9
        rows.append(row)
        print(f"{n}×{c}→{k}×{side}²: direct {row['direct_ms']:.2f} ms ({row['gflop'] / direct_s:.0f} GFLOP/s)"
              + "".join(f" | F({m},3) {row[f'F{m}_ms']:.2f} ms ({row[f'F{m}_speedup']:.2f}×, "
                        f"rel L2 {row[f'F{m}_rel_l2']:.1e})" for m in (2, 4) if f"F{m}_ms" in row), flush=True)
    if args.out:
        import onnxruntime as ort

        with open(args.out, "w") as f:
            json.dump({"machine": platform.processor() or platform.machine(), "onnxruntime": ort.__version__,
                       "threads": 2, "runs": args.runs, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
