"""Kernel-layer case about core dumps: the x86 notes the real kernel writes into a core file.

The real side is `fpstate.host.coredump`: a child's machine code loads the pattern registers
(as `fpstate.host.ptrace`'s tracee does), XSAVEs them into shared memory and kills itself with
SIGQUIT, so the kernel dumps it while it holds them. The model side loads the same registers
into a model task and asks what do_coredump() -> elf_core_dump() writes for it:

- fill_thread_core_info(): one note per regset of the task's view that has something to say;
  NT_PRFPREG is xfpregs_get() and NT_X86_XSTATE xstateregs_get() of the dumping task itself
  (sync_fpstate() saves its live registers first), as `fpstate.kernel.x86.regset` models them;
- elf_coredump_extra_notes_write() (v6.12+): NT_X86_XSAVE_LAYOUT after the last thread's
  notes, closing the PT_NOTE segment (`fpstate.kernel.x86.xstate.elf_coredump_extra_notes`).

Compared: both regset notes byte for byte, the layout note's bytes (header, name and records)
as they sit in the file, and whether it ends the notes.

``core/threads`` dumps a process of two threads: the sibling (clone with CLONE_THREAD) loads
other patterns and another MXCSR -- and, with protection keys, another PKRU -- XSAVEs them
and spins in user mode; the leader then loads its own, XSAVEs them and kills its process
with SIGQUIT, which complete_signal() gives the running leader. The model
(`fpstate.kernel.x86.coredump.do_coredump`) runs the same process on two CPUs: the sibling
zapped in user mode on CPU 1, the leader asleep in coredump_wait(). Compared: how many
NT_X86_XSTATE notes, whose comes first, and each thread's note byte for byte (with PKRU
changed by both threads, that the leader's note shows its live PKRU: it was switched out,
unlike a single-threaded dumper -- docs/findings/kernel-findings.md 9i). The leader also
XSAVEs its registers just before the clone: a sibling note holding them (its legacy region)
means the dumper did not wait for the sibling (kernel-findings 9j), and the model is asked
for that branch (``late``), so either outcome is compared byte for byte. The leader pins
itself to one CPU and the sibling to another (sched_setaffinity), as the model places them;
this also makes the late branch more frequent here (kernel-findings 9j: it needs the
dumper's CPU to idle while the dumper sleeps).

``core/three-threads`` dumps a leader with two siblings on two CPUs: the first runs in user
mode on the other CPU, the second shares the leader's CPU and is preempted by it, so it can
reach coredump_task_exit() only once the dumper sleeps. The notes' order gives the order the
siblings arrived in (core_state->dumper.next is a stack: newest first), which the model is
told (`fpstate.kernel.x86.coredump.do_coredump`'s ``arrival``), as it is told which sibling,
if one, the dumper did not wait for (its note holds its clone-time state: 9j for the last
arrival or for an earlier one); each note is compared byte for byte, and the order too.

``core/sleeps`` measures the model's claim behind 9i, whether the dumper sleeps -- and so is
switched out -- before its notes, on a host without protection keys: the dumping thread's
voluntary context switches (/proc/PID/status) from just before its fatal signal until it is
a zombie, the count most of `REPEATS` dumps show, against `Coredump.voluntary_switches`
(each sleep of the dump path, plus do_task_dead()'s last switch): a lone thread dumping to
the system's file pattern (the model: no sleep) and a leader with a sibling spinning in user
mode (a sleep in coredump_wait()). ``core/pattern-sleeps`` does the same through a pipe to a helper
(a sleep until the helper's exec) and coredump sockets (``@path``: no sleep; ``@@path``: the
coredump_ack's receive; and for each other ack, whether a core arrives, the parent's
WCOREDUMP, and COREDUMP_WAIT's sleep after the notes), which means pointing the system's
core_pattern at a helper or a
socket of the caller's for the dumps: it runs only where FPSTATE_MAY_SET_CORE_PATTERN=1 allows
it (`fpstate.host.coredump.dump_switches`).
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fpstate.errors import HostUnavailable
from fpstate.kernel.x86.conform import (
    Case,
    Facts,
    HostAnswer,
    load_registers,
    user_task,
)
from fpstate.kernel.x86.regset import regset_xstate_size, xfpregs_get, xstateregs_get
from fpstate.kernel.x86.sched import Machine
from fpstate.kernel.x86.types import FpuSystem
from fpstate.kernel.x86.xstate import elf_coredump_extra_notes, fpu__init_system_xstate

if TYPE_CHECKING:
    from fpstate.host.child import Asm, SharedMemory

PAGE = 4096
SEED = 0x6C
FXSAVE_SIZE = 512
LEGACY = 416  #: FXSAVE's x87, MXCSR and XMM0-15 bytes: the legacy region's architected part


@dataclass(frozen=True, slots=True)
class CoreGiven:
    before: bytes  #: the child's registers when it dumped (standard XSAVE image)


def _core_host() -> HostAnswer:
    from elftools.elf.elffile import ELFFile

    from fpstate.host.child import (
        SharedMemory,
        load_patterns,
        pattern_table,
        xsave_image,
        xsave_slot,
    )
    from fpstate.host.coredump import kernel_core
    from fpstate.tools.corefile import (
        NT_PRFPREG,
        NT_X86_XSTATE,
        thread_notes,
        xsave_layout_note,
    )

    xs = xsave_slot()
    shm = SharedMemory(PAGE + xs)
    shm.write(0, pattern_table(SEED))

    def code(a: Asm) -> None:
        load_patterns(a, shm.address)
        a.xsave(shm.address + PAGE)

    with tempfile.TemporaryDirectory(prefix="fpstate-core-") as d:
        data = kernel_core(Path(d), code).read()
    before = xsave_image(shm.read(PAGE, xs)).raw
    notes = {n.kind: n.data for n in thread_notes(data, {NT_PRFPREG, NT_X86_XSTATE})}
    layout = xsave_layout_note(data)
    facts: Facts = {"NT_PRFPREG": notes.get(NT_PRFPREG, b""),
                    "NT_X86_XSTATE": notes.get(NT_X86_XSTATE, b"")}
    if layout is None:
        facts["NT_X86_XSAVE_LAYOUT"] = b""
        facts["NT_X86_XSAVE_LAYOUT closes PT_NOTE"] = False
        return HostAnswer(facts, CoreGiven(before))
    size = 12 + 8 + 16 * len(layout.records)
    facts["NT_X86_XSAVE_LAYOUT"] = data[layout.offset:layout.offset + size]
    segs = [s for s in ELFFile(io.BytesIO(data)).iter_segments()
            if s.header["p_type"] == "PT_NOTE"]
    if len(segs) != 1:
        raise HostUnavailable(f"the core has {len(segs)} PT_NOTE segments, not one")
    end = segs[0].header["p_offset"] + segs[0].header["p_filesz"]
    facts["NT_X86_XSAVE_LAYOUT closes PT_NOTE"] = layout.offset + size == end
    return HostAnswer(facts, CoreGiven(before))


def core_model(system: FpuSystem, g: CoreGiven) -> Facts:
    """The dumping task holds ``g.before``; elf_core_dump() runs in its own context."""
    m = Machine(system, 1)
    t = user_task(m, 0, comm="dumper")
    load_registers(m, 0, g.before)
    c = m.enter_kernel(0)
    xstate = xstateregs_get(c, t, regset_xstate_size(system))
    fx = xfpregs_get(c, t, FXSAVE_SIZE)
    note = elf_coredump_extra_notes(fpu__init_system_xstate(system.profile,
                                                            system.kernel_version))
    return {"NT_PRFPREG": fx if isinstance(fx, bytes) else b"",
            "NT_X86_XSTATE": xstate if isinstance(xstate, bytes) else b"",
            "NT_X86_XSAVE_LAYOUT": note.data,
            "NT_X86_XSAVE_LAYOUT closes PT_NOTE": bool(note.data)}


@dataclass(frozen=True, slots=True)
class ThreadsGiven:
    leader: bytes  #: the leader's registers when it dumped (standard XSAVE image)
    sibling: bytes  #: the sibling's registers while it spun
    at_clone: bytes  #: the leader's registers just before the clone (the sibling's first fpstate)
    late: bool  #: the sibling's note holds its clone-time state: the dumper did not wait for it


#: The sibling's MXCSR (round down, every exception masked) and, with OSPKE, the PKRU values
#: the sibling and the leader write: key 0 open, keys 1-3 with rights other than
#: init_pkru_value's (0x55555554) and each other's.
SIBLING_MXCSR = 0x3F80
SIBLING_PKRU, LEADER_PKRU = 0x5555555C, 0x55555574


def _threads_host() -> HostAnswer:
    from fpstate.host.child import SYS as NR
    from fpstate.host.child import (
        SharedMemory,
        load_patterns,
        pattern_table,
        register_class,
        xsave_image,
        xsave_slot,
    )
    from fpstate.host.coredump import kernel_core
    from fpstate.tools.corefile import xstate_notes

    pku = bool(register_class().xcr0 & (1 << 9))
    xs = xsave_slot()
    leader_img, sibling_img, clone_img = 2 * PAGE, 2 * PAGE + xs, 2 * PAGE + 2 * xs
    flags = 2 * PAGE + 3 * xs
    stack = 16 * PAGE
    shm = SharedMemory(flags + PAGE + stack)
    shm.write(0, pattern_table(SEED))
    table = bytearray(pattern_table(SEED + 1))
    table[2112:2116] = SIBLING_MXCSR.to_bytes(4, "little")  # PATTERN_MXCSR
    shm.write(PAGE, bytes(table))
    ready, tid = shm.address + flags, shm.address + flags + 8
    stack_top = shm.address + shm.size - 64
    pin = _two_cpus()
    masks = _pin_masks(shm, flags + 64, pin)

    def sibling_code(a: Asm) -> None:
        if pin:
            a.syscall(NR["sched_setaffinity"], 0, 8, masks + 8)
        load_patterns(a, shm.address + PAGE)
        if pku:
            a.wrpkru(SIBLING_PKRU)
        a.xsave(shm.address + sibling_img)

    def code(a: Asm) -> None:
        if pin:
            a.syscall(NR["sched_setaffinity"], 0, 8, masks)
        a.xsave(shm.address + clone_img)  # what fpu_clone() copies into the sibling's fpstate
        _sibling_then(a, ready, stack_top, sibling_code, tid=tid)
        load_patterns(a, shm.address)
        if pku:
            a.wrpkru(LEADER_PKRU)
        a.xsave(shm.address + leader_img)

    with tempfile.TemporaryDirectory(prefix="fpstate-core-") as d:
        core = kernel_core(Path(d), code)
        data = core.read()
    if shm.u64(flags) != 1:
        raise HostUnavailable("the sibling thread never ran")
    sibling = shm.u64(flags + 8)
    notes = xstate_notes(data)
    sibling_note = b"".join(n.data for n in notes if n.tid == sibling)
    facts: Facts = {"NT_X86_XSTATE notes": len(notes),
                    "first note is the leader's": notes[0].tid == core.exit.pid,
                    "the leader's NT_X86_XSTATE": notes[0].data,
                    "the sibling's NT_X86_XSTATE": sibling_note}
    own, at_clone = (xsave_image(shm.read(at, xs)).raw for at in (sibling_img, clone_img))
    # The legacy region (x87 with its pointers, MXCSR, XMM0-15) sits alike in the note and in
    # a standard XSAVE image: which of the two states the kernel wrote tells the branch.
    late = sibling_note[:LEGACY] == at_clone[:LEGACY] != own[:LEGACY]
    return HostAnswer(facts, ThreadsGiven(xsave_image(shm.read(leader_img, xs)).raw, own,
                                          at_clone, late))


def _pin_masks(shm: SharedMemory, at: int, pin: tuple[int, int] | None) -> int:
    """Write two cpu_set_t words of 64 bits at offset ``at`` -- the leader's CPU, then the
    sibling's, for sched_setaffinity() -- where ``pin`` names them; their address."""
    if pin:
        shm.write(at, b"".join((1 << c).to_bytes(8, "little") for c in pin))
    return shm.address + at


def _two_cpus() -> tuple[int, int] | None:
    """The first two CPUs this process may run on (None with fewer, or beyond one 64-bit
    cpu_set_t word)."""
    import os

    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[0], cpus[1]) if len(cpus) >= 2 and cpus[1] < 64 else None


def core_threads_model(system: FpuSystem, g: ThreadsGiven) -> Facts:
    """The leader on CPU 0, holding its clone-time registers, clones the sibling, which runs
    on CPU 1; each then holds its image; the leader dumps (do_coredump, not raced: it
    sleeps in coredump_wait()), ``late`` as the real dump went: the dumper found the sibling
    still running in TASK_RUNNING and did not wait for it (kernel-findings 9j)."""
    from fpstate.kernel.x86.coredump import do_coredump
    from fpstate.kernel.x86.process import CLONE_THREAD, CLONE_VM, sys_clone

    m = Machine(system, 2)
    leader = user_task(m, 0, comm="leader")
    load_registers(m, 0, g.at_clone)
    sibling = m.syscall(0, sys_clone, CLONE_VM | CLONE_THREAD, "sibling")
    m.run(1, sibling)
    load_registers(m, 1, g.sibling)
    load_registers(m, 0, g.leader)
    m.enter_kernel(0)
    notes = do_coredump(m, 0, late=g.late).notes
    return {"NT_X86_XSTATE notes": len(notes),
            "first note is the leader's": notes[0].task is leader,
            "the leader's NT_X86_XSTATE": _bytes(notes[0].xstate),
            "the sibling's NT_X86_XSTATE": b"".join(_bytes(n.xstate) for n in notes
                                                    if n.task is sibling)}


@dataclass(frozen=True, slots=True)
class ThreeGiven:
    leader: bytes  #: the leader's registers when it dumped (standard XSAVE image)
    first: bytes  #: the first sibling's registers while it spun on the other CPU
    second: bytes  #: the second sibling's, when the leader preempted it on the leader's CPU
    at_clone: tuple[bytes, bytes]  #: the leader's registers just before each clone
    arrival: tuple[int, ...]  #: which siblings (0: first, 1: second) reached coredump_task_exit
    late: int | None  #: the sibling whose note holds its clone-time state (9j), if one does


def _three_host() -> HostAnswer:
    """A leader pinned to one CPU clones a first sibling, which pins itself to the other CPU,
    loads its patterns and spins there, and a second, which pins itself to the leader's CPU,
    loads its own and spins until the leader preempts it; the leader loads its patterns and
    kills its process with SIGQUIT. The second sibling can run, and so reach
    coredump_task_exit(), only once the dumper sleeps -- usually after the first."""
    from fpstate.host.child import SYS as NR
    from fpstate.host.child import (
        SharedMemory,
        load_patterns,
        pattern_table,
        xsave_image,
        xsave_slot,
    )
    from fpstate.host.coredump import kernel_core
    from fpstate.tools.corefile import xstate_notes

    pin = _two_cpus()
    assert pin is not None  # needs(): two CPUs
    xs = xsave_slot()
    names = ("leader", "first", "second", "clone0", "clone1")
    img = {k: 3 * PAGE + i * xs for i, k in enumerate(names)}
    flags = 3 * PAGE + 5 * xs
    stack = 16 * PAGE
    shm = SharedMemory(flags + PAGE + 2 * stack)
    for i in range(3):
        shm.write(i * PAGE, pattern_table(SEED + i))
    masks = _pin_masks(shm, flags + 64, pin)
    ready, tid = (shm.address + flags, shm.address + flags + 16), (shm.address + flags + 8,
                                                                   shm.address + flags + 24)
    tops = tuple(shm.address + flags + PAGE + (k + 1) * stack - 64 for k in range(2))

    def sibling(k: int) -> Callable[[Asm], None]:
        def code(a: Asm) -> None:
            a.syscall(NR["sched_setaffinity"], 0, 8, masks + (8 if k == 0 else 0))
            load_patterns(a, shm.address + (k + 1) * PAGE)
            a.xsave(shm.address + img[names[k + 1]])
        return code

    def code(a: Asm) -> None:
        a.syscall(NR["sched_setaffinity"], 0, 8, masks)
        for k in range(2):
            a.xsave(shm.address + img[f"clone{k}"])  # what fpu_clone() gives sibling k
            _sibling_then(a, ready[k], tops[k], sibling(k), tid=tid[k], tag=str(k))
        load_patterns(a, shm.address)
        a.xsave(shm.address + img["leader"])

    with tempfile.TemporaryDirectory(prefix="fpstate-core-") as d:
        core = kernel_core(Path(d), code)
        data = core.read()
    tids = (shm.u64(flags + 8), shm.u64(flags + 24))
    notes = xstate_notes(data)
    image = {k: xsave_image(shm.read(at, xs)).raw for k, at in img.items()}
    sib = [b"".join(n.data for n in notes if n.tid == t) for t in tids]
    late = [k for k in range(2) if sib[k][:LEGACY] == image[f"clone{k}"][:LEGACY]
            != image[names[k + 1]][:LEGACY]]
    # core_state->dumper.next is a stack: the notes after the dumper's are newest first.
    arrival = tuple(reversed([tids.index(n.tid) for n in notes[1:] if n.tid in tids]))
    facts: Facts = {"NT_X86_XSTATE notes": len(notes),
                    "first note is the leader's": notes[0].tid == core.exit.pid,
                    "the leader's NT_X86_XSTATE": notes[0].data,
                    "the first sibling's NT_X86_XSTATE": sib[0],
                    "the second sibling's NT_X86_XSTATE": sib[1],
                    "arrival order (0: first sibling)": str(list(arrival))}
    return HostAnswer(facts, ThreeGiven(image["leader"], image["first"], image["second"],
                                        (image["clone0"], image["clone1"]),
                                        arrival if sorted(arrival) == [0, 1] else (0, 1),
                                        late[0] if len(late) == 1 else None))


def core_three_model(system: FpuSystem, g: ThreeGiven) -> Facts:
    """The leader on CPU 0 clones the first sibling, which runs on CPU 1 and holds its image,
    and the second, which runs on CPU 0 and is preempted by the leader (its registers saved);
    the leader holds its image and dumps. The threads arrive in the order the real notes
    show, and ``late`` names the sibling the real dump did not wait for (kernel-findings 9j:
    the last to arrive, or an earlier one held on its CPU)."""
    from fpstate.kernel.x86.coredump import do_coredump
    from fpstate.kernel.x86.process import CLONE_THREAD, CLONE_VM, sys_clone

    m = Machine(system, 2)
    leader = user_task(m, 0, comm="leader")
    sibs = []
    for k in range(2):
        load_registers(m, 0, g.at_clone[k])
        sibs.append(m.syscall(0, sys_clone, CLONE_VM | CLONE_THREAD, f"sibling{k}"))
    m.run(1, sibs[0])
    load_registers(m, 1, g.first)
    m.run(0, sibs[1])
    load_registers(m, 0, g.second)
    m.run(0, leader)
    load_registers(m, 0, g.leader)
    m.enter_kernel(0)
    late = sibs[g.late] if g.late is not None else False
    dump = do_coredump(m, 0, late=late, arrival=[sibs[k] for k in g.arrival])
    notes = dump.notes
    order = [sibs.index(n.task) for n in notes[1:]]
    return {"NT_X86_XSTATE notes": len(notes),
            "first note is the leader's": notes[0].task is leader,
            "the leader's NT_X86_XSTATE": _bytes(notes[0].xstate),
            "the first sibling's NT_X86_XSTATE": b"".join(
                _bytes(n.xstate) for n in notes if n.task is sibs[0]),
            "the second sibling's NT_X86_XSTATE": b"".join(
                _bytes(n.xstate) for n in notes if n.task is sibs[1]),
            "arrival order (0: first sibling)": str(list(reversed(order)))}


def _two_cpu_needs() -> str | None:
    why = _needs()
    if why is None and _two_cpus() is None:
        why = "this process may run on fewer than two CPUs (sched_getaffinity)"
    return why


@dataclass(frozen=True, slots=True)
class SleepsGiven:
    dumps: tuple[tuple[int, str], ...]  #: (threads, core_pattern kind) of each dump measured


def _sibling_then(a: Asm, ready: int, stack_top: int,
                  sibling: Callable[[Asm], None] | None = None, *, tid: int | None = None,
                  tag: str = "") -> None:
    """Machine code: clone a thread (its stack below ``stack_top``) that runs ``sibling``'s
    code, raises the flag at address ``ready`` and spins in user mode; the leader stores the
    sibling's tid at ``tid`` and goes on once the flag is up (neither makes a system call
    that sleeps). ``tag`` makes the labels unique where one program clones twice."""
    from fpstate.host.child import SYS as NR
    from fpstate.host.process import THREAD_FLAGS

    R, C, In, M = a.R, a.C, a.In, a.M
    a.syscall(NR["clone"], THREAD_FLAGS, stack_top, 0, 0, 0)
    a.emit(In.create_reg_reg(C.TEST_RM64_R64, R.RAX, R.RAX))
    a.jump("JNE_REL32_64", "leader" + tag)
    if sibling is not None:  # -- the sibling
        sibling(a)
    a.mov_imm(R.RAX, 1)
    a.store_rax(ready)
    a.label("forever" + tag)
    a.emit(In.create(C.PAUSE))
    a.jump("JMP_REL32_64", "forever" + tag)
    a.label("leader" + tag)  # -- the leader: RAX is the sibling's tid
    if tid is not None:
        a.store_rax(tid)
    a.mov_imm(R.R12, ready)
    a.label("spin" + tag)
    a.emit(In.create(C.PAUSE))
    a.emit(In.create_mem_i32(C.CMP_RM64_IMM8, M(R.R12), 1))
    a.jump("JNE_REL32_64", "spin" + tag)


def _switch_fact(threads: int, kind: str) -> str:
    return (f"usual voluntary switches of a dumper with {threads} "
            f"thread{'s' * (threads > 1)}, {kind}")


#: Dumps per (threads, kind): the fact is the count most of them show. Either way a dump can
#: stray from its path's count, rarely: up, by a sleep the model leaves out (an allocation
#: that reclaims; a write that waits for the reader, which the child's small core avoids), or
#: down, by a dumper whose threads all reached coredump_task_exit() before it waited (the
#: model's ``raced``: seen in about 1 of 300 two-thread dumps here).
REPEATS = 5


def _sleeps_host(dumps: tuple[tuple[int, str], ...]) -> HostAnswer:
    from fpstate.host.child import SharedMemory
    from fpstate.host.coredump import dump_switches

    facts: Facts = {}
    for threads, kind in dumps:
        pattern, _, ack = kind.partition(":")
        counts, written, flagged = [], set(), set()
        for _ in range(REPEATS):
            shm = SharedMemory(16 * PAGE)

            def code(a: Asm, threads: int = threads, shm: SharedMemory = shm) -> None:
                if threads > 1:
                    _sibling_then(a, shm.address, shm.address + shm.size - 64)

            with tempfile.TemporaryDirectory(prefix="fpstate-core-") as d:
                got = dump_switches(Path(d), code, pattern=pattern, ack=ack or "kernel")
            counts.append(got.voluntary)
            written.add(bool(got.core))
            flagged.add(got.exit.core_dumped)
            if threads > 1 and shm.u64(0) != 1:
                raise HostUnavailable("the sibling thread never ran")
        usual = max(set(counts), key=counts.count)
        facts.update(_ack_facts(threads, kind, usual, written, flagged))
    return HostAnswer(facts, SleepsGiven(dumps))


def _ack_facts(threads: int, kind: str, switches: int, written: set[bool],
               flagged: set[bool]) -> Facts:
    """The facts of one dump kind: the dumper's usual voluntary switches; for a kind with a
    coredump_ack (``socket-request:ACK``) also whether a core arrived and whether the parent
    saw WCOREDUMP. COREDUMP_WAIT's sleep after the notes is compared as "more switches than
    the ack alone gives" (``threads`` + 1: the ack's receive, coredump_wait()'s sleep with a
    sibling, do_task_dead()): the measured dumper sleeps there more than once (7 or 8
    switches in all for a lone dumper), its read woken again, it seems, each time the server
    takes data off the socket, which the model does not count."""
    _, _, ack = kind.partition(":")
    if ack == "kernel-wait":
        facts: Facts = {f"a dumper with {threads} thread{'s' * (threads > 1)} sleeps after "
                        f"its notes, {kind}": switches > threads + 1}
    else:
        facts = {_switch_fact(threads, kind): switches}
    if ack:
        facts[f"core written, {threads} thread(s), {kind}"] = str(sorted(written))
        facts[f"WCOREDUMP, {threads} thread(s), {kind}"] = str(sorted(flagged))
    return facts


def core_sleeps_model(system: FpuSystem, g: SleepsGiven) -> Facts:
    """Each dump of ``g``: a leader on CPU 0 (with a sibling spinning in user mode on CPU 1
    for two threads) dumps through the core_pattern kind; the fact is the dumper's
    voluntary context switches as the kernel counts them (`Coredump.voluntary_switches`)."""
    from fpstate.kernel.x86.coredump import do_coredump
    from fpstate.kernel.x86.process import CLONE_THREAD, CLONE_VM, sys_clone

    facts: Facts = {}
    for threads, kind in g.dumps:
        pattern, _, ack = kind.partition(":")
        m = Machine(system, 2)
        user_task(m, 0, comm="leader")
        if threads > 1:
            m.run(1, m.syscall(0, sys_clone, CLONE_VM | CLONE_THREAD, "sibling"))
        m.enter_kernel(0)
        dump = do_coredump(m, 0, core_type=pattern, ack=ack or "kernel")
        facts.update(_ack_facts(threads, kind, dump.voluntary_switches, {bool(dump.notes)},
                                {dump.core_dumped}))
    return facts


def _bytes(note: bytes | int) -> bytes:
    return note if isinstance(note, bytes) else b""


def _needs() -> str | None:
    from fpstate.host.coredump import core_unavailable

    return core_unavailable()


FILE_DUMPS = ((1, "file"), (2, "file"))
PATTERN_DUMPS = ((1, "pipe"), (2, "pipe"), (1, "socket"), (2, "socket"),
                 (1, "socket-request"), (2, "socket-request"),
                 (1, "socket-request:reject"), (1, "socket-request:userspace"),
                 (1, "socket-request:kernel-wait"), (2, "socket-request:kernel-wait"))


def _pattern_needs() -> str | None:
    from fpstate.host.coredump import pattern_change_unavailable

    return pattern_change_unavailable()


CASES: tuple[Case, ...] = (
    Case("core/notes", "fill_thread_core_info (xfpregs_get, xstateregs_get of the dumping task), "
         "elf_coredump_extra_notes_write (NT_X86_XSAVE_LAYOUT)", _core_host, core_model, _needs),
    Case("core/threads", "coredump_wait (zap_threads, coredump_task_exit), fill_note_info "
         "(the dumper's notes first), xstateregs_get of each thread", _threads_host,
         core_threads_model, _needs),
    Case("core/three-threads", "coredump_wait (the arrival order core_state->dumper.next "
         "keeps, wait_task_inactive(TASK_ANY) of each), xstateregs_get of each thread",
         _three_host, core_three_model, _two_cpu_needs),
    Case("core/sleeps", "vfs_coredump: coredump_wait's sleep, coredump_file (no sleep), "
         "__schedule's nvcsw of the dumper", lambda: _sleeps_host(FILE_DUMPS),
         core_sleeps_model, _needs),
    Case("core/pattern-sleeps", "coredump_pipe (UMH_WAIT_EXEC), coredump_sock_connect "
         "(O_NONBLOCK: no sleep), coredump_sock_request (the coredump_ack's receive), "
         "__schedule's nvcsw", lambda: _sleeps_host(PATTERN_DUMPS), core_sleeps_model,
         _pattern_needs),
)
