"""Kernel versions of the x86 FPU code, and every place their behaviour differs.

Models the history of arch/x86/kernel/fpu/xstate.c, arch/x86/include/asm/fpu/xstate.h and
types.h from v5.16 (the first kernel with ``struct fpu_state_config``, AMX and XFD) to v6.18,
of the run-time FPU code where a listed kernel shipped a bug the model knows (fpu/core.c
irq_fpu_usable(), exec's reset, fpu__init_cpu()'s xfd_state, arch_prctl()'s permission grant,
ptrace's PKRU, the signal frame's PKRU; `FpuSystem.runs_unfixed`), of the SHA-256 library a
CPU coming online uses, of the suspend/resume path (`fpstate.kernel.x86.power`:
:data:`PROPOSED` fixes no release has), of the generic code a core's FPU notes pass through
(fs/coredump.c, and the scheduler's wait_task_inactive() that coredump_wait() calls), and of
KVM only in whether it offers guests AMX (row ``kvm_amx``: the KVM model is otherwise v6.18's).
Each difference is one row of :data:`CHANGES`: a key, the first listed version that has it,
and the commit (or tip/stable/list mail) it comes from. A :class:`KernelVersion` is a name
plus the set of keys it has; everything version-dependent asks ``kernel.has(KEY)``, never
compares version numbers.

Rules of this file:
- a version is listed where behaviour changes, plus the LTS names people ask for (6.1, 6.6,
  6.12); a kernel between two listed versions behaves as the earlier one;
- a change is dated by the mainline release that first carried it; stable backports (erratum
  1386 and the LBR/IA32_XSS fix reached older LTS trees) are noted in the row, not modelled;
- the kernel is a 64-bit build with a distribution configuration
  (CONFIG_X86_INTEL_MEMORY_PROTECTION_KEYS=y, so X86_FEATURE_OSPKE is set whenever the CPU has
  PKU: setup_pku() runs before fpu__init_system() since v6.5).

Facts were read in these copies: Kingxukai/linux (~v6.17, xstate.c/init.c/cpuid-deps.c),
gregkh/linux (~v6.16), a v5.16-era xstate.c, and tip-bot2/stable mails for each commit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fpstate.errors import FpstateError


@dataclass(frozen=True, slots=True)
class Change:
    """One behaviour difference: ``key`` holds from mainline ``since`` on."""

    key: str
    since: str
    origin: str  #: commit id and subject, or the mail it was read in
    summary: str


CHANGES: tuple[Change, ...] = (
    Change("hardirq_fpu_checks_bh", "5.18",
           "59f5ede3bc0f x86/fpu: Prevent FPU state corruption (Thomas Gleixner, May 2022, "
           "Cc stable, e.g. 5.10.180; reported by Filipe Manana once random.c used BLAKE2s in "
           "hard interrupts)",
           "irq_fpu_usable() in a hard interrupt is true only if softirq_count() is 0, i.e. the "
           "interrupt did not hit a fpregs_lock()ed section (before: !in_interrupt() || "
           "interrupted_user_mode() || interrupted_kernel_fpu_idle(), true there too, so the "
           "handler's kernel_fpu_begin() saved and clobbered registers the section was using; "
           "variant hardirq-fpu-in-fpregs-lock)"),
    Change("kvm_amx", "5.17",
           "980fe2fddcff x86/fpu: Extend fpu_xstate_prctl() with guest permissions, with the "
           "KVM AMX series of Jing Liu and Yang Zhong it opens (January 2022, merged for "
           "v5.17: 820a6ee944e7 kvm: x86: Add emulation for IA32_XFD, XCR0 and CPUID support "
           "for AMX)",
           "arch_prctl() knows ARCH_GET_XCOMP_GUEST_PERM and ARCH_REQ_XCOMP_GUEST_PERM, and KVM "
           "offers guests AMX: KVM_SUPPORTED_XCR0 has XTILE_CFG and XTILE_DATA, kvm_cpu_caps "
           "CPUID.(0DH,1):EAX[4] (XFD), so a guest may have IA32_XFD and IA32_XFD_ERR (before: "
           "the two options are -EINVAL, and a guest's CPUID and XCR0 have no AMX and no XFD; "
           "KVM's other code is v6.18's at every version)"),
    Change("req_perm_adds", "5.18",
           "063452fd94d1 x86/fpu/xstate: Fix the ARCH_REQ_XCOMP_PERM implementation (Yang "
           "Zhong, x86-urgent of April 2022, Cc stable; backports not modelled)",
           "__xstate_request_perm() stores permitted | requested as the permission (before: the "
           "requested bits alone, so a grant revoked the default features and "
           "ARCH_GET_XCOMP_PERM stopped reporting them; variant req-perm-overwrites)"),
    Change("xcompacted_xsavec", "5.19",
           "8ad7e8f69695 x86/fpu/xsave: Support XSAVEC in the kernel",
           "X86_FEATURE_XCOMPACTED = XSAVEC || XSAVES (before: compacted only with XSAVES); "
           "supervisor features masked out of max_features when XSAVES is absent"),
    Change("coredump_wait_task_any", "6.1",
           "f9fc8cad9728 sched: Add TASK_ANY for wait_task_inactive() (with 9204a97f7ae8 "
           "sched: Change wait_task_inactive()s match_state; Peter Zijlstra's freezer series)",
           "coredump_wait()'s wait_task_inactive(TASK_ANY) returns 0 at once for a thread "
           "still on its CPU in TASK_RUNNING (before: match_state 0 waited whatever the "
           "state), so the last thread to reach coredump_task_exit() can be dumped before its "
           "registers are saved (docs/findings/kernel-findings.md 9j)"),
    Change("warn_with_reason", "6.1",
           "48280042f2c6 XSTATE_WARN_ON() takes a reason (Andrew Cooper, mainline 6.0)",
           "'XSAVE consistency problem: <reason>' instead of '..., dumping leaves'"),
    Change("init_fpstate_default", "6.1",
           "d3e021adac7c x86/fpu: Fix the init_fpstate size check with the actual size; "
           "x86/fpu: Exclude dynamic states from init_fpstate",
           "init_fpstate sized for the kernel default features and checked against its 4096-byte "
           "buffer in fpu__init_system_xstate() (before: max features, and "
           "is_supported_xstate_size() on the default size in init_xstate_size())"),
    Change("ptrace_pkru_to_thread", "6.2",
           "4a804c4f8356 x86/fpu: Allow PKRU to be (once again) written by ptrace (Kyle Huey, "
           "January 2023, Cc stable; backports not modelled)",
           "PTRACE_SETREGSET(NT_X86_XSTATE) puts the buffer's PKRU into thread.pkru, which the "
           "return to user mode loads (before, since v5.14: into the fpstate only, where no "
           "restore reads PKRU, so a debugger's write was lost; variant ptrace-pkru-ignored)"),
    Change("erratum_1386", "6.3",
           "x86/amd: Work around Erratum 1386 - XSAVES malfunction on context switch "
           "(Andrew Cooper, March 2023; backported to stable)",
           "X86_FEATURE_XSAVES cleared on AMD family 0x17 (Zen1/Zen2)"),
    Change("exec_invalidates_fpregs", "6.5",
           "1f69383b203e x86/fpu: Invalidate FPU state correctly on exec() (Rick Edgecombe, "
           "August 2023, Cc stable; fixes 33344368cb08 of v5.14)",
           "fpu_reset_fpregs() zaps fpu->last_cpu (__fpu_invalidate_fpregs_state) where it "
           "called fpu__drop(), which only clears this CPU's fpu_fpregs_owner_ctx: an exec "
           "moved to another CPU before flush_thread() could return to the old CPU's copy of "
           "the old program's registers (variant exec-fpu-drop)"),
    Change("cet_user", "6.6",
           "x86/fpu/xstate: Introduce CET MSR and XSAVES supervisor states (Rick Edgecombe)",
           "XFEATURE_CET_USER gated on SHSTK and in SUPERVISOR_SUPPORTED; names for 11/12; "
           "SHSTK depends on XSAVES; XCHECK_SZ names the feature with xfeature_names[]"),
    Change("pkru_ospke", "6.6",
           "18032b47adf1 x86/fpu/xstate: Fix PKRU covert channel",
           "XFEATURE_PKRU gated on X86_FEATURE_OSPKE instead of X86_FEATURE_PKU"),
    Change("xfd_state_synced", "6.9",
           "10e4b5166df9 x86/fpu: Keep xfd_state in sync with MSR_IA32_XFD (Adamos Ttofari, "
           "March 2024; CVE-2024-35801, stable 6.1.84, 6.6.24, 6.7.12, 6.8.3)",
           "fpu__init_cpu_xstate() writes IA32_XFD with xfd_set_state(), the per-CPU cache "
           "xfd_state with it (before: the MSR alone, so after a CPU came back online "
           "xfd_update_state() could skip the write a task's AMX state needs and XRSTOR took "
           "#NM in the kernel; variant xfd-state-stale-on-online). fpu__resume_cpu() still "
           "writes the MSR alone (proposed fix resume_xfd_set_state)"),
    Change("independent_enumerated", "6.11",
           "2848ff28d180 x86/fpu: Avoid writing LBR bit to IA32_XSS unless supported",
           "fpu_kernel_cfg.independent_features = enumerated & LBR; IA32_XSS gets LBR only when "
           "the CPU enumerates it (before: whenever X86_FEATURE_ARCH_LBR)"),
    Change("sigframe_pkru_opened", "6.12",
           "70044df250d0 x86/pkeys: Update PKRU to enable all pkeys before XSAVE (Aruna "
           "Ramakrishna, tip x86/urgent, 6.12)",
           "signal delivery opens every key (PKRU = 0) while it writes the frame, then stores "
           "the interrupted code's PKRU in the frame (before, since v4.9: the frame was written "
           "under that PKRU, and a sigaltstack behind a key it had closed made the signal a "
           "SIGSEGV; variant sigframe-under-user-pkru)"),
    Change("xsave_layout_note", "6.12",
           "ba386777a30b x86/elf: Add a new FPU buffer layout info to x86 core files "
           "(Vignesh Balasubramanian; tip x86/fpu, pulled for 6.12)",
           "core dumps end their notes with NT_X86_XSAVE_LAYOUT (type, size, standard offset, "
           "flags of each extended user feature); zero records abort the dump's memory "
           "(c8161e5304ab fixes it in 6.19, with stable backports; not modelled)"),
    Change("sigframe_pkru_xstate_bv", "6.13",
           "ae6012d72fa6 x86/pkeys: Ensure updated PKRU value is XRSTOR'd (Aruna Ramakrishna, "
           "December 2024, Cc stable)",
           "update_pkru_in_sigframe() also sets XSTATE_BV[PKRU] in the frame (before, in v6.12: "
           "the value only, which sigreturn ignores where XSAVE found PKRU = 0 in its initial "
           "configuration; variant pkru-sigframe-no-xstate-bv)"),
    Change("x86_task_fpu_kthread_warn", "6.15",
           "22aafe3bcb67 x86/fpu: Remove init_task FPU state dependencies, add debugging "
           "warning for PF_KTHREAD tasks (Ingo Molnar, 6.15 merge window)",
           "x86_task_fpu() of a PF_KTHREAD task WARNs and returns NULL under "
           "CONFIG_X86_DEBUG_FPU (before: &task->thread.fpu, which every task has); "
           "fpu__resume_cpu() dereferences it when a kernel thread -- the autosleep "
           "workqueue's worker -- suspends the machine (kernel-findings 10d)"),
    Change("apx", "6.16",
           "x86/fpu/apx series (Chang S. Bae): XFEATURE_APX, APX/MPX conflict check, "
           "xfeature_uncompact_order[]",
           "APX gated on X86_FEATURE_APX and user-supported; 'Both APX/MPX present' disables "
           "XSAVE; standard sizes walk components by offset"),
    Change("sha256_simd", "6.16",
           "11d7956d526f crypto: x86/sha256 - implement library instead of shash (Eric "
           "Biggers, 6.16 merge window)",
           "the library's sha256() runs SHA-NI/AVX2/SSSE3 code between kernel_fpu_begin() and "
           "kernel_fpu_end() whenever crypto_simd_usable(), i.e. irq_fpu_usable(); AMD's "
           "microcode loader checks each patch's SHA-256 digest with it while a CPU is brought "
           "online, before fpu__init_cpu() (before: the generic C code)"),
    Change("kernel_fpu_allowed", "6.16",
           "2297554f01df x86/fpu: Fix irq_fpu_usable() to return false during CPU onlining "
           "(Eric Biggers, May 2025; merged with 11d7956d526f, whose crash in linux-next it "
           "fixed, so no release had the crash)",
           "the per-CPU kernel_fpu_allowed replaces in_kernel_fpu: false until fpu__init_cpu(), "
           "false again from cpu_disable_common() (fpu__disable_cpu()), so irq_fpu_usable() "
           "is false while a CPU comes online (before: true, since in_kernel_fpu started "
           "false; variant fpu-usable-before-init-cpu)"),
    Change("coredump_socket", "6.16",
           "coredump: add coredump socket (Christian Brauner, vfs coredump branch, May 2025)",
           "core_pattern '@/path': the kernel connects to an AF_UNIX socket with O_NONBLOCK "
           "and writes the core there (COREDUMP_SOCK)"),
    Change("print_loop", "6.16",
           "x86/fpu/xstate: Simplify print_xstate_features() (Chang S. Bae)",
           "'Supporting XSAVE feature' lines for every bit 0..XFEATURE_MAX-1 (before: a list)"),
    Change("xsave_disabled_line", "6.16",
           "fpu__init_disable_system_xstate() prints 'XSAVE disabled' (APX series, April 2025)",
           "every disable path prints 'x86/fpu: XSAVE disabled'; the ', disabling XSAVE' "
           "suffixes are dropped"),
    Change("coredump_socket_request", "6.17",
           "coredump: allow for flexible coredump handling (Christian Brauner, June 2025)",
           "core_pattern '@@/path': the kernel sends struct coredump_req and waits for the "
           "server's struct coredump_ack before it dumps (COREDUMP_SOCK_REQ)"),
    Change("guest_only_cet_kernel", "6.17",
           "8b05b3c98816 x86/fpu/xstate: Add CET supervisor xfeature support as a guest-only "
           "feature; 7bc4ed75f2d6 Differentiate default features for host and guest FPUs",
           "XFEATURE_CET_KERNEL gated on SHSTK, supervisor-supported and guest-only: in "
           "max_features and guest_default_cfg, not in the host defaults; '(KVM only)'"),
)

#: Fixes no listed kernel has: bugs of the modelled code found by this model (from the v6.17
#: source, docs/findings/kernel-findings.md section 10), each with the change that would fix
#: it. No `KernelVersion` has them; a configuration applies them by name (`FpuSystem.fixes`,
#: the checker's ``config.fixes``), and the variant of each runs the unfixed code even then.
PROPOSED: tuple[Change, ...] = (
    Change("resume_xfd_set_state", "proposed",
           "fpstate: kernel-findings 10a (fpu__resume_cpu() in every kernel since 5.16, "
           "672365477ae8, and after 10e4b5166df9)",
           "fpu__resume_cpu() writes IA32_XFD through xfd_set_state(), so that the boot CPU's "
           "xfd_state matches the MSR after resume, as 10e4b5166df9 made fpu__init_cpu_xstate() "
           "do, and for a kernel thread current (autosleep) writes init_fpstate.xfd without "
           "asking x86_task_fpu() (unfixed: wrmsrq() alone, current's fpstate->xfd in the MSR "
           "and the cache as before suspend, and since 22aafe3bcb67 a NULL dereference under "
           "CONFIG_X86_DEBUG_FPU when current is a kernel thread; variant "
           "xfd-state-stale-on-resume)"),
    Change("resume_pkru", "proposed",
           "fpstate: kernel-findings 10b (every kernel since 5.14, Thomas Gleixner's 'x86/fpu: "
           "Don't restore PKRU in fpregs_restore_userspace()': 'the PKRU value of current is "
           "always valid in the hardware')",
           "__save_processor_state() keeps current's PKRU (rdpkru()) in struct saved_context "
           "and __restore_processor_state() writes it back, as it does CR4 and the MSRs "
           "(unfixed: the boot CPU resumes with PKRU's reset value 0, the task that suspended "
           "returns to user mode with it, since the return restores every component but "
           "PKRU, and its first switch-out stashes it in thread.pkru; variant "
           "pkru-lost-on-resume)"),
    Change("mxcsr_by_format", "proposed",
           "Chang S. Bae, 'x86/fpu: Fix the MXCSR state reshuffling between userspace and "
           "kernel buffers', v3 1/3 (5 Oct 2022, reported by Andrei Vagin, not merged; "
           "kernel-findings 6), applied to the v6.17 code",
           "__copy_xstate_to_uabi_buf() copies MXCSR by the kernel's format: on a compacted "
           "(XSAVES) kernel only with SSE in XSTATE_BV, init_fpstate's 1F80H otherwise; on a "
           "standard one whenever user_xfeatures has SSE or YMM. copy_uabi_to_xstate() "
           "stores MXCSR whatever the header says and, compacted, sets SSE in XSTATE_BV when "
           "it is not MXCSR_DEFAULT (unfixed: MXCSR is copied out whenever the header has SSE "
           "or YMM -- on a compacted kernel the bytes of SSE's last save, which a debugger's "
           "or a VMM's write-back hands to the task; variant uabi-mxcsr-by-ymm)"),
    Change("guest_xfd_host_write", "proposed",
           "fpstate: kvm-findings, session 34 (b45f72177594's fpu_update_guest_xfd() tests "
           "current's TIF_NEED_FPU_LOAD, which says nothing of a guest fpstate that is not "
           "swapped in: a VMM's KVM_SET_MSRS outside KVM_RUN)",
           "an amendment of guest_xfd_clears_xstate_bv, which it needs: fpu_update_guest_xfd() "
           "clears the armed components' XSTATE_BV bits whenever the guest's registers are not "
           "live, !fpstate->in_use || TIF_NEED_FPU_LOAD (without it: a VMM's nonzero "
           "KVM_SET_MSRS of IA32_XFD while the guest holds tile data leaves XSTATE_BV[18] = 1 "
           "under XFD[18] = 1, and the next KVM_RUN's XRSTORS takes #NM in the host; variant "
           "guest-xfd-host-write-keeps-xstate-bv)"),
    Change("mxcsr_flip_inits_xmm", "proposed",
           "fpstate: an amendment of mxcsr_by_format (kernel-findings 6), which it needs",
           "when copy_uabi_to_xstate() sets SSE in XSTATE_BV for a non-default MXCSR that "
           "the header did not have SSE for, it also puts XMM0-15 of the fpstate in their "
           "initial configuration (zeros, as init_fpstate holds them) (without it: the "
           "XRSTORS loads the XMM bytes the fpstate last held -- an ia32 sigreturn whose "
           "frame clears SSE, or a debugger's write of MXCSR alone, gives the task old XMM "
           "values instead of zeros; variant mxcsr-flip-keeps-xmm)"),
)

#: Fixes merged in mainline after the newest listed kernel (and sent to the stable trees of
#: the listed ones): no `KernelVersion` has them; a configuration applies them by name, as it
#: does the proposed ones, and the variant of each runs the code before them even then.
LATER: tuple[Change, ...] = (
    Change("guest_xfd_clears_xstate_bv", "6.19",
           "b45f72177594 x86/fpu: Clear XSTATE_BV[i] in guest XSAVE state whenever XFD[i]=1 "
           "(Sean Christopherson and Paolo Bonzini, January 2026, Cc stable, e.g. 6.6.y; "
           "fixes 820a6ee944e7 'kvm: x86: Add emulation for IA32_XFD' of v5.17)",
           "fpu_update_guest_xfd() clears the newly armed components' XSTATE_BV bits in the "
           "guest fpstate when the guest's registers are not live (TIF_NEED_FPU_LOAD), and "
           "KVM_SET_XSAVE clears those of the components the guest's XFD arms before "
           "fpu_copy_uabi_to_guest_fpstate(), which WARNs and refuses one that remains "
           "(before: an interrupt's kernel_fpu_begin() between a guest's WRMSR IA32_XFD exit "
           "and fpu_update_guest_xfd(), or a VMM's KVM_SET_XSAVE, left XSTATE_BV[i] = 1 with "
           "XFD[i] = 1, and the next XRSTORS took #NM in the host; variant "
           "guest-xfd-keeps-xstate-bv)"),
)

_BY_KEY = {c.key: c for c in (*CHANGES, *PROPOSED, *LATER)}
PROPOSED_FIXES: frozenset[str] = frozenset(c.key for c in PROPOSED)
#: Proposed fixes that amend another fix and need it applied too: amendment -> the fix.
AMENDS: dict[str, str] = {"mxcsr_flip_inits_xmm": "mxcsr_by_format",
                          "guest_xfd_host_write": "guest_xfd_clears_xstate_bv"}
#: Every fix a configuration may apply by name (`FpuSystem.fixes`, the checker's
#: ``config.fixes``): the proposed ones and those merged after the newest listed kernel.
APPLICABLE_FIXES: frozenset[str] = PROPOSED_FIXES | frozenset(c.key for c in LATER)


def version_key(name: str) -> tuple[int, int]:
    """(major, minor) of a listed version name, for ordering."""
    major, minor = name.split(".")
    return int(major), int(minor)


@dataclass(frozen=True, slots=True)
class KernelVersion:
    """A kernel release as far as boot-time xstate setup is concerned."""

    name: str
    changes: frozenset[str]

    def has(self, key: str) -> bool:
        """Whether this kernel has the behaviour of :data:`CHANGES` row ``key``."""
        assert key in _BY_KEY, f"unknown change key {key!r}"
        return key in self.changes

    def at_least(self, name: str) -> bool:
        """Whether this kernel is ``name`` (a "MAJOR.MINOR" string) or newer."""
        return version_key(self.name) >= version_key(name)

    def __str__(self) -> str:
        return self.name


#: Every version ``--kernel`` accepts, oldest first.
VERSION_NAMES: tuple[str, ...] = (
    "5.16", "5.17", "5.18", "5.19", "6.1", "6.2", "6.3", "6.5", "6.6", "6.9", "6.11", "6.12",
    "6.13", "6.15", "6.16", "6.17", "6.18",
)
NEWEST = VERSION_NAMES[-1]

KERNELS: dict[str, KernelVersion] = {
    name: KernelVersion(name, frozenset(
        c.key for c in CHANGES if version_key(c.since) <= version_key(name)))
    for name in VERSION_NAMES
}

def running(name: str) -> KernelVersion:
    """The version a booted system runs (FpuSystem.kernel_version: a listed name, else a
    release as `kernel_version` reads it)."""
    return KERNELS.get(name) or kernel_version(name)


_RELEASE = re.compile(r"^v?(\d+)\.(\d+)(?:[.\-+~_].*)?$")


def kernel_version(spec: str | KernelVersion = NEWEST) -> KernelVersion:
    """The listed version ``spec`` ("6.12", "v6.12" or a release like "6.12.8-arch1").

    FpstateError naming the known versions when ``spec`` is not one of them."""
    if isinstance(spec, KernelVersion):
        return spec
    m = _RELEASE.match(str(spec).strip())
    name = f"{m.group(1)}.{m.group(2)}" if m else str(spec)
    if name not in KERNELS:
        raise FpstateError(
            f"unknown kernel version {spec!r}; known: {', '.join(VERSION_NAMES)}"
        )
    return KERNELS[name]


def version_for_release(release: str) -> KernelVersion:
    """The behaviour of a running kernel's ``uname -r`` release: its own row when listed, else
    the newest listed version older than it (behaviour only changes at listed versions).

    FpstateError for a release older than 5.16 or not of the form MAJOR.MINOR[...]."""
    m = _RELEASE.match(release.strip())
    if not m:
        raise FpstateError(f"kernel release {release!r} is not of the form MAJOR.MINOR[...]")
    want = (int(m.group(1)), int(m.group(2)))
    older = [n for n in VERSION_NAMES if version_key(n) <= want]
    if not older:
        raise FpstateError(
            f"kernel release {release!r} is older than the oldest modelled kernel "
            f"({VERSION_NAMES[0]})"
        )
    return KERNELS[older[-1]]


def change(key: str) -> Change:
    """The :data:`CHANGES` row ``key``."""
    return _BY_KEY[key]
