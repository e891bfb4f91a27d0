"""The one kernel-mode FPU user of a CPU's bring-up: AMD's microcode loader hashing a patch.

Models arch/x86/kernel/cpu/microcode/amd.c (cpu_has_entrysign(), verify_sha256_digest(), as of
Linux v6.18) with the x86 SHA-256 library it calls (lib/crypto/x86/sha256.h sha256_blocks():
SIMD code between kernel_fpu_begin() and kernel_fpu_end() when crypto_simd_usable(), the
generic C code otherwise).

Theory of operation: start_secondary() loads microcode (load_ucode_ap()) before cpu_init() and
fpu__init_cpu(), so the bring-up's one FPU user runs on a CPU whose CR4 has neither OSFXSR nor
OSXSAVE. The loader checks the SHA-256 digest of the patch it applies on the CPUs the
EntrySign signature weakness affects (family 17h, 19h, and 1Ah models 00h-2Fh, 40h-4Fh,
60h-6Fh); since 6.16 sha256() may take the FPU for that. Only irq_fpu_usable() stands between
the two: it must say no until fpu__init_cpu() has run (kernel_fpu_allowed, 2297554f01df), or
kernel_fpu_begin_mask()'s LDMXCSR takes #UD -- "Oops: invalid opcode" in
kernel_fpu_begin_mask+0x58, Borislav Petkov's linux-next report of 16 May 2025 (variant
``fpu-usable-before-init-cpu``).

What the model assumes: the CPU coming online applies a patch whose digest is checked --
need_sha_check() is true for firmware revisions up to each model's cutoff, and the
microcode.amd_sha_check=off parameter is not given -- as on the machine of the report.
"""

from __future__ import annotations

from fpstate.kernel.x86 import core
from fpstate.kernel.x86.sched import Cpu
from fpstate.kernel.x86.types import KernelBug
from fpstate.x86.cpuid import CpuidProfile
from fpstate.x86.xfeatures import XFEATURE_MASK_SSE


def cpu_has_entrysign(profile: CpuidProfile) -> bool:
    """cpu_has_entrysign() (microcode/amd.c, v6.18): the AMD families and models whose patches
    the loader accepts only with a known SHA-256 digest."""
    if profile.vendor != "amd":
        return False
    family, model, _ = profile.family_model_stepping
    if family in (0x17, 0x19):
        return True
    return family == 0x1A and (model <= 0x2F or 0x40 <= model <= 0x4F or 0x60 <= model <= 0x6F)


def sha256_blocks(c: Cpu) -> bool:
    """sha256_blocks() (lib/crypto/x86/sha256.h, v6.16+): kernel_fpu_begin(), the SIMD block
    function, kernel_fpu_end() when crypto_simd_usable() -- on x86 irq_fpu_usable() -- else the
    generic C code (and always before 6.16). True when the FPU was used (SHA-NI's XMM
    registers). Taking the FPU before fpu__init_cpu() oopses in kernel_fpu_begin_mask()
    (KernelBug ``invalid-opcode``)."""
    if not c.m.system.kernel_has("sha256_simd") or not core.irq_fpu_usable(c):
        return False
    try:
        core.kernel_fpu_begin(c)
    except KernelBug as bug:
        raise KernelBug(bug.name, f"{bug.detail}, from sha256() of the microcode loader: "
                                  f"irq_fpu_usable() said yes before fpu__init_cpu()") from None
    core.kernel_fpu_clobber(c, XFEATURE_MASK_SSE)
    core.kernel_fpu_end(c)
    return True


def load_ucode_ap(c: Cpu) -> bool:
    """load_ucode_ap() -> load_ucode_amd_ap() -> __apply_microcode_amd() ->
    verify_sha256_digest() on an AMD CPU with EntrySign (`cpu_has_entrysign`): the digest of
    the patch is computed with sha256() (`sha256_blocks`). True when that used the FPU."""
    if not cpu_has_entrysign(c.regs.profile):
        return False
    return sha256_blocks(c)


__all__ = ["cpu_has_entrysign", "load_ucode_ap", "sha256_blocks"]
