"""``fpstate conform``: the model against the real machine, on N random cases, per layer.

``fpstate conform --layer LAYER [--samples N] [--seed N] [--json]`` runs N generated cases on
the model and on the host of one layer and reports every case whose host answer is not among
the model's allowed answers. With ``--json`` it prints ``{"layer", "cases", "mismatches":
[{"case", "program", "model", "host"}...], "skipped": [reasons]}``; otherwise a summary.
Exit status 0 only when nothing mismatched; a layer the host cannot answer (no x86-64, no
XSAVE, no /dev/kvm ...) is reported as skipped, with the reason, and exits 0.

Layers are a registry (`LAYERS`): each is a `Layer` whose ``run(samples, seed)`` returns a
`LayerResult`. The ``cpu`` layer is here (`fpstate.x86.progen` programs, `fpstate.x86.insn`
against `fpstate.host.runner`); the kernel and KVM layers live in their own modules, named in
`LAYER_MODULES`, which call `register_layer` when imported.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from fpstate.commands import positive_int
from fpstate.errors import FpstateError, HostUnavailable, ProgramError
from fpstate.x86.program import Insn, Outcome, Program


@dataclass(frozen=True, slots=True)
class LayerResult:
    """What one layer's run found."""

    layer: str
    cases: int
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "cases": self.cases, "mismatches": self.mismatches,
                "skipped": self.skipped}


@dataclass(frozen=True, slots=True)
class Layer:
    """One layer of the stack that the model and the host both answer."""

    name: str
    description: str
    run: Callable[[int, int], LayerResult]  #: (samples, seed) -> result


LAYERS: dict[str, Layer] = {}
#: Modules that register further layers when imported (kernel, KVM).
LAYER_MODULES: tuple[str, ...] = ("fpstate.kernel.x86.conform", "fpstate.kvm.x86.conform")


def register_layer(layer: Layer) -> Layer:
    """Add ``layer`` to the registry (a layer module calls this at import)."""
    assert layer.name not in LAYERS or LAYERS[layer.name] is layer, layer.name
    LAYERS[layer.name] = layer
    return layer


def layers() -> dict[str, Layer]:
    """Every registered layer (imports `LAYER_MODULES` first)."""
    for name in LAYER_MODULES:
        importlib.import_module(name)
    return LAYERS


# --- JSON forms of programs and outcomes ----------------------------------------------------


def program_to_json(program: Program) -> dict[str, Any]:
    """A program as JSON (bytes as hex) that `program_from_json` reads back."""
    return {
        "cpl": program.cpl,
        "start": program.start.hex(),
        "buffers": [{"data": b.data.hex(), "misalign": b.misalign, "pkey": b.pkey}
                    for b in program.buffers],
        "insns": [{"mnemonic": i.mnemonic, "buf": i.buf, "mask": i.mask, "reg": i.reg,
                   "value": i.value, "data": i.data.hex(), "text": str(i)}
                  for i in program.insns],
    }


def program_from_json(obj: Any) -> Program:
    """The program of a mismatch record (`program_to_json`), checked (`check_program`); a
    malformed record is a ProgramError naming what is wrong, never a KeyError."""
    from fpstate.x86.program import Buffer, check_program

    def integer(value: Any, what: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ProgramError(f"program JSON: {what} {value!r} is not an integer")
        return value

    def hexbytes(value: Any, what: str) -> bytes:
        try:
            return bytes.fromhex(value)
        except (TypeError, ValueError):
            raise ProgramError(f"program JSON: {what} is not a hex string") from None

    try:
        program = Program(
            start=hexbytes(obj["start"], "start"),
            insns=tuple(Insn(i["mnemonic"] if isinstance(i["mnemonic"], str) else "?",
                             *(integer(i[k], f"insns[{n}].{k}")
                               for k in ("buf", "mask", "reg", "value")),
                             hexbytes(i["data"], f"insns[{n}].data"))
                        for n, i in enumerate(obj["insns"])),
            buffers=tuple(Buffer(hexbytes(b["data"], f"buffers[{n}].data"),
                                 integer(b["misalign"], f"buffers[{n}].misalign"),
                                 integer(b.get("pkey", 0), f"buffers[{n}].pkey"))
                          for n, b in enumerate(obj["buffers"])),
            cpl=integer(obj["cpl"], "cpl"),
        )
    except (KeyError, TypeError, IndexError) as e:
        raise ProgramError(f"program JSON: missing or malformed field {e}") from None
    check_program(program)
    return program


def outcome_to_json(o: Outcome) -> dict[str, Any]:
    """An outcome, its large byte strings as SHA-256 digests."""
    def digest(b: bytes | None) -> str | None:
        return hashlib.sha256(b).hexdigest() if b is not None else None

    return {"fault": o.fault.vector if o.fault else None,
            "reason": o.fault.reason if o.fault else None, "fault_step": o.fault_step,
            "values": list(o.values), "xinuse": o.xinuse,
            "buffers_sha256": [digest(b) for b in o.buffers], "final_sha256": digest(o.final)}


# --- the cpu layer ------------------------------------------------------------------------


def run_cpu_layer(samples: int, seed: int) -> LayerResult:
    """``samples`` programs from `fpstate.x86.progen` (case n uses seed ``seed + n``) on
    `fpstate.host.runner.run_program` and then on `fpstate.x86.insn.run_program`, told
    where the host ran each instruction (so an FLD's x87 pointers are known)."""
    from fpstate.host import native

    start = time.monotonic()
    if not native.is_x86_64():
        import platform

        return LayerResult("cpu", 0, skipped=[f"the host is {platform.machine()}, not x86-64"])
    from fpstate.host.runner import host_xsave
    from fpstate.host.runner import run_program as host_run
    from fpstate.x86.insn import run_program as model_run
    from fpstate.x86.profiles import load_profile
    from fpstate.x86.progen import RandomDraw, generate_program

    try:
        host_xsave()
    except HostUnavailable as e:
        return LayerResult("cpu", 0, skipped=[str(e)])
    profile = load_profile("host")
    mismatches = []
    for n in range(samples):
        program = generate_program(RandomDraw(seed + n), profile, placed=True)
        host = host_run(program)
        try:
            model = model_run(profile, program, placement=host.placement)
        except FpstateError as e:
            mismatches.append({"case": seed + n, "program": program_to_json(program),
                               "placement": _placement_json(host),
                               "model": f"error: {e}", "host": outcome_to_json(host)})
            continue
        if not any(o.key() == host.key() for o in model):
            closest = min(model, key=lambda o: len(o.differences(host)))
            mismatches.append({
                "case": seed + n, "program": program_to_json(program),
                "placement": _placement_json(host),
                "model": [outcome_to_json(o) for o in model],
                "host": outcome_to_json(host), "differences": closest.differences(host)})
    return LayerResult("cpu", samples, mismatches, [], time.monotonic() - start)


def _placement_json(host: Outcome) -> list[list[int | None]]:
    """Where the host ran each instruction, [address, operand address, FOP, CS, DS] (what the
    model needs to replay the case: `fpstate.x86.insn.run_program`'s ``placement``; the
    selectors, which the 32-bit save forms store where the CPU keeps them, null where the
    runner did not read them)."""
    return [[p.address, p.operand, p.fop, p.cs, p.ds] for p in host.placement or ()]


register_layer(Layer("cpu", "x86 instruction programs: CPU model vs this CPU (CPL 3)",
                     run_cpu_layer))


# --- command line ---------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "conform",
        help="run random cases on the model and on this machine, report mismatches",
        description="Generate random cases for one layer, answer each with the model and with "
        "the real machine, and report every case whose real answer the model does not allow. "
        "Exit 0 only when nothing mismatched (a layer the host cannot answer is skipped).",
    )
    p.add_argument("--layer", required=True, metavar="LAYER",
                   help=f"which layer: {', '.join(sorted(layers()))}")
    p.add_argument("--samples", type=positive_int, default=500, metavar="N",
                   help="number of cases (default 500)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="first seed (case n uses seed N + n; default 0)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a summary")
    p.set_defaults(run=run_conform)


def run_conform(args: argparse.Namespace) -> int:
    known = layers()
    if args.layer not in known:
        raise FpstateError(f"unknown layer {args.layer!r}; known: {', '.join(sorted(known))}")
    if args.samples < 0:
        raise FpstateError(f"--samples {args.samples}: must be 0 or more")
    result = known[args.layer].run(args.samples, args.seed)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        _summary(result)
    return 1 if result.mismatches else 0


def _summary(result: LayerResult) -> None:
    console = Console()
    table = Table(title=f"fpstate conform --layer {result.layer}")
    for col in ("layer", "cases", "mismatches", "skipped", "seconds"):
        table.add_column(col, justify="right" if col in ("cases", "mismatches") else "left")
    table.add_row(result.layer, str(result.cases), str(len(result.mismatches)),
                  "; ".join(result.skipped) or "-", f"{result.seconds:.1f}")
    console.print(table)
    for m in result.mismatches[:10]:
        insns = ("; ".join(i["text"] for i in m["program"]["insns"]) if m.get("program")
                 else m.get("what", ""))
        console.print(f"[red]case {m['case']}[/red]: {insns}")
        for line in m.get("differences", [m["model"]] if isinstance(m["model"], str) else []):
            console.print(f"    {line}")
    if len(result.mismatches) > 10:
        console.print(f"... and {len(result.mismatches) - 10} more (--json lists them all)")
