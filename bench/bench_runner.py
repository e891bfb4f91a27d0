"""Programs per second of the real-CPU runner (fpstate.host.runner), both spawn modes.

Run: python3 bench/bench_runner.py [count]
"""

from __future__ import annotations

import struct
import sys
import time

from fpstate.host.runner import host_xsave, run_program
from fpstate.x86.program import Buffer, Insn, Program


def main(count: int = 500) -> None:
    host = host_xsave()
    start = bytearray(host.size)
    struct.pack_into("<HI", start, 0, 0x037F, 0)
    struct.pack_into("<I", start, 24, 0x1F80)
    program = Program(bytes(start), (
        Insn("MOVDQU", reg=3, data=bytes(range(16))), Insn("XGETBV", reg=1),
        Insn("XSAVE", buf=0, mask=host.xcr0), Insn("STMXCSR")), (Buffer(),))
    for spawn in ("vfork", "fork"):
        n = count if spawn == "vfork" else max(count // 10, 10)
        run_program(program, spawn)
        t = time.perf_counter()
        for _ in range(n):
            run_program(program, spawn)
        dt = time.perf_counter() - t
        print(f"{spawn:6} {n / dt:8.0f} programs/s ({dt / n * 1e6:.0f} us each, {n} runs)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 500)
