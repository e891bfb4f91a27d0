"""ptrace FPU regsets of a 32-bit (compat) tracee, read and written by this 64-bit process.

Kernel references: kernel/ptrace.c (ptrace_regset: the word-size check and the iov_len clamp),
arch/x86/kernel/ptrace.c (task_user_regset_view, x86_32_regsets: REGSET32_FP,
REGSET32_XFP, REGSET32_XSTATE), arch/x86/kernel/fpu/regset.c (fpregs_get/__convert_from_fxsr,
fpregs_set/convert_to_fxsr/twd_i387_to_fxsr, xfpregs_get/xfpregs_set, xstateregs_get).
"""

from __future__ import annotations

import errno
import struct

import pytest

from fpstate.errors import HostUnavailable
from fpstate.host import native
from fpstate.host.child import host_user_xstate_size
from fpstate.host.ia32 import fxsave_image, x87
from fpstate.host.ia32_ptrace import (
    NT_PRXFPREG,
    USER_I387_IA32_SIZE,
    Ia32PtraceRun,
    UserI387Ia32,
    ia32_ptrace,
)
from fpstate.host.ptrace import NT_PRFPREG, NT_X86_XSTATE

pytestmark = pytest.mark.host

USER32_CS = 0x23  #: __USER32_CS: task_pt_regs(tsk)->cs of a compat task
USER_DS = 0x2B  #: __USER_DS: tsk->thread.ds saved at the context switch

# -- the state: TOP = 5, registers in every tag class, two of them empty ----------------------
TOP = 5
VALID = x87(0x4000, 0xC90F_DAA2_2168_C235)  # pi
ZERO = x87(0, 0)
SPECIAL_INF = x87(0x7FFF, 1 << 63)
SPECIAL_DENORMAL = x87(0, 0x0000_0000_0000_0042, sign=1)
SPECIAL_UNNORMAL = x87(0x3FFF, 0x0123_4567_89AB_CDEF)
VALID_NEG = x87(0x3FFE, 0x8000_0000_0000_0000, sign=1)  # -0.5
EMPTY_A = x87(0x4005, 0xF000_0000_0000_0000)  # contents kept although tagged empty
EMPTY_B = x87(0x0000, 0x0000_0000_0000_0000)
ST = (VALID, ZERO, SPECIAL_INF, EMPTY_A, SPECIAL_DENORMAL, SPECIAL_UNNORMAL, EMPTY_B, VALID_NEG)
FULL = (True, True, True, False, True, True, False, True)  # per ST(i)


def _phys(i: int) -> int:
    """The physical register that is ST(i)."""
    return (TOP + i) % 8


FTW = sum(1 << _phys(i) for i in range(8) if FULL[i])  # abridged, by physical register


def _classify(reg: bytes) -> int:
    """00 valid, 01 zero, 10 special, from the 80-bit contents (SDM Vol. 1 §8.1.7)."""
    mant = int.from_bytes(reg[:8], "little")
    exp = int.from_bytes(reg[8:], "little") & 0x7FFF
    if exp == 0:
        return 0b01 if mant == 0 else 0b10
    if exp == 0x7FFF or not mant & (1 << 63):
        return 0b10
    return 0b00


def _full_tag(st: tuple[bytes, ...], full: tuple[bool, ...]) -> int:
    return sum((_classify(st[i]) if full[i] else 0b11) << (2 * _phys(i)) for i in range(8))


TAG = _full_tag(ST, FULL)

# IE unmasked and pending (FSW.IE, ES, B): this AMD CPU keeps FOP/FIP/FDP only then.
FCW = 0x037F & ~0x0001
FSW = 0x8000 | (TOP << 11) | 0x0100 | 0x0080 | 0x0001  # B, TOP, C0, ES, IE
FOP, FIP, FCS, FDP, FDS = 0x123, 0x11223344, 0x0ABC, 0x55667788, 0x0DEF
MXCSR = 0x1F80 | 0x6000 | 0x0010  # round toward zero, UE flag
XMM = tuple(bytes([0xA0 + n] * 4 + list(range(12))) for n in range(8))

STATE = fxsave_image(fcw=FCW, fsw=FSW, ftw=FTW, fop=FOP, fip=FIP, fcs=FCS, fdp=FDP, fds=FDS,
                     mxcsr=MXCSR, st=ST, xmm=XMM)

# -- what the tracer writes -------------------------------------------------------------------
NEW_CW = FCW ^ 0x0C00  # RC: nearest -> toward zero, IE still unmasked
NEW_ST0 = x87(0x4003, 0xA000_0000_0000_0000, sign=1)  # -10.0
NEW_FIP, NEW_FOO = 0x0BADC0DE, 0x00C0FFEE
NEW_FCS = 0x0456 << 16 | 0x0073  # FOP in the high half, a selector the kernel ignores
NEW_FOS = 0xFFFF_0063
NEW_ST = (NEW_ST0, *ST[1:])
SET_FP = UserI387Ia32(
    cwd=NEW_CW, swd=FSW, twd=0xFFFF_0000,  # every register "valid": only empty/full survives
    fip=NEW_FIP, fcs=NEW_FCS, foo=NEW_FOO, fos=NEW_FOS, st=NEW_ST,
).pack()

NEW_MXCSR = 0x1F80 | 0x0040  # DAZ
NEW_XMM0 = bytes(range(0xF0, 0x100))


def _fxsave64(*, fcw: int, fsw: int, ftw: int, fop: int, rip: int, rdp: int, mxcsr: int,
              st: tuple[bytes, ...], xmm: tuple[bytes, ...]) -> bytes:
    """A 512-byte FXSAVE64 (REX.W) image: the format of NT_PRXFPREG (SDM Vol. 1 Table 10-3)."""
    img = bytearray(512)
    struct.pack_into("<HHBxHQQI", img, 0, fcw, fsw, ftw, fop, rip, rdp, mxcsr)
    for i, reg in enumerate(st):
        img[32 + 16 * i:42 + 16 * i] = reg
    for n, reg in enumerate(xmm):
        img[160 + 16 * n:176 + 16 * n] = reg
    return bytes(img)


SET_XFP = _fxsave64(fcw=FCW, fsw=FSW, ftw=FTW, fop=0x7FF, rip=0x01020304, rdp=0x05060708,
                    mxcsr=NEW_MXCSR, st=ST, xmm=(NEW_XMM0, *XMM[1:]))
BAD_XFP = _fxsave64(fcw=FCW, fsw=FSW, ftw=FTW, fop=0, rip=0, rdp=0, mxcsr=0x8000_1F80,
                    st=ST, xmm=XMM)


def _run(**kw: object) -> Ia32PtraceRun:
    try:
        return ia32_ptrace(STATE, **kw)  # type: ignore[arg-type]
    except HostUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def plain() -> Ia32PtraceRun:
    return _run(get_lengths=(4096, USER_I387_IA32_SIZE, 112, 28, 4))


@pytest.fixture(scope="module")
def written() -> Ia32PtraceRun:
    return _run(set_fp=SET_FP)


def test_state_under_test() -> None:
    """Physical registers in all four tag classes, TOP != 0, two registers empty."""
    assert TAG == 0x90EB
    assert FTW == 0xF6
    assert {(TAG >> (2 * p)) & 3 for p in range(8)} == {0, 1, 2, 3}


def test_probe_stops_and_exits(plain: Ia32PtraceRun) -> None:
    assert plain.stop_signal == 19  # SIGSTOP, raised by kill(getpid(), SIGSTOP)
    assert (plain.exit_code, plain.exit_signal) == (0, None)


# -- NT_PRFPREG: REGSET32_FP, fpregs_get ------------------------------------------------------

def test_fp_regset_is_108_bytes(plain: Ia32PtraceRun) -> None:
    """ptrace_regset clamps iov_len to n * size = 27 * 4 and writes it back; a shorter whole
    number of words gets that prefix."""
    got = [(r.offered, r.errno, r.returned, len(r.data)) for r in plain.fp_lengths]
    assert got == [(4096, 0, 108, 108), (108, 0, 108, 108), (112, 0, 108, 108),
                   (28, 0, 28, 28), (4, 0, 4, 4)]
    full = plain.fp.data
    assert all(r.data == full[:r.returned] for r in plain.fp_lengths)


def test_fp_regset_contents(plain: Ia32PtraceRun) -> None:
    """__convert_from_fxsr: cw/sw | 0xffff0000, twd_fxsr_to_i387's full tag word, fip/foo the
    low halves of rip/rdp, fcs = the tracee's CS (not FCS|FOP<<16), fos = its DS |
    0xffff0000, ST0-7 = the first 10 bytes of each FXSAVE slot."""
    env = plain.env
    assert env.cwd == 0xFFFF_037E == FCW | 0xFFFF0000
    assert env.swd == 0xFFFF_A981 == FSW | 0xFFFF0000
    assert env.twd == 0xFFFF_90EB == TAG | 0xFFFF0000
    assert env.fip == FIP
    assert env.fcs == USER32_CS
    assert env.foo == FDP
    assert env.fos == 0xFFFF_002B == USER_DS | 0xFFFF0000
    assert env.st == ST
    assert plain.fp.data == struct.pack("<7I", env.cwd, env.swd, env.twd, FIP, USER32_CS, FDP,
                                        env.fos) + b"".join(ST)


def test_word_size_rule(plain: Ia32PtraceRun) -> None:
    """ptrace_regset: iov_len % regset->size (4) != 0 -> -EINVAL; 12 = 3 words succeeds."""
    twelve, ten = plain.word_rule
    assert (twelve.offered, twelve.errno, twelve.returned) == (12, 0, 12)
    assert twelve.data == plain.fp.data[:12]
    assert (ten.offered, ten.errno, ten.returned, ten.data) == (10, errno.EINVAL, 0, b"")


# -- NT_PRXFPREG and NT_X86_XSTATE ------------------------------------------------------------

def test_xfp_is_the_kernels_64_bit_fxsave(plain: Ia32PtraceRun) -> None:
    """xfpregs_get (XSTATE_COPY_FX) hands out the legacy area as the kernel saved it, with
    XSAVE64: a 64-bit RIP at 8..15 and RDP at 16..23, no selectors."""
    x = plain.xfp
    assert (x.note, x.errno, x.returned) == (NT_PRXFPREG, 0, 512)
    fcw, fsw, ftw, fop, rip, rdp, mxcsr = struct.unpack_from("<HHBxHQQI", x.data, 0)
    assert (fcw, fsw, ftw, fop) == (FCW, FSW, FTW, FOP)
    assert rip == FIP == 0x11223344
    assert rdp == FDP == 0x55667788
    assert mxcsr == MXCSR
    assert tuple(x.data[32 + 16 * i:42 + 16 * i] for i in range(8)) == ST
    assert tuple(x.data[160 + 16 * n:176 + 16 * n] for n in range(8)) == XMM
    assert x.data[288:512] == bytes(224)  # XMM8-15 and sw_reserved: zero


def test_xstate_regset_of_a_compat_tracee(plain: Ia32PtraceRun) -> None:
    """xstateregs_get: the standard-format XSAVE image, fpu_user_cfg.max_size bytes, whose
    legacy area equals NT_PRXFPREG's; the user XCR0 at 464; XSTATE_BV has FP and SSE."""
    xs = plain.xstate
    assert (xs.note, xs.errno) == (NT_X86_XSTATE, 0)
    assert xs.returned == len(xs.data) == host_user_xstate_size()
    assert xs.data[:464] == plain.xfp.data[:464]
    assert xs.xcr0 == native.xgetbv(0)
    assert struct.unpack_from("<Q", xs.data, 512)[0] & 0x3 == 0x3


def test_tracee_resumes_with_its_state(plain: Ia32PtraceRun) -> None:
    """After the stop the tracee's own 32-bit FXSAVE has what it FXRSTORed. FCS/FDS depend on
    scheduling: reading regsets does not invalidate the registers, so when no other FPU user
    ran on that CPU meanwhile the kernel skips the restore (fpregs still owned) and the
    selectors survive; otherwise it XRSTORs its 64-bit-format save, which has no selectors,
    and they read 0. The CPU's FNSTENV tag word equals fpregs_get's."""
    after = plain.after
    assert after is not None
    assert (after.fcw, after.fsw, after.ftw, after.fop) == (FCW, FSW, FTW, FOP)
    assert (after.fip, after.fdp) == (FIP, FDP)
    assert (after.fcs, after.fds) in {(FCS, FDS), (0, 0)}
    assert (after.mxcsr, after.st, after.xmm) == (MXCSR, ST, XMM)
    env = plain.after_env
    assert env is not None
    assert env.ftw == TAG == plain.env.twd & 0xFFFF


# -- SETREGSET NT_PRFPREG: fpregs_set / convert_to_fxsr ---------------------------------------

def test_fp_set_wants_exactly_108_bytes(written: Ia32PtraceRun) -> None:
    """104 bytes are 26 whole words, so ptrace_regset passes them on; fpregs_set refuses
    count != sizeof(struct user_i387_ia32_struct)."""
    assert written.short_set_errno == errno.EINVAL
    assert written.set_errno == 0


def test_fp_set_read_back(written: Ia32PtraceRun) -> None:
    """Read back through __convert_from_fxsr: the new cw, fip, foo and ST0; fcs/fos are the
    tracee's segments again (convert_to_fxsr ignored the selectors); the tag word is the
    CPU-style one recomputed from the contents, not the all-valid word written (only
    twd_i387_to_fxsr's empty/full bits were kept)."""
    env = written.env_after_set
    assert env is not None
    assert env.cwd == NEW_CW | 0xFFFF0000
    assert env.swd == FSW | 0xFFFF0000
    assert (env.fip, env.foo) == (NEW_FIP, NEW_FOO)
    assert (env.fcs, env.fos) == (USER32_CS, USER_DS | 0xFFFF0000)
    assert env.st == NEW_ST
    assert env.twd == _full_tag(NEW_ST, (True,) * 8) | 0xFFFF0000 == 0xFFFF_9068


def test_fp_set_reaches_the_tracee(written: Ia32PtraceRun) -> None:
    """After PTRACE_CONT the tracee's FXSAVE: the new FCW and ST0, FOP = fcs >> 16 = 0x456,
    FIP/FDP = the env's fip/foo, the abridged tag all ones; FSW as written. FCS/FDS are 0 every
    time: fpu_force_restore made the kernel XRSTOR its 64-bit-format image, which holds no
    selectors. The CPU's own tag word classifies the formerly empty registers by contents."""
    after = written.after
    assert after is not None
    assert after.fcw == NEW_CW
    assert after.fsw == FSW
    assert after.st == NEW_ST
    assert after.fop == 0x456 == NEW_FCS >> 16
    assert (after.fip, after.fdp) == (NEW_FIP, NEW_FOO)
    assert (after.fcs, after.fds) == (0, 0)
    assert after.ftw == 0xFF
    assert (after.mxcsr, after.xmm) == (MXCSR, XMM)  # SSE state untouched
    env = written.after_env
    assert env is not None
    assert env.ftw == _full_tag(NEW_ST, (True,) * 8)


# -- SETREGSET NT_PRXFPREG: xfpregs_set -------------------------------------------------------

def test_xfp_set_reaches_the_tracee() -> None:
    """xfpregs_set copies the 512-byte (64-bit format) image: the tracee sees the new MXCSR,
    XMM0, FOP and the low halves of RIP/RDP as FIP/FDP."""
    run = _run(set_xfp=SET_XFP)
    assert run.xfp_set_errno == 0
    assert run.xfp_after_set is not None and run.xfp_after_set.data == SET_XFP
    after = run.after
    assert after is not None
    assert (after.mxcsr, after.xmm[0], after.xmm[1:]) == (NEW_MXCSR, NEW_XMM0, XMM[1:])
    assert (after.fop, after.fip, after.fdp) == (0x7FF, 0x01020304, 0x05060708)
    assert after.st == ST


def test_xfp_set_rejects_reserved_mxcsr_bits() -> None:
    """xfpregs_set: MXCSR & ~mxcsr_feature_mask -> -EINVAL, and nothing is written."""
    run = _run(set_xfp=BAD_XFP)
    assert run.xfp_set_errno == errno.EINVAL
    after = run.after
    assert after is not None
    assert after.mxcsr == MXCSR


def test_regsets_by_note() -> None:
    """The note numbers the probe uses (include/uapi/linux/elf.h)."""
    assert (NT_PRFPREG, NT_PRXFPREG, NT_X86_XSTATE) == (2, 0x46E62B7F, 0x202)
