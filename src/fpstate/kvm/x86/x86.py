"""KVM's XSAVE-related vCPU interfaces: XCR0, the XSAVE MSRs, the XSAVE ioctls, INIT and RESET.

Models arch/x86/kvm/x86.c (Linux v6.18: the v6.17 code of Kingxukai/linux with the KVM CET
series and the "unload FPU state on INIT iff in use" fix):

- __kvm_set_xcr(), kvm_emulate_xsetbv() (guest XSETBV: #GP injected), KVM_GET_XCRS and
  KVM_SET_XCRS (EINVAL);
- the MSR_IA32_XSS, MSR_IA32_XFD and MSR_IA32_XFD_ERR cases of kvm_set_msr_common() and
  kvm_get_msr_common(), kvm_do_msr_access()'s treatment of KVM_MSR_RET_UNSUPPORTED for
  host-initiated accesses, and msr_io() (KVM_GET_MSRS / KVM_SET_MSRS count what succeeded);
- KVM_GET_XSAVE (EINVAL once uabi_size > 4096), KVM_GET_XSAVE2, KVM_SET_XSAVE
  (kvm_vcpu_ioctl_x86_get_xsave2 / set_xsave, PKRU in vcpu->arch.pkru), and the legacy
  KVM_GET_FPU / KVM_SET_FPU, which read and write the image's legacy area without its header;
- kvm_xstate_reset() and the XSAVE part of kvm_vcpu_reset(): INIT zeroes the MPX and CET
  components KVM supports, unloading the guest FPU around it only when it is loaded; RESET
  (vCPU creation) needs nothing because the guest fpstate is zero-allocated (seed 003).

Rules of this file: functions are named after the kernel's; ioctls return what the ioctl
returns (bytes, a count, 0 or a negative errno); MSR handlers return the kernel's 0 / 1 /
KVM_MSR_RET_UNSUPPORTED. The rejected design "init-keeps-cet" (seed 003) is a variant of
`kvm_xstate_reset`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fpstate.errors import FpstateError
from fpstate.kernel.x86.types import KernelBug
from fpstate.kvm.x86 import fpu as kfpu
from fpstate.kvm.x86.cpuid import XFD, XSAVES, guest_cpu_cap_has
from fpstate.kvm.x86.fpu_api import (
    KVM_XSAVE_SIZE,
    fpstate_clear_xstate_component,
    fpu_copy_guest_fpstate_to_uabi,
    fpu_copy_uabi_to_guest_fpstate,
    fpu_update_guest_xfd,
    guest_xfd_clears_xstate_bv,
)
from fpstate.x86.program import Fault
from fpstate.x86.xfeatures import (
    XFEATURE_MASK_AVX512,
    XFEATURE_MASK_BNDCSR,
    XFEATURE_MASK_BNDREGS,
    XFEATURE_MASK_CET_KERNEL,
    XFEATURE_MASK_CET_USER,
    XFEATURE_MASK_CLEARED_BY_INIT,
    XFEATURE_MASK_FP,
    XFEATURE_MASK_FPSSE,
    XFEATURE_MASK_SSE,
    XFEATURE_MASK_XTILE,
    XFEATURE_MASK_XTILE_DATA,
    XFEATURE_MASK_YMM,
    bits,
)

if TYPE_CHECKING:
    from fpstate.kernel.x86.sched import Cpu
    from fpstate.kvm.x86.vcpu import KvmVcpu

EFAULT, EINVAL = 14, 22
XCR_XFEATURE_ENABLED_MASK = 0
KVM_MAX_XCRS = 16
MSR_IA32_XSS = 0xDA0
MSR_IA32_XFD = 0x1C4
MSR_IA32_XFD_ERR = 0x1C5
#: x86.h: a handler's "this MSR does not exist for this vCPU" (host accesses may be tolerated).
KVM_MSR_RET_UNSUPPORTED = 2
#: XFEATURE_MASK_EXTEND (cpuid.h): a change of these XCR0 bits makes CPUID leaf 0xD dirty.
XFEATURE_MASK_EXTEND = ~(XFEATURE_MASK_FPSSE | (1 << 63)) & ((1 << 64) - 1)
XFEATURE_MASK_CET_ALL = XFEATURE_MASK_CET_USER | XFEATURE_MASK_CET_KERNEL
#: The components INIT zeroes (kvm_xstate_reset, v6.18): MPX and CET.
XSTATE_CLEAR_ON_INIT = XFEATURE_MASK_CLEARED_BY_INIT
MSR_IA32_U_CET = 0x6A0
MSR_IA32_PL0_SSP, MSR_IA32_PL1_SSP, MSR_IA32_PL2_SSP, MSR_IA32_PL3_SSP = 0x6A4, 0x6A5, 0x6A6, 0x6A7
#: The XSAVE-managed CET MSRs (is_xstate_managed_msr, x86.h v6.18): MSR -> (component, byte
#: offset in it). CET_USER = IA32_U_CET, IA32_PL3_SSP; CET_KERNEL = IA32_PL0_SSP..PL2_SSP.
XSTATE_MSRS: dict[int, tuple[int, int]] = {
    MSR_IA32_U_CET: (11, 0), MSR_IA32_PL3_SSP: (11, 8), MSR_IA32_PL0_SSP: (12, 0),
    MSR_IA32_PL1_SSP: (12, 8), MSR_IA32_PL2_SSP: (12, 16),
}
#: x86.h: IA32_U_CET bits that must be 0, and the bits that need SHSTK / IBT.
CET_US_RESERVED_BITS = 0xF << 6
CET_US_SHSTK_MASK_BITS = 0x3
CET_US_IBT_MASK_BITS = (0xF << 2) | (((1 << 64) - 1) & ~((1 << 10) - 1))
CET_SUPPRESS, CET_WAIT_ENDBR = 1 << 10, 1 << 11
MODELLED_MSRS = {MSR_IA32_XSS: "MSR_IA32_XSS", MSR_IA32_XFD: "MSR_IA32_XFD",
                 MSR_IA32_XFD_ERR: "MSR_IA32_XFD_ERR", MSR_IA32_U_CET: "MSR_IA32_U_CET",
                 MSR_IA32_PL0_SSP: "MSR_IA32_PL0_SSP", MSR_IA32_PL1_SSP: "MSR_IA32_PL1_SSP",
                 MSR_IA32_PL2_SSP: "MSR_IA32_PL2_SSP", MSR_IA32_PL3_SSP: "MSR_IA32_PL3_SSP"}


# -- XCR0 -----------------------------------------------------------------------------------------


def __kvm_set_xcr(vcpu: KvmVcpu, index: int, xcr: int) -> int:
    """__kvm_set_xcr() (x86.c): 1 when the value is refused, else XCR0 = ``xcr`` and 0.

    Refused, in the kernel's order: an index other than 0 (XCR_XFEATURE_ENABLED_MASK); x87
    clear; YMM without SSE; a bit outside guest_supported_xcr0 | FP (x87 is allowed even when
    the guest CPUID has no XSAVE: RESET writes XCR0 = 1); BNDREGS and BNDCSR not both set or
    both clear; an AVX-512 bit without YMM, or not all three AVX-512 bits; XTILE_CFG and
    XTILE_DATA not both set or both clear. A change of any bit beyond x87/SSE marks the
    CPUID's dynamic bits (leaf 0xD EBX) dirty.
    """
    arch = vcpu.arch
    if index != XCR_XFEATURE_ENABLED_MASK:
        return 1
    if not xcr & XFEATURE_MASK_FP:
        return 1
    if xcr & XFEATURE_MASK_YMM and not xcr & XFEATURE_MASK_SSE:
        return 1
    valid_bits = arch.guest_supported_xcr0 | XFEATURE_MASK_FP
    if xcr & ~valid_bits:
        return 1
    if bool(xcr & XFEATURE_MASK_BNDREGS) != bool(xcr & XFEATURE_MASK_BNDCSR):
        return 1
    if xcr & XFEATURE_MASK_AVX512:
        if not xcr & XFEATURE_MASK_YMM:
            return 1
        if xcr & XFEATURE_MASK_AVX512 != XFEATURE_MASK_AVX512:
            return 1
    if xcr & XFEATURE_MASK_XTILE and xcr & XFEATURE_MASK_XTILE != XFEATURE_MASK_XTILE:
        return 1
    old = arch.xcr0
    arch.xcr0 = xcr
    if (xcr ^ old) & XFEATURE_MASK_EXTEND:
        arch.cpuid_dynamic_bits_dirty = True
    return 0


def kvm_emulate_xsetbv(vcpu: KvmVcpu, cpl: int, ecx: int, value: int) -> Fault | None:
    """kvm_emulate_xsetbv() (x86.c): the XSETBV intercept. CPL != 0 or a value __kvm_set_xcr
    refuses -> #GP(0) injected (XCR0 unchanged), else the instruction is skipped. (With
    CR4.OSXSAVE clear the CPU raises #UD itself before any VM exit.)"""
    if not vcpu.arch.cr4_osxsave:
        return Fault("#UD", "XSETBV with CR4.OSXSAVE = 0")
    if cpl != 0:
        return Fault("#GP", f"XSETBV at CPL {cpl}")
    if __kvm_set_xcr(vcpu, ecx & 0xFFFFFFFF, value):
        return Fault("#GP", f"__kvm_set_xcr refuses XCR{ecx} = {value:#x}")
    return None


def kvm_vcpu_ioctl_x86_get_xcrs(vcpu: KvmVcpu) -> dict[int, int]:
    """KVM_GET_XCRS: {XCR index: value}; only XCR0 (nr_xcrs = 1), none without host XSAVE."""
    if not vcpu.kvm.caps.host_xsave:
        return {}
    return {XCR_XFEATURE_ENABLED_MASK: vcpu.arch.xcr0}


def kvm_vcpu_ioctl_x86_set_xcrs(vcpu: KvmVcpu, xcrs: list[tuple[int, int]], flags: int = 0) -> int:
    """KVM_SET_XCRS: -EINVAL without host XSAVE, with more than KVM_MAX_XCRS (16) entries or
    nonzero flags. The first entry for XCR0 goes through __kvm_set_xcr (refusal: -EINVAL) and
    ends the loop; entries for other XCRs are ignored. 0 on success."""
    if not vcpu.kvm.caps.host_xsave:
        return -EINVAL
    if len(xcrs) > KVM_MAX_XCRS or flags:
        return -EINVAL
    r = 0
    for xcr, value in xcrs:
        if xcr == XCR_XFEATURE_ENABLED_MASK:
            r = __kvm_set_xcr(vcpu, XCR_XFEATURE_ENABLED_MASK, value)
            break
    return -EINVAL if r else 0


# -- the XSAVE-managed MSRs ----------------------------------------------------------------------


def kvm_guest_supported_xfd(vcpu: KvmVcpu) -> int:
    """kvm_guest_supported_xfd() (x86.h): the dynamic features the guest may arm in XFD."""
    return vcpu.arch.guest_supported_xcr0 & XFEATURE_MASK_XTILE_DATA


def kvm_is_advertised_msr(vcpu: KvmVcpu, index: int) -> bool:
    """kvm_is_advertised_msr(): in msrs_to_save after kvm_probe_msr_to_save() -- XSS only with
    a nonzero supported_xss, XFD and XFD_ERR only with the XFD cap, the CET MSRs only with
    KVM's SHSTK/IBT caps (which it keeps only with both CET bits in supported_xss)."""
    caps = vcpu.kvm.caps
    if index == MSR_IA32_XSS:
        return caps.supported_xss != 0
    if index in XSTATE_MSRS:
        return caps.supported_xss & XFEATURE_MASK_CET_ALL == XFEATURE_MASK_CET_ALL
    return caps.cap(XFD)


def kvm_set_msr_common(c: Cpu, vcpu: KvmVcpu, index: int, data: int,
                       host_initiated: bool) -> int:
    """The XSAVE MSR cases of kvm_set_msr_common() (x86.c, v6.18).

    IA32_XSS: KVM_MSR_RET_UNSUPPORTED without the guest's XSAVES cap (host writes too); 1 for
    a bit outside guest_supported_xss; a change marks CPUID dirty. IA32_XFD and IA32_XFD_ERR:
    a guest access needs the guest's XFD cap (1 otherwise, host accesses pass); 1 for a bit
    outside guest_supported_xcr0 & XTILE_DATA; XFD goes through fpu_update_guest_xfd(), and
    the first nonzero write -- the guest's, or a host-initiated one -- stops write
    interception and updates the exception bitmap (VMX, vmx_set_msr); XFD_ERR is stored in
    guest_fpu.xfd_err.
    """
    arch = vcpu.arch
    caps = vcpu.kvm.caps
    if index == MSR_IA32_XSS:
        if not guest_cpu_cap_has(caps, arch.cpuid, XSAVES):
            return KVM_MSR_RET_UNSUPPORTED
        if data & ~arch.guest_supported_xss:
            return 1
        if arch.ia32_xss != data:
            arch.ia32_xss = data
            arch.cpuid_dynamic_bits_dirty = True
        return 0
    if index in (MSR_IA32_XFD, MSR_IA32_XFD_ERR):
        if not host_initiated and not guest_cpu_cap_has(caps, arch.cpuid, XFD):
            return 1
        if data & ~kvm_guest_supported_xfd(vcpu):
            return 1
        if index == MSR_IA32_XFD:
            fpu_update_guest_xfd(c, arch.guest_fpu, data)
            if data:  # vmx_set_msr(): host-initiated writes too
                arch.xfd_no_write_intercept = True
                vmx_update_exception_bitmap(vcpu)
        else:
            arch.guest_fpu.xfd_err = data
        return 0
    if index in XSTATE_MSRS:
        ret = kvm_cet_msr_valid(vcpu, index, data)
        if ret:
            return ret
        kvm_set_xstate_msr(c, vcpu, index, data)
        return 0
    raise FpstateError(f"MSR {index:#x} is not modelled (the model knows "
                       f"{', '.join(MODELLED_MSRS.values())})")


def kvm_get_msr_common(c: Cpu, vcpu: KvmVcpu, index: int,
                       host_initiated: bool) -> tuple[int, int]:
    """The XSAVE MSR cases of kvm_get_msr_common(): (ret, value). A guest read of IA32_XSS
    needs XSAVES in the guest CPUID, of XFD / XFD_ERR the guest's XFD cap; host reads always
    succeed. XFD reads the guest fpstate's xfd, XFD_ERR guest_fpu.xfd_err."""
    arch = vcpu.arch
    caps = vcpu.kvm.caps
    if index == MSR_IA32_XSS:
        if not host_initiated and not guest_cpu_cap_has(caps, arch.cpuid, XSAVES):
            return 1, 0
        return 0, arch.ia32_xss
    if index in (MSR_IA32_XFD, MSR_IA32_XFD_ERR):
        if not host_initiated and not guest_cpu_cap_has(caps, arch.cpuid, XFD):
            return 1, 0
        gfpu = arch.guest_fpu
        return 0, gfpu.fpstate.xfd if index == MSR_IA32_XFD else gfpu.xfd_err
    if index in XSTATE_MSRS:
        if not _cet_cap(vcpu, index):
            return KVM_MSR_RET_UNSUPPORTED, 0
        return 0, kvm_get_xstate_msr(c, vcpu, index)
    raise FpstateError(f"MSR {index:#x} is not modelled (the model knows "
                       f"{', '.join(MODELLED_MSRS.values())})")


def kvm_do_msr_access_write(c: Cpu, vcpu: KvmVcpu, index: int, data: int,
                            host_initiated: bool) -> int:
    """kvm_do_msr_access() for a write: KVM_MSR_RET_UNSUPPORTED becomes success only for a
    host-initiated write of 0 to an advertised MSR (what userspace restores blindly); any
    other failure is 1 (the guest gets #GP, KVM_SET_MSRS stops there)."""
    ret = kvm_set_msr_common(c, vcpu, index, data, host_initiated)
    if ret != KVM_MSR_RET_UNSUPPORTED:
        return ret
    if host_initiated and not data and kvm_is_advertised_msr(vcpu, index):
        return 0
    return 1


def kvm_do_msr_access_read(c: Cpu, vcpu: KvmVcpu, index: int,
                           host_initiated: bool) -> tuple[int, int]:
    """kvm_do_msr_access() for a read: an unsupported, advertised MSR reads 0 for the host."""
    ret, value = kvm_get_msr_common(c, vcpu, index, host_initiated)
    if ret != KVM_MSR_RET_UNSUPPORTED:
        return ret, value
    if host_initiated and kvm_is_advertised_msr(vcpu, index):
        return 0, 0
    return 1, 0


def __msr_io(c: Cpu, vcpu: KvmVcpu, indices: list[int],
             do_msr: Callable[[int], bool]) -> int:
    """__msr_io() (x86.c, v6.18): the entries in order until the first refusal; with a
    nonzero supported_xss the guest FPU is loaded before the first XSAVE-managed MSR (its value
    lives in the guest's registers) and put after the loop. The number processed."""
    fpu_loaded = False
    n = 0
    for n, index in enumerate(indices):  # noqa: B007 - n is the count on break
        if (vcpu.kvm.caps.supported_xss and not fpu_loaded and index in XSTATE_MSRS
                and not vcpu.arch.guest_fpu.fpstate.in_use):
            kfpu.kvm_load_guest_fpu(c, vcpu)
            fpu_loaded = True
        if not do_msr(index):
            break
    else:
        n = len(indices)
    if fpu_loaded:
        kfpu.kvm_put_guest_fpu(c, vcpu)
    return n


def kvm_vcpu_ioctl_set_msrs(c: Cpu, vcpu: KvmVcpu, msrs: list[tuple[int, int]]) -> int:
    """KVM_SET_MSRS (__msr_io with do_set_msr): host-initiated writes in order; the number
    written before the first refusal."""
    values = dict(msrs)
    return __msr_io(c, vcpu, [i for i, _ in msrs],
                    lambda i: not kvm_do_msr_access_write(c, vcpu, i, values[i], True))


def kvm_vcpu_ioctl_get_msrs(c: Cpu, vcpu: KvmVcpu, indices: list[int]) -> dict[int, int]:
    """KVM_GET_MSRS (__msr_io with do_get_msr): host-initiated reads in order, stopping at the
    first refusal; the values read (an index missing from the result was refused)."""
    out: dict[int, int] = {}

    def read(index: int) -> bool:
        ret, value = kvm_do_msr_access_read(c, vcpu, index, True)
        if not ret:
            out[index] = value
        return not ret

    __msr_io(c, vcpu, list(indices), read)
    return out


# -- the XSAVE-managed CET MSRs (v6.18) -----------------------------------------------------


def _cet_cap(vcpu: KvmVcpu, index: int) -> bool:
    """The guest capability an XSAVE-managed CET MSR needs: SHSTK for the SSPs, SHSTK or IBT
    for IA32_U_CET (guest CPUID leaf 7 & KVM's caps, which keep SHSTK/IBT only with CET in
    supported_xss)."""
    shstk = _guest_leaf7(vcpu, 2, 7)
    ibt = _guest_leaf7(vcpu, 3, 20)
    return shstk or ibt if index == MSR_IA32_U_CET else shstk


def _guest_leaf7(vcpu: KvmVcpu, reg: int, bit: int) -> bool:
    from fpstate.kvm.x86.cpuid import cpuid_regs

    cet = vcpu.kvm.caps.supported_xss & XFEATURE_MASK_CET_ALL == XFEATURE_MASK_CET_ALL
    return cet and bool(cpuid_regs(vcpu.arch.cpuid, 7, 0)[reg] >> bit & 1)


def kvm_cet_msr_valid(vcpu: KvmVcpu, index: int, data: int) -> int:
    """The CET checks of __kvm_set_msr() / kvm_is_valid_u_s_cet() (x86.c, x86.h v6.18): 0 when
    the write may proceed, KVM_MSR_RET_UNSUPPORTED without the guest capability, 1 for a bad
    value (IA32_U_CET: reserved bits 9:6, SHSTK or IBT bits the guest lacks, a legacy bitmap
    base not 4-aligned, SUPPRESS with WAIT_ENDBR; an SSP: non-canonical or not 4-aligned)."""
    if not _cet_cap(vcpu, index):
        return KVM_MSR_RET_UNSUPPORTED
    if index == MSR_IA32_U_CET:
        if data & CET_US_RESERVED_BITS:
            return 1
        if not _guest_leaf7(vcpu, 2, 7) and data & CET_US_SHSTK_MASK_BITS:
            return 1
        if not _guest_leaf7(vcpu, 3, 20) and data & CET_US_IBT_MASK_BITS:
            return 1
        if (data >> 12) & 3:
            return 1
        if data & CET_SUPPRESS and data & CET_WAIT_ENDBR:
            return 1
        return 0
    canonical = data >> 47 in (0, (1 << 17) - 1)
    if not canonical or data & 3:
        return 1
    return 0


def kvm_set_xstate_msr(c: Cpu, vcpu: KvmVcpu, index: int, data: int) -> None:
    """kvm_set_xstate_msr() (x86.h): WRMSR straight into the guest's registers, which must be
    loaded (KVM_BUG_ON otherwise: the model raises KernelBug)."""
    _check_loaded(vcpu, index)
    i, off = XSTATE_MSRS[index]
    value = bytearray(c.regs.component(i))
    value[off:off + 8] = data.to_bytes(8, "little")
    c.regs.set_component(i, bytes(value))


def kvm_get_xstate_msr(c: Cpu, vcpu: KvmVcpu, index: int) -> int:
    """kvm_get_xstate_msr() (x86.h): RDMSR from the loaded guest registers."""
    _check_loaded(vcpu, index)
    i, off = XSTATE_MSRS[index]
    return int.from_bytes(c.regs.component(i)[off:off + 8], "little")


def _check_loaded(vcpu: KvmVcpu, index: int) -> None:
    if not vcpu.arch.guest_fpu.fpstate.in_use:
        raise KernelBug("kvm-bug-xstate-msr", f"{MODELLED_MSRS[index]} accessed with the guest "
                        "FPU not loaded (KVM_BUG_ON)")


# -- the XSAVE buffer ioctls ----------------------------------------------------------------------


def kvm_vcpu_ioctl_x86_get_xsave2(c: Cpu, vcpu: KvmVcpu, size: int) -> bytes:
    """kvm_vcpu_ioctl_x86_get_xsave2(): the guest fpstate in UABI form, ``size`` bytes, with
    only the features the guest may use (guest_supported_xcr0, plus x87/SSE always, so that
    the buffer is restorable anywhere) and PKRU from vcpu->arch.pkru. A confidential guest's
    buffer stays zero (-EINVAL for VMs with protected state). Variant ``get-xsave-unmasked``
    (v5.16 until ad856280ddea): the buffer has every feature of the fpstate's user_xfeatures."""
    gfpu = vcpu.arch.guest_fpu
    if gfpu.fpstate.is_confidential:
        return bytes(size)
    supported = vcpu.arch.guest_supported_xcr0 | XFEATURE_MASK_FPSSE
    if vcpu.kvm.has_variant("get-xsave-unmasked"):
        supported = gfpu.fpstate.user_xfeatures
    return fpu_copy_guest_fpstate_to_uabi(c, gfpu, size, supported, vcpu.arch.pkru)


def kvm_arch_vcpu_ioctl_get_xsave(c: Cpu, vcpu: KvmVcpu) -> bytes | int:
    """KVM_GET_XSAVE: struct kvm_xsave is 4096 bytes, so -EINVAL once the guest's uabi_size is
    larger (a dynamic feature was enabled: userspace must use KVM_GET_XSAVE2)."""
    if vcpu.arch.guest_fpu.uabi_size > KVM_XSAVE_SIZE:
        return -EINVAL
    return kvm_vcpu_ioctl_x86_get_xsave2(c, vcpu, KVM_XSAVE_SIZE)


def kvm_arch_vcpu_ioctl_get_xsave2(c: Cpu, vcpu: KvmVcpu) -> bytes:
    """KVM_GET_XSAVE2: guest_fpu.uabi_size bytes (userspace sizes its buffer with
    KVM_CAP_XSAVE2)."""
    return kvm_vcpu_ioctl_x86_get_xsave2(c, vcpu, vcpu.arch.guest_fpu.uabi_size)


def kvm_arch_vcpu_ioctl_set_xsave(c: Cpu, vcpu: KvmVcpu, buf: bytes) -> int:
    """KVM_SET_XSAVE: memdup_user() of guest_fpu.uabi_size bytes (-EFAULT when the user buffer
    is shorter); with fix guest_xfd_clears_xstate_bv (b45f72177594) the header's bits of the
    components the guest fpstate's XFD arms are cleared ("for backwards compatibility, do
    not expect disabled features to be in their initial state": they get it); then
    fpu_copy_uabi_to_guest_fpstate() against kvm_caps.supported_xcr0 with vcpu->arch.pkru
    as the PKRU destination. 0 or -EINVAL."""
    size = vcpu.arch.guest_fpu.uabi_size
    if len(buf) < size:
        return -EFAULT
    fps = vcpu.arch.guest_fpu.fpstate
    if fps.is_confidential:
        return 0
    buf = bytes(buf[:size])
    xfd = fps.xfd
    if xfd and guest_xfd_clears_xstate_bv(c.m.system):
        bv = int.from_bytes(buf[512:520], "little") & ~xfd
        buf = buf[:512] + bv.to_bytes(8, "little") + buf[520:]
    pkru = [vcpu.arch.pkru]
    ret = fpu_copy_uabi_to_guest_fpstate(c, vcpu.arch.guest_fpu, buf,
                                         vcpu.kvm.caps.supported_xcr0, pkru)
    vcpu.arch.pkru = pkru[0]
    return ret


#: sizeof(struct kvm_fpu): fpr[8][16], fcw, fsw, ftwx, pad1, last_opcode, last_ip, last_dp,
#: xmm[16][16], mxcsr, pad2.
KVM_FPU_SIZE = 416
#: (struct kvm_fpu offset, fxregs_state offset, size) of each field KVM copies: fpr <->
#: st_space, fcw/fsw <-> cwd/swd, ftwx <-> twd (one byte), last_opcode/last_ip/last_dp <->
#: fop/rip/rdp, xmm <-> xmm_space. MXCSR is in neither direction.
#: struct fxregs_state's twd: the abridged tag byte, then the reserved byte 5.
FTW_OFFSET = 4
_KVM_FPU_FIELDS = ((0, 32, 128), (128, 0, 4), (132, 4, 1), (134, 6, 2), (136, 8, 16),
                   (152, 160, 256))


def kvm_fpu_of(legacy: bytes) -> bytes:
    """The struct kvm_fpu whose fields are those of the FXSAVE-layout bytes ``legacy`` (at
    least 416: the x87 region and XMM0-15), pad and MXCSR zero: what a VMM fills in from its
    own register copy for KVM_SET_FPU."""
    out = bytearray(KVM_FPU_SIZE)
    for dst, src, size in _KVM_FPU_FIELDS:
        out[dst:dst + size] = legacy[src:src + size]
    return bytes(out)


def kvm_arch_vcpu_ioctl_get_fpu(c: Cpu, vcpu: KvmVcpu) -> bytes:
    """KVM_GET_FPU (kvm_arch_vcpu_ioctl_get_fpu, x86.c): the legacy area of the guest
    fpstate's image copied field by field into a zeroed struct kvm_fpu, whatever XSTATE_BV
    says of it (a component the header marks initial is reported as the bytes that sit in
    the image) and with MXCSR left 0. A confidential guest's struct stays zero."""
    out = bytearray(KVM_FPU_SIZE)
    fps = vcpu.arch.guest_fpu.fpstate
    if fps.is_confidential:
        return bytes(out)
    for dst, src, size in _KVM_FPU_FIELDS:
        out[dst:dst + size] = fps.regs[src:src + size]
    return bytes(out)


def kvm_arch_vcpu_ioctl_set_fpu(c: Cpu, vcpu: KvmVcpu, fpu: bytes) -> int:
    """KVM_SET_FPU (kvm_arch_vcpu_ioctl_set_fpu, x86.c): the fields of struct kvm_fpu written
    into the legacy area of the guest fpstate's image -- and nothing else: XSTATE_BV is not
    touched (nor MXCSR, which KVM ignores both ways). Where the header does not have x87 or
    SSE, the next XRSTOR of the guest fpstate puts that component in its initial
    configuration and the write is lost to the guest, while KVM_GET_FPU still reports it.
    ``fxsave->twd = fpu->ftwx`` stores the byte into the image's 16-bit twd: byte 5, reserved
    in FXSAVE's layout, becomes 0 and struct kvm_fpu's pad byte is ignored.
    0 (-EINVAL for a confidential guest of a VM with protected state, modelled as 0)."""
    if len(fpu) < KVM_FPU_SIZE:
        return -EFAULT
    fps = vcpu.arch.guest_fpu.fpstate
    if fps.is_confidential:
        return 0
    for dst, src, size in _KVM_FPU_FIELDS:
        fps.regs[src:src + size] = fpu[dst:dst + size]
    fps.regs[FTW_OFFSET + 1] = 0  # the high byte of the 16-bit twd
    return 0


# -- INIT and RESET -------------------------------------------------------------------------------


def kvm_xstate_reset(c: Cpu, vcpu: KvmVcpu, init_event: bool) -> int:
    """kvm_xstate_reset() (x86.c, v6.18 with the Oct 2025 in-use fix). Returns the mask zeroed.

    RESET (``init_event`` false) only happens at vCPU creation, when the vzalloc'ed guest
    fpstate is already all zero: nothing to do. INIT zeroes the components of
    (supported_xcr0 | supported_xss) & (BNDREGS | BNDCSR | CET_USER | CET_KERNEL) with
    fpstate_clear_xstate_component(); everything else survives INIT. The guest FPU is put
    before and loaded after only if it is loaded now (fps->in_use), which must agree with
    vcpu->wants_to_run (else WARN). Variant ``init-keeps-cet`` clears MPX only (CET survives:
    the bug seed 003's CET series fixed).
    """
    gfpu = vcpu.arch.guest_fpu
    if not init_event or gfpu is None:
        return 0
    caps = vcpu.kvm.caps
    clear = XSTATE_CLEAR_ON_INIT
    if vcpu.kvm.has_variant("init-keeps-cet"):
        clear &= ~XFEATURE_MASK_CET_ALL
    mask = (caps.supported_xcr0 | caps.supported_xss) & clear
    if not mask:
        return 0
    fps = gfpu.fpstate
    in_use = fps.in_use
    if vcpu.wants_to_run != in_use:
        vcpu.kvm.warn("kvm-xstate-reset-in-use",
                      f"wants_to_run={vcpu.wants_to_run} but guest fpstate in_use={in_use}")
    if in_use:
        kfpu.kvm_put_guest_fpu(c, vcpu)
    for i in bits(mask):
        fpstate_clear_xstate_component(c.m.system, gfpu.fpstate, i)
    if in_use:
        kfpu.kvm_load_guest_fpu(c, vcpu)
    return mask


def vmx_update_exception_bitmap(vcpu: KvmVcpu) -> None:
    """The #NM bit of vmx_update_exception_bitmap() (vmx.c): trapped once XFD writes pass
    through (xfd_no_write_intercept: "Always trap #NM in this case for proper virtualization
    of guest xfd_err"). Variant ``nm-intercept-follows-xfd`` keeps v4's rule, trapped iff the
    guest fpstate's xfd is nonzero -- right only while every XFD write is intercepted."""
    arch = vcpu.arch
    if vcpu.kvm.has_variant("nm-intercept-follows-xfd"):
        arch.nm_intercepted = bool(arch.guest_fpu.fpstate.xfd)
    else:
        arch.nm_intercepted = arch.xfd_no_write_intercept


def kvm_vcpu_reset(c: Cpu, vcpu: KvmVcpu, init_event: bool) -> int:
    """The XSAVE part of kvm_vcpu_reset() (x86.c): kvm_xstate_reset(); on RESET (not INIT)
    also XCR0 = x87 through __kvm_set_xcr and a host-initiated IA32_XSS = 0 (whose result is
    ignored: without XSAVES the write is refused and XSS stays 0 anyway). INIT keeps XCR0,
    IA32_XSS and every component outside the cleared mask. Both end with the exception bitmap
    brought up to date (`vmx_update_exception_bitmap`). Returns the mask INIT zeroed."""
    cleared = kvm_xstate_reset(c, vcpu, init_event)
    if not init_event:
        __kvm_set_xcr(vcpu, XCR_XFEATURE_ENABLED_MASK, XFEATURE_MASK_FP)
        kvm_do_msr_access_write(c, vcpu, MSR_IA32_XSS, 0, True)
        vcpu.arch.ia32_xss = 0
    vmx_update_exception_bitmap(vcpu)
    return cleared


__all__ = [
    "KVM_MSR_RET_UNSUPPORTED", "MSR_IA32_XFD", "MSR_IA32_XFD_ERR", "MSR_IA32_XSS",
    "__kvm_set_xcr", "kvm_arch_vcpu_ioctl_get_xsave", "kvm_arch_vcpu_ioctl_get_xsave2",
    "kvm_arch_vcpu_ioctl_set_xsave", "kvm_emulate_xsetbv", "kvm_vcpu_ioctl_get_msrs",
    "kvm_vcpu_ioctl_set_msrs", "kvm_vcpu_ioctl_x86_get_xcrs", "kvm_vcpu_ioctl_x86_set_xcrs",
    "kvm_vcpu_reset", "kvm_xstate_reset", "vmx_update_exception_bitmap",
]
