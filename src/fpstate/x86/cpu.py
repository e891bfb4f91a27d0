"""The register file of one logical CPU: every XSAVE-managed state component as bytes.

Models the state of Intel SDM Vol. 1 chapter 13 ("Managing State Using the XSAVE Feature Set")
and the control registers around it: CR0.TS, CR4.OSXSAVE, CR4.PKE, XCR0, IA32_XSS, IA32_XFD,
IA32_XFD_ERR, the CPL, and the processor's own tracking (13.6): XINUSE (reported by XGETBV
with ECX = 1), XMODIFIED and XRSTOR_INFO (the modified optimisation of XSAVEOPT/XSAVES), and,
where the implementation tracks ZMM_Hi256 per register (`fpstate.x86.impl`
VEX256_HI256_XINUSE), which of ZMM0-15 an EVEX.512 load wrote since XINUSE[6] was last
recomputed, and whether an FLD wrote the x87 data registers since a restore or FNINIT
(``x87_regs_written``: AMD's value-based x87 XINUSE counts them in use until then).

Theory of operation
-------------------
A `Machine` is the frozen, per-profile part: one `StateComponent` row per component the CPU
enumerates (number, size, standard offset, alignment, supervisor, XFD, initial configuration),
the CPUID flags that gate instructions, and the AMX palettes. The generic XSAVE/XRSTOR loops of
`fpstate.x86.insn` walk these rows; only x87, SSE/MXCSR and the AMX components have code of
their own.

A `Cpu` is the mutable part. Every component's registers are kept as the bytes of that
component's section of a standard-format XSAVE area (SDM 13.5), so that saving and restoring
a generic component is a copy:

- x87 (component 0): 160 bytes laid out as the legacy region, bytes 23:0 (FCW, FSW, the
  abridged tag byte, FOP, 64-bit FIP and FDP) and 159:32, which here hold the *physical*
  registers R0-R7 (10 bytes used of each 16): a save writes ST(i) = R((TOP + i) mod 8) there,
  so that instructions that change TOP (FLD, FNINIT) need not move registers. Bytes 31:24
  belong to SSE and stay zero here. The abridged tag bit j is R(j) (as FXSAVE stores it);
- SSE (component 1): XMM0-XMM15, 256 bytes; MXCSR is the separate integer ``mxcsr``;
- AVX (2): YMM0_H-YMM15_H; opmask (5): k0-k7; ZMM_Hi256 (6): ZMM0_H-ZMM15_H; Hi16_ZMM (7):
  ZMM16-ZMM31; PKRU (9); TILECFG (17) in the LDTILECFG/STTILECFG memory format; TILEDATA (18)
  tile t row r at t * 1024 + r * 64; APX (19); the MPX components (3, 4); and the supervisor
  components CET_U (11), CET_S (12) and PASID (10), which only XSAVES/XRSTORS reach.

Components the model does not implement (PT 8, HDC 13, UINTR 14, LBR 15, HWP 16: each has
special XSAVES/XRSTORS rules of its own, SDM 13.5.6-13.5.13) are refused by name
(`require_modelled`) rather than treated as plain bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from fpstate.errors import FpstateError, MaskError
from fpstate.x86.cpuid import CpuidProfile
from fpstate.x86.impl import (
    FCW_RESERVED,
    FOP_UPDATE,
    FSW_SUMMARY_ON_LOAD,
    MXCSR_MASK,
    WRITE_XINUSE,
    X87_FDP_BITS,
    X87_NO_OPERAND_FDP,
    X87_POINTER_BITS,
    X87_POINTERS,
    X87_SELECTORS_LOAD64,
    ImplDefined,
)
from fpstate.x86.xfeatures import BY_NUMBER, MXCSR_DEFAULT, bits

if TYPE_CHECKING:
    from fpstate.x86.program import Placement

#: Components with special XSAVES/XRSTORS behaviour that the model does not implement.
NOT_MODELLED: dict[int, str] = {
    8: "PT (XSAVES clears IA32_RTIT_CTL.TraceEn, SDM 13.5.6)",
    13: "HDC (initial configuration IA32_PM_CTL1 = 1, SDM 13.5.10)",
    14: "UINTR (XRSTORS checks UINV, SDM 13.5.11)",
    15: "LBR (depth-dependent save and restore, SDM 13.5.12)",
    16: "HWP (initial configuration 8000FF01H, SDM 13.5.13)",
}

X87, SSE, YMM, BNDREGS, BNDCSR, OPMASK, ZMM_HI256, HI16_ZMM = 0, 1, 2, 3, 4, 5, 6, 7
PKRU, PASID, CET_U, CET_S, XTILECFG, XTILEDATA, APX = 9, 10, 11, 12, 17, 18, 19

FCW_INIT = 0x037F
#: The x87 FPU's "real indefinite" QNaN (SDM Vol. 1 4.8.3.7): what a masked stack fault loads.
X87_INDEFINITE = bytes.fromhex("00000000000000c0ffff")
FSW_IE, FSW_SF, FSW_ES, FSW_C1, FSW_B = 0x0001, 0x0040, 0x0080, 0x0200, 0x8000
FSW_EXCEPTIONS = 0x003F
FSW_TOP_SHIFT = 11


class UnknownPointers(FpstateError):
    """A save would write FIP/FDP of an x87 push (FLD, FLD1, FLDZ): the linear addresses of
    its code and operand, which the model has only when told where the program ran
    (`fpstate.x86.program.Placement`). Programs that show them otherwise cannot be
    answered."""


@dataclass(frozen=True, slots=True)
class StateComponent:
    """One row of the table that drives the generic XSAVE/XRSTOR loops (CPUID.(0DH, i))."""

    number: int
    name: str
    size: int  #: CPUID.(EAX=0DH,ECX=i):EAX (x87 160, SSE 256: the legacy region)
    offset: int  #: standard-format offset (EBX); 0 for supervisor components
    aligned: bool  #: ECX[1], 64-byte aligned in the compacted format
    supervisor: bool  #: ECX[0], IA32_XSS
    xfd: bool  #: ECX[2], IA32_XFD may arm it
    init: bytes  #: the initial configuration (SDM 13.6), ``size`` bytes

    @property
    def mask(self) -> int:
        return 1 << self.number


@dataclass(frozen=True, slots=True)
class Palette:
    """One AMX palette, CPUID.(EAX=1DH,ECX=n) (SDM Vol. 1 18.2, "palette_table")."""

    total_tile_bytes: int
    bytes_per_tile: int
    bytes_per_row: int
    max_names: int
    max_rows: int


@dataclass(frozen=True, slots=True, eq=False)
class Machine:
    """What a CPU is, as opposed to the state it is in: the frozen part of the model."""

    profile: CpuidProfile
    components: Mapping[int, StateComponent]
    flags: frozenset[str]  #: the CPUID flags the instructions check (see `machine`)
    palettes: tuple[Palette, ...]  #: palette 1 at index 0

    def has(self, flag: str) -> bool:
        return flag in self.flags

    @property
    def xcr0_supported(self) -> int:
        return self.profile.xcr0_supported

    @property
    def xss_supported(self) -> int:
        return self.profile.xss_supported


def _initial_configuration(number: int, size: int) -> bytes:
    """SDM 13.6: x87 has FCW = 037FH and everything else zero (empty tags: abridged byte 0);
    every other modelled component is all zeros."""
    if number == X87:
        return struct.pack("<H", FCW_INIT) + bytes(size - 2)
    return bytes(size)


#: Flags read straight from CPUID where `CpuidProfile.FLAGS` has no name for them.
_EXTRA_FLAGS = {"SSE2": (1, 0, 3, 26), "MMX": (1, 0, 3, 23), "AVX512BW": (7, 0, 1, 30),
                # CPUID.(EAX=07H,ECX=0):EBX[13]: FCS and FDS deprecated, saved as 0000H
                # (X86_FEATURE_ZERO_FCS_FDS)
                "ZERO_FCS_FDS": (7, 0, 1, 13),
                # CPUID.(EAX=07H,ECX=0):EBX[6]: FDP updated only for x87 non-control
                # instructions that incur unmasked x87 exceptions (X86_FEATURE_FDP_EXCPTN_ONLY)
                "FDP_EXCPTN_ONLY": (7, 0, 1, 6)}
_PROFILE_FLAGS = ("FPU", "FXSR", "XMM", "XSAVE", "OSXSAVE", "AVX", "AVX512F", "PKU", "OSPKE",
                  "AMX_TILE", "XSAVEOPT", "XSAVEC", "XGETBV1", "XSAVES", "XFD")


@cache
def machine(profile: CpuidProfile) -> Machine:
    """The `Machine` of ``profile`` (cached: profiles are frozen and hashable)."""
    comps = {}
    for i in bits(profile.xfeatures_supported):
        if i >= 63:
            continue
        c = profile.component(i)
        name = BY_NUMBER[i].short if i in BY_NUMBER else f"bit{i}"
        comps[i] = StateComponent(i, name, c.size, c.offset, c.aligned, c.supervisor, c.xfd,
                                  _initial_configuration(i, c.size))
    flags = {f for f in _PROFILE_FLAGS if profile.has(f)}
    for name, (leaf, sub, reg, bit) in _EXTRA_FLAGS.items():
        if profile.max_basic_leaf >= leaf and profile.cpuid(leaf, sub)[reg] >> bit & 1:
            flags.add(name)
    palettes = []
    if "AMX_TILE" in flags and profile.max_basic_leaf >= 0x1D:
        for n in range(1, profile.cpuid(0x1D, 0)[0] + 1):
            a, b, c, _ = profile.cpuid(0x1D, n)
            palettes.append(Palette(a & 0xFFFF, a >> 16, b & 0xFFFF, b >> 16, c & 0xFFFF))
    return Machine(profile, comps, frozenset(flags), tuple(palettes))


def require_modelled(mask: int, what: str) -> None:
    """MaskError if ``mask`` names a component the model does not implement (NOT_MODELLED)."""
    for i in bits(mask):
        if i in NOT_MODELLED:
            raise MaskError(f"{what}: component {i}, {NOT_MODELLED[i]}, is not modelled")


class Cpu:
    """The mutable state of one logical CPU (see the module docstring for the layout).

    ``xrstor_info`` is the SDM's 4-tuple <CPL, VMXNR, linear address, XCOMP_BV> of the last
    XRSTOR/XRSTORS; addresses are symbolic (``("buf", n)``, ``("start",)``, ``("kernel",)``)
    since only their equality matters. ``x87_pointers_known`` is False after an x87 push
    whose placement (``insn_at``) the model was not told: FIP and FDP then hold the linear
    addresses of that instruction and its operand, which the model does not have (see
    `Cpu.store_x87`, `Cpu.x87_noncontrol`).
    """

    __slots__ = (
        "avx_kept",
        "cpl",
        "cr0_ts",
        "cr4_osxsave",
        "cr4_pke",
        "impl",
        "insn_at",
        "machine",
        "mxcsr",
        "regs",
        "vex_soft",
        "x87_pointers_known",
        "x87_regs_written",
        "x87_selectors",
        "xcr0",
        "xfd",
        "xfd_err",
        "xinuse",
        "xmodified",
        "xrstor_info",
        "xss",
        "zmm_hi256_lag",
        "zmm_hi256_written",
    )

    def __init__(self, m: Machine, impl: ImplDefined, *, xcr0: int, xss: int = 0, xfd: int = 0,
                 cpl: int = 3) -> None:
        self.machine = m
        self.impl = impl
        self.regs: dict[int, bytearray] = {i: bytearray(c.init) for i, c in m.components.items()}
        self.mxcsr = MXCSR_DEFAULT
        self.xcr0 = xcr0
        self.xss = xss
        self.xfd = xfd
        self.xfd_err = 0
        self.cr0_ts = False
        self.cr4_osxsave = m.has("XSAVE")  # Linux sets CR4.OSXSAVE wherever XSAVE exists
        self.cr4_pke = m.has("PKU")  # Linux's setup_pku() enables CR4.PKE on PKU CPUs
        self.cpl = cpl
        self.xinuse = 0
        #: bit r: ZMMr's bits 511:256 written by an EVEX.512 load since XINUSE[6] was last
        #: recomputed from the registers (VEX256_HI256_XINUSE "per-register")
        self.zmm_hi256_written = 0
        #: the ``zmm_hi256_written`` a VEX.256 load just cleared XINUSE[6] from, while a legacy
        #: SSE write may still see ZMM_Hi256 in use (`fpstate.x86.insn.lagging_tracking`)
        self.zmm_hi256_lag = 0
        #: a legacy SSE write met AVX state in use: XINUSE[2] stays set through restores that
        #: do not load AVX state (LEGACY_SSE_KEEPS_AVX)
        self.avx_kept = False
        #: XINUSE bits 1 and 2 that a VEX.256 load set from 0 and nothing else wrote since
        #: (VEX_XINUSE_RECOMPUTED: the next XRSTOR of AVX or ZMM_Hi256 state recomputes them)
        self.vex_soft = 0
        self.xmodified = (1 << 64) - 1
        self.xrstor_info: tuple | None = None
        self.x87_pointers_known = True
        #: an FLD wrote R0-R7 since the last XRSTOR/FXRSTOR/FNINIT: where WRITE_XINUSE makes
        #: x87 XINUSE follow its value, the registers count as in use even when zero
        self.x87_regs_written = False
        #: (FCS, FDS), the selectors the 32-bit save forms store where the CPU does not zero
        #: them (ZERO_FCS_FDS): None while unknown to the model (left by code before the
        #: program, or by an x87 instruction that ran where no one said with which CS/DS),
        #: known after an FXRSTOR32 of them, a 64-bit load (X87_SELECTORS_LOAD64) or an
        #: x87 instruction whose placement names its selectors
        self.x87_selectors: tuple[int, int] | None = None
        #: where the instruction being executed runs (`fpstate.x86.program.Placement`, from
        #: the host runner), None where no one says: then an FLD leaves FIP (and FDP, FOP)
        #: unknown to the model (``x87_pointers_known``)
        self.insn_at: Placement | None = None

    def copy(self) -> Cpu:
        new = Cpu.__new__(Cpu)
        for name in Cpu.__slots__:
            setattr(new, name, getattr(self, name))
        new.regs = {i: bytearray(r) for i, r in self.regs.items()}
        return new

    def key(self) -> tuple:
        """Everything that can influence what a later instruction does or shows."""
        return (tuple(bytes(r) for r in self.regs.values()), self.mxcsr, self.xcr0, self.xss,
                self.xfd, self.xfd_err, self.cr0_ts, self.cpl, self.xinuse, self.xmodified,
                self.xrstor_info, self.x87_pointers_known, self.zmm_hi256_written,
                self.x87_regs_written, self.zmm_hi256_lag, self.avx_kept, self.vex_soft,
                self.x87_selectors)

    # -- tracking (SDM 13.6) -------------------------------------------------------------

    def in_init_configuration(self, i: int) -> bool:
        """Whether component ``i`` holds its initial configuration (SDM 13.6). x87: FCW =
        037FH, FSW = 0, all tags empty, ST0-ST7 zero and not written by an FLD since the last
        restore or FNINIT (``x87_regs_written``; FOP/FIP/FDP are not considered: the host's
        XINUSE ignores them); SSE: the XMM registers only, not MXCSR."""
        r = self.regs[i]
        if i == X87:
            return (r[0:6] == b"\x7f\x03\x00\x00\x00\x00" and not self.x87_regs_written
                    and not any(r[32 + 16 * j:42 + 16 * j].strip(b"\0") for j in range(8)))
        return r == self.machine.components[i].init

    def ymm0_15_zero(self) -> bool:
        """Whether XMM0-15 and the upper halves of YMM0-15 are all zero."""
        return not (any(self.regs[SSE]) or (YMM in self.regs and any(self.regs[YMM])))

    def wrote(self, mask: int) -> None:
        """An instruction wrote the components of ``mask``: they are modified (XMODIFIED)
        and, as WRITE_XINUSE says, in use, or in use exactly when not initial."""
        self.xmodified |= mask
        self.vex_soft &= ~mask
        by_value = self.impl[WRITE_XINUSE] & mask
        self.xinuse |= mask & ~by_value
        for i in bits(by_value):
            self.track_value(i)

    def track_value(self, i: int) -> None:
        """XINUSE[i] := component i is not in its initial configuration."""
        if i == ZMM_HI256:
            self.zmm_hi256_written = 0
        if self.in_init_configuration(i):
            self.xinuse &= ~(1 << i)
        else:
            self.xinuse |= 1 << i

    # -- x87 (SDM Vol. 1 8.1, 13.5.1) -------------------------------------------------------

    @property
    def fcw(self) -> int:
        return self.regs[X87][0] | self.regs[X87][1] << 8

    @property
    def fsw(self) -> int:
        return self.regs[X87][2] | self.regs[X87][3] << 8

    @property
    def ftw(self) -> int:
        """The abridged tag byte: bit j set = physical register j is not empty."""
        return self.regs[X87][4]

    @property
    def top(self) -> int:
        return self.fsw >> FSW_TOP_SHIFT & 7

    def set_fcw(self, value: int) -> None:
        """FCW with the reserved bits as this CPU forces them (impl FCW_RESERVED)."""
        and_mask, or_mask = self.impl[FCW_RESERVED]
        struct.pack_into("<H", self.regs[X87], 0, value & and_mask | or_mask)

    def set_fsw(self, value: int, *, summary: bool = True) -> None:
        """FSW; with ``summary`` ES and B are recomputed: set iff an exception flag is set
        whose mask bit in FCW is clear (SDM 8.1.3.1: B mirrors ES)."""
        if summary:
            pending = value & FSW_EXCEPTIONS & ~self.fcw
            value = value & ~(FSW_ES | FSW_B) | (FSW_ES | FSW_B if pending else 0)
        struct.pack_into("<H", self.regs[X87], 2, value & 0xFFFF)

    def x87_pending(self) -> bool:
        """An unmasked x87 exception is pending (FSW.ES): a waiting instruction raises #MF."""
        return bool(self.fsw & FSW_ES)

    def x87_noncontrol(self, *, unmasked: bool, operand: bool = True) -> None:
        """FIP, FDP and FOP after a non-control x87 instruction (SDM Vol. 1 8.1.8, 8.1.9):
        FIP := its linear address, always; FDP := its memory operand's linear address, where
        the CPU does not enumerate FDP_EXCPTN_ONLY or the instruction incurred an unmasked x87
        exception (``unmasked``); FOP := its opcode as FOP_UPDATE says (only with an unmasked
        exception while the fopcode compatibility sub-mode is off). Without a memory operand
        (``operand`` False: FLD1, FLDZ) the SDM leaves FDP "undefined": kept where the CPU
        enumerates FDP_EXCPTN_ONLY (measured on Emerald Rapids, an unmasked stack overflow
        included), elsewhere as X87_NO_OPERAND_FDP says (kept, measured on Zen 4; or unknown
        to the model). Each pointer is kept to X87_POINTER_BITS / X87_FDP_BITS, as a load
        would. The selectors follow their pointers: FCS := the instruction's CS, FDS := its DS
        where FDP is written, kept where FDP is (measured on Zen 4), each known where the
        placement says which selectors it ran with. Where the instruction's placement is
        unknown (``insn_at`` None) the pointers become unknown to the model instead."""
        at = self.insn_at
        old_selectors, self.x87_selectors = self.x87_selectors, None
        if at is None:
            self.x87_pointers_known = False
            return
        r = self.regs[X87]
        struct.pack_into("<Q", r, 8, _sign_extend(at.address, self.impl[X87_POINTER_BITS]))
        exception_only = self.machine.has("FDP_EXCPTN_ONLY")
        fds: int | None = at.ds
        if not operand and not exception_only and self.impl[X87_NO_OPERAND_FDP] != "kept":
            self.x87_pointers_known = False
            fds = None
        elif operand and (unmasked or not exception_only):
            struct.pack_into("<Q", r, 16, _sign_extend(at.operand, self.impl[X87_FDP_BITS]))
        else:
            fds = old_selectors[1] if old_selectors is not None else None
        if at.cs is not None and fds is not None:
            self.x87_selectors = (at.cs, fds)
        if unmasked or self.impl[FOP_UPDATE] == "always":
            struct.pack_into("<H", r, 6, at.fop & 0x7FF)

    def load_x87(self, image: bytes | bytearray, at: int = 0, *, form32: bool = False) -> None:
        """Load x87 state from the legacy region at ``image[at:]`` (XRSTOR, FXRSTOR 64-bit
        forms): FCW, FSW, the abridged tag byte, FOP (11 bits), FIP, FDP and the 80 bits of
        each ST register; byte 5 and the 6 unused bytes of each register slot are ignored.
        ``form32`` (FXRSTOR without REX.W, SDM Vol. 1 Table 10-2): FIP and FDP are the 32-bit
        offsets at bytes 8 and 16, zero-extended (measured on Emerald Rapids), and FCS/FDS at
        12 and 20 are loaded where the CPU does not deprecate them (ZERO_FCS_FDS). A 64-bit
        form leaves the selectors as X87_SELECTORS_LOAD64 says (Zen 4: zeroed)."""
        r = self.regs[X87]
        fcw, fsw, ftw, _, fop, fip, fdp = struct.unpack_from("<HHBBHQQ", image, at)
        if form32:
            fip, fcs, _, fdp, fds, _ = struct.unpack_from("<IHHIHH", image, at + 8)
            if not self.machine.has("ZERO_FCS_FDS"):
                self.x87_selectors = (fcs, fds)
        elif self.impl[X87_SELECTORS_LOAD64] == "zeroed":
            self.x87_selectors = (0, 0)
        self.set_fcw(fcw)
        r[4], r[5] = ftw, 0
        struct.pack_into("<HQQ", r, 6, fop & 0x7FF, _sign_extend(fip, self.impl[X87_POINTER_BITS]),
                         _sign_extend(fdp, self.impl[X87_FDP_BITS]))
        self.set_fsw(fsw, summary=self.impl[FSW_SUMMARY_ON_LOAD] == "recomputed")
        top = self.top
        for i in range(8):
            src, j = at + 32 + 16 * i, (top + i) & 7
            r[32 + 16 * j:42 + 16 * j] = image[src:src + 10]
            r[42 + 16 * j:48 + 16 * j] = bytes(6)
        self.x87_pointers_known = True
        self.x87_regs_written = False

    def store_x87(self, dst: bytearray, *, form32: bool = False) -> None:
        """Save x87 state into the legacy region at ``dst`` (SDM 13.5.1, 64-bit form): FCW,
        FSW, the abridged tag byte, FOP, FIP, FDP (as X87_POINTERS says: always, or only while
        FSW.ES = 1, else 0), ST0-ST7 with their 6 unused bytes as 0. UnknownPointers if the
        pointers must be written and an FLD of the program set them. ``form32`` (FXSAVE
        without REX.W, SDM Vol. 1 Table 10-2): FIP[31:0], FCS, FDP[31:0], FDS, each selector
        followed by two zero bytes; FCS and FDS are 0000H on a CPU that deprecates them
        (CPUID.(EAX=07H,ECX=0):EBX[13]), else the selectors, UnknownPointers while the model
        does not know them."""
        r = self.regs[X87]
        dst[0:6] = r[0:6]
        if self.impl[X87_POINTERS] == "always" or self.x87_pending():
            if not self.x87_pointers_known:
                raise UnknownPointers(
                    "a save writes FIP/FDP of an FLD (the linear addresses of the instruction "
                    "and its operand); the model has no addresses")
            if form32:
                sel = (0, 0) if self.machine.has("ZERO_FCS_FDS") else self.x87_selectors
                if sel is None:
                    raise UnknownPointers(
                        "a 32-bit save writes FCS/FDS, which this CPU does not zero; the "
                        "model does not know the selectors")
                fip, fdp = struct.unpack_from("<QQ", r, 8)
                dst[6:8] = r[6:8]
                struct.pack_into("<IHHIHH", dst, 8, fip & 0xFFFFFFFF, sel[0], 0,
                                 fdp & 0xFFFFFFFF, sel[1], 0)
            else:
                dst[6:24] = r[6:24]
        else:
            dst[6:24] = bytes(18)
        top = self.top
        dst[32:160] = r[32 + 16 * top:160] + r[32:32 + 16 * top]

    def store_sse(self, dst: bytearray, *, xmm: bool, mxcsr: bool) -> None:
        """XMM0-15 at 160 and/or MXCSR and MXCSR_MASK at 24 (SDM 13.5.2)."""
        if mxcsr:
            struct.pack_into("<II", dst, 24, self.mxcsr, self.impl[MXCSR_MASK])
        if xmm:
            dst[160:416] = self.regs[SSE]

    def init_x87(self) -> None:
        """x87 state to its initial configuration (SDM Vol. 1 13.6: FCW 037FH, FSW 0, FTW
        FFFFH, FCS = FDS = 0, FIP = FDP = 0, FOP 0, ST0-ST7 0), as an XRSTOR does with RFBM[0]
        = 1 and XSTATE_BV[0] = 0. FCS and FDS 0000H: measured on Zen 4 (an FXRSTOR32 of FDS
        002BH, then XRSTOR32 or XRSTOR64 of x87 in its initial configuration: FLD1, which keeps
        FDS there, leaves FDS 0 for FXSAVE32 to show)."""
        self.regs[X87][:] = self.machine.components[X87].init
        self.x87_pointers_known = True
        self.x87_selectors = (0, 0)
        self.x87_regs_written = False

    def st(self, i: int) -> bytes:
        """ST(i), 10 bytes: physical register (TOP + i) mod 8."""
        j = (self.top + i) & 7
        return bytes(self.regs[X87][32 + 16 * j:42 + 16 * j])

    def push_x87(self, value: bytes) -> None:
        """Decrement TOP and put ``value`` in the new ST(0), tagged valid (FLD's push)."""
        r = self.regs[X87]
        top = (self.top - 1) & 7
        r[32 + 16 * top:42 + 16 * top] = value
        struct.pack_into("<H", r, 2, self.fsw & ~(7 << FSW_TOP_SHIFT) | top << FSW_TOP_SHIFT)
        r[4] |= 1 << top

    # -- MXCSR (SDM Vol. 1 10.2.3, 11.6.6) ----------------------------------------------------

    def mxcsr_reserved(self, value: int) -> bool:
        """Whether ``value`` sets an MXCSR bit outside MXCSR_MASK: LDMXCSR, FXRSTOR and XRSTOR
        #GP on it (MXCSR_MASK is this CPU's, see impl MXCSR_MASK)."""
        return bool(value & ~self.impl[MXCSR_MASK] & 0xFFFFFFFF) or value >> 32 != 0

    # -- AMX (SDM Vol. 1 18, Vol. 2A LDTILECFG) -------------------------------------------

    def palette(self) -> Palette | None:
        """The palette of the current TILECFG; None when TILES_CONFIGURED = 0."""
        pid = self.regs[XTILECFG][0] if XTILECFG in self.regs else 0
        return self.machine.palettes[pid - 1] if pid else None

    def tile_shape(self, t: int) -> tuple[int, int]:
        """(rows, colsb) of tile ``t`` in the current TILECFG."""
        cfg = self.regs[XTILECFG]
        return cfg[48 + t], struct.unpack_from("<H", cfg, 16 + 2 * t)[0]


def _sign_extend(value: int, width: int) -> int:
    value &= (1 << width) - 1
    if value >> (width - 1):
        value |= (1 << 64) - (1 << width)
    return value


@dataclass(slots=True)
class Area:
    """An instruction's memory operand: its bytes, a symbolic linear address (only equality
    matters: XRSTOR_INFO), the address modulo 64 (the alignment checks) and the protection
    key of its user pages (0: the default key, whose rights every program keeps)."""

    data: bytearray
    address: tuple
    misalign: int = 0
    pkey: int = 0


def tilecfg_valid(cpu: Cpu, cfg: bytes | bytearray) -> bool:
    """LDTILECFG's checks (SDM Vol. 2A LDTILECFG, Operation): palette_id <= max palette and
    supported by XCR0; for palette != 0 bytes 15:2 zero, colsb <= bytes_per_row and rows <=
    max_rows for each of max_names tiles, the rest of bytes 47:16 and 63:48 zero, and rows and
    colsb both 0 or both non-zero."""
    pid = cfg[0]
    if pid == 0:
        return True
    pals = cpu.machine.palettes
    if pid > len(pals) or cpu.xcr0 & 0x60000 != 0x60000:
        return False
    p = pals[pid - 1]
    if any(cfg[2:16]) or any(cfg[16 + 2 * p.max_names:48]) or any(cfg[48 + p.max_names:64]):
        return False
    for n in range(p.max_names):
        colsb, rows = struct.unpack_from("<H", cfg, 16 + 2 * n)[0], cfg[48 + n]
        if colsb > p.bytes_per_row or rows > p.max_rows or (colsb == 0) != (rows == 0):
            return False
    return True


__all__ = [
    "NOT_MODELLED",
    "Area",
    "Cpu",
    "Machine",
    "Palette",
    "StateComponent",
    "UnknownPointers",
    "machine",
    "require_modelled",
    "tilecfg_valid",
]
