"""Memory protection keys of a process: pkey_alloc(2), pkey_free(2) and pkey_mprotect(2).

Twin of arch/x86/mm/pkeys.c (arch_set_user_pkey_access), arch/x86/include/asm/pkeys.h (the
mm's allocation map) and the pkey system calls of mm/mprotect.c, as far as the FPU code
meets them: PKRU is XSAVE-managed user state (component 9), and the kernel's own accesses to
user memory -- the signal frame it XSAVEs to, the frame sigreturn reads -- run under the PKRU
in the register, so a key the task denied itself can make them fault (fpstate.kernel.x86.mm
checks every access given a PKRU). That is why v6.12's get_sigframe() opens every key
(sig_prepare_pkru: WRPKRU 0) before it writes the frame, so that a sigaltstack protected by a
key the interrupted code had closed can still take the frame.

Not modelled: the execute-only key (mprotect(PROT_EXEC) without a key; no mapping of the model
is executable) and PROT_* other than read/write (the model's mappings are read-write; pkey_mprotect
only changes their key here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fpstate.kernel.x86.mm import PAGE_SIZE, PKRU_AD_BIT, PKRU_WD_BIT
from fpstate.kernel.x86.signal import read_pkru, write_pkru
from fpstate.kernel.x86.xstate_prctl import EINVAL, ENOMEM, ENOSPC

if TYPE_CHECKING:
    from fpstate.kernel.x86.context import KPath
    from fpstate.kernel.x86.sched import Cpu

#: include/uapi/asm-generic/mman-common.h: the init_val bits of pkey_alloc().
PKEY_DISABLE_ACCESS, PKEY_DISABLE_WRITE = 0x1, 0x2
PKEY_ACCESS_MASK = PKEY_DISABLE_ACCESS | PKEY_DISABLE_WRITE
#: The key every mapping has until pkey_mprotect() gives it another (ARCH_DEFAULT_PKEY).
ARCH_DEFAULT_PKEY = 0


def arch_max_pkey(c: Cpu) -> int:
    """arch_max_pkey(): 16 keys with OSPKE, else 1 (key 0 only)."""
    return 16 if c.m.system.ospke else 1


def mm_pkey_is_allocated(c: Cpu, pkey: int) -> bool:
    """mm_pkey_is_allocated(): key 0, or a key pkey_alloc() returned and pkey_free() has not
    taken back, below arch_max_pkey()."""
    if not 0 <= pkey < arch_max_pkey(c):
        return False
    return bool(c.current.process.mm.pkey_allocation_map >> pkey & 1)


def arch_set_user_pkey_access(c: Cpu, pkey: int, init_val: int) -> int:
    """arch_set_user_pkey_access(): set key ``pkey``'s two PKRU bits in the register of the
    calling thread (AD for PKEY_DISABLE_ACCESS, WD for PKEY_DISABLE_WRITE); -EINVAL without
    OSPKE. Other threads keep their PKRU: the rights are per thread."""
    if not c.m.system.ospke:
        return -EINVAL
    bits = (PKRU_AD_BIT if init_val & PKEY_DISABLE_ACCESS else 0) \
        | (PKRU_WD_BIT if init_val & PKEY_DISABLE_WRITE else 0)
    pkru = read_pkru(c) & ~((PKRU_AD_BIT | PKRU_WD_BIT) << (2 * pkey))
    write_pkru(c, pkru | bits << (2 * pkey))
    return 0


def sys_pkey_alloc(c: Cpu, flags: int, init_val: int) -> KPath:
    """pkey_alloc(2): -EINVAL for flags or init_val bits it does not know; the lowest free key
    (mm_pkey_alloc: ffz of the allocation map), -ENOSPC when none is left (always without
    OSPKE: key 0 is the only one and taken); the caller's PKRU gets ``init_val``'s rights for
    it."""
    if False:  # pragma: no cover - makes this a generator (a kernel path without yields)
        yield
    if flags:
        return -EINVAL
    if init_val & ~PKEY_ACCESS_MASK:
        return -EINVAL
    mm = c.current.process.mm
    every = (1 << arch_max_pkey(c)) - 1
    if mm.pkey_allocation_map == every:
        return -ENOSPC
    pkey = next(k for k in range(arch_max_pkey(c)) if not mm.pkey_allocation_map >> k & 1)
    mm.pkey_allocation_map |= 1 << pkey
    ret = arch_set_user_pkey_access(c, pkey, init_val)
    if ret:
        mm.pkey_allocation_map &= ~(1 << pkey)
        return ret
    return pkey


def sys_pkey_free(c: Cpu, pkey: int) -> KPath:
    """pkey_free(2): -EINVAL unless ``pkey`` is allocated; the mappings that still have it keep
    it (the kernel does not look for them)."""
    if False:  # pragma: no cover
        yield
    if not mm_pkey_is_allocated(c, pkey):
        return -EINVAL
    c.current.process.mm.pkey_allocation_map &= ~(1 << pkey)
    return 0


def sys_pkey_mprotect(c: Cpu, start: int, length: int, pkey: int) -> KPath:
    """pkey_mprotect(2) with PROT_READ | PROT_WRITE (do_mprotect_pkey): -EINVAL for a start not
    page aligned or a key not allocated, 0 for length 0, -ENOMEM when [start, start + length
    rounded up to pages) is not mapped throughout; else every mapping there gets key
    ``pkey`` (split at the range's ends, as mprotect_fixup() splits VMAs)."""
    if False:  # pragma: no cover
        yield
    if start % PAGE_SIZE:
        return -EINVAL
    if not length:
        return 0
    length = (length + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
    if not mm_pkey_is_allocated(c, pkey):
        return -EINVAL
    mm = c.current.process.mm
    if not mm.mapped(start, length):
        return -ENOMEM
    mm.set_pkey(start, length, pkey)
    return 0


__all__ = [
    "ARCH_DEFAULT_PKEY",
    "PKEY_ACCESS_MASK",
    "PKEY_DISABLE_ACCESS",
    "PKEY_DISABLE_WRITE",
    "arch_max_pkey",
    "arch_set_user_pkey_access",
    "mm_pkey_is_allocated",
    "sys_pkey_alloc",
    "sys_pkey_free",
    "sys_pkey_mprotect",
]
