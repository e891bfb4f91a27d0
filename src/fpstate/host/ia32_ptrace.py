"""ptrace FPU regsets of a 32-bit (compat) tracee on the real kernel.

A 64-bit tracer (this Python process) reads and writes the FP state of a static 32-bit ELF
running under IA32_EMULATION. Kernel paths (arch/x86/kernel/ptrace.c, kernel/ptrace.c,
arch/x86/kernel/fpu/regset.c):

* ``task_user_regset_view`` returns ``user_x86_32_view`` when the tracee's saved CS is not a
  64-bit one (``!user_64bit_mode(task_pt_regs(task))``; here CS = __USER32_CS 0x23), so
  ``find_regset`` looks the note up in ``x86_32_regsets``:
  NT_PRFPREG is REGSET32_FP (n = 27 words of 4 bytes: the 108-byte
  ``struct user_i387_ia32_struct``, ``fpregs_get`` / ``fpregs_set``), NT_PRXFPREG
  (0x46e62b7f) is REGSET32_XFP (128 words: the 512-byte ``fxregs_state``, ``xfpregs_get`` /
  ``xfpregs_set``), NT_X86_XSTATE is REGSET32_XSTATE (``xstateregs_get`` / ``_set``).
* ``ptrace_regset`` (kernel/ptrace.c): -EINVAL unless iov_len is a multiple of the regset's
  word (``regset->size``, 4 for the two FP regsets), then iov_len = min(iov_len, n * size)
  is written back to the tracer's iovec and that many bytes are copied.
* ``fpregs_get``: the FP part of the saved XSAVE image (``copy_xstate_to_uabi_buf`` with
  XSTATE_COPY_FP) goes through ``__convert_from_fxsr``: cwd/swd | 0xffff0000, the full tag word
  of ``twd_fxsr_to_i387`` (| 0xffff0000), fip/foo = the low halves of the 64-bit rip/rdp,
  fcs = ``task_pt_regs(tsk)->cs`` (no FOP in the high half on x86-64), fos =
  ``tsk->thread.ds | 0xffff0000``, then ST0-7 as 10-byte registers.
* ``fpregs_set``: -EINVAL unless pos == 0 and count == 108; ``convert_to_fxsr`` stores cwd,
  swd, the abridged tag (``twd_i387_to_fxsr``), FOP = fcs >> 16, rip = fip, rdp = foo
  (zero-extended; the selectors are ignored) and the 10-byte registers into the FXSAVE slots;
  then XSTATE_BV |= XFEATURE_MASK_FP. ``fpu_force_restore`` makes the tracee reload it.
* ``xfpregs_get`` / ``xfpregs_set``: the 512-byte legacy area in the kernel's own (64-bit,
  XSAVE64/FXSAVE64) format; the set wants exactly 512 bytes and a valid MXCSR.

The probe: the child does PTRACE_TRACEME and execs a static 32-bit ELF (assembled with
iced-x86's 32-bit BlockEncoder) that FXRSTORs the given image, stops itself with
``kill(getpid(), SIGSTOP)`` through ``int 0x80``, and once continued FXSAVEs (32-bit format)
and FNSTENVs to a buffer, writes that to stdout (a pipe) and exits.
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from fpstate.errors import HostUnavailable
from fpstate.host.child import errno_name, fork_child, kill_and_reap
from fpstate.host.ia32 import (
    NR_EXIT_GROUP,
    NR_GETPID,
    NR_KILL,
    NR_WRITE,
    Fnstenv32,
    Fxsave32,
    static_elf32,
)
from fpstate.host.ptrace import (
    NT_PRFPREG,
    NT_X86_XSTATE,
    PTRACE_CONT,
    PTRACE_TRACEME,
    READ_BUFFER,
    RegsetRead,
    getregset,
    ptrace_call,
    setregset,
    wait_status,
)

NT_PRXFPREG = 0x46E62B7F  #: REGSET32_XFP: struct fxregs_state (include/uapi/linux/elf.h)
USER_I387_IA32_SIZE = 108  #: sizeof(struct user_i387_ia32_struct): 7 u32 + 8 x 10 bytes
FXSAVE_SIZE = 512
SIGSTOP = 19

#: Offsets in struct user_i387_ia32_struct (arch/x86/include/asm/user32.h).
FP_CWD, FP_SWD, FP_TWD, FP_FIP, FP_FCS, FP_FOO, FP_FOS, FP_ST = 0, 4, 8, 12, 16, 20, 24, 28

#: iov_len values of the word-size probe: 12 is 3 words of REGSET32_FP, 10 is not a multiple
#: of regset->size (4), which ptrace_regset rejects with -EINVAL.
WORD_RULE_LENGTHS = (12, 10)
SHORT_SET_LENGTH = 104  #: 26 words: a whole number of words, but fpregs_set wants 108

# -- probe memory map (one RWX PT_LOAD) -------------------------------------------------------

_BASE = 0x08048000
_CODE = _BASE + 0x100
_IMAGE = _BASE + 0x1000  #: the 512-byte image FXRSTOR loads (16-aligned)
_OUT = _BASE + 0x2000  #: zero-filled: FXSAVE (512) then FNSTENV (28)
_O_FNSTENV = FXSAVE_SIZE
_OUT_SIZE = FXSAVE_SIZE + 28


@dataclass(frozen=True, slots=True)
class UserI387Ia32:
    """struct user_i387_ia32_struct as ``fpregs_get`` (``__convert_from_fxsr``) fills it."""

    cwd: int
    swd: int
    twd: int
    fip: int
    fcs: int
    foo: int
    fos: int
    st: tuple[bytes, ...]  #: st_space: ST0-7, 10 bytes each

    @classmethod
    def parse(cls, raw: bytes) -> UserI387Ia32:
        """Split a 108-byte NT_PRFPREG image of a compat tracee into its fields."""
        if len(raw) < USER_I387_IA32_SIZE:
            raise ValueError(f"user_i387_ia32_struct needs 108 bytes, got {len(raw)}")
        words = struct.unpack_from("<7I", raw, 0)
        st = tuple(raw[FP_ST + 10 * i:FP_ST + 10 * i + 10] for i in range(8))
        return cls(*words, st=st)

    def pack(self) -> bytes:
        """The 108 bytes ``fpregs_set`` takes (the inverse of ``parse``)."""
        if len(self.st) != 8 or any(len(r) != 10 for r in self.st):
            raise ValueError("st must be 8 registers of 10 bytes")
        return struct.pack("<7I", self.cwd, self.swd, self.twd, self.fip, self.fcs, self.foo,
                           self.fos) + b"".join(self.st)


@dataclass(frozen=True, slots=True)
class Ia32PtraceRun:
    """What a 64-bit tracer saw of a 32-bit tracee's FP regsets, and what the tracee ran with
    afterwards. Every ``RegsetRead`` records the errno (0 = success), the iov_len offered, the
    iov_len the kernel wrote back (``returned``) and the bytes."""

    stop_signal: int  #: the signal of the stop the regsets were read in (SIGSTOP)
    fp_lengths: tuple[RegsetRead, ...]  #: NT_PRFPREG, one per ``get_lengths`` (fpregs_get)
    xfp: RegsetRead  #: NT_PRXFPREG offered 512 bytes (xfpregs_get)
    xstate: RegsetRead  #: NT_X86_XSTATE offered READ_BUFFER bytes (xstateregs_get)
    word_rule: tuple[RegsetRead, ...]  #: NT_PRFPREG offered 12, then 10 bytes (ptrace_regset)
    short_set_errno: int | None  #: SETREGSET NT_PRFPREG with 104 bytes (fpregs_set); None if
    #: no ``set_fp``
    set_errno: int | None  #: SETREGSET NT_PRFPREG with ``set_fp`` (fpregs_set)
    fp_after_set: RegsetRead | None  #: NT_PRFPREG (108) read right after ``set_fp``
    xfp_set_errno: int | None  #: SETREGSET NT_PRXFPREG with ``set_xfp`` (xfpregs_set)
    xfp_after_set: RegsetRead | None  #: NT_PRXFPREG (512) read right after ``set_xfp``
    #: the tracee's own 32-bit FXSAVE after PTRACE_CONT. Its FCS/FDS survive only when the
    #: kernel skipped the restore (no set, registers still owned); after an XRSTOR of the
    #: kernel's 64-bit-format image (always after a set: fpu_force_restore) they read 0.
    after_fxsave: bytes | None
    after_fnstenv: bytes | None  #: its 28-byte FNSTENV (taken after the FXSAVE)
    exit_code: int | None  #: the tracee's exit status (0), None if a signal ended it
    exit_signal: int | None

    @property
    def fp(self) -> RegsetRead:
        """The NT_PRFPREG read of the first of ``get_lengths``."""
        return self.fp_lengths[0]

    @property
    def env(self) -> UserI387Ia32:
        """``fp`` parsed."""
        return UserI387Ia32.parse(self.fp.data)

    @property
    def env_after_set(self) -> UserI387Ia32 | None:
        """``fp_after_set`` parsed (None without ``set_fp`` or if the read failed)."""
        if self.fp_after_set is None or self.fp_after_set.errno:
            return None
        return UserI387Ia32.parse(self.fp_after_set.data)

    @property
    def after(self) -> Fxsave32 | None:
        """``after_fxsave`` parsed."""
        return None if self.after_fxsave is None else Fxsave32.parse(self.after_fxsave)

    @property
    def after_env(self) -> Fnstenv32 | None:
        """``after_fnstenv`` parsed."""
        return None if self.after_fnstenv is None else Fnstenv32.parse(self.after_fnstenv)


# -- the 32-bit program -----------------------------------------------------------------------

def _program_code() -> bytes:
    """FXRSTOR; kill(getpid(), SIGSTOP); FXSAVE; FNSTENV; write(1, out); exit_group(0)."""
    try:
        import iced_x86 as x
    except ImportError as e:  # pragma: no cover - iced-x86 is a dependency
        raise HostUnavailable("iced-x86 is not installed: cannot assemble the probe") from e
    In, C, R = x.Instruction, x.Code, x.Register
    items: list[Any] = []

    def mem(addr: int) -> Any:
        return x.MemoryOperand(displ=addr, displ_size=4)

    def mov(reg: int, value: int) -> None:
        items.append(In.create_reg_u32(C.MOV_R32_IMM32, reg, value & 0xFFFFFFFF))

    def int80() -> None:
        items.append(In.create_u32(C.INT_IMM8, 0x80))

    items.append(In.create_mem(C.FXRSTOR_M512BYTE, mem(_IMAGE)))
    mov(R.EAX, NR_GETPID)
    int80()
    items.append(In.create_reg_reg(C.MOV_R32_RM32, R.EBX, R.EAX))
    mov(R.ECX, SIGSTOP)
    mov(R.EAX, NR_KILL)
    int80()  # the tracer sees the SIGSTOP stop here; PTRACE_CONT(0) resumes after it
    items.append(In.create_mem(C.FXSAVE_M512BYTE, mem(_OUT)))
    items.append(In.create_mem(C.FNSTENV_M28BYTE, mem(_OUT + _O_FNSTENV)))
    mov(R.EBX, 1)
    mov(R.ECX, _OUT)
    mov(R.EDX, _OUT_SIZE)
    mov(R.EAX, NR_WRITE)
    int80()
    mov(R.EBX, 0)
    mov(R.EAX, NR_EXIT_GROUP)
    int80()
    items.append(In.create(C.UD2))
    enc = x.BlockEncoder(32)
    enc.add_many(items)
    code = bytes(enc.encode(_CODE))
    if len(code) > _IMAGE - _CODE:
        raise ValueError(f"probe code is {len(code)} bytes")
    return code


def _elf32(code: bytes, image: bytes) -> bytes:
    """The probe's ELF: code at _CODE, the FXRSTOR image at _IMAGE, then a zero-filled (bss)
    output page."""
    return static_elf32({_CODE: code, _IMAGE: image}, entry=_CODE,
                        memsz=_OUT - _BASE + 0x1000, base=_BASE)


def stopping_program(fxsave: bytes) -> bytes:
    """The probe's static 32-bit ELF on its own: FXRSTOR ``fxsave`` (512 bytes, 32-bit
    format), stop itself with SIGSTOP, then (continued) FXSAVE and FNSTENV to stdout and exit
    0. For callers that stop or kill it some other way (a core dump of a 32-bit process)."""
    if len(fxsave) != FXSAVE_SIZE:
        raise ValueError("fxsave must be a 512-byte image")
    return _elf32(_program_code(), fxsave)


# -- ptrace -----------------------------------------------------------------------------------

def _wait(pid: int, deadline: float) -> int:
    try:
        return wait_status(pid, deadline)
    except TimeoutError:
        raise HostUnavailable(f"the traced 32-bit probe {pid} did not report in time") from None


def _describe(status: int) -> str:
    if os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        if code == 3:
            return "its PTRACE_TRACEME failed (already traced, or ptrace forbidden)"
        if 100 <= code < 230:
            err = code - 100
            return (f"its execve of the 32-bit ELF failed with {errno_name(err)}: the kernel "
                    "lacks IA32_EMULATION, was booted with ia32_emulation=false, or the temp "
                    "directory is noexec")
        return f"it exited with status {code}"
    if os.WIFSIGNALED(status):
        return f"it was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"it stopped with {signal.Signals(os.WSTOPSIG(status)).name}"


def ia32_ptrace(fxsave: bytes, *, set_fp: bytes | None = None, set_xfp: bytes | None = None,
                get_lengths: tuple[int, ...] = (USER_I387_IA32_SIZE,),
                timeout: float = 20.0) -> Ia32PtraceRun:
    """Trace a 32-bit process whose x87/SSE state was FXRSTORed from ``fxsave`` (512 bytes,
    32-bit format) while it is stopped by its own SIGSTOP, and report its FP regsets.

    In the stop: NT_PRFPREG once per iov_len of ``get_lengths`` (``fpregs_get`` behind
    ``ptrace_regset``'s word-size check and clamp), NT_PRXFPREG with 512 bytes
    (``xfpregs_get``), NT_X86_XSTATE with READ_BUFFER bytes (``xstateregs_get``), NT_PRFPREG
    with iov_len 12 and 10 (``ptrace_regset``: a multiple of regset->size = 4, or -EINVAL).
    With ``set_fp``: SETREGSET NT_PRFPREG with its first 104 bytes (``fpregs_set``: -EINVAL,
    count != 108), then with all of it (``convert_to_fxsr``), then NT_PRFPREG again. With
    ``set_xfp``: SETREGSET NT_PRXFPREG (``xfpregs_set``), then NT_PRXFPREG again. Then
    PTRACE_CONT with signal 0 and the tracee's own FXSAVE/FNSTENV of the state it resumed
    with. HostUnavailable when the 32-bit program cannot run or cannot be traced.
    """
    if len(fxsave) != FXSAVE_SIZE:
        raise ValueError("fxsave must be a 512-byte image")
    if set_fp is not None and len(set_fp) < SHORT_SET_LENGTH:
        raise ValueError(f"set_fp must hold at least {SHORT_SET_LENGTH} bytes")
    if not get_lengths:
        raise ValueError("get_lengths must name at least one iov_len")
    elf = _elf32(_program_code(), fxsave)
    tmp = tempfile.mkdtemp(prefix="fpstate-ia32-ptrace-")
    path = os.path.join(tmp, "probe32")
    with open(path, "wb") as f:
        f.write(elf)
    os.chmod(path, 0o700)
    rfd, wfd = os.pipe()

    def body() -> int:  # pragma: no cover - runs in the child
        os.close(rfd)
        if ptrace_call(PTRACE_TRACEME, 0) != 0:
            return 3
        os.dup2(wfd, 1)
        os.close(wfd)
        try:
            os.execv(path, [path])
        except OSError as e:
            return 100 + min(e.errno or 0, 129)
        return 4

    deadline = time.monotonic() + timeout
    pid = 0
    stopped_by: int | None = None
    try:
        pid = fork_child(body)
        os.close(wfd)
        wfd = -1
        status = _wait(pid, deadline)
        if not (os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGTRAP):
            pid = 0 if not os.WIFSTOPPED(status) else pid
            raise HostUnavailable(f"the traced 32-bit probe never reached its exec stop: "
                                  f"{_describe(status)}")
        if ptrace_call(PTRACE_CONT, pid, 0, 0) != 0:
            raise HostUnavailable("PTRACE_CONT of the 32-bit probe failed")
        status = _wait(pid, deadline)
        if not os.WIFSTOPPED(status):
            pid = 0
            raise HostUnavailable(f"the 32-bit probe did not stop itself: {_describe(status)}")
        stop = os.WSTOPSIG(status)
        fp_lengths = tuple(getregset(pid, NT_PRFPREG, n) for n in get_lengths)
        xfp = getregset(pid, NT_PRXFPREG, FXSAVE_SIZE)
        xstate = getregset(pid, NT_X86_XSTATE, READ_BUFFER)
        word_rule = tuple(getregset(pid, NT_PRFPREG, n) for n in WORD_RULE_LENGTHS)
        short_set = set_err = xfp_set_err = None
        fp_after = xfp_after = None
        if set_fp is not None:
            short_set = setregset(pid, NT_PRFPREG, set_fp[:SHORT_SET_LENGTH])
            set_err = setregset(pid, NT_PRFPREG, set_fp)
            fp_after = getregset(pid, NT_PRFPREG, USER_I387_IA32_SIZE)
        if set_xfp is not None:
            xfp_set_err = setregset(pid, NT_PRXFPREG, set_xfp)
            xfp_after = getregset(pid, NT_PRXFPREG, FXSAVE_SIZE)
        if ptrace_call(PTRACE_CONT, pid, 0, 0) != 0:
            raise HostUnavailable("PTRACE_CONT of the stopped 32-bit probe failed")
        status = _wait(pid, deadline)  # the output (540 bytes) fits in the pipe
        if os.WIFSTOPPED(status):  # a signal under ptrace (e.g. SIGSEGV): report it, kill
            stopped_by = os.WSTOPSIG(status)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        pid = 0
        chunks = []
        while chunk := os.read(rfd, 4096):
            chunks.append(chunk)
        out = b"".join(chunks)
    finally:
        if pid:
            kill_and_reap(pid)
        os.close(rfd)
        if wfd >= 0:
            os.close(wfd)
        shutil.rmtree(tmp, ignore_errors=True)
    ran = len(out) == _OUT_SIZE
    return Ia32PtraceRun(
        stop_signal=stop,
        fp_lengths=fp_lengths,
        xfp=xfp,
        xstate=xstate,
        word_rule=word_rule,
        short_set_errno=short_set,
        set_errno=set_err,
        fp_after_set=fp_after,
        xfp_set_errno=xfp_set_err,
        xfp_after_set=xfp_after,
        after_fxsave=out[:FXSAVE_SIZE] if ran else None,
        after_fnstenv=out[_O_FNSTENV:_O_FNSTENV + 28] if ran else None,
        exit_code=os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        exit_signal=(stopped_by if stopped_by is not None
                     else os.WTERMSIG(status) if os.WIFSIGNALED(status) else None),
    )
