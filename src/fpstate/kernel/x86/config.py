"""The kernel's boot-time FPU configuration, as frozen data.

Mirrors arch/x86/include/asm/fpu/types.h (v6.17): ``struct fpu_state_config`` (the two
instances ``fpu_kernel_cfg`` and ``fpu_user_cfg`` of arch/x86/kernel/fpu/core.c),
``struct vcpu_fpu_config`` (``guest_default_cfg``, v6.17+), the size/feature/XFD facts of
``init_fpstate``, the ``xstate_offsets[]``/``xstate_sizes[]``/``xstate_flags[]`` cache of
setup_xstate_cache() (xstate.c), and the result of ``fpu__init_system_xstate()`` with the
reasons why each enumerated feature was dropped.

Rules of this file: data only (the behaviour lives in ``fpstate.kernel.x86.xstate`` and
``init``); masks are Python ints (64-bit); ``to_dict()`` gives JSON-ready objects with masks
as integers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

#: XSTATE_FLAG_SUPERVISOR and XSTATE_FLAG_ALIGNED64 (xstate.c): CPUID.(EAX=0DH,ECX=i).ECX bits.
XSTATE_FLAG_SUPERVISOR = 1 << 0
XSTATE_FLAG_ALIGNED64 = 1 << 1

#: sizeof(union fpregs_state): the PAGE_SIZE padding that bounds init_fpstate (types.h).
FPREGS_STATE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class FpuStateConfig:
    """``struct fpu_state_config``: one of fpu_kernel_cfg / fpu_user_cfg.

    - max_size / max_features: every feature the kernel supports (kernel: compacted format with
      supervisor states when XCOMPACTED; user: the standard UABI format, user states only);
    - default_size / default_features: without dynamic (permission-gated) features and, since
      v6.17, without guest-only supervisor features;
    - legacy_features: what can be reported without XSAVE (only meaningful in fpu_user_cfg);
    - independent_features: XSAVES features outside the task fpstate (LBR; only in
      fpu_kernel_cfg, and only v6.11+ has the field: 0 before).
    """

    max_size: int
    default_size: int
    max_features: int
    default_features: int
    legacy_features: int = 0
    independent_features: int = 0


@dataclass(frozen=True, slots=True)
class VcpuFpuConfig:
    """``struct vcpu_fpu_config guest_default_cfg`` (v6.17+): a new vCPU's default fpstate."""

    size: int
    features: int


@dataclass(frozen=True, slots=True)
class InitFpstate:
    """The size, xfeatures, xfd and xcomp_bv of ``init_fpstate`` after boot.

    v6.1+: the kernel default size/features (set only once init_xstate_size() succeeded, so 0
    after an earlier disable or without XSAVE); v5.16-v6.0: fpu__init_init_fpstate() copied the
    kernel *max* size/features, whatever happened. ``xfd`` is fpu_user_cfg.max_features &
    XFEATURE_MASK_USER_DYNAMIC, zeroed on disable. ``xcomp_bv`` is what xstate_init_xcomp_bv()
    writes: the features | bit 63 when the kernel uses the compacted format, else 0.
    """

    size: int
    xfeatures: int
    xfd: int
    xcomp_bv: int


@dataclass(frozen=True, slots=True)
class XstateEntry:
    """One row of the kernel's setup_xstate_cache() tables, for a feature of max_features.

    ``offset`` is xstate_offsets[i] (the standard-format offset, None for supervisor features,
    whose CPUID EBX is invalid: the kernel leaves -1); ``flags`` is CPUID ECX.
    """

    number: int
    size: int
    offset: int | None
    flags: int

    @property
    def supervisor(self) -> bool:
        return bool(self.flags & XSTATE_FLAG_SUPERVISOR)

    @property
    def aligned64(self) -> bool:
        return bool(self.flags & XSTATE_FLAG_ALIGNED64)


@dataclass(frozen=True, slots=True)
class XstateCache:
    """xstate_offsets[] / xstate_sizes[] / xstate_flags[] and xfeature_uncompact_order[].

    ``entries`` covers x87 (0, 160 bytes), SSE (160, 256 bytes) and every extended feature of
    fpu_kernel_cfg.max_features. ``compacted`` is X86_FEATURE_XCOMPACTED; ``order_by_offset``
    is whether xstate_calculate_size() walks the standard format by offset (v6.16+) rather than
    taking the highest-numbered feature.
    """

    entries: tuple[XstateEntry, ...]
    compacted: bool
    order_by_offset: bool

    def entry(self, nr: int) -> XstateEntry:
        for e in self.entries:
            if e.number == nr:
                return e
        raise AssertionError(f"xfeature {nr} is not in the xstate cache")

    @property
    def uncompact_order(self) -> tuple[int, ...]:
        """xfeature_uncompact_order[]: the extended user features sorted by standard offset."""
        user = [e for e in self.entries if e.number >= 2 and e.offset is not None]
        return tuple(e.number for e in sorted(user, key=lambda e: e.offset or 0))


@dataclass(frozen=True, slots=True)
class BootCpuCaps:
    """The X86_FEATURE_* flags fpu__init_system_xstate() tests, as boot_cpu_has() sees them.

    ``cleared`` names each flag the CPU reports but the kernel cleared, with the reason (an
    erratum, or a cpuid-deps.c dependency of a cleared flag).
    """

    flags: frozenset[str]
    cleared: tuple[tuple[str, str], ...]

    def has(self, flag: str) -> bool:
        return flag in self.flags

    def cleared_reason(self, flag: str) -> str | None:
        return dict(self.cleared).get(flag)


@dataclass(frozen=True, slots=True)
class DroppedFeature:
    """A feature the CPU enumerates (CPUID 0xD) that is not in fpu_kernel_cfg.max_features."""

    number: int
    enum: str  #: the kernel's enum xfeature name in this version ("-" beyond XFEATURE_MAX)
    reason: str


@dataclass(frozen=True, slots=True)
class BootResult:
    """The outcome of fpu__init_system() / fpu__init_system_xstate() for one CPU and kernel.

    ``disabled`` is None when XSAVE is in use, else the path that gave up on it:
    "no_fpu", "no_xsave", "fp_sse_missing", "apx_mpx", "xstate_buffer_too_small" (v5.16-v6.0),
    "paranoid_size", "init_fpstate_too_small" (v6.1+), or "xsetbv_gp" (the XCR0 the kernel
    computed faults: the boot dies, no disable path runs). ``xcr0``/``ia32_xss``/``ia32_xfd``
    are the values fpu__init_cpu_xstate() writes (None when it never writes that register);
    ``user_size_reported``/``kernel_size_reported`` are what CPUID leaf 0xD sub-leaf 0 and 1 EBX
    report after those writes (the numbers init_xstate_size() reads; sub-leaf 1 only with the
    compacted format). ``lines`` are the exact
    ``x86/fpu:`` lines of the kernel log, in order; ``log`` every message the model printed,
    including WARN texts and the CPUID leaf dump, which have no ``x86/fpu:`` prefix.
    """

    kernel: str
    cpu: str
    enumerated: int
    disabled: str | None
    compacted: bool
    fpu_kernel_cfg: FpuStateConfig
    fpu_user_cfg: FpuStateConfig
    guest_default_cfg: VcpuFpuConfig | None
    init_fpstate: InitFpstate
    xcr0: int | None
    ia32_xss: int | None
    ia32_xfd: int | None
    user_size_reported: int | None
    kernel_size_reported: int | None
    xstate: XstateCache | None
    caps: BootCpuCaps
    dropped: tuple[DroppedFeature, ...]
    lines: tuple[str, ...]
    log: tuple[str, ...]

    @property
    def xsave_enabled(self) -> bool:
        return self.disabled is None

    @property
    def independent_features(self) -> int:
        return self.fpu_kernel_cfg.independent_features

    def dropped_reason(self, nr: int) -> str | None:
        """Why feature ``nr`` was dropped, None when it was not (or is not enumerated)."""
        for d in self.dropped:
            if d.number == nr:
                return d.reason
        return None

    def to_dict(self) -> dict[str, Any]:
        """The ``fpstate boot-log --json`` object: every field, masks as integers."""
        xstate = None
        if self.xstate is not None:
            xstate = {
                "compacted": self.xstate.compacted,
                "features": [
                    {"number": e.number, "size": e.size, "offset": e.offset,
                     "supervisor": e.supervisor, "aligned64": e.aligned64}
                    for e in self.xstate.entries
                ],
            }
        return {
            "kernel": self.kernel,
            "cpu": self.cpu,
            "enumerated": self.enumerated,
            "xsave_enabled": self.xsave_enabled,
            "disabled": self.disabled,
            "compacted": self.compacted,
            "fpu_kernel_cfg": asdict(self.fpu_kernel_cfg),
            "fpu_user_cfg": asdict(self.fpu_user_cfg),
            "guest_default_cfg": (asdict(self.guest_default_cfg)
                                  if self.guest_default_cfg is not None else None),
            "init_fpstate": asdict(self.init_fpstate),
            "xcr0": self.xcr0,
            "ia32_xss": self.ia32_xss,
            "ia32_xfd": self.ia32_xfd,
            "user_size_reported": self.user_size_reported,
            "kernel_size_reported": self.kernel_size_reported,
            "xstate": xstate,
            "caps": sorted(self.caps.flags),
            "caps_cleared": [{"flag": f, "reason": r} for f, r in self.caps.cleared],
            "dropped": [{"number": d.number, "enum": d.enum, "reason": d.reason}
                        for d in self.dropped],
            "lines": list(self.lines),
            "log": list(self.log),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"
