"""Static-shape UNet sessions per (images, height, width) bucket: what CUDA graphs need.

On CUDA each session captures its kernels as a CUDA graph on its first runs and replays it after,
which is only sound while its input and output buffers stay where they were (ONNX Runtime's CUDA
graph rules); so each bucket owns fixed buffers for every UNet input and output, and the device
loop writes into them. On the CPU provider (tests) the same sessions and buffers run without a graph.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import BundleError, InvalidRequestError
from .manifest import TensorInfo

logger = logging.getLogger(__name__)


@dataclass
class GraphBucket:
    """A UNet session with every shape fixed, and the fixed buffers it reads and writes."""

    key: tuple[int, int, int]  # (UNet batch, latent height, latent width)
    session: object
    buffers: dict  # UNet input and output name → OrtValue
    lock: threading.Lock = field(default_factory=threading.Lock)


class GraphCache:
    """Static-shape UNet sessions per bucket, at most `max_graphs` of them (the least recently used
    goes first: each holds its own copy of the UNet's weights on the device).

    Buckets are (images per call, image height, image width). A request falls into the bucket of its
    size with the fewest images not fewer than its own (the plan is padded with copies of its last
    image, and those are dropped again), or runs without a graph when no bucket has its size.
    """

    def __init__(self, sizes: Sequence[tuple[int, int, int]], max_graphs: int,
                 make_session: Callable[[dict[str, int]], object], unet_inputs: Sequence[TensorInfo],
                 unet_outputs: Sequence[TensorInfo], vae_scale_factor: int, device: tuple[str, int],
                 text_dims: Mapping[str, int] | None = None):
        """`text_dims`: the UNet's symbolic text-length dims, fixed at one window (long prompts run
        without a graph)."""
        if max_graphs < 1:
            raise InvalidRequestError("max_cuda_graphs", f"must be at least 1, got {max_graphs}")
        for size in sizes:
            if len(size) != 3 or min(size) < 1 or any(v % vae_scale_factor for v in size[1:]):
                raise InvalidRequestError("cuda_graphs", f"each bucket is (images, height, width) with height and "
                                                         f"width multiples of {vae_scale_factor}; got {size}")
        self.sizes = tuple(sorted(tuple(int(v) for v in s) for s in sizes))
        self.max_graphs = max_graphs
        self._make_session = make_session
        self._inputs, self._outputs = tuple(unet_inputs), tuple(unet_outputs)
        self.vae_scale_factor = vae_scale_factor
        self._device = device
        self._fixed_text = dict(text_dims or {})
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
                values = {"batch": batch, "height": h, "width": w, **self._fixed_text}
                concrete[info.name] = tuple(d if isinstance(d, int) else values.get(d, d) for d in info.shape)
            dims = {d: v for info in self._inputs for d, v in zip(info.shape, concrete[info.name]) if isinstance(d, str)}
            unknown = [n for n, shape in concrete.items() if any(isinstance(d, str) for d in shape)]
            if unknown:
                raise BundleError("unet", f"cuda_graphs: cannot fix the shapes of {unknown} from batch, height and width")
            while len(self._buckets) >= self.max_graphs:
                old, evicted = self._buckets.popitem(last=False)
                with evicted.lock:  # let a generation using it finish first
                    logger.info("unet: dropped the static session of bucket %s (max_graphs=%d)", old, self.max_graphs)
            session = self._make_session(dims)
            self.built += 1
            dtypes = {info.name: np.dtype(info.dtype) for info in [*self._inputs, *self._outputs]}
            buffers = {name: ort.OrtValue.ortvalue_from_shape_and_type(shape, dtypes[name], *self._device)
                       for name, shape in concrete.items()}
            bucket = self._buckets[key] = GraphBucket(key, session, buffers)
            logger.info("unet: static session for bucket %s (dims %s)", key, dims)
            return bucket


__all__ = ["GraphBucket", "GraphCache"]
