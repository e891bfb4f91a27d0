"""The FPU core's KVM API: the guest-fpstate functions of core.c and xstate.c that KVM calls.

Models the ``#if IS_ENABLED(CONFIG_KVM)`` part of arch/x86/kernel/fpu/core.c (Linux v6.17 as in
Kingxukai/linux 9b44fff6): fpu_alloc_guest_fpstate(), fpu_free_guest_fpstate(),
fpu_enable_guest_xfd_features(), fpu_update_guest_xfd(), fpu_sync_guest_vmexit_xfd_state(),
fpu_copy_guest_fpstate_to_uabi(), fpu_copy_uabi_to_guest_fpstate(); and
fpstate_clear_xstate_component() of xstate.c. They live here because the kernel model
(`fpstate.kernel.x86`) does not carry them; everything they build on is the kernel model's:
__fpstate_reset / fpstate_init_user / fpu_swap_kvm_fpstate (core), fpu_lock_guest_permissions
(xstate_prctl), __xfd_enable_feature / fpstate_realloc (xfd), the UABI copies (regset).

Rules of this file: one function per kernel function, same name, the kernel's order of effects;
functions return what the kernel returns (0 or a negative errno), take the per-CPU context ``c``
(current is the VMM thread that owns the vCPU) where the kernel reads ``current``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fpstate.kernel.x86 import core
from fpstate.kernel.x86.context import requires
from fpstate.kernel.x86.regset import (
    XSTATE_COPY_XSAVE,
    __copy_xstate_to_uabi_buf,
    copy_uabi_to_xstate,
)
from fpstate.kernel.x86.types import Fpstate, FpuGuest, FpuSystem, IllegalEvent, KernelBug
from fpstate.kernel.x86.xfd import __xfd_enable_feature
from fpstate.kernel.x86.xstate_prctl import EINVAL, fpu_lock_guest_permissions
from fpstate.x86.xfeatures import XFEATURE_MASK_PKRU

if TYPE_CHECKING:
    from fpstate.kernel.x86.sched import Cpu, KPath

#: sizeof(struct kvm_xsave) (uapi asm/kvm.h): the uabi_size of every new guest FPU.
KVM_XSAVE_SIZE = 4096


def fpu_alloc_guest_fpstate(c: Cpu) -> FpuGuest:
    """fpu_alloc_guest_fpstate() (core.c, v6.17): called by kvm_arch_vcpu_create().

    vzalloc(guest_default_cfg.size + 64); is_valloc and is_guest are set *before*
    __fpstate_reset(), so the guest branch runs (guest default size and features, XFD = 0, the
    architectural RESET value); fpstate_init_user() writes XCOMP_BV and the FXSAVE init values
    (FCW 037FH, MXCSR 1F80H; MXCSR_MASK stays 0). xfeatures = guest defaults; uabi_size =
    sizeof(struct kvm_xsave) (WARN and raise to fpu_user_cfg.default_size if that were larger).
    Finally fpu_lock_guest_permissions(): every vCPU creation locks the process's guest
    permission. (The model's allocation does not fail; the kernel returns false on -ENOMEM.)
    """
    system = c.m.system
    fps = core.fpstate_alloc(system, system.guest.size, valloc=True)
    fps.is_guest = True
    core.__fpstate_reset(system, fps)
    core.fpstate_init_user(system, fps)
    uabi_size = KVM_XSAVE_SIZE
    if system.user.default_size > uabi_size:
        c.m.log.append("WARNING: fpu_alloc_guest_fpstate: fpu_user_cfg.default_size > 4096")
        uabi_size = system.user.default_size
    gfpu = FpuGuest(xfeatures=system.guest.features, xfd_err=0, uabi_size=uabi_size, fpstate=fps)
    fpu_lock_guest_permissions(c)
    return gfpu


def fpu_free_guest_fpstate(c: Cpu, gfpu: FpuGuest) -> None:
    """fpu_free_guest_fpstate() (core.c): vfree() the guest fpstate. A buffer that is not a
    vmalloc'ed guest one, or that is still swapped in (in_use), is a WARN and is kept."""
    fps = gfpu.fpstate
    if not fps.is_valloc or not fps.is_guest or fps.in_use:
        raise KernelBug("free-guest-fpstate-in-use",
                        f"fpu_free_guest_fpstate of fpstate #{fps.ident} (in_use={fps.in_use})")
    core.vfree(c, fps)


@requires("preemptible")
def fpu_enable_guest_xfd_features(c: Cpu, gfpu: FpuGuest, xfeatures: int) -> KPath:
    """fpu_enable_guest_xfd_features() (core.c): from kvm_check_cpuid() at KVM_SET_CPUID2, with
    the dynamic features the guest CPUID enumerates. Those already enabled are dropped; for the
    rest __xfd_enable_feature(): -EPERM without *guest* permission (ARCH_REQ_XCOMP_GUEST_PERM
    before the first vCPU), else the guest fpstate is reallocated at the guest permission's
    size and gfpu->xfeatures / uabi_size grow. Preemption must be enabled (it may sleep)."""
    xfeatures &= ~gfpu.xfeatures
    if not xfeatures:
        return 0
    return (yield from __xfd_enable_feature(c, xfeatures, gfpu))


def guest_xfd_clears_xstate_bv(system: FpuSystem) -> bool:
    """Whether ``system`` runs b45f72177594 (fix ``guest_xfd_clears_xstate_bv``, not variant
    ``guest-xfd-keeps-xstate-bv``): no guest fpstate keeps an XSTATE_BV bit its XFD arms."""
    return not system.runs_unfixed("guest-xfd-keeps-xstate-bv", "guest_xfd_clears_xstate_bv")


def fpu_update_guest_xfd(c: Cpu, gfpu: FpuGuest, xfd: int) -> None:
    """fpu_update_guest_xfd() (core.c): a guest write of IA32_XFD that KVM emulates (or a
    host KVM_SET_MSRS). Under fpregs_lock: with fix guest_xfd_clears_xstate_bv (b45f72177594,
    6.19 and stable), when current's registers are not live (TIF_NEED_FPU_LOAD: an
    interrupt's kernel_fpu_begin() or a context switch saved the guest's since the exit) the
    components ``xfd`` arms lose their XSTATE_BV bits, which a save under the old XFD set --
    with proposed fix guest_xfd_host_write also when the guest fpstate is not swapped in at
    all (a VMM's KVM_SET_MSRS outside KVM_RUN, whose own registers are live; variant
    guest-xfd-host-write-keeps-xstate-bv is the merged test alone); then fps->xfd = xfd,
    and the MSR is updated at once if the guest fpstate is the one swapped in (in_use).
    Variant guest-xfd-keeps-xstate-bv runs the code before the fix. KVM handles the guest's
    WRMSR with interrupts on: a hard interrupt aimed at this section arrives between fps->xfd
    and the MSR, when they (and the per-CPU xfd_state) disagree."""
    fps = gfpu.fpstate
    system = c.m.system
    core.fpregs_lock(c)
    if system.runs_unfixed("guest-xfd-host-write-keeps-xstate-bv", "guest_xfd_host_write"):
        not_live = c.current.need_fpu_load  # b45f72177594 as merged: current's flag only
    else:
        not_live = not fps.in_use or c.current.need_fpu_load
    if xfd and not_live and guest_xfd_clears_xstate_bv(system):
        # b45f72177594: the guest's registers are not live, so no XSAVE with the new XFD
        # will clear XSTATE_BV[i] for a component it arms; a later XRSTORS would #NM.
        fps.xstate_bv &= ~xfd
    fps.xfd = xfd
    core.fpregs_locked_irq_window(c, "fpu_update_guest_xfd", named_only=True)
    if fps.in_use:
        core.xfd_update_state(c, gfpu.fpstate)
    core.fpregs_unlock(c)


@requires("irqs_disabled")
def fpu_sync_guest_vmexit_xfd_state(c: Cpu) -> None:
    """fpu_sync_guest_vmexit_xfd_state() (core.c): after a VM-exit with XFD writes not
    intercepted, the guest may have changed IA32_XFD itself; read it back into current's
    (the guest's) fpstate and the per-CPU cache, before anything relies on it."""
    if c.m.system.fpu_state_size_dynamic:
        fps = c.current.fpu.fpstate
        fps.xfd = c.regs.xfd
        c.xfd_state = fps.xfd


def fpu_copy_guest_fpstate_to_uabi(c: Cpu, gfpu: FpuGuest, size: int, xfeatures: int,
                                   pkru: int) -> bytes:
    """fpu_copy_guest_fpstate_to_uabi() (core.c): the guest fpstate as a ``size``-byte UABI
    (standard format) buffer, __copy_xstate_to_uabi_buf() in XSTATE_COPY_XSAVE mode with
    ``xfeatures`` (KVM passes guest_supported_xcr0 | FP | SSE) and PKRU = ``pkru`` (KVM's
    vcpu->arch.pkru, not the buffer's). Hosts without XSAVE copy the 512-byte FXSAVE area and
    claim FP|SSE in the header; the model's systems all have XSAVE."""
    system = c.m.system
    if not system.xsave:
        raise IllegalEvent("the KVM model runs on XSAVE hosts only")
    # init_fpstate's image is only sliced (read): no copy of its page is needed
    return __copy_xstate_to_uabi_buf(system, c.m.init_fpstate.regs,  # type: ignore[arg-type]
                                     gfpu.fpstate, xfeatures, pkru, XSTATE_COPY_XSAVE, size)


def fpu_copy_uabi_to_guest_fpstate(c: Cpu, gfpu: FpuGuest, buf: bytes, xcr0: int,
                                   vpkru: list[int]) -> int:
    """fpu_copy_uabi_to_guest_fpstate() (core.c): KVM_SET_XSAVE's copy into the guest fpstate.

    A header XSTATE_BV with a bit outside ``xcr0`` (KVM passes kvm_caps.supported_xcr0, the
    KVM-wide mask, not the guest's) is -EINVAL. Without PKRU in the header, ``vpkru`` is
    replaced by NULL so that vcpu->arch.pkru keeps its value (KVM's historic ABI). Then
    With fix guest_xfd_clears_xstate_bv, a header bit of a component the guest fpstate's XFD
    arms WARNs and is -EINVAL (KVM_SET_XSAVE has cleared them). Then
    copy_uabi_from_kernel_to_xstate(): header within the fpstate's user_xfeatures, XCOMP_BV 0,
    reserved bytes 0, MXCSR within mxcsr_feature_mask, else -EINVAL; user components copied,
    supervisor ones kept. ``vpkru`` is a one-element list standing for the u32 pointer."""
    xstate_bv = int.from_bytes(buf[512:520], "little")
    if xstate_bv & ~xcr0:
        return -EINVAL
    if xstate_bv & gfpu.fpstate.xfd and guest_xfd_clears_xstate_bv(c.m.system):
        # b45f72177594: "Disabled features must be in their initial state, otherwise XRSTOR
        # causes an exception" -- WARN_ON_ONCE, then -EINVAL (KVM clears them before).
        raise KernelBug("xfd-armed-in-uabi-buffer",
                        f"XSTATE_BV {xstate_bv:#x} has components IA32_XFD "
                        f"{gfpu.fpstate.xfd:#x} arms")
    pkru = vpkru if xstate_bv & XFEATURE_MASK_PKRU else None
    return copy_uabi_to_xstate(c.m.system, gfpu.fpstate, buf, pkru)


def fpstate_clear_xstate_component(system: FpuSystem, fps: Fpstate, xfeature: int) -> None:
    """fpstate_clear_xstate_component() (xstate.c, KVM export): memset the component to 0 when
    get_xsave_addr() finds it stored (XSTATE_BV bit set); the header bit is *not* cleared
    (zero is the initial configuration of every component KVM clears this way)."""
    fps.check_alive("fpstate_clear_xstate_component")
    off = core.get_xsave_addr(system, fps, xfeature)
    if off is None:
        return
    size = system.profile.component(xfeature).size
    fps.regs[off:off + size] = bytes(size)


__all__ = [
    "KVM_XSAVE_SIZE", "fpstate_clear_xstate_component", "fpu_alloc_guest_fpstate",
    "fpu_copy_guest_fpstate_to_uabi", "fpu_copy_uabi_to_guest_fpstate",
    "fpu_enable_guest_xfd_features", "fpu_free_guest_fpstate", "fpu_sync_guest_vmexit_xfd_state",
    "fpu_update_guest_xfd", "guest_xfd_clears_xstate_bv",
]
