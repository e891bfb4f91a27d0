"""The xfeature catalogue (issue 2 item 2) against the kernel's tables, and the mask parser.

The expected strings are those of arch/x86/kernel/fpu/xstate.c (v6.17/6.18): xfeature_names[]
(printed as "x86/fpu: Supporting XSAVE feature 0x%03Lx: '%s'") and xsave_cpuid_features[].
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fpstate.errors import MaskError
from fpstate.x86.xfeatures import BY_NUMBER, XFEATURES, bits, feature, mask_names, parse_mask

#: number -> (enum, boot string, supervisor, size, gate)
KERNEL = {
    0: ("XFEATURE_FP", "x87 floating point registers", False, 160, "FPU"),
    1: ("XFEATURE_SSE", "SSE registers", False, 256, "XMM"),
    2: ("XFEATURE_YMM", "AVX registers", False, 256, "AVX"),
    3: ("XFEATURE_BNDREGS", "MPX bounds registers", False, 64, "MPX"),
    4: ("XFEATURE_BNDCSR", "MPX CSR", False, 64, "MPX"),
    5: ("XFEATURE_OPMASK", "AVX-512 opmask", False, 64, "AVX512F"),
    6: ("XFEATURE_ZMM_Hi256", "AVX-512 Hi256", False, 512, "AVX512F"),
    7: ("XFEATURE_Hi16_ZMM", "AVX-512 ZMM_Hi256", False, 1024, "AVX512F"),
    8: ("XFEATURE_PT_UNIMPLEMENTED_SO_FAR", "Processor Trace (unused)", True, None, "INTEL_PT"),
    9: ("XFEATURE_PKRU", "Protection Keys User registers", False, 8, "OSPKE"),
    10: ("XFEATURE_PASID", "PASID state", True, 8, "ENQCMD"),
    11: ("XFEATURE_CET_USER", "Control-flow User registers", True, 16, "SHSTK"),
    12: ("XFEATURE_CET_KERNEL", "Control-flow Kernel registers (KVM only)", True, 24, "SHSTK"),
    13: ("XFEATURE_RSRVD_COMP_13", "unknown xstate feature", True, None, None),
    14: ("XFEATURE_RSRVD_COMP_14", "unknown xstate feature", True, None, None),
    15: ("XFEATURE_LBR", "unknown xstate feature", True, None, None),
    16: ("XFEATURE_RSRVD_COMP_16", "unknown xstate feature", True, None, None),
    17: ("XFEATURE_XTILE_CFG", "AMX Tile config", False, 64, "AMX_TILE"),
    18: ("XFEATURE_XTILE_DATA", "AMX Tile data", False, None, "AMX_TILE"),
    19: ("XFEATURE_APX", "APX registers", False, 128, "APX"),
    62: ("XFEATURE_LWP", "unknown xstate feature", False, 128, None),
}


@pytest.mark.parametrize("number", sorted(KERNEL))
def test_row_matches_the_kernel(number: int) -> None:
    f = feature(number)
    assert (f.enum, f.boot_name, f.supervisor, f.size, f.gate) == KERNEL[number]
    assert f.mask == 1 << number and f.reference


def test_catalogue_is_0_to_19_and_lwp() -> None:
    assert [f.number for f in XFEATURES] == [*range(20), 62]
    assert len({f.short for f in XFEATURES}) == len(XFEATURES)
    with pytest.raises(MaskError, match="unknown xfeature number 20"):
        feature(20)


def test_parse_mask_forms() -> None:
    assert parse_mask("0x2e7") == parse_mask("743") == 0x2E7
    assert parse_mask(" x87 | SSE|avx ") == 0x7
    assert parse_mask("xtilecfg|xtiledata") == 0x60000
    assert parse_mask("lwp") == 1 << 62
    assert mask_names(0x60003) == "x87|sse|xtilecfg|xtiledata"
    assert mask_names(1 << 63) == "bit63" and mask_names(0) == "0"


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty mask"),
    ("avx|nope", "mask 'avx|nope': 'nope' is neither a number nor a component name"),
    ("-1", "mask '-1' is not a 64-bit value"),
    ("0x10000000000000000", "mask '0x10000000000000000' is not a 64-bit value"),
])
def test_parse_mask_refuses(text: str, message: str) -> None:
    with pytest.raises(MaskError) as e:
        parse_mask(text)
    assert message in str(e.value) and "\n" not in str(e.value)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_parse_mask_fuzz(text: str) -> None:
    """Any text: a 64-bit mask or a MaskError, nothing else."""
    try:
        value = parse_mask(text)
    except MaskError:
        return
    assert 0 <= value < 1 << 64
    assert sum(1 << b for b in bits(value)) == value


def test_bits_walks_ascending() -> None:
    assert bits(0x8000000000060003) == [0, 1, 17, 18, 63]
    assert all(b in BY_NUMBER for b in bits(0x602E7))
