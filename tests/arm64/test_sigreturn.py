"""rt_sigreturn's FP records: restore_sigframe() -> restore_sve_fpsimd_context(),
restore_fpsimd_context(), restore_tpidr2/fpmr/za/zt_context() size, VL and order rules
(arch/arm64/kernel/signal.c, v6.17).  A refused frame is -EINVAL, i.e. SIGSEGV."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fpstate.arm64.cpu import load_profile
from fpstate.kernel.arm64 import signal as sig
from fpstate.kernel.arm64.signal import SigTask
from fpstate.kernel.arm64.state import FP_STATE_FPSIMD, FP_STATE_SVE, HostCaps

EINVAL = -22


def caps(name):
    return HostCaps.from_profile(load_profile(name))


def frame_of(profile, task):
    c = caps(profile)
    lay = sig.setup_sigframe_layout(c, task)
    return c, lay, bytearray(sig.encode_sigframe(lay, task))


STREAMING_ZA = SigTask(sm=True, za=True, sve_vl=64, sme_vl=32, fpsr=0x10, fpcr=0x20,
                       fpmr=0xABC, tpidr2=0xFFFF_C000_0000_1F00)


@pytest.mark.parametrize("profile,task,fp_type", [
    ("neoverse-n1", SigTask(fpsr=1, fpcr=2), FP_STATE_FPSIMD),
    ("neoverse-v1", SigTask(sve_vl=32), FP_STATE_FPSIMD),              # header-only sve
    ("neoverse-v1", SigTask(fp_type=FP_STATE_SVE, sve_vl=32), FP_STATE_SVE),
    ("apple-m4", SigTask(sme_vl=64), FP_STATE_FPSIMD),                 # SME only: vl 0
    ("apple-m4", SigTask(sm=True, za=True, sme_vl=64), FP_STATE_SVE),
    ("fvp-aem-fpmr", STREAMING_ZA, FP_STATE_SVE),
])
def test_a_delivered_frame_restores_what_it_saved(profile, task, fp_type):
    c, _, frame = frame_of(profile, task)
    r = sig.restore_sigframe_fp(bytes(frame), c, task)
    assert (r.ret, r.reason) == (0, "")
    assert (r.task.fp_type, r.task.sm, r.task.za) == (fp_type, task.sm, task.za)
    assert (r.task.fpsr, r.task.fpcr, r.task.fpmr) == (task.fpsr, task.fpcr, task.fpmr)
    assert r.task.tpidr2 == task.tpidr2


def test_tpidr2_is_saved_in_its_record_and_restored_from_it():
    """preserve_tpidr2_context() writes TPIDR2_EL0 at +8 of a 16-byte tpidr2_context;
    restore_tpidr2_context() writes the register back from it (before ZA is restored)."""
    c, lay, frame = frame_of("fvp-aem-fpmr", STREAMING_ZA)
    rec = lay.record("tpidr2")
    assert struct.unpack_from("<IIQ", frame, rec.offset) == (sig.TPIDR2_MAGIC, 16,
                                                             0xFFFF_C000_0000_1F00)
    struct.pack_into("<Q", frame, rec.offset + 8, 0x1000)  # a handler moved the block
    r = sig.restore_sigframe_fp(bytes(frame), c, STREAMING_ZA)
    assert (r.ret, r.task.tpidr2) == (0, 0x1000)


def test_the_handler_may_drop_za_with_a_header_only_za_context():
    c, lay, frame = frame_of("apple-m4", SigTask(za=True, sme_vl=64))
    za = lay.record("za")
    struct.pack_into("<I", frame, za.offset + 4, sig.ZA_CONTEXT_SIZE)
    struct.pack_into("<II", frame, za.offset + 16, 0, 0)      # terminator right after it
    r = sig.restore_sigframe_fp(bytes(frame), c, SigTask(za=True, sme_vl=64))
    assert r.ret == 0 and not r.task.za


def set_size(name, size):
    def mutate(frame, lay):
        struct.pack_into("<I", frame, lay.record(name).offset + 4, size)
    return mutate


def set_u16(name, at, value):
    def mutate(frame, lay):
        struct.pack_into("<H", frame, lay.record(name).offset + at, value)
    return mutate


def drop_fpsimd(frame, lay):
    struct.pack_into("<I", frame, lay.record("fpsimd").offset, sig.ESR_MAGIC)   # ignored


def zt_without_za(frame, lay):
    """A header-only za_context (ZA off) followed directly by the zt_context."""
    za, zt = lay.record("za"), lay.record("zt")
    frame[za.offset + 16:za.offset + 16 + zt.alloc] = frame[zt.offset:zt.offset + zt.alloc]
    struct.pack_into("<I", frame, za.offset + 4, sig.ZA_CONTEXT_SIZE)
    struct.pack_into("<II", frame, za.offset + 16 + zt.alloc, 0, 0)


@pytest.mark.parametrize("profile,task,mutate,reason", [
    ("neoverse-n1", SigTask(), drop_fpsimd, "no fpsimd_context"),
    ("neoverse-n1", SigTask(), set_size("fpsimd", 512), "read_fpsimd_context: size 512"),
    ("neoverse-v1", SigTask(fp_type=FP_STATE_SVE, sve_vl=32), set_u16("sve", 8, 16),
     "vl 16 != the task's 32"),
    ("neoverse-v1", SigTask(fp_type=FP_STATE_SVE, sve_vl=32), set_size("sve", 32),
     "size 32 < SVE_SIG_CONTEXT_SIZE 1108"),
    ("neoverse-v1", SigTask(sve_vl=32), set_u16("sve", 10, sig.SVE_SIG_FLAG_SM),
     "SVE_SIG_FLAG_SM without SME"),
    ("fvp-aem-fpmr", STREAMING_ZA, set_size("sve", 16),      # streaming needs a payload
     "size 16 < SVE_SIG_CONTEXT_SIZE 1108"),
    ("fvp-aem-fpmr", STREAMING_ZA, set_size("tpidr2", 32), "restore_tpidr2_context"),
    ("fvp-aem-fpmr", STREAMING_ZA, set_size("fpmr", 32), "restore_fpmr_context: size 32"),
    ("fvp-aem-fpmr", STREAMING_ZA, set_u16("za", 8, 64), "restore_za_context: vl 64"),
    ("fvp-aem-fpmr", STREAMING_ZA, set_size("za", 32), "ZA_SIG_CONTEXT_SIZE 1040"),
    ("fvp-aem-fpmr", STREAMING_ZA, set_u16("zt", 8, 2), "nregs 2 != 1"),
    ("fvp-aem-fpmr", STREAMING_ZA, zt_without_za, "restore_zt_context: ZA is not enabled"),
])
def test_sigreturn_refuses_frames_breaking_a_restore_rule(profile, task, mutate, reason):
    c, lay, frame = frame_of(profile, task)
    mutate(frame, lay)
    r = sig.restore_sigframe_fp(bytes(frame), c, task)
    assert r.ret == EINVAL and reason in r.reason
    assert r.task == task                                    # nothing restored


def test_a_parse_error_is_einval_with_the_parsers_reason():
    c, lay, frame = frame_of("neoverse-n1", SigTask())
    struct.pack_into("<I", frame, lay.record("fpsimd").offset, 0x1234)
    r = sig.restore_sigframe_fp(bytes(frame), c, SigTask())
    assert r.ret == EINVAL and r.reason.startswith("parse_user_sigframe: unknown record")


@settings(max_examples=150)
@given(st.binary(min_size=1, max_size=48), st.integers(0, 4096 - 1))
def test_restore_never_raises(junk, at):
    c, _, frame = frame_of("fvp-aem-fpmr", STREAMING_ZA)
    pos = sig.RESERVED_OFFSET + at
    frame[pos:pos + len(junk)] = junk[: max(0, len(frame) - pos)]
    r = sig.restore_sigframe_fp(bytes(frame), c, STREAMING_ZA)
    assert r.ret in (0, EINVAL) and (r.ret == 0) == (r.reason == "")
