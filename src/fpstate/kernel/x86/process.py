"""fork, clone and execve: the FPU side of creating and replacing a process image.

Models copy_process() (kernel/fork.c: sigaltstack inheritance), copy_thread()
(arch/x86/kernel/process.c: fpu_clone(), PKRU), begin_new_exec() / setup_new_exec()
(fs/exec.c: de_thread(), "the point of no return" clearing sas_ss_sp and sas_ss_size) and
flush_thread() (fpu_flush_thread(), pkru_flush_thread()), Linux v6.17 / 6.18. Both syscalls are
kernel paths (`fpstate.kernel.x86.sched`): allocating the child and loading the binary may
sleep, so each has a preemption point before its FPU work (and execve one after it too).
"""

from __future__ import annotations

import errno

from fpstate.kernel.x86 import core
from fpstate.kernel.x86.hw import UserMemory
from fpstate.kernel.x86.sched import (
    SIGKILL,
    SS_DISABLE,
    WAIT,
    Cpu,
    KPath,
    Machine,
    Process,
    Signal,
    Task,
    TaskState,
    new_mm_layout,
)
from fpstate.kernel.x86.types import (
    CLONE_THREAD,
    CLONE_VFORK,
    CLONE_VM,
    PF_KTHREAD,
    KernelBug,
)


def copy_thread_fpu(m: Machine, c: Cpu, child: Task, clone_flags: int, minimal: bool,
                    ssp: int) -> int:
    """The FPU part of copy_thread() (arch/x86/kernel/process.c): fpu_clone(), and the child's
    PKRU (the parent's current value; init_pkru_value for kernel threads)."""
    ret = core.fpu_clone(c, child, clone_flags, minimal, ssp)
    if m.system.ospke and not minimal:
        child.thread_pkru = int.from_bytes(c.regs.component(9)[:4], "little")
    return ret


def sys_clone(c: Cpu, clone_flags: int, comm: str | None = None, ssp: int = 0) -> KPath:
    """clone()/fork() (kernel/fork.c copy_process): a new task in the caller's group
    (CLONE_THREAD) or a new process with a copied (or, with CLONE_VM, shared) mm. The sigaltstack
    is inherited unless CLONE_VM without CLONE_VFORK. The allocation of the child is a
    preemption point before its FPU state is copied. Returns the child (None when the caller
    was killed meanwhile)."""
    m = c.m
    parent = c.current
    c = yield  # dup_task_struct(): may sleep
    if parent.killed_by is not None:
        # copy_process(): a fatal signal that arrived meanwhile fails the fork
        # (-ERESTARTNOINTR, fatal_signal_pending()); the child is never made.
        return None
    if clone_flags & CLONE_THREAD:
        proc = parent.process
    else:
        mm = parent.process.mm if clone_flags & CLONE_VM else parent.process.mm.copy()
        proc = Process(m.next_pid, mm, next_mmap=parent.process.next_mmap,
                       pasid=parent.process.pasid, compat=parent.process.compat)
    child = m._new_task(comm or parent.comm, parent.flags & ~PF_KTHREAD, proc)
    # arch_dup_task_struct(): the task_struct is a memcpy of the parent's, the embedded
    # fpstate's bytes with it; fpu_clone()'s XSAVE then writes only what it saves (a compacted
    # save leaves MXCSR alone while SSE is not in use).
    child.fpu.embedded.regs[:] = parent.fpu.embedded.regs
    child.handlers = dict(parent.handlers)
    child.user_sp = parent.user_sp
    child.sas_ss_sp, child.sas_ss_size = parent.sas_ss_sp, parent.sas_ss_size
    child.sas_ss_flags = parent.sas_ss_flags
    if (clone_flags & (CLONE_VM | CLONE_VFORK)) == CLONE_VM:
        child.sas_ss_sp, child.sas_ss_size, child.sas_ss_flags = 0, 0, SS_DISABLE
    ret = copy_thread_fpu(m, c, child, clone_flags, False, ssp)
    if ret:
        raise KernelBug("update-fpu-shstk",
                        "WARN: clone with a shadow stack pointer but CET_USER in init state")
    return child


def sys_execve(c: Cpu, comm: str, compat: bool | None = None) -> KPath:
    """execve() (fs/exec.c begin_new_exec): other threads of the group die (de_thread), a new
    mm -- laid out for a 32-bit program when ``compat`` (an ELFCLASS32 binary: TIF_ADDR32),
    for a 64-bit one when False, of the same kind as before when None -- the sigaltstack is
    cleared (sas_ss_sp = sas_ss_size = 0; the flags stay), then flush_thread():
    fpu_flush_thread() and the default PKRU (pkru_flush_thread).

    de_thread() sends SIGKILL to the other threads (zap_other_threads) and sleeps,
    TASK_KILLABLE, until the last of them has exited (sig->notify_count). A thread switched
    out inside a kernel path (KVM_RUN, the #NM handler's allocation) must be scheduled to
    leave its path first (`Machine.kill_thread`), so the path yields `WAIT` there until no
    other thread of the group is alive; a fatal signal to the caller meanwhile ends the exec
    with -EAGAIN (de_thread's ``killed:``).

    begin_new_exec() may sleep between de_thread() and flush_thread() (unshare_files(),
    exec_mmap()), and load_elf_binary() after it (setup_arg_pages(), elf_map()): the path has a
    preemption point on each side of fpu_flush_thread(), where the task can be switched out
    and go on on another CPU (commit 1f69383b203e's sequence, variant ``exec-fpu-drop``)."""
    m = c.m
    t = c.current
    for other in list(t.process.threads):
        if other is not t and other.state is not TaskState.DEAD:
            other.killed_by = Signal(SIGKILL)
            m.kill_thread(other)
    while de_thread_waits(t):
        c = yield WAIT  # schedule() until notify_count drops to 0
        if t.killed_by is not None:
            return -errno.EAGAIN
    c = yield  # begin_new_exec(): unshare_files(), exec_mmap() may sleep (before flush_thread)
    t.process.threads[:] = [t]
    t.process.mm = UserMemory()
    new_mm_layout(t, t.process.compat if compat is None else compat)
    t.comm = comm
    t.sas_ss_sp, t.sas_ss_size = 0, 0
    t.handlers = {}
    core.fpu_flush_thread(c)
    if m.system.ospke:
        t.thread_pkru = core.INIT_PKRU_VALUE
        c.regs.wrpkru(core.INIT_PKRU_VALUE)
    c = yield  # load_elf_binary() maps the image (setup_arg_pages, elf_map): may sleep
    return 0


def de_thread_waits(t: Task) -> bool:
    """Whether execve's de_thread() in ``t`` still waits: another thread of its group has not
    exited yet (sig->notify_count is not 0)."""
    return any(o is not t and o.state is not TaskState.DEAD for o in t.process.threads)
