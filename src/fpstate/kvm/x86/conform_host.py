"""The two sides of ``fpstate conform --layer kvm``: real KVM and the model configured from it.

`Context` opens this machine's /dev/kvm, reads what KVM reports about itself (KVM_X86_XCOMP_
GUEST_SUPP, KVM_GET_SUPPORTED_CPUID) and builds the model of KVM from only that, the host's CPUID
and the kernel model booted on it; it hands out fresh model VMMs, real vCPUs and guest machines
for the cases (`fpstate.kvm.x86.conform`, `fpstate.kvm.x86.conform_guest`). `Report` collects
what the cases compared, the mismatches and the skips with their reasons. `random_xcr0` and
`random_uabi` draw the inputs both sides are given.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fpstate.errors import HostUnavailable
from fpstate.kernel.x86.sched import Machine
from fpstate.kvm.x86.cpuid import CpuidEntry2, KvmCaps, find_cpuid
from fpstate.kvm.x86.vcpu import KvmConfig, KvmVcpu, Vmm, model_system
from fpstate.x86.cpu import PKRU as XFEATURE_PKRU
from fpstate.x86.progen import PKRU_KEY0

LAYER = "kvm"


@dataclass
class Report:
    """The layer's answer: cases compared, mismatches, skips (with the reason)."""

    cases: int = 0
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def compare(self, case: str, what: str, model: Any, real: Any) -> bool:
        self.cases += 1
        if model != real:
            detail = f"{what}: model {_fmt(model)} != real {_fmt(real)}"
            if isinstance(model, bytes) and isinstance(real, bytes):
                detail += "; " + _diff_bytes(model, real)
            self.mismatches.append({"case": case, "what": what, "model": _fmt(model),
                                    "host": _fmt(real), "differences": [detail]})
            return False
        return True

    def skip(self, case: str, reason: str) -> None:
        entry = f"{case}: {reason}"
        if entry not in self.skipped:
            self.skipped.append(entry)

    def to_dict(self) -> dict[str, Any]:
        return {"layer": LAYER, "cases": self.cases, "mismatches": self.mismatches,
                "skipped": self.skipped}


def _fmt(v: Any) -> str:
    if isinstance(v, bytes):
        return f"<{len(v)} bytes {v[:16].hex()}...>"
    if isinstance(v, int) and abs(v) > 9:
        return hex(v)
    return repr(v)


def _diff_bytes(a: bytes, b: bytes) -> str:
    first = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
    return f"first difference at byte {first} (model {a[first:first + 8].hex()}, " \
           f"real {b[first:first + 8].hex()})"


# -- the host side ----------------------------------------------------------------------------


def _entries(host_entries: Any) -> tuple[CpuidEntry2, ...]:
    return tuple(CpuidEntry2(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                 for e in host_entries)


def _host_entries(entries: Any) -> tuple[Any, ...]:
    from fpstate.host.kvm import CpuidEntry

    return tuple(CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                 for e in entries)


def _errno_of(fn: Callable[[], Any]) -> int:
    from fpstate.host.kvm import KvmError

    try:
        fn()
    except KvmError as e:
        return -e.errno
    return 0


class Context:
    """Real KVM and the model configured from it. HostUnavailable when /dev/kvm is unusable."""

    def __init__(self) -> None:
        from fpstate.host.kvm import KvmError, kvm_backend, open_kvm
        from fpstate.x86.profiles import load_profile

        try:
            self.kvm = open_kvm()
            self.supported = self.kvm.supported_cpuid()
            self.xcomp_guest_supp = self.kvm.xcomp_guest_supp()
        except KvmError as e:
            raise HostUnavailable(f"/dev/kvm is unusable: {e}") from None
        self.backend = kvm_backend()
        self.host = load_profile("host")
        self.system = model_system(self.host)
        self.caps = KvmCaps.from_kvm(self.xcomp_guest_supp, _entries(self.supported), self.host,
                                     host_xcr0=self.system.xcr0, host_xss=self.system.xss)
        self.config = KvmConfig(self.caps, self.host)
        self.entries = _entries(self.supported)
        self._machines: list[Any] = []
        #: fpstate.kvm.x86.conform_guest.GuestXsaves, measured on first use
        self.guest_xsaves: Any = None

    def vmm(self) -> Vmm:
        """A fresh model: the kernel booted on this host's CPUID, KVM configured as KVM says."""
        return Vmm(Machine(self.system, 1), self.config)

    def model_vcpu(self, v: Vmm, entries: tuple[CpuidEntry2, ...] | None = None) -> KvmVcpu:
        vcpu = v.create_vcpu(v.create_vm())
        assert v.set_cpuid2(vcpu, self.entries if entries is None else entries) == 0
        v.set_cr4(vcpu, osxsave=True)
        return vcpu

    def real_vcpu(self, entries: tuple[CpuidEntry2, ...] | None = None) -> Any:
        """A vCPU of a fresh VM (never run), its CPUID set."""
        vm = self.kvm.create_vm()
        self._machines.append(vm)
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid2(self.supported if entries is None else _host_entries(entries))
        return vcpu

    def guest_machine(self, **kw: Any) -> Any:
        from fpstate.host.kvm_guest import GuestMachine

        g = GuestMachine(self.kvm, **kw)
        self._machines.append(g)
        return g

    def cpuid_0xd_kept(self, entries: tuple[CpuidEntry2, ...]) -> str | None:
        """None if KVM keeps the guest CPUID leaf 0xD EAX it was given by KVM_SET_CPUID2 (as
        kvm_set_cpuid does), else what this backend did instead (measured)."""
        vcpu = self.real_vcpu(entries)
        given = find_cpuid(entries, 0xD, 0)
        held = find_cpuid(_entries(vcpu.get_cpuid2()), 0xD, 0)
        if given is not None and held is not None and held.eax != given.eax:
            return (f"this KVM ({self.backend}) replaces the guest's CPUID.(EAX=0DH,ECX=0).EAX: "
                    f"KVM_SET_CPUID2 of {given.eax:#x}, KVM_GET_CPUID2 then shows "
                    f"{held.eax:#x}, and KVM_SET_XCRS accepts what it shows")
        return None

    def divergences(self) -> dict[str, str]:
        from fpstate.host.kvm_guest import BACKEND_DIVERGENCES

        return BACKEND_DIVERGENCES.get(self.backend or "", {})

    def close(self) -> None:
        for m in self._machines:
            m.close()
        self._machines.clear()
        self.kvm.close()


def random_xcr0(rng: random.Random, supported: int) -> int:
    """An XCR0 to try: a subset of bits 0-19, a supported mask with one thing wrong, or any
    64-bit value."""
    kind = rng.randrange(10)
    if kind < 4:
        return rng.getrandbits(20) & rng.choice((0xFFFFF, 0x7FF, 0xFF, supported | 0x18))
    if kind < 8:
        base = rng.getrandbits(20) & supported | 1
        return base ^ (1 << rng.randrange(20)) if rng.random() < 0.5 else base
    return rng.getrandbits(64) & rng.choice((~0, 0xFFFFFFFF, 0x7 | 1 << rng.randrange(64)))


def random_uabi(rng: random.Random, caps: KvmCaps, mxcsr_mask: int, *,
                canonical: bool = False) -> bytes:
    """A KVM_SET_XSAVE buffer. Ordinary buffers have random bytes everywhere (the kernel
    ignores what the header does not name) and, now and then, one thing wrong: an XSTATE_BV
    bit KVM does not support, a supervisor bit, XCOMP_BV, a reserved header byte, a reserved
    MXCSR bit. ``canonical`` buffers are what this CPU could have saved, for a KVM_RUN in
    between: SSE always (a guest run leaves it in use here), AVX and AVX-512 (all three or
    none; ZMM_Hi256 in use implies AVX in use on this CPU), all non-zero, a valid MXCSR.
    Every buffer leaves protection key 0 readable and writable in its PKRU bytes (bits 1:0
    clear): KVM_SET_XSAVE puts them in vcpu->arch.pkru, the guest's PKRU at its next entry,
    and every page of the test guest has key 0, so a later guest program would only meet a
    protection-key #PF (fpstate.x86.progen keeps the same rule)."""
    buf = bytearray(rng.randbytes(4096))
    user = caps.supported_xcr0
    if user >> XFEATURE_PKRU & 1:
        buf[caps.component(XFEATURE_PKRU).offset] &= ~PKRU_KEY0
    if canonical:
        xstate_bv = (rng.getrandbits(8) & user & 0xE4) | 0x2
        if xstate_bv & 0xE0:
            xstate_bv |= 0xE4
        for off in range(576, 4096):
            buf[off] |= 1
        for off in range(160, 416):
            buf[off] |= 1
        mxcsr = rng.getrandbits(32) & mxcsr_mask
        struct.pack_into("<IIQQ", buf, 24, mxcsr, 0, 0, 0)
        struct.pack_into("<QQ", buf, 512, xstate_bv, 0)
        buf[528:576] = bytes(48)
        return bytes(buf)
    xstate_bv = rng.getrandbits(20) & rng.choice((user, user, user | 0x18, 0xFFFFF))
    mxcsr = rng.getrandbits(32) & mxcsr_mask
    fault = rng.randrange(12)
    xcomp_bv = 0
    if fault == 0:
        xstate_bv |= 1 << rng.choice((3, 4, 8, 9, 10, 11, 12, 17, 18, 19, 40, 63))
    elif fault == 1:
        xcomp_bv = rng.choice((1 << 63 | xstate_bv, 1, rng.getrandbits(64)))
    elif fault == 2:
        buf[528 + rng.randrange(48)] = rng.randrange(1, 256)
    elif fault == 3:
        mxcsr |= 1 << rng.choice([b for b in range(32) if not mxcsr_mask >> b & 1])
    struct.pack_into("<I", buf, 24, mxcsr)
    struct.pack_into("<QQ", buf, 512, xstate_bv, xcomp_bv)
    if fault != 2:
        buf[528:576] = bytes(48)
    return bytes(buf)


__all__ = ["LAYER", "Context", "Report", "random_uabi", "random_xcr0"]
