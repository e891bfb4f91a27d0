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


ONE_VM = {"cpus": 1, "processes": {"vmm": 1}, "vms": {"vm0": {"vmm": "vmm.t0", "vcpus": 1}}}


def _guest_mxcsr_world():
    w = make_world("x86", ONE_VM, None)
    for a in [A("run", task="vmm.t0", cpu=0), A("ldmxcsr", task="vmm.t0"),
              A("kvm_run", task="vmm.t0", vcpu="vm0.v0", guest="ldmxcsr")]:
        r = w.step(a)
        assert not r.violations, (a, r.violations)
    return w


def test_a_guests_mxcsr_is_its_own_and_survives_init() -> None:
    """The guest's LDMXCSR loads a value naming it (0x8000 | VM << 8 | vCPU: low bits 0, so
    MXCSR_DEFAULT ^ 0 << 7 with RC = 1); the VMM task keeps its own across KVM_RUN; an INIT
    (kvm_xstate_reset: MPX and CET only) leaves MXCSR as it was (SDM Vol. 3A 10.1.1: INIT
    leaves MXCSR unchanged)."""
    w = _guest_mxcsr_world()
    assert w.do_observe_vcpu("vm0.v0")["mxcsr"] == 0x3F80
    vmm = w.tasks["vmm.t0"]
    assert w.do_observe("vmm.t0")["mxcsr"] == (0x1F80 ^ vmm.pid << 7) | 1 << 13
    r = w.step(A("kvm_init", task="vmm.t0", vcpu="vm0.v0"))
    assert not r.violations and w.do_observe_vcpu("vm0.v0")["mxcsr"] == 0x3F80
    r = w.step(A("kvm_run", task="vmm.t0", vcpu="vm0.v0", guest="ldmxcsr"))
    assert not r.violations and w.do_observe_vcpu("vm0.v0")["mxcsr"] == 0x5F80


def test_an_init_that_resets_mxcsr_is_a_lost_write(monkeypatch) -> None:
    """An INIT that also put the guest's MXCSR to 1F80H (treating INIT as RESET for the SSE
    state) loses the guest's value: no-lost-write names MXCSR."""
    from fpstate.kvm.x86 import x86 as kx86

    real = kx86.kvm_xstate_reset

    def resets_mxcsr(c, vcpu, init_event):
        out = real(c, vcpu, init_event)
        if init_event:
            vcpu.arch.guest_fpu.fpstate.regs[24:28] = (0x1F80).to_bytes(4, "little")
        return out

    w = _guest_mxcsr_world()
    monkeypatch.setattr(kx86, "kvm_xstate_reset", resets_mxcsr)
    r = w.step(A("kvm_init", task="vmm.t0", vcpu="vm0.v0"))
    assert {v.invariant for v in r.violations} == {"no-lost-write"}
    assert ("guest vm0.v0 would see MXCSR 0x1f80 (init) instead of its MXCSR 0x3f80 "
            "(vm0.v0's value 1)") in str(r.violations[0])


def test_set_xsave_of_the_guests_own_buffer_keeps_every_value() -> None:
    """KVM_GET_XSAVE2 then KVM_SET_XSAVE of that buffer (a VMM's snapshot and restore): the
    guest sees its AVX value and MXCSR as before, the header shows what it holds, and the
    guest runs on from there."""
    w = _guest_mxcsr_world()
    w.step(A("kvm_run", task="vmm.t0", vcpu="vm0.v0", guest="write avx"))
    before = w.do_observe_vcpu("vm0.v0")
    r = w.step(A("set_xsave", task="vmm.t0", vcpu="vm0.v0"))
    assert not r.violations and r.observed["ret"] == 0
    assert r.observed["xstate_bv"] & 0x6 == 0x6
    assert w.do_observe_vcpu("vm0.v0") == before
    assert before["avx"] == "vm0.v0#1" and before["mxcsr"] == 0x3F80
    r = w.step(A("kvm_run", task="vmm.t0", vcpu="vm0.v0", guest="write avx"))
    assert not r.violations and w.do_observe_vcpu("vm0.v0")["avx"] == "vm0.v0#2"


def test_a_set_xsave_that_drops_a_component_is_a_lost_write(monkeypatch) -> None:
    """A KVM_SET_XSAVE that cleared AVX from the header it copies (the buffer's XSTATE_BV
    cut to the legacy features) loses the guest's AVX value: no-lost-write."""
    from fpstate.kvm.x86 import x86 as kx86

    real = kx86.kvm_arch_vcpu_ioctl_set_xsave

    def drops_avx(c, vcpu, buf):
        cut = bytearray(buf)
        bv = int.from_bytes(cut[512:520], "little") & ~0x4
        cut[512:520] = bv.to_bytes(8, "little")
        return real(c, vcpu, bytes(cut))

    w = _guest_mxcsr_world()
    w.step(A("kvm_run", task="vmm.t0", vcpu="vm0.v0", guest="write avx"))
    monkeypatch.setattr(kx86, "kvm_arch_vcpu_ioctl_set_xsave", drops_avx)
    r = w.step(A("set_xsave", task="vmm.t0", vcpu="vm0.v0"))
    assert {v.invariant for v in r.violations} == {"no-lost-write"}
    assert "avx" in str(r.violations[0]).lower()
