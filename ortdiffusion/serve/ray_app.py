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
from dataclasses import asdict, dataclass, fields
from typing import Any

try:
    from ray import serve
    from ray.serve.handle import DeploymentHandle
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"Ray Serve is not installed: pip install 'ortdiffusion[ray]' ({e})") from None

from ..runtime.errors import InvalidRequestError
from .app import ServeConfig, create_app, default_instance
from .images import ImageStore

logger = logging.getLogger(__name__)

APP_NAME = "ortdiffusion"


@dataclass(frozen=True)
class RayOptions:
    """How the application is deployed. Every field can be given to `build_app` as a string
    (`serve run ortdiffusion.serve.ray_app:build_app replicas=2 cpus_per_replica=1`)."""

    model: str | None = None  # bundle, checkpoint or preset; a path must exist on every node
    model_name: str | None = None
    replicas: int = 1  # fixed replica count, unless max_replicas turns on autoscaling
    min_replicas: int = 1
    max_replicas: int | None = None
    target_ongoing_requests: float = 2.0  # autoscaling: requests per replica it aims at
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    max_ongoing_requests: int = 8  # requests Ray hands one replica at once (its batcher gathers them)
    provider: str | None = None  # e.g. "cuda,cpu"; default: best available on the replica's node
    allow_fallback: bool = False
    threads: int = 0  # ONNX Runtime intra-op threads; 0: cpus_per_replica (at least 1)
    # The single-machine service's own settings, per replica.
    api_key: str | None = None
    max_queue: int = 16
    max_batch: int = 8
    batch_window_ms: float = 20.0
    batching: bool = True
    timeout: float = 300.0
    public_url: str | None = None

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> RayOptions:
        """From `serve run` key=value strings (or real values), each checked by name."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in args.items():
            key = key.replace("-", "_")
            if key not in known:
                raise InvalidRequestError(key, f"is not an option; allowed: {', '.join(sorted(known))}")
            values[key] = _convert(key, raw, known[key].type)
        options = cls(**values)
        options.validate()
        return options

    def validate(self) -> None:
        if self.max_replicas is None and self.replicas < 1:
            raise InvalidRequestError("replicas", f"must be at least 1, got {self.replicas}")
        if self.max_replicas is not None and not 0 <= self.min_replicas <= self.max_replicas:
            raise InvalidRequestError("max_replicas", f"must be ≥ min_replicas ({self.min_replicas}) and min_replicas ≥ 0")
        if self.cpus_per_replica < 0 or self.gpus_per_replica < 0:
            raise InvalidRequestError("cpus_per_replica", "CPUs and GPUs per replica must be ≥ 0")
        if self.max_ongoing_requests < 1:
            raise InvalidRequestError("max_ongoing_requests", "must be at least 1")

    def serve_config(self) -> ServeConfig:
        return ServeConfig(
            model_name=self.model_name or "ortdiffusion", api_key=self.api_key, max_queue=self.max_queue,
            max_batch_images=self.max_batch, batch_window_s=self.batch_window_ms / 1000, batching=self.batching,
            request_timeout_s=self.timeout, public_url=self.public_url,
        )

    def deployment_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica},
            # Loading a bundle and warming up takes seconds; a replica is healthy once it answers.
            "health_check_period_s": 5.0,
            "graceful_shutdown_timeout_s": self.timeout,
        }
        if self.max_replicas is not None:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            }
        else:
            options["num_replicas"] = self.replicas
        return options


def _convert(key: str, raw: Any, annotation: str) -> Any:
    if not isinstance(raw, str):
        return raw
    kind = annotation.split("|")[0].strip()
    if raw.lower() in ("none", "null", "") and "None" in annotation:
        return None
    try:
        if kind == "bool":
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise InvalidRequestError(key, f"must be {kind}, got {raw!r}") from None
    return raw


@serve.deployment(name="images", num_replicas=1, ray_actor_options={"num_cpus": 0})
class SharedImages:
    """The PNGs behind `response_format=url`, shared by all replicas (bounded, expiring)."""

    def __init__(self, ttl_s: float, max_images: int = 1000):
        self.store = ImageStore(ttl_s, max_images)

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
    def __init__(self, images: DeploymentHandle, bundle: str, options: dict[str, Any]):
        from ..runtime.pipeline import Pipeline

        self.options = RayOptions(**options)
        threads = self.options.threads or max(1, int(self.options.cpus_per_replica))
        self.pipeline = Pipeline.load(bundle, providers=self.options.provider,
                                      allow_fallback=self.options.allow_fallback, intra_op_threads=threads)
        self.images = images

    def __serve_build_asgi_app__(self):
        context = serve.get_replica_context()
        instance = f"{context.replica_id.unique_id}@{default_instance()}"
        return create_app(self.pipeline, self.options.serve_config(), store=RemoteImages(self.images), instance=instance)


def build_app(args: dict[str, Any] | RayOptions | None = None):
    """The Ray Serve application (an application builder for `serve run`). Resolves the model
    to a bundle here, on the driver, so a checkpoint or preset is exported once, not per replica."""
    from ..models import DEFAULT_MODEL, resolve_bundle

    options = args if isinstance(args, RayOptions) else RayOptions.from_args(args or {})
    bundle = resolve_bundle(options.model)
    if options.model_name is None:
        from pathlib import Path

        options = RayOptions(**{**asdict(options), "model_name": Path(str(options.model or DEFAULT_MODEL)).name})
    images = SharedImages.bind(options.serve_config().image_ttl_s)
    return Replica.options(**options.deployment_options()).bind(images, str(bundle), asdict(options))


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
