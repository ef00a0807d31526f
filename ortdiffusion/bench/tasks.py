"""What a bench asks every engine to do: the prompt, and for the image tasks the same input image,
mask and strength, made here so that every engine gets identical inputs (numpy + pillow only)."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..runtime.manifest import Task

PROMPT = "a red circle on the left"
#: The tasks a bench runs (a variation is image-to-image with the empty prompt: nothing new to time).
TASKS = (Task.TEXT_TO_IMAGE, Task.IMAGE_TO_IMAGE, Task.INPAINTING)
#: diffusers' defaults: img2img 0.8 of the schedule, inpainting all of it (from noise in the mask).
STRENGTH = {Task.IMAGE_TO_IMAGE: 0.8, Task.INPAINTING: 1.0}


def input_picture(width: int, height: int) -> Image.Image:
    """A gradient with two shapes: structure for the encoder, the same for every engine."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([x / width * 255, y / height * 255, np.full_like(x, 90)], axis=-1).astype(np.uint8)
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    draw.ellipse((width // 8, height // 8, width // 2, height // 2), fill=(230, 30, 30))
    draw.rectangle((width // 2, height // 2, width - width // 8, height - height // 8), fill=(30, 40, 220))
    return image


def left_half_mask(width: int, height: int) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, width // 2 - 1, height - 1), fill=255)
    return mask


def task_inputs(task: Task | str, width: int, height: int) -> dict[str, Any]:
    """The call's image arguments for `task`, in diffusers' names (ours are the same)."""
    task = Task(task)
    if task is Task.TEXT_TO_IMAGE:
        return {}
    inputs: dict[str, Any] = {"image": input_picture(width, height), "strength": STRENGTH[task]}
    if task is Task.INPAINTING:
        inputs["mask_image"] = left_half_mask(width, height)
    return inputs
