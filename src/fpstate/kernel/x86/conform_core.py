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
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass
from pathlib import Path

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

PAGE = 4096
SEED = 0x6C
FXSAVE_SIZE = 512


@dataclass(frozen=True, slots=True)
class CoreGiven:
    before: bytes  #: the child's registers when it dumped (standard XSAVE image)


def _core_host() -> HostAnswer:
    from elftools.elf.elffile import ELFFile

    from fpstate.host.child import (
        Asm,
        SharedMemory,
        host_user_xstate_size,
        load_patterns,
        pattern_table,
        xsave_image,
    )
    from fpstate.host.coredump import kernel_core
    from fpstate.tools.corefile import (
        NT_PRFPREG,
        NT_X86_XSTATE,
        thread_notes,
        xsave_layout_note,
    )

    xs = (host_user_xstate_size() + 64 + PAGE - 1) // PAGE * PAGE
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


def _needs() -> str | None:
    from fpstate.host.coredump import core_unavailable

    return core_unavailable()


CASES: tuple[Case, ...] = (
    Case("core/notes", "fill_thread_core_info (xfpregs_get, xstateregs_get of the dumping task), "
         "elf_coredump_extra_notes_write (NT_X86_XSAVE_LAYOUT)", _core_host, core_model, _needs),
)
