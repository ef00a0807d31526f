"""The HTTP service (needs the `serve` extra: fastapi, uvicorn, prometheus-client)."""
