"""How fast could a few-step image be on this CPU at all? (issue 29: the ≤ 2.5 s target)

    python benchmarks/few_step_floor.py --model sd-turbo-arch --sizes 512,448,384,320,256 \\
        --bench benchmarks/results/bench-sd-turbo-512-1step-tiny-cpu2.json ... \\
        --out benchmarks/results/few-step-floor-sd-turbo-512-cpu2.json

1. Counts the FLOPs of each network of the checkpoint at one image of the size (batch 1, no
   guidance, as SD-Turbo runs): the text encoder, one UNet evaluation, the VAE's full decoder
   (post_quant_conv included) and the tiny decoder (AutoencoderTiny, TAESD's config), with
   torch's FlopCounterMode. The modules are built on torch's meta device: shapes only, no weights,
   no arithmetic, so the count costs a second and no memory (it is checked against a real CPU
   count of the UNet at a small size, `--check`).
2. Measures this machine's matrix-product rates on a 4096² product: fp32 (numpy's BLAS, the same
   yardstick as `ortdiffusion bench`'s `fp32_matmul_gflops`; and ONNX Runtime's MatMul) and int8
   (ONNX Runtime's MatMulInteger and QLinearMatMul, uint8 × int8, the kernels our int8 UNet runs).
3. The floor of each component: its FLOPs over the rate — the time it would take if every FLOP
   ran at the speed of one large matrix product, which no network reaches (convolutions,
   attention's softmax, normalizations and small matrices all run slower). A floor above the
   target means the target is out of reach on this CPU, whatever the engine.
4. With `--bench`, the measured stage times (p50) of each record in those `ortdiffusion bench`
   JSON files, beside the floors.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def count_gflop(module, *args, **kwargs) -> float:
    import torch

    from ortdiffusion.bench.diffusers_engines import flop_counter  # counts SDPA's CPU kernel too

    counter = flop_counter()
    with torch.no_grad(), counter:
        module(*args, **kwargs)
    return counter.get_total_flops() / 1e9


def build(cls, config_dir: Path, device: str):
    import torch

    config = cls.load_config(str(config_dir))
    with torch.device(device):
        return cls.from_config(config).eval()


def component_gflop(checkpoint: Path, size: int, device: str = "meta") -> dict[str, float]:
    """GFLOP of each network at one `size`×`size` image, batch 1, no guidance."""
    import diffusers
    import torch
    import transformers

    from ortdiffusion.export.presets import TINY_DECODER_DIR

    latent = size // 8
    text_config = transformers.CLIPTextConfig.from_pretrained(str(checkpoint / "text_encoder"))
    with torch.device(device):
        text_encoder = transformers.CLIPTextModel(text_config).eval()
    unet = build(diffusers.UNet2DConditionModel, checkpoint / "unet", device)
    vae = build(diffusers.AutoencoderKL, checkpoint / "vae", device)
    tiny = build(diffusers.AutoencoderTiny, checkpoint / TINY_DECODER_DIR, device)
    tokens = text_config.max_position_embeddings
    ids = torch.zeros((1, tokens), dtype=torch.long, device=device)
    z = torch.zeros((1, unet.config.in_channels, latent, latent), device=device)
    context = torch.zeros((1, tokens, unet.config.cross_attention_dim), device=device)
    return {
        "text_encoder": count_gflop(text_encoder, ids),
        "unet_step": count_gflop(unet, z, torch.tensor(999, device=device), context),
        "vae_decoder": count_gflop(vae.decode, z),
        "tiny_decoder": count_gflop(tiny.decode, z),
    }


def best_seconds(run, repeats: int) -> float:
    run()  # warm-up: thread pool, pages, kernel choice
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_rates(n: int = 4096, repeats: int = 3) -> dict[str, float]:
    """GFLOP/s (2·n³ operations per product; for int8, integer multiply-adds counted alike)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    ops = 2 * n**3 / 1e9
    rng = np.random.default_rng(0)
    a32, b32 = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    rates = {"numpy_fp32": ops / best_seconds(lambda: a32 @ b32, repeats)}

    a8 = rng.integers(0, 256, (n, n), dtype=np.uint8)
    b8 = rng.integers(-127, 128, (n, n), dtype=np.int8)

    def session(node, inputs, initializers, out_type):
        graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", out_type, [n, n])],
                                  initializer=initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        with tempfile.TemporaryDirectory() as d:  # the weight as an initializer, as in our int8 UNet
            path = os.path.join(d, "m.onnx")
            onnx.save(model, path)
            return ort.InferenceSession(path, providers=["CPUExecutionProvider"])

    a_info = helper.make_tensor_value_info
    fp32 = session(helper.make_node("MatMul", ["a", "b"], ["y"]), [a_info("a", TensorProto.FLOAT, [n, n])],
                   [onnx.numpy_helper.from_array(b32, "b")], TensorProto.FLOAT)
    rates["onnxruntime_fp32_matmul"] = ops / best_seconds(lambda: fp32.run(None, {"a": a32}), repeats)
    integer = session(helper.make_node("MatMulInteger", ["a", "b", "a_zero"], ["y"]),
                      [a_info("a", TensorProto.UINT8, [n, n])],
                      [onnx.numpy_helper.from_array(b8, "b"), onnx.numpy_helper.from_array(np.uint8(128), "a_zero")],
                      TensorProto.INT32)
    rates["onnxruntime_int8_matmulinteger"] = ops / best_seconds(lambda: integer.run(None, {"a": a8}), repeats)
    scalars = [onnx.numpy_helper.from_array(np.float32(0.02), "a_scale"),
               onnx.numpy_helper.from_array(np.uint8(128), "a_zero"),
               onnx.numpy_helper.from_array(np.float32(0.01), "b_scale"),
               onnx.numpy_helper.from_array(np.int8(0), "b_zero"),
               onnx.numpy_helper.from_array(np.float32(0.5), "y_scale"),
               onnx.numpy_helper.from_array(np.uint8(128), "y_zero")]
    qlinear = session(helper.make_node("QLinearMatMul", ["a", "a_scale", "a_zero", "b", "b_scale", "b_zero",
                                                         "y_scale", "y_zero"], ["y"]),
                      [a_info("a", TensorProto.UINT8, [n, n])], [onnx.numpy_helper.from_array(b8, "b"), *scalars],
                      TensorProto.UINT8)
    rates["onnxruntime_int8_qlinearmatmul"] = ops / best_seconds(lambda: qlinear.run(None, {"a": a8}), repeats)
    return rates


def measured(bench_files: list[Path]) -> list[dict]:
    rows = []
    for path in bench_files:
        report = json.loads(path.read_text())
        for r in report["records"]:
            stages = {name: r["stages_s"][name]["p50"] for name in ("text_encoder", "unet_step", "decoder")
                      if name in r["stages_s"]}
            rows.append({"file": path.name, "engine": r["engine"], "precision": r["precision"],
                         "width": r["width"], "height": r["height"], "steps": r["steps"],
                         "end_to_end_p50_s": r["end_to_end_s"]["p50"], "stages_p50_s": stages,
                         "load_1min": (r.get("machine_load") or {}).get("load_1min"),
                         "fp32_matmul_gflops_of_run": report["env"].get("fp32_matmul_gflops")})
    return rows


def floor_totals(floors: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """End-to-end floors at 1 and 4 steps, with each decoder: all fp32; as our int8 bundles run (the
    UNet in int8, the text encoder and decoders in fp32); everything at the int8 rate."""
    def fp32(c):
        return floors[c]["floor_fp32_s"]

    def int8(c):
        return floors[c]["floor_int8_s"]

    return {f"{steps} step{'s' if steps > 1 else ''}, {decoder}": {
        "fp32_s": fp32("text_encoder") + steps * fp32("unet_step") + fp32(decoder),
        "int8_unet_s": fp32("text_encoder") + steps * int8("unet_step") + fp32(decoder),
        "all_int8_s": int8("text_encoder") + steps * int8("unet_step") + int8(decoder),
    } for steps in (1, 4) for decoder in ("vae_decoder", "tiny_decoder")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd-turbo-arch")
    parser.add_argument("--sizes", default="512,448,384,320,256", help="image sides, comma-separated (multiples of 64)")
    parser.add_argument("--bench", type=Path, action="append", default=[], help="`ortdiffusion bench` JSON")
    parser.add_argument("--check", action="store_true",
                        help="also count the UNet on the CPU at a 128×128 image, against the meta count")
    parser.add_argument("--rates-from", type=Path, help="an earlier output of this script: its rates, not measured again")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from ortdiffusion.models import resolve_checkpoint

    checkpoint = resolve_checkpoint(args.model)
    sizes = [int(s) for s in args.sizes.split(",")]
    gflop = {size: component_gflop(checkpoint, size) for size in sizes}
    for size in sizes:
        print(f"GFLOP at {size}:", json.dumps({k: round(v, 1) for k, v in gflop[size].items()}))
    check = None
    if args.check:
        meta, cpu = component_gflop(checkpoint, 128)["unet_step"], component_gflop(checkpoint, 128, "cpu")["unet_step"]
        check = {"size": 128, "unet_step_meta_gflop": meta, "unet_step_cpu_gflop": cpu}
        print("check:", check)
    if args.rates_from:
        earlier = json.loads(args.rates_from.read_text())
        load, rates = earlier["load_1min_before_rates"], earlier["rates_gflops"]
        check = check or earlier.get("meta_count_check")
    else:
        load = os.getloadavg()[0]
        rates = matmul_rates()
    print("rates GFLOP/s:", json.dumps({k: round(v, 1) for k, v in rates.items()}))
    fp32 = max(rates["numpy_fp32"], rates["onnxruntime_fp32_matmul"])
    int8 = max(rates["onnxruntime_int8_matmulinteger"], rates["onnxruntime_int8_qlinearmatmul"])
    per_size = {}
    for size in sizes:
        floors = {name: {"gflop": g, "floor_fp32_s": g / fp32, "floor_int8_s": g / int8}
                  for name, g in gflop[size].items()}
        per_size[f"{size}x{size}"] = {"components": floors, "floor_totals_s": floor_totals(floors)}
    out = {"model": args.model, "batch": 1, "guidance": "none (1 UNet row)", "cores": os.cpu_count(),
           "load_1min_before_rates": load, "rates_gflops": rates, "fp32_rate_used": fp32, "int8_rate_used": int8,
           "sizes": per_size, "target_s": 2.5, "meta_count_check": check, "measured": measured(args.bench)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v["floor_totals_s"] for k, v in per_size.items()}, indent=1))


if __name__ == "__main__":
    main()
