"""The x86 predicates of the invariants stated in `fpstate.check.invariants`.

Each function reads an `X86World` (fpstate.check.actions_x86): the kernel model ``w.m``
(`Machine`), the fpstates live contexts reference (``w.live_fpstates()``), the values each task
expects (``w.expected``) and what the last step emitted (``w.emitted``). KVM guests add their
own predicates in `fpstate.check.actions_kvm`. The register images of memory are decoded with
the architecture's XRSTOR (`FpRegs.xrstor`), exactly as the kernel's restore would load them.
"""

from __future__ import annotations

from collections.abc import Iterator
from operator import attrgetter
from typing import Any

from fpstate.check import world
from fpstate.check.invariants import READS_EVENTS, READS_SHAPES, predicate
from fpstate.check.memo import IdentityMemo
from fpstate.kernel.x86.context import FpregsState, fpregs_state, fpregs_state_valid
from fpstate.kernel.x86.hw import (
    MXCSR,
    MXCSR_INIT,
    PKRU,
    FpRegs,
    KernelBuf,
    init_value,
    read_mxcsr_token,
    read_token,
)
from fpstate.kernel.x86.regset import mxcsr_by_format
from fpstate.kernel.x86.sched import SA_IA32_ABI, STATE_USER, Task
from fpstate.kernel.x86.signal import FP_XSTATE_MAGIC1, FP_XSTATE_MAGIC2, SW_BYTES_OFFSET
from fpstate.kernel.x86.types import (
    FREGS_STATE_SIZE,
    PF_KTHREAD,
    PF_USER_WORKER,
    XFEATURE_MASK_FPSTATE,
    XFEATURE_MASK_GUEST_SUPERVISOR,
    XFEATURE_MASK_USER_DYNAMIC,
    XFEATURE_MASK_USER_SUPPORTED,
    Fpstate,
)
from fpstate.x86.xfeatures import (
    BY_NUMBER,
    XCOMP_BV_COMPACTED_FORMAT,
    XFEATURE_MASK_FPSSE,
    XFEATURE_MASK_PKRU,
    XFEATURE_MASK_SSE,
    XFEATURE_MASK_YMM,
    bits,
    mask_names,
)

X86 = "x86"
_HDR = 512


def image_state(w: Any, fps: Fpstate) -> dict[int, bytes]:
    """What restore_fpregs_from_fpstate() would load from ``fps`` (RFBM = max_features &
    XFEATURE_MASK_FPSTATE, XFD = fps->xfd): an XRSTOR(S) into a scratch register file."""
    s = w.m.system
    regs = FpRegs(s.profile, xcr0=s.xcr0, xss=s.xss, xsavec_supported=s.xsavec,
                  mxcsr_mask=s.mxcsr_feature_mask, xfd=fps.xfd)
    fault = regs.xrstor(KernelBuf(fps.regs, f"fpstate #{fps.ident}"),
                        s.kernel.max_features & XFEATURE_MASK_FPSTATE, s.xrstor_insn)
    if fault is not None:
        return {-2: str(fault).encode()}
    return w.regs_view(regs)


def uabi_view(w: Any, buf: bytes) -> dict[int, bytes]:
    """What a task restored from the standard-format (UABI) buffer ``buf`` would hold -- a
    debugger's or a core reader's reading of NT_X86_XSTATE: an XRSTOR of ``buf`` (RFBM =
    fpu_user_cfg.max_features) into a scratch register file, so that XSTATE_BV, the initial
    configurations and MXCSR (loaded with SSE or AVX in RFBM, whatever XSTATE_BV says) are
    read as the architecture reads them. {-2: reason} if the buffer does not restore."""
    s = w.m.system
    regs = FpRegs(s.profile, xcr0=s.xcr0, xss=s.xss, xsavec_supported=s.xsavec,
                  mxcsr_mask=s.mxcsr_feature_mask, xfd=0)
    # A KVM buffer is sized for the guest: what lies beyond it is not in its XSTATE_BV.
    # XSTATE_BV bits beyond the user features are nothing-beyond-advertised's to judge.
    area = bytearray(buf).ljust(s.user.max_size, b"\0")
    bv = int.from_bytes(area[_HDR:_HDR + 8], "little") & s.user.max_features
    area[_HDR:_HDR + 8] = bv.to_bytes(8, "little")
    fault = regs.xrstor(KernelBuf(area, "NT_X86_XSTATE"), s.user.max_features, "XRSTOR")
    if fault is not None:
        return {-2: str(fault).encode()}
    return w.regs_view(regs)


def user_tasks(w: Any) -> list[Task]:
    """The live tasks that run user code (no kernel threads or user workers)."""
    cached = w._user_cache
    if cached is not None:
        return cached
    return [t for t in w.live() if not t.flags & (PF_KTHREAD | PF_USER_WORKER)]


def _name(i: int) -> str:
    return BY_NUMBER[i].short if i in BY_NUMBER else ("MXCSR" if i == -1 else f"bit{i}")


# -- buffers -------------------------------------------------------------------------------------

#: What the buffer predicates read of an fpstate (besides its header and allocation size), and
#: of the task that owns it (its own permission, its group's and its group's guest permission).
_SHAPE_FIELDS = attrgetter("freed", "size", "user_size", "xfeatures", "user_xfeatures", "xfd",
                           "is_guest")
_GROUP_PERMS = attrgetter("fpu.perm.state_perm", "fpu.guest_perm.state_perm")


def fps_shapes(w: Any) -> int:
    """A hash of everything the buffer predicates (READS_SHAPES) read: each live fpstate's
    fields, allocation size and header (XSTATE_BV, XCOMP_BV), the permissions of the task and
    process that own it, and init_fpstate's. Buffers change shape far less often than states
    change, so shapes found clean are not judged again (fpstate.check.invariants.check)."""
    parts = []
    groups: dict[int, tuple[int, int]] = {}
    for _, fps, t in w.live_fpstates():
        regs = fps.regs
        if t is None:
            owner = None
        else:
            p = t.process
            group = groups.get(id(p))
            if group is None:
                group = groups[id(p)] = _GROUP_PERMS(p.threads[0])  # the leader's
            owner = (t.fpu.perm.state_perm, group)
        parts.append((_SHAPE_FIELDS(fps), len(regs), bytes(regs[512:528]), owner))
    init = w.m.init_fpstate
    parts.append((init.xfeatures, bytes(init.regs[512:528])))
    return hash(tuple(parts))


@predicate("save-within-allocation", X86, reads=READS_SHAPES)
def referenced_buffers_alive(w: Any) -> Iterator[str]:
    for label, fps, _ in w.live_fpstates():
        if fps.freed:
            yield f"{label} references fpstate #{fps.ident}, which was vfree()d"


@predicate("size-covers-features", X86, reads=READS_SHAPES)
def sizes_cover_features(w: Any) -> Iterator[str]:
    s = w.m.system
    for label, fps, _ in w.live_fpstates():
        need = w.xsave_size(fps.xfeatures, s.xcompacted)
        if fps.size < need:
            yield (f"{label}: fpstate #{fps.ident} size {fps.size} < {need} needed for "
                   f"xfeatures {mask_names(fps.xfeatures)}")
        if len(fps.regs) < fps.size:
            yield (f"{label}: fpstate #{fps.ident} claims size {fps.size} but has "
                   f"{len(fps.regs)} bytes")
        uneed = w.xsave_size(fps.user_xfeatures & s.user.max_features, False)
        if fps.user_size < uneed:
            yield (f"{label}: fpstate #{fps.ident} user_size {fps.user_size} < {uneed} for "
                   f"user_xfeatures {mask_names(fps.user_xfeatures)}")


@predicate("xcomp-bv-matches-features", X86, reads=READS_SHAPES)
def xcomp_bv_matches(w: Any) -> Iterator[str]:
    s = w.m.system
    for label, fps, _ in w.live_fpstates():
        xstate_bv, xcomp_bv = fps.xstate_bv, fps.xcomp_bv
        if s.xcompacted:
            if xcomp_bv != fps.xfeatures | XCOMP_BV_COMPACTED_FORMAT:
                yield (f"{label}: fpstate #{fps.ident} XCOMP_BV {xcomp_bv:#x} != xfeatures "
                       f"{fps.xfeatures:#x} | bit 63")
            if xstate_bv & ~xcomp_bv:
                yield (f"{label}: fpstate #{fps.ident} XSTATE_BV {xstate_bv:#x} has "
                       f"{mask_names(xstate_bv & ~xcomp_bv)} outside XCOMP_BV {xcomp_bv:#x}")
        else:
            if xcomp_bv:
                yield f"{label}: standard-format fpstate #{fps.ident} has XCOMP_BV {xcomp_bv:#x}"
            if xstate_bv & ~fps.xfeatures:
                yield (f"{label}: fpstate #{fps.ident} XSTATE_BV {xstate_bv:#x} beyond "
                       f"xfeatures {fps.xfeatures:#x}")


# -- lazy restore --------------------------------------------------------------------------------


@predicate("valid-registers-match-memory", X86)
def cached_registers_match_image(w: Any) -> Iterator[str]:
    cpus = w.m.cpus
    compare = _restored(w.m.system)
    for t in user_tasks(w):
        fpu = t.fpu
        if not t.need_fpu_load or not 0 <= fpu.last_cpu < len(cpus):
            continue
        c = cpus[fpu.last_cpu]
        if not fpregs_state_valid(c, fpu):
            continue
        regs = w.regs_view(c.regs)
        image = w.image(fpu.fpstate)
        for i in compare:
            if regs.get(i) != image.get(i):
                yield (f"{t.comm}: TIF_NEED_FPU_LOAD set and CPU {c.nr} registers marked valid, "
                       f"but {_name(i)} is {_writer(w, regs.get(i), i)} in the registers and "
                       f"{_writer(w, image.get(i), i)} in fpstate #{fpu.fpstate.ident}")
                break


_RESTORED = IdentityMemo(64)


def _restored(s: Any) -> tuple[int, ...]:
    """The components restore_fpregs_from_fpstate() loads (max_features & FPSTATE) and
    MXCSR (-1), per system."""
    got = _RESTORED.get(s, ())
    if got is None:
        got = _RESTORED.put(s, (), (*bits(s.kernel.max_features & XFEATURE_MASK_FPSTATE), -1))
    return got


@predicate("tif-clear-owns-registers", X86)
def tif_clear_owns_registers(w: Any) -> Iterator[str]:
    cpus = w.m.cpus
    for t in user_tasks(w):
        if t.need_fpu_load:
            continue
        if fpregs_state(t, cpus) is FpregsState.INCONSISTENT:
            c = None if t.on_cpu is None else cpus[t.on_cpu]
            owner = None if c is None else c.fpu_fpregs_owner_ctx
            yield (f"{t.comm}: TIF_NEED_FPU_LOAD clear but it does not own CPU "
                   f"{t.on_cpu}'s registers (owner {getattr(owner, 'owner', None)}, "
                   f"last_cpu {t.fpu.last_cpu})")


def _writer(w: Any, value: bytes | None, i: int) -> str:
    if value is None:
        return "absent"
    if i == MXCSR:
        v = int.from_bytes(value, "little")
        tok = read_mxcsr_token(value)
        if tok is None:
            return f"MXCSR {v:#x}" + (" (init)" if value == MXCSR_INIT else "")
        names = [t.comm for t in w.m.tasks.values() if t.pid & 0x3F == tok[0]]
        names += [n for n, x in getattr(w, "vcpus", {}).items()
                  if w.guest_owner(x) & 0x3F == tok[0]]
        return f"MXCSR {v:#x} ({'/'.join(names) or f'writer {tok[0]} mod 64'}'s value {tok[1]})"
    return w.writer(value, i)


@predicate("no-foreign-value", X86)
def no_foreign_value(w: Any) -> Iterator[str]:
    yield from (msg for kind, msg in _observations(w) if kind == "foreign")


@predicate("no-lost-write", X86)
def no_lost_write(w: Any) -> Iterator[str]:
    yield from (msg for kind, msg in _observations(w) if kind == "lost")


#: A task's or guest's expected values -> True when last compared with a view (the views
#: `seen` and `guest_seen` return are memoised and never changed) they matched; witness: the
#: view, the system, a copy of the expected values and the components compared.
_OBS_CLEAN = IdentityMemo(4096)


def _seen_clean(w: Any, seen: dict[int, bytes], exp: dict[int, bytes],
                tracked: tuple[int, ...]) -> bool:
    """Whether this (view, expected values) pair was found clean before."""
    return world.MEMOS_ON and _OBS_CLEAN.get(exp, (seen, w.m.system, exp, tracked)) is not None


def _mark_clean(w: Any, seen: dict[int, bytes], exp: dict[int, bytes],
                tracked: tuple[int, ...]) -> None:
    _OBS_CLEAN.put(exp, (seen, w.m.system, dict(exp), tracked), True)


def _observations(w: Any) -> list[tuple[str, str]]:
    """Compare what every task would see with what it expects; cached per step."""
    cached = getattr(w, "_obs_cache", None)
    if cached is not None and cached[0] == w.steps:
        return cached[1]
    out: list[tuple[str, str]] = []
    for t in user_tasks(w):
        if t.fpu.task_fpstate is not None:
            continue  # in KVM_RUN: the guest's state is live (the KVM predicates judge it)
        seen = w.seen(t)
        exp, init = w.expected[t.comm], w.fresh_values
        if _seen_clean(w, seen, exp, w.tracked):
            continue
        before = len(out)
        for i in w.tracked:
            got = seen.get(i)
            want = exp.get(i)  # w.expected_value(t.comm, i), inlined: the hottest loop
            if want is None:
                want = init[i]
            if got == want:
                continue
            tok = read_token(got) if got is not None else None
            where, cpu = w.where(t)
            place = f"{where}" + (f" on CPU {cpu}" if cpu is not None else "")
            if tok is not None and tok[0] != t.pid:
                out.append(("foreign", f"{t.comm} would see {_name(i)} = {w.writer(got, i)} "
                            f"(expected {w.writer(want, i)}; state in {place})"))
            else:
                out.append(("lost", f"{t.comm} would see {_name(i)} = "
                            f"{_writer(w, got, i)} instead of its {w.writer(want, i)} "
                            f"(state in {place})"))
        _mxcsr_observation(w, out, t.comm, t.pid, seen, exp, w.where(t))
        if len(out) == before:
            _mark_clean(w, seen, exp, w.tracked)
    out += _guest_observations(w)
    w._obs_cache = (w.steps, out)
    return out


# -- permissions and guest-only state ------------------------------------------------------------


@predicate("dynamic-state-needs-permission", X86, reads=READS_SHAPES)
def dynamic_state_permitted(w: Any) -> Iterator[str]:
    s = w.m.system
    for label, fps, t in w.live_fpstates():
        if t is None:
            continue
        leader = t.process.leader.fpu
        perm = (leader.guest_perm if fps.is_guest else leader.perm).state_perm
        dyn = (fps.xfeatures | fps.xstate_bv) & XFEATURE_MASK_USER_DYNAMIC & ~perm
        if dyn:
            yield (f"{label}: fpstate #{fps.ident} has {mask_names(dyn)} without permission "
                   f"(perm {perm:#x})")
        if not fps.is_guest and s.fpu_state_size_dynamic:
            unarmed = (XFEATURE_MASK_USER_DYNAMIC & s.user.max_features & ~fps.xfeatures
                       & ~fps.xfd)
            if unarmed:
                yield (f"{label}: fpstate #{fps.ident} has no space for {mask_names(unarmed)} "
                       f"but does not arm it in XFD ({fps.xfd:#x})")


@predicate("permission-keeps-defaults", X86, reads=READS_SHAPES)
def permission_keeps_defaults(w: Any) -> Iterator[str]:
    """The permissions of every user task's group (its leader's fpu, which the shape hash
    reads) hold fpstate_reset()'s defaults: fpu_kernel_cfg.default_features, and
    guest_default_cfg.features for the guest permission."""
    s = w.m.system
    seen: set[int] = set()
    for t in user_tasks(w):
        leader = t.process.leader.fpu
        if id(leader) in seen:
            continue
        seen.add(id(leader))
        for what, perm, default in (("permission", leader.perm, s.kernel.default_features),
                                    ("guest permission", leader.guest_perm, s.guest.features)):
            lost = default & ~perm.state_perm
            if lost:
                yield (f"{t.comm}: the group's {what} {perm.state_perm:#x} lacks the default "
                       f"{mask_names(lost)} ({lost:#x})")


@predicate("dynamic-state-needs-permission", X86)
def running_dynamic_state_permitted(w: Any) -> Iterator[str]:
    for c in w.m.cpus:
        t = c.current
        if t is c.idle or t.state is not STATE_USER or t.fpu.task_fpstate is not None:
            continue
        perm = t.process.leader.fpu.perm.state_perm
        dyn = c.regs.xinuse & XFEATURE_MASK_USER_DYNAMIC & ~perm
        if dyn:
            yield f"{t.comm} runs on CPU {c.nr} with {mask_names(dyn)} in use, not permitted"


@predicate("guest-only-not-in-host-fpstate", X86, reads=READS_SHAPES)
def guest_only_state_stays_in_guests(w: Any) -> Iterator[str]:
    for label, fps, t in w.live_fpstates():
        if fps.is_guest:
            continue
        found = (fps.xfeatures | fps.xcomp_bv | fps.xstate_bv) & XFEATURE_MASK_GUEST_SUPERVISOR
        if found:
            yield f"{label}: host fpstate #{fps.ident} carries {mask_names(found)}"
        if t is not None and t.fpu.perm.state_perm & XFEATURE_MASK_GUEST_SUPERVISOR:
            yield f"{label}: host permission includes guest-only {mask_names(found)}"
    init = w.m.init_fpstate
    found = (init.xfeatures | init.xcomp_bv | init.xstate_bv) & XFEATURE_MASK_GUEST_SUPERVISOR
    if found:
        yield f"init_fpstate carries guest-only {mask_names(found)}"


# -- what userspace sees -------------------------------------------------------------------------


@predicate("nothing-beyond-advertised", X86, reads=READS_EVENTS)
def userspace_sees_only_advertised(w: Any) -> Iterator[str]:
    s = w.m.system
    for kind, payload in w.emitted:
        if kind == "uabi":
            t, buf = payload
            bv = int.from_bytes(buf[_HDR:_HDR + 8], "little")
            extra = bv & ~t.fpu.fpstate.user_xfeatures
            if extra:
                yield (f"NT_X86_XSTATE of {t.comm}: XSTATE_BV {bv:#x} shows "
                       f"{mask_names(extra)} beyond user_xfeatures")
        elif kind == "xcomp_mask":
            t, option, value = payload
            extra = value & ~(XFEATURE_MASK_USER_SUPPORTED & s.user.max_features)
            if extra and option != "get_supp":
                yield f"ARCH_{option.upper()} of {t.comm} = {value:#x}: shows {extra:#x}"


@predicate("regset-view-shows-the-task", X86, reads=READS_EVENTS)
def regset_view_shows_the_task(w: Any) -> Iterator[str]:
    """NT_X86_XSTATE -- of a stopped tracee (PTRACE_GETREGSET) or in a core -- and a VMM's
    KVM_GET_XSAVE2 of a vCPU, read as a restore would read them, show every tracked user
    component and MXCSR as the task or the guest holds them.
    A compacted kernel's MXCSR when the header has YMM without SSE -- the fpstate's bytes
    of SSE's last save -- breaks it (docs/findings/kernel-findings.md 6; variant
    uabi-mxcsr-by-ymm, every release: the default configuration applies the proposed fix
    ``mxcsr_by_format``). Known rules of the kernel that break it are stated here, not
    silenced elsewhere: PKRU in the core of a dumping task that
    nothing switched out -- no thread to wait for, or all of them arrived before it waited
    -- which is thread.pkru, the value of its last context switch, not the one it crashed
    with (kernel-findings 9i; every other thread's note, and a dumper's that slept, must
    show its PKRU); every register in the note of the last thread to reach
    coredump_task_exit() when it was still running in TASK_RUNNING as the dumper's
    wait_task_inactive(TASK_ANY) looked, which then does not wait (Linux 6.1+), so the note
    is its fpstate as its last switch left it (kernel-findings 9j); a guest's PKRU in
    KVM_GET_XSAVE2 when its fpstate's XSTATE_BV lacks PKRU -- __copy_xstate_to_uabi_buf()
    writes vcpu->arch.pkru only under that bit, which a KVM_SET_XSAVE without PKRU clears
    while keeping vcpu->arch.pkru
    (docs/findings/kvm-findings.md, "A guest's PKRU missing from KVM_GET_XSAVE2"); a
    component a guest armed in its XFD while it held a value, which may show as initial (as
    XSAVE saves it; `KvmX86World.guest_loose`); MXCSR on
    a standard-format kernel without ``mxcsr_by_format`` when the header has neither SSE nor
    YMM -- the view says 1F80H
    (init_fpstate's, copy_feature), while XRSTOR loads the image's, which a
    copy_uabi_to_xstate() of such a header left as it was (kvm-findings, "A buffer whose
    XSTATE_BV has none of x87, SSE and AVX leaves MXCSR to the kernel's format")."""
    s = w.m.system
    for kind, payload in w.emitted:
        if kind == "uabi":
            t, buf = payload
            held, tracked = w._held(t), w.tracked
            what, who = f"PTRACE_GETREGSET NT_X86_XSTATE of {t.comm}", "the task"
        elif kind == "core":
            t, buf, held, stale = payload
            tracked = w.tracked
            what, who = f"the core of {t.comm}", "the task"
        elif kind == "kvm_uabi":
            name, _v, buf, held, loose = payload
            tracked = tuple(i for i in held if i != MXCSR)
            what, who = f"KVM_GET_XSAVE2 of {name}", "the guest"
        else:
            continue
        view = uabi_view(w, buf)
        if -2 in view:
            yield f"{what} does not restore: {view[-2].decode()}"
            continue
        if kind == "core" and stale == "regs":
            continue  # its fpstate as its last switch left it (kernel-findings 9j)
        bv = int.from_bytes(buf[_HDR:_HDR + 8], "little")
        for i in tracked:
            if not s.user.max_features >> i & 1:
                continue  # supervisor state (PASID, CET): not in a UABI buffer
            if i == PKRU and kind == "core" and stale == "pkru":
                continue  # thread.pkru, stale since the last switch (kernel-findings 9i)
            if i == PKRU and kind == "kvm_uabi" and not bv & XFEATURE_MASK_PKRU:
                continue  # vcpu->arch.pkru only under the fpstate's PKRU bit (kvm-findings)
            got, want = view.get(i), held[i]
            if got != want:
                if kind == "kvm_uabi" and i in loose and got == w.init_values[i]:
                    continue  # armed in the guest's XFD: initial is as good (guest_loose)
                yield (f"{what} shows {_name(i)} = {_writer(w, got, i)} where {who} holds "
                       f"{w.writer(want, i)}")
        # Standard format, unfixed: the view's 1F80H, not the image's bytes that XRSTOR loads
        stale = (not s.xcompacted and not bv & (XFEATURE_MASK_SSE | XFEATURE_MASK_YMM)
                 and not mxcsr_by_format(s))
        if not stale and view[MXCSR] != held[MXCSR]:
            yield (f"{what} shows MXCSR = {_writer(w, view[MXCSR], MXCSR)} where {who} "
                   f"holds {_writer(w, held[MXCSR], MXCSR)}")


@predicate("sigframe-fits-and-describes", X86, reads=READS_EVENTS)
def sigframe_ok(w: Any) -> Iterator[str]:
    s = w.m.system
    for kind, payload in w.emitted:
        if kind != "sigframe":
            continue
        t, frame, buf_fx, (ss_sp, ss_size, action) = payload
        # An ia32 frame: the 112-byte fsave header before buf_fx, counted in extended_size.
        header = FREGS_STATE_SIZE if action is not None and action.flags & SA_IA32_ABI else 0
        mm = t.process.mm
        sw = mm.read(buf_fx + SW_BYTES_OFFSET, 20)
        magic1 = int.from_bytes(sw[0:4], "little")
        ext = int.from_bytes(sw[4:8], "little")
        xfeatures = int.from_bytes(sw[8:16], "little")
        xsize = int.from_bytes(sw[16:20], "little")
        if magic1 != FP_XSTATE_MAGIC1:
            yield f"{t.comm}: frame at {buf_fx:#x} has magic1 {magic1:#x}"
            continue
        need = w.xsave_size(xfeatures & s.user.max_features, False)
        if xsize < need:
            yield (f"{t.comm}: fx_sw_bytes xstate_size {xsize} < {need} needed for "
                   f"xfeatures {mask_names(xfeatures)}")
        if ext != xsize + 4 + header:
            yield (f"{t.comm}: fx_sw_bytes extended_size {ext} != xstate_size {xsize} + 4"
                   + (f" + {header}" if header else ""))
        if not mm.mapped(buf_fx + xsize, 4) or int.from_bytes(
                mm.read(buf_fx + xsize, 4), "little") != FP_XSTATE_MAGIC2:
            yield f"{t.comm}: no FP_XSTATE_MAGIC2 at buf_fx + xstate_size ({xsize})"
        bv = int.from_bytes(mm.read(buf_fx + _HDR, 8), "little")
        if bv & ~xfeatures:
            yield (f"{t.comm}: frame XSTATE_BV {bv:#x} has {mask_names(bv & ~xfeatures)} "
                   f"beyond its fx_sw_bytes xfeatures")
        end = buf_fx - header + ext
        if ss_size and ss_sp <= frame < ss_sp + ss_size:
            if end > ss_sp + ss_size:
                yield (f"{t.comm}: frame [{frame:#x}, {end:#x}) overflows the sigaltstack "
                       f"[{ss_sp:#x}, {ss_sp + ss_size:#x})")
        elif not mm.in_one_mapping(frame, end - frame):
            yield f"{t.comm}: frame [{frame:#x}, {end:#x}) is not inside one mapped stack"


def _events(w: Any, kind: str) -> Iterator[Any]:
    """The payloads of the events of ``kind`` the step emitted."""
    return (payload for k, payload in w.emitted if k == kind)


@predicate("sigframe-delivered-with-room", X86, reads=READS_EVENTS)
def sigframe_delivered_with_room(w: Any) -> Iterator[str]:
    for t, room, need in _events(w, "undelivered"):
        if room >= need:
            why = (f"killed by signal {t.killed_by.sig}" if t.killed_by is not None
                   else "not delivered")
            yield (f"{t.comm}: SIGUSR1 {why} though its stack had {room} bytes of room for "
                   f"the frame (AT_MINSIGSTKSZ {need})")


@predicate("sigreturn-restores-own-frame", X86, reads=READS_EVENTS)
def sigreturn_restores_own_frame(w: Any) -> Iterator[str]:
    for t, ret, frame in _events(w, "sigreturn-refused"):
        yield (f"{t.comm}: rt_sigreturn of its frame at {frame:#x} failed ({ret}) though the "
               f"handler could read the frame and changed it only as the ABI allows")


# -- KVM guests (worlds with ``vcpus``) ----------------------------------------------------------


def _mxcsr_observation(w: Any, out: list[tuple[str, str]], who: str, owner: int,
                       seen: dict[int, bytes], exp: dict[int, bytes],
                       where: tuple[str, int | None]) -> None:
    """MXCSR, which no component's value holds (SDM 13.5.2: it is saved with SSE and AVX):
    what ``who`` (writer id ``owner``) would see against what it loaded last (LDMXCSR, a
    sigreturn, fork) or 1F80H. Another writer's value is foreign (told by the writer id's
    low 6 bits, `hw.mxcsr_token`), anything else lost."""
    got, want = seen.get(MXCSR), exp.get(MXCSR, MXCSR_INIT)
    if got == want:
        return
    tok = read_mxcsr_token(got)
    place = where[0] + (f" on CPU {where[1]}" if where[1] is not None else "")
    kind = "foreign" if tok is not None and tok[0] != owner & 0x3F else "lost"
    out.append((kind, f"{who} would see {_writer(w, got, MXCSR)} instead of its "
                      f"{_writer(w, want, MXCSR)} (state in {place})"))


def _guest_observations(w: Any) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for name, v in getattr(w, "vcpus", {}).items():
        if w._vmm_task(name) is None:
            continue
        seen = w.guest_seen(name)
        exp, tracked = w.expected[name], w.guest_tracked(v)
        if _seen_clean(w, seen, exp, tracked):
            continue
        before = len(out)
        loosened = False
        for i in tracked:
            got = seen.get(i)
            want = w.expected_value(name, i)
            if got == want:
                continue
            if w.guest_loose[name] and w.guest_loose_ok(name, i, got):
                loosened = True  # armed in its XFD: initial is as good as its own value
                continue
            tok = read_token(got) if got is not None else None
            where, cpu = w.guest_where(name)
            place = where + (f" on CPU {cpu}" if cpu is not None else "")
            mine = tok is not None and w.name_of_owner(tok[0]) == name
            kind = "lost" if tok is None or mine else "foreign"
            out.append((kind, f"guest {name} would see {_name(i)} = {_writer(w, got, i)} "
                              f"(expected {w.writer(want, i)}; state in {place})"))
        _mxcsr_observation(w, out, f"guest {name}", w.guest_owner(v), seen, exp,
                           w.guest_where(name))
        if len(out) == before and not loosened:  # the memo's witness has no allowances
            _mark_clean(w, seen, exp, tracked)
    for name, msr, got, want in _events(w, "guest_msr"):
        out.append(("lost", f"guest {name} read {msr} = {got:#x} instead of its {want:#x}"))
    return out


@predicate("init-clears-architectural", X86, reads=READS_EVENTS)
def init_clears_architectural(w: Any) -> Iterator[str]:
    from fpstate.check.actions_kvm import ARCH_INIT_CLEARED

    for kind, payload in w.emitted:
        if kind != "init":
            continue
        name, v, before, after, rewritten = payload
        caps = v.kvm.caps
        cleared = (caps.supported_xcr0 | caps.supported_xss) & ARCH_INIT_CLEARED
        for i in sorted(set(before or {}) | set(after)):
            if i < 0 or i in rewritten:
                continue
            if (cleared >> i) & 1:
                if after.get(i) != init_value_of(w, i):
                    yield (f"guest {name}: INIT left {_name(i)} = {_writer(w, after.get(i), i)} "
                           f"(the SDM clears it on INIT)")
            elif before is not None and after.get(i) != before.get(i):
                yield (f"guest {name}: INIT changed {_name(i)} from "
                       f"{_writer(w, before.get(i), i)} to {_writer(w, after.get(i), i)}")


@predicate("reset-zeroed-buffer", X86, reads=READS_EVENTS)
def reset_zeroed_buffer(w: Any) -> Iterator[str]:
    for kind, payload in w.emitted:
        if kind != "reset":
            continue
        name, v = payload
        fps = v.arch.guest_fpu.fpstate
        regs = bytearray(fps.regs)
        # fpstate_init_user(): FCW 037FH, MXCSR 1F80H and XCOMP_BV are the only writes.
        if bytes(regs[0:2]) != b"\x7f\x03":
            yield f"guest {name}: FCW after RESET is {bytes(regs[0:2]).hex()}"
        regs[0:2] = bytes(2)
        regs[24:28] = bytes(4)
        regs[_HDR + 8:_HDR + 16] = bytes(8)
        dirty = [n for n, b in enumerate(regs) if b]
        if dirty:
            yield (f"guest {name}: RESET left {len(dirty)} nonzero bytes in fpstate "
                   f"#{fps.ident} (first at offset {dirty[0]})")


@predicate("nothing-beyond-advertised", X86, reads=READS_EVENTS)
def guest_sees_only_advertised(w: Any) -> Iterator[str]:
    for kind, payload in w.emitted:
        if kind != "kvm_uabi":
            continue
        name, v, buf, _held, _loose = payload
        bv = int.from_bytes(buf[_HDR:_HDR + 8], "little")
        allowed = v.arch.guest_supported_xcr0 | XFEATURE_MASK_FPSSE
        if bv & ~allowed:
            yield (f"KVM_GET_XSAVE2 of {name}: XSTATE_BV {bv:#x} shows "
                   f"{mask_names(bv & ~allowed)} beyond the guest's CPUID")


@predicate("nothing-beyond-advertised", X86)
def guest_xcr0_within_cpuid(w: Any) -> Iterator[str]:
    for name, v in getattr(w, "vcpus", {}).items():
        if v.arch.xcr0 & ~(v.arch.guest_supported_xcr0 | 1):
            yield f"guest {name} runs with XCR0 {v.arch.xcr0:#x} beyond its CPUID"


def init_value_of(w: Any, i: int) -> bytes:
    return init_value(i, w.m.system.profile.component(i).size)
