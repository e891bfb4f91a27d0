"""KVM/arm64 one_reg access to FP state: arch/arm64/kvm/guest.c (v6.17).

* Core registers: V0-V31 (U128) and FPSR/FPCR (U32) of ``struct kvm_regs.fp_regs``.  The V
  registers are rejected with -EINVAL on an SVE vCPU (core_reg_size_from_offset()): the
  KVM_REG_ARM64_SVE registers must be used, and they are not listed.
* SVE registers (SVE vCPUs only, else -ENOENT): KVM_REG_ARM64_SVE_VLS (before finalize only,
  -EPERM after; the VQ set must equal the host's up to its maximum and not exceed
  kvm_sve_max_vl, -EINVAL), Z0-31/P0-15/FFR slice 0 (slices > 0 -ENOENT; -EPERM before
  finalize), laid out for the vCPU's maximum VL; bytes beyond it read as zero.
* KVM_GET_REG_LIST: -ENOEXEC before KVM_ARM_VCPU_INIT, -EPERM before finalize; core, then
  SVE (VLS first so that a restore in list order works), then system registers.

Only the FP part of the register list is modelled (no GP, timer, firmware registers).
"""

from __future__ import annotations

import errno

from fpstate.arm64.regs import (
    FPSR,
    ZHI,
    P,
    Tok,
    V,
    sve_preg_offset,
    sve_preg_size,
    sve_vl_from_vq,
    sve_vq_from_vl,
    sve_zreg_offset,
    sve_zreg_size,
)
from fpstate.arm64.statemachine import IllegalEvent, replace
from fpstate.kernel.arm64.state import Observation
from fpstate.kvm.arm64.kvm_host import VCPU_OUT, KvmWorld, Vcpu, vcpu_has_sve
from fpstate.kvm.arm64.reset import (
    kvm_arm_vcpu_finalize,
    kvm_arm_vcpu_is_finalized,
    kvm_sve_max_vl,
)
from fpstate.kvm.arm64.sys_regs import (
    SYS_REG_DESCS,
    kvm_sys_reg_get_user,
    kvm_sys_reg_set_user,
    sysreg_one_reg_id,
    walk_sys_regs,
)
from fpstate.kvm.arm64.uapi import (
    CORE_FPCR,
    CORE_FPCR_ID,
    CORE_FPSR,
    CORE_FPSR_ID,
    CORE_VREG0,
    KVM_REG_ARCH_MASK,
    KVM_REG_ARM64,
    KVM_REG_ARM64_SVE,
    KVM_REG_ARM64_SVE_VLS,
    KVM_REG_ARM_COPROC_MASK,
    KVM_REG_ARM_CORE,
    KVM_REG_SIZE_MASK,
    KVM_REGS_FP_REGS_OFFSET,
    core_vreg,
    kvm_reg_size,
    sve_ffr,
    sve_preg,
    sve_zreg,
    vls_from_vqs,
    vqs_from_vls,
)

Value = Tok | int | tuple | None
#: sizeof(struct kvm_regs) / sizeof(__u32): fp_regs (528 bytes) ends the structure.
NR_CORE_REGS = (KVM_REGS_FP_REGS_OFFSET + 528) // 4
_SYSREG_BY_ID = {sysreg_one_reg_id(d.name): d.name for d in SYS_REG_DESCS}


def reg_name(reg_id: int) -> str:
    """A readable name for an FP one_reg id."""
    if reg_id == KVM_REG_ARM64_SVE_VLS:
        return "KVM_REG_ARM64_SVE_VLS"
    if reg_id in _SYSREG_BY_ID:
        return _SYSREG_BY_ID[reg_id]
    coproc = reg_id & KVM_REG_ARM_COPROC_MASK
    low = reg_id & 0xFFFF
    if coproc == KVM_REG_ARM_CORE:
        if low == CORE_FPSR:
            return "FPSR"
        if low == CORE_FPCR:
            return "FPCR"
        if CORE_VREG0 <= low < CORE_FPSR and (low - CORE_VREG0) % 4 == 0:
            return f"V{(low - CORE_VREG0) // 4}"
    if coproc == KVM_REG_ARM64_SVE:
        n, sl = (low >> 5) & 0x1F, low & 0x1F
        if low < 0x400:
            kind = f"Z{n}"
        elif low < 0x600:
            kind = f"P{n & 0xF}"
        else:
            kind = "FFR"
        return kind if sl == 0 else f"{kind}[slice {sl}]"
    return f"{reg_id:#018x}"


def _check_ioctl(world: KvmWorld, ctx: str, ioctl: str) -> Vcpu:
    vcpu = world.vcpu(ctx)
    if vcpu.run != VCPU_OUT:
        raise IllegalEvent("vcpu-run", vcpu.run, ioctl, "the VMM thread is inside KVM_RUN")
    return vcpu


# --- core registers ---------------------------------------------------------------------------
def core_reg_size_from_offset(world: KvmWorld, vcpu: Vcpu, off: int) -> int:
    """core_reg_size_from_offset() for the fp_regs words: 16 (V), 4 (FPSR/FPCR), -EINVAL."""
    if off < CORE_VREG0:
        raise IllegalEvent("one_reg", "fp-model", f"core offset {off:#x}",
                           "only the fp_regs part of struct kvm_regs is modelled")
    if CORE_VREG0 <= off < CORE_FPSR:
        if (off - CORE_VREG0) % 4:
            return -errno.EINVAL      # not aligned to the 128-bit register
        if vcpu_has_sve(world, vcpu):
            return -errno.EINVAL      # use KVM_REG_ARM64_SVE on SVE vCPUs
        return 16
    if off in (CORE_FPSR, CORE_FPCR):
        return 4
    return -errno.EINVAL


def _core(world: KvmWorld, vcpu: Vcpu, reg_id: int) -> tuple[int, int]:
    off = reg_id & ~(KVM_REG_ARCH_MASK | KVM_REG_SIZE_MASK | KVM_REG_ARM_CORE)
    size = kvm_reg_size(reg_id)
    if off >= NR_CORE_REGS or off + size // 4 >= NR_CORE_REGS:
        return -errno.ENOENT, off
    want = core_reg_size_from_offset(world, vcpu, off)
    if want < 0 or want != size:
        return -errno.EINVAL, off
    return 0, off


def get_core_reg(world: KvmWorld, vcpu: Vcpu, reg_id: int) -> tuple[KvmWorld, int, Value]:
    ret, off = _core(world, vcpu, reg_id)
    if ret:
        return world, ret, None
    st = world.host.store(vcpu.store)
    comp, val = (FPSR, st.fpsr) if off >= CORE_FPSR else (V, st.vregs)
    obs = Observation(f"user:{vcpu.ctx}", comp, "FP", "read", val)
    return world.with_host(world.host.observe(obs)), 0, val


def set_core_reg(world: KvmWorld, vcpu: Vcpu, reg_id: int, value: Value) -> tuple[KvmWorld, int]:
    ret, off = _core(world, vcpu, reg_id)
    if ret:
        return world, ret
    assert isinstance(value, Tok)
    st = world.host.store(vcpu.store)
    comp = FPSR if off >= CORE_FPSR else V
    st = replace(st, fpsr=value) if comp == FPSR else replace(st, vregs=value)
    host = world.host.with_store(vcpu.store, st).expect(vcpu.ctx, {comp: value})
    return world.with_host(host), 0


# --- SVE registers ----------------------------------------------------------------------------
def get_sve_vls(world: KvmWorld, vcpu: Vcpu) -> tuple[int, tuple[int, ...] | None]:
    """get_sve_vls(): the host-available VQs up to the vCPU's maximum."""
    if not vcpu_has_sve(world, vcpu):
        return -errno.ENOENT, None
    info = world.host.caps.sve_vl
    assert info is not None
    max_vq = sve_vq_from_vl(vcpu.sve_max_vl)
    return 0, vls_from_vqs({vq for vq in info.vqs if vq <= max_vq})


def set_sve_vls(world: KvmWorld, vcpu: Vcpu, words: tuple[int, ...]) -> tuple[KvmWorld, int]:
    """set_sve_vls(): only before finalize; the set must match the host's exactly up to its
    maximum (VLs can only be limited by a ceiling, ZCR_EL2.LEN) and be non-empty."""
    if not vcpu_has_sve(world, vcpu):
        return world, -errno.ENOENT
    if vcpu.sve_finalized:
        return world, -errno.EPERM           # "too late!"
    vqs = vqs_from_vls(words)
    max_vq = max(vqs, default=0)
    if max_vq > sve_vq_from_vl(kvm_sve_max_vl(world)):
        return world, -errno.EINVAL
    host_vqs = world.host.caps.sve_vl.vqs  # type: ignore[union-attr]
    for vq in range(1, max_vq + 1):
        if (vq in vqs) != (vq in host_vqs):
            return world, -errno.EINVAL
    if max_vq < 1:
        return world, -errno.EINVAL
    return world.with_vcpu(replace(vcpu, sve_max_vl=sve_vl_from_vq(max_vq))), 0


def sve_reg_to_region(world: KvmWorld, vcpu: Vcpu,
                      reg_id: int) -> tuple[int, tuple[str, int, int, int, int]]:
    """sve_reg_to_region(): (ret, (kind, n, koffset, klen, upad)) into sve_state.

    koffset is SVE_SIG_xREG_OFFSET(vq, n) - SVE_SIG_REGS_OFFSET at the vCPU's maximum VQ;
    klen = min(the register's size at that VQ, the one_reg size); upad pads with zeroes."""
    n = (reg_id >> 5) & 0x1F
    if sve_zreg(0, 0) <= reg_id <= sve_zreg(31, 31):
        kind, reqlen = "Z", kvm_reg_size(sve_zreg(0))
    elif sve_preg(0, 0) <= reg_id <= sve_ffr(31):
        kind, reqlen = ("FFR" if reg_id >= sve_ffr(0) else "P"), kvm_reg_size(sve_preg(0))
        if kind == "FFR":
            n = 16
    else:
        return -errno.EINVAL, ("", 0, 0, 0, 0)
    if not vcpu_has_sve(world, vcpu) or reg_id & 0x1F:
        return -errno.ENOENT, ("", 0, 0, 0, 0)
    vq = sve_vq_from_vl(vcpu.sve_max_vl)
    if kind == "Z":
        koff, maxlen = sve_zreg_offset(vq, n), sve_zreg_size(vq)
    else:
        koff, maxlen = sve_preg_offset(vq, n), sve_preg_size(vq)
    klen = min(maxlen, reqlen)
    return 0, (kind, n, koff, klen, reqlen - klen)


def get_sve_reg(world: KvmWorld, vcpu: Vcpu, reg_id: int) -> tuple[KvmWorld, int, Value]:
    if reg_id == KVM_REG_ARM64_SVE_VLS:
        ret, words = get_sve_vls(world, vcpu)
        return world, ret, words
    ret, (kind, _n, _o, _l, _p) = sve_reg_to_region(world, vcpu, reg_id)
    if ret:
        return world, ret, None
    if not vcpu.sve_finalized:
        return world, -errno.EPERM, None
    st = world.host.store(vcpu.store)
    who = f"user:{vcpu.ctx}"
    if kind == "Z":
        value: Value = (st.sve_v, st.sve_zhi)
        obs = (Observation(who, V, "SVE", "read", st.sve_v),
               Observation(who, ZHI, "SVE", "read", st.sve_zhi))
    else:
        value = st.sve_p
        obs = (Observation(who, P, "SVE", "read", st.sve_p),)
    return world.with_host(world.host.observe(*obs)), 0, value


def set_sve_reg(world: KvmWorld, vcpu: Vcpu, reg_id: int, value: Value) -> tuple[KvmWorld, int]:
    if reg_id == KVM_REG_ARM64_SVE_VLS:
        assert isinstance(value, tuple)
        return set_sve_vls(world, vcpu, value)
    ret, (kind, *_rest) = sve_reg_to_region(world, vcpu, reg_id)
    if ret:
        return world, ret
    if not vcpu.sve_finalized:
        return world, -errno.EPERM
    st = world.host.store(vcpu.store)
    if kind == "Z":
        assert isinstance(value, tuple) and len(value) == 2
        st = replace(st, sve_v=value[0], sve_zhi=value[1])
        expect = {V: value[0], ZHI: value[1]}
    else:
        assert isinstance(value, Tok)
        st = replace(st, sve_p=value)
        expect = {P: value}
    host = world.host.with_store(vcpu.store, st).expect(vcpu.ctx, expect)
    return world.with_host(host), 0


# --- KVM_GET_REG_LIST, KVM_GET/SET_ONE_REG ------------------------------------------------
def copy_core_reg_indices(world: KvmWorld, vcpu: Vcpu) -> list[int]:
    ids = [] if vcpu_has_sve(world, vcpu) else [core_vreg(n) for n in range(32)]
    return [*ids, CORE_FPSR_ID, CORE_FPCR_ID]


def copy_sve_reg_indices(world: KvmWorld, vcpu: Vcpu) -> list[int]:
    """VLS first ("so that userspace can save/restore in the order reported"), then Z, P, FFR."""
    if not vcpu_has_sve(world, vcpu):
        return []
    return ([KVM_REG_ARM64_SVE_VLS] + [sve_zreg(n) for n in range(32)]
            + [sve_preg(n) for n in range(16)] + [sve_ffr(0)])


def kvm_arm_copy_reg_indices(world: KvmWorld, ctx: str) -> tuple[int, list[int]]:
    """KVM_GET_REG_LIST (FP registers): -ENOEXEC before init, -EPERM before finalize."""
    vcpu = _check_ioctl(world, ctx, "KVM_GET_REG_LIST")
    if not vcpu.initialized:
        return -errno.ENOEXEC, []
    if not kvm_arm_vcpu_is_finalized(world, vcpu):
        return -errno.EPERM, []
    ids = copy_core_reg_indices(world, vcpu) + copy_sve_reg_indices(world, vcpu)
    ids += [sysreg_one_reg_id(name) for name in walk_sys_regs(world, vcpu)]
    return 0, ids


def kvm_arm_get_reg(world: KvmWorld, ctx: str, reg_id: int) -> tuple[KvmWorld, int, Value]:
    """KVM_GET_ONE_REG -> kvm_arm_get_reg()."""
    vcpu = _check_ioctl(world, ctx, "KVM_GET_ONE_REG")
    world = world.with_host(world.host.clear_obs())
    if not vcpu.initialized:
        return world, -errno.ENOEXEC, None
    if (reg_id & ~KVM_REG_SIZE_MASK) >> 32 != KVM_REG_ARM64 >> 32:
        return world, -errno.EINVAL, None
    coproc = reg_id & KVM_REG_ARM_COPROC_MASK
    if coproc == KVM_REG_ARM_CORE:
        return get_core_reg(world, vcpu, reg_id)
    if coproc == KVM_REG_ARM64_SVE:
        return get_sve_reg(world, vcpu, reg_id)
    name = _SYSREG_BY_ID.get(reg_id)
    if name is None:
        return world, -errno.ENOENT, None
    return kvm_sys_reg_get_user(world, vcpu, name)


def kvm_arm_set_reg(world: KvmWorld, ctx: str, reg_id: int, value: Value) -> tuple[KvmWorld, int]:
    """KVM_SET_ONE_REG -> kvm_arm_set_reg()."""
    vcpu = _check_ioctl(world, ctx, "KVM_SET_ONE_REG")
    world = world.with_host(world.host.clear_obs())
    if not vcpu.initialized:
        return world, -errno.ENOEXEC
    if (reg_id & ~KVM_REG_SIZE_MASK) >> 32 != KVM_REG_ARM64 >> 32:
        return world, -errno.EINVAL
    coproc = reg_id & KVM_REG_ARM_COPROC_MASK
    if coproc == KVM_REG_ARM_CORE:
        return set_core_reg(world, vcpu, reg_id, value)
    if coproc == KVM_REG_ARM64_SVE:
        return set_sve_reg(world, vcpu, reg_id, value)
    name = _SYSREG_BY_ID.get(reg_id)
    if name is None:
        return world, -errno.ENOENT
    assert isinstance(value, int | Tok)
    return kvm_sys_reg_set_user(world, vcpu, name, value)


def save_vcpu_regs(world: KvmWorld, ctx: str) -> tuple[KvmWorld, list[tuple[int, Value]]]:
    """What a VMM migrates: every register of KVM_GET_REG_LIST with its value."""
    ret, ids = kvm_arm_copy_reg_indices(world, ctx)
    if ret:
        raise IllegalEvent("migration", "unfinalized", "save", f"KVM_GET_REG_LIST: {ret}")
    out = []
    for reg_id in ids:
        world, ret, value = kvm_arm_get_reg(world, ctx, reg_id)
        assert ret == 0, (reg_name(reg_id), ret)
        out.append((reg_id, value))
    return world, out


def restore_vcpu_regs(world: KvmWorld, ctx: str,
                      regs: list[tuple[int, Value]]) -> tuple[KvmWorld, list[tuple[int, int]]]:
    """KVM_SET_ONE_REG of each (id, value) in order; finalizes the SVE configuration after
    KVM_REG_ARM64_SVE_VLS as QEMU does.  Returns the world and the failures (id, -errno)."""
    failures = []
    for reg_id, value in regs:
        world, ret = kvm_arm_set_reg(world, ctx, reg_id, value)
        if ret:
            failures.append((reg_id, ret))
        if reg_id == KVM_REG_ARM64_SVE_VLS and not world.vcpu(ctx).sve_finalized:
            world, ret = kvm_arm_vcpu_finalize(world, ctx)
            if ret:
                failures.append((reg_id, ret))
    return world, failures
