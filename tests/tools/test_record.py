"""Portable state records: JSON, translation between layouts and vendors (byte-exact round trips
on every pair of bundled profiles that can hold the state), and refusals naming components."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fpstate.errors import BlobError
from fpstate.tools.blob import decode
from fpstate.tools.record import (
    LAYOUTS,
    StateRecord,
    _places,
    linux_xcr0_xss,
    record_from_blob,
    record_leaves,
    refusal_message,
    translate,
)
from fpstate.tools.registers import component_fields
from fpstate.x86.layout import compacted_size, standard_size
from fpstate.x86.profiles import bundled_profile, list_profiles

NAMES = sorted(list_profiles())
PROFILES = {n: bundled_profile(n) for n in NAMES}
LINUX = {n: linux_xcr0_xss(p) for n, p in PROFILES.items()}


def masks(name: str, layout: str) -> tuple[int, int]:
    xcr0, xss = LINUX[name]
    return xcr0, (xss if layout == "compacted" else 0)


def make_record(name: str, layout: str, may_use: set[int], rnd: random.Random,
                share: float = 0.75) -> StateRecord:
    """A record of ``name`` in ``layout`` (Linux's XCR0/XSS) with random legacy bytes and random
    registers in a random subset of ``may_use``; the other components are in init state."""
    p = PROFILES[name]
    xcr0, xss = masks(name, layout)
    xcomp = (xcr0 | xss | 1 << 63) if layout == "compacted" else 0
    size = compacted_size(p, xcr0 | xss) if layout == "compacted" else standard_size(p, xcr0)
    state = bytearray(size)
    state[0:512] = rnd.randbytes(512)
    bv = 0x3
    for i, place in _places(p, layout, xcr0, xss, xcomp).items():
        if i in may_use and rnd.random() < share:
            for f in component_fields(i, place.size):
                state[place.offset + f.offset:place.offset + f.offset + f.size] = \
                    rnd.randbytes(f.size)
            bv |= 1 << i
    state[512:520] = bv.to_bytes(8, "little")
    state[520:528] = xcomp.to_bytes(8, "little")
    return StateRecord(name, p.vendor, record_leaves(p), xcr0, xss, layout, bytes(state))


PAIRS = [(a, la, b, lb) for a, b in itertools.product(NAMES, repeat=2)
         for la, lb in itertools.product(LAYOUTS, repeat=2)]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32))
def test_round_trip_is_byte_exact_on_every_pair(seed: int) -> None:
    """A -> B -> A gives A's bytes back for all 10 x 10 profiles x 2 x 2 layouts, with state in
    every component both hold (components only A has stay in init state)."""
    rnd = random.Random(seed)
    for a, la, b, lb in PAIRS:
        xa, xb = (sum(masks(n, lay)) for n, lay in ((a, la), (b, lb)))
        common = {i for i in range(64) if xa >> i & xb >> i & 1}
        rec = make_record(a, la, common, rnd)
        there = translate(rec, PROFILES[b], lb)
        assert there.ok, (a, la, b, lb, [str(r) for r in there.refused])
        back = translate(there.record, PROFILES[a], la)
        assert back.ok and back.record.state == rec.state, (a, la, b, lb)
        assert back.record.xcr0 == rec.xcr0 and back.record.xss == rec.xss


def test_amd_to_intel_moves_the_opmask_from_0x340_to_0x440() -> None:
    rec = make_record("zen4", "standard", {5}, random.Random(5))
    k = rec.state[0x340:0x380]
    out = translate(rec, PROFILES["icelake-sp"], "standard").record
    assert out.state[0x440:0x480] == k and out.xcr0 == 0x2E7 and len(out.state) == 2696
    assert decode(out.state, PROFILES["icelake-sp"], "xsave").register("k0") == \
        int.from_bytes(k[:8], "little")


def test_refusal_names_every_component_the_target_cannot_hold() -> None:
    rnd = random.Random(7)
    rec = make_record("sapphire-rapids", "compacted", {5, 7, 11, 18}, rnd, share=1.0)
    assert rec.xstate_bv == 0x3 | 0x20 | 0x80 | 1 << 11 | 1 << 18
    t = translate(rec, PROFILES["zen4"], "standard")
    assert not t.ok and [r.number for r in t.refused] == [11, 18]
    t = translate(rec, PROFILES["haswell"], "standard")
    assert [r.name for r in t.refused] == ["opmask", "hi16_zmm", "cet_user", "xtiledata"]
    t = translate(rec, PROFILES["zen4"], "standard")
    msg = refusal_message(t, "zen4")
    assert "cet_user (component 11): holds state; a supervisor component" in msg
    assert "xtiledata (component 18): holds state; not in the target's XCR0 0x2e7" in msg
    # Compacted zen4 has CET_U in IA32_XSS: only tile data is refused then.
    t = translate(rec, PROFILES["zen4"], "compacted")
    assert [r.name for r in t.refused] == ["xtiledata"]


def test_compacted_target_is_the_kernels_task_layout() -> None:
    """To compacted SPR: XCOMP_BV = fpu_kernel_cfg.max_features | bit 63 (0x61ee7: arch LBR,
    in IA32_XSS but independent, is no part of a task's area) and the area is max_size."""
    rec = make_record("zen4", "standard", {5, 6, 7}, random.Random(4))
    t = translate(rec, PROFILES["sapphire-rapids"], "compacted")
    assert t.ok and t.record.xcomp_bv == 1 << 63 | 0x61EE7 and len(t.record.state) == 10752
    assert t.record.xss == 0x1C00 and LINUX["sapphire-rapids"] == (0x602E7, 0x1C00)
    assert decode(t.record.state, PROFILES["sapphire-rapids"], "xsaves").component(18).offset \
        == 0xA00


def test_state_with_initial_values_is_dropped_not_refused() -> None:
    rec = make_record("zen4", "standard", set(), random.Random(1))
    state = bytearray(rec.state)
    state[512:520] = (0x3 | 0x80).to_bytes(8, "little")  # Hi16_ZMM "in use" but all zero
    rec = StateRecord(rec.cpu, rec.vendor, rec.leaves, rec.xcr0, rec.xss, rec.layout,
                      bytes(state))
    t = translate(rec, PROFILES["haswell"], "standard")
    assert t.ok and t.record.xstate_bv == 0x3
    assert any("hi16_zmm: in XSTATE_BV with initial values; dropped" in n for n in t.notes)


def test_padding_is_not_state() -> None:
    rec = make_record("skylake-sp", "standard", set(), random.Random(2))
    state = bytearray(rec.state)
    state[0xA88 - 1] = 0  # inside PKRU's 8 bytes: register bytes 0-3, pad 4-7
    state[0xA80 + 6] = 0x77  # PKRU's padding
    rec = StateRecord(rec.cpu, rec.vendor, rec.leaves, rec.xcr0, rec.xss, rec.layout,
                      bytes(state))
    t = translate(rec, PROFILES["zen4"], "standard")
    assert t.ok and t.record.state[0x980 + 6] == 0x77  # component bytes move as a whole


def test_json_round_trip_and_profile_from_the_record() -> None:
    rec = make_record("sapphire-rapids", "compacted", {17, 18}, random.Random(3))
    again = StateRecord.from_json(rec.to_json())
    assert again == rec
    p = again.profile()
    assert p.vendor == "intel" and p.component(18).size == 8192 and p.component(18).aligned
    assert p.cpuid(0x1D, 1) == PROFILES["sapphire-rapids"].cpuid(0x1D, 1)


@pytest.mark.parametrize("bad, match", [
    ("{", "does not parse"),
    ('{"format": "x"}', "not a state record"),
    ('{"format": "fpstate-state-record/1"}', "bad or missing field"),
])
def test_bad_record_json(bad: str, match: str) -> None:
    with pytest.raises(BlobError, match=match):
        StateRecord.from_json(bad)


def test_record_from_a_uabi_blob_takes_xcr0_from_464() -> None:
    p = PROFILES["zen4"]
    data = bytearray(2440)
    data[464:472] = (0x2E7).to_bytes(8, "little")
    data[512:520] = (0x3).to_bytes(8, "little")
    rec = record_from_blob(bytes(data), p)
    assert (rec.xcr0, rec.layout, len(rec.state)) == (0x2E7, "standard", 2440)
    assert rec.xss == LINUX["zen4"][1]


def test_record_of_one_thread_of_a_core(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`record --thread TID` picks a thread's NT_X86_XSTATE of a core; without it a core of
    several threads is refused, naming them."""
    import json

    from fpstate.cli import main
    from fpstate.tools.corefile import build_core

    def note(xstate_bv: int) -> bytes:
        data = bytearray(2440)
        data[464:472] = (0x2E7).to_bytes(8, "little")
        data[512:520] = xstate_bv.to_bytes(8, "little")
        return bytes(data)

    core = tmp_path / "core"
    core.write_bytes(build_core([(101, note(0x3)), (102, note(0x7))]))
    out = tmp_path / "r.json"
    assert main(["record", str(core), "--cpu", "zen4", "--thread", "102", "-o", str(out)]) == 0
    rec = StateRecord.from_json(out.read_text())
    assert rec.xstate_bv == 0x7 and json.loads(out.read_text())["cpu"] == "zen4"
    assert main(["record", str(core), "--cpu", "zen4"]) == 2
    assert main(["record", str(core), "--cpu", "zen4", "--thread", "7"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"fpstate: error: {core} holds 2 threads (101, 102): a record holds one, choose it "
        "with --thread",
        f"fpstate: error: {core} has no thread 7 (threads: 101, 102)"]
