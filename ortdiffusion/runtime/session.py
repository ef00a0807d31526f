"""One ONNX Runtime session for one bundle component: providers checked, inputs checked, run."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np

from .cache import cache_dir
from .errors import BundleError, ProviderError
from .manifest import ComponentManifest
from .providers import (
    ProviderKind,
    ProviderPreference,
    ShapeProfile,
    TensorRTOptions,
    available_providers,
    check_providers,
    gpu_name,
    tensorrt_cache_key,
    tensorrt_version,
)

logger = logging.getLogger(__name__)


class Session:
    def __init__(self, bundle_dir: Path, component: ComponentManifest, preference: ProviderPreference,
                 intra_op_threads: int = 0, bundle_sha256: str = "", tensorrt_cache: Path | None = None):
        import onnxruntime as ort

        self.component = component
        self.path = Path(bundle_dir) / component.model_file.path
        preference = _restrict_to_component(preference, component)
        self.tensorrt_engine_dir: Path | None = None
        if ProviderKind.TENSORRT in preference.kinds and ProviderKind.TENSORRT in available_providers():
            preference = self._with_tensorrt_cache(preference, bundle_sha256, tensorrt_cache or cache_dir() / "tensorrt")
        cached = self.tensorrt_engine_dir is not None and any(self.tensorrt_engine_dir.glob("*.engine"))
        start = time.perf_counter()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads  # 0: one per physical core
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                str(self.path), options, providers=preference.ort_providers(available_providers())
            )
        except (ProviderError, BundleError):
            raise
        except Exception as e:  # onnxruntime raises its own (non-exported) exception types
            raise BundleError(str(self.path), f"onnxruntime cannot load it: {str(e).splitlines()[0][:300]}") from None
        self.load_s = time.perf_counter() - start
        self.providers = check_providers(preference, self._session.get_providers(), component.name)
        if self.tensorrt_engine_dir is not None and self.providers[0] is ProviderKind.TENSORRT:
            what = "loaded its cached TensorRT engine" if cached else "built its TensorRT engine"
            logger.info("%s: %s in %.1f s (%s)", component.name, what, self.load_s, self.tensorrt_engine_dir)
        names = [i.name for i in self._session.get_inputs()]
        expected = [i.name for i in component.inputs]
        if names != expected:
            raise BundleError(str(self.path), f"graph inputs {names} differ from manifest.json's {expected}")
        self.output_names = [o.name for o in component.outputs]
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

    def run(self, feeds: Mapping[str, np.ndarray], release_memory: bool = False) -> list[np.ndarray]:
        """Run; with `release_memory`, hand the memory this run's intermediates took in the CPU
        arena back afterwards (ONNX Runtime's run option `memory.enable_memory_arena_shrinkage`).
        The pipeline asks for it after the last denoising step and after the one-shot components,
        so that one component's arena does not sit beside the next one's peak."""
        return self._session.run(self.output_names, dict(feeds), self._release if release_memory else None)


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


__all__ = ["Session"]
