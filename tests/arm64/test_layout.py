"""``fpstate layout --arch arm64`` (fpstate.arm64.layout): the uapi offsets at a vector length,
checked against the regsets and records the kernel models write, and the command line."""

from __future__ import annotations

import json

import pytest

from fpstate.arm64.cpu import load_profile
from fpstate.arm64.layout import fpsimd_rows, sve_rows, za_rows
from fpstate.cli import main
from fpstate.kernel.arm64 import ptrace as pt
from fpstate.kernel.arm64 import signal as sig
from fpstate.kernel.arm64.state import FP_STATE_SVE, HostCaps
from fpstate.tools import blob_arm64 as ba

FVP = HostCaps.from_profile(load_profile("fvp-aem-fpmr"))


def _by_name(rows):
    return {r.name: r for r in rows}


def test_sve_offsets_at_64_bytes() -> None:
    r = _by_name(sve_rows(64))
    assert (r["Z1"].regset, r["Z31"].regset) == (0x50, 0x7D0)
    assert (r["P0"].regset, r["P0"].size, r["FFR"].regset) == (0x810, 8, 0x890)
    assert (r["FPSR"].regset, r["FPCR"].regset, r["FPSR"].sigframe) == (0x8A0, 0x8A4, None)
    # SVE_PT_SIZE(4, SVE) and SVE_SIG_CONTEXT_SIZE(4) = 16 + 2184.
    assert (r["total"].regset, r["total"].sigframe) == (0x8B0, 0x898)
    assert r["Z0"].sigframe == sig.sve_sig_context_size(4) - 2184


def test_za_zt_and_fpsimd_offsets() -> None:
    r = _by_name(x for x in za_rows(32) if x.group != "ZT0")
    assert (r["ZA[31]"].regset, r["ZA[31]"].sigframe, r["total"].regset) == (0x3F0, 0x3F0, 0x410)
    assert [x.name for x in za_rows(32, sme2=False)][-1] == "total"
    zt = [x for x in za_rows(32) if x.group == "ZT0"]
    assert [(x.regset, x.sigframe) for x in zt] == [(0, 16), (64, 80)]
    f = _by_name(fpsimd_rows())
    assert (f["V31"].regset, f["V31"].sigframe, f["FPSR"].sigframe) == (0x1F0, 0x200, 8)
    with pytest.raises(ValueError, match="vl 40"):
        sve_rows(40)


def test_layout_agrees_with_what_the_kernel_models_write() -> None:
    t = ba.target_for(FVP, sve_vl=64, sve_format=True)
    [d] = ba.decode(pt.regset_get(FVP, t, pt.NT_ARM_SVE), "sve")
    assert d.section("FPSR/FPCR").offset == _by_name(sve_rows(64))["FPSR"].regset
    task = sig.SigTask(FP_STATE_SVE, sve_vl=64, sme_vl=32)
    layout = sig.setup_sigframe_layout(FVP, task)
    # preserve_sve_context() writes SVE_SIG_CONTEXT_SIZE rounded up to 16 in head.size.
    total = _by_name(sve_rows(64))["total"].sigframe
    assert layout.record("sve").size == (total + 15) & ~15 == 2208


def test_cli(capsys) -> None:
    assert main(["layout", "--arch", "arm64", "--cpu", "apple-m4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    groups = list(dict.fromkeys(r["group"] for r in rows))
    assert groups == ["FPSIMD", "streaming SVE at SVL 64", "ZA at SVL 64", "ZT0"]
    assert main(["layout", "--arch", "arm64", "--vl", "16"]) == 0
    assert "SVE at vl 16" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "message"), [
    (["layout", "--vl", "32"], "--vl is an arm64 option"),
    (["layout", "--arch", "arm64", "--vl", "48"], "fvp-aem-fpmr implements 16, 32, 64"),
    (["layout", "--arch", "arm64", "--cpu", "neoverse-n1", "--vl", "16"], "no SVE and no SME"),
    (["layout", "--arch", "arm64", "--cpu", "host"], "this machine is not arm64"),
    (["layout", "--arch", "arm64", "--mask", "avx"], "--mask is an x86 option"),
])
def test_cli_errors(argv, message, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
