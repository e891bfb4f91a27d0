"""Standard and compacted XSAVE layouts (SDM 13.4, xfeature_get_offset/xstate_calculate_size).

The CPUID leaf 0xD values below are copied from real dumps of the InstLatx64 collection
(Sapphire Rapids w7-2475X and EPYC 9654, see /work/shared/data/cpuid-corpus.json) and from this
host (EPYC Zen 5 under KVM, measured: sub0 (0xe7, 0x980, 0x980, 0), sub1 (0xf, 0x9a8, 0x1800, 0)).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fpstate.errors import MaskError
from fpstate.x86.cpuid import CpuidProfile
from fpstate.x86.layout import (
    check_mask,
    compacted_offset,
    compacted_size,
    layout_table,
    standard_offset,
    standard_size,
)


def _profile(name: str, vendor_ebx_edx_ecx: tuple[int, int, int], leaf_d: dict[int, tuple]) -> (
        CpuidProfile):
    leaves = {(0, 0): (0xD, *vendor_ebx_edx_ecx)}
    b, d, c = vendor_ebx_edx_ecx
    leaves[(0, 0)] = (0x20, b, c, d)
    for sub, regs in leaf_d.items():
        leaves[(0xD, sub)] = regs
    return CpuidProfile.from_leaves(name, leaves, "test table")


INTEL = (0x756E6547, 0x49656E69, 0x6C65746E)  # "Genu" "ineI" "ntel"
AMD = (0x68747541, 0x69746E65, 0x444D4163)  # "Auth" "enti" "cAMD"

SPR = _profile("spr", INTEL, {
    0: (0x000602E7, 0x2B00, 0x2B00, 0), 1: (0x1F, 0x2A80, 0xDD00, 0),
    2: (0x100, 0x240, 0, 0), 5: (0x40, 0x440, 0, 0), 6: (0x200, 0x480, 0, 0),
    7: (0x400, 0x680, 0, 0), 8: (0x80, 0, 1, 0), 9: (0x8, 0xA80, 0, 0), 10: (0x8, 0, 1, 0),
    11: (0x10, 0, 1, 0), 12: (0x18, 0, 1, 0), 14: (0x30, 0, 1, 0), 15: (0x328, 0, 1, 0),
    17: (0x40, 0xAC0, 2, 0), 18: (0x2000, 0xB00, 6, 0),
})
GENOA = _profile("genoa", AMD, {
    0: (0x2E7, 0x980, 0x988, 0), 1: (0xF, 0x990, 0x1800, 0),
    2: (0x100, 0x240, 0, 0), 5: (0x40, 0x340, 0, 0), 6: (0x200, 0x380, 0, 0),
    7: (0x400, 0x580, 0, 0), 9: (0x8, 0x980, 0, 0), 11: (0x10, 0, 1, 0), 12: (0x18, 0, 1, 0),
})
#: Hypothetical CPU for the alignment rule: an odd-sized component 2, an aligned component 3.
ODD = _profile("odd", INTEL, {
    0: (0x1F, 0x300, 0x300, 0), 1: (0xF, 0, 0, 0),
    2: (100, 576, 0, 0), 3: (64, 704, 2, 0), 4: (8, 768, 2, 0),
})


def test_sapphire_rapids_standard_user_max_is_11008() -> None:
    assert standard_size(SPR, 0x602E7) == 11008 == SPR.cpuid(0xD, 0)[2]
    assert standard_offset(SPR, 18) == 0xB00 and standard_offset(SPR, 17) == 0xAC0


def test_sapphire_rapids_compacted_chain_matches_the_kernel_arithmetic() -> None:
    # 576 -> YMM 832 -> K 896 -> ZMM_Hi256 1408 -> Hi16 2432 -> PKRU 2440 -> align 2496
    # -> TILECFG 2560 -> TILEDATA 10752 (the 10752 the data README quotes for 0x602e7)
    mask = 0x602E7
    assert [compacted_offset(SPR, mask, i) for i in (2, 5, 6, 7, 9, 17, 18)] == [
        576, 832, 896, 1408, 2432, 2496, 2560]
    assert compacted_size(SPR, mask) == 10752
    # Windows put PT (128 bytes) into IA32_XSS when the dump was taken: 10752 + 128 = sub1 EBX.
    assert compacted_size(SPR, mask | 0x100) == 0x2A80


def test_amd_offsets_differ_from_intel() -> None:
    assert [standard_offset(GENOA, i) for i in (2, 5, 6, 7, 9)] == [0x240, 0x340, 0x380, 0x580,
                                                                     0x980]
    assert [standard_offset(SPR, i) for i in (5, 9)] == [0x440, 0xA80]  # the MPX hole stays
    assert standard_size(GENOA, 0x2E7) == 0x988 == GENOA.cpuid(0xD, 0)[2]


def test_this_hosts_numbers_compacted_0xe7_plus_cet_is_2472() -> None:
    assert compacted_size(GENOA, 0xE7 | 0x1800) == 2472 == 0x9A8
    assert compacted_offset(GENOA, 0xE7 | 0x1800, 11) == 2432
    assert compacted_offset(GENOA, 0xE7 | 0x1800, 12) == 2448
    assert standard_size(GENOA, 0xE7) == 0x980


def test_alignment_rule_rounds_an_aligned_component_after_an_odd_sized_one() -> None:
    # component 2 ends at 576 + 100 = 676; component 3 is aligned: 676 -> 704
    assert compacted_offset(ODD, 0x0F, 3) == 704
    # component 4 follows 3 (704 + 64 = 768, already aligned)
    assert compacted_offset(ODD, 0x1F, 4) == 768
    # without 3, component 4 is rounded from 676 up to 704 itself (its own alignment)
    assert compacted_offset(ODD, 0x17, 4) == 704
    assert compacted_size(ODD, 0x17) == 712
    # an aligned component first in XCOMP_BV sits at 576, already a multiple of 64
    assert compacted_offset(ODD, 0x0B, 3) == 576


def test_legacy_only_masks_need_576_bytes() -> None:
    for mask in (0, 1, 2, 3):
        assert standard_size(SPR, mask) == 576
        assert compacted_size(SPR, mask) == 576
    assert compacted_offset(SPR, 0x3, 1) == 160 == standard_offset(SPR, 1)


def test_compacted_offset_ignores_xcomp_bv_bit_63() -> None:
    assert compacted_offset(SPR, (1 << 63) | 0x207, 9) == 832
    assert compacted_size(SPR, (1 << 63) | 0x207) == 840


def test_supervisor_components_have_no_standard_offset() -> None:
    with pytest.raises(MaskError, match="supervisor"):
        standard_offset(SPR, 11)
    with pytest.raises(MaskError, match="supervisor"):
        standard_size(SPR, 0x803)


def test_component_missing_from_xcomp_bv_has_no_compacted_offset() -> None:
    with pytest.raises(MaskError, match="not set in XCOMP_BV"):
        compacted_offset(SPR, 0x7, 9)


def test_check_mask_names_unsupported_bits() -> None:
    assert check_mask(SPR, 0x602E7, supervisor_ok=False) == 0x602E7
    with pytest.raises(MaskError, match=r"xtilecfg\|xtiledata \(0x60000\)"):
        check_mask(GENOA, 0x602E7, supervisor_ok=False)
    with pytest.raises(MaskError, match="supervisor components"):
        check_mask(GENOA, 0x8E7, supervisor_ok=False)
    assert check_mask(GENOA, 0x8E7, supervisor_ok=True) == 0x8E7
    with pytest.raises(MaskError, match="64-bit"):
        check_mask(GENOA, 1 << 64, supervisor_ok=True)


def test_layout_table_rows_and_totals() -> None:
    t = layout_table(GENOA, 0xE7 | 0x1800)
    assert [r.number for r in t.rows] == [0, 1, 2, 5, 6, 7, 11, 12]
    cet_u = t.rows[6]
    assert (cet_u.name, cet_u.size, cet_u.offset, cet_u.compacted_offset, cet_u.supervisor) == (
        "cet_user", 16, 0, 2432, True)
    assert (t.standard_size, t.compacted_size) == (0x980, 0x9A8)
    d = t.to_dict()
    assert d["mask"] == 0x18E7 and d["features"][3] == {
        "number": 5, "name": "opmask", "size": 64, "offset": 0x340, "compacted_offset": 832,
        "aligned": False, "xfd": False}
    spr = layout_table(SPR, 0x602E7)
    assert [(r.number, r.aligned, r.xfd) for r in spr.rows[-2:]] == [(17, True, False),
                                                                     (18, True, True)]


@given(st.integers(0, (1 << 64) - 1))
def test_compacted_never_larger_than_standard_for_user_masks(raw: int) -> None:
    mask = raw & SPR.xcr0_supported
    comp, std = compacted_size(SPR, mask), standard_size(SPR, mask)
    assert comp <= std
    offsets = [compacted_offset(SPR, mask, i) for i in range(2, 63) if (mask >> i) & 1]
    assert offsets == sorted(offsets) and all(o >= 576 for o in offsets)
