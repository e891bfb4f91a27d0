"""arm64 CPU profiles: ID register values and implemented vector lengths of a real core.

A profile is a JSON file (bundled ones live in ``fpstate/arm64/profiles/``)::

    {"name": "neoverse-v1", "description": "...", "midr": "0x411FD402",
     "id_regs": {"ID_AA64PFR0_EL1": "0x...", ...},          # missing registers read 0
     "sve_vl_bits": [128, 256], "sme_vl_bits": [],
     "sources": {"ID_AA64PFR0_EL1": "where the value comes from", ...}}

The vector lengths are what the kernel's vec_probe_vqs() would find: the set of VLs the PE
implements (for SVE 128 bits is mandatory; SVE2 and SME allow powers of two only).  A profile
is checked for consistency with its own ID registers (SVE VLs iff ID_AA64PFR0_EL1.SVE, SME
VLs iff ID_AA64PFR1_EL1.SME) and every registered value must leave RES0 bits clear; any
violation is a `ProfileError` naming the file and the rule.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fpstate.arm64.idregs import ID_REG_DEFS, IdRegs, id_regs_from_mapping, parse_hex64
from fpstate.arm64.regs import SVE_VQ_BYTES, VL_ARCH_MAX
from fpstate.errors import ProfileError
from fpstate.inputs import read_text, reason


@dataclass(frozen=True, slots=True)
class CpuProfile:
    name: str
    description: str
    midr: int | None
    id_regs: IdRegs
    sve_vqs: frozenset[int]
    sme_vqs: frozenset[int]
    sources: tuple[tuple[str, str], ...]

    @property
    def sve_vl_bits(self) -> list[int]:
        return sorted(vq * 128 for vq in self.sve_vqs)

    @property
    def sme_vl_bits(self) -> list[int]:
        return sorted(vq * 128 for vq in self.sme_vqs)

    def to_json(self) -> dict:
        return {
            "name": self.name, "description": self.description,
            "midr": None if self.midr is None else f"{self.midr:#010x}",
            "id_regs": {n: f"{v:#018x}" for n, v in self.id_regs.items()},
            "sve_vl_bits": self.sve_vl_bits, "sme_vl_bits": self.sme_vl_bits,
            "sources": dict(self.sources),
        }


def _vqs(raw: object, what: str) -> frozenset[int]:
    if not isinstance(raw, list) or not all(isinstance(b, int) and not isinstance(b, bool)
                                            for b in raw):
        raise ProfileError(f"{what}: expected a list of vector lengths in bits")
    vqs = set()
    for bits in raw:
        if bits <= 0 or bits % 128 or bits // 8 > VL_ARCH_MAX:
            raise ProfileError(f"{what}: {bits} is not a multiple of 128 bits up to 2048")
        vqs.add(bits // (SVE_VQ_BYTES * 8))
    return frozenset(vqs)


def profile_from_json(data: object, origin: str) -> CpuProfile:
    """Validate a decoded JSON profile; `ProfileError` names ``origin`` and the rule broken."""
    if not isinstance(data, dict):
        raise ProfileError(f"{origin}: a profile is a JSON object")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ProfileError(f"{origin}: 'name' must be a non-empty string")
    midr = data.get("midr")
    midr_val = None if midr is None else parse_hex64(midr, f"{origin}: midr")
    regs = id_regs_from_mapping(data.get("id_regs", {}), origin)
    for reg_name, value in regs.items():
        stray = value & ID_REG_DEFS[reg_name].res0
        if stray:
            raise ProfileError(f"{origin}: {reg_name} = {value:#x} sets RES0 bits {stray:#x}")
    sve = _vqs(data.get("sve_vl_bits", []), f"{origin}: sve_vl_bits")
    sme = _vqs(data.get("sme_vl_bits", []), f"{origin}: sme_vl_bits")
    if regs.sve != bool(sve):
        raise ProfileError(f"{origin}: ID_AA64PFR0_EL1.SVE={int(regs.sve)} but sve_vl_bits "
                           f"is {sorted(v * 128 for v in sve)}")
    if sve and 1 not in sve:
        raise ProfileError(f"{origin}: SVE requires 128-bit vectors (Arm ARM: VL 128 is "
                           "mandatory)")
    if regs.sme != bool(sme):
        raise ProfileError(f"{origin}: ID_AA64PFR1_EL1.SME={int(regs.sme)} but sme_vl_bits "
                           f"is {sorted(v * 128 for v in sme)}")
    sve2 = regs.sve and regs.field("ID_AA64ZFR0_EL1", "SVEver") >= 1
    for label, vqs, pow2 in (("sve_vl_bits", sve, sve2), ("sme_vl_bits", sme, True)):
        if pow2 and any(vq & (vq - 1) for vq in vqs):
            raise ProfileError(f"{origin}: {label}: SVE2 and SME allow only power-of-two "
                               "vector lengths")
    sources = data.get("sources", {})
    if not isinstance(sources, dict) or not all(isinstance(v, str) for v in sources.values()):
        raise ProfileError(f"{origin}: 'sources' must map register names to text")
    desc = data.get("description", "")
    if not isinstance(desc, str):
        raise ProfileError(f"{origin}: 'description' must be a string")
    return CpuProfile(name, desc, midr_val, regs, sve, sme,
                      tuple(sorted((str(k), v) for k, v in sources.items())))


def bundled_profile_names() -> list[str]:
    folder = resources.files("fpstate.arm64") / "profiles"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def load_profile(spec: str) -> CpuProfile:
    """A bundled profile by name, or a JSON file by path."""
    if spec in bundled_profile_names():
        text = (resources.files("fpstate.arm64") / "profiles" / f"{spec}.json").read_text()
        origin = f"bundled profile {spec!r}"
    else:
        path = Path(spec)
        if not path.is_file():
            raise ProfileError(f"{spec!r} is neither a bundled arm64 profile "
                               f"({', '.join(bundled_profile_names())}) nor a file")
        try:
            text, origin = read_text(path), str(path)
        except (OSError, UnicodeDecodeError) as e:
            raise ProfileError(f"cannot read {spec}: {reason(e)}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProfileError(f"{origin}: not JSON: {e.msg} at line {e.lineno}") from None
    return profile_from_json(data, origin)
