"""ptrace regsets: NT_X86_XSTATE and NT_PRFPREG, and the UABI copy routines behind them.

Models arch/x86/kernel/fpu/regset.c (xstateregs_get/set, xfpregs_get/set), the UABI copies of
arch/x86/kernel/fpu/xstate.c (__copy_xstate_to_uabi_buf, copy_uabi_to_xstate,
validate_user_xstate_header), update_regset_xstate_info() (arch/x86/kernel/ptrace.c) and the
generic ptrace_regset() and ptrace_request()'s regset requests (kernel/ptrace.c), Linux v6.17.

The exported xstate is always the *standard* format, fpu_user_cfg.max_size bytes: the legacy
area (from the task's image, or init_fpstate's for components in init state), bytes 464..511 the
xstate_fx_sw_bytes with XCR0 (fpu_user_cfg.max_features) in the first u64, a header with only
XSTATE_BV (= image's & user_xfeatures), then each component in the header at its standard
offset -- PKRU from thread.pkru, not from the buffer -- and zeros everywhere else.

Setting goes the other way with the kernel's validation: the header's XSTATE_BV must be within
the target's user_xfeatures, XCOMP_BV and the reserved bytes zero, MXCSR within
mxcsr_feature_mask (only if FP, SSE or YMM is set); user components of the header are copied,
supervisor ones in the image kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fpstate.kernel.x86 import core
from fpstate.kernel.x86.context import __fpu_invalidate_fpregs_state
from fpstate.kernel.x86.hw import HDR, MXCSR_INIT, MXCSR_OFFSET
from fpstate.kernel.x86.mm import PageFault, UserMemory
from fpstate.kernel.x86.sched import TaskState
from fpstate.kernel.x86.types import (
    XFEATURE_MASK_SUPERVISOR_ALL,
    Fpstate,
    Fpu,
    FpuSystem,
    IllegalEvent,
    KernelBug,
)
from fpstate.kernel.x86.xstate_prctl import EFAULT, EINVAL
from fpstate.x86.xfeatures import (
    FXSAVE_SIZE,
    XFEATURE_MASK_FP,
    XFEATURE_MASK_FPSSE,
    XFEATURE_MASK_PKRU,
    XFEATURE_MASK_SSE,
    XFEATURE_MASK_YMM,
    bits,
)

if TYPE_CHECKING:
    from fpstate.kernel.x86.sched import Cpu, KPath, Task

NT_PRFPREG = 2
NT_PRXFPREG = 0x46E62B7F  #: the ia32 view's 512-byte FXSAVE regset (REGSET32_XFP)
NT_X86_XSTATE = 0x202
#: The regset views (task_user_regset_view(): the tracee's mode picks one): on x86-64
#: NT_PRFPREG is the FXSAVE image (xfpregs); on ia32 it is user_i387_ia32_struct (fpregs)
#: and NT_PRXFPREG the FXSAVE image.
VIEW_X86_64, VIEW_IA32 = "x86_64", "ia32"
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
ENODEV, ESRCH = 19, 3
XSTATE_COPY_FP, XSTATE_COPY_FX, XSTATE_COPY_XSAVE = "fp", "fx", "xsave"
#: USER_XSTATE_FX_SW_WORDS / USER_XSTATE_XCR0_WORD (asm/user.h): 6 u64 at fxsave offset 464.
USER_XSTATE_FX_SW_WORDS = 6
USER_XSTATE_XCR0_WORD = 0
_EXTENDED = 576
_STOPPED = TaskState.STOPPED  #: (an attribute of the Enum class costs ~0.1 us per lookup)


def xstate_fx_sw_bytes(system: FpuSystem) -> bytes:
    """xstate_fx_sw_bytes[] as update_regset_xstate_info() leaves it: XCR0 in word 0."""
    words = [0] * USER_XSTATE_FX_SW_WORDS
    words[USER_XSTATE_XCR0_WORD] = system.user.max_features
    return b"".join(w.to_bytes(8, "little") for w in words)


def regset_xstate_size(system: FpuSystem) -> int:
    """regset->n * regset->size of NT_X86_XSTATE: fpu_user_cfg.max_size (n u64 words)."""
    return system.user.max_size


def __copy_xstate_to_uabi_buf(system: FpuSystem, init_regs: bytes, fps: Fpstate,
                              xfeatures: int, pkru_val: int, mode: str, size: int) -> bytes:
    """__copy_xstate_to_uabi_buf() (xstate.c): the UABI (standard) image of ``fps``, ``size``
    bytes (truncated, or zero-filled past what the mode writes)."""
    fps.check_alive("__copy_xstate_to_uabi_buf")
    xsave = fps.regs
    hdr = fps.xstate_bv
    if mode == XSTATE_COPY_FP:
        hdr &= XFEATURE_MASK_FP
    elif mode == XSTATE_COPY_FX:
        hdr &= XFEATURE_MASK_FPSSE
    else:
        hdr &= fps.user_xfeatures & xfeatures
    out = bytearray()

    def feature(present: int, lo: int, hi: int) -> None:
        out.extend((xsave if present else init_regs)[lo:hi])

    feature(hdr & XFEATURE_MASK_FP, 0, MXCSR_OFFSET)
    if mxcsr_by_format(system):  # the proposed fix: MXCSR goes by the kernel's format
        feature(hdr & XFEATURE_MASK_SSE if system.xcompacted
                else fps.user_xfeatures & (XFEATURE_MASK_SSE | XFEATURE_MASK_YMM),
                MXCSR_OFFSET, MXCSR_OFFSET + 8)
    else:
        feature(hdr & (XFEATURE_MASK_SSE | XFEATURE_MASK_YMM), MXCSR_OFFSET, MXCSR_OFFSET + 8)
    feature(hdr & XFEATURE_MASK_FP, 32, 160)
    feature(hdr & XFEATURE_MASK_SSE, 160, 416)
    if mode == XSTATE_COPY_XSAVE:
        out.extend(bytes(48))
        out.extend(xstate_fx_sw_bytes(system))
        out.extend(hdr.to_bytes(8, "little") + bytes(56))
        assert len(out) == _EXTENDED
        order = sorted(bits(hdr & ~XFEATURE_MASK_FPSSE),
                       key=lambda i: system.profile.component(i).offset)
        for i in order:
            comp = system.profile.component(i)
            if len(out) < comp.offset:
                out.extend(bytes(comp.offset - len(out)))
            if i == 9:
                out.extend(pkru_val.to_bytes(4, "little") + bytes(4))
            else:
                off = core._component_offset(system, fps, i)
                out.extend(xsave[off:off + comp.size])
    if len(out) < size:
        out.extend(bytes(size - len(out)))
    return bytes(out[:size])


def copy_xstate_to_uabi_buf(c: Cpu, tsk: Task, mode: str, size: int) -> bytes:
    """copy_xstate_to_uabi_buf(): the task's fpstate with its user_xfeatures and thread.pkru."""
    fps = tsk.fpu.fpstate
    # init_fpstate's image is only sliced (read) here: no copy of its page is needed
    return __copy_xstate_to_uabi_buf(c.m.system, c.m.init_fpstate.regs, fps,  # type: ignore[arg-type]
                                     fps.user_xfeatures, tsk.thread_pkru, mode, size)


def validate_user_xstate_header(hdr: bytes, fps: Fpstate) -> bool:
    """validate_user_xstate_header() (xstate.c): no feature outside the fpstate's
    user_xfeatures, XCOMP_BV zero (uncompacted UABI), no reserved byte set. True if valid."""
    xfeatures = int.from_bytes(hdr[0:8], "little")
    if xfeatures & ~fps.user_xfeatures:
        return False
    if int.from_bytes(hdr[8:16], "little"):
        return False
    return not int.from_bytes(hdr[16:64], "little")  # no reserved byte set


def mxcsr_by_format(system: FpuSystem) -> bool:
    """Whether the UABI copies run Chang S. Bae's "x86/fpu: Fix the MXCSR state reshuffling
    between userspace and kernel buffers" (v3 1/3, October 2022, not merged; the proposed fix
    ``mxcsr_by_format``), rather than the code every release has (variant uabi-mxcsr-by-ymm)."""
    return not system.runs_unfixed("uabi-mxcsr-by-ymm", "mxcsr_by_format")


def flip_inits_xmm(system: FpuSystem) -> bool:
    """Whether v3's SSE flip also puts XMM0-15 in their initial configuration (the proposed
    amendment ``mxcsr_flip_inits_xmm``; without it, variant mxcsr-flip-keeps-xmm)."""
    return not system.runs_unfixed("mxcsr-flip-keeps-xmm", "mxcsr_flip_inits_xmm")


def copy_uabi_to_xstate(system: FpuSystem, fps: Fpstate, kbuf: bytes,
                        pkru: list[int] | None) -> int:
    """copy_uabi_to_xstate() (xstate.c) from a kernel copy of the buffer: 0, or -EINVAL for a
    bad header or MXCSR, -EFAULT when the buffer is too short to read what the header names.
    ``pkru`` is a one-element list standing for the u32 *pkru (None: KVM's NULL).

    With the proposed fix ``mxcsr_by_format`` it is the patch's version (`_copy_uabi_v3`)."""
    fps.check_alive("copy_uabi_to_xstate")

    def read(off: int, n: int) -> bytes | None:
        return kbuf[off:off + n] if off + n <= len(kbuf) else None

    hdr = read(HDR, 64)
    if hdr is None:
        return -EFAULT
    if not validate_user_xstate_header(hdr, fps):
        return -EINVAL
    xfeatures = int.from_bytes(hdr[0:8], "little")
    if mxcsr_by_format(system):
        return _copy_uabi_v3(system, fps, read, xfeatures, pkru)
    if xfeatures & (XFEATURE_MASK_FPSSE | XFEATURE_MASK_YMM):
        mx = read(MXCSR_OFFSET, 8)
        if mx is None:
            return -EFAULT
        if int.from_bytes(mx[0:4], "little") & ~system.mxcsr_feature_mask:
            return -EINVAL
        if not xfeatures & XFEATURE_MASK_FP:
            fps.regs[MXCSR_OFFSET:MXCSR_OFFSET + 8] = mx
    if _copy_components(system, fps, read, xfeatures):
        return -EFAULT
    _pkru_from_xstate(system, fps, xfeatures, pkru)
    fps.xstate_bv = (fps.xstate_bv & XFEATURE_MASK_SUPERVISOR_ALL) | xfeatures
    return 0


def _copy_components(system: FpuSystem, fps: Fpstate, read: Any, mask: int) -> bool:
    """copy_uabi_to_xstate()'s loop over the components in ``mask``: each from its standard
    offset in the buffer to its offset in the fpstate. True where the buffer ends first
    (-EFAULT); an fpstate too small for a component is the model's KernelBug."""
    for i in bits(mask):
        comp = system.profile.component(i)
        data = read(comp.offset, comp.size)
        if data is None:
            return True
        dst = core._component_offset(system, fps, i)
        if dst + comp.size > len(fps.regs):
            raise KernelBug("xsave-out-of-bounds",
                            f"copy_uabi_to_xstate: component {i} at {dst} of "
                            f"{len(fps.regs)}-byte fpstate #{fps.ident}")
        fps.regs[dst:dst + comp.size] = data
    return False


def _pkru_from_xstate(system: FpuSystem, fps: Fpstate, xfeatures: int,
                      pkru: list[int] | None) -> None:
    """copy_uabi_to_xstate()'s *pkru: the copied PKRU where the header has it, else 0 (KVM
    passes NULL: nothing)."""
    if pkru is None:
        return
    if xfeatures & XFEATURE_MASK_PKRU:
        off = core._component_offset(system, fps, 9)
        pkru[0] = int.from_bytes(fps.regs[off:off + 4], "little")
    else:
        pkru[0] = 0


def _copy_uabi_v3(system: FpuSystem, fps: Fpstate, read: Any, xfeatures: int,
                  pkru: list[int] | None) -> int:
    """copy_uabi_to_xstate() after the header's validation, as Chang S. Bae's v3 1/3 has it:
    x87 (its control words and ST0-7, not MXCSR) only with FP in the header, a copy that
    faults being -EINVAL; MXCSR (validated, -EFAULT/-EINVAL) whenever the fpstate's
    user_xfeatures has SSE or YMM, whatever the header says ("userspace uses the uncompacted
    format"); XMM0-15 only with SSE; the extended components as before; then on a compacted
    kernel SSE is set in XSTATE_BV whenever the stored MXCSR is not MXCSR_DEFAULT, so that
    XRSTORS loads it -- and with it the XMM bytes of the fpstate, which this copy wrote only
    if the header had SSE: a header without SSE then gives the task whatever XMM values the
    fpstate last held instead of their initial zeros (variant mxcsr-flip-keeps-xmm,
    kernel-findings 6). The proposed amendment ``mxcsr_flip_inits_xmm`` zeroes them when the
    flip sets SSE that the header did not have."""
    regs = fps.regs
    if xfeatures & XFEATURE_MASK_FP:
        legacy, st = read(0, MXCSR_OFFSET), read(32, 128)
        if legacy is None or st is None:
            return -EINVAL
        regs[0:MXCSR_OFFSET], regs[32:160] = legacy, st
    if fps.user_xfeatures & (XFEATURE_MASK_SSE | XFEATURE_MASK_YMM):
        mx = read(MXCSR_OFFSET, 8)
        if mx is None:
            return -EFAULT
        if int.from_bytes(mx[0:4], "little") & ~system.mxcsr_feature_mask:
            return -EINVAL
        regs[MXCSR_OFFSET:MXCSR_OFFSET + 8] = mx
    if xfeatures & XFEATURE_MASK_SSE:
        xmm = read(160, 256)
        if xmm is None:
            return -EINVAL
        regs[160:416] = xmm
    if _copy_components(system, fps, read, xfeatures & ~XFEATURE_MASK_FPSSE):
        return -EFAULT
    _pkru_from_xstate(system, fps, xfeatures, pkru)
    bv = (fps.xstate_bv & XFEATURE_MASK_SUPERVISOR_ALL) | xfeatures
    if system.xcompacted and regs[MXCSR_OFFSET:MXCSR_OFFSET + 4] != MXCSR_INIT:
        if not bv & XFEATURE_MASK_SSE and flip_inits_xmm(system):
            regs[160:416] = bytes(256)  # the amendment: XMM0-15 as the header says, initial
        bv |= XFEATURE_MASK_SSE
    fps.xstate_bv = bv
    return 0


@dataclass(frozen=True, slots=True)
class Ubuf:
    """The tracer's buffer a regset set function copies from (its ``ubuf``: copy_from_user()
    or user_regset_copyin()), read only where the set function reads it -- after its size
    checks, before fpu_force_restore(). Either ``data``, the bytes a caller of the model hands
    over (a copy past their end faults, as a user buffer shorter than iov_len does), or the
    tracer's user memory ``mem`` at ``addr``, read under the tracer's PKRU ``pkru``."""

    data: bytes = b""
    mem: UserMemory | None = None
    addr: int = 0
    pkru: int = 0

    def copy_from_user(self, n: int) -> bytes | None:
        """The ``n`` bytes, or None where the copy faults (the caller's -EFAULT)."""
        if self.mem is None:
            return self.data[:n] if len(self.data) >= n else None
        try:
            return self.mem.read(self.addr, n, pkru=self.pkru)
        except PageFault:
            return None


def sync_fpstate(c: Cpu, fpu: Fpu) -> None:
    """sync_fpstate() (regset.c): a get on current (core dump) saves its live registers."""
    if fpu is c.current.fpu:
        core.fpu_sync_fpstate(c, fpu)


def fpu_force_restore(c: Cpu, fpu: Fpu) -> None:
    """fpu_force_restore() (regset.c): only stopped children are modified in memory; zap
    last_cpu so their next return to user reloads. Modifying current is a WARN."""
    if fpu is c.current.fpu:
        raise KernelBug("force-restore-current", "fpu_force_restore() on current")
    __fpu_invalidate_fpregs_state(fpu)


def xstateregs_get(c: Cpu, target: Task, size: int) -> bytes | int:
    """xstateregs_get(): -ENODEV without XSAVE; else the UABI image, ``size`` bytes."""
    if not c.m.system.xsave:
        return -ENODEV
    sync_fpstate(c, target.fpu)
    return copy_xstate_to_uabi_buf(c, target, XSTATE_COPY_XSAVE, size)


def xstateregs_set(c: Cpu, target: Task, pos: int, count: int, ubuf: Ubuf) -> int:
    """xstateregs_set(): -ENODEV without XSAVE; the write must be one whole standard buffer
    (pos 0, count == fpu_user_cfg.max_size) else -EFAULT; copy_from_user() of the buffer
    (-EFAULT, the tracee untouched, where it faults); then fpu_force_restore() and
    copy_uabi_from_kernel_to_xstate(), whose PKRU goes to thread.pkru. Variant
    ``ptrace-set-no-invalidate`` skips the invalidation. Before v6.2 (versions row
    ``ptrace_pkru_to_thread``; variant ``ptrace-pkru-ignored``) thread.pkru stays as it was:
    the PKRU of the buffer lands in the fpstate, which no restore reads for PKRU."""
    system = c.m.system
    if not system.xsave:
        return -ENODEV
    if pos != 0 or count != system.user.max_size:
        return -EFAULT
    data = ubuf.copy_from_user(count)
    if data is None:
        return -EFAULT
    if not system.has_variant("ptrace-set-no-invalidate"):
        fpu_force_restore(c, target.fpu)
    pkru = [target.thread_pkru]
    ret = copy_uabi_to_xstate(system, target.fpu.fpstate, data, pkru)
    if not system.runs_unfixed("ptrace-pkru-ignored", "ptrace_pkru_to_thread"):
        target.thread_pkru = pkru[0]
    return ret


def xfpregs_get(c: Cpu, target: Task, size: int) -> bytes | int:
    """xfpregs_get() (NT_PRFPREG on x86-64): the 512-byte FXSAVE image (init values for
    components in init state)."""
    if not c.m.system.fxsr:
        return -ENODEV
    sync_fpstate(c, target.fpu)
    return copy_xstate_to_uabi_buf(c, target, XSTATE_COPY_FX, size)


def xfpregs_set(c: Cpu, target: Task, pos: int, count: int, ubuf: Ubuf) -> int:
    """xfpregs_set(): exactly 512 bytes at pos 0 else -EINVAL; user_regset_copyin() of the
    buffer (-EFAULT where it faults); MXCSR reserved bits -EINVAL; invalidate, copy the fxsave
    area, and mark FP|SSE in use in the header."""
    system = c.m.system
    if not system.fxsr:
        return -ENODEV
    if pos != 0 or count != FXSAVE_SIZE:
        return -EINVAL
    new = ubuf.copy_from_user(FXSAVE_SIZE)
    if new is None:
        return -EFAULT
    if int.from_bytes(new[MXCSR_OFFSET:MXCSR_OFFSET + 4], "little") & ~system.mxcsr_feature_mask:
        return -EINVAL
    fpu_force_restore(c, target.fpu)
    fps = target.fpu.fpstate
    fps.check_alive("xfpregs_set")
    fps.regs[0:FXSAVE_SIZE] = new
    if system.xsave:
        fps.xstate_bv = fps.xstate_bv | XFEATURE_MASK_FPSSE
    return 0


def _regset(system: FpuSystem, view: str, note: int) -> tuple[int, int, Any, Any] | None:
    """(size of a word, regset size, get, set) of an FPU regset of a view (the x86_64_regsets
    and x86_32_regsets tables of arch/x86/kernel/ptrace.c), None when the view has none."""
    if note == NT_X86_XSTATE:
        return 8, regset_xstate_size(system), xstateregs_get, xstateregs_set
    if view == VIEW_X86_64:
        return (8, FXSAVE_SIZE, xfpregs_get, xfpregs_set) if note == NT_PRFPREG else None
    if note == NT_PRFPREG:
        return 4, USER_I387_IA32_SIZE, fpregs_get, fpregs_set
    if note == NT_PRXFPREG:
        return 4, FXSAVE_SIZE, xfpregs_get, xfpregs_set
    return None


def ptrace_regset(c: Cpu, target: Task, req: int, note: int, iov_len: int,
                  data: bytes = b"", view: str = VIEW_X86_64) -> tuple[int, bytes]:
    """ptrace_regset() (kernel/ptrace.c) for the FPU regsets of ``view`` (a compat tracee's
    is VIEW_IA32), with ptrace_check_attach's "the tracee must be stopped" (-ESRCH
    otherwise), the tracer's buffer given as bytes (``data``, for SETREGSET).

    iov_len must be a multiple of the regset's word size (8 on x86-64; 4 for the ia32
    NT_PRFPREG and NT_PRXFPREG) else -EINVAL; it is clamped to the regset size. GETREGSET
    returns (0, the first iov_len bytes); SETREGSET passes iov_len as count, and the set
    function reads the buffer after its own size rules (so a short NT_X86_XSTATE write is
    -EFAULT, a short NT_PRFPREG one -EINVAL, a longer one is clamped and accepted; ``data``
    shorter than the clamped iov_len faults: -EFAULT). Returns (result, bytes read).
    """
    ret, got, _ = _ptrace_regset(c, target, req, note, iov_len, Ubuf(data), view)
    return ret, got


def _ptrace_regset(c: Cpu, target: Task, req: int, note: int, iov_len: int, ubuf: Ubuf,
                   view: str) -> tuple[int, bytes, int]:
    """`ptrace_regset` with the set function's source ``ubuf``: (result, the bytes a get
    made, iov_len clamped to the regset size -- what ptrace_request() writes back)."""
    if target.state is not _STOPPED:
        return -ESRCH, b"", iov_len
    regset = _regset(c.m.system, view, note)
    if regset is None:
        return -EINVAL, b"", iov_len
    word, full, get, put = regset
    if iov_len % word:
        return -EINVAL, b"", iov_len
    n = min(iov_len, full)
    if req == PTRACE_GETREGSET:
        got = get(c, target, n)
        return (got, b"", n) if isinstance(got, int) else (0, got, n)
    if req == PTRACE_SETREGSET:
        return put(c, target, 0, n, ubuf), b"", n
    raise IllegalEvent(f"ptrace request {req:#x} is not a regset request")


def ptrace_regset_iov(c: Cpu, target: Task, req: int, note: int, uiov: int,
                      view: str = VIEW_X86_64) -> int:
    """ptrace_request()'s PTRACE_GETREGSET / PTRACE_SETREGSET (kernel/ptrace.c) by the
    current task, the tracer, whose struct iovec is at ``uiov`` in its own memory.

    Every access to the tracer's memory is its own (copy_to_user() and friends run under the
    tracer's PKRU: a protection key it closed makes them fault): __get_user() of iov_base and
    iov_len (-EFAULT); `ptrace_regset`, whose get result goes out with copy_regset_to_user()'s
    copy_to_user() (-EFAULT, with the bytes before the faulting page written: a buffer across
    two mappings, the second closed) and whose set function reads iov_base
    itself (`Ubuf`); on success __put_user() of the clamped iov_len, whose fault is -EFAULT
    after the regset was read out or written -- a write the tracee keeps. Returns 0 or -errno.
    """
    from fpstate.kernel.x86.signal import read_pkru

    mem = c.current.process.mm
    pkru = read_pkru(c)
    try:
        iov = mem.read(uiov, 16, pkru=pkru)
    except PageFault:
        return -EFAULT
    base = int.from_bytes(iov[:8], "little")
    length = int.from_bytes(iov[8:], "little")
    ret, got, n = _ptrace_regset(c, target, req, note, length, Ubuf(mem=mem, addr=base,
                                                                    pkru=pkru), view)
    if ret:
        return ret
    if got and mem.copy_to_user(base, got, pkru=pkru):  # copy_regset_to_user()
        return -EFAULT  # (the bytes before the faulting page are written)
    try:
        mem.write(uiov + 8, n.to_bytes(8, "little"), pkru=pkru)
    except PageFault:
        return -EFAULT
    return 0


def sys_ptrace_regset(c: Cpu, target: Task, req: int, note: int, iov_len: int,
                      data: bytes = b"", view: str = VIEW_X86_64) -> KPath:
    """ptrace(PTRACE_GETREGSET / PTRACE_SETREGSET, pid, note, &iov) by the current task (the
    tracer) as a kernel path; (result, bytes read)."""
    if False:  # pragma: no cover - a kernel path without preemption points
        yield
    return ptrace_regset(c, target, req, note, iov_len, data, view)


def sys_ptrace_regset_iov(c: Cpu, target: Task, req: int, note: int, uiov: int,
                          view: str = VIEW_X86_64) -> KPath:
    """ptrace(PTRACE_GETREGSET / PTRACE_SETREGSET, pid, note, uiov) by the current task (the
    tracer), its struct iovec and buffer in its own memory (`ptrace_regset_iov`), as a kernel
    path; 0 or -errno."""
    if False:  # pragma: no cover - a kernel path without preemption points
        yield
    return ptrace_regset_iov(c, target, req, note, uiov, view)


# -- the ia32 legacy x87 format (CONFIG_IA32_EMULATION): user_i387_ia32_struct ----------------

#: sizeof(struct user_i387_ia32_struct) (asm/user32.h): cwd, swd, twd, fip, fcs, foo, fos as
#: u32, then the 8 x87 registers as 10-byte values (the fsave layout of struct _fpstate_32).
USER_I387_IA32_SIZE = 108
#: The tag of one x87 register in the full (fsave) tag word.
FP_EXP_TAG_VALID, FP_EXP_TAG_ZERO, FP_EXP_TAG_SPECIAL, FP_EXP_TAG_EMPTY = 0, 1, 2, 3
#: The selectors of a compat task (compat_start_thread): __USER32_CS, and __USER_DS for its
#: data segments. The model's ia32 frames belong to such a task.
USER32_CS, USER_DS = 0x23, 0x2B
_ST_SPACE = 32  #: fxregs_state.st_space: 8 registers of 16 bytes, the first 10 used


def twd_i387_to_fxsr(twd: int) -> int:
    """twd_i387_to_fxsr() (regset.c): the full tag word (2 bits per physical register) to
    FXSAVE's abridged one (1 bit each: not empty)."""
    tmp = ~twd & 0xFFFFFFFF
    tmp = (tmp | tmp >> 1) & 0x5555
    tmp = (tmp | tmp >> 1) & 0x3333
    tmp = (tmp | tmp >> 2) & 0x0F0F
    return (tmp | tmp >> 4) & 0x00FF


def twd_fxsr_to_i387(fx: bytes) -> int:
    """twd_fxsr_to_i387() (regset.c): the full tag word of a 512-byte FXSAVE area. Each
    non-empty physical register i is classified by the register stored in slot (i - TOP) & 7:
    exponent 0x7fff -> special; exponent 0 -> zero if the significand is 0, else special
    (denormal); otherwise valid when the integer bit (bit 63) is set, else special
    (unnormal). The high half is all ones."""
    tos = int.from_bytes(fx[2:4], "little") >> 11 & 7
    twd = fx[4]
    ret = 0xFFFF0000
    for i in range(8):
        if twd >> i & 1:
            off = _ST_SPACE + ((i - tos) & 7) * 16
            significand = int.from_bytes(fx[off:off + 8], "little")
            exponent = int.from_bytes(fx[off + 8:off + 10], "little") & 0x7FFF
            if exponent == 0x7FFF:
                tag = FP_EXP_TAG_SPECIAL
            elif exponent == 0:
                tag = FP_EXP_TAG_ZERO if significand == 0 else FP_EXP_TAG_SPECIAL
            else:
                tag = FP_EXP_TAG_VALID if significand >> 63 else FP_EXP_TAG_SPECIAL
        else:
            tag = FP_EXP_TAG_EMPTY
        ret |= tag << 2 * i
    return ret


def convert_from_fxsr(fx: bytes, cs: int = USER32_CS, ds: int = USER_DS) -> bytes:
    """__convert_from_fxsr() (regset.c) on x86-64: struct user_i387_ia32_struct from a
    512-byte FXSAVE area. cwd and swd with the high half set, the full tag word, FIP and FDP
    truncated to 32 bits; the selectors are not in a 64-bit FXSAVE, so fcs is the task's user
    CS (task_pt_regs()->cs) and fos its DS with the high half set; then the 10-byte x87
    registers."""
    def u32(v: int) -> bytes:
        return (v & 0xFFFFFFFF).to_bytes(4, "little")

    out = (u32(int.from_bytes(fx[0:2], "little") | 0xFFFF0000)
           + u32(int.from_bytes(fx[2:4], "little") | 0xFFFF0000)
           + u32(twd_fxsr_to_i387(fx))
           + u32(int.from_bytes(fx[8:16], "little"))
           + u32(cs)
           + u32(int.from_bytes(fx[16:24], "little"))
           + u32(ds | 0xFFFF0000))
    return out + b"".join(bytes(fx[_ST_SPACE + 16 * i:_ST_SPACE + 16 * i + 10])
                          for i in range(8))


def convert_to_fxsr(fx: bytearray, env: bytes) -> None:
    """convert_to_fxsr() (regset.c) on x86-64: fold a user_i387_ia32_struct into a 512-byte
    FXSAVE area in place. cwd and swd (low halves); the abridged tag word as a u16 (its
    reserved high byte becomes 0); FOP from fcs >> 16 (0 for a plain selector); FIP and FDP
    zero-extended from 32 bits; "cs and ds ignored"; the first 10 bytes of each register slot
    (the other 6 keep what was there)."""
    def u32(off: int) -> int:
        return int.from_bytes(env[off:off + 4], "little")

    fx[0:2] = (u32(0) & 0xFFFF).to_bytes(2, "little")
    fx[2:4] = (u32(4) & 0xFFFF).to_bytes(2, "little")
    fx[4:6] = twd_i387_to_fxsr(u32(8) & 0xFFFF).to_bytes(2, "little")
    fx[6:8] = (u32(16) >> 16).to_bytes(2, "little")
    fx[8:16] = u32(12).to_bytes(8, "little")
    fx[16:24] = u32(20).to_bytes(8, "little")
    for i in range(8):
        off = _ST_SPACE + 16 * i
        fx[off:off + 10] = env[28 + 10 * i:38 + 10 * i]


def fpregs_get(c: Cpu, target: Task, size: int) -> bytes | int:
    """fpregs_get() (regset.c, the ia32 NT_PRFPREG): sync_fpstate(), the x87 part of the UABI
    image (XSTATE_COPY_FP: init values when x87 is in init state) converted to
    user_i387_ia32_struct with the tracee's CS and saved DS (a compat task's), ``size``
    bytes."""
    system = c.m.system
    if not system.fxsr:
        raise IllegalEvent("fpregs_get without FXSR (the fsave image) is not modelled")
    sync_fpstate(c, target.fpu)
    if system.xsave:
        fx = copy_xstate_to_uabi_buf(c, target, XSTATE_COPY_FP, FXSAVE_SIZE)
    else:
        fx = bytes(target.fpu.fpstate.regs[:FXSAVE_SIZE])
    env = convert_from_fxsr(fx, USER32_CS, USER_DS)
    return env[:size] + bytes(max(0, size - len(env)))


def fpregs_set(c: Cpu, target: Task, pos: int, count: int, ubuf: Ubuf) -> int:
    """fpregs_set() (regset.c): exactly the 108-byte user_i387_ia32_struct at pos 0 else
    -EINVAL; user_regset_copyin() of it (-EFAULT where it faults); fpu_force_restore(), fold
    it into the fpstate's FXSAVE area (convert_to_fxsr: FOP from fcs >> 16, 32-bit FIP/FDP,
    the selectors ignored), and mark FP in use."""
    system = c.m.system
    if pos != 0 or count != USER_I387_IA32_SIZE:
        return -EINVAL
    if not system.fxsr:
        raise IllegalEvent("fpregs_set without FXSR (the fsave image) is not modelled")
    env = ubuf.copy_from_user(count)
    if env is None:
        return -EFAULT
    fpu_force_restore(c, target.fpu)
    fps = target.fpu.fpstate
    fps.check_alive("fpregs_set")
    legacy = bytearray(fps.regs[:FXSAVE_SIZE])
    convert_to_fxsr(legacy, env)
    fps.regs[:FXSAVE_SIZE] = legacy
    if system.xsave:
        fps.xstate_bv = fps.xstate_bv | XFEATURE_MASK_FP
    return 0
