"""Kernel-layer cases about signals: frame contents and placement, sigaltstack, sigreturn.

The real side is `fpstate.host.signals.raise_signal`: a forked child loads pattern registers,
raises SIGUSR1 with kill(), its machine-code handler copies the frame and may patch it, and
rt_sigreturn restores (or fails into SIGSEGV). The model side replays the same run from what
the host recorded (`SignalGiven`: the registers before the raise, the stack pointer the signal
interrupted, the alternate stack, the patches) through handle_signal() and sys_rt_sigreturn()
of `fpstate.kernel.x86.signal`, so frame addresses and bytes compare exactly.

Compared for every delivery: the frame's placement (frame and fpstate addresses, fpstate -
frame, alignment), uc_flags, uc_stack, the saved sp and fpstate pointer, si_signo (and si_code
of a forced SIGSEGV), struct _fpx_sw_bytes, MAGIC2 at fpstate + xstate_size, the XSAVE header,
the register values the frame holds, and the handler's initial FPU state. For sigreturn: which
way it went (restored, or SIGSEGV) and every register afterwards.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fpstate.kernel.x86.conform import (
    Case,
    Facts,
    HostAnswer,
    errno_of,
    host_amx_reason,
    host_pku_reason,
    host_system,
    image_registers,
    keys_taken_before,
    load_registers,
    model_registers,
    pkru_offset,
    prefixed,
    show,
    user_task,
)
from fpstate.kernel.x86.mm import PAGE_SIZE
from fpstate.kernel.x86.pkeys import sys_pkey_alloc, sys_pkey_mprotect
from fpstate.kernel.x86.sched import (
    SA_IA32_ABI,
    SA_ONSTACK,
    SA_RESTORER,
    SA_SIGINFO,
    SIGSEGV,
    SIGUSR1,
    Machine,
    SigAction,
    Signal,
    Task,
)
from fpstate.kernel.x86.signal import (
    RT_IA32_SC,
    SIGFRAME_IA32_SC,
    handler_ia32_return,
    handler_return,
    read_pkru,
    sys32_rt_sigreturn,
    sys32_sigreturn,
    sys_rt_sigreturn,
)
from fpstate.kernel.x86.types import FpuSystem
from fpstate.kernel.x86.xstate_prctl import (
    ARCH_GET_XCOMP_PERM,
    ARCH_REQ_XCOMP_PERM,
    ARCH_XCOMP_TILEDATA,
    sys_arch_prctl,
    sys_sigaltstack,
)
from fpstate.x86.xfeatures import XFEATURE_MASK_XTILE

FP_XSTATE_MAGIC1 = 0x46505853
FP_XSTATE_MAGIC2 = 0x46505845
SW = 464  #: struct _fpx_sw_bytes in the fxsave area
#: Offsets from the frame start (struct rt_sigframe on x86-64; uc at 8, siginfo at 312).
UC_FLAGS, UC_STACK, MC_SP, MC_FPSTATE, SIGINFO = 8, 24, 168, 232, 312


@dataclass(frozen=True, slots=True)
class Patch:
    """Bytes written at fpstate + ``offset`` by the handler before it returns."""

    offset: int
    data: bytes
    what: str


@dataclass(frozen=True, slots=True)
class SignalGiven:
    """What the model replays of one host run."""

    before: bytes  #: the registers when kill() was made (standard XSAVE image)
    sp: int  #: the interrupted stack pointer (uc_mcontext.sp)
    sas: tuple[int, int, int] = (0, 0, 0)  #: the task's sigaltstack (ss_sp, ss_flags, ss_size)
    onstack: bool = False  #: SIGUSR1 has SA_ONSTACK (the probe installed that altstack)
    patches: tuple[Patch, ...] = ()
    amx_permitted: bool = False  #: ARCH_REQ_XCOMP_PERM(XTILE_DATA) before the registers
    tiles: tuple[bytes, bytes] | None = None  #: (XTILECFG, XTILEDATA) used, then released
    #: The protection key the altstack's mapping has (pkey_alloc + pkey_mprotect before the
    #: registers are loaded; the registers' PKRU closes it), 0 for none.
    pkey: int = 0
    #: What the handler does with its entry PKRU before it returns (`raise_signal`'s
    #: ``handler_pkeys``): "open" (WRPKRU 0), "closed" (nothing) or "key0" (sets AD for key
    #: 0, its stack's key).
    handler_pkeys: str = "open"
    #: When not 0: only the mapping's top page has ``pkey``, and the altstack ends this many
    #: bytes above that page's start (`raise_signal`'s ``split_gap``).
    split_gap: int = 0


def _u(raw: bytes, off: int, fmt: str = "<Q") -> int:
    return int(struct.unpack_from(fmt, raw, off)[0])


def frame_facts(system: FpuSystem, raw: bytes, frame: int) -> Facts:
    """The facts of one 64-bit rt_sigframe: ``raw`` = the bytes from ``frame`` (the handler's
    RSP) up to fpstate + extended_size."""
    fpstate = _u(raw, MC_FPSTATE)
    fo = fpstate - frame
    magic1, ext, xfeatures, size = struct.unpack_from("<IIQI", raw, fo + SW)
    facts: Facts = {
        "frame": frame, "fpstate": fpstate, "fpstate - frame": fo,
        "frame % 16": frame % 16, "fpstate % 64": fpstate % 64,
        "uc_flags": _u(raw, UC_FLAGS),
        "uc_stack": struct.unpack_from("<QixxxxQ", raw, UC_STACK),
        "uc_mcontext.sp": _u(raw, MC_SP), "si_signo": _u(raw, SIGINFO, "<i"),
        "sw.magic1": magic1, "sw.extended_size": ext, "sw.xfeatures": xfeatures,
        "sw.xstate_size": size, "sw.padding": raw[fo + SW + 20:fo + 512],
    }
    if magic1 == FP_XSTATE_MAGIC1 and fo + size + 4 <= len(raw):
        facts["magic2 @fpstate+xstate_size"] = _u(raw, fo + size, "<I")
        facts["XSTATE_BV"] = _u(raw, fo + 512)
        facts["XCOMP_BV"] = _u(raw, fo + 520)
        facts["header[16:64]"] = raw[fo + 528:fo + 576]
        facts.update(prefixed("frame", image_registers(system, raw[fo:fo + size])))
    if facts["si_signo"] == SIGSEGV:
        facts["si_code"] = _u(raw, SIGINFO + 8, "<i")
    return facts


def _model_frame(m: Machine, t: Task) -> tuple[bytes, int]:
    mm = t.process.mm
    frame = t.user_sp
    fpstate = int.from_bytes(mm.read(frame + MC_FPSTATE, 8), "little")
    sw = mm.read(fpstate + SW, 8)
    ext = int.from_bytes(sw[4:8], "little") if sw[:4] == FP_XSTATE_MAGIC1.to_bytes(4, "little") \
        else 512
    return mm.read(frame, fpstate - frame + ext), frame


def model_deliver(system: FpuSystem, g: SignalGiven) -> tuple[Machine, Task]:
    """handle_signal() of SIGUSR1 over the replayed registers and sigaltstack; SIGUSR1 and
    SIGSEGV have handlers, SIGUSR1 with SA_ONSTACK when ``g.onstack``."""
    m = Machine(system, 1)
    t = user_task(m, sp=g.sp)
    ss_sp, ss_flags, ss_size = g.sas
    if g.onstack:
        lo = ss_sp & ~0xFFF
        top = ss_sp + ss_size + (PAGE_SIZE - g.split_gap if g.split_gap else 0)
        t.process.mm.map(lo, top - lo)
        if g.pkey:
            keys_taken_before(t, g.pkey)  # the registers' PKRU then decides the rights
            key = m.syscall(0, sys_pkey_alloc, 0, 0)
            assert key == g.pkey, (key, g.pkey)
            keyed = top - PAGE_SIZE if g.split_gap else lo
            assert m.syscall(0, sys_pkey_mprotect, keyed, top - keyed, key) == 0
    if ss_size:  # the probe's, or one the host process had (pytest's faulthandler installs one)
        m.syscall(0, sys_sigaltstack, ss_sp, ss_size, ss_flags)
    if g.amx_permitted:
        m.syscall(0, sys_arch_prctl, ARCH_REQ_XCOMP_PERM, ARCH_XCOMP_TILEDATA)
    if g.tiles:
        m.user_write(0, 17, g.tiles[0])
        m.user_write(0, 18, g.tiles[1])
        m.user_release(0, XFEATURE_MASK_XTILE)
    load_registers(m, 0, g.before)
    t.handlers[SIGUSR1] = SigAction(SA_ONSTACK if g.onstack else 0)
    t.handlers[SIGSEGV] = SigAction()
    m.enter_kernel(0)
    t.pending.append(Signal(SIGUSR1))
    m.exit_to_user_mode(0)
    return m, t


def _outcome_model(m: Machine, t: Task) -> str:
    if t.killed_by is not None:
        return f"killed by signal {t.killed_by.sig}"
    signo = int.from_bytes(t.process.mm.read(t.user_sp + SIGINFO, 4), "little")
    return {SIGUSR1: "SIGUSR1 handler", SIGSEGV: "SIGSEGV handler"}.get(signo, f"signal {signo}")


def _model_delivery_facts(system: FpuSystem, m: Machine, t: Task) -> Facts:
    facts: Facts = {"delivered": _outcome_model(m, t)}
    if t.killed_by is None:
        raw, frame = _model_frame(m, t)
        facts.update(frame_facts(system, raw, frame))
        facts.update(prefixed("handler entry", model_registers(m, 0)))
    return facts


def delivery_model(system: FpuSystem, g: SignalGiven) -> Facts:
    """The frame handle_signal() builds and the state the handler starts with."""
    m, t = model_deliver(system, g)
    return _model_delivery_facts(system, m, t)


def _host_delivery_facts(run: Any, *, usr1: bool = True) -> Facts:
    """Facts of the SIGUSR1 frame the host captured, else of the SIGSEGV frame."""
    system = host_system()
    if usr1 and run.frame is not None:
        facts: Facts = {"delivered": "SIGUSR1 handler"}
        frame = run.frame
    elif run.segv is not None:
        facts, frame = {"delivered": "SIGSEGV handler"}, run.segv
    else:
        return {"delivered": f"killed by signal {run.exit.signal}"}
    facts.update(frame_facts(system, frame.raw, frame.frame_address))
    # The handler's registers, not its XINUSE: after fpu__clear_user_states() this CPU reports
    # XINUSE[1] set or clear from run to run (kernel-findings section 4, last note).
    facts.update(prefixed("handler entry", image_registers(system, frame.handler_entry.raw)))
    return facts


def _given(run: Any, **extra: Any) -> SignalGiven:
    frame = run.frame or run.segv
    if frame is None:
        from fpstate.errors import HostUnavailable

        raise HostUnavailable(f"no signal frame was captured ({run.exit})")
    return SignalGiven(run.before.raw, frame.interrupted_sp, tuple(frame.uc_stack), **extra)


# -- delivery cases -------------------------------------------------------------------------------


def _delivery(init_mask: int) -> Any:
    def host() -> HostAnswer:
        from fpstate.host.signals import raise_signal

        run = raise_signal(init_mask=init_mask)
        return HostAnswer(_host_delivery_facts(run), _given(run))

    return host


def _altstack_delivery(size: int) -> Any:
    def host() -> HostAnswer:
        from fpstate.host.sigaltstack import deliver_on_altstack

        run = deliver_on_altstack(size)
        return HostAnswer(_host_delivery_facts(run), _given(run, onstack=True))

    return host


def _amx_delivery(state: str) -> Any:
    def host() -> HostAnswer:
        from fpstate.host.amx import raise_signal_with_tiles

        run, tiles = raise_signal_with_tiles(state)
        extra: dict[str, Any] = {"amx_permitted": True}
        if state == "released":
            extra["tiles"] = tiles
        return HostAnswer(_host_delivery_facts(run), _given(run, **extra))

    return host


# -- sigreturn ------------------------------------------------------------------------------------


def model_sigreturn(system: FpuSystem, g: SignalGiven) -> tuple[Machine, Task]:
    """Deliver, patch the model's frame as the host handler did, and return from the handler
    (RET to the restorer, rt_sigreturn)."""
    m, t = model_deliver(system, g)
    raw, _ = _model_frame(m, t)
    fpstate = int.from_bytes(raw[MC_FPSTATE:MC_FPSTATE + 8], "little")
    for p in g.patches:
        t.process.mm.write(fpstate + p.offset, p.data)
    c = m.cpus[0]
    if g.pkey and g.handler_pkeys == "open":
        c.regs.wrpkru(0)  # the handler's WRPKRU 0 (its entry PKRU closes the key)
    elif g.handler_pkeys == "key0":  # the handler's RDPKRU, OR AD of key 0, WRPKRU
        c.regs.wrpkru(read_pkru(c) | 1)
    handler_return(t)
    m.syscall(0, sys_rt_sigreturn)
    return m, t


def sigreturn_model(system: FpuSystem, g: SignalGiven) -> Facts:
    """The outcome of the return and the registers the task continues with."""
    m, t = model_sigreturn(system, g)
    if t.killed_by is None and t.user_sp == g.sp:
        return {"outcome": "restored", **prefixed("after", model_registers(m, 0))}
    return {"outcome": "SIGSEGV"}


def _sigreturn(patches: Any) -> Any:
    """``patches(xstate_size, xcr0)`` -> the host FramePatch list of one row."""

    def host() -> HostAnswer:
        from fpstate.host.child import host_user_xstate_size, register_class
        from fpstate.host.signals import raise_signal

        rows = tuple(patches(host_user_xstate_size(), register_class().xcr0))
        run = raise_signal(rows)
        if run.sigreturn_ok and run.after is not None:
            facts = {"outcome": "restored",
                     **prefixed("after", image_registers(host_system(), run.after.raw))}
        elif run.segv is not None:
            facts = {"outcome": "SIGSEGV"}
        else:
            facts = {"outcome": f"child ended: {run.exit}"}
        given = _given(run, patches=tuple(Patch(p.offset, p.data, p.what) for p in rows))
        return HostAnswer(facts, given)

    return host


def _p32(off: int, v: int) -> Any:
    from fpstate.host.signals import patch_u32

    return patch_u32(off, v, f"u32@{off}={v:#x}")


def _p64(off: int, v: int) -> Any:
    from fpstate.host.signals import patch_u64

    return patch_u64(off, v, f"u64@{off}={v:#x}")


def _pkru_rows(xcr0: int, pkru: int | None, xstate_bv: int | None) -> tuple[Any, ...]:
    """The frame's PKRU value (at its standard offset) and XSTATE_BV, where XCR0 has PKRU
    (nothing to patch elsewhere)."""
    at = pkru_offset(host_system()) if xcr0 >> 9 & 1 else None
    if at is None:
        return ()
    rows = [] if xstate_bv is None else [_p64(512, xstate_bv)]
    if pkru is not None:
        rows.append(_p32(at, pkru))
    return tuple(rows)


def _compacted_form(xcr0: int) -> tuple[Any, ...]:
    from fpstate.host.signals import compacted_form

    return compacted_form(xcr0)


def _b(off: int, v: int) -> Any:
    from fpstate.host.signals import set_bytes

    return set_bytes(off, bytes([v]), f"byte@{off}={v:#x}")


#: name -> patches(xstate_size, xcr0): the rows of kernel-findings section 4.
SIGRETURN_ROWS: dict[str, Any] = {
    "unchanged": lambda n, x: (),
    "xmm3-edited": lambda n, x: (_p64(208, 0x0123456789ABCDEF), _p64(216, 0x1122334455667788)),
    "magic1-zero": lambda n, x: (_p32(SW, 0),),
    "magic2-zero": lambda n, x: (_p32(n, 0),),
    "xstate_size-too-big": lambda n, x: (_p32(SW + 16, n + 1),),
    "xstate_size-575": lambda n, x: (_p32(SW + 16, 575),),
    "xstate_size-0": lambda n, x: (_p32(SW + 16, 0),),
    "extended_size-below-xstate_size": lambda n, x: (_p32(SW + 4, n - 1),),
    "extended_size-0": lambda n, x: (_p32(SW + 4, 0),),
    "extended_size-larger": lambda n, x: (_p32(SW + 4, n + 5),),
    "extended_size-9999": lambda n, x: (_p32(SW + 4, 9999),),
    "xstate_size-896-magic2-moved": lambda n, x: (_p32(SW + 16, 896), _p32(896, FP_XSTATE_MAGIC2),
                                                 _p32(n, 0)),
    # A frame in the standard layout of a CPU with x87, SSE and AVX only (YMM ends at 832),
    # as CRIU restores a frame checkpointed on such a CPU and gVisor writes one: sw_bytes
    # of that size, MAGIC2 after it and not at the kernel's user_size (44eeff9bc467's case).
    "resized-to-ymm": lambda n, x: (_p32(SW + 4, 832 + 4), _p64(SW + 8, x & 0x7),
                                    _p32(SW + 16, 832), _p32(832, FP_XSTATE_MAGIC2),
                                    _p32(n, 0), _p64(512, 0x7)),
    "sw.xfeatures-fpsse": lambda n, x: (_p64(SW + 8, 0x3),),
    "sw.xfeatures-fp": lambda n, x: (_p64(SW + 8, 0x1),),
    "sw.xfeatures-0": lambda n, x: (_p64(SW + 8, 0),),
    "sw.xfeatures-all-ones": lambda n, x: (_p64(SW + 8, 2**64 - 1),),
    "sw.xfeatures-plus-pkru": lambda n, x: (_p64(SW + 8, x | 1 << 9),),
    "XSTATE_BV-0": lambda n, x: (_p64(512, 0),),
    "XSTATE_BV-fpsse": lambda n, x: (_p64(512, 0x3),),
    "XSTATE_BV-plus-bit9": lambda n, x: (_p64(512, x | 1 << 9),),
    "XSTATE_BV-plus-bit8": lambda n, x: (_p64(512, x | 1 << 8),),
    "XSTATE_BV-plus-bit11": lambda n, x: (_p64(512, x | 1 << 11),),
    "XCOMP_BV-1": lambda n, x: (_p64(520, 1),),
    "XCOMP_BV-bit63": lambda n, x: (_p64(520, 1 << 63),),
    # The compacted form reads bytes no standard component covers (Intel: MPX's holes):
    # stack bytes the kernel never wrote, set by the row (`compacted_form`).
    "XCOMP_BV-compacted-xcr0": lambda n, x: (_p64(520, 1 << 63 | x), *_compacted_form(x)),
    "header-byte16": lambda n, x: (_b(512 + 16, 1),),
    "header-byte24": lambda n, x: (_b(512 + 24, 0xA5),),
    "header-byte63": lambda n, x: (_b(512 + 63, 0xA5),),
    "mxcsr-bit31": lambda n, x: (_p32(24, 0x8000_1F80),),
    "mxcsr-0x21f80": lambda n, x: (_p32(24, 0x21F80),),
    # With PKU: sigreturn's XRSTOR loads PKRU from the frame (hence ae6012d72fa6's
    # update_pkru_in_sigframe()), another value or, with XSTATE_BV[9] clear, 0.
    "PKRU-0xc": lambda n, x: _pkru_rows(x, 0xC, None),
    "XSTATE_BV-without-PKRU": lambda n, x: _pkru_rows(x, None, x & ~(1 << 9)),
    "magic1-zero-xstate_bv-plus-bit9": lambda n, x: (_p32(SW, 0), _p64(512, x | 1 << 9)),
    "magic1-zero-mxcsr-bit31": lambda n, x: (_p32(SW, 0), _p32(24, 0x8000_1F80)),
    # MXCSR from a frame whose XSTATE_BV no longer has SSE (the standard form's XRSTOR loads
    # it whatever XSTATE_BV says), and from an fx_only frame (FXRSTOR, then init_fpstate's
    # XRSTOR(S) of user_xfeatures & ~FPSSE, which keeps it where init_fpstate is compacted).
    "XSTATE_BV-x87-mxcsr-0x3fa0": lambda n, x: (_p32(24, 0x3FA0), _p64(512, 0x1)),
    "magic1-zero-mxcsr-0x3fa0": lambda n, x: (_p32(SW, 0), _p32(24, 0x3FA0)),
    # sw.xfeatures without SSE (or YMM): the frame's XRSTOR loads MXCSR through YMM (SSE), then
    # init_fpstate's restore of SSE puts 1F80H; of YMM only, compacted, leaves it.
    "sw.xfeatures-without-sse-mxcsr-0x3fa0": lambda n, x: (_p32(24, 0x3FA0),
                                                           _p64(SW + 8, x & ~0x2)),
    "sw.xfeatures-without-ymm-mxcsr-0x3fa0": lambda n, x: (_p32(24, 0x3FA0),
                                                           _p64(SW + 8, x & ~0x4)),
}


def _segv_host() -> HostAnswer:
    from fpstate.host.child import register_class
    from fpstate.host.signals import raise_signal

    # A bit of XSTATE_BV outside XCR0 and user_xfeatures: PKRU's, or on a CPU with PKU
    # enabled PT's (never in XCR0).
    xcr0 = register_class().xcr0
    rows = SIGRETURN_ROWS["XSTATE_BV-plus-bit8" if xcr0 >> 9 & 1 else "XSTATE_BV-plus-bit9"](
        0, xcr0)
    run = raise_signal(tuple(rows))
    facts = _host_delivery_facts(run, usr1=False)
    return HostAnswer(facts, _given(run, patches=tuple(Patch(p.offset, p.data, p.what)
                                                        for p in rows)))


def _segv_model(system: FpuSystem, g: SignalGiven) -> Facts:
    """A failed sigreturn: fpu__clear_user_states() and force_sig(SIGSEGV), which the task's
    SIGSEGV handler catches (signal_fault in rt_sigreturn is not fatal)."""
    m, t = model_sigreturn(system, g)
    return _model_delivery_facts(system, m, t)


# -- a sigaltstack behind a protection key -------------------------------------------------------

#: The altstack of the protection-key cases, and what the interrupted code denies its key.
PKEY_ALTSTACK_SIZE = 16384
PKEY_DENIED = 0x3  #: AD | WD: neither read nor written under the interrupted code's PKRU
#: The split cases' altstack ends this far into its keyed top page: smaller than any frame,
#: so the frame runs down into the key-0 page below (`raise_signal`'s ``split_gap``).
PKEY_SPLIT_GAP = 1024


def _pkey_run(handler_pkeys: str, split_gap: int = 0) -> tuple[Any, SignalGiven]:
    """raise_signal with a key-protected altstack that the interrupted code has closed (with
    ``split_gap``: only its mapping's top page, `raise_signal`), and what the model replays of
    it (the registers, the stack pointer at kill(), the altstack and its key)."""
    from fpstate.host.signals import raise_signal

    run = raise_signal(altstack_size=PKEY_ALTSTACK_SIZE, pkey_rights=PKEY_DENIED,
                       handler_pkeys=handler_pkeys, split_gap=split_gap or None)
    if not run.pkey or not run.kill_sp or not run.altstack_sp:  # the child's pkey calls failed
        from fpstate.errors import HostUnavailable

        raise HostUnavailable(f"the protection-key probe child did not get a key ({run.exit})")
    given = SignalGiven(run.before.raw, run.kill_sp, (run.altstack_sp, 0, PKEY_ALTSTACK_SIZE),
                        onstack=True, pkey=run.pkey, handler_pkeys=handler_pkeys,
                        split_gap=split_gap)
    return run, given


def _sigreturn_or_segv_facts(run: Any) -> Facts:
    """The host's answer to a sigreturn that may fail: the registers it restored, or the
    frame of the SIGSEGV it forced (what `pkey_sigreturn_model` answers)."""
    if run.sigreturn_ok and run.after is not None:
        return {"outcome": "restored",
                **prefixed("after", image_registers(host_system(), run.after.raw))}
    return {"outcome": "SIGSEGV", **_host_delivery_facts(run, usr1=False)}


def _key0_sigreturn_host() -> HostAnswer:
    """The SIGUSR1 handler sets AD for key 0 and returns: rt_sigreturn reads the frame (on
    the ordinary, key-0 stack) under that PKRU."""
    from fpstate.host.signals import raise_signal

    run = raise_signal(handler_pkeys="key0")
    if not run.kill_sp:
        from fpstate.errors import HostUnavailable

        raise HostUnavailable(f"the key-0 probe child did not reach kill() ({run.exit})")
    facts = _sigreturn_or_segv_facts(run)
    # The sigaltstack the child inherited (pytest's faulthandler installs one), which
    # uc_stack reports though SIGUSR1 has no SA_ONSTACK.
    sas = tuple(run.segv.uc_stack) if run.segv is not None else (0, 0, 0)
    return HostAnswer(facts, SignalGiven(run.before.raw, run.kill_sp, sas, handler_pkeys="key0"))


def _pkey_delivery_host(split_gap: int = 0) -> Any:
    def host() -> HostAnswer:
        run, given = _pkey_run("open", split_gap)
        return HostAnswer(_host_delivery_facts(run), given)

    return host


def _pkey_sigreturn_host(handler_pkeys: str, split_gap: int = 0) -> Any:
    def host() -> HostAnswer:
        run, given = _pkey_run(handler_pkeys, split_gap)
        return HostAnswer(_sigreturn_or_segv_facts(run), given)

    return host


def pkey_sigreturn_model(system: FpuSystem, g: SignalGiven) -> Facts:
    """`sigreturn_model`, and when sigreturn failed the frame of the SIGSEGV it forced."""
    m, t = model_sigreturn(system, g)
    if t.killed_by is None and t.user_sp == g.sp:
        return {"outcome": "restored", **prefixed("after", model_registers(m, 0))}
    return {"outcome": "SIGSEGV", **_model_delivery_facts(system, m, t)}


_PKEY_RULE = ("get_sigframe: sig_prepare_pkru (WRPKRU 0) before copy_fpstate_to_sigframe, "
              "update_pkru_in_sigframe; fpu__clear_user_states (init_pkru_value)")


# -- sigaltstack sizes ----------------------------------------------------------------------------

SS_ONSTACK, SS_DISABLE, SS_AUTODISARM = 1, 2, 1 << 31
#: (ss_size, ss_flags) in order, in one process (do_sigaltstack / sigaltstack_size_valid).
ALTSTACK_REQUESTS: tuple[tuple[int, int], ...] = (
    (2047, 0), (2048, 0), (0, 0), (100, SS_ONSTACK), (4096, 4), (4096, SS_AUTODISARM),
    (0, SS_DISABLE), (3375, 0), (3376, 0), (8192, SS_ONSTACK | SS_AUTODISARM),
    (1 << 40, 0),  # last: a stack this large covers the caller's sp (later calls: EPERM)
)


def _altstack_facts(errnos: Iterable[int]) -> Facts:
    return {f"sigaltstack(size={show(s)}, flags={show(f)})": errno_of(-e) if e else "OK"
            for (s, f), e in zip(ALTSTACK_REQUESTS, errnos, strict=True)}


def _altstack_host() -> HostAnswer:
    from fpstate.host.sigaltstack import AltstackRequest, sigaltstack_errnos

    errnos = sigaltstack_errnos([AltstackRequest(s, f) for s, f in ALTSTACK_REQUESTS])
    return HostAnswer(_altstack_facts(errnos))


def _altstack_model(system: FpuSystem, given: Any) -> Facts:
    m = Machine(system, 1)
    user_task(m)
    errnos = []
    for k, (size, flags) in enumerate(ALTSTACK_REQUESTS):
        base = 0x5000_0000_0000 + (k << 41)  # do_sigaltstack only records the range
        errnos.append(-m.syscall(0, sys_sigaltstack, base, size, flags))
    return _altstack_facts(errnos)


#: (altstack installed before the request, altstack asked for after it): a too-small one makes
#: the request fail (ENOSPC, nothing granted, the later one is fine); a large one lets it pass
#: and a later small one fails (ENOMEM).
AMX_ALTSTACKS: tuple[tuple[int, int], ...] = ((2048, 2048), (65536, 4096), (65536, 65536))


def _amx_altstack_facts(rows: Iterable[tuple[int, int, int, int, int, int]]) -> Facts:
    facts: Facts = {}
    for first, installed, req, perm, later, later_errno in rows:
        key = f"sigaltstack({first}) then REQ_XCOMP_PERM(18) then sigaltstack({later})"
        facts[key] = (errno_of(-installed), errno_of(-req), perm, errno_of(-later_errno))
    return facts


def _amx_altstack_host() -> HostAnswer:
    from fpstate.host.sigaltstack import amx_altstack_interplay

    rows = []
    for first, later in AMX_ALTSTACKS:
        r = amx_altstack_interplay(first, later)
        rows.append((first, r.installed_errno, r.req_errno, r.perm_after, later, r.later_errno))
    return HostAnswer(_amx_altstack_facts(rows))


def _amx_altstack_model(system: FpuSystem, given: Any) -> Facts:
    """validate_sigaltstack() on the request, sigaltstack_size_valid() afterwards."""
    rows = []
    for first, later in AMX_ALTSTACKS:
        m = Machine(system, 1)
        t = user_task(m)
        installed = -m.syscall(0, sys_sigaltstack, m.mmap(t, first), first, 0)
        req = -m.syscall(0, sys_arch_prctl, ARCH_REQ_XCOMP_PERM, ARCH_XCOMP_TILEDATA)
        out = t.user_sp - 64
        m.syscall(0, sys_arch_prctl, ARCH_GET_XCOMP_PERM, out)
        perm = int.from_bytes(t.process.mm.read(out, 8), "little")
        later_errno = -m.syscall(0, sys_sigaltstack, m.mmap(t, later), later, 0)
        rows.append((first, installed, req, perm, later, later_errno))
    return _amx_altstack_facts(rows)


# -- ia32 frames (a 32-bit program: fpstate.host.ia32) --------------------------------------------


@dataclass(frozen=True, slots=True)
class Ia32Given:
    """What the model replays of one 32-bit host run: the registers at delivery (the XSAVE
    image the kernel wrote behind the fsave header), the interrupted ESP, the frame kind and
    the handler's patches (offsets from the fsave header)."""

    image: bytes
    sp: int
    rt: bool
    patches: tuple[tuple[int, bytes], ...] = ()


#: The probe's state: eight x87 registers of every tag class around TOP = 5, an x87
#: exception pending (IE unmasked and raised: FXSAVE keeps FOP/FIP/FDP, which AMD drops
#: otherwise), distinct XMM0-7 and MXCSR.
def ia32_probe_state() -> bytes:
    from fpstate.host.ia32 import fxsave_image, x87

    st = (x87(0x3FFF, 1 << 63), x87(0, 0, 1), x87(0x7FFF, 1 << 63), x87(0, 0x1234),
          x87(0x4001, 1 << 62), x87(0x7FFF, 0xC000_0000_0000_0001), x87(0x4000, 5 << 61),
          x87(0x3FFE, 3 << 62))
    top = 5
    ftw = sum(1 << ((i + top) & 7) for i in range(6))  # ST6, ST7 empty
    return fxsave_image(fcw=0x0A7E, fsw=top << 11 | 0xC2A1, ftw=ftw, fop=0x123,
                        fip=0x11223344, fcs=0x0ABC, fdp=0x55667788, fds=0x0DEF, mxcsr=0x3FA0,
                        st=st, xmm=[bytes((0x10 * n + k) & 0xFF for k in range(16))
                                    for n in range(1, 9)])


def _ia32_facts(system: FpuSystem, esp: int, sc: bytes, frame: bytes, rt: bool,
                uc_flags: int | None, signo: int | None) -> Facts:
    """The facts of one ia32 frame: placement, the sigcontext's sp and fpstate, the fsave
    header field by field, the sw bytes, MAGIC2 and the registers of the XSAVE image."""
    fpstate = _u(sc, 76, "<I")
    cw, sw, tag, ip, cs, dp, ds = struct.unpack_from("<7I", frame)
    magic1, ext, xfeatures, size = struct.unpack_from("<IIQI", frame, 112 + SW)
    facts: Facts = {
        "frame": esp, "fpstate": fpstate, "fpstate - frame": fpstate - esp,
        "(frame + 4) % 16": (esp + 4) % 16, "(fpstate + 112) % 64": (fpstate + 112) % 64,
        "sc.sp": _u(sc, 28, "<I"), "sc.sp_at_signal": _u(sc, 68, "<I"),
        "header.cw": cw, "header.sw": sw, "header.tag": tag, "header.ipoff": ip,
        "header.cssel": cs, "header.dataoff": dp, "header.datasel": ds,
        "header.st": tuple(frame[28 + 10 * i:38 + 10 * i] for i in range(8)),
        "header.status": _u(frame, 108, "<H"), "header.magic": _u(frame, 110, "<H"),
        "sw.magic1": magic1, "sw.extended_size": ext, "sw.xfeatures": xfeatures,
        "sw.xstate_size": size, "magic2": _u(frame, 112 + size, "<I"),
        "XSTATE_BV": _u(frame, 112 + 512),
    }
    facts.update(prefixed("frame", image_registers(system, frame[112:112 + size])))
    if rt:
        facts["uc_flags"], facts["si_signo"] = uc_flags, signo
    return facts


def _ia32_host(rt: bool, patches: tuple[tuple[int, bytes], ...] = ()) -> Any:
    def host() -> HostAnswer:
        from fpstate.host.ia32 import ia32_signal

        run = ia32_signal(ia32_probe_state(), siginfo=rt, patches=patches)
        system = host_system()
        signo = None if run.siginfo is None else _u(run.siginfo, 0, "<i")
        facts = _ia32_facts(system, run.esp, run.sigcontext, run.frame, rt, run.uc_flags, signo)
        if patches:
            facts = _ia32_after_host(run)
        size = run.sw_bytes.xstate_size
        return HostAnswer(facts, Ia32Given(run.frame[112:112 + size], run.main_esp, rt, patches))

    return host


def _ia32_after_host(run: Any) -> Facts:
    if run.died_of is not None:
        return {"outcome": f"killed by {run.died_of}"}
    a = run.after
    return {"outcome": "restored", "after.fcw": a.fcw, "after.fsw": a.fsw, "after.ftw": a.ftw,
            "after.fop": a.fop, "after.fip": a.fip, "after.fdp": a.fdp, "after.mxcsr": a.mxcsr,
            "after.st": tuple(a.st), "after.xmm": tuple(a.xmm)}


def ia32_model_deliver(system: FpuSystem, g: Ia32Given) -> tuple[Machine, Task]:
    """handle_signal() of SIGUSR1 to a compat task whose handler was installed by the 32-bit
    rt_sigaction (SA_IA32_ABI | SA_RESTORER, SA_SIGINFO for rt), over the replayed
    registers; no SIGSEGV handler (as the probe)."""
    m = Machine(system, 1)
    t = user_task(m, sp=g.sp)
    load_registers(m, 0, g.image)
    t.handlers[SIGUSR1] = SigAction(SA_IA32_ABI | SA_RESTORER | (SA_SIGINFO if g.rt else 0))
    m.enter_kernel(0)
    t.pending.append(Signal(SIGUSR1))
    m.exit_to_user_mode(0)
    return m, t


def ia32_model(system: FpuSystem, g: Ia32Given) -> Facts:
    """The ia32 frame the model builds (ia32_setup_frame / ia32_setup_rt_frame) or, with
    patches, what the task runs with after sys32_(rt_)sigreturn."""
    m, t = ia32_model_deliver(system, g)
    mm = t.process.mm
    esp = t.user_sp
    sc = mm.read(esp + (RT_IA32_SC if g.rt else SIGFRAME_IA32_SC), 88)
    fpstate = _u(sc, 76, "<I")
    ext = _u(mm.read(fpstate + 112 + SW + 4, 4), 0, "<I")
    frame = mm.read(fpstate, ext)
    if not g.patches:
        return _ia32_facts(system, esp, sc, frame, g.rt, _u(mm.read(esp + 144, 4), 0, "<I"),
                           _u(mm.read(esp + 16, 4), 0, "<i"))
    for off, data in g.patches:
        mm.write(fpstate + off, data)
    handler_ia32_return(t, g.rt)
    m.syscall(0, sys32_rt_sigreturn if g.rt else sys32_sigreturn)
    if t.killed_by is not None:
        sig = t.killed_by.sig
        return {"outcome": f"killed by {'SIGSEGV' if sig == SIGSEGV else sig}"}
    regs = m.cpus[0].regs
    x = regs.component(0)
    xmm = regs.component(1)
    return {"outcome": "restored", "after.fcw": _u(x, 0, "<H"), "after.fsw": _u(x, 2, "<H"),
            "after.ftw": x[4], "after.fop": _u(x, 6, "<H"),
            "after.fip": _u(x, 8) & 0xFFFFFFFF, "after.fdp": _u(x, 16) & 0xFFFFFFFF,
            "after.mxcsr": regs.mxcsr,
            "after.st": tuple(x[32 + 16 * i:42 + 16 * i] for i in range(8)),
            "after.xmm": tuple(xmm[16 * i:16 * i + 16] for i in range(8))}


#: Handler patches of the ia32 sigreturn cases (offsets from the fsave header).
_IA32_HEADER_WINS = (
    (28, bytes.fromhex("00000000000000c0ff7f")),  # header _st[0] := a QNaN
    (112 + 32 + 16, bytes(10)),  # the FXSAVE area's ST1: overridden by the header's _st[1]
    # header cw: precision and rounding changed, IE still unmasked (masking it would have the
    # CPU's XRSTOR recompute FSW.ES and B, and AMD's FXSAVE then drop FIP/FDP: not modelled)
    (0, (0x027E).to_bytes(2, "little")),
    (112 + 160, bytes(range(0xA0, 0xB0))),  # XMM0 from the FXSAVE area: restored as written
)
_IA32_BAD_MXCSR = ((112 + 24, (0xFFFF3FA0).to_bytes(4, "little")),)
#: XSTATE_BV := x87 only (the probe's MXCSR is 0x3FA0): copy_uabi_to_xstate() copies MXCSR
#: with x87's bytes, and a compacted fpstate's XRSTORS without SSE in XSTATE_BV then puts
#: MXCSR to 1F80H; a standard-form XRSTOR would load 0x3FA0.
_IA32_NO_SSE = ((112 + 512, (1).to_bytes(8, "little")),)
#: The header's cw edited, XSTATE_BV := SSE only: copy_uabi_to_xstate() leaves x87 out of the
#: fpstate's XSTATE_BV, so the XRSTOR after convert_to_fxsr() puts x87 in its initial
#: configuration -- the header's edit is folded into bytes nothing loads.
_IA32_HEADER_WITHOUT_X87 = ((0, (0x027E).to_bytes(2, "little")),
                            (112 + 512, (2).to_bytes(8, "little")))
_IA32_RULE = ("ia32_setup_frame/ia32_setup_rt_frame, get_sigframe (ia32), "
              "copy_fpstate_to_sigframe, save_fsave_header, convert_from_fxsr")
_IA32_RETURN_RULE = ("sys32_sigreturn/sys32_rt_sigreturn, __fpu_restore_sig (ia32_fxstate), "
                     "copy_sigframe_from_user_to_xstate, convert_to_fxsr")


_FRAME_RULE = "get_sigframe, fpu__alloc_mathframe, copy_fpstate_to_sigframe, save_xstate_epilog"
_INIT_UPPER = 0xE4  # YMM, opmask, ZMM_Hi256, Hi16_ZMM

CASES: tuple[Case, ...] = (
    Case("sigframe/all-in-use", _FRAME_RULE + ", fpu__clear_user_states", _delivery(0),
         delivery_model),
    Case("sigframe/upper-state-init", _FRAME_RULE + " (XSAVE init optimisation)",
         _delivery(_INIT_UPPER), delivery_model),
    Case("sigframe/x87-sse-init", _FRAME_RULE + " (FP|SSE forced in XSTATE_BV)",
         _delivery(0x3), delivery_model),
    Case("sigframe/amx-permitted", _FRAME_RULE + " (permission alone: default user_size)",
         _amx_delivery("permitted"), delivery_model, host_amx_reason),
    Case("sigframe/amx-tiles-in-use", _FRAME_RULE + " (XFD realloc'ed fpstate)",
         _amx_delivery("in-use"), delivery_model, host_amx_reason),
    Case("sigframe/amx-tiles-released", _FRAME_RULE + " (SIGFRAME_INITOPT: tiles not written)",
         _amx_delivery("released"), delivery_model, host_amx_reason),
    *(Case(f"sigaltstack/deliver-{size}", "get_sigframe on the altstack, __on_sig_stack, "
           "force_sigsegv", _altstack_delivery(size), delivery_model)
      for size in (2952, 2953, 3376, 8192)),
    *(Case(f"sigreturn/{name}", "fpu__restore_sig, check_xstate_in_sigframe, "
           "restore_fpregs_from_user", _sigreturn(rows), sigreturn_model)
      for name, rows in SIGRETURN_ROWS.items()),
    Case("sigaltstack/sizes", "do_sigaltstack, sigaltstack_size_valid", _altstack_host,
         _altstack_model),
    Case("sigaltstack/pkey-closed-deliver", _PKEY_RULE, _pkey_delivery_host(), delivery_model,
         host_pku_reason),
    Case("sigreturn/pkey-closed-handler-opens", _PKEY_RULE + "; rt_sigreturn under the "
         "handler's PKRU (it opened every key)", _pkey_sigreturn_host("open"),
         pkey_sigreturn_model, host_pku_reason),
    Case("sigreturn/pkey-closed-handler-keeps", "rt_sigreturn reads the frame under the "
         "handler's PKRU (init_pkru_value closes the altstack's key): badframe, "
         "force_sig(SIGSEGV) on the altstack", _pkey_sigreturn_host("closed"),
         pkey_sigreturn_model, host_pku_reason),
    Case("sigreturn/key0-closed-by-handler", "rt_sigreturn reads the frame under the "
         "handler's PKRU, which denies key 0 (its own stack's): badframe before "
         "fpu__restore_sig, force_sig(SIGSEGV) whose frame holds that PKRU",
         _key0_sigreturn_host, pkey_sigreturn_model, host_pku_reason),
    Case("sigaltstack/pkey-split-deliver", _PKEY_RULE + "; the frame runs through two "
         "mappings (the keyed top page and the key-0 one below)",
         _pkey_delivery_host(PKEY_SPLIT_GAP), delivery_model, host_pku_reason),
    Case("sigreturn/pkey-split-handler-opens", "rt_sigreturn reads a frame that runs through "
         "two mappings, under the handler's PKRU (it opened every key)",
         _pkey_sigreturn_host("open", PKEY_SPLIT_GAP), pkey_sigreturn_model, host_pku_reason),
    Case("sigreturn/pkey-split-handler-keeps", "rt_sigreturn under init_pkru_value: "
         "restore_sigcontext reads the key-0 part (regs->sp back to the interrupted stack), "
         "fpu__restore_sig faults in the keyed page: badframe, force_sig(SIGSEGV) on the "
         "interrupted stack", _pkey_sigreturn_host("closed", PKEY_SPLIT_GAP),
         pkey_sigreturn_model, host_pku_reason),
    Case("sigaltstack/amx-enospc-enomem", "validate_sigaltstack, sigaltstack_size_valid",
         _amx_altstack_host, _amx_altstack_model, host_amx_reason),
    Case("sigreturn/failure-sigsegv-frame", "rt_sigreturn badframe: fpu__clear_user_states, "
         "signal_fault -> force_sig(SIGSEGV)", _segv_host, _segv_model),
    Case("sigframe/ia32", _IA32_RULE, _ia32_host(False), ia32_model),
    Case("sigframe/ia32-rt", _IA32_RULE, _ia32_host(True), ia32_model),
    Case("sigreturn/ia32-header-wins", _IA32_RETURN_RULE, _ia32_host(False, _IA32_HEADER_WINS),
         ia32_model),
    Case("sigreturn/ia32-rt-header-wins", _IA32_RETURN_RULE,
         _ia32_host(True, _IA32_HEADER_WINS), ia32_model),
    Case("sigreturn/ia32-bad-mxcsr", _IA32_RETURN_RULE + " (MXCSR reserved bits: badframe)",
         _ia32_host(False, _IA32_BAD_MXCSR), ia32_model),
    Case("sigreturn/ia32-header-edit-xstate-bv-without-x87", _IA32_RETURN_RULE + " (the "
         "header's x87 is folded in, then XSTATE_BV without x87 restores x87's initial "
         "configuration)", _ia32_host(False, _IA32_HEADER_WITHOUT_X87), ia32_model),
    Case("sigreturn/ia32-xstate-bv-without-sse", _IA32_RETURN_RULE + " (XSTATE_BV without "
         "SSE: MXCSR from the frame with x87's bytes, then the fpstate's XRSTOR(S): 1F80H "
         "where it is compacted)", _ia32_host(False, _IA32_NO_SSE), ia32_model),
)
