"""fpstate template --arch arm64: the common SVE maximum, the ID register fields lowered or left
different, the template built on each host by the KVM/arm64 model, and `compat --arch arm64`
agreeing that a uniform template makes the move safe both ways."""

from __future__ import annotations

import itertools
import json

import pytest

from fpstate.arm64.cpu import bundled_profile_names, load_profile
from fpstate.cli import main
from fpstate.tools.compat_arm64 import VmConfig, compat_arm64
from fpstate.tools.template_arm64 import (
    Arm64TemplateError,
    common_sve_max_vq,
    pool_template_arm64,
)

NAMES = sorted(bundled_profile_names())
P = {n: load_profile(n) for n in NAMES}


def test_common_sve_max_vq() -> None:
    f = frozenset
    assert common_sve_max_vq([f({1, 2}), f({1})]) == 1
    assert common_sve_max_vq([f({1, 2, 4}), f({1, 2})]) == 2
    assert common_sve_max_vq([f({1, 2, 4}), f({1, 2, 3, 4})]) == 2  # 3 only on one below 4
    assert common_sve_max_vq([f({1, 2, 4}), f({1, 2, 4, 8})]) == 4
    assert common_sve_max_vq([f({2}), f({1, 2})]) == 0


def test_neoverse_v1_and_v2() -> None:
    """V1 implements 128 and 256-bit SVE, V2 128 only: the guest gets 128; V2's SVE2 and its
    crypto fields come down to V1's; both hosts take it and show the same."""
    t = pool_template_arm64([P["neoverse-v1"], P["neoverse-v2"]])
    assert t.sve and t.sve_max_vl_bits == 128
    assert "SVE maximum vector length 128 bits (from 256 on neoverse-v1)" in t.lowered
    assert "ID_AA64ZFR0_EL1.SVEver lowered to IMP (from SVE2 on neoverse-v2)" in t.lowered
    assert not t.differ and t.uniform
    assert [h.sve_vl_bits for h in t.hosts] == [(128,), (128,)]
    assert all(not h.errors for h in t.hosts)


def test_ras_is_lowered_for_the_pool() -> None:
    """Neoverse N1 (RAS IMP, no DIT) and V1 (RAS V1P1, DIT): v6.17's KVM lets a VMM lower both
    fields, so V1's guest is given N1's values and both guests see the same."""
    t = pool_template_arm64([P["neoverse-n1"], P["neoverse-v1"]])
    assert not t.sve and not t.differ and t.uniform
    assert "ID_AA64PFR0_EL1.RAS lowered to IMP (from V1P1 on neoverse-v1)" in t.lowered
    assert [h.id_regs["ID_AA64PFR0_EL1"] >> 28 & 0xF for h in t.hosts] == [1, 1]


def test_a_field_no_vmm_can_write() -> None:
    """A host whose FP field differs (a made-up N1 with FP = 1, FP16 arithmetic): FP is
    outside KVM's writable mask, so each host keeps its own and the template names the
    difference the guest still sees."""
    from fpstate.arm64.idregs import ID_AA64PFR0_EL1
    from fpstate.arm64.statemachine import replace

    n1 = P["neoverse-n1"]
    fp = ID_AA64PFR0_EL1.field("FP")
    other = n1.id_regs.with_reg("ID_AA64PFR0_EL1", fp.put(n1.id_regs.get("ID_AA64PFR0_EL1"),
                                                        1 - fp.get(n1.id_regs.get(
                                                            "ID_AA64PFR0_EL1"))))
    n1b = replace(n1, name="n1-fp", id_regs=other)
    t = pool_template_arm64([n1, n1b])
    assert len(t.differ) == 1 and t.differ[0].startswith("ID_AA64PFR0_EL1.FP: ")
    assert t.differ[0].endswith("(KVM lets no VMM write it)")
    assert all(not h.errors for h in t.hosts) and not t.uniform


@pytest.mark.parametrize("pair", list(itertools.combinations(NAMES, 2)), ids="+".join)
def test_every_pair(pair) -> None:
    """Every host takes its values; where nothing differs, `compat --arch arm64` finds the
    move between the two hosts' VMs safe both ways."""
    t = pool_template_arm64([P[n] for n in pair])
    assert all(not h.errors for h in t.hosts), [h.errors for h in t.hosts]
    if not t.uniform:
        assert t.differ
        return
    regs = tuple((n, v) for n, v in t.id_regs if n not in ("ID_AA64SMFR0_EL1",)
                 and not (n == "ID_AA64ZFR0_EL1" and not t.sve))
    a, b = (VmConfig(n, P[n], t.sve, t.sve_max_vl_bits, regs) for n in pair)
    for src, dst in ((a, b), (b, a)):
        r = compat_arm64(src, dst)
        assert r.safe, (src.label, dst.label, r.lost, r.gained, r.errors)


def test_no_cpu() -> None:
    with pytest.raises(Arm64TemplateError):
        pool_template_arm64([])


def test_cli(capsys) -> None:
    assert main(["template", "--arch", "arm64", "neoverse-v1", "neoverse-v2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sve_max_vl_bits"] == 128 and out["uniform"] is True
    assert main(["template", "--arch", "arm64", "neoverse-n1", "neoverse-v1"]) == 0
    assert "ID_AA64PFR0_EL1.RAS lowered to IMP" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["template", "--arch", "arm64"], "needs the pool's CPUs"),
    (["template", "--arch", "arm64", "neoverse-v1", "--xcr0", "7"], "--xcr0 is x86's"),
    (["template", "--arch", "arm64", "neoverse-v1", "--firecracker"], "--firecracker is x86's"),
    (["template", "--arch", "arm64", "zen4"], "neither a bundled arm64 profile"),
])
def test_cli_bad_input(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        raise SystemExit(main(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
