"""One ONNX Runtime session for one bundle component: providers checked, inputs checked, run."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np

from .errors import BundleError, ProviderError
from .manifest import ComponentManifest
from .providers import (
    ProviderPreference,
    available_providers,
    check_providers,
)

logger = logging.getLogger(__name__)


class Session:
    def __init__(self, bundle_dir: Path, component: ComponentManifest, preference: ProviderPreference,
                 intra_op_threads: int = 0):
        import onnxruntime as ort

        self.component = component
        self.path = Path(bundle_dir) / component.model_file.path
        preference = _restrict_to_component(preference, component)
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
        self.providers = check_providers(preference, self._session.get_providers(), component.name)
        names = [i.name for i in self._session.get_inputs()]
        expected = [i.name for i in component.inputs]
        if names != expected:
            raise BundleError(str(self.path), f"graph inputs {names} differ from manifest.json's {expected}")
        self.output_names = [o.name for o in component.outputs]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self._session.run(self.output_names, dict(feeds))


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
