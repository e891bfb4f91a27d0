"""Can a KVM/arm64 VM move from one host to another?  FP, SVE, SME and FPMR state.

A VM configuration is a host CPU profile plus what the VMM asks KVM for: the vCPU feature
KVM_ARM_VCPU_SVE, the SVE maximum vector length (KVM_REG_ARM64_SVE_VLS) and ID register
values (KVM_SET_ONE_REG, which may only lower KVM's limit).  Given a source and a
destination configuration, `compat_arm64` builds both VMs in the model (fpstate.kvm.arm64),
exactly as a VMM would, and reports:

* ``lost``: what the guest or the VMM sees on the source but not on the destination (an ID
  register field that drops, a vector length, a register of KVM_GET_REG_LIST, guest state);
* ``gained``: what appears on the destination only (a guest-visible change too);
* ``errors``: each ioctl the destination KVM refuses while the VMM re-creates the VM from
  the source's values (features, VLs, ID registers, then every saved register).
The move is safe iff all three are empty.  A destination that gives no ID registers, SVE
setting or VL inherits them from the source, as a migrating VMM would.

A configuration file is JSON::

    {"cpu": "fvp-aem-fpmr",                       # bundled name, profile file, or object
     "sve": true,                                  # optional: KVM_ARM_VCPU_SVE
     "sve_max_vl_bits": 256,                       # optional: KVM_REG_ARM64_SVE_VLS maximum
     "id_regs": {"ID_AA64PFR2_EL1": "0x0"}}        # optional: values to write
A plain profile (bundled name or profile JSON) means "that CPU, KVM's defaults".
"""

from __future__ import annotations

import errno
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from fpstate.arm64.cpu import CpuProfile, bundled_profile_names, load_profile, profile_from_json
from fpstate.arm64.idregs import ID_REG_DEFS, IdRegs, id_regs_from_mapping, reg_def
from fpstate.errors import ProfileError
from fpstate.inputs import read_text, reason
from fpstate.kvm.arm64 import guest, reset
from fpstate.kvm.arm64.config import KvmConfig
from fpstate.kvm.arm64.invariants import guest_accessible
from fpstate.kvm.arm64.kvm_host import KVM_ARM_VCPU_SVE, KvmWorld, vcpu_has_sve
from fpstate.kvm.arm64.sys_regs import kvm_read_sanitised_id_reg, sysreg_one_reg_id
from fpstate.kvm.arm64.uapi import KVM_REG_ARM64_SVE_VLS, vls_from_vqs, vqs_from_vls

_STATE_NAMES = {"V": "V0-V31", "FPSR": "FPSR/FPCR", "ZHI": "Z0-Z31[VL-1:128]",
                "P": "P0-P15/FFR", "FPMR": "FPMR"}


def errname(ret: int) -> str:
    return errno.errorcode.get(-ret, str(ret))


@dataclass(frozen=True, slots=True)
class VmConfig:
    label: str
    profile: CpuProfile
    sve: bool | None = None
    sve_max_vl_bits: int | None = None
    id_regs: tuple[tuple[str, int], ...] | None = None


def load_vm_config(spec: str) -> VmConfig:
    """A bundled profile name, a profile JSON, or a VM configuration JSON (has "cpu")."""
    if spec in bundled_profile_names():
        return VmConfig(spec, load_profile(spec))
    path = Path(spec)
    if not path.is_file():
        raise ProfileError(f"{spec!r} is neither a bundled arm64 profile "
                           f"({', '.join(bundled_profile_names())}) nor a file")
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ProfileError(f"{spec}: not JSON: {e.msg} at line {e.lineno}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"cannot read {spec}: {reason(e)}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{spec}: expected a JSON object")
    if "cpu" not in data:
        return VmConfig(spec, profile_from_json(data, spec))
    return vm_config_from_json(data, spec)


def vm_config_from_json(data: dict, origin: str) -> VmConfig:
    unknown = set(data) - {"cpu", "sve", "sve_max_vl_bits", "id_regs", "label"}
    if unknown:
        raise ProfileError(f"{origin}: unknown keys {sorted(unknown)}")
    cpu = data["cpu"]
    if isinstance(cpu, str):
        profile = load_profile(cpu)
    elif isinstance(cpu, dict):
        profile = profile_from_json(cpu, f"{origin}: cpu")
    else:
        raise ProfileError(f"{origin}: 'cpu' must be a profile name or a profile object")
    sve = data.get("sve")
    if sve is not None and not isinstance(sve, bool):
        raise ProfileError(f"{origin}: 'sve' must be true or false")
    vl = data.get("sve_max_vl_bits")
    if vl is not None and (not isinstance(vl, int) or isinstance(vl, bool) or vl <= 0
                           or vl % 128):
        raise ProfileError(f"{origin}: 'sve_max_vl_bits' must be a multiple of 128")
    regs = None
    if "id_regs" in data:
        parsed = id_regs_from_mapping(data["id_regs"], origin)
        regs = tuple((reg_def(n).name, parsed.get(n)) for n in data["id_regs"])
    label = data.get("label") or f"{origin} ({profile.name})"
    return VmConfig(str(label), profile, sve, vl, regs)


@dataclass
class _Built:
    world: KvmWorld
    ctx: str
    errors: list[dict] = field(default_factory=list)


def _build(cfg: VmConfig, config: KvmConfig, features: frozenset[str],
           vl_bits: int | None, id_regs: tuple[tuple[str, int], ...] | None,
           vls: tuple[int, ...] | None = None) -> _Built:
    """Create the VM the way a VMM does: INIT, VLS, FINALIZE, then the ID registers."""
    w = reset.kvm_create_vm(reset.kvm_init(cfg.profile, config), "vm")
    w, ctx = reset.kvm_create_vcpu(w, "vm")
    b = _Built(w, ctx)
    w, ret = reset.kvm_arm_vcpu_init(w, ctx, features)
    if ret:
        b.errors.append({"ioctl": "KVM_ARM_VCPU_INIT", "register": "features="
                         + ",".join(sorted(features)), "errno": errname(ret),
                         "detail": "the destination host cannot offer these vCPU features"})
        w, _ = reset.kvm_arm_vcpu_init(w, ctx, frozenset())
    if (vl_bits is not None or vls is not None) and vcpu_has_sve(w, w.vcpu(ctx)):
        if vls is None:
            host_vqs = w.host.caps.sve_vl.vqs  # type: ignore[union-attr]
            vls = vls_from_vqs(frozenset(vq for vq in host_vqs if vq <= vl_bits // 128)
                               or frozenset({vl_bits // 128}))
        w, ret = guest.set_sve_vls(w, w.vcpu(ctx), vls)
        if ret:
            bits = sorted(vq * 128 for vq in vqs_from_vls(vls))
            b.errors.append({"ioctl": "KVM_SET_ONE_REG", "register": "KVM_REG_ARM64_SVE_VLS",
                             "errno": errname(ret), "detail": f"the vector lengths {bits} "
                             "are not exactly the host's up to their maximum"})
    if vcpu_has_sve(w, w.vcpu(ctx)):
        w, _ = reset.kvm_arm_vcpu_finalize(w, ctx)
    for name, value in id_regs or ():
        w, ret = guest.kvm_arm_set_reg(w, ctx, sysreg_one_reg_id(name), value)
        if ret:
            limit = kvm_read_sanitised_id_reg(w.host.caps, name, vcpu_has_sve(w, w.vcpu(ctx)))
            b.errors.append({"ioctl": "KVM_SET_ONE_REG", "register": name,
                             "errno": errname(ret), "detail": f"{value:#x} is not a subset "
                             f"of KVM's limit {limit:#x} on {cfg.profile.name}"})
    b.world = w
    return b


def _summary(b: _Built, cfg: VmConfig) -> dict:
    w, vcpu = b.world, b.world.vcpu(b.ctx)
    _, ids = guest.kvm_arm_copy_reg_indices(w, b.ctx)
    regs = w.vm("vm").id_regs
    return {
        "label": cfg.label, "cpu": cfg.profile.name, "sve": vcpu_has_sve(w, vcpu),
        "sve_vl_bits": _vl_bits(w, b.ctx),
        "id_regs": {n: f"{v:#018x}" for n, v in regs.items()},
        "registers": [guest.reg_name(i) for i in ids],
        "guest_state": sorted(guest_accessible(w, vcpu)),
    }


def _vl_bits(w: KvmWorld, ctx: str) -> list[int]:
    vcpu = w.vcpu(ctx)
    if not vcpu_has_sve(w, vcpu):
        return []
    _, words = guest.get_sve_vls(w, vcpu)
    return sorted(vq * 128 for vq in vqs_from_vls(words or (0,) * 8))


@dataclass(frozen=True, slots=True)
class CompatReport:
    variant: str
    source: dict
    destination: dict
    lost: tuple[dict, ...]
    gained: tuple[dict, ...]
    errors: tuple[dict, ...]

    @property
    def safe(self) -> bool:
        return not (self.lost or self.gained or self.errors)

    def to_json(self) -> dict:
        return {"arch": "arm64", "variant": self.variant, "safe": self.safe,
                "source": self.source, "destination": self.destination,
                "lost": list(self.lost), "gained": list(self.gained),
                "errors": list(self.errors)}


def _field_changes(a: IdRegs, b: IdRegs) -> tuple[list[dict], list[dict]]:
    lost, gained = [], []
    for name, d in ID_REG_DEFS.items():
        for f in d.fields:
            x, y = f.get(a.get(name)), f.get(b.get(name))
            if x == y:
                continue
            item = {"kind": "id_field", "name": f"{name}.{f.name}",
                    "source": f.meaning(x), "destination": f.meaning(y)}
            (lost if y < x else gained).append(item)
    return lost, gained


def compat_arm64(src: VmConfig, dst: VmConfig, variant: str = "upstream") -> CompatReport:
    """The migration check of this module's docstring."""
    config = KvmConfig(variant)
    s_feats = frozenset({KVM_ARM_VCPU_SVE}) if (
        src.profile.id_regs.sve if src.sve is None else src.sve) else frozenset()
    s = _build(src, config, s_feats, src.sve_max_vl_bits, src.id_regs)
    if s.errors:
        e = s.errors[0]
        raise ProfileError(f"source VM cannot be created on {src.profile.name}: {e['ioctl']} "
                           f"{e['register']}: {e['errno']} ({e['detail']})")
    s_vcpu = s.world.vcpu(s.ctx)
    s_regs = s.world.vm("vm").id_regs
    d_feats = s_vcpu.features if dst.sve is None else (
        frozenset({KVM_ARM_VCPU_SVE}) if dst.sve else frozenset())
    d_vls = None
    if dst.sve_max_vl_bits is None and vcpu_has_sve(s.world, s_vcpu):
        _, d_vls = guest.get_sve_vls(s.world, s_vcpu)     # the VMM restores the source's set
    d_ids = dst.id_regs if dst.id_regs is not None else tuple(s_regs.items())
    d = _build(dst, config, d_feats, dst.sve_max_vl_bits, d_ids, d_vls)

    source, destination = _summary(s, src), _summary(d, dst)
    lost, gained = _field_changes(s_regs, d.world.vm("vm").id_regs)
    for kind, key, label in (("vector_length", "sve_vl_bits", "{} bits"),
                             ("register", "registers", "{}"),
                             ("guest_state", "guest_state", "{}")):
        a, b = set(source[key]), set(destination[key])
        for x in sorted(a - b, key=str):
            lost.append({"kind": kind, "name": label.format(_STATE_NAMES.get(x, x))})
        for x in sorted(b - a, key=str):
            gained.append({"kind": kind, "name": label.format(_STATE_NAMES.get(x, x))})

    errors = list(d.errors)
    _, saved = guest.save_vcpu_regs(s.world, s.ctx)
    stream = [(i, v) for i, v in saved if i != KVM_REG_ARM64_SVE_VLS
              and guest.reg_name(i) not in ID_REG_DEFS]
    _, failures = guest.restore_vcpu_regs(d.world, d.ctx, stream)
    for rid, ret in failures:
        errors.append({"ioctl": "KVM_SET_ONE_REG", "register": guest.reg_name(rid),
                       "errno": errname(ret), "detail": "saved on the source, refused on the "
                       "destination"})
    return CompatReport(variant, source, destination, tuple(lost), tuple(gained), tuple(errors))


def compress_names(names: list[str]) -> list[str]:
    """["Z0", "Z1", ..., "Z31", "FFR"] -> ["Z0-Z31", "FFR"] (runs of one prefix)."""
    out: list[str] = []
    run: list[tuple[str, int]] = []

    def flush() -> None:
        if run:
            p, a, b = run[0][0], run[0][1], run[-1][1]
            out.append(f"{p}{a}" if a == b else f"{p}{a}-{p}{b}")
            run.clear()

    for name in names:
        m = re.fullmatch(r"([A-Z]+)(\d+)", name)
        if m and run and run[-1][0] == m[1] and run[-1][1] + 1 == int(m[2]):
            run.append((m[1], int(m[2])))
            continue
        flush()
        if m:
            run.append((m[1], int(m[2])))
        else:
            out.append(name)
    flush()
    return out


def _sorted_regs(names: list[str]) -> list[str]:
    def key(n: str) -> tuple[str, int]:
        m = re.fullmatch(r"([A-Z]+)(\d+)", n)
        return (m[1], int(m[2])) if m else (n, -1)
    return sorted(names, key=key)


def format_report(r: CompatReport) -> str:
    """The human-readable report (the CLI's default output): runs of registers compressed."""
    s, d = r.source, r.destination
    lines = [f"arm64 VM migration ({r.variant} KVM): {s['label']} -> {d['label']}"]
    for role, x in (("source:     ", s), ("destination:", d)):
        sve = f"SVE VLs {x['sve_vl_bits']}" if x["sve"] else "no SVE"
        lines.append(f"  {role} {x['cpu']}: {sve}, guest state {', '.join(x['guest_state'])}, "
                     f"{len(x['registers'])} FP registers")
    for title, items in (("lost (seen on the source, not on the destination)", r.lost),
                         ("gained (new on the destination)", r.gained)):
        if not items:
            continue
        lines.append(f"{title}:")
        regs = _sorted_regs([it["name"] for it in items if it["kind"] == "register"])
        for it in items:
            if it["kind"] != "register":
                extra = f": {it['source']} -> {it['destination']}" if "source" in it else ""
                lines.append(f"  {it['kind']:<14} {it['name']}{extra}")
        if regs:
            lines.append(f"  {'registers':<14} {', '.join(compress_names(regs))}")
    if r.errors:
        lines.append("refused by the destination KVM:")
        groups: dict[tuple[str, str, str], list[str]] = {}
        for e in r.errors:
            groups.setdefault((e["ioctl"], e["errno"], e["detail"]), []).append(e["register"])
        for (ioctl, err, detail), regs in groups.items():
            names = ", ".join(compress_names(regs))
            lines.append(f"  {ioctl} {names}: {err} ({detail})")
    lines.append(f"verdict: {'SAFE' if r.safe else 'UNSAFE'}")
    return "\n".join(lines)
