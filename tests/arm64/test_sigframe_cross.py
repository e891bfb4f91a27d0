"""The two arm64 signal-frame models held to each other: the byte-level one the tools use
(setup_sigframe_layout(), encode_sigframe(), restore_sigframe_fp(): records, headers and
restore_sigframe()'s rules, fpstate.kernel.arm64.signal) and the host model's, on tokens
(deliver_signal() keeping the frame's FP records as a SigFrameFp, sys_rt_sigreturn()). Along
random walks of the checker's actions with signals, vector-length changes in handlers,
fork and sigreturn, every frame a signal leaves must be the frame the byte-level layout
describes, and every sigreturn must be refused (SIGSEGV) by both or restore the same format,
streaming mode and ZA."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fpstate.arm64.regs import SVCR_SM, SVCR_ZA
from fpstate.check.explore import Job
from fpstate.check.world import StepError
from fpstate.kernel.arm64 import fpsimd
from fpstate.kernel.arm64 import signal as sig
from fpstate.kernel.arm64.state import Host, SigFrameFp

PROFILES = ("fvp-aem-fpmr", "neoverse-v1", "apple-m4", "neoverse-n1")
_ACTIONS = ("run", "idle", "user_op", "signal", "sigreturn", "set_vl", "syscall", "clone",
            "kernel_neon")


def _frame_of(host: Host, cpu: int) -> tuple[bytes, sig.SigframeLayout]:
    """The byte-level frame setup_rt_frame() writes for current on ``cpu`` (the host before
    the signal)."""
    saved = fpsimd.fpsimd_save_and_flush_current_state(host, cpu)
    name = fpsimd.current_task(saved, cpu).name
    task = sig.sig_task(saved, name)
    layout = sig.setup_sigframe_layout(host.caps, task)
    return sig.encode_sigframe(layout, task), layout


def _matches(layout: sig.SigframeLayout, frame: bytes, fp: SigFrameFp, host: Host) -> None:
    """The records of the byte-level frame are those the SigFrameFp says were written."""
    caps = host.caps
    recs = {r.name: r for r in layout.records}
    if caps.sve or caps.sme:
        sve = recs["sve"]
        assert (sve.size > sig.SVE_CONTEXT_SIZE) == fp.sve
        vl, flags = int.from_bytes(frame[sve.offset + 8:sve.offset + 10], "little"), \
            int.from_bytes(frame[sve.offset + 10:sve.offset + 12], "little")
        assert (vl, bool(flags & sig.SVE_SIG_FLAG_SM)) == (fp.sve_vl, fp.sm)
    assert ("tpidr2" in recs) == caps.sme and ("fpmr" in recs) == caps.fpmr
    if caps.sme:
        assert (recs["za"].size > sig.ZA_CONTEXT_SIZE) == fp.za_on
        assert int.from_bytes(frame[recs["za"].offset + 8:recs["za"].offset + 10],
                              "little") == fp.sme_vl
    assert ("zt" in recs) == (caps.sme2 and fp.za_on)


@pytest.mark.parametrize("cpu", PROFILES)
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**9), steps=st.integers(5, 60))
def test_frames_and_sigreturns_agree_byte_for_byte_and_on_tokens(cpu: str, seed: int,
                                                                  steps: int) -> None:
    w = Job("arm64", {"cpu": cpu, "cpus": 2, "tasks": ["a"], "vms": {}}).world()
    rng = random.Random(seed)
    frames: dict[str, list[bytes]] = {}
    for _ in range(steps):
        acts = [a for a in w.enabled_actions() if a.name in _ACTIONS]
        if not acts:
            break
        a = rng.choice(acts)
        host = w.kw.host
        name = a.get("task")
        cpu_nr = next((c.idx for c in host.cpus if c.current == name), None)
        before = frames.get(name, [])
        try:
            w.step(a, check=False)
        except StepError:
            continue
        after = w.kw.host
        if a.name == "signal":
            frame, layout = _frame_of(host, cpu_nr)
            _matches(layout, frame, after.task(name).sigframes[-1], after)
            frames[name] = [*before, frame]
        elif a.name == "clone":  # a fork copies the stack, a thread starts with none
            frames[f"{name}.c"] = [] if a.get("vm") else list(before)
        elif a.name == "sigreturn":
            t = host.task(name)
            # restore_sigframe_fp() reads current's VLs; ZA as sigreturn's syscall entry
            # leaves it (fpsimd_syscall_enter() keeps PSTATE.ZA)
            task = sig.SigTask(sve_vl=t.sve_vl, sme_vl=t.sme_vl)
            r = sig.restore_sigframe_fp(before[-1], host.caps, task)
            frames[name] = before[:-1]
            done = after.task(name)
            assert (done.killed == "SIGSEGV") == (r.ret != 0), r.reason
            if r.ret == 0:
                st_ = after.store(done.store)
                assert st_.fp_type == r.task.fp_type
                assert bool(st_.svcr & SVCR_SM) == r.task.sm
                assert bool(st_.svcr & SVCR_ZA) == r.task.za
