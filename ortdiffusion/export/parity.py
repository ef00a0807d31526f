"""Parity at export: the ONNX graph against the torch module it came from, on fresh random inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..runtime.errors import ExportError
from ..runtime.manifest import ParityRecord
from .specs import ComponentSpec

#: fp32 relative L2 error above which export fails.
FP32_TOLERANCE = 1e-4


def error_figures(got: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    """(max abs error, relative L2 error, cosine similarity) of `got` against the reference."""
    got, ref = np.asarray(got, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    diff = got - ref
    max_abs = float(np.abs(diff).max()) if diff.size else 0.0
    ref_norm = float(np.linalg.norm(ref))
    rel_l2 = float(np.linalg.norm(diff) / ref_norm) if ref_norm > 0 else float(np.linalg.norm(diff))
    denom = float(np.linalg.norm(got) * ref_norm)
    cosine = float(got @ ref / denom) if denom > 0 else float(np.array_equal(got, ref))
    return max_abs, rel_l2, cosine


def measure_parity(spec: ComponentSpec, module: torch.nn.Module, onnx_path: Path,
                   provider: str = "CPUExecutionProvider") -> list[ParityRecord]:
    """Run torch (fp32, CPU) and ONNX Runtime (on `provider`) at the spec's two parity shapes."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=[provider])
    if session.get_providers()[0] != provider:
        raise ExportError(f"{spec.name}: parity must run on {provider}, but the session got {session.get_providers()}")
    records = []
    for k, dims in enumerate(spec.parity_points()):
        inputs = spec.sample_inputs(dims, seed=1000 + k)  # fresh: not the inputs export traced with
        with torch.no_grad():
            ref = module(*inputs)
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = session.run(spec.output_names, {n: t.numpy() for n, t in zip(spec.input_names, inputs)})
        for name, g, r in zip(spec.output_names, got, ref):
            if g.shape != tuple(r.shape):
                raise ExportError(f"{spec.name}: output {name} has shape {g.shape} in ONNX, {tuple(r.shape)} in torch at {dims}")
            max_abs, rel_l2, cosine = error_figures(g, r.numpy())
            records.append(ParityRecord(dict(dims), name, max_abs, rel_l2, cosine))
    return records


def check_parity(component: str, records: list[ParityRecord], tolerance: float = FP32_TOLERANCE) -> None:
    for r in records:
        if not np.isfinite(r.rel_l2_error) or r.rel_l2_error > tolerance:
            raise ExportError(
                f"{component}: parity failed for output {r.output} at {r.shape}: relative L2 error "
                f"{r.rel_l2_error:.3g} exceeds {tolerance:g} (max abs error {r.max_abs_error:.3g})"
            )
