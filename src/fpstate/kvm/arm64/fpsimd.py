"""KVM/arm64 guest FP ownership: arch/arm64/kvm/fpsimd.c and hyp/include/hyp/switch.h (v6.17).

The current upstream design (Mark Rutland, "KVM: arm64: Unconditionally save+flush host
FPSIMD/SVE/SME state", v6.15, backported to stable):

* kvm_arch_vcpu_load_fp(): the host's FPSIMD/SVE/SME/FPMR state is saved and unbound
  (fpsimd_save_and_flush_cpu_state(): SMSTOP, TIF_FOREIGN_FPSTATE set) and fp_owner := FREE,
  so hyp never has to save host state.
* kvm_arch_vcpu_ctxflush_fp(): just before entry, a set TIF_FOREIGN_FPSTATE means someone
  (kernel-mode NEON in a softirq) used the registers since the last exit: fp_owner := FREE.
* __activate_cptr_traps(): FP traps unless the guest owns the registers; SVE traps unless
  it owns them *and* the vCPU has SVE; SME always traps (KVM has no SME guests).
* kvm_hyp_handle_fpsimd(): on the first FP/SVE trap, hyp loads the guest state (SVE at the
  vCPU's maximum VL, then the guest's ZCR_EL1; FPMR only if kvm_has_fpmr()),
  fp_owner := GUEST_OWNED.
* kvm_arch_vcpu_ctxsync_fp(): after exit, a guest-owned state is bound to the CPU through
  fpsimd_last_state (st = vCPU fp_regs, sve_state at sve_max_vl, to_save SVE or FPSIMD, FPMR
  into the vCPU's FPMR slot) and TIF_FOREIGN_FPSTATE cleared, so any host save writes the
  guest's state back to the vCPU.
* kvm_arch_vcpu_put_fp(): a guest-owned state is saved and flushed.

Lifecycles: `FP_OWNER` (per physical CPU) and `VCPU_RUN` (per vCPU thread) are transition
tables; an event outside them raises IllegalEvent and changes nothing.

The ``fpmr-shared-layout`` variant replaces the load with the pre-v6.15 scheme (host state
left live, fp_owner := HOST_OWNED, hyp saves it on the first guest trap) and finds the
host's FPMR at ``&uw.fpsimd_state + 1``, as Mark Brown's v3 fpsimd_share_end() did.
"""

from __future__ import annotations

from fpstate.arm64.regs import USER_FPSIMD_STATE_SIZE, ZERO, sve_vq_from_vl
from fpstate.arm64.statemachine import TransitionTable, replace
from fpstate.kernel.arm64 import fpsimd as host_fpsimd
from fpstate.kernel.arm64.state import (
    FP_STATE_FPSIMD,
    FP_STATE_SVE,
    Binding,
    thread_field_offset,
    thread_fields_at,
)
from fpstate.kvm.arm64.config import (
    FPMR_SHARED_LAYOUT,
    FPMR_UNGATED,
    KVM_PREPARE_CLEARS_TIF_SVE,
    KVM_ZCR_RESTORED_AT_PUT,
    KvmConfig,
)
from fpstate.kvm.arm64.kvm_host import (
    FP_STATE_FREE,
    FP_STATE_GUEST_OWNED,
    FP_STATE_HOST_OWNED,
    VCPU_IN_GUEST,
    VCPU_LOADED,
    VCPU_OUT,
    VCPU_PREEMPTED,
    KvmWorld,
    Vcpu,
    guest_owns_fp_regs,
    kvm_has_fpmr,
    vcpu_has_sve,
)

_OWNERS = (FP_STATE_FREE, FP_STATE_HOST_OWNED, FP_STATE_GUEST_OWNED)
FP_OWNER = TransitionTable.of("fp_owner", [
    *[(s, "vcpu_load", FP_STATE_FREE) for s in _OWNERS],
    *[(s, "vcpu_load_host_owned", FP_STATE_HOST_OWNED) for s in _OWNERS],
    *[(s, "ctxflush_foreign", FP_STATE_FREE) for s in _OWNERS],
    *[(s, "ctxflush", s) for s in _OWNERS],
    *[(s, "ctxsync", s) for s in _OWNERS],
    *[(s, "put", s) for s in _OWNERS],
    (FP_STATE_FREE, "fp_trap", FP_STATE_GUEST_OWNED),
    (FP_STATE_HOST_OWNED, "fp_trap", FP_STATE_GUEST_OWNED),
])

VCPU_RUN = TransitionTable.of("vcpu-run", [
    (VCPU_OUT, "vcpu_load", VCPU_LOADED),
    (VCPU_LOADED, "enter", VCPU_IN_GUEST),
    (VCPU_IN_GUEST, "guest_op", VCPU_IN_GUEST),
    (VCPU_IN_GUEST, "exit", VCPU_LOADED),
    (VCPU_LOADED, "host_op", VCPU_LOADED),
    (VCPU_LOADED, "preempt", VCPU_PREEMPTED),
    (VCPU_PREEMPTED, "resume", VCPU_LOADED),
    (VCPU_LOADED, "vcpu_put", VCPU_OUT),
])

# CPTR_EL2 in the nVHE layout (asm/kvm_arm.h) and the CPACR_EL1 layout used with E2H=1.
CPTR_EL2_TCPAC = 1 << 31
CPTR_EL2_TAM = 1 << 30
CPTR_EL2_TTA = 1 << 20
CPTR_EL2_TSM = 1 << 12
CPTR_EL2_TFP = 1 << 10
CPTR_EL2_TZ = 1 << 8
CPTR_NVHE_EL2_RES1 = (1 << 13) | (1 << 9) | 0xFF
CPACR_EL1_TTA = 1 << 28
CPACR_EL1_SMEN = 0b11 << 24
CPACR_EL1_FPEN = 0b11 << 20
CPACR_EL1_ZEN = 0b11 << 16
#: ZCR_ELx.LEN, bits [3:0] (arch/arm64/tools/sysreg ZCR_ELx); bits [63:4] are RES0.
ZCR_ELX_LEN_MASK = 0xF


def run_step(world: KvmWorld, vcpu: Vcpu, event: str) -> KvmWorld:
    nxt = VCPU_RUN.step(vcpu.run, event, f"vCPU {vcpu.ctx}")
    return world.with_vcpu(replace(world.vcpu(vcpu.ctx), run=nxt))


def owner_step(world: KvmWorld, cpu: int, event: str) -> KvmWorld:
    hyp = world.hyp[cpu]
    return world.with_hyp(cpu, replace(hyp, fp_owner=FP_OWNER.step(hyp.fp_owner, event,
                                                                   f"CPU {cpu}")))


def fpmr_switched(world: KvmWorld, vcpu: Vcpu) -> bool:
    """Whether hyp loads the guest FPMR: kvm_has_fpmr(); fpmr-ungated: the host has FPMR."""
    if world.config.variant == FPMR_UNGATED:
        return world.host.caps.fpmr
    return kvm_has_fpmr(world, world.vm(vcpu.vm))


# --- trap configuration ----------------------------------------------------------------------
def activate_cptr_traps(config: KvmConfig, owned: bool, has_sve: bool) -> int:
    """__activate_cptr_traps_{nvhe,vhe}(): the trap register value while the guest runs."""
    if config.vhe:
        val = CPTR_EL2_TAM | CPACR_EL1_TTA
        if owned:
            val |= CPACR_EL1_FPEN
            if has_sve:
                val |= CPACR_EL1_ZEN
        return val                     # SMEN never set: SME always traps
    val = CPTR_EL2_TAM | CPTR_EL2_TTA | CPTR_NVHE_EL2_RES1 | CPTR_EL2_TSM
    if not (has_sve and owned):
        val |= CPTR_EL2_TZ
    if not owned:
        val |= CPTR_EL2_TFP
    return val


def cptr_traps(config: KvmConfig, val: int) -> dict[str, bool]:
    """Which guest accesses ``val`` traps to EL2: FP (EC 0x07), SVE (EC 0x19), SME (0x1D)."""
    if config.vhe:
        return {"FP": val & CPACR_EL1_FPEN != CPACR_EL1_FPEN,
                "SVE": val & CPACR_EL1_ZEN != CPACR_EL1_ZEN,
                "SME": val & CPACR_EL1_SMEN != CPACR_EL1_SMEN}
    return {"FP": bool(val & CPTR_EL2_TFP), "SVE": bool(val & CPTR_EL2_TZ),
            "SME": bool(val & CPTR_EL2_TSM)}


def update_traps(world: KvmWorld, vcpu: Vcpu) -> KvmWorld:
    cpu = vcpu.cpu
    assert cpu is not None
    val = activate_cptr_traps(world.config, guest_owns_fp_regs(world, cpu),
                              vcpu_has_sve(world, vcpu))
    return world.with_hyp(cpu, replace(world.hyp[cpu], cptr=val, hcrx=vcpu.hcrx_el2))


# --- load / flush / sync / put --------------------------------------------------------------
def kvm_arch_vcpu_load_fp(world: KvmWorld, ctx: str) -> KvmWorld:
    """kvm_arch_vcpu_load_fp(): save and unbind the host's state; fp_owner := FREE."""
    vcpu = world.vcpu(ctx)
    cpu = vcpu.cpu
    assert cpu is not None
    if not world.host.caps.fpsimd:
        return world
    if world.config.variant in (FPMR_SHARED_LAYOUT, KVM_PREPARE_CLEARS_TIF_SVE):
        return _vcpu_load_fp_host_owned(world, vcpu, cpu)
    world = world.with_host(host_fpsimd.fpsimd_save_and_flush_cpu_state(world.host, cpu))
    return owner_step(world, cpu, "vcpu_load")


def _vcpu_load_fp_host_owned(world: KvmWorld, vcpu: Vcpu, cpu: int) -> KvmWorld:
    """The load before fbc7e61195e2 ("KVM: arm64: Unconditionally save+flush host
    FPSIMD/SVE/SME state", February 2025): unless SM or ZA is on, the host's state stays
    live (HOST_OWNED, saved by hyp on the guest's first FP trap) and fpsimd_kvm_prepare()
    clears TIF_SVE -- "KVM does not save host SVE state" -- while EL0 SVE stays enabled in
    CPACR_EL1 (restored at put as seen at load), so the VMM thread goes back to user mode
    able to use SVE without TIF_SVE, and its next save keeps only the FPSIMD part (variant
    ``kvm-prepare-clears-tif-sve``; QEMU's SVE memmove() corrupted data). Hyp saves the host
    FPMR through a pointer to uw.fpmr -- or, with the seed's v3 sharing (variant
    ``fpmr-shared-layout``), host_fpmr = (u64 *)(&current->thread.uw.fpsimd_state + 1)."""
    host = world.host
    if host.caps.sme and host.cpus[cpu].regs.za_on:
        host = host_fpsimd.fpsimd_save_and_flush_cpu_state(host, cpu)
        return owner_step(world.with_host(host), cpu, "vcpu_load")
    t = host.task(world.vmm)
    host = host.update_task(t, tif_sve=False)          # fpsimd_kvm_prepare()
    offset = (thread_field_offset("uw.fpsimd_state") + USER_FPSIMD_STATE_SIZE
              if world.config.variant == FPMR_SHARED_LAYOUT
              else thread_field_offset("uw.fpmr"))
    world = world.with_host(host).with_vcpu(replace(vcpu, host_fpmr_offset=offset))
    return owner_step(world, cpu, "vcpu_load_host_owned")


def kvm_arch_vcpu_ctxflush_fp(world: KvmWorld, ctx: str) -> KvmWorld:
    """kvm_arch_vcpu_ctxflush_fp(): TIF_FOREIGN_FPSTATE set => fp_owner := FREE."""
    cpu = world.vcpu(ctx).cpu
    assert cpu is not None
    foreign = world.vmm_task().tif_foreign_fpstate
    return owner_step(world, cpu, "ctxflush_foreign" if foreign else "ctxflush")


def kvm_arch_vcpu_ctxsync_fp(world: KvmWorld, ctx: str) -> KvmWorld:
    """kvm_arch_vcpu_ctxsync_fp(): bind a guest-owned state to the CPU, clear TIF_FOREIGN."""
    vcpu = world.vcpu(ctx)
    cpu = vcpu.cpu
    assert cpu is not None
    world = owner_step(world, cpu, "ctxsync")
    if not guest_owns_fp_regs(world, cpu):
        return world
    to_save = FP_STATE_SVE if vcpu_has_sve(world, vcpu) else FP_STATE_FPSIMD
    binding = Binding(vcpu.store, vcpu.sve_max_vl, 0, to_save, vcpu.store)
    host = host_fpsimd.fpsimd_bind_state_to_cpu(world.host, cpu, binding)
    host = host.update_task(host.task(world.vmm), tif_foreign_fpstate=False)
    return world.with_host(host)


def _zcr_restored_at_put(world: KvmWorld) -> bool:
    """Whether ZCR_EL1 is switched back to the vCPU's maximum only at vcpu_put, as nVHE did
    before 59419f10045b (variant ``kvm-zcr-restored-at-put``); a VHE host without NV runs
    at the vCPU's maximum through ZCR_EL2 either way."""
    return world.config.variant == KVM_ZCR_RESTORED_AT_PUT and not world.config.vhe


def kvm_arch_vcpu_put_fp(world: KvmWorld, ctx: str) -> KvmWorld:
    """kvm_arch_vcpu_put_fp(): save and flush a guest-owned state (TIF_FOREIGN set).

    Before 59419f10045b ("KVM: arm64: Eagerly switch ZCR_EL{1,2}", v6.14) an nVHE host
    read the guest's ZCR_EL1 back and restored the maximum VL only here, just before the
    save; until then the host ran at the guest's VL (`_zcr_restored_at_put`)."""
    vcpu = world.vcpu(ctx)
    cpu = vcpu.cpu
    assert cpu is not None
    world = owner_step(world, cpu, "put")
    if guest_owns_fp_regs(world, cpu):
        if _zcr_restored_at_put(world) and vcpu_has_sve(world, vcpu):
            regs = world.host.cpus[cpu].regs
            world = world.with_vcpu(replace(vcpu, zcr_el1=regs.zcr_len))
            regs = replace(regs, zcr_len=sve_vq_from_vl(vcpu.sve_max_vl) - 1)
            world = world.with_host(world.host.with_regs(cpu, regs))
        world = world.with_host(host_fpsimd.fpsimd_save_and_flush_cpu_state(world.host, cpu))
    return world


def fpsimd_lazy_switch_to_guest(world: KvmWorld, ctx: str) -> KvmWorld:
    """fpsimd_lazy_switch_to_guest(): a guest-owned SVE state runs with ZCR_EL2 = the
    vCPU's maximum VQ and ZCR_EL1 = the guest's value (not before 59419f10045b: ZCR_EL1
    then still held the guest's value from the last exit)."""
    vcpu = world.vcpu(ctx)
    cpu = vcpu.cpu
    assert cpu is not None
    if not (guest_owns_fp_regs(world, cpu) and vcpu_has_sve(world, vcpu)):
        return world
    if _zcr_restored_at_put(world):
        return world
    regs = world.host.cpus[cpu].regs
    regs = replace(regs, zcr_limit=sve_vq_from_vl(vcpu.sve_max_vl) - 1,
                   zcr_len=vcpu.zcr_el1 & ZCR_ELX_LEN_MASK)
    return world.with_host(world.host.with_regs(cpu, regs))


def fpsimd_lazy_switch_to_host(world: KvmWorld, ctx: str) -> KvmWorld:
    """fpsimd_lazy_switch_to_host(): save the guest's ZCR_EL1 (read from the hardware: LEN,
    the other bits RES0) and set the live VL to the vCPU's maximum, so that a host-side save
    uses the layout the binding announces (not before 59419f10045b on nVHE: the host ran on
    at the guest's VL until kvm_arch_vcpu_put_fp(), and a save in between -- a softirq's
    kernel-mode NEON -- found the live VL wrong and killed the VMM)."""
    vcpu = world.vcpu(ctx)
    cpu = vcpu.cpu
    assert cpu is not None
    if not (guest_owns_fp_regs(world, cpu) and vcpu_has_sve(world, vcpu)):
        return world
    if _zcr_restored_at_put(world):
        return world
    regs = world.host.cpus[cpu].regs
    world = world.with_vcpu(replace(vcpu, zcr_el1=regs.zcr_len))
    regs = replace(regs, zcr_len=sve_vq_from_vl(vcpu.sve_max_vl) - 1, zcr_limit=15)
    return world.with_host(world.host.with_regs(cpu, regs))


# --- the hyp FP trap handler ------------------------------------------------------------
def kvm_hyp_handle_fpsimd(world: KvmWorld, ctx: str, ec: str) -> tuple[KvmWorld, bool]:
    """kvm_hyp_handle_fpsimd(): handle an FP (EC 0x07) or SVE (EC 0x19) trap in hyp by
    loading the guest state; False if the trap is not for hyp (then the exit handler
    injects UNDEF: no FP on the host, or an SVE trap from a vCPU without SVE)."""
    vcpu = world.vcpu(ctx)
    cpu = vcpu.cpu
    assert cpu is not None
    if not world.host.caps.fpsimd or (ec == "SVE" and not vcpu_has_sve(world, vcpu)):
        return world, False
    if world.hyp[cpu].fp_owner == FP_STATE_HOST_OWNED:
        world = _hyp_save_host_shared_layout(world, vcpu, cpu)
    st = world.host.store(vcpu.store)
    regs = world.host.cpus[cpu].regs
    if vcpu_has_sve(world, vcpu):
        max_len = sve_vq_from_vl(vcpu.sve_max_vl) - 1
        assert st.sve_size and st.sve_vl == vcpu.sve_max_vl, "vCPU sve_state not at max VL"
        regs = replace(regs, zcr_limit=max_len, zcr_len=max_len)
        regs = replace(regs, v=st.sve_v, zhi=st.sve_zhi, p=st.sve_p, fpsr=st.fpsr,
                       zcr_len=vcpu.zcr_el1 & ZCR_ELX_LEN_MASK)
    else:
        regs = replace(regs, v=st.vregs, zhi=ZERO, fpsr=st.fpsr)
    if fpmr_switched(world, vcpu):
        regs = replace(regs, fpmr=st.fpmr)
    world = world.with_host(world.host.with_regs(cpu, regs))
    world = owner_step(world, cpu, "fp_trap")
    return update_traps(world, world.vcpu(ctx)), True


def _hyp_save_host_shared_layout(world: KvmWorld, vcpu: Vcpu, cpu: int) -> KvmWorld:
    """Pre-v6.15 hyp: save the host FPSIMD state into the VMM's uw.fpsimd_state, and the
    host FPMR (if the host has FPMR) where fpsimd_share_end() says it is."""
    host = world.host
    t = host.task(world.vmm)
    regs = host.cpus[cpu].regs
    st = host.store(t.store)
    host = host.with_store(t.store, replace(st, vregs=regs.v, fpsr=regs.fpsr,
                                            fp_type=FP_STATE_FPSIMD))
    if host.caps.fpmr and vcpu.host_fpmr_offset is not None:
        hit = thread_fields_at(vcpu.host_fpmr_offset, 8)
        if hit == ("uw.fpmr",):
            host = host.with_store(t.store, replace(host.store(t.store), fpmr=regs.fpmr))
        else:
            host = host.update_task(t, clobbered=t.clobbered | frozenset(hit))
    return world.with_host(host)
