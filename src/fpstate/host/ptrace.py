"""ptrace of a real child: NT_X86_XSTATE and NT_PRFPREG read and written through
PTRACE_GETREGSET / PTRACE_SETREGSET.

Kernel paths exercised: ``ptrace_regset`` (kernel/ptrace.c: iov_len must be a multiple of the
regset's unit, 8 bytes here, and is clamped to n * size), then for NT_X86_XSTATE
``xstateregs_get`` (copy_xstate_to_uabi_buf, XSTATE_COPY_XSAVE) and ``xstateregs_set``
(count must be exactly fpu_user_cfg.max_size, else -EFAULT; copy_uabi_from_kernel_to_xstate
validates the header and MXCSR), for NT_PRFPREG ``xfpregs_get`` / ``xfpregs_set`` (exactly 512
bytes, else -EINVAL; reserved MXCSR bits -EINVAL) in arch/x86/kernel/fpu/regset.c.

Theory of operation
-------------------
A forked child asks to be traced (PTRACE_TRACEME), then machine code loads every register
with a pattern, XSAVEs it ("before"), and stops itself with ``kill(getpid(), SIGSTOP)``. The
parent, stopped child in hand, reads the regsets, makes the requested writes (reading
NT_X86_XSTATE back after each), and resumes the child with PTRACE_CONT (signal 0); the child's
code continues after the syscall, XSAVEs its registers again ("after": what the kernel
restored from the possibly modified fpstate) and exits.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fpstate.errors import HostUnavailable
from fpstate.host.child import (
    MXCSR_DEFAULT,
    PAGE,
    SYS,
    Asm,
    ChildExit,
    CodePages,
    Reg,
    SharedMemory,
    XsaveImage,
    avx_alone_image,
    errno_name,
    fork_child,
    kill_and_reap,
    load_patterns,
    pattern_table,
    raw_syscall,
    xsave_image,
    xsave_slot,
)

PTRACE_TRACEME = 0
PTRACE_CONT = 7
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
NT_PRFPREG = 2  #: 512-byte fxregs_state on x86-64 (REGSET64_FP)
NT_X86_XSTATE = 0x202  #: standard-format XSAVE image, fpu_user_cfg.max_size bytes
#: Bytes offered to GETREGSET: more than any XSAVE area, so iov_len comes back clamped to the
#: regset's real size (ptrace_regset: min(iov_len, n * size)).
READ_BUFFER = 16384
USER_XSTATE_XCR0_OFFSET = 464  #: xstate_fx_sw_bytes[USER_XSTATE_XCR0_WORD]


@dataclass(frozen=True, slots=True)
class RegsetRead:
    """PTRACE_GETREGSET: the errno (0 = success), the iov_len offered and returned, bytes."""

    note: int
    offered: int
    returned: int
    errno: int
    data: bytes

    @property
    def image(self) -> XsaveImage:
        return xsave_image(self.data)

    @property
    def xcr0(self) -> int:
        """The u64 at byte 464 of NT_X86_XSTATE: fpu_user_cfg.max_features."""
        return int.from_bytes(self.data[USER_XSTATE_XCR0_OFFSET:USER_XSTATE_XCR0_OFFSET + 8],
                              "little")


@dataclass(frozen=True, slots=True)
class RegsetWrite:
    """One PTRACE_SETREGSET request: ``data`` offered with iov_len ``length`` (default its
    length)."""

    note: int
    data: bytes
    what: str
    length: int | None = None


@dataclass(frozen=True, slots=True)
class RegsetWriteResult:
    request: RegsetWrite
    errno: int  #: 0 accepted, else the errno
    read_back: RegsetRead  #: NT_X86_XSTATE read right after the write


@dataclass(frozen=True, slots=True)
class PtraceSession:
    """A traced child over pattern registers (``seed``), read and written while stopped."""

    seed: int
    before: XsaveImage  #: the child's own XSAVE just before it stopped itself
    stop_signal: int
    xstate: RegsetRead  #: NT_X86_XSTATE, offered READ_BUFFER bytes
    fpregs: RegsetRead  #: NT_PRFPREG, offered READ_BUFFER bytes
    writes: tuple[RegsetWriteResult, ...]
    after: XsaveImage | None  #: the child's XSAVE after PTRACE_CONT (None if it never ran)
    exit: ChildExit


def ptrace_call(req: int, pid: int, addr: int = 0, data: int = 0) -> int:
    """ptrace(2) as a raw system call: 0 (or the value) or -errno."""
    return raw_syscall(SYS["ptrace"], req, pid, addr, data)



def getregset(pid: int, note: int, offered: int) -> RegsetRead:
    """PTRACE_GETREGSET of a stopped tracee with a 64-bit struct iovec of iov_len
    ``offered``: what the kernel wrote back (ptrace_regset's clamping) and the bytes."""
    buf = (ctypes.c_ubyte * max(offered, 1))()
    iov = (ctypes.c_uint64 * 2)(ctypes.addressof(buf), offered)
    ret = ptrace_call(PTRACE_GETREGSET, pid, note, ctypes.addressof(iov))
    n = int(iov[1]) if ret == 0 else 0
    return RegsetRead(note, offered, n, -ret if ret < 0 else 0, bytes(buf)[:n])


def setregset(pid: int, note: int, data: bytes, length: int | None = None) -> int:
    """PTRACE_SETREGSET of ``data`` with iov_len ``length`` (default its length; beyond the
    data, zeros): 0, or the errno."""
    length = len(data) if length is None else length
    size = max(len(data), length, 1)
    buf = (ctypes.c_ubyte * size).from_buffer_copy(data.ljust(size, b"\0"))
    iov = (ctypes.c_uint64 * 2)(ctypes.addressof(buf), length)
    ret = ptrace_call(PTRACE_SETREGSET, pid, note, ctypes.addressof(iov))
    return -ret if ret < 0 else 0


def wait_status(pid: int, deadline: float) -> int:
    """waitpid() of a child (a tracee's stops included) until ``deadline`` (monotonic
    seconds); TimeoutError after it."""
    while True:
        wpid, status = os.waitpid(pid, os.WNOHANG)
        if wpid == pid:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"child {pid} did not report")
        time.sleep(0.001)


def _pattern_tracee(shm: SharedMemory, before_off: int, after_off: int,
                    flag: int) -> Callable[[], int]:
    """The body of a traced child: PTRACE_TRACEME; machine code loads the patterns of the
    table at the start of ``shm``, XSAVEs them at ``before_off``, stops itself with SIGSTOP,
    and once resumed XSAVEs what it runs with at ``after_off`` and sets the u64 at ``flag``."""

    def body() -> int:
        if ptrace_call(PTRACE_TRACEME, 0) != 0:
            return 3
        pages = CodePages(1)
        a = Asm()
        load_patterns(a, shm.address)
        a.xsave(shm.address + before_off)
        a.syscall(SYS["getpid"])
        a.syscall(SYS["kill"], Reg(a.R.RAX), signal.SIGSTOP)
        a.xsave(shm.address + after_off)
        a.mov_imm(a.R.RAX, 1)
        a.store_rax(shm.address + flag)
        a.exit_group(0)
        pages.call(pages.place(0, a))
        return 6

    return body


def ptrace_session(writes: Sequence[RegsetWrite] = (), *, seed: int = 0x5D,
                   timeout: float = 20.0) -> PtraceSession:
    """Trace a child whose registers hold the patterns of ``seed`` while it is stopped by
    its own SIGSTOP: read NT_X86_XSTATE and NT_PRFPREG, make ``writes`` in order (reading
    NT_X86_XSTATE back after each), resume it and capture the registers it runs with.

    Kernel path: ptrace_regset -> xstateregs_get/set, xfpregs_get/set
    (arch/x86/kernel/fpu/regset.c); on resume the modified fpstate is restored because
    fpu_force_restore() invalidated the register copy.
    """
    xs = xsave_slot()
    shm = SharedMemory(PAGE + 2 * xs)
    shm.write(0, pattern_table(seed))
    before_off, after_off, flag = PAGE, PAGE + xs, PAGE - 8

    deadline = time.monotonic() + timeout
    pid = fork_child(_pattern_tracee(shm, before_off, after_off, flag))
    try:
        status = wait_status(pid, deadline)
        if not os.WIFSTOPPED(status):
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
            raise HostUnavailable(f"traced child did not stop (status {code}): "
                                  "PTRACE_TRACEME refused?")
        stop = os.WSTOPSIG(status)
        xstate = getregset(pid, NT_X86_XSTATE, READ_BUFFER)
        fpregs = getregset(pid, NT_PRFPREG, READ_BUFFER)
        results = []
        for w in writes:
            err = setregset(pid, w.note, w.data, w.length)
            results.append(RegsetWriteResult(w, err, getregset(pid, NT_X86_XSTATE,
                                                                 READ_BUFFER)))
        ptrace_call(PTRACE_CONT, pid, 0, 0)
        status = wait_status(pid, deadline)
        if os.WIFEXITED(status):
            ex = ChildExit(pid, os.WEXITSTATUS(status), None)
        elif os.WIFSIGNALED(status):
            ex = ChildExit(pid, None, os.WTERMSIG(status))
        else:  # stopped again (a signal under ptrace): report and kill
            ex = ChildExit(pid, None, os.WSTOPSIG(status))
        pid = 0
    finally:
        if pid:
            kill_and_reap(pid)
    ran = shm.u64(flag) == 1
    return PtraceSession(
        seed=seed, before=xsave_image(shm.read(before_off, xs)), stop_signal=stop,
        xstate=xstate, fpregs=fpregs, writes=tuple(results),
        after=xsave_image(shm.read(after_off, xs)) if ran else None, exit=ex,
    )


def read_regsets(reads: Sequence[tuple[int, int]], *, seed: int = 0x5D) -> tuple[RegsetRead, ...]:
    """PTRACE_GETREGSET of a child stopped over pattern registers, once per (note, iov_len)
    in ``reads``: observes ptrace_regset's clamping to the regset size, its -EINVAL for an
    iov_len that is not a multiple of the unit (8) and for an unknown note, and partial
    reads. The child is killed afterwards."""
    out: list[RegsetRead] = []
    shm = SharedMemory(PAGE)
    shm.write(0, pattern_table(seed))

    def body() -> int:
        if ptrace_call(PTRACE_TRACEME, 0) != 0:
            return 3
        pages = CodePages(1)
        a = Asm()
        load_patterns(a, shm.address)
        a.syscall(SYS["getpid"])
        a.syscall(SYS["kill"], Reg(a.R.RAX), signal.SIGSTOP)
        a.exit_group(0)
        pages.call(pages.place(0, a))
        return 6

    pid = fork_child(body)
    try:
        status = wait_status(pid, time.monotonic() + 20)
        if not os.WIFSTOPPED(status):
            raise HostUnavailable("traced child did not stop")
        out = [getregset(pid, note, offered) for note, offered in reads]
    finally:
        kill_and_reap(pid)
    return tuple(out)


#: What the tracer's buffer holds before each call of `keyed_regset_session` (beyond a
#: SETREGSET's data): a GETREGSET that faults leaves it so.
KEYED_FILL = 0xA5
#: Where `KeyedRegsetCall.keyed` puts the protection key: on the page of the struct iovec,
#: or on the buffer iov_base points to.
KEYED_IOVEC, KEYED_BUFFER = "iovec", "buffer"
#: `KeyedRegsetCall.keyed` for a key on the buffer's last page only (the rest has key 0).
KEYED_LAST_PAGE = "the buffer's last page"


@dataclass(frozen=True, slots=True)
class KeyedRegsetCall:
    """One PTRACE_GETREGSET / PTRACE_SETREGSET of `keyed_regset_session`: the tracer's
    protection key is on ``keyed`` (KEYED_IOVEC, KEYED_BUFFER or KEYED_LAST_PAGE; the rest has
    key 0), iov_base is ``offset`` bytes into the buffer, and
    the tracer's PKRU gives that key ``rights`` (0 open, 1 AD, 2 WD, 3 both) during the
    call; with ``iovec_read_only`` the iovec's page is PROT_READ during the call (a const
    struct iovec). ``length`` is iov_len; a SETREGSET's buffer holds the tracee's first
    NT_X86_XSTATE image, cut to ``length``, with ``edit`` ((offset, bytes), ...) applied."""

    what: str
    req: int
    note: int
    length: int
    keyed: str
    rights: int
    edit: tuple[tuple[int, bytes], ...] = ()
    iovec_read_only: bool = False
    offset: int = 0

    def payload(self, image: bytes) -> bytes:
        """The SETREGSET buffer's bytes (empty for a GETREGSET)."""
        if self.req != PTRACE_SETREGSET:
            return b""
        out = bytearray(image[:self.length].ljust(self.length, b"\0"))
        for off, data in self.edit:
            out[off:off + len(data)] = data
        return bytes(out)


@dataclass(frozen=True, slots=True)
class KeyedRegsetResult:
    errno: int  #: 0 or the call's errno
    iov_len: int  #: the struct iovec's iov_len after the call
    buffer: bytes  #: the ``length`` bytes at iov_base after the call


@dataclass(frozen=True, slots=True)
class KeyedRegsetSession:
    key: int  #: the tracer's pkey_alloc()
    image: bytes  #: NT_X86_XSTATE of the stopped tracee, read first with every key open
    results: tuple[KeyedRegsetResult, ...]
    after: XsaveImage | None  #: the tracee's XSAVE after PTRACE_CONT (None if it never ran)


def keyed_regset_session(calls: Sequence[KeyedRegsetCall], *, seed: int = 0x5D,
                         timeout: float = 20.0) -> KeyedRegsetSession:
    """PTRACE_GETREGSET / PTRACE_SETREGSET by a tracer whose iovec or buffer is behind a
    protection key it closed: a forked child (the tracer, so that this process's PKRU and
    keys stay as they are) pkey_alloc()s a key and maps a page for the struct iovec and
    READ_BUFFER bytes for the buffer, then traces a pattern child (`_pattern_tracee`)
    stopped by its own SIGSTOP. For each call it gives the key to the iovec's page or to the
    buffer (pkey_mprotect; key 0 to the other), fills the buffer (`KEYED_FILL`, then a
    SETREGSET's data), makes the iovec's page read-only if the call says so, sets its PKRU
    rights for the key (WRPKRU in machine code), makes the
    call (raw syscall), opens the key again and records the errno, iov_len and buffer. Then
    PTRACE_CONT; the tracee XSAVEs what it runs with.

    Kernel path: ptrace_request() (kernel/ptrace.c: __get_user of the iovec, ptrace_regset,
    __put_user of iov_len), copy_regset_to_user()'s copy_to_user(), the set functions'
    copy_from_user() -- each under the tracer's PKRU.
    """
    import mmap as _mmap
    import pickle
    import struct

    from fpstate.host.child import run_child

    xs = xsave_slot()
    shm = SharedMemory(PAGE + 2 * xs)
    shm.write(0, pattern_table(seed))
    before_off, after_off, flag = PAGE, PAGE + xs, PAGE - 8
    out = SharedMemory(PAGE + len(calls) * (READ_BUFFER + 64) + 2 * xs)

    def tracer() -> int:
        key = raw_syscall(SYS["pkey_alloc"], 0, 0)
        if key < 0:
            return 3
        rw = _mmap.PROT_READ | _mmap.PROT_WRITE
        iov_map = _mmap.mmap(-1, PAGE, prot=rw)
        buf_map = _mmap.mmap(-1, READ_BUFFER, prot=rw)
        iov_at = ctypes.addressof(ctypes.c_char.from_buffer(iov_map))
        buf_at = ctypes.addressof(ctypes.c_char.from_buffer(buf_map))
        code = CodePages(4)
        rights_at = []
        for rights in range(4):  # PKRU's bits of the key = rights; return
            a = Asm()
            a.set_pkey_rights(key, rights)
            a.emit(a.In.create(a.C.RETNQ))
            rights_at.append(code.place(rights, a))
        deadline = time.monotonic() + timeout
        pid = fork_child(_pattern_tracee(shm, before_off, after_off, flag))
        try:
            if not os.WIFSTOPPED(wait_status(pid, deadline)):
                return 4
            image = getregset(pid, NT_X86_XSTATE, READ_BUFFER).data
            rows = []
            for call in calls:
                for at, size, where in ((iov_at, PAGE, KEYED_IOVEC),
                                        (buf_at, READ_BUFFER, KEYED_BUFFER)):
                    if raw_syscall(SYS["pkey_mprotect"], at, size, rw,
                                   key if call.keyed == where else 0):
                        return 5
                last = buf_at + READ_BUFFER - PAGE
                if call.keyed == KEYED_LAST_PAGE and raw_syscall(
                        SYS["pkey_mprotect"], last, PAGE, rw, key):
                    return 5
                data = call.payload(image)
                at = call.offset
                buf_map[:] = bytes([KEYED_FILL]) * READ_BUFFER
                buf_map[at:at + len(data)] = data
                struct.pack_into("<QQ", iov_map, 0, buf_at + at, call.length)
                if call.iovec_read_only and raw_syscall(SYS["mprotect"], iov_at, PAGE,
                                                        _mmap.PROT_READ):
                    return 6  # (the next call's pkey_mprotect makes it writable again)
                code.call(rights_at[call.rights])
                ret = raw_syscall(SYS["ptrace"], call.req, pid, call.note, iov_at)
                code.call(rights_at[0])
                rows.append((-ret if ret < 0 else 0, struct.unpack_from("<Q", iov_map, 8)[0],
                             bytes(buf_map[at:at + call.length])))
            ptrace_call(PTRACE_CONT, pid, 0, 0)
            wait_status(pid, deadline)
            pid = 0
        finally:
            if pid:
                kill_and_reap(pid)
        blob = pickle.dumps((key, image, rows))
        out.write(0, len(blob).to_bytes(8, "little") + blob)
        return 0

    ex = run_child(tracer, timeout)
    size = out.u64(0)
    if ex.exit_code != 0 or not size:
        raise HostUnavailable(f"the protection-key ptrace probe's tracer ended with {ex}")
    key, image, rows = pickle.loads(out.read(8, size))
    ran = shm.u64(flag) == 1
    return KeyedRegsetSession(key, image, tuple(KeyedRegsetResult(*r) for r in rows),
                              xsave_image(shm.read(after_off, xs)) if ran else None)


PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
_WALL = 0x40000000


def read_xstate_of(tid: int, *, timeout: float = 10.0) -> RegsetRead:
    """NT_X86_XSTATE of a running thread ``tid`` that is not our child: PTRACE_SEIZE, then
    PTRACE_INTERRUPT to stop it (a group-stop free interruption), PTRACE_GETREGSET, and
    PTRACE_DETACH, which lets it run on unchanged (kernel/ptrace.c ptrace_attach with
    PTRACE_SEIZE; the regset read is xstateregs_get). HostUnavailable when the kernel
    refuses to attach (permissions, Yama, a thread already traced)."""
    ret = ptrace_call(PTRACE_SEIZE, tid, 0, 0)
    if ret != 0:
        raise HostUnavailable(f"PTRACE_SEIZE of {tid} failed: {errno_name(ret)}")
    try:
        ptrace_call(PTRACE_INTERRUPT, tid, 0, 0)
        deadline = time.monotonic() + timeout
        while True:
            wpid, status = os.waitpid(tid, os.WNOHANG | _WALL)
            if wpid == tid:
                break
            if time.monotonic() > deadline:
                raise HostUnavailable(f"thread {tid} did not stop for PTRACE_INTERRUPT")
            time.sleep(0.001)
        if not os.WIFSTOPPED(status):
            raise HostUnavailable(f"thread {tid} exited while being attached")
        read = getregset(tid, NT_X86_XSTATE, READ_BUFFER)
    finally:
        ptrace_call(PTRACE_DETACH, tid, 0, 0)
    if read.errno:
        raise HostUnavailable(f"PTRACE_GETREGSET NT_X86_XSTATE of {tid}: "
                              f"{errno_name(-read.errno)}")
    return read


@dataclass(frozen=True, slots=True)
class StaleMxcsrSession:
    """What `stale_mxcsr_session` saw: NT_X86_XSTATE at the first stop (MXCSR ``mxcsr``
    loaded) and at the second (MXCSR 1F80H loaded, then an XRSTOR of AVX state alone), the
    errno of the tracer's write-back (None: no write), and the MXCSR the child ran with
    afterwards (STMXCSR)."""

    first: RegsetRead
    second: RegsetRead
    write_errno: int | None
    after_mxcsr: int


def stale_mxcsr_session(mxcsr: int = 0xFFC0, *, write_xmm0: bytes | None = None,
                        timeout: float = 20.0) -> StaleMxcsrSession:
    """A traced child's MXCSR across two stops, the second with SSE in its initial
    configuration and AVX in use: machine code LDMXCSR ``mxcsr``, stops (SIGSTOP: the
    switch-out saves SSE with that MXCSR into the fpstate), LDMXCSR 1F80H, XRSTOR64 with
    RFBM = SSE|AVX of an image whose XSTATE_BV holds AVX only (XMM0-15 zero, YMM upper halves
    a pattern, MXCSR 1F80H), stops again, then STMXCSR and exits. The tracer reads
    NT_X86_XSTATE at both stops; with ``write_xmm0`` it writes the second buffer back with
    XMM0 = those 16 bytes and SSE set in XSTATE_BV (a debugger's ``set $xmm0``).

    Kernel paths: the switch-out's os_xsave (XSAVES: compacted, SSE -- and with it MXCSR --
    written only while in use or MXCSR is not 1F80H), xstateregs_get ->
    __copy_xstate_to_uabi_buf (MXCSR copied from the fpstate when the header has SSE or YMM),
    xstateregs_set -> copy_uabi_to_xstate, and the XRSTORS at the return to user mode."""
    if write_xmm0 is not None and len(write_xmm0) != 16:
        raise ValueError("write_xmm0 is the 16 bytes of XMM0")
    mx1, mxdef, out, img_off = 0, 8, 16, PAGE
    shm = SharedMemory(3 * PAGE)
    shm.write(mx1, mxcsr.to_bytes(4, "little"))
    shm.write(mxdef, MXCSR_DEFAULT.to_bytes(4, "little"))
    shm.write(img_off, avx_alone_image())

    def body() -> int:
        if ptrace_call(PTRACE_TRACEME, 0) != 0:
            return 3
        pages = CodePages(1)
        a = Asm()
        C, In, M, R = a.C, a.In, a.M, a.R
        a.mov_imm(R.RBX, shm.address)
        a.emit(In.create_mem(C.LDMXCSR_M32, M(R.RBX, displ=mx1)))
        a.syscall(SYS["getpid"])
        a.syscall(SYS["kill"], Reg(R.RAX), signal.SIGSTOP)
        a.mov_imm(R.RBX, shm.address)
        a.emit(In.create_mem(C.LDMXCSR_M32, M(R.RBX, displ=mxdef)))
        a.mov_imm(R.RAX, 0x6)
        a.mov_imm(R.RDX, 0)
        a.emit(In.create_mem(C.XRSTOR64_MEM, M(R.RBX, displ=img_off)))
        a.syscall(SYS["getpid"])
        a.syscall(SYS["kill"], Reg(R.RAX), signal.SIGSTOP)
        a.mov_imm(R.RBX, shm.address)
        a.emit(In.create_mem(C.STMXCSR_M32, M(R.RBX, displ=out)))
        a.exit_group(0)
        pages.call(pages.place(0, a))
        return 6

    deadline = time.monotonic() + timeout
    pid = fork_child(body)
    try:
        reads = []
        for _ in range(2):
            status = wait_status(pid, deadline)
            if not os.WIFSTOPPED(status):
                raise HostUnavailable(f"traced child did not stop (status {status:#x})")
            reads.append(getregset(pid, NT_X86_XSTATE, READ_BUFFER))
            if len(reads) == 1:
                ptrace_call(PTRACE_CONT, pid, 0, 0)
        err = None
        if write_xmm0 is not None:
            b = bytearray(reads[1].data)
            b[160:176] = write_xmm0
            bv = int.from_bytes(b[512:520], "little") | 0x2
            b[512:520] = bv.to_bytes(8, "little")
            err = setregset(pid, NT_X86_XSTATE, bytes(b))
        ptrace_call(PTRACE_CONT, pid, 0, 0)
        status = wait_status(pid, deadline)
        if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
            raise HostUnavailable(f"traced child ended with status {status:#x}")
        pid = 0
    finally:
        if pid:
            kill_and_reap(pid)
    return StaleMxcsrSession(reads[0], reads[1], err,
                             int.from_bytes(shm.read(out, 4), "little"))

