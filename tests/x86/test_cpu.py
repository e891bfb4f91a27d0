"""The register file (`fpstate.x86.cpu`), the implementation-defined choices
(`fpstate.x86.impl`), the program generator and ``fpstate conform``.

Model only, except the last test which runs ``conform --layer cpu`` (skipped off x86-64).
"""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fpstate.cli import main
from fpstate.errors import MaskError, ProfileError
from fpstate.x86 import impl as I
from fpstate.x86.cpu import NOT_MODELLED, Cpu, machine, require_modelled, tilecfg_valid
from fpstate.x86.cpuid import CpuidProfile
from fpstate.x86.insn import default_xcr0, run_program
from fpstate.x86.profiles import list_profiles, load_profile
from fpstate.x86.progen import RandomDraw, generate_program
from fpstate.x86.program import check_program

ZEN4 = load_profile("zen4")
SPR = load_profile("sapphire-rapids")


def cpu_for(profile, impl=None) -> Cpu:
    return Cpu(machine(profile), impl or I.for_profile(profile), xcr0=default_xcr0(profile))


# --- the component table ---------------------------------------------------------------------


def test_component_table_of_zen4() -> None:
    m = machine(ZEN4)
    rows = {i: (c.size, c.offset, c.aligned, c.supervisor) for i, c in m.components.items()}
    assert rows == {0: (160, 0, False, False), 1: (256, 160, False, False),
                    2: (256, 576, False, False), 5: (64, 832, False, False),
                    6: (512, 896, False, False), 7: (1024, 1408, False, False),
                    9: (8, 2432, False, False), 11: (16, 0, False, True),
                    12: (24, 0, False, True)}
    assert m.components[0].init == b"\x7f\x03" + bytes(158)  # FCW = 037FH (SDM 13.6)
    assert m.components[7].init == bytes(1024)


def test_sapphire_rapids_tile_components_and_palette() -> None:
    m = machine(SPR)
    assert (m.components[18].size, m.components[18].aligned, m.components[18].xfd) == \
        (8192, True, True)
    assert m.components[17].xfd is False
    p = m.palettes[0]
    assert (p.bytes_per_tile, p.bytes_per_row, p.max_names, p.max_rows) == (1024, 64, 8, 16)


def test_require_modelled_names_the_component() -> None:
    require_modelled(0x1800, "x")
    for i, why in NOT_MODELLED.items():
        with pytest.raises(MaskError, match=why.split()[0]):
            require_modelled(1 << i, "IA32_XSS")


# --- the register file --------------------------------------------------------------------


def test_copy_is_independent() -> None:
    a = cpu_for(ZEN4)
    b = a.copy()
    b.regs[2][0] = 1
    b.xinuse = 4
    assert a.regs[2][0] == 0 and a.xinuse == 0 and a.key() != b.key()


@given(st.integers(0, 7), st.binary(min_size=128, max_size=128), st.integers(0, 255))
def test_x87_load_store_round_trip_for_any_top(top: int, regs: bytes, ftw: int) -> None:
    """ST(i) in an image is physical register (TOP + i) mod 8; saving gives it back, with the
    6 unused bytes of each slot written as 0 (SDM 13.5.1)."""
    image = bytearray(512)
    struct.pack_into("<HHBB", image, 0, 0x037F, top << 11, ftw, 0)
    image[32:160] = regs
    cpu = cpu_for(ZEN4)
    cpu.load_x87(image)
    out = bytearray(512)
    cpu.store_x87(out)
    for i in range(8):
        assert out[32 + 16 * i:42 + 16 * i] == regs[16 * i:16 * i + 10]
        assert out[42 + 16 * i:48 + 16 * i] == bytes(6)
        assert cpu.st(i) == regs[16 * i:16 * i + 10]
    assert (out[4], cpu.top) == (ftw, top)


def test_push_uses_the_physical_register_below_top() -> None:
    cpu = cpu_for(ZEN4)
    cpu.push_x87(bytes(range(10)))
    assert cpu.top == 7 and cpu.ftw == 0x80 and cpu.regs[0][32 + 7 * 16:42 + 7 * 16] == \
        bytes(range(10))


@pytest.mark.parametrize(("fcw", "expected"), [(0xFFFF, 0x1F7F), (0, 0x40), (0x37F, 0x37F)])
def test_fcw_reserved_bits_as_measured(fcw: int, expected: int) -> None:
    cpu = cpu_for(ZEN4)
    cpu.set_fcw(fcw)
    assert cpu.fcw == expected


@pytest.mark.parametrize(("fcw", "fsw", "expected"), [
    (0x37F, 0x8081, 0x0001),  # IE masked: no summary
    (0x37E, 0x0001, 0x8081),  # IE unmasked: ES and B
    (0x37F, 0x0080, 0x0000),
])
def test_fsw_summary_is_recomputed(fcw: int, fsw: int, expected: int) -> None:
    cpu = cpu_for(ZEN4)
    cpu.set_fcw(fcw)
    cpu.set_fsw(fsw)
    assert cpu.fsw == expected and cpu.x87_pending() == bool(expected & 0x80)


def test_initial_configuration_ignores_pointers_and_mxcsr() -> None:
    cpu = cpu_for(ZEN4)
    struct.pack_into("<HQQ", cpu.regs[0], 6, 0x123, 0x1111, 0x2222)
    cpu.mxcsr = 0x1F00
    assert cpu.in_init_configuration(0) and cpu.in_init_configuration(1)
    cpu.regs[0][4] = 1  # one tag valid
    assert not cpu.in_init_configuration(0)


def test_wrote_follows_write_xinuse() -> None:
    cpu = cpu_for(ZEN4)  # AMD: x87 by value, every other component by write
    cpu.wrote(0b11)
    assert cpu.xinuse == 0b10 and cpu.xmodified & 0b11 == 0b11
    intel = cpu_for(ZEN4, I.INTEL)
    intel.wrote(0b11)
    assert intel.xinuse == 0b11


def test_wrpkru_zero_is_initial_on_amd_only() -> None:
    """WRPKRU 0: AMD tracks PKRU by value (XINUSE[9] = 0), Intel keeps it in use -- the
    difference behind the kernel's ae6012d72fa6."""
    from fpstate.x86.insn_regs import WRPKRU

    for impl, in_use in ((None, False), (I.INTEL, True)):
        cpu = cpu_for(ZEN4, impl)
        cpu.cr4_pke = True
        assert WRPKRU(cpu, 0x55555554) is None and cpu.xinuse >> 9 & 1
        assert WRPKRU(cpu, 0) is None
        assert bool(cpu.xinuse >> 9 & 1) is in_use


@pytest.mark.parametrize(("value", "reserved"), [(0x1F80, False), (0x21F80, False),
                                                 (0x41F80, True), (1 << 32, True)])
def test_mxcsr_reserved_against_mxcsr_mask(value: int, reserved: bool) -> None:
    assert cpu_for(ZEN4).mxcsr_reserved(value) == reserved


def test_tilecfg_valid_palette_rules() -> None:
    cpu = cpu_for(SPR)
    good = bytearray(64)
    good[0], good[16], good[48] = 1, 64, 16
    assert tilecfg_valid(cpu, bytes(64)) and tilecfg_valid(cpu, bytes(good))
    bad = bytearray(good)
    bad[49] = 3  # tmm1 rows without colsb
    assert not tilecfg_valid(cpu, bytes(bad))
    cpu.xcr0 = 0x2E7  # palette 1 needs XCR0[18:17] = 11b
    assert not tilecfg_valid(cpu, bytes(good))


# --- implementation-defined choices ----------------------------------------------------------


def test_every_record_answers_every_choice_with_an_origin() -> None:
    for rec in (I.AMD_ZEN5_HOST, I.AMD_ZEN4_HOST, I.AMD_ZEN3_HOST, I.AMD, I.INTEL_EMR_HOST,
                I.INTEL):
        assert set(rec.values) == set(I.CHOICES) == set(rec.origins)
        assert all(rec.origins[k] for k in I.CHOICES)
    assert all(c.phrase and c.reference for c in I.CHOICES.values())


def test_for_profile_by_vendor_and_family() -> None:
    assert I.for_profile(load_profile("zen5")) is I.AMD_ZEN5_HOST
    assert I.for_profile(ZEN4) is I.AMD_ZEN4_HOST
    assert I.for_profile(load_profile("zen3")) is I.AMD_ZEN3_HOST
    assert I.for_profile(load_profile("zen2")).name == "amd+x87_pointer_bits=48+x87_fdp_bits=48"
    assert I.for_profile(SPR) is I.INTEL
    haswell = I.for_profile(load_profile("haswell"))
    assert haswell.name == "intel+x87_pointer_bits=48" and haswell[I.X87_FDP_BITS] == 64
    # family 6 model CFh (Emerald Rapids), the measured Intel core
    emr = _with_eax(SPR, 1, 0x000C06F2)
    assert emr.family_model_stepping[:2] == (6, 0xCF)
    assert I.for_profile(emr) is I.INTEL_EMR_HOST


def test_intel_keeps_fewer_bits_of_fip_than_of_fdp() -> None:
    """Measured on Emerald Rapids: XRSTOR64 then XSAVE64 of FIP = FDP = 1 << 56 gives FIP
    0xFF00000000000000 (57 bits, sign-extended) and FDP 1 << 56 (64 bits)."""
    cpu = cpu_for(SPR, I.INTEL_EMR_HOST)
    img = bytearray(512)
    # an unmasked invalid-operation exception pending (FCW 0x37E, FSW.IE): AMD saves the
    # pointers only then
    struct.pack_into("<HHBBHQQ", img, 0, 0x37E, 1, 0, 0, 0, 1 << 56, 1 << 56)
    cpu.load_x87(img)
    out = bytearray(512)
    cpu.store_x87(out)
    assert struct.unpack_from("<QQ", out, 8) == (0xFF00000000000000, 1 << 56)
    amd = cpu_for(ZEN4, I.AMD_ZEN4_HOST)
    amd.load_x87(img)
    amd.store_x87(out)
    assert struct.unpack_from("<QQ", out, 8) == (0xFF00000000000000, 0xFF00000000000000)


def test_x87_pointer_width_is_the_cores_not_the_guests_cpuid() -> None:
    """A KVM guest on Zen 4 reports 48 linear-address bits (CPUID 0x80000008:EAX[15:8]) and
    no LA57, and its FPU keeps 57 bits of FIP/FDP (measured): a measured core's width stands
    whatever the CPUID says; an unmeasured core (Zen 2) takes its CPUID's width."""
    guest = _with_eax(ZEN4, 0x80000008, 0x303030)
    assert I.linear_address_bits(guest) == 48
    assert I.for_profile(guest)[I.X87_POINTER_BITS] == 57
    zen2 = load_profile("zen2")
    assert I.for_profile(zen2)[I.X87_POINTER_BITS] == I.linear_address_bits(zen2) == 48
    assert I.for_profile(_with_eax(zen2, 0x80000008, 0x3930))[I.X87_POINTER_BITS] == 57


def _with_eax(profile: CpuidProfile, leaf: int, eax: int) -> CpuidProfile:
    leaves = dict(profile.leaves)
    leaves[(leaf, 0)] = (eax, *profile.cpuid(leaf, 0)[1:])
    return CpuidProfile.from_leaves(profile.name + "-guest", leaves, "test")


def test_with_choice() -> None:
    other = I.INTEL.with_choice(I.MXCSR_MASK, 0xFFBF)
    assert other[I.MXCSR_MASK] == 0xFFBF and I.INTEL[I.MXCSR_MASK] == 0xFFFF
    with pytest.raises(ProfileError, match="unknown implementation-defined choice"):
        I.INTEL.with_choice("nope", 1)
    with pytest.raises(AssertionError):
        I.INTEL.with_choice(I.EMMS_TOP, "sometimes")


# --- the generator ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list_profiles())
def test_generated_programs_are_valid_and_answerable(name: str) -> None:
    """On every bundled CPU: the programs pass check_program and the model answers them
    (no UnknownPointers, no model assertion): AMX, PKU, MPX paths included."""
    profile = load_profile(name)
    for seed in range(25):
        program = generate_program(RandomDraw(seed), profile)
        check_program(program)
        assert run_program(profile, program)


def test_intel_programs_have_flds_each_followed_by_fninit() -> None:
    """Intel saves FIP/FDP always (X87_POINTERS), so an FLD's addresses would show in every
    later save: the generator follows each FLD by an FNINIT (after an FNSTSW at times), and
    the model answers every such program -- the FLD's data and flags are still compared."""
    spr = load_profile("sapphire-rapids")
    with_fld = 0
    for seed in range(300):
        program = generate_program(RandomDraw(seed), spr, focus="FLD")
        names = [i.mnemonic for i in program.insns]
        for n, name in enumerate(names):
            if name == "FLD":
                nxt = names[n + 1:n + 3]
                assert nxt[:1] == ["FNINIT"] or nxt == ["FNSTSW", "FNINIT"], names
                with_fld += 1
        if "FLD" in names and seed < 40:
            assert run_program(spr, program)
    assert with_fld >= 60, with_fld
    # AMD saves them only with FSW.ES set, which these programs never have: FLD stands alone
    zen4 = [[i.mnemonic for i in generate_program(RandomDraw(s), ZEN4, focus="FLD").insns]
            for s in range(300)]
    assert any(n[k + 1:k + 2] not in (["FNINIT"], ["FNSTSW"])
               for n in zen4 for k, m in enumerate(n) if m == "FLD")


def test_programs_draw_the_32_bit_forms_where_the_selectors_are_kept() -> None:
    """Zen 4 does not deprecate FCS and FDS, and the model knows them through every path of a
    program (the start image's XRSTOR64 zeroes them, an x87 initialisation too, FXRSTOR32 and
    XRSTOR32 load them, an x87 instruction's placement names them): the 32-bit forms are drawn
    at random, not only on request, and the model answers each program."""
    from fpstate.x86.program import FORMS32

    drawn = 0
    for seed in range(200):
        program = generate_program(RandomDraw(seed), ZEN4)
        if {i.mnemonic for i in program.insns} & FORMS32:
            drawn += 1
            assert run_program(ZEN4, program)
    assert drawn >= 40, drawn


@pytest.mark.parametrize("focus", ["TILELOADD", "TILESTORED", "TILEZERO"])
def test_generated_amx_programs_get_past_the_tile_checks(focus: str) -> None:
    """On Sapphire Rapids the tile instructions do not only #UD: start images and LDTILECFG
    carry valid configurations often enough that the instruction runs (TILESTORED writes)."""
    spr = load_profile("sapphire-rapids")
    ran = 0
    for seed in range(200):
        program = generate_program(RandomDraw(seed), spr, focus=focus)
        steps = [n for n, insn in enumerate(program.insns) if insn.mnemonic == focus]
        ran += sum(o.fault_step is None or o.fault_step > steps[0]
                   for o in run_program(spr, program, preempt=False))
    assert ran >= 10, ran  # 15-21 of 200 with these seeds


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32))
def test_generation_is_deterministic(seed: int) -> None:
    a = generate_program(RandomDraw(seed), ZEN4)
    assert a == generate_program(RandomDraw(seed), ZEN4)


# --- fpstate conform ---------------------------------------------------------------------------


def test_a_conform_mismatch_records_the_selectors_of_each_placement() -> None:
    """A cpu-layer mismatch carries what replays it: each instruction's address, operand
    address, FOP, CS and DS (the 32-bit save forms store the selectors on Zen 4)."""
    from fpstate.commands.conform import _placement_json
    from fpstate.x86.program import Outcome, Placement

    host = Outcome((), (), placement=(Placement(0x1000, 0x2000, 0x3AB, 0x33, 0),
                                      Placement(0x1008)))
    assert _placement_json(host) == [[0x1000, 0x2000, 0x3AB, 0x33, 0],
                                     [0x1008, 0, 0, None, None]]


def test_conform_unknown_layer_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conform", "--layer", "nope"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_conform_cpu_json(capsys: pytest.CaptureFixture[str]) -> None:
    from fpstate.host import native

    status = main(["conform", "--layer", "cpu", "--samples", "40", "--seed", "3", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"layer", "cases", "mismatches", "skipped"} and out["layer"] == "cpu"
    if not native.is_x86_64():
        assert out["skipped"] and out["cases"] == 0 and status == 0
        return
    assert (status, out["cases"], out["mismatches"]) == (0, 40, [])
