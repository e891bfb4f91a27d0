"""``fpstate conform --layer kvm``: the model of KVM against this machine's real KVM.

Every case asks the same question of the model (`fpstate.kvm.x86`) and of real KVM
(`fpstate.host.kvm`, `fpstate.host.kvm_guest`) and compares the answers: an errno, a register, a
buffer byte for byte, a fault vector. The model is configured only with what KVM reports about
the host (KVM_X86_XCOMP_GUEST_SUPP = kvm_caps.supported_xcr0; KVM_GET_SUPPORTED_CPUID leaf 0xD
sub-leaf 1 = kvm_cpu_caps and supported_xss), the host's CPUID and the kernel model booted on it;
everything downstream is compared.

Cases (each a function ``case_*(ctx, report, rng, samples)``): the supported CPUID leaf 0xD and
KVM_CAP_XSAVE2 before and after ARCH_REQ_XCOMP_GUEST_PERM, KVM_SET_CPUID2 of dynamic features,
the XSAVE MSRs, KVM_SET_XCRS, KVM_SET_XSAVE / KVM_GET_XSAVE(2) round trips (with and without a
KVM_RUN in between), guest XSETBV, guest XSAVE-family programs against the CPU model, and INIT.
What this host's KVM cannot do is recorded as skipped with the reason (the model tests cover it).
"""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from fpstate.errors import FpstateError, HostUnavailable
from fpstate.kernel.x86.sched import Machine
from fpstate.kernel.x86.types import XFEATURE_MASK_USER_SUPPORTED
from fpstate.kvm.x86 import x86
from fpstate.kvm.x86.cpuid import XSAVES, CpuidEntry2, KvmCaps, find_cpuid, kvm_x86_dev_get_attr
from fpstate.kvm.x86.vcpu import (
    GuestOp,
    KvmConfig,
    KvmVcpu,
    Vmm,
    guest_hardware_profile,
    model_system,
    run_guest_program,
)
from fpstate.x86.program import Insn, Program

LAYER = "kvm"
XSAVE_MNEMONICS = ("XSAVE", "XSAVEOPT", "XSAVEC", "XRSTOR")
#: Guest #GP that a backend hands to KVM's emulator first (fpstate.host.kvm_guest
#: BACKEND_DIVERGENCES "cpl3_gp_emulated") reach the guest changed for these instructions.
GP_EMULATED_MNEMONICS = frozenset({"LDMXCSR", "FXSAVE", "FXRSTOR"})


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


# -- cases ------------------------------------------------------------------------------------


def _leaf_d(entries: tuple[CpuidEntry2, ...]) -> dict[str, list[int]]:
    out = {}
    for s in range(20):
        e = find_cpuid(entries, 0xD, s)
        if e is not None and any(e.regs):
            out[str(s)] = list(e.regs)
    return out


def case_supported_cpuid(ctx: Context, report: Report, rng: random.Random, samples: int) -> None:
    """KVM_GET_SUPPORTED_CPUID leaf 0xD, KVM_CAP_XSAVE2 and ARCH_GET_XCOMP_GUEST_PERM before
    and after ARCH_REQ_XCOMP_GUEST_PERM(XTILE_DATA), its errno, and its errno once a vCPU
    exists (a fresh process for the real side: the permission is sticky)."""
    from fpstate.host.kvm import guest_permission_probe

    case = "supported-cpuid"
    real = guest_permission_probe(18)
    v = ctx.vmm()
    leader = v.task.fpu

    def guest_perm() -> int:
        return leader.guest_perm.state_perm & XFEATURE_MASK_USER_SUPPORTED

    report.compare(case, "guest perm before", guest_perm(), real["guest_perm_before"])
    report.compare(case, "KVM_CAP_XSAVE2 before", v.cap_xsave2(), real["cap_xsave2_before"])
    report.compare(case, "leaf 0xD before", _leaf_d(v.supported_cpuid_0xd()),
                   real["leaf_d_before"])
    report.compare(case, "ARCH_REQ_XCOMP_GUEST_PERM(18)", -v.arch_prctl(0x1025, 18),
                   real["req_errno"])
    report.compare(case, "guest perm after", guest_perm(), real["guest_perm_after"])
    report.compare(case, "KVM_CAP_XSAVE2 after", v.cap_xsave2(), real["cap_xsave2_after"])
    report.compare(case, "leaf 0xD after", _leaf_d(v.supported_cpuid_0xd()), real["leaf_d_after"])
    report.compare(case, "KVM_CAP_XSAVE2 on the VM", v.cap_xsave2(), real["vm_cap_xsave2"])
    v.create_vcpu(v.create_vm())
    report.compare(case, "ARCH_REQ_XCOMP_GUEST_PERM(18) after KVM_CREATE_VCPU",
                   -v.arch_prctl(0x1025, 18), real["req_after_vcpu_errno"])
    report.compare(case, "KVM_GET_DEVICE_ATTR(0, 1)", kvm_x86_dev_get_attr(ctx.caps, 0, 1),
                   _errno_of(lambda: ctx.kvm.get_device_attr(0, 1)))
    if not ctx.host.has("AMX_TILE"):
        report.skip(case, "host lacks AMX: CPUID.(EAX=7,ECX=0):EDX[24]=0 (AMX guests are "
                          "covered by the model tests)")


def _narrow(entries: tuple[CpuidEntry2, ...], xcr0: int) -> tuple[CpuidEntry2, ...]:
    return tuple(replace(e, eax=e.eax & xcr0) if (e.function, e.index) == (0xD, 0) else e
                 for e in entries)


def case_cpuid_runtime(ctx: Context, report: Report, rng: random.Random, samples: int) -> None:
    """KVM_GET_CPUID2 after KVM_SET_XCRS: CPUID.(0DH,0).EBX is the standard size of the XCR0
    the guest has (kvm_update_cpuid_runtime), for every valid XCR0 the guest may set."""
    case = "cpuid-runtime"
    v = ctx.vmm()
    mvcpu = ctx.model_vcpu(v)
    rvcpu = ctx.real_vcpu()
    for xcr0 in (0x1, 0x3, 0x7, 0x27, 0xE7, 0x207, 0x2E7, 0x1F, 0x602E7):
        if xcr0 & ~ctx.caps.supported_xcr0:
            continue
        report.compare(case, f"KVM_SET_XCRS {xcr0:#x}", v.set_xcrs(mvcpu, [(0, xcr0)]),
                       _errno_of(lambda x=xcr0: rvcpu.set_xcrs(x)))
        model = find_cpuid(v.call(lambda c: x86_get_cpuid2(mvcpu)), 0xD, 0)
        real = find_cpuid(_entries(rvcpu.get_cpuid2()), 0xD, 0)
        report.compare(case, f"CPUID.(0DH,0).EBX with XCR0 {xcr0:#x}", model.ebx if model else None,
                       real.ebx if real else None)


def x86_get_cpuid2(vcpu: KvmVcpu) -> tuple[CpuidEntry2, ...]:
    from fpstate.kvm.x86.vcpu import kvm_vcpu_ioctl_get_cpuid2

    return kvm_vcpu_ioctl_get_cpuid2(vcpu)


def case_set_cpuid2(ctx: Context, report: Report, rng: random.Random, samples: int) -> None:
    """KVM_SET_CPUID2 of tables whose leaf 0xD claims more than KVM supports (dynamic
    features need guest permission; the rest is masked into guest_supported_xcr0)."""
    case = "set-cpuid2"
    for extra in (0x60000, 0x40000, 0x20000, 0x18, 0x200, 0x80000):
        entries = tuple(replace(e, eax=e.eax | extra) if (e.function, e.index) == (0xD, 0)
                        else e for e in ctx.entries)
        v = ctx.vmm()
        mvcpu = v.create_vcpu(v.create_vm())
        rvcpu = ctx.real_vcpu(())
        model = v.set_cpuid2(mvcpu, entries)
        real = _errno_of(lambda e=entries, r=rvcpu: r.set_cpuid2(_host_entries(e)))
        report.compare(case, f"KVM_SET_CPUID2 with leaf 0xD EAX |= {extra:#x}", model, real)
        for xcr0 in (0x7 | extra, 0xE7):
            report.compare(case, f"then KVM_SET_XCRS {xcr0:#x}", v.set_xcrs(mvcpu, [(0, xcr0)]),
                           _errno_of(lambda r=rvcpu, x=xcr0: r.set_xcrs(x)))


_MSR_VALUES = (0, 1, 0x100, 0x800, 0x1000, 0x1800, 0x40000, 0x60000, 1 << 63)


def case_msrs(ctx: Context, report: Report, rng: random.Random, samples: int) -> None:
    """KVM_SET_MSRS / KVM_GET_MSRS (host-initiated) of IA32_XSS, IA32_XFD, IA32_XFD_ERR and the
    XSAVE-managed CET MSRs (IA32_U_CET, IA32_PL0_SSP, IA32_PL3_SSP)."""
    case = "msrs"
    v = ctx.vmm()
    mvcpu = ctx.model_vcpu(v)
    rvcpu = ctx.real_vcpu()
    for index in (x86.MSR_IA32_XSS, x86.MSR_IA32_XFD, x86.MSR_IA32_XFD_ERR, x86.MSR_IA32_U_CET,
                  x86.MSR_IA32_PL0_SSP, x86.MSR_IA32_PL3_SSP):
        for value in _MSR_VALUES:
            report.compare(case, f"KVM_SET_MSRS {index:#x} = {value:#x}",
                           v.set_msrs(mvcpu, [(index, value)]), rvcpu.set_msrs({index: value}))
            report.compare(case, f"KVM_GET_MSRS {index:#x}", v.get_msrs(mvcpu, [index]),
                           rvcpu.get_msrs([index]))


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


def case_set_xcrs(ctx: Context, report: Report, rng: random.Random, samples: int) -> None:
    """KVM_SET_XCRS accept/reject and KVM_GET_XCRS after it, for ``samples`` XCR0 values (a few
    with other XCR indices, flags, or more than KVM_MAX_XCRS entries)."""
    case = "set-xcrs"
    v = ctx.vmm()
    mvcpu = ctx.model_vcpu(v)
    rvcpu = ctx.real_vcpu()
    for _ in range(samples):
        xcr0 = random_xcr0(rng, ctx.caps.supported_xcr0)
        kind = rng.randrange(20)
        if kind == 0:
            entries, flags = [(rng.randrange(1, 4), rng.getrandbits(8)), (0, xcr0)], 0
        elif kind == 1:
            entries, flags = [(0, xcr0)], rng.getrandbits(32) | 1
        elif kind == 2:
            entries, flags = [(0, xcr0)] * rng.randrange(17, 20), 0
        else:
            entries, flags = [(0, xcr0)], 0
        model = v.set_xcrs(mvcpu, entries, flags)
        real = _errno_of(lambda e=entries, f=flags: rvcpu.set_xcrs(entries=e, flags=f))
        report.compare(case, f"KVM_SET_XCRS {[(i, hex(x)) for i, x in entries[:2]]} "
                             f"flags {flags:#x}", model, real)
        report.compare(case, "KVM_GET_XCRS after it", v.get_xcrs(mvcpu), rvcpu.get_xcrs())


def random_uabi(rng: random.Random, caps: KvmCaps, mxcsr_mask: int, *,
                canonical: bool = False) -> bytes:
    """A KVM_SET_XSAVE buffer. Ordinary buffers have random bytes everywhere (the kernel
    ignores what the header does not name) and, now and then, one thing wrong: an XSTATE_BV
    bit KVM does not support, a supervisor bit, XCOMP_BV, a reserved header byte, a reserved
    MXCSR bit. ``canonical`` buffers are what this CPU could have saved, for a KVM_RUN in
    between: SSE always (a guest run leaves it in use here), AVX and AVX-512 (all three or
    none; ZMM_Hi256 in use implies AVX in use on this CPU), all non-zero, a valid MXCSR."""
    buf = bytearray(rng.randbytes(4096))
    user = caps.supported_xcr0
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


def case_xsave_round_trip(ctx: Context, report: Report, rng: random.Random, samples: int) -> None:
    """KVM_SET_XSAVE accept/reject and the KVM_GET_XSAVE2 (and KVM_GET_XSAVE) buffer after it,
    byte for byte, for ``samples`` random buffers, on a vCPU with the supported CPUID and one
    whose guest CPUID enables only x87/SSE/AVX (GET masks with the guest's XCR0, SET checks
    KVM's)."""
    case = "xsave-round-trip"
    narrow = _narrow(ctx.entries, 0x7)
    kept = ctx.cpuid_0xd_kept(narrow)
    tables: tuple[tuple[CpuidEntry2, ...] | None, ...] = (None, narrow)
    if kept:
        report.skip(case, f"no vCPU with a narrower guest XCR0: {kept}")
        tables = (None,)
    pairs = []
    for entries in tables:
        v = ctx.vmm()
        pairs.append((v, ctx.model_vcpu(v, entries), ctx.real_vcpu(entries)))
    for v, mvcpu, rvcpu in pairs:
        report.compare(case, "KVM_GET_XSAVE2 of a new vCPU", v.get_xsave2(mvcpu),
                       rvcpu.get_xsave2())
    mask = ctx.system.mxcsr_feature_mask
    for n in range(samples):
        v, mvcpu, rvcpu = pairs[n % len(pairs)]
        buf = random_uabi(rng, ctx.caps, mask)
        hdr = struct.unpack_from("<QQ", buf, 512)
        what = f"KVM_SET_XSAVE #{n} XSTATE_BV {hdr[0]:#x} XCOMP_BV {hdr[1]:#x}"
        report.compare(case, what, v.set_xsave(mvcpu, buf),
                       _errno_of(lambda b=buf, r=rvcpu: r.set_xsave(b)))
        model, real = v.get_xsave2(mvcpu), rvcpu.get_xsave2()
        report.compare(case, f"KVM_GET_XSAVE2 after #{n}", model, real)
        if n % 10 == 0:
            report.compare(case, f"KVM_GET_XSAVE after #{n}", v.get_xsave(mvcpu),
                           rvcpu.get_xsave())


def case_xsave_across_run(ctx: Context, report: Report, rng: random.Random, samples: int
                          ) -> None:
    """KVM_SET_XSAVE, a KVM_RUN whose guest only sets XCR0 (the guest FPU is loaded and put:
    XRSTORS and XSAVES of the guest fpstate by the host kernel), KVM_GET_XSAVE2: what the
    hardware saved back, for buffers a CPU could have saved."""
    case = "xsave-across-run"
    g = ctx.guest_machine()
    v = ctx.vmm()
    mvcpu = ctx.model_vcpu(v)
    xcr0 = ctx.system.xcr0
    mask = ctx.system.mxcsr_feature_mask
    for n in range(samples):
        buf = random_uabi(rng, ctx.caps, mask, canonical=True)
        report.compare(case, f"KVM_SET_XSAVE #{n}", v.set_xsave(mvcpu, buf),
                       _errno_of(lambda b=buf: g.vcpu.set_xsave(b)))
        v.run(mvcpu, [GuestOp("xsetbv", 0, xcr0)])
        g.run_insns([], xcr0=xcr0, cpl=3)
        model, real = v.get_xsave2(mvcpu), g.vcpu.get_xsave2()
        report.compare(case, f"KVM_GET_XSAVE2 after KVM_RUN #{n}", model, real)


def case_guest_xsetbv(ctx: Context, report: Report, rng: random.Random, samples: int) -> None:
    """Guest XSETBV of random values at CPL 0 (and some at CPL 3): the fault KVM injects (#GP)
    or success, and XCR0 afterwards (KVM_GET_XCRS)."""
    from fpstate.host.kvm_guest import HostError

    case = "guest-xsetbv"
    g = ctx.guest_machine()
    v = ctx.vmm()
    mvcpu = ctx.model_vcpu(v)
    xcr0 = ctx.system.xcr0
    for _ in range(samples):
        value = random_xcr0(rng, ctx.caps.supported_xcr0)
        ecx = rng.choice((0, 0, 0, 0, 1, 2, rng.getrandbits(32)))
        cpl = 3 if rng.randrange(8) == 0 else 0
        try:
            out = g.run_insns([Insn("XSETBV", reg=ecx, value=value)], xcr0=xcr0, cpl=cpl)
        except HostError as e:
            report.skip(case, f"the guest cannot run XSETBV here: {e}")
            return
        r = v.run(mvcpu, [GuestOp("xsetbv", 0, xcr0), GuestOp("xsetbv", ecx, value, cpl=cpl)])
        model = r.results[1].vector if r.results[1] else None
        real = out.fault.vector if out.fault else None
        report.compare(case, f"XSETBV ecx={ecx:#x} {value:#x} at CPL {cpl}", model, real)
        report.compare(case, "KVM_GET_XCRS after it", v.get_xcrs(mvcpu), g.vcpu.get_xcrs())


def case_guest_programs(ctx: Context, report: Report, rng: random.Random, samples: int, *,
                        focuses: tuple[str, ...] = XSAVE_MNEMONICS * 6 + ("XSAVES", "XRSTORS")
                        ) -> None:
    """Random guest programs around XSAVE/XSAVEOPT/XSAVEC/XRSTOR (fpstate.x86.progen; each has
    at least one of ``focuses``): the real guest's outcome must be one the CPU model allows for
    the guest's hardware, with the XCR0 the guest set itself. CPL 0 where this KVM runs the
    XSAVE family there, else CPL 3."""
    from fpstate.x86.progen import RandomDraw, generate_program

    case = "guest-programs"
    g = ctx.guest_machine()
    v = ctx.vmm()
    mvcpu = ctx.model_vcpu(v)
    hw = guest_hardware_profile(mvcpu)
    cpl = 0
    why = g.xstate_at_cpl0()
    if why:
        cpl = 3
        report.skip(case, f"programs run at guest CPL 3: {why}")
    div = ctx.divergences()
    xcr0s = [ctx.system.xcr0]
    if "guest_xcr0_not_in_hardware" in div:
        report.skip(case, f"only XCR0 = the host's {ctx.system.xcr0:#x}: "
                          f"{div['guest_xcr0_not_in_hardware']}")
    else:
        xcr0s += [x for x in (0x3, 0x7, 0xE7, 0x2E7, 0x1F) if x & ~ctx.caps.supported_xcr0 == 0]
    if not guest_cpu_has(mvcpu, XSAVES):
        report.skip(case, "KVM offers no XSAVES/XRSTORS to guests here "
                          "(KVM_GET_SUPPORTED_CPUID.(EAX=0DH,ECX=1):EAX[3]=0): they are #UD, "
                          "and their kernel rules are covered by the model tests")
    draw = RandomDraw(rng.getrandbits(32))
    done = tries = 0
    while done < samples and tries < 4 * samples:
        tries += 1
        xcr0 = rng.choice(xcr0s)
        focus = rng.choice(focuses)
        prog = replace(generate_program(draw, hw, xcr0=xcr0, focus=focus), cpl=cpl)
        try:
            outs = run_guest_program(mvcpu, prog, xcr0=xcr0)
        except FpstateError as e:
            report.skip(case, f"a program the model cannot answer was drawn again: {e}")
            continue
        if "cpl3_gp_emulated" in div and cpl == 3 and _gp_emulated(prog, outs):
            report.skip(case, "programs whose #GP at CPL 3 this backend's emulator changes "
                              f"are not compared: {div['cpl3_gp_emulated']}")
            continue
        real = g.run_program(prog, xcr0=xcr0)
        done += 1
        report.cases += 1
        if real.key() not in {o.key() for o in outs}:
            from fpstate.commands.conform import outcome_to_json, program_to_json

            closest = min(outs, key=lambda o: len(o.differences(real)))
            report.mismatches.append({
                "case": case, "what": f"program at CPL {cpl}, XCR0 {xcr0:#x}",
                "program": program_to_json(prog), "model": [outcome_to_json(o) for o in outs],
                "host": outcome_to_json(real), "differences": closest.differences(real)})


def guest_cpu_has(vcpu: KvmVcpu, bit: int) -> bool:
    from fpstate.kvm.x86.cpuid import guest_cpu_cap_has

    return guest_cpu_cap_has(vcpu.kvm.caps, vcpu.arch.cpuid, bit)


def _gp_emulated(prog: Program, outs: list) -> bool:
    return any(o.fault is not None and o.fault.vector == "#GP" and o.fault_step is not None
               and prog.insns[o.fault_step].mnemonic in GP_EMULATED_MNEMONICS for o in outs)


def case_init(ctx: Context, report: Report, rng: random.Random, samples: int) -> None:
    """INIT (latched with KVM_SET_VCPU_EVENTS, accepted by KVM_GET_MP_STATE): which XSAVE
    components are zeroed and what survives (XCR0, every other component), byte for byte."""
    case = "init"
    g = ctx.guest_machine(irqchip=True)
    v = ctx.vmm()
    mvcpu = ctx.model_vcpu(v)
    mask = ctx.system.mxcsr_feature_mask
    cleared = (ctx.caps.supported_xcr0 | ctx.caps.supported_xss) & x86.XSTATE_CLEAR_ON_INIT
    if not cleared:
        report.skip(case, f"KVM here supports no MPX or CET state for guests (supported_xcr0 "
                          f"{ctx.caps.supported_xcr0:#x}, supported_xss "
                          f"{ctx.caps.supported_xss:#x}): INIT clears nothing; clearing is "
                          "covered by the model tests")
    for n in range(samples):
        xcr0 = rng.choice([x for x in (0x1, 0x3, 0x7, 0xE7) if not x & ~ctx.caps.supported_xcr0])
        buf = random_uabi(rng, ctx.caps, mask, canonical=bool(n % 2))
        v.set_xcrs(mvcpu, [(0, xcr0)])
        g.vcpu.set_xcrs(xcr0)
        v.set_xsave(mvcpu, buf)
        _errno_of(lambda b=buf: g.vcpu.set_xsave(b))
        v.init(mvcpu)
        g.vcpu.init_vcpu()
        model, real = v.get_xsave2(mvcpu), g.vcpu.get_xsave2()
        report.compare(case, f"KVM_GET_XSAVE2 after INIT #{n}", model, real)
        report.compare(case, f"KVM_GET_XCRS after INIT #{n}", v.get_xcrs(mvcpu),
                       g.vcpu.get_xcrs())


#: The cases in the order they run, with the share of ``samples`` each takes.
CASES: tuple[tuple[Callable[..., None], float], ...] = (
    (case_supported_cpuid, 0), (case_set_cpuid2, 0), (case_cpuid_runtime, 0), (case_msrs, 0),
    (case_set_xcrs, 1.0),
    (case_xsave_round_trip, 1.0), (case_xsave_across_run, 0.1), (case_guest_xsetbv, 0.4),
    (case_guest_programs, 1.0), (case_init, 0.05),
)


def run_kvm_layer(samples: int = 500, seed: int = 0) -> dict[str, Any]:
    """Every case against this machine's KVM: {"layer", "cases", "mismatches", "skipped"}.
    Where /dev/kvm is absent or unusable the whole layer is skipped with the reason."""
    report = Report()
    try:
        ctx = Context()
    except HostUnavailable as e:
        report.skip("all", str(e))
        return report.to_dict()
    rng = random.Random(seed)
    try:
        for case, share in CASES:
            case(ctx, report, rng, max(1, int(samples * share)) if share else 0)
    finally:
        ctx.close()
    return report.to_dict()


def _layer_run(samples: int, seed: int) -> Any:
    from fpstate.commands.conform import LayerResult

    start = time.monotonic()
    r = run_kvm_layer(samples, seed)
    return LayerResult(LAYER, r["cases"], r["mismatches"], r["skipped"],
                       time.monotonic() - start)


def _register() -> None:
    from fpstate.commands.conform import Layer, register_layer

    register_layer(Layer(LAYER, "KVM x86 guest FPU: the KVM model vs this machine's /dev/kvm",
                         _layer_run))


_register()

__all__ = ["CASES", "Context", "Report", "random_uabi", "random_xcr0", "run_kvm_layer"]
