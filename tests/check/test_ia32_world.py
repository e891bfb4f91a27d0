"""The checker's world with a 32-bit (compat) process: ia32 signal frames, the x87 values its
sigreturn folds, how the state key holds them, and the rejected design the checker catches."""

from __future__ import annotations

import pytest

from fpstate.check import statekey
from fpstate.check.actions_x86 import fold_x87
from fpstate.check.executor import SerialExecutor
from fpstate.check.explore import Job, default_config, explore
from fpstate.check.scenario import make_world
from fpstate.check.world import Action, ScenarioError
from fpstate.kernel.x86.core import KERNEL_OWNER
from fpstate.kernel.x86.hw import read_token, token
from fpstate.kernel.x86.sched import SA_IA32_ABI, SIGUSR1

COMPAT = {"cpu": "sapphire-rapids", "cpus": 1, "processes": {"p0": 1, "p1": 1},
          "compat": ["p0"], "vms": {}}
AVX = 2


def test_fold_x87_keeps_the_registers_and_drops_fop_and_the_upper_pointers() -> None:
    v = token(3, 0x0102_0304, 0, 160)
    f = fold_x87(v)
    assert f[0:5] == v[0:5] and f[5:8] == bytes(3)  # FCW, FSW, abridged FTW; FTW high, FOP
    assert f[8:12] == v[8:12] and f[12:16] == bytes(4)  # FIP cut to 32 bits
    assert f[16:20] == v[16:20] and f[20:24] == bytes(4)  # FDP
    assert f[24:32] == bytes(8) and f[32:] == v[32:]  # MXCSR apart; registers unchanged
    assert read_token(f) == (3, 0x04)  # what remains of the generation in the first unit
    assert fold_x87(f) == f


def test_a_folded_value_is_keyed_by_its_content() -> None:
    """Two folds whose first units agree (generations 0x101 and 0x201) differ further on: a
    token key would merge them, so a value that is not a whole token is keyed by content."""
    a, b = fold_x87(token(3, 0x101, 0, 160)), fold_x87(token(3, 0x201, 0, 160))
    assert read_token(a) == read_token(b) and a != b
    ca, cb = statekey.Canon(), statekey.Canon()
    assert ca.value(a, 0) != cb.value(b, 0) and not ca.toks and not cb.toks
    whole = statekey.Canon()
    assert whole.value(token(3, 0x101, 0, 160), 0) == (statekey.TOKEN, 3, 0) and whole.toks


def test_a_compat_process_gets_ia32_frames_below_4_gib() -> None:
    w = make_world("x86", COMPAT, None)
    w.step(Action.of("run", task="p0.t0", cpu=0))
    w.step(Action.of("write", task="p0.t0", component="x87"))
    w.step(Action.of("sigaction", task="p0.t0"))
    t = w.tasks["p0.t0"]
    assert t.process.compat and t.handlers[SIGUSR1].flags & SA_IA32_ABI
    r = w.step(Action.of("signal", task="p0.t0"))
    assert not r.violations and r.observed["delivered"]
    frame = r.observed["frame"]
    lo, hi, _ = w.frames["p0.t0"][0]
    assert lo == frame < hi < 1 << 32 and (frame + 4) % 16 == 0
    assert (hi - 4 - t.fpu.fpstate.user_size) % 64 == 0  # the XSAVE area behind the header
    saved = w.sigstack["p0.t0"][0][0]
    r = w.step(Action.of("sigreturn", task="p0.t0"))
    assert not r.violations and r.observed["ret"] == 0
    assert w.expected["p0.t0"][0] == fold_x87(saved) != saved
    assert w.m.cpus[0].regs.component(0) == fold_x87(saved)


def test_compat_names_processes_of_the_configuration() -> None:
    with pytest.raises(ScenarioError, match=r"config\.compat: 'p9' is not a process"):
        make_world("x86", {**COMPAT, "compat": ["p9"]}, None)
    with pytest.raises(ScenarioError, match=r"config\.compat: must be a list"):
        make_world("x86", {**COMPAT, "compat": "p0"}, None)


def test_the_kernels_design_holds_with_a_compat_process() -> None:
    cfg = {**default_config("x86"), "compat": ["p0"]}
    res = explore(Job("x86", cfg), SerialExecutor(), seconds=8.0, seed=5)
    assert res.found is None, res.found
    assert res.per_action["sigreturn"] > 50 and res.per_action["pasid_write"] > 50


def test_an_ia32_frame_must_count_its_fsave_header() -> None:
    """sigframe-fits-and-describes on an ia32 frame: extended_size = xstate_size + 4 + 112;
    the 64-bit rule (without the header) is a violation there."""
    from fpstate.check.invariants import check

    w = make_world("x86", COMPAT, None)
    for a in (Action.of("run", task="p0.t0", cpu=0), Action.of("sigaction", task="p0.t0")):
        w.step(a)
    r = w.step(Action.of("signal", task="p0.t0"))
    assert not r.violations
    t = w.tasks["p0.t0"]
    lo, hi, _ = w.frames["p0.t0"][0]
    buf_fx = hi - 4 - t.fpu.fpstate.user_size
    w.emitted = [("sigframe", (t, lo, buf_fx, (0, 0, t.handlers[SIGUSR1])))]
    assert check(w) == []
    ext = t.fpu.fpstate.user_size + 4
    t.process.mm.write(buf_fx + 464 + 4, ext.to_bytes(4, "little"))
    w.emitted = [("sigframe", (t, lo, buf_fx, (0, 0, t.handlers[SIGUSR1])))]
    assert [v.invariant for v in check(w)] == ["sigframe-fits-and-describes"]


def test_a_handler_without_siginfo_gets_the_non_rt_ia32_frame() -> None:
    """A 32-bit program's handler without SA_SIGINFO (glibc's signal()): struct sigframe_ia32,
    its sigcontext_32 at frame + 8; the restorer pops the signal number before sigreturn
    (sys32_sigreturn finds the frame at sp - 8), and the x87 state comes back folded."""
    w = make_world("x86", COMPAT, None)
    for a in (Action.of("run", task="p0.t0", cpu=0),
              Action.of("write", task="p0.t0", component="x87"),
              Action.of("sigaction", task="p0.t0", siginfo=False)):
        w.step(a)
    assert Action.of("sigaction", task="p0.t0", onstack=True,
                     siginfo=False) not in w.enabled_actions()  # a handler is installed
    r = w.step(Action.of("signal", task="p0.t0"))
    assert not r.violations
    frame, end, kind = w.frames["p0.t0"][0]
    t = w.tasks["p0.t0"]
    assert kind == "ia32" and (frame + 4) % 16 == 0
    fp = int.from_bytes(t.process.mm.read(frame + 8 + 76, 4), "little")
    assert end == fp + 112 + t.fpu.fpstate.user_size + 4
    saved = w.sigstack["p0.t0"][0][0]
    r = w.step(Action.of("sigreturn", task="p0.t0"))
    assert not r.violations and r.observed["ret"] == 0
    assert w.m.cpus[0].regs.component(0) == fold_x87(saved) and t.user_sp < 1 << 32


def test_both_ia32_handler_kinds_are_offered_to_a_compat_task() -> None:
    w = make_world("x86", COMPAT, None)
    w.step(Action.of("run", task="p0.t0", cpu=0))
    names = {(a.name, a.get("siginfo")) for a in w.enabled_actions() if a.task == "p0.t0"}
    assert ("sigaction", False) in names and ("sigaction", None) in names
    w2 = make_world("x86", {**COMPAT, "compat": []}, None)
    w2.step(Action.of("run", task="p0.t0", cpu=0))
    assert ("sigaction", False) not in {(a.name, a.get("siginfo"))
                                        for a in w2.enabled_actions() if a.task == "p0.t0"}


@pytest.mark.parametrize("siginfo", [True, False], ids=["rt_sigframe_ia32", "sigframe_ia32"])
def test_a_handlers_edit_of_an_ia32_frame_is_what_sigreturn_must_restore(siginfo: bool) -> None:
    """frame_write, frame_fx_only and frame_resize on an ia32 frame: the XSAVE area lies
    behind the fsave header (sigcontext_32.fpstate + 112); sigreturn's ia32_fxstate path
    copies it into the kernel's buffer and restores from there, giving the handler's AVX
    value, or after frame_fx_only AVX and PKRU in their initial configuration. Had the
    restore ignored the edit (here: the frame's AVX bytes put back behind the world's back),
    no-lost-write says."""
    def setup() -> tuple[object, int]:
        w = make_world("x86", COMPAT, None)
        for a in (Action.of("run", task="p0.t0", cpu=0),
                  Action.of("write", task="p0.t0", component="avx"),
                  Action.of("write", task="p0.t0", component="pkru"),
                  Action.of("sigaction", task="p0.t0", siginfo=siginfo),
                  Action.of("signal", task="p0.t0")):
            assert not w.step(a).violations
        lo, _, kind = w.frames["p0.t0"][-1]
        assert kind == ("ia32-rt" if siginfo else "ia32")
        mm = w.tasks["p0.t0"].process.mm
        sc = statekey.FRAME_SC[kind]
        fp = int.from_bytes(mm.read(lo + sc + 76, 4), "little") + 112  # sigcontext_32.fpstate
        assert mm.read(fp + 464, 4) == (0x46505853).to_bytes(4, "little")  # magic1
        # x87 is offered too: edited in the fsave header (test_an_x87_edit_of_an_ia32_frame...)
        edits = {a.get("component") for a in w.enabled_actions()
                 if a.name == "frame_write" and a.task == "p0.t0"}
        assert {"sse", "x87"} <= edits
        return w, fp

    for undo in (False, True):
        w, fp = setup()
        mm = w.tasks["p0.t0"].process.mm
        off = fp + w.m.system.profile.component(AVX).offset
        before = mm.read(off, 256)
        assert not w.step(Action.of("frame_write", task="p0.t0", component="avx")).violations
        value = w.sigstack["p0.t0"][-1][AVX]
        assert mm.read(off, 256) == value != before
        if undo:
            mm.write(off, before)
            w._hashed = None  # changed behind the world's back: its memoised key is stale
        r = w.step(Action.of("sigreturn", task="p0.t0"))
        assert r.observed["ret"] == 0
        assert [v.invariant for v in r.violations] == (["no-lost-write"] if undo else [])
        if not undo:
            assert w.m.cpus[0].regs.component(AVX) == value
    w, fp = setup()
    assert not w.step(Action.of("frame_fx_only", task="p0.t0")).violations
    r = w.step(Action.of("sigreturn", task="p0.t0"))
    assert r.observed["ret"] == 0 and not r.violations
    regs = w.m.cpus[0].regs
    assert regs.component(AVX) == bytes(256) and regs.component(9) == bytes(8)
    # frame_resize: the ia32 frame's extended_size counts the fsave header as well
    # (save_sw_bytes: 832 + 4 + 112); AVX comes back from the frame, PKRU is initial.
    w, fp = setup()
    mm = w.tasks["p0.t0"].process.mm
    avx = w.sigstack["p0.t0"][-1][AVX]
    assert not w.step(Action.of("frame_resize", task="p0.t0")).violations
    assert mm.read(fp + 468, 4) == (948).to_bytes(4, "little")
    r = w.step(Action.of("sigreturn", task="p0.t0"))
    assert r.observed["ret"] == 0 and not r.violations
    regs = w.m.cpus[0].regs
    assert regs.component(AVX) == avx and regs.component(9) == bytes(8)


def test_an_ia32_frames_fsave_header_is_keyed_through_its_x87_value() -> None:
    """The fsave header of an ia32 frame is derived from the x87 value (convert_from_fxsr):
    two states that differ only in the x87 generation -- one write or two, the same
    state to the key -- give frames whose headers differ in those bytes, and must still give
    equal keys (keysound found the header keyed by content)."""
    keys = []
    for writes in (1, 2):
        w = make_world("x86", COMPAT, None)
        w.step(Action.of("run", task="p0.t0", cpu=0))
        for _ in range(writes):
            w.step(Action.of("write", task="p0.t0", component="x87"))
        w.step(Action.of("sigaction", task="p0.t0", siginfo=False))
        before = w.key()
        assert w.step(Action.of("signal", task="p0.t0")).observed["delivered"]
        lo, hi, _ = w.frames["p0.t0"][-1]
        keys.append((before, w.key(), w.tasks["p0.t0"].process.mm.peek(lo, hi - lo)))
    (b1, k1, f1), (b2, k2, f2) = keys
    assert b1 == b2 and f1 != f2
    assert k1 == k2


@pytest.mark.parametrize("cleared", [False, True], ids=["xstate_bv-x87", "xstate_bv-no-x87"])
def test_an_x87_edit_of_an_ia32_frame_goes_to_the_fsave_header(cleared: bool) -> None:
    """frame_write of x87 on an ia32 frame writes the fsave header (what a 32-bit handler
    edits) and leaves the FXSAVE part: sigreturn folds the header in -- but where the frame's
    XSTATE_BV lacks x87 (here cleared by the handler first: frame_clear), the XRSTOR after
    the fold puts x87 in its initial configuration (real kernel: conform
    sigreturn/ia32-header-edit-xstate-bv-without-x87). A header put back behind the world's
    back is a lost write."""
    def setup() -> tuple[object, int]:
        w = make_world("x86", COMPAT, None)
        steps = [Action.of("run", task="p0.t0", cpu=0),
                 Action.of("write", task="p0.t0", component="x87"),
                 Action.of("sigaction", task="p0.t0", siginfo=True),
                 Action.of("signal", task="p0.t0")]
        if cleared:
            steps.append(Action.of("frame_clear", task="p0.t0", component="x87"))
        for a in steps:
            assert not w.step(a).violations
        lo, _, kind = w.frames["p0.t0"][-1]
        mm = w.tasks["p0.t0"].process.mm
        fp = int.from_bytes(mm.read(lo + statekey.FRAME_SC[kind] + 76, 4), "little") + 112
        return w, fp

    for undo in (False, True):
        w, fp = setup()
        mm = w.tasks["p0.t0"].process.mm
        header, legacy = mm.read(fp - 112, 108), mm.read(fp, 160)
        assert not w.step(Action.of("frame_write", task="p0.t0", component="x87")).violations
        assert mm.read(fp, 160) == legacy and mm.read(fp - 112, 108) != header
        t = w.tasks["p0.t0"]
        cw = int.from_bytes(mm.read(fp - 112, 2), "little")
        assert cw == int.from_bytes(token(t.pid, t.generation, 0, 160)[0:2], "little")
        expected = w.sigstack["p0.t0"][-1][0]
        if undo:
            mm.write(fp - 112, header)
            w._hashed = None
        r = w.step(Action.of("sigreturn", task="p0.t0"))
        assert r.observed["ret"] == 0
        x87 = w.m.cpus[0].regs.component(0)
        if cleared:  # the edit is lost either way: x87 comes back initial
            assert not r.violations and x87[0:2] == b"\x7f\x03" and not any(x87[2:])
            continue
        assert [v.invariant for v in r.violations] == (["no-lost-write"] if undo else [])
        if not undo:
            assert x87 == expected and x87[0:2] == cw.to_bytes(2, "little")


@pytest.mark.parametrize("variant", [None, "hardirq-fpu-in-fpregs-lock"])
def test_an_interrupt_in_the_fsave_header_save_leaves_the_delivery_intact(
        variant: str | None) -> None:
    """save_fsave_header() tests TIF_NEED_FPU_LOAD and FXSAVEs the live registers into the
    fpstate under fpregs_lock(). An interrupt between the two that takes the FPU (the old
    irq_fpu_usable()) leaves the kernel's XMM and MXCSR in the fpstate's legacy area, but
    nothing reads them: the frame's XSAVE area was written before, the fsave header holds
    only x87 (which the clobber leaves alone), and fpu__clear_user_states() makes the
    registers the truth for the handler. The ia32 task gets its own values back."""
    w = make_world("x86", COMPAT, variant)
    w.step(Action.of("run", task="p0.t0", cpu=0))
    w.step(Action.of("write", task="p0.t0", component="x87"))
    w.step(Action.of("write", task="p0.t0", component="sse"))
    w.step(Action.of("sigaction", task="p0.t0"))
    offered = {(a.name, a.get("irq_at")) for a in w.enabled_actions() if a.task == "p0.t0"}
    assert ("signal", "fsave") in offered
    r = w.step(Action.of("signal", task="p0.t0", irq=True, irq_at="fsave"))
    assert not r.violations and r.observed["irq"] == ("fpu" if variant else "scalar")
    fps = w.tasks["p0.t0"].fpu.fpstate
    xmm0 = bytes(fps.regs[160:176])
    assert (read_token(xmm0)[0] == KERNEL_OWNER) is bool(variant)
    r = w.step(Action.of("sigreturn", task="p0.t0"))
    assert not r.violations
    r = w.step(Action.of("observe", task="p0.t0"))
    assert r.observed["sse"].startswith("p0.t0#") and r.observed["x87"].startswith("p0.t0#")
