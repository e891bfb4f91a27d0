"""Where each arm64 register sits in the kernel's user ABI at a vector length: the layout table
of ``fpstate layout --arch arm64``.

Offsets are those of the uapi macros (arch/arm64/include/uapi/asm/ptrace.h and
sigcontext.h, v6.17): in an NT_ARM_SVE / NT_ARM_SSVE regset (SVE_PT_SVE_*_OFFSET, from the
start of struct user_sve_header), in a signal frame's sve_context (SVE_SIG_*_OFFSET, from the
start of the record), in NT_ARM_ZA and za_context (ZA_PT_ZAV_OFFSET, ZA_SIG_ZAV_OFFSET), and
for ZT0 in NT_ARM_ZT and zt_context. FPSR and FPCR have no place in sve_context: a frame keeps
them in fpsimd_context.
"""

from __future__ import annotations

from dataclasses import dataclass

from fpstate.arm64.regs import (
    SVE_NUM_PREGS,
    SVE_NUM_ZREGS,
    SVE_PT_REGS_SVE,
    USER_SVE_HEADER_SIZE,
    ZT_SIG_REG_BYTES,
    sve_ffr_offset,
    sve_preg_offset,
    sve_preg_size,
    sve_pt_fpsr_offset,
    sve_pt_size,
    sve_regs_size,
    sve_vl_valid,
    sve_vq_from_vl,
    sve_zreg_offset,
    za_pt_size,
)

#: SVE_SIG_REGS_OFFSET / ZA_SIG_REGS_OFFSET / ZT_SIG_REGS_OFFSET: the payload of sve_context,
#: za_context and zt_context starts 16 bytes into the record.
SIG_REGS_OFFSET = 16
#: Where fpsimd_context keeps FPSR and FPCR (after its 8-byte _aarch64_ctx head).
FPSIMD_CONTEXT_FPSR = 8


@dataclass(frozen=True, slots=True)
class Row:
    """One register (or a structure's header or total): its offset in the regset, in the
    signal-frame record (None: not there), and its size."""

    group: str
    name: str
    regset: int | None
    sigframe: int | None
    size: int
    where: str = ""  #: the macro or record that places it


def fpsimd_rows() -> list[Row]:
    """NT_PRFPREG (struct user_fpsimd_state) beside fpsimd_context: every CPU's base."""
    g = "FPSIMD"
    rows = [Row(g, f"V{n}", 16 * n, 16 + 16 * n, 16, "user_fpsimd_state.vregs / "
                "fpsimd_context.vregs") for n in (0, 1, 31)]
    rows.append(Row(g, "FPSR", 512, FPSIMD_CONTEXT_FPSR, 4, "fpsr"))
    rows.append(Row(g, "FPCR", 516, FPSIMD_CONTEXT_FPSR + 4, 4, "fpcr"))
    rows.append(Row(g, "total", 528, 528, 0, "sizeof(struct user_fpsimd_state) / "
                    "sizeof(struct fpsimd_context)"))
    return rows


def sve_rows(vl: int, streaming: bool = False) -> list[Row]:
    """NT_ARM_SVE (SVE_PT_REGS_SVE) beside sve_context at ``vl`` bytes; ``streaming``: the
    same layout as NT_ARM_SSVE and a streaming-mode sve_context at the SVL."""
    if not sve_vl_valid(vl):
        raise ValueError(f"vl {vl} is not a vector length (a multiple of 16 from 16 to 8192)")
    vq = sve_vq_from_vl(vl)
    h = USER_SVE_HEADER_SIZE
    g = f"streaming SVE at SVL {vl}" if streaming else f"SVE at vl {vl}"
    rows = [Row(g, "header", 0, 0, h, "user_sve_header / sve_context head")]
    for n in (0, 1, SVE_NUM_ZREGS - 1):
        off = sve_zreg_offset(vq, n)
        rows.append(Row(g, f"Z{n}", h + off, SIG_REGS_OFFSET + off, vl, "SVE_*_ZREG_OFFSET"))
    for n in (0, 1, SVE_NUM_PREGS - 1):
        off = sve_preg_offset(vq, n)
        rows.append(Row(g, f"P{n}", h + off, SIG_REGS_OFFSET + off, sve_preg_size(vq),
                        "SVE_*_PREG_OFFSET"))
    off = sve_ffr_offset(vq)
    rows.append(Row(g, "FFR", h + off, SIG_REGS_OFFSET + off, sve_preg_size(vq),
                    "SVE_*_FFR_OFFSET"))
    fpsr = sve_pt_fpsr_offset(vq)
    rows.append(Row(g, "FPSR", fpsr, None, 4, "SVE_PT_SVE_FPSR_OFFSET; fpsimd_context+8 in a "
                    "frame"))
    rows.append(Row(g, "FPCR", fpsr + 4, None, 4, "SVE_PT_SVE_FPCR_OFFSET; fpsimd_context+12"))
    rows.append(Row(g, "total", sve_pt_size(vq, SVE_PT_REGS_SVE),
                    SIG_REGS_OFFSET + sve_regs_size(vq), 0,
                    "SVE_PT_SIZE(vq, SVE_PT_REGS_SVE) / SVE_SIG_CONTEXT_SIZE(vq); the record's "
                    "head.size is it rounded up to 16"))
    return rows


def za_rows(svl: int, sme2: bool = True) -> list[Row]:
    """NT_ARM_ZA beside za_context at SVL ``svl`` bytes, and ZT0 (SME2)."""
    if not sve_vl_valid(svl):
        raise ValueError(f"vl {svl} is not a vector length (a multiple of 16 from 16 to 8192)")
    vq = sve_vq_from_vl(svl)
    g = f"ZA at SVL {svl}"
    h = USER_SVE_HEADER_SIZE
    rows = [Row(g, "header", 0, 0, h, "user_za_header / za_context head")]
    for n in (0, 1, svl - 1):
        rows.append(Row(g, f"ZA[{n}]", h + n * svl, SIG_REGS_OFFSET + n * svl, svl,
                        "ZA_PT_ZAV_OFFSET / ZA_SIG_ZAV_OFFSET"))
    rows.append(Row(g, "total", za_pt_size(vq), SIG_REGS_OFFSET + svl * svl, 0,
                    "ZA_PT_SIZE(vq) / ZA_SIG_CONTEXT_SIZE(vq)"))
    if sme2:
        rows.append(Row("ZT0", "ZT0", 0, SIG_REGS_OFFSET, ZT_SIG_REG_BYTES,
                        "NT_ARM_ZT / zt_context (ZT_SIG_REGS_OFFSET)"))
        rows.append(Row("ZT0", "total", ZT_SIG_REG_BYTES, SIG_REGS_OFFSET + ZT_SIG_REG_BYTES, 0,
                        "ZT_SIG_CONTEXT_SIZE(1)"))
    return rows


__all__ = ["FPSIMD_CONTEXT_FPSR", "SIG_REGS_OFFSET", "Row", "fpsimd_rows", "sve_rows",
           "za_rows"]
