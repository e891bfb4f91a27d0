"""The KVM userspace ABI used by fpstate: ioctl numbers, structures and constants, as ctypes.

Numbers and layouts are those of include/uapi/linux/kvm.h and arch/x86/include/uapi/asm/kvm.h
(Linux v6.17); ioctl numbers are computed with the _IOC encoding of include/uapi/asm-generic/
ioctl.h (dir << 30 | size << 16 | type << 8 | nr, _IOC_WRITE = 1, _IOC_READ = 2), with the size
of the structure the header names, exactly as the C macros do. The arch_prctl codes are those of
arch/x86/include/uapi/asm/prctl.h.

Rules of this file:
- data only: no file descriptor is opened here (see `fpstate.host.kvm`);
- every structure's ctypes size is checked against the size the header implies at import, so a
  layout slip fails loudly instead of corrupting an ioctl;
- errors of the kernel are `KvmError` values carrying the errno and the call's name.
"""

from __future__ import annotations

import ctypes
import errno as _errno

from fpstate.errors import FpstateError
from fpstate.kernel.x86.uapi import (  # noqa: F401 (re-exported)
    ARCH_GET_XCOMP_GUEST_PERM,
    ARCH_GET_XCOMP_PERM,
    ARCH_GET_XCOMP_SUPP,
    ARCH_REQ_XCOMP_GUEST_PERM,
    ARCH_REQ_XCOMP_PERM,
    ARCH_XCOMP_TILECFG,
    ARCH_XCOMP_TILEDATA,
)

# -- errors ----------------------------------------------------------------------------------


class KvmError(FpstateError):
    """An ioctl on /dev/kvm (or arch_prctl) that the kernel refused: ``errno`` and ``call``."""

    def __init__(self, err: int, call: str, detail: str = "") -> None:
        self.errno = err
        self.call = call
        name = _errno.errorcode.get(err, str(err))
        super().__init__(f"{call}: {name} ({err})" + (f": {detail}" if detail else ""))


class HostError(FpstateError):
    """KVM_RUN ended in a way a guest program never should (shutdown, internal error, failed
    entry, an unexpected exit): ``exit_reason`` is the KVM_EXIT_* number."""

    def __init__(self, exit_reason: int, detail: str) -> None:
        self.exit_reason = exit_reason
        super().__init__(f"KVM_RUN exit {exit_name(exit_reason)}: {detail}")


# -- ioctl encoding (include/uapi/asm-generic/ioctl.h) ---------------------------------------

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, struct: type) -> int:
    return _ioc(_IOC_READ, nr, ctypes.sizeof(struct))


def _iow(nr: int, struct: type) -> int:
    return _ioc(_IOC_WRITE, nr, ctypes.sizeof(struct))


def _iowr(nr: int, struct: type) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ctypes.sizeof(struct))


# -- structures ------------------------------------------------------------------------------

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class KvmUserspaceMemoryRegion(ctypes.Structure):
    _fields_ = (
        ("slot", u32), ("flags", u32), ("guest_phys_addr", u64), ("memory_size", u64),
        ("userspace_addr", u64),
    )


class KvmRegs(ctypes.Structure):
    _fields_ = tuple(
        (name, u64) for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
        )
    )


class KvmSegment(ctypes.Structure):
    _fields_ = (
        ("base", u64), ("limit", u32), ("selector", u16), ("type", u8), ("present", u8),
        ("dpl", u8), ("db", u8), ("s", u8), ("l", u8), ("g", u8), ("avl", u8),
        ("unusable", u8), ("padding", u8),
    )


class KvmDtable(ctypes.Structure):
    _fields_ = (("base", u64), ("limit", u16), ("padding", u16 * 3))


KVM_NR_INTERRUPTS = 256


class KvmSregs(ctypes.Structure):
    _fields_ = (
        ("cs", KvmSegment), ("ds", KvmSegment), ("es", KvmSegment), ("fs", KvmSegment),
        ("gs", KvmSegment), ("ss", KvmSegment), ("tr", KvmSegment), ("ldt", KvmSegment),
        ("gdt", KvmDtable), ("idt", KvmDtable),
        ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64), ("cr8", u64),
        ("efer", u64), ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    )


class KvmCpuidEntry2(ctypes.Structure):
    _fields_ = (
        ("function", u32), ("index", u32), ("flags", u32), ("eax", u32), ("ebx", u32),
        ("ecx", u32), ("edx", u32), ("padding", u32 * 3),
    )


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0  # sic: the uapi header's spelling


class KvmCpuid2(ctypes.Structure):
    """struct kvm_cpuid2 without its flexible array (the ioctl size the header uses)."""

    _fields_ = (("nent", u32), ("padding", u32))


def kvm_cpuid2(nent: int) -> ctypes.Structure:
    """A struct kvm_cpuid2 with room for ``nent`` entries."""

    class _Cpuid2(ctypes.Structure):
        _fields_ = (("nent", u32), ("padding", u32), ("entries", KvmCpuidEntry2 * nent))

    c = _Cpuid2()
    c.nent = nent
    return c


class KvmMsrEntry(ctypes.Structure):
    _fields_ = (("index", u32), ("reserved", u32), ("data", u64))


class KvmMsrs(ctypes.Structure):
    """struct kvm_msrs without its flexible array (the ioctl size the header uses)."""

    _fields_ = (("nmsrs", u32), ("pad", u32))


def kvm_msrs(entries: list[tuple[int, int]]) -> ctypes.Structure:
    """A struct kvm_msrs holding (index, data) pairs."""

    class _Msrs(ctypes.Structure):
        _fields_ = (("nmsrs", u32), ("pad", u32), ("entries", KvmMsrEntry * len(entries)))

    m = _Msrs()
    m.nmsrs = len(entries)
    for i, (index, data) in enumerate(entries):
        m.entries[i].index = index
        m.entries[i].data = data
    return m


class KvmMpState(ctypes.Structure):
    _fields_ = (("mp_state", u32),)


KVM_MAX_XCRS = 16


class KvmXcr(ctypes.Structure):
    _fields_ = (("xcr", u32), ("reserved", u32), ("value", u64))


class KvmXcrs(ctypes.Structure):
    _fields_ = (("nr_xcrs", u32), ("flags", u32), ("xcrs", KvmXcr * KVM_MAX_XCRS),
                ("padding", u64 * 16))


class KvmXsave(ctypes.Structure):
    """struct kvm_xsave: u32 region[1024] (the flexible ``extra`` adds nothing to sizeof)."""

    _fields_ = (("region", u32 * 1024),)


class KvmFpu(ctypes.Structure):
    """struct kvm_fpu (KVM_GET_FPU/KVM_SET_FPU, the legacy FXSAVE-shaped view): 416 bytes."""

    _fields_ = (("fpr", ctypes.c_uint8 * 128), ("fcw", ctypes.c_uint16),
                ("fsw", ctypes.c_uint16), ("ftwx", ctypes.c_uint8), ("pad1", ctypes.c_uint8),
                ("last_opcode", ctypes.c_uint16), ("last_ip", u64), ("last_dp", u64),
                ("xmm", ctypes.c_uint8 * 256), ("mxcsr", u32), ("pad2", u32))


class KvmDeviceAttr(ctypes.Structure):
    _fields_ = (("flags", u32), ("group", u32), ("attr", u64), ("addr", u64))


class _Exception(ctypes.Structure):
    _fields_ = (("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8),
                ("error_code", u32))


class _Interrupt(ctypes.Structure):
    _fields_ = (("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8))


class _Nmi(ctypes.Structure):
    _fields_ = (("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8))


class _Smi(ctypes.Structure):
    _fields_ = (("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8))


class KvmVcpuEvents(ctypes.Structure):
    _fields_ = (
        ("exception", _Exception), ("interrupt", _Interrupt), ("nmi", _Nmi),
        ("sipi_vector", u32), ("flags", u32), ("smi", _Smi), ("triple_fault_pending", u8),
        ("reserved", u8 * 26), ("exception_has_payload", u8), ("exception_payload", u64),
    )


KVM_VCPUEVENT_VALID_NMI_PENDING = 0x1
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x2
KVM_VCPUEVENT_VALID_SHADOW = 0x4
KVM_VCPUEVENT_VALID_SMM = 0x8

_SIZES = {  # sizeof() of each structure as laid out by the uapi headers on x86-64
    KvmUserspaceMemoryRegion: 32, KvmRegs: 144, KvmSegment: 24, KvmDtable: 16,
    KvmSregs: 312, KvmCpuidEntry2: 40, KvmCpuid2: 8, KvmMsrEntry: 16, KvmMsrs: 8,
    KvmMpState: 4, KvmXcr: 16, KvmXcrs: 392, KvmXsave: 4096, KvmDeviceAttr: 24,
    KvmVcpuEvents: 64,
}
for _s, _n in _SIZES.items():
    assert ctypes.sizeof(_s) == _n, f"{_s.__name__} is {ctypes.sizeof(_s)} bytes, uapi says {_n}"

# -- ioctl numbers (include/uapi/linux/kvm.h) --------------------------------------------------

# system (/dev/kvm)
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, KvmCpuid2)
# VM
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, KvmUserspaceMemoryRegion)
KVM_CREATE_IRQCHIP = _io(0x60)
# VM, vCPU and system (device attributes)
KVM_GET_DEVICE_ATTR = _iow(0xE2, KvmDeviceAttr)
KVM_HAS_DEVICE_ATTR = _iow(0xE3, KvmDeviceAttr)
# vCPU
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, KvmRegs)
KVM_SET_REGS = _iow(0x82, KvmRegs)
KVM_GET_SREGS = _ior(0x83, KvmSregs)
KVM_SET_SREGS = _iow(0x84, KvmSregs)
KVM_GET_MSRS = _iowr(0x88, KvmMsrs)
KVM_SET_MSRS = _iow(0x89, KvmMsrs)
KVM_SET_CPUID2 = _iow(0x90, KvmCpuid2)
KVM_GET_CPUID2 = _iowr(0x91, KvmCpuid2)
KVM_GET_MP_STATE = _ior(0x98, KvmMpState)
KVM_SET_MP_STATE = _iow(0x99, KvmMpState)
KVM_GET_VCPU_EVENTS = _ior(0x9F, KvmVcpuEvents)
KVM_SET_VCPU_EVENTS = _iow(0xA0, KvmVcpuEvents)
KVM_GET_FPU = _ior(0x8C, KvmFpu)
KVM_SET_FPU = _iow(0x8D, KvmFpu)
KVM_GET_XSAVE = _ior(0xA4, KvmXsave)
KVM_SET_XSAVE = _iow(0xA5, KvmXsave)
KVM_GET_XCRS = _ior(0xA6, KvmXcrs)
KVM_SET_XCRS = _iow(0xA7, KvmXcrs)
KVM_GET_XSAVE2 = _ior(0xCF, KvmXsave)

IOCTL_NAMES = {v: k for k, v in dict(globals()).items() if k.startswith("KVM_") and
               isinstance(v, int) and v > 0xFFFF}

KVM_API_VERSION = 12

# -- capabilities ----------------------------------------------------------------------------

KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_EXT_CPUID = 7
KVM_CAP_MP_STATE = 14
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_CHECK_EXTENSION_VM = 105
KVM_CAP_XSAVE2 = 208
KVM_CAP_SYS_ATTRIBUTES = 209

# -- device attributes on the system fd (arch/x86/include/uapi/asm/kvm.h) ------------------------

KVM_X86_GRP_SYSTEM = 0
KVM_X86_XCOMP_GUEST_SUPP = 0

# -- exits -----------------------------------------------------------------------------------

KVM_EXIT_NAMES = {
    0: "KVM_EXIT_UNKNOWN", 1: "KVM_EXIT_EXCEPTION", 2: "KVM_EXIT_IO", 3: "KVM_EXIT_HYPERCALL",
    4: "KVM_EXIT_DEBUG", 5: "KVM_EXIT_HLT", 6: "KVM_EXIT_MMIO", 7: "KVM_EXIT_IRQ_WINDOW_OPEN",
    8: "KVM_EXIT_SHUTDOWN", 9: "KVM_EXIT_FAIL_ENTRY", 10: "KVM_EXIT_INTR",
    16: "KVM_EXIT_NMI", 17: "KVM_EXIT_INTERNAL_ERROR", 24: "KVM_EXIT_SYSTEM_EVENT",
    29: "KVM_EXIT_X86_RDMSR", 30: "KVM_EXIT_X86_WRMSR", 37: "KVM_EXIT_NOTIFY",
    39: "KVM_EXIT_MEMORY_FAULT",
}
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_IO_OUT = 1
KVM_INTERNAL_ERROR_EMULATION = 1

#: struct kvm_run: exit_reason at 8; the exit union at 32 (after cr8 and apic_base).
KVM_RUN_EXIT_REASON = 8
KVM_RUN_UNION = 32


def exit_name(reason: int) -> str:
    return KVM_EXIT_NAMES.get(reason, f"KVM_EXIT_{reason}")


# -- multiprocessing states ------------------------------------------------------------------

KVM_MP_STATE_NAMES = {
    0: "KVM_MP_STATE_RUNNABLE", 1: "KVM_MP_STATE_UNINITIALIZED",
    2: "KVM_MP_STATE_INIT_RECEIVED", 3: "KVM_MP_STATE_HALTED",
    4: "KVM_MP_STATE_SIPI_RECEIVED", 5: "KVM_MP_STATE_STOPPED",
    6: "KVM_MP_STATE_CHECK_STOP", 7: "KVM_MP_STATE_OPERATING", 8: "KVM_MP_STATE_LOAD",
    9: "KVM_MP_STATE_AP_RESET_HOLD", 10: "KVM_MP_STATE_SUSPENDED",
}
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4

# -- MSRs (arch/x86/include/asm/msr-index.h) and XCRs -----------------------------------------

MSR_IA32_XFD = 0x1C4
MSR_IA32_XFD_ERR = 0x1C5
MSR_IA32_XSS = 0xDA0
MSR_EFER = 0xC0000080
XCR_XFEATURE_ENABLED_MASK = 0

# -- arch_prctl (arch/x86/include/uapi/asm/prctl.h) -------------------------------------------

SYS_ARCH_PRCTL = 158  # x86-64 syscall number
