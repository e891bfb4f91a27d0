"""Real KVM from Python: /dev/kvm, VMs and vCPUs through ctypes ioctls, no C compiler.

The host twin of the KVM model (`fpstate.kvm.x86`): every operation here is one ioctl (or one
arch_prctl) and returns what the kernel answers, or raises `KvmError` with the kernel's errno.
Nothing is interpreted or corrected: a differential test compares these answers with the model.

Theory of operation
-------------------
- `Kvm` is the system fd (/dev/kvm): API version, capabilities, KVM_GET_SUPPORTED_CPUID and the
  KVM_X86_XCOMP_GUEST_SUPP attribute (kvm_arch_dev_ioctl / kvm_x86_dev_get_attr, x86.c).
- `Vm` is a VM fd: memory slots, the in-kernel irqchip (needed for INIT, see below), vCPUs and
  KVM_CHECK_EXTENSION on the VM (where KVM_CAP_XSAVE2's size is meant to be read).
- `Vcpu` is a vCPU fd with its mmap'ed struct kvm_run: registers, CPUID, MSRs, XCRs, the XSAVE
  buffer (KVM_GET_XSAVE, KVM_GET_XSAVE2, KVM_SET_XSAVE), the MP state and KVM_RUN.
- INIT: userspace cannot ask for kvm_vcpu_reset(vcpu, init_event=true) directly. KVM_SET_MP_STATE
  only writes vcpu->arch.mp_state (INIT_RECEIVED parks an AP until a SIPI, SIPI_RECEIVED delivers
  a SIPI vector; neither resets any register). An INIT is a *pending APIC event*: it is latched
  with KVM_SET_VCPU_EVENTS (KVM_VCPUEVENT_VALID_SMM, smi.latched_init = 1 sets KVM_APIC_INIT in
  apic->pending_events, which needs the in-kernel LAPIC) and processed by
  kvm_apic_accept_events(), which KVM_GET_MP_STATE and KVM_RUN both call: it runs
  kvm_vcpu_reset(vcpu, true) and leaves the BSP RUNNABLE, an AP INIT_RECEIVED. `Vcpu.init_vcpu`
  does exactly that.
- Guest permission (ARCH_REQ_XCOMP_GUEST_PERM) is process-wide, sticky, and locked by the first
  vCPU creation (fpu_alloc_guest_fpstate -> fpu_lock_guest_permissions, EBUSY afterwards), so
  `guest_permission_probe` asks a fresh interpreter.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import struct
import subprocess
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from fpstate.errors import FpstateError, HostUnavailable
from fpstate.host import kvm_uapi as u
from fpstate.host.kvm_uapi import HostError, KvmError
from fpstate.kvm.x86.cpuid import CpuidEntry2

__all__ = [
    "CpuidEntry", "HostError", "Kvm", "KvmError", "Vcpu", "Vm", "arch_prctl_get",
    "arch_prctl_req", "cpuid_leaves", "find_cpuid", "guest_permission_probe", "kvm_backend",
    "open_kvm",
]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_libc.ioctl.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long

_EINTR = 4


def _ioctl(fd: int, request: int, arg: Any = None) -> int:
    """ioctl(fd, request, arg) -> the kernel's non-negative result, or KvmError(errno).

    ``arg`` is a ctypes structure (passed by reference), an int (passed by value) or None.
    """
    if isinstance(arg, ctypes.Structure | ctypes.Array):
        ptr: Any = ctypes.addressof(arg)
    else:
        ptr = arg if arg is not None else 0
    while True:
        ret = _libc.ioctl(fd, request, ptr)
        if ret >= 0:
            return ret
        err = ctypes.get_errno()
        if err != _EINTR:
            raise KvmError(err, u.IOCTL_NAMES.get(request, hex(request)))


# -- arch_prctl ------------------------------------------------------------------------------

_PRCTL_NAMES = {
    u.ARCH_GET_XCOMP_SUPP: "ARCH_GET_XCOMP_SUPP", u.ARCH_GET_XCOMP_PERM: "ARCH_GET_XCOMP_PERM",
    u.ARCH_REQ_XCOMP_PERM: "ARCH_REQ_XCOMP_PERM",
    u.ARCH_GET_XCOMP_GUEST_PERM: "ARCH_GET_XCOMP_GUEST_PERM",
    u.ARCH_REQ_XCOMP_GUEST_PERM: "ARCH_REQ_XCOMP_GUEST_PERM",
}


def _arch_prctl(code: int, arg: int) -> int:
    ret = _libc.syscall(ctypes.c_long(u.SYS_ARCH_PRCTL), ctypes.c_long(code), ctypes.c_ulong(arg))
    if ret < 0:
        raise KvmError(ctypes.get_errno(), _PRCTL_NAMES.get(code, f"arch_prctl({code:#x})"))
    return ret


def arch_prctl_get(code: int) -> int:
    """One of the ARCH_GET_XCOMP_{SUPP,PERM,GUEST_PERM} arch_prctls: the u64 it writes."""
    if code not in (u.ARCH_GET_XCOMP_SUPP, u.ARCH_GET_XCOMP_PERM, u.ARCH_GET_XCOMP_GUEST_PERM):
        raise FpstateError(f"arch_prctl({code:#x}) is not one of the ARCH_GET_XCOMP_* codes")
    out = ctypes.c_uint64(0)
    _arch_prctl(code, ctypes.addressof(out))
    return out.value


def arch_prctl_req(code: int, xfeature: int) -> None:
    """ARCH_REQ_XCOMP_PERM or ARCH_REQ_XCOMP_GUEST_PERM for one xfeature number (KvmError on
    refusal: EOPNOTSUPP for a feature that needs no permission or that the host lacks, EBUSY
    for guest permission after a vCPU was created, ENOSPC for a too small sigaltstack)."""
    if code not in (u.ARCH_REQ_XCOMP_PERM, u.ARCH_REQ_XCOMP_GUEST_PERM):
        raise FpstateError(f"arch_prctl({code:#x}) is not one of the ARCH_REQ_XCOMP_* codes")
    _arch_prctl(code, xfeature)


# -- data ------------------------------------------------------------------------------------


#: struct kvm_cpuid_entry2 is uapi data: the same dataclass as the KVM model's.
CpuidEntry = CpuidEntry2


def cpuid_leaves(entries: Iterable[CpuidEntry]) -> dict[tuple[int, int], tuple[int, int, int, int]]:
    """{(leaf, sub-leaf): (EAX, EBX, ECX, EDX)} of a CPUID table."""
    return {(e.function, e.index): e.regs for e in entries}


def find_cpuid(entries: Iterable[CpuidEntry], leaf: int, sub: int = 0) -> tuple[int, ...]:
    """The registers of (leaf, sub) in a CPUID table, zeros where absent (KVM's own rule: a
    leaf the guest CPUID lacks reads as zeros, kvm_cpuid())."""
    for e in entries:
        indexed = e.flags & u.KVM_CPUID_FLAG_SIGNIFCANT_INDEX
        if e.function == leaf and (e.index == sub or not indexed):
            return e.regs
    return (0, 0, 0, 0)


# -- the system fd ---------------------------------------------------------------------------


class Kvm:
    """/dev/kvm: system ioctls. Raises HostUnavailable when the device cannot be used."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise HostUnavailable(f"{path}: {e.strerror}") from None
        try:
            version = _ioctl(self.fd, u.KVM_GET_API_VERSION)
        except KvmError as e:
            os.close(self.fd)
            raise HostUnavailable(f"{path}: KVM_GET_API_VERSION failed: {e}") from None
        if version != u.KVM_API_VERSION:
            os.close(self.fd)
            raise HostUnavailable(f"{path}: KVM API version {version}, need {u.KVM_API_VERSION}")
        self.api_version = version
        self.vcpu_mmap_size = _ioctl(self.fd, u.KVM_GET_VCPU_MMAP_SIZE)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the system fd (kvm_vm_ioctl_check_extension with kvm=NULL)."""
        return _ioctl(self.fd, u.KVM_CHECK_EXTENSION, cap)

    def cap_xsave2(self) -> int:
        """KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2): max(4096, xstate_required_size(
        kvm_get_filtered_xcr0(), false)), 0 without the capability."""
        return self.check_extension(u.KVM_CAP_XSAVE2)

    def supported_cpuid(self) -> tuple[CpuidEntry, ...]:
        """KVM_GET_SUPPORTED_CPUID, growing the buffer on E2BIG as the API asks."""
        nent = 64
        while True:
            buf = u.kvm_cpuid2(nent)
            try:
                _ioctl(self.fd, u.KVM_GET_SUPPORTED_CPUID, buf)
            except KvmError as e:
                if e.errno == errno.E2BIG and nent < 4096:
                    nent *= 2
                    continue
                raise
            return tuple(
                CpuidEntry(x.function, x.index, x.flags, x.eax, x.ebx, x.ecx, x.edx)
                for x in buf.entries[: buf.nent]
            )

    def get_device_attr(self, group: int, attr: int) -> int:
        """KVM_GET_DEVICE_ATTR on the system fd: the u64 KVM writes (ENXIO for unknown)."""
        out = ctypes.c_uint64(0)
        a = u.KvmDeviceAttr(flags=0, group=group, attr=attr, addr=ctypes.addressof(out))
        _ioctl(self.fd, u.KVM_GET_DEVICE_ATTR, a)
        return out.value

    def xcomp_guest_supp(self) -> int:
        """KVM_X86_XCOMP_GUEST_SUPP: kvm_caps.supported_xcr0, not filtered by permission."""
        return self.get_device_attr(u.KVM_X86_GRP_SYSTEM, u.KVM_X86_XCOMP_GUEST_SUPP)

    def create_vm(self, *, irqchip: bool = False) -> Vm:
        """KVM_CREATE_VM (type 0); with ``irqchip`` also KVM_CREATE_IRQCHIP (PIC, IOAPIC and an
        in-kernel LAPIC per vCPU: needed for INIT, and it makes HLT block in the kernel)."""
        vm = Vm(self, _ioctl(self.fd, u.KVM_CREATE_VM, 0))
        if irqchip:
            _ioctl(vm.fd, u.KVM_CREATE_IRQCHIP)
            vm.irqchip = True
        return vm


#: Vendor modules that implement /dev/kvm on x86, and how they run a guest.
KVM_BACKENDS = {
    "kvm_intel": "VMX: the guest runs in VMX non-root mode",
    "kvm_amd": "SVM: the guest runs under VMRUN",
    "kvm_pvm": "PVM (pagetable-based, no VMX/SVM): guest kernel and user code both run in "
               "hardware ring 3 and KVM emulates what traps",
}


def kvm_backend(sys_module: str = "/sys/module") -> str | None:
    """The loaded KVM vendor module (kvm_intel, kvm_amd or kvm_pvm), None if none is loaded."""
    for name in KVM_BACKENDS:
        if os.path.isdir(os.path.join(sys_module, name)):
            return name
    return None


def open_kvm() -> Kvm:
    """Open /dev/kvm, or raise HostUnavailable with the reason."""
    from fpstate.host.native import is_x86_64

    if not is_x86_64():
        raise HostUnavailable("the host is not x86-64: the x86 KVM ABI does not apply")
    return Kvm()


# -- a VM ------------------------------------------------------------------------------------


class Vm:
    """A VM fd: memory slots, vCPUs and per-VM capabilities."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self.irqchip = False
        self.memory: list[mmap.mmap] = []
        self.vcpus: list[Vcpu] = []

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for m in self.memory:
            m.close()
        self.memory.clear()

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, u.KVM_CHECK_EXTENSION, cap)

    def cap_xsave2(self) -> int:
        """KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) on the VM fd: the KVM_GET_XSAVE2 buffer size."""
        return self.check_extension(u.KVM_CAP_XSAVE2)

    def add_memory(self, slot: int, gpa: int, size: int) -> mmap.mmap:
        """Anonymous memory of ``size`` bytes mapped at guest-physical ``gpa``."""
        mem = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        hva = ctypes.addressof(ctypes.c_char.from_buffer(mem))
        region = u.KvmUserspaceMemoryRegion(
            slot=slot, flags=0, guest_phys_addr=gpa, memory_size=size, userspace_addr=hva
        )
        _ioctl(self.fd, u.KVM_SET_USER_MEMORY_REGION, region)
        self.memory.append(mem)
        return mem

    def create_vcpu(self, vcpu_id: int = 0) -> Vcpu:
        """KVM_CREATE_VCPU (locks this process's guest permissions) and mmap of its kvm_run."""
        fd = _ioctl(self.fd, u.KVM_CREATE_VCPU, vcpu_id)
        vcpu = Vcpu(self, fd, vcpu_id)
        self.vcpus.append(vcpu)
        return vcpu


# -- a vCPU ----------------------------------------------------------------------------------


class Vcpu:
    """A vCPU fd and its struct kvm_run."""

    def __init__(self, vm: Vm, fd: int, vcpu_id: int) -> None:
        self.vm = vm
        self.fd = fd
        self.id = vcpu_id
        self.run_area = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)

    def close(self) -> None:
        if self.fd >= 0:
            self.run_area.close()
            os.close(self.fd)
            self.fd = -1

    # registers

    def get_regs(self) -> u.KvmRegs:
        r = u.KvmRegs()
        _ioctl(self.fd, u.KVM_GET_REGS, r)
        return r

    def set_regs(self, regs: u.KvmRegs) -> None:
        _ioctl(self.fd, u.KVM_SET_REGS, regs)

    def get_sregs(self) -> u.KvmSregs:
        s = u.KvmSregs()
        _ioctl(self.fd, u.KVM_GET_SREGS, s)
        return s

    def set_sregs(self, sregs: u.KvmSregs) -> None:
        _ioctl(self.fd, u.KVM_SET_SREGS, sregs)

    # CPUID

    def set_cpuid2(self, entries: Iterable[CpuidEntry]) -> None:
        """KVM_SET_CPUID2: the guest's CPUID (decides guest_supported_xcr0, kvm_check_cpuid may
        refuse; identical re-sets only once the vCPU has run)."""
        entries = tuple(entries)
        buf = u.kvm_cpuid2(len(entries))
        for dst, e in zip(buf.entries, entries, strict=True):
            dst.function, dst.index, dst.flags = e.function, e.index, e.flags
            dst.eax, dst.ebx, dst.ecx, dst.edx = e.eax, e.ebx, e.ecx, e.edx
        _ioctl(self.fd, u.KVM_SET_CPUID2, buf)

    def get_cpuid2(self) -> tuple[CpuidEntry, ...]:
        """KVM_GET_CPUID2: the guest's CPUID as KVM holds it (runtime bits updated)."""
        buf = u.kvm_cpuid2(256)
        _ioctl(self.fd, u.KVM_GET_CPUID2, buf)
        return tuple(CpuidEntry(x.function, x.index, x.flags, x.eax, x.ebx, x.ecx, x.edx)
                     for x in buf.entries[: buf.nent])

    # MSRs

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """KVM_GET_MSRS: KVM stops at the first MSR it refuses and returns how many it read;
        the result holds exactly those (an MSR absent from it was refused)."""
        indices = list(indices)
        m = u.kvm_msrs([(i, 0) for i in indices])
        n = _ioctl(self.fd, u.KVM_GET_MSRS, m)
        return {m.entries[i].index: m.entries[i].data for i in range(n)}

    def set_msrs(self, values: Mapping[int, int] | Iterable[tuple[int, int]]) -> int:
        """KVM_SET_MSRS (host-initiated writes, in order): the number of MSRs written before
        the first refusal."""
        pairs = list(values.items() if isinstance(values, Mapping) else values)
        m = u.kvm_msrs(pairs)
        return _ioctl(self.fd, u.KVM_SET_MSRS, m)

    # XCRs

    def get_xcrs(self) -> dict[int, int]:
        """KVM_GET_XCRS: {xcr index: value}; KVM reports XCR0 only (nr_xcrs = 1)."""
        x = u.KvmXcrs()
        _ioctl(self.fd, u.KVM_GET_XCRS, x)
        return {x.xcrs[i].xcr: x.xcrs[i].value for i in range(x.nr_xcrs)}

    def set_xcrs(self, xcr0: int | None = None, *, entries: Iterable[tuple[int, int]] = (),
                 flags: int = 0) -> None:
        """KVM_SET_XCRS with XCR0 = ``xcr0`` (and/or raw (xcr, value) ``entries``): EINVAL when
        __kvm_set_xcr refuses the first XCR0 entry, more than 16 entries or flags != 0."""
        items = ([(u.XCR_XFEATURE_ENABLED_MASK, xcr0)] if xcr0 is not None else []) + list(entries)
        x = u.KvmXcrs()
        x.nr_xcrs = len(items)
        x.flags = flags
        for i, (xcr, value) in enumerate(items[: u.KVM_MAX_XCRS]):
            x.xcrs[i].xcr, x.xcrs[i].value = xcr, value
        _ioctl(self.fd, u.KVM_SET_XCRS, x)

    # XSAVE buffers

    def get_xsave(self) -> bytes:
        """KVM_GET_XSAVE: 4096 bytes (EINVAL once the guest's uabi_size exceeds 4096)."""
        x = u.KvmXsave()
        _ioctl(self.fd, u.KVM_GET_XSAVE, x)
        return bytes(x)

    def get_xsave2(self, size: int | None = None) -> bytes:
        """KVM_GET_XSAVE2: the first ``size`` bytes (default: KVM_CAP_XSAVE2 on the VM) of what
        KVM writes, guest_fpu.uabi_size bytes into a buffer of at least KVM_CAP_XSAVE2."""
        cap = self.vm.cap_xsave2()
        size = cap if size is None else size
        buf = (ctypes.c_uint8 * max(size, cap, 4096))()  # KVM writes uabi_size bytes
        _ioctl(self.fd, u.KVM_GET_XSAVE2, buf)
        return bytes(buf)[:size]

    def set_xsave(self, image: bytes) -> None:
        """KVM_SET_XSAVE: KVM reads guest_fpu.uabi_size bytes; the buffer is zero-padded to
        max(len(image), KVM_CAP_XSAVE2) so that KVM never reads beyond it."""
        size = max(len(image), self.vm.cap_xsave2(), 4096)
        buf = (ctypes.c_uint8 * size).from_buffer_copy(image.ljust(size, b"\0"))
        _ioctl(self.fd, u.KVM_SET_XSAVE, buf)

    def get_fpu(self) -> bytes:
        """KVM_GET_FPU: struct kvm_fpu (416 bytes) as KVM fills it."""
        f = u.KvmFpu()
        _ioctl(self.fd, u.KVM_GET_FPU, f)
        return bytes(f)

    def set_fpu(self, fpu: bytes) -> None:
        """KVM_SET_FPU of a 416-byte struct kvm_fpu."""
        _ioctl(self.fd, u.KVM_SET_FPU, u.KvmFpu.from_buffer_copy(fpu))

    # MP state, events, INIT

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE (runs kvm_apic_accept_events first: a latched INIT is processed)."""
        s = u.KvmMpState()
        _ioctl(self.fd, u.KVM_GET_MP_STATE, s)
        return s.mp_state

    def set_mp_state(self, state: int) -> None:
        """KVM_SET_MP_STATE: EINVAL for any state but RUNNABLE without the in-kernel LAPIC."""
        _ioctl(self.fd, u.KVM_SET_MP_STATE, u.KvmMpState(mp_state=state))

    def get_vcpu_events(self) -> u.KvmVcpuEvents:
        e = u.KvmVcpuEvents()
        _ioctl(self.fd, u.KVM_GET_VCPU_EVENTS, e)
        return e

    def set_vcpu_events(self, events: u.KvmVcpuEvents) -> None:
        _ioctl(self.fd, u.KVM_SET_VCPU_EVENTS, events)

    def init_vcpu(self) -> int:
        """INIT this vCPU the way the hardware would (an INIT IPI): latch KVM_APIC_INIT with
        KVM_SET_VCPU_EVENTS (smi.latched_init), then KVM_GET_MP_STATE, whose
        kvm_apic_accept_events() runs kvm_vcpu_reset(vcpu, init_event=true). Returns the MP
        state after it (RUNNABLE for the BSP, INIT_RECEIVED for an AP). Needs the in-kernel
        irqchip (Kvm.create_vm(irqchip=True)); HostUnavailable otherwise."""
        if not self.vm.irqchip:
            raise HostUnavailable("INIT needs the in-kernel LAPIC: create the VM with irqchip")
        ev = self.get_vcpu_events()
        ev.flags = u.KVM_VCPUEVENT_VALID_SMM
        ev.smi.latched_init = 1
        self.set_vcpu_events(ev)
        return self.get_mp_state()

    # running

    def run(self) -> int:
        """KVM_RUN once; the exit reason (KVM_EXIT_*)."""
        _ioctl(self.fd, u.KVM_RUN)
        return struct.unpack_from("<I", self.run_area, u.KVM_RUN_EXIT_REASON)[0]

    def exit_io(self) -> tuple[int, int, int, bytes]:
        """The KVM_EXIT_IO record: (direction, port, size, data of the first access)."""
        direction, size, port, _count, offset = struct.unpack_from(
            "<BBHIQ", self.run_area, u.KVM_RUN_UNION)
        return direction, port, size, bytes(self.run_area[offset:offset + size])

    def exit_detail(self, reason: int) -> str:
        """A one-line description of an exit's union, for HostError."""
        base = u.KVM_RUN_UNION
        if reason == u.KVM_EXIT_INTERNAL_ERROR:
            sub, ndata = struct.unpack_from("<II", self.run_area, base)
            data = struct.unpack_from(f"<{min(ndata, 16)}Q", self.run_area, base + 8)
            if sub == u.KVM_INTERNAL_ERROR_EMULATION and data and data[0] & 1:
                # struct emulation_failure: flags, then insn_size and insn_bytes[15]
                raw = bytes(self.run_area[base + 16:base + 32])
                rip = self.get_regs().rip
                return (f"KVM_INTERNAL_ERROR_EMULATION: KVM's instruction emulator cannot run "
                        f"`{_disassemble(raw[1:1 + raw[0]], rip)}` at guest rip {rip:#x}")
            return f"suberror {sub}, data {[hex(d) for d in data]}"
        if reason == u.KVM_EXIT_FAIL_ENTRY:
            why, cpu = struct.unpack_from("<QI", self.run_area, base)
            return f"hardware_entry_failure_reason {why:#x} on cpu {cpu}"
        if reason == u.KVM_EXIT_MMIO:
            gpa, = struct.unpack_from("<Q", self.run_area, base)
            return f"guest touched unbacked guest-physical {gpa:#x}"
        rip = self.get_regs().rip
        return f"guest rip {rip:#x}"


def _disassemble(code: bytes, rip: int) -> str:
    """The first instruction of ``code`` in Intel syntax (iced-x86)."""
    from iced_x86 import Decoder, Formatter, FormatterSyntax

    insn = next(iter(Decoder(64, code, ip=rip)), None)
    return Formatter(FormatterSyntax.INTEL).format(insn) if insn else code.hex()


# -- guest permission, in a fresh process ----------------------------------------------------

_PROBE = r"""
import json, sys
from fpstate.host import kvm_uapi as u
from fpstate.host.kvm import KvmError, arch_prctl_get, arch_prctl_req, find_cpuid, open_kvm
idx = int(sys.argv[1])
out = {}
def errno_of(fn):
    try:
        fn()
        return 0
    except KvmError as e:
        return e.errno
k = open_kvm()
def leaf_d(k):
    cpuid = k.supported_cpuid()
    return {str(s): list(find_cpuid(cpuid, 0xD, s)) for s in range(0, 20)
            if any(find_cpuid(cpuid, 0xD, s))}
out["guest_perm_before"] = arch_prctl_get(u.ARCH_GET_XCOMP_GUEST_PERM)
out["cap_xsave2_before"] = k.cap_xsave2()
out["leaf_d_before"] = leaf_d(k)
out["req_errno"] = errno_of(lambda: arch_prctl_req(u.ARCH_REQ_XCOMP_GUEST_PERM, idx))
out["guest_perm_after"] = arch_prctl_get(u.ARCH_GET_XCOMP_GUEST_PERM)
out["cap_xsave2_after"] = k.cap_xsave2()
out["leaf_d_after"] = leaf_d(k)
vm = k.create_vm()
out["vm_cap_xsave2"] = vm.cap_xsave2()
vm.create_vcpu(0)
out["req_after_vcpu_errno"] = errno_of(lambda: arch_prctl_req(u.ARCH_REQ_XCOMP_GUEST_PERM, idx))
out["perm"] = arch_prctl_get(u.ARCH_GET_XCOMP_PERM)
print(json.dumps(out))
"""


def guest_permission_probe(xfeature: int = u.ARCH_XCOMP_TILEDATA) -> dict[str, Any]:
    """ARCH_REQ_XCOMP_GUEST_PERM(xfeature) in a fresh interpreter (guest permission is
    process-wide, sticky and locked by vCPU creation, so it cannot be tried twice in one
    process). Returns the guest permission, KVM_CAP_XSAVE2 and KVM_GET_SUPPORTED_CPUID leaf 0xD
    before and after the request, the request's errno (0 = granted), and the errno of the same
    request once a vCPU exists."""
    r = subprocess.run([sys.executable, "-c", _PROBE, str(xfeature)], capture_output=True,
                       text=True, timeout=60)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise HostUnavailable(f"guest permission probe failed: {tail}")
    return json.loads(r.stdout)
