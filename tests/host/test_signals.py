"""Signal frames of the running kernel: layout, handler state, and sigreturn's restore rules."""

from __future__ import annotations

import signal

import pytest

from fpstate.errors import FpstateError, HostUnavailable
from fpstate.host import native
from fpstate.host.child import (
    FCW_DEFAULT,
    MXCSR_DEFAULT,
    MXCSR_PATTERN,
    X87_PI,
    host_standard_layout,
    host_user_xstate_size,
    opmask_pattern,
    register_class,
    zmm_pattern,
)
from fpstate.host.signals import (
    FP_XSTATE_MAGIC1,
    FP_XSTATE_MAGIC2,
    RT_SIGFRAME_SIZE,
    SEGV_EXIT,
    SI_KERNEL,
    UC_FP_XSTATE,
    UC_SIGCONTEXT_SS,
    UC_STRICT_RESTORE_SS,
    UNWRITTEN_FILL,
    SignalRun,
    compacted_form,
    corrupt_magic1,
    corrupt_magic2,
    patch_u32,
    raise_signal,
    set_header_byte,
    set_mxcsr,
    set_sw_xfeatures,
    set_xcomp_bv,
    set_xmm,
    set_xstate_bv,
)
from fpstate.x86.layout import compacted_offset
from fpstate.x86.profiles import load_profile
from fpstate.x86.xfeatures import bits

pytestmark = pytest.mark.host

NEW_XMM3 = bytes(range(0x10, 0x20))
SI_USER = 0


@pytest.fixture(scope="module")
def rc():
    try:
        return register_class()
    except HostUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def avx512(rc):
    if rc.vector_bytes != 64:
        pytest.skip(f"host lacks AVX-512: XCR0 {rc.xcr0:#x} has not all of bits 5-7")
    return rc


@pytest.fixture(scope="module")
def plain(rc) -> SignalRun:
    return raise_signal(seed=0x3C)


def _all_vectors(rc):
    return range(rc.vector_regs)


def _vec(image, rc, n):
    if rc.vector_bytes == 64:
        return image.zmm(n)
    if rc.vector_bytes == 32:
        return image.ymm(n)
    return image.xmm(n)


def _assert_fx_only(run: SignalRun, rc) -> None:
    """FXRSTOR (or XRSTOR of FP|SSE) from the frame, every other user component in its
    initial configuration (restore_fpregs_from_user: init_bv = user_xfeatures & ~xrestore)."""
    assert run.sigreturn_ok and run.after is not None
    a = run.after
    assert a.xmm(3) == NEW_XMM3
    assert a.xmm(5) == zmm_pattern(5, run.seed)[:16]
    assert a.mxcsr == MXCSR_PATTERN
    assert a.st(0) == X87_PI
    for n in _all_vectors(rc):
        assert _vec(a, rc, n)[16:] == bytes(len(_vec(a, rc, n)) - 16)
    if rc.opmask:
        assert all(a.opmask(k) == 0 for k in range(8))


# -- the frame the kernel builds ----------------------------------------------------------

def test_frame_sw_bytes_describe_the_standard_xsave_area(plain: SignalRun, rc) -> None:
    """save_xstate_epilog: magic1, extended_size = user_size + 4, xfeatures = user_xfeatures
    (= XCR0 here), xstate_size = user_size = CPUID.(0DH,0).EBX, magic2 after the area."""
    f = plain.frame
    assert f is not None
    size = host_user_xstate_size()
    assert f.sw_bytes.magic1 == FP_XSTATE_MAGIC1
    assert f.sw_bytes.xstate_size == size
    assert f.sw_bytes.extended_size == size + 4
    assert f.sw_bytes.xfeatures == rc.xcr0
    assert f.sw_bytes.padding == bytes(28)
    assert f.magic2 == FP_XSTATE_MAGIC2


def test_frame_header_is_standard_format_with_fp_sse_forced(plain: SignalRun, rc) -> None:
    """XSAVE (not XSAVEC) to the user stack: XCOMP_BV = 0, reserved bytes zeroed by
    __clear_user, XSTATE_BV = XINUSE | FP | SSE; here every component is in use."""
    x = plain.frame.xsave
    assert x.xcomp_bv == 0
    assert x.header_reserved == bytes(48)
    assert x.xstate_bv & 0x3 == 0x3
    assert x.xstate_bv == rc.xcr0


def test_frame_header_is_xinuse_plus_fp_sse_and_sw_xfeatures_is_not(rc) -> None:
    """XSAVE writes XSTATE_BV[i] = XINUSE[i]; save_xstate_epilog ORs in FP|SSE, and with PKU
    update_pkru_in_sigframe() (v6.13, ae6012d72fa6) PKRU with the task's value;
    sw_bytes.xfeatures is fpstate->user_xfeatures whatever is in use."""
    upper = rc.xcr0 & ~0x3
    if not upper:
        pytest.skip("host XCR0 has nothing beyond x87/SSE")
    run = raise_signal(init_mask=upper)
    assert run.before.xstate_bv == 0x3
    assert run.frame.xsave.xstate_bv == 0x3 | rc.xcr0 & 1 << 9
    assert run.frame.sw_bytes.xfeatures == rc.xcr0
    if rc.vector_bytes == 64:
        assert run.after.zmm(3)[16:] == bytes(48)
    # On this machine's VM a preemption between the child's XRSTOR and its XSAVE has once
    # come back with SSE marked in use (XSTATE_BV 0xe6, a CI run with both cores busy): up to
    # three runs, and the frame is judged on the first that shows x87 and SSE initial.
    for _ in range(3):
        run = raise_signal(init_mask=0x3)
        if run.before.xstate_bv & 0x3 == 0:
            break
    assert run.before.xstate_bv & 0x3 == 0
    assert run.frame.xsave.xstate_bv == rc.xcr0
    assert run.frame.xsave.xmm(3) == bytes(16)


def test_frame_holds_the_interrupted_registers(plain: SignalRun, rc) -> None:
    x = plain.frame.xsave
    for n in _all_vectors(rc):
        assert _vec(x, rc, n) == zmm_pattern(n, plain.seed)[:rc.vector_bytes]
    if rc.opmask:
        assert [x.opmask(k) for k in range(8)] == [
            opmask_pattern(k, plain.seed) & (2**64 - 1 if rc.kmovq else 0xFFFF)
            for k in range(8)]
    assert x.mxcsr == MXCSR_PATTERN
    assert x.st(0) == X87_PI
    assert plain.frame.xsave.raw == plain.frame.xsave.raw[:host_user_xstate_size()]


def test_frame_xmm3_bytes_at_160_plus_48(plain: SignalRun) -> None:
    x = plain.frame.xsave
    assert x.raw[160 + 48:160 + 64] == zmm_pattern(3, plain.seed)[:16]


def test_frame_geometry_follows_get_sigframe(plain: SignalRun) -> None:
    """get_sigframe: sp -= 128 (red zone); fpstate = round_down(sp - (user_size + 4), 64);
    frame = round_down(fpstate - sizeof(rt_sigframe), 16) - 8."""
    f = plain.frame
    size = host_user_xstate_size()
    fpstate = (f.interrupted_sp - 128 - (size + 4)) // 64 * 64
    assert f.fpstate_address == fpstate
    assert f.frame_address == (fpstate - RT_SIGFRAME_SIZE) // 16 * 16 - 8
    assert f.fpstate_aligned64
    assert f.entry_sp_mod16 == 8
    assert f.ucontext_address == f.frame_address + 8
    assert f.siginfo_address == f.frame_address + 8 + 304


def test_frame_ucontext_and_siginfo(plain: SignalRun) -> None:
    f = plain.frame
    assert f.signo == signal.SIGUSR1
    assert f.si_code == SI_USER
    assert f.uc_flags == UC_FP_XSTATE | UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS


def test_handler_starts_with_init_fpu_state(plain: SignalRun, rc) -> None:
    """fpu__clear_user_states(): the handler runs with init_fpstate's user state."""
    e = plain.frame.handler_entry
    for n in _all_vectors(rc):
        assert _vec(e, rc, n) == bytes(rc.vector_bytes)
    if rc.opmask:
        assert all(e.opmask(k) == 0 for k in range(8))
    assert e.mxcsr == MXCSR_DEFAULT
    assert e.fcw == FCW_DEFAULT
    assert e.st(0) == bytes(10)


# -- sigreturn ----------------------------------------------------------------------------

def test_sigreturn_restores_everything(plain: SignalRun, rc) -> None:
    a = plain.after
    assert plain.sigreturn_ok and a is not None and plain.segv is None
    assert plain.exit.exit_code == 0
    for n in _all_vectors(rc):
        assert _vec(a, rc, n) == _vec(plain.before, rc, n)
    if rc.opmask:
        assert [a.opmask(k) for k in range(8)] == [plain.before.opmask(k) for k in range(8)]
    assert a.mxcsr == MXCSR_PATTERN
    assert a.st(0) == X87_PI


def test_sigreturn_takes_a_modified_xmm_from_the_frame(avx512) -> None:
    run = raise_signal((set_xmm(3, NEW_XMM3),))
    a = run.after
    assert a.xmm(3) == NEW_XMM3
    assert a.zmm(3)[16:] == zmm_pattern(3, run.seed)[16:]


@pytest.mark.parametrize("corruption", ["magic1", "magic2", "sw.xfeatures=FP|SSE",
                                        "xstate_size>user_size", "xstate_size<576",
                                        "extended_size<xstate_size"])
def test_sigreturn_falls_back_to_fx_only(corruption: str, rc) -> None:
    """check_xstate_in_sigframe() fails (or sw.xfeatures asks for FP|SSE only): the legacy
    512 bytes are restored from the frame, every other component goes to init."""
    size = host_user_xstate_size()
    patch = {
        "magic1": corrupt_magic1(),
        "magic2": corrupt_magic2(),
        "sw.xfeatures=FP|SSE": set_sw_xfeatures(0x3),
        "xstate_size>user_size": patch_u32(464 + 16, size + 1, "xstate_size"),
        "xstate_size<576": patch_u32(464 + 16, 575, "xstate_size"),
        "extended_size<xstate_size": patch_u32(464 + 4, size - 1, "extended_size"),
    }[corruption]
    run = raise_signal((patch, set_xmm(3, NEW_XMM3)))
    _assert_fx_only(run, rc)


def test_magic2_is_looked_for_at_the_frames_own_xstate_size(rc) -> None:
    """This kernel (6.18.44) reads magic2 at fpstate + fx_sw->xstate_size: a smaller
    self-consistent size with magic2 moved there restores the full state."""
    run = raise_signal((patch_u32(464 + 16, 896, "xstate_size"),
                        patch_u32(896, FP_XSTATE_MAGIC2, "magic2@896"), corrupt_magic2()))
    assert run.sigreturn_ok
    for n in _all_vectors(rc):
        if n != 0:
            assert _vec(run.after, rc, n) == _vec(run.before, rc, n)
    if rc.vector_bytes == 64 and dict((c, o) for c, o, _ in host_standard_layout())[6] == 896:
        # offset 896 is ZMM_Hi256 of zmm0: the magic word was restored as register data
        assert run.after.zmm(0)[32:36] == FP_XSTATE_MAGIC2.to_bytes(4, "little")


def test_sigreturn_ignores_unsupported_sw_xfeatures_bits(rc) -> None:
    """xrestore = fx_sw->xfeatures & fpstate->user_xfeatures."""
    run = raise_signal((set_sw_xfeatures(2**64 - 1),))
    assert run.sigreturn_ok
    for n in _all_vectors(rc):
        assert _vec(run.after, rc, n) == _vec(run.before, rc, n)


def test_xstate_bv_zero_inits_registers_but_loads_mxcsr(rc) -> None:
    """XRSTOR: components with XSTATE_BV[i] = 0 are initialised, but MXCSR is loaded from
    memory whenever RFBM[1] or RFBM[2] is set (SDM 13.8.1)."""
    run = raise_signal((set_xstate_bv(0),))
    a = run.after
    assert run.sigreturn_ok
    for n in _all_vectors(rc):
        assert _vec(a, rc, n) == bytes(rc.vector_bytes)
    assert a.st(0) == bytes(10)
    assert a.mxcsr == MXCSR_PATTERN


def _assert_segv_after_failed_restore(run: SignalRun, rc) -> None:
    """fpu__restore_sig fails -> fpu__clear_user_states() + force_sig(SIGSEGV): the SIGSEGV
    frame (built from the registers after the failure) holds the init state."""
    assert not run.sigreturn_ok and run.after is None
    assert run.exit.exit_code == SEGV_EXIT
    s = run.segv
    assert s is not None and s.signo == signal.SIGSEGV and s.si_code == SI_KERNEL
    for n in _all_vectors(rc):
        assert _vec(s.xsave, rc, n) == bytes(rc.vector_bytes)
    if rc.opmask:
        assert all(s.xsave.opmask(k) == 0 for k in range(8))
    assert s.xsave.mxcsr == MXCSR_DEFAULT
    assert s.xsave.st(0) == bytes(10)


def test_xstate_bv_bit_outside_xcr0_is_sigsegv(rc) -> None:
    """XRSTOR #GP: XSTATE_BV has a bit that XCR0 lacks (here bit 9, PKRU, or the first
    absent bit)."""
    absent = next(i for i in range(2, 63) if not (rc.xcr0 >> i) & 1)
    run = raise_signal((set_xstate_bv(rc.xcr0 | (1 << absent)),))
    _assert_segv_after_failed_restore(run, rc)


def test_header_bytes_8_to_23_must_be_zero(rc) -> None:
    _assert_segv_after_failed_restore(raise_signal((set_header_byte(16, 1),)), rc)
    _assert_segv_after_failed_restore(raise_signal((set_xcomp_bv(1),)), rc)


def test_header_bytes_24_to_63_are_not_checked(rc) -> None:
    """Standard-form XRSTOR checks only header bytes 8..23; the sigreturn path has no
    software check of its own."""
    for index in (24, 63):
        run = raise_signal((set_header_byte(index, 0xA5),))
        assert run.sigreturn_ok
        for n in _all_vectors(rc):
            assert _vec(run.after, rc, n) == _vec(run.before, rc, n)


def test_xcomp_bv_compacted_form_is_accepted(rc) -> None:
    """XCOMP_BV[63] = 1 selects XRSTOR's compacted form: no fault; the registers come back
    intact when the compacted offsets of XCR0 coincide with the standard ones."""
    run = raise_signal((set_xcomp_bv((1 << 63) | rc.xcr0), *compacted_form(rc.xcr0)))
    assert run.sigreturn_ok and run.segv is None
    off, same = 576, True
    for nr, std, size in host_standard_layout():
        if nr < 2:
            continue
        align = (native.cpuid(0xD, nr)[2] >> 1) & 1
        off = (off + 63) // 64 * 64 if align else off
        same &= off == std
        off += size
    if same:
        for n in _all_vectors(rc):
            assert _vec(run.after, rc, n) == _vec(run.before, rc, n)
    # Where they differ (Intel: MPX's standard offsets leave 832-1087 to no component of
    # XCR0 0xE7), a component the compacted form reads wholly from such stack bytes comes back
    # as the bytes `compacted_form` put there.
    std = {nr: (o, o + size) for nr, o, size in host_standard_layout()}
    for nr in bits(rc.xcr0 & ~(1 << 9)):
        if nr < 2:
            continue
        lo = compacted_offset(load_profile("host"), 1 << 63 | rc.xcr0, nr)
        hi = lo + std[nr][1] - std[nr][0]
        if all(b <= lo or a >= hi for n2, (a, b) in std.items() if n2 >= 2):
            got = run.after.raw[std[nr][0]:std[nr][1]]
            assert got == bytes([UNWRITTEN_FILL]) * len(got), nr


def test_compacted_form_patches_every_byte_no_standard_component_covers(rc) -> None:
    """`compacted_form` covers, for every component of XCR0 read in the compacted form,
    exactly the bytes outside the legacy region, the header and every standard component."""
    host = load_profile("host")
    covered = set(range(576))
    for nr in bits(rc.xcr0):
        if nr >= 2:
            c = host.component(nr)
            covered |= set(range(c.offset, c.offset + c.size))
    patched: set[int] = set()
    for p in compacted_form(rc.xcr0):
        if not p.what.startswith("PKRU@"):
            patched |= set(range(p.offset, p.offset + len(p.data)))
    read = set()
    for nr in bits(rc.xcr0 & ~(1 << 9)):
        if nr >= 2:
            lo = compacted_offset(host, 1 << 63 | rc.xcr0, nr)
            read |= set(range(lo, lo + host.component(nr).size))
    assert patched == read - covered


def test_mxcsr_reserved_bit_is_sigsegv_on_both_restore_paths(rc) -> None:
    _assert_segv_after_failed_restore(raise_signal((set_mxcsr(0x80001F80),)), rc)
    _assert_segv_after_failed_restore(
        raise_signal((corrupt_magic1(), set_mxcsr(0x80001F80))), rc)


def test_mxcsr_bit_within_mxcsr_mask_is_restored(plain: SignalRun) -> None:
    mask = plain.frame.xsave.mxcsr_mask
    extra = next((1 << b for b in range(16, 32) if (mask >> b) & 1), None)
    if extra is None:
        pytest.skip(f"MXCSR_MASK {mask:#x} has no bit above 15 to try")
    run = raise_signal((set_mxcsr(MXCSR_DEFAULT | extra),))
    assert run.sigreturn_ok and run.after.mxcsr == MXCSR_DEFAULT | extra


# -- sigaltstack ---------------------------------------------------------------------------

def test_sigaltstack_size_rules(rc) -> None:
    """do_sigaltstack: ss_size < MINSIGSTKSZ (2048) -> ENOMEM; a mode other than 0,
    SS_ONSTACK or SS_DISABLE -> EINVAL; SS_DISABLE ignores the size. Without dynamic
    features and without strict_sas_size, sigaltstack_size_valid() accepts any size >= 2048,
    even one too small for this machine's frame."""
    import errno

    from fpstate.host.sigaltstack import (
        SS_AUTODISARM,
        SS_ONSTACK,
        AltstackRequest,
        disable_request,
        sigaltstack_errnos,
    )
    reqs = [AltstackRequest(2047), AltstackRequest(2048), AltstackRequest(0),
            AltstackRequest(100, SS_ONSTACK), AltstackRequest(4096, 4),
            AltstackRequest(4096, SS_AUTODISARM), disable_request(), AltstackRequest(1 << 40)]
    got = sigaltstack_errnos(reqs)
    if (native.cpuid(7, 0)[3] >> 24) & 1:
        pytest.skip("host has AMX: sigaltstack_size_valid() may enforce the frame size")
    assert got == (errno.ENOMEM, 0, errno.ENOMEM, errno.ENOMEM, errno.EINVAL, 0, 0, 0)


def test_frame_on_the_altstack_has_no_red_zone(rc) -> None:
    """get_sigframe: entering the altstack sets sp = ss_sp + ss_size (no 128-byte red zone),
    then the usual fpstate and rt_sigframe placement."""
    run = raise_signal(altstack_size=8192)
    f = run.frame
    ss_sp, _, ss_size = f.uc_stack
    assert ss_size == 8192
    top = ss_sp + ss_size
    size = host_user_xstate_size()
    assert f.fpstate_address == (top - (size + 4)) // 64 * 64
    assert f.frame_address == (f.fpstate_address - RT_SIGFRAME_SIZE) // 16 * 16 - 8
    assert run.sigreturn_ok


def test_smallest_altstack_and_overflow(rc) -> None:
    """With a page-aligned top the frame starts at top - S where
    S = round_up(round_up(user_size + 4, 64) + 440, 16) + 8; delivery needs sp > ss_sp, so
    the smallest working size is S + 1. One byte less: 'overflowed sigaltstack' and a forced
    SIGSEGV (si_code SI_KERNEL). AT_MINSIGSTKSZ covers it."""
    from fpstate.host.auxv import at_minsigstksz
    from fpstate.host.sigaltstack import deliver_on_altstack, smallest_altstack

    size = host_user_xstate_size()
    need = ((size + 4 + 63) // 64 * 64 + RT_SIGFRAME_SIZE + 15) // 16 * 16 + 8 + 1
    assert smallest_altstack(2048, 16384) == need
    over = deliver_on_altstack(need - 1)
    assert over.frame is None and over.segv is not None
    assert over.segv.signo == signal.SIGSEGV and over.segv.si_code == SI_KERNEL
    assert at_minsigstksz() >= need


def test_amx_request_with_a_small_altstack_is_enospc() -> None:
    """validate_sigaltstack(): an installed altstack smaller than the AMX frame makes
    ARCH_REQ_XCOMP_PERM(XTILE_DATA) fail with ENOSPC."""
    import errno

    from fpstate.host.sigaltstack import amx_altstack_interplay
    try:
        r = amx_altstack_interplay(4096, 4096)
    except HostUnavailable as e:
        pytest.skip(str(e))
    assert r.installed_errno == 0 and r.req_errno == errno.ENOSPC


# -- a sigaltstack behind a protection key (get_sigframe's sig_prepare_pkru, v6.12) ------------

INIT_PKRU = 0x55555554


@pytest.fixture(scope="module")
def pku(rc):
    from fpstate.kernel.x86.conform import host_pku_reason

    reason = host_pku_reason()
    if reason:
        pytest.skip(reason)
    return rc


def _pkru_of(image) -> int:
    """PKRU of a standard-format image (0 where XSTATE_BV[PKRU] is clear)."""
    off = dict((i, o) for i, o, _ in host_standard_layout())[9]
    return int.from_bytes(image.raw[off:off + 4], "little") if image.xstate_bv >> 9 & 1 else 0


def test_pkey_probe_arguments_are_checked() -> None:
    with pytest.raises(FpstateError, match="pkey_rights needs an altstack"):
        raise_signal(pkey_rights=3)
    with pytest.raises(FpstateError, match="handler_pkeys is 'open', 'closed' or 'key0'"):
        raise_signal(altstack_size=16384, pkey_rights=3, handler_pkeys="ajar")
    with pytest.raises(FpstateError, match="split_gap needs pkey_rights"):
        raise_signal(altstack_size=16384, split_gap=1024)
    with pytest.raises(FpstateError, match=r"lies in 1\.\.4096, not 0"):
        raise_signal(altstack_size=16384, pkey_rights=3, split_gap=0)


def test_kernel_writes_the_frame_on_an_altstack_whose_key_the_code_closed(pku) -> None:
    """The interrupted code denies the altstack's key (AD | WD); the kernel still builds the
    frame there (it opens every key first), records the closed PKRU in the frame, gives the
    handler init_pkru_value, and sigreturn (after the handler opened the keys) restores the
    closed PKRU."""
    run = raise_signal(altstack_size=16384, pkey_rights=3, handler_pkeys="open")
    assert run.pkey is not None and run.pkey > 0
    closed = _pkru_of(run.before)
    assert closed >> (2 * run.pkey) & 3 == 3 and closed & 3 == 0  # key closed, key 0 open
    f = run.frame
    assert f is not None and run.altstack_sp <= f.frame_address < run.altstack_sp + 16384
    assert f.interrupted_sp == run.kill_sp
    assert _pkru_of(f.xsave) == closed and f.xsave.xstate_bv >> 9 & 1
    assert _pkru_of(f.handler_entry) == INIT_PKRU
    assert run.sigreturn_ok and _pkru_of(run.after) == closed


def test_sigreturn_under_the_handlers_pkru_cannot_read_its_frame(pku) -> None:
    """A handler that keeps init_pkru_value (the altstack's key closed) returns: rt_sigreturn
    cannot read the frame, so the kernel forces SIGSEGV (SI_KERNEL), delivered on the altstack
    the stack pointer is still on."""
    run = raise_signal(altstack_size=16384, pkey_rights=3, handler_pkeys="closed")
    assert run.frame is None and not run.sigreturn_ok
    segv = run.segv
    assert segv is not None and segv.signo == signal.SIGSEGV and segv.si_code == SI_KERNEL
    assert run.altstack_sp <= segv.frame_address < run.altstack_sp + 16384
    assert run.exit.exit_code == SEGV_EXIT


def test_sigreturn_under_a_pkru_that_denies_key_0_cannot_read_its_frame(pku) -> None:
    """The handler sets AD for key 0 -- the key of its ordinary stack -- and returns:
    rt_sigreturn cannot read uc_sigmask (badframe, before fpu__restore_sig), so the kernel
    forces SIGSEGV (SI_KERNEL), whose frame keeps the handler's own registers: the x87/SSE
    defaults and that PKRU (init_pkru_value | AD of key 0), and whose handler starts again
    with init_pkru_value."""
    run = raise_signal(handler_pkeys="key0")
    assert run.frame is None and not run.sigreturn_ok and run.kill_sp
    segv = run.segv
    assert segv is not None and segv.signo == signal.SIGSEGV and segv.si_code == SI_KERNEL
    assert segv.frame_address < run.kill_sp  # the same stack, below the SIGUSR1 frame
    assert _pkru_of(segv.xsave) == INIT_PKRU | 1
    assert _pkru_of(segv.handler_entry) == INIT_PKRU
    assert run.exit.exit_code == SEGV_EXIT
