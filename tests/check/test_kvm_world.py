"""The checker's KVM world (fpstate.check.actions_kvm): its bookkeeping of what each guest
should see, with several VMMs at once."""

from __future__ import annotations

from fpstate.check.scenario import make_world
from fpstate.check.world import Action

A = Action.of
TWO_VMS = {"cpus": 2, "processes": {"p0": 1, "p1": 1},
           "vms": {"vm0": {"vmm": "p1.t0", "vcpus": 1}, "vm1": {"vmm": "p0.t0", "vcpus": 1}}}


def test_two_vmms_inside_kvm_run_at_once_each_finish_their_own_run() -> None:
    """Each VMM thread's suspended KVM_RUN is its own: finishing p1.t0's run updates what
    vm0.v0 should see (the world used to keep one pending run, so the second kvm_enter
    replaced the first and vm0.v0's write was reported as a foreign/lost value)."""
    w = make_world("x86", TWO_VMS, None)
    for a in [A("run", task="p1.t0", cpu=0),
              A("kvm_enter", task="p1.t0", vcpu="vm0.v0", guest="write avx"),
              A("switch_in", task="p0.t0", cpu=0),
              A("return_to_user", cpu=0),
              A("kvm_enter", task="p0.t0", vcpu="vm1.v0", guest="write avx"),
              A("switch_in", task="p1.t0", cpu=0)]:
        r = w.step(a)
        assert not r.violations, (a, r.violations)
    assert [a for a in w.enabled_actions() if a.name == "kvm_finish"] == [
        A("kvm_finish", task="p1.t0")]
    r = w.step(A("kvm_finish", task="p1.t0"))
    assert not r.violations and r.observed["faults"] == "none"
    assert w.do_observe_vcpu("vm0.v0")["avx"] == "vm0.v0#1"
    assert w.do_observe_vcpu("vm1.v0")["avx"] == "init"  # its run has not entered the guest
    w.step(A("run", task="p0.t0", cpu=1))
    r = w.step(A("kvm_finish", task="p0.t0"))
    assert not r.violations
    assert w.do_observe_vcpu("vm1.v0")["avx"].startswith("vm1.v0#")
    assert not [a for a in w.enabled_actions() if a.name == "kvm_finish"]
