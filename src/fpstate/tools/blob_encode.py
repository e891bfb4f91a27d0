"""Encoding of decoded blobs: the `fpstate.tools.blob.Blob.to_dict` object back to bytes.

Rules: the header, software bytes and XCR0 word are written first, then the layout is computed
from them exactly as `fpstate.tools.blob.decode` computes it (the same `_frame`), then every
register by name at its place, then the extra runs. So for an object's own format decode ->
encode is byte-exact; for another format the registers are laid out afresh and the extra runs,
which belong to the old layout, are dropped. Bad input raises BlobError only.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

from fpstate.errors import BlobError, FpstateError
from fpstate.tools.blob import (
    COMPACTED_FORMATS,
    FORMATS,
    FP_XSTATE_MAGIC1,
    FP_XSTATE_MAGIC2,
    FP_XSTATE_MAGIC2_SIZE,
    FSAVE_FIELDS,
    FSAVE_HEADER_SIZE,
    JSON_FORMAT,
    KVM_XSAVE_SIZE,
    MAX_BLOB_SIZE,
    SW_BYTES_OFFSET,
    USER_XSTATE_XCR0_OFFSET,
    XSTATE_BV_OFFSET,
    Placement,
    _frame,
    _name,
)
from fpstate.tools.registers import component_fields
from fpstate.x86.cpuid import CpuidProfile
from fpstate.x86.layout import XSAVE_EXTENDED_START, compacted_size, standard_size
from fpstate.x86.xfeatures import XCOMP_BV_COMPACTED_FORMAT, XFEATURE_MASK_FPSSE


def _get(obj: Mapping[str, Any], key: str, what: str) -> Any:
    if not isinstance(obj, Mapping) or key not in obj:
        raise BlobError(f"{what}: field {key!r} is missing")
    return obj[key]


def _int(value: Any, what: str, width: int) -> int:
    if isinstance(value, bool):
        raise BlobError(f"{what}: {value!r} is not a number")
    if isinstance(value, int):
        v = value
    elif isinstance(value, str):
        try:
            v = int(value, 16) if value.lower().startswith("0x") else int(value, 0)
        except ValueError:
            raise BlobError(f"{what}: {value!r} is not a number") from None
    else:
        raise BlobError(f"{what}: {value!r} is not a number")
    if v < 0 or v >> (8 * width):
        raise BlobError(f"{what}: {value!r} does not fit in {width} bytes")
    return v


def encode_blob(obj: Mapping[str, Any] | str, profile: CpuidProfile,
                fmt: str | None = None) -> bytes:
    """The bytes of a decoded blob (the `Blob.to_dict` object or its JSON text).

    With ``fmt`` equal to the object's format (the default) the result is byte-exact: every
    field and every extra run is written back. With another format the registers are laid out
    afresh for it (by name, at the offsets of ``profile``) and extra runs, which belong to the
    old layout, are dropped; a component the new layout lacks must be in its initial state.
    """
    if isinstance(obj, (str, bytes)):
        try:
            obj = json.loads(obj)
        except (ValueError, UnicodeDecodeError) as e:
            raise BlobError(f"blob JSON does not parse: {e}") from None
    if not isinstance(obj, Mapping):
        raise BlobError("blob JSON is not an object")
    if obj.get("format") != JSON_FORMAT:
        raise BlobError(f"blob JSON: field 'format' is {obj.get('format')!r}, not "
                        f"{JSON_FORMAT!r}")
    src_fmt = _get(obj, "blob_format", "blob JSON")
    fmt = src_fmt if fmt is None else fmt
    if fmt not in FORMATS or src_fmt not in FORMATS:
        raise BlobError(f"unknown blob format {fmt if fmt not in FORMATS else src_fmt!r} "
                        f"(known: {', '.join(FORMATS)})")
    if fmt == "sigframe-ia32":
        return _encode_ia32(obj, profile, src_fmt == fmt)
    header = _get(obj, "header", "blob JSON")
    xstate_bv = _int(_get(header, "xstate_bv", "header"), "header xstate_bv", 8)
    xcomp_bv = _int(_get(header, "xcomp_bv", "header"), "header xcomp_bv", 8)
    comps = _get(obj, "components", "blob JSON")
    if not isinstance(comps, list):
        raise BlobError("blob JSON: 'components' is not a list")
    values: dict[int, dict[str, Any]] = {}
    for c in comps:
        num = _int(_get(c, "number", "component"), "component number", 1)
        if num > 63:
            raise BlobError(f"component number {num} is not in 0..63")
        regs = _get(c, "registers", f"component {num}")
        if not isinstance(regs, Mapping):
            raise BlobError(f"component {num}: 'registers' is not an object")
        values[num] = dict(regs)
    same = fmt == src_fmt
    if fmt in COMPACTED_FORMATS and not same:
        xcomp_bv = XCOMP_BV_COMPACTED_FORMAT | sum(1 << n for n in values)
    elif fmt not in COMPACTED_FORMATS and not same:
        xcomp_bv = 0
    sw = obj.get("sw_bytes") if same else None
    xcr0_field = obj.get("xcr0") if same else None
    std_mask = sum(1 << n for n in values if n < 64) & profile.xcr0_supported
    if fmt in ("uabi", "kvm") and xcr0_field is None:
        xcr0_field = f"{std_mask | XFEATURE_MASK_FPSSE:#x}"
    if fmt == "sigframe" and sw is None:
        mask = std_mask | XFEATURE_MASK_FPSSE
        size = standard_size(profile, mask)
        sw = {"magic1": FP_XSTATE_MAGIC1, "extended_size": size + 4, "xfeatures": mask,
              "xstate_size": size}
    if same and "size" in obj:
        size = _int(obj["size"], "size", 4)
    else:
        size = _target_size(profile, fmt, xcomp_bv, std_mask | XFEATURE_MASK_FPSSE)
    if not XSAVE_EXTENDED_START <= size <= MAX_BLOB_SIZE:
        raise BlobError(f"blob JSON: size {size} is not between {XSAVE_EXTENDED_START} and "
                        f"{MAX_BLOB_SIZE}")
    out = bytearray(size)
    struct.pack_into("<QQ", out, XSTATE_BV_OFFSET, xstate_bv, xcomp_bv)
    if xcr0_field is not None:
        struct.pack_into("<Q", out, USER_XSTATE_XCR0_OFFSET,
                         _int(xcr0_field, "xcr0", 8))
    if sw is not None:
        struct.pack_into("<IIQI", out, SW_BYTES_OFFSET,
                         _int(_get(sw, "magic1", "sw_bytes"), "magic1", 4),
                         _int(_get(sw, "extended_size", "sw_bytes"), "extended_size", 4),
                         _int(_get(sw, "xfeatures", "sw_bytes"), "xfeatures", 8),
                         _int(_get(sw, "xstate_size", "sw_bytes"), "xstate_size", 4))
    # Lay out the components exactly as decode() would for these header bytes.
    warn: list[str] = []
    frame = _frame(bytes(out), profile, fmt, None, warn)[0]
    if fmt == "sigframe" and same and obj.get("magic2") is not None:
        end = frame.area_end
        if end + 4 <= size:
            struct.pack_into("<I", out, end, _int(obj["magic2"], "magic2", 4))
    elif fmt == "sigframe" and frame.area_end + 4 <= size:
        struct.pack_into("<I", out, frame.area_end, FP_XSTATE_MAGIC2)
    places = {p.number: p for p in (Placement(0, 0, 160), Placement(1, 0, 256), *frame.places)}
    for num, regs in values.items():
        place = places.get(num)
        if place is None:
            if not all(_int(v, f"{_name(num)}.{k}", 1 << 16) == 0 for k, v in regs.items()
                       if not (num == 0 and k == "fcw")):
                raise BlobError(f"component {num} ({_name(num)}) holds state but the {fmt} "
                                f"layout on {profile.name} has no place for it")
            continue
        fields = {f.name: f for f in component_fields(num, 160 if num == 0 else place.size)}
        for name, value in regs.items():
            f = fields.get(name)
            if f is None:
                raise BlobError(f"component {num} ({_name(num)}) has no register {name!r}")
            at = place.offset + f.offset
            out[at:at + f.size] = _int(value, f"{_name(num)}.{name}", f.size).to_bytes(
                f.size, "little")
    if same:
        runs = obj.get("extra", [])
        if not isinstance(runs, list):
            raise BlobError("blob JSON: 'extra' is not a list")
        for run in runs:
            off = _int(_get(run, "offset", "extra run"), "extra offset", 4)
            try:
                raw = bytes.fromhex(_get(run, "hex", "extra run"))
            except (TypeError, ValueError):
                raise BlobError(f"extra run at {off}: 'hex' is not hex text") from None
            if off + len(raw) > size:
                raise BlobError(f"extra run at {off} ({len(raw)} bytes) is beyond the "
                                f"{size}-byte blob")
            out[off:off + len(raw)] = raw
    return bytes(out)


def _target_size(profile: CpuidProfile, fmt: str, xcomp_bv: int, user_mask: int) -> int:
    try:
        if fmt in COMPACTED_FORMATS:
            return compacted_size(profile, xcomp_bv & profile.xfeatures_supported)
        size = standard_size(profile, user_mask)
    except FpstateError as e:
        raise BlobError(f"cannot lay out a {fmt} area on {profile.name}: {e}") from None
    if fmt == "sigframe":
        return size + FP_XSTATE_MAGIC2_SIZE
    if fmt == "kvm":
        return max(size, KVM_XSAVE_SIZE)
    return size


def _encode_ia32(obj: Mapping[str, Any], profile: CpuidProfile, same: bool) -> bytes:
    """A ``sigframe-ia32`` blob: the fsave header, then the ``sigframe`` area. From its own
    format, both byte-exact (the header from ``fsave_header``, offsets moved back by 112); from
    another, the area laid out afresh with extended_size counting the header, and the header
    made from the area's x87 registers as save_fsave_header() makes it (convert_from_fxsr of
    a compat task: cssel __USER32_CS, datasel __USER_DS; status = FSW, magic 0)."""
    from fpstate.kernel.x86.regset import convert_from_fxsr

    h = FSAVE_HEADER_SIZE
    if not same:
        area = bytearray(encode_blob(obj, profile, "sigframe"))
        xstate_size = struct.unpack_from("<I", area, SW_BYTES_OFFSET + 16)[0]
        struct.pack_into("<I", area, SW_BYTES_OFFSET + 4, xstate_size + FP_XSTATE_MAGIC2_SIZE + h)
        header = convert_from_fxsr(bytes(area[:512])) + bytes(area[2:4]) + bytes(2)
        return header + bytes(area)
    fields = _get(obj, "fsave_header", "blob JSON")
    if not isinstance(fields, Mapping):
        raise BlobError("blob JSON: 'fsave_header' is not an object")
    header = bytearray(h)
    for name, (off, width) in FSAVE_FIELDS.items():
        value = _int(_get(fields, name, "fsave_header"), f"fsave_header.{name}", width)
        header[off:off + width] = value.to_bytes(width, "little")
    inner = dict(obj)
    inner["blob_format"] = "sigframe"
    if "size" in obj:
        size = _int(obj["size"], "size", 4)
        if size < h + XSAVE_EXTENDED_START:
            raise BlobError(f"blob JSON: size {size} leaves no {XSAVE_EXTENDED_START}-byte "
                            f"XSAVE area after the {h}-byte fsave header")
        inner["size"] = size - h
    runs = obj.get("extra", [])
    if not isinstance(runs, list):
        raise BlobError("blob JSON: 'extra' is not a list")
    moved = []
    for run in runs:
        off = _int(_get(run, "offset", "extra run"), "extra offset", 4)
        if off < h:
            raise BlobError(f"extra run at {off} lies in the fsave header (bytes 0-{h - 1}), "
                            "which 'fsave_header' describes")
        moved.append({**run, "offset": off - h})
    inner["extra"] = moved
    return bytes(header) + encode_blob(inner, profile, "sigframe")
