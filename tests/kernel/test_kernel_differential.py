"""The x86 FPU core model against this machine's kernel (the kernel layer of fpstate conform).

Every case of `fpstate.kernel.x86.conform.kernel_cases()` runs here: the host answers through
forked probes, the model replays the same inputs, and the facts must agree field by field.
Cases the host cannot answer skip with the reason the layer gives (AMX on this AMD host).
The AMX cases' model side is checked on the bundled Sapphire Rapids profile against the
kernel's numbers, and the ptrace set path is fuzzed with hypothesis against the real kernel.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fpstate.errors import FpstateError, HostUnavailable
from fpstate.host import native
from fpstate.kernel.x86 import conform, conform_process, conform_ptrace, conform_signal
from fpstate.kernel.x86.conform import (
    Case,
    HostAnswer,
    compare,
    kernel_cases,
    run_case,
    run_kernel_layer,
    show,
)
from fpstate.kernel.x86.sched import Machine
from fpstate.kernel.x86.types import FpuSystem
from fpstate.kernel.x86.xstate import fpu__init_system_xstate
from fpstate.x86 import layout
from fpstate.x86.profiles import load_profile
from fpstate.x86.xfeatures import feature, mask_names

CASES = kernel_cases()
_not_x86 = pytest.mark.skipif(not native.is_x86_64(), reason="the host is not x86-64")


def x86_only(fn: Any) -> Any:
    """Runs on this machine's kernel: marked ``host`` and skipped off x86-64."""
    return pytest.mark.host(_not_x86(fn))


def _mismatch_text(result: conform.CaseResult) -> str:
    return "\n".join(f"  {m.field}: model {m.model} / real {m.real}" for m in result.mismatches)


# -- every case against the real kernel ----------------------------------------------------------

@x86_only
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_model_agrees_with_the_running_kernel(case: Case) -> None:
    result = run_case(case)
    if result.skipped:
        pytest.skip(result.skipped)
    assert result.compared > 0
    assert not result.mismatches, f"{case.name} ({case.rule}):\n{_mismatch_text(result)}"


def test_case_names_are_unique_and_cover_the_issue() -> None:
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    for prefix in ("boot/", "auxv/", "arch_prctl/", "sigaltstack/", "xfd/", "inherit/",
                   "exec/", "sigframe/", "sigreturn/", "ptrace/", "core/"):
        assert any(n.startswith(prefix) for n in names), prefix
    assert {"sigframe/amx-permitted", "sigframe/amx-tiles-in-use",
            "sigframe/amx-tiles-released", "xfd/sigill-without-permission",
            "inherit/amx-tiles-and-permission"} <= set(names)


# -- the report -----------------------------------------------------------------------------------

def test_compare_names_the_first_differing_byte() -> None:
    r = compare("c", {"a": 1, "b": bytes(16) + b"\x01", "only-model": 3},
                {"a": 1, "b": bytes(17), "only-real": 4})
    assert r.compared == 4
    fields = {m.field: m for m in r.mismatches}
    assert fields["b @byte 16"].model == "01" and fields["b @byte 16"].real == "00"
    assert fields["only-real"].model == "<absent>" and fields["only-model"].real == "<absent>"


def test_show_formats_values_as_the_report_prints_them() -> None:
    assert show(5) == "5" and show(0xE7) == "0xe7" and show(-22) == "-0x16"
    assert show(b"\x01\x02") == "0102" and show((1, 0x80)) == "(1, 0x80)"
    assert show(bytes(100)).endswith("(100 bytes)")


def test_host_unavailable_becomes_a_skip_with_the_reason() -> None:
    def host() -> HostAnswer:
        raise HostUnavailable("host lacks XYZ: CPUID bit 0")

    case = Case("t/unavailable", "none", host, lambda s, g: {})
    assert run_case(case).skipped == "host lacks XYZ: CPUID bit 0"
    needs = Case("t/needs", "none", host, lambda s, g: {}, lambda: "no reason to run")
    assert run_case(needs).skipped == "no reason to run"


def test_a_model_disagreement_is_reported_per_field() -> None:
    case = Case("t/diff", "none", lambda: HostAnswer({"errno": "EINVAL", "v": 7}),
                lambda s, g: {"errno": "EFAULT", "v": 7})
    r = run_case(case, system=_spr_system())
    assert [(m.field, m.model, m.real) for m in r.mismatches] == [("errno", "EFAULT", "EINVAL")]


@x86_only
def test_run_kernel_layer_report_shape() -> None:
    report = run_kernel_layer("arch_prctl/")
    assert set(report) == {"layer", "cases", "mismatches", "skipped"}
    assert report["layer"] == "kernel" and report["cases"] == len(
        [c for c in CASES if c.name.startswith("arch_prctl/")])
    json.dumps(report)
    for s in report["skipped"]:
        assert s.startswith("arch_prctl/") and ": " in s
    with pytest.raises(FpstateError, match="no kernel case"):
        run_kernel_layer("nonexistent/")


# -- the ptrace set path on random buffers (hypothesis, model vs real) ---------------------------

_XCR0 = 0xE7


@st.composite
def mutations(draw: st.DrawFn) -> conform_ptrace.Mutation:
    """A write biased to the kernel's checks: XSTATE_BV inside/outside XCR0, XCOMP_BV,
    reserved header bytes, MXCSR and its mask, sw_reserved, component bytes, iov_len."""
    xcr0 = _host_xcr0()
    sub = draw(st.integers(0, 2**64 - 1)) & xcr0
    bv = draw(st.sampled_from([sub, xcr0, 0, 0x4]) | st.integers(0, 2**64 - 1)
              | st.builds(lambda b: sub | 1 << b, st.integers(0, 63)))
    xcomp = draw(st.just(0) | st.sampled_from([1 << 63, 1 << 63 | xcr0])
                 | st.builds(lambda b: 1 << b, st.integers(0, 63)))
    reserved = draw(st.none() | st.tuples(st.integers(16, 63), st.integers(1, 255)))
    mxcsr = draw(st.sampled_from([0x1F80, 0xFFC0, 0x21F80, 0x8000_1F80])
                 | st.integers(0, 2**32 - 1) | st.integers(0, 0xFFFF))
    mask = draw(st.none() | st.integers(0, 2**32 - 1))
    sw = draw(st.none() | st.binary(min_size=48, max_size=48))
    pokes = draw(st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=3))
    delta = draw(st.sampled_from([0, 0, 0, 0, -8, 8, -2, 64]))
    return conform_ptrace.Mutation(bv, xcomp, reserved, mxcsr, mask, sw, tuple(pokes), delta)


def _host_xcr0() -> int:
    if not native.is_x86_64():
        return _XCR0
    from fpstate.host.child import register_class

    return register_class().xcr0


@x86_only
@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutations(), min_size=8, max_size=8))
def test_ptrace_set_decisions_on_random_buffers(batch: list[conform_ptrace.Mutation]) -> None:
    """30 sessions x 8 writes = 240 random NT_X86_XSTATE writes: the errno of each
    (ptrace_regset / xstateregs_set / copy_uabi_to_xstate), what the kernel stored (read back),
    and the registers the tracee resumes with, model == real."""
    xstate, _ = _base_images()
    writes = tuple(m.apply(xstate) for m in batch)
    facts, session = conform_ptrace._host_session(writes)
    given_ = conform_ptrace.PtraceGiven(session.before.raw, writes)
    result = compare("ptrace/hypothesis", conform_ptrace.ptrace_model(conform.host_system(),
                                                                      given_), facts)
    assert not result.mismatches, _mismatch_text(result)


@x86_only
def test_a_ptrace_write_of_pkru_is_what_the_tracee_resumes_with() -> None:
    """NT_X86_XSTATE with XSTATE_BV = XCR0 and PKRU's low byte poked to 0xff: the write keeps
    key 0's rights (`Mutation.apply`), thread.pkru takes the rest, and the tracee resumes with
    PKRU (its old bits 31:8) | 0xfc, model == real. (Skips without PKU.)"""
    xcr0 = _host_xcr0()
    if not xcr0 >> 9 & 1:
        pytest.skip(f"host XCR0 {xcr0:#x} has no PKRU")
    xstate, _ = _base_images()
    at = conform.host_system().profile.component(9).offset
    writes = (conform_ptrace.Mutation(xcr0, 0, None, 0x1F80, None, None, ((at, 0xFF),),
                                      0).apply(xstate),)
    facts, session = conform_ptrace._host_session(writes)
    want = int.from_bytes(xstate[at:at + 4], "little") & ~0xFF | 0xFC
    assert facts["tracee ran after PTRACE_CONT"] and facts["after.PKRU"] == f"{want:#x}"
    given_ = conform_ptrace.PtraceGiven(session.before.raw, writes)
    result = compare("ptrace/pkru", conform_ptrace.ptrace_model(conform.host_system(), given_),
                     facts)
    assert not result.mismatches, _mismatch_text(result)


_BASE: list[tuple[bytes, bytes]] = []


def _base_images() -> tuple[bytes, bytes]:
    if not _BASE:
        _BASE.append(conform_ptrace._base_images())
    return _BASE[0]


def test_random_mutations_reach_every_decision() -> None:
    """The layer's fixed-seed writes exercise each check of copy_uabi_to_xstate and the
    length rules at least once (so the 256-write case cannot pass by testing one path)."""
    import random

    rng = random.Random(conform_ptrace.RANDOM_SEED)
    ms = [conform_ptrace.random_mutation(rng, _XCR0) for _ in range(conform_ptrace.RANDOM_WRITES)]
    assert any(m.xstate_bv & ~_XCR0 for m in ms)
    assert any(m.xcomp_bv for m in ms) and any(m.reserved for m in ms)
    assert any(m.mxcsr & ~0x2FFFF and not m.xstate_bv & ~_XCR0 for m in ms)
    assert any(m.length_delta % 8 for m in ms) and any(m.length_delta < 0 for m in ms)
    clean = [m for m in ms if not (m.xstate_bv & ~_XCR0 or m.xcomp_bv or m.reserved
                                   or m.length_delta)]
    assert len(clean) > 20


# -- AMX: the model side of the cases this host skips --------------------------------------------

def _spr_system() -> FpuSystem:
    profile = load_profile("sapphire-rapids")
    return FpuSystem.from_boot(profile, fpu__init_system_xstate(profile, "6.18"))


def _legacy_image(system: FpuSystem) -> bytes:
    """A standard image with x87 and SSE in use (XMM0 = 0x11..), everything else init."""
    img = bytearray(system.user.max_size)
    img[0:2] = (0x37F).to_bytes(2, "little")
    img[24:28] = (0x1F80).to_bytes(4, "little")
    img[160:176] = bytes([0x11]) * 16
    struct.pack_into("<Q", img, 512, 0x3)
    return bytes(img)


SP = 0x7FFD_1234_5678


def test_amx_permission_states_on_sapphire_rapids() -> None:
    system = _spr_system()
    state = next(s for s in conform.PERM_STATES if s.name == "amx-permitted")
    facts = conform._prctl_model(state)(system, None)
    assert facts["setup REQ_XCOMP_PERM(0x12)"] == "OK"
    assert facts["GET_XCOMP_PERM(&u64)"] == "OK 0x602e7"
    assert facts["GET_XCOMP_GUEST_PERM(&u64)"] == "OK 0x202e7"  # XTILE_CFG is not dynamic
    assert facts["REQ_XCOMP_PERM(0x11)"] == "EOPNOTSUPP"
    assert facts["REQ_XCOMP_PERM(0x12)"] == "OK"
    assert facts["REQ_XCOMP_PERM(0x14)"] == "EINVAL"
    locked = next(s for s in conform.PERM_STATES if s.name == "amx-permitted-guest-locked")
    facts = conform._prctl_model(locked)(system, None)
    assert facts["REQ_XCOMP_GUEST_PERM(0x12)"] == "OK"  # already permitted before the lock
    locked = next(s for s in conform.PERM_STATES if s.name == "guest-locked")
    facts = conform._prctl_model(locked)(system, None)
    assert facts["REQ_XCOMP_GUEST_PERM(0x12)"] == "EBUSY"  # FPU_GUEST_PERM_LOCKED
    assert facts["REQ_XCOMP_PERM(0x12)"] == "OK"  # the host permission is not locked
    small = conform._prctl_model(next(s for s in conform.PERM_STATES
                                      if s.name == "small-altstack"))(system, None)
    assert small["REQ_XCOMP_PERM(0x12)"] == "ENOSPC"  # validate_sigaltstack


def test_amx_altstack_enospc_then_enomem_on_sapphire_rapids() -> None:
    """validate_sigaltstack(): an altstack smaller than the AMX frame refuses the request;
    sigaltstack_size_valid(): after the grant, a smaller altstack is refused."""
    facts = list(conform_signal._amx_altstack_model(_spr_system(), None).values())
    assert facts == [("OK", "ENOSPC", 0x202E7, "OK"), ("OK", "OK", 0x602E7, "ENOMEM"),
                     ("OK", "OK", 0x602E7, "OK")]


def test_amx_first_use_without_permission_is_sigill_illopc() -> None:
    assert conform_process._sigill_model(_spr_system(), None) == {"signal": "SIGILL",
                                                                  "si_code": 1}


def test_amx_insn_without_xcr0_is_sigill_illopn() -> None:
    profile = load_profile("zen5")
    system = FpuSystem.from_boot(profile, fpu__init_system_xstate(profile, "6.18"))
    assert conform_process._amx_insn_model(system, None) == {"vector": "#UD",
                                                             "signal": "SIGILL", "si_code": 2}


def _amx_frame(state: str) -> dict:
    from fpstate.host.amx import tile_config, tile_data

    system = _spr_system()
    img = bytearray(_legacy_image(system))
    tiles = None
    if state == "in-use":
        for i, data in ((17, tile_config()), (18, tile_data())):
            comp = system.profile.component(i)
            img = bytearray(img.ljust(comp.offset + comp.size, b"\0"))
            img[comp.offset:comp.offset + comp.size] = data
        struct.pack_into("<Q", img, 512, 0x3 | 0x60000)
    elif state == "released":
        tiles = (tile_config(), tile_data())
    g = conform_signal.SignalGiven(bytes(img), SP, amx_permitted=True, tiles=tiles)
    return conform_signal.delivery_model(system, g), system


@pytest.mark.parametrize("state", ["permitted", "in-use", "released"])
def test_amx_signal_frames_on_sapphire_rapids(state: str) -> None:
    """Permission alone keeps the default-sized frame; first use reallocates to the permitted
    size (xstate_size 11008, xfeatures with 17-18, tiles in the frame); after TILERELEASE
    the frame keeps that size but the tiles are not written (SIGFRAME_INITOPT)."""
    facts, system = _amx_frame(state)
    profile = system.profile
    full = layout.standard_size(profile, 0x602E7)
    default = layout.standard_size(profile, 0x202E7)  # fpu_user_cfg.default: all but XTILE_DATA
    assert full == 11008 and default == 2816
    size = default if state == "permitted" else full
    assert facts["delivered"] == "SIGUSR1 handler"
    assert facts["sw.xstate_size"] == size and facts["sw.extended_size"] == size + 4
    assert facts["sw.xfeatures"] == (0x202E7 if state == "permitted" else 0x602E7)
    assert facts["magic2 @fpstate+xstate_size"] == 0x46505845
    assert bool(facts["XSTATE_BV"] & 0x60000) == (state == "in-use")
    assert facts["fpstate"] == (SP - 128 - size - 4) & ~63
    assert facts["fpstate - frame"] == 456 and facts["frame % 16"] == 8
    if state == "in-use":
        from fpstate.host.amx import tile_data

        assert facts["frame.xtiledata"] == tile_data()
    assert facts["handler entry.xtiledata"] == bytes(8192)  # fpu__clear_user_states
    assert facts["handler entry.sse"] == bytes(256) and facts["handler entry.MXCSR"] == 0x1F80


def test_amx_fork_keeps_permission_not_tiles() -> None:
    from fpstate.host.amx import tile_config, tile_data

    system = _spr_system()
    img = bytearray(_legacy_image(system))
    for i, data in ((17, tile_config()), (18, tile_data())):
        comp = system.profile.component(i)
        img = bytearray(img.ljust(comp.offset + comp.size, b"\0"))
        img[comp.offset:comp.offset + comp.size] = data
    struct.pack_into("<Q", img, 512, 0x3 | 0x60000)
    facts = conform_process.amx_inherit_model(system, bytes(img))
    assert facts["child GET_XCOMP_PERM"] == "OK 0x602e7"
    assert not facts["child XINUSE"] & 0x40000
    assert facts["child.xtiledata"] == bytes(len(tile_data()))
    assert facts["child.xtilecfg"] == tile_config()  # XTILE_CFG is not dynamic: copied
    assert facts["child.sse"][:16] == bytes([0x11]) * 16


# -- host/amx: the tile programs ------------------------------------------------------------------

def test_tile_program_encodes_permission_loads_and_release() -> None:
    import iced_x86

    from fpstate.host.amx import emit_tiles, tile_config, tile_data
    from fpstate.host.child import Asm

    a = Asm()
    emit_tiles(a, 0x1000, 0x2000, load=True, release=True)
    code = a.assemble(0x400000)
    mnemonics = [iced_x86.Formatter(iced_x86.FormatterSyntax.INTEL).format(i)
                 for i in iced_x86.Decoder(64, code, ip=0x400000)]
    assert mnemonics[3] == "syscall" and mnemonics[0] == "mov rdi,1023h"
    assert mnemonics[1] == "mov rsi,12h"
    assert mnemonics.count("tilerelease") == 1 and mnemonics[-1] == "tilerelease"
    loads = [m for m in mnemonics if m.startswith("tileloadd")]
    assert loads[0] == "tileloadd tmm0,[rsi+rcx]" and loads[7] == "tileloadd tmm7,[rsi+rcx+1C00h]"
    cfg = tile_config()
    assert cfg[0] == 1 and struct.unpack_from("<8H", cfg, 16) == (64,) * 8 and cfg[48:56] == \
        bytes([16]) * 8
    assert len(tile_data()) == 8192 and 0 not in tile_data()


@x86_only
def test_amx_probes_say_why_they_cannot_run() -> None:
    from fpstate.host import amx

    reason = amx.amx_unavailable()
    if reason is None:
        assert amx.first_use_without_permission() == (4, 1)  # SIGILL, ILL_ILLOPC
        return
    for probe in (amx.first_use_without_permission, amx.inherit_after_tiles,
                  lambda: amx.raise_signal_with_tiles("in-use")):
        with pytest.raises(HostUnavailable, match="AMX"):
            probe()


def test_model_machine_of_this_host_boots() -> None:
    """The layer boots the model once per process; every case gets a fresh Machine."""
    if not native.is_x86_64():
        pytest.skip("the host is not x86-64")
    system = conform.host_system()
    m = Machine(system, 1)
    t = conform.user_task(m, sp=SP)
    assert t.user_sp == SP and m.cpus[0].current is t


# -- the worked example (docs/kernel-example.md) -------------------------------------------------

def test_worked_example_model_flow_on_sapphire_rapids() -> None:
    from fpstate.kernel.x86.conform_example import model_flow

    text = "\n".join(model_flow("sapphire-rapids"))
    assert "REQ_XCOMP_PERM(18) OK, GET_XCOMP_PERM 0x602e7" in text
    assert "fpstate before first use: size 2560, user_size 2816, xfd 0x40000" in text
    assert "LDTILECFG: no fault" in text
    assert "TILELOADD: #NM" in text
    assert "fpstate after:            size 10752, user_size 11008, xfd 0x0" in text
    assert "extended_size 11012 xfeatures 0x602e7 xstate_size 11008; magic2 at +11008: " \
           "0x46505845" in text
    assert "tiles in the frame: True" in text and "every register restored: True" in text
    assert "11008 bytes, XCR0@464 0x602e7" in text and "TILELOADD loaded: True" in text


def test_worked_example_model_flow_without_amx_uses_avx512() -> None:
    from fpstate.kernel.x86.conform_example import model_flow

    text = "\n".join(model_flow("zen5"))
    assert "REQ_XCOMP_PERM(18) EOPNOTSUPP" in text and "VMOVDQU64" in text
    assert "xstate_size 2440; magic2 at +2440: 0x46505845" in text  # Zen 5 profile has PKRU


@x86_only
def test_worked_example_host_flow_replays_on_the_model() -> None:
    from fpstate.kernel.x86.conform_example import host_flow

    lines = list(host_flow())
    assert lines[0].startswith("real kernel: arch_prctl GET_XCOMP_SUPP")
    reason = conform.host_amx_reason()
    user = conform.host_system().user.max_features
    if reason:
        assert f"  sigframe/amx-tiles-in-use: skipped: {reason}" in lines
        # The flow runs with the state this CPU has, named from its XCR0.
        assert (f"  the same flow with the state this CPU has ({mask_names(user)}, MXCSR) "
                "instead:") in lines
    assert any(line.startswith("  ptrace/get-and-resume: ") for line in lines)
    # The widest vector register the tracee resumes with is shown for model and real alike.
    widest = next(i for i in (6, 2, 1) if (user >> i) & 1)
    size = 512 if widest == 6 else 256  # ZMM_Hi256: 16 x 32 bytes; YMM_Hi128, XMM: 16 x 16
    shown = [line.split() for line in lines
             if line.startswith(f"    after.{feature(widest).short} ")]
    assert shown == [[f"after.{feature(widest).short}", "model", str(size), "bytes", "real",
                      str(size), "bytes"]]


@x86_only
def test_cli_conform_layer_kernel_json(capsys: pytest.CaptureFixture[str]) -> None:
    """`fpstate conform --layer kernel --json`: the report, exit 0 when nothing mismatched;
    --samples sets the number of random ptrace writes."""
    from fpstate.cli import main

    status = main(["conform", "--layer", "kernel", "--json", "--samples", "40", "--seed", "3"])
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"layer", "cases", "mismatches", "skipped"}
    assert report["layer"] == "kernel" and report["cases"] == len(CASES)
    assert status == (1 if report["mismatches"] else 0)
    assert report["mismatches"] == []
    reason = conform.host_amx_reason()
    if reason:
        assert f"sigframe/amx-tiles-in-use: {reason}" in report["skipped"]


def test_core_notes_model_on_sapphire_rapids() -> None:
    """The model side of core/notes on an AMX CPU (this host skips nothing of it, but has no
    AMX): the regset notes of a task holding x87/SSE only -- NT_X86_XSTATE is fpu_user_cfg's
    11008 bytes, XCR0 0x602e7 at 464, XSTATE_BV 0x203 (PKRU in use: the task runs with
    init_pkru_value, and the save of its fpstate marked PKRU, whose value the copy takes from
    thread.pkru) -- and a layout note of 7 records closing the notes; before 6.12
    (kernel_version 6.11) no layout note at all."""
    from dataclasses import replace

    from fpstate.kernel.x86.conform_core import CoreGiven, core_model

    system = _spr_system()
    facts = core_model(system, CoreGiven(_legacy_image(system)))
    xstate = facts["NT_X86_XSTATE"]
    assert len(xstate) == 11008 and struct.unpack_from("<QQ", xstate, 464)[0] == 0x602E7
    assert struct.unpack_from("<Q", xstate, 512)[0] == 0x203
    fx = facts["NT_PRFPREG"]  # the same legacy region; no XCR0 in its software bytes
    assert xstate[160:176] == bytes([0x11]) * 16 and fx[:464] == xstate[:464]
    assert fx[464:] == bytes(48)
    assert len(facts["NT_X86_XSAVE_LAYOUT"]) == 20 + 7 * 16
    assert facts["NT_X86_XSAVE_LAYOUT closes PT_NOTE"] is True
    old = core_model(replace(system, kernel_version="6.11"), CoreGiven(_legacy_image(system)))
    assert old["NT_X86_XSAVE_LAYOUT"] == b"" and old["NT_X86_XSAVE_LAYOUT closes PT_NOTE"] is False


def test_the_hotplug_case_tells_the_kernel_from_a_cpu_that_keeps_its_owner() -> None:
    """cpu/hotplug's model side (the host side needs FPSTATE_MAY_HOTPLUG=1): with the x87
    stack holding two values, the task gets them back after its CPU's cycle; with variant
    cpu-up-keeps-owner its restore is skipped and it holds what FNINIT left (FSW.TOP 0, every
    register tagged empty) -- the field the real kernel's answer is compared on."""
    system = _spr_system()
    img = bytearray(_legacy_image(system))
    img[2:4] = (0x3000).to_bytes(2, "little")  # FSW.TOP = 6: two values pushed
    img[4] = 0xC0  # abridged tag word: R6 and R7 valid
    img[32:42] = bytes(range(1, 11))  # ST0 (R6)
    img[48:58] = bytes(range(11, 21))  # ST1 (R7)
    kernel = conform_process.hotplug_model(system, bytes(img))
    assert kernel["after.x87"][:5] == bytes(img[:5]) and kernel["after.x87"][32:58] == img[32:58]
    keeps = conform_process.hotplug_model(system.with_options(
        variants={"cpu-up-keeps-owner"}), bytes(img))
    assert keeps["after.x87"][2:5] == bytes(3) and keeps["after.sse"] == kernel["after.sse"]
