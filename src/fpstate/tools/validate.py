"""Would the kernel take this blob? sigreturn, PTRACE_SETREGSET and KVM_SET_XSAVE, as the models
answer.

The verdict always comes from running the kernel and KVM models on a machine booted on the CPU
profile -- this file holds no kernel rule of its own:

- ``sigreturn``: the blob is written into a task's user memory as the fpstate of a signal
  frame and ``fpu__restore_sig()`` (fpstate.kernel.x86.signal) runs on it;
- ``sigreturn-ia32``: the same for the fpstate of a 32-bit program's frame (the 112-byte fsave
  header, then the XSAVE area), restored by a compat task through ``fpu__restore_sig(buf,
  ia32_frame)``: the frame goes through the task's fpstate and the header is folded in;
- ``ptrace``: a stopped tracee gets the blob through ``ptrace_regset(PTRACE_SETREGSET,
  NT_X86_XSTATE)`` (fpstate.kernel.x86.regset: xstateregs_set -> copy_uabi_to_xstate);
- ``kvm``: a VMM on the model creates a VM and a vCPU (with the leaf 0xD KVM supports, so that
  dynamic features are sized) and issues ``KVM_SET_XSAVE`` (fpstate.kvm.x86.x86:
  kvm_arch_vcpu_ioctl_set_xsave -> fpu_copy_uabi_to_guest_fpstate).

When the answer is a refusal the rule is named by asking the same models' smaller functions
which step refused (validate_user_xstate_header(), check_xstate_in_sigframe(), the XRSTOR of
the register model and the Fault it reports), in the kernel's order.

The receiving task matters: its fpstate's user_xfeatures decide what a header may hold. The
task is set up as ``default`` (a fresh process), ``perm`` (ARCH_REQ_XCOMP_PERM for tile data,
tiles not used yet: the buffer has not grown) or ``in-use`` (permission and a first AMX
instruction: the XFD #NM grew the buffer). ``auto`` picks ``in-use`` when the blob's header
names a dynamic feature (``perm`` for KVM: guest permission before the vCPU), else ``default``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from fpstate.errors import BlobError, FpstateError
from fpstate.kernel.x86 import regset
from fpstate.kernel.x86 import signal as sg
from fpstate.kernel.x86 import xstate_prctl as xp
from fpstate.kernel.x86.hw import PKRU
from fpstate.kernel.x86.sched import Machine, Task
from fpstate.kernel.x86.types import XFEATURE_MASK_USER_DYNAMIC
from fpstate.kernel.x86.versions import NEWEST
from fpstate.tools.blob import header_overrides
from fpstate.x86.cpuid import CpuidProfile
from fpstate.x86.xfeatures import (
    XFEATURE_MASK_FPSSE,
    XFEATURE_MASK_PKRU,
    XFEATURE_MASK_SSE,
    XFEATURE_MASK_YMM,
    XSAVE_HDR_OFFSET,
    mask_names,
)

PATHS: tuple[str, ...] = ("sigreturn", "sigreturn-ia32", "ptrace", "kvm")
TASKS: tuple[str, ...] = ("auto", "default", "perm", "in-use")
XTILE_DATA = 18
ERRNO = {0: "0", 14: "-EFAULT", 22: "-EINVAL", 3: "-ESRCH", 19: "-ENODEV", 1: "-EPERM"}


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer of one path: accepted or not, the kernel's result, the rule that decided."""

    path: str
    accepted: bool
    result: str  #: the syscall/ioctl result ("0", "-EINVAL") or sigreturn's ("SIGSEGV")
    rule: str  #: the kernel function and condition that decided
    detail: str
    task: str  #: how the receiving task was set up
    notes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "accepted": self.accepted, "result": self.result,
                "rule": self.rule, "detail": self.detail, "task": self.task,
                "notes": list(self.notes)}


def _xstate_bv(data: bytes) -> int:
    return int.from_bytes(data[XSAVE_HDR_OFFSET:XSAVE_HDR_OFFSET + 8], "little")


def _path(fn: Any) -> Any:
    """A kernel path running ``fn``: a plain function, or a kernel path itself (a generator
    whose preemption points are passed through)."""
    def path(c: Any, *args: Any) -> Any:
        result = fn(c, *args)
        if inspect.isgenerator(result):
            result = yield from result
        return result
    return path


def _errno(ret: int) -> str:
    return ERRNO.get(-ret, str(ret)) if ret <= 0 else str(ret)


def _header_detail(hdr: bytes, user_xfeatures: int) -> str:
    """What validate_user_xstate_header() saw: the three things it looks at, as facts."""
    xfeatures = int.from_bytes(hdr[0:8], "little")
    xcomp_bv = int.from_bytes(hdr[8:16], "little")
    parts = []
    if xfeatures & ~user_xfeatures:
        bad = xfeatures & ~user_xfeatures
        parts.append(f"XSTATE_BV {xfeatures:#x} has {mask_names(bad)} ({bad:#x}) outside the "
                     f"fpstate's user_xfeatures {user_xfeatures:#x}")
    if xcomp_bv:
        parts.append(f"XCOMP_BV is {xcomp_bv:#x}, not 0 (the UABI format is standard)")
    if any(hdr[16:64]):
        parts.append("reserved header bytes 16-63 are not zero")
    return "; ".join(parts)


# -- the receiving task ---------------------------------------------------------------------------


def _pick_task(task: str, data: bytes, path: str) -> str:
    if task not in TASKS:
        raise FpstateError(f"unknown task setup {task!r} (known: {', '.join(TASKS)})")
    if task != "auto":
        return task
    if _xstate_bv(data) & XFEATURE_MASK_USER_DYNAMIC:
        return "perm" if path == "kvm" else "in-use"
    return "default"


def _set_up(m: Machine, task: str, compat: bool = False) -> tuple[Task, list[str]]:
    """A running user task on CPU 0 in the state ``task`` names (of a 32-bit program when
    ``compat``)."""
    notes: list[str] = []
    t = m.spawn("receiver", compat=compat)
    m.run(0, t)
    if task in ("perm", "in-use"):
        ret = m.syscall(0, xp.sys_arch_prctl, xp.ARCH_REQ_XCOMP_PERM, XTILE_DATA)
        if ret:
            notes.append(f"ARCH_REQ_XCOMP_PERM(XTILE_DATA) = {_errno(ret)} on this CPU and "
                         "kernel: the task keeps its default buffer")
        elif task == "in-use":
            fault = m.user_write(0, XTILE_DATA)
            notes.append("first AMX use: " + ("no #NM (XFD not armed)" if fault is None
                                               else f"{fault.vector}, buffer grown"))
    fps = t.fpu.fpstate
    notes.append(f"receiving task: user_size {fps.user_size}, user_xfeatures "
                 f"{fps.user_xfeatures:#x}")
    return t, notes


# -- sigreturn ------------------------------------------------------------------------------------


def _place_frame(m: Machine, t: Task, data: bytes) -> int:
    span = max(len(data), t.fpu.fpstate.user_size + sg.FP_XSTATE_MAGIC2_SIZE) + 64
    addr = m.mmap(t, span)
    t.process.mm.write(addr, data)
    return addr


def validate_sigreturn(data: bytes, profile: CpuidProfile, kernel: str, task: str) -> Verdict:
    """fpu__restore_sig() of a frame whose fpstate is ``data`` (64-bit frame)."""
    m = Machine.boot(profile, kernel, ncpus=1)
    t, notes = _set_up(m, task)
    user_size = t.fpu.fpstate.user_size
    if len(data) < user_size + sg.FP_XSTATE_MAGIC2_SIZE:
        notes.append(f"the blob ({len(data)} bytes) is shorter than the task's user_size + 4 "
                     f"({user_size + 4}); zeros stand for the stack beyond it")
    addr = _place_frame(m, t, data)
    ok = m.syscall(0, _path(sg.fpu__restore_sig), addr)
    if ok:
        notes.extend(_pkru_notes(m, data))
        notes.extend(_mxcsr_notes(m, data, t.fpu.fpstate.user_xfeatures, ia32=False))
    # Which step decided: replay the steps of __fpu_restore_sig on a fresh machine.
    m2 = Machine.boot(profile, kernel, ncpus=1)
    t2, _ = _set_up(m2, task)
    addr2 = _place_frame(m2, t2, data)
    sw = m2.syscall(0, _path(sg.check_xstate_in_sigframe), addr2)
    fx_only = sw is not None and not sw.magic1
    if fx_only:
        notes.append("check_xstate_in_sigframe() rejected the software bytes (magic1, "
                     f"xstate_size or magic2; the task's user_size is {user_size}): the frame "
                     "is restored as FXSAVE-only (x87 and SSE; the rest goes to init)")
    if ok:
        return Verdict("sigreturn", True, "0", "fpu__restore_sig", "restored", task,
                       tuple(notes))
    if sw is None:
        return Verdict("sigreturn", False, "SIGSEGV", "check_xstate_in_sigframe",
                       "the software bytes cannot be read", task, tuple(notes))
    xrestore = sw.xfeatures & t2.fpu.fpstate.user_xfeatures
    fault = m2.syscall(0, _path(sg.__restore_fpregs_from_user), addr2,
                       t2.fpu.fpstate.user_xfeatures, xrestore, fx_only)
    insn = "FXRSTOR" if fx_only else f"XRSTOR (RFBM {xrestore:#x})"
    detail = f"{insn} from the frame faults: {fault}" if fault is not None else (
        "restore failed")
    return Verdict("sigreturn", False, "SIGSEGV",
                   "restore_fpregs_from_user: the hardware refuses the frame", detail, task,
                   tuple(notes))


def validate_sigreturn_ia32(data: bytes, profile: CpuidProfile, kernel: str,
                            task: str) -> Verdict:
    """fpu__restore_sig(buf, ia32_frame) of an ia32 frame whose fpstate is ``data``: the fsave
    header, then the XSAVE area at 112."""
    head = sg.FREGS_STATE_SIZE
    xsave = data[head:]
    m = Machine.boot(profile, kernel, ncpus=1)
    t, notes = _set_up(m, task, compat=True)
    user_size = t.fpu.fpstate.user_size
    if len(data) < head + user_size + sg.FP_XSTATE_MAGIC2_SIZE:
        notes.append(f"the blob ({len(data)} bytes) is shorter than 112 + the task's user_size "
                     f"+ 4 ({head + user_size + 4}); zeros stand for the stack beyond it")
    notes.extend(_fold_notes(data))
    addr = _place_frame(m, t, data + bytes(head))
    ok = m.syscall(0, _path(sg.fpu__restore_sig), addr, True)
    if ok:
        notes.extend(_pkru_notes(m, xsave))
        notes.extend(_mxcsr_notes(m, xsave, t.fpu.fpstate.user_xfeatures, ia32=True))
        return Verdict("sigreturn-ia32", True, "0", "fpu__restore_sig (ia32 frame)",
                       "restored, the fsave header folded in (convert_to_fxsr)", task,
                       tuple(notes))
    # Which step decided, in __fpu_restore_sig's order.
    m2 = Machine.boot(profile, kernel, ncpus=1)
    t2, _ = _set_up(m2, task, compat=True)
    addr2 = _place_frame(m2, t2, data + bytes(head))
    sw = m2.syscall(0, _path(sg.check_xstate_in_sigframe), addr2 + head)
    if sw is None:
        return Verdict("sigreturn-ia32", False, "SIGSEGV", "check_xstate_in_sigframe",
                       "the software bytes cannot be read", task, tuple(notes))
    if not sw.magic1:
        notes.append("check_xstate_in_sigframe() rejected the software bytes: the frame is "
                     "taken as FXSAVE-only (x87 and SSE; the rest goes to init)")
        mxcsr = int.from_bytes(xsave[24:28], "little")
        bad = mxcsr & ~m2.system.mxcsr_feature_mask
        if bad:
            return Verdict("sigreturn-ia32", False, "SIGSEGV",
                           "__fpu_restore_sig: MXCSR & ~mxcsr_feature_mask (x86-64)",
                           f"MXCSR {mxcsr:#x} sets {bad:#x}, outside the feature mask "
                           f"{m2.system.mxcsr_feature_mask:#x}", task, tuple(notes))
    else:
        fps = t2.fpu.fpstate
        ret = regset.copy_uabi_to_xstate(m2.system, fps, bytes(xsave[:fps.user_size]),
                                         [t2.thread_pkru])
        if ret:
            hdr = xsave[XSAVE_HDR_OFFSET:XSAVE_HDR_OFFSET + 64]
            detail = _header_detail(hdr, fps.user_xfeatures) or (
                f"MXCSR {int.from_bytes(xsave[24:28], 'little'):#x} outside the feature mask "
                f"{m2.system.mxcsr_feature_mask:#x}")
            return Verdict("sigreturn-ia32", False, "SIGSEGV",
                           "copy_sigframe_from_user_to_xstate -> copy_uabi_to_xstate",
                           f"{_errno(ret)}: {detail}", task, tuple(notes))
    return Verdict("sigreturn-ia32", False, "SIGSEGV",
                   "__fpu_restore_sig: os_xrstor_safe() of the folded state faults",
                   "the XRSTOR from the task's fpstate refused it", task, tuple(notes))


def _pkru_notes(m: Machine, xsave: bytes) -> list[str]:
    """After a restore on CPU 0 of ``m`` (OSPKE): when the frame's XSTATE_BV[PKRU] is clear and
    the PKRU the task got back is not the frame's PKRU word (XRSTOR loaded PKRU's initial 0;
    the ia32 path's copy_uabi_to_xstate set thread.pkru = 0 alike), say so: the frame the
    v6.12 kernel wrote on AMD, or one built by hand."""
    s = m.system
    if not s.ospke or len(xsave) < XSAVE_HDR_OFFSET + 8:
        return []
    xstate_bv = int.from_bytes(xsave[XSAVE_HDR_OFFSET:XSAVE_HDR_OFFSET + 8], "little")
    off = s.profile.component(PKRU).offset
    word = int.from_bytes(xsave[off:off + 4], "little") if len(xsave) >= off + 4 else 0
    got = int.from_bytes(m.cpus[0].regs.component(PKRU)[:4], "little")
    if xstate_bv & XFEATURE_MASK_PKRU or got == word:
        return []
    keys = " (every protection key open)" if got == 0 else ""
    return [f"XSTATE_BV[PKRU] is 0: sigreturn loads PKRU = {got:#x}{keys}, not the frame's "
            f"PKRU word {word:#010x}; update_pkru_in_sigframe() sets the bit since v6.13 "
            f"(ae6012d72fa6), as a frame written by hand must"]


def _mxcsr_notes(m: Machine, xsave: bytes, user_xfeatures: int, *, ia32: bool) -> list[str]:
    """After a restore on CPU 0 of ``m``: when the MXCSR the task got back is not the frame's
    (bytes 24..27), say why, from the frame's bytes (kernel-findings 3a and 4): the 64-bit
    path's init_fpstate restore of what the frame leaves out, or the ia32 path's
    copy_uabi_to_xstate() and compacted restore."""
    word = int.from_bytes(xsave[24:28], "little")
    got = m.cpus[0].regs.mxcsr
    if got == word:
        return []
    sw = sg.FpxSwBytes.unpack(xsave[sg.SW_BYTES_OFFSET:sg.SW_BYTES_OFFSET + sg.SW_BYTES_SIZE])
    fx_only = sw.magic1 != sg.FP_XSTATE_MAGIC1
    bv = int.from_bytes(xsave[XSAVE_HDR_OFFSET:XSAVE_HDR_OFFSET + 8], "little")
    head = f"sigreturn loads MXCSR = {got:#x}, not the frame's {word:#x}: "
    if not ia32:
        init_bv = user_xfeatures & ~(XFEATURE_MASK_FPSSE if fx_only
                                     else sw.xfeatures & user_xfeatures)
        return [head + f"init_fpstate's restore of the components the frame does not restore "
                f"({mask_names(init_bv)}) loads its MXCSR "
                + ("(SSE among them)" if init_bv & XFEATURE_MASK_SSE else
                   "(YMM, in the standard form of a kernel without XSAVES/XSAVEC)")]
    if not bv & (XFEATURE_MASK_FPSSE | XFEATURE_MASK_YMM):
        return [head + "copy_uabi_to_xstate() copies MXCSR only with x87, SSE or YMM in "
                "XSTATE_BV, so the task's fpstate kept its own"]
    return [head + "XSTATE_BV has no SSE, and the restore of the task's compacted fpstate "
            "(XRSTORS, or XRSTOR in the compacted form) then sets MXCSR to 1F80H, where a "
            "64-bit frame's would be loaded"]


def _fold_notes(data: bytes) -> list[str]:
    """What convert_to_fxsr() changes of the FXSAVE area: the header's x87 state wins."""
    changed = header_overrides(data)
    if not changed:
        return []
    return ["the fsave header overrides the FXSAVE area's " + ", ".join(changed)
            + " (convert_to_fxsr)"]


# -- ptrace ---------------------------------------------------------------------------------------


def validate_ptrace(data: bytes, profile: CpuidProfile, kernel: str, task: str) -> Verdict:
    """PTRACE_SETREGSET(NT_X86_XSTATE) of ``data`` (iov_len = its length) on a stopped tracee."""
    m = Machine.boot(profile, kernel, ncpus=1)
    t, notes = _set_up(m, task)
    tracer = m.spawn("tracer")
    m.run(0, tracer)
    m.stop(t)
    full = regset.regset_xstate_size(m.system)
    hdr = data[XSAVE_HDR_OFFSET:XSAVE_HDR_OFFSET + 64]
    header_ok = len(hdr) == 64 and regset.validate_user_xstate_header(hdr, t.fpu.fpstate)
    ret, _ = m.syscall(0, _path(regset.ptrace_regset), t, regset.PTRACE_SETREGSET,
                       regset.NT_X86_XSTATE, len(data), data)
    if len(data) > full:
        notes.append(f"iov_len {len(data)} is clamped to the regset size {full} "
                     "(ptrace_regset): the bytes beyond are ignored")
    result = _errno(ret)
    if ret == 0:
        return Verdict("ptrace", True, result, "xstateregs_set", "accepted", task, tuple(notes))
    if ret == -regset.EINVAL and len(data) % 8:
        rule, detail = ("ptrace_regset: iov_len must be a multiple of the regset unit (8)",
                        f"iov_len {len(data)}")
    elif ret == -regset.EFAULT and min(len(data), full) != full:
        rule, detail = ("xstateregs_set: count must be fpu_user_cfg.max_size",
                        f"{len(data)} bytes, the regset is {full}")
    elif ret == -regset.EFAULT:
        rule, detail = ("copy_uabi_to_xstate: a component of the header lies beyond the "
                        "buffer", f"{len(data)} bytes")
    elif not header_ok:
        rule = "copy_uabi_to_xstate -> validate_user_xstate_header"
        detail = _header_detail(hdr, t.fpu.fpstate.user_xfeatures)
    else:
        mxcsr = int.from_bytes(data[24:28], "little")
        rule = "copy_uabi_to_xstate: MXCSR reserved bits (mxcsr_feature_mask)"
        detail = (f"MXCSR {mxcsr:#x}, mxcsr_feature_mask {m.system.mxcsr_feature_mask:#x} "
                  "(checked when the header has FP, SSE or YMM)")
    return Verdict("ptrace", False, result, rule, detail, task, tuple(notes))


# -- KVM ------------------------------------------------------------------------------------------


def validate_kvm(data: bytes, profile: CpuidProfile, kernel: str, task: str) -> Verdict:
    """KVM_SET_XSAVE of ``data`` on a new vCPU of a VMM on the model (vmx vendor module)."""
    from fpstate.kvm.x86.vcpu import model_vmm

    if kernel != NEWEST:
        raise FpstateError(f"the KVM model is of kernel {NEWEST}; --kernel {kernel} applies to "
                           "sigreturn and ptrace only")
    notes: list[str] = []
    vmm = model_vmm(profile)
    if task in ("perm", "in-use"):
        ret = vmm.arch_prctl(xp.ARCH_REQ_XCOMP_GUEST_PERM, XTILE_DATA)
        notes.append(f"ARCH_REQ_XCOMP_GUEST_PERM(XTILE_DATA) = {_errno(ret)} before the vCPU")
    vm = vmm.create_vm()
    vcpu = vmm.create_vcpu(vm)
    ret = vmm.set_cpuid2(vcpu, vmm.supported_cpuid_0xd())
    if ret:
        notes.append(f"KVM_SET_CPUID2 with the supported leaf 0xD = {_errno(ret)}")
    gfpu = vcpu.arch.guest_fpu
    size, caps = gfpu.uabi_size, vmm.kvm.caps
    notes.append(f"guest_fpu.uabi_size {size}, kvm_caps.supported_xcr0 "
                 f"{caps.supported_xcr0:#x}, guest fpstate user_xfeatures "
                 f"{gfpu.fpstate.user_xfeatures:#x}")
    hdr = data[XSAVE_HDR_OFFSET:XSAVE_HDR_OFFSET + 64]
    header_ok = regset.validate_user_xstate_header(hdr, gfpu.fpstate)
    ret = vmm.set_xsave(vcpu, data)
    if len(data) > size:
        notes.append(f"KVM_SET_XSAVE reads uabi_size = {size} bytes; the {len(data) - size} "
                     "bytes beyond are never looked at")
    result = _errno(ret)
    if ret == 0:
        return Verdict("kvm", True, result, "kvm_arch_vcpu_ioctl_set_xsave", "accepted", task,
                       tuple(notes))
    xstate_bv = _xstate_bv(data) if len(data) >= XSAVE_HDR_OFFSET + 8 else 0
    if ret == -regset.EFAULT:
        rule, detail = ("KVM_SET_XSAVE: memdup_user of guest_fpu.uabi_size bytes",
                        f"{len(data)} bytes offered, {size} read")
    elif xstate_bv & ~caps.supported_xcr0:
        bad = xstate_bv & ~caps.supported_xcr0
        rule = "fpu_copy_uabi_to_guest_fpstate: XSTATE_BV outside kvm_caps.supported_xcr0"
        detail = f"{mask_names(bad)} ({bad:#x})"
    elif not header_ok:
        rule = "copy_uabi_to_xstate -> validate_user_xstate_header"
        detail = _header_detail(hdr, gfpu.fpstate.user_xfeatures)
    else:
        mxcsr = int.from_bytes(data[24:28], "little")
        rule = "copy_uabi_to_xstate: MXCSR reserved bits (mxcsr_feature_mask)"
        detail = f"MXCSR {mxcsr:#x}"
    return Verdict("kvm", False, result, rule, detail, task, tuple(notes))


def validate(data: bytes, profile: CpuidProfile, path: str, *, kernel: str = NEWEST,
             task: str = "auto") -> Verdict:
    """The verdict of ``path`` on ``data`` for a machine booted on ``profile``."""
    if path not in PATHS:
        raise FpstateError(f"unknown path {path!r} (known: {', '.join(PATHS)})")
    if len(data) < XSAVE_HDR_OFFSET + 64:
        raise BlobError(f"blob is {len(data)} bytes; every path reads a 576-byte XSAVE area")
    if path == "sigreturn-ia32" and len(data) < sg.FREGS_STATE_SIZE + XSAVE_HDR_OFFSET + 64:
        raise BlobError(f"blob is {len(data)} bytes; an ia32 frame's fpstate is the 112-byte "
                        "fsave header and at least a 576-byte XSAVE area")
    xsave = data[sg.FREGS_STATE_SIZE:] if path == "sigreturn-ia32" else data
    chosen = _pick_task(task, xsave, path)
    fn = {"sigreturn": validate_sigreturn, "sigreturn-ia32": validate_sigreturn_ia32,
          "ptrace": validate_ptrace, "kvm": validate_kvm}[path]
    return fn(bytes(data), profile, kernel, chosen)
