"""arm64 state records (fpstate.tools.record_arm64, ``record``/``translate`` of arm64 records):
a core's thread read back exactly, translation between vector lengths and CPUs with every
refusal named, the restore order checked against the kernel's PTRACE_SETREGSET rules (and the
dump order shown to lose state), the command line, and the readers fuzzed."""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fpstate.arm64.cpu import load_profile
from fpstate.arm64.regs import sve_regs_size, sve_vq_from_vl
from fpstate.cli import main
from fpstate.errors import BlobError
from fpstate.kernel.arm64 import ptrace as pt
from fpstate.kernel.arm64 import signal as sig
from fpstate.kernel.arm64.state import FP_STATE_FPSIMD, FP_STATE_SVE, HostCaps
from fpstate.tools import blob_arm64 as ba
from fpstate.tools import record_arm64 as ra
from fpstate.tools.blob_arm64 import target_for
from fpstate.tools.corefile import EM_AARCH64, build_core_notes

CAPS = {n: HostCaps.from_profile(load_profile(n))
        for n in ("fvp-aem-fpmr", "apple-m4", "neoverse-v1", "neoverse-v2", "neoverse-n1")}
FVP, M4, V1, N1 = CAPS["fvp-aem-fpmr"], CAPS["apple-m4"], CAPS["neoverse-v1"], CAPS["neoverse-n1"]


def _fill(n: int, seed: int) -> bytes:
    return bytes((seed * 131 + i * 7 + 1) & 0xFF for i in range(n))


def _state(caps: HostCaps, sve_vl: int | None = None, sme_vl: int | None = None, *,
           streaming: bool = False, za: bool = False, sve_format: bool = False,
           low: int | None = None, fpmr: int = 0) -> pt.RegsetTarget:
    """A thread of ``caps`` with every register non-zero; with ``low``, only the low ``low``
    bytes of each Z, P and FFR (and of each ZA row and the first ``low`` rows) are."""
    t = target_for(caps, sve_vl, sme_vl, streaming, za, sve_format)
    if t.fp_type == FP_STATE_SVE:
        vl = t.live_vl
        sve = bytearray(len(t.sve))
        for n in range(32):
            sve[n * vl:n * vl + (low or vl)] = _fill(low or vl, n)
        p = vl // 8
        for n in range(17):  # P0-P15 and FFR
            at = 32 * vl + n * p
            sve[at:at + (low // 8 if low else p)] = _fill(low // 8 if low else p, 40 + n)
        t = replace(t, sve=bytes(sve))
        t = replace(t, vregs=pt.effective_vregs(t))
    else:
        t = replace(t, vregs=_fill(512, 3))
    if za:
        svl = t.sme_vl
        rows = bytearray(len(t.za))
        for r in range(low or svl):
            rows[r * svl:r * svl + (low or svl)] = _fill(low or svl, 90 + r)
        t = replace(t, za=bytes(rows), zt0=_fill(64, 77))
    return replace(t, fpsr=0x8000010, fpcr=0x400000, fpmr=fpmr)


def _core(caps: HostCaps, t: pt.RegsetTarget, tids: tuple[int, ...] = (42,)) -> bytes:
    notes = []
    for note in pt.REGSETS:
        try:
            notes.append((note, pt.regset_get(caps, t, note)))
        except ValueError:
            continue  # a regset the CPU lacks is not in its cores
    return build_core_notes([(tid, notes) for tid in tids], EM_AARCH64)


CASES = [
    ("fvp-aem-fpmr", dict(sve_vl=64, sme_vl=32, za=True, sve_format=True, fpmr=0x4045)),
    ("fvp-aem-fpmr", dict(sve_vl=32, sme_vl=64, streaming=True, za=True)),
    ("fvp-aem-fpmr", dict(sve_vl=16, sme_vl=16)),
    ("apple-m4", dict(sme_vl=64, streaming=True, za=True)),
    ("apple-m4", dict()),
    ("neoverse-v1", dict(sve_vl=32, sve_format=True)),
    ("neoverse-n1", dict()),
]


@pytest.mark.parametrize(("cpu", "kw"), CASES)
def test_a_core_thread_is_read_back_exactly(cpu: str, kw: dict) -> None:
    caps = CAPS[cpu]
    t = _state(caps, **kw)
    rec, notes = ra.record_from_core(_core(caps, t), caps)
    assert notes == []
    assert ra.differences(caps, rec.state, t) == []
    assert (rec.state.sm, rec.state.za_on, rec.state.fp_type) == (t.sm, t.za_on, t.fp_type)
    assert ra.Arm64Record.from_json(rec.to_json()) == rec
    assert rec.max_vls == (caps.sve_vl.max_vl if caps.sve_vl else 0,
                           caps.sme_vl.max_vl if caps.sme_vl else 0)


def test_record_names_registers_at_the_live_vl() -> None:
    t = _state(FVP, 32, 64, streaming=True, za=True)
    rec, _ = ra.record_from_core(_core(FVP, t), FVP)
    obj = rec.to_dict()
    assert (obj["sve_vl"], obj["sme_vl"], obj["streaming"], obj["za"]) == (32, 64, True, True)
    regs = obj["registers"]
    assert len(regs["Z"]) == 32 and len(regs["Z"][5]) == 2 * 64  # the SME VL: streaming
    assert len(regs["P"][0]) == 2 * 8 and len(regs["FFR"]) == 1
    assert len(regs["ZA"]) == 64 and bytes.fromhex(regs["ZA"][2]) == _fill(64, 92)
    assert bytes.fromhex(regs["ZT0"][0]) == _fill(64, 77)
    assert "V" not in regs


def test_a_core_of_another_cpu_is_reported_note_by_note() -> None:
    t = _state(FVP, 32, 32, sve_format=True)
    rec, notes = ra.record_from_core(_core(FVP, t), V1)
    assert rec.state.sve_vl == 32 and rec.max_vls == (64, 64)
    assert any(n.startswith("NT_ARM_SVE: ") and "first difference at byte 4" in n
               for n in notes)  # max_size: V1's largest VL is 32
    assert any("lacks SME" in n for n in notes)  # NT_ARM_SSVE, ZA, ZT: V1 has none


def test_cores_the_kernel_cannot_have_written_are_refused() -> None:
    t = _state(FVP, 32, 32, sve_format=True)
    both = {pt.NT_ARM_SVE: pt.regset_get(FVP, t, pt.NT_ARM_SVE),
            pt.NT_ARM_SSVE: pt.regset_get(FVP, replace(t, sm=True, sme_vl=32),
                                          pt.NT_ARM_SSVE)}
    with pytest.raises(BlobError, match="both NT_ARM_SVE and NT_ARM_SSVE"):
        ra.state_from_notes(both)
    short = pt.regset_get(FVP, t, pt.NT_ARM_SVE)[:100]
    with pytest.raises(BlobError, match="NT_ARM_SVE: 100 bytes"):
        ra.state_from_notes({pt.NT_ARM_SVE: short})
    with pytest.raises(BlobError, match=r"2 threads .*--thread"):
        ra.record_from_core(_core(FVP, t, (5, 6)), FVP)
    with pytest.raises(BlobError, match="no thread 7"):
        ra.record_from_core(_core(FVP, t, (5, 6)), FVP, 7)
    rec, _ = ra.record_from_core(_core(FVP, t, (5, 6)), FVP, 6)
    assert rec.state.sve_vl == 32


# -- translation -------------------------------------------------------------------------------


@pytest.mark.parametrize(("cpu", "kw"), CASES)
def test_translating_to_the_same_cpu_changes_nothing(cpu: str, kw: dict) -> None:
    caps = CAPS[cpu]
    t = _state(caps, **kw)
    rec = ra.Arm64Record(cpu, t)
    tr = ra.translate(rec, caps)
    assert tr.ok and tr.notes == () and tr.refusals == ()
    assert ra.differences(caps, tr.record.state, t) == []
    assert ra.differences(caps, ra.replay(caps, tr.writes), t) == []


def test_widening_zero_extends_and_narrowing_back_is_exact() -> None:
    t = _state(FVP, 32, 32, streaming=True, za=True)
    rec = ra.Arm64Record("fvp-aem-fpmr", t)
    wide = ra.translate(rec, FVP, sme_vl=64)
    assert wide.ok
    assert wide.notes == ("streaming SVE registers re-laid from vl 32 to 64",
                          "ZA re-laid from SVL 32 to 64 bytes")
    w = wide.record.state
    assert w.sme_vl == 64 and w.sve[5 * 64:5 * 64 + 32] == _fill(32, 5)
    assert w.sve[5 * 64 + 32:6 * 64] == bytes(32)  # Z5's new upper half
    assert w.za[3 * 64:3 * 64 + 32] == _fill(32, 93) and w.za[3 * 64 + 32:4 * 64] == bytes(32)
    assert w.za[40 * 64:41 * 64] == bytes(64)  # a new row
    back = ra.translate(wide.record, FVP, sme_vl=32)
    assert back.ok and back.record.state == t


def test_narrowing_names_every_register_it_would_cut() -> None:
    t = _state(FVP, 64, 64, za=True, sve_format=True)
    t = replace(t, sve=t.sve[:10 * 64] + bytes(64) + t.sve[11 * 64:])  # Z10 zero: it fits
    tr = ra.translate(ra.Arm64Record("fvp-aem-fpmr", t), FVP, sve_vl=32, sme_vl=32)
    assert not tr.ok and tr.writes == ()
    assert tr.refusals == (
        "Z0-Z9, Z11-Z31 have non-zero bits above bit 255 (the target's registers hold 256 "
        "bits)",
        "P0-P15 have non-zero bits above bit 31 (the target's registers hold 32 bits)",
        "FFR has non-zero bits above bit 31 (the target's registers hold 32 bits)",
        "ZA rows 0, 1, 2, 3, 4, 5, 6, 7 ... hold non-zero bytes beyond the target's 32-byte "
        "SVL")
    low = _state(FVP, 64, 64, za=True, sve_format=True, low=32)
    tr = ra.translate(ra.Arm64Record("fvp-aem-fpmr", low), FVP, sve_vl=32, sme_vl=32)
    assert tr.ok and tr.record.state.sve_vl == 32
    assert tr.record.state.sve[:32] == _fill(32, 0)


def test_what_a_cpu_has_no_place_for_is_refused_by_name() -> None:
    t = _state(FVP, 32, 32, streaming=True, za=True, fpmr=0x4045)
    tr = ra.translate(ra.Arm64Record("fvp-aem-fpmr", t), V1)
    assert tr.refusals == ("streaming mode (SVCR.SM) needs SME", "PSTATE.ZA on needs SME",
                           "ZT0 is not zero and the target has no SME2",
                           "FPMR 0x4045 is not zero and the target has no FPMR")
    no_sme2 = replace(FVP, sme2=False)
    tr = ra.translate(ra.Arm64Record("fvp-aem-fpmr", replace(t, fpmr=0)), no_sme2)
    assert tr.refusals == ("ZT0 is not zero and the target has no SME2",)
    zt_zero = replace(t, zt0=bytes(64), fpmr=0)
    tr = ra.translate(ra.Arm64Record("fvp-aem-fpmr", zt_zero), no_sme2)
    assert tr.ok and pt.NT_ARM_ZT not in [n for n, _ in tr.writes]


def test_sve_format_without_sve_is_fpsimd_when_nothing_beyond_v_is_lost() -> None:
    t = _state(V1, 32, sve_format=True, low=16)
    t = replace(t, sve=t.sve[:32 * 32] + bytes(len(t.sve) - 32 * 32))  # P and FFR zero
    tr = ra.translate(ra.Arm64Record("neoverse-v1", t), N1)
    assert tr.ok and tr.record.state.fp_type == FP_STATE_FPSIMD
    assert tr.record.state.vregs == b"".join(_fill(16, n) for n in range(32))
    assert [n for n, _ in tr.writes] == [pt.NT_PRFPREG]
    assert tr.notes[0].startswith("SVE-format state held in FPSIMD format")
    bad = ra.translate(ra.Arm64Record("neoverse-v1", _state(V1, 32, sve_format=True)), N1)
    assert bad.refusals == (
        "Z0-Z31 have non-zero bits above bit 127 (the target's registers hold 128 bits)",
        "P0-P15 not zero and the target has no SVE", "FFR not zero and the target has no SVE")


def test_the_target_vl_is_the_one_its_kernel_gives_or_the_one_asked_for() -> None:
    t = _state(FVP, 64, 64, sve_format=True, low=16)
    assert ra.translate(ra.Arm64Record("x", t), V1).record.state.sve_vl == 32  # V1: 16, 32
    fpsimd = _state(FVP, 64, 16)
    assert ra.translate(ra.Arm64Record("x", fpsimd), M4).record.state.sme_vl == 64  # M4: 64
    with pytest.raises(BlobError, match="SVE vl 48 is not one the target implements"):
        ra.translate(ra.Arm64Record("x", t), FVP, sve_vl=48)
    with pytest.raises(BlobError, match="the target has no SVE"):
        ra.translate(ra.Arm64Record("x", t), M4, sve_vl=32)


# -- the restore order ---------------------------------------------------------------------------


def test_restore_order_of_each_kind_of_thread() -> None:
    names = {k: [pt.NOTE_NAMES[n] for n, _ in ra.restore_writes(c, _state(c, **kw))]
             for k, (c, kw) in {
                 "streaming": (FVP, dict(sve_vl=32, sme_vl=64, streaming=True, za=True)),
                 "sve": (FVP, dict(sve_vl=64, sme_vl=32, sve_format=True)),
                 "sme-only": (M4, dict(sme_vl=64, streaming=True, za=True)),
                 "fpsimd-only": (N1, {})}.items()}
    assert names == {
        "streaming": ["NT_ARM_ZA", "NT_ARM_SVE", "NT_ARM_SSVE", "NT_ARM_ZA", "NT_ARM_ZT",
                      "NT_ARM_FPMR", "NT_ARM_TLS"],
        "sve": ["NT_ARM_ZA", "NT_ARM_SVE", "NT_ARM_FPMR", "NT_ARM_TLS"],
        "sme-only": ["NT_ARM_ZA", "NT_ARM_SSVE", "NT_ARM_ZA", "NT_ARM_ZT", "NT_ARM_TLS"],
        "fpsimd-only": ["NT_PRFPREG", "NT_ARM_TLS"]}
    first = ra.restore_writes(FVP, _state(FVP, 32, 64, streaming=True, za=True))[0][1]
    assert len(first) == 16 and int.from_bytes(first[8:10], "little") == 64  # header: SME VL


def test_the_dump_order_loses_sve_state_where_the_restore_order_does_not() -> None:
    """A thread in SVE format with ZA on at an SME VL other than the default, written back
    note by note in the order of the core (skipping what SETREGSET refuses: the inactive
    NT_ARM_SSVE): the NT_ARM_ZA write changes the SME VL after NT_ARM_SVE, and
    vec_set_vector_length() converts the SVE state to FPSIMD -- Z's upper bits, P and FFR
    gone. The restore order sets the SME VL first."""
    t = _state(FVP, 64, 64, za=True, sve_format=True)
    assert FVP.sme_vl.default_vl == 32
    dump = [(n, pt.regset_get(FVP, t, n)) for n in pt.REGSETS]
    got = pt.RegsetTarget.fresh(FVP)
    refused = []
    for note, data in dump:
        r = pt.regset_set(FVP, got, note, data)
        if r.ret:
            refused.append(pt.NOTE_NAMES[note])
        got = r.target
    assert refused == ["NT_ARM_SSVE"]
    assert got.fp_type == FP_STATE_SVE and got.sve_vl == 64 and got.sme_vl == 64
    assert pt.effective_vregs(got) == pt.effective_vregs(t) and got.sve != t.sve
    assert got.sve == pt._sve_from_vregs(pt.effective_vregs(t), 64)
    assert ra.differences(FVP, got, t) == ["NT_ARM_SVE"]
    assert ra.differences(FVP, ra.replay(FVP, ra.restore_writes(FVP, t)), t) == []


def test_nt_arm_sve_after_the_streaming_state_leaves_streaming_mode() -> None:
    """The streaming state first and the NT_ARM_SVE note after it: sve_set_common() leaves
    streaming mode and takes the note's FPSIMD payload (v6.17's inactive-mode read: the
    streaming V registers), so Z's upper bits and P are lost; the restore order writes
    NT_ARM_SVE first."""
    t = _state(FVP, 32, 64, streaming=True, za=True)
    writes = ra.restore_writes(FVP, t)
    assert [n for n, _ in writes[1:3]] == [pt.NT_ARM_SVE, pt.NT_ARM_SSVE]
    swapped = (writes[0], writes[2], writes[1], *writes[3:])
    got = ra.replay(FVP, swapped)  # every write is accepted ...
    assert not got.sm and got.fp_type == FP_STATE_FPSIMD
    assert got.vregs == pt.effective_vregs(t) != bytes(512)
    with pytest.raises(ra.RestoreError, match=r"writes NT_ARM_SVE, NT_ARM_SSVE read back "
                       "otherwise"):  # ... and the state is not the thread's (V is)
        ra.check_restore(FVP, t, swapped)


@given(st.sampled_from(CASES), st.sampled_from(sorted(CAPS)), st.integers(0, 3))
@settings(max_examples=60, deadline=None)
def test_every_translation_restores_on_the_model(case: tuple, to: str, low: int) -> None:
    """Whatever translates is restored exactly by its writes (translate checks it: a
    RestoreError would fail here); what is refused says why."""
    cpu, kw = case
    t = _state(CAPS[cpu], **kw, low=(0, 16, 32, None)[low] or None)
    tr = ra.translate(ra.Arm64Record(cpu, t), CAPS[to])
    if tr.ok:
        assert ra.differences(CAPS[to], ra.replay(CAPS[to], tr.writes), tr.record.state) == []
    else:
        assert tr.refusals and tr.writes == ()


# -- a signal frame (rt_sigreturn restores) -------------------------------------------------------


@pytest.mark.parametrize(("cpu", "kw"), CASES)
def test_the_sigframe_carries_the_state_and_sigreturn_takes_it(cpu: str, kw: dict) -> None:
    caps = CAPS[cpu]
    t = _state(caps, **kw)
    frame = ra.sigframe(caps, t)
    [d] = ba.decode(frame, "sigframe")
    assert d.warnings == ()
    assert d.register("V7") == int.from_bytes(pt.effective_vregs(t)[7 * 16:8 * 16], "little")
    if t.fp_type == FP_STATE_SVE:
        vl = t.live_vl
        assert d.register("Z5") == int.from_bytes(t.sve[5 * vl:6 * vl], "little")
    if t.za_on:
        assert d.register("ZA[2]") == int.from_bytes(t.za[2 * t.sme_vl:3 * t.sme_vl], "little")
        assert d.register("ZT0") == int.from_bytes(t.zt0, "little")
    r = sig.restore_sigframe_fp(frame, caps, ra.sig_task(replace(t, za_on=False)))
    assert r.ret == 0
    assert (r.task.fp_type, r.task.sm, r.task.za, r.task.fpsr) == (t.fp_type, t.sm, t.za_on,
                                                                   0x8000010)


def test_sigreturn_needs_the_vector_lengths_set_first() -> None:
    """restore_sve_fpsimd_context() and restore_za_context() compare the frame's VL with the
    task's: a restorer sets the VLs (prctl) before rt_sigreturn."""
    t = _state(FVP, 32, 64, streaming=True, za=True)
    frame = ra.sigframe(FVP, t, 0xFFFFF7FF0000)
    at_defaults = sig.SigTask(sve_vl=64, sme_vl=32)
    r = sig.restore_sigframe_fp(frame, FVP, at_defaults, 0xFFFFF7FF0000)
    assert (r.ret, r.reason) == (-22, "restore_sve_fpsimd_context: vl 64 != the task's 32")
    ok = sig.restore_sigframe_fp(frame, FVP, ra.sig_task(t), 0xFFFFF7FF0000)
    assert ok.ret == 0 and ok.task.sm and ok.task.za
    moved = sig.restore_sigframe_fp(frame, FVP, ra.sig_task(t), 0x10000)  # datap is absolute
    assert moved.ret == -22 and "extra_context.datap" in moved.reason


# -- TPIDR_EL0 and TPIDR2_EL0 (NT_ARM_TLS, tpidr2_context) ---------------------------------------

TP, TP2 = 0xFFFF_8000_1234_5670, 0xFFFF_C000_0000_1F00


def test_tls_is_recorded_from_a_core_and_written_back_last() -> None:
    t = replace(_state(FVP, 64, 32, za=True, sve_format=True), tpidr=TP, tpidr2=TP2)
    rec, notes = ra.record_from_core(_core(FVP, t), FVP)
    assert notes == [] and rec.tls == (True, True)
    assert (rec.to_dict()["tpidr"], rec.to_dict()["tpidr2"]) == (TP, TP2)
    assert ra.Arm64Record.from_json(rec.to_json()) == rec
    tr = ra.translate(rec, FVP)
    assert tr.writes[-1] == (pt.NT_ARM_TLS, struct.pack("<QQ", TP, TP2))
    assert (ra.replay(FVP, tr.writes).tpidr, ra.replay(FVP, tr.writes).tpidr2) == (TP, TP2)


def test_an_eight_byte_nt_arm_tls_keeps_the_threads_tpidr2() -> None:
    """A core whose NT_ARM_TLS holds TPIDR_EL0 only (a kernel before TPIDR2 joined it): the
    record says TPIDR2_EL0 is unknown, and the restore writes 8 bytes, which tls_set() lays
    over TPIDR_EL0 alone."""
    t = replace(_state(FVP, 32, 32), tpidr=TP, tpidr2=TP2)
    notes = {n: pt.regset_get(FVP, t, n) for n in pt.REGSETS}
    notes[pt.NT_ARM_TLS] = notes[pt.NT_ARM_TLS][:8]
    rec, found = ra.record_from_notes(notes, FVP)
    assert rec.tls == (True, False) and rec.to_dict()["tpidr2"] is None
    assert found == ["NT_ARM_TLS: the kernel would write 16 bytes for this state, the core "
                     "has 8, first difference at byte 8"]
    tr = ra.translate(rec, FVP)
    assert tr.writes[-1] == (pt.NT_ARM_TLS, struct.pack("<Q", TP))
    own = replace(pt.RegsetTarget.fresh(FVP), tpidr2=0x4000)
    assert ra.replay(FVP, tr.writes, own).tpidr2 == 0x4000


def test_tpidr2_needs_sme_on_the_target() -> None:
    t = replace(_state(FVP, 32, 32, sve_format=True), tpidr=TP, tpidr2=TP2)
    rec, _ = ra.record_from_core(_core(FVP, t), FVP)
    tr = ra.translate(rec, V1)
    assert not tr.ok and tr.refusals == (
        f"TPIDR2_EL0 {TP2:#x} is not zero and the target has no SME (its NT_ARM_TLS ignores "
        "TPIDR2_EL0: the thread's TPIDR2 block, the ZA lazy-saving scheme's, would be "
        "forgotten)",)
    ok = ra.translate(replace(rec, state=replace(rec.state, tpidr2=0)), V1)
    assert ok.ok and ok.writes[-1] == (pt.NT_ARM_TLS, struct.pack("<QQ", TP, 0))


def test_a_frame_gives_tpidr2_not_tpidr() -> None:
    """A signal frame's tpidr2_context holds TPIDR2_EL0, nothing holds TPIDR_EL0: no
    NT_ARM_TLS write (it would overwrite TPIDR_EL0), a note, and the translated state's own
    frame restores TPIDR2_EL0."""
    t = replace(_state(FVP, 64, 32, za=True, sve_format=True), tpidr2=TP2)
    rec, found = ra.record_from_sigframe(ra.sigframe(FVP, t), FVP)
    assert found == [] and rec.tls == (False, True)
    assert (rec.to_dict()["tpidr"], rec.to_dict()["tpidr2"]) == (None, TP2)
    tr = ra.translate(rec, FVP)
    assert tr.ok and pt.NT_ARM_TLS not in [n for n, _ in tr.writes]
    assert any(n.startswith(f"TPIDR2_EL0 {TP2:#x} is not among the regset writes")
               for n in tr.notes)
    frame = ra.sigframe(FVP, tr.record.state)
    back = sig.restore_sigframe_fp(frame, FVP, ra.sig_task(replace(t, za_on=False, tpidr2=0)))
    assert (back.ret, back.task.tpidr2) == (0, TP2)


def test_records_made_before_tls_have_none() -> None:
    t = _state(FVP, 32, 32)
    obj = ra.record_from_core(_core(FVP, t), FVP)[0].to_dict()
    del obj["tpidr"], obj["tpidr2"]
    rec = ra.Arm64Record.from_json(obj)
    assert rec.tls == (False, False)
    assert pt.NT_ARM_TLS not in [n for n, _ in ra.translate(rec, FVP).writes]
    with pytest.raises(BlobError, match="record field 'tpidr2' must be an integer from 0"):
        ra.Arm64Record.from_json(dict(obj, tpidr2=-1))


# -- the command line ---------------------------------------------------------------------------


def test_cli_record_translate_and_regsets(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    t = _state(FVP, 64, 32, za=True, sve_format=True, low=32)
    core = tmp_path / "core"
    core.write_bytes(_core(FVP, t, (7, 8)))
    rec = tmp_path / "rec.json"
    assert main(["record", "--arch", "arm64", str(core), "--thread", "8", "-o", str(rec)]) == 0
    obj = json.loads(rec.read_text())
    assert (obj["format"], obj["sve_vl"], obj["za"]) == ("fpstate-arm64-state-record/1", 64, True)
    assert main(["record", "--arch", "arm64", str(core)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "fpstate: error: the core holds 2 threads (7, 8): choose one with --thread"]
    out = tmp_path / "v1.json"
    assert main(["translate", str(rec), "--to", "neoverse-v1", "-o", str(out)]) == 1
    assert capsys.readouterr().out == ("neoverse-v1 cannot hold the state: PSTATE.ZA on needs "
                                       "SME; ZT0 is not zero and the target has no SME2\n")
    rs = tmp_path / "rs"
    assert main(["translate", str(rec), "--to", "fvp-aem-fpmr", "--vl", "32", "--sme-vl", "64",
                 "--regsets", str(rs), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "note: SVE registers re-laid from vl 64 to 32" in err
    assert ("PTRACE_SETREGSET in this order: 1. NT_ARM_ZA (16 bytes), 2. NT_ARM_SVE (1136 "
            "bytes), 3. NT_ARM_ZA (4112 bytes), 4. NT_ARM_ZT (64 bytes), 5. NT_ARM_FPMR (8 "
            "bytes), 6. NT_ARM_TLS (16 bytes)") in err
    files = sorted(rs.iterdir(), key=lambda p: int(p.name.split("-")[0]))
    assert [p.name for p in files] == ["1-NT_ARM_ZA.bin", "2-NT_ARM_SVE.bin", "3-NT_ARM_ZA.bin",
                                       "4-NT_ARM_ZT.bin", "5-NT_ARM_FPMR.bin",
                                       "6-NT_ARM_TLS.bin"]
    names = {v: k for k, v in pt.NOTE_NAMES.items()}
    writes = tuple((names[p.stem.split("-", 1)[1]], p.read_bytes()) for p in files)
    back = ra.Arm64Record.from_json(out.read_text())
    assert (back.state.sve_vl, back.state.sme_vl) == (32, 64)
    assert ra.differences(FVP, ra.replay(FVP, writes), back.state) == []
    frame = tmp_path / "frame"
    assert main(["translate", str(rec), "--to", "fvp-aem-fpmr", "--sigframe", str(frame),
                 "--frame-address", "0xfffff7ff0000", "-o", str(out)]) == 0
    assert ("rt_sigframe of 4688 bytes; rt_sigreturn takes it on a thread whose SVE VL 64 and "
            "SME VL 32: set them first") in capsys.readouterr().err
    assert main(["validate", "--arch", "arm64", "--as", "sigreturn", "--format", "sigframe",
                 str(frame), "--vl", "64", "--sme-vl", "32"]) == 0
    assert main(["validate", "--arch", "arm64", "--as", "sigreturn", "--format", "sigframe",
                 str(frame), "--vl", "32"]) == 1


@pytest.mark.parametrize(("cpu", "kw"), CASES)
def test_record_without_cpu_names_the_cpu_whose_notes_these_are(
        cpu: str, kw: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    core = tmp_path / "core"
    core.write_bytes(_core(CAPS[cpu], _state(CAPS[cpu], **kw)))
    assert main(["record", "--arch", "arm64", str(core)]) == 0
    got = capsys.readouterr()
    assert json.loads(got.out)["cpu"] == cpu and got.err == ""


def test_a_core_no_bundled_cpu_writes_is_recorded_with_notes(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    t = _state(FVP, 32, 32, sve_format=True)
    notes = [(n, pt.regset_get(FVP, t, n)) for n in pt.REGSETS if n != pt.NT_ARM_FPMR]
    core = tmp_path / "core"
    core.write_bytes(build_core_notes([(9, notes)], EM_AARCH64))
    assert main(["record", "--arch", "arm64", str(core)]) == 0
    got = capsys.readouterr()
    assert json.loads(got.out)["cpu"] == "fvp-aem-fpmr"
    assert got.err.splitlines() == [
        "fpstate: note: NT_ARM_FPMR: the CPU has it and the core does not",
        "fpstate: note: no bundled arm64 profile writes this as it is; recorded as "
        "fvp-aem-fpmr (give the saving CPU with --cpu)"]


@pytest.mark.parametrize(("cpu", "kw"), CASES)
def test_a_signal_frame_is_recorded_and_its_cpu_named(cpu: str, kw: dict, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    """record --format sigframe: the thread a frame was written for; without --cpu the
    bundled profile whose setup_sigframe() lays the records out so and whose rt_sigreturn takes
    it. A streaming thread's frame has no SVE VL (its sve_context holds the SME VL)."""
    caps = CAPS[cpu]
    t = _state(caps, **kw)
    frame = tmp_path / "frame"
    frame.write_bytes(ra.sigframe(caps, t, 0xFFFFF7FF0000))
    assert main(["record", "--arch", "arm64", "--format", "sigframe", str(frame)]) == 0
    got = capsys.readouterr()
    rec = ra.Arm64Record.from_json(got.out)
    assert rec.cpu == cpu and got.err == ""
    want = replace(t, sve_vl=0) if t.sm else t
    assert ra.differences(caps, rec.state, want) == []


def test_a_frame_no_cpu_writes_is_named_so() -> None:
    t = _state(V1, 32, sve_format=True)
    frame = ra.sigframe(V1, t)
    _, notes = ra.record_from_sigframe(frame, CAPS["neoverse-v2"])  # V2: SVE VL 16 only
    assert notes == ["SVE VL 32 is not one the CPU implements"]
    _, notes = ra.record_from_sigframe(frame, FVP)
    assert notes == ["the frame's records (fpsimd, sve) are not those the CPU's kernel writes "
                     "(fpsimd, sve, tpidr2, za, fpmr)"]
    with pytest.raises(BlobError, match="no fpsimd_context"):
        ra.state_from_sigframe(bytes(4688))


def test_validate_a_core_says_when_its_order_loses_state(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    """validate --as ptrace of a core: every write but the inactive NT_ARM_SSVE is taken, and
    the thread still does not end in the core's state (the dump order); each thread of the
    core on a thread of its own; a core whose order keeps its state passes."""
    lossy = _state(FVP, 64, 64, za=True, sve_format=True)
    core = tmp_path / "core"
    core.write_bytes(_core(FVP, lossy, (3, 4)))
    assert main(["validate", "--arch", "arm64", "--as", "ptrace", str(core)]) == 1
    out = capsys.readouterr().out.splitlines()
    kept = [ln for ln in out if "NOT KEPT" in ln]
    assert [ln.split(":")[0] for ln in kept] == ["thread 3", "thread 4"]
    assert kept[0].startswith("thread 3: STATE NOT KEPT -- after the writes NT_ARM_SVE read "
                              "back otherwise than the core holds them")
    assert main(["validate", "--arch", "arm64", "--as", "ptrace", str(core), "--json"]) == 1
    last = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (last["source"], last["accepted"], last["lost"]) == ("thread 4", False, ["NT_ARM_SVE"])
    # The same thread on a receiving thread already at SME VL 64: nothing is converted.
    assert main(["validate", "--arch", "arm64", "--as", "ptrace", str(core), "--sme-vl",
                 "64"]) == 1  # still 1: the inactive NT_ARM_SSVE is refused
    assert "NOT KEPT" not in capsys.readouterr().out
    fine = tmp_path / "n1.core"
    fine.write_bytes(_core(N1, _state(N1)))
    assert main(["validate", "--arch", "arm64", "--as", "ptrace", "--cpu", "neoverse-n1",
                 str(fine)]) == 0


@pytest.mark.parametrize(("argv", "message"), [
    (["record", "--arch", "arm64", "{core}", "--format", "xsave"],
     "--format xsave is an x86 option"),
    (["record", "--arch", "arm64", "{core}", "--format", "sigframe", "--thread", "1"],
     "--thread picks a thread of a core"),
    (["record", "--arch", "arm64", "{rec}", "--format", "sigframe"],
     "4688 bytes"),
    (["record", "{core}", "--thread", "3"], "an arm64 core (EM_AARCH64) has no NT_X86_XSTATE "
     "note: read it with --arch arm64"),
    (["record", "--arch", "arm64", "{rec}"], "an arm64 record is made from an ELF core, or from "
     "a signal frame with --format sigframe"),
    (["record", "--arch", "arm64", "{core}", "--cpu", "nosuch"], "--cpu: "),
    (["translate", "{rec}", "--to", "fvp-aem-fpmr", "--vl", "48"],
     "SVE vl 48 is not one the target implements (VLs 16, 32, 64)"),
    (["translate", "{rec}", "--to", "fvp-aem-fpmr", "--xcr0", "0x7"], "--xcr0 is for x86"),
    (["translate", "{rec}", "--to", "nosuch"], "--to: "),
    (["translate", "{bad}", "--to", "fvp-aem-fpmr"], "record field 'sve_vl': 40 is not"),
    (["translate", "{rec}", "--to", "fvp-aem-fpmr", "--sigframe", "{core}.f",
      "--frame-address", "0x1008"], "--frame-address 0x1008: a frame address is a 16-byte"),
    (["translate", "{rec}", "--to", "fvp-aem-fpmr", "--frame-address", "x"],
     "argument --frame-address: not an address: 'x'"),
])
def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, argv: list,
                                 message: str) -> None:
    t = _state(FVP, 32, 32, sve_format=True)
    paths = {"core": tmp_path / "core", "rec": tmp_path / "rec.json", "bad": tmp_path / "bad"}
    paths["core"].write_bytes(_core(FVP, t))
    rec = ra.Arm64Record("fvp-aem-fpmr", t)
    paths["rec"].write_text(rec.to_json())
    paths["bad"].write_text(json.dumps(dict(rec.to_dict(), sve_vl=40)))
    try:
        status = main([a.format(**paths) for a in argv])
    except SystemExit as e:  # argparse's own errors (fpstate.cli: one line, exit 2)
        status = e.code
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fpstate: error: ") and message in err[0]


# -- fuzzing -----------------------------------------------------------------------------------

_GOOD = ra.Arm64Record("fvp-aem-fpmr", _state(FVP, 32, 32, za=True, sve_format=True)).to_dict()


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.text(max_size=5),
                   st.lists(st.text(), max_size=3),
                   st.dictionaries(st.text(max_size=3), st.text()))


@given(st.sampled_from(sorted(_GOOD)), _VALUES)
@settings(max_examples=300, deadline=None)
def test_record_reader_fuzzed(key: str, value: object) -> None:
    obj = dict(_GOOD, **{key: value})
    try:
        rec = ra.Arm64Record.from_json(json.dumps(obj))
    except BlobError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert isinstance(rec.state, pt.RegsetTarget)


@given(st.dictionaries(st.sampled_from(sorted(pt.NOTE_NAMES)), st.binary(max_size=2400),
                       max_size=6))
@settings(max_examples=300, deadline=None)
def test_notes_reader_fuzzed(notes: dict[int, bytes]) -> None:
    try:
        t, _ = ra.state_from_notes(notes)
    except BlobError as e:
        assert "\n" not in str(e)
        return
    assert t.fp_type in (FP_STATE_FPSIMD, FP_STATE_SVE)
    if t.fp_type == FP_STATE_SVE:
        assert len(t.sve) == sve_regs_size(sve_vq_from_vl(t.live_vl))


_FRAME = ra.sigframe(FVP, _state(FVP, 32, 64, streaming=True, za=True), 0xFFFFF7FF0000)


@given(st.lists(st.tuples(st.integers(0, len(_FRAME) - 1), st.integers(0, 255)), max_size=8),
       st.integers(0, len(_FRAME)))
@settings(max_examples=300, deadline=None)
def test_frame_reader_fuzzed(pokes: list[tuple[int, int]], cut: int) -> None:
    """A frame with bytes changed and cut short: a record with notes, or one BlobError line;
    a record read is one the record format takes back."""
    frame = bytearray(_FRAME)
    for at, value in pokes:
        frame[at] = value
    try:
        rec, _ = ra.record_from_sigframe(bytes(frame[:max(cut, 4000)]), FVP)
    except BlobError as e:
        assert "\n" not in str(e)
        return
    assert ra.Arm64Record.from_json(rec.to_json()) == rec
