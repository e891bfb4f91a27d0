"""Extended register state from ELF core files: the NT_X86_XSTATE note of every thread.

Linux writes one set of notes per thread (fill_thread_core_info(), fs/binfmt_elf.c): first
NT_PRSTATUS (whose pr_pid names the thread), then one note per regset of the task view
(x86_64_regsets[], arch/x86/kernel/ptrace.c; a 32-bit program's core is ELFCLASS32 with the
ia32 view: the compat prstatus, NT_PRFPREG the 108-byte user_i387_ia32_struct, NT_PRXFPREG
the FXSAVE image) -- NT_PRFPREG (the 512-byte FXSAVE image) and,
with XSAVE, NT_X86_XSTATE (name "LINUX", type 0x202), the uabi copy of the thread's fpstate that
``xstateregs_get()`` produces: standard format, fpu_user_cfg.max_size bytes, XCR0 at 464. gdb's
``gcore`` writes the same notes from its own register cache.

What a core does *not* record is the CPUID leaf 0xD the state was saved under (the proposal
for an NT_X86_CPUID note, discourse.llvm.org/t/74458, would); decoding therefore needs a CPU
profile, and `fpstate.tools.record` keeps the two together. The notes are found with
pyelftools (PT_NOTE segments, ``iter_notes``); nothing else of the core is read.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from fpstate.errors import BlobError

NT_PRSTATUS = 1
NT_PRFPREG = 2
NT_X86_XSTATE = 0x202
#: struct elf_prstatus (x86-64): elf_siginfo (12), pr_cursig (2) + pad (2), pr_sigpend (8),
#: pr_sighold (8), then pr_pid.
PRSTATUS_PID_OFFSET = 32
#: The same in a 32-bit core (struct compat_elf_prstatus, i386 and x32): pr_sigpend and
#: pr_sighold are compat_ulong_t (4 bytes each).
PRSTATUS32_PID_OFFSET = 24
ELF_MAGIC = b"\x7fELF"


@dataclass(frozen=True, slots=True)
class ThreadXstate:
    """One thread's NT_X86_XSTATE note: the thread id from the NT_PRSTATUS before it."""

    tid: int | None
    data: bytes
    offset: int  #: file offset of the note header


def _note_type(value: object) -> int | None:
    if isinstance(value, int):
        return value
    named = {"NT_PRSTATUS": NT_PRSTATUS, "NT_FPREGSET": NT_PRFPREG}
    return named.get(str(value))


def is_core(data: bytes) -> bool:
    """Whether ``data`` starts with the ELF magic."""
    return data[:4] == ELF_MAGIC


@dataclass(frozen=True, slots=True)
class ThreadNote:
    """One "LINUX" note of a thread in a core: its type, the thread id from the NT_PRSTATUS
    before it, its bytes and where its header sits in the file."""

    tid: int | None
    kind: int
    data: bytes
    offset: int


def thread_notes(data: bytes, kinds: frozenset[int] | set[int],
                 machine: str | None = None) -> tuple[ThreadNote, ...]:
    """Every note named "LINUX" of a type in ``kinds`` (NT_PRFPREG is named "CORE" and is
    included when asked for) of the ELF core ``data``, in file order, each with the pid of
    the NT_PRSTATUS note that precedes it; ``machine`` (e.g. "EM_AARCH64") is required of
    the ELF header when given. BlobError when ``data`` is not an ELF core of that machine."""
    try:
        elf = ELFFile(io.BytesIO(data))
        if elf.header["e_type"] != "ET_CORE":
            raise BlobError(f"ELF file of type {elf.header['e_type']}, not a core file (ET_CORE)")
        if machine is not None and elf.header["e_machine"] != machine:
            raise BlobError(f"a core of {elf.header['e_machine']}, not {machine}")
        out: list[ThreadNote] = []
        tid: int | None = None
        pid_at = PRSTATUS32_PID_OFFSET if elf.elfclass == 32 else PRSTATUS_PID_OFFSET
        for seg in elf.iter_segments():
            if seg.header["p_type"] != "PT_NOTE":
                continue
            for note in seg.iter_notes():
                kind = _note_type(note["n_type"])
                desc = bytes(note["n_descdata"])
                owner = note["n_name"]
                if kind == NT_PRSTATUS and owner == "CORE":
                    if len(desc) >= pid_at + 4:
                        tid = int.from_bytes(desc[pid_at:pid_at + 4], "little")
                elif kind in kinds and (owner == "LINUX" or (kind == NT_PRFPREG
                                                             and owner == "CORE")):
                    out.append(ThreadNote(tid, kind, desc, int(note["n_offset"])))
    except BlobError:
        raise
    except (ELFError, ValueError, KeyError, EOFError, OSError, AttributeError, TypeError,
            IndexError, UnicodeDecodeError) as e:
        raise BlobError(f"not a readable ELF core file: {e}") from None
    except Exception as e:  # construct's parse errors have no common public base class
        raise BlobError(f"not a readable ELF core file: {type(e).__name__}: {e}") from None
    return tuple(out)


def xstate_notes(data: bytes) -> tuple[ThreadXstate, ...]:
    """Every NT_X86_XSTATE note of the ELF core ``data``, in file order, each with the pid of
    the NT_PRSTATUS note that precedes it. BlobError when ``data`` is not an ELF core or has
    no such note."""
    out = tuple(ThreadXstate(n.tid, n.data, n.offset)
                for n in thread_notes(data, {NT_X86_XSTATE}))
    if not out:
        if int.from_bytes(data[18:20], "little") == EM_AARCH64:
            raise BlobError("an arm64 core (EM_AARCH64) has no NT_X86_XSTATE note: read it "
                            "with --arch arm64")
        raise BlobError("the core file has no NT_X86_XSTATE note (a CPU or kernel without "
                        "XSAVE writes only NT_PRFPREG)")
    return out


# -- writing --------------------------------------------------------------------------------------

#: sizeof(struct elf_prstatus) on x86-64.
PRSTATUS_SIZE = 336
EM_X86_64 = 62
ET_CORE = 4
PT_NOTE = 4


def _note(name: bytes, kind: int, desc: bytes) -> bytes:
    name += b"\0"
    pad = b"\0" * (-len(name) % 4)
    return (len(name).to_bytes(4, "little") + len(desc).to_bytes(4, "little")
            + kind.to_bytes(4, "little") + name + pad + desc + b"\0" * (-len(desc) % 4))


def build_core(threads: list[tuple[int, bytes]]) -> bytes:
    """A minimal x86-64 ELF core file: one PT_NOTE segment holding, per thread, an NT_PRSTATUS
    (only pr_pid filled in) and an NT_X86_XSTATE with the given bytes, in the order
    fill_thread_core_info() writes them. For cores of CPUs this machine is not (AMX), whose
    notes come from the kernel model's xstateregs_get()."""
    return build_core_notes([(tid, [(NT_X86_XSTATE, xstate)]) for tid, xstate in threads])


#: e_machine of an arm64 core.
EM_AARCH64 = 183


def build_core_notes(threads: list[tuple[int, list[tuple[int, bytes]]]],
                     machine: int = EM_X86_64) -> bytes:
    """A minimal 64-bit little-endian ELF core file of ``machine``: per thread an NT_PRSTATUS
    (only pr_pid filled in; struct elf_prstatus has the same 336 bytes on x86-64 and arm64)
    and then its (type, bytes) notes, named "LINUX" (NT_PRFPREG: "CORE"), in the order
    fill_thread_core_info() writes them."""
    notes = b""
    for tid, regsets in threads:
        prstatus = bytearray(PRSTATUS_SIZE)
        prstatus[PRSTATUS_PID_OFFSET:PRSTATUS_PID_OFFSET + 4] = tid.to_bytes(4, "little")
        notes += _note(b"CORE", NT_PRSTATUS, bytes(prstatus))
        for kind, desc in regsets:
            notes += _note(b"CORE" if kind == NT_PRFPREG else b"LINUX", kind, desc)
    ehdr = (ELF_MAGIC + bytes([2, 1, 1, 0]) + bytes(8)
            + ET_CORE.to_bytes(2, "little") + machine.to_bytes(2, "little")
            + (1).to_bytes(4, "little") + bytes(8) + (64).to_bytes(8, "little") + bytes(8)
            + bytes(4) + (64).to_bytes(2, "little") + (56).to_bytes(2, "little")
            + (1).to_bytes(2, "little") + (64).to_bytes(2, "little") + bytes(4))
    phdr = (PT_NOTE.to_bytes(4, "little") + bytes(4) + (120).to_bytes(8, "little") + bytes(16)
            + len(notes).to_bytes(8, "little") + bytes(8) + (4).to_bytes(8, "little"))
    assert len(ehdr) == 64 and len(phdr) == 56
    return ehdr + phdr + notes
