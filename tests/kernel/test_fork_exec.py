"""fork, clone, kernel threads and execve: what a child inherits and what exec resets."""

from __future__ import annotations

import pytest

from fpstate.kernel.x86 import core
from fpstate.kernel.x86 import xstate_prctl as xp
from fpstate.kernel.x86.context import FpregsState, fpregs_state
from fpstate.kernel.x86.hw import token
from fpstate.kernel.x86.process import sys_clone, sys_execve
from fpstate.kernel.x86.sched import (
    SS_DISABLE,
    Machine,
    SigAction,
    Task,
    TaskState,
)
from fpstate.kernel.x86.types import CLONE_THREAD, CLONE_VFORK, CLONE_VM, KernelBug

YMM, HI16_ZMM, PASID, CET_USER, TILECFG, TILEDATA = 2, 7, 10, 11, 17, 18


@pytest.fixture
def spr() -> Machine:
    return Machine.boot("sapphire-rapids")


@pytest.fixture
def zen5() -> Machine:
    return Machine.boot("zen5")


def start(m: Machine, nr: int = 0) -> Task:
    t = m.spawn()
    m.run(nr, t)
    return t


def test_fork_copies_the_live_registers(zen5: Machine) -> None:
    """fpu_clone(): the child's fpstate is an XSAVE of the parent's registers, RFBM = the
    child's default features; the child starts with last_cpu = -1 and TIF_NEED_FPU_LOAD."""
    start(zen5)
    zen5.user_write(0, YMM)
    zen5.user_write(0, HI16_ZMM)
    parent_ymm, parent_hi16 = zen5.user_read(0, YMM), zen5.user_read(0, HI16_ZMM)
    child = zen5.syscall(0, sys_clone, 0)
    assert child.need_fpu_load and child.fpu.last_cpu == -1
    assert child.fpu.fpstate is child.fpu.embedded
    assert fpregs_state(child, zen5.cpus) is FpregsState.MEMORY
    zen5.run(1, child)
    assert zen5.user_read(1, YMM) == parent_ymm
    assert zen5.user_read(1, HI16_ZMM) == parent_hi16


def test_fork_from_a_switched_out_parent_reloads_it_first(zen5: Machine) -> None:
    """A parent with TIF_NEED_FPU_LOAD set (it slept in clone) gets its registers restored
    before the XSAVE into the child: the child still sees the parent's values."""
    p = start(zen5)
    other = zen5.spawn("other")
    zen5.user_write(0, YMM)
    mine = zen5.user_read(0, YMM)
    zen5.enter_kernel(0)
    zen5.start(0, sys_clone, 0)  # dup_task_struct(): a preemption point
    zen5.switch_to(0, other)
    zen5.exit_to_user_mode(0)
    zen5.user_write(0, YMM)
    zen5.switch_to(1, p)
    assert p.need_fpu_load
    zen5.finish(1)
    child = p.kresult
    zen5.exit_to_user_mode(1)
    zen5.run(0, child)
    assert zen5.user_read(0, YMM) == mine


def test_amx_child_gets_a_default_buffer_and_init_tile_data(spr: Machine) -> None:
    """Dynamic features are caller-saved: RFBM = the child's default features, so tile data is
    not copied and the child's buffer is the default size with XFD armed. TILECFG (a default
    feature) is copied. The child may use AMX at once (the permission is inherited)."""
    p = start(spr)
    assert spr.syscall(0, xp.sys_arch_prctl, xp.ARCH_REQ_XCOMP_PERM, 18) == 0
    spr.user_write(0, TILEDATA)
    spr.user_write(0, TILECFG)
    assert p.fpu.fpstate.size == 10752
    cfg = spr.user_read(0, TILECFG)
    child = spr.syscall(0, sys_clone, 0)
    assert child.fpu.fpstate.size == 2560 and child.fpu.fpstate.xfd == 1 << TILEDATA
    assert not child.fpu.fpstate.xstate_bv & (1 << TILEDATA)
    assert child.fpu.perm.state_perm & (1 << TILEDATA)
    spr.run(1, child)
    assert spr.cpus[1].regs.xfd == 1 << TILEDATA
    assert spr.user_read(1, TILECFG) == cfg
    assert spr.user_write(1, TILEDATA).vector == "#NM"
    assert child.fpu.fpstate.size == 10752 and child.state is TaskState.USER


def test_clone_thread_does_not_copy_permissions(spr: Machine) -> None:
    start(spr)
    assert spr.syscall(0, xp.sys_arch_prctl, xp.ARCH_REQ_XCOMP_PERM, 18) == 0
    thread = spr.syscall(0, sys_clone, CLONE_THREAD | CLONE_VM)
    assert thread.fpu.perm.state_perm == spr.system.kernel.default_features
    assert thread.process.leader.fpu.perm.state_perm & (1 << TILEDATA)


def test_host_fork_does_not_copy_permissions_without_dynamic_features() -> None:
    """fpu_inherit_perms() only acts when fpu_state_size_dynamic(); on the host the child has
    the defaults anyway."""
    m = Machine.boot("host")
    start(m)
    child = m.syscall(0, sys_clone, 0)
    assert child.fpu.perm.state_perm == m.system.kernel.default_features


def test_children_never_inherit_pasid(spr: Machine) -> None:
    p = start(spr)
    p.process.pasid = 7
    c = spr.enter_kernel(0)
    core.fpregs_update_current_xstate(c, PASID, (7 | 1 << 31).to_bytes(8, "little"))
    spr.exit_to_user_mode(0)
    child = spr.syscall(0, sys_clone, 0)
    assert not child.fpu.fpstate.xstate_bv & (1 << PASID)
    spr.run(1, child)
    assert spr.cpus[1].regs.component(PASID) == bytes(8)


def test_sigaltstack_inheritance_rules(zen5: Machine) -> None:
    """copy_process(): the sigaltstack is inherited except for CLONE_VM without CLONE_VFORK."""
    p = start(zen5)
    sp = zen5.mmap(p, 8192)
    assert zen5.syscall(0, xp.sys_sigaltstack, sp, 8192) == 0
    fork = zen5.syscall(0, sys_clone, 0)
    vfork = zen5.syscall(0, sys_clone, CLONE_VM | CLONE_VFORK)
    thread = zen5.syscall(0, sys_clone, CLONE_VM | CLONE_THREAD)
    assert (fork.sas_ss_sp, fork.sas_ss_size) == (sp, 8192)
    assert (vfork.sas_ss_sp, vfork.sas_ss_size) == (sp, 8192)
    assert (thread.sas_ss_size, thread.sas_ss_flags) == (0, SS_DISABLE)


def test_clone_with_a_shadow_stack_pointer_updates_cet_user(zen5: Machine) -> None:
    """update_fpu_shstk(): user_ssp (byte 8 of CET_USER) of the child's fpstate; it needs the
    component in use, else copy_thread fails."""
    start(zen5)
    with pytest.raises(KernelBug, match="update-fpu-shstk"):
        zen5.syscall(0, sys_clone, CLONE_VM, None, 0x7000)
    zen5 = Machine.boot("zen5")
    start(zen5)
    c = zen5.enter_kernel(0)
    core.fpregs_update_current_xstate(c, CET_USER, (1).to_bytes(8, "little") + bytes(8))
    zen5.exit_to_user_mode(0)
    child = zen5.syscall(0, sys_clone, CLONE_VM, None, 0x7000)
    stored = core.fpstate_read_component(zen5.system, child.fpu.fpstate, CET_USER)
    assert stored == (1).to_bytes(8, "little") + (0x7000).to_bytes(8, "little")


def test_kernel_threads_get_init_state_and_never_save(zen5: Machine) -> None:
    a = start(zen5)
    zen5.user_write(0, YMM)
    mine = zen5.user_read(0, YMM)
    kt = zen5.kthread("kworker")
    assert kt.need_fpu_load
    assert kt.fpu.fpstate.regs[:576] == zen5.init_fpstate.regs[:576]
    zen5.preempt(0, kt)
    zen5.cpus[0].regs.set_component(YMM, token(1, 1, YMM, 256))  # a kthread never does this
    zen5.idle(0)
    assert kt.fpu.fpstate.regs[:576] == zen5.init_fpstate.regs[:576]  # no save for kthreads
    zen5.run(0, a)
    assert zen5.user_read(0, YMM) == token(1, 1, YMM, 256)  # the cached copy was reused
    assert mine != token(1, 1, YMM, 256)


def test_exec_resets_everything(spr: Machine) -> None:
    """fpu_flush_thread(): default fpstate (the large one is dropped), permissions back to the
    defaults, XFD armed again, init registers on return; begin_new_exec() also clears the
    sigaltstack, signal handlers, and kills the other threads."""
    p = start(spr)
    assert spr.syscall(0, xp.sys_arch_prctl, xp.ARCH_REQ_XCOMP_PERM, 18) == 0
    spr.user_write(0, TILEDATA)
    spr.user_write(0, YMM)
    big = p.fpu.fpstate
    sp = spr.mmap(p, 16384)
    assert spr.syscall(0, xp.sys_sigaltstack, sp, 16384) == 0
    p.handlers[10] = SigAction()
    thread = spr.syscall(0, sys_clone, CLONE_THREAD | CLONE_VM)
    spr.run(1, thread)
    assert spr.syscall(0, sys_execve, "new") == 0
    assert thread.state is TaskState.DEAD
    assert p.fpu.fpstate is p.fpu.embedded and p.fpu.fpstate.size == 2560
    assert p.fpu.fpstate.xfd == 1 << TILEDATA and spr.cpus[0].regs.xfd == 1 << TILEDATA
    assert p.fpu.perm.state_perm == spr.system.kernel.default_features
    assert big in spr.unreferenced and not big.freed
    assert (p.sas_ss_sp, p.sas_ss_size, p.handlers) == (0, 0, {})
    assert spr.user_read(0, YMM) == bytes(256)
    assert spr.user_read(0, TILEDATA) == bytes(8192)
    assert spr.cpus[0].regs.xgetbv1() == 1 << 9  # only PKRU (init_pkru_value) is in use


@pytest.mark.parametrize("variants", [(), ("hardirq-fpu-in-fpregs-lock",)])
def test_a_hardirq_inside_the_exec_reset_leaks_the_old_program_only_before_5_18(
        variants: tuple[str, ...]) -> None:
    """fpu_reset_fpstate_regs() copies init_fpstate into the memory image, then sets
    TIF_NEED_FPU_LOAD, under fpregs_lock(). A hard interrupt wanting the FPU between the two
    takes its scalar code; before 5.18 its kernel_fpu_begin() found the flag clear and saved
    the old program's live registers over the copy, which the new program then loads."""
    m = Machine.boot("sapphire-rapids", variants=variants)
    p = start(m)
    m.user_write(0, YMM)
    old = m.user_read(0, YMM)
    c = m.cpus[0]
    c.irq_in_lock, c.irq_in_lock_site = 1 << YMM, "fpu_reset_fpstate_regs"
    assert m.syscall(0, sys_execve, "new") == 0
    assert c.irq_in_lock == 0 and c.irq_in_lock_used is bool(variants)
    assert p.need_fpu_load is False  # the return to user mode loaded the image
    assert m.user_read(0, YMM) == (old if variants else bytes(256))


@pytest.mark.parametrize("user_worker", [False, True])
def test_kernel_thread_kernel_fpu_never_saves_and_takes_a_cached_cpu(user_worker: bool) -> None:
    """A kworker (PF_KTHREAD) or io_uring worker (PF_USER_WORKER) doing kernel_fpu_begin() in
    task context on a CPU that still caches a switched-out user task: the worker's own fpstate
    is never written (the `flags & (PF_KTHREAD | PF_USER_WORKER)` test), the CPU's registers
    are invalidated, and the user task reloads its own values from memory."""
    m = Machine.boot("zen5")
    a = start(m)
    m.user_write(0, YMM)
    mine = m.user_read(0, YMM)
    kt = m.kthread("kworker/0:1", user_worker=user_worker)
    image = bytes(kt.fpu.fpstate.regs)
    m.preempt(0, kt)
    assert fpregs_state(a, m.cpus) is FpregsState.CACHED
    c = m.cpus[0]
    assert core.irq_fpu_usable(c)
    core.kernel_fpu_begin_mask(c)
    core.kernel_fpu_clobber(c, 1 << YMM)
    core.kernel_fpu_end(c)
    assert bytes(kt.fpu.fpstate.regs) == image
    assert fpregs_state(a, m.cpus) is FpregsState.MEMORY
    m.idle(0)
    assert bytes(kt.fpu.fpstate.regs) == image
    m.run(0, a)
    assert m.user_read(0, YMM) == mine


def test_a_child_starts_from_a_copy_of_its_parents_embedded_fpstate(spr: Machine) -> None:
    """arch_dup_task_struct() copies the task_struct, the embedded fpstate's bytes with it;
    fpu_clone()'s XSAVES then writes only what it saves. With SSE initial (MXCSR 1F80H, XMM
    zero) XSAVES leaves MXCSR's bytes alone, so the child's fpstate holds the MXCSR its
    parent's last save of SSE wrote -- where a zeroed buffer would hold 0. (PTRACE_GETREGSET
    shows those bytes when the header has YMM: kernel-findings 6.)"""
    from fpstate.kernel.x86.hw import MXCSR_OFFSET

    p = start(spr)
    assert spr.user_ldmxcsr(0, 0x3F80) is None
    other = spr.spawn("other")
    spr.run(0, other)  # p is switched out: XSAVES saves SSE, MXCSR 0x3f80 with it
    spr.run(0, p)
    spr.user_release(0, 1 << 1)  # SSE initial, MXCSR 1F80H
    spr.user_write(0, YMM)
    child = spr.syscall(0, sys_clone, 0)
    fps = child.fpu.fpstate
    assert fps.xstate_bv & 0x6 == 0x4  # SSE not saved
    assert int.from_bytes(fps.regs[MXCSR_OFFSET:MXCSR_OFFSET + 4], "little") == 0x3F80
