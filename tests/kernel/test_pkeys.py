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
from fpstate.kernel.x86.xstate_prctl import EFAULT, EINVAL, ENOMEM, ENOSPC, sys_sigaltstack

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
    # A range that starts in a hole is refused at once; one that runs past the mapping is
    # refused after the mapping was changed (do_mprotect_pkey's final tmp < end), which stays.
    assert m.syscall(0, sys_pkey_mprotect, ALT - PAGE_SIZE, 2 * PAGE_SIZE, key) == -ENOMEM
    assert mm.pkeys == {}
    assert m.syscall(0, sys_pkey_mprotect, ALT, ALT_SIZE + 1, key) == -ENOMEM  # past the map
    assert mm.pkeys == {ALT: key}
    assert m.syscall(0, sys_pkey_mprotect, ALT, ALT_SIZE, 0) == 0 and mm.pkeys == {}
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
    """SDM Vol. 3A 4.6.2: AD denies every data access, WD every write, key 0's (a mapping
    pkey_mprotect never keyed) as any other's."""
    mm = UserMemory()
    mm.map(ALT, PAGE_SIZE)
    mm.map(ALT + PAGE_SIZE, PAGE_SIZE)
    mm.mprotect_fixup(ALT, PAGE_SIZE, 1)
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
    mm.write(ALT + PAGE_SIZE, b"z", pkru=0xFFFFFFFC)  # every key but 0 closed
    with pytest.raises(PageFault) as e:
        mm.write(ALT + PAGE_SIZE + 4, b"z", pkru=0b10)  # WD of key 0
    assert e.value.pkey == 0 and e.value.addr == ALT + PAGE_SIZE + 4
    assert mm.read(ALT + PAGE_SIZE, 1, pkru=0b10) == b"z"
    with pytest.raises(PageFault):
        mm.read(ALT + PAGE_SIZE, 1, pkru=0b01)  # AD of key 0
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
    mm.mprotect_fixup(ALT, PAGE_SIZE, 1)
    mm.not_present.add(ALT // PAGE_SIZE)
    assert mm.key_allows(ALT, True, 0) and mm.key_allows(ALT, False, 0b10 << 2)
    assert not mm.key_allows(ALT, True, 0b10 << 2) and not mm.key_allows(ALT, False, 0b01 << 2)
    assert mm.key_allows(ALT + PAGE_SIZE, True, 0xFFFFFFFC)  # key 0 open, the rest closed
    assert not mm.key_allows(ALT + PAGE_SIZE, False, 0b01)  # key 0's AD
    assert mm.not_present == {ALT // PAGE_SIZE}


# -- ptrace: the tracer's iovec and buffer under the tracer's PKRU (ptrace_regset_iov) --------


class Traced:
    """A tracee stopped with XMM0 = NEW0 on zen4, a tracer on CPU 0 with a page for its
    struct iovec and one for its buffer, and protection key 1 allocated by the tracer."""

    NEW0 = bytes(range(0x40, 0x50))

    def __init__(self) -> None:
        from fpstate.kernel.x86.regset import NT_X86_XSTATE

        self.m = m = Machine.boot("zen4", ncpus=1)
        self.tracee = m.spawn("tracee")
        m.run(0, self.tracee)
        m.cpus[0].regs.set_component(1, self.NEW0 + bytes(240))  # XMM0..XMM15 (SSE)
        m.stop(self.tracee)
        self.tracer = m.spawn("tracer")
        m.run(0, self.tracer)
        assert m.syscall(0, sys_pkey_alloc, 0, 0) == 1
        self.iov, self.buf = m.mmap(self.tracer, PAGE_SIZE), m.mmap(self.tracer, 4 * PAGE_SIZE)
        self.mm = self.tracer.process.mm
        self.size = m.system.user.max_size
        self.note = NT_X86_XSTATE

    def key(self, where: int, size: int) -> None:
        assert self.m.syscall(0, sys_pkey_mprotect, where, size, 1) == 0

    def call(self, req: int, length: int, *, rights: int = 0, data: bytes = b"",
             note: int | None = None) -> tuple[int, int, bytes]:
        """(result, iov_len after, the buffer's first ``length`` bytes after) of one call
        made with key 1's PKRU bits = ``rights``."""
        from fpstate.kernel.x86.regset import sys_ptrace_regset_iov

        self.mm.write(self.buf, b"\xa5" * 4 * PAGE_SIZE)
        self.mm.write(self.buf, data)
        self.mm.write(self.iov, self.buf.to_bytes(8, "little") + length.to_bytes(8, "little"))
        regs = self.m.cpus[0].regs
        opened = _pkru(self.m)
        regs.wrpkru(opened & ~0b1100 | rights << 2)
        ret = self.m.syscall(0, sys_ptrace_regset_iov, self.tracee, req,
                             self.note if note is None else note, self.iov)
        regs.wrpkru(opened)
        return (ret, int.from_bytes(self.mm.read(self.iov + 8, 8), "little"),
                self.mm.read(self.buf, length))


def test_getregset_into_a_buffer_the_tracer_closed_is_efault_with_nothing_written() -> None:
    from fpstate.kernel.x86.regset import PTRACE_GETREGSET

    tr = Traced()
    tr.key(tr.buf, 4 * PAGE_SIZE)
    ok, n, image = tr.call(PTRACE_GETREGSET, 16384)
    assert (ok, n) == (0, tr.size) and image[160:176] == Traced.NEW0
    for rights in (1, 2):  # AD, then WD alone: copy_to_user() writes
        assert tr.call(PTRACE_GETREGSET, 16384, rights=rights) == (
            -EFAULT, 16384, b"\xa5" * 16384)


def test_a_closed_iovec_page_faults_before_or_after_the_regset() -> None:
    """AD: __get_user() of the iovec faults, nothing happens. WD alone: the iovec is read,
    the regset copied out, and only __put_user() of iov_len faults -- -EFAULT with the
    buffer written; for SETREGSET, -EFAULT with the tracee's registers written."""
    from fpstate.kernel.x86.regset import PTRACE_GETREGSET, PTRACE_SETREGSET

    tr = Traced()
    tr.key(tr.iov, PAGE_SIZE)
    assert tr.call(PTRACE_GETREGSET, 16384, rights=1)[::2] == (-EFAULT, b"\xa5" * 16384)
    ret, n, got = tr.call(PTRACE_GETREGSET, 16384, rights=2)
    assert (ret, n, got[160:176]) == (-EFAULT, 16384, Traced.NEW0)
    image = bytearray(got[:tr.size])
    image[160:176] = bytes(16)
    assert tr.call(PTRACE_SETREGSET, tr.size, rights=2, data=bytes(image))[0] == -EFAULT
    assert tr.tracee.fpu.fpstate.regs[160:176] == bytes(16)
    assert tr.tracee.fpu.last_cpu == -1  # fpu_force_restore() ran: the write is in force


def test_setregset_from_a_closed_buffer_leaves_the_tracee_alone() -> None:
    """The set functions read the buffer after their size rules and before
    fpu_force_restore(): a closed buffer is -EFAULT with the tracee's fpstate and register
    cache untouched, a wrong size -EINVAL first (NT_PRFPREG), and WD alone lets the read
    through."""
    from fpstate.kernel.x86.regset import NT_PRFPREG, PTRACE_GETREGSET, PTRACE_SETREGSET

    tr = Traced()
    image = bytearray(tr.call(PTRACE_GETREGSET, 16384)[2][:tr.size])
    image[160:176] = bytes(16)
    tr.key(tr.buf, 4 * PAGE_SIZE)
    last_cpu = tr.tracee.fpu.last_cpu
    assert tr.call(PTRACE_SETREGSET, tr.size, rights=1, data=bytes(image))[0] == -EFAULT
    assert tr.call(PTRACE_SETREGSET, 512, rights=1, data=bytes(image[:512]),
                   note=NT_PRFPREG)[0] == -EFAULT
    assert tr.call(PTRACE_SETREGSET, 16, rights=3, note=NT_PRFPREG)[0] == -EINVAL
    assert tr.tracee.fpu.fpstate.regs[160:176] == Traced.NEW0
    assert tr.tracee.fpu.last_cpu == last_cpu != -1
    assert tr.call(PTRACE_SETREGSET, tr.size, rights=2, data=bytes(image))[:2] == (0, tr.size)
    assert tr.tracee.fpu.fpstate.regs[160:176] == bytes(16)


def test_a_bytes_buffer_shorter_than_iov_len_faults_after_the_size_rules() -> None:
    """ptrace_regset() with the buffer as bytes: NT_PRFPREG's size rule (-EINVAL) comes before
    the copy that would run past the buffer's end (-EFAULT)."""
    from fpstate.kernel.x86.regset import NT_PRFPREG, PTRACE_SETREGSET, ptrace_regset

    tr = Traced()
    c = tr.m.enter_kernel(0)
    assert ptrace_regset(c, tr.tracee, PTRACE_SETREGSET, NT_PRFPREG, 16, bytes(8))[0] == -EINVAL
    assert ptrace_regset(c, tr.tracee, PTRACE_SETREGSET, NT_PRFPREG, 512, bytes(504))[0] == (
        -EFAULT)


# -- mprotect() and the execute-only key (do_mprotect_pkey, __execute_only_pkey) ---------------


def _exec_setup(cpu: str = "zen4") -> tuple[Machine, Task, int, int]:
    m, t = _task(cpu)
    a, b = m.mmap(t, PAGE_SIZE), m.mmap(t, PAGE_SIZE)
    return m, t, a, b


def test_mprotect_prot_exec_takes_the_execute_only_key_and_denies_it_in_pkru() -> None:
    from fpstate.kernel.x86.mm import PROT_EXEC
    from fpstate.kernel.x86.pkeys import sys_mprotect

    m, t, a, b = _exec_setup()
    assert m.syscall(0, sys_pkey_alloc, 0, 0) == 1
    assert m.syscall(0, sys_mprotect, a, PAGE_SIZE, PROT_EXEC) == 0
    mm = t.process.mm
    assert (mm.pkeys, mm.execute_only_pkey, mm.pkey_allocation_map) == ({a: 2}, 2, 0b111)
    assert _pkru(m) >> 4 & 3 == 0b01  # AD for key 2, written in the caller's PKRU
    assert m.syscall(0, sys_pkey_alloc, 0, 0) == 3  # the execute-only key is not handed out
    # Not the user's: pkey_mprotect and pkey_free refuse it (mm_pkey_is_allocated)
    assert m.syscall(0, sys_pkey_mprotect, b, PAGE_SIZE, 2) == -EINVAL
    assert m.syscall(0, sys_pkey_free, 2) == -EINVAL


def test_the_execute_only_key_is_denied_again_once_the_thread_opened_it() -> None:
    from fpstate.kernel.x86.mm import PROT_EXEC
    from fpstate.kernel.x86.pkeys import sys_mprotect

    m, t, a, b = _exec_setup()
    assert m.syscall(0, sys_mprotect, a, PAGE_SIZE, PROT_EXEC) == 0
    m.cpus[0].regs.wrpkru(_pkru(m) & ~0b1100)  # the thread opens key 1
    assert m.syscall(0, sys_mprotect, b, PAGE_SIZE, PROT_EXEC) == 0
    assert t.process.mm.pkeys == {a: 1, b: 1} and _pkru(m) >> 2 & 3 == 0b01


def test_only_the_calling_thread_gets_the_execute_only_denial() -> None:
    """arch_set_user_pkey_access() writes current's PKRU; a thread that had opened every key
    keeps them open (other threads' rights are theirs)."""
    from fpstate.kernel.x86.mm import PROT_EXEC
    from fpstate.kernel.x86.pkeys import sys_mprotect
    from fpstate.kernel.x86.process import CLONE_THREAD, CLONE_VM

    m = Machine.boot("zen4", ncpus=2)
    t = m.spawn()
    m.run(0, t)
    m.cpus[0].regs.wrpkru(0)  # every key open, inherited by the thread
    th = m.syscall(0, sys_clone, CLONE_VM | CLONE_THREAD, "thread")
    m.run(1, th)
    a = m.mmap(t, PAGE_SIZE)
    assert m.syscall(0, sys_mprotect, a, PAGE_SIZE, PROT_EXEC) == 0
    pkru = [int.from_bytes(m.cpus[n].regs.component(PKRU)[:4], "little") for n in (0, 1)]
    assert pkru == [0b0100, 0]
    assert th.process.mm.pkeys == {a: 1}


def test_leaving_execute_only_returns_to_key_0_but_a_chosen_key_stays() -> None:
    from fpstate.kernel.x86.mm import PROT_EXEC, PROT_READ, PROT_WRITE
    from fpstate.kernel.x86.pkeys import sys_mprotect

    m, t, a, b = _exec_setup()
    mm = t.process.mm
    assert m.syscall(0, sys_mprotect, a, PAGE_SIZE, PROT_EXEC) == 0
    assert m.syscall(0, sys_mprotect, a, PAGE_SIZE, PROT_READ | PROT_EXEC) == 0
    assert a not in mm.pkeys and mm.prots[a] == PROT_READ | PROT_EXEC
    key = m.syscall(0, sys_pkey_alloc, 0, 0)
    assert m.syscall(0, sys_pkey_mprotect, b, PAGE_SIZE, key, PROT_EXEC) == 0
    assert m.syscall(0, sys_mprotect, b, PAGE_SIZE, PROT_READ) == 0
    assert mm.pkeys == {b: key} and mm.prots[b] == PROT_READ
    assert m.syscall(0, sys_mprotect, b, PAGE_SIZE, PROT_READ | PROT_WRITE) == 0
    assert b not in mm.prots


def test_mprotect_errors_and_a_cpu_without_protection_keys() -> None:
    from fpstate.kernel.x86.mm import PROT_EXEC
    from fpstate.kernel.x86.pkeys import sys_mprotect

    m, t, a, _ = _exec_setup()
    assert m.syscall(0, sys_mprotect, a + 1, PAGE_SIZE, PROT_EXEC) == -EINVAL
    assert m.syscall(0, sys_mprotect, a, PAGE_SIZE, 0x10) == -EINVAL  # unknown PROT_* bit
    assert m.syscall(0, sys_mprotect, a, 0, PROT_EXEC) == 0
    assert t.process.mm.pkeys == {} and t.process.mm.execute_only_pkey == -1
    # A hole after a: -ENOMEM, but a was made execute-only first, and the caller's PKRU denies
    # the key it took (the real kernel agrees: conform case mprotect/over-a-hole).
    assert t.process.mm.region_at(a + PAGE_SIZE) is None
    assert m.syscall(0, sys_mprotect, a, 3 * PAGE_SIZE, PROT_EXEC) == -ENOMEM
    assert t.process.mm.pkeys == {a: 1} and t.process.mm.execute_only_pkey == 1
    assert _pkru(m) >> 2 & 3 == PKEY_DISABLE_ACCESS
    m, t, a, _ = _exec_setup("haswell")  # no PKU: execute-only is plain PROT_EXEC
    assert m.syscall(0, sys_mprotect, a, PAGE_SIZE, PROT_EXEC) == 0
    assert t.process.mm.pkeys == {} and t.process.mm.execute_only_pkey == -1


def test_fork_copies_the_execute_only_key() -> None:
    from fpstate.kernel.x86.mm import PROT_EXEC
    from fpstate.kernel.x86.pkeys import sys_mprotect

    m, t, a, b = _exec_setup()
    assert m.syscall(0, sys_mprotect, a, PAGE_SIZE, PROT_EXEC) == 0
    child = m.syscall(0, sys_clone, 0, "child")
    assert child.process.mm.execute_only_pkey == 1 and child.process.mm.prots == {a: PROT_EXEC}
    m.run(0, child)
    assert m.syscall(0, sys_mprotect, b, PAGE_SIZE, PROT_EXEC) == 0
    assert child.process.mm.pkeys == {a: 1, b: 1} and t.process.mm.pkeys == {a: 1}


def test_page_protections_fault_kernel_accesses_to_user_memory() -> None:
    """A store needs PROT_WRITE, any access some PROT_* bit; PROT_EXEC alone reads (x86 page
    tables have no execute-only pages) unless the execute-only key denies it."""
    from fpstate.kernel.x86.mm import PROT_EXEC, PROT_NONE, PROT_READ

    mm = UserMemory()
    mm.map(ALT, 4 * PAGE_SIZE)
    mm.mprotect_fixup(ALT, PAGE_SIZE, 0, PROT_READ)
    mm.mprotect_fixup(ALT + PAGE_SIZE, PAGE_SIZE, 0, PROT_NONE)
    mm.mprotect_fixup(ALT + 2 * PAGE_SIZE, PAGE_SIZE, 1, PROT_EXEC)
    assert mm.read(ALT, 8) == bytes(8)
    with pytest.raises(PageFault):
        mm.write(ALT, b"x")
    with pytest.raises(PageFault):
        mm.read(ALT + PAGE_SIZE, 1)
    assert mm.read(ALT + 2 * PAGE_SIZE, 1) == b"\0"
    with pytest.raises(PageFault):
        mm.read(ALT + 2 * PAGE_SIZE, 1, pkru=0b0100)  # key 1 AD
    mm.write(ALT + 3 * PAGE_SIZE, b"x")
    assert not mm.fits(ALT, 8)  # XSAVE's fast path must not store to the read-only page


def test_a_read_only_iovec_is_efault_after_the_regset_was_copied() -> None:
    """A debugger's const struct iovec (PROT_READ page): ptrace_request() reads it, the
    regset goes out or in, and __put_user() of iov_len faults -- -EFAULT after the work."""
    from fpstate.kernel.x86.mm import PROT_READ
    from fpstate.kernel.x86.pkeys import sys_mprotect
    from fpstate.kernel.x86.regset import PTRACE_GETREGSET, PTRACE_SETREGSET, sys_ptrace_regset_iov

    tr = Traced()
    image = bytearray(tr.call(PTRACE_GETREGSET, 16384)[2][:tr.size])
    image[160:176] = bytes(16)
    tr.mm.write(tr.buf, bytes(image))
    tr.mm.write(tr.iov, tr.buf.to_bytes(8, "little") + tr.size.to_bytes(8, "little"))
    assert tr.m.syscall(0, sys_mprotect, tr.iov, PAGE_SIZE, PROT_READ) == 0
    assert tr.m.syscall(0, sys_ptrace_regset_iov, tr.tracee, PTRACE_SETREGSET, tr.note,
                        tr.iov) == -EFAULT
    assert tr.tracee.fpu.fpstate.regs[160:176] == bytes(16)  # written all the same
    tr.mm.write(tr.buf, b"\xa5" * 16)
    assert tr.m.syscall(0, sys_ptrace_regset_iov, tr.tracee, PTRACE_GETREGSET, tr.note,
                        tr.iov) == -EFAULT
    assert tr.mm.read(tr.buf, 16) == bytes(image[:16])  # the buffer was written


def test_copy_to_user_stops_at_the_first_faulting_page_and_mprotect_merges_back() -> None:
    """copy_to_user() across two mappings, the second behind a closed key: the bytes before
    it are stored and the rest reported not copied; a pkey_mprotect that gives the split part
    its old key back joins the two mappings again (vma_merge)."""
    mm = UserMemory()
    mm.map(ALT, 2 * PAGE_SIZE)
    mm.mprotect_fixup(ALT + PAGE_SIZE, PAGE_SIZE, 1)
    assert mm.regions == {ALT: PAGE_SIZE, ALT + PAGE_SIZE: PAGE_SIZE}
    at = ALT + PAGE_SIZE - 10
    assert mm.copy_to_user(at, b"\x11" * 30, pkru=0b0100) == 20  # key 1 AD
    assert mm.peek(at, 30) == b"\x11" * 10 + bytes(20)
    assert mm.copy_to_user(at, b"\x22" * 30, pkru=0) == 0
    assert mm.peek(at, 30) == b"\x22" * 30
    mm.mprotect_fixup(ALT + PAGE_SIZE, PAGE_SIZE, 0)
    assert mm.regions == {ALT: 2 * PAGE_SIZE} and mm.pkeys == {}
    assert mm.read(at, 30) == b"\x22" * 30  # one mapping again: a plain access spans it


def test_accesses_run_through_adjacent_mappings_and_fault_at_the_first_denied_byte() -> None:
    """User accesses know no VMA boundary: a read or write across two adjacent mappings
    succeeds when both allow it; otherwise #PF names the first byte whose mapping denies it
    (CR2), and a faulting write stores nothing. A hole faults at its first byte."""
    mm = UserMemory()
    mm.map(ALT, 2 * PAGE_SIZE)
    mm.mprotect_fixup(ALT + PAGE_SIZE, PAGE_SIZE, 1)  # two mappings: key 0, then key 1
    at = ALT + PAGE_SIZE - 8
    mm.write(at, b"\x33" * 16, pkru=INIT_PKRU & ~(0b11 << 2))  # key 1 open
    assert mm.read(at, 16, pkru=0) == b"\x33" * 16
    with pytest.raises(PageFault) as e:
        mm.write(at, b"\x44" * 16, pkru=0b10 << 2)  # key 1 WD
    assert (e.value.addr, e.value.pkey) == (ALT + PAGE_SIZE, 1)
    assert mm.peek(at, 16) == b"\x33" * 16  # nothing stored, not even the key-0 half
    assert mm.read(at, 16, pkru=0b10 << 2) == b"\x33" * 16  # WD allows the read
    with pytest.raises(PageFault) as e:
        mm.read(at, 16, pkru=0b01 << 2)  # AD
    assert (e.value.addr, e.value.pkey) == (ALT + PAGE_SIZE, 1)
    with pytest.raises(PageFault) as e:
        mm.probe(at, 16, write=True, pkru=0b10 << 2)
    assert e.value.addr == ALT + PAGE_SIZE
    # A read-only second mapping: stores fault at its first byte, reads go through.
    mm.mprotect_fixup(ALT + PAGE_SIZE, PAGE_SIZE, 1, prot=0x1)  # PROT_READ
    with pytest.raises(PageFault) as e:
        mm.write(at, bytes(16))
    assert (e.value.addr, e.value.pkey) == (ALT + PAGE_SIZE, None)
    assert mm.read(at, 16) == b"\x33" * 16
    # The range runs through two mappings; access_ok() checks only that it lies below
    # TASK_SIZE_MAX, even across a hole.
    assert mm.mapped(at, 16) and not mm.in_one_mapping(at, 16)
    assert mm.in_one_mapping(at, 8)
    assert mm.access_ok(at, 1 << 20) and not mm.access_ok((1 << 47) - 8, 16)
    # A hole after the second mapping: the access faults at the hole's first byte.
    mm.map(ALT + 3 * PAGE_SIZE, PAGE_SIZE)
    with pytest.raises(PageFault) as e:
        mm.read(ALT + 2 * PAGE_SIZE - 4, PAGE_SIZE + 8)
    assert (e.value.addr, e.value.pkey) == (ALT + 2 * PAGE_SIZE, None)
    assert not mm.mapped(ALT + 2 * PAGE_SIZE - 4, PAGE_SIZE + 8)


#: Where the split altstack's top lies above its keyed page's start: the frame, a few KiB,
#: runs down from the keyed top page into the key-0 page below it.
SPLIT_GAP = 2048


def _split_altstack() -> tuple[Machine, Task, int]:
    """`_closed_altstack`, but only the mapping's top page has key 1 (pkey_mprotect of that
    page splits the mapping in two) and the altstack ends ``SPLIT_GAP`` bytes into it."""
    m, t = _task()
    t.process.mm.map(ALT, ALT_SIZE)
    size = ALT_SIZE - PAGE_SIZE + SPLIT_GAP
    assert m.syscall(0, sys_sigaltstack, ALT, size, 0) == 0
    assert m.syscall(0, sys_pkey_alloc, 0, 0) == 1
    assert m.syscall(0, sys_pkey_mprotect, ALT + ALT_SIZE - PAGE_SIZE, PAGE_SIZE, 1) == 0
    t.handlers[SIGUSR1] = SigAction(SA_ONSTACK)
    pkru = INIT_PKRU | 0b11 << 2
    m.cpus[0].regs.wrpkru(pkru)
    return m, t, pkru


def test_a_frame_across_a_key_split_of_the_altstack_is_delivered_and_restored() -> None:
    """get_sigframe() writes the frame with every key open (sig_prepare_pkru), so a frame that
    runs from the keyed top page into the key-0 page below is delivered whole; a handler that
    opens its keys returns through it (the real kernel agrees: conform case
    sigaltstack/pkey-split-deliver)."""
    m, t, pkru = _split_altstack()
    sp = t.user_sp
    m.kill(t, SIGUSR1)
    mm = t.process.mm
    keyed = ALT + ALT_SIZE - PAGE_SIZE
    fp = int.from_bytes(mm.read(t.user_sp + sg.SC_FPSTATE_OFFSET, 8), "little")
    assert t.state is TaskState.USER and t.user_sp < keyed < fp + t.fpu.fpstate.user_size
    assert (mm.regions[ALT], mm.regions[keyed]) == (ALT_SIZE - PAGE_SIZE, PAGE_SIZE)
    off = m.system.profile.component(PKRU).offset
    assert int.from_bytes(mm.read(fp + off, 4), "little") == pkru
    m.cpus[0].regs.wrpkru(0)
    sg.handler_return(t)
    assert m.syscall(0, sg.sys_rt_sigreturn) == 0
    assert t.user_sp == sp and _pkru(m) == pkru


def test_sigreturn_under_init_pkru_faults_in_the_keyed_part_of_a_split_frame() -> None:
    """The handler keeps init_pkru_value: restore_sigcontext() reads the sigcontext from the
    key-0 part and sets the stack pointer back to the interrupted one, then fpu__restore_sig's
    read of the fpstate faults where it enters the keyed page: badframe, and the forced
    SIGSEGV (no SA_ONSTACK) goes on the interrupted stack, not the altstack."""
    m, t, _ = _split_altstack()
    t.handlers[SIGSEGV] = SigAction()
    sp = t.user_sp
    m.kill(t, SIGUSR1)
    sg.handler_return(t)
    assert m.syscall(0, sg.sys_rt_sigreturn) == -14  # -EFAULT: badframe
    mm = t.process.mm
    assert t.state is TaskState.USER and sp - 65536 < t.user_sp < sp
    assert int.from_bytes(mm.read(t.user_sp + sg.SIGINFO_OFFSET, 4), "little") == SIGSEGV


def test_mmap_prot_exec_takes_the_execute_only_key() -> None:
    """do_mmap(): PROT_EXEC alone gives the new mapping the mm's execute-only key and denies it
    in the caller's PKRU (the same key for the next one); PROT_READ | PROT_EXEC and a CPU
    without protection keys give key 0; length 0 is EINVAL."""
    from fpstate.kernel.x86.mm import PROT_EXEC, PROT_READ
    from fpstate.kernel.x86.pkeys import sys_mmap

    m, t = _task()
    mm = t.process.mm
    assert m.syscall(0, sys_mmap, 0, PROT_EXEC) == -EINVAL
    one = m.syscall(0, sys_mmap, PAGE_SIZE, PROT_EXEC)
    assert mm.pkeys == {one: 1} and mm.prots == {one: PROT_EXEC}
    assert mm.execute_only_pkey == 1 and _pkru(m) >> 2 & 3 == PKEY_DISABLE_ACCESS
    two = m.syscall(0, sys_mmap, PAGE_SIZE + 1, PROT_EXEC)
    assert mm.pkeys[two] == 1 and mm.regions[two] == 2 * PAGE_SIZE
    three = m.syscall(0, sys_mmap, PAGE_SIZE, PROT_READ | PROT_EXEC)
    assert three not in mm.pkeys and mm.prots[three] == PROT_READ | PROT_EXEC
    assert m.syscall(0, sys_pkey_alloc, 0, 0) == 2
    m, t = _task("haswell")  # no PKU
    one = m.syscall(0, sys_mmap, PAGE_SIZE, PROT_EXEC)
    assert t.process.mm.pkeys == {} and t.process.mm.prots == {one: PROT_EXEC}
