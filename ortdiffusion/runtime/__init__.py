"""Bundle → images with onnxruntime, numpy, tokenizers and pillow; never torch."""

from .errors import (
    BundleError,
    DeadlineExceededError,
    ExportError,
    InvalidRequestError,
    NumericalError,
    OrtDiffusionError,
    OverloadedError,
    ProviderError,
)
from .pipeline import Pipeline, PipelineResult
from .trace import Timings
from .providers import ComponentSettings, CudaOptions, ProviderKind, ProviderPreference, TensorRTOptions, available_providers
from .schedulers import SchedulerName

__all__ = [
    "BundleError", "DeadlineExceededError", "ExportError", "InvalidRequestError", "NumericalError",
    "OrtDiffusionError", "OverloadedError", "ProviderError", "Pipeline", "PipelineResult", "Timings",
    "ComponentSettings", "CudaOptions", "ProviderKind", "ProviderPreference", "TensorRTOptions", "available_providers",
    "SchedulerName",
]
