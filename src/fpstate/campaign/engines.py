"""Where a campaign runs: local processes (the default, no Ray needed) or Ray.

An engine gives the campaign two things:

- an `Executor` (fpstate.check.executor: ``workers``, ``submit(fn, *args) -> Future``,
  ``close``) for independent tasks -- random-walk seeds and shrinking. `LocalEngine` uses the
  checker's own executors; `RayEngine` *is* one (a Ray task per call, ``ref.future()``);
- a `PartitionPool` (fpstate.campaign.partition) of stateful workers, one per partition of a
  bounded-exhaustive search: worker processes fed through pipes, or Ray actors that pass the
  candidate batches to each other through the object store (the driver only routes
  references).

Both detect a dead worker (a killed process, an actor that died with its node) and report it
as `WorkerLost`; the coordinator rebuilds the partition from its spill and runs the round
again. Independent tasks are resubmitted (Ray retries them itself: ``max_retries``).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import Connection, wait
from typing import Any, TypeVar

from fpstate.campaign.partition import (
    ACCEPT,
    CellJob,
    InlinePool,
    Partition,
    PartitionPool,
    RoundResult,
    WorkerLost,
    serve,
)
from fpstate.check.executor import Executor, LocalExecutor, SerialExecutor
from fpstate.check.memo import own_process
from fpstate.errors import FpstateError

R = TypeVar("R")
ENGINES = ("local", "ray")
#: Modules a fresh worker process imports before it is forked (forkserver preload).
PRELOAD = ["fpstate.campaign.partition", "fpstate.check.actions_kvm",
           "fpstate.check.actions_arm64"]
#: PYTHONHASHSEED of every worker process and Ray worker. State keys are hashed with BLAKE2b,
#: but a key may hold a Python hash() (salted per process unless this is fixed).
HASH_SEED = "0"


class Engine:
    """What every engine provides (see the module docstring)."""

    name: str = ""
    workers: int = 1

    def executor(self) -> Executor:
        raise NotImplementedError

    def partition_pool(self, cell: CellJob) -> PartitionPool:
        raise NotImplementedError

    def release(self) -> None:
        """Stop the partition workers (a Ray actor holds a CPU while it lives)."""

    def close(self) -> None:
        self.release()

    def describe(self) -> str:
        return f"{self.name}, {self.workers} worker{'s' if self.workers != 1 else ''}"

    def run_tasks(self, fn: Callable[..., R], calls: Sequence[tuple[Any, ...]],
                  on_result: Callable[[int, R], None] | None = None) -> list[R]:
        """``fn(*args)`` for every ``args`` of ``calls`` on the executor, results in order;
        tasks lost with a dead worker are run again (at most 3 times)."""
        results: dict[int, R] = {}
        todo = list(range(len(calls)))
        for _ in range(4):
            ex = self.executor()
            futures = {i: ex.submit(fn, *calls[i]) for i in todo}
            lost = []
            for i, f in futures.items():
                try:
                    results[i] = f.result()
                except BrokenProcessPool:
                    lost.append(i)
                    continue
                except Exception as e:
                    if _is_lost_worker(e):
                        lost.append(i)
                        continue
                    raise
                if on_result is not None:
                    on_result(i, results[i])
            if not lost:
                return [results[i] for i in range(len(calls))]
            self._broken_executor()
            todo = lost
        raise FpstateError(f"{len(todo)} tasks lost their worker 4 times")

    def _broken_executor(self) -> None:
        pass


def _is_lost_worker(e: BaseException) -> bool:
    try:
        import ray.exceptions as rex
    except ImportError:
        return False
    return isinstance(e, (rex.RayActorError, rex.WorkerCrashedError, rex.ObjectLostError,
                          rex.NodeDiedError))


# -- local processes -------------------------------------------------------------------------


class LocalEngine(Engine):
    """Processes of this machine. One worker: everything in the calling process."""

    name = "local"

    def __init__(self, workers: int | None = None) -> None:
        self.workers = max(1, workers or os.cpu_count() or 1)
        self._executor: Executor | None = None
        self._pool: ProcessPool | None = None

    def executor(self) -> Executor:
        if self._executor is None:
            self._executor = (SerialExecutor() if self.workers == 1
                              else LocalExecutor(self.workers))
        return self._executor

    def _broken_executor(self) -> None:
        if self._executor is not None:
            try:
                self._executor.close()
            except Exception:  # a broken pool may fail to shut down cleanly
                pass
            self._executor = None

    def partition_pool(self, cell: CellJob) -> PartitionPool:
        if self.workers == 1:
            return InlinePool(cell, 1)
        if self._pool is None:
            self._pool = ProcessPool(self.workers)
        self._pool.reset(cell)
        return self._pool

    def release(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def close(self) -> None:
        self.release()
        self._broken_executor()


def _serve(conn: Connection) -> None:
    """A partition worker process: answers the coordinator's requests until told to stop."""
    # Ctrl-C reaches the whole process group: the coordinator decides, the worker waits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    own_process()  # a process of fpstate's own: Partition.expand may settle (check/memo.py)
    part: Partition | None = None
    while True:
        try:
            msg = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        op = msg[0]
        try:
            if op == "stop":
                return
            if op == "reset":
                part = Partition(msg[1], msg[2], msg[3])
                conn.send(("ok", os.getpid()))
            elif op == "restore":
                assert part is not None, "restore before reset"
                conn.send(("ok", part.restore(msg[1])))
            elif op == "serve":
                assert part is not None, "request before reset"
                conn.send(("ok", serve(part, msg[1], msg[2], msg[3])))
            else:
                raise AssertionError(f"unknown request {op!r}")
        except Exception:  # handed to the coordinator, which raises it
            conn.send(("error", traceback.format_exc()))


class _Worker:
    def __init__(self, ctx: Any) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child,), daemon=True)
        self.proc.start()
        child.close()

    def call(self, *msg: Any) -> Any:
        """Send a request and wait for the answer (WorkerLost if the process died)."""
        self.send(*msg)
        return self.receive()

    def send(self, *msg: Any) -> None:
        try:
            self.conn.send(msg)
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError) as e:
            raise WorkerLost(f"worker {self.proc.pid}: {e}") from None

    def receive(self) -> Any:
        try:
            status, value = self.conn.recv()
        except (EOFError, ConnectionResetError, OSError):
            self.proc.join(1)
            raise WorkerLost(f"worker {self.proc.pid} died (exit {self.proc.exitcode})"
                             ) from None
        if status == "error":
            raise FpstateError(f"partition worker failed:\n{value}")
        return value

    def stop(self, kill: bool = False) -> None:
        if not kill:
            try:
                self.conn.send(("stop",))
            except OSError:
                pass
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()


class ProcessPool:
    """One worker process per partition (forkserver: each worker is forked from a clean
    process that imported the models once, so a restart takes milliseconds)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._ctx = multiprocessing.get_context(
            "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn")
        if self._ctx.get_start_method() == "forkserver":
            self._ctx.set_forkserver_preload(PRELOAD)
        # Every worker hashes with the same salt (the forkserver, started by the first worker,
        # passes it on to all it forks): a key that holds a hash() stays one name.
        saved = os.environ.get("PYTHONHASHSEED")
        os.environ["PYTHONHASHSEED"] = HASH_SEED
        try:
            self.workers = [_Worker(self._ctx) for _ in range(size)]
        finally:
            if saved is None:
                del os.environ["PYTHONHASHSEED"]
            else:
                os.environ["PYTHONHASHSEED"] = saved
        self.cell: CellJob | None = None
        self._sent: dict[int, WorkerLost | None] = {}
        self._busy: set[int] = set()  #: workers inside a round (killed, not asked, to stop)

    def pids(self) -> list[int]:
        """The worker processes' ids, by partition."""
        return [w.proc.pid or 0 for w in self.workers]

    def reset(self, cell: CellJob) -> None:
        """Empty partitions of a new cell."""
        self.cell = cell
        for p in range(self.size):
            try:
                self.workers[p].call("reset", cell, p, self.size)
            except WorkerLost:
                self.restart(p, [])

    def submit(self, index: int, op: str, level: int, inputs: list[Any]) -> None:
        try:
            self.workers[index].send("serve", op, level, inputs)
            self._sent[index] = None
        except WorkerLost as e:
            self._sent[index] = e
        self._busy.add(index)

    def collect(self) -> dict[int, RoundResult | WorkerLost]:
        out: dict[int, RoundResult | WorkerLost] = {}
        waiting = {}
        for p, err in self._sent.items():
            if err is not None:
                out[p] = err
            else:
                waiting[p] = self.workers[p]
        self._sent = {}
        while waiting:
            ready = wait([w.conn for w in waiting.values()]
                         + [w.proc.sentinel for w in waiting.values()])
            for p, w in list(waiting.items()):
                if w.conn in ready or w.proc.sentinel in ready:
                    try:
                        batches, stats = w.receive()
                        out[p] = RoundResult(stats, batches)
                    except WorkerLost as e:
                        out[p] = e
                    del waiting[p]
                    self._busy.discard(p)
        return out

    def restart(self, index: int, visited: list[int]) -> None:
        assert self.cell is not None
        self._busy.discard(index)
        self.workers[index].stop(kill=True)
        w = self.workers[index] = _Worker(self._ctx)
        w.call("reset", self.cell, index, self.size)
        w.call("restore", visited)

    def close(self) -> None:
        """Between cells the workers stay (the engine's `release` stops them)."""
        self._sent = {}

    def shutdown(self) -> None:
        for p, w in enumerate(self.workers):
            w.stop(kill=p in self._busy)
        self._busy = set()


# -- Ray -------------------------------------------------------------------------------------


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise FpstateError("the ray engine needs Ray: pip install 'fpstate[ray]'") from None
    return ray


class PartitionActor:
    """A partition in a Ray actor (`RayEngine` wraps it with ``ray.remote``)."""

    def __init__(self) -> None:
        # An actor has a Ray worker process to itself: fpstate's own, where Partition.expand
        # may settle the garbage collector (check/memo.py), as in a local worker (`_serve`).
        own_process()
        self.part: Partition | None = None

    def reset(self, cell: CellJob, index: int, partitions: int) -> int:
        self.part = Partition(cell, index, partitions)
        return os.getpid()

    def restore(self, visited: list[int]) -> int:
        assert self.part is not None, "restore before reset"
        return self.part.restore(visited)

    def accept(self, level: int, *batches: Any) -> Any:
        assert self.part is not None, "accept before reset"
        return self.part.accept(level, batches)

    def expand(self, level: int) -> tuple[Any, ...]:
        assert self.part is not None, "expand before reset"
        out, stats = self.part.expand(level)
        return (*out, stats)


#: What a refused connection to a live cluster most often means since Ray 2.59.
_AUTH_HINT = (" (a cluster started with token authentication, the default of `ray start` since "
              "Ray 2.59, needs RAY_AUTH_MODE=token here and its token in RAY_AUTH_TOKEN or "
              "~/.ray/auth_token)")
#: Seconds to wait for a cluster's port to answer before ray.init (which would retry a dead
#: address for many minutes).
CONNECT_TIMEOUT = 5.0


def connect_error(address: str | None, e: BaseException) -> str:
    """The one-line message for ``ray.init(address)`` failing with ``e``.

    Ray's message names the cause on its first line, except a Ray Client server's refusal
    ("Initialization failure from server:"), which the proxier (ray.util.client.server.proxier)
    follows with the server's traceback: its last line is the cause (the session's own server
    did not start, or the runtime-env agent did not answer). That refusal comes after the
    connection was accepted, so it is not a missing token either."""
    where = f"the Ray cluster at {address}" if address else "a local Ray instance"
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return f"cannot connect to {where}: {type(e).__name__}"
    first = lines[0]
    if first.startswith("Initialization failure from server"):
        cause = lines[-1] if len(lines) > 1 else "no reason given"
        return f"cannot connect to {where}: the Ray Client server refused the session: {cause}"
    hint = _AUTH_HINT if address is not None and "token" not in first else ""
    return f"cannot connect to {where}: {first}{hint}"


def _reachable(address: str) -> None:
    """FpstateError unless ``address`` (``host:port`` or ``ray://host:port``; ``auto`` and
    ``local`` are Ray's to resolve) accepts a TCP connection within `CONNECT_TIMEOUT`."""
    import socket

    hostport = address.removeprefix("ray://")
    if hostport in ("auto", "local"):
        return
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FpstateError(f"bad Ray address {address!r}: expected HOST:PORT or "
                           "ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT).close()
    except OSError as e:
        raise FpstateError(f"cannot connect to the Ray cluster at {address}: "
                           f"{e.strerror or e}") from None


class RayEngine(Engine):
    """Ray: a local instance (``ray.init()``) or an existing cluster (``address``). It is an
    `Executor` itself; partitions are actors spread over the nodes."""

    name = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None,
                 **init: Any) -> None:
        ray = self.ray = _ray()
        self._owns = False
        if not ray.is_initialized():
            opts: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                    "configure_logging": False,
                                    "runtime_env": {"env_vars": {"PYTHONHASHSEED": HASH_SEED}}}
            if address is None and workers is not None:
                opts["num_cpus"] = workers
            opts.update(init)
            if address is not None:
                _reachable(address)
            try:
                ray.init(address=address, **opts)
            except (ConnectionError, ValueError, ray.exceptions.RayError) as e:
                # No cluster there, a malformed address, a token missing or refused.
                raise FpstateError(connect_error(address, e)) from None
            self._owns = True
        self.address = address
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = max(1, workers or cpus)
        self._remote: dict[Callable[..., Any], Any] = {}
        self._actor_cls = ray.remote(num_cpus=1, max_restarts=0)(PartitionActor)
        self._pool: RayPool | None = None

    # Executor ------------------------------------------------------------------------------

    def submit(self, fn: Callable[..., R], *args: Any) -> Future[R]:
        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = self.ray.remote(max_retries=3)(fn)
        return remote.remote(*args).future()

    def executor(self) -> Executor:
        self.release()
        return self

    # partitions ----------------------------------------------------------------------------

    def partition_pool(self, cell: CellJob) -> PartitionPool:
        if self._pool is None:
            self._pool = RayPool(self, self.workers)
        self._pool.reset(cell)
        return self._pool

    def release(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def close(self) -> None:
        self.release()
        if self._owns:
            self.ray.shutdown()
            self._owns = False

    def describe(self) -> str:
        where = f"cluster {self.address}" if self.address else "local Ray instance"
        return f"ray ({where}), {self.workers} worker{'s' if self.workers != 1 else ''}"


class RayPool:
    """One actor per partition; round outputs stay in the object store and go to the next
    round's actors by reference."""

    def __init__(self, engine: RayEngine, size: int) -> None:
        self.engine = engine
        self.ray = engine.ray
        self.size = size
        self.actors = [self._new() for _ in range(size)]
        self.cell: CellJob | None = None
        self._refs: dict[int, list[Any]] = {}

    def _new(self) -> Any:
        return self.engine._actor_cls.options(scheduling_strategy="SPREAD").remote()

    def reset(self, cell: CellJob) -> None:
        self.cell = cell
        refs = [a.reset.remote(cell, p, self.size) for p, a in enumerate(self.actors)]
        for p, ref in enumerate(refs):
            try:
                self.ray.get(ref)
            except Exception as e:
                if not _is_lost_worker(e):
                    raise
                self.restart(p, [])

    def submit(self, index: int, op: str, level: int, inputs: list[Any]) -> None:
        actor = self.actors[index]
        if op == ACCEPT:
            self._refs[index] = [actor.accept.remote(level, *inputs)]
        else:
            self._refs[index] = list(
                actor.expand.options(num_returns=self.size + 1).remote(level))

    def collect(self) -> dict[int, RoundResult | WorkerLost]:
        out: dict[int, RoundResult | WorkerLost] = {}
        for p, refs in self._refs.items():
            try:
                stats = self.ray.get(refs[-1])
            except Exception as e:
                if not _is_lost_worker(e):
                    raise
                out[p] = WorkerLost(f"actor of partition {p}: {type(e).__name__}")
                continue
            out[p] = RoundResult(stats, refs[:-1])
        self._refs = {}
        return out

    def restart(self, index: int, visited: list[int]) -> None:
        assert self.cell is not None
        try:
            self.ray.kill(self.actors[index])
        except Exception:  # it may be gone already
            pass
        a = self.actors[index] = self._new()
        self.ray.get(a.reset.remote(self.cell, index, self.size))
        self.ray.get(a.restore.remote(visited))

    def close(self) -> None:
        self._refs = {}

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:  # it may be gone already
                pass
        self.actors = []


def make_engine(kind: str = "local", workers: int | None = None,
                address: str | None = None) -> Engine:
    """The engine ``kind`` (local or ray); an ``address`` means Ray."""
    if address is not None and kind == "local":
        kind = "ray"
    if kind == "local":
        return LocalEngine(workers)
    if kind == "ray":
        return RayEngine(workers, address)
    raise FpstateError(f"unknown engine {kind!r} (known: {', '.join(ENGINES)})")


__all__ = ["ENGINES", "Engine", "LocalEngine", "PartitionActor", "ProcessPool", "RayEngine",
           "RayPool", "make_engine"]
