"""The arm64 FP regsets (fpstate.kernel.arm64.ptrace) against arch/arm64/kernel/ptrace.c and
fpsimd.c (v6.17): sizes and offsets from the uapi macros, GETREGSET of each thread state,
SETREGSET's errors with their errno, and what a write leaves in the thread."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fpstate.arm64.cpu import load_profile
from fpstate.arm64.regs import sve_regs_size
from fpstate.kernel.arm64 import ptrace as pt
from fpstate.kernel.arm64.state import FP_STATE_SVE, HostCaps
from fpstate.tools.blob_arm64 import target_for

FVP = HostCaps.from_profile(load_profile("fvp-aem-fpmr"))  # SVE and SME VLs 16/32/64, SME2, FPMR
V1 = HostCaps.from_profile(load_profile("neoverse-v1"))  # SVE VLs 16 and 32, no SME
N1 = HostCaps.from_profile(load_profile("neoverse-n1"))  # no SVE


def _header(blob: bytes) -> tuple[int, ...]:
    return struct.unpack_from("<IIHHHH", blob)


def _pattern(n: int, seed: int) -> bytes:
    return bytes((seed + 7 * i) & 0xFF for i in range(n))


def test_regset_sizes_are_those_of_aarch64_regsets() -> None:
    # .n = DIV_ROUND_UP(SVE_PT_SIZE(16, SVE_PT_REGS_SVE), 16): 8768 bytes at VQ 16.
    assert pt.REGSETS[pt.NT_ARM_SVE] == (548, 16)
    assert pt.REGSETS[pt.NT_ARM_SSVE] == (548, 16)
    # ZA_PT_SIZE(16) = 16 + 256 * 256.
    assert pt.REGSETS[pt.NT_ARM_ZA] == (4097, 16)
    assert pt.REGSETS[pt.NT_PRFPREG] == (132, 4)
    assert pt.REGSETS[pt.NT_ARM_ZT] == (1, 64)
    assert pt.REGSETS[pt.NT_ARM_FPMR] == (1, 8)
    assert pt.REGSETS[pt.NT_ARM_TLS] == (2, 8)  # TPIDR_EL0, TPIDR2_EL0
    # enum aarch64_regset: GPR, FPR, TLS, HW_BREAK, HW_WATCH, FPMR, SYSTEM_CALL, SVE, SSVE, ZA,
    # ZT -- the order of a core's notes.
    assert list(pt.REGSETS) == [pt.NT_PRFPREG, pt.NT_ARM_TLS, pt.NT_ARM_FPMR, pt.NT_ARM_SVE,
                                pt.NT_ARM_SSVE, pt.NT_ARM_ZA, pt.NT_ARM_ZT]


def test_sve_get_of_a_thread_that_never_used_sve_is_fpsimd_format() -> None:
    t = pt.RegsetTarget.fresh(V1)
    blob = pt.regset_get(V1, t, pt.NT_ARM_SVE)
    # size = SVE_PT_FPSIMD_OFFSET + sizeof(user_fpsimd_state); max_size = SVE_PT_SIZE(2, SVE).
    assert _header(blob) == (544, 1136, 32, 32, pt.SVE_PT_REGS_FPSIMD, 0)
    assert len(blob) == 544


def test_sve_get_of_sve_format_state_places_p_ffr_and_fpsr() -> None:
    t = target_for(V1, sve_vl=32, sve_format=True)
    t = replace(t, sve=_pattern(len(t.sve), 1), fpsr=0x0800009F, fpcr=0x03C00000)
    blob = pt.regset_get(V1, t, pt.NT_ARM_SVE)
    assert _header(blob) == (1136, 1136, 32, 32, pt.SVE_PT_REGS_SVE, 0)
    assert blob[16:16 + 1092] == t.sve  # Z0-31 (1024), P0-15 (64), FFR (4)
    assert blob[16 + 1092:1120] == bytes(12)  # zero padding to SVE_PT_SVE_FPSR_OFFSET(2)
    assert struct.unpack_from("<II", blob, 1120) == (0x0800009F, 0x03C00000)
    assert blob[1128:] == bytes(8)  # to the 16-byte aligned size


def test_ssve_of_a_non_streaming_thread_is_a_size_8_header_then_fpsimd() -> None:
    """v6.17: the inactive mode's header says size 8 (sizeof a pointer) and FPSIMD format,
    and sve_get_common()'s header-only return (size == 16) does not fire, so the effective
    V0-V31, FPSR and FPCR follow -- what the kernel's fp-ptrace selftest checks."""
    t = replace(pt.RegsetTarget.fresh(FVP), fp_type=FP_STATE_SVE, fpsr=0x10, fpcr=0x400000)
    vl = t.sve_vl
    t = replace(t, sve=_pattern(sve_regs_size(vl // 16), 5))  # Z at the SVE VL
    blob = pt.regset_get(FVP, t, pt.NT_ARM_SSVE)
    # max_size from the SME maximum VL (64); flags FPSIMD (0) although the state is SVE format
    assert _header(blob) == (8, pt.sve_pt_size(4, 1), FVP.sme_vl.default_vl, 64, 0, 0)
    assert len(blob) == 16 + 528
    assert blob[16:32] == t.sve[:16]  # V0: the low 128 bits of Z0
    assert blob[16 + 31 * 16:16 + 512] == t.sve[31 * vl:31 * vl + 16]  # V31
    assert struct.unpack_from("<IIII", blob, 16 + 512) == (0x10, 0x400000, 0, 0)


def test_sve_of_a_streaming_thread_carries_the_streaming_v_registers() -> None:
    """NT_ARM_SVE while PSTATE.SM is set: the size-8 header at the SVE VL, then V0-V31 from
    the streaming Z registers (laid out at the SME VL)."""
    t = replace(pt.RegsetTarget.fresh(FVP), sme_vl=64, sm=True, fp_type=FP_STATE_SVE)
    t = replace(t, sve=_pattern(sve_regs_size(4), 9))
    blob = pt.regset_get(FVP, t, pt.NT_ARM_SVE)
    assert _header(blob)[0::2] == (8, FVP.sve_vl.default_vl, 0)
    assert blob[16 + 16:16 + 32] == t.sve[64:80]  # V1: the low 128 bits of streaming Z1
    streaming = pt.regset_get(FVP, t, pt.NT_ARM_SSVE)
    assert _header(streaming)[0] == pt.sve_pt_size(4, pt.SVE_PT_REGS_SVE)


def test_za_get_reports_max_size_for_the_current_vl() -> None:
    t = target_for(FVP, sme_vl=32, za=True)
    blob = pt.regset_get(FVP, t, pt.NT_ARM_ZA)
    assert _header(blob)[:4] == (16 + 32 * 32, 16 + 32 * 32, 32, 64)
    off = pt.regset_get(FVP, replace(t, za_on=False), pt.NT_ARM_ZA)
    assert _header(off)[:2] == (16, 16 + 32 * 32) and len(off) == 16


def test_zt_reads_as_zero_while_za_is_off() -> None:
    t = replace(target_for(FVP, za=True), zt0=b"\x5a" * 64)
    assert pt.regset_get(FVP, t, pt.NT_ARM_ZT) == b"\x5a" * 64
    assert pt.regset_get(FVP, replace(t, za_on=False), pt.NT_ARM_ZT) == bytes(64)


@pytest.mark.parametrize("note", [pt.NT_PRFPREG, pt.NT_ARM_SVE, pt.NT_ARM_SSVE, pt.NT_ARM_ZA,
                                  pt.NT_ARM_ZT, pt.NT_ARM_FPMR])
def test_setregset_of_getregset_restores_the_registers(note: int) -> None:
    src = target_for(FVP, sve_vl=64, sme_vl=32, streaming=note == pt.NT_ARM_SSVE, za=True,
                     sve_format=True)
    src = replace(src, sve=_pattern(len(src.sve), 3), za=_pattern(len(src.za), 5),
                  zt0=_pattern(64, 9), fpmr=0x3F_0000_0005, fpsr=0x10, fpcr=0x3000000,
                  vregs=_pattern(512, 11))
    blob = pt.regset_get(FVP, src, note)
    dst = target_for(FVP, sve_vl=64, sme_vl=32, za=True)
    r = pt.regset_set(FVP, dst, note, blob)
    assert (r.ret, r.reason) == (0, "")
    assert pt.regset_get(FVP, r.target, note) == blob


def test_iov_len_must_be_a_multiple_of_the_register_size() -> None:
    t = pt.RegsetTarget.fresh(FVP)
    r = pt.regset_set(FVP, t, pt.NT_ARM_SVE, bytes(24))
    assert r.ret == -pt.EINVAL and "multiple of NT_ARM_SVE's register size 16" in r.reason
    assert pt.regset_set(FVP, t, pt.NT_ARM_FPMR, bytes(4)).ret == -pt.EINVAL
    assert pt.regset_set(FVP, t, pt.NT_PRFPREG, bytes(6)).ret == -pt.EINVAL
    # Longer than n * size is cut, not refused.
    assert pt.regset_set(FVP, t, pt.NT_ARM_FPMR, struct.pack("<QQ", 7, 9)).target.fpmr == 7


@pytest.mark.parametrize(("caps", "note", "missing"), [
    (N1, pt.NT_ARM_SVE, "SVE"), (V1, pt.NT_ARM_SSVE, "SME"), (V1, pt.NT_ARM_ZA, "SME"),
    (V1, pt.NT_ARM_ZT, "SME2"), (V1, pt.NT_ARM_FPMR, "FPMR")])
def test_a_regset_of_a_missing_feature_is_einval(caps: HostCaps, note: int,
                                                 missing: str) -> None:
    r = pt.regset_set(caps, pt.RegsetTarget.fresh(caps), note, bytes(64))
    assert r.ret == -pt.EINVAL and missing in r.reason
    with pytest.raises(ValueError, match=missing):
        pt.regset_get(caps, pt.RegsetTarget.fresh(caps), note)


def test_sve_set_header_rules() -> None:
    t = pt.RegsetTarget.fresh(FVP)
    assert pt.regset_set(FVP, t, pt.NT_ARM_SVE, b"").ret == -pt.EINVAL  # count < header
    bad_flags = struct.pack("<IIHHHH", 16, 0, 32, 0, 8, 0)
    r = pt.regset_set(FVP, t, pt.NT_ARM_SVE, bad_flags)
    assert r.ret == -pt.EINVAL and "flags 0x8" in r.reason
    bad_vl = struct.pack("<IIHHHH", 16, 0, 24, 0, 1, 0)
    r = pt.regset_set(FVP, t, pt.NT_ARM_SVE, bad_vl)
    assert r.ret == -pt.EINVAL and "vl 24" in r.reason
    ssve_fpsimd = struct.pack("<IIHHHH", 544, 0, 32, 0, 0, 0) + bytes(528)
    r = pt.regset_set(FVP, t, pt.NT_ARM_SSVE, ssve_fpsimd)
    assert r.ret == -pt.EINVAL and "SVE format" in r.reason


def test_sve_data_for_an_unsupported_vl_is_eio_after_the_vl_changed() -> None:
    # Neoverse V1 implements 16 and 32 bytes: vl 64 is rounded down to 32 and the data's
    # layout no longer fits. sve_set_common() has already set the VL and SVE format.
    t = pt.RegsetTarget.fresh(V1)
    blob = struct.pack("<IIHHHH", 0, 0, 64, 0, pt.SVE_PT_REGS_SVE, 0) + bytes(2208)
    r = pt.regset_set(V1, t, pt.NT_ARM_SVE, blob)
    assert r.ret == -pt.EIO and "vl set is 32" in r.reason
    assert (r.target.sve_vl, r.target.fp_type) == (32, FP_STATE_SVE)
    # The same header without register data only sets the VL.
    r = pt.regset_set(V1, t, pt.NT_ARM_SVE, blob[:16])
    assert (r.ret, r.target.sve_vl) == (0, 32)


def test_vl_onexec_keeps_the_current_vl_so_data_is_eio() -> None:
    t = target_for(FVP, sve_vl=32)
    flags = pt.SVE_PT_REGS_SVE | pt.SVE_PT_VL_ONEXEC
    blob = struct.pack("<IIHHHH", 0, 0, 64, 0, flags, 0) + bytes(2208)
    r = pt.regset_set(FVP, t, pt.NT_ARM_SVE, blob)
    assert r.ret == -pt.EIO and "VL_ONEXEC" in r.reason
    assert (r.target.sve_vl, r.target.sve_vl_onexec) == (32, 64)


def test_fpsimd_write_to_sve_format_state_zero_pads_z_and_clears_p() -> None:
    t = target_for(V1, sve_vl=32, sve_format=True)
    t = replace(t, sve=b"\xff" * len(t.sve))
    vregs = _pattern(512, 2)
    r = pt.regset_set(V1, t, pt.NT_PRFPREG, vregs + struct.pack("<IIII", 1, 2, 0, 0))
    assert r.ret == 0 and r.target.fp_type == FP_STATE_SVE
    z0 = r.target.sve[:32]
    assert z0 == vregs[:16] + bytes(16)  # V0 in Z0[127:0], the rest of Z0 zero
    assert r.target.sve[1024:] == bytes(68)  # P0-P15 and FFR zero
    assert (r.target.fpsr, r.target.fpcr) == (1, 2)


def test_a_short_fpsimd_write_keeps_the_rest() -> None:
    t = replace(pt.RegsetTarget.fresh(V1), vregs=b"\x33" * 512, fpsr=5, fpcr=6)
    r = pt.regset_set(V1, t, pt.NT_PRFPREG, b"\x01" * 16)
    assert r.target.vregs == b"\x01" * 16 + b"\x33" * 496
    assert (r.target.fpsr, r.target.fpcr) == (5, 6)


def test_sve_write_zeroes_fpsr_and_fpcr_without_register_data() -> None:
    # "Always zero V regs, FPSR, and FPCR" of the tracee (stable fix of memset(&current...)).
    t = replace(pt.RegsetTarget.fresh(V1), fpsr=5, fpcr=6, vregs=b"\x44" * 512)
    r = pt.regset_set(V1, t, pt.NT_ARM_SVE, struct.pack("<IIHHHH", 16, 0, 32, 0, 1, 0))
    assert r.ret == 0 and (r.target.fpsr, r.target.fpcr) == (0, 0)
    assert r.target.fp_type == FP_STATE_SVE and r.target.sve == bytes(1092)


def test_ssve_write_enters_streaming_mode_and_sve_write_leaves_it() -> None:
    t = pt.RegsetTarget.fresh(FVP)
    ssve = struct.pack("<IIHHHH", 0, 0, 32, 0, pt.SVE_PT_REGS_SVE, 0)
    r = pt.regset_set(FVP, t, pt.NT_ARM_SSVE, ssve)
    assert r.ret == 0 and r.target.sm and r.target.sme_vl == 32
    r = pt.regset_set(FVP, r.target, pt.NT_ARM_SVE, struct.pack("<IIHHHH", 0, 0, 64, 0, 1, 0))
    assert r.ret == 0 and not r.target.sm and r.target.fp_type == FP_STATE_SVE


def test_za_write_without_data_turns_za_off_and_with_data_on() -> None:
    t = target_for(FVP, sme_vl=32, za=True)
    r = pt.regset_set(FVP, t, pt.NT_ARM_ZA, struct.pack("<IIHHHH", 16, 0, 32, 0, 0, 0))
    assert r.ret == 0 and not r.target.za_on
    data = struct.pack("<IIHHHH", 1040, 0, 32, 0, 0, 0) + b"\x07" * 1024
    r = pt.regset_set(FVP, r.target, pt.NT_ARM_ZA, data)
    assert r.ret == 0 and r.target.za_on and r.target.za == b"\x07" * 1024
    r = pt.regset_set(FVP, r.target, pt.NT_ARM_ZA,
                      struct.pack("<IIHHHH", 0, 0, 64, 0, 0, 0) + bytes(1024))
    # A new SME VL (64) with data laid out for it is taken; data for 64 in a 1040-byte iovec
    # is short but user_regset_copyin() copies what is there.
    assert r.ret == 0 and r.target.sme_vl == 64 and len(r.target.za) == 4096


def test_za_data_for_another_vl_is_eio() -> None:
    t = target_for(FVP, sme_vl=32)
    data = struct.pack("<IIHHHH", 0, 0, 128, 0, 0, 0) + bytes(16)  # 128 > the FVP's 64
    r = pt.regset_set(FVP, t, pt.NT_ARM_ZA, data)
    assert r.ret == -pt.EIO and r.target.sme_vl == 64


def test_zt_write_turns_za_on_with_zt0_only() -> None:
    t = target_for(FVP, sme_vl=32)
    r = pt.regset_set(FVP, t, pt.NT_ARM_ZT, b"\x09" * 64)
    assert r.ret == 0 and r.target.za_on and r.target.zt0 == b"\x09" * 64
    assert r.target.za == bytes(1024)  # sme_alloc(flush): ZA comes up zeroed
    # Even a zero-length write turns PSTATE.ZA on.
    assert pt.regset_set(FVP, t, pt.NT_ARM_ZT, b"").target.za_on


def test_a_new_sme_vl_keeps_sm_and_turns_za_off_a_new_sve_vl_keeps_active_za() -> None:
    # change_live_vector_length() (v6.16+): "Always preserve PSTATE.SM and the effective
    # FPSIMD state, zeroing other SVE state"; only an SME VL change clears PSTATE.ZA.
    t = target_for(FVP, sve_vl=32, sme_vl=32, streaming=True, za=True)
    t = replace(t, sve=_pattern(len(t.sve), 3), za=_pattern(len(t.za), 5), zt0=b"\x09" * 64)
    ret, after = pt.vec_set_vector_length(FVP, t, "SME", 64, 0)
    assert ret == 0 and (after.sm, after.za_on, after.sme_vl) == (True, False, 64)
    assert after.zt0 == bytes(64) and after.fp_type == FP_STATE_SVE
    # Streaming Z re-laid at the new SME VL: V kept in the low 128 bits, the rest zero.
    assert len(after.sve) == sve_regs_size(4) and after.sve[:16] == t.sve[:16]
    assert after.sve[16:64] == bytes(48) and after.sve[64:80] == t.sve[32:48]
    assert after.sve[32 * 64:] == bytes(17 * 8)  # P0-P15 and FFR
    t = target_for(FVP, sve_vl=32, sme_vl=32, za=True)
    ret, after = pt.vec_set_vector_length(FVP, t, "SVE", 64, 0)
    assert ret == 0 and after.za_on and after.sve_vl == 64 and after.za == t.za
    t = target_for(FVP, sve_vl=32, sme_vl=32)
    ret, after = pt.vec_set_vector_length(FVP, t, "SVE", 64, pt.PR_SVE_VL_INHERIT)
    assert (after.sve_vl, after.sve_vl_onexec, after.sve_inherit) == (64, 64, True)


def test_the_vl_change_keeps_v_from_the_low_bits_of_z_and_the_format() -> None:
    t = target_for(V1, sve_vl=32, sve_format=True)
    t = replace(t, sve=_pattern(len(t.sve), 4))
    ret, after = pt.vec_set_vector_length(V1, t, "SVE", 16, 0)
    assert ret == 0 and after.fp_type == FP_STATE_SVE  # not converted to FPSIMD
    assert after.vregs[:16] == t.sve[:16] and after.vregs[16:32] == t.sve[32:48]
    # sve_state at VL 16 is V alone, then P0-P15 and FFR zeroed.
    assert after.sve == after.vregs + bytes(sve_regs_size(1) - 512)
    assert pt.effective_vregs(after) == pt.effective_vregs(t)


@settings(max_examples=300, deadline=None)
@given(note=st.sampled_from(sorted(pt.REGSETS)), data=st.binary(max_size=1200),
       sm=st.booleans(), za=st.booleans())
def test_setregset_never_fails_other_than_with_an_errno(note: int, data: bytes, sm: bool,
                                                        za: bool) -> None:
    t = target_for(FVP, streaming=sm, za=za)
    r = pt.regset_set(FVP, t, note, data)
    assert r.ret in (0, -pt.EINVAL, -pt.EIO)
    assert (r.ret == 0) == (r.reason == "")
    if r.ret == 0:  # and whatever was accepted reads back
        pt.regset_get(FVP, r.target, note)


# -- NT_ARM_TLS: TPIDR_EL0 and SME's TPIDR2_EL0 (tls_get/tls_set) ---------------------------------

TP, TP2 = 0xFFFF_8000_1234_5670, 0xFFFF_C000_0000_1F00


def test_tls_get_reads_tpidr2_only_with_sme() -> None:
    t = replace(pt.RegsetTarget.fresh(FVP), tpidr=TP, tpidr2=TP2)
    assert pt.regset_get(FVP, t, pt.NT_ARM_TLS) == struct.pack("<QQ", TP, TP2)
    # membuf_zero() in place of TPIDR2_EL0 without SME: 16 bytes all the same.
    assert pt.regset_get(N1, replace(t, tpidr2=5), pt.NT_ARM_TLS) == struct.pack("<QQ", TP, 0)


def test_tls_set_writes_from_offset_zero_and_ignores_tpidr2_without_sme() -> None:
    t = replace(pt.RegsetTarget.fresh(FVP), tpidr=1, tpidr2=2)
    short = pt.regset_set(FVP, t, pt.NT_ARM_TLS, struct.pack("<Q", TP))
    assert (short.ret, short.target.tpidr, short.target.tpidr2) == (0, TP, 2)  # TPIDR2 kept
    full = pt.regset_set(FVP, t, pt.NT_ARM_TLS, struct.pack("<QQ", TP, TP2))
    assert (full.target.tpidr, full.target.tpidr2) == (TP, TP2)
    # ptrace_regset() cuts iov_len to n * size = 16: a third word is not read.
    long = pt.regset_set(FVP, t, pt.NT_ARM_TLS, struct.pack("<QQQ", TP, TP2, 9))
    assert long.target == full.target
    odd = pt.regset_set(FVP, t, pt.NT_ARM_TLS, bytes(12))
    assert (odd.ret, odd.target) == (-22, t) and "multiple of NT_ARM_TLS's register size 8" \
        in odd.reason
    n1 = replace(pt.RegsetTarget.fresh(N1), tpidr=1)
    r = pt.regset_set(N1, n1, pt.NT_ARM_TLS, struct.pack("<QQ", TP, TP2))
    assert (r.ret, r.target.tpidr, r.target.tpidr2) == (0, TP, 0)
    # Nothing of the FP state moves.
    assert replace(full.target, tpidr=1, tpidr2=2) == t
