"""The service's plain ASGI middleware (not Starlette's BaseHTTPMiddleware: that one hides client
disconnects from the handlers, and cancelling abandoned work depends on seeing them).

- `BodyGuard`: a body over the limit is refused (413) before it is read; JSON nested deeper than
  the limit (400) before any parser recurses into it, judged on the decoded text whatever its
  encoding (UTF-8, -16 or -32, as the JSON parser accepts).
- `Gate`: the Host allow-list (421), the API key (401), the headers every answer carries, the
  per-route count of responses, and one log line per request (`-v`).
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import time

from starlette.responses import Response

from ..runtime.errors import ErrorCode
from .errors import SAFE_HEADERS, error_response
from .metrics import Metrics

access_log = logging.getLogger("ortdiffusion.serve.access")

#: Routes outside the API key and the Host allow-list: probes, and image URLs whose token is their credential.
OPEN_PREFIXES = ("/health/", "/metrics", "/v1/images/files/")

#: The page (`GET /` and its files) needs no key: it holds no data and asks for the key itself
#: before it calls the API. It is served only under the allowed host names, as the API is.
def is_page(path: str) -> bool:
    return path == "/" or path.startswith("/page/")


#: Routes that take multipart uploads (an image, a mask): a larger body, and no JSON to check.
UPLOAD_PATHS = ("/v1/images/edits", "/v1/images/variations")


class BodyGuard:
    def __init__(self, app, max_bytes: int, max_depth: int, upload_bytes: int | None = None):
        self.app, self.max_bytes, self.max_depth = app, max_bytes, max_depth
        self.upload_bytes = upload_bytes or max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        upload = scope.get("path", "") in UPLOAD_PATHS
        limit = self.upload_bytes if upload else self.max_bytes
        too_large = error_response(413, f"request body exceeds {limit} bytes", code=ErrorCode.REQUEST_TOO_LARGE)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await too_large(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        if not upload and json_depth(body) > self.max_depth:
            return await error_response(400, f"JSON nested deeper than {self.max_depth} levels",
                                        code=ErrorCode.INVALID_JSON)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: the real channel, so disconnects are seen

        await self.app(scope, replay, send)


def json_depth(body: bytes) -> int:
    """The deepest nesting of [ and { outside strings, on the text as the JSON parser will decode
    it; without parsing (no recursion). An undecodable body is left for the parser to refuse."""
    try:
        text = body.decode(json.detect_encoding(body))
    except (UnicodeDecodeError, LookupError):
        return 0
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def host_name(host_header: str) -> str:
    """`example.com:8000` → `example.com`; `[::1]:8000` → `::1`."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def key_matches(authorization: str, api_key: str) -> bool:
    """`Bearer KEY` (the scheme in any case, RFC 9110), compared in constant time."""
    scheme, _, given = authorization.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), api_key.encode())


class Gate:
    def __init__(self, app, api_key: str | None, hosts: frozenset[str], metrics: Metrics):
        self.app, self.api_key, self.hosts, self.metrics = app, api_key, hosts, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, started = scope["path"], time.monotonic()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id = f"req_{secrets.token_hex(12)}"
        status = [0]

        async def finishing_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                self.metrics.count(path, status[0])
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode()),
                                      *((k.encode(), v.encode()) for k, v in SAFE_HEADERS.items()
                                        if not any(h[0] == k.encode() for h in message.get("headers", [])))]
            await send(message)

        try:
            refusal = self.refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, finishing_send)
            else:
                await self.app(scope, receive, finishing_send)
        finally:
            if access_log.isEnabledFor(logging.INFO):
                route = "/v1/images/files/…" if path.startswith("/v1/images/files/") else path  # tokens are credentials
                access_log.info("%s %s %d images=%s queue_ms=%s compute_ms=%s total_ms=%.1f id=%s", scope["method"],
                                route, status[0] or 499, state.get("images", 0), state.get("queue_ms", "-"),
                                state.get("compute_ms", "-"), (time.monotonic() - started) * 1e3, request_id)

    def refusal(self, scope) -> Response | None:
        path = scope["path"]
        if path.startswith(OPEN_PREFIXES):
            return None
        headers = dict(scope.get("headers") or [])
        host = host_name(headers.get(b"host", b"").decode("latin-1"))
        if host not in self.hosts:
            # Image URLs are built from the Host header, and a web page can reach a keyless local
            # service through DNS rebinding under its own host name: answer only the names we serve.
            return error_response(421, f"this service does not answer for host {host!r}; start it with --public-url "
                                       "or --allowed-host to add a name", code=ErrorCode.MISDIRECTED_REQUEST)
        if self.api_key and not is_page(path) and not key_matches(headers.get(b"authorization", b"").decode("latin-1"), self.api_key):
            return error_response(401, "missing or wrong API key (Authorization: Bearer …)",
                                  code=ErrorCode.INVALID_API_KEY, headers={"www-authenticate": 'Bearer realm="ortdiffusion"'})
        return None
