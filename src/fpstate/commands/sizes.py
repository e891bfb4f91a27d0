"""``fpstate sizes --cpu CPU [--kernel V] [--json]``: the xstate sizes of a CPU and kernel.

The table gives each figure with the kernel rule it comes from (`fpstate.tools.sizes`); with
``--cpu host`` a column shows what this machine measures for every figure it can answer (and
why not, for the others). ``--json`` prints exactly the keys user_default_size, user_max_size,
kernel_default_size, kernel_max_size, at_minsigstksz, sigframe_xstate_size {no_perm,
perm_unused, in_use}, sigaltstack_min {no_perm, perm}, ptrace_xstate_size, kvm_xsave2_size
{no_guest_perm, guest_perm} (the model's values).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from rich.table import Table

from fpstate.arm64.cpu import load_profile
from fpstate.commands.layout import _console, resolve_cpu
from fpstate.errors import FpstateError
from fpstate.kernel.x86.versions import NEWEST, VERSION_NAMES, kernel_version, version_for_release
from fpstate.tools import sizes_arm64
from fpstate.tools.sizes import Sizes, compute_sizes, measure_host


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sizes", help="xstate sizes of a CPU and kernel (and, on the host, measured)",
        description="User/kernel default and max sizes, AT_MINSIGSTKSZ, signal-frame xstate "
        "sizes, the smallest sigaltstack, the ptrace regset and KVM_CAP_XSAVE2, each with the "
        "kernel rule it comes from.")
    p.add_argument("--arch", default="x86", choices=("x86", "arm64"),
                   help="x86 (default) or arm64: AT_MINSIGSTKSZ, frames, regsets and buffers "
                   "of an arm64 profile")
    p.add_argument("--cpu", default=None, metavar="CPU",
                   help="'host', a bundled profile (fpstate cpus) or a CPUID dump; default host "
                   f"(--arch arm64: a bundled arm64 profile or its JSON, default {ARM64_CPU})")
    p.add_argument("--kernel", metavar="V", choices=VERSION_NAMES,
                   help=f"kernel version (default: the running kernel for host, else {NEWEST})")
    p.add_argument("--json", action="store_true", help="print the model's figures as JSON")
    p.set_defaults(run=run)


def _table(sizes: Sizes, host: bool, what: str = "xstate sizes") -> None:
    t = Table()
    t.add_column("figure")
    t.add_column("model", justify="right")
    if host:
        t.add_column("measured", justify="right")
    t.add_column("rule / how measured")
    for f in sizes.figures:
        row = [f.key, str(f.value)]
        if host:
            mark = "" if f.measured is None or f.measured == f.value else "  DIFFERS"
            row.append("-" if f.measured is None else f"{f.measured}{mark}")
            row.append(f"{f.rule}\n(measured: {f.how})" if f.how else f.rule)
        else:
            row.append(f.rule)
        t.add_row(*row)
    con = _console()
    con.print(f"{what} of {sizes.cpu} under kernel {sizes.kernel} (model)")
    con.print(t)


def run(args: argparse.Namespace) -> int:
    if args.arch == "arm64":
        return _run_arm64(args)
    profile = resolve_cpu(args.cpu or "host")
    host = (args.cpu or "host") == "host" and profile.name == "host"
    if args.kernel:
        kernel = kernel_version(args.kernel).name
    elif host:
        kernel = version_for_release(os.uname().release).name
    else:
        kernel = NEWEST
    sizes = compute_sizes(profile, kernel)
    if args.json:
        sys.stdout.write(json.dumps(sizes.to_dict(), indent=1) + "\n")
        return 0
    if host:
        sizes = measure_host(sizes, profile)
    _table(sizes, host)
    return 0


#: The arm64 profile `sizes --arch arm64` reads without --cpu (SVE, SME2 and FPMR).
ARM64_CPU = "fvp-aem-fpmr"


def _run_arm64(args: argparse.Namespace) -> int:
    if args.kernel:
        raise FpstateError(f"--kernel {args.kernel} is an x86 kernel version; the arm64 "
                           f"figures are v{sizes_arm64.KERNEL}'s")
    if args.cpu == "host":
        raise FpstateError("this machine is not arm64: --arch arm64 takes a bundled arm64 "
                           "profile or its JSON")
    sizes = sizes_arm64.compute_sizes(load_profile(args.cpu or ARM64_CPU))
    if args.json:
        sys.stdout.write(json.dumps(sizes.to_dict(), indent=1) + "\n")
    else:
        _table(sizes, False, "arm64 FP sizes")
    return 0
