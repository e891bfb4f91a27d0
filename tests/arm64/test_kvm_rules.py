"""KVM/arm64 rules of issue 5 not covered elsewhere: when the host's FP state is saved under
the upstream design (and under the pre-v6.15 scheme the shared-layout variant keeps), every
CPTR_EL2/CPACR_EL1 value __activate_cptr_traps() writes, FPMR switching gated on host AND
VM, and VM-wide freezing of the ID registers."""

import errno

import pytest

from fpstate.arm64.regs import Tok
from fpstate.kvm.arm64 import arm, guest, reset
from fpstate.kvm.arm64 import fpsimd as kf
from fpstate.kvm.arm64.config import FPMR_SHARED_LAYOUT, FPMR_UNGATED, UPSTREAM, KvmConfig
from fpstate.kvm.arm64.handle_exit import guest_op
from fpstate.kvm.arm64.kvm_host import FP_STATE_FREE, FP_STATE_GUEST_OWNED, FP_STATE_HOST_OWNED
from fpstate.kvm.arm64.sys_regs import HCRX_EL2_ENFPM, HCRX_EL2_SMPME, sysreg_one_reg_id


def vmm_state(w):
    st = w.host.store("thread:vmm")
    return st.vregs, st.fpmr, st.fp_type


def test_upstream_saves_the_host_at_vcpu_load_and_hyp_never_does(kvm):
    """kvm_arch_vcpu_load_fp(): fpsimd_save_and_flush_cpu_state(), fp_owner = FREE; the
    first guest FP trap then loads the guest without saving anything of the host."""
    w, c = kvm.make_vm()
    w = kvm.vmm_op("fpmr_write")(kvm.vmm_op("fpsimd_write")(w))
    w, ret = arm.kvm_run(w, c)
    assert ret == 0 and w.hyp[0].fp_owner == FP_STATE_FREE
    saved = vmm_state(w)
    assert saved[0].writer == "vmm" and saved[1].writer == "vmm"
    assert w.host.cpus[0].last.st is None and w.vmm_task().tif_foreign_fpstate
    w = guest_op(arm.enter_guest(w, c), c, "fpsimd_write")
    assert w.hyp[0].fp_owner == FP_STATE_GUEST_OWNED
    assert vmm_state(w) == saved                              # hyp wrote nothing of the host


def test_upstream_never_enters_host_owned(kvm):
    w, c = kvm.make_vm()
    w = kvm.vmm_op("sve_write")(w)
    seen = set()
    for step in (kvm.run(c), kvm.g(c, "sve_write"), lambda w: arm.exit_guest(w, c),
                 lambda w: arm.host_softirq_neon(w, c), lambda w: arm.enter_guest(w, c),
                 kvm.g(c, "fpsimd_read"), kvm.leave(c), kvm.run(c), kvm.leave(c)):
        w = step(w)
        seen.add(w.hyp[0].fp_owner)
    assert FP_STATE_HOST_OWNED not in seen and seen == {FP_STATE_FREE, FP_STATE_GUEST_OWNED}


def test_shared_layout_keeps_the_host_live_until_the_first_guest_trap(kvm):
    """The pre-v6.15 scheme: vcpu_load leaves the host's registers live (HOST_OWNED) and hyp
    saves them into the VMM's thread on the first guest FP trap."""
    w, c = kvm.make_vm(variant=FPMR_SHARED_LAYOUT)
    w = kvm.vmm_op("fpsimd_write")(w)
    vmm_v = w.host.obs[-1].value
    w, _ = arm.kvm_run(w, c)
    assert w.hyp[0].fp_owner == FP_STATE_HOST_OWNED
    assert w.host.store("thread:vmm").vregs != vmm_v          # not saved at load
    w = guest_op(arm.enter_guest(w, c), c, "fpsimd_write")
    assert w.hyp[0].fp_owner == FP_STATE_GUEST_OWNED
    assert w.host.store("thread:vmm").vregs == vmm_v          # saved by hyp at the trap


# __activate_cptr_traps_vhe(): TAM | CPACR.TTA, FPEN if owned, ZEN if owned and SVE.
# __activate_cptr_traps_nvhe(): RES1 | TAM | TTA | TSM, TZ unless owned and SVE, TFP unless
# owned.  SME (SMEN / TSM) traps in every row.
@pytest.mark.parametrize("vhe,owned,sve,value", [
    (True, False, False, 0x5000_0000), (True, False, True, 0x5000_0000),
    (True, True, False, 0x5030_0000), (True, True, True, 0x5033_0000),
    (False, False, False, 0x4010_37FF), (False, False, True, 0x4010_37FF),
    (False, True, False, 0x4010_33FF), (False, True, True, 0x4010_32FF),
])
def test_every_cptr_value(vhe, owned, sve, value):
    cfg = KvmConfig(UPSTREAM, vhe)
    assert kf.activate_cptr_traps(cfg, owned, sve) == value
    assert kf.cptr_traps(cfg, value) == {"FP": not owned, "SVE": not (owned and sve),
                                         "SME": True}


@pytest.mark.parametrize("vhe", [True, False])
def test_non_sve_vcpu_owning_fp_still_traps_sve(kvm, vhe):
    w, c = kvm.make_vm(sve=False, vhe=vhe)
    w = guest_op(kvm.run(c)(w), c, "fpsimd_write")
    assert w.hyp[0].cptr == (0x5030_0000 if vhe else 0x4010_33FF)
    w = guest_op(w, c, "sve_write")
    assert w.host.obs[-1].action == "undef"


@pytest.mark.parametrize("variant,pfr2,switched", [
    (UPSTREAM, 1 << 32, True),          # host has FPMR and the VM advertises it
    (UPSTREAM, 0, False),               # hidden: hyp leaves FPMR alone
    (FPMR_UNGATED, 0, True),            # seed 002's rejected design switches it anyway
])
def test_hyp_loads_the_guest_fpmr_only_if_host_and_vm_have_it(kvm, variant, pfr2, switched):
    w, c = kvm.make_vm(variant=variant)
    w, _ = guest.kvm_arm_set_reg(w, c, sysreg_one_reg_id("FPMR"), Tok(c, 7))
    w, ret = guest.kvm_arm_set_reg(w, c, sysreg_one_reg_id("ID_AA64PFR2_EL1"), pfr2)
    assert ret == 0
    w = kvm.vmm_op("fpmr_write")(w)
    vmm_fpmr = w.host.obs[-1].value
    w = guest_op(kvm.run(c)(w), c, "fpsimd_write")
    assert w.host.cpus[0].regs.fpmr == (Tok(c, 7) if switched else vmm_fpmr)
    assert bool(w.vcpu(c).hcrx_el2 & HCRX_EL2_ENFPM) == switched


def test_a_host_without_fpmr_cannot_advertise_or_switch_it(kvm):
    w, c = kvm.make_vm("neoverse-v2", variant=FPMR_UNGATED)
    assert guest.kvm_arm_set_reg(w, c, sysreg_one_reg_id("ID_AA64PFR2_EL1"),
                                 1 << 32)[1] == -errno.EINVAL
    w = guest_op(kvm.run(c)(w), c, "fpmr_read")
    assert w.host.obs[-1].action == "undef"                   # FEAT_FPMR absent on the PE


def test_id_registers_freeze_for_the_whole_vm(kvm):
    """KVM_ARCH_FLAG_HAS_RAN_ONCE is per VM: once vCPU 0 ran, vCPU 1 (never run) gets EBUSY
    for a change, 0 for the same value, and its own first run computes HCRX_EL2 from the
    frozen registers."""
    w, c0 = kvm.make_vm()
    w, c1 = reset.kvm_create_vcpu(w, "vm0")
    w, _ = reset.kvm_arm_vcpu_init(w, c1, frozenset({"SVE"}))
    w, _ = reset.kvm_arm_vcpu_finalize(w, c1)
    w, ret = guest.kvm_arm_set_reg(w, c1, sysreg_one_reg_id("ID_AA64PFR2_EL1"), 0)
    assert ret == 0                                            # before any run: allowed
    w = kvm.leave(c0)(kvm.run(c0)(w))
    pfr2 = sysreg_one_reg_id("ID_AA64PFR2_EL1")
    assert guest.kvm_arm_set_reg(w, c1, pfr2, 1 << 32)[1] == -errno.EBUSY
    assert guest.kvm_arm_set_reg(w, c1, pfr2, 0)[1] == 0
    assert not w.vcpu(c1).has_run
    w, ret = arm.kvm_run(w, c1)
    assert ret == 0 and w.vcpu(c1).hcrx_el2 == HCRX_EL2_SMPME
