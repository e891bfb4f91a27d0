"""Builders shared by the arm64 KVM tests (fixtures: importlib mode has no test imports)."""

from types import SimpleNamespace

import pytest

from fpstate.arm64.cpu import load_profile
from fpstate.kernel.arm64 import entry_common as e
from fpstate.kvm.arm64 import arm, guest, reset
from fpstate.kvm.arm64 import invariants as inv
from fpstate.kvm.arm64.config import KvmConfig
from fpstate.kvm.arm64.handle_exit import guest_op
from fpstate.kvm.arm64.sys_regs import sysreg_one_reg_id


def make_vm(profile="fvp-aem-fpmr", variant="upstream", sve=True, id_regs=None,
            finalize=True, vhe=True, name="vm0"):
    """A VMM running on CPU 0 with one VM of one vCPU, configured as a VMM does it."""
    w = reset.kvm_init(load_profile(profile), KvmConfig(variant, vhe))
    w = reset.kvm_create_vm(w, name)
    w, c = reset.kvm_create_vcpu(w, name)
    w, ret = reset.kvm_arm_vcpu_init(w, c, frozenset({"SVE"}) if sve else frozenset())
    assert ret == 0
    if finalize and sve:
        w, ret = reset.kvm_arm_vcpu_finalize(w, c)
        assert ret == 0
    for reg, val in (id_regs or {}).items():
        w, ret = guest.kvm_arm_set_reg(w, c, sysreg_one_reg_id(reg), val)
        assert ret == 0, (reg, ret)
    return w, c


def checked(world, steps):
    """Apply each step (a function world -> world) and collect every invariant violation
    after every step: [(step index, Violation)]."""
    found = []
    for i, step in enumerate(steps):
        world = step(world)
        found += [(i, v) for v in inv.check(world)]
    return world, found


def vmm_op(op):
    return lambda w: w.with_host(e.user_op(w.host, w.vmm_cpu(), op))


def g(ctx, op, arg=None):
    return lambda w: guest_op(w, ctx, op, arg)


def run(ctx):
    def step(w):
        w, ret = arm.kvm_run(w, ctx)
        assert ret == 0, ret
        return arm.enter_guest(w, ctx)
    return step


def leave(ctx):
    return lambda w: arm.return_to_user(arm.exit_guest(w, ctx), ctx)


@pytest.fixture
def kvm():
    return SimpleNamespace(make_vm=make_vm, checked=checked, vmm_op=vmm_op, g=g, run=run,
                           leave=leave)
