"""CPUID profiles: the answers of one CPU to CPUID, as frozen data, and the facts derived from them.

Models the CPUID side of ``fpu__init_system_xstate()`` and ``setup_xstate_cache()``
(arch/x86/kernel/fpu/xstate.c, v6.17) and Intel SDM Vol. 1 section 13.2 ("Enumeration of
CPU support for XSAVE instructions and XSAVE-supported features"):

- CPUID.(EAX=0DH,ECX=0):EDX:EAX is the set of components XCR0 may enable
  (:attr:`CpuidProfile.xcr0_supported`), CPUID.(EAX=0DH,ECX=1):EDX:ECX the set IA32_XSS may
  enable (:attr:`CpuidProfile.xss_supported`);
- CPUID.(EAX=0DH,ECX=i), i >= 2: EAX = size of component i, EBX = its offset in the standard
  format (meaningless, and reported here as 0, for supervisor components), ECX bit 0 = supervisor
  (IA32_XSS) component, bit 1 = 64-byte aligned in the compacted format, bit 2 = supports XFD;
- x87 (160 bytes at 0) and SSE (256 bytes at 160) are the fixed legacy region, never enumerated.

Rules of this file:
- a profile is data only: ``CpuidProfile.cpuid()`` answers as the CPU does, and every derived
  fact is computed from those answers, never stored beside them;
- feature flags are one table (:data:`FLAGS`) of (leaf, sub-leaf, register, bit) with the kernel
  name of the flag (arch/x86/include/asm/cpufeatures.h, arch/x86/kernel/cpu/scattered.c);
- dump parsers live in ``fpstate.x86.profiles``; the host snapshot in ``fpstate.host.cpuid``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from fpstate.errors import MaskError, ProfileError
from fpstate.x86.xfeatures import BY_NUMBER, bits

Regs = tuple[int, int, int, int]
_ZERO: Regs = (0, 0, 0, 0)

VENDORS: tuple[str, ...] = ("intel", "amd", "hygon", "zhaoxin", "centaur", "unknown")

#: CPUID.0 vendor strings (EBX, EDX, ECX) -> vendor, as arch/x86/kernel/cpu/*.c match them.
_VENDOR_IDS: dict[str, str] = {
    "GenuineIntel": "intel",
    "AuthenticAMD": "amd",
    "HygonGenuine": "hygon",
    "  Shanghai  ": "zhaoxin",
    "CentaurHauls": "centaur",
}

#: Leaves whose output depends on ECX (the SDM's "sub-leaf" leaves). For every other leaf the CPU
#: ignores ECX, and so does :meth:`CpuidProfile.cpuid`.
SUBLEAF_LEAVES: frozenset[int] = frozenset({
    0x4, 0x7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1B, 0x1D, 0x1E, 0x1F, 0x20, 0x23,
    0x24, 0x8000001D, 0x80000020, 0x80000026,
})

_REG = {"eax": 0, "ebx": 1, "ecx": 2, "edx": 3}


@dataclass(frozen=True, slots=True)
class Flag:
    """One CPUID feature bit: CPUID.(EAX=leaf,ECX=subleaf):reg[bit]."""

    name: str
    leaf: int
    subleaf: int
    reg: str
    bit: int
    reference: str

    def __str__(self) -> str:
        sub = f",ECX={self.subleaf:#x}" if self.leaf in SUBLEAF_LEAVES else ""
        return f"CPUID.(EAX={self.leaf:#x}{sub}):{self.reg.upper()}[{self.bit}]"


_CF = "cpufeatures.h"
#: The flags that gate xfeatures (xsave_cpuid_features[] in xstate.c) and the XSAVE extensions.
FLAGS: dict[str, Flag] = {f.name: f for f in (
    Flag("FPU", 0x1, 0, "edx", 0, _CF + " word 0"),
    Flag("FXSR", 0x1, 0, "edx", 24, _CF + " word 0"),
    Flag("XMM", 0x1, 0, "edx", 25, _CF + " word 0 (\"sse\")"),
    Flag("XSAVE", 0x1, 0, "ecx", 26, _CF + " word 4"),
    Flag("OSXSAVE", 0x1, 0, "ecx", 27, _CF + " word 4 (CR4.OSXSAVE as set by the OS)"),
    Flag("AVX", 0x1, 0, "ecx", 28, _CF + " word 4"),
    Flag("MPX", 0x7, 0, "ebx", 14, _CF + " word 9"),
    Flag("AVX512F", 0x7, 0, "ebx", 16, _CF + " word 9"),
    Flag("INTEL_PT", 0x7, 0, "ebx", 25, _CF + " word 9"),
    Flag("PKU", 0x7, 0, "ecx", 3, _CF + " word 16"),
    Flag("OSPKE", 0x7, 0, "ecx", 4, _CF + " word 16 (CR4.PKE as set by the OS)"),
    Flag("SHSTK", 0x7, 0, "ecx", 7, _CF + " word 16"),
    Flag("ENQCMD", 0x7, 0, "ecx", 29, _CF + " word 16"),
    Flag("IBT", 0x7, 0, "edx", 20, _CF + " word 18"),
    Flag("AMX_BF16", 0x7, 0, "edx", 22, _CF + " word 18"),
    Flag("AMX_TILE", 0x7, 0, "edx", 24, _CF + " word 18"),
    Flag("AMX_INT8", 0x7, 0, "edx", 25, _CF + " word 18"),
    Flag("APX", 0x7, 1, "edx", 21, "scattered.c (leaf 7 sub-leaf 1 EDX bit 21)"),
    Flag("XSAVEOPT", 0xD, 1, "eax", 0, _CF + " word 10"),
    Flag("XSAVEC", 0xD, 1, "eax", 1, _CF + " word 10"),
    Flag("XGETBV1", 0xD, 1, "eax", 2, _CF + " word 10"),
    Flag("XSAVES", 0xD, 1, "eax", 3, _CF + " word 10"),
    Flag("XFD", 0xD, 1, "eax", 4, _CF + " word 10 (eXtended Feature Disabling)"),
    Flag("LWP", 0x80000001, 0, "ecx", 15, _CF + " word 6"),
)}


def _u32(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFFFFFF:
        raise ProfileError(f"{what}: {value!r} is not a 32-bit register value")
    return value


class LeafTable(Mapping[tuple[int, int], Regs]):
    """An immutable, hashable map (leaf, sub-leaf) -> (EAX, EBX, ECX, EDX), sorted by key."""

    __slots__ = ("_d", "_hash")

    def __init__(self, items: Mapping[tuple[int, int], Any] | None = None) -> None:
        d: dict[tuple[int, int], Regs] = {}
        for key, regs in sorted((items or {}).items()):
            if not (isinstance(key, tuple) and len(key) == 2):
                raise ProfileError(f"leaf key {key!r} is not a (leaf, subleaf) pair")
            leaf, sub = (_u32(k, f"leaf key {key!r}") for k in key)
            if len(regs) != 4:
                raise ProfileError(f"leaf {leaf:#x}.{sub:#x}: {len(regs)} registers, not 4")
            d[(leaf, sub)] = tuple(  # type: ignore[assignment]
                _u32(r, f"leaf {leaf:#x}.{sub:#x} {n}") for r, n in zip(regs, _REG, strict=True)
            )
        self._d = d
        self._hash: int | None = None

    def __getitem__(self, key: tuple[int, int]) -> Regs:
        return self._d[key]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(tuple(self._d.items()))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LeafTable):
            return self._d == other._d
        if isinstance(other, Mapping):
            return self._d == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"LeafTable({len(self._d)} entries)"


def vendor_of(leaves: Mapping[tuple[int, int], Regs]) -> str:
    """The vendor named by CPUID.0 EBX-EDX-ECX ("GenuineIntel" -> "intel" ...), else "unknown"."""
    _, b, c, d = leaves.get((0, 0), _ZERO)
    ident = b"".join(r.to_bytes(4, "little") for r in (b, d, c)).decode("latin-1")
    return _VENDOR_IDS.get(ident, "unknown")


@dataclass(frozen=True, slots=True)
class Component:
    """One XSAVE state component as this CPU enumerates it (CPUID.(EAX=0DH,ECX=i), SDM 13.2).

    ``offset`` is the standard-format offset (EBX); it is 0 for supervisor components, whose
    EBX the SDM defines as 0 because they cannot be saved in the standard format.
    """

    number: int
    size: int
    offset: int
    supervisor: bool  #: ECX[0]: managed through IA32_XSS
    aligned: bool  #: ECX[1]: 64-byte aligned in the compacted format
    xfd: bool  #: ECX[2]: supports extended feature disable

    @property
    def name(self) -> str:
        """The short catalogue name (``xfeatures.XFEATURES``), ``bitN`` for uncatalogued ones."""
        f = BY_NUMBER.get(self.number)
        return f.short if f else f"bit{self.number}"

    @property
    def mask(self) -> int:
        return 1 << self.number


X87 = Component(0, 160, 0, False, False, False)
SSE = Component(1, 256, 160, False, False, False)


@dataclass(frozen=True, slots=True)
class CpuidProfile:
    """The CPUID answers of one logical CPU, and the XSAVE facts derived from them."""

    name: str
    vendor: str
    leaves: Mapping[tuple[int, int], Regs]
    source: str
    _subleafed: frozenset[int] = field(default=frozenset(), init=False, repr=False,
                                       compare=False)
    #: component() answers, memoised (the leaves are immutable; the models ask millions of times)
    _components: dict[int, Component] = field(default_factory=dict, init=False, repr=False,
                                              compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ProfileError(f"profile name {self.name!r} is not a non-empty string")
        if self.vendor not in VENDORS:
            raise ProfileError(f"vendor {self.vendor!r} is not one of {', '.join(VENDORS)}")
        if not isinstance(self.source, str):
            raise ProfileError(f"profile source {self.source!r} is not a string")
        table = self.leaves if isinstance(self.leaves, LeafTable) else LeafTable(self.leaves)
        object.__setattr__(self, "leaves", table)
        # A leaf is sub-leafed if the SDM says so or if the dump shows it with ECX != 0.
        sub = SUBLEAF_LEAVES | {leaf for leaf, s in table if s}
        object.__setattr__(self, "_subleafed", frozenset(sub))

    @classmethod
    def from_leaves(
        cls, name: str, leaves: Mapping[tuple[int, int], Regs], source: str
    ) -> CpuidProfile:
        """A profile whose vendor is read from CPUID.0."""
        table = LeafTable(leaves)
        return cls(name=name, vendor=vendor_of(table), leaves=table, source=source)

    # -- the instruction ---------------------------------------------------------------------

    def cpuid(self, leaf: int, subleaf: int = 0) -> Regs:
        """CPUID(EAX=leaf, ECX=subleaf) as the CPU answers: ECX ignored where the leaf has no
        sub-leaves; (0, 0, 0, 0) for a leaf or sub-leaf the profile does not hold."""
        if leaf not in self._subleafed:
            subleaf = 0
        return self.leaves.get((leaf, subleaf), _ZERO)

    # -- feature flags -----------------------------------------------------------------------

    def has(self, flag: str) -> bool:
        """Whether the CPU reports ``flag`` (a name of :data:`FLAGS`, as in cpufeatures.h)."""
        try:
            f = FLAGS[flag.upper()]
        except (KeyError, AttributeError):
            raise ProfileError(f"unknown CPUID flag {flag!r} (known: {', '.join(FLAGS)})") from None
        return bool((self.cpuid(f.leaf, f.subleaf)[_REG[f.reg]] >> f.bit) & 1)

    @property
    def max_basic_leaf(self) -> int:
        return self.cpuid(0)[0]

    @property
    def max_extended_leaf(self) -> int:
        return self.cpuid(0x80000000)[0]

    @property
    def brand(self) -> str:
        """The brand string of leaves 0x80000002-4, stripped; "" when the profile lacks them."""
        raw = b"".join(
            r.to_bytes(4, "little") for leaf in (0x80000002, 0x80000003, 0x80000004)
            for r in self.cpuid(leaf)
        )
        return raw.split(b"\0", 1)[0].decode("latin-1").strip()

    @property
    def family_model_stepping(self) -> tuple[int, int, int]:
        """Display family, model and stepping from CPUID.1 EAX (SDM Vol. 2A, CPUID, Figure 3-6)."""
        eax = self.cpuid(1)[0]
        fam, model, step = (eax >> 8) & 0xF, (eax >> 4) & 0xF, eax & 0xF
        if fam == 0xF:
            fam += (eax >> 20) & 0xFF
        if fam == 0x6 or fam >= 0xF:
            model |= ((eax >> 16) & 0xF) << 4
        return fam, model, step

    # -- XSAVE enumeration (SDM 13.2) --------------------------------------------------------

    @property
    def xcr0_supported(self) -> int:
        """CPUID.(EAX=0DH,ECX=0):EDX:EAX, the components XCR0 may enable."""
        a, _, _, d = self.cpuid(0xD, 0)
        return d << 32 | a

    @property
    def xss_supported(self) -> int:
        """CPUID.(EAX=0DH,ECX=1):EDX:ECX, the components IA32_XSS may enable."""
        _, _, c, d = self.cpuid(0xD, 1)
        return d << 32 | c

    @property
    def xfeatures_supported(self) -> int:
        """xcr0_supported | xss_supported: every component the CPU enumerates."""
        return self.xcr0_supported | self.xss_supported

    def component(self, i: int) -> Component:
        """Component ``i`` from CPUID.(EAX=0DH,ECX=i) (x87 and SSE: the fixed legacy region).

        MaskError when the CPU does not enumerate ``i``; ProfileError when it enumerates it but
        the sub-leaf reads size 0 (a hypervisor masking the sub-leaf, or a truncated dump).
        """
        cached = self._components.get(i)
        if cached is not None:
            return cached
        if i == 0:
            return X87
        if i == 1:
            return SSE
        if not isinstance(i, int) or not 2 <= i <= 63:
            raise MaskError(f"xfeature number {i!r} is not in 0..63")
        if not (self.xfeatures_supported >> i) & 1:
            raise MaskError(
                f"component {i} ({Component(i, 0, 0, False, False, False).name}) is not "
                f"enumerated by {self.name} (XCR0 {self.xcr0_supported:#x}, "
                f"XSS {self.xss_supported:#x})"
            )
        eax, ebx, ecx, _ = self.cpuid(0xD, i)
        if eax == 0:
            raise ProfileError(
                f"{self.name}: component {i} is in the supported mask but "
                f"CPUID.(EAX=0DH,ECX={i}) reports size 0"
            )
        supervisor = bool(ecx & 1)
        comp = self._components[i] = Component(
            number=i,
            size=eax,
            offset=0 if supervisor else ebx,
            supervisor=supervisor,
            aligned=bool(ecx & 2),
            xfd=bool(ecx & 4),
        )
        return comp

    def components(self, mask: int | None = None) -> list[Component]:
        """The components of ``mask`` (default: all enumerated) in ascending bit order."""
        return [self.component(i) for i in bits(self.xfeatures_supported if mask is None else mask)]

    # -- JSON ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The profile as a JSON-ready object (registers as 0x-prefixed 8-digit hex strings)."""
        leaves: dict[str, dict[str, list[str]]] = {}
        for (leaf, sub), regs in self.leaves.items():
            leaves.setdefault(f"{leaf:#010x}", {})[f"{sub:#x}"] = [f"{r:#010x}" for r in regs]
        return {
            "format": FORMAT,
            "name": self.name,
            "vendor": self.vendor,
            "cpu": self.brand,
            "source": self.source,
            "leaves": leaves,
        }

    def to_json(self) -> str:
        """The profile as JSON text (the bundled-profile format, :data:`FORMAT`), one line per
        leaf so that a diff of two profiles reads leaf by leaf."""
        d = self.to_dict()
        leaves = d.pop("leaves")
        head = [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in d.items()]
        body = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in leaves.items()]
        return "{\n" + "\n".join(head) + '\n "leaves": {\n' + ",\n".join(body) + "\n }\n}\n"

    @classmethod
    def from_json(cls, data: str | bytes | Mapping[str, Any]) -> CpuidProfile:
        """A profile from :meth:`to_json` text or :meth:`to_dict` object; ProfileError if bad."""
        if isinstance(data, (str, bytes)):
            try:
                data = json.loads(data)
            except (ValueError, UnicodeDecodeError) as e:
                raise ProfileError(f"profile JSON does not parse: {e}") from None
        if not isinstance(data, Mapping):
            raise ProfileError("profile JSON is not an object")
        if data.get("format") != FORMAT:
            raise ProfileError(f"profile JSON: field 'format' is {data.get('format')!r}, "
                               f"not {FORMAT!r}")
        for key in ("name", "vendor", "source", "leaves"):
            if key not in data:
                raise ProfileError(f"profile JSON: field {key!r} is missing")
        raw = data["leaves"]
        if not isinstance(raw, Mapping):
            raise ProfileError("profile JSON: field 'leaves' is not an object")
        leaves: dict[tuple[int, int], Regs] = {}
        for leaf_s, subs in raw.items():
            if not isinstance(subs, Mapping):
                raise ProfileError(f"profile JSON: leaf {leaf_s!r} is not an object")
            for sub_s, regs in subs.items():
                where = f"profile JSON: leaf {leaf_s!r} sub-leaf {sub_s!r}"
                if not isinstance(regs, list) or len(regs) != 4:
                    raise ProfileError(f"{where}: not a list of 4 registers")
                leaves[(_hex(leaf_s, where), _hex(sub_s, where))] = tuple(  # type: ignore[assignment]
                    _hex(r, where) for r in regs
                )
        return cls(name=data["name"], vendor=data["vendor"], leaves=LeafTable(leaves),
                   source=data["source"])


#: The ``format`` tag of profile JSON written by :meth:`CpuidProfile.to_json`.
FORMAT = "fpstate-cpuid-profile/1"


def _hex(text: Any, where: str) -> int:
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    if not isinstance(text, str):
        raise ProfileError(f"{where}: {text!r} is not a hex string")
    try:
        return int(text, 16)
    except ValueError:
        raise ProfileError(f"{where}: {text!r} is not a hex number") from None
