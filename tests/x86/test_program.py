"""The program contract (`fpstate.x86.program.check_program`) and the JSON form of programs that
``fpstate conform --json`` prints: a malformed program is one ProgramError naming the
instruction and the problem (issue 2 item 10), never a KeyError or a model crash."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fpstate.commands.conform import program_from_json, program_to_json
from fpstate.errors import ProgramError
from fpstate.x86.profiles import load_profile
from fpstate.x86.progen import RandomDraw, generate_program
from fpstate.x86.program import (
    BUFFER_SIZE,
    MAX_BUFFERS,
    MNEMONICS,
    Buffer,
    Insn,
    Program,
    check_program,
)

START = bytes(576)


@pytest.mark.parametrize(("program", "message"), [
    (Program(START, (Insn("XSAVE", buf=0),)), "instruction 0 (XSAVE): buffer 0 does not exist"),
    (Program(START, (Insn("TILESTORED", buf=0, reg=8),), (Buffer(),)),
     "instruction 0 (TILESTORED): register 8 outside 0..7"),
    (Program(START, (Insn("TILESTORED", reg=0),), (Buffer(),)),
     "instruction 0 (TILESTORED): buffer -1 does not exist"),
    (Program(START, (Insn("FXSAVE", buf=0), Insn("XSAVEZ"),), (Buffer(),)),
     "instruction 1 (XSAVEZ): unknown mnemonic; known: EMMS, FLD,"),
    (Program(START, (Insn("VMOVDQU", reg=1, data=bytes(16)),)),
     "instruction 0 (VMOVDQU): 16 bytes of data, 32 needed"),
    (Program(START, (Insn("VMOVDQU64", reg=32, data=bytes(64)),)),
     "instruction 0 (VMOVDQU64): register 32 outside 0..31"),
    (Program(START, (Insn("XRSTOR", buf=0, mask=1 << 64),), (Buffer(),)),
     "instruction 0 (XRSTOR): mask and value must be 64-bit unsigned"),
    (Program(START, (Insn("WRPKRU", value=-1),)),
     "instruction 0 (WRPKRU): mask and value must be 64-bit unsigned"),
    (Program(START, (), (Buffer(misalign=64),)), "buf0: misalign 64 outside 0..63"),
    (Program(START, (), (Buffer(bytes(BUFFER_SIZE)),)), "buf0: 12288 bytes of data; at most"),
    (Program(START, (), (Buffer(),) * (MAX_BUFFERS + 1)), "9 buffers; at most 8"),
    (Program(bytes(575), ()), "start image is 575 bytes; at least 576 needed"),
    (Program(START, (), cpl=1), "cpl 1: only 0 and 3"),
])
def test_check_program_names_the_problem(program: Program, message: str) -> None:
    with pytest.raises(ProgramError) as e:
        check_program(program)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_tilestored_is_in_the_contract() -> None:
    assert "TILESTORED" in MNEMONICS
    check_program(Program(START, (Insn("TILESTORED", buf=0, reg=7),), (Buffer(),)))
    assert str(Insn("TILESTORED", buf=1, reg=3)) == "TILESTORED [buf1], tmm3"


def test_json_round_trip_of_generated_programs() -> None:
    zen5 = load_profile("zen5")
    for seed in range(30):
        program = generate_program(RandomDraw(seed), zen5)
        assert program_from_json(json.loads(json.dumps(program_to_json(program)))) == program


@pytest.mark.parametrize(("edit", "message"), [
    (lambda o: o.pop("start"), "missing or malformed field 'start'"),
    (lambda o: o.update(start="zz"), "start is not a hex string"),
    (lambda o: o["insns"][0].update(mask="0x7"), "insns[0].mask '0x7' is not an integer"),
    (lambda o: o["insns"][0].update(mnemonic="NOPE"), "instruction 0 (NOPE): unknown mnemonic"),
    (lambda o: o.update(insns=[1]), "missing or malformed field"),
    (lambda o: o.update(cpl=True), "cpl True is not an integer"),
    (lambda o: o["buffers"][0].update(pkey="1"), "buffers[0].pkey '1' is not an integer"),
    (lambda o: o["buffers"][0].update(pkey=9), "buf0: protection key 9 outside 0..3"),
])
def test_program_json_errors(edit, message: str) -> None:
    obj = program_to_json(Program(START, (Insn("XSAVE", buf=0, mask=7),), (Buffer(),)))
    edit(obj)
    with pytest.raises(ProgramError) as e:
        program_from_json(obj)
    assert message in str(e.value), str(e.value)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                               max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["start", "insns", "buffers", "cpl", "mnemonic", "data", "misalign",
                        "pkey"]), _JSON)
def test_program_json_fuzz(key: str, value: object) -> None:
    obj = program_to_json(Program(START, (Insn("XSAVE", buf=0, mask=7),), (Buffer(),)))
    if key in ("mnemonic", "data"):
        obj["insns"][0][key] = value
    elif key in ("misalign", "pkey"):
        obj["buffers"][0][key] = value
    else:
        obj[key] = value
    try:
        program_from_json(obj)
    except ProgramError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(MNEMONICS)), st.integers(-2, 9), st.integers(-1, 2**65),
       st.integers(-1, 40), st.integers(-1, 2**65), st.binary(max_size=80))
def test_check_program_fuzz(mnemonic: str, buf: int, mask: int, reg: int, value: int,
                            data: bytes) -> None:
    """Any operands: accepted, or one ProgramError."""
    try:
        check_program(Program(START, (Insn(mnemonic, buf, mask, reg, value, data),),
                              (Buffer(), Buffer())))
    except ProgramError as e:
        assert "\n" not in str(e)
