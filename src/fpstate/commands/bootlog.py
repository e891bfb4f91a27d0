"""``fpstate boot-log``: the ``x86/fpu:`` boot lines a kernel prints on a CPU.

``fpstate boot-log --cpu {host|NAME|PATH} [--kernel V] [--json] [--compare]``

- prints the lines fpu__init_system_xstate() (fpstate.kernel.x86.xstate) predicts for the CPU;
  ``--kernel`` picks a modelled kernel version (default: for ``--cpu host`` the running kernel,
  else the newest);
- ``--json`` prints the whole BootResult (fpu_kernel_cfg, fpu_user_cfg, guest_default_cfg,
  init_fpstate, XCR0/IA32_XSS, dropped features with their reasons, lines; masks as integers);
- ``--compare`` (``--cpu host`` only) diffs the prediction against the ``x86/fpu:`` lines of
  this machine's kernel log and exits 1 when they differ.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys

from fpstate.errors import FpstateError
from fpstate.kernel.x86.versions import NEWEST, VERSION_NAMES, kernel_version, version_for_release
from fpstate.kernel.x86.xstate import fpu__init_system_xstate
from fpstate.x86.profiles import load_profile


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "boot-log",
        help="the x86/fpu: boot lines a kernel prints on a CPU",
        description="Boot-time xstate sizing (fpu__init_system_xstate) of a kernel version on a "
        "CPU: its exact 'x86/fpu:' lines, or the whole result as JSON.",
    )
    p.add_argument("--cpu", default="host", metavar="{host|NAME|PATH}",
                   help="'host' (execute CPUID), a bundled profile (see 'fpstate cpus') or a "
                   "CPUID dump file (PATH#SELECTOR picks one entry of a list); default: host")
    p.add_argument("--kernel", metavar="V",
                   help=f"kernel version, one of {', '.join(VERSION_NAMES)} (default: the "
                   f"running kernel for --cpu host, else {NEWEST})")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    p.add_argument("--compare", action="store_true",
                   help="(--cpu host) diff against the kernel log; exit 1 on a difference")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.compare and args.cpu != "host":
        raise FpstateError("--compare needs --cpu host (only this machine's log can be read)")
    if args.kernel is not None:
        kernel = kernel_version(args.kernel)
    elif args.cpu == "host":
        kernel = version_for_release(os.uname().release)
    else:
        kernel = kernel_version(NEWEST)
    result = fpu__init_system_xstate(load_profile(args.cpu), kernel)
    if not args.compare:
        if args.json:
            sys.stdout.write(result.to_json())
        else:
            sys.stdout.write("".join(line + "\n" for line in result.lines))
        return 0
    from fpstate.host.dmesg import host_fpu_lines

    host = host_fpu_lines()
    same = list(result.lines) == list(host)
    if args.json:
        sys.stdout.write(json.dumps({"kernel": result.kernel, "equal": same,
                                     "model": list(result.lines), "host": list(host)},
                                    indent=2) + "\n")
    elif same:
        sys.stdout.write(f"identical: {len(host)} x86/fpu lines (model for kernel "
                         f"{result.kernel}, dmesg of {os.uname().release})\n")
    else:
        diff = difflib.unified_diff(list(host), list(result.lines), "dmesg",
                                    f"model (kernel {result.kernel})", lineterm="")
        sys.stdout.write("".join(line + "\n" for line in diff))
    return 0 if same else 1
