"""KVM/arm64 VM and vCPU setup: arch/arm64/kvm/reset.c and the vCPU ioctls of arm.c (v6.17).

* kvm_arm_init_sve(): kvm_sve_max_vl = sve_max_virtualisable_vl(), capped at VL_ARCH_MAX.
* KVM_ARM_VCPU_INIT: features must be supported by the host (SVE needs system SVE) and be
  the same for every vCPU of the VM (-EINVAL); then kvm_reset_vcpu(): an SVE vCPU that is
  not finalized gets sve_max_vl = kvm_sve_max_vl (kvm_vcpu_enable_sve()), a finalized one has
  its sve_state zeroed; fp_regs are zeroed; the VM's ID registers are initialised once.
* KVM_ARM_VCPU_FINALIZE(KVM_ARM_VCPU_SVE): -ENOEXEC before init, -EINVAL without SVE (or for
  another feature), -EPERM if already finalized; allocates sve_state for sve_max_vl.
* A vCPU with SVE is not finalized until then: KVM_RUN and KVM_GET_REG_LIST fail with -EPERM.
"""

from __future__ import annotations

import errno

from fpstate.arm64.cpu import CpuProfile
from fpstate.arm64.regs import ZERO, sve_regs_size, sve_vq_from_vl
from fpstate.arm64.statemachine import IllegalEvent, replace
from fpstate.kernel.arm64 import entry_common, fpsimd
from fpstate.kernel.arm64.state import FP_STATE_FPSIMD, HOST_VARIANTS, FpStore
from fpstate.kvm.arm64.config import KvmConfig
from fpstate.kvm.arm64.kvm_host import (
    KVM_ARM_VCPU_FEATURES,
    KVM_ARM_VCPU_SVE,
    VCPU_OUT,
    HypCpu,
    KvmWorld,
    Vcpu,
    Vm,
    vcpu_has_sve,
)
from fpstate.kvm.arm64.sys_regs import kvm_reset_id_regs


def kvm_init(profile: CpuProfile, config: KvmConfig | None = None, ncpus: int = 2,
             vmm: str = "vmm") -> KvmWorld:
    """Boot the host, start the VMM task in user mode on CPU 0 (kvm_arm_init())."""
    config = config or KvmConfig()
    host = fpsimd.boot(profile, ncpus, frozenset({config.variant}) & HOST_VARIANTS)
    host = fpsimd.spawn(host, vmm)
    host = entry_common.ret_to_user(fpsimd.schedule(host, 0, vmm), 0)
    return KvmWorld(host, config, tuple(HypCpu() for _ in range(ncpus)), vmm)


def kvm_sve_max_vl(world: KvmWorld) -> int:
    return world.host.caps.kvm_sve_max_vl


def kvm_create_vm(world: KvmWorld, name: str) -> KvmWorld:
    """KVM_CREATE_VM."""
    if name in world.vms:
        raise IllegalEvent("kvm", "exists", "KVM_CREATE_VM", f"VM {name!r} exists")
    return world.with_vm(Vm(name))


def kvm_create_vcpu(world: KvmWorld, vm_name: str) -> tuple[KvmWorld, str]:
    """KVM_CREATE_VCPU: a new, uninitialised vCPU; returns its context name <vm>/<n>."""
    vm = world.vm(vm_name)
    vcpu = Vcpu(vm_name, vm.nvcpus)
    world = world.with_vm(replace(vm, nvcpus=vm.nvcpus + 1)).with_vcpu(vcpu)
    host = world.host.with_store(vcpu.store, FpStore(vcpu.ctx))
    return world.with_host(host), vcpu.ctx


def vcpu_sve_state_size(vcpu: Vcpu) -> int:
    """vcpu_sve_state_size(): SVE_SIG_REGS_SIZE(vcpu_sve_max_vq(vcpu))."""
    return sve_regs_size(sve_vq_from_vl(vcpu.sve_max_vl)) if vcpu.sve_max_vl else 0


def kvm_arm_vcpu_is_finalized(world: KvmWorld, vcpu: Vcpu) -> bool:
    return not vcpu_has_sve(world, vcpu) or vcpu.sve_finalized


def _require_out(vcpu: Vcpu, ioctl: str) -> None:
    if vcpu.run != VCPU_OUT:
        raise IllegalEvent("vcpu-run", vcpu.run, ioctl, "the VMM thread is inside KVM_RUN")


def kvm_arm_vcpu_init(world: KvmWorld, ctx: str,
                      features: frozenset[str] = frozenset()) -> tuple[KvmWorld, int]:
    """KVM_ARM_VCPU_INIT: check features, then kvm_reset_vcpu()."""
    vcpu = world.vcpu(ctx)
    _require_out(vcpu, "KVM_ARM_VCPU_INIT")
    vm = world.vm(vcpu.vm)
    if set(features) - set(KVM_ARM_VCPU_FEATURES):
        return world, -errno.EINVAL
    if KVM_ARM_VCPU_SVE in features and not world.host.caps.sve:
        return world, -errno.EINVAL          # system_supported_vcpu_features()
    if vm.features is not None and vm.features != features:
        return world, -errno.EINVAL          # KVM_ARCH_FLAG_VCPU_FEATURES_CONFIGURED
    if vcpu.initialized and vcpu.features != features:
        return world, -errno.EINVAL
    world = world.with_vm(replace(vm, features=frozenset(features)))
    vcpu = replace(world.vcpu(ctx), features=frozenset(features), initialized=True)
    return kvm_reset_vcpu(world.with_vcpu(vcpu), ctx), 0


def kvm_reset_vcpu(world: KvmWorld, ctx: str) -> KvmWorld:
    """kvm_reset_vcpu(): SVE enable or sve_state zeroing, fp_regs zeroed, sys_regs reset."""
    vcpu = world.vcpu(ctx)
    st = world.host.store(vcpu.store)
    if not vcpu.sve_finalized:
        if KVM_ARM_VCPU_SVE in vcpu.features:
            vcpu = replace(vcpu, sve_max_vl=kvm_sve_max_vl(world))
    else:
        st = replace(st, sve_v=ZERO, sve_zhi=ZERO, sve_p=ZERO)
    st = replace(st, vregs=ZERO, fpsr=ZERO, fpmr=ZERO, svcr=0, fp_type=FP_STATE_FPSIMD)
    vcpu = replace(vcpu, zcr_el1=0, fpexc32_el2=0x700)
    host = world.host.with_store(vcpu.store, st).expect(
        vcpu.ctx, {c: ZERO for c in ("V", "ZHI", "P", "FPSR", "FPMR")})
    world = world.with_host(host).with_vcpu(vcpu)
    return kvm_reset_id_regs(world, vcpu.vm, vcpu_has_sve(world, vcpu))


def kvm_arm_vcpu_finalize(world: KvmWorld, ctx: str,
                          what: str = KVM_ARM_VCPU_SVE) -> tuple[KvmWorld, int]:
    """KVM_ARM_VCPU_FINALIZE -> kvm_arm_vcpu_finalize() -> kvm_vcpu_finalize_sve()."""
    vcpu = world.vcpu(ctx)
    _require_out(vcpu, "KVM_ARM_VCPU_FINALIZE")
    if not vcpu.initialized:
        return world, -errno.ENOEXEC
    if what != KVM_ARM_VCPU_SVE or not vcpu_has_sve(world, vcpu):
        return world, -errno.EINVAL
    if vcpu.sve_finalized:
        return world, -errno.EPERM
    st = world.host.store(vcpu.store)
    st = replace(st, sve_size=vcpu_sve_state_size(vcpu), sve_v=ZERO, sve_zhi=ZERO, sve_p=ZERO,
                 sve_vl=vcpu.sve_max_vl)
    world = world.with_host(world.host.with_store(vcpu.store, st))
    return world.with_vcpu(replace(vcpu, sve_finalized=True)), 0


#: The configuration lifecycle of an SVE vCPU as the ioctls see it: (state, ioctl) -> the
#: kernel's answer (0 or -errno) and the next state.  States: CREATED, INIT (VLs
#: configurable), FINALIZED, RAN.  `kvm_arm_vcpu_init` and friends compute these answers;
#: the table is what the tests hold them to.
SVE_VCPU_CONFIG_TABLE: dict[tuple[str, str], tuple[int, str]] = {
    ("CREATED", "SET_SVE_VLS"): (-errno.ENOEXEC, "CREATED"),
    ("CREATED", "FINALIZE"): (-errno.ENOEXEC, "CREATED"),
    ("CREATED", "GET_REG_LIST"): (-errno.ENOEXEC, "CREATED"),
    ("CREATED", "RUN"): (-errno.ENOEXEC, "CREATED"),
    ("CREATED", "INIT"): (0, "INIT"),
    ("INIT", "SET_SVE_VLS"): (0, "INIT"),
    ("INIT", "GET_ZREG"): (-errno.EPERM, "INIT"),
    ("INIT", "GET_REG_LIST"): (-errno.EPERM, "INIT"),
    ("INIT", "RUN"): (-errno.EPERM, "INIT"),
    ("INIT", "FINALIZE"): (0, "FINALIZED"),
    ("FINALIZED", "FINALIZE"): (-errno.EPERM, "FINALIZED"),
    ("FINALIZED", "SET_SVE_VLS"): (-errno.EPERM, "FINALIZED"),
    ("FINALIZED", "GET_ZREG"): (0, "FINALIZED"),
    ("FINALIZED", "GET_REG_LIST"): (0, "FINALIZED"),
    ("FINALIZED", "RUN"): (0, "RAN"),
    ("RAN", "SET_SVE_VLS"): (-errno.EPERM, "RAN"),
    ("RAN", "FINALIZE"): (-errno.EPERM, "RAN"),
    ("RAN", "RUN"): (0, "RAN"),
}

