"""arm64 FP regsets: PTRACE_GETREGSET / PTRACE_SETREGSET of arch/arm64/kernel/ptrace.c (v6.17).

The regsets a debugger or a checkpointer reads and writes for the FP state of a stopped
thread, byte for byte: NT_PRFPREG (struct user_fpsimd_state, fpr_get/fpr_set), NT_ARM_SVE and
NT_ARM_SSVE (struct user_sve_header + SVE or FPSIMD payload, sve_get_common/sve_set_common),
NT_ARM_ZA (struct user_za_header + ZA, za_get/za_set), NT_ARM_ZT (ZT0, zt_get/zt_set),
NT_ARM_FPMR (fpmr_get/fpmr_set) and NT_ARM_TLS (tls_get/tls_set: TPIDR_EL0, then SME's
TPIDR2_EL0, the pointer of the ZA lazy-saving scheme's TPIDR2 block), each with its
``struct user_regset`` (n, size) and ptrace_regset()'s rules for the iovec (kernel/ptrace.c).

Theory of operation
-------------------
- A `RegsetTarget` is the tracee's ``struct thread_struct`` as these functions see it after
  the tracee stopped (its state saved to memory): fp_type, SVCR.SM/ZA, the vector lengths now
  and on exec with their INHERIT flags, ``uw.fpsimd_state`` (V0-V31, FPSR, FPCR), the
  sve_state block (Z, P, FFR at the live VL: the SME VL in streaming mode), sme_state (ZA at
  the SME VL, then ZT0), ``uw.fpmr``, ``uw.tp_value`` (TPIDR_EL0) and ``tpidr2_el0``. It is
  a value: `regset_set` returns a new one.
- `regset_get` is the GETREGSET answer; `regset_set` the SETREGSET outcome: (0 or -errno,
  the target afterwards, the rule that refused it). A refused write may still have changed
  the target, as the kernel's does (sve_set_common() sets the VL before it finds -EIO).
- Vector-length changes go through `vec_set_vector_length` (arch/arm64/kernel/fpsimd.c), the
  same rules as ``prctl(PR_SVE_SET_VL)`` for the current task (fpstate.kernel.arm64.fpsimd),
  applied to a stopped target.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, replace

from fpstate.arm64.regs import (
    FPMR,
    FPSR,
    SVCR_SM,
    SVCR_ZA,
    SVE_PT_REGS_FPSIMD,
    SVE_PT_REGS_SVE,
    SVE_VQ_BYTES,
    TPIDR2,
    USER_FPSIMD_STATE_SIZE,
    USER_SVE_HEADER_SIZE,
    VL_ARCH_MAX,
    ZA,
    ZERO,
    ZHI,
    ZT0,
    ZT_SIG_REG_BYTES,
    P,
    Tok,
    V,
    round16,
    sve_ffr_offset,
    sve_ffr_size,
    sve_pt_fpsr_offset,
    sve_pt_size,
    sve_regs_size,
    sve_vl_valid,
    sve_vq_from_vl,
    za_pt_size,
    za_regs_size,
)
from fpstate.arm64.statemachine import IllegalEvent
from fpstate.kernel.arm64 import entry_common, fpsimd
from fpstate.kernel.arm64.fpsimd import PR_SVE_SET_VL_ONEXEC, PR_SVE_VL_INHERIT
from fpstate.kernel.arm64.state import (
    ARM64_VEC_SME,
    ARM64_VEC_SVE,
    FP_STATE_FPSIMD,
    FP_STATE_SVE,
    TASK_NEW,
    TASK_SLEEPING,
    Host,
    HostCaps,
    Observation,
)

EINVAL, EIO = 22, 5

#: Note types (include/uapi/linux/elf.h).
NT_PRFPREG = 2
NT_ARM_SVE = 0x405
NT_ARM_SSVE = 0x40B
NT_ARM_ZA = 0x40C
NT_ARM_ZT = 0x40D
NT_ARM_FPMR = 0x40E
NT_ARM_TLS = 0x401
NOTE_NAMES: dict[int, str] = {NT_PRFPREG: "NT_PRFPREG", NT_ARM_TLS: "NT_ARM_TLS",
                              NT_ARM_SVE: "NT_ARM_SVE", NT_ARM_SSVE: "NT_ARM_SSVE",
                              NT_ARM_ZA: "NT_ARM_ZA", NT_ARM_ZT: "NT_ARM_ZT",
                              NT_ARM_FPMR: "NT_ARM_FPMR"}

#: ARCH_SVE_VQ_MAX and SME_VQ_MAX (asm/fpsimd.h): 16 quadwords, 2048 bits.
ARCH_SVE_VQ_MAX = SME_VQ_MAX = 16
SVE_PT_REGS_MASK = 1
#: The SVE_PT_* / ZA_PT_* flags vec_set_vector_length() consumes (shifted left by 16).
SVE_PT_VL_INHERIT = PR_SVE_VL_INHERIT >> 16
SVE_PT_VL_ONEXEC = PR_SVE_SET_VL_ONEXEC >> 16


def _div_round_up(a: int, b: int) -> int:
    return -(-a // b)


#: struct user_regset (n, size) of each FP regset in aarch64_regsets[] (NT_ARM_TLS for
#: TPIDR2_EL0), in that array's order (the order of a core's notes): ptrace_regset() needs
#: iov_len to be a multiple of ``size`` and cuts it to ``n * size``.
REGSETS: dict[int, tuple[int, int]] = {
    NT_PRFPREG: (USER_FPSIMD_STATE_SIZE // 4, 4),
    NT_ARM_TLS: (2, 8),
    NT_ARM_FPMR: (1, 8),
    NT_ARM_SVE: (_div_round_up(sve_pt_size(ARCH_SVE_VQ_MAX, SVE_PT_REGS_SVE), SVE_VQ_BYTES),
                 SVE_VQ_BYTES),
    NT_ARM_SSVE: (_div_round_up(sve_pt_size(SME_VQ_MAX, SVE_PT_REGS_SVE), SVE_VQ_BYTES),
                  SVE_VQ_BYTES),
    NT_ARM_ZA: (_div_round_up(za_pt_size(SME_VQ_MAX), SVE_VQ_BYTES), SVE_VQ_BYTES),
    NT_ARM_ZT: (1, ZT_SIG_REG_BYTES),
}


@dataclass(frozen=True, slots=True)
class RegsetTarget:
    """A stopped tracee's FP state (struct thread_struct), see the module docstring.

    ``sve`` is sve_state's Z/P/FFR block at the live VL (``sme_vl`` when ``sm``, else
    ``sve_vl``), meaningful while ``fp_type`` is FP_STATE_SVE; ``za`` is ZA at ``sme_vl``,
    meaningful while ``za_on``; ``vregs`` is uw.fpsimd_state.vregs (512 bytes)."""

    sve_vl: int = 0
    sme_vl: int = 0
    fp_type: str = FP_STATE_FPSIMD
    sm: bool = False
    za_on: bool = False
    sve_vl_onexec: int = 0
    sme_vl_onexec: int = 0
    sve_inherit: bool = False
    sme_inherit: bool = False
    vregs: bytes = bytes(512)
    fpsr: int = 0
    fpcr: int = 0
    sve: bytes = b""
    za: bytes = b""
    zt0: bytes = bytes(ZT_SIG_REG_BYTES)
    fpmr: int = 0
    tpidr: int = 0  #: uw.tp_value, TPIDR_EL0
    tpidr2: int = 0  #: tpidr2_el0, TPIDR2_EL0 (SME)

    @classmethod
    def fresh(cls, caps: HostCaps) -> RegsetTarget:
        """A task after exec (fpsimd_flush_thread(), tls_thread_flush()): everything zero,
        default VLs."""
        return cls(sve_vl=caps.sve_vl.default_vl if caps.sve_vl else 0,
                   sme_vl=caps.sme_vl.default_vl if caps.sme_vl else 0)

    @property
    def live_vl(self) -> int:
        """The VL sve_state is laid out for: the SME VL in streaming mode."""
        return self.sme_vl if self.sm else self.sve_vl

    def vl(self, kind: str) -> int:
        """task_get_vl()."""
        return self.sve_vl if kind == ARM64_VEC_SVE else self.sme_vl


@dataclass(frozen=True, slots=True)
class RegsetResult:
    """What PTRACE_SETREGSET returned (0 or -errno), the rule behind an error, and the
    target afterwards."""

    ret: int
    reason: str
    target: RegsetTarget


def regset_supported(caps: HostCaps, note: int) -> bool:
    """system_supports_*() of each regset's get/set (NT_ARM_TLS has no such check)."""
    return {NT_PRFPREG: caps.fpsimd, NT_ARM_TLS: True, NT_ARM_SVE: caps.sve,
            NT_ARM_SSVE: caps.sme, NT_ARM_ZA: caps.sme, NT_ARM_ZT: caps.sme2,
            NT_ARM_FPMR: caps.fpmr}[note]


_FEATURE_NAME = {NT_PRFPREG: "FP/AdvSIMD", NT_ARM_TLS: "", NT_ARM_SVE: "SVE",
                 NT_ARM_SSVE: "SME", NT_ARM_ZA: "SME", NT_ARM_ZT: "SME2",
                 NT_ARM_FPMR: "FPMR"}


# --- effective state (fpsimd_sync_from/to_effective_state) ------------------------------------
def effective_vregs(t: RegsetTarget) -> bytes:
    """fpsimd_sync_from_effective_state(): V0-V31 as the low 128 bits of Z0-Z31 when the
    state is in SVE format, else uw.fpsimd_state.vregs."""
    if t.fp_type != FP_STATE_SVE or not t.sve:
        return t.vregs
    zsize = t.live_vl
    return b"".join(t.sve[n * zsize:n * zsize + 16] for n in range(32))


def _sve_from_vregs(vregs: bytes, vl: int) -> bytes:
    """fpsimd_sync_to_effective_state_zeropad(): a zeroed SVE block with V0-V31 in the low
    128 bits of Z0-Z31."""
    block = bytearray(sve_regs_size(sve_vq_from_vl(vl)))
    for n in range(32):
        block[n * vl:n * vl + 16] = vregs[n * 16:n * 16 + 16]
    return bytes(block)


def user_fpsimd_state(t: RegsetTarget) -> bytes:
    """__fpr_get(): struct user_fpsimd_state of the effective state (reserved words zero)."""
    return effective_vregs(t) + struct.pack("<IIII", t.fpsr, t.fpcr, 0, 0)


# --- vec_set_vector_length() for a stopped task ------------------------------------------------
def vec_set_vector_length(caps: HostCaps, t: RegsetTarget, kind: str, vl: int,
                          flags: int) -> tuple[int, RegsetTarget]:
    """vec_set_vector_length(task, type, vl, flags) (fpsimd.c): EINVAL for a flag other than
    PR_SVE_VL_INHERIT / PR_SVE_SET_VL_ONEXEC or an invalid VL; the VL is capped at VL_ARCH_MAX
    and rounded to a supported one; _ONEXEC (or INHERIT) records it for exec; without
    _ONEXEC a different VL is set now by change_live_vector_length(): "always preserve
    PSTATE.SM and the effective FPSIMD state, zeroing other SVE state" -- V survives, the
    rest of Z, P and FFR is zeroed in a new sve_state laid out for the new live VL (the
    format, FPSIMD or SVE, is kept) -- and a new SME VL also turns PSTATE.ZA off with a new,
    zeroed sme_state (ZA and ZT0); a new SVE VL leaves ZA alone."""
    info = caps.vl_info(kind)
    if info is None or flags & ~(PR_SVE_VL_INHERIT | PR_SVE_SET_VL_ONEXEC) or \
            not sve_vl_valid(vl):
        return -EINVAL, t
    vl = info.find_supported_vector_length(min(vl, VL_ARCH_MAX))
    keep = vl if flags & (PR_SVE_VL_INHERIT | PR_SVE_SET_VL_ONEXEC) else 0
    inherit = bool(flags & PR_SVE_VL_INHERIT)
    if not flags & PR_SVE_SET_VL_ONEXEC and vl != t.vl(kind):
        vregs = effective_vregs(t)  # fpsimd_sync_from_effective_state()
        t = replace(t, vregs=vregs, **({"sve_vl": vl} if kind == ARM64_VEC_SVE
                                      else {"sme_vl": vl}))
        # fpsimd_sync_to_effective_state_zeropad() into the new sve_state
        t = replace(t, sve=_sve_from_vregs(vregs, t.live_vl)
                    if t.fp_type == FP_STATE_SVE else b"")
        if kind == ARM64_VEC_SME:
            t = replace(t, za_on=False, za=b"", zt0=bytes(ZT_SIG_REG_BYTES))
    if kind == ARM64_VEC_SVE:
        t = replace(t, sve_vl_onexec=keep, sve_inherit=inherit)
    else:
        t = replace(t, sme_vl_onexec=keep, sme_inherit=inherit)
    return 0, t


# --- GETREGSET -----------------------------------------------------------------------------
def regset_get(caps: HostCaps, t: RegsetTarget, note: int) -> bytes:
    """What PTRACE_GETREGSET(``note``) writes for a large enough iovec; BlobError-free:
    raises ValueError for a regset the system does not have (the kernel's -EINVAL)."""
    if note not in REGSETS:
        raise ValueError(f"note type {note:#x} is not an FP regset")
    if not regset_supported(caps, note):
        raise ValueError(f"{NOTE_NAMES[note]}: the system lacks {_FEATURE_NAME[note]} "
                         "(GETREGSET returns -EINVAL)")
    if note == NT_PRFPREG:
        return user_fpsimd_state(t)
    if note in (NT_ARM_SVE, NT_ARM_SSVE):
        return _sve_get(caps, t, ARM64_VEC_SVE if note == NT_ARM_SVE else ARM64_VEC_SME)
    if note == NT_ARM_ZA:
        return _za_get(caps, t)
    if note == NT_ARM_ZT:  # zeroes while PSTATE.ZA is off: ZT0 is zeroed when ZA is enabled
        return t.zt0 if t.za_on else bytes(ZT_SIG_REG_BYTES)
    if note == NT_ARM_TLS:  # tls_get(): TPIDR2_EL0 reads as zero without SME
        return struct.pack("<QQ", t.tpidr, t.tpidr2 if caps.sme else 0)
    return struct.pack("<Q", t.fpmr)


#: What sve_init_header_from_task() stores as the size of an inactive mode's header:
#: ``header->size = sizeof(header)`` with ``header`` a pointer (b93e685ecff7, v6.16), so 8
#: bytes, not the 16 of struct user_sve_header that the check in sve_get_common() compares
#: with. The kernel's own selftest (fp-ptrace.c, check_ptrace_values_sve/_ssve) expects this
#: 8 and the FPSIMD payload that follows it.
INACTIVE_HEADER_SIZE = 8


def _sve_header(caps: HostCaps, t: RegsetTarget, kind: str) -> tuple[bytes, int, int]:
    """sve_init_header_from_task(): (header bytes, flags, size). The mode the task is not in
    gets FPSIMD flags and size `INACTIVE_HEADER_SIZE`."""
    active = (ARM64_VEC_SME if t.sm else ARM64_VEC_SVE) == kind
    flags = SVE_PT_REGS_SVE if active and t.fp_type == FP_STATE_SVE else SVE_PT_REGS_FPSIMD
    if t.sve_inherit if kind == ARM64_VEC_SVE else t.sme_inherit:
        flags |= SVE_PT_VL_INHERIT
    vl = t.vl(kind)
    info = caps.vl_info(kind)
    max_vl = info.max_vl if info else 0
    size = sve_pt_size(sve_vq_from_vl(vl), flags) if active else INACTIVE_HEADER_SIZE
    max_size = sve_pt_size(sve_vq_from_vl(max_vl), SVE_PT_REGS_SVE)
    return struct.pack("<IIHHHH", size, max_size, vl, max_vl, flags, 0), flags, size



def _sve_get(caps: HostCaps, t: RegsetTarget, kind: str) -> bytes:
    """sve_get_common(): the header; then the FPSIMD payload (fpr_get's: the effective V0-V31,
    FPSR, FPCR) or Z/P/FFR, zero padding, FPSR and FPCR, zero padding to the 16-byte size.

    Since b93e685ecff7 (v6.16) the function means to stop after the header for the mode the
    task is not in (``if (header.size == sizeof(header)) return 0;``), but that header's size
    is `INACTIVE_HEADER_SIZE`, 8, never 16: the inactive mode's read goes on to the FPSIMD
    payload of the active mode's registers, as before v6.16 (only the size field changed)."""
    header, flags, size = _sve_header(caps, t, kind)
    if size == USER_SVE_HEADER_SIZE:  # the kernel's check: false in v6.16-v6.17 (see above)
        return header
    if not flags & SVE_PT_REGS_SVE:
        return header + user_fpsimd_state(t)
    vq = sve_vq_from_vl(t.vl(kind))
    out = bytearray(round16(size))
    out[:USER_SVE_HEADER_SIZE] = header
    block = t.sve or bytes(sve_regs_size(vq))
    out[USER_SVE_HEADER_SIZE:USER_SVE_HEADER_SIZE + len(block)] = block
    struct.pack_into("<II", out, sve_pt_fpsr_offset(vq), t.fpsr, t.fpcr)
    return bytes(out)


def _za_get(caps: HostCaps, t: RegsetTarget) -> bytes:
    """za_get(): the user_za_header, then ZA while PSTATE.ZA is set."""
    vq = sve_vq_from_vl(t.sme_vl)
    size = za_pt_size(vq) if t.za_on else USER_SVE_HEADER_SIZE
    max_vl = caps.sme_vl.max_vl if caps.sme_vl else 0
    header = struct.pack("<IIHHHH", size, za_pt_size(vq), t.sme_vl, max_vl,
                         SVE_PT_VL_INHERIT if t.sme_inherit else 0, 0)
    if not t.za_on:
        return header
    return header + (t.za or bytes(za_regs_size(vq)))


# --- SETREGSET -----------------------------------------------------------------------------
def regset_set(caps: HostCaps, t: RegsetTarget, note: int, data: bytes) -> RegsetResult:
    """PTRACE_SETREGSET(``note``) with an iovec of ``data``: ptrace_regset() (iov_len a
    multiple of the regset's size, cut to n * size), then the regset's set function."""
    if note not in REGSETS:
        return RegsetResult(-EINVAL, f"note type {note:#x} is not an FP regset of "
                            "aarch64_regsets[]", t)
    n, size = REGSETS[note]
    name = NOTE_NAMES[note]
    if len(data) % size:
        return RegsetResult(-EINVAL, f"ptrace_regset: iov_len {len(data)} is not a multiple "
                            f"of {name}'s register size {size}", t)
    data = data[:n * size]
    if not regset_supported(caps, note):
        return RegsetResult(-EINVAL, f"{name}: the system lacks {_FEATURE_NAME[note]}", t)
    if note == NT_PRFPREG:
        return _fpr_set(t, data)
    if note in (NT_ARM_SVE, NT_ARM_SSVE):
        return _sve_set(caps, t, data, ARM64_VEC_SVE if note == NT_ARM_SVE else ARM64_VEC_SME)
    if note == NT_ARM_ZA:
        return _za_set(caps, t, data)
    if note == NT_ARM_ZT:
        return _zt_set(t, data)
    if note == NT_ARM_TLS:
        return _tls_set(caps, t, data)
    fpmr = bytearray(struct.pack("<Q", t.fpmr))  # fpmr_set(): a short write keeps the rest
    fpmr[:len(data)] = data
    return RegsetResult(0, "", replace(t, fpmr=struct.unpack("<Q", fpmr)[0]))


def _fpr_set(t: RegsetTarget, data: bytes, start: int = 0) -> RegsetResult:
    """__fpr_set() (a short write keeps the rest of the effective state), then for fpr_set()
    fpsimd_sync_to_effective_state_zeropad(); ``start``: where the payload begins."""
    state = bytearray(user_fpsimd_state(t))
    body = data[start:start + USER_FPSIMD_STATE_SIZE]
    state[:len(body)] = body
    vregs = bytes(state[:512])
    fpsr, fpcr = struct.unpack_from("<II", state, 512)
    t = replace(t, vregs=vregs, fpsr=fpsr, fpcr=fpcr)
    if t.fp_type == FP_STATE_SVE:
        t = replace(t, sve=_sve_from_vregs(vregs, t.live_vl))
    return RegsetResult(0, "", t)


def _sve_set(caps: HostCaps, t: RegsetTarget, data: bytes, kind: str) -> RegsetResult:
    """sve_set_common()."""
    name = "NT_ARM_SVE" if kind == ARM64_VEC_SVE else "NT_ARM_SSVE"
    if len(data) < USER_SVE_HEADER_SIZE:
        return RegsetResult(-EINVAL, f"{name}: {len(data)} bytes, less than the "
                            f"{USER_SVE_HEADER_SIZE}-byte user_sve_header", t)
    _size, _max_size, vl, _max_vl, flags, _ = struct.unpack_from("<IIHHHH", data)
    fpsimd = (flags & SVE_PT_REGS_MASK) == SVE_PT_REGS_FPSIMD
    if fpsimd and kind == ARM64_VEC_SME:
        return RegsetResult(-EINVAL, "NT_ARM_SSVE: streaming mode data must be in SVE format "
                            "(SVE_PT_REGS_SVE)", t)
    ret, t = vec_set_vector_length(caps, t, kind, vl, (flags & ~SVE_PT_REGS_MASK) << 16)
    if ret:
        why = (f"flags {flags:#x} beyond SVE_PT_REGS_SVE|VL_INHERIT|VL_ONEXEC"
               if flags & ~(SVE_PT_REGS_MASK | SVE_PT_VL_INHERIT | SVE_PT_VL_ONEXEC)
               else f"vl {vl} is not a multiple of 16 from 16 to 8192")
        return RegsetResult(ret, f"{name}: vec_set_vector_length: {why}", t)
    new_vl = t.vl(kind)
    vq = sve_vq_from_vl(new_vl)
    if caps.sme:  # enter or leave streaming mode
        t = replace(t, sm=kind == ARM64_VEC_SME)
    # "Always zero V regs, FPSR, and FPCR"
    t = replace(t, vregs=bytes(512), fpsr=0, fpcr=0)
    if fpsimd:
        t = replace(t, fp_type=FP_STATE_FPSIMD, sve=b"")
        return _fpr_set(t, data, USER_SVE_HEADER_SIZE)
    # sve_alloc(target, true) zeroed sve_state; no registers or full SVE from here.
    t = replace(t, fp_type=FP_STATE_SVE, sve=bytes(sve_regs_size(sve_vq_from_vl(t.live_vl))))
    payload = data[USER_SVE_HEADER_SIZE:]
    if payload and vq != sve_vq_from_vl(vl):
        return RegsetResult(-EIO, f"{name}: register data for vl {vl}, but the vl set is "
                            f"{new_vl}" + (" (VL_ONEXEC: the current vl is kept)"
                                           if flags & SVE_PT_VL_ONEXEC else ""), t)
    end = sve_ffr_offset(vq) + sve_ffr_size(vq)
    block = bytearray(t.sve)
    got = payload[:end]
    block[:len(got)] = got
    fpsr_at = sve_pt_fpsr_offset(vq)
    regs = bytearray(struct.pack("<II", 0, 0))
    tail = data[fpsr_at:fpsr_at + 8]
    regs[:len(tail)] = tail
    fpsr, fpcr = struct.unpack("<II", regs)
    return RegsetResult(0, "", replace(t, sve=bytes(block), fpsr=fpsr, fpcr=fpcr))


def _za_set(caps: HostCaps, t: RegsetTarget, data: bytes) -> RegsetResult:
    """za_set()."""
    if len(data) < USER_SVE_HEADER_SIZE:
        return RegsetResult(-EINVAL, f"NT_ARM_ZA: {len(data)} bytes, less than the "
                            f"{USER_SVE_HEADER_SIZE}-byte user_za_header", t)
    _size, _max_size, vl, _max_vl, flags, _ = struct.unpack_from("<IIHHHH", data)
    ret, t = vec_set_vector_length(caps, t, ARM64_VEC_SME, vl, flags << 16)
    if ret:
        why = (f"flags {flags:#x} beyond ZA_PT_VL_INHERIT|ZA_PT_VL_ONEXEC"
               if flags & ~(SVE_PT_VL_INHERIT | SVE_PT_VL_ONEXEC)
               else f"vl {vl} is not a multiple of 16 from 16 to 8192")
        return RegsetResult(ret, f"NT_ARM_ZA: vec_set_vector_length: {why}", t)
    vq = sve_vq_from_vl(t.sme_vl)
    if not t.za_on:  # sme_alloc(target, true): a fresh, zeroed ZA and ZT0
        t = replace(t, za=bytes(za_regs_size(vq)), zt0=bytes(ZT_SIG_REG_BYTES))
    payload = data[USER_SVE_HEADER_SIZE:]
    if not payload:  # no data: ZA off
        return RegsetResult(0, "", replace(t, za_on=False))
    if vq != sve_vq_from_vl(vl):
        return RegsetResult(-EIO, f"NT_ARM_ZA: register data for vl {vl}, but the SME vl set "
                            f"is {t.sme_vl}", t)
    za = bytearray(t.za or bytes(za_regs_size(vq)))
    got = payload[:za_regs_size(vq)]
    za[:len(got)] = got
    return RegsetResult(0, "", replace(t, za=bytes(za), za_on=True))


def _zt_set(t: RegsetTarget, data: bytes) -> RegsetResult:
    """zt_set(): with PSTATE.ZA off, ZA and ZT0 are allocated zeroed first; any write (even
    of no bytes) turns PSTATE.ZA on."""
    if not t.za_on:
        t = replace(t, za=bytes(za_regs_size(sve_vq_from_vl(t.sme_vl))),
                    zt0=bytes(ZT_SIG_REG_BYTES))
    zt = bytearray(t.zt0)
    zt[:len(data)] = data
    return RegsetResult(0, "", replace(t, zt0=bytes(zt), za_on=True))


def _tls_set(caps: HostCaps, t: RegsetTarget, data: bytes) -> RegsetResult:
    """tls_set(): the bytes written over (TPIDR_EL0, TPIDR2_EL0) from offset 0 -- a short
    write keeps the rest; without SME the second register is ignored."""
    tls = bytearray(struct.pack("<QQ", t.tpidr, t.tpidr2))
    tls[:len(data)] = data
    tpidr, tpidr2 = struct.unpack("<QQ", tls)
    return RegsetResult(0, "", replace(t, tpidr=tpidr, tpidr2=tpidr2 if caps.sme else t.tpidr2))


# --- the host model's tracee: the same functions on a Host's tokens ----------------------------
#
# The checker's host model (fpstate.kernel.arm64.state) holds a thread's registers as tokens
# per component, not bytes. These are the regset functions above on that model, for a tracer
# running `ptrace_getregset` / `ptrace_setregset` from a syscall on its CPU against a
# stopped tracee: what the tracer reads is an observation of the tracee's values (the
# invariants compare it with the tracee's latest), and what it writes is a new value of the
# tracee's (a fresh token of the tracee: it is the tracee's own register now). A debugger
# writes back a regset in the format and at the vector length it just read (the header's
# flags with VL_INHERIT as reported). tests/arm64/test_ptrace_host.py holds each against the
# byte-level functions above.

#: The components each regset carries (NT_ARM_SVE/SSVE: in SVE format).
REGSET_COMPONENTS: dict[int, tuple[str, ...]] = {
    NT_PRFPREG: (V, FPSR), NT_ARM_TLS: (TPIDR2,), NT_ARM_FPMR: (FPMR,),
    NT_ARM_SVE: (V, ZHI, P, FPSR), NT_ARM_SSVE: (V, ZHI, P, FPSR), NT_ARM_ZA: (ZA,),
    NT_ARM_ZT: (ZT0,),
}
_FEATURE = {NT_PRFPREG: "FP", NT_ARM_TLS: "SME", NT_ARM_FPMR: "FPMR", NT_ARM_SVE: "SVE",
            NT_ARM_SSVE: "SME", NT_ARM_ZA: "SME", NT_ARM_ZT: "SME2"}
#: What a tracee may be doing when a tracer reads or writes its regsets: stopped, so not on
#: a CPU -- a new task (PTRACE_O_TRACEFORK stops it before it first runs) or one that was
#: scheduled out (a ptrace stop is reached from the kernel, as any sleep).
TRACEE_MODES = (TASK_NEW, TASK_SLEEPING)


def host_regsets(caps: HostCaps) -> tuple[int, ...]:
    """The FP regsets a tracer can use on this host (NT_ARM_TLS only for TPIDR2_EL0, which
    needs SME: TPIDR_EL0 is not modelled)."""
    return tuple(n for n in REGSETS if regset_supported(caps, n)
                 and (n != NT_ARM_TLS or caps.sme))


def _tracee(host: Host, tracer_cpu: int, name: str) -> None:
    tracer = fpsimd.current_task(host, tracer_cpu)
    t = host.task(name)
    if t.name == tracer.name or t.mode not in TRACEE_MODES or t.killed:
        raise IllegalEvent("ptrace", t.mode, "regset",
                           f"{name} is not a stopped tracee of {tracer.name}")


def regset_values(host: Host, name: str, note: int) -> dict[str, Tok]:
    """What GETREGSET(``note``) of the stopped task ``name`` returns, as component values
    (`regset_get` on the host model): nothing from ZA and ZT0 with PSTATE.ZA off (a header, or
    zeros); V from Z in SVE format; the inactive NT_ARM_(S)SVE carries the FPSIMD payload
    (`_sve_get`: v6.17's header-only return does not fire)."""
    st = host.store(host.task(name).store)
    if note in (NT_ARM_SVE, NT_ARM_SSVE):
        active = (NT_ARM_SSVE if st.svcr & SVCR_SM else NT_ARM_SVE) == note
        if active and st.fp_type == FP_STATE_SVE:
            return {V: st.sve_v, ZHI: st.sve_zhi, P: st.sve_p, FPSR: st.fpsr}
    if note in (NT_PRFPREG, NT_ARM_SVE, NT_ARM_SSVE):  # __fpr_get()
        return {V: st.sve_v if st.fp_type == FP_STATE_SVE else st.vregs, FPSR: st.fpsr}
    if note in (NT_ARM_ZA, NT_ARM_ZT):
        if not st.svcr & SVCR_ZA:
            return {}
        return {ZA: st.za} if note == NT_ARM_ZA else {ZT0: st.zt0}
    if note == NT_ARM_TLS:
        return {TPIDR2: st.tpidr2}
    return {FPMR: st.fpmr}


def ptrace_getregset(host: Host, cpu: int, name: str, note: int) -> Host:
    """PTRACE_GETREGSET(``note``) of the stopped task ``name`` by current on ``cpu`` (in a
    syscall): the values read are observations of ``name``'s, which must be its latest."""
    _tracee(host, cpu, name)
    if not regset_supported(host.caps, note):
        raise IllegalEvent("ptrace", "regset", "get", f"{NOTE_NAMES[note]}: -EINVAL")
    return host.observe(*(Observation(name, comp, _FEATURE[note], "read", tok)
                          for comp, tok in regset_values(host, name, note).items()))


def ptrace_setregset(host: Host, cpu: int, name: str, note: int, *, flush: bool = True,
                     zero_tracer: bool = False, tif_sve_with_sme_only: bool = False,
                     vl: int | None = None, fpsimd_format: bool = False) -> Host:
    """PTRACE_SETREGSET(``note``) of the stopped task ``name`` by current on ``cpu``, with
    the data GETREGSET gave and every register in it changed to a new value: fpr_set(),
    sve_set_common() (SVE format, flags as read; for NT_ARM_SVE and NT_ARM_SSVE the header
    may name another VL, ``vl`` -- gdb's `set $vg` -- and NT_ARM_SVE may be written in
    FPSIMD format, ``fpsimd_format``), za_set() and zt_set() with data, fpmr_set(),
    tls_set() (TPIDR2_EL0). Each ends in fpsimd_flush_task_state(target) but tls_set(),
    whose register is switched eagerly.

    Rejected designs: ``flush`` False leaves the tracee's copy on a CPU valid (a setter
    without fpsimd_flush_task_state()); ``zero_tracer`` is sve_set_common() from v6.16 until
    5cbb61bf4168 ("arm64/fpsimd: ptrace: zero targets fpsimd_state, not the tracers"), which
    zeroed ``current->thread.uw.fpsimd_state`` -- the tracer's V0-V31, FPSR and FPCR in
    memory -- instead of the tracee's; ``tif_sve_with_sme_only`` is sve_set_common() from
    9f8bf718f292 (v6.16) until 128a7494a9f1 ("arm64/fpsimd: ptrace: Fix SVE writes on !SME
    systems", Jan 2026), which set TIF_SVE (and SVCR.SM) only on a system with SME: on one
    without, SVE-format state without TIF_SVE, which the next load WARNs about."""
    _tracee(host, cpu, name)
    caps = host.caps
    if note not in host_regsets(caps):
        raise IllegalEvent("ptrace", "regset", "set", f"{NOTE_NAMES[note]}: -EINVAL")
    host, tok = host.fresh(name)
    t = host.task(name)
    st = host.store(t.store)
    expect: dict[str, Tok] = {}
    if note == NT_PRFPREG:  # __fpr_set(), then fpsimd_sync_to_effective_state_zeropad()
        st = replace(st, vregs=tok, fpsr=tok)
        expect = {V: tok, FPSR: tok}
        if st.fp_type == FP_STATE_SVE:
            st = replace(st, sve_v=tok, sve_zhi=ZERO, sve_p=ZERO)
            expect.update({ZHI: ZERO, P: ZERO})
        host = host.with_store(t.store, st)
    elif note in (NT_ARM_SVE, NT_ARM_SSVE):
        host, expect = _sve_set_common(host, cpu, name, note, tok, zero_tracer,
                                       tif_sve_with_sme_only, vl, fpsimd_format)
    elif note in (NT_ARM_ZA, NT_ARM_ZT):
        if note == NT_ARM_ZA:
            host = _set_vl(host, cpu, name, ARM64_VEC_SME, None)
        za_on = bool(st.svcr & SVCR_ZA)
        host = fpsimd.sve_alloc(host, name, False)  # "SVE storage for streaming mode"
        if not za_on:  # sme_alloc(target, true): ZA and ZT0 zeroed
            host = fpsimd.sme_alloc(host, name, True)
            expect = {ZA: ZERO, ZT0: ZERO}
        comp = ZA if note == NT_ARM_ZA else ZT0
        st = host.store(t.store)
        host = host.with_store(t.store, replace(st, svcr=st.svcr | SVCR_ZA,
                                                **{comp.lower(): tok}))
        host = host.with_task(replace(host.task(name), tif_sme=True))
        expect[comp] = tok
    elif note == NT_ARM_FPMR:
        host = host.with_store(t.store, replace(st, fpmr=tok))
        expect = {FPMR: tok}
    else:  # tls_set(): thread.tpidr2_el0, loaded at the next switch to the thread
        return host.with_store(t.store, replace(st, tpidr2=tok)).expect(name, {TPIDR2: tok})
    if flush:
        host = fpsimd.fpsimd_flush_task_state(host, name)
    return host.expect(name, expect)


def _set_vl(host: Host, cpu: int, name: str, kind: str, vl: int | None) -> Host:
    """vec_set_vector_length() of the header a debugger writes: a VL other than the task's
    (one the CPU implements) changes it now (change_live_vector_length() on the stopped
    task: V kept, the other SVE state zeroed, ZA off for an SME VL); the flags hold VL_INHERIT
    as read, so the on-exec VL becomes the VL with INHERIT, else 0 (task_set_vl_onexec())."""
    t = host.task(name)
    if vl is not None and vl != (t.sve_vl if kind == ARM64_VEC_SVE else t.sme_vl):
        host = fpsimd.change_live_vector_length(host, cpu, kind, vl, task=name)
        t = host.task(name)
    if kind == ARM64_VEC_SVE:
        return host.with_task(replace(t, sve_vl_onexec=t.sve_vl if t.tif_sve_vl_inherit else 0))
    return host.with_task(replace(t, sme_vl_onexec=t.sme_vl if t.tif_sme_vl_inherit else 0))


def _sve_set_common(host: Host, cpu: int, name: str, note: int, tok: Tok,
                    zero_tracer: bool, tif_sve_with_sme_only: bool = False,
                    vl: int | None = None, fpsimd_format: bool = False
                    ) -> tuple[Host, dict[str, Tok]]:
    """sve_set_common() with a full register payload: the header's VL (``vl``, None: the
    task's own) through `_set_vl`, for NT_ARM_SSVE sme_alloc() keeping ZA/ZT0, then either
    SVE_PT_REGS_SVE data -- sve_alloc(target, true), SVCR.SM and TIF_SVE or TIF_SME, the
    tracee's uw.fpsimd_state zeroed, SVE format, Z (V and the bits above), P, FFR, FPSR and
    FPCR -- or, for NT_ARM_SVE with ``fpsimd_format`` (SVE_PT_REGS_FPSIMD), streaming mode
    left, TIF_SVE clear, FPSIMD format and V0-V31, FPSR and FPCR (__fpr_set()); the rest of
    Z, P and FFR then read as zero. NT_ARM_SSVE takes SVE format only (-EINVAL)."""
    kind = ARM64_VEC_SVE if note == NT_ARM_SVE else ARM64_VEC_SME
    if fpsimd_format and kind == ARM64_VEC_SME:
        raise IllegalEvent("ptrace", "regset", "set", "NT_ARM_SSVE: FPSIMD format: -EINVAL")
    host = _set_vl(host, cpu, name, kind, vl)
    t = host.task(name)
    vl = t.sve_vl if kind == ARM64_VEC_SVE else t.sme_vl
    if kind == ARM64_VEC_SME:
        host = fpsimd.sme_alloc(host, name, False)
    if not fpsimd_format:
        host = fpsimd.sve_alloc(host, name, True)
    st = host.store(t.store)
    svcr = st.svcr
    if host.caps.sme or not tif_sve_with_sme_only:  # enter or leave streaming mode
        svcr = svcr | SVCR_SM if kind == ARM64_VEC_SME else svcr & ~SVCR_SM
        t = replace(t, **({"tif_sve": True} if kind == ARM64_VEC_SVE else {"tif_sme": True}))
    zeroed = {"vregs": ZERO, "fpsr": ZERO}  # memset(&target->thread.uw.fpsimd_state)
    if zero_tracer:  # memset(&current->...): the tracee's are left as they were
        tracer = fpsimd.current_task(host, cpu)
        tst = host.store(tracer.store)
        host = host.with_store(tracer.store, replace(tst, **zeroed))
        zeroed = {}
        st = host.store(t.store)
    if fpsimd_format:  # clear TIF_SVE, FPSIMD format, then __fpr_set()
        st = replace(replace(st, **zeroed), svcr=svcr, fp_type=FP_STATE_FPSIMD, vregs=tok,
                     fpsr=tok)
        host = host.with_task(replace(t, tif_sve=False)).with_store(t.store, st)
        return host, {V: tok, FPSR: tok, ZHI: ZERO, P: ZERO}
    st = replace(replace(st, **zeroed), svcr=svcr, fp_type=FP_STATE_SVE, sve_v=tok,
                 sve_zhi=tok, sve_p=tok, fpsr=tok, sve_vl=vl)  # then the data
    host = host.with_task(t).with_store(t.store, st)
    return host, {V: tok, ZHI: tok, P: tok, FPSR: tok}


def ptrace_syscall(host: Host, cpu: int, op: Callable[[Host], Host], *,
                   sleeps: bool = False) -> Host:
    """The tracer's ptrace() system call around ``op(host)`` (a get or set above): syscall
    entry, then with ``sleeps`` a sleep before the regset access -- wait_task_inactive()
    or a page fault on the iovec -- during which its CPU idles in a state that loses FP
    context (cpu_pm_enter(): fpsimd_save_and_flush_cpu_state()), then the access and the
    return to user mode."""
    tracer = fpsimd.current_task(host, cpu).name
    host = entry_common.syscall_enter(host, cpu)
    if sleeps:
        host = fpsimd.schedule(host, cpu, None)
        host = fpsimd.fpsimd_save_and_flush_cpu_state(host, cpu)
        host = fpsimd.schedule(host, cpu, tracer)
    host = op(host)
    obs = host.obs
    host = entry_common.syscall_exit(host, cpu)
    return host.observe(*obs) if obs else host


__all__ = [
    "NOTE_NAMES",
    "NT_ARM_FPMR",
    "NT_ARM_SSVE",
    "NT_ARM_SVE",
    "NT_ARM_TLS",
    "NT_ARM_ZA",
    "NT_ARM_ZT",
    "NT_PRFPREG",
    "REGSETS",
    "REGSET_COMPONENTS",
    "TRACEE_MODES",
    "RegsetResult",
    "RegsetTarget",
    "effective_vregs",
    "host_regsets",
    "ptrace_getregset",
    "ptrace_setregset",
    "ptrace_syscall",
    "regset_get",
    "regset_set",
    "regset_supported",
    "regset_values",
    "user_fpsimd_state",
    "vec_set_vector_length",
]
