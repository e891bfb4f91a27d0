"""The guest-side cases of ``fpstate conform --layer kvm``: what guest code sees under real KVM.

Each case runs guest code in a real KVM guest of this machine (`fpstate.host.kvm_guest`) and the
same question through the model of KVM (`fpstate.kvm.x86.vcpu`: KVM_RUN guest ops, or
`run_guest_program` on the CPU model of the guest's hardware), and compares: a buffer after a
KVM_RUN, the fault an XSETBV or WRMSR takes, a program's whole outcome, what INIT keeps. What
this host's KVM backend does differently from VMX/SVM KVM (`fpstate.host.kvm_guest.
BACKEND_DIVERGENCES`) and what it cannot do at all (XSAVES/XRSTORS, `measure_guest_xsaves`) is
skipped with the reason measured here.
"""

from __future__ import annotations

import random
import re
import struct
from dataclasses import dataclass, replace
from typing import Any

from fpstate.errors import FpstateError, ProgramError
from fpstate.kvm.x86 import x86
from fpstate.kvm.x86.conform_host import (
    Context,
    Report,
    _entries,
    _errno_of,
    _host_entries,
    random_uabi,
    random_xcr0,
)
from fpstate.kvm.x86.cpuid import XSAVES, find_cpuid
from fpstate.kvm.x86.vcpu import (
    GuestOp,
    KvmVcpu,
    Vmm,
    guest_hardware_profile,
    run_guest_program,
)
from fpstate.x86.program import Buffer, Insn, Outcome, Program
from fpstate.x86.xfeatures import bits

XSAVE_MNEMONICS = ("XSAVE", "XSAVEOPT", "XSAVEC", "XRSTOR")
#: Guest #GP that a backend hands to KVM's emulator first (fpstate.host.kvm_guest
#: BACKEND_DIVERGENCES "cpl3_gp_emulated") reach the guest changed for these instructions.
GP_EMULATED_MNEMONICS = frozenset({"LDMXCSR", "FXSAVE", "FXRSTOR", "FXSAVE32", "FXRSTOR32"})
#: What a guest without CR4.PKE cannot run (#UD), and this backend runs (BACKEND_DIVERGENCES
#: "guest_pkru_without_cr4_pke").
PKRU_MNEMONICS = frozenset({"WRPKRU", "RDPKRU"})
ALL_ONES = (1 << 64) - 1
#: IA32_XSS values a guest with XSAVES would write: none, CET_U, CET_U | CET_S.
GUEST_XSS = (0x0, 0x800, 0x1800)


def _guest_and_model(ctx: Context) -> tuple[Any, Vmm, KvmVcpu, int, int]:
    """The real guest machine, a model VMM with its vCPU, the host's XCR0 and MXCSR mask: what
    the KVM_RUN round-trip cases start from."""
    g = ctx.guest_machine()
    v = ctx.vmm()
    return g, v, ctx.model_vcpu(v), ctx.system.xcr0, ctx.system.mxcsr_feature_mask


def case_xsave_across_run(ctx: Context, report: Report, rng: random.Random, samples: int
                          ) -> None:
    """KVM_SET_XSAVE, a KVM_RUN whose guest only sets XCR0 (the guest FPU is loaded and put:
    XRSTORS and XSAVES of the guest fpstate by the host kernel), KVM_GET_XSAVE2: what the
    hardware saved back, for buffers a CPU could have saved."""
    case = "xsave-across-run"
    g, v, mvcpu, xcr0, mask = _guest_and_model(ctx)
    for n in range(samples):
        buf = random_uabi(rng, ctx.caps, mask, canonical=True)
        report.compare(case, f"KVM_SET_XSAVE #{n}", v.set_xsave(mvcpu, buf),
                       _errno_of(lambda b=buf: g.vcpu.set_xsave(b)))
        v.run(mvcpu, [GuestOp("xsetbv", 0, xcr0)])
        g.run_insns([], xcr0=xcr0, cpl=3)
        model, real = v.get_xsave2(mvcpu), g.vcpu.get_xsave2()
        report.compare(case, f"KVM_GET_XSAVE2 after KVM_RUN #{n}", model, real)


def case_fpu_ioctls(ctx: Context, report: Report, rng: random.Random, samples: int) -> None:
    """The legacy KVM_SET_FPU / KVM_GET_FPU on an XSAVE host: the guest fpstate is first loaded
    by KVM_SET_XSAVE with x87 and SSE in XSTATE_BV, or (every other sample) with an empty
    XSTATE_BV; then KVM_SET_FPU of random fields, KVM_GET_FPU and KVM_GET_XSAVE2; then a
    KVM_RUN whose guest only sets XCR0 (XRSTORS and XSAVES of the guest fpstate), and both
    reads again. KVM_SET_FPU writes the image's legacy area and not its header, so with an
    empty XSTATE_BV KVM_GET_XSAVE2 and the guest see x87 and SSE initial while KVM_GET_FPU
    reports what was written.

    A guest run on this host leaves SSE in use even when XMM0-15 are zero and MXCSR is 1F80H
    (as `random_uabi` notes); after the run of an empty-header sample, then, the real XSAVES
    writes the zero XMM registers over the legacy area and sets XSTATE_BV[1]: KVM_GET_FPU is
    compared before the run only, and KVM_GET_XSAVE2 with an SSE bit whose state is initial
    read as clear on both sides (what the guest sees is the same)."""
    case = "fpu-ioctls"
    g, v, mvcpu, xcr0, mask = _guest_and_model(ctx)
    for n in range(samples):
        buf = bytearray(random_uabi(rng, ctx.caps, mask, canonical=True))
        if n % 2:
            buf[512:520] = bytes(8)
        buf = bytes(buf)
        bv = int.from_bytes(buf[512:520], "little")
        _set_xsave_then_fpu(report, case, f"#{n}", f"XSTATE_BV {bv:#x}", g, v, mvcpu, buf,
                            rng.randbytes(416))
        v.run(mvcpu, [GuestOp("xsetbv", 0, xcr0)])
        g.run_insns([], xcr0=xcr0, cpl=3)
        if bv:
            report.compare(case, f"#{n} KVM_GET_FPU after a KVM_RUN", v.get_fpu(mvcpu),
                           g.vcpu.get_fpu())
        report.compare(case, f"#{n} KVM_GET_XSAVE2 after a KVM_RUN",
                       _initial_sse_clear(v.get_xsave2(mvcpu)),
                       _initial_sse_clear(g.vcpu.get_xsave2()))


def case_fpu_tag_word(ctx: Context, report: Report, rng: random.Random, samples: int) -> None:
    """KVM_SET_FPU's store of the abridged tag word: struct kvm_fpu has ftwx as a byte and a
    pad byte after it, the image's twd is 16 bits (fxregs_state), and kvm_arch_vcpu_ioctl_set_fpu
    assigns one to the other, so the image's byte 5 -- reserved in FXSAVE's layout, kept by
    KVM_SET_XSAVE -- becomes 0 whatever the pad byte holds. Each sample: KVM_SET_XSAVE of the
    vCPU's own buffer with x87 in XSTATE_BV and a random byte 5, KVM_SET_FPU of a random
    struct, KVM_GET_XSAVE2 and KVM_GET_FPU; no KVM_RUN."""
    case = "fpu-tag-word"
    g, v, mvcpu, _xcr0, _mask = _guest_and_model(ctx)
    for n in range(samples):
        buf = bytearray(g.vcpu.get_xsave2())
        buf[512] |= 1
        buf[5] = rng.randrange(1, 256)
        buf = bytes(buf)
        _set_xsave_then_fpu(report, case, f"#{n}", f"byte 5 {buf[5]:#x}", g, v, mvcpu, buf,
                            rng.randbytes(416))


def _set_xsave_then_fpu(report: Report, case: str, tag: str, what: str, g: Any, v: Vmm,
                        mvcpu: KvmVcpu, buf: bytes, fpu: bytes) -> None:
    """KVM_SET_XSAVE of ``buf`` and KVM_SET_FPU of ``fpu`` on the model and the real vCPU,
    then KVM_GET_FPU and KVM_GET_XSAVE2 of both, each compared."""
    report.compare(case, f"{tag} KVM_SET_XSAVE {what}", v.set_xsave(mvcpu, buf),
                   _errno_of(lambda: g.vcpu.set_xsave(buf)))
    report.compare(case, f"{tag} KVM_SET_FPU", v.set_fpu(mvcpu, fpu),
                   _errno_of(lambda: g.vcpu.set_fpu(fpu)))
    report.compare(case, f"{tag} KVM_GET_FPU", v.get_fpu(mvcpu), g.vcpu.get_fpu())
    report.compare(case, f"{tag} KVM_GET_XSAVE2", v.get_xsave2(mvcpu), g.vcpu.get_xsave2())


def _initial_sse_clear(buf: bytes) -> bytes:
    """A KVM_GET_XSAVE2 buffer with XSTATE_BV[1] cleared where SSE's state is initial (XMM0-15
    zero, MXCSR 1F80H): the same registers for a guest."""
    if buf[160:416] != bytes(256) or buf[24:28] != (0x1F80).to_bytes(4, "little"):
        return buf
    out = bytearray(buf)
    out[512] &= ~0x2
    return bytes(out)


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
        probe = measure_guest_xsaves(ctx)
        report.skip(case, "XSAVES/XRSTORS in these programs are compared only up to their "
                          f"{probe.cpl3['XSAVES']}/{probe.cpl3['XRSTORS']} at guest CPL 3: KVM "
                          "offers no XSAVES to guests (KVM_GET_SUPPORTED_CPUID.(EAX=0DH,ECX=1)"
                          ":EAX[3]=0; the rest is measured by case guest-xsaves)")
    draw = RandomDraw(rng.getrandbits(32))
    done = tries = 0
    while done < samples and tries < 4 * samples:
        tries += 1
        xcr0 = rng.choice(xcr0s)
        focus = rng.choice(focuses)
        prog = replace(generate_program(draw, hw, xcr0=xcr0, focus=focus, pkeys=False,
                                        placed=True), cpl=cpl)
        try:  # told where the guest runs each instruction: an FLD's x87 pointers are known
            outs = run_guest_program(mvcpu, prog, xcr0=xcr0,
                                     placement=g.placement(prog, xcr0=xcr0))
        except FpstateError as e:
            report.skip(case, f"a program the model cannot answer was drawn again: {e}")
            continue
        if "cpl3_gp_emulated" in div and cpl == 3 and _gp_emulated(prog, outs):
            report.skip(case, "programs whose #GP at CPL 3 this backend's emulator changes "
                              f"are not compared: {div['cpl3_gp_emulated']}")
            continue
        if "guest_pkru_without_cr4_pke" in div and cpl == 3 and not mvcpu.arch.cr4_pke \
                and any(i.mnemonic in PKRU_MNEMONICS for i in prog.insns):
            report.skip(case, "programs with WRPKRU or RDPKRU are not compared: "
                              f"{div['guest_pkru_without_cr4_pke']}")
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


def load_guest_registers(ctx: Context, v: Vmm, vcpu: KvmVcpu, program: Program,
                         xcr0: int, real: Outcome | None = None) -> Outcome:
    """Put into the model vCPU the registers the real guest holds after running ``program``
    (`fpstate.host.kvm_guest`: XSETBV, XRSTOR64 of the start image, the program, the final
    XSAVE64): the program runs on the CPU model of the guest's hardware -- undisturbed, or,
    given the ``real`` outcome, every way a preemption may leave it, taking the one the real
    guest gave (`fpstate.x86.insn.preemptions`) -- then one KVM_RUN does the guest's XSETBV,
    a release of every XCR0 component (what the XRSTOR64 of an all-init start image does,
    MXCSR back to 1F80H included) and a write of each component in use at the end. The
    model's outcome is returned: the one equal to ``real`` if there is one, else the
    undisturbed one (ProgramError where the model cannot answer; FpstateError for an MXCSR
    other than 1F80H, which no guest op writes)."""
    outs = run_guest_program(vcpu, program, xcr0=xcr0, preempt=real is not None)
    out = next((o for o in outs if real is not None and o.key() == real.key()), outs[0])
    if out.fault is not None:
        return out
    final = out.final
    assert final is not None
    if struct.unpack_from("<I", final, 24)[0] != 0x1F80:
        raise FpstateError("the program leaves MXCSR != 1F80H; no guest op writes MXCSR")
    in_use = struct.unpack_from("<Q", final, 512)[0] & xcr0
    ops = [GuestOp("xsetbv", 0, xcr0), GuestOp("release", 0, xcr0)]
    for i in bits(in_use):
        at, size = (0, 160) if i == 0 else (160, 256) if i == 1 else \
            (ctx.host.component(i).offset, ctx.host.component(i).size)
        ops.append(GuestOp("write", i, data=bytes(final[at:at + size])))
    results = v.run(vcpu, ops).results
    assert all(r is None for r in results), results
    return out


# -- XSAVES / XRSTORS: where this KVM offers them, and measured why not ------------------------


def _start_image() -> bytes:
    img = bytearray(576)
    struct.pack_into("<HxxxxxxxxxxxxxxxxxxxxxxI", img, 0, 0x037F, 0x1F80)
    return bytes(img)


def supervisor_program(mnemonic: str, cpl: int) -> Program:
    """``mnemonic`` (XSAVES or XRSTORS) of buffer 0 with EDX:EAX = all ones, at ``cpl``: for
    XRSTORS the buffer is a valid compacted image of x87|SSE in their initial state."""
    buf = bytearray(576)
    if mnemonic == "XRSTORS":
        struct.pack_into("<QQ", buf, 512, 0, 1 << 63 | 0x3)
    return Program(_start_image(), (Insn(mnemonic, buf=0, mask=ALL_ONES),),
                   (Buffer(bytes(buf)),), cpl=cpl)


def _setup_vector(e: ProgramError) -> str:
    """The vector of a guest setup fault (`fpstate.host.kvm_guest` ProgramError text)."""
    m = re.search(r"faulted in the guest: (#\w+)", str(e))
    assert m, f"unexpected ProgramError from the guest runner: {e}"
    return m.group(1)


@dataclass(frozen=True, slots=True)
class GuestXsaves:
    """What this machine answers about XSAVES/XRSTORS in a KVM guest, measured once.

    ``offered`` is KVM_GET_SUPPORTED_CPUID.(0DH,1).EAX[3] and ``supported_xss`` its EDX:ECX;
    ``cpl3`` the real guest's fault for each at CPL 3 (supported CPUID); ``cpl0`` the KVM exit
    that ends them at guest CPL 0, or None where the guest runs them; ``claimed`` what
    KVM_GET_CPUID2 holds for (0DH,1) EAX and ECX after KVM_SET_CPUID2 of a table claiming
    XSAVES and CET_U|CET_S, and ``claimed_wrmsr`` the fault of that guest's WRMSR IA32_XSS;
    ``user_mode`` the fault the user-mode runner takes (CPL 3 on the bare CPU)."""

    offered: bool
    supported_xss: int
    cpl3: dict[str, str]
    cpl0: str | None
    claimed: tuple[int, int]
    claimed_wrmsr: str
    user_mode: dict[str, str]

    def reason(self) -> str:
        """Why guest XSAVES/XRSTORS with IA32_XSS cannot be compared on this machine."""
        return (f"KVM offers no XSAVES to guests (KVM_GET_SUPPORTED_CPUID.(EAX=0DH,ECX=1): "
                f"EAX[3]={int(self.offered)}, EDX:ECX = supported_xss {self.supported_xss:#x}); "
                f"at guest CPL 3 XSAVES/XRSTORS are {self.cpl3['XSAVES']}/"
                f"{self.cpl3['XRSTORS']}; at guest CPL 0 {self.cpl0 or 'they run'}; a guest "
                f"CPUID claiming XSAVES and CET (EAX 0xf, ECX 0x1800) is held as EAX "
                f"{self.claimed[0]:#x}, ECX {self.claimed[1]:#x} and the guest's WRMSR "
                f"IA32_XSS is {self.claimed_wrmsr}; on the bare CPU they are CPL 0 only "
                f"(user mode: {self.user_mode['XSAVES']}/{self.user_mode['XRSTORS']})")


def _claim_xsaves(entries: tuple) -> tuple:
    return tuple(replace(e, eax=e.eax | 0xF, ecx=0x1800)
                 if (e.function, e.index) == (0xD, 1) else e for e in entries)


def measure_guest_xsaves(ctx: Context) -> GuestXsaves:
    """Measure `GuestXsaves` on this machine (once per Context: kept in ctx.guest_xsaves)."""
    from fpstate.host.kvm_guest import HostError
    from fpstate.host.runner import run_program as run_user

    if ctx.guest_xsaves is not None:
        return ctx.guest_xsaves
    d1 = find_cpuid(ctx.entries, 0xD, 1)
    g = ctx.guest_machine()
    cpl3, user = {}, {}
    for m in ("XSAVES", "XRSTORS"):
        out = g.run_program(supervisor_program(m, 3), xcr0=ctx.system.xcr0)
        cpl3[m] = out.fault.vector if out.fault else "no fault"
        u = run_user(supervisor_program(m, 3))
        user[m] = u.fault.vector if u.fault else "no fault"
    try:
        g.run_insns([Insn("XSAVES", buf=0, mask=ALL_ONES)], xcr0=ctx.system.xcr0, cpl=0,
                    buffers=[Buffer()])
        cpl0 = None
    except HostError as e:
        cpl0 = str(e)
    claimed = _claim_xsaves(ctx.entries)
    held = find_cpuid(_entries(ctx.real_vcpu(claimed).get_cpuid2()), 0xD, 1)
    gc = ctx.guest_machine(cpuid=_host_entries(claimed))
    try:
        gc.run_insns([], xcr0=ctx.system.xcr0, cpl=0)
        wrmsr = "accepted"
    except ProgramError as e:
        wrmsr = _setup_vector(e)
    probe = GuestXsaves(bool(d1 and d1.eax & XSAVES), (d1.edx << 32 | d1.ecx) if d1 else 0,
                        cpl3, cpl0, (held.eax, held.ecx) if held else (0, 0), wrmsr, user)
    ctx.guest_xsaves = probe
    return probe


def case_guest_xsaves(ctx: Context, report: Report, rng: random.Random, samples: int) -> None:
    """XSAVES/XRSTORS in the guest, model against real: at CPL 3 with the supported CPUID the
    whole outcome (#UD without the guest's XSAVES cap, #GP with it); with a guest CPUID that
    claims XSAVES and CET, the fault of the guest's WRMSR IA32_XSS for each of `GUEST_XSS`
    (KVM refuses what kvm_cpu_caps lacks, whatever the guest CPUID says). What cannot be
    compared is skipped with the measured `GuestXsaves.reason`."""
    case = "guest-xsaves"
    probe = measure_guest_xsaves(ctx)
    g = ctx.guest_machine()
    v = ctx.vmm()
    mvcpu = ctx.model_vcpu(v)
    for m in ("XSAVES", "XRSTORS"):
        prog = supervisor_program(m, 3)
        outs = run_guest_program(mvcpu, prog, xcr0=ctx.system.xcr0)
        real = g.run_program(prog, xcr0=ctx.system.xcr0)
        report.compare(case, f"{m} at guest CPL 3 (one of the model's outcomes)", True,
                       real.key() in {o.key() for o in outs})
    claimed = _claim_xsaves(ctx.entries)
    gc = ctx.guest_machine(cpuid=_host_entries(claimed))
    cv = ctx.vmm()
    cvcpu = ctx.model_vcpu(cv, claimed)
    for xss in GUEST_XSS:
        (fault,) = cv.run(cvcpu, [GuestOp("wrmsr", x86.MSR_IA32_XSS, xss)]).results
        try:
            gc.run_program(supervisor_program("XSAVES", 3), xcr0=ctx.system.xcr0, xss=xss)
            real = None
        except ProgramError as e:
            real = _setup_vector(e)
        report.compare(case, f"guest WRMSR IA32_XSS {xss:#x} with a CPUID claiming XSAVES",
                       fault.vector if fault else None, real)
    if probe.claimed != (0xF, 0x1800):
        report.skip(case, f"KVM_GET_CPUID2 after a KVM_SET_CPUID2 claiming XSAVES: this KVM "
                          f"({ctx.backend}) holds CPUID.(0DH,1) EAX {probe.claimed[0]:#x}, ECX "
                          f"{probe.claimed[1]:#x} (upstream kvm_set_cpuid keeps the table; "
                          "not compared)")
    if not probe.offered:
        report.skip(case, "no guest XSAVES/XRSTORS with IA32_XSS can run on this machine: "
                          + probe.reason())


__all__ = [
    "GuestXsaves",
    "case_guest_programs",
    "case_guest_xsaves",
    "case_guest_xsetbv",
    "case_init",
    "case_xsave_across_run",
    "load_guest_registers",
    "measure_guest_xsaves",
    "supervisor_program",
]
