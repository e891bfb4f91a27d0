"""The rejected designs the checker can run instead of the kernel's: names, seeds, models.

A variant is a name the model that owns it understands (DESIGN.md: "variants are data too"):
the x86 kernel model reads ``FpuSystem.variants``, the KVM x86 model its ``KvmConfig``, the
KVM/arm64 model ``KvmConfig.variant``. This registry says which world runs each one, where it
comes from, what the checker must find with it (`expect`: the invariant the explorer and the
seed scenario must report) and the explorer settings that make it reachable from the default
configuration.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fpstate.errors import FpstateError


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    model: str  #: the world that runs it (``x86`` or ``arm64``)
    seed: str  #: the seed thread (or kernel comment) that rejected it
    description: str
    expect: str  #: the invariant it violates
    #: explorer configuration overrides (merged into the model's default configuration)
    config: Mapping[str, object] = field(default_factory=dict)
    #: what the CPU must have for the design to matter: x86 xfeature numbers the kernel must
    #: support, or an arm64 feature name
    needs: tuple[int | str, ...] = ()
    #: other invariants the design may break first (another face of the same flaw)
    also: tuple[str, ...] = ()
    #: whether the explorer finds it reliably within a minute from ``config`` (False: its
    #: scenario shows it; the walks reach it in some runs only, the rate said where it is set)
    explorer_finds: bool = True
    #: the explorer's mode for it (``random``, or ``exhaustive`` to ``depth`` actions: a long
    #: counterexample in a small world, which breadth-first search reaches and walks do not)
    mode: str = "random"
    depth: int = 6

    def found_by(self, invariants: tuple[str, ...] | list[str]) -> bool:
        """Whether a violation of ``invariants`` (those broken at one step) shows this
        design's flaw."""
        return self.expect in invariants or any(a in invariants for a in self.also)


#: The explorer's world for the arm64 sigreturn fixes a forked child shows: one host task (the
#: VMM's, without a VM) that forks, takes signals and uses SME, with neither exec, ptrace nor
#: preemptible system calls.
FORK_IN_HANDLER: Mapping[str, object] = {"vms": {}, "tasks": [],
                                          "omit": ["exec", "ptrace_get", "ptrace_set",
                                                   "syscall_enter"]}
#: The explorer's world for KVM_GET/SET_XSAVE between CPU models: the default VM and a second
#: one of the same VMM whose CPU model offers x87, SSE and AVX only (QEMU -cpu of an older
#: CPU), so that buffers move between guests offered different features.
MIGRATION: Mapping[str, object] = {
    "vms": {"vm0": {"vmm": "p1.t0", "vcpus": 1},
            "vm1": {"vmm": "p1.t0", "vcpus": 1, "xcr0": "x87|sse|avx"}}}
#: The default world with a second VM of the same VMM whose CPU model offers no XSAVE
#: features (CPUID.(0DH,0) EDX:EAX 0: QEMU's Nehalem), so that its buffers carry x87 and SSE
#: only as the legacy area KVM always keeps.
NO_XSAVE_GUEST: Mapping[str, object] = {
    "vms": {"vm0": {"vmm": "p1.t0", "vcpus": 1},
            "vm1": {"vmm": "p1.t0", "vcpus": 1, "xcr0": 0}}}
#: The default x86 world cut to the VMM thread alone, its guest's runs (kvm_run) and what
#: moves the thread between CPUs: for the guest-XFD designs whose counterexample is a few
#: guest programs and a move.
VMM_ALONE: Mapping[str, object] = {
    "processes": {"p1": 1},
    "omit": ["arch_prctl", "clone", "core_dump", "edit_xsave", "exec", "exec_finish", "exit",
             "fork", "frame_clear", "frame_fx_only", "frame_mxcsr", "frame_resize",
             "frame_write", "get_xsave", "hotplug", "kernel_fpu", "kill", "kvm_enter",
             "kvm_finish", "kvm_init", "ldmxcsr", "migrate_xsave", "nm_return", "pasid_write",
             "pkey_altstack", "pkey_open", "ptrace_cont", "ptrace_get", "ptrace_set",
             "ptrace_stop", "release", "set_cet_msr", "set_cpuid", "set_fpu", "set_xcr0",
             "set_xsave", "sigaction", "sigaltstack", "signal", "sigreturn", "suspend",
             "syscall", "write", "write_nm"]}
#: The explorer's world for preemptible kernel-mode NEON in task context: one task on two
#: CPUs with only FPSIMD (neoverse-n1), system calls it is preempted in, NEON sections, and
#: its own reads and writes -- searched breadth-first (the counterexample is 11 steps long).
NEON_PREEMPTION: Mapping[str, object] = {
    "cpu": "neoverse-n1", "vms": {}, "tasks": [],
    "omit": ["exec", "ptrace_get", "ptrace_set", "clone", "signal", "sigreturn", "set_vl",
             "syscall", "kernel_neon"]}
#: Two tasks sharing one CPU, one in a NEON section, the other in streaming mode: no VM,
#: debugger, exec, fork, signals or VL changes.
NEON_AFTER_STREAMING: Mapping[str, object] = {
    "vms": {}, "cpus": 1, "tasks": ["other"],
    "omit": ["exec", "ptrace_get", "ptrace_set", "clone", "signal", "sigreturn", "set_vl"]}
#: An nVHE host whose VM has SVE (finalized at its maximum VL), the VMM its only task.
NVHE_SVE_GUEST: Mapping[str, object] = {"vhe": False, "tasks": [],
                                         "vms": {"vm0": {"vcpus": 1, "sve": True}}}
#: The same with only what a fork in a handler and the child's return need: no VL changes,
#: other syscalls, kernel-mode NEON or idling CPUs.
FORK_IN_HANDLER_NARROW: Mapping[str, object] = {
    "vms": {}, "tasks": [],
    "omit": ["exec", "ptrace_get", "ptrace_set", "set_vl", "syscall", "kernel_neon", "idle",
             "syscall_enter"]}

#: The default world without CPUs that power down: a CPU taken offline or powered down by
#: cpuidle comes back unbound, which undoes the stale binding the access-trap designs leave
#: (with them, seed 0 did not reach sme-trap-keeps-binding in 60 s; without, in 5).
NO_POWER_DOWN: Mapping[str, object] = {"omit": ["hotplug", "cpu_pm"]}

VARIANTS: tuple[Variant, ...] = (
    Variant("kvm-save-min-size", "x86", "seed 000",
            "KVM saves the VMM task's registers into a user_fpu allocated at the default size, "
            "after the task's fpstate grew for AMX (kvm_save_current_fpu)",
            "save-within-allocation", needs=(18,),
            # tglx's first question: "What happens with the rest of the state?" -- with
            # TIF_NEED_FPU_LOAD set, the min-size memcpy drops the tile data.
            also=("no-lost-write",)),
    Variant("guest-only-in-host-fpstate", "x86", "seed 001",
            "CET supervisor state (CET_KERNEL) in every fpstate, host tasks included "
            "(no guest_default_cfg)", "guest-only-not-in-host-fpstate", needs=(12,)),
    Variant("fpmr-ungated", "arm64", "seed 002",
            "HCRX_EL2.EnFPM fixed on: FPMR switched and reachable by every guest of an FPMR "
            "host, advertised or not", "nothing-beyond-advertised", needs=("FPMR",)),
    Variant("init-keeps-cet", "x86", "seed 003",
            "vCPU INIT clears only the MPX components: CET_USER/CET_KERNEL survive INIT",
            "init-clears-architectural", needs=(11,)),
    Variant("pasid-write-incoherent", "x86", "seed 004",
            "fpu__pasid_write() v1: write IA32_PASID to the register whenever "
            "!TIF_NEED_FPU_LOAD or fpregs_state_valid(); with the flag set the memory image is "
            "the truth", "valid-registers-match-memory", needs=(10,)),
    Variant("fpmr-shared-layout", "arm64", "seed 002",
            "hyp saves the host FPMR through a pointer past uw.fpsimd_state "
            "(fpsimd_share_end()), assuming thread_struct's layout", "save-within-allocation",
            needs=("FPMR",)),
    Variant("sigreturn-no-flush", "arm64", "signal.c restore_sigframe()",
            "rt_sigreturn writes the frame's FP state into thread_struct while the registers "
            "stay bound to the task (no fpsimd_save_and_flush_current_state() first): the "
            "return to user does not reload, the task runs on with its handler's registers",
            # with a VL changed in the handler, those registers are saved at the wrong VL;
            # with TIF_SVE changed by the frame, the stale binding's traps disagree with it
            "no-lost-write", also=("size-covers-features", "tif-clear-owns-registers")),
    Variant("signal-keeps-tpidr2", "arm64", "signal.c setup_return()",
            "the signal handler starts with the interrupted code's TPIDR2_EL0 (SME's lazy-save "
            "block pointer) instead of 0: a lazy save the handler commits writes ZA into the "
            "interrupted code's TPIDR2 block", "no-lost-write", needs=("SME",)),
    Variant("clone-inherits-tpidr2", "arm64", "process.c copy_thread() before its CLONE_VM rule",
            "a child of clone(CLONE_VM) without CLONE_SETTLS inherits its parent's TPIDR2_EL0: "
            "a lazy ZA save it commits writes into its parent's stack", "no-foreign-value",
            needs=("SME",)),
    Variant("sigreturn-sm-without-tif-sme", "arm64", "v6.17 (fixed: d2907cbe9ea0)",
            "rt_sigreturn restores streaming mode (SVE_SIG_FLAG_SM) without TIF_SME: a thread "
            "that never used SME -- a child forked in a signal handler -- gets its streaming "
            "registers loaded at whatever SME VL the CPU last had, and is killed at the next "
            "save", "size-covers-features",
            # one host task and no VM, no debugger and no exec: the walks spend themselves on
            # fork, signals and SME
            config=FORK_IN_HANDLER, needs=("SME",),
            # the load itself reads past sve_state when the CPU's SVL is the larger
            also=("save-within-allocation",),
            # A needle (six steps at the shortest, two tasks, one clone): one core found it
            # from seed 0 after 1.50M transitions (116 s on a Zen 3 host, about 58 s on the
            # Zen 5 one), from seed 2 after 550k, not from seed 1 in 726k; breadth-first to
            # depth 6 takes 590k transitions even with traps, VL changes, syscalls and idling
            # left out. So no test waits for it: its scenario shows it.
            explorer_finds=False),
    Variant("sigreturn-za-without-sve-state", "arm64", "v6.17 (fixed: ea8ccfddbce0)",
            "rt_sigreturn restores ZA and sets TIF_SME without allocating sve_state: a thread "
            "that never used SVE or SME -- a child forked in a handler of a signal taken with "
            "ZA on -- enters streaming mode without a trap and saves its streaming registers "
            "through a NULL sve_state", "save-within-allocation",
            # Seven steps, one of them the world's only clone, taken in the handler of a signal
            # taken with ZA on and SM off: found within 60 s on one core in 3 of 6 seeds
            # (9.7, 40.2 and 59.2 s) even in this narrowed world, so no test waits for it.
            config=FORK_IN_HANDLER_NARROW, needs=("SME",), explorer_finds=False),
    Variant("kernel-neon-elides-reload", "arm64", "v6.8-v6.9 (fixed: e92bee9f861b)",
            "a thread switched in inside a kernel-mode NEON section gets its kernel registers "
            "loaded but the CPU still names its user state as loaded: switched back there "
            "after the section, it returns to user with its kernel NEON values",
            "no-foreign-value", config=NEON_PREEMPTION, mode="exhaustive", depth=12,
            # the read after the return to user is where it shows
            also=("no-lost-write",)),
    Variant("kernel-neon-smstop-clobbers", "arm64",
            "v6.10-v6.14 (e92bee9f861b until 01098d893fa8)",
            "a thread switched in inside a kernel-mode NEON section on a CPU another thread "
            "left in streaming mode gets its kernel registers loaded, then zeroed by the "
            "SMSTOP of the flush that follows: its NEON code reads back zeroes",
            "no-lost-write", config=NEON_AFTER_STREAMING, needs=("SME",)),
    Variant("sve-trap-keeps-binding", "arm64", "before 751ecf6afd65 (October 2024)",
            "do_sve_acc() of a thread preempted and migrated since its SVE access trap converts "
            "its state in memory but leaves it bound to the CPU it left: switched back there, "
            "it returns to user with the trap armed and TIF_SVE set, traps again and WARNs",
            "kernel-warn", needs=("SVE",), config=NO_POWER_DOWN,
            # or, scheduled out first, its registers are saved in SVE format at whatever VL
            # that CPU has: a VL mismatch, SIGKILL; the armed trap with TIF_SVE set is itself
            # the broken binding
            also=("size-covers-features", "tif-clear-owns-registers")),
    Variant("sme-trap-keeps-binding", "arm64", "before d3eaab3c7090 (December 2024)",
            "do_sme_acc() of a thread preempted and migrated since its SME access trap leaves "
            "it bound to the CPU it left: switched back there, it returns to user with the trap "
            "armed and TIF_SME set, traps again and WARNs", "kernel-warn", needs=("SME",),
            config=NO_POWER_DOWN,
            also=("size-covers-features", "tif-clear-owns-registers")),
    Variant("load-fpmr-before-svcr", "arm64", "v6.9-v6.12 (fixed: e5fa85fce08b)",
            "task_fpsimd_load() writes FPMR before SVCR: returning to user on a CPU another "
            "thread left in streaming mode, the change of PSTATE.SM zeroes the FPMR just "
            "loaded", "no-lost-write", needs=("SME", "FPMR")),
    Variant("kvm-zcr-restored-at-put", "arm64", "KVM/arm64 nVHE before 59419f10045b (v6.14)",
            "after a guest exit the nVHE host runs on at the guest's ZCR_EL1 VL until "
            "kvm_arch_vcpu_put_fp(): a softirq's kernel-mode NEON in between saves the guest's "
            "SVE state, finds the live VL is not the vCPU's maximum and kills the VMM",
            "size-covers-features", config=NVHE_SVE_GUEST, needs=("SVE",)),
    Variant("kvm-prepare-clears-tif-sve", "arm64", "KVM/arm64 before fbc7e61195e2 (Feb 2025)",
            "vcpu_load leaves the host's state live and clears TIF_SVE (fpsimd_kvm_prepare()) "
            "with EL0 SVE still enabled: back in user mode the VMM thread writes SVE registers "
            "without TIF_SVE, and its next save keeps only V0-V31", "tif-clear-owns-registers",
            config={"cpu": "neoverse-v1"}, needs=("SVE",), also=("no-lost-write",)),
    Variant("ptrace-set-no-flush", "arm64", "ptrace.c fpr_set()/sve_set_common()/za_set()",
            "PTRACE_SETREGSET writes a stopped thread's FP state in thread_struct but leaves "
            "its registers bound to the CPU that last ran it: run there again, the thread "
            "reuses them and the debugger's write is lost", "no-lost-write",
            # with TIF_SVE set by the write, the stale binding's VL is not the live one: the
            # next save kills the thread; with TIF_SME set (a ZA write), the stale binding's
            # SME trap is still armed, and the next SME instruction traps into a WARN -- the
            # stale binding's traps disagree with the TIF flags the write set
            also=("size-covers-features", "kernel-warn", "tif-clear-owns-registers")),
    Variant("cpu-dead-keeps-binding", "arm64", "before 32365e64a20e (v4.2, June 2015)",
            "a CPU taken offline and back keeps fpsimd_last_state: the last task that ran there "
            "skips its reload and runs with the registers the CPU came back with",
            "no-foreign-value",
            # its TIF_FOREIGN_FPSTATE clear while the registers are the reset's (the same
            # flaw seen before the task reads them)
            also=("tif-clear-owns-registers", "no-lost-write")),
    Variant("cpu-pm-keeps-binding", "arm64", "before 7c68a9cc0402 (v3.18, September 2014)",
            "a CPU powered down by cpuidle keeps fpsimd_last_state: the last task that ran "
            "there skips its reload and runs with the registers the CPU came back with",
            "no-foreign-value",
            # its TIF_FOREIGN_FPSTATE clear while the registers are the reset's (the same
            # flaw seen before the task reads them)
            also=("tif-clear-owns-registers", "no-lost-write")),
    Variant("sve-set-zeroes-tracer", "arm64", "v6.16-v6.18 (fixed: 5cbb61bf4168)",
            "PTRACE_SETREGSET(NT_ARM_SVE/SSVE) zeroes current's -- the tracer's -- saved V0-V31, "
            "FPSR and FPCR instead of the tracee's: a tracer that slept in the call (its CPU's "
            "copy of its registers lost meanwhile) returns to user with them zeroed",
            "no-lost-write", needs=("SVE",)),
    Variant("sve-set-without-tif-sve", "arm64", "v6.16-v6.18 (fixed: 128a7494a9f1)",
            "on a CPU with SVE but no SME, PTRACE_SETREGSET(NT_ARM_SVE) stores SVE-format state "
            "without setting TIF_SVE: the tracee's next load WARNs (syzbot's report)",
            "kernel-warn", config={"cpu": "neoverse-v1"}, needs=("SVE",)),
    Variant("exec-keeps-fpmr", "arm64", "from FPMR support (v6.9) to a90878f297d3 (2025)",
            "execve() resets every FP register but FPMR: the new program starts with the FP8 "
            "mode the old one last saved", "no-lost-write", needs=("FPMR",)),
    Variant("vl-change-stale-sve", "arm64", "v6.7-v6.15 (fixed: 49ce484187f7)",
            "prctl(PR_SVE_SET_VL) takes V from sve_state whenever TIF_SVE is set, but the save "
            "in that very syscall stored FPSIMD format: V0-V31 go back to what the last "
            "SVE-format save held", "no-lost-write", needs=("SVE",)),
    Variant("realloc-no-restore-userregs", "x86", "xstate.c fpstate_realloc()",
            "swap in the zeroed larger buffer without first making the registers "
            "authoritative: the state that lived only in the old buffer is lost",
            # a core dump taken while the task sleeps in the #NM handler shows the loss first
            "no-lost-write", needs=(18,), also=("regset-view-shows-the-task",)),
    Variant("ptrace-set-no-invalidate", "x86", "regset.c fpu_force_restore()",
            "PTRACE_SETREGSET modifies a stopped task's fpstate without zapping last_cpu: a "
            "still-cached register copy wins over the write", "valid-registers-match-memory"),
    Variant("ia32-sigreturn-no-supervisor-save", "x86", "signal.c __fpu_restore_sig()",
            "a compat task's sigreturn sets TIF_NEED_FPU_LOAD without first saving the live "
            "registers: the full XRSTOR from the fpstate brings back stale supervisor state "
            "(PASID, CET)", "no-lost-write", needs=(10,)),
    Variant("kvm-pkru-cr4-pke-only", "x86", "vmx.c before 37486135d3a7",
            "guest and host PKRU switched only with the guest's CR4.PKE: a guest with PKRU in "
            "XCR0 and CR4.PKE clear writes PKRU with XRSTOR, and the VMM thread goes back to "
            "user space with it", "no-foreign-value", needs=(9,)),
    Variant("get-xsave-unmasked", "x86", "KVM from v5.16 until ad856280ddea",
            "KVM_GET_XSAVE2 copies every feature of the guest fpstate, not only those of the "
            "guest's CPUID: a guest whose CPU model lacks PKRU gets the host PKRU's header bit "
            "(and state a migration put in its fpstate), which a destination without the "
            "feature refuses", "nothing-beyond-advertised", config=MIGRATION,
            also=("no-lost-write",)),
    Variant("user-xfeatures-guest-only", "x86",
            "KVM from ad856280ddea until 'Always enable legacy FP/SSE in allowed user "
            "XFEATURES'",
            "KVM_SET_CPUID2 sets the guest fpstate's user_xfeatures to the guest's supported "
            "XCR0: for a guest offered no XSAVE features (a pre-XSAVE CPU model) KVM_GET_XSAVE "
            "drops x87 and SSE, MXCSR with them, and KVM_SET_XSAVE refuses buffers that have "
            "them", "no-lost-write", config=NO_XSAVE_GUEST,
            # the dropped SSE in the VMM's buffer, before any restore loses it
            also=("regset-view-shows-the-task",)),
    Variant("coredump-no-wait-inactive", "x86",
            "fs/coredump.c coredump_wait(): the wait_task_inactive() loop, 'so that all the "
            "thread context (extended register state, like fpu etc) gets copied to the memory'",
            "the core's notes are collected without waiting for the zapped threads to be "
            "switched out: a thread running in user mode on another CPU has its note taken "
            "from its fpstate's older image", "regset-view-shows-the-task"),
    Variant("exec-fpu-drop", "x86", "v5.14-v6.4 (33344368cb08 until 1f69383b203e)",
            "exec's fpu_reset_fpregs() calls fpu__drop(), which clears this CPU's owner but "
            "not last_cpu: an exec preempted before flush_thread() and moved to another CPU "
            "leaves the old CPU holding the old program's registers as valid, and the new "
            "program starts with them there", "valid-registers-match-memory"),
    Variant("cpu-up-keeps-owner", "x86", "smpboot.c native_kick_ap()",
            "a CPU brought back online keeps its fpu_fpregs_owner_ctx: the last task that ran "
            "there skips its restore and runs with what INIT and FNINIT left",
            "valid-registers-match-memory"),
    Variant("xfd-state-stale-on-online", "x86", "v5.16-v6.8 (fixed: 10e4b5166df9)",
            "a CPU brought back online has IA32_XFD armed but its xfd_state cache says "
            "disarmed: restoring a task with AMX tile data skips the MSR write and XRSTOR "
            "takes #NM in the kernel (CVE-2024-35801)", "kernel-warn", needs=(18,),
            # one thread per process and no VM: fewer actions between first AMX use, idle,
            # hotplug and the run that restores
            config={"vms": {}, "processes": {"p0": 1, "p1": 1}}),
    Variant("xfd-state-stale-on-resume", "x86",
            "v5.16-v6.18, unfixed (kernel-findings 10a; proposed fix resume_xfd_set_state)",
            "after resume from suspend fpu__resume_cpu() has set the boot CPU's IA32_XFD to "
            "the suspending task's value without xfd_state: restoring a task with AMX tile "
            "data skips the MSR write and XRSTOR takes #NM in the kernel; when the autosleep "
            "worker suspended, 6.15+ dereferences x86_task_fpu()'s NULL for it (10d)",
            "kernel-warn",
            needs=(18,), also=("dynamic-state-needs-permission",),
            # as for xfd-state-stale-on-online, one thread per process and no VM, and none of
            # the actions that neither arm nor restore AMX state (12-55 s with them, seeds 1-3)
            config={"vms": {}, "processes": {"p0": 1, "p1": 1},
                    "omit": ["sigaction", "sigaltstack", "exec", "fork", "clone", "core_dump",
                             "ptrace_stop", "kill", "pasid_write", "kernel_fpu", "ldmxcsr",
                             "hotplug"]}),
    Variant("pkru-lost-on-resume", "x86",
            "v5.14-v6.18, unfixed (kernel-findings 10b; proposed fix resume_pkru)",
            "after resume from suspend the boot CPU's PKRU is its reset value 0, which nothing "
            "writes back: the task that suspended returns to user mode with every protection "
            "key open", "no-lost-write", needs=(9,)),
    Variant("uabi-mxcsr-by-ymm", "x86",
            "2016-v6.18, unfixed (kernel-findings 6; proposed fix mxcsr_by_format, Chang S. "
            "Bae's v3 of October 2022)",
            "a compacted kernel copies MXCSR into PTRACE_GETREGSET, core dumps and "
            "KVM_GET_XSAVE2 whenever the header has SSE or YMM: with SSE initial and AVX in "
            "use, the MXCSR of SSE's last save, which a write-back of the buffer with SSE "
            "hands to the task", "regset-view-shows-the-task", also=("no-lost-write",),
            # without a VM and the actions no stale-MXCSR path takes (session 33, seeds 0-7 of
            # a Zen 4 host's profile: 2-25 s; 9-33 s with the VM, 27-90+ s with everything);
            # fork, signals and frame_clear stay: without AMX's TILERELEASE they are how SSE
            # comes back to its initial configuration
            config={"vms": {},
                    "omit": ["pkey_altstack", "pkey_open", "exec", "clone", "kill", "hotplug",
                             "suspend", "kernel_fpu", "pasid_write", "sigaltstack",
                             "frame_resize", "frame_fx_only", "frame_write"]}),
    Variant("mxcsr-flip-keeps-xmm", "x86",
            "Chang S. Bae's v3 of October 2022 as posted (proposed fix mxcsr_by_format "
            "without its amendment mxcsr_flip_inits_xmm; kernel-findings 6)",
            "copy_uabi_to_xstate() sets SSE for a non-default MXCSR whose header lacked SSE "
            "without initialising XMM0-15: an ia32 sigreturn whose frame says SSE is initial "
            "gives the task the XMM values its fpstate last held", "no-lost-write",
            # one task on one CPU of Zen 2 (XSAVES, so compacted, with x87, SSE and AVX only:
            # fewer components to pick), and only the actions that exec a 32-bit program,
            # write SSE, take a signal or edit its frame (0.0-3.6 s in one process, seeds
            # 0-3; 7-42 s on Sapphire Rapids)
            config={"cpu": "zen2", "vms": {}, "cpus": 1, "processes": {"p0": 1},
                    "omit": ["ptrace_get", "ptrace_set", "ptrace_stop", "ptrace_cont",
                             "core_dump", "kill", "fork", "clone", "exit", "pasid_write",
                             "kernel_fpu", "hotplug", "suspend", "sigaltstack", "arch_prctl",
                             "pkey_open", "pkey_altstack", "write_nm", "syscall",
                             "frame_write", "frame_resize", "frame_fx_only", "idle",
                             "switch_in", "release", "ldmxcsr", "return_to_user"]}),
    Variant("init-fpstate-by-xsaves", "x86", "before v5.13 (fixed: f9dfb5e390fa)",
            "init_fpstate read back with XSAVES, which writes nothing of components in their "
            "initial configuration: FCW and MXCSR 0 in every view that fills an absent x87 or "
            "SSE from it (ptrace, core dumps, KVM_GET_XSAVE2)", "regset-view-shows-the-task"),
    Variant("hardirq-fpu-in-fpregs-lock", "x86", "before v5.18 (fixed: 59f5ede3bc0f)",
            "irq_fpu_usable() lets a hard interrupt that hit a fpregs_lock()ed section take "
            "the FPU: its kernel_fpu_begin() clobbers registers the section then writes to a "
            "signal frame, a forked child's fpstate or a core, or activates as the task's "
            "after sigreturn's XRSTOR, a signal handler's setup or KVM_RUN's exit; in "
            "fpstate_realloc() it saves them into the buffer about to be freed, in exec's "
            "fpu_reset_fpstate_regs() over the new program's initial image; a PASID write "
            "then goes into registers that are no longer the task's; in 5.17's "
            "fpu_update_guest_xfd() it XSAVES the guest fpstate while IA32_XFD and fps->xfd "
            "disagree (xfd_validate_state() WARNs)",
            "no-foreign-value", also=("no-lost-write", "save-within-allocation")),
    Variant("fpu-usable-before-init-cpu", "x86", "before 2297554f01df (linux-next, May 2025)",
            "irq_fpu_usable() is true on a CPU coming online before fpu__init_cpu(): AMD's "
            "microcode loader hashes its patch with SIMD code and kernel_fpu_begin()'s LDMXCSR "
            "takes #UD, CR4.OSFXSR being still clear", "kernel-warn",
            # only AMD CPUs with EntrySign hash a patch while coming online
            config={"cpu": "zen4"}),
    Variant("req-perm-overwrites", "x86", "v5.16-v5.17 (fixed: 063452fd94d1)",
            "ARCH_REQ_XCOMP_PERM stores the requested bits as the permission: the default "
            "features are revoked", "permission-keeps-defaults", needs=(18,)),
    Variant("ptrace-pkru-ignored", "x86", "v5.14-v6.1 (fixed: 4a804c4f8356)",
            "PTRACE_SETREGSET puts PKRU in the fpstate but not in thread.pkru, where it is "
            "restored from: a debugger's write of PKRU is lost", "no-lost-write", needs=(9,)),
    Variant("sigframe-under-user-pkru", "x86", "v4.9-v6.11 (fixed: 70044df250d0)",
            "the signal frame is written under the interrupted code's PKRU: a sigaltstack "
            "behind a protection key that code closed cannot take it, and the task dies of "
            "SIGSEGV", "sigframe-delivered-with-room", needs=(9,)),
    # Only an AMD CPU shows it: its XSAVE writes XSTATE_BV[PKRU] = 0 after WRPKRU 0.
    Variant("pkru-sigframe-no-xstate-bv", "x86", "v6.12 (fixed: ae6012d72fa6)",
            "the signal frame gets the pre-signal PKRU but not XSTATE_BV[PKRU]; XSAVE ran with "
            "PKRU = 0, which AMD tracks as initial, so sigreturn loads PKRU = 0: every "
            "protection key open", "no-lost-write", config={"cpu": "zen4"}, needs=(9,)),
    Variant("sigframe-magic2-at-user-size", "x86",
            "v6.15-v6.17 (dc8aa31a7ac2, reverted: 44eeff9bc467)",
            "sigreturn looks for MAGIC2 at the current user_size: a frame rewritten in a "
            "smaller CPU's layout (CRIU, gVisor) is restored fx_only, and after the handler's "
            "first AMX use grew the fpstate past its frame, the frame is not restored",
            # AVX: the layout frame_resize rewrites to keeps it (AMX shows the other face).
            "sigreturn-restores-own-frame", needs=(2,), also=("no-lost-write",)),
    Variant("guest-xfd-keeps-xstate-bv", "x86",
            "v5.17-v6.18 (820a6ee944e7; fixed: b45f72177594, 6.19 and stable)",
            "a guest fpstate keeps XSTATE_BV[18] = 1 while the guest's XFD arms TILEDATA -- "
            "stored by a VMM's KVM_SET_XSAVE, or saved by an interrupt's kernel_fpu_begin() "
            "between the exit of the guest's WRMSR IA32_XFD and fpu_update_guest_xfd(): the "
            "next XRSTORS takes #NM in the host", "kernel-warn",
            # the guest's view of a fpstate that cannot be restored shows nothing
            needs=(18,), also=("no-lost-write",)),
    Variant("xfd-sync-after-irqoff", "x86",
            "v3 of the KVM AMX series (December 2021); the merged b5274b1b7ba8 (v5.17) syncs "
            "fps->xfd before handle_exit_irqoff()",
            "fpu_sync_guest_vmexit_xfd_state() after handle_exit_irqoff(): a guest that armed "
            "XFD itself and took the #NM in the same entry is judged by a stale fps->xfd, its "
            "XFD_ERR stays in the CPU's MSR instead of guest_fpu.xfd_err: the guest's WRMSR "
            "XFD_ERR 0 then never reaches the MSR (it reads the bit back), and on another CPU "
            "it reads 0", "no-lost-write", needs=(18,),
            # the VMM alone, with what moves it between CPUs and its guest's runs: the
            # counterexample is three guest programs, a move and a fourth program
            config=VMM_ALONE),
    Variant("guest-xfd-host-write-keeps-xstate-bv", "x86",
            "b45f72177594 as merged (6.19 and stable), unfixed (kvm-findings, session 34; "
            "proposed fix guest_xfd_host_write)",
            "fpu_update_guest_xfd() clears an armed component's XSTATE_BV bit only under "
            "current's TIF_NEED_FPU_LOAD: a VMM's KVM_SET_MSRS of a nonzero IA32_XFD outside "
            "KVM_RUN, its own registers live, leaves the guest's tile data in XSTATE_BV, and "
            "the next KVM_RUN's XRSTORS takes #NM in the host", "kernel-warn", needs=(18,),
            # the guest's view of a fpstate that cannot be restored shows nothing
            also=("no-lost-write",)),
    Variant("nm-intercept-follows-xfd", "x86",
            "b5274b1b7ba8 (v5.17) without its exception-bitmap hunk: v4's rule of the KVM AMX "
            "series, #NM trapped iff the guest fpstate's xfd is nonzero",
            "with XFD writes passed through, the #NM intercept follows fps->xfd as the last "
            "bitmap update (an INIT) saw it: a guest that disarmed XFD before an INIT and arms "
            "it again takes its XFD #NM without an exit, KVM leaves its XFD_ERR in the CPU's "
            "MSR: the guest's WRMSR XFD_ERR 0 never reaches it, and on another CPU it reads 0",
            "no-lost-write", needs=(18,),
            # the guest's INIT (a program) is the update that matters
            config=VMM_ALONE),
    Variant("nm-xfd-err-read-irqs-on", "x86",
            "the rule of v5.17's 'kvm: x86: Intercept #NM for saving IA32_XFD_ERR': 'This must "
            "be done with interrupt disabled, otherwise the unsaved MSR value may be clobbered "
            "by host operations'",
            "a guest XFD #NM's IA32_XFD_ERR is read in handle_exit(), with interrupts and "
            "preemption on: a vCPU thread preempted there and moved to another CPU reads that "
            "CPU's 0, and the guest's #NM handler finds no XFD cause", "no-lost-write",
            needs=(18,)),
)

BY_NAME: dict[str, Variant] = {v.name: v for v in VARIANTS}
#: The variants of the seeds (fpstate check requires each to be found).
SEED_VARIANTS: tuple[str, ...] = ("kvm-save-min-size", "guest-only-in-host-fpstate",
                                  "fpmr-ungated", "init-keeps-cet", "pasid-write-incoherent")
#: The variants that are the newest modelled kernel's own code, bugs this model found in it
#: (docs/findings/kernel-findings.md sections 10 and 6, and kvm-findings.md: the guest XFD
#: left by b45f72177594; the default configuration applies their proposed fixes): fpstate
#: check requires each to be found as well.
UNFIXED_VARIANTS: tuple[str, ...] = ("pkru-lost-on-resume", "xfd-state-stale-on-resume",
                                     "uabi-mxcsr-by-ymm", "guest-xfd-host-write-keeps-xstate-bv")


def missing(v: Variant, cpu: str) -> str | None:
    """Why CPU profile ``cpu`` cannot show variant ``v`` (None when it can): an x86 feature
    the kernel booted on it does not support, or an arm64 feature it lacks."""
    if v.model == "arm64":
        from fpstate.arm64.cpu import load_profile as load_arm64

        regs = load_arm64(cpu).id_regs
        lacking = [n for n in v.needs if isinstance(n, str) and not getattr(regs, n.lower())]
        return f"{cpu} lacks {', '.join(lacking)}" if lacking else None
    from fpstate.kernel.x86.xstate import fpu__init_system_xstate
    from fpstate.x86.profiles import load_profile
    from fpstate.x86.xfeatures import BY_NUMBER

    boot = fpu__init_system_xstate(load_profile(cpu))
    have = boot.fpu_kernel_cfg.max_features if boot.xsave_enabled else 0
    lacking = [BY_NUMBER[n].short for n in v.needs if isinstance(n, int) and not have >> n & 1]
    return f"{cpu}: the kernel has no {', '.join(lacking)}" if lacking else None


def get(name: str) -> Variant:
    """The variant called ``name``; FpstateError naming the known ones otherwise."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise FpstateError(f"unknown variant {name!r} (known: {', '.join(BY_NAME)})") from None


__all__ = ["BY_NAME", "SEED_VARIANTS", "UNFIXED_VARIANTS", "VARIANTS", "Variant", "get",
           "missing"]
