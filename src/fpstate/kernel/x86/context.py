"""FPU context tracking: who owns each CPU's registers, and when a task's copy is valid.

Models arch/x86/kernel/fpu/context.h and arch/x86/include/asm/fpu/sched.h (Linux v6.17). The
invariant everything relies on, in the kernel's words reduced to the model's variables:

    A task's registers on CPU ``cpu`` are valid iff ``owner_ctx[cpu] is fpu`` and
    ``fpu.last_cpu == cpu`` (`fpregs_state_valid`). A task with TIF_NEED_FPU_LOAD clear is
    running and its registers are the one source of truth; with the flag set, its fpstate in
    memory is the truth and the registers are at most a cache, which anyone who changes the
    memory image or the registers for another purpose must invalidate.

The per-task lifecycle those variables encode is `FpregsState`; `TRANSITIONS` lists which event
takes which state where (the kernel's own comments are the reference for each row), and
`fpregs_state` classifies a task. Tests drive every primitive and check that what it did is a row
of the table.

Context rules are checked with `requires`: the model functions take the per-CPU context (``c``,
the kernel's ``this_cpu``/``current``) first, and name the conditions the kernel documents
(fpregs_lock() held, IRQs disabled, task context, a user task). A violated precondition raises
`IllegalEvent` before anything changes.
"""

from __future__ import annotations

import enum
import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from fpstate.kernel.x86.types import (
    PF_KTHREAD,
    PF_USER_WORKER,
    XFEATURE_MASK_FPSTATE,
    Fpu,
    IllegalEvent,
)

if TYPE_CHECKING:
    from fpstate.kernel.x86.sched import Cpu, Task

F = TypeVar("F", bound=Callable[..., Any])

# -- preconditions ------------------------------------------------------------------------------

CONDITIONS: dict[str, tuple[Callable[[Cpu], bool], str]] = {
    "fpregs_locked": (lambda c: c.bh_disabled > 0 or c.irqs_disabled,
                      "fpregs_lock() held (or IRQs disabled)"),
    "irqs_disabled": (lambda c: c.irqs_disabled, "interrupts disabled"),
    "irqs_enabled": (lambda c: not c.irqs_disabled, "interrupts enabled"),
    "task_context": (lambda c: not (c.hardirq or c.softirq or c.nmi),
                     "task context (not in an interrupt)"),
    "preemptible": (lambda c: not (c.irqs_disabled or c.bh_disabled or c.preempt_count
                                   or c.hardirq or c.softirq or c.nmi),
                    "preemptible (may sleep)"),
    "user_task": (lambda c: not c.current.flags & (PF_KTHREAD | PF_USER_WORKER),
                  "current is a user task (not PF_KTHREAD/PF_USER_WORKER)"),
    "siglock": (lambda c: c.current.process.siglock_holder is c,
                "current->sighand->siglock held"),
    "pagefault_enabled": (lambda c: not c.pagefault_disabled, "page faults enabled"),
}


def requires(*names: str) -> Callable[[F], F]:
    """Decorate a model function whose first argument is the CPU context: each named condition
    (`CONDITIONS`) must hold on entry, else `IllegalEvent` (nothing has changed yet)."""
    for n in names:
        assert n in CONDITIONS, f"unknown precondition {n}"

    conds = tuple(CONDITIONS[n] for n in names)

    def wrap(fn: F) -> F:
        checked = _checked_with_signature(fn, conds)
        if checked is None:
            def checked(c: Cpu, *args: Any, **kwargs: Any) -> Any:
                for pred, text in conds:
                    if not pred(c):
                        raise IllegalEvent(f"{fn.__name__}() on CPU {c.nr} requires {text}")
                return fn(c, *args, **kwargs)

        functools.update_wrapper(checked, fn)
        checked.requires = names  # type: ignore[attr-defined]
        return checked  # type: ignore[return-value]

    return wrap


def _checked_with_signature(fn: Callable[..., Any],
                            conds: tuple[tuple[Callable[[Cpu], bool], str], ...]
                            ) -> Callable[..., Any] | None:
    """The `requires` wrapper of ``fn`` with ``fn``'s own parameters (names and defaults)
    instead of ``*args, **kwargs``, the conditions checked one by one in order: the model calls
    these functions at every step, and packing the arguments cost more than the checks. None
    when ``fn`` takes anything but plain parameters (the generic wrapper is used then)."""
    params = list(inspect.signature(fn).parameters.values())
    if not params or any(p.kind is not p.POSITIONAL_OR_KEYWORD for p in params):
        return None
    ns: dict[str, Any] = {"_fn": fn, "_IllegalEvent": IllegalEvent, "_name": fn.__name__}
    sig, names = [], []
    for k, p in enumerate(params):
        names.append(p.name)
        if p.default is p.empty:
            sig.append(p.name)
        else:
            ns[f"_d{k}"] = p.default
            sig.append(f"{p.name}=_d{k}")
    if set(names) & set(ns) or any(n.startswith(("_p", "_t")) for n in names):
        return None
    c = names[0]
    body = [f"def checked({', '.join(sig)}):"]
    for k, (pred, text) in enumerate(conds):
        ns[f"_p{k}"], ns[f"_t{k}"] = pred, text
        body.append(f"    if not _p{k}({c}):")
        body.append(f"        raise _IllegalEvent(f'{{_name}}() on CPU {{{c}.nr}} requires "
                    f"{{_t{k}}}')")
    body.append(f"    return _fn({', '.join(names)})")
    exec(compile("\n".join(body), f"<requires {fn.__qualname__}>", "exec"), ns)
    return ns["checked"]  # type: ignore[no-any-return]


# -- context.h ----------------------------------------------------------------------------------


def __cpu_invalidate_fpregs_state(c: Cpu) -> None:
    """__cpu_invalidate_fpregs_state(): this CPU's registers belong to no one
    (fpu_fpregs_owner_ctx = NULL)."""
    c.fpu_fpregs_owner_ctx = None


def __fpu_invalidate_fpregs_state(fpu: Fpu) -> None:
    """__fpu_invalidate_fpregs_state(): no CPU holds a copy newer than this fpu's memory
    (last_cpu = -1)."""
    fpu.last_cpu = -1


def fpregs_state_valid(c: Cpu, fpu: Fpu) -> bool:
    """fpregs_state_valid(fpu, cpu): the registers of this CPU hold ``fpu``'s state."""
    return c.fpu_fpregs_owner_ctx is fpu and fpu.last_cpu == c.nr


def fpregs_activate(c: Cpu, fpu: Fpu) -> None:
    """fpregs_activate(): this CPU's registers now hold ``fpu``'s state."""
    c.fpu_fpregs_owner_ctx = fpu


def fpregs_deactivate(c: Cpu, fpu: Fpu) -> None:
    """fpregs_deactivate(): this CPU's registers no longer hold ``fpu``'s state."""
    c.fpu_fpregs_owner_ctx = None


@requires("fpregs_locked")
def fpregs_restore_userregs(c: Cpu) -> None:
    """fpregs_restore_userregs() (context.h): make current's registers valid on this CPU.

    Skips the XRSTOR when `fpregs_state_valid` (the switch-out save preserved the registers
    and no one used them since); else restores fpstate with RFBM = XFEATURE_MASK_FPSTATE (PKRU
    excluded: switched eagerly) and activates. Always clears TIF_NEED_FPU_LOAD. A kernel
    thread or user worker here is a kernel WARN (the model raises IllegalEvent).
    """
    task = c.current
    if task.flags & (PF_KTHREAD | PF_USER_WORKER):
        raise IllegalEvent(f"fpregs_restore_userregs() for kernel thread {task.comm}")
    fpu = task.fpu
    if not fpregs_state_valid(c, fpu):
        core.restore_fpregs_from_fpstate(c, fpu.fpstate, XFEATURE_MASK_FPSTATE)
        fpregs_activate(c, fpu)
        fpu.last_cpu = c.nr
    task.need_fpu_load = False


# -- asm/fpu/sched.h ----------------------------------------------------------------------------


@requires("irqs_disabled")
def switch_fpu(c: Cpu, old: Task) -> None:
    """switch_fpu(old, cpu) (asm/fpu/sched.h, v6.8+): called by __switch_to() for the outgoing
    task, in its context, IRQs off.

    A user task whose registers are live gets TIF_NEED_FPU_LOAD and a save; the save preserves
    the registers, so ``owner_ctx`` still names it and ``last_cpu = cpu`` lets a return to the
    same CPU skip the restore. Tasks that already have the flag (state saved) and kernel
    threads cost nothing.
    """
    if not old.need_fpu_load and not old.flags & (PF_KTHREAD | PF_USER_WORKER):
        old.need_fpu_load = True
        core.save_fpregs_to_fpstate(c, old.fpu)
        old.fpu.last_cpu = c.nr


def switch_fpu_prepare(c: Cpu, old: Task) -> None:
    """switch_fpu_prepare() (v5.2..v6.7): the first half of what v6.8 folded into
    `switch_fpu` (save the outgoing task's registers and remember the CPU)."""
    switch_fpu(c, old)


def switch_fpu_finish(c: Cpu, new: Task) -> None:
    """switch_fpu_finish() (v5.16..v6.7): set TIF_NEED_FPU_LOAD on the incoming user task.

    Since v6.8 the flag is already set (by `switch_fpu` when the task was switched out, or by
    fpu_clone for a new task), so the modern switch path does not call this; it is kept for
    the older ordering and is idempotent.
    """
    if not new.flags & (PF_KTHREAD | PF_USER_WORKER):
        new.need_fpu_load = True


# -- the lifecycle ------------------------------------------------------------------------------


class FpregsState(enum.Enum):
    """Where a user task's FPU state lives."""

    #: TIF_NEED_FPU_LOAD clear: the task is running and its registers are the sole truth.
    REGS = "regs"
    #: TIF_NEED_FPU_LOAD set, memory is the truth, and a CPU's registers still hold an equal
    #: copy (fpregs_state_valid on last_cpu): the next restore there is skipped.
    CACHED = "cached"
    #: TIF_NEED_FPU_LOAD set and no CPU holds a valid copy: the next restore reads memory.
    MEMORY = "memory"
    #: TIF_NEED_FPU_LOAD clear but the registers are not valid: the state
    #: fpregs_assert_state_consistent() warns about. Never legal.
    INCONSISTENT = "inconsistent"


def fpregs_state(task: Task, cpus: list[Cpu]) -> FpregsState:
    """Classify ``task`` (a user task) by the kernel's variables."""
    fpu = task.fpu
    valid = 0 <= fpu.last_cpu < len(cpus) and cpus[fpu.last_cpu].fpu_fpregs_owner_ctx is fpu
    if not task.need_fpu_load:
        running_there = task.on_cpu == fpu.last_cpu
        return _R if valid and running_there else _INCONSISTENT
    return _C if valid else _M


#: The states as module globals (an Enum class attribute goes through a __getattr__ hook).
_R, _C, _M = FpregsState.REGS, FpregsState.CACHED, FpregsState.MEMORY
_INCONSISTENT = FpregsState.INCONSISTENT

#: (state, event) -> state. An event absent for a state is illegal in it.
TRANSITIONS: dict[tuple[FpregsState, str], FpregsState] = {
    # switch_fpu(): "The save operation preserved register state, so the fpu_fpregs_owner_ctx
    # is still @old_fpu" -> cached.
    (_R, "switch_out"): _C,
    (_C, "switch_out"): _C,
    (_M, "switch_out"): _M,
    # kernel_fpu_begin(): save current if live, then __cpu_invalidate_fpregs_state().
    (_R, "kernel_fpu_begin"): _M,
    (_C, "kernel_fpu_begin"): _M,
    (_M, "kernel_fpu_begin"): _M,
    # Another context loading its registers on the CPU that caches ours (restore of another
    # task, KVM guest entry): owner_ctx moves on.
    (_C, "cpu_taken"): _M,
    (_M, "cpu_taken"): _M,
    # fpregs_restore_userregs(): skip if valid, else XRSTOR; TIF cleared.
    (_C, "restore"): _R,
    (_M, "restore"): _R,
    (_R, "restore"): _R,
    # Memory image changed by someone else (ptrace on a stopped task, exec reset): only after
    # __fpu_invalidate_fpregs_state(), i.e. from MEMORY.
    (_M, "modify_memory"): _M,
    # The memory image replaced, with invalidation, for current (fpu_reset_fpstate_regs).
    (_R, "reset_memory"): _M,
    (_C, "reset_memory"): _M,
    (_M, "reset_memory"): _M,
    # fpu_sync_fpstate(): save, registers preserved, flag untouched.
    (_R, "sync"): _R,
    (_C, "sync"): _C,
    (_M, "sync"): _M,
    # fpregs_mark_activate() after loading registers directly (sigreturn, clear_user_states).
    (_R, "mark_activate"): _R,
    (_C, "mark_activate"): _R,
    (_M, "mark_activate"): _R,
    # A register write for current: only when the registers are the sole truth.
    (_R, "modify_regs"): _R,
}


def check_transition(before: FpregsState, event: str, after: FpregsState) -> None:
    """Raise IllegalEvent if ``event`` is not allowed in ``before`` or did not lead where the
    table says."""
    want = TRANSITIONS.get((before, event))
    if want is None:
        raise IllegalEvent(f"event {event!r} is illegal in state {before.value}")
    if want is not after:
        raise IllegalEvent(f"event {event!r} from {before.value} gave {after.value}, "
                           f"the kernel's rules say {want.value}")


# core.py builds on this module (it imports it first); the two functions above that call back
# into core.c find it here, bound once instead of imported at every call.
from fpstate.kernel.x86 import core  # noqa: E402
