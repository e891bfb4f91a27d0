"""Canonical state keys of x86 worlds for the explorer's state hashing (arm64: statekey_arm64).

Two states get the same key when they behave alike: the same tasks in the same scheduler and
lazy-restore states, the same fpstate shapes, the same per-CPU ownership, and the same *pattern*
of register values. Values are tokens naming their writer and a generation
(fpstate.kernel.x86.hw.token); generations only matter through equality, so the key replaces
each generation by its rank among the generations of the same writer and component found in
the state (the checker's expected values included). A kernel path in flight is keyed by its
function and the task; the user memory a task can read back (its signal frames) by content.

Keys are nested tuples of ints, strings and `Tok` placeholders (hashable and picklable), so the
executor can return them from worker processes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable
from typing import Any

from fpstate.kernel.x86.hw import init_value, read_token
from fpstate.x86.layout import compacted_offset
from fpstate.x86.xfeatures import XCOMP_BV_COMPACTED_FORMAT, bits


class Tok:
    """A token in a key: (writer, component, rank of its generation)."""

    __slots__ = ("comp", "gen", "owner", "rank")

    def __init__(self, owner: Any, comp: Any, gen: int) -> None:
        self.owner, self.comp, self.gen, self.rank = owner, comp, gen, -1

    def _k(self) -> tuple[Any, Any, int]:
        return (self.owner, self.comp, self.rank)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tok) and self._k() == other._k()

    def __hash__(self) -> int:
        return hash(self._k())

    def __repr__(self) -> str:
        return f"Tok({self.owner}, {self.comp}, {self.rank})"

    def __reduce__(self) -> Any:
        return (_tok, (self.owner, self.comp, self.rank))


def _tok(owner: Any, comp: Any, rank: int) -> Tok:
    t = Tok(owner, comp, -1)
    t.rank = rank
    return t


class Canon:
    """Collects the tokens of one key, then ranks their generations."""

    def __init__(self) -> None:
        self.toks: list[Tok] = []
        self._init: dict[tuple[int, int], bytes] = {}

    def tok(self, owner: Any, comp: Any, gen: int) -> Tok:
        t = Tok(owner, comp, gen)
        self.toks.append(t)
        return t

    def value(self, v: bytes | None, i: int) -> Any:
        """An x86 component value: None, 0 (initial), a Tok, or the raw bytes."""
        if v is None:
            return None
        n = len(v)
        init = self._init.get((i, n))
        if init is None:
            init = self._init[(i, n)] = init_value(i, n)
        if v == init:
            return 0
        tok = read_token(v)
        if tok is not None:
            return self.tok(tok[0], i, tok[1])
        return v

    def finish(self, key: Any) -> Any:
        gens: dict[tuple[Any, Any], set[int]] = {}
        for t in self.toks:
            gens.setdefault((t.owner, t.comp), set()).add(t.gen)
        ranks = {k: {g: n for n, g in enumerate(sorted(v))} for k, v in gens.items()}
        for t in self.toks:
            t.rank = ranks[(t.owner, t.comp)][t.gen]
        return key


_OFFSETS: dict[tuple[int, int, int], int] = {}


def _offset(profile: Any, xcomp_bv: int, i: int) -> int:
    k = (id(profile), xcomp_bv, i)
    off = _OFFSETS.get(k)
    if off is None:
        off = _OFFSETS[k] = (compacted_offset(profile, xcomp_bv, i)
                             if xcomp_bv & XCOMP_BV_COMPACTED_FORMAT
                             else profile.component(i).offset)
    return off


_DECODED: dict[tuple[Any, ...], tuple[Any, ...]] = {}


def _decode(system: Any, fps: Any) -> tuple[Any, ...]:
    """The stored components of an image as (i, raw value) with tokens as (owner, gen),
    memoised by content (most images do not change from one step to the next)."""
    regs = fps.regs
    k = (id(system), fps.xstate_bv, fps.xcomp_bv, bytes(regs))
    got = _DECODED.get(k)
    if got is not None:
        return got
    xcomp_bv = fps.xcomp_bv if system.xcompacted else 0
    out: list[Any] = []
    for i in bits(fps.xstate_bv & ~XCOMP_BV_COMPACTED_FORMAT):
        if i == 0:
            v = bytes(regs[0:24]) + bytes(8) + bytes(regs[32:160])
        else:
            if system.xcompacted and not (xcomp_bv >> i) & 1:
                out = [(-1, bytes(regs))]
                break
            off = _offset(system.profile, xcomp_bv, i)
            v = bytes(regs[off:off + system.profile.component(i).size])
        tok = read_token(v)
        if v == init_value(i, len(v)):
            out.append((i, 0))
        elif tok is not None:
            out.append((i, ("T", tok[0], tok[1])))
        else:
            out.append((i, v))
    got = (tuple(out), bytes(regs[24:28]))
    if len(_DECODED) > 4096:
        _DECODED.clear()
    _DECODED[k] = got
    return got


def fps_values(cn: Canon, system: Any, fps: Any) -> tuple[Any, ...]:
    """The components an fpstate image stores (XSTATE_BV), as key values, and its MXCSR."""
    comps, mxcsr = _decode(system, fps)
    out = tuple((i, cn.tok(v[1], i, v[2]) if isinstance(v, tuple) else v) for i, v in comps)
    return (out, mxcsr)


def x86_key(w: Any) -> Hashable:
    """The canonical key of an `X86World` (its KVM extension adds ``w.extra_key(cn)``)."""
    m = w.m
    s = m.system
    cn = Canon()
    fps_ids: dict[int, int] = {}

    def fid(fps: Any) -> int:
        return fps_ids.setdefault(id(fps), len(fps_ids))

    fpu_pid = {id(t.fpu): t.pid for t in m.tasks.values()}
    cpus = []
    for c in m.cpus:
        vals = tuple(sorted((i, cn.value(v, i)) for i, v in c.regs.values.items()))
        owner = c.fpu_fpregs_owner_ctx
        cpus.append((c.current.pid, fpu_pid.get(id(owner), -1) if owner is not None else None,
                     c.regs.xfd, c.regs.xfd_err, c.regs.xinuse, c.regs.mxcsr, c.regs.xcr0,
                     c.regs.xss, vals, c.kernel_fpu_allowed, c.xfd_state))
    tasks = []
    for pid in sorted(m.tasks):
        t = m.tasks[pid]
        if t.state.name == "DEAD":
            tasks.append((pid, "DEAD"))
            continue
        fpu = t.fpu
        shapes = []
        for fps in (fpu.fpstate, fpu.task_fpstate):
            if fps is None:
                shapes.append(None)
                continue
            shapes.append((fid(fps), fps is fpu.embedded, fps.size, fps.user_size,
                           fps.xfeatures, fps.user_xfeatures, fps.xfd, fps.xstate_bv,
                           fps.xcomp_bv, fps.is_guest, fps.in_use, fps.freed,
                           fps_values(cn, s, fps)))
        kp = t.kpath
        tasks.append((
            pid, t.comm, t.flags, t.process.tgid, t.process.pasid, t.state.name,
            t.need_fpu_load, t.on_cpu, fpu.last_cpu, tuple(shapes),
            (fpu.perm.state_perm, fpu.perm.state_size, fpu.perm.user_state_size),
            (fpu.guest_perm.state_perm, fpu.guest_perm.state_size),
            t.thread_pkru, t.sas_ss_sp, t.sas_ss_size, t.sas_ss_flags, t.user_sp,
            t.pasid_activated, None if kp is None else kp.__qualname__,
            tuple((p.sig, p.code) for p in t.pending),
            tuple(sorted((k, v.flags) for k, v in t.handlers.items())),
        ))
    expected = []
    for name in sorted(w.expected):
        t = w.tasks.get(name)
        if t is None or t.state.name == "DEAD":
            continue
        exp = tuple(sorted((i, cn.value(v, i)) for i, v in w.expected[name].items()))
        stack = tuple(tuple(sorted((i, cn.value(v, i)) for i, v in d.items()))
                      for d in w.sigstack[name])
        # By content (a digest: Python's hash() of bytes is salted per process, so worker
        # processes would name the same state differently).
        frames = tuple(hashlib.blake2b(t.process.mm.read(lo, hi - lo), digest_size=16).digest()
                       for lo, hi in w.frames[name])
        expected.append((name, exp, stack, frames))
    raw = (m.next_pid, tuple(cpus), tuple(tasks), tuple(expected), w.extra_key(cn))
    return cn.finish(raw)


__all__ = ["Canon", "Tok", "fps_values", "x86_key"]
