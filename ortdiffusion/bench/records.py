"""What a bench measures, as typed records: a worker's answer for one run (`Sample`), an engine's
record for one setting (`Record`), a comparison of two engines (`Comparison`), the whole report
(`Report`). `Report.to_dict()` is the JSON that `bench --json` writes; the field names are the
JSON's keys."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

#: The stages that are the three networks; everything else is overhead the engine itself adds.
NETWORK_STAGES = ("text_encoder", "image_encoder", "unet_step", "decoder")
#: A record whose runs spread more than this fraction of their median is flagged noisy.
NOISY_SPREAD = 0.10


@dataclass(frozen=True)
class Stats:
    p50: float
    p90: float
    p99: float
    mean: float
    runs: int

    @classmethod
    def of(cls, values: list[float]) -> Stats:
        a = np.asarray(values, dtype=np.float64)
        return cls(p50=float(np.percentile(a, 50)), p90=float(np.percentile(a, 90)),
                   p99=float(np.percentile(a, 99)), mean=float(a.mean()), runs=int(a.size))


@dataclass(frozen=True)
class Spread:
    """How far a record's runs lie apart: min, max, max − min (s) and that as a fraction of the
    median. One loaded run of torch ranged 6.9–43.6 s: a p50 alone hid it."""

    min: float
    max: float
    range: float
    relative: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        a = np.asarray(values, dtype=np.float64)
        median = float(np.median(a))
        return cls(min=float(a.min()), max=float(a.max()), range=float(a.max() - a.min()),
                   relative=float((a.max() - a.min()) / median) if median > 0 else 0.0)


@dataclass(frozen=True)
class Sample:
    """One timed generation, as a worker answers it: stage durations (the UNet's one per step),
    the process's peak memory so far, and what only some engines know (ours: host <-> device
    transfers; torch: the UNet step's FLOPs)."""

    end_to_end: float
    stages: dict[str, list[float]]
    peak_host_mb: float = 0.0
    peak_device_mb: float | None = None
    transfers: dict[str, int] | None = None
    unet_step_gflop: float | None = None

    @classmethod
    def from_json(cls, answer: dict[str, Any]) -> Sample:
        return cls(end_to_end=answer["end_to_end"], stages=answer["stages"], peak_host_mb=answer.get("peak_host_mb", 0.0),
                   peak_device_mb=answer.get("peak_device_mb"), transfers=answer.get("transfers"),
                   unet_step_gflop=answer.get("unet_step_gflop"))

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def network_seconds(self) -> float:
        return sum(sum(self.stages.get(k, [])) for k in NETWORK_STAGES)


@dataclass
class Record:
    """One engine at one setting: its runs summarized. The compute-rate fields are filled in once
    every record is in (`runner.add_compute_rates`: the FLOPs come from torch's record)."""

    engine: str
    model: str
    providers: dict[str, str]
    precision: str | None
    batch: int
    width: int
    height: int
    steps: int
    end_to_end_s: Stats
    stages_s: dict[str, Stats] = field(default_factory=dict)
    spread_s: Spread | None = None
    scheduler: str | None = None
    machine_load: dict[str, float] | None = None
    cold_start_s: float | None = None
    images_per_s: float = 0.0
    peak_host_mb: float = 0.0
    peak_device_mb: float | None = None
    #: Time outside the three networks (tokenizer, scheduler, guidance, copies, PNG), as a share.
    outside_networks_fraction: float | None = None
    unet_step_gflop: float | None = None
    #: ours only: arrays that crossed host <-> device in one generation (`trace.Transfers`)
    transfers: dict[str, int] | None = None
    unet_gflops_per_s: float | None = None
    unet_fraction_of_matmul_rate: float | None = None
    task: str = "text-to-image"
    #: The image tasks: the image encoder's share of end-to-end time.
    image_encoder_fraction: float | None = None

    @classmethod
    def of(cls, engine: str, model: str, providers: dict[str, str], precision: str | None, scheduler: str | None,
           setting, samples: list[Sample], cold_start_s: float | None, machine_load: dict | None,
           task: str = "text-to-image") -> Record:
        per_stage: dict[str, list[float]] = {}
        for sample in samples:
            for stage, values in sample.stages.items():
                per_stage.setdefault(stage, []).extend(values if stage == "unet_step" else [sum(values)])
        runs = [s.end_to_end for s in samples]
        end_to_end = Stats.of(runs)
        total, networks = sum(runs), sum(s.network_seconds() for s in samples)
        encoder = sum(sum(s.stages.get("image_encoder", [])) for s in samples)
        return cls(engine=engine, model=model, providers=providers, precision=precision, scheduler=scheduler,
                   batch=setting.batch, width=setting.width, height=setting.height, steps=setting.steps,
                   end_to_end_s=end_to_end, stages_s={k: Stats.of(v) for k, v in per_stage.items()},
                   spread_s=Spread.of(runs), machine_load=machine_load, cold_start_s=cold_start_s,
                   images_per_s=setting.batch / end_to_end.mean, peak_host_mb=max(s.peak_host_mb for s in samples),
                   peak_device_mb=max((s.peak_device_mb for s in samples if s.peak_device_mb is not None), default=None),
                   outside_networks_fraction=max(0.0, 1 - networks / total) if total > 0 else None,
                   unet_step_gflop=next((s.unet_step_gflop for s in samples if s.unet_step_gflop), None),
                   transfers=next((s.transfers for s in samples if s.transfers is not None), None), task=task,
                   image_encoder_fraction=encoder / total if task != "text-to-image" and total > 0 else None)

    @property
    def key(self) -> tuple:
        """The setting this record measured, engines aside."""
        return (self.model, self.batch, self.width, self.height, self.steps)


@dataclass(frozen=True)
class Comparison:
    """An engine against the first engine of the same model and setting: the ratio of end-to-end
    medians, and `within_noise` when either side's spread (max − min) exceeds the difference between
    the medians — then the ratio says nothing, and the run should be repeated on a quiet machine."""

    model: str
    batch: int
    width: int
    height: int
    steps: int
    engine: str
    against: str
    ratio: float | None
    difference_s: float
    spread_s: float
    within_noise: bool

    @classmethod
    def of(cls, base: Record, other: Record) -> Comparison:
        a, b = base.end_to_end_s.p50, other.end_to_end_s.p50
        noise = max(base.spread_s.range if base.spread_s else 0.0, other.spread_s.range if other.spread_s else 0.0)
        return cls(model=base.model, batch=base.batch, width=base.width, height=base.height, steps=base.steps,
                   engine=other.engine, against=base.engine, ratio=b / a if a > 0 else None, difference_s=abs(b - a),
                   spread_s=noise, within_noise=noise > abs(b - a))


@dataclass(frozen=True)
class Skipped:
    engine: str
    model: str
    reason: str


@dataclass
class Report:
    env: dict[str, Any]
    plan: dict[str, Any]
    records: list[Record] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    #: the bundles our engines ran: {"engine", "model", "bundle"}
    exports: list[dict[str, str]] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
