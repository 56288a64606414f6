"""A connector's link to the server that never takes the engine down.

``ServerSession.call(op, fallback)`` runs ``op(client)``; if the server is unreachable, slow or
answers with an error, it returns ``fallback`` instead (the engine then recomputes), logs ONE
warning for the outage, and while the server stays away it does not wait on it: a new
attempt is made at most every ``RETRY_INTERVAL_S``, with a short connect timeout. When the
server answers again, ``on_connect`` runs (the worker re-registers its KV memory there) and
one info line says so; if ``on_connect`` fails there (the server answers but cannot take this
connector), one warning per distinct reason says why, and it is tried again later.

Ownership: one session per connector instance; calls are serialised by a lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from lmcd import protocol as p
from lmcd.connector.client import CacheClient, LmcdError, ServerError
from lmcd.connector.settings import ConnectorSettings

log = logging.getLogger("lmcd.connector")
T = TypeVar("T")
RETRY_INTERVAL_S = 1.0
CONNECT_TIMEOUT_S = 0.5


class ServerSession:
    def __init__(self, settings: ConnectorSettings, namespace: p.Namespace, role: p.Role, name: str,
                 on_connect: Callable[[CacheClient], None] | None = None) -> None:
        self.settings = settings
        self.namespace = namespace
        self.role = role
        self.name = name
        self.on_connect = on_connect
        self.client: CacheClient | None = None
        self._lock = threading.RLock()
        self._down = False
        self._next_attempt = 0.0
        self._refusals: set[tuple[str, p.ErrorCode]] = set()
        self._unusable_reason = ""  # why the last registration with an answering server failed

    @property
    def available(self) -> bool:
        return self.client is not None and not self._down

    def call(self, op: Callable[[CacheClient], T], fallback: T, what: str) -> T:
        with self._lock:
            client = self._ready_client()
            if client is None:
                return fallback
            try:
                return op(client)
            except ServerError as exc:
                if exc.code in (p.ErrorCode.UNKNOWN_WORKER, p.ErrorCode.NOT_HELLO) and self.on_connect is not None:
                    # the server restarted and lost our registration: register again, retry once
                    try:
                        self.on_connect(client)
                    except LmcdError as again:
                        self._unusable(again)
                        return fallback
                    try:
                        return op(client)
                    except LmcdError as again:
                        self._fail(what, again)
                        return fallback
                self._refused(what, exc)
                return fallback
            except LmcdError as exc:
                self._fail(what, exc)
                return fallback

    def _ready_client(self) -> CacheClient | None:
        if self.client is not None and not self._down:
            return self.client
        now = time.monotonic()
        if now < self._next_attempt:
            return None
        self._next_attempt = now + RETRY_INTERVAL_S
        client = self.client
        try:
            if client is None:  # first contact: open a socket and wait a little for the server
                client = self.client = CacheClient(
                    self.settings.url, self.namespace, role=self.role, auth_token=self.settings.auth_token,
                    timeout_s=self.settings.request_timeout_s, client_name=self.name, connect=False,
                    connect_timeout_s=CONNECT_TIMEOUT_S, instance_id=self.settings.instance_id)
                client.connect()
            elif client.connected():  # ZMQ reconnected the socket by itself: say Hello again
                client.say_hello()
            else:  # still away: never make the engine wait for it
                return None
        except LmcdError as exc:
            self._fail("connect", exc)
            return None
        try:
            if self.on_connect is not None:
                self.on_connect(client)
        except LmcdError as exc:  # the server answers, but this connector cannot use it
            self._unusable(exc)
            return None
        self._unusable_reason = ""
        if self._down:
            log.info("LMCache server at %s is back: %s uses the cache again", self.settings.url, self.name)
        self._down = False
        return client

    def _fail(self, what: str, exc: Exception) -> None:
        if not self._down:
            log.warning("LMCache server at %s failed (%s: %s); %s continues without the cache (prompts are "
                        "recomputed) and reconnects when the server is back", self.settings.url, what, exc,
                        self.name)
        self._down = True
        self._next_attempt = time.monotonic() + RETRY_INTERVAL_S

    def _unusable(self, exc: LmcdError) -> None:
        """The server answered but registering with it failed: say why once per reason (a retry follows
        every RETRY_INTERVAL_S), whether or not an outage was logged before."""
        reason = str(exc)
        if reason != self._unusable_reason:
            self._unusable_reason = reason
            log.warning("LMCache server at %s answers, but %s cannot use it: %s; it continues without the cache "
                        "(prompts are recomputed) and tries again", self.settings.url, self.name, reason)
        self._down = True
        self._next_attempt = time.monotonic() + RETRY_INTERVAL_S

    def _refused(self, what: str, exc: ServerError) -> None:
        """The server is there but said no: say so once per kind of refusal, stay connected."""
        key = (what, exc.code)
        if key not in self._refusals:
            self._refusals.add(key)
            log.warning("LMCache server refused %s from %s: %s (further refusals of this kind are logged at "
                        "DEBUG)", what, self.name, exc.message)
        else:
            log.debug("LMCache server refused %s: %s", what, exc.message)

    def close(self) -> None:
        with self._lock:
            if self.client is not None:
                self.client.close()
                self.client = None
