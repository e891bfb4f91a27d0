"""The ``x86/fpu:`` lines of this machine's kernel log, and the boot-lines differential case.

Reads the kernel ring buffer through /dev/kmsg (one record per read(2), non-blocking, the
structured "PRIO,SEQ,USEC,FLAGS;MESSAGE" format of Documentation/ABI/testing/dev-kmsg), falling
back to the ``dmesg`` tool. Record headers, timestamps, levels and caller ids are stripped and
/dev/kmsg's "\\xNN" escapes undone, so the lines compare equal to the ``lines`` of
``fpstate.kernel.x86.xstate.fpu__init_system_xstate()``; what follows the prefix's single space
is the message verbatim (leading blanks and brackets included), as both formats print it.

HostUnavailable (with the reason) when the log cannot be read (kernel.dmesg_restrict without
CAP_SYSLOG, no /dev/kmsg) or no longer holds the boot lines (the ring buffer wrapped).
"""

from __future__ import annotations

import errno
import os
import re
import subprocess

from fpstate.errors import FpstateError, HostUnavailable

PREFIX = "x86/fpu: "
#: init_sigframe_size()'s pr_info, kept with the x86/fpu block (fpstate.host.auxv compares it).
SIGFRAME_PREFIX = "signal: max sigframe size: "
KMSG = "/dev/kmsg"

#: The prefix the kernel puts before each line in the syslog format (info_print_prefix():
#: "<%u>" with syslog, "[%5lu.%06lu]" print_time, "[%6s]" print_caller with CONFIG_PRINTK_CALLER,
#: then ONE space if there was a time or caller) and the one util-linux dmesg prints ("[time] ",
#: "-T" ctime "[Tue Nov 19 19:51:02 2025] ", caller "[    T0] " after a space, "-r" level
#: "<6>"). Exactly one space separates prefix and message: kernel messages may begin with
#: spaces or a tab (``"\tTrampoline variant of Tasks RCU enabled."``) or with brackets
#: (``"[drm] ..."``, ``"[Firmware Bug]: ..."``), and those belong to the message.
_SYSLOG_PREFIX = re.compile(r"""
    (?:<\d+>)?                                         # print_syslog: (facility << 3) | level
    (?:
        (?:
            (?:\[\ *\d+\.\d{6}\]                         # print_time: [%5lu.%06lu]
             |\[\w+\ \w+\ [\ \d]\d\ \d\d:\d\d:\d\d\ \d{4}\])  # dmesg -T: [Tue Nov 19 19:51:02 2025]
            (?:\ ?\[\ *[TC]\d+\])?                       # caller: kernel "][", util-linux "] ["
          | \[\ *[TC]\d+\]                               # caller alone (printk.time=0)
        )
        \                                              # the one separating space
    )?
    """, re.X)
#: A /dev/kmsg record header (info_print_ext_header): "PRIO,SEQ,USEC,FLAGS[,caller=T0];".
_KMSG_HEADER = re.compile(r"^\d+,\d+,\d+,[^;]*;")
#: msg_add_ext_text() writes every byte < 0x20, >= 0x7f and the backslash as "\xNN".
_KMSG_ESCAPE = re.compile(rb"\\x([0-9a-f]{2})")


def kmsg_unescape(text: str) -> str:
    """The message text of a /dev/kmsg record with msg_add_ext_text()'s "\\xNN" escapes undone
    (the bytes are then UTF-8, as printk stored them; undecodable bytes become U+FFFD)."""
    raw = _KMSG_ESCAPE.sub(lambda m: bytes([int(m[1], 16)]), text.encode("utf-8"))
    return raw.decode("utf-8", "replace")


def message_of(line: str) -> str:
    """One log line without its prefix: a /dev/kmsg record header (the text is then unescaped),
    or the syslog level, timestamp and caller id of the kernel's syslog format / dmesg output."""
    line = line.rstrip("\r\n")
    m = _KMSG_HEADER.match(line)
    if m:
        return kmsg_unescape(line[m.end():])
    return line[_SYSLOG_PREFIX.match(line).end():]  # type: ignore[union-attr]


def fpu_lines(text: str) -> tuple[str, ...]:
    """The ``x86/fpu:`` messages of a kernel log (dmesg output or /dev/kmsg records), in order.

    Lines are split at "\\n" only (the separator both formats use; str.splitlines() would also
    split inside a message at U+2028, U+0085, form feeds...). /dev/kmsg continuation lines
    (dictionary " KEY=value" lines, which start with a space) are not messages and are skipped.
    """
    out = []
    for line in text.split("\n"):
        if line.startswith(" "):
            continue
        msg = message_of(line)
        if msg.startswith(PREFIX):
            out.append(msg)
    return tuple(out)


def _read_kmsg(path: str = KMSG) -> str:
    """Every record /dev/kmsg still holds, one message per line (HostUnavailable if unreadable)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise HostUnavailable(f"cannot open {path}: {e.strerror}") from None
    records = []
    try:
        while True:
            try:
                rec = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EPIPE:  # a record was overwritten while we read: go on
                    continue
                if e.errno == errno.EINVAL:  # a record larger than our buffer: skip it
                    continue
                raise HostUnavailable(f"cannot read {path}: {e.strerror}") from None
            if not rec:
                break
            records.append(rec.decode("utf-8", "replace").split("\n", 1)[0])
    finally:
        os.close(fd)
    return "\n".join(records)


def _read_dmesg_tool() -> str:
    try:
        done = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HostUnavailable(f"cannot run dmesg: {e}") from None
    if done.returncode != 0:
        why = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no output"
        raise HostUnavailable(f"dmesg exited with status {done.returncode}: {why}")
    return done.stdout


BOOT_ID = "/proc/sys/kernel/random/boot_id"


def _cache_path() -> str | None:
    """Where the boot lines of *this boot* are kept once read: keyed by the kernel's boot_id,
    so a file from an earlier boot is never taken for this one."""
    try:
        with open(BOOT_ID) as f:
            boot_id = f.read().strip()
    except OSError:
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fpstate", f"boot-lines-{boot_id}.txt")


def _remember(lines: tuple[str, ...]) -> None:
    path = _cache_path()
    if path is None:
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
    except OSError:
        pass  # a cache that cannot be written only means the next read must find the log


def _recall() -> tuple[str, ...]:
    return fpu_lines(kept_boot_messages())


def kept_boot_messages() -> str:
    """The boot messages kept in this boot (the x86/fpu block, then the signal line), one per
    line; empty when none were kept."""
    path = _cache_path()
    if path is None:
        return ""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _boot_messages(text: str, lines: tuple[str, ...]) -> tuple[str, ...]:
    """What is kept of a log whose x86/fpu block is complete: the block and the
    ``signal: max sigframe size`` line (printed later in the boot, so present too)."""
    signal = [m for m in map(message_of, text.split("\n")) if m.startswith(SIGFRAME_PREFIX)]
    return lines + tuple(signal[:1])


def oldest_record_is_fpu_line(text: str) -> bool:
    """Whether the oldest message a log still holds is an ``x86/fpu:`` line.

    The ring buffer drops the oldest records first, and a complete boot log starts with
    "Linux version ..." long before fpu__init_system_xstate() prints. When the oldest record
    left is itself an x86/fpu line, earlier ones of the same block may have been overwritten:
    comparing what is left would report a difference that is only the log's."""
    for line in text.split("\n"):
        if line and not line.startswith(" "):
            return message_of(line).startswith(PREFIX)
    return False


def host_fpu_lines() -> tuple[str, ...]:
    """The ``x86/fpu:`` lines of this machine's kernel log, timestamps stripped.

    The ring buffer is small and other messages push the boot lines out (every bad
    rt_sigreturn frame prints one line), so the lines read once in a boot are kept under the
    boot's boot_id and used when the log no longer holds them. A log that holds only part of
    the block (its oldest record is an x86/fpu line) is neither used nor kept.

    HostUnavailable when no reader can open the log, or it holds no complete block and none was
    kept in this boot.
    """
    errors = []
    for name, reader in ((KMSG, _read_kmsg), ("dmesg", _read_dmesg_tool)):
        try:
            text = reader()
        except HostUnavailable as e:
            errors.append(str(e))
            continue
        lines = fpu_lines(text)
        if lines and not oldest_record_is_fpu_line(text):
            _remember(_boot_messages(text, lines))
            return lines
        if lines:
            errors.append(f"{name}: the oldest record left is an '{PREFIX.strip()}' line, so "
                          "the ring buffer may have overwritten the first ones of the block")
        else:
            errors.append(f"{name}: the log holds no '{PREFIX.strip()}' line "
                          "(ring buffer overwritten since boot?)")
    kept = _recall()
    if kept:
        return kept
    raise HostUnavailable("no usable x86/fpu boot lines in the kernel log, none kept in this "
                          "boot: " + "; ".join(errors))


def compare_boot_lines() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(model lines, host lines): fpu__init_system_xstate() on this CPU's CPUID for the running
    kernel (os.uname().release mapped by versions.version_for_release()), and the kernel log.

    HostUnavailable when the log cannot be read, CPUID cannot be executed or the running
    kernel is older than every modelled version."""
    from fpstate.kernel.x86.versions import version_for_release
    from fpstate.kernel.x86.xstate import fpu__init_system_xstate
    from fpstate.x86.profiles import load_profile

    host = host_fpu_lines()
    try:
        kernel = version_for_release(os.uname().release)
    except FpstateError as e:
        raise HostUnavailable(f"the running kernel cannot be modelled: {e}") from None
    model = fpu__init_system_xstate(load_profile("host"), kernel).lines
    return model, host
