"""Signal frames with AMX state in the checker's x86 world: a handler may edit tile data in its
frame only where the task's fpstate has room for it."""

from __future__ import annotations

from fpstate.check.scenario import make_world
from fpstate.check.world import Action

A = Action.of
CONFIG = {"cpu": "sapphire-rapids", "cpus": 1, "processes": {"p0": 1}, "vms": {}}


def _frame_components(w) -> set[str]:
    return {a.get("component") for a in w.enabled_actions()
            if a.name == "frame_write" and a.task == "p0.t0"}


def test_tile_data_is_editable_in_a_frame_once_the_tiles_are_allocated() -> None:
    """Before the first use the fpstate has no room for TILEDATA (XFD armed): a frame edit of
    it would end in #NM and SIGSEGV, so it is not offered (TILECFG, a default feature, is).
    After the first use's reallocation the frame holds 8 KiB of tile data; the handler's
    edit is what the task sees after sigreturn."""
    w = make_world("x86", CONFIG, None)
    for a in (A("run", cpu=0, task="p0.t0"),
              A("arch_prctl", feature=18, option="req_perm", task="p0.t0"),
              A("sigaction", task="p0.t0"), A("signal", task="p0.t0")):
        assert not w.step(a).violations
    before = _frame_components(w)
    assert "xtilecfg" in before and "xtiledata" not in before
    assert not w.step(A("sigreturn", task="p0.t0")).violations
    for a in (A("write_nm", component="xtiledata", task="p0.t0"), A("nm_return", task="p0.t0"),
              A("signal", task="p0.t0")):
        assert not w.step(a).violations
    assert "xtiledata" in _frame_components(w)
    assert not w.step(A("frame_write", component="xtiledata", task="p0.t0")).violations
    assert not w.step(A("sigreturn", task="p0.t0")).violations
    assert w.step(A("observe", task="p0.t0")).observed["xtiledata"] == "p0.t0#2"


def test_a_lost_tile_data_edit_is_caught() -> None:
    """A frame whose XSTATE_BV[18] was cleared behind the world's back after the handler's
    edit (as a sigreturn that dropped it would) gives the task initial tiles instead of the
    handler's: no-lost-write names TILEDATA."""
    w = make_world("x86", CONFIG, None)
    for a in (A("run", cpu=0, task="p0.t0"),
              A("arch_prctl", feature=18, option="req_perm", task="p0.t0"),
              A("write_nm", component="xtiledata", task="p0.t0"), A("nm_return", task="p0.t0"),
              A("sigaction", task="p0.t0"), A("signal", task="p0.t0"),
              A("frame_write", component="xtiledata", task="p0.t0")):
        assert not w.step(a).violations
    mm = w.task("p0.t0").process.mm
    fp = w._handler_frame("p0.t0", None)[2]
    bv = int.from_bytes(mm.read(fp + 512, 8), "little")
    assert bv >> 18 & 1
    mm.write(fp + 512, (bv & ~(1 << 18)).to_bytes(8, "little"))
    w._hashed = None  # changed behind the world's back: its memoised key is stale
    r = w.step(A("sigreturn", task="p0.t0"))
    assert {v.invariant for v in r.violations} == {"no-lost-write"}
    assert "xtiledata" in str(r.violations[0]).lower()


def test_tile_data_grown_after_delivery_is_not_in_the_frame() -> None:
    """The frame was delivered before the first tile use, which the handler then makes (the
    fpstate grows past the frame). Once the handler also breaks fx_sw_bytes (frame_fx_only),
    nothing in the frame names its size, but the frame the kernel wrote still ends before
    TILEDATA's offset: the edit is not offered, and refused by name (writing it would run
    past the frame -- here past the top of the stack, a #PF in the explorer's worker before
    this rule)."""
    import pytest

    from fpstate.check.world import StepError

    w = make_world("x86", CONFIG, None)
    for a in (A("run", cpu=0, task="p0.t0"),
              A("arch_prctl", feature=18, option="req_perm", task="p0.t0"),
              A("sigaction", task="p0.t0"), A("signal", task="p0.t0"),
              A("write_nm", component="xtiledata", task="p0.t0"), A("nm_return", task="p0.t0"),
              A("frame_fx_only", task="p0.t0")):
        assert not w.step(a).violations
    assert "xtiledata" not in _frame_components(w) and "avx" in _frame_components(w)
    with pytest.raises(StepError, match="xtiledata is not a component"):
        w.step(A("frame_write", component="xtiledata", task="p0.t0"))


def test_model_exceptions_survive_a_trip_between_processes() -> None:
    """The model's exceptions that take fields pickle by them: an explorer worker's exception
    reaches the parent as itself (PageFault used to fail to unpickle and break the whole
    process pool)."""
    import pickle

    from fpstate.arm64.statemachine import IllegalEvent
    from fpstate.kernel.x86.mm import PageFault
    from fpstate.kernel.x86.types import KernelBug

    e = pickle.loads(pickle.dumps(PageFault(0x7FFF_F000, 3)))
    assert (e.addr, e.pkey, str(e)) == (0x7FFF_F000, 3, "#PF at 0x7ffff000 (PK, key 3)")
    b = pickle.loads(pickle.dumps(KernelBug("xsave-out-of-bounds", "8 KiB past the end")))
    assert (b.name, b.detail, str(b)) == ("xsave-out-of-bounds", "8 KiB past the end",
                                          "xsave-out-of-bounds: 8 KiB past the end")
    i = pickle.loads(pickle.dumps(IllegalEvent("task", "RUNNING", "trap", "no SVE")))
    assert (i.lifecycle, i.state, i.event, i.why) == ("task", "RUNNING", "trap", "no SVE")
    assert str(i) == "task: event 'trap' is illegal in state 'RUNNING': no SVE"
