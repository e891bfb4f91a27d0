"""Partitioned bounded-exhaustive search: the same states, transitions and violations whatever
the number of partitions, and the same as the checker's own single-process explorer."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fpstate.campaign.partition import (
    CellJob,
    InlinePool,
    Partition,
    Spill,
    explore_exhaustive,
    owner,
    path_order,
    state_digest,
)
from fpstate.check.executor import SerialExecutor
from fpstate.check.explore import Job, explore
from fpstate.check.world import Action

CFG = {"cpu": "sapphire-rapids", "kernel": "6.18", "cpus": 1, "processes": {"p0": 1},
       "fixes": ["resume_pkru", "resume_xfd_set_state", "mxcsr_by_format",
                 "mxcsr_flip_inits_xmm"],
       "vms": {"vm0": {"vmm": "p0.t0", "vcpus": 1}}}


def facts(r):
    return (r.states, r.levels, r.tally.transitions, r.tally.illegal,
            sorted(r.tally.per_action.items()),
            {k: (n, f.path, f.invariants) for k, (n, f) in r.tally.violations.items()},
            r.complete, r.stopped_by)


@pytest.mark.parametrize("variant", [None, "pasid-write-incoherent"])
def test_partitions_visit_the_same_states_as_one(variant: str | None) -> None:
    cj = CellJob(Job("x86", CFG, variant))
    one = explore_exhaustive(cj, InlinePool(cj, 1), 2)
    three = explore_exhaustive(cj, InlinePool(cj, 3), 2)
    assert facts(one) == facts(three)
    assert one.messages == 0 and three.messages > 0
    assert one.levels[0] == 1 and len(one.levels) == 3 and one.complete


def test_same_as_the_checkers_explorer() -> None:
    """The kernel's design to depth 3: fpstate.check.explore (one process, its own BFS, which
    stops after the level of its first violation) counts the same states and transitions."""
    job = Job("x86", CFG, None)
    ours = explore_exhaustive(CellJob(job), InlinePool(CellJob(job), 2), 3,
                              stop="first-violation")
    theirs = explore(job, SerialExecutor(), mode="exhaustive", depth=3, seconds=600)
    assert (ours.states, ours.tally.transitions) == (theirs.states, theirs.transitions)
    assert ours.tally.per_action == theirs.per_action
    assert ours.states > 20
    if theirs.found is None:
        assert ours.complete and not ours.tally.violations
    else:  # both stop after the level whose expansion found it
        assert theirs.found.invariant in ours.tally.violations
        assert len(ours.tally.violations[theirs.found.invariant][1].path) == \
            len(theirs.found.path)


def test_first_violation_stops_after_its_level_like_the_checker() -> None:
    job = Job("x86", CFG, "pasid-write-incoherent")
    ours = explore_exhaustive(CellJob(job), InlinePool(CellJob(job), 2), 3,
                              stop="first-violation")
    theirs = explore(job, SerialExecutor(), mode="exhaustive", depth=3, seconds=600)
    assert ours.stopped_by == "first-violation" and not ours.complete
    assert (ours.states, ours.tally.transitions) == (theirs.states, theirs.transitions)
    count, found = ours.tally.violations["valid-registers-match-memory"]
    assert count == 1 and found.path == theirs.found.path
    # Seed 004: the task's registers are a cached copy (TIF_NEED_FPU_LOAD set) when the
    # kernel writes IA32_PASID; two actions reach it.
    assert [a.name for a in found.path][-1] == "pasid_write" and len(found.path) == 2


def test_state_budget_cuts_at_a_level_boundary() -> None:
    cj = CellJob(Job("x86", CFG, None))
    full2 = explore_exhaustive(cj, InlinePool(cj, 2), 2)
    assert full2.levels[0] + full2.levels[1] < 10 <= full2.states
    # Level 2 brings the count past 10: it is visited, not expanded -- a search to depth 2.
    r = explore_exhaustive(cj, InlinePool(cj, 3), 5, max_states=10)
    assert r.stopped_by == "states" and not r.complete and r.depth == 2
    assert facts(r)[:5] == facts(full2)[:5]


def test_action_filter_limits_the_graph() -> None:
    cj = CellJob(Job("x86", CFG, None), frozenset({"run", "idle"}))
    r = explore_exhaustive(cj, InlinePool(cj, 1), 4)
    assert set(r.tally.per_action) <= {"run", "idle"}
    assert r.stopped_by == "fixpoint" and r.complete
    # p0.t0 runnable, then running on CPU 0, then idle again (the same as boot, but with
    # its registers cached on CPU 0): a handful of states, exhausted before the bound.
    assert r.states < 10


def test_a_restarted_partition_recomputes_the_same_round() -> None:
    cj = CellJob(Job("x86", CFG, None))
    p = Partition(cj, 0, 1)
    d0 = state_digest(cj.job.world())
    st0 = p.accept(0, [[(d0, ())]])
    out0, _ = p.expand(0)
    st1 = p.accept(1, out0)
    out1, x1 = p.expand(1)
    q = Partition(cj, 0, 1)
    q.restore(st0.accepted)
    assert q.accept(1, out0).accepted == st1.accepted
    again, y1 = q.expand(1)
    assert (again, y1.tally.transitions) == (out1, x1.tally.transitions)


def test_spill_round_trips_digests(tmp_path) -> None:
    s = Spill(tmp_path / "spill", 2)
    s.append(1, [1, 2**127 + 5])
    s.append(1, [7])
    s.append(0, [])
    assert s.read(1) == [1, 2**127 + 5, 7] and s.read(0) == []
    assert s.read(1, 1) == [1, 2**127 + 5] and s.read(1, 0) == []
    mem = Spill(None, 1)
    mem.append(0, [3])
    mem.append(0, [4])
    assert mem.read(0, 1) == [3] and mem.read(0) == [3, 4]
    s.remove()
    assert not (tmp_path / "spill").exists()


def test_representative_order_is_total_and_shortest_first() -> None:
    a = (Action.of("run", task="p0.t0", cpu=0),)
    b = (Action.of("idle", cpu=0), Action.of("run", task="p0.t0", cpu=0))
    c = (Action.of("run", task="p0.t0", cpu=1),)
    assert sorted([b, c, a], key=path_order) == [a, c, b]
    assert owner(2**100 + 3, 2) == 1


def test_digest_is_the_same_in_another_process() -> None:
    """Workers are other processes with another hash() salt: the digest must not move."""
    job = Job("x86", CFG, None)
    w = job.world()
    w.step(Action.of("run", task="p0.t0", cpu=0))
    w.step(Action.of("write", task="p0.t0", component="avx"))
    code = ("from fpstate.check.explore import Job\n"
            "from fpstate.check.world import Action\n"
            "from fpstate.campaign.partition import state_digest\n"
            f"w = Job('x86', {CFG!r}, None).world()\n"
            "w.step(Action.of('run', task='p0.t0', cpu=0))\n"
            "w.step(Action.of('write', task='p0.t0', component='avx'))\n"
            "print(state_digest(w))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"},
                         timeout=120, check=True).stdout
    assert int(out) == state_digest(w)
