"""One client session's state on the server, and the error a request handler raises.

Ownership: the request loop thread (``CacheServer`` makes a ``Session`` per ZMQ routing id).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lmcd import protocol as p
from lmcd.server.handoff import HandedFd, Peer


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
    handoff_nonce: bytes = b""  # authorises this session's handoffs (HelloReply.handoff_nonce)
    handed: list[HandedFd] = field(default_factory=list)  # memory fds handed over, until RegisterWorker maps them
    handed_by: Peer | None = None  # the process that handed them over (for logs)
    closed: bool = False  # its peer is gone (a reply that is due later is not sent)

    def take_handed(self) -> list[HandedFd]:
        """The handed-over fds, now owned by the caller (which closes them)."""
        handed, self.handed, self.handed_by = self.handed, [], None
        return handed

    def close_handed(self) -> None:
        for item in self.take_handed():
            os.close(item.fd)


Send = Callable[[Session, p.Reply, str, float], None]  # (session, reply, op, start time)
Post = Callable[[Callable[[], None]], None]  # run a callable on the loop thread (thread-safe)
