"""Blob decoding and encoding: offsets from CPUID, formats, warnings, byte-exact round trips on
every bundled profile, and fuzzing (random bytes never raise anything but BlobError)."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fpstate.errors import BlobError
from fpstate.tools.blob import (
    FORMATS,
    FP_XSTATE_MAGIC1,
    FP_XSTATE_MAGIC2,
    decode,
    detect_format,
    encode,
)
from fpstate.tools.registers import component_fields, register_groups
from fpstate.x86.layout import compacted_size, standard_size
from fpstate.x86.profiles import bundled_profile, list_profiles

PROFILES = {name: bundled_profile(name) for name in list_profiles()}
ZEN4, SKX, SPR = PROFILES["zen4"], PROFILES["skylake-sp"], PROFILES["sapphire-rapids"]
FAST = settings(max_examples=25, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def area(profile, xcr0: int, xstate_bv: int, put: dict[int, tuple[int, bytes]] = {}) -> bytearray:  # noqa: B006
    """A standard-format area of ``xcr0`` with FCW/MXCSR at their reset values."""
    out = bytearray(standard_size(profile, xcr0))
    struct.pack_into("<H", out, 0, 0x037F)
    struct.pack_into("<I", out, 24, 0x1F80)
    struct.pack_into("<Q", out, 512, xstate_bv)
    for offset, data in put.values():
        out[offset:offset + len(data)] = data
    return out


# -- register tables -----------------------------------------------------------------------------

def test_legacy_register_offsets_are_the_sdm_table() -> None:
    x87 = {f.name: (f.offset, f.size) for f in component_fields(0, 160)}
    sse = {f.name: (f.offset, f.size) for f in component_fields(1, 256)}
    assert x87["fcw"] == (0, 2) and x87["ftw"] == (4, 1) and x87["fip"] == (8, 8)
    assert x87["fdp"] == (16, 8) and x87["st0"] == (32, 10) and x87["st7"] == (144, 10)
    assert sse["mxcsr"] == (24, 4) and sse["mxcsr_mask"] == (28, 4)
    assert sse["xmm0"] == (160, 16) and sse["xmm15"] == (400, 16)


def test_amx_registers_follow_the_size_cpuid_reports() -> None:
    cfg = {f.name: (f.offset, f.size) for f in component_fields(17, 64)}
    assert cfg["palette"] == (0, 1) and cfg["colsb0"] == (16, 2) and cfg["rows15"] == (63, 1)
    tiles = component_fields(18, 8192)
    assert len(tiles) == 8 * 16 and tiles[-1].name == "tmm7_r15" and tiles[-1].offset == 8128
    assert register_groups(18, 8192) == ["tmm0-tmm7"]
    assert register_groups(7, 1024) == ["zmm16-zmm31"]
    assert [f.name for f in component_fields(19, 128)][:2] == ["r16", "r17"]


# -- decoding ------------------------------------------------------------------------------------

def test_opmask_offset_comes_from_cpuid_amd_and_intel() -> None:
    """k1 = 0x1122334455667788 at the opmask's CPUID offset + 8: 0x348 on Zen 4, 0x448 on SKX."""
    k1 = (0x1122334455667788).to_bytes(8, "little")
    amd = decode(bytes(area(ZEN4, 0x2E7, 0x23, {5: (0x348, k1)})), ZEN4, "xsave")
    intel = decode(bytes(area(SKX, 0x2E7, 0x23, {5: (0x448, k1)})), SKX, "xsave")
    assert amd.register("k1") == intel.register("k1") == 0x1122334455667788
    assert amd.component(5).offset == 0x340 and intel.component(5).offset == 0x440
    assert amd.component(5).state == "in use" and amd.component(7).state == "init"
    # The same Zen 4 bytes read with Skylake offsets put k1 nowhere.
    assert decode(bytes(area(ZEN4, 0x2E7, 0x23, {5: (0x348, k1)})).ljust(2696, b"\0"), SKX,
                  "xsave").register("k1") == 0


def test_init_marking_and_stale_bytes() -> None:
    data = area(ZEN4, 0x2E7, 0x3, {2: (0x240, b"\x01")})
    blob = decode(bytes(data), ZEN4, "xsave")
    assert blob.component(2).state == "init (stale bytes ignored)"
    assert blob.component(0).state == "in use (initial values)"
    assert any("stale" in w or "ignored by XRSTOR" in w for w in blob.warnings)


def test_compacted_offsets_walk_xcomp_bv_with_alignment() -> None:
    """SPR, XCOMP_BV = x87|SSE|AVX|TILECFG|TILEDATA: TILECFG at 832 (aligned), data at 896."""
    xcomp = 0x60007 | 1 << 63
    out = bytearray(compacted_size(SPR, 0x60007))
    struct.pack_into("<QQ", out, 512, 0x60000, xcomp)
    struct.pack_into("<H", out, 0, 0x037F)
    out[832] = 1  # palette 1
    out[896 + 5 * 1024 + 3 * 64] = 0xAB  # tmm5 row 3
    blob = decode(bytes(out), SPR)
    assert blob.fmt == "xsavec" and len(out) == 896 + 8192
    assert blob.register("palette") == 1 and blob.register("tmm5_r3") == 0xAB
    assert blob.component(18).offset == 896 and blob.warnings == ()


def test_detection_of_every_format() -> None:
    std = area(ZEN4, 0x2E7, 0x3)
    assert detect_format(bytes(std), ZEN4)[0] == "xsave"
    uabi = bytearray(std)
    struct.pack_into("<Q", uabi, 464, 0x2E7)
    assert detect_format(bytes(uabi), ZEN4)[0] == "uabi"
    assert detect_format(bytes(uabi).ljust(4096, b"\0"), ZEN4)[0] == "kvm"
    sig = bytearray(std) + FP_XSTATE_MAGIC2.to_bytes(4, "little")
    struct.pack_into("<IIQI", sig, 464, FP_XSTATE_MAGIC1, len(std) + 4, 0x2E7, len(std))
    assert detect_format(bytes(sig), ZEN4)[0] == "sigframe"
    comp = bytearray(std)
    struct.pack_into("<Q", comp, 520, 1 << 63 | 0x2E7)
    assert detect_format(bytes(comp), ZEN4)[0] == "xsavec"
    struct.pack_into("<Q", comp, 520, 1 << 63 | 0x1AE7)
    assert detect_format(bytes(comp), ZEN4)[0] == "xsaves"


def test_warnings_name_the_rule() -> None:
    bad = area(ZEN4, 0x2E7, 0x1FF)  # bits 3, 4, 8 outside XCR0
    struct.pack_into("<I", bad, 24, 0x41F80)  # MXCSR bit 18
    struct.pack_into("<Q", bad, 520, 1)
    w = " | ".join(decode(bytes(bad), ZEN4, "xsave").warnings)
    assert "outside XCR0 0x2e7: XRSTOR raises #GP" in w
    assert "XCOMP_BV 0x1 is not 0" in w and "MXCSR 0x41f80 sets reserved bits 0x40000" in w


def test_sigframe_magics_and_sizes() -> None:
    std = area(ZEN4, 0x2E7, 0x3)
    sig = bytearray(std) + b"XXXX"
    struct.pack_into("<IIQI", sig, 464, FP_XSTATE_MAGIC1, len(std) + 4, 0x2E7, len(std))
    w = decode(bytes(sig), ZEN4, "sigframe").warnings
    assert any("is not FP_XSTATE_MAGIC2" in x and "FXSAVE-only" in x for x in w)
    struct.pack_into("<I", sig, 464, 0)
    blob = decode(bytes(sig), ZEN4, "sigframe")
    assert blob.layout_mask == 0x3 and any("is not FP_XSTATE_MAGIC1" in x for x in blob.warnings)


def test_kvm_buffer_of_4096_cannot_hold_amx_tiles() -> None:
    """KVM_GET_XSAVE's 4096 bytes on SPR: tile data (0xb00 + 8192) does not fit."""
    data = bytearray(4096)
    struct.pack_into("<H", data, 0, 0x37F)
    struct.pack_into("<Q", data, 464, 0x602E7)
    struct.pack_into("<Q", data, 512, 0x60003)
    blob = decode(bytes(data), SPR)
    assert blob.fmt == "kvm" and 18 not in [c.number for c in blob.components]
    assert any("xtiledata" in w and "does not fit" in w for w in blob.warnings)
    assert any("XSTATE_BV has xtiledata" in w and "no room" in w for w in blob.warnings)


def test_too_short_and_unknown_format_are_blob_errors() -> None:
    with pytest.raises(BlobError, match="at least 576"):
        decode(bytes(575), ZEN4)
    with pytest.raises(BlobError, match="unknown blob format"):
        decode(bytes(576), ZEN4, "fxsave")


# -- round trips ---------------------------------------------------------------------------------

def _xcr0(profile) -> int:
    return profile.xcr0_supported


@st.composite
def states(draw, name: str, fmt: str) -> bytes:
    """A blob of ``fmt`` on profile ``name``: random registers in random components."""
    p = PROFILES[name]
    xcr0 = _xcr0(p)
    comps = [c.number for c in p.components(xcr0)]
    in_use = draw(st.sets(st.sampled_from(comps)))
    xstate_bv = sum(1 << i for i in in_use)
    regs: dict[int, dict[str, str]] = {}
    for i in comps:
        size = p.component(i).size
        fields = component_fields(i, size)
        picked = draw(st.lists(st.sampled_from(fields), max_size=4, unique=True))
        regs[i] = {f.name: hex(draw(st.integers(0, 2 ** (8 * f.size) - 1))) for f in picked}
        if i == 1 and "mxcsr" in regs[i]:
            regs[i]["mxcsr"] = hex(int(regs[i]["mxcsr"], 16) & 0xFFFF)
    obj = {"format": "fpstate-blob/1", "blob_format": "xsave",
           "header": {"xstate_bv": hex(xstate_bv), "xcomp_bv": "0"},
           "components": [{"number": i, "registers": r} for i, r in regs.items()],
           "extra": []}
    raw = encode(obj, p, fmt)
    return raw, regs


@pytest.mark.parametrize("name", sorted(PROFILES))
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_random_states_every_profile(name: str, fmt: str) -> None:
    """encode(registers) -> decode gives the registers back; decode -> encode gives the same
    bytes, on every bundled profile and in every format."""
    p = PROFILES[name]

    @FAST
    @given(states(name, fmt))
    def check(case) -> None:
        raw, regs = case
        blob = decode(raw, p, fmt)
        for i, r in regs.items():
            for reg, value in r.items():
                assert blob.component(i).register(reg) == int(value, 16)
        assert encode(json.dumps(blob.to_dict()), p) == raw

    check()


@pytest.mark.parametrize("name", sorted(PROFILES))
@FAST
@given(data=st.binary(min_size=576, max_size=12000), fmt=st.sampled_from(("auto", *FORMATS)))
def test_decode_encode_is_byte_exact_for_any_bytes(name: str, data: bytes, fmt: str) -> None:
    """Every byte is a register, a header/software field or an extra run (an ia32 frame's
    fpstate needs its 112-byte fsave header before the 576-byte area)."""
    p = PROFILES[name]
    if fmt == "sigframe-ia32" and len(data) < 112 + 576:
        with pytest.raises(BlobError, match="fsave header"):
            decode(data, p, fmt)
        return
    blob = decode(data, p, fmt)
    assert encode(blob.to_dict(), p) == data


# -- fuzzing -------------------------------------------------------------------------------------

@FAST
@given(data=st.binary(max_size=13000), fmt=st.sampled_from(("auto", *FORMATS)),
       name=st.sampled_from(sorted(PROFILES)))
def test_random_bytes_raise_only_blob_error(data: bytes, fmt: str, name: str) -> None:
    try:
        decode(data, PROFILES[name], fmt)
    except BlobError:
        pass


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2 ** 70) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)


@FAST
@given(obj=st.fixed_dictionaries(
    {"format": st.just("fpstate-blob/1"), "blob_format": st.sampled_from(FORMATS)},
    optional={"size": _JSONISH, "header": _JSONISH, "components": _JSONISH, "extra": _JSONISH,
              "sw_bytes": _JSONISH, "xcr0": _JSONISH, "magic2": _JSONISH}))
def test_encode_of_garbage_raises_only_blob_error(obj: dict) -> None:
    try:
        encode(obj, ZEN4)
    except BlobError:
        pass


def test_encode_refuses_a_component_the_layout_lacks() -> None:
    obj = {"format": "fpstate-blob/1", "blob_format": "xsave",
           "header": {"xstate_bv": "0x80", "xcomp_bv": "0"},
           "components": [{"number": 7, "registers": {"zmm16": "0x1"}}], "extra": []}
    assert decode(encode(obj, ZEN4), ZEN4, "xsave").register("zmm16") == 1
    with pytest.raises(BlobError, match=r"hi16_zmm.*no place"):
        encode(obj, PROFILES["haswell"])
    with pytest.raises(BlobError, match="no register 'zmm15'"):
        encode({**obj, "components": [{"number": 7, "registers": {"zmm15": "0"}}]}, ZEN4)
    with pytest.raises(BlobError, match="does not fit in 64 bytes"):
        encode({**obj, "components": [{"number": 7, "registers": {"zmm16": hex(1 << 512)}}]},
               ZEN4)


def test_apx_registers_at_the_reused_mpx_offset() -> None:
    """APX (component 19) reuses the MPX standard offset 960: r16 at 960, r31 at 1080, on an
    SPR-like profile that enumerates APX."""
    from fpstate.x86.cpuid import CpuidProfile

    leaves = dict(SPR.leaves)
    a, b, c, d = leaves[(0xD, 0)]
    leaves[(0xD, 0)] = (a | 1 << 19, b, c, d)
    leaves[(0xD, 19)] = (128, 960, 0, 0)
    apx = CpuidProfile("spr+apx", "intel", leaves, "test")
    data = area(apx, 0x802E7, 0x80003, {19: (960, (0x1616).to_bytes(8, "little"))})
    data[1080:1088] = (0x3131).to_bytes(8, "little")
    blob = decode(bytes(data), apx, "xsave")
    assert blob.component(19).offset == 960 and blob.component(19).state == "in use"
    assert blob.register("r16") == 0x1616 and blob.register("r31") == 0x3131


# -- sigframe-ia32 ---------------------------------------------------------------------------


def _ia32_frame() -> bytes:
    from tests.tools.test_validate import ia32_fpstate

    return ia32_fpstate("zen4")


def test_an_ia32_frame_is_detected_and_decoded_with_its_fsave_header() -> None:
    from fpstate.kernel.x86.regset import convert_from_fxsr

    data = _ia32_frame()
    blob = decode(data, PROFILES["zen4"])
    assert blob.fmt == "sigframe-ia32" and "fsave header" in (blob.detected or "")
    h = dict(blob.fsave_header or ())
    assert h["cssel"] == 0x23 and h["datasel"] == 0xFFFF002B and h["magic"] == 0
    assert data[:108] == convert_from_fxsr(data[112:624])
    assert blob.component(0).offset == 112 and blob.component(2).offset == 112 + 576
    assert blob.sw_bytes.extended_size == blob.sw_bytes.xstate_size + 4 + 112
    assert not any(w.startswith("extended_size") for w in blob.warnings)
    assert encode(blob.to_dict(), PROFILES["zen4"]) == data


def test_an_ia32_frame_whose_header_differs_warns_what_sigreturn_restores() -> None:
    data = bytearray(_ia32_frame())
    data[28:38] = bytes(10)  # the header's ST0 only
    blob = decode(bytes(data), PROFILES["zen4"])
    assert any("restores the fsave header's x87 state" in w and "ST0" in w
               for w in blob.warnings)


def test_another_format_encodes_as_an_ia32_frame_the_kernel_takes() -> None:
    from fpstate.tools.validate import validate

    p = PROFILES["zen4"]
    area = decode(_ia32_frame()[112:], p, "sigframe")
    xsave = decode(encode(area.to_dict(), p, "xsave"), p, "xsave")
    raw = encode(xsave.to_dict(), p, "sigframe-ia32")
    blob = decode(raw, p)
    assert blob.fmt == "sigframe-ia32"
    assert blob.sw_bytes.extended_size == blob.sw_bytes.xstate_size + 4 + 112
    assert dict(blob.fsave_header)["status"] == blob.component(0).register("fsw")
    assert validate(raw, p, "sigreturn-ia32").accepted


def test_a_bad_ia32_json_is_a_blob_error() -> None:
    p = PROFILES["zen4"]
    obj = decode(_ia32_frame(), p).to_dict()
    bad = dict(obj, fsave_header={k: v for k, v in obj["fsave_header"].items() if k != "tag"})
    with pytest.raises(BlobError, match="fsave_header: field 'tag' is missing"):
        encode(bad, p)
    bad = dict(obj, extra=[{"offset": 30, "hex": "01"}])
    with pytest.raises(BlobError, match="lies in the fsave header"):
        encode(bad, p)
    bad = dict(obj, size=700)
    with pytest.raises(BlobError):
        encode(bad, p)
