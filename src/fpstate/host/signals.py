"""Real signal frames of this kernel: raise a signal over known registers, capture the frame,
let the handler corrupt it, and observe what sigreturn restores.

Kernel paths exercised (arch/x86/kernel/signal.c, signal_64.c, fpu/signal.c, v6.x):
delivery ``handle_signal -> x64_setup_rt_frame -> get_sigframe -> fpu__alloc_mathframe ->
copy_fpstate_to_sigframe`` (XSAVE straight to the user stack, ``save_xstate_epilog`` writes
fx_sw_bytes and magic2, then ``fpu__clear_user_states`` gives the handler the init state);
return ``rt_sigreturn -> restore_sigcontext -> fpu__restore_sig -> __fpu_restore_sig ->
check_xstate_in_sigframe / restore_fpregs_from_user``; a failed restore ends in
``fpu__clear_user_states`` + ``signal_fault -> force_sig(SIGSEGV)``.

Theory of operation
-------------------
A forked child installs two handlers with a raw ``rt_sigaction`` (SA_SIGINFO | SA_RESTORER, the
restorer being ``mov eax, 15; syscall``): slot 0 for SIGUSR1, slot 1 for SIGSEGV. Both
handlers are machine code: they XSAVE their own registers first (the handler's initial FPU
state), record RSP/RDI/RSI/RDX, copy the frame from RSP to the end of the xstate area
(``fpstate + extended_size``) into shared memory, apply the requested `FramePatch`es to the
live frame (slot 0 only) and return (slot 0) or ``exit_group(SEGV_EXIT)`` (slot 1). The main
code loads every register with a pattern (`fpstate.host.child.load_patterns`), XSAVEs it
("before"), calls ``kill(getpid(), SIGUSR1)``, and after sigreturn XSAVEs again ("after") and
exits. Nothing else runs between the load and the observations.
"""

from __future__ import annotations

import ctypes
import mmap
import signal
import struct
from collections.abc import Callable
from dataclasses import dataclass

from fpstate.errors import FpstateError
from fpstate.host.child import (
    MXCSR_PATTERN,
    PAGE,
    SA_ONSTACK,
    SA_RESTORER,
    SA_SIGINFO,
    SYS,
    Asm,
    ChildExit,
    CodePages,
    Reg,
    SharedMemory,
    XsaveImage,
    host_user_xstate_size,
    load_patterns,
    pattern_table,
    raw_syscall,
    run_child,
    xsave_image,
)

FP_XSTATE_MAGIC1 = 0x46505853  #: "XSPF", arch/x86/include/uapi/asm/sigcontext.h
FP_XSTATE_MAGIC2 = 0x46505845  #: "EXPF"
FP_XSTATE_MAGIC2_SIZE = 4
SW_BYTES_OFFSET = 464  #: struct _fpx_sw_bytes lives in fxregs_state.sw_reserved

#: struct rt_sigframe (x86-64): pretcode (8), struct ucontext (304), struct siginfo (128).
UCONTEXT_OFFSET = 8
UCONTEXT_SIZE = 304
SIGINFO_OFFSET = UCONTEXT_OFFSET + UCONTEXT_SIZE
RT_SIGFRAME_SIZE = SIGINFO_OFFSET + 128
#: Offsets inside struct ucontext: uc_mcontext (struct sigcontext_64) starts at 40.
UC_FLAGS = 0
UC_STACK = 16
UC_MCONTEXT = 40
MC_SP = UC_MCONTEXT + 15 * 8
MC_IP = UC_MCONTEXT + 16 * 8
MC_FPSTATE = UC_MCONTEXT + 184
UC_SIGMASK = 296
#: uc_flags bits (arch/x86/include/uapi/asm/ucontext.h).
UC_FP_XSTATE = 0x1
UC_SIGCONTEXT_SS = 0x2
UC_STRICT_RESTORE_SS = 0x4

SEGV_EXIT = 0x5E  #: exit status of the SIGSEGV handler slot
SI_KERNEL = 0x80  #: si_code of force_sig()


@dataclass(frozen=True, slots=True)
class FxSwBytes:
    """struct _fpx_sw_bytes (fxsave bytes 464..511 of a signal frame)."""

    magic1: int
    extended_size: int
    xfeatures: int
    xstate_size: int
    padding: bytes

    @classmethod
    def parse(cls, raw: bytes) -> FxSwBytes:
        magic1, ext, xf, size = struct.unpack_from("<IIQI", raw, 0)
        return cls(magic1, ext, xf, size, bytes(raw[20:48]))


@dataclass(frozen=True, slots=True)
class FramePatch:
    """Bytes the SIGUSR1 handler writes into its live frame, at ``offset`` from the fpstate
    pointer (uc_mcontext.fpstate), before returning to sigreturn."""

    offset: int
    data: bytes
    what: str


@dataclass(frozen=True, slots=True)
class SignalFrame:
    """What a handler saw on entry."""

    signo: int
    si_code: int
    frame_address: int  #: RSP on handler entry = &rt_sigframe.pretcode
    siginfo_address: int  #: RSI on entry
    ucontext_address: int  #: RDX on entry
    fpstate_address: int  #: uc_mcontext.fpstate
    interrupted_sp: int  #: uc_mcontext.sp: RSP when the signal interrupted the code
    interrupted_ip: int
    uc_flags: int
    uc_stack: tuple[int, int, int]  #: (ss_sp, ss_flags, ss_size) as saved in the frame
    sw_bytes: FxSwBytes
    magic2: int | None  #: u32 at fpstate + xstate_size, None if magic1 is not XSTATE's
    xsave: XsaveImage  #: the fpstate area, xstate_size bytes (512 without magic1)
    raw: bytes  #: the whole frame from frame_address to fpstate + extended_size
    handler_entry: XsaveImage  #: the handler's own XSAVE on entry

    @property
    def fpstate_offset(self) -> int:
        """fpstate - frame start: rt_sigframe plus alignment padding."""
        return self.fpstate_address - self.frame_address

    @property
    def stack_used(self) -> int:
        """Bytes between the interrupted RSP and the handler's RSP (red zone, xstate, magic2,
        rt_sigframe, alignment)."""
        return self.interrupted_sp - self.frame_address

    @property
    def fpstate_aligned64(self) -> bool:
        return self.fpstate_address % 64 == 0

    @property
    def entry_sp_mod16(self) -> int:
        """RSP mod 16 on handler entry (the x86-64 ABI wants 8: 'as if called')."""
        return self.frame_address % 16


@dataclass(frozen=True, slots=True)
class SignalRun:
    """One raise of SIGUSR1 over known registers and what came of it."""

    seed: int
    patches: tuple[FramePatch, ...]
    altstack: tuple[int, int] | None  #: (ss_sp, ss_size) installed, or None
    before: XsaveImage  #: registers when kill() was called
    frame: SignalFrame | None  #: the SIGUSR1 handler's view; None if it never ran
    sigreturn_ok: bool  #: the code after kill() ran (sigreturn restored and returned)
    after: XsaveImage | None  #: registers after sigreturn
    segv: SignalFrame | None  #: SIGSEGV delivered instead (failed sigreturn or frame setup)
    exit: ChildExit
    #: With a key-protected altstack (``raise_signal(pkey_rights=...)``): the key pkey_alloc()
    #: gave it, the altstack's ss_sp, and RSP when kill() was made.
    pkey: int | None = None
    altstack_sp: int | None = None
    kill_sp: int | None = None


# -- named corruptions ---------------------------------------------------------------------

def patch_u32(offset: int, value: int, what: str) -> FramePatch:
    return FramePatch(offset, struct.pack("<I", value & 0xFFFFFFFF), what)


def patch_u64(offset: int, value: int, what: str) -> FramePatch:
    return FramePatch(offset, struct.pack("<Q", value & (2**64 - 1)), what)


def corrupt_magic1() -> FramePatch:
    """sw_bytes.magic1 = 0: check_xstate_in_sigframe() takes the 'fx only' path."""
    return patch_u32(SW_BYTES_OFFSET, 0, "magic1=0")


def corrupt_magic2(xstate_size: int | None = None) -> FramePatch:
    """The u32 at fpstate + user_size = 0 (check_xstate_in_sigframe reads it there)."""
    size = host_user_xstate_size() if xstate_size is None else xstate_size
    return patch_u32(size, 0, "magic2=0")


def set_sw_xfeatures(value: int) -> FramePatch:
    """sw_bytes.xfeatures: the mask __fpu_restore_sig() takes as user_xfeatures."""
    return patch_u64(SW_BYTES_OFFSET + 8, value, f"sw_bytes.xfeatures={value:#x}")


def set_xstate_bv(value: int) -> FramePatch:
    return patch_u64(512, value, f"XSTATE_BV={value:#x}")


def set_xcomp_bv(value: int) -> FramePatch:
    return patch_u64(520, value, f"XCOMP_BV={value:#x}")


def compacted_pkru(xcr0: int, value: int = 0x55555554) -> tuple[FramePatch, ...]:
    """With PKRU in XCR0, a frame read in the compacted form (`set_xcomp_bv` with bit 63)
    takes PKRU from its compacted offset, which the standard-format frame gives to another
    component or to no component at all (stack bytes the kernel never wrote). The patch sets
    it (default init_pkru_value, protection key 0 usable), so that what sigreturn's XRSTOR
    loads is known and the return to user space can touch its stack. Nothing without PKRU."""
    if not xcr0 >> 9 & 1:
        return ()
    from fpstate.x86.layout import compacted_offset
    from fpstate.x86.profiles import load_profile

    at = compacted_offset(load_profile("host"), 1 << 63 | xcr0, 9)
    return (patch_u32(at, value, f"PKRU@{at}={value:#x}"),)


#: The byte `compacted_form` writes where the compacted form reads what no standard component
#: covers.
UNWRITTEN_FILL = 0xA5


def compacted_form(xcr0: int) -> tuple[FramePatch, ...]:
    """The patches that make a frame read in the compacted form of XCR0 (`set_xcomp_bv` with
    bit 63 and XCR0) fully known: the bytes the compacted offsets take that no component of
    the standard-format frame covers -- stack bytes the kernel's XSAVE never wrote (on Intel
    the holes of MPX's standard offsets 832-1087 and of components outside XCR0; on AMD
    none below PKRU) -- set to `UNWRITTEN_FILL`, and PKRU as `compacted_pkru` sets it."""
    from fpstate.x86.layout import compacted_offset
    from fpstate.x86.profiles import load_profile
    from fpstate.x86.xfeatures import bits

    host = load_profile("host")
    covered = sorted([(0, 576)] + [(host.component(i).offset,
                                    host.component(i).offset + host.component(i).size)
                                   for i in bits(xcr0) if i >= 2])
    patches: list[FramePatch] = []
    for i in bits(xcr0):
        if i < 2 or i == 9:
            continue
        at = compacted_offset(host, 1 << 63 | xcr0, i)
        hi = at + host.component(i).size
        for a, b in [*covered, (hi, hi)]:  # the holes between the covered ranges, up to hi
            if a > at and at < hi:
                end = min(a, hi)
                patches.append(set_bytes(at, bytes([UNWRITTEN_FILL]) * (end - at),
                                         f"unwritten[{at}:{end}]"))
            at = max(at, b)
    return (*patches, *compacted_pkru(xcr0))


def set_header_byte(index: int, value: int) -> FramePatch:
    """Byte ``index`` (16..63) of the XSAVE header: reserved space."""
    return FramePatch(512 + index, bytes([value & 0xFF]), f"header[{index}]={value:#x}")


def set_mxcsr(value: int) -> FramePatch:
    return patch_u32(24, value, f"MXCSR={value:#x}")


def set_xmm(n: int, data: bytes) -> FramePatch:
    if len(data) != 16:
        raise FpstateError(f"an XMM register is 16 bytes, not {len(data)}")
    return FramePatch(160 + 16 * n, bytes(data), f"xmm{n}")


def set_bytes(offset: int, data: bytes, what: str) -> FramePatch:
    return FramePatch(offset, bytes(data), what)


# -- the probe -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Layout:
    xs: int  #: room for one XSAVE image (page multiple)
    cap: int  #: room for one frame copy

    @property
    def table(self) -> int:
        return 0

    @property
    def done_flag(self) -> int:
        """u64 set to 1 by the code after kill(): sigreturn came back."""
        return PAGE - 8

    @property
    def pkey_info(self) -> int:
        """Three u64 of a key-protected altstack: the key, ss_sp, RSP at kill()."""
        return PAGE - 32

    @property
    def before(self) -> int:
        return PAGE

    @property
    def after(self) -> int:
        return PAGE + self.xs

    def slot(self, k: int) -> int:
        return PAGE + 2 * self.xs + k * (PAGE + self.xs + self.cap)

    def slot_entry(self, k: int) -> int:
        return self.slot(k) + PAGE

    def slot_frame(self, k: int) -> int:
        return self.slot(k) + PAGE + self.xs

    @property
    def total(self) -> int:
        return self.slot(2)


def _layout() -> _Layout:
    size = host_user_xstate_size()
    xs = (size + 64 + PAGE - 1) // PAGE * PAGE
    return _Layout(xs, xs + 2 * PAGE)


def _handler(asm: Asm, lay: _Layout, shm: SharedMemory, k: int,
             patches: tuple[FramePatch, ...], final_exit: int | None,
             pkeys: str | None = None) -> None:
    """Handler slot ``k``. ``pkeys`` (a key-protected altstack): "open" -- after the entry
    XSAVE, WRPKRU 0 so that the frame can be read and returned through; "closed" -- only the
    entry registers are recorded, and the handler returns without touching its stack (RSP +=
    8 as RET would, then rt_sigreturn), so that sigreturn reads the frame under the PKRU the
    handler was given; "key0" -- as "closed", but first the handler sets AD for key 0 in
    its PKRU (the key of its stack, of every mapping here)."""
    C, In, M, R = asm.C, asm.In, asm.M, asm.R
    slot = shm.address + lay.slot(k)
    asm.mov_imm(R.R8, slot)
    for disp, reg in ((8, R.RSP), (16, R.RDI), (24, R.RSI), (32, R.RDX)):
        asm.emit(In.create_mem_reg(C.MOV_RM64_R64, M(R.R8, displ=disp), reg))
    asm.emit(In.create_reg_reg(C.MOV_R64_RM64, R.R9, R.RDX))
    asm.xsave(shm.address + lay.slot_entry(k), R.RCX)
    if pkeys in ("closed", "key0"):
        if pkeys == "key0":
            asm.deny_pkey(0, 1)  # PKRU |= AD of key 0
        asm.emit(In.create_reg_i32(C.ADD_RM64_IMM8, R.RSP, 8))
        asm.syscall(SYS["rt_sigreturn"])
        return
    if pkeys == "open":
        asm.wrpkru(0)
    asm.emit(In.create_reg_mem(C.MOV_R64_RM64, R.R10, M(R.R9, displ=MC_FPSTATE)))
    asm.emit(In.create_mem_reg(C.MOV_RM64_R64, M(R.R8, displ=40), R.R10))
    asm.mov_imm(R.RCX, 512)
    asm.emit(In.create_mem_u32(C.CMP_RM32_IMM32, M(R.R10, displ=SW_BYTES_OFFSET),
                               FP_XSTATE_MAGIC1))
    asm.jump("JNE_REL32_64", "nomagic")
    asm.emit(In.create_reg_mem(C.MOV_R32_RM32, R.ECX, M(R.R10, displ=SW_BYTES_OFFSET + 4)))
    asm.label("nomagic")
    asm.emit(In.create_reg_reg(C.ADD_R64_RM64, R.RCX, R.R10))
    asm.emit(In.create_reg_reg(C.SUB_R64_RM64, R.RCX, R.RSP))
    asm.mov_imm(R.RAX, lay.cap)
    asm.emit(In.create_reg_reg(C.CMP_R64_RM64, R.RCX, R.RAX))
    asm.jump("JBE_REL32_64", "fits")
    asm.emit(In.create_reg_reg(C.MOV_R64_RM64, R.RCX, R.RAX))
    asm.label("fits")
    asm.emit(In.create_mem_reg(C.MOV_RM64_R64, M(R.R8, displ=48), R.RCX))
    asm.emit(In.create_reg_reg(C.MOV_R64_RM64, R.RSI, R.RSP))
    asm.mov_imm(R.RDI, shm.address + lay.slot_frame(k))
    asm.emit(In.create_rep_movsb(64))
    for p in patches:
        off, data = p.offset, p.data
        while data:
            if len(data) >= 8:
                asm.mov_imm(R.RAX, int.from_bytes(data[:8], "little"))
                asm.emit(In.create_mem_reg(C.MOV_RM64_R64, M(R.R10, displ=off), R.RAX))
                step = 8
            elif len(data) >= 4:
                asm.emit(In.create_mem_u32(C.MOV_RM32_IMM32, M(R.R10, displ=off),
                                           int.from_bytes(data[:4], "little")))
                step = 4
            else:
                asm.emit(In.create_mem_u32(C.MOV_RM8_IMM8, M(R.R10, displ=off), data[0]))
                step = 1
            off, data = off + step, data[step:]
    asm.emit(In.create_mem_i32(C.MOV_RM64_IMM32, M(R.R8), 1))
    if final_exit is None:
        asm.emit(In.create(C.RETNQ))
    else:
        asm.exit_group(final_exit)


def _parse_slot(shm: SharedMemory, lay: _Layout, k: int) -> SignalFrame | None:
    base = lay.slot(k)
    if shm.u64(base) != 1:
        return None
    rsp, rdi, rsi, rdx, fpstate, length = (shm.u64(base + 8 * i) for i in range(1, 7))
    raw = shm.read(lay.slot_frame(k), length)
    uc = rdx - rsp
    uc_flags = struct.unpack_from("<Q", raw, uc + UC_FLAGS)[0]
    ss_sp, ss_flags, ss_size = struct.unpack_from("<QixxxxQ", raw, uc + UC_STACK)
    isp, iip = struct.unpack_from("<QQ", raw, uc + MC_SP)
    si = rsi - rsp
    signo, _errno, si_code = struct.unpack_from("<iii", raw, si)
    fo = fpstate - rsp
    fx = raw[fo:fo + 512]
    sw = FxSwBytes.parse(fx[SW_BYTES_OFFSET:512])
    if sw.magic1 == FP_XSTATE_MAGIC1:
        xs = raw[fo:fo + sw.xstate_size]
        m2 = raw[fo + sw.xstate_size:fo + sw.xstate_size + 4]
        magic2 = struct.unpack("<I", m2)[0] if len(m2) == 4 else None
    else:
        xs, magic2 = fx, None
    entry = xsave_image(shm.read(lay.slot_entry(k), lay.xs))
    del rdi
    return SignalFrame(
        signo=signo, si_code=si_code, frame_address=rsp, siginfo_address=rsi,
        ucontext_address=rdx, fpstate_address=fpstate, interrupted_sp=isp,
        interrupted_ip=iip, uc_flags=uc_flags, uc_stack=(ss_sp, ss_flags, ss_size),
        sw_bytes=sw, magic2=magic2, xsave=xsave_image(xs), raw=raw, handler_entry=entry,
    )


def _xrstor_init(asm: Asm, area: int, mask: int) -> None:
    """XRSTOR64 [area] with RFBM = mask; the caller's area is zero but for MXCSR (set here to
    the pattern), so every component in ``mask`` is initialised and MXCSR kept."""
    R, C, In, M = asm.R, asm.C, asm.In, asm.M
    asm.mov_imm(R.RDI, area)
    asm.emit(In.create_mem_u32(C.MOV_RM32_IMM32, M(R.RDI, displ=24), MXCSR_PATTERN))
    asm.mov_imm(R.RAX, mask & 0xFFFFFFFF)
    asm.mov_imm(R.RDX, mask >> 32)
    asm.emit(In.create_mem(C.XRSTOR64_MEM, M(R.RDI)))
    asm.emit(In.create_mem_u32(C.MOV_RM32_IMM32, M(R.RDI, displ=24), 0))


def _sigaction(sig: int, handler: int, flags: int, restorer: int) -> int:
    act = (ctypes.c_uint64 * 4)(handler, flags | SA_RESTORER, restorer, 0)
    return raw_syscall(SYS["rt_sigaction"], sig, ctypes.addressof(act), 0, 8)


def raise_signal(patches: tuple[FramePatch, ...] = (), *, seed: int = 0x3C,
                 altstack_size: int | None = None, init_mask: int = 0,
                 prelude: Callable[[Asm], None] | None = None,
                 pkey_rights: int | None = None, handler_pkeys: str = "open",
                 split_gap: int | None = None, timeout: float = 20.0) -> SignalRun:
    """Raise SIGUSR1 with kill(getpid()) over pattern registers (seed ``seed``) in a forked
    child, capture the frame the kernel built, apply ``patches`` to it and sigreturn.

    ``prelude`` emits machine code that runs right after the pattern load (e.g. the AMX
    permission request and tile loads of `fpstate.host.amx`).

    ``init_mask`` puts those components back in their initial configuration after the
    pattern load (XRSTOR with RFBM = init_mask from an area whose XSTATE_BV is 0 and whose
    MXCSR is the pattern's), so the frame shows the kernel's XSAVE init optimisation.

    With ``altstack_size`` the child first installs a sigaltstack of that many bytes whose
    top is the end of a private mapping, and SIGUSR1 is registered with SA_ONSTACK: the frame
    goes there (``get_sigframe``), or the kernel finds that it would overflow, returns
    ``-1L`` and forces SIGSEGV (caught by the SIGSEGV slot, ``SignalRun.segv``).

    With ``pkey_rights`` (and ``altstack_size``) the altstack gets a protection key of its own
    (pkey_alloc(0, 0), pkey_mprotect of its mapping) and the code closes that key (PKRU |=
    ``pkey_rights`` << 2 * key: AD = 1, WD = 2) after the pattern load: the kernel must write
    the frame through a key the interrupted code denied itself (get_sigframe's
    sig_prepare_pkru). ``handler_pkeys`` says what the SIGUSR1 handler does with its entry
    PKRU (init_pkru_value, which denies every key but 0): "open" (WRPKRU 0 first, then as
    usual) or "closed" (records its entry registers and returns without touching its stack,
    so that rt_sigreturn reads the frame under that PKRU). The SIGSEGV handler opens every key.
    ``handler_pkeys`` "key0" needs no altstack: the SIGUSR1 handler records its entry
    registers, sets AD for key 0 in its PKRU and returns without touching its stack, so
    that rt_sigreturn reads the frame, on a key-0 stack, under a PKRU that denies it.

    With ``split_gap`` (and ``pkey_rights``) only the mapping's top page gets the key (the
    pkey_mprotect splits the mapping in two) and the altstack ends ``split_gap`` bytes above
    that page's start, so a frame larger than ``split_gap`` runs from the keyed page down into
    the key-0 page below it.

    Kernel path: get_sigframe / copy_fpstate_to_sigframe on delivery, fpu__restore_sig on
    rt_sigreturn (arch/x86/kernel/fpu/signal.c).
    """
    if pkey_rights is not None and altstack_size is None:
        raise FpstateError("raise_signal: pkey_rights needs an altstack (altstack_size)")
    if split_gap is not None and (pkey_rights is None or not 0 < split_gap <= PAGE):
        raise FpstateError(f"raise_signal: split_gap needs pkey_rights and lies in 1..{PAGE}, "
                           f"not {split_gap!r}")
    if handler_pkeys not in ("open", "closed", "key0"):
        raise FpstateError(f"raise_signal: handler_pkeys is 'open', 'closed' or 'key0', "
                           f"not {handler_pkeys!r}")
    keyed = pkey_rights is not None
    key0 = handler_pkeys == "key0"
    lay = _layout()
    shm = SharedMemory(lay.total)
    shm.write(lay.table, pattern_table(seed))
    patches = tuple(patches)

    def body() -> int:
        pages = CodePages(4)
        restorer = Asm()
        restorer.syscall(SYS["rt_sigreturn"])
        r_addr = pages.place(0, restorer)
        h0 = Asm()
        _handler(h0, lay, shm, 0, patches, None, handler_pkeys if keyed or key0 else None)
        h1 = Asm()
        _handler(h1, lay, shm, 1, (), SEGV_EXIT, "open" if keyed else None)
        flags = SA_SIGINFO
        key = -1
        if altstack_size is not None:
            span = (altstack_size + PAGE - 1) // PAGE * PAGE + PAGE
            region = mmap.mmap(-1, span, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            base = ctypes.addressof(ctypes.c_char.from_buffer(region))
            top = base + span
            if split_gap is not None:  # the altstack ends split_gap bytes into the top page
                top -= PAGE - split_gap
            ss = (ctypes.c_uint64 * 3)(top - altstack_size, 0, altstack_size)
            if raw_syscall(SYS["sigaltstack"], ctypes.addressof(ss), 0) != 0:
                return 3
            flags |= SA_ONSTACK
            if keyed:
                key = raw_syscall(SYS["pkey_alloc"], 0, 0)
                lo = base if split_gap is None else base + span - PAGE
                if key < 0 or raw_syscall(SYS["pkey_mprotect"], lo, base + span - lo,
                                          mmap.PROT_READ | mmap.PROT_WRITE, key) != 0:
                    return 7
                struct.pack_into("<QQ", shm.mem, lay.pkey_info, key, top - altstack_size)
        if _sigaction(signal.SIGUSR1, pages.place(1, h0), flags, r_addr) != 0:
            return 4
        if _sigaction(signal.SIGSEGV, pages.place(2, h1), SA_SIGINFO, r_addr) != 0:
            return 5
        main = Asm()
        load_patterns(main, shm.address + lay.table)
        if prelude is not None:
            prelude(main)
        if init_mask:
            _xrstor_init(main, shm.address + lay.after, init_mask)
        if keyed:
            main.deny_pkey(key, pkey_rights or 0)
        main.xsave(shm.address + lay.before)
        if keyed or key0:  # RSP at the kill() syscall: the interrupted stack pointer
            main.mov_imm(main.R.R11, shm.address + lay.pkey_info + 16)
            main.emit(main.In.create_mem_reg(main.C.MOV_RM64_R64, main.M(main.R.R11),
                                             main.R.RSP))
        main.syscall(SYS["getpid"])
        main.syscall(SYS["kill"], Reg(main.R.RAX), signal.SIGUSR1)
        main.xsave(shm.address + lay.after)
        main.mov_imm(main.R.RAX, 1)
        main.store_rax(shm.address + lay.done_flag)
        main.exit_group(0)
        pages.call(pages.place(3, main))
        return 6  # not reached: main ends in exit_group

    ex = run_child(body, timeout)
    ok = shm.u64(lay.done_flag) == 1
    altstack = None
    if altstack_size is not None:
        altstack = (0, altstack_size)  # the address lives in the child; the size is ours
    return SignalRun(
        seed=seed, patches=patches, altstack=altstack,
        before=xsave_image(shm.read(lay.before, lay.xs)),
        frame=_parse_slot(shm, lay, 0), sigreturn_ok=ok,
        after=xsave_image(shm.read(lay.after, lay.xs)) if ok else None,
        segv=_parse_slot(shm, lay, 1), exit=ex,
        **({"pkey": shm.u64(lay.pkey_info), "altstack_sp": shm.u64(lay.pkey_info + 8)}
           if keyed else {}),
        **({"kill_sp": shm.u64(lay.pkey_info + 16)} if keyed or key0 else {}),
    )
