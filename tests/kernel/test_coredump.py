"""fs/coredump.c's model (`fpstate.kernel.x86.coredump`): the core_pattern kinds and the
dumper's sleeps, and the kernel conform case that measures them on this machine."""

from __future__ import annotations

import pytest

from fpstate.errors import FpstateError
from fpstate.kernel.x86 import conform_core, coredump
from fpstate.kernel.x86.conform import run_case, user_task
from fpstate.kernel.x86.coredump import CORE_TYPES, do_coredump
from fpstate.kernel.x86.process import CLONE_THREAD, CLONE_VM, sys_clone
from fpstate.kernel.x86.sched import IllegalEvent, Machine
from fpstate.kernel.x86.types import FpuSystem
from fpstate.kernel.x86.xstate import fpu__init_system_xstate
from fpstate.x86.profiles import load_profile


def _system() -> FpuSystem:
    profile = load_profile("sapphire-rapids")
    return FpuSystem.from_boot(profile, fpu__init_system_xstate(profile))


def _dump(threads: int, kind: str, *, raced: bool = False) -> coredump.Coredump:
    m = Machine(_system(), 2)
    user_task(m, 0, comm="leader")
    if threads > 1:
        m.run(1, m.syscall(0, sys_clone, CLONE_VM | CLONE_THREAD, "sibling"))
    m.enter_kernel(0)
    return do_coredump(m, 0, core_type=kind, raced=raced)


@pytest.mark.parametrize(("kind", "lone", "two", "two_raced"), [
    ("file", 0, 1, 0),             # coredump_file(): no wait
    ("pipe", 1, 2, 1),             # UMH_WAIT_EXEC
    ("socket", 0, 1, 0),           # @path: O_NONBLOCK connect
    ("socket-request", 1, 2, 1),   # @@path: the coredump_ack's receive
])
def test_each_core_pattern_kind_sleeps_as_its_path_does(kind: str, lone: int, two: int,
                                                       two_raced: int) -> None:
    assert CORE_TYPES[kind] == bool(lone)
    assert _dump(1, kind).sleeps == lone
    assert _dump(2, kind).sleeps == two
    assert _dump(2, kind, raced=True).sleeps == two_raced
    got = _dump(1, kind)
    assert got.dumper_slept == bool(lone) and got.voluntary_switches == lone + 1


def test_an_unknown_core_pattern_kind_is_refused() -> None:
    with pytest.raises(IllegalEvent, match="core_pattern kind 'socket-req'"):
        _dump(1, "socket-req")


def test_dump_switches_refuses_an_unknown_kind(tmp_path) -> None:
    from fpstate.host.coredump import dump_switches

    with pytest.raises(FpstateError, match="core_pattern kind 'core'"):
        dump_switches(tmp_path, lambda a: None, pattern="core")


def test_dump_switches_refuses_an_ack_without_a_request_socket(tmp_path) -> None:
    from fpstate.host.coredump import dump_switches

    with pytest.raises(FpstateError, match="coredump_ack 'reject'"):
        dump_switches(tmp_path, lambda a: None, pattern="file", ack="reject")
    with pytest.raises(FpstateError, match="coredump_ack 'maybe'"):
        dump_switches(tmp_path, lambda a: None, pattern="socket-request", ack="maybe")


def test_pipe_and_socket_dumps_need_permission_to_change_core_pattern(monkeypatch) -> None:
    from fpstate.host.coredump import ALLOW_ENV, pattern_change_unavailable

    monkeypatch.delenv(ALLOW_ENV, raising=False)
    assert ALLOW_ENV in (pattern_change_unavailable() or "")


@pytest.mark.host
def test_core_sleeps_case_tells_a_dump_path_that_sleeps(monkeypatch) -> None:
    """Measured on this kernel: with the model's file path made to sleep (as a pipe's does),
    the case reports the lone dumper's count -- the case can fail."""
    case = next(c for c in conform_core.CASES if c.name == "core/sleeps")
    why = case.needs()
    if why:
        pytest.skip(why)
    ok = run_case(case)
    if ok.skipped:
        pytest.skip(ok.skipped)
    assert ok.compared == 2 and not ok.mismatches
    monkeypatch.setitem(CORE_TYPES, "file", True)
    bad = run_case(case)
    assert [(m.field, m.model, m.real) for m in bad.mismatches] == [
        ("usual voluntary switches of a dumper with 1 thread, file", "2", "1"),
        ("usual voluntary switches of a dumper with 2 threads, file", "3", "2")]


def _old_machine(kernel: str, threads: int) -> Machine:
    profile = load_profile("sapphire-rapids")
    m = Machine(FpuSystem.from_boot(profile, fpu__init_system_xstate(profile, kernel)), 2)
    user_task(m, 0, comm="leader")
    if threads > 1:
        m.run(1, m.syscall(0, sys_clone, CLONE_VM | CLONE_THREAD, "sibling"))
    m.enter_kernel(0)
    return m


@pytest.mark.parametrize(("kernel", "kind", "refused"), [
    ("6.12", "socket", "came in 6.16"), ("6.16", "socket", None),
    ("6.16", "socket-request", "came in 6.17"), ("6.17", "socket-request", None),
])
def test_socket_core_patterns_exist_from_their_kernels(kernel: str, kind: str,
                                                       refused: str | None) -> None:
    m = _old_machine(kernel, 1)
    if refused is None:
        assert do_coredump(m, 0, core_type=kind).notes
    else:
        with pytest.raises(IllegalEvent, match=refused):
            do_coredump(m, 0, core_type=kind)


def test_before_6_1_the_dumper_waits_for_every_thread() -> None:
    """Before f9fc8cad9728 coredump_wait() passed match_state 0, which waited for the thread
    to leave its CPU whatever its state: no late note (kernel-findings 9j)."""
    m = _old_machine("5.19", 2)
    assert "TASK_ANY came in 6.1" in (coredump.zap_refusal(m, _leader(m), late=True) or "")
    m = _old_machine("6.1", 2)
    assert coredump.zap_refusal(m, _leader(m), late=True) is None
    assert do_coredump(m, 0, late=True).unwaited.comm == "sibling"


def _leader(m: Machine):
    return m.cpus[0].current


MXCSR_AT = 24  #: MXCSR in a standard XSAVE image and in NT_X86_XSTATE


def _three_threads(cpus: int = 2) -> tuple[Machine, object, object]:
    """A leader on CPU 0 that cloned t1 and then t2; t1 runs on CPU 1 and loads MXCSR 0x3F80
    (its fpstate still holds the 0x1F80 clone() copied); t2 never ran. The leader is in the
    kernel with its fatal signal."""
    m = Machine(_system(), cpus)
    user_task(m, 0, comm="leader")
    t1 = m.syscall(0, sys_clone, CLONE_VM | CLONE_THREAD, "t1")
    t2 = m.syscall(0, sys_clone, CLONE_VM | CLONE_THREAD, "t2")
    m.run(1, t1)
    assert m.cpus[1].regs.set_mxcsr(0x3F80) is None
    m.enter_kernel(0)
    return m, t1, t2


def _mxcsr(note: coredump.ThreadNote) -> int:
    return int.from_bytes(note.xstate[MXCSR_AT:MXCSR_AT + 4], "little")


def test_an_earlier_thread_held_on_its_cpu_is_not_waited_for() -> None:
    """coredump_task_exit() decrements nr_threads before set_current_state(TASK_IDLE) in
    every thread, not only the last (which then calls complete()): t1, held in that window
    on CPU 1 while t2 arrives on the dumper's CPU, is in TASK_RUNNING when the dumper looks,
    so its note is its stale fpstate (MXCSR 0x1F80, not the 0x3F80 it holds). The notes
    follow the list: the dumper's, then newest arrival first."""
    m, t1, _t2 = _three_threads()
    assert "last thread to arrive is not running" in coredump.zap_refusal(
        m, _leader(m), late=True)
    assert coredump.zap_refusal(m, _leader(m), late=t1) is None
    dump = do_coredump(m, 0, late=t1)
    assert dump.unwaited is t1 and dump.dumper_slept
    assert [n.task.comm for n in dump.notes] == ["leader", "t2", "t1"]
    assert [_mxcsr(n) for n in dump.notes] == [0x1F80, 0x1F80, 0x1F80]
    m, _t1, _t2 = _three_threads()
    waited = do_coredump(m, 0)
    assert waited.unwaited is None and [_mxcsr(n) for n in waited.notes] == [0x1F80, 0x1F80,
                                                                             0x3F80]


def test_late_names_a_zapped_thread_and_raced_needs_a_cpu_for_the_others() -> None:
    """The dumper is not its own late thread; raced with t1 held on the only other CPU leaves
    t2 nowhere to arrive before the dumper waits (woken on CPU 1 it would switch t1 out), so
    it needs a third CPU."""
    m, t1, _t2 = _three_threads()
    assert "is not a thread" in coredump.zap_refusal(m, _leader(m), late=_leader(m))
    assert "hold both CPUs" in coredump.zap_refusal(m, _leader(m), raced=True, late=t1)
    with pytest.raises(IllegalEvent, match="hold both CPUs"):
        do_coredump(m, 0, raced=True, late=t1)
    m, t1, _t2 = _three_threads(cpus=3)
    dump = do_coredump(m, 0, raced=True, late=t1)
    assert not dump.dumper_slept and dump.unwaited is t1
    assert [_mxcsr(n) for n in dump.notes] == [0x1F80, 0x1F80, 0x1F80]


@pytest.mark.parametrize(("allowed", "pinned"), [
    ({3, 1, 7}, (1, 3)), ({0}, None), ({1, 70}, None), ({0, 1}, (0, 1))])
def test_core_threads_pins_its_threads_to_the_first_two_cpus(monkeypatch, allowed: set[int],
                                                             pinned) -> None:
    """core/threads places the leader and the sibling as the model does, on two CPUs of the
    caller's affinity mask (one 64-bit cpu_set_t word); with fewer it does not pin."""
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: allowed)
    assert conform_core._two_cpus() == pinned


def test_threads_arrive_in_the_order_given() -> None:
    """core_state->dumper.next is a stack: with t2 arriving before t1, t1's note comes first
    after the dumper's, and t1 -- running on CPU 1, now the last to arrive -- is what
    ``late: True`` names; an order that does not name each zapped thread once is refused."""
    m, t1, t2 = _three_threads()
    assert coredump.zap_refusal(m, _leader(m), late=True, arrival=[t2, t1]) is None
    dump = do_coredump(m, 0, late=True, arrival=[t2, t1])
    assert [n.task.comm for n in dump.notes] == ["leader", "t1", "t2"]
    assert dump.unwaited is t1 and _mxcsr(dump.notes[1]) == 0x1F80
    m, t1, _t2 = _three_threads()
    assert "not each of ['t1', 't2'] once" in coredump.zap_refusal(m, _leader(m), arrival=[t1])
    with pytest.raises(IllegalEvent, match="arrival order"):
        do_coredump(m, 0, arrival=[t1, t1])


@pytest.mark.parametrize(("ack", "notes", "core_dumped", "switches"), [
    ("kernel", 1, True, 2),        # COREDUMP_KERNEL: the ack's receive, do_task_dead()
    ("kernel-wait", 1, True, 3),   # | COREDUMP_WAIT: coredump_sock_wait() after the notes
    ("userspace", 0, True, 2),     # COREDUMP_USERSPACE: no core from the kernel, WCOREDUMP
    ("reject", 0, False, 2),       # COREDUMP_REJECT: nothing
])
def test_a_coredump_servers_ack_decides_the_notes(ack: str, notes: int, core_dumped: bool,
                                                  switches: int) -> None:
    """vfs_coredump() after coredump_sock_request(): REJECT skips the dump, USERSPACE writes
    no core but reports one to the parent, WAIT sleeps once more after the notes (measured
    through kernel conform case core/pattern-sleeps with FPSTATE_MAY_SET_CORE_PATTERN=1)."""
    m = Machine(_system(), 2)
    user_task(m, 0, comm="leader")
    m.enter_kernel(0)
    dump = do_coredump(m, 0, core_type="socket-request", ack=ack)
    assert (len(dump.notes), dump.core_dumped, dump.voluntary_switches) == (
        notes, core_dumped, switches)
    assert dump.dumper_slept  # the ack's receive comes before the notes whatever the ack


def test_an_ack_needs_a_socket_request_pattern() -> None:
    with pytest.raises(IllegalEvent, match="comes only from a socket-request"):
        _dump_with(core_type="socket", ack="reject")
    with pytest.raises(IllegalEvent, match="coredump_ack 'accept'"):
        _dump_with(core_type="socket-request", ack="accept")


def _dump_with(**kw) -> coredump.Coredump:
    m = Machine(_system(), 2)
    user_task(m, 0, comm="leader")
    m.enter_kernel(0)
    return do_coredump(m, 0, **kw)
