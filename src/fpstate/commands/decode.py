"""``fpstate decode``, ``encode``, ``validate``, ``record``, ``translate``: state blobs for people.

- ``fpstate decode SOURCE --cpu CPU [--format F] [--xcr0 MASK] [--all] [--json]``: the header,
  every component's registers by name (hex), which components are in their initial state, and
  warnings. SOURCE is a file (raw area, ELF core, state record), ``pid:TID`` or ``kvm[:SEED]``
  (`fpstate.tools.sources`). The JSON is what ``encode`` reads. Without --cpu a core that has
  an NT_X86_XSAVE_LAYOUT note (Linux 6.12+) is read with the layout it gives; with --cpu,
  every place where the CPU disagrees with the note is a warning (``validate``: a note).
- ``fpstate encode JSON --cpu CPU [--format F] [-o OUT]``: the bytes back (byte-exact for the
  JSON's own format; another format lays the registers out afresh).
- ``fpstate validate SOURCE --cpu CPU --as sigreturn|sigreturn-ia32|ptrace|kvm [--kernel V]
  [--task T]``:
  whether the kernel takes the blob on that path, and the rule that refuses it: exit 0 when
  accepted, 1 when refused (`fpstate.tools.validate`).
- ``fpstate record SOURCE --cpu CPU [--format F] [-o OUT]``: a portable state record (state
  + CPUID leaf 0xD + XCR0/XSS, `fpstate.tools.record`).
- ``fpstate translate RECORD --to CPU [--layout standard|compacted] [-o OUT]``: the record
  re-laid out for another CPU; exit 1 naming each component the target cannot hold.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from fpstate.commands import decode_arm64
from fpstate.commands.layout import mask_arg, resolve_cpu
from fpstate.errors import BlobError
from fpstate.inputs import read_bytes, read_text, write_output
from fpstate.kernel.x86.versions import NEWEST, VERSION_NAMES
from fpstate.kernel.x86.xstate import XfeatComponent
from fpstate.tools import blob_arm64
from fpstate.tools.blob import FORMATS, Blob, decode, encode
from fpstate.tools.corefile import (
    LAYOUT_PROFILE,
    LAYOUT_SOURCE,
    LayoutNote,
    layout_disagreements,
    profile_from_layout,
)
from fpstate.tools.record import LAYOUTS, StateRecord, record_from_blob, refusal_message, translate
from fpstate.tools.registers import x87_note
from fpstate.tools.sources import Source, read_source
from fpstate.tools.validate import PATHS, TASKS, validate
from fpstate.x86.cpuid import CpuidProfile
from fpstate.x86.xfeatures import mask_names

_CPU_HELP = ("'host', a bundled profile (fpstate cpus) or a CPUID dump; default host (a state "
             "record brings its own CPU{}); with --arch arm64 an arm64 profile (default "
             f"{decode_arm64.DEFAULT_CPU})")
_CORE_LAYOUT = ", a core of Linux 6.12+ its NT_X86_XSAVE_LAYOUT"
#: --format choices of decode and validate: x86's, then arm64's (--arch says which apply).
_ALL_FORMATS = tuple(dict.fromkeys((*FORMATS, *blob_arm64.FORMATS)))
_ARCH_HELP = "architecture of the blob (default x86; arm64: regsets, signal frames, cores)"


def register(subparsers: argparse._SubParsersAction) -> None:
    d = subparsers.add_parser("decode", help="decode an XSAVE area, signal frame, ptrace/core "
                              "note or KVM buffer",
                              description="Header, registers by name, init components and "
                              "warnings of a state blob.")
    d.add_argument("source", metavar="SOURCE", help="a file (raw blob, ELF core, state record), "
                   "pid:TID (ptrace a running thread) or kvm[:SEED] (a KVM vCPU of this host)")
    d.add_argument("--arch", default="x86", choices=("x86", "arm64"), help=_ARCH_HELP)
    d.add_argument("--cpu", default=None, metavar="CPU", help=_CPU_HELP.format(_CORE_LAYOUT))
    d.add_argument("--format", default="auto", choices=("auto", *_ALL_FORMATS),
                   help=f"x86: {', '.join(FORMATS)}; arm64: {', '.join(blob_arm64.FORMATS)}")
    d.add_argument("--xcr0", type=mask_arg, metavar="MASK",
                   help="the XCR0 a standard-format area was saved under (default: what the "
                   "blob says, else the CPU's)")
    d.add_argument("--all", action="store_true", help="also list registers that are zero")
    d.add_argument("--json", action="store_true", help="print JSON (what 'encode' reads)")
    d.set_defaults(run=run_decode)

    e = subparsers.add_parser("encode", help="bytes of a decoded blob (decode --json)",
                              description="Write the blob a 'decode --json' object describes "
                              "(x86, or arm64 from decode --arch arm64 --json: byte-exact).")
    e.add_argument("json_file", metavar="JSON")
    e.add_argument("--cpu", default=None, metavar="CPU",
                   help=_CPU_HELP.format(", the JSON of a core decoded by its layout note that "
                                         "layout"))
    e.add_argument("--format", default=None, choices=FORMATS,
                   help="default: the JSON's own (byte-exact)")
    e.add_argument("-o", "--output", metavar="OUT", help="file to write (default: stdout)")
    e.set_defaults(run=run_encode)

    v = subparsers.add_parser("validate", help="would sigreturn / ptrace / KVM_SET_XSAVE take "
                              "this blob (kernel model)",
                              description="Run the kernel's rules of one path on a blob; exit "
                              "0 accepted, 1 refused (the rule is named).")
    v.add_argument("source", metavar="SOURCE")
    v.add_argument("--arch", default="x86", choices=("x86", "arm64"), help=_ARCH_HELP)
    v.add_argument("--cpu", default=None, metavar="CPU", help=_CPU_HELP.format(""))
    v.add_argument("--as", dest="path", required=True, choices=PATHS,
                   help="arm64: ptrace (PTRACE_SETREGSET) or sigreturn")
    v.add_argument("--format", default=None, choices=("auto", *blob_arm64.FORMATS),
                   help="arm64 only: the blob's format (a core is detected)")
    v.add_argument("--kernel", default=NEWEST, choices=VERSION_NAMES)
    v.add_argument("--task", default="auto", choices=TASKS,
                   help="the receiving task: default, AMX permission, or AMX in use "
                   "(auto: from the blob's header)")
    v.add_argument("--json", action="store_true")
    decode_arm64.add_target_options(v)
    v.set_defaults(run=run_validate)

    r = subparsers.add_parser("record", help="a portable state record (state + CPUID 0xD)",
                              description="State, CPUID leaf 0xD, XCR0 and IA32_XSS as JSON.")
    r.add_argument("source", metavar="SOURCE")
    r.add_argument("--arch", default="x86", choices=("x86", "arm64"),
                   help="architecture of the source (arm64: one thread of an ELF core, or a "
                   "signal frame with --format sigframe)")
    r.add_argument("--cpu", default=None, metavar="CPU",
                   help="'host', a bundled profile (fpstate cpus) or a CPUID dump; default host "
                   f"(a state record brings its own CPU{_CORE_LAYOUT}); "
                   "with --arch arm64 an arm64 profile (default: the bundled one whose kernel "
                   "writes the source as it is)")
    r.add_argument("--format", default="auto", choices=("auto", *FORMATS))
    r.add_argument("--thread", type=int, metavar="TID",
                   help="the core's thread to record (default: its only thread)")
    r.add_argument("--xcr0", type=mask_arg, metavar="MASK")
    r.add_argument("-o", "--output", metavar="OUT")
    r.set_defaults(run=run_record)

    t = subparsers.add_parser("translate", help="re-lay a state record out for another CPU",
                              description="Translate a state record to another CPU's offsets "
                              "and/or format; exit 1 naming each component the target cannot "
                              "hold.")
    t.add_argument("record", metavar="RECORD")
    t.add_argument("--to", required=True, metavar="CPU", help="target CPU (host, bundled, dump)")
    t.add_argument("--layout", default="standard", choices=LAYOUTS)
    t.add_argument("--xcr0", type=mask_arg, metavar="MASK",
                   help="target XCR0 (default: Linux's on the target)")
    t.add_argument("-o", "--output", metavar="OUT")
    g = t.add_argument_group("arm64 records (detected from the record)")
    g.add_argument("--vl", type=int, metavar="BYTES",
                   help="the target's SVE vector length (default: the one its kernel gives "
                   "the record's)")
    g.add_argument("--sme-vl", type=int, metavar="BYTES", help="the target's SME vector length")
    g.add_argument("--regsets", metavar="DIR",
                   help="write the PTRACE_SETREGSET writes that restore the state, in order, "
                   "as DIR/N-NT_ARM_*.bin")
    g.add_argument("--sigframe", metavar="FILE",
                   help="write the rt_sigframe the target's kernel would build for the thread "
                   "(what an rt_sigreturn restore, as CRIU's, hands back)")
    g.add_argument("--frame-address", type=_address, default=0, metavar="ADDR",
                   help="where the frame will sit in memory (extra_context.datap; default 0)")
    t.set_defaults(run=run_translate)


# -- helpers --------------------------------------------------------------------------------------


def _address(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an address: {text!r}") from None


def _layout_profile(src: Source) -> CpuidProfile:
    """The CPU a core's NT_X86_XSAVE_LAYOUT note describes, with the XCR0 and MXCSR_MASK of
    the thread's NT_X86_XSTATE note."""
    assert src.layout is not None
    data = src.data
    xcr0 = int.from_bytes(data[464:472], "little") if len(data) >= 472 else 0
    mask = int.from_bytes(data[28:32], "little") if len(data) >= 32 else 0xFFFF
    try:
        return profile_from_layout(src.layout, xcr0, mxcsr_mask=mask or 0xFFFF,
                                   xstate_size=len(data))
    except BlobError as e:
        raise BlobError(f"{e} (give --cpu to decode with a CPU profile instead)") from None


def _profile(src: Source, cpu: str | None, layout: bool = True) -> CpuidProfile:
    """The CPU to read ``src`` with: ``cpu`` when given; else a state record's own CPU, or
    (``layout``) the layout a core's NT_X86_XSAVE_LAYOUT note gives; else the host."""
    if src.record is not None and cpu is None:
        return src.record.profile()
    if src.layout is not None and cpu is None and layout:
        return _layout_profile(src)
    return resolve_cpu(cpu or "host")


def _layout_warnings(src: Source, profile: CpuidProfile) -> list[str]:
    """Where ``profile`` disagrees with the core's own layout note (none when there is no
    note or the profile was made from it)."""
    if src.layout is None or profile.source == LAYOUT_SOURCE:
        return []
    return [f"the core's NT_X86_XSAVE_LAYOUT says otherwise: {d}"
            for d in layout_disagreements(src.layout, profile)]


def _decode(src: Source, cpu: str | None, fmt: str, xcr0: int | None) -> Blob:
    if src.record is not None and xcr0 is None and src.record.layout == "standard":
        xcr0 = src.record.xcr0
    profile = _profile(src, cpu)
    blob = decode(src.data, profile, src.fmt if fmt == "auto" else fmt, xcr0=xcr0)
    extra = _layout_warnings(src, profile)
    return replace(blob, warnings=(*extra, *blob.warnings)) if extra else blob


def render(blob: Blob, label: str, show_all: bool = False) -> str:
    """The text view of a decoded blob."""
    lines = [f"{label}: {blob.fmt}, {blob.size} bytes, CPU {blob.profile}"
             + (f" (detected: {blob.detected})" if blob.detected else "")]
    if blob.fsave_header is not None:
        h = dict(blob.fsave_header)
        lines.append("fsave header (struct _fpstate_32, 112 bytes; sigreturn's x87 state): "
                     f"cw {h['cw']:#x} sw {h['sw']:#x} tag {h['tag']:#x} ipoff {h['ipoff']:#x} "
                     f"cssel {h['cssel']:#x} dataoff {h['dataoff']:#x} datasel "
                     f"{h['datasel']:#x} status {h['status']:#x} magic {h['magic']:#x}")
        lines.extend(f"    st{i:<9} 0x{h[f'st{i}']:020x}" for i in range(8)
                     if h[f"st{i}"] or show_all)
    lines.append(f"XSTATE_BV {blob.xstate_bv:#x} ({mask_names(blob.xstate_bv)})  "
                 f"XCOMP_BV {blob.xcomp_bv:#x}")
    if blob.sw_bytes is not None:
        sw = blob.sw_bytes
        m2 = "absent" if blob.magic2 is None else f"{blob.magic2:#x}"
        lines.append(f"fx_sw_bytes: magic1 {sw.magic1:#x}, extended_size {sw.extended_size}, "
                     f"xfeatures {sw.xfeatures:#x}, xstate_size {sw.xstate_size}; magic2 {m2}")
    elif blob.xcr0 is not None:
        lines.append(f"XCR0 (u64 at 464) {blob.xcr0:#x} ({mask_names(blob.xcr0)})")
    for c in blob.components:
        lines.append(f"[{c.number}] {c.name} at {c.offset:#x}, {c.size} bytes: {c.state}")
        hidden = 0
        regs = dict(c.registers)
        for name, value in c.registers:
            if value == 0 and not show_all:
                hidden += 1
                continue
            width = next(f.size for f in _fields(c.number, c.size) if f.name == name)
            note = x87_note(name, value, regs.get("fsw", 0)) if c.number == 0 else ""
            lines.append(f"    {name:<11} 0x{value:0{2 * width}x}"
                         + (f"  ({note})" if note else ""))
        if hidden and hidden != len(c.registers):
            lines.append(f"    ({hidden} registers are zero)")
        elif hidden:
            lines.append("    (all registers zero)")
    for off, raw in blob.extra:
        shown = raw[:32].hex() + ("..." if len(raw) > 32 else "")
        lines.append(f"bytes outside any register at {off:#x}+{len(raw)}: {shown}")
    lines.extend(f"warning: {w}" for w in blob.warnings)
    return "\n".join(lines) + "\n"


def _fields(number: int, size: int):  # -> tuple[Field, ...]
    from fpstate.tools.registers import component_fields

    return component_fields(number, 160 if number == 0 else size)


# -- commands -------------------------------------------------------------------------------------


def run_decode(args: argparse.Namespace) -> int:
    if args.arch == "arm64":
        return decode_arm64.run_decode(args)
    if args.format not in ("auto", *FORMATS):
        raise BlobError(f"--format {args.format} is an arm64 format: add --arch arm64")
    sources = read_source(args.source)
    blobs = [(s, _decode(s, args.cpu, args.format, args.xcr0)) for s in sources]
    if args.json:
        out = [dict(b.to_dict(), source=s.label) for s, b in blobs]
        sys.stdout.write(json.dumps(out[0] if len(out) == 1 else out, indent=1) + "\n")
    else:
        sys.stdout.write("\n".join(render(b, s.label, args.all) for s, b in blobs))
    return 0


def run_encode(args: argparse.Namespace) -> int:
    try:
        text = read_text(args.json_file)
    except (OSError, UnicodeDecodeError) as e:
        raise BlobError(f"cannot read {args.json_file}: {getattr(e, 'strerror', None) or e}") \
            from None
    obj = None
    if text.lstrip()[:1] == "[":
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise BlobError(f"blob JSON does not parse: {e}") from None
    if isinstance(obj, list):
        if len(obj) != 1:
            raise BlobError(f"{args.json_file} holds {len(obj)} blobs; encode takes one")
        text = json.dumps(obj[0])
        obj = obj[0]
    if obj is None and '"arm64"' in text:
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise BlobError(f"blob JSON does not parse: {e}") from None
    if isinstance(obj, dict) and obj.get("arch") == "arm64":  # decode --arch arm64 --json
        if args.format is not None:
            raise BlobError("--format: an arm64 blob is encoded in its own format only")
        write_output(blob_arm64.encode(obj), args.output)
        return 0
    write_output(encode(text, _encode_profile(args.cpu, obj, text), args.format), args.output)
    return 0


def _encode_profile(cpu: str | None, obj: object, text: str) -> CpuidProfile:
    """``--cpu`` when given; else, for the JSON of a core decoded by its own
    NT_X86_XSAVE_LAYOUT note, that layout again (the JSON's component offsets and sizes and
    its XCR0), so that decode and encode round-trip on any machine; else the host."""
    if cpu is not None:
        return resolve_cpu(cpu)
    if obj is None and LAYOUT_PROFILE in text:
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise BlobError(f"blob JSON does not parse: {e}") from None
    if not isinstance(obj, dict) or obj.get("cpu") != LAYOUT_PROFILE:
        return resolve_cpu("host")
    try:
        xcr0 = int(str(obj["xcr0"]), 0)
        records = tuple(XfeatComponent(int(c["number"]), int(c["size"]), int(c["offset"]))
                        for c in obj["components"] if int(c["number"]) >= 2)
    except (KeyError, TypeError, ValueError) as e:
        raise BlobError(f"blob JSON of a core layout: {type(e).__name__}: {e}") from None
    return profile_from_layout(LayoutNote(records, 0), xcr0)


def run_validate(args: argparse.Namespace) -> int:
    if args.arch == "arm64":
        return decode_arm64.run_validate(args)
    arm_only = [o for o, v in (("--format", args.format), ("--vl", args.vl),
                               ("--sme-vl", args.sme_vl), ("--streaming", args.streaming or None),
                               ("--za", args.za or None), ("--sve-format", args.sve_format or None))
                if v is not None]
    if arm_only:
        raise BlobError(f"{arm_only[0]} is an arm64 option: add --arch arm64")
    sources = read_source(args.source)
    status = 0
    for src in sources:
        profile = _profile(src, args.cpu, layout=False)
        verdict = validate(src.data, profile, args.path, kernel=args.kernel, task=args.task)
        status |= 0 if verdict.accepted else 1
        mismatch = _layout_warnings(src, profile)
        if args.json:
            out = dict(verdict.to_dict(), source=src.label)
            if mismatch:
                out["layout_disagreements"] = mismatch
            sys.stdout.write(json.dumps(out) + "\n")
            continue
        head = "accepted" if verdict.accepted else "REFUSED"
        sys.stdout.write(f"{src.label}: {args.path}: {head} ({verdict.result}) -- "
                         f"{verdict.rule}" + (f": {verdict.detail}" if not verdict.accepted
                                              else "") + "\n")
        for note in (*verdict.notes, *mismatch):
            sys.stdout.write(f"  note: {note}\n")
    return status


def run_record(args: argparse.Namespace) -> int:
    if args.arch == "arm64":
        return decode_arm64.run_record(args)
    sources = read_source(args.source)
    tids = ", ".join(str(s.tid) for s in sources if s.tid is not None)
    if args.thread is not None:
        sources = [s for s in sources if s.tid == args.thread]
        if not sources:
            raise BlobError(f"{args.source} has no thread {args.thread}"
                            + (f" (threads: {tids})" if tids else ""))
    if len(sources) != 1:
        raise BlobError(f"{args.source} holds {len(sources)} threads ({tids}): a record holds "
                        "one, choose it with --thread")
    src = sources[0]
    if src.record is not None:
        write_output(src.record.to_json(), args.output)
        return 0
    fmt = src.fmt if args.format == "auto" else args.format
    rec = record_from_blob(src.data, _profile(src, args.cpu), fmt, xcr0=args.xcr0)
    write_output(rec.to_json(), args.output)
    return 0


def run_translate(args: argparse.Namespace) -> int:
    try:
        data = read_bytes(args.record)
    except OSError as e:
        raise BlobError(f"cannot read {args.record}: {e.strerror or e}") from None
    if b'"fpstate-arm64-state-record/' in data:
        return decode_arm64.run_translate(args, data)
    arm_only = [o for o, v in (("--vl", args.vl), ("--sme-vl", args.sme_vl),
                               ("--regsets", args.regsets), ("--sigframe", args.sigframe),
                               ("--frame-address", args.frame_address or None))
                if v is not None]
    if arm_only:
        raise BlobError(f"{arm_only[0]} is for arm64 records")
    rec = StateRecord.from_json(data)
    target = resolve_cpu(args.to)
    result = translate(rec, target, args.layout, xcr0=args.xcr0)
    for note in result.notes:
        sys.stderr.write(f"fpstate: note: {note}\n")
    if result.record is None:
        sys.stdout.write(refusal_message(result, target.name) + "\n")
        return 1
    write_output(result.record.to_json(), args.output)
    return 0
