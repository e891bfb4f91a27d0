"""Encoding a program's instructions for the real CPU with iced-x86.

Rules of this file:
- every instruction is encoded one at a time at its final address (`Asm`), so the address of
  each program instruction is known: the runner checks a fault's RIP against it;
- memory operands are ``[rbx + disp32]`` (rbx holds the base of the runner's arena), always
  with a 32-bit displacement, so that encodings (and hence the x87 FOP of FLD, whose low byte
  is the ModRM byte) do not depend on where the runner put the operand;
- the operands of `fpstate.x86.program.Insn` map to registers exactly as the SDM's
  instruction pages name them: EDX:EAX = ``mask`` for the XSAVE family, ECX = ``reg`` and
  EDX:EAX = ``value`` for XSETBV, ECX = ``reg`` for XGETBV, ECX = 0 and EDX:EAX = ``value`` for
  WRPKRU (so a value of 2**32 or more gives WRPKRU's #GP for EDX != 0), ECX = 0 for RDPKRU;
- TILELOADD and TILESTORED (`emit_tile_move`) take their stride from the tile's bytes per row
  in the *current* configuration: STTILECFG to a 64-byte scratch area, then MOVZX ECX from its
  colsb word, then the move with ``[rbx + rcx*1 + disp32]``.

64-bit forms are used throughout (XSAVE64, FXSAVE64, ...): FIP and FDP are 64-bit fields;
FXSAVE32, FXRSTOR32, XSAVE32, XSAVEOPT32, XSAVEC32 and XRSTOR32 are the forms without REX.W
(32-bit FIP/FDP with FCS/FDS).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from iced_x86 import Code, Encoder, Instruction, MemoryOperand, Register

from fpstate.x86.program import Insn, Placement

_DISP32 = 8  # iced-x86's displ_size meaning "32-bit displacement" in 64-bit code

#: The 64-bit XSAVE family: mnemonic -> iced-x86 code (0F AE /4, /6, C7 /4, C7 /5, AE /5, C7 /3).
XSAVE_CODES = {
    "XSAVE": Code.XSAVE64_MEM,
    "XSAVEOPT": Code.XSAVEOPT64_MEM,
    "XSAVEC": Code.XSAVEC64_MEM,
    "XSAVES": Code.XSAVES64_MEM,
    "XRSTOR": Code.XRSTOR64_MEM,
    "XRSTORS": Code.XRSTORS64_MEM,
    "FXSAVE": Code.FXSAVE64_M512BYTE,
    "FXRSTOR": Code.FXRSTOR64_M512BYTE,
    # without REX.W: the 32-bit FIP/FCS/FDP/FDS layout of the legacy area
    "FXSAVE32": Code.FXSAVE_M512BYTE,
    "FXRSTOR32": Code.FXRSTOR_M512BYTE,
    "XSAVE32": Code.XSAVE_MEM,
    "XSAVEOPT32": Code.XSAVEOPT_MEM,
    "XSAVEC32": Code.XSAVEC_MEM,
    "XRSTOR32": Code.XRSTOR_MEM,
}
#: Register loads from memory: mnemonic -> (code, first register of the file).
LOAD_CODES = {
    "MOVDQU": (Code.MOVDQU_XMM_XMMM128, Register.XMM0),
    "VMOVDQU": (Code.VEX_VMOVDQU_YMM_YMMM256, Register.YMM0),
    "VMOVDQU64": (Code.EVEX_VMOVDQU64_ZMM_K1Z_ZMMM512, Register.ZMM0),
    "KMOVQ": (Code.VEX_KMOVQ_KR_KM64, Register.K0),
}
#: Tile rows to or from memory with a stride (SIB addressing, the index register is the stride).
TILE_MOVES = {
    "TILELOADD": Code.VEX_TILELOADD_TMM_SIBMEM,
    "TILESTORED": Code.VEX_TILESTORED_SIBMEM_TMM,
}
#: Memory-operand instructions without a register: mnemonic -> code.
MEM_CODES = {
    "FLD": Code.FLD_M80FP,
    "FLDCW": Code.FLDCW_M2BYTE,
    "LDMXCSR": Code.LDMXCSR_M32,
    "LDTILECFG": Code.VEX_LDTILECFG_M512,
    "STTILECFG": Code.VEX_STTILECFG_M512,
    "STMXCSR": Code.STMXCSR_M32,
    "FNSTSW": Code.FNSTSW_M2BYTE,
    "FNSTCW": Code.FNSTCW_M2BYTE,
}
NO_OPERAND_CODES = {
    "VZEROUPPER": Code.VEX_VZEROUPPER,
    "VZEROALL": Code.VEX_VZEROALL,
    "FNINIT": Code.FNINIT,
    "FNCLEX": Code.FNCLEX,
    "FLDZ": Code.FLDZ,
    "FLD1": Code.FLD1,
    "EMMS": Code.EMMS,
    "TILERELEASE": Code.VEX_TILERELEASE,
}
#: Instructions whose result is appended to Outcome.values.
VALUE_MNEMONICS = frozenset({"XGETBV", "RDPKRU", "STMXCSR", "FNSTSW", "FNSTCW"})


def mem(disp: int, index: int = Register.NONE) -> MemoryOperand:
    """``[rbx + index + disp32]``."""
    return MemoryOperand(Register.RBX, index, 1, disp, _DISP32)


class Asm:
    """Machine code built instruction by instruction at a known base address."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.code = bytearray()
        self._enc = Encoder(64)

    @property
    def here(self) -> int:
        """Address of the next instruction."""
        return self.base + len(self.code)

    def emit(self, instruction: Instruction) -> int:
        """Append one instruction; return its address."""
        at = self.here
        self._enc.encode(instruction, at)
        self.code += self._enc.take_buffer()
        return at

    def op(self, code: int) -> int:
        return self.emit(Instruction.create(code))

    def mov32(self, reg: int, value: int) -> None:
        self.emit(Instruction.create_reg_u32(Code.MOV_R32_IMM32, reg, value & 0xFFFFFFFF))

    def mov64(self, reg: int, value: int) -> None:
        self.emit(Instruction.create_reg_u64(Code.MOV_R64_IMM64, reg, value))

    def edx_eax(self, value: int) -> None:
        """EDX:EAX = value (a 64-bit instruction mask or XCR value)."""
        self.mov32(Register.EAX, value)
        self.mov32(Register.EDX, value >> 32)

    def store_imm(self, disp: int, value: int) -> None:
        """qword [rbx + disp] = value (sign-extended imm32)."""
        self.emit(Instruction.create_mem_i32(Code.MOV_RM64_IMM32, mem(disp), value))

    def store32(self, disp: int, reg: int) -> None:
        self.emit(Instruction.create_mem_reg(Code.MOV_RM32_R32, mem(disp), reg))

    def store64(self, disp: int, reg: int) -> None:
        self.emit(Instruction.create_mem_reg(Code.MOV_RM64_R64, mem(disp), reg))

    def load64(self, reg: int, disp: int) -> None:
        self.emit(Instruction.create_reg_mem(Code.MOV_R64_RM64, reg, mem(disp)))

    def lea(self, reg: int, disp: int) -> None:
        self.emit(Instruction.create_reg_mem(Code.LEA_R64_M, reg, mem(disp)))

    def syscall(self, number: int, *args: int) -> None:
        """syscall(number, args...) with immediate arguments (rdi, rsi, rdx, r10)."""
        regs = (Register.RDI, Register.RSI, Register.RDX, Register.R10)
        for reg, value in zip(regs, args, strict=False):
            self.mov64(reg, value)
        self.mov32(Register.EAX, number)
        self.op(Code.SYSCALL)

    def branch(self, code: int, target: int) -> None:
        self.emit(Instruction.create_branch(code, target))


@dataclass(frozen=True, slots=True)
class Operands:
    """Where the runner put an instruction's memory operands (arena displacements from rbx)."""

    buf: int = 0  #: the buffer (already including its misalignment)
    data: int = 0  #: the instruction's ``data`` (or packed ``value``) in the data pool
    value: int = 0  #: the value slot (8 bytes, zeroed) for instructions in VALUE_MNEMONICS
    scratch: int = 0  #: 64 bytes where TILELOADD/TILESTORED read the tile's bytes per row


#: Legacy prefixes (SDM Vol. 2A 2.1.1) and REX: FOP takes the opcode bytes after them.
_PREFIXES = frozenset((0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67,
                       *range(0x40, 0x50)))


def placement(code: bytes | bytearray, base: int, address: int, operand: int,
              selectors: tuple[int, int] | None = None) -> Placement:
    """Where an emitted instruction ran (`fpstate.x86.program.Placement`): ``address`` (in
    ``code``, which starts at ``base``), its data-pool operand's address, for an x87 escape
    opcode (D8-DF after the prefixes) its FOP: the opcode's low 3 bits, then the next byte
    (SDM Vol. 1 8.1.9), and the (CS, DS) ``selectors`` it ran with where the caller read
    them."""
    at = address - base
    while code[at] in _PREFIXES:
        at += 1
    fop = (code[at] & 7) << 8 | code[at + 1] if 0xD8 <= code[at] <= 0xDF else 0
    cs, ds = selectors if selectors is not None else (None, None)
    return Placement(address, operand, fop, cs, ds)


def emit_insn(asm: Asm, insn: Insn, ops: Operands) -> int:
    """Emit the set-up of ``insn``'s implicit registers, the instruction, and the store of its
    value. Returns the address of the program instruction itself (the one that may fault)."""
    m = insn.mnemonic
    if m in XSAVE_CODES:
        if not m.startswith("FX"):
            asm.edx_eax(insn.mask)
        return asm.emit(Instruction.create_mem(XSAVE_CODES[m], mem(ops.buf)))
    if m == "XGETBV":
        asm.mov32(Register.ECX, insn.reg)
        at = asm.op(Code.XGETBV)
        asm.store32(ops.value, Register.EAX)
        asm.store32(ops.value + 4, Register.EDX)
        return at
    if m == "XSETBV":
        asm.mov32(Register.ECX, insn.reg)
        asm.edx_eax(insn.value)
        return asm.op(Code.XSETBV)
    if m == "WRPKRU":
        asm.mov32(Register.ECX, 0)
        asm.edx_eax(insn.value)
        return asm.op(Code.WRPKRU)
    if m == "RDPKRU":
        asm.mov32(Register.ECX, 0)
        at = asm.op(Code.RDPKRU)
        asm.store32(ops.value, Register.EAX)
        return at
    if m in LOAD_CODES:
        code, first = LOAD_CODES[m]
        return asm.emit(Instruction.create_reg_mem(code, first + insn.reg, mem(ops.data)))
    if m in TILE_MOVES:
        return emit_tile_move(asm, insn, ops)[-1]
    if m == "TILEZERO":
        return asm.emit(Instruction.create_reg(Code.VEX_TILEZERO_TMM, Register.TMM0 + insn.reg))
    if m in MEM_CODES:
        if m == "STTILECFG":
            disp = ops.buf
        elif m in VALUE_MNEMONICS:
            disp = ops.value
        else:
            disp = ops.data
        return asm.emit(Instruction.create_mem(MEM_CODES[m], mem(disp)))
    assert m in NO_OPERAND_CODES, f"no encoding for {m}"
    return asm.op(NO_OPERAND_CODES[m])


def emit_tile_move(asm: Asm, insn: Insn, ops: Operands) -> tuple[int, int]:
    """TILELOADD tmm, [rbx + rcx*1 + data] or TILESTORED [rbx + rcx*1 + buf], tmm with RCX =
    the bytes per row of tmm ``insn.reg`` in the current TILECFG: STTILECFG [scratch] and
    MOVZX ECX, word [scratch + 16 + 2 * reg] first (STTILECFG stores zeros when
    TILES_CONFIGURED = 0: the move then #UDs for that reason, not for its operand).
    Returns the addresses of the STTILECFG and of the move: either may fault (#UD without
    AMX at the first, AMX-E3 at the second)."""
    m = insn.mnemonic
    first = asm.emit(Instruction.create_mem(Code.VEX_STTILECFG_M512, mem(ops.scratch)))
    asm.emit(Instruction.create_reg_mem(Code.MOVZX_R32_RM16, Register.ECX,
                                        mem(ops.scratch + 16 + 2 * insn.reg)))
    tmm = Register.TMM0 + insn.reg
    if m == "TILELOADD":
        move = Instruction.create_reg_mem(TILE_MOVES[m], tmm, mem(ops.data, Register.RCX))
    else:
        assert m == "TILESTORED", m
        move = Instruction.create_mem_reg(TILE_MOVES[m], mem(ops.buf, Register.RCX), tmm)
    return first, asm.emit(move)


def operand_data(insn: Insn) -> bytes:
    """The memory operand an instruction loads from the runner's data pool: ``data``, or the
    16-bit FLDCW / 32-bit LDMXCSR value, or TILELOADD rows padded to 16 rows of 64 bytes (the
    most palette 1 can configure). Shared by the user-mode runner and the KVM guest runner."""
    m, data = insn.mnemonic, insn.data
    if m == "FLDCW":
        return struct.pack("<H", insn.value & 0xFFFF)
    if m == "LDMXCSR":
        return struct.pack("<I", insn.value & 0xFFFFFFFF)
    if m == "TILELOADD":
        return data.ljust(1024, b"\0")
    return data
