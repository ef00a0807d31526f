"""OpenAI compatibility and watching the service (issue 24, items 7–9 and 11; issue 23's one size
parser and seed limit), over real sockets with the real `openai` client."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys

import httpx
import pytest
from PIL import Image

from ortdiffusion.runtime.png import read_png_metadata
from ortdiffusion.runtime.request import MAX_SEED
from test_serve import KEY, free_port, gen, running, wait_until_ready


@pytest.fixture(scope="module")
def service(tiny_pipeline):
    with running(tiny_pipeline) as url:
        yield url


def client(url):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("fmt, magic", [("png", b"\x89PNG"), ("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")])
def test_output_format_and_compression_with_the_clis_metadata(service, tmp_path, fmt, magic):
    result = client(service).images.generate(
        prompt="a blue square", size="auto", output_format=fmt, output_compression=50, background="auto",
        moderation="low", quality="high", extra_body={"steps": 2, "seed": 11})
    assert result.output_format == fmt and result.size == "64x64"
    data = httpx.get(result.data[0].url).content
    assert data.startswith(magic)
    path = tmp_path / f"image.{fmt}"
    path.write_bytes(data)
    meta = read_png_metadata(path)
    assert meta["prompt"] == "a blue square" and meta["seed"] == "11" and meta["steps"] == "2" and meta["model_hash"]


@pytest.mark.parametrize("body, param", [
    ({"output_format": "gif"}, "output_format"),
    ({"output_compression": 101}, "output_compression"),
    ({"stream": "yes"}, "stream"),
    ({"background": "purple"}, "background"),
])
def test_openai_parameters_out_of_range_name_the_field(service, body, param):
    r = gen(service, **body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_the_same_size_parser_and_seed_limit_as_the_cli(service):
    # The service's own limit was 2**63 - 16 and its own size pattern refused "64X64"; the CLI took both.
    r = gen(service, size="64X64", seed=MAX_SEED - 1, steps=2, response_format="b64_json")
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["seed"] == MAX_SEED - 1
    assert gen(service, seed=MAX_SEED + 1).json()["error"]["param"] == "seed"


def test_builtin_model_response_carries_vocabulary_warnings():
    from ortdiffusion import Pipeline

    with running(Pipeline.load("builtin"), model_name="builtin") as url:
        odd = client(url).images.generate(prompt="two red circles", response_format="b64_json",
                                          extra_body={"steps": 2, "seed": 1})
        assert any("'two'" in w for w in odd.model_extra["warnings"])
        plain = gen(url, prompt="a red circle on the left", steps=2)
        assert "warnings" not in plain.json()


def test_cli_serve_logs_each_request_reads_the_key_file_and_refuses_a_busy_port(tiny_bundle, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    port = free_port()
    env = {**os.environ, "ORTDIFFUSION_CACHE": str(tmp_path), "ORTDIFFUSION_API_KEY": ""}
    command = [sys.executable, "-m", "ortdiffusion.cli", "serve", "--model", str(tiny_bundle), "--port", str(port)]
    proc = subprocess.Popen([*command, "--api-key-file", str(key_file), "-v"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, 120, proc)
        r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "a red circle", "steps": 2, "n": 2},
                       headers={"authorization": f"Bearer {KEY}"}, timeout=60)
        assert r.status_code == 200
        assert httpx.get(f"{url}/v1/models").status_code == 401
        # A second server on the same port fails at once, and never says it is serving.
        busy = subprocess.run([*command, "--model", "no-such-model-is-loaded-first"], env=env,
                              capture_output=True, text=True, timeout=120)
        assert busy.returncode != 0 and "serving on" not in busy.stderr and str(port) in busy.stderr
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    line = next(x for x in err.decode().splitlines() if "POST /v1/images/generations 200" in x)
    assert "images=2" in line and "queue_ms=" in line and "compute_ms=" in line
    assert f"id={r.headers['x-request-id']}" in line
    assert KEY not in err.decode()


def test_docs_pages_are_off_and_say_so_in_openais_shape(service):
    for path in ("/docs", "/redoc"):
        r = httpx.get(f"{service}{path}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert json.loads(httpx.get(f"{service}/openapi.json").text)["paths"]


def test_b64_images_carry_metadata_too(service):
    r = gen(service, response_format="b64_json", seed=4, steps=2)
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
    assert image.text["seed"] == "4" and image.text["prompt"] == "a red circle"


def test_family_extensions_pass_through_with_the_python_apis_names(service):
    """guidance_rescale, decoder and long_prompts reach the pipeline; what the bundle cannot do is
    refused naming the field (the tiny bundle has no tiny decoder; its UNet takes long prompts)."""
    result = client(service).images.generate(
        prompt="a blue square " * 30, response_format="b64_json",
        extra_body={"steps": 2, "seed": 3, "guidance_rescale": 0.5, "long_prompts": True})
    meta = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).text
    assert meta["guidance_rescale"] == "0.5" and meta["long_prompts"] == "true"
    r = gen(service, decoder="tiny")
    assert r.status_code == 400 and r.json()["error"]["param"] == "decoder"
    assert gen(service, guidance_rescale=2).json()["error"]["param"] == "guidance_rescale"
