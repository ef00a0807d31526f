"""Running the service under uvicorn: SIGTERM stops accepting, finishes what is in flight, exits 0."""

from __future__ import annotations

import logging
import signal

import uvicorn

from ..runtime.pipeline import Pipeline
from .app import ServeConfig, create_app

logger = logging.getLogger(__name__)


def serve(pipeline: Pipeline, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000,
          graceful_timeout_s: float = 300.0) -> None:
    app = create_app(pipeline, config)
    server = uvicorn.Server(uvicorn.Config(
        app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=graceful_timeout_s, access_log=False,
    ))
    # uvicorn handles SIGTERM/SIGINT itself (stop accepting, finish in-flight requests, run the
    # lifespan shutdown), then re-raises the signal under the handler that was there before it.
    # A no-op handler there makes a graceful stop exit 0, as process supervisors expect.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    logger.info("stopped")
