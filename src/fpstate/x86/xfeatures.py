"""The xfeature catalogue: every XSAVE state component fpstate knows, as one frozen table.

Models ``enum xfeature`` (arch/x86/include/asm/fpu/types.h), ``xfeature_names[]`` and
``xsave_cpuid_features[]`` (arch/x86/kernel/fpu/xstate.c, v6.17+), and the component list of
Intel SDM Vol. 1 section 13.1 ("XSAVE-supported features and state-component bitmaps").

Rules of this file:
- one row per component; everything else (layouts, the XSAVE loops, the kernel's masks) walks
  this table instead of hard-wiring numbers;
- ``size`` is the architectural size where the architecture fixes it (the kernel checks CPUID
  against the same struct sizes in ``check_xstate_against_struct()``), ``None`` where only
  CPUID knows (AMX tile data, whose size follows from CPUID leaf 0x1D);
- ``supervisor`` is the architectural kind: managed through IA32_XSS (XSAVES/XRSTORS only)
  rather than XCR0;
- ``gate`` names the CPUID flag that ``xsave_cpuid_features[]`` ties the component to (the
  kernel clears a component whose gate the CPU lacks); ``None`` means the kernel has no gate
  and always clears the component (reserved bits, LBR, LWP).

The table is checked for completeness at import (every row has a name, a boot string and a
kind), in the spirit of the kernel's BUILD_BUG_ON over its handled-feature list.
"""

from __future__ import annotations

from dataclasses import dataclass

from fpstate.errors import MaskError


@dataclass(frozen=True, slots=True)
class XFeature:
    """One XSAVE state component."""

    number: int
    enum: str  #: the kernel's enum xfeature name (XFEATURE_LWP is not in the kernel)
    boot_name: str  #: the string the kernel prints in "x86/fpu: Supporting XSAVE feature"
    short: str  #: a short name for tables and the command line
    supervisor: bool  #: managed through IA32_XSS rather than XCR0
    size: int | None  #: architectural size in bytes, None where only CPUID knows
    gate: str | None  #: CPUID flag of xsave_cpuid_features[], None when the kernel never enables it
    reference: str  #: where the facts of this row come from

    @property
    def mask(self) -> int:
        return 1 << self.number


_UNKNOWN = "unknown xstate feature"
_TYPES = "arch/x86/include/asm/fpu/types.h"

XFEATURES: tuple[XFeature, ...] = (
    XFeature(0, "XFEATURE_FP", "x87 floating point registers", "x87", False, 160, "FPU",
             "SDM 13.5.1; legacy region bytes 0-159 (FCW..ST7)"),
    XFeature(1, "XFEATURE_SSE", "SSE registers", "sse", False, 256, "XMM",
             "SDM 13.5.2; XMM0-15 at bytes 160-415, MXCSR at 24"),
    XFeature(2, "XFEATURE_YMM", "AVX registers", "avx", False, 256, "AVX",
             "SDM 13.5.3; struct ymmh_struct, " + _TYPES),
    XFeature(3, "XFEATURE_BNDREGS", "MPX bounds registers", "bndregs", False, 64, "MPX",
             "SDM 13.5.4; struct mpx_bndreg_state"),
    XFeature(4, "XFEATURE_BNDCSR", "MPX CSR", "bndcsr", False, 64, "MPX",
             "SDM 13.5.4; struct mpx_bndcsr_state (padded to 64)"),
    XFeature(5, "XFEATURE_OPMASK", "AVX-512 opmask", "opmask", False, 64, "AVX512F",
             "SDM 13.5.5; k0-k7, 8 bytes each"),
    XFeature(6, "XFEATURE_ZMM_Hi256", "AVX-512 Hi256", "zmm_hi256", False, 512, "AVX512F",
             "SDM 13.5.5; bits 511:256 of ZMM0-15"),
    XFeature(7, "XFEATURE_Hi16_ZMM", "AVX-512 ZMM_Hi256", "hi16_zmm", False, 1024, "AVX512F",
             "SDM 13.5.5; ZMM16-31 (the kernel's boot string really says ZMM_Hi256)"),
    XFeature(8, "XFEATURE_PT_UNIMPLEMENTED_SO_FAR", "Processor Trace (unused)", "pt", True, None,
             "INTEL_PT", "SDM 13.5.6; IA32_RTIT_* MSRs, size from CPUID"),
    XFeature(9, "XFEATURE_PKRU", "Protection Keys User registers", "pkru", False, 8, "OSPKE",
             "SDM 13.5.7; struct pkru_state (u32 pkru + u32 pad); the kernel gates on OSPKE"),
    XFeature(10, "XFEATURE_PASID", "PASID state", "pasid", True, 8, "ENQCMD",
             "SDM 13.5.8; IA32_PASID MSR"),
    XFeature(11, "XFEATURE_CET_USER", "Control-flow User registers", "cet_user", True, 16, "SHSTK",
             "SDM 13.5.9; IA32_U_CET, IA32_PL3_SSP"),
    XFeature(12, "XFEATURE_CET_KERNEL", "Control-flow Kernel registers (KVM only)", "cet_kernel",
             True, 24, "SHSTK",
             "SDM 13.5.9; IA32_PL0_SSP..PL2_SSP; guest-only since v6.17 (8b05b3c98816)"),
    XFeature(13, "XFEATURE_RSRVD_COMP_13", _UNKNOWN, "rsvd13", True, None, None,
             "SDM 13.1: HDC state (IA32_PM_CTL1)"),
    XFeature(14, "XFEATURE_RSRVD_COMP_14", _UNKNOWN, "rsvd14", True, None, None,
             "SDM 13.1: UINTR state"),
    XFeature(15, "XFEATURE_LBR", _UNKNOWN, "lbr", True, None, None,
             "SDM 13.5.10; arch LBR, an independent feature saved by perf, never in fpstate"),
    XFeature(16, "XFEATURE_RSRVD_COMP_16", _UNKNOWN, "rsvd16", True, None, None,
             "SDM 13.1: HWP state"),
    XFeature(17, "XFEATURE_XTILE_CFG", "AMX Tile config", "xtilecfg", False, 64, "AMX_TILE",
             "SDM 13.5.11; TILECFG, 64-byte aligned in compacted form"),
    XFeature(18, "XFEATURE_XTILE_DATA", "AMX Tile data", "xtiledata", False, None, "AMX_TILE",
             "SDM 13.5.11; TILEDATA, 1024 * max tiles from CPUID 0x1D (8192 on SPR)"),
    XFeature(19, "XFEATURE_APX", "APX registers", "apx", False, 128, "APX",
             "APX spec; R16-R31, reuses the MPX standard offsets (960)"),
    XFeature(62, "XFEATURE_LWP", _UNKNOWN, "lwp", False, 128, None,
             "AMD APM 2 ch. 13 (LWP); Bulldozer family, not in the kernel's enum"),
)

BY_NUMBER: dict[int, XFeature] = {f.number: f for f in XFEATURES}
BY_SHORT: dict[str, XFeature] = {f.short: f for f in XFEATURES}

# Masks of arch/x86/include/asm/fpu/types.h and xstate.h (64-bit kernel).
XFEATURE_MASK_FP = 1 << 0
XFEATURE_MASK_SSE = 1 << 1
XFEATURE_MASK_YMM = 1 << 2
XFEATURE_MASK_BNDREGS = 1 << 3
XFEATURE_MASK_BNDCSR = 1 << 4
XFEATURE_MASK_OPMASK = 1 << 5
XFEATURE_MASK_ZMM_Hi256 = 1 << 6
XFEATURE_MASK_Hi16_ZMM = 1 << 7
XFEATURE_MASK_PT = 1 << 8
XFEATURE_MASK_PKRU = 1 << 9
XFEATURE_MASK_PASID = 1 << 10
XFEATURE_MASK_CET_USER = 1 << 11
XFEATURE_MASK_CET_KERNEL = 1 << 12
XFEATURE_MASK_LBR = 1 << 15
XFEATURE_MASK_XTILE_CFG = 1 << 17
XFEATURE_MASK_XTILE_DATA = 1 << 18
XFEATURE_MASK_APX = 1 << 19
XFEATURE_MASK_LWP = 1 << 62

XFEATURE_MASK_FPSSE = XFEATURE_MASK_FP | XFEATURE_MASK_SSE
XFEATURE_MASK_AVX512 = XFEATURE_MASK_OPMASK | XFEATURE_MASK_ZMM_Hi256 | XFEATURE_MASK_Hi16_ZMM
XFEATURE_MASK_XTILE = XFEATURE_MASK_XTILE_CFG | XFEATURE_MASK_XTILE_DATA
XCOMP_BV_COMPACTED_FORMAT = 1 << 63
#: The XSAVE components an INIT signal puts in their initial configuration: MPX and CET (SDM
#: Vol. 3A Table 10-1, "state after INIT"; KVM's XSTATE_CLEAR_ON_INIT); x87, SSE, AVX,
#: AVX-512, AMX and the rest keep their contents.
XFEATURE_MASK_CLEARED_BY_INIT = (XFEATURE_MASK_BNDREGS | XFEATURE_MASK_BNDCSR
                                 | XFEATURE_MASK_CET_USER | XFEATURE_MASK_CET_KERNEL)

#: Components whose save area is at a fixed place in the legacy region, not found through CPUID.
LEGACY_MASK = XFEATURE_MASK_FPSSE
FIRST_EXTENDED_XFEATURE = 2

#: Sizes of the fixed parts of every XSAVE area (SDM 13.4).
FXSAVE_SIZE = 512
XSAVE_HDR_OFFSET = 512
XSAVE_HDR_SIZE = 64
XSAVE_ALIGNMENT = 64
MXCSR_DEFAULT = 0x1F80


def feature(number: int) -> XFeature:
    """The catalogue row of component ``number``; MaskError when the number is unknown."""
    try:
        return BY_NUMBER[number]
    except KeyError:
        raise MaskError(f"unknown xfeature number {number}") from None


def bits(mask: int) -> list[int]:
    """The set bit numbers of ``mask`` in ascending order (the order XSAVE walks them)."""
    return list(bit_tuple(mask))


#: bit_tuple() answers by mask (plain ints only; a few hundred masks occur in practice).
_BITS: dict[int, tuple[int, ...]] = {}


def bit_tuple(mask: int) -> tuple[int, ...]:
    """`bits` as a tuple, memoised: the kernel and KVM models walk the same few masks
    millions of times."""
    if type(mask) is int:
        got = _BITS.get(mask)
        if got is not None:
            return got
    if mask < 0 or mask >> 64:
        raise MaskError(f"mask {mask:#x} is not a 64-bit value")
    out = []
    m = mask
    while m:
        low = m & -m
        out.append(low.bit_length() - 1)
        m ^= low
    got = tuple(out)
    if type(mask) is int:
        if len(_BITS) >= 1 << 14:
            _BITS.clear()
        _BITS[mask] = got
    return got


def mask_names(mask: int) -> str:
    """``mask`` as a '|'-joined list of short names, unknown bits as 'bitN'."""
    return "|".join(BY_NUMBER[b].short if b in BY_NUMBER else f"bit{b}" for b in bits(mask)) or "0"


def parse_mask(text: str) -> int:
    """A mask from the command line: hex ('0x2e7'), decimal, or '|'-joined short names."""
    text = text.strip()
    if not text:
        raise MaskError("empty mask")
    try:
        value = int(text, 0)
    except ValueError:
        value = 0
        for part in text.split("|"):
            part = part.strip().lower()
            if part not in BY_SHORT:
                raise MaskError(
                    f"mask {text!r}: {part!r} is neither a number nor a component "
                    f"name ({', '.join(BY_SHORT)})"
                ) from None
            value |= BY_SHORT[part].mask
    if value < 0 or value >> 64:
        raise MaskError(f"mask {text!r} is not a 64-bit value")
    return value


def _check_catalogue() -> None:
    """Completeness at import: every row has a name, a boot string and a unique number."""
    seen: set[int] = set()
    for f in XFEATURES:
        assert f.number not in seen, f"duplicate xfeature {f.number}"
        seen.add(f.number)
        assert f.enum.startswith("XFEATURE_") and f.boot_name and f.short and f.reference, f
    assert seen >= set(range(20)), "xfeatures 0-19 must all have a row"


_check_catalogue()
