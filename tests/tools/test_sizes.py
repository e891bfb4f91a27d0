"""fpstate sizes: the figures of the models on every bundled CPU, the exact JSON keys, and this
machine's measurements agreeing with the prediction."""

from __future__ import annotations

import json
import os

import pytest

from fpstate.cli import main
from fpstate.errors import HostUnavailable
from fpstate.kernel.x86.versions import version_for_release
from fpstate.tools.sizes import KEYS, compute_sizes, measure_host
from fpstate.x86.profiles import bundled_profile, list_profiles, load_profile

TOP = ["user_default_size", "user_max_size", "kernel_default_size", "kernel_max_size",
       "at_minsigstksz", "sigframe_xstate_size", "sigaltstack_min", "ptrace_xstate_size",
       "kvm_xsave2_size"]


@pytest.mark.parametrize("name", sorted(list_profiles()))
def test_json_keys_are_exactly_the_documented_ones(name: str, capsys) -> None:
    assert main(["sizes", "--cpu", name, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == TOP
    assert list(out["sigframe_xstate_size"]) == ["no_perm", "perm_unused", "in_use"]
    assert list(out["sigaltstack_min"]) == ["no_perm", "perm"]
    assert list(out["kvm_xsave2_size"]) == ["no_guest_perm", "guest_perm"]
    assert out["ptrace_xstate_size"] == out["user_max_size"]
    assert out["kvm_xsave2_size"]["no_guest_perm"] >= 4096


def test_sapphire_rapids_figures() -> None:
    """AMX: default sizes without tile data, max with it; the frame grows only once the tiles
    are used; sigaltstack needs max_frame_size - (11008 + 4 + 112) + 11008 + 1 with the
    permission; KVM_CAP_XSAVE2 grows with the guest permission."""
    s = compute_sizes(bundled_profile("sapphire-rapids")).to_dict()
    assert (s["user_default_size"], s["user_max_size"]) == (2816, 11008)
    assert (s["kernel_default_size"], s["kernel_max_size"]) == (2560, 10752)
    assert s["at_minsigstksz"] == 11952
    assert s["sigframe_xstate_size"] == {"no_perm": 2816, "perm_unused": 2816, "in_use": 11008}
    assert s["sigaltstack_min"] == {"no_perm": 2048, "perm": 11952 - 11124 + 11008 + 1}
    assert s["kvm_xsave2_size"] == {"no_guest_perm": 4096, "guest_perm": 11008}


def test_zen4_has_no_dynamic_feature() -> None:
    s = compute_sizes(bundled_profile("zen4"))
    assert s.figure("sigframe_xstate_size.in_use").value == 2440
    assert "EOPNOTSUPP" in s.figure("sigframe_xstate_size.in_use").rule
    assert s.figure("kvm_xsave2_size.guest_perm").value == 4096


def test_every_figure_names_its_rule() -> None:
    s = compute_sizes(bundled_profile("granite-rapids"), "6.6")
    assert tuple(f.key for f in s.figures) == KEYS and s.kernel == "6.6"
    assert all(f.rule for f in s.figures)
    assert s.figure("ptrace_xstate_size").rule.startswith("update_regset_xstate_info()")


def test_bad_input(capsys) -> None:
    assert main(["sizes", "--cpu", "no-such-cpu"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.host
def test_host_measurements_agree_with_the_model(capsys) -> None:
    """Every figure this machine can answer (signal frames, ptrace, auxv, sigaltstack, the boot
    log, KVM_CAP_XSAVE2, with and without the AMX permission requests) equals the model's."""
    try:
        host = load_profile("host")
    except HostUnavailable as e:
        pytest.skip(str(e))
    predicted = compute_sizes(host, version_for_release(os.uname().release).name)
    measured = measure_host(predicted, host)
    got = {f.key: f.measured for f in measured.figures if f.measured is not None}
    assert {"user_default_size", "user_max_size", "at_minsigstksz", "ptrace_xstate_size",
            "sigframe_xstate_size.no_perm", "sigaltstack_min.no_perm"} <= set(got)
    for f in measured.figures:
        if f.measured is not None:
            assert f.measured == f.value, (f.key, f.how)
        else:
            assert f.how, f.key  # says why it was not measured
    from fpstate.host.amx import amx_unavailable

    in_use = measured.figure("sigframe_xstate_size.in_use")
    why = amx_unavailable()
    assert (in_use.measured is None and in_use.how == why) if why else in_use.measured
    assert main(["sizes", "--cpu", "host"]) == 0
    assert "DIFFERS" not in capsys.readouterr().out
