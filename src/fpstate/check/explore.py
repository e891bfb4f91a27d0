"""The explorer: random and bounded-exhaustive exploration of a model, and shrinking.

Theory of operation
-------------------
- A `Job` names what to explore: a model, its configuration and a variant (None: the
  kernel's design). It is plain data, so workers can rebuild the world from it; each worker
  process builds the initial world once and clones it (`World.clone`) for every walk or path.
- **Random** mode: every worker runs random walks (`walk_length` steps from the initial
  state; at each step an action *name* is drawn uniformly among the enabled ones, then one of
  its instances, so that rare actions are not drowned by numerous ones; each walk keeps a
  random half of the action names (swarm testing) and mostly stays with the task of its
  previous step, see `_pick`) in slices of about a second, and reports transitions,
  per-action counts, the hashes of the state keys it reached and the first violation. The
  coordinator keeps submitting slices until the time is up or a violation is found.
  Seeds are (seed, slice number): a slice replays identically.
- **Exhaustive** mode: breadth-first search by levels up to ``depth`` actions with state
  hashing (`World.key`): each level's frontier is cut into pieces, each piece replays its
  paths and expands every enabled action; only states whose key was never seen go on. The first
  violation found is at the smallest depth. The time limit holds inside a level too: pieces
  stop at the deadline, and the result then counts only the levels finished.
- **Shrinking** (`shrink`): the violating path is cut at its first violating step, then
  reduced by delta debugging and by removing windows of steps of every width (widest first,
  down to single steps) until no step can be removed (a path still "fails" only if the *same*
  invariant is violated at its first violating step).
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any

from fpstate.check.executor import Executor
from fpstate.check.memo import settle, thaw
from fpstate.check.scenario import Scenario, Step, make_world
from fpstate.check.world import Action, StepError, World

DEFAULT_CONFIGS: dict[str, dict[str, Any]] = {
    # 2 CPUs, 2 processes with 2 threads each, 1 VM with 1 vCPU whose VMM is p1.t0 and
    # asked for the guest AMX permission first (as QEMU does for -cpu SapphireRapids), so
    # that the guest uses TILEDATA and XFD too; Sapphire Rapids, so that AMX (XFD, dynamic
    # sizing), PASID and CET all matter. Linux
    # 6.18 with the proposed fixes of its two suspend/resume bugs (kernel-findings 10) and
    # of its stale MXCSR in UABI buffers (kernel-findings 6: Chang S. Bae's v3 and our
    # amendment), and with 6.19's fix of guest XFD and XSTATE_BV (b45f72177594, also in
    # the stable trees) and our amendment of it for a VMM's XFD writes, so that the walks
    # look past them; their variants run the code without.
    "x86": {"cpu": "sapphire-rapids", "cpus": 2, "processes": {"p0": 2, "p1": 2},
            "vms": {"vm0": {"vmm": "p1.t0", "vcpus": 1, "guest_amx": True}},
            "fixes": ["resume_pkru", "resume_xfd_set_state", "mxcsr_by_format",
                      "mxcsr_flip_inits_xmm", "guest_xfd_clears_xstate_bv",
                      "guest_xfd_host_write"]},
    # The Arm FVP profile with FPMR, a VMM and one other task, 1 VM with 1 vCPU.
    "arm64": {"cpu": "fvp-aem-fpmr", "cpus": 2, "tasks": ["other"],
              "vms": {"vm0": {"vcpus": 1}}},
}


def default_config(model: str, cpu: str | None = None) -> dict[str, Any]:
    cfg = {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
           for k, v in DEFAULT_CONFIGS[model].items()}
    if cpu is not None:
        cfg["cpu"] = cpu
    return cfg


@dataclass(frozen=True, slots=True)
class Job:
    model: str
    config: Mapping[str, Any]
    variant: str | None = None

    def world(self) -> World:
        """A fresh world in the initial state."""
        return self.initial().clone()

    def initial(self) -> World:
        """This process's initial world of the job, built once: clone it, never step it."""
        key = (self.model, repr(sorted(self.config.items())), self.variant)
        w0 = _INITIAL.get(key)
        if w0 is None:
            if len(_INITIAL) >= INITIAL_WORLDS:  # a long-lived worker moves on to other jobs
                del _INITIAL[next(iter(_INITIAL))]
                thaw()  # `settle` may have frozen it: its cycles are collected once thawed
            w0 = _INITIAL[key] = make_world(self.model, self.config, self.variant)
        return w0


#: Initial worlds, built once per process, the oldest dropped beyond `INITIAL_WORLDS` (as
#: the memos of fpstate.check.world are beyond MEMO_WORLDS).
_INITIAL: dict[tuple[str, str, str | None], World] = {}
INITIAL_WORLDS = 4


@dataclass(frozen=True, slots=True)
class Found:
    invariant: str
    detail: str
    path: tuple[Action, ...]
    invariants: tuple[str, ...] = ()  #: every invariant broken at that step


@dataclass(slots=True)
class Slice:
    """What one piece of work reports back."""

    transitions: int = 0
    walks: int = 0
    illegal: int = 0
    per_action: Counter[str] = field(default_factory=Counter)
    keys: set[int] = field(default_factory=set)
    found: Found | None = None
    children: list[tuple[tuple[Action, ...], int]] = field(default_factory=list)
    cut: bool = False  #: stopped at its time limit before every path was expanded


def _found(w: World, violations: Sequence[Any]) -> Found:
    v = violations[0]
    return Found(v.invariant, v.detail, tuple(w.history),
                 tuple(dict.fromkeys(x.invariant for x in violations)))


#: How often a random walk stays with the task of its previous step (see `_pick`).
FOCUS = 0.75
#: Swarm testing (Groce et al., ISSTA 2012): each walk keeps each action name with this
#: probability (a name is drawn the first time the walk meets it); a step picks among the
#: kept names when any is enabled, else among all.
SWARM = 0.5


def _pick(rng: random.Random, actions: list[Action], prev: Action | None = None,
          swarm: dict[str, bool] | None = None) -> Action:
    """One enabled action for a random walk: first the walk's swarm (`SWARM`) narrows the
    candidates, then with probability `FOCUS` they narrow to those of the previous step's
    task (a bug usually needs several steps of one context in a row -- a permission, a first
    use, a KVM entry -- which interleaving with every other task makes rare), then an action
    *name* is drawn uniformly and one of its instances. Blind to variants and scenarios."""
    if swarm is not None:
        kept = []
        for a in actions:
            keep = swarm.get(a.name)
            if keep is None:
                keep = swarm[a.name] = rng.random() < SWARM
            if keep:
                kept.append(a)
        if kept:
            actions = kept
    if prev is not None and FOCUS and rng.random() < FOCUS:
        task = prev.task
        if task is not None:
            same = [a for a in actions if a.task == task]
            # Not when the task has a single kind of action (a task in the kernel can only
            # be the target of pasid_write): the walk would repeat it.
            if same and any(a.name != same[0].name for a in same):
                actions = same
    by: dict[str, list[Action]] = {}
    for a in actions:
        group = by.get(a.name)
        if group is None:
            by[a.name] = [a]
        else:
            group.append(a)
    return rng.choice(by[rng.choice(sorted(by))])


def random_slice(job: Job, seed: int, seconds: float, walk_length: int) -> Slice:
    """Random walks from the initial state for about ``seconds`` (a worker task)."""
    rng = random.Random(seed)
    out = Slice()
    start = time.perf_counter()
    first = job.world()
    bad = first.check()
    if bad:
        out.found = _found(first, bad)
        return out
    out.keys.add(first.state_hash())
    # Walks clone the process's initial world, which lives as long as the process: `settle`
    # may freeze it, never a world that dies before the process does.
    del first
    initial = job.initial()
    while time.perf_counter() - start < seconds and out.found is None:
        _walk(initial, rng, walk_length, out)
        settle()  # the walk's world is garbage now
    return out


def _walk(initial: World, rng: random.Random, walk_length: int, out: Slice) -> None:
    """One random walk of `random_slice`, counted into ``out``."""
    w = initial.clone()
    out.walks += 1
    a = None
    swarm: dict[str, bool] | None = {} if SWARM < 1 else None
    for _ in range(walk_length):
        actions = w.enabled_actions()
        if not actions:
            break
        a = _pick(rng, actions, a, swarm)
        try:
            r = w.step(a)
        except StepError:
            out.illegal += 1
            if w.rollback_on_illegal:
                continue
            break
        out.transitions += 1
        out.per_action[a.name] += 1
        if r.violations:
            out.found = _found(w, r.violations)
            break
        out.keys.add(w.state_hash())


def expand_slice(job: Job, paths: list[tuple[Action, ...]],
                 deadline: float | None = None) -> Slice:
    """Replay each path and take every enabled action once (a worker task); past
    ``deadline`` (``time.time()``: the wall clock, which every worker process reads alike)
    stop, with ``cut`` set."""
    out = Slice()
    initial = job.initial()  # as in random_slice
    for path in paths:
        if deadline is not None and time.time() > deadline:
            out.cut = True
            break
        _expand(initial, path, out)
        settle()  # the worlds of that path are garbage now
    return out


def _expand(initial: World, path: tuple[Action, ...], out: Slice) -> None:
    """One path of `expand_slice`: its children go to ``out``."""
    w = initial.clone()
    try:
        for a in path:
            w.step(a, check=False)
    except StepError:
        out.illegal += 1
        return
    for a in w.enabled_actions():
        c = w.clone()
        try:
            r = c.step(a)
        except StepError:
            out.illegal += 1
            continue
        out.transitions += 1
        out.per_action[a.name] += 1
        if r.violations:
            if out.found is None:
                out.found = _found(c, r.violations)
            continue
        out.children.append(((*path, a), c.state_hash()))


@dataclass(slots=True)
class Result:
    job: Job
    mode: str
    states: int
    transitions: int
    seconds: float
    per_action: Counter[str]
    walks: int = 0
    depth: int = 0
    found: Found | None = None
    complete: bool = False  #: exhaustive mode explored every state up to ``depth``


def explore(job: Job, executor: Executor, *, mode: str = "random", seconds: float = 10.0,
            seed: int = 0, depth: int = 6, walk_length: int = 60) -> Result:
    """Explore ``job`` until ``seconds`` have passed or a violation is found."""
    start = time.perf_counter()
    if mode == "random":
        res = _explore_random(job, executor, seconds, seed, walk_length, start)
    elif mode == "exhaustive":
        res = _explore_exhaustive(job, executor, seconds, depth, start)
    else:
        raise ValueError(f"unknown exploration mode {mode!r}")
    res.seconds = time.perf_counter() - start
    return res


def _merge(res: Result, keys: set[int], s: Slice) -> None:
    res.transitions += s.transitions
    res.per_action.update(s.per_action)
    res.walks += s.walks
    keys |= s.keys


def _explore_random(job: Job, executor: Executor, seconds: float, seed: int,
                    walk_length: int, start: float) -> Result:
    res = Result(job, "random", 0, 0, 0.0, Counter())
    keys: set[int] = set()
    pending: set[Future[Slice]] = set()
    n = 0

    def left() -> float:
        return seconds - (time.perf_counter() - start)

    def submit() -> None:
        nonlocal n
        pending.add(executor.submit(random_slice, job, seed * 1_000_003 + n,
                                    min(1.0, max(left(), 0.05)), walk_length))
        n += 1

    for _ in range(executor.workers):
        submit()
    while pending:
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        for f in done:
            pending.discard(f)
            s = f.result()
            _merge(res, keys, s)
            if s.found is not None and res.found is None:
                res.found = s.found
        if res.found is None and left() > 0:
            while len(pending) < executor.workers:
                submit()
        else:
            for f in pending:
                f.cancel()
    res.states = len(keys)
    return res


def _explore_exhaustive(job: Job, executor: Executor, seconds: float, depth: int,
                        start: float) -> Result:
    res = Result(job, "exhaustive", 0, 0, 0.0, Counter())
    first = job.world()
    bad = first.check()
    if bad:
        res.found = _found(first, bad)
        return res
    seen = {first.state_hash()}
    # The pieces may run in this process (one worker), where `settle` freezes what is alive
    # between paths: no world of ours may be alive then.
    del first
    frontier: list[tuple[Action, ...]] = [()]
    level = 0
    # A level can take far longer than the time left: its pieces stop at the deadline too.
    deadline = time.time() + seconds - (time.perf_counter() - start)
    cut = False
    while frontier and level < depth and time.perf_counter() - start < seconds:
        pieces = max(1, min(len(frontier), executor.workers * 4))
        size = math.ceil(len(frontier) / pieces)
        futures = [executor.submit(expand_slice, job, frontier[i:i + size], deadline)
                   for i in range(0, len(frontier), size)]
        nxt: list[tuple[Action, ...]] = []
        for f in futures:
            s = f.result()
            cut = cut or s.cut
            res.transitions += s.transitions
            res.per_action.update(s.per_action)
            if s.found is not None and (res.found is None
                                        or len(s.found.path) < len(res.found.path)):
                res.found = s.found
            for path, h in s.children:
                if h not in seen:
                    seen.add(h)
                    nxt.append(path)
        if cut:  # the level is unfinished: res.depth counts the levels done
            break
        level += 1
        res.depth = level
        if res.found is not None:
            break
        frontier = nxt
    res.complete = res.found is None and not cut and (not frontier or level >= depth) and (
        time.perf_counter() - start < seconds or not frontier)
    res.states = len(seen)
    return res


# -- shrinking -----------------------------------------------------------------------------------


def first_violation(job: Job, path: Sequence[Action], invariant: str) -> int | None:
    """The number of steps after which ``path`` first violates an invariant, if ``invariant``
    is among those violated then; None otherwise (or if a step is illegal)."""
    w = job.world()
    if any(v.invariant == invariant for v in w.check()):
        return 0
    for n, a in enumerate(path, 1):
        try:
            r = w.step(a)
        except StepError:
            return None
        if r.violations:
            return n if any(v.invariant == invariant for v in r.violations) else None
    return None


def shrink(job: Job, path: Sequence[Action], invariant: str) -> tuple[Action, ...]:
    """A path from which no step, no run of steps and (for paths of up to `PAIR_SHRINK_MAX`
    steps) no pair of steps can be removed that still violates ``invariant`` (delta
    debugging, then windows of every width, then pairs, each to a fixed point)."""
    n = first_violation(job, path, invariant)
    if n is None:
        raise ValueError(f"the path does not violate {invariant}")
    cur = list(path[:n])
    granularity = 2
    while len(cur) >= 2:
        chunk = math.ceil(len(cur) / granularity)
        for i in range(0, len(cur), chunk):
            cand = cur[:i] + cur[i + chunk:]
            m = first_violation(job, cand, invariant)
            if m is not None:
                cur = cand[:m]
                granularity = max(granularity - 1, 2)
                break
        else:
            if granularity >= len(cur):
                break
            granularity = min(len(cur), granularity * 2)
    while True:
        cur = _shrink_windows(job, cur, invariant)
        pair = _shrink_pair(job, cur, invariant) if len(cur) <= PAIR_SHRINK_MAX else None
        if pair is None:
            return tuple(cur)
        cur = pair


def _shrink_windows(job: Job, cur: list[Action], invariant: str) -> list[Action]:
    """Windows of every width, widest first (steps that only make sense together, such as a
    KVM_RUN begun and finished, go away in one piece), down to single steps."""
    width = len(cur) - 1
    while width >= 1:
        for i in range(len(cur) - width + 1):
            cand = cur[:i] + cur[i + width:]
            m = first_violation(job, cand, invariant)
            if m is not None:
                cur = cand[:m]
                width = min(width, len(cur) - 1)
                break
        else:
            width -= 1
    return cur


def _shrink_pair(job: Job, cur: list[Action], invariant: str) -> list[Action] | None:
    """``cur`` without the first pair of non-adjacent steps whose removal keeps the violation
    (steps legal only together: a ptrace stop and its continue, each needed by the other),
    or None."""
    for i in range(len(cur) - 1):
        for j in range(i + 2, len(cur)):
            cand = cur[:i] + cur[i + 1:j] + cur[j + 1:]
            m = first_violation(job, cand, invariant)
            if m is not None:
                return cand[:m]
    return None


#: The longest shrunk path whose non-adjacent pairs of steps `shrink` tries to remove.
PAIR_SHRINK_MAX = 24


def counterexample(job: Job, path: Sequence[Action], found: Found) -> Scenario:
    """The scenario of a (shrunk) violating path, in the scenario format."""
    design = f"variant {job.variant}" if job.variant else "the kernel's design"
    return Scenario(
        name=f"counterexample: {found.invariant} under {design}",
        model=job.model, config=dict(job.config),
        steps=tuple(Step(a) for a in path),
        variants={job.variant: found.invariant} if job.variant else {},
        description=f"Found by fpstate explore and shrunk to {len(path)} steps: "
                    f"{found.detail}\n")


__all__ = ["DEFAULT_CONFIGS", "Found", "Job", "Result", "counterexample", "default_config",
           "explore", "first_violation", "random_slice", "shrink"]
