"""arm64 signal frames: the FP records of arch/arm64/kernel/signal.c and uapi sigcontext.h.

Byte-exact model of what setup_sigframe_layout() allocates and setup_sigframe() writes in
``uc_mcontext.__reserved[]`` (v6.17): fpsimd_context, esr_context, sve_context (also for
streaming mode, with SVE_SIG_FLAG_SM), tpidr2_context, za_context, zt_context, fpmr_context,
the extra_context that takes records beyond the 4096 bytes of ``__reserved`` and the null
terminator; plus parse_user_sigframe()'s validation for sigreturn and the size, VL and
order rules of the restore_*_context() functions restore_sigframe() calls, and AT_MINSIGSTKSZ
(minsigstksz_setup()).

Offsets are from the start of ``struct rt_sigframe`` (siginfo 128 bytes, then ucontext:
uc_flags, uc_link, uc_stack, uc_sigmask, 120 bytes of glibc sigset padding, then the
16-byte aligned sigcontext: fault_address, regs[31], sp, pc, pstate, __reserved[4096]).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from fpstate.arm64.regs import (
    FPMR,
    FPSR,
    FPSR_STREAMING,
    SVCR_SM,
    SVCR_ZA,
    TPIDR2,
    ZA,
    ZERO,
    ZHI,
    ZT0,
    ZT_SIG_REG_BYTES,
    P,
    V,
    round16,
    sve_regs_size,
    sve_vq_from_vl,
    za_regs_size,
)
from fpstate.arm64.statemachine import IllegalEvent, replace
from fpstate.errors import BlobError
from fpstate.kernel.arm64 import entry_common, fpsimd
from fpstate.kernel.arm64.state import (
    FP_STATE_FPSIMD,
    FP_STATE_SVE,
    Host,
    HostCaps,
    SigFrameFp,
    Task,
)

FPSIMD_MAGIC = 0x46508001
ESR_MAGIC = 0x45535201
POE_MAGIC = 0x504F4530
EXTRA_MAGIC = 0x45585401
SVE_MAGIC = 0x53564501
TPIDR2_MAGIC = 0x54504902
FPMR_MAGIC = 0x46504D52
ZA_MAGIC = 0x54366345
ZT_MAGIC = 0x5A544E01
GCS_MAGIC = 0x47435300
SVE_SIG_FLAG_SM = 0x1

CTX_HEADER_SIZE = 8                         #: struct _aarch64_ctx {u32 magic; u32 size;}
FPSIMD_CONTEXT_SIZE = 8 + 4 + 4 + 32 * 16   #: 528 = 0x210
ESR_CONTEXT_SIZE = 16
POE_CONTEXT_SIZE = 16
EXTRA_CONTEXT_STRUCT_SIZE = 8 + 8 + 4 + 12  #: head, datap, size, __reserved[3]
SVE_CONTEXT_SIZE = 16                       #: head, vl, flags, __reserved[2]
TPIDR2_CONTEXT_SIZE = 16
FPMR_CONTEXT_SIZE = 16
ZA_CONTEXT_SIZE = 16                        #: head, vl, __reserved[3]
ZT_CONTEXT_SIZE = 16                        #: head, nregs, __reserved[3]
GCS_CONTEXT_SIZE = 32

SIGINFO_SIZE = 128
UCONTEXT_MCONTEXT_OFFSET = 176              #: 8 + 8 + 24 + 8 + 120, rounded up to 16
SIGCONTEXT_RESERVED_OFFSET = 8 + 31 * 8 + 8 + 8 + 8  # 280, then aligned to 16 -> 288
RESERVED_SIZE = 4096
RESERVED_OFFSET = SIGINFO_SIZE + UCONTEXT_MCONTEXT_OFFSET + 288   #: 592
RT_SIGFRAME_SIZE = RESERVED_OFFSET + RESERVED_SIZE                #: 4688
FRAME_RECORD_SIZE = 16
TERMINATOR_SIZE = 16                        #: round_up(sizeof(struct _aarch64_ctx), 16)
EXTRA_CONTEXT_SIZE = 32                     #: round_up(sizeof(struct extra_context), 16)
SIGFRAME_MAXSZ = 256 * 1024
EINVAL, ENOMEM = 22, 12



def sve_sig_context_size(vq: int) -> int:
    """SVE_SIG_CONTEXT_SIZE(vq) = SVE_SIG_REGS_OFFSET (16) + SVE_SIG_REGS_SIZE(vq)."""
    return round16(SVE_CONTEXT_SIZE) + sve_regs_size(vq)


def za_sig_context_size(vq: int) -> int:
    """ZA_SIG_CONTEXT_SIZE(vq) = ZA_SIG_REGS_OFFSET (16) + (vq*16)**2."""
    return round16(ZA_CONTEXT_SIZE) + za_regs_size(vq)


def zt_sig_context_size(nregs: int) -> int:
    """ZT_SIG_CONTEXT_SIZE(n) = sizeof(struct zt_context) + 64 * n."""
    return ZT_CONTEXT_SIZE + ZT_SIG_REG_BYTES * nregs


@dataclass(frozen=True, slots=True)
class SigTask:
    """The parts of a task that decide its signal frame (thread_struct fields)."""

    fp_type: str = FP_STATE_FPSIMD
    sm: bool = False
    za: bool = False
    sve_vl: int = 0
    sme_vl: int = 0
    fault_code: int = 0
    fpsr: int = 0
    fpcr: int = 0
    fpmr: int = 0
    #: TPIDR2_EL0 at delivery (preserve_tpidr2_context() reads the register); `sig_task`
    #: leaves it 0 (the host model holds it as a token, in `SigFrameFp`).
    tpidr2: int = 0


@dataclass(frozen=True, slots=True)
class Record:
    name: str
    magic: int
    offset: int   #: from the start of struct rt_sigframe
    alloc: int    #: bytes allocated (rounded up to 16)
    size: int     #: the head.size the kernel writes


@dataclass(frozen=True, slots=True)
class SigframeLayout:
    records: tuple[Record, ...]
    size: int
    extra_offset: int = 0
    end_offset: int = 0
    error: int = 0

    def record(self, name: str) -> Record | None:
        return next((r for r in self.records if r.name == name), None)


class _Layout:
    """struct rt_sigframe_user_layout and __sigframe_alloc()."""

    def __init__(self) -> None:
        self.size = RESERVED_OFFSET
        self.limit = RESERVED_OFFSET + RESERVED_SIZE - TERMINATOR_SIZE - EXTRA_CONTEXT_SIZE
        self.extra_offset = 0
        self.records: list[Record] = []

    def alloc(self, name: str, magic: int, size: int, head_size: int,
              extend: bool = True) -> int:
        padded = round16(size)
        if padded > self.limit - self.size and not self.extra_offset and extend:
            self.limit += EXTRA_CONTEXT_SIZE
            if self.alloc("extra", EXTRA_MAGIC, EXTRA_CONTEXT_STRUCT_SIZE, EXTRA_CONTEXT_SIZE,
                          extend=False):
                self.limit -= EXTRA_CONTEXT_SIZE
                return -ENOMEM
            self.extra_offset = self.records[-1].offset
            self.size += TERMINATOR_SIZE
            self.limit = SIGFRAME_MAXSZ - TERMINATOR_SIZE
        if padded > self.limit - self.size:
            return -ENOMEM
        self.records.append(Record(name, magic, self.size, padded, head_size))
        self.size += padded
        return 0


def sig_features(caps: HostCaps) -> dict[str, bool]:
    """system_supports_*() answers the layout depends on (TPIDR2 comes with SME)."""
    return {"fpsimd": caps.fpsimd, "sve": caps.sve, "sme": caps.sme, "sme2": caps.sme2,
            "tpidr2": caps.sme, "fpmr": caps.fpmr, "poe": False, "gcs": False}


def setup_sigframe_layout(caps: HostCaps, task: SigTask | None,
                          add_all: bool = False) -> SigframeLayout:
    """setup_sigframe_layout(): the records of a frame for ``task`` (or the largest possible
    frame with ``add_all``), then the terminator."""
    f = sig_features(caps)
    task = task or SigTask()
    lay = _Layout()
    sve_max = caps.sve_vl.max_vl if caps.sve_vl else 0
    sme_max = caps.sme_vl.max_vl if caps.sme_vl else 0

    def alloc(name: str, magic: int, size: int, head_size: int | None = None) -> int:
        return lay.alloc(name, magic, size, size if head_size is None else head_size)

    steps: list[tuple[bool, str, int, int, int | None]] = []
    if f["fpsimd"]:
        steps.append((True, "fpsimd", FPSIMD_MAGIC, FPSIMD_CONTEXT_SIZE, None))
    if add_all or task.fault_code:
        steps.append((True, "esr", ESR_MAGIC, ESR_CONTEXT_SIZE, None))
    if f["sve"] or f["sme"]:
        vq = 0
        if add_all or task.fp_type == FP_STATE_SVE or task.sm:
            vl = max(sve_max, sme_max) if add_all else (task.sme_vl if task.sm else task.sve_vl)
            vq = sve_vq_from_vl(vl)
        size = sve_sig_context_size(vq)
        steps.append((True, "sve", SVE_MAGIC, size, round16(size)))
    if f["tpidr2"]:
        steps.append((True, "tpidr2", TPIDR2_MAGIC, TPIDR2_CONTEXT_SIZE, None))
    if f["sme"]:
        vl = sme_max if add_all else task.sme_vl
        size = za_sig_context_size(sve_vq_from_vl(vl) if task.za else 0)
        steps.append((True, "za", ZA_MAGIC, size, round16(size)))
    if f["sme2"] and (add_all or task.za):
        size = zt_sig_context_size(1)
        steps.append((True, "zt", ZT_MAGIC, size, round16(size)))
    if f["fpmr"]:
        steps.append((True, "fpmr", FPMR_MAGIC, FPMR_CONTEXT_SIZE, None))
    if f["poe"]:
        steps.append((True, "poe", POE_MAGIC, POE_CONTEXT_SIZE, None))
    for _, name, magic, size, head in steps:
        err = alloc(name, magic, size, head)
        if err:
            return SigframeLayout(tuple(lay.records), lay.size, lay.extra_offset, 0, err)
    # sigframe_alloc_end(): un-reserve the terminator, allocate it, forbid more.
    lay.limit += TERMINATOR_SIZE
    err = lay.alloc("end", 0, CTX_HEADER_SIZE, 0)
    end = lay.records[-1].offset if not err else 0
    return SigframeLayout(tuple(r for r in lay.records if r.name != "end"), lay.size,
                          lay.extra_offset, end, err)


def sigframe_size(layout: SigframeLayout) -> int:
    """sigframe_size(): round_up(max(size, sizeof(struct rt_sigframe)), 16)."""
    return round16(max(layout.size, RT_SIGFRAME_SIZE))


def minsigstksz(caps: HostCaps) -> int:
    """minsigstksz_setup(): AT_MINSIGSTKSZ = the add_all frame + frame record + 16."""
    layout = setup_sigframe_layout(caps, None, add_all=True)
    return sigframe_size(layout) + round16(FRAME_RECORD_SIZE) + 16


def sig_task(host: Host, name: str) -> SigTask:
    """The SigTask of a task after fpsimd_save_and_flush_current_state()."""
    t, st = host.task(name), host.store(host.task(name).store)
    return SigTask(st.fp_type, bool(st.svcr & SVCR_SM), bool(st.svcr & SVCR_ZA), t.sve_vl,
                   t.sme_vl)


def encode_sigframe(layout: SigframeLayout, task: SigTask, base: int = 0) -> bytes:
    """setup_sigframe(): the frame's bytes with every FP record header written as the kernel
    writes it (payload registers zero except FPSR/FPCR/FPMR/TPIDR2); ``base`` is the frame's
    address, used for extra_context.datap."""
    if layout.error:
        raise BlobError(f"no frame: setup_sigframe_layout() failed with {layout.error}")
    buf = bytearray(sigframe_size(layout))
    for r in layout.records:
        struct.pack_into("<II", buf, r.offset, r.magic, r.size)
        if r.name == "fpsimd":
            struct.pack_into("<II", buf, r.offset + 8, task.fpsr, task.fpcr)
        elif r.name == "esr":
            struct.pack_into("<Q", buf, r.offset + 8, task.fault_code)
        elif r.name == "sve":
            vl = task.sme_vl if task.sm else task.sve_vl
            struct.pack_into("<HH", buf, r.offset + 8, vl, SVE_SIG_FLAG_SM if task.sm else 0)
        elif r.name == "za":
            struct.pack_into("<H", buf, r.offset + 8, task.sme_vl)
        elif r.name == "zt":
            struct.pack_into("<H", buf, r.offset + 8, 1)
        elif r.name == "fpmr":
            struct.pack_into("<Q", buf, r.offset + 8, task.fpmr)
        elif r.name == "tpidr2":
            struct.pack_into("<Q", buf, r.offset + 8, task.tpidr2)
        elif r.name == "extra":
            userp = r.offset + EXTRA_CONTEXT_SIZE + TERMINATOR_SIZE
            struct.pack_into("<QI", buf, r.offset + 8, base + userp,
                             round16(layout.size) - userp)
    return bytes(buf)


_KNOWN = {FPSIMD_MAGIC: ("fpsimd", "fpsimd"), ESR_MAGIC: ("esr", None),
          POE_MAGIC: ("poe", "poe"), SVE_MAGIC: ("sve", "sve|sme"),
          TPIDR2_MAGIC: ("tpidr2", "tpidr2"), ZA_MAGIC: ("za", "sme"),
          ZT_MAGIC: ("zt", "sme2"), FPMR_MAGIC: ("fpmr", "fpmr"), GCS_MAGIC: ("gcs", "gcs")}


def parse_user_sigframe(frame: bytes, caps: HostCaps, base: int = 0) -> dict[str, tuple[int, int]]:
    """parse_user_sigframe(): walk the records for rt_sigreturn; {name: (offset, size)}.

    Raises BlobError naming the rule the kernel would reject the frame for (-EINVAL)."""
    feats = sig_features(caps)
    if len(frame) < RT_SIGFRAME_SIZE:
        raise BlobError(f"frame is {len(frame)} bytes, struct rt_sigframe is {RT_SIGFRAME_SIZE}")
    found: dict[str, tuple[int, int]] = {}
    start, offset, limit = RESERVED_OFFSET, 0, RESERVED_SIZE
    have_extra = False
    while True:
        if limit - offset < CTX_HEADER_SIZE:
            raise BlobError(f"record at {start + offset:#x}: no room for a header")
        if offset % 16:
            raise BlobError(f"record at {start + offset:#x} is not 16-byte aligned")
        if start + offset + CTX_HEADER_SIZE > len(frame):
            raise BlobError(f"record at {start + offset:#x} is beyond the frame")
        magic, size = struct.unpack_from("<II", frame, start + offset)
        if limit - offset < size:
            raise BlobError(f"record {magic:#x} at {start + offset:#x}: size {size} overruns")
        if magic == 0:
            if size:
                raise BlobError(f"terminator at {start + offset:#x} has size {size}")
            return found
        if magic == EXTRA_MAGIC:
            if have_extra:
                raise BlobError("more than one extra_context")
            if size < EXTRA_CONTEXT_STRUCT_SIZE:
                raise BlobError(f"extra_context size {size} < {EXTRA_CONTEXT_STRUCT_SIZE}")
            datap, esize = struct.unpack_from("<QI", frame, start + offset + 8)
            if limit - offset - size < TERMINATOR_SIZE:
                raise BlobError("extra_context not followed by a terminator in __reserved")
            end = start + offset + size
            if struct.unpack_from("<II", frame, end) != (0, 0):
                raise BlobError("extra_context not followed by a null terminator")
            userp = end + TERMINATOR_SIZE
            have_extra = True
            if datap % 16 or esize % 16 or datap != base + userp:
                raise BlobError("extra_context.datap/size misaligned or not right after the "
                                "terminator")
            if esize > SIGFRAME_MAXSZ - userp or userp + esize > len(frame):
                raise BlobError(f"extra space of {esize} bytes is unreasonably large")
            start, offset, limit = userp, 0, esize
            continue
        if magic not in _KNOWN:
            raise BlobError(f"unknown record magic {magic:#010x} at {start + offset:#x}")
        name, need = _KNOWN[magic]
        if need is not None and not any(feats[n] for n in need.split("|")):
            raise BlobError(f"{name}_context but the system lacks {need.upper()}")
        if name in found and name != "esr":
            raise BlobError(f"duplicate {name}_context")
        if size < CTX_HEADER_SIZE:
            raise BlobError(f"{name}_context size {size} < 8")
        found[name] = (start + offset, size)
        offset += size


@dataclass(frozen=True, slots=True)
class SigReturn:
    """What restore_sigframe() makes of a frame's FP records: 0, or -EINVAL (rt_sigreturn's
    badframe: SIGSEGV) with the rule that refused it; ``task`` is the FP state restored."""

    ret: int
    reason: str
    task: SigTask


def restore_sigframe_fp(frame: bytes, caps: HostCaps, task: SigTask,
                        base: int = 0) -> SigReturn:
    """restore_sigframe(), FP part: parse_user_sigframe(), then restore_sve_fpsimd_context()
    (or restore_fpsimd_context() without an sve_context), restore_tpidr2_context(),
    restore_fpmr_context(), restore_za_context() and restore_zt_context(), in that order,
    each with its size rule.  ``task`` gives current's VLs and PSTATE.ZA at sigreturn."""

    def bad(reason: str) -> SigReturn:
        return SigReturn(-EINVAL, reason, task)

    try:
        found = parse_user_sigframe(frame, caps, base)
    except BlobError as e:
        return bad(f"parse_user_sigframe: {e}")
    if not caps.fpsimd:
        return SigReturn(0, "", task)
    if "fpsimd" not in found:
        return bad("restore_sigframe: no fpsimd_context")
    new = replace(task, fp_type=FP_STATE_FPSIMD, sm=False)
    if "sve" in found:                       # restore_sve_fpsimd_context()
        off, size = found["sve"]
        if size < SVE_CONTEXT_SIZE:
            return bad(f"restore_sve_fpsimd_context: size {size} < {SVE_CONTEXT_SIZE}")
        user_vl, flags = struct.unpack_from("<HH", frame, off + 8)
        sm = bool(flags & SVE_SIG_FLAG_SM)
        if sm and not caps.sme:
            return bad("restore_sve_fpsimd_context: SVE_SIG_FLAG_SM without SME")
        vl = task.sme_vl if sm else task.sve_vl
        if user_vl != vl:
            return bad(f"restore_sve_fpsimd_context: vl {user_vl} != the task's {vl}")
        if sm or size != SVE_CONTEXT_SIZE:   # else: header only, restore_fpsimd_context()
            need = sve_sig_context_size(sve_vq_from_vl(vl))
            if size < need:
                return bad(f"restore_sve_fpsimd_context: size {size} < "
                           f"SVE_SIG_CONTEXT_SIZE {need}")
            new = replace(new, fp_type=FP_STATE_SVE, sm=sm)
    fp_off, fp_size = found["fpsimd"]        # read_fpsimd_context(), last on both paths
    if fp_size != FPSIMD_CONTEXT_SIZE:
        return bad(f"read_fpsimd_context: size {fp_size} != {FPSIMD_CONTEXT_SIZE}")
    fpsr, fpcr = struct.unpack_from("<II", frame, fp_off + 8)
    new = replace(new, fpsr=fpsr, fpcr=fpcr)
    if caps.sme and "tpidr2" in found:       # restore_tpidr2_context()
        off, size = found["tpidr2"]
        if size != TPIDR2_CONTEXT_SIZE:
            return bad(f"restore_tpidr2_context: size {size} != {TPIDR2_CONTEXT_SIZE}")
        new = replace(new, tpidr2=struct.unpack_from("<Q", frame, off + 8)[0])
    if caps.fpmr and "fpmr" in found:        # restore_fpmr_context()
        off, size = found["fpmr"]
        if size != FPMR_CONTEXT_SIZE:
            return bad(f"restore_fpmr_context: size {size} != {FPMR_CONTEXT_SIZE}")
        new = replace(new, fpmr=struct.unpack_from("<Q", frame, off + 8)[0])
    if caps.sme and "za" in found:           # restore_za_context()
        off, size = found["za"]
        if size < ZA_CONTEXT_SIZE:
            return bad(f"restore_za_context: size {size} < {ZA_CONTEXT_SIZE}")
        user_vl = struct.unpack_from("<H", frame, off + 8)[0]
        if user_vl != task.sme_vl:
            return bad(f"restore_za_context: vl {user_vl} != the task's {task.sme_vl}")
        za = size != ZA_CONTEXT_SIZE
        if za and size < (need := za_sig_context_size(sve_vq_from_vl(user_vl))):
            return bad(f"restore_za_context: size {size} < ZA_SIG_CONTEXT_SIZE {need}")
        new = replace(new, za=za)
    if caps.sme2 and "zt" in found:          # restore_zt_context()
        off, size = found["zt"]
        if not new.za:
            return bad("restore_zt_context: ZA is not enabled")
        if size != zt_sig_context_size(1):
            return bad(f"restore_zt_context: size {size} != ZT_SIG_CONTEXT_SIZE(1) "
                       f"{zt_sig_context_size(1)}")
        nregs = struct.unpack_from("<H", frame, off + 8)[0]
        if nregs != 1:
            return bad(f"restore_zt_context: nregs {nregs} != 1")
    return SigReturn(0, "", new)


def deliver_signal(host: Host, cpu: int, zero_tpidr2: bool = True
                   ) -> tuple[Host, SigframeLayout]:
    """setup_rt_frame() + setup_return() for current: save and flush the FP state, lay out
    the frame and write its FP records (kept on the task: `preserve_fp_records`), then enter
    the handler with SM and ZA off (task_smstop_sm(), SVCR.ZA=0, TPIDR2_EL0=0); FPMR is
    zeroed with streaming mode. ``zero_tpidr2`` False is a rejected design: the handler
    starts with the interrupted code's TPIDR2_EL0, so a lazy save it commits goes to that
    code's TPIDR2 block."""
    host = fpsimd.fpsimd_save_and_flush_current_state(host, cpu)
    t = host.current(cpu)
    assert t is not None
    layout = setup_sigframe_layout(host.caps, sig_task(host, t.name))
    t = replace(t, sigframes=(*t.sigframes, preserve_fp_records(host, t, cpu)))
    host = host.with_task(t)
    if host.caps.sme:  # setup_return(): SM and ZA off, write_sysreg_s(0, SYS_TPIDR2_EL0)
        if zero_tpidr2:
            host = host.with_regs(cpu, replace(host.cpus[cpu].regs, tpidr2=ZERO))
        st = host.store(t.store)
        expect = {TPIDR2: ZERO}  # the handler's contract, whatever the design
        if st.svcr & SVCR_SM:
            st = replace(st, vregs=ZERO, fpsr=FPSR_STREAMING, fp_type=FP_STATE_FPSIMD,
                         fpmr=ZERO if host.caps.fpmr else st.fpmr)
            expect.update({V: ZERO, ZHI: ZERO, P: ZERO, FPSR: FPSR_STREAMING, FPMR: ZERO})
        if st.svcr & SVCR_ZA:
            expect.update({ZA: ZERO, ZT0: ZERO})
        st = replace(st, svcr=0)
        host = host.with_store(t.store, st).expect(t.name, expect)
    return host, layout


def preserve_fp_records(host: Host, t: Task, cpu: int) -> SigFrameFp:
    """What setup_sigframe() writes of task ``t``'s saved state (after
    fpsimd_save_and_flush_current_state()): preserve_fpsimd_context() (V through
    fpsimd_sync_from_effective_state(): from Z in SVE format; FPSR),
    preserve_sve_context() (vl: the SME VL in streaming mode, else the SVE VL; a payload in
    SVE format or streaming mode), preserve_za_context() and preserve_zt_context() (ZA and
    ZT0 while PSTATE.ZA is on), preserve_tpidr2_context() (the live TPIDR2_EL0 of ``cpu``,
    where ``t`` runs) and preserve_fpmr_context()."""
    caps, st = host.caps, host.store(t.store)
    sm = caps.sme and bool(st.svcr & SVCR_SM)
    sve_format = st.fp_type == FP_STATE_SVE
    payload = (caps.sve or caps.sme) and (sm or sve_format)
    za_on = caps.sme and bool(st.svcr & SVCR_ZA)
    return SigFrameFp(
        sve_vl=t.sme_vl if sm else t.sve_vl, sme_vl=t.sme_vl, sm=sm, sve=payload, za_on=za_on,
        v=st.sve_v if sve_format else st.vregs, fpsr=st.fpsr,
        zhi=st.sve_zhi if payload else ZERO, p=st.sve_p if payload else ZERO,
        za=st.za if za_on else ZERO, zt0=st.zt0 if za_on and caps.sme2 else ZERO,
        fpmr=st.fpmr if caps.fpmr else ZERO,
        tpidr2=host.cpus[cpu].regs.tpidr2 if caps.sme else ZERO)


def sys_rt_sigreturn(host: Host, cpu: int, early_flush: bool = True,
                     sm_sets_tif_sme: bool = True, za_allocs_sve: bool = True) -> Host:
    """rt_sigreturn through current's innermost frame: el0_svc's fpsimd_syscall_enter(),
    `restore_sigframe_fp_state`, then the syscall's exit to user mode, which loads the
    restored state (fpsimd_restore_current_state(): TIF_FOREIGN_FPSTATE is set).
    ``early_flush``, ``sm_sets_tif_sme`` and ``za_allocs_sve`` False are rejected designs
    (see `restore_sigframe_fp_state`)."""
    t = fpsimd.current_task(host, cpu)
    if not t.sigframes:
        raise IllegalEvent("signal", "no frame", "rt_sigreturn",
                           f"{t.name} has no signal frame on its stack")
    frame = t.sigframes[-1]
    host = entry_common.syscall_enter(host, cpu)
    host = host.update_task(host.task(t.name), sigframes=t.sigframes[:-1])
    host = restore_sigframe_fp_state(host, cpu, frame, early_flush, sm_sets_tif_sme,
                                     za_allocs_sve)
    if host.task(t.name).killed:
        return host
    return entry_common.syscall_exit(host, cpu)


def restore_sigframe_fp_state(host: Host, cpu: int, frame: SigFrameFp,
                              early_flush: bool = True, sm_sets_tif_sme: bool = True,
                              za_allocs_sve: bool = True) -> Host:
    """restore_sigframe(), FP part, on current's thread_struct: first
    fpsimd_save_and_flush_current_state() -- the registers stop being current's, so what
    the restore_*_context() functions write to memory is what the return to user loads --
    then restore_sve_fpsimd_context() (a payload: with SVE_SIG_FLAG_SM sme_alloc() without
    zeroing, then sve_alloc(), Z/P/FFR, SVCR.SM and TIF_SME from SVE_SIG_FLAG_SM or else
    TIF_SVE, fp_type SVE, V merged by fpsimd_update_current_state())
    or restore_fpsimd_context() (TIF_SVE and SVCR.SM clear, fp_type FPSIMD), then
    restore_tpidr2_context() (into the register itself), restore_fpmr_context(),
    restore_za_context() (a header only turns ZA off; a payload: sve_alloc() without
    zeroing, sme_alloc(), ZA, TIF_SME, SVCR.ZA) and restore_zt_context().  A frame whose VLs are not
    the task's is refused (-EINVAL: badframe, SIGSEGV).  The context's expected values become
    the frame's (Z's upper bits, P and FFR read as zero after an FPSIMD-only restore).

    ``early_flush`` False skips the first save and flush: the registers stay bound to the
    task, the return to user does not load, and the task runs on with its handler's
    registers while its thread_struct holds the frame's -- a design the kernel rejects.

    ``sm_sets_tif_sme`` False is v6.17 before the stable fix d2907cbe9ea0 ("arm64/fpsimd:
    signal: Fix restoration of SVE context", Jan 2026): SVCR.SM restored without TIF_SME. A
    thread that never used SME itself -- a child forked in a signal handler returning
    through its parent's frame, a task CRIU restores -- then has task_fpsimd_load() leave
    SMCR_EL1.LEN as the last SME user of the CPU left it and load its streaming registers
    at that VL; the next save finds the VL wrong and kills it (SIGKILL).

    ``za_allocs_sve`` False is v6.17 before the stable fix ea8ccfddbce0 ("arm64/fpsimd:
    signal: Allocate SSVE storage when restoring ZA", Jan 2026): restore_za_context() sets
    TIF_SME, so the thread may enter streaming mode without a trap, but allocates no
    sve_state -- a thread that never used SVE or SME itself (a forked child returning
    through its parent's frame) then saves its streaming registers through a NULL
    sve_state."""
    caps = host.caps
    if early_flush:
        host = fpsimd.fpsimd_save_and_flush_current_state(host, cpu)
    t = fpsimd.current_task(host, cpu)
    if (caps.sve or caps.sme) and frame.sve_vl != (t.sme_vl if frame.sm else t.sve_vl):
        return host.update_task(t, killed="SIGSEGV")  # restore_sve_fpsimd_context(): vl
    if caps.sme and frame.sme_vl != t.sme_vl:
        return host.update_task(t, killed="SIGSEGV")  # restore_za_context(): vl
    if frame.sve:
        if frame.sm and sm_sets_tif_sme:
            host = fpsimd.sme_alloc(host, t.name, False)
        host = fpsimd.sve_alloc(host, t.name, True)
    if caps.sme and frame.za_on:
        if za_allocs_sve:  # storage for streaming mode, which TIF_SME lets it enter
            host = fpsimd.sve_alloc(host, t.name, False)
        host = fpsimd.sme_alloc(host, t.name, True)
    st = host.store(t.store)
    svcr = st.svcr & ~SVCR_SM
    expect = {V: frame.v, FPSR: frame.fpsr}
    if frame.sve:
        st = replace(st, sve_v=frame.v, sve_zhi=frame.zhi, sve_p=frame.p, sve_vl=frame.sve_vl,
                     fpsr=frame.fpsr, fp_type=FP_STATE_SVE)
        svcr |= SVCR_SM if frame.sm else 0
        t = replace(t, tif_sve=t.tif_sve or not frame.sm,
                    tif_sme=t.tif_sme or (frame.sm and sm_sets_tif_sme))
        expect.update({ZHI: frame.zhi, P: frame.p})
    else:
        st = replace(st, vregs=frame.v, fpsr=frame.fpsr, fp_type=FP_STATE_FPSIMD)
        t = replace(t, tif_sve=False)
        expect.update({ZHI: ZERO, P: ZERO})
    if caps.sme:  # restore_tpidr2_context(): write_sysreg_s()
        host = host.with_regs(cpu, replace(host.cpus[cpu].regs, tpidr2=frame.tpidr2))
        expect[TPIDR2] = frame.tpidr2
    if caps.fpmr:
        st = replace(st, fpmr=frame.fpmr)
        expect[FPMR] = frame.fpmr
    if caps.sme:
        if frame.za_on:
            st = replace(st, za=frame.za, zt0=frame.zt0 if caps.sme2 else st.zt0)
            svcr |= SVCR_ZA
            t = replace(t, tif_sme=True)
            expect.update({ZA: frame.za, ZT0: frame.zt0})
        else:
            svcr &= ~SVCR_ZA
    host = host.with_store(t.store, replace(st, svcr=svcr)).with_task(t)
    return host.expect(t.name, expect)
