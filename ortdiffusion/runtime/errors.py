"""The one error hierarchy of ortdiffusion; each class carries its HTTP status once.

Messages name the field or file and what was expected. Validation raises these, never `assert`.
"""

from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    """The one vocabulary of `error.code` values the HTTP service answers with (OpenAI's spelling:
    lower snake case), so a client can branch on a code, not on a message or a class name."""

    INVALID_VALUE = "invalid_value"
    UNKNOWN_PARAMETER = "unknown_parameter"
    INVALID_JSON = "invalid_json"
    REQUEST_TOO_LARGE = "request_too_large"
    OVER_BUDGET = "over_budget"
    INVALID_API_KEY = "invalid_api_key"
    MISDIRECTED_REQUEST = "misdirected_request"
    MODEL_NOT_FOUND = "model_not_found"
    IMAGE_NOT_FOUND = "image_not_found"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    OVERLOADED = "overloaded"
    NOT_READY = "not_ready"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    SERVER_ERROR = "server_error"


class OrtDiffusionError(Exception):
    """Base of every error the engine raises on purpose."""

    http_status: int = 500
    #: OpenAI-style error type, used by the HTTP service.
    error_type: str = "server_error"
    #: The service's `error.code` for it.
    code: ErrorCode = ErrorCode.SERVER_ERROR
    #: Whether the same request may succeed if retried later.
    retryable: bool = False


class InvalidRequestError(OrtDiffusionError, ValueError):
    """A request field has a value the engine cannot take."""

    http_status = 400
    error_type = "invalid_request_error"
    code = ErrorCode.INVALID_VALUE

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class OverBudgetError(InvalidRequestError):
    """Each value of a request is allowed, but together they are more work (images × pixels × steps)
    or more memory than the service admits; `field` names the one to lower."""

    code = ErrorCode.OVER_BUDGET


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
    code = ErrorCode.OVERLOADED
    retryable = True


class DeadlineExceededError(OrtDiffusionError):
    """A request did not finish within its deadline."""

    http_status = 504
    error_type = "timeout_error"
    code = ErrorCode.DEADLINE_EXCEEDED
    retryable = True
