"""KVM's side of XSAVE enumeration: kvm_caps, supported CPUID leaf 0xD, KVM_CAP_XSAVE2 and what
KVM_SET_CPUID2 derives for a vCPU.

Models (Linux v6.18, whose FPU core is the v6.17 of Kingxukai/linux plus the KVM CET series):

- arch/x86/kvm/x86.c: KVM_SUPPORTED_XCR0 / KVM_SUPPORTED_XSS, the xcr0/xss part of
  kvm_x86_vendor_init(), KVM_CAP_XSAVE2 in kvm_vm_ioctl_check_extension(), and the
  KVM_X86_XCOMP_GUEST_SUPP attribute of kvm_x86_dev_get_attr();
- arch/x86/kvm/x86.h: kvm_get_filtered_xcr0();
- arch/x86/kvm/cpuid.c: xstate_required_size(), the ``case 0xd`` of __do_cpuid_func()
  (KVM_GET_SUPPORTED_CPUID), cpuid_get_supported_xcr0() / the guest_supported_xss of
  kvm_vcpu_after_set_cpuid(), kvm_check_cpuid() and kvm_update_cpuid_runtime().

Rules of this file:
- `KvmCaps` is the frozen configuration: what KVM knows about the host once the module is loaded.
  It is built either by modelling kvm_x86_vendor_init() on a booted kernel model
  (`kvm_x86_vendor_init`) or from what a real KVM reports about itself (`KvmCaps.from_kvm`);
  everything else here is a pure function of it, of the process's guest permission and of the
  guest CPUID table;
- a CPUID table is a tuple of `CpuidEntry2` (struct kvm_cpuid_entry2), looked up as KVM does
  (`find_cpuid`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from fpstate.errors import ProfileError
from fpstate.x86.cpuid import CpuidProfile
from fpstate.x86.xfeatures import (
    XFEATURE_MASK_AVX512,
    XFEATURE_MASK_BNDCSR,
    XFEATURE_MASK_BNDREGS,
    XFEATURE_MASK_CET_KERNEL,
    XFEATURE_MASK_CET_USER,
    XFEATURE_MASK_FPSSE,
    XFEATURE_MASK_PKRU,
    XFEATURE_MASK_XTILE,
    XFEATURE_MASK_XTILE_CFG,
    XFEATURE_MASK_XTILE_DATA,
    XFEATURE_MASK_YMM,
    bits,
)

#: x86.c: every XCR0 feature KVM can virtualise (no APX in v6.18).
KVM_SUPPORTED_XCR0 = (XFEATURE_MASK_FPSSE | XFEATURE_MASK_YMM | XFEATURE_MASK_BNDREGS
                      | XFEATURE_MASK_BNDCSR | XFEATURE_MASK_AVX512 | XFEATURE_MASK_PKRU
                      | XFEATURE_MASK_XTILE)
#: x86.c (v6.18 CET series): XFEATURE_MASK_CET_ALL. v6.17 and older: 0.
KVM_SUPPORTED_XSS = XFEATURE_MASK_CET_USER | XFEATURE_MASK_CET_KERNEL
#: arch/x86/kvm/cpuid.h: every feature beyond x87/SSE (bit 63, the compaction bit, excluded).
XFEATURE_MASK_EXTEND = ~(XFEATURE_MASK_FPSSE | (1 << 63)) & ((1 << 64) - 1)
#: fpu/xstate.h: the only permission-gated feature.
XFEATURE_MASK_USER_DYNAMIC = XFEATURE_MASK_XTILE_DATA
#: sizeof(struct kvm_xsave): the legacy KVM_GET_XSAVE buffer (uapi asm/kvm.h).
KVM_XSAVE_SIZE = 4096
#: struct xregs_state up to the extended area: legacy region (512) + header (64).
XSAVE_HDR_END = 576

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1  # the uapi spelling
KVM_X86_GRP_SYSTEM = 0
KVM_X86_XCOMP_GUEST_SUPP = 0
ENXIO = 6

#: CPUID.(EAX=0DH,ECX=1):EAX bits (cpufeatures.h word CPUID_D_1_EAX).
XSAVEOPT, XSAVEC, XGETBV1, XSAVES, XFD = 1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4
D1_EAX_NAMES = {XSAVEOPT: "XSAVEOPT", XSAVEC: "XSAVEC", XGETBV1: "XGETBV1", XSAVES: "XSAVES",
                XFD: "XFD"}


@dataclass(frozen=True, slots=True)
class CpuidEntry2:
    """struct kvm_cpuid_entry2: leaf ``function``, sub-leaf ``index``, KVM_CPUID_FLAG_*."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int

    @property
    def regs(self) -> tuple[int, int, int, int]:
        return (self.eax, self.ebx, self.ecx, self.edx)


def find_cpuid(entries: Iterable[CpuidEntry2], function: int, index: int = 0) -> CpuidEntry2 | None:
    """kvm_find_cpuid_entry_index() (cpuid.c): the entry of (function, index); an entry without
    KVM_CPUID_FLAG_SIGNIFCANT_INDEX matches any index. None when the table lacks it."""
    for e in entries:
        if e.function == function and (
                e.index == index or not e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX):
            return e
    return None


def offer_xcr0(entries: Iterable[CpuidEntry2], mask: int) -> tuple[CpuidEntry2, ...]:
    """What a VMM does to KVM_GET_SUPPORTED_CPUID's table before KVM_SET_CPUID2 when its CPU
    model offers the guest fewer XSAVE features (QEMU's -cpu, Firecracker's CPU templates):
    CPUID.(0DH,0) EDX:EAX ANDed with ``mask``, every other entry as it is. KVM derives
    guest_supported_xcr0 from that sub-leaf (cpuid_get_supported_xcr0)."""
    return tuple(replace(e, eax=e.eax & mask & 0xFFFFFFFF, edx=e.edx & mask >> 32)
                 if (e.function, e.index) == (0xD, 0) else e for e in entries)


def cpuid_regs(entries: Iterable[CpuidEntry2], function: int, index: int = 0) -> tuple[int, ...]:
    """The registers of (function, index); zeros where absent (kvm_cpuid()'s answer)."""
    e = find_cpuid(entries, function, index)
    return e.regs if e else (0, 0, 0, 0)


@dataclass(frozen=True, slots=True)
class XstateSize:
    """One row of KVM's xstate size cache: CPUID.(EAX=0DH,ECX=i) of the host, read once by
    kvm_init_xstate_sizes() (cpuid.c) for i = 2..19: EAX size, EBX standard offset, ECX[1]
    64-byte alignment in the compacted format."""

    number: int
    size: int
    offset: int
    aligned: bool


@dataclass(frozen=True, slots=True)
class KvmCaps:
    """What KVM knows about the host (kvm_caps, kvm_host, kvm_cpu_caps), frozen at module load.

    - ``supported_xcr0`` / ``supported_xss``: kvm_caps (host XCR0 & KVM_SUPPORTED_XCR0, host
      IA32_XSS & KVM_SUPPORTED_XSS, the latter 0 without the XSAVES cap; CET all-or-nothing);
    - ``host_xcr0`` / ``host_xss``: kvm_host.xcr0 (XGETBV(0)) and kvm_host.xss (RDMSR);
    - ``d1_eax``: kvm_cpu_caps[CPUID_D_1_EAX], the XSAVEOPT/XSAVEC/XGETBV1/XSAVES/XFD bits KVM
      may give a guest (the vendor module clears what it cannot virtualise);
    - ``xstate``: the xstate size cache (kvm_init_xstate_sizes), host CPUID 0xD sub-leaves;
    - ``host_xsave``: boot_cpu_has(X86_FEATURE_XSAVE) (KVM_SET_XCRS needs it).
    """

    supported_xcr0: int
    supported_xss: int
    host_xcr0: int
    host_xss: int
    d1_eax: int
    xstate: tuple[XstateSize, ...]
    host_xsave: bool = True

    def cap(self, bit: int) -> bool:
        """kvm_cpu_cap_has() for a CPUID.(0DH,1):EAX bit (XSAVEOPT ... XFD)."""
        return bool(self.d1_eax & bit)

    def component(self, i: int) -> XstateSize:
        for x in self.xstate:
            if x.number == i:
                return x
        raise ProfileError(f"KVM's xstate size cache has no component {i}")

    @classmethod
    def from_kvm(cls, xcomp_guest_supp: int, supported: Sequence[CpuidEntry2],
                 host: CpuidProfile, *, host_xcr0: int | None = None,
                 host_xss: int | None = None) -> KvmCaps:
        """The configuration of a real KVM from what it reports: KVM_X86_XCOMP_GUEST_SUPP is
        kvm_caps.supported_xcr0 (unfiltered by permission), KVM_GET_SUPPORTED_CPUID leaf 0xD
        sub-leaf 1 gives kvm_cpu_caps[CPUID_D_1_EAX] (EAX) and kvm_caps.supported_xss
        (EDX:ECX); the size cache is the host's raw CPUID leaf 0xD, as kvm_init_xstate_sizes()
        reads it. ``host_xcr0`` / ``host_xss`` (what the host kernel wrote) default to the bits
        the host enumerates."""
        d1 = find_cpuid(supported, 0xD, 1)
        d1_eax, sxss = (d1.eax, d1.edx << 32 | d1.ecx) if d1 else (0, 0)
        return cls(
            supported_xcr0=xcomp_guest_supp,
            supported_xss=sxss,
            host_xcr0=host.xcr0_supported if host_xcr0 is None else host_xcr0,
            host_xss=host.xss_supported if host_xss is None else host_xss,
            d1_eax=d1_eax,
            xstate=xstate_cache(host),
            host_xsave=host.has("XSAVE"),
        )


def xstate_cache(host: CpuidProfile) -> tuple[XstateSize, ...]:
    """kvm_init_xstate_sizes() (cpuid.c): CPUID.(0DH, i) for i = YMM..19, raw from the host."""
    out = []
    for i in range(2, 20):
        eax, ebx, ecx, _ = host.cpuid(0xD, i)
        if eax:
            out.append(XstateSize(i, eax, ebx, bool(ecx & 2)))
    return tuple(out)


def kvm_x86_vendor_init(host: CpuidProfile, host_xcr0: int, host_xss: int, *, host_d1_eax: int,
                        vendor_d1_eax: int, cet: bool, amx: bool = True) -> KvmCaps:
    """The xcr0/xss part of kvm_x86_vendor_init() (x86.c, v6.18) on a host whose kernel wrote
    XCR0 = ``host_xcr0`` and IA32_XSS = ``host_xss``.

    kvm_cpu_caps[CPUID_D_1_EAX] = the CPUID.(0DH,1):EAX flags boot_cpu_has() sees
    (``host_d1_eax``: the kernel may have cleared some, e.g. XSAVES for AMD erratum 1386)
    restricted to what the vendor module virtualises (``vendor_d1_eax``: VMX needs the XSAVES
    VM-execution control, PVM offers none). supported_xcr0 = host XCR0 & KVM_SUPPORTED_XCR0;
    supported_xss = host XSS & KVM_SUPPORTED_XSS, 0 without the XSAVES cap, and CET only when
    the guest may get SHSTK or IBT (``cet``) and both CET bits are there (all-or-nothing).
    ``amx`` False is a kernel before v5.17 (versions row ``kvm_amx``): KVM_SUPPORTED_XCR0
    without XTILE_CFG and XTILE_DATA, kvm_cpu_caps without XFD.
    """
    d1_eax = host_d1_eax & vendor_d1_eax & (XSAVEOPT | XSAVEC | XGETBV1 | XSAVES | XFD)
    supported_xcr0 = KVM_SUPPORTED_XCR0
    if not amx:
        d1_eax &= ~XFD
        supported_xcr0 &= ~XFEATURE_MASK_XTILE
    sxss = host_xss & KVM_SUPPORTED_XSS if d1_eax & XSAVES else 0
    if not cet:
        sxss &= ~KVM_SUPPORTED_XSS
    if sxss & KVM_SUPPORTED_XSS != KVM_SUPPORTED_XSS:
        sxss &= ~KVM_SUPPORTED_XSS
    return KvmCaps(
        supported_xcr0=host_xcr0 & supported_xcr0,
        supported_xss=sxss,
        host_xcr0=host_xcr0,
        host_xss=host_xss,
        d1_eax=d1_eax,
        xstate=xstate_cache(host),
        host_xsave=host.has("XSAVE"),
    )


def _round64(n: int) -> int:
    return (n + 63) & ~63


def xstate_required_size(caps: KvmCaps, xstate_bv: int, compacted: bool) -> int:
    """xstate_required_size() (cpuid.c): 576 plus the extended components of ``xstate_bv``,
    ascending from bit 2. Compacted: each follows the previous, rounded up to 64 where
    CPUID ECX[1] says so; standard: at its CPUID offset. The result is the largest end."""
    ret = XSAVE_HDR_END
    for i in bits(xstate_bv & XFEATURE_MASK_EXTEND):
        x = caps.component(i)
        offset = (_round64(ret) if x.aligned else ret) if compacted else x.offset
        ret = max(ret, offset + x.size)
    return ret


def kvm_get_filtered_xcr0(caps: KvmCaps, guest_perm: int) -> int:
    """kvm_get_filtered_xcr0() (x86.h): supported_xcr0 minus the dynamic features the process
    has no guest permission for (``guest_perm`` is xstate_get_guest_group_perm(), the raw
    __state_perm); without XTILE_DATA, XTILE_CFG goes too (CFG without DATA is an illegal XCR0).
    Used only for enumeration."""
    permitted = caps.supported_xcr0
    if permitted & XFEATURE_MASK_USER_DYNAMIC:
        permitted &= guest_perm
        if not permitted & XFEATURE_MASK_XTILE_DATA:
            permitted &= ~XFEATURE_MASK_XTILE_CFG
    return permitted


def kvm_cap_xsave2(caps: KvmCaps, guest_perm: int) -> int:
    """KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) (kvm_vm_ioctl_check_extension): the standard size of
    the filtered XCR0, never below sizeof(struct kvm_xsave) = 4096."""
    return max(KVM_XSAVE_SIZE, xstate_required_size(caps, kvm_get_filtered_xcr0(caps, guest_perm),
                                                    False))


def kvm_x86_dev_get_attr(caps: KvmCaps, group: int, attr: int) -> int:
    """KVM_GET_DEVICE_ATTR on /dev/kvm (kvm_x86_dev_get_attr, x86.c): KVM_X86_XCOMP_GUEST_SUPP
    is kvm_caps.supported_xcr0, not filtered by permission; anything else -ENXIO (returned
    negative, as the ioctl does)."""
    if group == KVM_X86_GRP_SYSTEM and attr == KVM_X86_XCOMP_GUEST_SUPP:
        return caps.supported_xcr0
    return -ENXIO


def supported_cpuid_leaf_0xd(caps: KvmCaps, host: CpuidProfile,
                             guest_perm: int) -> tuple[CpuidEntry2, ...]:
    """The leaf 0xD entries of KVM_GET_SUPPORTED_CPUID: ``case 0xd`` of __do_cpuid_func().

    Sub-leaf 0: host EDX:EAX & the filtered XCR0, EBX = ECX = its standard size; nothing more
    when that XCR0 is 0. Sub-leaf 1: EAX = kvm_cpu_caps (XSAVEOPT...XFD), EBX = the compacted
    size of filtered XCR0 | supported_xss when XSAVES or XSAVEC is offered, else 0; EDX:ECX =
    host & supported_xss. Sub-leaves 2..63 for every bit of the filtered XCR0 (user) or
    supported_xss (supervisor): the host's EAX/EBX/ECX, ECX[2] (XFD) cleared without the XFD
    cap, EDX 0; a sub-leaf whose host size is 0 or whose ECX[0] disagrees is dropped (WARN).
    """
    permitted_xcr0 = kvm_get_filtered_xcr0(caps, guest_perm)
    permitted_xss = caps.supported_xss
    flag = KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    a, _, _, d = host.cpuid(0xD, 0)
    size = xstate_required_size(caps, permitted_xcr0, False)
    out = [CpuidEntry2(0xD, 0, flag, a & permitted_xcr0 & 0xFFFFFFFF, size, size,
                       d & permitted_xcr0 >> 32)]
    if not permitted_xcr0:
        return tuple(out)
    _, _, c1, d1 = host.cpuid(0xD, 1)
    eax1 = caps.d1_eax
    if eax1 & (XSAVES | XSAVEC):
        ebx1 = xstate_required_size(caps, permitted_xcr0 | permitted_xss, True)
    else:
        ebx1 = 0  # the kernel WARNs if permitted_xss != 0 here (supported_xss needs XSAVES)
    out.append(CpuidEntry2(0xD, 1, flag, eax1, ebx1, c1 & permitted_xss & 0xFFFFFFFF,
                           d1 & permitted_xss >> 32))
    for i in range(2, 64):
        if permitted_xcr0 >> i & 1:
            s_state = False
        elif permitted_xss >> i & 1:
            s_state = True
        else:
            continue
        ea, eb, ec, _ = host.cpuid(0xD, i)
        if not ea or bool(ec & 1) != s_state:
            continue
        if not caps.cap(XFD):
            ec &= ~4
        out.append(CpuidEntry2(0xD, i, flag, ea, eb, ec, 0))
    return tuple(out)


def cpuid_get_supported_xcr0(caps: KvmCaps, entries: Sequence[CpuidEntry2]) -> int:
    """cpuid_get_supported_xcr0() (cpuid.c): guest CPUID.(0DH,0) EDX:EAX & supported_xcr0 (0
    without the entry). KVM_SET_CPUID2 stores it as vcpu->arch.guest_supported_xcr0."""
    e = find_cpuid(entries, 0xD, 0)
    if e is None:
        return 0
    return (e.edx << 32 | e.eax) & caps.supported_xcr0


def cpuid_get_supported_xss(caps: KvmCaps, entries: Sequence[CpuidEntry2]) -> int:
    """vcpu->arch.guest_supported_xss (kvm_vcpu_after_set_cpuid, v6.18): guest CPUID.(0DH,1)
    EDX:ECX & supported_xss (0 without the entry)."""
    e = find_cpuid(entries, 0xD, 1)
    if e is None:
        return 0
    return (e.edx << 32 | e.ecx) & caps.supported_xss


def guest_cpu_cap_has(caps: KvmCaps, entries: Sequence[CpuidEntry2], bit: int) -> bool:
    """guest_cpu_cap_has() for a CPUID.(0DH,1):EAX feature: the guest CPUID sets it and KVM
    supports it (vcpu->arch.cpu_caps is the intersection for these bits)."""
    return bool(cpuid_regs(entries, 0xD, 1)[0] & bit & caps.d1_eax)


def kvm_check_cpuid_dynamic(entries: Sequence[CpuidEntry2]) -> int:
    """The xfeature part of kvm_check_cpuid() (cpuid.c): the dynamic features the guest CPUID
    enumerates in CPUID.(0DH,0) EDX:EAX -- *not* masked by supported_xcr0 -- which KVM then
    asks fpu_enable_guest_xfd_features() to size the guest fpstate for (0: nothing to do)."""
    e = find_cpuid(entries, 0xD, 0)
    if e is None:
        return 0
    return (e.edx << 32 | e.eax) & XFEATURE_MASK_USER_DYNAMIC


def kvm_update_cpuid_runtime(caps: KvmCaps, entries: Sequence[CpuidEntry2], xcr0: int,
                             xss: int) -> tuple[CpuidEntry2, ...]:
    """The leaf 0xD part of kvm_update_cpuid_runtime() (cpuid.c, v6.18), run when the CPUID's
    dynamic bits are dirty (XCR0 or IA32_XSS changed): CPUID.(0DH,0).EBX = standard size of
    XCR0; CPUID.(0DH,1).EBX = compacted size of XCR0 | IA32_XSS when the guest CPUID has
    XSAVES or XSAVEC."""
    out = []
    for e in entries:
        if e.function == 0xD and e.index == 0:
            e = replace(e, ebx=xstate_required_size(caps, xcr0, False))
        elif e.function == 0xD and e.index == 1 and e.eax & (XSAVES | XSAVEC):
            e = replace(e, ebx=xstate_required_size(caps, xcr0 | xss, True))
        out.append(e)
    return tuple(out)


def guest_profile(entries: Sequence[CpuidEntry2], name: str = "kvm-guest") -> CpuidProfile:
    """The guest CPUID table as a CpuidProfile: what CPUID answers inside the guest (KVM
    reads absent leaves as zeros, and so does the profile)."""
    leaves = {(e.function, e.index): e.regs for e in entries}
    return CpuidProfile.from_leaves(name, leaves, "KVM_SET_CPUID2")


__all__ = [
    "KVM_SUPPORTED_XCR0", "KVM_SUPPORTED_XSS", "KVM_XSAVE_SIZE", "CpuidEntry2", "KvmCaps",
    "cpuid_get_supported_xcr0", "cpuid_get_supported_xss", "find_cpuid", "kvm_cap_xsave2",
    "kvm_get_filtered_xcr0", "kvm_x86_vendor_init", "offer_xcr0", "supported_cpuid_leaf_0xd",
    "xstate_required_size",
]
