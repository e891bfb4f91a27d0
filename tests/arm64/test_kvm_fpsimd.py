"""KVM/arm64 FP ownership, traps and SVE vector lengths (kvm/fpsimd.c, hyp switch.h)."""

import pytest

from fpstate.arm64.regs import ZERO
from fpstate.arm64.statemachine import IllegalEvent
from fpstate.errors import FpstateError
from fpstate.kernel.arm64 import entry_common as e
from fpstate.kernel.arm64 import fpsimd as k
from fpstate.kernel.arm64.state import FP_STATE_FPSIMD, FP_STATE_SVE
from fpstate.kvm.arm64 import arm
from fpstate.kvm.arm64 import fpsimd as kf
from fpstate.kvm.arm64.config import KvmConfig
from fpstate.kvm.arm64.guest import kvm_arm_get_reg
from fpstate.kvm.arm64.handle_exit import guest_op
from fpstate.kvm.arm64.kvm_host import (
    FP_STATE_FREE,
    FP_STATE_GUEST_OWNED,
    FP_STATE_HOST_OWNED,
)
from fpstate.kvm.arm64.sys_regs import HCRX_EL2_ENFPM, HCRX_EL2_SMPME, sysreg_one_reg_id


def obs(w):
    return {o.what: (o.action, o.value) for o in w.host.obs}


def test_fp_owner_table():
    assert kf.FP_OWNER.states == {FP_STATE_FREE, FP_STATE_HOST_OWNED, FP_STATE_GUEST_OWNED}
    assert kf.FP_OWNER.step(FP_STATE_GUEST_OWNED, "vcpu_load") == FP_STATE_FREE
    assert kf.FP_OWNER.step(FP_STATE_GUEST_OWNED, "ctxflush_foreign") == FP_STATE_FREE
    assert kf.FP_OWNER.step(FP_STATE_FREE, "fp_trap") == FP_STATE_GUEST_OWNED
    assert kf.FP_OWNER.step(FP_STATE_GUEST_OWNED, "put") == FP_STATE_GUEST_OWNED
    with pytest.raises(IllegalEvent, match="fp_trap"):
        kf.FP_OWNER.step(FP_STATE_GUEST_OWNED, "fp_trap")   # the traps are off


def test_vcpu_load_saves_and_unbinds_the_host(kvm):
    w, c = kvm.make_vm()
    w = kvm.vmm_op("fpsimd_write")(w)
    vmm_v = w.host.obs[-1].value
    w = kvm.vmm_op("smstart_za")(w)
    w, ret = arm.kvm_run(w, c)
    assert ret == 0
    t, cpu = w.vmm_task(), w.host.cpus[0]
    assert t.tif_foreign_fpstate and cpu.last.st is None
    assert w.host.store("thread:vmm").vregs == vmm_v
    assert not cpu.regs.za_on and w.host.store("thread:vmm").svcr == 0b10   # ZA saved, off
    assert w.hyp[0].fp_owner == FP_STATE_FREE


@pytest.mark.parametrize("vhe,free,owned", [
    (True, 0x50000000, 0x50330000),          # CPACR layout: TAM|TTA, then FPEN|ZEN
    (False, 0x401037FF, 0x401032FF),         # RES1|TAM|TTA|TSM, then TFP and TZ cleared
])
def test_trap_values_before_and_after_the_first_fp_trap(kvm, vhe, owned, free):
    w, c = kvm.make_vm(vhe=vhe)
    w = kvm.run(c)(w)
    assert w.hyp[0].cptr == free
    assert kf.cptr_traps(w.config, free) == {"FP": True, "SVE": True, "SME": True}
    w = guest_op(w, c, "fpsimd_write")
    assert w.hyp[0].fp_owner == FP_STATE_GUEST_OWNED and w.hyp[0].cptr == owned
    assert kf.cptr_traps(w.config, owned) == {"FP": False, "SVE": False, "SME": True}


def test_non_sve_vcpu_keeps_sve_trapped(kvm):
    w, c = kvm.make_vm(sve=False)
    w = guest_op(kvm.run(c)(w), c, "fpsimd_write")
    assert kf.cptr_traps(w.config, w.hyp[0].cptr) == {"FP": False, "SVE": True, "SME": True}
    for op in ("sve_write", "zcr_read", "zcr_write"):
        w = guest_op(w, c, op, 0)
        assert w.host.obs[-1].action == "undef"


def test_guest_state_loaded_once_then_live(kvm):
    w, c = kvm.make_vm()
    w = guest_op(kvm.run(c)(w), c, "sve_write")
    tok = w.host.obs[-1].value
    w = guest_op(w, c, "sve_read")                 # no trap now: the live registers
    assert obs(w)["ZHI"] == ("read", tok)


def test_exit_binds_the_vcpu_state(kvm):
    w, c = kvm.make_vm()
    w = guest_op(kvm.run(c)(w), c, "fpsimd_write")
    w = arm.exit_guest(w, c)
    last = w.host.cpus[0].last
    assert (last.st, last.sve_vl, last.to_save) == (f"vcpu:{c}", 64, FP_STATE_SVE)
    assert not w.vmm_task().tif_foreign_fpstate
    w2, c2 = kvm.make_vm(sve=False)
    w2 = arm.exit_guest(guest_op(kvm.run(c2)(w2), c2, "fpsimd_write"), c2)
    assert w2.host.cpus[0].last.to_save == FP_STATE_FPSIMD


def test_put_saves_the_guest_and_the_vmm_gets_its_own_state_back(kvm):
    w, c = kvm.make_vm()
    w = kvm.vmm_op("fpsimd_write")(w)
    vmm_v = w.host.obs[-1].value
    w = guest_op(kvm.run(c)(w), c, "sve_write")
    gtok = w.host.obs[-1].value
    w = kvm.leave(c)(w)
    st = w.host.store(f"vcpu:{c}")
    assert (st.sve_v, st.sve_zhi, st.fp_type, st.sve_vl) == (gtok, gtok, FP_STATE_SVE, 64)
    w = kvm.vmm_op("fpsimd_read")(w)
    assert obs(w)["V"] == ("read", vmm_v)


def test_softirq_neon_between_exits_makes_the_guest_reload(kvm):
    w, c = kvm.make_vm()
    w = guest_op(kvm.run(c)(w), c, "fpsimd_write")
    tok = w.host.obs[-1].value
    w = arm.host_softirq_neon(arm.exit_guest(w, c), c)
    assert w.host.store(f"vcpu:{c}").sve_v == tok          # saved through the binding
    assert w.vmm_task().tif_foreign_fpstate
    w = arm.enter_guest(w, c)                               # ctxflush: FREE, traps armed
    assert w.hyp[0].fp_owner == FP_STATE_FREE
    w = guest_op(w, c, "fpsimd_read")
    assert obs(w)["V"] == ("read", tok)


def test_preemption_inside_kvm_run(kvm):
    w, c = kvm.make_vm()
    w = w.with_host(k.spawn(w.host, "other"))
    w = guest_op(kvm.run(c)(w), c, "fpsimd_write")
    tok = w.host.obs[-1].value
    w = arm.preempt_vcpu(arm.exit_guest(w, c), c, "other")
    assert w.vcpu(c).run == "PREEMPTED" and w.host.store(f"vcpu:{c}").sve_v == tok
    w = w.with_host(e.ret_to_user(w.host, 0))
    w = w.with_host(e.user_op(w.host, 0, "sve_write"))     # other uses the registers
    w = w.with_host(e.interrupt(w.host, 0))
    w = arm.resume_vcpu(w, c, 0)
    w = guest_op(arm.enter_guest(w, c), c, "fpsimd_read")
    assert obs(w)["V"] == ("read", tok)


@pytest.mark.parametrize("where", ["out", "in_guest"])
def test_preempting_a_vcpu_outside_its_run_loop_is_illegal(kvm, where):
    """The preempt notifier's put runs only for a vCPU loaded between two guest runs:
    elsewhere preempt_vcpu is an IllegalEvent (VCPU_RUN), not a model assertion, and the
    world is unchanged (a shrunk counterexample may try it)."""
    w, c = kvm.make_vm()
    if where == "in_guest":
        w = kvm.run(c)(w)                                   # KVM_RUN, in the guest
    with pytest.raises(IllegalEvent, match="vcpu-run: event 'preempt'"):
        arm.preempt_vcpu(w, c, None)
    assert w.vcpu(c).run == ("OUT" if where == "out" else "IN_GUEST")


def test_sve_is_saved_at_the_max_vl_with_the_guests_zcr(kvm):
    w, c = kvm.make_vm()
    w = guest_op(kvm.run(c)(w), c, "zcr_write", 0)          # guest asks for VL 128
    assert k.live_vl(w.host, 0) == 16
    w = guest_op(w, c, "sve_write")
    w = arm.exit_guest(w, c)
    assert w.vcpu(c).zcr_el1 == 0 and k.live_vl(w.host, 0) == 64
    w = arm.host_softirq_neon(w, c)                          # a host save at the bound VL
    assert not w.vmm_task().killed and w.host.store(f"vcpu:{c}").sve_vl == 64
    w = guest_op(arm.enter_guest(w, c), c, "zcr_read")
    assert obs(w)["ZCR_EL1"] == ("read", 0)                 # guest ZCR restored on reload


def test_sve_vcpu_ceiling_is_its_max_vl(kvm):
    w, c = kvm.make_vm()
    w = guest_op(kvm.run(c)(w), c, "zcr_write", 15)
    assert k.live_vl(w.host, 0) == 64 and w.host.cpus[0].regs.zcr_limit == 3


def test_hcrx_follows_kvm_has_fpmr(kvm):
    w, c = kvm.make_vm()
    w = kvm.run(c)(w)
    assert w.vcpu(c).hcrx_el2 == HCRX_EL2_SMPME | HCRX_EL2_ENFPM == 0x800020
    w, c = kvm.make_vm(id_regs={"ID_AA64PFR2_EL1": 0})
    assert kvm.run(c)(w).vcpu(c).hcrx_el2 == HCRX_EL2_SMPME
    w, c = kvm.make_vm("neoverse-v2")
    assert kvm.run(c)(w).vcpu(c).hcrx_el2 == HCRX_EL2_SMPME


def test_advertised_fpmr_is_switched_and_the_host_keeps_its_own(kvm):
    w, c = kvm.make_vm()
    w = kvm.vmm_op("fpmr_write")(w)
    host_fpmr = w.host.obs[-1].value
    w = guest_op(kvm.run(c)(w), c, "fpmr_write")
    gtok = w.host.obs[-1].value
    w = kvm.leave(c)(w)
    assert w.host.store(f"vcpu:{c}").fpmr == gtok
    w = kvm.vmm_op("fpmr_read")(w)
    assert obs(w)["FPMR"] == ("read", host_fpmr)
    w = guest_op(kvm.run(c)(w), c, "fpmr_read")
    assert obs(w)["FPMR"] == ("read", gtok)


def test_hidden_fpmr_slot_is_written_but_never_observable(kvm):
    """The digest's note: the host save stores FPMR into the bound vCPU slot whenever the
    *host* has FPMR, so a VM without FPMR gets the VMM's value there; it is never restored
    to the guest nor visible through one_reg."""
    w, c = kvm.make_vm(id_regs={"ID_AA64PFR2_EL1": 0})
    w = kvm.vmm_op("fpmr_write")(w)
    w = guest_op(kvm.run(c)(w), c, "fpsimd_write")
    w = kvm.leave(c)(w)
    assert w.host.store(f"vcpu:{c}").fpmr.writer == "vmm"
    _, ret, _ = kvm_arm_get_reg(w, c, sysreg_one_reg_id("FPMR"))
    assert ret == -2
    w = guest_op(kvm.run(c)(w), c, "fpmr_read")
    assert w.host.obs[-1].action == "undef"


@pytest.mark.parametrize("profile,op", [
    ("fvp-aem-fpmr", "smstart"), ("fvp-aem-fpmr", "svcr_read"), ("fvp-aem-fpmr", "smcr_read"),
    ("fvp-aem-fpmr", "smpri_read"), ("fvp-aem-fpmr", "smidr_read"),
    ("fvp-aem-fpmr", "tpidr2_read"), ("apple-m4", "smstart"),
    ("neoverse-v2", "fpmr_read"), ("neoverse-v2", "fp8_op"), ("neoverse-n1", "sve_write"),
])
def test_guest_access_to_a_hidden_feature_is_undef(kvm, profile, op):
    w, c = kvm.make_vm(profile, sve=profile not in ("neoverse-n1", "apple-m4"))
    w = guest_op(kvm.run(c)(w), c, op)
    assert w.host.obs[-1].action == "undef"


def test_guest_reads_the_vms_id_registers(kvm):
    w, c = kvm.make_vm(sve=False)
    w = kvm.run(c)(w)
    for reg, want in (("ID_AA64PFR1_EL1", 0x21), ("ID_AA64ZFR0_EL1", 0),
                      ("ID_AA64SMFR0_EL1", 0), ("ID_AA64PFR2_EL1", 1 << 32)):
        w = guest_op(w, c, "id_read", reg)
        assert w.host.obs[-1].value == want, reg
    assert w.vm("vm0").id_regs.field("ID_AA64PFR0_EL1", "SVE") == 0


@pytest.mark.parametrize("bad", [
    lambda w, c: guest_op(w, c, "fpsimd_write"),           # not running
    lambda w, c: arm.enter_guest(w, c),                    # not loaded
    lambda w, c: arm.exit_guest(w, c),
    lambda w, c: arm.kvm_arch_vcpu_put(w, c),
])
def test_run_lifecycle_illegal_events_raise_and_change_nothing(kvm, bad):
    w, c = kvm.make_vm()
    before = w
    with pytest.raises(IllegalEvent):
        bad(w, c)
    assert w == before and w.vcpu(c).run == "OUT"


def test_put_while_in_guest_is_illegal(kvm):
    w, c = kvm.make_vm()
    w = kvm.run(c)(w)
    with pytest.raises(IllegalEvent, match="vcpu_put"):
        arm.kvm_arch_vcpu_put(w, c)
    assert w.vcpu(c).run == "IN_GUEST"
    with pytest.raises(IllegalEvent, match="enter"):
        arm.enter_guest(w, c)


def test_upstream_state_is_clean_after_a_full_run(kvm):
    w, c = kvm.make_vm()
    steps = [kvm.vmm_op("fpmr_write"), kvm.vmm_op("sve_write"), kvm.run(c),
             kvm.g(c, "sve_write"), kvm.g(c, "fpmr_write"), kvm.g(c, "fpsimd_read"),
             lambda w: arm.host_softirq_neon(arm.exit_guest(w, c), c),
             lambda w: arm.enter_guest(w, c), kvm.g(c, "sve_read"), kvm.g(c, "fpmr_read"),
             kvm.leave(c), kvm.vmm_op("fpmr_read"), kvm.vmm_op("fpsimd_read")]
    w, found = kvm.checked(w, steps)
    assert found == []
    assert w.host.obs[-1].value.writer == "vmm"


def test_config_rejects_unknown_variants():
    with pytest.raises(FpstateError, match="unknown KVM arm64 variant"):
        KvmConfig("fpmr-everywhere")


def test_vcpu_store_starts_zeroed(kvm):
    w, c = kvm.make_vm()
    st = w.host.store(f"vcpu:{c}")
    assert (st.vregs, st.sve_v, st.fpmr, st.sve_size) == (ZERO, ZERO, ZERO, 2184)


def test_worlds_are_hashable_values(kvm):
    """The checker hashes states: equal histories give equal, hashable worlds."""
    a, c = kvm.make_vm()
    b, _ = kvm.make_vm()
    assert a == b and hash(a) == hash(b)
    a2 = guest_op(kvm.run(c)(a), c, "fpsimd_write")
    assert a2 != a and len({a, b, a2}) == 2
