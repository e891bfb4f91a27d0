"""The checker's memo by state key (fpstate.check.world: World.checked, enabled_actions) is
sound: along random walks, every state whose checks the memo skips really is clean, every
memoised list of enabled actions is the list `enabled` computes afresh, and a seeded
variant's violation is still reported at the same step as without the memo."""

from __future__ import annotations

import random
from typing import Any

import pytest

from fpstate.check import world
from fpstate.check.explore import Job, default_config
from fpstate.check.keysound import random_steps


def _walks(job: Job, seeds: range, steps: int) -> list[list[tuple[Any, ...]]]:
    """Per walk, per step: the enabled actions, the action taken and the invariants its step
    violated."""
    out = []
    for seed in seeds:
        rng = random.Random(seed)
        w = job.world()
        trace: list[tuple[Any, ...]] = []
        # ends where nothing is enabled (every task killed), as the explorer's walks do
        for acts, a, r in random_steps(w, rng, steps, swarm={}):
            got = tuple(v.invariant for v in r.violations)
            trace.append((tuple(acts), a, got))
            if got:
                break
        out.append(trace)
    return out


@pytest.mark.parametrize(("model", "variant", "shows"), [
    ("x86", None, False), ("x86", "kvm-save-min-size", False),
    ("x86", "pasid-write-incoherent", True), ("x86", "guest-only-in-host-fpstate", True),
    ("arm64", None, False), ("arm64", "fpmr-ungated", True)])
def test_memoised_checks_and_enabled_actions_equal_fresh_ones(model: str, variant: str | None,
                                                               shows: bool) -> None:
    job = Job(model, default_config(model), variant)
    # Twice with memos (the second run meets the states of the first again), once without;
    # 60 walks, within which pasid-write-incoherent's flaw shows (in 3 of them).
    with_memo = _walks(job, range(60), 40)
    again = _walks(job, range(60), 40)
    with world.no_memos():
        fresh = _walks(job, range(60), 40)
    assert with_memo == fresh
    assert again == fresh
    w = job.world()
    if variant is None and type(w).MEMO:
        memo = w.memo()
        assert memo.clean and memo.enabled and memo.successors
    # Violations are compared too, where the design's flaw shows within these walks.
    assert any(t and t[-1][2] for t in fresh) == shows


@pytest.mark.parametrize("change", ["freed", "size", "user_size", "xfeatures", "user_xfeatures",
                                    "xfd", "is_guest", "allocation", "xstate_bv", "xcomp_bv",
                                    "perm", "guest_perm"])
def test_buffer_shapes_hold_every_field_the_buffer_predicates_read(change: str) -> None:
    """fps_shapes (the memo of the buffer predicates) changes with each field they read."""
    from fpstate.check.invariants_x86 import fps_shapes

    w = Job("x86", default_config("x86")).world()
    before = fps_shapes(w)
    t = w.task("p0.t1")
    fps = t.fpu.fpstate
    if change == "allocation":
        fps.regs += bytes(64)
    elif change in ("xstate_bv", "xcomp_bv"):
        setattr(fps, change, getattr(fps, change) ^ (1 << 5))
    elif change in ("perm", "guest_perm"):
        getattr(t.process.leader.fpu, change).state_perm ^= 1 << 18
    elif change in ("freed", "is_guest"):
        setattr(fps, change, not getattr(fps, change))
    else:
        setattr(fps, change, getattr(fps, change) ^ 64)
    w.steps += 1  # a new state (the shapes are computed once per state)
    assert fps_shapes(w) != before


def test_the_key_holds_the_permissions_of_a_dead_group_leader() -> None:
    """The group's permissions live in its leader's fpu, also after the leader exited
    (ARCH_REQ_XCOMP_PERM by another thread still changes them): states that differ there
    do not behave alike (an AMX write is enabled or not), so their keys differ."""
    from fpstate.check.world import Action

    A = Action.of
    w = Job("x86", default_config("x86")).world()
    for a in (A("run", task="p0.t0", cpu=0), A("exit", task="p0.t0"),
              A("run", task="p0.t1", cpu=1)):
        w.step(a)
    before = w.key()
    r = w.step(A("arch_prctl", task="p0.t1", option="req_perm", feature=18))
    assert r.observed["ret"] == 0
    assert w.task("p0.t1").process.leader.fpu.perm.state_perm & (1 << 18)
    assert w.key() != before


def test_a_process_keeps_the_memos_of_a_few_worlds_only() -> None:
    """A campaign worker runs many cells: memos of older (model, configuration, variant)
    triples are dropped rather than kept for the life of the process."""
    from fpstate.check.world import _MEMOS, MEMO_WORLDS

    for n in range(MEMO_WORLDS + 3):
        w = Job("x86", dict(default_config("x86"), max_tasks=10 + n)).world()
        w.memo()
        assert len(_MEMOS) <= MEMO_WORLDS
    assert w.memo_name() in _MEMOS


def test_an_identity_memo_holds_while_its_witness_does() -> None:
    from fpstate.check.memo import IdentityMemo

    memo = IdentityMemo(2)
    buf = bytearray(b"abc")
    assert memo.get(buf, (buf,)) is None
    memo.put(buf, (bytes(buf),), "decoded")
    assert memo.get(buf, (buf,)) == "decoded"  # the snapshot still equals the buffer
    buf[0] = 0x7A
    assert memo.get(buf, (buf,)) is None  # changed in place: the witness no longer holds
    other, third = bytearray(b"x"), bytearray(b"y")
    memo.put(other, (), 1)
    memo.put(third, (), 2)  # the limit of 2 entries was reached: cleared first
    assert memo.get(buf, (b"zbc",)) is None and memo.get(third, ()) == 2
