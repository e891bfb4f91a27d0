"""CPUID leaf 0xD for a guest: a template a pool of hosts can all honour, and a check of one.

A VMM that moves guests between hosts (a fleet of several CPU models) gives every guest one
CPUID. For leaf 0xD that table must be true on every host, because the guest's XSAVE,
XSAVEC and XRSTOR run on the host's silicon, not through KVM: a guest reads component
offsets and sizes from its CPUID, and the CPU writes them where *its own* CPUID says
(SDM Vol. 1 13.4.3: the standard format's offsets are CPUID.(EAX=0DH,ECX=i):EBX). And KVM
offers only what the host kernel enabled: a bit of CPUID.(0DH,0) that KVM does not support is
dropped from guest_supported_xcr0, and the guest's XSETBV with it takes #GP.

`pool_template(profiles)` boots the kernel and KVM models on every host of the pool and keeps a
component when every host's KVM offers it with the same size, standard offset and ECX flags
(and, for AMX, the same tile palette in leaves 0x1D and 0x1E); then it keeps XCR0 valid for
XSETBV (AVX-512's three components and AMX's two go together,
`fpstate.kernel.x86.xstate.xsetbv_fault`). Every component left out is named with the reason,
and with the CPUID feature flag (xsave_cpuid_features[]) the VMM should clear with it.

`check_template(entries, host)` runs a guest's leaf 0xD through the KVM model of ``host``:
KVM_SET_CPUID2 (AMX needs ARCH_REQ_XCOMP_GUEST_PERM first), what KVM keeps of XCR0 and
IA32_XSS (guest_supported_xcr0/xss), KVM_SET_XCRS of the advertised XCR0 (the same
__kvm_set_xcr() as the guest's XSETBV), the EBX KVM rewrites (kvm_update_cpuid_runtime), each
sub-leaf against the host's, CPUID.(0DH,0).ECX against the size the advertised XCR0 needs, and
the XCR0 a Linux guest enables with that CPUID (the kernel model's boot on the guest's CPUID,
the host's other leaves kept).

Templates are read and written as JSON (`to_json`: sub-leaves as kvm_cpuid_entry2 fields), as a
Firecracker custom CPU template (`to_firecracker`, ``cpuid_modifiers`` with 32-character
bitmaps) or as a list of kvm_cpuid_entry2 objects (`read_template` takes all three).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fpstate.errors import FpstateError
from fpstate.inputs import read_text, reason
from fpstate.kernel.x86.xstate import xsetbv_fault
from fpstate.kvm.x86.cpuid import (
    D1_EAX_NAMES,
    KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
    XFD,
    XSAVEC,
    XSAVES,
    CpuidEntry2,
    KvmCaps,
    cpuid_regs,
    find_cpuid,
    xstate_required_size,
)
from fpstate.x86.cpuid import FLAGS, CpuidProfile
from fpstate.x86.layout import standard_size
from fpstate.x86.xfeatures import (
    BY_NUMBER,
    XFEATURE_MASK_AVX512,
    XFEATURE_MASK_BNDCSR,
    XFEATURE_MASK_BNDREGS,
    XFEATURE_MASK_FPSSE,
    XFEATURE_MASK_XTILE,
    XFEATURE_MASK_XTILE_DATA,
    XFEATURE_MASK_YMM,
    bits,
)

#: The legacy region and the XSAVE header: the standard size of XCR0 = x87 | SSE.
XSAVE_HDR_END = 576
#: ARCH_REQ_XCOMP_GUEST_PERM and the dynamic feature it asks for (uapi asm/prctl.h).
ARCH_REQ_XCOMP_GUEST_PERM = 0x1025
XTILE_DATA = 18
#: The components that go together in XCR0 (SDM Vol. 2 XSETBV, Vol. 1 13.3), each with what the
#: template says when it must leave a group out whole.
GROUPS: tuple[tuple[int, str], ...] = (
    (XFEATURE_MASK_AVX512, "AVX-512 is its three components or none (XSETBV #GP)"),
    (XFEATURE_MASK_XTILE, "AMX is its two components or none (XSETBV #GP)"),
    (XFEATURE_MASK_BNDREGS | XFEATURE_MASK_BNDCSR, "MPX is its two components or none "
                                                   "(XSETBV #GP)"),
)
#: The AMX leaves a pool must agree on: 0x1D palettes 0 and 1, 0x1E (TMUL information).
AMX_LEAVES = ((0x1D, 0), (0x1D, 1), (0x1E, 0))
_ERRNO = {0: "0", -1: "-EPERM", -7: "-E2BIG", -14: "-EFAULT", -16: "-EBUSY", -22: "-EINVAL",
          -95: "-EOPNOTSUPP"}


class TemplateError(FpstateError):
    """A template that cannot be made or read: an unknown CPU, a mask the pool cannot honour,
    a file that is not a leaf-0xD template."""


def _name(i: int) -> str:
    f = BY_NUMBER.get(i)
    return f.short if f else f"bit{i}"


def _names(mask: int) -> str:
    return ", ".join(_name(i) for i in bits(mask)) or "none"


def _errno(ret: int) -> str:
    return _ERRNO.get(ret, str(ret))


# -- what each host offers ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostOffer:
    """What KVM on one host can give a guest (kvm_caps after kvm_x86_vendor_init() on the
    kernel model booted on that CPU)."""

    profile: CpuidProfile
    caps: KvmCaps
    vendor: str  #: KVM's vendor module: "vmx" (Intel) or "svm" (AMD)

    @property
    def xcr0(self) -> int:
        return self.caps.supported_xcr0

    @property
    def xss(self) -> int:
        return self.caps.supported_xss

    def sub_leaf(self, i: int) -> tuple[int, int, int]:
        """CPUID.(0DH,i) EAX (size), EBX (standard offset), ECX (flags) as KVM passes them on
        (KVM_GET_SUPPORTED_CPUID: ECX[2] cleared without the XFD cap)."""
        a, b, c, _ = self.profile.cpuid(0xD, i)
        if not self.caps.d1_eax & XFD:
            c &= ~4
        return a, b, c & 7


def host_offer(profile: CpuidProfile, vendor: str | None = None) -> HostOffer:
    """KVM loaded on the kernel model booted on ``profile`` (fpu__init_system_xstate(), then
    kvm_x86_vendor_init()); the vendor module follows the CPU's vendor unless given."""
    from fpstate.kvm.x86.vcpu import model_config, model_system

    vendor = vendor or ("svm" if profile.vendor in ("amd", "hygon") else "vmx")
    caps = model_config(model_system(profile), vendor).caps
    return HostOffer(profile, caps, vendor)


#: KVM vendor modules (fpstate.host.kvm.KVM_BACKENDS) -> the model's vendor name.
BACKEND_VENDOR = {"kvm_intel": "vmx", "kvm_amd": "svm", "kvm_pvm": "pvm"}


def measured_offer(profile: CpuidProfile) -> HostOffer:
    """What this machine's KVM says it can give (KvmCaps.from_kvm: KVM_X86_XCOMP_GUEST_SUPP
    and KVM_GET_SUPPORTED_CPUID), ``profile`` being this machine's CPU. HostUnavailable
    without a usable /dev/kvm."""
    from fpstate.host.kvm import KvmError, kvm_backend, open_kvm
    from fpstate.kvm.x86.vcpu import model_system

    system = model_system(profile)
    try:
        with open_kvm() as kvm:
            caps = KvmCaps.from_kvm(kvm.xcomp_guest_supp(), kvm.supported_cpuid(), profile,
                                    host_xcr0=system.xcr0, host_xss=system.xss)
    except KvmError as e:
        from fpstate.errors import HostUnavailable

        raise HostUnavailable(f"/dev/kvm is unusable: {e}") from None
    return HostOffer(profile, caps, BACKEND_VENDOR.get(kvm_backend() or "", "vmx"))


def probe_host(entries: Sequence[CpuidEntry2]) -> tuple[Finding, ...]:
    """This machine's KVM given the template: KVM_SET_CPUID2 (the rest of the table from
    KVM_GET_SUPPORTED_CPUID), KVM_GET_CPUID2 compared with what was set (upstream's
    kvm_set_cpuid() keeps the table, rewriting only the EBX of sub-leaves 0 and 1), then
    KVM_SET_XCRS of the advertised XCR0. HostUnavailable without a usable /dev/kvm."""
    from fpstate.host.kvm import KvmError, kvm_backend, open_kvm

    name = kvm_backend() or "KVM"
    out: list[Finding] = []
    d = [e for e in entries if e.function == 0xD]
    a0, _, _, d0 = cpuid_regs(entries, 0xD, 0)
    try:
        with open_kvm() as kvm:
            table = [e for e in kvm.supported_cpuid()
                     if not any((e.function, e.index) == (x.function, x.index) for x in entries)]
            vm = kvm.create_vm()
            try:
                vcpu = vm.create_vcpu(0)
                try:
                    vcpu.set_cpuid2([*table, *entries])
                except KvmError as e:
                    return (Finding("error", f"this machine's KVM ({name}): KVM_SET_CPUID2: "
                                             f"{e}"),)
                held = vcpu.get_cpuid2()
                for e in d:
                    h = find_cpuid(held, 0xD, e.index)
                    got = h.regs if h is not None else (0, 0, 0, 0)
                    diff = [f"{r} {got[k]:#x} (template {e.regs[k]:#x})"
                            for k, r in enumerate(("EAX", "EBX", "ECX", "EDX"))
                            # EBX of sub-leaves 0 and 1 is KVM's (kvm_update_cpuid_runtime)
                            if got[k] != e.regs[k] and not (k == 1 and e.index in (0, 1))]
                    if diff:
                        out.append(Finding("note", (
                            f"this machine's KVM ({name}) holds CPUID.(0DH,{e.index:#x}) "
                            f"{', '.join(diff)}: upstream KVM keeps the table it is given")))
                xcr0 = d0 << 32 | a0
                try:
                    vcpu.set_xcrs(xcr0)
                except KvmError as e:
                    out.append(Finding("error", f"this machine's KVM ({name}): KVM_SET_XCRS of "
                                                f"the advertised XCR0 {xcr0:#x}: {e}"))
            finally:
                vm.close()
    except KvmError as e:
        from fpstate.errors import HostUnavailable

        raise HostUnavailable(f"/dev/kvm is unusable: {e}") from None
    return tuple(out)


# -- the pool's template ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Left:
    """A component the template leaves out, and why."""

    number: int
    reason: str

    @property
    def name(self) -> str:
        return _name(self.number)


#: QEMU's name of each feature flag a template may clear (feature_word_info[].feat_names,
#: target/i386/cpu.c: FEAT_1_EDX/ECX, FEAT_7_0_EBX/ECX/EDX, FEAT_XSAVE, FEAT_8000_0001_ECX;
#: every one listed by ``qemu-system-x86_64 -cpu help`` of QEMU 7.2). OSXSAVE and OSPKE are
#: not settable (QEMU computes them). CET is `QEMU_CET`'s; ENQCMD and APX have no name
#: confirmed here.
QEMU_FLAG: dict[str, str] = {
    "FPU": "fpu", "FXSR": "fxsr", "XMM": "sse", "XSAVE": "xsave", "AVX": "avx",
    "MPX": "mpx", "AVX512F": "avx512f", "INTEL_PT": "intel-pt", "PKU": "pku",
    "AMX_BF16": "amx-bf16", "AMX_TILE": "amx-tile", "AMX_INT8": "amx-int8",
    "XSAVEOPT": "xsaveopt", "XSAVEC": "xsavec", "XGETBV1": "xgetbv1", "XSAVES": "xsaves",
    "XFD": "xfd", "LWP": "lwp",
}
#: CET's flags: QEMU's CPU models name them "cet-ss" and "cet-ibt" since QEMU learned CET;
#: an older QEMU (7.2 has neither property) never offers CET, and refuses "-cet-ss". Without
#: CET user state a guest cannot have user IBT either, so both go.
QEMU_CET = frozenset({"SHSTK", "IBT"})


@dataclass(frozen=True, slots=True)
class Template:
    """CPUID leaf 0xD for a guest of a pool of hosts."""

    cpus: tuple[str, ...]
    xcr0: int
    xss: int
    d1_eax: int  #: CPUID.(0DH,1):EAX (XSAVEOPT, XSAVEC, XGETBV1, XSAVES, XFD)
    sub_leaves: Mapping[int, tuple[int, int, int]]  #: i -> (EAX size, EBX offset, ECX flags)
    left: tuple[Left, ...] = ()
    #: sub-leaves some host enumerates for components the template leaves out: zeroed
    zeroed: tuple[int, ...] = ()
    #: CPUID flags to clear with the components left out: (flag, component numbers)
    clear_flags: tuple[tuple[str, tuple[int, ...]], ...] = ()
    #: CPUID.(0DH,0).ECX: the standard-format size of every feature the guest may enable
    standard_size: int = XSAVE_HDR_END
    #: CPUID.(0DH,1).EBX as KVM_GET_SUPPORTED_CPUID gives it: the compacted size of
    #: XCR0 | IA32_XSS when XSAVES or XSAVEC is offered, else 0
    compacted_size: int = 0

    def entries(self) -> tuple[CpuidEntry2, ...]:
        """The leaf 0xD entries for KVM_SET_CPUID2 (KVM_CPUID_FLAG_SIGNIFCANT_INDEX), shaped
        like KVM_GET_SUPPORTED_CPUID's: EBX of sub-leaf 0 = ECX (KVM rewrites it from the
        guest's XCR0 anyway), zeroed sub-leaves for components some host has and the template
        leaves out."""
        flag = KVM_CPUID_FLAG_SIGNIFCANT_INDEX
        size = self.standard_size
        out = [CpuidEntry2(0xD, 0, flag, self.xcr0 & 0xFFFFFFFF, size, size, self.xcr0 >> 32),
               CpuidEntry2(0xD, 1, flag, self.d1_eax, self.compacted_size,
                           self.xss & 0xFFFFFFFF, self.xss >> 32)]
        for i in sorted(set(self.sub_leaves) | set(self.zeroed)):
            eax, ebx, ecx = self.sub_leaves.get(i, (0, 0, 0))
            out.append(CpuidEntry2(0xD, i, flag, eax, ebx, ecx, 0))
        return tuple(out)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "fpstate-leaf-0xd-template/1",
            "cpus": list(self.cpus),
            "xcr0": hex(self.xcr0),
            "xss": hex(self.xss),
            "entries": [{"function": hex(e.function), "index": hex(e.index), "flags": e.flags,
                         "eax": hex(e.eax), "ebx": hex(e.ebx), "ecx": hex(e.ecx),
                         "edx": hex(e.edx)} for e in self.entries()],
            "left_out": [{"component": x.number, "name": x.name, "reason": x.reason}
                         for x in self.left],
            "clear_flags": [{"flag": f, "where": str(FLAGS[f]), "components": list(c)}
                            for f, c in self.clear_flags],
        }

    def to_firecracker(self) -> dict[str, Any]:
        """A Firecracker custom CPU template (docs/cpu_templates): leaf 0xD written whole, each
        register a 32-character bitmap, and the feature flags of the components left out
        cleared (their other bits "x": left as Firecracker finds them)."""
        mods = []
        for e in self.entries():
            mods.append({"leaf": hex(e.function), "subleaf": hex(e.index), "flags": e.flags,
                         "modifiers": [{"register": r, "bitmap": f"0b{v:032b}"}
                                       for r, v in zip(("eax", "ebx", "ecx", "edx"), e.regs,
                                                       strict=True)]})
        by_leaf: dict[tuple[int, int], dict[str, list[str]]] = {}
        for f, _ in self.clear_flags:
            flag = FLAGS[f]
            regs = by_leaf.setdefault((flag.leaf, flag.subleaf), {})
            regs.setdefault(flag.reg, ["x"] * 32)[31 - flag.bit] = "0"
        for (leaf, sub), regs in sorted(by_leaf.items()):
            mods.append({"leaf": hex(leaf), "subleaf": hex(sub),
                         "flags": KVM_CPUID_FLAG_SIGNIFCANT_INDEX if leaf == 7 else 0,
                         "modifiers": [{"register": r, "bitmap": "0b" + "".join(regs[r])}
                                       for r in sorted(regs)]})
        return {"cpuid_modifiers": mods}

    def to_qemu(self, base: str = "host") -> tuple[str, tuple[str, ...]]:
        """(the ``-cpu`` argument, notes): QEMU builds leaf 0xD itself, enabling a component
        when its gating feature flag is set (x86_ext_save_areas[].features, target/i386/
        cpu.c) and taking sizes and offsets from the host through KVM; so a template is the
        flags of the components left out, removed ("-name"). A flag with no QEMU name known
        here is a note instead."""
        names: list[str] = []
        notes = []
        for f, comps in self.clear_flags:
            left = ", ".join(_name(i) for i in comps)
            if f in QEMU_CET:
                note = ("CET state left out (" + left + "): a QEMU that knows CET also needs "
                        "-cet-ss,-cet-ibt; an older one (no cet-ss property) never offers it")
                if note not in notes:
                    notes.append(note)
            elif f in QEMU_FLAG:
                names.append(f"-{QEMU_FLAG[f]}")
            else:
                notes.append(f"{f} ({FLAGS[f]}) has no QEMU flag name known to fpstate: "
                             f"leave it out of the CPU model ({left})")
        if "AVX512F" in dict(self.clear_flags):
            notes.append("on a CPU with AVX10 (CPUID.(7,1):EDX[19]) QEMU also enables the "
                         "AVX-512 components for it: remove that flag too")
        return ",".join([base, *names]), tuple(notes)


def _gate_of(i: int) -> str | None:
    """The CPUID flag a VMM offers a component with: xsave_cpuid_features[]'s gate, except
    that PKRU's is X86_FEATURE_OSPKE (CR4.PKE as the OS set it, which KVM derives from the
    guest's CR4), so the flag offered is PKU."""
    f = BY_NUMBER.get(i)
    gate = f.gate if f is not None else None
    gate = "PKU" if gate == "OSPKE" else gate
    return gate if gate in FLAGS else None


def pool_template(profiles: Sequence[CpuidProfile], *, xcr0: int | None = None,
                  xss: int | None = None, offers: Sequence[HostOffer] | None = None) -> Template:
    """The largest leaf 0xD every host of ``profiles`` can honour, or the one of ``xcr0`` /
    ``xss`` (TemplateError naming each feature some host cannot give, and why).

    A component stays when every host's KVM supports it (kvm_caps.supported_xcr0 / _xss: the
    host kernel enabled it and KVM virtualises it) and every host enumerates the same size,
    standard offset and ECX flags for it (the guest's XSAVE runs on each host's silicon).
    Then XCR0 is made valid for XSETBV by leaving out incomplete groups (`GROUPS`); IA32_XSS
    stays only with XSAVES in every host's CPUID.(0DH,1):EAX. CPUID.(0DH,1):EAX is what every
    host's KVM offers (kvm_cpu_caps)."""
    if not profiles:
        raise TemplateError("a template needs at least one CPU")
    offers = list(offers) if offers is not None else [host_offer(p) for p in profiles]
    names = tuple(o.profile.name for o in offers)
    d1 = 0x1F
    for o in offers:
        d1 &= o.caps.d1_eax
    common = XFEATURE_MASK_FPSSE
    left: dict[int, str] = {}
    every = 0
    for o in offers:
        every |= o.xcr0 | o.xss
    for i in bits(every & ~XFEATURE_MASK_FPSSE):
        why = _why_not_shared(offers, i)
        if why is None:
            common |= 1 << i
        else:
            left[i] = why
    user = common & ~_supervisor_mask(offers[0], common)
    sup = common & ~user
    if not d1 & XSAVES and sup:
        for i in bits(sup):
            left[i] = "supervisor state needs XSAVES, which not every host's KVM offers"
        sup = 0
    if xcr0 is None:
        for mask, why in GROUPS:
            if user & mask and user & mask != mask:
                for i in bits(user & mask):
                    left[i] = why
                user &= ~mask
        if not user & XFEATURE_MASK_YMM and user & XFEATURE_MASK_AVX512:
            for i in bits(user & XFEATURE_MASK_AVX512):
                left[i] = "AVX-512 needs AVX in XCR0 (XSETBV #GP)"
            user &= ~XFEATURE_MASK_AVX512
    else:
        user = _requested(xcr0, user, left, "XCR0")
        fault = xsetbv_fault(user)
        if fault is not None:
            raise TemplateError(f"XCR0 {xcr0:#x} cannot be a guest's: XSETBV #GP: {fault}")
        for i in bits(common & ~user & ~sup):
            left.setdefault(i, f"not in the requested XCR0 {xcr0:#x}")
    if xss is not None:
        sup = _requested(xss, sup, left, "IA32_XSS")
        for i in bits(common & ~user & ~sup & ~XFEATURE_MASK_FPSSE):
            left.setdefault(i, f"not in the requested IA32_XSS {xss:#x}")
    base = offers[0]
    sub_leaves = {i: base.sub_leaf(i) for i in bits((user | sup) & ~XFEATURE_MASK_FPSSE)}
    zeroed = set()
    for o in offers:
        for i in range(2, 63):
            if i not in sub_leaves and any(o.profile.cpuid(0xD, i)):
                zeroed.add(i)
    gates: dict[str, list[int]] = {}
    for i in sorted(left):
        g = _gate_of(i)
        if g is None or any((user | sup) >> j & 1 and _gate_of(j) == g for j in range(63)):
            continue  # no flag, or a kept component shares it
        if any(o.profile.has(g) for o in offers):
            gates.setdefault(g, []).append(i)
    # The sizes as KVM_GET_SUPPORTED_CPUID computes them (every host has the same layout for
    # what the template keeps, so the first host's size cache answers for all).
    caps = base.caps
    return Template(names, user, sup, d1, sub_leaves,
                    tuple(Left(i, left[i]) for i in sorted(left)), tuple(sorted(zeroed)),
                    tuple((g, tuple(c)) for g, c in gates.items()),
                    xstate_required_size(caps, user, False),
                    xstate_required_size(caps, user | sup, True)
                    if d1 & (XSAVES | XSAVEC) else 0)


def _supervisor_mask(o: HostOffer, mask: int) -> int:
    return sum(1 << i for i in bits(mask & ~XFEATURE_MASK_FPSSE) if o.sub_leaf(i)[2] & 1)


def _requested(want: int, can: int, left: Mapping[int, str], what: str) -> int:
    if not 0 <= want < 1 << 63:
        raise TemplateError(f"{what} {want:#x} is not a 63-bit feature mask")
    missing = want & ~can
    if what == "XCR0":
        missing &= ~XFEATURE_MASK_FPSSE
    if missing:
        why = "; ".join(f"{_name(i)} (component {i}): "
                        f"{left.get(i, 'no host of the pool has it as a ' + what + ' feature')}"
                        for i in bits(missing))
        raise TemplateError(f"{what} {want:#x} asks for what the pool cannot give: {why}")
    return want | (XFEATURE_MASK_FPSSE if what == "XCR0" else 0)


def _why_not_shared(offers: Sequence[HostOffer], i: int) -> str | None:
    """None when every host's KVM offers component ``i`` alike, else why not."""
    lacking = [o.profile.name for o in offers if not (o.xcr0 | o.xss) >> i & 1]
    if lacking:
        return f"KVM on {', '.join(lacking)} does not offer it (the CPU or its kernel lacks it)"
    if XFEATURE_MASK_XTILE >> i & 1:
        # TILECFG and TILEDATA only mean something with the palette of leaves 0x1D and 0x1E
        # (tile count, bytes per row, max rows; TMUL's sizes): TILELOADD runs on each host's.
        for leaf, sub in AMX_LEAVES:
            values = {o.profile.cpuid(leaf, sub) for o in offers}
            if len(values) > 1:
                each = ", ".join(f"{tuple(map(hex, o.profile.cpuid(leaf, sub)))} on "
                                 f"{o.profile.name}" for o in offers)
                return f"AMX palette CPUID.(EAX={leaf:#x},ECX={sub}) differs: {each}"
    seen = {o.profile.name: o.sub_leaf(i) for o in offers}
    for field, k, show in (("size", 0, hex), ("standard offset", 1, hex),
                           ("ECX flags", 2, hex)):
        values = {v[k] for v in seen.values()}
        if len(values) > 1:
            each = ", ".join(f"{show(v[k])} on {n}" for n, v in seen.items())
            return f"{field} differs: {each} (the guest's XSAVE follows each host's own)"
    return None


def format_template(t: Template) -> str:
    lines = [f"CPUID leaf 0xD for a guest of {', '.join(t.cpus)}",
             f"XCR0 {t.xcr0:#x} ({_names(t.xcr0)}); IA32_XSS {t.xss:#x} ({_names(t.xss)})",
             "CPUID.(0DH,1):EAX "
             f"{t.d1_eax:#x} ({', '.join(n for b, n in D1_EAX_NAMES.items() if t.d1_eax & b)})",
             f"standard size {t.standard_size} (sub-leaf 0 ECX); KVM rewrites sub-leaf 0 EBX "
             "(and sub-leaf 1 EBX) from the guest's XCR0 and IA32_XSS",
             "",
             "sub-leaf  eax         ebx         ecx         edx"]
    for e in t.entries():
        lines.append(f"{e.index:#6x}    {e.eax:#010x}  {e.ebx:#010x}  {e.ecx:#010x}  "
                     f"{e.edx:#010x}" + ("   (left out: zero)" if e.index in t.zeroed else ""))
    if t.left:
        lines += ["", "left out:"]
        lines += [f"  {x.name} (component {x.number}): {x.reason}" for x in t.left]
    if t.clear_flags:
        lines += ["", "clear these CPUID flags with them (xsave_cpuid_features[]):"]
        lines += [f"  {f}: {FLAGS[f]} ({', '.join(_name(i) for i in c)})"
                  for f, c in t.clear_flags]
    if t.xcr0 & XFEATURE_MASK_XTILE_DATA:
        lines += ["", "AMX: the VMM must ARCH_REQ_XCOMP_GUEST_PERM(XTILE_DATA) before "
                      "KVM_SET_CPUID2, which fails with -EPERM otherwise"]
    return "\n".join(lines)


# -- reading a template -------------------------------------------------------------------------


def _num(v: Any, where: str, limit: int = 1 << 32) -> int:
    if isinstance(v, bool):
        raise TemplateError(f"{where}: {v!r} is not a number")
    if isinstance(v, str):
        s = v.strip().replace("_", "")
        try:
            v = int(s, 0)
        except ValueError:
            raise TemplateError(f"{where}: {v!r} is not a number") from None
    if not isinstance(v, int) or not 0 <= v < limit:
        raise TemplateError(f"{where}: {v!r} is not a number from 0 to {limit - 1:#x}")
    return v


_BITMAP = re.compile(r"0b[01x]{32}")


def _bitmap(v: Any, where: str) -> tuple[int, int]:
    """A Firecracker bitmap -> (mask of the bits it sets, their values)."""
    s = v.replace("_", "") if isinstance(v, str) else v
    if not isinstance(s, str) or not _BITMAP.fullmatch(s):
        raise TemplateError(f"{where}: {v!r} is not a bitmap of 0b and 32 of 0, 1 or x")
    mask = value = 0
    for k, ch in enumerate(reversed(s[2:])):
        if ch != "x":
            mask |= 1 << k
            value |= (ch == "1") << k
    return mask, value


def read_template(path: str, host: CpuidProfile | None = None) -> tuple[CpuidEntry2, ...]:
    """The CPUID entries of a template file (with leaf 0xD sub-leaf 0 at least): this module's
    JSON (``entries``), a list of kvm_cpuid_entry2 objects, a Firecracker custom CPU template
    (``cpuid_modifiers``, whose "x" bits keep the value of ``host``'s CPUID), or a whole
    CPUID dump of the guest (``cpuid -r`` in the guest, AIDA64, profile JSON)."""
    try:
        text = read_text(path)
    except (OSError, UnicodeDecodeError) as e:
        raise TemplateError(f"{path}: {reason(e)}") from None
    why = ("not a list of CPUID entries, an object with 'entries' or a Firecracker "
           "'cpuid_modifiers'")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        data = None
        why = f"not JSON: {e.msg} at line {e.lineno}"
    if isinstance(data, dict) and "cpuid_modifiers" in data:
        return _from_firecracker(data["cpuid_modifiers"], path, host)
    if isinstance(data, dict) and "entries" in data:
        data = data["entries"]
    if not isinstance(data, list) or (data and isinstance(data[0], dict)
                                      and "function" not in data[0]):
        return _from_dump(path, why)
    out = []
    for k, e in enumerate(data):
        where = f"{path}: entry {k}"
        if not isinstance(e, dict):
            raise TemplateError(f"{where}: not an object")
        bad = [f for f in ("function", "eax", "ebx", "ecx", "edx") if f not in e]
        if bad:
            raise TemplateError(f"{where}: missing {', '.join(bad)}")
        fields = [_num(e.get(f, 0), f"{where}: {f}")
                  for f in ("function", "index", "flags", "eax", "ebx", "ecx", "edx")]
        out.append(CpuidEntry2(*fields))
    return _leaf_d(out, path)


def _from_dump(path: str, why: str) -> tuple[CpuidEntry2, ...]:
    """A guest's whole CPUID from a dump file (``cpuid -r`` run in the guest, AIDA64, a
    profile JSON: fpstate.x86.profiles.load_path), as KVM_SET_CPUID2 entries."""
    from fpstate.errors import ProfileError
    from fpstate.x86.cpuid import SUBLEAF_LEAVES
    from fpstate.x86.profiles import load_path

    try:
        p = load_path(path)
    except ProfileError as e:
        raise TemplateError(f"{path}: not a template ({why}) nor a CPUID dump ({e})") from None
    subleafed = SUBLEAF_LEAVES | {leaf for leaf, sub in p.leaves if sub}
    return _leaf_d([CpuidEntry2(leaf, sub, KVM_CPUID_FLAG_SIGNIFCANT_INDEX
                                if leaf in subleafed else 0, *regs)
                    for (leaf, sub), regs in sorted(p.leaves.items())], path)


def _from_firecracker(mods: Any, path: str, host: CpuidProfile | None) -> tuple[CpuidEntry2,
                                                                                   ...]:
    if not isinstance(mods, list):
        raise TemplateError(f"{path}: cpuid_modifiers is not a list")
    out = []
    merged: set[tuple[int, int]] = set()
    for k, m in enumerate(mods):
        where = f"{path}: cpuid_modifiers[{k}]"
        if not isinstance(m, dict) or not isinstance(m.get("modifiers"), list):
            raise TemplateError(f"{where}: not an object with a list of modifiers")
        leaf = _num(m.get("leaf"), f"{where}: leaf")
        sub = _num(m.get("subleaf", 0), f"{where}: subleaf")
        flags = _num(m.get("flags", 0), f"{where}: flags")
        if (leaf, sub) in merged:
            raise TemplateError(f"{where}: leaf {leaf:#x} sub-leaf {sub:#x} appears twice")
        regs = list(host.cpuid(leaf, sub)) if host is not None else [0, 0, 0, 0]
        for j, r in enumerate(m["modifiers"]):
            w = f"{where}: modifiers[{j}]"
            if not isinstance(r, dict) or r.get("register") not in ("eax", "ebx", "ecx", "edx"):
                raise TemplateError(f"{w}: register must be one of eax, ebx, ecx, edx")
            mask, value = _bitmap(r.get("bitmap"), f"{w}: bitmap")
            n = ("eax", "ebx", "ecx", "edx").index(r["register"])
            regs[n] = regs[n] & ~mask | value
        merged.add((leaf, sub))
        out.append(CpuidEntry2(leaf, sub, flags, *regs))
    return _leaf_d(out, path)


def _leaf_d(entries: Sequence[CpuidEntry2], path: str) -> tuple[CpuidEntry2, ...]:
    if find_cpuid(entries, 0xD, 0) is None:
        raise TemplateError(f"{path}: no CPUID leaf 0xD sub-leaf 0 in the template")
    seen = set()
    for e in entries:
        if (e.function, e.index) in seen:
            raise TemplateError(f"{path}: leaf {e.function:#x} sub-leaf {e.index:#x} appears "
                                "twice")
        seen.add((e.function, e.index))
    return tuple(entries)


# -- checking a template against a host ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finding:
    severity: str  #: "error": the guest or the VMM breaks; "note": worth knowing
    what: str


@dataclass(frozen=True, slots=True)
class TemplateCheck:
    host: str
    xcr0: int  #: the XCR0 the template advertises (CPUID.(0DH,0) EDX:EAX)
    xss: int
    guest_supported_xcr0: int  #: what KVM keeps of it after KVM_SET_CPUID2
    guest_supported_xss: int
    linux_xcr0: int | None  #: the XCR0 a Linux guest enables with this CPUID
    findings: tuple[Finding, ...]
    linux: str = ""  #: that guest's kernel version

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "ok": self.ok, "xcr0": hex(self.xcr0), "xss": hex(self.xss),
                "guest_supported_xcr0": hex(self.guest_supported_xcr0),
                "guest_supported_xss": hex(self.guest_supported_xss),
                "linux": self.linux,
                "linux_xcr0": None if self.linux_xcr0 is None else hex(self.linux_xcr0),
                "findings": [{"severity": f.severity, "what": f.what} for f in self.findings]}


def guest_cpuid(host: CpuidProfile, entries: Sequence[CpuidEntry2]) -> CpuidProfile:
    """The CPUID a guest sees: ``host``'s leaves with leaf 0xD replaced by ``entries``."""
    leaves = {k: v for k, v in host.leaves.items() if k[0] != 0xD}
    for e in entries:
        leaves[(e.function, e.index)] = e.regs
    return CpuidProfile(f"{host.name} guest", host.vendor, leaves, "template on host CPUID")


def guest_profile(host: CpuidProfile, xcr0: int, xss: int = 0) -> CpuidProfile:
    """The CPUID of a KVM guest on ``host`` whose VMM offers leaf 0xD for ``xcr0`` and
    ``xss`` (`pool_template` of this one host, then `guest_cpuid`): the CPU a guest kernel
    boots on, e.g. a Zen 5 guest without PKRU (the KVM guest this project was first measured
    on: XCR0 0xe7, IA32_XSS 0x1800). TemplateError if ``host`` cannot give them."""
    return guest_cpuid(host, pool_template([host], xcr0=xcr0, xss=xss).entries())


def check_template(entries: Sequence[CpuidEntry2], host: CpuidProfile,
                   vendor: str | None = None, offer: HostOffer | None = None,
                   probe: bool = False, guest_kernel: str | None = None) -> TemplateCheck:
    """What KVM on ``host`` and a Linux guest make of a guest leaf 0xD (see the module
    docstring); each step is the KVM model's (fpstate.kvm.x86.vcpu.Vmm), with KVM's
    capabilities modelled (`host_offer`) or given (``offer``: `measured_offer`). ``probe``:
    ``host`` is this machine, and its KVM is given the template too (`probe_host`).
    ``guest_kernel``: the Linux version the guest boots (fpstate.kernel.x86.versions; default
    the newest modelled)."""
    from fpstate.kernel.x86.sched import Machine
    from fpstate.kernel.x86.xstate import fpu__init_system_xstate
    from fpstate.kvm.x86.vcpu import KvmConfig, Vmm, model_system

    offer = offer or host_offer(host, vendor)
    system = model_system(host)
    config = KvmConfig(offer.caps, host)
    a0, b0, c0, d0 = cpuid_regs(entries, 0xD, 0)
    d1_eax, _, c1, d1_edx = cpuid_regs(entries, 0xD, 1)
    xcr0, xss = d0 << 32 | a0, d1_edx << 32 | c1
    out: list[Finding] = []

    def err(s: str) -> None:
        out.append(Finding("error", s))

    def note(s: str) -> None:
        out.append(Finding("note", s))

    fault = xsetbv_fault(xcr0)
    if fault is not None:
        err(f"advertised XCR0 {xcr0:#x} is not one XSETBV takes ({fault}): a guest that "
            "enables what CPUID.(0DH,0) lists gets #GP")
    vmm = Vmm(Machine(system, 1), config)
    vcpu = vmm.create_vcpu(vmm.create_vm())
    ret = vmm.set_cpuid2(vcpu, entries)
    if ret == -1 and xcr0 & XFEATURE_MASK_XTILE_DATA:
        note("KVM_SET_CPUID2 without guest permission: -EPERM (AMX needs "
             "ARCH_REQ_XCOMP_GUEST_PERM(XTILE_DATA) before KVM_CREATE_VCPU)")
        vmm = Vmm(Machine(system, 1), config)  # a VMM that asks first, as it must
        perm = vmm.arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, XTILE_DATA)
        if perm:
            err(f"ARCH_REQ_XCOMP_GUEST_PERM(XTILE_DATA) on {host.name}: {_errno(perm)}: the "
                "host cannot give AMX to a guest")
        vcpu = vmm.create_vcpu(vmm.create_vm())
        ret = vmm.set_cpuid2(vcpu, entries)
    if ret:
        err(f"KVM_SET_CPUID2: {_errno(ret)}")
    arch = vcpu.arch
    if xcr0 & ~arch.guest_supported_xcr0 & ~XFEATURE_MASK_FPSSE:
        lost = xcr0 & ~arch.guest_supported_xcr0
        err(f"KVM on {host.name} does not support {_names(lost)} ({lost:#x}): "
            f"guest_supported_xcr0 is {arch.guest_supported_xcr0:#x}, so a guest's XSETBV "
            "with what its CPUID lists gets #GP")
    if xss & ~arch.guest_supported_xss:
        lost = xss & ~arch.guest_supported_xss
        err(f"KVM on {host.name} does not support IA32_XSS {_names(lost)} ({lost:#x}): a "
            "guest's WRMSR of IA32_XSS with it gets #GP")
    if xss and not d1_eax & XSAVES:
        err(f"IA32_XSS {xss:#x} advertised without XSAVES in CPUID.(0DH,1):EAX")
    for bit, n in D1_EAX_NAMES.items():
        if d1_eax & bit and not offer.caps.d1_eax & bit:
            err(f"CPUID.(0DH,1):EAX advertises {n}, which KVM on {host.name} does not offer")
    valid = fault is None and not ret
    if valid:
        r = vmm.set_xcrs(vcpu, [(0, xcr0 & arch.guest_supported_xcr0 | 1)])
        if r:
            err(f"KVM_SET_XCRS of XCR0 {xcr0 & arch.guest_supported_xcr0 | 1:#x}: {_errno(r)}")
    held = offer.profile
    # What the host's XSAVE writes for the advertised user features it has.
    need = standard_size(held, xcr0 & held.xcr0_supported)
    for i in range(2, 63):
        want = cpuid_regs(entries, 0xD, i)[:3]
        on = (xcr0 | xss) >> i & 1
        if not on:
            if any(want):
                note(f"sub-leaf {i:#x} ({_name(i)}) is not zero though the template does not "
                     "advertise the component")
            continue
        if not want[0]:
            err(f"{_name(i)} (component {i}) is advertised, and its sub-leaf {i:#x} is zero")
            continue
        a, b, c, _ = held.cpuid(0xD, i)
        if not a:
            continue  # already an error above: the host has no such component
        for field, k, h in (("size", 0, a), ("standard offset", 1, b), ("ECX flags", 2,
                                                                          c & 3)):
            t = want[k] & 3 if k == 2 else want[k]
            if t != h:
                err(f"{_name(i)} (component {i}): {field} {t:#x} in the template, {h:#x} on "
                    f"{host.name}: the guest's XSAVE follows {host.name}'s")
    if c0 < need:
        err(f"CPUID.(0DH,0).ECX {c0} is smaller than the {need} bytes the advertised XCR0 "
            f"needs on {host.name}: a guest buffer sized from it overflows")
    if valid:
        from fpstate.kvm.x86.vcpu import kvm_vcpu_ioctl_get_cpuid2

        ebx = cpuid_regs(kvm_vcpu_ioctl_get_cpuid2(vcpu), 0xD, 0)[1]
        if ebx != b0:
            note(f"KVM rewrites CPUID.(0DH,0).EBX from {b0} to {ebx} (the standard size of the "
                 "XCR0 the guest has, kvm_update_cpuid_runtime)")
    guest = guest_cpuid(host, entries)
    flagged: dict[str, list[int]] = {}
    for i in bits(held.xcr0_supported & ~xcr0 & ~XFEATURE_MASK_FPSSE):
        g = _gate_of(i)
        if g is not None and guest.has(g) and not any(_gate_of(j) == g for j in bits(xcr0)):
            flagged.setdefault(g, []).append(i)
    for g, comps in flagged.items():
        what = (f"{_name(comps[0])} is" if len(comps) == 1
                else f"{', '.join(map(_name, comps))} are")
        if g == "PKU":
            why = ("the guest may still set CR4.PKE and use RDPKRU/WRPKRU, which do not depend "
                   "on XCR0, while XSAVE cannot hold PKRU")
        else:
            why = ("a Linux guest leaves the feature off; a program that trusts the flag "
                   "without XGETBV gets #UD (SDM: these instructions need the XCR0 bits)")
        note(f"CPUID flag {g} ({FLAGS[g]}) is set while {what} not advertised: {why}")
    linux = None
    boot = (fpu__init_system_xstate(guest, guest_kernel) if guest_kernel
            else fpu__init_system_xstate(guest))
    if boot.disabled:
        note(f"a Linux guest boots without XSAVE: {boot.disabled}")
    else:
        linux = boot.xcr0
        if linux is not None and linux != xcr0:
            why = [f"{_name(d.number)}: {d.reason}" for d in boot.dropped
                   if (xcr0 & ~linux) >> d.number & 1]
            note(f"a Linux guest enables XCR0 {linux:#x}, not all of {xcr0:#x}"
                 + (": " + "; ".join(why) if why else ""))
        if linux is not None and not ret and linux & ~(arch.guest_supported_xcr0 | 1):
            err(f"a Linux guest's XSETBV of {linux:#x} at boot gets #GP from KVM")
    if probe:
        out.extend(probe_host(entries))
    return TemplateCheck(host.name, xcr0, xss, arch.guest_supported_xcr0,
                         arch.guest_supported_xss, linux, tuple(out), boot.kernel)


def format_check(c: TemplateCheck) -> str:
    lines = [f"leaf 0xD template on {c.host}: {'OK' if c.ok else 'PROBLEMS'}",
             f"advertised XCR0 {c.xcr0:#x}, IA32_XSS {c.xss:#x}; KVM keeps XCR0 "
             f"{c.guest_supported_xcr0:#x}, IA32_XSS {c.guest_supported_xss:#x}",
             f"a Linux {c.linux} guest enables XCR0 "
             + ("(none: no XSAVE)" if c.linux_xcr0 is None else f"{c.linux_xcr0:#x}")]
    lines += [f"  {'x' if f.severity == 'error' else '-'} {f.what}" for f in c.findings]
    return "\n".join(lines)


__all__ = [
    "Finding", "HostOffer", "Left", "Template", "TemplateCheck", "TemplateError",
    "check_template", "format_check", "format_template", "guest_cpuid",
    "guest_profile", "host_offer",
    "measured_offer", "pool_template", "probe_host", "read_template",
]
