"""Hypothesis strategies for instruction programs: `fpstate.x86.progen` driven by hypothesis.

The generator itself lives in the package (``fpstate conform`` drives it with a seeded
``random.Random``); here every one of its choices is a hypothesis draw, so a failing program
shrinks choice by choice (fewer instructions, zero data, simpler masks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from hypothesis import strategies as st

from fpstate.x86.cpuid import CpuidProfile
from fpstate.x86.progen import generate_program
from fpstate.x86.program import Program

T = TypeVar("T")


class HypothesisDraw:
    """`fpstate.x86.progen.Draw` from a hypothesis ``draw`` function."""

    def __init__(self, draw: Callable[[st.SearchStrategy[Any]], Any]) -> None:
        self.draw = draw

    def integer(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))

    def choice(self, options: Sequence[T]) -> T:
        return self.draw(st.sampled_from(options))

    def raw(self, n: int) -> bytes:
        return self.draw(st.binary(min_size=n, max_size=n))


@st.composite
def programs(draw: Callable[[st.SearchStrategy[Any]], Any], profile: CpuidProfile, *,
             xcr0: int | None = None, focus: str | None = None,
             max_insns: int = 8, placed: bool = False) -> Program:
    """Programs for ``profile`` (its XCR0 and implementation), optionally with ``focus``;
    ``placed`` for programs the host runs first (`generate_program`)."""
    return generate_program(HypothesisDraw(draw), profile, xcr0=xcr0, max_insns=max_insns,
                            focus=focus, placed=placed)


def image(xstate_bv: int = 0, *, fcw: int = 0x037F, fsw: int = 0, ftw: int = 0, fop: int = 0,
          fip: int = 0, fdp: int = 0, mxcsr: int = 0x1F80, xcomp_bv: int = 0, size: int = 2432,
          patch: Sequence[tuple[int, bytes]] = ()) -> bytes:
    """A standard (or, with ``xcomp_bv``, compacted) XSAVE image: the legacy fields, the
    header, and ``patch`` = (offset, bytes) pairs written over it."""
    import struct

    size = max([size] + [off + len(data) for off, data in patch])
    b = bytearray(size)
    struct.pack_into("<HHBBHQQII", b, 0, fcw, fsw, ftw, 0, fop, fip, fdp, mxcsr, 0)
    struct.pack_into("<QQ", b, 512, xstate_bv, xcomp_bv)
    for off, data in patch:
        b[off:off + len(data)] = data
    return bytes(b)
