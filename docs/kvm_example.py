"""Regenerate docs/kvm-example.md: a guest's XSAVES output and a KVM_GET_XSAVE2 buffer, decoded
side by side, model and real.

    python3 docs/kvm_example.py [--seed 0x4b] [-o docs/kvm-example.md] [--blobs DIR]

Part A, guest XSAVES. A guest program at CPL 0 with XCR0 = 0xe7 (set by the guest's XSETBV) and
IA32_XSS = CET_U (the guest's WRMSR) loads ZMM0, ZMM1, ZMM16 and k1, loads CET_U with XRSTORS
and saves everything with XSAVES. The model runs it as a guest of KVM with a vendor module that
gives guests XSAVES (kvm_amd, `VENDOR_D1_EAX["svm"]`) on this machine's CPU
(`fpstate.kvm.x86.vcpu.run_guest_program`, i.e. `fpstate.x86.insn.run_program` on the guest's
hardware after KVM's XSETBV and IA32_XSS rules); `fpstate decode --format xsaves` decodes its
buffer. The same program is then tried on this machine's real /dev/kvm, every way it could run,
and what stops it is shown as measured, beside the model of *this* KVM (configured from what
it reports) for the same attempt.

Part B, KVM_GET_XSAVE2. A real vCPU's guest loads ZMM0-31 and k0-7 with the pattern of SEED at
CPL 3 (the program of ``fpstate decode kvm:SEED``, `fpstate.tools.sources`); KVM_GET_XSAVE2
gives its buffer. The model runs the same guest program on the CPU model, its registers go into
the model vCPU through a KVM_RUN (`fpstate.kvm.x86.conform_guest.load_guest_registers`), and the
model's KVM_GET_XSAVE2 (`fpstate.kvm.x86.x86`) gives its buffer. Both are decoded and compared
byte for byte. tests/kvm/test_kvm_example.py runs this comparison.
"""

from __future__ import annotations

import argparse
import os
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fpstate.errors import FpstateError
from fpstate.host.child import opmask_pattern, zmm_pattern
from fpstate.kvm.x86.cpuid import find_cpuid
from fpstate.kvm.x86.vcpu import model_vmm, run_guest_program
from fpstate.tools.blob import Blob, decode
from fpstate.x86.cpuid import CpuidProfile
from fpstate.x86.profiles import load_profile
from fpstate.x86.program import Buffer, Insn, Program

if TYPE_CHECKING:
    from fpstate.kvm.x86.conform_host import Context

XCR0, CET_U = 0xE7, 0x800
#: The CPU profile of part A's model side (the real sides need this machine to have AVX-512).
MODEL_CPU = "zen5"
ALL_ONES = (1 << 64) - 1
U_CET, PL3_SSP = 0x1, 0x7FFFFFFFEFF8  # SH_STK_EN; a canonical, 8-byte aligned shadow stack
#: legacy-region and header fields, for naming where two buffers differ
LEGACY = (("x87 control/status", 0, 24), ("MXCSR", 24, 4), ("MXCSR_MASK", 28, 4),
          ("x87 registers", 32, 128), ("XMM registers", 160, 256), ("reserved", 416, 48),
          ("sw_reserved (XCR0 at 464)", 464, 48), ("XSTATE_BV", 512, 8), ("XCOMP_BV", 520, 8),
          ("header reserved", 528, 48))


def start_image(size: int = 576) -> bytes:
    """The program's start image: FCW 037FH, MXCSR 1F80H, XSTATE_BV 0 (all in init)."""
    img = bytearray(size)
    struct.pack_into("<H", img, 0, 0x037F)
    struct.pack_into("<I", img, 24, 0x1F80)
    return bytes(img)


def xsaves_program(seed: int, cpl: int = 0) -> Program:
    """Part A: ZMM0, ZMM1, ZMM16 and k1 loads, XRSTORS of CET_U (U_CET, PL3_SSP) from buffer 1
    (compacted, XCOMP_BV = bit 63 | CET_U), then XSAVES of everything into buffer 0."""
    cet = bytearray(592)
    struct.pack_into("<QQ", cet, 512, CET_U, 1 << 63 | CET_U)
    struct.pack_into("<QQ", cet, 576, U_CET, PL3_SSP)
    insns = [Insn("VMOVDQU64", reg=n, data=zmm_pattern(n, seed)) for n in (0, 1, 16)]
    insns += [Insn("KMOVQ", reg=1, data=opmask_pattern(1, seed).to_bytes(8, "little")),
              Insn("XRSTORS", buf=1, mask=CET_U), Insn("XSAVES", buf=0, mask=ALL_ONES)]
    return Program(start_image(), tuple(insns), (Buffer(), Buffer(bytes(cet))), cpl=cpl)


def loads_program(seed: int, size: int) -> Program:
    """Part B: what ``fpstate decode kvm:SEED`` runs in its guest (CPL 3, XCR0 0xe7)."""
    insns = [Insn("VMOVDQU64", reg=n, data=zmm_pattern(n, seed)) for n in range(32)]
    insns += [Insn("KMOVQ", reg=n, data=opmask_pattern(n, seed).to_bytes(8, "little"))
              for n in range(8)]
    return Program(start_image(size), tuple(insns), cpl=3)


# -- part A -----------------------------------------------------------------------------------


def model_guest_xsaves(seed: int) -> bytes:
    """The guest's XSAVES buffer on the model: KVM (SVM vendor) on a Zen 5 CPU (`MODEL_CPU`,
    the CPU this document was made on: XCR0 0xe7 needs AVX-512), the guest CPUID = the
    model's KVM_GET_SUPPORTED_CPUID (XSAVES, XSS CET_U|CET_S)."""
    v = model_vmm(load_profile(MODEL_CPU), vendor="svm")
    vcpu = v.create_vcpu(v.create_vm())
    assert v.set_cpuid2(vcpu, v.supported_cpuid_0xd()) == 0
    (out,) = run_guest_program(vcpu, xsaves_program(seed), xcr0=XCR0, xss=CET_U, preempt=False)
    if out.fault is not None:
        raise FpstateError(f"the model's guest XSAVES program faulted: {out.fault}")
    return out.buffers[0]


@dataclass(frozen=True, slots=True)
class Attempt:
    """One way to run part A on this machine: what the model of this KVM says, what happened."""

    what: str
    model: str
    real: str


def _result(fn: Callable[[], Any]) -> str:
    from fpstate.host.kvm_guest import HostError

    try:
        out = fn()
    except (FpstateError, HostError) as e:
        return f"{type(e).__name__}: {e}"
    if isinstance(out, list):
        (out,) = out
    if out.fault is not None:
        return f"{out.fault.vector} at step {out.fault_step} ({out.fault.reason})"
    return "ran to the end, no fault"


def real_guest_xsaves(ctx: Context, seed: int) -> list[Attempt]:
    """Part A on this machine's /dev/kvm, each way it could run, beside the model of this KVM
    (`fpstate.kvm.x86.conform_host.Context`: configured from what this KVM reports)."""
    from fpstate.host.runner import run_program as run_user
    from fpstate.kvm.x86.conform_host import _host_entries

    prog = xsaves_program(seed)
    v = ctx.vmm()
    mvcpu = ctx.model_vcpu(v)
    g = ctx.guest_machine()
    claimed = tuple(replace(e, eax=e.eax | 0xF, ecx=0x1800)
                    if (e.function, e.index) == (0xD, 1) else e for e in ctx.entries)
    cv = ctx.vmm()
    cvcpu = ctx.model_vcpu(cv, claimed)
    gc = ctx.guest_machine(cpuid=_host_entries(claimed))
    held = find_cpuid(gc.vcpu.get_cpuid2(), 0xD, 1)
    bare = [Insn("XSAVES", buf=0, mask=ALL_ONES)]
    return [
        Attempt("the program, IA32_XSS = CET_U, guest CPUID = KVM_GET_SUPPORTED_CPUID",
                _result(lambda: run_guest_program(mvcpu, prog, xcr0=XCR0, xss=CET_U)),
                _result(lambda: g.run_program(prog, xcr0=XCR0, xss=CET_U))),
        Attempt("the program, guest CPUID claiming XSAVES and CET (CPUID.(0DH,1) EAX 0xf, ECX "
                f"0x1800; KVM_GET_CPUID2 then holds EAX {held.eax:#x}, ECX {held.ecx:#x})",
                _result(lambda: run_guest_program(cvcpu, prog, xcr0=XCR0, xss=CET_U)),
                _result(lambda: gc.run_program(prog, xcr0=XCR0, xss=CET_U))),
        Attempt("the program with IA32_XSS = 0, CPL 0",
                _result(lambda: run_guest_program(mvcpu, prog, xcr0=XCR0)),
                _result(lambda: g.run_program(prog, xcr0=XCR0))),
        Attempt("XSAVES alone at guest CPL 0 (no start-image XRSTOR64)",
                _result(lambda: run_guest_program(mvcpu, Program(start_image(), tuple(bare),
                                                                 (Buffer(),), cpl=0),
                                                  xcr0=XCR0)),
                _result(lambda: g.run_insns(bare, xcr0=XCR0, cpl=0, buffers=[Buffer()]))),
        Attempt("the program at guest CPL 3",
                _result(lambda: run_guest_program(mvcpu, replace(prog, cpl=3), xcr0=XCR0)),
                _result(lambda: g.run_program(replace(prog, cpl=3), xcr0=XCR0))),
        Attempt("the program on the bare CPU (user mode, CPL 3; fpstate.host.runner)",
                "(the CPU model) " + _result(lambda: _bare_model(prog)),
                _result(lambda: run_user(replace(prog, cpl=3)))),
    ]


def _bare_model(prog: Program) -> list[Any]:
    from fpstate.x86.insn import run_program

    return run_program(load_profile("host"), replace(prog, cpl=3), xcr0=XCR0, preempt=False)


# -- part B -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Xsave2Pair:
    model: bytes
    real: bytes
    cli: bytes  #: what ``fpstate decode kvm:SEED`` reads (its own guest)
    xcr0: int


def kvm_get_xsave2_pair(ctx: Context, seed: int) -> Xsave2Pair:
    """The real vCPU's KVM_GET_XSAVE2 after the guest loaded its registers, and the model's
    for the same guest state (see the module docstring)."""
    from fpstate.kvm.x86.conform_guest import load_guest_registers
    from fpstate.tools.sources import read_source

    g = ctx.guest_machine()
    xcr0 = ctx.system.xcr0
    if xcr0 & 0xE0 != 0xE0:
        raise FpstateError(f"part B needs AVX-512 in XCR0; this host's is {xcr0:#x}")
    prog = loads_program(seed, g.standard_size(xcr0))
    out = g.run_program(prog, xcr0=xcr0)
    if out.fault is not None:
        raise FpstateError(f"the real guest faulted loading its registers: {out.fault}")
    real = g.vcpu.get_xsave2()
    v = ctx.vmm()
    mvcpu = ctx.model_vcpu(v)
    mout = load_guest_registers(ctx, v, mvcpu, prog, xcr0)
    assert mout.key() == out.key(), "the model's outcome of the guest program differs"
    model = v.get_xsave2(mvcpu)
    cli = read_source(f"kvm:{seed:#x}")[0].data
    return Xsave2Pair(model, real, cli, xcr0)


def compare_line(model: bytes, real: bytes, profile: CpuidProfile) -> str:
    """"identical: N bytes", or the regions (legacy fields, header, components) that differ."""
    if model == real:
        return f"identical: {len(real)} bytes"
    if len(model) != len(real):
        return f"sizes differ: model {len(model)} bytes, real {len(real)} bytes"
    regions = list(LEGACY)
    for i in range(2, 64):
        try:
            c = profile.component(i)
        except FpstateError:
            continue
        if not c.supervisor:
            regions.append((f"component {i}", c.offset, c.size))
    out = []
    for name, at, size in regions:
        diff = [k for k in range(at, min(at + size, len(real))) if model[k] != real[k]]
        if diff:
            out.append(f"{name} ({len(diff)} bytes from {diff[0]})")
    return "differ: " + ", ".join(out)


# -- rendering ----------------------------------------------------------------------------------


def _short(value: str) -> str:
    return value if len(value) <= 36 else f"{value[:20]}…{value[-8:]}"


def side_by_side(model: Blob, real: Blob, per_component: int = 2) -> str:
    """A markdown table: header fields, each component's state and its first registers, model
    beside real (long values shortened; a row per component says whether the rest agree)."""
    rows = [("format, size", f"{model.fmt}, {model.size}", f"{real.fmt}, {real.size}"),
            ("XSTATE_BV", f"{model.xstate_bv:#x}", f"{real.xstate_bv:#x}"),
            ("XCOMP_BV", f"{model.xcomp_bv:#x}", f"{real.xcomp_bv:#x}")]
    if model.xcr0 is not None or real.xcr0 is not None:
        rows.append(("XCR0 (u64 at 464)", f"{model.xcr0 or 0:#x}", f"{real.xcr0 or 0:#x}"))
    md = {c.number: c for c in model.components}
    for rc in real.components:
        mc = md.get(rc.number)
        rows.append((f"**[{rc.number}] {rc.name}** at {rc.offset:#x}",
                     mc.state if mc else "(absent)", rc.state))
        mregs = dict(mc.registers) if mc else {}
        shown = [(n, v) for n, v in rc.registers if v or mregs.get(n)]
        for n, value in shown[:per_component]:
            rows.append((f"{n}", _short(f"{mregs.get(n, 0):#x}"), _short(f"{value:#x}")))
        rest = shown[per_component:]
        if rest:
            same = all(mregs.get(n) == val for n, val in rest)
            rows.append((f"{rest[0][0]} … {rest[-1][0]}",
                         f"{len(rest)} more registers",
                         "the same values" if same else "**differ** (see the full decodes)"))
    mark = ["" if m == r or "more registers" in m else " ✗" for _, m, r in rows]
    lines = ["| | model | real |", "|---|---|---|"]
    lines += [f"| {n} | `{m}` | `{r}`{x} |" for (n, m, r), x in zip(rows, mark, strict=True)]
    return "\n".join(lines)


def cli(*args: str) -> str:
    """``fpstate ARGS``: its output, verbatim, as the command prints it."""
    out = subprocess.run([sys.executable, "-m", "fpstate.cli", *args], capture_output=True,
                         text=True, check=False)
    return (out.stdout + out.stderr).rstrip()


def render(seed: int, blobs: Path) -> str:
    from fpstate.kvm.x86.conform_host import Context

    host = load_profile("host")
    xsaves = model_guest_xsaves(seed)
    xsaves_path = blobs / "model-guest-xsaves.bin"
    xsaves_path.write_bytes(xsaves[:4096])
    ctx = Context()
    try:
        attempts = real_guest_xsaves(ctx, seed)
        pair = kvm_get_xsave2_pair(ctx, seed)
        backend, ctx_xcr0 = ctx.backend, ctx.system.xcr0
    finally:
        ctx.close()
    model_path = blobs / "model-kvm-get-xsave2.bin"
    model_path.write_bytes(pair.model)
    real_path = blobs / "real-kvm-get-xsave2.bin"
    real_path.write_bytes(pair.real)
    mblob, rblob = decode(pair.model, host, "kvm"), decode(pair.real, host, "kvm")
    xs = decode(xsaves[:4096], host, "xsaves")
    prog = xsaves_program(seed)
    listing = "\n".join(f"  {n}: {_insn_text(i, seed)}" for n, i in enumerate(prog.insns))
    table = "\n".join(f"| {a.what} | {a.model} | {a.real} |" for a in attempts)
    return TEMPLATE.format(
        seed=f"{seed:#x}", listing=listing, backend=backend, u_cet=U_CET, pl3_ssp=PL3_SSP,
        machine=f"{_cpu_name()}, XCR0 {ctx_xcr0:#x}, Linux {os.uname().release}",
        xsaves_decode=cli("decode", "--format", "xsaves", "--cpu", "host", str(xsaves_path))
        .replace(str(blobs) + "/", ""),
        xsaves_cet=f"{xs.component(11).register('u_cet'):#x}" if _has(xs, 11) else "?",
        attempts=table,
        side=side_by_side(mblob, rblob),
        compare=compare_line(pair.model, pair.real, host),
        cli_same="identical" if pair.cli == pair.real else "DIFFERENT",
        real_decode=cli("decode", f"kvm:{seed:#x}", "--cpu", "host"),
        model_decode=cli("decode", "--format", "kvm", "--cpu", "host", str(model_path))
        .replace(str(blobs) + "/", ""),
    )


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def _insn_text(insn: Insn, seed: int) -> str:
    if insn.mnemonic == "VMOVDQU64":
        return f"VMOVDQU64 zmm{insn.reg}, [64 bytes: zmm_pattern({insn.reg}, {seed:#x})]"
    if insn.mnemonic == "KMOVQ":
        return f"KMOVQ k{insn.reg}, [8 bytes: opmask_pattern({insn.reg}, {seed:#x})]"
    return f"{insn.mnemonic} [buffer {insn.buf}]   ; EDX:EAX = {insn.mask:#x}"


def _has(blob: Blob, i: int) -> bool:
    return any(c.number == i for c in blob.components)


TEMPLATE = """\
# Worked example: a guest's XSAVES output and a KVM_GET_XSAVE2 buffer, model and real

Generated by `python3 docs/kvm_example.py --seed {seed}` on this machine -- {machine},
/dev/kvm backend `{backend}` -- and every block below is real output of that run.
`tests/kvm/test_kvm_example.py` re-runs the comparison of part B.

## A. A guest's XSAVES output (CET_U in IA32_XSS, guest XCR0 0xe7)

The guest sets XCR0 = 0xe7 with XSETBV and IA32_XSS = 0x800 (CET_U) with WRMSR, both at CPL 0,
XRSTOR64s a start image with every component in its initial state, then runs:

```
{listing}
```

Buffer 1 is a compacted image with XCOMP_BV = bit 63 | CET_U, XSTATE_BV = CET_U, IA32_U_CET =
{u_cet:#x} (SH_STK_EN) and IA32_PL3_SSP = {pl3_ssp:#x}.

### Model

A KVM that gives guests XSAVES (the model's kvm_amd, `vendor="svm"`, on this machine's CPUID
profile; KVM_GET_SUPPORTED_CPUID.(0DH,1) = EAX 0xf, ECX 0x1800) runs the program:
`fpstate.kvm.x86.vcpu.run_guest_program` applies KVM's rules to the guest's XSETBV
(`kvm_emulate_xsetbv`) and WRMSR IA32_XSS (`kvm_set_msr_common`), then runs it on the CPU
model of the guest's hardware (`fpstate.x86.insn.run_program`, CPL 0, IA32_XSS = 0x800).
Buffer 0 afterwards (`docs/kvm_example.py --blobs DIR` keeps the file):

```
$ fpstate decode --format xsaves --cpu host model-guest-xsaves.bin
{xsaves_decode}
```

XCOMP_BV = bit 63 | XCR0 | IA32_XSS (RFBM = EDX:EAX & (XCR0 | IA32_XSS)); XSTATE_BV = XINUSE &
RFBM: x87 was never touched, so XSAVES did not write it (the zero bytes are what the buffer
held, which the decoder flags); CET_U follows Hi16_ZMM at 2432 in the compacted layout, holding
IA32_U_CET = {xsaves_cet}.

### Real (this machine's /dev/kvm)

The same program cannot run in a guest here. Each way of trying it, beside what the model of
*this* KVM (configured from what it reports: no XSAVES in KVM_GET_SUPPORTED_CPUID.(0DH,1),
supported_xss 0) answers:

| attempt | model of this KVM | real |
|---|---|---|
{attempts}

So: this KVM offers no XSAVES and no IA32_XSS to guests (`kvm_pvm` runs guest CPL 0 in
hardware ring 3 and clears XSAVES), a guest CPUID that claims them is rewritten and the guest's
WRMSR IA32_XSS takes #GP, XSAVE-family instructions at guest CPL 0 end in KVM's instruction
emulator (`KVM_EXIT_INTERNAL_ERROR`, the first of them being the runner's own start-image
XRSTOR64), and at CPL 3 XSAVES is #UD in the guest and #GP on the bare CPU. The model agrees
wherever the two are compared; the CPL 0 row is `kvm_pvm`'s documented divergence
(`fpstate.host.kvm_guest.BACKEND_DIVERGENCES["kvm_pvm"]["no_xstate_at_cpl0"]`), where a
VMX/SVM KVM -- and the model -- run the instruction and raise its #UD. No XSAVES output with
IA32_XSS can be taken from this machine; `fpstate conform --layer kvm` lists the same
measurements under its `guest-xsaves` skip.

## B. KVM_GET_XSAVE2 of a real vCPU and of the model, same guest state

The guest loads ZMM0-31 and k0-7 with the pattern of seed {seed} at CPL 3 (what
`fpstate decode kvm:{seed}` runs). Real: KVM_GET_XSAVE2 of that vCPU. Model: the same program
on the CPU model of the guest's hardware, its registers written into the model vCPU by a
KVM_RUN (guest XSETBV 0xe7, then one write per component in use), then the model's
KVM_GET_XSAVE2 (`kvm_vcpu_ioctl_x86_get_xsave2` -> `fpu_copy_guest_fpstate_to_uabi`, from the
guest fpstate the model's kernel saved with XSAVES at VM exit). The model of KVM is configured
only with what this KVM reports (`fpstate.kvm.x86.conform_host.Context`).

{side}

**Byte comparison: {compare}.** (The buffer `fpstate decode kvm:{seed}` reads from its own
guest is {cli_same} to the real one above.)

<details><summary>Full decodes</summary>

```
$ fpstate decode kvm:{seed} --cpu host
{real_decode}
```

```
$ fpstate decode --format kvm --cpu host model-kvm-get-xsave2.bin
{model_decode}
```

</details>
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=lambda s: int(s, 0), default=0x4B)
    ap.add_argument("-o", "--output", type=Path,
                    default=Path(__file__).with_name("kvm-example.md"))
    ap.add_argument("--blobs", type=Path, default=None,
                    help="keep the decoded buffers in this directory")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        blobs = args.blobs or Path(tmp)
        blobs.mkdir(parents=True, exist_ok=True)
        text = render(args.seed, blobs)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
