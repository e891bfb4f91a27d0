"""The worked example of the kernel layer: ask for AMX, use the tiles, take a signal, be read
by ptrace -- on the model, and the same flow on the real kernel of this machine.

``python3 -m fpstate.kernel.x86.conform_example [--cpu NAME]`` prints three parts:

1. the flow on the model booted on an AMX CPU (default: the bundled Sapphire Rapids profile):
   arch_prctl(ARCH_REQ_XCOMP_PERM, XTILE_DATA), LDTILECFG/TILELOADD (#NM -> handle_xfd_event ->
   fpstate_realloc), SIGUSR1 (the frame with the tiles), sigreturn, PTRACE_GETREGSET;
2. the real kernel's answer to the same steps; where the host lacks AMX the AMX steps are
   skipped with the reason, and the flow runs with the state the host has instead (its XCR0's
   user features: AVX-512 on the Zen 5 host, AVX and PKRU on the Zen 3 one);
3. the model replaying those real runs, field by field (`conform.run_case`).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

from fpstate.kernel.x86.conform import (
    Case,
    host_amx_reason,
    host_system,
    kernel_cases,
    show,
    user_task,
)
from fpstate.kernel.x86.regset import NT_X86_XSTATE, PTRACE_GETREGSET, ptrace_regset
from fpstate.kernel.x86.sched import SIGUSR1, Machine, SigAction, Signal
from fpstate.kernel.x86.signal import handler_return, sys_rt_sigreturn
from fpstate.kernel.x86.xstate_prctl import (
    ARCH_GET_XCOMP_PERM,
    ARCH_GET_XCOMP_SUPP,
    ARCH_REQ_XCOMP_PERM,
    ARCH_XCOMP_TILEDATA,
    sys_arch_prctl,
)
from fpstate.x86.xfeatures import feature, mask_names

SP = 0x7FFD_0000_8000  #: the model process's stack pointer when the signal arrives


def _prctl(m: Machine, option: int, arg: int | None = None) -> str:
    t = m.cpus[0].current
    out = t.user_sp - 64
    ret = m.syscall(0, sys_arch_prctl, option, out if arg is None else arg)
    if ret:
        from fpstate.kernel.x86.conform import errno_of

        return errno_of(ret)
    return "OK" if arg is not None else f"{int.from_bytes(t.process.mm.read(out, 8), 'little'):#x}"


def _use_state(m: Machine, amx: bool) -> Iterator[str]:
    """LDTILECFG + TILELOADD (AMX) or VMOVDQU64 zmm + KMOVQ (AVX-512) in the model."""
    from fpstate.host.amx import tile_config, tile_data

    t = m.cpus[0].current
    fps = t.fpu.fpstate
    if amx:
        yield (f"  fpstate before first use: size {fps.size}, user_size {fps.user_size}, "
               f"xfd {fps.xfd:#x}")
        fault = m.user_write(0, 17, tile_config())
        yield f"  LDTILECFG: {fault or 'no fault'} (SDM 13.14: LDTILECFG never takes the XFD #NM)"
        fault = m.user_write(0, 18, tile_data())
        yield f"  TILELOADD: {fault or 'no fault'} -> handle_xfd_event -> fpstate_realloc"
        fps = t.fpu.fpstate
        yield (f"  fpstate after:            size {fps.size}, user_size {fps.user_size}, "
               f"xfd {fps.xfd:#x}, xfeatures {fps.xfeatures:#x}")
    else:
        for i in (5, 6, 7):
            m.user_write(0, i)
        yield "  VMOVDQU64 zmm0-31, KMOVQ k0-7: no fault (no dynamic feature)"
    yield f"  XINUSE {m.cpus[0].regs.xgetbv1():#x}"


def model_flow(cpu: str = "sapphire-rapids", kernel: str = "6.18") -> Iterator[str]:
    """The whole flow on the model booted on ``cpu``; lines of text."""
    m = Machine.boot(cpu, kernel, ncpus=1)
    s = m.system
    yield (f"model: {cpu}, Linux {kernel}: XCR0 {s.xcr0:#x}, fpu_user_cfg max_size "
           f"{s.user.max_size} default_size {s.user.default_size}")
    t = user_task(m, sp=SP, comm="amx-demo")
    supp = _prctl(m, ARCH_GET_XCOMP_SUPP)
    req = _prctl(m, ARCH_REQ_XCOMP_PERM, ARCH_XCOMP_TILEDATA)
    yield (f"  arch_prctl: GET_XCOMP_SUPP {supp}, REQ_XCOMP_PERM(18) {req}, "
           f"GET_XCOMP_PERM {_prctl(m, ARCH_GET_XCOMP_PERM)}")
    amx = req == "OK"
    yield from _use_state(m, amx)
    before = m.cpus[0].regs.snapshot()
    t.handlers[SIGUSR1] = SigAction()
    m.enter_kernel(0)
    t.pending.append(Signal(SIGUSR1))
    m.exit_to_user_mode(0)
    frame = t.user_sp
    mm = t.process.mm
    fpstate = int.from_bytes(mm.read(frame + 232, 8), "little")
    sw = mm.read(fpstate + 464, 20)
    size = int.from_bytes(sw[16:20], "little")
    yield (f"  SIGUSR1 frame: sp {SP:#x} -> frame {frame:#x}, fpstate {fpstate:#x} "
           f"(fpstate - frame {fpstate - frame}, {SP - frame} bytes of stack)")
    yield (f"    sw_bytes: magic1 {int.from_bytes(sw[0:4], 'little'):#x} extended_size "
           f"{int.from_bytes(sw[4:8], 'little')} xfeatures {int.from_bytes(sw[8:16], 'little'):#x}"
           f" xstate_size {size}; magic2 at +{size}: "
           f"{int.from_bytes(mm.read(fpstate + size, 4), 'little'):#x}")
    xstate_bv = int.from_bytes(mm.read(fpstate + 512, 8), "little")
    yield f"    XSTATE_BV {xstate_bv:#x} (tiles in the frame: {bool(xstate_bv & 0x40000)})"
    handler_return(t)
    m.syscall(0, sys_rt_sigreturn)
    after = m.cpus[0].regs.snapshot()
    yield f"  sigreturn: every register restored: {after == before}"
    m.stop(t)
    user_task(m, comm="tracer")
    c = m.enter_kernel(0)
    _, data = ptrace_regset(c, t, PTRACE_GETREGSET, NT_X86_XSTATE, 16384)
    bv = int.from_bytes(data[512:520], "little")
    line = (f"  PTRACE_GETREGSET NT_X86_XSTATE: {len(data)} bytes, XCR0@464 "
            f"{int.from_bytes(data[464:472], 'little'):#x}, XSTATE_BV {bv:#x}")
    if amx:
        from fpstate.host.amx import tile_data

        off = s.profile.component(18).offset
        same = data[off:off + 8192] == tile_data()
        line += f", tile data at {off} == what TILELOADD loaded: {same}"
    yield line


def _fmt(field: str, value: Any) -> str:
    if isinstance(value, bytes):
        return f"{len(value)} bytes"
    if isinstance(value, int) and ("size" in field or "frame" in field) and "magic" not in field:
        return str(value)
    return show(value)


def _side_by_side(case: Case, fields: tuple[str, ...]) -> Iterator[str]:
    from fpstate.kernel.x86.conform import compare

    answer = case.host()
    model = case.model(host_system(), answer.given)
    result = compare(case.name, model, answer.facts)
    yield (f"  {case.name}: {result.compared} fields compared, "
           f"{len(result.mismatches)} mismatch(es)")
    for f in fields:
        if f in answer.facts:
            a, b = _fmt(f, model.get(f)), _fmt(f, answer.facts[f])
            yield f"    {f:28s} model {a:>12s}   real {b:>12s}"
    for m in result.mismatches:
        yield f"    MISMATCH {m.field}: model {m.model} / real {m.real}"


def host_flow() -> Iterator[str]:
    """The same steps on the real kernel, each replayed by the model."""
    from fpstate.host.prctl import (
        ARCH_GET_XCOMP_PERM as GET_PERM,
    )
    from fpstate.host.prctl import (
        ARCH_GET_XCOMP_SUPP as GET_SUPP,
    )
    from fpstate.host.prctl import (
        ARCH_REQ_XCOMP_PERM as REQ,
    )
    from fpstate.host.prctl import PrctlCall, prctl_sequence

    r = prctl_sequence([PrctlCall(GET_SUPP), PrctlCall(REQ, 18), PrctlCall(GET_PERM)])
    yield (f"real kernel: arch_prctl GET_XCOMP_SUPP {r[0].value:#x}, REQ_XCOMP_PERM(18) "
           f"{r[1].errno_name}, GET_XCOMP_PERM {r[2].value:#x}")
    cases = {c.name: c for c in kernel_cases()}
    reason = host_amx_reason()
    user = host_system().user.max_features
    # The widest vector state the tracee holds, shown after the ptrace read and resume.
    vector = next((i for i in (6, 2, 1) if (user >> i) & 1), 1)
    amx = ("arch_prctl/amx-permitted", "xfd/sigill-without-permission",
           "sigframe/amx-tiles-in-use", "sigframe/amx-tiles-released",
           "inherit/amx-tiles-and-permission")
    if reason:
        for name in amx:
            yield f"  {name}: skipped: {reason}"
        yield (f"  the same flow with the state this CPU has ({mask_names(user)}, MXCSR) "
               "instead:")
    else:
        for name in amx:
            yield from _side_by_side(cases[name], ())
    frame_fields = ("fpstate - frame", "sw.extended_size", "sw.xfeatures", "sw.xstate_size",
                    "magic2 @fpstate+xstate_size", "XSTATE_BV", "uc_flags")
    yield from _side_by_side(cases["arch_prctl/fresh"], ("REQ_XCOMP_PERM(0x12)",
                                                         "GET_XCOMP_PERM(&u64)"))
    yield from _side_by_side(cases["sigframe/all-in-use"], frame_fields)
    yield from _side_by_side(cases["sigreturn/unchanged"], ("outcome",))
    yield from _side_by_side(cases["ptrace/get-and-resume"], ("GET NT_X86_XSTATE",
                                                              f"after.{feature(vector).short}"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m fpstate.kernel.x86.conform_example")
    p.add_argument("--cpu", default="sapphire-rapids", help="profile for the model's AMX flow")
    args = p.parse_args(argv)
    for line in model_flow(args.cpu):
        print(line)
    print()
    for line in host_flow():
        print(line)
    return 0


__all__ = ["host_flow", "main", "model_flow"]

if __name__ == "__main__":
    raise SystemExit(main())
