"""AMX on the real kernel: first use without permission, tiles across a signal and a fork.

Kernel paths exercised (only where the CPU has AMX and the kernel offers XTILE_DATA):
``exc_device_not_available -> handle_xfd_event -> xfd_enable_feature`` (no permission: -EPERM,
SIGILL with ILL_ILLOPC; with permission: fpstate_realloc to the permitted size), then
``copy_fpstate_to_sigframe`` with the larger user_size (tiles written only while in use,
XFEATURE_MASK_SIGFRAME_INITOPT) and ``fpu_clone`` (tile data is not copied to a child,
the permission is: fpu_inherit_perms).

Theory of operation: the tile programs are machine code emitted into the probes of
`fpstate.host.signals` and `fpstate.host.process` through their ``prelude`` hook, right after
the pattern registers are loaded: ``arch_prctl(ARCH_REQ_XCOMP_PERM, XTILE_DATA)``, LDTILECFG of
`tile_config()`, TILELOADD of all eight tiles from `tile_data()` (stride 64) and, for the
"released" state, TILERELEASE. The tile bytes live in a MAP_SHARED page made before the fork.
Elsewhere every entry point raises HostUnavailable naming what is missing.
"""

from __future__ import annotations

import ctypes
import signal
import struct
from collections.abc import Callable

from fpstate.errors import FpstateError, HostUnavailable
from fpstate.host import native
from fpstate.host.child import (
    PAGE,
    SA_RESTORER,
    SA_SIGINFO,
    SYS,
    Asm,
    CodePages,
    SharedMemory,
    raw_syscall,
    run_child,
)

ARCH_GET_XCOMP_SUPP = 0x1021
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILE_DATA = 18
XFEATURE_MASK_XTILE = 0x60000
TILES, ROWS, COLSB = 8, 16, 64  #: palette 1: 8 tiles of 16 rows x 64 bytes (CPUID 0x1D)
TILE_BYTES = ROWS * COLSB
STATES = ("permitted", "in-use", "released")


def amx_unavailable() -> str | None:
    """Why this host cannot run the AMX probes, or None."""
    try:
        native.require_x86_64()
    except HostUnavailable as e:
        return str(e)
    if not (native.cpuid(7, 0)[3] >> 24) & 1:
        return "host lacks AMX: CPUID.(EAX=7,ECX=0):EDX[24]=0"
    out = ctypes.c_uint64()
    ret = raw_syscall(SYS["arch_prctl"], ARCH_GET_XCOMP_SUPP, ctypes.addressof(out))
    if ret or out.value & XFEATURE_MASK_XTILE != XFEATURE_MASK_XTILE:
        return (f"kernel does not offer AMX tile data: ARCH_GET_XCOMP_SUPP returned {ret}, "
                f"{out.value:#x}")
    return None


def require_amx() -> None:
    reason = amx_unavailable()
    if reason:
        raise HostUnavailable(reason)


def tile_config() -> bytes:
    """The 64-byte XTILECFG: palette 1, start_row 0, every tile 16 rows of 64 bytes."""
    cfg = bytearray(64)
    cfg[0] = 1
    for n in range(TILES):
        struct.pack_into("<H", cfg, 16 + 2 * n, COLSB)
        cfg[48 + n] = ROWS
    return bytes(cfg)


def tile_data() -> bytes:
    """8 KiB of XTILEDATA as XSAVE stores it (tile n at n * 1024, row r at r * 64): every
    byte nonzero and distinct per tile and row."""
    return bytes(((0x80 | n << 4 | r) ^ c) & 0xFF or 0x5A
                 for n in range(TILES) for r in range(ROWS) for c in range(COLSB))


def emit_tiles(asm: Asm, cfg: int, data: int, *, load: bool, release: bool) -> None:
    """Machine code: ARCH_REQ_XCOMP_PERM(XTILE_DATA); if ``load`` LDTILECFG [cfg] and
    TILELOADD tmm0..7 from ``data`` (stride COLSB); if ``release`` TILERELEASE. Clobbers RAX,
    RCX, RDX, RSI, RDI, R11 (the syscall) -- never a vector register."""
    C, In, M, R = asm.C, asm.In, asm.M, asm.R
    asm.syscall(SYS["arch_prctl"], ARCH_REQ_XCOMP_PERM, XFEATURE_XTILE_DATA)
    if load:
        asm.mov_imm(R.RSI, cfg)
        asm.emit(In.create_mem(C.VEX_LDTILECFG_M512, M(R.RSI)))
        asm.mov_imm(R.RSI, data)
        asm.mov_imm(R.RCX, COLSB)
        for n in range(TILES):
            asm.emit(In.create_reg_mem(C.VEX_TILELOADD_TMM_SIBMEM, R.TMM0 + n,
                                       M(R.RSI, R.RCX, 1, n * TILE_BYTES, 8)))  # disp32
    if release:
        asm.emit(In.create(C.VEX_TILERELEASE))


def _tile_prelude(state: str) -> tuple[Callable[[Asm], None], SharedMemory]:
    if state not in STATES:
        raise FpstateError(f"AMX state {state!r} is not one of {', '.join(STATES)}")
    shm = SharedMemory(PAGE + TILES * TILE_BYTES)
    shm.write(0, tile_config())
    shm.write(PAGE, tile_data())

    def prelude(asm: Asm) -> None:
        emit_tiles(asm, shm.address, shm.address + PAGE, load=state != "permitted",
                   release=state == "released")

    return prelude, shm


def raise_signal_with_tiles(state: str) -> tuple[object, tuple[bytes, bytes]]:
    """`fpstate.host.signals.raise_signal` after AMX permission ("permitted"), with every
    tile loaded ("in-use"), or loaded then released ("released"). Returns the SignalRun and
    the (XTILECFG, XTILEDATA) bytes the tiles held."""
    from fpstate.host.signals import raise_signal

    require_amx()
    prelude, shm = _tile_prelude(state)
    run = raise_signal(prelude=prelude)
    del shm
    return run, (tile_config(), tile_data())


def inherit_after_tiles() -> object:
    """`fpstate.host.process.inherit` ("fork") with AMX permitted and every tile in use in
    the parent: the InheritRun."""
    from fpstate.host.process import inherit

    require_amx()
    prelude, shm = _tile_prelude("in-use")
    run = inherit("fork", prelude=prelude)
    del shm
    return run


def first_use_without_permission() -> tuple[int, int]:
    """TILERELEASE in a child that never asked for AMX: the kernel's answer to the XFD #NM
    (signal number, si_code) as a machine-code SIGILL handler saw it."""
    require_amx()
    shm = SharedMemory(PAGE)

    def body() -> int:
        pages = CodePages(2)
        h = Asm()
        C, In, M, R = h.C, h.In, h.M, h.R
        h.mov_imm(R.R8, shm.address)
        h.emit(In.create_reg_mem(C.MOV_R32_RM32, R.EAX, M(R.RSI)))
        h.emit(In.create_mem_reg(C.MOV_RM32_R32, M(R.R8), R.EAX))
        h.emit(In.create_reg_mem(C.MOV_R32_RM32, R.EAX, M(R.RSI, displ=8)))
        h.emit(In.create_mem_reg(C.MOV_RM32_R32, M(R.R8, displ=4), R.EAX))
        h.exit_group(0)
        handler = pages.place(0, h)
        act = (ctypes.c_uint64 * 4)(handler, SA_SIGINFO | SA_RESTORER, handler, 0)
        if raw_syscall(SYS["rt_sigaction"], signal.SIGILL, ctypes.addressof(act), 0, 8):
            return 3
        main = Asm()
        main.emit(main.In.create(main.C.VEX_TILERELEASE))
        main.exit_group(9)
        pages.call(pages.place(1, main))
        return 6

    ex = run_child(body)
    if ex.exit_code != 0:
        raise HostUnavailable(f"AMX first-use probe ended with {ex} (no SIGILL was caught)")
    signo, si_code = struct.unpack_from("<ii", shm.mem, 0)
    return signo, si_code
