"""Protection keys on the XSAVE family's memory operand (SDM Vol. 3A 4.6.2): a buffer with key
k (`fpstate.x86.program.Buffer.pkey`) under a PKRU whose ADk denies every access and WDk every
write. The model's answers are stated here for a bundled Zen 3 (PKU) and asked of this CPU
where it has PKU: the runner gives the buffer's pages the key with pkey_mprotect."""

from __future__ import annotations

import struct

import pytest

from fpstate.errors import HostUnavailable, ProgramError
from fpstate.host import native
from fpstate.x86.insn import run_program
from fpstate.x86.profiles import load_profile
from fpstate.x86.program import Buffer, Insn, Program, check_program

ZEN3 = load_profile("zen3")
_START = bytearray(576 + 2048)
struct.pack_into("<I", _START, 24, 0x1F80)
START = bytes(_START)
BAD_HEADER = b"\x11" * 600  # a reserved header byte set: XRSTOR's #GP, FXRSTOR's MXCSR #GP
AD1, WD1 = 0b01 << 2, 0b10 << 2

#: (name, buffer key, PKRU, instruction, misalignment, (vector, step) or None)
CASES = [
    ("xsave-under-wd", 1, WD1, Insn("XSAVE", buf=0, mask=3), 0, ("#PF", 1)),
    ("xsave-under-ad", 1, AD1, Insn("XSAVE", buf=0, mask=3), 0, ("#PF", 1)),
    ("xsavec-key3-wd", 3, WD1 << 4, Insn("XSAVEC", buf=0, mask=3), 0, ("#PF", 1)),
    ("fxsave-under-wd", 1, WD1, Insn("FXSAVE", buf=0), 0, ("#PF", 1)),
    # A read under WD is allowed: the header is read, and its reserved byte is the #GP.
    ("xrstor-under-wd-reads", 1, WD1, Insn("XRSTOR", buf=0, mask=3), 0, ("#GP", 1)),
    # Under AD the read itself faults first: #PF, not the header's #GP.
    ("xrstor-under-ad", 1, AD1, Insn("XRSTOR", buf=0, mask=3), 0, ("#PF", 1)),
    ("fxrstor-under-ad", 2, AD1 << 2, Insn("FXRSTOR", buf=0), 0, ("#PF", 1)),
    ("fxrstor-other-key-denied", 2, AD1, Insn("FXRSTOR", buf=0), 0, ("#GP", 1)),
    # Alignment is checked before the access: the #GP wins over the key.
    ("misaligned-xsave-under-ad", 1, AD1, Insn("XSAVE", buf=0, mask=3), 8, ("#GP", 1)),
    ("xsave-open-key", 1, 0, Insn("XSAVE", buf=0, mask=3), 0, None),
]


def program(key: int, pkru: int, insn: Insn, misalign: int) -> Program:
    return Program(START, (Insn("WRPKRU", value=pkru), insn),
                   (Buffer(BAD_HEADER, misalign, key), Buffer(b"\x22" * 64)))


@pytest.mark.parametrize(("name", "key", "pkru", "insn", "misalign", "want"), CASES,
                         ids=[c[0] for c in CASES])
def test_model_answers(name: str, key: int, pkru: int, insn: Insn, misalign: int,
                       want: tuple[str, int] | None) -> None:
    outs = run_program(ZEN3, program(key, pkru, insn, misalign))
    got = {(o.fault.vector, o.fault_step) if o.fault else None for o in outs}
    assert got == {want}, name
    if want and want[0] == "#PF":  # nothing was written before the fault
        assert all(o.buffers[0][:600] == BAD_HEADER for o in outs)


def test_keyed_buffers_are_cpl3_pages_with_keys_1_to_3() -> None:
    with pytest.raises(ProgramError, match=r"protection key 4 outside 0\.\.3"):
        check_program(Program(START, (), (Buffer(pkey=4),)))
    with pytest.raises(ProgramError, match="protection key 1 at CPL 0"):
        check_program(Program(START, (), (Buffer(pkey=1),), cpl=0))


def _host_pku() -> str | None:
    if not native.is_x86_64():
        return "the host is not x86-64"
    from fpstate.kernel.x86.conform import host_pku_reason

    return host_pku_reason()


@pytest.mark.host
@pytest.mark.parametrize(("name", "key", "pkru", "insn", "misalign", "want"), CASES,
                         ids=[c[0] for c in CASES])
def test_this_cpu_agrees(name: str, key: int, pkru: int, insn: Insn, misalign: int,
                         want: tuple[str, int] | None) -> None:
    reason = _host_pku()
    if reason:
        pytest.skip(reason)
    from fpstate.host.runner import run_program as host_run

    prog = program(key, pkru, insn, misalign)
    real = host_run(prog)
    assert ((real.fault.vector, real.fault_step) if real.fault else None) == want, name
    if want and want[0] == "#PF":  # the kernel's SIGSEGV says SEGV_PKUERR, trap 14
        assert "si_code=0x4 trapno=14" in real.fault.reason
    model = run_program(load_profile("host"), prog)
    assert real.key() in {o.key() for o in model}


@pytest.mark.host
def test_the_test_guest_refuses_keyed_buffers() -> None:
    """The KVM test guest's pages all have key 0 and it leaves CR4.PKE clear."""
    if not native.is_x86_64():
        pytest.skip("the host is not x86-64")
    from fpstate.host.kvm_guest import run_guest_program
    from fpstate.kernel.x86.conform import host_kvm_reason

    reason = host_kvm_reason()
    if reason:
        pytest.skip(reason)
    with pytest.raises(HostUnavailable, match="buf0 has a protection key"):
        run_guest_program(Program(START, (), (Buffer(pkey=1),)), xcr0=0x7)


@pytest.mark.host
def test_every_runner_and_spawn_mode_shares_the_process_keys() -> None:
    """The keys are allocated once per process: a second runner, and one that forks rather
    than vforks (the child inherits the allocation with the mm), use the same key 1."""
    reason = _host_pku()
    if reason:
        pytest.skip(reason)
    from fpstate.host.runner import Runner

    prog = program(1, WD1, Insn("XSAVE", buf=0, mask=3), 0)
    for spawn in ("vfork", "fork", "vfork"):
        real = Runner(spawn).run(prog)
        assert real.fault is not None and real.fault.vector == "#PF", spawn
        assert "si_code=0x4 trapno=14" in real.fault.reason
