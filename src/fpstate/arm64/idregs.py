"""The AArch64 ID registers that enumerate FP, SVE, SME and FPMR, with their real fields.

Field positions are those of the Arm ARM (DDI0601) as transcribed in Linux
``arch/arm64/tools/sysreg`` (v6.17), every field of it: ID_AA64PFR0_EL1, ID_AA64PFR1_EL1,
ID_AA64PFR2_EL1, ID_AA64ZFR0_EL1, ID_AA64SMFR0_EL1 and ID_AA64FPFR0_EL1.  ``safe`` is the field's
arm64_ftr_bits safe-value type as KVM's arm64_check_features() applies it: for ``LOWER``
fields a value is acceptable if it is not above the limit (signed fields compare signed:
FP/AdvSIMD 0xF means "not implemented" and is the lowest value).

Completeness is checked at import: fields of a register never overlap and fit in 64 bits,
every register has an encoding, a reference and at least one field.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from fpstate.arm64.statemachine import replace
from fpstate.errors import ProfileError


@dataclass(frozen=True, slots=True)
class Field:
    """One ID register field: bits [shift+width-1:shift]."""

    name: str
    shift: int
    width: int = 4
    signed: bool = False
    safe: str = "LOWER"
    values: tuple[tuple[int, str], ...] = ()

    @property
    def mask(self) -> int:
        return ((1 << self.width) - 1) << self.shift

    def get(self, reg: int) -> int:
        raw = (reg >> self.shift) & ((1 << self.width) - 1)
        if self.signed and raw >> (self.width - 1):
            return raw - (1 << self.width)
        return raw

    def put(self, reg: int, value: int) -> int:
        raw = value & ((1 << self.width) - 1)
        return (reg & ~self.mask) | (raw << self.shift)

    def meaning(self, value: int) -> str:
        for v, name in self.values:
            if v == value:
                return name
        return f"{value:#x}" if value >= 0 else str(value)


@dataclass(frozen=True, slots=True)
class IdRegDef:
    name: str
    enc: tuple[int, int, int, int, int]
    fields: tuple[Field, ...]
    ref: str

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise ProfileError(f"{self.name} has no field {name!r}")

    @property
    def defined_mask(self) -> int:
        m = 0
        for f in self.fields:
            m |= f.mask
        return m

    @property
    def res0(self) -> int:
        return ~self.defined_mask & ((1 << 64) - 1)

    def decode(self, value: int) -> dict[str, int]:
        return {f.name: f.get(value) for f in self.fields}


_NI_IMP = ((0, "NI"), (1, "IMP"))
_SIGNED_FP = ((0, "IMP"), (1, "FP16"), (-1, "NI"))
_REF = "Arm ARM DDI0601; Linux arch/arm64/tools/sysreg (v6.17)"

ID_AA64PFR0_EL1 = IdRegDef("ID_AA64PFR0_EL1", (3, 0, 0, 4, 0), (
    Field("CSV3", 60, values=_NI_IMP), Field("CSV2", 56, values=_NI_IMP),
    Field("RME", 52, values=_NI_IMP), Field("DIT", 48, values=_NI_IMP),
    Field("AMU", 44, values=((0, "NI"), (1, "IMP"), (2, "V1P1"))),
    Field("MPAM", 40), Field("SEL2", 36, values=_NI_IMP),
    Field("SVE", 32, values=_NI_IMP),
    Field("RAS", 28, values=((0, "NI"), (1, "IMP"), (2, "V1P1"))),
    Field("GIC", 24, safe="EXACT", values=((0, "NI"), (1, "IMP"), (3, "V4P1"))),
    Field("AdvSIMD", 20, signed=True, values=_SIGNED_FP),
    Field("FP", 16, signed=True, values=_SIGNED_FP),
    Field("EL3", 12), Field("EL2", 8), Field("EL1", 4), Field("EL0", 0),
), _REF)

ID_AA64PFR1_EL1 = IdRegDef("ID_AA64PFR1_EL1", (3, 0, 0, 4, 1), (
    Field("PFAR", 60), Field("DF2", 56), Field("MTEX", 52), Field("THE", 48),
    Field("GCS", 44), Field("MTE_frac", 40, safe="EXACT"), Field("NMI", 36),
    Field("CSV2_frac", 32), Field("RNDR_trap", 28),
    Field("SME", 24, values=((0, "NI"), (1, "IMP"), (2, "SME2"))),
    Field("MPAM_frac", 16), Field("RAS_frac", 12),
    Field("MTE", 8, values=((0, "NI"), (1, "IMP"), (2, "MTE2"), (3, "MTE3"))),
    Field("SSBS", 4), Field("BT", 0),
), _REF)

ID_AA64PFR2_EL1 = IdRegDef("ID_AA64PFR2_EL1", (3, 0, 0, 4, 2), (
    Field("FPMR", 32, values=_NI_IMP), Field("UINJ", 16), Field("GCIE", 12),
    Field("MTEFAR", 8), Field("MTESTOREONLY", 4), Field("MTEPERM", 0),
), _REF)

ID_AA64ZFR0_EL1 = IdRegDef("ID_AA64ZFR0_EL1", (3, 0, 0, 4, 4), (
    Field("F64MM", 56), Field("F32MM", 52), Field("F16MM", 48), Field("I8MM", 44),
    Field("SM4", 40), Field("SHA3", 32), Field("B16B16", 24), Field("BF16", 20),
    Field("BitPerm", 16), Field("EltPerm", 12), Field("AES", 4),
    Field("SVEver", 0, values=((0, "IMP"), (1, "SVE2"), (2, "SVE2p1"), (3, "SVE2p2"))),
), _REF)

# ID_AA64SMFR0_EL1 and ID_AA64FPFR0_EL1 use the "alternative ID scheme" (single-bit fields).
ID_AA64SMFR0_EL1 = IdRegDef("ID_AA64SMFR0_EL1", (3, 0, 0, 4, 5), (
    Field("FA64", 63, 1), Field("LUTv2", 60, 1),
    Field("SMEver", 56, values=((0, "SME"), (1, "SME2"), (2, "SME2p1"), (3, "SME2p2"))),
    Field("I16I64", 52), Field("F64F64", 48, 1), Field("I16I32", 44),
    Field("B16B16", 43, 1), Field("F16F16", 42, 1), Field("F8F16", 41, 1),
    Field("F8F32", 40, 1), Field("I8I32", 36), Field("F16F32", 35, 1),
    Field("B16F32", 34, 1), Field("BI32I32", 33, 1), Field("F32F32", 32, 1),
    Field("SF8FMA", 30, 1), Field("SF8DP4", 29, 1), Field("SF8DP2", 28, 1),
    Field("SBitPerm", 25, 1), Field("AES", 24, 1), Field("SFEXPA", 23, 1),
    Field("STMOP", 16, 1), Field("SMOP4", 0, 1),
), _REF)

ID_AA64FPFR0_EL1 = IdRegDef("ID_AA64FPFR0_EL1", (3, 0, 0, 4, 7), (
    Field("F8CVT", 31, 1), Field("F8FMA", 30, 1), Field("F8DP4", 29, 1),
    Field("F8DP2", 28, 1), Field("F8MM8", 27, 1), Field("F8MM4", 26, 1),
    Field("F8E4M3", 1, 1), Field("F8E5M2", 0, 1),
), _REF)

ID_REG_DEFS: dict[str, IdRegDef] = {d.name: d for d in (
    ID_AA64PFR0_EL1, ID_AA64PFR1_EL1, ID_AA64PFR2_EL1, ID_AA64ZFR0_EL1, ID_AA64SMFR0_EL1,
    ID_AA64FPFR0_EL1)}

#: IdRegs attribute for each register, in encoding order.
ATTR: dict[str, str] = {
    "ID_AA64PFR0_EL1": "pfr0", "ID_AA64PFR1_EL1": "pfr1", "ID_AA64PFR2_EL1": "pfr2",
    "ID_AA64ZFR0_EL1": "zfr0", "ID_AA64SMFR0_EL1": "smfr0", "ID_AA64FPFR0_EL1": "fpfr0"}


def _check_tables() -> None:
    for d in ID_REG_DEFS.values():
        assert d.fields and d.ref and len(d.enc) == 5, d.name
        seen = 0
        for f in d.fields:
            assert 0 <= f.shift and f.shift + f.width <= 64, (d.name, f.name)
            assert not seen & f.mask, f"{d.name}.{f.name} overlaps"
            seen |= f.mask
    assert set(ATTR) == set(ID_REG_DEFS)


_check_tables()


def reg_def(name: str) -> IdRegDef:
    try:
        return ID_REG_DEFS[name.upper()]
    except KeyError:
        raise ProfileError(f"unknown ID register {name!r} (known: "
                           f"{', '.join(ID_REG_DEFS)})") from None


@dataclass(frozen=True, slots=True)
class IdRegs:
    """The six FP-relevant ID register values of a CPU or of a VM."""

    pfr0: int = 0
    pfr1: int = 0
    pfr2: int = 0
    zfr0: int = 0
    smfr0: int = 0
    fpfr0: int = 0

    def get(self, name: str) -> int:
        return getattr(self, ATTR[reg_def(name).name])

    def with_reg(self, name: str, value: int) -> IdRegs:
        if not 0 <= value < 1 << 64:
            raise ProfileError(f"{name} = {value:#x} does not fit in 64 bits")
        return replace(self, **{ATTR[reg_def(name).name]: value})

    def field(self, reg: str, name: str) -> int:
        hit = _FIELD_OF.get((reg, name))
        if hit is None:
            d = reg_def(reg)
            hit = _FIELD_OF[(reg, name)] = (ATTR[d.name], d.field(name))
        return hit[1].get(getattr(self, hit[0]))

    def items(self) -> list[tuple[str, int]]:
        return [(n, self.get(n)) for n in ID_REG_DEFS]

    # Feature predicates (the kernel's cpus_have_cap()/kvm_has_feat() questions).
    @property
    def fp(self) -> bool:
        return self.field("ID_AA64PFR0_EL1", "FP") >= 0

    @property
    def advsimd(self) -> bool:
        return self.field("ID_AA64PFR0_EL1", "AdvSIMD") >= 0

    @property
    def sve(self) -> bool:
        return self.field("ID_AA64PFR0_EL1", "SVE") >= 1

    @property
    def sme(self) -> bool:
        return self.field("ID_AA64PFR1_EL1", "SME") >= 1

    @property
    def sme2(self) -> bool:
        return self.field("ID_AA64PFR1_EL1", "SME") >= 2

    @property
    def fa64(self) -> bool:
        return self.sme and self.field("ID_AA64SMFR0_EL1", "FA64") == 1

    @property
    def fpmr(self) -> bool:
        return self.field("ID_AA64PFR2_EL1", "FPMR") >= 1

    @property
    def fp8(self) -> bool:
        return self.fpmr and self.field("ID_AA64FPFR0_EL1", "F8CVT") == 1


#: (register, field) -> (IdRegs attribute, Field), for IdRegs.field (KVM asks it at every
#: trap and every visibility check).
_FIELD_OF: dict[tuple[str, str], tuple[str, Field]] = {}


def parse_hex64(text: object, what: str) -> int:
    """A 64-bit value from a JSON profile: an int or a hex string; ProfileError otherwise."""
    if isinstance(text, bool):
        raise ProfileError(f"{what}: expected a 64-bit value, got {text!r}")
    if isinstance(text, int):
        value = text
    elif isinstance(text, str):
        t = text.strip().replace("_", "")
        try:
            value = int(t, 16) if t.lower().startswith("0x") else int(t, 0)
        except ValueError:
            raise ProfileError(f"{what}: {text!r} is not a number") from None
    else:
        raise ProfileError(f"{what}: expected a 64-bit value, got {type(text).__name__}")
    if not 0 <= value < 1 << 64:
        raise ProfileError(f"{what}: {value:#x} does not fit in 64 bits")
    return value


def id_regs_from_mapping(values: dict[str, object], what: str,
                         base: IdRegs | None = None) -> IdRegs:
    """IdRegs from ``{"ID_AA64PFR0_EL1": "0x...", ...}``; unknown names raise ProfileError."""
    regs = base or IdRegs()
    if not isinstance(values, dict):
        raise ProfileError(f"{what}: id_regs must be an object of register: value")
    for name, raw in values.items():
        d = reg_def(str(name))
        regs = regs.with_reg(d.name, parse_hex64(raw, f"{what}: {d.name}"))
    return regs


assert [f.name for f in fields(IdRegs)] == list(ATTR.values())
