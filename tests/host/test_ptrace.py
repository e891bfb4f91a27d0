"""NT_X86_XSTATE and NT_PRFPREG of a real stopped child: bytes, sizes and the set path."""

from __future__ import annotations

import errno
import random
import struct

import pytest

from fpstate.errors import HostUnavailable
from fpstate.host.child import (
    MXCSR_DEFAULT,
    MXCSR_PATTERN,
    X87_PI,
    host_user_xstate_size,
    opmask_pattern,
    register_class,
    zmm_pattern,
)
from fpstate.host.ptrace import (
    NT_PRFPREG,
    NT_X86_XSTATE,
    READ_BUFFER,
    PtraceSession,
    RegsetWrite,
    ptrace_session,
    read_regsets,
)

pytestmark = pytest.mark.host

NEW = bytes(range(0x40, 0x50))


@pytest.fixture(scope="module")
def rc():
    try:
        return register_class()
    except HostUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def session(rc) -> PtraceSession:
    return ptrace_session(seed=0x5D)


def _with(buf: bytes, offset: int, data: bytes) -> bytes:
    b = bytearray(buf)
    b[offset:offset + len(data)] = data
    return bytes(b)


def test_xstate_regset_is_the_standard_user_size(session: PtraceSession) -> None:
    """ptrace_regset clamps iov_len to n * size = fpu_user_cfg.max_size = CPUID.(0DH,0).EBX."""
    assert session.xstate.errno == 0
    assert session.xstate.offered == READ_BUFFER
    assert session.xstate.returned == host_user_xstate_size()


def test_xstate_word_464_is_xcr0_and_the_rest_of_sw_reserved_zero(session, rc) -> None:
    """xstate_fx_sw_bytes[USER_XSTATE_XCR0_WORD] = fpu_user_cfg.max_features."""
    assert session.xstate.xcr0 == rc.xcr0
    assert session.xstate.data[472:512] == bytes(40)


def test_xstate_header_is_standard_format(session, rc) -> None:
    im = session.xstate.image
    assert im.xcomp_bv == 0
    assert im.header_reserved == bytes(48)
    assert im.xstate_bv == rc.xcr0


def test_xstate_holds_the_childs_registers(session, rc) -> None:
    im = session.xstate.image
    assert session.xstate.data[160 + 48:160 + 64] == zmm_pattern(3, session.seed)[:16]
    for n in range(rc.vector_regs):
        want = zmm_pattern(n, session.seed)[:rc.vector_bytes]
        got = {64: im.zmm, 32: im.ymm, 16: im.xmm}[rc.vector_bytes](n)
        assert got == want
    if rc.opmask and rc.kmovq:
        assert [im.opmask(k) for k in range(8)] == [opmask_pattern(k, session.seed)
                                                    for k in range(8)]
    assert im.mxcsr == MXCSR_PATTERN
    assert im.st(0) == X87_PI
    assert session.before.raw[:416] == session.xstate.data[:416]


def test_prfpreg_is_the_512_byte_fxsave_image(session: PtraceSession) -> None:
    """xfpregs_get: XSTATE_COPY_FX copies bytes 0..415 and zero-fills the rest."""
    fp = session.fpregs
    assert fp.errno == 0 and fp.returned == 512
    assert fp.data[:416] == session.xstate.data[:416]
    assert fp.data[416:] == bytes(96)


def test_getregset_length_rules(rc) -> None:
    """iov_len must be a multiple of the regset unit (8): -EINVAL; an unknown note: -EINVAL;
    a short iov_len reads that many bytes."""
    r = read_regsets([(NT_X86_XSTATE, 4), (NT_X86_XSTATE, 512), (0x999, 8), (NT_PRFPREG, 8)])
    assert r[0].errno == errno.EINVAL
    assert r[1].errno == 0 and r[1].returned == 512
    assert r[2].errno == errno.EINVAL
    assert r[3].errno == 0 and r[3].returned == 8


def test_setregset_decisions(session: PtraceSession, rc) -> None:
    """xstateregs_set / copy_uabi_to_xstate / xfpregs_set, one stopped child."""
    base = session.xstate.data
    size = len(base)
    absent = next(i for i in range(2, 63) if not (rc.xcr0 >> i) & 1)
    cases = [
        (RegsetWrite(NT_X86_XSTATE, base, "unchanged"), 0),
        (RegsetWrite(NT_X86_XSTATE, base[:size - 8], "count < max_size"), errno.EFAULT),
        (RegsetWrite(NT_X86_XSTATE, base + bytes(8), "count > max_size (clamped)"), 0),
        (RegsetWrite(NT_X86_XSTATE, base[:size - 2], "count % 8 != 0"), errno.EINVAL),
        (RegsetWrite(NT_X86_XSTATE, _with(base, 512, struct.pack("<Q", rc.xcr0 | 1 << absent)),
                     "XSTATE_BV outside user_xfeatures"), errno.EINVAL),
        (RegsetWrite(NT_X86_XSTATE, _with(base, 520, struct.pack("<Q", 1 << 63 | rc.xcr0)),
                     "XCOMP_BV != 0"), errno.EINVAL),
        (RegsetWrite(NT_X86_XSTATE, _with(base, 568, b"\x01"), "reserved byte 56"),
         errno.EINVAL),
        (RegsetWrite(NT_X86_XSTATE, _with(base, 24, struct.pack("<I", 0x80001F80)),
                     "MXCSR bit 31"), errno.EINVAL),
        (RegsetWrite(NT_X86_XSTATE, _with(base, 464, b"\xff" * 48), "sw_reserved ignored"), 0),
        (RegsetWrite(NT_PRFPREG, base[:512], "fxsave"), 0),
        (RegsetWrite(NT_PRFPREG, base[:504], "fxsave count 504"), errno.EINVAL),
        (RegsetWrite(NT_PRFPREG, base[:512] + bytes(8), "fxsave count 520 (clamped)"), 0),
        (RegsetWrite(NT_PRFPREG, _with(base[:512], 24, struct.pack("<I", 0x80001F80)),
                     "fxsave MXCSR bit 31"), errno.EINVAL),
    ]
    s = ptrace_session([w for w, _ in cases], seed=session.seed)
    got = {r.request.what: r.errno for r in s.writes}
    assert got == {w.what: e for w, e in cases}
    assert s.writes[-1].read_back.data[464:472] == struct.pack("<Q", rc.xcr0)
    assert s.exit.exit_code == 0


def test_setregset_xmm3_reaches_the_child(session: PtraceSession) -> None:
    """fpu_force_restore() makes the child reload its registers from the written fpstate."""
    buf = _with(session.xstate.data, 160 + 48, NEW)
    s = ptrace_session([RegsetWrite(NT_X86_XSTATE, buf, "xmm3")], seed=session.seed)
    assert s.writes[0].errno == 0
    assert s.writes[0].read_back.image.xmm(3) == NEW
    assert s.after is not None and s.after.xmm(3) == NEW
    assert s.after.xmm(4) == session.before.xmm(4)


def test_prfpreg_set_keeps_upper_halves(session, rc) -> None:
    """xfpregs_set writes the fxsave area and ORs FP|SSE into the header: YMM/ZMM upper
    halves of the same registers stay."""
    if rc.vector_bytes < 32:
        pytest.skip("host lacks AVX: no upper halves")
    buf = _with(session.xstate.data[:512], 160 + 16 * 5, NEW)
    s = ptrace_session([RegsetWrite(NT_PRFPREG, buf, "xmm5")], seed=session.seed)
    a = s.after
    assert a.xmm(5) == NEW
    assert a.ymm(5)[16:] == zmm_pattern(5, session.seed)[16:32]


def test_xstate_bv_zero_puts_everything_in_init(session, rc) -> None:
    s = ptrace_session([RegsetWrite(NT_X86_XSTATE, _with(session.xstate.data, 512, bytes(8)),
                                    "XSTATE_BV=0")], seed=session.seed)
    a = s.after
    assert a.xmm(3) == bytes(16) and a.st(0) == bytes(10)
    assert a.mxcsr == MXCSR_DEFAULT
    assert s.writes[0].read_back.image.mxcsr == MXCSR_DEFAULT


@pytest.mark.parametrize("xstate_bv", [0x3, 0x0])
def test_components_in_init_state_read_as_zero(session, rc, xstate_bv: int) -> None:
    """The written buffer still carries the pattern bytes of every component, and
    copy_uabi_to_xstate() leaves the fpstate's old bytes where XSTATE_BV says init; yet the
    read-back shows init values there: __copy_xstate_to_uabi_buf() copies only what the header
    names (legacy parts from init_fpstate, extended ones as zeros)."""
    size = len(session.xstate.data)
    s = ptrace_session([RegsetWrite(NT_X86_XSTATE,
                                    _with(session.xstate.data, 512, struct.pack("<Q", xstate_bv)),
                                    f"XSTATE_BV={xstate_bv:#x}")], seed=session.seed)
    assert s.writes[0].errno == 0
    back = s.writes[0].read_back.data
    assert struct.unpack_from("<Q", back, 512)[0] == xstate_bv
    assert session.xstate.data[576:] != bytes(size - 576)  # the patterns were there
    assert back[576:] == bytes(size - 576)
    assert back[464:472] == struct.pack("<Q", rc.xcr0)
    if xstate_bv == 0:
        assert back[160:416] == bytes(256) and back[32:160] == bytes(128)
        assert back[0:2] == b"\x7f\x03"
    else:
        assert back[160:416] == session.xstate.data[160:416]


@pytest.mark.parametrize("variant", [None, "init-fpstate-by-xsaves"])
def test_absent_legacy_components_read_as_init_fpstate_as_the_model_builds_it(
        session, rc, variant: str | None) -> None:
    """With XSTATE_BV = 0 every legacy byte of the read-back comes from init_fpstate: FCW
    037FH, MXCSR 1F80H and this CPU's MXCSR_MASK, the rest 0 -- the model's init_fpstate
    (setup_init_fpu_buf() with its FXSAVE, f9dfb5e390fa) gives the same 32 bytes; the variant's
    XSAVES read-back (kernels before 5.13) would give zeros, which this kernel does not."""
    from fpstate.kernel.x86.regset import XSTATE_COPY_XSAVE, __copy_xstate_to_uabi_buf
    from fpstate.kernel.x86.sched import Machine

    s = ptrace_session([RegsetWrite(NT_X86_XSTATE,
                                    _with(session.xstate.data, 512, struct.pack("<Q", 0)),
                                    "XSTATE_BV=0")], seed=session.seed)
    assert s.writes[0].errno == 0
    real = s.writes[0].read_back.data
    fcw, mxcsr, mask = struct.unpack_from("<H", real, 0)[0], *struct.unpack_from("<II", real, 24)
    assert (fcw, mxcsr) == (0x37F, MXCSR_DEFAULT) and mask and real[2:24] == bytes(22)
    m = Machine.boot("host", variants=(variant,) if variant else ())
    sysm = m.system
    fps = m.spawn("tracee").fpu.fpstate
    fps.xstate_bv = 0
    view = __copy_xstate_to_uabi_buf(sysm, bytes(m.init_fpstate.regs), fps, fps.user_xfeatures,
                                     0, XSTATE_COPY_XSAVE, sysm.user.max_size)
    if variant is None or not sysm.xsaves:
        assert view[0:32] == real[0:32]
    else:  # the CPU has XSAVES: the variant's init_fpstate has no legacy values
        assert view[0:32] == bytes(32) != real[0:32]


def test_ymm_without_sse_mxcsr_differs_between_view_and_registers(session, rc) -> None:
    """copy_uabi_to_xstate stores MXCSR when YMM is set without FP (the standard-format rule:
    XRSTOR loads MXCSR when RFBM[1] or RFBM[2]), so GETREGSET shows it; but the kernel
    restores with compacted XRSTORS, which initialises MXCSR when XSTATE_BV[1] = 0: the task
    runs with 0x1f80."""
    if rc.vector_bytes < 32:
        pytest.skip("host lacks AVX (XCR0[2] = 0)")
    buf = _with(session.xstate.data, 512, struct.pack("<Q", 0x4))
    s = ptrace_session([RegsetWrite(NT_X86_XSTATE, buf, "XSTATE_BV=YMM")], seed=session.seed)
    assert s.writes[0].errno == 0
    assert s.writes[0].read_back.image.mxcsr == MXCSR_PATTERN
    assert s.after.mxcsr == MXCSR_DEFAULT


def _predict(buf: bytes, rc, mxcsr_mask: int) -> int:
    """copy_uabi_to_xstate's checks in its order (validate_user_xstate_header, MXCSR)."""
    xfeatures, xcomp_bv = struct.unpack_from("<QQ", buf, 512)
    if xfeatures & ~rc.xcr0 or xcomp_bv or any(buf[528:576]):
        return errno.EINVAL
    mxcsr = struct.unpack_from("<I", buf, 24)[0]
    if xfeatures & 0x7 and mxcsr & ~mxcsr_mask:
        return errno.EINVAL
    return 0


def test_setregset_random_headers_follow_copy_uabi_to_xstate(session, rc) -> None:
    rng = random.Random(1234)
    base = session.xstate.data
    mask = session.xstate.image.mxcsr_mask
    writes = []
    for i in range(40):
        b = bytearray(base)
        kind = rng.randrange(4)
        if kind == 0:
            struct.pack_into("<Q", b, 512, rng.getrandbits(64) & rng.choice([0xFF, 0xFFF, ~0]))
        elif kind == 1:
            b[528 + rng.randrange(48)] = rng.randrange(1, 256) if rng.random() < 0.7 else 0
        elif kind == 2:
            struct.pack_into("<I", b, 24, rng.getrandbits(32) & rng.choice([0xFFFF, ~0]))
            struct.pack_into("<Q", b, 512, rng.choice([0, 1, 2, 4, rc.xcr0]))
        else:
            struct.pack_into("<Q", b, 520, rng.choice([0, 1 << 63, rng.getrandbits(64)]))
        writes.append(RegsetWrite(NT_X86_XSTATE, bytes(b), f"random {i}"))
    s = ptrace_session(writes, seed=session.seed)
    assert [r.errno for r in s.writes] == [_predict(w.data, rc, mask) for w in writes]


def _sse_initial_at_second_stop(session):
    """The first of up to 8 runs of ``session`` whose second stop found SSE not in use: this
    machine, itself a guest, now and then finds SSE in use after the XRSTOR that put it in its
    initial configuration (the timing-dependent marking of `BACKEND_DIVERGENCES`
    sse_marked_in_use, seen from inside), and then the save wrote MXCSR and nothing is stale."""
    for _ in range(8):
        s = session()
        if not struct.unpack_from("<Q", s.second.data, 512)[0] & 0x2:
            return s
    pytest.skip("SSE was in use at every second stop of 8 (the CPU keeps marking it in use)")


def test_stale_mxcsr_in_the_view_and_written_back(rc) -> None:
    """The kernel's MXCSR rule for NT_X86_XSTATE on an XSAVES kernel, model against the real
    kernel. A task's MXCSR was 0xffc0 when it was last switched out with SSE in use; it then
    loaded 1F80H and restored AVX state alone (SSE initial), and stopped again. XSAVES writes
    MXCSR only with the SSE component, so the fpstate still holds 0xffc0, and
    __copy_xstate_to_uabi_buf() copies it (the header has YMM): the tracer reads 0xffc0 while
    the task runs with 1F80H. A debugger that writes XMM0 back with SSE set in XSTATE_BV
    makes copy_uabi_to_xstate() store that MXCSR and the compacted XRSTORS load it: the task
    resumes with 0xffc0. (Reported by Andrei Vagin in 2022; Chang S. Bae's "x86/fpu: Fix the
    MXCSR state reshuffling between userspace and kernel buffers", v3, was not merged.)"""
    from fpstate.host.ptrace import stale_mxcsr_session
    from fpstate.kernel.x86.hw import KernelBuf
    from fpstate.kernel.x86.regset import (
        XSTATE_COPY_XSAVE,
        __copy_xstate_to_uabi_buf,
        copy_uabi_to_xstate,
    )
    from fpstate.kernel.x86.sched import Machine

    if rc.vector_bytes < 32:
        pytest.skip("host lacks AVX (XCR0[2] = 0)")
    m = Machine.boot("host")
    s = m.system
    if not s.xsaves:
        pytest.skip("the kernel saves tasks with XSAVEC or standard XSAVE, not XSAVES")
    real = _sse_initial_at_second_stop(lambda: stale_mxcsr_session(0xFFC0))
    assert real.first.image.mxcsr == 0xFFC0
    assert real.after_mxcsr == 0x1F80  # the task's own, untouched without a write
    second_bv = struct.unpack_from("<Q", real.second.data, 512)[0]
    assert second_bv & 0x6 == 0x4  # AVX in use, SSE initial

    # The model: the fpstate as the two switch-outs' XSAVES left it.
    fps = m.spawn("tracee").fpu.fpstate
    fps.regs[24:32] = struct.pack("<II", 0xFFC0, s.mxcsr_feature_mask)
    fps.xstate_bv = second_bv & fps.user_xfeatures
    size = s.user.max_size
    view = __copy_xstate_to_uabi_buf(s, bytes(m.init_fpstate.regs), fps, fps.user_xfeatures,
                                     0, XSTATE_COPY_XSAVE, size)
    assert view[24:28] == real.second.data[24:28] == struct.pack("<I", 0xFFC0)

    written = _sse_initial_at_second_stop(lambda: stale_mxcsr_session(0xFFC0, write_xmm0=NEW))
    assert written.write_errno == 0
    buf = bytearray(view)
    buf[160:176] = NEW
    struct.pack_into("<Q", buf, 512, fps.xstate_bv | 0x2)
    assert copy_uabi_to_xstate(s, fps, bytes(buf), [0]) == 0
    cpu = m.cpus[0].regs
    assert cpu.xrstor(KernelBuf(fps.regs, "fpstate"), s.user.max_features, "XRSTORS") is None
    assert cpu.mxcsr == written.after_mxcsr == 0xFFC0
