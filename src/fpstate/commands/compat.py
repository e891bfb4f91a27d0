"""``fpstate compat --arch ARCH SRC DST [--json]``: can a VM move from SRC to DST?

For ``--arch arm64`` SRC and DST are bundled arm64 profile names (``neoverse-n1``,
``neoverse-v1``, ``neoverse-v2``, ``apple-m4``, ``fvp-aem-fpmr``), arm64 profile JSON files,
or VM configuration JSON files (see `fpstate.tools.compat_arm64`).  The report lists what
the guest or the VMM would lose, what would become visible, and which ioctls the
destination KVM would refuse.  Exit status: 0 safe, 1 unsafe, 2 bad input.

For ``--arch x86`` (the default) SRC and DST are x86 CPU profiles ('host', bundled names, CPUID
dumps) and ``--kernel`` picks the modelled kernel on both sides (see `fpstate.tools.compat`).

Each architecture is one entry of `ARCH_RUNNERS`: a function (args) -> exit status; the
x86 side is added there (and to ``--arch``'s choices) by its own module.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from fpstate.errors import FpstateError
from fpstate.kvm.arm64.config import UPSTREAM, VARIANTS
from fpstate.tools.compat_arm64 import compat_arm64, format_report, load_vm_config


def run_arm64(args: argparse.Namespace) -> int:
    if args.guest_xcr0 is not None:
        raise FpstateError("--guest-xcr0 is an x86 option (an arm64 VM's features are in its "
                           "configuration file)")
    src, dst = load_vm_config(args.src), load_vm_config(args.dst)
    report = compat_arm64(src, dst, args.variant or UPSTREAM)
    if args.json:
        sys.stdout.write(json.dumps(report.to_json(), indent=2) + "\n")
    else:
        sys.stdout.write(format_report(report) + "\n")
    return 0 if report.safe else 1


def run_x86(args: argparse.Namespace) -> int:
    """x86: SRC and DST are CPU profiles ('host', bundled names, CPUID dumps); see
    `fpstate.tools.compat`."""
    from fpstate.kernel.x86.versions import NEWEST
    from fpstate.tools.compat import compat_x86
    from fpstate.tools.compat import format_report as format_x86
    from fpstate.x86.profiles import load_profile
    from fpstate.x86.xfeatures import parse_mask

    guest_xcr0 = None if args.guest_xcr0 is None else parse_mask(args.guest_xcr0)
    report = compat_x86(load_profile(args.src), load_profile(args.dst), args.kernel or NEWEST,
                        guest_xcr0)
    if args.json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        sys.stdout.write(format_x86(report) + "\n")
    return 0 if report.safe else 1


ARCH_RUNNERS: dict[str, Callable[[argparse.Namespace], int]] = {"arm64": run_arm64,
                                                                 "x86": run_x86}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compat",
        help="migration compatibility of a VM between two CPUs",
        description="Whether a VM configured on SRC can be restored on DST: what it would "
        "lose, what would become visible, and what the destination KVM refuses. Exit 0 if "
        "safe, 1 if not, 2 on bad input.",
    )
    p.add_argument("--arch", default="x86", choices=sorted(ARCH_RUNNERS),
                   help="architecture of SRC and DST (default x86)")
    p.add_argument("src", metavar="SRC", help="source: profile name or JSON file")
    p.add_argument("dst", metavar="DST", help="destination: profile name or JSON file")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--kernel", metavar="V",
                   help="x86: the kernel version on both sides (default: the newest modelled)")
    p.add_argument("--guest-xcr0", metavar="MASK",
                   help="x86: the XSAVE features the VM's CPU model offers (hex, or names such "
                        "as 'x87|sse|avx'; default: every feature SRC's KVM supports)")
    p.add_argument("--variant", choices=sorted(VARIANTS),
                   help="arm64: run a KVM design the seeds rejected (default: upstream)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    return ARCH_RUNNERS[args.arch](args)
