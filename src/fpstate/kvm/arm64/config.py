"""Which KVM/arm64 design the model runs: upstream, or a design the seed's review rejected.

Seed 002 (Marc Zyngier reviewing Mark Brown's "[PATCH v3 15/21] KVM: arm64: Support
FEAT_FPMR for guests", Dec 2023) rejected two things, each a selectable variant here:

* ``fpmr-ungated``: HCRX_EL2.EnFPM in the fixed HCRX_GUEST_FLAGS, FPMR switched with the FP
  state and its one_reg visible whenever the *host* has FEAT_FPMR, whatever the VM's
  ID_AA64PFR2_EL1.FPMR says.  ("We really need to stop piling the save/restore of stuff
  that isn't advertised to the guest.")
* ``fpmr-shared-layout``: the pre-v6.15 ownership scheme (host state left live at
  vcpu_load, saved by hyp on the first guest FP trap) where hyp finds the host task's FPMR
  by pointer arithmetic past ``uw.fpsimd_state`` (fpsimd_share_end()).  ("I won't take this
  sort of pointer arithmetic that assumes some pre-defined layout.")

Two more are KVM's own, from its history:

* ``kvm-prepare-clears-tif-sve``: vcpu_load before fbc7e61195e2 ("KVM: arm64:
  Unconditionally save+flush host FPSIMD/SVE/SME state", February 2025) left the host's
  state live (HOST_OWNED) and fpsimd_kvm_prepare() cleared TIF_SVE while EL0 SVE stayed
  enabled: back in user mode the VMM thread used SVE without TIF_SVE, and its next save
  kept only the FPSIMD part (QEMU's SVE memmove() corrupted data).
* ``kvm-zcr-restored-at-put``: before 59419f10045b ("KVM: arm64: Eagerly switch
  ZCR_EL{1,2}", v6.14): on an nVHE host, ZCR_EL1 kept the guest's value after a guest exit
  and the vCPU's maximum VL came back only in kvm_arch_vcpu_put_fp(); a softirq's kernel-mode
  NEON in between saved the guest's state at the wrong VL, and the VMM was killed.

Fifteen more are the host kernel's, not KVM's, and live here because they are the same world's
design choices:

* ``sigreturn-no-flush``: restore_sigframe() writes the frame's FP state into thread_struct
  without first saving and unbinding the live registers (the kernel's
  fpsimd_save_and_flush_current_state() at its top): the return to user does not reload.
* ``signal-keeps-tpidr2``: setup_return() leaves TPIDR2_EL0 as the interrupted code had it
  (the kernel writes 0 there, with SM and ZA off, for the handler).
* ``clone-inherits-tpidr2``: copy_thread() as it was before its CLONE_VM rule: every child
  inherits TPIDR2_EL0 and ZA, TPIDR2_EL0 being reset only with CLONE_SETTLS -- so a thread
  cloned without it holds a pointer into its parent's stack.
* ``sigreturn-sm-without-tif-sme``: v6.17's restore_sve_fpsimd_context() before the stable
  fix d2907cbe9ea0: SVCR.SM restored from SVE_SIG_FLAG_SM without TIF_SME, so SMCR_EL1.LEN
  is not set for the load (found by this project's explorer as a fork in a signal handler).
* ``ptrace-set-no-flush``: PTRACE_SETREGSET writes a stopped thread's FP state without
  fpsimd_flush_task_state(target): a CPU that still holds the thread's registers is reused
  when it runs there again, and the write is lost.
* ``sve-set-zeroes-tracer``: sve_set_common() from v6.16 (316283f276eb) until the fix
  5cbb61bf4168: its "always zero V regs, FPSR, and FPCR" memset is of current's -- the
  tracer's -- uw.fpsimd_state, not the tracee's.
* ``sve-set-without-tif-sve``: sve_set_common() from 9f8bf718f292 (v6.16) until the fix
  128a7494a9f1: on a system without SME, an SVE-format write leaves TIF_SVE clear.
* ``exec-keeps-fpmr``: fpsimd_flush_thread() before a90878f297d3 (April 2025): exec leaves
  uw.fpmr as the old program's last save put it.
* ``vl-change-stale-sve``: vec_set_vector_length() before 49ce484187f7 (v6.16): V taken from
  sve_state whenever TIF_SVE is set, although a save in a syscall stores FPSIMD format.
* ``sigreturn-za-without-sve-state``: v6.17's restore_za_context() before the stable fix
  ea8ccfddbce0: ZA restored and TIF_SME set (SMSTART SM no longer traps) without an
  sve_state, where the streaming registers are saved.
* ``kernel-neon-elides-reload``: fpsimd_thread_switch() from aefbab8e77eb (v6.8,
  preemptible kernel-mode NEON) until e92bee9f861b (v6.10): a task switched in inside a
  kernel-mode NEON section gets its kernel state loaded without fpsimd_flush_cpu_state(), so
  a CPU may still name its user state as loaded when the registers hold its NEON values.
* ``kernel-neon-smstop-clobbers``: the same from e92bee9f861b (v6.10) until 01098d893fa8
  (April 2025): fpsimd_flush_cpu_state() after the load, whose SMSTOP zeroes the kernel
  state just loaded when the CPU was left in streaming mode.
* ``sve-trap-keeps-binding`` and ``sme-trap-keeps-binding``: do_sve_acc() before
  751ecf6afd65 (October 2024) and do_sme_acc() before d3eaab3c7090 (December 2024): a task
  preempted and migrated between its access trap and the handler is converted in memory
  but not unbound from the CPU it left (no fpsimd_flush_task_state()); switched back there,
  it returns to user with the trap still armed, traps again and WARNs.
* ``load-fpmr-before-svcr``: task_fpsimd_load() from FPMR support (v6.9) until e5fa85fce08b
  (December 2024) wrote FPMR before SVCR; on a CPU left in the other streaming mode the
  change of PSTATE.SM zeroed the FPMR just loaded. The return to user is reached from
  everywhere, so this one is read from ``Host.variants`` (set at boot), not passed.

The configuration is frozen data passed to every model function; nothing is monkeypatched.
"""

from __future__ import annotations

from dataclasses import dataclass

from fpstate.errors import FpstateError
from fpstate.kernel.arm64 import state

UPSTREAM = "upstream"
FPMR_UNGATED = "fpmr-ungated"
FPMR_SHARED_LAYOUT = "fpmr-shared-layout"
SIGRETURN_NO_FLUSH = "sigreturn-no-flush"
SIGNAL_KEEPS_TPIDR2 = "signal-keeps-tpidr2"
CLONE_INHERITS_TPIDR2 = "clone-inherits-tpidr2"
SIGRETURN_SM_WITHOUT_TIF_SME = "sigreturn-sm-without-tif-sme"
PTRACE_SET_NO_FLUSH = "ptrace-set-no-flush"
SVE_SET_ZEROES_TRACER = "sve-set-zeroes-tracer"
EXEC_KEEPS_FPMR = "exec-keeps-fpmr"
SVE_SET_WITHOUT_TIF_SVE = "sve-set-without-tif-sve"
VL_CHANGE_STALE_SVE = "vl-change-stale-sve"
SIGRETURN_ZA_WITHOUT_SVE_STATE = "sigreturn-za-without-sve-state"
KERNEL_NEON_ELIDES_RELOAD = "kernel-neon-elides-reload"
KERNEL_NEON_SMSTOP_CLOBBERS = "kernel-neon-smstop-clobbers"
SVE_TRAP_KEEPS_BINDING = "sve-trap-keeps-binding"
SME_TRAP_KEEPS_BINDING = "sme-trap-keeps-binding"
LOAD_FPMR_BEFORE_SVCR = state.LOAD_FPMR_BEFORE_SVCR
CPU_DEAD_KEEPS_BINDING = "cpu-dead-keeps-binding"
CPU_PM_KEEPS_BINDING = "cpu-pm-keeps-binding"
KVM_ZCR_RESTORED_AT_PUT = "kvm-zcr-restored-at-put"
KVM_PREPARE_CLEARS_TIF_SVE = "kvm-prepare-clears-tif-sve"

VARIANTS: dict[str, str] = {
    UPSTREAM: "KVM/arm64 as of v6.15+: host FP state saved and unbound at vcpu_load, FPMR "
              "trapped, switched and exposed only if the host has it and the VM advertises it",
    FPMR_UNGATED: "seed 002: FPMR enabled (HCRX_EL2.EnFPM), switched and visible to "
                  "userspace for every guest of an FPMR host",
    FPMR_SHARED_LAYOUT: "seed 002: hyp saves the host FPMR through a pointer past "
                        "uw.fpsimd_state, assuming thread_struct places fpmr there",
    SIGRETURN_NO_FLUSH: "host kernel: restore_sigframe() writes the frame into thread_struct "
                        "while the registers stay bound to the task",
    SIGNAL_KEEPS_TPIDR2: "host kernel: setup_return() enters the handler without zeroing "
                         "TPIDR2_EL0",
    CLONE_INHERITS_TPIDR2: "host kernel: copy_thread() gives every child the parent's "
                           "TPIDR2_EL0 and ZA, resetting TPIDR2_EL0 only for CLONE_SETTLS",
    SIGRETURN_SM_WITHOUT_TIF_SME: "host kernel v6.17 before d2907cbe9ea0: sigreturn restores "
                                  "SVCR.SM without TIF_SME",
    PTRACE_SET_NO_FLUSH: "host kernel: PTRACE_SETREGSET of FP state without "
                         "fpsimd_flush_task_state(target)",
    SVE_SET_ZEROES_TRACER: "host kernel v6.16-v6.18 before 5cbb61bf4168: NT_ARM_(S)SVE "
                           "writes zero the tracer's saved V0-V31/FPSR/FPCR",
    SVE_SET_WITHOUT_TIF_SVE: "host kernel v6.16-v6.18 before 128a7494a9f1: NT_ARM_SVE "
                             "writes set TIF_SVE only with SME",
    EXEC_KEEPS_FPMR: "host kernel before a90878f297d3 (2025): exec does not reset FPMR",
    VL_CHANGE_STALE_SVE: "host kernel v6.7-v6.15 before 49ce484187f7: a VL change takes V "
                         "from a stale sve_state when TIF_SVE is set",
    SIGRETURN_ZA_WITHOUT_SVE_STATE: "host kernel v6.17 before ea8ccfddbce0: sigreturn "
                                    "restores ZA and sets TIF_SME without allocating sve_state",
    KERNEL_NEON_ELIDES_RELOAD: "host kernel v6.8-v6.9 before e92bee9f861b: switching in a "
                               "task in kernel-mode NEON leaves fpsimd_last_state as it was",
    KERNEL_NEON_SMSTOP_CLOBBERS: "host kernel from e92bee9f861b (v6.10) to 01098d893fa8: "
                                 "switching in a task in kernel-mode NEON flushes the CPU "
                                 "(SMSTOP) after loading its kernel state",
    SVE_TRAP_KEEPS_BINDING: "host kernel before 751ecf6afd65 (October 2024): do_sve_acc() "
                            "of a task not live on its CPU leaves it bound to the CPU it left",
    SME_TRAP_KEEPS_BINDING: "host kernel before d3eaab3c7090 (December 2024): do_sme_acc() "
                            "of a task not live on its CPU leaves it bound to the CPU it left",
    CPU_DEAD_KEEPS_BINDING: "host kernel before 32365e64a20e (v4.2, June 2015): a CPU taken "
                            "offline and back keeps fpsimd_last_state",
    CPU_PM_KEEPS_BINDING: "host kernel before 7c68a9cc0402 (v3.18, September 2014): a CPU "
                          "powered down by cpuidle keeps fpsimd_last_state",
    LOAD_FPMR_BEFORE_SVCR: "host kernel from FPMR support (v6.9) to e5fa85fce08b (December "
                           "2024): task_fpsimd_load() writes FPMR before SVCR",
    KVM_ZCR_RESTORED_AT_PUT: "KVM/arm64 nVHE before 59419f10045b (v6.14): the host runs at "
                             "the guest's ZCR_EL1 VL from a guest exit until vcpu_put",
    KVM_PREPARE_CLEARS_TIF_SVE: "KVM/arm64 before fbc7e61195e2 (February 2025): the host's "
                                "state left live at vcpu_load, TIF_SVE cleared, EL0 SVE left "
                                "enabled",
}


@dataclass(frozen=True, slots=True)
class KvmConfig:
    """``variant``: a key of VARIANTS; ``vhe``: run the host at EL2 (CPACR_EL1-layout traps)
    rather than nVHE (CPTR_EL2 layout)."""

    variant: str = UPSTREAM
    vhe: bool = True

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise FpstateError(f"unknown KVM arm64 variant {self.variant!r} "
                               f"(known: {', '.join(VARIANTS)})")
