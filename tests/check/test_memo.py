"""The checker's memo by state key (fpstate.check.world: World.checked, enabled_actions) is
sound: along random walks, every state whose checks the memo skips really is clean, every
memoised list of enabled actions is the list `enabled` computes afresh, and a seeded
variant's violation is still reported at the same step as without the memo."""

from __future__ import annotations

import random

import pytest

from fpstate.check import invariants
from fpstate.check.explore import Job, _pick, default_config
from fpstate.check.world import StepError


def _walks(job: Job, seeds: range, steps: int, memo: bool) -> list[tuple[str, ...]]:
    """Per walk: the actions taken and the violations of its last step, the memoised
    answers compared with fresh ones at every step."""
    out = []
    for seed in seeds:
        rng = random.Random(seed)
        w = job.world()
        a = None
        swarm: dict[str, bool] = {}
        trace: list[str] = []
        for _ in range(steps):
            fresh_enabled = w.enabled()
            acts = w.enabled_actions() if memo else fresh_enabled
            assert acts == fresh_enabled, (seed, w.history)
            a = _pick(rng, acts, a, swarm)
            try:
                w.step(a, check=False)
            except StepError:
                if w.rollback_on_illegal:
                    continue
                break
            trace.append(str(a))
            # What the invariants say of this state, computed without touching the world
            # (World.check also forgets the step's emissions).
            fresh = [v.invariant for v in invariants.check(w)]
            got = [v.invariant for v in (w.checked() if memo else w.check())]
            assert got == fresh, (seed, trace)
            if got:
                trace.append("violated " + ",".join(got))
                break
        out.append(tuple(trace))
    return out


@pytest.mark.parametrize(("model", "variant"), [
    ("x86", None), ("x86", "kvm-save-min-size"), ("x86", "pasid-write-incoherent"),
    ("arm64", None), ("arm64", "fpmr-ungated")])
def test_memoised_checks_and_enabled_actions_equal_fresh_ones(model: str,
                                                               variant: str | None) -> None:
    job = Job(model, default_config(model), variant)
    with_memo = _walks(job, range(40), 40, memo=True)
    without = _walks(job, range(40), 40, memo=False)
    assert with_memo == without
    w = job.world()
    if type(w).MEMO:
        clean, by_key = w.memo()
        # The walks revisit states (the initial state's successors at least): the memo was
        # used, not only filled.
        assert clean and by_key

