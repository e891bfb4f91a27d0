"""Data of the KVM/arm64 FP model: arch/arm64/include/asm/kvm_host.h (v6.17).

* per physical CPU (``struct kvm_host_data``): ``fp_owner`` and the trap registers hyp
  programs for the running guest (`HypCpu`);
* per VM (``struct kvm_arch``): the VM-wide ID registers, KVM_ARCH_FLAG_HAS_RAN_ONCE,
  KVM_ARCH_FLAG_ID_REGS_INITIALIZED, the configured vCPU features (`Vm`);
* per vCPU (``struct kvm_vcpu_arch``): features, VCPU_INITIALIZED, VCPU_SVE_FINALIZED,
  sve_max_vl, sys_regs ZCR_EL1/FPEXC32_EL2, the HCRX_EL2 value computed at first run, and
  where the vCPU thread is (`Vcpu`).  The vCPU's fp_regs/sve_state/FPMR/SVCR live in the
  host model's memory as the store ``vcpu:<vm>/<n>``, because the host kernel saves into
  them through fpsimd_last_state.

The predicates kvm_has_fpmr(), vcpu_has_sve() and guest_owns_fp_regs() are the questions
every gate in KVM asks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fpstate.arm64.idregs import IdRegs
from fpstate.arm64.statemachine import FrozenMap, IllegalEvent, replacer
from fpstate.kernel.arm64.state import Host, Task
from fpstate.kvm.arm64.config import KvmConfig

FP_STATE_FREE = "FP_STATE_FREE"
FP_STATE_HOST_OWNED = "FP_STATE_HOST_OWNED"
FP_STATE_GUEST_OWNED = "FP_STATE_GUEST_OWNED"

KVM_ARM_VCPU_SVE = "SVE"            #: KVM_ARM_VCPU_SVE, feature bit 4 of kvm_vcpu_init
KVM_ARM_VCPU_FEATURES = {"SVE": 4}  #: the FP-relevant vCPU feature bits modelled

# vCPU thread: OUT (in userspace), LOADED (in KVM_RUN, host side), IN_GUEST, PREEMPTED
# (scheduled out inside KVM_RUN: the preempt notifier called kvm_arch_vcpu_put()).
VCPU_OUT, VCPU_LOADED, VCPU_IN_GUEST, VCPU_PREEMPTED = "OUT", "LOADED", "IN_GUEST", "PREEMPTED"


@dataclass(frozen=True, slots=True)
class Vcpu:
    vm: str
    idx: int
    features: frozenset[str] = frozenset()
    initialized: bool = False
    sve_max_vl: int = 0
    sve_finalized: bool = False
    has_run: bool = False
    run: str = VCPU_OUT
    cpu: int | None = None
    zcr_el1: int = 0
    fpexc32_el2: int = 0x700
    hcrx_el2: int = 0
    #: fpmr-shared-layout only: where hyp believes the host task's FPMR is (an offset into
    #: the VMM's thread_struct, computed as &uw.fpsimd_state + 1).
    host_fpmr_offset: int | None = None

    @property
    def ctx(self) -> str:
        return f"{self.vm}/{self.idx}"

    @property
    def store(self) -> str:
        return f"vcpu:{self.vm}/{self.idx}"


@dataclass(frozen=True, slots=True)
class Vm:
    name: str
    id_regs: IdRegs = field(default_factory=IdRegs)
    id_regs_initialized: bool = False
    has_ran_once: bool = False
    #: the ID registers as frozen at the first KVM_RUN of any vCPU.
    id_regs_at_first_run: IdRegs | None = None
    features: frozenset[str] | None = None   #: KVM_ARCH_FLAG_VCPU_FEATURES_CONFIGURED
    nvcpus: int = 0

    @property
    def guest_has_sve(self) -> bool:
        """KVM_ARCH_FLAG_GUEST_HAS_SVE."""
        return self.features is not None and KVM_ARM_VCPU_SVE in self.features


@dataclass(frozen=True, slots=True)
class HypCpu:
    """host_data (fp_owner) and the EL2 trap state of one physical CPU."""

    fp_owner: str = FP_STATE_FREE
    cptr: int = 0          #: CPTR_EL2 (nVHE) or CPACR_EL1-layout CPTR_EL2 (VHE) in the guest
    hcrx: int = 0          #: HCRX_EL2 while the guest runs
    guest: str | None = None


@dataclass(frozen=True, slots=True)
class KvmWorld:
    host: Host
    config: KvmConfig
    hyp: tuple[HypCpu, ...]
    vmm: str
    vms: FrozenMap[str, Vm] = field(default_factory=FrozenMap)
    vcpus: FrozenMap[str, Vcpu] = field(default_factory=FrozenMap)

    def vm(self, name: str) -> Vm:
        try:
            return self.vms[name]
        except KeyError:
            raise IllegalEvent("kvm", "no-vm", "ioctl", f"no VM {name!r}") from None

    def vcpu(self, ctx: str) -> Vcpu:
        try:
            return self.vcpus[ctx]
        except KeyError:
            raise IllegalEvent("kvm", "no-vcpu", "ioctl", f"no vCPU {ctx!r}") from None

    def vmm_task(self) -> Task:
        return self.host.task(self.vmm)

    def vmm_cpu(self) -> int:
        for c in self.host.cpus:
            if c.current == self.vmm:
                return c.idx
        raise IllegalEvent("kvm", "vmm-not-running", "ioctl", f"{self.vmm} is not on a CPU")

    def with_host(self, host: Host) -> KvmWorld:
        return _replace_world(self, host=host)

    def with_vm(self, vm: Vm) -> KvmWorld:
        return _replace_world(self, vms=self.vms.set(vm.name, vm))

    def with_vcpu(self, vcpu: Vcpu) -> KvmWorld:
        return _replace_world(self, vcpus=self.vcpus.set(vcpu.ctx, vcpu))

    def with_hyp(self, cpu: int, hyp: HypCpu) -> KvmWorld:
        if self.hyp[cpu] is hyp:
            return self
        h = list(self.hyp)
        h[cpu] = hyp
        return _replace_world(self, hyp=tuple(h))


_replace_world = replacer(KvmWorld)


def vcpu_has_sve(world: KvmWorld, vcpu: Vcpu) -> bool:
    """vcpu_has_sve(): the host has SVE and the VM's vCPUs were created with KVM_ARM_VCPU_SVE."""
    return world.host.caps.sve and world.vm(vcpu.vm).guest_has_sve


def kvm_has_fpmr(world: KvmWorld, vm: Vm) -> bool:
    """kvm_has_fpmr(): system_supports_fpmr() && ID_AA64PFR2_EL1.FPMR >= IMP in the VM."""
    return world.host.caps.fpmr and vm.id_regs.field("ID_AA64PFR2_EL1", "FPMR") >= 1


def guest_owns_fp_regs(world: KvmWorld, cpu: int) -> bool:
    return world.hyp[cpu].fp_owner == FP_STATE_GUEST_OWNED


def advertised_features(world: KvmWorld, vcpu: Vcpu) -> frozenset[str]:
    """What the VM offers this vCPU: FP always (all profiles have it), SVE iff
    vcpu_has_sve(), FPMR iff kvm_has_fpmr(); SME/SME2 never (not supported for guests)."""
    vm = world.vm(vcpu.vm)
    caps = world.host.caps
    hit = _ADVERTISED.get(id(vm))
    if hit is not None and hit[0] is vm and hit[1] is caps:
        return hit[2]
    feats = {"FP"}
    if vcpu_has_sve(world, vcpu):
        feats.add("SVE")
    if kvm_has_fpmr(world, vm):
        feats.add("FPMR")
    out = frozenset(feats)
    if len(_ADVERTISED) > 64:
        _ADVERTISED.clear()
    _ADVERTISED[id(vm)] = (vm, caps, out)
    return out


#: id(vm) -> (vm, host caps, advertised features): they depend on nothing else (the invariants
#: ask at every observation).
_ADVERTISED: dict[int, tuple[Vm, object, frozenset[str]]] = {}
