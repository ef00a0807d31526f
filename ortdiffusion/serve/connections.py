"""What one client may hold: read deadlines for a request's headers and body, a bound on open
connections, and logs that a flood of them cannot multiply.

uvicorn bounds what it can: idle keep-alive (`timeout_keep_alive`), header size (h11's
`max_incomplete_event_size`). It has no deadline for reading a request — a client that sends half
a request line keeps its connection, and its file handle, forever — and `limit_concurrency` is
checked only once a whole request has arrived, so half-sent requests are never counted. Hence
this subclass of its h11 protocol (chosen over httptools so the protocol's state is h11's, which
says whether a request is waiting for headers, reading its body, or complete):

- a connection must deliver a request's headers within `header_timeout_s` of being opened (or of
  its first byte after a keep-alive pause), and its body within `body_timeout_s` after them;
- at most `max_connections` are open; a new one past that closes the connection that has waited
  longest without a complete request, so half-open connections cannot lock out the next client
  (a connection whose request is being computed is never closed for this). With every connection
  busy, the new one gets a 503 and is closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from collections import OrderedDict
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..runtime.errors import ErrorCode

logger = logging.getLogger(__name__)

_BUSY_BODY = json.dumps({"error": {"message": "too many open connections; retry shortly", "type": "server_error",
                                    "param": None, "code": ErrorCode.OVERLOADED.value}}).encode()
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
         b"retry-after: 1\r\ncontent-length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 1000


def file_handle_room(reserve: int = 64) -> int:
    """File handles this process may still open, raising its soft limit to the hard one first (the
    default soft limit is often 1024 while the hard one is far higher)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return max(1, soft - reserve)


def guarded_protocol(limits: ConnectionLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol with read deadlines and a connection bound (for `Config(http=…)`)."""
    cap = min(limits.max_connections, file_handle_room())
    # Connections without a complete request, the longest-waiting first: the ones to close when full.
    waiting: OrderedDict[GuardedProtocol, None] = OrderedDict()
    open_count = [0]

    class GuardedProtocol(H11Protocol):
        _timer: asyncio.TimerHandle | None = None
        _phase: object = None
        _refused = False

        def connection_made(self, transport) -> None:  # type: ignore[override]
            if open_count[0] >= cap and not _evict_one():
                self._refused = True
                transport.write(_BUSY)
                transport.close()
                return
            open_count[0] += 1
            super().connection_made(transport)
            self._expect(h11.IDLE)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._refused:
                return
            open_count[0] -= 1
            self._stop_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if not self.transport.is_closing():
                self._expect(self.conn.their_state)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # Idle now: uvicorn's keep-alive timer runs; the header deadline starts with the next byte.
            self._stop_timer()

        def _expect(self, state) -> None:
            """Arm the deadline for what the client owes next: headers, then the body; none once
            the request is complete (the request's own deadline governs the compute)."""
            if state is h11.IDLE and self.conn.our_state is h11.IDLE:
                if self._phase is not h11.IDLE:
                    self._arm(h11.IDLE, limits.header_timeout_s)
            elif state is h11.SEND_BODY:
                if self._phase is not h11.SEND_BODY:
                    self._arm(h11.SEND_BODY, limits.body_timeout_s)
            else:
                self._stop_timer()

        def _arm(self, phase, seconds: float) -> None:
            self._stop_timer()
            self._phase = phase
            self._timer = self.loop.call_later(seconds, self._too_slow)
            waiting[self] = None

        def _stop_timer(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._phase = None
            waiting.pop(self, None)

        def _too_slow(self) -> None:
            self._timer = None
            waiting.pop(self, None)
            if not self.transport.is_closing():
                # No response: the client is not reading one, and a 408 would only cost a write.
                self.transport.abort()

    def _evict_one() -> bool:
        while waiting:
            victim, _ = waiting.popitem(last=False)
            if not victim.transport.is_closing():
                victim._stop_timer()
                victim.transport.abort()
                return True
        return False

    return GuardedProtocol


class RateLimitedLog(logging.Filter):
    """At most `burst` records per `period_s` per (logger, message) — then one summary line — and no
    traceback for an expected condition (an exception of `quiet` types, e.g. running out of file
    handles under a connection flood): a flood of connections must not become a flood of logs."""

    def __init__(self, burst: int = 5, period_s: float = 60.0, quiet: tuple[type[BaseException], ...] = (OSError,)):
        super().__init__()
        self.burst, self.period_s, self.quiet = burst, period_s, quiet
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], self.quiet):
            record.msg = f"{record.getMessage()}: {record.exc_info[1]!r}"
            record.args, record.exc_info, record.exc_text = None, None, None
        key = (record.name, str(record.msg)[:200])
        now = time.monotonic()
        start, count = self._seen.get(key, (now, 0))
        if now - start > self.period_s:
            if count > self.burst:
                logging.getLogger(record.name).handle(logging.LogRecord(
                    record.name, logging.WARNING, __file__, 0,
                    "%d more like %r in the last %.0f s were not logged", (count - self.burst, key[1][:80], self.period_s),
                    None))
            start, count = now, 0
        self._seen[key] = (start, count + 1)
        if len(self._seen) > 1000:
            self._seen.clear()
        return count < self.burst


def install_log_limits() -> RateLimitedLog:
    """The filter on the loggers a connection flood writes to (asyncio's accept loop, uvicorn's)."""
    flt = RateLimitedLog()
    for name in ("asyncio", "uvicorn.error", "uvicorn"):
        log = logging.getLogger(name)
        if not any(isinstance(f, RateLimitedLog) for f in log.filters):
            log.addFilter(flt)
    return flt
