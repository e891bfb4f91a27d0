"""A process's user address space, as far as the FPU code touches it (signal frames, the
arch_prctl and sigaltstack buffers, the stacks).

Split out of `fpstate.kernel.x86.hw` (which re-exports it): what is mapped where, which pages
are not faulted in yet, and the bytes. Rules of this file:
- an access may run through several adjacent mappings, as user accesses do (the page tables
  know no VMA boundary): each mapping's part is checked against that mapping's protection
  and key, and the first byte that no mapping holds or whose mapping denies the access
  faults (`PageFault` with that address: CR2, the #PF the callers turn into a fault value
  or -EFAULT). `read`, `write` and `probe` then store or return nothing; `copy_to_user`
  stores up to that byte, as the kernel's copy fixup leaves it. mprotect merges adjacent
  mappings whose protection and key agree again (vma_merge);
- a page in ``not_present`` is mapped but not faulted in: an access with page faults disabled
  (pagefault_disable()) fails there, one with page faults enabled (__clear_user,
  fault_in_readable) faults it in;
- a fresh mapping reads as zeros, as anonymous memory does. Only the pages ever written to are
  stored, so a fork copies and a checker's clone pickles a few pages per process, not every
  mapped stack;
- a mapping is readable and writable unless mprotect() said otherwise (``prots``): a store to
  a mapping without PROT_WRITE faults, and so does any access to a PROT_NONE one (x86 page
  tables cannot deny reads of an executable page: PROT_EXEC alone reads);
- a mapping has a protection key (0 unless mprotect() gave it another, `mprotect_fixup`), and
  an access given the PKRU it runs under (``pkru``) is checked against that key's rights as
  the SDM's protection-key rules have it for user-mode addresses (Vol. 3A 4.6.2): AD denies
  every data access, WD every write (user mode, and supervisor mode with CR0.WP = 1, which
  Linux sets). Key 0, every mapping's key until pkey_mprotect() gives it another, is checked
  like any other: a thread whose PKRU denies it key 0 cannot have its stack read by
  rt_sigreturn, nor a system call's result stored in key-0 memory (the checker's PKRU
  tokens leave key 0 open, fpstate.kernel.x86.hw.token).
"""

from __future__ import annotations

from dataclasses import dataclass, field

PAGE_SIZE = 4096
#: The top of user space with 4-level paging (arch/x86/include/asm/page_64_types.h:
#: (1 << 47) - PAGE_SIZE).
TASK_SIZE_MAX = (1 << 47) - PAGE_SIZE
_ZERO_PAGE = bytes(PAGE_SIZE)


class PageFault(Exception):
    """Raised inside `UserMemory` accesses; `UserBuf` turns it into Fault("#PF"). ``pkey`` is
    the protection key of a protection-key fault (error code bit PF_PK), else None."""

    def __init__(self, addr: int, pkey: int | None = None) -> None:
        super().__init__(f"#PF at {addr:#x}" + (f" (PK, key {pkey})" if pkey is not None
                                                 else ""))
        self.addr = addr
        self.pkey = pkey

    def __reduce__(self) -> tuple[type[PageFault], tuple[int, int | None]]:
        """Picklable by its fields (a worker process's exception reaches the explorer)."""
        return (type(self), (self.addr, self.pkey))


#: PKRU's two bits of key k: AD (bit 2k) and WD (bit 2k+1).
PKRU_AD_BIT, PKRU_WD_BIT = 0x1, 0x2
PKRU_KEY0_BITS = PKRU_AD_BIT | PKRU_WD_BIT  #: key 0's rights in PKRU
#: include/uapi/asm-generic/mman-common.h
PROT_NONE, PROT_READ, PROT_WRITE, PROT_EXEC = 0x0, 0x1, 0x2, 0x4
PROT_RW = PROT_READ | PROT_WRITE  #: what every mapping of the model starts with


@dataclass(slots=True, eq=False)
class UserMemory:
    """A process's user address space, as far as the FPU code touches it.

    ``regions`` maps a start address to its size in bytes: an access must lie inside
    regions that follow one another without a hole. Their contents are ``pages`` (page
    number -> its 4096 bytes) for the pages ever written to; a page never written reads as
    zeros, as anonymous memory does (so a fork, an exec or a checker's clone copies only what
    was written, not every mapped stack). Pages in ``not_present`` are mapped but not yet
    faulted in: an access with page faults disabled fails, an access with page faults enabled
    (the kernel's __clear_user / fault_in_readable) faults them in.
    """

    regions: dict[int, int] = field(default_factory=dict)
    not_present: set[int] = field(default_factory=set)
    pages: dict[int, bytearray] = field(default_factory=dict)
    #: Region start -> its protection key, for the regions whose key is not 0 (VM_PKEY_BIT*
    #: of the VMA).
    pkeys: dict[int, int] = field(default_factory=dict)
    #: mm->context.pkey_allocation_map: bit k set when key k is allocated (key 0 from the
    #: start: init_new_context() sets the map to 0x1).
    pkey_allocation_map: int = 1
    #: Region start -> its PROT_* bits, for the regions mprotect() made other than PROT_RW.
    prots: dict[int, int] = field(default_factory=dict)
    #: mm->context.execute_only_pkey: the key of the mm's execute-only mappings, -1 until
    #: the first mprotect(PROT_EXEC) takes one (init_new_context()).
    execute_only_pkey: int = -1

    def map(self, start: int, size: int) -> None:
        for s, n in self.regions.items():
            if start < s + n and s < start + size:
                raise ValueError(f"mapping {start:#x}+{size:#x} overlaps {s:#x}+{n:#x}")
        # bytearray(size) for what a zero-filled mapping of ``size`` would raise or hold
        size = size if type(size) is int and size >= 0 else len(bytearray(size))
        self.regions[start] = size
        if self.pages and size:  # bytes left by a mapping this one replaced read as zeros
            first, last = start // PAGE_SIZE, (start + size - 1) // PAGE_SIZE
            for p, page in self.pages.items():  # the pages written, not every page mapped
                if first <= p <= last:
                    base = p * PAGE_SIZE
                    lo, hi = max(start, base) - base, min(start + size, base + PAGE_SIZE) - base
                    page[lo:hi] = bytes(hi - lo)

    def copy(self) -> UserMemory:
        """dup_mmap(): the mappings, their contents, protections and keys (arch_dup_pkeys()
        copies the allocation map and the execute-only key)."""
        return UserMemory(dict(self.regions), set(self.not_present),
                          {p: bytearray(b) for p, b in self.pages.items()}, dict(self.pkeys),
                          self.pkey_allocation_map, dict(self.prots), self.execute_only_pkey)

    def contents(self) -> dict[int, bytes]:
        """Every region's bytes by start address (for tests and comparisons)."""
        return {s: self._get(s, n) for s, n in self.regions.items()}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, UserMemory):
            return NotImplemented
        return (self.regions == other.regions and self.not_present == other.not_present
                and self.pkeys == other.pkeys
                and self.pkey_allocation_map == other.pkey_allocation_map
                and self.prots == other.prots
                and self.execute_only_pkey == other.execute_only_pkey
                and self.contents() == other.contents())

    __hash__ = None  # type: ignore[assignment]

    def _locate(self, addr: int, n: int) -> int:
        """The start of the region holding [addr, addr+n); #PF if there is none."""
        for s, size in self.regions.items():
            if s <= addr and addr + n <= s + size:
                return s
        raise PageFault(addr)

    def _parts(self, addr: int, n: int) -> tuple[tuple[int, int], ...]:
        """(region start, first address in it) of each region that [addr, addr+n) runs
        through, in address order; #PF at the first byte no region holds. One region when
        the range lies in one (the common case, looked up first)."""
        try:
            return ((self._locate(addr, n), addr),)
        except PageFault:
            if n <= 0:
                raise
        parts = []
        at, end = addr, addr + n
        while at < end:
            hit = self.region_at(at)
            if hit is None:
                raise PageFault(at)
            parts.append((hit[0], at))
            at = hit[0] + hit[1]
        return tuple(parts)

    def _check(self, addr: int, n: int, write: bool, pkru: int) -> tuple[tuple[int, int], ...]:
        """The page-table and protection-key checks of an access to [addr, addr+n), part by
        part (`_parts`): #PF at the first part its mapping denies."""
        parts = self._parts(addr, n)
        if self.prots:
            for s, a in parts:
                self._prot(s, a, write)
        if pkru and (self.pkeys or pkru & PKRU_KEY0_BITS):
            for s, a in parts:
                self._pk(s, a, write, pkru)
        return parts

    @staticmethod
    def access_ok(addr: int, n: int) -> bool:
        """access_ok() on x86-64 (__access_ok, valid_user_address): whether [addr, addr+n)
        lies below TASK_SIZE_MAX -- a range check only; an unmapped part faults at the access
        itself, and a range the caller never touches may be unmapped."""
        return 0 <= addr and 0 <= n and addr + n <= TASK_SIZE_MAX

    def readable(self, addr: int, n: int, pkru: int = 0) -> bool:
        """Whether a read of [addr, addr+n) under ``pkru`` passes the mappings, protections and
        keys (`read`'s checks; pages not faulted in count as readable, nothing changes)."""
        try:
            self._check(addr, n, False, pkru)
        except PageFault:
            return False
        return True

    def in_one_mapping(self, addr: int, n: int) -> bool:
        """Whether [addr, addr+n) lies inside one mapping (a stack, for the checker's
        frame-placement rule)."""
        try:
            self._locate(addr, n)
        except PageFault:
            return False
        return True

    def _present(self, addr: int, n: int, faults_enabled: bool) -> None:
        if not self.not_present:  # every mapped page is present
            return
        pages = range(addr // PAGE_SIZE, (addr + max(n, 1) - 1) // PAGE_SIZE + 1)
        missing = [p for p in pages if p in self.not_present]
        if missing and not faults_enabled:
            raise PageFault(missing[0] * PAGE_SIZE)
        self.not_present.difference_update(missing)

    def _pk(self, start: int, addr: int, write: bool, pkru: int) -> None:
        """The protection-key check of an access at ``addr`` to the region at ``start``
        under ``pkru`` (SDM Vol. 3A 4.6.2; a mapping without a key of its own has key 0)."""
        key = self.pkeys.get(start, 0)
        if (pkru >> (2 * key)) & (PKRU_AD_BIT | PKRU_WD_BIT if write else PKRU_AD_BIT):
            raise PageFault(addr, key)

    def _prot(self, start: int, addr: int, write: bool) -> None:
        """The page-table check of an access at ``addr`` to the region at ``start``: a store
        needs PROT_WRITE, any access some PROT_* bit (see the module docstring)."""
        prot = self.prots.get(start, PROT_RW)
        if not prot & (PROT_WRITE if write else PROT_READ | PROT_WRITE | PROT_EXEC):
            raise PageFault(addr)

    def key_allows(self, addr: int, write: bool, pkru: int) -> bool:
        """Whether ``pkru`` lets an access (a store when ``write``) at the mapped ``addr``
        through its mapping's protection key (`_pk`; nothing else is checked or changed)."""
        try:
            self._pk(self._locate(addr, 1), addr, write, pkru)
        except PageFault:
            return False
        return True

    def probe(self, addr: int, n: int, *, faults_enabled: bool = True, write: bool = False,
              pkru: int = 0) -> None:
        """What `read` (``write`` False) or `write` checks, without the bytes: #PF
        (`PageFault`) where the access would fault, and the pages it would fault in are
        faulted in."""
        self._check(addr, n, write, pkru)
        self._present(addr, n, faults_enabled)

    def mprotect_fixup(self, start: int, size: int, key: int, prot: int = PROT_RW) -> None:
        """mprotect_fixup() of [start, start+size) with new VM_READ/WRITE/EXEC and
        VM_PKEY_BIT* values: the regions it covers, split at its ends, get protection ``prot``
        and key ``key``. The range must be mapped throughout (the caller, do_mprotect_pkey(),
        returns -ENOMEM otherwise)."""
        end = start + size
        for s, n in sorted(self.regions.items()):
            if s >= end or s + n <= start:
                continue
            k = self.pkeys.pop(s, 0)
            p = self.prots.pop(s, PROT_RW)
            del self.regions[s]
            for lo, hi, key_of, prot_of in ((s, max(s, start), k, p),
                                            (max(s, start), min(s + n, end), key, prot),
                                            (min(s + n, end), s + n, k, p)):
                if hi > lo:
                    self.regions[lo] = hi - lo
                    if key_of:
                        self.pkeys[lo] = key_of
                    if prot_of != PROT_RW:
                        self.prots[lo] = prot_of
        self._merge(start, end)

    def _merge(self, start: int, end: int) -> None:
        """vma_merge() after an mprotect of [start, end): adjacent regions there (and their
        neighbours) with the same protection and key become one, as the kernel merges VMAs
        whose flags now agree (a pkey_mprotect that put a split part back joins it again)."""
        for s in sorted(self.regions):
            n = self.regions.get(s)
            if n is None or s + n < start or s > end:
                continue
            nxt = s + n
            while nxt in self.regions and self.pkeys.get(nxt, 0) == self.pkeys.get(s, 0) \
                    and self.prots.get(nxt, PROT_RW) == self.prots.get(s, PROT_RW):
                n += self.regions.pop(nxt)
                self.pkeys.pop(nxt, None)
                self.prots.pop(nxt, None)
                self.regions[s] = n
                nxt = s + n

    def peek(self, addr: int, n: int) -> bytes:
        """The ``n`` bytes at ``addr`` with no check of mappings, protections or keys (what
        another process reads with process_vm_readv or PTRACE_PEEKDATA; for replays)."""
        return self._get(addr, n)

    def region_at(self, addr: int) -> tuple[int, int] | None:
        """(start, size) of the region holding ``addr``, or None."""
        for s, n in self.regions.items():
            if s <= addr < s + n:
                return s, n
        return None

    def mapped(self, start: int, size: int) -> bool:
        """Whether every byte of [start, start+size) lies in some region."""
        at, end = start, start + size
        while at < end:
            nxt = next((s + n for s, n in self.regions.items() if s <= at < s + n), None)
            if nxt is None:
                return False
            at = nxt
        return True

    def _get(self, addr: int, n: int) -> bytes:
        if n <= 0:
            return b""
        first, last = addr // PAGE_SIZE, (addr + n - 1) // PAGE_SIZE
        if first == last:
            page = self.pages.get(first)
            if page is None:
                return bytes(n)
            off = addr - first * PAGE_SIZE
            return bytes(page[off:off + n])
        out = bytearray()
        end = addr + n
        for p in range(first, last + 1):
            base = p * PAGE_SIZE
            lo, hi = max(addr, base) - base, min(end, base + PAGE_SIZE) - base
            page = self.pages.get(p)
            out += page[lo:hi] if page is not None else bytes(hi - lo)
        return bytes(out)

    def read(self, addr: int, n: int, *, faults_enabled: bool = True, pkru: int = 0) -> bytes:
        """The ``n`` bytes at ``addr`` (copy_from_user, get_user, XRSTOR's loads), or #PF
        (`PageFault`) at the first byte whose mapping, protection or key (under ``pkru``)
        denies the read (see the module docstring)."""
        parts = self._check(addr, n, False, pkru)
        self._present(addr, n, faults_enabled)
        if n < 0:  # a slice of the region's bytes ending before its start, as Python has it
            s = parts[0][0]
            return bytes(self._get(s, self.regions[s])[addr - s:addr - s + n])
        return self._get(addr, n)

    def write(self, addr: int, data: bytes, *, faults_enabled: bool = True,
              pkru: int = 0) -> None:
        """Store ``data`` at ``addr`` (put_user, XSAVE's stores, __clear_user), or #PF at the
        first byte whose mapping denies the store, with nothing stored."""
        n = len(data)
        self._check(addr, n, True, pkru)
        self._present(addr, n, faults_enabled)
        self._put(addr, data, n)

    def copy_to_user(self, addr: int, data: bytes, *, pkru: int = 0) -> int:
        """copy_to_user(): store ``data`` at ``addr`` mapping by mapping, stopping at the
        first byte whose page faults (no mapping, no PROT_WRITE, or a key ``pkru`` denies);
        the bytes before it stay written, as x86's copy_user fault fixup leaves them. Returns
        the number of bytes not copied (0: all)."""
        at, end = addr, addr + len(data)
        while at < end:
            hit = self.region_at(at)
            if hit is None:
                break
            s, n = hit
            upto = min(end, s + n)
            try:
                self.write(at, data[at - addr:upto - addr], pkru=pkru)
            except PageFault:
                break
            at = upto
        return end - at

    def fits(self, addr: int, n: int) -> bool:
        """Whether every access inside [addr, addr+n) (n >= 1) would succeed, page faults
        enabled or not: the range lies in one region, read-write, and no page is waiting to be
        faulted in."""
        if self.not_present or self.prots:
            return False
        for s, size in self.regions.items():
            if s <= addr and addr + n <= s + size:
                return True
        return False

    def _put(self, addr: int, data: bytes, n: int) -> None:
        """Store ``data`` (``n`` = len(data) bytes) at ``addr``, which `write` has checked."""
        if n <= 0:
            return
        first, last = addr // PAGE_SIZE, (addr + n - 1) // PAGE_SIZE
        pages = self.pages
        if first == last:
            page = pages.get(first)
            if page is None:
                if bytes(data) == _ZERO_PAGE[:n]:  # zeros on a page never written: no change
                    return
                page = pages[first] = bytearray(PAGE_SIZE)
            off = addr - first * PAGE_SIZE
            page[off:off + n] = data
            return
        data = bytes(data)
        end = addr + n
        for p in range(first, last + 1):
            base = p * PAGE_SIZE
            lo, hi = max(addr, base), min(end, base + PAGE_SIZE)
            chunk = data[lo - addr:hi - addr]
            page = pages.get(p)
            if page is None:
                if chunk == _ZERO_PAGE[:hi - lo]:
                    continue
                page = pages[p] = bytearray(PAGE_SIZE)
            page[lo - base:hi - base] = chunk
