"""validate: the verdicts of the kernel and KVM models on blobs, the rule each refusal names, and
the same blobs given to this machine's kernel (PTRACE_SETREGSET, sigreturn) for comparison."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fpstate.errors import BlobError, FpstateError, HostUnavailable
from fpstate.kernel.x86.versions import version_for_release
from fpstate.tools.blob import encode
from fpstate.tools.validate import validate
from fpstate.x86.profiles import bundled_profile, load_profile

SPR = bundled_profile("sapphire-rapids")
ZEN4 = bundled_profile("zen4")


def spr_amx_uabi(xstate_bv: int = 0x602E7) -> bytes:
    obj = {"format": "fpstate-blob/1", "blob_format": "uabi", "xcr0": "0x602e7",
           "header": {"xstate_bv": hex(xstate_bv), "xcomp_bv": "0"},
           "components": [{"number": 0, "registers": {"fcw": "0x37f"}},
                          {"number": 1, "registers": {"mxcsr": "0x1f80", "xmm3": "0x1234"}},
                          {"number": 17, "registers": {"palette": "0x1"}},
                          {"number": 18, "registers": {"tmm0_r3": "0xabcdef"}}]}
    return encode(obj, SPR)


def zen4_uabi() -> bytearray:
    data = bytearray(2440)
    struct.pack_into("<HI", data, 0, 0x37F, 0)
    struct.pack_into("<I", data, 24, 0x1F80)
    struct.pack_into("<QQ", data, 464, 0x2E7, 0)
    struct.pack_into("<Q", data, 512, 0x3)
    return data


# -- model verdicts -------------------------------------------------------------------------------

def test_ptrace_amx_state_needs_the_tiles_in_use() -> None:
    """xstateregs_set -> validate_user_xstate_header: XSTATE_BV within the *tracee's*
    fpstate->user_xfeatures, which has XTILE_DATA only once its buffer grew."""
    blob = spr_amx_uabi()
    assert validate(blob, SPR, "ptrace").accepted  # auto: a tracee with tiles in use
    v = validate(blob, SPR, "ptrace", task="perm")
    assert (v.accepted, v.result) == (False, "-EINVAL")
    assert v.rule == "copy_uabi_to_xstate -> validate_user_xstate_header"
    assert "xtiledata (0x40000) outside the fpstate's user_xfeatures 0x202e7" in v.detail


def test_ptrace_count_must_be_the_regset_size() -> None:
    v = validate(bytes(zen4_uabi())[:2432], ZEN4, "ptrace")
    assert (v.result, v.rule) == ("-EFAULT", "xstateregs_set: count must be fpu_user_cfg.max_size")
    v = validate(bytes(zen4_uabi()) + bytes(3), ZEN4, "ptrace")
    assert v.result == "-EINVAL" and "multiple of the regset unit" in v.rule
    v = validate(bytes(zen4_uabi()) + bytes(8), ZEN4, "ptrace")
    assert v.accepted and any("clamped" in n for n in v.notes)


def test_ptrace_mxcsr_and_header_rules() -> None:
    data = zen4_uabi()
    struct.pack_into("<I", data, 24, 0x41F80)
    v = validate(bytes(data), ZEN4, "ptrace")
    assert v.rule == "copy_uabi_to_xstate: MXCSR reserved bits (mxcsr_feature_mask)"
    data = zen4_uabi()
    data[512 + 40] = 1
    v = validate(bytes(data), ZEN4, "ptrace")
    assert v.result == "-EINVAL" and v.detail == "reserved header bytes 16-63 are not zero"


def test_kvm_amx_buffer_needs_guest_permission_before_the_vcpu() -> None:
    """KVM_SET_XSAVE reads guest_fpu.uabi_size bytes: 11008 once KVM_SET_CPUID2 enabled tile
    data (guest permission first), else 4096 and the header's XTILE_DATA is refused."""
    blob = spr_amx_uabi()
    ok = validate(blob, SPR, "kvm")
    assert ok.accepted and ok.task == "perm"
    assert any("guest_fpu.uabi_size 11008" in n for n in ok.notes)
    v = validate(blob, SPR, "kvm", task="default")
    assert not v.accepted and v.result == "-EINVAL"
    assert any("the 6912 bytes beyond are never looked at" in n for n in v.notes)
    short = validate(blob[:4000], SPR, "kvm")
    assert (short.result, short.rule) == ("-EFAULT",
                                          "KVM_SET_XSAVE: memdup_user of guest_fpu.uabi_size "
                                          "bytes")


def test_kvm_refuses_xstate_bv_outside_kvm_supported_xcr0() -> None:
    data = zen4_uabi().ljust(4096, b"\0")
    struct.pack_into("<Q", data, 512, 0x3 | 1 << 17)
    v = validate(bytes(data), ZEN4, "kvm")
    assert v.rule == ("fpu_copy_uabi_to_guest_fpstate: XSTATE_BV outside "
                      "kvm_caps.supported_xcr0") and v.detail == "xtilecfg (0x20000)"


def test_sigreturn_names_the_xrstor_fault() -> None:
    sig = bytearray(zen4_uabi()) + bytes(4)
    struct.pack_into("<IIQI", sig, 464, 0x46505853, 2444, 0x2E7, 2440)
    struct.pack_into("<I", sig, 2440, 0x46505845)
    assert validate(bytes(sig), ZEN4, "sigreturn").accepted
    struct.pack_into("<Q", sig, 520, 1)
    v = validate(bytes(sig), ZEN4, "sigreturn")
    assert v.result == "SIGSEGV" and v.rule.startswith("restore_fpregs_from_user")
    assert "#GP" in v.detail


def test_a_frame_in_a_smaller_cpus_layout_is_fx_only_on_v6_16_only() -> None:
    """A frame as CRIU writes it for a CPU with x87, SSE and AVX only (sw_bytes 836/0x7/832,
    MAGIC2 at 832): accepted whole by 6.18 (the conform case sigreturn/resized-to-ymm is the
    real kernel's word), and by v6.16 only as FXSAVE-only -- MAGIC2 looked for at the task's
    user_size (2,440 on Zen 4)."""
    sig = bytearray(836)
    struct.pack_into("<HxxxxxxxxxxxxxxxxxxxxxxI", sig, 0, 0x37F, 0x1F80)
    struct.pack_into("<IIQI", sig, 464, 0x46505853, 836, 0x7, 832)
    struct.pack_into("<Q", sig, 512, 0x7)
    struct.pack_into("<I", sig, 832, 0x46505845)
    new = validate(bytes(sig), ZEN4, "sigreturn", kernel="6.18")
    old = validate(bytes(sig), ZEN4, "sigreturn", kernel="6.16")
    assert new.accepted and old.accepted
    assert not any("FXSAVE-only" in n for n in new.notes)
    assert any("FXSAVE-only" in n and "user_size is 2440" in n for n in old.notes)


def test_bad_input() -> None:
    with pytest.raises(BlobError, match="576-byte"):
        validate(bytes(100), ZEN4, "ptrace")
    with pytest.raises(FpstateError, match="unknown path"):
        validate(bytes(600), ZEN4, "fork")


# -- the real kernel agrees -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def host():
    try:
        from fpstate.host.child import register_class

        register_class()
        return load_profile("host")
    except HostUnavailable as e:
        pytest.skip(str(e))


KERNEL = version_for_release(os.uname().release).name


@pytest.mark.host
def test_ptrace_verdicts_match_the_real_kernel(host) -> None:
    """The same NT_X86_XSTATE writes to a real stopped child: the errno the kernel returns is
    the model's verdict, for an unchanged image and five broken ones."""
    from fpstate.host.ptrace import NT_X86_XSTATE, RegsetWrite, ptrace_session

    base = ptrace_session().xstate.data
    cases = {"as read": bytes(base)}
    for name, (off, fmt, value) in {
        "mxcsr bit 18": (24, "<I", 0x41F80), "xcomp_bv": (520, "<Q", 1 << 63 | 0x3),
        "reserved header": (552, "<Q", 1), "xstate_bv bit 9": (512, "<Q", 0x203)}.items():
        b = bytearray(base)
        struct.pack_into(fmt, b, off, value)
        cases[name] = bytes(b)
    cases["short"] = bytes(base[:-8])
    run = ptrace_session([RegsetWrite(NT_X86_XSTATE, d, n) for n, d in cases.items()])
    for (name, data), result in zip(cases.items(), run.writes, strict=True):
        verdict = validate(data, host, "ptrace", kernel=KERNEL)
        assert verdict.accepted == (result.errno == 0), name
        assert verdict.result == ("0" if result.errno == 0 else
                                  {22: "-EINVAL", 14: "-EFAULT"}[result.errno]), name


@pytest.mark.host
def test_sigreturn_verdicts_match_the_real_kernel(host) -> None:
    """A real frame, patched as the real handler patches it: sigreturn succeeds or forces
    SIGSEGV exactly when the model says so."""
    from fpstate.host import signals as hs

    patches = [(), (hs.set_mxcsr(0x41F80),), (hs.set_xstate_bv(0xEF),),
               (hs.set_xcomp_bv(1),), (hs.corrupt_magic1(),), (hs.set_header_byte(20, 1),),
               (hs.set_sw_xfeatures(0x3),)]
    for patch in patches:
        run = hs.raise_signal(patch)
        f = run.frame
        frame = bytearray(f.raw[f.fpstate_offset:f.fpstate_offset + f.sw_bytes.extended_size])
        for p in patch:
            frame[p.offset:p.offset + len(p.data)] = p.data
        verdict = validate(bytes(frame), host, "sigreturn", kernel=KERNEL)
        assert verdict.accepted == run.sigreturn_ok, [p.what for p in patch]
        assert (run.segv is not None) == (not verdict.accepted)


# -- ia32 frames (sigreturn-ia32) ---------------------------------------------------------------


def ia32_fpstate(cpu: str = "zen4") -> bytes:
    """The fpstate of an ia32 frame the kernel model builds for a compat task: the fsave
    header, then the XSAVE area, extended_size bytes."""
    from fpstate.kernel.x86 import signal as sg
    from fpstate.kernel.x86.sched import SA_IA32_ABI, SA_SIGINFO, SIGUSR1, Machine, SigAction
    from fpstate.kernel.x86.sched import Signal as Sig

    m = Machine.boot(cpu, None, 1)
    t = m.spawn("t32", compat=True)
    m.run(0, t)
    m.user_write(0, 0)
    m.user_write(0, 1)
    t.handlers[SIGUSR1] = SigAction(SA_IA32_ABI | SA_SIGINFO)
    m.enter_kernel(0)
    t.pending.append(Sig(SIGUSR1))
    m.exit_to_user_mode(0)
    mm = t.process.mm
    fp = int.from_bytes(mm.read(t.user_sp + sg.RT_IA32_SC + sg.SC32_FPSTATE, 4), "little")
    ext = int.from_bytes(mm.read(fp + 112 + 464 + 4, 4), "little")
    return mm.read(fp, ext)


def test_an_ia32_frame_is_taken_and_its_header_wins() -> None:
    frame = bytearray(ia32_fpstate())
    v = validate(bytes(frame), ZEN4, "sigreturn-ia32")
    assert v.accepted and v.rule == "fpu__restore_sig (ia32 frame)"
    frame[28:38] = bytes(10)  # the header's ST0, which the FXSAVE area does not say
    v = validate(bytes(frame), ZEN4, "sigreturn-ia32")
    assert v.accepted and any("overrides the FXSAVE area's" in n and "ST0" in n for n in v.notes)


@pytest.mark.parametrize("patch,rule,detail", [
    ((112 + 24, 0xFFFF0000 | 0x1F80), "copy_sigframe_from_user_to_xstate -> copy_uabi_to_xstate",
     "-EINVAL: MXCSR 0xffff1f80 outside the feature mask"),
    ((112 + 520, 1), "copy_sigframe_from_user_to_xstate -> copy_uabi_to_xstate",
     "-EINVAL: XCOMP_BV is 0x1"),
    ((112 + 512, 0x3 | 1 << 18), "copy_sigframe_from_user_to_xstate -> copy_uabi_to_xstate",
     "outside the fpstate's user_xfeatures"),
])
def test_an_ia32_frame_is_refused_by_the_copy_into_the_fpstate(patch, rule, detail) -> None:
    """Unlike a 64-bit frame, whose bad header the XRSTOR from user memory faults on, an ia32
    frame is validated by copy_uabi_to_xstate() on its way into the fpstate."""
    frame = bytearray(ia32_fpstate())
    off, value = patch
    struct.pack_into("<Q" if off % 8 == 0 and off >= 112 + 512 else "<I", frame, off, value)
    v = validate(bytes(frame), ZEN4, "sigreturn-ia32")
    assert not v.accepted and v.result == "SIGSEGV" and v.rule == rule and detail in v.detail


def test_an_fxsave_only_ia32_frame_is_checked_for_mxcsr() -> None:
    frame = bytearray(ia32_fpstate())
    frame[112 + 464:112 + 468] = bytes(4)  # no MAGIC1
    assert validate(bytes(frame), ZEN4, "sigreturn-ia32").accepted
    struct.pack_into("<I", frame, 112 + 24, 0x80001F80)
    v = validate(bytes(frame), ZEN4, "sigreturn-ia32")
    assert not v.accepted and v.rule == "__fpu_restore_sig: MXCSR & ~mxcsr_feature_mask (x86-64)"


def test_a_short_ia32_blob_is_a_blob_error() -> None:
    with pytest.raises(BlobError, match="fsave header"):
        validate(bytes(600), ZEN4, "sigreturn-ia32")


@pytest.mark.host
def test_ia32_sigreturn_verdicts_match_the_real_kernel(host) -> None:
    """A real 32-bit program's frame, patched by its handler: sys32_rt_sigreturn succeeds or
    kills it with SIGSEGV exactly when the model says so."""
    from fpstate.host.ia32 import ia32_signal
    from fpstate.kernel.x86.conform_signal import ia32_probe_state

    # XSTATE_BV bits 15:8 = 0x01: bit 8 (PT, supervisor) is never in XCR0, on any host.
    patches = [(), ((28, bytes(10)),), ((112 + 24, (0xFFFF3FA0).to_bytes(4, "little")),),
               ((112 + 513, b"\x01"),), ((112 + 520, b"\x01"),), ((112 + 540, b"\x01"),),
               ((112 + 464, bytes(4)),),
               ((112 + 464, bytes(4)), (112 + 24, (0xFFFF3FA0).to_bytes(4, "little")))]
    try:
        runs = [(p, ia32_signal(ia32_probe_state(), siginfo=True, patches=p)) for p in patches]
    except HostUnavailable as e:
        pytest.skip(str(e))
    outcomes = []
    for p, run in runs:
        frame = bytearray(run.frame)
        for off, data in p:
            frame[off:off + len(data)] = data
        verdict = validate(bytes(frame), host, "sigreturn-ia32", kernel=KERNEL)
        assert verdict.accepted == (run.died_of is None), (p, verdict)
        outcomes.append(verdict.accepted)
    assert outcomes == [True, True, False, False, False, False, True, False]


_IA32_FRAME = None


def _ia32_frame_once() -> bytes:
    global _IA32_FRAME
    if _IA32_FRAME is None:
        _IA32_FRAME = ia32_fpstate()
    return _IA32_FRAME


@settings(max_examples=60, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(0, 1300), st.binary(min_size=1, max_size=8)),
                      max_size=4),
       cut=st.integers(0, 40))
def test_mutated_ia32_frames_get_a_verdict_or_a_blob_error(edits, cut) -> None:
    """Random byte edits of an ia32 frame (header, legacy area, sw bytes, XSAVE header) and
    truncation: a verdict whose refusals name a rule, or BlobError for a blob too short."""
    frame = bytearray(_ia32_frame_once())
    for off, data in edits:
        frame[off:off + len(data)] = data
    blob = bytes(frame[:len(frame) - cut * 40])
    try:
        v = validate(blob, ZEN4, "sigreturn-ia32")
    except BlobError:
        assert len(blob) < 112 + 576
        return
    assert v.accepted or (v.result == "SIGSEGV" and v.rule)


def test_a_frame_without_xstate_bv_pkru_gets_every_key_opened() -> None:
    """A zen4 frame with a PKRU word: with XSTATE_BV[PKRU] set (as update_pkru_in_sigframe()
    makes it) no note; with it clear, as v6.12 wrote it on AMD, sigreturn still succeeds and the
    note says PKRU comes back 0, not the word. Both the 64-bit and the ia32 frame."""
    sig = bytearray(zen4_uabi()) + bytes(4)
    struct.pack_into("<IIQI", sig, 464, 0x46505853, 2444, 0x2E7, 2440)
    struct.pack_into("<I", sig, 2440, 0x46505845)
    pkru_off = ZEN4.component(9).offset
    struct.pack_into("<I", sig, pkru_off, 0x55555550)
    struct.pack_into("<Q", sig, 512, 0x203)
    v = validate(bytes(sig), ZEN4, "sigreturn")
    assert v.accepted and not any("PKRU" in n for n in v.notes)
    struct.pack_into("<Q", sig, 512, 0x3)
    v = validate(bytes(sig), ZEN4, "sigreturn")
    assert v.accepted
    assert [n for n in v.notes if "PKRU" in n] == [
        "XSTATE_BV[PKRU] is 0: sigreturn loads PKRU = 0x0 (every protection key open), not the "
        "frame's PKRU word 0x55555550; update_pkru_in_sigframe() sets the bit since v6.13 "
        "(ae6012d72fa6), as a frame written by hand must"]
    frame = bytearray(ia32_fpstate())
    xstate_bv = struct.unpack_from("<Q", frame, 112 + 512)[0]
    assert xstate_bv & 0x200 and struct.unpack_from("<I", frame, 112 + pkru_off)[0]
    assert not any("PKRU" in n for n in validate(bytes(frame), ZEN4, "sigreturn-ia32").notes)
    struct.pack_into("<Q", frame, 112 + 512, xstate_bv & ~0x200)
    v = validate(bytes(frame), ZEN4, "sigreturn-ia32")
    assert v.accepted and any("sigreturn loads PKRU = 0x0 " in n for n in v.notes)


def test_a_frame_whose_mxcsr_is_not_loaded_says_why() -> None:
    """MXCSR 0x3fa0 in a zen4 frame: loaded as it is (no note); with fx_sw.xfeatures without
    SSE, init_fpstate's restore of SSE sets 1F80H (measured on Zen 4: conform
    sigreturn/sw.xfeatures-without-sse-mxcsr-0x3fa0); an ia32 frame whose XSTATE_BV is x87
    only gets 1F80H from the compacted restore of the task's fpstate (conform
    sigreturn/ia32-xstate-bv-without-sse)."""
    sig = bytearray(zen4_uabi()) + bytes(4)
    struct.pack_into("<IIQI", sig, 464, 0x46505853, 2444, 0x2E7, 2440)
    struct.pack_into("<I", sig, 2440, 0x46505845)
    struct.pack_into("<I", sig, 24, 0x3FA0)
    v = validate(bytes(sig), ZEN4, "sigreturn")
    assert v.accepted and not any("MXCSR" in n for n in v.notes)
    struct.pack_into("<Q", sig, 464 + 8, 0x2E7 & ~0x2)
    v = validate(bytes(sig), ZEN4, "sigreturn")
    assert v.accepted and [n for n in v.notes if "MXCSR" in n] == [
        "sigreturn loads MXCSR = 0x1f80, not the frame's 0x3fa0: init_fpstate's restore of the "
        "components the frame does not restore (sse) loads its MXCSR (SSE among them)"]
    frame = bytearray(ia32_fpstate())
    struct.pack_into("<I", frame, 112 + 24, 0x3FA0)
    assert not any("MXCSR" in n for n in validate(bytes(frame), ZEN4, "sigreturn-ia32").notes)
    struct.pack_into("<Q", frame, 112 + 512, 0x1)
    v = validate(bytes(frame), ZEN4, "sigreturn-ia32")
    assert v.accepted and any(n.startswith("sigreturn loads MXCSR = 0x1f80, not the frame's "
                                           "0x3fa0: XSTATE_BV has no SSE") for n in v.notes)
