"""The service under a hostile but legal client (issue 32), over real sockets: a cost budget per
request, read deadlines and a connection bound, logs that do not multiply, auth, the Host header,
errors in one shape, a byte-capped URL store, and safe headers."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import socket

import httpx
import pytest
from PIL import Image

from ortdiffusion.runtime.errors import ErrorCode
from ortdiffusion.serve.settings import ImageMetadata
from test_serve import KEY, gen, running

CODES = {c.value for c in ErrorCode}


@pytest.fixture(scope="module")
def guarded(tiny_pipeline):
    with running(tiny_pipeline, max_connections=24, header_timeout_s=1.0, body_timeout_s=1.0, max_batch_images=2,
                 max_images=4) as url:
        yield url


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closed `sock` (EOF or reset) within `seconds` (a bound, not a measurement)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


# -- 1. the cost budget -------------------------------------------------------------------------


@pytest.mark.parametrize("body, param", [
    ({"n": 4, "size": "256x256", "steps": 20}, "n"),
    ({"n": 1, "size": "256x256", "steps": 150}, "steps"),
    ({"n": 5}, "n"),
])
def test_a_request_that_can_never_fit_is_a_400_naming_the_field(guarded, body, param):
    r = gen(guarded, **body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("over_budget", param) and error["message"].startswith(param)


def test_a_request_larger_than_a_batch_runs_in_chunks(guarded):
    before = _batches(guarded)
    r = gen(guarded, n=4, response_format="b64_json", seed=3)
    assert r.status_code == 200 and len(r.json()["data"]) == 4
    assert [d["seed"] for d in r.json()["data"]] == [3, 4, 5, 6]
    assert _batches(guarded) - before == 2, "n=4 with --max-batch 2 runs as two batches"


def _batches(url: str) -> float:
    line = next(x for x in httpx.get(f"{url}/metrics").text.splitlines() if x.startswith("ortdiffusion_batch_images_count"))
    return float(line.split()[-1])


# -- 2. slow clients and connection exhaustion --------------------------------------------------


def test_half_sent_requests_are_closed_and_cannot_lock_others_out(guarded):
    port = port_of(guarded)
    slow = []
    for i in range(60):  # more than max_connections (24): the oldest waiting ones are closed first
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\n" if i % 2 else b"GE")
        slow.append(s)
    try:
        assert httpx.get(f"{guarded}/health/live", timeout=10).status_code == 200
        assert gen(guarded, steps=2).status_code == 200
        # Headers not finished within header_timeout_s (1 s): closed; the newest one too.
        assert closed_within(slow[-1], 10)
        # A body that never completes is closed after body_timeout_s.
        b = socket.create_connection(("127.0.0.1", port))
        b.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                  b"content-length: 100\r\n\r\n{\"prompt\"")
        assert closed_within(b, 10)
        b.close()
    finally:
        for s in slow:
            s.close()


def test_idle_keep_alive_connection_is_closed(tiny_pipeline):
    with running(tiny_pipeline, keep_alive_s=0.5) as url:
        s = socket.create_connection(("127.0.0.1", port_of(url)))
        s.sendall(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        assert closed_within(s, 10)
        s.close()


# -- 3. logs ------------------------------------------------------------------------------------


def test_a_flood_of_the_same_error_is_logged_a_few_times_without_tracebacks(caplog):
    from ortdiffusion.serve.connections import install_log_limits

    install_log_limits()
    log = logging.getLogger("asyncio")
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        for _ in range(1000):
            try:
                raise OSError(24, "Too many open files")
            except OSError:
                log.error("socket.accept() out of system resource", exc_info=True)
    records = [r for r in caplog.records if "out of system resource" in r.getMessage()]
    assert 1 <= len(records) <= 5
    assert all(r.exc_info is None for r in records) and "Too many open files" in records[0].getMessage()


# -- 4. auth ------------------------------------------------------------------------------------


def test_key_scheme_is_case_insensitive_and_401_says_how(tiny_pipeline):
    with running(tiny_pipeline, api_key=KEY) as url:
        ok = httpx.get(f"{url}/v1/models", headers={"authorization": f"bearer {KEY}"})
        assert ok.status_code == 200
        for value in ("", f"Bearer {KEY}x", f"Basic {KEY}", KEY):
            r = httpx.get(f"{url}/v1/models", headers={"authorization": value} if value else {})
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
            assert r.json()["error"]["code"] == "invalid_api_key"
        # No docs pages (they load a CDN); the schema only with the key.
        assert httpx.get(f"{url}/docs").json()["error"]["code"] in ("invalid_api_key", "not_found")
        assert httpx.get(f"{url}/openapi.json").status_code == 401
        assert httpx.get(f"{url}/openapi.json", headers={"authorization": f"Bearer {KEY}"}).status_code == 200


def test_image_metadata_setting(tiny_pipeline):
    with running(tiny_pipeline, image_metadata=ImageMetadata.NO_PROMPT) as url:
        r = gen(url, seed=9, steps=2)
        image = Image.open(io.BytesIO(httpx.get(r.json()["data"][0]["url"]).content))
        assert image.text["seed"] == "9" and "prompt" not in image.text and "model_hash" in image.text
    with running(tiny_pipeline, image_metadata=ImageMetadata.NONE) as url:
        r = gen(url, response_format="b64_json", steps=2)
        assert not Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).text


# -- 5. the Host header -------------------------------------------------------------------------


def test_hosts_outside_the_allow_list_are_refused(guarded, tiny_pipeline):
    r = httpx.post(
        f"{guarded}/v1/images/generations", json={"prompt": "x", "steps": 2}, headers={"host": "attacker.example"})
    assert r.status_code == 421 and r.json()["error"]["code"] == "misdirected_request"
    assert httpx.get(f"{guarded}/health/live", headers={"host": "10.1.2.3:8000"}).status_code == 200  # probes
    with running(tiny_pipeline, public_url="https://images.example.com/base") as url:
        image_url = gen(url, steps=2).json()["data"][0]["url"]
        assert image_url.startswith("https://images.example.com/base/v1/images/files/")
        r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "x", "steps": 2},
                       headers={"host": "images.example.com"})
        assert r.status_code == 200


# -- 6. errors in one shape ---------------------------------------------------------------------


RAW = [
    ("non-UTF-8 body", b'{"prompt": "\xff\xfe\xfa"}', 400),
    ("5000-digit number", b'{"prompt": "x", "steps": ' + b"9" * 5000 + b"}", 400),
    ("deep nesting in UTF-16", ('{"prompt": ' + "[" * 100 + "]" * 100 + "}").encode("utf-16"), 400),
]


@pytest.mark.parametrize("name, body, status", RAW, ids=[r[0] for r in RAW])
def test_undecodable_bodies_answer_in_openais_shape(guarded, name, body, status):
    r = httpx.post(f"{guarded}/v1/images/generations", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] in CODES


def test_unknown_routes_and_methods_answer_in_openais_shape(guarded):
    from openai import NotFoundError, OpenAI

    missing = httpx.get(f"{guarded}/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = httpx.get(f"{guarded}/v1/images/generations")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    client = OpenAI(base_url=f"{guarded}/v1", api_key="unused", max_retries=0)  # no trailing slash
    with pytest.raises(NotFoundError) as info:
        client.embeddings.create(model="tiny", input="x")  # an OpenAI route this service does not have
    assert info.value.body["code"] == "not_found"


def test_every_error_code_is_from_the_vocabulary(guarded):
    answers = [gen(guarded, n="2"), gen(guarded, colour="red"), gen(guarded, model="other"), gen(guarded, n=5),
               httpx.get(f"{guarded}/v1/images/files/nope.png")]
    assert {r.json()["error"]["code"] for r in answers} <= CODES


# -- 7. the URL store ---------------------------------------------------------------------------


def test_url_store_is_capped_by_bytes(tiny_pipeline):
    from ortdiffusion.serve.images import ImageStore

    one = len(tiny_pipeline("a red circle", num_inference_steps=2, seed=1).pngs()[0])
    store = ImageStore(max_bytes=int(one * 2.5))
    with running(tiny_pipeline, store=store) as url:
        urls = [gen(url, steps=2, seed=1).json()["data"][0]["url"] for _ in range(4)]
        assert [httpx.get(u).status_code for u in urls] == [404, 404, 200, 200]
        assert store.bytes <= store.max_bytes


# -- 8. headers ---------------------------------------------------------------------------------


def test_safe_headers_and_an_opaque_instance(guarded):
    r = gen(guarded, steps=2)
    image = httpx.get(r.json()["data"][0]["url"])
    for answer in (r, image, httpx.get(f"{guarded}/v1/models")):
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["cache-control"] == "no-store"
    instance = r.headers["x-ortdiffusion-instance"]
    assert socket.gethostname() not in instance and str(os.getpid()) not in instance
    assert json.loads(httpx.get(f"{guarded}/health/ready").text)["instance"] == instance
    assert r.headers["x-request-id"].startswith("req_")
