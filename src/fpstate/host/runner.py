"""The real CPU's answer to an instruction program (`fpstate.x86.program`).

`run_program` executes a `Program` on this CPU at CPL 3 and returns the same `Outcome` the CPU
model returns, so that the two can be compared byte for byte.

Theory of operation
-------------------
One arena, one ``MAP_SHARED`` anonymous mapping, holds everything the program touches: a
control block (the *step* slot, the fault record, XINUSE), the child's stack, the value slots,
the start image, the final image, the buffers (64-byte aligned plus their misalignment) and a
data pool with the memory operands of the loads. One machine-code function per program, built
with iced-x86 (`fpstate.host.asm`), runs in a child process and never returns:

1. install a machine-code handler for SIGILL, SIGBUS, SIGFPE and SIGSEGV (rt_sigaction),
   set RLIMIT_CORE to 0 (prlimit64), and on a CPU with AMX tile data ask for it
   (arch_prctl(ARCH_REQ_XCOMP_PERM)), so that XFD's first-use #NM is handled by the kernel;
2. XRSTOR64 of the start image with RFBM = XCR0 (XCR0 read once with XGETBV(0));
3. for each instruction: store its index to the step slot, set its implicit registers, run it,
   store its value (XGETBV, RDPKRU, STMXCSR, FNSTSW, FNSTCW) to the next value slot;
4. XGETBV(1) (when CPUID.(EAX=0DH,ECX=1):EAX[2]) and XSAVE64 with RFBM = XCR0 into the zeroed
   final image, mark the run done, exit_group(0).

A fault enters the handler, which records the signal, ``si_code``, the trap number, error
code and RIP from the signal frame and calls exit_group. No Python runs in the child between
the start XRSTOR and the final XSAVE. The parent reads the arena after waitpid(). Because
the child ends in exit_group, the body neither preserves callee-saved registers nor restores
any FPU state: the parent process never executes program code (only the spawn stub, which
keeps rbx).

What the host cannot make deterministic (details in /work/notes/host-findings.md): a
preemption inside a program lets the kernel XSAVES/XRSTORS the registers, which may turn an
in-use component holding initial values into XINUSE 0 and resets XSAVEOPT's modified
tracking. The x87 pointers of an FLD hold the runner's addresses, which it reports with the
outcome (`Outcome.placement`: each instruction's address, its operand's, its FOP) so that the
model can be told them.

Two ways to start the child (`SPAWN_MODES`): ``"vfork"`` (default) issues
clone(CLONE_VM | CLONE_VFORK | SIGCHLD) from machine code onto the arena's stack: a separate
process, so faults, signal handlers, rlimits and the FPU state are its own, with the parent's
thread suspended until it exits. ``"fork"`` uses os.fork() and calls the same code in the
child. On this nested Zen 5 VM vfork is ~25x faster (copying the page tables dominates fork).

Faults
------
The vector comes from the trap number the kernel puts in the signal frame (``trapno``: 13
#GP, 6 #UD, 16 #MF, 19 #XM, 17 #AC, ...), with one exception: Linux delivers an XFD #NM for
which the process has no permission as SIGILL with si_code ILL_ILLOPC and does not set the trap
number (arch/x86/kernel/traps.c, handle_xfd_event), while a #UD is SIGILL with ILL_ILLOPN;
so SIGILL/ILL_ILLOPC is reported as #NM. Since the runner asks for AMX permission, that #NM is
expected only where the kernel refuses it. If the child died without the handler (a fault in
the handler itself), the signal alone decides: SIGSEGV and SIGBUS #GP, SIGILL #UD, SIGFPE #MF.

Operand conventions (the model follows the same): see `fpstate.host.asm`; FLDCW stores the
low 16 bits of ``value``, LDMXCSR the low 32 bits; the stride of TILELOADD and TILESTORED is
the bytes-per-row of the tile's *current* configuration, read with STTILECFG into a scratch
area just before it (`fpstate.host.asm.emit_tile_move`).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
import struct
from dataclasses import dataclass, replace
from functools import cache

from iced_x86 import Code, Instruction, MemoryOperand, Register

from fpstate.errors import HostUnavailable, ProgramError
from fpstate.host import native
from fpstate.host.asm import (
    TILE_MOVES,
    VALUE_MNEMONICS,
    Asm,
    Operands,
    emit_insn,
    emit_tile_move,
    mem,
    operand_data,
    placement,
)
from fpstate.x86.image import normalise_image
from fpstate.x86.program import (
    BUFFER_SIZE,
    FORMS32,
    MNEMONICS,
    Fault,
    Outcome,
    Placement,
    Program,
    check_program,
)
from fpstate.x86.xfeatures import XFEATURE_MASK_XTILE_DATA, bits

# --- what this CPU has -------------------------------------------------------------------

#: CPUID flags: name -> (leaf, subleaf, register index EAX=0..EDX=3, bit).
CPUID_FLAGS: dict[str, tuple[int, int, int, int]] = {
    "FPU": (1, 0, 3, 0),
    "MMX": (1, 0, 3, 23),
    "FXSR": (1, 0, 3, 24),
    "SSE": (1, 0, 3, 25),
    "SSE2": (1, 0, 3, 26),
    "XSAVE": (1, 0, 2, 26),
    "OSXSAVE": (1, 0, 2, 27),
    "AVX": (1, 0, 2, 28),
    "AVX512F": (7, 0, 1, 16),
    "AVX512BW": (7, 0, 1, 30),
    "PKU": (7, 0, 2, 3),
    "OSPKE": (7, 0, 2, 4),
    "AMX-TILE": (7, 0, 3, 24),
    "XSAVEOPT": (0xD, 1, 0, 0),
    "XSAVEC": (0xD, 1, 0, 1),
    "XGETBV1": (0xD, 1, 0, 2),
    "XSAVES": (0xD, 1, 0, 3),
}
#: XCR0 bits the OS must have set for an instruction not to #UD (SDM 13.3).
XCR0_NEEDS: dict[str, int] = {"AVX": 0x6, "AVX-512": 0xE6, "AMX": 0x60000}

_XSAVE = ("XSAVE", "OSXSAVE")
_AMX = ("AMX-TILE", "AMX")
#: mnemonic -> CPUID flags (in the order to report) and XCR0 needs, without which it is #UD.
REQUIRES: dict[str, tuple[str, ...]] = {
    "XSAVE": _XSAVE, "XRSTOR": _XSAVE, "XGETBV": _XSAVE, "XSETBV": _XSAVE,
    "XSAVEOPT": (*_XSAVE, "XSAVEOPT"), "XSAVEC": (*_XSAVE, "XSAVEC"),
    "XSAVES": (*_XSAVE, "XSAVES"), "XRSTORS": (*_XSAVE, "XSAVES"),
    "FXSAVE": ("FXSR",), "FXRSTOR": ("FXSR",),
    "MOVDQU": ("SSE2",), "LDMXCSR": ("SSE",), "STMXCSR": ("SSE",),
    "VMOVDQU": ("AVX", "AVX"), "VZEROUPPER": ("AVX", "AVX"), "VZEROALL": ("AVX", "AVX"),
    "VMOVDQU64": ("AVX512F", "AVX-512"), "KMOVQ": ("AVX512BW", "AVX-512"),
    "FLD": ("FPU",), "FLDCW": ("FPU",), "FNINIT": ("FPU",), "FNSTSW": ("FPU",),
    "FNSTCW": ("FPU",), "FNCLEX": ("FPU",), "FLDZ": ("FPU",), "FLD1": ("FPU",),
    "EMMS": ("MMX",),
    "WRPKRU": ("PKU", "OSPKE"), "RDPKRU": ("PKU", "OSPKE"),
    "LDTILECFG": _AMX, "STTILECFG": _AMX, "TILELOADD": _AMX, "TILESTORED": _AMX,
    "TILEZERO": _AMX, "TILERELEASE": _AMX,
}
# The forms without REX.W need what their 64-bit forms need.
REQUIRES.update({f: REQUIRES[f[:-2]] for f in FORMS32})
assert set(REQUIRES) == MNEMONICS, set(REQUIRES) ^ MNEMONICS


def _regname(reg: int) -> str:
    return "EAX EBX ECX EDX".split()[reg]


@cache
def host_lacks(mnemonic: str) -> str | None:
    """Why ``mnemonic`` would #UD on this host for lack of a feature (a skip reason), or None.

    Looks at CPUID (the instruction exists), CR4.OSXSAVE/CR4.PKE as CPUID reports them
    (OSXSAVE, OSPKE) and XCR0 (the OS enabled the state). Supervisor-only instructions
    (XSAVES, XRSTORS, XSETBV) are "supported" when they exist: their #GP at CPL 3 is an answer.
    """
    if mnemonic not in REQUIRES:
        raise ProgramError(f"unknown mnemonic {mnemonic!r}")
    if not native.is_x86_64():
        import platform

        return f"the host is {platform.machine()}, not x86-64"
    for need in REQUIRES[mnemonic]:
        if need in XCR0_NEEDS:
            if not host_has("OSXSAVE"):
                return "host lacks OSXSAVE: CPUID.(EAX=1):ECX[27]=0 (XCR0 not enabled)"
            xcr0 = host_xsave().xcr0
            if xcr0 & XCR0_NEEDS[need] != XCR0_NEEDS[need]:
                return f"host XCR0 {xcr0:#x} lacks {need} state {XCR0_NEEDS[need]:#x}"
            continue
        leaf, sub, reg, bit = CPUID_FLAGS[need]
        if leaf == 0xD and not host_has("OSXSAVE"):
            return "host lacks OSXSAVE: CPUID.(EAX=1):ECX[27]=0"
        if not host_has(need):
            return f"host lacks {need}: CPUID.(EAX={leaf:#x},ECX={sub}):{_regname(reg)}[{bit}]=0"
    return None


def host_supports(mnemonic: str) -> bool:
    """True when this CPU and kernel let ``mnemonic`` execute (see `host_lacks`)."""
    return host_lacks(mnemonic) is None


@cache
def host_has(flag: str) -> bool:
    """One CPUID flag of `CPUID_FLAGS` on this CPU."""
    leaf, sub, reg, bit = CPUID_FLAGS[flag]
    if native.cpuid(0)[0] < leaf:
        return False
    return bool(native.cpuid(leaf, sub)[reg] >> bit & 1)


@dataclass(frozen=True, slots=True)
class HostXsave:
    """This host's XSAVE configuration, read once."""

    xcr0: int  #: XGETBV(0)
    size: int  #: CPUID.(EAX=0DH,ECX=0):EBX, the standard size for XCR0
    offsets: dict[int, tuple[int, int]]  #: component -> (standard offset, size), from CPUID
    xgetbv1: bool  #: CPUID.(EAX=0DH,ECX=1):EAX[2]


@cache
def host_xsave() -> HostXsave:
    """XCR0, the XSAVE size and the component offsets of this CPU (HostUnavailable without)."""
    native.require_x86_64()
    if not host_has("XSAVE") or not host_has("OSXSAVE"):
        raise HostUnavailable("host lacks XSAVE enabled by the OS: CPUID.(EAX=1):ECX[27]=0")
    xcr0 = native.xgetbv(0)
    offsets = {}
    for i in bits(xcr0):
        if i >= 2:
            eax, ebx, _, _ = native.cpuid(0xD, i)
            offsets[i] = (ebx, eax)
    size = native.cpuid(0xD, 0)[1]
    return HostXsave(xcr0, size, offsets, bool(native.cpuid(0xD, 1)[0] >> 2 & 1))


# --- the arena ---------------------------------------------------------------------------

# Control block (displacements from the arena base, which rbx holds in the child).
STEP, DONE, FAULTED, SIGNO, SICODE, TRAPNO, ERR, RIP, XINUSE = 0, 8, 16, 24, 28, 32, 40, 48, 64
SIGACTION = 128  #: struct kernel_sigaction {handler, flags, restorer, mask}
RLIMIT0 = 192  #: struct rlimit {0, 0}
SCRATCH = 256  #: 64 bytes for STTILECFG before TILELOADD/TILESTORED
STACK_BOTTOM, STACK_TOP = 0x1000, 0x11000  #: the vfork child's stack (signal frames too)
START = STACK_TOP  #: the start image
FINAL = START + BUFFER_SIZE  #: the final image
VALUES = FINAL + BUFFER_SIZE  #: value slots, then buffers, then the data pool

SA_SIGINFO, SA_RESTORER = 0x4, 0x04000000
CLONE_VM, CLONE_VFORK = 0x100, 0x4000
SYS_RT_SIGACTION, SYS_CLONE, SYS_ARCH_PRCTL, SYS_EXIT_GROUP, SYS_PRLIMIT64 = 13, 56, 158, 231, 302
ARCH_REQ_XCOMP_PERM, RLIMIT_CORE = 0x1023, 4
ILL_ILLOPC = 1
CAUGHT = (signal.SIGILL, signal.SIGBUS, signal.SIGFPE, signal.SIGSEGV)
#: struct ucontext: uc_mcontext.gregs at 40; REG_ERR 19, REG_TRAPNO 20, REG_RIP 16.
UC_ERR, UC_TRAPNO, UC_RIP = 40 + 8 * 19, 40 + 8 * 20, 40 + 8 * 16
TRAP_VECTORS = {0: "#DE", 6: "#UD", 7: "#NM", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF",
                17: "#AC", 19: "#XM"}
SPAWN_MODES = ("vfork", "fork")
SPAWN_OFFSET = 128  #: of the spawn stub in the code


def _up(n: int, a: int = 64) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True, slots=True)
class _Layout:
    size: int
    buffers: tuple[int, ...]
    operands: tuple[Operands, ...]
    pool: tuple[tuple[int, bytes], ...]
    #: (arena offset, size, key) of the pages of each buffer with a protection key
    keyed: tuple[tuple[int, int, int], ...] = ()


#: The pages a keyed buffer owns: BUFFER_SIZE bytes after up to 63 bytes of misalignment.
KEYED_SPAN = (BUFFER_SIZE + 64 + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE


def _layout(program: Program) -> _Layout:
    at = VALUES
    values = []
    for insn in program.insns:
        values.append(at if insn.mnemonic in VALUE_MNEMONICS else 0)
        at += 8 if insn.mnemonic in VALUE_MNEMONICS else 0
    at = _up(at)
    buffers, keyed = [], []
    for b in program.buffers:
        if b.pkey:  # pages of its own, which pkey_mprotect gives the key
            at = _up(at, mmap.PAGESIZE)
            keyed.append((at, KEYED_SPAN, b.pkey))
            buffers.append(at + b.misalign)
            at += KEYED_SPAN
            continue
        buffers.append(at + b.misalign)
        at += BUFFER_SIZE + 64
    pool, operands = [], []
    for insn, value in zip(program.insns, values, strict=True):
        data = operand_data(insn)
        where = 0
        if data:
            where = at
            pool.append((at, data))
            at = _up(at + len(data))
        buf = buffers[insn.buf] if 0 <= insn.buf < len(buffers) else 0
        operands.append(Operands(buf=buf, data=where, value=value, scratch=SCRATCH))
    return _Layout(_up(at, mmap.PAGESIZE), tuple(buffers), tuple(operands), tuple(pool),
                   tuple(keyed))


@cache
def _fixed_code(xcr0: int, arena: int, base: int) -> tuple[bytes, int]:
    """The code every program shares: (handler + spawn + prologue, offset of the body entry).

    The prologue ends with the start XRSTOR; the program's instructions follow it directly."""
    a = Asm(base)
    # The signal handler: record, then exit_group(0). rdi = signo, rsi = siginfo, rdx = ucontext.
    a.mov64(Register.RBX, arena)
    a.store32(SIGNO, Register.EDI)
    for dst, src, disp in ((SICODE, Register.RSI, 8), (TRAPNO, Register.RDX, UC_TRAPNO),
                           (ERR, Register.RDX, UC_ERR), (RIP, Register.RDX, UC_RIP)):
        a.emit(Instruction.create_reg_mem(Code.MOV_R64_RM64, Register.RAX,
                                          MemoryOperand(src, displ=disp)))
        if dst == SICODE:
            a.store32(dst, Register.EAX)
        else:
            a.store64(dst, Register.RAX)
    a.store_imm(FAULTED, 1)
    a.syscall(SYS_EXIT_GROUP, 0)

    # spawn(arena) -> pid: clone(CLONE_VM|CLONE_VFORK|SIGCHLD) onto the arena's stack; the
    # child (rax = 0) continues at the body entry with rdi = arena.
    assert len(a.code) < SPAWN_OFFSET
    a.code += b"\xcc" * (SPAWN_OFFSET - len(a.code))
    a.emit(Instruction.create_reg(Code.PUSH_R64, Register.RBX))
    a.emit(Instruction.create_reg_reg(Code.MOV_R64_RM64, Register.RBX, Register.RDI))
    a.mov64(Register.R8, 0)
    a.syscall(SYS_CLONE, CLONE_VM | CLONE_VFORK | signal.SIGCHLD, arena + STACK_TOP, 0, 0)
    a.emit(Instruction.create_reg_reg(Code.TEST_RM64_R64, Register.RAX, Register.RAX))
    child = a.here + 6 + 1 + 1  # je rel32, pop rbx, ret
    a.branch(Code.JE_REL32_64, child)
    a.emit(Instruction.create_reg(Code.POP_R64, Register.RBX))
    a.op(Code.RETNQ)
    assert a.here == child
    a.emit(Instruction.create_reg_reg(Code.MOV_R64_RM64, Register.RDI, Register.RBX))

    # The body, entered with rdi = arena (from the spawn stub or the forked child).
    body = len(a.code)
    a.emit(Instruction.create_reg_reg(Code.MOV_R64_RM64, Register.RBX, Register.RDI))
    for sig in CAUGHT:
        a.syscall(SYS_RT_SIGACTION, sig, arena + SIGACTION, 0, 8)
    a.syscall(SYS_PRLIMIT64, 0, RLIMIT_CORE, arena + RLIMIT0, 0)
    if xcr0 & XFEATURE_MASK_XTILE_DATA:
        a.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_MASK_XTILE_DATA.bit_length() - 1)
    a.edx_eax(xcr0)
    a.emit(Instruction.create_mem(Code.XRSTOR64_MEM, mem(START)))
    return bytes(a.code), body


@cache
def _epilogue(xcr0: int, xgetbv1: bool) -> bytes:
    """XGETBV(1), the final XSAVE, the done mark and exit_group(0) (position independent)."""
    a = Asm(0)
    if xgetbv1:
        a.mov32(Register.ECX, 1)
        a.op(Code.XGETBV)
        a.store32(XINUSE, Register.EAX)
        a.store32(XINUSE + 4, Register.EDX)
    a.edx_eax(xcr0)
    a.emit(Instruction.create_mem(Code.XSAVE64_MEM, mem(FINAL)))
    a.store_imm(DONE, 1)
    a.syscall(SYS_EXIT_GROUP, 0)
    return bytes(a.code)


def _generate(program: Program, lay: _Layout, host: HostXsave, arena: int, base: int
              ) -> tuple[bytes, int, tuple[tuple[int, ...], ...]]:
    """Machine code: (code, body offset, fault addresses allowed per step); the spawn stub is at
    SPAWN_OFFSET."""
    prefix, body = _fixed_code(host.xcr0, arena, base)
    a = Asm(base)
    a.code += prefix
    allowed = []
    for n, (insn, ops) in enumerate(zip(program.insns, lay.operands, strict=True)):
        a.store_imm(STEP, n)
        if insn.mnemonic in TILE_MOVES:  # stride: the tile's current bytes per row
            allowed.append(emit_tile_move(a, insn, ops))
        else:
            allowed.append((emit_insn(a, insn, ops),))
    a.store_imm(STEP, len(program.insns))
    a.code += _epilogue(host.xcr0, host.xgetbv1)
    return bytes(a.code), body, tuple(allowed)


#: The protection keys this process allocated for keyed buffers: 1 .. _PKEYS[0] (a fork
#: inherits the allocation with the mm, so a forked process may use them too).
_PKEYS = [0]


class Runner:
    """Runs programs on this CPU; owns the arena and the executable mapping (reused, so one
    Runner runs one program at a time: not thread-safe)."""

    def __init__(self, spawn: str = "vfork") -> None:
        if spawn not in SPAWN_MODES:
            raise ProgramError(f"spawn mode {spawn!r}; known: {', '.join(SPAWN_MODES)}")
        self.spawn = spawn
        self.host = host_xsave()
        self._arena: mmap.mmap | None = None
        self._arena_addr = 0
        self._code: native.ExecutableCode | None = None
        self._proto = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_uint64)
        self._spawn_fn: ctypes._CFuncPtr | None = None
        self._spawn_at = 0

    def _ensure(self, arena_size: int, code_size: int) -> None:
        if self._arena is None or len(self._arena) < arena_size:
            self._arena = mmap.mmap(-1, max(arena_size, 1 << 20))  # MAP_SHARED | MAP_ANONYMOUS
            self._arena_addr = ctypes.addressof(ctypes.c_char.from_buffer(self._arena))
        if self._code is None or self._code.size < code_size:
            self._code = native.ExecutableCode(max(code_size, 1 << 16))

    def run(self, program: Program) -> Outcome:
        """`run_program` with this runner's arena and spawn mode."""
        check_program(program)
        if program.cpl == 0:
            raise HostUnavailable("CPL 0 needs a KVM guest")
        lay = _layout(program)
        self._ensure(lay.size, 128 * len(program.insns) + 8192)
        assert self._arena is not None and self._code is not None
        arena, base = self._arena_addr, self._code.address
        code, body, allowed = _generate(program, lay, self.host, arena, base)
        assert len(code) <= self._code.size, f"{len(code)} bytes of code"
        self._code.mem[: len(code)] = code
        m = self._arena
        m[: lay.size] = bytes(lay.size)
        m[STEP:STEP + 8] = struct.pack("<q", -1)
        m[SIGACTION:SIGACTION + 32] = struct.pack("<QQQQ", base, SA_SIGINFO | SA_RESTORER, base, 0)
        m[START:START + len(program.start)] = program.start
        for b, buf in zip(lay.buffers, program.buffers, strict=True):
            m[b:b + len(buf.data)] = buf.data
        for at, data in lay.pool:
            m[at:at + len(data)] = data
        # Keyed pages only while the child runs: this process's threads keep their own PKRU,
        # in which keys 1.. may be closed, and never touch them.
        self._protect(lay.keyed)
        try:
            status = self._spawn(base + body, base + SPAWN_OFFSET)
        finally:
            self._protect(tuple((at, n, 0) for at, n, _ in lay.keyed))
        return replace(self._outcome(program, lay, status, allowed),
                       placement=_placement(code, base, arena, allowed, lay))

    def _protect(self, keyed: tuple[tuple[int, int, int], ...]) -> None:
        """pkey_mprotect(PROT_READ | PROT_WRITE) of each (offset, size, key) of the arena;
        keys 1..MAX_PKEY are allocated (pkey_alloc) by the first runner that needs them, and
        must come out as 1, 2, ... -- a program names them by number in the PKRU it loads."""
        if not keyed:
            return
        from fpstate.host.child import SYS, raw_syscall

        need = max(k for _, _, k in keyed)
        while _PKEYS[0] < need:
            got = raw_syscall(SYS["pkey_alloc"], 0, 0)
            if got < 0:
                raise HostUnavailable(f"pkey_alloc failed with errno {-got}: no protection "
                                      "keys for keyed buffers (CPUID.(EAX=7,ECX=0):ECX.PKU/"
                                      "OSPKE)")
            if got != _PKEYS[0] + 1:
                raise HostUnavailable(f"pkey_alloc gave key {got}, not {_PKEYS[0] + 1}: "
                                      "this process allocated protection keys before")
            _PKEYS[0] = got
        for at, n, key in keyed:
            ret = raw_syscall(SYS["pkey_mprotect"], self._arena_addr + at, n,
                              mmap.PROT_READ | mmap.PROT_WRITE, key)
            if ret:
                raise HostUnavailable(f"pkey_mprotect(key {key}) failed with errno {-ret}")

    def _spawn(self, body: int, spawn: int) -> int:
        if self.spawn == "vfork":
            if self._spawn_fn is None or self._spawn_at != spawn:
                self._spawn_fn, self._spawn_at = self._proto(spawn), spawn
            pid = self._spawn_fn(self._arena_addr)
            if pid < 0:
                raise HostUnavailable(f"clone(CLONE_VM|CLONE_VFORK) failed: errno {-pid}")
        else:
            pid = os.fork()
            if pid == 0:  # child: the code never returns (exit_group); 70 marks a runner bug
                try:
                    self._proto(body)(self._arena_addr)
                finally:
                    os._exit(70)
        return os.waitpid(pid, 0)[1]

    def _outcome(self, program: Program, lay: _Layout, status: int,
                 allowed: tuple[tuple[int, ...], ...]) -> Outcome:
        m, host = self._arena, self.host
        assert m is not None

        def q(at: int, fmt: str = "<Q") -> int:
            return struct.unpack_from(fmt, m, at)[0]

        step = q(STEP, "<q")
        fault = None
        if q(FAULTED):
            signo, si_code, trapno = q(SIGNO, "<i"), q(SICODE, "<i"), q(TRAPNO)
            fault = Fault(fault_vector(signo, si_code, trapno),
                          f"{signal.Signals(signo).name} si_code={si_code:#x} trapno={trapno} "
                          f"err={q(ERR):#x}")
            if 0 <= step < len(allowed):
                assert q(RIP) in allowed[step], (
                    f"runner bug: fault at {q(RIP):#x}, step {step} is at {allowed[step]}")
        elif os.WIFSIGNALED(status):
            signo = os.WTERMSIG(status)
            if signo not in CAUGHT:
                raise HostUnavailable(f"runner child killed by {signal.Signals(signo).name}")
            fault = Fault(fault_vector(signo, None, None),
                          f"killed by {signal.Signals(signo).name}")
        else:
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and q(DONE), (
                f"runner bug: child status {status:#x}, step {step}, done {q(DONE)}")
        if fault is not None and step < 0:
            raise ProgramError(
                f"start image rejected: XRSTOR64 of it with RFBM=XCR0 raised {fault}")
        assert fault is None or step < len(program.insns), (
            f"runner bug: {fault} after the last instruction")
        ran = program.insns if fault is None else program.insns[:step]
        values = []
        for insn, ops in zip(ran, lay.operands[:len(ran)], strict=True):
            if insn.mnemonic in VALUE_MNEMONICS:
                values.append(q(ops.value))
        buffers = tuple(bytes(m[b:b + BUFFER_SIZE]) for b in lay.buffers)
        if fault is not None:
            return Outcome(buffers, tuple(values), fault, step)
        xinuse = q(XINUSE) & host.xcr0 if host.xgetbv1 else None
        final = normalise_image(bytes(m[FINAL:FINAL + host.size]), host.xcr0, host.offsets)
        return Outcome(buffers, tuple(values), None, None, xinuse, final)


def _placement(code: bytes, base: int, arena: int, allowed: tuple[tuple[int, ...], ...],
               lay: _Layout) -> tuple[Placement, ...]:
    """Where each program instruction ran: its address (the last of its step's addresses),
    its data-pool operand's address and the child's CS and DS, which it inherits from this
    process (`fpstate.host.asm.placement`, `fpstate.host.native.segment_selectors`)."""
    selectors = native.segment_selectors()
    return tuple(placement(code, base, addrs[-1], arena + ops.data if ops.data else 0,
                           selectors)
                 for addrs, ops in zip(allowed, lay.operands, strict=True))


def fault_vector(signo: int, si_code: int | None, trapno: int | None) -> str:
    """The exception vector behind a signal (see the module docstring, "Faults")."""
    if signo == signal.SIGILL:
        return "#NM" if si_code == ILL_ILLOPC else "#UD"
    if trapno is not None and trapno in TRAP_VECTORS:
        return TRAP_VECTORS[trapno]
    return {signal.SIGSEGV: "#GP", signal.SIGBUS: "#GP", signal.SIGFPE: "#MF"}.get(
        signal.Signals(signo), f"signal {signo}")


_runners: dict[str, Runner] = {}


def run_program(program: Program, spawn: str = "vfork") -> Outcome:
    """Execute ``program`` on this CPU at CPL 3 (see `fpstate.x86.program` for the contract).

    CPL 0 raises HostUnavailable (it needs a KVM guest); a start image the CPU refuses to
    XRSTOR raises ProgramError. Everything else, faults included, is in the Outcome.
    """
    if spawn not in _runners:
        _runners[spawn] = Runner(spawn)
    return _runners[spawn].run(program)


__all__ = ["HostXsave", "Runner", "fault_vector", "host_lacks", "host_supports",
           "host_xsave", "run_program"]
