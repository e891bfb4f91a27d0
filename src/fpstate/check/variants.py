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


VARIANTS: tuple[Variant, ...] = (
    Variant("kvm-save-min-size", "x86", "seed 000",
            "KVM saves the VMM task's registers into a user_fpu allocated at the default size, "
            "after the task's fpstate grew for AMX (kvm_save_current_fpu)",
            "save-within-allocation"),
    Variant("guest-only-in-host-fpstate", "x86", "seed 001",
            "CET supervisor state (CET_KERNEL) in every fpstate, host tasks included "
            "(no guest_default_cfg)", "guest-only-not-in-host-fpstate"),
    Variant("fpmr-ungated", "arm64", "seed 002",
            "HCRX_EL2.EnFPM fixed on: FPMR switched and reachable by every guest of an FPMR "
            "host, advertised or not", "nothing-beyond-advertised"),
    Variant("init-keeps-cet", "x86", "seed 003",
            "vCPU INIT clears only the MPX components: CET_USER/CET_KERNEL survive INIT",
            "init-clears-architectural"),
    Variant("pasid-write-incoherent", "x86", "seed 004",
            "fpu__pasid_write() v1: write IA32_PASID to the register whenever "
            "!TIF_NEED_FPU_LOAD or fpregs_state_valid(); with the flag set the memory image is "
            "the truth", "valid-registers-match-memory"),
    Variant("fpmr-shared-layout", "arm64", "seed 002",
            "hyp saves the host FPMR through a pointer past uw.fpsimd_state "
            "(fpsimd_share_end()), assuming thread_struct's layout", "save-within-allocation"),
    Variant("realloc-no-restore-userregs", "x86", "xstate.c fpstate_realloc()",
            "swap in the zeroed larger buffer without first making the registers "
            "authoritative: the state that lived only in the old buffer is lost",
            "no-lost-write"),
    Variant("ptrace-set-no-invalidate", "x86", "regset.c fpu_force_restore()",
            "PTRACE_SETREGSET modifies a stopped task's fpstate without zapping last_cpu: a "
            "still-cached register copy wins over the write", "valid-registers-match-memory"),
)

BY_NAME: dict[str, Variant] = {v.name: v for v in VARIANTS}
#: The variants of the seeds (fpstate check requires each to be found).
SEED_VARIANTS: tuple[str, ...] = ("kvm-save-min-size", "guest-only-in-host-fpstate",
                                  "fpmr-ungated", "init-keeps-cet", "pasid-write-incoherent")


def get(name: str) -> Variant:
    """The variant called ``name``; FpstateError naming the known ones otherwise."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise FpstateError(f"unknown variant {name!r} (known: {', '.join(BY_NAME)})") from None


__all__ = ["BY_NAME", "SEED_VARIANTS", "VARIANTS", "Variant", "get"]
