"""Memory protection keys of a process: pkey_alloc(2), pkey_free(2), pkey_mprotect(2) and
mprotect(2).

Twin of arch/x86/mm/pkeys.c (arch_set_user_pkey_access), arch/x86/include/asm/pkeys.h (the
mm's allocation map) and the pkey system calls of mm/mprotect.c, as far as the FPU code
meets them: PKRU is XSAVE-managed user state (component 9), and the kernel's own accesses to
user memory -- the signal frame it XSAVEs to, the frame sigreturn reads -- run under the PKRU
in the register, so a key the task denied itself can make them fault (fpstate.kernel.x86.mm
checks every access given a PKRU). That is why v6.12's get_sigframe() opens every key
(sig_prepare_pkru: WRPKRU 0) before it writes the frame, so that a sigaltstack protected by a
key the interrupted code had closed can still take the frame.

mprotect(2) and pkey_mprotect(2) set a mapping's PROT_* bits as well as its key. An
execute-only mapping (mprotect(PROT_EXEC) without a key) gets the mm's execute-only key
(execute_only_pkey(): allocated from the same map as pkey_alloc's, once per mm), and the
calling thread's PKRU gets access-disable for it -- a write of XSAVE component 9 that the
thread did not ask for, made by a system call that is not about the FPU. Other threads keep
their PKRU (init_pkru_value already denies every key but 0).

A range with a hole is changed up to the hole and then refused (-ENOMEM): the mappings
before it keep their new protection and key, and the PKRU an execute-only key wrote stays.

mmap(2) with PROT_EXEC alone takes the same execute-only key (do_mmap), PKRU write included.

Not modelled: PROT_GROWSDOWN/UP, file mappings, MAP_FIXED and READ_IMPLIES_EXEC.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fpstate.kernel.x86.mm import (
    PAGE_SIZE,
    PKRU_AD_BIT,
    PKRU_WD_BIT,
    PROT_EXEC,
    PROT_READ,
    PROT_RW,
    PROT_WRITE,
)
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
    taken back, below arch_max_pkey() -- never the mm's execute-only key, which is in the
    allocation map but not the user's to pkey_mprotect() or pkey_free()."""
    if not 0 <= pkey < arch_max_pkey(c):
        return False
    mm = c.current.process.mm
    if pkey == mm.execute_only_pkey:
        return False
    return bool(mm.pkey_allocation_map >> pkey & 1)


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
    pkey = mm_pkey_alloc(c)
    if pkey < 0:
        return -ENOSPC
    ret = arch_set_user_pkey_access(c, pkey, init_val)
    if ret:
        c.current.process.mm.pkey_allocation_map &= ~(1 << pkey)  # mm_set_pkey_free()
        return ret
    return pkey


def mm_pkey_alloc(c: Cpu) -> int:
    """mm_pkey_alloc() (asm/pkeys.h): the lowest key the current mm has not allocated (ffz of
    the allocation map), now allocated; -1 when every key below arch_max_pkey() is taken."""
    mm = c.current.process.mm
    free = ~mm.pkey_allocation_map & ((1 << arch_max_pkey(c)) - 1)
    if not free:
        return -1
    pkey = (free & -free).bit_length() - 1
    mm.pkey_allocation_map |= 1 << pkey
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


#: PROT_* bits do_mprotect_pkey() accepts on x86 (arch_validate_prot(): PROT_SEM too, which
#: changes nothing here).
PROT_SEM = 0x8
_PROT_VALID = PROT_READ | PROT_WRITE | PROT_EXEC | PROT_SEM


def __pkru_allows_read(pkru: int, pkey: int) -> bool:
    """__pkru_allows_read() (asm/pkru.h): key ``pkey``'s AD bit clear."""
    return not (pkru >> (2 * pkey)) & PKRU_AD_BIT


def execute_only_pkey(c: Cpu) -> int:
    """execute_only_pkey() -> __execute_only_pkey() (arch/x86/mm/pkeys.c): 0 without OSPKE;
    the mm's execute-only key, allocated (the lowest free, as mm_pkey_alloc() gives; -1 when
    none is left) on the first call; the calling thread's PKRU gets PKEY_DISABLE_ACCESS for it
    (arch_set_user_pkey_access), skipped when the key is not newly allocated and its AD bit is
    already set."""
    if not c.m.system.ospke:
        return 0
    mm = c.current.process.mm
    key = mm.execute_only_pkey
    new = key == -1
    if new:
        key = mm_pkey_alloc(c)
        if key < 0:
            return -1
    elif not __pkru_allows_read(read_pkru(c), key):
        return key
    if arch_set_user_pkey_access(c, key, PKEY_DISABLE_ACCESS):
        mm.pkey_allocation_map &= ~(1 << key)  # mm_set_pkey_free()
        return -1
    if new:
        mm.execute_only_pkey = key
    return key


def arch_override_mprotect_pkey(c: Cpu, start: int, old_prot: int, old_key: int, prot: int,
                                pkey: int) -> int:
    """arch_override_mprotect_pkey() (arch/x86/mm/pkeys.c) for the mapping at ``start``
    (``old_prot``, ``old_key``): pkey_mprotect()'s key as given; PROT_EXEC alone takes the
    execute-only key (when there is one); a mapping leaving execute-only with the
    execute-only key goes back to key 0 (vma_is_pkey_exec_only); otherwise the mapping keeps
    its key. Without OSPKE every mapping has key 0."""
    if not c.m.system.ospke:
        return ARCH_DEFAULT_PKEY
    if pkey != -1:
        return pkey
    if prot == PROT_EXEC:
        key = execute_only_pkey(c)
        if key > 0:
            return key
    elif (old_prot & (PROT_RW | PROT_EXEC)) == PROT_EXEC \
            and old_key == c.current.process.mm.execute_only_pkey:
        return ARCH_DEFAULT_PKEY
    return old_key


def do_mprotect_pkey(c: Cpu, start: int, length: int, prot: int, pkey: int) -> int:
    """do_mprotect_pkey() (mm/mprotect.c): -EINVAL for a start not page aligned or unknown
    PROT_* bits (arch_validate_prot), 0 for length 0, -EINVAL for a key (other than -1) not
    allocated, -ENOMEM at once when ``start`` lies in no mapping (vma_find, ``vma->vm_start >
    start``). Otherwise each mapping of [start, start + length rounded up to pages) gets, in
    address order, ``prot`` and the key `arch_override_mprotect_pkey` picks for it (split at
    the range's ends, as mprotect_fixup() splits VMAs) until a hole: then -ENOMEM, the
    mappings before the hole keeping their change (the loop's ``vma->vm_start != tmp`` break,
    or ``tmp < end`` after it), and so does the PKRU an execute-only key wrote."""
    if start % PAGE_SIZE:
        return -EINVAL
    if not length:
        return 0
    length = (length + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
    if prot & ~_PROT_VALID:
        return -EINVAL
    prot &= ~PROT_SEM
    if pkey != -1 and not mm_pkey_is_allocated(c, pkey):
        return -EINVAL
    mm = c.current.process.mm
    end = start + length
    at = start
    while at < end:
        hit = mm.region_at(at)
        if hit is None:
            return -ENOMEM
        s, n = hit
        key = arch_override_mprotect_pkey(c, s, mm.prots.get(s, PROT_RW), mm.pkeys.get(s, 0),
                                          prot, pkey)
        upto = min(s + n, end)
        mm.mprotect_fixup(at, upto - at, key, prot)
        at = upto
    return 0


def sys_mmap(c: Cpu, length: int, prot: int = PROT_RW) -> KPath:
    """mmap(2) of anonymous private memory at an address the kernel picks (do_mmap,
    mm/mmap.c, as far as keys go): -EINVAL for length 0; PROT_EXEC alone gives the new
    mapping the mm's execute-only key (`execute_only_pkey`, with its PKRU write to the
    calling thread; key 0 when none is left); returns the address."""
    if False:  # pragma: no cover
        yield
    if not length:
        return -EINVAL
    key = max(execute_only_pkey(c), 0) if prot == PROT_EXEC else 0
    t = c.current
    addr = c.m.mmap(t, length)
    if key or prot != PROT_RW:
        size = (length + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
        t.process.mm.mprotect_fixup(addr, size, key, prot)
    return addr


def sys_mprotect(c: Cpu, start: int, length: int, prot: int) -> KPath:
    """mprotect(2): do_mprotect_pkey() with pkey -1 (the key a mapping has, or the
    execute-only key for PROT_EXEC alone)."""
    if False:  # pragma: no cover
        yield
    return do_mprotect_pkey(c, start, length, prot, -1)


def sys_pkey_mprotect(c: Cpu, start: int, length: int, pkey: int,
                      prot: int = PROT_RW) -> KPath:
    """pkey_mprotect(2) (do_mprotect_pkey with the key; read-write unless ``prot`` says
    otherwise): -EINVAL for a start not page aligned or a key not allocated, 0 for length 0;
    else every mapping there gets key ``pkey``, up to a hole, where it returns -ENOMEM
    (`do_mprotect_pkey`)."""
    if False:  # pragma: no cover
        yield
    return do_mprotect_pkey(c, start, length, prot, pkey)


__all__ = [
    "ARCH_DEFAULT_PKEY",
    "PKEY_ACCESS_MASK",
    "PKEY_DISABLE_ACCESS",
    "PKEY_DISABLE_WRITE",
    "arch_max_pkey",
    "arch_override_mprotect_pkey",
    "arch_set_user_pkey_access",
    "do_mprotect_pkey",
    "execute_only_pkey",
    "mm_pkey_alloc",
    "mm_pkey_is_allocated",
    "sys_mmap",
    "sys_mprotect",
    "sys_pkey_alloc",
    "sys_pkey_free",
    "sys_pkey_mprotect",
]
