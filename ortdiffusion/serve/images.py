"""PNG bytes kept for a while so `response_format=url` can point at the service itself."""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict


class ImageStore:
    """A bounded, expiring map from unguessable tokens to PNG bytes (the URL is the credential)."""

    def __init__(self, ttl_s: float = 3600.0, max_images: int = 1000):
        self.ttl_s = ttl_s
        self.max_images = max_images
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, png: bytes) -> str:
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._expire()
            self._items[token] = (time.monotonic() + self.ttl_s, png)
            while len(self._items) > self.max_images:
                self._items.popitem(last=False)
        return token

    def get(self, token: str) -> bytes | None:
        with self._lock:
            self._expire()
            item = self._items.get(token)
            return item[1] if item else None

    def _expire(self) -> None:
        now = time.monotonic()
        while self._items:
            token, (expires, _) = next(iter(self._items.items()))
            if expires > now:
                break
            self._items.popitem(last=False)
