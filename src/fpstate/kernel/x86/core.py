"""FPU ownership, save and restore, kernel-mode FPU use, clone/exec, the KVM swap.

Models arch/x86/kernel/fpu/core.c and the save/restore wrappers of arch/x86/kernel/fpu/xstate.h
(Linux v6.17, Kingxukai/linux 9b44fff6). Every function takes the per-CPU context ``c`` first
(the kernel's ``this_cpu`` and ``current``); the machine-wide kernel state (``FpuSystem``,
``init_fpstate``) is ``c.m``.

Rules of this file:
- one function per kernel function, same name, same order of effects;
- a save writes the register file into an fpstate image through `KernelBuf` (bounds-checked);
  a restore reads it back; a fault restoring a kernel buffer is a `KernelBug` (the kernel's
  EX_TYPE_FPU_RESTORE fixup reinitialises the registers and WARNs);
- the only way to change current's xstate on its behalf is `fpregs_update_current_xstate`
  (seed 004); the rejected order is the variant ``pasid-write-incoherent``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fpstate.kernel.x86.context import (
    __cpu_invalidate_fpregs_state,
    __fpu_invalidate_fpregs_state,
    fpregs_activate,
    fpregs_deactivate,
    fpregs_restore_userregs,
    fpregs_state_valid,
    requires,
)
from fpstate.kernel.x86.hw import HDR, MXCSR_OFFSET, KernelBuf, token
from fpstate.kernel.x86.types import (
    CLONE_THREAD,
    PF_KTHREAD,
    PF_USER_WORKER,
    XFEATURE_MASK_FPSTATE,
    XFEATURE_MASK_USER_RESTORE,
    XREGS_STATE_SIZE,
    Fpstate,
    Fpu,
    FpuGuest,
    FpuStatePerm,
    FpuSystem,
    IllegalEvent,
    KernelBug,
    xstate_init_xcomp_bv,
)
from fpstate.x86.layout import compacted_offset
from fpstate.x86.xfeatures import (
    MXCSR_DEFAULT,
    XCOMP_BV_COMPACTED_FORMAT,
    XFEATURE_MASK_PASID,
    XFEATURE_MASK_PKRU,
    XFEATURE_MASK_Hi16_ZMM,
    XFEATURE_MASK_ZMM_Hi256,
    bit_tuple,
)

if TYPE_CHECKING:
    from fpstate.kernel.x86.sched import Cpu, Task

KFPU_387 = 1 << 0
KFPU_MXCSR = 1 << 1
#: init_pkru_value: every key but 0 access-disabled (arch/x86/mm/pkeys.c).
INIT_PKRU_VALUE = 0x55555554
#: The owner id used in tokens written by kernel-mode FPU users (kernel_fpu_begin sections).
KERNEL_OWNER = 0xFFFF
_U64 = (1 << 64) - 1

# -- fpstate buffers ----------------------------------------------------------------------------


def fpstate_alloc(system: FpuSystem, ksize: int, *, valloc: bool) -> Fpstate:
    """A zeroed fpstate with room for ``ksize`` bytes of registers (vzalloc(ksize + 64) in
    fpstate_realloc; the embedded __fpstate otherwise). Sizes are set by the caller."""
    return Fpstate(size=ksize, user_size=0, xfeatures=0, user_xfeatures=0, xfd=0,
                   regs=bytearray(ksize), is_valloc=valloc)


def __fpstate_reset(system: FpuSystem, fps: Fpstate) -> None:
    """__fpstate_reset() (core.c, v6.17): guest fpstates take guest_default_cfg and XFD's
    RESET value 0; host ones the kernel defaults and init_fpstate.xfd. User size and features
    are always fpu_user_cfg's defaults."""
    if fps.is_guest:
        fps.size = system.guest.size
        fps.xfeatures = system.guest.features
        fps.xfd = 0
    else:
        fps.size = system.kernel.default_size
        fps.xfeatures = system.kernel.default_features
        fps.xfd = system.init_xfd
    fps.user_size = system.user.default_size
    fps.user_xfeatures = system.user.default_features


def fpstate_reset(system: FpuSystem, fpu: Fpu) -> None:
    """fpstate_reset() (core.c): point at the embedded default-sized fpstate, reset it, and
    reset the permissions to the defaults (host: kernel defaults; guest: guest_default_cfg)."""
    fpu.fpstate = fpu.embedded
    __fpstate_reset(system, fpu.fpstate)
    fpu.perm = FpuStatePerm(system.kernel.default_features, system.kernel.default_size,
                            system.user.default_size)
    fpu.guest_perm = FpuStatePerm(system.guest.features, system.guest.size,
                                  system.user.default_size)


def fpstate_init_user(system: FpuSystem, fps: Fpstate) -> None:
    """fpstate_init_user() (core.c): XCOMP_BV for the fpstate's features, FCW = 037FH and
    MXCSR = 1F80H (fpstate_init_fxstate). The buffer must already be zero."""
    xstate_init_xcomp_bv(system, fps, fps.xfeatures)
    fps.regs[0:2] = (0x37F).to_bytes(2, "little")
    fps.regs[MXCSR_OFFSET:MXCSR_OFFSET + 4] = MXCSR_DEFAULT.to_bytes(4, "little")


def fpstate_free(c: Cpu, fpu: Fpu) -> None:
    """fpstate_free() (xstate.c): vfree() the active fpstate unless it is the embedded one."""
    if fpu.fpstate is not fpu.embedded:
        vfree(c, fpu.fpstate)


def vfree(c: Cpu, fps: Fpstate) -> None:
    """vfree(): the buffer is gone; no one may reference it afterwards."""
    assert fps.is_valloc, f"vfree of non-vmalloc fpstate #{fps.ident}"
    fps.check_alive("vfree")
    fps.freed = True
    c.m.freed.append(fps)


# -- component access in kernel images ----------------------------------------------------------


def _component_offset(system: FpuSystem, fps: Fpstate, i: int) -> int:
    if i < 2 or not system.xcompacted:
        return system.profile.component(i).offset
    if not (fps.xcomp_bv >> i) & 1:
        raise KernelBug("raw-xsave-addr", f"component {i} not in XCOMP_BV {fps.xcomp_bv:#x} "
                        f"of fpstate #{fps.ident}")
    return compacted_offset(system.profile, fps.xcomp_bv | XCOMP_BV_COMPACTED_FORMAT, i)


def get_xsave_addr(system: FpuSystem, fps: Fpstate, i: int) -> int | None:
    """get_xsave_addr() (xstate.c): the offset of component ``i`` in the image, None when the
    header says it is in its initial state (nothing stored). WARN for disabled features."""
    if not (system.kernel.max_features >> i) & 1:
        raise KernelBug("get-xsave-addr", f"component {i} not enabled")
    if not (fps.xstate_bv >> i) & 1:
        return None
    return _component_offset(system, fps, i)


def fpstate_read_component(system: FpuSystem, fps: Fpstate, i: int) -> bytes | None:
    """The stored bytes of component ``i`` (None when in init state per XSTATE_BV)."""
    off = get_xsave_addr(system, fps, i)
    if off is None:
        return None
    size = system.profile.component(i).size
    if i == 0:
        return bytes(fps.regs[0:MXCSR_OFFSET]) + bytes(8) + bytes(fps.regs[32:160])
    return bytes(fps.regs[off:off + size])


def fpstate_write_component(system: FpuSystem, fps: Fpstate, i: int, value: bytes) -> None:
    """Store ``value`` as component ``i`` of the image and mark it in XSTATE_BV (the memcpy of
    the kernel's memory-image updates, e.g. update_fpu_shstk's user_ssp)."""
    fps.check_alive("fpstate_write_component")
    off = _component_offset(system, fps, i)
    if off + len(value) > len(fps.regs):
        raise KernelBug("xsave-out-of-bounds",
                        f"component {i} at {off} of {len(fps.regs)}-byte fpstate #{fps.ident}")
    if i == 0:
        fps.regs[0:MXCSR_OFFSET] = value[:MXCSR_OFFSET]
        fps.regs[32:160] = value[32:]
    else:
        fps.regs[off:off + len(value)] = value
    fps.xstate_bv = fps.xstate_bv | 1 << i


# -- the XSAVE wrappers (kernel/fpu/xstate.h) ---------------------------------------------------


def xfd_set_state(c: Cpu, xfd: int) -> None:
    """xfd_set_state(): WRMSR IA32_XFD and the per-CPU cache xfd_state."""
    c.regs.xfd = xfd
    c.xfd_state = xfd


def xfd_update_state(c: Cpu, fps: Fpstate) -> None:
    """xfd_update_state(): with dynamic sizing, make IA32_XFD equal fps->xfd (only writes
    when the per-CPU cache differs)."""
    if c.m.system.fpu_state_size_dynamic and c.xfd_state != fps.xfd:
        xfd_set_state(c, fps.xfd)


def xfd_validate_state(c: Cpu, fps: Fpstate, mask: int, rstor: bool) -> None:
    """xfd_validate_state() / xstate_op_valid() (CONFIG_X86_DEBUG_FPU): an XSAVE*/XRSTOR* with
    RFBM ``mask`` on ``fps`` must not touch space the buffer lacks. WARN -> `KernelBug`."""
    if not c.m.system.fpu_state_size_dynamic:
        return
    if fps.xfd == c.xfd_state:
        return
    cur = c.current.fpu.fpstate if not c.current.flags & PF_KTHREAD else None
    if cur is not None and fps.xfd == cur.xfd:
        raise KernelBug("xfd-state-invalid", f"IA32_XFD {c.xfd_state:#x} differs from "
                        f"current's fpstate xfd {fps.xfd:#x}")
    if fps is c.m.init_fpstate:
        if not rstor:
            raise KernelBug("xfd-state-invalid", "XSAVE into init_fpstate")
        return
    rest = mask & ~fps.xfd & ~fps.xfeatures
    if rest:
        raise KernelBug("xfd-state-invalid",
                        f"RFBM {mask:#x} reaches {rest:#x} outside fpstate #{fps.ident}")


def os_xsave(c: Cpu, fps: Fpstate) -> None:
    """os_xsave(): XSAVES/XSAVEC/XSAVEOPT/XSAVE (the patched alternative) of RFBM =
    fps->xfeatures into the kernel image. A fault on a kernel buffer is a WARN."""
    fps.check_alive("os_xsave")
    xfd_validate_state(c, fps, fps.xfeatures, False)
    fault = c.regs.xsave(KernelBuf(fps.regs, fps), fps.xfeatures,
                         c.m.system.xsave_insn)
    if fault:
        raise KernelBug("os-xsave-fault", str(fault))


def os_xrstor(c: Cpu, fps: Fpstate, mask: int) -> None:
    """os_xrstor(): XRSTORS (XRSTOR without XSAVES) of RFBM = ``mask`` from the kernel image.

    A fault goes through the EX_TYPE_FPU_RESTORE fixup (fpu_reset_from_exception_fixup: the
    registers are reinitialised from init_fpstate) and WARNs, which the model reports as a
    `KernelBug` after doing the fixup. An XFD #NM has no fixup: exc_device_not_available()
    WARNs that the XFD event came from the kernel and dies ("unexpected #NM exception").
    """
    fps.check_alive("os_xrstor")
    xfd_validate_state(c, fps, mask, True)
    fault = c.regs.xrstor(KernelBuf(fps.regs, fps), mask, c.m.system.xrstor_insn)
    if fault and fault.vector == "#NM":
        raise KernelBug("unexpected-nm", f"XRSTOR from fpstate #{fps.ident} on CPU {c.nr} "
                        f"in the kernel: {fault}")
    if fault:
        fpu_reset_from_exception_fixup(c)
        raise KernelBug("bad-fpu-state", f"XRSTOR from fpstate #{fps.ident}: {fault}")


def os_xrstor_supervisor(c: Cpu, fps: Fpstate) -> None:
    """os_xrstor_supervisor(): restore only the supervisor components (no XFD update)."""
    fault = c.regs.xrstor(KernelBuf(fps.regs, fps),
                          c.m.system.xfeatures_mask_supervisor, c.m.system.xrstor_insn)
    if fault:
        raise KernelBug("bad-fpu-state", f"supervisor XRSTORS from #{fps.ident}: {fault}")


def os_xrstor_safe(c: Cpu, fps: Fpstate, mask: int) -> bool:
    """os_xrstor_safe(): XFD update, then XRSTOR(S) returning the trap instead of fixing up.
    True on success."""
    xfd_update_state(c, fps)
    return c.regs.xrstor(KernelBuf(fps.regs, fps), mask,
                         c.m.system.xrstor_insn) is None


# -- core.c -------------------------------------------------------------------------------------


def update_avx_timestamp(c: Cpu, fpu: Fpu) -> None:
    """update_avx_timestamp(): remember when AVX-512 upper state was last saved in use."""
    if fpu.fpstate.xstate_bv & (XFEATURE_MASK_ZMM_Hi256 | XFEATURE_MASK_Hi16_ZMM):
        fpu.avx512_timestamp = c.m.jiffies


@requires("fpregs_locked")
def save_fpregs_to_fpstate(c: Cpu, fpu: Fpu) -> None:
    """save_fpregs_to_fpstate() (core.c): XSAVE* this CPU's registers into fpu->fpstate,
    preserving the registers. Must be called with fpregs_lock() held."""
    os_xsave(c, fpu.fpstate)
    update_avx_timestamp(c, fpu)


def restore_fpregs_from_fpstate(c: Cpu, fps: Fpstate, mask: int) -> None:
    """restore_fpregs_from_fpstate() (core.c): XFD first (a component disarmed in the fpstate
    must not be initialised by XRSTOR), then XRSTOR(S) with RFBM = max_features & mask, not
    fps->xfeatures, so features a previous task used go to their init state.

    (The AMD FXSAVE_LEAK FNCLEX/EMMS/FILD prelude only scrubs x87 FIP/FDP/FOP, which the model
    does not carry.)
    """
    xfd_update_state(c, fps)
    os_xrstor(c, fps, c.m.system.kernel.max_features & mask)


def fpu_reset_from_exception_fixup(c: Cpu) -> None:
    """fpu_reset_from_exception_fixup(): restore init_fpstate with XFEATURE_MASK_FPSTATE."""
    init = c.m.init_fpstate
    c.regs.xrstor(KernelBuf(init.regs, "init_fpstate"),
                  c.m.system.kernel.max_features & XFEATURE_MASK_FPSTATE, c.m.system.xrstor_insn)


def fpregs_lock(c: Cpu) -> None:
    """fpregs_lock() (api.h): local_bh_disable() on !PREEMPT_RT: no preemption and no softirq
    (hence no kernel_fpu_begin from softirq) until fpregs_unlock()."""
    if c.hardirq or c.nmi:
        raise IllegalEvent(f"fpregs_lock() in hard interrupt context on CPU {c.nr}")
    c.bh_disabled += 1


def fpregs_unlock(c: Cpu) -> None:
    """fpregs_unlock(): local_bh_enable()."""
    if not c.bh_disabled:
        raise IllegalEvent(f"fpregs_unlock() without fpregs_lock() on CPU {c.nr}")
    c.bh_disabled -= 1


def irq_fpu_usable(c: Cpu) -> bool:
    """irq_fpu_usable() (core.c): false in NMI, false while the kernel already uses the FPU
    (or before init); true outside hard interrupts; in a hard interrupt only if it did not hit
    a fpregs_lock()ed section or softirq (softirq_count() == 0; 59f5ede3bc0f, v5.18).

    Before v5.18 (and variant ``hardirq-fpu-in-fpregs-lock``): ``!in_interrupt() ||
    interrupted_user_mode() || interrupted_kernel_fpu_idle()``, which lets a hard interrupt
    that hit a fpregs_lock()ed section take the FPU from under it."""
    if c.nmi:
        return False
    if not c.kernel_fpu_allowed:
        return False
    if not c.hardirq:
        return True
    if c.m.system.runs_unfixed("hardirq-fpu-in-fpregs-lock", "hardirq_fpu_checks_bh"):
        return True
    return not (c.bh_disabled or c.softirq)


def irq_handler_kernel_fpu(c: Cpu, hardirq: bool, clobber: int) -> bool:
    """An interrupt handler on CPU ``c`` that wants the FPU (crypto, RAID; random.c's BLAKE2s
    in hard interrupts): kernel_fpu_begin() if irq_fpu_usable(), clobber the components of
    ``clobber``, kernel_fpu_end(). False when the FPU was not usable (the handler takes its
    scalar fallback). The caller has entered the kernel if the interrupt hit user mode."""
    saved_irqs = c.irqs_disabled
    if hardirq:
        c.hardirq += 1
        c.irqs_disabled = True
    else:
        c.softirq += 1
    try:
        if not irq_fpu_usable(c):
            return False
        kernel_fpu_begin_mask(c)
        kernel_fpu_clobber(c, clobber)
        kernel_fpu_end(c)
        return True
    finally:
        if hardirq:
            c.hardirq -= 1
            c.irqs_disabled = saved_irqs
        else:
            c.softirq -= 1


def irq_window(c: Cpu, site: str, named_only: bool = False) -> None:
    """A point of a kernel path where interrupts are enabled: the hard interrupt armed for
    this step (Cpu.irq_in_lock, the components its handler clobbers) arrives here, and
    Cpu.irq_in_lock_used records whether its handler used the FPU. ``site`` names the kernel
    function; an interrupt armed for one site (Cpu.irq_in_lock_site) passes the windows of the
    others, and one armed for no site ("") arrives at the first window unless ``named_only``
    (a window only an interrupt aimed at it reaches)."""
    mask = c.irq_in_lock
    if mask and (c.irq_in_lock_site == site or (not named_only and not c.irq_in_lock_site)):
        c.irq_in_lock = 0
        c.irq_in_lock_used = irq_handler_kernel_fpu(c, True, mask)


def fpregs_locked_irq_window(c: Cpu, site: str = "", named_only: bool = False) -> None:
    """A point inside a fpregs_lock()ed section where interrupts are enabled (only bottom
    halves are off): `irq_window` there. Since 59f5ede3bc0f (v5.18) irq_fpu_usable() refuses
    the FPU to a hard interrupt that lands here."""
    irq_window(c, site, named_only)


def kernel_fpu_begin_mask(c: Cpu, kfpu_mask: int = KFPU_MXCSR) -> None:
    """kernel_fpu_begin_mask() (core.c): take the FPU for kernel use.

    fpregs_lock unless IRQs are off; the caller must have checked irq_fpu_usable() (the kernel
    WARNs; the model raises IllegalEvent). A live user task's registers are saved (and marked
    TIF_NEED_FPU_LOAD), then this CPU's registers belong to no one; MXCSR / FNINIT as asked.
    LDMXCSR on a CPU whose CR4.OSFXSR is still clear (coming online, before fpu__init_cpu())
    takes #UD: an oops, KernelBug ``invalid-opcode``.
    """
    if not irq_fpu_usable(c):
        raise IllegalEvent(f"kernel_fpu_begin() on CPU {c.nr} where irq_fpu_usable() is false")
    if not c.irqs_disabled:
        fpregs_lock(c)
    c.kernel_fpu_allowed = False
    cur = c.current
    if not cur.flags & (PF_KTHREAD | PF_USER_WORKER) and not cur.need_fpu_load:
        cur.need_fpu_load = True
        save_fpregs_to_fpstate(c, cur.fpu)
    __cpu_invalidate_fpregs_state(c)
    if kfpu_mask & KFPU_MXCSR:
        fault = c.regs.set_mxcsr(MXCSR_DEFAULT)
        if fault is not None:  # exc_invalid_op() -> die("invalid opcode")
            raise KernelBug("invalid-opcode", f"{fault.reason} in kernel_fpu_begin_mask() on "
                                              f"CPU {c.nr}")
    if kfpu_mask & KFPU_387:
        c.regs.init_components(1)


def kernel_fpu_begin(c: Cpu) -> None:
    """kernel_fpu_begin() (api.h): kernel_fpu_begin_mask(KFPU_387 | KFPU_MXCSR)."""
    kernel_fpu_begin_mask(c, KFPU_387 | KFPU_MXCSR)


def kernel_fpu_end(c: Cpu) -> None:
    """kernel_fpu_end(): give the FPU back (fpregs_unlock unless IRQs are off)."""
    if c.kernel_fpu_allowed:
        raise IllegalEvent(f"kernel_fpu_end() without kernel_fpu_begin() on CPU {c.nr}")
    c.kernel_fpu_allowed = True
    if not c.irqs_disabled:
        fpregs_unlock(c)


def kernel_fpu_clobber(c: Cpu, mask: int) -> None:
    """What kernel code between kernel_fpu_begin() and kernel_fpu_end() does to the registers:
    overwrite the components of ``mask`` (crypto, RAID, memcpy...), tagged as the kernel's.
    Never PKRU: no kernel FPU user writes it (kernel_fpu_begin() leaves it to the task)."""
    if c.kernel_fpu_allowed:
        raise IllegalEvent(f"FPU use outside kernel_fpu_begin() on CPU {c.nr}")
    c.m.generation += 1
    regs = c.regs
    for i in bit_tuple(mask & regs.xcr0 & _U64 & ~XFEATURE_MASK_PKRU):  # bits 0..63 in XCR0
        regs.set_component(i, token(KERNEL_OWNER, c.m.generation, i, regs.size(i)))


@requires("task_context")
def fpu_sync_fpstate(c: Cpu, fpu: Fpu) -> None:
    """fpu_sync_fpstate(): current's memory image catches up with its live registers (which are
    preserved). ``fpu`` must be current's. A hard interrupt may arrive between the
    TIF_NEED_FPU_LOAD test and the XSAVE (`fpregs_locked_irq_window`)."""
    if fpu is not c.current.fpu:
        raise IllegalEvent("fpu_sync_fpstate() on another task's fpu")
    fpregs_lock(c)
    if not c.current.need_fpu_load:
        fpregs_locked_irq_window(c)
        save_fpregs_to_fpstate(c, fpu)
    fpregs_unlock(c)


def fpregs_assert_state_consistent(c: Cpu) -> None:
    """fpregs_assert_state_consistent() (CONFIG_X86_DEBUG_FPU): with TIF_NEED_FPU_LOAD clear,
    current's registers must be valid here. A violation is a kernel WARN -> `KernelBug`."""
    cur = c.current
    if cur.need_fpu_load or cur.flags & (PF_KTHREAD | PF_USER_WORKER):
        return
    if not fpregs_state_valid(c, cur.fpu):
        raise KernelBug("fpregs-inconsistent",
                        f"{cur.comm}: TIF_NEED_FPU_LOAD clear but registers of CPU {c.nr} "
                        f"not valid (owner {c.fpu_fpregs_owner_ctx}, last_cpu "
                        f"{cur.fpu.last_cpu})")


@requires("user_task")
def fpregs_lock_and_load(c: Cpu) -> None:
    """fpregs_lock_and_load(): lock and make current's registers live (they are then the sole
    truth until fpregs_unlock)."""
    if not irq_fpu_usable(c):
        raise IllegalEvent("fpregs_lock_and_load() where irq_fpu_usable() is false")
    fpregs_lock(c)
    fpregs_assert_state_consistent(c)
    if c.current.need_fpu_load:
        fpregs_restore_userregs(c)


def fpregs_mark_activate(c: Cpu) -> None:
    """fpregs_mark_activate(): current's registers were loaded directly; they are valid here
    and TIF_NEED_FPU_LOAD is cleared."""
    fpu = c.current.fpu
    fpregs_activate(c, fpu)
    fpu.last_cpu = c.nr
    c.current.need_fpu_load = False


def switch_fpu_return(c: Cpu) -> None:
    """switch_fpu_return() (core.c): on exit to user mode with TIF_NEED_FPU_LOAD set."""
    fpregs_lock(c)
    try:
        fpregs_restore_userregs(c)
    finally:
        fpregs_unlock(c)


def init_fpstate_copy_size(system: FpuSystem) -> int:
    """init_fpstate_copy_size(): with XSAVE only legacy area + header (576 bytes) are copied."""
    return XREGS_STATE_SIZE


def fpu_reset_fpstate_regs(c: Cpu) -> None:
    """fpu_reset_fpstate_regs() (core.c, was fpu_reset_fpregs): the memory image becomes the
    init state (legacy area + header of init_fpstate: XSTATE_BV = 0) and TIF_NEED_FPU_LOAD is
    set; the registers are not touched, last_cpu = -1 makes sure they are not reused.

    Kernels before v6.5 (versions row ``exec_invalidates_fpregs``), and variant
    ``exec-fpu-drop`` on any kernel, run v5.14-v6.4's fpu__drop(fpu) there instead, which only
    deactivates this CPU (fpu_fpregs_owner_ctx = NULL): another CPU that still owns the fpu
    and that last_cpu names keeps holding the old registers as valid (1f69383b203e).

    A hard interrupt may arrive between the copy and TIF_NEED_FPU_LOAD
    (`fpregs_locked_irq_window`): one allowed the FPU (variant hardirq-fpu-in-fpregs-lock)
    finds the flag clear and XSAVEs the old program's registers over the copy."""
    fpu = c.current.fpu
    fpregs_lock(c)
    if c.m.system.runs_unfixed("exec-fpu-drop", "exec_invalidates_fpregs"):
        fpregs_deactivate(c, fpu)
    else:
        __fpu_invalidate_fpregs_state(fpu)
    n = init_fpstate_copy_size(c.m.system)
    fpu.fpstate.check_alive("fpu_reset_fpstate_regs")
    fpu.fpstate.regs[0:n] = c.m.init_fpstate.regs[0:n]
    fpregs_locked_irq_window(c, "fpu_reset_fpstate_regs")
    c.current.need_fpu_load = True
    fpregs_unlock(c)


def pkru_write_default(c: Cpu) -> None:
    """pkru_write_default(): with OSPKE, PKRU = init_pkru_value."""
    if c.m.system.ospke:
        c.regs.wrpkru(INIT_PKRU_VALUE)


@requires("task_context")
def fpu__clear_user_states(c: Cpu, fpu: Fpu) -> None:
    """fpu__clear_user_states() (core.c): reset current's user components in the registers
    (supervisor ones restored from memory first if the registers are not valid), PKRU default,
    and mark the registers as the truth. Used at signal delivery and failed sigreturn. A hard
    interrupt may arrive before the marking (`fpregs_locked_irq_window`)."""
    if fpu is not c.current.fpu:
        raise IllegalEvent("fpu__clear_user_states() on another task's fpu")
    fpregs_lock(c)
    system = c.m.system
    if system.xfeatures_mask_supervisor and not fpregs_state_valid(c, fpu):
        os_xrstor_supervisor(c, fpu.fpstate)
    init = c.m.init_fpstate
    fault = c.regs.xrstor(KernelBuf(init.regs, "init_fpstate"), XFEATURE_MASK_USER_RESTORE,
                          system.xrstor_insn)
    assert fault is None, fault
    pkru_write_default(c)
    fpregs_locked_irq_window(c, "fpu__clear_user_states")
    fpregs_mark_activate(c)
    fpregs_unlock(c)


def fpu__drop(c: Cpu, tsk: Task) -> None:
    """fpu__drop() (core.c, exit_thread): a task whose registers are live on this CPU gives
    them up (owner_ctx = NULL); nothing to do if its state is already saved."""
    if tsk.need_fpu_load:
        return
    if tsk is c.current:
        fpregs_deactivate(c, tsk.fpu)


def fpu_inherit_perms(c: Cpu, dst_fpu: Fpu) -> None:
    """fpu_inherit_perms(): a new process copies the group leader's perm and guest_perm
    (FPU_GUEST_PERM_LOCKED included) -- only when dynamic sizing is enabled."""
    if c.m.system.fpu_state_size_dynamic:
        src = c.current.process.leader.fpu
        dst_fpu.perm = src.perm.copy()
        dst_fpu.guest_perm = src.guest_perm.copy()


def update_fpu_shstk(c: Cpu, dst: Task, ssp: int) -> int:
    """update_fpu_shstk(): store the child's new shadow stack pointer in its CET_USER component
    (user_ssp, byte 8). The component must be stored (in use) -- else WARN and 1."""
    if not ssp:
        return 0
    system = c.m.system
    fps = dst.fpu.fpstate
    if not (system.kernel.max_features >> 11) & 1 or get_xsave_addr(system, fps, 11) is None:
        return 1
    value = bytearray(fpstate_read_component(system, fps, 11) or bytes(16))
    value[8:16] = ssp.to_bytes(8, "little")
    fpstate_write_component(system, fps, 11, bytes(value))
    return 0


@requires("task_context")
def fpu_clone(c: Cpu, dst: Task, clone_flags: int, minimal: bool, ssp: int = 0) -> int:
    """fpu_clone() (core.c): the FPU half of copy_thread(), run by the parent.

    The child gets last_cpu = -1, a reset default-sized fpstate and default permissions, and
    TIF_NEED_FPU_LOAD. Kernel threads and user workers (``minimal``) get init_fpstate's legacy
    area and header. Others get an XSAVE of the parent's live registers with RFBM = the child's
    default features: dynamic features (AMX tile data) are caller-saved and never copied. A
    new process (not CLONE_THREAD) inherits the group's permissions; PASID never. A hard
    interrupt may arrive between making the parent's registers live and their XSAVE
    (`fpregs_locked_irq_window`).
    """
    system = c.m.system
    dst_fpu = dst.fpu
    dst_fpu.last_cpu = -1
    fpstate_reset(system, dst_fpu)
    dst.need_fpu_load = True
    if minimal:
        n = init_fpstate_copy_size(system)
        dst_fpu.fpstate.regs[0:n] = c.m.init_fpstate.regs[0:n]
        return 0
    fpregs_lock(c)
    if c.current.need_fpu_load:
        fpregs_restore_userregs(c)
    fpregs_locked_irq_window(c)
    save_fpregs_to_fpstate(c, dst_fpu)
    fpregs_unlock(c)
    if not clone_flags & CLONE_THREAD:
        fpu_inherit_perms(c, dst_fpu)
    dst_fpu.fpstate.xstate_bv = dst_fpu.fpstate.xstate_bv & ~XFEATURE_MASK_PASID
    return update_fpu_shstk(c, dst, ssp)


@requires("task_context", "user_task")
def fpu_flush_thread(c: Cpu) -> None:
    """fpu_flush_thread() (core.c, exec's flush_thread): default fpstate and permissions, init
    register image, TIF_NEED_FPU_LOAD. A larger vmalloc'ed fpstate is dropped from the fpu
    without vfree in the v6.17 code read (the model records it in ``Machine.unreferenced``)."""
    fpu = c.current.fpu
    old = fpu.fpstate
    fpstate_reset(c.m.system, fpu)
    if old is not fpu.embedded and not old.freed:
        c.m.unreferenced.append(old)
    fpu_reset_fpstate_regs(c)


def fpu_swap_kvm_fpstate(c: Cpu, guest_fpu: FpuGuest, enter_guest: bool) -> int:
    """fpu_swap_kvm_fpstate() (core.c): KVM switches current between its own fpstate and the
    vCPU's. The outgoing state is saved if live (not for confidential guests), the pointers are
    swapped (``task_fpstate`` is the kernel's __task_fpstate), the incoming state is restored
    with XFD first, and the registers are marked current's (a hard interrupt may arrive before
    that: `fpregs_locked_irq_window`)."""
    fpu = c.current.fpu
    cur_fps = fpu.fpstate
    fpregs_lock(c)
    if not cur_fps.is_confidential and not c.current.need_fpu_load:
        save_fpregs_to_fpstate(c, fpu)
    if enter_guest:
        fpu.task_fpstate = cur_fps
        fpu.fpstate = guest_fpu.fpstate
        guest_fpu.fpstate.in_use = True
    else:
        guest_fpu.fpstate.in_use = False
        assert fpu.task_fpstate is not None, "leaving a guest that was never entered"
        fpu.fpstate = fpu.task_fpstate
        fpu.task_fpstate = None
    cur_fps = fpu.fpstate
    if not cur_fps.is_confidential:
        restore_fpregs_from_fpstate(c, cur_fps, XFEATURE_MASK_FPSTATE)
    else:
        xfd_update_state(c, cur_fps)
    fpregs_locked_irq_window(c)
    fpregs_mark_activate(c)
    fpregs_unlock(c)
    return 0


# -- seed 004: the one correct way to change current's xstate -----------------------------------


@requires("task_context", "user_task")
def fpregs_update_current_xstate(c: Cpu, i: int, value: bytes) -> str:
    """Change component ``i`` of current's xstate to ``value`` (an XSAVES-managed MSR such as
    IA32_PASID or IA32_PL3_SSP, or any user component), under fpregs_lock().

    The rule (Andy Lutomirski on fpu__pasid_write(), seed 004): modify the registers only when
    they are the one source of truth (TIF_NEED_FPU_LOAD clear); otherwise modify the memory
    image and invalidate every preserved copy (last_cpu = -1), so the next restore reads
    memory. Returns where the write went: "regs" or "memory".

    Variant ``pasid-write-incoherent`` is the rejected v1 order: write the register whenever
    TIF_NEED_FPU_LOAD is clear *or* fpregs_state_valid(); the memory image (the truth while the
    flag is set) keeps the old value and the write is lost as soon as anyone reloads from it.

    A hard interrupt may arrive between the TIF_NEED_FPU_LOAD test and the register write
    (`fpregs_locked_irq_window`). One allowed the FPU (variant hardirq-fpu-in-fpregs-lock, the
    irq_fpu_usable() of 2021, when the rule was agreed) saves the registers into the memory
    image and sets the flag, and the write then goes into registers that are no longer the
    task's.
    """
    system = c.m.system
    fpu = c.current.fpu
    if not (fpu.fpstate.xfeatures >> i) & 1:
        raise IllegalEvent(f"component {i} has no space in current's fpstate")
    fpregs_lock(c)
    try:
        if system.has_variant("pasid-write-incoherent"):
            if not c.current.need_fpu_load or fpregs_state_valid(c, fpu):
                c.regs.set_component(i, value)
                return "regs"
            fpstate_write_component(system, fpu.fpstate, i, value)
            return "memory"
        if not c.current.need_fpu_load:
            fpregs_locked_irq_window(c, "fpregs_update_current_xstate")
            fpregs_assert_state_consistent(c)
            c.regs.set_component(i, value)
            return "regs"
        fpstate_write_component(system, fpu.fpstate, i, value)
        __fpu_invalidate_fpregs_state(fpu)
        return "memory"
    finally:
        fpregs_unlock(c)


def build_init_fpstate(system: FpuSystem) -> Fpstate:
    """init_fpstate as setup_init_fpu_buf() leaves it: kernel default size and features,
    xfd = init_fpstate.xfd, XCOMP_BV = default features | bit 63 (compacted), XSTATE_BV = 0,
    and the legacy area as FXSAVE wrote it after an all-init XRSTOR: FCW 037FH, MXCSR 1F80H,
    MXCSR_MASK = the CPU's. The buffer is the kernel's one page (union fpregs_state).

    Before f9dfb5e390fa (v5.13, and variant ``init-fpstate-by-xsaves``) the read-back was
    copy_xregs_to_kernel_booting(): XSAVES where the CPU has it, whose init optimisation
    writes nothing of a component in its initial configuration -- every one, after that
    XRSTOR -- so FCW, MXCSR and MXCSR_MASK stayed 0."""
    from fpstate.kernel.x86.types import FPREGS_STATE_SIZE

    fps = Fpstate(size=system.kernel.default_size, user_size=system.user.default_size,
                  xfeatures=system.kernel.default_features,
                  user_xfeatures=system.user.default_features, xfd=system.init_xfd,
                  regs=bytearray(FPREGS_STATE_SIZE))
    xstate_init_xcomp_bv(system, fps, fps.xfeatures)
    if system.xsaves and system.has_variant("init-fpstate-by-xsaves"):
        return fps
    fps.regs[0:2] = (0x37F).to_bytes(2, "little")
    fps.regs[MXCSR_OFFSET:MXCSR_OFFSET + 8] = (
        MXCSR_DEFAULT.to_bytes(4, "little") + system.mxcsr_feature_mask.to_bytes(4, "little"))
    assert fps.regs[HDR:HDR + 8] == bytes(8)
    return fps
