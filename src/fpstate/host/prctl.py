"""arch_prctl(2) xstate-permission calls on the real kernel, answers as data.

Kernel path: ``SYSCALL_DEFINE2(arch_prctl) -> do_arch_prctl_common`` (arch/x86/kernel/
process.c) -> ``fpu_xstate_prctl`` (arch/x86/kernel/fpu/xstate.c):

- ARCH_GET_XCOMP_SUPP writes fpu_user_cfg.max_features | legacy_features to ``*arg``;
- ARCH_GET_XCOMP_PERM / ARCH_GET_XCOMP_GUEST_PERM write the group leader's perm (guest_perm)
  ``__state_perm & XFEATURE_MASK_USER_SUPPORTED``;
- ARCH_REQ_XCOMP_PERM / ARCH_REQ_XCOMP_GUEST_PERM take an xfeature *number*: >= XFEATURE_MAX
  -> -EINVAL; not in xstate_prctl_req[] (only XTILE_DATA is) or not supported -> -EOPNOTSUPP;
  already permitted -> 0; guest perm locked by a vCPU -> -EBUSY; sigaltstack too small ->
  -ENOSPC (validate_sigaltstack);
- an unknown option -> -EINVAL; a bad user pointer -> -EFAULT (put_user).

Every call that can change the process (the REQ options are sticky and process-wide) runs in
a forked child; the GET options are read in this process only through `get_*`, which cannot
change anything.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from fpstate.errors import HostUnavailable
from fpstate.host.child import PAGE, SYS, SharedMemory, errno_name, raw_syscall, run_child
from fpstate.kernel.x86.uapi import (  # noqa: F401 (re-exported)
    ARCH_GET_XCOMP_GUEST_PERM,
    ARCH_GET_XCOMP_PERM,
    ARCH_GET_XCOMP_SUPP,
    ARCH_REQ_XCOMP_GUEST_PERM,
    ARCH_REQ_XCOMP_PERM,
    ARCH_XCOMP_TILECFG,
    ARCH_XCOMP_TILEDATA,
)

OPTION_NAMES = {
    ARCH_GET_XCOMP_SUPP: "ARCH_GET_XCOMP_SUPP",
    ARCH_GET_XCOMP_PERM: "ARCH_GET_XCOMP_PERM",
    ARCH_REQ_XCOMP_PERM: "ARCH_REQ_XCOMP_PERM",
    ARCH_GET_XCOMP_GUEST_PERM: "ARCH_GET_XCOMP_GUEST_PERM",
    ARCH_REQ_XCOMP_GUEST_PERM: "ARCH_REQ_XCOMP_GUEST_PERM",
}
GET_OPTIONS = frozenset({ARCH_GET_XCOMP_SUPP, ARCH_GET_XCOMP_PERM, ARCH_GET_XCOMP_GUEST_PERM})

#: Stand-in for ``arg`` of a GET option: "pass a valid pointer to a u64 and read it back".
OUT_POINTER = -1


@dataclass(frozen=True, slots=True)
class PrctlCall:
    """One arch_prctl(option, arg). For GET options ``arg`` = OUT_POINTER means a valid
    pointer to a u64 (the value is read back), any other number is passed as the pointer."""

    option: int
    arg: int = OUT_POINTER

    @property
    def name(self) -> str:
        return OPTION_NAMES.get(self.option, f"{self.option:#x}")


@dataclass(frozen=True, slots=True)
class PrctlResult:
    """The kernel's answer: ``ret`` (0 or -errno as the syscall returned it) and, for a
    successful GET through OUT_POINTER, the u64 it wrote."""

    call: PrctlCall
    ret: int
    value: int | None

    @property
    def errno(self) -> int:
        return -self.ret if self.ret < 0 else 0

    @property
    def errno_name(self) -> str:
        return errno_name(self.errno)


def _call(c: PrctlCall, out: ctypes.c_uint64) -> PrctlResult:
    if c.option in GET_OPTIONS and c.arg == OUT_POINTER:
        out.value = 0
        ret = raw_syscall(SYS["arch_prctl"], c.option, ctypes.addressof(out))
        return PrctlResult(c, ret, int(out.value) if ret == 0 else None)
    ret = raw_syscall(SYS["arch_prctl"], c.option, c.arg)
    return PrctlResult(c, ret, None)


def _get(option: int) -> int:
    res = _call(PrctlCall(option), ctypes.c_uint64())
    if res.ret < 0:
        raise HostUnavailable(f"arch_prctl({res.call.name}) failed with {res.errno_name}: "
                              "the kernel predates the xstate permission API (v5.16)")
    assert res.value is not None
    return res.value


def get_xcomp_supp() -> int:
    """ARCH_GET_XCOMP_SUPP in this process: fpu_user_cfg.max_features | legacy_features."""
    return _get(ARCH_GET_XCOMP_SUPP)


def get_xcomp_perm() -> int:
    """ARCH_GET_XCOMP_PERM in this process: group leader perm.__state_perm & USER_SUPPORTED."""
    return _get(ARCH_GET_XCOMP_PERM)


def get_xcomp_guest_perm() -> int:
    """ARCH_GET_XCOMP_GUEST_PERM in this process: guest_perm.__state_perm & USER_SUPPORTED."""
    return _get(ARCH_GET_XCOMP_GUEST_PERM)


_SLOT = 16  #: bytes per result in shared memory: ret (s64), value (u64)


def prctl_sequence(calls: Sequence[PrctlCall], *, timeout: float = 20.0
                   ) -> tuple[PrctlResult, ...]:
    """Make ``calls`` in order in ONE forked child (permission state carries from call to
    call, as it does in a process) and return each answer. Kernel path: fpu_xstate_prctl."""
    calls = tuple(calls)
    shm = SharedMemory(_SLOT * (len(calls) + 1))

    def body() -> int:
        out = ctypes.c_uint64()
        for i, c in enumerate(calls):
            r = _call(c, out)
            struct.pack_into("<qQ", shm.mem, _SLOT * i, r.ret,
                             r.value if r.value is not None else 0)
        return 0

    ex = run_child(body, timeout)
    if ex.exit_code != 0:
        raise HostUnavailable(f"arch_prctl probe child ended with {ex}")
    results = []
    for i, c in enumerate(calls):
        ret, value = struct.unpack_from("<qQ", shm.mem, _SLOT * i)
        ok_get = c.option in GET_OPTIONS and c.arg == OUT_POINTER and ret == 0
        results.append(PrctlResult(c, ret, value if ok_get else None))
    return tuple(results)


def req_xcomp_perm(feature: int, *, guest: bool = False) -> PrctlResult:
    """ARCH_REQ_XCOMP_PERM (or _GUEST_PERM) of xfeature number ``feature`` in a fresh child."""
    option = ARCH_REQ_XCOMP_GUEST_PERM if guest else ARCH_REQ_XCOMP_PERM
    return prctl_sequence([PrctlCall(option, feature)])[0]


def req_errno_table(features: Sequence[int], *, guest: bool = False) -> dict[int, int]:
    """{xfeature number: errno (0 = granted)} of ARCH_REQ_XCOMP_PERM (_GUEST_PERM), each
    asked in the same child in order (a grant would be sticky for the later ones)."""
    option = ARCH_REQ_XCOMP_GUEST_PERM if guest else ARCH_REQ_XCOMP_PERM
    res = prctl_sequence([PrctlCall(option, f) for f in features])
    return {f: r.errno for f, r in zip(features, res, strict=True)}


@dataclass(frozen=True, slots=True)
class PermissionSnapshot:
    """The three GET answers of one process."""

    supp: int
    perm: int
    guest_perm: int


def permission_snapshot() -> PermissionSnapshot:
    """GET_XCOMP_SUPP, GET_XCOMP_PERM, GET_XCOMP_GUEST_PERM of a fresh child of this process."""
    r = prctl_sequence([PrctlCall(ARCH_GET_XCOMP_SUPP), PrctlCall(ARCH_GET_XCOMP_PERM),
                        PrctlCall(ARCH_GET_XCOMP_GUEST_PERM)])
    for x in r:
        if x.value is None:
            raise HostUnavailable(f"arch_prctl({x.call.name}) failed with {x.errno_name}")
    return PermissionSnapshot(r[0].value or 0, r[1].value or 0, r[2].value or 0)


def get_supp_into_keyed_page(timeout: float = 20.0) -> tuple[int, int, int]:
    """ARCH_GET_XCOMP_SUPP into a page with a protection key of its own, in a forked child:
    (the key pkey_alloc gave, the errno with the key open, the errno with it closed by AD|WD
    in this thread's PKRU). put_user() runs under the calling thread's PKRU, so the closed key
    makes it fault: -EFAULT (arch/x86/kernel/fpu/xstate.c fpu_xstate_prctl)."""
    import mmap as _mmap

    from fpstate.host.child import Asm, CodePages

    shm = SharedMemory(32)

    def body() -> int:
        key = raw_syscall(SYS["pkey_alloc"], 0, 0)
        if key < 0:
            return 3
        rw = _mmap.PROT_READ | _mmap.PROT_WRITE
        region = _mmap.mmap(-1, PAGE, prot=rw)
        base = ctypes.addressof(ctypes.c_char.from_buffer(region))
        if raw_syscall(SYS["pkey_mprotect"], base, PAGE, rw, key):
            return 4
        opened = raw_syscall(SYS["arch_prctl"], ARCH_GET_XCOMP_SUPP, base)
        close = Asm()  # PKRU |= AD|WD of the key; return
        close.deny_pkey(key, 0b11)
        close.emit(close.In.create(close.C.RETNQ))
        pages = CodePages(1)
        pages.call(pages.place(0, close))
        closed = raw_syscall(SYS["arch_prctl"], ARCH_GET_XCOMP_SUPP, base)
        struct.pack_into("<qqqq", shm.mem, 0, key, -opened, -closed, 1)
        return 0

    ex = run_child(body, timeout)
    key, opened, closed, done = struct.unpack_from("<qqqq", shm.mem, 0)
    if ex.exit_code != 0 or done != 1:
        raise HostUnavailable(f"the protection-key arch_prctl probe child ended with {ex}")
    return key, opened, closed
