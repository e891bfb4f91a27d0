"""Migration check between two KVM/arm64 VM configurations: function and CLI."""

import itertools
import json

import pytest

from fpstate.arm64.cpu import bundled_profile_names, load_profile
from fpstate.cli import main
from fpstate.errors import ProfileError
from fpstate.tools.compat_arm64 import compat_arm64, compress_names, format_report, load_vm_config

NAMES = bundled_profile_names()


@pytest.fixture(scope="module")
def reports():
    return {(a, b): compat_arm64(load_vm_config(a), load_vm_config(b))
            for a, b in itertools.product(NAMES, NAMES)}


#: Moves to a host that has more only in fields KVM (v6.17) lets a VMM lower: the
#: destination takes the source's ID register values (ID_AA64PFR0_EL1.RAS among them, which
#: became writable so that a VM can move from a host without RAS to one with it).
SAFE_MOVES = {("apple-m4", "fvp-aem-fpmr"), ("apple-m4", "neoverse-v2"),
              ("neoverse-n1", "neoverse-v1"), ("neoverse-n1", "neoverse-v2")}


def test_every_pair(reports):
    for (a, b), r in reports.items():
        assert r.safe == (a == b or (a, b) in SAFE_MOVES), (a, b, format_report(r))
        assert r.to_json()["safe"] == r.safe
        assert r.source["cpu"] == a and r.destination["cpu"] == b


def items(r, kind, key="lost"):
    return {it["name"] for it in getattr(r, key) if it["kind"] == kind}


def test_v1_to_v2_loses_the_256_bit_vl(reports):
    r = reports[("neoverse-v1", "neoverse-v2")]
    assert items(r, "vector_length") == {"256 bits"} and not r.gained
    assert [(e["register"], e["errno"]) for e in r.errors] == [("KVM_REG_ARM64_SVE_VLS", "EINVAL")]


def test_fpmr_host_to_v2_loses_fpmr(reports):
    r = reports[("fvp-aem-fpmr", "neoverse-v2")]
    assert "FPMR" in items(r, "register") and "FPMR" in items(r, "guest_state")
    assert "ID_AA64PFR2_EL1.FPMR" in items(r, "id_field")
    assert ("FPMR", "ENOENT") in {(e["register"], e["errno"]) for e in r.errors}
    assert ("ID_AA64PFR2_EL1", "EINVAL") in {(e["register"], e["errno"]) for e in r.errors}


def test_sve_vcpu_to_a_host_without_sve(reports):
    r = reports[("neoverse-v2", "neoverse-n1")]
    assert ("KVM_ARM_VCPU_INIT", "EINVAL") in {(e["ioctl"], e["errno"]) for e in r.errors}
    assert {"Z0", "P15", "FFR", "ZCR_EL1"} <= items(r, "register")
    assert {f"V{i}" for i in range(32)} == items(r, "register", "gained")


def test_sme_is_never_offered_to_guests(reports):
    r = reports[("apple-m4", "neoverse-n1")]
    assert "ID_AA64PFR1_EL1.SME" not in items(r, "id_field")    # 0 on both: KVM hides SME
    assert r.source["guest_state"] == ["FPSR", "V"]


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return str(p)


def no_fpmr_profile(tmp_path):
    d = load_profile("fvp-aem-fpmr").to_json()
    d["name"] = "fvp-aem-nofpmr"
    d["id_regs"].update({"ID_AA64PFR2_EL1": "0x0", "ID_AA64FPFR0_EL1": "0x0"})
    return write(tmp_path, "nofpmr.json", d)


def hidden_fpmr_vm(tmp_path):
    return write(tmp_path, "src.json", {
        "cpu": "fvp-aem-fpmr", "id_regs": {"ID_AA64PFR2_EL1": "0x0", "ID_AA64FPFR0_EL1": "0"}})


def test_hiding_fp8_makes_the_move_to_a_host_without_it_safe(tmp_path):
    src, dst = load_vm_config(hidden_fpmr_vm(tmp_path)), load_vm_config(no_fpmr_profile(tmp_path))
    assert compat_arm64(src, dst).safe
    ungated = compat_arm64(src, dst, "fpmr-ungated")          # seed 002's rejected design
    assert not ungated.safe and items(ungated, "register") == {"FPMR"}


def test_vm_config_choices(tmp_path):
    cfg = load_vm_config(write(tmp_path, "c.json", {"cpu": "fvp-aem-fpmr",
                                                    "sve_max_vl_bits": 256}))
    r = compat_arm64(cfg, load_vm_config("neoverse-v1"))
    assert r.source["sve_vl_bits"] == [128, 256]
    nosve = load_vm_config(write(tmp_path, "n.json", {"cpu": "neoverse-v2", "sve": False}))
    assert compat_arm64(nosve, load_vm_config("neoverse-n1")).source["sve"] is False


@pytest.mark.parametrize("data,message", [
    ({"cpu": 3}, "'cpu'"), ({"cpu": "neoverse-v1", "sve": "yes"}, "'sve'"),
    ({"cpu": "neoverse-v1", "sve_max_vl_bits": 100}, "multiple of 128"),
    ({"cpu": "neoverse-v1", "colour": 1}, "unknown keys"),
    ({"cpu": "neoverse-v1", "id_regs": {"ID_AA64PFR7_EL1": 0}}, "unknown ID register"),
    ([1, 2], "JSON object"),
])
def test_bad_vm_configs(tmp_path, data, message):
    with pytest.raises(ProfileError, match=message):
        load_vm_config(write(tmp_path, "bad.json", data))


def test_a_source_the_host_refuses_is_bad_input(tmp_path):
    cfg = load_vm_config(write(tmp_path, "x.json", {"cpu": "neoverse-v2",
                                                    "id_regs": {"ID_AA64PFR2_EL1": "0x100000000"}}))
    with pytest.raises(ProfileError, match="source VM cannot be created"):
        compat_arm64(cfg, cfg)


def test_compress_names():
    assert compress_names(["Z0", "Z1", "Z2", "P0", "FFR", "V3", "V5"]) == [
        "Z0-Z2", "P0", "FFR", "V3", "V5"]


def test_cli_exit_codes_and_json(capsys, tmp_path):
    assert main(["compat", "--arch", "arm64", "neoverse-v1", "neoverse-v1"]) == 0
    assert "verdict: SAFE" in capsys.readouterr().out
    assert main(["compat", "--arch", "arm64", "neoverse-v1", "neoverse-v2", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"arch", "variant", "safe", "source", "destination", "lost", "gained",
                        "errors"}
    assert out["safe"] is False and out["lost"][0]["name"] == "256 bits"
    assert main(["compat", "--arch", "arm64", "no-such-cpu", "neoverse-v1"]) == 2
    assert "neither a bundled" in capsys.readouterr().err
    src, dst = hidden_fpmr_vm(tmp_path), no_fpmr_profile(tmp_path)
    assert main(["compat", "--arch", "arm64", src, dst]) == 0
    assert main(["compat", "--arch", "arm64", "--variant", "fpmr-ungated", src, dst]) == 1


def test_cli_rejects_an_unknown_arch(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compat", "--arch", "riscv", "neoverse-v1", "neoverse-v1"])
    assert e.value.code == 2 and "--arch" in capsys.readouterr().err


@pytest.mark.parametrize("src", [
    "{nope", '{"cpu": "neoverse-v1", "colour": 1}', "[1, 2]",
    '{"cpu": "neoverse-v1", "id_regs": {"ID_AA64PFR0_EL1": "zz"}}',
    '{"cpu": "neoverse-v2", "id_regs": {"ID_AA64PFR2_EL1": "0x100000000"}}',
    '{"name": "x", "sve_vl_bits": [128]}',
])
def test_cli_bad_input_is_one_line_on_stderr_and_exit_2(capsys, tmp_path, src):
    p = tmp_path / "src.json"
    p.write_text(src)
    assert main(["compat", "--arch", "arm64", str(p), "neoverse-v1"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("fpstate: error: ") and err.count("\n") == 1


def test_ras_is_lowered_one_way(reports):
    """N1 (RAS IMP) to V1 (RAS V1P1): V1's KVM takes N1's lower RAS, so nothing changes for the
    guest; the other way V1P1 is above N1's limit and the write is refused."""
    assert reports[("neoverse-n1", "neoverse-v1")].safe
    r = reports[("neoverse-v1", "neoverse-n1")]
    assert "ID_AA64PFR0_EL1.RAS" in items(r, "id_field")
    assert ("ID_AA64PFR0_EL1", "EINVAL") in [(e["register"], e["errno"]) for e in r.errors]
