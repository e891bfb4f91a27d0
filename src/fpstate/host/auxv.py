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
from fpstate.host.ia32 import run_elf32, static_elf32

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
    """The ``signal: max sigframe size: N`` line init_sigframe_size() printed at boot: from the
    ``dmesg`` tool, or -- once the ring buffer has overwritten it -- from the boot messages
    fpstate.host.dmesg kept in this boot (keyed by boot_id)."""
    from fpstate.host.dmesg import kept_boot_messages

    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HostUnavailable(f"cannot run dmesg: {e}") from e
    m = _SIGFRAME_LINE.search(out.stdout) if out.returncode == 0 else None
    if m is None:
        m = _SIGFRAME_LINE.search(kept_boot_messages())
    if m is None:
        raise HostUnavailable("dmesg has no 'signal: max sigframe size' line (not readable, "
                              "or rotated out of the ring buffer) and none was kept in this boot")
    return int(m.group(1))


# -- the ia32 frame that max_frame_size reserves room for -----------------------------------

@dataclass(frozen=True, slots=True)
class Ia32Frame:
    """A non-RT signal frame (struct sigframe_ia32) delivered to a 32-bit process: the frame
    MAX_FRAME_SIGINFO_UCTXT_SIZE is sized for on IA32_EMULATION kernels."""

    esp: int  #: handler ESP on entry = &sigframe_ia32.pretcode
    fpstate: int  #: sc.fpstate: the fsave header, 112 bytes before the 64-aligned fxsave
    magic1: int
    extended_size: int  #: user_size + 4 + sizeof(struct fregs_state) (112)
    xfeatures: int
    xstate_size: int

    @property
    def frame_bytes(self) -> int:
        """fpstate - ESP = ((fpstate - sizeof(sigframe_ia32) + 4) & -16) - 4 subtracted."""
        return self.fpstate - self.esp


_IA32_BASE = 0x08048000
_IA32_BSS = _IA32_BASE + 0x4000
_SC_FPSTATE = 8 + 76  #: pretcode, sig, then sigcontext_32.fpstate
_FREGS_STATE = 112


def _ia32_code(handler: int) -> tuple[bytes, int]:
    from iced_x86 import BlockEncoder, Decoder
    from iced_x86 import Code as C
    from iced_x86 import Instruction as In
    from iced_x86 import MemoryOperand as M
    from iced_x86 import Register as R

    act, out = _IA32_BSS, _IA32_BSS + 64
    items: list[In] = []
    marks: dict[str, int] = {}

    def e(i: In) -> None:
        i.ip = len(items) + 1
        items.append(i)

    def mov(reg: int, value: int) -> None:
        e(In.create_reg_u32(C.MOV_R32_IMM32, reg, value))

    def int80() -> None:
        e(In.create_u32(C.INT_IMM8, 0x80))

    e(In.create_mem_u32(C.MOV_RM32_IMM32, M(displ=act, displ_size=4), handler))
    mov(R.EAX, 174)  # rt_sigaction(SIGUSR1, &act, NULL, 8), no SA_SIGINFO: sigframe_ia32
    mov(R.EBX, 10)
    mov(R.ECX, act)
    mov(R.EDX, 0)
    mov(R.ESI, 8)
    int80()
    mov(R.EAX, 20)  # getpid
    int80()
    e(In.create_reg_reg(C.MOV_R32_RM32, R.EBX, R.EAX))
    mov(R.EAX, 37)  # kill(pid, SIGUSR1)
    mov(R.ECX, 10)
    int80()
    mov(R.EAX, 252)  # exit_group(3): the handler did not run
    mov(R.EBX, 3)
    int80()
    marks["handler"] = len(items)
    e(In.create_mem_reg(C.MOV_RM32_R32, M(displ=out, displ_size=4), R.ESP))
    e(In.create_reg_mem(C.MOV_R32_RM32, R.EAX, M(R.ESP, displ=_SC_FPSTATE)))
    e(In.create_mem_reg(C.MOV_RM32_R32, M(displ=out + 4, displ_size=4), R.EAX))
    for k in range(6):
        e(In.create_reg_mem(C.MOV_R32_RM32, R.ECX, M(R.EAX, displ=_FREGS_STATE + 464 + 4 * k)))
        e(In.create_mem_reg(C.MOV_RM32_R32, M(displ=out + 8 + 4 * k, displ_size=4), R.ECX))
    mov(R.EAX, 4)  # write(1, out, 32)
    mov(R.EBX, 1)
    mov(R.ECX, out)
    mov(R.EDX, 32)
    int80()
    mov(R.EAX, 252)
    mov(R.EBX, 0)
    int80()
    enc = BlockEncoder(32)
    enc.add_many(items)
    entry = _IA32_BASE + 52 + 32
    code = enc.encode(entry)
    ips = [i.ip for i in Decoder(32, code, ip=entry)]
    return code, ips[marks["handler"]]


def ia32_sigframe() -> Ia32Frame:
    """Run a minimal static 32-bit ELF that sends itself SIGUSR1 through a handler without
    SA_SIGINFO, so the kernel builds ``struct sigframe_ia32`` (ia32_setup_frame,
    arch/x86/kernel/signal_32.c), and report where the handler found it."""
    _, handler = _ia32_code(0)
    code, again = _ia32_code(handler)
    assert again == handler, "handler moved between encodings"
    entry = _IA32_BASE + 52 + 32
    elf = static_elf32({entry: code}, entry=entry, memsz=_IA32_BSS - _IA32_BASE + 0x1000,
                       base=_IA32_BASE)
    run = run_elf32(elf, timeout=10)
    if run.returncode != 0 or len(run.stdout) != 32:
        raise HostUnavailable(f"32-bit probe failed (status {run.returncode})")
    esp, fp, magic1, ext, xf_lo, xf_hi, size, _ = struct.unpack("<8I", run.stdout)
    return Ia32Frame(esp, fp, magic1, ext, xf_lo | xf_hi << 32, size)
