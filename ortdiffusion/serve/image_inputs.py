"""`POST /v1/images/edits` and `POST /v1/images/variations`, as OpenAI's images API defines them:
`multipart/form-data` with the image as a file.

- edits: `image` (or `image[]`, one), `mask` (optional: its fully transparent pixels mark the area to
  edit; without it, the image's own transparent pixels do), `prompt`. Runs as inpainting with the
  input's pixels kept outside the mask (OpenAI changes only the masked area).
- variations: `image` alone. With a Stable Diffusion bundle, image-to-image with the empty prompt
  at `runtime.request.VARIATION_STRENGTH`.

The rest — `n`, `size`, `response_format`, `output_format`, `output_compression`, `user`, `model`
and the engine's extensions (`steps`, `seed`, `guidance_scale`, `scheduler`, `negative_prompt`,
`strength`) — as for generations; fields OpenAI accepts that cannot apply here are accepted and
ignored (README). Uploads are read into memory, bounded by `max_upload_bytes` each, never written
to disk; every refusal names the field.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..runtime.errors import InvalidRequestError
from ..runtime.image_input import mask_from_alpha, open_image
from ..runtime.manifest import Task
from ..runtime.request import MAX_GUIDANCE, MAX_SEED, MAX_STEPS, VARIATION_STRENGTH, size_limits
from ..runtime.schedulers import SchedulerName
from .schemas import MAX_PROMPT_CHARS

FILE_FIELDS = ("image", "image[]", "mask")


class ImageInputForm(BaseModel):
    """The form's text fields, converted as a form's strings are ("2" → 2)."""

    model_config = ConfigDict(extra="forbid")

    prompt: Annotated[str | None, Field(max_length=MAX_PROMPT_CHARS)] = None
    negative_prompt: Annotated[str | None, Field(max_length=MAX_PROMPT_CHARS)] = None
    n: Annotated[int, Field(ge=1, le=10)] = 1
    size: Annotated[str | None, Field(max_length=16)] = None
    response_format: Literal["b64_json", "url"] = "url"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: Annotated[int | None, Field(ge=0, le=100)] = None
    model: Annotated[str | None, Field(max_length=256)] = None
    user: Annotated[str | None, Field(max_length=256)] = None
    steps: Annotated[int | None, Field(ge=1, le=MAX_STEPS)] = None
    guidance_scale: Annotated[float | None, Field(ge=0, le=MAX_GUIDANCE, allow_inf_nan=False)] = None
    seed: Annotated[int | None, Field(ge=0, le=MAX_SEED)] = None
    scheduler: SchedulerName | None = None
    strength: Annotated[float | None, Field(ge=0, le=1, allow_inf_nan=False)] = None
    # edits only: streamed as OpenAI's (serve/stream.py); `progress` is an extension
    stream: bool | None = None
    partial_images: Annotated[int | None, Field(ge=0, le=3)] = None
    progress: bool | None = None
    # accepted and ignored (README: "OpenAI parameters accepted and ignored")
    quality: Annotated[str | None, Field(max_length=32)] = None
    background: Literal["transparent", "opaque", "auto"] | None = None
    input_fidelity: Literal["high", "low"] | None = None
    moderation: Literal["low", "auto"] | None = None


async def read_form(request, max_upload_bytes: int) -> tuple[ImageInputForm, dict[str, bytes]]:
    """The form's fields (validated) and its files' bytes by field name, each at most `max_upload_bytes`."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise InvalidRequestError("image", f"send multipart/form-data with the image as a file (got "
                                           f"{content_type or 'no content type'}), as OpenAI's images API takes it")
    _keep_uploads_in_memory(max_upload_bytes)
    try:
        form = await request.form(max_files=3, max_fields=40)
    except Exception as e:  # noqa: BLE001 - python-multipart's and starlette's parse errors differ by version
        raise InvalidRequestError("image", f"the multipart body could not be read: {e}") from None
    fields, files = {}, {}
    try:
        for name, value in form.multi_items():
            if hasattr(value, "read"):  # an UploadFile
                if name not in FILE_FIELDS:
                    raise InvalidRequestError(name, f"not a file field here (files: {', '.join(FILE_FIELDS)})")
                if name in files or (name.startswith("image") and "image" in files):
                    raise InvalidRequestError(name, "give one image; this model edits one image per request")
                data = await value.read(max_upload_bytes + 1)
                if len(data) > max_upload_bytes:
                    raise InvalidRequestError(name, f"is larger than {max_upload_bytes:,} bytes")
                files["image" if name.startswith("image") else name] = data
            else:
                if name in fields:
                    raise InvalidRequestError(name, "given twice")
                fields[name] = value
    finally:
        await form.close()
    try:
        return ImageInputForm(**fields), files
    except ValidationError as e:
        first = e.errors()[0]
        name = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidRequestError(name, first["msg"]) from None


def _keep_uploads_in_memory(max_upload_bytes: int) -> None:
    """Starlette spools an uploaded file to a temporary file on disk past 1 MiB
    (`MultiPartParser.spool_max_size`, a class attribute with no per-request setting): raised to the
    upload limit, so an upload (bounded by it, and the body by BodyGuard before parsing) stays in
    memory and nothing of it is written to disk."""
    from starlette.formparsers import MultiPartParser

    if MultiPartParser.spool_max_size < max_upload_bytes + 1:
        MultiPartParser.spool_max_size = max_upload_bytes + 1


def image_request_args(form: ImageInputForm, files: dict[str, bytes], pipeline, edit: bool) -> dict:
    """`make_request`'s image arguments for an edit or a variation: the opened image, the mask in
    diffusers' convention (white repaints), strength, size and prompt."""
    tasks = pipeline.manifest.tasks()
    wanted = Task.INPAINTING if edit else Task.VARIATIONS
    if wanted not in tasks:
        raise InvalidRequestError("image", f"this model does not do {wanted.value} (it does: "
                                           f"{', '.join(t.value for t in tasks) or 'nothing with images'}); "
                                           "a bundle exported by this ortdiffusion has the image encoder it needs")
    if "image" not in files:
        raise InvalidRequestError("image", "required: the image to " + ("edit" if edit else "vary") + ", as a file")
    image = open_image(files["image"], "image")
    args = {"image": image}
    if edit:
        if not form.prompt or not form.prompt.strip():
            raise InvalidRequestError("prompt", "required: what to draw in the edited area")
        if "mask" in files:
            mask = open_image(files["mask"], "mask")
            if mask.size != image.size:
                raise InvalidRequestError("mask", f"is {mask.size[0]}×{mask.size[1]}; it must be the image's size "
                                                  f"({image.size[0]}×{image.size[1]})")
            args["mask_image"] = mask_from_alpha(mask, "mask")
        else:  # OpenAI: without a mask, the image's own transparent pixels mark the area to edit
            args["mask_image"] = mask_from_alpha(image, "image")
        args.update(prompt=form.prompt, strength=form.strength, keep_unmasked=True)
    else:
        if form.stream:
            raise InvalidRequestError("stream", "variations do not stream (OpenAI's do not either); "
                                                "edits and generations do")
        if form.prompt is not None:
            raise InvalidRequestError("prompt", "variations take no prompt (the image says what to draw)")
        args.update(prompt="", strength=form.strength if form.strength is not None else VARIATION_STRENGTH)
    args["width"], args["height"] = _size(form.size, image, pipeline)
    return args


def _size(size: str | None, image, pipeline) -> tuple[int, int]:
    """`size`, else (or "auto") the image's own where the model draws it, else the model's default."""
    from ..runtime.request import parse_size

    if size not in (None, "auto"):
        return parse_size(size)
    low, high, multiple = size_limits(pipeline.manifest)
    w, h = (side - side % multiple for side in image.size)
    if low <= w <= high and low <= h <= high:
        return w, h
    c = pipeline.manifest.pipeline
    return c.default_width, c.default_height
