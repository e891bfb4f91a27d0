"""Random exploration split by seed: each seed is an independent task, replayable alone.

A seed runs ``walks`` random walks of at most ``walk_length`` actions from the initial state,
with the checker's choice rule (fpstate.check.explore): an action *name* uniformly among the
enabled ones, then one of its instances, so that rare actions are not drowned by numerous
ones. A walk ends at its first violation, at an action the model refuses (unless the model
rolls refused actions back, as the arm64 world does), or when nothing is enabled. Unlike the
checker's time-sliced walks, a seed's work is fixed, so the campaign's result depends only on
its seeds, never on how many workers ran them or in which order: results are merged in seed
order (the union of the visited states, the sum of the counts, the smallest violating path of
each invariant).
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fpstate.campaign.partition import CellJob, Tally, state_digest
from fpstate.check.explore import Found
from fpstate.check.world import Action, StepError


@dataclass(slots=True)
class SeedResult:
    seed: int
    walks: int = 0
    digests: set[int] = field(default_factory=set)
    tally: Tally = field(default_factory=Tally)
    initial_violations: list[Found] = field(default_factory=list)
    seconds: float = 0.0


def pick(rng: random.Random, actions: list[Action]) -> Action:
    """The checker's choice: a name uniformly, then one of its instances."""
    by: dict[str, list[Action]] = defaultdict(list)
    for a in actions:
        by[a.name].append(a)
    return rng.choice(by[rng.choice(sorted(by))])


def random_walks(cell: CellJob, seed: int, walks: int, walk_length: int) -> SeedResult:
    """The walks of one seed (a worker task: module level, picklable arguments)."""
    start = time.perf_counter()
    rng = random.Random(seed)
    out = SeedResult(seed)
    initial = cell.job.world()
    bad = initial.check()
    if bad:
        names = tuple(dict.fromkeys(v.invariant for v in bad))
        out.initial_violations = [Found(v.invariant, v.detail, (), names) for v in bad]
    out.digests.add(state_digest(initial))
    if bad:
        return out
    t = out.tally
    for _ in range(walks):
        w = initial.clone()
        out.walks += 1
        for _ in range(walk_length):
            actions = cell.enabled(w)
            if not actions:
                break
            a = pick(rng, actions)
            try:
                r = w.step(a)
            except StepError:
                t.illegal += 1
                if w.rollback_on_illegal:
                    continue
                break
            except Exception as e:  # a model crash is a finding
                t.error(e, (*w.history, a))
                break
            t.transitions += 1
            t.per_action[a.name] += 1
            if r.violations:
                t.violation(w, r.violations)
                break
            out.digests.add(state_digest(w))
    out.seconds = time.perf_counter() - start
    return out


@dataclass(slots=True)
class RandomResult:
    """The seeds of one cell, merged in seed order."""

    seeds: list[int] = field(default_factory=list)  #: the seeds counted (a budget may cut)
    walks: int = 0
    states: int = 0
    tally: Tally = field(default_factory=Tally)
    initial_violations: list[Found] = field(default_factory=list)
    complete: bool = True  #: every seed of the campaign ran
    #: "seeds" (all ran), "states"/"seconds" (the budget), "initial-violation"
    stopped_by: str = "seeds"
    seconds: float = 0.0
    worker_seconds: float = 0.0


def merge(results: Sequence[SeedResult], max_states: int | None = None) -> RandomResult:
    """Merge seed results in seed order; with ``max_states``, stop after the first seed at
    which the union reaches it (the same cut whoever ran which seed)."""
    out = RandomResult()
    union: set[int] = set()
    for r in sorted(results, key=lambda r: r.seed):
        if r.initial_violations:
            out.initial_violations = r.initial_violations
            out.stopped_by, out.complete = "initial-violation", False
            out.seeds.append(r.seed)
            union |= r.digests
            break
        out.seeds.append(r.seed)
        out.walks += r.walks
        union |= r.digests
        out.tally.add(r.tally)
        out.worker_seconds += r.seconds
        if max_states is not None and len(union) >= max_states:
            out.stopped_by = "states"
            break
    out.states = len(union)
    for f in out.initial_violations:
        out.tally.violations.setdefault(f.invariant, (1, f))
    return out


def explore_random(cell: CellJob, seeds: Sequence[int], walks: int, walk_length: int,
                   run_tasks: Callable[..., list[SeedResult]], *, batch: int,
                   max_states: int | None = None, max_seconds: float | None = None,
                   progress: Callable[[str, dict[str, object]], None] | None = None
                   ) -> RandomResult:
    """Run the seeds ``batch`` at a time through ``run_tasks`` (an engine's), checking the
    budget after each batch."""
    start = time.perf_counter()
    done: list[SeedResult] = []
    union: set[int] = set()
    stopped = ""
    for i in range(0, len(seeds), max(1, batch)):
        chunk = seeds[i:i + max(1, batch)]
        got = run_tasks(random_walks, [(cell, s, walks, walk_length) for s in chunk])
        done.extend(got)
        for r in got:
            union |= r.digests
        if progress is not None:
            progress("seeds", {"done": len(done), "of": len(seeds), "states": len(union),
                               "transitions": sum(r.tally.transitions for r in done),
                               "violations": sum(c for r in done
                                                 for c, _ in r.tally.violations.values()),
                               "seconds": time.perf_counter() - start})
        if any(r.initial_violations for r in got):
            break
        if max_states is not None and len(union) >= max_states:
            stopped = "states"
            break
        if max_seconds is not None and time.perf_counter() - start >= max_seconds:
            stopped = "seconds"
            break
    out = merge(done, max_states)
    if out.stopped_by == "seeds" and len(out.seeds) < len(seeds):
        out.stopped_by = stopped or "states"
    out.complete = out.stopped_by != "initial-violation" and len(out.seeds) == len(seeds)
    out.seconds = time.perf_counter() - start
    return out


__all__ = ["RandomResult", "SeedResult", "explore_random", "merge", "pick", "random_walks"]
