"""XSAVE area layouts: standard and compacted offsets and sizes, as pure functions of a profile.

Models ``xfeature_get_offset()`` and ``xstate_calculate_size()`` (arch/x86/kernel/fpu/xstate.c,
v6.17) and Intel SDM Vol. 1 section 13.4 ("XSAVE Area"):

- standard format (13.4.1/13.4.2): component i >= 2 lives at CPUID.(EAX=0DH,ECX=i).EBX, whatever
  else is in the mask; the area ends at max(offset + size) over the components saved;
- compacted format (13.4.3): the legacy region (512) and the header (64) come first; then, in
  ascending bit order, each component i set in XCOMP_BV[62:2] follows the previous one, its
  offset rounded up to a multiple of 64 when CPUID.(EAX=0DH,ECX=i):ECX[1] = 1 (the rounding
  applies to the component's own offset, so an aligned component is aligned even when first);
- a mask with nothing beyond x87 and SSE needs 576 bytes in both formats (the kernel's
  ``top <= XFEATURE_SSE`` case).

Supervisor components (IA32_XSS) exist only in the compacted format (XSAVES); asking for their
standard offset, or for a standard size that includes them, raises MaskError.
"""

from __future__ import annotations

from dataclasses import dataclass

from fpstate.errors import FpstateError, MaskError
from fpstate.x86.cpuid import CpuidProfile
from fpstate.x86.xfeatures import (
    FXSAVE_SIZE,
    LEGACY_MASK,
    XCOMP_BV_COMPACTED_FORMAT,
    XSAVE_ALIGNMENT,
    XSAVE_HDR_SIZE,
    bits,
    mask_names,
)

#: Legacy region plus XSAVE header: where the extended region starts (and the minimum size).
XSAVE_EXTENDED_START = FXSAVE_SIZE + XSAVE_HDR_SIZE  # 576


def _round_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def _check_64(mask: int, what: str) -> None:
    if not isinstance(mask, int) or isinstance(mask, bool) or mask < 0 or mask >> 64:
        shown = f"{mask:#x}" if isinstance(mask, int) and not isinstance(mask, bool) else repr(mask)
        raise MaskError(f"{what} {shown} is not a 64-bit value")


def check_mask(profile: CpuidProfile, mask: int, *, supervisor_ok: bool) -> int:
    """Return ``mask`` if ``profile`` enumerates every bit of it, else raise MaskError naming
    the unsupported bits.

    User bits must be in CPUID.(EAX=0DH,ECX=0):EDX:EAX (the bits XSETBV accepts into XCR0);
    supervisor bits in CPUID.(EAX=0DH,ECX=1):EDX:ECX, and only when ``supervisor_ok`` (the
    mask is for XSAVES/XRSTORS or IA32_XSS).
    """
    _check_64(mask, "mask")
    allowed = profile.xcr0_supported | (profile.xss_supported if supervisor_ok else 0)
    bad = mask & ~allowed
    if bad:
        sup = bad & profile.xss_supported if not supervisor_ok else 0
        why = (f"; {mask_names(sup)} ({sup:#x}) are supervisor components (IA32_XSS)"
               if sup else "")
        raise MaskError(
            f"mask {mask:#x}: bits {mask_names(bad)} ({bad:#x}) are not supported by "
            f"{profile.name} (XCR0 {profile.xcr0_supported:#x}, XSS {profile.xss_supported:#x})"
            f"{why}"
        )
    return mask


def standard_offset(profile: CpuidProfile, i: int) -> int:
    """Offset of component ``i`` in the standard format: CPUID.(EAX=0DH,ECX=i).EBX (SDM
    13.4.2), 0 for x87 and 160 for SSE. MaskError for a supervisor component, which has none."""
    comp = profile.component(i)
    if comp.supervisor:
        raise MaskError(
            f"component {i} ({comp.name}) is a supervisor component: it has no standard-format "
            "offset (only XSAVES saves it, compacted)"
        )
    return comp.offset


def compacted_offset(profile: CpuidProfile, xcomp_bv: int, i: int) -> int:
    """Offset of component ``i`` in a compacted area whose XCOMP_BV is ``xcomp_bv``.

    Models xfeature_get_offset() and SDM 13.4.3: x87 and SSE keep their legacy offsets; else
    start at 576 and walk the bits 2..62 of XCOMP_BV in ascending order, rounding up to 64
    where the component is aligned (ECX[1]), stopping at ``i`` (its own alignment applied).
    XCOMP_BV[63] (the compacted-format flag) is ignored. MaskError if ``i`` is not in XCOMP_BV.
    """
    _check_64(xcomp_bv, "XCOMP_BV")
    if i in (0, 1):
        return profile.component(i).offset
    mask = xcomp_bv & ~XCOMP_BV_COMPACTED_FORMAT
    if not (isinstance(i, int) and 2 <= i <= 62 and (mask >> i) & 1):
        raise MaskError(f"component {i} is not set in XCOMP_BV {xcomp_bv:#x}")
    table = _compacted_offsets(profile, mask)
    if i in table:
        return table[i]
    offs = XSAVE_EXTENDED_START
    for j in bits(mask & ~LEGACY_MASK):
        comp = profile.component(j)
        if comp.aligned:
            offs = _round_up(offs, XSAVE_ALIGNMENT)
        if j == i:
            return offs
        offs += comp.size
    raise AssertionError("unreachable: i is set in the mask")


#: (id(profile), mask) -> (profile, {component: compacted offset}); see _compacted_offsets.
_OFFSETS: dict[tuple[int, int], tuple[CpuidProfile, dict[int, int]]] = {}


def _compacted_offsets(profile: CpuidProfile, mask: int) -> dict[int, int]:
    """The compacted offsets of every component of ``mask`` (bits 2..62, XCOMP_BV[63] clear),
    by the walk of `compacted_offset`, memoised per profile (profiles are immutable). The walk
    stops before a component the profile does not enumerate: `compacted_offset` then walks
    again itself and raises what it always raised."""
    key = (id(profile), mask)
    got = _OFFSETS.get(key)
    if got is not None and got[0] is profile:
        return got[1]
    table: dict[int, int] = {}
    offs = XSAVE_EXTENDED_START
    try:
        for j in bits(mask & ~LEGACY_MASK):
            comp = profile.component(j)
            if comp.aligned:
                offs = _round_up(offs, XSAVE_ALIGNMENT)
            table[j] = offs
            offs += comp.size
    except FpstateError:
        pass
    if len(_OFFSETS) >= 4096:
        _OFFSETS.clear()
    _OFFSETS[key] = (profile, table)
    return table


def standard_size(profile: CpuidProfile, mask: int) -> int:
    """Size of a standard-format area holding ``mask``: xstate_calculate_size(mask, false).

    576 when ``mask`` has nothing beyond x87|SSE; else max(offset + size) over the components
    of ``mask`` (the kernel takes the component with the largest standard offset, the same
    thing). With mask = XCR0 this is CPUID.(EAX=0DH,ECX=0).EBX.
    """
    _check_64(mask, "mask")
    size = XSAVE_EXTENDED_START
    for i in bits(mask & ~LEGACY_MASK):
        comp = profile.component(i)
        if comp.supervisor:
            raise MaskError(
                f"mask {mask:#x}: component {i} ({comp.name}) is a supervisor component, "
                "which the standard format cannot hold"
            )
        size = max(size, comp.offset + comp.size)
    return size


def compacted_size(profile: CpuidProfile, mask: int) -> int:
    """Size of a compacted area with XCOMP_BV = ``mask``: xstate_calculate_size(mask, true).

    576 when ``mask`` has nothing beyond x87|SSE; else the compacted offset of the highest
    component plus its size. With mask = XCR0 | IA32_XSS this is CPUID.(EAX=0DH,ECX=1).EBX.
    """
    _check_64(mask, "mask")
    mask &= ~XCOMP_BV_COMPACTED_FORMAT
    ext = bits(mask & ~LEGACY_MASK)
    if not ext:
        return XSAVE_EXTENDED_START
    top = ext[-1]
    return compacted_offset(profile, mask, top) + profile.component(top).size


@dataclass(frozen=True, slots=True)
class LayoutRow:
    """One component of a layout table. ``offset`` is the standard offset, 0 for supervisor
    components (which have none); ``compacted_offset`` is for XCOMP_BV = the table's mask."""

    number: int
    name: str
    size: int
    offset: int
    compacted_offset: int
    aligned: bool
    xfd: bool
    supervisor: bool


@dataclass(frozen=True, slots=True)
class LayoutTable:
    """Every component of ``mask`` with its offsets, and the two area sizes.

    ``standard_size`` covers the user components of ``mask`` only (the standard format cannot
    hold supervisor ones); ``compacted_size`` covers all of ``mask``.
    """

    profile: str
    mask: int
    rows: tuple[LayoutRow, ...]
    standard_size: int
    compacted_size: int

    def to_dict(self) -> dict[str, object]:
        """The ``fpstate layout --json`` object (integers throughout)."""
        return {
            "mask": self.mask,
            "standard_size": self.standard_size,
            "compacted_size": self.compacted_size,
            "features": [
                {"number": r.number, "name": r.name, "size": r.size, "offset": r.offset,
                 "compacted_offset": r.compacted_offset, "aligned": r.aligned, "xfd": r.xfd}
                for r in self.rows
            ],
        }


def layout_table(profile: CpuidProfile, mask: int) -> LayoutTable:
    """The layout of ``mask`` (user and supervisor bits) on ``profile``; MaskError for bits the
    profile does not enumerate."""
    check_mask(profile, mask, supervisor_ok=True)
    rows = []
    supervisor = 0
    for i in bits(mask):
        comp = profile.component(i)
        supervisor |= comp.mask if comp.supervisor else 0
        rows.append(LayoutRow(
            number=i,
            name=comp.name,
            size=comp.size,
            offset=comp.offset,
            compacted_offset=compacted_offset(profile, mask, i),
            aligned=comp.aligned,
            xfd=comp.xfd,
            supervisor=comp.supervisor,
        ))
    return LayoutTable(
        profile=profile.name,
        mask=mask,
        rows=tuple(rows),
        standard_size=standard_size(profile, mask & ~supervisor),
        compacted_size=compacted_size(profile, mask),
    )
