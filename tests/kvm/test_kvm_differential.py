"""The model of KVM (fpstate.kvm.x86) against this machine's real KVM, case by case.

Each test runs one case of `fpstate.kvm.x86.conform` (the same code `fpstate conform --layer
kvm` runs) and requires zero mismatches over at least the stated number of comparisons. The
model is configured only with what KVM reports about the host; see the conform module. Where
this host's KVM cannot do something (XSAVES in a guest, AMX guests, guest CPL 0 XSAVE on PVM)
the test skips with the measured reason and the model tests cover the kernel's rules.
"""

from __future__ import annotations

import json
import random
import struct

import pytest

from fpstate.errors import HostUnavailable
from fpstate.kvm.x86 import conform, conform_guest
from fpstate.kvm.x86.cpuid import XSAVES, find_cpuid

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def ctx() -> conform.Context:
    try:
        c = conform.Context()
    except HostUnavailable as e:
        pytest.skip(str(e))
    yield c
    c.close()


def run_case(ctx: conform.Context, case, samples: int, seed: int = 1) -> conform.Report:
    report = conform.Report()
    case(ctx, report, random.Random(seed), samples)
    assert report.mismatches == [], json.dumps(report.mismatches[:5], indent=1)
    return report


def test_supported_cpuid_and_cap_xsave2_around_guest_permission(ctx) -> None:
    r = run_case(ctx, conform.case_supported_cpuid, 0)
    assert r.cases == 10


def test_set_cpuid2_of_features_kvm_lacks(ctx) -> None:
    assert run_case(ctx, conform.case_set_cpuid2, 0).cases == 18


def test_cpuid_leaf_0xd_ebx_follows_xcr0(ctx) -> None:
    assert run_case(ctx, conform.case_cpuid_runtime, 0).cases >= 8


def test_xss_xfd_xfd_err_msrs(ctx) -> None:
    assert run_case(ctx, conform.case_msrs, 0).cases == 108


def test_kvm_set_xcrs_500_values(ctx) -> None:
    assert run_case(ctx, conform.case_set_xcrs, 500).cases == 1000


def test_kvm_set_xsave_and_get_xsave2_500_buffers(ctx) -> None:
    assert run_case(ctx, conform.case_xsave_round_trip, 500).cases >= 1000


def test_xsave_buffer_across_kvm_run(ctx) -> None:
    assert run_case(ctx, conform.case_xsave_across_run, 50).cases == 100


def test_kvm_set_fpu_and_get_fpu_around_kvm_run(ctx) -> None:
    """KVM_SET_FPU writes the legacy area and not XSTATE_BV: 30 samples, half of them on an
    empty header (the write then reads back from KVM_GET_FPU but not from KVM_GET_XSAVE2 or
    the guest), five comparisons each with a non-empty header, four with an empty one."""
    assert run_case(ctx, conform_guest.case_fpu_ioctls, 30).cases == 15 * 6 + 15 * 5


def test_kvm_set_fpu_zeroes_the_byte_after_the_abridged_tag_word(ctx) -> None:
    """kvm_arch_vcpu_ioctl_set_fpu() assigns the u8 ftwx to the image's u16 twd: a reserved
    byte 5 that KVM_SET_XSAVE put there reads back 0 from KVM_GET_XSAVE2 on the real KVM and
    on the model (which kept it before this test), whatever kvm_fpu's pad byte held."""
    assert run_case(ctx, conform_guest.case_fpu_tag_word, 20).cases == 20 * 4


def test_migration_between_cpu_models(ctx) -> None:
    """A buffer moved between a vCPU offered every feature and one offered x87/SSE/AVX only,
    both ways; skipped where KVM does not keep a narrowed CPUID.(0DH,0) (this host's PVM)."""
    report = run_case(ctx, conform.case_migrate, 20)
    if report.skipped:
        pytest.skip(report.skipped[0])
    assert report.cases == 20 * 6


def test_guest_xsetbv_faults(ctx) -> None:
    assert run_case(ctx, conform.case_guest_xsetbv, 200).cases == 400


def test_guest_xsave_programs_500(ctx) -> None:
    r = run_case(ctx, conform.case_guest_programs, 500)
    assert r.cases == 500


def test_what_survives_init(ctx) -> None:
    assert run_case(ctx, conform.case_init, 25).cases == 50


def test_guest_xsaves_refusals(ctx) -> None:
    """XSAVES/XRSTORS at guest CPL 3 and the guest's WRMSR IA32_XSS under a CPUID claiming
    XSAVES: the model's answer is the real one (5 comparisons)."""
    assert run_case(ctx, conform.case_guest_xsaves, 0).cases == 5


def test_why_no_guest_xsaves_runs_here_is_measured(ctx) -> None:
    """Every fact of the XSAVES skip reason is measured on this machine: KVM's supported CPUID,
    the guest's faults, the KVM exit at guest CPL 0, the bare CPU's #GP at CPL 3."""
    probe = conform_guest.measure_guest_xsaves(ctx)
    d1 = find_cpuid(ctx.entries, 0xD, 1)
    assert probe.offered == bool(d1 and d1.eax & XSAVES)
    assert probe.user_mode == {"XSAVES": "#GP", "XRSTORS": "#GP"}  # SDM: #GP(0) if CPL > 0
    if not probe.offered:
        assert probe.cpl3 == {"XSAVES": "#UD", "XRSTORS": "#UD"}
        assert probe.claimed_wrmsr == "#GP"  # kvm_cpu_caps lacks XSAVES: IA32_XSS refused
        assert probe.claimed[0] & XSAVES == 0
    if ctx.backend == "kvm_pvm":
        assert probe.cpl0 is not None and "xsaves64" in probe.cpl0
        assert "KVM_INTERNAL_ERROR_EMULATION" in probe.cpl0


def test_guest_xsaves_and_xrstors(ctx) -> None:
    """XSAVES/XRSTORS in a guest only where KVM enables them (guest CPUID XSAVES & KVM cap)."""
    probe = conform_guest.measure_guest_xsaves(ctx)
    if not probe.offered:
        pytest.skip(probe.reason())
    r = conform.Report()
    rng = random.Random(7)
    conform.case_guest_programs(ctx, r, rng, 100, focuses=("XSAVES", "XRSTORS"))
    assert r.mismatches == [] and r.cases == 100


def test_amx_guest(ctx) -> None:
    """Guest permission, KVM_SET_CPUID2 reallocation and KVM_GET_XSAVE's EINVAL for AMX."""
    if not ctx.host.has("AMX_TILE"):
        pytest.skip("host lacks AMX: CPUID.(EAX=7,ECX=0):EDX[24]=0")
    r = run_case(ctx, conform.case_supported_cpuid, 0)
    assert r.cases == 10


def test_fpstate_conform_layer_kvm_json(capsys) -> None:
    from fpstate.cli import main

    status = main(["conform", "--layer", "kvm", "--samples", "20", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"layer", "cases", "mismatches", "skipped"}
    assert out["layer"] == "kvm" and out["mismatches"] == [] and status == 0
    if out["cases"] == 0:
        assert out["skipped"], "a layer that compared nothing says why"
    else:
        assert out["cases"] > 100


def test_the_layer_is_skipped_with_the_reason_without_dev_kvm(monkeypatch, capsys) -> None:
    """No usable /dev/kvm: nothing compared, one skip naming why, exit 0 (nothing mismatched)."""
    from fpstate.cli import main
    from fpstate.host import kvm as host_kvm

    def no_kvm():
        return host_kvm.Kvm("/nonexistent/kvm")

    monkeypatch.setattr(host_kvm, "open_kvm", no_kvm)
    status = main(["conform", "--layer", "kvm", "--samples", "5", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert status == 0 and out["cases"] == 0 and out["mismatches"] == []
    assert out["skipped"] == ["all: /nonexistent/kvm: No such file or directory"]


def test_guest_pkru_instructions_follow_the_guests_cr4_pke(ctx: conform.Context) -> None:
    """WRPKRU and RDPKRU are #UD unless the guest's own CR4.PKE is set (KVM_SET_SREGS; the
    test guest leaves it clear): the model of a VMX/SVM guest says so. This host's backend is
    asked too: where it runs them anyway its divergence says why (kvm_pvm's guest runs under
    the host's CR4), else it must agree with the model."""
    from fpstate.kvm.x86.vcpu import run_guest_program
    from fpstate.x86.program import Buffer, Insn, Program

    start = bytearray(576 + 2048)
    struct.pack_into("<I", start, 24, 0x1F80)
    prog = Program(bytes(start), (Insn("WRPKRU", value=0x4), Insn("RDPKRU")), (Buffer(),),
                   cpl=3)
    v = ctx.vmm()
    vcpu = ctx.model_vcpu(v)
    if not vcpu.kvm.config.host.has("PKU"):
        pytest.skip("host lacks PKU: CPUID.(EAX=7,ECX=0):ECX[3]=0")
    model = run_guest_program(vcpu, prog, xcr0=ctx.system.xcr0)
    assert {(o.fault.vector if o.fault else None, o.fault_step) for o in model} == {("#UD", 0)}
    v.set_cr4(vcpu, osxsave=True, pke=True)
    assert {o.values for o in run_guest_program(vcpu, prog, xcr0=ctx.system.xcr0)} == {(4,)}
    real = ctx.guest_machine().run_program(prog, xcr0=ctx.system.xcr0)
    if "guest_pkru_without_cr4_pke" in ctx.divergences():
        assert real.fault is None and real.values == (4,)
    else:
        assert (real.fault and real.fault.vector, real.fault_step) == ("#UD", 0)


def test_a_guest_fld_leaves_its_guest_address_in_fip(ctx: conform.Context) -> None:
    """The guest runner's addresses are fixed, so `GuestMachine.placement` gives them without
    a run, equal to those the run reports; a guest's FLD leaves its own guest-linear address
    in FIP (SDM Vol. 1 8.1.8), its operand's in FDP where the silicon lacks FDP_EXCPTN_ONLY,
    and the model of the guest's hardware, told the placement, agrees byte for byte."""
    from fpstate.kvm.x86.vcpu import run_guest_program
    from fpstate.x86.program import Buffer, Insn, Program

    start = bytearray(576)
    struct.pack_into("<HHBBHQQI", start, 0, 0x37F, 0, 0, 0, 0x123, 0x1111, 0x2222, 0x1F80)
    start[512] = 1  # XSTATE_BV: x87
    g = ctx.guest_machine()
    cpl = 3 if g.xstate_at_cpl0() else 0
    prog = Program(bytes(start), (Insn("FLD", data=bytes(10)), Insn("FNSTSW"),
                                  Insn("XSAVE", buf=0, mask=1)), (Buffer(),), cpl=cpl)
    xcr0 = ctx.system.xcr0
    place = g.placement(prog, xcr0=xcr0)
    real = g.run_program(prog, xcr0=xcr0)
    assert real.placement == place and place[0].fop == 0x3AB
    vcpu = ctx.model_vcpu(ctx.vmm())
    hw = vcpu.kvm.config.host
    fop, fip, fdp = struct.unpack_from("<HQQ", real.buffers[0], 6)
    if hw.vendor == "intel":  # saves write the pointers whatever FSW.ES (X87_POINTERS)
        from fpstate.x86.impl import FOP_UPDATE, for_profile

        kept = for_profile(hw)[FOP_UPDATE] == "unmasked"
        assert (fop, fip, fdp) == (0x123 if kept else 0x3AB, place[0].address,
                                   0x2222 if hw.cpuid(7, 0)[1] >> 6 & 1 else place[0].operand)
    outs = run_guest_program(vcpu, prog, xcr0=xcr0, placement=place)
    assert real.key() in {o.key() for o in outs}


def test_a_guest_x87_instruction_leaves_its_selectors_for_the_32_bit_save(
        ctx: conform.Context) -> None:
    """Where the CPU does not deprecate FCS and FDS, an FLD's unmasked exception leaves FCS :=
    the guest's CS and FDS := its DS (SDM Vol. 1 8.1.8), which FXSAVE without REX.W stores
    (Table 10-2). The guest reads its selectors (MOV r/m16, Sreg) as VMX and SVM run it:
    KERNEL_CS and KERNEL_DS at CPL 0, USER_CS and a null DS at CPL 3
    (`architectural_selectors`), or as a backend's divergence says (kvm_pvm: the host's user
    CS at CPL 3). The placement carries what it reads, the 32-bit save shows the same, and the
    model of the guest's hardware, told the placement, gives the same bytes."""
    from fpstate.host.kvm_guest import architectural_selectors
    from fpstate.kvm.x86.vcpu import run_guest_program
    from fpstate.x86.cpu import machine
    from fpstate.x86.program import Buffer, Insn, Program

    vcpu = ctx.model_vcpu(ctx.vmm())
    if machine(vcpu.kvm.config.host).has("ZERO_FCS_FDS"):
        pytest.skip("the CPU deprecates FCS and FDS: every 32-bit save stores 0000H")
    # FCW 0x37E (IM clear), FSW.ES with IE, every tag valid, FCS 0x23, FDS 0x2B
    legacy = bytearray(512)
    struct.pack_into("<HHBBHIHHIHHI", legacy, 0, 0x37E, 0x8081, 0xFF, 0, 0x123, 0x1111, 0x23,
                     0, 0x2222, 0x2B, 0, 0x1F80)
    start = bytearray(576)
    struct.pack_into("<HHBBHQQI", start, 0, 0x37F, 0, 0, 0, 0, 0, 0, 0x1F80)
    g = ctx.guest_machine()
    xcr0 = ctx.system.xcr0
    pvm = "guest_cs_of_host" in ctx.divergences()
    for cpl in (0, 3):
        read = g.selectors(cpl)
        if cpl == 3 and pvm:
            assert read == (0x33, 0)
        else:
            assert read == architectural_selectors(cpl)
        if cpl == 0 and g.xstate_at_cpl0() is not None:
            continue  # (its FLD traps to an emulator that cannot run it)
        # FNCLEX, then an FLD onto the full stack: an unmasked stack overflow
        prog = Program(bytes(start), (Insn("FXRSTOR32", buf=1), Insn("FNCLEX"),
                                      Insn("FLD", data=bytes(10)), Insn("FXSAVE32", buf=0)),
                       (Buffer(), Buffer(bytes(legacy))), cpl=cpl)
        place = g.placement(prog, xcr0=xcr0)
        real = g.run_program(prog, xcr0=xcr0)
        assert real.placement == place
        fip, fcs, fdp, fds = struct.unpack_from("<IHxxIHxx", real.buffers[0], 8)
        assert (fcs, fds) == read == (place[2].cs, place[2].ds), (cpl, fcs, fds)
        assert (fip, fdp) == (place[2].address & 0xFFFFFFFF, place[2].operand & 0xFFFFFFFF)
        outs = run_guest_program(vcpu, prog, xcr0=xcr0, placement=place)
        assert real.key() in {o.key() for o in outs}, cpl


def test_a_new_vcpu_starts_with_fninit_values_not_the_power_up_fcw(ctx: conform.Context
                                                                    ) -> None:
    """RESET of a new vCPU: fpu_alloc_guest_fpstate() -> fpstate_init_user() writes FCW 037FH
    and MXCSR 1F80H in a zeroed fpstate (XSTATE_BV 0, every tag empty), and kvm_xstate_reset()
    leaves it on RESET. The SDM's power-up and RESET values differ (Vol. 3A Table 10-1: FCW
    0040H, FTW 5555H -- every register tagged zero, not empty); INIT leaves x87 as it was. A
    guest that reads FCW before its first FNINIT sees 037FH. The model's new vCPU gives the same
    KVM_GET_XSAVE2 legacy area and header."""
    from fpstate.host.kvm_guest import GuestMachine
    from fpstate.x86.program import Insn

    v = ctx.vmm()
    model = v.get_xsave2(ctx.model_vcpu(v))
    g = GuestMachine()
    try:
        real = g.vcpu.get_xsave2()
        assert struct.unpack_from("<HHBxHQQI", real, 0) == (0x37F, 0, 0, 0, 0, 0, 0x1F80)
        assert real[32:160] == bytes(128) and struct.unpack_from("<Q", real, 512)[0] == 0
        assert model[:464] == real[:464] and model[512:576] == real[512:576]
        out = g.run_insns([Insn("FNSTCW"), Insn("FNSTSW")], xcr0=1, cpl=3)
        assert out.fault is None and out.values == (0x37F, 0)
    finally:
        g.close()
