"""Machine code on the real CPU: assemble with iced-x86, run from an executable mmap via ctypes.

Rules of this file:
- no C compiler: code is encoded by iced-x86's BlockEncoder and called through a ctypes
  function pointer with the System V calling convention (rdi, rsi, rdx -> rax);
- every function follows the ABI: callee-saved registers (rbx, rbp, r12-r15) are pushed
  and popped by the code that uses them (see `cpuid`);
- code that may fault runs in a forked child (`fpstate.host.runner`), never in this process.

This is the only module that makes memory executable.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
from collections.abc import Callable, Sequence

from fpstate.errors import HostUnavailable

_PAGE = mmap.PAGESIZE


def is_x86_64() -> bool:
    """True on an x86-64 host, where CPUID and XSAVE can be executed."""
    return platform.machine().lower() in ("x86_64", "amd64")


def require_x86_64() -> None:
    if not is_x86_64():
        raise HostUnavailable(f"the host is {platform.machine()}, not x86-64")


def encode(instructions: Sequence[object], base: int = 0) -> bytes:
    """Encode iced-x86 ``Instruction`` objects at ``base`` with the BlockEncoder."""
    from iced_x86 import BlockEncoder

    enc = BlockEncoder(64)
    enc.add_many(list(instructions))
    return enc.encode(base)


class ExecutableCode:
    """A page-aligned RWX mapping holding machine code, callable with up to four int arguments."""

    def __init__(self, size: int = 1 << 16) -> None:
        require_x86_64()
        self.size = (size + _PAGE - 1) // _PAGE * _PAGE
        prot = mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC
        self.mem = mmap.mmap(-1, self.size, prot=prot)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))

    def load(self, code: bytes) -> Callable[..., int]:
        """Copy ``code`` to the start of the mapping and return it as f(a, b, c, d) -> int."""
        if len(code) > self.size:
            raise ValueError(f"{len(code)} bytes of code do not fit in {self.size}")
        self.mem.seek(0)
        self.mem.write(code)
        proto = ctypes.CFUNCTYPE(
            ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64
        )
        fn = proto(self.address)

        def call(a: int = 0, b: int = 0, c: int = 0, d: int = 0) -> int:
            return int(fn(a, b, c, d))

        return call


_cpuid_fn: Callable[..., int] | None = None
_cpuid_out = (ctypes.c_uint32 * 4)()
_cpuid_code: ExecutableCode | None = None


def _cpuid_code_bytes() -> bytes:
    """f(leaf=rdi, subleaf=rsi, out=rdx): CPUID clobbers rbx, which is callee-saved."""
    from iced_x86 import Code as C
    from iced_x86 import Instruction as In
    from iced_x86 import MemoryOperand as M
    from iced_x86 import Register as R

    return encode([
        In.create_reg(C.PUSH_R64, R.RBX),
        In.create_reg_reg(C.MOV_R64_RM64, R.R8, R.RDX),
        In.create_reg_reg(C.MOV_R32_RM32, R.EAX, R.EDI),
        In.create_reg_reg(C.MOV_R32_RM32, R.ECX, R.ESI),
        In.create(C.CPUID),
        In.create_mem_reg(C.MOV_RM32_R32, M(R.R8), R.EAX),
        In.create_mem_reg(C.MOV_RM32_R32, M(R.R8, displ=4), R.EBX),
        In.create_mem_reg(C.MOV_RM32_R32, M(R.R8, displ=8), R.ECX),
        In.create_mem_reg(C.MOV_RM32_R32, M(R.R8, displ=12), R.EDX),
        In.create_reg(C.POP_R64, R.RBX),
        In.create(C.RETNQ),
    ])


def cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
    """Execute CPUID(leaf, subleaf) on this CPU and return (EAX, EBX, ECX, EDX)."""
    global _cpuid_fn, _cpuid_code
    if _cpuid_fn is None:
        _cpuid_code = ExecutableCode(_PAGE)
        _cpuid_fn = _cpuid_code.load(_cpuid_code_bytes())
    _cpuid_fn(leaf, subleaf, ctypes.addressof(_cpuid_out))
    return tuple(int(x) for x in _cpuid_out)  # type: ignore[return-value]


_xgetbv_fn: Callable[..., int] | None = None
_xgetbv_code: ExecutableCode | None = None


def _xgetbv_code_bytes() -> bytes:
    """f(ecx=rdi) -> EDX:EAX."""
    from iced_x86 import Code as C
    from iced_x86 import Instruction as In
    from iced_x86 import Register as R

    return encode([
        In.create_reg_reg(C.MOV_R32_RM32, R.ECX, R.EDI),
        In.create(C.XGETBV),
        In.create_reg_i32(C.SHL_RM64_IMM8, R.RDX, 32),
        In.create_reg_reg(C.OR_R64_RM64, R.RAX, R.RDX),
        In.create(C.RETNQ),
    ])


def xgetbv(ecx: int) -> int:
    """Execute XGETBV(ecx) on this CPU. Faults (#GP) if ECX=1 without XGETBV1: check CPUID first."""
    global _xgetbv_fn, _xgetbv_code
    if _xgetbv_fn is None:
        if not (cpuid(1)[2] >> 27) & 1:
            raise HostUnavailable("CR4.OSXSAVE is clear: XGETBV would fault")
        _xgetbv_code = ExecutableCode(_PAGE)
        _xgetbv_fn = _xgetbv_code.load(_xgetbv_code_bytes())
    return _xgetbv_fn(ecx)


_selectors: tuple[int, int] | None = None


def segment_selectors() -> tuple[int, int]:
    """(CS, DS) of this process, read by ``MOV r/m16, Sreg`` (8C /r): the selectors an x87
    instruction leaves in FCS and FDS (SDM Vol. 1 8.1.8). On x86-64 Linux a 64-bit task runs
    with CS = __USER_CS (0x33) and a null DS; a child inherits both."""
    global _selectors
    if _selectors is None:
        from iced_x86 import Code as C
        from iced_x86 import Instruction as In
        from iced_x86 import Register as R

        code = ExecutableCode(_PAGE)
        fn = code.load(encode([
            In.create_reg_reg(C.XOR_R32_RM32, R.EAX, R.EAX),
            In.create_reg_reg(C.XOR_R32_RM32, R.ECX, R.ECX),
            In.create_reg_reg(C.MOV_RM16_SREG, R.AX, R.CS),
            In.create_reg_reg(C.MOV_RM16_SREG, R.CX, R.DS),
            In.create_reg_i32(C.SHL_RM32_IMM8, R.EAX, 16),
            In.create_reg_reg(C.OR_R32_RM32, R.EAX, R.ECX),
            In.create(C.RETNQ),
        ]))
        both = fn()
        _selectors = (both >> 16 & 0xFFFF, both & 0xFFFF)
    return _selectors
