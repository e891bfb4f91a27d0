"""The ELF auxiliary vector the kernel gave this process: AT_MINSIGSTKSZ, AT_HWCAP, AT_HWCAP2.

Kernel path: ``create_elf_tables`` (fs/binfmt_elf.c) with ``ARCH_DLINFO``
(arch/x86/include/asm/elf.h): AT_SYSINFO_EHDR, and since v5.14 AT_MINSIGSTKSZ =
``get_sigframe_size()`` (arch/x86/kernel/signal.c: max_frame_size, computed once by
``init_sigframe_size()`` and printed at boot as ``signal: max sigframe size: N``).
AT_HWCAP is ELF_HWCAP = boot_cpu_data.x86_capability[CPUID_1_EDX]; AT_HWCAP2 is ELF_HWCAP2
(bit 0 HWCAP2_RING3MWAIT, bit 1 HWCAP2_FSGSBASE; arch/x86/include/uapi/asm/hwcap2.h).
"""

from __future__ import annotations

import ctypes
import re
import struct
import subprocess
from dataclasses import dataclass

from fpstate.errors import HostUnavailable

AT_NULL = 0
AT_PAGESZ = 6
AT_PLATFORM = 15
AT_HWCAP = 16
AT_CLKTCK = 17
AT_HWCAP2 = 26
AT_SYSINFO_EHDR = 33
AT_MINSIGSTKSZ = 51

HWCAP2_RING3MWAIT = 1 << 0
HWCAP2_FSGSBASE = 1 << 1

#: The uapi constant that AT_MINSIGSTKSZ supersedes (arch/x86/include/uapi/asm/signal.h).
MINSIGSTKSZ = 2048
SIGSTKSZ = 8192


@dataclass(frozen=True, slots=True)
class AuxVector:
    """(type, value) pairs in the order the kernel wrote them, AT_NULL excluded."""

    entries: tuple[tuple[int, int], ...]

    def get(self, at_type: int) -> int | None:
        for t, v in self.entries:
            if t == at_type:
                return v
        return None

    @property
    def minsigstksz(self) -> int | None:
        return self.get(AT_MINSIGSTKSZ)

    @property
    def hwcap(self) -> int | None:
        return self.get(AT_HWCAP)

    @property
    def hwcap2(self) -> int | None:
        return self.get(AT_HWCAP2)


def parse_auxv(raw: bytes) -> AuxVector:
    """Parse the native (64-bit) auxv bytes: pairs of u64 up to AT_NULL."""
    entries = []
    for t, v in struct.iter_unpack("<QQ", raw[:len(raw) // 16 * 16]):
        if t == AT_NULL:
            break
        entries.append((t, v))
    return AuxVector(tuple(entries))


def read_auxv(path: str = "/proc/self/auxv") -> AuxVector:
    """The auxiliary vector of this process (``/proc/self/auxv``, fs/proc/base.c)."""
    try:
        with open(path, "rb") as f:
            return parse_auxv(f.read())
    except OSError as e:
        raise HostUnavailable(f"cannot read {path}: {e.strerror}") from e


_libc = ctypes.CDLL(None, use_errno=True)
_libc.getauxval.restype = ctypes.c_ulong
_libc.getauxval.argtypes = [ctypes.c_ulong]


def getauxval(at_type: int) -> int | None:
    """glibc getauxval(): the value, or None when the kernel did not supply the entry
    (getauxval returns 0 with errno ENOENT). On x86-64 glibc answers AT_HWCAP with its own
    dl_hwcap (HWCAP_X86_64 ...), not the kernel's word: use `read_auxv` for that."""
    ctypes.set_errno(0)
    value = int(_libc.getauxval(at_type))
    if value == 0 and ctypes.get_errno() != 0:
        return None
    return value


def at_minsigstksz() -> int:
    """AT_MINSIGSTKSZ of this process = the kernel's get_sigframe_size()."""
    value = getauxval(AT_MINSIGSTKSZ)
    if value is None:
        raise HostUnavailable("the kernel supplies no AT_MINSIGSTKSZ (x86 added it in v5.14)")
    return value


_SIGFRAME_LINE = re.compile(r"signal: max sigframe size: (\d+)")


def max_sigframe_size_from_dmesg() -> int:
    """The ``signal: max sigframe size: N`` line init_sigframe_size() printed at boot."""
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HostUnavailable(f"cannot run dmesg: {e}") from e
    m = _SIGFRAME_LINE.search(out.stdout)
    if out.returncode != 0 or m is None:
        raise HostUnavailable("dmesg has no 'signal: max sigframe size' line (not readable, "
                              "or rotated out of the ring buffer)")
    return int(m.group(1))
