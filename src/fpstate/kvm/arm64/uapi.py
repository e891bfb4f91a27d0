"""KVM/arm64 register ids: arch/arm64/include/uapi/asm/kvm.h and include/uapi/linux/kvm.h.

A one_reg id is ``KVM_REG_ARM64 | KVM_REG_SIZE_Uxxx | <coprocessor> | <index>``.  Core
registers are indexed by their offset in ``struct kvm_regs`` in 32-bit words: the FP part,
``fp_regs`` (struct user_fpsimd_state, 16-byte aligned), starts at byte 336 = word 0x54
(user_pt_regs is 272 bytes, then sp_el1, elr_el1 and spsr[5]).
"""

from __future__ import annotations

KVM_REG_ARM64 = 0x6000000000000000
KVM_REG_ARCH_MASK = 0xFF00000000000000
KVM_REG_SIZE_SHIFT = 52
KVM_REG_SIZE_MASK = 0x00F0000000000000
KVM_REG_SIZE_U32 = 0x0020000000000000
KVM_REG_SIZE_U64 = 0x0030000000000000
KVM_REG_SIZE_U128 = 0x0040000000000000
KVM_REG_SIZE_U256 = 0x0050000000000000
KVM_REG_SIZE_U512 = 0x0060000000000000
KVM_REG_SIZE_U2048 = 0x0080000000000000

KVM_REG_ARM_COPROC_MASK = 0x000000000FFF0000
KVM_REG_ARM_COPROC_SHIFT = 16
KVM_REG_ARM_CORE = 0x0010 << KVM_REG_ARM_COPROC_SHIFT
KVM_REG_ARM64_SYSREG = 0x0013 << KVM_REG_ARM_COPROC_SHIFT
KVM_REG_ARM64_SVE = 0x15 << KVM_REG_ARM_COPROC_SHIFT

KVM_REG_ARM64_SVE_ZREG_BASE = 0
KVM_REG_ARM64_SVE_PREG_BASE = 0x400
KVM_REG_ARM64_SVE_FFR_BASE = 0x600
KVM_ARM64_SVE_NUM_ZREGS = 32
KVM_ARM64_SVE_NUM_PREGS = 16
KVM_ARM64_SVE_MAX_SLICES = 32
KVM_ARM64_SVE_VQ_MIN = 1
KVM_ARM64_SVE_VQ_MAX = 512
KVM_ARM64_SVE_VLS_WORDS = (KVM_ARM64_SVE_VQ_MAX - KVM_ARM64_SVE_VQ_MIN) // 64 + 1   #: 8
KVM_REG_ARM64_SVE_VLS = KVM_REG_ARM64 | KVM_REG_ARM64_SVE | KVM_REG_SIZE_U512 | 0xFFFF

KVM_ARM_VCPU_SVE = 4   #: struct kvm_vcpu_init features[] bit

# struct kvm_regs byte offsets (uapi): regs (user_pt_regs, 272), sp_el1, elr_el1, spsr[5]
KVM_REGS_FP_REGS_OFFSET = 336
CORE_VREG0 = KVM_REGS_FP_REGS_OFFSET // 4          #: 0x54
CORE_FPSR = (KVM_REGS_FP_REGS_OFFSET + 512) // 4   #: 0xd4
CORE_FPCR = CORE_FPSR + 1                          #: 0xd5


def kvm_reg_size(reg_id: int) -> int:
    """KVM_REG_SIZE(id): bytes of the register."""
    return 1 << ((reg_id & KVM_REG_SIZE_MASK) >> KVM_REG_SIZE_SHIFT)


def core_vreg(n: int) -> int:
    """KVM_REG_ARM_CORE_REG(fp_regs.vregs[n]), U128."""
    assert 0 <= n < 32
    return KVM_REG_ARM64 | KVM_REG_SIZE_U128 | KVM_REG_ARM_CORE | (CORE_VREG0 + 4 * n)


CORE_FPSR_ID = KVM_REG_ARM64 | KVM_REG_SIZE_U32 | KVM_REG_ARM_CORE | CORE_FPSR
CORE_FPCR_ID = KVM_REG_ARM64 | KVM_REG_SIZE_U32 | KVM_REG_ARM_CORE | CORE_FPCR


def arm64_sys_reg(op0: int, op1: int, crn: int, crm: int, op2: int) -> int:
    """ARM64_SYS_REG(): a 64-bit system register's one_reg id."""
    return (KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM64_SYSREG | (op0 << 14) | (op1 << 11)
            | (crn << 7) | (crm << 3) | op2)


def sve_zreg(n: int, i: int = 0) -> int:
    """KVM_REG_ARM64_SVE_ZREG(n, i): 2048-bit slice i of Zn."""
    return (KVM_REG_ARM64 | KVM_REG_ARM64_SVE | KVM_REG_ARM64_SVE_ZREG_BASE | KVM_REG_SIZE_U2048
            | ((n & (KVM_ARM64_SVE_NUM_ZREGS - 1)) << 5) | (i & (KVM_ARM64_SVE_MAX_SLICES - 1)))


def sve_preg(n: int, i: int = 0) -> int:
    """KVM_REG_ARM64_SVE_PREG(n, i): 256-bit slice i of Pn."""
    return (KVM_REG_ARM64 | KVM_REG_ARM64_SVE | KVM_REG_ARM64_SVE_PREG_BASE | KVM_REG_SIZE_U256
            | ((n & (KVM_ARM64_SVE_NUM_PREGS - 1)) << 5) | (i & (KVM_ARM64_SVE_MAX_SLICES - 1)))


def sve_ffr(i: int = 0) -> int:
    """KVM_REG_ARM64_SVE_FFR(i)."""
    return (KVM_REG_ARM64 | KVM_REG_ARM64_SVE | KVM_REG_ARM64_SVE_FFR_BASE | KVM_REG_SIZE_U256
            | (i & (KVM_ARM64_SVE_MAX_SLICES - 1)))


def vls_from_vqs(vqs: frozenset[int] | set[int]) -> tuple[int, ...]:
    """The 8 u64 words of KVM_REG_ARM64_SVE_VLS for a set of VQs (bit vq-1)."""
    words = [0] * KVM_ARM64_SVE_VLS_WORDS
    for vq in vqs:
        words[(vq - KVM_ARM64_SVE_VQ_MIN) // 64] |= 1 << ((vq - KVM_ARM64_SVE_VQ_MIN) % 64)
    return tuple(words)


def vqs_from_vls(words: tuple[int, ...]) -> frozenset[int]:
    return frozenset(vq for vq in range(KVM_ARM64_SVE_VQ_MIN, KVM_ARM64_SVE_VQ_MAX + 1)
                     if words[(vq - 1) // 64] >> ((vq - 1) % 64) & 1)
