"""What one request may cost the service, checked before it is queued, and how a batch is cut
into chunks that each fit in memory.

The cost of a generation is about images × pixels × steps UNet work. Its memory is the batch's:
the UNet's activations grow with images × pixels, its attention with pixels² per image (the
built-in model at 256x256 attends over 4096 tokens: about 1.1 GB per image in a batch, measured in
benchmarks/reliability.py). So the service bounds

- `n` (`max_images`) and images × pixels × steps (`max_work`): how long a request holds the worker;
- the images × pixels of one batch (`max_batch_pixels`, and `max_batch_images`): a request larger
  than that runs as several batches, one after the other, so its peak memory is one batch's and one
  denoising step — the unit at which deadlines and cancellation are checked — stays short.

A request that can never fit is refused with a 400 whose `param` names the field to lower.
"""

from __future__ import annotations

from dataclasses import replace

from ..runtime.errors import OverBudgetError
from ..runtime.request import GenerationRequest
from .settings import ServeConfig


def admit(request: GenerationRequest, config: ServeConfig, n_field: str = "n") -> None:
    """Raise `OverBudgetError` naming the field to lower if `request` costs more than `config` admits."""
    pixels = request.width * request.height
    if request.num_images > config.max_images:
        raise OverBudgetError(n_field, f"at most {config.max_images} images per request here, got {request.num_images}")
    if pixels > config.max_batch_pixels:
        raise OverBudgetError("size", f"{request.width}x{request.height} is {pixels} pixels; one image may have at "
                                      f"most {config.max_batch_pixels} here")
    work = request.num_images * pixels * request.steps
    if work > config.max_work:
        # Name what to lower: the image count if one image fits, else the steps.
        field = n_field if request.num_images > 1 and pixels * request.steps <= config.max_work else "steps"
        most = config.max_work // (pixels * (request.num_images if field == "steps" else request.steps))
        raise OverBudgetError(field, f"{request.num_images} images × {request.width}x{request.height} × "
                                     f"{request.steps} steps is more work than one request may ask for here "
                                     f"({config.max_work} image-pixel-steps); at this "
                                     f"{'size and steps' if field == n_field else 'size and count'}, "
                                     f"{field} may be at most {max(most, 0)}")


def chunk_size(request: GenerationRequest, config: ServeConfig) -> int:
    """Images per batch for this request's size: within both batch limits, at least 1."""
    return max(1, min(config.max_batch_images, config.max_batch_pixels // (request.width * request.height)))


def second_prompts(requests: list[GenerationRequest], start: int = 0, stop: int | None = None) -> dict:
    """A second text encoder's prompts (SDXL's prompt_2) per image of `requests`, [start:stop]."""
    if all(r.prompts_2 is None and r.negative_prompts_2 is None for r in requests):
        return {}
    prompts = [p for r in requests for p in r.texts("prompt_2")[0]]
    negatives = [q for r in requests for q in r.texts("prompt_2")[1]]
    return {"prompts_2": tuple(prompts[start:stop]), "negative_prompts_2": tuple(negatives[start:stop])}


def chunks(request: GenerationRequest, size: int) -> list[GenerationRequest]:
    """A one-image-per-prompt request (as the batcher merges them) cut into runs of `size` images."""
    pairs = request.image_prompts()
    if len(pairs) <= size:
        return [request]
    out = []
    for start in range(0, len(pairs), size):
        part = pairs[start:start + size]
        out.append(replace(
            request, prompts=tuple(p for p, _ in part), negative_prompts=tuple(n for _, n in part),
            num_images_per_prompt=1, seeds=request.seeds[start:start + size], latents=None,
            conditioning={k: v[start:start + size] for k, v in request.conditioning.items()},
            **second_prompts([request], start, start + size),
        ))
    return out
