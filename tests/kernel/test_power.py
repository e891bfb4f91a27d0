"""Suspend to RAM and hibernation in the kernel model (fpstate.kernel.x86.power): what the boot
CPU and the suspending task hold after resume, under Linux 6.18 as released and with the
proposed fixes of kernel-findings section 10, and when the freezer could not have finished."""

from __future__ import annotations

import pytest

from fpstate.errors import FpstateError
from fpstate.kernel.x86 import core
from fpstate.kernel.x86.hw import CR4_FPU_BITS, PKRU
from fpstate.kernel.x86.power import (
    AUTOSLEEP_WORKER,
    BOOT_KERNEL_FILL,
    BOOT_KERNEL_MXCSR,
    hibernate_enter,
    suspend_enter,
)
from fpstate.kernel.x86.sched import Machine, Task, TaskState
from fpstate.kernel.x86.signal import read_pkru
from fpstate.kernel.x86.types import PF_KTHREAD, IllegalEvent, KernelBug
from fpstate.kernel.x86.xstate_prctl import ARCH_REQ_XCOMP_PERM, sys_arch_prctl

YMM, TILEDATA = 2, 18
FIXES = ("resume_pkru", "resume_xfd_set_state")
INIT_PKRU = core.INIT_PKRU_VALUE.to_bytes(4, "little")


def test_reset_leaves_power_up_values() -> None:
    m = Machine.boot("sapphire-rapids")
    regs = m.cpus[0].regs
    m.run(0, m.spawn("t"))
    m.user_write(0, YMM)
    regs.reset()
    assert (regs.cr4, regs.xcr0, regs.xss, regs.xfd, regs.xfd_err) == (0, 1, 0, 0, 0)
    assert regs.xinuse == 0 and regs.mxcsr == 0x1F80 and read_pkru(m.cpus[0]) == 0


def test_the_suspending_task_keeps_its_registers_but_pkru_as_released() -> None:
    """Linux 6.18 as released: every component comes back from memory, PKRU stays 0."""
    m = Machine.boot("sapphire-rapids")
    t = m.spawn("t")
    m.run(0, t)
    m.user_write(0, YMM)
    mine = m.user_read(0, YMM)
    m.enter_kernel(0)
    suspend_enter(m)
    c0 = m.cpus[0]
    assert c0.fpu_fpregs_owner_ctx is None and t.need_fpu_load and t.state is TaskState.KERNEL
    assert c0.regs.cr4 == CR4_FPU_BITS and c0.kernel_fpu_allowed
    assert (c0.regs.xcr0, c0.regs.xss) == (m.system.xcr0, m.system.xss)
    m.exit_to_user_mode(0)
    assert m.user_read(0, YMM) == mine
    assert read_pkru(c0) == 0  # every protection key open (kernel-findings 10b)
    # Its first switch-out stashes that 0 in thread.pkru (x86_pkru_load()).
    m.idle(0)
    assert t.thread_pkru == 0


def test_the_pkru_fix_writes_the_saved_value_back() -> None:
    m = Machine.boot("sapphire-rapids", fixes=FIXES)
    t = m.spawn("t")
    m.run(0, t)
    m.enter_kernel(0)
    suspend_enter(m)
    m.exit_to_user_mode(0)
    assert m.cpus[0].regs.component(PKRU)[:4] == INIT_PKRU


def test_secondary_cpus_come_back_as_after_hotplug() -> None:
    m = Machine.boot("sapphire-rapids")
    m.run(0, m.spawn("t"))
    m.enter_kernel(0)
    suspend_enter(m)
    c1 = m.cpus[1]
    assert c1.regs.cr4 == CR4_FPU_BITS and c1.kernel_fpu_allowed
    assert c1.regs.component(PKRU)[:4] == INIT_PKRU  # setup_pku()
    assert c1.regs.xfd == c1.xfd_state == m.system.init_xfd
    assert (c1.regs.xcr0, c1.regs.xss) == (m.system.xcr0, m.system.xss)


def _amx_ran_last_on_cpu0(fixes: tuple[str, ...] = ()) -> tuple[Machine, Task, Task, bytes]:
    """a used AMX tile data on CPU 0 (IA32_XFD and xfd_state 0 there) and was switched out;
    s, without AMX, is switched in on CPU 0 inside its write to /sys/power/state. The machine,
    a, s and a's tile data."""
    m = Machine.boot("sapphire-rapids", fixes=fixes)
    a, s = m.spawn("a"), m.spawn("s")
    m.run(0, a)
    assert m.syscall(0, sys_arch_prctl, ARCH_REQ_XCOMP_PERM, TILEDATA) == 0
    m.user_write(0, TILEDATA)
    tiles = m.user_read(0, TILEDATA)
    assert m.cpus[0].regs.xfd == m.cpus[0].xfd_state == 0
    m.preempt(0, s)
    return m, a, s, tiles


def test_resume_arms_xfd_behind_the_cache_as_released() -> None:
    """fpu__resume_cpu()'s wrmsrq() alone: IA32_XFD is s's, xfd_state still a's, and a's
    restore on CPU 0 skips the write and takes #NM in the kernel (kernel-findings 10a)."""
    m, a, s, _ = _amx_ran_last_on_cpu0()
    suspend_enter(m)
    c0 = m.cpus[0]
    assert c0.regs.xfd == s.fpu.fpstate.xfd == 1 << TILEDATA and c0.xfd_state == 0
    m.idle(0)
    with pytest.raises(KernelBug, match="unexpected-nm"):
        m.run(0, a)


def test_resume_with_xfd_set_state_keeps_the_cache() -> None:
    m, a, _, tiles = _amx_ran_last_on_cpu0(FIXES)
    suspend_enter(m)
    c0 = m.cpus[0]
    assert c0.regs.xfd == c0.xfd_state == 1 << TILEDATA
    m.idle(0)
    m.run(0, a)
    assert c0.regs.xfd == 0 and m.user_read(0, TILEDATA) == tiles


def test_resume_on_a_cpu_without_dynamic_state_writes_no_xfd() -> None:
    """Skylake-SP (no XFD): fpu__resume_cpu() writes XCR0 and IA32_XSS and leaves IA32_XFD."""
    m = Machine.boot("skylake-sp")
    assert not m.system.fpu_state_size_dynamic
    m.run(0, m.spawn("t"))
    m.enter_kernel(0)
    suspend_enter(m)
    assert m.cpus[0].regs.xfd == 0 and m.cpus[0].regs.xcr0 == m.system.xcr0


@pytest.mark.parametrize("why", ["idle", "user", "busy-cpu", "in-path"])
def test_suspend_waits_for_the_freezer(why: str) -> None:
    """Refused, with nothing changed, unless CPU 0 runs a user task in the kernel, every other
    CPU is idle and no task is inside a kernel path."""
    m = Machine.boot("sapphire-rapids")
    t, u = m.spawn("t"), m.spawn("u")
    if why != "idle":
        m.run(0, t)
        if why != "user":
            m.enter_kernel(0)
    if why == "busy-cpu":
        m.run(1, u)
    if why == "in-path":
        m.run(1, u)
        assert m.syscall(1, sys_arch_prctl, ARCH_REQ_XCOMP_PERM, TILEDATA) == 0
        m.user_write_begin(1, TILEDATA)  # asleep in fpstate_realloc()'s vzalloc()
        assert u.kpath is not None
        m.idle(1)
    before = [c.regs.snapshot() for c in m.cpus]
    with pytest.raises(IllegalEvent):
        suspend_enter(m)
    assert [c.regs.snapshot() for c in m.cpus] == before
    assert m.cpus[0].kernel_fpu_allowed


def test_a_variant_runs_the_unfixed_code_even_with_its_fix() -> None:
    m = Machine.boot("sapphire-rapids", fixes=FIXES, variants={"pkru-lost-on-resume"})
    assert m.system.runs_unfixed("pkru-lost-on-resume", "resume_pkru")
    assert not m.system.runs_unfixed("xfd-state-stale-on-resume", "resume_xfd_set_state")
    t = m.spawn("t")
    m.run(0, t)
    m.enter_kernel(0)
    suspend_enter(m)
    m.exit_to_user_mode(0)
    assert read_pkru(m.cpus[0]) == 0


def test_an_unknown_fix_is_refused_by_name() -> None:
    with pytest.raises(FpstateError, match=r"unknown fix\(es\) xfd_state_synced \(known: "
                                           r"guest_xfd_clears_xstate_bv, guest_xfd_host_write, "
                                           r"mxcsr_by_format, "
                                           r"mxcsr_flip_inits_xmm, resume_pkru, "
                                           r"resume_xfd_set_state\)"):
        Machine.boot("sapphire-rapids", fixes={"xfd_state_synced"})
    with pytest.raises(FpstateError, match=r"^proposed fix mxcsr_flip_inits_xmm amends "
                                           r"mxcsr_by_format, which is not applied$"):
        Machine.boot("sapphire-rapids", fixes={"mxcsr_flip_inits_xmm"})
    with pytest.raises(FpstateError, match=r"^proposed fix guest_xfd_host_write amends "
                                           r"guest_xfd_clears_xstate_bv, which is not applied$"):
        Machine.boot("sapphire-rapids", fixes={"guest_xfd_host_write"})


# -- hibernation (S4) ---------------------------------------------------------------------------


def test_hibernation_hands_over_the_boot_kernels_registers() -> None:
    """After hibernate_enter() the CPUs hold what the boot of the same kernel left
    (boot_kernel_registers): its tasks' values in the vector registers, PKRU init_pkru_value,
    MXCSR 1F80H on the boot CPU (its kernel_fpu_begin()) and its tasks' FTZ value elsewhere;
    no CPU has an owner, so every task's own values come back from memory."""
    m = Machine.boot("sapphire-rapids")
    t, u = m.spawn("t"), m.spawn("u")
    m.run(1, u)
    m.user_write(1, YMM)
    theirs = m.user_read(1, YMM)
    m.idle(1)  # u switched out, its registers still valid on CPU 1
    m.run(0, t)
    m.user_write(0, YMM)
    mine = m.user_read(0, YMM)
    m.enter_kernel(0)
    hibernate_enter(m)
    c0, c1 = m.cpus
    fill = bytes([BOOT_KERNEL_FILL]) * c0.regs.size(YMM)
    assert c0.regs.component(YMM) == c1.regs.component(YMM) == fill
    assert (c0.regs.mxcsr, c1.regs.mxcsr) == (0x1F80, BOOT_KERNEL_MXCSR) == (0x1F80, 0x9F80)
    assert c0.regs.component(PKRU)[:4] == c1.regs.component(PKRU)[:4] == INIT_PKRU
    assert c0.fpu_fpregs_owner_ctx is None and c1.fpu_fpregs_owner_ctx is None
    assert all(c.regs.cr4 == CR4_FPU_BITS and c.kernel_fpu_allowed for c in m.cpus)
    assert all((c.regs.xcr0, c.regs.xss) == (m.system.xcr0, m.system.xss) for c in m.cpus)
    m.exit_to_user_mode(0)
    assert m.user_read(0, YMM) == mine
    m.run(1, u)
    assert m.user_read(1, YMM) == theirs


def _wrote_pkru(fixes: tuple[str, ...] = ()) -> tuple[Machine, bytes]:
    """t's WRPKRU of its own value, then its write of disk to /sys/power/state."""
    m = Machine.boot("sapphire-rapids", fixes=fixes)
    m.run(0, m.spawn("t"))
    m.user_write(0, PKRU)
    own = m.user_read(0, PKRU)
    assert own[:4] != INIT_PKRU
    m.enter_kernel(0)
    hibernate_enter(m)
    m.exit_to_user_mode(0)
    return m, own


def test_hibernation_gives_the_boot_kernels_pkru_as_released() -> None:
    """kernel-findings 10c: restore_processor_state() leaves PKRU as the boot kernel left it,
    init_pkru_value, where S3 leaves 0."""
    m, own = _wrote_pkru()
    assert read_pkru(m.cpus[0]) == core.INIT_PKRU_VALUE != int.from_bytes(own[:4], "little")


def test_the_pkru_fix_covers_hibernation() -> None:
    m, own = _wrote_pkru(FIXES)
    assert m.user_read(0, PKRU) == own


@pytest.mark.parametrize("ending", ["resume", "rollback"])
def test_hibernation_arms_xfd_behind_the_cache_as_released(ending: str) -> None:
    """kernel-findings 10a by way of S4: the image's xfd_state is the snapshot's (a's 0), the
    MSR s's armed value, and a's restore takes #NM in the kernel; with resume_xfd_set_state the
    cache follows the MSR. A hibernation a wakeup event rolls back loses no power, and the same
    happens: fpu__resume_cpu() wrote the MSR behind xfd_state all the same."""
    m, a, s, _ = _amx_ran_last_on_cpu0()
    hibernate_enter(m, ending)
    c0 = m.cpus[0]
    assert c0.regs.xfd == s.fpu.fpstate.xfd == 1 << TILEDATA and c0.xfd_state == 0
    m.idle(0)
    with pytest.raises(KernelBug, match="unexpected-nm"):
        m.run(0, a)
    m, a, _, tiles = _amx_ran_last_on_cpu0(FIXES)
    hibernate_enter(m, ending)
    m.idle(0)
    m.run(0, a)
    assert m.user_read(0, TILEDATA) == tiles


def test_a_rolled_back_hibernation_keeps_pkru() -> None:
    """A wakeup event rolls the hibernation back (power_down() returns): no power was lost,
    so the task gets its own PKRU back with no fix -- restore_processor_state() ran on this
    kernel's registers. (Its IA32_XFD: test_hibernation_arms_xfd_behind_the_cache_as_released.)"""
    m = Machine.boot("sapphire-rapids")
    m.run(0, m.spawn("t"))
    m.user_write(0, PKRU)
    m.user_write(0, YMM)
    own, mine = m.user_read(0, PKRU), m.user_read(0, YMM)
    m.enter_kernel(0)
    hibernate_enter(m, "rollback")
    assert all(c.regs.cr4 == CR4_FPU_BITS and c.kernel_fpu_allowed for c in m.cpus)
    m.exit_to_user_mode(0)
    assert (m.user_read(0, PKRU), m.user_read(0, YMM)) == (own, mine)


def test_suspend_to_both_wakes_from_ram_with_pkru_0_as_released() -> None:
    """/sys/power/disk "suspend": after the image is written the machine suspends to RAM and
    wakes from it, so PKRU comes back as S3 leaves it, 0 (kernel-findings 10b), not the
    boot kernel's init_pkru_value; resume_pkru covers it."""
    m = Machine.boot("sapphire-rapids")
    m.run(0, m.spawn("t"))
    m.user_write(0, PKRU)
    m.enter_kernel(0)
    hibernate_enter(m, "suspend")
    m.exit_to_user_mode(0)
    assert read_pkru(m.cpus[0]) == 0
    m = Machine.boot("sapphire-rapids", fixes=FIXES)
    m.run(0, m.spawn("t"))
    m.user_write(0, PKRU)
    own = m.user_read(0, PKRU)
    m.enter_kernel(0)
    hibernate_enter(m, "suspend")
    m.exit_to_user_mode(0)
    assert m.user_read(0, PKRU) == own


def test_an_unknown_hibernation_ending_is_refused() -> None:
    m = Machine.boot("sapphire-rapids")
    m.run(0, m.spawn("t"))
    m.enter_kernel(0)
    with pytest.raises(FpstateError, match="hibernation ending 'shutdown': one of resume, "
                                           "rollback, suspend"):
        hibernate_enter(m, "shutdown")


# -- autosleep: a kernel thread suspends -------------------------------------------------------


def _amx_then_idle(kernel: str, fixes: tuple[str, ...] = ()) -> tuple[Machine, Task, bytes]:
    """a used AMX tile data on CPU 0 (IA32_XFD and xfd_state 0 there), then every CPU idle."""
    m = Machine.boot("sapphire-rapids", kernel=kernel, fixes=fixes)
    a = m.spawn("a")
    m.run(0, a)
    assert m.syscall(0, sys_arch_prctl, ARCH_REQ_XCOMP_PERM, TILEDATA) == 0
    m.user_write(0, TILEDATA)
    tiles = m.user_read(0, TILEDATA)
    m.idle(0)
    assert m.cpus[0].regs.xfd == m.cpus[0].xfd_state == 0
    return m, a, tiles


@pytest.mark.parametrize("state", ["mem", "disk"])
def test_autosleep_on_6_15_and_later_dereferences_null_in_fpu_resume_cpu(state: str) -> None:
    """kernel-findings 10d: the autosleep worker is current as the boot CPU resumes, and
    fpu__resume_cpu() asks x86_task_fpu() of it, which WARNs and returns NULL for a
    PF_KTHREAD task (22aafe3bcb67, CONFIG_X86_DEBUG_FPU). With resume_xfd_set_state the
    worker's IA32_XFD is init_fpstate's, the cache follows it, and a's restore writes 0."""
    m, _, _ = _amx_then_idle("6.18")
    with pytest.raises(KernelBug, match="x86-task-fpu-kthread"):
        if state == "mem":
            suspend_enter(m, autosleep=True)
        else:
            hibernate_enter(m, autosleep=True)
    m, a, tiles = _amx_then_idle("6.18", FIXES)
    if state == "mem":
        suspend_enter(m, autosleep=True)
    else:
        hibernate_enter(m, autosleep=True)
    c0 = m.cpus[0]
    assert c0.current is c0.idle and c0.regs.xfd == c0.xfd_state == 1 << TILEDATA
    m.run(0, a)
    assert m.user_read(0, TILEDATA) == tiles


def test_autosleep_before_6_15_arms_xfd_behind_the_cache() -> None:
    """Before 22aafe3bcb67 the worker's own fpstate->xfd (init_fpstate's, armed) goes into the
    MSR by wrmsrq() alone, while xfd_state keeps a's 0: a's restore skips the write and its
    XRSTOR of tile data takes #NM in the kernel (10a, with no user task involved)."""
    m, a, _ = _amx_then_idle("6.12")
    suspend_enter(m, autosleep=True)
    c0 = m.cpus[0]
    assert c0.regs.xfd == 1 << TILEDATA and c0.xfd_state == 0
    with pytest.raises(KernelBug, match="unexpected-nm"):
        m.run(0, a)


def test_autosleep_needs_every_cpu_idle_and_reuses_its_worker() -> None:
    m = Machine.boot("sapphire-rapids", fixes=FIXES)
    t = m.spawn("t")
    m.run(1, t)
    with pytest.raises(IllegalEvent, match="suspend by autosleep: CPU 1 still runs"):
        suspend_enter(m, autosleep=True)
    m.idle(1)
    suspend_enter(m, autosleep=True)
    hibernate_enter(m, "rollback", autosleep=True)
    hibernate_enter(m, "suspend", autosleep=True)
    workers = [u for u in m.tasks.values() if u.comm == AUTOSLEEP_WORKER]
    assert len(workers) == 1 and workers[0].flags & PF_KTHREAD
    assert all(c.current is c.idle for c in m.cpus)


def test_hibernation_waits_for_the_freezer() -> None:
    m = Machine.boot("sapphire-rapids")
    t, u = m.spawn("t"), m.spawn("u")
    m.run(0, t)
    m.enter_kernel(0)
    m.run(1, u)
    before = [c.regs.snapshot() for c in m.cpus]
    with pytest.raises(IllegalEvent, match="hibernate: CPU 1 still runs"):
        hibernate_enter(m)
    assert [c.regs.snapshot() for c in m.cpus] == before
