"""The kernel's FPU data structures: struct fpstate, struct fpu, fpu_state_perm, fpu_guest.

Models arch/x86/include/asm/fpu/types.h (Linux v6.17, Kingxukai/linux 9b44fff6) and the masks of
arch/x86/include/asm/fpu/xstate.h, plus `FpuSystem`: the frozen boot-time facts the run-time model
reads (fpu_kernel_cfg, fpu_user_cfg, guest_default_cfg, init_fpstate.xfd, the CPU flags the
kernel's alternatives were patched for, build options, and the selected model variants).

Rules of this file:
- kernel structs are mutable (they are state); everything describing the system is frozen;
- field names are the kernel's, with the leading ``__`` of private fields turned into ``_``;
- the register image ``Fpstate.regs`` is a real ``bytearray`` in the kernel's format (compacted
  when XCOMPACTED), ``size`` bytes long: an XSAVE that would write past it is a model-detected
  kernel bug (`KernelBug`), which is how the seed-000 out-of-bounds write shows up;
- `KernelBug` is what the model raises where the kernel would WARN or corrupt memory; a caller's
  illegal request (a precondition the kernel states) raises `IllegalEvent` and changes nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fpstate.errors import FpstateError
from fpstate.kernel.x86.config import FpuStateConfig, VcpuFpuConfig
from fpstate.x86.cpuid import CpuidProfile
from fpstate.x86.xfeatures import (
    XCOMP_BV_COMPACTED_FORMAT,
    XFEATURE_MASK_APX,
    XFEATURE_MASK_AVX512,
    XFEATURE_MASK_BNDCSR,
    XFEATURE_MASK_BNDREGS,
    XFEATURE_MASK_CET_KERNEL,
    XFEATURE_MASK_CET_USER,
    XFEATURE_MASK_FPSSE,
    XFEATURE_MASK_LBR,
    XFEATURE_MASK_PASID,
    XFEATURE_MASK_PKRU,
    XFEATURE_MASK_PT,
    XFEATURE_MASK_XTILE,
    XFEATURE_MASK_XTILE_DATA,
    XFEATURE_MASK_YMM,
)

# -- masks of arch/x86/include/asm/fpu/xstate.h (64-bit kernel, v6.17) ----------------------------

XFEATURE_MASK_USER_SUPPORTED = (
    XFEATURE_MASK_FPSSE | XFEATURE_MASK_YMM | XFEATURE_MASK_AVX512 | XFEATURE_MASK_PKRU
    | XFEATURE_MASK_BNDREGS | XFEATURE_MASK_BNDCSR | XFEATURE_MASK_XTILE | XFEATURE_MASK_APX
)
#: PKRU is switched eagerly (switch_to, flush_thread), never by XRSTOR on the way to user space.
XFEATURE_MASK_USER_RESTORE = XFEATURE_MASK_USER_SUPPORTED & ~XFEATURE_MASK_PKRU
#: The only permission-gated, XFD-armed feature.
XFEATURE_MASK_USER_DYNAMIC = XFEATURE_MASK_XTILE_DATA
XFEATURE_MASK_GUEST_SUPERVISOR = XFEATURE_MASK_CET_KERNEL
XFEATURE_MASK_SUPERVISOR_SUPPORTED = (
    XFEATURE_MASK_PASID | XFEATURE_MASK_CET_USER | XFEATURE_MASK_GUEST_SUPERVISOR
)
XFEATURE_MASK_INDEPENDENT = XFEATURE_MASK_LBR
XFEATURE_MASK_SUPERVISOR_UNSUPPORTED = XFEATURE_MASK_PT
XFEATURE_MASK_SUPERVISOR_ALL = (
    XFEATURE_MASK_SUPERVISOR_SUPPORTED | XFEATURE_MASK_INDEPENDENT
    | XFEATURE_MASK_SUPERVISOR_UNSUPPORTED
)
#: RFBM of every restore of a task's fpstate (restore_fpregs_from_fpstate callers).
XFEATURE_MASK_FPSTATE = XFEATURE_MASK_USER_RESTORE | XFEATURE_MASK_SUPERVISOR_SUPPORTED
#: Features with space in the signal frame that may be left unwritten while in init state.
XFEATURE_MASK_SIGFRAME_INITOPT = XFEATURE_MASK_XTILE | XFEATURE_MASK_USER_DYNAMIC
#: Software bit in guest_perm.__state_perm: set by the first vCPU's fpstate allocation.
FPU_GUEST_PERM_LOCKED = 1 << 63

XFEATURE_MAX = 20
#: offsetof(struct fpstate, regs), 64-aligned: allocations are ksize + this.
FPSTATE_REGS_OFFSET = 64
#: sizeof(union fpregs_state): the embedded init_fpstate buffer is one page.
FPREGS_STATE_SIZE = 4096
#: sizeof(struct xregs_state): legacy area plus header, what init_fpstate_copy_size() copies.
XREGS_STATE_SIZE = 576
#: sizeof(struct fregs_state), the 32-bit fsave header of ia32 frames.
FREGS_STATE_SIZE = 112

# Thread flags and task flags used by the FPU code (include/linux/sched.h, thread_info.h).
PF_KTHREAD = 0x00200000
PF_USER_WORKER = 0x00004000
CLONE_VM = 0x00000100
CLONE_VFORK = 0x00004000
CLONE_THREAD = 0x00010000


class KernelBug(AssertionError):
    """The kernel as modelled would WARN, corrupt memory or lose state here.

    ``name`` is a stable identifier the checker reports (e.g. ``xsave-out-of-bounds``).
    """

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"{name}: {detail}")
        self.name = name
        self.detail = detail

    def __reduce__(self) -> tuple[type[KernelBug], tuple[str, str]]:
        """Picklable by its fields (an explorer worker's exception reaches the parent)."""
        return (type(self), (self.name, self.detail))


class IllegalEvent(FpstateError):
    """A model event that the kernel's stated preconditions forbid (wrong context, lock not
    held, task in the wrong state). Raised before anything changes."""


# -- model variants -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Variant:
    """A design the kernel rejected, kept as a selectable behaviour so the checker can show it
    is caught."""

    name: str
    function: str  #: the model function whose behaviour changes
    origin: str  #: the thread or commit that rejected it
    effect: str


VARIANTS: Mapping[str, Variant] = {v.name: v for v in (
    Variant("pasid-write-incoherent", "fpregs_update_current_xstate",
            "seed 004: fpu__pasid_write() v1 (Fenghua Yu, Sep 2021), NAKed by Andy Lutomirski",
            "writes the register whenever !TIF_NEED_FPU_LOAD or fpregs_state_valid(); with "
            "TIF_NEED_FPU_LOAD set the memory image is the truth, so the write is lost as soon "
            "as anything reloads from memory"),
    Variant("realloc-no-restore-userregs", "fpstate_realloc",
            "xstate.c fpstate_realloc(): the fpregs_restore_userregs() before the pointer swap",
            "swaps in the zeroed larger buffer while the state lives only in the old one; the "
            "next restore loads init state and the task's registers are lost"),
    Variant("ptrace-set-no-invalidate", "xstateregs_set",
            "regset.c fpu_force_restore(): 'Invalidate cached FPU registers before modifying'",
            "modifies a stopped task's fpstate without zapping last_cpu; if its registers are "
            "still cached on a CPU, the restore is skipped and the ptrace write is lost"),
    Variant("ia32-sigreturn-no-supervisor-save", "__fpu_restore_sig",
            "signal.c __fpu_restore_sig(): 'If supervisor states are available then save the "
            "hardware state in current's fpstate so that the supervisor state is preserved'",
            "a compat task's sigreturn marks the registers stale without saving them; the "
            "XRSTOR of every feature from the fpstate then restores the supervisor state "
            "(PASID, CET) of the last save, and a value written since is lost"),
    Variant("req-perm-overwrites", "__xstate_request_perm",
            "v5.16 and v5.17, fixed in v5.18 by 063452fd94d1 'x86/fpu/xstate: Fix the "
            "ARCH_REQ_XCOMP_PERM implementation' (Yang Zhong)",
            "the permission becomes the requested bits only: the default features it held are "
            "revoked, and ARCH_GET_XCOMP_PERM no longer reports them"),
    Variant("coredump-no-wait-inactive", "coredump_wait",
            "fs/coredump.c coredump_wait(): 'Wait for all the threads to become inactive, so "
            "that all the thread context (extended register state, like fpu etc) gets copied "
            "to the memory'",
            "collects the notes once the threads have been told to die, without waiting for "
            "them to be switched out: a thread still running in user mode on another CPU holds "
            "its state in that CPU's registers, and its core note shows its fpstate's older "
            "image"),
    Variant("ptrace-pkru-ignored", "xstateregs_set",
            "v5.14 to v6.1, fixed in v6.2 by 4a804c4f8356 'x86/fpu: Allow PKRU to be (once "
            "again) written by ptrace' (Kyle Huey)",
            "PTRACE_SETREGSET copies PKRU into the fpstate but not into thread.pkru, the only "
            "place PKRU is restored from: gdb's 'set $pkru = 42' is lost"),
    Variant("sigframe-under-user-pkru", "get_sigframe",
            "v4.9 to v6.11, fixed in v6.12 by 70044df250d0 'x86/pkeys: Update PKRU to enable "
            "all pkeys before XSAVE' (Aruna Ramakrishna)",
            "the signal frame is written under the interrupted code's PKRU: a sigaltstack "
            "protected by a key that code had closed cannot take it, and the signal becomes "
            "SIGSEGV"),
    Variant("pkru-sigframe-no-xstate-bv", "update_pkru_in_sigframe",
            "v6.12 'x86/pkeys: Update PKRU to enable all pkeys before XSAVE' (70044df250d0), "
            "fixed in v6.13 by ae6012d72fa6 'x86/pkeys: Ensure updated PKRU value is "
            "XRSTOR'd'",
            "stores the pre-signal PKRU in the frame without setting XSTATE_BV[PKRU]; XSAVE ran "
            "with PKRU = 0, which an AMD CPU tracks as initial, so the frame's XSTATE_BV[PKRU] "
            "is 0 and sigreturn's XRSTOR loads PKRU = 0 (every key open) instead"),
    Variant("exec-fpu-drop", "fpu_reset_fpstate_regs",
            "v5.14 to v6.4: 33344368cb08 'x86/fpu: Clean up the fpu__clear() variants', fixed "
            "in v6.5 (and stable) by 1f69383b203e 'x86/fpu: Invalidate FPU state correctly on "
            "exec()' (Rick Edgecombe)",
            "exec's reset calls fpu__drop(), which clears only this CPU's "
            "fpu_fpregs_owner_ctx and leaves fpu->last_cpu: an exec preempted before "
            "flush_thread() and migrated resets the image on the new CPU, and the old CPU, "
            "still owned by the task and named by last_cpu, holds the old program's registers "
            "as valid; back there, the new program starts with them"),
    Variant("cpu-up-keeps-owner", "cpu_down_up",
            "smpboot.c native_kick_ap(): 'the FPU context is blank, nobody can own it' (arm64's "
            "counterpart was fixed in 2015, 32365e64a20e: 'arm64: fix bug for reloading FPSIMD "
            "state after CPU hotplug')",
            "brings a CPU back without clearing its fpu_fpregs_owner_ctx: the last task that "
            "ran there, if it ran nowhere since, skips its restore and gets the registers INIT "
            "and FNINIT left (CET and x87 control reset)"),
    Variant("xfd-state-stale-on-online", "cpu_down_up",
            "v5.16 to v6.8: fpu__init_cpu_xstate() wrote IA32_XFD without its per-CPU cache; "
            "fixed in v6.9 by 10e4b5166df9 'x86/fpu: Keep xfd_state in sync with "
            "MSR_IA32_XFD' (CVE-2024-35801)",
            "after a CPU comes back, IA32_XFD arms AMX tile data while xfd_state still says "
            "disarmed: a task that uses AMX and ran there last is restored without the MSR "
            "write and XRSTOR takes #NM in the kernel (die)"),
    Variant("init-fpstate-by-xsaves", "setup_init_fpu_buf",
            "before f9dfb5e390fa 'x86/fpu: Make init_fpstate correct with optimized XSAVE' "
            "(Thomas Gleixner, v5.13, Cc stable)",
            "reads init_fpstate back with XSAVES, whose init optimisation writes nothing of "
            "the (all initial) components: FCW, MXCSR and MXCSR_MASK stay 0, and every copy "
            "that fills an absent x87 or SSE component from init_fpstate (PTRACE_GETREGSET, "
            "core dumps, KVM_GET_XSAVE2) shows those zeros"),
    Variant("xfd-state-stale-on-resume", "fpu__resume_cpu",
            "every kernel since 5.16 (672365477ae8): fpu__resume_cpu() writes IA32_XFD with "
            "wrmsrq() alone, missed by 10e4b5166df9's 'use it in all places that set "
            "MSR_IA32_XFD' (kernel-findings 10a; proposed fix resume_xfd_set_state)",
            "after resume from suspend the boot CPU's IA32_XFD is the suspending task's "
            "fpstate->xfd while xfd_state still holds the value of the last task restored "
            "there: the next task with that value is restored without the MSR write -- with "
            "AMX tile data, XRSTOR takes #NM in the kernel (die); with the MSR clear, a task "
            "without AMX permission can use AMX; with the autosleep worker current, 6.15+ "
            "dereferences the NULL x86_task_fpu() returns for a kernel thread under "
            "CONFIG_X86_DEBUG_FPU (kernel-findings 10d)"),
    Variant("pkru-lost-on-resume", "restore_processor_state",
            "every kernel since 5.14 ('x86/fpu: Don't restore PKRU in "
            "fpregs_restore_userspace()'): nothing writes PKRU back after resume "
            "(kernel-findings 10b; proposed fix resume_pkru)",
            "the boot CPU resumes with PKRU 0, its reset value; the task that suspended returns "
            "to user mode with it (the return restores every component but PKRU), every "
            "protection key open, and its next switch-out stashes 0 in thread.pkru"),
    Variant("uabi-mxcsr-by-ymm", "__copy_xstate_to_uabi_buf",
            "every kernel since 91c3dba7dbc1 'x86/fpu/xstate: Fix PTRACE frames for XSAVES' "
            "(2016) to 6.18 (kernel-findings 6; proposed fix mxcsr_by_format, Chang S. "
            "Bae's v3 of October 2022)",
            "copies MXCSR into the UABI image whenever the header has SSE or YMM: on a kernel "
            "that saves with XSAVES, a task whose SSE is initial while AVX is in use shows "
            "the MXCSR of SSE's last save (PTRACE_GETREGSET, core dumps, KVM_GET_XSAVE2), "
            "and a write-back of that buffer with SSE hands it to the task"),
    Variant("mxcsr-flip-keeps-xmm", "copy_uabi_to_xstate",
            "Chang S. Bae's v3 1/3 as posted (October 2022, not merged): the proposed fix "
            "mxcsr_by_format without the amendment mxcsr_flip_inits_xmm",
            "sets SSE in a compacted fpstate's XSTATE_BV for a non-default MXCSR whose header "
            "lacked SSE, without writing XMM0-15: XRSTORS gives the task the XMM values the "
            "fpstate last held instead of their initial zeros"),
    Variant("hardirq-fpu-in-fpregs-lock", "irq_fpu_usable",
            "before 59f5ede3bc0f 'x86/fpu: Prevent FPU state corruption' (v5.18; the "
            "condition dates back to 5d2bd7009f30, 2014)",
            "a hard interrupt that hit a fpregs_lock()ed section may take the FPU: its "
            "kernel_fpu_begin() saves and clobbers the registers the section is about to "
            "write to a signal frame or to activate as the task's after sigreturn's XRSTOR "
            "(or, in fpu_update_guest_xfd(), saves them while IA32_XFD and fps->xfd "
            "disagree)"),
    Variant("fpu-usable-before-init-cpu", "irq_fpu_usable",
            "before 2297554f01df 'x86/fpu: Fix irq_fpu_usable() to return false during CPU "
            "onlining' (Eric Biggers, 6.16 merge window): a per-CPU in_kernel_fpu that starts "
            "false; with 11d7956d526f's SIMD sha256() it oopsed in linux-next "
            "(next-20250515, Borislav Petkov's report)",
            "irq_fpu_usable() says yes on a CPU coming online before fpu__init_cpu(): AMD's "
            "microcode loader hashes its patch with SIMD code, and kernel_fpu_begin()'s LDMXCSR "
            "takes #UD (CR4.OSFXSR is still clear after INIT)"),
    Variant("guest-xfd-keeps-xstate-bv", "fpu_update_guest_xfd",
            "v5.17 (820a6ee944e7 'kvm: x86: Add emulation for IA32_XFD') to 6.18, fixed by "
            "b45f72177594 (January 2026, 6.19 and stable)",
            "a guest fpstate may hold XSTATE_BV[i] = 1 for a component its XFD arms: an "
            "interrupt's kernel_fpu_begin() saves the guest's registers between the exit of "
            "its WRMSR IA32_XFD and fpu_update_guest_xfd(), or a VMM's KVM_SET_XSAVE stores "
            "the bit; the next XRSTORS, with the guest's XFD in the MSR, takes #NM in the host "
            "(the WARN in exc_device_not_available())"),
    Variant("guest-xfd-host-write-keeps-xstate-bv", "fpu_update_guest_xfd",
            "b45f72177594 as merged (6.19 and stable; fpstate kvm-findings, session 34, "
            "proposed fix guest_xfd_host_write)",
            "fpu_update_guest_xfd() clears an armed component's XSTATE_BV bit only when "
            "current's TIF_NEED_FPU_LOAD is set: a VMM's KVM_SET_MSRS of a nonzero IA32_XFD "
            "outside KVM_RUN, with its own registers live, leaves the bit of the guest's tile "
            "data, and the next KVM_RUN's XRSTORS takes #NM in the host"),
    Variant("sigframe-magic2-at-user-size", "check_xstate_in_sigframe",
            "v6.15 to v6.17: dc8aa31a7ac2 'x86/fpu: Refine and simplify the magic number check "
            "during signal return', reverted by 44eeff9bc467 (7.1, and 6.18.y); what the model "
            "runs for kernel 6.15-6.17 anyway",
            "reads MAGIC2 at buf_fx + the *current* user_size and checks no xstate_size: a "
            "frame written before the task's fpstate grew (a handler's first AMX use) or "
            "written for a smaller xstate_size (CRIU, gVisor) is not restored"),
)}


# -- the boot-time configuration the model runs on ----------------------------------------------


#: struct fpu_state_config and struct vcpu_fpu_config are the boot model's dataclasses
#: (fpstate.kernel.x86.config); the run-time model keeps its short names for them.
StateConfig = FpuStateConfig
GuestConfig = VcpuFpuConfig


@dataclass(frozen=True, slots=True)
class FpuSystem:
    """The frozen facts of one booted kernel that the run-time model reads.

    Built from the boot sizing (`from_boot`); ``variants`` selects rejected designs by name
    (`VARIANTS`). ``ia32_emulation`` and ``strict_sigaltstack_size`` are the build options that
    change numbers userspace sees (max_frame_size, sigaltstack's check);
    ``sigframe_xstate_size_checks`` is the one run-time behaviour that differs between the
    kernels modelled (`sigframe_xstate_size_checks`).
    """

    profile: CpuidProfile
    kernel: StateConfig  #: fpu_kernel_cfg
    user: StateConfig  #: fpu_user_cfg
    guest: GuestConfig  #: guest_default_cfg
    init_xfd: int  #: init_fpstate.xfd
    xsave: bool
    xsaveopt: bool
    xsavec: bool
    xsaves: bool
    xgetbv1: bool
    xfd: bool
    ospke: bool
    fxsr: bool = True
    kernel_version: str = "6.18"
    mxcsr_feature_mask: int = 0x0000FFFF
    sigframe_xstate_size_checks: bool = True
    ia32_emulation: bool = True
    strict_sigaltstack_size: bool = False
    user_shadow_stack: bool = True
    variants: frozenset[str] = frozenset()
    #: Fixes applied by name (`fpstate.kernel.x86.versions.APPLICABLE_FIXES`: the proposed
    #: ones and those merged after the newest listed kernel): no listed kernel has them;
    #: `runs_unfixed` treats them as present.
    fixes: frozenset[str] = frozenset()
    #: The derived predicates below, computed once (the run-time model reads them at every
    #: save and restore; the facts they derive from are frozen).
    _derived: tuple[Any, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        unknown = set(self.variants) - set(VARIANTS)
        if unknown:
            raise FpstateError(
                f"unknown model variant(s) {', '.join(sorted(unknown))} "
                f"(known: {', '.join(VARIANTS)})")
        from fpstate.kernel.x86.versions import AMENDS, APPLICABLE_FIXES

        unknown = set(self.fixes) - APPLICABLE_FIXES
        if unknown:
            raise FpstateError(
                f"unknown fix(es) {', '.join(sorted(unknown))} "
                f"(known: {', '.join(sorted(APPLICABLE_FIXES))})")
        for amendment, base in AMENDS.items():
            if amendment in self.fixes and base not in self.fixes:
                raise FpstateError(f"proposed fix {amendment} amends {base}, which is not "
                                   f"applied")
        xcompacted = self.xsavec or self.xsaves
        supervisor = self.kernel.max_features & XFEATURE_MASK_SUPERVISOR_SUPPORTED
        xss = (supervisor | self.kernel.independent_features) if self.xsaves else 0
        if self.xsaves:
            xsave_insn = "XSAVES"
        elif self.xsavec:
            xsave_insn = "XSAVEC"
        else:
            xsave_insn = "XSAVEOPT" if self.xsaveopt else "XSAVE"
        object.__setattr__(self, "_derived", (
            xcompacted, self.init_xfd != 0, supervisor, self.user.max_features, xss, xsave_insn,
            "XRSTORS" if self.xsaves else "XRSTOR"))

    # The kernel's derived predicates, each named as in the kernel (computed in __post_init__).
    @property
    def xcompacted(self) -> bool:
        """X86_FEATURE_XCOMPACTED: forced when XSAVEC or XSAVES (fpu__init_system_xstate)."""
        return self._derived[0]  # type: ignore[no-any-return]

    @property
    def fpu_state_size_dynamic(self) -> bool:
        """fpu_state_size_dynamic(): the static key enabled iff init_fpstate.xfd != 0."""
        return self._derived[1]  # type: ignore[no-any-return]

    @property
    def xfeatures_mask_supervisor(self) -> int:
        """xfeatures_mask_supervisor() (kernel/fpu/xstate.h): fpu_kernel_cfg.max_features &
        XFEATURE_MASK_SUPERVISOR_SUPPORTED."""
        return self._derived[2]  # type: ignore[no-any-return]

    @property
    def xcr0(self) -> int:
        """XCR0 as fpu__init_cpu_xstate() writes it: fpu_user_cfg.max_features."""
        return self._derived[3]  # type: ignore[no-any-return]

    @property
    def xss(self) -> int:
        """IA32_XSS as fpu__init_cpu_xstate() writes it (independent features included), 0
        without XSAVES."""
        return self._derived[4]  # type: ignore[no-any-return]

    @property
    def xsave_insn(self) -> str:
        """The alternative os_xsave() was patched to: XSAVES > XSAVEC > XSAVEOPT > XSAVE."""
        return self._derived[5]  # type: ignore[no-any-return]

    @property
    def xrstor_insn(self) -> str:
        """The alternative os_xrstor() was patched to: XRSTORS if XSAVES, else XRSTOR."""
        return self._derived[6]  # type: ignore[no-any-return]

    def has_variant(self, name: str) -> bool:
        assert name in VARIANTS, f"unknown variant {name}"
        return name in self.variants

    def kernel_has(self, key: str) -> bool:
        """Whether the kernel this system runs has versions row ``key``
        (`KernelVersion.has`)."""
        from fpstate.kernel.x86.versions import running

        return running(self.kernel_version).has(key)

    def runs_unfixed(self, variant: str, fix: str) -> bool:
        """Whether the code of rejected design ``variant`` runs: selected, or this kernel
        predates ``fix``, the versions row of the commit that fixed it (a listed kernel that
        shipped the bug runs it), or ``fix`` is a proposed fix (versions.PROPOSED) this system
        was not given in ``fixes``."""
        if self.has_variant(variant):
            return True
        return fix not in self.fixes and not self.kernel_has(fix)

    def with_options(self, **changes: Any) -> FpuSystem:
        """A copy with some fields changed (e.g. ``variants={"pasid-write-incoherent"}``)."""
        from dataclasses import replace

        for key in ("variants", "fixes"):
            if key in changes:
                changes[key] = frozenset(changes[key])
        return replace(self, **changes)

    @classmethod
    def from_boot(cls, profile: CpuidProfile, boot: Any, **options: Any) -> FpuSystem:
        """The run-time facts of ``profile`` booted as ``boot``.

        ``boot`` is the `fpstate.kernel.x86.config.BootResult` of
        ``fpu__init_system_xstate(profile, kernel)``: fpu_kernel_cfg, fpu_user_cfg,
        guest_default_cfg, init_fpstate and the X86_FEATURE flags as boot_cpu_has() sees them
        (errata cleared, e.g. XSAVES on Zen1/2). ``options`` override build options and select
        ``variants``. FpstateError if the kernel runs without XSAVE (not modelled here).
        """
        if not boot.xsave_enabled:
            raise FpstateError(f"{profile.name}: kernel {boot.kernel} booted without XSAVE "
                               f"({boot.disabled}); the run-time model needs XSAVE")
        k, u, g = boot.fpu_kernel_cfg, boot.fpu_user_cfg, boot.guest_default_cfg
        kernel = StateConfig(k.max_size, k.default_size, k.max_features, k.default_features,
                             k.legacy_features, k.independent_features)
        user = StateConfig(u.max_size, u.default_size, u.max_features, u.default_features,
                           u.legacy_features, 0)
        # Before v6.17 there is no guest_default_cfg: guests used the kernel defaults.
        guest = (GuestConfig(g.size, g.features) if g is not None
                 else GuestConfig(k.default_size, k.default_features))
        caps = boot.caps
        facts: dict[str, Any] = dict(
            profile=profile, kernel=kernel, user=user, guest=guest,
            init_xfd=boot.init_fpstate.xfd, kernel_version=boot.kernel,
            xsave=True, xsaveopt=caps.has("XSAVEOPT"), xsavec=caps.has("XSAVEC"),
            xsaves=caps.has("XSAVES"), xgetbv1=caps.has("XGETBV1"), xfd=caps.has("XFD"),
            ospke=bool(u.max_features & XFEATURE_MASK_PKRU), fxsr=caps.has("FXSR"),
            mxcsr_feature_mask=mxcsr_feature_mask(profile),
            sigframe_xstate_size_checks=sigframe_xstate_size_checks(boot.kernel),
        )
        for key in ("variants", "fixes"):
            if key in options:
                options[key] = frozenset(options[key])
        facts.update(options)
        return cls(**facts)


def mxcsr_feature_mask(profile: CpuidProfile) -> int:
    """mxcsr_feature_mask as fpu__init_system_mxcsr() finds it: the MXCSR_MASK that FXSAVE
    writes. Every x86-64 CPU has DAZ (bit 6), hence 0xFFFF; CPUs with misaligned SSE mode
    (CPUID.80000001H:ECX[7], AMD) also allow MM, bit 17 (this host: 0x0002FFFF, host finding 8).
    """
    misalign_sse = (profile.cpuid(0x80000001)[2] >> 7) & 1
    return 0xFFFF | misalign_sse << 17


def sigframe_xstate_size_checks(kernel: str) -> bool:
    """Whether sigreturn's check_xstate_in_sigframe() validates fx_sw->xstate_size (at least
    576, at most the task's user_size, at most extended_size) and reads MAGIC2 at
    fpstate + xstate_size. True up to v6.14 and again after the revert 44eeff9bc467 (mainline
    7.1, backported to 6.18.y: this host's 6.18.44 measures it); False for v6.15..v6.17, where
    dc8aa31a7ac2 "x86/fpu: Refine and simplify the magic number check during signal return"
    reads MAGIC2 at fpstate + current's user_size and checks nothing else."""
    try:
        major, minor = (int(x) for x in kernel.split(".")[:2])
    except ValueError:
        return True
    return not ((6, 15) <= (major, minor) < (6, 18))


# -- the kernel structs -------------------------------------------------------------------------

_ALLOC_IDS = itertools.count(1)


@dataclass(slots=True, eq=False)
class Fpstate:
    """struct fpstate (types.h): a register image and what it is sized for.

    ``regs`` is the image itself (``size`` bytes, kernel format). ``ident`` names the allocation
    so the checker can tell buffers apart; ``freed`` marks a vfree()d buffer, which no one may
    touch again (use after free is a `KernelBug`).
    """

    size: int
    user_size: int
    xfeatures: int
    user_xfeatures: int
    xfd: int
    regs: bytearray
    is_valloc: bool = False
    is_guest: bool = False
    is_confidential: bool = False
    in_use: bool = False
    ident: int = field(default_factory=lambda: next(_ALLOC_IDS))
    freed: bool = False

    def check_alive(self, who: str) -> None:
        if self.freed:
            raise KernelBug("use-after-free", f"{who} touches fpstate #{self.ident} after vfree")

    @property
    def xstate_bv(self) -> int:
        """regs.xsave.header.xfeatures (XSTATE_BV)."""
        return int.from_bytes(self.regs[512:520], "little")

    @xstate_bv.setter
    def xstate_bv(self, value: int) -> None:
        self.regs[512:520] = value.to_bytes(8, "little")

    @property
    def xcomp_bv(self) -> int:
        """regs.xsave.header.xcomp_bv."""
        return int.from_bytes(self.regs[520:528], "little")

    @xcomp_bv.setter
    def xcomp_bv(self, value: int) -> None:
        self.regs[520:528] = value.to_bytes(8, "little")

    def __repr__(self) -> str:
        return (f"Fpstate(#{self.ident}, size={self.size}, xfeatures={self.xfeatures:#x}, "
                f"xfd={self.xfd:#x}, xstate_bv={self.xstate_bv:#x}"
                f"{', guest' if self.is_guest else ''}{', freed' if self.freed else ''})")


@dataclass(slots=True)
class FpuStatePerm:
    """struct fpu_state_perm: permitted features and the sizes they need (group leader's copy
    is authoritative; written under sighand->siglock)."""

    state_perm: int  #: __state_perm
    state_size: int  #: __state_size
    user_state_size: int  #: __user_state_size

    def copy(self) -> FpuStatePerm:
        return FpuStatePerm(self.state_perm, self.state_size, self.user_state_size)


@dataclass(slots=True, eq=False)
class Fpu:
    """struct fpu (types.h): one per task, allocated after task_struct since v6.15.

    ``last_cpu`` is -1 when no CPU's registers may hold a newer copy than memory.
    ``fpstate`` points at ``embedded`` (the kernel's ``__fpstate``, default-sized) or at a
    vzalloc()ed larger buffer after an XFD reallocation, or at a guest fpstate while KVM has
    it swapped in (``task_fpstate`` then keeps the task's own, the kernel's ``__task_fpstate``).
    """

    embedded: Fpstate
    fpstate: Fpstate
    perm: FpuStatePerm
    guest_perm: FpuStatePerm
    owner: str  #: a name for reports ("task 7 (a.out)")
    last_cpu: int = -1
    avx512_timestamp: int = 0
    task_fpstate: Fpstate | None = None

    def __repr__(self) -> str:
        return f"Fpu({self.owner}, last_cpu={self.last_cpu}, fpstate={self.fpstate!r})"


@dataclass(slots=True, eq=False)
class FpuGuest:
    """struct fpu_guest (types.h, v6.16+ without ``perm``): KVM's guest FPU container.

    Only the shape lives here; the guest FPU model (fpu_alloc_guest_fpstate & co.) is the KVM
    layer's. ``fpu_swap_kvm_fpstate`` in core.py swaps ``fpstate`` in and out.
    """

    xfeatures: int
    xfd_err: int
    uabi_size: int
    fpstate: Fpstate


def xstate_init_xcomp_bv(system: FpuSystem, fps: Fpstate, mask: int) -> None:
    """xstate_init_xcomp_bv() (kernel/fpu/xstate.h): XRSTORS needs XCOMP_BV = mask | bit 63."""
    if system.xcompacted:
        fps.xcomp_bv = mask | XCOMP_BV_COMPACTED_FORMAT


def user_visible_masks() -> dict[str, int]:
    """The xstate.h masks by kernel name, for reports and tests."""
    return {
        "XFEATURE_MASK_USER_SUPPORTED": XFEATURE_MASK_USER_SUPPORTED,
        "XFEATURE_MASK_USER_RESTORE": XFEATURE_MASK_USER_RESTORE,
        "XFEATURE_MASK_USER_DYNAMIC": XFEATURE_MASK_USER_DYNAMIC,
        "XFEATURE_MASK_SUPERVISOR_SUPPORTED": XFEATURE_MASK_SUPERVISOR_SUPPORTED,
        "XFEATURE_MASK_FPSTATE": XFEATURE_MASK_FPSTATE,
        "XFEATURE_MASK_SIGFRAME_INITOPT": XFEATURE_MASK_SIGFRAME_INITOPT,
    }
