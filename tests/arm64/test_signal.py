"""Signal-frame records of arch/arm64/kernel/signal.c: magics, sizes, layout, parse rules."""

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fpstate.arm64.cpu import load_profile, profile_from_json
from fpstate.errors import BlobError
from fpstate.kernel.arm64 import entry_common as e
from fpstate.kernel.arm64 import fpsimd as k
from fpstate.kernel.arm64 import signal as sig
from fpstate.kernel.arm64.signal import SigTask
from fpstate.kernel.arm64.state import FP_STATE_FPSIMD, FP_STATE_SVE, HostCaps


def caps(name):
    return HostCaps.from_profile(load_profile(name))


def wide_sve_caps():
    d = load_profile("neoverse-v1").to_json()
    d["name"], d["sve_vl_bits"] = "sve2048", [128, 256, 512, 1024, 2048]
    return HostCaps.from_profile(profile_from_json(json.loads(json.dumps(d)), "t"))


def test_magics_and_fixed_sizes():
    assert (sig.FPSIMD_MAGIC, sig.ESR_MAGIC, sig.EXTRA_MAGIC, sig.SVE_MAGIC) == (
        0x46508001, 0x45535201, 0x45585401, 0x53564501)
    assert (sig.ZA_MAGIC, sig.ZT_MAGIC, sig.FPMR_MAGIC, sig.TPIDR2_MAGIC) == (
        0x54366345, 0x5A544E01, 0x46504D52, 0x54504902)
    assert sig.FPSIMD_CONTEXT_SIZE == 0x210        # sigcontext.h allocation table
    assert (sig.ESR_CONTEXT_SIZE, sig.FPMR_CONTEXT_SIZE, sig.SVE_CONTEXT_SIZE) == (16, 16, 16)
    assert sig.EXTRA_CONTEXT_STRUCT_SIZE == 32 and sig.ZT_CONTEXT_SIZE == 16


def test_variable_sizes_follow_sigcontext_h():
    assert sig.sve_sig_context_size(0) == 16
    assert sig.sve_sig_context_size(1) == 16 + 546
    # sigcontext.h: "0x8a0 sve_context (vl <= 64)"
    assert (sig.sve_sig_context_size(4) + 15) & ~15 == 0x8A0
    assert sig.za_sig_context_size(0) == 16 and sig.za_sig_context_size(4) == 16 + 4096
    assert sig.zt_sig_context_size(1) == 80


def test_rt_sigframe_geometry():
    assert sig.RESERVED_OFFSET == 592 and sig.RT_SIGFRAME_SIZE == 4688


def test_n1_frame_is_fpsimd_then_terminator():
    lay = sig.setup_sigframe_layout(caps("neoverse-n1"), SigTask())
    assert [(r.name, r.offset, r.size) for r in lay.records] == [("fpsimd", 592, 528)]
    assert lay.end_offset == 592 + 528 and sig.sigframe_size(lay) == 4688


def test_fault_adds_esr():
    lay = sig.setup_sigframe_layout(caps("neoverse-n1"), SigTask(fault_code=0x92000047))
    assert lay.record("esr").offset == 592 + 528


def test_sve_record_is_header_only_unless_sve_is_live():
    c = caps("neoverse-v1")
    idle = sig.setup_sigframe_layout(c, SigTask(sve_vl=32))
    live = sig.setup_sigframe_layout(c, SigTask(fp_type=FP_STATE_SVE, sve_vl=32))
    assert idle.record("sve").size == 16
    assert live.record("sve").size == 1120 and live.record("sve").alloc == 1120   # 16+1092


def test_sme_records():
    c = caps("fvp-aem-fpmr")
    off = sig.setup_sigframe_layout(c, SigTask(sve_vl=64, sme_vl=32))
    assert [r.name for r in off.records] == ["fpsimd", "sve", "tpidr2", "za", "fpmr"]
    assert off.record("za").size == 16 and off.record("zt") is None
    on = sig.setup_sigframe_layout(c, SigTask(sm=True, za=True, sve_vl=64, sme_vl=32))
    assert on.record("sve").size == (16 + 1092 + 15) & ~15      # streaming: at the SME VL
    assert on.record("za").size == 16 + 32 * 32 and on.record("zt").size == 80
    assert sig.setup_sigframe_layout(caps("neoverse-v2"), SigTask()).record("fpmr") is None


def test_minsigstksz():
    for name in ("neoverse-n1", "neoverse-v1", "neoverse-v2", "apple-m4", "fvp-aem-fpmr"):
        assert sig.minsigstksz(caps(name)) == 4688 + 16 + 16    # fits in __reserved[]
    big = sig.setup_sigframe_layout(wide_sve_caps(), None, add_all=True)
    assert big.extra_offset == 592 + 528 + 16                    # after fpsimd and esr
    assert big.record("sve").offset == big.extra_offset + 32 + 16
    assert sig.minsigstksz(wide_sve_caps()) == sig.sigframe_size(big) + 32 > 4720


def test_frame_encodes_headers_and_parses_back():
    c = caps("fvp-aem-fpmr")
    task = SigTask(sm=True, za=True, sve_vl=64, sme_vl=32, fpsr=0x8000000, fpmr=0x1234)
    lay = sig.setup_sigframe_layout(c, task)
    frame = sig.encode_sigframe(lay, task)
    sve = lay.record("sve")
    vl, flags = struct.unpack_from("<HH", frame, sve.offset + 8)
    assert (vl, flags) == (32, sig.SVE_SIG_FLAG_SM)
    assert struct.unpack_from("<Q", frame, lay.record("fpmr").offset + 8)[0] == 0x1234
    found = sig.parse_user_sigframe(frame, c)
    assert {n: o for n, (o, _) in found.items()} == {r.name: r.offset for r in lay.records}


def test_extra_context_frames_parse():
    c = wide_sve_caps()
    task = SigTask(fp_type=FP_STATE_SVE, sve_vl=256)
    lay = sig.setup_sigframe_layout(c, task)
    assert lay.extra_offset
    frame = sig.encode_sigframe(lay, task, base=0x7FFF0000)
    found = sig.parse_user_sigframe(frame, c, base=0x7FFF0000)
    assert found["sve"][1] == (sig.sve_sig_context_size(16) + 15) & ~15
    with pytest.raises(BlobError, match="datap"):
        sig.parse_user_sigframe(frame, c, base=0)


@pytest.mark.parametrize("mutate,message", [
    (lambda f, lay: struct.pack_into("<I", f, lay.record("fpsimd").offset, 0x1234), "unknown"),
    (lambda f, lay: struct.pack_into("<II", f, lay.end_offset, 0, 16), "terminator"),
    (lambda f, lay: struct.pack_into("<I", f, lay.record("fpsimd").offset + 4, 4), "size"),
])
def test_sigreturn_rejects_bad_frames(mutate, message):
    c = caps("neoverse-n1")
    lay = sig.setup_sigframe_layout(c, SigTask())
    frame = bytearray(sig.encode_sigframe(lay, SigTask()))
    mutate(frame, lay)
    with pytest.raises(BlobError, match=message):
        sig.parse_user_sigframe(bytes(frame), c)


def test_records_of_absent_features_are_rejected():
    lay = sig.setup_sigframe_layout(caps("fvp-aem-fpmr"), SigTask())
    frame = sig.encode_sigframe(lay, SigTask())
    with pytest.raises(BlobError, match=r"lacks (FPMR|SVE)"):
        sig.parse_user_sigframe(frame, caps("neoverse-n1"))


def test_duplicate_records_are_rejected():
    c = caps("neoverse-n1")
    lay = sig.setup_sigframe_layout(c, SigTask())
    frame = bytearray(sig.encode_sigframe(lay, SigTask()))
    second = lay.end_offset
    frame[second:second + 528] = frame[592:592 + 528]
    struct.pack_into("<II", frame, second + 528, 0, 0)
    with pytest.raises(BlobError, match="duplicate"):
        sig.parse_user_sigframe(bytes(frame), c)


@settings(max_examples=150)
@given(st.binary(min_size=1, max_size=64), st.integers(0, 4096 - 1))
def test_parser_only_raises_blob_error(junk, at):
    c = caps("fvp-aem-fpmr")
    lay = sig.setup_sigframe_layout(c, SigTask())
    frame = bytearray(sig.encode_sigframe(lay, SigTask()))
    pos = sig.RESERVED_OFFSET + at
    frame[pos:pos + len(junk)] = junk[: max(0, len(frame) - pos)]
    try:
        sig.parse_user_sigframe(bytes(frame), c)
    except BlobError:
        pass


def test_delivery_leaves_streaming_mode_and_za():
    h = k.boot(load_profile("fvp-aem-fpmr"))
    h = e.ret_to_user(k.schedule(k.spawn(h, "a"), 0, "a"), 0)
    for op in ("fpmr_write", "smstart_sm", "smstart_za", "sve_write", "za_write"):
        h = e.user_op(h, 0, op)
    h = e.interrupt(h, 0)
    h, lay = sig.deliver_signal(h, 0)
    assert lay.record("sve").size == 1120 and lay.record("za").size == 16 + 1024
    assert lay.record("zt") is not None
    st_ = h.store("thread:a")
    assert st_.svcr == 0 and st_.fp_type == FP_STATE_FPSIMD and st_.fpmr.gen == 0
    h = e.ret_to_user(h, 0)
    assert not h.cpus[0].regs.sm and not h.cpus[0].regs.za_on
