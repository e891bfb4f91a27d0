"""ia32 signal frames of the model: the fsave header, its placement, and sigreturn's folding.

The kernel rules: copy_fpstate_to_sigframe/save_fsave_header/__fpu_restore_sig (fpu/signal.c),
convert_from_fxsr/convert_to_fxsr/twd_* (fpu/regset.c), get_sigframe (signal.c) and
ia32_setup_frame/ia32_setup_rt_frame/sys32_(rt_)sigreturn (signal_32.c). The same facts are
compared with this host's kernel in fpstate.kernel.x86.conform_signal (cases sigframe/ia32-*,
sigreturn/ia32-*).
"""

from __future__ import annotations

import struct

import pytest

from fpstate.kernel.x86 import signal as sg
from fpstate.kernel.x86.regset import (
    FP_EXP_TAG_EMPTY,
    FP_EXP_TAG_SPECIAL,
    FP_EXP_TAG_VALID,
    FP_EXP_TAG_ZERO,
    convert_from_fxsr,
    convert_to_fxsr,
    twd_fxsr_to_i387,
    twd_i387_to_fxsr,
)
from fpstate.kernel.x86.sched import (
    SA_IA32_ABI,
    SA_RESTORER,
    SA_SIGINFO,
    SIGSEGV,
    SIGUSR1,
    Machine,
    SigAction,
    Signal,
    Task,
)

SP = 0xFFFFD3AC  #: a compat task's stack pointer (below 4 GiB)
ONE = (1 << 63).to_bytes(8, "little") + (0x3FFF).to_bytes(2, "little")  #: 1.0, valid
ZERO = bytes(10)
INF = (1 << 63).to_bytes(8, "little") + (0x7FFF).to_bytes(2, "little")  #: special
DENORMAL = (1).to_bytes(8, "little") + bytes(2)  #: exponent 0, significand != 0: special
UNNORMAL = (1 << 62).to_bytes(8, "little") + (0x4000).to_bytes(2, "little")  #: no J bit
TWO = (1 << 63).to_bytes(8, "little") + (0x4000).to_bytes(2, "little")


def _fx(st: list[bytes], top: int, ftw: int, *, fop: int = 0x1DD, fip: int = 0x1_2345_6789,
        fdp: int = 0x2_0000_1000, fcw: int = 0x27F) -> bytearray:
    """A 512-byte FXSAVE64 area: FCW, FSW with TOP, the abridged tag, FOP/FIP/FDP, registers."""
    fx = bytearray(512)
    fx[0:2] = fcw.to_bytes(2, "little")
    fx[2:4] = (top << 11 | 0x0020).to_bytes(2, "little")
    fx[4] = ftw
    fx[6:8] = fop.to_bytes(2, "little")
    fx[8:16] = fip.to_bytes(8, "little")
    fx[16:24] = fdp.to_bytes(8, "little")
    fx[24:28] = (0x1F80).to_bytes(4, "little")
    for i, v in enumerate(st):
        fx[32 + 16 * i:32 + 16 * i + 10] = v
        fx[32 + 16 * i + 10:32 + 16 * i + 16] = bytes([0xEE] * 6)  # reserved slot bytes
    return fx


def test_full_tag_word_classifies_each_physical_register() -> None:
    # TOP = 6: ST(i) is physical register (6 + i) & 7; slot i of the area holds ST(i).
    st = [ONE, ZERO, INF, DENORMAL, UNNORMAL, TWO, ZERO, ONE]
    fx = _fx(st, 6, 0b0111_1111)  # physical register 7 (= ST1) empty
    tags = {6: FP_EXP_TAG_VALID, 7: FP_EXP_TAG_EMPTY, 0: FP_EXP_TAG_SPECIAL,
            1: FP_EXP_TAG_SPECIAL, 2: FP_EXP_TAG_SPECIAL, 3: FP_EXP_TAG_VALID,
            4: FP_EXP_TAG_ZERO, 5: FP_EXP_TAG_VALID}
    want = 0xFFFF0000 | sum(tag << 2 * phys for phys, tag in tags.items())
    assert twd_fxsr_to_i387(bytes(fx)) == want == 0xFFFFC12A
    # and back: one bit per physical register, set unless its tag is empty
    assert twd_i387_to_fxsr(want & 0xFFFF) == 0b0111_1111
    assert twd_i387_to_fxsr(0xFFFF) == 0 and twd_i387_to_fxsr(0) == 0xFF


def test_convert_from_fxsr_is_the_legacy_environment() -> None:
    fx = _fx([ONE, TWO] + [ZERO] * 6, 0, 0b11)
    env = convert_from_fxsr(bytes(fx))
    cw, sw, tag, fip, fcs, foo, fos = struct.unpack_from("<7I", env)
    assert (cw, sw) == (0xFFFF027F, 0xFFFF0020)
    assert tag == 0xFFFF0000 | 0xFFF0  # ST0, ST1 valid; the rest empty
    assert (fip, foo) == (0x2345_6789, 0x1000)  # truncated to 32 bits
    assert (fcs, fos) == (0x23, 0xFFFF002B)  # __USER32_CS; __USER_DS with the high half set
    assert env[28:38] == ONE and env[38:48] == TWO and len(env) == 108


def test_convert_to_fxsr_zeroes_fop_and_keeps_the_slots_reserved_bytes() -> None:
    fx = _fx([ONE] * 8, 0, 0xFF)
    env = bytearray(convert_from_fxsr(bytes(fx)))
    env[28:38] = TWO  # the header's ST0
    out = bytearray(fx)
    convert_to_fxsr(out, bytes(env))
    assert out[32:42] == TWO and out[42:48] == bytes([0xEE] * 6)
    assert int.from_bytes(out[6:8], "little") == 0  # FOP = fcs >> 16
    assert int.from_bytes(out[8:16], "little") == 0x2345_6789  # FIP zero-extended
    assert out[4:6] == b"\xff\x00"  # abridged tag as a u16
    assert out[0:4] == fx[0:4] and out[24:512] != bytes(488)


def _compat_task(cpu: str, flags: int) -> tuple[Machine, Task]:
    m = Machine.boot(cpu, None, 1)
    t = m.spawn("t32")
    t.process.mm.map((SP & ~0xFFF) - 0x10000, 0x12000)
    t.user_sp = SP
    m.run(0, t)
    t.handlers[SIGUSR1] = SigAction(SA_IA32_ABI | SA_RESTORER | flags)
    t.handlers[SIGSEGV] = SigAction(SA_IA32_ABI | SA_RESTORER | SA_SIGINFO)
    x87 = bytes(_fx([ONE, TWO] + [ZERO] * 6, 0, 0b11)[:160])
    m.user_write(0, 0, x87)
    m.user_write(0, 1)
    return m, t


def _deliver(m: Machine, t: Task) -> None:
    m.enter_kernel(0)
    t.pending.append(Signal(SIGUSR1))
    m.exit_to_user_mode(0)


def _u32(t: Task, addr: int) -> int:
    return int.from_bytes(t.process.mm.read(addr, 4), "little")


@pytest.mark.parametrize("cpu", ["zen5", "sapphire-rapids"])
@pytest.mark.parametrize("rt", [False, True])
def test_frame_layout(cpu: str, rt: bool) -> None:
    m, t = _compat_task(cpu, SA_SIGINFO if rt else 0)
    _deliver(m, t)
    frame = t.user_sp
    sc = frame + (sg.RT_IA32_SC if rt else sg.SIGFRAME_IA32_SC)
    fp = _u32(t, sc + sg.SC32_FPSTATE)
    user_size = t.fpu.fpstate.user_size
    assert (frame + 4) % 16 == 0 and (fp + 112) % 64 == 0
    assert _u32(t, sc + sg.SC32_SP) == SP and _u32(t, frame + 4) == SIGUSR1
    # The math frame: round_down(sp - (user_size + 4), 64) - 112, the frame right below it.
    assert fp == ((SP - user_size - 4) & ~63) - 112
    size = sg.RT_SIGFRAME_IA32_SIZE if rt else sg.SIGFRAME_IA32_SIZE
    assert frame == ((fp - size + 4) & ~15) - 4
    hdr = t.process.mm.read(fp, 112)
    assert struct.unpack_from("<HH", hdr, 108) == (0x0020, 0)  # status = FSW, X86_FXSR_MAGIC
    assert hdr[28:38] == ONE and hdr[38:48] == TWO
    sw = sg.FpxSwBytes.unpack(t.process.mm.read(fp + 112 + 464, 48))
    assert sw.magic1 == sg.FP_XSTATE_MAGIC1 and sw.xstate_size == user_size
    assert sw.extended_size == user_size + 4 + 112
    assert _u32(t, fp + 112 + user_size) == sg.FP_XSTATE_MAGIC2
    if rt:
        assert _u32(t, frame + 8) == frame + 16 and _u32(t, frame + 12) == frame + 144
        assert _u32(t, frame + 144) == sg.UC_FP_XSTATE
        assert _u32(t, frame + 16) == SIGUSR1


def test_save_fsave_header_fxsaves_live_registers_into_the_image() -> None:
    """With the registers live, save_fsave_header() FXSAVEs them into the fpstate's legacy
    area before converting it: the image's x87 and XMM bytes equal the registers after."""
    m, t = _compat_task("zen5", 0)
    fps = t.fpu.fpstate
    before_x87, before_xmm = m.cpus[0].regs.component(0), m.cpus[0].regs.component(1)
    assert bytes(fps.regs[32:42]) != ONE
    _deliver(m, t)
    assert bytes(fps.regs[32:42]) == ONE and bytes(fps.regs[160:416]) == before_xmm
    assert bytes(fps.regs[0:24]) == before_x87[0:24]


@pytest.mark.parametrize("rt", [False, True])
def test_sigreturn_folds_the_header_over_the_fxsave_area(rt: bool) -> None:
    m, t = _compat_task("sapphire-rapids", SA_SIGINFO if rt else 0)
    xmm = m.cpus[0].regs.component(1)
    _deliver(m, t)
    frame = t.user_sp
    fp = _u32(t, frame + (sg.RT_IA32_SC if rt else sg.SIGFRAME_IA32_SC) + sg.SC32_FPSTATE)
    mm = t.process.mm
    mm.write(fp + 28, INF)  # the header's ST0 ...
    mm.write(fp + 112 + 32 + 16, INF)  # ... and the FXSAVE area's ST1, which the header overrides
    mm.write(fp, (0x37F).to_bytes(2, "little"))  # the header's control word
    sg.handler_ia32_return(t, rt)
    assert m.syscall(0, sg.sys32_rt_sigreturn if rt else sg.sys32_sigreturn) == 0
    assert t.user_sp == SP and not t.pending
    x87 = m.cpus[0].regs.component(0)
    assert x87[32:42] == INF and x87[48:58] == TWO
    assert int.from_bytes(x87[0:2], "little") == 0x37F
    assert int.from_bytes(x87[6:8], "little") == 0  # FOP lost: fcs >> 16
    assert int.from_bytes(x87[8:16], "little") == 0x2345_6789  # FIP's upper half lost
    assert m.cpus[0].regs.component(1) == xmm
    assert not t.need_fpu_load and m.cpus[0].fpu_fpregs_owner_ctx is t.fpu


@pytest.mark.parametrize("fx_only", [False, True])
def test_sigreturn_rejects_reserved_mxcsr_bits(fx_only: bool) -> None:
    """MXCSR with reserved bits: copy_uabi_to_xstate() fails (-EINVAL) for an XSAVE frame, the
    x86-64 check of the FXSAVE-only path for a frame without MAGIC1; both end in SIGSEGV
    delivered to the interrupted stack, the user state reset first (fpu__clear_user_states),
    so the SIGSEGV frame holds the initial x87 state."""
    m, t = _compat_task("zen5", 0)
    _deliver(m, t)
    fp = _u32(t, t.user_sp + sg.SIGFRAME_IA32_SC + sg.SC32_FPSTATE)
    mm = t.process.mm
    mm.write(fp + 112 + 24, (0xFFFF0000).to_bytes(4, "little"))
    if fx_only:
        mm.write(fp + 112 + 464, bytes(4))  # no MAGIC1: an FXSAVE-only frame
    sg.handler_ia32_return(t, False)
    assert m.syscall(0, sg.sys32_sigreturn) == -sg.EFAULT
    frame = t.user_sp  # the SIGSEGV handler's rt_sigframe_ia32, below the restored SP
    assert frame < SP and _u32(t, frame + 16) == SIGSEGV and _u32(t, frame + 24) == 0x80
    fp = _u32(t, frame + sg.RT_IA32_SC + sg.SC32_FPSTATE)
    cw, sw_, tag = struct.unpack_from("<3I", t.process.mm.read(fp, 12))
    assert (cw, sw_, tag) == (0xFFFF037F, 0xFFFF0000, 0xFFFFFFFF)  # FNINIT's state
    assert _u32(t, fp + 112 + 24) == 0x1F80
