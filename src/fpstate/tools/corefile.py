"""Extended register state from ELF core files: the NT_X86_XSTATE note of every thread.

Linux writes one set of notes per thread (fill_thread_core_info(), fs/binfmt_elf.c): first
NT_PRSTATUS (whose pr_pid names the thread), then one note per regset of the task view
(x86_64_regsets[], arch/x86/kernel/ptrace.c; a 32-bit program's core is ELFCLASS32 with the
ia32 view: the compat prstatus, NT_PRFPREG the 108-byte user_i387_ia32_struct, NT_PRXFPREG
the FXSAVE image) -- NT_PRFPREG (the 512-byte FXSAVE image) and,
with XSAVE, NT_X86_XSTATE (name "LINUX", type 0x202), the uabi copy of the thread's fpstate that
``xstateregs_get()`` produces: standard format, fpu_user_cfg.max_size bytes, XCR0 at 464. gdb's
``gcore`` writes the same notes from its own register cache.

Before Linux 6.12 a core did not record where the components of NT_X86_XSTATE lie (AMD and
Intel lay AVX-512 and PKRU out differently; gdb guessed from XCR0 and the note's size). Since
6.12 (ba386777a30b) the kernel ends the notes with NT_X86_XSAVE_LAYOUT (type 0x205, "LINUX"):
one struct x86_xfeat_component {type, size, offset, flags} per extended user feature, the
standard offsets of the CPU that dumped (`fpstate.kernel.x86.xstate.elf_coredump_extra_notes`
models it). :func:`xsave_layout_note` reads it, :func:`layout_problems` says what in it a
reader should not trust, and :func:`profile_from_layout` turns it into a CPU profile that
answers CPUID leaf 0xD as the dumping CPU did for those features, so that such a core decodes
without being told its CPU. Older cores (and gdb's gcore, which writes no such note) still
need a CPU profile; `fpstate.tools.record` keeps the two together. The notes are found with
pyelftools (PT_NOTE segments, ``iter_notes``); nothing else of the core is read.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from fpstate.errors import BlobError, FpstateError
from fpstate.kernel.x86.xstate import NT_X86_XSAVE_LAYOUT, XfeatComponent
from fpstate.x86.cpuid import CpuidProfile
from fpstate.x86.xfeatures import BY_NUMBER, XFEATURE_MASK_FPSSE, bits

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


# -- NT_X86_XSAVE_LAYOUT ---------------------------------------------------------------------------

#: The first byte an extended component may use (legacy region + XSAVE header).
_EXTENDED_START = 576
#: ``CpuidProfile.source`` and default name of the profiles :func:`profile_from_layout` makes.
LAYOUT_SOURCE = "the core's NT_X86_XSAVE_LAYOUT note"
LAYOUT_PROFILE = "core (NT_X86_XSAVE_LAYOUT)"


@dataclass(frozen=True, slots=True)
class LayoutNote:
    """A core's NT_X86_XSAVE_LAYOUT note: its records and where its header sits in the file."""

    records: tuple[XfeatComponent, ...]
    offset: int

    @property
    def features(self) -> int:
        """The extended features the records name, as a mask."""
        mask = 0
        for r in self.records:
            if r.type < 64:
                mask |= 1 << r.type
        return mask


def xsave_layout_note(data: bytes) -> LayoutNote | None:
    """The NT_X86_XSAVE_LAYOUT note of the ELF core ``data``, None when it has none (a kernel
    before 6.12, a CPU without XSAVE, gdb's gcore). BlobError when ``data`` is not a readable
    core, when it holds two such notes, or when the note's size is not a whole number of
    16-byte records."""
    notes = thread_notes(data, {NT_X86_XSAVE_LAYOUT})
    if not notes:
        return None
    if len(notes) > 1:
        raise BlobError(f"the core holds {len(notes)} NT_X86_XSAVE_LAYOUT notes (at "
                        f"{', '.join(f'{n.offset:#x}' for n in notes)}); the kernel writes one")
    (note,) = notes
    if len(note.data) % XfeatComponent.SIZE:
        raise BlobError(f"NT_X86_XSAVE_LAYOUT note at {note.offset:#x} has {len(note.data)} "
                        f"bytes, not a multiple of {XfeatComponent.SIZE} (struct "
                        "x86_xfeat_component)")
    return LayoutNote(XfeatComponent.unpack_all(note.data), note.offset)


def _label(r: XfeatComponent) -> str:
    f = BY_NUMBER.get(r.type)
    return f"xfeature {r.type} ({f.short})" if f else f"xfeature {r.type}"


def layout_problems(note: LayoutNote, xcr0: int | None = None,
                    xstate_size: int | None = None) -> tuple[str, ...]:
    """What in ``note`` no Linux kernel writes, or what contradicts the NT_X86_XSTATE note it
    describes (``xcr0``: the u64 at 464 of that note, fpu_user_cfg.max_features;
    ``xstate_size``: its length, fpu_user_cfg.max_size). An empty answer means the records
    can be used to decode; each problem is one sentence."""
    out: list[str] = []
    seen: set[int] = set()
    last = 1
    for r in note.records:
        what = _label(r)
        if r.type < 2 or r.type > 63:
            out.append(f"record of xfeature {r.type}: the kernel lists extended features "
                       "(2 to 63) only")
            continue
        if r.type in seen:
            out.append(f"{what} is listed twice")
        elif r.type < last:
            out.append(f"{what} follows xfeature {last}: the kernel lists them in bit order")
        seen.add(r.type)
        last = max(last, r.type)
        if r.flags:
            out.append(f"{what} has flags {r.flags:#x}; the field is reserved and written as 0")
        if r.size == 0:
            out.append(f"{what} has size 0")
        if r.offset < _EXTENDED_START or r.offset + r.size > 0xFFFFFFFF:
            out.append(f"{what} at offset {r.offset:#x} overlaps the legacy region and XSAVE "
                       "header (extended components start at 576)"
                       if r.offset < _EXTENDED_START else
                       f"{what} at {r.offset:#x}+{r.size:#x} runs past 4 GiB")
        elif xstate_size is not None and r.offset + r.size > xstate_size:
            out.append(f"{what} at {r.offset:#x}+{r.size:#x} runs past the {xstate_size}-byte "
                       "NT_X86_XSTATE note")
    reach: XfeatComponent | None = None  # of the records so far, the one that ends last
    for b in sorted((r for r in note.records if 2 <= r.type <= 63 and r.size),
                    key=lambda r: r.offset):
        if reach is not None and b.offset < reach.offset + reach.size and reach.type != b.type:
            out.append(f"{_label(reach)} at {reach.offset:#x}+{reach.size:#x} overlaps "
                       f"{_label(b)} at {b.offset:#x}")
        if reach is None or b.offset + b.size > reach.offset + reach.size:
            reach = b
    if xcr0 is not None and not 0 <= xcr0 < 1 << 64:
        out.append(f"XCR0 {xcr0:#x} is not a 64-bit value")
    elif xcr0 is not None:
        listed = note.features
        extended = xcr0 & ~XFEATURE_MASK_FPSSE
        if listed != extended:
            parts = []
            if extended & ~listed:
                parts.append(f"XCR0 bits {', '.join(map(str, bits(extended & ~listed)))} have "
                             "no record")
            if listed & ~extended:
                parts.append(f"records for {', '.join(map(str, bits(listed & ~extended)))} "
                             "are not in XCR0")
            out.append(f"the NT_X86_XSTATE note's XCR0 {xcr0:#x} and the layout disagree: "
                       + "; ".join(parts))
    return tuple(out)


def profile_from_layout(note: LayoutNote, xcr0: int, name: str = LAYOUT_PROFILE,
                        mxcsr_mask: int = 0xFFFF,
                        xstate_size: int | None = None) -> CpuidProfile:
    """A CPU profile whose CPUID leaf 0xD answers as the dumping CPU did for the features of
    ``note``: sub-leaf 0 EAX/EDX = ``xcr0`` (x87 and SSE added), EBX = ECX = the standard size
    the records span; sub-leaf i EAX = size, EBX = offset, ECX = 0 (the note keeps no
    alignment or supervisor flag: the standard format needs neither). ``mxcsr_mask`` (the
    MXCSR_MASK of the note's FXSAVE region) sets AMD's misaligned-SSE bit, CPUID
    80000001H:ECX[7], when it has bit 17. BlobError when the note has problems
    (:func:`layout_problems`, with ``xstate_size`` the length of the NT_X86_XSTATE note)."""
    problems = layout_problems(note, xcr0, xstate_size)
    if problems:
        raise BlobError(f"NT_X86_XSAVE_LAYOUT at {note.offset:#x}: {problems[0]}")
    xcr0 |= XFEATURE_MASK_FPSSE
    size = max([_EXTENDED_START, *(r.offset + r.size for r in note.records)])
    leaves: dict[tuple[int, int], tuple[int, int, int, int]] = {
        (0, 0): (0xD, *(int.from_bytes(b"Unknown CPU "[k:k + 4], "little") for k in (0, 8, 4))),
        (0xD, 0): (xcr0 & 0xFFFFFFFF, size, size, xcr0 >> 32),
        (0xD, 1): (0, 0, 0, 0),
    }
    for r in note.records:
        leaves[(0xD, r.type)] = (r.size, r.offset, 0, 0)
    if mxcsr_mask >> 17 & 1:
        leaves[(0x80000000, 0)] = (0x80000001, 0, 0, 0)
        leaves[(0x80000001, 0)] = (0, 0, 1 << 7, 0)
    try:
        return CpuidProfile(name, "unknown", leaves, LAYOUT_SOURCE)
    except FpstateError as e:  # pragma: no cover - the leaves above are well-formed
        raise BlobError(f"NT_X86_XSAVE_LAYOUT: {e}") from None


def layout_disagreements(note: LayoutNote, profile: CpuidProfile) -> tuple[str, ...]:
    """Where ``profile`` places a feature of ``note`` elsewhere than the dumping CPU did (or
    does not enumerate it): decoding the core with that profile reads the wrong bytes there."""
    out = []
    for r in note.records:
        if not 2 <= r.type <= 63:
            continue
        if not profile.xcr0_supported >> r.type & 1:
            out.append(f"{_label(r)} (at {r.offset:#x} in the core) is not a user feature of "
                       f"{profile.name}")
            continue
        size, offset, _, _ = profile.cpuid(0xD, r.type)
        if (size, offset) != (r.size, r.offset):
            out.append(f"{_label(r)} is at {r.offset:#x}+{r.size:#x} in the core, at "
                       f"{offset:#x}+{size:#x} on {profile.name}")
    return tuple(out)


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


def build_core(threads: list[tuple[int, bytes]], extra_notes: bytes = b"") -> bytes:
    """A minimal x86-64 ELF core file: one PT_NOTE segment holding, per thread, an NT_PRSTATUS
    (only pr_pid filled in) and an NT_X86_XSTATE with the given bytes, in the order
    fill_thread_core_info() writes them, then ``extra_notes`` (what
    elf_coredump_extra_notes_write() emits: ``XsaveLayoutNote.data`` of the kernel model).
    For cores of CPUs this machine is not (AMX), whose notes come from the kernel model's
    xstateregs_get()."""
    return build_core_notes([(tid, [(NT_X86_XSTATE, xstate)]) for tid, xstate in threads],
                            extra_notes=extra_notes)


#: e_machine of an arm64 core.
EM_AARCH64 = 183


def build_core_notes(threads: list[tuple[int, list[tuple[int, bytes]]]],
                     machine: int = EM_X86_64, extra_notes: bytes = b"") -> bytes:
    """A minimal 64-bit little-endian ELF core file of ``machine``: per thread an NT_PRSTATUS
    (only pr_pid filled in; struct elf_prstatus has the same 336 bytes on x86-64 and arm64)
    and then its (type, bytes) notes, named "LINUX" (NT_PRFPREG: "CORE"), in the order
    fill_thread_core_info() writes them; ``extra_notes`` (already laid out) after the last."""
    notes = b""
    for tid, regsets in threads:
        prstatus = bytearray(PRSTATUS_SIZE)
        prstatus[PRSTATUS_PID_OFFSET:PRSTATUS_PID_OFFSET + 4] = tid.to_bytes(4, "little")
        notes += _note(b"CORE", NT_PRSTATUS, bytes(prstatus))
        for kind, desc in regsets:
            notes += _note(b"CORE" if kind == NT_PRFPREG else b"LINUX", kind, desc)
    notes += extra_notes
    ehdr = (ELF_MAGIC + bytes([2, 1, 1, 0]) + bytes(8)
            + ET_CORE.to_bytes(2, "little") + machine.to_bytes(2, "little")
            + (1).to_bytes(4, "little") + bytes(8) + (64).to_bytes(8, "little") + bytes(8)
            + bytes(4) + (64).to_bytes(2, "little") + (56).to_bytes(2, "little")
            + (1).to_bytes(2, "little") + (64).to_bytes(2, "little") + bytes(4))
    phdr = (PT_NOTE.to_bytes(4, "little") + bytes(4) + (120).to_bytes(8, "little") + bytes(16)
            + len(notes).to_bytes(8, "little") + bytes(8) + (4).to_bytes(8, "little"))
    assert len(ehdr) == 64 and len(phdr) == 56
    return ehdr + phdr + notes
