"""Server copies on CPUs: a few threads that execute copy plans (``lmcd.copyplan``) off the loop.

``CopyThreads.submit`` splits a plan by bytes over up to ``num_threads`` threads (a part is worth
a thread from 4 MiB on) and returns at once; ``done(error, seconds)`` is called exactly once per
plan, from a copy thread, when every part has finished. ``seconds`` is the copy's own time, from
the first part's start to the last part's end (not the time it waited for a thread).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from lmcd import copyplan
from lmcd.copyplan import CopyPlan

MIN_BYTES_PER_THREAD = 4 << 20


class CopyThreads:
    def __init__(self, num_threads: int) -> None:
        self.num_threads = max(1, num_threads)
        self._executor = ThreadPoolExecutor(self.num_threads, thread_name_prefix="lmcd-copy")

    def submit(self, copy_plan: CopyPlan, done: Callable[[BaseException | None, float], None]) -> None:
        num_parts = min(self.num_threads, max(1, copy_plan.num_bytes // MIN_BYTES_PER_THREAD))
        parts = copyplan.split(copy_plan, num_parts)
        remaining = [len(parts)]
        started: list[float] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def run_part(part: CopyPlan) -> None:
            with lock:
                started.append(time.perf_counter())
            try:
                copyplan.run(part)
            except BaseException as exc:  # reported through done(); the loop replies with it
                errors.append(exc)
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                done(errors[0] if errors else None, time.perf_counter() - min(started))

        for part in parts:
            self._executor.submit(run_part, part)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)
