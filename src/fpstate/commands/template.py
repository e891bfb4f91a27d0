"""``fpstate template``: CPUID leaf 0xD for a guest of a pool of hosts, or a check of one.

- ``fpstate template [CPU ...] [--xcr0 MASK] [--xss MASK] [--json | --firecracker | --qemu]
  [-o OUT]``: the largest leaf 0xD every CPU of the pool can honour (or that of the masks
  asked for), what it leaves out and why, and the CPUID flags to clear with it
  (`fpstate.tools.template.pool_template`). Exit 0; 2 when the pool cannot give the masks.
- ``fpstate template --check FILE [CPU ...] [--vendor vmx|svm] [--guest-kernel V] [--json]``:
  what KVM and a Linux guest (of version V) make of the template FILE on each CPU
  (`check_template`). Exit 0 when no CPU has a problem, 1 otherwise, 2 on bad input.

- ``fpstate template --arch arm64 CPU... [--json] [-o OUT]``: the ID registers and SVE vector
  lengths a VMM gives a guest of those arm64 hosts (`fpstate.tools.template_arm64`). Exit 0
  when the guest sees the same on every host, 1 otherwise.

x86 CPUs are 'host', bundled profiles or CPUID dumps, as for ``fpstate layout --cpu``; default:
this machine. For 'host' KVM's capabilities are what this machine's /dev/kvm reports
(`measured_offer`), and ``--check`` also gives it the template (`probe_host`); elsewhere, and
here without /dev/kvm, KVM is the model's.
"""

from __future__ import annotations

import argparse
import json
import sys

from fpstate.commands.layout import mask_arg, resolve_cpu
from fpstate.errors import HostUnavailable
from fpstate.inputs import write_output
from fpstate.tools.template import (
    HostOffer,
    TemplateError,
    check_template,
    format_check,
    format_template,
    host_offer,
    measured_offer,
    pool_template,
    read_template,
)
from fpstate.x86.cpuid import CpuidProfile


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "template", help="CPUID leaf 0xD for a guest of a pool of hosts, or check one",
        description="The CPUID leaf 0xD a VMM can give a guest that moves between the CPUs "
        "named (each CPU's KVM must offer every component with the same size and offset), or "
        "with --check what KVM and a Linux guest make of a template on each CPU. Exit 0 if "
        "fine, 1 if a check finds problems, 2 on bad input.")
    p.add_argument("--arch", default="x86", choices=("arm64", "x86"),
                   help="x86 (default): CPUID leaf 0xD; arm64: the ID registers and SVE "
                   "vector lengths a VMM sets (KVM_SET_ONE_REG)")
    p.add_argument("cpus", nargs="*", metavar="CPU",
                   help="'host', a bundled profile (fpstate cpus) or a CPUID dump; "
                   "default: host")
    p.add_argument("--xcr0", type=mask_arg, metavar="MASK",
                   help="the user features to offer (default: every one the pool shares)")
    p.add_argument("--xss", type=mask_arg, metavar="MASK",
                   help="the supervisor features to offer (default: every one the pool "
                   "shares)")
    p.add_argument("--check", metavar="FILE",
                   help="check this template (fpstate template --json, a list of "
                   "kvm_cpuid_entry2 objects, a Firecracker custom CPU template, or a guest's "
                   "CPUID dump such as cpuid -r) on each CPU")
    p.add_argument("--guest-kernel", metavar="V",
                   help="--check: the Linux version the guest boots (default: the newest "
                   "modelled)")
    p.add_argument("--vendor", choices=("vmx", "svm"),
                   help="--check: KVM's vendor module (default: from each CPU's vendor)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON")
    out.add_argument("--firecracker", action="store_true",
                     help="print a Firecracker custom CPU template (cpuid_modifiers)")
    out.add_argument("--qemu", action="store_true",
                     help="print QEMU's -cpu argument (host,-flag...): QEMU derives leaf 0xD "
                     "from the flags")
    p.add_argument("-o", "--output", metavar="OUT", help="file to write (default: stdout)")
    p.set_defaults(run=run_template)


def _offer(spec: str, cpu: CpuidProfile, vendor: str | None) -> tuple[HostOffer, bool]:
    """The KVM of CPU ``spec``: for 'host', what this machine's KVM reports (measured: True),
    else (or without /dev/kvm, with a note) the model of KVM on that CPU."""
    if spec == "host" and vendor is None:
        try:
            return measured_offer(cpu), True
        except HostUnavailable as e:
            sys.stderr.write(f"fpstate: note: {e}: KVM on this CPU is modelled, not asked\n")
    return host_offer(cpu, vendor), False


def run_arm64(args: argparse.Namespace) -> int:
    """--arch arm64: `fpstate.tools.template_arm64`; exit 1 when the guest cannot see the
    same thing on every host."""
    from fpstate.arm64.cpu import load_profile
    from fpstate.tools.template_arm64 import format_template_arm64, pool_template_arm64

    if not args.cpus:
        raise TemplateError("--arch arm64 needs the pool's CPUs (arm64 profile names or files)")
    for flag, given in (("--check", args.check), ("--xcr0", args.xcr0), ("--xss", args.xss),
                        ("--firecracker", args.firecracker or None), ("--qemu", args.qemu or None),
                        ("--vendor", args.vendor),
                        ("--guest-kernel", args.guest_kernel)):
        if given is not None:
            raise TemplateError(f"{flag} is x86's (for arm64, fpstate compat --arch arm64 "
                                "checks a VM configuration on a host)")
    t = pool_template_arm64([load_profile(c) for c in args.cpus])
    write_output((json.dumps(t.to_json(), indent=2) if args.json
                  else format_template_arm64(t)) + "\n", args.output)
    return 0 if t.uniform else 1


def run_template(args: argparse.Namespace) -> int:
    if args.arch == "arm64":
        return run_arm64(args)
    specs = args.cpus or ["host"]
    cpus = [resolve_cpu(c) for c in specs]
    if args.check is not None:
        if args.xcr0 is not None or args.xss is not None or args.firecracker or args.qemu:
            raise TemplateError("--check takes no --xcr0, --xss, --firecracker or --qemu")
        checks = []
        for spec, cpu in zip(specs, cpus, strict=True):
            offer, measured = _offer(spec, cpu, args.vendor)
            checks.append(check_template(read_template(args.check, cpu), cpu, offer=offer,
                                         probe=measured, guest_kernel=args.guest_kernel))
        if args.json:
            text = json.dumps([c.to_json() for c in checks], indent=2)
        else:
            text = "\n\n".join(format_check(c) for c in checks)
        write_output(text + "\n", args.output)
        return 0 if all(c.ok for c in checks) else 1
    if args.vendor is not None or args.guest_kernel is not None:
        raise TemplateError("--vendor and --guest-kernel go with --check")
    offers = [_offer(spec, cpu, None)[0] for spec, cpu in zip(specs, cpus, strict=True)]
    t = pool_template(cpus, xcr0=args.xcr0, xss=args.xss, offers=offers)
    if args.json:
        text = json.dumps(t.to_json(), indent=2)
    elif args.firecracker:
        text = json.dumps(t.to_firecracker(), indent=2)
    elif args.qemu:
        cpu, notes = t.to_qemu()
        text = "\n".join([f"-cpu {cpu}", *(f"# {n}" for n in notes)])
    else:
        text = format_template(t)
    write_output(text + "\n", args.output)
    return 0


