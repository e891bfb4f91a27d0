"""Every arm64 FP size a runtime, sandbox, debugger or VMM author must get right on a CPU, each
from the kernel rule that produces it (``fpstate sizes --arch arm64``).

The figures come from the models: the signal frame from setup_sigframe_layout() and
minsigstksz_setup() (fpstate.kernel.arm64.signal), the regsets from sve_get_common() and
za_get() (fpstate.kernel.arm64.ptrace), the thread buffers from __sve_state_size() and
__sme_state_size() (fpstate.kernel.arm64.fpsimd), a vCPU's from vcpu_sve_state_size()
(fpstate.kvm.arm64.reset). There is no arm64 machine here: nothing is measured.
"""

from __future__ import annotations

from fpstate.arm64.cpu import CpuProfile
from fpstate.arm64.regs import (
    SVE_PT_REGS_SVE,
    USER_FPSIMD_STATE_SIZE,
    ZT_SIG_REG_BYTES,
    sve_pt_size,
    sve_regs_size,
    sve_vq_from_vl,
    za_pt_size,
)
from fpstate.kernel.arm64 import fpsimd
from fpstate.kernel.arm64 import ptrace as pt
from fpstate.kernel.arm64 import signal as sig
from fpstate.kernel.arm64.state import FP_STATE_FPSIMD, FP_STATE_SVE, HostCaps
from fpstate.tools.sizes import Figure, Sizes

#: The kernel these rules are read from.
KERNEL = "6.17"
#: MINSIGSTKSZ of arm64's uapi <asm/signal.h>: all sigaltstack() asks for.
MINSIGSTKSZ = 5120


def _frame(caps: HostCaps, task: sig.SigTask) -> tuple[int, bool]:
    """(sigframe_size(), whether an extra_context was needed) of ``task``'s frame."""
    layout = sig.setup_sigframe_layout(caps, task)
    return sig.sigframe_size(layout), bool(layout.extra_offset)


def compute_sizes(profile: CpuProfile) -> Sizes:
    """The figures of an arm64 CPU profile (see the module docstring)."""
    caps = HostCaps.from_profile(profile)
    host = fpsimd.boot(profile)
    sve_max = caps.sve_vl.max_vl if caps.sve_vl else 0
    sme_max = caps.sme_vl.max_vl if caps.sme_vl else 0
    figs = [
        Figure("at_minsigstksz", sig.minsigstksz(caps),
               "minsigstksz_setup(): setup_sigframe_layout(add_all) + a frame record + 16; "
               "add_all takes SVE at the largest VL and ZT0, but ZA only if the boot task "
               "has PSTATE.ZA set, which it has not: ZA's data is not counted"),
        Figure("sigaltstack_min", MINSIGSTKSZ,
               "do_sigaltstack() with MINSIGSTKSZ: arm64 does not select "
               "CONFIG_DYNAMIC_SIGFRAME, so a stack below AT_MINSIGSTKSZ is accepted and the "
               "signal that does not fit on it is a SIGSEGV"),
    ]
    size, _ = _frame(caps, sig.SigTask(FP_STATE_FPSIMD))
    figs.append(Figure("sigframe_size.fpsimd", size,
                       "sigframe_size() of a thread that never used SVE or SME: fpsimd_context"
                       " and the records every thread gets (sve/za headers, tpidr2, fpmr)"))
    if sve_max:
        size, extra = _frame(caps, sig.SigTask(FP_STATE_SVE, sve_vl=sve_max,
                                               sme_vl=sme_max))
        figs.append(Figure("sigframe_size.sve_max", size,
                           f"sigframe_size() with SVE state at the largest VL ({sve_max})"
                           + ("; needs an extra_context" if extra else "")))
    if sme_max:
        size, extra = _frame(caps, sig.SigTask(FP_STATE_SVE, sm=True, za=True,
                                               sve_vl=sve_max, sme_vl=sme_max))
        figs.append(Figure("sigframe_size.streaming_za_max", size,
                           f"sigframe_size() in streaming mode with ZA at the largest SVL "
                           f"({sme_max})" + (" and ZT0" if caps.sme2 else "")
                           + ("; needs an extra_context" if extra else "")))
    figs.append(Figure("ptrace.fpsimd", USER_FPSIMD_STATE_SIZE,
                       "NT_PRFPREG: struct user_fpsimd_state"))
    n, size = pt.REGSETS[pt.NT_ARM_TLS]
    figs.append(Figure("ptrace.tls", n * size,
                       "NT_ARM_TLS: TPIDR_EL0 and TPIDR2_EL0 on every CPU (TPIDR2_EL0 reads "
                       "as 0 without SME)"))
    if sve_max:
        figs.append(Figure("ptrace.sve_max_size", sve_pt_size(sve_vq_from_vl(sve_max),
                                                              SVE_PT_REGS_SVE),
                           "NT_ARM_SVE header max_size: SVE_PT_SIZE(max VQ, SVE_PT_REGS_SVE)"))
    if sme_max:
        vq = sve_vq_from_vl(sme_max)
        figs.append(Figure("ptrace.ssve_max_size", sve_pt_size(vq, SVE_PT_REGS_SVE),
                           "NT_ARM_SSVE header max_size at the largest SVL"))
        figs.append(Figure("ptrace.za_max_size", za_pt_size(vq),
                           "NT_ARM_ZA with ZA on at the largest SVL: ZA_PT_SIZE(VQ) (za_get() "
                           "reports max_size for the current SVL, not the largest)"))
    if caps.sme2:
        figs.append(Figure("ptrace.zt", ZT_SIG_REG_BYTES, "NT_ARM_ZT: ZT0, 512 bits"))
    if caps.fpmr:
        figs.append(Figure("ptrace.fpmr", 8, "NT_ARM_FPMR: the u64 FPMR"))
    if sve_max or sme_max:
        figs.append(Figure("thread.sve_state", fpsimd.sve_state_size(sve_max, sme_max),
                           "__sve_state_size() at the largest VLs: SVE_SIG_REGS_SIZE of the "
                           "larger of the SVE VL and the SVL (streaming mode uses the same "
                           "buffer)"))
    if sme_max:
        figs.append(Figure("thread.sme_state", fpsimd.sme_state_size(host, sme_max),
                           "__sme_state_size(): ZA at the largest SVL"
                           + (" + ZT_SIG_REG_SIZE (512: bits taken as bytes, 448 of them "
                              "slack)" if caps.sme2 else "")))
    if caps.kvm_sve_max_vl:
        figs.append(Figure("kvm.vcpu_sve_state", sve_regs_size(
            sve_vq_from_vl(caps.kvm_sve_max_vl)),
            f"vcpu_sve_state_size() of a vCPU at kvm_sve_max_vl ({caps.kvm_sve_max_vl}): "
            "SVE_SIG_REGS_SIZE"))
    return Sizes(profile.name, KERNEL, tuple(figs))


__all__ = ["KERNEL", "MINSIGSTKSZ", "compute_sizes"]
