"""sigaltstack(2) against the real kernel: which sizes it accepts, where the frame lands, how
small an alternate stack may be before delivery overflows it, and (AMX hosts only) the
interplay with ARCH_REQ_XCOMP_PERM.

Kernel paths exercised: ``do_sigaltstack`` (kernel/signal.c: SS_DISABLE/SS_ONSTACK/0 or
-EINVAL; ss_size < MINSIGSTKSZ (2048) or !sigaltstack_size_valid() -> -ENOMEM),
``sigaltstack_size_valid`` (arch/x86/kernel/signal.c: only enforced when dynamic FPU features
are enabled or strict_sas_size), ``get_sigframe`` (no red zone on entry to the altstack; the
frame must satisfy __on_sig_stack or the kernel reports "overflowed sigaltstack" and forces
SIGSEGV) and ``validate_sigaltstack`` (arch/x86/kernel/fpu/xstate.c: an existing altstack
smaller than the frame for the new permission -> -ENOSPC from ARCH_REQ_XCOMP_PERM).
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from fpstate.errors import HostUnavailable
from fpstate.host import native
from fpstate.host.child import (
    PAGE,
    SS_DISABLE,
    SYS,
    SharedMemory,
    raw_syscall,
    run_child,
)
from fpstate.host.prctl import ARCH_GET_XCOMP_PERM, ARCH_REQ_XCOMP_PERM, ARCH_XCOMP_TILEDATA
from fpstate.host.signals import SignalRun, raise_signal

SS_ONSTACK = 1
SS_AUTODISARM = 1 << 31


@dataclass(frozen=True, slots=True)
class AltstackRequest:
    """One sigaltstack(ss) call: ss_size = ``size`` (ss_sp = a fresh mapping of up to 1 MiB),
    ss_flags = ``flags``."""

    size: int
    flags: int = 0


def sigaltstack_errnos(requests: Sequence[AltstackRequest], *, timeout: float = 20.0
                       ) -> tuple[int, ...]:
    """Make the ``requests`` in order in one forked child; return each errno (0 accepted).
    Kernel path: do_sigaltstack."""
    requests = tuple(requests)
    shm = SharedMemory(8 * (len(requests) + 1))

    def body() -> int:
        keep = []
        for i, req in enumerate(requests):
            # sigaltstack() only records the range; map at most 1 MiB of it
            span = (min(max(req.size, 1), 1 << 20) + PAGE - 1) // PAGE * PAGE + PAGE
            region = mmap.mmap(-1, span, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            keep.append(region)
            base = ctypes.addressof(ctypes.c_char.from_buffer(region))
            ss = (ctypes.c_uint64 * 3)(base, req.flags & 0xFFFFFFFF, req.size)
            ret = raw_syscall(SYS["sigaltstack"], ctypes.addressof(ss), 0)
            struct.pack_into("<q", shm.mem, 8 * i, ret)
        return 0

    ex = run_child(body, timeout)
    if ex.exit_code != 0:
        raise HostUnavailable(f"sigaltstack probe child ended with {ex}")
    return tuple(-struct.unpack_from("<q", shm.mem, 8 * i)[0] for i in range(len(requests)))


def deliver_on_altstack(size: int, *, seed: int = 0x4A) -> SignalRun:
    """Raise SIGUSR1 (SA_ONSTACK) with an alternate stack of ``size`` bytes whose top is
    page aligned: the frame is built there, or get_sigframe() finds it would overflow and
    SIGSEGV is forced (``SignalRun.segv``, ``SignalRun.frame`` None)."""
    return raise_signal(seed=seed, altstack_size=size)


def smallest_altstack(lo: int = 2048, hi: int = 16384, *, seed: int = 0x4A) -> int:
    """The smallest alternate-stack size (top page aligned) on which this kernel delivers a
    signal, found by bisection over `deliver_on_altstack`."""
    if deliver_on_altstack(hi, seed=seed).frame is None:
        raise HostUnavailable(f"no delivery even on a {hi}-byte altstack")
    if deliver_on_altstack(lo, seed=seed).frame is not None:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if deliver_on_altstack(mid, seed=seed).frame is not None:
            hi = mid
        else:
            lo = mid
    return hi


@dataclass(frozen=True, slots=True)
class AmxAltstackInterplay:
    """ARCH_REQ_XCOMP_PERM(XTILE_DATA) with an altstack installed, then a new altstack."""

    altstack_size: int
    installed_errno: int  #: sigaltstack(altstack_size) before the request
    req_errno: int  #: -ENOSPC when the altstack is smaller than the AMX frame
    perm_after: int
    later_size: int
    later_errno: int  #: sigaltstack(later_size) after the request (-ENOMEM when too small)


def amx_altstack_interplay(altstack_size: int, later_size: int) -> AmxAltstackInterplay:
    """Kernel paths: validate_sigaltstack (xstate.c) on the request, sigaltstack_size_valid
    (signal.c) on the later sigaltstack. Only answerable where the kernel offers AMX."""
    if not (native.cpuid(7, 0)[3] >> 24) & 1:
        raise HostUnavailable("host lacks AMX: CPUID.(EAX=7,ECX=0):EDX[24]=0, so "
                              "ARCH_REQ_XCOMP_PERM(XTILE_DATA) fails with EOPNOTSUPP before "
                              "validate_sigaltstack() is reached")
    shm = SharedMemory(PAGE)

    def body() -> int:
        keep = []
        out = ctypes.c_uint64()
        results = []
        for size in (altstack_size, None, later_size):
            if size is None:
                results.append(raw_syscall(SYS["arch_prctl"], ARCH_REQ_XCOMP_PERM,
                                           ARCH_XCOMP_TILEDATA))
                raw_syscall(SYS["arch_prctl"], ARCH_GET_XCOMP_PERM, ctypes.addressof(out))
                results.append(int(out.value))
                continue
            region = mmap.mmap(-1, size + PAGE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            keep.append(region)
            ss = (ctypes.c_uint64 * 3)(ctypes.addressof(ctypes.c_char.from_buffer(region)),
                                       0, size)
            results.append(raw_syscall(SYS["sigaltstack"], ctypes.addressof(ss), 0))
        struct.pack_into("<4q", shm.mem, 0, *results)
        return 0

    ex = run_child(body)
    if ex.exit_code != 0:
        raise HostUnavailable(f"AMX sigaltstack probe ended with {ex}")
    inst, req, perm, later = struct.unpack_from("<4q", shm.mem, 0)
    return AmxAltstackInterplay(altstack_size, -inst, -req, perm & (2**64 - 1), later_size,
                                -later)


def disable_request() -> AltstackRequest:
    """SS_DISABLE: accepted whatever the size."""
    return AltstackRequest(0, SS_DISABLE)
