"""State blobs: decode, encode and auto-detect the XSAVE-area formats people hold in files.

Formats (every offset comes from the CPU profile's CPUID leaf 0xD, never from a table):

- ``xsave``: the standard format (Intel SDM Vol. 1 13.4.1-13.4.2), as XSAVE/XSAVEOPT write it:
  legacy region 0-511, header 512-575 (XSTATE_BV, XCOMP_BV = 0), component i at
  CPUID.(EAX=0DH,ECX=i).EBX;
- ``xsavec`` / ``xsaves``: the compacted format (13.4.3): XCOMP_BV[63] = 1 and components of
  XCOMP_BV[62:0] packed in ascending order (64-byte aligned where ECX[1] says so);
  ``xsaves`` may hold supervisor (IA32_XSS) components, ``xsavec`` may not;
- ``uabi``: the kernel's user ABI copy of an fpstate, which ptrace's NT_X86_XSTATE regset and
  core files carry (copy_xstate_to_uabi_buf(), XSTATE_COPY_XSAVE, arch/x86/kernel/fpu/xstate.c):
  standard format, fpu_user_cfg.max_size bytes, with ``xstate_fx_sw_bytes`` in the legacy
  region's software-reserved bytes, i.e. XCR0 (fpu_user_cfg.max_features) as a u64 at 464
  (USER_XSTATE_XCR0_WORD, the offset gdb reads);
- ``sigframe``: the fpstate of a 64-bit signal frame (copy_fpstate_to_sigframe(),
  save_xstate_epilog(), arch/x86/kernel/fpu/signal.c): standard format with
  ``struct _fpx_sw_bytes`` at 464 (magic1 FP_XSTATE_MAGIC1, extended_size, xfeatures,
  xstate_size) and FP_XSTATE_MAGIC2 at offset xstate_size; the blob is extended_size bytes;
- ``sigframe-ia32``: the fpstate of a 32-bit program's signal frame (what its sc.fpstate points
  at): the 112-byte fsave header (struct _fpstate_32 up to ``magic``: the x87 environment and
  registers in the legacy 32-bit format, save_fsave_header()/convert_from_fxsr()), then a
  ``sigframe`` area whose extended_size counts the header; offsets count from the header;
- ``kvm``: ``struct kvm_xsave`` of KVM_GET_XSAVE (4096 bytes) or KVM_GET_XSAVE2
  (KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) bytes): the same uabi copy of the guest fpstate
  (fpu_copy_guest_fpstate_to_uabi()), zero-padded to the buffer size.

Rules of this file:
- decoding never raises anything but `BlobError` (fuzzed with hypothesis); oddities a kernel or
  XRSTOR would refuse are *warnings* naming the rule, so a broken blob can still be read;
- every byte of a blob is either in a named field (header, software bytes, a register of
  ``fpstate.tools.registers``) or in an "extra" run (reserved bytes, padding, gaps), and
  `encode` writes both back: decode then encode is byte-exact;
- registers are hex strings of the little-endian value, zero-padded to the register's width.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fpstate.errors import BlobError, FpstateError
from fpstate.tools.registers import MXCSR_OFFSET, Field, component_fields
from fpstate.x86.cpuid import CpuidProfile
from fpstate.x86.image import FCW_INIT
from fpstate.x86.layout import XSAVE_EXTENDED_START, standard_size
from fpstate.x86.xfeatures import (
    BY_NUMBER,
    XCOMP_BV_COMPACTED_FORMAT,
    XFEATURE_MASK_FPSSE,
    XSAVE_ALIGNMENT,
    XSAVE_HDR_OFFSET,
    bits,
    mask_names,
)

FORMATS: tuple[str, ...] = ("xsave", "xsavec", "xsaves", "uabi", "sigframe", "sigframe-ia32",
                             "kvm")
#: sizeof(struct fregs_state): the fsave header before an ia32 frame's XSAVE area.
FSAVE_HEADER_SIZE = 112
COMPACTED_FORMATS = frozenset({"xsavec", "xsaves"})
JSON_FORMAT = "fpstate-blob/1"

SW_BYTES_OFFSET = 464  #: struct _fpx_sw_bytes / xstate_fx_sw_bytes in fxregs_state.sw_reserved
USER_XSTATE_XCR0_OFFSET = 464  #: xstate_fx_sw_bytes[USER_XSTATE_XCR0_WORD]
FP_XSTATE_MAGIC1 = 0x46505853
FP_XSTATE_MAGIC2 = 0x46505845
FP_XSTATE_MAGIC2_SIZE = 4
KVM_XSAVE_SIZE = 4096  #: sizeof(struct kvm_xsave): __u32 region[1024]
MAX_BLOB_SIZE = 1 << 20  #: far above any XSAVE area (SPR: 11008), a guard against garbage
XSTATE_BV_OFFSET = XSAVE_HDR_OFFSET
XCOMP_BV_OFFSET = XSAVE_HDR_OFFSET + 8
MXCSR_DEFAULT_MASK = 0xFFBF  #: SDM 11.6.6: the mask to assume when MXCSR_MASK reads 0


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a component's save area lies in a blob."""

    number: int
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class ComponentState:
    """One component of a decoded blob.

    ``in_xstate_bv``: XSTATE_BV[i] (XRSTOR loads it from the area; else the component is in
    its initial configuration whatever the bytes say). ``init_values``: its registers hold the
    initial configuration (SDM 13.6). ``stale``: not in XSTATE_BV but the bytes are not the
    initial configuration (XSAVEOPT/XSAVEC leave such bytes untouched; XRSTOR ignores them).
    """

    number: int
    name: str
    offset: int
    size: int
    in_xstate_bv: bool
    init_values: bool
    registers: tuple[tuple[str, int], ...]

    @property
    def stale(self) -> bool:
        return not self.in_xstate_bv and not self.init_values

    @property
    def state(self) -> str:
        if not self.in_xstate_bv:
            return "init (stale bytes ignored)" if self.stale else "init"
        return "in use (initial values)" if self.init_values else "in use"

    def register(self, name: str) -> int:
        for n, v in self.registers:
            if n == name:
                return v
        raise BlobError(f"component {self.name} has no register {name!r}")


@dataclass(frozen=True, slots=True)
class SwBytes:
    """struct _fpx_sw_bytes (arch/x86/include/uapi/asm/sigcontext.h), 48 bytes at 464."""

    magic1: int
    extended_size: int
    xfeatures: int
    xstate_size: int


@dataclass(frozen=True, slots=True)
class Blob:
    """A decoded blob. ``layout_mask`` is the set of components laid out (decoded)."""

    fmt: str
    profile: str
    size: int
    detected: str | None
    xstate_bv: int
    xcomp_bv: int
    xcr0: int | None
    sw_bytes: SwBytes | None
    magic2: int | None
    layout_mask: int
    components: tuple[ComponentState, ...]
    extra: tuple[tuple[int, bytes], ...]
    warnings: tuple[str, ...]
    #: sigframe-ia32: the fsave header's fields (cw, sw, tag, ipoff, cssel, dataoff, datasel,
    #: st0..st7, status, magic)
    fsave_header: tuple[tuple[str, int], ...] | None = None

    def component(self, number: int) -> ComponentState:
        for c in self.components:
            if c.number == number:
                return c
        raise BlobError(f"the blob has no component {number}")

    def register(self, name: str) -> int:
        """A register by name, whichever component holds it."""
        for c in self.components:
            for n, v in c.registers:
                if n == name:
                    return v
        raise BlobError(f"the blob has no register {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """The ``fpstate decode --json`` object, which `encode` reads back."""
        d: dict[str, Any] = {
            "format": JSON_FORMAT,
            "blob_format": self.fmt,
            "cpu": self.profile,
            "size": self.size,
            "detected": self.detected,
            "header": {"xstate_bv": f"{self.xstate_bv:#018x}",
                       "xcomp_bv": f"{self.xcomp_bv:#018x}"},
        }
        if self.xcr0 is not None and self.sw_bytes is None:
            d["xcr0"] = f"{self.xcr0:#018x}"
        if self.sw_bytes is not None:
            sw = self.sw_bytes
            d["sw_bytes"] = {"magic1": f"{sw.magic1:#010x}",
                             "extended_size": sw.extended_size,
                             "xfeatures": f"{sw.xfeatures:#018x}",
                             "xstate_size": sw.xstate_size}
            d["magic2"] = None if self.magic2 is None else f"{self.magic2:#010x}"
        d["components"] = [
            {"number": c.number, "name": c.name, "offset": c.offset, "size": c.size,
             "state": c.state, "in_xstate_bv": c.in_xstate_bv,
             "registers": {n: _hex(v, _width(c, n)) for n, v in c.registers}}
            for c in self.components
        ]
        if self.fsave_header is not None:
            d["fsave_header"] = {n: _hex(v, _FSAVE_WIDTH.get(n, 4))
                                 for n, v in self.fsave_header}
        d["extra"] = [{"offset": off, "hex": raw.hex()} for off, raw in self.extra]
        d["warnings"] = list(self.warnings)
        return d


#: The fsave header's fields: name -> (offset, width); st0..st7 are the 10-byte registers.
FSAVE_FIELDS: dict[str, tuple[int, int]] = {
    **{n: (4 * i, 4) for i, n in enumerate(("cw", "sw", "tag", "ipoff", "cssel", "dataoff",
                                            "datasel"))},
    **{f"st{i}": (28 + 10 * i, 10) for i in range(8)},
    "status": (108, 2), "magic": (110, 2),
}
_FSAVE_WIDTH = {n: w for n, (_, w) in FSAVE_FIELDS.items()}


def _width(c: ComponentState, name: str) -> int:
    for f in component_fields(c.number, c.size):
        if f.name == name:
            return f.size
    raise AssertionError(name)


def _hex(value: int, size: int) -> str:
    return f"0x{value:0{2 * size}x}"


# -- layouts -------------------------------------------------------------------------------------


def supported_mxcsr_mask(profile: CpuidProfile) -> int:
    """The MXCSR_MASK FXSAVE writes on ``profile``: DAZ on every x86-64 CPU (0xFFFF), plus MM
    (bit 17) with AMD's misaligned SSE mode, CPUID.80000001H:ECX[7] (host finding 8)."""
    return 0xFFFF | ((profile.cpuid(0x80000001)[2] >> 7) & 1) << 17


def _component(profile: CpuidProfile, i: int, warn: list[str]):  # -> Component | None
    try:
        return profile.component(i)
    except FpstateError as e:
        warn.append(f"component {i} ({_name(i)}) cannot be laid out on {profile.name}: {e}")
        return None


def _name(i: int) -> str:
    f = BY_NUMBER.get(i)
    return f.short if f else f"bit{i}"


def standard_places(profile: CpuidProfile, mask: int, end: int,
                    warn: list[str]) -> list[Placement]:
    """Extended components of ``mask`` at their standard offsets (CPUID EBX, SDM 13.4.2) that
    end by ``end``. Supervisor and unenumerated bits are reported in ``warn``."""
    out = []
    for i in bits(mask & ~XFEATURE_MASK_FPSSE):
        comp = _component(profile, i, warn)
        if comp is None:
            continue
        if comp.supervisor:
            warn.append(f"component {i} ({comp.name}) is a supervisor component: the standard "
                        "format has no place for it")
            continue
        if comp.offset < XSAVE_EXTENDED_START or comp.offset + comp.size > end:
            warn.append(f"component {i} ({comp.name}) at {comp.offset:#x}+{comp.size:#x} does "
                        f"not fit in the {end}-byte area")
            continue
        out.append(Placement(i, comp.offset, comp.size))
    return out


def compacted_places(profile: CpuidProfile, xcomp_bv: int, end: int,
                     warn: list[str]) -> list[Placement]:
    """Components of XCOMP_BV[62:2] packed as SDM 13.4.3 says (the walk of
    xfeature_get_offset()); the walk stops at a bit the profile does not enumerate, since no
    later offset can be known."""
    out = []
    offs = XSAVE_EXTENDED_START
    for i in bits(xcomp_bv & ~XCOMP_BV_COMPACTED_FORMAT & ~XFEATURE_MASK_FPSSE):
        comp = _component(profile, i, warn)
        if comp is None:
            warn.append(f"XCOMP_BV bit {i} is unknown to {profile.name}: components after it "
                        "cannot be located")
            break
        if comp.aligned:
            offs = (offs + XSAVE_ALIGNMENT - 1) // XSAVE_ALIGNMENT * XSAVE_ALIGNMENT
        if offs + comp.size > end:
            warn.append(f"component {i} ({comp.name}) at {offs:#x}+{comp.size:#x} does not "
                        f"fit in the {end}-byte area")
            break
        out.append(Placement(i, offs, comp.size))
        offs += comp.size
    return out


# -- auto-detection ------------------------------------------------------------------------------


def _u(data: bytes, fmt: str, off: int) -> int:
    return int(struct.unpack_from(fmt, data, off)[0])


def _plausible_xcr0(value: int, profile: CpuidProfile) -> bool:
    return (value & XFEATURE_MASK_FPSSE == XFEATURE_MASK_FPSSE
            and not value & ~profile.xcr0_supported)


def detect_format(data: bytes, profile: CpuidProfile) -> tuple[str, str]:
    """The format of ``data`` and why: a signal frame has both magics, a compacted area has
    XCOMP_BV[63], a uabi/KVM copy has a plausible XCR0 at 464 (4096 bytes: struct kvm_xsave),
    anything else is a plain standard-format area."""
    _check_size(data)
    magic1 = _u(data, "<I", SW_BYTES_OFFSET)
    xstate_size = _u(data, "<I", SW_BYTES_OFFSET + 16)
    if (magic1 == FP_XSTATE_MAGIC1 and XSAVE_EXTENDED_START <= xstate_size <= len(data) - 4
            and _u(data, "<I", xstate_size) == FP_XSTATE_MAGIC2):
        return "sigframe", (f"FP_XSTATE_MAGIC1 at {SW_BYTES_OFFSET} and FP_XSTATE_MAGIC2 at "
                            f"xstate_size {xstate_size}")
    h = FSAVE_HEADER_SIZE
    if len(data) >= h + XSAVE_EXTENDED_START + 4:
        xstate_size = _u(data, "<I", h + SW_BYTES_OFFSET + 16)
        if (_u(data, "<I", h + SW_BYTES_OFFSET) == FP_XSTATE_MAGIC1
                and XSAVE_EXTENDED_START <= xstate_size <= len(data) - h - 4
                and _u(data, "<I", h + xstate_size) == FP_XSTATE_MAGIC2):
            return "sigframe-ia32", (f"FP_XSTATE_MAGIC1 at {h + SW_BYTES_OFFSET} and "
                                     f"FP_XSTATE_MAGIC2 at {h} + xstate_size {xstate_size}: "
                                     "an fsave header before a signal-frame area")
    xcomp_bv = _u(data, "<Q", XCOMP_BV_OFFSET)
    if xcomp_bv & XCOMP_BV_COMPACTED_FORMAT:
        if xcomp_bv & profile.xss_supported:
            return "xsaves", f"XCOMP_BV {xcomp_bv:#x}: bit 63 and supervisor components"
        return "xsavec", f"XCOMP_BV {xcomp_bv:#x}: bit 63, user components only"
    xcr0 = _u(data, "<Q", USER_XSTATE_XCR0_OFFSET)
    if _plausible_xcr0(xcr0, profile):
        if len(data) == KVM_XSAVE_SIZE and _standard_size(profile, xcr0) != KVM_XSAVE_SIZE:
            return "kvm", f"XCR0 {xcr0:#x} at {USER_XSTATE_XCR0_OFFSET}, 4096 bytes"
        return "uabi", f"XCR0 {xcr0:#x} at {USER_XSTATE_XCR0_OFFSET}"
    return "xsave", "no signal-frame magic, XCOMP_BV[63] clear, no XCR0 at 464"


def _standard_size(profile: CpuidProfile, mask: int) -> int | None:
    try:
        return standard_size(profile, mask)
    except FpstateError:
        return None


def _check_size(data: bytes) -> None:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BlobError(f"a blob is bytes, not {type(data).__name__}")
    if len(data) < XSAVE_EXTENDED_START:
        raise BlobError(f"blob is {len(data)} bytes; an XSAVE area has at least "
                        f"{XSAVE_EXTENDED_START} (legacy region + header)")
    if len(data) > MAX_BLOB_SIZE:
        raise BlobError(f"blob is {len(data)} bytes, more than any XSAVE area "
                        f"({MAX_BLOB_SIZE} is the limit)")


# -- decoding ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Frame:
    """The layout of one blob: where its fields and components are."""

    area_end: int  #: end of the XSAVE area proper (sigframe: xstate_size)
    mask: int  #: XCR0 the format says the area was saved under (warnings about XSTATE_BV)
    places: tuple[Placement, ...]
    specials: tuple[Field, ...]  #: header, software bytes, XCR0, magic2 (absolute offsets)


def _frame(data: bytes, profile: CpuidProfile, fmt: str, xcr0: int | None,
           warn: list[str]) -> tuple[_Frame, int | None, SwBytes | None, int | None]:
    n = len(data)
    specials = [Field("xstate_bv", XSTATE_BV_OFFSET, 8), Field("xcomp_bv", XCOMP_BV_OFFSET, 8)]
    xcomp_bv = _u(data, "<Q", XCOMP_BV_OFFSET)
    blob_xcr0: int | None = None
    sw: SwBytes | None = None
    magic2: int | None = None
    end = n
    if fmt in COMPACTED_FORMATS:
        if not xcomp_bv & XCOMP_BV_COMPACTED_FORMAT:
            warn.append(f"XCOMP_BV {xcomp_bv:#x} lacks bit 63: XRSTOR reads this area in the "
                        "standard form (SDM 13.8), not compacted")
        places = compacted_places(profile, xcomp_bv, n, warn)
        mask = xcr0 if xcr0 is not None else profile.xcr0_supported | (
            profile.xss_supported if fmt == "xsaves" else 0)
        return _Frame(n, mask, tuple(places), tuple(specials)), blob_xcr0, sw, magic2
    if fmt == "sigframe":
        sw = SwBytes(_u(data, "<I", 464), _u(data, "<I", 468), _u(data, "<Q", 472),
                     _u(data, "<I", 480))
        specials += [Field("magic1", 464, 4), Field("extended_size", 468, 4),
                     Field("xfeatures", 472, 8), Field("xstate_size", 480, 4)]
        mask = sw.xfeatures
        if sw.magic1 != FP_XSTATE_MAGIC1:
            warn.append(f"magic1 {sw.magic1:#x} is not FP_XSTATE_MAGIC1: sigreturn treats the "
                        "frame as FXSAVE-only (check_xstate_in_sigframe), restoring x87 and SSE")
            mask = XFEATURE_MASK_FPSSE
        elif not XSAVE_EXTENDED_START <= sw.xstate_size <= n - FP_XSTATE_MAGIC2_SIZE:
            warn.append(f"xstate_size {sw.xstate_size} does not fit the {n}-byte frame")
        else:
            end = sw.xstate_size
            magic2 = _u(data, "<I", end)
            specials.append(Field("magic2", end, 4))
            if magic2 != FP_XSTATE_MAGIC2:
                warn.append(f"magic2 {magic2:#x} at {end} is not FP_XSTATE_MAGIC2: sigreturn "
                            "treats the frame as FXSAVE-only (check_xstate_in_sigframe)")
            if sw.extended_size != sw.xstate_size + FP_XSTATE_MAGIC2_SIZE:
                warn.append(f"extended_size {sw.extended_size} != xstate_size + 4 "
                            f"({sw.xstate_size + 4}) as save_sw_bytes() writes it")
    elif fmt in ("uabi", "kvm"):
        blob_xcr0 = _u(data, "<Q", USER_XSTATE_XCR0_OFFSET)
        specials.append(Field("xcr0", USER_XSTATE_XCR0_OFFSET, 8))
        mask = blob_xcr0
        if not _plausible_xcr0(blob_xcr0, profile):
            warn.append(f"XCR0 {blob_xcr0:#x} at 464 is not a user XCR0 of {profile.name} "
                        f"(supported {profile.xcr0_supported:#x}); laying out the supported "
                        "components instead")
            mask = profile.xcr0_supported
        if fmt == "kvm" and n < KVM_XSAVE_SIZE:
            warn.append(f"{n} bytes: struct kvm_xsave is at least {KVM_XSAVE_SIZE}")
        if fmt == "uabi" and _plausible_xcr0(blob_xcr0, profile):
            want = _standard_size(profile, blob_xcr0)
            if want is not None and want != n:
                warn.append(f"{n} bytes, but NT_X86_XSTATE for XCR0 {blob_xcr0:#x} is "
                            f"fpu_user_cfg.max_size = {want}")
    else:
        mask = profile.xcr0_supported if xcr0 is None else xcr0
    if xcr0 is not None:
        mask = xcr0
    places = standard_places(profile, mask & profile.xcr0_supported, end, warn)
    return _Frame(end, mask, tuple(places), tuple(specials)), blob_xcr0, sw, magic2


def _init_values(number: int, regs: dict[str, int]) -> bool:
    """Whether the registers are the initial configuration (SDM 13.6): x87 FCW 037FH and zeros
    (abridged FTW 0 = all empty); XMM zero (MXCSR is not part of XINUSE[1]); zero elsewhere."""
    if number == 0:
        return all(v == (FCW_INIT if n == "fcw" else 0) for n, v in regs.items())
    if number == 1:
        return all(v == 0 for n, v in regs.items() if n.startswith("xmm"))
    return all(v == 0 for v in regs.values())


def decode(data: bytes, profile: CpuidProfile, fmt: str = "auto", *,
           xcr0: int | None = None) -> Blob:
    """Decode ``data`` as ``fmt`` (or detect it) on ``profile``. ``xcr0`` overrides the set of
    user components a standard-format area is taken to hold (default: what the format says --
    the XCR0 at 464, the signal frame's xfeatures -- or the profile's supported XCR0)."""
    data = bytes(data) if not isinstance(data, bytes) else data
    _check_size(data)
    detected = None
    if fmt == "auto":
        fmt, detected = detect_format(data, profile)
    if fmt not in FORMATS:
        raise BlobError(f"unknown blob format {fmt!r} (known: auto, {', '.join(FORMATS)})")
    if xcr0 is not None and (xcr0 < 0 or xcr0 >> 64):
        raise BlobError(f"XCR0 {xcr0!r} is not a 64-bit value")
    if fmt == "sigframe-ia32":
        return _decode_ia32(data, profile, detected, xcr0)
    warn: list[str] = []
    frame, blob_xcr0, sw, magic2 = _frame(data, profile, fmt, xcr0, warn)
    covered = bytearray(len(data))
    for f in frame.specials:
        covered[f.offset:f.offset + f.size] = b"\1" * f.size
    xstate_bv = _u(data, "<Q", XSTATE_BV_OFFSET)
    xcomp_bv = _u(data, "<Q", XCOMP_BV_OFFSET)
    comps = []
    places = [Placement(0, 0, 160), Placement(1, 0, 256), *frame.places]
    for p in places:
        regs: dict[str, int] = {}
        for f in component_fields(p.number, 160 if p.number == 0 else p.size):
            at = p.offset + f.offset
            regs[f.name] = int.from_bytes(data[at:at + f.size], "little")
            covered[at:at + f.size] = b"\1" * f.size
        comps.append(ComponentState(p.number, _name(p.number), p.offset if p.number > 1 else
                                    (0 if p.number == 0 else 160), p.size,
                                    bool(xstate_bv >> p.number & 1),
                                    _init_values(p.number, regs), tuple(regs.items())))
    extra = uncovered_runs(data, covered)
    _header_warnings(data, profile, fmt, frame, xstate_bv, xcomp_bv, places, comps, warn)
    return Blob(fmt, profile.name, len(data), detected, xstate_bv, xcomp_bv,
                blob_xcr0 if sw is None else sw.xfeatures, sw, magic2,
                sum(1 << p.number for p in places), tuple(comps), extra, tuple(warn))


#: The x87 fields of an FXSAVE area that convert_to_fxsr() writes: (name, start, end).
_X87_FIELDS = [("FCW", 0, 2), ("FSW", 2, 4), ("FTW", 4, 6), ("FOP", 6, 8), ("FIP", 8, 16),
               ("FDP", 16, 24)] + [(f"ST{i}", 32 + 16 * i, 42 + 16 * i) for i in range(8)]


def header_overrides(data: bytes) -> list[str]:
    """The x87 fields of an ia32 frame's FXSAVE area (at 112) that its fsave header replaces
    on sigreturn (convert_to_fxsr() folds the header over the area): [] when they agree."""
    from fpstate.kernel.x86.regset import convert_to_fxsr

    h = FSAVE_HEADER_SIZE
    fx = data[h:h + 512]
    if len(fx) < 512:
        return []
    folded = bytearray(fx)
    convert_to_fxsr(folded, data[:108])
    return [n for n, a, b in _X87_FIELDS if folded[a:b] != fx[a:b]]


def _decode_ia32(data: bytes, profile: CpuidProfile, detected: str | None,
                 xcr0: int | None) -> Blob:
    """A ``sigframe-ia32`` blob: its fsave header, then its XSAVE area decoded as a
    ``sigframe`` (offsets moved by the header's 112 bytes), with what sys32 sigreturn does with
    the two: the header's x87 part overrides the area's (convert_to_fxsr)."""
    h = FSAVE_HEADER_SIZE
    if len(data) < h + XSAVE_EXTENDED_START:
        raise BlobError(f"blob is {len(data)} bytes; an ia32 frame's fpstate is the {h}-byte "
                        f"fsave header and at least a {XSAVE_EXTENDED_START}-byte XSAVE area")
    inner = decode(data[h:], profile, "sigframe", xcr0=xcr0)
    header = tuple((n, int.from_bytes(data[o:o + w], "little"))
                   for n, (o, w) in FSAVE_FIELDS.items())
    # The 64-bit rule for extended_size does not hold here (the header is counted): replaced.
    warn = [w for w in inner.warnings if not w.startswith("extended_size ")]
    sw = inner.sw_bytes
    if sw is not None and sw.extended_size != sw.xstate_size + 4 + h:
        warn.append(f"extended_size {sw.extended_size} is not xstate_size {sw.xstate_size} + "
                    f"4 + {h}: save_sw_bytes() counts the fsave header in an ia32 frame")
    changed = header_overrides(data)
    if changed:
        warn.append("sigreturn restores the fsave header's x87 state, not the XSAVE area's: "
                    f"{', '.join(changed)} differ (convert_to_fxsr; FOP comes from cssel >> 16)")
    comps = tuple(ComponentState(c.number, c.name, c.offset + h, c.size, c.in_xstate_bv,
                                 c.init_values, c.registers) for c in inner.components)
    return Blob("sigframe-ia32", inner.profile, len(data), detected, inner.xstate_bv,
                inner.xcomp_bv, inner.xcr0, sw, inner.magic2, inner.layout_mask, comps,
                tuple((off + h, raw) for off, raw in inner.extra), tuple(warn), header)


def uncovered_runs(data: bytes, covered: bytearray) -> tuple[tuple[int, bytes], ...]:
    """Maximal runs of non-zero bytes of ``data`` where ``covered`` is zero (no field or
    register covers them), as (offset, bytes)."""
    out = []
    i, n = 0, len(data)
    while i < n:
        if covered[i] or not data[i]:
            i += 1
            continue
        j = i
        while j < n and not covered[j] and data[j]:
            j += 1
        out.append((i, data[i:j]))
        i = j
    return tuple(out)


def _header_warnings(data: bytes, profile: CpuidProfile, fmt: str, frame: _Frame,
                     xstate_bv: int, xcomp_bv: int, places: list[Placement],
                     comps: list[ComponentState], warn: list[str]) -> None:
    compacted = fmt in COMPACTED_FORMATS
    if xstate_bv & ~frame.mask:
        bad = xstate_bv & ~frame.mask
        warn.append(f"XSTATE_BV {xstate_bv:#x} has {mask_names(bad)} ({bad:#x}) outside XCR0 "
                    f"{frame.mask:#x}: XRSTOR raises #GP (SDM 13.8.1)")
    laid = sum(1 << p.number for p in places)
    bad = xstate_bv & frame.mask & ~laid
    if bad:
        warn.append(f"XSTATE_BV has {mask_names(bad)} ({bad:#x}) but the area has no room for "
                    "them")
    reserved = data[XSAVE_HDR_OFFSET + 16:XSAVE_HDR_OFFSET + 64]
    if compacted:
        if xstate_bv & ~xcomp_bv:
            bad = xstate_bv & ~xcomp_bv
            warn.append(f"XSTATE_BV bits {bad:#x} are not in XCOMP_BV {xcomp_bv:#x}: XRSTOR "
                        "raises #GP (SDM 13.8.1)")
        sup = xcomp_bv & profile.xss_supported & ~XCOMP_BV_COMPACTED_FORMAT
        if fmt == "xsavec" and sup:
            warn.append(f"XCOMP_BV holds supervisor components {mask_names(sup)}: only XSAVES "
                        "writes them, and XRSTOR (not XRSTORS) raises #GP on them")
        if any(reserved):
            warn.append("XSAVE header bytes 16-63 are not zero: compacted XRSTOR raises #GP "
                        "(SDM 13.8.1)")
    else:
        if xcomp_bv:
            warn.append(f"XCOMP_BV {xcomp_bv:#x} is not 0 in a standard-format area: XRSTOR "
                        "raises #GP (header bytes 8-23 must be zero, SDM 13.8.1)"
                        + ("; bit 63 makes it the compacted form" if
                           xcomp_bv & XCOMP_BV_COMPACTED_FORMAT else ""))
        if any(reserved):
            warn.append("XSAVE header bytes 16-63 are not zero: the kernel refuses such a "
                        "header from userspace (validate_user_xstate_header: -EINVAL)")
    mxcsr = _u(data, "<I", MXCSR_OFFSET)
    mxcsr_mask = supported_mxcsr_mask(profile)
    if mxcsr & ~mxcsr_mask:
        warn.append(f"MXCSR {mxcsr:#x} sets reserved bits {mxcsr & ~mxcsr_mask:#x} (MXCSR_MASK "
                    f"{mxcsr_mask:#x}): XRSTOR raises #GP when it loads MXCSR (SDM 13.8.1)")
    stale = [c.name for c in comps if c.stale]
    if stale:
        warn.append(f"not in XSTATE_BV but holding non-initial bytes (ignored by XRSTOR): "
                    f"{', '.join(stale)}")


# -- encoding ------------------------------------------------------------------------------------


def encode(obj: Mapping[str, Any] | str, profile: CpuidProfile, fmt: str | None = None) -> bytes:
    """The bytes of a decoded blob (the `Blob.to_dict` object or its JSON text); see
    `fpstate.tools.blob_encode.encode_blob`."""
    from fpstate.tools.blob_encode import encode_blob

    return encode_blob(obj, profile, fmt)
