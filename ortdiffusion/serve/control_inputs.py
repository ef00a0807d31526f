"""The ControlNet extension of `POST /v1/images/generations` and `/generate-image`: control images as
base64 in the JSON body, with diffusers' names for the rest (runtime/control.py).

    "control_image": "<base64 PNG/JPEG/WebP>" (or a data URL), or a list, one per ControlNet
    "controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end": a number or a list
    "guess_mode": bool, "canny": bool (turn the images into Canny edges first)

A request with control images batches only with itself (serve/batcher.py: its compatibility key
holds its own control), so requests are merged only where they would run the same ControlNets on
the same images.
"""

from __future__ import annotations

import base64
import binascii

from ..runtime.control import CONTROL_IMAGE, ControlRequest, make_control
from ..runtime.errors import InvalidRequestError
from ..runtime.manifest import Manifest


def _decoded(value: str, field: str) -> bytes:
    """A base64 string (standard alphabet, or a `data:image/...;base64,` URL) → its bytes."""
    if value.startswith("data:"):
        head, _, value = value.partition(",")
        if not head.endswith(";base64"):
            raise InvalidRequestError(field, "a data URL must be base64 (data:image/png;base64,...)")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(field, "is not base64: give the image file's bytes (PNG, JPEG or WebP) in "
                                         "base64, or a data URL") from None


def control_from_body(manifest: Manifest, body) -> ControlRequest | None:
    """The body's control fields → the request's control, or None without `control_image`."""
    given = body.control_image
    if given is None:
        for name in ("controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end", "guess_mode",
                     "canny"):
            if getattr(body, name) is not None:
                raise InvalidRequestError(name, f"applies with {CONTROL_IMAGE}, which the request does not give")
        return None
    items = given if isinstance(given, list) else [given]
    names = [CONTROL_IMAGE] if not isinstance(given, list) else [f"{CONTROL_IMAGE}[{k}]" for k in range(len(items))]
    images = [_decoded(v, n) for v, n in zip(items, names)]
    return make_control(manifest, images if isinstance(given, list) else images[0],
                        body.controlnet_conditioning_scale,
                        0.0 if body.control_guidance_start is None else body.control_guidance_start,
                        1.0 if body.control_guidance_end is None else body.control_guidance_end,
                        bool(body.guess_mode), bool(body.canny))
