"""The CPU model against this CPU: the same programs on both, byte for byte.

`fpstate.x86.insn.run_program` returns the set of outcomes the architecture (and this CPU's
implementation-defined choices, `fpstate.x86.impl`) allows; `fpstate.host.runner.run_program`
runs the program for real. Every test asserts the real outcome is in the model's set:
buffers, values read, the fault and its step, XINUSE and the final registers.

- `test_random_programs` and `test_xsave_variant` run 2,100 hypothesis programs (fixed seed:
  ``derandomize=True``) over every user component of this CPU's XCR0 and every user-mode XSAVE
  variant, with valid and broken images, misaligned buffers and random request masks;
- `test_implementation_choice` names every implementation-defined choice: the host agrees
  with the model under the recorded choice and disagrees under the other one.

A host outcome the model does not allow is run again before a test fails (`check`): the host
is not deterministic, a model error is.
"""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings

from fpstate.errors import HostUnavailable
from fpstate.host import native
from fpstate.x86 import impl as I
from fpstate.x86.program import Buffer, Insn, Outcome, Program

pytestmark = pytest.mark.host

if not native.is_x86_64():
    pytest.skip("the host is not x86-64", allow_module_level=True)

from fpstate.host.runner import host_lacks, host_xsave  # noqa: E402
from fpstate.host.runner import run_program as host_run  # noqa: E402
from fpstate.x86.cpu import UnknownPointers, machine  # noqa: E402
from fpstate.x86.insn import default_xcr0  # noqa: E402
from fpstate.x86.insn import run_program as model_run  # noqa: E402
from fpstate.x86.profiles import load_profile  # noqa: E402

try:
    host_xsave()
except HostUnavailable as e:  # pragma: no cover - a CPU without OS-enabled XSAVE
    pytest.skip(str(e), allow_module_level=True)


def _strategies():  # tests/x86/strategies.py, by path (pytest runs in importlib mode)
    import importlib.util
    import pathlib
    import sys

    if "x86_strategies" not in sys.modules:
        path = pathlib.Path(__file__).with_name("strategies.py")
        spec = importlib.util.spec_from_file_location("x86_strategies", path)
        assert spec and spec.loader
        sys.modules["x86_strategies"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["x86_strategies"]


image, programs = _strategies().image, _strategies().programs

PROFILE = load_profile("host")
IMPL = I.for_profile(PROFILE)
RANDOM_CASES = 1200
VARIANT_CASES = 150
VARIANTS = ("XSAVE", "XSAVEOPT", "XSAVEC", "XRSTOR", "FXSAVE", "FXRSTOR", "FXSAVE32",
            "FXRSTOR32", "XSAVE32", "XRSTOR32")


def _settings(examples: int) -> settings:
    return settings(max_examples=examples, derandomize=True, deadline=None, database=None,
                    print_blob=True, suppress_health_check=[HealthCheck.too_slow,
                                                            HealthCheck.data_too_large])


def describe(program: Program, host: Outcome, model: list[Outcome]) -> str:
    lines = [f"host: fault {host.fault} at {host.fault_step}, values "
             f"{[hex(v) for v in host.values]}, xinuse {host.xinuse}",
             "program: " + "; ".join(str(i) for i in program.insns),
             f"buffers: {[(len(b.data), b.misalign) for b in program.buffers]}"]
    for o in model[:4]:
        lines.append(f"model outcome differs: {o.differences(host)}")
    return "\n".join(lines)


#: Host runs of a program whose outcome the model does not allow, before the test fails.
HOST_TRIES = 3


def check(program: Program) -> None:
    """The host's outcome is one the model allows. One outside the set is run again (up to
    `HOST_TRIES` runs in all): the host is not deterministic -- a preemption anywhere below
    this nested VM (its vCPU descheduled by the hypervisor) makes an XSAVES/XRSTORS the
    program cannot see, which re-derives XINUSE (host-findings.md, "Sources of
    nondeterminism"); once in several CI runs XSAVE; FXRSTOR; XSAVE found XINUSE 1 for the
    model's 3 and never again. A model error reproduces on every run."""
    models: dict[object, list[Outcome]] = {}
    for _ in range(HOST_TRIES):
        host = host_run(program)
        model = models.get(host.placement)  # where the host ran it: an FLD's x87 pointers
        if model is None:
            model = models[host.placement] = model_run(PROFILE, program,
                                                       placement=host.placement)
        if any(o.key() == host.key() for o in model):
            return
    raise AssertionError(describe(program, host, model))


@_settings(RANDOM_CASES)
@given(programs(PROFILE, placed=True))
def test_random_programs(program: Program) -> None:
    check(program)


@pytest.mark.parametrize("variant", VARIANTS)
def test_xsave_variant(variant: str) -> None:
    """Programs with at least one ``variant`` instruction among the others."""
    reason = host_lacks(variant)
    if reason:
        pytest.skip(reason)

    @_settings(VARIANT_CASES)
    @given(programs(PROFILE, focus=variant, placed=True))
    def run(program: Program) -> None:
        check(program)

    run()


@pytest.mark.parametrize("focus", ["FLD", "FLD1", "FLDZ", "FNCLEX"])
def test_x87_programs(focus: str) -> None:
    """Programs with an x87 push or FNCLEX among the others: the host runs them first and the
    model, told where each instruction ran, must give the same x87 pointers (FIP, FDP, FOP)
    with the rest."""

    @_settings(100)
    @given(programs(PROFILE, focus=focus, placed=True))
    def run(program: Program) -> None:
        check(program)

    run()


def test_at_least_2000_cases() -> None:
    assert RANDOM_CASES + VARIANT_CASES * len(VARIANTS) >= 2000


@pytest.mark.parametrize("focus", ["WRPKRU", "LDTILECFG", "TILESTORED"])
def test_feature_programs(focus: str) -> None:
    """PKRU and AMX state against the host, where the host has them."""
    reason = host_lacks(focus)
    if reason:
        pytest.skip(reason)

    @_settings(100)
    @given(programs(PROFILE, focus=focus, placed=True))
    def run(program: Program) -> None:
        check(program)

    run()


# --- implementation-defined choices, each named and discriminated -------------------------

_AA = Buffer(bytes([0xAA]) * 4096)
_ZMM_H = [(0x380, b"\x11")] if PROFILE.vendor == "amd" else []
_STD_AVX = PROFILE.component(2).offset
#: The AVX and AVX-512 components of this CPU's XCR0 (0xE7 with AVX-512, 0x7 without).
_VEC = default_xcr0(PROFILE) & 0xE7
#: The modified optimisation's witness: a component that XSAVEC of it alone writes at 576,
#: where XSAVEOPT writes unmodified AVX state or not (Hi16_ZMM, else PKRU with key 0's rights
#: kept: fpstate.x86.progen), and two values of it.
_MARK, _MARK_START, _MARK_BUF = ((7, b"\x55" * 8, b"\x77" * 8) if _VEC & 0x80 else
                                 (9, b"\x54\x55\x55\x55", b"\x5c\x77\x77\x77"))
_MARK_AT = PROFILE.component(_MARK).offset if default_xcr0(PROFILE) >> _MARK & 1 else 0


def _legacy32(fsw: int, ftw: int = 0) -> bytes:
    """A legacy area for FXRSTOR32: FCW 0x37E (IM clear), ``fsw``, ``ftw``, FOP 0x123, FIP
    0x1111 in CS 0x23, FDP 0x2222 in DS 0x2B (SDM Vol. 1 Table 10-2), MXCSR 0x1F80."""
    out = bytearray(512)
    struct.pack_into("<HHBBHIHHIHH", out, 0, 0x37E, fsw, ftw, 0, 0x123, 0x1111, 0x23, 0,
                     0x2222, 0x2B, 0)
    struct.pack_into("<I", out, 24, 0x1F80)
    return bytes(out)


def _other(key: str, one: object, two: object) -> object:
    """Of two values of choice ``key``, the one this CPU's record does not give."""
    return two if IMPL[key] == one else one


#: choice -> (the other value, a program whose host outcome tells the two apart)
CHOICE_PROGRAMS: dict[str, tuple[object, Program]] = {
    I.XRSTOR_INIT_XINUSE: ("in-use", Program(image(0), (Insn("XGETBV", reg=1),))),
    I.XRSTOR_LOAD_XINUSE: (_other(I.XRSTOR_LOAD_XINUSE, "set", "value"),
                           Program(image(_VEC), (Insn("XGETBV", reg=1),))),
    # x87 following its value or not (bit 0 of the mask)
    I.WRITE_XINUSE: (IMPL[I.WRITE_XINUSE] ^ 1, Program(image(0), (Insn("FLDCW", value=0x27F),
                                           Insn("FLDCW", value=0x37F),
                                           Insn("XGETBV", reg=1)))),
    I.ZEROING_CLEARS_XINUSE: (False, Program(image(0), (
        Insn("VMOVDQU", reg=1, data=bytes(range(32))), Insn("VZEROUPPER"),
        Insn("XGETBV", reg=1)))),
    I.MODIFIED_OPTIMIZATION: (False, Program(
        image(1 << _MARK, patch=[(_MARK_AT, _MARK_START)]), (
            Insn("XRSTOR", buf=0, mask=_VEC | 1 << _MARK),
            Insn("XSAVEC", buf=0, mask=1 << _MARK),
            Insn("XSAVEOPT", buf=0, mask=_VEC | 1 << _MARK)),
        (Buffer(image(_VEC | 1 << _MARK, patch=[(_STD_AVX, b"\x22" * 16),
                                                  (_MARK_AT, _MARK_BUF)])),))),
    I.X87_POINTERS: (_other(I.X87_POINTERS, "always", "when-es"),
                     Program(image(1, fop=0x123, fip=0x1111, fdp=0x2222, fsw=0x4000),
                             (Insn("XSAVE", buf=0, mask=1),), (_AA,))),
    I.FSW_SUMMARY_ON_LOAD: ("loaded", Program(image(1, fsw=0x8081), (Insn("FNSTSW"),))),
    I.FCW_RESERVED: ((0xFFFF, 0), Program(image(0), (Insn("FLDCW", value=0xFFFF),
                                                      Insn("FNSTCW")))),
    # (FNINIT last: where saves write FIP/FDP always, those of the FLD are unknown to a model)
    I.FLD_UNDEFINED_FLAGS: ("cleared", Program(image(1, fsw=0x4500), (
        Insn("FLD", data=bytes(10)), Insn("FNSTSW"), Insn("FNINIT")))),
    I.MXCSR_MASK: (_other(I.MXCSR_MASK, 0xFFFF, 0x2FFFF),
                   Program(image(0), (Insn("LDMXCSR", value=0x21F80), Insn("STMXCSR")))),
    I.COMPACTED_XSTATE_BV63: (_other(I.COMPACTED_XSTATE_BV63, "gp", "allowed"), Program(image(0), (
        Insn("XRSTOR", buf=0, mask=_VEC),),
        (Buffer(image(1 << 63, xcomp_bv=1 << 63 | _VEC)),))),
    I.FXSAVE_RESERVED: ("zeroed", Program(image(0), (Insn("FXSAVE", buf=0),), (_AA,))),
    I.X87_POINTER_BITS: (64 if IMPL[I.X87_POINTER_BITS] != 64 else 57,
                         Program(image(1, fcw=0x37E, fsw=1, fip=1 << 56),
                                 (Insn("XSAVE", buf=0, mask=1),), (_AA,))),
    I.X87_FDP_BITS: (64 if IMPL[I.X87_FDP_BITS] != 64 else 57,
                     Program(image(1, fcw=0x37E, fsw=1, fdp=1 << 57),
                             (Insn("XSAVE", buf=0, mask=1),), (_AA,))),
    I.LEGACY_SSE_UPPER: (not IMPL[I.LEGACY_SSE_UPPER], Program(image(0x40, patch=_ZMM_H), (
        Insn("MOVDQU", reg=4, data=bytes(16)), Insn("XGETBV", reg=1)))),
    I.RESTORE_ZMM_XINUSE: ("kept" if IMPL[I.RESTORE_ZMM_XINUSE] == "value" else "value",
                           Program(image(0), (
                               Insn("VMOVDQU", reg=1, data=b"\x33" * 16 + bytes(16)),
                               Insn("XRSTOR", buf=0, mask=0x2), Insn("XGETBV", reg=1)),
                               (Buffer(image(0)),))),
    I.VEX256_HI256_XINUSE: (
        "kept" if IMPL[I.VEX256_HI256_XINUSE] == "per-register" else "per-register",
        Program(image(0), (Insn("VMOVDQU64", reg=11, data=bytes(range(1, 65))),
                           Insn("VMOVDQU", reg=11, data=bytes(32)), Insn("XGETBV", reg=1)))),
    I.LEGACY_SSE_KEEPS_AVX: (not IMPL[I.LEGACY_SSE_KEEPS_AVX], Program(image(0), (
        Insn("VMOVDQU", reg=4, data=bytes(32)), Insn("MOVDQU", reg=10, data=bytes(16)),
        Insn("FXRSTOR", buf=0), Insn("XGETBV", reg=1)), (Buffer(image(0)),))),
    I.VEX_XINUSE_RECOMPUTED: (_other(I.VEX_XINUSE_RECOMPUTED, "recomputed", "kept"), Program(
        image(0), (Insn("VMOVDQU", reg=10, data=bytes(32)), Insn("XRSTOR", buf=0, mask=0x4),
                   Insn("XGETBV", reg=1)), (Buffer(image(0x4)),))),
    I.LDMXCSR_XINUSE: (_other(I.LDMXCSR_XINUSE, "set", "kept"), Program(
        image(0), (Insn("LDMXCSR", value=0x3FA0), Insn("XGETBV", reg=1)))),
    I.EMMS_TOP: ("kept" if IMPL[I.EMMS_TOP] == "zeroed" else "zeroed",
                 Program(image(1, fsw=0x2800, ftw=0x20), (Insn("EMMS"), Insn("FNSTSW")))),
    # the start image's FOP kept, or the FLD's (DB /5: 0x3AB) written, by an FLD without an
    # exception (saves show FOP only with FSW.ES set where X87_POINTERS is "when-es")
    I.FNCLEX_UNDEFINED_FLAGS: ("cleared", Program(image(1, fsw=0x477F), (
        Insn("FNCLEX"), Insn("FNSTSW")))),
    # Where saves show FOP only with FSW.ES set (AMD), FSW.IE is set and masked in the start
    # image, and an FLDCW that unmasks it after the FLD sets FSW.ES without writing FOP.
    I.FOP_UPDATE: (_other(I.FOP_UPDATE, "always", "unmasked"),
                   Program(image(1, fop=0x123), (Insn("FLD", data=bytes(10)),
                                                 Insn("XSAVE", buf=0, mask=1)), (_AA,))
                   if IMPL[I.X87_POINTERS] == "always" else
                   Program(image(1, fop=0x123, fsw=0x0001), (
                       Insn("FLD", data=bytes(10)), Insn("FLDCW", value=0x37E),
                       Insn("XSAVE", buf=0, mask=1)), (_AA,))),
    # FCS 0x23 and FDS 0x2B loaded by an FXRSTOR32 with an exception pending, then a 64-bit
    # restore of x87 state: the 32-bit save shows what it left in the selectors
    I.X87_SELECTORS_LOAD64: (_other(I.X87_SELECTORS_LOAD64, "zeroed", "kept"), Program(
        image(0), (Insn("FXRSTOR32", buf=1), Insn("XRSTOR", buf=2, mask=1),
                   Insn("FXSAVE32", buf=0)),
        (_AA, Buffer(_legacy32(fsw=0x8081)), Buffer(image(1, fcw=0x37E, fsw=0x8081,
                                                           fip=0x4444, fdp=0x5555))))),
    # the same FXRSTOR32 (FDP 0x2222, FDS 0x2B) with all tags valid, FNCLEX, then FLD1 onto
    # the full stack with FCW.IM clear: an unmasked overflow whose save shows FDP and FDS
    I.X87_NO_OPERAND_FDP: (_other(I.X87_NO_OPERAND_FDP, "kept", "undefined"), Program(
        image(0), (Insn("FXRSTOR32", buf=1), Insn("FNCLEX"), Insn("FLD1"),
                   Insn("FXSAVE32", buf=0)), (_AA, Buffer(_legacy32(fsw=0x8081, ftw=0xFF))))),
}


def _x87_pointers(buf: bytes) -> tuple[int, int, int]:
    fop, fip, fdp = struct.unpack_from("<HQQ", buf, 6)
    return fop, fip, fdp


def test_an_fld_leaves_its_address_in_fip_on_this_cpu() -> None:
    """SDM Vol. 1 8.1.8-8.1.9, on this CPU: after FLD; FNSTSW; FLDCW; EMMS the save shows the
    FLD's own address (where the runner put it) as FIP; FDP and FOP are the start image's
    where the CPU enumerates FDP_EXCPTN_ONLY and keeps FOP (FOP_UPDATE "unmasked"), else the
    FLD's; with FCW.IM clear and a full stack the FLD's unmasked exception writes both. The
    model, told the placement, gives the same bytes."""
    if IMPL[I.X87_POINTERS] == "when-es":
        pytest.skip("this CPU saves x87 pointers only with FSW.ES set")
    prog = Program(image(1, fop=0x123, fip=0x1111, fdp=0x2222),
                   (Insn("FLD", data=bytes(10)), Insn("FNSTSW"), Insn("FLDCW", value=0x37F),
                    Insn("EMMS"), Insn("XSAVE", buf=0, mask=1)), (_AA,))
    host = host_run(prog)
    at = host.placement[0]
    assert at.fop == 0x3AB  # FLD m80fp [rbx+disp32]: DB /5, ModRM 0xAB
    kept_fdp = machine(PROFILE).has("FDP_EXCPTN_ONLY")
    assert _x87_pointers(host.buffers[0]) == (
        0x123 if IMPL[I.FOP_UPDATE] == "unmasked" else at.fop, at.address,
        0x2222 if kept_fdp else at.operand)
    check(prog)
    full = Program(image(1, fcw=0x37E, ftw=0xFF), (Insn("FLD", data=bytes(10)),
                                                   Insn("XSAVE", buf=0, mask=1)), (_AA,))
    host = host_run(full)
    at = host.placement[0]
    assert _x87_pointers(host.buffers[0]) == (at.fop, at.address, at.operand)
    check(full)


@pytest.mark.parametrize("init", ["FNINIT", "XRSTOR32", "XRSTOR"])
def test_x87_initialisation_zeroes_fcs_and_fds_on_this_cpu(init: str) -> None:
    """Where FCS and FDS are not deprecated: an FXRSTOR32 loads FDS 0x2B; FNINIT, or an XRSTOR
    (with or without REX.W) that puts x87 in its initial configuration (XSTATE_BV[0] = 0),
    zeroes FDS (SDM Vol. 1 13.6; FINIT "FPUDataPointer <- 0"), which nine FLD1 -- they keep
    FDS, X87_NO_OPERAND_FDP -- leave for the 32-bit save after an FLDCW sets FSW.ES; FCS is
    the FLD1's CS. The model, told the placement, gives the same bytes."""
    if machine(PROFILE).has("ZERO_FCS_FDS"):
        pytest.skip("moot on this CPU: it deprecates FCS and FDS, every save stores 0000H")
    if IMPL[I.X87_NO_OPERAND_FDP] != "kept":
        pytest.skip("FLD1 leaves FDP undefined on this CPU (X87_NO_OPERAND_FDP)")
    prog = Program(image(0), (
        Insn("FXRSTOR32", buf=1), Insn("FNINIT") if init == "FNINIT" else Insn(init, buf=2, mask=1),
        *[Insn("FLD1")] * 9, Insn("FLDCW", value=0x37E), Insn("FXSAVE32", buf=0)),
        (_AA, Buffer(_legacy32(fsw=0x8081, ftw=0xFF)), Buffer(image(0))))
    host = host_run(prog)
    fip, fcs, fdp, fds = struct.unpack_from("<IHxxIHxx", host.buffers[0], 8)
    assert (fip, fcs, fdp, fds) == (host.placement[10].address & 0xFFFFFFFF,
                                    host.placement[10].cs, 0, 0)
    check(prog)


@pytest.mark.parametrize("restore", ["XRSTOR", "FXRSTOR"])
def test_a_restore_loads_the_x87_pointers_without_a_pending_exception(restore: str) -> None:
    """arch/x86/kernel/cpu/amd.c sets X86_BUG_FXSAVE_LEAK on an AMD CPU that does not enumerate
    XSAVEERPTR (CPUID 0x80000008:EBX[2]): there a restore of an image without a pending
    exception would leave the previous task's FIP, FDP and FOP, so the kernel scrubs them
    before it (FNCLEX, EMMS, FILD). Where the bug is not set the restore must load them: after
    an FLD, an XRSTOR64 (or FXRSTOR64) of FOP 0x123, FIP 0x1111, FDP 0x2222 with FSW.IE set but
    masked, then an FLDCW that unmasks it (FSW.ES := 1), the save shows the image's pointers,
    not the FLD's -- on this CPU and in the model."""
    if PROFILE.vendor == "amd" and not native.cpuid(0x80000008)[1] >> 2 & 1:
        pytest.skip("this CPU lacks XSAVEERPTR: the kernel sets X86_BUG_FXSAVE_LEAK here")
    load = Insn("XRSTOR", buf=1, mask=1) if restore == "XRSTOR" else Insn("FXRSTOR", buf=1)
    prog = Program(image(0), (Insn("FLD", data=bytes(10)), load, Insn("FLDCW", value=0x37E),
                              Insn("XSAVE", buf=0, mask=1)),
                   (_AA, Buffer(image(1, fop=0x123, fip=0x1111, fdp=0x2222, fsw=0x0001))))
    host = host_run(prog)
    assert _x87_pointers(host.buffers[0]) == (0x123, 0x1111, 0x2222)
    check(prog)


def test_every_choice_has_a_program() -> None:
    assert set(CHOICE_PROGRAMS) == set(I.CHOICES)


def test_a_model_error_is_not_retried_away(monkeypatch: pytest.MonkeyPatch) -> None:
    """`check` runs the host again on a disagreement, but fails when every run disagrees: a
    model whose XINUSE is off by one bit fails after HOST_TRIES host runs."""
    program = Program(image(0x3), (Insn("XGETBV", reg=1),))
    check(program)  # the real model agrees
    runs = []
    real_host, real_model = host_run, model_run

    def counted(p: Program) -> Outcome:
        runs.append(p)
        return real_host(p)

    def wrong(profile: object, p: Program, **kw: object) -> list[Outcome]:
        return [replace(o, xinuse=(o.xinuse or 0) ^ 1) for o in real_model(profile, p, **kw)]

    monkeypatch.setitem(globals(), "host_run", counted)
    monkeypatch.setitem(globals(), "model_run", wrong)
    with pytest.raises(AssertionError, match="xinuse"):
        check(program)
    assert len(runs) == HOST_TRIES


@pytest.mark.parametrize("key", sorted(CHOICE_PROGRAMS))
def test_implementation_choice(key: str) -> None:
    """The host behaves as ``IMPL[key]`` says and not as the other value would (in a run
    without preemption: a preemption re-derives XINUSE, which can blur the difference)."""
    other, program = CHOICE_PROGRAMS[key]
    for needed in {i.mnemonic for i in program.insns}:
        reason = host_lacks(needed)
        if reason:
            pytest.skip(reason)
    # The images it restores: the start image and the buffers of its XRSTORs.
    images = [program.start, *(program.buffers[i.buf].data for i in program.insns
                               if i.mnemonic == "XRSTOR")]
    missing = 0
    for d in images:
        missing |= int.from_bytes(d[512:520], "little") & ~default_xcr0(PROFILE) & ~(1 << 63)
    if missing or (key == I.MODIFIED_OPTIMIZATION and not _MARK_AT):
        pytest.skip(f"the program needs components {missing:#x} this CPU's XCR0 "
                    f"{default_xcr0(PROFILE):#x} lacks (or neither Hi16_ZMM nor PKRU)")
    if key == I.LEGACY_SSE_KEEPS_AVX and IMPL[I.RESTORE_ZMM_XINUSE] == "kept":
        pytest.skip("moot on this CPU: with RESTORE_ZMM_XINUSE 'kept' no restore recomputes "
                    "XINUSE[2], so keeping it set cannot show")
    if key == I.VEX_XINUSE_RECOMPUTED and IMPL[I.RESTORE_ZMM_XINUSE] == "value":
        pytest.skip("moot on this CPU: with RESTORE_ZMM_XINUSE 'value' every restore that "
                    "touches ZMM0-15 recomputes XINUSE[1], [2], [6] anyway")
    if key == I.X87_SELECTORS_LOAD64 and machine(PROFILE).has("ZERO_FCS_FDS"):
        pytest.skip("moot on this CPU: it deprecates FCS and FDS, every save stores 0000H")
    if key == I.X87_NO_OPERAND_FDP and machine(PROFILE).has("FDP_EXCPTN_ONLY"):
        pytest.skip("moot on this CPU: with FDP_EXCPTN_ONLY only an unmasked exception of an "
                    "instruction with a memory operand writes FDP")
    alternative = IMPL.with_choice(key, other)
    seen = []
    for _ in range(5):  # a preemption can make one run ambiguous (see insn.preemptions)
        host = host_run(program)
        ours = model_run(PROFILE, program, impl=IMPL, placement=host.placement)
        assert any(o.key() == host.key() for o in ours), describe(program, host, ours)
        try:
            theirs = model_run(PROFILE, program, impl=alternative, preempt=False,
                               placement=host.placement)
        except UnknownPointers:  # "undefined": the alternative claims nothing it shows
            theirs = []
        seen.append(all(o.key() != host.key() for o in theirs))
        if seen[-1]:
            return
    pytest.fail(f"{key}={other!r} explains the host's outcome as well as {IMPL[key]!r}")
