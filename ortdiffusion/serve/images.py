"""Image bytes kept for a while so `response_format=url` can point at the service itself.

Kept in this process's memory only: a restart forgets every image, and their URLs answer 404.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict


class ImageStore:
    """A bounded, expiring map from unguessable tokens to image bytes (the URL is the credential).

    Bounded by count and by bytes: past either, the oldest images go first. A byte cap, not only a
    count, so that a few clients cannot grow the store without limit with large images; an image
    larger than the whole cap is not kept (its URL answers 404 at once)."""

    def __init__(self, ttl_s: float = 3600.0, max_images: int = 1000, max_bytes: int = 256 * 1024 * 1024):
        self.ttl_s = ttl_s
        self.max_images = max_images
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, data: bytes) -> str:
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._expire()
            if len(data) > self.max_bytes:
                return token
            self._items[token] = (time.monotonic() + self.ttl_s, data)
            self.bytes += len(data)
            while len(self._items) > self.max_images or self.bytes > self.max_bytes:
                self._drop_oldest()
        return token

    def get(self, token: str) -> bytes | None:
        with self._lock:
            self._expire()
            item = self._items.get(token)
            return item[1] if item else None

    def _drop_oldest(self) -> None:
        _, (_, data) = self._items.popitem(last=False)
        self.bytes -= len(data)

    def _expire(self) -> None:
        now = time.monotonic()
        while self._items:
            expires, _ = next(iter(self._items.values()))
            if expires > now:
                break
            self._drop_oldest()
