"""The server process: sockets, the request loop, signals and the HTTP sidecar.

Lifecycle: ``startup()`` -> ``serve_forever()`` -> ``shutdown()``.

Threads: the loop thread (the caller of ``serve_forever``) owns the ROUTER socket and every
piece of cache state. Copy threads and the HTTP thread never touch that state: they hand
callables to the loop with ``post`` (a queue plus a wake-up pipe the loop polls), and the
HTTP thread waits for the answer with ``call`` and a deadline.

Sessions and connections (the table is ``server/connections.py``, whose docstring has the why):
  - one session per client DEALER socket (ZMQ routing id), made by its first frame, on the
    connection that frame came on (ZMQ_SRCFD); the socket monitor (read with no queue limit)
    reports every accept and disconnect with the connection's descriptor;
  - a disconnect ends every session of that descriptor at once: leases, grants and workers go;
  - the first frame of a new routing id is read with the monitor drained first: if its connection
    is gone already, no session is made and nothing is answered (``late_frames``);
  - a reply that cannot be sent (ROUTER_MANDATORY) ends its session on the next loop turn;
  - at most ``max_connections`` connections are open (the soft open-file limit is raised to the
    hard one at start); a connection over the cap, or with no session through Hello within the
    handshake timeout, is cut (shut down; ZMQ then reports its disconnect).

Frames: a frame before Hello may take at most ``MAX_FRAME_BYTES_BEFORE_HELLO`` (64 KiB) and is
refused unread if larger; no frame is copied out of ZMQ; an undecodable frame's rid comes from its
msgpack header alone (``peek_rid``), so no frame costs more than its own bytes.

Signals (``_install_signal_handlers``, the one place): INT, TERM, QUIT and HUP stop the loop and
``shutdown()`` runs (exit code 0); USR1 and USR2 log one status line and keep serving.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import msgspec
import zmq
from zmq.utils.monitor import parse_monitor_message

from lmcd import __version__
from lmcd import protocol as p
from lmcd.server.config import ConfigError, ServerConfig, proc_kib_field
from lmcd.server.connections import Connections, raise_open_file_limit
from lmcd.server.gpu import CudaSupport
from lmcd.server.handoff import HandoffServer
from lmcd.server.metrics import Metrics
from lmcd.server.pool import Pool
from lmcd.server.service import CacheService
from lmcd.server.session import RequestError, Session
from lmcd.server.workers import SHM_DIR, sweep_leftovers

log = logging.getLogger("lmcd.server")
T = TypeVar("T")
MAX_FRAMES_PER_TURN = 256
# pyzmq's flags are enum.IntFlag, and combining them (| or &) runs Python enum code: the request
# path uses plain ints
NOBLOCK = int(zmq.NOBLOCK)
SNDMORE_NOBLOCK = int(zmq.SNDMORE) | NOBLOCK
POLLIN = int(zmq.POLLIN)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP)
STATUS_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def make_zmq_socket(ctx: zmq.Context, kind: int, url: str, *, bind: bool) -> zmq.Socket:
    """The one place sockets are made: options every lmcd socket needs."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_FRAME_BYTES)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        # a reply to a peer that is gone fails (EHOSTUNREACH) instead of vanishing: its session ends
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # detect dead peers (host gone, cable cut) as well as closed connections
        sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10000)
    try:
        if bind:
            sock.bind(url)
        else:
            sock.connect(url)
    except zmq.ZMQError:
        sock.close(0)  # an open socket would make ctx.term() in shutdown block forever
        raise
    return sock


class CacheServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.started_at = time.monotonic()
        self._stack = contextlib.ExitStack()
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._stopping = False
        self.loop_thread: threading.Thread | None = None
        self.url = ""
        self.http_url = ""

    # ------------------------------------------------------------ lifecycle

    def startup(self) -> None:
        cfg = self.config
        log.info("Starting lmcd %s (LMCache-compatible cache server), pid %d", __version__, os.getpid())
        open_file_limit = raise_open_file_limit()
        removed = sweep_leftovers()  # before the pool: what a crashed server left must never stop this one
        if removed:
            log.info("Removed %d leftovers of earlier lmcd processes from %s: %s", len(removed), SHM_DIR,
                     ", ".join(removed[:8]))
        log.info("L1 pool: allocating %.2f GiB%s (%s)", cfg.l1_size_gb or 0,
                 " (default: the smaller of 4 GiB and a quarter of available memory; set --l1-size-gb)"
                 if cfg.l1_size_is_default else "",
                 "touching every page" if cfg.touch_pool else "pages faulted on first use")
        self.pool = Pool(cfg.l1_size_bytes, touch=cfg.touch_pool, shared=cfg.share_pool)
        if cfg.share_pool:
            log.info("L1 pool shared as sealed memfd %s (workers in lmcache_driven mode get its fd through the "
                     "handoff socket)", self.pool.name)
        self._stack.callback(self.pool.close)
        self.cuda = self._start_cuda()
        self.service = CacheService(cfg, self.pool, self._send_reply, self.post, self.cuda)
        self._stack.callback(self.service.workers.close_all)
        self._stack.callback(self.service.server_copies.threads.shutdown)
        self.service.full_status = self.status
        self._start_tiers()
        self.metrics = Metrics(self.service.stats, self._gauges,
                               lambda: self.service.tiers.status() if self.service.tiers is not None else [])
        self.service.observe_copy = self.metrics.copy_seconds.observe
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stack.callback(os.close, self._wake_r)
        self._stack.callback(os.close, self._wake_w)
        self._start_handoff()
        self.ctx = zmq.Context()  # one io thread: the monitor events of a descriptor come in order
        self._stack.callback(self.ctx.term)
        try:
            self.router = make_zmq_socket(self.ctx, zmq.ROUTER, cfg.zmq_url, bind=True)
        except zmq.ZMQError as exc:
            raise OSError(f"cannot bind the ZMQ socket {cfg.zmq_url}: {exc}; pick another --port or --host") from None
        self._stack.callback(self.router.close, 0)
        self.monitor = self._monitor_socket()
        self.url = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.connections = Connections(self.url, open_file_limit, cfg.max_connections, cfg.handshake_timeout_s)
        log.info("Connections: %s", self.connections.describe())
        log.info("ZMQ server bound to %s (chunk size %d tokens, eviction %s, %d copy threads, lease timeout %.0f s)",
                 self.url, cfg.chunk_size, cfg.eviction_policy, cfg.max_workers, cfg.lease_timeout_s)
        from lmcd.server.http import HttpSidecar  # fastapi/uvicorn load only where a server runs

        self.http = HttpSidecar(self)
        self.http_url = self.http.start()
        self._stack.callback(self.http.stop)
        log.info("HTTP sidecar on %s (/healthcheck /status /metrics /clear-cache)", self.http_url)

    def _start_tiers(self) -> None:
        """The L2 cascade (``server/tiers.py``) of the configured adapters, each started (disk index rebuilt,
        Redis connected or reconnecting) before the server takes requests."""
        cfg = self.config
        if not cfg.l2_adapters:
            return
        from lmcd.server.tiers import open_tiers

        tiers = open_tiers(cfg, self.service.index, self.pool, self.post)
        self.service.tiers = tiers

        def close() -> None:
            if not tiers.close():  # a thread is still inside an adapter call and may read the pool
                log.warning("An L2 call is still running at exit: the L1 pool stays mapped until the process ends")
                self.pool.keep_mapped = True

        self._stack.callback(close)

    def _start_handoff(self) -> None:
        """The Unix socket through which local workers hand over their memory (``lmcd.server.handoff``)."""
        try:
            handoff = HandoffServer(self.service.attach_handoff, self.post, self.pool.fd)
        except OSError as exc:  # remote and GPU workers need none of it: serve them, say what CPU workers miss
            log.warning("No handoff socket (%s): CPU workers on this host cannot register for server copies, nor "
                        "get the shared pool", exc)
            return
        self._stack.callback(handoff.close)
        self.service.handoff_path = handoff.path
        log.info("Handoff socket %s (workers hand over their KV memory as file descriptors)", handoff.path)

    def serve_forever(self) -> None:
        self.loop_thread = threading.current_thread()
        if self.loop_thread is threading.main_thread():
            self._install_signal_handlers()
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        resident = proc_kib_field("/proc/self/status", "VmRSS") or 0
        log.info("LMCache cache server is running on %s (pool %.2f GiB in %d slabs, process holds %.2f GiB; HTTP %s)",
                 self.url, self.pool.capacity_bytes / 2**30, self.pool.num_slabs, resident / 2**30, self.http_url)
        while not self._stopping:
            ready = dict(poller.poll(self._poll_timeout_ms()))
            if self.monitor in ready:
                self._drain_monitor()
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            self._run_calls()
            if self.router in ready:
                self._drain_router()
            now = time.monotonic()
            self.service.expire(now)
            self.connections.expire(now)

    def _start_cuda(self) -> CudaSupport:
        """Find GPUs and pin the pool for them (``--cuda``); CPU-only hosts skip this quietly."""
        cfg = self.config
        if cfg.cuda == "off":
            return CudaSupport(None, "the server was started with --cuda off")
        from lmcd.server.gpu import CudaHost

        host, problem = CudaHost.probe()
        if host is None:
            if cfg.cuda == "on":
                raise ConfigError(f"--cuda on: {problem}")
            log.info("GPU workers: off (%s); CPU workers use shared memory", problem)
            return CudaSupport(None, problem)
        names = ", ".join(f"{i}: {host.names[i]} ({pci})" for pci, i in sorted(host.devices.items(),
                                                                              key=lambda kv: kv[1]))
        log.info("GPU workers: on, %d GPUs (%s); pinning the L1 pool (%.2f GiB) for them",
                 len(host.devices), names, self.pool.capacity_bytes / 2**30)
        started = time.monotonic()
        last = [started]

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if done == total or now - last[0] >= 2:
                last[0] = now
                log.info("Pinning L1 pool: %.1f / %.1f GiB (%.0f%%)", done / 2**30, total / 2**30, 100 * done / total)

        self._stack.callback(host.unpin)
        try:
            host.pin(self.pool.base_address, self.pool.capacity_bytes, progress)
        except Exception as exc:  # a driver refusal: name it; with --cuda auto the CPU path still serves
            problem = f"cudaHostRegister of the L1 pool failed: {exc}"
            if cfg.cuda == "on":
                raise ConfigError(f"--cuda on: {problem}") from None
            log.warning("GPU workers: off (%s)", problem)
            host.unpin()
            return CudaSupport(None, problem)
        log.info("L1 pool pinned in %.1f s", time.monotonic() - started)
        return CudaSupport(host, "")

    def shutdown(self) -> None:
        """Finish copies in flight (their replies go out), then close everything startup opened."""
        service = getattr(self, "service", None)
        copies = service.server_copies if service is not None else None
        if copies is not None and copies.pending:
            log.info("Shutting down: waiting for %d copies in flight", copies.pending)
            deadline = time.monotonic() + 30
            while copies.pending and time.monotonic() < deadline:
                time.sleep(0.005)
                self._run_calls()
        tiers = service.tiers if service is not None else None
        if tiers is not None:
            tiers.flush(self.config.l2_flush_timeout_s, self._run_calls)
        self._stack.close()
        log.info("LMCache cache server stopped")

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stop(self) -> None:
        """Ask the loop to stop (any thread, or a signal handler)."""
        self._stopping = True
        self._wake()

    def _install_signal_handlers(self) -> None:
        """Every signal the server answers, in one place: INT, TERM, QUIT and HUP stop it cleanly
        (copies finish, the pool and segments are unlinked); USR1 and USR2 log one status line."""
        def on_stop(signum: int, _frame: object) -> None:
            log.info("Received %s: shutting down", signal.Signals(signum).name)
            self.stop()

        def on_status(signum: int, _frame: object) -> None:
            self.post(lambda: self._log_status(signal.Signals(signum).name))  # read state on the loop

        for sig in STOP_SIGNALS:
            signal.signal(sig, on_stop)
        for sig in STATUS_SIGNALS:
            signal.signal(sig, on_status)

    def _log_status(self, why: str) -> None:
        pool, service = self.pool, self.service
        log.info("Status (%s): pool %.2f of %.2f GiB used, %d chunks, %d sessions on %d connections, %d workers, "
                 "%d leases", why, pool.used_bytes / 2**30, pool.capacity_bytes / 2**30, len(service.index),
                 len(self.connections.sessions), self.connections.num_open, len(service.workers.workers),
                 len(service.leases))

    # ------------------------------------------------------------ cross-thread calls

    def post(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread soon. Thread-safe."""
        self._calls.put(fn)
        self._wake()

    def call(self, fn: Callable[[], T], timeout_s: float) -> T:
        """Run ``fn`` on the loop thread and wait for its result; TimeoutError if the loop is stuck."""
        future: Future[T] = Future()

        def run() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # handed to the caller, which re-raises
                    future.set_exception(exc)

        self.post(run)
        try:
            return future.result(timeout_s)
        except TimeoutError:
            future.cancel()
            raise

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def _run_calls(self) -> None:
        calls = self._calls
        while not calls.empty():  # cheaper than get_nowait raising Empty on most turns
            fn = calls.get_nowait()  # this thread is the only consumer: the queue still has fn
            try:
                fn()
            except Exception:
                log.exception("Internal error in a loop callback")

    def _poll_timeout_ms(self) -> int:
        expiry = self.service.next_deadline()
        if expiry is None:
            return 1000
        return max(0, min(1000, int((expiry - time.monotonic()) * 1000) + 1))

    # ------------------------------------------------------------ requests

    def _drain_router(self) -> None:
        router = self.router
        for turn in range(MAX_FRAMES_PER_TURN):
            # the poller saw the first message; after it, asking is cheaper than a recv raising Again
            if turn and not int(router.getsockopt(zmq.EVENTS)) & POLLIN:
                return
            try:
                frames = [router.recv(NOBLOCK, copy=False)]
                while frames[-1].more:  # ZMQ delivers every frame of a message at once
                    frames.append(router.recv(NOBLOCK, copy=False))
            except zmq.Again:
                return
            try:
                self._on_frames(frames)
            except Exception:  # a bug must cost one request, never the loop
                log.exception("Internal error on an incoming frame")

    def _on_frames(self, frames: list[zmq.Frame]) -> None:
        started = time.perf_counter()
        routing_id = frames[0].bytes
        session = self.connections.sessions.get(routing_id)
        if session is None:
            session = self._new_session(routing_id, frames[-1])
            if session is None:  # its connection is gone already: nobody to answer
                return
        if len(frames) != 2:
            self._bad_frame(session, 0, f"expected exactly one frame per request, got {len(frames) - 1}", started)
            return
        payload = frames[1].buffer  # no copy of the frame (a peer's frame may be 64 MiB)
        if session.hello is None and len(payload) > p.MAX_FRAME_BYTES_BEFORE_HELLO:
            self._bad_frame(session, p.peek_rid(payload), f"a frame before Hello may take at most "
                            f"{p.MAX_FRAME_BYTES_BEFORE_HELLO} bytes, this one takes {len(payload)}: say Hello first",
                            started)
            return
        try:
            request = p.request_decoder.decode(payload)
        except (msgspec.DecodeError, ValueError, RecursionError) as exc:  # ValueError: e.g. a bad tag's UTF-8
            self._bad_frame(session, p.peek_rid(payload), f"cannot decode request: {exc}", started)
            return
        op = type(request).__name__.lower()
        self.service.stats.requests[op] += 1
        try:
            reply = self.service.handle(session, request, started)
        except RequestError as exc:
            reply = p.Error(request.rid, exc.code, exc.message)
        except Exception as exc:
            log.exception("Internal error handling %s", op)
            reply = p.Error(request.rid, p.ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        if session.hello is not None and type(request) is p.Hello:
            self.connections.greeted(session)
        if reply is not None:
            self._send_reply(session, reply, op, started)

    def _bad_frame(self, session: Session, rid: int, message: str, started: float) -> None:
        self.service.stats.bad_frames += 1
        self._send_reply(session, p.Error(rid, p.ErrorCode.BAD_FRAME, message[:1000]), "bad_frame", started)

    def _send_reply(self, session: Session, reply: p.Reply, op: str, started: float) -> None:
        if isinstance(reply, p.Error):
            self.service.stats.errors[reply.code.name] += 1
        try:
            self.router.send(session.routing_id, SNDMORE_NOBLOCK)
            self.router.send(p.encoder.encode(reply), NOBLOCK)
        except zmq.ZMQError as exc:  # ROUTER_MANDATORY: the peer's pipe is gone, and so is the peer
            self.connections.undeliverable_replies += 1
            log.debug("Reply to session %d undeliverable (%s): ending the session", session.session_id, exc)
            self.post(lambda: self._end_session(session))  # not now: the caller may still be using it
        elapsed = time.perf_counter() - started
        self.metrics.latency.observe(op, elapsed)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("Replied to %s of session %d %.0f us after it arrived", op, session.session_id, elapsed * 1e6)

    # ------------------------------------------------------------ sessions

    def _new_session(self, routing_id: bytes, frame: zmq.Frame) -> Session | None:
        """The session of a new routing id, or None if its connection is gone already (see
        ``server/connections.py``)."""
        fd: int | None
        try:
            fd = int(frame.get(zmq.SRCFD))
        except (zmq.ZMQError, TypeError, ValueError):
            fd = None
        self._drain_monitor()  # what happened to that descriptor before this frame was read
        self.router.getsockopt(zmq.EVENTS)  # let ZMQ process pipe ends, so a reply to a gone peer fails
        return self.connections.open_session(routing_id, fd, time.monotonic())

    def _monitor_socket(self) -> zmq.Socket:
        """The router's monitor, read through a PAIR with no receive limit: an event dropped at a full
        queue would be a session never ended."""
        address = f"inproc://lmcd-monitor-{id(self):x}"
        self.router.monitor(address, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        monitor = self.ctx.socket(zmq.PAIR)
        self._stack.callback(monitor.close, 0)
        self._stack.callback(self.router.disable_monitor)  # runs first: no event after the close
        monitor.setsockopt(zmq.LINGER, 0)
        monitor.setsockopt(zmq.RCVHWM, 0)
        monitor.connect(address)
        return monitor

    def _drain_monitor(self) -> None:
        events = []
        while True:
            try:
                event = parse_monitor_message(self.monitor.recv_multipart(NOBLOCK))
            except zmq.Again:
                break
            events.append((event["event"] == zmq.EVENT_ACCEPTED, int(event["value"])))
        if events:
            for session in self.connections.on_events(events, time.monotonic()):
                self.service.disconnect(session)

    def _end_session(self, session: Session) -> None:
        if self.connections.end(session):
            self.service.disconnect(session)

    # ------------------------------------------------------------ read by the HTTP thread

    def _gauges(self) -> dict[str, tuple[str, float]]:
        pool = self.pool
        return {
            "pool_capacity_bytes": ("L1 pool capacity", pool.capacity_bytes),
            "pool_used_bytes": ("L1 pool bytes in use", pool.used_bytes),
            "pool_chunks": ("Chunks in the index", len(self.service.index)),
            "pool_usage_ratio": ("Used over capacity", pool.used_bytes / pool.capacity_bytes),
            "workers": ("Registered workers", len(self.service.workers.workers)),
            "sessions": ("Connected client sessions", len(self.connections.sessions)),
            "connections": ("Open ZMQ connections", self.connections.num_open),
            "leases": ("Open leases", len(self.service.leases)),
            "uptime_seconds": ("Seconds since start", time.monotonic() - self.started_at),
        }

    def status(self) -> dict[str, Any]:
        """Full status, built on the loop thread (call it through ``call``)."""
        out: dict[str, Any] = {
            "version": __version__, "protocol_version": p.PROTOCOL_VERSION,
            "uptime_s": round(time.monotonic() - self.started_at, 3), "zmq_url": self.url,
            "http_url": self.http_url, "chunk_size": self.config.chunk_size,
            "eviction_policy": self.config.eviction_policy, "hash_algorithm": p.HASH_ALGORITHM,
        }
        out.update(self.service.status())
        now = time.monotonic()
        out["sessions"] = [
            {"session_id": s.session_id, "role": s.hello.role.name.lower() if s.hello else None,
             "pid": s.hello.pid if s.hello else None, "client_name": s.hello.client_name if s.hello else None,
             "namespace": msgspec.structs.asdict(s.hello.namespace) if s.hello else None,
             "connected_s": round(now - s.connected_at, 3), "fd": s.fd}
            for s in self.connections.sessions.values()
        ]
        out["connections"] = self.connections.status()
        return out
