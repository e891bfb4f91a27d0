"""What a new task inherits from the real kernel: fork, vfork, clone (thread and CLONE_VM
process) and execve, observed with machine code on both sides.

Kernel paths exercised: ``copy_thread -> fpu_clone`` (arch/x86/kernel/process.c,
arch/x86/kernel/fpu/core.c: the child's fpstate is an XSAVE of the parent's registers with the
child's default features; permissions copied by fpu_inherit_perms for a new thread group),
and ``begin_new_exec -> ... -> fpu_flush_thread`` (fpstate_reset + fpu_reset_fpstate_regs:
init state, default permissions) for execve.

Theory of operation
-------------------
A forked Python child runs machine code that loads every register with a pattern, XSAVEs it,
and makes the fork/vfork/clone syscall itself. The new task XSAVEs its registers the moment the
syscall returns in it, reads ARCH_GET_XCOMP_PERM, and exits; the original task waits for it
(wait4, or a flag for a thread), XSAVEs its own registers again and exits. For execve the
machine code calls execve() on a minimal static ELF (`fpstate.host.child.elf_exec_image`)
whose first instructions XSAVE the registers and write them, with the three GET answers, to
its standard output (a pipe to the parent).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from fpstate.errors import FpstateError, HostUnavailable
from fpstate.host.child import (
    PAGE,
    SYS,
    Asm,
    ChildExit,
    CodePages,
    Reg,
    SharedMemory,
    XsaveImage,
    elf_exec_image,
    fork_child,
    load_patterns,
    pattern_table,
    run_child,
    wait_child,
    xsave_image,
    xsave_slot,
)
from fpstate.host.prctl import ARCH_GET_XCOMP_GUEST_PERM, ARCH_GET_XCOMP_PERM, ARCH_GET_XCOMP_SUPP

CLONE_VM = 0x00000100
CLONE_FS = 0x00000200
CLONE_FILES = 0x00000400
CLONE_SIGHAND = 0x00000800
CLONE_THREAD = 0x00010000
CLONE_SYSVSEM = 0x00040000
#: What pthread_create passes (minus TLS/tid bookkeeping, which the probe does not need).
THREAD_FLAGS = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM

KINDS = ("fork", "vfork", "thread", "clone_vm")


@dataclass(frozen=True, slots=True)
class InheritRun:
    """Registers of the creating task before and after, and of the new task at birth."""

    kind: str
    seed: int
    parent_before: XsaveImage
    child: XsaveImage | None  #: None if the new task never ran its first instruction
    parent_after: XsaveImage | None
    child_perm_ret: int  #: arch_prctl(ARCH_GET_XCOMP_PERM) return in the new task
    child_perm: int
    exit: ChildExit


@dataclass(frozen=True, slots=True)
class ExecRun:
    """Registers and permissions a freshly exec'd image starts with."""

    seed: int
    parent_before: XsaveImage  #: registers of the task when it called execve
    image: XsaveImage  #: the new image's first XSAVE
    supp: int
    perm: int
    guest_perm: int
    exit: ChildExit


def inherit(kind: str = "fork", *, seed: int = 0x6E, timeout: float = 20.0,
            prelude: Callable[[Asm], None] | None = None) -> InheritRun:
    """Create a task with ``kind`` (fork, vfork, thread = clone(CLONE_THREAD|CLONE_VM|...),
    clone_vm = clone(CLONE_VM, SIGCHLD): a new process sharing memory) over pattern
    registers and capture what the new task starts with (kernel path: copy_thread ->
    fpu_clone). ``prelude`` emits machine code run after the pattern load (e.g. the AMX
    permission request and tile loads of `fpstate.host.amx`)."""
    if kind not in KINDS:
        raise FpstateError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    xs = xsave_slot()
    stack = 4 * PAGE
    shm = SharedMemory(PAGE + 3 * xs + stack)
    shm.write(0, pattern_table(seed))
    before, child_off, after = PAGE, PAGE + xs, PAGE + 2 * xs
    stack_top = shm.address + PAGE + 3 * xs + stack - 64
    flag_child, flag_after, perm_ret, perm_val, status = (PAGE - 8 * i for i in range(1, 6))

    def body() -> int:
        pages = CodePages(1)
        a = Asm()
        R, C, In, M = a.R, a.C, a.In, a.M
        load_patterns(a, shm.address)
        if prelude is not None:
            prelude(a)
        a.xsave(shm.address + before)
        if kind == "fork":
            a.syscall(SYS["fork"])
        elif kind == "vfork":
            a.syscall(SYS["vfork"])
        elif kind == "thread":
            a.syscall(SYS["clone"], THREAD_FLAGS, stack_top, 0, 0, 0)
        else:
            a.syscall(SYS["clone"], CLONE_VM | signal.SIGCHLD, stack_top, 0, 0, 0)
        a.emit(In.create_reg_reg(C.TEST_RM64_R64, R.RAX, R.RAX))
        a.jump("JNE_REL32_64", "parent")
        # -- the new task, first instruction after the syscall
        a.xsave(shm.address + child_off)
        a.syscall(SYS["arch_prctl"], ARCH_GET_XCOMP_PERM, shm.address + perm_val)
        a.store_rax(shm.address + perm_ret)
        a.mov_imm(R.RAX, 1)
        a.store_rax(shm.address + flag_child)
        if kind == "thread":
            a.syscall(SYS["exit"], 0)
        else:
            a.exit_group(0)
        # -- the creating task
        a.label("parent")
        if kind == "thread":
            a.mov_imm(R.R12, shm.address + flag_child)
            a.label("spin")
            a.emit(In.create(C.PAUSE))
            a.emit(In.create_mem_i32(C.CMP_RM64_IMM8, M(R.R12), 1))
            a.jump("JNE_REL32_64", "spin")
        else:
            a.syscall(SYS["wait4"], Reg(R.RAX), shm.address + status, 0, 0)
        a.xsave(shm.address + after)
        a.mov_imm(R.RAX, 1)
        a.store_rax(shm.address + flag_after)
        a.exit_group(0)
        pages.call(pages.place(0, a))
        return 6

    ex = run_child(body, timeout)
    ran = shm.u64(flag_child) == 1
    done = shm.u64(flag_after) == 1
    return InheritRun(
        kind=kind, seed=seed, parent_before=xsave_image(shm.read(before, xs)),
        child=xsave_image(shm.read(child_off, xs)) if ran else None,
        parent_after=xsave_image(shm.read(after, xs)) if done else None,
        child_perm_ret=struct.unpack_from("<q", shm.mem, perm_ret)[0],
        child_perm=shm.u64(perm_val), exit=ex,
    )


def _exec_probe(xs: int):
    def code(entry: int, bss: int) -> Asm:
        a = Asm()
        a.xsave(bss)
        for i, option in enumerate((ARCH_GET_XCOMP_SUPP, ARCH_GET_XCOMP_PERM,
                                    ARCH_GET_XCOMP_GUEST_PERM)):
            a.syscall(SYS["arch_prctl"], option, bss + xs + 16 * i + 8)
            a.store_rax(bss + xs + 16 * i)
        a.syscall(SYS["write"], 1, bss, xs + 48)
        a.exit_group(0)
        return a
    return code


def exec_state(*, seed: int = 0x7F, timeout: float = 20.0) -> ExecRun:
    """execve() a minimal static ELF from machine code that loaded pattern registers, and
    report what the new image starts with (kernel path: fpu_flush_thread on exec)."""
    xs = xsave_slot()
    image = elf_exec_image(_exec_probe(xs), bss=xs + PAGE)
    tmp = tempfile.mkdtemp(prefix="fpstate-exec-")
    path = os.path.join(tmp, "probe")
    with open(path, "wb") as f:
        f.write(image)
    os.chmod(path, 0o700)
    shm = SharedMemory(PAGE + xs)
    shm.write(0, pattern_table(seed))
    r, w = os.pipe()

    def body() -> int:
        os.close(r)
        os.dup2(w, 1)
        cpath = ctypes.create_string_buffer(path.encode())
        argv = (ctypes.c_uint64 * 2)(ctypes.addressof(cpath), 0)
        envp = (ctypes.c_uint64 * 1)(0)
        pages = CodePages(1)
        a = Asm()
        load_patterns(a, shm.address)
        a.xsave(shm.address + PAGE)
        a.syscall(SYS["execve"], ctypes.addressof(cpath), ctypes.addressof(argv),
                  ctypes.addressof(envp))
        a.exit_group(7)  # execve failed
        pages.call(pages.place(0, a))
        return 6

    try:
        pid = fork_child(body)
        os.close(w)
        chunks = []
        with os.fdopen(r, "rb") as pipe:
            while True:
                data = pipe.read(65536)
                if not data:
                    break
                chunks.append(data)
        ex = wait_child(pid, timeout)
    finally:
        with contextlib.suppress(OSError):
            os.close(w)
        shutil.rmtree(tmp, ignore_errors=True)
    out = b"".join(chunks)
    if ex.exit_code != 0 or len(out) != xs + 48:
        raise HostUnavailable(f"exec probe failed: {ex}, {len(out)} bytes (execve refused?)")
    words = struct.unpack_from("<6q", out, xs)
    for i in range(3):
        if words[2 * i] != 0:
            raise HostUnavailable(f"arch_prctl GET in the exec'd image returned {words[2 * i]}")
    return ExecRun(seed=seed, parent_before=xsave_image(shm.read(PAGE, xs)),
                   image=xsave_image(out[:xs]), supp=words[1] & (2**64 - 1),
                   perm=words[3] & (2**64 - 1), guest_perm=words[5] & (2**64 - 1), exit=ex)
