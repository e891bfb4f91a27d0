"""ia32 (32-bit compat) signal frames on the real kernel: run a static 32-bit ELF under
IA32_EMULATION, catch SIGUSR1, and record the frame and what sigreturn restores.

Kernel path (arch/x86/kernel/signal_32.c, arch/x86/kernel/fpu/signal.c, regset.c):

* ``ia32_setup_frame`` (no SA_SIGINFO) builds ``struct sigframe_ia32`` = {pretcode, sig,
  struct sigcontext_32 sc, ...}; ``ia32_setup_rt_frame`` builds ``struct rt_sigframe_ia32`` =
  {pretcode, sig, pinfo, puc, compat_siginfo_t info (128), struct ucontext_ia32 uc, ...}.
  Either way the handler is entered with ESP = &pretcode, aligned so that (ESP + 4) % 16 == 0
  (``align_sigframe``), and ``sc.fpstate`` points at the FP state the kernel placed below it.
* ``fpu__alloc_mathframe``: the XSAVE image starts 64-aligned, and an ia32 frame puts a
  112-byte ``struct _fpstate_32`` (the "fsave header", ``struct fregs_state``) right before it;
  sc.fpstate points at that header. ``copy_fpstate_to_sigframe`` XSAVEs the registers (64-bit
  format: the kernel runs in long mode) and ``save_fsave_header`` fills the header from
  ``convert_from_fxsr`` (cw/sw | 0xffff0000, the full tag word of ``twd_fxsr_to_i387``,
  fip/foo from FXSAVE's rip/rdp, fcs = the user CS, fos = DS | 0xffff0000, the 8 registers),
  then ``status`` = FSW and ``magic`` = X86_FXSR_MAGIC (0). ``save_xstate_epilog`` writes
  ``struct _fpx_sw_bytes`` at fxsave+464 (extended_size = user_size + 4 + 112 for ia32) and
  FP_XSTATE_MAGIC2 at fxsave + user_size.
* sigreturn (``__ia32_sys_sigreturn`` / ``rt_sigreturn`` -> ``ia32_restore_sigcontext`` ->
  ``fpu__restore_sig(buf, 1)`` -> ``__fpu_restore_sig`` with ia32_fxstate): the XSAVE part is
  copied from the frame (``copy_sigframe_from_user_to_xstate``, which rejects MXCSR bits
  outside mxcsr_feature_mask), then ``convert_to_fxsr`` overwrites the x87 part (cwd, swd,
  twd, fop = fcs >> 16, rip = fip, rdp = foo, ST0-7) from the fsave header, and the result is
  XRSTORed. Any failure is a bad frame: ``signal_fault`` forces SIGSEGV.

The probe program is assembled with iced-x86 (32-bit BlockEncoder); its sections sit at fixed
addresses of one RWX PT_LOAD segment, so no section's address depends on another's length.
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fpstate.errors import HostUnavailable
from fpstate.host.signals import FxSwBytes

# -- kernel and architecture constants ---------------------------------------------------------

NR_SIGRETURN = 119  #: __NR_ia32_sigreturn (arch/x86/entry/syscalls/syscall_32.tbl)
NR_RT_SIGRETURN = 173
NR_RT_SIGACTION = 174
NR_GETPID = 20
NR_KILL = 37
NR_WRITE = 4
NR_EXIT_GROUP = 252
SIGUSR1 = 10
SA_SIGINFO = 0x4
SA_RESTORER = 0x04000000
UC_FP_XSTATE = 0x1  #: uc_flags of ia32_setup_rt_frame when the CPU has XSAVE

FP_XSTATE_MAGIC1 = 0x46505853
FP_XSTATE_MAGIC2 = 0x46505845
X86_FXSR_MAGIC = 0x0000  #: _fpstate_32.magic: the header is followed by an FXSAVE image

FREGS_STATE_SIZE = 112  #: sizeof(struct fregs_state) == sizeof(struct _fpstate_32) header
FXSAVE_AREA = FREGS_STATE_SIZE  #: offset of the 64-aligned XSAVE image from sc.fpstate
SW_BYTES = FXSAVE_AREA + 464  #: struct _fpx_sw_bytes inside fxregs_state.sw_reserved
SIGCONTEXT_32_SIZE = 88
SC_FPSTATE = 76  #: offsetof(struct sigcontext_32, fpstate)
UC_MCONTEXT = 20  #: offsetof(struct ucontext_ia32, uc_mcontext): flags, link, 12-byte stack
COMPAT_SIGINFO_SIZE = 128

#: Offsets (from sc.fpstate) into the fsave header, struct _fpstate_32.
HDR_CW, HDR_SW, HDR_TAG, HDR_IPOFF, HDR_CSSEL, HDR_DATAOFF, HDR_DATASEL = 0, 4, 8, 12, 16, 20, 24
HDR_ST = 28  #: _st[8], 10 bytes each
HDR_STATUS = 108
HDR_MAGIC = 110

#: Offsets (from sc.fpstate) into the FXSAVE part of the frame's XSAVE image.
FX_FCW = FXSAVE_AREA + 0
FX_MXCSR = FXSAVE_AREA + 24
FX_ST = FXSAVE_AREA + 32  #: 8 slots of 16 bytes
FX_XMM = FXSAVE_AREA + 160  #: 8 (compat mode sees 8) of 16 slots of 16 bytes
FX_YMM_HI = FXSAVE_AREA + 576  #: XSAVE component 2 at its standard offset

FRAME_CAP = 16384  #: most bytes the handler copies from sc.fpstate

# -- probe memory map -------------------------------------------------------------------------

_BASE = 0x08048000
_MAIN = _BASE + 0x100
_HANDLER = _BASE + 0x1000
_RESTORER = _BASE + 0x1800
_IMAGE = _BASE + 0x2000  #: 512-byte FXSAVE image (64-aligned)
_YMM_IN = _BASE + 0x2200  #: 8 x 16 bytes
_ACT = _BASE + 0x2300  #: compat struct sigaction
_PATCH = _BASE + 0x3000  #: patch payloads
_PATCH_MAX = 0x1000
_OUT = _BASE + 0x4000  #: zero-filled (memsz beyond filesz)

# Output block (written twice: by the handler, then by the main code after sigreturn).
_O_ESP, _O_FPSTATE, _O_UCFLAGS, _O_LEN, _O_RAN, _O_MAINESP, _O_SIGACTION = 0, 4, 8, 12, 16, 20, 24
_O_SC = 32
_O_SIGINFO = 128
_O_FXSAVE = 256
_O_FNSTENV = 768
_O_YMM = 800
_O_FRAME = 1024
_OUT_SIZE = _O_FRAME + FRAME_CAP


# -- images -----------------------------------------------------------------------------------

def x87(exponent: int, significand: int, sign: int = 0) -> bytes:
    """An 80-bit double-extended value (SDM Vol. 1 §4.2.2): 64-bit significand with explicit
    integer bit 63, 15-bit biased exponent, sign; 10 bytes little endian."""
    return struct.pack("<QH", significand & (2**64 - 1), (exponent & 0x7FFF) | (sign & 1) << 15)


def fxsave_image(*, fcw: int = 0x037F, fsw: int = 0, ftw: int = 0, fop: int = 0, fip: int = 0,
                 fcs: int = 0, fdp: int = 0, fds: int = 0, mxcsr: int = 0x1F80,
                 mxcsr_mask: int = 0, st: Sequence[bytes] = (),
                 xmm: Sequence[bytes] = ()) -> bytes:
    """A 512-byte FXSAVE image in the 32-bit (non-REX.W) format FXRSTOR reads in compat mode
    (SDM Vol. 1 §10.5.1, Table 10-2): FCW, FSW, abridged FTW (one bit per physical register,
    1 = not empty), FOP, FIP/FCS, FDP/FDS, MXCSR, MXCSR_MASK, ST0-7 in 16-byte slots (ST
    order, first 10 bytes significant), XMM0-7. Unlisted registers are zero."""
    if len(st) > 8 or len(xmm) > 8:
        raise ValueError("at most 8 ST and 8 XMM registers in a 32-bit FXSAVE image")
    img = bytearray(512)
    struct.pack_into("<HHBxHIHxxIHxxII", img, 0, fcw, fsw, ftw, fop, fip, fcs, fdp, fds,
                     mxcsr, mxcsr_mask)
    for i, value in enumerate(st):
        if len(value) != 10:
            raise ValueError(f"ST{i} must be 10 bytes")
        img[32 + 16 * i:42 + 16 * i] = value
    for i, value in enumerate(xmm):
        if len(value) != 16:
            raise ValueError(f"XMM{i} must be 16 bytes")
        img[160 + 16 * i:176 + 16 * i] = value
    return bytes(img)


@dataclass(frozen=True, slots=True)
class Fxsave32:
    """The legacy area of a 32-bit-format FXSAVE image (SDM Vol. 1 Table 10-2)."""

    fcw: int
    fsw: int
    ftw: int  #: abridged
    fop: int
    fip: int
    fcs: int
    fdp: int
    fds: int
    mxcsr: int
    mxcsr_mask: int
    st: tuple[bytes, ...]  #: 8 x first 10 bytes of each slot
    xmm: tuple[bytes, ...]  #: XMM0-7

    @classmethod
    def parse(cls, raw: bytes) -> Fxsave32:
        """Split a 512-byte 32-bit-format FXSAVE image into its fields."""
        fcw, fsw, ftw, fop, fip, fcs, fdp, fds, mxcsr, mask = struct.unpack_from(
            "<HHBxHIHxxIHxxII", raw, 0)
        return cls(fcw, fsw, ftw, fop, fip, fcs, fdp, fds, mxcsr, mask,
                   tuple(raw[32 + 16 * i:42 + 16 * i] for i in range(8)),
                   tuple(raw[160 + 16 * i:176 + 16 * i] for i in range(8)))


@dataclass(frozen=True, slots=True)
class FsaveHeader:
    """struct _fpstate_32's first 112 bytes (arch/x86/include/uapi/asm/sigcontext.h) as
    ``save_fsave_header`` writes them: the user_i387_ia32_struct from ``convert_from_fxsr``,
    then ``status`` (FSW) and ``magic``."""

    cw: int
    sw: int
    tag: int
    ipoff: int
    cssel: int
    dataoff: int
    datasel: int
    st: tuple[bytes, ...]  #: _st[0..7], 10 bytes each, ST order
    status: int
    magic: int

    @classmethod
    def parse(cls, raw: bytes) -> FsaveHeader:
        """Split the first 112 bytes at sc.fpstate into the header's fields."""
        cw, sw, tag, ipoff, cssel, dataoff, datasel = struct.unpack_from("<7I", raw, 0)
        status, magic = struct.unpack_from("<HH", raw, HDR_STATUS)
        st = tuple(raw[HDR_ST + 10 * i:HDR_ST + 10 * i + 10] for i in range(8))
        return cls(cw, sw, tag, ipoff, cssel, dataoff, datasel, st, status, magic)


@dataclass(frozen=True, slots=True)
class Fnstenv32:
    """The 28-byte protected-mode 32-bit FNSTENV image (SDM Vol. 1 Figure 8-9)."""

    fcw: int
    fsw: int
    ftw: int  #: full two-bit-per-register tag word, computed by the CPU
    fip: int
    fcs: int
    fop: int  #: 11 bits
    fdp: int
    fds: int

    @classmethod
    def parse(cls, raw: bytes) -> Fnstenv32:
        """Split a 28-byte FNSTENV image into its fields."""
        fcw, fsw, ftw, fip, cs_op, fdp, fds = struct.unpack_from("<IIIIIII", raw, 0)
        return cls(fcw & 0xFFFF, fsw & 0xFFFF, ftw & 0xFFFF, fip, cs_op & 0xFFFF,
                   (cs_op >> 16) & 0x7FF, fdp, fds & 0xFFFF)


# -- the result -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Ia32SignalRun:
    """What the 32-bit probe saw in its SIGUSR1 handler and after sigreturn.

    ``after_*`` are None when the process died (``died_of``) before writing them, e.g. of the
    SIGSEGV ``signal_fault`` forces when sigreturn rejects the frame.
    """

    rt: bool  #: SA_SIGINFO: rt_sigframe_ia32 (ia32_setup_rt_frame), else sigframe_ia32
    esp: int  #: handler ESP on entry (= &frame->pretcode)
    main_esp: int  #: ESP of the interrupted code (at the kill system call)
    fpstate: int  #: sc.fpstate: the address of the fsave header
    sigcontext: bytes  #: the 88-byte struct sigcontext_32, as delivered
    uc_flags: int | None  #: ucontext_ia32.uc_flags (rt frames only)
    siginfo: bytes | None  #: the 128-byte compat_siginfo_t at frame->pinfo (rt frames only)
    frame: bytes  #: min(extended_size, FRAME_CAP) bytes from sc.fpstate, before patching
    after_fxsave: bytes | None  #: 512-byte 32-bit FXSAVE after sigreturn
    after_fnstenv: bytes | None  #: 28-byte FNSTENV after sigreturn (after the FXSAVE)
    after_ymm_hi: bytes | None  #: upper halves of YMM0-7 after sigreturn, if ymm_hi was given
    died_of: str | None  #: signal name when the process was killed, e.g. "SIGSEGV"
    returncode: int

    @property
    def header(self) -> FsaveHeader:
        """The fsave header (struct _fpstate_32 up to ``magic``) at sc.fpstate."""
        return FsaveHeader.parse(self.frame[:FREGS_STATE_SIZE])

    @property
    def fxsave_area(self) -> bytes:
        """The 512 legacy bytes of the frame's XSAVE image (64-bit format: kernel XSAVE64)."""
        return self.frame[FXSAVE_AREA:FXSAVE_AREA + 512]

    @property
    def sw_bytes(self) -> FxSwBytes:
        """The _fpx_sw_bytes at fpstate + 112 + 464."""
        return FxSwBytes.parse(self.frame[SW_BYTES:SW_BYTES + 48])

    @property
    def magic2(self) -> int:
        """The u32 at fpstate + 112 + xstate_size (FP_XSTATE_MAGIC2 in a good frame)."""
        return int(struct.unpack_from("<I", self.frame,
                                      FXSAVE_AREA + self.sw_bytes.xstate_size)[0])

    @property
    def sc_fpstate(self) -> int:
        """The fpstate field of the delivered sigcontext_32."""
        return int(struct.unpack_from("<I", self.sigcontext, SC_FPSTATE)[0])

    def sc_field(self, offset: int, size: int = 4) -> int:
        """A little-endian field of the delivered sigcontext_32 (e.g. 60 = cs, 12 = ds)."""
        return int.from_bytes(self.sigcontext[offset:offset + size], "little")

    @property
    def after(self) -> Fxsave32 | None:
        """``after_fxsave`` parsed."""
        return None if self.after_fxsave is None else Fxsave32.parse(self.after_fxsave)

    @property
    def env(self) -> Fnstenv32 | None:
        """``after_fnstenv`` parsed."""
        return None if self.after_fnstenv is None else Fnstenv32.parse(self.after_fnstenv)


# -- assembling -------------------------------------------------------------------------------

class _Asm32:
    """A straight-line list of 32-bit iced-x86 instructions (no branches: every block has a
    fixed address, so encoding needs no labels)."""

    def __init__(self) -> None:
        import iced_x86

        self.x = iced_x86
        self.items: list[Any] = []

    def add(self, ins: Any) -> None:
        self.items.append(ins)

    def abs_(self, addr: int) -> Any:
        return self.x.MemoryOperand(displ=addr, displ_size=4)

    def at(self, base: int, displ: int = 0) -> Any:
        return self.x.MemoryOperand(base, displ=displ, displ_size=4 if displ else 0)

    def mov_imm(self, reg: int, value: int) -> None:
        self.add(self.x.Instruction.create_reg_u32(self.x.Code.MOV_R32_IMM32, reg,
                                                   value & 0xFFFFFFFF))

    def load(self, reg: int, mem: Any) -> None:
        self.add(self.x.Instruction.create_reg_mem(self.x.Code.MOV_R32_RM32, reg, mem))

    def store(self, mem: Any, reg: int) -> None:
        self.add(self.x.Instruction.create_mem_reg(self.x.Code.MOV_RM32_R32, mem, reg))

    def store_imm(self, mem: Any, value: int) -> None:
        self.add(self.x.Instruction.create_mem_u32(self.x.Code.MOV_RM32_IMM32, mem,
                                                   value & 0xFFFFFFFF))

    def op(self, name: str, *operands: Any) -> None:
        """A one-off instruction: ``op("LEA_R32_M", reg, mem)`` etc. (create by arity)."""
        code = getattr(self.x.Code, name)
        In = self.x.Instruction
        kinds = "".join("m" if isinstance(o, self.x.MemoryOperand) else "r" for o in operands)
        if not operands:
            self.add(In.create(code))
        elif kinds == "rm":
            self.add(In.create_reg_mem(code, *operands))
        elif kinds == "mr":
            self.add(In.create_mem_reg(code, *operands))
        elif kinds == "rr":
            self.add(In.create_reg_reg(code, *operands))
        elif kinds == "m":
            self.add(In.create_mem(code, *operands))
        elif kinds == "r":
            self.add(In.create_reg(code, *operands))
        else:
            raise ValueError(kinds)

    def int80(self) -> None:
        self.add(self.x.Instruction.create_u32(self.x.Code.INT_IMM8, 0x80))

    def syscall(self, nr: int, *args: int) -> None:
        """int 0x80 with eax = nr and ebx, ecx, edx, esi = immediate arguments."""
        R = self.x.Register
        for reg, value in zip((R.EBX, R.ECX, R.EDX, R.ESI), args, strict=False):
            self.mov_imm(reg, value)
        self.mov_imm(R.EAX, nr)
        self.int80()

    def copy(self, dst: int, src_reg: int, count_imm: int | None) -> None:
        """rep movsb from [src_reg] to dst; ECX = count_imm unless None (already set)."""
        R = self.x.Register
        if src_reg != R.ESI:
            self.op("MOV_R32_RM32", R.ESI, src_reg)
        self.mov_imm(R.EDI, dst)
        if count_imm is not None:
            self.mov_imm(R.ECX, count_imm)
        self.add(self.x.Instruction.create_rep_movsb(32))

    def encode(self, address: int, limit: int) -> bytes:
        enc = self.x.BlockEncoder(32)
        enc.add_many(self.items)
        code = bytes(enc.encode(address))
        if len(code) > limit:
            raise ValueError(f"probe block at {address:#x} is {len(code)} bytes (> {limit})")
        return code


def _main_code(ymm: bool) -> bytes:
    a = _Asm32()
    R, C, In = a.x.Register, a.x.Code, a.x.Instruction
    ymms = [R.YMM0 + n for n in range(8)]
    a.op("FXRSTOR_M512BYTE", a.abs_(_IMAGE))
    if ymm:
        for n, y in enumerate(ymms):
            a.add(In.create_reg_reg_mem_u32(C.VEX_VINSERTF128_YMM_YMM_XMMM128_IMM8, y, y,
                                            a.abs_(_YMM_IN + 16 * n), 1))
    a.syscall(NR_RT_SIGACTION, SIGUSR1, _ACT, 0, 8)
    a.store(a.abs_(_OUT + _O_SIGACTION), R.EAX)
    a.syscall(NR_GETPID)
    a.op("MOV_R32_RM32", R.EBX, R.EAX)
    a.mov_imm(R.ECX, SIGUSR1)
    a.mov_imm(R.EAX, NR_KILL)
    a.store(a.abs_(_OUT + _O_MAINESP), R.ESP)
    a.int80()  # the signal is delivered on the way out of kill(); sigreturn resumes here
    a.op("FXSAVE_M512BYTE", a.abs_(_OUT + _O_FXSAVE))
    a.op("FNSTENV_M28BYTE", a.abs_(_OUT + _O_FNSTENV))  # after FXSAVE: it masks exceptions
    if ymm:
        for n, y in enumerate(ymms):
            a.add(In.create_mem_reg_u32(C.VEX_VEXTRACTF128_XMMM128_YMM_IMM8,
                                        a.abs_(_OUT + _O_YMM + 16 * n), y, 1))
    a.syscall(NR_WRITE, 1, _OUT, _OUT_SIZE)
    a.syscall(NR_EXIT_GROUP, 0)
    a.op("UD2")
    return a.encode(_MAIN, _HANDLER - _MAIN)


def _handler_code(rt: bool, patches: Sequence[tuple[int, int, int]]) -> bytes:
    a = _Asm32()
    R = a.x.Register
    a.op("CLD")
    a.store(a.abs_(_OUT + _O_ESP), R.ESP)
    if rt:
        a.load(R.EDX, a.at(R.ESP, 12))  # frame->puc
        a.load(R.EAX, a.at(R.EDX))  # uc_flags
        a.store(a.abs_(_OUT + _O_UCFLAGS), R.EAX)
        a.op("LEA_R32_M", R.EBX, a.at(R.EDX, UC_MCONTEXT))
        a.load(R.EAX, a.at(R.ESP, 8))  # frame->pinfo
        a.copy(_OUT + _O_SIGINFO, R.EAX, COMPAT_SIGINFO_SIZE)
    else:
        a.op("LEA_R32_M", R.EBX, a.at(R.ESP, 8))  # frame->sc
    a.copy(_OUT + _O_SC, R.EBX, SIGCONTEXT_32_SIZE)
    a.load(R.EAX, a.at(R.EBX, SC_FPSTATE))
    a.store(a.abs_(_OUT + _O_FPSTATE), R.EAX)
    a.load(R.ECX, a.at(R.EAX, SW_BYTES + 4))  # extended_size
    a.mov_imm(R.EDX, FRAME_CAP)
    a.op("CMP_R32_RM32", R.ECX, R.EDX)
    a.op("CMOVA_R32_RM32", R.ECX, R.EDX)
    a.store(a.abs_(_OUT + _O_LEN), R.ECX)
    a.copy(_OUT + _O_FRAME, R.EAX, None)
    a.store_imm(a.abs_(_OUT + _O_RAN), 1)
    a.syscall(NR_WRITE, 1, _OUT, _OUT_SIZE)  # in case sigreturn kills the process
    for offset, src, length in patches:
        a.load(R.EDI, a.abs_(_OUT + _O_FPSTATE))
        a.add(a.x.Instruction.create_reg_u32(a.x.Code.ADD_RM32_IMM32, R.EDI,
                                             offset & 0xFFFFFFFF))
        a.mov_imm(R.ESI, src)
        a.mov_imm(R.ECX, length)
        a.add(a.x.Instruction.create_rep_movsb(32))
    a.op("RETND")  # to frame->pretcode: the SA_RESTORER stub
    return a.encode(_HANDLER, _RESTORER - _HANDLER)


def _restorer_code(rt: bool) -> bytes:
    """The stubs of arch/x86/entry/vdso/vdso32/sigreturn.S: __kernel_sigreturn pops the
    signal number so ESP - 8 is the sigframe_ia32 (sys_sigreturn: frame = sp - 8);
    __kernel_rt_sigreturn does not (sys_rt_sigreturn: frame = sp - 4)."""
    a = _Asm32()
    R = a.x.Register
    if not rt:
        a.op("POP_R32", R.EAX)
    a.mov_imm(R.EAX, NR_RT_SIGRETURN if rt else NR_SIGRETURN)
    a.int80()
    a.op("UD2")
    return a.encode(_RESTORER, _IMAGE - _RESTORER)


def static_elf32(segments: dict[int, bytes], *, entry: int, memsz: int,
                 base: int = _BASE) -> bytes:
    """A static ET_EXEC EM_386 ELF (the format binfmt_elf loads into a compat process): one
    RWX PT_LOAD at ``base`` whose file image holds the ELF and program headers and
    ``segments`` (address -> bytes), and whose memory extends, zero-filled, to ``memsz``
    bytes (the bss)."""
    filesz = max([84] + [addr - base + len(data) for addr, data in segments.items()])
    if memsz < filesz or any(addr - base < 84 for addr in segments):
        raise ValueError("segments overlap the headers or lie beyond memsz")
    img = bytearray(filesz)
    img[:52] = struct.pack("<4sBBBBB7sHHIIIIIHHHHHH", b"\x7fELF", 1, 1, 1, 0, 0, bytes(7),
                           2, 3, 1, entry, 52, 0, 0, 52, 32, 1, 0, 0, 0)
    img[52:84] = struct.pack("<IIIIIIII", 1, 0, base, base, filesz, memsz, 7, 0x1000)
    for addr, data in segments.items():
        img[addr - base:addr - base + len(data)] = data
    return bytes(img)


def _elf(segments: dict[int, bytes]) -> bytes:
    """The probe's ELF: ``segments`` at their addresses, then the zero-filled output block."""
    memsz = _OUT - _BASE + (_OUT_SIZE + 0xFFF) // 0x1000 * 0x1000
    return static_elf32(segments, entry=_MAIN, memsz=memsz)


def _require_avx() -> None:
    from fpstate.host import native

    native.require_x86_64()
    ecx = native.cpuid(1)[2]
    if not (ecx >> 27) & 1:
        raise HostUnavailable("CR4.OSXSAVE is clear: no XSAVE, no AVX state")
    if not (ecx >> 28) & 1:
        raise HostUnavailable("the CPU has no AVX (CPUID.1:ECX[28]=0)")
    if native.xgetbv(0) & 6 != 6:
        raise HostUnavailable("XCR0 does not enable SSE+AVX state (bits 1, 2)")


def run_elf32(image: bytes, timeout: float = 20) -> subprocess.CompletedProcess[bytes]:
    """Run a static 32-bit ELF (``static_elf32``) from a private temporary directory and
    capture its output; HostUnavailable when this kernel cannot run one (no IA32_EMULATION,
    ia32_emulation=false, a noexec temp directory) or it hangs past ``timeout`` seconds."""
    from fpstate.host import native

    native.require_x86_64()
    tmp = tempfile.mkdtemp(prefix="fpstate-ia32-")
    try:
        path = os.path.join(tmp, "probe32")
        with open(path, "wb") as f:
            f.write(image)
        os.chmod(path, 0o700)
        try:
            return subprocess.run([path], capture_output=True, timeout=timeout)
        except OSError as e:
            raise HostUnavailable(
                f"cannot run a 32-bit ELF ({e.strerror}): the kernel lacks IA32_EMULATION, "
                "it was booted with ia32_emulation=false, or the temp directory is noexec"
            ) from e
        except subprocess.TimeoutExpired as e:
            raise HostUnavailable(f"the 32-bit probe hung for {timeout:g} s") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ia32_signal(fxsave: bytes, *, siginfo: bool,
                patches: tuple[tuple[int, bytes], ...] = (),
                ymm_hi: bytes | None = None) -> Ia32SignalRun:
    """Deliver SIGUSR1 to a 32-bit process whose x87/SSE state is ``fxsave`` and report the
    frame the kernel built and the state its sigreturn restored.

    With ``siginfo`` the handler has SA_SIGINFO, so the kernel builds ``rt_sigframe_ia32``
    (``ia32_setup_rt_frame``) and the restorer calls rt_sigreturn (173); without it
    ``sigframe_ia32`` (``ia32_setup_frame``) and sigreturn (119). Either way the FP part comes
    from ``copy_fpstate_to_sigframe`` (fsave header + XSAVE image) and is restored by
    ``fpu__restore_sig(buf, ia32_frame=1)``. Each patch (offset, data) is written by the
    handler at sc.fpstate + offset (offset 0 = the fsave header, 112 = the XSAVE image) after
    the frame was recorded. ``ymm_hi`` (128 bytes) sets, and after return reads back, the upper
    halves of YMM0-7 (VINSERTF128/VEXTRACTF128); HostUnavailable without AVX.
    """
    if len(fxsave) != 512:
        raise ValueError("fxsave must be a 512-byte image")
    if ymm_hi is not None:
        if len(ymm_hi) != 128:
            raise ValueError("ymm_hi must be 8 x 16 bytes")
        _require_avx()
    placed: list[tuple[int, int, int]] = []
    payload = bytearray()
    for offset, data in patches:
        placed.append((offset, _PATCH + len(payload), len(data)))
        payload += data
    if len(payload) > _PATCH_MAX:
        raise ValueError(f"patch payloads exceed {_PATCH_MAX} bytes")
    flags = SA_RESTORER | (SA_SIGINFO if siginfo else 0)
    act = struct.pack("<IIIQ", _HANDLER, flags, _RESTORER, 0)
    image = _elf({
        _MAIN: _main_code(ymm_hi is not None),
        _HANDLER: _handler_code(siginfo, placed),
        _RESTORER: _restorer_code(siginfo),
        _IMAGE: fxsave,
        _YMM_IN: ymm_hi or b"",
        _ACT: act,
        _PATCH: bytes(payload),
    })
    run = run_elf32(image)
    out = run.stdout
    died = signal.Signals(-run.returncode).name if run.returncode < 0 else None
    if len(out) < _OUT_SIZE:
        raise HostUnavailable(
            f"the 32-bit probe's handler never reported (status {run.returncode}, "
            f"{len(out)} bytes of output): SIGUSR1 was not delivered")
    if died is None and (run.returncode != 0 or len(out) != 2 * _OUT_SIZE):
        raise HostUnavailable(f"the 32-bit probe exited with status {run.returncode} "
                              f"after {len(out)} bytes of output")
    first = out[:_OUT_SIZE]
    last = out[_OUT_SIZE:2 * _OUT_SIZE] if len(out) >= 2 * _OUT_SIZE else None

    def u32(off: int) -> int:
        return int(struct.unpack_from("<I", first, off)[0])

    if u32(_O_SIGACTION) != 0:
        raise HostUnavailable(f"ia32 rt_sigaction returned {u32(_O_SIGACTION) - 2**32}")
    length = u32(_O_LEN)
    return Ia32SignalRun(
        rt=siginfo,
        esp=u32(_O_ESP),
        main_esp=u32(_O_MAINESP),
        fpstate=u32(_O_FPSTATE),
        sigcontext=first[_O_SC:_O_SC + SIGCONTEXT_32_SIZE],
        uc_flags=u32(_O_UCFLAGS) if siginfo else None,
        siginfo=first[_O_SIGINFO:_O_SIGINFO + COMPAT_SIGINFO_SIZE] if siginfo else None,
        frame=first[_O_FRAME:_O_FRAME + length],
        after_fxsave=None if last is None else last[_O_FXSAVE:_O_FXSAVE + 512],
        after_fnstenv=None if last is None else last[_O_FNSTENV:_O_FNSTENV + 28],
        after_ymm_hi=(None if last is None or ymm_hi is None
                      else last[_O_YMM:_O_YMM + 128]),
        died_of=died,
        returncode=run.returncode,
    )
