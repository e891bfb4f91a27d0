"""Core dumps of this machine's kernel: a child runs machine code and dumps core.

``kernel_core(directory, code)`` forks a child that raises its own RLIMIT_CORE (no system
setting changes), makes itself dumpable again, restores SIGQUIT's default action, runs the
machine code ``code(asm)`` emits and kills itself with SIGQUIT from that same code, so nothing
of Python runs between the registers it set and the dump. The kernel writes the core into
``directory`` by /proc/sys/kernel/core_pattern, which must therefore name a plain file (no
pipe to systemd-coredump or apport, no absolute path). HostUnavailable says why when it
cannot: a piped or absolute pattern, an RLIMIT_CORE hard limit of 0, or no file appearing.

``dump_switches(directory, code, pattern=...)`` dumps the same way, without the process's
memory (coredump_filter 0, so the core is its headers and notes), and counts the dumping
thread's voluntary context switches from just before its fatal signal to its end: the child
reads its own voluntary_ctxt_switches from /proc/self/status before the machine code runs,
the parent reads them again once the child is a zombie (waitid(WNOWAIT)) and no longer
changes. ``pattern`` ``pipe`` points core_pattern at a helper (``|/bin/sh -c cat>PATH``,
which the kernel runs as a usermode helper), ``socket`` and ``socket-request`` at a coredump
socket (``@path``, ``@@path``; Linux 6.16+ and 6.17+) served by a thread of the caller, for as
long as the dump lasts, and put the old pattern back: that changes a system setting, so it
runs only where FPSTATE_MAY_SET_CORE_PATTERN=1 says it may, as root.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fpstate.errors import FpstateError, HostUnavailable
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
    return pattern, _rlimit_refusal()


def _rlimit_refusal() -> str | None:
    """Why no child of ours may dump core whatever the pattern (an RLIMIT_CORE hard limit
    of 0), or None."""
    try:
        hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
    except OSError:
        hard = 0
    return "RLIMIT_CORE hard limit is 0: no process may dump core" if hard == 0 else None


def _file_mappings() -> list[tuple[int, int]]:
    """The (start, length) of every mapping of a file on disk in /proc/self/maps (shared
    anonymous memory, shown as /dev/zero, and the [special] mappings are left out)."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        path = fields[5] if len(fields) > 5 else ""
        if path.startswith("/") and not path.startswith("/dev/"):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            out.append((lo, hi - lo))
    return out


def _unmap_files(a: Asm) -> ctypes.Array[ctypes.c_uint64]:
    """Emit a loop of munmap() over a table of `_file_mappings` (returned: the caller keeps
    it alive): the interpreter's own mappings go too, so nothing after it may return into
    Python."""
    maps = _file_mappings()
    table = (ctypes.c_uint64 * (2 * len(maps) + 2))(*[x for m in maps for x in m])
    R, C, In, M = a.R, a.C, a.In, a.M
    a.mov_imm(R.R12, ctypes.addressof(table))
    a.mov_imm(R.R13, len(maps))
    a.label("unmap")
    a.emit(In.create_reg_reg(C.TEST_RM64_R64, R.R13, R.R13))
    a.jump("JE_REL32_64", "unmapped")
    a.emit(In.create_reg_mem(C.MOV_R64_RM64, R.RDI, M(R.R12)))
    a.emit(In.create_reg_mem(C.MOV_R64_RM64, R.RSI, M(R.R12, displ=8)))
    a.mov_imm(R.RAX, SYS["munmap"])
    a.emit(In.create(C.SYSCALL))
    a.emit(In.create_reg_i32(C.ADD_RM64_IMM8, R.R12, 16))
    a.emit(In.create_reg_i32(C.SUB_RM64_IMM8, R.R13, 1))
    a.jump("JMP_REL32_64", "unmap")
    a.label("unmapped")
    return table


def _dumping_child(directory: Path, code: Callable[[Asm], None], *, memory: bool = True,
                   ready: int | None = None) -> int:
    """Fork the child that runs ``code`` and kills itself with SIGQUIT; without ``memory``
    its coredump_filter is 0 and, before ``code``, its machine code unmaps every file it has
    mapped (the interpreter and its libraries: nothing of them runs again), so the core is
    little more than its headers and notes -- under a pipe's 64 KiB, whose helper need not
    read for the dump to go on; with ``ready`` (a pipe's write end) it writes its
    voluntary_ctxt_switches there just before the machine code runs."""

    def body() -> int:
        resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY,
                                                  resource.RLIM_INFINITY))
        raw_syscall(SYS["prctl"], PR_SET_DUMPABLE, 1)  # fork_child cleared it
        os.chdir(directory)
        if not memory:
            Path("/proc/self/coredump_filter").write_text("0")
        act = (ctypes.c_uint64 * 4)(0, 0, 0, 0)  # SIG_DFL: dump core
        raw_syscall(SYS["rt_sigaction"], signal.SIGQUIT, ctypes.addressof(act), 0, 8)
        pages = CodePages(1)
        a = Asm()
        if not memory:
            table = _unmap_files(a)  # noqa: F841 - the table must outlive the machine code
        code(a)
        a.syscall(SYS["getpid"])
        a.syscall(SYS["kill"], Reg(a.R.RAX), signal.SIGQUIT)
        a.exit_group(7)
        entry = pages.place(0, a)
        if ready is not None:
            os.write(ready, str(voluntary_switches("self")).encode())
        pages.call(entry)
        return 6

    return fork_child(body)


def voluntary_switches(pid: int | str) -> int:
    """voluntary_ctxt_switches of /proc/PID/status (the thread group leader's)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise HostUnavailable(f"/proc/{pid}/status has no voluntary_ctxt_switches")


def kernel_core(directory: Path, code: Callable[[Asm], None]) -> KernelCore:
    """Fork a child that runs the machine code ``code(asm)`` emits and then, from that code,
    kills itself with SIGQUIT: the core file the kernel wrote in ``directory`` (an empty
    directory of the caller's) and the child's exit."""
    pattern, why = _core_pattern()
    if why:
        raise HostUnavailable(why)
    ex = wait_child(_dumping_child(directory, code))
    if ex.signal != signal.SIGQUIT:
        raise HostUnavailable(f"the dumping child ended otherwise: {ex}")
    return KernelCore(_core_file(directory, pattern), ex)


def _core_file(directory: Path, pattern: str) -> Path:
    prefix = pattern.split("%")[0] or "core"
    cores = sorted(p for p in Path(directory).iterdir() if p.name.startswith(prefix))
    if not cores:
        raise HostUnavailable(f"no core file appeared (core_pattern {pattern!r})")
    return cores[0]


@dataclass(frozen=True, slots=True)
class DumpSwitches:
    """What `dump_switches` saw: the dumping thread's voluntary context switches from just
    before its fatal signal to its end (do_task_dead()'s last switch included), the core's
    bytes and how the child ended."""

    voluntary: int
    core: bytes
    exit: ChildExit


#: dump_switches() patterns that change core_pattern, and the prefix of each socket form.
SOCKET_PREFIX = {"socket": "@", "socket-request": "@@"}
CHANGED_PATTERNS = ("pipe", *SOCKET_PREFIX)
SHELL = Path("/bin/sh")  #: the pipe helper's interpreter (cat does the reading)
COREDUMP_KERNEL = 1  #: include/uapi/linux/coredump.h: the kernel writes the core
#: The coredump_ack masks of `fpstate.kernel.x86.coredump.CORE_ACKS` (COREDUMP_USERSPACE 2,
#: COREDUMP_REJECT 4, COREDUMP_WAIT 8).
ACK_MASKS = {"kernel": COREDUMP_KERNEL, "kernel-wait": COREDUMP_KERNEL | 8, "userspace": 2,
             "reject": 4}
ALLOW_ENV = "FPSTATE_MAY_SET_CORE_PATTERN"


def pattern_change_unavailable() -> str | None:
    """Why `dump_switches` may not point core_pattern at a pipe or a socket here, or None."""
    if os.environ.get(ALLOW_ENV) != "1":
        return (f"a core through a pipe or a socket means changing the system's core_pattern "
                f"for the dump: set {ALLOW_ENV}=1 to allow it")
    if os.geteuid() != 0:
        return "changing core_pattern needs root"
    if not os.access(CORE_PATTERN, os.W_OK):
        return f"{CORE_PATTERN} is not writable here"
    return _rlimit_refusal()


def dump_switches(directory: Path, code: Callable[[Asm], None], *,
                  pattern: str = "file", settle: float = 0.02,
                  ack: str = "kernel") -> DumpSwitches:
    """Dump a child running ``code`` (as `kernel_core`, without its memory) through the
    core_pattern kind ``pattern`` -- ``file`` (the system's pattern, which must name a file in
    the process's directory), ``pipe``, ``socket`` or ``socket-request`` -- and count the dumping
    thread's voluntary context switches until it is gone. ``settle``: how long the zombie's
    count must stay unchanged. ``ack``: what the ``socket-request`` server answers (one of
    `ACK_MASKS`); the core is empty where the kernel writes none."""
    if ack not in ACK_MASKS or (ack != "kernel" and pattern != "socket-request"):
        raise FpstateError(f"coredump_ack {ack!r}: one of {', '.join(ACK_MASKS)}, and other "
                           "than kernel only with the socket-request pattern")
    if pattern == "file":
        old, why = _core_pattern()
    elif pattern in CHANGED_PATTERNS:
        old, why = CORE_PATTERN.read_text().strip(), pattern_change_unavailable()
        if not why and pattern == "pipe" and not SHELL.exists():
            why = f"no {SHELL} for the pipe's helper"
    else:
        raise FpstateError(f"core_pattern kind {pattern!r}: not file, pipe, socket or "
                           "socket-request")
    if why:
        raise HostUnavailable(why)
    server = (_CoreServer(directory / "coredump.sock", request=pattern == "socket-request",
                          ack=ACK_MASKS[ack]) if pattern in SOCKET_PREFIX else None)
    piped = directory / "core.piped"
    r, w = os.pipe()
    try:
        if server is not None:
            CORE_PATTERN.write_text(SOCKET_PREFIX[pattern] + str(server.path))
        elif pattern == "pipe":  # argv split on spaces: sh, -c, and the command
            CORE_PATTERN.write_text(f"|{SHELL} -c cat>{piped}")
        try:
            pid = _dumping_child(directory, code, memory=False, ready=w)
            os.close(w)
            w = -1
            before = int(os.read(r, 32) or b"-1")
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        finally:
            if pattern != "file":
                CORE_PATTERN.write_text(old)
        after = voluntary_switches(pid)
        while True:  # the zombie's last switch (do_task_dead) may still be on its way
            time.sleep(settle)
            again = voluntary_switches(pid)
            if again == after:
                break
            after = again
        ex = wait_child(pid)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    if ex.signal != signal.SIGQUIT or before < 0:
        raise HostUnavailable(f"the dumping child ended otherwise: {ex}")
    if server is not None:
        data = server.finish(pid)
    elif pattern == "pipe":
        data = _helper_output(piped, settle)
    else:
        data = _core_file(directory, old).read_bytes()
    return DumpSwitches(after - before, data, ex)


def _helper_output(path: Path, settle: float, timeout: float = 10.0) -> bytes:
    """What the pipe's helper wrote to ``path``, once its size stopped changing (the
    helper is the kernel's child, not ours, so it cannot be waited for)."""
    deadline, size = time.monotonic() + timeout, -1
    while time.monotonic() < deadline:
        time.sleep(settle)
        now = path.stat().st_size if path.exists() else -1
        if now > 0 and now == size:
            return path.read_bytes()
        size = now
    raise HostUnavailable(f"the core_pattern pipe's helper wrote no core to {path}")


class _CoreServer:
    """A coredump server on an AF_UNIX stream socket, in a thread: it accepts one
    connection, answers a coredump_req with a coredump_ack of ``ack`` (COREDUMP_KERNEL by
    default) where ``request`` (and reads the kernel's one-u32 mark), then reads the core to
    its end -- nothing, where the ack has no COREDUMP_KERNEL -- and closes the connection
    (which ends a COREDUMP_WAIT)."""

    def __init__(self, path: Path, *, request: bool, ack: int = COREDUMP_KERNEL) -> None:
        self.path, self.request, self.ack = path, request, ack
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(1)
        self.sock.settimeout(10.0)
        self.data = bytearray()
        self.peer = 0  #: the dumping process (SO_PEERCRED: the kernel's connect gives its tgid)
        self.error: str | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError as e:
            self.error = f"no connection to the coredump socket ({e})"
            return
        with conn:
            conn.settimeout(10.0)
            cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                   struct.calcsize("3i"))
            self.peer = struct.unpack("3i", cred)[0]
            try:
                if self.request:
                    req = conn.recv(16, socket.MSG_WAITALL)
                    _size, _size_ack, mask = struct.unpack("<IIQ", req)
                    if self.ack & ~mask:
                        self.error = (f"the kernel's coredump_req mask {mask:#x} lacks "
                                      f"{self.ack & ~mask:#x}")
                        return
                    conn.sendall(struct.pack("<IIQ", 16, 0, self.ack))
                    mark = struct.unpack("<I", conn.recv(4, socket.MSG_WAITALL))[0]
                    if mark != 0:
                        self.error = f"the kernel refused the coredump_ack (mark {mark})"
                        return
                while chunk := conn.recv(1 << 16):
                    self.data += chunk
            except (OSError, struct.error) as e:
                self.error = f"the coredump socket failed ({e})"

    def finish(self, pid: int) -> bytes:
        """The core of process ``pid`` (HostUnavailable if another one came first)."""
        self.thread.join(10.0)
        self.sock.close()
        if self.error:
            raise HostUnavailable(self.error)
        if self.peer != pid:
            raise HostUnavailable(f"the coredump socket served process {self.peer}, not {pid}")
        if not self.data and self.ack & COREDUMP_KERNEL:
            raise HostUnavailable("the coredump socket received no core")
        return bytes(self.data)
