"""Forked children, shared memory, raw syscalls and machine code for the kernel probes.

The probes in `fpstate.host` (prctl, signals, ptrace, sigaltstack, process) ask the running
Linux kernel questions whose answers depend on register contents or change the process for
good (permissions are sticky, handlers and alternate stacks are process state). They share
the machinery of this file.

Rules of this file:
- a probe that may fault, changes process-wide state or loads registers runs in a child made
  by `run_child`; the parent reads the answer from a `SharedMemory` mapping it created before
  ``fork()``, so nothing but bytes crosses the process boundary;
- registers are loaded, the interesting syscall is made and the state is captured by ONE piece
  of machine code (`Asm`) that ends in ``exit_group``: no Python (which uses SSE/AVX-512
  itself) runs between the set-up and the observation;
- syscalls from Python go through libc ``syscall()`` and come back as a number or ``-errno``
  (`raw_syscall`), exactly as the kernel returns them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errno_mod
import mmap
import os
import signal
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from fpstate.errors import HostUnavailable
from fpstate.host import native

PAGE = mmap.PAGESIZE

#: x86-64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl).
SYS = {
    "read": 0, "write": 1, "mmap": 9, "mprotect": 10, "munmap": 11, "rt_sigaction": 13,
    "rt_sigprocmask": 14, "rt_sigreturn": 15, "nanosleep": 35,
    "getpid": 39, "clone": 56, "fork": 57, "vfork": 58, "execve": 59, "exit": 60,
    "wait4": 61, "kill": 62, "ptrace": 101, "sigaltstack": 131, "prctl": 157,
    "arch_prctl": 158, "gettid": 186, "sched_setaffinity": 203, "exit_group": 231,
    "tgkill": 234,
    "pkey_mprotect": 329, "pkey_alloc": 330, "pkey_free": 331,
}

#: include/uapi/asm-generic/signal.h and arch/x86/include/uapi/asm/signal.h.
SA_SIGINFO = 0x00000004
SA_ONSTACK = 0x08000000
SA_RESTORER = 0x04000000
SS_DISABLE = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def raw_syscall(nr: int, *args: int) -> int:
    """Make syscall ``nr`` through libc and return the kernel's answer: the result, or
    ``-errno`` on failure (the value the kernel put in RAX)."""
    ret = _libc.syscall(ctypes.c_long(nr), *(ctypes.c_ulong(a & (2**64 - 1)) for a in args))
    if ret == -1:
        return -ctypes.get_errno()
    return int(ret)


def errno_name(err: int) -> str:
    """``EINVAL`` for 22 (positive or negative), ``OK`` for 0."""
    if err == 0:
        return "OK"
    if abs(err) == errno_mod.EOPNOTSUPP:
        return "EOPNOTSUPP"  # the kernel's name; Python's table says ENOTSUP (same number)
    return errno_mod.errorcode.get(abs(err), f"E{abs(err)}")


class SharedMemory:
    """An anonymous MAP_SHARED mapping: written by the child, read by the parent.

    Page aligned (so every 64-byte-aligned offset is a valid XSAVE area) and zero filled.
    """

    def __init__(self, size: int) -> None:
        self.size = (size + PAGE - 1) // PAGE * PAGE
        self.mem = mmap.mmap(-1, self.size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.mem[offset:offset + length])

    def write(self, offset: int, data: bytes) -> None:
        self.mem[offset:offset + len(data)] = data

    def u64(self, offset: int) -> int:
        return int(struct.unpack_from("<Q", self.mem, offset)[0])

    def clear(self) -> None:
        self.mem[:] = bytes(self.size)


@dataclass(frozen=True, slots=True)
class ChildExit:
    """How a child ended: ``exit_code`` when it exited, ``signal`` when a signal killed it."""

    pid: int
    exit_code: int | None
    signal: int | None
    core_dumped: bool = False  #: WCOREDUMP(status): the kernel reported a core for it

    @property
    def signal_name(self) -> str | None:
        return None if self.signal is None else signal.Signals(self.signal).name


def _reset_fault_handlers() -> None:
    """In the child: SIG_DFL for the fault signals (pytest's faulthandler catches them and
    would print a Python traceback) and no core dump (PR_SET_DUMPABLE 0)."""
    for sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE):
        act = (ctypes.c_uint64 * 4)(0, 0, 0, 0)
        raw_syscall(SYS["rt_sigaction"], sig, ctypes.addressof(act), 0, 8)
    raw_syscall(SYS["prctl"], 4, 0)  # PR_SET_DUMPABLE 0: no core file for expected faults
    raw_syscall(SYS["prctl"], 1, signal.SIGKILL)  # PR_SET_PDEATHSIG: never outlive the parent


def kill_and_reap(pid: int) -> None:
    """SIGKILL ``pid`` and reap it, whatever became of it already (gone, or reaped)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def wait_child(pid: int, timeout: float = 20.0) -> ChildExit:
    """waitpid() with a deadline; a child still running at the deadline is SIGKILLed and
    reported as such."""
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while True:
        wpid, status = os.waitpid(pid, os.WNOHANG)
        if wpid == pid:
            break
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    if os.WIFEXITED(status):
        return ChildExit(pid, os.WEXITSTATUS(status), None)
    return ChildExit(pid, None, os.WTERMSIG(status), os.WCOREDUMP(status))


def fork_child(body: Callable[[], int | None]) -> int:
    """fork(); the child runs ``body`` (fault handlers reset, no core dump) and ``_exit``s
    with its return value (125 if it raised). Returns the child's pid to the parent."""
    native.require_x86_64()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 125
        try:
            _reset_fault_handlers()
            ret = body()
            code = 0 if ret is None else int(ret)
        except BaseException:  # the child must never return into pytest's code
            code = 125
        finally:
            os._exit(code)
    return pid


def run_child(body: Callable[[], int | None], timeout: float = 20.0) -> ChildExit:
    """`fork_child` then `wait_child`."""
    return wait_child(fork_child(body), timeout)


# --------------------------------------------------------------------------------------
# Machine code


@dataclass(frozen=True, slots=True)
class Reg:
    """A register operand for `Asm.syscall` (iced-x86 registers are plain ints, so an
    immediate and a register could not be told apart otherwise)."""

    register: int


class Asm:
    """A list of iced-x86 instructions with named labels, encoded at its final address.

    Every instruction gets a private IP (its index); branches name a label that resolves to
    the IP of the instruction that follows `label()`. The BlockEncoder turns those into real
    displacements at `assemble` time.
    """

    def __init__(self) -> None:
        from iced_x86 import Code, Instruction, MemoryOperand, Register

        self.C, self.In, self.M, self.R = Code, Instruction, MemoryOperand, Register
        self._items: list[object] = []
        self._labels: dict[str, int] = {}
        self._branches: list[tuple[object, str]] = []

    def emit(self, instr: object) -> None:
        instr.ip = len(self._items) + 1  # type: ignore[attr-defined]
        self._items.append(instr)

    def label(self, name: str) -> None:
        self._labels[name] = len(self._items) + 1

    def jump(self, code_name: str, label: str) -> None:
        instr = self.In.create_branch(getattr(self.C, code_name), 0)
        self._branches.append((instr, label))
        self.emit(instr)

    def assemble(self, base: int) -> bytes:
        for instr, label in self._branches:
            instr.near_branch64 = self._labels[label]  # type: ignore[attr-defined]
        return native.encode(self._items, base)

    # -- helpers ------------------------------------------------------------------------
    def mov_imm(self, reg: object, value: int) -> None:
        self.emit(self.In.create_reg_u64(self.C.MOV_R64_IMM64, reg, value & (2**64 - 1)))

    def syscall(self, nr: int, *args: int | Reg) -> None:
        """RAX = nr; RDI, RSI, RDX, R10, R8, R9 = args (ints are immediates, `Reg` values
        are registers copied in order, so pass register arguments first)."""
        regs = (self.R.RDI, self.R.RSI, self.R.RDX, self.R.R10, self.R.R8, self.R.R9)
        for reg, arg in zip(regs, args, strict=False):
            if isinstance(arg, Reg):
                if arg.register != reg:
                    self.emit(self.In.create_reg_reg(self.C.MOV_R64_RM64, reg, arg.register))
            else:
                self.mov_imm(reg, arg)
        self.mov_imm(self.R.RAX, nr)
        self.emit(self.In.create(self.C.SYSCALL))

    def store_rax(self, address: int) -> None:
        """[address] = RAX (clobbers R11)."""
        self.mov_imm(self.R.R11, address)
        self.emit(self.In.create_mem_reg(self.C.MOV_RM64_R64, self.M(self.R.R11), self.R.RAX))

    def xsave(self, address: int, base_reg: object | None = None) -> None:
        """XSAVE64 [address] with EDX:EAX = all ones (RFBM = XCR0): the standard format the
        kernel uses for signal frames. Clobbers RAX, RDX and ``base_reg`` (default RDI)."""
        reg = base_reg if base_reg is not None else self.R.RDI
        self.mov_imm(reg, address)
        self.mov_imm(self.R.RAX, 0xFFFFFFFF)
        self.mov_imm(self.R.RDX, 0xFFFFFFFF)
        self.emit(self.In.create_mem(self.C.XSAVE64_MEM, self.M(reg)))

    def exit_group(self, code: int) -> None:
        self.syscall(SYS["exit_group"], code)

    def wrpkru(self, value: int) -> None:
        """WRPKRU ``value`` (ECX = EDX = 0). Clobbers RAX, RCX, RDX."""
        self.mov_imm(self.R.RAX, value)
        self.mov_imm(self.R.RCX, 0)
        self.mov_imm(self.R.RDX, 0)
        self.emit(self.In.create(self.C.WRPKRU))

    def deny_pkey(self, key: int, rights: int) -> None:
        """PKRU |= ``rights`` (AD = 1, WD = 2) for protection key ``key``: RDPKRU, OR,
        WRPKRU. Clobbers RAX, RCX, RDX."""
        self._update_pkru(0xFFFFFFFF, rights << (2 * key))

    def set_pkey_rights(self, key: int, rights: int) -> None:
        """PKRU's two bits of protection key ``key`` = ``rights`` (0 open, AD = 1, WD = 2),
        the other keys' bits kept: RDPKRU, AND, OR, WRPKRU. Clobbers RAX, RCX, RDX."""
        self._update_pkru(~(0b11 << (2 * key)) & 0xFFFFFFFF, rights << (2 * key))

    def rdpkru(self) -> None:
        """EAX = PKRU (RDPKRU with ECX = 0; EDX = 0). Clobbers RAX, RCX, RDX."""
        self.mov_imm(self.R.RCX, 0)
        self.emit(self.In.create(self.C.RDPKRU))

    def _update_pkru(self, keep: int, add: int) -> None:
        """PKRU = (PKRU & ``keep``) | ``add``: RDPKRU, AND (unless ``keep`` is all ones), OR,
        WRPKRU."""
        self.rdpkru()
        if keep != 0xFFFFFFFF:
            self.emit(self.In.create_reg_u32(self.C.AND_RM32_IMM32, self.R.EAX, keep))
        self.emit(self.In.create_reg_u32(self.C.OR_RM32_IMM32, self.R.EAX, add))
        self.mov_imm(self.R.RCX, 0)
        self.mov_imm(self.R.RDX, 0)
        self.emit(self.In.create(self.C.WRPKRU))


class CodePages:
    """An executable mapping of ``count`` pages; `place` puts one `Asm` at the start of a page
    and returns its address (handlers, restorers and the main body each get a page)."""

    def __init__(self, count: int) -> None:
        self.code = native.ExecutableCode(count * PAGE)
        self.count = count

    def place(self, index: int, asm: Asm) -> int:
        if not 0 <= index < self.count:
            raise IndexError(f"page {index} of {self.count}")
        address = self.code.address + index * PAGE
        data = asm.assemble(address)
        if len(data) > PAGE:
            raise ValueError(f"{len(data)} bytes of code do not fit in a page")
        self.code.mem[index * PAGE:index * PAGE + len(data)] = data
        return address

    def call(self, address: int) -> int:
        """Call the code at ``address`` (System V ABI, no arguments); call it in a child."""
        fn = ctypes.CFUNCTYPE(ctypes.c_uint64)(address)
        return int(fn())


# --------------------------------------------------------------------------------------
# Register patterns


@dataclass(frozen=True, slots=True)
class RegisterClass:
    """What the host's XCR0 lets a probe load: 32 ZMM + 8 opmask with AVX-512, 16 YMM with
    AVX, 16 XMM otherwise."""

    xcr0: int
    vector_regs: int
    vector_bytes: int
    opmask: bool
    kmovq: bool  #: KMOVQ (64-bit opmask moves) needs AVX512BW, else KMOVW


@cache
def register_class() -> RegisterClass:
    """Read XCR0 (XGETBV 0) and CPUID.7.0:EBX[30] (AVX512BW) once."""
    native.require_x86_64()
    if not (native.cpuid(1)[2] >> 27) & 1:
        raise HostUnavailable("CR4.OSXSAVE is clear (CPUID.1:ECX[27]=0): the kernel did not "
                              "enable XSAVE")
    xcr0 = native.xgetbv(0)
    bw = bool((native.cpuid(7, 0)[1] >> 30) & 1)
    if xcr0 & 0xE0 == 0xE0:
        return RegisterClass(xcr0, 32, 64, True, bw)
    if xcr0 & 0x4:
        return RegisterClass(xcr0, 16, 32, False, False)
    return RegisterClass(xcr0, 16, 16, False, False)


#: Layout of a pattern table in shared memory.
PATTERN_ZMM = 0  #: 32 x 64 bytes
PATTERN_K = 2048  #: 8 x 8 bytes
PATTERN_MXCSR = 2112  #: u32
PATTERN_TABLE_SIZE = 2176

#: MXCSR loaded by the probes: all exceptions masked, DAZ, RC = toward zero, FTZ (0xffc0).
MXCSR_PATTERN = 0xFFC0
MXCSR_DEFAULT = 0x1F80
FCW_DEFAULT = 0x037F
#: x87 stack after FLD1; FLDPI: ST0 = pi, ST1 = 1.0 (80-bit extended, little endian).
X87_PI = bytes.fromhex("35c26821a2da0fc90040")
X87_ONE = bytes.fromhex("0000000000000080ff3f")


def zmm_pattern(n: int, seed: int) -> bytes:
    """64 distinct bytes for vector register ``n``: u64 word w = 0xF5_SS_00_00_00_NN_0W_00
    pattern (S = seed, N = register, W = word), never zero and distinct per lane."""
    return b"".join(
        ((0xF5 << 56) | ((seed & 0xFF) << 48) | ((n & 0xFF) << 16) | (w << 8) | 0x5A)
        .to_bytes(8, "little")
        for w in range(8)
    )


def opmask_pattern(n: int, seed: int) -> int:
    """64-bit value for opmask register k``n``."""
    return (0x4B << 56) | ((seed & 0xFF) << 40) | (0x0C0DE << 8) | n


def pattern_table(seed: int) -> bytes:
    """The bytes `load_patterns` reads: every ZMM, opmask and MXCSR value for ``seed``."""
    out = bytearray(PATTERN_TABLE_SIZE)
    for n in range(32):
        out[PATTERN_ZMM + 64 * n:PATTERN_ZMM + 64 * (n + 1)] = zmm_pattern(n, seed)
    for n in range(8):
        struct.pack_into("<Q", out, PATTERN_K + 8 * n, opmask_pattern(n, seed))
    struct.pack_into("<I", out, PATTERN_MXCSR, MXCSR_PATTERN)
    return bytes(out)


def avx_alone_image() -> bytes:
    """A 4096-byte standard-format XSAVE image whose XSTATE_BV holds AVX alone: MXCSR 1F80H,
    XMM0-15 zero (SSE in its initial configuration once an XRSTOR with RFBM SSE|AVX loads it),
    the upper halves of YMM0-15 a pattern with no zero byte."""
    img = bytearray(PAGE)
    struct.pack_into("<I", img, 24, MXCSR_DEFAULT)
    struct.pack_into("<Q", img, 512, 0x4)
    img[576:832] = bytes((0x11 + n) % 255 + 1 for n in range(256))
    return bytes(img)


def load_patterns(asm: Asm, table: int) -> RegisterClass:
    """Emit: every vector register the host has = its pattern (VMOVDQU64 zmm / VMOVDQU ymm /
    MOVDQU xmm), every opmask (KMOVQ/KMOVW), MXCSR (LDMXCSR), and the x87 stack ST0 = pi,
    ST1 = 1.0 (FNINIT; FLD1; FLDPI). Clobbers RAX."""
    rc = register_class()
    C, In, M, R = asm.C, asm.In, asm.M, asm.R
    asm.mov_imm(R.RAX, table)
    for n in range(rc.vector_regs):
        mem = M(R.RAX, displ=PATTERN_ZMM + 64 * n)
        if rc.vector_bytes == 64:
            asm.emit(In.create_reg_mem(C.EVEX_VMOVDQU64_ZMM_K1Z_ZMMM512, R.ZMM0 + n, mem))
        elif rc.vector_bytes == 32:
            asm.emit(In.create_reg_mem(C.VEX_VMOVDQU_YMM_YMMM256, R.YMM0 + n, mem))
        else:
            asm.emit(In.create_reg_mem(C.MOVDQU_XMM_XMMM128, R.XMM0 + n, mem))
    if rc.opmask:
        code = C.VEX_KMOVQ_KR_KM64 if rc.kmovq else C.VEX_KMOVW_KR_KM16
        for n in range(8):
            asm.emit(In.create_reg_mem(code, R.K0 + n, M(R.RAX, displ=PATTERN_K + 8 * n)))
    asm.emit(In.create_mem(C.LDMXCSR_M32, M(R.RAX, displ=PATTERN_MXCSR)))
    asm.emit(In.create(C.FNINIT))
    asm.emit(In.create(C.FLD1))
    asm.emit(In.create(C.FLDPI))
    return rc


# --------------------------------------------------------------------------------------
# Standard-format XSAVE images as the host lays them out


@cache
def host_standard_layout() -> tuple[tuple[int, int, int], ...]:
    """(component, offset, size) of every XCR0 component >= 2, from CPUID.(EAX=0DH,ECX=i)
    EBX/EAX (SDM 13.4.2), plus (0, 0, 160) and (1, 160, 256)."""
    rc = register_class()
    rows = [(0, 0, 160), (1, 160, 256)]
    for i in range(2, 63):
        if (rc.xcr0 >> i) & 1:
            eax, ebx, _, _ = native.cpuid(0xD, i)
            rows.append((i, ebx, eax))
    return tuple(rows)


@dataclass(frozen=True, slots=True)
class XsaveImage:
    """A standard-format XSAVE image (signal frame, NT_X86_XSTATE, or a probe's own XSAVE).

    ``raw`` is the image as found; the register accessors apply XSTATE_BV: a component whose
    bit is clear reads as its initial configuration (zero), whatever its bytes hold (XSAVE
    leaves them unwritten; SDM 13.6 and 13.8.1).
    """

    raw: bytes
    layout: tuple[tuple[int, int, int], ...]

    def _u(self, fmt: str, off: int) -> int:
        return int(struct.unpack_from(fmt, self.raw, off)[0])

    @property
    def fcw(self) -> int:
        return self._u("<H", 0)

    @property
    def fsw(self) -> int:
        return self._u("<H", 2)

    @property
    def ftw(self) -> int:
        """Abridged tag word (FXSAVE format, one bit per register)."""
        return self._u("<B", 4)

    @property
    def mxcsr(self) -> int:
        return self._u("<I", 24)

    @property
    def mxcsr_mask(self) -> int:
        return self._u("<I", 28)

    @property
    def sw_reserved(self) -> bytes:
        """Bytes 464..511: fx_sw_bytes in a signal frame, XCR0 in NT_X86_XSTATE."""
        return self.raw[464:512]

    @property
    def xstate_bv(self) -> int:
        return self._u("<Q", 512)

    @property
    def xcomp_bv(self) -> int:
        return self._u("<Q", 520)

    @property
    def header_reserved(self) -> bytes:
        return self.raw[528:576]

    def component(self, nr: int) -> bytes | None:
        """The raw bytes of component ``nr`` at its standard offset, None if not in layout."""
        for comp, off, size in self.layout:
            if comp == nr:
                return self.raw[off:off + size]
        return None

    def _live(self, nr: int, off: int, length: int) -> bytes:
        if not (self.xstate_bv >> nr) & 1:
            return bytes(length)
        return self.raw[off:off + length]

    def st(self, i: int) -> bytes:
        """Physical x87 register slot i (10 significant bytes)."""
        return self._live(0, 32 + 16 * i, 10)

    def xmm(self, n: int) -> bytes:
        return self._live(1, 160 + 16 * n, 16)

    def _in(self, nr: int, rel: int, length: int) -> bytes:
        for comp, off, _ in self.layout:
            if comp == nr:
                return self._live(nr, off + rel, length)
        return bytes(length)

    def ymm(self, n: int) -> bytes:
        """The full 32 bytes of YMMn (XMM part + component 2 upper half)."""
        return self.xmm(n) + self._in(2, 16 * n, 16)

    def zmm(self, n: int) -> bytes:
        """The full 64 bytes of ZMMn: ZMM0-15 from SSE + YMM + ZMM_Hi256 (component 6),
        ZMM16-31 from Hi16_ZMM (component 7)."""
        if n < 16:
            return self.ymm(n) + self._in(6, 32 * n, 32)
        return self._in(7, 64 * (n - 16), 64)

    def opmask(self, n: int) -> int:
        return int.from_bytes(self._in(5, 8 * n, 8), "little")


def xsave_image(raw: bytes) -> XsaveImage:
    """Wrap standard-format bytes with the host's layout."""
    return XsaveImage(bytes(raw), host_standard_layout())


def host_user_xstate_size() -> int:
    """CPUID.(EAX=0DH,ECX=0).EBX: the standard-format size for the current XCR0."""
    return native.cpuid(0xD, 0)[1]


def xsave_slot() -> int:
    """Bytes of shared memory for one standard XSAVE image of this CPU: its size plus 64
    (room to align it), in whole pages."""
    return (host_user_xstate_size() + 64 + PAGE - 1) // PAGE * PAGE


def elf_exec_image(code: Callable[[int, int], Asm], bss: int = 3 * PAGE) -> bytes:
    """A minimal static ELF64 executable (one RWX PT_LOAD at 0x400000): ``code(entry,
    bss_address)`` returns the Asm of its entry point; ``bss`` zeroed bytes follow the file
    image at a page-aligned ``bss_address``. Used to observe the state a fresh execve()
    leaves in the registers, before any libc runs."""
    base = 0x400000
    entry = base + 64 + 56
    bss_addr = base + PAGE * 4
    text = code(entry, bss_addr).assemble(entry)
    filesz = 64 + 56 + len(text)
    if filesz > PAGE * 4:
        raise HostUnavailable("exec probe image too large")
    memsz = (bss_addr - base) + bss
    ehdr = struct.pack(
        "<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, bytes(7),
        2, 62, 1, entry, 64, 0, 0, 64, 56, 1, 0, 0, 0,
    )
    phdr = struct.pack("<IIQQQQQQ", 1, 7, 0, base, base, filesz, memsz, PAGE)
    return ehdr + phdr + text

