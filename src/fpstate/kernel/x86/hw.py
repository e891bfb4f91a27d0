"""The FPU hardware of one CPU, as the kernel model drives it, and its access to memory.

The kernel model needs a register file per CPU and the XSAVE-family operations the kernel issues
on it (``os_xsave``, ``os_xrstor``, XSAVE to and XRSTOR from a user signal frame). This module is
that subset of the architecture, following Intel SDM Vol. 1 chapter 13 (13.7 XSAVE, 13.8 XRSTOR,
13.10 XSAVEC, 13.11 XSAVES, 13.12 XRSTORS, 13.14 extended feature disable) where the kernel's
correctness depends on it; `fpstate.x86.cpu` is the full instruction model.

Theory of operation
-------------------
- A component's value is ``bytes`` of its XSAVE size: byte-exact wherever userspace can see it
  (signal frames, ptrace, KVM buffers). `token` encodes "who wrote this, in which generation" into
  such bytes (`read_token` decodes it), so a checker sees leaks and stale data by reading bytes.
- x87 (component 0) is the 160-byte legacy region with bytes 24..31 always zero: those bytes are
  MXCSR and MXCSR_MASK, kept in `FpRegs.mxcsr` and written by every save of SSE or AVX state.
- XINUSE: a component not in XINUSE is in its initial configuration (no entry in ``values``).
  Instructions set it by writing, whatever the value; XRSTOR sets it only for values that are
  not the initial ones (this CPU's implementation choice, /work/notes/host-findings.md facts 9
  and 10). MXCSR != 0x1F80 counts as SSE in use (fact 11). WRPKRU (`FpRegs.wrpkru`) follows
  the vendor (fpstate.x86.impl WRITE_XINUSE bit 9): a WRPKRU of 0 leaves PKRU in use on Intel
  and initial on AMD, so that XSAVE then writes XSTATE_BV[PKRU] = 0 there.
- PKRU is a 32-bit register in an 8-byte component: its tokens fit the register (`token`).
- XFD (13.14): a component whose XFD bit is set is saved as if in its initial configuration and
  is initialised, not loaded, by XRSTOR*; touching it from an instruction raises #NM and sets
  IA32_XFD_ERR (`FpRegs.user_write`).
- Memory is reached through `Buf`: `KernelBuf` over an fpstate image (an access past its size is
  the seed-000 out-of-bounds write, a `KernelBug`) and `UserBuf` over `UserMemory`
  (`fpstate.kernel.x86.mm`, re-exported here: an unmapped or not-present page is a #PF fault
  value; pages are faulted in only when page faults are enabled, as the kernel's
  pagefault_disable() sections require).
- Faults are values (`Fault`): all checks run before anything is written, so a faulting XSAVE or
  XRSTOR changes nothing (real hardware may have written part of a user buffer; the kernel
  never relies on either).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from fpstate.errors import FpstateError
from fpstate.kernel.x86.mm import PAGE_SIZE, PageFault, UserMemory
from fpstate.kernel.x86.types import KernelBug
from fpstate.x86.cpuid import CpuidProfile
from fpstate.x86.impl import WRITE_XINUSE, for_profile
from fpstate.x86.layout import compacted_offset
from fpstate.x86.program import Fault
from fpstate.x86.xfeatures import (
    MXCSR_DEFAULT,
    XCOMP_BV_COMPACTED_FORMAT,
    XFEATURE_MASK_FP,
    XFEATURE_MASK_PKRU,
    XFEATURE_MASK_SSE,
    XFEATURE_MASK_XTILE_CFG,
    XFEATURE_MASK_XTILE_DATA,
    XFEATURE_MASK_YMM,
    bit_tuple,
    bits,
)

HDR = 512  #: offset of the XSAVE header
MXCSR_OFFSET = 24
_MXCSR_OR_AVX = XFEATURE_MASK_SSE | XFEATURE_MASK_YMM

#: FpRegs._plan: (spans, ((number, offset, size, init value), ...), end of the last span).
_Plan = tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int, int, bytes], ...], int]
#: id(profile) -> (profile, {key: plan}); profiles are immutable, so layouts are pure.
_PROFILE_MEMOS: dict[int, tuple[CpuidProfile, dict[tuple[object, ...], _Plan]]] = {}


def _profile_memo(profile: CpuidProfile) -> dict[tuple[object, ...], _Plan]:
    got = _PROFILE_MEMOS.get(id(profile))
    if got is None or got[0] is not profile:
        if len(_PROFILE_MEMOS) >= 64:
            _PROFILE_MEMOS.clear()
        got = _PROFILE_MEMOS[id(profile)] = (profile, {})
    return got[1]


def pkru_tracks_value(profile: CpuidProfile) -> bool:
    """Whether ``profile``'s CPU takes PKRU back to its initial configuration (XINUSE[9] = 0)
    when WRPKRU writes 0: fpstate.x86.impl WRITE_XINUSE bit 9 (AMD; not Intel)."""
    got = _PKRU_BY_VALUE.get(id(profile))
    if got is None or got[0] is not profile:
        if len(_PKRU_BY_VALUE) >= 64:
            _PKRU_BY_VALUE.clear()
        got = _PKRU_BY_VALUE[id(profile)] = (
            profile, bool(for_profile(profile)[WRITE_XINUSE] >> PKRU & 1))
    return got[1]


_PKRU_BY_VALUE: dict[int, tuple[CpuidProfile, bool]] = {}


def pkru_bytes(pkru: int) -> bytes:
    """PKRU's 8-byte XSAVE component for the register value ``pkru``: the u32, then 4 zero
    bytes (memoised: thread.pkru is read as a component at every step of the checker)."""
    got = _PKRU_BYTES.get(pkru)
    if got is None:
        if len(_PKRU_BYTES) >= 4096:
            _PKRU_BYTES.clear()
        got = _PKRU_BYTES[pkru] = pkru.to_bytes(4, "little") + bytes(4)
    return got


_PKRU_BYTES: dict[int, bytes] = {}

# -- component values ---------------------------------------------------------------------------

_TOKEN_MARK = 0xA5
#: The low byte of a PKRU token: as rights, key 0 open (bits 1:0 clear), key 1 AD, keys 2 and
#: 3 WD -- a token is a value a program could load and go on running with, since its stack
#: and code are on key 0.
PKRU_TOKEN_MARK = 0xA4


def init_value(i: int, size: int) -> bytes:
    """The initial configuration of component ``i`` as XSAVE writes it (SDM 13.6): x87 FCW =
    037FH with everything else zero; every other component all zero. (Memoised: the bytes
    are immutable and the same few are asked for at every save and restore.)"""
    got = _INIT_VALUES.get((i, size)) if type(size) is int else None
    if got is None:
        got = b"\x7f\x03" + bytes(size - 2) if i == 0 else bytes(size)
        if type(size) is int:
            if len(_INIT_VALUES) >= 4096:
                _INIT_VALUES.clear()
            _INIT_VALUES[(i, size)] = got
    return got


_INIT_VALUES: dict[tuple[int, int], bytes] = {}


#: PKRU's component number: a 32-bit register (bytes 0..3 of its 8-byte XSAVE component).
PKRU = 9

#: MXCSR's key in the views and expected values of the checker (FpRegs.snapshot: -1).
MXCSR = -1
#: MXCSR as 4 bytes in its initial configuration (MXCSR_DEFAULT, 1F80H).
MXCSR_INIT = MXCSR_DEFAULT.to_bytes(4, "little")

#: The CR4 bits the FPU code sets (SDM Vol. 3A 2.5): OSFXSR (bit 9; without it LDMXCSR and SSE
#: instructions #UD), OSXMMEXCPT (bit 10) and OSXSAVE (bit 18; without it the XSAVE family and
#: XGETBV #UD). INIT clears CR4 (SDM Vol. 3A Table 10-1); fpu__init_cpu_generic() sets the
#: first two, fpu__init_cpu_xstate() the third.
X86_CR4_OSFXSR, X86_CR4_OSXMMEXCPT, X86_CR4_OSXSAVE = 1 << 9, 1 << 10, 1 << 18
CR4_FPU_BITS = X86_CR4_OSFXSR | X86_CR4_OSXMMEXCPT | X86_CR4_OSXSAVE


def mxcsr_token(owner: int, n: int) -> int:
    """An MXCSR value that names its writer (LDMXCSR in the checker's walks): the exception
    masks (bits 12:7) of MXCSR_DEFAULT flipped by ``owner``'s low 6 bits, and the rounding
    control (bits 14:13) ``n``, 1 or 2 -- a task's two values, so that a lost write shows. Never
    MXCSR_DEFAULT (RC is not 0), never a reserved bit (within 0xFFFF), and as legal as any
    value a program loads: nothing in the model computes with it."""
    assert n in (1, 2), n
    return (MXCSR_DEFAULT ^ (owner & 0x3F) << 7) | n << 13


def next_mxcsr_token(owner: int, current: bytes | None) -> int:
    """The MXCSR value ``owner`` loads next: the other of its two `mxcsr_token` values than
    ``current`` (4 bytes, or None), so that each load changes what it expects."""
    one = mxcsr_token(owner, 1)
    return mxcsr_token(owner, 2 if current == one.to_bytes(4, "little") else 1)


def read_mxcsr_token(value: bytes | None) -> tuple[int, int] | None:
    """(owner's low 6 bits, n) of a 4-byte MXCSR made by `mxcsr_token`, None for another."""
    if value is None or len(value) != 4:
        return None
    v = int.from_bytes(value, "little")
    n = v >> 13 & 3
    if v >> 15 or n not in (1, 2) or v & 0x7F:  # RC 0 and 3 are no token's
        return None
    return (v ^ MXCSR_DEFAULT) >> 7 & 0x3F, n


#: Writers of a PKRU token's 12 bits: a task id below 0x800, or a guest's writer id
#: (0x8000 | VM << 8 | vCPU, fpstate.kvm.x86.vcpu.guest_owner) folded to 0x800 | VM << 4 | vCPU.
_PKRU_GUEST, _GUEST = 0x800, 0x8000


def token(owner: int, gen: int, i: int, size: int) -> bytes:
    """Bytes for component ``i`` that name their writer: ``owner`` (a task id, < 65536) and
    ``gen`` (< 2**32), repeated every 8 bytes. x87 bytes 24..31 (MXCSR) are left zero. PKRU
    holds 32 bits: its token is the u32 0xA4 (`PKRU_TOKEN_MARK`) | writer << 8 | gen << 20 (12
    bits each, the writer folded as `_PKRU_GUEST` says) followed by the component's 4 zero
    bytes; FpstateError beyond those bits."""
    if i == PKRU:
        w = owner
        if owner & _GUEST and owner >> 8 & 0x7F < 8 and owner & 0xFF < 16:
            w = _PKRU_GUEST | (owner >> 8 & 0x7F) << 4 | owner & 0xFF
        if not (0 <= w < 1 << 12 and w & _PKRU_GUEST == (owner & _GUEST) >> 4
                and 0 < gen < 1 << 12):
            raise FpstateError(f"a PKRU value names its writer in 32 bits: a task id below 2048 "
                               f"(or a guest of VM < 8 and vCPU < 16) and a generation below "
                               f"4096, not writer {owner:#x} at generation {gen}")
        return (PKRU_TOKEN_MARK | w << 8 | gen << 20).to_bytes(4, "little") + bytes(size - 4)
    assert 0 <= owner < 1 << 16 and 0 <= gen < 1 << 32, (owner, gen)
    # bytes (0xA5, i & 0xFF, owner as u16, gen as u32), little-endian
    unit = (_TOKEN_MARK | (i & 0xFF) << 8 | owner << 16 | gen << 32).to_bytes(8, "little")
    data = (unit * (size // 8 + 1))[:size]
    if i == 0:
        data = data[:24] + bytes(8) + data[32:]
    return data


def read_token(value: bytes) -> tuple[int, int] | None:
    """(owner, gen) of bytes made by `token`, None for anything else (e.g. init values). An
    8-byte value is read as a PKRU token when it starts with `PKRU_TOKEN_MARK` and its upper half
    is zero, whichever component it is: an IA32_PASID value of that shape reads as one too,
    so a reader that must be exact compares the value with `token` of what it read
    (statekey._classify does)."""
    if len(value) < 8:
        return None
    mark = value[0]
    if mark == PKRU_TOKEN_MARK:  # a PKRU token, or a PKRU value that only looks like one
        u = int.from_bytes(value[:4], "little")
        if len(value) != 8 or value[4:8] != b"\0\0\0\0" or not u >> 20:
            return None
        w = u >> 8 & 0xFFF
        if w & _PKRU_GUEST:
            w = _GUEST | (w >> 4 & 0x7F) << 8 | w & 0xF
        return w, u >> 20
    gen = int.from_bytes(value[4:8], "little")
    if mark != _TOKEN_MARK or not gen:  # generations start at 1
        return None
    return int.from_bytes(value[2:4], "little"), gen


class Buf:
    """Where an XSAVE-family instruction reads and writes: ``addr`` for the alignment check,
    ``check`` before any access, then ``read``/``write`` at offsets from the start."""

    __slots__ = ()
    addr: int

    def check(self, spans: Iterable[tuple[int, int]], write: bool = False) -> Fault | None:
        """The fault (if any) of accessing each (offset, length) span, for a store when
        ``write``."""
        raise NotImplementedError

    def read(self, off: int, n: int) -> bytes:
        raise NotImplementedError

    def write(self, off: int, data: bytes) -> None:
        raise NotImplementedError


class KernelBuf(Buf):
    """An fpstate register image. The buffer is ``len(regs)`` bytes: an access past it is the
    out-of-bounds write of seed 000 (`KernelBug` ``xsave-out-of-bounds``). ``what`` names it
    in messages: a string, or the fpstate whose image it is (named "fpstate #<ident>" only when
    a message needs it)."""

    __slots__ = ("_what", "addr", "regs")

    def __init__(self, regs: bytearray, what: object) -> None:
        self.regs = regs
        self.addr = 0
        self._what = what

    @property
    def what(self) -> str:
        w = self._what
        return w if isinstance(w, str) else f"fpstate #{w.ident}"  # type: ignore[attr-defined]

    def check(self, spans: Iterable[tuple[int, int]], write: bool = False) -> Fault | None:
        for off, n in spans:
            if off + n > len(self.regs):
                raise KernelBug("xsave-out-of-bounds",
                                f"{self.what}: bytes {off}..{off + n} of a {len(self.regs)}-byte "
                                "buffer")
        return None

    def read(self, off: int, n: int) -> bytes:
        return bytes(self.regs[off:off + n])

    def write(self, off: int, data: bytes) -> None:
        self.regs[off:off + len(data)] = data


class UserBuf(Buf):
    """A user buffer at ``addr``; ``faults_enabled`` False models pagefault_disable();
    ``pkru`` is the PKRU the accesses run under (the CPU's register: protection keys apply to
    the kernel's accesses to user memory too)."""

    __slots__ = ("addr", "faults_enabled", "mem", "pkru")

    def __init__(self, mem: UserMemory, addr: int, *, faults_enabled: bool,
                 pkru: int = 0) -> None:
        self.mem = mem
        self.addr = addr
        self.faults_enabled = faults_enabled
        self.pkru = pkru

    def check(self, spans: Iterable[tuple[int, int]], write: bool = False) -> Fault | None:
        for off, n in spans:
            try:
                self.mem.probe(self.addr + off, n, faults_enabled=self.faults_enabled,
                               write=write, pkru=self.pkru)
            except PageFault as e:
                if e.pkey is not None:
                    return Fault("#PF", f"{e.addr:#x} (PK: key {e.pkey})")
                return Fault("#PF", f"{e.addr:#x}")
        return None

    def read(self, off: int, n: int) -> bytes:
        return self.mem.read(self.addr + off, n, faults_enabled=self.faults_enabled,
                             pkru=self.pkru)

    def write(self, off: int, data: bytes) -> None:
        self.mem.write(self.addr + off, data, faults_enabled=self.faults_enabled,
                       pkru=self.pkru)


# -- the register file --------------------------------------------------------------------------


@dataclass(slots=True)
class FpRegs:
    """The extended state of one logical CPU: component values, XINUSE, MXCSR, XCR0, IA32_XSS,
    IA32_XFD and IA32_XFD_ERR, and the CR4 bits that enable the FPU's instructions
    (`CR4_FPU_BITS`: set on every online CPU, clear from INIT until fpu__init_cpu())."""

    profile: CpuidProfile
    xcr0: int
    xss: int
    xsavec_supported: bool
    mxcsr_mask: int
    xfd: int = 0
    xfd_err: int = 0
    xinuse: int = 0
    mxcsr: int = MXCSR_DEFAULT
    values: dict[int, bytes] = field(default_factory=dict)
    cr4: int = CR4_FPU_BITS

    # -- sizes and offsets --

    def size(self, i: int) -> int:
        return self.profile.component(i).size

    def offset(self, i: int, xcomp_bv: int) -> int:
        """Standard offset when XCOMP_BV[63] = 0, else the compacted offset (SDM 13.4)."""
        if xcomp_bv & XCOMP_BV_COMPACTED_FORMAT:
            return compacted_offset(self.profile, xcomp_bv, i)
        return self.profile.component(i).offset

    def _spans(self, i: int, off: int) -> list[tuple[int, int]]:
        if i == 0:  # the x87 area around MXCSR/MXCSR_MASK
            return [(0, MXCSR_OFFSET), (32, 128)]
        return [(off, self.size(i))]

    # -- what instructions do to the registers --

    def component(self, i: int) -> bytes:
        """The current value of component ``i`` (its init value when not in use)."""
        return self.values.get(i) or init_value(i, self.profile.component(i).size)

    def enabled(self) -> int:
        return self.xcr0 | self.xss

    def user_write(self, i: int, value: bytes) -> Fault | None:
        """A user instruction writing component ``i`` (VMOVDQU, KMOVQ, LDTILECFG, TILELOADD...).

        #UD if XCR0[i] = 0 (the instruction is not enabled); #NM with XFD_ERR set if the
        component is armed in IA32_XFD. A write of TILECFG is LDTILECFG, which the SDM
        (13.14, "Extended Feature Disable") exempts: "LDTILECFG and TILERELEASE initialize the
        TILEDATA state component. An execution of either of these instructions does not
        generate #NM when XCR0[18] = IA32_XFD[18] = 1; instead, it initializes TILEDATA
        normally." So LDTILECFG loads TILECFG and puts TILEDATA in its initial state, armed
        or not; the first TILEDATA access (TILELOADD, TILEZERO...) takes the #NM.
        """
        if i >= 2 and not (self.xcr0 >> i) & 1:
            return Fault("#UD", f"XCR0[{i}] = 0")
        mask = 1 << i
        if self.xfd & mask:
            self.xfd_err |= mask
            return Fault("#NM", f"IA32_XFD[{i}] = 1")
        if i == PKRU:  # WRPKRU: a 32-bit register
            self.wrpkru(int.from_bytes(value[:4], "little"))
            return None
        self.set_component(i, value)
        if mask == XFEATURE_MASK_XTILE_CFG:
            self.init_components(XFEATURE_MASK_XTILE_DATA)
        return None

    def wrpkru(self, pkru: int) -> None:
        """WRPKRU (SDM Vol. 2B; the kernel's write_pkru()): PKRU := ``pkru``. XINUSE[PKRU] as
        this CPU's vendor tracks it (`pkru_tracks_value`): set by every write, or set exactly
        when the value is not 0 (AMD)."""
        if not pkru and pkru_tracks_value(self.profile):
            self.values.pop(PKRU, None)
            self.xinuse &= ~XFEATURE_MASK_PKRU
            return
        self.values[PKRU] = pkru_bytes(pkru)
        self.xinuse |= XFEATURE_MASK_PKRU

    def set_component(self, i: int, value: bytes) -> None:
        """Load component ``i`` with ``value`` (kernel WRMSR to an XSAVES-managed MSR, or the
        architectural effect of a user write)."""
        assert len(value) == self.profile.component(i).size, (i, len(value))
        if i == 0:
            value = value[:MXCSR_OFFSET] + bytes(8) + value[32:]
        self.values[i] = bytes(value)
        self.xinuse |= 1 << i

    def init_components(self, mask: int) -> None:
        """Put the components of ``mask`` in their initial configuration (TILERELEASE for
        XTILE, VZEROUPPER-like effects)."""
        for i in bits(mask):
            self.values.pop(i, None)
        self.xinuse &= ~mask
        if mask & XFEATURE_MASK_SSE:
            self.mxcsr = MXCSR_DEFAULT

    def reset(self) -> None:
        """Power-up or RESET (SDM Vol. 3A, 10.1.1, Table 10-1, as after S3): CR4 0, XCR0 1
        (x87 only), IA32_XSS, IA32_XFD, IA32_XFD_ERR and PKRU 0, MXCSR 1F80H, every other
        component in its initial configuration. x87 is kept initial too although FCW powers up
        as 0040H, not FNINIT's 037FH: the kernel's next XRSTOR of a task (RFBM always has x87)
        replaces it before anything can read it."""
        self.values.clear()
        self.xinuse = 0
        self.mxcsr = MXCSR_DEFAULT
        self.xcr0 = XFEATURE_MASK_FP
        self.xss = self.xfd = self.xfd_err = 0
        self.cr4 = 0

    def fninit(self) -> None:
        """FNINIT (SDM Vol. 2A): FCW = 037FH, FSW = 0, every register tagged empty, FOP, FIP
        and FDP 0. R0-R7 keep their bits, tagged empty, which XSAVE does not record: after
        FNINIT XINUSE[0] is 0 (measured, fpstate.x86.impl WRITE_XINUSE), so the x87 value is
        its initial configuration."""
        self.init_components(XFEATURE_MASK_FP)

    def set_mxcsr(self, value: int) -> Fault | None:
        """LDMXCSR (SDM Vol. 2B): #UD if CR4.OSFXSR = 0, then #GP on reserved bits (those
        clear in MXCSR_MASK)."""
        if not self.cr4 & X86_CR4_OSFXSR:
            return Fault("#UD", "LDMXCSR with CR4.OSFXSR = 0")
        if value & ~self.mxcsr_mask:
            return Fault("#GP", f"MXCSR {value:#x} sets reserved bits")
        self.mxcsr = value
        if value != MXCSR_DEFAULT:
            self.xinuse |= XFEATURE_MASK_SSE
        return None

    def xgetbv1(self) -> int:
        """XGETBV(ECX=1): XINUSE & (XCR0 | IA32_XSS) (SDM 13.6)."""
        return self.xinuse & (self.xcr0 | self.xss)

    def snapshot(self) -> dict[int, bytes]:
        """Every enabled component's value (init bytes where not in use), MXCSR as key -1."""
        out = {i: self.component(i) for i in bit_tuple(self.xcr0 | self.xss)}
        out[-1] = self.mxcsr.to_bytes(4, "little")
        return out

    # -- XSAVE family --

    def _plan(self, comps: int, xcomp_bv: int, span_hdr: int, span_mxcsr: int) -> _Plan:
        """The spans (``span_hdr`` bytes of header if any, then each component of ``comps`` in
        ascending order, then ``span_mxcsr`` bytes of MXCSR if any) and the (number, offset,
        size, init value) of each component an XSAVE or XRSTOR of ``comps`` touches, memoised
        per profile (the layout is a pure function of it). Offsets and sizes are asked in the
        order the instructions ask, so a component the profile lacks raises what it always
        raised (nothing is memoised then)."""
        key = (comps, xcomp_bv, span_hdr, span_mxcsr)
        got = _PROFILE_MEMOS.get(id(self.profile))
        memo = got[1] if got is not None and got[0] is self.profile \
            else _profile_memo(self.profile)
        plan = memo.get(key)
        if plan is None:
            spans = [(HDR, span_hdr)] if span_hdr else []
            parts = []
            for i in bit_tuple(comps):
                off = self.offset(i, xcomp_bv)
                spans += self._spans(i, off)
                size = self.size(i)
                parts.append((i, off, size, init_value(i, size)))
            if span_mxcsr:
                spans.append((MXCSR_OFFSET, span_mxcsr))
            end = max((o + n for o, n in spans), default=0)
            if len(memo) >= 1 << 14:
                memo.clear()
            plan = memo[key] = (tuple(spans), tuple(parts), end)
        return plan

    def xsave(self, buf: Buf, mask: int, insn: str) -> Fault | None:
        """XSAVE/XSAVEOPT (standard) and XSAVEC/XSAVES (compacted) of RFBM = mask & XCR0
        (& (XCR0|XSS) for XSAVES) to ``buf``; #UD if CR4.OSXSAVE = 0 (Vol. 2D XSAVE).

        Components with XFD set are saved as if in their initial configuration (13.14).
        XSAVE writes every RFBM component; XSAVEOPT, XSAVEC and XSAVES write only those in use
        (init optimisation; the modified optimisation is not modelled). Standard forms update
        XSTATE_BV only for RFBM bits; compacted forms write XSTATE_BV = XINUSE & RFBM and
        XCOMP_BV = RFBM | bit 63 (header bytes 16..63 untouched). MXCSR is written when RFBM
        has SSE or AVX (standard) or with the SSE component (compacted).
        """
        assert insn in ("XSAVE", "XSAVEOPT", "XSAVEC", "XSAVES"), insn
        if not self.cr4 & X86_CR4_OSXSAVE:
            return Fault("#UD", f"{insn} with CR4.OSXSAVE = 0")
        if buf.addr % 64:
            return Fault("#GP", f"{insn} area {buf.addr:#x} not 64-byte aligned")
        rfbm = mask & ((self.xcr0 | self.xss) if insn == "XSAVES" else self.xcr0)
        inuse = self.xinuse & ~self.xfd & rfbm
        compacted = insn in ("XSAVEC", "XSAVES")
        xcomp_bv = (rfbm | XCOMP_BV_COMPACTED_FORMAT) if compacted else 0
        written = rfbm if insn == "XSAVE" else inuse
        # Standard: MXCSR whenever RFBM[1] or RFBM[2] (host finding 2); compacted: MXCSR is
        # part of the SSE component, written with it.
        mxcsr = bool(rfbm & _MXCSR_OR_AVX) if not compacted else bool(inuse & XFEATURE_MASK_SSE)
        spans, parts, end = self._plan(written, xcomp_bv, 16 if compacted else 8,
                                       8 if mxcsr else 0)
        # A kernel buffer the whole save fits in cannot fault (KernelBuf.check); nor can a user
        # buffer whose [0, end) lies in one present region (UserBuf.check).
        fast = type(buf) is KernelBuf and end <= len(buf.regs)  # type: ignore[attr-defined]
        mem = buf.mem if not fast and type(buf) is UserBuf else None  # type: ignore[attr-defined]
        if mem is not None and (not mem.fits(buf.addr, end)
                                or (buf.pkru and mem.pkeys)):  # type: ignore[attr-defined]
            mem = None
        if not fast and mem is None:
            fault = buf.check(spans, write=True)
            if fault:
                return fault
        values = self.values
        if mem is not None:  # as UserBuf.write, with the checks above done once
            at = buf.addr
            for i, off, _size, init in parts:
                value = (values.get(i) if (inuse >> i) & 1 else None) or init
                if i == 0:
                    part = value[:MXCSR_OFFSET]
                    mem._put(at, part, len(part))
                    part = value[32:]
                    mem._put(at + 32, part, len(part))
                else:
                    mem._put(at + off, value, len(value))
        elif fast:
            regs = buf.regs  # type: ignore[attr-defined]
            for i, off, _size, init in parts:
                value = (values.get(i) if (inuse >> i) & 1 else None) or init
                if i == 0:  # as KernelBuf.write(0, ...) and (32, ...)
                    part = value[:MXCSR_OFFSET]
                    regs[0:len(part)] = part
                    part = value[32:]
                    regs[32:32 + len(part)] = part
                else:
                    regs[off:off + len(value)] = value
        else:
            for i, off, _size, init in parts:
                value = (values.get(i) if (inuse >> i) & 1 else None) or init
                if i == 0:
                    buf.write(0, value[:MXCSR_OFFSET])
                    buf.write(32, value[32:])
                else:
                    buf.write(off, value)
        if mxcsr:
            buf.write(MXCSR_OFFSET, self.mxcsr.to_bytes(4, "little")
                      + self.mxcsr_mask.to_bytes(4, "little"))
        if compacted:
            buf.write(HDR, inuse.to_bytes(8, "little") + xcomp_bv.to_bytes(8, "little"))
        else:
            old = int.from_bytes(buf.read(HDR, 8), "little")
            buf.write(HDR, ((old & ~rfbm) | inuse).to_bytes(8, "little"))
        return None

    def xrstor(self, buf: Buf, mask: int, insn: str) -> Fault | None:
        """XRSTOR (standard or compacted form by XCOMP_BV[63]) or XRSTORS from ``buf``.

        Checks in the SDM's order (13.8, 13.12), all before any state changes: #UD if
        CR4.OSXSAVE = 0 (Vol. 2D XRSTOR, "Protected Mode Exceptions"); alignment;
        XRSTORS needs the compacted form; compacted: XCOMP_BV bits outside XCR0 (| XSS for
        XRSTORS), XSTATE_BV bits outside XCOMP_BV, header bytes 16..63 nonzero; standard:
        XSTATE_BV bits outside XCR0, header bytes 8..23 nonzero; then MXCSR reserved bits when
        MXCSR is loaded; then #NM, with IA32_XFD_ERR set, for a component of RFBM whose
        XSTATE_BV bit is set while IA32_XFD arms it (SDM 13.14; fpstate.x86.insn agrees). For i
        in RFBM: XSTATE_BV[i] = 1 loads the component, XSTATE_BV[i] = 0 initialises it.
        """
        assert insn in ("XRSTOR", "XRSTORS"), insn
        if not self.cr4 & X86_CR4_OSXSAVE:
            return Fault("#UD", f"{insn} with CR4.OSXSAVE = 0")
        if buf.addr % 64:
            return Fault("#GP", f"{insn} area {buf.addr:#x} not 64-byte aligned")
        kregs = buf.regs if type(buf) is KernelBuf else None  # type: ignore[attr-defined]
        if kregs is not None and HDR + 64 <= len(kregs):
            header = bytes(kregs[HDR:HDR + 64])
        else:
            kregs = None
            fault = buf.check([(HDR, 64)])
            if fault:
                return fault
            header = buf.read(HDR, 64)
        xstate_bv = int.from_bytes(header[0:8], "little")
        xcomp_bv = int.from_bytes(header[8:16], "little")
        compacted = bool(xcomp_bv & XCOMP_BV_COMPACTED_FORMAT)
        allowed = (self.xcr0 | self.xss) if insn == "XRSTORS" else self.xcr0
        rfbm = mask & allowed
        if insn == "XRSTORS" and not compacted:
            return Fault("#GP", "XRSTORS with XCOMP_BV[63] = 0")
        if compacted:
            if not self.xsavec_supported:
                return Fault("#GP", "compacted form without XSAVEC support")
            if xcomp_bv & ~XCOMP_BV_COMPACTED_FORMAT & ~allowed:
                return Fault("#GP", f"XCOMP_BV {xcomp_bv:#x} has bits outside "
                                    f"{'XCR0|XSS' if insn == 'XRSTORS' else 'XCR0'}")
            if xstate_bv & ~(xcomp_bv & ~XCOMP_BV_COMPACTED_FORMAT):
                # XSTATE_BV[63] = 1 faults too (measured on the host: fpstate.x86.impl
                # COMPACTED_XSTATE_BV63 = "gp")
                return Fault("#GP", f"XSTATE_BV {xstate_bv:#x} has bits outside XCOMP_BV")
            if int.from_bytes(header[16:64], "little"):
                return Fault("#GP", "header bytes 16..63 not zero")
        else:
            if xstate_bv & ~self.xcr0:
                return Fault("#GP", f"XSTATE_BV {xstate_bv:#x} has bits outside XCR0 "
                                    f"{self.xcr0:#x}")
            if int.from_bytes(header[8:24], "little"):
                return Fault("#GP", "header bytes 8..23 not zero")
        armed = rfbm & xstate_bv & self.xfd
        load = rfbm & xstate_bv & ~armed
        # Standard form: MXCSR whenever RFBM[1] or RFBM[2], whatever XSTATE_BV; compacted
        # form: with the SSE component only, else 1F80H if RFBM[1], else unchanged (host
        # finding 16: no #GP for a reserved bit that is not loaded).
        load_mxcsr = bool(rfbm & _MXCSR_OR_AVX) if not compacted \
            else bool(load & XFEATURE_MASK_SSE)
        spans, parts, end = self._plan(load, xcomp_bv, 0, 4 if load_mxcsr else 0)
        # A kernel buffer the whole restore fits in cannot fault (KernelBuf.check).
        if kregs is None or end > len(kregs):
            kregs = None
            fault = buf.check(spans)
            if fault:
                return fault
        mxcsr = None
        if load_mxcsr:
            mxcsr = int.from_bytes(buf.read(MXCSR_OFFSET, 4), "little")
            if mxcsr & ~self.mxcsr_mask:
                return Fault("#GP", f"MXCSR {mxcsr:#x} sets reserved bits")
        if armed:
            self.xfd_err |= armed
            return Fault("#NM", f"IA32_XFD arms {armed:#x}, which XSTATE_BV loads")
        values = self.values
        if values:  # the components of RFBM go to init first (those loaded come back below)
            for i in [i for i in values if 0 <= i < 64 and (rfbm >> i) & 1]:
                del values[i]
        self.xinuse &= ~rfbm
        for i, off, size, init in parts:
            if i == 0:
                if kregs is not None:
                    value = bytes(kregs[0:MXCSR_OFFSET]) + bytes(8) + bytes(kregs[32:160])
                else:
                    value = buf.read(0, MXCSR_OFFSET) + bytes(8) + buf.read(32, 128)
            elif kregs is not None:
                value = bytes(kregs[off:off + size])
            else:
                value = buf.read(off, size)
            if value != init:  # loaded init values: not in use
                values[i] = value
                self.xinuse |= 1 << i
        if mxcsr is not None:
            self.mxcsr = mxcsr
        elif compacted and rfbm & XFEATURE_MASK_SSE:
            self.mxcsr = MXCSR_DEFAULT
        if self.mxcsr != MXCSR_DEFAULT:
            self.xinuse |= XFEATURE_MASK_SSE
        return None

    def fxsave(self, buf: Buf) -> Fault | None:
        """FXSAVE64 (SDM Vol. 2A, FXSAVE; the kernel's fxsave() on x86-64): the x87 state,
        MXCSR and MXCSR_MASK, and XMM0-15 into a 512-byte legacy area, as they are: no init
        optimisation, no XSAVE header. Bytes 416..511 are not written (464..511 are
        software's: a signal frame's struct _fpx_sw_bytes). #GP unless 16-byte aligned."""
        if buf.addr % 16:
            return Fault("#GP", f"FXSAVE area {buf.addr:#x} not 16-byte aligned")
        fault = buf.check([(0, 416)], write=True)
        if fault:
            return fault
        x87 = self.component(0)
        buf.write(0, x87[:MXCSR_OFFSET] + self.mxcsr.to_bytes(4, "little")
                  + self.mxcsr_mask.to_bytes(4, "little") + x87[32:160])
        buf.write(160, self.component(1))
        return None

    def fxrstor_legacy(self, buf: Buf) -> Fault | None:
        """FXRSTOR64 (the fx_only sigreturn path): x87 and XMM0-15 and MXCSR from 512 bytes;
        #GP on MXCSR reserved bits. As XRSTOR, loaded init values are not in use."""
        if buf.addr % 16:
            return Fault("#GP", f"FXRSTOR area {buf.addr:#x} not 16-byte aligned")
        fault = buf.check([(0, 512)])
        if fault:
            return fault
        mxcsr = int.from_bytes(buf.read(MXCSR_OFFSET, 4), "little")
        if mxcsr & ~self.mxcsr_mask:
            return Fault("#GP", f"MXCSR {mxcsr:#x} sets reserved bits")
        self.init_components(0b11)
        x87 = buf.read(0, MXCSR_OFFSET) + bytes(8) + buf.read(32, 128)
        xmm = buf.read(160, 256)
        if x87 != init_value(0, 160):
            self.values[0] = x87
            self.xinuse |= 1
        if xmm != init_value(1, 256):
            self.values[1] = xmm
            self.xinuse |= 2
        self.mxcsr = mxcsr
        if mxcsr != MXCSR_DEFAULT:
            self.xinuse |= XFEATURE_MASK_SSE
        return None


__all__ = ["CR4_FPU_BITS", "HDR", "MXCSR", "MXCSR_INIT", "MXCSR_OFFSET", "PAGE_SIZE",
           "X86_CR4_OSFXSR", "X86_CR4_OSXMMEXCPT", "X86_CR4_OSXSAVE", "Buf", "FpRegs",
           "KernelBuf", "PageFault", "UserBuf", "UserMemory", "init_value", "mxcsr_token",
           "next_mxcsr_token", "read_mxcsr_token", "read_token", "token"]
