"""One KVM/arm64 vCPU configuration for a pool of hosts: ID registers and SVE vector lengths.

The arm64 twin of `fpstate.tools.template`. A VMM that moves guests between arm64 hosts sets,
before the vCPU first runs, the ID register values the guest reads (KVM_SET_ONE_REG: since
v6.7 KVM lets userspace *lower* the fields of its writable mask, and refuses anything else,
arm64_check_features() in sys_regs.c) and the SVE vector lengths (KVM_REG_ARM64_SVE_VLS,
before KVM_ARM_VCPU_FINALIZE: the set must be exactly the host's VLs up to its maximum, since
a guest writing ZCR_EL1.LEN gets the largest implemented VL not above it).

`pool_template_arm64(profiles)` boots the KVM/arm64 model on each host and takes, for every
field of the FP/SVE/SME/FPMR ID registers (fpstate.arm64.idregs):

- a field KVM lets userspace write (ID_WRITABLE_MASK) whose safe value is the lower one: the
  lowest value of the pool (signed fields compare signed: FP/AdvSIMD 0xF is "none");
- any other field: the hosts' common value, or, where they differ, a field the guest still
  sees differently from host to host (`Arm64Template.differ`), named with each host's value;

SVE is offered when every host has it, with the largest maximum VL below which every host
implements the same VLs (`common_sve_max_vq`). Then the template is built on each host exactly
as a VMM would (`fpstate.tools.compat_arm64._build`: KVM_ARM_VCPU_INIT, the VLS register,
FINALIZE, the ID registers) and what the guest sees there is compared: the ioctls KVM refuses
and every difference left are in the result.

Its JSON (`to_json`) carries ``sve``, ``sve_max_vl_bits`` and ``id_regs`` as `fpstate compat
--arch arm64` reads them in a VM configuration.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fpstate.arm64.cpu import CpuProfile
from fpstate.arm64.idregs import ID_REG_DEFS, reg_def
from fpstate.errors import FpstateError
from fpstate.kvm.arm64 import reset
from fpstate.kvm.arm64.config import KvmConfig
from fpstate.kvm.arm64.kvm_host import KVM_ARM_VCPU_SVE
from fpstate.kvm.arm64.sys_regs import ID_WRITABLE_MASK, kvm_read_sanitised_id_reg


class Arm64TemplateError(FpstateError):
    """A pool that has no template (no CPU given)."""


def common_sve_max_vq(vq_sets: Sequence[frozenset[int]]) -> int:
    """The largest VQ every set holds and below which all the sets agree (0: none): the
    maximum a VMM can give KVM_REG_ARM64_SVE_VLS on every host, set_sve_vls() (guest.c)
    taking only the host's VLs up to the maximum, all of them."""
    best = 0
    for vq in sorted(set.intersection(*(set(s) for s in vq_sets)) if vq_sets else ()):
        below = {frozenset(v for v in s if v <= vq) for s in vq_sets}
        if len(below) == 1:
            best = vq
    return best


@dataclass(frozen=True, slots=True)
class HostCheck:
    """The template built on one host: the ioctls refused, and what the guest sees."""

    cpu: str
    errors: tuple[dict[str, str], ...]
    id_regs: dict[str, int]
    sve_vl_bits: tuple[int, ...]
    guest_state: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Arm64Template:
    cpus: tuple[str, ...]
    sve: bool
    sve_max_vl_bits: int | None
    id_regs: tuple[tuple[str, int], ...]
    #: fields the guest still sees differently: "REG.FIELD: v on cpu, ..."
    differ: tuple[str, ...]
    #: what the template gives up: "REG.FIELD lowered to v (from w on cpu)", VLs, SVE
    lowered: tuple[str, ...]
    hosts: tuple[HostCheck, ...] = ()

    @property
    def uniform(self) -> bool:
        """Every host takes the template and its guest sees the same thing on all of them."""
        if any(h.errors for h in self.hosts) or self.differ:
            return False
        seen = {(tuple(sorted(h.id_regs.items())), h.sve_vl_bits, h.guest_state)
                for h in self.hosts}
        return len(seen) <= 1

    def to_json(self) -> dict[str, Any]:
        return {"format": "fpstate-arm64-template/1", "cpus": list(self.cpus),
                "sve": self.sve, "sve_max_vl_bits": self.sve_max_vl_bits,
                "id_regs": {n: f"{v:#018x}" for n, v in self.id_regs},
                "differ": list(self.differ), "lowered": list(self.lowered),
                "uniform": self.uniform,
                "hosts": [{"cpu": h.cpu, "errors": list(h.errors),
                           "id_regs": {n: f"{v:#018x}" for n, v in h.id_regs.items()},
                           "sve_vl_bits": list(h.sve_vl_bits),
                           "guest_state": list(h.guest_state)} for h in self.hosts]}


def _limits(p: CpuProfile, sve: bool) -> dict[str, int]:
    caps = reset.kvm_init(p, KvmConfig()).host.caps
    return {reg: kvm_read_sanitised_id_reg(caps, reg, sve) for reg in ID_REG_DEFS}


def pool_template_arm64(profiles: Sequence[CpuProfile]) -> Arm64Template:
    """The configuration of this module's docstring, built and compared on every host."""
    from fpstate.tools.compat_arm64 import VmConfig, _build, _summary

    if not profiles:
        raise Arm64TemplateError("a template needs at least one CPU")
    names = tuple(p.name for p in profiles)
    sve = all(p.id_regs.sve for p in profiles)
    lowered: list[str] = []
    if not sve and any(p.id_regs.sve for p in profiles):
        lowered.append("SVE: off (not on "
                       + ", ".join(p.name for p in profiles if not p.id_regs.sve) + ")")
    vl_bits = None
    if sve:
        sets = [reset.kvm_init(p, KvmConfig()).host.caps.sve_vl.vqs for p in profiles]
        vq = common_sve_max_vq(sets)
        vl_bits = vq * 128
        for p, s in zip(profiles, sets, strict=True):
            if max(s) > vq:
                lowered.append(f"SVE maximum vector length {vl_bits} bits (from "
                               f"{max(s) * 128} on {p.name})")
    limits = {p.name: _limits(p, sve) for p in profiles}
    regs: list[tuple[str, int]] = []
    differ: list[str] = []
    #: the fields the template sets, per register: (field, value)
    chosen: dict[str, list[tuple[Any, int]]] = {}
    for reg, d in ID_REG_DEFS.items():
        val = limits[names[0]][reg]
        writable = ID_WRITABLE_MASK.get(reg, 0)
        for f in d.fields:
            each = {n: f.get(limits[n][reg]) for n in names}
            if len(set(each.values())) == 1:
                continue
            if f.mask & writable == f.mask and f.safe == "LOWER":
                low = min(each.values())
                val = f.put(val, low)
                chosen.setdefault(reg, []).append((f, low))
                lowered.extend(f"{reg}.{f.name} lowered to {f.meaning(low)} (from "
                               f"{f.meaning(v)} on {n})" for n, v in each.items() if v != low)
            else:
                differ.append(f"{reg}.{f.name}: " + ", ".join(
                    f"{f.meaning(v)} on {n}" for n, v in each.items())
                    + (" (KVM lets no VMM write it)" if f.mask & writable != f.mask
                       else " (KVM takes only the host's value)"))
        regs.append((reg, val))
    feats = frozenset({KVM_ARM_VCPU_SVE}) if sve else frozenset()
    hosts = []
    for p in profiles:
        # Each host's own value, with the fields the template lowers: a field that differs
        # and cannot be written stays the host's (a write of another host's would be refused).
        mine = []
        for reg, _ in regs:
            v = limits[p.name][reg]
            for f, low in chosen.get(reg, ()):
                v = f.put(v, low)
            mine.append((reg, v))
        cfg = VmConfig(p.name, p, sve, vl_bits, tuple(mine))
        b = _build(cfg, KvmConfig(), feats, vl_bits, _writable_only(mine, sve))
        s = _summary(b, cfg)
        hosts.append(HostCheck(p.name, tuple(b.errors),
                               {n: int(v, 16) for n, v in s["id_regs"].items()},
                               tuple(s["sve_vl_bits"]), tuple(s["guest_state"])))
    return Arm64Template(names, sve, vl_bits, tuple(regs), tuple(differ), tuple(lowered),
                         tuple(hosts))


def _writable_only(regs: Sequence[tuple[str, int]], sve: bool) -> tuple[tuple[str, int], ...]:
    """The registers a VMM writes: those with a writable field (a register KVM shows as RAZ,
    ID_AA64SMFR0_EL1 and, without SVE, ID_AA64ZFR0_EL1, only takes 0)."""
    return tuple((n, v) for n, v in regs if ID_WRITABLE_MASK.get(n, 0)
                 and not (n == "ID_AA64ZFR0_EL1" and not sve))


def format_template_arm64(t: Arm64Template) -> str:
    lines = [f"KVM/arm64 vCPU configuration for a guest of {', '.join(t.cpus)}",
             "SVE: " + (f"on, vector lengths up to {t.sve_max_vl_bits} bits "
                        "(KVM_REG_ARM64_SVE_VLS)" if t.sve else "off"),
             "ID registers (KVM_SET_ONE_REG before the first KVM_RUN):"]
    for n, v in t.id_regs:
        d = reg_def(n)
        own = [f.name for f in d.fields if any(x.startswith(f"{n}.{f.name}:")
                                                for x in t.differ)]
        lines.append(f"  {n:18} {v:#018x}" + (
            "   (not writable: KVM's own)" if not ID_WRITABLE_MASK.get(n)
            else f"   ({', '.join(own)}: each host's own)" if own else ""))
    if t.lowered:
        lines += ["", "given up for the pool:"] + [f"  {x}" for x in t.lowered]
    if t.differ:
        lines += ["", "the guest still sees these differently:"] + [f"  x {x}" for x in t.differ]
    lines.append("")
    for h in t.hosts:
        if h.errors:
            lines += [f"  x {h.cpu}: {e['ioctl']} {e['register']}: {e['errno']} ({e['detail']})"
                      for e in h.errors]
    lines.append("on every host the guest sees the same ID registers, vector lengths and state"
                 if t.uniform else "the guest does NOT see the same thing on every host")
    return "\n".join(lines)


__all__ = ["Arm64Template", "Arm64TemplateError", "HostCheck", "common_sve_max_vq",
           "format_template_arm64", "pool_template_arm64"]
