"""XFD: the first AMX use, #NM, SIGILL without permission, and the buffer reallocation."""

from __future__ import annotations

import pytest

from fpstate.kernel.x86 import core
from fpstate.kernel.x86 import xstate_prctl as xp
from fpstate.kernel.x86.context import FpregsState, fpregs_state
from fpstate.kernel.x86.hw import token
from fpstate.kernel.x86.process import sys_clone
from fpstate.kernel.x86.sched import (
    ILL_ILLOPC,
    ILL_ILLOPN,
    SIGILL,
    Machine,
    SigAction,
    Task,
    TaskState,
)
from fpstate.kernel.x86.types import CLONE_THREAD, CLONE_VM, KernelBug
from fpstate.kernel.x86.xfd import exc_device_not_available, try_fixup_enqcmd_gp

YMM, TILECFG, TILEDATA = 2, 17, 18
XTILE_DATA = 1 << TILEDATA


@pytest.fixture
def spr() -> Machine:
    return Machine.boot("sapphire-rapids")


def start(m: Machine, nr: int = 0) -> Task:
    t = m.spawn()
    m.run(nr, t)
    return t


def permit(m: Machine, nr: int = 0) -> None:
    assert m.syscall(nr, xp.sys_arch_prctl, xp.ARCH_REQ_XCOMP_PERM, 18) == 0


def test_xfd_is_armed_for_every_new_task(spr: Machine) -> None:
    """init_fpstate.xfd = XTILE_DATA; restore_fpregs_from_fpstate() writes IA32_XFD first."""
    t = start(spr)
    assert spr.system.init_xfd == XTILE_DATA and spr.system.fpu_state_size_dynamic
    assert t.fpu.fpstate.xfd == XTILE_DATA
    assert spr.cpus[0].regs.xfd == XTILE_DATA == spr.cpus[0].xfd_state


def test_first_use_without_permission_is_sigill_illopc(spr: Machine) -> None:
    """#NM with XFD_ERR[18]; __xfd_enable_feature() -> -EPERM -> SIGILL, si_code ILL_ILLOPC;
    without a handler the process dies; the buffer never grew."""
    t = start(spr)
    fault = spr.user_write(0, TILEDATA)
    assert fault is not None and fault.vector == "#NM"
    assert t.state is TaskState.DEAD
    assert (t.killed_by.sig, t.killed_by.code) == (SIGILL, ILL_ILLOPC)
    assert t.fpu.fpstate is t.fpu.embedded and t.fpu.fpstate.size == 2560
    assert spr.cpus[0].regs.xfd_err == 0


def test_ldtilecfg_does_not_trap_while_tile_data_is_armed(spr: Machine) -> None:
    """Without permission too: LDTILECFG is exempt from the XFD #NM (SDM 13.14), so no
    SIGILL; TILECFG is loaded and the task's buffer keeps its default size."""
    t = start(spr)
    t.handlers[SIGILL] = SigAction()
    assert spr.user_write(0, TILECFG) is None
    assert t.state is TaskState.USER and not t.pending
    assert spr.cpus[0].regs.xinuse & (1 << TILECFG)
    assert t.fpu.fpstate.size == 2560


def test_seed_000_first_use_grows_the_buffer_to_the_permitted_size(spr: Machine) -> None:
    """The precondition of seed 000: after permission, the first AMX instruction makes the
    task's fpstate grow from the default (2560 bytes compacted, 2816 UABI) to the permission's
    size (10752 / 11008), with XTILE_DATA disarmed; the live state crosses in the registers."""
    t = start(spr)
    permit(spr)
    spr.user_write(0, YMM)
    ymm = spr.user_read(0, YMM)
    old = t.fpu.fpstate
    assert (old.size, old.user_size) == (2560, 2816)
    fault = spr.user_write(0, TILEDATA)
    assert fault.vector == "#NM"
    new = t.fpu.fpstate
    assert new is not old and new.is_valloc and not old.freed  # the embedded one stays
    assert (new.size, new.user_size, len(new.regs)) == (10752, 11008, 10752)
    assert new.xfeatures == old.xfeatures | XTILE_DATA
    assert new.user_xfeatures == 0x602E7 and new.xfd == 0
    assert new.xcomp_bv == new.xfeatures | 1 << 63
    assert spr.cpus[0].regs.xfd == 0
    assert spr.user_read(0, YMM) == ymm
    tile = spr.user_read(0, TILEDATA)
    spr.idle(0)
    assert core.fpstate_read_component(spr.system, new, TILEDATA) == tile
    spr.run(1, t)
    assert spr.user_read(1, TILEDATA) == tile and spr.user_read(1, YMM) == ymm


def test_a_second_thread_enables_without_asking_again(spr: Machine) -> None:
    start(spr)
    permit(spr)
    thread = spr.syscall(0, sys_clone, CLONE_THREAD | CLONE_VM)
    spr.run(1, thread)
    assert spr.user_write(1, TILEDATA).vector == "#NM"
    assert thread.fpu.fpstate.size == 10752 and thread.state is TaskState.USER


def test_preemption_and_migration_inside_the_handler(spr: Machine) -> None:
    """handle_xfd_event() runs with IRQs on and vzalloc() sleeps: the task can be switched out
    (its registers saved into the *old* buffer) and resume on another CPU. fpstate_realloc()
    then reloads the registers before swapping buffers, so nothing is lost."""
    t = start(spr)
    other = spr.spawn("other")
    permit(spr)
    spr.user_write(0, YMM)
    ymm = spr.user_read(0, YMM)
    assert spr.cpus[0].regs.user_write(TILEDATA, bytes(8192)).vector == "#NM"
    spr.enter_kernel(0)
    spr.start(0, exc_device_not_available)  # runs to the vzalloc() preemption point
    spr.switch_to(0, other)
    spr.exit_to_user_mode(0)
    spr.user_write(0, YMM)  # the other task uses the registers of CPU 0
    assert fpregs_state(t, spr.cpus) is FpregsState.MEMORY
    spr.switch_to(1, t)
    assert spr.step(1) and t.kresult == 0
    assert not t.need_fpu_load and t.fpu.fpstate.size == 10752
    spr.exit_to_user_mode(1)
    assert spr.user_read(1, YMM) == ymm
    assert spr.cpus[1].regs.user_write(TILEDATA, token(t.pid, 1, TILEDATA, 8192)) is None


def test_realloc_variant_without_restore_loses_the_state() -> None:
    """Variant realloc-no-restore-userregs: swapping in the zeroed buffer while the state
    lives only in the old one (TIF_NEED_FPU_LOAD set) loses the task's registers."""
    m = Machine.boot("sapphire-rapids", variants={"realloc-no-restore-userregs"})
    t = start(m)
    other = m.spawn("other")
    permit(m)
    m.user_write(0, YMM)
    m.cpus[0].regs.user_write(TILEDATA, bytes(8192))
    m.enter_kernel(0)
    m.start(0, exc_device_not_available)
    m.switch_to(0, other)
    m.exit_to_user_mode(0)
    m.switch_to(1, t)
    m.finish(1)
    m.exit_to_user_mode(1)
    assert m.user_read(1, YMM) == bytes(256)


@pytest.mark.parametrize("variants", [(), ("hardirq-fpu-in-fpregs-lock",)])
def test_a_hardirq_inside_the_realloc_section_empties_the_task_only_before_5_18(
        variants: tuple[str, ...]) -> None:
    """fpstate_realloc() holds fpregs_lock() (bottom halves off, interrupts on) from making
    the registers live to installing the zeroed buffer. A hard interrupt wanting the FPU there
    is refused by irq_fpu_usable() (softirq_count() != 0): the registers carry the task's state
    into the new buffer. Before 5.18 its kernel_fpu_begin() saved them into the old buffer
    (then freed) and set TIF_NEED_FPU_LOAD: the task returns to the zeroed buffer."""
    m = Machine.boot("sapphire-rapids", variants=variants)
    t = start(m)
    permit(m)
    m.user_write(0, YMM)
    ymm = m.user_read(0, YMM)
    assert m.cpus[0].regs.user_write(TILEDATA, bytes(8192)).vector == "#NM"
    c = m.enter_kernel(0)
    m.start(0, exc_device_not_available)  # to the vzalloc() preemption point
    c.irq_in_lock, c.irq_in_lock_site = 1 << YMM, "fpstate_realloc"
    m.finish(0)
    assert c.irq_in_lock == 0 and c.irq_in_lock_used is bool(variants)
    assert t.fpu.fpstate.size == 10752 and t.need_fpu_load is bool(variants)
    m.exit_to_user_mode(0)
    assert m.user_read(0, YMM) == (bytes(256) if variants else ymm)


def test_exit_frees_the_large_buffer(spr: Machine) -> None:
    """arch_release_task_struct() -> fpstate_free(): vfree of the vmalloc'ed fpstate."""
    t = start(spr)
    permit(spr)
    spr.user_write(0, TILEDATA)
    big = t.fpu.fpstate
    spr.enter_kernel(0)
    spr.do_exit(0)
    assert big.freed and big in spr.freed
    with pytest.raises(KernelBug, match="use-after-free"):
        big.check_alive("test")


def test_xfd_err_without_a_dynamic_bit_is_logged_and_ignored(spr: Machine) -> None:
    start(spr)
    c = spr.cpus[0]
    c.regs.xfd_err = 1 << 2
    spr.syscall(0, exc_device_not_available)
    assert spr.log[-1] == "XFD: Invalid xfd error: 0000000000000004"


def test_nm_without_xfd_err_is_unexpected(spr: Machine) -> None:
    start(spr)
    with pytest.raises(KernelBug, match="unexpected-nm"):
        spr.syscall(0, exc_device_not_available)


def test_amx_on_the_host_is_ud_and_sigill_illopn() -> None:
    """No AMX in XCR0: the instruction is #UD (SIGILL, ILL_ILLOPN), not an XFD event."""
    m = Machine.boot("host")
    if m.system.user.max_features & XTILE_DATA:
        pytest.skip("host has AMX")
    t = start(m)
    assert m.system.init_xfd == 0 and not m.system.fpu_state_size_dynamic
    assert m.user_write(0, TILEDATA).vector == "#UD"
    assert (t.killed_by.sig, t.killed_by.code) == (SIGILL, ILL_ILLOPN)


def test_enqcmd_gp_fixup_writes_the_live_pasid_msr(spr: Machine) -> None:
    """try_fixup_enqcmd_gp(): IA32_PASID = pasid | VALID in the registers (they are live: the
    #GP came from user mode with IRQs off); XSAVES then carries it in the fpstate."""
    t = start(spr)
    t.process.pasid = 0x42
    c = spr.enter_kernel(0)
    c.irqs_disabled = True
    assert try_fixup_enqcmd_gp(c) is True
    assert try_fixup_enqcmd_gp(c) is False  # already activated: some other #GP
    c.irqs_disabled = False
    spr.exit_to_user_mode(0)
    value = (0x42 | 1 << 31).to_bytes(8, "little")
    assert spr.cpus[0].regs.component(10) == value
    spr.idle(0)
    assert core.fpstate_read_component(spr.system, t.fpu.fpstate, 10) == value


def _guest_fpu(m: Machine):
    """A vCPU's fpstate as fpu_alloc_guest_fpstate() makes it (the KVM layer owns that
    function): guest defaults, xfd 0, is_guest, uabi_size 4096."""
    from fpstate.kernel.x86.types import FpuGuest

    gfps = core.fpstate_alloc(m.system, m.system.guest.size, valloc=True)
    gfps.is_guest = True
    core.__fpstate_reset(m.system, gfps)
    core.fpstate_init_user(m.system, gfps)
    return FpuGuest(m.system.guest.features, 0, 4096, gfps)


def test_guest_fpstate_realloc(spr: Machine) -> None:
    """__xfd_enable_feature(xfd_err, guest_fpu) (KVM_SET_CPUID2 with AMX): checks the *guest*
    permission, grows the guest fpstate to guest_perm's size, keeps is_guest, updates the
    container's xfeatures and uabi_size, and leaves the task's own fpstate alone."""
    from fpstate.kernel.x86.xfd import __xfd_enable_feature

    t = start(spr)
    gfpu = _guest_fpu(spr)
    old = gfpu.fpstate
    assert (old.size, old.xfeatures, old.xfd) == (2560, 0x21EE7, 0)
    spr.enter_kernel(0)
    spr.start(0, __xfd_enable_feature, XTILE_DATA, gfpu)
    assert spr.finish(0) == -xp.EPERM and gfpu.fpstate is old
    spr.exit_to_user_mode(0)
    assert spr.syscall(0, xp.sys_arch_prctl, xp.ARCH_REQ_XCOMP_GUEST_PERM, 18) == 0
    spr.enter_kernel(0)
    spr.start(0, __xfd_enable_feature, XTILE_DATA, gfpu)
    assert spr.finish(0) == 0
    new = gfpu.fpstate
    assert new is not old and old.freed and new.is_guest and not new.in_use
    assert (new.size, new.user_size, new.xfeatures) == (10752, 11008, 0x61EE7)
    assert (gfpu.xfeatures, gfpu.uabi_size) == (0x61EE7, 11008)
    assert t.fpu.fpstate is t.fpu.embedded


def test_ldtilecfg_never_takes_the_xfd_nm_and_initialises_tile_data() -> None:
    """SDM 13.14: LDTILECFG does not generate #NM when XCR0[18] = IA32_XFD[18] = 1; it
    loads TILECFG and initialises TILEDATA. The first TILEDATA access takes the #NM."""
    from fpstate.kernel.x86.sched import Machine
    from fpstate.kernel.x86.xstate_prctl import ARCH_REQ_XCOMP_PERM, sys_arch_prctl

    m = Machine.boot("sapphire-rapids")
    t = m.spawn()
    m.run(0, t)
    assert m.syscall(0, sys_arch_prctl, ARCH_REQ_XCOMP_PERM, 18) == 0
    assert m.user_write(0, 17) is None
    regs = m.cpus[0].regs
    assert regs.xinuse & (1 << 17) and not regs.xinuse & (1 << 18)
    assert t.fpu.fpstate.size == 2560 and regs.xfd_err == 0
    fault = m.user_write(0, 18)
    assert fault is not None and fault.vector == "#NM"
    assert t.fpu.fpstate.size == 10752
