"""The arm64 state key (fpstate.check.statekey_arm64) is the plain recursive canonical form of
the model's state: its memo, generated per-class readers and skipped roots change nothing.

The reference below walks every dataclass field, FrozenMap entry (sorted by the repr of its
key) and tuple element, turns a written token into ("T", writer) and an architectural one into
("A", value), and ranks each written token's generation among its writer's; the fast key must
equal it, value for value, in every state of random walks on several configurations (SVE and
non-SVE vCPUs, nVHE, an SME host without SVE), and the event key must give an observed token
the rank of the same generation in the state."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest

from fpstate.arm64.regs import Tok
from fpstate.arm64.statemachine import FrozenMap
from fpstate.check.explore import Job, _pick
from fpstate.check.statekey_arm64 import arm64_event_key, arm64_key
from fpstate.check.world import StepError

_SKIP = {"obs", "caps", "config", "profile", "gen"}


def _reference(x: Any, toks: list[tuple[str, int]]) -> Any:
    if isinstance(x, Tok):
        if x.writer:
            toks.append((x.writer, x.gen))
            return ("T", x.writer)
        return ("A", x.gen)
    if isinstance(x, (str, int, float, bool, type(None))):
        return x
    if isinstance(x, FrozenMap):
        return tuple((k, _reference(v, toks)) for k, v in sorted(x.items(),
                                                                  key=lambda kv: repr(kv[0])))
    if isinstance(x, (tuple, list)):
        return tuple(_reference(y, toks) for y in x)
    if isinstance(x, (frozenset, set)):
        return tuple(sorted(map(repr, x)))
    assert dataclasses.is_dataclass(x), type(x)
    return (type(x).__name__, *(_reference(getattr(x, f.name), toks)
                                for f in dataclasses.fields(x) if f.name not in _SKIP))


def reference_key(kw: Any) -> tuple[Any, tuple[int, ...]]:
    toks: list[tuple[str, int]] = []
    struct = _reference(kw, toks)
    gens: dict[str, set[int]] = {}
    for w, g in toks:
        gens.setdefault(w, set()).add(g)
    ranks = {w: {g: n for n, g in enumerate(sorted(v))} for w, v in gens.items()}
    return struct, tuple(ranks[w][g] for w, g in toks)


CONFIGS = {
    "fvp-fpmr": {"cpu": "fvp-aem-fpmr", "cpus": 2, "tasks": ["other"],
                 "vms": {"vm0": {"vcpus": 1}}},
    "v2-sve-nvhe": {"cpu": "neoverse-v2", "cpus": 2, "tasks": ["a", "b"], "vhe": False,
                    "vms": {"vm0": {"vcpus": 2, "sve": True}}},
    "m4-sme": {"cpu": "apple-m4", "cpus": 2, "tasks": ["other"], "vms": {"vm0": {"vcpus": 1}}},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_key_equals_the_plain_recursive_canonical_form(name: str) -> None:
    job = Job("arm64", CONFIGS[name])
    observed_tokens = 0
    for seed in range(12):
        rng = random.Random(seed)
        w = job.world()
        a = None
        swarm: dict[str, bool] = {}
        for _ in range(40):
            a = _pick(rng, w.enabled(), a, swarm)
            try:
                w.step(a, check=False)
            except StepError:
                continue
            struct, ranks = reference_key(w.kw)
            assert w.key() == (struct, ranks), (seed, w.history)
            assert repr(w.key()) == repr((struct, ranks))
            # The event key ranks an observed token as the state ranks that generation.
            toks: list[tuple[str, int]] = []
            _reference(w.kw, toks)
            pos = {t: r for t, r in zip(toks, ranks, strict=True)}
            for o, ev in zip(w.kw.host.obs, arm64_event_key(w.kw), strict=True):
                if isinstance(o.value, Tok) and o.value.writer:
                    observed_tokens += 1
                    assert ev[4] == ("T", o.value.writer, pos.get((o.value.writer,
                                                                   o.value.gen)))
    assert observed_tokens > 0
    assert arm64_key(job.world().kw) == reference_key(job.world().kw)
