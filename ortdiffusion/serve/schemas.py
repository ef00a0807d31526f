"""The HTTP request and response bodies (OpenAI's images API plus the engine's extensions)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..runtime.request import MAX_GUIDANCE
from ..runtime.schedulers import SchedulerName

MAX_PROMPT_CHARS = 4000  # OpenAI's limit for its newest image models
MAX_SERVICE_STEPS = 150
MAX_SEED = 2**63 - 16

Prompt = Annotated[str, Field(strict=True, min_length=1, max_length=MAX_PROMPT_CHARS)]


class GenerateImageRequest(BaseModel):
    """`POST /generate-image`: the simplest call."""

    model_config = ConfigDict(extra="forbid")

    prompt: Prompt
    negative_prompt: Annotated[str | None, Field(strict=True, max_length=MAX_PROMPT_CHARS)] = None
    size: Annotated[str | None, Field(strict=True, pattern=r"^[0-9]{1,5}x[0-9]{1,5}$", description="WIDTHxHEIGHT")] = None
    steps: Annotated[int | None, Field(strict=True, ge=1, le=MAX_SERVICE_STEPS)] = None
    guidance_scale: Annotated[float | None, Field(strict=True, ge=0, le=MAX_GUIDANCE, allow_inf_nan=False)] = None
    seed: Annotated[int | None, Field(strict=True, ge=0, le=MAX_SEED)] = None
    scheduler: SchedulerName | None = None


class ImageGenerationRequest(GenerateImageRequest):
    """`POST /v1/images/generations`, as OpenAI's API, with the engine's extensions."""

    n: Annotated[int, Field(strict=True, ge=1, le=10)] = 1
    response_format: Literal["b64_json", "url"] = "url"
    model: Annotated[str | None, Field(strict=True, max_length=256)] = None
    user: Annotated[str | None, Field(strict=True, max_length=256)] = None
    # Accepted for compatibility with OpenAI clients; they do not change what this engine draws.
    quality: Annotated[str | None, Field(strict=True, max_length=32)] = None
    style: Annotated[str | None, Field(strict=True, max_length=32)] = None


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    #: The provider each component really ran on (an extension).
    providers: dict[str, str]


class GenerateImageResponse(BaseModel):
    image_url: str
    seed: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ortdiffusion"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
