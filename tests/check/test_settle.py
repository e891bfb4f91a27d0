"""The explorer's garbage-collector policy (fpstate.check.memo.settle), in fresh processes:
the policy is process-wide, so it acts only in processes fpstate owns, and what it freezes
must not keep the worlds of finished walks alive."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import gc, sys, weakref
    from fpstate.check import memo
    from fpstate.check.actions_x86 import X86World
    from fpstate.check.explore import Job, default_config, random_slice

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
    s = random_slice(Job("x86", default_config("x86")), 3, 1.0, 20)
    gc.collect()
    alive = sum(r() is not None for r in clones)
    print(s.walks, len(clones), alive, gc.get_freeze_count())
""")


def _run(mode: str) -> tuple[int, int, int, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                         check=True).stdout.split()
    walks, clones, alive, frozen = map(int, out)
    return walks, clones, alive, frozen


def test_settle_freezes_survivors_and_no_walk_world_in_fpstate_processes() -> None:
    walks, clones, alive, frozen = _run("own")
    assert walks >= 3 and clones >= walks
    assert frozen > 0  # the memos and the initial world went to the permanent generation
    # Every world a walk cloned was collected: none was frozen while it was alive.
    assert alive == 0


def test_settle_leaves_a_library_callers_collector_alone() -> None:
    walks, _clones, alive, frozen = _run("library")
    assert walks >= 3
    assert frozen == 0
    assert alive == 0
