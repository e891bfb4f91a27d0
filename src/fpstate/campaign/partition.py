"""Bounded-exhaustive exploration split across workers by state hash.

Theory of operation
-------------------
The explored graph is the model's: states are worlds (fpstate.check.world), edges the enabled
actions (``World.enabled``, optionally restricted to the campaign's action list), and two
states are the same when their canonical keys are (``World.key``). Each state is named by a
*digest*, 128 bits of BLAKE2b over ``repr(key)`` -- not Python's ``hash()``, which is salted
per process (PYTHONHASHSEED) and so differs between workers. Worker ``p`` of ``n`` owns the
states whose ``digest % n == p``: their part of the visited set, and their expansion.

The search is breadth-first and level-synchronous; each level is two requests to every
partition. *Accept*: the partition is handed the candidates (digest, path from boot) of the
level addressed to it, keeps those it never visited and chooses for each new digest the
smallest path (shortest, then by action names and arguments: a total order that does not
depend on who sent what). *Expand*: it rebuilds each accepted state by replaying its path from
the initial world, takes every enabled action once, checks every invariant, and returns each
successor's candidate, batched by owner, for the next level. Because every state's
representative is chosen by the same order whatever the number of partitions, 1 partition and
``n`` partitions visit the same states, take the same transitions and find the same
violations: the union is what one process explores, state for state. Between the two requests
the coordinator decides whether to go on (the bound, a budget, the first violation), so a
search cut short is still exactly a breadth-first search to a smaller depth.

A path travels instead of the world (a world pickles to hundreds of kilobytes and cannot be
pickled at all while a kernel path is suspended in it); the owner pays one replay of the path
per new state. A successor that violates an invariant is recorded (per invariant: the number
of violating transitions and the smallest violating path) and not expanded further; a model
crash (an exception that is neither a refused action nor a detected bug) is recorded as an
error with its path, and the rest of the cell goes on.

Fault tolerance: after every accept the coordinator appends each partition's newly visited
digests to a `Spill`, one segment per level. A partition whose worker died is rebuilt from
its spill (the visited set before the current level), accepts the level's candidates again
(the coordinator still holds them) and is asked again; each request is a function of the
visited set and its input, so the result is the same.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fpstate.check.explore import Found, Job
from fpstate.check.memo import settle
from fpstate.check.world import Action, StepError, World
from fpstate.errors import FpstateError

ActionPath = tuple[Action, ...]
#: (digest, path from the initial state)
Candidate = tuple[int, ActionPath]
DIGEST_BYTES = 16


def state_digest(world: World) -> int:
    """The 128-bit name of a state: BLAKE2b of its canonical key's repr (stable across
    processes, unlike ``hash()``)."""
    h = hashlib.blake2b(repr(world.key()).encode(), digest_size=DIGEST_BYTES)
    return int.from_bytes(h.digest(), "big")


def owner(digest: int, partitions: int) -> int:
    """The partition that owns the state named ``digest``."""
    return digest % partitions


def action_order(a: Action) -> tuple[str, tuple[tuple[str, str, str], ...]]:
    return a.name, tuple((k, type(v).__name__, str(v)) for k, v in a.args)


def path_order(path: ActionPath) -> tuple[int, tuple[Any, ...]]:
    """The total order on paths that picks a state's representative: shortest first, then by
    action names and arguments."""
    return len(path), tuple(action_order(a) for a in path)


@dataclass(frozen=True, slots=True)
class CellJob:
    """What every partition of one cell needs: the world to build and the action filter."""

    job: Job
    actions: frozenset[str] | None = None  #: None: every enabled action

    def enabled(self, w: World) -> list[Action]:
        acts = w.enabled()
        if self.actions is None:
            return acts
        return [a for a in acts if a.name in self.actions]


@dataclass(slots=True)
class Tally:
    """Transitions, refusals, coverage, violations and errors (partition rounds, random seeds
    and whole cells add up the same way)."""

    transitions: int = 0
    illegal: int = 0
    per_action: Counter[str] = field(default_factory=Counter)
    #: invariant -> (violating transitions, the smallest violating path's Found)
    violations: dict[str, tuple[int, Found]] = field(default_factory=dict)
    #: "Type: message" -> (occurrences, smallest path that raised it)
    errors: dict[str, tuple[int, ActionPath]] = field(default_factory=dict)

    def violation(self, w: World, vs: Sequence[Any]) -> None:
        path = tuple(w.history)
        names = tuple(dict.fromkeys(v.invariant for v in vs))
        seen: set[str] = set()
        for v in vs:
            if v.invariant in seen:
                continue
            seen.add(v.invariant)
            found = Found(v.invariant, v.detail, path, names)
            old = self.violations.get(v.invariant)
            if old is None:
                self.violations[v.invariant] = (1, found)
            else:
                best = found if path_order(path) < path_order(old[1].path) else old[1]
                self.violations[v.invariant] = (old[0] + 1, best)

    def error(self, exc: BaseException, path: ActionPath) -> None:
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        old = self.errors.get(msg)
        if old is None:
            self.errors[msg] = (1, path)
        else:
            best = path if path_order(path) < path_order(old[1]) else old[1]
            self.errors[msg] = (old[0] + 1, best)

    def add(self, other: Tally) -> None:
        self.transitions += other.transitions
        self.illegal += other.illegal
        self.per_action.update(other.per_action)
        for inv, (n, found) in other.violations.items():
            old = self.violations.get(inv)
            if old is None:
                self.violations[inv] = (n, found)
            else:
                best = found if path_order(found.path) < path_order(old[1].path) else old[1]
                self.violations[inv] = (old[0] + n, best)
        for msg, (n, path) in other.errors.items():
            old_e = self.errors.get(msg)
            if old_e is None:
                self.errors[msg] = (n, path)
            else:
                best_p = path if path_order(path) < path_order(old_e[1]) else old_e[1]
                self.errors[msg] = (old_e[0] + n, best_p)


@dataclass(slots=True)
class RoundStats:
    """What one partition reports about one round (the batches travel separately)."""

    partition: int
    level: int
    accepted: list[int]  #: digests this partition visited for the first time, sorted
    tally: Tally
    received: int = 0  #: candidates handed in
    sent: int = 0  #: candidates sent to other partitions
    seconds: float = 0.0
    cpu_seconds: float = 0.0  #: CPU time of the worker process (contention does not count)


class Partition:
    """The worker side: one partition of the visited set and its expansion (module docstring).
    Engines run it in the caller, in a worker process, or in a Ray actor."""

    def __init__(self, cell: CellJob, index: int, partitions: int) -> None:
        self.cell = cell
        self.index = index
        self.partitions = partitions
        self.visited: set[int] = set()
        self.frontier: list[Candidate] = []  #: accepted in the last `accept`, by digest

    def restore(self, digests: Iterable[int]) -> int:
        """Start again from a spilled visited set (after the worker died)."""
        self.visited = set(digests)
        self.frontier = []
        return len(self.visited)

    def rebuild(self, path: ActionPath) -> World:
        """The state at the end of ``path``: a clone of the initial world with the path
        replayed (its invariants were checked when the path was first taken)."""
        w = self.cell.job.world()
        for a in path:
            w.step(a, check=False)
        return w

    def accept(self, level: int, batches: Sequence[Sequence[Candidate]]) -> RoundStats:
        """Visit the candidates of ``level`` never visited: for each new digest the smallest
        path becomes the state's representative; they are the next `expand`'s frontier."""
        start, cpu = time.perf_counter(), time.process_time()
        best: dict[int, ActionPath] = {}
        received = 0
        for batch in batches:
            for d, path in batch:
                received += 1
                assert owner(d, self.partitions) == self.index, "candidate sent to the wrong owner"
                if d in self.visited:
                    continue
                old = best.get(d)
                if old is None or path_order(path) < path_order(old):
                    best[d] = path
        accepted = sorted(best)
        self.visited.update(accepted)
        self.frontier = [(d, best[d]) for d in accepted]
        return RoundStats(self.index, level, accepted, Tally(), received, 0,
                          time.perf_counter() - start, time.process_time() - cpu)

    def expand(self, level: int) -> tuple[list[list[Candidate]], RoundStats]:
        """Take every enabled action from each state of the frontier: the candidates of
        ``level + 1`` by destination partition, and the stats (transitions, violations)."""
        start, cpu = time.perf_counter(), time.process_time()
        tally = Tally()
        out: list[dict[int, ActionPath]] = [{} for _ in range(self.partitions)]
        for _, path in self.frontier:
            self._expand(path, tally, out)
            settle()  # the worlds of that path are garbage now (fpstate.check.memo)
        self.frontier = []
        batches = [sorted(o.items()) for o in out]
        sent = sum(len(b) for p, b in enumerate(batches) if p != self.index)
        return batches, RoundStats(self.index, level, [], tally, 0, sent,
                                   time.perf_counter() - start, time.process_time() - cpu)

    def _expand(self, path: ActionPath, tally: Tally, out: list[dict[int, ActionPath]]) -> None:
        try:
            w = self.rebuild(path)
            actions = self.cell.enabled(w)
        except Exception as e:  # a model crash is a finding, not a worker crash
            tally.error(e, path)
            return
        for a in actions:
            try:
                c = w.clone()
                r = c.step(a)
            except StepError:
                tally.illegal += 1
                continue
            except Exception as e:  # see above
                tally.error(e, (*path, a))
                continue
            tally.transitions += 1
            tally.per_action[a.name] += 1
            if r.violations:
                tally.violation(c, r.violations)
                continue
            try:
                d = state_digest(c)
            except Exception as e:  # see above
                tally.error(e, (*path, a))
                continue
            p = owner(d, self.partitions)
            if p == self.index and d in self.visited:
                continue
            child = (*path, a)
            old = out[p].get(d)
            if old is None or path_order(child) < path_order(old):
                out[p][d] = child


# -- the coordinator ---------------------------------------------------------------------------


class WorkerLost(FpstateError):
    """A worker died (killed, out of memory, its node lost) before answering."""


ACCEPT, EXPAND = "accept", "expand"


@dataclass(slots=True)
class RoundResult:
    """A finished request of one partition: its stats and, for `EXPAND`, a handle per
    destination batch (the batches themselves for local workers, object references for
    Ray)."""

    stats: RoundStats
    out: list[Any]


class PartitionPool(Protocol):
    """What an engine provides for partitioned exploration: ``size`` partitions, each on a
    worker that keeps its visited set and frontier between requests. ``submit`` sends
    `ACCEPT` (with the level's input batch handles) or `EXPAND` (``inputs`` empty) to a
    partition; ``collect`` waits for every submitted request."""

    size: int

    def submit(self, index: int, op: str, level: int, inputs: list[Any]) -> None: ...

    def collect(self) -> dict[int, RoundResult | WorkerLost]: ...

    def restart(self, index: int, visited: list[int]) -> None: ...

    def close(self) -> None: ...


class Spill:
    """Each partition's visited digests, one segment per level, appended after every accept:
    in memory, or in files of a directory (``p<N>.digests``, 16 bytes a digest) so that the
    coordinator's memory does not hold them."""

    def __init__(self, directory: str | Path | None = None, partitions: int = 1) -> None:
        self._mem: dict[int, list[int]] | None = None
        self._segments: dict[int, list[int]] = {p: [] for p in range(partitions)}
        if directory is None:
            self._mem = {p: [] for p in range(partitions)}
            self.dir = None
        else:
            self.dir = Path(directory)
            self.dir.mkdir(parents=True, exist_ok=True)
            for p in range(partitions):
                (self.dir / f"p{p}.digests").write_bytes(b"")

    def append(self, index: int, digests: Sequence[int]) -> None:
        """The next level's segment of partition ``index``."""
        self._segments[index].append(len(digests))
        if self._mem is not None:
            self._mem[index].extend(digests)
            return
        assert self.dir is not None
        with open(self.dir / f"p{index}.digests", "ab") as f:
            f.write(b"".join(d.to_bytes(DIGEST_BYTES, "big") for d in digests))

    def read(self, index: int, levels: int | None = None) -> list[int]:
        """The digests of the first ``levels`` segments (all by default)."""
        count = sum(self._segments[index][:levels] if levels is not None
                    else self._segments[index])
        if self._mem is not None:
            return self._mem[index][:count]
        assert self.dir is not None
        with open(self.dir / f"p{index}.digests", "rb") as f:
            raw = f.read(count * DIGEST_BYTES)
        return [int.from_bytes(raw[i:i + DIGEST_BYTES], "big")
                for i in range(0, len(raw), DIGEST_BYTES)]

    def remove(self) -> None:
        if self.dir is not None:
            for p in self.dir.glob("p*.digests"):
                p.unlink()
            try:
                self.dir.rmdir()
            except OSError:
                pass


@dataclass(slots=True)
class ExhaustiveResult:
    """One cell explored breadth-first (see `explore_exhaustive`)."""

    states: int = 0
    levels: list[int] = field(default_factory=list)  #: new states per depth (0 = boot)
    tally: Tally = field(default_factory=Tally)
    initial_violations: list[Found] = field(default_factory=list)
    depth: int = 0  #: the deepest level visited (its states are not expanded)
    complete: bool = False  #: every state within the bound was explored
    #: why the search ended: "bound", "fixpoint" (nothing new before the bound),
    #: "states"/"seconds" (the budget), "first-violation", "initial-violation"
    stopped_by: str = ""
    seconds: float = 0.0
    rounds: int = 0  #: levels visited (each an accept and, but for the last, an expand)
    restarts: int = 0  #: partitions rebuilt after their worker died
    messages: int = 0  #: candidates sent between different partitions
    received: int = 0  #: candidates handed to partitions (including their own)
    worker_seconds: float = 0.0  #: time the workers spent in requests, summed
    worker_cpu_seconds: float = 0.0  #: their CPU time, summed


Progress = Callable[[str, dict[str, Any]], None]


def explore_exhaustive(cell: CellJob, pool: PartitionPool, depth: int, *,
                       stop: str = "bound", max_states: int | None = None,
                       max_seconds: float | None = None, spill: Spill | None = None,
                       progress: Progress | None = None, max_restarts: int = 3
                       ) -> ExhaustiveResult:
    """Breadth-first search of ``cell`` to ``depth`` actions over ``pool``'s partitions.

    Each level is two requests to every partition: accept the level's candidates, then (if
    the search goes on) expand them. Budgets and ``stop='first-violation'`` are checked in
    between: when one ends the search, the level just visited is not expanded, so the result
    is exactly a breadth-first search to a smaller depth -- the same states whatever the number
    of partitions -- marked incomplete. (The checker's explorer stops the same way at its first
    violation: the level whose expansion found it is visited, not expanded.)"""
    start = time.perf_counter()
    n = pool.size
    spill = spill if spill is not None else Spill(None, n)
    res = ExhaustiveResult()
    initial = cell.job.world()
    bad = initial.check()
    if bad:
        names = tuple(dict.fromkeys(v.invariant for v in bad))
        res.initial_violations = [Found(v.invariant, v.detail, (), names) for v in bad]
        for f in res.initial_violations:
            res.tally.violations.setdefault(f.invariant, (1, f))
        res.stopped_by = "initial-violation"
        res.states, res.levels = 1, [1]  # the boot state, visited and found broken
        res.seconds = time.perf_counter() - start
        return res
    d0 = state_digest(initial)
    del initial  # partitions may expand in this process, where `settle` freezes what lives
    inputs: list[list[Any]] = [[] for _ in range(n)]
    inputs[owner(d0, n)] = [[(d0, ())]]
    level = 0

    def request(op: str) -> dict[int, RoundResult]:
        for p in range(n):
            pool.submit(p, op, level, inputs[p] if op == ACCEPT else [])
        if progress is not None:
            progress("dispatched", {"level": level, "op": op})
        return _collect(pool, op, level, inputs, spill, res, max_restarts, progress)

    while True:
        accepted = request(ACCEPT)
        new = 0
        for p in range(n):
            st = accepted[p].stats
            spill.append(p, st.accepted)
            new += len(st.accepted)
            res.received += st.received
            res.worker_seconds += st.seconds
            res.worker_cpu_seconds += st.cpu_seconds
        res.rounds += 1
        if new:
            res.levels.append(new)
            res.states += new
            res.depth = level
        if progress is not None:
            progress("round", {"level": level, "new": new, "states": res.states,
                               "transitions": res.tally.transitions,
                               "violations": sum(c for c, _ in res.tally.violations.values()),
                               "seconds": time.perf_counter() - start})
        if new == 0:
            res.complete, res.stopped_by = True, "fixpoint"
            break
        if stop == "first-violation" and res.tally.violations:
            res.stopped_by = "first-violation"
            break
        if level == depth:
            res.complete, res.stopped_by = True, "bound"
            break
        if max_states is not None and res.states >= max_states:
            res.stopped_by = "states"
            break
        if max_seconds is not None and time.perf_counter() - start >= max_seconds:
            res.stopped_by = "seconds"
            break
        expanded = request(EXPAND)
        for p in range(n):
            st = expanded[p].stats
            res.tally.add(st.tally)
            res.messages += st.sent
            res.worker_seconds += st.seconds
            res.worker_cpu_seconds += st.cpu_seconds
        inputs = [[expanded[q].out[p] for q in range(n)] for p in range(n)]
        level += 1
    res.seconds = time.perf_counter() - start
    return res


def _collect(pool: PartitionPool, op: str, level: int, inputs: list[list[Any]],
             spill: Spill, res: ExhaustiveResult, max_restarts: int,
             progress: Progress | None) -> dict[int, RoundResult]:
    """Every partition's answer to ``op`` at ``level``. A partition whose worker died is
    rebuilt: its visited set before this level from the spill, this level's candidates
    accepted again (for `EXPAND`), then ``op`` again -- at most ``max_restarts`` times."""
    done: dict[int, RoundResult] = {}
    tries: Counter[int] = Counter()
    while len(done) < pool.size:
        lost: dict[int, WorkerLost] = {}
        for p, r in pool.collect().items():
            if isinstance(r, RoundResult):
                done[p] = r
            else:
                lost[p] = r
        for p, err in lost.items():
            while True:
                tries[p] += 1
                if tries[p] > max_restarts:
                    raise FpstateError(f"partition {p}: its worker died {tries[p]} times at "
                                       f"level {level} ({err})")
                res.restarts += 1
                if progress is not None:
                    progress("restart", {"level": level, "op": op, "partition": p,
                                         "reason": str(err)})
                pool.restart(p, spill.read(p, level))
                if op == EXPAND:
                    pool.submit(p, ACCEPT, level, inputs[p])
                    again = pool.collect()[p]
                    if isinstance(again, WorkerLost):
                        err = again
                        continue
                pool.submit(p, op, level, inputs[p] if op == ACCEPT else [])
                break
    return done


def serve(part: Partition, op: str, level: int, inputs: Sequence[Any]
          ) -> tuple[list[Any], RoundStats]:
    """A worker's answer to one request: (batches, stats)."""
    if op == ACCEPT:
        return [], part.accept(level, inputs)
    assert op == EXPAND, f"unknown request {op!r}"
    return part.expand(level)


class InlinePool:
    """The partitions in the calling process, one after the other (one worker; tests)."""

    def __init__(self, cell: CellJob, partitions: int = 1) -> None:
        self.cell = cell
        self.size = partitions
        self.parts = [Partition(cell, p, partitions) for p in range(partitions)]
        self._queue: list[tuple[int, str, int, list[Any]]] = []

    def submit(self, index: int, op: str, level: int, inputs: list[Any]) -> None:
        self._queue.append((index, op, level, inputs))

    def collect(self) -> dict[int, RoundResult | WorkerLost]:
        out: dict[int, RoundResult | WorkerLost] = {}
        queue, self._queue = self._queue, []
        for index, op, level, inputs in queue:
            batches, stats = serve(self.parts[index], op, level, inputs)
            out[index] = RoundResult(stats, batches)
        return out

    def restart(self, index: int, visited: list[int]) -> None:
        self.parts[index] = Partition(self.cell, index, self.size)
        self.parts[index].restore(visited)

    def close(self) -> None:
        self._queue = []


__all__ = ["ACCEPT", "EXPAND", "Candidate", "CellJob", "ExhaustiveResult", "InlinePool",
           "Partition", "PartitionPool", "RoundResult", "RoundStats", "Spill", "Tally",
           "WorkerLost", "explore_exhaustive", "owner", "path_order", "serve", "state_digest"]
