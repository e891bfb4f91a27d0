"""Is the state key sound? Equal keys must name states that behave alike.

The explorer's memos rest on that promise (fpstate.check.world): a state whose key was checked
clean is not checked again, its enabled actions are those of the first state of that key, and
an action taken again from a known key is assumed to lead to the same successor key. A field
of the model that changes behaviour but is missing from the key breaks all three, silently:
states go unchecked and walks take actions meant for another state.

`bisimulate` tests the promise the way a model author needs it tested, without naming fields:
random walks (no memos) record the first history that reached each key; when another history
reaches a key already seen, both are replayed into fresh worlds and driven by the same random
actions for a few steps. At every step the two must have the same enabled actions, both accept
or both refuse the action, report the same violations and the same observed values, and reach
equal keys again. The first difference is a `Mismatch`, with both histories to replay it.

`audit` tests it where the explorer relies on it: walks with the memos on, every memo answer
recomputed (`fpstate.check.world.audited_memos`). The explorer's tests run each variant's
search and shrinking audited: shrinking replays many paths that share prefixes, where equal
keys of unequal states show (a signal frame's x87 bytes outside its XSTATE_BV did, as a
shrunk counterexample that passed as clean).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from fpstate.check.world import (
    Action,
    MemoAudit,
    StepError,
    StepResult,
    World,
    audited_memos,
    no_memos,
)


def random_steps(w: World, rng: random.Random, length: int,
                 enabled: Callable[[World], list[Action]] | None = None,
                 swarm: dict[str, bool] | None = None,
                 ) -> Iterator[tuple[list[Action], Action, StepResult]]:
    """Up to ``length`` steps of ``w`` chosen as the explorer chooses them (`_pick` among
    ``enabled(w)``, with ``swarm`` kept across picks, or a fresh one for each pick when
    None): (the enabled actions, the action, its result) per step taken. ``enabled``
    defaults to the world's memoised `enabled_actions`. Ends when nothing is enabled or a
    step is illegal (skipped instead in a world that rolls an illegal step back); the caller
    ends it at a violation if it wants to."""
    from fpstate.check.explore import _pick  # the explorer's own choice of steps

    a = None
    for _ in range(length):
        acts = w.enabled_actions() if enabled is None else enabled(w)
        if not acts:
            return
        a = _pick(rng, acts, a, {} if swarm is None else swarm)
        try:
            r = w.step(a)
        except StepError:
            if w.rollback_on_illegal:
                continue
            return
        yield acts, a, r


@dataclass(frozen=True, slots=True)
class Mismatch:
    """Two histories that reach equal keys and then behave differently."""

    kind: str  #: "enabled", "refused", "violations", "observed" or "key"
    first: tuple[Action, ...]
    second: tuple[Action, ...]
    then: tuple[Action, ...]  #: the actions taken from both, the last one where they differ
    detail: str

    def __str__(self) -> str:
        return (f"{self.kind} after {', '.join(map(str, self.then)) or 'no action'}: "
                f"{self.detail}\n  first:  {', '.join(map(str, self.first))}\n"
                f"  second: {', '.join(map(str, self.second))}")


def bisimulate(initial: World, walks: int, seed: int = 0, walk_length: int = 60,
               depth: int = 6, share: float = 0.2, limit: int = 5) -> tuple[int, list[Mismatch]]:
    """(pairs compared, the first ``limit`` mismatches) of ``walks`` random walks from
    ``initial`` (never stepped: it is cloned), comparing a ``share`` of the states reached
    again by another history (see the module docstring)."""
    rng = random.Random(seed)
    first: dict[object, tuple[Action, ...]] = {}
    found: list[Mismatch] = []
    pairs = 0
    with no_memos():
        for _ in range(walks):
            w = initial.clone()
            for _acts, _a, r in random_steps(w, rng, walk_length, lambda v: v.enabled()):
                if r.violations:
                    break
                k = w.key()
                h = tuple(w.history)
                f = first.setdefault(k, h)
                if f == h or rng.random() >= share:
                    continue
                pairs += 1
                m = _compare(initial, f, h, rng, depth)
                if m is not None:
                    found.append(m)
                    if len(found) >= limit:
                        return pairs, found
    return pairs, found


def audit(initial: World, walks: int, seed: int = 0, walk_length: int = 60,
          limit: int = 5) -> tuple[int, list[MemoAudit]]:
    """(steps taken, the first ``limit`` contradictions) of ``walks`` random walks from
    ``initial`` (cloned, never stepped) with the memos on, every memo answer recomputed
    (`fpstate.check.world.audited_memos`): a state the clean-state memo would skip that
    violates, enabled actions or a successor key that differ from those of the first state
    of its key. Where `bisimulate` drives a share of equal-key pairs a few steps on, this
    checks every answer the explorer would have taken on trust, with the history that filled
    the memo and the one that read it. A walk ends at a violation, as the explorer's do."""
    rng = random.Random(seed)
    steps = 0
    with audited_memos() as found:
        for _ in range(walks):
            w = initial.clone()
            for _acts, _a, r in random_steps(w, rng, walk_length):
                steps += 1
                if len(found) >= limit:
                    return steps, found[:limit]
                if r.violations:
                    break
        return steps, found[:limit]


#: A value's generation in what an action observed ("other#17": the 17th value "other" wrote).
_GENERATION = re.compile(r"([\w.]+)#(\d+)")


def _canonical(observed: Any, names: dict[str, int]) -> dict[str, Any]:
    """``observed`` with each generation replaced by its rank of first appearance in this
    comparison (``names``): keys canonicalise generations the same way, so two states of equal
    keys may name the same pattern of values with other numbers."""
    def rank(m: re.Match[str]) -> str:
        return f"{m.group(1)}#{names.setdefault(m.group(0), len(names))}"

    return {k: _GENERATION.sub(rank, v) if isinstance(v, str) else v
            for k, v in observed.items()}


def _replay(initial: World, history: tuple[Action, ...]) -> World:
    w = initial.clone()
    for a in history:
        w.step(a)
    return w


def _compare(initial: World, f: tuple[Action, ...], h: tuple[Action, ...],
             rng: random.Random, depth: int) -> Mismatch | None:
    from fpstate.check.explore import _pick

    x, y = _replay(initial, f), _replay(initial, h)
    names_x: dict[str, int] = {}
    names_y: dict[str, int] = {}
    then: list[Action] = []
    b = None
    for _ in range(depth + 1):
        ex, ey = x.enabled(), y.enabled()
        if set(ex) != set(ey):  # the order may follow the history (dict insertion)
            diff = sorted(map(str, set(ex) ^ set(ey)))
            return Mismatch("enabled", f, h, tuple(then), f"only one enables {diff[:4]}")
        if not ex or len(then) == depth:
            return None
        b = _pick(rng, ex, b, {})
        then.append(b)
        rx = ry = None
        try:
            rx = x.step(b)
        except StepError as e:
            ex_err = str(e)
        try:
            ry = y.step(b)
        except StepError as e:
            ey_err = str(e)
        if rx is None or ry is None:
            if (rx is None) != (ry is None):
                why = ex_err if rx is None else ey_err
                return Mismatch("refused", f, h, tuple(then), f"only one refuses: {why}")
            return None
        vx = [v.invariant for v in rx.violations]
        vy = [v.invariant for v in ry.violations]
        if vx != vy:
            return Mismatch("violations", f, h, tuple(then), f"{vx} against {vy}")
        ox, oy = _canonical(rx.observed, names_x), _canonical(ry.observed, names_y)
        if ox != oy:
            return Mismatch("observed", f, h, tuple(then),
                            f"{dict(rx.observed)} against {dict(ry.observed)}")
        if vx:
            return None
        if x.key() != y.key():
            return Mismatch("key", f, h, tuple(then), "the keys differ after the same action")
    return None


__all__ = ["Mismatch", "bisimulate"]
