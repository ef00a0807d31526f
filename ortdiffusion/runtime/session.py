"""One ONNX Runtime session for one bundle component: providers checked, inputs checked, run —
with numpy arrays (`Session.run`) or with IO binding on OrtValues that stay where they are
(`Session.run_bound`, `run_bound` for any ONNX Runtime session)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from .cache import cache_dir
from .errors import BundleError, ProviderError
from .manifest import ComponentManifest
from .providers import (
    GPU_KINDS,
    ComponentSettings,
    Placement,
    ProviderKind,
    ProviderPreference,
    ShapeProfile,
    TensorRTOptions,
    available_providers,
    check_placement,
    check_providers,
    gpu_name,
    node_assignments,
    session_options,
    tensorrt_cache_key,
    tensorrt_version,
)

logger = logging.getLogger(__name__)


class Session:
    def __init__(self, bundle_dir: Path, component: ComponentManifest, preference: ProviderPreference,
                 intra_op_threads: int = 0, bundle_sha256: str = "", tensorrt_cache: Path | None = None,
                 fixed_dims: Mapping[str, int] | None = None, settings: ComponentSettings | None = None):
        """`fixed_dims`: symbolic dims fixed at load (ONNX Runtime's free dimension overrides), so
        the shape arithmetic folds away; what a CUDA graph needs (`device_loop.GraphCache`).
        `settings`: this component's own session settings (arena, GPU memory limit)."""
        import onnxruntime as ort

        self.component = component
        self.path = Path(bundle_dir) / component.model_file.path
        self.settings = settings or ComponentSettings()
        preference = self.settings.apply(_restrict_to_component(preference, component))
        self.tensorrt_engine_dir: Path | None = None
        if ProviderKind.TENSORRT in preference.kinds and ProviderKind.TENSORRT in available_providers():
            preference = self._with_tensorrt_cache(preference, bundle_sha256, tensorrt_cache or cache_dir() / "tensorrt")
        cached = self.tensorrt_engine_dir is not None and any(self.tensorrt_engine_dir.glob("*.engine"))
        start = time.perf_counter()
        options = session_options(intra_op_threads, self.settings.cpu_memory_arena, fixed_dims)
        self.fixed_dims = dict(fixed_dims or {})
        self._ort_providers = preference.ort_providers(available_providers())
        try:
            self._session = ort.InferenceSession(str(self.path), options, providers=self._ort_providers)
        except (ProviderError, BundleError):
            raise
        except Exception as e:  # onnxruntime raises its own (non-exported) exception types
            raise BundleError(str(self.path), f"onnxruntime cannot load it: {str(e).splitlines()[0][:300]}") from None
        self.load_s = time.perf_counter() - start
        self.providers = check_providers(preference, self._session.get_providers(), component.name)
        self.placement: Placement | None = None  # None where this onnxruntime cannot say
        assignments = node_assignments(self._session)
        if assignments is not None:
            self.placement = check_placement(preference, assignments, component.name)
        if self.tensorrt_engine_dir is not None and self.providers[0] is ProviderKind.TENSORRT:
            what = "loaded its cached TensorRT engine" if cached else "built its TensorRT engine"
            logger.info("%s: %s in %.1f s (%s)", component.name, what, self.load_s, self.tensorrt_engine_dir)
        names = [i.name for i in self._session.get_inputs()]
        expected = [i.name for i in component.inputs]
        if names != expected:
            raise BundleError(str(self.path), f"graph inputs {names} differ from manifest.json's {expected}")
        self.output_names = [o.name for o in component.outputs]
        self._release: ort.RunOptions | None = None  # without a CPU arena there is nothing to hand back
        if self.settings.cpu_memory_arena:
            self._release = ort.RunOptions()
            self._release.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def _with_tensorrt_cache(self, preference: ProviderPreference, bundle_sha256: str, root: Path) -> ProviderPreference:
        """TensorRT options for this component: its shape profile from the manifest, and an engine
        cache folder keyed by bundle, component, GPU, TensorRT version, profile and precision."""
        base = preference.options.get(ProviderKind.TENSORRT) or TensorRTOptions(fp16=True)
        if not isinstance(base, TensorRTOptions):
            raise ProviderError(f"tensorrt: options must be TensorRTOptions, got {type(base).__name__}")
        profile = ShapeProfile.for_component(self.component)
        key = tensorrt_cache_key(bundle_sha256, self.component.name, gpu_name(base.device_id), tensorrt_version(),
                                 profile, base.fp16)
        self.tensorrt_engine_dir = root / key
        self.tensorrt_engine_dir.mkdir(parents=True, exist_ok=True)
        options = replace(base, engine_cache_path=str(self.tensorrt_engine_dir), profile=profile)
        return replace(preference, options={**preference.options, ProviderKind.TENSORRT: options})

    @property
    def device(self) -> tuple[str, int]:
        """Where this session's inputs and outputs live: ("cuda", id) on the CUDA or TensorRT
        provider, ("cpu", 0) on the CPU provider."""
        if self.providers[0] in GPU_KINDS:
            options = dict(self._ort_providers[0][1])
            return "cuda", int(options.get("device_id", 0))
        return "cpu", 0

    def step_graph_providers(self) -> list[tuple[str, dict[str, str]]]:
        """Providers for the small graphs that run between this session's steps (guidance and the
        scheduler step): this session's own, except CUDA in place of TensorRT (an engine build for
        a dozen elementwise ops is not worth it)."""
        kind = self.providers[0]
        if kind is ProviderKind.TENSORRT:
            return [(ProviderKind.CUDA.ort_name, {"device_id": str(self.device[1])})]
        return [p for p in self._ort_providers if p[0] == kind.ort_name]

    def run(self, feeds: Mapping[str, np.ndarray], release_memory: bool = False) -> dict[str, np.ndarray]:
        """Run on numpy arrays: every output by name. With `release_memory`, hand the memory this
        run's intermediates took in the CPU arena back afterwards (ONNX Runtime's run option
        `memory.enable_memory_arena_shrinkage`). The executors ask for it after the last denoising
        step and after the one-shot components, so that one component's arena does not sit beside
        the next one's peak."""
        outputs = self._session.run(self.output_names, dict(feeds), self._release if release_memory else None)
        return dict(zip(self.output_names, outputs))

    def run_bound(self, inputs: Mapping, outputs: Mapping[str, object | None], device: tuple[str, int],
                  release_memory: bool = False) -> dict:
        """Run with IO binding: `inputs` are OrtValues (already where they should be); each output
        named in `outputs` is written into its OrtValue there, or allocated on `device` where it
        maps to None; the outputs by name, as OrtValues. Nothing is copied; outputs not named are
        left unbound."""
        return run_bound(self._session, inputs, outputs, device, self._release if release_memory else None)


def run_bound(session, inputs: Mapping, outputs: Mapping[str, object | None] | Sequence[str], device: tuple[str, int],
              run_options=None) -> dict:
    """Run an ONNX Runtime session with IO binding: OrtValue `inputs`; each output written into its
    OrtValue in `outputs` (a mapping), or allocated on `device` (where it maps to None, or for a
    list of names); the outputs by name, as OrtValues."""
    targets = outputs if isinstance(outputs, Mapping) else dict.fromkeys(outputs)
    io = session.io_binding()
    for name, value in inputs.items():
        io.bind_ortvalue_input(name, value)
    for name, into in targets.items():
        if into is not None:
            io.bind_ortvalue_output(name, into)
        else:
            io.bind_output(name, *device)
    session.run_with_iobinding(io, run_options)
    return dict(zip(targets, io.get_outputs()))


def _restrict_to_component(preference: ProviderPreference, component: ComponentManifest) -> ProviderPreference:
    """Keep the providers this component was exported for; a graph built for one is not run on another."""
    supported = [k for k in preference.kinds if k.value in component.providers]
    if not supported:
        raise ProviderError(
            f"{component.name}: exported for {', '.join(component.providers)}; "
            f"it cannot run on {', '.join(k.value for k in preference.kinds)} (export it for that target)"
        )
    if supported[0] is not preference.kinds[0]:
        logger.info("%s: %s not supported by this export, using %s", component.name,
                    preference.kinds[0].value, supported[0].value)
    return replace(preference, kinds=tuple(supported))


__all__ = ["Session", "run_bound"]
