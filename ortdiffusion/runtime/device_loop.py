"""The denoising loop with IO binding: embeddings, latents and noise predictions stay on the device.

    ids ─► text encoder ─► embeddings ┐   (on the device from here)
    tables (coefficients, noise) ─────┤
                                      ▼
    [ UNet step ─► step graph (guidance + scheduler step + next UNet input) ] × N
                                      ▼
    step graph's last row (undo the VAE's latent scaling) ─► image decoder ─► pixels to the host

The step graph (`runtime/graphs/`, built by `export/step_graph.py`) does guidance and the scheduler
step in one small ONNX graph, since every scheduler step here is linear
(`schedulers.linear_step`). Everything that varies per step, the coefficients and any ancestral
noise, is drawn on the host as before (so an image depends only on its seed, on any provider) and
uploaded once as two tables; the graph reads row `step` and returns `step + 1`. Within the loop the
host sends and reads nothing; after it, one count of non-finite latent values (the NaN guard) and
the image come back.

Used when the UNet runs on the CUDA or TensorRT provider; on the CPU provider the host loop is as
fast (the arrays already live in host memory) and `Pipeline.load(..., io_binding=True)` runs this
one there too, which is how the tests check it computes what the host loop does.
"""

from __future__ import annotations

import logging
import math
import threading
from contextlib import contextmanager
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import NumericalError
from .providers import ProviderKind, ProviderPreference, check_placement, node_assignments

logger = logging.getLogger(__name__)

#: The step graph's coefficient row, in order (see `coefficient_table`).
COEFFICIENTS = (
    "guidance_scale",
    "x0_sample", "x0_output", "clip",
    "sample_coefficient", "output_coefficient", "x0_coefficient", "previous_x0_coefficient", "noise_coefficient",
    "offset",
    "next_input_scale", "next_timestep",
)
#: guided? → the step graph's file in `GRAPHS`.
STEP_GRAPHS = {False: "step.onnx", True: "guided_step.onnx"}
GRAPHS = Path(__file__).resolve().parent / "graphs"


@dataclass
class Transfers:
    """Arrays that crossed between host and device in one generation, and how many of them crossed
    inside the denoising loop. On a GPU each is a copy over PCIe; on the CPU provider nothing is
    copied, and the figures count what the same code hands across on a GPU."""

    host_to_device: int = 0
    device_to_host: int = 0
    bytes_host_to_device: int = 0
    bytes_device_to_host: int = 0
    in_loop: int = 0
    _looping: bool = False

    @contextmanager
    def looping(self):
        """Crossings inside this block count as `in_loop`."""
        self._looping = True
        try:
            yield
        finally:
            self._looping = False

    def sent(self, array: np.ndarray) -> None:
        self.host_to_device += 1
        self.bytes_host_to_device += array.nbytes
        self.in_loop += self._looping

    def received(self, array: np.ndarray) -> None:
        self.device_to_host += 1
        self.bytes_device_to_host += array.nbytes
        self.in_loop += self._looping

    def as_dict(self) -> dict[str, int]:
        return {"host_to_device": self.host_to_device, "device_to_host": self.device_to_host,
                "bytes_host_to_device": self.bytes_host_to_device, "bytes_device_to_host": self.bytes_device_to_host,
                "in_loop": self.in_loop}


def run_bound(session, inputs: Mapping, output_names: Sequence[str], device_type: str, device_id: int,
              into: Mapping | None = None,
              run_options=None) -> list:
    """Run an ONNX Runtime session with IO binding: OrtValue `inputs`; each output written into its
    OrtValue in `into`, or allocated on (`device_type`, `device_id`); the outputs as OrtValues."""
    io = session.io_binding()
    for name, value in inputs.items():
        io.bind_ortvalue_input(name, value)
    for name in output_names:
        if into and name in into:
            io.bind_ortvalue_output(name, into[name])
        else:
            io.bind_output(name, device_type, device_id)
    session.run_with_iobinding(io, run_options)
    return io.get_outputs()


def coefficient_table(scheduler, guidance_scale: float, scaling_factor: float, shift_factor: float | None) -> np.ndarray:
    """(steps + 1, len(COEFFICIENTS)) float32: row i is denoising step i, with the next step's input
    scale and timestep; the last row turns the final latents into the decoder's input
    (latents / scaling_factor + shift_factor)."""
    steps = len(scheduler.timesteps)
    rows = []
    for i in range(steps):
        s = scheduler.linear_step(i)
        last = i == steps - 1
        rows.append([
            guidance_scale, s.x0_sample, s.x0_output, math.inf if s.clip is None else s.clip,
            s.sample, s.output, s.x0, s.previous_x0, s.noise, 0.0,
            1.0 if last else scheduler.input_scale(i + 1), 0.0 if last else float(scheduler.timesteps[i + 1]),
        ])
    rows.append([0.0, 0.0, 0.0, math.inf, 1.0 / scaling_factor, 0.0, 0.0, 0.0, 0.0, shift_factor or 0.0, 1.0, 0.0])
    return np.asarray(rows, dtype=np.float32)


@dataclass
class GraphBucket:
    """A UNet session with every shape fixed, and the fixed buffers it reads and writes: on CUDA the
    session captures its kernels as a CUDA graph on its first runs and replays it after, which is
    only sound while the buffers stay where they were (ONNX Runtime's CUDA graph rules)."""

    key: tuple[int, int, int]  # (UNet batch, latent height, latent width)
    session: object
    buffers: dict  # UNet input and output name → OrtValue
    lock: threading.Lock = field(default_factory=threading.Lock)


class GraphCache:
    """Static-shape UNet sessions per bucket, at most `max_graphs` of them (the least recently used
    goes first: each holds its own copy of the UNet's weights on the device).

    Buckets are (images per call, image height, image width). A request falls into the bucket of its
    size with the fewest images not fewer than its own (the batch is padded with copies of its last
    image, and those are dropped again), or runs without a graph when no bucket has its size.
    """

    def __init__(self, sizes: Sequence[tuple[int, int, int]], max_graphs: int,
                 make_session: Callable[[dict[str, int]], object], unet_inputs, unet_outputs,
                 vae_scale_factor: int, device: tuple[str, int]):
        if max_graphs < 1:
            raise ValueError(f"max_graphs: must be at least 1, got {max_graphs}")
        for size in sizes:
            if len(size) != 3 or min(size) < 1 or any(v % vae_scale_factor for v in size[1:]):
                raise ValueError(f"cuda_graphs: each bucket is (images, height, width) with height and width "
                                 f"multiples of {vae_scale_factor}; got {size}")
        self.sizes = tuple(sorted(tuple(int(v) for v in s) for s in sizes))
        self.max_graphs = max_graphs
        self._make_session = make_session
        self._inputs, self._outputs = unet_inputs, unet_outputs
        self.vae_scale_factor = vae_scale_factor
        self._device = device
        self._buckets: OrderedDict[tuple[int, int, int], GraphBucket] = OrderedDict()
        self._lock = threading.Lock()
        self.built = 0  # sessions created so far (a rebuilt evicted bucket counts again)

    def pick(self, images: int, height: int, width: int) -> int | None:
        """The bucket's image count for a request, or None: no bucket of this size."""
        fits = [b for b, h, w in self.sizes if (h, w) == (height, width) and b >= images]
        return min(fits) if fits else None

    def get(self, images: int, height: int, width: int, guided: bool) -> GraphBucket:
        import onnxruntime as ort

        f = self.vae_scale_factor
        key = (images * (2 if guided else 1), height // f, width // f)
        with self._lock:
            if key in self._buckets:
                self._buckets.move_to_end(key)
                return self._buckets[key]
            batch, h, w = key
            concrete = {}  # the shape of every UNet input and output in this bucket
            for info in [*self._inputs, *self._outputs]:
                values = {"batch": batch, "height": h, "width": w}
                concrete[info.name] = tuple(d if isinstance(d, int) else values.get(d, d) for d in info.shape)
            dims = {d: v for info in self._inputs for d, v in zip(info.shape, concrete[info.name]) if isinstance(d, str)}
            unknown = [n for n, shape in concrete.items() if any(isinstance(d, str) for d in shape)]
            if unknown:
                raise ValueError(f"cuda_graphs: cannot fix the shapes of {unknown} from batch, height and width")
            while len(self._buckets) >= self.max_graphs:
                old, evicted = self._buckets.popitem(last=False)
                with evicted.lock:  # let a generation using it finish first
                    logger.info("unet: dropped the static session of bucket %s (max_graphs=%d)", old, self.max_graphs)
            session = self._make_session(dims)
            self.built += 1
            buffers = {name: ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, *self._device)
                       for name, shape in concrete.items()}
            bucket = self._buckets[key] = GraphBucket(key, session, buffers)
            logger.info("unet: static session for bucket %s (dims %s)", key, dims)
            return bucket


def _pad(array: np.ndarray, to: int, axis: int = 0) -> np.ndarray:
    """`array` with its last entry along `axis` repeated until it has `to` entries."""
    missing = to - array.shape[axis]
    if missing <= 0:
        return array
    last = np.take(array, [-1], axis=axis)
    return np.concatenate([array, np.repeat(last, missing, axis=axis)], axis=axis)


class DeviceLoop:
    """Runs text encoder → N × (UNet, step graph) → decoder through IO binding on one device."""

    def __init__(self, text_encoder, unet, decoder, graphs: GraphCache | None = None):
        import onnxruntime as ort

        self.text_encoder, self.unet, self.decoder = text_encoder, unet, decoder
        self.graphs = graphs
        self.device_type, self.device_id = unet.device
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
        providers = unet.step_graph_providers()
        self.step_graphs = {
            guided: ort.InferenceSession(str(GRAPHS / name), options, providers=providers)
            for guided, name in STEP_GRAPHS.items()
        }
        # The same per-node check as the networks': a step-graph node on the CPU would copy between
        # host and device inside the loop, where nothing should cross
        kind = ProviderKind.parse(providers[0][0])
        self.step_graph_placement = {}
        for guided, graph in self.step_graphs.items():
            assignments = node_assignments(graph)
            if assignments is not None:
                self.step_graph_placement[guided] = check_placement(
                    ProviderPreference(kinds=(kind,)), assignments, f"step graph {STEP_GRAPHS[guided]}")

    def _send(self, array: np.ndarray, transfers: Transfers):
        import onnxruntime as ort

        transfers.sent(array)
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device_type, self.device_id)

    def _run_step_graph(self, graph, inputs: dict, into: dict | None = None) -> dict:
        """Run a step graph; outputs named in `into` are written into those OrtValues."""
        names = [o.name for o in graph.get_outputs()]
        return dict(zip(names, run_bound(graph, inputs, names, self.device_type, self.device_id, into)))

    def __call__(self, ids: np.ndarray, latents: np.ndarray, scheduler, guidance_scale: float | None,
                 step_noise: np.ndarray | None, scaling_factor: float, shift_factor: float | None,
                 transfers: Transfers, mark: Callable[[str], None],
                 callback: Callable[[int, int, np.ndarray], None] | None = None) -> np.ndarray:
        """Pixels (batch, 3, H, W) float32 in [-1, 1] for token `ids` and starting `latents`;
        `step_noise` (steps, batch, C, H, W) for a scheduler that adds noise, else None; `mark(stage)`
        is called as each stage ends ("text_encoder", "unet", "scheduler"), for the timings."""
        images = latents.shape[0]
        height, width = (d * self.graphs.vae_scale_factor for d in latents.shape[2:]) if self.graphs else (0, 0)
        padded = self.graphs.pick(images, height, width) if self.graphs else None
        if padded is None:
            return self._loop(ids, latents, scheduler, guidance_scale, step_noise, scaling_factor, shift_factor,
                              transfers, mark, callback, None)
        # a CUDA-graph bucket: pad the batch to the bucket's with copies of the last image
        if guidance_scale is not None:
            ids = np.concatenate([_pad(ids[:images], padded), _pad(ids[images:], padded)])
        else:
            ids = _pad(ids, padded)
        latents = _pad(latents, padded)
        step_noise = None if step_noise is None else _pad(step_noise, padded, axis=1)
        bucket = self.graphs.get(padded, height, width, guidance_scale is not None)
        with bucket.lock:
            pixels = self._loop(ids, latents, scheduler, guidance_scale, step_noise, scaling_factor, shift_factor,
                                transfers, mark, callback and (lambda i, n, x: callback(i, n, x[:images])), bucket)
        return pixels[:images]

    def _loop(self, ids, latents, scheduler, guidance_scale, step_noise, scaling_factor, shift_factor,
              transfers: Transfers, mark, callback, bucket: GraphBucket | None) -> np.ndarray:
        guided = guidance_scale is not None
        steps = len(scheduler.timesteps)
        # with a bucket, the UNet reads and writes its fixed buffers; else ONNX Runtime allocates
        fixed = bucket.buffers if bucket is not None else {}
        unet = bucket.session if bucket is not None else self.unet
        send = lambda a: self._send(a, transfers)

        def put(name: str, array: np.ndarray):
            """`array` into the UNet's fixed input buffer `name` where there is one, else a new one."""
            if name not in fixed:
                return send(array)
            transfers.sent(array)
            fixed[name].update_inplace(np.ascontiguousarray(array, dtype=np.float32))
            return fixed[name]

        # 1. text encoder: the token ids go over, the embeddings stay
        (embeddings,) = self.text_encoder.run_bound({"input_ids": send(ids)}, self.device_type, self.device_id,
                                                    into=fixed.get("encoder_hidden_states"))
        mark("text_encoder")
        # 2. the loop's state and its tables, sent once
        first_input = scheduler.scale_model_input(latents, 0)
        if guided:
            first_input = np.concatenate([first_input, first_input])
        state = {
            "sample": send(latents),
            "previous_x0": send(np.zeros_like(latents)),
            "noise_table": send(step_noise if step_noise is not None else np.zeros((steps + 1, *latents.shape), np.float32)),
            "coefficient_table": send(coefficient_table(scheduler, guidance_scale or 0.0, scaling_factor, shift_factor)),
            "step": send(np.zeros(1, dtype=np.int64)),
            "nonfinite": send(np.zeros(1, dtype=np.float32)),
        }
        model_input = put("sample", first_input)
        timestep = put("timestep", np.full((first_input.shape[0],), float(scheduler.timesteps[0]), dtype=np.float32))
        graph = self.step_graphs[guided]
        # the step graph writes the next UNet input and timestep straight into the fixed buffers
        into = {"model_input": fixed["sample"], "timestep": fixed["timestep"]} if fixed else None
        mark("scheduler")
        # 3. the loop: nothing crosses unless a callback asks for the latents
        with transfers.looping():
            for i in range(steps):
                (prediction,) = unet.run_bound(
                    {"sample": model_input, "timestep": timestep, "encoder_hidden_states": embeddings},
                    self.device_type, self.device_id, release_memory=i == steps - 1, into=fixed.get(unet.output_names[0]))
                mark("unet")
                out = self._run_step_graph(graph, {"prediction": prediction, **state}, into)
                state.update(sample=out["next_sample"], previous_x0=out["x0"], step=out["step_out"],
                             nonfinite=out["nonfinite_out"])
                model_input, timestep = out["model_input"], out["timestep"]
                mark("scheduler")
                if callback is not None:
                    host = out["next_sample"].numpy()
                    transfers.received(host)
                    callback(i, steps, host)
        # 4. the NaN guard, read once, then the last table row: the decoder's input
        bad = out["nonfinite_out"].numpy()
        transfers.received(bad)
        if bad[0] > 0:
            raise NumericalError(f"unet: {int(bad[0])} latent values became non-finite (NaN/Inf) during the "
                                 f"{steps} denoising steps")
        decoder_input = self._run_step_graph(graph, {"prediction": prediction, **state})["next_sample"]
        (pixels,) = self.decoder.run_bound({"latent_sample": decoder_input}, "cpu", 0, release_memory=True)
        pixels = pixels.numpy()
        transfers.received(pixels)
        return pixels


__all__ = ["COEFFICIENTS", "STEP_GRAPHS", "DeviceLoop", "GraphBucket", "GraphCache", "Transfers", "coefficient_table"]
