"""The explorer: nothing under the kernel's design, every variant found, minimal shrinking,
exhaustive search with state hashing, canonical keys, the executor interface."""

from __future__ import annotations

import pytest

from fpstate.check import variants as vreg
from fpstate.check.executor import Executor, LocalExecutor, SerialExecutor, local
from fpstate.check.explore import (
    Job,
    default_config,
    expand_slice,
    explore,
    first_violation,
    random_slice,
    shrink,
)
from fpstate.check.scenario import make_world
from fpstate.check.world import Action, audited_memos

A = Action.of
SERIAL = SerialExecutor()
#: One process, no VM; Linux 6.18 with the proposed fixes of its suspend/resume bugs and of
#: its stale MXCSR in UABI buffers, as in the default configuration (without them a walk
#: finds pkru-lost-on-resume in two steps).
SMALL = {"cpu": "sapphire-rapids", "cpus": 2, "processes": {"p0": 1}, "vms": {},
         "fixes": ["resume_pkru", "resume_xfd_set_state", "mxcsr_by_format",
                   "mxcsr_flip_inits_xmm"]}


@pytest.mark.parametrize("model", ["x86", "arm64"])
def test_the_kernels_design_survives_a_short_random_run(model: str) -> None:
    res = explore(Job(model, default_config(model)), SERIAL, seconds=3.0, seed=7)
    assert res.found is None, res.found
    assert res.transitions > 100 and res.states > 50
    assert res.per_action["run"] > 0


def test_arm64_walks_take_signals_and_sme_instructions() -> None:
    """The arm64 explorer's vocabulary on an SME2 CPU: every EL0 SME instruction, a signal
    while in user mode (at most two frames) and rt_sigreturn while a frame is there."""
    w = make_world("arm64", {"cpus": 1, "vms": {}}, None)
    w.step(A("run", task="other", cpu=0))
    ops = {a.get("op") for a in w.enabled() if a.name == "user_op" and a.task == "other"}
    assert {"smstart_sm", "smstart_za", "smstop", "za_write", "zt0_read", "tpidr2_write"} <= ops
    names = [a.name for a in w.enabled() if a.task == "other"]
    assert "signal" in names and "sigreturn" not in names
    # prctl(PR_{SVE,SME}_SET_VL) to every other VL the CPU implements (FVP: 16, 32, 64).
    vls = {(a.get("kind"), a.get("vl")) for a in w.enabled() if a.name == "set_vl"}
    t = w.kw.host.task("other")
    assert vls == {(k, v) for k in ("SVE", "SME") for v in (16, 32, 64)} - {
        ("SVE", t.sve_vl), ("SME", t.sme_vl)}
    for _ in range(2):
        w.step(A("signal", task="other"))
    names = [a.name for a in w.enabled() if a.task == "other"]
    assert "signal" not in names and "sigreturn" in names
    res = explore(Job("arm64", default_config("arm64")), SERIAL, seconds=2.0, seed=3)
    assert res.per_action["signal"] > 0 and res.per_action["sigreturn"] > 0
    assert res.per_action["clone"] > 0 and res.per_action["set_vl"] > 0


FINDABLE = [v.name for v in vreg.VARIANTS if v.explorer_finds]


@pytest.mark.parametrize("name", FINDABLE)
def test_each_variant_is_found_and_shrunk_to_a_minimal_scenario(name: str) -> None:
    """Found, shrunk to a path no step of which can go, with every memo answer of the run
    recomputed: shrinking replays many paths that share prefixes, the best place for equal
    keys of unequal states to show (a signal frame's x87 bytes outside its XSTATE_BV did)."""
    v = vreg.get(name)
    job = Job(v.model, {**default_config(v.model), **v.config}, name)
    with audited_memos() as contradicted:
        res = explore(job, SERIAL, mode=v.mode, depth=v.depth, seconds=60.0, seed=0)
        assert res.found is not None, f"{name} not found in {res.transitions} transitions"
        assert v.found_by(res.found.invariants)
        path = shrink(job, res.found.path, res.found.invariant)
        assert first_violation(job, path, res.found.invariant) == len(path)
        for i in range(len(path)):  # no step can be removed
            assert first_violation(job, path[:i] + path[i + 1:], res.found.invariant) is None
    assert not contradicted, contradicted[:2]


def test_the_seed_000_counterexample_is_the_thread_s_sequence() -> None:
    job = Job("x86", default_config("x86"), "kvm-save-min-size")
    res = explore(job, SERIAL, seconds=60.0, seed=0)
    assert res.found is not None
    path = shrink(job, res.found.path, res.found.invariant)
    names = [a.name for a in path]
    # get_amx_permission(); use_amx() -> #NM -> alloc_larger_state(); KVM_RUN (or any ioctl
    # that loads the guest FPU) -> kvm_save_current_fpu(): in this order, nothing else but
    # getting the VMM's threads onto a CPU. The permission is the process's: the walk may
    # ask for it in another thread of the VMM's process, one it cloned (seed 0 does, since
    # the walks could make an exec sleep and a CPU cycle through hotplug).
    perm = names.index("arch_prctl")
    # use_amx(): a write, or a write_nm whose sleeping #NM handler then returns (nm_return).
    amx = next(n for n, a in enumerate(names) if a in ("write", "write_nm"))
    assert path[perm].get("option") == "req_perm" and path[amx].get("component") == "xtiledata"
    assert perm < amx < len(path) - 1
    assert names[-1] in ("kvm_run", "kvm_enter", "set_cet_msr")  # kvm_load_guest_fpu()
    assert set(names[:perm]) <= {"run", "switch_in", "return_to_user", "clone"}
    vmm = path[-1].task
    assert path[amx].task == vmm and path[perm].task.split(".")[0] == vmm.split(".")[0]


def test_exhaustive_mode_finds_the_shortest_counterexample() -> None:
    job = Job("x86", dict(SMALL, cpus=1), "pasid-write-incoherent")
    res = explore(job, SERIAL, mode="exhaustive", seconds=120.0, depth=4)
    assert res.found is not None and res.found.invariant == "valid-registers-match-memory"
    assert len(res.found.path) == 4  # run, idle, switch_in, pasid_write is the shortest
    assert [a.name for a in res.found.path][-1] == "pasid_write"


def test_exhaustive_mode_without_violation_reports_complete_coverage() -> None:
    job = Job("x86", SMALL)
    res = explore(job, SERIAL, mode="exhaustive", seconds=120.0, depth=2)
    assert res.found is None and res.complete and res.depth == 2
    assert res.states > 10 and res.transitions >= res.states - 1


def test_an_expansion_past_its_deadline_stops_and_says_so() -> None:
    import time

    job = Job("x86", SMALL)
    done = expand_slice(job, [(), (A("run", task="p0.t0", cpu=0),)])
    assert not done.cut and done.transitions > 0 and done.children
    late = expand_slice(job, [(), (A("run", task="p0.t0", cpu=0),)], time.time() - 1)
    assert late.cut and late.transitions == 0 and late.children == []


class _LateFromLevel(SerialExecutor):
    """Runs the pieces of the first ``levels`` levels in time, later ones past the deadline."""

    def __init__(self, levels: int) -> None:
        self.levels, self.level, self.last = levels, 0, None

    def submit(self, fn, *args):  # type: ignore[no-untyped-def]
        job, paths, deadline = args
        depth = len(paths[0])
        if depth != self.last:
            self.last, self.level = depth, self.level + 1
        return super().submit(fn, job, paths, deadline if self.level <= self.levels else 0.0)


def test_exhaustive_mode_stops_inside_a_level_at_its_time_limit() -> None:
    """A level can take far longer than the time left: its pieces stop at the deadline, and
    the result counts only the levels finished and does not claim completeness."""
    res = explore(Job("x86", SMALL), _LateFromLevel(2), mode="exhaustive", seconds=600.0,
                  depth=6)
    assert res.found is None and not res.complete
    assert res.depth == 2
    full = explore(Job("x86", SMALL), SERIAL, mode="exhaustive", seconds=600.0, depth=2)
    assert full.complete and full.depth == 2 and res.states == full.states


def test_canonical_keys_ignore_generation_numbers_only() -> None:
    a = make_world("x86", SMALL, None)
    b = make_world("x86", SMALL, None)
    for w, writes in ((a, 2), (b, 1)):
        w.step(A("run", task="p0.t0", cpu=0))
        for _ in range(writes):
            w.step(A("write", task="p0.t0", component="avx"))
    assert a.key() == b.key()  # the same state, only the token's generation differs
    b.step(A("write", task="p0.t0", component="sse"))
    assert a.key() != b.key()
    assert hash(a.clone().key()) == hash(a.key())


def test_random_slices_are_reproducible_from_their_seed() -> None:
    job = Job("x86", SMALL, "pasid-write-incoherent")
    one = random_slice(job, 11, 30.0, 30)
    two = random_slice(job, 11, 30.0, 30)
    assert one.found is not None and one.found.path == two.found.path


def test_executors_satisfy_the_protocol() -> None:
    assert isinstance(SERIAL, Executor)
    ex = LocalExecutor(2)
    try:
        assert isinstance(ex, Executor) and ex.workers == 2
        assert ex.submit(pow, 3, 4).result() == 81
    finally:
        ex.close()
    assert isinstance(local(1), SerialExecutor)
    f = SERIAL.submit(int, "x")
    with pytest.raises(ValueError):
        f.result()


_KEY_OF_A_SIGNAL_FRAME = """
import hashlib
from fpstate.check.scenario import make_world
from fpstate.check.world import Action
A = Action.of
w = make_world("x86", {"cpu": "sapphire-rapids", "cpus": 2, "processes": {"p0": 1},
                       "vms": {}}, None)
for a in (A("run", task="p0.t0", cpu=0), A("write", task="p0.t0", component="avx"),
          A("sigaction", task="p0.t0", onstack=False), A("signal", task="p0.t0")):
    w.step(a)
assert w.frames["p0.t0"], "no signal frame to key"
print(hashlib.blake2b(repr(w.key()).encode()).hexdigest())
"""


def test_state_keys_name_signal_frames_alike_in_every_process() -> None:
    """Worker processes have differently salted hash(): a key holding hash(frame bytes)
    would name the same state differently in each."""
    import os
    import subprocess
    import sys

    got = {subprocess.run([sys.executable, "-c", _KEY_OF_A_SIGNAL_FRAME], check=True,
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONHASHSEED": seed}).stdout
           for seed in ("1", "2")}
    assert len(got) == 1, got


def test_shrink_removes_a_pair_of_steps_that_only_go_together() -> None:
    """A ptrace stop and its continue are each needed by the other (a continue of a task that
    is not stopped is refused; a stopped task cannot run), so no window of steps holds both
    and the window pass keeps them; the pair pass removes them together."""
    job = Job("x86", default_config("x86"), "kvm-save-min-size")
    path = (A("ptrace_stop", task="p1.t0"), A("run", cpu=0, task="p1.t1"),
            A("arch_prctl", feature=18, option="req_perm", task="p1.t1"),
            A("ptrace_cont", task="p1.t0"), A("run", cpu=0, task="p1.t0"),
            A("write_nm", component="xtiledata", task="p1.t0"), A("nm_return", task="p1.t0"),
            A("kvm_run", guest="xsetbv; write avx", task="p1.t0", vcpu="vm0.v0"))
    assert first_violation(job, path, "save-within-allocation") == len(path)
    assert shrink(job, path, "save-within-allocation") == path[1:3] + path[4:]
