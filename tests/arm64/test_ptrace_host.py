"""The host model's ptrace (fpstate.kernel.arm64.ptrace: ptrace_getregset/ptrace_setregset on
a Host's tokens) held to the byte-level regset functions of the same file, which the tools use
(record, translate, validate): two implementations of ptrace.c, one on values the checker can
rank, one byte for byte; each state the explorer's walks reach is converted from tokens to
bytes (each token a distinct byte, filling every register it names), and GETREGSET and
SETREGSET must agree on every register, the format, SVCR.SM/ZA and the vector lengths.
Then the rules the checker relies on: every setter but tls_set() invalidates the tracee's CPU
copy, and the two rejected designs."""

from __future__ import annotations

import random
import struct
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fpstate.arm64.regs import (
    FPMR,
    FPSR,
    SVCR_SM,
    SVCR_ZA,
    TPIDR2,
    ZA,
    ZERO,
    ZHI,
    ZT0,
    P,
    Tok,
    V,
    sve_regs_size,
    sve_vq_from_vl,
    za_regs_size,
)
from fpstate.check.explore import Job
from fpstate.check.world import Action, StepError
from fpstate.kernel.arm64 import fpsimd
from fpstate.kernel.arm64 import ptrace as pt
from fpstate.kernel.arm64.state import FP_STATE_SVE, NR_CPUS, TASK_USER, Host

PROFILES = ("fvp-aem-fpmr", "neoverse-v1", "apple-m4", "neoverse-n1")


class Codec:
    """Tokens <-> bytes for one comparison: each token a byte value of its own (ZERO is 0)."""

    def __init__(self) -> None:
        self.ids: dict[Tok, int] = {ZERO: 0}

    def byte(self, tok: Tok) -> int:
        k = self.ids.setdefault(tok, len(self.ids))
        assert k < 256
        return k

    def fill(self, tok: Tok, n: int) -> bytes:
        return bytes([self.byte(tok)]) * n

    def tok(self, data: bytes, what: str) -> Tok:
        assert data and data == data[:1] * len(data), f"{what}: not one value: {data[:40]!r}"
        by_id = {k: t for t, k in self.ids.items()}
        return by_id[data[0]]

    def target(self, host: Host, name: str) -> pt.RegsetTarget:
        """The stopped task ``name`` of the host model as the byte-level functions see it."""
        t = host.task(name)
        s = host.store(t.store)
        sm, za_on = bool(s.svcr & SVCR_SM), bool(s.svcr & SVCR_ZA)
        live = t.sme_vl if sm else t.sve_vl
        sve = b""
        if s.fp_type == FP_STATE_SVE:
            assert s.sve_vl == live, "sve_state laid out for another VL"
            z = (self.fill(s.sve_v, 16) + self.fill(s.sve_zhi, live - 16)) * 32
            sve = z + self.fill(s.sve_p, sve_regs_size(sve_vq_from_vl(live)) - 32 * live)
        k = self.word(s.fpsr, 4)
        return pt.RegsetTarget(
            sve_vl=t.sve_vl, sme_vl=t.sme_vl, fp_type=s.fp_type, sm=sm, za_on=za_on,
            sve_vl_onexec=t.sve_vl_onexec, sme_vl_onexec=t.sme_vl_onexec,
            sve_inherit=t.tif_sve_vl_inherit, sme_inherit=t.tif_sme_vl_inherit,
            vregs=self.fill(s.vregs, 512), fpsr=k, fpcr=k, sve=sve,
            za=self.fill(s.za, za_regs_size(sve_vq_from_vl(t.sme_vl))) if za_on else b"",
            zt0=self.fill(s.zt0, 64), fpmr=self.word(s.fpmr, 8), tpidr2=self.word(s.tpidr2, 8))

    def word(self, tok: Tok, n: int) -> int:
        """A register held as an n-byte integer (FPSR and FPCR, FPMR, TPIDR2_EL0)."""
        return int.from_bytes(self.fill(tok, n), "little")

    def values(self, t: pt.RegsetTarget) -> dict[str, Any]:
        """Everything a thread's regsets show, as tokens and flags."""
        out: dict[str, Any] = {
            V: self.tok(pt.effective_vregs(t), "V"),
            FPSR: self.tok(struct.pack("<II", t.fpsr, t.fpcr), "FPSR/FPCR"),
            FPMR: self.tok(struct.pack("<Q", t.fpmr), "FPMR"),
            TPIDR2: self.tok(struct.pack("<Q", t.tpidr2), "TPIDR2"),
            "fp_type": t.fp_type, "sm": t.sm,
            "za_on": t.za_on, "vls": (t.sve_vl, t.sme_vl, t.sve_vl_onexec, t.sme_vl_onexec,
                                      t.sve_inherit, t.sme_inherit)}
        if t.fp_type == FP_STATE_SVE:
            vl = t.live_vl
            if vl > 16:  # at 128 bits Z is V: the model's ZHI names no bits
                out[ZHI] = self.tok(b"".join(t.sve[n * vl + 16:(n + 1) * vl]
                                             for n in range(32)), "ZHI")
            out[P] = self.tok(t.sve[32 * vl:], "P")
        if t.za_on:
            out[ZA], out[ZT0] = self.tok(t.za, "ZA"), self.tok(t.zt0, "ZT0")
        return out

    def data(self, caps: Any, t: pt.RegsetTarget, note: int, tok: Tok) -> bytes:
        """What a debugger writes: the regset as read, every register in it ``tok``, and
        NT_ARM_(S)SVE in SVE format at the current VL."""
        k = self.byte(tok)
        if note == pt.NT_PRFPREG:
            w = self.word(tok, 4)
            return pt.user_fpsimd_state(replace(t, vregs=bytes([k]) * 512, fpsr=w, fpcr=w,
                                                fp_type="FP_STATE_FPSIMD"))
        if note in (pt.NT_ARM_SVE, pt.NT_ARM_SSVE):
            sm = note == pt.NT_ARM_SSVE
            vl = t.sme_vl if sm else t.sve_vl
            block = bytes([k]) * sve_regs_size(sve_vq_from_vl(vl))
            w = self.word(tok, 4)
            return pt.regset_get(caps, replace(t, sm=sm, fp_type=FP_STATE_SVE, sve=block,
                                               fpsr=w, fpcr=w), note)
        if note == pt.NT_ARM_ZA:
            return pt.regset_get(caps, replace(
                t, za_on=True, za=bytes([k]) * za_regs_size(sve_vq_from_vl(t.sme_vl))), note)
        if note == pt.NT_ARM_ZT:
            return bytes([k]) * 64
        if note == pt.NT_ARM_TLS:
            return struct.pack("<Q", t.tpidr) + bytes([k]) * 8
        return bytes([k]) * 8


def _states(cpu: str, seed: int, steps: int) -> list[tuple[Host, int, str]]:
    """(host, tracer's CPU, stopped tracee) along a random walk of the checker's actions."""
    w = Job("arm64", {"cpu": cpu, "cpus": 2, "tasks": ["a", "b"], "vms": {}}).world()
    rng = random.Random(seed)
    out = []
    for _ in range(steps):
        acts = [a for a in w.enabled_actions() if not a.name.startswith("ptrace")]
        if not acts:
            break
        try:
            w.step(rng.choice(acts), check=False)
        except StepError:
            continue
        host = w.kw.host
        for c in host.cpus:
            cur = host.current(c.idx)
            if cur is None or cur.mode != TASK_USER:
                continue
            out += [(host, c.idx, n) for n, t in host.tasks.items()
                    if t.mode in pt.TRACEE_MODES and not t.killed]
    return out


@pytest.mark.parametrize("cpu", PROFILES)
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**9), steps=st.integers(1, 30))
def test_the_host_model_s_regsets_are_the_byte_level_regsets(cpu: str, seed: int,
                                                             steps: int) -> None:
    for host, tracer, name in _states(cpu, seed, steps)[-4:]:
        caps = host.caps
        for note in pt.host_regsets(caps):
            codec = Codec()
            before = codec.target(host, name)
            # GETREGSET: the registers the regset carries, as the bytes hold them
            got = pt.regset_values(host, name, note)
            whole = codec.values(before)
            assert all(whole[c] == tok for c, tok in got.items() if c in whole), \
                (pt.NOTE_NAMES[note], got)
            blob = pt.regset_get(caps, before, note)
            if note in (pt.NT_ARM_SVE, pt.NT_ARM_SSVE, pt.NT_ARM_ZA):
                assert (len(blob) > pt.USER_SVE_HEADER_SIZE) == bool(got), pt.NOTE_NAMES[note]
            # SETREGSET: the same write on both
            after = pt.ptrace_setregset(host, tracer, name, note)
            tok = Tok(name, after.gen)
            r = pt.regset_set(caps, before, note, codec.data(caps, before, note, tok))
            assert r.ret == 0, r.reason
            want = codec.values(r.target)
            have = codec.values(codec.target(after, name))
            assert have == want, pt.NOTE_NAMES[note]
            # ... and what the tracee is expected to read back is what the write left
            comps = [c for c in pt.REGSET_COMPONENTS[note] if c in have]
            assert {c: after.expected(name, c) for c in comps} == {c: have[c] for c in comps}


def _stopped_with_live_copy() -> tuple[Host, int]:
    """Task a ran on CPU 0 (SVE format, ZA on) and was scheduled out: CPU 0 still holds its
    registers, bound to it; task b runs on CPU 1 in user mode (the tracer)."""
    w = Job("arm64", {"cpu": "fvp-aem-fpmr", "tasks": ["a", "b"], "vms": {}}).world()
    for a in (("run", {"task": "a", "cpu": 0}), ("user_op", {"task": "a", "op": "sve_write"}),
              ("user_op", {"task": "a", "op": "smstart_za"}), ("idle", {"cpu": 0}),
              ("run", {"task": "b", "cpu": 1})):
        w.step(Action.of(a[0], **a[1]))
    host = w.kw.host
    assert host.task("a").fpsimd_cpu == 0 and host.cpus[0].last.st == "thread:a"
    return host, 1


@pytest.mark.parametrize("note", sorted(pt.REGSET_COMPONENTS))
def test_every_setter_but_tls_set_invalidates_the_tracee_s_cpu_copy(note: int) -> None:
    host, tracer = _stopped_with_live_copy()
    after = pt.ptrace_setregset(host, tracer, "a", note)
    a = after.task("a")
    if note == pt.NT_ARM_TLS:  # TPIDR2_EL0 is written to the register at every switch
        assert a.fpsimd_cpu == 0
    else:
        assert a.fpsimd_cpu == NR_CPUS and a.tif_foreign_fpstate
    # the rejected design keeps the stale copy valid
    assert pt.ptrace_setregset(host, tracer, "a", note, flush=False).task("a").fpsimd_cpu == 0


def test_nt_arm_sve_zeroes_the_tracee_s_fpsimd_state_and_the_old_design_the_tracer_s() -> None:
    host, tracer = _stopped_with_live_copy()
    host = host.with_store("thread:a", replace(host.store("thread:a"), vregs=Tok("a", 99)))
    host = host.with_store("thread:b", replace(host.store("thread:b"), vregs=Tok("b", 98),
                                               fpsr=Tok("b", 98)))
    fixed = pt.ptrace_setregset(host, tracer, "a", pt.NT_ARM_SVE)
    assert fixed.store("thread:a").vregs == ZERO
    assert (fixed.store("thread:b").vregs, fixed.store("thread:b").fpsr) == (Tok("b", 98),) * 2
    old = pt.ptrace_setregset(host, tracer, "a", pt.NT_ARM_SVE, zero_tracer=True)
    assert old.store("thread:a").vregs == Tok("a", 99)
    assert (old.store("thread:b").vregs, old.store("thread:b").fpsr) == (ZERO, ZERO)


def test_a_tracer_that_sleeps_in_the_call_returns_with_its_state_reloaded() -> None:
    host, tracer = _stopped_with_live_copy()
    out = pt.ptrace_syscall(host, tracer, lambda h: h, sleeps=True)
    b = out.task("b")
    assert b.mode == TASK_USER and not b.tif_foreign_fpstate and b.fpsimd_cpu == tracer
    # the CPU's copy was lost in the sleep: the registers were loaded from thread_struct
    assert out.cpus[tracer].regs.v == out.store("thread:b").vregs


def test_only_a_stopped_task_is_a_tracee() -> None:
    host, tracer = _stopped_with_live_copy()
    with pytest.raises(pt.IllegalEvent, match="not a stopped tracee"):
        pt.ptrace_getregset(host, tracer, "b", pt.NT_PRFPREG)  # itself, running
    n1 = fpsimd.spawn(fpsimd.boot(__import__("fpstate.arm64.cpu", fromlist=["x"]).load_profile(
        "neoverse-n1")), "x")
    assert pt.host_regsets(n1.caps) == (pt.NT_PRFPREG,)


def _traced(cpu: str = "fvp-aem-fpmr") -> Any:
    """A checker world: task a used SVE, wrote ZA and entered streaming mode, and was
    scheduled out; b, its debugger, runs on CPU 1."""
    w = Job("arm64", {"cpu": cpu, "tasks": ["a", "b"], "vms": {}}).world()
    for name, args in (("run", {"task": "a", "cpu": 0}),
                       ("user_op", {"task": "a", "op": "sve_write"}),
                       ("user_op", {"task": "a", "op": "smstart_za"}),
                       ("user_op", {"task": "a", "op": "za_write"}),
                       ("user_op", {"task": "a", "op": "smstart_sm"}),
                       ("user_op", {"task": "a", "op": "sve_write"}),
                       ("idle", {"cpu": 0}), ("run", {"task": "b", "cpu": 1})):
        assert w.step(Action.of(name, **args)).violations == ()
    return w


def _back_and_read(w: Any, *ops: str) -> dict[str, Any]:
    """a runs again on CPU 0 and executes ``ops``; what it read (checked by the invariants)."""
    assert w.step(Action.of("run", task="a", cpu=0)).violations == ()
    seen: dict[str, Any] = {}
    for op in ops:
        r = w.step(Action.of("user_op", task="a", op=op))
        assert r.violations == (), r.violations
        seen.update(r.observed)
    return seen


def test_an_fpsimd_format_nt_arm_sve_write_leaves_streaming_mode_and_keeps_za() -> None:
    w = _traced()
    r = w.step(Action.of("ptrace_set", task="b", tracee="a", regset="NT_ARM_SVE", fpsimd=True))
    assert r.violations == ()
    a, st = w.kw.host.task("a"), w.kw.host.store("thread:a")
    assert not st.svcr & 1 and st.svcr & 2 and not a.tif_sve  # SM off, ZA on
    assert st.vregs.writer == "a" and st.fp_type == "FP_STATE_FPSIMD"
    seen = _back_and_read(w, "fpsimd_read", "sve_read", "za_read")
    assert seen["V"] == f"a#{st.vregs.gen}" and seen["ZHI"] == "arch#0x0"
    assert seen["ZA"].startswith("a#")


@pytest.mark.parametrize(("regset", "other"), [("NT_ARM_SVE", 0), ("NT_ARM_SVE", 1),
                                               ("NT_ARM_SSVE", 0), ("NT_ARM_SSVE", 1)])
def test_a_debugger_s_write_at_another_vl_changes_it_then_writes_the_data(regset: str,
                                                                          other: int) -> None:
    w = _traced()
    before = w.kw.host.task("a")
    cur = before.sve_vl if regset == "NT_ARM_SVE" else before.sme_vl
    vl = sorted({16, 32, 64} - {cur})[other]  # the FVP's VLs other than the task's
    r = w.step(Action.of("ptrace_set", task="b", tracee="a", regset=regset, vl=vl))
    assert r.violations == ()
    a, st = w.kw.host.task("a"), w.kw.host.store("thread:a")
    if regset == "NT_ARM_SVE":
        assert (a.sve_vl, a.sme_vl) == (vl, before.sme_vl) and not st.svcr & 1
        assert st.svcr & 2  # an SVE VL change keeps ZA
    else:
        assert (a.sve_vl, a.sme_vl) == (before.sve_vl, vl) and st.svcr & 1
        assert not st.svcr & 2 and st.za == Tok("", 0)  # an SME VL change turns ZA off
    assert st.sve_vl == vl and st.fp_type == FP_STATE_SVE and st.sve_v.writer == "a"
    seen = _back_and_read(w, "sve_read")
    assert seen["V"] == seen["ZHI"] == seen["P"] == f"a#{st.sve_v.gen}"


def test_the_new_writes_are_in_the_walks_and_checked_fields() -> None:
    w = _traced()
    names = {(a.get("regset"), a.get("vl"), a.get("fpsimd")) for a in w.enabled()
             if a.name == "ptrace_set" and a.get("tracee") == "a"}
    t = w.kw.host.task("a")
    assert ("NT_ARM_SVE", None, True) in names and ("NT_ARM_SSVE", None, True) not in names
    assert {vl for rs, vl, _ in names if rs == "NT_ARM_SVE" and vl} == {16, 32, 64} - {t.sve_vl}
    with pytest.raises(StepError, match="not a vector length"):
        w.step(Action.of("ptrace_set", task="b", tracee="a", regset="NT_ARM_SVE", vl=48))
    with pytest.raises(StepError, match="fields of NT_ARM_SVE"):
        w.step(Action.of("ptrace_set", task="b", tracee="a", regset="NT_ARM_ZA", vl=16))
    with pytest.raises(StepError, match="-EINVAL"):
        w.step(Action.of("ptrace_set", task="b", tracee="a", regset="NT_ARM_SSVE", fpsimd=True))
