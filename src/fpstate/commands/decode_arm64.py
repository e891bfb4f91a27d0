"""``fpstate decode --arch arm64`` and ``fpstate validate --arch arm64``
(fpstate.tools.blob_arm64).

- ``fpstate decode --arch arm64 FILE [--format F] [--all] [--json]``: the headers, records and
  registers by name of an arm64 regset (fpsimd, sve, ssve, za, zt, fpmr, tls), signal frame or ELF
  core (every thread's FP notes; detected without --format).
- ``fpstate validate --arch arm64 FILE --as ptrace|sigreturn [--format F] [--cpu PROFILE]
  [--vl N] [--sme-vl N] [--streaming] [--za] [--sve-format] [--json]``: PTRACE_SETREGSET of
  the regset (a core: each thread's FP notes in the core's order, on a thread of its own, as
  a restorer writes them back, and then whether that thread ends in the state the notes
  describe) or rt_sigreturn of the frame, on a thread of the CPU profile in the state the
  options give; exit 0 accepted, 1 refused or state not kept (the rule is named).
- ``fpstate record --arch arm64 CORE [--cpu PROFILE] [--thread TID] [-o OUT]``: one thread's FP
  state as a record (fpstate.tools.record_arm64), with a note for each FP note the model's
  GETREGSET of that state on the profile would write otherwise; ``--format sigframe FRAME``:
  the thread a signal frame was written for.
- ``fpstate translate RECORD --to PROFILE [--vl N] [--sme-vl N] [--regsets DIR] [-o OUT]``
  (an arm64 record): the record at the target's vector lengths, exit 1 naming every register
  or mode the target cannot hold; ``--regsets`` writes the PTRACE_SETREGSET writes that
  restore it, in order, and the order is printed; ``--sigframe FILE [--frame-address ADDR]``
  the rt_sigframe the target's kernel would build for the thread (an rt_sigreturn restore).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections.abc import Callable

from fpstate.arm64.cpu import bundled_profile_names, load_profile
from fpstate.errors import BlobError
from fpstate.inputs import read_bytes, reason, write_output
from fpstate.kernel.arm64 import ptrace as pt
from fpstate.kernel.arm64.state import HostCaps
from fpstate.tools import blob_arm64 as ba
from fpstate.tools import record_arm64 as ra

#: The arm64 profile `validate` assumes without --cpu: it has SVE, SME2 and FPMR, so that every
#: regset exists.
DEFAULT_CPU = "fvp-aem-fpmr"


def add_target_options(p: argparse.ArgumentParser) -> None:
    """The receiving thread's options of ``validate --arch arm64``."""
    g = p.add_argument_group("arm64 receiving thread (--arch arm64)")
    g.add_argument("--vl", type=int, metavar="BYTES", help="its SVE vector length (default: "
                   "the CPU's default)")
    g.add_argument("--sme-vl", type=int, metavar="BYTES", help="its SME vector length")
    g.add_argument("--streaming", action="store_true", help="it is in streaming mode (SVCR.SM)")
    g.add_argument("--za", action="store_true", help="its PSTATE.ZA is on")
    g.add_argument("--sve-format", action="store_true",
                   help="its state is in SVE format (it has used SVE)")


def _read(path: str) -> bytes:
    if path == "kvm" or path.startswith(("pid:", "kvm:")):
        raise BlobError(f"{path}: --arch arm64 reads files only (this machine is not arm64)")
    try:
        return read_bytes(path)
    except (OSError, UnicodeDecodeError) as e:
        raise BlobError(f"cannot read {path}: {reason(e)}") from None


def _format(fmt: str | None) -> str:
    fmt = fmt or "auto"
    if fmt != "auto" and fmt not in ba.FORMATS:
        raise BlobError(f"--format {fmt} is not an arm64 format ({', '.join(ba.FORMATS)})")
    return fmt


def run_decode(args: argparse.Namespace) -> int:
    if args.xcr0 is not None:
        raise BlobError("--xcr0 is an x86 option; arm64 blobs carry their vector lengths")
    blobs = ba.decode(_read(args.source), _format(args.format))
    if args.json:
        out = [dict(b.to_dict(), source=b.label or args.source) for b in blobs]
        sys.stdout.write(json.dumps(out[0] if len(out) == 1 else out, indent=1) + "\n")
    else:
        sys.stdout.write("\n".join(ba.render(b, args.source, args.all) for b in blobs))
    return 0


def _caps(cpu: str | None, option: str = "--cpu") -> HostCaps:
    try:
        return HostCaps.from_profile(load_profile(cpu or DEFAULT_CPU))
    except Exception as e:  # ProfileError and kin: one line
        raise BlobError(f"{option}: {e}") from None


def run_validate(args: argparse.Namespace) -> int:
    caps = _caps(args.cpu)
    target = ba.target_for(caps, args.vl, args.sme_vl, args.streaming, args.za,
                           args.sve_format)
    data = _read(args.source)
    fmt = _format(args.format)
    if fmt == "auto":
        fmt = "core" if ba.is_core(data) else ""
        if not fmt:
            raise BlobError("an arm64 blob that is not an ELF core needs --format (one of "
                            f"{', '.join(ba.FORMATS)})")
    if fmt == "core":
        if args.path != "ptrace":
            raise BlobError("a core's notes are written back with ptrace: use --as ptrace")
        status = 0
        for tid, notes in ra.core_threads(data).items():  # each thread on a thread of its own
            items = [(f"thread {tid} {pt.NOTE_NAMES[n]}", ba.NOTE_FORMATS[n], blob)
                     for n, blob in notes.items()]  # judged as bytes, decoded or not
            done, got = _validate_items(args, caps, target, items)
            status |= done | _state_kept(args, caps, tid, notes, got)
        return status
    return _validate_items(args, caps, target, [(args.source, fmt, data)])[0]


def _validate_items(args: argparse.Namespace, caps: HostCaps, target: pt.RegsetTarget,
                    items: list[tuple[str, str, bytes]]) -> tuple[int, pt.RegsetTarget]:
    """Each blob on the thread in turn, its verdict printed: (1 if one was refused, else 0;
    the thread afterwards)."""
    status = 0
    for label, f, blob in items:
        v = ba.validate(blob, f, args.path, caps, target)
        target = v.target if v.target is not None else target
        status |= 0 if v.accepted else 1
        if args.json:
            sys.stdout.write(json.dumps(dict(v.to_dict(), source=label)) + "\n")
            continue
        head = "accepted" if v.accepted else f"REFUSED ({_errno(v.ret)})"
        after = ", ".join(f"{k} {val}" for k, val in v.after.items())
        sys.stdout.write(f"{label}: {v.path}: {head}" + (f" -- {v.reason}" if v.reason else "")
                         + f"\n  after: {after}\n")
    return status, target


def _state_kept(args: argparse.Namespace, caps: HostCaps, tid: int,
                notes: dict[int, bytes], got: pt.RegsetTarget) -> int:
    """1 (and a line saying so) when the thread written note by note does not end in the
    state the core's notes describe: every write may be taken and state still lost (a later
    write's VL change converting an earlier one's SVE state)."""
    try:
        want, _ = ra.state_from_notes(notes)
    except BlobError as e:
        sys.stdout.write(f"thread {tid}: the state the notes describe cannot be read ({e}); "
                         "not compared\n")
        return 1
    lost = ra.differences(caps, got, want)
    if not lost:
        return 0
    reason = (f"after the writes {', '.join(lost)} read back otherwise than the core holds "
              "them: written in the core's order the state is not kept (fpstate record --arch "
              "arm64, then translate --regsets, gives an order that keeps it)")
    if args.json:
        sys.stdout.write(json.dumps({"path": "PTRACE_SETREGSET of every note", "accepted": False,
                                     "ret": 0, "reason": reason, "lost": lost,
                                     "source": f"thread {tid}"}) + "\n")
    else:
        sys.stdout.write(f"thread {tid}: STATE NOT KEPT -- {reason}\n")
    return 1


def run_record(args: argparse.Namespace) -> int:
    if args.format not in ("auto", "sigframe") or args.xcr0 is not None:
        raise BlobError(f"{'--xcr0' if args.xcr0 is not None else '--format ' + args.format} "
                        "is an x86 option: an arm64 record is read from a core's FP notes or, "
                        "with --format sigframe, from a signal frame")
    data = _read(args.source)
    read: Callable[[str], tuple[ra.Arm64Record, list[str]]]
    if args.format == "sigframe":
        if args.thread is not None:
            raise BlobError("--thread picks a thread of a core; a signal frame is one thread's")
        frame = ra.state_from_sigframe(data)  # read once, judged on each CPU tried

        def read(cpu: str) -> tuple[ra.Arm64Record, list[str]]:
            return ra.record_from_frame_read(frame, data, _caps(cpu))
    elif ba.is_core(data):
        notes = ra.core_thread(data, args.thread)

        def read(cpu: str) -> tuple[ra.Arm64Record, list[str]]:
            return ra.record_from_notes(notes, _caps(cpu))
    else:
        raise BlobError(f"{args.source}: an arm64 record is made from an ELF core, or from a "
                        "signal frame with --format sigframe")
    rec, found = read(args.cpu) if args.cpu is not None else _any_cpu(read)
    for n in found:
        sys.stderr.write(f"fpstate: note: {n}\n")
    write_output(rec.to_json(), args.output)
    return 0


def _any_cpu(read: Callable[[str], tuple[ra.Arm64Record, list[str]]]
             ) -> tuple[ra.Arm64Record, list[str]]:
    """Without --cpu: the record on the first bundled profile whose kernel writes the core's
    notes (or the frame's records) as they are -- their headers' max_vl, the regsets and
    records present tell CPUs apart -- else on the default profile, with its notes."""
    for name in bundled_profile_names():
        rec, notes = read(name)
        if not notes:
            return rec, notes
    rec, notes = read(DEFAULT_CPU)
    return rec, [*notes, f"no bundled arm64 profile writes this as it is; recorded as "
                 f"{DEFAULT_CPU} (give the saving CPU with --cpu)"]


def run_translate(args: argparse.Namespace, data: bytes) -> int:
    if args.xcr0 is not None or args.layout != "standard":
        raise BlobError(f"{'--xcr0' if args.xcr0 is not None else '--layout'} is for x86 "
                        "records")
    rec = ra.Arm64Record.from_json(data)
    caps = _caps(args.to, "--to")
    result = ra.translate(rec, caps, args.vl, args.sme_vl)
    for n in result.notes:
        sys.stderr.write(f"fpstate: note: {n}\n")
    if result.record is None:
        sys.stdout.write(f"{caps.profile.name} cannot hold the state: "
                         + "; ".join(result.refusals) + "\n")
        return 1
    if args.sigframe and (args.frame_address % 16 or not 0 <= args.frame_address < 1 << 64):
        raise BlobError(f"--frame-address {args.frame_address:#x}: a frame address is a "
                        "16-byte aligned user address")
    if args.regsets:
        try:
            os.makedirs(args.regsets, exist_ok=True)
        except OSError as e:
            raise BlobError(f"cannot make {args.regsets}: {e.strerror or e}") from None
        for n, (note, blob) in enumerate(result.writes, 1):
            write_output(blob, os.path.join(args.regsets, f"{n}-{pt.NOTE_NAMES[note]}.bin"))
        order = ", ".join(f"{n}. {pt.NOTE_NAMES[note]} ({len(b)} bytes)"
                          for n, (note, b) in enumerate(result.writes, 1))
        sys.stderr.write(f"fpstate: PTRACE_SETREGSET in this order: {order}\n")
    if args.sigframe:
        t = result.record.state
        frame = ra.sigframe(caps, t, args.frame_address)
        write_output(frame, args.sigframe)
        vls = [f"{k} VL {v}" for k, v in (("SVE", t.sve_vl), ("SME", t.sme_vl)) if v]
        sys.stderr.write(f"fpstate: rt_sigframe of {len(frame)} bytes"
                         + (f"; rt_sigreturn takes it on a thread whose {' and '.join(vls)}: "
                            "set them first (prctl PR_SVE_SET_VL, PR_SME_SET_VL)"
                            if vls else "") + "\n")
    write_output(result.record.to_json(), args.output)
    return 0


def _errno(ret: int) -> str:
    return f"-{errno.errorcode[-ret]}" if -ret in errno.errorcode else str(ret)


__all__ = ["DEFAULT_CPU", "add_target_options", "run_decode", "run_record", "run_translate",
           "run_validate"]
