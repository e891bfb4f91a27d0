"""``fpstate layout`` and ``fpstate cpus`` through fpstate.cli.main: exit status, stdout, stderr."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from fpstate.cli import main
from fpstate.host import native

DATA = Path(__file__).resolve().parent / "data"


def _json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(["layout", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_sapphire_rapids_amx(capsys: pytest.CaptureFixture[str]) -> None:
    out = _json(capsys, "--cpu", "sapphire-rapids", "--mask", "0x602e7")
    assert set(out) == {"mask", "standard_size", "compacted_size", "features"}
    assert (out["mask"], out["standard_size"], out["compacted_size"]) == (0x602E7, 11008, 10752)
    assert out["features"][-1] == {"number": 18, "name": "xtiledata", "size": 8192,
                                   "offset": 0xB00, "compacted_offset": 2560, "aligned": True,
                                   "xfd": True}
    assert [f["number"] for f in out["features"]] == [0, 1, 2, 5, 6, 7, 9, 17, 18]


def test_json_default_mask_is_everything_enumerated(capsys: pytest.CaptureFixture[str]) -> None:
    out = _json(capsys, "--cpu", "zen4")
    assert out["mask"] == 0x2E7 | 0x1800
    assert (out["standard_size"], out["compacted_size"]) == (0x988, 2480)
    cet_s = out["features"][-1]
    assert (cet_s["number"], cet_s["offset"], cet_s["compacted_offset"]) == (12, 0, 2456)


def test_mask_accepts_hex_without_0x_and_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert _json(capsys, "--cpu", "zen4", "--mask", "207")["compacted_size"] == 840
    assert _json(capsys, "--cpu", "zen4", "--mask", "x87|sse|pkru")["compacted_size"] == 584


def test_cpuid_r_file(capsys: pytest.CaptureFixture[str]) -> None:
    out = _json(capsys, "--cpu", str(DATA / "epyc-zen5-kvm.cpuid-r.txt"))
    assert (out["mask"], out["standard_size"], out["compacted_size"]) == (0x18E7, 0x980, 0x9A8)


def test_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["layout", "--cpu", "zen4"]) == 0
    out = capsys.readouterr().out
    assert "XSAVE layout of zen4 (AMD EPYC 9654 96-Core Processor), mask 0x1ae7" in out
    assert "standard size:  2440 (0x988) bytes" in out
    assert "compacted size: 2480 (0x9b0) bytes" in out
    row = next(line for line in out.splitlines() if "cet_kernel" in line)
    assert "-" in row.split("│")[4] and "2456 (0x998)" in row
    pkru = next(line for line in out.splitlines() if " pkru " in line)
    assert "2432 (0x980)" in pkru  # AMD's PKRU offset


def test_host_off_x86_falls_back_to_zen4(capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "is_x86_64", lambda: False)
    monkeypatch.setattr(native.platform, "machine", lambda: "aarch64")
    assert main(["layout", "--cpu", "host", "--json"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["mask"] == 0x1AE7
    assert cap.err == ("fpstate: note: the host is aarch64, not x86-64: using the bundled "
                       "profile 'zen4'\n")


@pytest.mark.host
def test_host_layout_matches_cpuid(capsys: pytest.CaptureFixture[str]) -> None:
    if not native.is_x86_64():
        pytest.skip("host is not x86-64: CPUID cannot be executed")
    out = _json(capsys, "--cpu", "host")
    sub0, sub1 = native.cpuid(0xD, 0), native.cpuid(0xD, 1)
    assert out["mask"] == (sub0[3] << 32 | sub0[0]) | (sub1[3] << 32 | sub1[2])
    # EBX: the size for the XCR0 in force; ECX: for every bit of EAX -- unless a hypervisor
    # masks components out of EAX and leaves their sub-leaves (this machine's AMX: ECX counts
    # TILEDATA's end, see tests/host/test_host_cpuid.py).
    if native.xgetbv(0) == sub0[3] << 32 | sub0[0]:
        assert out["standard_size"] == sub0[1]
    extra = [i for i in range(2, 63) if native.cpuid(0xD, i)[0]
             and not native.cpuid(0xD, i)[2] & 1 and not out["mask"] >> i & 1]
    if not extra:
        assert out["standard_size"] == sub0[2]


def test_cpus(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cpus"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "sapphire-rapids" in x)
    assert "intel" in line and "w7-2475X" in line and "0x602e7" in line and "0xdd00" in line
    assert main(["cpus", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"haswell", "skylake-sp", "icelake-sp", "sapphire-rapids", "alder-lake", "zen2",
            "zen3", "zen4", "zen5"} <= set(rows)
    assert rows["zen2"]["xcr0_supported"] == 0x207 and rows["haswell"]["xss_supported"] == 0


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert main(argv) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    assert cap.err.count("\n") == 1 and cap.err.startswith("fpstate: error: "), cap.err
    assert message in cap.err, cap.err


def test_unknown_profile(capsys: pytest.CaptureFixture[str]) -> None:
    _fails(capsys, ["layout", "--cpu", "pentium4"],
           "unknown profile 'pentium4': not 'host', a bundled profile (alder-lake,")


def test_garbled_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    text = (DATA / "epyc-zen5-kvm.cpuid-r.txt").read_text()
    bad.write_text(text.replace("ebx=0x000009a8", "ebx=0x0000-9a8"))
    _fails(capsys, ["layout", "--cpu", str(bad)], "bad.txt line 19: not a 'cpuid -r' register")
    cut = tmp_path / "cut.txt"
    cut.write_text(text[:2000])  # whole lines: 'CPU 0:' and leaves 0x0 .. 0xd sub-leaf 0xc
    _fails(capsys, ["layout", "--cpu", str(cut)], "cut.txt: truncated: CPUID leaf 0x1c is missing")
    cut.write_text(text[:2040])  # and leaf 0xe, and half of leaf 0xf's line
    _fails(capsys, ["layout", "--cpu", str(cut)], "cut.txt line 27: not a 'cpuid -r' register")


def test_unsupported_mask_bits(capsys: pytest.CaptureFixture[str]) -> None:
    _fails(capsys, ["layout", "--cpu", "zen3", "--mask", "0x602e7"],
           "mask 0x602e7: bits opmask|zmm_hi256|hi16_zmm|xtilecfg|xtiledata (0x600e0) are not "
           "supported by zen3")


def test_bad_mask_text(capsys: pytest.CaptureFixture[str]) -> None:
    _fails(capsys, ["layout", "--cpu", "zen4", "--mask", "0xZZ"], "mask '0xZZ'")
    _fails(capsys, ["layout", "--cpu", "zen4", "--mask", "1" + "0" * 17],
           "mask 0x100000000000000000 is not a 64-bit value")


def test_corpus_object_of_ones_own(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A corpus-format object without 'source' (one written by hand) is named by its file;
    a garbled register in it is named by leaf and sub-leaf."""
    corpus = json.loads(gzip.decompress((DATA / "cpuid-corpus.json.gz").read_bytes()))
    entry = next(e for e in corpus if e.get("microarch_tag") == "SapphireRapids_05")
    del entry["source"]
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps(entry))
    assert _json(capsys, "--cpu", str(mine), "--mask", "0x602e7")["standard_size"] == 11008
    entry["cpuid_raw_cpu0"]["0x00000001"]["0"][2] = "0xZZ"
    mine.write_text(json.dumps(entry))
    _fails(capsys, ["layout", "--cpu", str(mine)],
           "mine.json: cpuid_raw_cpu0 leaf '0x00000001' sub-leaf '0': '0xZZ' is not a hex number")
