"""The XSAVE-family and register instructions of the model, against the SDM's own numbers.

Each test states one rule of Intel SDM Vol. 1 chapter 13 or a Vol. 2 instruction page (or an
implementation-defined choice of `fpstate.x86.impl`, named) with concrete bytes, offsets and
fault vectors, on bundled CPU profiles: model only, no host needed. XSAVES/XRSTORS (CPL 0)
are checked here against SDM-derived expectations; on real hardware they run in KVM.
"""

from __future__ import annotations

import importlib.util
import pathlib
import struct
import sys

import pytest

from fpstate.errors import MaskError, ProgramError
from fpstate.x86 import impl as I
from fpstate.x86.cpu import Area, Cpu, UnknownPointers, machine
from fpstate.x86.insn import XSAVE, XSAVEC, default_xcr0, run_program
from fpstate.x86.insn_regs import (
    LDTILECFG,
    STTILECFG,
    TILELOADD,
    TILERELEASE,
    TILESTORED,
    TILEZERO,
)
from fpstate.x86.profiles import load_profile
from fpstate.x86.program import BUFFER_SIZE, Buffer, Insn, Outcome, Placement, Program


def _image():
    if "x86_strategies" not in sys.modules:
        path = pathlib.Path(__file__).with_name("strategies.py")
        spec = importlib.util.spec_from_file_location("x86_strategies", path)
        assert spec and spec.loader
        sys.modules["x86_strategies"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["x86_strategies"].image


image = _image()
ZEN4 = load_profile("zen4")
SPR = load_profile("sapphire-rapids")
SPR_IMPL = I.for_profile(SPR)
HSW = load_profile("haswell")
AA = Buffer(bytes([0xAA]) * 4096)
BIT63 = 1 << 63


def one(profile, program: Program, **kw) -> Outcome:
    """The outcome of an undisturbed run (no preemption: exactly one)."""
    outs = run_program(profile, program, preempt=False, **kw)
    assert len(outs) == 1, outs
    return outs[0]


def hdr(buf: bytes) -> tuple[int, int]:
    return struct.unpack_from("<QQ", buf, 512)


def q(buf: bytes, at: int) -> int:
    return struct.unpack_from("<Q", buf, at)[0]


# --- XSAVEC / compacted format (SDM 13.4.3, 13.10) --------------------------------------------


def test_xsavec_opmask_after_avx_lands_at_832_on_zen4() -> None:
    start = image(0x24, patch=[(576, b"\x22" * 256), (832, b"\x55" * 64)])
    o = one(ZEN4, Program(start, (Insn("XSAVEC", buf=0, mask=0x24),), (AA,)))
    b = o.buffers[0]
    assert hdr(b) == (0x24, BIT63 | 0x24)
    assert b[576:832] == b"\x22" * 256 and b[832:896] == b"\x55" * 64
    assert b[896:900] == b"\xaa" * 4  # nothing past the last component
    assert b[528:576] == b"\xaa" * 48  # XSAVEC writes only XSTATE_BV and XCOMP_BV


def test_xsavec_opmask_alone_is_first_at_576() -> None:
    start = image(0x24, patch=[(576, b"\x22" * 256), (832, b"\x55" * 64)])
    b = one(ZEN4, Program(start, (Insn("XSAVEC", buf=0, mask=0x20),), (AA,))).buffers[0]
    assert b[576:640] == b"\x55" * 64 and hdr(b) == (0x20, BIT63 | 0x20)


def test_xsavec_skips_components_in_their_initial_configuration() -> None:
    start = image(0x20, patch=[(832, b"\x55" * 64)])
    b = one(ZEN4, Program(start, (Insn("XSAVEC", buf=0, mask=0xE7),), (AA,))).buffers[0]
    assert hdr(b) == (0x20, BIT63 | 0xE7)  # XSTATE_BV = RFBM AND XINUSE
    assert b[576:832] == b"\xaa" * 256  # AVX not in use: its space left alone
    assert b[832:896] == b"\x55" * 64
    assert b[0:32] == b"\xaa" * 32  # x87 and SSE (MXCSR 1F80H) not written


def test_xsavec_saves_sse_when_mxcsr_is_not_1f80() -> None:
    b = one(ZEN4, Program(image(0, mxcsr=0x1F00), (Insn("XSAVEC", buf=0, mask=0xE7),),
                          (AA,))).buffers[0]
    assert hdr(b)[0] == 0x2 and struct.unpack_from("<I", b, 24)[0] == 0x1F00
    assert b[160:416] == bytes(256)


def test_xsavec_64_byte_aligns_tilecfg_and_tiledata_on_sapphire_rapids() -> None:
    cfg = bytearray(64)
    cfg[0], cfg[16], cfg[48] = 1, 64, 16  # palette 1, tmm0 16 rows x 64 bytes
    start = image(0x60200, size=11008,
                  patch=[(2688, b"\x99" * 4), (2752, bytes(cfg)), (2816, b"\x77" * 1024)])
    o = one(SPR, Program(start, (Insn("XSAVEC", buf=0, mask=0x602E7),),
                         (Buffer(bytes([0xAA]) * 11000),)))
    b = o.buffers[0]
    assert hdr(b) == (0x60200, BIT63 | 0x602E7)
    assert b[2432:2436] == b"\x99" * 4  # PKRU right after Hi16_ZMM (1408 + 1024)
    assert b[2440:2496] == b"\xaa" * 56  # padding to the 64-byte boundary
    assert b[2496:2560] == bytes(cfg) and b[2560:3584] == b"\x77" * 1024


# --- XSAVE / XSAVEOPT (SDM 13.7, 13.9) ------------------------------------------------------


def test_xsave_writes_every_rfbm_component_and_merges_xstate_bv() -> None:
    buf = Buffer(image(0xFF00, patch=[(576, b"\xaa" * 256)]))  # OLD_BV bits outside RFBM
    b = one(ZEN4, Program(image(0), (Insn("XSAVE", buf=0, mask=0x4),), (buf,))).buffers[0]
    assert b[576:832] == bytes(256)  # written although not in use
    assert hdr(b) == (0xFF00 & ~0x4, 0)  # (OLD_BV AND NOT RFBM) OR (XINUSE AND RFBM)
    assert struct.unpack_from("<II", b, 24) == (0x1F80, 0x2FFFF)  # MXCSR for RFBM[2]


def test_xsave_misaligned_is_gp() -> None:
    for mn in ("XSAVE", "XSAVEOPT", "XSAVEC", "XRSTOR"):
        o = one(ZEN4, Program(image(0), (Insn(mn, buf=0, mask=0xE7),),
                              (Buffer(misalign=16),)))
        assert (o.fault.vector, o.fault_step) == ("#GP", 0), mn
    assert one(ZEN4, Program(image(0), (Insn("FXSAVE", buf=0),),
                             (Buffer(misalign=16),))).fault is None
    assert one(ZEN4, Program(image(0), (Insn("FXSAVE", buf=0),),
                             (Buffer(misalign=8),))).fault.vector == "#GP"


def test_xsaveopt_init_optimisation_still_writes_mxcsr() -> None:
    b = one(ZEN4, Program(image(0), (Insn("XSAVEOPT", buf=0, mask=0xE7),), (AA,))).buffers[0]
    assert b[0:24] == b"\xaa" * 24 and b[160:416] == b"\xaa" * 256
    assert struct.unpack_from("<II", b, 24) == (0x1F80, 0x2FFFF)


def test_xsaveopt_modified_optimisation_and_its_loss_on_preemption() -> None:
    """XRSTOR b; XSAVEC b, 0x80 (Hi16_ZMM over the standard AVX area); XSAVEOPT b: the
    unmodified AVX state is not written back (SDM 13.9) unless a preemption came between."""
    start = image(0x80, patch=[(1408, b"\x55" * 8)])
    buf = Buffer(image(0xE7, patch=[(576, b"\x22" * 16), (1408, b"\x77" * 8)]))
    prog = Program(start, (Insn("XRSTOR", buf=0, mask=0xE7), Insn("XSAVEC", buf=0, mask=0x80),
                           Insn("XSAVEOPT", buf=0, mask=0xE7)), (buf,))
    assert one(ZEN4, prog).buffers[0][576:578] == b"\x77\x77"
    kept = {o.buffers[0][576:578] for o in run_program(ZEN4, prog)}
    assert kept == {b"\x77\x77", b"\x22\x22"}
    no_opt = ZEN4_IMPL.with_choice(I.MODIFIED_OPTIMIZATION, False)
    assert one(ZEN4, prog, impl=no_opt).buffers[0][576:578] == b"\x22\x22"


ZEN4_IMPL = I.for_profile(ZEN4)


def test_a_preemption_between_the_final_xgetbv_and_xsave_is_an_outcome() -> None:
    """XRSTOR of SSE's initial data with XSTATE_BV[1] = 1, then XGETBV(1): on AMD XINUSE[1]
    follows the value (0). A preemption that marks SSE in use may come after the runner's
    final XGETBV(1) too, before its XSAVE: XINUSE read 0, XSTATE_BV[1] saved 1 (the Zen 4
    guest, 1 run in 60,000 with both cores loaded). Undisturbed, the save agrees with XINUSE."""
    prog = Program(image(0x2), (Insn("XGETBV", reg=1),))
    (quiet,) = run_program(ZEN4, prog, preempt=False)
    assert quiet.values == (0,) and quiet.xinuse == 0 and quiet.final[512] == 0
    seen = {(o.values, o.xinuse, o.final[512]) for o in run_program(ZEN4, prog)}
    assert ((0,), 0, 2) in seen and ((0,), 0, 0) in seen


# --- XRSTOR checks (SDM 13.8, XRSTOR exceptions) ----------------------------------------------


@pytest.mark.parametrize(("xstate_bv", "xcomp_bv", "patch", "vector"), [
    (0, 0x1, [], "#GP"),  # standard form: XCOMP_BV != 0 (bytes 23:8)
    (0, 0, [(528, b"\x01")], "#GP"),  # standard form: bytes 23:16
    (0, 0, [(540, b"\x01")], None),  # standard form: bytes 63:24 are not checked
    (0x8, 0, [], "#GP"),  # standard form: XSTATE_BV bit 3 not in XCR0
    (0, BIT63 | 0x8, [], "#GP"),  # compacted: XCOMP_BV bit not in XCR0
    (0, BIT63 | 0x800, [], "#GP"),  # compacted: CET_U is IA32_XSS, not XCR0
    (0x2, BIT63 | 0x1, [], "#GP"),  # compacted: XSTATE_BV not within XCOMP_BV
    (0, BIT63 | 0xE7, [(560, b"\x01")], "#GP"),  # compacted: bytes 63:16
    (0x2, BIT63 | 0x3, [], None),
])
def test_xrstor_header_checks(xstate_bv, xcomp_bv, patch, vector) -> None:
    buf = Buffer(image(xstate_bv, xcomp_bv=xcomp_bv, patch=patch))
    o = one(ZEN4, Program(image(0), (Insn("XRSTOR", buf=0, mask=0x1),), (buf,)))
    assert (o.fault.vector if o.fault else None) == vector


def test_xrstor_compacted_needs_xsavec() -> None:
    buf = Buffer(image(0, xcomp_bv=BIT63 | 0x3))
    o = one(HSW, Program(image(0), (Insn("XRSTOR", buf=0, mask=0x7),), (buf,)))
    assert o.fault.vector == "#GP" and "XSAVEC" in o.fault.reason


def test_xrstor_xstate_bv_bit_63_is_an_implementation_choice() -> None:
    buf = Buffer(image(BIT63, xcomp_bv=BIT63 | 0xE7))
    prog = Program(image(0), (Insn("XRSTOR", buf=0, mask=0xE7),), (buf,))
    assert one(ZEN4, prog).fault.vector == "#GP"  # AMD: COMPACTED_XSTATE_BV63 = "gp"
    allowed = ZEN4_IMPL.with_choice(I.COMPACTED_XSTATE_BV63, "allowed")
    assert one(ZEN4, prog, impl=allowed).fault is None


def test_xrstor_mxcsr_rules_of_the_two_forms() -> None:
    bad = 0x41F80  # bit 18: outside MXCSR_MASK 0x2FFFF
    std = Buffer(image(0, mxcsr=bad))
    for mask, vector in ((0xE7, "#GP"), (0x4, "#GP"), (0x1, None)):
        o = one(ZEN4, Program(image(0), (Insn("XRSTOR", buf=0, mask=mask),), (std,)))
        assert (o.fault.vector if o.fault else None) == vector, mask
    # Compacted, XSTATE_BV[1] = 0: MXCSR is not loaded (no #GP) but set to 1F80H.
    comp = Buffer(image(0, mxcsr=bad, xcomp_bv=BIT63 | 0x3))
    o = one(ZEN4, Program(image(0, mxcsr=0x1F00), (Insn("XRSTOR", buf=0, mask=0xE7),
                                                    Insn("STMXCSR")), (comp,)))
    assert o.fault is None and o.values == (0x1F80,)
    # Standard form loads MXCSR whatever XSTATE_BV says, when RFBM[2] = 1.
    o = one(ZEN4, Program(image(0), (Insn("XRSTOR", buf=0, mask=0x4), Insn("STMXCSR")),
                          (Buffer(image(0, mxcsr=0x1F00)),)))
    assert o.values == (0x1F00,)


def test_xrstor_initialises_components_whose_xstate_bv_bit_is_clear() -> None:
    start = image(0xE7, fcw=0x27F, patch=[(160, b"\x11" * 256), (576, b"\x22" * 256)])
    o = one(ZEN4, Program(start, (Insn("XRSTOR", buf=0, mask=0x6), Insn("XGETBV", reg=1),
                                  Insn("XSAVE", buf=1, mask=0x7)),
                          (Buffer(image(0)), AA)))
    b = o.buffers[1]
    assert b[160:416] == bytes(256) and b[576:832] == bytes(256)  # SSE, AVX initialised
    assert struct.unpack_from("<H", b, 0)[0] == 0x27F  # x87 not in RFBM: kept
    assert o.values == (0x1,)  # only x87 left in use (the others' data were zero)


def test_xrstor_compacted_force_init_of_rfbm_bits_outside_xcomp_bv() -> None:
    start = image(0x4, patch=[(576, b"\x22" * 256)])
    buf = Buffer(image(0, xcomp_bv=BIT63 | 0x20))
    o = one(ZEN4, Program(start, (Insn("XRSTOR", buf=0, mask=0xE7), Insn("XGETBV", reg=1)),
                          (buf,)))
    assert o.values == (0,)


# --- XGETBV / XSETBV -----------------------------------------------------------------------


def test_xgetbv1_after_vzeroupper_lacks_bit_2() -> None:
    prog = Program(image(0), (Insn("VMOVDQU", reg=3, data=bytes(range(1, 33))),
                              Insn("XGETBV", reg=1), Insn("VZEROUPPER"), Insn("XGETBV", reg=1)))
    assert one(ZEN4, prog).values == (0x6, 0x2)


def test_xgetbv1_reports_sse_when_mxcsr_is_not_1f80() -> None:
    prog = Program(image(0), (Insn("LDMXCSR", value=0x1F00), Insn("XGETBV", reg=1),
                              Insn("XSAVE", buf=0, mask=0x2)), (AA,))
    o = one(ZEN4, prog)
    assert o.values == (0x2,) and hdr(o.buffers[0])[0] & 2 == 0


@pytest.mark.parametrize(("restore", "amd", "intel"), [
    (Insn("FXRSTOR", buf=0), 0x00, 0x07),  # Intel: FXRSTOR sets XINUSE[1:0]
    (Insn("XRSTOR", buf=0, mask=0x2), 0x00, 0x04),
    (Insn("XRSTOR", buf=0, mask=0x40), 0x02, 0x06),
    (Insn("XRSTOR", buf=0, mask=0x1), 0x06, 0x06),
    (Insn("XRSTOR", buf=0, mask=0x80), 0x06, 0x06),
])
def test_restore_of_zmm0_15_recomputes_xinuse_on_amd(restore: Insn, amd: int, intel: int) -> None:
    """RESTORE_ZMM_XINUSE: VMOVDQU ymm1 = (0x33 * 16, zeros) sets XINUSE[1] and [2] although
    AVX holds zeros; a restore that touches ZMM0-15 then makes XINUSE[1], [2], [6] follow the
    values on AMD (measured on Zen 5), and leaves the bits it did not load on Intel."""
    prog = Program(image(0), (Insn("VMOVDQU", reg=1, data=b"\x33" * 16 + bytes(16)), restore,
                              Insn("XGETBV", reg=1)), (Buffer(image(0)),))
    assert one(ZEN4, prog).values == (amd,)
    assert one(SPR, prog).values == (intel,)


_NZ64 = bytes(range(1, 65))


@pytest.mark.parametrize(("start", "insns", "amd"), [
    (image(0), [Insn("VMOVDQU64", reg=11, data=_NZ64), Insn("VMOVDQU", reg=11, data=bytes(32))],
     0x06),
    (image(0), [Insn("VMOVDQU64", reg=12, data=bytes(64)), Insn("VMOVDQU64", reg=11, data=_NZ64),
                Insn("VMOVDQU", reg=11, data=bytes(32))], 0x46),  # zmm12 written: still in use
    (image(0x40, patch=[(0x380 + 3 * 32, b"\x5a" * 32)]),
     [Insn("VMOVDQU", reg=5, data=bytes(32))], 0x46),  # ZMM3_H non-zero
    (image(0x40, patch=[(0x380 + 3 * 32, b"\x5a" * 32)]),
     [Insn("VMOVDQU", reg=3, data=bytes(32))], 0x06),
])
def test_vex256_load_clears_zmm_hi256_xinuse_per_register(start: bytes, insns: list[Insn],
                                                          amd: int) -> None:
    """VEX256_HI256_XINUSE: a VEX.256 load zeroes ZMMr[511:256]; on AMD XINUSE[6] then stays 1
    only while another of ZMM0-15 has those bits non-zero or written by an EVEX.512 load."""
    prog = Program(start, (*insns, Insn("XGETBV", reg=1)))
    assert one(ZEN4, prog).values == (amd,)
    assert one(SPR, prog).values[0] & 0x40  # Intel: kept


def test_legacy_sse_write_marks_its_upper_half_in_use() -> None:
    """While ZMM_Hi256 is in use, MOVDQU xmm8 marks ZMM8's upper half in use too (AMD): a
    VEX.256 load clearing ZMM2's then leaves XINUSE[6] set (measured: 0x46, 60 of 60)."""
    prog = Program(image(0), (Insn("VMOVDQU64", reg=2, data=_NZ64),
                              Insn("MOVDQU", reg=8, data=_NZ64[:16]),
                              Insn("VMOVDQU", reg=2, data=_NZ64[:32]), Insn("XGETBV", reg=1)))
    assert one(ZEN4, prog).values == (0x46,)


@pytest.mark.parametrize(("between", "allowed"), [
    ([], {0x06, 0x46}),  # measured: both, about half each
    ([Insn("KMOVQ", reg=1, data=bytes(8))], {0x26, 0x66}),  # 0x66 in 1 run of 60
    ([Insn("XGETBV", reg=1)], {0x06}),  # never 0x46 (60 of 60)
    ([Insn("FNINIT")], {0x06}),
])
def test_legacy_sse_write_may_see_a_just_cleared_xinuse_6(between: list[Insn],
                                                         allowed: set[int]) -> None:
    """`lagging_tracking`: after VMOVDQU ymm2 cleared XINUSE[6], a MOVDQU right after (or
    after a KMOVQ) may still find ZMM_Hi256 in use; a serialising XGETBV or an FNINIT between
    settles it. Both outcomes are in the model's set, without any preemption."""
    prog = Program(image(0), (Insn("VMOVDQU64", reg=2, data=_NZ64),
                              Insn("VMOVDQU", reg=2, data=_NZ64[:32]), *between,
                              Insn("MOVDQU", reg=8, data=_NZ64[:16]), Insn("XGETBV", reg=1)))
    assert {o.values[-1] for o in run_program(ZEN4, prog, preempt=False)} == allowed
    intel = run_program(SPR, prog, preempt=False)
    assert len(intel) == 1 and intel[0].values[-1] & 0x40  # Intel: XINUSE[6] kept


def test_legacy_sse_write_marks_avx_in_use_but_not_modified() -> None:
    """LEGACY_SSE_UPPER on AMD: MOVDQU while ZMM_Hi256 is in use sets XINUSE[2]; AVX is still
    unmodified since the XRSTOR from buf0, so XSAVEOPT writes XSTATE_BV[2] = 1 but not the AVX
    bytes (they keep buf0's 0x22, which XRSTOR did not load: XSTATE_BV[2] was 0)."""
    buf = Buffer(image(0x40, patch=[(0x240, b"\x22" * 256), (0x380, b"\x5a" * 32)]))
    prog = Program(image(0), (Insn("XRSTOR", buf=0, mask=0xE7),
                              Insn("MOVDQU", reg=8, data=_NZ64[:16]),
                              Insn("XSAVEOPT", buf=0, mask=0xE7)), (buf,))
    o = one(ZEN4, prog)
    assert hdr(o.buffers[0])[0] == 0x46 and o.buffers[0][0x240:0x340] == b"\x22" * 256
    assert o.final[0x240:0x340] == bytes(256)


def test_xgetbv_invalid_ecx_and_missing_xgetbv1_are_gp() -> None:
    assert one(ZEN4, Program(image(0), (Insn("XGETBV", reg=2),))).fault.vector == "#GP"
    assert one(HSW, Program(image(0), (Insn("XGETBV", reg=1),))).fault.vector == "#GP"


@pytest.mark.parametrize(("value", "ok"), [
    (0x7, True), (0xE7, True), (0x6, False), (0x5, False), (0x27, False), (0xE3, False),
    (0x107, False), (0x207, True), (1 << 40 | 7, False),
])
def test_xsetbv_at_cpl0(value: int, ok: bool) -> None:
    prog = Program(image(0), (Insn("XSETBV", reg=0, value=value), Insn("XGETBV", reg=0)),
                   cpl=0)
    o = one(ZEN4, prog)
    assert (o.fault is None) == ok
    if ok:
        assert o.values == (value,)


def test_xsetbv_cpl3_and_ecx1_are_gp() -> None:
    assert one(ZEN4, Program(image(0), (Insn("XSETBV", value=0xE7),))).fault.vector == "#GP"
    o = one(ZEN4, Program(image(0), (Insn("XSETBV", reg=1, value=0xE7),), cpl=0))
    assert o.fault.vector == "#GP"


# --- XSAVES / XRSTORS at CPL 0 (SDM 13.11, 13.12) -----------------------------------------------

_CET = struct.pack("<QQ", 0x1, 0x7FFF_FFFF_F000)  # IA32_U_CET.SH_STK_EN, IA32_PL3_SSP


#: XCR0 | IA32_XSS on zen4 with CET: x87..Hi16_ZMM, PKRU at 2432, CET_U at 2440, CET_S at 2456.
ALL_S = 0x1AE7


def _cet_image(u_cet: bytes = _CET, xcomp: int = BIT63 | ALL_S) -> Buffer:
    return Buffer(image(0x800, xcomp_bv=xcomp, patch=[(2440, u_cet)]))


def test_xrstors_then_xsaves_cet_user_at_compacted_offset_2440() -> None:
    prog = Program(image(0), (Insn("XRSTORS", buf=0, mask=2**64 - 1),
                              Insn("XSAVES", buf=1, mask=2**64 - 1)),
                   (_cet_image(), AA), cpl=0)
    o = one(ZEN4, prog, xss=0x1800)
    b = o.buffers[1]
    assert hdr(b) == (0x800, BIT63 | ALL_S)
    assert b[2440:2456] == _CET  # Hi16_ZMM ends at 2432, PKRU (8 bytes), then CET_U
    assert b[2432:2440] == b"\xaa" * 8  # PKRU in its initial configuration: not written
    assert b[2456:2480] == b"\xaa" * 24  # nor CET_S


def test_xsaves_and_xrstors_need_cpl0() -> None:
    for mn in ("XSAVES", "XRSTORS"):
        o = one(ZEN4, Program(image(0), (Insn(mn, buf=0, mask=0xE7),), (_cet_image(),)),
                xss=0x1800)
        assert o.fault.vector == "#GP" and o.fault.reason == "CPL > 0"


@pytest.mark.parametrize(("buf", "why"), [
    (_cet_image(xcomp=ALL_S), "XCOMP_BV[63] = 0"),
    (_cet_image(u_cet=struct.pack("<QQ", 0x40, 0)), "reserved bits 9:6"),
    (_cet_image(u_cet=struct.pack("<QQ", 0, 0x7FFF_FFFF_F002)), "4-byte aligned"),
    (_cet_image(u_cet=struct.pack("<QQ", 0, 1 << 47)), "canonical"),
])
def test_xrstors_gp(buf: Buffer, why: str) -> None:
    o = one(ZEN4, Program(image(0), (Insn("XRSTORS", buf=0, mask=2**64 - 1),), (buf,), cpl=0),
            xss=0x1800)
    assert o.fault.vector == "#GP" and why in o.fault.reason


def test_xsaves_modified_optimisation_needs_the_same_xcomp_bv() -> None:
    buf = Buffer(image(0x884, xcomp_bv=BIT63 | ALL_S,
                       patch=[(576, b"\x22" * 256), (1408, b"\x55" * 8), (2440, _CET)]))
    same = Program(image(0), (
        Insn("XRSTORS", buf=0, mask=2**64 - 1), Insn("XSAVEC", buf=0, mask=0x80),
        Insn("XSAVES", buf=0, mask=2**64 - 1)), (buf,), cpl=0)
    b = one(ZEN4, same, xss=0x1800).buffers[0]
    assert b[576:584] == b"\x55" * 8  # AVX unmodified since XRSTORS from here: not written
    other = Program(same.start, (*same.insns[:2], Insn("XSAVES", buf=0, mask=ALL_S & ~1)),
                    same.buffers, cpl=0)
    b = one(ZEN4, other, xss=0x1800).buffers[0]
    assert b[576:584] == b"\x22" * 8  # RFBM differs from XCOMP_BV: no modified optimisation


# --- XFD and AMX (SDM 13.14, Vol. 2A AMX exception classes) ----------------------------------

TILE_CFG = bytes([1, 0] + [0] * 14 + [64, 0] + [0] * 30 + [16] + [0] * 15)


def spr_cpu(xfd: int = 0) -> Cpu:
    return Cpu(machine(SPR), I.for_profile(SPR), xcr0=default_xcr0(SPR), xfd=xfd)


def test_tileloadd_with_xfd_armed_is_nm_with_xfd_err() -> None:
    cpu = spr_cpu(xfd=0x40000)
    assert LDTILECFG(cpu, TILE_CFG) is None  # LDTILECFG initialises TILEDATA: no #NM
    fault = TILELOADD(cpu, 0, bytes(1024))
    assert fault.vector == "#NM" and cpu.xfd_err == 0x40000
    assert TILEZERO(cpu, 0).vector == "#NM"
    dst = bytearray(64)
    assert STTILECFG(cpu, dst) is None and bytes(dst) == TILE_CFG
    assert TILERELEASE(cpu) is None


def test_tile_instructions_without_configuration_are_ud() -> None:
    cpu = spr_cpu()
    assert TILEZERO(cpu, 0).vector == "#UD"
    dst = bytearray(b"\xff" * 64)
    assert STTILECFG(cpu, dst) is None and bytes(dst) == bytes(64)
    LDTILECFG(cpu, TILE_CFG)
    assert TILEZERO(cpu, 1).vector == "#UD"  # tmm1 is not configured (rows = colsb = 0)


@pytest.mark.parametrize("patch", [(0, 2), (2, 1), (16, 65), (48, 17), (18, 4), (56, 1)])
def test_ldtilecfg_refuses_invalid_configurations(patch: tuple[int, int]) -> None:
    cfg = bytearray(TILE_CFG)
    cfg[patch[0]] = patch[1]
    assert LDTILECFG(spr_cpu(), bytes(cfg)).vector == "#GP"


def test_tileloadd_loads_rows_and_zeroes_the_rest() -> None:
    cfg = bytearray(TILE_CFG)
    cfg[16], cfg[48], cfg[1] = 8, 2, 1  # tmm0: 2 rows x 8 bytes, start_row 1
    cpu = spr_cpu()
    LDTILECFG(cpu, bytes(cfg))
    assert TILELOADD(cpu, 0, bytes(range(16))) is None
    tile = cpu.regs[18][0:1024]
    assert tile[0:64] == bytes(64)  # row 0 below start_row: untouched (zero from LDTILECFG)
    assert tile[64:72] == bytes(range(8, 16)) and tile[72:1024] == bytes(952)
    assert cpu.regs[17][1] == 0  # start_row := 0


def _tmm0(rows: int, colsb: int, start_row: int = 0) -> bytes:
    cfg = bytearray(TILE_CFG)
    struct.pack_into("<H", cfg, 16, colsb)
    cfg[48], cfg[1] = rows, start_row
    return bytes(cfg)


def test_tilestored_stores_the_configured_rows_only() -> None:
    """LDTILECFG tmm0 = 3 rows x 12 bytes, TILELOADD, TILESTORED into 0xAA: rows at stride 12
    (bytes [0, 36)), nothing beyond; the final image holds the same rows 64 bytes apart."""
    rows = bytes(range(1, 37))
    prog = Program(image(0), (Insn("LDTILECFG", data=_tmm0(3, 12)),
                              Insn("TILELOADD", reg=0, data=rows),
                              Insn("TILESTORED", buf=0, reg=0)), (AA,))
    o = one(SPR, prog)
    assert o.fault is None
    assert o.buffers[0][:36] == rows and o.buffers[0][36:4096] == b"\xaa" * 4060
    tiles = SPR.component(18).offset
    assert [o.final[tiles + 64 * r:tiles + 64 * r + 12] for r in range(3)] == \
        [rows[0:12], rows[12:24], rows[24:36]]


def test_tilestored_from_start_row_and_resets_it() -> None:
    """start_row 1: row 0 is not written (stays 0xAA), row 1 is at [8, 16); start_row := 0."""
    cpu = spr_cpu()
    assert LDTILECFG(cpu, _tmm0(2, 8)) is None
    assert TILELOADD(cpu, 0, bytes(range(100, 116))) is None
    cpu.regs[17][1] = 1  # start_row as an interrupted TILESTORED leaves it (XRSTOR can load it)
    dst = bytearray(b"\xaa" * 64)
    assert TILESTORED(cpu, 0, dst) is None
    assert dst[:8] == b"\xaa" * 8 and dst[8:16] == bytes(range(108, 116))
    assert dst[16:] == b"\xaa" * 48 and cpu.regs[17][1] == 0


def test_tilestored_with_xfd_armed_is_nm_with_xfd_err() -> None:
    """AMX-E3 under IA32_XFD[18] = 1: #NM, IA32_XFD_ERR := 0x40000, memory untouched."""
    cpu = spr_cpu(xfd=0x40000)
    assert LDTILECFG(cpu, TILE_CFG) is None
    dst = bytearray(b"\xaa" * 1024)
    fault = TILESTORED(cpu, 0, dst)
    assert fault.vector == "#NM" and cpu.xfd_err == 0x40000 and dst == b"\xaa" * 1024
    prog = Program(image(0), (Insn("LDTILECFG", data=TILE_CFG), Insn("TILESTORED", buf=0)),
                   (AA,))
    o = one(SPR, prog, xfd=0x40000)
    assert (o.fault.vector, o.fault_step) == ("#NM", 1) and o.buffers[0] == AA.data.ljust(
        BUFFER_SIZE, b"\0")


def test_tilestored_ud_cases() -> None:
    """AMX-E3 #UD: no AMX-TILE (Zen 4), XCR0[18:17] != 11b, TILES_CONFIGURED = 0, a tile the
    palette has but the configuration leaves empty, start_row >= rows, colsb % 4 != 0."""
    store = Program(image(0), (Insn("LDTILECFG", data=TILE_CFG), Insn("TILESTORED", buf=0)),
                    (AA,))
    assert one(ZEN4, store).fault.vector == "#UD"
    assert one(SPR, store, xcr0=default_xcr0(SPR) & ~0x60000).fault.vector == "#UD"
    dst = bytearray(64)
    assert "TILES_CONFIGURED" in TILESTORED(spr_cpu(), 0, dst).reason
    for cfg, t in ((TILE_CFG, 1), (_tmm0(2, 8, start_row=2), 0), (_tmm0(2, 6), 0)):
        cpu = spr_cpu()
        assert LDTILECFG(cpu, cfg) is None
        fault = TILESTORED(cpu, t, dst)
        assert fault is not None and fault.vector == "#UD" and dst == bytes(64), (cfg, t)


def test_xsave_of_xfd_armed_tiledata_saves_its_initial_configuration() -> None:
    cpu = spr_cpu()
    LDTILECFG(cpu, TILE_CFG)
    TILELOADD(cpu, 0, b"\x77" * 1024)
    cpu.xfd = 0x40000  # WRMSR IA32_XFD: the tile data stay in the registers
    a, c = (Area(bytearray(b"\xaa" * 512 + bytes(64) + b"\xaa" * 10432), ("buf", n))
            for n in (0, 1))
    assert XSAVE(cpu, a, 0x60000) is None and XSAVEC(cpu, c, 0x60000) is None
    assert hdr(a.data)[0] == 0x20000 and a.data[2816:11008] == bytes(8192)
    assert hdr(c.data) == (0x20000, BIT63 | 0x60000)
    assert c.data[2560:2568] == b"\xaa" * 8  # XSAVEC does not save it
    assert cpu.regs[18][0:4] == b"\x77" * 4


def test_xrstor_under_xfd_nm_only_when_loading() -> None:
    load = Buffer(image(0x40000, size=11008, patch=[(2816, b"\x77" * 8192)]))
    prog = Program(image(0), (Insn("XRSTOR", buf=0, mask=0x60000),), (load,))
    o = one(SPR, prog, xfd=0x40000)
    assert (o.fault.vector, o.fault_step) == ("#NM", 0)
    init = Program(image(0), (Insn("XRSTOR", buf=0, mask=0x60000),), (Buffer(image(0)),))
    assert one(SPR, init, xfd=0x40000).fault is None


def test_xrstor_of_an_invalid_tilecfg_initialises_it() -> None:
    bad = bytearray(TILE_CFG)
    bad[0] = 7  # no palette 7
    buf = Buffer(image(0x20000, size=3000, patch=[(2752, bytes(bad))]))
    prog = Program(image(0), (Insn("XRSTOR", buf=0, mask=0x60000), Insn("STTILECFG", buf=1)),
                   (buf, AA))
    o = one(SPR, prog)
    assert o.fault is None and o.buffers[1][:64] == bytes(64)


# --- PKRU, x87, MXCSR -----------------------------------------------------------------------


def test_wrpkru_rdpkru_and_xsave_of_pkru() -> None:
    prog = Program(image(0, size=2696), (Insn("WRPKRU", value=0x5555_0004), Insn("RDPKRU"),
                                         Insn("XSAVE", buf=0, mask=0x200)), (AA,))
    o = one(SPR, prog)
    # PKRU state is the 32-bit register: bytes 7:4 of its component are left as they were.
    assert o.values == (0x5555_0004,) and o.buffers[0][2688:2696] == bytes.fromhex(
        "04005555aaaaaaaa")
    # ... and are not loaded: PKRU 0 with bytes 7:4 set is initial (where XRSTOR's XINUSE
    # follows the value, as on AMD: XRSTOR_LOAD_XINUSE "value", XSTATE_BV[9] saved 0).
    at = ZEN4.component(9).offset
    pad = image(0x200, size=at + 8, patch=[(at, bytes(4) + b"\x77" * 4)])
    o = one(ZEN4, Program(image(0), (Insn("XRSTOR", buf=0, mask=0x200), Insn("RDPKRU"),
                                    Insn("XSAVEC", buf=1, mask=0x200)), (Buffer(pad), AA)))
    assert o.values == (0,) and o.buffers[1][512:520] == bytes(8)
    assert one(SPR, Program(image(0), (Insn("WRPKRU", value=1 << 32),))).fault.vector == "#GP"
    assert one(load_profile("zen2"), Program(image(0), (Insn("RDPKRU"),))).fault.vector == "#UD"


def test_fld_stack_overflow_masked_pushes_the_indefinite() -> None:
    prog = Program(image(1, ftw=0xFF), (Insn("FLD", data=bytes(range(10))), Insn("FNSTSW"),
                                        Insn("FNINIT"), Insn("XSAVE", buf=0, mask=1)), (AA,))
    o = one(ZEN4, prog)
    assert o.values == (0x3A41,)  # TOP 7, C1, SF, IE
    assert o.buffers[0][32 + 7 * 16:32 + 7 * 16 + 10] == bytes.fromhex("00000000000000c0ffff")


def test_fld_pointers_are_unknown_to_the_model() -> None:
    prog = Program(image(1, fcw=0x37E), (Insn("FLD", data=bytes(10)),) * 9 +
                   (Insn("XSAVE", buf=0, mask=1),), (AA,))
    with pytest.raises(UnknownPointers):
        run_program(ZEN4, prog)
    # Intel saves FIP/FDP always (X87_POINTERS "always"): any save after an FLD.
    with pytest.raises(UnknownPointers):
        run_program(SPR, Program(image(0), (Insn("FLD", data=bytes(10)),
                                            Insn("FXSAVE", buf=0)), (AA,)))


#: Where a runner might put FLD; FNSTSW; FLDCW; EMMS; XSAVE (FLD m80 [rbx+disp32]: DB AB).
PLACED = (Placement(0x7F0000401000, 0x7F0000500040, 0x3AB), Placement(0x7F0000401011),
          Placement(0x7F0000401022, 0x7F0000500080, 0x16B), Placement(0x7F0000401033),
          Placement(0x7F0000401044))
FIVE = (Insn("FLD", data=bytes(10)), Insn("FNSTSW"), Insn("FLDCW", value=0x37F), Insn("EMMS"),
        Insn("XSAVE", buf=0, mask=1))


def _pointers(o: Outcome) -> tuple[int, int, int]:
    """FOP, FIP and FDP of the x87 state the program's XSAVE stored in buf0."""
    fop, fip, fdp = struct.unpack_from("<HQQ", o.buffers[0], 6)
    return fop, fip, fdp


def test_an_fld_with_its_placement_leaves_its_address_in_fip() -> None:
    """SDM Vol. 1 8.1.8: FIP is the last non-control instruction's address -- the FLD's; the
    control instructions FNSTSW and FLDCW, and EMMS, leave it. With FDP_EXCPTN_ONLY
    (Sapphire Rapids) and the fopcode compatibility sub-mode off (FOP_UPDATE "unmasked") an
    FLD without an unmasked exception keeps FDP and FOP as the start image had them; Haswell,
    without FDP_EXCPTN_ONLY, takes the FLD's operand address into FDP."""
    prog = Program(image(1, fop=0x123, fip=0x1111, fdp=0x2222), FIVE, (AA,))
    assert _pointers(one(SPR, prog, placement=PLACED)) == (0x123, 0x7F0000401000, 0x2222)
    hsw = load_profile("haswell")
    assert _pointers(one(hsw, prog, placement=PLACED)) == (0x123, 0x7F0000401000,
                                                           0x7F0000500040)


def test_an_unmasked_fld_exception_writes_fdp_and_fop() -> None:
    """FCW.IM clear and every register full: the FLD's stack overflow is an unmasked
    exception (FSW.ES set, nothing pushed), so FDP and FOP become the FLD's as well."""
    prog = Program(image(1, fcw=0x37E, ftw=0xFF), (Insn("FLD", data=bytes(10)),
                                                   Insn("XSAVE", buf=0, mask=1)), (AA,))
    o = one(SPR, prog, placement=(PLACED[0], PLACED[4]))
    assert _pointers(o) == (0x3AB, 0x7F0000401000, 0x7F0000500040)
    assert struct.unpack_from("<H", o.buffers[0], 2)[0] & 0x80  # FSW.ES


def test_fip_is_kept_to_the_cpus_width() -> None:
    """As an XRSTOR's FIP would be (X87_POINTER_BITS: 57 on Sapphire Rapids, sign-extended)."""
    prog = Program(image(0), (Insn("FLD", data=bytes(10)), Insn("XSAVE", buf=0, mask=1)), (AA,))
    far = (Placement(1 << 56, 0x1000, 0x3AB), PLACED[4])
    assert _pointers(one(SPR, prog, placement=far))[1] == 0xFF00000000000000


def test_a_placement_is_one_per_instruction() -> None:
    with pytest.raises(ProgramError, match="placement of 2 instructions for a program of 5"):
        run_program(SPR, Program(image(0), FIVE, (AA,)), placement=PLACED[:2])


def test_fld1_and_fldz_push_their_constants_and_leave_fdp() -> None:
    """FLD1 and FLDZ push +1.0 and +0.0 as FLD pushes (C1 := 0, C0/C2/C3 kept: FSW 0x4500
    reads 0x7D00 with TOP 7), set FIP to where they ran, and -- no memory operand -- leave FDP
    where the CPU enumerates FDP_EXCPTN_ONLY; FOP stays without an unmasked exception."""
    at = (Placement(0x7F0000401000, 0, 0x1E8), Placement(0x7F0000401002, 0, 0x1EE),
          Placement(0x7F0000401010), PLACED[4])
    prog = Program(image(1, fsw=0x4500, fop=0x123, fip=0x1111, fdp=0x2222),
                   (Insn("FLD1"), Insn("FLDZ"), Insn("FNSTSW"), Insn("XSAVE", buf=0, mask=1)),
                   (AA,))
    o = one(SPR, prog, placement=at)
    assert o.values == (0x7500,)  # TOP 6, C3 C2 C0 kept, C1 clear
    assert _pointers(o) == (0x123, 0x7F0000401002, 0x2222)
    st = o.buffers[0][32:32 + 2 * 16]  # ST0 = +0.0 (FLDZ), ST1 = +1.0 (FLD1)
    assert st[0:10] == bytes(10) and st[16:26] == bytes.fromhex("0000000000000080ff3f")


def test_fldz_with_an_unmasked_overflow_writes_fop_not_fdp() -> None:
    prog = Program(image(1, fcw=0x37E, ftw=0xFF, fdp=0x2222), (Insn("FLDZ"),
                                                              Insn("XSAVE", buf=0, mask=1)), (AA,))
    at = (Placement(0x7F0000401000, 0, 0x1EE), PLACED[4])
    assert _pointers(one(SPR, prog, placement=at)) == (0x1EE, 0x7F0000401000, 0x2222)
    # Haswell (no FDP_EXCPTN_ONLY): FDP after an instruction without a memory operand is
    # undefined, so the model does not claim one.
    with pytest.raises(UnknownPointers):
        run_program(load_profile("haswell"), prog, placement=at)


def test_fnclex_clears_the_exception_state_and_nothing_else() -> None:
    """FNCLEX: the flags, SF, ES and B cleared (an unmasked pending exception is gone: the
    next waiting instruction does not #MF), TOP and C0-C3 kept (FNCLEX_UNDEFINED_FLAGS), FIP
    kept (a control instruction); #NM under CR0.TS is the model's Cpu state, not tested here."""
    prog = Program(image(1, fcw=0x37E, fsw=0x77FF, fip=0x1111),  # TOP 6, C0-C3, IE pending
                   (Insn("FNCLEX"), Insn("FNSTSW"), Insn("FLDCW", value=0x37F),
                    Insn("XSAVE", buf=0, mask=1)), (AA,))
    at = (*PLACED[:3], PLACED[4])
    o = one(SPR, prog, placement=at)
    assert o.fault is None and o.values == (0x7700,)
    assert _pointers(o)[1] == 0x1111
    cleared = SPR_IMPL.with_choice(I.FNCLEX_UNDEFINED_FLAGS, "cleared")
    assert one(SPR, prog, impl=cleared, placement=at).values == (0x3000,)


def test_fninit_keeps_the_data_registers() -> None:
    prog = Program(image(0), (Insn("FLD", data=bytes(range(1, 11))), Insn("FNINIT"),
                              Insn("XGETBV", reg=1), Insn("XSAVE", buf=0, mask=1)), (AA,))
    o = one(ZEN4, prog)
    assert o.values == (0x1,)  # the x87 state is not initial: ST7 holds the value
    assert o.buffers[0][0:6] == bytes.fromhex("7f0300000000")
    assert o.buffers[0][144:154] == bytes(range(1, 11))


_FLD0 = Insn("FLD", data=bytes(10))


@pytest.mark.parametrize(("start", "insns", "xinuse"), [
    (image(0), [_FLD0, Insn("EMMS")], 0x1),  # R7 written by the FLD: still in use
    (image(0), [_FLD0, Insn("EMMS"), Insn("FLDCW", value=0x37F)], 0x1),
    (image(0), [_FLD0, Insn("FNINIT")], 0x0),  # FNINIT: back to the registers' value
    (image(0), [_FLD0, Insn("FNINIT"), Insn("EMMS")], 0x0),
    (image(0), [_FLD0, Insn("EMMS"), Insn("FXRSTOR", buf=0)], 0x0),  # a restore, too
    (image(1, fsw=0x3800), [Insn("EMMS")], 0x0),  # TOP 7 from XRSTOR: EMMS makes it initial
    (image(1, ftw=0x01), [Insn("EMMS")], 0x0),
    (image(1, fsw=0x0001), [Insn("EMMS")], 0x1),  # EMMS keeps the exception flags
])
def test_x87_xinuse_follows_its_value_with_fld_written_registers(start: bytes,
                                                                 insns: list[Insn],
                                                                 xinuse: int) -> None:
    """WRITE_XINUSE on AMD (measured): x87 XINUSE follows the state's value, but R0-R7
    count as in use from an FLD until FNINIT or a restore, even when they hold zeros."""
    prog = Program(start, (*insns, Insn("XGETBV", reg=1)), (Buffer(image(0)[:512]),))
    assert one(ZEN4, prog).values == (xinuse,)


def test_ldmxcsr_reserved_bit_is_gp() -> None:
    o = one(ZEN4, Program(image(0), (Insn("LDMXCSR", value=0x21F80), Insn("LDMXCSR",
                                                                          value=0x41F80))))
    assert (o.fault.vector, o.fault_step) == ("#GP", 1)
    intel = one(SPR, Program(image(0), (Insn("LDMXCSR", value=0x21F80),)))
    assert intel.fault.vector == "#GP"  # Intel's MXCSR_MASK is 0xFFFF


# --- run_program's contract ---------------------------------------------------------------


def test_run_program_rejects_bad_configuration() -> None:
    prog = Program(image(0), (Insn("XGETBV"),))
    with pytest.raises(MaskError, match="XCR0"):
        run_program(ZEN4, prog, xcr0=0x5)
    with pytest.raises(MaskError, match="IA32_XSS"):
        run_program(ZEN4, prog, xss=0x400)
    with pytest.raises(MaskError, match="LBR"):
        run_program(SPR, prog, xss=1 << 15)
    with pytest.raises(MaskError, match="IA32_XFD"):
        run_program(ZEN4, prog, xfd=0x40000)
    with pytest.raises(ProgramError, match="start image rejected"):
        run_program(ZEN4, Program(image(0x8), (Insn("XGETBV"),)))


def test_default_xcr0_is_what_linux_enables() -> None:
    assert default_xcr0(SPR) == 0x602E7
    assert default_xcr0(ZEN4) == 0x2E7
    assert default_xcr0(HSW) == 0x7
    assert default_xcr0(load_profile("skylake-sp")) == 0x2FF


def test_outcome_buffers_are_whole_buffers() -> None:
    o = one(ZEN4, Program(image(0), (Insn("XSAVE", buf=0, mask=0),), (Buffer(b"\x01"),)))
    assert len(o.buffers[0]) == BUFFER_SIZE and o.buffers[0][0] == 1



def test_a_legacy_sse_write_keeps_avx_in_use_through_fxrstor_on_zen3_only() -> None:
    """LEGACY_SSE_KEEPS_AVX (measured on a Zen 3): VMOVDQU ymm4 = 0 puts AVX in use, MOVDQU
    xmm10 then keeps it so: FXRSTOR and XRSTOR without RFBM[2] leave XINUSE[2] set where the
    Zen 5 record recomputes it from the (zero) registers; XRSTOR with RFBM[2] or VZEROUPPER
    ends it."""
    zen3, zen5 = load_profile("zen3"), load_profile("zen5")
    start = (Insn("VMOVDQU", reg=4, data=bytes(32)), Insn("MOVDQU", reg=10, data=bytes(16)))

    def xinuse(profile, *tail: Insn) -> int:
        prog = Program(image(0), (*start, *tail, Insn("XGETBV", reg=1)), (Buffer(image(0)),))
        return one(profile, prog).values[-1]

    assert xinuse(zen3, Insn("FXRSTOR", buf=0)) == 0x4
    assert xinuse(zen3, Insn("XRSTOR", buf=0, mask=0x2), Insn("FXRSTOR", buf=0)) == 0x4
    assert xinuse(zen3, Insn("XRSTOR", buf=0, mask=0x4), Insn("FXRSTOR", buf=0)) == 0
    assert xinuse(zen3, Insn("VZEROUPPER"), Insn("FXRSTOR", buf=0)) == 0
    assert xinuse(zen5, Insn("FXRSTOR", buf=0)) == 0


def test_an_xrstor_of_avx_state_clears_what_a_vex_load_of_zeros_put_in_use_on_intel() -> None:
    """VEX_XINUSE_RECOMPUTED (measured on Emerald Rapids): VMOVDQU ymm10 = 0 from the initial
    state sets XINUSE[1] and [2]; an XRSTOR that loads AVX (or ZMM_Hi256) state then clears
    the ones it did not load, the YMM registers being zero -- but not after a MOVDQU or an
    LDMXCSR wrote SSE state, nor when ymm10's upper half was non-zero, nor when the restore
    only initialises AVX state (XSTATE_BV[2] = 0) or loads SSE state only."""
    emr = I.INTEL_EMR_HOST
    y0 = Insn("VMOVDQU", reg=10, data=bytes(32))

    def xinuse(*insns: Insn, bv: int = 0x4) -> int:
        prog = Program(image(0), (*insns, Insn("XGETBV", reg=1)), (Buffer(image(bv)),))
        return one(SPR, prog, impl=emr).values[-1]

    assert xinuse(y0) == 0x6
    assert xinuse(y0, Insn("XRSTOR", buf=0, mask=0x4)) == 0x4
    assert xinuse(y0, Insn("XRSTOR", buf=0, mask=0x40), bv=0x40) == 0x40
    assert xinuse(y0, Insn("XRSTOR", buf=0, mask=0x4), bv=0) == 0x2
    assert xinuse(y0, Insn("XRSTOR", buf=0, mask=0x2), bv=0x2) == 0x6
    assert xinuse(y0, Insn("XRSTOR", buf=0, mask=0x80), bv=0x80) == 0x86
    assert xinuse(y0, Insn("MOVDQU", reg=1, data=bytes(16)), Insn("XRSTOR", buf=0, mask=0x4)) == 0x6
    assert xinuse(y0, Insn("LDMXCSR", value=0x1F80), Insn("XRSTOR", buf=0, mask=0x4)) == 0x6
    assert xinuse(y0, Insn("VMOVDQU", reg=11, data=bytes(32)),
                  Insn("XRSTOR", buf=0, mask=0x4)) == 0x4
    upper = Insn("VMOVDQU", reg=10, data=bytes(16) + bytes(range(1, 17)))
    assert xinuse(upper, Insn("XRSTOR", buf=0, mask=0x40), bv=0x40) == 0x46
    # the record that predates it, and every AMD one: kept
    assert one(SPR, Program(image(0), (y0, Insn("XRSTOR", buf=0, mask=0x4),
                                       Insn("XGETBV", reg=1)), (Buffer(image(0x4)),)),
               impl=emr.with_choice(I.VEX_XINUSE_RECOMPUTED, "kept")).values[-1] == 0x6


def test_ldmxcsr_sets_xinuse_1_on_intel_and_keeps_it_on_amd() -> None:
    """LDMXCSR_XINUSE: from the initial state LDMXCSR 0x1F80 (no change of value) leaves
    XINUSE[1] set on Emerald Rapids (measured) and clear in the AMD records; an XRSTOR that
    initialises SSE clears it again."""
    prog = Program(image(0), (Insn("LDMXCSR", value=0x1F80), Insn("XGETBV", reg=1)))
    assert one(SPR, prog, impl=I.INTEL_EMR_HOST).values == (0x2,)
    assert one(ZEN4, prog).values == (0x0,)
    again = Program(image(0), (Insn("LDMXCSR", value=0x1F80), Insn("XRSTOR", buf=0, mask=0x2),
                               Insn("XGETBV", reg=1)), (Buffer(image(0)),))
    assert one(SPR, again, impl=I.INTEL_EMR_HOST).values == (0x0,)


# -- FXSAVE / FXRSTOR without REX.W (FXSAVE32, FXRSTOR32) -------------------------------------


def _x87_image(fip: int, fdp: int, fsw: int = 0, fcw: int = 0x037F) -> bytes:
    out = bytearray(4096)
    struct.pack_into("<HHBBHQQ", out, 0, fcw, fsw, 0, 0, 0x55, fip, fdp)
    struct.pack_into("<I", out, 24, 0x1F80)
    struct.pack_into("<Q", out, 512, 0x1)
    return bytes(out)


def _legacy32(fip: int, fcs: int, fdp: int, fds: int) -> bytes:
    out = bytearray(_x87_image(0, 0)[:512])
    struct.pack_into("<IHHIHH", out, 8, fip, fcs, 0xAAAA, fdp, fds, 0xBBBB)
    return bytes(out)


def test_fxsave32_stores_32_bit_pointers_and_zero_selectors_where_deprecated() -> None:
    """Sapphire Rapids (CPUID.(EAX=07H,ECX=0):EBX[13], FCS/FDS deprecated): FXSAVE without
    REX.W stores FIP[31:0] at 8, FCS 0000H and two zero bytes, FDP[31:0] at 16, FDS 0000H and
    two zero bytes (as measured on Emerald Rapids)."""
    p = Program(_x87_image(0x1122334455667788, 0x99AABBCCDDEEFF00),
                (Insn("FXSAVE32", buf=0),), (Buffer(),))
    (o,) = run_program(load_profile("sapphire-rapids"), p, preempt=False)
    assert struct.unpack_from("<HIHHIHH", o.buffers[0], 6) == (0x55, 0x55667788, 0, 0,
                                                               0xDDEEFF00, 0, 0)


def test_fxrstor32_zero_extends_the_pointers_and_ignores_deprecated_selectors() -> None:
    """FXRSTOR without REX.W loads FIP and FDP from their 32-bit offsets, zero-extended (the
    64-bit FXSAVE after it shows FIP 0x11223344, not the start image's upper half); where FCS
    and FDS are deprecated, the selectors in memory are not kept."""
    p = Program(_x87_image(0x1122334455667788, 0xDEADBEEFCAFE0000),
                (Insn("FXRSTOR32", buf=0), Insn("FXSAVE", buf=1), Insn("FXSAVE32", buf=2)),
                (Buffer(data=_legacy32(0x11223344, 0x55, 0x66778899, 0x77)), Buffer(),
                 Buffer()))
    (o,) = run_program(load_profile("sapphire-rapids"), p, preempt=False)
    assert struct.unpack_from("<QQ", o.buffers[1], 8) == (0x11223344, 0x66778899)
    assert struct.unpack_from("<IHHIHH", o.buffers[2], 8) == (0x11223344, 0, 0, 0x66778899, 0, 0)


def test_fxsave32_where_selectors_are_kept() -> None:
    """Zen 4 does not deprecate FCS/FDS, and saves FIP, FDP and the selectors only with an
    unmasked exception pending (X87_POINTERS "when-es"): without one the whole pointer area is
    zero; with one, the selectors an FXRSTOR32 loaded come back. The 64-bit restore of the
    start image leaves them zero (X87_SELECTORS_LOAD64, measured on Zen 4)."""
    zen4 = load_profile("zen4")
    quiet = Program(_x87_image(0x11223344, 0x55667788), (Insn("FXSAVE32", buf=0),), (Buffer(),))
    (o,) = run_program(zen4, quiet, preempt=False)
    assert o.buffers[0][6:24] == bytes(18)
    # FSW.ES with ZE set and unmasked (FCW 0x37B): an exception pending.
    pending = _x87_image(0x11223344, 0x55667788, fsw=0x0084, fcw=0x037B)
    loaded = bytearray(_legacy32(0x0A0B0C0D, 0x23, 0x01020304, 0x2B))
    struct.pack_into("<HH", loaded, 0, 0x037B, 0x0084)
    p = Program(pending, (Insn("FXRSTOR32", buf=0), Insn("FXSAVE32", buf=1)),
                (Buffer(data=bytes(loaded)), Buffer()))
    (o,) = run_program(zen4, p, preempt=False)
    assert struct.unpack_from("<IHHIHH", o.buffers[1], 8) == (0x0A0B0C0D, 0x23, 0, 0x01020304,
                                                              0x2B, 0)
    (o,) = run_program(zen4, Program(pending, (Insn("FXSAVE32", buf=0),), (Buffer(),)),
                       preempt=False)
    assert struct.unpack_from("<IHHIHH", o.buffers[0], 8) == (0x11223344, 0, 0, 0x55667788,
                                                              0, 0)
    with pytest.raises(UnknownPointers, match="FCS/FDS"):
        run_program(zen4, Program(pending, (Insn("FXSAVE32", buf=0),), (Buffer(),)),
                    impl=I.AMD_ZEN4_HOST.with_choice(I.X87_SELECTORS_LOAD64, "kept"))


def test_x87_instructions_leave_their_selectors_in_fcs_and_fds_on_zen4() -> None:
    """SDM Vol. 1 8.1.8 on Zen 4 (measured, session 31): an FLD m80 that incurs an unmasked
    stack overflow leaves FCS := its CS and FDS := its DS, which the runner's placement names
    (0x33 and 0 for a 64-bit Linux task); FLD1 and FLDZ, which have no memory operand, keep FDP
    and FDS (X87_NO_OPERAND_FDP "kept"). Without the selectors in the placement the model
    cannot answer the 32-bit save (UnknownPointers); with X87_NO_OPERAND_FDP "undefined" it
    cannot answer any save after FLD1."""
    zen4 = load_profile("zen4")
    full = bytearray(_legacy32(0x1111, 0x23, 0x2222, 0x2B))
    struct.pack_into("<HHB", full, 0, 0x037E, 0x8081, 0xFF)  # all tags valid, IE pending
    at = (Placement(0x1000), Placement(0x2000), Placement(0x3000, 0x4000, 0x3AB, 0x33, 0),
          Placement(0x5000))
    fld = Program(_x87_image(0, 0), (Insn("FXRSTOR32", buf=0), Insn("FNCLEX"),
                                     Insn("FLD", data=bytes(10)), Insn("FXSAVE32", buf=1)),
                  (Buffer(data=bytes(full)), Buffer()))
    (o,) = run_program(zen4, fld, preempt=False, placement=at)
    assert struct.unpack_from("<HIHHIHH", o.buffers[1], 6) == (0x3AB, 0x3000, 0x33, 0, 0x4000,
                                                               0, 0)
    one = Program(fld.start, (*fld.insns[:2], Insn("FLD1"), fld.insns[3]), fld.buffers)
    at1 = (*at[:2], Placement(0x3000, 0, 0x1E8, 0x33, 0), at[3])
    (o,) = run_program(zen4, one, preempt=False, placement=at1)
    assert struct.unpack_from("<HIHHIHH", o.buffers[1], 6) == (0x1E8, 0x3000, 0x33, 0, 0x2222,
                                                               0x2B, 0)
    with pytest.raises(UnknownPointers, match="FCS/FDS"):
        run_program(zen4, fld, preempt=False,
                    placement=(*at[:2], Placement(0x3000, 0x4000, 0x3AB), at[3]))
    with pytest.raises(UnknownPointers, match="FIP/FDP"):
        run_program(zen4, one, preempt=False, placement=at1,
                    impl=I.AMD_ZEN4_HOST.with_choice(I.X87_NO_OPERAND_FDP, "undefined"))


@pytest.mark.parametrize("init", ["FNINIT", "XRSTOR32", "XRSTOR"])
def test_x87_initialisation_zeroes_fcs_and_fds_on_zen4(init: str) -> None:
    """FNINIT ("FPUDataPointer <- 0"), and XRSTOR with RFBM[0] = 1 and XSTATE_BV[0] = 0 (x87's
    initial configuration, SDM Vol. 1 13.6: FCS = FDS = 0), in either form, zero the selectors
    an FXRSTOR32 loaded (measured on Zen 4, session 32): FLD1, which keeps FDS there, then
    leaves FDS 0 for the 32-bit save. Nine FLD1 overflow the empty stack with IE masked, and an
    FLDCW that unmasks IE sets FSW.ES, so that the save shows the pointers."""
    zen4 = load_profile("zen4")
    insns = (Insn("FXRSTOR32", buf=0),
             Insn("FNINIT") if init == "FNINIT" else Insn(init, buf=2, mask=1),
             *[Insn("FLD1")] * 9, Insn("FLDCW", value=0x37E), Insn("FXSAVE32", buf=1))
    at = tuple(Placement(0x1000 * (n + 1), 0, 0x1E8 if i.mnemonic == "FLD1" else 0, 0x33, 0)
               for n, i in enumerate(insns))
    p = Program(_x87_image(0, 0), insns, (Buffer(data=_legacy32(0x1111, 0x23, 0x2222, 0x2B)),
                                          Buffer(), Buffer(data=image(0))))
    (o,) = run_program(zen4, p, preempt=False, placement=at)
    assert struct.unpack_from("<HHBxHIHHIHH", o.buffers[1], 0) == (
        0x37E, 0xBAC1, 0xFF, 0x1E8, 0xB000, 0x33, 0, 0, 0, 0)


def test_loads_of_registers_8_to_15_hold_xinuse_until_an_avx_restore_on_intel() -> None:
    """VEX_XINUSE_RECOMPUTED, refined in session 21 (measured on Emerald Rapids, each 4 runs
    of 4): a MOVDQU of xmm8-15 from the initial state sets XINUSE[1] as a VEX.256 load of
    ymm8-15 does, and an XRSTOR that loads AVX state with the registers zero clears it; a load
    of one of registers 0-7 makes it stay (xmm3, xmm0 and xmm1, ymm3), a second load of 8-15
    does not; a MOVDQU that leaves xmm10 non-zero keeps it set by value. The registers count
    as zero before the restore or after it."""
    emr = I.INTEL_EMR_HOST

    def x(reg: int, n: int = 0) -> Insn:
        return Insn("MOVDQU", reg=reg, data=bytes([n]) * 16)

    def y(reg: int) -> Insn:
        return Insn("VMOVDQU", reg=reg, data=bytes(32))

    def xinuse(*insns: Insn) -> int:
        prog = Program(image(0), (*insns, Insn("XRSTOR", buf=0, mask=0x4),
                                  Insn("XGETBV", reg=1)), (Buffer(image(0x4)),))
        return one(SPR, prog, impl=emr).values[-1]

    assert xinuse(x(10)) == 0x4
    assert xinuse(x(10), x(11)) == 0x4
    assert xinuse(x(10, 1), x(10)) == 0x4
    assert xinuse(x(10), y(10)) == 0x4
    assert xinuse(x(10, 1)) == 0x6
    assert xinuse(x(3)) == 0x6
    assert xinuse(x(0), x(1)) == 0x6
    assert xinuse(x(10), x(3)) == 0x6
    assert xinuse(y(10), y(3)) == 0x6
    assert xinuse(x(10), y(3)) == 0x6
    # AVX in use from the start image with ymm10's upper half non-zero: the XRSTOR of zero
    # AVX state leaves YMM0-15 zero, and that counts as well as zero registers before it.
    upper = Program(image(0x4, patch=[(576 + 160, bytes([1]) * 16)]),
                    (x(10), Insn("XRSTOR", buf=0, mask=0x4), Insn("XGETBV", reg=1)),
                    (Buffer(image(0x4)),))
    assert one(SPR, upper, impl=emr).values[-1] == 0x4


def test_the_xsave_family_without_rex_w_shares_fxsave32s_legacy_area() -> None:
    """XSAVE, XSAVEOPT and XSAVEC without REX.W store the legacy area as FXSAVE32 does (FIP and
    FDP 32-bit, FCS and FDS 0000H where deprecated), and XRSTOR without REX.W loads it as
    FXRSTOR32 does (zero-extended): measured on Emerald Rapids, the model on Sapphire Rapids."""
    spr = load_profile("sapphire-rapids")
    start = _x87_image(0x1122334455667788, 0x99AABBCCDDEEFF00)
    for mn in ("XSAVE32", "XSAVEOPT32", "XSAVEC32"):
        (o,) = run_program(spr, Program(start, (Insn(mn, buf=0, mask=0x3),), (Buffer(),)),
                           preempt=False)
        assert struct.unpack_from("<IHHIHH", o.buffers[0], 8) == (0x55667788, 0, 0,
                                                                  0xDDEEFF00, 0, 0), mn
    loaded = bytearray(_x87_image(0, 0))
    loaded[:512] = _legacy32(0x11223344, 0x55, 0x66778899, 0x77)
    p = Program(start, (Insn("XRSTOR32", buf=0, mask=0x3), Insn("FXSAVE", buf=1)),
                (Buffer(data=bytes(loaded)), Buffer()))
    (o,) = run_program(spr, p, preempt=False)
    assert struct.unpack_from("<QQ", o.buffers[1], 8) == (0x11223344, 0x66778899)
