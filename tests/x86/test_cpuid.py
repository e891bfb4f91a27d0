"""CpuidProfile: CPUID answers, feature flags, leaf 0xD enumeration, JSON round trip."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fpstate.errors import MaskError, ProfileError
from fpstate.x86.cpuid import FLAGS, Component, CpuidProfile, vendor_of
from fpstate.x86.layout import layout_table
from fpstate.x86.profiles import list_profiles, load_profile
from fpstate.x86.profiles.dumps import parse_dump

# Real registers: Sapphire Rapids w7-2475X (InstLatx64 GenuineIntel00806F8_SapphireRapids_05).
SPR_LEAVES = {
    (0x0, 0): (0x20, 0x756E6547, 0x6C65746E, 0x49656E69),
    (0x1, 0): (0x000806F8, 0x00800800, 0x7FFEFBFF, 0xBFEBFBFF),
    (0x7, 0): (0x2, 0xF3BFBFFB, 0xBB417FEE, 0xFFDD4430),
    (0x7, 1): (0x1C30, 0, 0, 0),
    (0x7, 2): (0, 0, 0, 0x17),
    (0xD, 0): (0x602E7, 0x2B00, 0x2B00, 0),
    (0xD, 1): (0x1F, 0x2A80, 0xDD00, 0),
    (0xD, 2): (0x100, 0x240, 0, 0),
    (0xD, 11): (0x10, 0, 1, 0),
    (0xD, 17): (0x40, 0xAC0, 2, 0),
    (0xD, 18): (0x2000, 0xB00, 6, 0),
    (0x80000000, 0): (0x80000008, 0, 0, 0),
    (0x80000001, 0): (0, 0, 0x121, 0x2C100800),
}
SPR = CpuidProfile.from_leaves("spr", SPR_LEAVES, "InstLatx64 SapphireRapids_05")


def test_vendor_is_read_from_leaf_0() -> None:
    assert SPR.vendor == "intel"
    amd = {(0, 0): (0x10, 0x68747541, 0x444D4163, 0x69746E65)}
    assert vendor_of(amd) == "amd"
    assert vendor_of({}) == "unknown"


def test_cpuid_ignores_ecx_for_leaves_without_subleaves() -> None:
    assert SPR.cpuid(1, 5) == SPR.cpuid(1) == SPR_LEAVES[(1, 0)]
    assert SPR.cpuid(0x80000001, 3) == SPR_LEAVES[(0x80000001, 0)]
    assert SPR.cpuid(7, 1) == (0x1C30, 0, 0, 0)
    assert SPR.cpuid(0xD, 3) == (0, 0, 0, 0)  # MPX is absent: the sub-leaf reads zero
    assert SPR.cpuid(0x4000_0000) == (0, 0, 0, 0)


def test_flags_of_sapphire_rapids() -> None:
    on = {"FPU", "FXSR", "XMM", "XSAVE", "OSXSAVE", "AVX", "AVX512F", "PKU", "SHSTK", "IBT",
          "ENQCMD", "AMX_TILE", "INTEL_PT", "XSAVEOPT", "XSAVEC", "XGETBV1", "XSAVES", "XFD"}
    # OSPKE mirrors CR4.PKE, which Windows (the OS of the dump) leaves clear: leaf 7 ECX[4]=0.
    off = {"MPX", "APX", "OSPKE"}
    assert {f for f in on | off if SPR.has(f)} == on
    assert SPR.has("amx_tile")


def test_apx_is_leaf_7_subleaf_1_edx_bit_21() -> None:
    leaves = dict(SPR_LEAVES)
    leaves[(7, 1)] = (0x1C30, 0, 0, 1 << 21)
    assert CpuidProfile.from_leaves("apx", leaves, "test").has("APX")
    assert str(FLAGS["APX"]) == "CPUID.(EAX=0x7,ECX=0x1):EDX[21]"


def test_unknown_flag_is_a_profile_error() -> None:
    with pytest.raises(ProfileError, match="unknown CPUID flag 'AVX1024'"):
        SPR.has("AVX1024")


def test_supported_masks() -> None:
    assert SPR.xcr0_supported == 0x602E7
    assert SPR.xss_supported == 0xDD00


def test_components_from_leaf_0xd() -> None:
    assert SPR.component(0) == Component(0, 160, 0, False, False, False)
    assert SPR.component(1) == Component(1, 256, 160, False, False, False)
    assert SPR.component(2) == Component(2, 256, 576, False, False, False)
    assert SPR.component(11) == Component(11, 16, 0, True, False, False)
    assert SPR.component(17) == Component(17, 64, 0xAC0, False, True, False)
    assert SPR.component(18) == Component(18, 8192, 0xB00, False, True, True)
    assert SPR.component(18).name == "xtiledata"


def test_unenumerated_component_is_a_mask_error() -> None:
    with pytest.raises(MaskError, match=r"component 3 \(bndregs\) is not enumerated by spr"):
        SPR.component(3)
    with pytest.raises(MaskError, match=r"0\.\.63"):
        SPR.component(64)


def test_enumerated_component_with_empty_subleaf_is_a_profile_error() -> None:
    # bit 5 is in the supported mask, but sub-leaf 5 is missing (a masked or truncated dump)
    with pytest.raises(ProfileError, match=r"component 5 .* reports size 0"):
        SPR.component(5)


def test_json_round_trip_and_hash() -> None:
    again = CpuidProfile.from_json(SPR.to_json())
    assert again == SPR and hash(again) == hash(SPR)
    assert again.leaves[(0xD, 18)] == (0x2000, 0xB00, 6, 0)
    with pytest.raises(TypeError):
        again.leaves[(0, 0)] = (0, 0, 0, 0)  # type: ignore[index]


@pytest.mark.parametrize("text, message", [
    ("{", "does not parse"),
    ("[]", "not an object"),
    ('{"format": "x"}', "field 'format'"),
    ('{"format": "fpstate-cpuid-profile/1", "name": "a", "vendor": "intel", "source": ""}',
     "field 'leaves' is missing"),
    ('{"format": "fpstate-cpuid-profile/1", "name": "a", "vendor": "intel", "source": "",'
     ' "leaves": {"0x0": {"0x0": ["0x1", "0x2", "0x3"]}}}', "not a list of 4"),
    ('{"format": "fpstate-cpuid-profile/1", "name": "a", "vendor": "intel", "source": "",'
     ' "leaves": {"0x0": {"0x0": ["0x1", "0x2", "0x3", "zz"]}}}', "'zz' is not a hex"),
    ('{"format": "fpstate-cpuid-profile/1", "name": "a", "vendor": "intel", "source": "",'
     ' "leaves": {"0x0": {"0x0": ["0x1", "0x2", "0x3", "0x100000000"]}}}', "32-bit"),
    ('{"format": "fpstate-cpuid-profile/1", "name": "a", "vendor": "via", "source": "",'
     ' "leaves": {}}', "vendor 'via'"),
])
def test_bad_json_is_a_profile_error(text: str, message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        CpuidProfile.from_json(text)


def test_brand_and_family() -> None:
    assert SPR.family_model_stepping == (6, 0x8F, 8)
    assert SPR.brand == ""  # the table above has no brand leaves


# -- dump parsers (fpstate.x86.profiles.dumps) and the loader ---------------------------------

DATA = Path(__file__).resolve().parent / "data"
CPUID_R = (DATA / "epyc-zen5-kvm.cpuid-r.txt").read_text()  # `cpuid -r` on this host, 2 vCPUs
SPR_AIDA = (DATA / "SapphireRapids_05-cpu0.aida64.txt").read_text()  # InstLatx64, CPU #0 + #1
SNB_AIDA = (DATA / "SandyBridge-old-aida64.txt").read_text()  # AIDA64 v1.20: no [SL nn]
CORPUS = json.loads(gzip.decompress((DATA / "cpuid-corpus.json.gz").read_bytes()))


def test_cpuid_r_reads_cpu_0_only() -> None:
    p = parse_dump(CPUID_R, "kvm", "fixture")
    assert (p.vendor, p.brand) == ("amd", "AMD EPYC")
    assert p.cpuid(0xD, 0) == (0xE7, 0x980, 0x980, 0)
    assert p.cpuid(0xD, 1) == (0xF, 0x9A8, 0x1800, 0)
    assert p.cpuid(1)[1] == 0x00020800  # CPU 0's APIC id; CPU 1's block says 0x01020800
    assert p.family_model_stepping == (0x1A, 0x02, 1)


def test_cpuid_r_single_cpu_header() -> None:
    block = CPUID_R.split("CPU 1:")[0].replace("CPU 0:", "CPU:")
    assert parse_dump(block, "kvm", "fixture").leaves == parse_dump(CPUID_R, "k", "f").leaves


def test_cpuid_r_truncated_mid_line_names_the_line() -> None:
    cut = CPUID_R[: CPUID_R.index("0x0000000d 0x02") + 30]
    with pytest.raises(ProfileError, match=r"fixture line 20: not a 'cpuid -r' register line"):
        parse_dump(cut, "kvm", "fixture")


def test_cpuid_r_truncated_at_a_line_end_misses_the_last_leaf() -> None:
    cut = CPUID_R[: CPUID_R.index("   0x80000021")]
    with pytest.raises(ProfileError, match=r"truncated: CPUID leaf 0x80000021 is missing"):
        parse_dump(cut, "kvm", "fixture")


def test_cpuid_r_garbled_register_and_duplicate() -> None:
    bad = CPUID_R.replace("eax=0x000000e7", "eax=0x0000g0e7")
    with pytest.raises(ProfileError, match="line 18: not a 'cpuid -r' register line"):
        parse_dump(bad, "kvm", "fixture")
    lines = CPUID_R.splitlines()
    dup = "\n".join([*lines[:5], lines[4], *lines[5:]])
    with pytest.raises(ProfileError, match="line 6: CPUID leaf 0x3 sub-leaf 0x0 appears twice"):
        parse_dump(dup, "kvm", "fixture")


def test_aida64_matches_the_corpus_entry_of_the_same_dump() -> None:
    p = parse_dump(SPR_AIDA, "spr", "fixture")
    corpus = load_profile(f"{DATA / 'cpuid-corpus.json.gz'}#SapphireRapids_05_CPUID")
    assert p.leaves == corpus.leaves
    assert p.cpuid(0xD, 0x12) == (0x2000, 0xB00, 6, 0)
    assert p.brand == "Intel(R) Xeon(R) w7-2475X"


def test_old_aida64_without_subleaf_numbers() -> None:
    p = parse_dump(SNB_AIDA, "snb", "fixture")
    assert p.cpuid(4, 3) == (0x1C03C163, 0x02C0003F, 0x1FFF, 6)  # repeated lines: 0, 1, 2, 3
    assert p.cpuid(0xB, 1) == (4, 4, 0x201, 0)
    # leaf 0xD printed only non-zero sub-leaves 0..2: the (256, 576) line is AVX's sub-leaf 2
    assert p.cpuid(0xD, 1) == (0, 0, 0, 0)
    assert p.component(2) == Component(2, 256, 576, False, False, False)


def test_aida64_truncated_block_without_its_end() -> None:
    block = SPR_AIDA[: SPR_AIDA.index("CPUID 80000005")]
    head = block[: block.index("\nL1")] if "\nL1" in block else block
    with pytest.raises(ProfileError, match="truncated: CPUID leaf 0x80000008 is missing"):
        parse_dump(head, "spr", "fixture")


def test_aida64_garbled_line_is_named() -> None:
    bad = SPR_AIDA.replace("CPUID 0000000D: 00000100-00000240", "CPUID 0000000D: 00000100-0000024")
    with pytest.raises(ProfileError, match=r"fixture line 26: not an AIDA64 CPUID line"):
        parse_dump(bad, "spr", "fixture")


def test_corpus_entries_and_selection() -> None:
    path = DATA / "cpuid-corpus.json.gz"
    assert load_profile(f"{path}#0").name == "K15_Bulldozer"
    with pytest.raises(ProfileError, match="holds 339 CPUs"):
        load_profile(str(path))
    with pytest.raises(ProfileError, match="'Zen' matches 82 entries, not 1"):
        load_profile(f"{path}#Zen")
    # the one excerpt cut inside leaf 0xD sub-leaf 2 (google/cpu_features#440)
    with pytest.raises(ProfileError, match=r"leaf_0xd sub-leaf '2': None is not a hex string"):
        load_profile(f"{path}#cpu_features")


def test_loader_names_and_errors(tmp_path: Path) -> None:
    assert {"haswell", "skylake-sp", "icelake-sp", "sapphire-rapids", "alder-lake", "zen2",
            "zen3", "zen4", "zen5"} <= set(list_profiles())
    with pytest.raises(ProfileError, match=r"unknown profile 'zen9'.*zen4"):
        load_profile("zen9")
    junk = tmp_path / "junk.txt"
    junk.write_text("hello\nworld\n")
    with pytest.raises(ProfileError, match=r"junk.txt: unrecognised CPUID dump"):
        load_profile(str(junk))
    saved = tmp_path / "spr.json"
    saved.write_text(SPR.to_json())
    assert load_profile(str(saved)) == SPR


def _mutate(text: str, data: st.DataObject) -> str:
    """One random damage: cut, delete a span, insert junk, or duplicate/swap lines."""
    kind = data.draw(st.sampled_from(["cut", "delete", "insert", "dupline", "flip"]))
    i = data.draw(st.integers(0, len(text)))
    if kind == "cut":
        return text[:i]
    if kind == "delete":
        return text[:i] + text[i + data.draw(st.integers(1, 40)):]
    if kind == "insert":
        return text[:i] + data.draw(st.text(max_size=20)) + text[i:]
    if kind == "flip":
        return text[:i] + data.draw(st.sampled_from("0123456789abcdefxX-:=[] \n")) + text[i + 1:]
    lines = text.splitlines()
    j = data.draw(st.integers(0, len(lines) - 1))
    return "\n".join([*lines[: j + 1], lines[j], *lines[j + 1:]])


def _only_profile_errors(text: str) -> None:
    try:
        p = parse_dump(text, "fuzz", "fuzz")
    except ProfileError:
        return
    # whatever parsed must answer layout questions with package errors only
    try:
        layout_table(p, p.xfeatures_supported)
    except (ProfileError, MaskError):
        pass


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(raw: bytes) -> None:
    _only_profile_errors(raw.decode("latin-1"))


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([CPUID_R, SPR_AIDA, SNB_AIDA, SPR.to_json()]), st.data())
def test_fuzz_mutated_dumps(text: str, data: st.DataObject) -> None:
    _only_profile_errors(_mutate(text, data))


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner,
                                                               max_size=5),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["leaf_0xd", "cpuid_raw_cpu0", "source", "microarch_tag"]), _JSON,
       st.data())
def test_fuzz_corpus_objects(key: str, value: object, data: st.DataObject) -> None:
    entry = dict(CORPUS[data.draw(st.integers(0, len(CORPUS) - 1))])
    entry[key] = value
    _only_profile_errors(json.dumps(entry))


@settings(max_examples=150, deadline=None)
@given(_JSON, _JSON)
def test_fuzz_profile_json(leaves: object, other: object) -> None:
    for obj in (other, {"format": "fpstate-cpuid-profile/1", "name": "x", "vendor": "amd",
                        "source": "", "leaves": leaves}):
        try:
            CpuidProfile.from_json(json.dumps(obj))
        except ProfileError:
            pass
