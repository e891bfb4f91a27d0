"""decode, encode, validate, record and translate through fpstate.cli.main: outputs, exit
statuses, and one line + exit 2 for bad input; the pid: and kvm sources on this host."""

from __future__ import annotations

import json
import os
import signal
import struct
import time
from pathlib import Path

import pytest

from fpstate.cli import main
from fpstate.errors import HostUnavailable
from fpstate.tools.blob import decode
from fpstate.x86.profiles import bundled_profile


def zen4_sigframe() -> bytes:
    data = bytearray(2444)
    struct.pack_into("<H", data, 0, 0x37F)
    struct.pack_into("<I", data, 24, 0x1F80)
    struct.pack_into("<IIQI", data, 464, 0x46505853, 2444, 0x2E7, 2440)
    struct.pack_into("<Q", data, 512, 0xA3)
    struct.pack_into("<Q", data, 0x340 + 8, 0xDEADBEEF)  # k1
    data[0x580:0x584] = b"\x11\x22\x33\x44"  # zmm16
    struct.pack_into("<I", data, 2440, 0x46505845)
    return bytes(data)


@pytest.fixture
def frame(tmp_path: Path) -> Path:
    p = tmp_path / "frame.bin"
    p.write_bytes(zen4_sigframe())
    return p


def test_decode_text_marks_init_and_names_registers(frame, capsys) -> None:
    assert main(["decode", str(frame), "--cpu", "zen4"]) == 0
    out = capsys.readouterr().out
    assert "sigframe, 2444 bytes, CPU zen4 (detected: FP_XSTATE_MAGIC1" in out
    assert "[5] opmask at 0x340, 64 bytes: in use" in out
    assert "    k1          0x00000000deadbeef" in out
    assert "[2] avx at 0x240, 256 bytes: init" in out
    assert "magic2 0x46505845" in out


def test_decode_json_encode_round_trip(frame, tmp_path, capsys) -> None:
    assert main(["decode", str(frame), "--cpu", "zen4", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["blob_format"] == "sigframe" and obj["components"][5]["registers"]["zmm16"]
    j = tmp_path / "f.json"
    j.write_text(json.dumps(obj))
    out = tmp_path / "back.bin"
    assert main(["encode", str(j), "--cpu", "zen4", "-o", str(out)]) == 0
    assert out.read_bytes() == frame.read_bytes()
    assert main(["encode", str(j), "--cpu", "zen4", "--format", "xsavec", "-o", str(out)]) == 0
    blob = decode(out.read_bytes(), bundled_profile("zen4"))
    assert blob.fmt == "xsavec" and blob.register("k1") == 0xDEADBEEF


def test_validate_exit_status(frame, tmp_path, capsys) -> None:
    assert main(["validate", str(frame), "--cpu", "zen4", "--as", "sigreturn"]) == 0
    bad = bytearray(frame.read_bytes())
    struct.pack_into("<Q", bad, 512, 0xA3 | 1 << 3)  # BNDREGS: not in Linux's XCR0 on zen4
    p = tmp_path / "bad.bin"
    p.write_bytes(bytes(bad))
    assert main(["validate", str(p), "--cpu", "zen4", "--as", "sigreturn"]) == 1
    out = capsys.readouterr().out
    assert "REFUSED (SIGSEGV)" in out and "#GP(XSTATE_BV 0xab has bits outside XCR0" in out
    assert main(["validate", str(p), "--cpu", "zen4", "--as", "ptrace", "--json"]) == 1
    v = json.loads(capsys.readouterr().out.splitlines()[-1])
    # 2444 bytes: ptrace_regset's iov_len check comes before xstateregs_set's size check.
    assert v["result"] == "-EINVAL" and "multiple of the regset unit" in v["rule"]


def test_record_and_translate(frame, tmp_path, capsys) -> None:
    rec = tmp_path / "r.json"
    assert main(["record", str(frame), "--cpu", "zen4", "-o", str(rec)]) == 0
    out = tmp_path / "spr.json"
    assert main(["translate", str(rec), "--to", "sapphire-rapids", "-o", str(out)]) == 0
    assert main(["decode", str(out), "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["cpu"] == "sapphire-rapids (record)" and obj["size"] == 11008
    comp = {c["name"]: c for c in obj["components"]}
    assert comp["opmask"]["offset"] == 0x440 and comp["opmask"]["registers"]["k1"] == \
        "0x00000000deadbeef"
    assert main(["translate", str(rec), "--to", "haswell"]) == 1
    assert "haswell cannot hold the state: opmask (component 5)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["decode", "/nonexistent"], "cannot read /nonexistent"),
    (["decode", "pid:abc"], "pid:TID needs a thread id"),
    (["decode", "/dev/null", "--cpu", "zen4"], "blob is 0 bytes"),
    (["decode", "/dev/null", "--cpu", "nosuchcpu"], "unknown profile 'nosuchcpu'"),
    (["encode", "/dev/null", "--cpu", "zen4"], "blob JSON does not parse"),
    (["translate", "/dev/null", "--to", "zen4"], "state record JSON does not parse"),
    (["validate", "/dev/null", "--cpu", "zen4", "--as", "kvm"], "576-byte"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


# -- live sources on this host --------------------------------------------------------------------

@pytest.mark.host
def test_decode_a_running_thread_by_pid(capsys) -> None:
    from fpstate.host.child import (
        Asm,
        CodePages,
        SharedMemory,
        fork_child,
        load_patterns,
        pattern_table,
        register_class,
        zmm_pattern,
    )

    try:
        rc = register_class()
    except HostUnavailable as e:
        pytest.skip(str(e))
    shm = SharedMemory(4096)
    shm.write(0, pattern_table(0x31))

    def body() -> int:
        pages = CodePages(1)
        a = Asm()
        load_patterns(a, shm.address)
        a.mov_imm(a.R.RAX, 1)
        a.store_rax(shm.address + 4000)
        a.label("again")
        a.syscall(34)  # pause()
        a.jump("JMP_REL32_64", "again")
        pages.call(pages.place(0, a))
        return 6

    pid = fork_child(body)
    try:
        deadline = time.monotonic() + 20
        while shm.u64(4000) != 1:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert main(["decode", f"pid:{pid}", "--json"]) == 0
        assert os.waitpid(pid, os.WNOHANG) == (0, 0)  # detached, still running
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    obj = json.loads(capsys.readouterr().out)
    regs = {k: v for c in obj["components"] for k, v in c["registers"].items()}
    last = 31 if rc.vector_bytes == 64 else 15
    name = "zmm31" if last == 31 else "xmm15"
    width = 64 if last == 31 else 16
    assert int(regs[name], 16) == int.from_bytes(zmm_pattern(last, 0x31)[:width], "little")


@pytest.mark.host
def test_decode_a_kvm_vcpu(capsys) -> None:
    """KVM_GET_XSAVE2 of a guest that loaded zmm0-31/k0-7 itself: the kvm format, XCR0 at 464,
    and the registers the guest loaded."""
    from fpstate.host.child import opmask_pattern, zmm_pattern

    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm")
    try:
        assert main(["decode", "kvm:0x21", "--json"]) == 0
    except HostUnavailable as e:
        pytest.skip(str(e))
    obj = json.loads(capsys.readouterr().out)
    assert obj["blob_format"] == "kvm" and obj["size"] >= 4096
    regs = {k: v for c in obj["components"] for k, v in c["registers"].items()}
    if "zmm17" not in regs:
        pytest.skip(f"the guest's XCR0 {obj['xcr0']} lacks AVX-512")
    assert int(regs["zmm17"], 16) == int.from_bytes(zmm_pattern(17, 0x21), "little")
    assert int(regs["k5"], 16) == opmask_pattern(5, 0x21)


def test_validate_an_ia32_frame(tmp_path, capsys) -> None:
    from tests.tools.test_validate import ia32_fpstate

    p = tmp_path / "frame32.bin"
    frame = bytearray(ia32_fpstate("zen4"))
    p.write_bytes(bytes(frame))
    assert main(["validate", str(p), "--cpu", "zen4", "--as", "sigreturn-ia32"]) == 0
    assert "sigreturn-ia32: accepted (0)" in capsys.readouterr().out
    struct.pack_into("<I", frame, 112 + 24, 0xFFFF1F80)
    p.write_bytes(bytes(frame))
    assert main(["validate", str(p), "--cpu", "zen4", "--as", "sigreturn-ia32"]) == 1
    assert "copy_uabi_to_xstate" in capsys.readouterr().out
    p.write_bytes(bytes(640))
    assert main(["validate", str(p), "--cpu", "zen4", "--as", "sigreturn-ia32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fsave header" in err[0]


@pytest.mark.parametrize(("name", "value", "fsw", "note"), [
    ("fsw", 0x3800, 0, "TOP 7"),
    ("fsw", 0xB9C1, 0, "TOP 7 IE SF ES C0 B"),
    ("ftw", 0x80, 0x3800, "non-empty: ST(0)"),
    ("ftw", 0x81, 0x3000, "non-empty: ST(1), ST(2)"),
    ("fop", 0x3AB, 0, "FLD m80fp, DB /5"),
    ("fop", 0x1EE, 0, "FLDZ, D9 EE"),
    ("fop", 0x7FF, 0, "no x87 instruction"),
    ("fcw", 0x37F, 0, ""),
])
def test_x87_fields_are_explained(name: str, value: int, fsw: int, note: str) -> None:
    """FSW's TOP and flags, the ST(i) the abridged tag byte marks (physical register j is
    ST((j - TOP) mod 8)), and the instruction FOP names."""
    from fpstate.tools.registers import x87_note

    assert x87_note(name, value, fsw) == note


def test_decode_text_explains_the_x87_fields(tmp_path: Path, capsys) -> None:
    area = bytearray(576)
    struct.pack_into("<HHBBHQQI", area, 0, 0x37F, 0x3800, 0x80, 0, 0x3AB, 0x401000, 0, 0x1F80)
    area[512] = 1
    (tmp_path / "x87.bin").write_bytes(bytes(area))
    assert main(["decode", str(tmp_path / "x87.bin"), "--cpu", "zen4", "--format", "xsave"]) == 0
    out = capsys.readouterr().out
    assert "fop         0x03ab  (FLD m80fp, DB /5)" in out
    assert "ftw         0x80  (non-empty: ST(0))" in out
