"""The HTTP service over a real socket: the OpenAI client, errors, batching, backpressure, health."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from ortdiffusion.serve.app import create_app
from ortdiffusion.serve.server import uvicorn_config
from ortdiffusion.serve.settings import ServeConfig

KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(url: str, timeout_s: float, process=None) -> None:
    """Poll /health/ready until it answers 200; fail early with the log if `process` died."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process is not None:
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not become ready in {timeout_s:g} s")


@contextmanager
def running(pipeline, store=None, **config):
    config = ServeConfig(**{"model_name": "tiny", **config})
    port = free_port()
    server = uvicorn.Server(uvicorn_config(create_app(pipeline, config, store=store), config, host="127.0.0.1", port=port,
                                           log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(url, 60)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def service(tiny_pipeline):
    with running(tiny_pipeline) as url:
        yield url


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(int)


def gen(url, **body):
    return httpx.post(f"{url}/v1/images/generations", json={"prompt": "a red circle", "steps": 3, **body}, timeout=120)


# -- the API ------------------------------------------------------------------------------------


def test_openai_client_works_unchanged(tiny_pipeline):
    from openai import OpenAI

    with running(tiny_pipeline, api_key=KEY) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        result = client.images.generate(model="tiny", prompt="a blue square", n=2, size="64x64",
                                        response_format="b64_json", extra_body={"steps": 3, "seed": 5})
        assert len(result.data) == 2
        first = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
        assert first.size == (64, 64) and first.text["seed"] == "5" and first.text["prompt"] == "a blue square"
        by_url = client.images.generate(model="tiny", prompt="a blue square", extra_body={"steps": 2})
        png = httpx.get(by_url.data[0].url, timeout=10)
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert [m.id for m in client.models.list().data] == ["tiny"]

        import openai

        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).images.generate(prompt="x")
        with pytest.raises(openai.NotFoundError) as info:
            client.images.generate(model="dall-e-3", prompt="x")
        assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"
        with pytest.raises(openai.BadRequestError) as info:
            client.images.generate(prompt="x", size="63x64")
        assert info.value.body["param"] == "size"


def test_response_says_which_providers_ran(service):
    r = gen(service, response_format="b64_json", seed=1)
    assert r.status_code == 200
    providers = r.json()["providers"]  # every component the bundle has (the VAE encoder where it has one)
    assert {"text_encoder", "unet", "vae_decoder"} <= set(providers) and set(providers.values()) == {"cpu"}
    assert r.headers["x-ortdiffusion-providers"] == ",".join(f"{k}=cpu" for k in providers)


def test_generate_image_route_and_expiring_urls(tiny_pipeline):
    with running(tiny_pipeline, image_ttl_s=1.0) as url:
        r = httpx.post(f"{url}/generate-image", json={"prompt": "a green star", "steps": 2}, timeout=60)
        assert r.status_code == 200
        image_url = r.json()["image_url"]
        assert image_url.startswith(url) and httpx.get(image_url).status_code == 200
        time.sleep(1.2)
        gone = httpx.get(image_url)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "image_not_found"


def test_health_and_metrics(service):
    assert httpx.get(f"{service}/health/live").json() == {"status": "live"}
    assert httpx.get(f"{service}/health/ready").status_code == 200
    gen(service)
    text = httpx.get(f"{service}/metrics").text
    for name in ("ortdiffusion_requests_total", "ortdiffusion_queue_seconds", "ortdiffusion_compute_seconds",
                 "ortdiffusion_batch_images", "ortdiffusion_queue_depth", "ortdiffusion_in_flight"):
        assert name in text
    assert 'ortdiffusion_requests_total{route="/v1/images/generations",status="200"}' in text


# -- reliability, over a real socket ------------------------------------------------------------


def busy_request(url, results):
    """A request that holds the worker for a few seconds (many steps at twice the native size)."""
    results.append(gen(url, steps=80, size="128x128"))


def wait_until_busy(url):
    for _ in range(200):
        if "ortdiffusion_in_flight 1.0" in httpx.get(f"{url}/metrics").text:
            return
        time.sleep(0.02)
    raise AssertionError("the worker never became busy")


def test_full_queue_refuses_exactly_the_excess(tiny_pipeline):
    queue_size, k = 4, 3
    with running(tiny_pipeline, max_queue=queue_size) as url:
        held = []
        holder = threading.Thread(target=busy_request, args=(url, held))
        holder.start()
        wait_until_busy(url)
        with ThreadPoolExecutor(queue_size + k) as pool:
            statuses = list(pool.map(lambda i: gen(url, seed=i, steps=2), range(queue_size + k)))
        holder.join()
        codes = sorted(r.status_code for r in statuses)
        assert codes == [200] * queue_size + [429] * k
        refused = next(r for r in statuses if r.status_code == 429)
        assert refused.headers["retry-after"] and refused.headers["x-should-retry"] == "true"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert held[0].status_code == 200


def test_abandoned_requests_are_dropped_and_logged_once(tiny_pipeline, caplog):
    """Abandoned requests leave the queue and stop the running batch (the worker goes idle), and
    none leaves asyncio's "Future exception was never retrieved" behind. (How soon the next request
    is served is measured in benchmarks/serve_abandon.py.)"""
    import gc

    with running(tiny_pipeline, max_queue=64) as url:
        for i in range(12):
            with pytest.raises(httpx.TimeoutException):
                httpx.post(f"{url}/v1/images/generations", timeout=0.05,
                           json={"prompt": "abandoned", "steps": 20, "size": "256x256", "seed": i})
        for _ in range(600):  # a bound on the wait, not a timing claim: the worker must go idle
            text = httpx.get(f"{url}/metrics").text
            if "ortdiffusion_queue_depth 0.0" in text and "ortdiffusion_in_flight 0.0" in text:
                break
            time.sleep(0.1)
        assert "ortdiffusion_queue_depth 0.0" in text and "ortdiffusion_in_flight 0.0" in text
        gc.collect()
        assert gen(url, steps=2).status_code == 200
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


BAD = [
    ("wrong type: prompt", {"prompt": 5}, 400, "prompt"),
    ("wrong type: n", {"prompt": "x", "n": "2"}, 400, "n"),
    ("out of range: n", {"prompt": "x", "n": 11}, 400, "n"),
    ("out of range: steps", {"prompt": "x", "steps": 0}, 400, "steps"),
    ("bad size", {"prompt": "x", "size": "big"}, 400, "size"),
    ("size the model cannot take", {"prompt": "x", "size": "1000x64"}, 400, "size"),
    ("unknown scheduler", {"prompt": "x", "scheduler": "plms"}, 400, "scheduler"),
    ("negative seed", {"prompt": "x", "seed": -1}, 400, "seed"),
    ("unknown field", {"prompt": "x", "colour": "red"}, 400, "colour"),
    ("empty prompt", {"prompt": ""}, 400, "prompt"),
    ("huge prompt", {"prompt": "x" * 5000}, 400, "prompt"),
    ("bad response_format", {"prompt": "x", "response_format": "jpeg"}, 400, "response_format"),
    ("nan guidance", '{"prompt": "x", "guidance_scale": NaN}', 400, "guidance_scale"),
    ("deeply nested JSON", '{"prompt": ' + "[" * 5000 + "]" * 5000 + "}", 400, None),
    ("malformed JSON", '{"prompt": ', 400, None),
    ("empty body", "", 400, None),
    ("not an object", "[1, 2]", 400, None),
    ("body over the limit", {"prompt": "x" * 100_000}, 413, None),
]


@pytest.mark.parametrize("name,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_in_openais_shape(service, name, body, status, param):
    kwargs = {"json": body} if isinstance(body, dict) else {"content": body, "headers": {"content-type": "application/json"}}
    r = httpx.post(f"{service}/v1/images/generations", timeout=30, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"]
    assert r.headers["x-should-retry"] == "false"
    assert gen(service).status_code == 200, "the service keeps serving"


def test_concurrent_clients_get_the_images_of_sequential_calls(tiny_pipeline):
    bodies = [dict(prompt=p, seed=s, response_format="b64_json", steps=4, size="64x64")
              for p, s in [("a red circle", 1), ("a blue square", 2), ("a green star", 3), ("a pink triangle", 4),
                           ("a red circle", 5), ("a cyan star", 6), ("a yellow square", 7), ("a purple circle", 8)]]
    bodies[2]["n"] = 2
    with running(tiny_pipeline, batching=False) as url:
        sequential = [[decode(d["b64_json"]) for d in gen(url, **b).json()["data"]] for b in bodies]
    with running(tiny_pipeline, batch_window_s=0.2, max_batch_images=16) as url:
        with ThreadPoolExecutor(8) as pool:
            concurrent = list(pool.map(lambda b: gen(url, **b), bodies))
        sizes = httpx.get(f"{url}/metrics").text
    batched_runs = [line for line in sizes.splitlines() if line.startswith("ortdiffusion_batch_images_count")]
    assert float(batched_runs[0].split()[-1]) < len(bodies), "some requests really were batched together"
    for seq, r in zip(sequential, concurrent):
        got = [decode(d["b64_json"]) for d in r.json()["data"]]
        assert len(got) == len(seq)
        for a, b in zip(got, seq):
            assert np.abs(a - b).max() <= 1


def test_openapi_document_holds_no_5xx(service):
    """schemathesis generates requests from the published OpenAPI document; none may get a 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{service}/openapi.json")
    failures, calls = [], []
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def check(case):
            response = case.call(base_url=service, timeout=120)
            calls.append(response.status_code)
            if response.status_code >= 500:
                failures.append((case.method, case.path, case.body, response.status_code, response.text[:200]))

        check()
    assert len(calls) > 50 and 200 in calls
    assert not failures, failures[:3]


def test_sigterm_finishes_in_flight_work_and_exits_0(tiny_bundle, tmp_path):
    port = free_port()
    env = {**os.environ, "ORTDIFFUSION_CACHE": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "ortdiffusion.cli", "serve", "--model", str(tiny_bundle),
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        held = []
        holder = threading.Thread(target=busy_request, args=(url, held))
        holder.start()
        wait_until_busy(url)
        proc.send_signal(signal.SIGTERM)
        holder.join(120)
        assert held and held[0].status_code == 200, "the request in flight was finished"
        assert proc.wait(60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health/live", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
