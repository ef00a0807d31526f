"""The executor that runs a plan with IO binding: embeddings, latents and noise predictions stay on
the device.

    ids ─► text encoder(s) ─► conditioning ┐   (on the device from here)
    tables (coefficients, noise) ──────────┤
                                           ▼
    [ UNet step ─► step graph (guidance + scheduler step + next UNet input) ] × N
                                           ▼
    step graph's last row (undo the VAE's latent scaling) ─► image decoder ─► pixels to the host

The step graph (`runtime/graphs/`, built by `export/step_graph.py`) does guidance and the scheduler
step in one small ONNX graph, since every scheduler step is linear (`schedulers.linear_step`).
Everything that varies per step, the coefficients and any ancestral noise, is in the plan (so an
image depends only on its seed, on any provider) and uploaded once as two tables; the graph reads
row `step` and returns `step + 1`. Within the loop the host sends and reads nothing; after it, one
count of non-finite latent values (the NaN guard) and the image come back.

Used when the UNet runs on the CUDA or TensorRT provider; on the CPU provider the host loop is as
fast (the arrays already live in host memory) and `Pipeline.load(..., io_binding=True)` runs this
one there too, which is how the tests check it computes what the host loop does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .decoder import ImageDecoder
from .errors import NumericalError
from .graph_cache import GraphBucket, GraphCache
from .manifest import UNET
from .plan import Plan, StepCallback
from .providers import ProviderKind, ProviderPreference, check_placement, node_assignments, session_options
from .session import Session, run_bound
from .trace import Stage, Trace

#: The step graph's coefficient row, in order (see `coefficient_table`).
COEFFICIENTS = (
    "guidance_scale",
    "x0_sample", "x0_output", "clip",
    "sample_coefficient", "output_coefficient", "x0_coefficient", "previous_x0_coefficient", "noise_coefficient",
    "offset",
    "next_input_scale", "next_timestep",
    "guidance_rescale",
)


def _graph_name(guided: bool, blended: bool, rescaled: bool) -> str:
    return ("guided_" if guided else "") + ("blend_" if blended else "") + ("rescale_" if rescaled else "") + "step.onnx"


#: (guided?, blended? (inpainting with a plain UNet), rescaled? (`guidance_rescale`, guided only))
#: → the step graph's file in `GRAPHS`.
STEP_GRAPHS = {(g, b, r): _graph_name(g, b, r) for g in (False, True) for b in (False, True) for r in (False, True)
               if g or not r}
GRAPHS = Path(__file__).resolve().parent / "graphs"
#: The decoder output's dtype → the graph that turns its pixels into 8-bit images on the device.
PIXEL_GRAPHS = {"float32": "to_uint8.onnx", "float16": "to_uint8_fp16.onnx"}


def coefficient_table(plan: Plan) -> np.ndarray:
    """(steps + 1, len(COEFFICIENTS)) float32: row i is denoising step i, with the next step's input
    scale and timestep; the last row turns the final latents into the decoder's input
    (latents / scaling_factor + shift_factor)."""
    steps = len(plan.steps)
    rows = []
    for i, s in enumerate(plan.steps):
        last = i == steps - 1
        rows.append([
            plan.guidance_scale or 0.0, s.x0_sample, s.x0_output, math.inf if s.clip is None else s.clip,
            s.sample, s.output, s.x0, s.previous_x0, s.noise, 0.0,
            1.0 if last else plan.input_scales[i + 1], 0.0 if last else float(plan.timesteps[i + 1]),
            plan.guidance_rescale,
        ])
    rows.append([0.0, 0.0, 0.0, math.inf, 1.0 / plan.vae_scaling_factor, 0.0, 0.0, 0.0, 0.0,
                 plan.vae_shift_factor or 0.0, 1.0, 0.0, 0.0])
    return np.asarray(rows, dtype=np.float32)


class DeviceLoop:
    """Runs a plan: text encoder(s) → N × (UNet, step graph) → decoder, through IO binding on one device."""

    def __init__(self, sessions: Mapping[str, Session], decoders: Mapping[str, ImageDecoder],
                 graphs: GraphCache | None = None):
        import onnxruntime as ort

        #: the pipeline's own mapping: a session replaced there (a test's spy) is the one that runs
        self.sessions = sessions
        self.decoders = decoders  # "full" and, where the bundle has one, "tiny"
        self.graphs = graphs
        unet = sessions[UNET]
        self.device = unet.device
        providers = unet.step_graph_providers()
        self.step_graphs = {
            key: ort.InferenceSession(str(GRAPHS / name), session_options(), providers=providers)
            for key, name in STEP_GRAPHS.items()
        }
        self.pixel_graphs = {
            dtype: ort.InferenceSession(str(GRAPHS / name), session_options(), providers=providers)
            for dtype, name in PIXEL_GRAPHS.items()
        }
        # The same per-node check as the networks': a step-graph node on the CPU would copy between
        # host and device inside the loop, where nothing should cross
        kind = ProviderKind.parse(providers[0][0])
        self.step_graph_placement = {}
        for key, graph in [*self.step_graphs.items(), *self.pixel_graphs.items()]:
            name = STEP_GRAPHS.get(key) or PIXEL_GRAPHS[key]
            assignments = node_assignments(graph)
            if assignments is not None:
                self.step_graph_placement[key] = check_placement(
                    ProviderPreference(kinds=(kind,)), assignments, f"step graph {name}")

    def __call__(self, plan: Plan, trace: Trace, callback: StepCallback | None = None) -> np.ndarray:
        images = plan.images
        f = self.graphs.vae_scale_factor if self.graphs else 1
        height, width = (d * f for d in plan.latents.shape[2:])
        # a CUDA-graph bucket's buffers hold one window of text: long prompts run without one
        padded = self.graphs.pick(images, height, width) if self.graphs and plan.text_chunks == 1 else None
        if padded is None:
            return self._run(plan, trace, callback, None)
        # a CUDA-graph bucket: the plan padded to the bucket's batch with copies of its last image
        bucket = self.graphs.get(padded, height, width, plan.guided)
        with bucket.lock:
            pixels = self._run(plan.padded(padded), trace, callback and (lambda i, n, x: callback(i, n, x[:images])),
                               bucket)
        return pixels[:images]

    def _send(self, array: np.ndarray, trace: Trace):
        import onnxruntime as ort

        trace.transfers.sent(array)
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), *self.device)

    def _read(self, value, trace: Trace) -> np.ndarray:
        array = value.numpy()
        trace.transfers.received(array)
        return array

    def _run(self, plan: Plan, trace: Trace, callback: StepCallback | None, bucket: GraphBucket | None) -> np.ndarray:
        # with a bucket, the UNet reads and writes its fixed buffers; else ONNX Runtime allocates
        fixed = bucket.buffers if bucket is not None else {}
        unet = bucket.session if bucket is not None else self.sessions[UNET]
        steps = len(plan.steps)

        def put(name: str, array: np.ndarray):
            """`array` as the UNet's input `name`: into its fixed buffer where there is one."""
            if name not in fixed:
                return self._send(array, trace)
            trace.transfers.sent(array)
            fixed[name].update_inplace(np.ascontiguousarray(array))  # the plan holds the manifest's dtypes
            return fixed[name]

        # 1. text encoder(s): the token ids go over, the outputs the UNet reads stay
        conditioning = {name: put(name, array) for name, array in plan.conditioning.items()}
        # a LoRA set's side-branch weights: bound like any other input, once per run (ONNX Runtime's
        # own adapters are not applied to runs with IO binding); their rank varies by set, so never
        # into a CUDA graph's fixed buffers
        adapters = plan.adapter_feeds
        conditioning.update({name: self._send(array, trace) for name, array in adapters.get(UNET, {}).items()})
        text_feeds = plan.text_feeds()
        for component, feeds in plan.text_inputs.items():
            feeds = {**feeds, **adapters.get(component, {})}
            if plan.text_chunks > 1:  # long prompts: the windows are joined on the host, once, before the loop
                outputs = plan.join_chunks(self.sessions[component].run({n: a for n, a in feeds.items()}, release_memory=True))
                conditioning.update({name: put(name, outputs[output])
                                     for name, (c, output) in text_feeds.items() if c == component})
                continue
            wanted = {output: fixed.get(name) for name, (c, output) in text_feeds.items() if c == component}
            if plan.zero_uncond:  # SDXL's zero negative embeddings: once to the host, zeroed, and back
                wanted = dict.fromkeys(wanted)
            outputs = self.sessions[component].run_bound({n: self._send(a, trace) for n, a in feeds.items()},
                                                         wanted, self.device, release_memory=True)
            for name, (c, output) in text_feeds.items():
                if c == component and plan.zero_uncond:
                    array = self._read(outputs[output], trace).copy()
                    array[:plan.images] = 0
                    conditioning[name] = put(name, array)
                elif c == component:
                    conditioning[name] = outputs[output]
        trace.lap(Stage.TEXT_ENCODER)
        # 2. the loop's state and its tables, sent once
        latents = plan.latents
        noise = plan.noise if plan.noise is not None else np.zeros((steps, *latents.shape), np.float32)
        state = {
            "sample": self._send(latents, trace),
            "previous_x0": self._send(np.zeros_like(latents), trace),
            "noise_table": self._send(np.concatenate([noise, np.zeros((1, *latents.shape), np.float32)]), trace),
            "coefficient_table": self._send(coefficient_table(plan), trace),
            "step": self._send(np.zeros(1, dtype=np.int64), trace),
            "nonfinite": self._send(np.zeros(1, dtype=np.float32), trace),
        }
        first = plan.model_input(latents, 0)
        model_input = put(plan.latent_input, first)
        timestep = put(plan.timestep_input, np.full((first.shape[0],), float(plan.timesteps[0]), dtype=np.float32))
        blended = plan.blend_mask is not None
        if blended:  # inpainting with a plain UNet: the kept region and where it is, sent once
            state["blend_mask"] = self._send(plan.blend_mask, trace)
            state["known_table"] = self._send(plan.blend_known, trace)
        graph = self.step_graphs[(plan.guided, blended, plan.guidance_rescale > 0)]
        graph_outputs = [o.name for o in graph.get_outputs()]
        # the step graph writes the next UNet input and timestep straight into the fixed buffers
        into = {"model_input": fixed[plan.latent_input], "timestep": fixed[plan.timestep_input]} if fixed else {}
        prediction_name = unet.output_names[0]
        trace.lap(Stage.SCHEDULER)
        # 3. the loop: nothing crosses unless a callback asks for the latents
        with trace.transfers.looping():
            for i in range(steps):
                feeds = {plan.latent_input: model_input, plan.timestep_input: timestep, **conditioning}
                prediction = unet.run_bound(feeds, {prediction_name: fixed.get(prediction_name)}, self.device,
                                            release_memory=i == steps - 1)[prediction_name]
                trace.lap(Stage.UNET)
                out = run_bound(graph, {"prediction": prediction, **state},
                                {name: into.get(name) for name in graph_outputs}, self.device)
                state.update(sample=out["next_sample"], previous_x0=out["x0"], step=out["step_out"],
                             nonfinite=out["nonfinite_out"])
                model_input, timestep = out["model_input"], out["timestep"]
                trace.lap(Stage.SCHEDULER)
                if callback is not None:
                    callback(i, steps, self._read(out["next_sample"], trace))
        # 4. the NaN guard, read once, then the last table row: the decoder's input
        bad = self._read(out["nonfinite_out"], trace)
        if bad[0] > 0:
            raise NumericalError(f"unet: {int(bad[0])} latent values became non-finite (NaN/Inf) during the "
                                 f"{steps} denoising steps")
        if not plan.decode:  # output_type="latent": the latents as the UNet sees them
            return self._read(out["next_sample"], trace)
        last = self.step_graphs[(plan.guided, False, False)]  # the decoder's row is never blended nor rescaled
        state = {k: v for k, v in state.items() if k not in ("blend_mask", "known_table")}
        decoder_input = run_bound(last, {"prediction": prediction, **state}, graph_outputs, self.device)["next_sample"]
        decoder = self.decoders[plan.decoder]
        pixels = decoder.session.run_bound({decoder.input_name: decoder_input}, {decoder.output_name: None}, self.device,
                                           release_memory=True)[decoder.output_name]
        # 5. 8-bit images made on the device (a quarter of the bytes back) with the decoder's NaN
        #    guard; only where that finds non-finite pixels do the float pixels come back, to be
        #    decoded again in fp32 and converted on the host
        graph = self.pixel_graphs[{"tensor(float16)": "float16"}.get(pixels.data_type(), "float32")]
        out = run_bound(graph, {"pixels": pixels}, ["image", "nonfinite"], self.device)
        if self._read(out["nonfinite"], trace)[0] == 0:
            images = self._read(out["image"], trace)
            trace.lap(Stage.DECODER)
            return images
        pixels = decoder.checked(self._read(pixels, trace).astype(np.float32, copy=False),
                                 lambda: self._read(decoder_input, trace))
        trace.lap(Stage.DECODER)
        return pixels


__all__ = ["COEFFICIENTS", "PIXEL_GRAPHS", "STEP_GRAPHS", "DeviceLoop", "coefficient_table"]
