"""Every named invariant holds on an upstream run and fails on a state that breaks its rule."""

from dataclasses import replace

import pytest

from fpstate.arm64.regs import Tok
from fpstate.kernel.arm64.state import Binding, Observation
from fpstate.kvm.arm64 import arm
from fpstate.kvm.arm64 import invariants as inv
from fpstate.kvm.arm64.handle_exit import guest_op


def test_registry():
    names = [i.name for i in inv.INVARIANTS]
    assert len(names) == len(set(names)) == 13
    for i in inv.INVARIANTS:
        assert i.quote and i.source and callable(i.check), i.name


def observe(w, *o):
    return w.with_host(w.host.observe(*o))


def running_guest(kvm, **kw):
    w, c = kvm.make_vm(**kw)
    return guest_op(kvm.run(c)(w), c, "fpsimd_write"), c


def broken(kvm, name):
    """A world that breaks invariant ``name`` (built by hand, not by a model path)."""
    w, c = kvm.make_vm()
    if name == "guest_observes_only_advertised":
        w, c = kvm.make_vm(sve=False)
        return observe(w, Observation(c, "ZHI", "SVE", "read", Tok(c, 1)))
    if name == "userspace_observes_only_advertised":
        w, c = kvm.make_vm(id_regs={"ID_AA64PFR2_EL1": 0})
        return observe(w, Observation(f"user:{c}", "FPMR", "FPMR", "read", Tok("", 0)))
    if name == "no_context_observes_another":
        return observe(w, Observation("vmm", "V", "FP", "read", Tok(c, 4)))
    if name == "context_reads_own_latest":
        w = kvm.vmm_op("fpsimd_write")(w)
        return observe(w, Observation("vmm", "V", "FP", "read", Tok("vmm", 0)))
    if name == "traps_iff_not_owned":
        w, c = running_guest(kvm)
        return w.with_hyp(0, replace(w.hyp[0], cptr=0x50000000))    # FP trapped, guest owns
    if name == "guest_owned_state_bound":
        w, c = running_guest(kvm)
        w = arm.exit_guest(w, c)
        cpu = w.host.cpus[0]
        return w.with_host(w.host.with_cpu(replace(cpu, last=Binding("thread:vmm"))))
    if name == "traps_follow_advertised":
        w, c = kvm.make_vm(id_regs={"ID_AA64PFR2_EL1": 0})
        w = kvm.run(c)(w)
        return w.with_vcpu(replace(w.vcpu(c), hcrx_el2=w.vcpu(c).hcrx_el2 | (1 << 23)))
    if name == "host_state_in_own_storage":
        t = w.vmm_task()
        return w.with_host(w.host.with_task(replace(t, clobbered=frozenset({"fp_type"}))))
    if name == "host_traps_follow_tif":  # EL0 SVE enabled for a live task without TIF_SVE
        w = kvm.vmm_op("fpsimd_write")(w)
        t = w.vmm_task()
        assert t.mode == "user" and not t.tif_foreign_fpstate and not t.tif_sve
        cpu = next(c for c in w.host.cpus if c.current == t.name)
        return w.with_host(w.host.with_cpu(replace(cpu, el0_sve=True)))
    if name == "host_never_warns":  # task_fpsimd_load() of SVE-format state, TIF_SVE clear
        from fpstate.kernel.arm64 import fpsimd
        t = replace(w.vmm_task(), tif_sve=False)
        st = replace(w.host.store(t.store), fp_type="FP_STATE_SVE", sve_vl=t.sve_vl,
                     sve_size=fpsimd.sve_state_size(t.sve_vl, t.sme_vl))
        host = w.host.with_task(t).with_store(t.store, st)
        cpu = next(c.idx for c in host.cpus if c.current == t.name)
        return w.with_host(fpsimd.task_fpsimd_load(host, cpu))
    if name == "id_regs_frozen_after_run":
        w = kvm.leave(c)(kvm.run(c)(w))
        vm = w.vm("vm0")
        return w.with_vm(replace(vm, id_regs=vm.id_regs.with_reg("ID_AA64PFR2_EL1", 0)))
    if name == "vcpu_sve_state_at_max_vl":
        st = w.host.store(f"vcpu:{c}")
        return w.with_host(w.host.with_store(f"vcpu:{c}", replace(st, sve_vl=16)))
    if name == "no_streaming_or_za_in_guest":
        w, c = running_guest(kvm)
        regs = w.host.cpus[0].regs
        return w.with_host(w.host.with_regs(0, replace(regs, za_on=True)))
    raise AssertionError(name)


@pytest.mark.parametrize("name", [i.name for i in inv.INVARIANTS])
def test_each_invariant_can_fail(kvm, name):
    found = inv.check(broken(kvm, name))
    assert name in {v.invariant for v in found}
    assert all(str(v).startswith(v.invariant + ": ") for v in found)


def test_kill_at_a_wrong_vl_is_a_violation(kvm):
    w, _ = kvm.make_vm()
    t = replace(w.vmm_task(), killed="SIGKILL")
    found = inv.vcpu_sve_state_at_max_vl(w.with_host(w.host.with_task(t)))
    assert found == ["vmm killed: SIGKILL"]


def test_pair_invariant_is_vacuous_when_the_advertised_features_differ(kvm):
    a, ca = kvm.make_vm()
    b, cb = kvm.make_vm(id_regs={"ID_AA64PFR2_EL1": 0})
    assert not inv.same_advertised(a, ca, b, cb)
    assert inv.same_advertised_same_registers(a, ca, b, cb) == []
    assert inv.same_advertised(a, ca, a, ca)
    assert inv.same_advertised_same_registers(a, ca, a, ca) == []


def test_guest_accessible_state(kvm):
    w, c = kvm.make_vm()
    assert inv.guest_accessible(w, w.vcpu(c)) == {"V", "FPSR", "ZHI", "P", "FPMR"}
    w, c = kvm.make_vm(sve=False, id_regs={"ID_AA64PFR2_EL1": 0})
    assert inv.guest_accessible(w, w.vcpu(c)) == {"V", "FPSR"}
