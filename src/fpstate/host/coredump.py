"""Core dumps of this machine's kernel: a child runs machine code and dumps core.

``kernel_core(directory, code)`` forks a child that raises its own RLIMIT_CORE (no system
setting changes), makes itself dumpable again, restores SIGQUIT's default action, runs the
machine code ``code(asm)`` emits and kills itself with SIGQUIT from that same code, so nothing
of Python runs between the registers it set and the dump. The kernel writes the core into
``directory`` by /proc/sys/kernel/core_pattern, which must therefore name a plain file (no
pipe to systemd-coredump or apport, no absolute path). HostUnavailable says why when it
cannot: a piped or absolute pattern, an RLIMIT_CORE hard limit of 0, or no file appearing.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fpstate.errors import HostUnavailable
from fpstate.host.child import (
    SYS,
    Asm,
    ChildExit,
    CodePages,
    Reg,
    fork_child,
    raw_syscall,
    wait_child,
)

CORE_PATTERN = Path("/proc/sys/kernel/core_pattern")
PR_SET_DUMPABLE = 4


@dataclass(frozen=True, slots=True)
class KernelCore:
    """The core file the kernel wrote and how the child ended (``exit.signal`` is SIGQUIT)."""

    path: Path
    exit: ChildExit

    def read(self) -> bytes:
        return self.path.read_bytes()


def core_unavailable() -> str | None:
    """Why this machine's kernel will not write a core file a child can find, or None."""
    return _core_pattern()[1]


def _core_pattern() -> tuple[str, str | None]:
    """/proc/sys/kernel/core_pattern and why no child can find its core file (or None)."""
    try:
        pattern = CORE_PATTERN.read_text().strip()
    except OSError as e:
        return "", f"cannot read {CORE_PATTERN}: {e.strerror or e}"
    if pattern.startswith("|") or "/" in pattern:
        return pattern, f"core_pattern {pattern!r} does not write a file in the process's " \
            "directory"
    try:
        hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
    except OSError:
        hard = 0
    if hard == 0:
        return pattern, "RLIMIT_CORE hard limit is 0: no process may dump core"
    return pattern, None


def kernel_core(directory: Path, code: Callable[[Asm], None]) -> KernelCore:
    """Fork a child that runs the machine code ``code(asm)`` emits and then, from that code,
    kills itself with SIGQUIT: the core file the kernel wrote in ``directory`` (an empty
    directory of the caller's) and the child's exit."""
    pattern, why = _core_pattern()
    if why:
        raise HostUnavailable(why)

    def body() -> int:
        resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY,
                                                  resource.RLIM_INFINITY))
        raw_syscall(SYS["prctl"], PR_SET_DUMPABLE, 1)  # fork_child cleared it
        os.chdir(directory)
        act = (ctypes.c_uint64 * 4)(0, 0, 0, 0)  # SIG_DFL: dump core
        raw_syscall(SYS["rt_sigaction"], signal.SIGQUIT, ctypes.addressof(act), 0, 8)
        pages = CodePages(1)
        a = Asm()
        code(a)
        a.syscall(SYS["getpid"])
        a.syscall(SYS["kill"], Reg(a.R.RAX), signal.SIGQUIT)
        a.exit_group(7)
        pages.call(pages.place(0, a))
        return 6

    ex = wait_child(fork_child(body))
    if ex.signal != signal.SIGQUIT:
        raise HostUnavailable(f"the dumping child ended otherwise: {ex}")
    prefix = pattern.split("%")[0] or "core"
    cores = sorted(p for p in Path(directory).iterdir() if p.name.startswith(prefix))
    if not cores:
        raise HostUnavailable(f"no core file appeared (core_pattern {pattern!r})")
    return KernelCore(cores[0], ex)
