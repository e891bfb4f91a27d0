"""ID register fields (real positions) and the bundled CPU profiles."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fpstate.arm64 import idregs
from fpstate.arm64.cpu import bundled_profile_names, load_profile, profile_from_json
from fpstate.arm64.idregs import IdRegs, id_regs_from_mapping, reg_def
from fpstate.errors import ProfileError


@pytest.mark.parametrize("reg,field,shift,width", [
    ("ID_AA64PFR0_EL1", "SVE", 32, 4), ("ID_AA64PFR0_EL1", "FP", 16, 4),
    ("ID_AA64PFR0_EL1", "AdvSIMD", 20, 4), ("ID_AA64PFR0_EL1", "CSV3", 60, 4),
    ("ID_AA64PFR1_EL1", "SME", 24, 4), ("ID_AA64PFR1_EL1", "MTE", 8, 4),
    ("ID_AA64PFR2_EL1", "FPMR", 32, 4), ("ID_AA64ZFR0_EL1", "SVEver", 0, 4),
    ("ID_AA64ZFR0_EL1", "F64MM", 56, 4), ("ID_AA64SMFR0_EL1", "FA64", 63, 1),
    ("ID_AA64SMFR0_EL1", "SMEver", 56, 4), ("ID_AA64SMFR0_EL1", "I16I64", 52, 4),
    ("ID_AA64FPFR0_EL1", "F8CVT", 31, 1), ("ID_AA64FPFR0_EL1", "F8E5M2", 0, 1),
])
def test_field_positions(reg, field, shift, width):
    f = reg_def(reg).field(field)
    assert (f.shift, f.width) == (shift, width)


def test_encodings():
    assert idregs.ID_AA64PFR2_EL1.enc == (3, 0, 0, 4, 2)
    assert idregs.ID_AA64SMFR0_EL1.enc == (3, 0, 0, 4, 5)
    assert idregs.ID_AA64FPFR0_EL1.enc == (3, 0, 0, 4, 7)


def test_signed_fp_field_0xf_means_not_implemented():
    regs = IdRegs(pfr0=0xFF << 16)
    assert regs.field("ID_AA64PFR0_EL1", "FP") == -1 and not regs.fp and not regs.advsimd
    assert IdRegs(pfr0=1 << 16).fp


def test_feature_predicates():
    r = IdRegs(pfr0=1 << 32, pfr1=2 << 24, pfr2=1 << 32, smfr0=1 << 63, fpfr0=1 << 31)
    assert r.sve and r.sme and r.sme2 and r.fa64 and r.fpmr and r.fp8
    assert not IdRegs(pfr1=1 << 24).sme2
    assert not IdRegs(smfr0=1 << 63).fa64      # FA64 means nothing without SME


def test_put_and_decode():
    f = reg_def("ID_AA64PFR2_EL1").field("FPMR")
    assert f.put(0, 1) == 1 << 32 and f.get(f.put(0xFFFF_FFFF_FFFF_FFFF, 0)) == 0
    assert reg_def("ID_AA64PFR2_EL1").decode(1 << 32)["FPMR"] == 1
    assert reg_def("ID_AA64PFR2_EL1").res0 & (1 << 32) == 0
    assert reg_def("ID_AA64PFR2_EL1").res0 & (1 << 40)


def test_bad_register_names_and_values():
    with pytest.raises(ProfileError, match="unknown ID register"):
        reg_def("ID_AA64PFR9_EL1")
    with pytest.raises(ProfileError, match="no field"):
        reg_def("ID_AA64PFR0_EL1").field("SME")
    with pytest.raises(ProfileError, match="not a number"):
        id_regs_from_mapping({"ID_AA64PFR0_EL1": "zz"}, "t")
    with pytest.raises(ProfileError, match="64 bits"):
        id_regs_from_mapping({"ID_AA64PFR0_EL1": 1 << 64}, "t")


@given(st.dictionaries(st.text(max_size=20), st.one_of(st.integers(), st.text(), st.none(),
                                                        st.booleans()), max_size=4))
def test_id_regs_parser_only_raises_profile_error(data):
    try:
        id_regs_from_mapping(data, "fuzz")
    except ProfileError:
        pass


REQUIRED = {
    "neoverse-n1": dict(sve=False, sme=False, fpmr=False, sve_bits=[]),
    "neoverse-v1": dict(sve=True, sme=False, fpmr=False, sve_bits=[128, 256]),
    "neoverse-v2": dict(sve=True, sme=False, fpmr=False, sve_bits=[128]),
    "apple-m4": dict(sve=False, sme=True, fpmr=False, sve_bits=[]),
    "fvp-aem-fpmr": dict(sve=True, sme=True, fpmr=True, sve_bits=[128, 256, 512]),
}


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_bundled_profile(name):
    p = load_profile(name)
    want = REQUIRED[name]
    r = p.id_regs
    assert (r.sve, r.sme, r.fpmr, p.sve_vl_bits) == (want["sve"], want["sme"], want["fpmr"],
                                                     want["sve_bits"])
    assert r.fp and r.advsimd
    # every value has a recorded source
    assert {n for n, _ in p.sources} >= set(idregs.ID_REG_DEFS)
    assert profile_from_json(p.to_json(), "round trip") == p


def test_v2_is_sve2_and_m4_is_sme2_without_fa64():
    assert load_profile("neoverse-v2").id_regs.field("ID_AA64ZFR0_EL1", "SVEver") == 1
    assert load_profile("neoverse-v1").id_regs.field("ID_AA64ZFR0_EL1", "SVEver") == 0
    m4 = load_profile("apple-m4")
    assert m4.id_regs.sme2 and not m4.id_regs.fa64 and m4.sme_vl_bits == [512]
    assert load_profile("fvp-aem-fpmr").id_regs.fp8


def test_bundled_names():
    assert set(REQUIRED) <= set(bundled_profile_names())


def _base():
    return json.loads(json.dumps(load_profile("neoverse-v1").to_json()))


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(sve_vl_bits=[]), "SVE=1 but sve_vl_bits"),
    (lambda d: d.update(sve_vl_bits=[256]), "128-bit vectors"),
    (lambda d: d.update(sve_vl_bits=[100]), "multiple of 128"),
    (lambda d: d.update(sme_vl_bits=[128]), "SME=0 but sme_vl_bits"),
    (lambda d: d["id_regs"].update(ID_AA64PFR2_EL1="0x10000000000"), "RES0"),
    (lambda d: d.update(name=""), "'name'"),
    (lambda d: d.update(sources=[1]), "'sources'"),
])
def test_inconsistent_profiles_are_rejected(mutate, message):
    d = _base()
    mutate(d)
    with pytest.raises(ProfileError, match=message):
        profile_from_json(d, "test")


def test_sve2_needs_power_of_two_vls():
    d = json.loads(json.dumps(load_profile("neoverse-v2").to_json()))
    d["sve_vl_bits"] = [128, 384]
    with pytest.raises(ProfileError, match="power-of-two"):
        profile_from_json(d, "t")
    d = _base()                          # SVE (not SVE2) allows 384
    d["sve_vl_bits"] = [128, 256, 384]
    assert profile_from_json(d, "t").sve_vl_bits == [128, 256, 384]


def test_load_profile_errors(tmp_path):
    with pytest.raises(ProfileError, match="neither a bundled"):
        load_profile("no-such-cpu")
    bad = tmp_path / "x.json"
    bad.write_text("{nope")
    with pytest.raises(ProfileError, match="not JSON"):
        load_profile(str(bad))
    good = tmp_path / "y.json"
    good.write_text(json.dumps(_base()))
    assert load_profile(str(good)).name == "neoverse-v1"
