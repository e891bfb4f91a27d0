"""fs/coredump.c and fs/binfmt_elf.c as far as the FPU notes of a core depend on them: which
threads are dumped, in which order, and which of them are switched out -- their registers
saved, their PKRU stashed in thread.pkru -- before xstateregs_get() reads them.

vfs_coredump() (do_coredump() in older kernels) runs in the dumping thread, in the kernel,
from get_signal() of its fatal signal. coredump_wait() -> zap_threads() -> zap_process()
queues SIGKILL to every other thread of the group that is not PF_POSTCOREDUMP and wakes it;
each of them takes the signal, reaches do_exit() -> coredump_task_exit(), pushes itself onto
core_state->dumper.next (PF_SIGNALED), counts down core_state->nr_threads -- the last one
completes core_state->startup -- and sleeps (TASK_IDLE) until coredump_finish() wakes it.
The dumper sleeps in wait_for_completion_state(&core_state->startup) unless the count
already reached zero, then wait_task_inactive() on each thread of the list, "so that all the
thread context (extended register state, like fpu etc) gets copied to the memory".
elf_core_dump() -> fill_note_info() writes the dumper's notes first, then those of each
thread of the list (newest arrival first); fill_thread_core_info() takes NT_X86_XSTATE
through xstateregs_get(). coredump_finish() wakes the threads, and every thread do_exit()s.

What that means for a core's FPU state, in this model's terms (core_pattern a file):
- A thread running in user mode on another CPU enters the kernel and is switched out there
  (switch_fpu() saves its registers, x86_pkru_load() stashes its PKRU in thread.pkru).
- A switched-out or ptrace-stopped thread is woken and switched out again without touching
  its FPU state: TIF_NEED_FPU_LOAD stays set, and its PKRU register round-trips through
  thread.pkru. The model leaves it switched out.
- The dumper, when it sleeps, is switched out and in once (the CPU runs the zapped threads
  or idles meanwhile; neither touches the dumper's FPU state), so its registers are saved
  and its thread.pkru is the PKRU it runs with. When every thread arrived before it waited
  (``raced``), nothing switches it out: copy_xstate_to_uabi_buf() shows the thread.pkru of
  its last switch (docs/findings/kernel-findings.md 9i), as for any single-threaded dumper,
  which has no thread to wait for.
- The last thread to arrive calls complete() before it sets TASK_IDLE; if the dumper's
  wait_task_inactive(TASK_ANY) finds it still on its CPU in TASK_RUNNING, the call returns 0
  and the dumper does not wait (Linux 6.1+): that thread's note is its fpstate as its last
  switch left it (``late``, docs/findings/kernel-findings.md 9j). An earlier thread has the
  same window, between its atomic_dec_and_test() and its set_current_state(): held there on
  its CPU (an interrupt, a preempted vCPU) while the later threads arrive and the dumper
  wakes, it is missed the same way (``late`` naming that thread).

Variant ``coredump-no-wait-inactive`` takes the notes without waiting for the threads to be
switched out (coredump_wait()'s wait_task_inactive() loop, and the reason its comment gives):
a thread running in user mode on another CPU has its note taken from its fpstate.

The core_pattern decides whether the dumper sleeps once more after coredump_wait(), before
coredump_write() collects the notes (elf_core_dump() -> fill_note_info() reads every thread's
regsets into memory before it writes a byte, so a write that blocks later changes nothing):
- a file (``core``, ``/var/crash/core.%p``; COREDUMP_FILE): coredump_file() opens and
  truncates it -- no wait in the model (a directory lookup that must read the disk would
  sleep; the model takes the cached path);
- a pipe to a helper (``|/usr/lib/systemd/systemd-coredump``, apport; COREDUMP_PIPE):
  coredump_pipe() waits for the helper's exec (call_usermodehelper_exec(..., UMH_WAIT_EXEC)),
  so such cores show every thread's own PKRU;
- a socket (``@/path``, Linux 6.16+; COREDUMP_SOCK): coredump_sock_connect() connects with
  O_NONBLOCK (a full backlog fails the dump with -EAGAIN rather than waiting), so the dumper
  does not sleep, as for a file;
- a socket with the request protocol (``@@/path``, Linux 6.17+; COREDUMP_SOCK_REQ):
  coredump_sock_request() sends struct coredump_req and waits in a blocking receive
  (MSG_PEEK | MSG_WAITALL) for the server's struct coredump_ack, so the dumper sleeps, as for
  a pipe. What the server answers (`CORE_ACKS`) decides the rest in vfs_coredump():
  COREDUMP_KERNEL, the kernel writes the core; COREDUMP_REJECT, no core and no notes (and no
  WCOREDUMP for the parent); COREDUMP_USERSPACE, no core from the kernel but WCOREDUMP
  (core_dumped); with COREDUMP_WAIT the dumper, its core written, sleeps once more in
  coredump_sock_wait() until the server shuts the connection down -- after its notes.

A thread inside a kernel path (KVM_RUN, the #NM handler's allocation, a clone) leaves it as
SIGKILL makes it, before coredump_task_exit(): a vCPU thread's note shows the VMM thread's
own (user) FPU state, the guest's having been put back into the guest fpstate, which no
core holds.

Not modelled: an exec in flight (once de_thread() has set signal->group_exec_task,
zap_threads() returns -EAGAIN and no core is written; in the model an exec has killed every
thread outside a kernel path by then, a would-be dumper included); a coredump server fast
enough to answer a ``@@`` request before the dumper's receive starts (the model takes the
wait).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fpstate.kernel.x86.regset import xstateregs_get
from fpstate.kernel.x86.sched import (
    SIGKILL,
    STATE_DEAD,
    STATE_KERNEL,
    IllegalEvent,
    Machine,
    Signal,
    Task,
)
from fpstate.kernel.x86.versions import KernelVersion, change, running


@dataclass(frozen=True, slots=True)
class ThreadNote:
    """One thread's NT_X86_XSTATE in a core: the bytes xstateregs_get() gave (an errno, as a
    negative int, where the regset is absent: no XSAVE)."""

    task: Task
    xstate: bytes | int


@dataclass(frozen=True, slots=True)
class Coredump:
    """What do_coredump() left: the NT_X86_XSTATE notes in file order (the dumper's first),
    and how often the dumper slept before its notes (in coredump_wait(), and in its
    core_pattern's path): each sleep is a context switch, which stashes its PKRU."""

    notes: tuple[ThreadNote, ...]
    sleeps: int
    unwaited: Task | None = None  #: the ``late`` thread, whose note is its stale fpstate
    core_dumped: bool = True  #: cn.core_dumped: WCOREDUMP in the parent's wait status
    #: sleeps after the notes: COREDUMP_WAIT's coredump_sock_wait(), one in the model (the
    #: real read is woken again while the server reads: kernel-findings 9i, 5 to 6 more)
    sleeps_after: int = 0

    @property
    def dumper_slept(self) -> bool:
        return self.sleeps > 0

    @property
    def voluntary_switches(self) -> int:
        """The dumping thread's voluntary context switches (task_struct.nvcsw, as
        /proc/PID/status shows them) from its fatal signal to its end: __schedule() counts a
        switch as voluntary when the task leaves the CPU in a sleeping state -- each sleep
        here and after the notes -- and do_task_dead()'s last switch (prev_state TASK_DEAD)
        as one more. That takes nothing else after the notes to sleep (a core the page cache
        or the socket's buffer takes in, no pipe_limit wait) and wait_task_inactive() to find
        every zapped thread already off its CPU (else it sleeps a tick and polls again)."""
        return self.sleeps + self.sleeps_after + 1


def zapped_threads(dumper: Task, arrival: Sequence[Task] | None = None) -> list[Task]:
    """The threads zap_threads() kills, in the order they reach coredump_task_exit() (the
    last one calls complete()): ``arrival`` where given -- it must name each of them once --
    else the group's thread order."""
    others = [t for t in dumper.process.threads if t is not dumper and t.state is not STATE_DEAD]
    if arrival is None:
        return others
    if len(arrival) != len(others) or any(not any(a is t for a in arrival) for t in others):
        raise IllegalEvent(f"arrival order {[t.comm for t in arrival]}: not each of "
                           f"{[t.comm for t in others]} once")
    return list(arrival)


def zap_refusal(m: Machine, dumper: Task, *, raced: bool = False,
                late: bool | Task = False, arrival: Sequence[Task] | None = None) -> str | None:
    """Why the model cannot dump ``dumper``'s group now (None when it can): ``raced`` is
    asked where no thread, no other CPU or a thread inside a kernel path keeps the threads
    from arriving before the dumper waits; ``late`` (True: the last thread to arrive; a
    Task: that thread) where it is not a zapped thread running on another CPU with its
    registers live (then its fpstate is current anyway), and, ``raced``, where the dumper
    and that thread hold the only two CPUs while other threads must arrive (a switched-out
    thread woken on the held thread's CPU would switch it out, saving its registers).
    ``arrival`` as for coredump_wait()."""
    try:
        others = zapped_threads(dumper, arrival)
    except IllegalEvent as e:
        return str(e)
    if late is not False:
        if not _kernel(m).has("coredump_wait_task_any"):
            return (f"Linux {m.system.kernel_version}: wait_task_inactive(..., 0) waits for "
                    "every thread to leave its CPU (TASK_ANY came in 6.1)")
        if late is True:
            held = others[-1] if others else None
            if held is None or held.on_cpu is None:
                return (f"{dumper!r}'s last thread to arrive is not running on another CPU: "
                        "its registers are saved before the dumper runs again")
        else:
            held = late
            if held not in others:
                return f"{held!r} is not a thread {dumper!r}'s dump zaps"
            if held.on_cpu is None:
                return (f"{held!r} is not running on another CPU: its registers are saved "
                        "before the dumper runs again")
        if held.need_fpu_load:
            return (f"{held!r} runs without its registers loaded (TIF_NEED_FPU_LOAD): "
                    "its fpstate is current")
        if raced and len(others) > 1 and len(m.cpus) < 3:
            return (f"the dumper and {held!r} hold both CPUs and the dumper does not sleep: "
                    "the other threads have no CPU to arrive on")
    if raced and not others:
        return f"{dumper!r} has no thread to wait for: nothing to race with"
    if raced and len(m.cpus) < 2:
        return "one CPU: the zapped threads run only once the dumper sleeps"
    if raced and any(t.kpath is not None for t in others):
        return ("a thread inside a kernel path: the model runs it out of its path on the "
                "dumper's CPU while the dumper sleeps")
    return None


def coredump_wait(m: Machine, nr: int, *, raced: bool = False, late: bool | Task = False,
                  arrival: Sequence[Task] | None = None
                  ) -> tuple[list[Task], bool, Task | None]:
    """coredump_wait() for the current task of CPU ``nr`` (in the kernel, no kernel path
    unfinished): zap_threads() and every zapped thread's way to coredump_task_exit(), then
    the dumper's wait. Returns core_state->dumper.next as a list (newest arrival first; the
    threads arrive in the order ``arrival`` gives, by default the group's thread order),
    whether the dumper slept, and the thread it did not wait for (``late``), if any.
    ``raced``: every thread reached coredump_task_exit() before the dumper called
    wait_for_completion_state(), so it did not sleep -- possible only with another CPU for
    them to run on, and only with threads to wait for.

    A thread inside a kernel path leaves it first, as SIGKILL makes it (`Machine.
    kill_in_path`: KVM_RUN returns -EINTR with the guest FPU put back, a killable sleep ends):
    where it runs, on its CPU; switched out, on the dumper's CPU while the dumper sleeps.

    ``late``: the last thread to arrive was still on its CPU in TASK_RUNNING when the dumper
    called wait_task_inactive(TASK_ANY) for it -- coredump_task_exit() calls complete()
    before set_current_state(TASK_IDLE) -- and that returns 0 at once for a running task in
    TASK_RUNNING, so the dumper does not wait (Linux 6.1+: "sched: Add TASK_ANY for
    wait_task_inactive()" replaced the call's match_state 0, which waited for any state,
    docs/findings/kernel-findings.md 9j). That thread is left running: its note is its
    fpstate as its last switch left it, not the registers it holds. ``late`` a Task: that
    thread, the last to arrive or an earlier one -- coredump_task_exit() decrements
    core_state->nr_threads before set_current_state(TASK_IDLE) too, so an earlier thread
    held between the two on its CPU (an interrupt, a preempted vCPU) while the later ones
    arrive is equally in TASK_RUNNING when the dumper looks."""
    c = m.cpus[nr]
    dumper = c.current
    if dumper.state is not STATE_KERNEL or dumper.kpath is not None:
        raise IllegalEvent(f"coredump_wait on CPU {nr}: {dumper!r} is not in the kernel "
                           "outside a kernel path")
    why = zap_refusal(m, dumper, raced=raced, late=late, arrival=arrival)
    if why:
        raise IllegalEvent(why)
    others = zapped_threads(dumper, arrival)
    unwaited = unwaited_thread(dumper, late, arrival)
    wait_inactive = not m.system.has_variant("coredump-no-wait-inactive")
    for t in others:
        t.killed_by = Signal(SIGKILL)  # zap_process(): SIGKILL queued, the thread woken
        if t.on_cpu is not None:  # running: the signal's IPI kicks it into the kernel
            if t.kpath is not None:
                m.kill_in_path(t.on_cpu)
            switched = wait_inactive and t is not unwaited
            if switched and t.on_cpu is not None:
                m.idle(t.on_cpu)
        # switched out or ptrace-stopped outside a path: woken, it passes through a CPU
        # without an FPU save or restore and sleeps again
    slept = bool(others) and not raced
    if slept:  # wait_for_completion_state(): schedule() away and, completed, back
        m.idle(nr)
        for t in others:
            if t.kpath is not None:  # switched out inside a path: it runs out of it here
                m.preempt(nr, t)
                m.kill_in_path(nr)
                m.idle(nr)
        m.preempt(nr, dumper)
    # xchg(&core_state->dumper.next, &self): a stack
    return list(reversed(others)), slept, unwaited


def unwaited_thread(dumper: Task, late: bool | Task,
                    arrival: Sequence[Task] | None = None) -> Task | None:
    """The thread ``late`` names (True: the last of ``dumper``'s zapped threads to arrive)."""
    if late is True:
        others = zapped_threads(dumper, arrival)
        return others[-1] if others else None
    return late or None


#: core_pattern kinds (coredump_parse()'s enum coredump_type_t) and whether the dumper
#: sleeps in its path before the notes are collected.
CORE_TYPES: dict[str, bool] = {
    "file": False,            # COREDUMP_FILE: coredump_file()
    "pipe": True,             # COREDUMP_PIPE: coredump_pipe(), UMH_WAIT_EXEC
    "socket": False,          # COREDUMP_SOCK: coredump_sock_connect(), O_NONBLOCK
    "socket-request": True,   # COREDUMP_SOCK_REQ: coredump_sock_request(), the ack's receive
}
#: The coredump_ack masks (include/uapi/linux/coredump.h) the model's ``@@`` server may
#: answer: name -> (COREDUMP_KERNEL: the kernel writes the core and its notes; the parent
#: sees WCOREDUMP: cn.core_dumped; COREDUMP_WAIT: the dumper waits for the server's shutdown).
CORE_ACKS: dict[str, tuple[bool, bool, bool]] = {
    "kernel": (True, True, False),       # COREDUMP_KERNEL
    "kernel-wait": (True, True, True),   # COREDUMP_KERNEL | COREDUMP_WAIT
    "userspace": (False, True, False),   # COREDUMP_USERSPACE
    "reject": (False, False, False),     # COREDUMP_REJECT
}
#: The versions rows of the core_pattern kinds recent kernels added.
CORE_TYPE_SINCE = {"socket": "coredump_socket", "socket-request": "coredump_socket_request"}


def _kernel(m: Machine) -> KernelVersion:
    return running(m.system.kernel_version)


def pattern_refusal(m: Machine, core_type: str, ack: str = "kernel") -> str | None:
    """Why the model cannot dump through core_pattern kind ``core_type`` with a server's
    ``ack`` (None when it can): an unknown kind or ack, an ack other than COREDUMP_KERNEL
    without a socket-request server, a kind this kernel does not have."""
    if core_type not in CORE_TYPES:
        return f"core_pattern kind {core_type!r}: not one of {', '.join(CORE_TYPES)}"
    if ack not in CORE_ACKS:
        return f"coredump_ack {ack!r}: not one of {', '.join(CORE_ACKS)}"
    if ack != "kernel" and core_type != "socket-request":
        return (f"an ack of {ack} comes only from a socket-request (@@) server, not a "
                f"{core_type} core_pattern")
    since = CORE_TYPE_SINCE.get(core_type)
    if since and not _kernel(m).has(since):
        return (f"core_pattern kind {core_type!r}: Linux {m.system.kernel_version} has no such "
                f"core_pattern (it came in {change(since).since})")
    return None


def do_coredump(m: Machine, nr: int, *, raced: bool = False, late: bool | Task = False,
                core_type: str = "file", arrival: Sequence[Task] | None = None,
                ack: str = "kernel") -> Coredump:
    """vfs_coredump() (do_coredump() in older kernels) of the current task of CPU ``nr``, for
    the FPU notes: coredump_wait(); then the core_pattern's path (``core_type``, one of
    CORE_TYPES): coredump_file() and coredump_sock_connect() do not sleep, coredump_pipe()
    (call_usermodehelper_exec(UMH_WAIT_EXEC)) and coredump_sock_request() (the receive of
    the server's coredump_ack) do; then elf_core_dump()'s NT_X86_XSTATE of every thread
    through xstateregs_get() (the dumper's first), coredump_finish() and each thread's
    do_exit(). The dumper's CPU is left idle; the other threads are dead. ``raced``,
    ``late`` and ``arrival`` as for coredump_wait(); ``ack`` (one of `CORE_ACKS`) what a
    ``socket-request`` server answers: without COREDUMP_KERNEL there are no notes."""
    why = pattern_refusal(m, core_type, ack)
    if why:
        raise IllegalEvent(why)
    writes, core_dumped, waits = CORE_ACKS[ack]
    c = m.cpus[nr]
    dumper = c.current
    threads, slept, unwaited = coredump_wait(m, nr, raced=raced, late=late, arrival=arrival)
    sleeps = int(slept)
    if CORE_TYPES[core_type]:  # the wait: the dumper is switched out and, woken, back in
        m.idle(nr)
        m.preempt(nr, dumper)
        sleeps += 1
    size = m.system.user.max_size
    notes = tuple(ThreadNote(t, xstateregs_get(c, t, size))
                  for t in (dumper, *threads)) if writes else ()
    if waits:  # coredump_sock_wait(): switched out until the server's shutdown, then back
        m.idle(nr)
        m.preempt(nr, dumper)
    m.do_exit(nr)
    for t in threads:  # coredump_finish(): woken in coredump_task_exit(), each do_exit()s
        m.kill_thread(t)  # (variant coredump-no-wait-inactive: one still running exits there)
    return Coredump(notes, sleeps, unwaited, core_dumped, int(waits))
