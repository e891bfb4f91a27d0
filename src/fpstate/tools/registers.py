"""Register names of every XSAVE state component: where each register lives in its save area.

One table, :func:`component_fields`, maps a component (its number and the size CPUID reports)
to its registers as ``(name, offset, size)`` relative to the component's own save area. The
decoder, the encoder, the state records and the compatibility report all walk it; nothing
else knows a register's offset.

Sources, per component (Intel SDM Vol. 1 section 13.5 unless said otherwise):

- x87 (13.5.1, table 13-1, 64-bit format as XSAVE64/FXSAVE64 write it): FCW 0-1, FSW 2-3,
  abridged FTW 4, FOP 6-7, FIP 8-15, FDP 16-23, ST0-ST7 (MM0-MM7) in 10 of every 16 bytes
  from 32. Byte 5 and the 6 high bytes of each ST slot are reserved;
- SSE (13.5.2): MXCSR 24-27, MXCSR_MASK 28-31, XMM0-XMM15 from 160. x87 and SSE share the
  512-byte legacy region, so their offsets are offsets of the area, not of a component;
- AVX (13.5.3): the upper halves of YMM0-YMM15 (YMMH, ``struct ymmh_struct``);
- MPX (13.5.4): BND0-BND3 as (lower bound, upper bound) pairs; BNDCFGU and BNDSTATUS;
- AVX-512 (13.5.5): opmask k0-k7; ZMM_Hi256 = bits 511:256 of ZMM0-15 (``zmm_h``);
  Hi16_ZMM = ZMM16-ZMM31;
- PT (13.5.6): the IA32_RTIT_* MSRs in the order the SDM lists them;
- PKRU (13.5.7, ``struct pkru_state``): PKRU in the first 4 bytes;
- PASID (13.5.8): IA32_PASID;
- CET (13.5.9, ``struct cet_user_state``/``cet_supervisor_state`` in asm/fpu/types.h):
  IA32_U_CET, IA32_PL3_SSP; IA32_PL0_SSP..IA32_PL2_SSP;
- arch LBR (13.5.10, ``struct arch_lbr_state``): IA32_LBR_CTL, IA32_LBR_DEPTH, IA32_LER_FROM_IP,
  IA32_LER_TO_IP, IA32_LER_INFO, then (FROM_IP, TO_IP, INFO) per LBR entry;
- AMX (13.5.11, ``struct xtile_cfg``): TILECFG = palette 0, start_row 1, colsb[16] (u16) at
  16, rows[16] (u8) at 48; TILEDATA = TMM0.. (1024 bytes = 16 rows of 64 bytes each, the
  number of tiles is the size CPUID reports / 1024); each row is one field ``tmmN_rR``;
- APX (APX architecture specification, ``struct apx_state``): R16-R31;
- anything else (HDC, UINTR, HWP, LWP, unknown bits): 16-byte raw chunks ``raw_XXX``.

Bytes of an area that no field names (reserved bytes, padding, gaps between components) are
not registers; the decoder keeps them as "extra" runs so that encoding is byte-exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

#: Legacy-region offsets (SDM 13.5.1, 13.5.2).
MXCSR_OFFSET = 24
MXCSR_MASK_OFFSET = 28
XMM_OFFSET = 160
ST_OFFSET = 32
#: struct xtile_cfg and one TILEDATA tile (SDM 13.5.11; asm/fpu/types.h).
TILE_BYTES = 1024
TILE_ROW_BYTES = 64


@dataclass(frozen=True, slots=True)
class Field:
    """One register (or a named part of one) in a save area: ``size`` bytes at ``offset``,
    relative to the component's area (x87 and SSE: relative to the XSAVE area)."""

    name: str
    offset: int
    size: int


def _seq(prefix: str, start: int, count: int, size: int, stride: int | None = None,
         first: int = 0) -> list[Field]:
    step = size if stride is None else stride
    return [Field(f"{prefix}{first + n}", start + n * step, size) for n in range(count)]


def _raw(size: int) -> list[Field]:
    return [Field(f"raw_{off:03x}", off, min(16, size - off)) for off in range(0, size, 16)]


_X87 = (
    Field("fcw", 0, 2), Field("fsw", 2, 2), Field("ftw", 4, 1), Field("fop", 6, 2),
    Field("fip", 8, 8), Field("fdp", 16, 8), *_seq("st", ST_OFFSET, 8, 10, 16),
)
_SSE = (Field("mxcsr", MXCSR_OFFSET, 4), Field("mxcsr_mask", MXCSR_MASK_OFFSET, 4),
        *_seq("xmm", XMM_OFFSET, 16, 16))
_PT_MSRS = ("rtit_ctl", "rtit_output_base", "rtit_output_mask_ptrs", "rtit_status",
            "rtit_cr3_match", "rtit_addr0_a", "rtit_addr0_b", "rtit_addr1_a", "rtit_addr1_b")
_LBR_HEAD = ("lbr_ctl", "lbr_depth", "ler_from_ip", "ler_to_ip", "ler_info")


def _fit(fields: list[Field], size: int) -> tuple[Field, ...]:
    """The fields that fit in ``size`` bytes (a CPU may report a component smaller than the
    architectural struct; the kernel then refuses it, but the bytes still decode)."""
    return tuple(f for f in fields if f.offset + f.size <= size)


@cache
def component_fields(number: int, size: int) -> tuple[Field, ...]:
    """The registers of component ``number`` whose save area is ``size`` bytes (CPUID.(EAX=0DH,
    ECX=number):EAX; 160 and 256 for x87 and SSE), offsets relative to the area."""
    if number == 0:
        return tuple(_X87)
    if number == 1:
        return tuple(_SSE)
    table: dict[int, list[Field]] = {
        2: _seq("ymmh", 0, 16, 16),
        3: [f for n in range(4) for f in (Field(f"bnd{n}_lb", 16 * n, 8),
                                          Field(f"bnd{n}_ub", 16 * n + 8, 8))],
        4: [Field("bndcfgu", 0, 8), Field("bndstatus", 8, 8)],
        5: _seq("k", 0, 8, 8),
        6: _seq("zmm_h", 0, 16, 32),
        7: _seq("zmm", 0, 16, 64, first=16),
        8: [Field(name, 8 * n, 8) for n, name in enumerate(_PT_MSRS)],
        9: [Field("pkru", 0, 4)],
        10: [Field("pasid", 0, 8)],
        11: [Field("u_cet", 0, 8), Field("pl3_ssp", 8, 8)],
        12: [Field("pl0_ssp", 0, 8), Field("pl1_ssp", 8, 8), Field("pl2_ssp", 16, 8)],
        15: [Field(name, 8 * n, 8) for n, name in enumerate(_LBR_HEAD)] + [
            Field(f"lbr{e}_{part}", 40 + 24 * e + 8 * k, 8)
            for e in range(max(0, (size - 40) // 24))
            for k, part in enumerate(("from_ip", "to_ip", "info"))],
        17: [Field("palette", 0, 1), Field("start_row", 1, 1), *_seq("colsb", 16, 16, 2),
             *_seq("rows", 48, 16, 1)],
        18: [Field(f"tmm{t}_r{r}", t * TILE_BYTES + r * TILE_ROW_BYTES, TILE_ROW_BYTES)
             for t in range(size // TILE_BYTES) for r in range(TILE_BYTES // TILE_ROW_BYTES)],
        19: _seq("r", 0, 16, 8, first=16),
    }
    return _fit(table.get(number, _raw(size)), size)


#: Components with named registers (the others decode as raw chunks).
_NAMED = frozenset({0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 15, 17, 18, 19})


def register_groups(number: int, size: int) -> list[str]:
    """Short names of the registers of a component for reports ("zmm16-zmm31", "k0-k7"):
    consecutive numbered fields are collapsed into a range."""
    names = [f.name for f in component_fields(number, size)]
    if number == 18:
        return [f"tmm0-tmm{size // TILE_BYTES - 1}"] if size >= TILE_BYTES else []
    if number == 3:
        return ["bnd0-bnd3"]
    if number not in _NAMED:
        return [f"{size} bytes"]
    if number == 15:
        depth = max(0, (size - 40) // 24)
        return ["lbr_ctl", "lbr_depth", "ler_*", f"{depth} LBR entries"]
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if len(run) > 2:
            out.append(f"{run[0]}-{run[-1]}")
        else:
            out.extend(run)
        run.clear()

    prev: tuple[str, int] | None = None
    for name in names:
        stem = name.rstrip("0123456789")
        digits = name[len(stem):]
        cur = (stem, int(digits)) if digits else None
        if cur and prev and cur[0] == prev[0] and cur[1] == prev[1] + 1:
            run.append(name)
        else:
            flush()
            run.append(name)
        prev = cur
    flush()
    return out


#: FSW's flags (SDM Vol. 1 8.1.3, Figure 8-4), low bit first; TOP is bits 13:11.
_FSW_FLAGS = ("IE", "DE", "ZE", "OE", "UE", "PE", "SF", "ES", "C0", "C1", "C2", "", "", "",
              "C3", "B")


def x87_note(name: str, value: int, fsw: int) -> str:
    """What an x87 field of a legacy area says, for people: FSW's TOP and flags, which
    ST(i) the abridged tag byte calls non-empty (its bit j is physical register j, ST(i)
    is register TOP + i), and the instruction FOP names (the low 3 bits of its first opcode
    byte, D8-DF, and its second byte, SDM Vol. 1 8.1.9; decoded by iced-x86)."""
    if name == "fsw":
        flags = [f for i, f in enumerate(_FSW_FLAGS) if f and value >> i & 1]
        return " ".join([f"TOP {value >> 11 & 7}", *flags])
    if name == "ftw":
        top = fsw >> 11 & 7
        used = sorted((j - top) % 8 for j in range(8) if value >> j & 1)
        return "non-empty: " + ", ".join(f"ST({i})" for i in used)
    if name == "fop":
        from iced_x86 import Decoder

        code = bytes((0xD8 | value >> 8 & 7, value & 0xFF)) + bytes(8)
        op = next(iter(Decoder(64, code))).op_code()
        if op.instruction_string == "<invalid>":
            return "no x87 instruction"
        return f"{op.instruction_string}, {op.op_code_string}"
    return ""
