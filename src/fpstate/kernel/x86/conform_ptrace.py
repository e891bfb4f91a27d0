"""Kernel-layer cases about ptrace: NT_X86_XSTATE and NT_PRFPREG, read and written.

The real side is `fpstate.host.ptrace`: a child loads pattern registers and stops itself with
SIGSTOP; the parent reads both regsets, makes a list of PTRACE_SETREGSET writes (reading
NT_X86_XSTATE back after each) and resumes it; the child XSAVEs what it runs with. The model
side replays the run on a model task holding the same registers, stopped (switch_fpu saves it),
with the tracer on the CPU: ptrace_regset() of `fpstate.kernel.x86.regset`, then PTRACE_CONT
and the return to user mode of the tracee.

Compared: the bytes GETREGSET returns (standard format, XCR0 at 464, init components as
zeros), the errno of every write (xstateregs_set / xfpregs_set / copy_uabi_to_xstate /
ptrace_regset), what the kernel stored (the read-back after each write), the iov_len clamping
and -EINVAL rules, and the registers the tracee runs with after PTRACE_CONT. The random writes
(`random_mutation`) mutate a real image where the kernel's validation looks: XSTATE_BV,
XCOMP_BV, the reserved header bytes, MXCSR and MXCSR_MASK, sw_reserved, component bytes and
the write length.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fpstate.kernel.x86.conform import (
    Case,
    Facts,
    HostAnswer,
    errno_of,
    host_pku_reason,
    host_system,
    image_registers,
    keys_taken_before,
    load_registers,
    model_registers,
    pkru_offset,
    prefixed,
    user_task,
)
from fpstate.kernel.x86.mm import PROT_READ
from fpstate.kernel.x86.pkeys import sys_mprotect, sys_pkey_alloc, sys_pkey_mprotect
from fpstate.kernel.x86.regset import (
    NT_PRFPREG,
    NT_PRXFPREG,
    NT_X86_XSTATE,
    PTRACE_GETREGSET,
    PTRACE_SETREGSET,
    VIEW_IA32,
    ptrace_regset,
    sys_ptrace_regset_iov,
)
from fpstate.kernel.x86.sched import Machine
from fpstate.kernel.x86.types import FpuSystem
from fpstate.x86.progen import PKRU_KEY0

READ_BUFFER = 16384  #: iov_len offered to GETREGSET (clamped by the kernel to the regset size)
NOTE_NAMES = {NT_X86_XSTATE: "NT_X86_XSTATE", NT_PRFPREG: "NT_PRFPREG"}


@dataclass(frozen=True, slots=True)
class Write:
    """One PTRACE_SETREGSET: ``data`` with iov_len ``length`` (zero-padded when longer)."""

    note: int
    data: bytes
    what: str
    length: int


@dataclass(frozen=True, slots=True)
class PtraceGiven:
    before: bytes  #: the tracee's registers (standard XSAVE image)
    writes: tuple[Write, ...]


def _read_fact(prefix: str, errno: int, data: bytes) -> Facts:
    return {prefix: data if not errno else errno_of(-errno)}


def _write_facts(k: int, w: Write, errno: int, back: tuple[int, bytes]) -> Facts:
    key = f"write {k:03d} {NOTE_NAMES.get(w.note, hex(w.note))} {w.what}"
    return {f"{key}: errno": errno_of(-errno) if errno else "OK",
            **_read_fact(f"{key}: NT_X86_XSTATE read back", *back)}


# -- the host side --------------------------------------------------------------------------------


def _host_session(writes: Sequence[Write]) -> tuple[Facts, Any]:
    from fpstate.host.ptrace import RegsetWrite, ptrace_session

    s = ptrace_session([RegsetWrite(w.note, w.data, w.what, w.length) for w in writes])
    facts: Facts = {"stop signal": s.stop_signal}
    facts.update(_read_fact("GET NT_X86_XSTATE", s.xstate.errno, s.xstate.data))
    facts.update(_read_fact("GET NT_PRFPREG", s.fpregs.errno, s.fpregs.data))
    for k, (w, r) in enumerate(zip(writes, s.writes, strict=True)):
        facts.update(_write_facts(k, w, r.errno, (r.read_back.errno, r.read_back.data)))
    facts["tracee ran after PTRACE_CONT"] = s.after is not None
    if s.after is not None:
        facts.update(prefixed("after", image_registers(host_system(), s.after.raw)))
    return facts, s


def _base_images() -> tuple[bytes, bytes]:
    """NT_X86_XSTATE and NT_PRFPREG of a stopped pattern child (the bases writes mutate)."""
    from fpstate.host.ptrace import ptrace_session

    s = ptrace_session()
    return s.xstate.data, s.fpregs.data


# -- the model side -------------------------------------------------------------------------------


def ptrace_model(system: FpuSystem, g: PtraceGiven) -> Facts:
    """The tracee holds ``g.before`` and is stopped; the tracer reads, writes and resumes."""
    m = Machine(system, 1)
    t = user_task(m, 0, comm="tracee")
    load_registers(m, 0, g.before)
    m.stop(t)
    user_task(m, 0, comm="tracer")
    c = m.enter_kernel(0)

    def get(note: int) -> tuple[int, bytes]:
        ret, data = ptrace_regset(c, t, PTRACE_GETREGSET, note, READ_BUFFER)
        return -ret, data

    facts: Facts = {"stop signal": 19}
    facts.update(_read_fact("GET NT_X86_XSTATE", *get(NT_X86_XSTATE)))
    facts.update(_read_fact("GET NT_PRFPREG", *get(NT_PRFPREG)))
    for k, w in enumerate(g.writes):
        data = w.data.ljust(w.length, b"\0")
        ret, _ = ptrace_regset(c, t, PTRACE_SETREGSET, w.note, w.length, data)
        facts.update(_write_facts(k, w, -ret, get(NT_X86_XSTATE)))
    m.exit_to_user_mode(0)
    m.resume(t)
    m.run(0, t)
    facts["tracee ran after PTRACE_CONT"] = True
    facts.update(prefixed("after", model_registers(m, 0)))
    return facts


# -- the write lists ------------------------------------------------------------------------------


def _put(buf: bytes, off: int, fmt: str, value: int) -> bytes:
    out = bytearray(buf)
    struct.pack_into(fmt, out, off, value)
    return bytes(out)


def rule_writes(xstate: bytes, fpregs: bytes, xcr0: int) -> tuple[Write, ...]:
    """The writes of kernel-findings section 6, in order (state carries from one to the next);
    the last leaves XSTATE_BV = YMM only with MXCSR 0xffc0 in the buffer."""
    n = len(xstate)
    X, F = NT_X86_XSTATE, NT_PRFPREG
    xmm5 = bytearray(fpregs)
    xmm5[160 + 80:160 + 96] = bytes(range(0x50, 0x60))
    xmm3 = bytearray(xstate)
    xmm3[160 + 48:160 + 64] = bytes(range(0x30, 0x40))
    rows = [
        Write(X, xstate, "unchanged", n),
        Write(X, xstate, "8 bytes short", n - 8),
        Write(X, xstate, "8 bytes long", n + 8),
        Write(X, xstate, "not a multiple of 8", n - 2),
        *(Write(X, _put(xstate, 512, "<Q", xcr0 | 1 << b), f"XSTATE_BV bit {b}", n)
          for b in (8, 9, 11)),
        Write(X, _put(xstate, 520, "<Q", 1 << 63 | xcr0), "XCOMP_BV compacted", n),
        Write(X, _put(xstate, 512 + 56, "<B", 1), "header byte 56", n),
        Write(X, _put(xstate, 24, "<I", 0x8000_1F80), "MXCSR bit 31", n),
        Write(X, _put(xstate, 24, "<I", 0x21F80), "MXCSR 0x21f80", n),
        Write(X, xstate[:464] + b"\xff" * 48 + xstate[512:], "sw_reserved 0xff", n),
        Write(X, bytes(xmm3), "XMM3 edited", n),
        Write(F, bytes(xmm5), "XMM5 edited", 512),
        Write(F, fpregs, "504 bytes", 504),
        Write(F, fpregs, "520 bytes", 520),
        Write(F, _put(fpregs, 24, "<I", 0x8000_1F80), "MXCSR bit 31", 512),
        Write(X, _put(xstate, 512, "<Q", 0x3), "XSTATE_BV FP|SSE", n),
        Write(X, _put(xstate, 512, "<Q", 0), "XSTATE_BV 0", n),
        Write(X, _put(_put(xstate, 512, "<Q", 0x4), 24, "<I", 0xFFC0),
              "XSTATE_BV YMM only, MXCSR 0xffc0", n),
    ]
    return tuple(rows)


@dataclass(frozen=True, slots=True)
class Mutation:
    """Where a random NT_X86_XSTATE write differs from a real image."""

    xstate_bv: int
    xcomp_bv: int
    reserved: tuple[int, int] | None  #: (header byte 16..63, value)
    mxcsr: int
    mxcsr_mask: int | None
    sw_reserved: bytes | None  #: 48 bytes at 464
    pokes: tuple[tuple[int, int], ...]  #: (offset, byte) anywhere in the image
    length_delta: int  #: iov_len - the image size

    def apply(self, base: bytes) -> Write:
        buf = bytearray(base)
        struct.pack_into("<QQ", buf, 512, self.xstate_bv, self.xcomp_bv)
        struct.pack_into("<I", buf, 24, self.mxcsr)
        if self.mxcsr_mask is not None:
            struct.pack_into("<I", buf, 28, self.mxcsr_mask)
        if self.sw_reserved is not None:
            buf[464:512] = self.sw_reserved
        for off, value in self.pokes:
            buf[off % len(buf)] = value
        at = pkru_offset(host_system())
        if at is not None and at < len(buf):
            # The tracee resumes with this PKRU (thread.pkru): key 0's rights stay, or it
            # dies of a protection-key fault on its own stack, which the model (no page
            # tables) cannot answer -- fpstate.x86.progen keeps the same rule.
            buf[at] &= ~PKRU_KEY0
        if self.reserved is not None:
            buf[512 + self.reserved[0]] = self.reserved[1]
        what = (f"XSTATE_BV={self.xstate_bv:#x} XCOMP_BV={self.xcomp_bv:#x} "
                f"MXCSR={self.mxcsr:#x}" + (f" hdr[{self.reserved[0]}]={self.reserved[1]:#x}"
                                             if self.reserved else "")
                + (f" len{self.length_delta:+d}" if self.length_delta else ""))
        return Write(NT_X86_XSTATE, bytes(buf), what, max(0, len(base) + self.length_delta))


def random_mutation(rng: random.Random, xcr0: int) -> Mutation:
    """A mutation biased towards the kernel's decision points (each check is hit often)."""
    pick = rng.random
    sub = rng.getrandbits(64) & xcr0
    bv = rng.choice([sub, xcr0, sub | 1 << rng.randrange(64), rng.getrandbits(64), 0x4, 0])
    xcomp = 0 if pick() < 0.8 else rng.choice([1 << 63, 1 << 63 | xcr0, 1 << rng.randrange(64)])
    reserved = None if pick() < 0.8 else (rng.randrange(16, 64), rng.randrange(1, 256))
    mxcsr = rng.choice([0x1F80, 0xFFC0, 0x21F80, rng.getrandbits(32), rng.getrandbits(16),
                        0x8000_1F80, 0x1F80 | 1 << rng.randrange(32)])
    mask = None if pick() < 0.7 else rng.getrandbits(32)
    sw = None if pick() < 0.8 else rng.randbytes(48)
    pokes = tuple((rng.randrange(4096), rng.randrange(256)) for _ in range(rng.randrange(4)))
    delta = 0 if pick() < 0.85 else rng.choice([-8, 8, -2, 64, -16])
    return Mutation(bv, xcomp, reserved, mxcsr, mask, sw, pokes, delta)


RANDOM_WRITES = 256
RANDOM_SEED = 0x6A7E
_RULE = "ptrace_regset, xstateregs_get/set, xfpregs_get/set, copy_uabi_to_xstate"


def _rules_host() -> HostAnswer:
    from fpstate.host.child import register_class

    xstate, fpregs = _base_images()
    writes = rule_writes(xstate, fpregs, register_class().xcr0)
    facts, s = _host_session(writes)
    return HostAnswer(facts, PtraceGiven(s.before.raw, writes))


def random_case(count: int = RANDOM_WRITES, seed: int = RANDOM_SEED) -> Case:
    """``count`` random NT_X86_XSTATE writes (`random_mutation` seeded with ``seed``) in one
    traced child, model vs real."""

    def host() -> HostAnswer:
        from fpstate.host.child import register_class

        xstate, _ = _base_images()
        rng = random.Random(seed)
        xcr0 = register_class().xcr0
        writes = tuple(random_mutation(rng, xcr0).apply(xstate) for _ in range(count))
        facts, s = _host_session(writes)
        return HostAnswer(facts, PtraceGiven(s.before.raw, writes))

    return Case("ptrace/set-random", f"{_RULE} on {count} random buffers (seed {seed:#x})",
                host, ptrace_model)


def _get_host() -> HostAnswer:
    facts, s = _host_session(())
    return HostAnswer(facts, PtraceGiven(s.before.raw, ()))


#: (note, iov_len) of GETREGSET reads: ptrace_regset's multiple-of-8 rule and clamping.
LENGTH_READS: tuple[tuple[int, int], ...] = (
    (NT_X86_XSTATE, 4), (NT_X86_XSTATE, 0), (NT_X86_XSTATE, 512), (NT_X86_XSTATE, 16384),
    (0x999, 16), (NT_PRFPREG, 8), (NT_PRFPREG, 12), (NT_PRFPREG, 4096),
)


def _lengths_host() -> HostAnswer:
    from fpstate.host.ptrace import read_regsets

    reads = read_regsets(LENGTH_READS)
    return HostAnswer({f"GETREGSET {hex(n)} iov_len {k}": (errno_of(-r.errno) if r.errno
                                                           else r.returned)
                       for (n, k), r in zip(LENGTH_READS, reads, strict=True)})


def _lengths_model(system: FpuSystem, given: Any) -> Facts:
    m = Machine(system, 1)
    t = user_task(m, 0, comm="tracee")
    m.stop(t)
    user_task(m, 0, comm="tracer")
    c = m.enter_kernel(0)
    out = {}
    for note, n in LENGTH_READS:
        ret, data = ptrace_regset(c, t, PTRACE_GETREGSET, note, n)
        out[f"GETREGSET {hex(note)} iov_len {n}"] = errno_of(ret) if ret else len(data)
    return out


# -- a compat tracee: the ia32 regset view (fpstate.host.ia32_ptrace) ------------------------------

#: The NT_PRFPREG write of the ia32 case: cw changed, ST0 = -10.0, fip/foo new, fcs with a
#: high half (it becomes FOP), fos (ignored) and a tag word calling every register valid
#: (only empty or not survives: twd_i387_to_fxsr).
def _ia32_env() -> bytes:
    from fpstate.host.ia32 import x87

    st = [x87(0x4002, 0xA000_0000_0000_0000, sign=1)] + [bytes(10)] * 7
    # swd keeps the probe's pending exception (IE unmasked in cw): without one this AMD CPU
    # neither restores nor saves FOP/FIP/FDP, and the model's XRSTOR does not recompute ES
    head = struct.pack("<7I", 0xFFFF0A7E, 0xFFFFEAA1, 0xFFFF0000, 0x0BADC0DE, 0x04560073,
                       0x00C0FFEE, 0xFFFF0063)
    return head + b"".join(st)


IA32_GET_LENGTHS = (4096, 108, 28)


def _ia32_view_facts(reads: Sequence[tuple[str, int, bytes]], xfp: tuple[int, bytes],
                     short_set: int, full_set: int, after_set: tuple[int, bytes],
                     after: dict[str, Any]) -> Facts:
    facts: Facts = {}
    for name, err, data in reads:
        facts[name] = errno_of(-err) if err else data
    facts["GET NT_PRXFPREG"] = errno_of(-xfp[0]) if xfp[0] else xfp[1]
    facts["SET NT_PRFPREG 104 bytes"] = errno_of(-short_set)
    facts["SET NT_PRFPREG 108 bytes"] = errno_of(-full_set)
    facts["GET NT_PRFPREG after the set"] = (errno_of(-after_set[0]) if after_set[0]
                                             else after_set[1])
    facts.update(prefixed("tracee after PTRACE_CONT", after))
    return facts


def _ia32_after(fx: bytes) -> dict[str, Any]:
    """What a 32-bit FXSAVE (or the model's x87 component, its FIP/FDP cut to 32 bits) says
    of the state the tracee resumed with; FCS/FDS are left out (a 64-bit save has none)."""
    u16 = lambda off: int.from_bytes(fx[off:off + 2], "little")  # noqa: E731
    u32 = lambda off: int.from_bytes(fx[off:off + 4], "little")  # noqa: E731
    return {"FCW": u16(0), "FSW": u16(2), "FTW": fx[4], "FOP": u16(6), "FIP": u32(8),
            "FDP": u32(16), "ST": tuple(fx[32 + 16 * i:42 + 16 * i] for i in range(8))}


def _ia32_view_host() -> HostAnswer:
    from fpstate.host.ia32_ptrace import ia32_ptrace
    from fpstate.kernel.x86.conform_signal import ia32_probe_state

    run = ia32_ptrace(ia32_probe_state(), set_fp=_ia32_env(), get_lengths=IA32_GET_LENGTHS)
    if run.after_fxsave is None or run.fp_after_set is None:
        from fpstate.errors import HostUnavailable

        raise HostUnavailable(f"the 32-bit tracee did not finish (signal {run.exit_signal})")
    reads = [(f"GET NT_PRFPREG iov_len {r.offered}", r.errno, r.data)
             for r in (*run.fp_lengths, *run.word_rule)]
    facts = _ia32_view_facts(reads, (run.xfp.errno, run.xfp.data), run.short_set_errno or 0,
                             run.set_errno or 0, (run.fp_after_set.errno, run.fp_after_set.data),
                             _ia32_after(run.after_fxsave))
    return HostAnswer(facts, run.xstate.data)


def ia32_view_model(system: FpuSystem, image: bytes) -> Facts:
    """A stopped compat tracee holding the host's registers (its NT_X86_XSTATE image); the
    tracer reads and writes through the ia32 view (VIEW_IA32) and resumes it."""
    m = Machine(system, 1)
    t = user_task(m, 0, comm="tracee")
    load_registers(m, 0, image)
    m.stop(t)
    user_task(m, 0, comm="tracer")
    c = m.enter_kernel(0)

    def get(n: int) -> tuple[int, bytes]:
        ret, data = ptrace_regset(c, t, PTRACE_GETREGSET, NT_PRFPREG, n, view=VIEW_IA32)
        return -ret, data

    reads = [(f"GET NT_PRFPREG iov_len {n}", *get(n)) for n in (*IA32_GET_LENGTHS, 12, 10)]
    ret, xfp = ptrace_regset(c, t, PTRACE_GETREGSET, NT_PRXFPREG, 512, view=VIEW_IA32)
    env = _ia32_env()
    short = ptrace_regset(c, t, PTRACE_SETREGSET, NT_PRFPREG, 104, env[:104], VIEW_IA32)[0]
    full = ptrace_regset(c, t, PTRACE_SETREGSET, NT_PRFPREG, 108, env, VIEW_IA32)[0]
    after_set = get(108)
    m.exit_to_user_mode(0)
    m.resume(t)
    m.run(0, t)
    x87 = m.cpus[0].regs.component(0)
    return _ia32_view_facts(reads, (-ret, xfp), -short, -full, after_set, _ia32_after(x87))


# -- the tracer's own memory behind a protection key (fpstate.host.ptrace.keyed_regset_session) --

_KEYED_RULE = ("ptrace_request (__get_user/__put_user of the iovec), copy_regset_to_user, "
               "xstateregs_set/xfpregs_set copy_from_user: under the tracer's PKRU")


def _keyed_calls(n: int) -> tuple[Any, ...]:
    """The calls of the case, in order (``n``: the host's NT_X86_XSTATE size). Each SETREGSET
    edits one XMM register of the tracee's first image (XMM0..XMM4 at 160 + 16 * i), so the
    read-backs and the registers the tracee resumes with say which writes took effect. The
    two after them keep the iovec in a read-only page (a debugger's const struct iovec): the
    same __put_user() fault as a key's WD, without protection keys. The last reads into a
    buffer that runs into a page whose key the tracer closed: copy_to_user() stores the bytes
    before that page."""
    from fpstate.host.ptrace import KEYED_BUFFER as B
    from fpstate.host.ptrace import KEYED_IOVEC as V
    from fpstate.host.ptrace import KEYED_LAST_PAGE as L
    from fpstate.host.ptrace import KeyedRegsetCall as K

    G, S, X, F = PTRACE_GETREGSET, PTRACE_SETREGSET, NT_X86_XSTATE, NT_PRFPREG

    def xmm(i: int) -> tuple[tuple[int, bytes], ...]:
        return ((160 + 16 * i, bytes(range(0x10 * (i + 8), 0x10 * (i + 9)))),)

    return (
        K("GET NT_X86_XSTATE, buffer's key open", G, X, READ_BUFFER, B, 0),
        K("GET NT_X86_XSTATE, buffer's key AD", G, X, READ_BUFFER, B, 1),
        K("GET NT_X86_XSTATE, buffer's key WD", G, X, READ_BUFFER, B, 2),
        K("GET NT_PRFPREG, buffer's key AD|WD", G, F, 512, B, 3),
        K("GET NT_X86_XSTATE, iovec's key WD", G, X, READ_BUFFER, V, 2),
        K("GET NT_X86_XSTATE, iovec's key AD", G, X, READ_BUFFER, V, 1),
        K("SET NT_X86_XSTATE XMM0, buffer's key AD", S, X, n, B, 1, xmm(0)),
        K("SET NT_PRFPREG 16 bytes, buffer's key AD", S, F, 16, B, 1),
        K("SET NT_PRFPREG XMM1, buffer's key AD", S, F, 512, B, 1, xmm(1)),
        K("SET NT_X86_XSTATE XMM2, buffer's key WD", S, X, n, B, 2, xmm(2)),
        K("GET NT_X86_XSTATE after it, keys open", G, X, READ_BUFFER, B, 0),
        K("SET NT_X86_XSTATE XMM3, iovec's key WD", S, X, n, V, 2, xmm(3)),
        K("GET NT_X86_XSTATE after it, keys open", G, X, READ_BUFFER, B, 0),
        K("GET NT_X86_XSTATE, iovec read-only", G, X, READ_BUFFER, B, 0,
          iovec_read_only=True),
        K("SET NT_X86_XSTATE XMM4, iovec read-only", S, X, n, B, 0, xmm(4),
          iovec_read_only=True),
        K("GET NT_X86_XSTATE 1000 bytes before a page whose key is AD", G, X, 4096, L, 1,
          offset=READ_BUFFER - 4096 - 1000),
    )


@dataclass(frozen=True, slots=True)
class KeyedGiven:
    key: int  #: the host tracer's pkey_alloc()
    image: bytes  #: the tracee's NT_X86_XSTATE before the calls
    calls: tuple[Any, ...]  #: fpstate.host.ptrace.KeyedRegsetCall
    fill: int  #: the buffer's bytes before each call (KEYED_FILL)
    iovec: str  #: KEYED_IOVEC, the name of the iovec's page in the calls
    buffer: str  #: KEYED_BUFFER, the name of the whole buffer
    last_page: str  #: KEYED_LAST_PAGE, the name of the buffer's last page


def _keyed_facts(rows: Sequence[tuple[Any, int, int, bytes]]) -> Facts:
    facts: Facts = {}
    for k, (call, errno, iov_len, buffer) in enumerate(rows):
        key = f"{k:02d} {call.what}"
        facts[f"{key}: errno"] = errno_of(-errno)
        facts[f"{key}: iov_len after"] = iov_len
        facts[f"{key}: buffer after"] = buffer
    return facts


def _keyed_host() -> HostAnswer:
    from fpstate.host.child import host_user_xstate_size
    from fpstate.host.ptrace import (
        KEYED_BUFFER,
        KEYED_FILL,
        KEYED_IOVEC,
        KEYED_LAST_PAGE,
        keyed_regset_session,
    )

    calls = _keyed_calls(host_user_xstate_size())
    s = keyed_regset_session(calls)
    facts = {"pkey_alloc": s.key}
    facts.update(_keyed_facts([(c, r.errno, r.iov_len, r.buffer)
                               for c, r in zip(calls, s.results, strict=True)]))
    facts["tracee ran after PTRACE_CONT"] = s.after is not None
    if s.after is not None:
        facts.update(prefixed("after", image_registers(host_system(), s.after.raw)))
    return HostAnswer(facts, KeyedGiven(s.key, s.image, calls, KEYED_FILL, KEYED_IOVEC,
                                        KEYED_BUFFER, KEYED_LAST_PAGE))


def keyed_model(system: FpuSystem, g: KeyedGiven) -> Facts:
    """A stopped tracee holding ``g.image``; a tracer that allocated the key the host got
    gives it, call by call, to its iovec's page or to its buffer, sets its PKRU rights for
    it and makes the call (`sys_ptrace_regset_iov`); then PTRACE_CONT."""
    from fpstate.kernel.x86.signal import read_pkru

    m = Machine(system, 1)
    t = user_task(m, 0, comm="tracee")
    load_registers(m, 0, g.image)
    m.stop(t)
    tracer = user_task(m, 0, comm="tracer")
    keys_taken_before(tracer, g.key)
    key = m.syscall(0, sys_pkey_alloc, 0, 0)
    iov, buf = m.mmap(tracer, 4096), m.mmap(tracer, READ_BUFFER)
    mm, c = tracer.process.mm, m.cpus[0]
    rows = []
    for call in g.calls:
        m.syscall(0, sys_pkey_mprotect, iov, 4096, key if call.keyed == g.iovec else 0)
        m.syscall(0, sys_pkey_mprotect, buf, READ_BUFFER, key if call.keyed == g.buffer else 0)
        if call.keyed == g.last_page:
            m.syscall(0, sys_pkey_mprotect, buf + READ_BUFFER - 4096, 4096, key)
        base = buf + call.offset
        mm.copy_to_user(buf, bytes([g.fill]) * READ_BUFFER)  # the tracer's own stores
        data = call.payload(g.image)
        if data:
            mm.copy_to_user(base, data)
        mm.write(iov, struct.pack("<QQ", base, call.length))
        if call.iovec_read_only:  # the next call's pkey_mprotect makes it writable again
            m.syscall(0, sys_mprotect, iov, 4096, PROT_READ)
        opened = read_pkru(c)  # the tracer's WRPKRUs around the call, in user mode
        c.regs.wrpkru(opened & ~(0b11 << 2 * key) | call.rights << 2 * key)
        ret = m.syscall(0, sys_ptrace_regset_iov, t, call.req, call.note, iov)
        c.regs.wrpkru(opened)
        rows.append((call, -ret, int.from_bytes(mm.read(iov + 8, 8), "little"),
                     mm.peek(base, call.length)))
    facts: Facts = {"pkey_alloc": key}
    facts.update(_keyed_facts(rows))
    m.resume(t)
    m.run(0, t)
    facts["tracee ran after PTRACE_CONT"] = True
    facts.update(prefixed("after", model_registers(m, 0)))
    return facts


CASES: tuple[Case, ...] = (
    Case("ptrace/get-and-resume", _RULE + ", __copy_xstate_to_uabi_buf", _get_host, ptrace_model),
    Case("ptrace/iov-lengths", "ptrace_regset (iov_len % 8, clamping, unknown note)",
         _lengths_host, _lengths_model),
    Case("ptrace/set-rules", _RULE + ", validate_user_xstate_header", _rules_host, ptrace_model),
    random_case(),
    Case("ptrace/ia32-view", "task_user_regset_view (ia32), ptrace_regset (4-byte words), "
         "fpregs_get/__convert_from_fxsr, fpregs_set/convert_to_fxsr, xfpregs_get",
         _ia32_view_host, ia32_view_model),
    Case("ptrace/pkey-closed-tracer-buffer", _KEYED_RULE, _keyed_host, keyed_model,
         host_pku_reason),
)
