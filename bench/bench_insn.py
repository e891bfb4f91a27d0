"""Model instructions per second for each XSAVE variant, beside the host runner's programs/s.

    python3 bench/bench_insn.py [--profile NAME] [--seconds S]

For each variant the model executes the instruction on a `fpstate.x86.cpu.Cpu` in a loop (all
components in use, 64-byte aligned area, RFBM = XCR0 or XCR0 | IA32_XSS), and the host runner
runs a one-instruction program of it (only where the host can: CPL 3, the CPU has it). The
last column is model instructions/s divided by host programs/s: how many model instructions
one real program costs in wall time. Numbers are from this machine; nothing is asserted.
"""

from __future__ import annotations

import argparse
import struct
import time
from collections.abc import Callable

from rich.console import Console
from rich.table import Table

from fpstate.x86 import insn as X
from fpstate.x86 import insn_regs as R
from fpstate.x86.cpu import Area, Cpu, machine
from fpstate.x86.impl import for_profile
from fpstate.x86.insn import compacted_offsets, default_xcr0
from fpstate.x86.layout import standard_size
from fpstate.x86.profiles import load_profile
from fpstate.x86.program import BUFFER_SIZE, Buffer, Insn, Program


def _loaded_cpu(profile, xss: int) -> Cpu:
    """A CPU whose every component holds non-initial data (XRSTORS of a compacted image)."""
    m = machine(profile)
    xcr0 = default_xcr0(profile)
    cpu = Cpu(m, for_profile(profile), xcr0=xcr0, xss=xss, cpl=0)
    rfbm = xcr0 | xss
    image = bytearray(BUFFER_SIZE)
    struct.pack_into("<HHBB", image, 0, 0x027F, 0, 0xFF, 0)
    struct.pack_into("<I", image, 24, 0x1F80)
    image[160:416] = b"\x11" * 256
    for i, off in compacted_offsets(m, 1 << 63 | rfbm):
        if i in (17, 18):
            continue  # TILECFG must be a valid configuration: leave AMX initial
        size = m.components[i].size
        image[off:off + size] = struct.pack("<Q", 4) * (size // 8)  # valid CET/PASID values
    struct.pack_into("<QQ", image, 512, rfbm & ~0x60000, 1 << 63 | rfbm)
    assert X.XRSTORS(cpu, Area(image, ("setup",)), rfbm) is None
    return cpu


def _rate(fn: Callable[[], object], seconds: float) -> float:
    n, start = 0, time.perf_counter()
    while True:
        for _ in range(50):
            fn()
        n += 50
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n / elapsed


def model_rates(profile, seconds: float) -> dict[str, float]:
    xss = profile.xss_supported & 0x1C00  # PASID, CET_U, CET_S where the CPU has them
    cpu = _loaded_cpu(profile, xss)
    xcr0 = cpu.xcr0
    std = Area(bytearray(BUFFER_SIZE), ("bench",))
    comp = Area(bytearray(BUFFER_SIZE), ("bench",))
    sup = Area(bytearray(BUFFER_SIZE), ("bench",))
    assert X.XSAVE(cpu, std, xcr0) is None and X.XSAVEC(cpu, comp, xcr0) is None
    assert X.XSAVES(cpu, sup, xcr0 | xss) is None
    m = cpu.machine
    cases: dict[str, Callable[[], object]] = {
        "XSAVE": lambda: X.XSAVE(cpu, std, xcr0),
        "XSAVEOPT": lambda: X.XSAVEOPT(cpu, std, xcr0),
        "XSAVEC": lambda: X.XSAVEC(cpu, comp, xcr0),
        "XSAVES": lambda: X.XSAVES(cpu, sup, xcr0 | xss),
        "XRSTOR (standard)": lambda: X.XRSTOR(cpu, std, xcr0),
        "XRSTOR (compacted)": lambda: X.XRSTOR(cpu, comp, xcr0),
        "XRSTORS": lambda: X.XRSTORS(cpu, sup, xcr0 | xss),
        "FXSAVE": lambda: R.FXSAVE(cpu, std),
        "FXRSTOR": lambda: R.FXRSTOR(cpu, std),
    }
    rates = {}
    for name, fn in cases.items():
        needs = {"XSAVEOPT": "XSAVEOPT", "XSAVEC": "XSAVEC", "XRSTOR (compacted)": "XSAVEC",
                 "XSAVES": "XSAVES", "XRSTORS": "XSAVES"}.get(name)
        if needs and not m.has(needs):
            continue
        cpu.cpl = 0
        assert fn() is None, name
        rates[name] = _rate(fn, seconds)
    return rates


def host_rates(seconds: float) -> dict[str, float] | str:
    """One-instruction programs per second on the host runner, or why there are none."""
    from fpstate.errors import FpstateError
    from fpstate.host import native

    if not native.is_x86_64():
        return "the host is not x86-64"
    try:
        from fpstate.host.runner import host_lacks, host_xsave, run_program

        host = host_xsave()
    except FpstateError as e:
        return str(e)
    start = struct.pack("<HHBBHQQII", 0x27F, 0, 0xFF, 0, 0, 0, 0, 0x1F80, 0).ljust(
        standard_size(load_profile("host"), host.xcr0), b"\0")
    start = start[:512] + struct.pack("<Q", host.xcr0) + start[520:]
    area = Buffer(start)
    rates = {}
    for name in ("XSAVE", "XSAVEOPT", "XSAVEC", "XRSTOR (standard)", "FXSAVE", "FXRSTOR"):
        mn = name.split()[0]
        if host_lacks(mn):
            continue
        prog = Program(start, (Insn(mn, buf=0, mask=host.xcr0),), (area,))
        assert run_program(prog).fault is None, name
        rates[name] = _rate(lambda p=prog: run_program(p), seconds)
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="host", help="CPU profile for the model (default host)")
    ap.add_argument("--seconds", type=float, default=0.5, help="time per measurement")
    args = ap.parse_args()
    profile = load_profile(args.profile)
    model = model_rates(profile, args.seconds)
    host = host_rates(args.seconds) if args.profile == "host" else "profile is not the host"
    table = Table(title=f"XSAVE variants: model ({profile.name}) and host runner")
    for col in ("instruction", "model insns/s", "host programs/s", "model/host"):
        table.add_column(col, justify="left" if col == "instruction" else "right")
    for name, rate in model.items():
        h = host.get(name) if isinstance(host, dict) else None
        table.add_row(name, f"{rate:,.0f}", f"{h:,.0f}" if h else "-",
                      f"{rate / h:.1f}" if h else "-")
    console = Console()
    console.print(table)
    if isinstance(host, str):
        console.print(f"host runner not measured: {host}")


if __name__ == "__main__":
    main()
