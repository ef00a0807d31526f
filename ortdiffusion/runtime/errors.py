"""The one error hierarchy of ortdiffusion; each class carries its HTTP status once.

Messages name the field or file and what was expected. Validation raises these, never `assert`.
"""

from __future__ import annotations


class OrtDiffusionError(Exception):
    """Base of every error the engine raises on purpose."""

    http_status: int = 500
    #: OpenAI-style error type, used by the HTTP service.
    error_type: str = "server_error"
    #: Whether the same request may succeed if retried later.
    retryable: bool = False


class InvalidRequestError(OrtDiffusionError, ValueError):
    """A request field has a value the engine cannot take."""

    http_status = 400
    error_type = "invalid_request_error"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class BundleError(OrtDiffusionError):
    """A bundle (or the checkpoint it is made from) is missing a file, corrupt, or of an unknown format."""

    http_status = 500
    error_type = "server_error"

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path


class ExportError(OrtDiffusionError):
    """Export could not produce a bundle that computes what the checkpoint does."""

    http_status = 500


class ProviderError(OrtDiffusionError):
    """The execution providers asked for are not the ones a session got."""

    http_status = 500


class NumericalError(OrtDiffusionError):
    """NaN or Inf appeared in latents or pixels and no fp32 fallback could repair it."""

    http_status = 500


class OverloadedError(OrtDiffusionError):
    """The service's queue is full; retry later."""

    http_status = 429
    error_type = "rate_limit_error"
    retryable = True


class DeadlineExceededError(OrtDiffusionError):
    """A request did not finish within its deadline."""

    http_status = 504
    error_type = "timeout_error"
    retryable = True
