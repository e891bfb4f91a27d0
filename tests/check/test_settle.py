"""The explorer's garbage-collector policy (fpstate.check.memo.settle), in fresh processes:
the policy is process-wide, so it acts only in processes fpstate owns, and what it freezes
must not keep the worlds of finished walks alive."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import gc, sys, weakref
    from fpstate.check import memo
    from fpstate.check.actions_x86 import X86World
    from fpstate.check.executor import SerialExecutor
    from fpstate.check.explore import Job, default_config, explore, random_slice

    if sys.argv[1] == "own":
        memo.own_process()
    memo.SETTLE_EVERY = 0.0  # settle after every walk
    clones = []
    clone = X86World.clone
    def recording(self):
        w = clone(self)
        clones.append(weakref.ref(w.m))  # its tasks and processes form cycles
        return w
    X86World.clone = recording
    job = Job("x86", default_config("x86"))
    if sys.argv[2] == "random":
        walks = random_slice(job, 3, 1.0, 20).walks
    elif sys.argv[2] == "exhaustive":  # bounded-exhaustive, its pieces in this process
        walks = explore(job, SerialExecutor(), mode="exhaustive", seconds=2.0, depth=2).states
    else:  # a campaign cell, its partitions in this process
        from fpstate.campaign.partition import CellJob, InlinePool, explore_exhaustive

        cell = CellJob(job)
        walks = explore_exhaustive(cell, InlinePool(cell, 2), 2).states
    gc.collect()  # a world frozen while alive stays, dead or not: the leak tested for
    alive = sum(r() is not None for r in clones)
    print(walks, len(clones), alive, gc.get_freeze_count())
""")


def _run(mode: str, search: str = "random") -> tuple[int, int, int, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode, search], capture_output=True,
                         text=True, check=True).stdout.split()
    walks, clones, alive, frozen = map(int, out)
    return walks, clones, alive, frozen


def test_settle_freezes_survivors_and_no_walk_world_in_fpstate_processes() -> None:
    walks, clones, alive, frozen = _run("own")
    assert walks >= 3 and clones >= walks
    assert frozen > 0  # the memos and the initial world went to the permanent generation
    # Every world a walk cloned was collected: none was frozen while it was alive.
    assert alive == 0


@pytest.mark.parametrize("search", ["exhaustive", "campaign"])
def test_settle_keeps_no_world_of_an_exhaustive_search_run_in_process(search: str) -> None:
    states, clones, alive, _ = _run("own", search)
    assert states > 10 and clones > states
    assert alive == 0


def test_settle_leaves_a_library_callers_collector_alone() -> None:
    walks, _clones, alive, frozen = _run("library")
    assert walks >= 3
    assert frozen == 0
    assert alive == 0


INITIALS = textwrap.dedent("""
    import gc, weakref
    from fpstate.check import memo
    from fpstate.check.explore import INITIAL_WORLDS, Job, default_config, random_slice

    memo.own_process()
    memo.SETTLE_EVERY = 0.0
    machines = []
    for cpus in range(1, INITIAL_WORLDS + 3):  # more jobs than the cache keeps
        job = Job("x86", {**default_config("x86"), "cpus": cpus})
        random_slice(job, cpus, 0.2, 10)  # settles: freezes this job's initial world
        machines.append(weakref.ref(job.initial().m))
    gc.collect()
    print(INITIAL_WORLDS, *[int(r() is not None) for r in machines])
""")


def test_a_worker_keeps_a_bounded_number_of_initial_worlds() -> None:
    """A long-lived worker (a campaign partition, a pool process) serves job after job: it
    keeps the initial worlds of the last few only, and those it drops are freed although
    `settle` froze them."""
    out = subprocess.run([sys.executable, "-c", INITIALS], capture_output=True, text=True,
                         check=True).stdout.split()
    keep, alive = int(out[0]), list(map(int, out[1:]))
    assert len(alive) == keep + 2
    assert alive == [0, 0] + [1] * keep
