"""The HTTP request and response bodies (OpenAI's images API plus the engine's extensions)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..runtime.request import MAX_GUIDANCE, MAX_SEED, MAX_STEPS
from ..runtime.schedulers import SchedulerName

MAX_PROMPT_CHARS = 4000  # OpenAI's limit for its newest image models

Prompt = Annotated[str, Field(strict=True, min_length=1, max_length=MAX_PROMPT_CHARS)]
#: A ControlNet's scale or schedule fraction (ranges checked by runtime.control.make_control, naming the field).
ControlNumber = Annotated[float, Field(allow_inf_nan=False)]


class GenerateImageRequest(BaseModel):
    """`POST /generate-image`: the simplest call."""

    model_config = ConfigDict(extra="forbid")

    prompt: Prompt
    negative_prompt: Annotated[str | None, Field(strict=True, max_length=MAX_PROMPT_CHARS)] = None
    # Checked by runtime.request.parse_size (the CLI's parser); "auto": the model's own size.
    size: Annotated[str | None, Field(strict=True, max_length=16, description="WIDTHxHEIGHT or auto")] = None
    steps: Annotated[int | None, Field(strict=True, ge=1, le=MAX_STEPS)] = None
    guidance_scale: Annotated[float | None, Field(strict=True, ge=0, le=MAX_GUIDANCE, allow_inf_nan=False)] = None
    seed: Annotated[int | None, Field(strict=True, ge=0, le=MAX_SEED)] = None
    scheduler: SchedulerName | None = None
    # SDXL (extensions, diffusers' names): the second text encoder's prompts, and where the base
    # hands over to the refiner the service was started with (`--refiner`).
    prompt_2: Annotated[str | None, Field(strict=True, max_length=MAX_PROMPT_CHARS)] = None
    negative_prompt_2: Annotated[str | None, Field(strict=True, max_length=MAX_PROMPT_CHARS)] = None
    denoising_end: Annotated[float | None, Field(strict=True, gt=0, lt=1, allow_inf_nan=False)] = None
    # Extensions with the Python API's names (docs/families.md): diffusers' guidance rescale, the
    # bundle's tiny decoder, prompts past the tokenizer's length in windows.
    guidance_rescale: Annotated[float | None, Field(strict=True, ge=0, le=1, allow_inf_nan=False)] = None
    decoder: Literal["full", "tiny"] | None = None
    long_prompts: Annotated[bool | None, Field(strict=True)] = None
    # LoRAs the service registered (`--lora-dir`, listed in /v1/models) by name → scale, blended.
    lora: Annotated[dict[Annotated[str, Field(max_length=200)], Annotated[float, Field(ge=-10, le=10, allow_inf_nan=False)]]
                    | None, Field(max_length=16)] = None
    # ControlNet (extensions, diffusers' names; serve/control_inputs.py): base64 control images, one
    # per ControlNet of the bundle, and per ControlNet one number or a list.
    control_image: Annotated[str, Field(strict=True)] | list[Annotated[str, Field(strict=True)]] | None = None
    controlnet_conditioning_scale: ControlNumber | list[ControlNumber] | None = None
    control_guidance_start: ControlNumber | list[ControlNumber] | None = None
    control_guidance_end: ControlNumber | list[ControlNumber] | None = None
    guess_mode: Annotated[bool | None, Field(strict=True)] = None
    canny: Annotated[bool | None, Field(strict=True)] = None


class ImageGenerationRequest(GenerateImageRequest):
    """`POST /v1/images/generations`, as OpenAI's API, with the engine's extensions."""

    n: Annotated[int, Field(strict=True, ge=1, le=10)] = 1
    response_format: Literal["b64_json", "url"] = "url"
    model: Annotated[str | None, Field(strict=True, max_length=256)] = None
    user: Annotated[str | None, Field(strict=True, max_length=256)] = None
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: Annotated[int | None, Field(strict=True, ge=0, le=100)] = None
    # Accepted for compatibility with OpenAI clients; they do not change what this engine draws
    # (README: "OpenAI parameters accepted and ignored").
    quality: Annotated[str | None, Field(strict=True, max_length=32)] = None
    style: Annotated[str | None, Field(strict=True, max_length=32)] = None
    background: Literal["transparent", "opaque", "auto"] | None = None
    moderation: Literal["low", "auto"] | None = None
    #: With `stream`: previews sent while the image denoises (serve/stream.py), as OpenAI's.
    partial_images: Annotated[int | None, Field(strict=True, ge=0, le=3)] = None
    stream: Annotated[bool | None, Field(strict=True)] = None
    #: With `stream`: a progress event after every denoising step (an extension; the page uses it).
    progress: Annotated[bool | None, Field(strict=True)] = None


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str | None = None
    size: str | None = None
    #: Where the model will not draw what was asked: words it never saw, sizes it was not trained at (an extension).
    warnings: list[str] | None = None
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
    #: What the model does: text-to-image; image-to-image, inpainting, variations where the bundle has
    #: the image encoder (an extension: the edits and variations routes need those).
    tasks: list[str] = []
    #: What a request that names nothing gets, and what it may name (an extension, for the page):
    #: width, height, steps, guidance_scale, scheduler; schedulers; size_min, size_max, size_multiple.
    defaults: dict[str, int | float | str] | None = None
    schedulers: list[str] | None = None
    #: The LoRAs a request may name in `lora` (an extension; `serve --lora-dir`).
    loras: list[str] | None = None


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
