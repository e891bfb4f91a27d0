"""What FPU init reads before xstate.c runs: boot_cpu_has() flags and the legacy sizes; and
the per-CPU part of fpu/init.c, fpu__init_cpu() and fpu__disable_cpu(), run as a CPU comes
online and goes offline (fpstate.kernel.x86.smpboot).

Models arch/x86/kernel/fpu/init.c (fpu__init_system_early_generic(),
fpu__init_system_xstate_size_legacy()) and the parts of arch/x86/kernel/cpu/ that decide
boot_cpu_has() for the flags of xsave_cpuid_features[]: cpuid-deps.c (do_clear_cpu_cap()
clears every feature depending on a cleared one) and amd.c (erratum 1386).

Theory of operation: boot_cpu_has(X) is the CPUID bit, except where the kernel *clears* it at
boot; only such a clear propagates through cpuid-deps.c (a CPU that simply lacks a base feature
keeps its dependants). Compile-time disabled masks (DISABLE_ENQCMD and friends) do not matter
here: boot_cpu_has() tests only the REQUIRED mask, which is why a v5.16-era Sapphire Rapids
boot log shows 'PASID state' although ENQCMD was disabled at build time. X86_FEATURE_OSPKE is
the kernel's own: setup_pku() sets CR4.PKE whenever the CPU has PKU (CONFIG_X86_INTEL_MEMORY_
PROTECTION_KEYS=y), so a dump's OSPKE bit (the dumping OS's CR4.PKE) is ignored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fpstate.kernel.x86.config import BootCpuCaps
from fpstate.kernel.x86.core import xfd_set_state
from fpstate.kernel.x86.hw import X86_CR4_OSFXSR, X86_CR4_OSXMMEXCPT, X86_CR4_OSXSAVE
from fpstate.kernel.x86.versions import KernelVersion
from fpstate.x86.cpuid import FLAGS, CpuidProfile
from fpstate.x86.xfeatures import XFEATURE_MASK_FP, XFEATURE_MASK_FPSSE

if TYPE_CHECKING:
    from fpstate.kernel.x86.sched import Cpu

#: The CPUID flags xsave_cpuid_features[] and fpu__init_system_xstate() test.
CPUID_CAPS: tuple[str, ...] = (
    "FPU", "FXSR", "XMM", "XSAVE", "AVX", "MPX", "AVX512F", "INTEL_PT", "PKU", "SHSTK",
    "ENQCMD", "AMX_TILE", "APX", "XSAVEOPT", "XSAVEC", "XGETBV1", "XSAVES", "XFD",
)

#: X86_FEATURE_ARCH_LBR: CPUID.(EAX=7,ECX=0):EDX[19] (cpufeatures.h word 18).
ARCH_LBR_BIT = (0x7, 0, 3, 19)

#: cpuid-deps.c rows among the flags above: (feature, depends-on, first listed version).
CPUID_DEPS: tuple[tuple[str, str, str], ...] = (
    ("FXSR", "FPU", "5.16"),
    ("XSAVEOPT", "XSAVE", "5.16"),
    ("XSAVEC", "XSAVE", "5.16"),
    ("XSAVES", "XSAVE", "5.16"),
    ("AVX", "XSAVE", "5.16"),
    ("PKU", "XSAVE", "5.16"),
    ("MPX", "XSAVE", "5.16"),
    ("XGETBV1", "XSAVE", "5.16"),
    ("APX", "XSAVE", "6.16"),
    ("XSAVE", "FXSR", "5.16"),
    ("XMM", "FXSR", "5.16"),
    ("AVX512F", "AVX", "5.16"),
    ("ENQCMD", "XSAVES", "5.16"),
    ("XFD", "XSAVES", "5.16"),
    ("XFD", "XGETBV1", "5.16"),
    ("AMX_TILE", "XFD", "5.16"),
    ("SHSTK", "XSAVES", "6.6"),
)

#: sizeof(struct fxregs_state) and sizeof(struct fregs_state) (arch/x86/include/asm/fpu/types.h).
FXREGS_STATE_SIZE = 512
FREGS_STATE_SIZE = 112

NO_FPU_LINE = "x86/fpu: Giving up, no FPU found and no math emulation present"


def _do_clear_cpu_cap(
    flags: set[str], feature: str, reason: str, kernel: KernelVersion,
    cleared: list[tuple[str, str]],
) -> None:
    """do_clear_cpu_cap() (cpuid-deps.c): clear ``feature`` and, until nothing changes, every
    feature whose cpuid_deps[] row depends on a cleared one."""
    deps = [(f, d) for f, d, since in CPUID_DEPS if kernel.at_least(since)]
    disable = {feature}
    if feature in flags:
        flags.discard(feature)
        cleared.append((feature, reason))
    changed = True
    while changed:
        changed = False
        for f, d in deps:
            if d in disable and f not in disable:
                disable.add(f)
                changed = True
                if f in flags:
                    flags.discard(f)
                    cleared.append((f, f"depends on X86_FEATURE_{d} ({reason})"))


def boot_cpu_caps(profile: CpuidProfile, kernel: KernelVersion) -> BootCpuCaps:
    """The boot_cpu_has() answers fpu__init_system_xstate() gets on ``profile``.

    CPUID bits of :data:`CPUID_CAPS`, plus ARCH_LBR; then the kernel's own changes:
    erratum 1386 (amd.c, v6.3+: XSAVES cleared on AMD family 0x17, with its dependants XFD,
    ENQCMD and, v6.6+, SHSTK) and OSPKE = PKU (setup_pku()).
    """
    flags = {f for f in CPUID_CAPS if profile.has(f)}
    leaf, sub, reg, bit = ARCH_LBR_BIT
    if (profile.cpuid(leaf, sub)[reg] >> bit) & 1:
        flags.add("ARCH_LBR")
    cleared: list[tuple[str, str]] = []
    family = profile.family_model_stepping[0]
    if kernel.has("erratum_1386") and profile.vendor == "amd" and family == 0x17:
        _do_clear_cpu_cap(flags, "XSAVES", "AMD erratum 1386 (XSAVES malfunction on context "
                          "switch) on family 0x17, Zen1/Zen2", kernel, cleared)
    if "PKU" in flags:
        flags.add("OSPKE")
    return BootCpuCaps(flags=frozenset(flags), cleared=tuple(cleared))


def why_absent(profile: CpuidProfile, caps: BootCpuCaps, flag: str) -> str:
    """Why boot_cpu_has(X86_FEATURE_``flag``) is false: the CPUID bit that reads 0, or the
    kernel's reason for clearing it."""
    reason = caps.cleared_reason(flag)
    if reason is not None:
        return f"cleared by the kernel: {reason}"
    if flag == "OSPKE":
        return f"setup_pku() does not set CR4.PKE without PKU: {FLAGS['PKU']}=0"
    if flag == "ARCH_LBR":
        leaf, sub, _, bit = ARCH_LBR_BIT
        return f"CPUID.(EAX={leaf:#x},ECX={sub:#x}):EDX[{bit}]=0"
    return f"{FLAGS[flag]}=0"


def fpu__init_system_xstate_size_legacy(caps: BootCpuCaps) -> tuple[int, int]:
    """fpu__init_system_xstate_size_legacy() (init.c): the buffer size and
    fpu_user_cfg.legacy_features before XSAVE is known.

    FXSR: sizeof(struct fxregs_state) = 512 and FP|SSE; else sizeof(struct fregs_state) = 112
    and FP. (Without an FPU a 64-bit kernel never gets here: fpu__init_system_early_generic()
    halts, :data:`NO_FPU_LINE`.)
    """
    if caps.has("FXSR"):
        return FXREGS_STATE_SIZE, XFEATURE_MASK_FPSSE
    return FREGS_STATE_SIZE, XFEATURE_MASK_FP


# -- per CPU, at run time ---------------------------------------------------------------------


def fpu__disable_cpu(c: Cpu) -> None:
    """fpu__disable_cpu() (fpu/init.c, v6.16+), from cpu_disable_common() as the CPU goes
    offline: kernel_fpu_allowed = false, so that the CPU comes back with irq_fpu_usable()
    false until fpu__init_cpu(). Before 6.16 (and variant ``fpu-usable-before-init-cpu``)
    nothing: in_kernel_fpu was false, which irq_fpu_usable() read as usable."""
    if not c.m.system.runs_unfixed("fpu-usable-before-init-cpu", "kernel_fpu_allowed"):
        c.kernel_fpu_allowed = False


def fpu__init_cpu(c: Cpu) -> None:
    """fpu__init_cpu() (fpu/init.c): fpu__init_cpu_generic() -- CR4.OSFXSR and OSXMMEXCPT,
    FNINIT -- then fpu__init_cpu_xstate() -- CR4.OSXSAVE, IA32_XFD = init_fpstate.xfd through
    xfd_set_state() (the MSR alone before v6.9, and variant ``xfd-state-stale-on-online``),
    XCR0 = fpu_user_cfg.max_features and IA32_XSS = supervisor | independent features, as at
    boot -- then, since v6.16, kernel_fpu_allowed = true."""
    s, regs = c.m.system, c.regs
    regs.cr4 |= X86_CR4_OSFXSR | X86_CR4_OSXMMEXCPT
    regs.fninit()
    regs.cr4 |= X86_CR4_OSXSAVE
    if s.xfd:
        if s.runs_unfixed("xfd-state-stale-on-online", "xfd_state_synced"):
            regs.xfd = s.init_xfd  # wrmsrl(MSR_IA32_XFD, init_fpstate.xfd) alone
        else:
            xfd_set_state(c, s.init_xfd)
    regs.xcr0 = s.xcr0
    regs.xss = s.xss
    c.kernel_fpu_allowed = True
