"""Memory protection keys in the kernel model: pkey_alloc/pkey_free/pkey_mprotect
(fpstate.kernel.x86.pkeys), the protection-key check of user accesses (fpstate.kernel.x86.mm)
and what they mean for signal frames (get_sigframe's sig_prepare_pkru, v6.12, and the rejected
design before it, variant ``sigframe-under-user-pkru``). The real kernel answers the same
questions in the conform cases sigaltstack/pkey-closed-deliver and sigreturn/pkey-closed-*
(tests/kernel/test_kernel_differential.py)."""

from __future__ import annotations

import pytest

from fpstate.kernel.x86 import signal as sg
from fpstate.kernel.x86.mm import PAGE_SIZE, PageFault, UserMemory
from fpstate.kernel.x86.pkeys import (
    PKEY_DISABLE_ACCESS,
    PKEY_DISABLE_WRITE,
    sys_pkey_alloc,
    sys_pkey_free,
    sys_pkey_mprotect,
)
from fpstate.kernel.x86.process import sys_clone
from fpstate.kernel.x86.sched import (
    SA_ONSTACK,
    SIGSEGV,
    SIGUSR1,
    Machine,
    SigAction,
    Task,
    TaskState,
)
from fpstate.kernel.x86.xstate_prctl import EINVAL, ENOMEM, ENOSPC, sys_sigaltstack

PKRU = 9
INIT_PKRU = 0x55555554  #: init_pkru_value: every key but 0 access-disabled
ALT = 0x7F00_0000_0000  #: the altstack mapping of these tests
ALT_SIZE = 16 * PAGE_SIZE


def _pkru(m: Machine) -> int:
    return int.from_bytes(m.cpus[0].regs.component(PKRU)[:4], "little")


def _task(cpu: str = "zen4", **boot: object) -> tuple[Machine, Task]:
    m = Machine.boot(cpu, ncpus=1, **boot)  # type: ignore[arg-type]
    t = m.spawn()
    m.run(0, t)
    return m, t


# -- the system calls ----------------------------------------------------------------------------


def test_pkey_alloc_hands_out_the_lowest_free_key_and_sets_its_rights_in_pkru() -> None:
    m, t = _task()
    assert _pkru(m) == INIT_PKRU
    assert m.syscall(0, sys_pkey_alloc, 0, 0) == 1
    assert _pkru(m) == INIT_PKRU & ~0xC  # key 1 opened (its AD bit was set)
    assert m.syscall(0, sys_pkey_alloc, 0, PKEY_DISABLE_WRITE) == 2
    assert _pkru(m) >> 4 & 3 == 0b10  # key 2: WD
    assert m.syscall(0, sys_pkey_alloc, 0, PKEY_DISABLE_ACCESS) == 3
    assert _pkru(m) >> 6 & 3 == 0b01  # key 3: AD
    assert t.process.mm.pkey_allocation_map == 0b1111
    assert m.syscall(0, sys_pkey_free, 2) == 0
    assert m.syscall(0, sys_pkey_alloc, 0, 0) == 2  # ffz: the freed key again


def test_pkey_alloc_errors() -> None:
    m, _ = _task()
    assert m.syscall(0, sys_pkey_alloc, 1, 0) == -EINVAL  # no flags exist
    assert m.syscall(0, sys_pkey_alloc, 0, 4) == -EINVAL  # init_val beyond PKEY_ACCESS_MASK
    assert [m.syscall(0, sys_pkey_alloc, 0, 0) for _ in range(15)] == list(range(1, 16))
    assert m.syscall(0, sys_pkey_alloc, 0, 0) == -ENOSPC  # 16 keys, all taken
    assert m.syscall(0, sys_pkey_free, 0) == 0  # key 0 is allocated like any other
    assert m.syscall(0, sys_pkey_free, 16) == -EINVAL
    assert m.syscall(0, sys_pkey_free, -1) == -EINVAL


def test_without_ospke_there_is_no_key_to_allocate() -> None:
    """arch_max_pkey() is 1 without OSPKE: key 0 is the whole map, so pkey_alloc finds none."""
    m, _ = _task("haswell")
    assert not m.system.ospke
    assert m.syscall(0, sys_pkey_alloc, 0, 0) == -ENOSPC
    assert m.syscall(0, sys_pkey_mprotect, ALT, PAGE_SIZE, 1) == -EINVAL


def test_pkey_mprotect_rules_and_vma_split() -> None:
    m, t = _task()
    mm = t.process.mm
    mm.map(ALT, ALT_SIZE)
    assert m.syscall(0, sys_pkey_mprotect, ALT, ALT_SIZE, 1) == -EINVAL  # not allocated
    key = m.syscall(0, sys_pkey_alloc, 0, 0)
    assert m.syscall(0, sys_pkey_mprotect, ALT + 1, PAGE_SIZE, key) == -EINVAL  # unaligned
    assert m.syscall(0, sys_pkey_mprotect, ALT, 0, key) == 0 and not mm.pkeys  # nothing to do
    assert m.syscall(0, sys_pkey_mprotect, ALT, ALT_SIZE + 1, key) == -ENOMEM  # past the map
    # The middle two pages: the mapping is split in three, the middle one keyed; a length
    # that is not a page multiple covers its last page.
    assert m.syscall(0, sys_pkey_mprotect, ALT + PAGE_SIZE, PAGE_SIZE + 1, key) == 0
    assert {s: n for s, n in mm.regions.items() if ALT <= s < ALT + ALT_SIZE} == {
        ALT: PAGE_SIZE, ALT + PAGE_SIZE: 2 * PAGE_SIZE,
        ALT + 3 * PAGE_SIZE: ALT_SIZE - 3 * PAGE_SIZE}
    assert mm.pkeys == {ALT + PAGE_SIZE: key}
    # Back to key 0 over all of it: the keyed piece loses its key.
    assert m.syscall(0, sys_pkey_mprotect, ALT, ALT_SIZE, 0) == 0
    assert mm.pkeys == {}


# -- the protection-key check of an access -------------------------------------------------------


def test_access_rights_of_a_keyed_mapping() -> None:
    """SDM Vol. 3A 4.6.2: AD denies every data access, WD every write; key 0 is not checked
    (the model's convention, PKRU_KEY0)."""
    mm = UserMemory()
    mm.map(ALT, PAGE_SIZE)
    mm.map(ALT + PAGE_SIZE, PAGE_SIZE)
    mm.set_pkey(ALT, PAGE_SIZE, 1)
    ad1, wd1 = 0b01 << 2, 0b10 << 2
    mm.write(ALT, b"x", pkru=wd1 << 2)  # WD of key 2: not this mapping's key
    assert mm.read(ALT, 1, pkru=wd1) == b"x"  # WD allows reads
    with pytest.raises(PageFault) as e:
        mm.write(ALT, b"y", pkru=wd1)
    assert e.value.pkey == 1 and e.value.addr == ALT
    with pytest.raises(PageFault) as e:
        mm.read(ALT + 8, 1, pkru=ad1)
    assert e.value.pkey == 1 and e.value.addr == ALT + 8
    with pytest.raises(PageFault):
        mm.probe(ALT, 1, write=True, pkru=wd1)
    mm.probe(ALT, 1, write=False, pkru=wd1)
    mm.write(ALT + PAGE_SIZE, b"z", pkru=0xFFFFFFFF)  # key 0: never checked
    assert mm.read(ALT, 1) == b"x"  # no PKRU given: no check


def test_fork_keeps_keys_and_exec_starts_over() -> None:
    """dup_mmap() copies the VMAs with their keys and arch_dup_pkeys() the allocation map; a
    new mm (exec) has key 0 only."""
    m, t = _task()
    t.process.mm.map(ALT, ALT_SIZE)
    key = m.syscall(0, sys_pkey_alloc, 0, 0)
    assert m.syscall(0, sys_pkey_mprotect, ALT, ALT_SIZE, key) == 0
    child = m.syscall(0, sys_clone, 0, "child")
    assert child.process.mm.pkeys == {ALT: key}
    assert child.process.mm.pkey_allocation_map == 0b11
    assert UserMemory().pkey_allocation_map == 1


# -- signal frames on a key-protected sigaltstack ----------------------------------------------


def _closed_altstack(variants: set[str] | None = None) -> tuple[Machine, Task, int]:
    """A task whose sigaltstack has key 1 and whose PKRU closes key 1 (AD | WD) when SIGUSR1
    (SA_ONSTACK) arrives; its PKRU then."""
    m, t = _task(variants=variants or set())
    t.process.mm.map(ALT, ALT_SIZE)
    assert m.syscall(0, sys_sigaltstack, ALT, ALT_SIZE, 0) == 0
    assert m.syscall(0, sys_pkey_alloc, 0, 0) == 1
    assert m.syscall(0, sys_pkey_mprotect, ALT, ALT_SIZE, 1) == 0
    t.handlers[SIGUSR1] = SigAction(SA_ONSTACK)
    pkru = INIT_PKRU | 0b11 << 2
    m.cpus[0].regs.wrpkru(pkru)
    return m, t, pkru


def test_v6_12_writes_the_frame_on_a_closed_keys_altstack() -> None:
    """get_sigframe() opens every key (sig_prepare_pkru) before it writes the frame; the frame
    keeps the interrupted PKRU (update_pkru_in_sigframe) and the handler starts with
    init_pkru_value."""
    m, t, pkru = _closed_altstack()
    sp = t.user_sp
    m.kill(t, SIGUSR1)
    assert t.state is TaskState.USER and ALT <= t.user_sp < ALT + ALT_SIZE
    assert _pkru(m) == INIT_PKRU
    mm = t.process.mm
    fp = int.from_bytes(mm.read(t.user_sp + sg.SC_FPSTATE_OFFSET, 8), "little")
    off = m.system.profile.component(PKRU).offset
    assert int.from_bytes(mm.read(fp + off, 4), "little") == pkru
    assert int.from_bytes(mm.read(fp + 512, 8), "little") >> PKRU & 1
    # A handler that opens the keys returns, and XRSTOR gives back the closed PKRU.
    m.cpus[0].regs.wrpkru(0)
    sg.handler_return(t)
    assert m.syscall(0, sg.sys_rt_sigreturn) == 0
    assert t.user_sp == sp and _pkru(m) == pkru


def test_sigreturn_under_the_handlers_init_pkru_cannot_read_a_closed_keys_frame() -> None:
    """The handler's PKRU (init_pkru_value) closes every key but 0: rt_sigreturn's reads of a
    frame on the keyed altstack fault, the frame is bad, and the forced SIGSEGV (no SA_ONSTACK,
    but the handler's stack pointer is on the altstack) is delivered there."""
    m, t, _ = _closed_altstack()
    t.handlers[SIGSEGV] = SigAction()
    m.kill(t, SIGUSR1)
    frame = t.user_sp
    sg.handler_return(t)
    assert m.syscall(0, sg.sys_rt_sigreturn) == -14  # -EFAULT: badframe
    assert t.state is TaskState.USER and ALT <= t.user_sp < frame
    mm = t.process.mm
    assert int.from_bytes(mm.read(t.user_sp + sg.SIGINFO_OFFSET, 4), "little") == SIGSEGV
    code = mm.read(t.user_sp + sg.SIGINFO_OFFSET + sg.SI_CODE_OFFSET, 4)
    assert int.from_bytes(code, "little") == 0x80  # SI_KERNEL: force_sig()


def test_before_v6_12_the_frame_cannot_be_written_and_the_task_dies_of_sigsegv() -> None:
    """Variant sigframe-under-user-pkru (70044df250d0's parent): the frame is written under
    the interrupted PKRU, so copy_fpstate_to_sigframe()'s first store -- the __clear_user() of
    the XSAVE header, before any XSAVE -- faults on the closed key, and get_sigframe() fails:
    force_sigsegv(); SIGSEGV has no handler and kills the task."""
    m, t, _ = _closed_altstack({"sigframe-under-user-pkru"})
    m.kill(t, SIGUSR1)
    assert t.state is TaskState.DEAD and t.killed_by is not None
    assert t.killed_by.sig == SIGSEGV
    assert m.events["sigframe-retry"] == 0  # failed before the XSAVE


def test_before_v6_12_an_open_key_altstack_still_takes_the_frame() -> None:
    """The rejected design only fails where the interrupted code had closed the key: the frame
    then holds that PKRU as XSAVE stored it."""
    m, t, _ = _closed_altstack({"sigframe-under-user-pkru"})
    m.cpus[0].regs.wrpkru(INIT_PKRU & ~0xC)
    m.kill(t, SIGUSR1)
    assert t.state is TaskState.USER and ALT <= t.user_sp < ALT + ALT_SIZE
    fp = int.from_bytes(t.process.mm.read(t.user_sp + sg.SC_FPSTATE_OFFSET, 8), "little")
    off = m.system.profile.component(PKRU).offset
    assert int.from_bytes(t.process.mm.read(fp + off, 4), "little") == INIT_PKRU & ~0xC


def test_key_allows_checks_the_key_and_nothing_else() -> None:
    """UserMemory.key_allows: the key's rights under a PKRU, for a mapped address, without
    faulting anything in."""
    mm = UserMemory()
    mm.map(ALT, 2 * PAGE_SIZE)
    mm.set_pkey(ALT, PAGE_SIZE, 1)
    mm.not_present.add(ALT // PAGE_SIZE)
    assert mm.key_allows(ALT, True, 0) and mm.key_allows(ALT, False, 0b10 << 2)
    assert not mm.key_allows(ALT, True, 0b10 << 2) and not mm.key_allows(ALT, False, 0b01 << 2)
    assert mm.key_allows(ALT + PAGE_SIZE, True, 0xFFFFFFFF)  # key 0
    assert mm.not_present == {ALT // PAGE_SIZE}
