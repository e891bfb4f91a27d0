"""Boot-time xstate sizing: fpu__init_system_xstate() and its helpers, version by version.

Models arch/x86/kernel/fpu/xstate.c (v5.16 .. v6.18; ``fpstate.kernel.x86.versions`` lists where
the versions differ) together with the masks of arch/x86/include/asm/fpu/xstate.h:

1. max_features = CPUID.(0xD,0):EDX:EAX | CPUID.(0xD,1):EDX:ECX; FP and SSE must be there, and
   (v6.16+) APX and MPX must not both be; independent_features = max & LBR;
2. xsave_cpuid_features[] clears every feature whose CPUID gate boot_cpu_has() denies, XFD's
   absence clears the dynamic XTILE_DATA, and the kernel keeps only the user features it
   supports plus, with XSAVES, the supervisor ones; default masks drop dynamic and (v6.17+)
   guest-only features;
3. fpu__init_cpu_xstate() writes XFD, XCR0 = fpu_user_cfg.max_features and IA32_XSS =
   supervisor | independent; setup_xstate_cache() reads CPUID sizes/offsets/flags;
4. init_xstate_size() reads the sizes the CPU reports for what it just enabled, recomputes them
   from its own tables (xstate_calculate_size()) and gives up when they disagree
   (paranoid_xstate_size_valid()); init_fpstate must fit its 4096-byte buffer;
5. the boot lines: 'Supporting XSAVE feature', the offsets (compacted offsets when the kernel
   uses the compacted format) and 'Enabled xstate features'.

The file's core-dump hooks (v6.12+) follow from the boot too: the NT_X86_XSAVE_LAYOUT note that
ends a core's notes (`elf_coredump_extra_notes`). Its one run-time function of a CPU,
fpu__resume_cpu(), is here as well (`fpu__resume_cpu`, called by fpstate.kernel.x86.power).

The CPU side of step 4: the kernel reads CPUID.(0xD,0).EBX and CPUID.(0xD,1).EBX *after*
writing XCR0 and IA32_XSS itself, so the numbers in a dump (taken under another OS, e.g.
Windows, which enables other features such as Processor Trace in IA32_XSS) are not what Linux
reads. The model asks what the CPU would report for the XCR0|XSS Linux writes:
``layout.standard_size()`` / ``layout.compacted_size()`` (SDM 13.2, 13.4); where a profile's
sub-leaf reads size 0 (a hypervisor masking it, a truncated dump) the same SDM rule is applied
to the zeros such a CPU reports. The kernel side uses only its own cache of raw CPUID values,
as xstate.c does, so the paranoia check compares two independent computations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fpstate.errors import FpstateError, MaskError, ProfileError
from fpstate.kernel.x86.config import (
    FPREGS_STATE_SIZE,
    XSTATE_FLAG_ALIGNED64,
    XSTATE_FLAG_SUPERVISOR,
    BootResult,
    DroppedFeature,
    FpuStateConfig,
    InitFpstate,
    VcpuFpuConfig,
    XstateCache,
    XstateEntry,
)
from fpstate.kernel.x86.init import (
    NO_FPU_LINE,
    boot_cpu_caps,
    fpu__init_system_xstate_size_legacy,
    why_absent,
)
from fpstate.kernel.x86.types import PF_KTHREAD, KernelBug
from fpstate.kernel.x86.versions import NEWEST, KernelVersion, kernel_version
from fpstate.x86 import layout
from fpstate.x86.cpuid import CpuidProfile
from fpstate.x86.xfeatures import (
    BY_NUMBER,
    FXSAVE_SIZE,
    XCOMP_BV_COMPACTED_FORMAT,
    XFEATURE_MASK_APX,
    XFEATURE_MASK_AVX512,
    XFEATURE_MASK_BNDCSR,
    XFEATURE_MASK_BNDREGS,
    XFEATURE_MASK_CET_KERNEL,
    XFEATURE_MASK_CET_USER,
    XFEATURE_MASK_FPSSE,
    XFEATURE_MASK_LBR,
    XFEATURE_MASK_PASID,
    XFEATURE_MASK_PKRU,
    XFEATURE_MASK_PT,
    XFEATURE_MASK_XTILE,
    XFEATURE_MASK_XTILE_DATA,
    XFEATURE_MASK_YMM,
    XSAVE_HDR_SIZE,
    bits,
)

if TYPE_CHECKING:
    from fpstate.kernel.x86.sched import Cpu

XFEATURE_XTILE_DATA = 18
XTILE_DATA_TILE_SIZE = 1024  #: sizeof(struct xtile_data): one 16 x 64-byte tile
EINVAL = 22
_UNKNOWN = "unknown xstate feature"


@dataclass(frozen=True, slots=True)
class XfeatureMasks:
    """The feature groups of arch/x86/include/asm/fpu/xstate.h for one kernel (64-bit)."""

    user_supported: int
    supervisor_supported: int
    guest_supervisor: int
    supervisor_unsupported: int
    independent: int
    user_dynamic: int


def xfeature_masks(kernel: KernelVersion) -> XfeatureMasks:
    """XFEATURE_MASK_USER_SUPPORTED, _SUPERVISOR_SUPPORTED, _GUEST_SUPERVISOR, ... of ``kernel``."""
    user = (XFEATURE_MASK_FPSSE | XFEATURE_MASK_YMM | XFEATURE_MASK_AVX512 | XFEATURE_MASK_PKRU
            | XFEATURE_MASK_BNDREGS | XFEATURE_MASK_BNDCSR | XFEATURE_MASK_XTILE)
    if kernel.has("apx"):
        user |= XFEATURE_MASK_APX
    guest = XFEATURE_MASK_CET_KERNEL if kernel.has("guest_only_cet_kernel") else 0
    sup = XFEATURE_MASK_PASID | guest
    unsupported = XFEATURE_MASK_PT
    if kernel.has("cet_user"):
        sup |= XFEATURE_MASK_CET_USER
        if not guest:
            unsupported |= XFEATURE_MASK_CET_KERNEL
    return XfeatureMasks(user, sup, guest, unsupported, XFEATURE_MASK_LBR,
                         XFEATURE_MASK_XTILE_DATA)


def xfeature_max(kernel: KernelVersion) -> int:
    """XFEATURE_MAX: 19 (XTILE_DATA is the last enum entry), 20 with APX (v6.16+)."""
    return 20 if kernel.has("apx") else 19


def xfeature_names(kernel: KernelVersion) -> tuple[str, ...]:
    """xfeature_names[] of ``kernel``: XFEATURE_MAX + 1 strings, the last one for overflow."""
    names = [BY_NUMBER[i].boot_name for i in range(xfeature_max(kernel))] + [_UNKNOWN]
    if not kernel.has("cet_user"):
        names[11] = names[12] = _UNKNOWN
    elif not kernel.has("guest_only_cet_kernel"):
        names[12] = "Control-flow Kernel registers (unused)"
    return tuple(names)


def xfeature_enum(kernel: KernelVersion, nr: int) -> str:
    """The ``enum xfeature`` name of ``nr`` in ``kernel`` ("-" at or beyond XFEATURE_MAX)."""
    if nr >= xfeature_max(kernel):
        return "-"
    if nr in (11, 12) and not kernel.has("cet_user"):
        return f"XFEATURE_RSRVD_COMP_{nr}"
    if nr == 12 and not kernel.has("guest_only_cet_kernel"):
        return "XFEATURE_CET_KERNEL_UNUSED"
    return BY_NUMBER[nr].enum


def xsave_cpuid_features(kernel: KernelVersion) -> tuple[str | None, ...]:
    """xsave_cpuid_features[]: the X86_FEATURE_* gate of each xfeature (None: no entry, the
    feature is always cleared). Its length is the number of entries the clearing loop walks."""
    gates: list[str | None] = [BY_NUMBER[i].gate for i in range(xfeature_max(kernel))]
    if not kernel.has("pkru_ospke"):
        gates[9] = "PKU"
    if not kernel.has("cet_user"):
        gates[11] = None
    if not kernel.has("guest_only_cet_kernel"):
        gates[12] = None
    return tuple(gates)


def print_order(kernel: KernelVersion) -> tuple[int, ...]:
    """The features print_xstate_features() asks about, in order: a fixed list before v6.16
    (FP..Hi16_ZMM, PKRU, PASID, CET_USER from v6.6, XTILE_CFG, XTILE_DATA), every bit after."""
    if kernel.has("print_loop"):
        return tuple(range(xfeature_max(kernel)))
    return (0, 1, 2, 3, 4, 5, 6, 7, 9, 10) + ((11,) if kernel.has("cet_user") else ()) + (17, 18)


# -- the kernel's tables and size arithmetic -------------------------------------------------


def setup_xstate_cache(
    profile: CpuidProfile, max_features: int, compacted: bool, order_by_offset: bool
) -> XstateCache:
    """setup_xstate_cache(): x87 at 0 (160 bytes, up to xmm_space), SSE at 160 (256 bytes), and
    for each extended feature of ``max_features`` CPUID.(0xD,i) EAX = size, ECX = flags and,
    unless the feature is supervisor (ECX[0]), EBX = standard offset."""
    entries = [XstateEntry(0, 160, 0, 0), XstateEntry(1, 256, 160, 0)]
    for i in bits(max_features & ~XFEATURE_MASK_FPSSE):
        eax, ebx, ecx, _ = profile.cpuid(0xD, i)
        entries.append(XstateEntry(i, eax, None if ecx & XSTATE_FLAG_SUPERVISOR else ebx, ecx))
    return XstateCache(tuple(entries), compacted, order_by_offset)


def xfeature_get_offset(cache: XstateCache, xcomp_bv: int, xfeature: int) -> int:
    """xfeature_get_offset(): the standard offset without XCOMPACTED or for x87/SSE; else 576
    plus the sizes of the features of ``xcomp_bv`` below ``xfeature``, each 64-aligned first when
    its ECX[1] says so (the feature's own alignment included)."""
    if not cache.compacted or xfeature <= 1:
        offset = cache.entry(xfeature).offset
        assert offset is not None, f"supervisor xfeature {xfeature} has no standard offset"
        return offset
    offs = FXSAVE_SIZE + XSAVE_HDR_SIZE
    for i in bits(xcomp_bv & ~XFEATURE_MASK_FPSSE & ~XCOMP_BV_COMPACTED_FORMAT):
        e = cache.entry(i)
        if e.flags & XSTATE_FLAG_ALIGNED64:
            offs = (offs + 63) // 64 * 64
        if i == xfeature:
            break
        offs += e.size
    return offs


def xstate_calculate_size(cache: XstateCache, xfeatures: int, compacted: bool) -> int:
    """xstate_calculate_size(): 576 when nothing beyond SSE; compacted: the compacted offset of
    the highest feature plus its size; standard: offset plus size of the highest feature
    (v6.16+: the one that comes last in xfeature_uncompact_order[], i.e. by offset)."""
    topmost = xfeatures.bit_length() - 1
    if topmost <= 1:
        return FXSAVE_SIZE + XSAVE_HDR_SIZE
    if compacted:
        offset = xfeature_get_offset(cache, xfeatures, topmost)
    else:
        if cache.order_by_offset:
            for i in cache.uncompact_order:
                if xfeatures >> i & 1:
                    topmost = i
        entry_offset = cache.entry(topmost).offset
        # setup_xstate_cache() leaves xstate_offsets[i] at -1 for a feature CPUID.(0xD,i)
        # flags as supervisor (ECX[0]); the array is unsigned int, so a user feature a broken
        # leaf 0xD flags so (a fuzzed template) gets a size that wraps around, which the
        # consistency check then refuses.
        offset = 0xFFFFFFFF if entry_offset is None else entry_offset
    return (offset + cache.entry(topmost).size) & 0xFFFFFFFF


def cpuid_xsave_size(profile: CpuidProfile, enabled: int, compacted: bool) -> int:
    """What the CPU reports in CPUID.(0xD,0).EBX (standard, ``enabled`` = XCR0) or
    CPUID.(0xD,1).EBX (compacted, ``enabled`` = XCR0 | IA32_XSS): layout.standard_size() /
    compacted_size(). A profile whose sub-leaf reads size 0 (or flags a user feature as
    supervisor) gets the SDM rule applied to exactly those values."""
    try:
        if compacted:
            return layout.compacted_size(profile, enabled)
        return layout.standard_size(profile, enabled)
    except (ProfileError, MaskError):
        pass
    size = FXSAVE_SIZE + XSAVE_HDR_SIZE
    for i in bits(enabled & ~XFEATURE_MASK_FPSSE):
        eax, ebx, ecx, _ = profile.cpuid(0xD, i)
        if compacted:
            if ecx & XSTATE_FLAG_ALIGNED64:
                size = (size + 63) // 64 * 64
            size += eax
        else:
            size = max(size, ebx + eax)
    return size


# -- the boot ----------------------------------------------------------------------------------


class _Boot:
    """The kernel's globals while fpu__init_system() runs (fpu_kernel_cfg, fpu_user_cfg,
    guest_default_cfg, init_fpstate, the xstate cache, the log) for one profile and kernel."""

    def __init__(self, profile: CpuidProfile, kernel: KernelVersion) -> None:
        self.profile, self.kernel = profile, kernel
        self.caps = boot_cpu_caps(profile, kernel)
        self.masks = xfeature_masks(kernel)
        self.names = xfeature_names(kernel)
        self.enumerated = profile.xcr0_supported | profile.xss_supported
        self.kmax = self.kdef = self.indep = self.umax = self.udef = self.guest = 0
        self.ksize = self.kdefsize = self.usize = self.udefsize = self.gsize = 0
        self.legacy_features = 0
        self.init_size = self.init_xfeatures = self.init_xfd = self.init_xcomp_bv = 0
        self.xcr0: int | None = None
        self.xss: int | None = None
        self.xfd: int | None = None
        self.reported: tuple[int | None, int | None] = (None, None)
        self.compacted = False
        self.cache: XstateCache | None = None
        self.log: list[str] = []
        self.dropped: dict[int, str] = {}
        self.disabled: str | None = None
        self.dumped = False

    def drop(self, before: int, after: int, reason: str) -> None:
        """Record ``reason`` for every enumerated feature in ``before`` but not in ``after``."""
        for i in bits(before & ~after & self.enumerated):
            self.dropped.setdefault(i, reason)

    def warn(self, text: str) -> None:
        """XSTATE_WARN_ON(): the WARN text, then __xstate_dump_leaves()."""
        self.log.append(text)
        self.dump_leaves()

    def dump_leaves(self) -> None:
        """__xstate_dump_leaves(): once per boot, CPUID leaf 0xD sub-leaves 0..XFEATURE_MAX+9
        as the CPU answers now (sub-leaf 0/1 EBX for the XCR0/IA32_XSS just written)."""
        if self.dumped:
            return
        self.dumped = True
        for i in range(xfeature_max(self.kernel) + 10):
            a, b, c, d = self.profile.cpuid(0xD, i)
            if i in (0, 1) and self.reported[i] is not None:
                b = self.reported[i] or 0
            self.log.append(f"CPUID[0d, {i:02x}]: eax={a:08x} ebx={b:08x} ecx={c:08x} edx={d:08x}")


def _independent_mask(b: _Boot) -> int:
    """xfeatures_mask_independent(): v6.11+ fpu_kernel_cfg.independent_features, before that
    XFEATURE_MASK_INDEPENDENT; either way without LBR unless X86_FEATURE_ARCH_LBR."""
    mask = b.indep if b.kernel.has("independent_enumerated") else b.masks.independent
    return mask if b.caps.has("ARCH_LBR") else mask & ~XFEATURE_MASK_LBR


def xsetbv_fault(xcr0: int, supported: int | None = None) -> str | None:
    """Why XSETBV(XCR0 = ``xcr0``) raises #GP(0), None when it does not (SDM Vol. 2 XSETBV and
    Vol. 1 13.3: only bits of CPUID.(0xD,0):EDX:EAX (``supported``, when given); x87 must be
    set; AVX needs SSE; the AVX-512 trio is all or nothing and needs AVX; the two AMX
    components, and the two MPX components, go together)."""
    if supported is not None and xcr0 & ~supported:
        return f"bits 0x{xcr0 & ~supported:x} not supported in XCR0 (CPUID.(EAX=0DH,ECX=0))"
    if not xcr0 & 1:
        return "XCR0[0] (x87) clear"
    if xcr0 & XFEATURE_MASK_YMM and not xcr0 & 2:
        return "XCR0[2] (AVX) set with XCR0[1] (SSE) clear"
    avx512 = xcr0 & XFEATURE_MASK_AVX512
    if avx512 and (avx512 != XFEATURE_MASK_AVX512 or not xcr0 & XFEATURE_MASK_YMM):
        return "XCR0[7:5] (AVX-512) neither 000b nor 111b with XCR0[2:1] = 11b"
    for pair, what in ((XFEATURE_MASK_XTILE, "XCR0[18:17] (AMX)"),
                       (XFEATURE_MASK_BNDREGS | XFEATURE_MASK_BNDCSR, "XCR0[4:3] (MPX)")):
        if xcr0 & pair not in (0, pair):
            return f"{what} neither both set nor both clear"
    return None


def fpu__init_cpu_xstate(b: _Boot) -> bool:
    """fpu__init_cpu_xstate(): (CR4.OSXSAVE,) MSR_IA32_XFD = init_fpstate.xfd when XFD,
    XCR0 = fpu_user_cfg.max_features, IA32_XSS = supervisor | independent when XSAVES.

    False when the XSETBV faults: the kernel computed an XCR0 the CPU refuses (only a CPUID that
    enumerates half of a group, e.g. AMX_TILE without XFD, gets there) and the boot CPU dies
    on an early #GP; the model records it as the "xsetbv_gp" result."""
    if not b.caps.has("XSAVE") or not b.kmax:
        return True
    if b.caps.has("XFD"):
        b.xfd = b.init_xfd
    fault = xsetbv_fault(b.umax, b.profile.xcr0_supported)
    if fault is not None:
        b.log.append(f"#GP(0) in xsetbv(XCR_XFEATURE_ENABLED_MASK, 0x{b.umax:x}): {fault}")
        b.disabled = "xsetbv_gp"
        return False
    b.xcr0 = b.umax
    if b.caps.has("XSAVES"):
        b.xss = (b.kmax & b.masks.supervisor_supported) | _independent_mask(b)
        bad = b.xss & ~b.profile.xss_supported
        if bad:
            b.log.append(f"unchecked MSR access error: WRMSR to 0xda0 (tried to write "
                         f"0x{b.xss:016x})")
    return True


def check_xtile_data_against_struct(b: _Boot, size: int) -> int:
    """check_xtile_data_against_struct(): every palette of CPUID leaf 0x1D must have 1024-byte
    tiles; tile data must be 1024 * the largest tile count. Returns 0 or -EINVAL (which
    check_xstate_against_struct() ignores)."""
    max_palid = b.profile.cpuid(0x1D, 0)[0]
    max_tile = 0
    for palid in range(1, max_palid + 1):
        eax, ebx, _, _ = b.profile.cpuid(0x1D, palid)
        tile_size, count = (eax >> 16) & 0xFFFF, (ebx >> 16) & 0xFFFF
        if tile_size != XTILE_DATA_TILE_SIZE:
            b.log.append(f"XFEATURE_XTILE_DATA: struct is {XTILE_DATA_TILE_SIZE} bytes, "
                         f"cpu xtile {tile_size} bytes")
            b.dump_leaves()
            return -EINVAL
        max_tile = max(max_tile, count)
    state_size = XTILE_DATA_TILE_SIZE * max_tile
    if size != state_size:
        b.log.append(f"XFEATURE_XTILE_DATA: calculated size is {state_size} bytes, "
                     f"cpu state {size} bytes")
        b.dump_leaves()
        return -EINVAL
    return 0


def check_xstate_against_struct(b: _Boot, nr: int) -> bool:
    """check_xstate_against_struct(): CPUID's size of ``nr`` against the kernel's struct. A
    mismatch only WARNs (XCHECK_SZ evaluates to true); a feature without a struct fails."""
    sz = b.profile.cpuid(0xD, nr)[0]
    structs = (b.masks.user_supported | b.masks.supervisor_supported) & ~XFEATURE_MASK_FPSSE
    if nr == XFEATURE_XTILE_DATA:
        check_xtile_data_against_struct(b, sz)
        return True
    if structs >> nr & 1:
        want = BY_NUMBER[nr].size
        if sz != want:
            who = (f"[{b.names[nr]}]" if b.kernel.has("cet_user")
                   else xfeature_enum(b.kernel, nr))
            b.log.append(f"{who}: struct is {want} bytes, cpu state {sz} bytes")
            b.dump_leaves()
        return True
    if b.kernel.has("warn_with_reason"):
        b.warn(f"XSAVE consistency problem: No structure for xstate: {nr}")
    else:
        b.log.append(f"no structure for xstate: {nr}")
        b.warn("XSAVE consistency problem, dumping leaves")
    return False


def paranoid_xstate_size_valid(b: _Boot, kernel_size: int) -> bool:
    """paranoid_xstate_size_valid(): every feature has a matching struct, supervisor features
    only with XSAVES, and xstate_calculate_size(max_features) equals what the CPU reported."""
    assert b.cache is not None
    reason = b.kernel.has("warn_with_reason")
    for i in bits(b.kmax & ~XFEATURE_MASK_FPSSE):
        if not check_xstate_against_struct(b, i):
            return False
        if not b.caps.has("XSAVES") and b.cache.entry(i).supervisor:
            b.warn(f"XSAVE consistency problem: Got supervisor feature {i}, but XSAVES not "
                   "advertised" if reason else "XSAVE consistency problem, dumping leaves")
            return False
    size = xstate_calculate_size(b.cache, b.kmax, b.compacted)
    if size != kernel_size:
        b.warn(f"XSAVE consistency problem: size {size} != kernel_size {kernel_size}"
               if reason else "XSAVE consistency problem, dumping leaves")
    return size == kernel_size


def init_xstate_size(b: _Boot) -> int:
    """init_xstate_size(): user size = CPUID.(0xD,0).EBX; kernel size = CPUID.(0xD,1).EBX read
    with IA32_XSS holding no independent feature (get_xsave_compacted_size()), or the user size
    without XCOMPACTED; recompute and check; then set the four sizes (and the guest's)."""
    assert b.cache is not None and b.xcr0 is not None
    user_size = cpuid_xsave_size(b.profile, b.xcr0, compacted=False)
    kernel_size = user_size
    b.reported = (user_size, None)
    if b.compacted:
        xss = (b.xss or 0) & ~_independent_mask(b) & b.profile.xss_supported
        kernel_size = cpuid_xsave_size(b.profile, b.xcr0 | xss, compacted=True)
        b.reported = (user_size, kernel_size)
    kernel_default_size = xstate_calculate_size(b.cache, b.kdef, b.compacted)
    if not b.kernel.has("init_fpstate_default") and kernel_default_size > FPREGS_STATE_SIZE:
        b.log.append(f"x86/fpu: xstate buffer too small ({FPREGS_STATE_SIZE} < "
                     f"{kernel_default_size}), disabling xsave")
        b.disabled = "xstate_buffer_too_small"
        return -EINVAL
    if not paranoid_xstate_size_valid(b, kernel_size):
        b.disabled = "paranoid_size"
        return -EINVAL
    b.ksize, b.usize, b.kdefsize = kernel_size, user_size, kernel_default_size
    b.udefsize = xstate_calculate_size(b.cache, b.udef, False)
    b.gsize = xstate_calculate_size(b.cache, b.guest, b.compacted)
    return 0


def fpu__init_disable_system_xstate(b: _Boot, legacy_size: int) -> None:
    """fpu__init_disable_system_xstate(): (v6.16+ 'XSAVE disabled'), no kernel features, every
    size back to the legacy size, init_fpstate.xfd = 0. fpu_user_cfg's and the default masks
    keep whatever was computed (the kernel does not reset them)."""
    if b.kernel.has("xsave_disabled_line"):
        b.log.append("x86/fpu: XSAVE disabled")
    b.drop(b.kmax | b.enumerated, 0, f"XSAVE disabled ({b.disabled})")
    b.kmax = 0
    b.ksize = b.kdefsize = b.usize = b.udefsize = b.gsize = legacy_size
    b.init_xfd = 0


def print_xstate_features(b: _Boot) -> None:
    """print_xstate_features(): one line per asked-about feature present in max_features,
    named by cpu_has_xfeatures() (xfeature_names[min(nr, XFEATURE_MAX)])."""
    for i in print_order(b.kernel):
        if b.kmax >> i & 1:
            name = b.names[min(i, len(b.names) - 1)]
            b.log.append(f"x86/fpu: Supporting XSAVE feature 0x{1 << i:03x}: '{name}'")


def print_xstate_offset_size(b: _Boot) -> None:
    """print_xstate_offset_size(): xfeature_get_offset(max_features, i) (compacted offsets when
    XCOMPACTED) and xstate_sizes[i], right-aligned in 4 columns."""
    assert b.cache is not None
    for i in bits(b.kmax & ~XFEATURE_MASK_FPSSE):
        offset = xfeature_get_offset(b.cache, b.kmax, i)
        b.log.append(f"x86/fpu: xstate_offset[{i}]: {offset:4d}, "
                     f"xstate_sizes[{i}]: {b.cache.entry(i).size:4d}")


def _gate_features(b: _Boot) -> None:
    """Step 2 of the module docstring, each removal recorded with its reason."""
    gates = xsave_cpuid_features(b.kernel)
    for i, gate in enumerate(gates):
        if not b.kmax >> i & 1 or (gate is not None and b.caps.has(gate)):
            continue
        if gate is None and i == 15:
            why = ("independent feature: LBR state is saved by perf with XSAVES into its own "
                   "buffer, never in a task's fpstate")
        elif gate is None:
            why = (f"no CPUID gate in xsave_cpuid_features[]: {xfeature_enum(b.kernel, i)} "
                   "is not supported by this kernel")
        else:
            why = f"CPUID gate X86_FEATURE_{gate} absent ({why_absent(b.profile, b.caps, gate)})"
        b.drop(b.kmax, b.kmax & ~(1 << i), why)
        b.kmax &= ~(1 << i)
    if not b.caps.has("XFD"):
        before = b.kmax
        b.kmax &= ~b.masks.user_dynamic
        b.drop(before, b.kmax, "dynamic feature without X86_FEATURE_XFD "
               f"({why_absent(b.profile, b.caps, 'XFD')})")
    before = b.kmax
    if not b.caps.has("XSAVES") and b.kernel.has("xcompacted_xsavec"):
        b.kmax &= b.masks.user_supported
        b.drop(before & b.masks.supervisor_supported, b.kmax,
               "supervisor feature without X86_FEATURE_XSAVES "
               f"({why_absent(b.profile, b.caps, 'XSAVES')})")
    b.kmax &= b.masks.user_supported | b.masks.supervisor_supported
    b.drop(before & b.masks.supervisor_unsupported, b.kmax,
           "supervisor feature the kernel does not manage (XFEATURE_MASK_SUPERVISOR_UNSUPPORTED)")
    b.drop(before, b.kmax, "not in XFEATURE_MASK_USER_SUPPORTED | "
           "XFEATURE_MASK_SUPERVISOR_SUPPORTED of this kernel")


def _boot(b: _Boot) -> None:
    """fpu__init_system() from the FPU checks to the 'Enabled xstate features' line."""
    if not b.caps.has("FPU"):
        b.log.append(NO_FPU_LINE)
        b.disabled = "no_fpu"
        b.drop(b.enumerated, 0, "no FPU: a 64-bit kernel halts in fpu__init_system_early_generic()")
        return
    legacy_size, b.legacy_features = fpu__init_system_xstate_size_legacy(b.caps)
    b.ksize = b.kdefsize = b.usize = b.udefsize = b.gsize = legacy_size
    if not b.caps.has("XSAVE"):
        use = "FXSAVE" if b.caps.has("FXSR") else "FSAVE"
        b.log.append(f"x86/fpu: x87 FPU will use {use}")
        b.disabled = "no_xsave"
        why = why_absent(b.profile, b.caps, "XSAVE")
        b.drop(b.enumerated, 0, f"X86_FEATURE_XSAVE absent ({why})")
        return
    b.kmax = b.enumerated
    suffix = "" if b.kernel.has("xsave_disabled_line") else ", disabling XSAVE"
    if b.kmax & XFEATURE_MASK_FPSSE != XFEATURE_MASK_FPSSE:
        b.log.append(f"x86/fpu: FP/SSE not present amongst the CPU's xstate features: "
                     f"0x{b.kmax:x}.")
        b.disabled = "fp_sse_missing"
        return fpu__init_disable_system_xstate(b, legacy_size)
    if (b.kernel.has("apx") and b.kmax & XFEATURE_MASK_APX
            and b.kmax & (XFEATURE_MASK_BNDREGS | XFEATURE_MASK_BNDCSR)):
        b.log.append(f"x86/fpu: Both APX/MPX present in the CPU's xstate features: 0x{b.kmax:x}.")
        b.disabled = "apx_mpx"
        return fpu__init_disable_system_xstate(b, legacy_size)
    if b.kernel.has("independent_enumerated"):
        b.indep = b.kmax & b.masks.independent
    _gate_features(b)
    b.umax = b.kmax & b.masks.user_supported
    host_default = ~(b.masks.user_dynamic | b.masks.guest_supervisor)
    b.kdef, b.udef = b.kmax & host_default, b.umax & host_default
    b.guest = b.kmax & ~b.masks.user_dynamic
    xfeatures = b.kmax
    b.init_xfd = b.umax & b.masks.user_dynamic
    if b.kernel.has("xcompacted_xsavec"):
        b.compacted = b.caps.has("XSAVEC") or b.caps.has("XSAVES")
    else:
        b.compacted = b.caps.has("XSAVES")
    if not fpu__init_cpu_xstate(b):
        return
    b.cache = setup_xstate_cache(b.profile, b.kmax, b.compacted, b.kernel.has("apx"))
    if init_xstate_size(b):
        return fpu__init_disable_system_xstate(b, legacy_size)
    if b.kernel.has("init_fpstate_default"):
        b.init_size, b.init_xfeatures = b.kdefsize, b.kdef
        if b.init_size > FPREGS_STATE_SIZE:
            b.log.append(f"x86/fpu: init_fpstate buffer too small ({FPREGS_STATE_SIZE} < "
                         f"{b.init_size}){suffix}")
            b.disabled = "init_fpstate_too_small"
            return fpu__init_disable_system_xstate(b, legacy_size)
    print_xstate_features(b)
    init_features = b.init_xfeatures if b.kernel.has("init_fpstate_default") else b.kmax
    b.init_xcomp_bv = init_features | XCOMP_BV_COMPACTED_FORMAT if b.compacted else 0
    # The kernel re-checks that nothing in the setup modified max_features; nothing in this
    # model can, so the 'xfeatures modified ... during init' path is not modelled.
    assert xfeatures == b.kmax
    print_xstate_offset_size(b)
    fmt = "compacted" if b.compacted else "standard"
    b.log.append(f"x86/fpu: Enabled xstate features 0x{b.kmax:x}, context size is {b.ksize} "
                 f"bytes, using '{fmt}' format.")


def fpu__init_system_xstate(profile: CpuidProfile, kernel: str | KernelVersion = NEWEST) -> (
        BootResult):
    """Boot ``kernel`` (a version of ``fpstate.kernel.x86.versions``, default the newest) on the
    CPU ``profile``: fpu__init_system() with fpu__init_system_xstate() (xstate.c) and the
    init_fpstate update of fpu__init_init_fpstate() (v5.16-v6.0, init.c).

    A disable path is a result (``BootResult.disabled``), not an error; FpstateError only for
    an unknown kernel version."""
    kv = kernel_version(kernel)
    b = _Boot(profile, kv)
    _boot(b)
    if not kv.has("init_fpstate_default"):
        b.init_size, b.init_xfeatures = b.ksize, b.kmax
    guest = VcpuFpuConfig(b.gsize, b.guest) if kv.has("guest_only_cet_kernel") else None
    dropped = tuple(DroppedFeature(i, xfeature_enum(kv, i), b.dropped[i])
                    for i in sorted(b.dropped) if not b.kmax >> i & 1)
    return BootResult(
        kernel=kv.name,
        cpu=profile.name,
        enumerated=b.enumerated,
        disabled=b.disabled,
        compacted=b.compacted,
        fpu_kernel_cfg=FpuStateConfig(b.ksize, b.kdefsize, b.kmax, b.kdef, 0, b.indep),
        fpu_user_cfg=FpuStateConfig(b.usize, b.udefsize, b.umax, b.udef, b.legacy_features),
        guest_default_cfg=guest,
        init_fpstate=InitFpstate(b.init_size, b.init_xfeatures, b.init_xfd, b.init_xcomp_bv),
        xcr0=b.xcr0,
        ia32_xss=b.xss,
        ia32_xfd=b.xfd,
        user_size_reported=b.reported[0],
        kernel_size_reported=b.reported[1],
        xstate=b.cache,
        caps=b.caps,
        dropped=dropped,
        lines=tuple(line for line in b.log if line.startswith("x86/fpu: ")),
        log=tuple(b.log),
    )


# -- per CPU, at run time: resume from suspend -------------------------------------------------


def fpu__resume_cpu(c: Cpu) -> None:
    """fpu__resume_cpu() (xstate.c), from fix_processor_context() as the boot CPU resumes
    (fpstate.kernel.x86.power): XCR0 = fpu_user_cfg.max_features; with XSAVES, IA32_XSS =
    supervisor | independent features; with dynamic sizing, IA32_XFD = current's
    fpstate->xfd by wrmsrq() alone -- the per-CPU xfd_state keeps what it held before suspend
    (every kernel since 5.16 and variant ``xfd-state-stale-on-resume``; with proposed fix
    ``resume_xfd_set_state``, through xfd_set_state()).

    current is a kernel thread when the autosleep workqueue's worker suspended the machine
    (kernel/power/autosleep.c). Its fpstate->xfd is init_fpstate.xfd (fpu_clone()'s minimal
    path). Since 22aafe3bcb67 (6.15) x86_task_fpu() of a PF_KTHREAD task WARNs and returns
    NULL under CONFIG_X86_DEBUG_FPU, whose checks the model runs throughout, and the
    ->fpstate->xfd read dereferences it: `KernelBug` ``x86-task-fpu-kthread``. The proposed
    fix writes init_fpstate.xfd for a kernel thread without asking x86_task_fpu()."""
    from fpstate.kernel.x86.core import xfd_set_state

    s, regs = c.m.system, c.regs
    regs.xcr0 = s.xcr0
    if s.xsaves:
        regs.xss = s.xss
    if s.fpu_state_size_dynamic:
        cur = c.current
        unfixed = s.runs_unfixed("xfd-state-stale-on-resume", "resume_xfd_set_state")
        if cur.flags & PF_KTHREAD:
            if not unfixed:
                xfd_set_state(c, c.m.init_fpstate.xfd)
                return
            if s.kernel_has("x86_task_fpu_kthread_warn"):
                raise KernelBug("x86-task-fpu-kthread",
                                f"fpu__resume_cpu() on {cur.comm}: x86_task_fpu() of a "
                                "PF_KTHREAD task WARNs and returns NULL "
                                "(CONFIG_X86_DEBUG_FPU), then ->fpstate->xfd dereferences it")
        xfd = cur.fpu.fpstate.xfd
        if unfixed:
            regs.xfd = xfd
        else:
            xfd_set_state(c, xfd)


# -- core dumps: the NT_X86_XSAVE_LAYOUT note (CONFIG_COREDUMP, v6.12+) -------------------------

NT_X86_XSAVE_LAYOUT = 0x205
#: owner_name[] of xstate.c's core-dump hooks, with its NUL (n_namesz = sizeof = 6).
XSAVE_LAYOUT_OWNER = b"LINUX\0"
#: sizeof(struct elf_note): n_namesz, n_descsz, n_type.
ELF_NOTE_HEADER_SIZE = 12


@dataclass(frozen=True, slots=True)
class XfeatComponent:
    """struct x86_xfeat_component (arch/x86/include/uapi/asm/elf.h, packed): one record of
    the NT_X86_XSAVE_LAYOUT note -- the xfeature number, xstate_sizes[i], xstate_offsets[i]
    (the standard-format offset) and flags, reserved and written as 0."""

    type: int
    size: int
    offset: int
    flags: int = 0

    SIZE = 16  #: sizeof(struct x86_xfeat_component): four little-endian u32

    def pack(self) -> bytes:
        return b"".join(v.to_bytes(4, "little")
                        for v in (self.type, self.size, self.offset, self.flags))

    @classmethod
    def unpack_all(cls, desc: bytes) -> tuple[XfeatComponent, ...]:
        """The records of a note's descriptor (its length a multiple of 16)."""
        assert len(desc) % cls.SIZE == 0, f"descriptor of {len(desc)} bytes"
        return tuple(cls(*(int.from_bytes(desc[k + 4 * j:k + 4 * j + 4], "little")
                           for j in range(4)))
                     for k in range(0, len(desc), cls.SIZE))


@dataclass(frozen=True, slots=True)
class XsaveLayoutNote:
    """What the x86 hooks give elf_core_dump() (fs/binfmt_elf.c) for one boot.

    ``size`` is elf_coredump_extra_notes_size(), added to the PT_NOTE segment's size; ``data``
    the bytes elf_coredump_extra_notes_write() emits after the last thread's notes (note
    header, "LINUX" padded to 4, the records); ``aborts`` whether it returns nonzero, after
    which elf_core_dump() stops writing: the core keeps its headers and notes but no memory
    (has_dumped is already 1, so the dump counts as made)."""

    records: tuple[XfeatComponent, ...]
    size: int
    data: bytes
    aborts: bool


def dump_xsave_layout_desc(boot: BootResult) -> tuple[XfeatComponent, ...]:
    """dump_xsave_layout_desc(): one record per extended feature (bit 2 and up) of
    fpu_user_cfg.max_features, in bit order, from setup_xstate_cache()'s xstate_sizes[] and
    xstate_offsets[] (standard offsets, whatever format the kernel saves in). A user feature
    whose sub-leaf flags it supervisor has xstate_offsets[i] still at its initial -1."""
    umax = boot.fpu_user_cfg.max_features
    if not umax >> 2 or boot.xstate is None:
        return ()
    out = []
    for i in bits(umax & ~XFEATURE_MASK_FPSSE):
        e = boot.xstate.entry(i)
        out.append(XfeatComponent(i, e.size, 0xFFFFFFFF if e.offset is None else e.offset))
    return tuple(out)


def elf_coredump_extra_notes(boot: BootResult) -> XsaveLayoutNote:
    """elf_coredump_extra_notes_size() and elf_coredump_extra_notes_write() (xstate.c, v6.12+,
    ba386777a30b): nothing before v6.12 or when fpu_user_cfg.max_features is 0 (no XSAVE);
    else a note named "LINUX" of type NT_X86_XSAVE_LAYOUT holding dump_xsave_layout_desc().

    fpu__init_disable_system_xstate() clears fpu_kernel_cfg.max_features only, so a boot that
    gave XSAVE up after sizing (paranoid_size, init_fpstate_too_small) still describes its
    user features. v6.12-v6.18 take zero records for a failure: on a CPU whose XSAVE has only
    x87 and SSE (max_features 3) the write returns 1 after the note's header and name, and
    the core has no memory (c8161e5304ab, mainline v6.19 and stable backports, counts only
    negative results as failures; not modelled, as ``versions`` models no stable backport).

    FpstateError for a boot that died (XSETBV #GP): no process of it dumps core."""
    if boot.disabled == "xsetbv_gp":
        raise FpstateError(f"kernel {boot.kernel} does not boot on {boot.cpu} (XSETBV #GP): "
                           "no process dumps core")
    kv = kernel_version(boot.kernel)
    if not kv.has("xsave_layout_note") or not boot.fpu_user_cfg.max_features:
        return XsaveLayoutNote((), 0, b"", False)
    records = dump_xsave_layout_desc(boot)
    desc = b"".join(r.pack() for r in records)
    name = XSAVE_LAYOUT_OWNER + bytes(-len(XSAVE_LAYOUT_OWNER) % 4)
    header = (len(XSAVE_LAYOUT_OWNER).to_bytes(4, "little") + len(desc).to_bytes(4, "little")
              + NT_X86_XSAVE_LAYOUT.to_bytes(4, "little"))
    size = ELF_NOTE_HEADER_SIZE + len(name) + len(desc)
    return XsaveLayoutNote(records, size, header + name + desc, aborts=not records)
