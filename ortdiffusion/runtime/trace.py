"""What one generation records as it runs: seconds per stage and arrays that crossed host ↔ device.

A `Trace` is made per call and handed to the executor that runs the plan (host_loop.py or
device_loop.py); the executor says when a stage ends (`trace.lap(Stage.UNET)`) and counts what it
sends and reads back. Nothing else is threaded through the layers.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum

import numpy as np


class Stage(str, Enum):
    TOKENIZE = "tokenize"
    TEXT_ENCODER = "text_encoder"
    IMAGE_ENCODER = "image_encoder"  # an input image (and its masked copy) to latents
    UNET = "unet"  # one entry per denoising step
    SCHEDULER = "scheduler"  # scheduler steps, guidance and input scaling together
    DECODER = "decoder"
    POSTPROCESS = "postprocess"


@dataclass
class Timings:
    """Seconds spent in each stage of one call."""

    stages: dict[Stage, float] = field(default_factory=lambda: dict.fromkeys(Stage, 0.0))
    unet_steps: list[float] = field(default_factory=list)
    total: float = 0.0

    def add(self, stage: Stage, seconds: float) -> None:
        self.stages[stage] += seconds
        if stage is Stage.UNET:
            self.unet_steps.append(seconds)

    @property
    def tokenize(self) -> float:
        return self.stages[Stage.TOKENIZE]

    @property
    def text_encoder(self) -> float:
        return self.stages[Stage.TEXT_ENCODER]

    @property
    def image_encoder(self) -> float:
        return self.stages[Stage.IMAGE_ENCODER]

    @property
    def unet(self) -> float:
        return self.stages[Stage.UNET]

    @property
    def scheduler(self) -> float:
        return self.stages[Stage.SCHEDULER]

    @property
    def decoder(self) -> float:
        return self.stages[Stage.DECODER]

    @property
    def postprocess(self) -> float:
        return self.stages[Stage.POSTPROCESS]


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


class Trace:
    """One call's timings and transfers, and the clock between stages."""

    def __init__(self) -> None:
        self.timings = Timings()
        self.transfers = Transfers()
        self.start = self._clock = time.perf_counter()

    def lap(self, stage: Stage) -> None:
        """`stage` ended now: it gets the time since the previous lap."""
        now = time.perf_counter()
        self.timings.add(stage, now - self._clock)
        self._clock = now

    def finish(self) -> Timings:
        self.timings.total = time.perf_counter() - self.start
        return self.timings


__all__ = ["Stage", "Timings", "Trace", "Transfers"]
