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
from .pipeline import Pipeline, PipelineResult, Timings
from .providers import ProviderKind, ProviderPreference, available_providers
from .schedulers import SchedulerName

__all__ = [
    "BundleError", "DeadlineExceededError", "ExportError", "InvalidRequestError", "NumericalError",
    "OrtDiffusionError", "OverloadedError", "ProviderError", "Pipeline", "PipelineResult", "Timings",
    "ProviderKind", "ProviderPreference", "available_providers", "SchedulerName",
]
