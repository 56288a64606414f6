"""One client session's state on the server, and the error a request handler raises.

Ownership: the request loop thread (``CacheServer`` makes a ``Session`` per ZMQ routing id).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lmcd import protocol as p


class RequestError(Exception):
    """Raised by a handler to answer with ``Error(code, message)``."""

    def __init__(self, code: p.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(slots=True, eq=False)
class Session:
    session_id: int
    routing_id: bytes
    fd: int | None
    connected_at: float = field(default_factory=time.monotonic)
    hello: p.Hello | None = None
    ns_id: int | None = None
    granted: dict[int, int] = field(default_factory=dict)  # worker copies: granted slot -> its bytes


Send = Callable[[Session, p.Reply, str, float], None]  # (session, reply, op, start time)
Post = Callable[[Callable[[], None]], None]  # run a callable on the loop thread (thread-safe)
