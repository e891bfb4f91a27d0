"""The guest FPU: swapping task and guest fpstates around KVM_RUN, guest XCR0/XSS/PKRU around
VM entry, guest XFD and XFD_ERR with #NM interception, and the guest-only supervisor state.

Models (Linux v6.18) kvm_load_guest_fpu(), kvm_put_guest_fpu(), kvm_load_guest_xsave_state(),
kvm_load_host_xsave_state() and the XFD_ERR handling of vcpu_enter_guest() (arch/x86/kvm/x86.c),
handle_nm_fault_irqoff() and the XFD write-intercept switch of vmx_set_msr()
(arch/x86/kvm/vmx/vmx.c), on top of fpu_swap_kvm_fpstate() (arch/x86/kernel/fpu/core.c, in
the kernel model).

Theory of operation
-------------------
A vCPU's guest fpstate (struct fpu_guest) is allocated at vCPU creation with the *guest* default
size and features (guest_default_cfg: the host defaults plus the guest-only supervisor feature
CET_KERNEL, seed 001). KVM_RUN swaps it in: fpu_swap_kvm_fpstate() saves the registers into
the task's *current* fpstate -- whatever its size, even after it grew for AMX (seed 000) --
points fpu->fpstate at the guest's and restores it. From then until kvm_put_guest_fpu() the
kernel's ordinary machinery (context switch, kernel_fpu_begin) saves and restores the guest
state in the guest fpstate. XCR0, IA32_XSS and PKRU are switched separately, right around VM
entry, because the kernel's XSAVES/XRSTORS of the fpstates must run with the host's XCR0/XSS.

Guest XFD: the guest fpstate is sized for the dynamic features at KVM_SET_CPUID2; KVM never
allocates on a guest #NM. Writes to IA32_XFD are emulated (fpu_update_guest_xfd) until the
first nonzero one, after which VMX passes them through and intercepts #NM instead; an XFD #NM
is read into guest_fpu.xfd_err before interrupts are enabled and re-injected.

Rejected designs kept as variants (selected by name in `KvmConfig.variants`, see `vcpu`;
``kvm-pkru-cr4-pke-only``: `_guest_uses_pkru`):
``kvm-save-min-size`` (seed 000: the task's registers saved into a default-sized
vcpu->arch.user_fpu; the model lets the write run past the allocation and reports the bytes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fpstate.kernel.x86 import core
from fpstate.kernel.x86.hw import Buf
from fpstate.kernel.x86.types import (
    XFEATURE_MASK_FPSTATE,
    XFEATURE_MASK_GUEST_SUPERVISOR,
    Fpstate,
    FpuSystem,
    IllegalEvent,
)
from fpstate.kvm.x86.cpuid import XSAVES, guest_cpu_cap_has
from fpstate.kvm.x86.fpu_api import fpu_sync_guest_vmexit_xfd_state
from fpstate.x86.program import Fault
from fpstate.x86.xfeatures import XFEATURE_MASK_PKRU, mask_names

if TYPE_CHECKING:
    from fpstate.kernel.x86.sched import Cpu, Machine
    from fpstate.kvm.x86.vcpu import KvmVcpu

PKRU = 9


@dataclass(frozen=True, slots=True)
class OutOfBounds:
    """An XSAVE-family write past the end of a buffer: bytes [first, end) of a buffer whose
    allocation is ``alloc`` bytes -- the seed-000 memory corruption, reported, not raised."""

    what: str
    first: int
    end: int
    alloc: int

    @property
    def bytes_beyond(self) -> int:
        return self.end - max(self.first, self.alloc)

    def __str__(self) -> str:
        return (f"{self.what}: XSAVE wrote bytes {max(self.first, self.alloc)}..{self.end} "
                f"beyond its {self.alloc}-byte allocation")


class OverflowBuf(Buf):
    """A kernel buffer that, unlike the kernel model's KernelBuf, lets a save run past its
    allocation (as the hardware would, into whatever follows) and records how far: the bytes
    beyond are kept in ``tail`` so that a restore reads back what was written."""

    def __init__(self, regs: bytearray, tail: bytearray, what: str) -> None:
        self.regs = regs
        self.tail = tail
        self.addr = 0
        self.what = what
        self.overflow: OutOfBounds | None = None

    def check(self, spans: Iterable[tuple[int, int]], write: bool = False) -> Fault | None:
        alloc = len(self.regs)
        for off, n in spans:
            if off + n > alloc:
                end = off + n
                prev = self.overflow
                first = min(off, prev.first) if prev else off
                end = max(end, prev.end) if prev else end
                self.overflow = OutOfBounds(self.what, max(first, alloc), end, alloc)
        return None

    def _extend(self, end: int) -> None:
        need = end - len(self.regs)
        if need > len(self.tail):
            self.tail.extend(bytes(need - len(self.tail)))

    def read(self, off: int, n: int) -> bytes:
        self._extend(off + n)
        return bytes((self.regs + self.tail)[off:off + n])

    def write(self, off: int, data: bytes) -> None:
        self._extend(off + len(data))
        alloc = len(self.regs)
        for k, b in enumerate(data):
            pos = off + k
            if pos < alloc:
                self.regs[pos] = b
            else:
                self.tail[pos - alloc] = b


def alloc_user_fpu(system: FpuSystem) -> Fpstate:
    """Variant ``kvm-save-min-size``: vcpu->arch.user_fpu of the 2021 code, allocated at vCPU
    creation from x86_fpu_cache with the default (minimum) size -- "KVM does not support
    dynamic user states yet. Assume the buffer always has the minimum size." (seed 000)."""
    fps = core.fpstate_alloc(system, system.kernel.default_size, valloc=False)
    core.__fpstate_reset(system, fps)
    return fps


def _check_swap(vcpu: KvmVcpu, enter: bool) -> None:
    gfpu = vcpu.arch.guest_fpu
    if gfpu is None:
        raise IllegalEvent(f"vCPU {vcpu.vcpu_id} has no guest fpstate")
    if gfpu.fpstate.in_use == enter:
        state = "already loaded" if enter else "not loaded"
        raise IllegalEvent(f"vCPU {vcpu.vcpu_id}: guest FPU {state} (KVM_BUG_ON)")


def kvm_load_guest_fpu(c: Cpu, vcpu: KvmVcpu) -> OutOfBounds | None:
    """kvm_load_guest_fpu() (x86.c): fpu_swap_kvm_fpstate(&vcpu->arch.guest_fpu, true) at the
    start of KVM_RUN. The task's live registers are saved into the task's current fpstate --
    the one the kernel sized for everything the task has used -- so no write can overflow.
    Returns the overflow the variant ``kvm-save-min-size`` causes (None under the kernel's
    design)."""
    _check_swap(vcpu, True)
    if vcpu.kvm.has_variant("kvm-save-min-size"):
        return _load_guest_fpu_min_size(c, vcpu)
    core.fpu_swap_kvm_fpstate(c, vcpu.arch.guest_fpu, True)
    return None


def kvm_put_guest_fpu(c: Cpu, vcpu: KvmVcpu) -> None:
    """kvm_put_guest_fpu() (x86.c): fpu_swap_kvm_fpstate(&vcpu->arch.guest_fpu, false) at the
    end of KVM_RUN (and around INIT's clearing): the guest registers are saved into the guest
    fpstate and the task's restored; ++vcpu->stat.fpu_reload."""
    _check_swap(vcpu, False)
    if vcpu.kvm.has_variant("kvm-save-min-size"):
        _put_guest_fpu_min_size(c, vcpu)
    else:
        core.fpu_swap_kvm_fpstate(c, vcpu.arch.guest_fpu, False)
    vcpu.stat_fpu_reload += 1


def _load_guest_fpu_min_size(c: Cpu, vcpu: KvmVcpu) -> OutOfBounds | None:
    """The rejected kvm_load_guest_fpu() of the v10 AMX series (seed 000): kvm_save_current_fpu
    (vcpu->arch.user_fpu) -- a memcpy of the minimum size when TIF_NEED_FPU_LOAD is set, else
    an XSAVE with the *task's* feature mask into the default-sized user_fpu -- then the guest
    state is restored."""
    system = c.m.system
    fpu = c.current.fpu
    cur = fpu.fpstate
    user_fpu = vcpu.arch.user_fpu
    assert user_fpu is not None, "variant kvm-save-min-size allocates user_fpu at vCPU creation"
    core.fpregs_lock(c)
    overflow = None
    if c.current.need_fpu_load:
        n = min(system.kernel.default_size, len(cur.regs))
        user_fpu.regs[0:n] = cur.regs[0:n]
    else:
        vcpu.arch.user_fpu_tail = bytearray()
        buf = OverflowBuf(user_fpu.regs, vcpu.arch.user_fpu_tail,
                          f"vcpu{vcpu.vcpu_id}->arch.user_fpu")
        fault = c.regs.xsave(buf, cur.xfeatures, system.xsave_insn)
        assert fault is None, fault
        overflow = buf.overflow
    fpu.task_fpstate = cur
    fpu.fpstate = vcpu.arch.guest_fpu.fpstate
    fpu.fpstate.in_use = True
    core.restore_fpregs_from_fpstate(c, fpu.fpstate, XFEATURE_MASK_FPSTATE)
    core.fpregs_mark_activate(c)
    core.fpregs_unlock(c)
    if overflow is not None:
        vcpu.kvm.violation("xsave-out-of-bounds", str(overflow))
    return overflow


def _put_guest_fpu_min_size(c: Cpu, vcpu: KvmVcpu) -> None:
    """The rejected kvm_put_guest_fpu(): save the guest registers, restore the task's from
    user_fpu (reading back whatever the overflowing save left past its end)."""
    system = c.m.system
    fpu = c.current.fpu
    core.fpregs_lock(c)
    if not c.current.need_fpu_load:
        core.save_fpregs_to_fpstate(c, fpu)
    vcpu.arch.guest_fpu.fpstate.in_use = False
    assert fpu.task_fpstate is not None
    fpu.fpstate = fpu.task_fpstate
    fpu.task_fpstate = None
    user_fpu = vcpu.arch.user_fpu
    assert user_fpu is not None
    buf = OverflowBuf(user_fpu.regs, vcpu.arch.user_fpu_tail, "user_fpu")
    core.xfd_update_state(c, fpu.fpstate)
    fault = c.regs.xrstor(buf, system.kernel.max_features & XFEATURE_MASK_FPSTATE,
                          system.xrstor_insn)
    assert fault is None, fault
    core.fpregs_mark_activate(c)
    core.fpregs_unlock(c)


# -- around VM entry ----------------------------------------------------------------------------


def kvm_load_guest_xsave_state(c: Cpu, vcpu: KvmVcpu) -> None:
    """kvm_load_guest_xsave_state() (x86.c), just before VM entry with IRQs off: with guest
    CR4.OSXSAVE, XCR0 = the guest's if it differs from kvm_host.xcr0, and IA32_XSS = the
    guest's if the guest may use XSAVES and it differs; PKRU = vcpu->arch.pkru when the host
    has PKU, the guest uses PKRU (XCR0 or CR4.PKE) and it differs. The guest's pending
    XFD_ERR is put back into the MSR (vcpu_enter_guest)."""
    arch = vcpu.arch
    caps = vcpu.kvm.caps
    system = c.m.system
    if arch.guest_fpu.xfd_err:
        c.regs.xfd_err = arch.guest_fpu.xfd_err
    if arch.cr4_osxsave:
        if arch.xcr0 != caps.host_xcr0:
            c.regs.xcr0 = arch.xcr0
        if guest_cpu_cap_has(caps, arch.cpuid, XSAVES) and arch.ia32_xss != caps.host_xss:
            c.regs.xss = arch.ia32_xss
    if system.ospke:
        arch.host_pkru = int.from_bytes(c.regs.component(PKRU)[:4], "little")
        if arch.pkru != arch.host_pkru and _guest_uses_pkru(vcpu):
            c.regs.wrpkru(arch.pkru)


def _guest_uses_pkru(vcpu: KvmVcpu) -> bool:
    """Whether PKRU is switched for the guest: PKRU in its XCR0 (XSAVE and XRSTOR reach it) or
    CR4.PKE (RDPKRU, WRPKRU). Variant ``kvm-pkru-cr4-pke-only`` asks CR4.PKE only, as
    vmx_vcpu_run() did before v5.7 (SVM then switched no PKRU at all; the variant is VMX's
    rule, whichever vendor the model runs)."""
    arch = vcpu.arch
    if vcpu.kvm.has_variant("kvm-pkru-cr4-pke-only"):
        return arch.cr4_pke
    return bool(arch.xcr0 & XFEATURE_MASK_PKRU) or arch.cr4_pke


def kvm_load_host_xsave_state(c: Cpu, vcpu: KvmVcpu) -> None:
    """kvm_load_host_xsave_state() (x86.c), right after VM exit: read the guest's PKRU into
    vcpu->arch.pkru and put the host's back; restore XCR0 and IA32_XSS where they differ."""
    arch = vcpu.arch
    caps = vcpu.kvm.caps
    if c.m.system.ospke and _guest_uses_pkru(vcpu):
        arch.pkru = int.from_bytes(c.regs.component(PKRU)[:4], "little")
        if arch.pkru != arch.host_pkru:
            c.regs.wrpkru(arch.host_pkru)
    if arch.cr4_osxsave:
        if arch.xcr0 != caps.host_xcr0:
            c.regs.xcr0 = caps.host_xcr0
        if guest_cpu_cap_has(caps, arch.cpuid, XSAVES) and arch.ia32_xss != caps.host_xss:
            c.regs.xss = caps.host_xss


def handle_nm_fault_irqoff(c: Cpu, vcpu: KvmVcpu) -> None:
    """handle_nm_fault_irqoff() (vmx.c): a guest #NM intercepted, interrupts still off. If it
    is an XFD #NM (the guest fpstate arms XFD and guest CR0.TS is clear), IA32_XFD_ERR is read
    into guest_fpu.xfd_err now, before host activity (a host task's own XFD #NM, after a
    preemption once interrupts are on) could clobber it. The test reads fps->xfd, which
    fpu_sync_guest_vmexit_xfd_state() must have brought up to date first (`vcpu_exit_xfd`)."""
    gfpu = vcpu.arch.guest_fpu
    if gfpu.fpstate.xfd and not vcpu.arch.cr0_ts:
        gfpu.xfd_err = c.regs.xfd_err


def vcpu_exit_xfd(c: Cpu, vcpu: KvmVcpu,
                  handle_exit_irqoff: Callable[[Cpu, KvmVcpu], None] | None = None) -> None:
    """The XFD lines of vcpu_enter_guest() after VM exit, interrupts off, around
    ``handle_exit_irqoff`` (for an intercepted #NM: `handle_nm_fault_irqoff`): with XFD writes
    passed through, first sync the guest's IA32_XFD into its fpstate
    (fpu_sync_guest_vmexit_xfd_state: "Sync xfd before calling handle_exit_irqoff() which may
    rely on the fact that guest_fpu::xfd is up-to-date (e.g. in #NM irqoff handler)"), then
    the handler, then IA32_XFD_ERR = 0 if the guest has one pending: the host must not keep
    the guest's. Variant ``xfd-sync-after-irqoff`` syncs after the handler and the clear (the
    order of v3 of the AMX series, December 2021, whose #NM handler still read XFD_ERR
    unconditionally), so the handler tests a stale fps->xfd."""
    late = vcpu.kvm.has_variant("xfd-sync-after-irqoff")
    saved = c.irqs_disabled
    c.irqs_disabled = True
    if vcpu.arch.xfd_no_write_intercept and not late:
        fpu_sync_guest_vmexit_xfd_state(c)
    if handle_exit_irqoff is not None:
        handle_exit_irqoff(c, vcpu)
    if vcpu.arch.guest_fpu.xfd_err:
        c.regs.xfd_err = 0
    if vcpu.arch.xfd_no_write_intercept and late:
        fpu_sync_guest_vmexit_xfd_state(c)
    c.irqs_disabled = saved


# -- guest-only supervisor state (seed 001) -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class DefaultConfigs:
    """The host's and the guest's default fpstate features and sizes, side by side (v6.17:
    fpu_kernel_cfg.default_* versus guest_default_cfg), and what only guests get."""

    host_features: int
    host_size: int
    guest_features: int
    guest_size: int

    @property
    def guest_only(self) -> int:
        return self.guest_features & ~self.host_features

    def to_dict(self) -> dict[str, object]:
        return {"host_default_features": self.host_features, "host_default_size": self.host_size,
                "guest_default_features": self.guest_features,
                "guest_default_size": self.guest_size, "guest_only": self.guest_only,
                "guest_only_names": mask_names(self.guest_only) if self.guest_only else ""}


def default_configs(system: FpuSystem) -> DefaultConfigs:
    """fpu_kernel_cfg.default_features/default_size next to guest_default_cfg (seed 001: a
    guest carries CET_KERNEL, host tasks do not and save its 24 bytes)."""
    return DefaultConfigs(system.kernel.default_features, system.kernel.default_size,
                          system.guest.features, system.guest.size)


def host_fpstates_with_guest_only_state(m: Machine) -> list[str]:
    """The seed-001 rule "guest-only supervisor features (CET_KERNEL) only ever in guest
    fpstates", checked over every live fpstate of the machine: the names of non-guest
    fpstates (init_fpstate included) whose xfeatures, XCOMP_BV or XSTATE_BV contain one."""
    bad = []
    seen: set[int] = set()
    candidates: list[tuple[str, Fpstate]] = [("init_fpstate", m.init_fpstate)]
    for t in m.tasks.values():
        for label, fps in (("fpstate", t.fpu.fpstate), ("__fpstate", t.fpu.embedded),
                           ("__task_fpstate", t.fpu.task_fpstate)):
            if fps is not None:
                candidates.append((f"task {t.pid} ({t.comm}) {label}", fps))
    for label, fps in candidates:
        if id(fps) in seen or fps.is_guest or fps.freed:
            continue
        seen.add(id(fps))
        found = (fps.xfeatures | fps.xcomp_bv | fps.xstate_bv) & XFEATURE_MASK_GUEST_SUPERVISOR
        if found:
            bad.append(f"{label} #{fps.ident} carries {mask_names(found)}")
    return bad


__all__ = [
    "DefaultConfigs", "OutOfBounds", "OverflowBuf", "default_configs", "handle_nm_fault_irqoff",
    "host_fpstates_with_guest_only_state", "kvm_load_guest_fpu", "kvm_load_guest_xsave_state",
    "kvm_load_host_xsave_state", "kvm_put_guest_fpu", "vcpu_exit_xfd",
]
