"""The layout model against 339 real CPUs (cpuid-corpus.json, a gzipped copy in tests/x86/data).

For every dump marked ``dump_consistent``, the standard size of the full supported XCR0
(CPUID.(EAX=0DH,ECX=0):EDX:EAX) must equal what the CPU itself reports as the size for all
supported user components, sub-leaf 0 ECX. No consistent dump is excluded. What is *not* checked
here, and why (the corpus README's traps):

- sub-leaf 0 EBX and sub-leaf 1 EBX are sizes for what Windows had enabled in XCR0/IA32_XSS
  when the dump was taken, which the dump does not record; they are checked on this host
  instead (tests/host/test_host_cpuid.py), where XCR0 and IA32_XSS are known;
- dumps with ``dump_consistent: false`` lack sub-leaves or read them as zero; the model must
  refuse those (ProfileError), which is checked below.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from fpstate.errors import ProfileError
from fpstate.x86.layout import compacted_offset, compacted_size, standard_offset, standard_size
from fpstate.x86.profiles import BUNDLED, bundled_profile
from fpstate.x86.profiles.dumps import parse_corpus_object
from fpstate.x86.xfeatures import bits

CORPUS = json.loads(gzip.decompress(
    (Path(__file__).resolve().parent / "data" / "cpuid-corpus.json.gz").read_bytes()))
CONSISTENT = [e for e in CORPUS if e.get("dump_consistent")]


def _id(entry: dict) -> str:
    return entry["source"].rsplit("/", 1)[-1].removesuffix("_CPUID.txt").removesuffix(".txt")


def _by_file(suffix: str) -> dict:
    (hit,) = [e for e in CORPUS if e["source"].endswith(suffix)]
    return hit


def test_corpus_has_the_documented_population() -> None:
    assert len(CORPUS) == 339 and len(CONSISTENT) == 260


@pytest.mark.parametrize("entry", CONSISTENT, ids=_id)
def test_standard_size_of_supported_xcr0_is_subleaf0_ecx(entry: dict) -> None:
    p = parse_corpus_object(entry)
    xcr0 = p.xcr0_supported
    assert standard_size(p, xcr0) == p.cpuid(0xD, 0)[2], (
        f"{p.name}: standard_size({xcr0:#x}) != CPUID.(0xD,0).ECX"
    )
    # the compacted form of everything the CPU enumerates fits in no more than the sum of
    # sizes plus one 64-byte pad per aligned component
    every = p.xfeatures_supported
    comps = [p.component(i) for i in bits(every)]
    slack = sum(c.size for c in comps if c.number > 1) + 64 * sum(c.aligned for c in comps)
    assert 576 <= compacted_size(p, every) <= 576 + slack


def test_zen2_enumerates_pkru_without_pku() -> None:
    # README trap: Zen 2 reports PKRU in sub-leaf 0 EAX (0x207) while CPUID.7.ECX.PKU is 0
    p = parse_corpus_object(_by_file("AuthenticAMD0830F10_K17_Rome_CPUID.txt"))
    assert p.xcr0_supported == 0x207 and not p.has("PKU")


def test_amd_offsets_and_pkru_at_0x980_without_avx512() -> None:
    genoa = parse_corpus_object(_by_file("AuthenticAMD0A10F11_K19_Genoa_01_CPUID.txt"))
    assert [standard_offset(genoa, i) for i in (5, 6, 7, 9)] == [0x340, 0x380, 0x580, 0x980]
    milan = parse_corpus_object(_by_file("AuthenticAMD0A00F11_K19_Milan_02_CPUID.txt"))
    assert not milan.has("AVX512F") and standard_offset(milan, 9) == 0x980


def test_intel_keeps_the_mpx_hole_without_mpx() -> None:
    icx = parse_corpus_object(_by_file("GenuineIntel00606A6_ICX_CPUID3.txt"))
    assert not icx.has("MPX") and not icx.xcr0_supported & 0x18
    assert (standard_offset(icx, 5), standard_offset(icx, 9)) == (0x440, 0xA80)
    # compacted, the hole disappears: opmask follows AVX directly
    assert compacted_offset(icx, 0x2E7, 5) == 832


def test_only_amx_is_aligned_in_the_corpus() -> None:
    aligned = set()
    for entry in CONSISTENT:
        p = parse_corpus_object(entry)
        aligned |= {c.number for c in p.components() if c.aligned}
    assert aligned == {17, 18}


def test_bulldozer_lwp_is_component_62() -> None:
    p = parse_corpus_object(_by_file("AuthenticAMD0600F20_K15_AbuDhabi_CPUID0.txt"))
    lwp = p.component(62)
    assert (lwp.size, lwp.offset, lwp.supervisor) == (128, 832, False)
    assert standard_size(p, p.xcr0_supported) == 960


def test_sapphire_rapids_windows_xss_includes_pt() -> None:
    # README: sub-leaf 1 EBX 0x2A80 = Linux's 10752 for 0x602e7 + 128 bytes of PT (Windows)
    p = parse_corpus_object(_by_file("GenuineIntel00806F8_SapphireRapids_05_CPUID.txt"))
    assert compacted_size(p, 0x602E7) == 10752
    assert compacted_size(p, 0x602E7 | 0x100) == p.cpuid(0xD, 1)[1] == 0x2A80


def _missing(entry: dict) -> list[int]:
    """Sub-leaves the curator found zero or absent although their bit is enumerated."""
    return [int(i.split()[1]) for i in entry.get("dump_issues", [])
            if "reads all-zero though its bit is set" in i or "absent from dump" in i]


@pytest.mark.parametrize("entry", [e for e in CORPUS if _missing(e)], ids=_id)
def test_masked_or_missing_subleaves_are_refused(entry: dict) -> None:
    p = parse_corpus_object(entry)
    for i in _missing(entry):
        with pytest.raises(ProfileError, match=f"component {i} is in the supported mask"):
            p.component(i)


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_profiles_are_the_corpus_dumps(name: str) -> None:
    bundled = bundled_profile(name)
    entry = parse_corpus_object(_by_file(BUNDLED[name]))
    assert bundled.leaves == entry.leaves and bundled.vendor == entry.vendor
    assert BUNDLED[name] in bundled.source
    assert standard_size(bundled, bundled.xcr0_supported) == bundled.cpuid(0xD, 0)[2]
