"""Every size a runtime, sandbox or VMM author must get right on a CPU and kernel, each from the
kernel rule that produces it -- and, on this machine, measured.

The figures come from the models, never from formulas of this file:

- boot sizing (`fpstate.kernel.x86.xstate.fpu__init_system_xstate`): fpu_user_cfg and
  fpu_kernel_cfg default/max sizes;
- the signal code (`fpstate.kernel.x86.signal`): AT_MINSIGSTKSZ = get_sigframe_size(), and the
  frame's fx_sw_bytes.xstate_size = the task's fpstate->user_size (save_sw_bytes()) for a task
  without AMX permission, with it but tiles unused, and after the first AMX instruction grew its
  buffer (the machine model runs arch_prctl and the XFD #NM for it);
- sigaltstack (`fpstate.kernel.x86.xstate_prctl`): the smallest ss_size do_sigaltstack()
  accepts, without and with the permission (binary search over the model's syscall);
- ptrace (`fpstate.kernel.x86.regset`): the NT_X86_XSTATE regset size;
- KVM (`fpstate.kvm.x86.vcpu`): KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) of a VMM process without
  and with ARCH_REQ_XCOMP_GUEST_PERM.

`measure_host` answers the same questions on the real machine with the probes of
`fpstate.host` and says, for each figure it cannot measure, why. fpu_kernel_cfg.default_size,
which no user interface reports, is read back out of the task_struct slab cache
(`fpstate.host.task_size`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fpstate.errors import FpstateError, HostUnavailable
from fpstate.kernel.x86 import regset
from fpstate.kernel.x86 import signal as sg
from fpstate.kernel.x86 import xstate_prctl as xp
from fpstate.kernel.x86.sched import Machine
from fpstate.kernel.x86.versions import NEWEST, kernel_version
from fpstate.x86.cpuid import CpuidProfile

XTILE_DATA = 18
#: The JSON keys, in order; a dotted key is a member of a nested object.
KEYS: tuple[str, ...] = (
    "user_default_size", "user_max_size", "kernel_default_size", "kernel_max_size",
    "at_minsigstksz", "sigframe_xstate_size.no_perm", "sigframe_xstate_size.perm_unused",
    "sigframe_xstate_size.in_use", "sigaltstack_min.no_perm", "sigaltstack_min.perm",
    "ptrace_xstate_size", "kvm_xsave2_size.no_guest_perm", "kvm_xsave2_size.guest_perm",
)
ALTSTACK_SP = 0x1000_0000  #: far from the model's user stack: on_sig_stack() never holds


@dataclass(frozen=True, slots=True)
class Figure:
    """One size: the model's value and the rule it comes from; on the host, the measured value
    (None with ``how`` saying why it could not be measured)."""

    key: str
    value: int
    rule: str
    measured: int | None = None
    how: str = ""


@dataclass(frozen=True, slots=True)
class Sizes:
    cpu: str
    kernel: str
    figures: tuple[Figure, ...]

    def figure(self, key: str) -> Figure:
        for f in self.figures:
            if f.key == key:
                return f
        raise KeyError(key)

    def to_dict(self) -> dict[str, Any]:
        """The ``fpstate sizes --json`` object: exactly the keys of :data:`KEYS`, nested."""
        out: dict[str, Any] = {}
        for f in self.figures:
            top, _, sub = f.key.partition(".")
            if sub:
                out.setdefault(top, {})[sub] = f.value
            else:
                out[top] = f.value
        return out


def _errno(ret: int) -> str:
    return {0: "0", -95: "EOPNOTSUPP", -22: "EINVAL", -1: "EPERM", -16: "EBUSY",
            -28: "ENOSPC"}.get(ret, str(ret))


def _task(m: Machine, state: str) -> tuple[int, str]:
    """A task on CPU 0 of ``m`` in ``state`` (no_perm, perm_unused, in_use): its user_size and
    what happened on the way."""
    t = m.spawn("sizes")
    m.run(0, t)
    how = "a new process (fpstate_reset: fpu_user_cfg.default_size)"
    if state != "no_perm":
        ret = m.syscall(0, xp.sys_arch_prctl, xp.ARCH_REQ_XCOMP_PERM, XTILE_DATA)
        how = f"ARCH_REQ_XCOMP_PERM(XTILE_DATA) = {_errno(ret)}"
        if ret == 0 and state == "in_use":
            fault = m.user_write(0, XTILE_DATA)
            how += (", first AMX use: XFD #NM -> fpstate_realloc()" if fault is not None
                    else ", first AMX use: no #NM (XFD not armed)")
        elif ret:
            how += ": the task keeps its default buffer"
    return t.fpu.fpstate.user_size, how


def _smallest_altstack(accepted: Callable[[int], bool], hi: int = 1 << 24) -> int:
    """The smallest size accepted by a monotonic predicate (binary search over [0, hi])."""
    lo = 0
    if not accepted(hi):
        raise FpstateError(f"sigaltstack refuses even {hi} bytes")
    while lo < hi:
        mid = (lo + hi) // 2
        if accepted(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _model_altstack(m: Machine) -> int:
    def accepted(size: int) -> bool:
        ret = m.syscall(0, xp.sys_sigaltstack, ALTSTACK_SP, size, 0)
        return ret == 0

    return _smallest_altstack(accepted)


def _kvm_sizes(profile: CpuidProfile, kernel: str) -> tuple[int, int, str]:
    from fpstate.kernel.x86.sched import Machine as M
    from fpstate.kvm.x86.vcpu import Vmm, model_config, model_system

    system = model_system(profile, kernel=kernel)
    vmm = Vmm(M(system, 1), model_config(system))
    before = vmm.cap_xsave2()
    ret = vmm.arch_prctl(xp.ARCH_REQ_XCOMP_GUEST_PERM, XTILE_DATA)
    return before, vmm.cap_xsave2(), _errno(ret)


def compute_sizes(profile: CpuidProfile, kernel: str = NEWEST) -> Sizes:
    """Every figure of :data:`KEYS` from the models, for ``kernel`` booted on ``profile``."""
    kv = kernel_version(kernel).name
    m = Machine.boot(profile, kv, ncpus=1)
    s = m.system
    u, k = s.user, s.kernel
    figs = [
        Figure("user_default_size", u.default_size,
               "fpu_user_cfg.default_size: standard size of the default user features "
               "(XCR0 minus XFEATURE_MASK_USER_DYNAMIC), fpu__init_system_xstate()"),
        Figure("user_max_size", u.max_size,
               "fpu_user_cfg.max_size: standard size of XCR0 = CPUID.(0DH,0).EBX after XSETBV"),
        Figure("kernel_default_size", k.default_size,
               "fpu_kernel_cfg.default_size: every task's embedded fpstate ("
               + ("compacted" if s.xcompacted else "standard") + ", no dynamic or guest-only "
               "features)"),
        Figure("kernel_max_size", k.max_size,
               "fpu_kernel_cfg.max_size: 'context size is N bytes' at boot (XCR0|IA32_XSS, "
               + ("compacted)" if s.xcompacted else "standard)")),
        Figure("at_minsigstksz", sg.at_minsigstksz(s),
               "get_sigframe_size(): round_up(frame + 15 + max user size + 4"
               + (" + 112 (IA32_EMULATION)" if s.ia32_emulation else "") + " + 63, 16)"),
    ]
    for state in ("no_perm", "perm_unused", "in_use"):
        mm = Machine.boot(profile, kv, ncpus=1)
        size, how = _task(mm, state)
        sw = sg.save_sw_bytes(size, 0, False)
        figs.append(Figure(f"sigframe_xstate_size.{state}", sw.xstate_size,
                           f"save_sw_bytes(): xstate_size = fpstate->user_size; {how}"))
    for state, key in (("no_perm", "no_perm"), ("perm_unused", "perm")):
        mm = Machine.boot(profile, kv, ncpus=1)
        _, how = _task(mm, state)
        figs.append(Figure(f"sigaltstack_min.{key}", _model_altstack(mm),
                           "do_sigaltstack(): ss_size >= MINSIGSTKSZ (2048) and "
                           "sigaltstack_size_valid() (> max_frame_size - fpu_default_state_size "
                           f"+ perm.__user_state_size once a dynamic feature is permitted); {how}"))
    figs.append(Figure("ptrace_xstate_size", regset.regset_xstate_size(s),
                       "update_regset_xstate_info(): NT_X86_XSTATE is fpu_user_cfg.max_size"))
    before, after, how = _kvm_sizes(profile, kv)
    figs.append(Figure("kvm_xsave2_size.no_guest_perm", before,
                       "KVM_CAP_XSAVE2: max(4096, xstate_required_size(kvm_get_filtered_xcr0())"
                       ") without guest permission (dynamic features filtered out)"))
    figs.append(Figure("kvm_xsave2_size.guest_perm", after,
                       f"KVM_CAP_XSAVE2 after ARCH_REQ_XCOMP_GUEST_PERM(XTILE_DATA) = {how}"))
    assert tuple(f.key for f in figs) == KEYS
    return Sizes(profile.name, kv, tuple(figs))


# -- the real machine -----------------------------------------------------------------------------


def _measure(fn: Callable[[], int]) -> tuple[int | None, str]:
    try:
        return fn(), ""
    except HostUnavailable as e:
        return None, str(e)


def _host_altstack() -> int:
    from fpstate.host.sigaltstack import AltstackRequest, sigaltstack_errnos

    coarse = [1 << n for n in range(8, 21)]
    answers = sigaltstack_errnos([AltstackRequest(n) for n in coarse])
    hi = next((n for n, e in zip(coarse, answers, strict=True) if e == 0), None)
    if hi is None:
        raise HostUnavailable("sigaltstack refused every size up to 1 MiB")
    lo = hi // 2
    fine = list(range(lo, hi + 1))
    answers = sigaltstack_errnos([AltstackRequest(n) for n in fine])
    return next(n for n, e in zip(fine, answers, strict=True) if e == 0)


def _kernel_max_from_log() -> int:
    import re

    from fpstate.host.dmesg import host_fpu_lines

    for line in host_fpu_lines():
        m = re.search(r"context size is (\d+) bytes", line)
        if m:
            return int(m.group(1))
    raise HostUnavailable("no 'context size is N bytes' line in the kernel log")


def _after_perm_request(fn: Callable[[], int]) -> tuple[int, int]:
    """(errno of ARCH_REQ_XCOMP_PERM(XTILE_DATA), fn()) in a forked child that made the
    request first; ``fn`` may fork again (permissions are inherited at fork)."""
    import struct

    from fpstate.host.child import SYS, SharedMemory, raw_syscall, run_child

    shm = SharedMemory(16)

    def body() -> int:
        ret = raw_syscall(SYS["arch_prctl"], xp.ARCH_REQ_XCOMP_PERM, XTILE_DATA)
        struct.pack_into("<qq", shm.mem, 0, -ret, fn())
        return 0

    ex = run_child(body, 60)
    if ex.exit_code != 0:
        raise HostUnavailable(f"the permission probe child ended with {ex}")
    err, value = struct.unpack_from("<qq", shm.mem, 0)
    return err, value


def measure_host(predicted: Sizes, profile: CpuidProfile) -> Sizes:
    """``predicted`` (for the host profile and the running kernel) with every figure this
    machine can answer measured beside it."""
    from fpstate.host import auxv, ptrace, signals
    from fpstate.host.task_size import kernel_default_size

    def frame_size() -> int:
        run = signals.raise_signal()
        if run.frame is None:
            raise HostUnavailable("the signal handler never ran")
        return run.frame.sw_bytes.xstate_size

    def ptrace_size() -> int:
        return ptrace.ptrace_session().xstate.returned

    def kvm_size() -> int:
        from fpstate.host.kvm import open_kvm

        with open_kvm() as kvm:
            vm = kvm.create_vm()
            try:
                return vm.cap_xsave2()
            finally:
                vm.close()

    def frame_with_tiles() -> int:
        from fpstate.host.amx import raise_signal_with_tiles

        run, _ = raise_signal_with_tiles("in-use")
        frame = run.frame  # type: ignore[attr-defined]
        if frame is None:
            raise HostUnavailable("the signal handler never ran (tiles in use)")
        return int(frame.sw_bytes.xstate_size)

    frame = _measure(frame_size)

    def perm(fn: Callable[[], int], what: str) -> tuple[tuple[int | None, str], str]:
        try:
            err, value = _after_perm_request(fn)
        except HostUnavailable as e:
            return (None, str(e)), ""
        return (value, ""), f"{what} after ARCH_REQ_XCOMP_PERM(XTILE_DATA) = {_errno(-err)}"

    def guest_perm() -> tuple[tuple[int | None, str], str]:
        from fpstate.host.kvm import guest_permission_probe

        try:
            probe = guest_permission_probe(XTILE_DATA)
        except HostUnavailable as e:
            return (None, str(e)), ""
        return ((probe["cap_xsave2_after"], ""), "KVM_CAP_XSAVE2 after "
                f"ARCH_REQ_XCOMP_GUEST_PERM(XTILE_DATA) = {_errno(-probe['req_errno'])}")

    how = {
        "user_default_size": (frame, "sw_bytes.xstate_size of a real signal frame"),
        "user_max_size": (_measure(ptrace_size), "PTRACE_GETREGSET NT_X86_XSTATE length"),
        "kernel_default_size": (_measure(kernel_default_size),
                                "the task_struct cache's object size minus sizeof(struct "
                                "task_struct) and sizeof(struct fpu), plus sizeof(union "
                                "fpregs_state), from the kernel's BTF "
                                "(fpu__init_task_struct_size)"),
        "kernel_max_size": (_measure(_kernel_max_from_log), "the boot log's context size"),
        "at_minsigstksz": (_measure(auxv.at_minsigstksz), "getauxval(AT_MINSIGSTKSZ)"),
        "sigframe_xstate_size.no_perm": (frame, "sw_bytes.xstate_size of a real frame"),
        "sigframe_xstate_size.perm_unused": perm(frame_size, "sw_bytes.xstate_size"),
        "sigframe_xstate_size.in_use": (_measure(frame_with_tiles),
                                        "sw_bytes.xstate_size of a real frame raised after "
                                        "ARCH_REQ_XCOMP_PERM, LDTILECFG and TILELOADD of 8 "
                                        "tiles"),
        "sigaltstack_min.no_perm": (_measure(_host_altstack), "smallest ss_size sigaltstack() "
                                    "accepts (real syscalls in a child)"),
        "sigaltstack_min.perm": perm(_host_altstack, "smallest ss_size"),
        "ptrace_xstate_size": (_measure(ptrace_size), "PTRACE_GETREGSET NT_X86_XSTATE length"),
        "kvm_xsave2_size.no_guest_perm": (_measure(kvm_size),
                                          "KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) on a VM fd"),
        "kvm_xsave2_size.guest_perm": guest_perm(),
    }
    figs = []
    for f in predicted.figures:
        (value, why), method = how[f.key]
        figs.append(Figure(f.key, f.value, f.rule, value, method if value is not None else why))
    return Sizes(predicted.cpu, predicted.kernel, tuple(figs))
