"""Streaming (issue 28): `stream: true` with `partial_images` on generations and edits, as OpenAI's
images API streams them, read by the real `openai` client from the real service over a socket; the
previews' latent → RGB map (runtime/preview.py)."""

from __future__ import annotations

import base64
import dataclasses
import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from ortdiffusion.runtime.preview import KNOWN_LATENT_RGB, Previewer
from ortdiffusion.serve.stream import preview_steps
from test_serve import running

PROMPT = "a red circle on the left"


@pytest.fixture(scope="module")
def builtin():
    from ortdiffusion import Pipeline

    return Pipeline.load("builtin", providers="cpu")


@pytest.fixture(scope="module")
def service(builtin):
    with running(builtin, model_name="builtin") as url:
        yield url


def client(url):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_openai_client_streams_partial_images_then_the_same_image_as_without_streaming(service):
    from openai.types import ImageGenCompletedEvent, ImageGenPartialImageEvent

    events = list(client(service).images.generate(model="builtin", prompt=PROMPT, stream=True, partial_images=2,
                                                  size="64x64", extra_body={"steps": 12, "seed": 7}))
    assert [type(e) for e in events] == [ImageGenPartialImageEvent, ImageGenPartialImageEvent, ImageGenCompletedEvent]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for event in events:
        assert event.size == "64x64" and event.output_format == "png" and event.background == "opaque"
        assert png(event.b64_json).size == (64, 64)
    done = events[-1]
    assert done.type == "image_generation.completed" and done.model_extra["seed"] == 7
    assert done.model_extra["providers"]["unet"] == "cpu" and done.model_extra["timings"]["unet"] > 0
    assert png(done.b64_json).text["prompt"] == PROMPT  # the parameters in the PNG, as without streaming
    plain = client(service).images.generate(model="builtin", prompt=PROMPT, size="64x64", response_format="b64_json",
                                            extra_body={"steps": 12, "seed": 7})
    assert np.array_equal(np.asarray(png(done.b64_json)), np.asarray(png(plain.data[0].b64_json)))
    # the last preview already looks like the image: closer to it than the first preview is
    final = np.asarray(png(done.b64_json), np.float32)
    first, last = (np.abs(np.asarray(png(e.b64_json), np.float32) - final).mean() for e in events[:2])
    assert last < first


def test_no_partial_images_sends_only_the_completed_images(service):
    events = list(client(service).images.generate(prompt=PROMPT, stream=True, n=2, size="64x64",
                                                  extra_body={"steps": 3, "seed": 1}))
    assert [e.type for e in events] == ["image_generation.completed"] * 2
    assert [e.model_extra["seed"] for e in events] == [1, 2]


def test_progress_events_are_opt_in_and_count_every_step(service):
    with httpx.stream("POST", f"{service}/v1/images/generations", timeout=60, json={
            "prompt": PROMPT, "steps": 4, "stream": True, "progress": True, "partial_images": 1}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        names = [line.split(": ", 1)[1] for line in r.iter_lines() if line.startswith("event: ")]
    assert names == ["image_generation.progress"] * 2 + ["image_generation.partial_image"] + \
        ["image_generation.progress"] * 2 + ["image_generation.completed"]


def test_openai_client_streams_an_edit(service):
    from openai.types import ImageEditCompletedEvent, ImageEditPartialImageEvent

    scene = client(service).images.generate(prompt="a red circle on the right", size="64x64", response_format="b64_json",
                                            extra_body={"steps": 4, "seed": 3})
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))  # transparent: edit the left half
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    events = list(client(service).images.edit(
        image=("scene.png", base64.b64decode(scene.data[0].b64_json), "image/png"),
        mask=("mask.png", buffer.getvalue(), "image/png"), prompt="a blue square on the left", stream=True,
        partial_images=1, extra_body={"steps": 6, "seed": 4}))
    assert [type(e) for e in events] == [ImageEditPartialImageEvent, ImageEditCompletedEvent]
    assert events[-1].type == "image_edit.completed"
    edited, original = (np.asarray(png(b).convert("RGB")) for b in (events[-1].b64_json, scene.data[0].b64_json))
    assert np.array_equal(edited[:, 32:], original[:, 32:])  # only the masked half changed


@pytest.mark.parametrize("body, param", [
    ({"stream": True, "partial_images": 4}, "partial_images"),
    ({"stream": "yes"}, "stream"),
    ({"stream": True, "progress": 1}, "progress"),
])
def test_stream_fields_out_of_range_name_the_field(service, body, param):
    r = httpx.post(f"{service}/v1/images/generations", json={"prompt": PROMPT, **body}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_variations_do_not_stream(service):
    image = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(image, format="PNG")
    r = httpx.post(f"{service}/v1/images/variations", files={"image": ("a.png", image.getvalue(), "image/png")},
                   data={"stream": "true"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"


def test_a_client_that_leaves_a_stream_stops_its_work(service):
    """150 steps take many seconds; the worker goes idle soon after the client closes the stream."""
    with httpx.stream("POST", f"{service}/v1/images/generations", timeout=60, json={
            "prompt": PROMPT, "steps": 150, "stream": True, "progress": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"step":2' in line:
                break
    left = time.monotonic()
    for _ in range(300):  # a bound on the wait, not a timing claim
        text = httpx.get(f"{service}/metrics").text
        if "ortdiffusion_in_flight 0.0" in text and "ortdiffusion_queue_depth 0.0" in text:
            break
        time.sleep(0.05)
    assert "ortdiffusion_in_flight 0.0" in text, "the abandoned stream's generation kept running"
    assert time.monotonic() - left < 10


def test_the_page_is_served_from_the_package_without_the_key(builtin):
    from test_serve import KEY

    with running(builtin, model_name="builtin", api_key=KEY) as url:
        page = httpx.get(f"{url}/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        for name, kind in (("page.js", "text/javascript"), ("page.css", "text/css")):
            asset = httpx.get(f"{url}/page/{name}")
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind) and f"/page/{name}" in page.text
        assert httpx.get(f"{url}/page/__init__.py").status_code == 404  # only the page's files
        assert httpx.get(f"{url}/v1/models").status_code == 401  # the API still needs the key
        assert httpx.get(f"{url}/", headers={"host": "evil.example"}).status_code == 421


def test_preview_steps_are_evenly_spaced_and_never_the_last():
    assert preview_steps(20, 3) == {4, 9, 14}
    assert preview_steps(20, 0) == set() and preview_steps(1, 3) == set()
    assert preview_steps(2, 3) == {0}
    assert all(max(preview_steps(n, k)) < n - 1 for n in range(2, 40) for k in (1, 2, 3))


def test_the_builtin_bundles_preview_map_approximates_its_decoder(builtin):
    assert builtin.previewer.source == "manifest"
    latents = []
    image = builtin(PROMPT, seed=5, num_inference_steps=10, callback=lambda i, n, x: latents.append(x.copy())).images[0]
    preview = np.asarray(builtin.previewer(latents[-1])[0], np.float32)
    decoded = np.asarray(image, np.float32)
    assert preview.shape == decoded.shape == (64, 64, 3)
    # a rough picture of it: far closer to the decoded image than a flat grey is
    assert np.abs(preview - decoded).mean() < 0.5 * np.abs(128 - decoded).mean()


def test_bundles_without_a_map_use_sd_vaes_known_one_or_fit_one(builtin):
    c = builtin.manifest.pipeline
    sd = dataclasses.replace(builtin.manifest, pipeline=dataclasses.replace(c, latent_rgb=None, vae_scaling_factor=0.18215))
    known = Previewer(sd, builtin._decode_scaled)
    assert known.source == "known" and known.latent_rgb is KNOWN_LATENT_RGB[(4, 0.18215)]
    bare = dataclasses.replace(builtin.manifest, pipeline=dataclasses.replace(c, latent_rgb=None))
    fitted = Previewer(bare, builtin._decode_scaled)
    assert fitted.source == "fitted"
    pixels = fitted.pixels(np.zeros((2, 4, 16, 16), np.float32))
    assert pixels.shape == (2, 16, 16, 3) and pixels.dtype == np.uint8


from test_tiny_decoder import taesd_dir, tiny_bundle_with_taesd  # noqa: E402,F401 - fixtures


def test_a_bundle_with_a_tiny_decoder_previews_with_it(tiny_bundle_with_taesd):
    from ortdiffusion import Pipeline

    pipe = Pipeline.load(tiny_bundle_with_taesd, providers="cpu")
    assert pipe.previewer.source == "tiny decoder"
    latents = []
    result = pipe(PROMPT, seed=2, num_inference_steps=3, decoder="tiny", callback=lambda i, n, x: latents.append(x))
    (preview,) = pipe.previewer(latents[-1])
    # the last step's preview is the tiny decoder's image itself, at the image's size
    assert preview.size == result.images[0].size
    assert np.abs(np.asarray(preview, np.int16) - np.asarray(result.images[0], np.int16)).max() <= 1
