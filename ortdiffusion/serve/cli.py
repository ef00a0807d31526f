"""`ortdiffusion serve`: its flags (derived from `settings.py`) and the command. Imports neither
the web framework nor Ray until the command runs, so `ortdiffusion --help` needs neither extra."""

from __future__ import annotations

import argparse
import logging
import socket
from dataclasses import replace
from pathlib import Path

from ..runtime.errors import InvalidRequestError
from .settings import (
    LOOPBACK_HOSTS,
    RayOptions,
    ServeConfig,
    add_arguments,
    add_key_arguments,
    api_key_from,
    from_namespace,
)

logger = logging.getLogger(__name__)


def add_parser(sub, run) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP images API with dynamic batching")
    p.add_argument("--model", default=None, help="bundle, diffusers checkpoint, preset, hub name (org/name), single-file "
                   "checkpoint or ONNX export in Optimum's layout (default: the built-in model)")
    p.add_argument("--refiner", default=None, help="an SDXL refiner the model hands its latents to (diffusers' "
                   "ensemble of experts; requests' denoising_end says where)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--provider", default=None)
    p.add_argument("--allow-fallback", action="store_true")
    add_key_arguments(p)
    add_arguments(p.add_argument_group("the service (docs/serving.md)"), ServeConfig)
    r = p.add_argument_group("Ray Serve (needs the ray extra)")
    r.add_argument("--ray", action="store_true", help="serve through Ray Serve: replicas on a Ray cluster")
    r.add_argument("--ray-address", default=None, help="cluster to join, e.g. auto or HOST:6379 (default: start a local one)")
    add_arguments(r, RayOptions)
    p.set_defaults(func=run)


def default_hosts(host: str, given: tuple[str, ...]) -> tuple[str, ...]:
    """The Host names answered: those given, else the bound address and, bound to loopback or to
    every interface, the loopback names (and this machine's name for every interface)."""
    if given:
        return given
    if host in ("0.0.0.0", "::", ""):
        return (*LOOPBACK_HOSTS, socket.gethostname(), socket.getfqdn())
    return (host, *LOOPBACK_HOSTS) if host in LOOPBACK_HOSTS or host.startswith("127.") else (host,)


def config_from(args: argparse.Namespace, model_name: str) -> ServeConfig:
    config = from_namespace(ServeConfig, args, api_key=api_key_from(args))
    hosts = default_hosts(args.host, config.allowed_hosts)
    return replace(config, model_name=config.model_name or model_name, allowed_hosts=hosts)


def cmd_serve(args: argparse.Namespace, progress) -> int:
    from ..models import DEFAULT_MODEL

    name = Path(str(args.model or DEFAULT_MODEL)).name
    config = config_from(args, name).validate()
    if args.ray:
        return _serve_ray(args, config, progress)
    try:
        from .server import bind, serve
    except ImportError as e:
        raise ImportError(f"serve needs the serve extra: pip install 'ortdiffusion[serve]' ({e})") from None
    from ..models import load_pipeline

    sock = bind(args.host, args.port)  # a busy port is said now, before the model loads
    pipe = load_pipeline(args.model, progress=progress, refiner=args.refiner, providers=args.provider,
                         allow_fallback=args.allow_fallback)
    progress(f"serving {config.model_name} on http://{args.host}:{args.port} "
             f"({', '.join(f'{k}={v}' for k, v in pipe.providers.items())})")
    serve(pipe, config, sock)
    return 0


def _serve_ray(args: argparse.Namespace, config: ServeConfig, progress) -> int:
    try:
        from . import ray_app
    except ImportError as e:
        raise ImportError(f"serve --ray needs the ray extra: pip install 'ortdiffusion[ray]' ({e})") from None
    if config.warmup_sizes:
        raise InvalidRequestError("warmup-size", "is not supported with --ray (each replica warms up at its model's size)")
    if args.refiner:
        raise InvalidRequestError("refiner", "is not supported with --ray (each replica loads one model)")
    options = from_namespace(RayOptions, args, model=args.model, provider=args.provider,
                             allow_fallback=args.allow_fallback, serve=config)
    options.validate()
    scale = (f"{options.min_replicas}..{options.max_replicas} replicas (autoscaling)" if options.max_replicas is not None
             else f"{options.replicas} replica(s)")
    with socket.socket() as probe:  # Ray's proxy binds later, in another process: check the port now
        try:
            probe.bind((args.host, args.port))
        except OSError as e:
            raise InvalidRequestError("port", f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    progress(f"serving on http://{args.host}:{args.port} through Ray Serve, {scale}, "
             f"{options.cpus_per_replica:g} CPU / {options.gpus_per_replica:g} GPU each")
    ray_app.run(options, args.host, args.port, args.ray_address)
    return 0
