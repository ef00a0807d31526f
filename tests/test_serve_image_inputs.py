"""OpenAI's edits and variations over a real socket, with the real `openai` client: PNGs back, the
mask's transparent pixels edited and nothing else, and every bad upload a 4xx naming the field
while the service keeps serving (issue 25)."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw
from test_serve import running
from test_serve_api import client, service  # noqa: F401  (the same service fixture and client)

PROMPT = "a blue square on the left"


def png(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def scene() -> Image.Image:
    image = Image.new("RGB", (64, 64), (240, 240, 236))
    ImageDraw.Draw(image).ellipse((36, 20, 58, 42), fill=(220, 40, 40))
    return image


def alpha_mask(size: int = 64) -> Image.Image:
    """OpenAI's convention: fully transparent where to edit (the left half), opaque elsewhere."""
    mask = Image.new("RGBA", (size, size), (0, 0, 0, 255))
    ImageDraw.Draw(mask).rectangle((0, 0, size // 2 - 1, size - 1), fill=(0, 0, 0, 0))
    return mask


def decoded(item) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item.b64_json))).convert("RGB")


def test_openai_edit_changes_only_the_transparent_area(service):
    source = scene()
    result = client(service).images.edit(image=("scene.png", png(source), "image/png"),
                                         mask=("mask.png", png(alpha_mask()), "image/png"), prompt=PROMPT, n=2,
                                         response_format="b64_json", extra_body={"steps": 4, "seed": 5})
    assert len(result.data) == 2 and result.size == "64x64"
    for item in result.data:
        out = np.asarray(decoded(item))
        assert np.array_equal(out[:, 32:], np.asarray(source)[:, 32:])  # kept exactly outside the mask
        assert np.abs(out[:, :32].astype(int) - np.asarray(source)[:, :32]).mean() > 1  # repainted inside
    a, b = (np.asarray(decoded(i)) for i in result.data)
    assert not np.array_equal(a, b)  # two images, two seeds


def test_an_edit_without_a_mask_uses_the_images_own_transparency(service):
    rgba = scene().convert("RGBA")
    rgba.paste((0, 0, 0, 0), (0, 0, 32, 64))
    result = client(service).images.edit(image=("scene.png", png(rgba), "image/png"), prompt=PROMPT,
                                         response_format="b64_json", extra_body={"steps": 4, "seed": 5})
    out = np.asarray(decoded(result.data[0]))
    assert np.array_equal(out[:, 32:], np.asarray(scene())[:, 32:])


def test_openai_variation_returns_pngs_by_url(service):
    result = client(service).images.create_variation(image=("scene.png", png(scene()), "image/png"), n=2,
                                                     extra_body={"steps": 4, "seed": 9})
    assert len(result.data) == 2
    for item in result.data:
        data = httpx.get(item.url).content
        assert data.startswith(b"\x89PNG") and Image.open(io.BytesIO(data)).size == (64, 64)


def test_models_list_their_tasks(service):
    (model,) = client(service).models.list().data
    assert model.model_extra["tasks"] == ["text-to-image", "image-to-image", "inpainting", "variations"]


def post(url: str, route: str, files: dict, data: dict | None = None) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/{route}", files=files, data=data or {}, timeout=60)


def frames_gif() -> bytes:
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


BAD = [
    ("edits", {"image": ("a.txt", b"plain text", "text/plain")}, {"prompt": "x"}, "image", "not an image"),
    ("edits", {"image": ("a.png", png(scene())[:200], "image/png")}, {"prompt": "x"}, "image", "truncated or corrupt"),
    ("edits", {"image": ("b.png", png(Image.new("1", (50_000, 50_000))), "image/png")}, {"prompt": "x"}, "image",
     "pixels; at most"),
    ("edits", {"image": ("a.gif", frames_gif(), "image/gif")}, {"prompt": "x"}, "image", "2 frames"),
    ("edits", {"image": ("a.png", png(scene()), "image/png"), "mask": ("m.png", png(alpha_mask(32)), "image/png")},
     {"prompt": "x"}, "mask", "must be the image's size"),
    ("edits", {"image": ("a.png", png(scene()), "image/png"), "mask": ("m.png", png(Image.new("L", (64, 64))),
                                                                         "image/png")},
     {"prompt": "x"}, "mask", "no alpha channel"),
    ("edits", {"image": ("a.png", png(scene()), "image/png")}, {"prompt": "x"}, "image", "no alpha channel"),
    ("edits", {"image": ("a.png", png(scene().convert("RGBA")), "image/png")}, {}, "prompt", "required"),
    ("edits", {"image": ("a.png", png(scene().convert("RGBA")), "image/png")}, {"prompt": "x", "strength": "1.5"},
     "strength", "less than or equal to 1"),
    ("edits", {"image[]": ("a.png", png(scene()), "image/png"), "image": ("b.png", png(scene()), "image/png")},
     {"prompt": "x"}, "image", "give one image"),
    ("variations", {}, {"n": "1"}, "image", "the image as a file"),  # no file: httpx sends a plain form
    ("variations", {"image": ("a.png", png(scene()), "image/png")}, {"prompt": "x"}, "prompt", "take no prompt"),
    ("variations", {"image": ("a.png", png(scene()), "image/png")}, {"n": "11"}, "n", "less than or equal to 10"),
]


@pytest.mark.parametrize("route, files, data, param, message", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_uploads_are_refused_by_name_and_the_service_keeps_serving(service, route, files, data, param, message):
    r = post(service, route, files, data)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert httpx.get(f"{service}/health/live").status_code == 200


def test_uploads_are_bounded_and_must_be_multipart(tiny_pipeline):
    with running(tiny_pipeline, max_upload_bytes=10_000) as url:
        big = png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
        assert len(big) > 10_000
        r = post(url, "variations", {"image": ("a.png", big, "image/png")})
        assert r.status_code == 400 and r.json()["error"]["param"] == "image" and "larger than" in r.text
        r = httpx.post(f"{url}/v1/images/variations", json={"image": "aGVsbG8="})
        assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]


def test_a_bundle_without_the_image_encoder_says_so(bundle_copy):
    import json

    from ortdiffusion import Pipeline

    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    del manifest["components"]["vae_encoder"]
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with running(Pipeline.load(bundle_copy, providers="cpu")) as url:
        r = post(url, "variations", {"image": ("a.png", png(scene()), "image/png")})
        assert r.status_code == 400 and r.json()["error"]["param"] == "image" and "image encoder" in r.text


def test_an_upload_past_starlettes_spool_size_is_not_written_to_disk(service, monkeypatch):
    """Starlette spools uploads over 1 MiB to a temporary file; ours stay in memory (4 MB limit)."""
    import tempfile

    created = []
    real = tempfile.SpooledTemporaryFile

    class Watch(real):
        def rollover(self):
            created.append(True)
            return super().rollover()

    import starlette.formparsers

    monkeypatch.setattr(starlette.formparsers, "SpooledTemporaryFile", Watch)
    noise = np.random.default_rng(1).integers(0, 255, (700, 700, 3), dtype=np.uint8)
    big = png(Image.fromarray(noise))
    assert 1024 * 1024 < len(big) < 4 * 1024 * 1024
    r = post(service, "variations", {"image": ("big.png", big, "image/png")}, {"size": "64x64", "steps": "2"})
    assert r.status_code == 200, r.text
    assert created == []


def test_the_largest_image_allowed_is_read_and_resized(service):
    """The worst upload the limits admit by pixels: 4096² (a flat PNG, well under 4 MB), resized to the asked size."""
    big = png(Image.new("RGB", (4096, 4096), (200, 60, 60)))
    r = post(service, "variations", {"image": ("big.png", big, "image/png")}, {"size": "64x64", "steps": "2"})
    assert r.status_code == 200, r.text
    assert r.json()["size"] == "64x64"
