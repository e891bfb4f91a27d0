"""Signal frames: the FPU part of delivering a signal and of sigreturn, byte-exact.

Models arch/x86/kernel/fpu/signal.c (copy_fpstate_to_sigframe, fpu__restore_sig,
fpu__alloc_mathframe, fpu__get_fpstate_size), the signal-frame helpers of kernel/fpu/xstate.h
(xsave_to_user_sigframe, update_pkru_in_sigframe) and arch/x86/kernel/signal.c (get_sigframe,
init_sigframe_size, handle_signal) and arch/x86/kernel/signal_32.c (the ia32 frames of a
compat task: ia32_setup_frame, ia32_setup_rt_frame, sys32_sigreturn, sys32_rt_sigreturn),
Linux v6.17.

The 64-bit frame, from high to low addresses (``sp`` the interrupted stack pointer)::

    sp - 128                              red zone skipped (or the top of the sigaltstack)
    buf_fx = round_down(sp - (user_size + 4), 64)
        [0, 512)       FXSAVE-format legacy area; bytes 464..511 = struct _fpx_sw_bytes:
                       magic1 = FP_XSTATE_MAGIC1, extended_size = user_size + 4,
                       xfeatures = fpstate->user_xfeatures, xstate_size = user_size
        [512, 576)     XSAVE header (zeroed, then written by XSAVE; FP|SSE forced on)
        [576, user_size)  components at their standard offsets
        [user_size, +4)   FP_XSTATE_MAGIC2
    frame = round_down(buf_fx - sizeof(struct rt_sigframe), 16) - 8
        frame + 232    uc.uc_mcontext.fpstate = buf_fx

An ia32 frame (a handler installed by a 32-bit syscall: SA_IA32_ABI) has no red zone and puts
a 112-byte fsave header (struct _fpstate_32 up to ``magic``) right below the 64-aligned
``buf_fx``: the x87 environment and registers in the legacy 32-bit format
(convert_from_fxsr, fpstate.kernel.x86.regset), ``status`` = FSW and ``magic`` =
X86_FXSR_MAGIC (0). sc.fpstate points at the header; extended_size counts it. On sigreturn the
header wins over the FXSAVE area for the x87 part (convert_to_fxsr): FOP becomes 0 and FIP/FDP
are 32-bit. The frame sits at ((fpstate - sizeof frame + 4) & -16) - 4 (i386 ABI).

AT_MINSIGSTKSZ (`get_sigframe_size`) is the worst case over all frame types and the *maximum*
user size, whatever the task's permissions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

# regset is used as a module: it imports xstate_prctl, which imports this module.
from fpstate.kernel.x86 import core, regset
from fpstate.kernel.x86.context import (
    __cpu_invalidate_fpregs_state,
    __fpu_invalidate_fpregs_state,
    fpregs_restore_userregs,
    requires,
)
from fpstate.kernel.x86.hw import HDR, MXCSR_OFFSET, KernelBuf, PageFault, UserBuf
from fpstate.kernel.x86.sched import (
    SA_IA32_ABI,
    SA_ONSTACK,
    SA_SIGINFO,
    SI_KERNEL,
    SIGSEGV,
    SS_AUTODISARM,
    SS_DISABLE,
)
from fpstate.kernel.x86.sched import Signal as Sig
from fpstate.kernel.x86.types import (
    FREGS_STATE_SIZE,
    XFEATURE_MASK_SIGFRAME_INITOPT,
    XFEATURE_MASK_USER_SUPPORTED,
    FpuSystem,
    IllegalEvent,
)
from fpstate.kernel.x86.xstate_prctl import EFAULT, do_sigaltstack, on_sig_stack
from fpstate.x86.layout import standard_size
from fpstate.x86.program import Fault
from fpstate.x86.xfeatures import FXSAVE_SIZE, XFEATURE_MASK_FPSSE, XFEATURE_MASK_PKRU

if TYPE_CHECKING:
    from fpstate.kernel.x86.sched import Cpu, KPath, Signal, Task

FP_XSTATE_MAGIC1 = 0x46505853
FP_XSTATE_MAGIC2 = 0x46505845
FP_XSTATE_MAGIC2_SIZE = 4
SW_BYTES_OFFSET = 464  #: struct _fpx_sw_bytes inside fxregs_state.sw_reserved
SW_BYTES_SIZE = 48
#: sizeof(struct rt_sigframe) on x86-64: pretcode 8 + ucontext 304 + siginfo 128.
RT_SIGFRAME_SIZE = 440
#: sizeof(struct sigframe_ia32): 4 + 4 + sigcontext_32 88 + _fpstate_32 624 + 4 + 8, padded to
#: the 8-byte alignment of _fpx_sw_bytes.
SIGFRAME_IA32_SIZE = 736
FRAME_ALIGNMENT = 16
MAX_FRAME_PADDING = FRAME_ALIGNMENT - 1
MAX_XSAVE_PADDING = 63
REDZONE = 128
#: Offsets in struct rt_sigframe (x86-64): uc at 8, uc_stack at 24, uc_mcontext at 48.
UC_FLAGS_OFFSET = 8
UC_STACK_OFFSET = 24
#: uc_flags bits (uapi/asm/ucontext.h) and si_code's offset in siginfo_t.
UC_FP_XSTATE, UC_SIGCONTEXT_SS, UC_STRICT_RESTORE_SS = 0x1, 0x2, 0x4
SI_CODE_OFFSET = 8
SC_RSP_OFFSET = 48 + 15 * 8
SC_FPSTATE_OFFSET = 48 + 23 * 8
SIGINFO_OFFSET = 312
#: struct _fpstate_32 (uapi/asm/sigcontext.h): ``status`` and ``magic`` after the 108-byte
#: user_i387_ia32_struct; X86_FXSR_MAGIC says an FXSAVE area follows.
FSAVE_STATUS_OFFSET, FSAVE_MAGIC_OFFSET, X86_FXSR_MAGIC = 108, 110, 0x0000
#: sizeof(struct rt_sigframe_ia32): pretcode, sig, pinfo, puc, compat_siginfo_t (128), struct
#: ucontext_ia32 (116) and retcode (8).
RT_SIGFRAME_IA32_SIZE = 268
#: struct sigcontext_32 inside a frame: at 8 in sigframe_ia32, at uc + 20 (164) in
#: rt_sigframe_ia32; its sp at 28, sp_at_signal at 68, fpstate at 76.
SC32_SP, SC32_SP_AT_SIGNAL, SC32_FPSTATE = 28, 68, 76
SIGFRAME_IA32_SC, RT_IA32_INFO, RT_IA32_UC = 8, 16, 144
RT_IA32_UC_STACK, RT_IA32_SC = RT_IA32_UC + 8, RT_IA32_UC + 20


# -- sizes ----------------------------------------------------------------------------------------


def xstate_sigframe_size(system: FpuSystem, user_size: int) -> int:
    """xstate_sigframe_size(): the task's user_size, + 4 for MAGIC2 with XSAVE."""
    return user_size + FP_XSTATE_MAGIC2_SIZE if system.xsave else user_size


def fpu__get_fpstate_size(system: FpuSystem) -> int:
    """fpu__get_fpstate_size() (signal.c, __init): the maximum user size + MAGIC2, + the
    112-byte fsave header whenever IA32_EMULATION (or a 32-bit kernel) is built in."""
    ret = system.user.max_size
    if system.xsave:
        ret += FP_XSTATE_MAGIC2_SIZE
    if system.ia32_emulation and system.fxsr:
        ret += FREGS_STATE_SIZE
    return ret


def get_sigframe_size(system: FpuSystem) -> int:
    """get_sigframe_size() = max_frame_size (init_sigframe_size(), arch/x86/kernel/signal.c):
    the largest siginfo+ucontext frame (sizeof(struct sigframe_ia32) with IA32_EMULATION, else
    sizeof(struct rt_sigframe)) + 15 + fpu__get_fpstate_size() + 63, rounded up to 16. This is
    AT_MINSIGSTKSZ and the "signal: max sigframe size" boot line."""
    base = SIGFRAME_IA32_SIZE if system.ia32_emulation else RT_SIGFRAME_SIZE
    size = base + MAX_FRAME_PADDING + fpu__get_fpstate_size(system) + MAX_XSAVE_PADDING
    return (size + FRAME_ALIGNMENT - 1) // FRAME_ALIGNMENT * FRAME_ALIGNMENT


def at_minsigstksz(system: FpuSystem) -> int:
    """AT_MINSIGSTKSZ of the auxiliary vector (ARCH_DLINFO, asm/elf.h): get_sigframe_size()."""
    return get_sigframe_size(system)


def boot_line(system: FpuSystem) -> str:
    """The pr_info of init_sigframe_size() (pr_fmt "signal: ")."""
    return f"signal: max sigframe size: {get_sigframe_size(system)}"


# -- struct _fpx_sw_bytes -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FpxSwBytes:
    """struct _fpx_sw_bytes (uapi/asm/sigcontext.h), 48 bytes at fxsave offset 464."""

    magic1: int
    extended_size: int
    xfeatures: int
    xstate_size: int

    def pack(self) -> bytes:
        return (self.magic1.to_bytes(4, "little") + self.extended_size.to_bytes(4, "little")
                + self.xfeatures.to_bytes(8, "little") + self.xstate_size.to_bytes(4, "little")
                + bytes(28))

    @classmethod
    def unpack(cls, data: bytes) -> FpxSwBytes:
        assert len(data) >= SW_BYTES_SIZE
        return cls(int.from_bytes(data[0:4], "little"), int.from_bytes(data[4:8], "little"),
                   int.from_bytes(data[8:16], "little"), int.from_bytes(data[16:20], "little"))


def save_sw_bytes(user_size: int, user_xfeatures: int, ia32_frame: bool) -> FpxSwBytes:
    """save_sw_bytes() (signal.c)."""
    ext = user_size + FP_XSTATE_MAGIC2_SIZE + (FREGS_STATE_SIZE if ia32_frame else 0)
    return FpxSwBytes(FP_XSTATE_MAGIC1, ext, user_xfeatures, user_size)


# -- delivery -------------------------------------------------------------------------------------


def fpu__alloc_mathframe(c: Cpu, sp: int, ia32_frame: bool) -> tuple[int, int, int]:
    """fpu__alloc_mathframe(): (sp, buf_fx, size) with buf_fx = round_down(sp - frame, 64)."""
    frame_size = xstate_sigframe_size(c.m.system, c.current.fpu.fpstate.user_size)
    sp = buf_fx = (sp - frame_size) & ~63
    if ia32_frame and c.m.system.fxsr:
        frame_size += FREGS_STATE_SIZE
        sp -= FREGS_STATE_SIZE
    return sp, buf_fx, frame_size


def xfeatures_need_sigframe_write(c: Cpu) -> int:
    """xfeatures_need_sigframe_write(): in-use features (XGETBV(1)) plus every user feature
    outside SIGFRAME_INITOPT."""
    return c.regs.xgetbv1() | (XFEATURE_MASK_USER_SUPPORTED & ~XFEATURE_MASK_SIGFRAME_INITOPT)


def _u64(c: Cpu, addr: int, *, faults: bool = True) -> int:
    return int.from_bytes(c.current.process.mm.read(addr, 8, faults_enabled=faults,
                                                    pkru=read_pkru(c)), "little")


def set_xfeature_in_sigframe(c: Cpu, buf_fx: int, mask: int, *, faults: bool = True) -> None:
    """set_xfeature_in_sigframe(): OR ``mask`` into the frame header's xfeatures."""
    mm = c.current.process.mm
    value = _u64(c, buf_fx + HDR, faults=faults) | mask
    mm.write(buf_fx + HDR, value.to_bytes(8, "little"), faults_enabled=faults, pkru=read_pkru(c))


def update_pkru_in_sigframe(c: Cpu, buf_fx: int, pkru: int) -> None:
    """update_pkru_in_sigframe(): with OSPKE, mark PKRU in use in the frame and store the
    pre-signal PKRU (the register is 0 while the frame is written) at its standard offset.
    v6.12 (versions row ``sigframe_pkru_xstate_bv``; variant ``pkru-sigframe-no-xstate-bv``)
    stores the value only: where XSAVE wrote XSTATE_BV[PKRU] = 0 (AMD after WRPKRU 0,
    `FpRegs.wrpkru`) sigreturn ignores it."""
    if not c.m.system.ospke:
        return
    if not c.m.system.runs_unfixed("pkru-sigframe-no-xstate-bv", "sigframe_pkru_xstate_bv"):
        set_xfeature_in_sigframe(c, buf_fx, XFEATURE_MASK_PKRU, faults=False)
    off = c.m.system.profile.component(9).offset
    c.current.process.mm.write(buf_fx + off, pkru.to_bytes(4, "little"), faults_enabled=False,
                               pkru=read_pkru(c))


def xsave_to_user_sigframe(c: Cpu, buf_fx: int, pkru: int | None) -> Fault | None:
    """xsave_to_user_sigframe() (kernel/fpu/xstate.h): plain XSAVE (standard format, no
    XSAVEOPT: the area may have been modified since) of RFBM = fpstate->user_xfeatures, minus
    the in-init-state SIGFRAME_INITOPT features when dynamic sizing is on; then the PKRU fix."""
    fps = c.current.fpu.fpstate
    mask = fps.user_xfeatures
    if c.m.system.fpu_state_size_dynamic:
        mask &= xfeatures_need_sigframe_write(c)
    core.xfd_validate_state(c, fps, mask, False)
    buf = UserBuf(c.current.process.mm, buf_fx, faults_enabled=not c.pagefault_disabled,
                  pkru=read_pkru(c))
    fault = c.regs.xsave(buf, mask, "XSAVE")
    if fault is None and pkru is not None:  # None: before v6.12 (sigframe-under-user-pkru)
        try:
            update_pkru_in_sigframe(c, buf_fx, pkru)
        except PageFault as e:
            return Fault("#PF", f"{e.addr:#x}")
    return fault


def __clear_user(c: Cpu, addr: int, n: int) -> bool:
    """__clear_user() with page faults enabled: True when all ``n`` bytes were zeroed."""
    try:
        c.current.process.mm.write(addr, bytes(n), pkru=read_pkru(c))
    except PageFault:
        return False
    return True


@requires("task_context", "user_task")
def copy_fpstate_to_sigframe(c: Cpu, buf: int, buf_fx: int, size: int,
                             pkru: int | None) -> bool:
    """copy_fpstate_to_sigframe() (signal.c): buf == buf_fx for 64-bit frames; an ia32 frame
    has the fsave header at buf, 112 bytes below buf_fx.

    Zero the user header, then under fpregs_lock: load current's registers if they are not
    live and XSAVE them straight to the user frame with page faults disabled (a hard interrupt
    may arrive between the two: core.fpregs_locked_irq_window). A fault unlocks,
    clears (and so faults in) the frame and retries; if that clearing faults too, failure.
    Then an ia32 frame's fsave header (save_fsave_header). Finally the software bytes, MAGIC2
    and the forced FP|SSE bits (save_xstate_epilog).
    """
    ia32_fxstate = buf != buf_fx
    if ia32_fxstate and not c.m.system.fxsr:
        raise IllegalEvent("an ia32 frame without FXSR (fnsave) is not modelled")
    fps = c.current.fpu.fpstate
    if not __clear_user(c, buf_fx + HDR, 64):
        return False
    while True:
        core.fpregs_lock(c)
        if c.current.need_fpu_load:
            fpregs_restore_userregs(c)
        core.fpregs_locked_irq_window(c)
        c.pagefault_disabled += 1
        fault = xsave_to_user_sigframe(c, buf_fx, pkru)
        c.pagefault_disabled -= 1
        core.fpregs_unlock(c)
        if fault is None:
            break
        c.m.events["sigframe-retry"] += 1
        if not __clear_user(c, buf_fx, fps.user_size):
            return False
    if ia32_fxstate and not save_fsave_header(c, buf):
        return False
    return save_xstate_epilog(c, buf_fx, ia32_fxstate, fps.user_size, fps.user_xfeatures)


def save_fsave_header(c: Cpu, buf: int) -> bool:
    """save_fsave_header() (signal.c) with FXSR: if current's registers are live, FXSAVE them
    into its fpstate's legacy area first (under fpregs_lock; the image's XSAVE header is not
    touched; a hard interrupt may arrive between the test and the FXSAVE:
    core.fpregs_locked_irq_window); then the user_i387_ia32_struct converted from that area
    (convert_from_fxsr), ``status`` = its FSW and ``magic`` = X86_FXSR_MAGIC, at ``buf``. False
    on a fault."""
    t = c.current
    fps = t.fpu.fpstate
    core.fpregs_lock(c)
    if not t.need_fpu_load:
        core.fpregs_locked_irq_window(c, "save_fsave_header")
        fault = c.regs.fxsave(KernelBuf(fps.regs, fps))
        assert fault is None, fault
    core.fpregs_unlock(c)
    fx = bytes(fps.regs[:FXSAVE_SIZE])
    env = regset.convert_from_fxsr(fx, regset.USER32_CS, regset.USER_DS)
    try:
        mm, pk = t.process.mm, read_pkru(c)
        mm.write(buf, env, pkru=pk)
        mm.write(buf + FSAVE_STATUS_OFFSET, fx[2:4], pkru=pk)
        mm.write(buf + FSAVE_MAGIC_OFFSET, X86_FXSR_MAGIC.to_bytes(2, "little"), pkru=pk)
    except PageFault:
        return False
    return True


def save_xstate_epilog(c: Cpu, buf_fx: int, ia32_frame: bool, user_size: int,
                       user_xfeatures: int) -> bool:
    """save_xstate_epilog(): sw_bytes at 464, MAGIC2 at buf_fx + user_size, and FP|SSE set in
    the header so legacy code editing only the fxsave part gets its changes restored."""
    mm, pk = c.current.process.mm, read_pkru(c)
    sw = save_sw_bytes(user_size, user_xfeatures, ia32_frame)
    try:
        mm.write(buf_fx + SW_BYTES_OFFSET, sw.pack(), pkru=pk)
        if not c.m.system.xsave:
            return True
        mm.write(buf_fx + user_size, FP_XSTATE_MAGIC2.to_bytes(4, "little"), pkru=pk)
        set_xfeature_in_sigframe(c, buf_fx, XFEATURE_MASK_FPSSE)
    except PageFault:
        return False
    return True


def read_pkru(c: Cpu) -> int:
    """read_pkru(): RDPKRU with OSPKE, else 0."""
    if not c.m.system.ospke:
        return 0
    return int.from_bytes(c.regs.component(9)[:4], "little")


def write_pkru(c: Cpu, pkru: int) -> None:
    """write_pkru(): WRPKRU with OSPKE (no-op otherwise)."""
    if c.m.system.ospke:
        c.regs.wrpkru(pkru)


def get_sigframe(c: Cpu, sa_flags: int, frame_size: int = RT_SIGFRAME_SIZE,
                 ia32_frame: bool = False) -> tuple[int, int]:
    """get_sigframe() (arch/x86/kernel/signal.c): (frame, fpstate); frame = -1 when it would
    overflow the sigaltstack or the FPU state could not be written. A 64-bit frame skips the
    red zone and ends 8 below a 16-byte boundary; an ia32 frame has no red zone and is placed
    so that (frame + 4) % 16 == 0. (The legacy ia32 stack switch to sa_restorer needs a user
    SS other than __USER32_DS, which a compat task does not have: not modelled.)"""
    t = c.current
    nested = on_sig_stack(t, t.user_sp)
    entering = False
    sp = t.user_sp if ia32_frame else t.user_sp - REDZONE
    if sa_flags & SA_ONSTACK and t.sas_ss_size and not on_sig_stack(t, sp):
        sp = t.sas_ss_sp + t.sas_ss_size
        entering = True
    sp, buf_fx, math_size = fpu__alloc_mathframe(c, sp, ia32_frame)
    fpstate = sp
    sp -= frame_size
    if ia32_frame:
        sp = ((sp + 4) & ~(FRAME_ALIGNMENT - 1)) - 4
    else:
        sp = (sp & ~(FRAME_ALIGNMENT - 1)) - 8
    if (nested or entering) and not (t.sas_ss_sp < sp <= t.sas_ss_sp + t.sas_ss_size):
        c.m.log.append(f"{t.comm}[{t.pid}] overflowed sigaltstack")
        return -1, fpstate
    if c.m.system.runs_unfixed("sigframe-under-user-pkru", "sigframe_pkru_opened"):
        # Before v6.12 (versions row sigframe_pkru_opened) the frame was written under the
        # interrupted code's PKRU, whose value XSAVE stores itself: no key opened, no
        # update_pkru_in_sigframe().
        if not copy_fpstate_to_sigframe(c, fpstate, buf_fx, math_size, None):
            return -1, fpstate
        return sp, fpstate
    pkru = sig_prepare_pkru(c)
    if not copy_fpstate_to_sigframe(c, fpstate, buf_fx, math_size, pkru):
        write_pkru(c, pkru)  # the original, user-defined value
        return -1, fpstate
    return sp, fpstate


def sig_prepare_pkru(c: Cpu) -> int:
    """sig_prepare_pkru() (arch/x86/kernel/signal.c, v6.12): open every protection key
    (WRPKRU 0) so that the frame can be written on a sigaltstack protected by any of them;
    returns the interrupted code's PKRU, which update_pkru_in_sigframe() puts in the frame.
    fpu__clear_user_states() later gives the handler init_pkru_value."""
    pkru = read_pkru(c)
    write_pkru(c, 0)
    return pkru


def frame_uc_flags(system: FpuSystem) -> int:
    """frame_uc_flags() (signal_64.c) for a 64-bit task: UC_SIGCONTEXT_SS |
    UC_STRICT_RESTORE_SS, and UC_FP_XSTATE with XSAVE (host: 0x7)."""
    flags = UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS
    return flags | UC_FP_XSTATE if system.xsave else flags


def x64_setup_rt_frame(c: Cpu, sig: Signal) -> int:
    """x64_setup_rt_frame() as far as the model writes it: the FPU frame, uc_flags, uc_stack,
    the saved rsp and uc_mcontext.fpstate, si_signo and si_code. 0, or -EFAULT (the caller
    forces SIGSEGV)."""
    t = c.current
    action = t.handlers[sig.sig]
    frame, fpstate = get_sigframe(c, action.flags)
    if frame == -1:
        return -EFAULT
    mm, pk = t.process.mm, read_pkru(c)
    try:  # unsafe_save_altstack(): the raw sas_ss_* fields (host: (0, 0, 0) without one)
        mm.write(frame + UC_FLAGS_OFFSET, frame_uc_flags(c.m.system).to_bytes(8, "little"),
                 pkru=pk)
        mm.write(frame + UC_STACK_OFFSET, t.sas_ss_sp.to_bytes(8, "little")
                 + t.sas_ss_flags.to_bytes(4, "little")
                 + bytes(4) + t.sas_ss_size.to_bytes(8, "little"), pkru=pk)
        mm.write(frame + SC_RSP_OFFSET, t.user_sp.to_bytes(8, "little"), pkru=pk)
        mm.write(frame + SC_FPSTATE_OFFSET, fpstate.to_bytes(8, "little"), pkru=pk)
        mm.write(frame + SIGINFO_OFFSET, sig.sig.to_bytes(4, "little"), pkru=pk)
        mm.write(frame + SIGINFO_OFFSET + SI_CODE_OFFSET, sig.code.to_bytes(4, "little",
                                                                          signed=True), pkru=pk)
    except PageFault:
        return -EFAULT
    t.user_sp = frame
    sas_ss_reset_autodisarm(t)
    return 0


def sas_ss_reset_autodisarm(t: Task) -> None:
    """The end of unsafe_save_altstack() (and its compat twin): an SS_AUTODISARM sigaltstack is
    disarmed once saved in the frame (sas_ss_reset)."""
    if t.sas_ss_flags & SS_AUTODISARM:
        t.sas_ss_sp, t.sas_ss_size, t.sas_ss_flags = 0, 0, SS_DISABLE


def _put32(c: Cpu, addr: int, value: int) -> None:
    c.current.process.mm.write(addr, (value & 0xFFFFFFFF).to_bytes(4, "little"),
                               pkru=read_pkru(c))


def _setup_sigcontext32(c: Cpu, sc: int, fpstate: int) -> None:
    """__unsafe_setup_sigcontext32() as far as the model has the registers: sp and
    sp_at_signal (the interrupted ESP) and fpstate (ptr_to_compat)."""
    sp = c.current.user_sp
    _put32(c, sc + SC32_SP, sp)
    _put32(c, sc + SC32_SP_AT_SIGNAL, sp)
    _put32(c, sc + SC32_FPSTATE, fpstate)


def ia32_setup_frame(c: Cpu, sig: Signal) -> int:
    """ia32_setup_frame() (signal_32.c): struct sigframe_ia32 (a handler without SA_SIGINFO):
    sig at 4, sigcontext_32 at 8. 0, or -EFAULT."""
    t = c.current
    frame, fpstate = get_sigframe(c, t.handlers[sig.sig].flags, SIGFRAME_IA32_SIZE, True)
    if frame == -1:
        return -EFAULT
    try:
        _put32(c, frame + 4, sig.sig)
        _setup_sigcontext32(c, frame + SIGFRAME_IA32_SC, fpstate)
    except PageFault:
        return -EFAULT
    t.user_sp = frame
    return 0


def ia32_setup_rt_frame(c: Cpu, sig: Signal) -> int:
    """ia32_setup_rt_frame() (signal_32.c): struct rt_sigframe_ia32: sig, pinfo and puc,
    compat_siginfo_t at 16 (si_signo, si_code), struct ucontext_ia32 at 144 with uc_flags =
    UC_FP_XSTATE with XSAVE (else 0), uc_stack (unsafe_compat_save_altstack: the raw sas_ss_*
    fields; SS_AUTODISARM then disarms) and uc_mcontext at 164. 0, or -EFAULT."""
    t = c.current
    frame, fpstate = get_sigframe(c, t.handlers[sig.sig].flags, RT_SIGFRAME_IA32_SIZE, True)
    if frame == -1:
        return -EFAULT
    try:
        _put32(c, frame + 4, sig.sig)
        _put32(c, frame + 8, frame + RT_IA32_INFO)
        _put32(c, frame + 12, frame + RT_IA32_UC)
        _put32(c, frame + RT_IA32_UC, UC_FP_XSTATE if c.m.system.xsave else 0)
        _put32(c, frame + RT_IA32_UC + 4, 0)
        _put32(c, frame + RT_IA32_UC_STACK, t.sas_ss_sp)
        _put32(c, frame + RT_IA32_UC_STACK + 4, t.sas_ss_flags)
        _put32(c, frame + RT_IA32_UC_STACK + 8, t.sas_ss_size)
        _setup_sigcontext32(c, frame + RT_IA32_SC, fpstate)
        _put32(c, frame + RT_IA32_INFO, sig.sig)
        _put32(c, frame + RT_IA32_INFO + SI_CODE_OFFSET, sig.code)
    except PageFault:
        return -EFAULT
    t.user_sp = frame
    sas_ss_reset_autodisarm(t)
    return 0


def setup_rt_frame(c: Cpu, sig: Signal) -> int:
    """setup_rt_frame() (arch/x86/kernel/signal.c): an ia32 frame when the handler was
    installed by a 32-bit syscall (is_ia32_frame: SA_IA32_ABI), rt or not by SA_SIGINFO;
    else the 64-bit rt frame (x32 frames are not modelled)."""
    flags = c.current.handlers[sig.sig].flags
    if flags & SA_IA32_ABI:
        if flags & SA_SIGINFO:
            return ia32_setup_rt_frame(c, sig)
        return ia32_setup_frame(c, sig)
    return x64_setup_rt_frame(c, sig)


def handle_signal(c: Cpu, sig: Signal) -> None:
    """handle_signal() (arch/x86/kernel/signal.c): set up the frame; on failure
    force_sigsegv(); on success the handler starts with init user FPU state
    (fpu__clear_user_states)."""
    t = c.current
    if setup_rt_frame(c, sig):
        # signal_setup_done() -> force_sigsegv(): a failing SIGSEGV frame resets the handler.
        if sig.sig == SIGSEGV:
            t.handlers.pop(SIGSEGV, None)
        t.pending.insert(0, Sig(SIGSEGV, SI_KERNEL))
        return
    core.fpu__clear_user_states(c, t.fpu)


# -- sigreturn ------------------------------------------------------------------------------------


def check_xstate_in_sigframe(c: Cpu, buf_fx: int) -> FpxSwBytes | None:
    """check_xstate_in_sigframe(): the sw bytes, or None when they cannot be read.

    With the xstate_size checks (up to v6.14, and 6.18.y / 7.1 after the revert, the host):
    MAGIC1, 576 <= xstate_size <= current's user_size, xstate_size <= extended_size, and
    MAGIC2 at buf_fx + xstate_size. Without them (v6.15..v6.17, dc8aa31a7ac2): MAGIC1 and
    MAGIC2 at buf_fx + current's user_size. Failing either makes the frame FXSAVE-only
    (magic1 = 0, xstate_size 512, xfeatures FP|SSE) -- not an error.
    """
    mm = c.current.process.mm
    user_size = c.current.fpu.fpstate.user_size
    try:
        sw = FpxSwBytes.unpack(mm.read(buf_fx + SW_BYTES_OFFSET, SW_BYTES_SIZE,
                                       pkru=read_pkru(c)))
    except PageFault:
        return None
    checks = c.m.system.sigframe_xstate_size_checks \
        and not c.m.system.has_variant("sigframe-magic2-at-user-size")
    ok = sw.magic1 == FP_XSTATE_MAGIC1
    if ok and checks:
        ok = FXSAVE_SIZE + 64 <= sw.xstate_size <= min(user_size, sw.extended_size)
    if ok:
        at = sw.xstate_size if checks else user_size
        try:
            magic2 = int.from_bytes(mm.read(buf_fx + at, 4, pkru=read_pkru(c)), "little")
        except PageFault:
            return None
        if magic2 == FP_XSTATE_MAGIC2:
            return sw
    return FpxSwBytes(0, sw.extended_size, XFEATURE_MASK_FPSSE, FXSAVE_SIZE)


def __restore_fpregs_from_user(c: Cpu, buf: int, ufeatures: int, xrestore: int,
                               fx_only: bool) -> Fault | None:
    """__restore_fpregs_from_user(): XRSTOR (or FXRSTOR when fx_only) from the user frame,
    then the features in ufeatures but not restored go to init from init_fpstate."""
    ubuf = UserBuf(c.current.process.mm, buf, faults_enabled=not c.pagefault_disabled,
                   pkru=read_pkru(c))
    init_bv = ufeatures & ~xrestore
    fault = c.regs.fxrstor_legacy(ubuf) if fx_only else c.regs.xrstor(ubuf, xrestore, "XRSTOR")
    if fault is None and init_bv:
        init = c.m.init_fpstate
        assert c.regs.xrstor(KernelBuf(init.regs, "init_fpstate"), init_bv,
                             c.m.system.xrstor_insn) is None
    return fault


def restore_fpregs_from_user(c: Cpu, buf: int, xrestore: int, fx_only: bool) -> KPath:
    """restore_fpregs_from_user() (signal.c): restore straight into the registers, validated by
    the hardware. Only enabled features (user_xfeatures); XFD updated first. On a fault: if the
    registers were not current's, this CPU's copy is invalidated; a #PF is faulted in
    (fault_in_readable may sleep: a preemption point) and retried, anything else (#GP from a
    bad header, MXCSR, XSTATE_BV bits) fails. Success restores supervisor state from memory if
    the registers were not live (they may hold another task's), and activates (a hard
    interrupt may arrive before that: core.fpregs_locked_irq_window). A kernel path returning
    True or False."""
    task = c.current
    fpu = task.fpu
    xrestore &= fpu.fpstate.user_xfeatures
    while True:
        core.fpregs_lock(c)
        core.xfd_update_state(c, fpu.fpstate)
        c.pagefault_disabled += 1
        fault = __restore_fpregs_from_user(c, buf, fpu.fpstate.user_xfeatures, xrestore,
                                           fx_only)
        c.pagefault_disabled -= 1
        if fault is None:
            break
        if task.need_fpu_load:
            __cpu_invalidate_fpregs_state(c)
        core.fpregs_unlock(c)
        if fault.vector != "#PF":
            return False
        c.m.events["sigreturn-retry"] += 1
        c = yield  # fault_in_readable(): may sleep
        try:
            task.process.mm.read(buf, fpu.fpstate.user_size, pkru=read_pkru(c))
        except PageFault:
            return False
    core.fpregs_locked_irq_window(c)
    if task.need_fpu_load and c.m.system.xfeatures_mask_supervisor:
        core.os_xrstor_supervisor(c, fpu.fpstate)
    core.fpregs_mark_activate(c)
    core.fpregs_unlock(c)
    return True


def __fpu_restore_sig(c: Cpu, buf: int, buf_fx: int, ia32_fxstate: bool) -> KPath:
    """__fpu_restore_sig(): read the sw bytes; user_xfeatures from them (user-controlled) or
    FP|SSE for an FXSAVE-only frame; 64-bit frames restore directly from user memory, ia32
    frames through the task's fpstate (`__fpu_restore_sig_ia32`)."""
    if c.m.system.xsave:
        sw = check_xstate_in_sigframe(c, buf_fx)
        if sw is None:
            return False
        fx_only = not sw.magic1
        user_xfeatures = sw.xfeatures
    else:
        fx_only, user_xfeatures = True, XFEATURE_MASK_FPSSE
    if ia32_fxstate:
        return (yield from __fpu_restore_sig_ia32(c, buf, buf_fx, user_xfeatures, fx_only))
    return (yield from restore_fpregs_from_user(c, buf_fx, user_xfeatures, fx_only))


def __fpu_restore_sig_ia32(c: Cpu, buf: int, buf_fx: int, user_xfeatures: int,
                           fx_only: bool) -> KPath:
    """The ia32 half of __fpu_restore_sig(): the legacy x87 state of the fsave header must
    override the FXSAVE area's, so the frame goes through memory.

    Copy the header (user_i387_ia32_struct). Under fpregs_lock, if the registers are live,
    save them first when supervisor states exist (to keep those), and set TIF_NEED_FPU_LOAD;
    in every case invalidate the fpu's and this CPU's ownership -- the fpstate is now the truth
    and the copies below may fault and sleep (a preemption point), a context switch then saving
    nothing over it. Copy the frame into the fpstate: copy_sigframe_from_user_to_xstate() =
    copy_uabi_to_xstate() with thread.pkru (its validation can fail), or for an FXSAVE-only
    frame the 512 bytes (MXCSR reserved bits fail on x86-64; FP|SSE forced into XSTATE_BV).
    Fold the header in (convert_to_fxsr), drop from XSTATE_BV the user features outside
    user_xfeatures (they restore to init; supervisor ones are kept), and XRSTOR the whole
    kernel max_features with os_xrstor_safe(); success activates the registers. (Without the
    save -- variant ``ia32-sigreturn-no-supervisor-save`` -- that XRSTOR brings back the
    supervisor state of the last save: a PASID or CET value written to the live registers
    since is lost.)"""
    t = c.current
    fpu = t.fpu
    mm = t.process.mm
    try:
        env = mm.read(buf, regset.USER_I387_IA32_SIZE, pkru=read_pkru(c))
    except PageFault:
        return False
    core.fpregs_lock(c)
    if not t.need_fpu_load:
        # Variant ia32-sigreturn-no-supervisor-save: set the flag without saving first.
        if c.m.system.xfeatures_mask_supervisor \
                and not c.m.system.has_variant("ia32-sigreturn-no-supervisor-save"):
            core.os_xsave(c, fpu.fpstate)
        t.need_fpu_load = True
    __fpu_invalidate_fpregs_state(fpu)
    __cpu_invalidate_fpregs_state(c)
    core.fpregs_unlock(c)
    c = yield  # the copies from user memory may fault and sleep
    fps = fpu.fpstate
    if c.m.system.xsave and not fx_only:
        # copy_uabi_to_xstate() copies from the frame piece by piece (copy_from_buffer): the
        # legacy area and header, then each component the header names -- never the whole
        # current user_size, which a handler's first AMX use may have grown past the frame.
        try:
            hdr = mm.read(buf_fx + FXSAVE_SIZE, 64, pkru=read_pkru(c))
            named = int.from_bytes(hdr[0:8], "little") & fps.user_xfeatures
            ubuf = mm.read(buf_fx, standard_size(c.m.system.profile, named),
                           pkru=read_pkru(c))
        except PageFault:
            return False
        pkru = [t.thread_pkru]
        if regset.copy_uabi_to_xstate(c.m.system, fps, ubuf, pkru):
            return False
        t.thread_pkru = pkru[0]
    else:
        try:
            fx = mm.read(buf_fx, FXSAVE_SIZE, pkru=read_pkru(c))
        except PageFault:
            return False
        fps.regs[0:FXSAVE_SIZE] = fx
        if int.from_bytes(fx[MXCSR_OFFSET:MXCSR_OFFSET + 4], "little") \
                & ~c.m.system.mxcsr_feature_mask:
            return False
        if c.m.system.xsave:
            fps.xstate_bv |= XFEATURE_MASK_FPSSE
    legacy = bytearray(fps.regs[0:FXSAVE_SIZE])
    regset.convert_to_fxsr(legacy, env)
    fps.regs[0:FXSAVE_SIZE] = legacy
    core.fpregs_lock(c)
    if c.m.system.xsave:
        fps.xstate_bv &= user_xfeatures | c.m.system.xfeatures_mask_supervisor
        success = core.os_xrstor_safe(c, fps, c.m.system.kernel.max_features)
    else:
        success = c.regs.fxrstor_legacy(KernelBuf(fps.regs, fps)) is None
    if success:
        core.fpregs_mark_activate(c)
    core.fpregs_unlock(c)
    return success


@requires("task_context", "user_task")
def fpu__restore_sig(c: Cpu, buf: int, ia32_frame: bool = False) -> KPath:
    """fpu__restore_sig() (signal.c): NULL -> clear the user states (success); the frame's
    range must pass access_ok (below TASK_SIZE_MAX; xstate_sigframe_size of the *current*
    fpstate, + the fsave header of an ia32 frame, whose FXSAVE area starts 112 bytes in) --
    a range check only: the reads that follow fault where nothing is mapped; any failure
    leaves the task with init user state (fpu__clear_user_states) and returns False."""
    task = c.current
    fpu = task.fpu
    if not buf:
        core.fpu__clear_user_states(c, fpu)
        return True
    size = xstate_sigframe_size(c.m.system, fpu.fpstate.user_size)
    buf_fx = buf
    ia32_fxstate = ia32_frame and c.m.system.ia32_emulation and c.m.system.fxsr
    if ia32_fxstate:
        buf_fx = buf + FREGS_STATE_SIZE
        size += FREGS_STATE_SIZE
    ok = task.process.mm.access_ok(buf, size)
    if ok:
        ok = yield from __fpu_restore_sig(c, buf, buf_fx, ia32_fxstate)
    if not ok:
        core.fpu__clear_user_states(c.m.cpu_of(task), fpu)
    return ok


def sys_rt_sigreturn(c: Cpu) -> KPath:
    """rt_sigreturn() (arch/x86/kernel/signal_64.c): the frame is at user sp - 8 (the handler's
    ret popped the restorer address); copying it in may sleep (a preemption point); restore the
    sigaltstack (restore_altstack, errors ignored), then restore_sigcontext(): the stack pointer,
    then the FPU from uc_mcontext.fpstate. A bad frame -> SIGSEGV (signal_fault). Returns 0 on
    success, -EFAULT after a bad frame."""
    t = c.current
    frame = t.user_sp - 8
    try:
        fpstate = _u64(c, frame + SC_FPSTATE_OFFSET)
        sp = _u64(c, frame + SC_RSP_OFFSET)
        stack = t.process.mm.read(frame + UC_STACK_OFFSET, 24, pkru=read_pkru(c))
    except PageFault:
        t.pending.insert(0, Sig(SIGSEGV, SI_KERNEL))
        return -EFAULT
    c = yield  # copy_from_user() of the frame: may sleep
    # restore_altstack() comes first (its errors are squashed), then restore_sigcontext():
    # regs->sp = sc.sp before fpu__restore_sig(), so a SIGSEGV forced by a bad FPU frame is
    # delivered on the interrupted stack (kernel-findings section 4).
    do_sigaltstack(c, int.from_bytes(stack[0:8], "little"), int.from_bytes(stack[16:24], "little"),
                   int.from_bytes(stack[8:12], "little"))
    t.user_sp = sp
    if not (yield from fpu__restore_sig(c, fpstate, False)):
        t.pending.insert(0, Sig(SIGSEGV, SI_KERNEL))  # signal_fault() -> force_sig(SIGSEGV)
        return -EFAULT
    return 0


def sys32_sigreturn(c: Cpu) -> KPath:
    """sigreturn() of a compat task (SYSCALL32 sigreturn, signal_32.c): the handler's RET
    popped pretcode and the restorer's ``popl %eax`` the signal number, so the sigframe_ia32
    is at sp - 8; ia32_restore_sigcontext() (copying it in may sleep), then
    fpu__restore_sig(sc.fpstate, ia32). A bad frame -> SIGSEGV (signal_fault)."""
    return (yield from _ia32_sigreturn(c, c.current.user_sp - 8, SIGFRAME_IA32_SC, None))


def sys32_rt_sigreturn(c: Cpu) -> KPath:
    """rt_sigreturn() of a compat task (SYSCALL32 rt_sigreturn): the rt_sigframe_ia32 is at
    sp - 4 (RET popped pretcode); ia32_restore_sigcontext() of uc_mcontext, then the
    sigaltstack from uc_stack (compat_restore_altstack: a failure is a bad frame)."""
    return (yield from _ia32_sigreturn(c, c.current.user_sp - 4, RT_IA32_SC, RT_IA32_UC_STACK))


def _ia32_sigreturn(c: Cpu, frame: int, sc: int, uc_stack: int | None) -> KPath:
    t = c.current
    mm = t.process.mm
    try:
        pk = read_pkru(c)
        raw = mm.read(frame + sc, 88, pkru=pk)
        stack = None if uc_stack is None else mm.read(frame + uc_stack, 12, pkru=pk)
    except PageFault:
        t.pending.insert(0, Sig(SIGSEGV, SI_KERNEL))
        return -EFAULT
    c = yield  # copy_from_user() of the sigcontext: may sleep

    def u32(b: bytes, off: int) -> int:
        return int.from_bytes(b[off:off + 4], "little")

    t.user_sp = u32(raw, SC32_SP)
    if not (yield from fpu__restore_sig(c, u32(raw, SC32_FPSTATE), True)):
        t.pending.insert(0, Sig(SIGSEGV, SI_KERNEL))  # badframe: signal_fault()
        return -EFAULT
    if stack is not None:  # compat_restore_altstack(): squashes every error but -EFAULT
        do_sigaltstack(c, u32(stack, 0), u32(stack, 8), u32(stack, 4))
    return 0


def handler_ia32_return(task: object, rt: bool) -> None:
    """What an ia32 handler's final RET and the restorer do before (rt_)sigreturn: pop
    pretcode (4 bytes), and for sigreturn the restorer's ``popl %eax`` pops the signal
    number (4 more)."""
    task.user_sp += 4 if rt else 8  # type: ignore[attr-defined]


def handler_return(task: object) -> None:
    """What the handler's final RET does before the restorer calls rt_sigreturn: pop the
    return address (user sp + 8)."""
    task.user_sp += 8  # type: ignore[attr-defined]
