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

from fpstate.errors import HostUnavailable, MaskError
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
    p.add_argument("--cpu", default="host", metavar="{host|NAME|PATH}",
                   help="'host' (execute CPUID), a bundled profile (see 'fpstate cpus') or a "
                   "CPUID dump file (cpuid -r, AIDA64, corpus JSON; PATH#SELECTOR picks one "
                   "entry of a list); default: host")
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
    profile = resolve_cpu(args.cpu)
    mask = profile.xfeatures_supported if args.mask is None else parse_mask_text(args.mask)
    table = layout_table(profile, mask)
    if args.json:
        sys.stdout.write(json.dumps(table.to_dict()) + "\n")
    else:
        print_table(profile, table)
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
