"""``fpstate layout`` and ``fpstate cpus``: XSAVE layouts of a CPU, and the bundled CPUs.

``fpstate layout --cpu {host|NAME|PATH} [--mask MASK] [--json]`` prints, for every component of
MASK (default: every component the CPU enumerates, CPUID.(EAX=0DH,ECX=0):EDX:EAX |
CPUID.(EAX=0DH,ECX=1):EDX:ECX), its size, standard offset, compacted offset (for XCOMP_BV = MASK),
64-byte alignment and XFD support, then the standard size (user components of MASK) and the
compacted size (all of MASK). Supervisor components have no standard offset: the table shows
"-", the JSON 0. ``--cpu host`` off x86-64 uses the bundled fallback profile, with a note on
stderr.

``fpstate cpus [--json]`` lists the bundled profiles.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from rich.console import Console
from rich.table import Table

from fpstate.errors import FpstateError, HostUnavailable, MaskError
from fpstate.x86.cpuid import CpuidProfile
from fpstate.x86.layout import LayoutTable, layout_table
from fpstate.x86.profiles import FALLBACK, bundled_profile, list_profiles, load_profile
from fpstate.x86.xfeatures import parse_mask

_HEX = re.compile(r"^(0[xX])?[0-9a-fA-F]+$")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "layout",
        help="standard and compacted XSAVE layout of a CPU",
        description="Offsets and sizes of the XSAVE state components of a CPU, in the "
        "standard format and the compacted format (XCOMP_BV = the mask).",
    )
    p.add_argument("--arch", default="x86", choices=("x86", "arm64"),
                   help="x86 (default) or arm64: where Z, P, FFR, ZA and ZT0 sit in the regsets "
                   "and signal-frame records at a vector length")
    p.add_argument("--cpu", default=None, metavar="{host|NAME|PATH}",
                   help="'host' (execute CPUID), a bundled profile (see 'fpstate cpus') or a "
                   "CPUID dump file (cpuid -r, AIDA64, corpus JSON; PATH#SELECTOR picks one "
                   "entry of a list); default: host. --arch arm64: an arm64 profile (default "
                   "fvp-aem-fpmr)")
    p.add_argument("--vl", type=int, metavar="BYTES",
                   help="--arch arm64: the vector length (SVE VL and SVL) to lay out (default: "
                   "the CPU's largest of each)")
    p.add_argument("--mask", metavar="MASK",
                   help="components: hex (0x optional) or names joined by '|' "
                   "(default: every component the CPU enumerates, XCR0 and XSS bits)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run_layout)

    c = subparsers.add_parser("cpus", help="list the bundled CPU profiles",
                              description="The bundled CPUID profiles (real CPUs) and what "
                              "they enumerate for XSAVE.")
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c.set_defaults(run=run_cpus)


def resolve_cpu(spec: str) -> CpuidProfile:
    """The profile for ``--cpu``; off x86-64 'host' falls back to the bundled FALLBACK."""
    if spec != "host":
        return load_profile(spec)
    try:
        return load_profile("host")
    except HostUnavailable as e:
        sys.stderr.write(f"fpstate: note: {e}: using the bundled profile {FALLBACK!r}\n")
        return bundled_profile(FALLBACK)


def parse_mask_text(text: str) -> int:
    """``--mask``: hexadecimal with or without 0x, else parse_mask() (names joined by '|');
    MaskError when it is neither."""
    text = text.strip()
    if _HEX.match(text):
        return int(text[2:] if text[:2].lower() == "0x" else text, 16)
    return parse_mask(text)


def mask_arg(text: str) -> int:
    """`parse_mask_text` as an argparse ``type``: argparse turns only ArgumentTypeError (not
    the package's MaskError) into its one-line error naming the option, exit 2."""
    try:
        return parse_mask_text(text)
    except MaskError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _console() -> Console:
    wide = None if sys.stdout.isatty() else 120  # rich assumes 80 columns for pipes
    return Console(file=sys.stdout, highlight=False, soft_wrap=False, width=wide)


def _yes(flag: bool) -> str:
    return "yes" if flag else ""


def print_table(profile: CpuidProfile, table: LayoutTable) -> None:
    title = f"XSAVE layout of {profile.name}"
    if profile.brand:
        title += f" ({profile.brand})"
    t = Table()
    for head in ("#", "name", "size", "offset", "compacted", "aligned", "XFD"):
        t.add_column(head, justify="left" if head == "name" else "right")
    for r in table.rows:
        offset = "-" if r.supervisor else f"{r.offset} ({r.offset:#x})"
        t.add_row(str(r.number), r.name + (" [S]" if r.supervisor else ""), str(r.size), offset,
                  f"{r.compacted_offset} ({r.compacted_offset:#x})", _yes(r.aligned),
                  _yes(r.xfd))
    con = _console()
    con.print(f"{title}, mask {table.mask:#x}")
    con.print(t)
    con.print(f"standard size:  {table.standard_size} ({table.standard_size:#x}) bytes "
              "(user components)")
    con.print(f"compacted size: {table.compacted_size} ({table.compacted_size:#x}) bytes "
              f"(XCOMP_BV = {table.mask:#x})")
    if any(r.supervisor for r in table.rows):
        con.print("[S] supervisor component (IA32_XSS): compacted format (XSAVES) only")


def run_layout(args: argparse.Namespace) -> int:
    if args.arch == "arm64":
        return _run_layout_arm64(args)
    if args.vl is not None:
        raise FpstateError("--vl is an arm64 option: add --arch arm64")
    profile = resolve_cpu(args.cpu or "host")
    mask = profile.xfeatures_supported if args.mask is None else parse_mask_text(args.mask)
    table = layout_table(profile, mask)
    if args.json:
        sys.stdout.write(json.dumps(table.to_dict()) + "\n")
    else:
        print_table(profile, table)
    return 0


def _run_layout_arm64(args: argparse.Namespace) -> int:
    """``layout --arch arm64``: fpstate.arm64.layout's rows for the CPU's (or --vl's) VLs."""
    if args.mask is not None:
        raise FpstateError("--mask is an x86 option (XSAVE components)")
    if args.cpu == "host":
        raise FpstateError("this machine is not arm64: --arch arm64 takes a bundled arm64 "
                           "profile or its JSON")
    from fpstate.arm64.cpu import load_profile as load_arm64
    from fpstate.arm64.layout import fpsimd_rows, sve_rows, za_rows
    from fpstate.kernel.arm64.state import HostCaps

    name = args.cpu or "fvp-aem-fpmr"
    caps = HostCaps.from_profile(load_arm64(name))
    rows = fpsimd_rows()
    try:
        # An SME-only CPU has SVE's layout in streaming mode only (NT_ARM_SSVE).
        for info, kind in ((caps.sve_vl, "sve"), (caps.sme_vl if not caps.sve_vl else None,
                                                  "ssve"), (caps.sme_vl, "za")):
            if info is None:
                continue
            vl = args.vl if args.vl is not None else info.max_vl
            if vl != info.find_supported_vector_length(vl):
                raise FpstateError(f"--vl {vl}: {name} implements "
                                   f"{', '.join(str(q * 16) for q in sorted(info.vqs))}")
            rows += za_rows(vl, caps.sme2) if kind == "za" else sve_rows(vl, kind == "ssve")
    except ValueError as e:
        raise FpstateError(f"--vl: {e}") from None
    if args.vl is not None and not (caps.sve_vl or caps.sme_vl):
        raise FpstateError(f"--vl: {name} has no SVE and no SME (no vector length)")
    if args.json:
        sys.stdout.write(json.dumps({"cpu": name, "rows": [
            {"group": r.group, "name": r.name, "regset": r.regset, "sigframe": r.sigframe,
             "size": r.size, "where": r.where} for r in rows]}) + "\n")
        return 0
    t = Table()
    for head in ("", "register", "regset", "sigframe record", "size", "macro"):
        t.add_column(head, justify="right" if head in ("regset", "sigframe record", "size")
                     else "left")
    for r in rows:
        t.add_row(r.group, r.name, "-" if r.regset is None else f"{r.regset:#x}",
                  "-" if r.sigframe is None else f"{r.sigframe:#x}",
                  str(r.size) if r.size else "", r.where)
    con = _console()
    con.print(f"arm64 register layout of {name}: offsets in NT_ARM_SVE/SSVE/ZA/ZT and from the "
              "start of sve_context/za_context/zt_context")
    con.print(t)
    return 0


def run_cpus(args: argparse.Namespace) -> int:
    profiles = [bundled_profile(name) for name in list_profiles()]
    if args.json:
        rows = [{"name": p.name, "vendor": p.vendor, "cpu": p.brand,
                 "xcr0_supported": p.xcr0_supported, "xss_supported": p.xss_supported,
                 "source": p.source} for p in profiles]
        sys.stdout.write(json.dumps(rows) + "\n")
        return 0
    t = Table()
    for head in ("name", "vendor", "CPU", "XCR0", "XSS"):
        t.add_column(head, justify="right" if head in ("XCR0", "XSS") else "left")
    for p in profiles:
        t.add_row(p.name, p.vendor, p.brand, f"{p.xcr0_supported:#x}", f"{p.xss_supported:#x}")
    con = _console()
    con.print("Bundled CPU profiles (fpstate layout --cpu NAME)")
    con.print(t)
    return 0
