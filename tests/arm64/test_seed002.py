"""Seed 002 (Marc Zyngier's review of "KVM: arm64: Support FEAT_FPMR for guests", Dec 2023)
as step sequences: each passes under the upstream design and each rejected design is caught
by a named invariant, checked after every step."""

import json

import pytest

from fpstate.arm64.cpu import load_profile, profile_from_json
from fpstate.kvm.arm64 import guest, reset
from fpstate.kvm.arm64 import invariants as inv
from fpstate.kvm.arm64.config import FPMR_SHARED_LAYOUT, FPMR_UNGATED, UPSTREAM, KvmConfig
from fpstate.kvm.arm64.sys_regs import sysreg_one_reg_id

HIDE_FP8 = {"ID_AA64PFR2_EL1": 0, "ID_AA64FPFR0_EL1": 0}


def names(found):
    return {v.invariant for _, v in found}


def userspace_reads_fpmr(c):
    def step(w):
        w, _, _ = guest.kvm_arm_get_reg(w, c, sysreg_one_reg_id("FPMR"))
        return w
    return step


def hidden_fpmr_steps(kvm, c):
    """The VMM hides FPMR (ID_AA64PFR2_EL1.FPMR = 0) on an FPMR host; the guest uses FP and
    then tries FPMR anyway; the VMM reads the vCPU's FPMR."""
    return [kvm.vmm_op("fpmr_write"), kvm.run(c), kvm.g(c, "fpsimd_write"),
            kvm.g(c, "fpmr_write"), kvm.g(c, "fpmr_read"), kvm.g(c, "fp8_op"), kvm.leave(c),
            userspace_reads_fpmr(c), kvm.vmm_op("fpmr_read")]


@pytest.mark.parametrize("variant,violated", [
    (UPSTREAM, set()),
    (FPMR_UNGATED, {"guest_observes_only_advertised", "userspace_observes_only_advertised",
                    "traps_follow_advertised"}),
    (FPMR_SHARED_LAYOUT, {"host_state_in_own_storage", "context_reads_own_latest"}),
])
def test_guest_and_userspace_see_nothing_beyond_the_advertised(kvm, variant, violated):
    w, c = kvm.make_vm(variant=variant, id_regs=HIDE_FP8)
    w, found = kvm.checked(w, hidden_fpmr_steps(kvm, c))
    assert names(found) == violated
    if variant == UPSTREAM:
        undefs = [o.action for o in w.host.obs]
        assert undefs == ["read"]                        # the VMM reads its own FPMR
        assert w.host.obs[0].value.writer == "vmm"


def test_upstream_guest_fpmr_accesses_are_undef(kvm):
    w, c = kvm.make_vm(id_regs=HIDE_FP8)
    steps = hidden_fpmr_steps(kvm, c)
    for step in steps[:3]:
        w = step(w)
    for op in ("fpmr_write", "fpmr_read", "fp8_op"):
        w = kvm.g(c, op)(w)
        assert [o.action for o in w.host.obs] == ["undef"], op


def test_ungated_guest_writes_fpmr_the_vm_does_not_have(kvm):
    w, c = kvm.make_vm(variant=FPMR_UNGATED, id_regs=HIDE_FP8)
    w, found = kvm.checked(w, hidden_fpmr_steps(kvm, c)[:5])
    first = min(i for i, v in found if v.invariant == "guest_observes_only_advertised")
    assert first == 3                                     # the guest's MSR FPMR
    assert w.vm("vm0").id_regs.field("ID_AA64PFR2_EL1", "FPMR") == 0


def host_fpmr_steps(kvm, c):
    """The VMM's FPMR must survive KVM_RUN of a VM that has FPMR and uses it."""
    return [kvm.vmm_op("fpmr_write"), kvm.vmm_op("fpsimd_write"), kvm.run(c),
            kvm.g(c, "fpsimd_write"), kvm.g(c, "fpmr_write"), kvm.leave(c),
            kvm.vmm_op("fpmr_read"), kvm.vmm_op("fpsimd_read")]


@pytest.mark.parametrize("variant,violated", [
    (UPSTREAM, set()),
    (FPMR_UNGATED, set()),                        # FPMR is advertised here: nothing differs
    (FPMR_SHARED_LAYOUT, {"context_reads_own_latest", "host_state_in_own_storage"}),
])
def test_host_fpmr_survives_kvm_run(kvm, variant, violated):
    w, c = kvm.make_vm(variant=variant)
    w, found = kvm.checked(w, host_fpmr_steps(kvm, c))
    assert names(found) == violated
    if variant == FPMR_SHARED_LAYOUT:
        t = w.vmm_task()
        assert t.clobbered == {"fp_type", "fpsimd_cpu"}     # &uw.fpsimd_state + 1
        stale = [v for i, v in found if v.invariant == "context_reads_own_latest"]
        assert "vmm read FPMR" in stale[0].detail


def no_fpmr_profile():
    d = load_profile("fvp-aem-fpmr").to_json()
    d["name"] = "fvp-aem-nofpmr"
    d["id_regs"]["ID_AA64PFR2_EL1"] = "0x0"
    d["id_regs"]["ID_AA64FPFR0_EL1"] = "0x0"
    return profile_from_json(json.loads(json.dumps(d)), "test")


def migrate(kvm, variant):
    """Source: FPMR host, FP8 hidden by the VMM, the guest ran.  Destination: the same CPU
    without FEAT_FPMR, the same advertised ID registers."""
    src, c = kvm.make_vm(variant=variant, id_regs=HIDE_FP8)
    src, found = kvm.checked(src, [kvm.run(c), kvm.g(c, "sve_write"), kvm.leave(c)])
    dst = reset.kvm_init(no_fpmr_profile(), KvmConfig(variant))
    dst = reset.kvm_create_vm(dst, "vm0")
    dst, d = reset.kvm_create_vcpu(dst, "vm0")
    dst, _ = reset.kvm_arm_vcpu_init(dst, d, frozenset({"SVE"}))
    dst, _ = reset.kvm_arm_vcpu_finalize(dst, d)
    for reg, val in src.vm("vm0").id_regs.items():
        dst, ret = guest.kvm_arm_set_reg(dst, d, sysreg_one_reg_id(reg), val)
        assert ret == 0, reg
    assert inv.same_advertised(src, c, dst, d)
    return src, c, dst, d, found


@pytest.mark.parametrize("variant,caught", [
    (UPSTREAM, False), (FPMR_UNGATED, True), (FPMR_SHARED_LAYOUT, False)])
def test_restore_on_a_host_with_the_same_advertised_features(kvm, variant, caught):
    src, c, dst, d, _ = migrate(kvm, variant)
    problems = inv.same_advertised_same_registers(src, c, dst, d)
    assert bool(problems) == caught
    if caught:
        assert "FPMR listed only on the source" in problems
        assert "restore of FPMR failed with -2" in problems
        assert any("guest reaches" in p for p in problems)


def test_migrated_guest_state_arrives(kvm):
    src, c, dst, d, _ = migrate(kvm, UPSTREAM)
    src, saved = guest.save_vcpu_regs(src, c)
    stream = [(i, v) for i, v in saved if guest.reg_name(i) != "KVM_REG_ARM64_SVE_VLS"]
    dst, failures = guest.restore_vcpu_regs(dst, d, stream)
    assert failures == []
    assert dst.host.store(f"vcpu:{d}").sve_zhi == src.host.store(f"vcpu:{c}").sve_zhi
    assert dst.host.store(f"vcpu:{d}").sve_zhi.writer == "vm0/0"


def test_the_seed_quotes_are_recorded():
    by = {i.name: i for i in inv.INVARIANTS}
    assert "userspace shouldn't be able to observe" in by[
        "userspace_observes_only_advertised"].quote
    assert "pointer arithmetic" in by["host_state_in_own_storage"].quote
    assert "*everything* becomes conditional" in by["traps_follow_advertised"].quote
    assert "breaks VM migration" in inv.SAME_ADVERTISED_QUOTE
