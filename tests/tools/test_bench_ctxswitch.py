"""bench/bench_ctxswitch.py: the machine code of each variant (the AMX set-up is checked
instruction by instruction, since this host cannot run it), the model's bytes per switch, and a
short real ping-pong on this host showing the XINUSE each state class holds."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from iced_x86 import Code, Decoder, Register

from fpstate.errors import HostUnavailable
from fpstate.host.amx import COLSB, TILE_BYTES, tile_config
from fpstate.x86.profiles import bundled_profile

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_ctxswitch",
                                               ROOT / "bench" / "bench_ctxswitch.py")
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

SHM = 0x7F00_0000_0000
BASE = 0x7E00_0000_0000
SPR_XCR0 = 0x602E7  #: x87|SSE|AVX|AVX-512|PKRU|TILECFG|TILEDATA


def _decoded(variant: str) -> list:
    code = bench.ping_pong_program(variant, SHM, SPR_XCR0, 0, 10, 5, 6).assemble(BASE)
    return list(Decoder(64, code, ip=BASE))


def _imm_before(insns: list, i: int, reg: int) -> int:
    """The last MOV reg, imm64 before instruction ``i``."""
    for ins in reversed(insns[:i]):
        if ins.code == Code.MOV_R64_IMM64 and ins.op0_register == reg:
            return ins.immediate64
    raise AssertionError(f"no MOV {reg}, imm before {i}")


def test_amx_variant_loads_every_tile_after_the_permission_request() -> None:
    insns = _decoded("amx")
    codes = [i.code for i in insns]
    # init state first: XRSTOR with RFBM lacking the tiles (XFD would #NM before permission)
    x = codes.index(Code.XRSTOR64_MEM)
    rfbm = _imm_before(insns, x, Register.RDX) << 32 | _imm_before(insns, x, Register.RAX)
    assert rfbm == SPR_XCR0 & ~0x60000
    # then arch_prctl(ARCH_REQ_XCOMP_PERM, XTILE_DATA) before LDTILECFG
    ld = codes.index(Code.VEX_LDTILECFG_M512)
    sc = max(k for k in range(ld) if codes[k] == Code.SYSCALL)
    assert _imm_before(insns, sc, Register.RAX) == 158  # __NR_arch_prctl
    assert _imm_before(insns, sc, Register.RDI) == 0x1023
    assert _imm_before(insns, sc, Register.RSI) == 18
    assert x < sc < ld
    assert _imm_before(insns, ld, Register.RSI) == SHM + bench.TILECFG_OFF
    loads = [i for i in insns if i.code == Code.VEX_TILELOADD_TMM_SIBMEM]
    assert [i.op0_register for i in loads] == [Register.TMM0 + n for n in range(8)]
    assert [i.memory_displacement for i in loads] == [n * TILE_BYTES for n in range(8)]
    assert all(i.memory_index == Register.RCX for i in loads)
    first = insns.index(loads[0])
    assert _imm_before(insns, first, Register.RCX) == COLSB
    assert _imm_before(insns, first, Register.RSI) == SHM + bench.TILEDATA_OFF
    # the loop comes after the tiles, and no TILERELEASE drops them
    assert codes.index(Code.XGETBV) > insns.index(loads[-1])
    assert Code.VEX_TILERELEASE not in codes
    assert tile_config()[0] == 1 and tile_config()[16] == COLSB


def test_variants_set_up_what_they_name() -> None:
    plain = [i.code for i in _decoded("init")]
    assert Code.XRSTOR64_MEM in plain and Code.VEX_LDTILECFG_M512 not in plain
    both = [i.code for i in _decoded("avx512+amx")]
    assert Code.XRSTOR64_MEM not in both and Code.VEX_LDTILECFG_M512 in both
    with pytest.raises(ValueError, match="not one of"):
        bench.ping_pong_program("sse", SHM, SPR_XCR0, 0, 1, 5, 6)


def test_model_bytes_per_switch_on_sapphire_rapids() -> None:
    """No component modified between switches: XSAVES writes the 64-byte header only; XRSTORS
    reads the header and every in-use component -- 8 KiB of tile data and the 64-byte TILECFG
    on top of the AVX-512 set."""
    spr = bundled_profile("sapphire-rapids")
    assert bench.predicted_bytes(0, spr) == 128
    # header x2, then SSE (the legacy region's 256), YMM_Hi128, opmask, ZMM_Hi256, Hi16_ZMM
    avx512 = 64 + 64 + 256 + 256 + 64 + 512 + 1024
    assert bench.predicted_bytes(0xE6, spr) == avx512
    assert bench.predicted_bytes(0x600E6, spr) == avx512 + 64 + 8192


@pytest.mark.host
def test_ping_pong_xinuse_on_this_host() -> None:
    from fpstate.host.child import register_class

    try:
        rc = register_class()
    except HostUnavailable as e:
        pytest.skip(str(e))
    cpu = max(os.sched_getaffinity(0))
    ns, x0, x1 = bench.run_pair("init", 200, cpu)
    # x87 may count as in use (FCW); so may SSE: a task preempted without writing anything can
    # find XINUSE[1] set (fpstate.x86.insn.preemptions; on the Emerald Rapids guest in about
    # half the runs of 200 round trips) -- never AVX or AVX-512 state
    assert ns > 0 and x0 & ~0x3 == 0 and x1 & ~0x3 == 0, (hex(x0), hex(x1))
    if bench.available("avx512") is None:
        _, x0, x1 = bench.run_pair("avx512", 200, cpu)
        assert x0 & 0xE7 == 0xE7 and x1 & 0xE7 == 0xE7, (hex(x0), hex(x1))
    why = bench.available("amx")
    if why is None:
        _, x0, x1 = bench.run_pair("amx", 200, cpu)
        assert x0 & 0x60000 == 0x60000 and x1 & 0x60000 == 0x60000
    else:
        assert "AMX" in why or "XTILE" in why.upper(), why
        assert rc.xcr0 & 0x60000 == 0 or "kernel" in why
