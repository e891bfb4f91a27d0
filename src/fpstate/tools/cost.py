"""What an FPU management policy costs: memory per thread and bytes moved per context switch.

Policies (each a choice the kernel made or rejected; the numbers come from the models):

- **allocation**: ``on-demand`` (Linux since v5.16: every task embeds a default-sized fpstate;
  the first AMX instruction of a permitted task vzalloc()s a second, permission-sized one --
  `fpstate.kernel.x86.xfd.fpstate_realloc`, run here on the machine model -- while the embedded
  one stays allocated in task_struct) against ``always-max`` (every task's buffer is the host
  maximum, as if AMX tile data were an ordinary feature);
- **CET supervisor space**: ``guests-only`` (v6.17: CET_KERNEL is a guest-only feature, in
  guest_default_cfg but not in the host defaults) against ``every-thread`` (the rejected design
  of seed 001, the KVM model's variant ``guest-only-in-host-fpstate``);
- **init optimisation** (SDM 13.6: a component in its initial configuration, XINUSE[i] = 0, is
  not written) and **modified optimisation** (SDM 13.6: a component unmodified since the XRSTORS
  that loaded it from the same buffer is not written) on and off. XSAVE has neither, XSAVEC the
  init optimisation only, XSAVEOPT and XSAVES (the kernel's choice) both; "modified only" has no
  instruction and is shown for completeness.

Bytes moved per context switch = the outgoing task's save (XSAVES into its fpstate: the 64-byte
header plus every component the optimisations do not skip) + the incoming task's restore
(XRSTORS: the header plus the components whose XSTATE_BV bit is set; a clear bit initialises
without reading). Tasks are paired at random, so the average over a mix is the average save
plus the average restore. x87 counts 160 bytes and SSE 256 (the legacy region's parts).

Thread classes and what they keep in use (XINUSE): ``plain`` SSE and AVX (glibc's string
functions); ``avx512`` plus opmask, ZMM_Hi256, Hi16_ZMM; ``amx`` plus TILECFG and TILEDATA;
``vcpu`` a VMM thread running a guest that uses the avx512 set: its own default fpstate plus the
guest fpstate (guest_default_cfg, which always has the guest-only features). The
``modified_fraction`` of a mix is the share of in-use state a thread modifies between two
switches (the modified optimisation skips the rest). vmalloc'ed buffers are counted in whole
4096-byte pages (vzalloc maps pages); embedded ones in bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import yaml

from fpstate.errors import FpstateError
from fpstate.inputs import read_text
from fpstate.kernel.x86 import xstate_prctl as xp
from fpstate.kernel.x86.sched import Machine
from fpstate.kernel.x86.types import FPSTATE_REGS_OFFSET, FpuSystem
from fpstate.x86.cpuid import CpuidProfile
from fpstate.x86.layout import compacted_size, standard_size
from fpstate.x86.xfeatures import (
    XFEATURE_MASK_AVX512,
    XFEATURE_MASK_SSE,
    XFEATURE_MASK_XTILE,
    XFEATURE_MASK_YMM,
    XSAVE_HDR_SIZE,
    bits,
)

PAGE = 4096
XTILE_DATA = 18
ALLOCATIONS = ("on-demand", "always-max")
CET_POLICIES = ("guests-only", "every-thread")
OPTIMISATIONS = ((False, False, "XSAVE: none"), (True, False, "XSAVEC: init"),
                 (False, True, "modified only"), (True, True, "XSAVES: init+modified"))
CLASSES = ("plain", "avx512", "amx", "vcpu")


@dataclass(frozen=True, slots=True)
class Policy:
    allocation: str
    cet: str
    init_opt: bool
    modified_opt: bool

    @property
    def label(self) -> str:
        opt = next(n for i, m, n in OPTIMISATIONS if (i, m) == (self.init_opt, self.modified_opt))
        return f"{self.allocation}, CET_S {self.cet}, {opt}"


@dataclass(frozen=True, slots=True)
class Mix:
    """A workload mix: ``threads`` host threads of which a share uses AVX-512 or AMX, plus
    ``vcpus`` vCPU threads."""

    name: str
    threads: int
    avx512_share: float
    amx_share: float
    vcpus: int
    modified_fraction: float = 0.5

    def __post_init__(self) -> None:
        for field in ("threads", "vcpus"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise FpstateError(f"mix {self.name!r}: {field} must be a count, not {v!r}")
        for field in ("avx512_share", "amx_share", "modified_fraction"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise FpstateError(f"mix {self.name!r}: {field} must be in [0, 1], not {v!r}")
        if self.avx512_share + self.amx_share > 1:
            raise FpstateError(f"mix {self.name!r}: avx512_share + amx_share exceeds 1")
        if self.threads + self.vcpus == 0:
            raise FpstateError(f"mix {self.name!r} has no threads")

    def weights(self) -> dict[str, float]:
        total = self.threads + self.vcpus
        t = self.threads / total
        return {"plain": t * (1 - self.avx512_share - self.amx_share),
                "avx512": t * self.avx512_share, "amx": t * self.amx_share,
                "vcpu": self.vcpus / total}


DEFAULT_MIXES: tuple[Mix, ...] = (
    Mix("web: 1000 threads, 5% AVX-512", 1000, 0.05, 0.0, 0),
    Mix("HPC: 64 threads, all AVX-512", 64, 1.0, 0.0, 0),
    Mix("inference: 64 threads, 25% AMX", 64, 0.25, 0.25, 0),
    Mix("virtualisation: 16 threads + 32 vCPUs", 16, 0.0, 0.0, 32),
)


@dataclass(frozen=True, slots=True)
class ClassCost:
    memory: int  #: bytes allocated for FPU state per thread of the class
    rfbm: int  #: the fpstate's xfeatures (what XSAVES is asked to save)
    in_use: int  #: XINUSE while it runs


# -- the kernel configurations ---------------------------------------------------------------------


def _systems(profile: CpuidProfile, kernel: str | None) -> dict[str, FpuSystem]:
    """The booted kernel (upstream: CET_S guest-only) and the seed-001 variant (every host
    fpstate carries the guest-only features), from the KVM model's model_system()."""
    from fpstate.kvm.x86.vcpu import model_system

    return {"guests-only": model_system(profile, kernel=kernel),
            "every-thread": model_system(profile, frozenset({"guest-only-in-host-fpstate"}),
                                         kernel=kernel)}


def _size(system: FpuSystem, mask: int) -> int:
    p = system.profile
    return compacted_size(p, mask) if system.xcompacted else standard_size(p, mask)


def _pages(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


def amx_buffer(system: FpuSystem) -> tuple[int, int]:
    """(size, xfeatures) of the fpstate a permitted task gets at its first AMX instruction: the
    machine model runs ARCH_REQ_XCOMP_PERM and the XFD #NM. (default size, default features)
    when the CPU has no AMX."""
    m = Machine(system, 1)
    t = m.spawn("amx")
    m.run(0, t)
    if m.syscall(0, xp.sys_arch_prctl, xp.ARCH_REQ_XCOMP_PERM, XTILE_DATA) == 0:
        m.user_write(0, XTILE_DATA)
    return t.fpu.fpstate.size, t.fpu.fpstate.xfeatures


def class_costs(profile: CpuidProfile, policy_alloc: str, cet: str,
                kernel: str | None = None,
                _cache: dict[Any, dict[str, ClassCost]] | None = None) -> dict[str, ClassCost]:
    """Memory, RFBM and XINUSE of each thread class under an allocation and CET policy."""
    system = _systems(profile, kernel)[cet]
    k = system.kernel
    guest_only = system.guest.features & ~k.default_features & ~XFEATURE_MASK_XTILE
    host_max = k.max_features & ~k.independent_features
    if cet == "guests-only":
        host_max &= ~guest_only
    user = system.user.max_features
    plain_use = user & (XFEATURE_MASK_SSE | XFEATURE_MASK_YMM)
    avx_use = plain_use | (user & XFEATURE_MASK_AVX512)
    amx_use = avx_use | (user & XFEATURE_MASK_XTILE)
    header = FPSTATE_REGS_OFFSET
    embedded = header + k.default_size
    if policy_alloc == "always-max":
        size = header + _size(system, host_max)
        base = ClassCost(size, host_max, 0)
        guest = ClassCost(_pages(header + _size(system, host_max | system.guest.features)),
                          host_max | system.guest.features, 0)
        plain = ClassCost(base.memory, host_max, plain_use)
        return {"plain": plain,
                "avx512": ClassCost(base.memory, host_max, avx_use),
                "amx": ClassCost(base.memory, host_max, amx_use),
                "vcpu": ClassCost(plain.memory + guest.memory, guest.rfbm, avx_use)}
    amx_size, amx_features = amx_buffer(system)
    amx_memory = embedded + (_pages(header + amx_size) if amx_features != k.default_features
                             else 0)
    guest_memory = _pages(header + system.guest.size)
    return {"plain": ClassCost(embedded, k.default_features, plain_use),
            "avx512": ClassCost(embedded, k.default_features, avx_use),
            "amx": ClassCost(amx_memory, amx_features, amx_use),
            "vcpu": ClassCost(embedded + guest_memory, system.guest.features,
                              avx_use & system.guest.features)}


def _component_bytes(profile: CpuidProfile, mask: int) -> int:
    return sum(profile.component(i).size for i in bits(mask))


def save_bytes(profile: CpuidProfile, c: ClassCost, init_opt: bool, modified_opt: bool,
               modified: float) -> float:
    """Bytes XSAVES (or the policy's instruction) writes for one save of a task of class ``c``:
    the header, then per RFBM component -- skipped when not in use (init optimisation) or not
    modified since its restore (modified optimisation: a component not in use is never
    modified)."""
    used = _component_bytes(profile, c.rfbm & c.in_use)
    unused = _component_bytes(profile, c.rfbm & ~c.in_use)
    if modified_opt:
        return XSAVE_HDR_SIZE + used * modified
    return XSAVE_HDR_SIZE + used + (0 if init_opt else unused)


def restore_bytes(profile: CpuidProfile, c: ClassCost) -> int:
    """Bytes XRSTORS reads: the header and the components whose XSTATE_BV bit is set (the
    in-use ones; XSAVE writes XSTATE_BV[i] = XINUSE[i] whatever it writes as data)."""
    return XSAVE_HDR_SIZE + _component_bytes(profile, c.rfbm & c.in_use)


@dataclass(frozen=True, slots=True)
class CostRow:
    mix: str
    policy: Policy
    memory_per_thread: float
    total_memory: int
    bytes_per_switch: float

    def to_dict(self) -> dict[str, Any]:
        p = self.policy
        return {"mix": self.mix, "allocation": p.allocation, "cet_supervisor": p.cet,
                "init_optimisation": p.init_opt, "modified_optimisation": p.modified_opt,
                "memory_per_thread": round(self.memory_per_thread, 1),
                "total_memory": self.total_memory,
                "bytes_per_switch": round(self.bytes_per_switch, 1)}


def cost_table(profile: CpuidProfile, mixes: tuple[Mix, ...] = DEFAULT_MIXES,
               kernel: str | None = None) -> list[CostRow]:
    """Every mix under every policy."""
    rows = []
    costs = {(a, c): class_costs(profile, a, c, kernel) for a in ALLOCATIONS
             for c in CET_POLICIES}
    for mix in mixes:
        w = mix.weights()
        n = mix.threads + mix.vcpus
        for (alloc, cet), cc in costs.items():
            mem = sum(w[k] * cc[k].memory for k in CLASSES)
            for init_opt, mod_opt, _ in OPTIMISATIONS:
                moved = sum(w[k] * (save_bytes(profile, cc[k], init_opt, mod_opt,
                                               mix.modified_fraction)
                                    + restore_bytes(profile, cc[k])) for k in CLASSES)
                rows.append(CostRow(mix.name, Policy(alloc, cet, init_opt, mod_opt), mem,
                                    round(mem * n), moved))
    return rows


def load_workload(path: str) -> tuple[str | None, tuple[Mix, ...]]:
    """A workload file (YAML or JSON): ``{"cpu": NAME (optional), "mixes": [{"name", "threads",
    "avx512_share", "amx_share", "vcpus", "modified_fraction" (optional)}, ...]}``."""
    try:
        text = read_text(path)
    except (OSError, UnicodeDecodeError) as e:
        raise FpstateError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise FpstateError(f"{path}: not YAML/JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("mixes"), list) or not data["mixes"]:
        raise FpstateError(f"{path}: expected an object with a non-empty 'mixes' list")
    mixes = []
    for i, m in enumerate(data["mixes"]):
        if not isinstance(m, dict):
            raise FpstateError(f"{path}: mix {i} is not an object")
        unknown = set(m) - {"name", "threads", "avx512_share", "amx_share", "vcpus",
                            "modified_fraction"}
        if unknown:
            raise FpstateError(f"{path}: mix {i}: unknown field(s) {', '.join(sorted(unknown))}")
        try:
            mixes.append(Mix(str(m.get("name", f"mix {i}")), m.get("threads", 0),
                             m.get("avx512_share", 0.0), m.get("amx_share", 0.0),
                             m.get("vcpus", 0), m.get("modified_fraction", 0.5)))
        except TypeError as e:
            raise FpstateError(f"{path}: mix {i}: {e}") from None
        except FpstateError as e:
            raise FpstateError(f"{path}: {e}") from None
    cpu = data.get("cpu")
    if cpu is not None and not isinstance(cpu, str):
        raise FpstateError(f"{path}: 'cpu' must be a profile name")
    return cpu, tuple(mixes)


def rows_json(rows: list[CostRow]) -> str:
    return json.dumps([r.to_dict() for r in rows], indent=1) + "\n"
