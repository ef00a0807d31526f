"""The page `GET /` serves: plain HTML, CSS and JavaScript shipped in the package (no CDN, no build
step). It drives the same API as any client: `/v1/models`, then `/v1/images/generations` or
`/v1/images/edits` with `stream: true`, read with fetch so that the API key header works."""

from __future__ import annotations

from importlib.resources import files

from fastapi.responses import Response

from ..errors import error_response
from ...runtime.errors import ErrorCode

#: The page's files and their media types: nothing else under this package is served.
ASSETS = {"index.html": "text/html; charset=utf-8", "page.css": "text/css; charset=utf-8",
          "page.js": "text/javascript; charset=utf-8"}

#: The page loads nothing from elsewhere and runs no inline script.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")


def page_file(name: str) -> Response:
    if name not in ASSETS:
        return error_response(404, f"no page file {name!r}", param="path", code=ErrorCode.NOT_FOUND)
    data = files(__package__).joinpath(name).read_bytes()
    return Response(data, media_type=ASSETS[name], headers={"content-security-policy": CSP})
