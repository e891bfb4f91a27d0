"""Every invariant is a predicate that can fail: each test breaks one rule by hand in a state the
model reached and checks that exactly that invariant reports it (and that it held before)."""

from __future__ import annotations

import pytest

from fpstate.check import invariants
from fpstate.check.actions_x86 import component_number
from fpstate.check.invariants import BUG_INVARIANTS, BY_NAME, INVARIANTS, PREDICATES
from fpstate.check.scenario import make_world
from fpstate.check.world import Action, StepError
from fpstate.kernel.x86 import core
from fpstate.kernel.x86.hw import mxcsr_token, read_token, token
from fpstate.kernel.x86.signal import SW_BYTES_OFFSET
from fpstate.kernel.x86.types import XFEATURE_MASK_GUEST_SUPERVISOR

A = Action.of
AVX, TILEDATA, CET_KERNEL = 2, 18, 12
SPR = {"cpu": "sapphire-rapids", "cpus": 2, "processes": {"p0": 1, "p1": 1}, "vms": {}}
KVM = {"cpu": "sapphire-rapids", "cpus": 1, "processes": {"vmm": 1},
       "vms": {"vm0": {"vmm": "vmm.t0", "vcpus": 1}}}


def world(config=SPR, variant=None, steps=()):
    w = make_world("x86", config, variant)
    for a in steps:
        r = w.step(a)
        assert not r.violations, r.violations
    return w


def broken(w) -> set[str]:
    w.steps += 1  # a new step: the per-step caches are stale
    return {v.invariant for v in w.check()}


def test_the_registry_is_complete() -> None:
    checked = {name for preds in PREDICATES.values() for name, _, _ in preds}
    assert checked | set(BUG_INVARIANTS.values()) | {"kernel-warn"} == set(BY_NAME)
    assert all(i.origin and i.statement for i in INVARIANTS)
    assert set(PREDICATES) == {"x86", "arm64"}


def test_model_bugs_map_to_invariants() -> None:
    v = invariants.violation_for_bug("xsave-out-of-bounds", "bytes 2560..10752")
    assert (v.invariant, v.detail) == ("save-within-allocation",
                                       "xsave-out-of-bounds: bytes 2560..10752")
    assert invariants.violation_for_bug("raw-xsave-addr", "x").invariant == "kernel-warn"


def test_a_freed_buffer_still_referenced() -> None:
    w = world(steps=[A("run", task="p0.t0", cpu=0)])
    assert broken(w) == set()
    w.tasks["p0.t0"].fpu.fpstate.freed = True
    assert "save-within-allocation" in broken(w)


def test_a_buffer_too_small_for_its_features() -> None:
    w = world()
    fps = w.tasks["p0.t0"].fpu.fpstate
    fps.xfeatures |= 1 << TILEDATA
    fps.xcomp_bv |= 1 << TILEDATA
    assert "size-covers-features" in broken(w)


def test_xcomp_bv_must_match_the_features() -> None:
    w = world()
    fps = w.tasks["p0.t0"].fpu.fpstate
    fps.xcomp_bv &= ~(1 << AVX)
    assert broken(w) >= {"xcomp-bv-matches-features"}


def test_valid_registers_must_equal_the_image() -> None:
    w = world(steps=[A("run", task="p0.t0", cpu=0), A("write", task="p0.t0", component="avx"),
                     A("idle", cpu=0)])
    t = w.tasks["p0.t0"]
    assert w.where(t)[0] == "both" and broken(w) == set()
    other = token(t.pid, 99, AVX, 256)
    core.fpstate_write_component(w.m.system, t.fpu.fpstate, AVX, other)
    assert "valid-registers-match-memory" in broken(w)


def test_tif_clear_means_owning_the_registers() -> None:
    w = world(steps=[A("run", task="p0.t0", cpu=0), A("idle", cpu=0)])
    w.tasks["p0.t0"].need_fpu_load = False
    assert "tif-clear-owns-registers" in broken(w)


def test_a_value_of_another_context_and_a_lost_write() -> None:
    w = world(steps=[A("run", task="p0.t0", cpu=0), A("write", task="p0.t0", component="avx")])
    other = w.tasks["p1.t0"]
    w.m.cpus[0].regs.set_component(AVX, token(other.pid, 5, AVX, 256))
    assert broken(w) == {"no-foreign-value"}
    w = world(steps=[A("run", task="p0.t0", cpu=0), A("write", task="p0.t0", component="avx")])
    w.m.cpus[0].regs.init_components(1 << AVX)
    assert broken(w) == {"no-lost-write"}


def test_dynamic_state_needs_permission() -> None:
    w = world(steps=[A("run", task="p0.t0", cpu=0)])
    w.m.cpus[0].regs.set_component(TILEDATA, token(w.tasks["p0.t0"].pid, 1, TILEDATA, 8192))
    w.expected["p0.t0"][TILEDATA] = w.m.cpus[0].regs.values[TILEDATA]
    assert broken(w) == {"dynamic-state-needs-permission"}


def test_a_permission_keeps_its_defaults() -> None:
    """The group's permission, and its guest permission, hold fpstate_reset()'s defaults; a
    request adds to them. A permission reduced to the tile data bit breaks the invariant, and
    so does the variant that stores requests that way (v5.16)."""
    w = world(steps=[A("run", task="p0.t0", cpu=0),
                     A("arch_prctl", task="p0.t0", option="req_perm", feature=18)])
    assert broken(w) == set()
    w.tasks["p0.t0"].fpu.perm.state_perm = 1 << TILEDATA
    assert broken(w) == {"permission-keeps-defaults"}
    w = world(steps=[A("run", task="p0.t0", cpu=0)])
    w.tasks["p0.t0"].fpu.guest_perm.state_perm &= ~(1 << AVX)
    assert broken(w) == {"permission-keeps-defaults"}
    w = world(variant="req-perm-overwrites", steps=[A("run", task="p0.t0", cpu=0)])
    r = w.step(A("arch_prctl", task="p0.t0", option="req_perm", feature=18))
    assert [v.invariant for v in r.violations] == ["permission-keeps-defaults"]


def test_guest_only_state_in_a_host_fpstate() -> None:
    w = world()
    fps = w.tasks["p1.t0"].fpu.fpstate
    fps.xstate_bv |= XFEATURE_MASK_GUEST_SUPERVISOR
    assert "guest-only-not-in-host-fpstate" in broken(w)


def test_init_must_clear_cet_and_reset_must_leave_zeros() -> None:
    w = world(KVM, steps=[A("run", task="vmm.t0", cpu=0),
                          A("set_cet_msr", task="vmm.t0", vcpu="vm0.v0", component="cet_kernel")])
    v = w.vcpus["vm0.v0"]
    seen = w.guest_seen("vm0.v0")
    w.emitted = [("init", ("vm0.v0", v, seen, seen, set()))]  # an INIT that cleared nothing
    assert "init-clears-architectural" in broken(w)
    v.arch.guest_fpu.fpstate.regs[700] = 1
    w.emitted = [("reset", ("vm0.v0", v))]
    assert "reset-zeroed-buffer" in broken(w)


def test_nothing_beyond_what_is_advertised() -> None:
    w = world(KVM, steps=[A("run", task="vmm.t0", cpu=0)])
    r = w.step(A("get_xsave", task="vmm.t0", vcpu="vm0.v0"))
    assert not r.violations
    v = w.vcpus["vm0.v0"]
    buf = bytearray(w._get_xsave2(0, "vm0.v0", v))
    bv = int.from_bytes(buf[512:520], "little")
    buf[512:520] = (bv | 1 << 19).to_bytes(8, "little")
    w.emitted = [("kvm_uabi", ("vm0.v0", v, bytes(buf), w._guest_held("vm0.v0", v),
                               frozenset()))]
    assert broken(w) == {"nothing-beyond-advertised"}


def test_signal_frames_must_describe_themselves() -> None:
    w = world(steps=[A("run", task="p0.t0", cpu=0), A("sigaction", task="p0.t0"),
                     A("write", task="p0.t0", component="avx")])
    r = w.step(A("signal", task="p0.t0"))
    assert not r.violations and r.observed["delivered"] is True
    t = w.tasks["p0.t0"]
    frame = r.observed["frame"]
    buf_fx = int.from_bytes(t.process.mm.read(frame + 232, 8), "little")
    record = ("sigframe", (t, frame, buf_fx, (0, 0, None)))
    mm = t.process.mm
    sw = bytearray(mm.read(buf_fx + SW_BYTES_OFFSET, 20))
    sw[16:20] = (576).to_bytes(4, "little")  # xstate_size too small for the features
    mm.write(buf_fx + SW_BYTES_OFFSET, bytes(sw))
    w.emitted = [record]
    assert broken(w) == {"sigframe-fits-and-describes"}


def test_arm64_rules_are_registered_under_the_checkers_names() -> None:
    from fpstate.check.invariants_arm64 import ARM64_RULES
    from fpstate.kvm.arm64 import invariants as kvm_inv

    names = {i.name for i in kvm_inv.INVARIANTS}
    assert set(ARM64_RULES) == names
    assert set(ARM64_RULES.values()) <= set(BY_NAME)


@pytest.mark.parametrize("name", [i.name for i in INVARIANTS])
def test_every_invariant_has_a_documented_origin(name: str) -> None:
    inv = BY_NAME[name]
    assert any(word in inv.origin for word in ("seed", ".c", ".h", "SDM", "Documentation"))


def test_nested_amx_signal_frames_stay_inside_a_threads_stack() -> None:
    """A thread's stack is RLIMIT_STACK's 8 MiB, as glibc's pthreads get: thirteen nested
    signal frames of AMX size (about 11 KiB each) stay inside it. With the 128 KiB stacks the
    model used to map, the thirteenth frame straddled the guard page below the third thread's
    stack and the explorer reported sigframe-fits-and-describes under the kernel's design."""
    cfg = {"cpu": "sapphire-rapids", "cpus": 2, "processes": {"p0": 3}, "vms": {}}
    w = world(cfg, steps=[A("run", task="p0.t2", cpu=1), A("sigaction", task="p0.t2"),
                          A("run", task="p0.t1", cpu=0),
                          A("arch_prctl", task="p0.t1", option="req_perm", feature=18),
                          A("write", task="p0.t2", component="xtiledata")])
    mm = w.tasks["p0.t2"].process.mm
    for _ in range(13):
        r = w.step(A("signal", task="p0.t2"))
        assert not r.violations and r.observed["delivered"] is True
    lo, hi, _ = w.frames["p0.t2"][-1]
    assert len(w.frames["p0.t2"]) == 13 and hi - lo > 11_000
    stack = [(s, s + n) for s, n in mm.regions.items() if s <= lo < s + n]
    assert stack and stack[0][1] - stack[0][0] == 8 << 20 and hi <= stack[0][1]


ZEN4_ONE = {"cpu": "zen4", "cpus": 1, "processes": {"p0": 1}, "vms": {}}


def _on_altstack(size: int, variant: str | None = None):
    return world(ZEN4_ONE, variant, steps=[A("run", task="p0.t0", cpu=0),
                                           A("sigaction", task="p0.t0", onstack=True),
                                           A("sigaltstack", task="p0.t0", size=size)])


def test_a_refused_sigreturn_of_a_readable_frame_is_a_violation_an_unreadable_one_not() -> None:
    """sigreturn-restores-own-frame: the handler on a keyed sigaltstack keeps init_pkru_value,
    which closes the stack's key, so rt_sigreturn cannot read the frame and fails -- not the
    kernel's fault, no violation; after pkey_open it restores. A refusal the step reports for
    a frame the handler could read breaks the invariant."""
    w = _on_altstack(16384)
    w.step(A("pkey_altstack", task="p0.t0"))
    assert w.step(A("signal", task="p0.t0")).observed["delivered"] is True
    r = w.step(A("sigreturn", task="p0.t0"))
    assert r.observed["ret"] == -14 and not r.violations
    w = _on_altstack(16384)
    w.step(A("pkey_altstack", task="p0.t0"))
    w.step(A("signal", task="p0.t0"))
    w.step(A("pkey_open", task="p0.t0"))
    r = w.step(A("sigreturn", task="p0.t0"))
    assert r.observed["ret"] == 0 and not r.violations
    w.emitted = [("sigreturn-refused", (w.tasks["p0.t0"], -14, 0x7F0000))]
    assert broken(w) == {"sigreturn-restores-own-frame"}


def test_a_signal_lost_with_room_on_its_stack() -> None:
    """sigframe-delivered-with-room: a task killed by SIGSEGV on delivery although its
    sigaltstack (16384 bytes) has room for any frame (AT_MINSIGSTKSZ 3376 on Zen 4)."""
    w = _on_altstack(16384)
    w.emitted = [("undelivered", (w.tasks["p0.t0"], 16384, 3376))]
    assert broken(w) == {"sigframe-delivered-with-room"}
    w.emitted = [("undelivered", (w.tasks["p0.t0"], 3375, 3376))]
    assert broken(w) == set()


def test_an_altstack_too_small_for_the_frame_may_lose_the_signal() -> None:
    """sigaltstack(2048) is accepted (MINSIGSTKSZ) but smaller than AT_MINSIGSTKSZ: the frame
    overflows it, the kernel forces SIGSEGV, and that is no violation."""
    w = _on_altstack(2048)
    r = w.step(A("signal", task="p0.t0"))
    assert r.observed == {"delivered": False, "alive": False} and not r.violations


def test_a_closed_keys_altstack_takes_the_frame_since_v6_12_only() -> None:
    """The stack behind a key the task closed (pkey_altstack, then a PKRU token: AD for key
    1): delivered by the kernel's design, lost by the v4.9-v6.11 one."""
    for variant, delivered in ((None, True), ("sigframe-under-user-pkru", False)):
        w = _on_altstack(16384, variant)
        assert w.step(A("pkey_altstack", task="p0.t0")).observed["key"] == 1
        r = w.step(A("signal", task="p0.t0"))
        assert r.observed["delivered"] is delivered, variant
        assert [v.invariant for v in r.violations] == (
            [] if delivered else ["sigframe-delivered-with-room"])


def test_pkey_altstack_leaves_the_task_a_pkru_of_its_own_closing_key_1() -> None:
    """pkey_altstack ends with the task's WRPKRU of a value naming it: the task expects that
    value, sees it (no-lost-write holds), and its key-1 bits are AD."""
    w = _on_altstack(16384)
    r = w.step(A("pkey_altstack", task="p0.t0"))
    assert r.observed == {"ret": 0, "errno": "0", "key": 1, "fault": "none"}
    assert not r.violations
    value = w.expected["p0.t0"][9]
    assert w.writer(value, 9) == "p0.t0#1" and value[0] >> 2 & 3 == 0b01
    assert w.tasks["p0.t0"].process.mm.pkeys == {w.tasks["p0.t0"].sas_ss_sp: 1}
    w.expected["p0.t0"][9] = (0x55555554).to_bytes(4, "little") + bytes(4)
    assert "no-lost-write" in broken(w)


def test_a_handlers_frame_edit_is_what_sigreturn_must_restore() -> None:
    """frame_write: the handler stores its own AVX value in its frame; sigreturn loads it and
    the task expects it. Had the restore given back the value of before the edit (here: the
    frame patched back behind the world's back), no-lost-write reports it."""
    steps = [A("run", task="p0.t0", cpu=0), A("sigaction", task="p0.t0"),
             A("write", task="p0.t0", component="avx"), A("signal", task="p0.t0")]
    for undo in (False, True):
        w = world(ZEN4_ONE, steps=steps)
        t = w.tasks["p0.t0"]
        lo = w.frames["p0.t0"][-1][0]
        fp = int.from_bytes(t.process.mm.read(lo + 232, 8), "little")
        off = w.m.system.profile.component(AVX).offset
        before = t.process.mm.read(fp + off, 256)
        assert not w.step(A("frame_write", task="p0.t0", component="avx")).violations
        assert w.writer(w.sigstack["p0.t0"][-1][AVX], AVX) == "p0.t0#2"
        if undo:
            t.process.mm.write(fp + off, before)
            w._hashed = None  # changed behind the world's back: its memoised key is stale
        r = w.step(A("sigreturn", task="p0.t0"))
        assert r.observed["ret"] == 0
        assert [v.invariant for v in r.violations] == (["no-lost-write"] if undo else [])


@pytest.mark.parametrize("component", ["avx", "pkru"])
def test_a_handlers_cleared_xstate_bv_bit_is_the_initial_configuration_after_sigreturn(
        component: str) -> None:
    """frame_clear: the handler clears a component's XSTATE_BV bit in its frame; sigreturn's
    XRSTOR loads the component's initial configuration (AVX zeros; PKRU 0, every key open)
    and the task expects it. Had the restore taken the frame's bytes (here: the bit set
    again behind the world's back), no-lost-write reports it."""
    i = component_number(component)
    steps = [A("run", task="p0.t0", cpu=0), A("sigaction", task="p0.t0"),
             A("write", task="p0.t0", component=component), A("signal", task="p0.t0")]
    for undo in (False, True):
        w = world(ZEN4_ONE, steps=steps)
        t = w.tasks["p0.t0"]
        lo = w.frames["p0.t0"][-1][0]
        fp = int.from_bytes(t.process.mm.read(lo + 232, 8), "little")
        bv = int.from_bytes(t.process.mm.read(fp + 512, 8), "little")
        assert bv >> i & 1
        assert not w.step(A("frame_clear", task="p0.t0", component=component)).violations
        assert int.from_bytes(t.process.mm.read(fp + 512, 8), "little") == bv & ~(1 << i)
        if undo:
            t.process.mm.write(fp + 512, bv.to_bytes(8, "little"))
            w._hashed = None  # changed behind the world's back: its memoised key is stale
        r = w.step(A("sigreturn", task="p0.t0"))
        assert r.observed["ret"] == 0
        assert [v.invariant for v in r.violations] == (["no-lost-write"] if undo else [])
        if not undo:
            assert w.m.cpus[0].regs.component(i) == bytes(len(w.m.cpus[0].regs.component(i)))


def test_a_frame_without_magic1_is_restored_fx_only() -> None:
    """frame_fx_only: the handler zeroes fx_sw_bytes.magic1; check_xstate_in_sigframe() falls
    back to fx_only, so sigreturn FXRSTORs x87/SSE from the frame and puts AVX and PKRU in
    their initial configuration -- the handler's own AVX value (frame_write) included -- and
    the task expects that. Had sigreturn restored the XSAVE area (here: magic1 put back
    behind the world's back), no-lost-write reports it."""
    steps = [A("run", task="p0.t0", cpu=0), A("sigaction", task="p0.t0"),
             A("write", task="p0.t0", component="sse"), A("write", task="p0.t0", component="avx"),
             A("write", task="p0.t0", component="pkru"), A("signal", task="p0.t0"),
             A("frame_write", task="p0.t0", component="avx")]
    for undo in (False, True):
        w = world(ZEN4_ONE, steps=steps)
        t = w.tasks["p0.t0"]
        sse = w.sigstack["p0.t0"][-1][1]
        lo = w.frames["p0.t0"][-1][0]
        fp = int.from_bytes(t.process.mm.read(lo + 232, 8), "little")
        magic1 = t.process.mm.read(fp + 464, 4)
        assert magic1 == (0x46505853).to_bytes(4, "little")
        assert not w.step(A("frame_fx_only", task="p0.t0")).violations
        assert t.process.mm.read(fp + 464, 4) == bytes(4)
        if undo:
            t.process.mm.write(fp + 464, magic1)
            w._hashed = None  # changed behind the world's back: its memoised key is stale
        r = w.step(A("sigreturn", task="p0.t0"))
        assert r.observed["ret"] == 0
        # The XSAVE area's AVX (the handler's) and PKRU (the task's) are not what fx_only gives.
        assert [v.invariant for v in r.violations] == (["no-lost-write"] * 2 if undo else [])
        if not undo:
            regs = w.m.cpus[0].regs
            assert regs.component(AVX) == bytes(256) and regs.component(9) == bytes(8)
            assert regs.component(1) == sse


def test_after_frame_fx_only_a_frame_write_changes_nothing_the_task_gets_back() -> None:
    """fx_only ignores the XSAVE area: a handler's later frame_write of PKRU (its value in the
    frame, its XSTATE_BV bit set) still leaves sigreturn to give PKRU 0, and a task that never
    wrote PKRU (init_pkru_value) gets 0 as well (the explorer found both expectations wrong
    in the action's first version)."""
    w = world(ZEN4_ONE, steps=[A("run", task="p0.t0", cpu=0), A("sigaction", task="p0.t0"),
                               A("signal", task="p0.t0"), A("frame_fx_only", task="p0.t0"),
                               A("frame_write", task="p0.t0", component="pkru")])
    assert w.sigstack["p0.t0"][-1][9] == bytes(8)
    r = w.step(A("sigreturn", task="p0.t0"))
    assert r.observed["ret"] == 0 and not r.violations
    assert w.m.cpus[0].regs.component(9) == bytes(8)


@pytest.mark.parametrize("component", ["x87", "sse"])
def test_a_handlers_legacy_area_edits_on_the_xsave_and_the_fx_only_path(component: str) -> None:
    """frame_write and frame_clear of x87 or SSE in a 64-bit frame: XRSTOR gives the handler's
    value, or with the XSTATE_BV bit clear the initial configuration (x87: FCW 0x37F, the
    rest zero; XMM zero) -- MXCSR is still the frame's (standard-form XRSTOR loads it when
    RFBM[1] is set; the x87 edit leaves bytes 24..31 alone); fx_only's FXRSTOR ignores the
    header and takes both from the legacy area, so a cleared bit no longer counts once
    magic1 is gone, in either order. The frame's bytes zeroed behind the world's back show
    that the fx_only expectation is the frame's."""
    i = component_number(component)
    base = [A("run", task="p0.t0", cpu=0), A("sigaction", task="p0.t0"),
            A("write", task="p0.t0", component=component), A("signal", task="p0.t0")]

    def after(*edits: Action, zero: bool = False) -> tuple[object, list[str]]:
        w = world(ZEN4_ONE, steps=base)
        mxcsr = w.m.cpus[0].regs.mxcsr
        for a in edits:
            assert not w.step(a).violations
        if zero:
            t = w.tasks["p0.t0"]
            lo = w.frames["p0.t0"][-1][0]
            fp = int.from_bytes(t.process.mm.read(lo + 232, 8), "little")
            off = 32 if i == 0 else 160  # x87: the ST registers; SSE: XMM0-15
            t.process.mm.write(fp + off, bytes(128 if i == 0 else 256))
            w._hashed = None  # changed behind the world's back: its memoised key is stale
        r = w.step(A("sigreturn", task="p0.t0"))
        assert r.observed["ret"] == 0 and w.m.cpus[0].regs.mxcsr == mxcsr
        return w, [v.invariant for v in r.violations]

    task_value = world(ZEN4_ONE, steps=base).sigstack["p0.t0"][-1][i]
    init = b"\x7f\x03" + bytes(158) if i == 0 else bytes(256)
    assert task_value != init
    write = A("frame_write", task="p0.t0", component=component)
    clear = A("frame_clear", task="p0.t0", component=component)
    fx_only = A("frame_fx_only", task="p0.t0")
    w, bad = after(write)
    assert not bad and w.m.cpus[0].regs.component(i) not in (task_value, init)
    w, bad = after(clear)
    assert not bad and w.m.cpus[0].regs.component(i) == init
    for edits in ((clear, fx_only), (fx_only, clear)):
        w, bad = after(*edits)
        assert not bad and w.m.cpus[0].regs.component(i) == task_value
        assert after(*edits, zero=True)[1] == ["no-lost-write"]


RESIZE_STEPS = [A("run", task="p0.t0", cpu=0), A("sigaction", task="p0.t0"),
                A("write", task="p0.t0", component="sse"),
                A("write", task="p0.t0", component="avx"),
                A("write", task="p0.t0", component="opmask"),
                A("write", task="p0.t0", component="pkru"), A("signal", task="p0.t0")]


def test_a_frame_rewritten_for_a_smaller_cpu_is_restored_from_its_own_features() -> None:
    """frame_resize (CRIU restoring a frame from an x87/SSE/AVX-only CPU): sw_bytes (MAGIC1,
    extended_size 836, xfeatures FP|SSE|YMM, xstate_size 832), MAGIC2 at 832 and none at the
    old 2,440; sigreturn (6.18's check_xstate_in_sigframe) loads SSE and AVX -- the
    handler's AVX (frame_write) -- from the frame and puts opmask and PKRU in their initial
    configuration. After the resize the handler may edit only x87, SSE and AVX (opmask's
    standard offset on Zen 4 is 832, where MAGIC2 now is)."""
    w = world(ZEN4_ONE, steps=RESIZE_STEPS)
    t = w.tasks["p0.t0"]
    mm = t.process.mm
    lo = w.frames["p0.t0"][-1][0]
    fp = int.from_bytes(mm.read(lo + 232, 8), "little")
    old = int.from_bytes(mm.read(fp + 464 + 16, 4), "little")
    assert old == t.fpu.fpstate.user_size == 2440
    sse = w.sigstack["p0.t0"][-1][1]

    def edits() -> set[str]:
        return {f"{a.name}:{a.get('component')}" for a in w.enabled_actions()
                if a.name.startswith("frame_") and a.task == "p0.t0"}

    assert {"frame_resize:None", "frame_write:opmask"} <= edits()
    assert not w.step(A("frame_resize", task="p0.t0")).violations
    assert mm.read(fp + 464, 20) == b"".join(v.to_bytes(n, "little") for v, n in (
        (0x46505853, 4), (836, 4), (0x7, 8), (832, 4)))
    assert mm.read(fp + 832, 4) == (0x46505845).to_bytes(4, "little")
    assert mm.read(fp + old, 4) == bytes(4)
    assert int.from_bytes(mm.read(fp + 512, 8), "little") == 0x7
    assert edits() == {"frame_write:x87", "frame_clear:x87", "frame_write:sse",
                       "frame_clear:sse", "frame_write:avx", "frame_clear:avx",
                       "frame_fx_only:None", "frame_mxcsr:None"}
    assert not w.step(A("frame_write", task="p0.t0", component="avx")).violations
    avx = w.sigstack["p0.t0"][-1][AVX]
    r = w.step(A("sigreturn", task="p0.t0"))
    assert r.observed["ret"] == 0 and not r.violations
    regs = w.m.cpus[0].regs
    assert regs.component(AVX) == avx and regs.component(1) == sse
    assert regs.component(5) == bytes(64) and regs.component(9) == bytes(8)


def test_v6_15_to_v6_17_lose_a_resized_frames_avx() -> None:
    """The same resized frame under sigframe-magic2-at-user-size (dc8aa31a7ac2): MAGIC2 is
    looked for at the task's user_size, where the frame no longer has it, so sigreturn
    falls back to fx_only and the task's AVX (the handler's value) is lost: the breakage
    44eeff9bc467's revert names for CRIU and gVisor."""
    w = world(ZEN4_ONE, "sigframe-magic2-at-user-size", steps=RESIZE_STEPS)
    w.step(A("frame_resize", task="p0.t0"))
    w.step(A("frame_write", task="p0.t0", component="avx"))
    r = w.step(A("sigreturn", task="p0.t0"))
    assert r.observed["ret"] == 0
    assert [v.invariant for v in r.violations] == ["no-lost-write"]
    assert "avx" in r.violations[0].detail
    assert w.m.cpus[0].regs.component(AVX) == bytes(256)


def test_no_frame_write_on_a_keyed_stack_the_handlers_pkru_closes() -> None:
    """The handler on a keyed sigaltstack starts with init_pkru_value, which closes key 1: its
    store to the frame would fault, so frame_write is not enabled (and refused) until the
    handler opens the keys (pkey_open)."""
    w = _on_altstack(16384)
    w.step(A("pkey_altstack", task="p0.t0"))
    assert w.step(A("signal", task="p0.t0")).observed["delivered"] is True

    def frame_writes() -> set[str]:
        return {str(a.get("component")) for a in w.enabled_actions() if a.name == "frame_write"}

    assert frame_writes() == set()
    with pytest.raises(StepError, match="protection key its PKRU closes"):
        w.step(A("frame_write", task="p0.t0", component="avx"))
    w.step(A("pkey_open", task="p0.t0"))
    assert "avx" in frame_writes()


def test_mxcsr_is_a_value_of_its_own() -> None:
    """LDMXCSR loads a value naming the task (hw.mxcsr_token): another task's value in its
    MXCSR is foreign, 1F80H in its place is a lost write -- whatever the components say."""
    w = world(steps=[A("run", task="p0.t0", cpu=0), A("ldmxcsr", task="p0.t0")])
    mine = w.m.cpus[0].regs.mxcsr
    assert mine == mxcsr_token(w.tasks["p0.t0"].pid, 1) and not broken(w)
    w.m.cpus[0].regs.mxcsr = mxcsr_token(w.tasks["p1.t0"].pid, 2)
    assert broken(w) == {"no-foreign-value"}
    w.m.cpus[0].regs.mxcsr = 0x1F80
    assert broken(w) == {"no-lost-write"}
    # The task's second LDMXCSR loads its other value: its first one is then a lost write.
    w.m.cpus[0].regs.mxcsr = mine
    w.step(A("ldmxcsr", task="p0.t0"))
    assert w.m.cpus[0].regs.mxcsr == mxcsr_token(w.tasks["p0.t0"].pid, 2)
    w.m.cpus[0].regs.mxcsr = mine
    assert broken(w) == {"no-lost-write"}


def test_a_restore_that_keeps_the_cpus_mxcsr_is_found_by_the_explorer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel whose restore_fpregs_from_fpstate() leaves MXCSR as the CPU had it (as if
    its XRSTOR ran with RFBM lacking SSE and YMM) hands a task the MXCSR of whoever ran
    before, or of the kernel that resumed the machine: the registers are then the task's own
    (TIF_NEED_FPU_LOAD clear), so only the comparison of MXCSR with what the task loaded or
    was given sees it. The explorer finds it from the default configuration, with no
    scenario hint."""
    from fpstate.check.explore import Job, default_config, random_slice
    from fpstate.check.world import no_memos

    real = core.restore_fpregs_from_fpstate

    def keeps_mxcsr(c, fps, mask) -> None:
        before = c.regs.mxcsr
        real(c, fps, mask)
        c.regs.mxcsr = before

    monkeypatch.setattr(core, "restore_fpregs_from_fpstate", keeps_mxcsr)
    with no_memos():
        s = random_slice(Job("x86", default_config("x86")), 3, 30.0, 60)
    assert s.found is not None, "not found in 30 s"
    assert s.found.invariant in ("no-lost-write", "no-foreign-value"), s.found
    assert "would see MXCSR" in s.found.detail


@pytest.mark.parametrize(("dropped", "kept"), [(None, True), (0x6, False), (0x4, True),
                                               (0x2, False)])
def test_sigreturn_gives_back_the_frames_mxcsr_when_xrestore_has_sse_or_ymm(
        dropped: int | None, kept: bool) -> None:
    """A 64-bit frame whose fx_sw.xfeatures lost ``dropped`` (of SSE 0x2 and YMM 0x4): XRSTOR
    from the frame with RFBM = fx_sw.xfeatures & user_xfeatures loads MXCSR with SSE or YMM
    in it; then init_fpstate's restore of the rest puts 1F80H if that has SSE (both forms),
    and on Sapphire Rapids (compacted) leaves it if it has YMM only (kernel-findings 4:
    measured on Zen 4). The checker's expectation and the model agree every time (no
    violation; the task never wrote XMM or YMM)."""
    w = world(steps=[A("run", task="p0.t0", cpu=0), A("ldmxcsr", task="p0.t0"),
                     A("sigaction", task="p0.t0"), A("signal", task="p0.t0")])
    t = w.tasks["p0.t0"]
    mine = mxcsr_token(t.pid, 1)
    if dropped is not None:
        from fpstate.check.actions_x86 import FRAME_X64, _frame_xsave

        fp = _frame_xsave(t.process.mm, w.frames["p0.t0"][-1][0], FRAME_X64)
        xfeatures = t.fpu.fpstate.user_xfeatures & ~dropped
        t.process.mm.write(fp + SW_BYTES_OFFSET + 8, xfeatures.to_bytes(8, "little"))
    r = w.step(A("sigreturn", task="p0.t0"))
    assert r.observed["ret"] == 0 and not r.violations, r.violations
    assert w.do_observe("p0.t0")["mxcsr"] == (mine if kept else 0x1F80)


def test_a_handlers_mxcsr_in_its_frame_is_what_sigreturn_gives_back() -> None:
    """frame_mxcsr: the handler stores the task's other MXCSR value in its frame (a SIGFPE
    handler's edit of uc_mcontext); rt_sigreturn loads it. A kernel whose sigreturn left the
    handler's MXCSR (1F80H) in place would lose it: no-lost-write."""
    w = world(steps=[A("run", task="p0.t0", cpu=0), A("ldmxcsr", task="p0.t0"),
                     A("sigaction", task="p0.t0"), A("signal", task="p0.t0")])
    pid = w.tasks["p0.t0"].pid
    r = w.step(A("frame_mxcsr", task="p0.t0"))
    assert r.observed["mxcsr"] == mxcsr_token(pid, 2) and not r.violations
    assert w.do_observe("p0.t0")["mxcsr"] == 0x1F80  # the handler's own
    r = w.step(A("sigreturn", task="p0.t0"))
    assert not r.violations and w.do_observe("p0.t0")["mxcsr"] == mxcsr_token(pid, 2)
    w = world(steps=[A("run", task="p0.t0", cpu=0), A("sigaction", task="p0.t0"),
                     A("signal", task="p0.t0"), A("frame_mxcsr", task="p0.t0"),
                     A("sigreturn", task="p0.t0")])
    w.m.cpus[0].regs.mxcsr = 0x1F80
    assert broken(w) == {"no-lost-write"}


def test_the_explorer_edits_mxcsr_in_frames() -> None:
    from fpstate.check.explore import Job, default_config, random_slice

    s = random_slice(Job("x86", default_config("x86")), 4, 4.0, 60)
    assert s.found is None and s.per_action["frame_mxcsr"] > 0


STALE = [A("run", task="p0.t0", cpu=0), A("ldmxcsr", task="p0.t0"),
         A("run", task="p0.t1", cpu=0), A("run", task="p0.t0", cpu=0),
         A("release", task="p0.t0", components="sse"), A("write", task="p0.t0", component="avx"),
         A("ptrace_stop", task="p0.t0"), A("run", task="p0.t1", cpu=0)]
TRACED = {"cpu": "sapphire-rapids", "cpus": 1, "processes": {"p0": 2}, "vms": {}}


@pytest.mark.parametrize("cpu", ["sapphire-rapids", "haswell"])
def test_ptrace_set_writes_x87_and_sse(cpu: str) -> None:
    """A tracer's PTRACE_SETREGSET of x87 (without MXCSR) and of SSE reaches the stopped
    task, on a compacted (XSAVES) and a standard-format kernel; the task keeps the MXCSR it
    loaded, which the buffer carried (its header had SSE)."""
    w = world({**TRACED, "cpu": cpu},
              steps=[A("run", task="p0.t0", cpu=0), A("ldmxcsr", task="p0.t0"),
                     A("ptrace_stop", task="p0.t0"), A("run", task="p0.t1", cpu=0),
                     A("ptrace_set", tracer="p0.t1", task="p0.t0", component="x87"),
                     A("ptrace_set", tracer="p0.t1", task="p0.t0", component="sse")])
    seen = w.step(A("observe", task="p0.t0")).observed
    t = w.tasks["p0.t0"]
    assert seen["x87"] == "p0.t1#1" and seen["sse"] == "p0.t1#2"
    assert seen["mxcsr"] == mxcsr_token(t.pid, 1)


def test_ptrace_set_expects_the_kernels_stale_mxcsr(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a compacted kernel, PTRACE_GETREGSET of a task whose SSE is initial and AVX in use
    shows the MXCSR its fpstate kept from SSE's last save, and a write of SSE hands that MXCSR
    back to the task (kernel-findings 6, measured on Linux 6.18). The view is flagged
    (regset-view-shows-the-task); the write follows the kernel's rule, which the explorer's
    expectation states -- the naive one, the task keeps its own 1F80H, breaks no-lost-write."""
    from fpstate.check.actions_x86 import X86World
    from fpstate.check.world import no_memos

    w = world(TRACED, steps=STALE)
    t = w.tasks["p0.t0"]
    r = w.step(A("ptrace_get", tracer="p0.t1", task="p0.t0"))
    assert r.observed["mxcsr"] == mxcsr_token(t.pid, 1) and r.observed["xstate_bv"] & 0x6 == 0x4
    assert [v.invariant for v in r.violations] == ["regset-view-shows-the-task"]
    assert w.step(A("observe", task="p0.t0")).observed["mxcsr"] == 0x1F80
    r = w.clone().step(A("ptrace_set", tracer="p0.t1", task="p0.t0", component="sse"))
    assert not r.violations
    monkeypatch.setattr(X86World, "_mxcsr_after_uabi_set", lambda self, name, mxcsr, bv: None)
    with no_memos():
        r = w.step(A("ptrace_set", tracer="p0.t1", task="p0.t0", component="sse"))
    assert {v.invariant for v in r.violations} == {"no-lost-write"}, r.violations


@pytest.mark.parametrize("cpu", ["sapphire-rapids", "haswell"])
def test_with_the_mxcsr_fix_the_view_and_the_write_back_keep_1f80(cpu: str) -> None:
    """With the proposed fix mxcsr_by_format (Chang S. Bae's v3) the same sequence shows the
    task's own 1F80H -- compacted, by the SSE bit; standard, the image's MXCSR -- and a write
    of SSE leaves it 1F80H: nothing is flagged."""
    w = world({**TRACED, "cpu": cpu, "fixes": ["mxcsr_by_format", "mxcsr_flip_inits_xmm"]},
              steps=STALE)
    r = w.step(A("ptrace_get", tracer="p0.t1", task="p0.t0"))
    assert r.observed["mxcsr"] == 0x1F80 and not r.violations
    assert not w.step(A("ptrace_set", tracer="p0.t1", task="p0.t0", component="sse")).violations
    assert w.step(A("observe", task="p0.t0")).observed["mxcsr"] == 0x1F80


# -- regset-view-shows-the-task ------------------------------------------------------------------

CRASH = {"cpu": "sapphire-rapids", "cpus": 1, "processes": {"p0": 1, "p1": 1}, "vms": {}}


def test_regset_view_flags_a_view_the_task_does_not_hold() -> None:
    """A debugger's NT_X86_XSTATE must show what the stopped task holds: with the task's
    expected AVX value changed behind the model's back, the next PTRACE_GETREGSET is a
    violation naming both values."""
    w = world(TRACED, steps=[A("run", task="p0.t0", cpu=0),
                             A("write", task="p0.t0", component="avx"),
                             A("ptrace_stop", task="p0.t0"), A("run", task="p0.t1", cpu=0)])
    assert not w.clone().step(A("ptrace_get", tracer="p0.t1", task="p0.t0")).violations
    t = w.tasks["p0.t0"]
    w.expected["p0.t0"][component_number("avx")] = token(t.pid, 9, 2, 256)
    r = w.step(A("ptrace_get", tracer="p0.t1", task="p0.t0"))
    assert [v.invariant for v in r.violations if v.invariant == "regset-view-shows-the-task"]
    assert ("PTRACE_GETREGSET NT_X86_XSTATE of p0.t0 shows avx = p0.t0#1 where the task "
            "holds p0.t0#9") in str(r.violations)


def test_regset_view_of_the_stale_mxcsr_is_flagged_with_both_values() -> None:
    """kernel-findings 6: the view's MXCSR is the fpstate's stale bytes when the header has
    YMM without SSE on a compacted kernel, which every release does (variant
    uabi-mxcsr-by-ymm): the violation names the stale value and the task's 1F80H."""
    w = world(TRACED, steps=STALE)
    t = w.tasks["p0.t0"]
    r = w.step(A("ptrace_get", tracer="p0.t1", task="p0.t0"))
    assert r.observed["mxcsr"] == mxcsr_token(t.pid, 1)
    assert w._held(t)[-1] == (0x1F80).to_bytes(4, "little")
    assert [str(v) for v in r.violations] == [
        "regset-view-shows-the-task: PTRACE_GETREGSET NT_X86_XSTATE of p0.t0 shows MXCSR = "
        f"MXCSR {mxcsr_token(t.pid, 1):#x} (p0.t0's value 1) where the task holds MXCSR 0x1f80 "
        "(init)"]


def test_core_dump_shows_the_pkru_of_the_last_switch() -> None:
    """kernel-findings 9i (scenarios/core-dump-stale-pkru.yaml): the core of a single-threaded
    task that wrote PKRU since its last context switch shows thread.pkru, not the PKRU it
    held; the other components are its own. After a switch out the core shows its PKRU."""
    from fpstate.check.invariants_x86 import uabi_view
    from fpstate.kernel.x86.hw import PKRU, pkru_bytes

    w = world(CRASH, steps=[A("run", task="p0.t0", cpu=0),
                            A("write", task="p0.t0", component="pkru"),
                            A("write", task="p0.t0", component="avx")])
    observed = w._apply(A("core_dump", task="p0.t0"))  # the step, keeping its events
    assert observed["pkru"] == "0x55555554" and not invariants.check(w)
    ((_t, buf, held, stale),) = [p for k, p in w.emitted if k == "core"]
    assert stale == "pkru"
    view = uabi_view(w, buf)
    assert view[PKRU] == pkru_bytes(core.INIT_PKRU_VALUE) != held[PKRU]
    assert view[component_number("avx")] == held[component_number("avx")]
    assert w.tasks["p0.t0"].state.value == "dead"
    w.discard_events()
    w.step(A("run", task="p1.t0", cpu=0))
    w.step(A("write", task="p1.t0", component="pkru"))
    w.step(A("idle", cpu=0))
    w.step(A("run", task="p1.t0", cpu=0))
    assert w.step(A("core_dump", task="p1.t0")).observed["pkru"] == "p1.t0#1"


#: (With the proposed MXCSR fixes: an AMX thread's reallocated fpstate otherwise shows MXCSR 0
#: in its note, scenarios/core-dump-mxcsr-after-realloc.yaml.)
THREADED = {"cpu": "sapphire-rapids", "cpus": 2, "processes": {"p0": 2, "p1": 1}, "vms": {},
            "fixes": ["mxcsr_by_format", "mxcsr_flip_inits_xmm"]}
#: Both threads of p0 write PKRU and AVX, p0.t0 on CPU 0, p0.t1 on CPU 1 (both in user mode).
BOTH_WROTE = [A("run", task="p0.t0", cpu=0), A("write", task="p0.t0", component="pkru"),
              A("write", task="p0.t0", component="avx"), A("run", task="p0.t1", cpu=1),
              A("write", task="p0.t1", component="pkru"),
              A("write", task="p0.t1", component="avx")]


def _core_notes(w, action):
    """The step's observations and its notes as (comm, view, what may be stale: "", "pkru" or
    "regs") triples, in file order."""
    from fpstate.check.invariants_x86 import uabi_view

    observed = w._apply(action)
    assert not invariants.check(w)
    return observed, [(t.comm, uabi_view(w, buf), stale)
                      for k, (t, buf, _held, stale) in w.emitted if k == "core"]


def test_core_dump_of_a_threaded_process_shows_each_thread() -> None:
    """fs/coredump.c: the other thread is zapped (switched out on its CPU in
    coredump_task_exit) and the dumper sleeps in coredump_wait(), so its own context switch
    stashes the PKRU it crashed with: both notes -- the dumper's first -- show what their
    thread held, PKRU included, and every thread is dead."""
    from fpstate.kernel.x86.hw import PKRU

    w = world(THREADED, steps=BOTH_WROTE)
    held = {c: w._held(w.tasks[c]) for c in ("p0.t0", "p0.t1")}
    observed, notes = _core_notes(w, A("core_dump", task="p0.t0"))
    assert observed["threads"] == 2 and observed["slept"] and observed["pkru"] == "p0.t0#1"
    assert [c for c, _v, _s in notes] == ["p0.t0", "p0.t1"]
    assert not any(stale for _c, _v, stale in notes)
    avx = component_number("avx")
    for comm, view, _stale in notes:
        assert view[PKRU] == held[comm][PKRU] and view[avx] == held[comm][avx]
    assert held["p0.t0"][avx] != held["p0.t1"][avx]
    assert {w.tasks[c].state.value for c in ("p0.t0", "p0.t1")} == {"dead"}
    assert [c.current is c.idle for c in w.m.cpus] == [True, True]


def test_core_dump_raced_shows_the_dumpers_stale_pkru_only() -> None:
    """When every thread reached coredump_task_exit() before the dumper waited, nothing
    switches the dumper out: its note shows the thread.pkru of its last switch
    (kernel-findings 9i), the other thread's the PKRU it held. The invariant allows the stale
    PKRU for that note only."""
    from fpstate.kernel.x86.hw import PKRU, pkru_bytes

    w = world(THREADED, steps=BOTH_WROTE)
    held = {c: w._held(w.tasks[c]) for c in ("p0.t0", "p0.t1")}
    observed, notes = _core_notes(w, A("core_dump", task="p0.t0", raced=True))
    assert not observed["slept"] and observed["pkru"] == "0x55555554"
    (_c0, v0, stale0), (_c1, v1, stale1) = notes
    assert stale0 == "pkru" and stale1 == ""
    assert v0[PKRU] == pkru_bytes(core.INIT_PKRU_VALUE) != held["p0.t0"][PKRU]
    assert v1[PKRU] == held["p0.t1"][PKRU]


def test_core_dump_late_shows_the_last_threads_fpstate() -> None:
    """kernel-findings 9j: the last thread to arrive, still running in TASK_RUNNING when the
    dumper's wait_task_inactive(TASK_ANY) looked, is not waited for: its note is its fpstate
    as its last switch left it -- here the initial state, not the AVX it wrote on CPU 1 --
    and the invariant allows it for that note alone; the dumper's note stays checked."""
    from fpstate.kernel.x86.hw import PKRU

    w = world(THREADED, steps=BOTH_WROTE)
    assert A("core_dump", task="p0.t0", late=True) in w.enabled()
    held = {c: w._held(w.tasks[c]) for c in ("p0.t0", "p0.t1")}
    observed, notes = _core_notes(w, A("core_dump", task="p0.t0", late=True))
    assert observed["slept"] and observed["pkru"] == "p0.t0#1"
    (c0, v0, stale0), (c1, v1, stale1) = notes
    assert (c0, stale0, c1, stale1) == ("p0.t0", "", "p0.t1", "regs")
    avx = component_number("avx")
    assert v0[avx] == held["p0.t0"][avx] and v0[PKRU] == held["p0.t0"][PKRU]
    assert v1[avx] == w.fresh_values[avx] != held["p0.t1"][avx]
    assert all(w.tasks[c].state.value == "dead" for c in ("p0.t0", "p0.t1"))


def test_core_dump_late_is_refused_where_nothing_runs_late() -> None:
    """Only a last thread running on another CPU with its registers live can be missed: a
    switched-out sibling's fpstate is current, so late is not offered and is a StepError."""
    w = world(THREADED, steps=[A("run", task="p0.t0", cpu=0)])
    assert A("core_dump", task="p0.t0", late=True) not in w.enabled()
    with pytest.raises(StepError, match="not running on another CPU"):
        w.step(A("core_dump", task="p0.t0", late=True))


#: Three threads of p0: p0.t0 on CPU 0 and p0.t1 on CPU 1 wrote AVX; p0.t2 never ran.
THREE = {"cpu": "sapphire-rapids", "cpus": 2, "processes": {"p0": 3, "p1": 1}, "vms": {}}
TWO_OF_THREE_WROTE = [A("run", task="p0.t0", cpu=0), A("write", task="p0.t0", component="avx"),
                      A("run", task="p0.t1", cpu=1), A("write", task="p0.t1", component="avx")]


def test_core_dump_late_thread_names_an_earlier_arrival() -> None:
    """kernel-findings 9j for a thread that is not the last to arrive: p0.t1, held on CPU 1
    between its atomic_dec_and_test() and set_current_state() while p0.t2 arrives, is not
    waited for -- the explorer offers it, its note is its fpstate (the initial AVX), and the
    invariant allows that note alone; late (the last arrival, p0.t2) is not offered since
    p0.t2 is switched out."""
    w = world(THREE, steps=TWO_OF_THREE_WROTE)
    enabled = w.enabled()
    assert A("core_dump", task="p0.t0", late_thread="p0.t1") in enabled
    assert A("core_dump", task="p0.t0", late=True) not in enabled
    held = w._held(w.tasks["p0.t1"])
    observed, notes = _core_notes(w, A("core_dump", task="p0.t0", late_thread="p0.t1"))
    assert observed["threads"] == 3 and observed["slept"]
    assert [(c, stale) for c, _v, stale in notes] == [("p0.t0", ""), ("p0.t2", ""),
                                                      ("p0.t1", "regs")]
    avx = component_number("avx")
    assert notes[2][1][avx] == w.fresh_values[avx] != held[avx]
    assert observed["late_xstate_bv"] & (1 << avx) == 0


def test_core_dump_late_and_late_thread_must_agree() -> None:
    w = world(THREE, steps=TWO_OF_THREE_WROTE)
    with pytest.raises(StepError, match=r"late names the last thread to arrive, not p0\.t1"):
        w.step(A("core_dump", task="p0.t0", late=True, late_thread="p0.t1"))
    with pytest.raises(StepError, match=r"p0\.t2.* is not running on another CPU"):
        w.step(A("core_dump", task="p0.t0", late_thread="p0.t2"))


def test_regset_view_flags_a_threads_pkru_the_kernel_must_show() -> None:
    """The stale-PKRU allowance is the dumper's alone: with the other thread's expected PKRU
    changed behind the model's back, its note is a violation naming it."""
    from fpstate.kernel.x86.hw import PKRU

    w = world(THREADED, steps=BOTH_WROTE)
    w.expected["p0.t1"][PKRU] = w.expected["p0.t0"][PKRU]
    r = w.step(A("core_dump", task="p0.t0"))
    assert [(v.invariant, v.detail) for v in r.violations] == [(
        "regset-view-shows-the-task",
        "the core of p0.t1 shows pkru = p0.t1#1 where the task holds p0.t0#1")]


def test_core_dump_through_a_pipe_shows_the_live_pkru() -> None:
    """A core_pattern piping to a helper: coredump_pipe() waits for the helper's exec before
    the notes, so even a single-threaded dumper was switched out and its core shows the PKRU
    it crashed with, and the invariant gives it no allowance."""
    w = world(CRASH, steps=[A("run", task="p0.t0", cpu=0),
                            A("write", task="p0.t0", component="pkru")])
    observed, notes = _core_notes(w, A("core_dump", task="p0.t0", pattern="pipe"))
    assert observed["slept"] and observed["pkru"] == "p0.t0#1"
    assert [stale for _c, _v, stale in notes] == [""]
    w.discard_events()
    w.step(A("run", task="p1.t0", cpu=0))
    got = w.enabled()
    assert A("write", task="p1.t0", component="avx") in got
    assert A("core_dump", task="p1.t0", pattern="pipe") not in got  # the last process


def test_core_dump_offers_and_refuses() -> None:
    """A dump is offered while another process lives; the raced form only with another live
    thread, a second CPU and no thread inside a kernel path; raced for a lone thread is a
    StepError."""
    w = world({**CRASH, "processes": {"p0": 2, "p1": 1}},
              steps=[A("run", task="p0.t0", cpu=0)])
    got = w.enabled()
    assert A("core_dump", task="p0.t0") in got and A("core_dump", task="p0.t0",
                                                     pattern="pipe") in got
    assert A("core_dump", task="p0.t0", raced=True) not in got  # one CPU
    with pytest.raises(StepError, match="one CPU"):
        w.step(A("core_dump", task="p0.t0", raced=True))
    w = world(THREADED, steps=[A("run", task="p1.t0", cpu=0)])
    assert A("core_dump", task="p1.t0", raced=True) not in w.enabled()
    with pytest.raises(StepError, match="nothing to race with"):
        w.step(A("core_dump", task="p1.t0", raced=True))


def test_core_dump_runs_a_thread_out_of_its_kernel_path() -> None:
    """A thread asleep in its #NM handler's allocation (switched out inside the path) is run
    out of it on the dumper's CPU while the dumper sleeps; its note shows the state it held
    (the AVX value written before), and every thread is dead."""
    w = world({**THREADED, "cpus": 1},
              steps=[A("run", task="p0.t0", cpu=0), A("write", task="p0.t0", component="avx"),
                     A("arch_prctl", task="p0.t0", option="req_perm", feature=18),
                     A("write_nm", task="p0.t0", component="xtiledata"),
                     A("run", task="p0.t1", cpu=0)])
    assert A("core_dump", task="p0.t1") in w.enabled()
    held = w._held(w.tasks["p0.t0"])
    observed, notes = _core_notes(w, A("core_dump", task="p0.t1"))
    assert observed["threads"] == 2 and observed["slept"]
    (_c, v1, _s), = [n for n in notes if n[0] == "p0.t0"]
    avx = component_number("avx")
    assert v1[avx] == held[avx] and read_token(held[avx])[0] == w.tasks["p0.t0"].pid
    assert {w.tasks[c].state.value for c in ("p0.t0", "p0.t1")} == {"dead"}


def test_core_dump_of_a_vmm_shows_the_vcpu_threads_own_state() -> None:
    """scenarios/kvm-core-dump-during-run.yaml: the vCPU thread, inside KVM_RUN with the
    guest FPU loaded, is run out of it (-EINTR, guest FPU put back); its note shows its own
    user AVX value, not the guest's, which stays in the guest fpstate."""
    from pathlib import Path

    from fpstate.check.scenario import load

    sc = load(Path(__file__).parents[2] / "scenarios" / "kvm-core-dump-during-run.yaml")
    w = make_world(sc.model, sc.config, None)
    steps = list(sc.steps)
    for st in steps[:5]:
        assert not w.step(st.action).violations
    held = w._held(w.tasks["p1.t0"])
    observed, notes = _core_notes(w, steps[5].action)
    assert observed["threads"] == 2 and observed["slept"]
    avx = component_number("avx")
    (view,) = [v for c, v, _s in notes if c == "p1.t0"]
    assert view[avx] == held[avx] and read_token(view[avx])[0] == w.tasks["p1.t0"].pid



def test_core_dump_ack_without_kernel_leaves_no_notes() -> None:
    """A socket-request server's COREDUMP_REJECT or _USERSPACE: no notes (nothing for the
    invariants to check), the process dead all the same; the parent sees WCOREDUMP only for
    userspace. An ack through any other pattern is refused before anything changes."""
    for ack, flagged in (("reject", False), ("userspace", True)):
        w = world(THREADED, steps=BOTH_WROTE)
        observed, notes = _core_notes(w, A("core_dump", task="p0.t0", pattern="socket-request",
                                           ack=ack))
        assert notes == [] and observed == {"ret": 0, "threads": 0, "slept": True,
                                            "core_dumped": flagged}
        assert all(w.tasks[c].state.value == "dead" for c in ("p0.t0", "p0.t1"))
    w = world(THREADED, steps=BOTH_WROTE)
    with pytest.raises(StepError, match="an ack of reject comes only from a socket-request"):
        w.step(A("core_dump", task="p0.t0", pattern="file", ack="reject"))
    assert w.tasks["p0.t0"].state.value == "running in user mode"


def test_suspend_names_a_pkru_value_its_task_wrote_as_observe_does() -> None:
    """A hibernation rolled back leaves the writer's PKRU in the register: the action's output
    names it as ``observe`` does (writer and generation, which the key soundness check
    canonicalises: two histories of equal keys may number the same value differently), not by
    its raw token bits. Found by bisimulate: a VMM's KVM_SET_FPU between two equal keys moved
    the generation counter, and the raw hex differed."""
    w = world({**CRASH, "fixes": ["resume_pkru", "resume_xfd_set_state"]},
              steps=[A("run", task="p0.t0", cpu=0),
                     A("write", task="p0.t0", component="pkru")])
    observed = w._apply(A("suspend", task="p0.t0", state="disk", ending="rollback"))
    assert observed["pkru"] == "p0.t0#1"
    observed = w._apply(A("observe", task="p0.t0"))
    assert observed["pkru"] == "p0.t0#1"
