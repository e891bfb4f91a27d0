"""Equal state keys name states that behave alike (fpstate.check.keysound), and the fields
whose absence from the key broke that promise are in it: a thread killed inside a kernel path,
the mm that owns a VM after exec, the next mmap address, generations inside signal frames."""

from __future__ import annotations

import pytest

from fpstate.check.explore import Job, default_config
from fpstate.check.keysound import bisimulate
from fpstate.check.scenario import make_world
from fpstate.check.world import Action
from fpstate.kernel.x86.hw import token
from fpstate.kernel.x86.sched import TaskState
from fpstate.kernel.x86.signal import FP_XSTATE_MAGIC2, SC_FPSTATE_OFFSET

A = Action.of


def _steps(*actions: Action, config: dict | None = None):
    w = make_world("x86", config if config is not None else {}, None)
    for a in actions:
        w.step(a)
    return w


_PREEMPTED_IN_RUN = (A("run", task="p1.t0", cpu=0),
                     A("kvm_enter", task="p1.t0", vcpu="vm0.v0", guest="write avx"),
                     A("run", task="p0.t0", cpu=0), A("run", task="p1.t1", cpu=1))


def test_the_kind_of_program_an_exec_asleep_loads_is_named_by_the_key() -> None:
    """Two execs asleep in de_thread() (a sibling switched out in KVM_RUN), one of a 32-bit
    program: once they go on, one process is compat and the other not, so the keys differ."""
    same = _steps(*_PREEMPTED_IN_RUN, A("exec", task="p1.t1"))
    ia32 = _steps(*_PREEMPTED_IN_RUN, A("exec", task="p1.t1", abi="ia32"))
    assert same.key() != ia32.key()
    for w in (same, ia32):
        for a in (A("run", task="p1.t0", cpu=1), A("kvm_finish", task="p1.t0"),
                  A("run", task="p1.t1", cpu=1), A("exec_finish", task="p1.t1")):
            w.step(a)
    assert [w.tasks["p1.t1"].process.compat for w in (same, ia32)] == [False, True]
    assert ia32.tasks["p1.t1"].user_sp < 1 << 32


def test_a_thread_killed_inside_kvm_run_is_named_by_the_key() -> None:
    # p1.t1 exits alone, or dies of SIGILL and takes the group: in both p1.t1 is dead and
    # p1.t0 waits, switched out, inside KVM_RUN -- but only in the second does it exit when
    # it leaves.
    alone = _steps(*_PREEMPTED_IN_RUN, A("exit", task="p1.t1"))
    group = _steps(*_PREEMPTED_IN_RUN, A("write", task="p1.t1", component="xtiledata"))
    assert alone.key() != group.key()
    for w, state in ((alone, TaskState.USER), (group, TaskState.DEAD)):
        w.step(A("run", task="p1.t0", cpu=1))
        w.step(A("kvm_finish", task="p1.t0"))
        assert w.tasks["p1.t0"].state is state


def test_the_mm_that_owns_a_vm_is_named_by_the_key() -> None:
    # p1.t0 made the VM; after its exec the VM belongs to no live mm (KVM ioctls: EIO), where
    # a p1.t0 that only lost its sibling still drives it.
    base = (A("run", task="p1.t0", cpu=0), A("run", task="p1.t1", cpu=1))
    execd = _steps(*base, A("exec", task="p1.t0"))
    exited = _steps(*base, A("exit", task="p1.t1"))
    assert execd.key() != exited.key()
    assert execd.step(A("get_xsave", task="p1.t0", vcpu="vm0.v0")).observed["errno"] == "EIO"


def test_asking_for_permissions_maps_nothing() -> None:
    base = (A("run", task="p0.t0", cpu=0),)
    asked = _steps(*base, A("arch_prctl", task="p0.t0", option="get_perm"))
    plain = _steps(*base)
    assert asked.tasks["p0.t0"].process.next_mmap == plain.tasks["p0.t0"].process.next_mmap
    assert asked.key() == plain.key()


def test_the_next_mmap_address_is_named_by_the_key() -> None:
    # A thread's stack moves every later mapping of its process; the thread may be gone.
    base = (A("run", task="p0.t0", cpu=0),)
    cloned = _steps(*base, A("clone", task="p0.t0", child="p0.c9"), A("run", task="p0.c9",
                                                                       cpu=1),
                    A("exit", task="p0.c9"))
    assert cloned.tasks["p0.t0"].process.next_mmap != _steps(*base).tasks[
        "p0.t0"].process.next_mmap
    plain = _steps(*base, A("fork", task="p0.t0", child="f9.t0"),
                   A("run", task="f9.t0", cpu=1), A("exit", task="f9.t0"))
    assert cloned.key() != plain.key()


def test_signal_frames_of_equal_patterns_have_equal_keys() -> None:
    # Two writes of AVX or one: the values differ in generation only, and so do the frames
    # that save them.
    base = (A("run", task="p0.t0", cpu=0), A("sigaction", task="p0.t0"))
    once = _steps(*base, A("write", task="p0.t0", component="avx"), A("signal", task="p0.t0"))
    twice = _steps(*base, A("write", task="p0.t0", component="avx"),
                   A("write", task="p0.t0", component="avx"), A("signal", task="p0.t0"))
    assert once.key() == twice.key()
    # A frame whose AVX value has another writer is another state.
    other = _steps(*base, A("signal", task="p0.t0"))
    assert other.key() != once.key()


def test_x87_bytes_a_frame_header_leaves_out_are_named_by_the_key() -> None:
    """A frame whose XSTATE_BV the handler cleared for x87 still holds x87 bytes in its
    legacy region, which an fx_only sigreturn (magic1 cleared) loads with FXRSTOR: the frame
    of a task that wrote x87 and that of one that did not must have different keys, and the
    task's x87 after such a sigreturn tells them apart. (Found when the explorer's memo let a
    shrunk counterexample of sigframe-magic2-at-user-size pass as clean.)"""
    start = (A("run", task="p0.t0", cpu=0), A("sigaction", task="p0.t0", onstack=True))
    end = (A("signal", task="p0.t0"), A("frame_clear", task="p0.t0", component="x87"))
    wrote = _steps(*start, A("write", task="p0.t0", component="x87"), *end)
    clean = _steps(*start, *end)
    assert wrote.key() != clean.key()
    for w in (wrote, clean):
        w.step(A("frame_fx_only", task="p0.t0"))
        w.step(A("sigreturn", task="p0.t0"))
    x87 = [w.m.cpus[0].regs.component(0)[32:42] for w in (wrote, clean)]
    assert x87[0] != x87[1] and x87[1] == bytes(10)


def test_an_older_frames_magic2_in_a_layout_hole_is_not_named_by_the_key() -> None:
    """A handler that resizes its frame to x87|SSE|AVX puts MAGIC2 at 832, in the standard
    layout's hole where Sapphire Rapids has no MPX, and that MAGIC2 is in the frame's key.
    After sigreturn a later frame is written at the same address, and no XSAVE writes the
    hole: the old MAGIC2 stays there, read by no sigreturn. Such a frame and one with a clean
    hole must key alike (the memo audit found the pair in session 33)."""
    start = (A("run", task="p0.t0", cpu=0), A("sigaction", task="p0.t0"),
             A("write", task="p0.t0", component="avx"), A("signal", task="p0.t0"))
    resized = _steps(*start)
    before = resized.key()
    resized.step(A("frame_resize", task="p0.t0"))
    (lo, _, _), = resized.frames["p0.t0"]
    mm = resized.tasks["p0.t0"].process.mm
    fp = int.from_bytes(mm.read(lo + SC_FPSTATE_OFFSET, 8), "little")
    magic2 = FP_XSTATE_MAGIC2.to_bytes(4, "little")
    assert mm.read(fp + 832, 4) == magic2 and resized.key() != before
    plain, stale = _steps(*start), _steps(*start)
    mm = stale.tasks["p0.t0"].process.mm
    assert mm.read(fp + 832, 4) != magic2
    mm.write(fp + 832, magic2)  # what the resized frame left on the stack
    assert stale.key() == plain.key()
    mm.write(fp + 576, magic2)  # AVX's bytes are the frame's
    assert stale.key() != plain.key()


def test_the_memo_audit_catches_a_key_that_names_states_alike(monkeypatch) -> None:
    """keysound.audit recomputes every memo answer: with a key that names every state alike,
    the first walks already meet a successor, a set of enabled actions or a clean state that
    the state itself contradicts, each with the history that filled the memo; with the real
    key the same walks meet none."""
    from fpstate.check.actions_x86 import X86World
    from fpstate.check.keysound import audit

    initial = Job("x86", default_config("x86")).initial()
    steps, found = audit(initial, walks=20, seed=3)
    assert steps > 500 and found == []
    monkeypatch.setattr(X86World, "key", lambda self: 0)
    steps, found = audit(initial, walks=20, seed=3)
    assert found and {f.kind for f in found} <= {"successor", "enabled", "clean"}
    assert all(f.second and f.first != f.second for f in found)


def test_x87_folded_by_an_ia32_sigreturn_is_ranked_like_its_token() -> None:
    """An ia32 sigreturn folds the frame's x87 token (convert_from_fxsr, convert_to_fxsr):
    two histories that differ only in the generation of that token (one write of x87 or
    two) reach equal keys, and a third value of another generation would not. Before session
    30 the folded value was keyed by its bytes, generation included, and the memo audit of
    variant mxcsr-flip-keeps-xmm's narrow world caught equal keys with unequal successors."""
    from fpstate.check.actions_x86 import fold_x87

    one_cpu = {"cpu": "sapphire-rapids", "cpus": 1, "processes": {"p0": 1}, "vms": {}}
    start = (A("run", task="p0.t0", cpu=0), A("exec", task="p0.t0", abi="ia32"),
             A("sigaction", task="p0.t0"))
    end = (A("signal", task="p0.t0"), A("sigreturn", task="p0.t0"))
    x87 = A("write", task="p0.t0", component="x87")
    once = _steps(*start, x87, *end, config=one_cpu)
    twice = _steps(*start, x87, x87, *end, config=one_cpu)
    pid = once.tasks["p0.t0"].pid
    assert [w.expected["p0.t0"][0] for w in (once, twice)] == [
        fold_x87(token(pid, g, 0, 160)) for g in (1, 2)]
    assert once.key() == twice.key()
    held = once.clone()
    held.step(x87)
    assert held.key() != once.key()


def test_pkru_in_thread_pkru_is_ranked_like_any_value() -> None:
    """A switched-out task's PKRU lives in thread.pkru: one WRPKRU or two (generations 1 and 2)
    name the same state; a PKRU that another task wrote does not."""
    base = (A("run", task="p0.t0", cpu=0),)
    once = _steps(*base, A("write", task="p0.t0", component="pkru"), A("idle", cpu=0))
    twice = _steps(*base, A("write", task="p0.t0", component="pkru"),
                   A("write", task="p0.t0", component="pkru"), A("idle", cpu=0))
    assert once.tasks["p0.t0"].thread_pkru != twice.tasks["p0.t0"].thread_pkru
    assert once.key() == twice.key()
    other = _steps(A("run", task="p0.t0", cpu=0), A("idle", cpu=0))
    assert other.key() != once.key()


def test_a_guest_pkru_in_arch_pkru_is_ranked_like_any_value() -> None:
    """KVM keeps a guest's PKRU in vcpu->arch.pkru, an int: the guest's write after a kernel
    FPU use (another generation) names the same state as without it."""
    run = (A("run", task="p1.t0", cpu=0),
           A("kvm_run", task="p1.t0", vcpu="vm0.v0", guest="xsetbv; write pkru"))
    a = _steps(*run)
    b = _steps(A("kernel_fpu", cpu=0), *run)
    assert a.vcpus["vm0.v0"].arch.pkru != b.vcpus["vm0.v0"].arch.pkru
    assert a.key() == b.key()


#: Besides the defaults: three threads and two VMs whose VMMs are in different processes, one
#: with AMX permission for its guest; and a CPU without AMX, PASID or CET supervisor state.
_WIDER = {"cpu": "sapphire-rapids", "cpus": 2, "processes": {"p0": 2, "p1": 3},
          "vms": {"vm0": {"vmm": "p1.t0", "vcpus": 1, "guest_amx": True},
                  "vm1": {"vmm": "p0.t0", "vcpus": 1}}}
#: zen5 has OSPKE and an AMD init tracker: PKRU is tracked, and initial after WRPKRU 0.
_ZEN5 = {"cpu": "zen5", "cpus": 2, "processes": {"p0": 2, "p1": 2},
         "vms": {"vm0": {"vmm": "p1.t0", "vcpus": 1}}}
#: p0 a 32-bit program: ia32 signal frames, and x87 values folded by its sigreturns.
_COMPAT = {"cpu": "sapphire-rapids", "cpus": 2, "processes": {"p0": 2, "p1": 2},
           "compat": ["p0"], "vms": {"vm0": {"vmm": "p1.t0", "vcpus": 1}}}


@pytest.mark.parametrize("model,config", [("x86", None), ("arm64", None), ("x86", _WIDER),
                                          ("x86", _ZEN5), ("x86", _COMPAT)],
                         ids=["x86", "arm64", "x86-wider", "x86-zen5", "x86-compat"])
def test_equal_keys_behave_alike(model: str, config: dict | None) -> None:
    """States reached again by another history: same enabled actions, same answers, same
    violations and equal keys again for six random steps."""
    initial = Job(model, config or default_config(model)).initial()
    pairs, found = bisimulate(initial, walks=60, seed=11, limit=1)
    assert pairs > 50
    assert found == [], str(found[0])
