"""arm64 FP register state: FPSIMD, SVE, SME (streaming mode, ZA, ZT0, SVCR) and FPMR.

Models the architectural register file (Arm ARM, DDI0487 / DDI0616 / DDI0601) and the
memory layouts the kernel uses for it, from Linux ``arch/arm64/include/uapi/asm/
sve_context.h``, ``sigcontext.h`` and ``ptrace.h`` (v6.17).  Everything byte-exact in the
kernel ABI is byte-exact here: `user_fpsimd_state` is 528 bytes, the SVE register block at a
vector length is ``__SVE_FFR_OFFSET(vq) + __SVE_FFR_SIZE(vq)`` bytes, ZA is ``(vq*16)**2``.

Theory of operation
-------------------
The host and KVM models do not move bytes around: what matters for ownership is *whose*
value a register holds.  A register group therefore holds a `Tok` (the context that wrote
it and a generation number).  ``ZERO`` and ``FPSR_STREAMING`` are architectural values that
no context wrote; every context may observe them.  The groups (`COMPONENTS`) follow the way
the architecture and the kernel split the state:

* ``V``    V0-V31, i.e. Z0-Z31 bits [127:0] (an AdvSIMD write zeroes Zn bits [VL-1:128]).
* ``ZHI``  Z0-Z31 bits [VL-1:128].
* ``P``    P0-P15 and FFR.
* ``FPSR`` FPSR and FPCR (the kernel always keeps them in ``user_fpsimd_state``).
* ``FPMR`` FEAT_FPMR's FP8 mode register.
* ``ZA``   the SME ZA array; ``ZT0`` the SME2 lookup table register.
* ``TPIDR2`` SME's TPIDR2_EL0, the pointer of the ZA lazy-saving scheme (switched with the
  thread's TLS registers, not with the FP state).
SVCR.SM and SVCR.ZA are plain bits.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from fpstate.arm64.statemachine import replace

# --- sve_context.h ---------------------------------------------------------------------
SVE_VQ_BYTES = 16            #: __SVE_VQ_BYTES: bytes per quadword
SVE_VQ_MIN = 1
SVE_VQ_MAX = 512             #: yes, 512 quadwords (forward portability, sve_context.h)
SVE_VL_MIN = SVE_VQ_MIN * SVE_VQ_BYTES
SVE_VL_MAX = SVE_VQ_MAX * SVE_VQ_BYTES
SVE_NUM_ZREGS = 32
SVE_NUM_PREGS = 16
#: arch/arm64/include/asm/fpsimd.h VL_ARCH_MAX: 2048 bits, the architectural SVE maximum.
VL_ARCH_MAX = 0x100

#: SVCR bits (Arm ARM D19: SVCR.SM is bit 0, SVCR.ZA is bit 1).
SVCR_SM = 1 << 0
SVCR_ZA = 1 << 1
#: FPSR after entering or leaving Streaming SVE mode: IOC, DZC, OFC, UFC, IXC, IDC and QC
#: set, the rest zero (Arm ARM C5.2.10; the kernel's task_smstop_sm() writes 0x0800009f).
FPSR_SMSTOP = 0x0800009F
#: ZT0 is 512 bits (SME2).  ZT_SIG_REG_SIZE is 512 (bits) and ZT_SIG_REG_BYTES 64.
ZT_SIG_REG_SIZE = 512
ZT_SIG_REG_BYTES = ZT_SIG_REG_SIZE // 8


def sve_vl_valid(vl: int) -> bool:
    """__sve_vl_valid(): a multiple of 16 bytes between SVE_VL_MIN and SVE_VL_MAX."""
    return vl % SVE_VQ_BYTES == 0 and SVE_VL_MIN <= vl <= SVE_VL_MAX


def sve_vq_from_vl(vl: int) -> int:
    """__sve_vq_from_vl(): vector length in bytes -> quadwords."""
    return vl // SVE_VQ_BYTES


def sve_vl_from_vq(vq: int) -> int:
    """__sve_vl_from_vq(): quadwords -> vector length in bytes."""
    return vq * SVE_VQ_BYTES


# The __SVE_* layout of Z0-31, P0-15 and FFR at a vector length (sve_context.h).  The same
# block is the payload of the signal frame's sve_context, of NT_ARM_SVE and of a task's or a
# vCPU's sve_state buffer.
def sve_zreg_size(vq: int) -> int:
    return vq * SVE_VQ_BYTES


def sve_preg_size(vq: int) -> int:
    return vq * (SVE_VQ_BYTES // 8)


def sve_ffr_size(vq: int) -> int:
    return sve_preg_size(vq)


def sve_zreg_offset(vq: int, n: int) -> int:
    return sve_zreg_size(vq) * n


def sve_zregs_size(vq: int) -> int:
    return sve_zreg_offset(vq, SVE_NUM_ZREGS)


def sve_pregs_offset(vq: int) -> int:
    return sve_zregs_size(vq)


def sve_preg_offset(vq: int, n: int) -> int:
    return sve_pregs_offset(vq) + sve_preg_size(vq) * n


def sve_pregs_size(vq: int) -> int:
    return sve_preg_offset(vq, SVE_NUM_PREGS) - sve_pregs_offset(vq)


def sve_ffr_offset(vq: int) -> int:
    return sve_pregs_offset(vq) + sve_pregs_size(vq)


def sve_regs_size(vq: int) -> int:
    """SVE_SIG_REGS_SIZE(vq): bytes of Z0-31, P0-15 and FFR at VQ (vq=0 gives 0)."""
    return sve_ffr_offset(vq) + sve_ffr_size(vq)


def za_regs_size(vq: int) -> int:
    """ZA_SIG_REGS_SIZE(vq): ZA is SVL x SVL bytes."""
    return (vq * SVE_VQ_BYTES) * (vq * SVE_VQ_BYTES)


# --- struct user_fpsimd_state (uapi/asm/ptrace.h): vregs[32] (u128), fpsr, fpcr, __reserved[2]
USER_FPSIMD_STATE_SIZE = 32 * 16 + 4 + 4 + 2 * 4
FPSIMD_VREGS_OFFSET = 0
FPSIMD_FPSR_OFFSET = 512
FPSIMD_FPCR_OFFSET = 516
_U128 = (1 << 128) - 1


def pack_user_fpsimd_state(vregs: tuple[int, ...], fpsr: int, fpcr: int) -> bytes:
    """The 528 bytes of struct user_fpsimd_state (little-endian host, reserved words 0)."""
    assert len(vregs) == 32 and all(0 <= v <= _U128 for v in vregs)
    body = b"".join(v.to_bytes(16, "little") for v in vregs)
    return body + struct.pack("<IIII", fpsr, fpcr, 0, 0)


def unpack_user_fpsimd_state(blob: bytes) -> tuple[tuple[int, ...], int, int]:
    """Inverse of `pack_user_fpsimd_state`: (vregs, fpsr, fpcr)."""
    assert len(blob) >= USER_FPSIMD_STATE_SIZE
    vregs = tuple(int.from_bytes(blob[i * 16:(i + 1) * 16], "little") for i in range(32))
    fpsr, fpcr = struct.unpack_from("<II", blob, FPSIMD_FPSR_OFFSET)
    return vregs, fpsr, fpcr


# --- ptrace regsets (uapi/asm/ptrace.h): NT_ARM_SVE / NT_ARM_SSVE, NT_ARM_ZA -----------------
USER_SVE_HEADER_SIZE = 16          #: struct user_sve_header / user_za_header
SVE_PT_REGS_FPSIMD, SVE_PT_REGS_SVE = 0, 1
SVE_PT_VL_INHERIT, SVE_PT_VL_ONEXEC = (1 << 17) >> 16, (1 << 18) >> 16


def round16(n: int) -> int:
    """The kernel's round_up(n, 16) / ALIGN(n, SVE_VQ_BYTES): the uapi sizes are multiples of
    16 bytes."""
    return (n + 15) & ~15


def sve_pt_fpsr_offset(vq: int) -> int:
    """SVE_PT_SVE_FPSR_OFFSET(vq): after FFR, 16-byte aligned (FPCR follows at +4)."""
    return round16(USER_SVE_HEADER_SIZE + sve_ffr_offset(vq) + sve_ffr_size(vq))


def sve_pt_size(vq: int, flags: int) -> int:
    """SVE_PT_SIZE(vq, flags): header plus the SVE payload (Z, P, FFR, FPSR, FPCR) or the
    user_fpsimd_state payload."""
    if flags & SVE_PT_REGS_SVE:
        body = sve_pt_fpsr_offset(vq) + 4 + 4 - USER_SVE_HEADER_SIZE
        return USER_SVE_HEADER_SIZE + round16(body)
    return USER_SVE_HEADER_SIZE + USER_FPSIMD_STATE_SIZE


def za_pt_size(vq: int) -> int:
    """ZA_PT_SIZE(vq): header plus ZA (vq=0: header only, ZA disabled)."""
    return USER_SVE_HEADER_SIZE + za_regs_size(vq)


# --- system register encodings (Arm ARM; Linux sys_reg()) ---------------------------------
@dataclass(frozen=True, slots=True)
class SysRegEnc:
    """A system register's (op0, op1, CRn, CRm, op2) encoding."""

    name: str
    op0: int
    op1: int
    crn: int
    crm: int
    op2: int

    @property
    def sys_reg(self) -> int:
        """Linux sys_reg(): op0<<19 | op1<<16 | CRn<<12 | CRm<<8 | op2<<5."""
        return (self.op0 << 19) | (self.op1 << 16) | (self.crn << 12) | (self.crm << 8) | (
            self.op2 << 5)


FP_SYSREGS: dict[str, SysRegEnc] = {r.name: r for r in (
    SysRegEnc("FPCR", 3, 3, 4, 4, 0),
    SysRegEnc("FPSR", 3, 3, 4, 4, 1),
    SysRegEnc("FPMR", 3, 3, 4, 4, 2),
    SysRegEnc("ZCR_EL1", 3, 0, 1, 2, 0),
    SysRegEnc("SMPRI_EL1", 3, 0, 1, 2, 4),
    SysRegEnc("SMCR_EL1", 3, 0, 1, 2, 6),
    SysRegEnc("SVCR", 3, 3, 4, 2, 2),
    SysRegEnc("SMIDR_EL1", 3, 1, 0, 0, 6),
    SysRegEnc("TPIDR2_EL0", 3, 3, 13, 0, 5),
    SysRegEnc("ZCR_EL2", 3, 4, 1, 2, 0),
    SysRegEnc("HCRX_EL2", 3, 4, 1, 2, 2),
    SysRegEnc("FPEXC32_EL2", 3, 4, 5, 3, 0),
)}


# --- register contents as ownership tokens -------------------------------------------------
@dataclass(frozen=True, slots=True, order=True)
class Tok:
    """A register group's value: which context wrote it (``""``: architectural) and when."""

    writer: str
    gen: int

    @property
    def architectural(self) -> bool:
        return self.writer == ""

    def __str__(self) -> str:
        return f"arch#{self.gen:#x}" if not self.writer else f"{self.writer}#{self.gen}"


ZERO = Tok("", 0)
FPSR_STREAMING = Tok("", FPSR_SMSTOP)

V, ZHI, P, FPSR, FPMR, ZA, ZT0 = "V", "ZHI", "P", "FPSR", "FPMR", "ZA", "ZT0"
TPIDR2 = "TPIDR2"
COMPONENTS: tuple[str, ...] = (V, ZHI, P, FPSR, FPMR, ZA, ZT0, TPIDR2)
#: The FpRegs field of each component (FpRegs.get/put).
_FIELD_OF: dict[str, str] = {c: c.lower() for c in COMPONENTS}
#: The feature each component belongs to (what must be advertised to expose it).
COMPONENT_FEATURE: dict[str, str] = {
    V: "FP", ZHI: "SVE", P: "SVE", FPSR: "FP", FPMR: "FPMR", ZA: "SME", ZT0: "SME2",
    TPIDR2: "SME"}


@dataclass(frozen=True, slots=True)
class FpRegs:
    """The FP register file of one physical CPU (what the hardware holds right now).

    ``zcr_len``/``zcr_limit`` are the LEN fields that select the effective SVE vector length:
    the one the running context asked for (ZCR_EL1, or the kernel's sve_set_vq()) and the
    ceiling imposed from above (ZCR_EL2 while a guest runs).  `effective_vl` applies the
    architecture's rule: the largest implemented VL not above the request and the ceiling.
    """

    v: Tok = ZERO
    zhi: Tok = ZERO
    p: Tok = ZERO
    fpsr: Tok = ZERO
    fpmr: Tok = ZERO
    za: Tok = ZERO
    zt0: Tok = ZERO
    tpidr2: Tok = ZERO
    sm: bool = False
    za_on: bool = False
    zcr_len: int = 0
    zcr_limit: int = 15
    smcr_len: int = 0

    def get(self, comp: str) -> Tok:
        return getattr(self, _FIELD_OF.get(comp) or comp.lower())

    def put(self, **values: Tok) -> FpRegs:
        return replace(self, **{_FIELD_OF.get(k) or k.lower(): v for k, v in values.items()})

    @property
    def svcr(self) -> int:
        return (SVCR_SM if self.sm else 0) | (SVCR_ZA if self.za_on else 0)


def effective_vq(requested_len: int, limit_len: int, vqs: frozenset[int]) -> int:
    """The VQ the PE uses for ZCR/SMCR LEN values: the largest implemented VQ not above
    min(LEN, limit)+1 (Arm ARM: 'the Effective ... vector length').  0 if none (no SVE)."""
    cap = min(requested_len, limit_len) + 1
    fitting = [vq for vq in vqs if vq <= cap]
    return max(fitting) if fitting else (min(vqs) if vqs else 0)


def smstart(regs: FpRegs, sm: bool, za: bool) -> FpRegs:
    """SMSTART {SM,ZA}: entering streaming mode zeroes Z, P, FFR, sets FPSR to FPSR_SMSTOP
    and sets FPMR to zero (DDI0601 FPMR: zeroed on entry to and exit from Streaming SVE mode;
    the kernel relies on it in task_smstop_sm() and writes FPMR after SVCR in
    task_fpsimd_load()); enabling ZA zeroes ZA and ZT0 (Arm ARM, SME, 'PSTATE.SM/ZA
    changes')."""
    if sm and not regs.sm:
        regs = replace(regs, v=ZERO, zhi=ZERO, p=ZERO, fpsr=FPSR_STREAMING, fpmr=ZERO, sm=True)
    if za and not regs.za_on:
        regs = replace(regs, za=ZERO, zt0=ZERO, za_on=True)
    return regs


def smstop(regs: FpRegs, sm: bool, za: bool) -> FpRegs:
    """SMSTOP {SM,ZA}: leaving streaming mode zeroes Z, P, FFR and FPMR and sets FPSR to
    FPSR_SMSTOP; disabling ZA leaves nothing observable (ZA is zeroed when next enabled)."""
    if sm and regs.sm:
        regs = replace(regs, v=ZERO, zhi=ZERO, p=ZERO, fpsr=FPSR_STREAMING, fpmr=ZERO, sm=False)
    if za and regs.za_on:
        regs = replace(regs, za=ZERO, zt0=ZERO, za_on=False)
    return regs
