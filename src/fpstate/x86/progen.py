"""Random instruction programs for the differential tests and ``fpstate conform``.

One generator, two drivers: `generate_program` draws every choice through a `Draw`, which is
either `RandomDraw` (a seeded ``random.Random``: ``fpstate conform``) or the hypothesis
adapter in ``tests/x86/strategies.py`` (so hypothesis shrinks a failing program choice by
choice). The programs cover every user component of XCR0 and every user-mode XSAVE variant:

- start images: standard format, random XSTATE_BV within XCR0, random register contents
  (zeros, patterns, random bytes; x87 with any FSW, tags, TOP and pointers);
- buffers: zeros, valid standard or compacted images, and images with one thing wrong (an
  XSTATE_BV bit outside XCR0, a non-zero XCOMP_BV or reserved header byte, XSTATE_BV outside
  XCOMP_BV, a reserved MXCSR bit), 64-byte aligned or not;
- instructions: the XSAVE family with random request masks (subsets of XCR0, stray high
  bits, all ones), buffer reuse (XRSTOR then XSAVEOPT of the same area: the modified
  optimisation), register loads, VZEROUPPER/VZEROALL, x87, MXCSR, XGETBV, and, at a low
  rate, instructions this CPU or CPL 3 refuses (#UD, #GP).

Two rules keep programs answerable:

- (`fpstate.x86.cpu.UnknownPointers`) in a program with an FLD (or FLD1, FLDZ: `PUSHES`)
  every x87 control word that can
  be loaded (start image, buffers, FLDCW) masks all six exceptions, so no save can ever show
  the FIP/FDP (code and data addresses) of an FLD where saves write them only with FSW.ES set
  (AMD); where they always do (Intel), an FNINIT follows every FLD -- unless the program is
  ``placed``: its driver gives the model where each instruction ran (the host runner's
  `fpstate.x86.program.Outcome.placement`), which makes the FLD's FIP known;
- every PKRU value that can be loaded (start image, buffers, WRPKRU) leaves protection key 0
  readable and writable (AD0 = WD0 = 0, bits 1:0, as the kernel's init_pkru_value does):
  every page a program touches -- the runner's own slots and stack, and its buffers unless
  they have a key -- has key 0, and the model checks only the keys of buffers, so a
  protection-key #PF (SDM Vol. 3A 4.6.2, error code bit 5) on the runner's own memory is
  outside what it can answer. Keys 1-15 take any rights; on a CPU with PKU a buffer has one
  of keys 1-3 at times (`fpstate.x86.program`: the program's PKRU then decides whether the
  XSAVE family may read and write it).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence
from typing import Protocol, TypeVar

from fpstate.x86.cpu import PKRU, XTILECFG, Machine, machine
from fpstate.x86.cpuid import CpuidProfile
from fpstate.x86.impl import MXCSR_MASK, X87_POINTERS, ImplDefined, for_profile
from fpstate.x86.insn import compacted_offsets, default_xcr0
from fpstate.x86.layout import standard_size
from fpstate.x86.program import BUFFER_SIZE, MAX_PKEY, Buffer, Insn, Program
from fpstate.x86.xfeatures import XCOMP_BV_COMPACTED_FORMAT, bits

T = TypeVar("T")


class Draw(Protocol):
    """The source of every random choice."""

    def integer(self, lo: int, hi: int) -> int: ...

    def choice(self, options: Sequence[T]) -> T: ...

    def raw(self, n: int) -> bytes: ...


class RandomDraw:
    """`Draw` from a seeded ``random.Random``."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, options: Sequence[T]) -> T:
        return options[self.rng.randrange(len(options))]

    def raw(self, n: int) -> bytes:
        return self.rng.randbytes(n)


def _chance(d: Draw, percent: int) -> bool:
    return d.integer(0, 99) < percent


def _value_bytes(d: Draw, n: int) -> bytes:
    kind = d.choice(("zero", "zero", "random", "random", "pattern", "sparse"))
    if kind == "zero":
        return bytes(n)
    if kind == "random":
        return d.raw(n)
    if kind == "pattern":
        return bytes([d.integer(0, 255)]) * n
    out = bytearray(n)
    out[d.integer(0, n - 1)] = d.integer(1, 255)
    return bytes(out)


def _submask(d: Draw, mask: int) -> int:
    kind = d.choice(("all", "random", "random", "none", "one"))
    if kind == "all":
        return mask
    if kind == "none":
        return 0
    if kind == "one":
        b = bits(mask)
        return 1 << d.choice(b) if b else 0
    return sum(1 << i for i in bits(mask) if _chance(d, 50))


def _x87(d: Draw, img: bytearray, masked: bool) -> None:
    fcw = d.choice((0x037F, 0x027F, 0x0F7F, 0x037E, 0x0372, d.integer(0, 0xFFFF)))
    if masked:
        fcw |= 0x3F
    fsw = d.choice((0, 0, d.integer(0, 0xFFFF), d.integer(0, 7) << 11, 0x0001, 0x4700))
    ftw = d.choice((0, 0, 0xFF, 0x80, d.integer(0, 255)))
    fop, fip, fdp = d.integer(0, 0xFFFF), d.choice((0, d.integer(0, 2**64 - 1))), \
        d.choice((0, d.integer(0, 2**64 - 1)))
    struct.pack_into("<HHBBHQQ", img, 0, fcw, fsw, ftw, d.integer(0, 255), fop, fip, fdp)
    for j in range(8):
        img[32 + 16 * j:48 + 16 * j] = _value_bytes(d, 16)


def _mxcsr(d: Draw, m: Machine, mask: int, valid: bool = True) -> int:
    if valid:
        return d.choice((0x1F80, 0x1F80, 0x1F00, 0x9FC0, d.integer(0, 0xFFFFFFFF) & mask))
    return d.choice((0x10000, 0x80000000, d.integer(0, 0xFFFFFFFF) | ~mask & 0xFFFFFFFF))


#: PKRU's access-disable and write-disable bits of protection key 0 (see the module
#: docstring: programs never take key 0's rights away).
PKRU_KEY0 = 0b11


def _component(d: Draw, m: Machine, i: int, size: int) -> bytes:
    """The bytes of component ``i`` in an image; TILECFG as LDTILECFG's operand (`_tilecfg`);
    PKRU with key 0's rights left (`PKRU_KEY0`)."""
    if i == XTILECFG:
        return _tilecfg(d, m)
    v = _value_bytes(d, size)
    return bytes([v[0] & ~PKRU_KEY0]) + v[1:] if i == PKRU else v


def standard_image(d: Draw, m: Machine, xcr0: int, mxcsr_mask: int, masked: bool) -> bytes:
    """A valid standard-format XSAVE image of XCR0 with random XSTATE_BV and contents."""
    img = bytearray(standard_size(m.profile, xcr0))
    _x87(d, img, masked)
    struct.pack_into("<II", img, 24, _mxcsr(d, m, mxcsr_mask), d.integer(0, 0xFFFFFFFF))
    img[160:416] = _value_bytes(d, 256)
    for i in bits(xcr0 & ~3):
        c = m.components[i]
        img[c.offset:c.offset + c.size] = _component(d, m, i, c.size)
    struct.pack_into("<Q", img, 512, _submask(d, xcr0))
    return bytes(img)


def compacted_image(d: Draw, m: Machine, xcr0: int, mxcsr_mask: int, masked: bool) -> bytes:
    """A valid compacted image: XCOMP_BV a random subset of XCR0 with bit 63, XSTATE_BV a
    subset of it."""
    xcomp = _submask(d, xcr0) | XCOMP_BV_COMPACTED_FORMAT
    img = bytearray(BUFFER_SIZE - 64)
    _x87(d, img, masked)
    struct.pack_into("<II", img, 24, _mxcsr(d, m, mxcsr_mask), 0)
    img[160:416] = _value_bytes(d, 256)
    end = 576
    for i, off in compacted_offsets(m, xcomp):
        size = m.components[i].size
        img[off:off + size] = _component(d, m, i, size)
        end = off + size
    struct.pack_into("<QQ", img, 512, _submask(d, xcomp & ~XCOMP_BV_COMPACTED_FORMAT), xcomp)
    return bytes(img[:end])


def _broken(d: Draw, img: bytes, xcr0: int, mxcsr_mask: int) -> bytes:
    """One thing wrong in a valid image."""
    b = bytearray(img)
    what = d.choice(("xstate_bv", "xcomp_bv", "reserved", "mxcsr", "bit63", "xcomp_extra"))
    if what == "xstate_bv":
        b[512 + d.integer(0, 7)] |= 1 << d.integer(0, 7)
    elif what == "xcomp_bv":
        b[520 + d.integer(0, 7)] |= 1 << d.integer(0, 7)
    elif what == "reserved":
        b[528 + d.integer(0, 47)] = d.integer(1, 255)
    elif what == "mxcsr":
        struct.pack_into("<I", b, 24, d.integer(0, 0xFFFFFFFF) | ~mxcsr_mask & 0xFFFFFFFF)
    elif what == "bit63":
        b[519] |= 0x80
    else:
        struct.pack_into("<Q", b, 520, struct.unpack_from("<Q", b, 520)[0]
                         | 1 << d.choice((3, 4, 8, 9, 11, 17, 18, 19, 40)))
    return bytes(b)


def _buffer(d: Draw, m: Machine, xcr0: int, mxcsr_mask: int, masked: bool,
            pkeys: bool) -> Buffer:
    kind = d.choice(("zero", "standard", "standard", "compacted", "compacted", "broken",
                     "random"))
    if kind == "zero":
        data = b""
    elif kind == "random":
        data = bytearray(d.raw(d.integer(1, 4096)))
        if masked:
            data[0] |= 0x3F
        at = m.components[PKRU].offset if PKRU in m.components else len(data)
        if at < len(data):  # an XRSTOR of it may load PKRU: key 0's rights stay
            data[at] &= ~PKRU_KEY0
        data = bytes(data)
    else:
        make = standard_image if kind == "standard" or _chance(d, 50) else compacted_image
        data = make(d, m, xcr0, mxcsr_mask, masked)
        if kind == "broken":
            data = _broken(d, data, xcr0, mxcsr_mask)
    misalign = d.choice((0, 0, 0, 0, 0, 16, 32, 48, d.integer(1, 63)))
    pkey = d.integer(1, MAX_PKEY) if pkeys and _chance(d, 25) else 0
    return Buffer(data, misalign, pkey)


_XSAVE_FAMILY = ("XSAVE", "XSAVEOPT", "XSAVEC", "XRSTOR", "FXSAVE", "FXRSTOR", "FXSAVE32",
                 "FXRSTOR32", "XSAVE32", "XSAVEOPT32", "XSAVEC32", "XRSTOR32")
_WEIGHTS: tuple[tuple[str, int], ...] = (
    ("XSAVE", 8), ("XSAVEOPT", 8), ("XSAVEC", 8), ("XRSTOR", 12), ("FXSAVE", 3),
    ("FXRSTOR", 3), ("FXSAVE32", 2), ("FXRSTOR32", 2), ("XSAVE32", 1), ("XSAVEOPT32", 1),
    ("XSAVEC32", 1), ("XRSTOR32", 2), ("XGETBV", 5), ("MOVDQU", 4),
    ("VMOVDQU", 4), ("VMOVDQU64", 4),
    ("KMOVQ", 3), ("VZEROUPPER", 3), ("VZEROALL", 2), ("FLD", 3), ("FLDCW", 2), ("FNINIT", 2),
    ("EMMS", 1), ("FNSTSW", 1), ("FNSTCW", 1), ("FLDZ", 1), ("FLD1", 1), ("FNCLEX", 1),
    ("LDMXCSR", 3), ("STMXCSR", 1),
    ("XSAVES", 1), ("XRSTORS", 1), ("XSETBV", 1), ("WRPKRU", 1), ("RDPKRU", 1),
    ("LDTILECFG", 1), ("STTILECFG", 1), ("TILELOADD", 1), ("TILESTORED", 1), ("TILEZERO", 1),
    ("TILERELEASE", 1),
)
_MNEMONICS = tuple(m for m, w in _WEIGHTS for _ in range(w))
#: The non-control x87 instructions of the programs: each sets FIP (and, as the CPU says, FDP
#: and FOP) to where it ran.
PUSHES = frozenset({"FLD", "FLD1", "FLDZ"})


def _tilecfg(d: Draw, m: Machine) -> bytes:
    """LDTILECFG's operand: on a CPU with AMX palettes, half the time a valid palette-1
    configuration (random shapes, colsb mostly a multiple of 4, some tiles left empty,
    start_row mostly 0), so that TILELOADD/TILESTORED/TILEZERO get past their #UD checks;
    otherwise any bytes (mostly LDTILECFG's #GP)."""
    if not m.palettes or _chance(d, 50):
        return _value_bytes(d, 64)
    p = m.palettes[0]
    cfg = bytearray(64)
    cfg[0] = 1
    for n in range(p.max_names):
        if _chance(d, 20):
            continue
        colsb = d.choice((p.bytes_per_row, 4 * d.integer(1, p.bytes_per_row // 4),
                          d.integer(1, p.bytes_per_row)))
        struct.pack_into("<H", cfg, 16 + 2 * n, colsb)
        cfg[48 + n] = d.integer(1, p.max_rows)
    cfg[1] = d.choice((0, 0, 0, d.integer(0, p.max_rows)))
    return bytes(cfg)


def _request_mask(d: Draw, xcr0: int) -> int:
    kind = d.choice(("xcr0", "sub", "sub", "sub", "ones", "high"))
    if kind == "xcr0":
        return xcr0
    if kind == "ones":
        return 2**64 - 1
    sub = _submask(d, xcr0 | 0b11)
    return sub | (1 << d.integer(8, 63) if kind == "high" else 0)


def _insn(d: Draw, m: Machine, xcr0: int, nbuf: int, mxcsr_mask: int, masked: bool,
          mn: str | None = None) -> Insn:
    if mn is None:
        mn = d.choice(_MNEMONICS)
    buf = d.integer(0, nbuf - 1)
    if mn in _XSAVE_FAMILY or mn in ("XSAVES", "XRSTORS"):
        return Insn(mn, buf=buf, mask=_request_mask(d, xcr0))
    if mn == "STTILECFG":
        return Insn(mn, buf=buf)
    if mn == "XGETBV":
        return Insn(mn, reg=d.choice((0, 1, 1, 1, d.integer(2, 0xFFFFFFFF))))
    if mn == "XSETBV":
        return Insn(mn, reg=d.choice((0, 1)), value=xcr0)
    if mn in ("MOVDQU", "VMOVDQU", "VMOVDQU64", "KMOVQ"):
        n, hi = {"MOVDQU": (16, 15), "VMOVDQU": (32, 15), "VMOVDQU64": (64, 31),
                 "KMOVQ": (8, 7)}[mn]
        return Insn(mn, reg=d.integer(0, hi), data=_value_bytes(d, n))
    if mn == "FLD":
        return Insn(mn, data=_value_bytes(d, 10))
    if mn == "FLDCW":
        value = d.choice((0x037F, 0x027F, 0x0372, d.integer(0, 0xFFFF)))
        return Insn(mn, value=value | 0x3F if masked else value)
    if mn == "LDMXCSR":
        return Insn(mn, value=_mxcsr(d, m, mxcsr_mask, valid=_chance(d, 85)))
    if mn == "WRPKRU":
        return Insn(mn, value=d.integer(0, 0xFFFFFFFF) & ~PKRU_KEY0)
    if mn == "LDTILECFG":
        return Insn(mn, data=_tilecfg(d, m))
    if mn == "TILELOADD":
        return Insn(mn, reg=d.integer(0, 7), data=_value_bytes(d, 1024))
    if mn == "TILESTORED":
        return Insn(mn, buf=buf, reg=d.integer(0, 7))
    if mn == "TILEZERO":
        return Insn(mn, reg=d.integer(0, 7))
    return Insn(mn)


def generate_program(d: Draw, profile: CpuidProfile, *, xcr0: int | None = None,
                     impl: ImplDefined | None = None, max_insns: int = 8,
                     focus: str | None = None, pkeys: bool = True,
                     placed: bool = False) -> Program:
    """One random program for ``profile`` (see the module docstring) whose MXCSR values
    follow ``impl``'s MXCSR_MASK (default: `for_profile`); with ``focus`` the program has at
    least one instruction of that mnemonic. Where the CPU saves x87 pointers always
    (X87_POINTERS "always", Intel) every FLD is followed by an FNINIT (`_fninit_after_fld`),
    unless ``placed`` (the model will be told where each instruction ran). With ``pkeys``
    (and PKU) a buffer may have a protection key (not for a guest's programs: its pages have
    key 0)."""
    m = machine(profile)
    impl = impl or for_profile(profile)
    mxcsr_mask = impl[MXCSR_MASK]
    xcr0 = default_xcr0(profile) if xcr0 is None else xcr0
    n = d.integer(1, max_insns)
    always = impl[X87_POINTERS] == "always"
    has_fld = _chance(d, 25) or focus in PUSHES
    nbuf = d.integer(1, 3)
    keyed = pkeys and m.has("PKU") and bool(xcr0 & 1 << PKRU)
    buffers = tuple(_buffer(d, m, xcr0, mxcsr_mask, has_fld, keyed) for _ in range(nbuf))
    start = standard_image(d, m, xcr0, mxcsr_mask, has_fld)
    insns = []
    for _ in range(n):
        insn = _insn(d, m, xcr0, nbuf, mxcsr_mask, has_fld)
        if insn.mnemonic in PUSHES and not has_fld:
            insn = Insn("FNINIT")
        insns.append(insn)
    if focus is not None:
        at = d.integer(0, len(insns) - 1)
        insns[at] = _insn(d, m, xcr0, nbuf, mxcsr_mask, has_fld, focus)
    if always and not placed:
        insns = _fninit_after_fld(d, insns)
    return Program(start, tuple(insns), buffers)


def _fninit_after_fld(d: Draw, insns: list[Insn]) -> list[Insn]:
    """Where every save writes FIP/FDP (X87_POINTERS "always", Intel), those of an FLD (FLD1,
    FLDZ: `PUSHES`) are its linear addresses, which no model knows without the program's
    placement: each is followed by an FNINIT (FIP = FDP = FOP = 0), after an FNSTSW half the
    time, so that its data, tags, TOP and condition codes are still compared (ST0-7 keep
    their contents through FNINIT)."""
    out: list[Insn] = []
    for insn in insns:
        out.append(insn)
        if insn.mnemonic in PUSHES:
            if _chance(d, 50):
                out.append(Insn("FNSTSW"))
            out.append(Insn("FNINIT"))
    return out


__all__ = ["Draw", "RandomDraw", "compacted_image", "generate_program", "standard_image"]
