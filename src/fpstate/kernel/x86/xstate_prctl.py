"""Dynamic-feature permissions: arch_prctl(ARCH_*_XCOMP_*) and the sigaltstack interplay.

Models fpu_xstate_prctl(), xstate_request_perm(), __xstate_request_perm(), validate_sigaltstack()
and xstate_get_group_perm() (arch/x86/kernel/fpu/xstate.c, kernel/fpu/xstate.h),
fpu_lock_guest_permissions() (core.c), sigaltstack_size_valid() (arch/x86/kernel/signal.c) and
the generic do_sigaltstack() (kernel/signal.c), Linux v6.17.

Rules the model keeps from the kernel:
- permissions are process-wide: read and written on the *group leader's* fpu, under
  sighand->siglock (lockless READ_ONCE snapshots for the quick checks);
- they are sticky (no call revokes them), copied to a new process at fork when dynamic sizing
  is enabled, reset at execve (fpstate_reset in fpu_flush_thread);
- the guest permission is locked (FPU_GUEST_PERM_LOCKED) by the first vCPU's fpstate
  allocation; a later request that would change it fails with EBUSY;
- a request is refused with ENOSPC when an existing sigaltstack of any thread is smaller than
  the frame the new permission would need, and a later sigaltstack() that is too small for the
  permitted frame fails with ENOMEM. The two formulas differ, verbatim from the kernel.

Syscalls return 0 or a negative errno, as the kernel does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fpstate.kernel.x86.context import requires
from fpstate.kernel.x86.hw import PageFault
from fpstate.kernel.x86.sched import SS_AUTODISARM, SS_DISABLE, SS_ONSTACK
from fpstate.kernel.x86.types import (
    FPU_GUEST_PERM_LOCKED,
    XFEATURE_MASK_USER_DYNAMIC,
    XFEATURE_MASK_USER_SUPPORTED,
    XFEATURE_MAX,
    IllegalEvent,
)
from fpstate.x86.layout import compacted_size, standard_size
from fpstate.x86.xfeatures import XFEATURE_MASK_XTILE_DATA

if TYPE_CHECKING:
    from fpstate.kernel.x86.sched import Cpu, KPath

# arch/x86/include/uapi/asm/prctl.h
from fpstate.kernel.x86.uapi import (  # noqa: F401 (re-exported)
    ARCH_GET_XCOMP_GUEST_PERM,
    ARCH_GET_XCOMP_PERM,
    ARCH_GET_XCOMP_SUPP,
    ARCH_REQ_XCOMP_GUEST_PERM,
    ARCH_REQ_XCOMP_PERM,
    ARCH_XCOMP_TILECFG,
    ARCH_XCOMP_TILEDATA,
)

# include/uapi/asm-generic/errno-base.h, errno.h
EPERM, ENOMEM, EFAULT, EBUSY, EINVAL, ENOSPC, EOPNOTSUPP = 1, 12, 14, 16, 22, 28, 95
ERRNO_NAMES = {EPERM: "EPERM", ENOMEM: "ENOMEM", EFAULT: "EFAULT", EBUSY: "EBUSY",
               EINVAL: "EINVAL", ENOSPC: "ENOSPC", EOPNOTSUPP: "EOPNOTSUPP"}

#: include/uapi/asm-generic/signal.h MINSIGSTKSZ: the generic floor do_sigaltstack() applies.
MINSIGSTKSZ = 2048

#: xstate_prctl_req[]: facilities with more than one component map to all of them; only AMX
#: tile data is requestable.
XSTATE_PRCTL_REQ: dict[int, int] = {18: XFEATURE_MASK_XTILE_DATA}


class siglock:
    """spin_lock_irq(&current->sighand->siglock) ... spin_unlock_irq(), as ``with
    siglock(c):`` (taken on entry, IllegalEvent if this process's lock is already held;
    released on the way out, whatever happened inside)."""

    __slots__ = ("c", "proc", "saved")

    def __init__(self, c: Cpu) -> None:
        self.c = c

    def __enter__(self) -> None:
        c = self.c
        proc = self.proc = c.current.process
        if proc.siglock_holder is not None:
            raise IllegalEvent(f"siglock of process {proc.tgid} already held by CPU "
                               f"{proc.siglock_holder.nr}")
        self.saved = c.irqs_disabled
        proc.siglock_holder = c
        c.irqs_disabled = True

    def __exit__(self, *exc: object) -> None:
        self.proc.siglock_holder = None
        self.c.irqs_disabled = self.saved


def xstate_get_group_perm(c: Cpu, guest: bool) -> int:
    """xstate_get_group_perm(): READ_ONCE of the group leader's (guest_)perm.__state_perm."""
    leader = c.current.process.leader.fpu
    return (leader.guest_perm if guest else leader.perm).state_perm


def put_user_u64(c: Cpu, addr: int, value: int) -> int:
    """put_user() of a u64: 0, or -EFAULT when the address is not mapped."""
    try:
        c.current.process.mm.write(addr, value.to_bytes(8, "little"), pkru=sigframe.read_pkru(c))
    except PageFault:
        return -EFAULT
    return 0


@requires("siglock")
def validate_sigaltstack(c: Cpu, usize: int) -> int:
    """validate_sigaltstack() (xstate.c): framesize = get_sigframe_size() -
    fpu_user_cfg.max_size + usize; any thread with a sigaltstack *smaller than* that -> ENOSPC."""
    framesize = sigframe.get_sigframe_size(c.m.system) - c.m.system.user.max_size + usize
    for t in c.current.process.threads:
        if t.sas_ss_size and t.sas_ss_size < framesize:
            return -ENOSPC
    return 0


def xstate_calculate_size(c: Cpu, mask: int, compacted: bool) -> int:
    """xstate_calculate_size() (xstate.c) on this system's CPU: compacted or standard size of
    ``mask`` (supervisor bits count only in the compacted size)."""
    profile = c.m.system.profile
    return compacted_size(profile, mask) if compacted else standard_size(profile, mask)


@requires("siglock")
def __xstate_request_perm(c: Cpu, permitted: int, requested: int, guest: bool) -> int:
    """__xstate_request_perm() (xstate.c, v6.16+): mask = permitted | requested (supervisor and
    software bits preserved, d8414603b29f); ksize compacted (if XCOMPACTED), usize standard of
    the user part; host requests must fit every existing sigaltstack; then store all three.
    Before v5.18 (versions row ``req_perm_adds``; variant ``req-perm-overwrites``) it stores
    ``requested`` as the permission."""
    if permitted & requested == requested:
        return 0
    system = c.m.system
    mask = permitted | requested
    ksize = xstate_calculate_size(c, mask & ~FPU_GUEST_PERM_LOCKED, system.xcompacted)
    usize = xstate_calculate_size(c, mask & XFEATURE_MASK_USER_SUPPORTED, False)
    if not guest:
        ret = validate_sigaltstack(c, usize)
        if ret:
            return ret
    leader = c.current.process.leader.fpu
    perm = leader.guest_perm if guest else leader.perm
    # Before v5.18 (req-perm-overwrites): the requested bits replace the permission.
    overwrites = system.runs_unfixed("req-perm-overwrites", "req_perm_adds")
    perm.state_perm = requested if overwrites else mask
    perm.state_size = ksize
    perm.user_state_size = usize
    return 0


def xstate_request_perm(c: Cpu, idx: int, guest: bool) -> int:
    """xstate_request_perm() (xstate.c): idx >= XFEATURE_MAX -> EINVAL; a facility not in
    xstate_prctl_req[] or not supported -> EOPNOTSUPP; already permitted -> 0 (lockless); a
    locked guest permission -> EBUSY; else __xstate_request_perm() under siglock."""
    if idx < 0 or idx >= XFEATURE_MAX:
        return -EINVAL
    requested = XSTATE_PRCTL_REQ.get(idx, 0)
    if not requested:
        return -EOPNOTSUPP
    if c.m.system.user.max_features & requested != requested:
        return -EOPNOTSUPP
    permitted = xstate_get_group_perm(c, guest)
    if permitted & requested == requested:
        return 0
    with siglock(c):
        permitted = xstate_get_group_perm(c, guest)
        if guest and permitted & FPU_GUEST_PERM_LOCKED:
            return -EBUSY
        return __xstate_request_perm(c, permitted, requested, guest)


@requires("task_context")
def fpu_xstate_prctl(c: Cpu, option: int, arg2: int) -> int:
    """fpu_xstate_prctl() (xstate.c): the five ARCH_*_XCOMP_* options of arch_prctl().

    GET_XCOMP_SUPP writes fpu_user_cfg.max_features | legacy_features to *arg2;
    GET_XCOMP_PERM and GET_XCOMP_GUEST_PERM write the group's permission masked to user
    features (never supervisor bits or FPU_GUEST_PERM_LOCKED); REQ_XCOMP_(GUEST_)PERM take a
    feature number in arg2. A bad pointer gives EFAULT; any other option EINVAL, as the two
    GUEST options are before v5.17 (versions row ``kvm_amx``: 980fe2fddcff added them).
    """
    system = c.m.system
    if option in (ARCH_GET_XCOMP_GUEST_PERM, ARCH_REQ_XCOMP_GUEST_PERM) \
            and not system.kernel_has("kvm_amx"):
        return -EINVAL
    if option == ARCH_GET_XCOMP_SUPP:
        return put_user_u64(c, arg2, system.user.max_features | system.user.legacy_features)
    if option == ARCH_GET_XCOMP_PERM:
        return put_user_u64(c, arg2, xstate_get_group_perm(c, False)
                            & XFEATURE_MASK_USER_SUPPORTED)
    if option == ARCH_GET_XCOMP_GUEST_PERM:
        return put_user_u64(c, arg2, xstate_get_group_perm(c, True)
                            & XFEATURE_MASK_USER_SUPPORTED)
    if option in (ARCH_REQ_XCOMP_PERM, ARCH_REQ_XCOMP_GUEST_PERM):
        return xstate_request_perm(c, arg2, option == ARCH_REQ_XCOMP_GUEST_PERM)
    return -EINVAL


def sys_arch_prctl(c: Cpu, option: int, arg2: int) -> KPath:
    """arch_prctl() -> do_arch_prctl_common() for the XCOMP options (the model knows no others:
    they are -EINVAL here as for any unknown option)."""
    if False:  # pragma: no cover - makes this a generator (a kernel path without yields)
        yield
    return fpu_xstate_prctl(c, option, arg2)


def fpu_lock_guest_permissions(c: Cpu) -> None:
    """fpu_lock_guest_permissions() (core.c): called by fpu_alloc_guest_fpstate() when KVM
    creates a vCPU; under siglock, FPU_GUEST_PERM_LOCKED is set in the group leader's
    guest_perm. Later ARCH_REQ_XCOMP_GUEST_PERM that would change it returns EBUSY."""
    with siglock(c):
        perm = c.current.process.leader.fpu.guest_perm
        perm.state_perm |= FPU_GUEST_PERM_LOCKED


# -- sigaltstack ----------------------------------------------------------------------------------


@requires("siglock")
def sigaltstack_size_valid(c: Cpu, ss_size: int) -> bool:
    """sigaltstack_size_valid() (arch/x86/kernel/signal.c, CONFIG_DYNAMIC_SIGFRAME).

    Without dynamic features and without strict checking, anything goes. Else fsize =
    max_frame_size - fpu_default_state_size + perm.__user_state_size, where
    fpu_default_state_size is fpu__get_fpstate_size() (max user size + 4 + 112 with
    IA32_EMULATION). ss_size > fsize passes; else strict rejects, and non-strict rejects only
    a group that has a dynamic feature permitted.
    """
    system = c.m.system
    if not system.fpu_state_size_dynamic and not system.strict_sigaltstack_size:
        return True
    leader = c.current.process.leader.fpu
    fsize = sigframe.get_sigframe_size(system) - sigframe.fpu__get_fpstate_size(system)
    fsize += leader.perm.user_state_size
    if ss_size > fsize:
        return True
    if system.strict_sigaltstack_size:
        return ss_size > fsize
    if leader.perm.state_perm & XFEATURE_MASK_USER_DYNAMIC:
        return ss_size > fsize
    return True


def on_sig_stack(t: object, sp: int) -> bool:
    """on_sig_stack() (include/linux/sched/signal.h): never with SS_AUTODISARM; else
    sas_ss_sp < sp <= sas_ss_sp + sas_ss_size (the stack grows down)."""
    if t.sas_ss_flags & SS_AUTODISARM:  # type: ignore[attr-defined]
        return False
    base, size = t.sas_ss_sp, t.sas_ss_size  # type: ignore[attr-defined]
    return sp > base and sp - base <= size


def do_sigaltstack(c: Cpu, ss_sp: int, ss_size: int, ss_flags: int) -> int:
    """do_sigaltstack() (kernel/signal.c) setting a new stack: EPERM while running on the
    current one; EINVAL for a mode other than 0, SS_ONSTACK, SS_DISABLE; nothing to do if
    unchanged; under the siglock: SS_DISABLE clears, else ss_size < MINSIGSTKSZ or
    !sigaltstack_size_valid() -> ENOMEM."""
    t = c.current
    if on_sig_stack(t, t.user_sp):
        return -EPERM
    mode = ss_flags & ~SS_AUTODISARM
    if mode not in (SS_DISABLE, SS_ONSTACK, 0):
        return -EINVAL
    if (t.sas_ss_sp, t.sas_ss_size, t.sas_ss_flags) == (ss_sp, ss_size, ss_flags):
        return 0
    ret = 0
    with siglock(c):
        if mode == SS_DISABLE:
            ss_size, ss_sp = 0, 0
        else:
            if ss_size < MINSIGSTKSZ:
                ret = -ENOMEM
            if not sigaltstack_size_valid(c, ss_size):
                ret = -ENOMEM
        if not ret:
            t.sas_ss_sp, t.sas_ss_size, t.sas_ss_flags = ss_sp, ss_size, ss_flags
    return ret


def sys_sigaltstack(c: Cpu, ss_sp: int, ss_size: int, ss_flags: int = 0) -> KPath:
    """sigaltstack(2) with a new stack (the old-stack output is not modelled)."""
    if False:  # pragma: no cover - makes this a generator (a kernel path without yields)
        yield
    return do_sigaltstack(c, ss_sp, ss_size, ss_flags)


# signal.py (frame sizes) builds on this module (on_sig_stack, do_sigaltstack): bound once here
# rather than imported at every call.
from fpstate.kernel.x86 import signal as sigframe  # noqa: E402
