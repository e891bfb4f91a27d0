"""Instruction programs: the one question both the CPU model and the real CPU answer.

A `Program` is a short straight-line sequence of x86 instructions over a set of memory
buffers. The model (`fpstate.x86.insn.run_program`) and the host
(`fpstate.host.runner.run_program`) both take a `Program` and answer with an `Outcome`;
the differential tests compare the two byte for byte.

Theory of operation
-------------------
1. Every buffer is ``BUFFER_SIZE`` bytes at a 64-byte aligned address plus ``misalign``
   (to provoke the alignment #GP of XSAVE/XRSTOR), initialised with its ``data`` (zero
   filled to the end). A buffer with ``pkey`` k (1 to `MAX_PKEY`) lies on pages of its own
   with protection key k (pkey_mprotect; CPL 3 programs only): the program's PKRU decides
   whether its instructions may read (AD) and write (WD) it, and a denied access is #PF
   (SDM Vol. 3A 4.6.2). Key 0, every other page's, keeps its rights in every program.
2. Before the first instruction the register state is set by XRSTOR (standard form) of
   ``start`` with RFBM = XCR0: ``start`` is a standard-format XSAVE image whose XSTATE_BV
   says which components are loaded and which are put in their initial configuration. So a
   program's starting registers and XINUSE are known, whatever Python used the registers for.
3. The instructions run in order at CPL 3 (CPL 0 in a KVM guest). The first fault stops the
   program: `Outcome.fault` says which vector and `Outcome.fault_step` which instruction.
4. After the last instruction (if nothing faulted) XINUSE is read with XGETBV(1) where the CPU
   has it, and the registers of every XCR0 component are stored by XSAVE (standard form,
   RFBM = XCR0) into a zeroed image, normalised (`normalise_image`) so that a component whose
   XSTATE_BV bit is clear reads as its initial configuration.

Instructions
------------
``Insn.mnemonic`` is one of `MNEMONICS`. Operands by kind:

- XSAVE-family (XSAVE, XSAVEOPT, XSAVEC, XSAVES, XRSTOR, XRSTORS, FXSAVE, FXRSTOR):
  ``buf`` the buffer index, ``mask`` the instruction mask in EDX:EAX (RFBM = mask & (XCR0 |
  IA32_XSS for the S forms)). FXSAVE/FXRSTOR ignore ``mask``. All are the 64-bit (REX.W)
  forms; FXSAVE32, FXRSTOR32, XSAVE32, XSAVEOPT32, XSAVEC32 and XRSTOR32 are the same
  instructions without REX.W (`FORMS32`: 32-bit FIP and FDP with the FCS and FDS selectors,
  SDM Vol. 1 Table 10-2).
- XGETBV: ``reg`` is ECX; the value read is appended to `Outcome.values`.
- XSETBV: ``reg`` is ECX, ``value`` is EDX:EAX.
- Register loads take their source from ``data`` (placed in memory by the runner):
  MOVDQU (legacy SSE, xmm ``reg``, 16 bytes: bits 511:128 unchanged), VMOVDQU (VEX.256,
  ymm ``reg``, 32 bytes: bits 511:256 zeroed), VMOVDQU64 (EVEX.512, zmm ``reg``, 64
  bytes), KMOVQ (k ``reg``, 8 bytes), FLD (80-bit ``data``, pushed on the x87 stack),
  FLDCW (``value`` 16 bits), LDMXCSR (``value`` 32 bits, #GP on reserved bits), WRPKRU
  (``value``), LDTILECFG (64-byte ``data``), TILELOADD (tmm ``reg`` from ``data``, rows of
  the configured bytes-per-row, stride = bytes per row).
- No operands: VZEROUPPER, VZEROALL, FNINIT, FNCLEX, FLDZ and FLD1 (push +0.0 and +1.0),
  EMMS, TILERELEASE; TILEZERO takes tmm ``reg``.
- Stores append to `Outcome.values`: RDPKRU (EAX), STMXCSR (the 32-bit value), FNSTSW (AX),
  FNSTCW (the control word). STTILECFG stores into buffer ``buf`` at offset 0; TILESTORED
  stores tmm ``reg`` into buffer ``buf`` from offset 0: rows of the configured bytes-per-row,
  stride = bytes per row (as TILELOADD), bytes between and after them untouched.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from fpstate.errors import ProgramError

#: Bytes of every program buffer: room for the largest standard XSAVE area seen (AMX: 11008)
#: with slack for misalignment.
BUFFER_SIZE = 12288
MAX_BUFFERS = 8
#: The highest protection key a buffer may have (the runner allocates keys 1..MAX_PKEY).
MAX_PKEY = 3

#: The forms without REX.W: the legacy area's FIP and FDP as 32-bit offsets with the FCS and
#: FDS selectors (SDM Vol. 1 Table 10-2); every other mnemonic here is a 64-bit form.
FORMS32 = frozenset({"FXSAVE32", "FXRSTOR32", "XSAVE32", "XSAVEOPT32", "XSAVEC32", "XRSTOR32"})
XSAVE_FAMILY = frozenset(
    {"XSAVE", "XSAVEOPT", "XSAVEC", "XSAVES", "XRSTOR", "XRSTORS", "FXSAVE", "FXRSTOR"}
) | FORMS32
SAVES = frozenset({"XSAVE", "XSAVEOPT", "XSAVEC", "XSAVES", "FXSAVE", "FXSAVE32", "XSAVE32",
                   "XSAVEOPT32", "XSAVEC32"})
RESTORES = frozenset({"XRSTOR", "XRSTORS", "FXRSTOR", "FXRSTOR32", "XRSTOR32"})
SUPERVISOR_ONLY = frozenset({"XSAVES", "XRSTORS", "XSETBV"})

#: mnemonic -> (needs buf, needs reg range or None, data length or None)
_OPERANDS: dict[str, tuple[bool, tuple[int, int] | None, int | None]] = {
    **{m: (True, None, None) for m in XSAVE_FAMILY},
    "STTILECFG": (True, None, None),
    "TILESTORED": (True, (0, 7), None),
    "XGETBV": (False, (0, 0xFFFFFFFF), None),
    "XSETBV": (False, (0, 0xFFFFFFFF), None),
    "MOVDQU": (False, (0, 15), 16),
    "VMOVDQU": (False, (0, 15), 32),
    "VMOVDQU64": (False, (0, 31), 64),
    "KMOVQ": (False, (0, 7), 8),
    "FLD": (False, None, 10),
    "FLDCW": (False, None, None),
    "LDMXCSR": (False, None, None),
    "WRPKRU": (False, None, None),
    "LDTILECFG": (False, None, 64),
    "TILELOADD": (False, (0, 7), None),
    "TILEZERO": (False, (0, 7), None),
    "VZEROUPPER": (False, None, None),
    "VZEROALL": (False, None, None),
    "FNINIT": (False, None, None),
    "FNCLEX": (False, None, None),
    "FLDZ": (False, None, None),
    "FLD1": (False, None, None),
    "EMMS": (False, None, None),
    "TILERELEASE": (False, None, None),
    "RDPKRU": (False, None, None),
    "STMXCSR": (False, None, None),
    "FNSTSW": (False, None, None),
    "FNSTCW": (False, None, None),
}
MNEMONICS = frozenset(_OPERANDS)


@dataclass(frozen=True, slots=True)
class Insn:
    """One instruction of a program; see the module docstring for the operands of each."""

    mnemonic: str
    buf: int = -1
    mask: int = 0
    reg: int = 0
    value: int = 0
    data: bytes = b""

    def __str__(self) -> str:
        m = self.mnemonic
        if m == "TILESTORED":
            return f"{m} [buf{self.buf}], tmm{self.reg}"
        if m in XSAVE_FAMILY or m == "STTILECFG":
            return f"{m} [buf{self.buf}], {self.mask:#x}" if m[0] == "X" else f"{m} [buf{self.buf}]"
        if m in ("XGETBV", "XSETBV"):
            return f"{m} ecx={self.reg:#x}" + (f", {self.value:#x}" if m == "XSETBV" else "")
        if self.data:
            return f"{m} r{self.reg}, {self.data.hex()}"
        if m in ("FLDCW", "LDMXCSR", "WRPKRU"):
            return f"{m} {self.value:#x}"
        if m in ("TILEZERO", "TILELOADD"):
            return f"{m} tmm{self.reg}"
        return m


@dataclass(frozen=True, slots=True)
class Buffer:
    """A memory buffer: initial bytes (zero-filled to BUFFER_SIZE), its misalignment and the
    protection key of its pages (0: the default key)."""

    data: bytes = b""
    misalign: int = 0
    pkey: int = 0


@dataclass(frozen=True, slots=True)
class Program:
    """Starting image, buffers and instructions (see the module docstring)."""

    start: bytes
    insns: tuple[Insn, ...]
    buffers: tuple[Buffer, ...] = field(default_factory=tuple)
    cpl: int = 3


@dataclass(frozen=True, slots=True)
class Fault:
    """An architectural fault: the vector and the SDM rule that raised it."""

    vector: str  # "#GP", "#UD", "#NM", "#AC"
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.vector}({self.reason})" if self.reason else self.vector

    def same_vector(self, other: Fault | None) -> bool:
        return other is not None and other.vector == self.vector


@dataclass(frozen=True, slots=True)
class Placement:
    """Where the host runner put one program instruction, for the x87 pointers of a
    non-control x87 instruction (SDM Vol. 1 8.1.8, 8.1.9), which hold where it ran:
    ``address`` is its linear address (FIP: "the x87 FPU instruction pointer points to any
    prefixes that preceded the instruction"), ``operand`` the linear address of its memory
    operand in the data pool (FDP; 0 without one), ``fop`` its 11-bit opcode register value
    (the low 3 bits of its first opcode byte after the prefixes, then its second byte; 0 for
    an instruction that is not x87). ``cs`` and ``ds`` are the code and data segment selectors
    it ran with (FCS and FDS, which the 32-bit save forms store where the CPU does not zero
    them: SDM Vol. 1 8.1.8, Table 10-2), None where the runner did not read them."""

    address: int
    operand: int = 0
    fop: int = 0
    cs: int | None = None
    ds: int | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a program did: final buffers, values read, the fault, XINUSE and the registers.

    ``fault`` and ``fault_step`` are None when every instruction completed. ``xinuse`` is
    XGETBV(1) & XCR0 after the last instruction (None if faulted or without XGETBV1).
    ``final`` is the normalised standard image of the registers (None if faulted).
    Equality of outcomes ignores ``fault.reason`` (the CPU tells only the vector).
    ``placement`` (the host runner's outcomes only) says where each instruction ran: the
    model's `fpstate.x86.insn.run_program` takes it to know the x87 pointers an FLD leaves;
    it is not part of the outcome compared.
    """

    buffers: tuple[bytes, ...]
    values: tuple[int, ...] = ()
    fault: Fault | None = None
    fault_step: int | None = None
    xinuse: int | None = None
    final: bytes | None = None
    placement: tuple[Placement, ...] | None = field(default=None, compare=False)

    def key(self) -> tuple:
        """The comparable part: everything except the fault's prose."""
        return (
            self.buffers,
            self.values,
            self.fault.vector if self.fault else None,
            self.fault_step,
            self.xinuse,
            self.final,
        )

    def differences(self, other: Outcome) -> list[str]:
        """Human-readable list of what differs from ``other`` (empty when equal)."""
        out = []
        for i, (a, b) in enumerate(zip(self.buffers, other.buffers, strict=False)):
            if a != b:
                first = next(j for j in range(min(len(a), len(b))) if a[j] != b[j])
                out.append(f"buf{i} differs from byte {first:#x}")
        if self.values != other.values:
            mine, theirs = [hex(v) for v in self.values], [hex(v) for v in other.values]
            out.append(f"values {mine} != {theirs}")
        if (self.fault and self.fault.vector) != (other.fault and other.fault.vector) or (
            self.fault_step != other.fault_step
        ):
            out.append(f"fault {self.fault}@{self.fault_step} != {other.fault}@{other.fault_step}")
        if self.xinuse != other.xinuse:
            out.append(f"xinuse {self.xinuse!r:} != {other.xinuse!r}")
        if self.final != other.final:
            a, b = self.final or b"", other.final or b""
            n = min(len(a), len(b))
            first = next((j for j in range(n) if a[j] != b[j]), n)
            out.append(f"final registers differ from byte {first:#x}")
        return out


def check_program(program: Program) -> None:
    """Reject a malformed program with a ProgramError naming the instruction and the problem."""
    if len(program.buffers) > MAX_BUFFERS:
        raise ProgramError(f"{len(program.buffers)} buffers; at most {MAX_BUFFERS}")
    if len(program.start) < 576:
        raise ProgramError(f"start image is {len(program.start)} bytes; at least 576 needed")
    if len(program.start) > BUFFER_SIZE:
        raise ProgramError(f"start image is {len(program.start)} bytes; at most {BUFFER_SIZE}")
    if program.cpl not in (0, 3):
        raise ProgramError(f"cpl {program.cpl}: only 0 and 3")
    for i, b in enumerate(program.buffers):
        if not 0 <= b.misalign < 64:
            raise ProgramError(f"buf{i}: misalign {b.misalign} outside 0..63")
        if len(b.data) > BUFFER_SIZE - 64:
            raise ProgramError(f"buf{i}: {len(b.data)} bytes of data; at most {BUFFER_SIZE - 64}")
        if not 0 <= b.pkey <= MAX_PKEY:
            raise ProgramError(f"buf{i}: protection key {b.pkey} outside 0..{MAX_PKEY}")
        if b.pkey and program.cpl != 3:
            raise ProgramError(f"buf{i}: protection key {b.pkey} at CPL {program.cpl}: keyed "
                               "buffers are user pages of a CPL 3 program")
    for n, insn in enumerate(program.insns):
        where = f"instruction {n} ({insn.mnemonic})"
        if insn.mnemonic not in _OPERANDS:
            raise ProgramError(f"{where}: unknown mnemonic; known: {', '.join(sorted(MNEMONICS))}")
        needs_buf, reg_range, data_len = _OPERANDS[insn.mnemonic]
        if needs_buf and not 0 <= insn.buf < len(program.buffers):
            raise ProgramError(f"{where}: buffer {insn.buf} does not exist")
        if reg_range and not reg_range[0] <= insn.reg <= reg_range[1]:
            low, high = reg_range
            raise ProgramError(f"{where}: register {insn.reg} outside {low}..{high}")
        if data_len is not None and len(insn.data) != data_len:
            raise ProgramError(f"{where}: {len(insn.data)} bytes of data, {data_len} needed")
        if not 0 <= insn.mask < 1 << 64 or not 0 <= insn.value < 1 << 64:
            raise ProgramError(f"{where}: mask and value must be 64-bit unsigned")


def xstate_bv(image: bytes) -> int:
    """XSTATE_BV of a standard or compacted image (header at byte 512)."""
    return struct.unpack_from("<Q", image, 512)[0]


def xcomp_bv(image: bytes) -> int:
    """XCOMP_BV of an image (header at byte 520)."""
    return struct.unpack_from("<Q", image, 520)[0]
