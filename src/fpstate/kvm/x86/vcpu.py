"""VMs and vCPUs in the model: /dev/kvm on the kernel model, the guest permission flow, vCPU
creation and KVM_SET_CPUID2, KVM_RUN with a guest that touches its state, INIT, and a VMM.

Models the vCPU lifecycle of arch/x86/kvm/x86.c and cpuid.c (Linux v6.18): kvm_arch_vcpu_create()
(fpu_alloc_guest_fpstate, which locks the process's guest permission, then RESET),
kvm_vcpu_ioctl_set_cpuid2() (kvm_set_cpuid: identical re-sets only once the vCPU has run;
kvm_check_cpuid sizes the guest fpstate for dynamic features, EPERM without guest permission;
kvm_vcpu_after_set_cpuid derives guest_supported_xcr0/xss), kvm_arch_vcpu_ioctl_run() with
vcpu_enter_guest() (what each guest action costs in exits), and INIT through
kvm_apic_accept_events() (KVM_GET_MP_STATE, or inside KVM_RUN).

Theory of operation
-------------------
`Kvm` is the kvm module loaded on a kernel `Machine`: its frozen `KvmConfig` (kvm_caps, the
host's raw CPUID, the selected rejected designs) plus the VMs. The ioctl functions take the
per-CPU context ``c`` whose current task is the VMM thread, as the kernel runs them; `Vmm` is
a VMM process on the machine whose methods are the system calls (arch_prctl, KVM ioctls),
each entering and leaving the kernel. A guest is a sequence of `GuestOp`s run between VM entry
and exit on the CPU's registers; an op KVM intercepts costs an exit and a re-entry.

Variants (rejected designs, `KVM_VARIANTS`): ``kvm-save-min-size`` (seed 000, fpu.py),
``init-keeps-cet`` (seed 003, x86.py), ``guest-only-in-host-fpstate`` (seed 001: the host's
default features include CET_KERNEL, applied to the booted kernel by `model_system`),
``kvm-pkru-cr4-pke-only`` (fpu.py), ``get-xsave-unmasked`` (x86.py),
``user-xfeatures-guest-only`` (kvm_vcpu_after_set_cpuid), ``xfd-sync-after-irqoff`` (fpu.py),
``nm-intercept-follows-xfd`` (x86.py) and ``nm-xfd-err-read-irqs-on`` (`_guest_op`), from
KVM's own history.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fpstate.errors import FpstateError, ProgramError
from fpstate.kernel.x86 import core
from fpstate.kernel.x86.hw import token
from fpstate.kernel.x86.sched import KPath, Machine, Task
from fpstate.kernel.x86.types import (
    XFEATURE_MASK_GUEST_SUPERVISOR,
    Fpstate,
    FpuGuest,
    FpuSystem,
    IllegalEvent,
    StateConfig,
    Variant,
)
from fpstate.kernel.x86.xstate_prctl import EINVAL, sys_arch_prctl, xstate_get_group_perm
from fpstate.kvm.x86 import fpu as kfpu
from fpstate.kvm.x86 import x86
from fpstate.kvm.x86.cpuid import (
    XFD,
    XGETBV1,
    XSAVEC,
    XSAVEOPT,
    XSAVES,
    CpuidEntry2,
    KvmCaps,
    cpuid_get_supported_xcr0,
    cpuid_get_supported_xss,
    cpuid_regs,
    guest_cpu_cap_has,
    kvm_cap_xsave2,
    kvm_check_cpuid_dynamic,
    kvm_update_cpuid_runtime,
    kvm_x86_dev_get_attr,
    kvm_x86_vendor_init,
    supported_cpuid_leaf_0xd,
)
from fpstate.kvm.x86.fpu_api import fpu_alloc_guest_fpstate, fpu_enable_guest_xfd_features
from fpstate.x86.cpuid import CpuidProfile
from fpstate.x86.layout import compacted_size
from fpstate.x86.program import Fault, Outcome, Placement, Program
from fpstate.x86.xfeatures import XFEATURE_MASK_FP

KVM_VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("kvm-save-min-size", "kvm_load_guest_fpu",
            "seed 000: kvm_save_current_fpu() in [v10,10/28] of the AMX series (Aug 2021), "
            "rejected by Thomas Gleixner ('that assumption is just broken')",
            "the task's registers are saved with the task's own feature mask into "
            "vcpu->arch.user_fpu, allocated at vCPU creation with the default size: once the "
            "task's fpstate grew for AMX tile data the XSAVE writes past the allocation"),
    Variant("init-keeps-cet", "kvm_xstate_reset",
            "seed 003: kvm_xstate_reset() before the CET series (MPX-only clearing)",
            "INIT zeroes BNDREGS/BNDCSR but leaves CET_USER and CET_KERNEL (IA32_U_CET, "
            "IA32_PL0-3_SSP) as they were, though INIT architecturally clears them"),
    Variant("guest-only-in-host-fpstate", "fpu__init_system_xstate",
            "seed 001: case 3 of the CET supervisor series' measurements (v4 cover letter, "
            "Mar 2025): 'allocate CET-S space for all tasks'",
            "CET_KERNEL is in fpu_kernel_cfg.default_features: every host fpstate carries the "
            "24 bytes of guest-only state (and init_fpstate too)"),
    Variant("kvm-pkru-cr4-pke-only", "kvm_load_guest_xsave_state",
            "vmx_vcpu_run() before 37486135d3a7 (v5.7, 'KVM: x86: Fix pkru save/restore when "
            "guest CR4.PKE=0, move it to x86.c')",
            "guest and host PKRU are switched only when the guest has CR4.PKE; a guest with "
            "PKRU in XCR0 but CR4.PKE clear reads the host's PKRU with XSAVE and changes it with "
            "XRSTOR, and the VMM thread returns to user space with the guest's PKRU"),
    Variant("get-xsave-unmasked", "kvm_vcpu_ioctl_x86_get_xsave2",
            "KVM from the v5.16 FPU rework (fpu_copy_fpstate_to_kvm_uabi() replaced "
            "fill_xsave() and its guest_supported_xcr0 mask) until ad856280ddea ('x86/kvm/fpu: "
            "Limit guest user_xfeatures to supported bits of XCR0'); since 'x86/fpu: Allow "
            "caller to constrain xfeatures when copying to uabi buffer' (2023) the mask is "
            "applied by KVM_GET_XSAVE{2} itself",
            "KVM_GET_XSAVE/KVM_GET_XSAVE2 copy every feature of the guest fpstate's "
            "user_xfeatures, not only those of the guest's CPUID: a guest that was not offered "
            "PKRU gets a buffer with PKRU in XSTATE_BV (the host's PKRU was saved into the guest "
            "fpstate), which a destination without PKRU refuses -- live migration fails"),
    Variant("user-xfeatures-guest-only", "kvm_vcpu_after_set_cpuid",
            "KVM from ad856280ddea ('x86/kvm/fpu: Limit guest user_xfeatures to supported bits "
            "of XCR0') until 'KVM: x86: Always enable legacy FP/SSE in allowed user XFEATURES' "
            "(QEMU migration from a pre-XSAVE host failed, RH bz 2079311)",
            "KVM_SET_CPUID2 sets the guest fpstate's user_xfeatures to guest_supported_xcr0: for "
            "a guest offered no XSAVE features that is 0, so KVM_GET_XSAVE's header drops x87 "
            "and SSE (their values, MXCSR included, do not travel) and KVM_SET_XSAVE refuses a "
            "buffer that has them"),
    Variant("xfd-sync-after-irqoff", "vcpu_exit_xfd",
            "v3 of the AMX series (December 2021: 'kvm: x86: Disable interception for IA32_XFD "
            "on demand' syncs after handle_exit_irqoff()); the merged b5274b1b7ba8 (v5.17) "
            "syncs first, 'which may rely on the fact that guest_fpu::xfd is up-to-date (e.g. in "
            "#NM irqoff handler)'",
            "fpu_sync_guest_vmexit_xfd_state() runs after handle_exit_irqoff(): a guest that "
            "armed XFD itself (writes passed through) and took the #NM in the same entry is "
            "judged by a stale fps->xfd, its IA32_XFD_ERR is not saved into guest_fpu.xfd_err "
            "and stays in the CPU's MSR: the guest's emulated WRMSR XFD_ERR 0 never reaches "
            "it, and a vCPU that runs on another CPU next reads 0"),
    Variant("nm-intercept-follows-xfd", "vmx_update_exception_bitmap",
            "b5274b1b7ba8 'kvm: x86: Disable interception for IA32_XFD on demand' (v5.17) "
            "without its exception-bitmap hunk, which replaced v4's rule (#NM trapped iff the "
            "guest fpstate's xfd is nonzero): 'Always trap #NM in this case for proper "
            "virtualization of guest xfd_err'",
            "with XFD writes passed through, the #NM intercept follows fps->xfd as it was at "
            "the last bitmap update (an INIT, the first nonzero XFD write): a guest that "
            "disarmed XFD before an INIT and arms it again takes its XFD #NM without an exit, "
            "KVM saves no XFD_ERR and leaves it in the CPU's MSR: the guest's WRMSR XFD_ERR 0 "
            "never reaches it, and on another CPU it reads 0"),
    Variant("nm-xfd-err-read-irqs-on", "handle_nm_fault_irqoff",
            "the rule of 'kvm: x86: Intercept #NM for saving IA32_XFD_ERR' (v5.17): 'This must "
            "be done with interrupt disabled, otherwise the unsaved MSR value may be clobbered "
            "by host operations'",
            "a guest XFD #NM's IA32_XFD_ERR is read in handle_exit(), with interrupts and "
            "preemption on: preempted in between and moved to another CPU (or after a host "
            "task's own XFD #NM there), the vCPU thread reads that CPU's 0, and the guest's "
            "#NM handler finds no XFD cause"),
)}

#: kvm_cpu_caps[CPUID_D_1_EAX] each vendor module keeps (VMX: XSAVES needs the "enable
#: XSAVES/XRSTORS" VM-execution control, assumed present; SVM: no XFD on AMD; PVM, measured on
#: this host: none of them).
VENDOR_D1_EAX = {"vmx": 0x1F, "svm": 0x0F, "pvm": 0x00}


@dataclass(frozen=True, slots=True)
class KvmConfig:
    """What the model of KVM is configured with: kvm_caps (`KvmCaps`), the host's raw CPUID
    (do_host_cpuid's answers) and the selected variants."""

    caps: KvmCaps
    host: CpuidProfile
    variants: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        unknown = set(self.variants) - set(KVM_VARIANTS)
        if unknown:
            raise FpstateError(f"unknown KVM model variant(s) {', '.join(sorted(unknown))} "
                               f"(known: {', '.join(KVM_VARIANTS)})")


@dataclass(frozen=True, slots=True)
class Violation:
    """A named kernel rule the model saw broken (the checker reports it by ``name``)."""

    name: str
    detail: str


class Kvm:
    """The kvm module loaded on ``m``: configuration, VMs, and what went wrong."""

    def __init__(self, m: Machine, config: KvmConfig) -> None:
        self.m = m
        self.config = config
        self.caps = config.caps
        self.vms: list[KvmVm] = []
        self.violations: list[Violation] = []
        self.warnings: list[Violation] = []

    def has_variant(self, name: str) -> bool:
        assert name in KVM_VARIANTS, f"unknown variant {name}"
        return name in self.config.variants

    def violation(self, name: str, detail: str) -> None:
        self.violations.append(Violation(name, detail))

    def warn(self, name: str, detail: str) -> None:
        self.warnings.append(Violation(name, detail))


@dataclass(slots=True, eq=False)
class KvmVm:
    kvm: Kvm
    vcpus: list[KvmVcpu] = field(default_factory=list)


@dataclass(slots=True, eq=False)
class VcpuArch:
    """struct kvm_vcpu_arch, the XSAVE-related fields."""

    guest_fpu: FpuGuest
    xcr0: int = XFEATURE_MASK_FP
    ia32_xss: int = 0
    pkru: int = 0
    host_pkru: int = 0
    guest_supported_xcr0: int = 0
    guest_supported_xss: int = 0
    cpuid: tuple[CpuidEntry2, ...] = ()
    cpuid_dynamic_bits_dirty: bool = False
    xfd_no_write_intercept: bool = False
    #: the #NM bit of the VMCS exception bitmap, as vmx_update_exception_bitmap() last set it
    nm_intercepted: bool = False
    cr4_osxsave: bool = False
    cr4_pke: bool = False
    cr0_ts: bool = False
    user_fpu: Fpstate | None = None  #: variant kvm-save-min-size only
    user_fpu_tail: bytearray = field(default_factory=bytearray)


@dataclass(slots=True, eq=False)
class KvmVcpu:
    kvm: Kvm
    vm: KvmVm
    vcpu_id: int
    arch: VcpuArch
    wants_to_run: bool = False
    last_vmentry_cpu: int = -1  #: kvm_vcpu_has_run() is last_vmentry_cpu != -1
    stat_fpu_reload: int = 0
    pending_init: bool = False


@dataclass(frozen=True, slots=True)
class GuestOp:
    """One thing the guest does between VM entry and exit.

    ``write`` component ``number`` (``data`` or a token naming the guest), ``read`` component
    ``number``, ``release`` the components of mask ``value`` (TILERELEASE, VZEROALL...),
    ``xsetbv`` XCR ``number`` = ``value`` at ``cpl``, ``wrmsr``/``rdmsr`` MSR ``number``,
    ``clts``/``stts`` guest CR0.TS, ``ldmxcsr`` MXCSR = ``value``, ``init`` an INIT IPI
    processed inside KVM_RUN."""

    kind: str
    number: int = 0
    value: int = 0
    data: bytes | None = None
    cpl: int = 0


GUEST_OPS = frozenset({"write", "read", "release", "xsetbv", "wrmsr", "rdmsr", "clts", "stts",
                       "ldmxcsr", "init"})


@dataclass(frozen=True, slots=True)
class RunResult:
    """What KVM_RUN did: one result per guest op (None, a value, bytes, or the Fault the guest
    took), and the out-of-bounds write of the user-FPU save, if any (variant only)."""

    results: tuple[Any, ...]
    overflow: kfpu.OutOfBounds | None = None


# -- system and VM ioctls -------------------------------------------------------------------------


def kvm_dev_get_supported_cpuid_0xd(c: Any, kvm: Kvm) -> tuple[CpuidEntry2, ...]:
    """KVM_GET_SUPPORTED_CPUID, leaf 0xD, for the calling process's guest permission."""
    return supported_cpuid_leaf_0xd(kvm.caps, kvm.config.host, xstate_get_group_perm(c, True))


def kvm_vm_check_extension_xsave2(c: Any, kvm: Kvm) -> int:
    """KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) for the calling process's guest permission."""
    return kvm_cap_xsave2(kvm.caps, xstate_get_group_perm(c, True))


def kvm_arch_vcpu_create(c: Any, vm: KvmVm, vcpu_id: int) -> KvmVcpu:
    """KVM_CREATE_VCPU -> kvm_arch_vcpu_create() (x86.c): the guest fpstate is allocated with
    the guest defaults (fpu_alloc_guest_fpstate, which locks the guest permission of the
    process: a later ARCH_REQ_XCOMP_GUEST_PERM that changes it gets EBUSY), then
    kvm_vcpu_reset(vcpu, false) (RESET: XCR0 = 1, nothing to clear)."""
    kvm = vm.kvm
    arch = VcpuArch(guest_fpu=fpu_alloc_guest_fpstate(c))
    if kvm.has_variant("kvm-save-min-size"):
        arch.user_fpu = kfpu.alloc_user_fpu(c.m.system)
    vcpu = KvmVcpu(kvm, vm, vcpu_id, arch)
    x86.kvm_vcpu_reset(c, vcpu, False)
    vm.vcpus.append(vcpu)
    return vcpu


def kvm_vcpu_after_set_cpuid(vcpu: KvmVcpu) -> None:
    """kvm_vcpu_after_set_cpuid() (cpuid.c), XSAVE part: guest_supported_xcr0/xss from the new
    CPUID, and the runtime bits of leaf 0xD for the current XCR0/XSS."""
    arch = vcpu.arch
    caps = vcpu.kvm.caps
    arch.guest_supported_xcr0 = cpuid_get_supported_xcr0(caps, arch.cpuid)
    if vcpu.kvm.has_variant("user-xfeatures-guest-only"):
        # ad856280ddea's fix, before legacy FP/SSE were always allowed: the guest fpstate's
        # user_xfeatures, which both KVM_GET_XSAVE's header mask and KVM_SET_XSAVE's header
        # check use, is the guest's supported XCR0.
        arch.guest_fpu.fpstate.user_xfeatures = arch.guest_supported_xcr0
    arch.guest_supported_xss = cpuid_get_supported_xss(caps, arch.cpuid)
    arch.cpuid = kvm_update_cpuid_runtime(caps, arch.cpuid, arch.xcr0, arch.ia32_xss)


def kvm_vcpu_ioctl_set_cpuid2(c: Any, vcpu: KvmVcpu, entries: Sequence[CpuidEntry2]) -> KPath:
    """KVM_SET_CPUID2 -> kvm_set_cpuid() (cpuid.c). Once the vCPU has run only an identical
    table is accepted (0, nothing changes; anything else -EINVAL). Else kvm_check_cpuid():
    the dynamic features CPUID.(0DH,0) enumerates get space in the guest fpstate now
    (fpu_enable_guest_xfd_features: -EPERM without guest permission, and the old CPUID stays);
    then the table is installed and kvm_vcpu_after_set_cpuid() runs."""
    entries = tuple(entries)
    if vcpu.last_vmentry_cpu != -1:
        return 0 if entries == vcpu.arch.cpuid else -EINVAL
    dynamic = kvm_check_cpuid_dynamic(entries)
    if dynamic:
        r = yield from fpu_enable_guest_xfd_features(c, vcpu.arch.guest_fpu, dynamic)
        if r:
            return r
    vcpu.arch.cpuid = entries
    kvm_vcpu_after_set_cpuid(vcpu)
    return 0


def kvm_vcpu_ioctl_get_cpuid2(vcpu: KvmVcpu) -> tuple[CpuidEntry2, ...]:
    """KVM_GET_CPUID2: the guest CPUID as KVM holds it, its dynamic bits (leaf 0xD EBX) brought
    up to date first when XCR0 or IA32_XSS changed (kvm_update_cpuid_runtime)."""
    arch = vcpu.arch
    if arch.cpuid_dynamic_bits_dirty:
        arch.cpuid = kvm_update_cpuid_runtime(vcpu.kvm.caps, arch.cpuid, arch.xcr0, arch.ia32_xss)
        arch.cpuid_dynamic_bits_dirty = False
    return arch.cpuid


def kvm_apic_accept_events(c: Any, vcpu: KvmVcpu) -> int:
    """kvm_apic_accept_events() (lapic.c), INIT part: a latched INIT runs kvm_vcpu_reset(vcpu,
    init_event=true). Returns the xfeature mask INIT zeroed (0 when none was pending)."""
    if not vcpu.pending_init:
        return 0
    vcpu.pending_init = False
    return x86.kvm_vcpu_reset(c, vcpu, True)


# -- KVM_RUN --------------------------------------------------------------------------------------


def _exit(c: Any, vcpu: KvmVcpu, nm: bool = False) -> None:
    """A VM exit, up to where vcpu_enter_guest() turns interrupts back on: the host's XCR0,
    XSS and PKRU back (kvm_load_host_xsave_state), then the XFD lines around
    handle_exit_irqoff() (`kfpu.vcpu_exit_xfd`; for an intercepted #NM the handler is
    handle_nm_fault_irqoff)."""
    kfpu.kvm_load_host_xsave_state(c, vcpu)
    kfpu.vcpu_exit_xfd(c, vcpu, kfpu.handle_nm_fault_irqoff if nm else None)


#: The place in the exit path where a hard interrupt armed for it arrives (Cpu.irq_in_lock_site):
#: handle_exit(), which vcpu_enter_guest()'s caller runs with interrupts and preemption on.
HANDLE_EXIT = "handle_exit"
#: Where a KVM_RUN may be preempted (kvm_arch_vcpu_ioctl_run's ``preempt_at``): the run loop's
#: cond_resched() before the first entry, or the handling of the program's first intercepted
#: exit.
PREEMPT_POINTS = ("entry", "exit")


class _Killed:
    """A fatal signal arrived while the run was preempted: the loop leaves (-EINTR)."""


KILLED = _Killed()


def _handle_exit(c: Any, vcpu: KvmVcpu,
                 preempt: list[bool]) -> Generator[None, Any, tuple[Any, bool]]:
    """vcpu_enter_guest() has returned and vcpu_run() handles the exit with interrupts and
    preemption on: a hard interrupt armed for this place arrives now, outside any
    fpregs_lock()ed section, so irq_fpu_usable() lets its handler take the FPU --
    kernel_fpu_begin() saves the guest's registers into the guest fpstate (current's while it
    is swapped in) and sets TIF_NEED_FPU_LOAD; then, if ``preempt`` (the run's one preemption
    point) is here, the task is preempted, and the context switch saves them likewise. (The
    CPU the task goes on with -- another after a migration --, whether a fatal signal came
    meanwhile.)"""
    c.irqs_disabled = False
    core.irq_window(c, HANDLE_EXIT, named_only=True)
    if preempt[0]:
        preempt[0] = False
        c = yield
        return c, c.current.killed_by is not None
    return c, False


def _reenter(c: Any, vcpu: KvmVcpu) -> None:
    """vcpu_enter_guest() again after an exit handled with interrupts on: interrupts off, the
    guest's registers reloaded if an interrupt or a context switch saved them meanwhile
    (TIF_NEED_FPU_LOAD -> switch_fpu_return(), as at the first entry), then the guest's XCR0,
    XSS, PKRU and XFD_ERR (kvm_load_guest_xsave_state)."""
    c.irqs_disabled = True
    if c.current.need_fpu_load:
        core.switch_fpu_return(c)
    vcpu.last_vmentry_cpu = c.nr
    kfpu.kvm_load_guest_xsave_state(c, vcpu)


def _guest_op(c: Any, vcpu: KvmVcpu, op: GuestOp,
              preempt: list[bool]) -> Generator[None, Any, tuple[Any, Any]]:
    """One guest action on the CPU (in guest mode, guest XCR0/XSS/PKRU loaded): (its result,
    the CPU the guest runs on afterwards), or (`KILLED`, the CPU) when a fatal signal ended
    the run while an exit's handling was preempted (``preempt``: `_handle_exit`)."""
    arch = vcpu.arch
    if op.kind in ("write", "read") and op.number >= 2 and not arch.cr4_osxsave:
        return Fault("#UD", "guest CR4.OSXSAVE = 0: no XSAVE-managed state beyond x87/SSE"), c
    if op.kind == "write":
        if op.number >= 2 and not (c.regs.xcr0 >> op.number) & 1:
            return Fault("#UD", f"XCR0[{op.number}] = 0"), c  # before any operand is read
        data = op.data if op.data is not None else _guest_token(c, vcpu, op.number)
        fault = c.regs.user_write(op.number, data)
        if fault is not None and fault.vector == "#NM" and arch.nm_intercepted:
            # The #NM intercept (exception bitmap), then its re-injection into the guest.
            late = vcpu.kvm.has_variant("nm-xfd-err-read-irqs-on")
            _exit(c, vcpu, nm=not late)
            c, killed = yield from _handle_exit(c, vcpu, preempt)
            if killed:
                return KILLED, c
            if late:
                kfpu.handle_nm_fault_irqoff(c, vcpu)
            _reenter(c, vcpu)
        return fault, c
    if op.kind == "read":
        if op.number >= 2 and not (c.regs.xcr0 >> op.number) & 1:
            return Fault("#UD", f"XCR0[{op.number}] = 0"), c
        return c.regs.component(op.number), c
    if op.kind == "release":
        c.regs.init_components(op.value & c.regs.xcr0)
        return None, c
    if op.kind == "ldmxcsr":  # no exit: LDMXCSR is not intercepted
        return c.regs.set_mxcsr(op.value), c
    if op.kind in ("clts", "stts"):
        arch.cr0_ts = op.kind == "stts"
        return None, c
    if op.kind == "rdmsr" and op.number == x86.MSR_IA32_XFD_ERR and guest_cpu_cap_has(
            vcpu.kvm.caps, arch.cpuid, XFD):
        return c.regs.xfd_err, c  # reads pass through once the guest has XFD (vmx.c)
    if op.kind == "wrmsr" and op.number == x86.MSR_IA32_XFD and arch.xfd_no_write_intercept:
        if op.value & ~x86.kvm_guest_supported_xfd(vcpu):
            return Fault("#GP", f"WRMSR IA32_XFD {op.value:#x}: bits the CPU cannot arm"), c
        c.regs.xfd = op.value  # passed through since the first nonzero write
        return None, c
    # Everything else is intercepted: exit, handle (interrupts on), re-enter.
    _exit(c, vcpu)
    c, killed = yield from _handle_exit(c, vcpu, preempt)
    if killed:
        return KILLED, c
    if op.kind == "xsetbv":
        result: Any = x86.kvm_emulate_xsetbv(vcpu, op.cpl, op.number, op.value)
    elif op.kind == "wrmsr":
        ret = x86.kvm_do_msr_access_write(c, vcpu, op.number, op.value, False)
        result = Fault("#GP", f"WRMSR {op.number:#x} refused") if ret else None
    elif op.kind == "rdmsr":
        ret, value = x86.kvm_do_msr_access_read(c, vcpu, op.number, False)
        result = Fault("#GP", f"RDMSR {op.number:#x} refused") if ret else value
    elif op.kind == "init":
        vcpu.pending_init = True
        result = kvm_apic_accept_events(c, vcpu)
    else:
        raise IllegalEvent(f"unknown guest op {op.kind!r} (known: {', '.join(sorted(GUEST_OPS))})")
    _reenter(c, vcpu)
    return result, c


#: The writer ids of guests' values (fpstate.kernel.x86.hw.token) have this bit.
GUEST_OWNER = 0x8000


def guest_owner(vcpu: KvmVcpu) -> int:
    """The writer id of the values a guest writes: `GUEST_OWNER`, the VM's number among the
    module's VMs and the vCPU's id (which is unique only within its VM)."""
    return GUEST_OWNER | vcpu.kvm.vms.index(vcpu.vm) << 8 | vcpu.vcpu_id


def _guest_token(c: Any, vcpu: KvmVcpu, i: int) -> bytes:
    c.m.generation += 1
    return token(guest_owner(vcpu), c.m.generation, i, c.regs.size(i))


def kvm_arch_vcpu_ioctl_run(c: Any, vcpu: KvmVcpu, ops: Sequence[GuestOp],
                            preempt_at: str = "entry", done: list[Any] | None = None) -> KPath:
    """KVM_RUN -> kvm_arch_vcpu_ioctl_run() (x86.c): kvm_load_guest_fpu(); a pending INIT is
    accepted with the guest FPU loaded; one preemption point, ``preempt_at``: the run loop's
    cond_resched() before the first entry, or the handling of the first intercepted exit
    (`_handle_exit`; a program without one is not preempted); vcpu_enter_guest(): the guest
    registers reloaded if a context switch saved them (TIF_NEED_FPU_LOAD ->
    switch_fpu_return), guest XCR0/XSS/PKRU and XFD_ERR loaded, the ops, host state back;
    kvm_put_guest_fpu(). Returns a `RunResult` (without the results of the ops a fatal signal
    kept from running); ``done``, if given, receives each op's result as it completes (what a
    caller sees of a run stopped at its preemption point)."""
    for op in ops:
        if op.kind not in GUEST_OPS:
            raise IllegalEvent(f"unknown guest op {op.kind!r} (known: {sorted(GUEST_OPS)})")
    if preempt_at not in PREEMPT_POINTS:
        raise IllegalEvent(f"unknown preemption point {preempt_at!r} "
                           f"(known: {', '.join(PREEMPT_POINTS)})")
    vcpu.wants_to_run = True
    overflow = kfpu.kvm_load_guest_fpu(c, vcpu)
    kvm_apic_accept_events(c, vcpu)
    if preempt_at == "entry":
        c = yield
    if c.current.killed_by is not None:
        # A fatal signal arrived while the run loop was preempted: kvm_vcpu_exit_request()
        # / xfer_to_guest_mode_handle_work() leave the loop (-EINTR) without entering the
        # guest, and the guest FPU is put back on the way out.
        kfpu.kvm_put_guest_fpu(c, vcpu)
        vcpu.wants_to_run = False
        return RunResult((), overflow)
    if c.current.need_fpu_load:
        # vcpu_enter_guest(): a context switch saved the guest registers into the guest
        # fpstate (fpu->fpstate while loaded) and set TIF_NEED_FPU_LOAD; reload them now.
        core.switch_fpu_return(c)
    c.irqs_disabled = True
    vcpu.last_vmentry_cpu = c.nr
    kfpu.kvm_load_guest_xsave_state(c, vcpu)
    preempt = [preempt_at == "exit"]
    results: list[Any] = [] if done is None else done
    for op in ops:
        result, c = yield from _guest_op(c, vcpu, op, preempt)
        if result is KILLED:
            # kvm_vcpu_exit_request(): out of the run loop with the guest FPU put back.
            kfpu.kvm_put_guest_fpu(c, vcpu)
            vcpu.wants_to_run = False
            return RunResult(tuple(results), overflow)
        results.append(result)
    _exit(c, vcpu)
    c.irqs_disabled = False
    kfpu.kvm_put_guest_fpu(c, vcpu)
    vcpu.wants_to_run = False
    return RunResult(tuple(results), overflow)


# -- a VMM process ------------------------------------------------------------------------------


def _as_path(fn: Callable[..., Any]) -> Callable[..., KPath]:
    """A kernel path (generator) that runs ``fn`` without preemption points."""
    def path(c: Any, *args: Any) -> KPath:
        result = fn(c, *args)
        if False:  # pragma: no cover - makes this a generator
            yield
        return result
    return path


class Vmm:
    """A VMM process (QEMU-like) on the kernel model: one thread on CPU 0 of ``machine`` that
    makes system calls. Each method is one arch_prctl or KVM ioctl from user mode."""

    def __init__(self, machine: Machine, config: KvmConfig, comm: str = "qemu") -> None:
        self.m = machine
        self.kvm = Kvm(machine, config)
        self.task: Task = machine.spawn(comm)
        machine.run(0, self.task)

    @property
    def nr(self) -> int:
        assert self.task.on_cpu is not None, "the VMM thread is not running"
        return self.task.on_cpu

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.m.syscall(self.nr, _as_path(fn), *args)

    def arch_prctl(self, option: int, arg2: int) -> int:
        return self.m.syscall(self.nr, sys_arch_prctl, option, arg2)

    def create_vm(self) -> KvmVm:
        vm = KvmVm(self.kvm)
        self.kvm.vms.append(vm)
        return vm

    def create_vcpu(self, vm: KvmVm, vcpu_id: int = 0) -> KvmVcpu:
        return self.call(kvm_arch_vcpu_create, vm, vcpu_id)

    def supported_cpuid_0xd(self) -> tuple[CpuidEntry2, ...]:
        return self.call(kvm_dev_get_supported_cpuid_0xd, self.kvm)

    def cap_xsave2(self) -> int:
        return self.call(kvm_vm_check_extension_xsave2, self.kvm)

    def xcomp_guest_supp(self) -> int:
        return kvm_x86_dev_get_attr(self.kvm.caps, 0, 0)

    def set_cpuid2(self, vcpu: KvmVcpu, entries: Sequence[CpuidEntry2]) -> int:
        return self.m.syscall(self.nr, kvm_vcpu_ioctl_set_cpuid2, vcpu, entries)

    def set_cr4(self, vcpu: KvmVcpu, *, osxsave: bool = True, pke: bool = False) -> None:
        """KVM_SET_SREGS, the CR4 bits the model reads (OSXSAVE, PKE)."""
        vcpu.arch.cr4_osxsave, vcpu.arch.cr4_pke = osxsave, pke

    def get_xcrs(self, vcpu: KvmVcpu) -> dict[int, int]:
        return self.call(lambda c: x86.kvm_vcpu_ioctl_x86_get_xcrs(vcpu))

    def set_xcrs(self, vcpu: KvmVcpu, xcrs: list[tuple[int, int]], flags: int = 0) -> int:
        return self.call(lambda c: x86.kvm_vcpu_ioctl_x86_set_xcrs(vcpu, xcrs, flags))

    def get_msrs(self, vcpu: KvmVcpu, indices: list[int]) -> dict[int, int]:
        return self.call(x86.kvm_vcpu_ioctl_get_msrs, vcpu, indices)

    def set_msrs(self, vcpu: KvmVcpu, msrs: list[tuple[int, int]]) -> int:
        return self.call(x86.kvm_vcpu_ioctl_set_msrs, vcpu, msrs)

    def get_xsave(self, vcpu: KvmVcpu) -> bytes | int:
        return self.call(x86.kvm_arch_vcpu_ioctl_get_xsave, vcpu)

    def get_xsave2(self, vcpu: KvmVcpu) -> bytes:
        return self.call(x86.kvm_arch_vcpu_ioctl_get_xsave2, vcpu)

    def set_xsave(self, vcpu: KvmVcpu, buf: bytes) -> int:
        return self.call(x86.kvm_arch_vcpu_ioctl_set_xsave, vcpu, buf)

    def get_fpu(self, vcpu: KvmVcpu) -> bytes:
        return self.call(x86.kvm_arch_vcpu_ioctl_get_fpu, vcpu)

    def set_fpu(self, vcpu: KvmVcpu, fpu: bytes) -> int:
        return self.call(x86.kvm_arch_vcpu_ioctl_set_fpu, vcpu, fpu)

    def init(self, vcpu: KvmVcpu) -> int:
        """INIT the way the real backend does: latch it (KVM_SET_VCPU_EVENTS), then
        KVM_GET_MP_STATE runs kvm_apic_accept_events(). Returns the mask INIT zeroed."""
        vcpu.pending_init = True
        return self.call(kvm_apic_accept_events, vcpu)

    def run(self, vcpu: KvmVcpu, ops: Sequence[GuestOp] = ()) -> RunResult:
        return self.m.syscall(self.nr, kvm_arch_vcpu_ioctl_run, vcpu, tuple(ops))


# -- configurations -------------------------------------------------------------------------------


def model_system(profile: CpuidProfile, variants: frozenset[str] = frozenset(),
                 kernel: str | None = None) -> FpuSystem:
    """The kernel model booted on ``profile`` (fpu__init_system_xstate, then the run-time
    facts of FpuSystem.from_boot). Variant
    ``guest-only-in-host-fpstate`` adds the guest-only supervisor features the CPU has to
    fpu_kernel_cfg.default_features (and the default size)."""
    from fpstate.kernel.x86.xstate import fpu__init_system_xstate

    boot = fpu__init_system_xstate(profile, kernel) if kernel else fpu__init_system_xstate(profile)
    system = FpuSystem.from_boot(profile, boot)
    if "guest-only-in-host-fpstate" in variants:
        k = system.kernel
        feats = k.default_features | (k.max_features & XFEATURE_MASK_GUEST_SUPERVISOR)
        size = compacted_size(profile, feats) if system.xcompacted else k.default_size
        system = system.with_options(kernel=StateConfig(k.max_size, size, k.max_features, feats,
                                                        k.legacy_features,
                                                        k.independent_features))
    return system


def model_config(system: FpuSystem, vendor: str = "vmx",
                 variants: frozenset[str] | Sequence[str] = frozenset()) -> KvmConfig:
    """KVM loaded on the kernel model: kvm_x86_vendor_init() with the XCR0 and IA32_XSS that
    kernel wrote, for a vendor module of `VENDOR_D1_EAX`."""
    if vendor not in VENDOR_D1_EAX:
        raise FpstateError(f"unknown KVM vendor {vendor!r} (known: {', '.join(VENDOR_D1_EAX)})")
    p = system.profile
    host_d1 = sum(bit for bit, flag in ((XSAVEOPT, system.xsaveopt), (XSAVEC, system.xsavec),
                                        (XGETBV1, system.xgetbv1), (XSAVES, system.xsaves),
                                        (XFD, system.xfd)) if flag)
    caps = kvm_x86_vendor_init(p, system.xcr0, system.xss, host_d1_eax=host_d1,
                               vendor_d1_eax=VENDOR_D1_EAX[vendor],
                               cet=p.has("SHSTK") or p.has("IBT"),
                               amx=system.kernel_has("kvm_amx"))
    return KvmConfig(caps, p, frozenset(variants))


def model_vmm(profile: CpuidProfile, vendor: str = "vmx",
              variants: Sequence[str] = (), ncpus: int = 1) -> Vmm:
    """A machine booted on ``profile`` with KVM loaded and a VMM process running on CPU 0."""
    variants = frozenset(variants)
    system = model_system(profile, variants)
    return Vmm(Machine(system, ncpus), model_config(system, vendor, variants))


# -- guest programs -------------------------------------------------------------------------------


def guest_hardware_profile(vcpu: KvmVcpu) -> CpuidProfile:
    """The CPU a guest's instructions meet: the host's silicon (XSAVEC and XGETBV(1) work in a
    guest whatever its CPUID says: KVM cannot intercept them), XCR0 limited to what
    __kvm_set_xcr lets the guest enable, IA32_XSS to guest_supported_xss, and XSAVES/XRSTORS
    only where KVM enables them for the guest (#UD otherwise: VMX's enable-XSAVES control)."""
    host = vcpu.kvm.config.host
    arch = vcpu.arch
    xcr0 = arch.guest_supported_xcr0 | XFEATURE_MASK_FP
    xss = arch.guest_supported_xss
    leaves = dict(host.leaves)
    a0, b0, c0, _ = host.cpuid(0xD, 0)
    leaves[(0xD, 0)] = (a0 & xcr0 & 0xFFFFFFFF, b0, c0, host.cpuid(0xD, 0)[3] & xcr0 >> 32)
    a1, b1, _, _ = host.cpuid(0xD, 1)
    if not guest_cpu_cap_has(vcpu.kvm.caps, arch.cpuid, XSAVES):
        a1 &= ~XSAVES
    leaves[(0xD, 1)] = (a1, b1, xss & 0xFFFFFFFF, xss >> 32)
    return CpuidProfile.from_leaves(f"{host.name} as KVM guest", leaves,
                                    "host CPUID, XSAVE enumeration as KVM lets the guest use it")


def run_guest_program(vcpu: KvmVcpu, program: Program, *, xcr0: int, xss: int = 0,
                      xfd: int = 0, preempt: bool = True,
                      placement: Sequence[Placement] | None = None) -> list[Outcome]:
    """The model's answer to what `fpstate.host.kvm_guest` runs: the guest's own XSETBV of
    ``xcr0`` at CPL 0 (kvm_emulate_xsetbv) and, when the guest CPUID has XSAVES, its WRMSR of
    IA32_XSS = ``xss`` (kvm_set_msr_common) and, when the guest CPUID has XFD, its WRMSR of
    IA32_XFD = ``xfd`` (AMX under XFD: fpu_update_guest_xfd) -- a refusal of any is
    ProgramError, as on the host -- then the program on the CPU model
    (`fpstate.x86.insn.run_program`) of the guest's hardware (`guest_hardware_profile`),
    under the guest's CR4.PKE (KVM_SET_SREGS: WRPKRU and RDPKRU are #UD without it).
    XINUSE is not reported where the guest CPUID lacks XGETBV1 (the runner reads it only
    then). Returns the set of outcomes the CPU may give (``preempt=False``: only that of an
    undisturbed run, as `run_program` takes it); ``placement`` as `run_program` takes it
    (`fpstate.host.kvm_guest.GuestMachine.placement`)."""
    from fpstate.x86.insn import run_program

    vcpu.arch.cr4_osxsave = True
    fault = x86.kvm_emulate_xsetbv(vcpu, 0, 0, xcr0)
    if fault is not None:
        raise ProgramError(f"XSETBV of XCR0 faulted in the guest: {fault} (xcr0 {xcr0:#x})")
    if cpuid_regs(vcpu.arch.cpuid, 0xD, 1)[0] & XSAVES:
        c = vcpu.kvm.m.cpus[0]
        if x86.kvm_do_msr_access_write(c, vcpu, x86.MSR_IA32_XSS, xss, False):
            raise ProgramError(f"WRMSR IA32_XSS {xss:#x} faulted in the guest (#GP)")
    elif xss:
        raise ProgramError(f"IA32_XSS={xss:#x} needs XSAVES, and the guest CPUID lacks it: "
                           "CPUID.(EAX=0DH,ECX=1):EAX[3]=0")
    if cpuid_regs(vcpu.arch.cpuid, 0xD, 1)[0] & XFD:  # every run, as the host runner does
        c = vcpu.kvm.m.cpus[0]
        if x86.kvm_do_msr_access_write(c, vcpu, x86.MSR_IA32_XFD, xfd, False):
            raise ProgramError(f"WRMSR IA32_XFD {xfd:#x} faulted in the guest (#GP)")
    elif xfd:
        raise ProgramError(f"IA32_XFD={xfd:#x} needs XFD, and the guest CPUID lacks it: "
                           "CPUID.(EAX=0DH,ECX=1):EAX[4]=0")
    outcomes = run_program(guest_hardware_profile(vcpu), program, xcr0=xcr0, xss=xss, xfd=xfd,
                           preempt=preempt, cr4_pke=vcpu.arch.cr4_pke, placement=placement)
    if not cpuid_regs(vcpu.arch.cpuid, 0xD, 1)[0] & XGETBV1:
        outcomes = [Outcome(o.buffers, o.values, o.fault, o.fault_step, None, o.final)
                    for o in outcomes]
    return outcomes


__all__ = [
    "GUEST_OPS", "KVM_VARIANTS", "VENDOR_D1_EAX", "GuestOp", "Kvm", "KvmConfig", "KvmVcpu",
    "KvmVm", "RunResult", "VcpuArch", "Violation", "Vmm", "guest_hardware_profile",
    "kvm_arch_vcpu_create", "kvm_arch_vcpu_ioctl_run", "kvm_vcpu_ioctl_set_cpuid2",
    "model_config", "model_system", "model_vmm", "run_guest_program",
]
