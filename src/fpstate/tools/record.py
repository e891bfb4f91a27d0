"""Portable state records: an XSAVE area together with the CPUID leaf 0xD it was saved under.

A blob alone cannot be read on another machine: its offsets are the saving CPU's CPUID leaf
0xD (AMD Zen 4 puts the opmask at 0x340, Intel at 0x440), and whether an area holds a component
depends on the XCR0 and IA32_XSS of the saving kernel. A record keeps all of it, in the spirit
of the proposed NT_X86_CPUID core note (discourse.llvm.org/t/74458): every sub-leaf of CPUID
leaf 0xD, the AMX tile leaves 0x1D/0x1E when present, the vendor, XCR0, IA32_XSS, the layout
("standard" or "compacted") and the area's bytes. JSON, so that it can be read anywhere.

Translation (`translate`) re-lays a record's state out for another CPU or format: standard <->
compacted, Intel <-> AMD offsets. Rules:

- the legacy region (bytes 0-511: x87, MXCSR, XMM, the software bytes) and the header's reserved
  bytes are copied as they are; XSTATE_BV is carried, XCOMP_BV is the target layout's (0, or
  XCR0 | the task supervisor features | bit 63, as the kernel's XSAVES of a task writes it:
  IA32_XSS without arch LBR, which only perf saves);
- each extended component the source lays out is copied byte for byte to its place in the
  target (the CPUID offsets, or the compacted walk of SDM 13.4.3), whether or not XSTATE_BV
  names it, so stale bytes survive too;
- a component the target cannot hold (not in its XCR0/IA32_XSS, a supervisor component in the
  standard format, or a different size) is refused when XSTATE_BV names it and its bytes are
  not the initial configuration; with XSTATE_BV set over initial values it is dropped and its
  XSTATE_BV bit cleared (XRSTOR loads the same registers either way); else it is skipped;
- every refused component is named in one `Refusal` -- nothing is dropped silently;
- bytes of the extended region outside every component (the MPX gap of Intel's standard
  format, alignment padding) are not state: the target has zeros there, and a note counts any
  non-zero ones.

So A -> B -> A is byte-exact whenever B holds every component A lays out and A's padding is
zero (as the kernel's buffers are: they are zero-allocated and XSAVE never writes padding).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from fpstate.errors import BlobError, FpstateError
from fpstate.tools.blob import (
    COMPACTED_FORMATS,
    USER_XSTATE_XCR0_OFFSET,
    Placement,
    compacted_places,
    decode,
)
from fpstate.tools.registers import component_fields
from fpstate.x86.cpuid import CpuidProfile, Regs
from fpstate.x86.layout import XSAVE_EXTENDED_START, compacted_size, standard_size
from fpstate.x86.xfeatures import (
    BY_NUMBER,
    FXSAVE_SIZE,
    XCOMP_BV_COMPACTED_FORMAT,
    XFEATURE_MASK_FPSSE,
    XSAVE_HDR_OFFSET,
    bits,
)

RECORD_FORMAT = "fpstate-state-record/1"
LAYOUTS: tuple[str, ...] = ("standard", "compacted")
#: Leaves a record keeps: XSAVE enumeration and the AMX palette/TMUL information.
RECORD_LEAVES: tuple[int, ...] = (0xD, 0x1D, 0x1E)
_VENDOR_IDS = {"intel": "GenuineIntel", "amd": "AuthenticAMD", "hygon": "HygonGenuine",
               "zhaoxin": "  Shanghai  ", "centaur": "CentaurHauls"}


def _name(i: int) -> str:
    f = BY_NUMBER.get(i)
    return f.short if f else f"bit{i}"


@dataclass(frozen=True, slots=True)
class StateRecord:
    """An XSAVE area with the CPUID leaf 0xD, XCR0 and IA32_XSS it was saved under."""

    cpu: str
    vendor: str
    leaves: tuple[tuple[int, int, Regs], ...]  #: (leaf, sub-leaf, registers), RECORD_LEAVES only
    xcr0: int
    xss: int
    layout: str
    state: bytes

    def profile(self) -> CpuidProfile:
        """A CPU profile answering CPUID as the saving CPU did for the recorded leaves (and
        leaf 0 for the vendor); every other leaf reads 0."""
        leaves: dict[tuple[int, int], Regs] = {(leaf, sub): regs for leaf, sub, regs in
                                               self.leaves}
        ident = _VENDOR_IDS.get(self.vendor, "Unknown CPU ").encode("latin-1")
        ebx, edx, ecx = (int.from_bytes(ident[k:k + 4], "little") for k in (0, 4, 8))
        leaves[(0, 0)] = (max(RECORD_LEAVES), ebx, ecx, edx)
        try:
            return CpuidProfile(f"{self.cpu} (record)", self.vendor, leaves,
                                "fpstate state record")
        except FpstateError as e:
            raise BlobError(f"state record: bad CPUID: {e}") from None

    @property
    def xstate_bv(self) -> int:
        return int.from_bytes(self.state[XSAVE_HDR_OFFSET:XSAVE_HDR_OFFSET + 8], "little")

    @property
    def xcomp_bv(self) -> int:
        return int.from_bytes(self.state[XSAVE_HDR_OFFSET + 8:XSAVE_HDR_OFFSET + 16], "little")

    def to_dict(self) -> dict[str, Any]:
        cpuid: dict[str, dict[str, list[str]]] = {}
        for leaf, sub, regs in self.leaves:
            cpuid.setdefault(f"{leaf:#x}", {})[f"{sub:#x}"] = [f"{r:#010x}" for r in regs]
        return {"format": RECORD_FORMAT, "cpu": self.cpu, "vendor": self.vendor,
                "xcr0": f"{self.xcr0:#x}", "xss": f"{self.xss:#x}", "layout": self.layout,
                "size": len(self.state), "cpuid": cpuid, "state": self.state.hex()}

    def to_json(self) -> str:
        """The record as JSON text, one line per field and per CPUID leaf."""
        d = self.to_dict()
        cpuid = d.pop("cpuid")
        state = d.pop("state")
        head = [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in d.items()]
        leaves = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in cpuid.items())
        return ("{\n" + "\n".join(head) + '\n "cpuid": {\n' + leaves + "\n },\n"
                + f' "state": {json.dumps(state)}\n}}\n')

    @classmethod
    def from_json(cls, data: str | bytes | Mapping[str, Any]) -> StateRecord:
        """A record from its JSON (text or object); BlobError naming what is wrong."""
        if isinstance(data, (str, bytes)):
            try:
                data = json.loads(data)
            except (ValueError, UnicodeDecodeError) as e:
                raise BlobError(f"state record JSON does not parse: {e}") from None
        if not isinstance(data, Mapping) or data.get("format") != RECORD_FORMAT:
            raise BlobError(f"not a state record (field 'format' must be {RECORD_FORMAT!r})")
        try:
            leaves = tuple(
                (int(leaf, 16), int(sub, 16), tuple(int(r, 16) for r in regs))
                for leaf, subs in data["cpuid"].items() for sub, regs in subs.items())
            if any(len(regs) != 4 for _, _, regs in leaves):
                raise ValueError("a CPUID entry has not 4 registers")
            record = cls(cpu=str(data["cpu"]), vendor=str(data["vendor"]),
                         leaves=leaves,  # type: ignore[arg-type]
                         xcr0=int(data["xcr0"], 16), xss=int(data["xss"], 16),
                         layout=str(data["layout"]), state=bytes.fromhex(data["state"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BlobError(f"state record: bad or missing field: {e}") from None
        if record.layout not in LAYOUTS:
            raise BlobError(f"state record: layout {record.layout!r} is not one of {LAYOUTS}")
        if len(record.state) < XSAVE_EXTENDED_START:
            raise BlobError(f"state record: the state is {len(record.state)} bytes, less than "
                            f"an XSAVE area ({XSAVE_EXTENDED_START})")
        return record


def record_leaves(profile: CpuidProfile) -> tuple[tuple[int, int, Regs], ...]:
    """Every sub-leaf of RECORD_LEAVES the profile answers with something other than zeros:
    leaf 0xD sub-leaves 0..63, leaf 0x1D 0..max palette, leaf 0x1E 0."""
    out = []
    for leaf in RECORD_LEAVES:
        for sub in range(64 if leaf == 0xD else 8):
            regs = profile.cpuid(leaf, sub)
            if any(regs):
                out.append((leaf, sub, regs))
    return tuple(out)


def linux_xcr0_xss(profile: CpuidProfile, kernel: str | None = None) -> tuple[int, int]:
    """XCR0 as Linux (the boot model, fpu__init_system_xstate) writes it on ``profile``, and
    the supervisor components of IA32_XSS that a task's state holds: the MSR without the
    independent features (arch LBR, xfeatures_mask_independent(): XSAVES'd only by perf into
    its own buffer, never into an fpstate, so never in the XCOMP_BV of a task's area).
    (supported XCR0, 0) where the kernel would not use XSAVE."""
    from fpstate.kernel.x86.xstate import fpu__init_system_xstate

    boot = fpu__init_system_xstate(profile, kernel) if kernel else fpu__init_system_xstate(
        profile)
    if boot.xcr0 is None:
        return profile.xcr0_supported, 0
    return boot.xcr0, (boot.ia32_xss or 0) & ~boot.independent_features


def record_from_blob(data: bytes, profile: CpuidProfile, fmt: str = "auto", *,
                     xcr0: int | None = None, xss: int | None = None) -> StateRecord:
    """A record of a blob of any `fpstate.tools.blob` format saved on ``profile``.

    XCR0 is, in order: ``xcr0``, what the blob says (the u64 at 464 of a uabi/KVM copy, a
    signal frame's xfeatures, a compacted area's XCOMP_BV user bits), or Linux's XCR0 on the
    profile. The state is the XSAVE area proper (a signal frame without its magic2, a KVM
    buffer without its zero padding: the standard size of XCR0)."""
    blob = decode(data, profile, fmt)
    compacted = blob.fmt in COMPACTED_FORMATS
    lx_xcr0, lx_xss = linux_xcr0_xss(profile)
    if xcr0 is None:
        if compacted:
            xcr0 = blob.xcomp_bv & profile.xcr0_supported
        elif blob.xcr0 is not None and blob.xcr0 & XFEATURE_MASK_FPSSE == XFEATURE_MASK_FPSSE:
            xcr0 = blob.xcr0 & profile.xcr0_supported
        else:
            xcr0 = lx_xcr0
    if xss is None:
        xss = blob.xcomp_bv & profile.xss_supported if compacted else lx_xss
    try:
        size = (compacted_size(profile, blob.xcomp_bv & ~XCOMP_BV_COMPACTED_FORMAT)
                if compacted else standard_size(profile, xcr0))
    except FpstateError as e:
        raise BlobError(f"cannot size the area on {profile.name}: {e}") from None
    if size > len(data):
        raise BlobError(f"the {blob.fmt} blob is {len(data)} bytes; its area needs {size}")
    return StateRecord(profile.name, profile.vendor, record_leaves(profile), xcr0, xss,
                       "compacted" if compacted else "standard", bytes(data[:size]))


# -- translation ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refusal:
    """A component whose state the target cannot hold, and why."""

    number: int
    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name} (component {self.number}): {self.reason}"


@dataclass(frozen=True, slots=True)
class Translation:
    """The outcome of `translate`: the new record, or the refusals; notes either way."""

    record: StateRecord | None
    refused: tuple[Refusal, ...]
    notes: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.record is not None


def _places(profile: CpuidProfile, layout: str, xcr0: int, xss: int,
            xcomp_bv: int) -> dict[int, Placement]:
    warn: list[str] = []
    if layout == "compacted":
        mask = xcomp_bv & ~XCOMP_BV_COMPACTED_FORMAT
        end = compacted_size(profile, mask)
        places = compacted_places(profile, mask, end, warn)
    else:
        places = []
        for i in bits(xcr0 & ~XFEATURE_MASK_FPSSE):
            comp = profile.component(i)
            if not comp.supervisor:
                places.append(Placement(i, comp.offset, comp.size))
    if warn:
        raise BlobError(f"{profile.name}: {'; '.join(warn)}")
    return {p.number: p for p in places}


def _is_init(number: int, size: int, data: bytes) -> bool:
    """Whether a component's registers hold the initial configuration (SDM 13.6: zero for
    every extended component)."""
    return all(not any(data[f.offset:f.offset + f.size])
               for f in component_fields(number, size))


def translate(record: StateRecord, target: CpuidProfile, layout: str = "standard", *,
              xcr0: int | None = None, xss: int | None = None) -> Translation:
    """The state of ``record`` laid out for ``target`` in ``layout`` (see the module docstring
    for the rules). ``xcr0``/``xss`` default to what Linux writes on the target (the boot
    model); IA32_XSS only matters for the compacted layout."""
    if layout not in LAYOUTS:
        raise BlobError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    src = record.profile()
    if xcr0 is None or xss is None:
        lx_xcr0, lx_xss = linux_xcr0_xss(target)
        xcr0 = lx_xcr0 if xcr0 is None else xcr0
        xss = lx_xss if xss is None else xss
    xcr0 &= target.xcr0_supported
    xss = xss & target.xss_supported if layout == "compacted" else 0
    try:
        src_places = _places(src, record.layout, record.xcr0, record.xss, record.xcomp_bv)
        t_xcomp = (xcr0 | xss | XCOMP_BV_COMPACTED_FORMAT) if layout == "compacted" else 0
        dst_places = _places(target, layout, xcr0, xss, t_xcomp)
        size = (compacted_size(target, t_xcomp & ~XCOMP_BV_COMPACTED_FORMAT)
                if layout == "compacted" else standard_size(target, xcr0))
    except FpstateError as e:
        raise BlobError(f"cannot lay out the translation: {e}") from None
    state = record.state
    xstate_bv = record.xstate_bv
    notes: list[str] = []
    refused: list[Refusal] = []
    unknown = xstate_bv & ~XFEATURE_MASK_FPSSE & ~sum(1 << i for i in src_places)
    for i in bits(unknown):
        refused.append(Refusal(i, _name(i), "XSTATE_BV names it but the source layout has "
                               "no place for it (XRSTOR would #GP on the source too)"))
    out = bytearray(size)
    out[0:FXSAVE_SIZE] = state[0:FXSAVE_SIZE]
    out[XSAVE_HDR_OFFSET + 16:XSAVE_EXTENDED_START] = state[XSAVE_HDR_OFFSET + 16:
                                                            XSAVE_EXTENDED_START]
    covered = bytearray(len(state))
    new_bv = xstate_bv & ~unknown
    for i, p in src_places.items():
        covered[p.offset:p.offset + p.size] = b"\1" * p.size
        data = state[p.offset:p.offset + p.size]
        in_bv = bool(xstate_bv >> i & 1)
        q = dst_places.get(i)
        if q is not None and q.size == p.size:
            out[q.offset:q.offset + q.size] = data
            continue
        if q is not None:
            why = f"{p.size} bytes on {record.cpu}, {q.size} on {target.name}"
        elif layout == "standard" and target.xss_supported >> i & 1:
            why = "a supervisor component: the standard format has no place for it"
        else:
            why = (f"not in the target's XCR0 {xcr0:#x}"
                   + (f" / IA32_XSS {xss:#x}" if layout == "compacted" else ""))
        if not in_bv:
            continue
        if _is_init(i, p.size, data):
            new_bv &= ~(1 << i)
            notes.append(f"{_name(i)}: in XSTATE_BV with initial values; dropped ({why})")
        else:
            refused.append(Refusal(i, _name(i), f"holds state; {why}"))
    stray = sum(1 for k in range(XSAVE_EXTENDED_START, len(state))
                if state[k] and not covered[k])
    if stray:
        notes.append(f"{stray} non-zero bytes outside every component (padding, gaps) are not "
                     "state and were not carried")
    if refused:
        return Translation(None, tuple(refused), tuple(notes))
    out[XSAVE_HDR_OFFSET:XSAVE_HDR_OFFSET + 16] = (new_bv.to_bytes(8, "little")
                                                   + t_xcomp.to_bytes(8, "little"))
    if record.layout == "standard" and layout == "standard":
        # The uabi copy's XCR0 word at 464 describes the area: keep it true for the target.
        word = int.from_bytes(state[USER_XSTATE_XCR0_OFFSET:USER_XSTATE_XCR0_OFFSET + 8],
                              "little")
        if word == record.xcr0 and word != xcr0:
            out[USER_XSTATE_XCR0_OFFSET:USER_XSTATE_XCR0_OFFSET + 8] = xcr0.to_bytes(8, "little")
            notes.append(f"the XCR0 word at 464 ({word:#x}) now names the target's XCR0 "
                         f"{xcr0:#x}")
    new = replace(record, cpu=target.name, vendor=target.vendor, leaves=record_leaves(target),
                  xcr0=xcr0, xss=xss, layout=layout, state=bytes(out))
    return Translation(new, (), tuple(notes))


def refusal_message(t: Translation, target: str) -> str:
    """One line naming every refused component."""
    return (f"{target} cannot hold the state: "
            + "; ".join(str(r) for r in t.refused))
