"""The x86 kernel model under the checker: its action vocabulary and what each context expects.

The model is `fpstate.kernel.x86.sched.Machine` (helper H's kernel model); every action below
calls the model's own functions (the scheduler, user-mode instructions, system calls, signal
delivery, ptrace, kernel-mode FPU use) and adds nothing but the bookkeeping the invariants need.

What each context *expects* to see
----------------------------------
The checker keeps, beside the model, the user-visible contract of every action -- the value
each task should read back from each tracked component -- and the invariants compare it with
what the task would really see (`Machine.user_state`). The contract, action by action:

- ``write``: the instruction's value (a token naming the task and a generation); LDTILECFG
  also puts TILEDATA in its initial configuration (SDM Vol. 1 3.2.6);
- ``release``: the released components are in their initial configuration;
- a signal handler starts with the initial user state (arch/x86/kernel/signal.c handle_signal
  -> fpu__clear_user_states) and ``sigreturn`` gives back what the task had before the signal;
- ``fork``/``clone``: the child sees its parent's values except the dynamic features, which are
  caller-saved and never copied (Documentation/arch/x86/xstate.rst; fpu_clone), and PASID,
  which a child never inherits;
- ``exec``: everything initial; ``ptrace_set``: the value the tracer wrote;
- ``pasid_write``: the new IA32_PASID value (seed 004).

Nothing here decides *where* the state lives or how it moves; that is the model's business and
the invariants' to judge.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from fpstate.check import invariants
from fpstate.check.invariants_x86 import fps_shapes, user_tasks
from fpstate.check.statekey import FRAME_IA32, FRAME_IA32_RT, FRAME_SC, FRAME_X64
from fpstate.check.views_x86 import X86Views
from fpstate.check.world import (
    Action,
    ActionSpec,
    FieldSpec,
    ScenarioError,
    StepError,
    Value,
    Violation,
    World,
    config_bool,
    config_int,
    config_mapping,
    config_str,
)
from fpstate.kernel.x86 import core
from fpstate.kernel.x86.core import INIT_PKRU_VALUE
from fpstate.kernel.x86.coredump import (
    CORE_ACKS,
    do_coredump,
    pattern_refusal,
    unwaited_thread,
    zap_refusal,
    zapped_threads,
)
from fpstate.kernel.x86.hw import (
    HDR,
    MXCSR,
    MXCSR_INIT,
    MXCSR_OFFSET,
    PKRU,
    UserMemory,
    init_value,
    next_mxcsr_token,
    pkru_bytes,
    read_token,
    token,
)
from fpstate.kernel.x86.pkeys import sys_pkey_alloc, sys_pkey_mprotect
from fpstate.kernel.x86.power import HIBERNATION_ENDINGS, hibernate_enter, suspend_enter
from fpstate.kernel.x86.process import de_thread_waits, sys_clone, sys_execve
from fpstate.kernel.x86.regset import (
    NT_X86_XSTATE,
    PTRACE_GETREGSET,
    PTRACE_SETREGSET,
    USER_I387_IA32_SIZE,
    convert_from_fxsr,
    convert_to_fxsr,
    mxcsr_by_format,
)
from fpstate.kernel.x86.sched import (
    SA_IA32_ABI,
    SA_ONSTACK,
    SA_RESTORER,
    SA_SIGINFO,
    SIGKILL,
    SIGUSR1,
    SS_AUTODISARM,
    STATE_DEAD,
    STATE_KERNEL,
    STATE_RUNNABLE,
    STATE_STOPPED,
    STATE_USER,
    USER32_STACK_TOP,
    USER_STACK_SIZE,
    USER_STACK_TOP,
    Machine,
    SigAction,
    Signal,
    Task,
)
from fpstate.kernel.x86.signal import (
    FP_XSTATE_MAGIC1,
    FP_XSTATE_MAGIC2,
    SC32_FPSTATE,
    SC_FPSTATE_OFFSET,
    SW_BYTES_OFFSET,
    SW_BYTES_SIZE,
    FpxSwBytes,
    at_minsigstksz,
    handler_ia32_return,
    handler_return,
    read_pkru,
    save_sw_bytes,
    sys32_rt_sigreturn,
    sys32_sigreturn,
    sys_rt_sigreturn,
)
from fpstate.kernel.x86.smpboot import cpu_down_up
from fpstate.kernel.x86.types import (
    CLONE_THREAD,
    CLONE_VM,
    FREGS_STATE_SIZE,
    PF_KTHREAD,
    PF_USER_WORKER,
    XFEATURE_MASK_FPSTATE,
    XFEATURE_MASK_USER_DYNAMIC,
    IllegalEvent,
    KernelBug,
)
from fpstate.kernel.x86.types import VARIANTS as KERNEL_MODEL_VARIANTS
from fpstate.kernel.x86.versions import AMENDS, APPLICABLE_FIXES
from fpstate.kernel.x86.xfd import MSR_IA32_PASID_VALID
from fpstate.kernel.x86.xstate_prctl import (
    ARCH_GET_XCOMP_GUEST_PERM,
    ARCH_GET_XCOMP_PERM,
    ARCH_GET_XCOMP_SUPP,
    ARCH_REQ_XCOMP_GUEST_PERM,
    ARCH_REQ_XCOMP_PERM,
    ERRNO_NAMES,
    sys_arch_prctl,
    sys_sigaltstack,
)
from fpstate.x86.layout import standard_size
from fpstate.x86.xfeatures import (
    BY_NUMBER,
    BY_SHORT,
    FXSAVE_SIZE,
    XFEATURE_MASK_FPSSE,
    XFEATURE_MASK_PASID,
    XFEATURE_MASK_PKRU,
    XFEATURE_MASK_SSE,
    XFEATURE_MASK_XTILE,
    XFEATURE_MASK_XTILE_DATA,
    XFEATURE_MASK_YMM,
    bits,
)

X87, SSE, PASID = 0, 1, 10
XTILE_CFG, XTILE_DATA = 17, 18
ARCH_OPTIONS = {"req_perm": ARCH_REQ_XCOMP_PERM, "req_guest_perm": ARCH_REQ_XCOMP_GUEST_PERM,
                "get_perm": ARCH_GET_XCOMP_PERM, "get_guest_perm": ARCH_GET_XCOMP_GUEST_PERM,
                "get_supp": ARCH_GET_XCOMP_SUPP}
_TASK = FieldSpec(str, "a task name (processes/threads of the configuration, fork/clone)")
#: A hard interrupt inside the step's fpregs_lock()ed section (core.fpregs_locked_irq_window).
_IRQ_IN_LOCK = FieldSpec(bool, "a hard interrupt whose handler wants the FPU (as random.c's "
                         "BLAKE2s) arrives inside the fpregs_lock()ed section -- signal: "
                         "between loading the registers and the XSAVE to the frame; "
                         "sigreturn: between the XRSTOR from the frame and "
                         "fpregs_mark_activate(); it clobbers SSE and AVX if irq_fpu_usable() "
                         "lets it (output irq: fpu, scalar, or none when the section was not "
                         "reached)", required=False, default=False)
#: signal's ``irq_at``: the kernel function whose section the interrupt arrives in.
SIGNAL_IRQ_SITES = {"sigframe": "copy_fpstate_to_sigframe", "fsave": "save_fsave_header",
                    "clear": "fpu__clear_user_states"}
#: The same for fork and clone: fpu_clone()'s section, between making the parent's registers
#: live and their XSAVE into the child's fpstate.
_IRQ_CLONE = FieldSpec(bool, "a hard interrupt whose handler wants the FPU arrives inside "
                       "fpu_clone()'s fpregs_lock()ed section, between making the parent's "
                       "registers live and the XSAVE that copies them to the child; it "
                       "clobbers SSE and AVX if irq_fpu_usable() lets it (output irq)",
                       required=False, default=False)
_CPU = FieldSpec(int, "a CPU number")


#: The autosleep worker suspends to RAM or hibernates an idle machine (`power.AUTOSLEEP_WORKER`).
_AUTOSLEEP = (Action.of("suspend", autosleep=True),
              Action.of("suspend", autosleep=True, state="disk"))


def component_number(name: str) -> int:
    """The xfeature number of a short name (fpstate.x86.xfeatures: avx, xtiledata, pasid...)."""
    try:
        return BY_SHORT[name].number
    except KeyError:
        raise StepError(f"unknown component {name!r} (known: {', '.join(BY_SHORT)})") from None


def components_mask(names: str) -> int:
    """The xfeature mask of '|'-joined short names, memoised (actions repeat them)."""
    mask = _MASKS.get(names)
    if mask is None:
        mask = 0
        for part in names.split("|"):
            mask |= 1 << component_number(part.strip())
        _MASKS[names] = mask
    return mask


_MASKS: dict[str, int] = {}
#: (world class, action name) -> its do_ method.
_DO: dict[tuple[type, str], Any] = {}


def errno_name(ret: int) -> str:
    return ERRNO_NAMES.get(-ret, str(ret)) if ret < 0 else "0"


X86_SPECS: dict[str, ActionSpec] = {s.name: s for s in (
    ActionSpec("run", "schedule a runnable task on a CPU (preempting what runs there) and "
               "return it to user mode (exit_to_user_mode: switch_fpu_return)",
               {"task": _TASK, "cpu": _CPU}),
    ActionSpec("switch_in", "schedule a runnable task on a CPU and leave it in the kernel "
               "(TIF_NEED_FPU_LOAD still set, registers maybe still cached)",
               {"task": _TASK, "cpu": _CPU}),
    ActionSpec("return_to_user", "the task in the kernel on this CPU returns to user mode",
               {"cpu": _CPU}),
    ActionSpec("idle", "an interrupt schedules the CPU's idle task (switch_fpu saves the "
               "outgoing task)", {"cpu": _CPU}),
    ActionSpec("write", "a user instruction writes a component (VMOVDQU, KMOVQ, LDTILECFG, "
               "TILELOADD...); #NM goes through the XFD handler",
               {"task": _TASK, "component": FieldSpec(str, "component short name")}),
    ActionSpec("ldmxcsr", "LDMXCSR of a value naming the task (fpstate.kernel.x86.hw."
               "mxcsr_token; the task's two values in turn): the task must read it back",
               {"task": _TASK}),
    ActionSpec("release", "TILERELEASE (or any instruction that puts components in their "
               "initial configuration)",
               {"task": _TASK,
                "components": FieldSpec(str, "'|'-joined short names", required=False,
                                        default="xtilecfg|xtiledata")}),
    ActionSpec("syscall", "a system call that does nothing with the FPU (enter and leave the "
               "kernel)", {"task": _TASK}),
    ActionSpec("arch_prctl", "arch_prctl(ARCH_*_XCOMP_*)",
               {"task": _TASK,
                "option": FieldSpec(str, "req_perm, req_guest_perm, get_perm, get_guest_perm, "
                                    "get_supp", choices=tuple(ARCH_OPTIONS)),
                "feature": FieldSpec(int, "xfeature number for req_*", required=False,
                                     default=18)}),
    ActionSpec("sigaction", "install a SIGUSR1 handler", {
        "task": _TASK,
        "onstack": FieldSpec(bool, "SA_ONSTACK", required=False, default=False),
        "siginfo": FieldSpec(bool, "SA_SIGINFO: a 32-bit program's handler without it gets "
                             "the non-rt frame (sigframe_ia32); 64-bit frames are rt ones",
                             required=False, default=True)}),
    ActionSpec("sigaltstack", "map and install an alternate signal stack",
               {"task": _TASK, "size": FieldSpec(int, "ss_size in bytes")}),
    ActionSpec("signal", "tgkill(SIGUSR1) of a task running in user mode: delivered at once",
               {"task": _TASK, "irq": _IRQ_IN_LOCK,
                "irq_at": FieldSpec(str, "the section the interrupt of irq arrives in: "
                                    "sigframe (copy_fpstate_to_sigframe(), between loading "
                                    "the registers and the XSAVE to the frame), fsave "
                                    "(save_fsave_header() of an ia32 frame, between its "
                                    "TIF_NEED_FPU_LOAD test and the FXSAVE into the fpstate) "
                                    "or clear "
                                    "(fpu__clear_user_states(), between putting the user "
                                    "components in their initial state and "
                                    "fpregs_mark_activate(), as the handler's state is set "
                                    "up)", required=False, choices=tuple(SIGNAL_IRQ_SITES),
                                    default="sigframe")}),
    ActionSpec("pkey_altstack", "pkey_alloc(0, 0) and pkey_mprotect() of the task's "
               "sigaltstack with the new key, then WRPKRU of a value of the task's own, which "
               "closes keys 1 (AD) and 2 (WD): the stack is behind a key the task closed",
               {"task": _TASK}),
    ActionSpec("pkey_open", "WRPKRU 0: every protection key open, as a handler running on a "
               "key-protected sigaltstack does before it touches its stack", {"task": _TASK}),
    ActionSpec("sigreturn", "the signal handler returns (rt_sigreturn)",
               {"task": _TASK, "irq": _IRQ_IN_LOCK}),
    ActionSpec("frame_write", "the signal handler stores a value of its own into a component "
               "of its frame's XSAVE area and sets its XSTATE_BV bit: sigreturn must "
               "load it (the frame, not the kernel, is the interrupted context's state)",
               {"task": _TASK, "component": FieldSpec(str, "component short name")}),
    ActionSpec("frame_clear", "the signal handler clears a component's XSTATE_BV bit in its "
               "frame: sigreturn's XRSTOR must load the component's initial "
               "configuration (for PKRU 0, every key open), whatever the frame holds there",
               {"task": _TASK, "component": FieldSpec(str, "component short name")}),
    ActionSpec("frame_mxcsr", "the signal handler stores an MXCSR value of the task's own "
               "in its frame (as a SIGFPE handler masks an exception in uc_mcontext): sigreturn "
               "must load it where the kernel's path does (X86World._mxcsr_after_sigreturn)",
               {"task": _TASK}),
    ActionSpec("frame_fx_only", "the signal handler zeroes fx_sw_bytes.magic1 in its "
               "frame: check_xstate_in_sigframe() falls back to fx_only, and sigreturn must load "
               "x87/SSE from the frame's legacy area and every other user component in its "
               "initial configuration (PKRU 0), whatever the frame's XSAVE area holds",
               {"task": _TASK}),
    ActionSpec("frame_resize", "the signal handler rewrites its frame in the standard layout "
               "of a CPU with x87, SSE and AVX only, as CRIU restores a frame checkpointed on "
               "such a CPU and gVisor writes one: fx_sw_bytes of that size and features, MAGIC2 "
               "after it, XSTATE_BV within them, and nothing of the frame beyond it. sigreturn "
               "must load x87, SSE and AVX from the frame and every other user component in "
               "its initial configuration (PKRU 0)", {"task": _TASK}),
    ActionSpec("hotplug", "the idle CPU is taken offline and brought back (sysfs online 0, "
               "then 1): INIT, the microcode loader (on AMD, a SHA-256 that may use the FPU), "
               "fpu__init_cpu() (CR4, FNINIT, XCR0, IA32_XSS, IA32_XFD), PKRU "
               "(fpstate.kernel.x86.smpboot); not CPU 0", {"cpu": _CPU}),
    ActionSpec("suspend", "the task writes mem to /sys/power/state (from user mode on CPU 0, "
               "or already inside that write, in the kernel on CPU 0): the other CPUs go "
               "offline, save_processor_state(), every CPU loses power (RESET values), "
               "restore_processor_state() (CR4, fpu__resume_cpu(): XCR0, IA32_XSS, IA32_XFD), "
               "the other CPUs come back as after hotplug; the task stays in the kernel "
               "(fpstate.kernel.x86.power). Needs every other CPU idle and no task inside a "
               "kernel path (the freezer's work). With state disk, hibernation: the snapshot "
               "is taken after save_processor_state(), and every CPU comes back as a boot of "
               "the same kernel leaves it (its own values in the vector registers, MXCSR and "
               "PKRU) before restore_processor_state() (power.hibernate_enter). With "
               "autosleep, no task: the autosleep workqueue's worker, a kernel thread, "
               "suspends or hibernates an idle machine from CPU 0", {
                   "task": FieldSpec(str, "the task that writes /sys/power/state (none with "
                                     "autosleep)", required=False, default=""),
                   "autosleep": FieldSpec(bool, "the autosleep worker suspends (config."
                                          "autosleep; every CPU idle)",
                                          required=False, default=False),
                   "state": FieldSpec(str, "what the task writes to /sys/power/state: mem "
                                      "(suspend to RAM) or disk (hibernation)",
                                      required=False, default="mem",
                                      choices=("mem", "disk")),
                   "ending": FieldSpec(str, "with state disk, how the hibernation ends "
                                       "(power.HIBERNATION_ENDINGS): resume (the power goes, "
                                       "the image is resumed), rollback (a wakeup event: "
                                       "power_down() returns, the power never goes) or "
                                       "suspend (/sys/power/disk suspend: suspend to RAM "
                                       "after writing the image, woken from RAM)",
                                       required=False, default="resume",
                                       choices=HIBERNATION_ENDINGS)}),
    ActionSpec("kernel_fpu", "an interrupt handler uses the FPU (kernel_fpu_begin/end) and "
               "clobbers components", {
                   "cpu": _CPU,
                   "components": FieldSpec(str, "'|'-joined short names", required=False,
                                           default="sse|avx"),
                   "hardirq": FieldSpec(bool, "hard interrupt rather than softirq",
                                        required=False, default=False)}),
    ActionSpec("fork", "fork(): a new process",
               {"task": _TASK, "child": _TASK, "irq": _IRQ_CLONE}),
    ActionSpec("clone", "clone(CLONE_VM|CLONE_THREAD): a new thread",
               {"task": _TASK, "child": _TASK, "irq": _IRQ_CLONE}),
    ActionSpec("exec", "execve(): other threads die, default fpstate and permissions; with "
               "a thread switched out inside a kernel path, de_thread() sleeps until it has "
               "left the path and exited (then exec_finish)", {
                   "task": _TASK,
                   "abi": FieldSpec(str, "the new program: of the same kind, a 64-bit one or "
                                    "a 32-bit one (then a compat process)", required=False,
                                    default="same", choices=("same", "x86_64", "ia32")),
                   "sleep": FieldSpec(bool, "the exec sleeps in begin_new_exec() before "
                                      "flush_thread() (exec_mmap()): the task stays in the "
                                      "kernel, to be switched out, moved and continued by "
                                      "exec_finish", required=False, default=False),
                   "irq": FieldSpec(bool, "a hard interrupt whose handler wants the FPU "
                                    "arrives inside fpu_reset_fpstate_regs()'s "
                                    "fpregs_lock()ed section, between copying init_fpstate "
                                    "into the memory image and setting TIF_NEED_FPU_LOAD; it "
                                    "clobbers SSE and AVX if irq_fpu_usable() lets it (output "
                                    "irq: fpu, scalar, or none when the exec did not reach "
                                    "flush_thread() in this step)", required=False,
                                    default=False)}),
    ActionSpec("exec_finish", "the exec asleep (in de_thread(), its other threads gone, or "
               "where exec's sleep left it) goes on, loads the binary and returns to user mode",
               {"task": _TASK,
                "sleep": FieldSpec(bool, "stop where load_elf_binary() sleeps after "
                                   "flush_thread() (setup_arg_pages(), elf_map()), the state "
                                   "reset but not yet loaded", required=False, default=False)}),
    ActionSpec("exit", "the task exits", {"task": _TASK}),
    ActionSpec("kill", "kill(2) of SIGKILL to another process (named by any of its threads): "
               "every thread of it dies, one inside a kernel path once it has left it",
               {"task": _TASK, "target": _TASK}),
    ActionSpec("ptrace_stop", "the task stops for its tracer (switched out, TASK_TRACED)",
               {"task": _TASK}),
    ActionSpec("ptrace_cont", "PTRACE_CONT: the stopped task becomes runnable",
               {"task": _TASK}),
    ActionSpec("ptrace_set", "PTRACE_SETREGSET NT_X86_XSTATE by a tracer running in user mode: "
               "one component of the stopped task gets a value the tracer wrote into the "
               "buffer PTRACE_GETREGSET gave it, its XSTATE_BV bit set (x87: not MXCSR)",
               {"tracer": _TASK, "task": _TASK,
                "component": FieldSpec(str, "component short name")}),
    ActionSpec("ptrace_get", "PTRACE_GETREGSET NT_X86_XSTATE of a stopped task",
               {"tracer": _TASK, "task": _TASK}),
    ActionSpec("core_dump", "a fatal signal with a core dump (SIGSEGV, SIGQUIT) taken by a "
               "task in user mode: vfs_coredump() zaps the other threads of "
               "its process (each switched out in coredump_task_exit), waits for them -- "
               "asleep, so switched out itself, unless raced -- and for a pipe's helper or a "
               "socket server's answer, "
               "collects every thread's NT_X86_XSTATE (xstateregs_get, the dumper's first), "
               "then all of them exit",
               {"task": _TASK,
                "raced": FieldSpec(bool, "every other thread reached coredump_task_exit() "
                                   "before the dumper waited, so it did not sleep (needs "
                                   "other threads and a second CPU)", required=False,
                                   default=False),
                "late": FieldSpec(bool, "the last thread to arrive was still running in "
                                  "TASK_RUNNING when the dumper's wait_task_inactive(TASK_ANY) "
                                  "looked, so its note is its fpstate as its last switch left "
                                  "it (6.1+; needs that thread running on another CPU with its "
                                  "registers live)", required=False, default=False),
                "late_thread": FieldSpec(str, "as late, for the thread named: the last to "
                                         "arrive or an earlier one, held on its CPU between "
                                         "its atomic_dec_and_test() and set_current_state() "
                                         "while the later threads arrived", required=False,
                                         default=""),
                "pattern": FieldSpec(str, "core_pattern: a file; a pipe to a helper whose "
                                     "exec the dumper waits for; a socket (@path, 6.16+: a "
                                     "non-blocking connect); a socket with the request "
                                     "protocol (@@path, 6.17+: the dumper waits for the "
                                     "server's coredump_ack)", required=False,
                                     choices=("file", "pipe", "socket", "socket-request"),
                                     default="file"),
                "ack": FieldSpec(str, "what a socket-request server answers: kernel (the "
                                 "kernel writes the core), kernel-wait (and the dumper waits "
                                 "for the server's shutdown), userspace (no core from the "
                                 "kernel, WCOREDUMP), reject (nothing)", required=False,
                                 choices=tuple(CORE_ACKS), default="kernel"),
                "irq": FieldSpec(bool, "a hard interrupt whose handler wants the FPU arrives "
                                 "inside fpu_sync_fpstate()'s fpregs_lock()ed section as the "
                                 "dumper's own note is taken, between its TIF_NEED_FPU_LOAD "
                                 "test and the XSAVE; it clobbers SSE and AVX if "
                                 "irq_fpu_usable() lets it (output irq)", required=False,
                                 default=False)}),
    ActionSpec("pasid_write", "the kernel updates current's IA32_PASID xstate (seed 004: "
               "fpregs_update_current_xstate); a task in user mode enters the kernel first",
               {"task": _TASK, "pasid": FieldSpec(int, "the PASID", required=False,
                                                  default=1),
                "irq": FieldSpec(bool, "a hard interrupt whose handler wants the FPU arrives "
                                 "inside the fpregs_lock()ed section, between the "
                                 "TIF_NEED_FPU_LOAD test and the register write; it clobbers "
                                 "SSE and AVX if irq_fpu_usable() lets it (output irq: fpu, "
                                 "scalar, or none when the write went to memory)",
                                 required=False, default=False)}),
    ActionSpec("write_nm", "a user instruction touches an XFD-armed component (TILELOADD, "
               "LDTILECFG): the #NM handler (exc_device_not_available -> fpstate_realloc) runs "
               "to its preemption point, the vzalloc() of the larger buffer, and sleeps there "
               "(the task stays in the kernel until nm_return)",
               {"task": _TASK, "component": FieldSpec(str, "an XFD-armed component "
                                                      "(xtilecfg, xtiledata)")}),
    ActionSpec("nm_return", "the sleeping #NM handler of a task that is current again "
               "finishes, the task returns to user mode and the instruction is retried",
               {"task": _TASK,
                "irq": FieldSpec(bool, "a hard interrupt whose handler wants the FPU arrives "
                                 "inside fpstate_realloc()'s fpregs_lock()ed section, after "
                                 "the task's registers are made live and before the new "
                                 "buffer is installed; it clobbers SSE and AVX if "
                                 "irq_fpu_usable() lets it (output irq: fpu, scalar or none "
                                 "when no buffer was allocated)", required=False,
                                 default=False)}),
    ActionSpec("observe", "what a task would see and where its state lives (for expect:)",
               {"task": _TASK}),
)}


def fold_x87(value: bytes) -> bytes:
    """The x87 component a compat task gets back from sigreturn when its frame held
    ``value``: the fsave header was made from it (convert_from_fxsr) and is folded back over
    it (convert_to_fxsr): FOP 0, FIP and FDP cut to 32 bits, the tag word's high byte 0."""
    fx = bytearray(value) + bytearray(512 - len(value))
    convert_to_fxsr(fx, convert_from_fxsr(bytes(fx)))
    return bytes(fx[:len(value)])


class X86World(X86Views, World):
    """The x86 kernel model with the checker's bookkeeping (module docstring).

    Configuration (the ``config`` mapping of a scenario): ``cpu`` (a profile name or path,
    default sapphire-rapids), ``kernel`` (default the newest modelled), ``cpus`` (default 2),
    ``processes`` (name -> number of threads, created at boot and runnable; default
    ``{p0: 2, p1: 2}``), ``max_tasks`` (the explorer's bound on fork/clone, default 6).
    Threads are named ``<process>.t<n>``.
    """

    model: ClassVar[str] = "x86"
    SPECS: ClassVar[dict[str, ActionSpec]] = X86_SPECS
    CONFIG_KEYS: ClassVar[tuple[str, ...]] = ("cpu", "kernel", "cpus", "processes",
                                              "max_tasks", "compat", "fixes", "autosleep")
    #: Kernel-model variants (FpuSystem.variants) this world accepts: all of them.
    KERNEL_VARIANTS: ClassVar[frozenset[str]] = frozenset(KERNEL_MODEL_VARIANTS)

    #: Bounds of the configuration (the model's cost grows with each).
    MAX_CPUS: ClassVar[int] = 64
    MAX_THREADS: ClassVar[int] = 16
    DEFAULT_PROCESSES: ClassVar[dict[str, int]] = {"p0": 2, "p1": 2}

    @classmethod
    def validate_config(cls, config: Mapping[str, Any]) -> None:
        super().validate_config(config)
        if "cpu" in config:
            config_str("config.cpu", config["cpu"])
        kernel = config.get("kernel")
        if kernel is not None and not isinstance(kernel, str):
            raise ScenarioError(f"config.kernel: must be a version string such as \"6.18\" "
                                f"(quoted: YAML reads 6.10 as the number 6.1), not {kernel!r}")
        if "cpus" in config:
            config_int("config.cpus", config["cpus"], 1, cls.MAX_CPUS)
        procs = config_mapping("config.processes", config.get("processes",
                                                              cls.DEFAULT_PROCESSES))
        for name, n in procs.items():
            config_int(f"config.processes.{name}", n, 1, cls.MAX_THREADS)
        compat = config.get("compat", [])
        if not isinstance(compat, list) or not all(isinstance(p, str) for p in compat):
            raise ScenarioError(f"config.compat: must be a list of process names, not {compat!r}")
        for name in compat:
            if name not in procs:
                raise ScenarioError(f"config.compat: {name!r} is not a process of "
                                    f"config.processes ({', '.join(procs)})")
        if "max_tasks" in config:
            config_int("config.max_tasks", config["max_tasks"], 1, 64)
        if "autosleep" in config:
            config_bool("config.autosleep", config["autosleep"])
        fixes = config.get("fixes", [])
        if not isinstance(fixes, list) or not all(isinstance(f, str) for f in fixes):
            raise ScenarioError(f"config.fixes: must be a list of fix names, not {fixes!r}")
        for name in fixes:
            if name not in APPLICABLE_FIXES:
                raise ScenarioError(f"config.fixes: {name!r} is not a fix the model applies "
                                    f"by name (known: {', '.join(sorted(APPLICABLE_FIXES))})")
        for amendment, base in AMENDS.items():
            if amendment in fixes and base not in fixes:
                raise ScenarioError(f"config.fixes: {amendment!r} amends {base!r}, which is not "
                                    f"listed")

    @classmethod
    def task_names(cls, config: Mapping[str, Any]) -> list[str]:
        """The tasks a (valid) configuration boots with: ``<process>.t<n>``."""
        procs = config.get("processes", cls.DEFAULT_PROCESSES) or {}
        return [f"{p}.t{n}" for p, count in procs.items() for n in range(count)]

    def __init__(self, config: dict[str, Any], variant: str | None) -> None:
        super().__init__(config, variant)
        self.m = self._boot()
        self.tasks: dict[str, Task] = {}
        self.expected: dict[str, dict[int, bytes]] = {}
        self.sigstack: dict[str, list[dict[int, bytes]]] = {}
        #: Each task's signal frames, innermost last: (frame, end, kind) with kind FRAME_X64,
        #: FRAME_IA32_RT or FRAME_IA32 (the layout the key and sigreturn read).
        self.frames: dict[str, list[tuple[int, int, str]]] = {}
        self.nm_pending = {}
        #: The kind of program each task's last exec loads ("same", "x86_64", "ia32"): read by
        #: the state key while that exec sleeps in de_thread().
        self.exec_abi: dict[str, str] = {}
        #: Where each task's unfinished exec sleeps (EXEC_DE_THREAD, EXEC_BEGIN or
        #: EXEC_LOAD), for the state key.
        self.exec_at: dict[str, str] = {}
        self.emitted: list[tuple[str, Any]] = []
        s = self.m.system
        #: PKRU (with OSPKE) last: it is switched eagerly, outside the XSAVE images the
        #: kernel restores (X86Views.seen reads thread.pkru for a task off its CPU).
        self.pkru_tracked = s.ospke
        pkru = (PKRU,) if s.ospke else ()
        self.tracked = tuple(bits(s.xcr0 & ~XFEATURE_MASK_PKRU)) + (
            (PASID,) if s.kernel.default_features & XFEATURE_MASK_PASID else ()) + pkru
        self.writable = tuple(bits(s.xcr0 & ~XFEATURE_MASK_PKRU)) + pkru
        self.supervisor_tracked = tuple(i for i in self.tracked if i not in self.writable)
        self.max_tasks = int(self.config.get("max_tasks", 6))
        #: CONFIG_PM_AUTOSLEEP with a state written to /sys/power/autosleep: the autosleep
        #: worker may suspend whenever every CPU is idle (`suspend` with autosleep).
        self.autosleep = bool(self.config.get("autosleep", False))
        #: (steps, pickled world) for `clone`, valid while ``steps`` is unchanged
        self._snapshot: tuple[int, bytes] | None = None
        self.sizes: dict[tuple[int, bool], int] = {}  #: XSAVE sizes by (mask, compacted)
        self.init_values = {i: init_value(i, s.profile.component(i).size)
                            for i in bits(s.xcr0 | s.xss)}
        #: What a context without a value of its own expects: the initial configuration, but
        #: init_pkru_value for PKRU (exec's pkru_flush_thread, a handler's
        #: pkru_write_default) rather than the register's initial 0.
        self.fresh_values = dict(self.init_values)
        if s.ospke:
            self.fresh_values[PKRU] = pkru_bytes(INIT_PKRU_VALUE)
        self.view_comps = tuple(sorted(set(self.tracked) | set(
            bits(s.kernel.max_features & XFEATURE_MASK_FPSTATE))))
        self._setup()

    # -- configuration ---------------------------------------------------------------------

    def _system_variants(self) -> set[str]:
        return {self.variant} if self.variant in self.KERNEL_VARIANTS else set()

    def _boot(self) -> Machine:
        return Machine.boot(self.config.get("cpu", "sapphire-rapids"), self.config.get("kernel"),
                            int(self.config.get("cpus", 2)), variants=self._system_variants(),
                            fixes=self.config.get("fixes", ()))

    def _setup(self) -> None:
        procs = self.config.get("processes", self.DEFAULT_PROCESSES) or {}
        for pname, nthreads in procs.items():
            leader = self.m.spawn(f"{pname}.t0", compat=pname in self.config.get("compat", ()))
            self._adopt(leader, {})
            if int(nthreads) > 1:
                self.m.run(0, leader)
                for n in range(1, int(nthreads)):
                    child = self.m.syscall(0, sys_clone, CLONE_VM | CLONE_THREAD,
                                           f"{pname}.t{n}")
                    self._thread_stack(child)
                    self._adopt(child, {})
                self.m.idle(0)
        self.m.log.clear()

    def _thread_stack(self, t: Task) -> None:
        """clone()'s new stack pointer, as pthread_create() passes one: a thread sharing
        its parent's mm gets a stack of its own (Machine's sys_clone copies the parent's
        stack pointer, which would put both threads' signal frames at the same address)."""
        size = USER_STACK_SIZE  # pthread_create()'s default stack size
        t.user_sp = self.m.mmap(t, size) + size - 0x1000

    def _adopt(self, t: Task, expected: dict[int, bytes]) -> None:
        self.tasks[t.comm] = t
        self.expected[t.comm] = expected
        self.sigstack[t.comm] = []
        self.frames[t.comm] = []

    # -- World -----------------------------------------------------------------------------

    def illegal_types(self) -> tuple[type[BaseException], ...]:
        return (IllegalEvent,)

    def bug_violation(self, exc: BaseException) -> Violation | None:
        if isinstance(exc, KernelBug):
            return invariants.violation_for_bug(exc.name, exc.detail)
        return None

    #: The key names everything the invariants and `enabled` read (fpstate.check.statekey).
    MEMO: ClassVar[bool] = True

    def check(self) -> list[Violation]:
        self._live_cache = [t for t in self.tasks.values() if t.state is not STATE_DEAD]
        self._user_cache = user_tasks(self)
        try:
            out = invariants.check(self)
        finally:
            self._live_cache = self._user_cache = None
        self.discard_events()
        return out

    def event_key(self) -> Any:
        """Signal frames, ptrace and KVM_GET_XSAVE buffers, INIT and RESET are judged from
        what the step emitted: such steps are always checked."""
        return None if self.emitted else ()

    def events(self) -> bool:
        return bool(self.emitted)

    def shapes_hash(self) -> int | None:
        return fps_shapes(self)

    def discard_events(self) -> None:
        self.emitted = []
        self._snapshot = None

    def in_flight(self) -> bool:
        return any(t.kpath is not None for t in self.m.tasks.values())

    def clone(self) -> X86World:
        """A deep copy sharing the immutable system and profile.

        Made by unpickling a snapshot of this world (several times faster than deepcopy);
        the snapshot is kept until the world next changes (`World.step`), so the many
        clones of one state (a walk's start, a search node's children) pickle it once."""
        if self.in_flight():
            return self.replay(self.history)  # type: ignore[return-value]
        blob = self._snapshot
        if blob is None or blob[0] != self.steps:
            try:
                blob = self._snapshot = (self.steps, *self._pickle())
            except (pickle.PicklingError, TypeError, AttributeError):
                s = self.m.system
                memo = {id(s): s, id(s.profile): s.profile}
                return copy.deepcopy(self, memo)
        up = pickle.Unpickler(io.BytesIO(blob[1]))
        up.persistent_load = blob[2].__getitem__
        return up.load()

    def _pickle(self) -> tuple[bytes, list[Any]]:
        """The snapshot: this world pickled, with the system, the profile and every frozen
        (immutable) dataclass instance kept by reference, so clones share them (unpickling a
        frozen slotted dataclass goes through dataclasses' Python-level __setstate__)."""
        s = self.m.system
        shared: list[Any] = [s, s.profile]
        ids = {id(s): 0, id(s.profile): 1}

        def persistent_id(obj: Any) -> int | None:
            n = ids.get(id(obj))
            if n is None and _is_frozen(type(obj)):
                n = ids[id(obj)] = len(shared)
                shared.append(obj)
            return n

        f = io.BytesIO()
        p = pickle.Pickler(f, pickle.HIGHEST_PROTOCOL)
        p.persistent_id = persistent_id
        saved, self._snapshot = self._snapshot, None
        try:
            p.dump(self)
        finally:
            self._snapshot = saved
        return f.getvalue(), shared

    def _apply(self, action: Action) -> dict[str, Value]:
        fn = _DO.get((type(self), action.name))
        if fn is None:
            fn = getattr(type(self), f"do_{action.name}", None)
            if fn is None:
                raise StepError(f"action {action.name!r} is not known to model {self.model}")
            _DO[(type(self), action.name)] = fn
        self.emitted = []
        return fn(self, **action.kwargs) or {}

    # -- actions: scheduling -----------------------------------------------------------------

    def do_run(self, task: str, cpu: int) -> dict[str, Value]:
        t, nr = self.task(task), self.cpu(cpu)
        if t.state is not STATE_RUNNABLE:
            raise StepError(f"task {task} is not runnable ({t.state.value})")
        self.m.run(nr, t)
        return {}

    def do_switch_in(self, task: str, cpu: int) -> dict[str, Value]:
        t, nr = self.task(task), self.cpu(cpu)
        if t.state is not STATE_RUNNABLE:
            raise StepError(f"task {task} is not runnable ({t.state.value})")
        self.m.preempt(nr, t)
        return {}

    def do_return_to_user(self, cpu: int) -> dict[str, Value]:
        c = self.m.cpus[self.cpu(cpu)]
        t = c.current
        if t is c.idle or t.state is not STATE_KERNEL or t.kpath is not None:
            raise StepError(f"CPU {cpu}: no task in the kernel ready to return to user mode")
        self.m.exit_to_user_mode(c.nr)
        return {}

    def do_idle(self, cpu: int) -> dict[str, Value]:
        nr = self.cpu(cpu)
        if self.m.cpus[nr].current is self.m.cpus[nr].idle:
            raise StepError(f"CPU {cpu} is already idle")
        self.m.idle(nr)
        return {}

    # -- actions: user mode ------------------------------------------------------------------

    def do_write(self, task: str, component: str) -> dict[str, Value]:
        t = self.task(task)
        nr = self.user_cpu(t)
        i = component_number(component)
        fault = self.m.user_write(nr, i)
        return self._written(t, i, fault.vector if fault else "none")

    #: task name -> (component, value) of the instruction whose #NM handler sleeps (write_nm).
    nm_pending: dict[str, tuple[int, bytes]]

    def do_write_nm(self, task: str, component: str) -> dict[str, Value]:
        """Machine.user_write with its #NM handler left at its preemption point."""
        t = self.task(task)
        nr = self.user_cpu(t)
        i = component_number(component)
        c = self.m.cpus[nr]
        if not (c.regs.xfd >> i) & 1 or not (c.regs.xcr0 >> i) & 1:
            raise StepError(f"{component} is not armed in CPU {nr}'s IA32_XFD: no #NM")
        fault, value = self.m.user_write_begin(nr, i)
        assert fault is not None and fault.vector == "#NM", fault
        self.nm_pending[t.comm] = (i, value)
        if t.kpath is None:  # finished without sleeping (no permission: SIGILL)
            return self._nm_complete(t, nr)
        return {"fault": "#NM", "alive": True, "sleeping": True}

    def do_nm_return(self, task: str, irq: bool = False) -> dict[str, Value]:
        t = self.task(task)
        if (t.comm not in self.nm_pending or t.kpath is None or t.on_cpu is None
                or self.m.cpus[t.on_cpu].current is not t):
            raise StepError(f"{task} has no sleeping #NM handler on a CPU")
        nr = t.on_cpu
        _, out = self._irq_in_lock(nr, irq, lambda: self.m.finish(nr), "fpstate_realloc")
        return {**self._nm_complete(t, nr), **out}

    def _nm_complete(self, t: Task, nr: int) -> dict[str, Value]:
        i, value = self.nm_pending.pop(t.comm)
        self.m.user_write_retry(nr, i, value)
        out = self._written(t, i, "#NM")
        out["sleeping"] = False
        return out

    def _written(self, t: Task, i: int, fault: str) -> dict[str, Value]:
        """What a task expects after its write of component ``i``."""
        alive = t.state is STATE_USER
        if alive and t.on_cpu is not None:
            value = self.m.cpus[t.on_cpu].regs.component(i)
            tok = read_token(value)
            if tok is not None and tok[0] == t.pid:
                self.expected[t.comm][i] = value
                if i == XTILE_CFG:  # LDTILECFG puts TILEDATA in its initial configuration
                    self.expected[t.comm].pop(XTILE_DATA, None)
        return {"fault": fault, "alive": alive}

    def do_ldmxcsr(self, task: str) -> dict[str, Value]:
        t = self.task(task)
        nr = self.user_cpu(t)
        exp = self.expected[t.comm]
        value = next_mxcsr_token(t.pid, exp.get(MXCSR))
        fault = self.m.user_ldmxcsr(nr, value)
        if fault is None:
            exp[MXCSR] = value.to_bytes(4, "little")
        return {"mxcsr": value, "fault": fault.vector if fault else "none"}

    def do_release(self, task: str, components: str) -> dict[str, Value]:
        t = self.task(task)
        nr = self.user_cpu(t)
        mask = components_mask(components)
        self.m.user_release(nr, mask)
        for i in bits(mask):
            self.expected[t.comm].pop(i, None)
        if mask & XFEATURE_MASK_SSE:  # SSE's initial configuration has MXCSR = 1F80H
            self.expected[t.comm].pop(MXCSR, None)
        return {}

    def do_syscall(self, task: str) -> dict[str, Value]:
        t = self.task(task)
        nr = self.user_cpu(t)
        self.m.enter_kernel(nr)
        self.m.exit_to_user_mode(nr)
        return {}

    def do_arch_prctl(self, task: str, option: str, feature: int = 18) -> dict[str, Value]:
        t = self.task(task)
        nr = self.user_cpu(t)
        code = ARCH_OPTIONS[option]
        if code in (ARCH_REQ_XCOMP_PERM, ARCH_REQ_XCOMP_GUEST_PERM):
            ret = self.m.syscall(nr, sys_arch_prctl, code, feature)
            return {"ret": ret, "errno": errno_name(ret)}
        # The result goes to a variable above the main thread's initial stack pointer (where
        # a real program's startup data lives): the same address every time, so that asking
        # changes no mapping (a new page per call would move every later mmap, which the
        # state key does not and need not name).
        addr = (USER32_STACK_TOP if t.process.compat else USER_STACK_TOP) - 0x100
        ret = self.m.syscall(nr, sys_arch_prctl, code, addr)
        value = int.from_bytes(t.process.mm.read(addr, 8), "little") if ret == 0 else 0
        self.emitted.append(("xcomp_mask", (t, option, value)))
        return {"ret": ret, "errno": errno_name(ret), "value": value}

    def do_sigaction(self, task: str, onstack: bool = False,
                     siginfo: bool = True) -> dict[str, Value]:
        t = self.task(task)
        nr = self.user_cpu(t)
        self.m.enter_kernel(nr)
        flags = SA_ONSTACK if onstack else 0
        if t.process.compat:  # the 32-bit rt_sigaction: sigaction_compat_abi()
            flags |= SA_IA32_ABI | SA_RESTORER | (SA_SIGINFO if siginfo else 0)
        t.handlers[SIGUSR1] = SigAction(flags)
        self.m.exit_to_user_mode(nr)
        return {}

    def do_sigaltstack(self, task: str, size: int) -> dict[str, Value]:
        t = self.task(task)
        nr = self.user_cpu(t)
        addr = self.m.mmap(t, size)
        ret = self.m.syscall(nr, sys_sigaltstack, addr, size, 0)
        return {"ret": ret, "errno": errno_name(ret)}

    def _irq_in_lock(self, nr: int, irq: bool, fn: Callable[[], Any],
                     site: str = "") -> tuple[Any, dict[str, Value]]:
        """``fn()`` and, with ``irq`` (the action's argument), a hard interrupt armed for CPU
        ``nr``'s next fpregs_lock()ed section (of the kernel function ``site`` if one is
        named): the result, and the output key ``irq`` saying what its handler did (fpu,
        scalar, or none when no such section was reached)."""
        if not irq:
            return fn(), {}
        c = self.m.cpus[nr]
        c.irq_in_lock, c.irq_in_lock_used = components_mask("sse|avx"), None
        c.irq_in_lock_site = site
        try:
            result = fn()
            used = c.irq_in_lock_used
        finally:
            c.irq_in_lock, c.irq_in_lock_used, c.irq_in_lock_site = 0, None, ""
        return result, {"irq": "none" if used is None else "fpu" if used else "scalar"}

    def do_signal(self, task: str, irq: bool = False,
                  irq_at: str = "sigframe") -> dict[str, Value]:
        t = self.task(task)
        nr = self.user_cpu(t)
        handled = SIGUSR1 in t.handlers
        before = (t.sas_ss_sp, t.sas_ss_size, t.handlers.get(SIGUSR1))
        room = self._sigframe_room(t) if handled else 0
        _, out = self._irq_in_lock(nr, irq, lambda: self.m.kill(t, SIGUSR1),
                                   SIGNAL_IRQ_SITES[irq_at])
        delivered = handled and t.state is STATE_USER
        if handled and not delivered:
            self.emitted.append(("undelivered", (t, room, at_minsigstksz(self.m.system))))
        if delivered:
            # The handler starts with the initial *user* state; supervisor state (PASID) is
            # not part of the signal frame and stays (fpu__clear_user_states).
            self.sigstack[t.comm].append(dict(self.expected[t.comm]))
            self.expected[t.comm] = self._supervisor(self.expected[t.comm])
            frame = t.user_sp
            mm = t.process.mm
            flags = t.handlers[SIGUSR1].flags
            if flags & SA_IA32_ABI:
                kind = FRAME_IA32_RT if flags & SA_SIGINFO else FRAME_IA32
            else:
                kind = FRAME_X64
            fpstate = _frame_xsave(mm, frame, kind)
            self.emitted.append(("sigframe", (t, frame, fpstate, before)))
            self.frames[t.comm].append((frame, fpstate + t.fpu.fpstate.user_size + 4, kind))
            return {"delivered": True, "frame": frame, **out}
        return {"delivered": False, "alive": t.state is not STATE_DEAD, **out}

    def _sigframe_room(self, t: Task) -> int:
        """The bytes below where SIGUSR1's frame would start that the task's stack offers, by
        the ABI's account (sigaltstack(2), signal(7)): with SA_ONSTACK and an altstack it is
        not on, the whole altstack; on the altstack, down to its base; else down to the start
        of the mapping the stack pointer is in, below the 128-byte red zone (x86-64 frames)."""
        sp = t.user_sp
        flags = t.handlers[SIGUSR1].flags
        ia32 = bool(flags & SA_IA32_ABI)
        top = sp if ia32 else sp - 128
        base, size = t.sas_ss_sp, t.sas_ss_size
        on_alt = not t.sas_ss_flags & SS_AUTODISARM and base < sp <= base + size
        if flags & SA_ONSTACK and size and not on_alt:
            return size
        if on_alt:
            return max(top - base, 0)
        mm = t.process.mm
        start = next((s for s, n in mm.regions.items() if s < sp <= s + n), None)
        return 0 if start is None else max(top - start, 0)

    def do_pkey_altstack(self, task: str) -> dict[str, Value]:
        t = self.task(task)
        nr = self.user_cpu(t)
        if not t.sas_ss_size:
            raise StepError(f"task {task} has no sigaltstack")
        key = self.m.syscall(nr, sys_pkey_alloc, 0, 0)
        if key < 0:
            return {"ret": key, "errno": errno_name(key)}
        ret = self.m.syscall(nr, sys_pkey_mprotect, t.sas_ss_sp, t.sas_ss_size, key)
        # Then WRPKRU of a value of the task's own. pkey_alloc() left the new key open in
        # PKRU (arch_set_user_pkey_access(), tested in tests/kernel/test_pkeys.py), as a
        # function of the bits of the value before -- which a state key cannot rank like the
        # values the checker writes; a value written by the task is one of those, and its
        # key-1 bits are AD (key 2: WD), so the stack's key is closed until a handler opens it.
        fault = self.m.user_write(nr, PKRU)
        out = self._written(t, PKRU, fault.vector if fault else "none")
        return {"ret": ret, "errno": errno_name(ret), "key": key, "fault": out["fault"]}

    def do_pkey_open(self, task: str) -> dict[str, Value]:
        t = self.task(task)
        nr = self.user_cpu(t)
        if not self.pkru_tracked:
            raise StepError("protection keys are not enabled (no OSPKE)")
        fault = self.m.user_write(nr, PKRU, pkru_bytes(0))
        if fault is None:
            self.expected[t.comm][PKRU] = pkru_bytes(0)
        return {"fault": fault.vector if fault else "none"}

    def _handler_frame(self, task: str,
                       component: str | None) -> tuple[Task, int, int, FpxSwBytes]:
        """(task, component number, address of the frame's XSAVE area, its fx_sw_bytes) for
        a handler's edit of its frame, 64-bit or ia32 (frame_write, frame_clear;
        frame_fx_only and frame_resize name no component: -1); StepError where it may not
        edit."""
        t = self.task(task)
        self.user_cpu(t)
        i = -1 if component is None else component_number(component)
        if not self.sigstack[t.comm]:
            raise StepError(f"task {task} is not in a signal handler")
        lo, hi, kind = self.frames[t.comm][-1]
        if not self._frame_open(t, lo):
            raise StepError(f"{task}'s frame is on a page whose protection key its PKRU closes "
                            "(the store would fault)")
        fp = _frame_xsave(t.process.mm, lo, kind)
        sw = self._frame_sw(t, fp)
        if component is not None and i not in self._frame_writable(t, sw, fp, hi):
            raise StepError(f"{component} is not a component {task}'s frame may be given")
        return t, i, fp, sw

    def do_frame_write(self, task: str, component: str) -> dict[str, Value]:
        t, i, fp, sw = self._handler_frame(task, component)
        mm = t.process.mm
        t.generation += 1
        size = self.m.system.profile.component(i).size
        value = token(t.pid, t.generation, i, size)
        if i == X87 and self.frames[t.comm][-1][2] != FRAME_X64:
            # An ia32 frame: the handler edits x87 where a 32-bit program does, in the fsave
            # header (the user_i387_ia32_struct the kernel made from the value, cs and ds
            # aside), which sigreturn folds over the frame's legacy area.
            mm.write(fp - FREGS_STATE_SIZE, convert_from_fxsr(value.ljust(FXSAVE_SIZE, b"\0")))
            self.sigstack[t.comm][-1][X87] = self._ia32_x87_after(t, fp, sw)
            return {}
        if i == X87:  # fxregs_state without mxcsr and mxcsr_mask (bytes 24..31)
            mm.write(fp, value[:24])
            mm.write(fp + 32, value[32:])
        else:
            mm.write(fp + self.m.system.profile.component(i).offset, value)
        bv = int.from_bytes(mm.read(fp + 512, 8), "little") | 1 << i
        mm.write(fp + 512, bv.to_bytes(8, "little"))
        # What sigreturn must give back (the edit left the sw_bytes alone): x87 and XMM from
        # the legacy area on either path (XRSTOR, or fx_only's FXRSTOR), the others only on
        # the XSAVE path and as sw_bytes name them.
        if i <= SSE or (sw.magic1 == FP_XSTATE_MAGIC1 and (sw.xfeatures >> i) & 1):
            self.sigstack[t.comm][-1][i] = value
        return {}

    def do_frame_clear(self, task: str, component: str) -> dict[str, Value]:
        t, i, fp, sw = self._handler_frame(task, component)
        mm = t.process.mm
        bv = int.from_bytes(mm.read(fp + 512, 8), "little") & ~(1 << i)
        mm.write(fp + 512, bv.to_bytes(8, "little"))
        # What sigreturn must give back: XRSTOR's initial configuration (for SSE: XMM zero,
        # MXCSR still from the frame; for x87: FCW 0x37F, the rest zero), except that
        # fx_only's FXRSTOR ignores the header and loads x87 and XMM from the legacy area.
        if i > SSE or sw.magic1 == FP_XSTATE_MAGIC1:
            self.sigstack[t.comm][-1][i] = self.init_values[i]
        return {}

    def _ia32_x87_after(self, t: Task, fp: int, sw: FpxSwBytes) -> bytes:
        """The x87 value a compat task gets back from sigreturn of its ia32 frame as the frame
        holds it now (`__fpu_restore_sig_ia32`): the fsave header folded over the frame's
        legacy area (convert_to_fxsr) -- unless the XSAVE path leaves x87 out of XSTATE_BV
        (the frame's, cut to fx_sw_bytes.xfeatures), when the XRSTOR after the fold puts x87
        in its initial configuration (kernel-findings section 3a); fx_only forces it in."""
        mm = t.process.mm
        bv = int.from_bytes(mm.read(fp + 512, 8), "little")
        if sw.magic1 == FP_XSTATE_MAGIC1 and not bv & sw.xfeatures & 1:
            return self.init_values[X87]
        fx = bytearray(mm.read(fp, FXSAVE_SIZE))
        convert_to_fxsr(fx, mm.read(fp - FREGS_STATE_SIZE, USER_I387_IA32_SIZE))
        return bytes(fx[:24]) + bytes(8) + bytes(fx[32:160])  # without MXCSR (keyed apart)

    @staticmethod
    def _frame_sw(t: Task, fp: int) -> FpxSwBytes:
        """The fx_sw_bytes of the frame whose XSAVE area is at ``fp``: without MAGIC1
        (frame_fx_only) sigreturn ignores everything but x87/SSE, and of the rest it loads only
        the components of their xfeatures (frame_resize), so an edit of another component
        changes nothing the task gets back."""
        return FpxSwBytes.unpack(t.process.mm.read(fp + SW_BYTES_OFFSET, SW_BYTES_SIZE))

    def do_frame_mxcsr(self, task: str) -> dict[str, Value]:
        t, _, fp, _ = self._handler_frame(task, None)
        mm = t.process.mm
        value = next_mxcsr_token(t.pid, mm.read(fp + MXCSR_OFFSET, 4))
        # The frame's bytes are what sigreturn's expectation is computed from: nothing to
        # note beside them.
        mm.write(fp + MXCSR_OFFSET, value.to_bytes(4, "little"))
        return {"mxcsr": value}

    def do_frame_fx_only(self, task: str) -> dict[str, Value]:
        t, _, fp, _ = self._handler_frame(task, None)
        mm = t.process.mm
        mm.write(fp + SW_BYTES_OFFSET, bytes(4))  # fx_sw_bytes.magic1
        # __restore_fpregs_from_user(): FXRSTOR of x87/SSE, then init_fpstate's bytes for
        # user_xfeatures & ~FPSSE -- every tracked one, whether the task ever wrote it or not
        # (a PKRU of init_pkru_value becomes 0 too). FXRSTOR takes XMM from the legacy area
        # whatever XSTATE_BV says (a frame_clear of SSE before this no longer counts); the
        # signal's XSAVE wrote it, as plain XSAVE writes every requested component. So does
        # x87 of a 64-bit frame (an ia32 frame's fsave header gives x87 back, which
        # do_sigreturn folds in).
        user = t.fpu.fpstate.user_xfeatures
        saved = self.sigstack[t.comm][-1]
        if SSE in saved:
            xmm = self.m.system.profile.component(SSE)  # fxregs_state.xmm_space
            saved[SSE] = mm.read(fp + xmm.offset, xmm.size)
        if X87 in saved and self.frames[t.comm][-1][2] == FRAME_X64:
            legacy = mm.read(fp, 160)
            saved[X87] = legacy[:24] + bytes(8) + legacy[32:]  # without MXCSR (keyed apart)
        elif X87 in saved:
            saved[X87] = self._ia32_x87_after(t, fp, self._frame_sw(t, fp))
        for i in self.tracked:
            if i >= 2 and (user >> i) & 1:
                saved[i] = self.init_values[i]
        return {}

    def _frame_writable(self, t: Task, sw: FpxSwBytes, fp: int, hi: int) -> tuple[int, ...]:
        """The components a handler's frame edit may set: writable ones the task's fpstate
        carries in its user features -- AMX's tile data only once the fpstate has room for it
        (a frame with tile data for a task whose tiles are not allocated ends in XFD's #NM and
        SIGSEGV, not in a restore) -- and, in a frame rewritten smaller (frame_resize), those
        its fx_sw_bytes name: another
        one's standard offset may lie past its end, where MAGIC2 is. x87 and SSE are among
        them (MXCSR stays as the signal saved it); in an ia32 frame x87 is edited in the
        fsave header, which is what gives x87 back (do_frame_write). Whatever fx_sw_bytes
        say, a component must lie inside the frame the kernel wrote (XSAVE area at ``fp``,
        frame up to ``hi``): tile data grown after delivery does not."""
        fps = t.fpu.fpstate
        user = fps.user_xfeatures & ~(XFEATURE_MASK_USER_DYNAMIC & ~fps.xfeatures)
        if sw.magic1 == FP_XSTATE_MAGIC1 and sw.xfeatures & user != user:
            user &= sw.xfeatures
        profile = self.m.system.profile
        return tuple(i for i in self.writable if (user >> i) & 1
                     and fp + profile.component(i).offset + profile.component(i).size <= hi)

    #: What frame_resize keeps: the features of a CPU with x87, SSE and AVX only.
    RESIZED = XFEATURE_MASK_FPSSE | XFEATURE_MASK_YMM

    def _resizable(self, t: Task, sw: FpxSwBytes) -> bool:
        """Whether frame_resize makes the frame smaller: its fx_sw_bytes are the kernel's
        (MAGIC1) and name more than `RESIZED`, which the task's features include."""
        return (sw.magic1 == FP_XSTATE_MAGIC1 and sw.xfeatures & ~self.RESIZED != 0
                and t.fpu.fpstate.user_xfeatures & self.RESIZED == self.RESIZED)

    def do_frame_resize(self, task: str) -> dict[str, Value]:
        t, _, fp, sw = self._handler_frame(task, None)
        mm = t.process.mm
        if not self._resizable(t, sw):
            raise StepError(f"{task}'s frame has nothing beyond x87, SSE and AVX to drop")
        keep = self.RESIZED
        size = standard_size(self.m.system.profile, keep)
        ia32 = self.frames[t.comm][-1][2] != FRAME_X64
        # What save_sw_bytes() and save_xstate_epilog() would have written for that size; the
        # old frame's tail (its MAGIC2 at the old xstate_size among it) is no longer frame.
        mm.write(fp + SW_BYTES_OFFSET, save_sw_bytes(size, keep, ia32).pack())
        mm.write(fp + size, FP_XSTATE_MAGIC2.to_bytes(4, "little"))
        mm.write(fp + size + 4, bytes(sw.xstate_size - size))
        bv = int.from_bytes(mm.read(fp + 512, 8), "little") & keep
        mm.write(fp + 512, bv.to_bytes(8, "little"))
        # __restore_fpregs_from_user(): XRSTOR of the frame's xfeatures, then init_fpstate's
        # bytes for the task's other user_xfeatures (PKRU 0 among them).
        user = t.fpu.fpstate.user_xfeatures
        saved = self.sigstack[t.comm][-1]
        for i in self.tracked:
            if (user >> i) & 1 and not (keep >> i) & 1:
                saved[i] = self.init_values[i]
        return {}

    def _frame_open(self, t: Task, addr: int) -> bool:
        """Whether the task's PKRU lets its handler store at ``addr`` (the protection key of
        the mapping there: only keyed sigaltstacks have one)."""
        mm = t.process.mm
        if not mm.pkeys or t.on_cpu is None:
            return True
        pkru = int.from_bytes(self.m.cpus[t.on_cpu].regs.component(PKRU)[:4], "little")
        return mm.key_allows(addr, True, pkru)

    def do_sigreturn(self, task: str, irq: bool = False) -> dict[str, Value]:
        t = self.task(task)
        nr = self.user_cpu(t)
        if not self.sigstack[t.comm]:
            raise StepError(f"task {task} is not in a signal handler")
        lo, hi, kind = self.frames[t.comm][-1]
        # Whether the handler's PKRU lets it read its frame (sigreturn-restores-own-frame).
        pkru = int.from_bytes(self.m.cpus[nr].regs.component(PKRU)[:4], "little") \
            if self.pkru_tracked else 0
        readable = t.process.mm.readable(lo, hi - lo, pkru)
        ia32 = kind != FRAME_X64
        mxcsr = self._mxcsr_after_sigreturn(t, lo, kind)
        if ia32:  # RET to the restorer, whose int $0x80 is sigreturn or rt_sigreturn
            handler_ia32_return(t, kind == FRAME_IA32_RT)
            path = sys32_rt_sigreturn if kind == FRAME_IA32_RT else sys32_sigreturn
        else:
            handler_return(t)
            path = sys_rt_sigreturn
        ret, out = self._irq_in_lock(nr, irq, lambda: self.m.syscall(nr, path))
        if ret != 0 and readable:
            self.emitted.append(("sigreturn-refused", (t, ret, lo)))
        saved = self.sigstack[t.comm].pop()
        self.frames[t.comm].pop()
        if ret == 0:
            if ia32 and 0 in saved:  # the fsave header wins: convert_to_fxsr's x87
                saved = dict(saved)
                saved[0] = fold_x87(saved[0])
            sup = self._supervisor(self.expected[t.comm])
            exp = self.expected[t.comm] = {i: v for i, v in saved.items()
                                           if i not in self.supervisor_tracked} | sup
            exp.pop(MXCSR, None)
            if mxcsr != MXCSR_INIT:
                exp[MXCSR] = mxcsr
        return {"ret": ret, "errno": errno_name(ret), **out}

    def _mxcsr_after_sigreturn(self, t: Task, lo: int, kind: str) -> bytes:
        """The MXCSR the task must run with after a successful sigreturn of its top frame,
        from the frame's bytes and the kernel's paths (not from the model's answer):

        - 64-bit: XRSTOR from the frame, standard form, RFBM = xrestore (the frame's
          xfeatures & user_xfeatures), loads the frame's MXCSR when SSE or YMM is in it,
          whatever XSTATE_BV says (SDM 13.8.1); fx_only, FXRSTOR loads it (xrestore FPSSE).
          Then __restore_fpregs_from_user()'s os_xrstor(&init_fpstate, init_bv =
          user_xfeatures & ~xrestore) puts 1F80H where init_bv has SSE (either form: the
          compacted one sets 1F80H for RFBM[1] without SSE loaded), or YMM and init_fpstate
          is in the standard form (a compacted restore without SSE leaves MXCSR).
        - ia32, fx_only: the 512 bytes are copied into the fpstate and XSTATE_BV gets FPSSE:
          the frame's.
        - ia32, XSAVE path: copy_uabi_to_xstate() copies MXCSR only when the frame's XSTATE_BV
          has FP, SSE or YMM; else the fpstate keeps its own (the handler's: saved by
          __fpu_restore_sig()'s os_xsave() where there are supervisor features, or there
          already under TIF_NEED_FPU_LOAD; else what the fpstate last held). XSTATE_BV is
          then cut to the frame's xfeatures (user_xfeatures), and the restore of the fpstate
          is compacted on XSAVES/XSAVEC kernels: without SSE in XSTATE_BV it puts MXCSR to
          1F80H (RFBM, max_features, has SSE). With the proposed fix ``mxcsr_by_format``,
          the frame's: stored whatever the header says, SSE set for it if not 1F80H."""
        mm = t.process.mm
        fp = _frame_xsave(mm, lo, kind)
        frame = mm.read(fp + MXCSR_OFFSET, 4)
        s = self.m.system
        sw = self._frame_sw(t, fp)
        fx_only = sw.magic1 != FP_XSTATE_MAGIC1
        if kind == FRAME_X64:
            user = t.fpu.fpstate.user_xfeatures
            init_bv = user & ~(XFEATURE_MASK_FPSSE if fx_only else sw.xfeatures & user)
            if init_bv & XFEATURE_MASK_SSE or (init_bv & XFEATURE_MASK_YMM
                                               and not s.xcompacted):
                return MXCSR_INIT
            return frame
        if fx_only or mxcsr_by_format(s):
            return frame  # (the fix stores MXCSR whatever the header says, SSE set for it)
        bv = int.from_bytes(mm.read(fp + HDR, 8), "little")
        if s.xcompacted and not bv & sw.xfeatures & XFEATURE_MASK_SSE:  # header &= user_xfeatures
            return MXCSR_INIT
        if bv & (XFEATURE_MASK_FPSSE | XFEATURE_MASK_YMM):
            return frame
        if t.need_fpu_load or s.xfeatures_mask_supervisor:
            return self.expected[t.comm].get(MXCSR, MXCSR_INIT)
        return self.image(t.fpu.fpstate)[MXCSR]

    def do_hotplug(self, cpu: int) -> dict[str, Value]:
        cpu_down_up(self.m, self.cpu(cpu))
        return {}

    def do_suspend(self, task: str = "", state: str = "mem", ending: str = "resume",
                   autosleep: bool = False) -> dict[str, Value]:
        """suspend_enter() (``mem``) or hibernate_enter() (``disk``, to its ``ending``) with
        ``task`` as CPU 0's writer of /sys/power/state, or with ``autosleep`` by the autosleep
        worker; the boot CPU's PKRU, IA32_XFD and xfd_state after resume (hex), those that
        exist."""
        if state != "disk" and ending != "resume":
            raise StepError(f"ending {ending}: only a hibernation (state disk) has one")
        if autosleep and not self.autosleep:
            raise StepError("suspend: autosleep needs config.autosleep (a state written to "
                            "/sys/power/autosleep)")
        if autosleep == bool(task):
            raise StepError("suspend: either a task writes /sys/power/state or autosleep "
                            "suspends, not both" if task else
                            "suspend: a task writes /sys/power/state, or autosleep: true")
        c0 = self.m.cpus[0]
        entered = False
        if task:
            t = self.task(task)
            if c0.current is not t:
                raise StepError(f"{task} is not current on CPU 0")
            entered = t.state is STATE_USER
            if entered:
                self.m.enter_kernel(0)  # the write() to /sys/power/state
        try:
            if state == "disk":
                hibernate_enter(self.m, ending, autosleep=autosleep)
            else:
                suspend_enter(self.m, autosleep=autosleep)
        except IllegalEvent:
            if entered:
                t.event("exit_to_user")  # refused before it changed anything
            raise
        s = self.m.system
        out: dict[str, Value] = {}
        if s.ospke:
            value = c0.regs.component(PKRU)
            # a value a task wrote is named as observe names it (its generation is not part
            # of the state: equal keys may number it differently); any other in hex, 0 too
            out["pkru"] = (self.writer(value, PKRU) if read_token(value) is not None
                           else f"{read_pkru(c0):#x}")
        if s.fpu_state_size_dynamic:
            out["xfd"] = f"{c0.regs.xfd:#x}"
            out["xfd_state"] = f"{c0.xfd_state:#x}"
        return out

    def do_kernel_fpu(self, cpu: int, components: str = "sse|avx",
                      hardirq: bool = False) -> dict[str, Value]:
        nr = self.cpu(cpu)
        used = self.m.irq_kernel_fpu(nr, hardirq=hardirq, clobber=components_mask(components))
        return {"used": used}

    # -- actions: task lifetime ------------------------------------------------------------

    def _spawn_child(self, task: str, child: str, flags: int, irq: bool) -> dict[str, Value]:
        t = self.task(task)
        nr = self.user_cpu(t)
        if child in self.tasks:
            raise StepError(f"task name {child!r} is taken")
        new, out = self._irq_in_lock(nr, irq, lambda: self.m.syscall(nr, sys_clone, flags,
                                                                     child))
        if flags & CLONE_VM:
            self._thread_stack(new)
        # fpu_clone: dynamic features are caller-saved, PASID is never inherited.
        drop = XFEATURE_MASK_USER_DYNAMIC | XFEATURE_MASK_PASID
        self._adopt(new, {i: v for i, v in self.expected[t.comm].items()
                          if i < 0 or not (drop >> i) & 1})  # MXCSR (-1) is copied
        return {"pid": new.pid, **out}

    def do_fork(self, task: str, child: str, irq: bool = False) -> dict[str, Value]:
        return self._spawn_child(task, child, 0, irq)

    def do_clone(self, task: str, child: str, irq: bool = False) -> dict[str, Value]:
        return self._spawn_child(task, child, CLONE_VM | CLONE_THREAD, irq)

    def do_exec(self, task: str, abi: str = "same", sleep: bool = False,
                irq: bool = False) -> dict[str, Value]:
        t = self.task(task)
        nr = self.user_cpu(t)
        result, out = self._irq_in_lock(nr, irq, lambda: self._exec(t, nr, abi, sleep),
                                        "fpu_reset_fpstate_regs")
        return {**result, **out}

    def _exec(self, t: Task, nr: int, abi: str, sleep: bool) -> dict[str, Value]:
        self.m.enter_kernel(nr)
        compat = None if abi == "same" else abi == "ia32"
        self.exec_abi[t.comm] = abi
        try:
            self.m.start(nr, sys_execve, t.comm, compat)
        except IllegalEvent:
            t.event("exit_to_user")  # refused before it changed anything (Machine.syscall)
            raise
        if de_thread_waits(t):
            self.exec_at[t.comm] = EXEC_DE_THREAD
            return {"waiting": True}
        if sleep:  # the path's first preemption point past de_thread(): before flush_thread()
            self.exec_at[t.comm] = EXEC_BEGIN
            return {"waiting": False, "asleep": EXEC_BEGIN}
        return self._exec_done(t, nr)

    def do_exec_finish(self, task: str, sleep: bool = False) -> dict[str, Value]:
        t = self.task(task)
        if (not _in_exec(t) or t.on_cpu is None or self.m.cpus[t.on_cpu].current is not t
                or t.state is not STATE_KERNEL):
            raise StepError(f"{task} has no exec asleep on a CPU")
        if de_thread_waits(t):
            raise StepError(f"{task}: de_thread() still waits for another thread to exit")
        nr = t.on_cpu
        if not sleep:
            return self._exec_done(t, nr)
        at = self.exec_at.get(t.comm)
        if at == EXEC_LOAD:
            raise StepError(f"{task}: its exec is already past flush_thread()")
        if at == EXEC_DE_THREAD:
            if self.m.step(nr):  # killed while de_thread() slept: -EAGAIN
                return self._exec_done(t, nr)
        if self.m.step(nr):
            return self._exec_done(t, nr)
        self.exec_at[t.comm] = EXEC_LOAD
        self._exec_reset(t)
        return {"waiting": False, "asleep": EXEC_LOAD}

    def _exec_done(self, t: Task, nr: int) -> dict[str, Value]:
        """The rest of execve() and the return to user mode: everything initial."""
        self.m.finish(nr)
        self.m.exit_to_user_mode(nr)
        self.exec_at.pop(t.comm, None)
        self._exec_reset(t)
        return {"waiting": False}

    def _exec_reset(self, t: Task) -> None:
        """What the new program has once flush_thread() has run: initial values, no signal
        frames."""
        self.expected[t.comm] = {}
        self.sigstack[t.comm] = []
        self.frames[t.comm] = []

    def do_exit(self, task: str) -> dict[str, Value]:
        t = self.task(task)
        nr = self.user_cpu(t)
        self.m.enter_kernel(nr)
        self.m.do_exit(nr)
        return {}

    def do_kill(self, task: str, target: str) -> dict[str, Value]:
        t, victim = self.task(task), self.task(target)
        if victim.process is t.process:
            raise StepError(f"{target} is in {task}'s own process (kill targets another one)")
        nr = self.user_cpu(t)
        self.m.enter_kernel(nr)
        self.m.kill_group(victim.process, Signal(SIGKILL))
        self.m.exit_to_user_mode(nr)
        return {"dead": sum(o.state is STATE_DEAD for o in victim.process.threads),
                "dying": sum(o.state is not STATE_DEAD for o in victim.process.threads)}

    def do_ptrace_stop(self, task: str) -> dict[str, Value]:
        t = self.task(task)
        if t.state not in (STATE_USER, STATE_RUNNABLE) or t.kpath is not None:
            raise StepError(f"task {task} cannot stop now ({t.state.value})")
        self.m.stop(t)
        return {}

    def do_ptrace_cont(self, task: str) -> dict[str, Value]:
        t = self.task(task)
        if t.state is not STATE_STOPPED:
            raise StepError(f"task {task} is not stopped")
        self.m.resume(t)
        return {}

    def _tracer(self, tracer: str, task: str) -> tuple[Task, Task, int]:
        tr, t = self.task(tracer), self.task(task)
        nr = self.user_cpu(tr)
        if t.state is not STATE_STOPPED:
            raise StepError(f"task {task} is not stopped")
        return tr, t, nr

    def do_ptrace_get(self, tracer: str, task: str) -> dict[str, Value]:
        from fpstate.kernel.x86.regset import ptrace_regset

        _tr, t, nr = self._tracer(tracer, task)
        size = self.m.system.user.max_size
        self.m.enter_kernel(nr)
        ret, buf = ptrace_regset(self.m.cpus[nr], t, PTRACE_GETREGSET, NT_X86_XSTATE, size)
        self.m.exit_to_user_mode(nr)
        if ret == 0:
            self.emitted.append(("uabi", (t, buf)))
        xstate_bv = int.from_bytes(buf[512:520], "little") if ret == 0 else 0
        mxcsr = int.from_bytes(buf[MXCSR_OFFSET:MXCSR_OFFSET + 4], "little") if ret == 0 else 0
        return {"ret": ret, "xstate_bv": xstate_bv, "mxcsr": mxcsr}

    def do_core_dump(self, task: str, raced: bool = False, late: bool = False,
                     late_thread: str = "", pattern: str = "file",
                     ack: str = "kernel", irq: bool = False) -> dict[str, Value]:
        """vfs_coredump() (fpstate.kernel.x86.coredump.do_coredump): every other thread of
        the process is zapped and switched out, the dumper sleeps in coredump_wait() unless it
        has no thread to wait for or ``raced`` (they all arrived before it waited), and again
        for a ``pipe`` core_pattern's helper or a ``socket-request`` server's answer (a
        ``file`` or a ``socket`` does not wait); elf_core_dump() takes every thread's
        NT_X86_XSTATE through xstateregs_get() (the dumper's first), and every thread exits.
        Each note is emitted with the values its thread held, for regset-view-shows-the-task,
        and with what of it may be stale: the PKRU of the dumper, when nothing switched it
        out (thread.pkru, kernel-findings 9i); everything of a ``late`` thread, whose note is
        its fpstate as its last switch left it (kernel-findings 9j): the last to arrive
        (``late``) or the one ``late_thread`` names. A ``socket-request`` server's ``ack``
        without COREDUMP_KERNEL leaves no notes: the result has ``threads`` 0 and whether the
        parent sees WCOREDUMP."""
        t = self.task(task)
        nr = self.user_cpu(t)
        unwaited: bool | Task = late
        if late_thread:
            unwaited = self.task(late_thread)
            if late and unwaited_thread(t, True) is not unwaited:
                raise StepError(f"core_dump of {task}: late names the last thread to arrive, "
                                f"not {late_thread}")
        why = zap_refusal(self.m, t, raced=raced, late=unwaited) or pattern_refusal(
            self.m, pattern, ack)
        if why:
            raise StepError(f"core_dump of {task}: {why}")
        held = {o.comm: self._held(o) for o in t.process.threads if o.state is not STATE_DEAD}
        self.m.enter_kernel(nr)
        dump, out = self._irq_in_lock(nr, irq, lambda: do_coredump(
            self.m, nr, raced=raced, late=unwaited, core_type=pattern, ack=ack))
        if not dump.notes:  # the server took the dump away (COREDUMP_REJECT, _USERSPACE)
            return {"ret": 0, "threads": 0, "slept": dump.dumper_slept,
                    "core_dumped": dump.core_dumped, **out}
        first = dump.notes[0].xstate
        if isinstance(first, int):  # no XSAVE: the regset is absent from the core
            return {"ret": first, "threads": len(dump.notes), **out}
        late_bv: dict[str, Value] = {}
        for note in dump.notes:
            stale = "pkru" if note.task is t and not dump.dumper_slept else ""
            if note.task is dump.unwaited:
                stale = "regs"
                late_bv["late_xstate_bv"] = int.from_bytes(note.xstate[512:520], "little")
            self.emitted.append(("core", (note.task, note.xstate, held[note.task.comm],
                                          stale)))
        return {"ret": 0, "threads": len(dump.notes), "slept": dump.dumper_slept, **late_bv,
                "xstate_bv": int.from_bytes(first[512:520], "little"),
                "mxcsr": int.from_bytes(first[MXCSR_OFFSET:MXCSR_OFFSET + 4], "little"),
                **({"pkru": self.writer(pkru_bytes(int.from_bytes(
                    first[self._pkru_at:self._pkru_at + 4], "little")), PKRU)}
                   if self.pkru_tracked else {}), **out}

    def _held(self, t: Task) -> dict[int, bytes]:
        """What ``t`` holds by the contract: its expected value of every tracked component
        (the fresh value where it has none) and its MXCSR."""
        exp, init = self.expected[t.comm], self.fresh_values
        out = {i: exp.get(i) or init[i] for i in self.tracked}
        out[MXCSR] = exp.get(MXCSR, MXCSR_INIT)
        return out

    @property
    def _pkru_at(self) -> int:
        return self.m.system.profile.component(PKRU).offset

    def do_ptrace_set(self, tracer: str, task: str, component: str) -> dict[str, Value]:
        from fpstate.kernel.x86.regset import ptrace_regset

        tr, t, nr = self._tracer(tracer, task)
        i = component_number(component)
        s = self.m.system
        if not (s.user.max_features >> i) & 1:
            raise StepError(f"ptrace_set of {component}: not a user component of this CPU")
        size = s.user.max_size
        self.m.enter_kernel(nr)
        c = self.m.cpus[nr]
        ret, buf = ptrace_regset(c, t, PTRACE_GETREGSET, NT_X86_XSTATE, size)
        if ret == 0:
            tr.generation += 1
            comp = s.profile.component(i)
            value = token(tr.pid, tr.generation, i, comp.size)
            data = bytearray(buf)
            if i == X87:  # fxregs_state without mxcsr and mxcsr_mask, as gdb writes ST0-7
                data[0:24], data[32:160] = value[:24], value[32:]
            else:
                data[comp.offset:comp.offset + comp.size] = value
            bv = int.from_bytes(data[512:520], "little") | 1 << i
            data[512:520] = bv.to_bytes(8, "little")
            ret, _ = ptrace_regset(c, t, PTRACE_SETREGSET, NT_X86_XSTATE, size, bytes(data))
            if ret == 0:
                exp = self.expected[t.comm]
                exp[i] = value
                self._mxcsr_after_uabi_set(t.comm, bytes(data[MXCSR_OFFSET:MXCSR_OFFSET + 4]), bv)
        self.m.exit_to_user_mode(nr)
        return {"ret": ret, "errno": errno_name(ret)}

    def _mxcsr_after_uabi_set(self, name: str, mxcsr: bytes, bv: int) -> None:
        """Expect for ``name`` (a task, or a guest) the MXCSR it runs with after a successful
        PTRACE_SETREGSET NT_X86_XSTATE or KVM_SET_XSAVE of a buffer that held ``mxcsr`` and
        XSTATE_BV ``bv``, from the kernel's paths (not from the model's answer):
        copy_uabi_to_xstate() stores the buffer's MXCSR when ``bv`` has FP, SSE or YMM; the
        restore is XRSTORS/XRSTOR of the fpstate with RFBM holding SSE -- compacted, it loads
        MXCSR only with SSE in XSTATE_BV and puts 1F80H otherwise; standard, it loads the
        fpstate's MXCSR whatever XSTATE_BV says (the task's own where the buffer's was not
        stored). With the proposed fix ``mxcsr_by_format`` (Chang S. Bae's v3) the buffer's
        MXCSR is stored whatever its header says and, on a compacted kernel, SSE set when it
        is not 1F80H: the task runs with it. The buffer's MXCSR is what PTRACE_GETREGSET or
        KVM_GET_XSAVE2 gave, which without the fix is, on a compacted kernel with YMM but
        not SSE in the header, the fpstate's bytes that no XSAVES wrote since SSE was last in
        use (kernel-findings 6: a stale MXCSR in the view, which regset-view-shows-the-task
        flags)."""
        exp = self.expected[name]
        s = self.m.system
        if mxcsr_by_format(s):
            value = mxcsr
        elif s.xcompacted:
            value = mxcsr if bv & XFEATURE_MASK_SSE else MXCSR_INIT
        elif bv & (XFEATURE_MASK_FPSSE | XFEATURE_MASK_YMM):
            value = mxcsr
        else:
            return
        exp.pop(MXCSR, None)
        if value != MXCSR_INIT:
            exp[MXCSR] = value

    def do_pasid_write(self, task: str, pasid: int = 1, irq: bool = False) -> dict[str, Value]:
        t = self.task(task)
        if not self.m.system.kernel.max_features & XFEATURE_MASK_PASID:
            raise StepError("this CPU has no PASID state (ENQCMD)")
        if t.on_cpu is None or t.kpath is not None:
            raise StepError(f"task {task} is not current on a CPU")
        nr = t.on_cpu
        was_user = t.state is STATE_USER
        if was_user:
            self.m.enter_kernel(nr)
        value = (pasid | MSR_IA32_PASID_VALID).to_bytes(8, "little")
        t.process.pasid = pasid
        where, out = self._irq_in_lock(nr, irq, lambda: core.fpregs_update_current_xstate(
            self.m.cpus[nr], PASID, value), "fpregs_update_current_xstate")
        self.expected[t.comm][PASID] = value
        if was_user:
            self.m.exit_to_user_mode(nr)
        return {"where": where, **out}

    def do_observe(self, task: str) -> dict[str, Value]:
        t = self.task(task)
        where, cpu = self.where(t)
        out: dict[str, Value] = {"where": where, "cpu": -1 if cpu is None else cpu,
                                 "state": t.state.name.lower(),
                                 "xfeatures": t.fpu.fpstate.xfeatures,
                                 "size": t.fpu.fpstate.size, "xfd": t.fpu.fpstate.xfd}
        seen = self.seen(t)
        for i in self.tracked:
            out[BY_NUMBER[i].short] = self.writer(seen[i], i)
        out["mxcsr"] = int.from_bytes(seen[MXCSR], "little")
        return out

    # -- exploration -------------------------------------------------------------------------

    def _task_actions(self, comm: str) -> dict[str, Any]:
        """The actions of a user task that depend only on its name (built once: `Action`s
        are interned values)."""
        k = (comm, self.writable)
        got = _TASK_ACTIONS.get(k)
        if got is None:
            A = Action.of
            if len(_TASK_ACTIONS) > 10_000:
                _TASK_ACTIONS.clear()
            got = _TASK_ACTIONS[k] = {
                "writes": tuple(A("write", task=comm, component=BY_NUMBER[i].short)
                                for i in self.writable),
                "writes_nm": tuple((i, A("write_nm", task=comm, component=BY_NUMBER[i].short))
                                   for i in self.writable if (XFEATURE_MASK_XTILE >> i) & 1),
                "nm_return": A("nm_return", task=comm),
                "nm_return_irq": A("nm_return", task=comm, irq=True),
                "release": A("release", task=comm, components="xtilecfg|xtiledata"),
                "ldmxcsr": A("ldmxcsr", task=comm),
                "req_perm": A("arch_prctl", task=comm, option="req_perm", feature=18),
                "get_perm": A("arch_prctl", task=comm, option="get_perm"),
                "sigaction": A("sigaction", task=comm, onstack=True),
                "sigaction_nosiginfo": A("sigaction", task=comm, onstack=True, siginfo=False),
                "signal": A("signal", task=comm),
                "signal_irq": A("signal", task=comm, irq=True),
                "signal_irq_clear": A("signal", task=comm, irq=True, irq_at="clear"),
                "signal_irq_fsave": A("signal", task=comm, irq=True, irq_at="fsave"),
                "sigaltstack": A("sigaltstack", task=comm, size=16384),
                "pkey_altstack": A("pkey_altstack", task=comm),
                "pkey_open": A("pkey_open", task=comm),
                "sigreturn": A("sigreturn", task=comm),
                "sigreturn_irq": A("sigreturn", task=comm, irq=True),
                "frame_writes": {i: A("frame_write", task=comm, component=BY_NUMBER[i].short)
                                 for i in self.writable},
                "frame_clears": {i: A("frame_clear", task=comm, component=BY_NUMBER[i].short)
                                 for i in self.writable},
                "frame_fx_only": A("frame_fx_only", task=comm),
                "frame_mxcsr": A("frame_mxcsr", task=comm),
                "frame_resize": A("frame_resize", task=comm),
                "pasid_write": A("pasid_write", task=comm),
                "pasid_write_irq": A("pasid_write", task=comm, irq=True),
                "suspend": A("suspend", task=comm),
                "hibernate": A("suspend", task=comm, state="disk"),
                "hibernate_rollback": A("suspend", task=comm, state="disk", ending="rollback"),
                "hibernate_suspend": A("suspend", task=comm, state="disk", ending="suspend"),
                "ptrace_stop": A("ptrace_stop", task=comm),
                "core_dump": A("core_dump", task=comm),
                "core_dump_irq": A("core_dump", task=comm, irq=True),
                "core_dump_raced": A("core_dump", task=comm, raced=True),
                "core_dump_late": A("core_dump", task=comm, late=True),
                "core_dump_pipe": A("core_dump", task=comm, pattern="pipe"),
                "ptrace_cont": A("ptrace_cont", task=comm),
                "exec": A("exec", task=comm),
                "exec_irq": A("exec", task=comm, irq=True),
                "exec_sleep": A("exec", task=comm, sleep=True),
                "exec_finish_sleep": A("exec_finish", task=comm, sleep=True),
                "exec_ia32": A("exec", task=comm, abi="ia32"),
                "exec_x86_64": A("exec", task=comm, abi="x86_64"),
                "exec_finish": A("exec_finish", task=comm)}
        return got

    def enabled(self) -> list[Action]:
        """The actions the explorer may take now; their preconditions mirror the model's."""
        out: list[Action] = []
        add = out.append
        live = self.live()
        ncpu = len(self.m.cpus)
        user = []
        stopped = []
        groups: dict[int, str] = {}  # tgid -> its first live thread, which names it to kill
        in_path = False
        for t in live:
            if t.kpath is not None:
                in_path = True
            if not t.flags & (PF_KTHREAD | PF_USER_WORKER):
                groups.setdefault(t.process.tgid, t.comm)
            st = t.state
            if st is STATE_USER:
                user.append(t)
            elif st is STATE_RUNNABLE:
                out.extend(_scheduling(t.comm, ncpu))
            elif st is STATE_STOPPED:
                stopped.append(t)
        s = self.m.system
        pasid = s.kernel.max_features & XFEATURE_MASK_PASID
        for c in self.m.cpus:
            idle, ret, kfpu, hotplug = _cpu_actions(c.nr)
            cur = c.current
            if cur is c.idle:
                if c.nr:
                    add(hotplug)
            else:
                add(idle)
                if cur.state is STATE_KERNEL:
                    if cur.kpath is None:
                        add(ret)
                        if pasid:
                            add(self._task_actions(cur.comm)["pasid_write"])
                    elif _in_exec(cur) and not de_thread_waits(cur):
                        ta = self._task_actions(cur.comm)
                        add(ta["exec_finish"])
                        if self.exec_at.get(cur.comm) != EXEC_LOAD:
                            add(ta["exec_finish_sleep"])
            add(kfpu)
        c0 = self.m.cpus[0]
        cur0 = c0.current
        if (cur0 is not c0.idle and not in_path and cur0.comm in self.tasks
                and not cur0.flags & (PF_KTHREAD | PF_USER_WORKER)
                and all(c.current is c.idle for c in self.m.cpus[1:])):
            add(self._task_actions(cur0.comm)["suspend"])
            for key in ("hibernate", "hibernate_rollback", "hibernate_suspend"):
                add(self._task_actions(cur0.comm)[key])
        elif self.autosleep and not in_path and all(c.current is c.idle for c in self.m.cpus):
            out.extend(_AUTOSLEEP)
        ntasks = len(live)
        amx = s.xcr0 & XFEATURE_MASK_XTILE
        for t in user:
            ta = self._task_actions(t.comm)
            permitted = t.process.leader.fpu.perm.state_perm & XFEATURE_MASK_XTILE_DATA
            out.extend(ta["writes"])
            xfd = self.m.cpus[t.on_cpu].regs.xfd & XFEATURE_MASK_XTILE  # type: ignore[index]
            if xfd and permitted:
                out.extend(a for i, a in ta["writes_nm"] if (xfd >> i) & 1)
            if amx:
                add(ta["release"])
            add(ta["ldmxcsr"])
            add(ta["req_perm"])
            add(ta["get_perm"])
            if SIGUSR1 not in t.handlers:
                add(ta["sigaction"])
                if t.process.compat:  # a 32-bit program may ask for the non-rt frame
                    add(ta["sigaction_nosiginfo"])
            else:
                add(ta["signal"])
                add(ta["signal_irq"])
                add(ta["signal_irq_clear"])
                if t.process.compat:  # only an ia32 frame has an fsave header
                    add(ta["signal_irq_fsave"])
            if t.sas_ss_size == 0:
                add(ta["sigaltstack"])
            elif self.pkru_tracked and t.sas_ss_sp not in t.process.mm.pkeys:
                add(ta["pkey_altstack"])
            if self.pkru_tracked and t.process.mm.pkeys:
                add(ta["pkey_open"])
            if self.sigstack[t.comm]:
                add(ta["sigreturn"])
                add(ta["sigreturn_irq"])
                lo, hi, kind = self.frames[t.comm][-1]
                if self._frame_open(t, lo):
                    fp = _frame_xsave(t.process.mm, lo, kind)
                    sw = self._frame_sw(t, fp)
                    writable = self._frame_writable(t, sw, fp, hi)
                    out.extend(ta["frame_writes"][i] for i in writable)
                    out.extend(ta["frame_clears"][i] for i in writable)
                    add(ta["frame_fx_only"])
                    add(ta["frame_mxcsr"])
                    if self._resizable(t, sw):
                        add(ta["frame_resize"])
            if pasid:
                add(ta["pasid_write"])
                add(ta["pasid_write_irq"])
            add(ta["ptrace_stop"])
            if len(groups) > 1:
                add(ta["core_dump"])
                add(ta["core_dump_irq"])
                add(ta["core_dump_pipe"])
                if ncpu > 1 and all(o.kpath is None for o in t.process.threads) and \
                        zapped_threads(t):
                    add(ta["core_dump_raced"])
                if ncpu > 1 and zap_refusal(self.m, t, late=True) is None:
                    add(ta["core_dump_late"])
                if ncpu > 1:  # an earlier arrival held on its CPU (kernel-findings 9j)
                    out.extend(_late_dumps(self.m, t))
            if ntasks < self.max_tasks:
                out.extend(_spawn(t.comm, self.m.next_pid))
            add(ta["exec"])
            add(ta["exec_irq"])
            add(ta["exec_sleep"])
            add(ta["exec_x86_64"] if t.process.compat else ta["exec_ia32"])
            for tgid, victim in groups.items():
                if tgid != t.process.tgid:
                    add(_kill(t.comm, victim))
            for st in stopped:
                out.extend(self._ptrace_actions(t.comm, st.comm))
        for st in stopped:
            add(self._task_actions(st.comm)["ptrace_cont"])
        for comm in sorted(self.nm_pending):  # insertion order is not in the key
            t = self.tasks[comm]
            if (t.kpath is not None and t.on_cpu is not None
                    and self.m.cpus[t.on_cpu].current is t):
                nta = self._task_actions(comm)
                add(nta["nm_return"])
                add(nta["nm_return_irq"])
        return out

    def _ptrace_actions(self, tracer: str, task: str) -> tuple[Action, ...]:
        k = (tracer, task, self.writable)
        got = _PTRACE_ACTIONS.get(k)
        if got is None:
            A = Action.of
            if len(_PTRACE_ACTIONS) > 10_000:
                _PTRACE_ACTIONS.clear()
            # x87 and SSE (a debugger's `set $st0`, `set $xmm0`: gdb writes the whole
            # NT_X86_XSTATE buffer back), two other XSAVE components, and PKRU (`set $pkru`)
            # where it is tracked.
            comps = self.writable[:4] + ((PKRU,) if self.pkru_tracked else ())
            got = _PTRACE_ACTIONS[k] = (A("ptrace_get", tracer=tracer, task=task), *(
                A("ptrace_set", tracer=tracer, task=task, component=BY_NUMBER[i].short)
                for i in comps))
        return got


def _frame_xsave(mm: UserMemory, frame: int, kind: str) -> int:
    """The address of the XSAVE area of the signal frame at ``frame`` (its kind: statekey's
    FRAME_*): a 64-bit frame's uc_mcontext.fpstate; an ia32 frame's sigcontext_32.fpstate
    points at the fsave header, which the XSAVE area follows (fpu__restore_sig's buf_fx)."""
    sc = FRAME_SC.get(kind)
    if sc is None:
        return int.from_bytes(mm.read(frame + SC_FPSTATE_OFFSET, 8), "little")
    return int.from_bytes(mm.read(frame + sc + SC32_FPSTATE, 4), "little") + FREGS_STATE_SIZE


#: Where an unfinished exec sleeps (X86World.exec_at): in de_thread() for the other threads
#: to exit, in begin_new_exec() before flush_thread(), in load_elf_binary() after it.
EXEC_DE_THREAD, EXEC_BEGIN, EXEC_LOAD = "de_thread", "begin_new_exec", "load_elf_binary"


def _in_exec(t: Task) -> bool:
    """Whether ``t`` is inside execve() (asleep where `do_exec` or `do_exec_finish` left
    it)."""
    kp = t.kpath
    return kp is not None and kp.gi_code is _EXECVE_CODE


_EXECVE_CODE = sys_execve.__code__


def _kill(comm: str, victim: str) -> Action:
    """kill by ``comm`` of the process of ``victim``, interned by its two names (cheaper than
    Action.of's keyword key: 445.1 against 446.5 thousand instructions per transition)."""
    k = (comm, victim)
    got = _KILL_ACTIONS.get(k)
    if got is None:
        if len(_KILL_ACTIONS) > 10_000:
            _KILL_ACTIONS.clear()
        got = _KILL_ACTIONS[k] = Action.of("kill", task=comm, target=victim)
    return got


_KILL_ACTIONS: dict[tuple[str, str], Action] = {}


def _scheduling(comm: str, ncpu: int) -> tuple[Action, ...]:
    """run and switch_in of a runnable task on every CPU."""
    k = (comm, ncpu)
    got = _SCHED_ACTIONS.get(k)
    if got is None:
        if len(_SCHED_ACTIONS) > 10_000:
            _SCHED_ACTIONS.clear()
        got = _SCHED_ACTIONS[k] = tuple(
            a for nr in range(ncpu)
            for a in (Action.of("run", task=comm, cpu=nr), Action.of("switch_in", task=comm,
                                                                       cpu=nr)))
    return got


def _cpu_actions(nr: int) -> tuple[Action, Action, Action, Action]:
    """idle, return_to_user, kernel_fpu and hotplug of CPU ``nr``."""
    got = _CPU_ACTIONS.get(nr)
    if got is None:
        got = _CPU_ACTIONS[nr] = (Action.of("idle", cpu=nr),
                                  Action.of("return_to_user", cpu=nr),
                                  Action.of("kernel_fpu", cpu=nr),
                                  Action.of("hotplug", cpu=nr))
    return got


def _late_dumps(m: Machine, t: Task) -> list[Action]:
    """``core_dump`` of ``t`` with ``late_thread`` naming each thread that arrives before the
    last one and can be held on its CPU (zap_refusal)."""
    zapped = zapped_threads(t)
    return [Action.of("core_dump", task=t.comm, late_thread=o.comm) for o in zapped[:-1]
            if o.on_cpu is not None and zap_refusal(m, t, late=o) is None]


def _spawn(comm: str, pid: int) -> tuple[Action, ...]:
    """fork and clone by ``comm`` when the next pid is ``pid`` (it names the child), each also
    with a hard interrupt inside fpu_clone()'s section."""
    k = (comm, pid)
    got = _SPAWN_ACTIONS.get(k)
    if got is None:
        if len(_SPAWN_ACTIONS) > 10_000:
            _SPAWN_ACTIONS.clear()
        got = _SPAWN_ACTIONS[k] = (
            Action.of("fork", task=comm, child=f"f{pid}.t0"),
            Action.of("clone", task=comm, child=f"{comm.split('.')[0]}.c{pid}"),
            Action.of("fork", task=comm, child=f"f{pid}.t0", irq=True),
            Action.of("clone", task=comm, child=f"{comm.split('.')[0]}.c{pid}", irq=True))
    return got


#: Interned action tuples of `X86World.enabled`.
_SCHED_ACTIONS: dict[tuple[str, int], tuple[Action, ...]] = {}
_CPU_ACTIONS: dict[int, tuple[Action, Action, Action, Action]] = {}
_SPAWN_ACTIONS: dict[tuple[str, int], tuple[Action, ...]] = {}
_PTRACE_ACTIONS: dict[tuple[str, str, tuple[int, ...]], tuple[Action, ...]] = {}


#: Types whose instances a world snapshot shares instead of copying (`_is_frozen`).
_FROZEN: set[type] = set()
_NOT_FROZEN: set[type] = set()


def _is_frozen(cls: type) -> bool:
    """Whether ``cls`` is a frozen dataclass (its instances are immutable), memoised."""
    if cls in _FROZEN:
        return True
    if cls in _NOT_FROZEN:
        return False
    params = getattr(cls, "__dataclass_params__", None)
    frozen = params is not None and params.frozen
    (_FROZEN if frozen else _NOT_FROZEN).add(cls)
    return frozen


#: (task name, writable components) -> X86World._task_actions.
_TASK_ACTIONS: dict[tuple[str, tuple[int, ...]], dict[str, Any]] = {}

__all__ = ["X86_SPECS", "X86World", "component_number"]
