"""Would the OpenVINO execution provider make the fp32 CPU UNet faster? (issue 7)

    pip install onnxruntime-ep-openvino==1.8.1 openvino==2026.4.1     # into a separate venv
    python benchmarks/openvino_probe.py --model sd15-arch --out benchmarks/results/openvino-probe-cpu2.json

1. Registers ONNX Runtime's OpenVINO plugin EP (`onnxruntime-ep-openvino`) and lists the devices
   it offers on this machine.
2. Times one UNet step (256×256 images: latents 2×4×32×32, batch 2 for guidance) of the generic
   export on ONNX Runtime's CPU provider, and of the same ONNX graph compiled by OpenVINO itself
   (static shapes, latency hint, 2 threads) with the inference precision hint f32 and bf16, with
   the relative L2 distance of each output from the CPU provider's.

Neither package is a dependency of ortdiffusion: this is a probe, its result is in
`benchmarks/results/cpu-speed-cpu2.md`.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def timed(run, runs: int) -> tuple[float, np.ndarray]:
    out = run()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15-arch")
    parser.add_argument("--side", type=int, default=32, help="latent side (image side / 8)")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import onnxruntime as ort
    import onnxruntime_ep_openvino as ov_ep
    import openvino as ov

    from ortdiffusion.models import resolve_bundle

    report: dict = {"onnxruntime": ort.__version__, "openvino": ov.__version__}
    ort.register_execution_provider_library("openvino_ep", ov_ep.get_library_path())
    report["cpu_vendor"] = [d.device.vendor for d in ort.get_ep_devices() if d.ep_name == "CPUExecutionProvider"]
    report["openvino_ep_devices"] = [dict(d.ep_metadata) for d in ort.get_ep_devices() if d.ep_name == ov_ep.get_ep_name()]
    core = ov.Core()
    report["openvino_devices"] = core.available_devices
    report["openvino_default_precision"] = str(core.get_property("CPU", "INFERENCE_PRECISION_HINT"))

    unet = resolve_bundle(args.model) / "unet.onnx"
    rng = np.random.default_rng(0)
    s = args.side
    feeds = {"sample": rng.standard_normal((2, 4, s, s), dtype=np.float32),
             "timestep": np.array([500, 500], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 768), dtype=np.float32)}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(unet), options, providers=["CPUExecutionProvider"])
    cpu_s, reference = timed(lambda: session.run(None, feeds)[0], args.runs)
    report["ort_cpu_step_s"] = cpu_s
    del session
    model = core.read_model(str(unet))
    model.reshape({name: list(value.shape) for name, value in feeds.items()})
    for precision in ("f32", "bf16"):
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                     "INFERENCE_NUM_THREADS": 2, "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()
        step_s, out = timed(lambda: request.infer(feeds)[0], args.runs)
        report[f"openvino_{precision}_step_s"] = step_s
        report[f"openvino_{precision}_rel_l2"] = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
        del request, compiled
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
