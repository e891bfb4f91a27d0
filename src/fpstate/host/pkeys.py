"""Protection keys on the real kernel: pkey_alloc/pkey_free, pkey_mprotect, the execute-only
key of mprotect and mmap, mprotect over a hole, and the keys across fork -- the host side of
fpstate.kernel.x86.pkeys.

Each probe runs in a forked child (so that this process's keys and PKRU stay as they are),
reads PKRU with RDPKRU in machine code, the keys of mappings from /proc/self/smaps and their
protections from /proc/self/maps, and hands its answers back through shared memory
(`_Answers`), by the names of its ``*_FACTS`` table; the kernel conform cases
(fpstate.kernel.x86.conform_process) replay each on the model.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Callable

from fpstate.errors import HostUnavailable
from fpstate.host.child import (
    PAGE,
    SYS,
    Asm,
    ChildExit,
    CodePages,
    SharedMemory,
    raw_syscall,
    run_child,
)


class _Answers:
    """The answers of a forked probe, in shared memory: slot n answers ``names[n]`` (None is
    written as -99), ``extra`` more values follow, then a flag the probe sets when it got to
    its end (`finish`)."""

    def __init__(self, names: tuple[str, ...], extra: int = 0) -> None:
        self.names, self.extra, self.next = names, extra, 0
        self.shm = SharedMemory(8 * (len(names) + extra + 1))

    def put(self, value: int | None, n: int | None = None) -> None:
        """Answer slot ``n`` (default: the one after the last put in this process)."""
        n = self.next if n is None else n
        struct.pack_into("<q", self.shm.mem, 8 * n, -99 if value is None else value)
        self.next = n + 1

    def finish(self, *extra: int) -> None:
        at = len(self.names)
        for k, value in enumerate(extra):
            struct.pack_into("<q", self.shm.mem, 8 * (at + k), value)
        struct.pack_into("<q", self.shm.mem, 8 * (at + self.extra), 1)

    def collect(self, ex: ChildExit, what: str) -> tuple[dict[str, int], tuple[int, ...]]:
        """(answers by name, the extra values); HostUnavailable if the probe did not finish."""
        words = struct.unpack_from(f"<{len(self.names) + self.extra + 1}q", self.shm.mem)
        if ex.exit_code != 0 or words[-1] != 1:
            raise HostUnavailable(f"the {what} probe ended with {ex}")
        return dict(zip(self.names, words, strict=False)), words[len(self.names):-1]


def _pkey_rights_reader(code: CodePages, index: int) -> Callable[[int], int]:
    """A function giving protection key k's two PKRU bits (AD = 1, WD = 2) as RDPKRU reads
    them, its code on page ``index`` of ``code``."""
    read = Asm()
    read.rdpkru()
    read.emit(read.In.create(read.C.RETNQ))
    at = code.place(index, read)
    return lambda key: code.call(at) >> (2 * key) & 3


# -- protection keys across fork -------------------------------------------------------------

#: The keys of `pkey_inheritance`'s answer, in the order the probe writes them.
PKEY_FACTS = ("parent pkey_alloc", "parent mapping ProtectionKey",
              "child mapping ProtectionKey", "child pkey_alloc", "child pkey_free(parent key)",
              "parent pkey_mprotect(parent key) after the child freed it",
              "parent pkey_alloc after the child's")


def smaps_pkey(address: int) -> int | None:
    """The ProtectionKey of the mapping that starts at ``address``, from /proc/self/smaps
    (task_mmu.c arch_show_smap: shown where the CPU has protection keys), or None."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and ":" not in head:
                inside = int(head.split("-")[0], 16) == address
            elif inside and line.startswith("ProtectionKey:"):
                return int(line.split()[1])
    return None


def maps_prot(address: int) -> int | None:
    """The PROT_* bits (PROT_READ 1, PROT_WRITE 2, PROT_EXEC 4) of the mapping that starts at
    ``address``, from its permissions in /proc/self/maps, or None."""
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            if int(span.split("-")[0], 16) == address:
                return sum(bit for ch, bit in zip(perms[:3], (1, 2, 4), strict=True) if ch != "-")
    return None


def pkey_inheritance(timeout: float = 20.0) -> dict[str, int]:
    """A protection key across fork, on the real kernel. In a forked child: pkey_alloc(0, 0),
    a two-page mapping given the key (pkey_mprotect), then fork; the new process reads the
    mapping's key (smaps), allocates a key and frees the parent's; the parent, once the child
    has exited, gives the mapping its key again (is it still allocated there?) and allocates
    one more. Answers by `PKEY_FACTS` (negative: -errno). Kernel paths: mm_pkey_alloc
    and arch_set_user_pkey_access, do_mprotect_pkey, dup_mmap / arch_dup_pkeys (the VMA keys
    and the allocation map are copied into the child's mm), mm_pkey_free."""
    import mmap as _mmap

    answers = _Answers(PKEY_FACTS)
    rw = _mmap.PROT_READ | _mmap.PROT_WRITE

    def put(n: int, value: int | None) -> None:
        answers.put(value, n)

    def body() -> int:
        key = raw_syscall(SYS["pkey_alloc"], 0, 0)
        put(0, key)
        if key < 0:
            return 3
        region = _mmap.mmap(-1, 2 * PAGE, prot=rw)
        base = ctypes.addressof(ctypes.c_char.from_buffer(region))
        if raw_syscall(SYS["pkey_mprotect"], base, 2 * PAGE, rw, key):
            return 4
        put(1, smaps_pkey(base))
        pid = os.fork()
        if pid == 0:
            try:
                put(2, smaps_pkey(base))
                put(3, raw_syscall(SYS["pkey_alloc"], 0, 0))
                put(4, raw_syscall(SYS["pkey_free"], key))
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        put(5, raw_syscall(SYS["pkey_mprotect"], base, PAGE, rw, key))
        put(6, raw_syscall(SYS["pkey_alloc"], 0, 0))
        answers.finish()
        return 0

    return answers.collect(run_child(body, timeout), "protection-key fork")[0]


# -- the execute-only protection key ---------------------------------------------------------------

#: The keys of `execute_only_keys`'s answer, in the order the probe writes them (A, B and C are
#: three one-page mappings; "rights" are the execute-only key's two PKRU bits, AD = 1, WD = 2).
EXEC_ONLY_FACTS = (
    "rights of the first free key before", "mprotect(A, PROT_EXEC)", "A ProtectionKey",
    "rights after mprotect(A, PROT_EXEC)", "pkey_alloc after it",
    "mprotect(B, PROT_EXEC) with the key opened", "B ProtectionKey",
    "rights after mprotect(B, PROT_EXEC)",
    "mprotect(A, PROT_READ)", "A ProtectionKey after PROT_READ",
    "mprotect(A, PROT_READ | PROT_EXEC)", "A ProtectionKey after PROT_READ | PROT_EXEC",
    "pkey_mprotect(B, PROT_EXEC, pkey_alloc's key)", "B ProtectionKey after it",
    "mprotect(B, PROT_READ)", "B ProtectionKey after PROT_READ",
    "pkey_free(execute-only key)", "pkey_alloc after the free",
    "rights after that pkey_alloc", "mprotect(C, PROT_EXEC)", "C ProtectionKey",
    "rights after mprotect(C, PROT_EXEC)",
)


def execute_only_keys(timeout: float = 20.0) -> dict[str, int]:
    """The execute-only protection key on the real kernel, in a forked child with three
    one-page mappings A, B and C: mprotect(PROT_EXEC) of A takes the mm's execute-only key and
    denies it in the caller's PKRU; a later one (B) after the thread opened the key denies it
    again; PROT_READ gives A key 0 again; an explicit pkey_mprotect key wins; pkey_free of the
    execute-only key is refused (it is not the user's) and pkey_alloc passes it over; the next
    mprotect(PROT_EXEC) (C) still uses it and denies it. Answers by `EXEC_ONLY_FACTS` (negative:
    -errno). Kernel paths: do_mprotect_pkey, arch_override_mprotect_pkey,
    __execute_only_pkey, arch_set_user_pkey_access (arch/x86/mm/pkeys.c)."""
    import mmap as _mmap

    answers = _Answers(EXEC_ONLY_FACTS)
    put = answers.put
    rw, r, x = _mmap.PROT_READ | _mmap.PROT_WRITE, _mmap.PROT_READ, _mmap.PROT_EXEC

    def body() -> int:
        code = CodePages(2)
        rights = _pkey_rights_reader(code, 0)
        regions = [_mmap.mmap(-1, PAGE, prot=rw) for _ in range(3)]
        a, b, c = (ctypes.addressof(ctypes.c_char.from_buffer(m)) for m in regions)
        first = raw_syscall(SYS["pkey_alloc"], 0, 0)  # the lowest free key, given back
        if first < 0 or raw_syscall(SYS["pkey_free"], first):
            return 3
        put(rights(first))
        put(raw_syscall(SYS["mprotect"], a, PAGE, x))
        key = smaps_pkey(a)
        put(key)
        if key is None or key <= 0:
            return 4
        put(rights(key))
        other = raw_syscall(SYS["pkey_alloc"], 0, 0)
        put(other)
        opener = Asm()  # the thread opens the execute-only key
        opener.set_pkey_rights(key, 0)
        opener.emit(opener.In.create(opener.C.RETNQ))
        code.call(code.place(1, opener))
        put(raw_syscall(SYS["mprotect"], b, PAGE, x))
        put(smaps_pkey(b))
        put(rights(key))
        put(raw_syscall(SYS["mprotect"], a, PAGE, r))
        put(smaps_pkey(a))
        put(raw_syscall(SYS["mprotect"], a, PAGE, r | x))
        put(smaps_pkey(a))
        put(raw_syscall(SYS["pkey_mprotect"], b, PAGE, x, other))
        put(smaps_pkey(b))
        put(raw_syscall(SYS["mprotect"], b, PAGE, r))
        put(smaps_pkey(b))
        put(raw_syscall(SYS["pkey_free"], key))
        put(raw_syscall(SYS["pkey_alloc"], 0, 0))
        put(rights(key))
        put(raw_syscall(SYS["mprotect"], c, PAGE, x))
        put(smaps_pkey(c))
        put(rights(key))
        answers.finish()
        return 0

    return answers.collect(run_child(body, timeout), "execute-only key")[0]


# -- pkey_alloc's rights and limits ----------------------------------------------------------------

#: The keys of `pkey_alloc_rights`'s answer, in order ("rights k": key k's two PKRU bits, AD = 1,
#: WD = 2, read with RDPKRU right after the call; "first" is the first key the probe got).
PKEY_ALLOC_FACTS = (
    "pkey_alloc(flags 1, 0)", "pkey_alloc(0, init_val 4)",
    "pkey_alloc(0, PKEY_DISABLE_ACCESS) - first", "rights after it",
    "pkey_alloc(0, PKEY_DISABLE_WRITE) - first", "rights after it (WD)",
    "pkey_alloc(0, both) - first", "rights after it (both)",
    "pkey_free(second key)", "its rights after the free",
    "pkey_alloc(0, 0) after the free - first", "rights after it (open)",
    "pkey_free(16)", "pkey_free(-1)", "keys pkey_alloc gave until it failed",
    "the errno it failed with", "pkey_free(0)", "pkey_alloc(0, 0) after freeing key 0",
    "key 0's rights after it",
)


def pkey_alloc_rights(timeout: float = 20.0) -> dict[str, int]:
    """pkey_alloc(2) and pkey_free(2) on the real kernel, in a forked child: the refused flags
    and init_val bits, the PKRU rights each init_val gives the new key (RDPKRU after the
    call), a freed key handed out again with new rights, the keys left until ENOSPC, and key
    0 freed and allocated again. Answers by `PKEY_ALLOC_FACTS` (negative: -errno; keys are
    relative to the first the probe got, which the process it was forked from decides).
    Kernel paths: sys_pkey_alloc, mm_pkey_alloc, arch_set_user_pkey_access, sys_pkey_free,
    mm_pkey_free (arch/x86/include/asm/pkeys.h, mm/mprotect.c)."""
    answers = _Answers(PKEY_ALLOC_FACTS, extra=1)
    put = answers.put

    def body() -> int:
        rights = _pkey_rights_reader(CodePages(1), 0)

        def alloc(init_val: int) -> int:
            return raw_syscall(SYS["pkey_alloc"], 0, init_val)

        put(raw_syscall(SYS["pkey_alloc"], 1, 0))
        put(alloc(4))
        first = alloc(1)
        if first <= 0:
            return 3
        put(0)
        put(rights(first))
        second = alloc(2)
        put(second - first)
        put(rights(second))
        third = alloc(3)
        put(third - first)
        put(rights(third))
        put(raw_syscall(SYS["pkey_free"], second))
        put(rights(second))
        again = alloc(0)
        put(again - first)
        put(rights(again))
        put(raw_syscall(SYS["pkey_free"], 16))
        put(raw_syscall(SYS["pkey_free"], -1))
        n, ret = 0, 0
        while n < 16:
            ret = alloc(0)
            if ret < 0:
                break
            n += 1
        put(n)
        put(ret)
        put(raw_syscall(SYS["pkey_free"], 0))
        put(alloc(0))  # key 0 again, its rights open (init_val 0): the probe keeps running
        put(rights(0))
        answers.finish(first)
        return 0

    facts, (first,) = answers.collect(run_child(body, timeout), "pkey_alloc")
    facts["first key"] = first
    return facts


# -- mprotect over a hole ----------------------------------------------------------------------

#: The keys of `mprotect_over_hole`'s answer, in the order the probe writes them. A is a
#: one-page mapping, then a one-page hole, then C, two pages (with a hole on either side of
#: the whole, so that no neighbour merges with them); "key" is the key the probe allocated.
HOLE_FACTS = (
    "pkey_alloc", "pkey_mprotect(A..C, key)", "A ProtectionKey after it",
    "C ProtectionKey after it", "pkey_mprotect(hole..C, key)", "C ProtectionKey after that",
    "mprotect(A + hole, PROT_EXEC)", "A ProtectionKey after PROT_EXEC",
    "rights of A's key after PROT_EXEC", "mprotect(A..C, PROT_READ)",
    "A ProtectionKey after PROT_READ", "A PROT_* after PROT_READ", "C PROT_* after PROT_READ",
)


def mprotect_over_hole(timeout: float = 20.0) -> dict[str, int]:
    """mprotect(2) and pkey_mprotect(2) over a range with a hole, on the real kernel, in a
    forked child: do_mprotect_pkey() changes the mappings it meets before the hole and only
    then returns ENOMEM (the changes stay), refuses at once a range whose start lies in a
    hole, and for PROT_EXEC alone writes the caller's PKRU (the execute-only key's AD) even
    when it returns ENOMEM. Answers by `HOLE_FACTS` (negative: -errno; keys absolute;
    protections as /proc/self/maps shows them).
    Kernel paths: do_mprotect_pkey (its vma_find, the ``vma->vm_start != tmp`` break and
    the final ``tmp < end``), arch_override_mprotect_pkey, mprotect_fixup."""
    import mmap as _mmap

    answers = _Answers(HOLE_FACTS)
    put = answers.put
    rw, r, x = _mmap.PROT_READ | _mmap.PROT_WRITE, _mmap.PROT_READ, _mmap.PROT_EXEC

    def body() -> int:
        rights = _pkey_rights_reader(CodePages(1), 0)
        region = _mmap.mmap(-1, 6 * PAGE, prot=rw)
        base = ctypes.addressof(ctypes.c_char.from_buffer(region))
        a, hole, c = base + PAGE, base + 2 * PAGE, base + 3 * PAGE
        for gap in (base, hole, base + 5 * PAGE):  # guards below A and above C, and the hole
            if raw_syscall(SYS["munmap"], gap, PAGE) != 0:
                return 3
        key = raw_syscall(SYS["pkey_alloc"], 0, 0)
        put(key)
        if key <= 0:
            return 4
        put(raw_syscall(SYS["pkey_mprotect"], a, 4 * PAGE, rw, key))
        put(smaps_pkey(a))
        put(smaps_pkey(c))
        put(raw_syscall(SYS["pkey_mprotect"], hole, 3 * PAGE, rw, key))
        put(smaps_pkey(c))
        put(raw_syscall(SYS["mprotect"], a, 2 * PAGE, x))
        got = smaps_pkey(a)
        put(got)
        put(rights(got) if got is not None else None)
        put(raw_syscall(SYS["mprotect"], a, 4 * PAGE, r))
        put(smaps_pkey(a))
        put(maps_prot(a))
        put(maps_prot(c))
        answers.finish()
        return 0

    return answers.collect(run_child(body, timeout), "mprotect over a hole")[0]


# -- mmap(PROT_EXEC) -----------------------------------------------------------------------------

#: The keys of `mmap_execute_only`'s answer, in the order the probe writes them ("x" is the
#: execute-only key; "rights": its two PKRU bits, AD = 1, WD = 2).
MMAP_EXEC_FACTS = (
    "first free key", "mmap(0 bytes)", "mmap(PROT_EXEC) ProtectionKey", "rights after it",
    "mmap(PROT_EXEC) with x opened: ProtectionKey", "rights after that",
    "mmap(PROT_READ | PROT_EXEC) ProtectionKey", "pkey_alloc after them",
    "mprotect(first, PROT_READ)", "first's ProtectionKey after PROT_READ",
)

MAP_PRIVATE, MAP_ANONYMOUS = 0x02, 0x20


def mmap_execute_only(timeout: float = 20.0) -> dict[str, int]:
    """mmap(2) with PROT_EXEC alone on the real kernel, in a forked child: the new mapping
    gets the mm's execute-only key and the caller's PKRU denies it (AD), again after the
    thread opened it; PROT_READ | PROT_EXEC is an ordinary mapping (key 0); the execute-only
    key is taken in the allocation map; leaving execute-only with mprotect gives the mapping
    key 0. Answers by `MMAP_EXEC_FACTS` (negative: -errno; keys absolute). Kernel paths:
    do_mmap (``prot == PROT_EXEC``: execute_only_pkey), __execute_only_pkey,
    arch_override_mprotect_pkey."""
    import mmap as _mmap

    answers = _Answers(MMAP_EXEC_FACTS)
    put = answers.put
    r, x = _mmap.PROT_READ, _mmap.PROT_EXEC

    def anon(length: int, prot: int) -> int:
        return raw_syscall(SYS["mmap"], 0, length, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)

    def body() -> int:
        code = CodePages(2)
        rights = _pkey_rights_reader(code, 0)
        first = raw_syscall(SYS["pkey_alloc"], 0, 0)  # the lowest free key, given back
        if first <= 0 or raw_syscall(SYS["pkey_free"], first):
            return 3
        put(first)
        put(anon(0, x))
        one = anon(PAGE, x)
        key = smaps_pkey(one) if one > 0 else None
        put(key)
        if key is None or key <= 0:
            return 4
        put(rights(key))
        opener = Asm()  # the thread opens the execute-only key
        opener.set_pkey_rights(key, 0)
        opener.emit(opener.In.create(opener.C.RETNQ))
        code.call(code.place(1, opener))
        two = anon(PAGE, x)
        put(smaps_pkey(two) if two > 0 else two)
        put(rights(key))
        three = anon(PAGE, r | x)
        put(smaps_pkey(three) if three > 0 else three)
        put(raw_syscall(SYS["pkey_alloc"], 0, 0))
        put(raw_syscall(SYS["mprotect"], one, PAGE, r))
        put(smaps_pkey(one))
        answers.finish()
        return 0

    return answers.collect(run_child(body, timeout), "mmap(PROT_EXEC)")[0]
