"""Running the service under uvicorn: the socket bound before anything says "serving on",
connections bounded (`connections.py`), and SIGTERM stops accepting, finishes what is in flight
and exits 0."""

from __future__ import annotations

import logging
import signal
import socket

import uvicorn

from ..runtime.errors import InvalidRequestError
from ..runtime.pipeline import Pipeline
from .app import create_app
from .connections import ConnectionLimits, guarded_protocol, install_log_limits
from .settings import ServeConfig

logger = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, or an error naming the port if it is taken — before the model loads,
    so a busy port is said at once and never after "serving on"."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InvalidRequestError("port", f"cannot listen on {host}:{port}: {e.strerror} (another server there? "
                                          "choose another --port)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def uvicorn_config(app, config: ServeConfig, graceful_timeout_s: float = 300.0, **kwargs) -> uvicorn.Config:
    """uvicorn with the service's connection limits: its own keep-alive and header-size bounds,
    and the read deadlines and connection cap of `guarded_protocol`."""
    limits = ConnectionLimits(config.header_timeout_s, config.body_timeout_s, config.max_connections)
    return uvicorn.Config(app, http=guarded_protocol(limits), timeout_keep_alive=config.keep_alive_s,  # type: ignore[arg-type]
                          h11_max_incomplete_event_size=16 * 1024, timeout_graceful_shutdown=graceful_timeout_s,
                          access_log=False, **{"log_level": "warning", **kwargs})


def serve(pipeline: Pipeline, config: ServeConfig, sock: socket.socket, graceful_timeout_s: float = 300.0) -> None:
    server = uvicorn.Server(uvicorn_config(create_app(pipeline, config), config, graceful_timeout_s))
    install_log_limits()  # after uvicorn configured its loggers
    # uvicorn handles SIGTERM/SIGINT itself (stop accepting, finish in-flight requests, run the
    # lifespan shutdown), then re-raises the signal under the handler that was there before it.
    # A no-op handler there makes a graceful stop exit 0, as process supervisors expect.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    logger.info("stopped")
