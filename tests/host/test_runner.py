"""The real-CPU runner: instruction programs executed on this CPU, byte-level checks.

Every test states an architectural fact (SDM Vol. 1 ch. 13, Vol. 2 instruction pages) and runs
it on the host; where the host lacks the feature the test skips with the CPUID bit it lacks.
"""

from __future__ import annotations

import signal
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fpstate.errors import HostUnavailable, ProgramError
from fpstate.host import native
from fpstate.x86.program import BUFFER_SIZE, Buffer, Insn, Program, xstate_bv

pytestmark = pytest.mark.host

if not native.is_x86_64():
    pytest.skip("the host is not x86-64", allow_module_level=True)

from fpstate.host.runner import (  # noqa: E402
    fault_vector,
    host_lacks,
    host_supports,
    host_xsave,
    run_program,
)

try:
    HOST = host_xsave()
except HostUnavailable as e:  # pragma: no cover - only on CPUs without OS-enabled XSAVE
    pytest.skip(str(e), allow_module_level=True)


def need(*mnemonics: str) -> None:
    for m in mnemonics:
        reason = host_lacks(m)
        if reason:
            pytest.skip(reason)


def need_xcr0(mask: int, what: str) -> None:
    if HOST.xcr0 & mask != mask:
        pytest.skip(f"host XCR0 {HOST.xcr0:#x} lacks {what} ({mask:#x})")


def image(bv: int = 0, comps: dict[int, bytes] | None = None, mxcsr: int = 0x1F80) -> bytes:
    """A standard image of the host's size: FCW 0x37F, MXCSR, XSTATE_BV, bytes at offsets."""
    b = bytearray(HOST.size)
    struct.pack_into("<H", b, 0, 0x037F)
    struct.pack_into("<I", b, 24, mxcsr)
    struct.pack_into("<Q", b, 512, bv)
    for at, data in (comps or {}).items():
        b[at:at + len(data)] = data
    return bytes(b)


def run(insns: list[Insn], buffers: tuple[Buffer, ...] = (), start: bytes | None = None):
    return run_program(Program(start or image(), tuple(insns), buffers))


def offset(component: int) -> int:
    return HOST.offsets[component][0]


def test_movdqu_values_appear_in_xsave_at_160_plus_16i() -> None:
    need("MOVDQU", "XSAVE")
    regs = {i: bytes([i + 1]) * 8 + bytes([0xF0 | i]) * 8 for i in (0, 7, 8, 15)}
    out = run([Insn("MOVDQU", reg=i, data=d) for i, d in regs.items()]
              + [Insn("XSAVE", buf=0, mask=HOST.xcr0)], (Buffer(),))
    assert out.fault is None
    for i, d in regs.items():
        assert out.buffers[0][160 + 16 * i:176 + 16 * i] == d
    assert xstate_bv(out.buffers[0]) & 0x2
    assert out.final[160 + 16 * 7:176 + 16 * 7] == regs[7]


def test_vmovdqu64_zmm17_lands_in_hi16_zmm_at_the_cpuid_offset() -> None:
    need("VMOVDQU64", "XSAVE")
    data = bytes(range(64))
    out = run([Insn("VMOVDQU64", reg=17, data=data), Insn("XSAVE", buf=0, mask=HOST.xcr0)],
              (Buffer(),))
    at = offset(7) + 64  # zmm16 is the first 64 bytes of Hi16_ZMM
    assert out.buffers[0][at:at + 64] == data
    assert xstate_bv(out.buffers[0]) & HOST.xcr0 == 0x80
    assert out.final[at:at + 64] == data
    if HOST.xgetbv1:
        assert out.xinuse == 0x80


def test_vzeroupper_clears_avx_from_xstate_bv() -> None:
    need("VMOVDQU", "VZEROUPPER", "XSAVE")
    out = run([Insn("VMOVDQU", reg=3, data=b"\x5a" * 32), Insn("XSAVE", buf=0, mask=HOST.xcr0),
               Insn("VZEROUPPER"), Insn("XSAVE", buf=1, mask=HOST.xcr0)], (Buffer(), Buffer()))
    assert xstate_bv(out.buffers[0]) & 0x4
    assert not xstate_bv(out.buffers[1]) & 0x4
    assert not xstate_bv(out.final) & 0x4
    # XMM3 (SSE state) survives VZEROUPPER; the upper half is gone
    assert out.final[160 + 48:176 + 48] == b"\x5a" * 16
    assert out.final[offset(2) + 48:offset(2) + 64] == bytes(16)


@pytest.mark.parametrize("misalign", [8, 16, 32])
def test_misaligned_xsave_is_gp_at_that_step(misalign: int) -> None:
    need("XSAVE", "STMXCSR")
    out = run([Insn("STMXCSR"), Insn("XSAVE", buf=0, mask=HOST.xcr0), Insn("STMXCSR")],
              (Buffer(data=b"\xaa" * 64, misalign=misalign),))
    assert out.fault is not None and out.fault.vector == "#GP"
    assert out.fault_step == 1
    assert out.values == (0x1F80,)  # the value of step 0, nothing after the fault
    assert out.buffers[0][:64] == b"\xaa" * 64  # the faulting XSAVE wrote nothing
    assert out.xinuse is None and out.final is None


def test_fxsave_needs_16_byte_alignment_only() -> None:
    need("FXSAVE")
    assert run([Insn("FXSAVE", buf=0)], (Buffer(misalign=16),)).fault is None
    out = run([Insn("FXSAVE", buf=0)], (Buffer(misalign=8),))
    assert out.fault is not None and out.fault.vector == "#GP" and out.fault_step == 0


def test_xsetbv_xsaves_xrstors_at_cpl3_are_gp() -> None:
    need("XSETBV")
    out = run([Insn("XGETBV", reg=0), Insn("XSETBV", reg=0, value=HOST.xcr0)])
    assert out.values == (HOST.xcr0,)
    assert out.fault is not None and out.fault.vector == "#GP" and out.fault_step == 1
    need("XSAVES")
    for m in ("XSAVES", "XRSTORS"):
        out = run([Insn(m, buf=0, mask=HOST.xcr0)], (Buffer(image()),))
        assert out.fault is not None and out.fault.vector == "#GP", m


def test_ldmxcsr_with_a_reserved_bit_is_gp() -> None:
    need("LDMXCSR", "STMXCSR", "FXSAVE")
    # MXCSR_MASK from FXSAVE names the writable bits; bit 31 is reserved on every CPU
    out = run([Insn("FXSAVE", buf=0), Insn("LDMXCSR", value=0x1F80 | 1 << 31), Insn("STMXCSR")],
              (Buffer(),))
    assert out.fault is not None and out.fault.vector == "#GP" and out.fault_step == 1
    mask = struct.unpack_from("<I", out.buffers[0], 28)[0] or 0xFFBF
    assert not mask >> 31
    ok = run([Insn("LDMXCSR", value=0x1F80 ^ 0x1000), Insn("STMXCSR")])  # unmask #PE: bit 12
    assert ok.fault is None and ok.values == (0x0F80,)


def test_xrstor_with_xstate_bv_outside_xcr0_is_gp() -> None:
    need("XRSTOR")
    outside = next(b for b in range(63) if not HOST.xcr0 >> b & 1)
    for mask in (HOST.xcr0, 0x2, 0):  # checked against XCR0, not against RFBM
        bad = image(0x2 | 1 << outside, {160: b"\x01" * 16})
        out = run([Insn("XRSTOR", buf=0, mask=mask)], (Buffer(bad),))
        assert out.fault is not None and out.fault.vector == "#GP" and out.fault_step == 0, mask


def test_xrstor_standard_form_rejects_nonzero_xcomp_bv_but_ignores_header_bytes_24_63() -> None:
    need("XRSTOR")
    good = bytearray(image(0x2, {160: b"\x01" * 16}))
    bad = bytearray(good)
    bad[520] = 1  # XCOMP_BV = 1, bit 63 clear: standard form with bytes 23:8 not zero
    out = run([Insn("XRSTOR", buf=0, mask=HOST.xcr0)], (Buffer(bytes(bad)),))
    assert out.fault is not None and out.fault.vector == "#GP"
    good[512 + 40] = 0xFF
    good[470] = 0xFF  # bytes 464-511 are software-available
    out = run([Insn("XRSTOR", buf=0, mask=HOST.xcr0)], (Buffer(bytes(good)),))
    assert out.fault is None


def test_xgetbv1_after_start_image_is_its_xstate_bv_for_non_init_values() -> None:
    need("XGETBV")
    if not HOST.xgetbv1:
        pytest.skip("host lacks XGETBV1: CPUID.(EAX=0xd,ECX=1):EAX[2]=0")
    comps = {0: struct.pack("<H", 0x027F), 160: b"\x11" * 16}
    for c in (2, 5, 6, 7):
        if c in HOST.offsets:
            comps[offset(c)] = b"\x22" * 8
    if 9 in HOST.offsets:  # PKRU 0x55555554: not initial, key 0's rights kept (progen)
        comps[offset(9)] = bytes.fromhex("54555555")
    for bv in (0x1, 0x2, 0x3, HOST.xcr0 & 0xE6, HOST.xcr0):
        out = run([Insn("XGETBV", reg=1)], start=image(bv, comps))
        assert out.values == (bv,) and out.xinuse == bv, hex(bv)


def test_values_are_in_program_order() -> None:
    need("XGETBV", "STMXCSR", "FNSTCW", "FNSTSW", "FLDCW", "LDMXCSR")
    out = run([Insn("FNSTCW"), Insn("LDMXCSR", value=0x1FC0), Insn("STMXCSR"),
               Insn("FLDCW", value=0x027F), Insn("FNSTCW"), Insn("XGETBV", reg=0),
               Insn("FNSTSW")])
    assert out.values == (0x037F, 0x1FC0, 0x027F, HOST.xcr0, 0)
    assert struct.unpack_from("<H", out.final, 0)[0] == 0x027F
    assert struct.unpack_from("<I", out.final, 24)[0] == 0x1FC0


def test_final_image_is_normalised_and_xinuse_read() -> None:
    need("XSAVE")
    # garbage at the AVX offset with XSTATE_BV[2] = 0: XRSTOR puts AVX in its init state
    out = run([], start=image(0x2, {160: b"\x01" * 16, offset(2): b"\xee" * 32}))
    assert out.final is not None and len(out.final) == HOST.size
    assert out.final[offset(2):offset(2) + 256] == bytes(256)
    assert out.final[160:176] == b"\x01" * 16
    assert out.final[0:2] == b"\x7f\x03"
    if HOST.xgetbv1:
        assert out.xinuse == 0x2


def test_instruction_the_host_lacks_is_ud_and_host_lacks_names_the_bit() -> None:
    for m in ("TILERELEASE", "RDPKRU"):
        reason = host_lacks(m)
        if reason is None:
            continue
        assert reason.startswith("host ") and ("CPUID" in reason or "XCR0" in reason), reason
        out = run([Insn("STMXCSR"), Insn(m)])
        assert out.fault is not None and out.fault.vector == "#UD" and out.fault_step == 1
        return
    pytest.skip("host has both AMX and PKU: no instruction of the program set is missing")


def test_host_supports_the_baseline() -> None:
    for m in ("FXSAVE", "MOVDQU", "FLD", "FNSTSW", "XSAVE", "XGETBV"):
        assert host_supports(m), m
    with pytest.raises(ProgramError):
        host_lacks("XYZZY")


def test_cpl0_needs_a_guest() -> None:
    with pytest.raises(HostUnavailable, match="CPL 0 needs a KVM guest"):
        run_program(Program(image(), (), cpl=0))


def test_start_image_the_cpu_rejects_is_a_program_error() -> None:
    bad = bytearray(image())
    bad[520] = 1
    with pytest.raises(ProgramError, match="start image rejected"):
        run_program(Program(bytes(bad), (Insn("FNINIT"),)))


def test_fork_and_vfork_children_agree() -> None:
    need("MOVDQU", "XSAVEC", "XGETBV")
    prog = Program(image(0x2, {160: b"\x42" * 16}), (
        Insn("MOVDQU", reg=9, data=b"\x09" * 16), Insn("XSAVEC", buf=0, mask=HOST.xcr0),
        Insn("XGETBV", reg=1), Insn("XSAVE", buf=1, mask=HOST.xcr0),
        Insn("XSAVE", buf=2, mask=HOST.xcr0)), (Buffer(), Buffer(), Buffer(misalign=1)))
    a, b = run_program(prog, "vfork"), run_program(prog, "fork")
    assert a.key() == b.key()
    assert a.fault_step == 4 and a.fault is not None and a.fault.vector == "#GP"
    assert len(a.buffers) == 3 and all(len(x) == BUFFER_SIZE for x in a.buffers)


def test_fault_vector_from_signal_frame() -> None:
    assert fault_vector(signal.SIGSEGV, 0x80, 13) == "#GP"
    assert fault_vector(signal.SIGILL, 2, 6) == "#UD"  # ILL_ILLOPN: do_error_trap for #UD
    assert fault_vector(signal.SIGILL, 1, 0) == "#NM"  # ILL_ILLOPC: handle_xfd_event, -EPERM
    assert fault_vector(signal.SIGFPE, 7, 16) == "#MF"
    assert fault_vector(signal.SIGFPE, 7, 19) == "#XM"
    assert fault_vector(signal.SIGBUS, None, None) == "#GP"


def test_pending_unmasked_x87_exception_is_mf_at_the_next_waiting_instruction() -> None:
    need("FLD", "FNSTSW")
    # FCW 0x37E unmasks #IE; FSW 0x81 = IE | ES: the exception is pending after XRSTOR
    start = image(0x1, {0: struct.pack("<HH", 0x037E, 0x0081)})
    out = run([Insn("FNSTSW"), Insn("FLD", data=bytes(10))], start=start)
    assert out.values[0] & 0x81 == 0x81
    assert out.fault is not None and out.fault.vector == "#MF" and out.fault_step == 1


def test_wrpkru_rdpkru_and_pkru_in_xsave() -> None:
    need("WRPKRU", "RDPKRU", "XSAVE")
    need_xcr0(1 << 9, "PKRU state")
    out = run([Insn("WRPKRU", value=0x55555554), Insn("RDPKRU"),
               Insn("XSAVE", buf=0, mask=HOST.xcr0), Insn("WRPKRU", value=1 << 32)], (Buffer(),))
    assert out.values == (0x55555554,)
    assert struct.unpack_from("<I", out.buffers[0], offset(9))[0] == 0x55555554
    assert out.fault is not None and out.fault.vector == "#GP" and out.fault_step == 3  # EDX != 0


def test_amx_tile_config_round_trip_and_tileloadd_row() -> None:
    need("LDTILECFG", "STTILECFG", "TILELOADD", "XSAVE")
    cfg = bytearray(64)
    cfg[0] = 1  # palette 1
    struct.pack_into("<H", cfg, 16, 8)  # tmm0: 8 bytes per row
    cfg[48] = 2  # tmm0: 2 rows
    rows = bytes(range(1, 9)) + bytes(range(9, 17))
    out = run([Insn("LDTILECFG", data=bytes(cfg)), Insn("STTILECFG", buf=0),
               Insn("TILELOADD", reg=0, data=rows), Insn("XSAVE", buf=1, mask=HOST.xcr0)],
              (Buffer(), Buffer()))
    assert out.fault is None
    assert out.buffers[0][:64] == bytes(cfg)
    tiles = offset(18)
    assert out.buffers[1][tiles:tiles + 8] == rows[:8]  # row 0 of tmm0
    assert out.buffers[1][tiles + 64:tiles + 72] == rows[8:]  # row 1, 64 bytes further


def test_amx_tilestored_writes_rows_at_the_configured_stride() -> None:
    need("LDTILECFG", "TILELOADD", "TILESTORED")
    cfg = bytearray(64)
    cfg[0] = 1  # palette 1
    struct.pack_into("<H", cfg, 16 + 2 * 3, 12)  # tmm3: 12 bytes per row
    cfg[48 + 3] = 3  # tmm3: 3 rows
    rows = bytes(range(1, 37))
    out = run([Insn("LDTILECFG", data=bytes(cfg)), Insn("TILELOADD", reg=3, data=rows),
               Insn("TILESTORED", buf=0, reg=3)], (Buffer(b"\xaa" * 64),))
    assert out.fault is None
    assert out.buffers[0][:36] == rows and out.buffers[0][36:64] == b"\xaa" * 28


def test_tilestored_without_amx_is_ud_at_its_step() -> None:
    """Where the host lacks AMX the whole TILESTORED sequence (STTILECFG for the stride, then
    the store) faults #UD at the TILESTORED's step, and the buffer is untouched."""
    reason = host_lacks("TILESTORED")
    if reason is None:
        pytest.skip("host has AMX: TILESTORED executes (test_amx_tilestored_...)")
    out = run([Insn("STMXCSR"), Insn("TILESTORED", buf=0, reg=0)], (Buffer(b"\xaa" * 64),))
    assert (out.fault.vector, out.fault_step) == ("#UD", 1) and out.values == (0x1F80,)
    assert out.buffers[0][:64] == b"\xaa" * 64


_LOADS = st.one_of(
    st.tuples(st.just("MOVDQU"), st.integers(0, 15), st.binary(min_size=16, max_size=16)),
    st.tuples(st.just("VMOVDQU"), st.integers(0, 15), st.binary(min_size=32, max_size=32)),
    st.tuples(st.just("VMOVDQU64"), st.integers(0, 31), st.binary(min_size=64, max_size=64)),
    st.tuples(st.just("KMOVQ"), st.integers(0, 7), st.binary(min_size=8, max_size=8)),
)


@settings(max_examples=40, deadline=None)
@given(st.lists(_LOADS, max_size=12))
def test_register_loads_land_where_the_standard_layout_says(loads) -> None:
    """A tiny register-file model: legacy MOVDQU keeps bits 511:128, VEX.256 zeroes 511:256
    (SDM Vol. 1 14.1.3 / 15.5), and every byte is found at its standard offset in the final
    image (XMM at 160 + 16i, YMM_H at AVX + 16i, ZMM_H at ZMM_Hi256 + 32i, ZMM16-31 at
    Hi16_ZMM + 64(i - 16), k at opmask + 8i)."""
    need("MOVDQU", "VMOVDQU", "VMOVDQU64", "KMOVQ")
    zmm = [bytearray(64) for _ in range(32)]
    k = [bytes(8) for _ in range(8)]
    for m, reg, data in loads:
        if m == "MOVDQU":
            zmm[reg][:16] = data
        elif m == "VMOVDQU":
            zmm[reg][:] = data + bytes(32)
        elif m == "VMOVDQU64":
            zmm[reg][:] = data
        else:
            k[reg] = data
    out = run([Insn(m, reg=r, data=d) for m, r, d in loads])
    f = out.final
    assert out.fault is None and f is not None
    for i in range(16):
        assert f[160 + 16 * i:176 + 16 * i] == zmm[i][:16], f"xmm{i}"
        assert f[offset(2) + 16 * i:offset(2) + 16 * i + 16] == zmm[i][16:32], f"ymm{i}_h"
        assert f[offset(6) + 32 * i:offset(6) + 32 * i + 32] == zmm[i][32:], f"zmm{i}_h"
        assert f[offset(7) + 64 * i:offset(7) + 64 * i + 64] == zmm[16 + i], f"zmm{16 + i}"
    for i in range(8):
        assert f[offset(5) + 8 * i:offset(5) + 8 * i + 8] == k[i], f"k{i}"
