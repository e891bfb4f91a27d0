"""A small machine: CPUs, processes, threads, the scheduler and the user/kernel boundary.

Models the parts of kernel/sched/core.c, arch/x86/kernel/process_64.c (__switch_to),
kernel/fork.c + arch/x86/kernel/process.c (copy_process, copy_thread, flush_thread),
kernel/exit.c and the generic entry code (exit_to_user_mode_prepare) that decide when the FPU
functions of core.py and context.py run (Linux v6.17).

Theory of operation
-------------------
- A `Machine` owns the kernel-wide state (`FpuSystem`, init_fpstate, jiffies), ``cpus`` and
  ``tasks``. Each `Cpu` carries its registers (`FpRegs`), the per-CPU kernel variables
  (fpu_fpregs_owner_ctx, kernel_fpu_allowed, xfd_state), ``current`` and its execution context
  (IRQs, bottom halves, preempt count, interrupt nesting) that `requires` checks.
- A task is in one `TaskState`; `TASK_TRANSITIONS` is the table of legal events, and an
  illegal event raises `IllegalEvent` and changes nothing.
- Kernel work that can be preempted in the kernel is a *kernel path*: a generator taking the CPU
  it starts on; every ``c = yield`` is a preemption point, and the value sent back is the CPU
  it resumes on (maybe another one). `Machine.step` runs a path to its next preemption point,
  `Machine.preempt` switches tasks there, `Machine.syscall` runs a whole path without
  preemption. Everything between two yields is atomic, as it is under the locks the kernel
  holds there.
- User mode is entered and left only through `exit_to_user_mode` and `enter_kernel`; user
  instructions (`user_write` & co.) run only for the current task in user mode, where
  TIF_NEED_FPU_LOAD is clear and the registers are its own.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from fpstate.kernel.x86 import core
from fpstate.kernel.x86.context import fpregs_state_valid, switch_fpu
from fpstate.kernel.x86.hw import FpRegs, KernelBuf, UserMemory, init_value, token
from fpstate.kernel.x86.types import (
    PF_KTHREAD,
    PF_USER_WORKER,
    XFEATURE_MASK_FPSTATE,
    Fpstate,
    Fpu,
    FpuStatePerm,
    FpuSystem,
    IllegalEvent,
    KernelBug,
)
from fpstate.x86.cpuid import CpuidProfile
from fpstate.x86.program import Fault
from fpstate.x86.xfeatures import XFEATURE_MASK_PKRU, bits

#: A kernel path: a generator that yields at each preemption point (None) or where it sleeps
#: until other tasks act (`WAIT`), and is resumed with the CPU it runs on next.
KPath = Generator["object | None", "Cpu", Any]


class _Wait:
    def __repr__(self) -> str:
        return "WAIT"


#: What a kernel path yields where it sleeps until other tasks have acted (execve's
#: de_thread() waiting for the other threads to exit): running it on cannot finish it by
#: itself (`Machine.finish` refuses).
WAIT = _Wait()

USER_STACK_TOP = 0x7FFF_FFFF_0000
#: RLIMIT_STACK's default (8 MiB): the main thread's stack grows on demand up to it, and
#: glibc gives each pthread a stack of that size. Pages never written cost nothing here
#: (UserMemory), and a smaller stack would let nested signal frames of AMX size run off
#: its end within a short walk, which a real process does not reach.
USER_STACK_SIZE = 0x80_0000
MMAP_BASE = 0x7F00_0000_0000
#: A compat (32-bit) process's layout: everything below TASK_SIZE_32 (0xFFFFE000), so that
#: its signal frames' 32-bit pointers (ptr_to_compat) reach them.
USER32_STACK_TOP = 0xFFFF_E000
MMAP32_BASE = 0x4000_0000

SIGILL, SIGKILL, SIGSEGV, SIGUSR1 = 4, 9, 11, 10
ILL_ILLOPC, ILL_ILLOPN = 1, 2
#: si_code of force_sig(): the kernel raised it (a failed sigreturn or frame setup).
SI_KERNEL = 0x80
SS_ONSTACK, SS_DISABLE, SS_AUTODISARM = 1, 2, 1 << 31
SA_ONSTACK = 0x08000000
#: sa_flags (uapi/asm-generic/signal-defs.h, asm/signal.h): SA_SIGINFO picks the rt frame;
#: SA_IA32_ABI is set by the kernel when the handler was installed by a 32-bit syscall
#: (sigaction_compat_abi), and picks the ia32 frames (is_ia32_frame).
SA_SIGINFO = 0x00000004
SA_RESTORER = 0x04000000
SA_IA32_ABI = 0x02000000


class TaskState(enum.Enum):
    USER = "running in user mode"
    KERNEL = "running in the kernel"
    RUNNABLE = "switched out, runnable"
    STOPPED = "switched out, ptrace-stopped"
    DEAD = "dead"


#: The states as module globals, for the code that tests them at every step: an attribute of
#: an Enum class goes through the enum's Python-level __getattr__ hook (Python 3.11, ~0.1 us),
#: a global costs nothing. Short names for the table below and the functions of this file.
STATE_USER, STATE_KERNEL, STATE_RUNNABLE, STATE_STOPPED, STATE_DEAD = (
    TaskState.USER, TaskState.KERNEL, TaskState.RUNNABLE, TaskState.STOPPED, TaskState.DEAD)
_U, _K, _RN, _ST, _D = STATE_USER, STATE_KERNEL, STATE_RUNNABLE, STATE_STOPPED, STATE_DEAD
# Each state's number, for the checker's state keys: hashing an Enum member calls the Python
# function Enum.__hash__, an int costs nothing (fpstate.check.statekey).
for _no, _state in enumerate(TaskState):
    _state.no = _no  # type: ignore[attr-defined]
del _no, _state
TASK_TRANSITIONS: dict[tuple[TaskState, str], TaskState] = {
    (_U, "enter_kernel"): _K,  # syscall, exception, interrupt
    (_K, "exit_to_user"): _U,
    (_K, "switch_out"): _RN,
    (_RN, "stop"): _ST,  # ptrace_stop(): scheduled away in TASK_TRACED
    (_RN, "switch_in"): _K,
    (_ST, "resume"): _RN,
    (_K, "exit"): _D,
    (_RN, "reap"): _D,  # a switched-out thread killed with its group
    (_ST, "reap"): _D,
}
#: TASK_TRANSITIONS by event name: ((state, new state), ...), for `Task.event` (a lookup by
#: name and identity is cheaper than hashing an Enum member at every event).
_TRANSITIONS_BY_EVENT: dict[str, tuple[tuple[TaskState, TaskState], ...]] = {}
for (_before, _event), _after in TASK_TRANSITIONS.items():
    _TRANSITIONS_BY_EVENT[_event] = (*_TRANSITIONS_BY_EVENT.get(_event, ()), (_before, _after))
del _before, _event, _after


@dataclass(frozen=True, slots=True)
class Signal:
    """A pending signal: number, si_code and si_addr (the trapping instruction)."""

    sig: int
    code: int = 0
    addr: int = 0


@dataclass(frozen=True, slots=True)
class SigAction:
    flags: int = 0  #: SA_ONSTACK etc.


@dataclass(slots=True, eq=False)
class Process:
    """A thread group: its leader (whose fpu holds the group's permissions), its mm and the
    sighand->siglock (``siglock_holder`` is the CPU holding it)."""

    tgid: int
    mm: UserMemory
    threads: list[Task] = field(default_factory=list)
    siglock_holder: Cpu | None = None
    pasid: int = 0  #: mm->pasid, 0 when none was allocated
    next_mmap: int = MMAP_BASE
    #: A 32-bit program (TIF_ADDR32, in_ia32_syscall()): its mm lies below 4 GiB and the
    #: handlers it installs get SA_IA32_ABI (sigaction_compat_abi), hence ia32 frames.
    compat: bool = False

    @property
    def leader(self) -> Task:
        return self.threads[0]


@dataclass(slots=True, eq=False)
class Task:
    """A task_struct, as far as the FPU code reads it."""

    pid: int
    comm: str
    flags: int
    process: Process
    fpu: Fpu
    state: TaskState = TaskState.RUNNABLE
    need_fpu_load: bool = True  #: TIF_NEED_FPU_LOAD
    on_cpu: int | None = None
    thread_pkru: int = core.INIT_PKRU_VALUE  #: thread.pkru
    sas_ss_sp: int = 0
    sas_ss_size: int = 0
    sas_ss_flags: int = 0  #: raw, as the frame's uc_stack shows it (0, not SS_DISABLE, at exec)
    user_sp: int = USER_STACK_TOP - 0x1000
    pasid_activated: bool = False
    kpath: KPath | None = None
    kresult: Any = None
    pending: list[Signal] = field(default_factory=list)
    handlers: dict[int, SigAction] = field(default_factory=dict)
    killed_by: Signal | None = None
    generation: int = 0

    def event(self, name: str) -> None:
        new = None
        for before, after in _TRANSITIONS_BY_EVENT.get(name, ()):
            if before is self.state:
                new = after
                break
        if new is None:
            raise IllegalEvent(f"task {self.pid} ({self.comm}): {name!r} is illegal while "
                               f"{self.state.value}")
        self.state = new

    def __repr__(self) -> str:
        return f"Task({self.pid} {self.comm}, {self.state.name}, TIF={int(self.need_fpu_load)})"


@dataclass(slots=True, eq=False)
class Cpu:
    """One CPU: registers, per-CPU FPU variables, current task and execution context."""

    nr: int
    m: Machine
    regs: FpRegs
    current: Task
    idle: Task
    fpu_fpregs_owner_ctx: Fpu | None = None
    kernel_fpu_allowed: bool = True
    xfd_state: int = 0
    irqs_disabled: bool = False
    bh_disabled: int = 0
    preempt_count: int = 0
    hardirq: int = 0
    softirq: int = 0
    nmi: int = 0
    pagefault_disabled: int = 0
    #: The clobber mask of a hard interrupt due inside this step's fpregs_lock()ed section
    #: (core.fpregs_locked_irq_window), 0 for none, and whether its handler used the FPU
    #: (None: it has not arrived). Set and cleared by one step.
    irq_in_lock: int = 0
    irq_in_lock_used: bool | None = None
    #: The kernel function whose section that interrupt is due in ("" for the first reached).
    irq_in_lock_site: str = ""

    def __repr__(self) -> str:
        return f"Cpu({self.nr}, current={self.current.comm})"



def new_mm_layout(t: Task, compat: bool) -> None:
    """The stack and mmap base of a new program's mm (setup_new_exec / arch_pick_mmap_layout):
    the 64-bit layout, or a compat program's below 4 GiB. The mm itself must be fresh."""
    top = USER32_STACK_TOP if compat else USER_STACK_TOP
    t.process.mm.map(top - USER_STACK_SIZE, USER_STACK_SIZE)
    t.process.next_mmap = MMAP32_BASE if compat else MMAP_BASE
    t.process.compat = compat
    t.user_sp = top - 0x1000

class Machine:
    """The kernel model: ``ncpus`` CPUs booted with ``system``."""

    def __init__(self, system: FpuSystem, ncpus: int = 2) -> None:
        if ncpus < 1:
            raise IllegalEvent("a machine needs at least one CPU")
        self.system = system
        self.init_fpstate: Fpstate = core.build_init_fpstate(system)
        self.jiffies = 1
        self.generation = 0
        self.next_pid = 1
        self.tasks: dict[int, Task] = {}
        self.freed: list[Fpstate] = []
        self.unreferenced: list[Fpstate] = []
        self.log: list[str] = []
        #: how often each retry/fixup path ran (e.g. "sigframe-retry"), for tests and reports
        self.events: Counter[str] = Counter()
        self.cpus: list[Cpu] = []
        for nr in range(ncpus):
            idle = self._new_task(f"swapper/{nr}", PF_KTHREAD, None)
            idle.state = _K
            idle.on_cpu = nr
            regs = FpRegs(system.profile, xcr0=system.xcr0, xss=system.xss,
                          xsavec_supported=system.xsavec, mxcsr_mask=system.mxcsr_feature_mask)
            cpu = Cpu(nr, self, regs, current=idle, idle=idle)
            # fpu__init_cpu_xstate(): XFD = init_fpstate.xfd (through xfd_set_state).
            if system.xfd:
                core.xfd_set_state(cpu, self.init_fpstate.xfd)
            self.cpus.append(cpu)

    @classmethod
    def boot(cls, cpu: str | CpuidProfile = "host", kernel: str | None = None, ncpus: int = 2,
             **options: Any) -> Machine:
        """Boot ``kernel`` (default the newest modelled) on ``cpu`` (a profile or a name for
        ``load_profile``: "host", a bundled CPU, a dump path) with ``ncpus`` CPUs; ``options``
        go to `FpuSystem.from_boot` (build options, ``variants``)."""
        from fpstate.kernel.x86.versions import NEWEST
        from fpstate.kernel.x86.xstate import fpu__init_system_xstate
        from fpstate.x86.profiles import load_profile

        profile = load_profile(cpu) if isinstance(cpu, str) else cpu
        result = fpu__init_system_xstate(profile, kernel or NEWEST)
        return cls(FpuSystem.from_boot(profile, result, **options), ncpus)

    # -- tasks --------------------------------------------------------------------------------

    def _new_fpu(self, owner: str) -> Fpu:
        s = self.system
        emb = core.fpstate_alloc(s, s.kernel.default_size, valloc=False)
        fpu = Fpu(embedded=emb, fpstate=emb, perm=FpuStatePerm(0, 0, 0),
                  guest_perm=FpuStatePerm(0, 0, 0), owner=owner)
        core.fpstate_reset(s, fpu)
        return fpu

    def _new_task(self, comm: str, flags: int, process: Process | None) -> Task:
        pid = self.next_pid
        self.next_pid += 1
        if process is None:
            process = Process(pid, UserMemory())
        fpu = self._new_fpu(f"task {pid} ({comm})")
        t = Task(pid, comm, flags, process, fpu)
        process.threads.append(t)
        self.tasks[pid] = t
        return t

    def spawn(self, comm: str = "init", compat: bool = False) -> Task:
        """A new user process as the kernel leaves it after execve from a kernel thread: a
        fresh mm with a stack (below 4 GiB for a ``compat`` 32-bit program), default fpstate
        and permissions, init register image, TIF_NEED_FPU_LOAD. It is runnable; `run` puts it
        on a CPU."""
        t = self._new_task(comm, 0, None)
        new_mm_layout(t, compat)
        n = core.init_fpstate_copy_size(self.system)
        t.fpu.fpstate.regs[0:n] = self.init_fpstate.regs[0:n]
        t.need_fpu_load = True
        return t

    def kthread(self, comm: str, *, user_worker: bool = False) -> Task:
        """A kernel thread (PF_KTHREAD) or an io_uring/vhost-style user worker
        (PF_USER_WORKER), created by copy_thread() with ``minimal``: fpu_clone() gives it the
        init image and TIF_NEED_FPU_LOAD; its FPU state is never saved or restored."""
        t = self._new_task(comm, PF_USER_WORKER if user_worker else PF_KTHREAD, None)
        c = next(c for c in self.cpus if not (c.hardirq or c.softirq or c.nmi))
        core.fpu_clone(c, t, 0, True)
        return t

    def cpu_of(self, task: Task) -> Cpu:
        if task.on_cpu is None:
            raise IllegalEvent(f"{task!r} is not on a CPU")
        return self.cpus[task.on_cpu]

    def mmap(self, task: Task, size: int) -> int:
        """Map ``size`` bytes (page-rounded) in the task's mm; returns the address."""
        size = (size + 4095) & ~4095
        addr = task.process.next_mmap
        task.process.mm.map(addr, size)
        task.process.next_mmap += size + 4096
        return addr

    # -- scheduling ---------------------------------------------------------------------------

    def switch_to(self, nr: int, nxt: Task) -> None:
        """__schedule() -> context_switch() -> __switch_to() on CPU ``nr``: the outgoing task
        (in the kernel at a preemption point, or idle) runs switch_fpu() with IRQs off and the
        PKRU of the incoming task is loaded eagerly (x86_pkru_load)."""
        c = self.cpus[nr]
        prev = c.current
        if nxt is prev:
            return
        if nxt.state is not _RN:
            raise IllegalEvent(f"switch_to {nxt!r}: not runnable")
        if prev.state is not _K:
            raise IllegalEvent(f"switch_to on CPU {nr}: {prev!r} is not in the kernel")
        if c.bh_disabled or c.preempt_count or c.hardirq or c.softirq or c.irqs_disabled:
            raise IllegalEvent(f"switch_to on CPU {nr}: not at a preemption point")
        self._context_switch(c, nxt)

    def run(self, nr: int, task: Task) -> None:
        """Switch ``task`` in on CPU ``nr`` (preempting whatever runs there) and let it return
        to user mode if it has no unfinished kernel path."""
        c = self.cpus[nr]
        if c.current is not task:
            self.preempt(nr, task)
        if task.kpath is None and task.state is _K:
            self.exit_to_user_mode(nr)

    def preempt(self, nr: int, nxt: Task) -> None:
        """An interrupt or a preemption point on CPU ``nr``: a task in user mode enters the
        kernel first; then switch to ``nxt`` (or to idle when ``nxt`` is the current)."""
        c = self.cpus[nr]
        if c.current.state is _U:
            self.enter_kernel(nr)
        if c.current is nxt:
            return
        self.switch_to(nr, nxt)

    def idle(self, nr: int) -> None:
        """Schedule CPU ``nr``'s idle task."""
        c = self.cpus[nr]
        if c.current is not c.idle:
            if c.current.state is _U:
                self.enter_kernel(nr)
            self._switch_to_idle(c)

    def _switch_to_idle(self, c: Cpu) -> None:
        self._context_switch(c, c.idle)

    def _context_switch(self, c: Cpu, nxt: Task) -> None:
        """context_switch() -> __switch_to(): IRQs off, switch_fpu(prev), x86_pkru_load()
        (stash prev's PKRU, write next's if it differs), current = next."""
        prev = c.current
        c.irqs_disabled = True
        switch_fpu(c, prev)
        if self.system.ospke:
            prev.thread_pkru = int.from_bytes(c.regs.component(9)[:4], "little")
            if prev.thread_pkru != nxt.thread_pkru:
                c.regs.wrpkru(nxt.thread_pkru)
        if prev.state is _K and prev is not c.idle:
            prev.event("switch_out")
        prev.on_cpu = None
        c.current = nxt
        if nxt is not c.idle:
            nxt.event("switch_in")
        nxt.on_cpu = c.nr
        c.irqs_disabled = False
        self.jiffies += 1

    def migrate(self, task: Task, nr: int) -> None:
        """Move ``task`` to CPU ``nr``: switch it out where it runs (through an interrupt if it
        is in user mode), in on ``nr``, and back to user mode if it was there."""
        was_user = task.state is _U
        if task.on_cpu is not None:
            src = task.on_cpu
            if was_user:
                self.enter_kernel(src)
            self._switch_to_idle(self.cpus[src])
        self.preempt(nr, task)
        if was_user:
            self.exit_to_user_mode(nr)

    # -- the user/kernel boundary -------------------------------------------------------------

    def enter_kernel(self, nr: int) -> Cpu:
        """Syscall, exception or interrupt entry from user mode on CPU ``nr``."""
        c = self.cpus[nr]
        c.current.event("enter_kernel")
        return c

    def exit_to_user_mode(self, nr: int) -> None:
        """exit_to_user_mode_prepare(): deliver pending signals (arch_do_signal_or_restart),
        then arch_exit_to_user_mode_prepare(): switch_fpu_return() if TIF_NEED_FPU_LOAD."""
        c = self.cpus[nr]
        t = c.current
        if t.kpath is not None:
            raise IllegalEvent(f"{t!r} still has an unfinished kernel path")
        if t.killed_by is not None:
            # Its group is exiting (SIGNAL_GROUP_EXIT, set while it was preempted inside a
            # kernel path): get_signal() goes straight to do_group_exit() -> do_exit().
            self.do_exit(nr)
            return
        while t.pending and t.state is _K:
            sig = t.pending[0]
            if sig.sig in t.handlers and sig.sig != SIGKILL:
                from fpstate.kernel.x86.signal import handle_signal

                t.pending.pop(0)
                handle_signal(c, sig)
            else:
                t.pending.pop(0)
                self.do_group_exit(nr, sig)
                return
        if t.need_fpu_load:
            core.switch_fpu_return(c)
        core.fpregs_assert_state_consistent(c)
        t.event("exit_to_user")

    # -- kernel paths -------------------------------------------------------------------------

    def start(self, nr: int, path: Callable[..., KPath], *args: Any) -> None:
        """Begin a kernel path for the current task of CPU ``nr`` (in the kernel)."""
        c = self.cpus[nr]
        t = c.current
        if t.state is not _K or t.kpath is not None:
            raise IllegalEvent(f"{t!r} cannot start a kernel path now")
        t.kpath = path(c, *args)
        t.kresult = None
        try:
            self._advance(c, first=True)
        except IllegalEvent:
            t.kpath = None  # refused at its start: nothing in flight
            raise

    def step(self, nr: int) -> bool:
        """Run the current task's kernel path on CPU ``nr`` to its next preemption point;
        True when the path has finished (its value is in ``task.kresult``)."""
        c = self.cpus[nr]
        if c.current.kpath is None:
            raise IllegalEvent(f"{c.current!r} has no kernel path to step")
        self._advance(c, first=False)
        return c.current.kpath is None

    def _advance(self, c: Cpu, first: bool) -> object | None:
        """Run current's path to its next yield (what it yielded: None or `WAIT`), or to its
        end."""
        t = c.current
        assert t.kpath is not None
        try:
            if first:
                got = next(t.kpath)
            else:
                got = t.kpath.send(c)
        except StopIteration as done:
            t.kpath = None
            t.kresult = done.value
            return None
        assert not (c.bh_disabled or c.preempt_count or c.irqs_disabled), \
            "a kernel path yielded inside a non-preemptible section"
        return got

    def finish(self, nr: int) -> Any:
        """Run the current task's kernel path to completion; its result. IllegalEvent when
        the path sleeps until other tasks act (`WAIT`): only they can let it go on."""
        c = self.cpus[nr]
        while c.current.kpath is not None:
            if self._advance(c, first=False) is WAIT:
                raise IllegalEvent(f"{c.current!r} sleeps in "
                                   f"{c.current.kpath.__name__}() until other tasks act")
        return c.current.kresult

    def syscall(self, nr: int, path: Callable[..., KPath], *args: Any) -> Any:
        """A system call (or trap) by the current task of CPU ``nr``: enter the kernel, run the
        path without preemption, return to user mode; the path's result."""
        c = self.enter_kernel(nr)
        t = c.current
        try:
            self.start(nr, path, *args)
        except IllegalEvent:
            t.event("exit_to_user")  # refused before it changed anything: back in user mode
            raise
        result = self.finish(nr)
        if t.state is _K and c.current is t:
            self.exit_to_user_mode(nr)
        return result

    # -- user mode ----------------------------------------------------------------------------

    def _user(self, nr: int) -> Cpu:
        c = self.cpus[nr]
        if c.current.state is not _U:
            raise IllegalEvent(f"CPU {nr}: {c.current!r} is not in user mode")
        return c

    def user_write(self, nr: int, i: int, value: bytes | None = None) -> Fault | None:
        """The current task writes component ``i`` (VMOVDQU, KMOVQ, LDTILECFG, TILELOADD...),
        with ``value`` or a fresh token naming it. A #NM (XFD) goes through
        exc_device_not_available() and the instruction is retried once the kernel returns; a
        #UD raises SIGILL/ILL_ILLOPN. The fault the first attempt took, or None."""
        fault, value = self.user_write_begin(nr, i, value)
        if fault is not None and fault.vector == "#NM":
            self.finish(nr)
            self.user_write_retry(nr, i, value)
        return fault

    def user_ldmxcsr(self, nr: int, value: int) -> Fault | None:
        """The current task loads MXCSR (LDMXCSR, SDM Vol. 2: #GP where ``value`` sets a bit
        clear in MXCSR_MASK); MXCSR is in neither XCR0 nor XFD, so nothing else can fault."""
        return self._user(nr).regs.set_mxcsr(value)

    def user_write_begin(self, nr: int, i: int,
                         value: bytes | None = None) -> tuple[Fault | None, bytes]:
        """`user_write` up to its #NM handler's first preemption point: the vzalloc() of
        fpstate_realloc(), where it may sleep (the handler may also have finished: no
        permission). The fault and the value written."""
        c = self._user(nr)
        t = c.current
        if value is None and (i < 2 or (c.regs.xcr0 >> i) & 1):
            t.generation += 1
            value = token(t.pid, t.generation, i, c.regs.size(i))
        value = value or b""  # an instruction XCR0 does not enable: #UD before any data
        fault = c.regs.user_write(i, value)
        if fault is None:
            return None, value
        if fault.vector == "#NM":
            from fpstate.kernel.x86.xfd import exc_device_not_available

            self.enter_kernel(nr)
            self.start(nr, exc_device_not_available)
        elif fault.vector == "#UD":
            self.enter_kernel(nr)
            t.pending.append(Signal(SIGILL, ILL_ILLOPN))
            self.exit_to_user_mode(nr)
        return fault, value

    def user_write_retry(self, nr: int, i: int, value: bytes) -> None:
        """After the #NM handler of `user_write_begin` finished on CPU ``nr``: return to user
        mode (a pending signal is delivered first) and retry the instruction. A retry that
        takes the XFD #NM again, the handler having succeeded, would take it forever (the task
        never gets past the instruction): `KernelBug` ``xfd-nm-loop`` (a stale xfd_state:
        the handler's xfd_update_state() skipped the IA32_XFD write)."""
        t = self.cpus[nr].current
        signalled = bool(t.pending)
        self.exit_to_user_mode(nr)
        if not signalled and t.state is _U:
            c = self.cpus[t.on_cpu]  # type: ignore[index]
            retry = c.regs.user_write(i, value)
            if retry is not None:
                assert retry.vector == "#NM", f"retry after #NM faulted: {retry}"
                raise KernelBug("xfd-nm-loop", f"{t!r} retried its instruction after the XFD "
                                f"#NM handler enabled component {i} and took #NM again "
                                f"(IA32_XFD {c.regs.xfd:#x}, xfd_state {c.xfd_state:#x}): it "
                                f"loops there")

    def init_value(self, i: int) -> bytes:
        """Component ``i`` in its initial configuration, as XSAVE writes it."""
        return init_value(i, self.system.profile.component(i).size)

    def user_read(self, nr: int, i: int) -> bytes:
        """The current task reads component ``i`` from its registers."""
        return self._user(nr).regs.component(i)

    def user_release(self, nr: int, mask: int) -> None:
        """TILERELEASE / VZEROUPPER-like instructions: components of ``mask`` back to init."""
        self._user(nr).regs.init_components(mask)

    def user_state(self, task: Task) -> dict[int, bytes]:
        """The task's user-visible xstate wherever it lives now: its registers if running in
        user mode, else what the next return to user mode would load (memory image, or the
        cached registers when the restore would be skipped)."""
        if task.state is _U:
            return self.cpus[task.on_cpu].regs.snapshot()  # type: ignore[index]
        fpu = task.fpu
        if task.need_fpu_load:
            last = fpu.last_cpu
            if 0 <= last < len(self.cpus) and fpregs_state_valid(self.cpus[last], fpu):
                return self.cpus[last].regs.snapshot()
            return self._image_state(fpu.fpstate)
        return self.cpus[task.on_cpu].regs.snapshot()  # type: ignore[index]

    def _image_state(self, fps: Fpstate) -> dict[int, bytes]:
        """What restore_fpregs_from_fpstate() would load from ``fps``, as a snapshot."""
        regs = FpRegs(self.system.profile, xcr0=self.system.xcr0, xss=self.system.xss,
                      xsavec_supported=self.system.xsavec,
                      mxcsr_mask=self.system.mxcsr_feature_mask, xfd=fps.xfd)
        fault = regs.xrstor(KernelBuf(fps.regs, "image"),
                            self.system.kernel.max_features & XFEATURE_MASK_FPSTATE,
                            self.system.xrstor_insn)
        assert fault is None, fault
        return regs.snapshot()

    def kill(self, task: Task, sig: int, code: int = 0) -> None:
        """tgkill(): queue ``sig``; a task in user mode takes it at once (the signalling IPI's
        interrupt returns through exit_to_user_mode), others on their next return."""
        task.pending.append(Signal(sig, code))
        if task.state is _U:
            nr = task.on_cpu
            assert nr is not None
            self.enter_kernel(nr)
            self.exit_to_user_mode(nr)

    # -- interrupts ---------------------------------------------------------------------------

    def irq_kernel_fpu(self, nr: int, *, hardirq: bool = False, clobber: int = 0) -> bool:
        """An interrupt on CPU ``nr`` whose handler wants the FPU (softirq crypto, or a hard
        interrupt): kernel_fpu_begin() if irq_fpu_usable(), clobber the components of
        ``clobber``, kernel_fpu_end(). False when the FPU was not usable (the handler takes
        its scalar fallback). A softirq cannot run inside fpregs_lock(). An interrupt taken in
        user mode enters the kernel and returns through exit_to_user_mode(), which reloads the
        task's registers."""
        c = self.cpus[nr]
        if not hardirq and (c.bh_disabled or c.hardirq):
            raise IllegalEvent(f"softirq on CPU {nr} while bottom halves are disabled")
        if c.current.state is _U:
            self.enter_kernel(nr)
            try:
                return self.irq_kernel_fpu(nr, hardirq=hardirq, clobber=clobber)
            finally:
                self.exit_to_user_mode(nr)
        return core.irq_handler_kernel_fpu(c, hardirq, clobber)

    # -- fork, exec, exit ---------------------------------------------------------------------

    def do_group_exit(self, nr: int, sig: Signal) -> None:
        """The default action of a fatal signal: every thread of the group dies, the caller
        through do_exit(), the others through zap_other_threads (`kill_thread`)."""
        c = self.cpus[nr]
        proc = c.current.process
        for t in list(proc.threads):
            t.killed_by = sig
            if t is c.current:
                self.do_exit(nr)
            else:
                self.kill_thread(t)

    def kill_group(self, proc: Process, sig: Signal) -> None:
        """A fatal signal sent to another thread group (kill(2) of SIGKILL): complete_signal()
        sets SIGNAL_GROUP_EXIT and queues SIGKILL to every thread, waking each; none of them is
        the sender. Every thread dies as in a group exit (`kill_thread`): at once where it can,
        or when it has left the kernel path it is switched out in. An exec asleep in
        de_thread() wakes to its ``killed:`` exit (process.sys_execve)."""
        for t in list(proc.threads):
            if t.state is not _D:
                t.killed_by = sig
                self.kill_thread(t)

    def kill_thread(self, t: Task) -> None:
        """A thread other than the killer, its ``killed_by`` set, dies (zap_other_threads):
        switched out, it is released; running on a CPU (in user mode, or in the kernel, where
        it first leaves its path: `kill_in_path`), it exits there. Switched out *inside* a
        kernel path (KVM_RUN's loop, the #NM handler's allocation, a clone), it must run to
        leave the path, as the kernel's SIGKILL wakes it to do: it stays runnable, finishes
        the path when next scheduled, and exits on its way back to user mode
        (`exit_to_user_mode`); execve's de_thread() sleeps until it has (process.sys_execve)."""
        if t.state is _RN and t.kpath is not None:
            return
        if t.state in (_RN, _ST):
            self._release(t, reap=True)
        elif t.state is not _D:
            ocpu = self.cpus[t.on_cpu]  # type: ignore[index]
            if t.state is _U:
                self.enter_kernel(ocpu.nr)
            self.kill_in_path(ocpu.nr)
            self.do_exit(ocpu.nr)

    def kill_in_path(self, nr: int) -> None:
        """The current task of CPU ``nr``, killed (``killed_by`` set) inside a kernel path,
        runs the path to its end as the kernel does: a fatal signal interrupts killable sleeps
        and makes KVM_RUN leave its run loop (-EINTR) with the guest FPU put back; the path
        sees the signal through ``task.killed_by``."""
        c = self.cpus[nr]
        while c.current.kpath is not None:
            self._advance(c, first=False)

    def do_exit(self, nr: int) -> None:
        """do_exit() for current on CPU ``nr``: exit_thread() -> fpu__drop(), schedule away for
        the last time, and release (arch_release_task_struct -> fpstate_free)."""
        c = self.cpus[nr]
        t = c.current
        core.fpu__drop(c, t)
        t.event("exit")
        self._switch_to_idle(c)
        self._release(t, reap=False)

    def _release(self, t: Task, *, reap: bool) -> None:
        if reap:
            t.event("reap")
        if self.system.fpu_state_size_dynamic and not t.flags & (PF_KTHREAD | PF_USER_WORKER):
            core.fpstate_free(self.cpus[0], t.fpu)

    def stop(self, task: Task) -> None:
        """ptrace_stop(): the task enters the kernel if it is in user mode, schedules away
        (switch_fpu saves its registers) and is TASK_TRACED until `resume`."""
        if task.on_cpu is not None:
            nr = task.on_cpu
            if task.state is _U:
                self.enter_kernel(nr)
            if task.kpath is not None:
                raise IllegalEvent(f"{task!r} is in the middle of a kernel path")
            self._switch_to_idle(self.cpus[nr])
        task.event("stop")

    def resume(self, task: Task) -> None:
        """PTRACE_CONT: a stopped task becomes runnable."""
        task.event("resume")


def user_components(system: FpuSystem) -> list[int]:
    """The user components a task can write on this system (XCR0 minus PKRU, which is not a
    plain register file)."""
    return [i for i in bits(system.xcr0 & ~XFEATURE_MASK_PKRU)]


def __getattr__(name: str) -> Any:
    """fork/clone/exec live in `fpstate.kernel.x86.process`; importing them from here still
    works (PEP 562) for code written before the split."""
    if name in ("sys_clone", "sys_execve", "copy_thread_fpu"):
        from fpstate.kernel.x86 import process

        return getattr(process, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
