"""Preemption at every preemption point of every kernel path, and interrupts that use the FPU there.

Each kernel path of the model (rt_sigreturn, its fault-in retry, the ia32 sigreturn and
rt_sigreturn of a compat task, the XFD #NM handler, clone, execve, and a sleeping system call
followed by signal delivery) is run once undisturbed and
then once per (preemption point, disturbance):

- ``switch``: another task runs on the same CPU, writes every user register and its CET_USER
  (supervisor) state, and the task comes back on that CPU;
- ``migrate``: the same, but the task resumes on the other CPU;
- ``idle``: the CPU goes idle and the task comes back (its registers stay cached there);
- ``hardirq`` / ``softirq``: an interrupt handler on that CPU does kernel_fpu_begin(), clobbers
  the vector registers and kernel_fpu_end().

The claim: what the task (and the child of clone) sees afterwards is what it sees without the
disturbance, byte for byte -- the kernel's lazy restore (TIF_NEED_FPU_LOAD, fpu_fpregs_owner_ctx,
last_cpu) makes preemption invisible. The sweep is not vacuous: it counts the preemption points
it visited, and it catches the rejected fpstate_realloc() order (variant
``realloc-no-restore-userregs``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from fpstate.kernel.x86 import core
from fpstate.kernel.x86 import signal as sg
from fpstate.kernel.x86 import xstate_prctl as xp
from fpstate.kernel.x86.hw import PAGE_SIZE, token
from fpstate.kernel.x86.process import sys_clone, sys_execve
from fpstate.kernel.x86.sched import (
    SA_IA32_ABI,
    SA_RESTORER,
    SA_SIGINFO,
    SIGUSR1,
    Machine,
    SigAction,
    Signal,
    Task,
    TaskState,
)
from fpstate.kernel.x86.xfd import exc_device_not_available

YMM, OPMASK, ZMM_HI256, HI16, CET_USER, TILECFG, TILEDATA = 2, 5, 6, 7, 11, 17, 18
VECTOR = (1, YMM, OPMASK, ZMM_HI256, HI16)
DISTURBANCES = ("switch", "migrate", "idle", "hardirq", "softirq")


@dataclass(frozen=True)
class Scenario:
    """A kernel path entered by task ``t`` on CPU 0: ``prepare`` leaves ``t`` in user mode on
    CPU 0 and returns (path, args); ``observe`` reads the outcome after the return to user."""

    name: str
    cpu: str
    prepare: Callable[[Machine, Task], tuple[Callable[..., Any], tuple[Any, ...]]]
    observe: Callable[[Machine, Task, Any], Any]
    points: int  #: preemption points an undisturbed run passes


def _fill(m: Machine, t: Task, generation: int = 0) -> None:
    """Every vector register of the running ``t`` and its CET_USER state get its own values."""
    for i in VECTOR:
        m.user_write(0, i)
    c = m.enter_kernel(0)
    core.fpregs_update_current_xstate(c, CET_USER, token(t.pid, 1000 + generation, CET_USER, 16))
    m.exit_to_user_mode(0)


def _state(m: Machine, t: Task, result: Any) -> Any:
    return result, m.user_state(t), t.fpu.fpstate.size


def _sigreturn(m: Machine, t: Task):
    t.handlers[SIGUSR1] = SigAction()
    _fill(m, t)
    m.kill(t, SIGUSR1)
    _fill(m, t, 1)  # the handler's own register values, which sigreturn must replace
    sg.handler_return(t)
    return sg.sys_rt_sigreturn, ()


def _sigreturn_fault_in(m: Machine, t: Task):
    """An AMX frame (11012 bytes) whose tile-data page is not present when XRSTOR reads it:
    restore_fpregs_from_user() unlocks, faults it in (may sleep) and retries."""
    assert m.syscall(0, xp.sys_arch_prctl, xp.ARCH_REQ_XCOMP_PERM, 18) == 0
    t.handlers[SIGUSR1] = SigAction()
    _fill(m, t)
    m.user_write(0, TILECFG)
    m.user_write(0, TILEDATA)
    m.kill(t, SIGUSR1)
    fp = int.from_bytes(t.process.mm.read(t.user_sp + sg.SC_FPSTATE_OFFSET, 8), "little")
    page = (fp + 6000) // PAGE_SIZE
    assert page not in ((fp + 464) // PAGE_SIZE, (fp + 11008) // PAGE_SIZE)
    t.process.mm.not_present.add(page)
    sg.handler_return(t)
    return sg.sys_rt_sigreturn, ()


def _sigreturn_ia32(rt: bool) -> Callable[[Machine, Task], Any]:
    """A compat task's handler (installed by a 32-bit rt_sigaction: SA_IA32_ABI) returns: the
    fsave header is folded in through the fpstate (__fpu_restore_sig), with the registers
    invalidated before the copies from user memory, which may sleep."""

    def prepare(m: Machine, t: Task):
        t.process.mm.map(0xFFFE0000, 0x10000)  # a stack below 4 GiB: the frame's pointers
        t.user_sp = 0xFFFEF000                  # are 32-bit
        t.handlers[SIGUSR1] = SigAction(SA_IA32_ABI | SA_RESTORER | (SA_SIGINFO if rt else 0))
        _fill(m, t)
        m.kill(t, SIGUSR1)
        _fill(m, t, 1)
        sg.handler_ia32_return(t, rt)
        return (sg.sys32_rt_sigreturn if rt else sg.sys32_sigreturn), ()

    return prepare


def _xfd_first_use(m: Machine, t: Task):
    """The first TILELOADD after ARCH_REQ_XCOMP_PERM: #NM, and the handler's vzalloc() sleeps."""
    assert m.syscall(0, xp.sys_arch_prctl, xp.ARCH_REQ_XCOMP_PERM, 18) == 0
    _fill(m, t)
    assert m.cpus[0].regs.user_write(TILEDATA, bytes(8192)).vector == "#NM"
    return exc_device_not_available, ()


def _clone(m: Machine, t: Task):
    _fill(m, t)
    return sys_clone, (0,)


def _clone_observe(m: Machine, t: Task, child: Task) -> Any:
    return m.user_state(t), m.user_state(child), child.need_fpu_load, child.fpu.last_cpu


def _sleeping_syscall(c: Any) -> Any:
    """A system call that sleeps once (nanosleep, a blocking read): one preemption point."""
    yield
    return 0


def _signal_delivery(m: Machine, t: Task):
    """A signal queued while the task sleeps in a system call is delivered on the way out
    (copy_fpstate_to_sigframe: the registers are reloaded first if TIF_NEED_FPU_LOAD is set,
    then XSAVE straight to the user frame)."""
    t.handlers[SIGUSR1] = SigAction()
    _fill(m, t)
    t.pending.append(Signal(SIGUSR1))
    return _sleeping_syscall, ()


def _frame_observe(m: Machine, t: Task, result: Any) -> Any:
    fp = int.from_bytes(t.process.mm.read(t.user_sp + sg.SC_FPSTATE_OFFSET, 8), "little")
    size = t.fpu.fpstate.user_size + 4
    return result, t.user_sp, t.process.mm.read(fp, size), m.user_state(t)


def _execve(m: Machine, t: Task):
    _fill(m, t)
    return sys_execve, ("new",)


SCENARIOS = (
    Scenario("rt_sigreturn", "zen5", _sigreturn, _state, 1),
    Scenario("rt_sigreturn-fault-in", "sapphire-rapids", _sigreturn_fault_in, _state, 2),
    Scenario("ia32-sigreturn", "zen5", _sigreturn_ia32(False), _state, 2),
    Scenario("ia32-rt_sigreturn", "sapphire-rapids", _sigreturn_ia32(True), _state, 2),
    Scenario("xfd-first-use", "sapphire-rapids", _xfd_first_use, _state, 1),
    Scenario("clone", "zen5", _clone, _clone_observe, 1),
    Scenario("signal-delivery", "zen5", _signal_delivery, _frame_observe, 1),
    Scenario("execve", "zen5", _execve, _state, 2),
)


def _disturb(m: Machine, t: Task, other: Task, how: str, nr: int) -> int:
    """Disturb ``t`` (in the kernel at a preemption point on CPU ``nr``); the CPU it resumes on."""
    if how in ("hardirq", "softirq"):
        clobber = sum(1 << i for i in VECTOR)
        assert m.irq_kernel_fpu(nr, hardirq=how == "hardirq", clobber=clobber)
        return nr
    if how == "idle":
        m.idle(nr)
        m.switch_to(nr, t)
        return nr
    m.switch_to(nr, other)
    m.exit_to_user_mode(nr)
    for i in VECTOR:
        m.user_write(nr, i)
    c = m.enter_kernel(nr)
    core.fpregs_update_current_xstate(c, CET_USER, token(other.pid, 7, CET_USER, 16))
    back = 1 - nr if how == "migrate" else nr
    m.switch_to(back, t)
    return back


def run(scenario: Scenario, at: int | None, how: str = "", variants: tuple[str, ...] = ()
        ) -> tuple[Any, int]:
    """(outcome, preemption points passed) of ``scenario``, disturbed ``how`` at point ``at``."""
    m = Machine.boot(scenario.cpu, variants=variants)
    other = m.spawn("other")
    t = m.spawn("t")
    m.run(0, t)
    path, args = scenario.prepare(m, t)
    m.enter_kernel(0)
    m.start(0, path, *args)
    nr, points = 0, 0
    while t.kpath is not None:
        if points == at:
            nr = _disturb(m, t, other, how, nr)
        points += 1
        m.step(nr)
    result = t.kresult
    if t.state is TaskState.KERNEL and m.cpus[nr].current is t:
        m.exit_to_user_mode(nr)
    assert t.state is TaskState.USER
    return scenario.observe(m, t, result), points


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_preemption_at_any_point_is_invisible(scenario: Scenario) -> None:
    want, points = run(scenario, None)
    assert points == scenario.points
    for at in range(points):
        for how in DISTURBANCES:
            got, _ = run(scenario, at, how)
            assert got == want, (scenario.name, at, how)


def test_the_sweep_catches_the_realloc_without_restore_variant() -> None:
    """fpstate_realloc() without fpregs_restore_userregs(): after the task was switched out in
    vzalloc() its state lives only in the old buffer, which the swap discards -- unless no one
    touched the CPU meanwhile (``idle``): then the registers are still valid there, the restore
    on the way out is skipped and the state survives by luck."""
    xfd = next(s for s in SCENARIOS if s.name == "xfd-first-use")
    want, _ = run(xfd, None)
    bad = {how for how in DISTURBANCES
           if run(xfd, 0, how, ("realloc-no-restore-userregs",))[0] != want}
    assert bad == {"switch", "migrate", "hardirq", "softirq"}


def _exec_moved_twice(variants: tuple[str, ...], kernel: str | None = None
                      ) -> tuple[dict[int, bytes], dict[int, bytes], int]:
    """Commit 1f69383b203e's sequence: the exec sleeps before flush_thread() on CPU 0, which
    goes idle (keeping the old program's registers, last_cpu 0), resets the state on CPU 1,
    sleeps again and returns to user on CPU 0. (What the new program starts with, and the
    initial state of a fresh exec undisturbed, and the task's pid.)"""
    fresh = Machine.boot("zen5", kernel)
    f = fresh.spawn("t")
    fresh.run(0, f)
    fresh.syscall(0, sys_execve, "new")
    m = Machine.boot("zen5", kernel, variants=variants)
    m.spawn("other")
    t = m.spawn("t")
    m.run(0, t)
    if (m.system.kernel.max_features >> CET_USER) & 1:
        _fill(m, t)
    else:  # before v6.6: no CET_USER in the kernel's features
        for i in VECTOR:
            m.user_write(0, i)
    m.enter_kernel(0)
    m.start(0, sys_execve, "new")  # asleep in begin_new_exec(), before flush_thread()
    m.idle(0)
    m.switch_to(1, t)
    assert not m.step(1)  # fpu_flush_thread() on CPU 1, asleep in load_elf_binary()
    m.idle(1)
    m.switch_to(0, t)
    assert m.step(0)
    m.exit_to_user_mode(0)
    return m.user_state(t), fresh.user_state(f), t.pid


@pytest.mark.parametrize("kernel", ["6.5", "6.18"])
def test_an_exec_moved_between_cpus_starts_from_the_initial_state(kernel: str) -> None:
    got, initial, _ = _exec_moved_twice((), kernel)
    assert got == initial


@pytest.mark.parametrize("kernel", ["5.16", "6.1", "6.3"])
def test_kernels_before_6_5_run_the_exec_fpu_drop_design(kernel: str) -> None:
    got, initial, _ = _exec_moved_twice((), kernel)
    assert [i for i in VECTOR if got[i] != initial[i]] == list(VECTOR)


def test_exec_fpu_drop_starts_the_new_program_with_the_old_registers() -> None:
    """v5.14-v6.4: fpu__drop() cleared CPU 1's owner and left last_cpu 0, so CPU 0's copy of
    the old program's registers passed for valid and the restore was skipped."""
    got, initial, pid = _exec_moved_twice(("exec-fpu-drop",))
    old = [i for i in (*VECTOR, CET_USER) if got[i] != initial[i]]
    assert old == [*VECTOR, CET_USER]
    assert got[CET_USER] == token(pid, 1000, CET_USER, 16)  # the old shadow stack's IA32_U_CET
