"""CpuidProfile: CPUID answers, feature flags, leaf 0xD enumeration, JSON round trip."""

from __future__ import annotations

import pytest

from fpstate.errors import MaskError, ProfileError
from fpstate.x86.cpuid import FLAGS, Component, CpuidProfile, vendor_of

# Real registers: Sapphire Rapids w7-2475X (InstLatx64 GenuineIntel00806F8_SapphireRapids_05).
SPR_LEAVES = {
    (0x0, 0): (0x20, 0x756E6547, 0x6C65746E, 0x49656E69),
    (0x1, 0): (0x000806F8, 0x00800800, 0x7FFEFBFF, 0xBFEBFBFF),
    (0x7, 0): (0x2, 0xF3BFBFFB, 0xBB417FEE, 0xFFDD4430),
    (0x7, 1): (0x1C30, 0, 0, 0),
    (0x7, 2): (0, 0, 0, 0x17),
    (0xD, 0): (0x602E7, 0x2B00, 0x2B00, 0),
    (0xD, 1): (0x1F, 0x2A80, 0xDD00, 0),
    (0xD, 2): (0x100, 0x240, 0, 0),
    (0xD, 11): (0x10, 0, 1, 0),
    (0xD, 17): (0x40, 0xAC0, 2, 0),
    (0xD, 18): (0x2000, 0xB00, 6, 0),
    (0x80000000, 0): (0x80000008, 0, 0, 0),
    (0x80000001, 0): (0, 0, 0x121, 0x2C100800),
}
SPR = CpuidProfile.from_leaves("spr", SPR_LEAVES, "InstLatx64 SapphireRapids_05")


def test_vendor_is_read_from_leaf_0() -> None:
    assert SPR.vendor == "intel"
    amd = {(0, 0): (0x10, 0x68747541, 0x444D4163, 0x69746E65)}
    assert vendor_of(amd) == "amd"
    assert vendor_of({}) == "unknown"


def test_cpuid_ignores_ecx_for_leaves_without_subleaves() -> None:
    assert SPR.cpuid(1, 5) == SPR.cpuid(1) == SPR_LEAVES[(1, 0)]
    assert SPR.cpuid(0x80000001, 3) == SPR_LEAVES[(0x80000001, 0)]
    assert SPR.cpuid(7, 1) == (0x1C30, 0, 0, 0)
    assert SPR.cpuid(0xD, 3) == (0, 0, 0, 0)  # MPX is absent: the sub-leaf reads zero
    assert SPR.cpuid(0x4000_0000) == (0, 0, 0, 0)


def test_flags_of_sapphire_rapids() -> None:
    on = {"FPU", "FXSR", "XMM", "XSAVE", "OSXSAVE", "AVX", "AVX512F", "PKU", "SHSTK", "IBT",
          "ENQCMD", "AMX_TILE", "INTEL_PT", "XSAVEOPT", "XSAVEC", "XGETBV1", "XSAVES", "XFD"}
    # OSPKE mirrors CR4.PKE, which Windows (the OS of the dump) leaves clear: leaf 7 ECX[4]=0.
    off = {"MPX", "APX", "OSPKE"}
    assert {f for f in on | off if SPR.has(f)} == on
    assert SPR.has("amx_tile")


def test_apx_is_leaf_7_subleaf_1_edx_bit_21() -> None:
    leaves = dict(SPR_LEAVES)
    leaves[(7, 1)] = (0x1C30, 0, 0, 1 << 21)
    assert CpuidProfile.from_leaves("apx", leaves, "test").has("APX")
    assert str(FLAGS["APX"]) == "CPUID.(EAX=0x7,ECX=0x1):EDX[21]"


def test_unknown_flag_is_a_profile_error() -> None:
    with pytest.raises(ProfileError, match="unknown CPUID flag 'AVX1024'"):
        SPR.has("AVX1024")


def test_supported_masks() -> None:
    assert SPR.xcr0_supported == 0x602E7
    assert SPR.xss_supported == 0xDD00


def test_components_from_leaf_0xd() -> None:
    assert SPR.component(0) == Component(0, 160, 0, False, False, False)
    assert SPR.component(1) == Component(1, 256, 160, False, False, False)
    assert SPR.component(2) == Component(2, 256, 576, False, False, False)
    assert SPR.component(11) == Component(11, 16, 0, True, False, False)
    assert SPR.component(17) == Component(17, 64, 0xAC0, False, True, False)
    assert SPR.component(18) == Component(18, 8192, 0xB00, False, True, True)
    assert SPR.component(18).name == "xtiledata"


def test_unenumerated_component_is_a_mask_error() -> None:
    with pytest.raises(MaskError, match=r"component 3 \(bndregs\) is not enumerated by spr"):
        SPR.component(3)
    with pytest.raises(MaskError, match=r"0\.\.63"):
        SPR.component(64)


def test_enumerated_component_with_empty_subleaf_is_a_profile_error() -> None:
    # bit 5 is in the supported mask, but sub-leaf 5 is missing (a masked or truncated dump)
    with pytest.raises(ProfileError, match=r"component 5 .* reports size 0"):
        SPR.component(5)


def test_json_round_trip_and_hash() -> None:
    again = CpuidProfile.from_json(SPR.to_json())
    assert again == SPR and hash(again) == hash(SPR)
    assert again.leaves[(0xD, 18)] == (0x2000, 0xB00, 6, 0)
    with pytest.raises(TypeError):
        again.leaves[(0, 0)] = (0, 0, 0, 0)  # type: ignore[index]


@pytest.mark.parametrize("text, message", [
    ("{", "does not parse"),
    ("[]", "not an object"),
    ('{"format": "x"}', "field 'format'"),
    ('{"format": "fpstate-cpuid-profile/1", "name": "a", "vendor": "intel", "source": ""}',
     "field 'leaves' is missing"),
    ('{"format": "fpstate-cpuid-profile/1", "name": "a", "vendor": "intel", "source": "",'
     ' "leaves": {"0x0": {"0x0": ["0x1", "0x2", "0x3"]}}}', "not a list of 4"),
    ('{"format": "fpstate-cpuid-profile/1", "name": "a", "vendor": "intel", "source": "",'
     ' "leaves": {"0x0": {"0x0": ["0x1", "0x2", "0x3", "zz"]}}}', "'zz' is not a hex"),
    ('{"format": "fpstate-cpuid-profile/1", "name": "a", "vendor": "intel", "source": "",'
     ' "leaves": {"0x0": {"0x0": ["0x1", "0x2", "0x3", "0x100000000"]}}}', "32-bit"),
    ('{"format": "fpstate-cpuid-profile/1", "name": "a", "vendor": "via", "source": "",'
     ' "leaves": {}}', "vendor 'via'"),
])
def test_bad_json_is_a_profile_error(text: str, message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        CpuidProfile.from_json(text)


def test_brand_and_family() -> None:
    assert SPR.family_model_stepping == (6, 0x8F, 8)
    assert SPR.brand == ""  # the table above has no brand leaves
