"""The real cost of a context switch between two processes, with and without AVX-512 state and
AMX tiles in use, beside the bytes the cost model predicts the kernel moves (in the spirit of
will-it-scale's context_switch1: two processes ping-pong one byte over two pipes).

Both processes are pinned to one CPU, so every hand-over is a context switch: the blocking
read() schedules the other process in, whose return to user mode restores its registers
(switch_fpu_prepare() XSAVES the outgoing task, exit_to_user_mode -> fpregs_restore_userregs()
XRSTORS the incoming one). The loop is machine code making raw syscalls -- no Python and no libc
touch the vector registers inside it -- and it starts from a known state:

- ``init``: XRSTOR of an area whose XSTATE_BV is 0 (every component in its initial
  configuration, XINUSE = 0). RFBM leaves out the tile components: before the permission
  request XFD arms XTILEDATA, and an XRSTOR naming it would raise #NM (SIGILL, no permission);
- ``avx512``: every ZMM, opmask, MXCSR and two x87 registers loaded with patterns
  (`fpstate.host.child.load_patterns`), XINUSE = x87|SSE|AVX|opmask|ZMM_Hi256|Hi16_ZMM;
- ``amx``: the ``init`` state, then ARCH_REQ_XCOMP_PERM(XTILE_DATA), LDTILECFG (palette 1, 8
  tiles of 16 rows x 64 bytes) and TILELOADD of all eight tiles (`fpstate.host.amx.emit_tiles`):
  the first TILELOADD takes the XFD #NM and the kernel grows the fpstate (fpstate_realloc);
  XINUSE = TILECFG|TILEDATA;
- ``avx512+amx``: the ``avx512`` patterns, then the tiles as in ``amx``.

Each process reads XGETBV(1) after its loop to show the state class held. The AMX variants run
only where `fpstate.host.amx.amx_unavailable` finds nothing missing (CPUID AMX-TILE and the
kernel offering XTILEDATA); elsewhere the line says precisely why they are skipped.

The model's figure is `fpstate.tools.cost`: XSAVES writes the header plus the in-use components
the loop modified (none: the modified optimisation skips them) and XRSTORS reads the header plus
the in-use components, from the task's fpstate (the permission-sized one after the first AMX
use, `fpstate.tools.cost.amx_buffer`).

Run: python3 bench/bench_ctxswitch.py [round_trips] [repeats]
"""

from __future__ import annotations

import os
import statistics
import struct
import sys

from fpstate.host.amx import amx_unavailable, emit_tiles, tile_config, tile_data
from fpstate.host.child import (
    SYS,
    Asm,
    CodePages,
    SharedMemory,
    fork_child,
    load_patterns,
    pattern_table,
    register_class,
    wait_child,
)
from fpstate.tools.cost import ClassCost, amx_buffer, restore_bytes, save_bytes
from fpstate.x86.cpuid import CpuidProfile
from fpstate.x86.profiles import load_profile
from fpstate.x86.xfeatures import XFEATURE_MASK_XTILE

SYS_READ, SYS_CLOCK_GETTIME, CLOCK_MONOTONIC = 0, 228, 1
#: Shared memory: pattern table at 0; per process: [t0 (16), t1 (16), xinuse (8)] at 4096 + 64*k;
#: one-byte pipe buffers at 8192 + 64*k; an init XSAVE area at 12288; the 64-byte tile
#: configuration at 16384 and the 8 KiB of tile data at 20480.
T_OFF, BUF_OFF, INIT_OFF, TILECFG_OFF, TILEDATA_OFF = 4096, 8192, 12288, 16384, 20480
SHM_SIZE = TILEDATA_OFF + len(tile_data())
VARIANTS: tuple[str, ...] = ("init", "avx512", "amx", "avx512+amx")


def _loop(a: Asm, shm_address: int, k: int, rounds: int, fd_out: int, fd_in: int,
          first_write: bool) -> None:
    """``rounds`` times: write one byte to fd_out and read one from fd_in (the reader side
    reads first); clock_gettime before and after; XGETBV(1) at the end."""
    C, In, R = a.C, a.In, a.R
    base = shm_address + T_OFF + 64 * k
    buf = shm_address + BUF_OFF + 64 * k
    a.syscall(SYS_CLOCK_GETTIME, CLOCK_MONOTONIC, base)
    a.mov_imm(R.R12, rounds)
    a.label("loop")
    steps = [(SYS["write"], fd_out), (SYS_READ, fd_in)]
    for nr, fd in steps if first_write else steps[::-1]:
        a.syscall(nr, fd, buf, 1)
    a.emit(In.create_reg(C.DEC_RM64, R.R12))
    a.jump("JNE_REL32_64", "loop")
    a.syscall(SYS_CLOCK_GETTIME, CLOCK_MONOTONIC, base + 16)
    a.mov_imm(R.RCX, 1)
    a.emit(In.create(C.XGETBV))
    a.emit(In.create_reg_u32(C.SHL_RM64_IMM8, R.RDX, 32))
    a.emit(In.create_reg_reg(C.OR_R64_RM64, R.RAX, R.RDX))
    a.store_rax(base + 32)


def _init_state(a: Asm, shm_address: int, xcr0: int) -> None:
    """XRSTOR64 from an area with XSTATE_BV = 0, FCW 037FH, MXCSR 1F80H: everything but the
    tiles init (RFBM = XCR0 without TILECFG/TILEDATA, which XFD may arm)."""
    C, In, M, R = a.C, a.In, a.M, a.R
    rfbm = xcr0 & ~XFEATURE_MASK_XTILE
    a.mov_imm(R.RDI, shm_address + INIT_OFF)
    a.mov_imm(R.RAX, rfbm & 0xFFFFFFFF)
    a.mov_imm(R.RDX, rfbm >> 32)
    a.emit(In.create_mem(C.XRSTOR64_MEM, M(R.RDI)))


def ping_pong_program(variant: str, shm_address: int, xcr0: int, k: int, rounds: int,
                      fd_out: int, fd_in: int) -> Asm:
    """Process ``k``'s code: set up the ``variant`` state, ping-pong, XGETBV(1), exit."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is not one of {', '.join(VARIANTS)}")
    a = Asm()
    if variant.startswith("avx512"):
        load_patterns(a, shm_address)
    else:
        _init_state(a, shm_address, xcr0)
    if variant.endswith("amx"):
        emit_tiles(a, shm_address + TILECFG_OFF, shm_address + TILEDATA_OFF, load=True,
                   release=False)
    _loop(a, shm_address, k, rounds, fd_out, fd_in, first_write=k == 0)
    a.exit_group(0)
    return a


def run_pair(variant: str, rounds: int, cpu: int) -> tuple[float, int, int]:
    """(ns per context switch, XINUSE of process 0, of process 1) for one ping-pong run."""
    rc = register_class()
    shm = SharedMemory(SHM_SIZE)
    shm.write(0, pattern_table(0x5C))
    init = bytearray(4096)
    struct.pack_into("<H", init, 0, 0x037F)
    struct.pack_into("<I", init, 24, 0x1F80)
    shm.write(INIT_OFF, bytes(init))
    shm.write(TILECFG_OFF, tile_config())
    shm.write(TILEDATA_OFF, tile_data())
    a_to_b, b_to_a = os.pipe(), os.pipe()

    def child(k: int) -> int:
        os.sched_setaffinity(0, {cpu})
        pages = CodePages(1)
        fd_out, fd_in = (a_to_b[1], b_to_a[0]) if k == 0 else (b_to_a[1], a_to_b[0])
        a = ping_pong_program(variant, shm.address, rc.xcr0, k, rounds, fd_out, fd_in)
        pages.call(pages.place(0, a))
        return 6

    pids = [fork_child(lambda: child(1)), fork_child(lambda: child(0))]
    for fd in (*a_to_b, *b_to_a):
        os.close(fd)
    exits = [wait_child(p, timeout=300) for p in pids]
    if any(e.exit_code != 0 for e in exits):
        raise RuntimeError(f"ping-pong children ({variant}) ended with {exits}")
    t0 = struct.unpack_from("<qq", shm.mem, T_OFF)
    t1 = struct.unpack_from("<qq", shm.mem, T_OFF + 16)
    ns = (t1[0] - t0[0]) * 1_000_000_000 + (t1[1] - t0[1])
    xin = [shm.u64(T_OFF + 64 * k + 32) for k in (0, 1)]
    return ns / (2 * rounds), xin[0], xin[1]


def predicted_bytes(xinuse: int, profile: CpuidProfile | None = None) -> int:
    """The cost model's bytes per switch for a task with ``xinuse`` that modifies nothing
    between switches, on ``profile`` (default: this host) under the newest modelled kernel
    (XSAVES: init and modified optimisations). A task with tiles in use saves into the
    fpstate its first AMX instruction allocated (`fpstate.tools.cost.amx_buffer`)."""
    from fpstate.kvm.x86.vcpu import model_system

    profile = profile if profile is not None else load_profile("host")
    system = model_system(profile)
    rfbm = system.kernel.default_features
    if xinuse & XFEATURE_MASK_XTILE:
        rfbm = amx_buffer(system)[1]
    c = ClassCost(0, rfbm, xinuse & rfbm)
    return int(save_bytes(profile, c, True, True, 0.0) + restore_bytes(profile, c))


def available(variant: str) -> str | None:
    """Why ``variant`` cannot run on this host, or None."""
    rc = register_class()
    if variant.startswith("avx512") and rc.vector_bytes != 64:
        return f"host XCR0 {rc.xcr0:#x} lacks AVX-512 (opmask|ZMM_Hi256|Hi16_ZMM = 0xe0)"
    if variant.endswith("amx"):
        return amx_unavailable()
    return None


def main(rounds: int = 20000, repeats: int = 5) -> None:
    cpu = max(os.sched_getaffinity(0))
    skipped = {v: why for v in VARIANTS if (why := available(v)) is not None}
    variants = [v for v in VARIANTS if v not in skipped]
    results: dict[str, list[float]] = {v: [] for v in variants}
    held: dict[str, set[int]] = {v: set() for v in variants}
    for v in variants:  # warm-up
        run_pair(v, rounds // 10, cpu)
    for _ in range(repeats):
        for v in variants:
            ns, x0, x1 = run_pair(v, rounds, cpu)
            results[v].append(ns)
            held[v] |= {x0, x1}
    base = statistics.median(results["init"])
    print(f"context switch between two processes pinned to CPU {cpu}, {rounds} round trips x "
          f"{repeats}, median ns per switch")
    print(f"{'state':11} {'XINUSE':>8} {'ns/switch':>10} {'min-max':>12} {'ratio':>6} "
          f"{'model bytes/switch':>19}")
    for v in variants:
        med = statistics.median(results[v])
        xin = max(held[v])
        spread = f"{min(results[v]):.0f}-{max(results[v]):.0f}"
        print(f"{v:11} {xin:#8x} {med:10.0f} {spread:>12} {med / base:6.2f} "
              f"{predicted_bytes(xin):19d}")
    for v, why in skipped.items():
        print(f"{v}: skipped: {why}")


if __name__ == "__main__":
    args = [int(x) for x in sys.argv[1:3]]
    main(*args)
