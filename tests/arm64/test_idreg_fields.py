"""Every field of the six FP ID registers, position by position, against the Arm ARM as Linux
v6.17 transcribes it in arch/arm64/tools/sysreg (``Field``/``UnsignedEnum``/``SignedEnum``
msb:lsb, and the ``Res0`` ranges between them)."""

import pytest

from fpstate.arm64 import idregs
from fpstate.arm64.idregs import reg_def

# name -> (encoding, [(field, msb, lsb, signed)], [(res0 msb, res0 lsb)])
SYSREG = {
    "ID_AA64PFR0_EL1": ((3, 0, 0, 4, 0), [
        ("CSV3", 63, 60, False), ("CSV2", 59, 56, False), ("RME", 55, 52, False),
        ("DIT", 51, 48, False), ("AMU", 47, 44, False), ("MPAM", 43, 40, False),
        ("SEL2", 39, 36, False), ("SVE", 35, 32, False), ("RAS", 31, 28, False),
        ("GIC", 27, 24, False), ("AdvSIMD", 23, 20, True), ("FP", 19, 16, True),
        ("EL3", 15, 12, False), ("EL2", 11, 8, False), ("EL1", 7, 4, False),
        ("EL0", 3, 0, False)], []),
    "ID_AA64PFR1_EL1": ((3, 0, 0, 4, 1), [
        ("PFAR", 63, 60, False), ("DF2", 59, 56, False), ("MTEX", 55, 52, False),
        ("THE", 51, 48, False), ("GCS", 47, 44, False), ("MTE_frac", 43, 40, False),
        ("NMI", 39, 36, False), ("CSV2_frac", 35, 32, False), ("RNDR_trap", 31, 28, False),
        ("SME", 27, 24, False), ("MPAM_frac", 19, 16, False), ("RAS_frac", 15, 12, False),
        ("MTE", 11, 8, False), ("SSBS", 7, 4, False), ("BT", 3, 0, False)],
        [(23, 20)]),
    "ID_AA64PFR2_EL1": ((3, 0, 0, 4, 2), [
        ("FPMR", 35, 32, False), ("UINJ", 19, 16, False), ("GCIE", 15, 12, False),
        ("MTEFAR", 11, 8, False), ("MTESTOREONLY", 7, 4, False), ("MTEPERM", 3, 0, False)],
        [(63, 36), (31, 20)]),
    "ID_AA64ZFR0_EL1": ((3, 0, 0, 4, 4), [
        ("F64MM", 59, 56, False), ("F32MM", 55, 52, False), ("F16MM", 51, 48, False),
        ("I8MM", 47, 44, False), ("SM4", 43, 40, False), ("SHA3", 35, 32, False),
        ("B16B16", 27, 24, False), ("BF16", 23, 20, False), ("BitPerm", 19, 16, False),
        ("EltPerm", 15, 12, False), ("AES", 7, 4, False), ("SVEver", 3, 0, False)],
        [(63, 60), (39, 36), (31, 28), (11, 8)]),
    "ID_AA64SMFR0_EL1": ((3, 0, 0, 4, 5), [
        ("FA64", 63, 63, False), ("LUTv2", 60, 60, False), ("SMEver", 59, 56, False),
        ("I16I64", 55, 52, False), ("F64F64", 48, 48, False), ("I16I32", 47, 44, False),
        ("B16B16", 43, 43, False), ("F16F16", 42, 42, False), ("F8F16", 41, 41, False),
        ("F8F32", 40, 40, False), ("I8I32", 39, 36, False), ("F16F32", 35, 35, False),
        ("B16F32", 34, 34, False), ("BI32I32", 33, 33, False), ("F32F32", 32, 32, False),
        ("SF8FMA", 30, 30, False), ("SF8DP4", 29, 29, False), ("SF8DP2", 28, 28, False),
        ("SBitPerm", 25, 25, False), ("AES", 24, 24, False), ("SFEXPA", 23, 23, False),
        ("STMOP", 16, 16, False), ("SMOP4", 0, 0, False)],
        [(62, 61), (51, 49), (31, 31), (27, 26), (22, 17), (15, 1)]),
    "ID_AA64FPFR0_EL1": ((3, 0, 0, 4, 7), [
        ("F8CVT", 31, 31, False), ("F8FMA", 30, 30, False), ("F8DP4", 29, 29, False),
        ("F8DP2", 28, 28, False), ("F8MM8", 27, 27, False), ("F8MM4", 26, 26, False),
        ("F8E4M3", 1, 1, False), ("F8E5M2", 0, 0, False)],
        [(63, 32), (25, 2)]),
}


def _bits(msb, lsb):
    return ((1 << (msb - lsb + 1)) - 1) << lsb


def test_the_model_has_exactly_these_six_registers():
    assert set(idregs.ID_REG_DEFS) == set(SYSREG)


@pytest.mark.parametrize("name", sorted(SYSREG))
def test_every_field_position_width_and_signedness(name):
    enc, want, _ = SYSREG[name]
    d = reg_def(name)
    assert d.enc == enc
    have = {(f.name, f.shift + f.width - 1, f.shift, f.signed) for f in d.fields}
    assert have == set(want)


@pytest.mark.parametrize("name", sorted(SYSREG))
def test_res0_is_exactly_the_sysreg_res0_ranges(name):
    _, fields, res0 = SYSREG[name]
    want = 0
    for msb, lsb in res0:
        want |= _bits(msb, lsb)
    assert reg_def(name).res0 == want
    covered = want
    for _, msb, lsb, _ in fields:
        covered |= _bits(msb, lsb)
    assert covered == (1 << 64) - 1          # fields and Res0 tile all 64 bits


def test_signed_fields_read_0xf_as_minus_one_and_unsigned_as_15():
    fp, sve = reg_def("ID_AA64PFR0_EL1").field("FP"), reg_def("ID_AA64PFR0_EL1").field("SVE")
    assert fp.get(0xF << 16) == -1 and sve.get(0xF << 32) == 15
