"""``fpstate sizes --arch arm64`` (fpstate.tools.sizes_arm64): every figure of the bundled arm64
profiles with the number the kernel rules give, and the command line's answers and errors."""

from __future__ import annotations

import json

import pytest

from fpstate.arm64.cpu import load_profile
from fpstate.cli import main
from fpstate.kernel.arm64 import signal as sig
from fpstate.kernel.arm64.state import FP_STATE_SVE, HostCaps
from fpstate.tools.sizes_arm64 import compute_sizes

#: profile -> the figures (4720 = the 4688-byte struct rt_sigframe + a 16-byte frame record +
#: 16; 2224 = SVE_PT_SIZE(4, SVE); 4112 = ZA_PT_SIZE(4); 4608 = 64 * 64 + 512).
EXPECTED = {
    "fvp-aem-fpmr": {
        "at_minsigstksz": 4720, "sigaltstack_min": 5120,
        "sigframe_size": {"fpsimd": 4688, "sve_max": 4688, "streaming_za_max": 7616},
        "ptrace": {"fpsimd": 528, "tls": 16, "sve_max_size": 2224, "ssve_max_size": 2224,
                   "za_max_size": 4112, "zt": 64, "fpmr": 8},
        "thread": {"sve_state": 2184, "sme_state": 4608}, "kvm": {"vcpu_sve_state": 2184}},
    "apple-m4": {
        "at_minsigstksz": 4720, "sigaltstack_min": 5120,
        "sigframe_size": {"fpsimd": 4688, "streaming_za_max": 7600},
        "ptrace": {"fpsimd": 528, "tls": 16, "ssve_max_size": 2224, "za_max_size": 4112, "zt": 64},
        "thread": {"sve_state": 2184, "sme_state": 4608}},
    "neoverse-v1": {
        "at_minsigstksz": 4720, "sigaltstack_min": 5120,
        "sigframe_size": {"fpsimd": 4688, "sve_max": 4688},
        "ptrace": {"fpsimd": 528, "tls": 16, "sve_max_size": 1136},
        "thread": {"sve_state": 1092}, "kvm": {"vcpu_sve_state": 1092}},
    "neoverse-n1": {
        "at_minsigstksz": 4720, "sigaltstack_min": 5120, "sigframe_size": {"fpsimd": 4688},
        "ptrace": {"fpsimd": 528, "tls": 16}},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_figures_of_each_profile(name: str) -> None:
    assert compute_sizes(load_profile(name)).to_dict() == EXPECTED[name]


def test_at_minsigstksz_leaves_za_out_so_a_za_frame_is_larger() -> None:
    # setup_sigframe_layout(add_all) sizes ZA by the boot task's PSTATE.ZA (off): the frame of
    # a thread with ZA on at the largest SVL exceeds both AT_MINSIGSTKSZ and MINSIGSTKSZ.
    caps = HostCaps.from_profile(load_profile("fvp-aem-fpmr"))
    za = sig.setup_sigframe_layout(caps, sig.SigTask(FP_STATE_SVE, sm=True, za=True,
                                                     sve_vl=64, sme_vl=64))
    assert za.record("za").size == 16 + 64 * 64 and za.extra_offset
    assert sig.sigframe_size(za) == 7616 > sig.minsigstksz(caps) == 4720
    every = sig.setup_sigframe_layout(caps, None, add_all=True)
    assert every.record("za").size == 16 and every.record("zt") is not None


def test_cli_table_and_json(capsys) -> None:
    assert main(["sizes", "--arch", "arm64", "--cpu", "neoverse-v1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == EXPECTED["neoverse-v1"]
    assert main(["sizes", "--arch", "arm64"]) == 0
    out = capsys.readouterr().out
    assert "arm64 FP sizes of fvp-aem-fpmr under kernel 6.17" in out and "7616" in out
    # An x86 table of kernel 6.17 is still an xstate table.
    assert main(["sizes", "--cpu", "zen4", "--kernel", "6.17"]) == 0
    assert "xstate sizes of zen4 under kernel 6.17" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "message"), [
    (["sizes", "--arch", "arm64", "--cpu", "zen4"], "neither a bundled arm64 profile"),
    (["sizes", "--arch", "arm64", "--cpu", "host"], "this machine is not arm64"),
    (["sizes", "--arch", "arm64", "--kernel", "6.18"], "--kernel 6.18 is an x86 kernel"),
])
def test_cli_errors_are_one_line_exit_2(argv, message, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
