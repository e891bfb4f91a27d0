"""Where the explorer's work runs: a small executor interface and its local implementations.

The explorer cuts its work into independent tasks -- a function defined at module level and
picklable arguments (model name, configuration, variant, seeds, action paths) -- and submits
them to an `Executor`. Anything that can run such a function somewhere and hand back a
`concurrent.futures.Future` can stand behind the interface: `LocalExecutor` uses the processes
of this machine (all cores by default), `SerialExecutor` runs in the caller (tests, one core),
and a cluster engine (Ray's ``ref.future()``, issue 8) needs nothing more.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Protocol, TypeVar, runtime_checkable

from fpstate.check.memo import own_process

R = TypeVar("R")


@runtime_checkable
class Executor(Protocol):
    """Runs module-level functions on picklable arguments; ``workers`` is how many run at
    once (the explorer cuts its work in about that many pieces)."""

    @property
    def workers(self) -> int: ...

    def submit(self, fn: Callable[..., R], *args: Any) -> Future[R]: ...

    def close(self) -> None: ...


class SerialExecutor:
    """Runs each task at once in the calling process."""

    workers = 1

    def submit(self, fn: Callable[..., R], *args: Any) -> Future[R]:
        f: Future[R] = Future()
        try:
            f.set_result(fn(*args))
        except BaseException as e:
            f.set_exception(e)
        return f

    def close(self) -> None:
        pass


class LocalExecutor:
    """A pool of worker processes on this machine (``workers`` default: every core)."""

    def __init__(self, workers: int | None = None) -> None:
        self._workers = max(1, workers or os.cpu_count() or 1)
        ctx = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
        self._pool = ProcessPoolExecutor(self._workers, mp_context=ctx,
                                         initializer=own_process)

    @property
    def workers(self) -> int:
        return self._workers

    def submit(self, fn: Callable[..., R], *args: Any) -> Future[R]:
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def local(workers: int | None = None) -> Executor:
    """The executor for ``workers`` processes: serial for one, a process pool otherwise."""
    n = workers or os.cpu_count() or 1
    return SerialExecutor() if n == 1 else LocalExecutor(n)


__all__ = ["Executor", "LocalExecutor", "SerialExecutor", "local"]
