"""What the checker reads off the x86 kernel model: lookups, what each context would see, where
its state lives, the fpstates live contexts reference, the timeline view and the state key.

A mixin of `fpstate.check.actions_x86.X86World` (the actions live there); nothing here changes
the model.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from fpstate.check.invariants_x86 import image_state
from fpstate.check.memo import IdentityMemo
from fpstate.check.statekey import x86_key
from fpstate.check.world import (
    WHERE_BOTH,
    WHERE_GONE,
    WHERE_MEMORY,
    WHERE_REGS,
    ContextView,
    CpuView,
    Frame,
    StepError,
)
from fpstate.kernel.x86 import core
from fpstate.kernel.x86.context import fpregs_state_valid
from fpstate.kernel.x86.hw import PKRU, init_value, pkru_bytes, read_token
from fpstate.kernel.x86.sched import STATE_DEAD, STATE_USER, Task
from fpstate.kernel.x86.types import PF_KTHREAD, PF_USER_WORKER, Fpstate
from fpstate.x86.xfeatures import BY_NUMBER

if TYPE_CHECKING:
    from fpstate.kernel.x86.sched import Machine

KERNEL_NAME = "kernel"
#: X86Views.image's memo: (id(system), XFD, image bytes) -> registers, and by fpstate
#: (witness: system, XFD, a snapshot of its image).
_IMAGES: dict[tuple[int, int, bytes], dict[int, bytes]] = {}
_IMAGE_BY_BUFFER = IdentityMemo(2048)
#: X86Views.regs_view's memo by register file (witness: the components viewed, MXCSR, a copy
#: of its values); register files change a few components per step at most.
_VIEWS = IdentityMemo(4096)
#: X86Views.seen's views with a task's own PKRU, by the view they replace PKRU in (witness:
#: that PKRU value); views are memoised and never changed.
_WITH_PKRU = IdentityMemo(4096)


def with_pkru(view: dict[int, bytes], pkru: bytes) -> dict[int, bytes]:
    """``view`` with PKRU = ``pkru`` (the view itself when it says so already), memoised: the
    dict returned is shared, read it and never change it."""
    if view.get(PKRU) == pkru:
        return view
    got = _WITH_PKRU.get(view, pkru)
    if got is None:
        got = _WITH_PKRU.put(view, pkru, {**view, PKRU: pkru})
    return got


class X86Views:
    """Read-only views of an X86World's model and bookkeeping."""

    m: Machine
    tasks: dict[str, Task]
    expected: dict[str, dict[int, bytes]]
    tracked: tuple[int, ...]
    supervisor_tracked: tuple[int, ...]
    view_comps: tuple[int, ...]
    init_values: dict[int, bytes]
    fresh_values: dict[int, bytes]
    sizes: dict[tuple[int, bool], int]
    steps: int

    # -- lookups ---------------------------------------------------------------------------

    def task(self, name: Any) -> Task:
        t = self.tasks.get(name)
        if t is None or t.state is STATE_DEAD:
            raise StepError(f"no live task {name!r}")
        return t

    def user_cpu(self, t: Task) -> int:
        if t.state is not STATE_USER:
            raise StepError(f"task {t.comm} is not running in user mode ({t.state.value})")
        assert t.on_cpu is not None
        return t.on_cpu

    def cpu(self, nr: Any) -> int:
        if not isinstance(nr, int) or not 0 <= nr < len(self.m.cpus):
            raise StepError(f"no CPU {nr}")
        return nr

    #: The live tasks, and those of them that run user code, while the invariants run
    #: (X86World.check): nothing changes then.
    _live_cache: list[Task] | None = None
    _user_cache: list[Task] | None = None

    def live(self) -> list[Task]:
        cached = self._live_cache
        if cached is not None:
            return cached
        return [t for t in self.tasks.values() if t.state is not STATE_DEAD]

    def name_of_owner(self, owner: int) -> str:
        if owner == core.KERNEL_OWNER:
            return KERNEL_NAME
        t = self.m.tasks.get(owner)
        return t.comm if t is not None else f"pid{owner}"

    def writer(self, value: bytes, i: int) -> str:
        """Who wrote ``value`` of component ``i``: ``init``, ``<task>#<gen>``, or raw bytes."""
        if value == init_value(i, len(value)):
            return "init"
        tok = read_token(value)
        if tok is None:
            if len(value) <= 8:
                return f"{int.from_bytes(value, 'little'):#x}"
            return "raw:" + value[:8].hex()
        return f"{self.name_of_owner(tok[0])}#{tok[1]}"

    def _supervisor(self, exp: dict[int, bytes]) -> dict[int, bytes]:
        return {i: v for i, v in exp.items() if i in self.supervisor_tracked}

    def expected_value(self, name: str, i: int) -> bytes:
        v = self.expected[name].get(i)
        return v if v is not None else self.fresh_values[i]

    def xsave_size(self, mask: int, compacted: bool) -> int:
        """compacted_size/standard_size of the layout functions, memoised per world."""
        size = self.sizes.get((mask, compacted))
        if size is None:
            from fpstate.x86.layout import compacted_size, standard_size

            profile = self.m.system.profile
            size = self.sizes[(mask, compacted)] = (
                compacted_size(profile, mask) if compacted else standard_size(profile, mask))
        return size

    def live_fpstates(self) -> list[tuple[str, Fpstate, Task | None]]:
        """`fpstates` of the current step, computed once."""
        cached = getattr(self, "_fps_cache", None)
        if cached is not None and cached[0] == self.steps:
            return cached[1]
        out = self.fpstates()
        self._fps_cache = (self.steps, out)
        return out

    #: Whether PKRU is tracked (OSPKE): it lives apart from the XSAVE images.
    pkru_tracked: bool = False

    def seen(self, t: Task) -> dict[int, bytes]:
        """What ``t`` would see on its next instruction in user mode (what Machine.user_state
        answers): its CPU's registers when they are live or validly cached, else what the
        restore would load from its memory image (decoded once per distinct image). PKRU is
        not restored from either (XFEATURE_MASK_USER_RESTORE leaves it out): it is the
        register of the CPU the task is on, else thread.pkru, which x86_pkru_load() writes
        when the task is switched in."""
        fpu = t.fpu
        on = t.on_cpu
        if (t.state is STATE_USER or not t.need_fpu_load) and on is not None:
            return self.regs_view(self.m.cpus[on].regs)
        last = fpu.last_cpu
        if 0 <= last < len(self.m.cpus) and fpregs_state_valid(self.m.cpus[last], fpu):
            out = self.regs_view(self.m.cpus[last].regs)
        else:
            out = self.image(fpu.fpstate)
        if not self.pkru_tracked:
            return out
        return with_pkru(out, self.m.cpus[on].regs.component(PKRU) if on is not None
                         else pkru_bytes(t.thread_pkru))

    def regs_view(self, regs: Any) -> dict[int, bytes]:
        """A register file's values of the compared components (init values where not in
        use) and MXCSR as key -1: FpRegs.snapshot() restricted to what the checker reads."""
        vals = regs.values
        comps = self.view_comps
        out = _VIEWS.get(regs, (comps, regs.mxcsr, vals))
        if out is not None:
            return out  # shared: read it, never change it
        iv = self.init_values
        out = {i: vals.get(i) or iv[i] for i in comps}
        out[-1] = regs.mxcsr.to_bytes(4, "little")
        return _VIEWS.put(regs, (comps, regs.mxcsr, dict(vals)), out)

    def image(self, fps: Fpstate) -> dict[int, bytes]:
        """What restoring ``fps`` would load (invariants_x86.image_state), memoised by content
        for every world of this process (a buffer met again is compared with its snapshot
        rather than hashed: most images do not change from one step to the next). The dict
        returned is shared: read it, never change it."""
        s = self.m.system
        got = _IMAGE_BY_BUFFER.get(fps, (s, fps.xfd, fps.regs))
        if got is not None:
            return got
        snap = bytes(fps.regs)
        k = (id(s), fps.xfd, snap)
        got = _IMAGES.get(k)
        if got is None:
            if len(_IMAGES) > 2048:
                _IMAGES.clear()
            got = _IMAGES[k] = image_state(self, fps)
        return _IMAGE_BY_BUFFER.put(fps, (s, fps.xfd, snap), got)

    def where(self, t: Task) -> tuple[str, int | None]:
        if t.state is STATE_DEAD:
            return WHERE_GONE, None
        if not t.need_fpu_load:
            return WHERE_REGS, t.on_cpu
        last = t.fpu.last_cpu
        if 0 <= last < len(self.m.cpus) and fpregs_state_valid(self.m.cpus[last], t.fpu):
            return WHERE_BOTH, last
        return WHERE_MEMORY, None

    def fpstates(self) -> list[tuple[str, Fpstate, Task | None]]:
        """Every fpstate a live context references: (label, fpstate, owning host task or None
        for a guest's)."""
        out = []
        for t in self.live():
            if t.flags & (PF_KTHREAD | PF_USER_WORKER):
                continue
            fpu = t.fpu
            if fpu.task_fpstate is not None:
                out.append((f"{t.comm} (task fpstate)", fpu.task_fpstate, t))
                if not fpu.fpstate.is_guest:
                    out.append((t.comm, fpu.fpstate, t))
            else:
                out.append((t.comm, fpu.fpstate, t))
        return out

    # -- canonical state -------------------------------------------------------------------

    def key(self) -> Hashable:
        return x86_key(self)

    def extra_key(self, cn: Any) -> Hashable:
        """What a subclass adds to the canonical key (KVM guests); ``cn`` is the key's
        `fpstate.check.statekey.Canon`."""
        return ()

    def _writers(self, seen: dict[int, bytes]) -> tuple[tuple[str, str], ...]:
        out = []
        for i in self.tracked:
            if i in seen:
                w = self.writer(seen[i], i)
                if w != "init":
                    out.append((BY_NUMBER[i].short, w))
        return tuple(out)

    def frame(self, action: str, violation: str | None, detail: str = "") -> Frame:
        cpus = []
        holders = {id(t.fpu): t.comm for t in self.tasks.values()}
        for c in self.m.cpus:
            owner = c.fpu_fpregs_owner_ctx
            writers = tuple((BY_NUMBER[i].short, self.writer(v, i))
                            for i, v in sorted(c.regs.values.items()) if i in self.tracked)
            cpus.append(CpuView(c.nr, c.current.comm if c.current is not c.idle else "idle",
                                holders.get(id(owner)) if owner is not None else None, writers))
        ctxs = []
        for name, t in self.tasks.items():
            where, cpu = self.where(t)
            writers: tuple[tuple[str, str], ...] = ()
            image: tuple[tuple[str, str], ...] = ()
            if where != WHERE_GONE:
                seen = self.seen(t)
                writers = self._writers(seen)
            if where == WHERE_BOTH:
                mem = self._writers(self.image(t.fpu.fpstate))
                image = mem if mem != writers else ()
            note = f"fpstate {t.fpu.fpstate.size} B" if where != WHERE_GONE else ""
            ctxs.append(ContextView(name, where, cpu, writers, image, note))
        return Frame(self.steps, action, tuple(cpus), tuple(ctxs), violation, detail)



__all__ = ["KERNEL_NAME", "X86Views", "with_pkru"]
