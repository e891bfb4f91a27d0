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
KVM_RUN in between, and between vCPUs offered different features), guest XSETBV, guest
XSAVE-family programs against the CPU model, guest XSAVES/XRSTORS where KVM offers them (and
their refusal where it does not), and INIT. The two
sides live in `fpstate.kvm.x86.conform_host`, the guest-code cases in
`fpstate.kvm.x86.conform_guest`.
What this host's KVM cannot do is recorded as skipped with the reason measured here (the model
tests cover the kernel's rules for it).
"""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from fpstate.errors import HostUnavailable
from fpstate.kernel.x86.types import XFEATURE_MASK_USER_SUPPORTED
from fpstate.kvm.x86 import x86
from fpstate.kvm.x86.conform_guest import (
    case_fpu_ioctls,
    case_fpu_tag_word,
    case_guest_programs,
    case_guest_xsaves,
    case_guest_xsetbv,
    case_init,
    case_xsave_across_run,
)
from fpstate.kvm.x86.conform_host import (
    LAYER,
    Context,
    Report,
    _entries,
    _errno_of,
    _host_entries,
    random_uabi,
    random_xcr0,
)
from fpstate.kvm.x86.cpuid import CpuidEntry2, find_cpuid, kvm_x86_dev_get_attr, offer_xcr0
from fpstate.kvm.x86.vcpu import KvmVcpu

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


def case_xsave_round_trip(ctx: Context, report: Report, rng: random.Random, samples: int) -> None:
    """KVM_SET_XSAVE accept/reject and the KVM_GET_XSAVE2 (and KVM_GET_XSAVE) buffer after it,
    byte for byte, for ``samples`` random buffers, on a vCPU with the supported CPUID and one
    whose guest CPUID enables only x87/SSE/AVX (GET masks with the guest's XCR0, SET checks
    KVM's)."""
    case = "xsave-round-trip"
    narrow = offer_xcr0(ctx.entries, 0x7)
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


def case_migrate(ctx: Context, report: Report, rng: random.Random, samples: int) -> None:
    """A migration between CPU models, both ways: a vCPU offered every supported feature
    (``wide``) and one whose CPUID.(0DH,0) offers x87/SSE/AVX only (``narrow``, a VMM's older
    CPU model). ``wide`` is loaded with a buffer this CPU could have saved; its KVM_GET_XSAVE2
    goes into ``narrow`` by KVM_SET_XSAVE (accepted or not: KVM checks its own supported XCR0,
    not the guest's), ``narrow``'s KVM_GET_XSAVE2 (masked with its CPUID) goes back into
    ``wide``; every errno and every buffer byte for byte, model against real."""
    case = "migrate"
    narrow_entries = offer_xcr0(ctx.entries, 0x7)
    kept = ctx.cpuid_0xd_kept(narrow_entries)
    if kept:
        report.skip(case, f"no vCPU with a narrower guest XCR0: {kept}")
        return
    mask = ctx.system.mxcsr_feature_mask
    sides = []
    for entries in (None, narrow_entries):
        v = ctx.vmm()
        sides.append((v, ctx.model_vcpu(v, entries), ctx.real_vcpu(entries)))
    (wv, wm, wr), (nv, nm, nr) = sides
    for n in range(samples):
        buf = random_uabi(rng, ctx.caps, mask, canonical=True)
        report.compare(case, f"#{n} KVM_SET_XSAVE of wide", wv.set_xsave(wm, buf),
                       _errno_of(lambda b=buf: wr.set_xsave(b)))
        out_m, out_r = wv.get_xsave2(wm), wr.get_xsave2()
        report.compare(case, f"#{n} KVM_GET_XSAVE2 of wide", out_m, out_r)
        report.compare(case, f"#{n} KVM_SET_XSAVE of wide's buffer into narrow",
                       nv.set_xsave(nm, out_r), _errno_of(lambda b=out_r: nr.set_xsave(b)))
        back_m, back_r = nv.get_xsave2(nm), nr.get_xsave2()
        report.compare(case, f"#{n} KVM_GET_XSAVE2 of narrow", back_m, back_r)
        report.compare(case, f"#{n} KVM_SET_XSAVE of narrow's buffer into wide",
                       wv.set_xsave(wm, back_r), _errno_of(lambda b=back_r: wr.set_xsave(b)))
        report.compare(case, f"#{n} KVM_GET_XSAVE2 of wide after the round trip",
                       wv.get_xsave2(wm), wr.get_xsave2())


#: The cases in the order they run, with the share of ``samples`` each takes.
CASES: tuple[tuple[Callable[..., None], float], ...] = (
    (case_supported_cpuid, 0), (case_set_cpuid2, 0), (case_cpuid_runtime, 0), (case_msrs, 0),
    (case_set_xcrs, 1.0),
    (case_xsave_round_trip, 1.0), (case_migrate, 0.1), (case_xsave_across_run, 0.1),
    (case_fpu_ioctls, 0.05), (case_fpu_tag_word, 0.02), (case_guest_xsetbv, 0.4),
    (case_guest_programs, 1.0), (case_guest_xsaves, 0), (case_init, 0.05),
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

__all__ = [
    "CASES", "LAYER", "Context", "Report", "case_guest_programs", "case_guest_xsaves",
    "case_guest_xsetbv", "case_init", "case_xsave_across_run", "random_uabi", "random_xcr0",
    "run_kvm_layer",
]
