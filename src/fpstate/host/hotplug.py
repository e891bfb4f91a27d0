"""A task's registers across its CPU going offline and coming back, on the real kernel.

Kernel paths exercised: cpu_down (the takedown leaves the CPU running nothing), native_kick_ap()
(smpboot.c: "the FPU context is blank, nobody can own it" -- fpu_fpregs_owner_ctx = NULL),
start_secondary() -> fpu__init_cpu() (FNINIT, XCR0, IA32_XSS, IA32_XFD), and the sleeping
task's return to user mode on that CPU (switch_fpu_return -> fpregs_restore_userregs). The
model's side is fpstate.kernel.x86.smpboot.

Theory of operation
-------------------
A forked child pins itself to the CPU, loads every register with a pattern (x87 stack
included: ST0 = pi, ST1 = 1.0, so an FNINIT would show in FSW.TOP and the tag word), XSAVEs
them, sets a flag and blocks in read() on a pipe. Switched out there, its registers stay in
the CPU, valid for it. The parent, pinned to another CPU, waits until the child sleeps, takes
the CPU offline and brings it back (sysfs ``online``), then writes the pipe: the child wakes
on the same CPU (its only allowed one, online again) and XSAVEs its registers again before
exiting. A kernel that kept the CPU's owner across the cycle would skip the restore and the
second image would show FNINIT's x87 state; one that restores shows the first image again.

Taking a CPU offline changes the machine for everyone, so the probe runs only as root, with
``FPSTATE_MAY_HOTPLUG=1``, and always brings the CPU back (a ``finally``).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from fpstate.errors import FpstateError, HostUnavailable
from fpstate.host.child import (
    PAGE,
    SYS,
    Asm,
    ChildExit,
    CodePages,
    SharedMemory,
    XsaveImage,
    fork_child,
    kill_and_reap,
    load_patterns,
    pattern_table,
    wait_child,
    xsave_image,
    xsave_slot,
)

ALLOW_ENV = "FPSTATE_MAY_HOTPLUG"
SYSFS_CPU = Path("/sys/devices/system/cpu")


def online_path(cpu: int) -> Path:
    return SYSFS_CPU / f"cpu{cpu}" / "online"


def hotplug_unavailable(cpu: int = 1) -> str | None:
    """Why `cpu_cycle_while_asleep` may not take CPU ``cpu`` offline here, or None."""
    if os.environ.get(ALLOW_ENV) != "1":
        return (f"taking CPU {cpu} offline changes the machine for everyone: set "
                f"{ALLOW_ENV}=1 to allow it")
    if os.geteuid() != 0:
        return "CPU hotplug needs root"
    path = online_path(cpu)
    if cpu == 0 or not path.exists():
        return f"CPU {cpu} has no {path} (not hot-pluggable here)"
    if not os.access(path, os.W_OK):
        return f"{path} is not writable here"
    if path.read_text().strip() != "1":
        return f"CPU {cpu} is offline already"
    if len(os.sched_getaffinity(0)) < 2:
        return "this process may run on one CPU only: the parent needs another one"
    return None


@dataclass(frozen=True, slots=True)
class HotplugRun:
    """What the sleeping child held before and after its CPU's cycle."""

    cpu: int
    before: XsaveImage
    after: XsaveImage | None  #: None when the child did not get past its read()
    exit: ChildExit
    offline_seconds: float  #: how long the CPU stayed offline


def _set_online(cpu: int, value: int) -> None:
    online_path(cpu).write_text(f"{value}\n")


def _sleeping(pid: int) -> bool:
    """Whether ``pid`` is in an interruptible sleep (state S in /proc/PID/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] == "S"


def cpu_cycle_while_asleep(cpu: int = 1, *, seed: int = 0x5C, timeout: float = 30.0,
                           offline: float = 0.2) -> HotplugRun:
    """Take CPU ``cpu`` offline for ``offline`` seconds and back while a child pinned to it
    sleeps with pattern registers (see the module docstring); its XSAVE images before and
    after."""
    why = hotplug_unavailable(cpu)
    if why is not None:
        raise HostUnavailable(why)
    others = os.sched_getaffinity(0) - {cpu}
    xs = xsave_slot()
    shm = SharedMemory(PAGE + 2 * xs)
    shm.write(0, pattern_table(seed))
    before, after = PAGE, PAGE + xs
    asleep, woke, scratch = PAGE - 8, PAGE - 16, PAGE - 24
    rfd, wfd = os.pipe()

    def body() -> int:
        os.close(wfd)
        os.sched_setaffinity(0, {cpu})
        pages = CodePages(1)
        a = Asm()
        load_patterns(a, shm.address)
        a.xsave(shm.address + before)
        a.mov_imm(a.R.RAX, 1)
        a.store_rax(shm.address + asleep)
        a.syscall(SYS["read"], rfd, shm.address + scratch, 1)  # switched out here
        a.xsave(shm.address + after)
        a.mov_imm(a.R.RAX, 1)
        a.store_rax(shm.address + woke)
        a.exit_group(0)
        pages.call(pages.place(0, a))
        return 6

    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, others)  # the parent keeps off the CPU that goes away
    pid = fork_child(body)
    os.close(rfd)
    was_offline = 0.0
    try:
        deadline = time.monotonic() + timeout
        while not (shm.u64(asleep) == 1 and _sleeping(pid)):
            if time.monotonic() > deadline:
                raise FpstateError(f"the hotplug probe's child {pid} never went to sleep")
            time.sleep(0.001)
        start = time.monotonic()
        _set_online(cpu, 0)
        try:
            time.sleep(offline)
        finally:
            _set_online(cpu, 1)
            was_offline = time.monotonic() - start
        os.write(wfd, b"x")
        ex = wait_child(pid, timeout)
    except BaseException:
        kill_and_reap(pid)
        raise
    finally:
        os.close(wfd)
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, saved)
    return HotplugRun(cpu, xsave_image(shm.read(before, xs)),
                      xsave_image(shm.read(after, xs)) if shm.u64(woke) == 1 else None,
                      ex, was_offline)


__all__ = ["ALLOW_ENV", "HotplugRun", "cpu_cycle_while_asleep", "hotplug_unavailable"]
