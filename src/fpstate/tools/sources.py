"""Where blobs come from: files (raw areas, ELF core files, state records), a live thread
(ptrace) and a KVM vCPU.

``read_source(spec)`` takes:

- ``pid:TID``: PTRACE_SEIZE the running thread TID, read NT_X86_XSTATE, detach
  (`fpstate.host.ptrace.read_xstate_of`; the uabi format);
- ``kvm`` or ``kvm:SEED``: a fresh KVM guest of this machine (`fpstate.host.kvm_guest`) whose
  code loads the vector and opmask registers with the pattern of SEED (the registers of
  `fpstate.host.child.zmm_pattern` / ``opmask_pattern``), then KVM_GET_XSAVE2 of its vCPU (the
  kvm format). A vCPU belongs to the process that created it, so this is the one vCPU a
  command can read; a VMM reads its own with ``Vcpu.get_xsave2()`` and decodes the bytes;
- a path: an ELF core file (one source per NT_X86_XSTATE note, `fpstate.tools.corefile`; a
  core of Linux 6.12+ carries its CPU's layout in NT_X86_XSAVE_LAYOUT), a state record
  (`fpstate.tools.record`, which carries its own CPU), or raw bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from fpstate.errors import BlobError, HostUnavailable
from fpstate.inputs import read_bytes
from fpstate.tools.corefile import LayoutNote, is_core, xsave_layout_note, xstate_notes
from fpstate.tools.record import RECORD_FORMAT, StateRecord


@dataclass(frozen=True, slots=True)
class Source:
    """One blob and where it came from. ``fmt`` is the format the source implies ("auto" when
    only the bytes can tell); ``record`` is set when the file was a state record."""

    label: str
    data: bytes
    fmt: str
    record: StateRecord | None = None
    tid: int | None = None  #: the thread of a core note or of pid:TID
    layout: LayoutNote | None = None  #: the core's NT_X86_XSAVE_LAYOUT note, if it has one


def _kvm_source(seed: int) -> Source:
    import struct

    from fpstate.host.child import opmask_pattern, zmm_pattern
    from fpstate.host.kvm_guest import GuestMachine
    from fpstate.x86.program import Insn, Program

    with GuestMachine() as g:
        xcr0 = _guest_xcr0(g)
        start = bytearray(g.standard_size(xcr0))
        struct.pack_into("<H", start, 0, 0x037F)
        struct.pack_into("<I", start, 24, 0x1F80)
        insns = []
        if xcr0 & 0xE0 == 0xE0:
            insns += [Insn("VMOVDQU64", reg=n, data=zmm_pattern(n, seed)) for n in range(32)]
            insns += [Insn("KMOVQ", reg=n, data=opmask_pattern(n, seed).to_bytes(8, "little"))
                      for n in range(8)]
        elif xcr0 & 0x4:
            insns += [Insn("VMOVDQU", reg=n, data=zmm_pattern(n, seed)[:32]) for n in range(16)]
        else:
            insns += [Insn("MOVDQU", reg=n, data=zmm_pattern(n, seed)[:16]) for n in range(16)]
        out = g.run_program(Program(start=bytes(start), insns=tuple(insns), cpl=3), xcr0=xcr0)
        if out.fault is not None:
            raise HostUnavailable(f"the KVM guest faulted loading its registers: {out.fault}")
        data = g.vcpu.get_xsave2()
    return Source(f"KVM vCPU 0 (KVM_GET_XSAVE2, guest registers of pattern {seed:#x})",
                  data, "kvm")


def _guest_xcr0(g: object) -> int:
    """The XCR0 the guest enables: every user feature of the guest CPUID leaf 0xD among
    x87, SSE, AVX and AVX-512 (the registers the pattern loads)."""
    from fpstate.host.kvm import find_cpuid

    eax = find_cpuid(g.cpuid, 0xD, 0)[0]  # type: ignore[attr-defined]
    return eax & 0xE7


def read_source(spec: str) -> list[Source]:
    """The blobs named by ``spec`` (see the module docstring)."""
    if spec.startswith("pid:"):
        try:
            tid = int(spec[4:], 0)
        except ValueError:
            raise BlobError(f"{spec!r}: pid:TID needs a thread id") from None
        from fpstate.host.ptrace import read_xstate_of

        return [Source(f"thread {tid} (PTRACE_GETREGSET NT_X86_XSTATE)",
                       read_xstate_of(tid).data, "uabi", tid=tid)]
    if spec == "kvm" or spec.startswith("kvm:"):
        try:
            seed = int(spec[4:], 0) if spec.startswith("kvm:") else 0x4B
        except ValueError:
            raise BlobError(f"{spec!r}: kvm:SEED needs a number") from None
        return [_kvm_source(seed)]
    try:
        data = read_bytes(spec)
    except OSError as e:
        raise BlobError(f"cannot read {spec}: {e.strerror or e}") from None
    if is_core(data):
        layout = xsave_layout_note(data)
        return [Source(f"{spec}: NT_X86_XSTATE of thread {n.tid} (note at {n.offset:#x})",
                       n.data, "uabi", tid=n.tid, layout=layout) for n in xstate_notes(data)]
    if data.lstrip()[:1] == b"{" and RECORD_FORMAT.encode() in data[:4096]:
        rec = StateRecord.from_json(data)
        return [Source(f"{spec}: state record of {rec.cpu} ({rec.layout})", rec.state,
                       "xsaves" if rec.layout == "compacted" else "xsave", rec)]
    return [Source(spec, data, "auto")]
