"""arm64 blobs for people (fpstate.tools.blob_arm64, ``decode``/``validate --arch arm64``):
the registers of each regset and record at their uapi offsets, signal frames with an
extra_context, arm64 cores, the verdicts of PTRACE_SETREGSET and rt_sigreturn, the command
line's exit statuses, and the decoders fuzzed."""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fpstate.arm64.cpu import load_profile
from fpstate.cli import main
from fpstate.errors import BlobError
from fpstate.kernel.arm64 import ptrace as pt
from fpstate.kernel.arm64 import signal as sig
from fpstate.kernel.arm64.state import FP_STATE_SVE, HostCaps
from fpstate.tools import blob_arm64 as ba
from fpstate.tools.corefile import EM_AARCH64, build_core, build_core_notes

FVP = HostCaps.from_profile(load_profile("fvp-aem-fpmr"))
V1 = HostCaps.from_profile(load_profile("neoverse-v1"))


def _thread() -> pt.RegsetTarget:
    """SVE at 64 bytes in SVE format, SME at 32 with ZA on, FPMR, TPIDR_EL0, TPIDR2_EL0 set."""
    t = ba.target_for(FVP, sve_vl=64, sme_vl=32, za=True, sve_format=True)
    sve = bytearray(len(t.sve))
    sve[0:64] = bytes(range(64))  # Z0
    sve[2048:2056] = b"\xa5" * 8  # P0 (vl/8 = 8 bytes)
    sve[2048 + 16 * 8:2048 + 17 * 8] = b"\x3c" * 8  # FFR
    za = bytearray(len(t.za))
    za[32 * 3:32 * 4] = b"\x77" * 32  # row 3
    return replace(t, sve=bytes(sve), za=bytes(za), zt0=b"\x12" * 64, fpmr=0x1_0201_4045,
                   fpsr=0x8000010, fpcr=0x400000, tpidr=0xFFFF_8000_1234_5670,
                   tpidr2=0xFFFF_C000_0000_1F00)


def test_sve_regset_registers_at_their_offsets() -> None:
    blob = pt.regset_get(FVP, _thread(), pt.NT_ARM_SVE)
    [d] = ba.decode(blob, "sve")
    assert dict(d.section("header").fields) == {"size": 2224, "max_size": 2224, "vl": 64,
                                                "max_vl": 64, "flags": 1}
    assert d.register("Z0") == int.from_bytes(bytes(range(64)), "little")
    assert d.register("P0") == 0xA5A5A5A5A5A5A5A5
    assert d.register("FFR") == 0x3C3C3C3C3C3C3C3C
    assert d.section("FPSR/FPCR").offset == 0x8A0  # SVE_PT_SVE_FPSR_OFFSET(4)
    assert (d.register("FPSR"), d.register("FPCR")) == (0x8000010, 0x400000)
    assert d.warnings == ()


def test_za_rows_and_an_inactive_ssve() -> None:
    t = _thread()
    [za] = ba.decode(pt.regset_get(FVP, t, pt.NT_ARM_ZA), "za")
    assert za.register("ZA[3]") == int.from_bytes(b"\x77" * 32, "little")
    assert za.register("ZA[2]") == 0 and za.section("ZA").offset == 16
    # v6.17's NT_ARM_SSVE of a thread not in streaming mode: size 8, the V registers after it
    [ssve] = ba.decode(pt.regset_get(FVP, t, pt.NT_ARM_SSVE), "ssve")
    assert ssve.sections[1].name.startswith("inactive") and ssve.size == 16 + 528
    assert dict(ssve.sections[0].fields)["size"] == 8 and ssve.warnings == ()
    assert ssve.section("user_fpsimd_state").offset == 16
    [bare] = ba.decode(pt.regset_get(FVP, t, pt.NT_ARM_SSVE)[:16], "ssve")  # header alone
    assert bare.size == 16 and len(bare.sections) == 2


def test_fpmr_fields() -> None:
    [d] = ba.decode(struct.pack("<Q", 0x1_0201_4045), "fpmr")
    assert dict(d.section("FPMR").fields) == {"F8S1": 5, "F8S2": 0, "F8D": 1, "OSM": 1,
                                              "OSC": 0, "LSCALE": 1, "NSCALE": 2,
                                              "LSCALE2": 1}
    [bad] = ba.decode(struct.pack("<Q", 1 << 40), "fpmr")
    assert bad.warnings == ("FPMR bits 0x10000000000 are RES0",)


def test_header_warnings_and_errors() -> None:
    blob = bytearray(pt.regset_get(FVP, _thread(), pt.NT_ARM_SVE))
    struct.pack_into("<I", blob, 0, 2000)  # size
    struct.pack_into("<H", blob, 14, 3)  # __reserved
    [d] = ba.decode(bytes(blob) + b"\x01" * 16, "sve")
    assert d.warnings == ("header __reserved is 0x3, the kernel writes 0",
                          "size 2000 != SVE_PT_SIZE(4, SVE_PT_REGS_SVE) 2224",
                          "240 bytes after the header's size 2000 are not zero")
    with pytest.raises(BlobError, match="vl 24 is not a vector length"):
        ba.decode(struct.pack("<IIHHHH", 16, 0, 24, 0, 0, 0), "za")
    with pytest.raises(BlobError, match="the SVE payload at vl 64 needs 2216 bytes"):
        ba.decode(bytes(blob[:1000]), "sve")
    with pytest.raises(BlobError, match="needs --format"):
        ba.decode(b"\0" * 64, "auto")


def _frame(task: sig.SigTask, base: int = 0) -> bytes:
    return sig.encode_sigframe(sig.setup_sigframe_layout(FVP, task), task, base)


def test_sigframe_records_and_the_extra_context_address() -> None:
    task = sig.SigTask(FP_STATE_SVE, True, True, 64, 64, fpsr=0x11, fpmr=0x5)
    frame = bytearray(_frame(task, base=0x7FFF_F000_0000))
    frame[3392 + 16 + 64 * 5:3392 + 16 + 64 * 6] = b"\x66" * 64  # ZA row 5, in the extra space
    [d] = ba.decode(bytes(frame), "sigframe")
    names = [s.name for s in d.sections]
    assert names == ["sigcontext", "fpsimd_context", "sve_context", "SVE registers",
                     "tpidr2_context", "extra_context", "za_context", "ZA", "zt_context",
                     "ZT0", "fpmr_context", "terminator"]
    assert d.section("fpsimd_context").offset == 592  # RESERVED_OFFSET
    assert d.section("za_context").offset == 3392  # after extra_context and a terminator
    extra = dict(d.section("extra_context").fields)
    assert extra["frame_address"] == 0x7FFF_F000_0000
    assert dict(d.section("sve_context").fields) == {"vl": 64, "flags": 1, "streaming": 1}
    assert d.register("ZA[5]") == int.from_bytes(b"\x66" * 64, "little")
    assert (d.register("FPSR"), d.register("FPMR")) == (0x11, 0x5)
    assert d.warnings == ()


def test_a_frame_cut_short_or_with_an_unknown_record_is_reported() -> None:
    frame = bytearray(_frame(sig.SigTask(sve_vl=64, sme_vl=32)))
    struct.pack_into("<II", frame, 592 + 528, 0x12345678, 16)
    [d] = ba.decode(bytes(frame), "sigframe")
    assert d.warnings == ("unknown record magic 0x12345678 at 0x460: stopped there",)
    with pytest.raises(BlobError, match="struct rt_sigframe needs 4688 bytes"):
        ba.decode(bytes(frame[:4000]), "sigframe")


def test_arm64_core_notes_by_thread() -> None:
    t = _thread()
    core = build_core_notes([(41, [(pt.NT_PRFPREG, pt.regset_get(FVP, t, pt.NT_PRFPREG)),
                                   (pt.NT_ARM_SVE, pt.regset_get(FVP, t, pt.NT_ARM_SVE))]),
                             (42, [(pt.NT_ARM_FPMR, struct.pack("<Q", 9))])], EM_AARCH64)
    blobs = ba.decode(core, "auto")
    assert [(b.label, b.fmt) for b in blobs] == [("thread 41 NT_PRFPREG", "fpsimd"),
                                                  ("thread 41 NT_ARM_SVE", "sve"),
                                                  ("thread 42 NT_ARM_FPMR", "fpmr")]
    # V0 of the SVE-format state is the low 128 bits of Z0.
    assert blobs[0].register("V0") == int.from_bytes(bytes(range(16)), "little")
    with pytest.raises(BlobError, match="a core of EM_X86_64, not EM_AARCH64"):
        ba.decode(build_core([(1, bytes(576))]), "core")


def test_validate_ptrace_and_sigreturn() -> None:
    blob = pt.regset_get(FVP, _thread(), pt.NT_ARM_SVE)
    ok = ba.validate(blob, "sve", "ptrace", FVP, pt.RegsetTarget.fresh(FVP))
    assert ok.accepted and ok.after["sve_vl"] == 64 and ok.after["fp_type"] == FP_STATE_SVE
    # On Neoverse V1 (SVE at most 32 bytes) the VL becomes 32 and the data is refused.
    no = ba.validate(blob, "sve", "ptrace", V1, pt.RegsetTarget.fresh(V1))
    assert (no.ret, no.after["sve_vl"]) == (-pt.EIO, 32)
    frame = _frame(sig.SigTask(FP_STATE_SVE, False, False, 64, 32))
    assert ba.validate(frame, "sigframe", "sigreturn", FVP,
                       ba.target_for(FVP, sve_vl=64)).accepted
    v = ba.validate(frame, "sigframe", "sigreturn", FVP, ba.target_for(FVP, sve_vl=32))
    assert v.ret == -22 and "vl 64 != the task's 32" in v.reason
    with pytest.raises(BlobError, match="--as ptrace takes a regset format"):
        ba.validate(frame, "sigframe", "ptrace", FVP, pt.RegsetTarget.fresh(FVP))


def test_target_for_refuses_what_the_cpu_cannot() -> None:
    with pytest.raises(BlobError, match="SVE vl 48 is not one the CPU implements"):
        ba.target_for(FVP, sve_vl=48)
    with pytest.raises(BlobError, match="no SME"):
        ba.target_for(V1, za=True)
    with pytest.raises(BlobError, match="no SVE vector length"):
        ba.target_for(HostCaps.from_profile(load_profile("neoverse-n1")), sve_vl=16)


# -- the command line ------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    t = _thread()
    out = {}
    for fmt, note in ba.REGSET_FORMATS.items():
        out[fmt] = tmp_path / f"{fmt}.bin"
        out[fmt].write_bytes(pt.regset_get(FVP, t, note))
    out["core"] = tmp_path / "arm.core"
    out["core"].write_bytes(build_core_notes(
        [(7, [(n, pt.regset_get(FVP, t, n)) for n in pt.REGSETS])], EM_AARCH64))
    out["frame"] = tmp_path / "frame.bin"
    out["frame"].write_bytes(_frame(sig.SigTask(FP_STATE_SVE, False, True, 64, 32)))
    return out


def test_cli_decode_text_and_json(files, capsys) -> None:
    assert main(["decode", "--arch", "arm64", "--format", "sve", str(files["sve"])]) == 0
    text = capsys.readouterr().out
    assert "header at 0x0, 16 bytes: size 0x8b0, max_size 0x8b0, vl 0x40" in text
    assert "    P0       0xa5a5a5a5a5a5a5a5" in text and "(32 registers are zero)" not in text
    assert main(["decode", "--arch", "arm64", str(files["core"]), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # The notes in aarch64_regsets[] order, as fill_thread_core_info() dumps them.
    assert [o["source"] for o in out] == [f"thread 7 {pt.NOTE_NAMES[n]}" for n in pt.REGSETS]
    assert [o["source"] for o in out][:3] == ["thread 7 NT_PRFPREG", "thread 7 NT_ARM_TLS",
                                              "thread 7 NT_ARM_FPMR"]
    by = {o["source"]: o for o in out}
    assert by["thread 7 NT_ARM_FPMR"]["sections"][0]["registers"] == {
        "FPMR": "0x0000000102014045"}
    assert by["thread 7 NT_ARM_TLS"]["sections"][0]["registers"] == {
        "TPIDR_EL0": "0xffff800012345670", "TPIDR2_EL0": "0xffffc00000001f00"}


def test_cli_tls_decode_and_validate(files, capsys) -> None:
    assert main(["decode", "--arch", "arm64", "--format", "tls", str(files["tls"])]) == 0
    assert capsys.readouterr().out.splitlines()[1:4] == [
        "TLS at 0x0, 16 bytes", "    TPIDR_EL0 0xffff800012345670",
        "    TPIDR2_EL0 0xffffc00000001f00"]
    # tls_set() on a CPU without SME takes TPIDR_EL0 and ignores TPIDR2_EL0.
    assert main(["validate", "--arch", "arm64", "--as", "ptrace", "--format", "tls", "--cpu",
                 "neoverse-n1", str(files["tls"])]) == 0
    assert capsys.readouterr().out.splitlines()[1] == (
        "  after: tpidr_el0 0xffff800012345670, tpidr2_el0 0x0")
    files["tls"].write_bytes(files["tls"].read_bytes()[:12])
    assert main(["validate", "--arch", "arm64", "--as", "ptrace", "--format", "tls",
                 str(files["tls"])]) == 1
    assert "iov_len 12 is not a multiple of NT_ARM_TLS's register size 8" in \
        capsys.readouterr().out


def test_cli_validate_statuses(files, capsys) -> None:
    # A core written back note by note: the non-streaming thread's NT_ARM_SSVE (a header in
    # FPSIMD format) is refused, as the kernel refuses it; everything else is taken.
    assert main(["validate", "--arch", "arm64", "--as", "ptrace", str(files["core"])]) == 1
    lines = capsys.readouterr().out.splitlines()
    refused = [ln for ln in lines if "REFUSED" in ln]
    assert refused == ["thread 7 NT_ARM_SSVE: PTRACE_SETREGSET NT_ARM_SSVE: REFUSED (-EINVAL) "
                       "-- NT_ARM_SSVE: streaming mode data must be in SVE format "
                       "(SVE_PT_REGS_SVE)"]
    assert main(["validate", "--arch", "arm64", "--as", "ptrace", "--format", "za",
                 str(files["za"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["after"]["svcr.za"] is True
    assert main(["validate", "--arch", "arm64", "--as", "sigreturn", "--format", "sigframe",
                 str(files["frame"]), "--vl", "16"]) == 1
    assert "vl 64 != the task's 16" in capsys.readouterr().out
    assert main(["validate", "--arch", "arm64", "--as", "sigreturn", "--format", "sigframe",
                 str(files["frame"]), "--vl", "64"]) == 0


@pytest.mark.parametrize(("argv", "message"), [
    (["decode", "--format", "za", "F"], "--format za is an arm64 format: add --arch arm64"),
    (["decode", "--arch", "arm64", "F"], "needs --format"),
    (["decode", "--arch", "arm64", "--format", "uabi", "F"], "not an arm64 format"),
    (["decode", "--arch", "arm64", "--format", "sve", "pid:1"], "reads files only"),
    (["decode", "--arch", "arm64", "--format", "sve", "kvm:3"], "reads files only"),
    (["decode", "--arch", "arm64", "--format", "sve", "kvm_dump.bin"], "cannot read kvm_dump"),
    (["validate", "F", "--as", "ptrace", "--vl", "32"], "--vl is an arm64 option"),
    (["validate", "--arch", "arm64", "--as", "kvm", "--format", "sve", "F"],
     "unknown path 'kvm' for arm64"),
    (["validate", "--arch", "arm64", "--as", "ptrace", "--format", "sve", "--cpu", "nope",
      "F"], "--cpu:"),
    (["validate", "--arch", "arm64", "--as", "ptrace", "--format", "sve", "--cpu",
      "neoverse-v1", "--vl", "64", "F"], "SVE vl 64 is not one the CPU implements"),
    (["decode", "--arch", "arm64", "--format", "sve", "/nonexistent/x"], "cannot read"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, files, capsys) -> None:
    argv = [str(files["sve"]) if a == "F" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


# -- fuzz ------------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(fmt=st.sampled_from(ba.FORMATS), data=st.binary(max_size=5000))
def test_decode_reads_or_names_the_problem(fmt: str, data: bytes) -> None:
    try:
        blobs = ba.decode(data, fmt)
    except BlobError as e:
        assert str(e) and "\n" not in str(e)
        return
    for b in blobs:
        ba.render(b, "fuzz")
        json.dumps(b.to_dict())


@settings(max_examples=200, deadline=None)
@given(noise=st.binary(max_size=600), at=st.integers(0, 7000), length=st.integers(4688, 8000),
       records=st.lists(st.tuples(st.sampled_from([*sorted(sig._KNOWN), sig.EXTRA_MAGIC, 0]),
                                  st.integers(0, 5000)), max_size=6))
def test_sigframe_decode_and_sigreturn_on_record_chains(noise: bytes, at: int, length: int,
                                                        records) -> None:
    frame = bytearray(length)
    frame[at:at + len(noise)] = noise[:max(0, length - at)]
    at = sig.RESERVED_OFFSET
    for magic, size in records:  # plausible headers, so that the walk goes somewhere
        if at + 8 > len(frame):
            break
        struct.pack_into("<II", frame, at, magic, size)
        at += max(16, size & ~15)
    try:
        ba.decode(bytes(frame), "sigframe")
    except BlobError as e:
        assert "\n" not in str(e)
    v = ba.validate(bytes(frame), "sigframe", "sigreturn", FVP, pt.RegsetTarget.fresh(FVP))
    assert v.ret in (0, -22)


# -- encode ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(ba.REGSET_FORMATS))
def test_encode_of_decode_is_byte_exact(fmt: str) -> None:
    blob = pt.regset_get(FVP, _thread(), ba.REGSET_FORMATS[fmt])
    obj = json.loads(json.dumps(ba.decode(blob, fmt)[0].to_dict()))
    assert ba.encode(obj) == blob


def test_encode_writes_an_edited_register_and_refuses_an_edited_field() -> None:
    task = sig.SigTask(FP_STATE_SVE, True, True, 64, 64, fpmr=5)
    frame = _frame(task, base=0x7FFF_F000_0000)
    obj = json.loads(json.dumps(ba.decode(frame, "sigframe")[0].to_dict()))
    assert ba.encode(obj) == frame
    za = next(s for s in obj["sections"] if s["name"] == "ZA")
    za["registers"]["ZA[5]"] = "0x" + "ab" * 64
    out = ba.encode(obj)
    at = za["offsets"]["ZA[5]"]
    assert at == 3392 + 16 + 5 * 64 and out[at:at + 64] == b"\xab" * 64
    assert out[:at] == frame[:at] and out[at + 64:] == frame[at + 64:]
    sve = next(s for s in obj["sections"] if s["name"] == "sve_context")
    sve["fields"]["vl"] = 32
    with pytest.raises(BlobError, match="sve_context: field vl is 32 in the JSON but 0x40"):
        ba.encode(obj)


@pytest.mark.parametrize(("obj", "message"), [
    ({"arch": "x86"}, "not an arm64 blob object"),
    ({"arch": "arm64", "format": "core", "size": 0}, "cannot be encoded"),
    ({"arch": "arm64", "format": "zt", "size": -1}, "is not a byte count"),
    ({"arch": "arm64", "format": "zt", "size": 64, "extra": [{"offset": 60, "hex": "0102030405"}]},
     "outside the 64-byte blob"),
    ({"arch": "arm64", "format": "zt", "size": 64,
      "sections": [{"name": "ZT0", "registers": {"ZT0": "0x1" + "0" * 128}}]}, "does not fit"),
    ({"arch": "arm64", "format": "zt", "size": 64,
      "sections": [{"name": "ZA", "registers": {}}]}, "section 'ZA' is not in the blob"),
    ({"arch": "arm64", "format": "fpmr", "size": 8,
      "sections": [{"name": "FPMR", "registers": {"FPMR": "zz"}}]}, "is not a number"),
])
def test_encode_errors(obj, message) -> None:
    with pytest.raises(BlobError, match=message):
        ba.encode(obj)


def test_cli_encode_round_trip_and_errors(files, tmp_path, capsys) -> None:
    assert main(["decode", "--arch", "arm64", "--format", "za", str(files["za"]), "--json"]) == 0
    js = tmp_path / "za.json"
    js.write_text(capsys.readouterr().out)
    out = tmp_path / "za.bin"
    assert main(["encode", str(js), "-o", str(out)]) == 0
    assert out.read_bytes() == files["za"].read_bytes()
    assert main(["encode", str(js), "--format", "xsave"]) == 2
    assert "encoded in its own format only" in capsys.readouterr().err


@settings(max_examples=300, deadline=None)
@given(fmt=st.sampled_from(sorted(ba.REGSET_FORMATS)), vl=st.sampled_from([16, 32, 64]),
       data=st.binary(max_size=2300))
def test_encode_reproduces_whatever_decodes(fmt: str, vl: int, data: bytes) -> None:
    if fmt in ("sve", "ssve", "za") and len(data) >= 10:
        data = data[:8] + vl.to_bytes(2, "little") + data[10:]
    try:
        [d] = ba.decode(data, fmt)
    except BlobError:
        return
    assert ba.encode(json.loads(json.dumps(d.to_dict()))) == data
