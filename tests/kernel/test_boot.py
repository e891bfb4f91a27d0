"""Boot-time xstate sizing (fpu__init_system_xstate) on known CPUs and kernels.

Ground truth used here: this machine's own dmesg (snapshot of its CPUID in
tests/x86/data/epyc-zen5-kvm.cpuid-r.txt, lines copied from its boot log), and a Sapphire Rapids
boot log of the v5.16 AMX series (Chang S. Bae's test report on tglx's "x86/fpu: AMX" series,
LKML, October 2021), plus the kernel sources cited in fpstate.kernel.x86.versions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fpstate.cli import main
from fpstate.errors import FpstateError
from fpstate.kernel.x86.versions import (
    CHANGES,
    VERSION_NAMES,
    kernel_version,
    version_for_release,
)
from fpstate.kernel.x86.xstate import (
    XfeatComponent,
    XsaveLayoutNote,
    elf_coredump_extra_notes,
    fpu__init_system_xstate,
    xfeature_names,
    xsetbv_fault,
)
from fpstate.x86.cpuid import CpuidProfile
from fpstate.x86.profiles import bundled_profile, list_profiles, load_profile
from fpstate.x86.xfeatures import (
    XFEATURE_MASK_CET_KERNEL,
    XFEATURE_MASK_CET_USER,
    XFEATURE_MASK_PKRU,
    XFEATURE_MASK_XTILE_CFG,
    XFEATURE_MASK_XTILE_DATA,
)

HOST_SNAPSHOT = Path(__file__).resolve().parents[1] / "x86" / "data" / "epyc-zen5-kvm.cpuid-r.txt"

#: The x86/fpu lines of this machine's boot log (Linux 6.18, AMD EPYC Zen 5 as a KVM guest).
THIS_HOST_DMESG = (
    "x86/fpu: Supporting XSAVE feature 0x001: 'x87 floating point registers'",
    "x86/fpu: Supporting XSAVE feature 0x002: 'SSE registers'",
    "x86/fpu: Supporting XSAVE feature 0x004: 'AVX registers'",
    "x86/fpu: Supporting XSAVE feature 0x020: 'AVX-512 opmask'",
    "x86/fpu: Supporting XSAVE feature 0x040: 'AVX-512 Hi256'",
    "x86/fpu: Supporting XSAVE feature 0x080: 'AVX-512 ZMM_Hi256'",
    "x86/fpu: Supporting XSAVE feature 0x800: 'Control-flow User registers'",
    "x86/fpu: Supporting XSAVE feature 0x1000: 'Control-flow Kernel registers (KVM only)'",
    "x86/fpu: xstate_offset[2]:  576, xstate_sizes[2]:  256",
    "x86/fpu: xstate_offset[5]:  832, xstate_sizes[5]:   64",
    "x86/fpu: xstate_offset[6]:  896, xstate_sizes[6]:  512",
    "x86/fpu: xstate_offset[7]: 1408, xstate_sizes[7]: 1024",
    "x86/fpu: xstate_offset[11]: 2432, xstate_sizes[11]:   16",
    "x86/fpu: xstate_offset[12]: 2448, xstate_sizes[12]:   24",
    "x86/fpu: Enabled xstate features 0x18e7, context size is 2472 bytes, using 'compacted' "
    "format.",
)

#: Sapphire Rapids under a v5.16-era kernel (the AMX series test report, LKML Oct 2021).
SPR_516_DMESG = (
    "x86/fpu: Supporting XSAVE feature 0x001: 'x87 floating point registers'",
    "x86/fpu: Supporting XSAVE feature 0x002: 'SSE registers'",
    "x86/fpu: Supporting XSAVE feature 0x004: 'AVX registers'",
    "x86/fpu: Supporting XSAVE feature 0x020: 'AVX-512 opmask'",
    "x86/fpu: Supporting XSAVE feature 0x040: 'AVX-512 Hi256'",
    "x86/fpu: Supporting XSAVE feature 0x080: 'AVX-512 ZMM_Hi256'",
    "x86/fpu: Supporting XSAVE feature 0x200: 'Protection Keys User registers'",
    "x86/fpu: Supporting XSAVE feature 0x400: 'PASID state'",
    "x86/fpu: Supporting XSAVE feature 0x20000: 'AMX Tile config'",
    "x86/fpu: Supporting XSAVE feature 0x40000: 'AMX Tile data'",
    "x86/fpu: xstate_offset[2]:  576, xstate_sizes[2]:  256",
    "x86/fpu: xstate_offset[5]:  832, xstate_sizes[5]:   64",
    "x86/fpu: xstate_offset[6]:  896, xstate_sizes[6]:  512",
    "x86/fpu: xstate_offset[7]: 1408, xstate_sizes[7]: 1024",
    "x86/fpu: xstate_offset[9]: 2432, xstate_sizes[9]:    8",
    "x86/fpu: xstate_offset[10]: 2440, xstate_sizes[10]:    8",
    "x86/fpu: xstate_offset[17]: 2496, xstate_sizes[17]:   64",
    "x86/fpu: xstate_offset[18]: 2560, xstate_sizes[18]: 8192",
    "x86/fpu: Enabled xstate features 0x606e7, context size is 10752 bytes, using 'compacted' "
    "format.",
)


def patched(profile: CpuidProfile, changes: dict[tuple[int, int], tuple[int, int, int, int]],
            name: str) -> CpuidProfile:
    """``profile`` with some CPUID answers replaced."""
    leaves = dict(profile.leaves)
    leaves.update(changes)
    return CpuidProfile(name=name, vendor=profile.vendor, leaves=leaves, source="test")


def with_bit(profile: CpuidProfile, leaf: int, sub: int, reg: int, bit: int, value: bool,
             name: str) -> CpuidProfile:
    regs = list(profile.cpuid(leaf, sub))
    regs[reg] = regs[reg] | (1 << bit) if value else regs[reg] & ~(1 << bit)
    return patched(profile, {(leaf, sub): tuple(regs)}, name)  # type: ignore[dict-item]


# -- this machine and Sapphire Rapids ---------------------------------------------------------


def test_this_host_snapshot_predicts_its_dmesg() -> None:
    r = fpu__init_system_xstate(load_profile(str(HOST_SNAPSHOT)), "6.18")
    assert r.lines == THIS_HOST_DMESG
    assert r.log == THIS_HOST_DMESG  # no WARN, no CPUID dump
    k, u = r.fpu_kernel_cfg, r.fpu_user_cfg
    assert (k.max_features, k.max_size) == (0x18E7, 2472)
    # CET_KERNEL is guest-only: 24 bytes less for every host task
    assert (k.default_features, k.default_size) == (0x8E7, 2448)
    assert (u.max_features, u.max_size, u.default_size, u.legacy_features) == (0xE7, 2432, 2432, 3)
    assert r.guest_default_cfg is not None
    assert (r.guest_default_cfg.features, r.guest_default_cfg.size) == (0x18E7, 2472)
    assert (r.xcr0, r.ia32_xss, r.ia32_xfd) == (0xE7, 0x1800, None)
    assert (r.user_size_reported, r.kernel_size_reported) == (0x980, 0x9A8)  # sub-leaf 0/1 EBX
    assert (r.init_fpstate.size, r.init_fpstate.xfeatures, r.init_fpstate.xfd) == (2448, 0x8E7, 0)
    assert r.init_fpstate.xcomp_bv == (1 << 63) | 0x8E7
    assert r.dropped == ()


def test_sapphire_rapids_amx_is_dynamic_and_cet_kernel_guest_only() -> None:
    r = fpu__init_system_xstate(bundled_profile("sapphire-rapids"), "6.18")
    k, u, g = r.fpu_kernel_cfg, r.fpu_user_cfg, r.guest_default_cfg
    assert (u.max_features, u.max_size) == (0x602E7, 11008)  # standard: 2816 + 8192
    assert (k.max_features, k.max_size) == (0x61EE7, 10752)  # compacted, with XFD-armed tiles
    assert k.max_features & XFEATURE_MASK_XTILE_DATA and r.caps.has("XFD")
    assert not k.default_features & (XFEATURE_MASK_XTILE_DATA | XFEATURE_MASK_CET_KERNEL)
    assert k.default_features & XFEATURE_MASK_XTILE_CFG
    assert (k.default_size, u.default_size) == (2560, 2816)
    assert g is not None and g.features == 0x21EE7 and g.size == 2560  # padding absorbs CET_S
    assert r.init_fpstate.xfd == r.ia32_xfd == XFEATURE_MASK_XTILE_DATA
    assert (r.xcr0, r.ia32_xss) == (0x602E7, 0x9C00)  # PASID|CET_U|CET_S + independent LBR
    assert k.independent_features == 0x8000
    assert "SUPERVISOR_UNSUPPORTED" in (r.dropped_reason(8) or "")  # Processor Trace
    assert "independent" in (r.dropped_reason(15) or "")  # LBR
    assert "no CPUID gate" in (r.dropped_reason(14) or "")


def test_sapphire_rapids_on_516_matches_the_amx_series_boot_log() -> None:
    r = fpu__init_system_xstate(bundled_profile("sapphire-rapids"), "5.16")
    assert r.lines == SPR_516_DMESG
    # v5.16 sized init_fpstate for every feature; v6.1 for the defaults only
    assert r.init_fpstate.size == 10752
    assert fpu__init_system_xstate(bundled_profile("sapphire-rapids"), "6.1").init_fpstate.size \
        == 2560


# -- the corpus README's traps and the version differences -------------------------------------


def test_zen2_enables_0x7_not_0x207() -> None:
    zen2 = bundled_profile("zen2")
    assert zen2.xcr0_supported == 0x207 and not zen2.has("PKU")
    r = fpu__init_system_xstate(zen2, "6.18")
    assert r.fpu_kernel_cfg.max_features == 0x7
    assert r.lines[-1] == ("x86/fpu: Enabled xstate features 0x7, context size is 832 bytes, "
                           "using 'compacted' format.")
    assert "X86_FEATURE_OSPKE" in (r.dropped_reason(9) or "")
    assert "ECX[3]=0" in (r.dropped_reason(9) or "")
    # erratum 1386 (v6.3+) takes XSAVES away; XSAVEC keeps the compacted format (v5.19+)
    assert dict(r.caps.cleared).keys() == {"XSAVES"} and r.ia32_xss is None and r.compacted
    old = fpu__init_system_xstate(zen2, "6.1")
    assert old.caps.cleared == () and old.ia32_xss == 0
    assert "X86_FEATURE_PKU" in (fpu__init_system_xstate(zen2, "5.16").dropped_reason(9) or "")


def test_a_cpu_without_xsaves_drops_cet() -> None:
    zen4 = bundled_profile("zen4")
    assert zen4.xss_supported == 0x1800 and zen4.has("SHSTK")
    no_xsaves = with_bit(zen4, 0xD, 1, 0, 3, False, "zen4-noxsaves")
    r = fpu__init_system_xstate(no_xsaves, "6.18")
    for nr in (11, 12):
        assert "without X86_FEATURE_XSAVES" in (r.dropped_reason(nr) or "")
    assert (r.fpu_kernel_cfg.max_features, r.fpu_kernel_cfg.max_size) == (0x2E7, 2440)
    assert r.compacted and r.ia32_xss is None  # XSAVEC still compacts, nobody writes IA32_XSS
    # v5.16 compacted only with XSAVES, and had no CET gate at all
    old = fpu__init_system_xstate(no_xsaves, "5.16")
    assert not old.compacted and old.lines[-1].endswith("using 'standard' format.")
    assert "no CPUID gate" in (old.dropped_reason(11) or "")


def test_cet_kernel_612_unused_vs_618_guest_only() -> None:
    zen4 = bundled_profile("zen4")
    r612 = fpu__init_system_xstate(zen4, "6.12")
    r618 = fpu__init_system_xstate(zen4, "6.18")
    assert xfeature_names(kernel_version("6.12"))[12] == "Control-flow Kernel registers (unused)"
    assert r612.dropped[0].enum == "XFEATURE_CET_KERNEL_UNUSED"
    assert "no CPUID gate" in r612.dropped[0].reason
    assert r612.guest_default_cfg is None
    assert (r612.fpu_kernel_cfg.max_features, r612.fpu_kernel_cfg.max_size) == (0xAE7, 2456)
    assert r612.ia32_xss == XFEATURE_MASK_CET_USER
    assert (r618.fpu_kernel_cfg.max_features, r618.fpu_kernel_cfg.max_size) == (0x1AE7, 2480)
    assert r618.fpu_kernel_cfg.default_size == 2456 == r618.init_fpstate.size
    assert r618.guest_default_cfg is not None and r618.guest_default_cfg.size == 2480
    assert r618.ia32_xss == XFEATURE_MASK_CET_USER | XFEATURE_MASK_CET_KERNEL
    assert ("x86/fpu: Supporting XSAVE feature 0x1000: 'Control-flow Kernel registers "
            "(KVM only)'") in r618.lines
    assert not any("0x1000" in line for line in r612.lines)
    # before v6.6 CET_USER had no gate either, and PKRU was gated on PKU
    r61 = fpu__init_system_xstate(zen4, "6.1")
    assert r61.fpu_kernel_cfg.max_features == 0x2E7 and r61.ia32_xss == 0
    assert r61.dropped_reason(11) is not None and r61.dropped[0].enum == "XFEATURE_RSRVD_COMP_11"


# -- the disable paths -------------------------------------------------------------------------


def test_no_xsave_uses_fxsave_and_512_bytes() -> None:
    p = with_bit(bundled_profile("haswell"), 0x1, 0, 2, 26, False, "haswell-noxsave")
    r = fpu__init_system_xstate(p, "6.18")
    assert r.lines == ("x86/fpu: x87 FPU will use FXSAVE",) and r.disabled == "no_xsave"
    assert (r.fpu_kernel_cfg.max_size, r.fpu_user_cfg.max_size) == (512, 512)
    assert r.fpu_user_cfg.legacy_features == 3 and r.xcr0 is None
    assert all("X86_FEATURE_XSAVE absent" in d.reason for d in r.dropped)
    assert {d.number for d in r.dropped} == {0, 1, 2}


@pytest.mark.parametrize(("kernel", "tail"), [
    ("6.12", ()),
    ("6.18", ("x86/fpu: XSAVE disabled",)),
])
def test_fp_sse_missing(kernel: str, tail: tuple[str, ...]) -> None:
    haswell = bundled_profile("haswell")
    _, b, c, d = haswell.cpuid(0xD, 0)
    p = patched(haswell, {(0xD, 0): (0x5, b, c, d)}, "haswell-nosse")
    r = fpu__init_system_xstate(p, kernel)
    assert r.lines == ("x86/fpu: FP/SSE not present amongst the CPU's xstate features: 0x5.",
                       *tail)
    assert r.disabled == "fp_sse_missing" and r.fpu_kernel_cfg.max_size == 512
    assert r.xcr0 is None


def _apx_and_mpx() -> CpuidProfile:
    sky = bundled_profile("skylake-sp")
    a, b, c, d = sky.cpuid(0xD, 0)
    p = patched(sky, {(0xD, 0): (a | 1 << 19, b, c, d), (0xD, 19): (128, 960, 0, 0)}, "apx+mpx")
    return with_bit(p, 0x7, 1, 3, 21, True, "apx+mpx")


def test_apx_and_mpx_both_enumerated() -> None:
    r = fpu__init_system_xstate(_apx_and_mpx(), "6.18")
    # the raw enumeration, before any gate: XCR0 bits | IA32_XSS bits (Processor Trace, 0x100)
    assert r.lines == ("x86/fpu: Both APX/MPX present in the CPU's xstate features: 0x803ff.",
                       "x86/fpu: XSAVE disabled")
    assert r.disabled == "apx_mpx" and r.fpu_kernel_cfg.max_features == 0
    # before v6.16 the kernel did not know APX: it is dropped and MPX kept
    old = fpu__init_system_xstate(_apx_and_mpx(), "6.12")
    assert old.xsave_enabled and old.fpu_kernel_cfg.max_features == 0x2FF
    assert "USER_SUPPORTED" in (old.dropped_reason(19) or "")


def test_paranoid_size_mismatch_on_a_zeroed_subleaf() -> None:
    p = patched(bundled_profile("haswell"), {(0xD, 2): (0, 0, 0, 0)}, "haswell-masked-avx")
    r = fpu__init_system_xstate(p, "6.18")
    assert r.disabled == "paranoid_size" and r.lines == ("x86/fpu: XSAVE disabled",)
    assert "[AVX registers]: struct is 256 bytes, cpu state 0 bytes" in r.log
    assert "XSAVE consistency problem: size 0 != kernel_size 576" in r.log
    assert sum(line.startswith("CPUID[0d, ") for line in r.log) == 30  # XFEATURE_MAX + 10
    assert r.fpu_user_cfg.max_features == 0x7  # the kernel does not undo the user mask
    old = fpu__init_system_xstate(p, "5.16")
    assert old.lines == () and old.disabled == "paranoid_size"
    assert "XFEATURE_YMM: struct is 256 bytes, cpu state 0 bytes" in old.log
    assert "XSAVE consistency problem, dumping leaves" in old.log
    assert sum(line.startswith("CPUID[0d, ") for line in old.log) == 29


def _huge_hi16_zmm() -> CpuidProfile:
    icx = bundled_profile("icelake-sp")
    _, b, c, d = icx.cpuid(0xD, 7)
    return patched(icx, {(0xD, 7): (4000, b, c, d)}, "icx-huge-hi16")


@pytest.mark.parametrize(("kernel", "lines", "why"), [
    ("5.16", ("x86/fpu: xstate buffer too small (4096 < 5416), disabling xsave",),
     "xstate_buffer_too_small"),
    ("6.12", ("x86/fpu: init_fpstate buffer too small (4096 < 5416), disabling XSAVE",),
     "init_fpstate_too_small"),
    ("6.18", ("x86/fpu: init_fpstate buffer too small (4096 < 5416)", "x86/fpu: XSAVE disabled"),
     "init_fpstate_too_small"),
])
def test_init_fpstate_larger_than_a_page(kernel: str, lines: tuple[str, ...], why: str) -> None:
    r = fpu__init_system_xstate(_huge_hi16_zmm(), kernel)
    assert r.lines == lines and r.disabled == why
    if kernel == "5.16":  # checked in init_xstate_size(), before the struct-size checks
        assert r.log == lines and r.init_fpstate.size == 512  # fpu__init_init_fpstate()
    else:  # after them: the size mismatch only WARNs; init_fpstate keeps the size it refused
        assert "[AVX-512 ZMM_Hi256]: struct is 1024 bytes, cpu state 4000 bytes" in r.log
        assert r.init_fpstate.size == 5416
    assert r.fpu_kernel_cfg.max_size == 512 and r.init_fpstate.xfd == 0


def test_tiles_without_xfd_make_an_xcr0_that_faults() -> None:
    p = with_bit(bundled_profile("sapphire-rapids"), 0xD, 1, 0, 4, False, "spr-noxfd")
    r = fpu__init_system_xstate(p, "6.18")
    assert "without X86_FEATURE_XFD" in (r.dropped_reason(18) or "")
    assert r.disabled == "xsetbv_gp" and r.xcr0 is None and r.lines == ()
    assert xsetbv_fault(0x202E7) == "XCR0[18:17] (AMX) neither both set nor both clear"
    assert xsetbv_fault(0x602E7) is None and xsetbv_fault(0x6) is not None


# -- invariants on every bundled CPU and version -----------------------------------------------


@pytest.mark.parametrize("name", list_profiles())
def test_bundled_invariants(name: str) -> None:
    p = bundled_profile(name)
    for v in VERSION_NAMES:
        r = fpu__init_system_xstate(p, v)
        k, u = r.fpu_kernel_cfg, r.fpu_user_cfg
        assert r.xsave_enabled, (name, v, r.log)
        assert k.max_features & ~r.enumerated == 0
        assert {d.number for d in r.dropped} | set(_bits(k.max_features)) >= set(
            _bits(r.enumerated))
        assert r.xcr0 == u.max_features and u.default_features <= u.max_features
        assert k.default_features & ~k.max_features == 0 and not k.default_features & (1 << 18)
        assert (u.max_features & XFEATURE_MASK_PKRU != 0) == p.has("PKU")
        assert r.lines[-1] == (f"x86/fpu: Enabled xstate features 0x{k.max_features:x}, "
                               f"context size is {k.max_size} bytes, using "
                               f"'{'compacted' if r.compacted else 'standard'}' format.")


def _bits(mask: int) -> list[int]:
    return [i for i in range(64) if mask >> i & 1]


# -- versions and the command line -------------------------------------------------------------


def test_kernel_versions() -> None:
    assert kernel_version("6.12.8-arch1").name == "6.12"
    assert kernel_version("v6.18").name == "6.18"
    assert version_for_release("6.14.2-300.fc42.x86_64").name == "6.13"
    assert version_for_release("6.18.44-fc-v657").name == "6.18"
    with pytest.raises(FpstateError, match=r"unknown kernel version '6\.14'; known: 5\.16, "):
        kernel_version("6.14")
    with pytest.raises(FpstateError, match="older than the oldest"):
        version_for_release("5.10.0")


def test_every_change_is_dated_by_a_listed_version() -> None:
    """The rule of versions.py: a version is listed wherever behaviour changes, so a release
    between two listed ones behaves as the earlier one."""
    assert {c.since for c in CHANGES} <= set(VERSION_NAMES)
    assert version_for_release("5.18.19").has("hardirq_fpu_checks_bh")
    assert not version_for_release("5.17.15").has("hardirq_fpu_checks_bh")


def test_cli_boot_log_prints_lines_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["boot-log", "--cpu", "sapphire-rapids", "--kernel", "5.16"]) == 0
    assert tuple(capsys.readouterr().out.splitlines()) == SPR_516_DMESG
    assert main(["boot-log", "--cpu", "sapphire-rapids", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["fpu_kernel_cfg"]["max_features"] == 0x61EE7 and doc["kernel"] == "6.18"
    assert doc["guest_default_cfg"] == {"size": 2560, "features": 0x21EE7}
    assert {d["number"] for d in doc["dropped"]} == {8, 14, 15}


@pytest.mark.parametrize("argv", [
    ["boot-log", "--cpu", "zen2", "--kernel", "6.14"],
    ["boot-log", "--cpu", "no-such-cpu"],
    ["boot-log", "--cpu", "zen2", "--compare"],
])
def test_cli_boot_log_bad_input_is_one_line_exit_2(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fpstate: error: ") and err.count("\n") == 1


# -- core dumps: NT_X86_XSAVE_LAYOUT -------------------------------------------------------------


@pytest.mark.parametrize(("cpu", "records"), [
    # Intel: AVX at 576, opmask/ZMM after MPX's reserved 960-1087, PKRU then AMX
    ("sapphire-rapids", ((2, 256, 576), (5, 64, 1088), (6, 512, 1152), (7, 1024, 1664),
                         (9, 8, 2688), (17, 64, 2752), (18, 8192, 2816))),
    # AMD never left room for MPX: AVX-512 right after AVX, PKRU after it
    ("zen4", ((2, 256, 576), (5, 64, 832), (6, 512, 896), (7, 1024, 1408), (9, 8, 2432))),
    ("haswell", ((2, 256, 576),)),
])
def test_core_layout_note_lists_the_standard_offsets(cpu: str, records: tuple) -> None:
    """dump_xsave_layout_desc(): one 16-byte record per extended user feature, in bit order,
    with the standard offsets -- whatever format the kernel saves in (SPR and Zen 4 use
    XSAVES) -- and AMX's TILEDATA listed though it is dynamic (max_features, not default)."""
    r = fpu__init_system_xstate(bundled_profile(cpu), "6.18")
    note = elf_coredump_extra_notes(r)
    assert tuple((c.type, c.size, c.offset) for c in note.records) == records
    assert all(c.flags == 0 for c in note.records) and not note.aborts
    n = len(records)
    assert note.size == len(note.data) == 12 + 8 + 16 * n
    assert note.data[:20] == (6).to_bytes(4, "little") + (16 * n).to_bytes(4, "little") \
        + (0x205).to_bytes(4, "little") + b"LINUX\0\0\0"
    assert XfeatComponent.unpack_all(note.data[20:]) == note.records


def test_core_layout_note_arrived_in_6_12() -> None:
    p = bundled_profile("zen4")
    assert elf_coredump_extra_notes(fpu__init_system_xstate(p, "6.11")) == \
        XsaveLayoutNote((), 0, b"", False)
    assert elf_coredump_extra_notes(fpu__init_system_xstate(p, "6.12")).size == 12 + 8 + 80


def test_core_layout_note_without_xsave_and_with_x87_sse_only() -> None:
    """No XSAVE: fpu_user_cfg.max_features is 0, no note. XSAVE with only x87 and SSE (Intel
    Atom x6425RE in c8161e5304ab's message): a note with no record, and 6.12-6.18 take the
    zero count for a failed write -- the dump stops after the note's name, without memory."""
    haswell = bundled_profile("haswell")
    none = fpu__init_system_xstate(with_bit(haswell, 0x1, 0, 2, 26, False, "noxsave"), "6.18")
    assert elf_coredump_extra_notes(none) == XsaveLayoutNote((), 0, b"", False)
    _, _, _, d = haswell.cpuid(0xD, 0)
    legacy = patched(haswell, {(0xD, 0): (0x3, 576, 576, d), (0xD, 2): (0, 0, 0, 0)},
                     "xsave-x87-sse-only")
    r = fpu__init_system_xstate(legacy, "6.18")
    assert r.xsave_enabled and r.fpu_user_cfg.max_features == 0x3
    note = elf_coredump_extra_notes(r)
    assert note.records == () and note.aborts and note.size == len(note.data) == 20


def test_core_layout_note_after_a_disable_and_a_dead_boot() -> None:
    """fpu__init_disable_system_xstate() leaves fpu_user_cfg.max_features alone: a boot that
    gave XSAVE up on a zeroed AVX sub-leaf still describes AVX -- as the CPU read it, size 0
    at offset 0. A boot whose XSETBV faults dumps nothing."""
    p = patched(bundled_profile("haswell"), {(0xD, 2): (0, 0, 0, 0)}, "haswell-masked-avx")
    r = fpu__init_system_xstate(p, "6.18")
    assert r.disabled == "paranoid_size"
    assert elf_coredump_extra_notes(r).records == (XfeatComponent(2, 0, 0),)
    no_xfd = with_bit(bundled_profile("sapphire-rapids"), 0xD, 1, 0, 4, False, "spr-noxfd")
    dead = fpu__init_system_xstate(no_xfd, "6.18")
    assert dead.disabled == "xsetbv_gp"
    with pytest.raises(FpstateError, match="XSETBV #GP"):
        elf_coredump_extra_notes(dead)
