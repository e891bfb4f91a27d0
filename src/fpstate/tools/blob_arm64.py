"""arm64 FP state blobs for people: decode the ptrace regsets, core notes and signal frames,
and say whether the kernel would take one back.

Formats (`FORMATS`), byte-exact to v6.17's uapi headers (fpstate.arm64.regs,
fpstate.kernel.arm64.signal, fpstate.kernel.arm64.ptrace):

- ``fpsimd``: NT_PRFPREG, struct user_fpsimd_state (V0-V31, FPSR, FPCR, 528 bytes).
- ``sve`` / ``ssve``: NT_ARM_SVE / NT_ARM_SSVE, struct user_sve_header then the SVE payload
  (Z0-Z31, P0-P15, FFR at the header's VL, FPSR and FPCR at SVE_PT_SVE_FPSR_OFFSET) or the
  FPSIMD one; a header alone for the mode the thread is not in.
- ``za``: NT_ARM_ZA, struct user_za_header then ZA as SVL rows of SVL bytes (header alone:
  PSTATE.ZA off).
- ``zt``: NT_ARM_ZT, ZT0's 64 bytes. ``fpmr``: NT_ARM_FPMR, the u64 FPMR.
- ``tls``: NT_ARM_TLS, TPIDR_EL0 then TPIDR2_EL0 (SME's lazy-save block pointer; zero
  without SME), u64 each.
- ``sigframe``: struct rt_sigframe as setup_rt_frame() writes it: siginfo, ucontext, the
  sigcontext's fault_address, sp, pc and pstate, then every record of ``__reserved`` and of
  the extra space an extra_context points to (fpsimd, esr, sve, tpidr2, za, zt, fpmr, poe,
  gcs).
- ``core``: an arm64 ELF core: every thread's FP notes (the formats above).

`decode` reads what is there and warns about what the kernel would not have written;
`validate` runs the kernel's own rules (PTRACE_SETREGSET, rt_sigreturn) on a target thread
of a CPU profile.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from fpstate.arm64.regs import (
    SVE_PT_REGS_SVE,
    SVE_VQ_BYTES,
    USER_FPSIMD_STATE_SIZE,
    USER_SVE_HEADER_SIZE,
    ZT_SIG_REG_BYTES,
    sve_ffr_offset,
    sve_preg_offset,
    sve_preg_size,
    sve_pt_fpsr_offset,
    sve_pt_size,
    sve_regs_size,
    sve_vl_valid,
    sve_vq_from_vl,
    sve_zreg_offset,
    za_pt_size,
    za_regs_size,
)
from fpstate.errors import BlobError
from fpstate.kernel.arm64 import ptrace as pt
from fpstate.kernel.arm64 import signal as sig
from fpstate.kernel.arm64.state import FP_STATE_FPSIMD, FP_STATE_SVE, HostCaps
from fpstate.tools.blob import uncovered_runs
from fpstate.tools.corefile import is_core, thread_notes

#: Raw formats and the regset note each one is.
REGSET_FORMATS: dict[str, int] = {"fpsimd": pt.NT_PRFPREG, "sve": pt.NT_ARM_SVE,
                                  "ssve": pt.NT_ARM_SSVE, "za": pt.NT_ARM_ZA,
                                  "zt": pt.NT_ARM_ZT, "fpmr": pt.NT_ARM_FPMR,
                                  "tls": pt.NT_ARM_TLS}
FORMATS: tuple[str, ...] = (*REGSET_FORMATS, "sigframe", "core")
#: The format of each regset note.
NOTE_FORMATS: dict[int, str] = {v: k for k, v in REGSET_FORMATS.items()}

#: FPMR fields (Arm ARM, FEAT_FPMR): name, low bit, width.
FPMR_FIELDS: tuple[tuple[str, int, int], ...] = (
    ("F8S1", 0, 3), ("F8S2", 3, 3), ("F8D", 6, 3), ("OSM", 14, 1), ("OSC", 15, 1),
    ("LSCALE", 16, 7), ("NSCALE", 24, 8), ("LSCALE2", 32, 6))


@dataclass(frozen=True, slots=True)
class Section:
    """One part of a blob: a header, a record, a register group. ``fields`` are named header
    values; ``registers`` (name, value, width in bytes, offset in the blob) the registers it
    holds."""

    name: str
    offset: int
    size: int
    fields: tuple[tuple[str, int], ...] = ()
    registers: tuple[tuple[str, int, int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Arm64Blob:
    """A decoded arm64 blob: its format, size, sections and warnings."""

    fmt: str
    size: int
    sections: tuple[Section, ...]
    warnings: tuple[str, ...] = ()
    label: str = ""
    #: Runs of non-zero bytes no register covers (headers, record heads, padding, the general
    #: registers of a frame): with the registers, every byte of the blob, for `encode`.
    extra: tuple[tuple[int, bytes], ...] = ()

    def section(self, name: str) -> Section:
        for s in self.sections:
            if s.name == name:
                return s
        raise KeyError(name)

    def register(self, name: str) -> int:
        """The value of register ``name`` (Z3, P0, FFR, ZA[2], FPMR...); KeyError if absent."""
        for s in self.sections:
            for n, v, _, _ in s.registers:
                if n == name:
                    return v
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"arch": "arm64", "format": self.fmt, "size": self.size,
                "sections": [{"name": s.name, "offset": s.offset, "size": s.size,
                              "fields": dict(s.fields),
                              "registers": {n: f"0x{v:0{2 * w}x}" for n, v, w, _ in s.registers},
                              "offsets": {n: at for n, _, _, at in s.registers}}
                             for s in self.sections],
                "extra": [{"offset": off, "hex": raw.hex()} for off, raw in self.extra],
                "warnings": list(self.warnings)}


def _le(data: bytes, off: int, size: int) -> int:
    return int.from_bytes(data[off:off + size], "little")


#: A register in a section: (name, value, width in bytes, offset in the blob).
Reg = tuple[str, int, int, int]


def _reg(name: str, data: bytes, off: int, width: int) -> Reg:
    return (name, _le(data, off, width), width, off)


def _vector(name: str, data: bytes, off: int, width: int, count: int) -> list[Reg]:
    return [_reg(f"{name}{n}", data, off + n * width, width) for n in range(count)]


# --- regsets ---------------------------------------------------------------------------------
def _fpsimd_section(data: bytes, off: int, name: str = "user_fpsimd_state") -> Section:
    regs = _vector("V", data, off, 16, 32)
    regs += [_reg("FPSR", data, off + 512, 4), _reg("FPCR", data, off + 516, 4)]
    return Section(name, off, USER_FPSIMD_STATE_SIZE, registers=tuple(regs))


def _sve_block(data: bytes, off: int, vl: int, name: str) -> Section:
    """Z0-Z31, P0-P15 and FFR at ``vl`` starting at ``off`` (the __SVE_* layout)."""
    vq = sve_vq_from_vl(vl)
    regs = _vector("Z", data, off + sve_zreg_offset(vq, 0), vl, 32)
    regs += _vector("P", data, off + sve_preg_offset(vq, 0), sve_preg_size(vq), 16)
    regs.append(_reg("FFR", data, off + sve_ffr_offset(vq), sve_preg_size(vq)))
    return Section(name, off, sve_regs_size(vq), registers=tuple(regs))


def _za_rows(data: bytes, off: int, vl: int, name: str = "ZA") -> Section:
    return Section(name, off, vl * vl, registers=tuple(
        _reg(f"ZA[{n}]", data, off + n * vl, vl) for n in range(vl)))


def _need(data: bytes, size: int, what: str) -> None:
    if len(data) < size:
        raise BlobError(f"{what} needs {size} bytes, the blob has {len(data)}")


def _decode_regset(data: bytes, fmt: str) -> tuple[list[Section], list[str]]:
    warn: list[str] = []
    if fmt == "fpsimd":
        _need(data, USER_FPSIMD_STATE_SIZE, "struct user_fpsimd_state")
        if _le(data, 520, 8):
            warn.append("__reserved[2] of user_fpsimd_state is not zero")
        return [_fpsimd_section(data, 0)], warn
    if fmt == "zt":
        _need(data, ZT_SIG_REG_BYTES, "ZT0")
        return [Section("ZT0", 0, ZT_SIG_REG_BYTES,
                        registers=(_reg("ZT0", data, 0, ZT_SIG_REG_BYTES),))], warn
    if fmt == "fpmr":
        _need(data, 8, "FPMR")
        v = _le(data, 0, 8)
        fields = tuple((n, (v >> lo) & ((1 << w) - 1)) for n, lo, w in FPMR_FIELDS)
        known = sum(((1 << w) - 1) << lo for _, lo, w in FPMR_FIELDS)
        if v & ~known:
            warn.append(f"FPMR bits {v & ~known:#x} are RES0")
        return [Section("FPMR", 0, 8, fields, (("FPMR", v, 8, 0),))], warn
    if fmt == "tls":
        _need(data, 8, "TPIDR_EL0")
        regs = [_reg("TPIDR_EL0", data, 0, 8)]
        if len(data) < 16:
            warn.append("TPIDR_EL0 only: tls_get() writes 16 bytes, TPIDR2_EL0 second (zero "
                        "without SME)")
        else:
            regs.append(_reg("TPIDR2_EL0", data, 8, 8))
            if any(data[16:]):
                warn.append(f"{len(data) - 16} bytes after TPIDR2_EL0 are not zero (NT_ARM_TLS "
                            "is two registers)")
        return [Section("TLS", 0, min(len(data), 16), registers=tuple(regs))], warn
    _need(data, USER_SVE_HEADER_SIZE, "the user_sve_header/user_za_header")
    size, max_size, vl, max_vl, flags, reserved = struct.unpack_from("<IIHHHH", data)
    hdr = (("size", size), ("max_size", max_size), ("vl", vl), ("max_vl", max_vl),
           ("flags", flags))
    if reserved:
        warn.append(f"header __reserved is {reserved:#x}, the kernel writes 0")
    if not sve_vl_valid(vl):
        raise BlobError(f"header vl {vl} is not a vector length (a multiple of 16, 16 to 8192)")
    if max_vl and vl > max_vl:
        warn.append(f"vl {vl} exceeds max_vl {max_vl}")
    vq = sve_vq_from_vl(vl)
    out = [Section("header", 0, USER_SVE_HEADER_SIZE, hdr)]
    if fmt == "za":
        if flags & ~(pt.SVE_PT_VL_INHERIT | pt.SVE_PT_VL_ONEXEC):
            warn.append(f"flags {flags:#x} beyond ZA_PT_VL_INHERIT|ZA_PT_VL_ONEXEC")
        if size == USER_SVE_HEADER_SIZE:
            out.append(Section("ZA off (PSTATE.ZA clear: header only)", USER_SVE_HEADER_SIZE, 0))
        else:
            if size != za_pt_size(vq):
                warn.append(f"size {size} != ZA_PT_SIZE({vq}) {za_pt_size(vq)}")
            _need(data, USER_SVE_HEADER_SIZE + za_regs_size(vq), f"ZA at vl {vl}")
            out.append(_za_rows(data, USER_SVE_HEADER_SIZE, vl))
        _trailing(data, size, warn)
        return out, warn
    if flags & ~(pt.SVE_PT_REGS_MASK | pt.SVE_PT_VL_INHERIT | pt.SVE_PT_VL_ONEXEC):
        warn.append(f"flags {flags:#x} beyond SVE_PT_REGS_SVE|VL_INHERIT|VL_ONEXEC")
    mode = "streaming" if fmt == "sve" else "non-streaming"
    if size == pt.INACTIVE_HEADER_SIZE:
        # v6.16+: the inactive mode's header says size 8 (sizeof a pointer) and the FPSIMD
        # payload of the active mode's registers follows (sve_get_common()'s header-only
        # return compares with 16 and does not fire)
        if flags & SVE_PT_REGS_SVE:
            warn.append("an inactive mode's header (size 8) with SVE_PT_REGS_SVE: the kernel "
                        "sets FPSIMD format there")
        out.append(Section(f"inactive (the thread is in {mode} mode: size 8, then the "
                           "active mode's V registers)", USER_SVE_HEADER_SIZE, 0))
        if len(data) > USER_SVE_HEADER_SIZE:
            _need(data, USER_SVE_HEADER_SIZE + USER_FPSIMD_STATE_SIZE, "the FPSIMD payload")
            out.append(_fpsimd_section(data, USER_SVE_HEADER_SIZE))
        return out, warn
    if size == USER_SVE_HEADER_SIZE:
        out.append(Section(f"inactive (the thread is in {mode} mode: header only)",
                           USER_SVE_HEADER_SIZE, 0))
    elif flags & SVE_PT_REGS_SVE:
        if size != sve_pt_size(vq, SVE_PT_REGS_SVE):
            warn.append(f"size {size} != SVE_PT_SIZE({vq}, SVE_PT_REGS_SVE) "
                        f"{sve_pt_size(vq, SVE_PT_REGS_SVE)}")
        fpsr_at = sve_pt_fpsr_offset(vq)
        _need(data, fpsr_at + 8, f"the SVE payload at vl {vl}")
        out.append(_sve_block(data, USER_SVE_HEADER_SIZE, vl, "SVE registers"))
        out.append(Section("FPSR/FPCR", fpsr_at, 8, registers=(
            _reg("FPSR", data, fpsr_at, 4), _reg("FPCR", data, fpsr_at + 4, 4))))
    else:
        if fmt == "ssve":
            warn.append("NT_ARM_SSVE with register data in FPSIMD format: the kernel writes "
                        "it only for a thread not in streaming mode (v6.16+ with size 8), "
                        "and SETREGSET refuses it (EINVAL)")
        if size != sve_pt_size(vq, 0):
            warn.append(f"size {size} != SVE_PT_SIZE({vq}, SVE_PT_REGS_FPSIMD) "
                        f"{sve_pt_size(vq, 0)}")
        _need(data, USER_SVE_HEADER_SIZE + USER_FPSIMD_STATE_SIZE, "the FPSIMD payload")
        out.append(_fpsimd_section(data, USER_SVE_HEADER_SIZE))
    _trailing(data, size, warn)
    return out, warn


def _trailing(data: bytes, size: int, warn: list[str]) -> None:
    """Bytes past the header's 16-byte-aligned size (GETREGSET writes no more)."""
    end = (size + SVE_VQ_BYTES - 1) & ~(SVE_VQ_BYTES - 1)
    if len(data) > end and any(data[end:]):
        warn.append(f"{len(data) - end} bytes after the header's size {size} are not zero")


# --- signal frames ---------------------------------------------------------------------------
_RECORD_NAMES = {m: n for m, (n, _) in sig._KNOWN.items()}


def _decode_sigframe(data: bytes) -> tuple[list[Section], list[str]]:
    _need(data, sig.RT_SIGFRAME_SIZE, "struct rt_sigframe")
    warn: list[str] = []
    mc = sig.SIGINFO_SIZE + sig.UCONTEXT_MCONTEXT_OFFSET
    sc_fields = (("fault_address", _le(data, mc, 8)), ("sp", _le(data, mc + 8 + 31 * 8, 8)),
                 ("pc", _le(data, mc + 8 + 32 * 8, 8)), ("pstate", _le(data, mc + 8 + 33 * 8, 8)))
    out = [Section("sigcontext", mc, sig.RESERVED_OFFSET - mc, sc_fields)]
    start, offset, limit = sig.RESERVED_OFFSET, 0, sig.RESERVED_SIZE
    extra = False
    while True:
        at = start + offset
        if limit - offset < sig.CTX_HEADER_SIZE or at + sig.CTX_HEADER_SIZE > len(data):
            warn.append(f"no terminator: the records run out of space at {at:#x}")
            break
        magic, size = struct.unpack_from("<II", data, at)
        if magic == 0:
            out.append(Section("terminator", at, sig.CTX_HEADER_SIZE))
            if size:
                warn.append(f"terminator at {at:#x} has size {size}")
            break
        if size < sig.CTX_HEADER_SIZE or size > limit - offset or at + size > len(data):
            warn.append(f"record {magic:#010x} at {at:#x} has size {size}: stopped there")
            break
        if at % 16:
            warn.append(f"record at {at:#x} is not 16-byte aligned")
        if magic == sig.EXTRA_MAGIC and not extra:
            datap, esize = struct.unpack_from("<QI", data, at + 8)
            userp = at + size + sig.TERMINATOR_SIZE
            out.append(Section("extra_context", at, size, (
                ("datap", datap), ("size", esize), ("frame_address", datap - userp))))
            extra = True
            if _le(data, at + size, 8):
                warn.append("extra_context is not followed by a terminator")
            start, offset, limit = userp, 0, esize
            continue
        name = _RECORD_NAMES.get(magic)
        if name is None:
            warn.append(f"unknown record magic {magic:#010x} at {at:#x}: stopped there")
            break
        out.extend(_record(data, at, size, name, warn))
        offset += size
    return out, warn


def _record(data: bytes, at: int, size: int, name: str, warn: list[str]) -> list[Section]:
    """One record of __reserved (or of the extra space)."""
    title = f"{name}_context"
    if name == "fpsimd":
        if size != sig.FPSIMD_CONTEXT_SIZE:
            warn.append(f"fpsimd_context size {size} != {sig.FPSIMD_CONTEXT_SIZE}")
        regs = [_reg("FPSR", data, at + 8, 4), _reg("FPCR", data, at + 12, 4)]
        regs += _vector("V", data, at + 16, 16, 32)
        return [Section(title, at, size, registers=tuple(regs))]
    if name in ("esr", "tpidr2", "fpmr", "poe"):
        reg = {"esr": "ESR", "tpidr2": "TPIDR2_EL0", "fpmr": "FPMR", "poe": "POR_EL0"}[name]
        return [Section(title, at, size, registers=(_reg(reg, data, at + 8, 8),))]
    if name == "gcs":
        return [Section(title, at, size, (("features_enabled", _le(data, at + 16, 8)),),
                        (_reg("GCSPR_EL0", data, at + 8, 8),))]
    if name == "sve":
        vl, flags = struct.unpack_from("<HH", data, at + 8)
        sec = Section(title, at, size, (("vl", vl), ("flags", flags),
                                        ("streaming", flags & sig.SVE_SIG_FLAG_SM)))
        if size <= sig.SVE_CONTEXT_SIZE:
            return [sec]  # header only: the registers are in fpsimd_context
        if not sve_vl_valid(vl):
            warn.append(f"sve_context vl {vl} is not a vector length")
            return [sec]
        need = sig.sve_sig_context_size(sve_vq_from_vl(vl))
        if size < need:
            warn.append(f"sve_context size {size} < SVE_SIG_CONTEXT_SIZE {need}")
            return [sec]
        return [sec, _sve_block(data, at + 16, vl, "SVE registers")]
    if name == "za":
        vl = _le(data, at + 8, 2)
        sec = Section(title, at, size, (("vl", vl),))
        if size <= sig.ZA_CONTEXT_SIZE:
            return [sec]  # PSTATE.ZA clear
        if not sve_vl_valid(vl) or size < sig.za_sig_context_size(sve_vq_from_vl(vl)):
            warn.append(f"za_context size {size} does not hold ZA at vl {vl}")
            return [sec]
        return [sec, _za_rows(data, at + 16, vl)]
    nregs = _le(data, at + 8, 2)  # zt
    sec = Section(title, at, size, (("nregs", nregs),))
    if nregs != 1 or size < sig.zt_sig_context_size(1):
        warn.append(f"zt_context with nregs {nregs} and size {size} (the kernel writes 1 and "
                    f"{sig.zt_sig_context_size(1)})")
        return [sec]
    return [sec, Section("ZT0", at + 16, ZT_SIG_REG_BYTES,
                         registers=(_reg("ZT0", data, at + 16, ZT_SIG_REG_BYTES),))]


# --- entry points ----------------------------------------------------------------------------
def core_notes(data: bytes) -> list[tuple[str, str, bytes]]:
    """(label, format, bytes) of each FP note of an arm64 core, in file order; BlobError when
    it has none."""
    notes = thread_notes(data, set(NOTE_FORMATS), machine="EM_AARCH64")
    if not notes:
        raise BlobError("the core file has no arm64 FP note (NT_PRFPREG, NT_ARM_TLS, "
                        "NT_ARM_SVE, NT_ARM_SSVE, NT_ARM_ZA, NT_ARM_ZT, NT_ARM_FPMR)")
    return [(f"thread {n.tid} {pt.NOTE_NAMES[n.kind]}", NOTE_FORMATS[n.kind], n.data)
            for n in notes]


def decode(data: bytes, fmt: str) -> list[Arm64Blob]:
    """The blob(s) in ``data``: one for a regset or a signal frame, one per FP note for a core
    (``fmt`` "core", or "auto" on an ELF file). BlobError naming what cannot be read."""
    if fmt == "auto":
        if not is_core(data):
            raise BlobError("an arm64 blob that is not an ELF core needs --format (one of "
                            f"{', '.join(FORMATS)})")
        fmt = "core"
    if fmt == "core":
        return [replace(decode(note, f)[0], label=label) for label, f, note in core_notes(data)]
    if fmt == "sigframe":
        sections, warn = _decode_sigframe(data)
    elif fmt in REGSET_FORMATS:
        sections, warn = _decode_regset(data, fmt)
    else:
        raise BlobError(f"unknown arm64 format {fmt!r} (one of {', '.join(FORMATS)})")
    return [Arm64Blob(fmt, len(data), tuple(sections), tuple(warn), extra=_extra(data, sections))]


def _extra(data: bytes, sections: list[Section]) -> tuple[tuple[int, bytes], ...]:
    """Maximal runs of non-zero bytes outside every register."""
    covered = bytearray(len(data))
    for sec in sections:
        for _, _, width, off in sec.registers:
            covered[off:off + width] = b"\1" * len(covered[off:off + width])
    return uncovered_runs(data, covered)


#: The largest blob `encode` writes (a streaming frame at the largest SVL is under 100 KiB).
ENCODE_LIMIT = 1 << 20


def encode(obj: Mapping[str, Any]) -> bytes:
    """The bytes a ``decode --arch arm64 --json`` object describes: its ``extra`` runs, then
    each register's value at the place the decoded layout gives it. Fields are read from the
    bytes, not written: the result is decoded again and a field or register that does not come
    back as the object says is a BlobError naming it (change the header through ``extra``)."""
    if not isinstance(obj, Mapping) or obj.get("arch") != "arm64":
        raise BlobError("not an arm64 blob object (decode --arch arm64 --json)")
    fmt, size = obj.get("format"), obj.get("size")
    if fmt not in REGSET_FORMATS and fmt != "sigframe":
        raise BlobError(f"format {fmt!r} cannot be encoded (one of "
                        f"{', '.join((*REGSET_FORMATS, 'sigframe'))}; a core is one object per "
                        "note)")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= ENCODE_LIMIT:
        raise BlobError(f"size {size!r} is not a byte count from 0 to {ENCODE_LIMIT}")
    buf = bytearray(size)
    extra = obj.get("extra", [])
    if not isinstance(extra, list):
        raise BlobError("extra must be a list of {offset, hex}")
    for e in extra:
        try:
            off, raw = int(e["offset"]), bytes.fromhex(e["hex"])
        except (TypeError, KeyError, ValueError):
            raise BlobError(f"extra entry {e!r} is not {{offset, hex}}") from None
        if off < 0 or off + len(raw) > size:
            raise BlobError(f"extra bytes at {off:#x}+{len(raw)} are outside the {size}-byte "
                            "blob")
        buf[off:off + len(raw)] = raw
    want = _json_sections(obj)
    layout = decode(bytes(buf), fmt)[0]
    for sec in layout.sections:
        for name, _, width, off in sec.registers:
            value = want.get(sec.name, {}).get("registers", {}).get(name)
            if value is None:
                continue
            if value >> (8 * width):
                raise BlobError(f"{sec.name}: {name} = {value:#x} does not fit its {width} "
                                "bytes")
            buf[off:off + width] = value.to_bytes(width, "little")
    data = bytes(buf)
    _compare(decode(data, fmt)[0], want)
    return data


def _json_sections(obj: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{section name: {"fields": {..}, "registers": {name: int}}} of a blob object."""
    out: dict[str, dict[str, Any]] = {}
    sections = obj.get("sections", [])
    if not isinstance(sections, list):
        raise BlobError("sections must be a list")
    for sec in sections:
        if not isinstance(sec, Mapping) or not isinstance(sec.get("name"), str):
            raise BlobError(f"section {sec!r} has no name")
        regs = {}
        for name, text in (sec.get("registers") or {}).items():
            try:
                regs[name] = int(text, 16) if isinstance(text, str) else int(text)
            except (TypeError, ValueError):
                raise BlobError(f"{sec['name']}: {name} = {text!r} is not a number") from None
            if regs[name] < 0:
                raise BlobError(f"{sec['name']}: {name} = {text!r} is negative")
        fields = sec.get("fields") or {}
        if not isinstance(fields, Mapping):
            raise BlobError(f"{sec['name']}: fields must be a mapping")
        out.setdefault(sec["name"], {"fields": {}, "registers": {}})
        out[sec["name"]]["fields"].update(fields)
        out[sec["name"]]["registers"].update(regs)
    return out


def _compare(got: Arm64Blob, want: dict[str, dict[str, Any]]) -> None:
    """BlobError for the first section, field or register of ``want`` that the bytes do not
    give back."""
    have = {}
    for sec in got.sections:
        have.setdefault(sec.name, {"fields": {}, "registers": {}})
        have[sec.name]["fields"].update(dict(sec.fields))
        have[sec.name]["registers"].update({n: v for n, v, _, _ in sec.registers})
    for name, w in want.items():
        h = have.get(name)
        if h is None:
            raise BlobError(f"section {name!r} is not in the blob the bytes make (sections: "
                            f"{', '.join(have)})")
        for kind in ("fields", "registers"):
            for k, v in w[kind].items():
                if k not in h[kind]:
                    raise BlobError(f"{name}: no {kind[:-1]} {k!r} in the blob the bytes make")
                if h[kind][k] != v:
                    raise BlobError(f"{name}: {kind[:-1]} {k} is {v!r} in the JSON but "
                                    f"{h[kind][k]:#x} in the bytes (fields are read from the "
                                    "bytes: change them through extra)")


def render(blob: Arm64Blob, label: str, show_all: bool = False) -> str:
    """The text view of a decoded blob (zero registers hidden unless ``show_all``)."""
    lines = [f"{blob.label or label}: arm64 {blob.fmt}, {blob.size} bytes"]
    for s in blob.sections:
        head = f"{s.name} at {s.offset:#x}, {s.size} bytes"
        if s.fields:
            head += ": " + ", ".join(f"{n} {v:#x}" for n, v in s.fields)
        lines.append(head)
        hidden = 0
        for n, v, w, _ in s.registers:
            if v or show_all:
                lines.append(f"    {n:<8} 0x{v:0{2 * w}x}")
            else:
                hidden += 1
        if hidden:
            lines.append(f"    ({'all' if hidden == len(s.registers) else hidden} "
                         f"registers {'are ' if hidden < len(s.registers) else ''}zero)")
    lines.extend(f"warning: {w}" for w in blob.warnings)
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class Arm64Verdict:
    """What the kernel makes of a blob on one path: 0 or -errno, the rule, and the thread's
    FP configuration afterwards."""

    path: str
    ret: int
    reason: str
    after: Mapping[str, Any] = field(default_factory=dict)
    #: The thread afterwards (ptrace), for the next regset written to it.
    target: pt.RegsetTarget | None = None

    @property
    def accepted(self) -> bool:
        return self.ret == 0

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "accepted": self.accepted, "ret": self.ret,
                "reason": self.reason, "after": dict(self.after)}


def target_for(caps: HostCaps, sve_vl: int | None = None, sme_vl: int | None = None,
               streaming: bool = False, za: bool = False, sve_format: bool = False,
               ) -> pt.RegsetTarget:
    """The receiving thread: a fresh one of the CPU (default VLs), with the VLs, streaming
    mode, PSTATE.ZA and SVE-format state asked for (BlobError when the CPU cannot)."""
    t = pt.RegsetTarget.fresh(caps)
    for kind, vl, info in (("SVE", sve_vl, caps.sve_vl), ("SME", sme_vl, caps.sme_vl)):
        if vl is None:
            continue
        if info is None:
            raise BlobError(f"the CPU has no {kind}: no {kind} vector length to set")
        if vl != info.find_supported_vector_length(vl):
            raise BlobError(f"{kind} vl {vl} is not one the CPU implements (VLs "
                            f"{', '.join(str(q * 16) for q in sorted(info.vqs))})")
        t = replace(t, **{"sve_vl" if kind == "SVE" else "sme_vl": vl})
    if (streaming or za) and not caps.sme:
        raise BlobError("the CPU has no SME: no streaming mode or ZA")
    if sve_format and not (caps.sve or streaming):
        raise BlobError("the CPU has no SVE: no SVE-format state outside streaming mode")
    sve = sve_format or streaming  # streaming mode state is always in SVE format
    vl = t.sme_vl if streaming else t.sve_vl
    return replace(t, sm=streaming, za_on=za, fp_type=FP_STATE_SVE if sve else FP_STATE_FPSIMD,
                   sve=bytes(sve_regs_size(sve_vq_from_vl(vl))) if sve else b"",
                   za=bytes(za_regs_size(sve_vq_from_vl(t.sme_vl))) if za else b"")


def _summary(t: pt.RegsetTarget) -> dict[str, Any]:
    return {"fp_type": t.fp_type, "sve_vl": t.sve_vl, "sme_vl": t.sme_vl,
            "svcr.sm": t.sm, "svcr.za": t.za_on, "sve_vl_onexec": t.sve_vl_onexec,
            "sme_vl_onexec": t.sme_vl_onexec}


def validate(data: bytes, fmt: str, path: str, caps: HostCaps,
             target: pt.RegsetTarget) -> Arm64Verdict:
    """``path`` "ptrace": PTRACE_SETREGSET of the regset ``fmt`` is (kernel/arm64/ptrace.py);
    "sigreturn": rt_sigreturn of a ``sigframe`` (restore_sigframe(), FP part)."""
    if path == "ptrace":
        if fmt not in REGSET_FORMATS:
            raise BlobError(f"--as ptrace takes a regset format ({', '.join(REGSET_FORMATS)}), "
                            f"not {fmt!r}")
        r = pt.regset_set(caps, target, REGSET_FORMATS[fmt], data)
        after = _summary(r.target)
        if fmt == "tls":
            after = {"tpidr_el0": f"{r.target.tpidr:#x}", "tpidr2_el0": f"{r.target.tpidr2:#x}"}
        return Arm64Verdict(f"PTRACE_SETREGSET {pt.NOTE_NAMES[REGSET_FORMATS[fmt]]}", r.ret,
                            r.reason, after, r.target)
    if path == "sigreturn":
        if fmt != "sigframe":
            raise BlobError(f"--as sigreturn takes --format sigframe, not {fmt!r}")
        task = sig.SigTask(target.fp_type, target.sm, target.za_on, target.sve_vl,
                           target.sme_vl)
        r = sig.restore_sigframe_fp(data, caps, task)
        after = {"fp_type": r.task.fp_type, "svcr.sm": r.task.sm, "svcr.za": r.task.za,
                 "fpsr": r.task.fpsr, "fpcr": r.task.fpcr, "fpmr": r.task.fpmr,
                 "tpidr2_el0": f"{r.task.tpidr2:#x}"}
        return Arm64Verdict("rt_sigreturn", r.ret, r.reason, after)
    raise BlobError(f"unknown path {path!r} for arm64 (ptrace, sigreturn)")


__all__ = ["FORMATS", "FPMR_FIELDS", "NOTE_FORMATS", "REGSET_FORMATS", "Arm64Blob",
           "Arm64Verdict", "Section", "core_notes", "decode", "encode", "is_core", "render",
           "target_for", "validate"]
