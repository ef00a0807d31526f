"""The guidance + scheduler step as an ONNX graph, so the denoising loop can stay on the GPU.

Built with `onnx` here (an export-side dependency) and shipped as package data in
`ortdiffusion/runtime/graphs/`, which the runtime loads with ONNX Runtime alone; a test checks the
shipped files are what this module builds. Regenerate after a change with

    python -m ortdiffusion.export.step_graph

Every scheduler step is linear (`runtime.schedulers.linear_step.LinearStep`), so one graph serves
them all. The per-step scalars (one row per step, laid out as `runtime.device_loop.COEFFICIENTS`
says) and the per-step noise are uploaded once as tables before the loop; the graph reads row
`step` and returns `step + 1`, so within the loop the host sends nothing. Outputs are written
straight into the buffers the next UNet step reads (its scaled, doubled input and its timestep), so
nothing returns to the host either.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..runtime.device_loop import COEFFICIENTS, PIXEL_GRAPHS, STEP_GRAPHS

OPSET = 17


def build(guided: bool, blended: bool = False, rescaled: bool = False) -> onnx.ModelProto:
    """The step graph; `blended`: inpainting with a plain UNet, the kept region put back after the
    step (next = blend_mask · next + known_table[step], as `Plan.blend` does on the host);
    `rescaled`: the guided prediction rescaled as `plan.rescale_guidance` does (`guidance_rescale`)."""
    if rescaled and not guided:
        raise ValueError("guidance_rescale applies to guided steps only")
    f32 = TensorProto.FLOAT
    latent = ["batch", "channels", "height", "width"]
    unet_batch = ["unet_batch", "channels", "height", "width"]
    nodes, inits = [], []

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    # 0. this step's row of the coefficient and noise tables, each coefficient a (1,)-shaped tensor
    #    named as in COEFFICIENTS, and the step counter for the next step
    #    (`step` and `nonfinite` are (1,)-shaped: ONNX Runtime's Python OrtValues have no 0-d form)
    inits += [numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0"),
              numpy_helper.from_array(np.array([1], dtype=np.int64), "one")]
    row = node("Gather", ["coefficient_table", "step"], "coefficient_row", axis=0)
    nodes.append(helper.make_node("Split", [node("Squeeze", [row, "axis0"], "coefficients")], list(COEFFICIENTS), axis=0))
    node("Squeeze", [node("Gather", ["noise_table", "step"], "noise_row", axis=0), "axis0"], "noise")
    node("Add", ["step", "one"], "step_out")
    # 1. classifier-free guidance: uncond + g (cond − uncond), the halves stacked [uncond; cond]
    if guided:
        nodes.append(helper.make_node("Split", ["prediction"], ["uncond", "cond"], axis=0))
        diff = node("Sub", ["cond", "uncond"], "guidance_diff")
        scaled = node("Mul", [diff, "guidance_scale"], "guidance_scaled")
        output = node("Add", ["uncond", scaled], "guided")
        if rescaled:  # diffusers' rescale_noise_cfg: g · (φ · std(cond) / std(g) + 1 − φ), std per image
            ratio = node("Div", [_std(node, "cond"), _std(node, output)], "std_ratio")
            inits.append(numpy_helper.from_array(np.array([1.0], dtype=np.float32), "one_f"))
            keep = node("Sub", ["one_f", "guidance_rescale"], "rescale_keep")
            factor = node("Add", [node("Mul", [ratio, "guidance_rescale"], "rescale_part"), keep], "rescale_factor")
            output = node("Mul", [output, factor], "guided_rescaled")
    else:
        output = "prediction"
    # 2. x₀ = a · sample + b · output, clipped to ±clip (clip = inf: no clipping)
    x0 = node("Add", [node("Mul", ["sample", "x0_sample"], "x0_a"),
                      node("Mul", [output, "x0_output"], "x0_b")], "x0_raw")
    high = node("Squeeze", ["clip"], "clip_high")  # Clip takes 0-d bounds
    x0 = node("Clip", [x0, node("Neg", [high], "clip_low"), high], "x0")
    # 3. next = c_s sample + c_o output + c_x x₀ + c_p x₀(previous) + c_n noise + offset
    terms = [node("Mul", ["sample", "sample_coefficient"], "t_sample"),
             node("Mul", [output, "output_coefficient"], "t_output"),
             node("Mul", [x0, "x0_coefficient"], "t_x0"),
             node("Mul", ["previous_x0", "previous_x0_coefficient"], "t_previous"),
             node("Mul", ["noise", "noise_coefficient"], "t_noise"),
             "offset"]
    acc = terms[0]
    for k, term in enumerate(terms[1:]):
        last = k == len(terms) - 2
        acc = node("Add", [acc, term], "next_sample" if last and not blended else f"next_{k}")
    if blended:
        known = node("Squeeze", [node("Gather", ["known_table", "step"], "known_row", axis=0), "axis0"], "known")
        acc = node("Add", [node("Mul", ["blend_mask", acc], "repainted"), known], "next_sample")
    # 4. the next UNet step's input: the latents scaled by the scheduler (twice over when guided)
    model_input = node("Mul", [acc, "next_input_scale"], "model_input" if not guided else "model_input_half")
    if guided:
        model_input = node("Concat", [model_input, model_input], "model_input", axis=0)
    batch = node("Slice", [node("Shape", [model_input], "model_input_shape"), "axis0", "one"], "unet_batch_size")
    node("Expand", ["next_timestep", batch], "timestep")
    # 5. the NaN guard: a running count of non-finite latent values, read once after the loop
    bad = node("Or", [node("IsNaN", [acc], "is_nan"), node("IsInf", [acc], "is_inf")], "not_finite")
    count = node("ReduceSum", [node("Cast", [bad], "not_finite_f", to=f32)], "not_finite_count", keepdims=0)
    node("Add", ["nonfinite", count], "nonfinite_out")

    inputs = [
        helper.make_tensor_value_info("prediction", f32, unet_batch if guided else latent),
        helper.make_tensor_value_info("sample", f32, latent),
        helper.make_tensor_value_info("previous_x0", f32, latent),
        helper.make_tensor_value_info("noise_table", f32, ["rows", *latent]),
        helper.make_tensor_value_info("coefficient_table", f32, ["rows", len(COEFFICIENTS)]),
        helper.make_tensor_value_info("step", TensorProto.INT64, [1]),
        helper.make_tensor_value_info("nonfinite", f32, [1]),
    ]
    if blended:
        inputs += [helper.make_tensor_value_info("blend_mask", f32, ["batch", 1, "height", "width"]),
                   helper.make_tensor_value_info("known_table", f32, ["steps", *latent])]
    outputs = [
        helper.make_tensor_value_info("next_sample", f32, latent),
        helper.make_tensor_value_info("x0", f32, latent),
        helper.make_tensor_value_info("model_input", f32, unet_batch if guided else latent),
        helper.make_tensor_value_info("timestep", f32, ["unet_batch"]),
        helper.make_tensor_value_info("step_out", TensorProto.INT64, [1]),
        helper.make_tensor_value_info("nonfinite_out", f32, [1]),
    ]
    name = STEP_GRAPHS[(guided, blended, rescaled)].removesuffix(".onnx")
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="ortdiffusion")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _std(node, x: str) -> str:
    """The population standard deviation of `x` over all but the batch axis, kept (batch, 1, 1, 1)."""
    centred = node("Sub", [x, node("ReduceMean", [x], f"{x}_mean", axes=[1, 2, 3], keepdims=1)], f"{x}_centred")
    variance = node("ReduceMean", [node("Mul", [centred, centred], f"{x}_sq")], f"{x}_var", axes=[1, 2, 3], keepdims=1)
    return node("Sqrt", [variance], f"{x}_std")


def build_to_uint8(dtype: str = "float32") -> onnx.ModelProto:
    """The decoder's pixels in [-1, 1] (NCHW, `dtype`) → 8-bit images (NHWC), on the device, so a
    quarter of the bytes come back: diffusers' postprocess, the host's step 7 in the same float32
    operations in the same order (x / 2 + 0.5, clipped to [0, 1], · 255, rounded half to even), so
    the bytes match. Also the count of non-finite pixel values, the decoder's NaN guard: where it is
    not 0 the runtime reads the float pixels and decodes again in fp32 (`ImageDecoder.checked`)."""
    f32 = TensorProto.FLOAT
    nodes = []

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    inits = [numpy_helper.from_array(np.array(v, dtype=np.float32), n)
             for n, v in (("two", 2.0), ("half", 0.5), ("zero", 0.0), ("unit", 1.0), ("full", 255.0))]
    x = node("Cast", ["pixels"], "pixels_f32", to=f32) if dtype == "float16" else "pixels"
    unit = node("Clip", [node("Add", [node("Div", [x, "two"], "halved"), "half"], "shifted"), "zero", "unit"], "unit_range")
    levels = node("Round", [node("Mul", [node("Transpose", [unit], "nhwc", perm=[0, 2, 3, 1]), "full"], "scaled")],
                  "rounded")
    node("Cast", [levels], "image", to=TensorProto.UINT8)
    bad = node("Or", [node("IsNaN", [x], "is_nan"), node("IsInf", [x], "is_inf")], "not_finite")
    count = node("ReduceSum", [node("Cast", [bad], "not_finite_f", to=f32)], "count", keepdims=0)
    node("Reshape", [count, node("Constant", [], "one_element", value_ints=[1])], "nonfinite")
    kind = TensorProto.FLOAT16 if dtype == "float16" else f32
    graph = helper.make_graph(
        nodes, PIXEL_GRAPHS[dtype].removesuffix(".onnx"),
        [helper.make_tensor_value_info("pixels", kind, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", "height", "width", 3]),
         helper.make_tensor_value_info("nonfinite", f32, [1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="ortdiffusion")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def write(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for (guided, blended, rescaled), name in STEP_GRAPHS.items():
        path = folder / name
        path.write_bytes(build(guided, blended, rescaled).SerializeToString(deterministic=True))
        paths.append(path)
    for dtype, name in PIXEL_GRAPHS.items():
        path = folder / name
        path.write_bytes(build_to_uint8(dtype).SerializeToString(deterministic=True))
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write(Path(__file__).resolve().parent.parent / "runtime" / "graphs"):
        print(p)
