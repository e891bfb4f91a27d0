"""normalise_image: components whose XSTATE_BV bit is clear read as their initial configuration."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fpstate.errors import BlobError
from fpstate.x86.image import normalise_image

#: The AMD Zen 4/5 standard layout of XCR0 0xe7 (CPUID 0xD sub-leaves 2, 5, 6, 7).
ZEN_OFFSETS = {2: (0x240, 0x100), 5: (0x340, 0x40), 6: (0x380, 0x200), 7: (0x580, 0x400)}
ZEN_XCR0, ZEN_SIZE = 0xE7, 0x980


def garbage(bv: int) -> bytes:
    b = bytearray(b"\xab" * ZEN_SIZE)
    b[512:576] = bytes(64)
    struct.pack_into("<Q", b, 512, bv)
    return bytes(b)


def test_all_clear_gives_the_init_configuration_but_keeps_mxcsr() -> None:
    out = normalise_image(garbage(0), ZEN_XCR0, ZEN_OFFSETS)
    assert struct.unpack_from("<HHBBHQQ", out, 0) == (0x037F, 0, 0, 0, 0, 0, 0)
    assert out[24:32] == b"\xab" * 8  # MXCSR and MXCSR_MASK: not governed by XSTATE_BV[1]
    assert out[32:416] == bytes(384)  # ST0-7, XMM0-15
    assert out[416:512] == b"\xab" * 96  # no component lives there
    assert out[0x240:0x980] == bytes(0x740)
    assert out[512:576] == garbage(0)[512:576]


def test_set_bits_are_left_alone() -> None:
    img = garbage(0x4)
    out = normalise_image(img, ZEN_XCR0, ZEN_OFFSETS)
    assert out[0x240:0x340] == img[0x240:0x340]
    assert out[0x340:0x980] == bytes(0x640)
    assert out[0:2] == b"\x7f\x03"


def test_components_outside_xcr0_are_not_touched() -> None:
    img = garbage(0)
    out = normalise_image(img, 0x3, {})
    assert out[0x240:] == img[0x240:]


def test_missing_offset_and_short_image_are_blob_errors() -> None:
    with pytest.raises(BlobError, match="component 5"):
        normalise_image(garbage(0), ZEN_XCR0, {2: (0x240, 0x100)})
    with pytest.raises(BlobError, match="at least 576"):
        normalise_image(bytes(100), 0x3, {})
    with pytest.raises(BlobError, match="outside"):
        normalise_image(garbage(0)[:0x900], ZEN_XCR0, ZEN_OFFSETS)


@given(st.binary(min_size=ZEN_SIZE, max_size=ZEN_SIZE), st.integers(0, 0xFF))
def test_idempotent_and_length_preserving(data: bytes, bv: int) -> None:
    b = bytearray(data)
    struct.pack_into("<Q", b, 512, bv)
    once = normalise_image(bytes(b), ZEN_XCR0, ZEN_OFFSETS)
    assert len(once) == ZEN_SIZE
    assert normalise_image(once, ZEN_XCR0, ZEN_OFFSETS) == once
    assert once[512:576] == bytes(b[512:576])
