"""One ONNX Runtime session for one bundle component: providers checked, inputs checked, run —
with numpy arrays (`Session.run`) or with IO binding on OrtValues that stay where they are
(`Session.run_bound`, `run_bound` for any ONNX Runtime session)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

from .cache import cache_dir
from .errors import BundleError, ProviderError
from .manifest import ComponentManifest
from .optimized_graphs import CacheEntry, entry_for
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
                 fixed_dims: Mapping[str, int] | None = None, settings: ComponentSettings | None = None,
                 graph_cache: Path | None = None):
        """`fixed_dims`: symbolic dims fixed at load (ONNX Runtime's free dimension overrides), so
        the shape arithmetic folds away; what a CUDA graph needs (`device_loop.GraphCache`).
        `settings`: this component's own session settings (arena, GPU memory limit).
        `graph_cache`: a folder of optimized graphs (`optimized_graphs.py`): the graph ONNX Runtime
        optimized is saved there once and loaded from there after, unoptimized; None: optimize at
        every load."""
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
        self.fixed_dims = dict(fixed_dims or {})
        self._ort_providers = preference.ort_providers(available_providers())
        entry = None
        if graph_cache is not None:
            entry = entry_for(graph_cache, component, ort.__version__, self._ort_providers, self.fixed_dims)
        #: "loaded" (from the optimized-graph cache), "saved" (optimized here and saved), or None (not cached)
        self.graph_cache: str | None = None
        self._session = self._open(entry, intra_op_threads)
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

    def _open(self, entry: CacheEntry | None, threads: int):
        """The ONNX Runtime session: from the cached optimized graph where there is a whole one (with
        optimizations off: they were applied when it was saved), else from the bundle's graph,
        optimized here (and saved into `entry`)."""
        import onnxruntime as ort

        arena, dims = self.settings.cpu_memory_arena, self.fixed_dims
        if entry is not None and entry.ready():
            try:
                session = ort.InferenceSession(str(entry.model), session_options(threads, arena, dims, "disable"),
                                               providers=self._ort_providers)
                self.graph_cache = "loaded"
                return session
            except Exception as e:  # a damaged entry: optimize afresh and replace it
                logger.warning("%s: cached optimized graph %s does not load (%s); rebuilding it", self.component.name,
                               entry.model, str(e).splitlines()[0][:200])
                entry.discard()
        scratch = None
        if entry is not None:
            try:
                scratch = entry.scratch()
            except OSError as e:  # a read-only cache: run without it
                logger.info("%s: optimized-graph cache not writable (%s)", self.component.name, e)
        options = session_options(threads, arena, dims, optimized_model_path=str(scratch) if scratch else None)
        try:
            session = ort.InferenceSession(str(self.path), options, providers=self._ort_providers)
        except Exception as e:  # onnxruntime raises its own (non-exported) exception types
            if scratch is not None:
                scratch.unlink(missing_ok=True)
            raise BundleError(str(self.path), f"onnxruntime cannot load it: {str(e).splitlines()[0][:300]}") from None
        if scratch is not None and entry is not None and scratch.is_file():
            try:
                entry.commit(scratch)
                self.graph_cache = "saved"
            except OSError as e:
                logger.info("%s: could not save its optimized graph (%s)", self.component.name, e)
                scratch.unlink(missing_ok=True)
        return session

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


class Sessions(MutableMapping):
    """A bundle's sessions by component name; those named in `lazy` are created on first use
    (`sessions[name]`), once, even with several threads asking at the same time. Iterating over the
    names creates nothing; reading every value (`.values()`, `.items()`) creates them all.

    `parallel`: the sessions created at load are created side by side, one thread each. ONNX
    Runtime builds a session with the GIL released, so on the CPU the UNet's session (the longest)
    and the others overlap — what a one-shot CLI command waits for before its first step
    (`benchmarks/cold_start.py`). Pipeline asks for it only where every such session is a CPU
    provider's: GPU providers' sessions (TensorRT engine builds, CUDA memory reserved at creation)
    are made one at a time, as before."""

    def __init__(self, names: Sequence[str], make: Callable[[str], Session], lazy: Collection[str] = (),
                 parallel: bool = False):
        self._names = list(names)
        self._make = make
        self._lock = threading.Lock()
        eager = [name for name in self._names if name not in lazy]
        if parallel and len(eager) > 1:
            with ThreadPoolExecutor(len(eager), thread_name_prefix="ortdiffusion-session") as pool:
                made = {name: pool.submit(make, name) for name in eager}
            # every creation has finished here; the first failure (in component order) is raised,
            # the others logged
            failures = [(name, future.exception()) for name, future in made.items() if future.exception()]
            for name, error in failures[1:]:
                logger.error("%s: its session failed too: %s", name, error)
            if failures:
                raise failures[0][1]
            self._loaded: dict[str, Session] = {name: future.result() for name, future in made.items()}
        else:
            self._loaded = {name: make(name) for name in eager}

    def __getitem__(self, name: str) -> Session:
        session = self._loaded.get(name)
        if session is None:
            if name not in self._names:
                raise KeyError(name)
            with self._lock:
                session = self._loaded.get(name)
                if session is None:
                    logger.info("%s: creating its session on first use", name)
                    session = self._loaded[name] = self._make(name)
        return session

    def __setitem__(self, name: str, session: Session) -> None:  # a test's spy in place of a session
        if name not in self._names:
            self._names.append(name)
        self._loaded[name] = session

    def __delitem__(self, name: str) -> None:
        self._names.remove(name)
        self._loaded.pop(name, None)

    def __contains__(self, name: object) -> bool:  # Mapping's would create the session to answer
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._names))

    def __len__(self) -> int:
        return len(self._names)

    def load_all(self) -> None:
        """Create every session not created yet (a service, before it says it is ready)."""
        for name in self:
            self[name]

    def loaded(self) -> dict[str, Session]:
        """The sessions created so far."""
        return {name: self._loaded[name] for name in self._names if name in self._loaded}


def expected_provider(component: ComponentManifest, preference: ProviderPreference) -> ProviderKind:
    """The provider a session of `component` is asked for first (what `Session` will check it got);
    a `ProviderError` where it cannot run on any."""
    kinds = _restrict_to_component(preference, component).kinds
    have = set(available_providers())
    preference.ort_providers(have)  # the same errors as at the session's creation
    return next(k for k in kinds if k in have)


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


__all__ = ["Session", "Sessions", "expected_provider", "run_bound"]
