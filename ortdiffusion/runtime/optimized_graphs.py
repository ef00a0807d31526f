"""Graphs ONNX Runtime optimized once, saved, and loaded after without optimizing again.

Graph optimization at load (`ORT_ENABLE_ALL`: constant folding, fusions, the CPU provider's NCHWc
layout) is most of a small model's session creation: for the built-in model's UNet about two
thirds (docs/runtime.md, "Cold start"). ONNX Runtime can write the graph it optimized
(`SessionOptions.optimized_model_filepath`); loaded with optimizations disabled it gives the same
session, the same outputs to the bit, for a fraction of the work.

ONNX Runtime documents that a graph optimized at the highest level may hold provider- and
hardware-specific nodes and should be used only where it was made; so the cache key is everything
the optimized graph depends on: the component's files (their sha256 in the manifest), the ONNX
Runtime version, the providers and their options, the dims fixed at load, and this CPU (model and
instruction set flags: the NCHWc block size follows the vector width). A changed bundle, an upgraded
onnxruntime or another machine misses and optimizes afresh. Only CPU-provider sessions of graphs
without external data are cached (small graphs, where the optimizer's time dominates; a big model's
copy would double its disk use).

An entry is `<cache>/graphs/<component>-<key>/model.onnx` and `record.json` (its size), written
under temporary names and renamed into place, so a reader sees a whole entry or none. An entry that
does not load, or whose size differs from its record, is removed and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .manifest import ComponentManifest

logger = logging.getLogger(__name__)

MODEL_NAME = "model.onnx"
RECORD_NAME = "record.json"
CPU_PROVIDER = "CPUExecutionProvider"


@lru_cache(maxsize=1)
def cpu_identity() -> str:
    """This CPU as the optimizer sees it: architecture, model name and a digest of its feature flags."""
    model, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model", "CPU part") and not model:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = " ".join(sorted(value.split()))
    except OSError:  # not Linux: the processor string is what there is
        model = platform.processor()
    return f"{platform.machine()}|{model}|{hashlib.sha256(flags.encode()).hexdigest()[:16]}"


def cache_key(component: ComponentManifest, ort_version: str, providers: Sequence[tuple[str, Mapping[str, str]]],
              fixed_dims: Mapping[str, int], optimization: str) -> str:
    """`<component>-<digest>` of everything an optimized graph depends on."""
    identity = {
        "component": component.name, "files": [f.sha256 for f in component.files], "onnxruntime": ort_version,
        "providers": [[name, sorted(dict(options).items())] for name, options in providers],
        "fixed_dims": sorted((str(k), int(v)) for k, v in fixed_dims.items()), "optimization": optimization,
        "cpu": cpu_identity(),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
    return f"{component.name}-{digest}"


def cacheable(component: ComponentManifest, providers: Sequence[tuple[str, Mapping[str, str]]]) -> bool:
    """CPU-provider sessions of graphs without external data (see the module's note)."""
    return len(component.files) == 1 and all(name == CPU_PROVIDER for name, _ in providers)


@dataclass(frozen=True)
class CacheEntry:
    """One component's optimized graph in the cache (present or not yet)."""

    folder: Path

    @property
    def model(self) -> Path:
        return self.folder / MODEL_NAME

    def ready(self) -> bool:
        """Whether a whole entry is there: the model file with the size its record says."""
        try:
            record = json.loads((self.folder / RECORD_NAME).read_text())
            return self.model.stat().st_size == int(record["size"])
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def scratch(self) -> Path:
        """Where ONNX Runtime writes the optimized graph before `commit` renames it into place
        (per process: two processes building the same entry do not write one file)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        return self.folder / f".{MODEL_NAME}.{os.getpid()}.partial"

    def commit(self, scratch: Path) -> None:
        """The model first, then its record: a reader that finds the record finds the whole model."""
        size = scratch.stat().st_size
        os.replace(scratch, self.model)
        tmp = self.folder / f".{RECORD_NAME}.{os.getpid()}.partial"
        tmp.write_text(json.dumps({"size": size}))
        os.replace(tmp, self.folder / RECORD_NAME)

    def discard(self) -> None:
        for path in (self.folder / RECORD_NAME, self.model):
            path.unlink(missing_ok=True)


def entry_for(root: Path, component: ComponentManifest, ort_version: str,
              providers: Sequence[tuple[str, Mapping[str, str]]], fixed_dims: Mapping[str, int],
              optimization: str = "all") -> CacheEntry | None:
    """The cache entry of this session, or None where it is not cached (`cacheable`)."""
    if not cacheable(component, providers):
        return None
    return CacheEntry(root / cache_key(component, ort_version, providers, fixed_dims, optimization))


__all__ = ["CacheEntry", "cache_key", "cacheable", "cpu_identity", "entry_for"]
