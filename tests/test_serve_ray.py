"""The service on a real local Ray cluster: two replicas behind Ray Serve's proxy, the real
`openai` client, the same images and errors as the single-machine service, and a replica killed
under load."""

from __future__ import annotations

import base64
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

pytest.importorskip("ray.serve")

from test_serve import decode, free_port, running, wait_until_ready

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_service(tiny_bundle):
    import ray
    from ray import serve

    from ortdiffusion.serve.ray_app import APP_NAME, build_app
    from ortdiffusion.serve.settings import RayOptions, ServeConfig

    # Logical CPUs: two replicas of one CPU each, whatever this machine has.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    options = RayOptions(model=str(tiny_bundle), replicas=2, cpus_per_replica=1, threads=1,
                         serve=ServeConfig(model_name="tiny"))
    serve.run(build_app(options), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(url, 180)
    try:
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def openai_client(url: str, max_retries: int = 0, http_client=None):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=max_retries, http_client=http_client)


def generate_raw(client, seed: int, prompt: str = "a red circle"):
    raw = client.images.with_raw_response.generate(
        prompt=prompt, response_format="b64_json", extra_body={"seed": seed, "steps": 3})
    return raw.headers["x-ortdiffusion-instance"], decode(raw.parse().data[0].b64_json)


def test_two_replicas_serve_and_match_the_single_machine_service(ray_service, tiny_pipeline):
    client = openai_client(ray_service)
    seeds = list(range(16))
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda s: generate_raw(client, s), seeds))
    instances = {instance for instance, _ in answers}
    assert len(instances) == 2, f"expected both replicas to serve, got {instances}"

    with running(tiny_pipeline) as single:
        local = openai_client(single)
        for seed, (_, image) in zip(seeds, answers):
            _, expected = generate_raw(local, seed)
            # Batched and unbatched runs of the same seed agree to within one level of 255.
            assert np.abs(image - expected).max() <= 1, f"seed {seed} differs from the single-machine service"


def test_image_urls_resolve_through_any_replica(ray_service):
    client = openai_client(ray_service)
    url = client.images.generate(prompt="a blue square", extra_body={"seed": 1, "steps": 2}).data[0].url
    assert url.startswith(ray_service)
    for _ in range(6):  # requests land on either replica; the store they share answers all
        r = httpx.get(url, timeout=30)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert httpx.get(f"{ray_service}/v1/images/files/nope.png", timeout=30).status_code == 404


def test_errors_have_the_single_machine_shape(ray_service, tiny_pipeline):
    from openai import BadRequestError, NotFoundError

    client = openai_client(ray_service)
    with pytest.raises(BadRequestError) as bad:
        client.images.generate(prompt="x", size="63x64", extra_body={"steps": 2})
    with pytest.raises(NotFoundError):
        client.images.generate(prompt="x", model="other", extra_body={"steps": 2})
    assert bad.value.body["param"] == "size"
    body = {"prompt": "x", "steps": 0}
    with running(tiny_pipeline) as single:
        expected = httpx.post(f"{single}/generate-image", json=body, timeout=30)
    got = httpx.post(f"{ray_service}/generate-image", json=body, timeout=30)
    assert got.status_code == expected.status_code == 400
    assert got.json() == expected.json()


def replica_pid(instance: str) -> int:
    """The process of the replica whose (opaque) `x-ortdiffusion-instance` is Ray's replica id:
    asked of the replica's actor through Ray, since the header no longer names a host or a pid."""
    import ray
    from ray.serve._private.common import REPLICA_ID_FULL_ID_STR_PREFIX

    from ortdiffusion.serve.ray_app import APP_NAME

    actor = ray.get_actor(f"{REPLICA_ID_FULL_ID_STR_PREFIX}{APP_NAME}#ortdiffusion#{instance}", namespace="serve")
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60)


def test_killing_a_replica_under_load(ray_service):
    """One replica's process is killed mid-load: the other keeps serving, Ray starts a new one, and
    the openai client's own retries absorb every failure the proxy returns."""
    statuses: list[int] = []
    lock = threading.Lock()

    def record(response: httpx.Response) -> None:
        with lock:
            statuses.append(response.status_code)

    http = httpx.Client(event_hooks={"response": [record]}, timeout=120)
    client = openai_client(ray_service, max_retries=4, http_client=http)
    before = {generate_raw(client, s)[0] for s in range(8)}
    victim = min(before)
    pid = replica_pid(victim)

    results: list[tuple[str, object]] = []

    def one(seed: int) -> None:
        try:
            instance, _ = generate_raw(client, seed)
            results.append(("ok", instance))
        except Exception as e:  # noqa: BLE001 - recorded and asserted on below
            results.append(("error", repr(e)))

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(one, s) for s in range(60)]
        time.sleep(1.0)
        os.kill(pid, signal.SIGKILL)
        for f in futures:
            f.result()

    errors = [r for r in results if r[0] == "error"]
    assert not errors, f"requests failed after retries: {errors[:3]}"
    served_after = {r[1] for r in results[-20:]}
    assert served_after - {victim}, "the surviving replica did not keep serving"
    # Ray replaces the dead replica: a new process joins the pool.
    deadline = time.time() + 120
    seen: set[str] = set()
    while time.time() < deadline:
        seen |= {generate_raw(client, s)[0] for s in range(6)}
        if len(seen - before) >= 1 and len(seen - {victim}) >= 2:
            break
        time.sleep(1)
    assert len(seen - {victim}) >= 2, f"no replacement replica served: {seen}"
    failed = sorted(s for s in statuses if s >= 500)
    print(f"\nkill under load: {len(results)} requests ok, {len(failed)} 5xx absorbed by client retries: {failed}")


def test_cli_serve_ray_starts_serves_and_stops_cleanly(tiny_bundle):
    import subprocess
    import sys

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # start a fresh local cluster
    proc = subprocess.Popen([sys.executable, "-m", "ortdiffusion.cli", "serve", "--ray", "--model", str(tiny_bundle),
                             "--model-name", "tiny", "--replicas", "1", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, 240, proc)
        r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "a red circle", "steps": 2,
                                                             "response_format": "b64_json"}, timeout=60)
        assert r.status_code == 200 and base64.b64decode(r.json()["data"][0]["b64_json"])[:4] == b"\x89PNG"
        assert httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"] == "tiny"
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(120)
    assert rc == 0, proc.stderr.read().decode()[-3000:]


@pytest.mark.parametrize("args, field", [
    ({"replicas": "0"}, "replicas"),
    ({"replicas": "two"}, "replicas"),
    ({"min_replicas": "3", "max_replicas": "2"}, "max_replicas"),
    ({"batching": "maybe"}, "batching"),
    ({"num_gpus": "1"}, "num_gpus"),
])
def test_ray_options_name_the_bad_field(args, field):
    from ortdiffusion.runtime.errors import InvalidRequestError
    from ortdiffusion.serve.settings import RayOptions

    with pytest.raises(InvalidRequestError) as e:
        RayOptions.from_args(args)
    assert e.value.field == field


def test_ray_options_from_strings():
    from ortdiffusion.serve.ray_app import deployment_options
    from ortdiffusion.serve.settings import ImageMetadata, RayOptions

    o = RayOptions.from_args({"replicas": "2", "cpus-per-replica": "0.5", "batching": "false", "max_replicas": "none",
                              "image_metadata": "none", "max_queue": "4"})
    assert (o.replicas, o.cpus_per_replica, o.serve.batching, o.max_replicas) == (2, 0.5, False, None)
    assert (o.serve.image_metadata, o.serve.max_queue) == (ImageMetadata.NONE, 4)
    assert deployment_options(o)["num_replicas"] == 2
    auto = deployment_options(RayOptions.from_args({"min_replicas": "1", "max_replicas": "4"}))
    assert auto["autoscaling_config"]["max_replicas"] == 4 and "num_replicas" not in auto
