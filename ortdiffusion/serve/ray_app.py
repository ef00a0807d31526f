"""The same service on Ray Serve: many replicas on many machines, one OpenAI-compatible API.

Each replica is the single-machine service itself — `create_app` over its own `Pipeline`, with its
own batcher (same compatibility rules, same queue bound and 429s), the same validation, errors
and routes — mounted with `@serve.ingress`. Ray Serve adds what one machine lacks: an HTTP proxy
on every node that spreads requests over replicas, replica health checks and restarts, autoscaling.
Images minted for `response_format=url` go to one shared store deployment, so a URL answered by
one replica resolves through any other.

    ortdiffusion serve --ray --replicas 2                          # local cluster, this machine
    serve run ortdiffusion.serve.ray_app:app                       # Ray's own CLI, defaults
    serve run ortdiffusion.serve.ray_app:build_app replicas=2 model=/path/to/bundle

Needs the `ray` extra (`pip install 'ortdiffusion[ray]'`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

try:
    from ray import serve
    from ray.serve.handle import DeploymentHandle
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"Ray Serve is not installed: pip install 'ortdiffusion[ray]' ({e})") from None

from .app import create_app
from .images import ImageStore
from .settings import RayOptions

logger = logging.getLogger(__name__)

APP_NAME = "ortdiffusion"


@serve.deployment(name="images", num_replicas=1, ray_actor_options={"num_cpus": 0})
class SharedImages:
    """The PNGs behind `response_format=url`, shared by all replicas (bounded, expiring)."""

    def __init__(self, ttl_s: float, max_bytes: int):
        self.store = ImageStore(ttl_s, max_bytes=max_bytes)

    def put(self, png: bytes) -> str:
        return self.store.put(png)

    def get(self, token: str) -> bytes | None:
        return self.store.get(token)


class RemoteImages:
    """`create_app`'s image-store interface over the shared deployment's handle."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    async def put(self, png: bytes) -> str:
        return await self.handle.put.remote(png)

    async def get(self, token: str) -> bytes | None:
        return await self.handle.get.remote(token)


@serve.deployment(name="ortdiffusion")
@serve.ingress()  # the app is built per replica, over the pipeline that replica loaded
class Replica:
    def __init__(self, images: DeploymentHandle, bundle: str, options: RayOptions):
        from ..runtime.pipeline import Pipeline

        self.options = options
        threads = self.options.threads or max(1, int(self.options.cpus_per_replica))
        self.pipeline = Pipeline.load(bundle, providers=self.options.provider,
                                      allow_fallback=self.options.allow_fallback, intra_op_threads=threads)
        self.images = images

    def __serve_build_asgi_app__(self):
        # Ray's own replica id: opaque, and what `serve status` and Ray's logs call this replica.
        instance = serve.get_replica_context().replica_id.unique_id
        return create_app(self.pipeline, self.options.serve, store=RemoteImages(self.images), instance=instance)


def build_app(args: dict[str, Any] | RayOptions | None = None):
    """The Ray Serve application (an application builder for `serve run`). Resolves the model
    to a bundle here, on the driver, so a checkpoint or preset is exported once, not per replica."""
    from ..models import DEFAULT_MODEL, resolve_bundle

    options = args if isinstance(args, RayOptions) else RayOptions.from_args(args or {})
    bundle = resolve_bundle(options.model)
    if options.serve.model_name is None:
        from pathlib import Path

        options = replace(options, serve=replace(options.serve, model_name=Path(str(options.model or DEFAULT_MODEL)).name))
    images = SharedImages.bind(options.serve.image_ttl_s, options.serve.image_store_bytes)
    return Replica.options(**deployment_options(options)).bind(images, str(bundle), options)


def deployment_options(options: RayOptions) -> dict[str, Any]:
    deployment: dict[str, Any] = {
        "max_ongoing_requests": options.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": options.cpus_per_replica, "num_gpus": options.gpus_per_replica},
        # Loading a bundle and warming up takes seconds; a replica is healthy once it answers.
        "health_check_period_s": 5.0,
        "graceful_shutdown_timeout_s": options.serve.request_timeout_s,
    }
    if options.max_replicas is not None:
        deployment["autoscaling_config"] = {
            "min_replicas": options.min_replicas, "max_replicas": options.max_replicas,
            "target_ongoing_requests": options.target_ongoing_requests,
        }
    else:
        deployment["num_replicas"] = options.replicas
    return deployment


def run(options: RayOptions, host: str = "127.0.0.1", port: int = 8000, address: str | None = None) -> None:
    """`ortdiffusion serve --ray`: join (or start) a Ray cluster, deploy, serve until SIGTERM/SIGINT,
    then shut the application down and exit 0."""
    import signal
    import threading

    import ray

    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    # After ray.init (which installs its own SIGTERM handler) and before deploying: the proxy can
    # answer as soon as the replicas are up, while serve.run is still polling; a SIGTERM then must
    # already mean "shut down cleanly".
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(options), name=APP_NAME, route_prefix="/", blocking=False)
    logger.info("serving on http://%s:%d through Ray Serve", host, port)
    stop.wait()
    serve.delete(APP_NAME)
    serve.shutdown()
    ray.shutdown()


def __getattr__(name: str):
    # `serve run ortdiffusion.serve.ray_app:app`: the default model, one replica — built on first
    # access rather than at import, so importing this module resolves no model.
    if name == "app":
        return build_app({})
    raise AttributeError(name)
