"""ia32 signal frames of the running kernel: a static 32-bit ELF catches SIGUSR1 with and
without SA_SIGINFO; the fsave header, the XSAVE image behind it, and what sigreturn restores.

Kernel references: arch/x86/kernel/signal_32.c (ia32_setup_frame, ia32_setup_rt_frame,
ia32_restore_sigcontext), arch/x86/kernel/fpu/signal.c (copy_fpstate_to_sigframe,
save_fsave_header, save_xstate_epilog, __fpu_restore_sig, fpu__alloc_mathframe),
arch/x86/kernel/fpu/regset.c (convert_from_fxsr, convert_to_fxsr, twd_fxsr_to_i387).
"""

from __future__ import annotations

import os
import struct

import pytest

from fpstate.errors import HostUnavailable
from fpstate.host import native
from fpstate.host.ia32 import (
    FP_XSTATE_MAGIC1,
    FP_XSTATE_MAGIC2,
    FREGS_STATE_SIZE,
    FX_FCW,
    FX_MXCSR,
    FX_ST,
    FX_XMM,
    FX_YMM_HI,
    HDR_CW,
    HDR_ST,
    HDR_TAG,
    SIGUSR1,
    UC_FP_XSTATE,
    X86_FXSR_MAGIC,
    Fxsave32,
    Ia32SignalRun,
    fxsave_image,
    ia32_signal,
    x87,
)

pytestmark = pytest.mark.host

RT = pytest.mark.parametrize("rt", [False, True], ids=["sigframe", "rt_sigframe"])

USER32_CS = 0x23  #: __USER32_CS (GDT_ENTRY_DEFAULT_USER32_CS * 8 + 3)
USER_DS = 0x2B  #: __USER_DS
SC_DS, SC_CS = 12, 60  #: offsetof(struct sigcontext_32, ds / cs)

# -- the x87 state: eight registers in every tag class ----------------------------------------
TOP = 3
ONE = x87(0x3FFF, 1 << 63)  # valid
ZERO = x87(0, 0, sign=1)  # zero (-0.0)
INF = x87(0x7FFF, 1 << 63, sign=1)  # special: -infinity
DENORMAL = x87(0, 0x0000_1234_5678_9ABC)  # special: exponent 0, significand != 0
UNNORMAL = x87(0x4001, 0x4000_0000_0000_0000)  # special: exponent != 0, integer bit clear
QNAN = x87(0x7FFF, 0xC000_0000_0000_0001)  # special: NaN
EMPTY6 = x87(0x4000, 0xA000_0000_0000_0000)  # contents of the two empty registers
EMPTY7 = x87(0x3FFE, 0xC000_0000_0000_0000)
ST = (ONE, ZERO, INF, DENORMAL, UNNORMAL, QNAN, EMPTY6, EMPTY7)  # ST0..ST7
ST_NONEMPTY = (True, True, True, True, True, True, False, False)
#: abridged FTW: bit p for physical register p = (i + TOP) & 7 of ST(i)
FTW = sum(1 << ((i + TOP) & 7) for i, full in enumerate(ST_NONEMPTY) if full)

FCW = 0x0A7F  # all exceptions masked, PC = 53 bits, RC = round up
FSW = (TOP << 11) | 0x4000 | 0x0200 | 0x0020  # TOP, C3, C1, PE (masked: ES clear)
MXCSR = 0x3FA0  # all masked, RC = round down, PE flag
XMM = tuple(bytes((0x10 * n + k) & 0xFF for k in range(16)) for n in range(1, 9))
FOP, FIP, FCS, FDP, FDS = 0x123, 0x11223344, 0x0ABC, 0x55667788, 0x0DEF

QUIET = fxsave_image(fcw=FCW, fsw=FSW, ftw=FTW, fop=FOP, fip=FIP, fcs=FCS, fdp=FDP, fds=FDS,
                     mxcsr=MXCSR, st=ST, xmm=XMM)
#: IE unmasked and raised: the CPU keeps ES (bit 7) and B (bit 15) set -> an exception pending
FCW_PENDING = FCW & ~0x1
FSW_PENDING = FSW | 0x0001 | 0x0080 | 0x8000
PENDING = fxsave_image(fcw=FCW_PENDING, fsw=FSW_PENDING, ftw=FTW, fop=FOP, fip=FIP, fcs=FCS,
                       fdp=FDP, fds=FDS, mxcsr=MXCSR, st=ST, xmm=XMM)


def _tag_class(reg: bytes) -> int:
    """The i387 tag of a non-empty register from its contents (SDM Vol. 1 §8.1.7)."""
    significand, se = struct.unpack("<QH", reg)
    exponent = se & 0x7FFF
    if exponent == 0x7FFF:
        return 2
    if exponent == 0:
        return 1 if significand == 0 else 2
    return 0 if significand >> 63 else 2


def _full_tag(st: tuple[bytes, ...], nonempty: tuple[bool, ...], top: int) -> int:
    """The 16-bit tag word indexed by physical register."""
    tag = 0
    for i, (reg, full) in enumerate(zip(st, nonempty, strict=True)):
        tag |= (_tag_class(reg) if full else 3) << (2 * ((i + top) & 7))
    return tag


EXPECTED_TAG = _full_tag(ST, ST_NONEMPTY, TOP)


def _amd() -> bool:
    _eax, ebx, ecx, edx = native.cpuid(0)
    return struct.pack("<III", ebx, edx, ecx) == b"AuthenticAMD"


def _quiet_pointer(value: int) -> int:
    """FIP/FDP/FOP as the CPU keeps them after FXRSTOR with no exception pending: AMD CPUs
    neither restore nor save the x87 error pointers unless FSW.ES = 1 (AMD APM Vol. 2, FXSAVE;
    the kernel's X86_BUG_FXSAVE_LEAK), so they read back as 0; Intel FXRSTOR loads them."""
    return 0 if _amd() else value


def _run(image: bytes, rt: bool, **kw: object) -> Ia32SignalRun:
    try:
        return ia32_signal(image, siginfo=rt, **kw)  # type: ignore[arg-type]
    except HostUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def quiet() -> dict[bool, Ia32SignalRun]:
    return {rt: _run(QUIET, rt) for rt in (False, True)}


def test_expected_tag_word_covers_every_class() -> None:
    """Sanity of the state under test: physical registers in all four tag classes."""
    assert EXPECTED_TAG == 0xA93E
    assert {(EXPECTED_TAG >> (2 * p)) & 3 for p in range(8)} == {0, 1, 2, 3}
    assert FTW == 0xF9


# -- the fsave header: save_fsave_header / convert_from_fxsr ----------------------------------

@RT
def test_fsave_header(quiet: dict[bool, Ia32SignalRun], rt: bool) -> None:
    """cw/sw | 0xffff0000, the full tag word of twd_fxsr_to_i387, the pointers from the kernel's
    (64-bit) XSAVE, fcs = the user CS, fos = DS | 0xffff0000, ST0-7, status = FSW, magic 0."""
    run = quiet[rt]
    h = run.header
    assert h.cw == FCW | 0xFFFF0000
    assert h.sw == FSW | 0xFFFF0000
    assert h.tag == EXPECTED_TAG | 0xFFFF0000
    assert h.ipoff == _quiet_pointer(FIP)
    assert h.dataoff == _quiet_pointer(FDP)
    # not the FCS/FDS of the state: task_pt_regs(tsk)->cs and savesegment(ds) at delivery
    assert run.sc_field(SC_CS, 2) == USER32_CS
    assert run.sc_field(SC_DS, 2) == USER_DS
    assert h.cssel == USER32_CS
    assert h.datasel == USER_DS | 0xFFFF0000
    assert h.st == ST
    assert h.status == FSW
    assert h.magic == X86_FXSR_MAGIC


@RT
def test_kernel_tag_word_equals_the_cpus(quiet: dict[bool, Ia32SignalRun], rt: bool) -> None:
    """twd_fxsr_to_i387 classifies like the CPU: FNSTENV's tag word of the same (restored)
    state equals the header's low 16 bits."""
    env = quiet[rt].env
    assert env is not None
    assert env.ftw == EXPECTED_TAG
    assert env.ftw == quiet[rt].header.tag & 0xFFFF


# -- the XSAVE image and its software bytes: save_xstate_epilog -------------------------------

@RT
def test_xsave_area_and_sw_bytes(quiet: dict[bool, Ia32SignalRun], rt: bool) -> None:
    """The 64-aligned XSAVE image after the header holds the registers; _fpx_sw_bytes:
    magic1, extended_size = user_size + 4 + sizeof(fregs_state), xfeatures = XCR0; MAGIC2
    right after user_size bytes."""
    run = quiet[rt]
    fx = run.fxsave_area
    fcw, fsw, ftw = struct.unpack_from("<HHB", fx, 0)
    assert (fcw, fsw, ftw) == (FCW, FSW, FTW)
    assert struct.unpack_from("<I", fx, 24)[0] == MXCSR
    assert tuple(fx[32 + 16 * i:42 + 16 * i] for i in range(8)) == ST
    assert tuple(fx[160 + 16 * n:176 + 16 * n] for n in range(8)) == XMM
    assert fx[160 + 16 * 8:160 + 16 * 16] == bytes(128)  # XMM8-15: unreachable in compat mode
    sw = run.sw_bytes
    size = native.cpuid(0xD, 0)[1]
    assert sw.magic1 == FP_XSTATE_MAGIC1
    assert sw.xstate_size == size
    assert sw.extended_size == size + 4 + FREGS_STATE_SIZE
    assert sw.xfeatures == native.xgetbv(0)
    assert run.magic2 == FP_XSTATE_MAGIC2
    assert len(run.frame) == sw.extended_size
    xstate_bv = struct.unpack_from("<Q", run.frame, FREGS_STATE_SIZE + 512)[0]
    assert xstate_bv & 0x3 == 0x3


# -- where the frame is -----------------------------------------------------------------------

@RT
def test_alignment_and_placement(quiet: dict[bool, Ia32SignalRun], rt: bool) -> None:
    """fpu__alloc_mathframe: the XSAVE image is 64-aligned, the fsave header 112 bytes before
    it; align_sigframe: (ESP + 4) % 16 == 0 at handler entry (the i386 ABI's view of a call);
    frame and FP state lie below the interrupted ESP."""
    run = quiet[rt]
    assert run.sc_fpstate == run.fpstate
    assert (run.fpstate + FREGS_STATE_SIZE) % 64 == 0
    assert run.fpstate % 64 == 64 - FREGS_STATE_SIZE % 64
    assert (run.esp + 4) % 16 == 0
    assert run.esp < run.fpstate
    assert run.fpstate + run.sw_bytes.extended_size <= run.main_esp
    if rt:
        assert run.uc_flags == UC_FP_XSTATE
        assert run.siginfo is not None
        signo, errno, code, _pid, uid = struct.unpack_from("<iiiiI", run.siginfo, 0)
        assert (signo, errno, code, uid) == (SIGUSR1, 0, 0, os.getuid())  # SI_USER from kill
    else:
        assert run.uc_flags is None and run.siginfo is None


# -- sigreturn: __fpu_restore_sig with ia32_fxstate -------------------------------------------

@RT
def test_sigreturn_restores_every_register(quiet: dict[bool, Ia32SignalRun], rt: bool) -> None:
    """An untouched frame restores the state: FCW, FSW, abridged FTW (twd_i387_to_fxsr of the
    full tag), MXCSR, XMM0-7, ST0-7."""
    run = quiet[rt]
    assert run.died_of is None and run.returncode == 0
    a = run.after
    assert a is not None
    assert (a.fcw, a.fsw, a.ftw, a.mxcsr) == (FCW, FSW, FTW, MXCSR)
    assert a.xmm == XMM
    assert a.st == ST
    # with no exception pending the pointers were already 0 in the frame (AMD) and stay 0
    assert (a.fop, a.fip, a.fdp) == (0, _quiet_pointer(FIP), _quiet_pointer(FDP))
    assert (a.fcs, a.fds) == (0, 0)
    env = run.env
    assert env is not None
    assert (env.fcw, env.fsw, env.fop) == (FCW, FSW, 0)


@RT
def test_pending_exception_pointers_and_lost_fop(rt: bool) -> None:
    """With an unmasked exception pending (FSW.ES = 1) the CPU keeps FIP/FDP/FOP. The frame's
    XSAVE image (64-bit format) has them; convert_from_fxsr copies rip/rdp into ipoff/dataoff
    but puts the user CS/DS, not FCS/FDS, in the selectors and drops FOP; on sigreturn
    convert_to_fxsr sets fop = cssel >> 16 = 0, rip = ipoff, rdp = dataoff; FCS/FDS, absent
    from the 64-bit image, read back as 0 in compat mode."""
    run = _run(PENDING, rt)
    fx = run.fxsave_area
    fcw, fsw, _ftw, fop, rip, rdp = struct.unpack_from("<HHBxHQQ", fx, 0)
    assert (fcw, fsw, fop, rip, rdp) == (FCW_PENDING, FSW_PENDING, FOP, FIP, FDP)
    h = run.header
    assert (h.cw, h.sw, h.status) == (FCW_PENDING | 0xFFFF0000, FSW_PENDING | 0xFFFF0000,
                                      FSW_PENDING)
    assert (h.ipoff, h.cssel, h.dataoff, h.datasel) == (FIP, USER32_CS, FDP,
                                                        USER_DS | 0xFFFF0000)
    a = run.after
    assert a is not None and run.died_of is None
    assert (a.fcw, a.fsw, a.ftw, a.st) == (FCW_PENDING, FSW_PENDING, FTW, ST)
    assert (a.fop, a.fip, a.fcs, a.fdp, a.fds) == (0, FIP, 0, FDP, 0)
    env = run.env
    assert env is not None
    assert (env.fop, env.fip, env.fcs, env.fdp, env.fds) == (0, FIP, 0, FDP, 0)


NEW_ST0 = x87(0x4005, 0xDEAD_BEEF_0000_0001 | 1 << 63)
NEW_ST1 = x87(0x3FF0, 0x8888_7777_6666_5555)
NEW_FCW = 0x0E7F


@RT
def test_fsave_header_wins_over_the_fxsave_area(rt: bool) -> None:
    """convert_to_fxsr overwrites the x87 part of the copied XSAVE image from the header: a
    new _st[0] and cw in the header take effect, a new ST1 slot in the fxsave area does not."""
    run = _run(QUIET, rt, patches=(
        (HDR_ST, NEW_ST0),
        (FX_ST + 16, NEW_ST1),
        (HDR_CW, struct.pack("<I", NEW_FCW | 0xFFFF0000)),
    ))
    a = run.after
    assert a is not None and run.died_of is None
    assert a.st[0] == NEW_ST0
    assert a.st[1] == ZERO
    assert a.st[2:] == ST[2:]
    assert a.fcw == NEW_FCW
    assert (a.fsw, a.ftw, a.xmm) == (FSW, FTW, XMM)


@RT
def test_header_tag_and_fxsave_sse_part(rt: bool) -> None:
    """The header's tag word, not the image's abridged FTW, decides emptiness
    (twd_i387_to_fxsr: 11 -> empty, anything else -> valid); the image's FCW is ignored, while
    its SSE part (XMM, MXCSR) is what gets restored."""
    new_tag = EXPECTED_TAG | 3 << (2 * TOP)  # ST0 (physical register TOP): valid -> empty
    new_tag &= ~(3 << (2 * ((6 + TOP) & 7)))  # ST6: empty -> valid
    new_xmm3 = bytes(range(0xA0, 0xB0))
    run = _run(QUIET, rt, patches=(
        (HDR_TAG, struct.pack("<I", new_tag | 0xFFFF0000)),
        (FX_FCW, struct.pack("<H", 0x0C7F)),
        (FX_MXCSR, struct.pack("<I", 0x1F80)),
        (FX_XMM + 3 * 16, new_xmm3),
        (FREGS_STATE_SIZE + 4, b"\x00"),  # abridged FTW in the image: ignored
    ))
    a = run.after
    assert a is not None and run.died_of is None
    expected_ftw = (FTW & ~(1 << TOP)) | 1 << ((6 + TOP) & 7)
    assert a.ftw == expected_ftw == 0xF3
    assert a.fcw == FCW
    assert a.mxcsr == 0x1F80
    assert a.xmm == (*XMM[:3], new_xmm3, *XMM[4:])
    assert a.st == ST


@RT
def test_reserved_mxcsr_bits_kill_the_process(rt: bool) -> None:
    """__fpu_restore_sig / copy_uabi_to_xstate reject MXCSR & ~mxcsr_feature_mask on x86-64:
    sigreturn fails, signal_fault forces SIGSEGV. The handler's record precedes the death."""
    run = _run(QUIET, rt, patches=((FX_MXCSR, struct.pack("<I", 0xFFFF0000 | MXCSR)),))
    assert run.died_of == "SIGSEGV"
    assert run.returncode == -11
    assert run.after_fxsave is None and run.after_fnstenv is None
    assert run.sw_bytes.magic1 == FP_XSTATE_MAGIC1  # the handler did run and record


def test_mxcsr_mask_leaves_bits_16_up_reserved(quiet: dict[bool, Ia32SignalRun]) -> None:
    """The MXCSR_MASK FXSAVE reports (the kernel's mxcsr_feature_mask) has none of the bits
    0xffff0000 set that the SIGSEGV test writes, except possibly MM (bit 17, AMD)."""
    a = quiet[False].after
    assert a is not None
    assert a.mxcsr_mask & 0xFFFF0000 & ~(1 << 17) == 0


# -- AVX: the YMM upper halves travel in the XSAVE image --------------------------------------

YMM_HI = bytes((0xC0 + 7 * k) & 0xFF for k in range(128))


@RT
def test_ymm_upper_halves_in_frame_and_restored(rt: bool) -> None:
    """XSAVE component 2 (at its standard offset, CPUID.(0DH,2).EBX = 576) holds YMM0-7's
    upper halves; the XSAVE part of an ia32 frame is restored with them, patched ones too."""
    new_hi2 = bytes(range(0x50, 0x60))
    run = _run(QUIET, rt, ymm_hi=YMM_HI, patches=((FX_YMM_HI + 2 * 16, new_hi2),))
    assert native.cpuid(0xD, 2)[1] == FX_YMM_HI - FREGS_STATE_SIZE
    assert run.frame[FX_YMM_HI:FX_YMM_HI + 128] == YMM_HI
    xstate_bv = struct.unpack_from("<Q", run.frame, FREGS_STATE_SIZE + 512)[0]
    assert xstate_bv & 0x4
    assert run.after_ymm_hi == YMM_HI[:32] + new_hi2 + YMM_HI[48:]
    a = run.after
    assert a is not None
    assert Fxsave32.parse(run.after_fxsave or b"").xmm == XMM
    assert a.st == ST


@RT
def test_fpstate_decode_reads_the_real_frame(quiet: dict[bool, Ia32SignalRun], rt: bool) -> None:
    """`fpstate decode` detects the kernel's ia32 fpstate, shows the header the kernel wrote,
    and encodes it back byte for byte."""
    from fpstate.commands.layout import resolve_cpu
    from fpstate.tools.blob import decode, encode

    run = quiet[rt]
    host = resolve_cpu("host")
    blob = decode(run.frame, host)
    assert blob.fmt == "sigframe-ia32"
    h, real = dict(blob.fsave_header or ()), run.header
    assert (h["cw"], h["tag"], h["cssel"], h["datasel"]) == (real.cw, real.tag, real.cssel,
                                                              real.datasel)
    assert [h[f"st{i}"].to_bytes(10, "little") for i in range(8)] == list(real.st)
    assert encode(blob.to_dict(), host) == run.frame
