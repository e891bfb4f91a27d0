"""XFD: first use of a dynamic feature, the #NM it raises, and the buffer reallocation.

Models handle_xfd_event() and the PASID #GP fixup try_fixup_enqcmd_gp() (arch/x86/kernel/
traps.c) and __xfd_enable_feature(), xfd_enable_feature(), fpstate_realloc() (arch/x86/kernel/
fpu/xstate.c), Linux v6.17.

Theory of operation: a host task's fpstate starts with ``xfd`` = init_fpstate.xfd (AMX tile data
armed when the CPU has XFD). Restoring the fpstate writes IA32_XFD first, so the first AMX
instruction raises #NM with IA32_XFD_ERR[18] set. The handler, in the task's context with IRQs
enabled (it may sleep and be preempted), checks the group's permission: without it the task gets
SIGILL/ILL_ILLOPC; with it, a zeroed buffer of the *permission's* size (all permitted features) is
allocated, the live state is put in the registers if it was not already there, the fpstate
pointer is swapped, the feature disarmed (fpstate->xfd and IA32_XFD), and the instruction retried.
The state is never copied buffer to buffer: the registers carry it across (seed 000).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fpstate.kernel.x86 import core
from fpstate.kernel.x86.context import fpregs_restore_userregs, requires
from fpstate.kernel.x86.types import (
    XFEATURE_MASK_USER_DYNAMIC,
    FpuGuest,
    KernelBug,
    xstate_init_xcomp_bv,
)
from fpstate.kernel.x86.xstate_prctl import EFAULT, ENOMEM, EPERM, siglock, xstate_get_group_perm
from fpstate.x86.xfeatures import XFEATURE_MASK_PASID

if TYPE_CHECKING:
    from fpstate.kernel.x86.sched import Cpu, KPath

#: MSR_IA32_PASID_VALID (bit 31 of IA32_PASID).
MSR_IA32_PASID_VALID = 1 << 31


def fpstate_realloc(c: Cpu, xfeatures: int, ksize: int, usize: int,
                    guest_fpu: FpuGuest | None = None) -> KPath:
    """fpstate_realloc() (xstate.c): replace the fpstate by a vzalloc(ksize + 64)ed one that
    has room for ``xfeatures`` too. vzalloc may sleep (a preemption point); the rest runs under
    fpregs_lock(). Returns 0 or -ENOMEM (the model's allocations do not fail).

    If the fpstate is the active one and TIF_NEED_FPU_LOAD is set, the registers are made
    authoritative first (fpregs_restore_userregs), so that nothing lives only in the old buffer
    when it is freed. Variant ``realloc-no-restore-userregs`` skips that. A hard interrupt may
    arrive after that, before the swap (`core.fpregs_locked_irq_window`): a handler allowed the
    FPU (variant ``hardirq-fpu-in-fpregs-lock``) saves the registers into the old buffer and
    sets TIF_NEED_FPU_LOAD, so the task comes back to the new, zeroed one.
    """
    m = c.m
    task = c.current
    fpu = task.fpu
    newfps = core.fpstate_alloc(m.system, ksize, valloc=True)
    c = yield  # vzalloc(): may sleep
    newfps.size = ksize
    newfps.user_size = usize
    curfps = guest_fpu.fpstate if guest_fpu is not None else fpu.fpstate
    in_use = fpu.fpstate is curfps
    if guest_fpu is not None:
        newfps.is_guest = True
        newfps.is_confidential = curfps.is_confidential
        newfps.in_use = curfps.in_use
        guest_fpu.xfeatures |= xfeatures
        guest_fpu.uabi_size = usize
    core.fpregs_lock(c)
    if in_use and task.need_fpu_load and not m.system.has_variant("realloc-no-restore-userregs"):
        fpregs_restore_userregs(c)
    core.fpregs_locked_irq_window(c, "fpstate_realloc")
    newfps.xfeatures = curfps.xfeatures | xfeatures
    newfps.user_xfeatures = curfps.user_xfeatures | xfeatures
    newfps.xfd = curfps.xfd & ~xfeatures
    xstate_init_xcomp_bv(m.system, newfps, newfps.xfeatures)
    if guest_fpu is not None:
        guest_fpu.fpstate = newfps
        if in_use:
            fpu.fpstate = newfps
    else:
        fpu.fpstate = newfps
    if in_use:
        core.xfd_update_state(c, fpu.fpstate)
    core.fpregs_unlock(c)
    if curfps.is_valloc:
        core.vfree(c, curfps)
    return 0


def __xfd_enable_feature(c: Cpu, xfd_err: int, guest_fpu: FpuGuest | None = None) -> KPath:
    """__xfd_enable_feature() (xstate.c): only USER_DYNAMIC bits count (else, for the host,
    pr_err_once "XFD: Invalid xfd error" and 0). Under siglock: not permitted for the group ->
    -EPERM; else read the permission's sizes, drop the lock, fpstate_realloc() (failure ->
    -EFAULT)."""
    xfd_event = xfd_err & XFEATURE_MASK_USER_DYNAMIC
    if not xfd_event:
        if guest_fpu is None:
            c.m.log.append(f"XFD: Invalid xfd error: {xfd_err:016x}")
        return 0
    with siglock(c):
        if xstate_get_group_perm(c, guest_fpu is not None) & xfd_event != xfd_event:
            return -EPERM
        leader = c.current.process.leader.fpu
        perm = leader.guest_perm if guest_fpu is not None else leader.perm
        ksize, usize = perm.state_size, perm.user_state_size
    ret = yield from fpstate_realloc(c, xfd_event, ksize, usize, guest_fpu)
    return -EFAULT if ret == -ENOMEM else 0


def xfd_enable_feature(c: Cpu, xfd_err: int) -> KPath:
    """xfd_enable_feature(): __xfd_enable_feature() for current's own fpstate."""
    return (yield from __xfd_enable_feature(c, xfd_err, None))


@requires("task_context")
def handle_xfd_event(c: Cpu) -> KPath:
    """handle_xfd_event() (traps.c): False when the #NM is not an XFD event (no XFD, or
    IA32_XFD_ERR = 0). Else clear XFD_ERR, WARN if not from user mode, enable IRQs and
    xfd_enable_feature(): -EPERM -> SIGILL/ILL_ILLOPC at the instruction, -EFAULT -> SIGSEGV,
    0 -> return and retry. True."""
    from fpstate.kernel.x86.sched import ILL_ILLOPC, SIGILL, SIGSEGV, Signal

    if not c.m.system.xfd:
        return False
    xfd_err = c.regs.xfd_err
    if not xfd_err:
        return False
    c.regs.xfd_err = 0
    task = c.current
    err = yield from xfd_enable_feature(c, xfd_err)
    if err == -EPERM:
        task.pending.append(Signal(SIGILL, ILL_ILLOPC))
    elif err == -EFAULT:
        task.pending.append(Signal(SIGSEGV))
    return True


def exc_device_not_available(c: Cpu) -> KPath:
    """exc_device_not_available() (traps.c) for a #NM from user mode: the XFD event, or -- on a
    kernel that uses neither CR0.TS nor math emulation -- die("unexpected #NM exception"),
    which the model reports as a `KernelBug`."""
    handled = yield from handle_xfd_event(c)
    if not handled:
        raise KernelBug("unexpected-nm", f"#NM on CPU {c.nr} that is not an XFD event")
    return 0


@requires("irqs_disabled", "user_task")
def try_fixup_enqcmd_gp(c: Cpu) -> bool:
    """try_fixup_enqcmd_gp() (traps.c): the first ENQCMD of a thread whose mm has a PASID takes
    #GP; the handler writes IA32_PASID = pasid | VALID directly and marks the thread.

    Writing the register is correct only because the #GP came from user mode with IRQs off:
    current's registers are live and the one source of truth (TIF_NEED_FPU_LOAD clear), the
    first case of the rule of seed 004. The model asserts that.
    """
    m = c.m
    if not m.system.kernel.max_features & XFEATURE_MASK_PASID:
        return False
    task = c.current
    pasid = task.process.pasid
    if not pasid:
        return False
    if task.pasid_activated:
        return False
    if task.need_fpu_load:
        raise KernelBug("pasid-fixup-not-live",
                        "#GP fixup with TIF_NEED_FPU_LOAD set: registers are not the truth")
    c.regs.set_component(10, (pasid | MSR_IA32_PASID_VALID).to_bytes(8, "little"))
    task.pasid_activated = True
    return True
