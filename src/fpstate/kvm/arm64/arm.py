"""KVM_RUN for one vCPU: arch/arm64/kvm/arm.c (v6.17), FP parts.

The VMM thread enters KVM_RUN through a syscall (fpsimd_syscall_enter() discards its SVE
state beyond FPSIMD, as the ABI allows).  On the first run of each vCPU,
kvm_arch_vcpu_run_pid_change() requires an initialised (-ENOEXEC) and finalized (-EPERM)
vCPU, computes HCRX_EL2 from the VM's ID registers (kvm_calculate_traps()) and sets
KVM_ARCH_FLAG_HAS_RAN_ONCE, which freezes the ID registers.  Then kvm_arch_vcpu_load()
(here: its FP part), and the run loop: ctxflush, enter, guest, exit, ctxsync.  Returning to
userspace puts the vCPU, then the normal syscall exit restores the VMM's own FP state.

Preemption inside KVM_RUN goes through the preempt notifier: kvm_arch_vcpu_put() runs before
fpsimd_thread_switch(), so at switch time no vCPU state is bound; kvm_arch_vcpu_load() runs
when the thread is scheduled back in.
"""

from __future__ import annotations

import errno

from fpstate.arm64.statemachine import IllegalEvent, replace
from fpstate.kernel.arm64 import entry_common
from fpstate.kernel.arm64 import fpsimd as host_fpsimd
from fpstate.kernel.arm64.state import TASK_KERNEL
from fpstate.kvm.arm64.fpsimd import (
    fpsimd_lazy_switch_to_guest,
    fpsimd_lazy_switch_to_host,
    kvm_arch_vcpu_ctxflush_fp,
    kvm_arch_vcpu_ctxsync_fp,
    kvm_arch_vcpu_load_fp,
    kvm_arch_vcpu_put_fp,
    run_step,
    update_traps,
)
from fpstate.kvm.arm64.handle_exit import guest_op
from fpstate.kvm.arm64.kvm_host import VCPU_PREEMPTED, KvmWorld
from fpstate.kvm.arm64.reset import kvm_arm_vcpu_is_finalized
from fpstate.kvm.arm64.sys_regs import kvm_calculate_traps


def kvm_arch_vcpu_run_pid_change(world: KvmWorld, ctx: str) -> tuple[KvmWorld, int]:
    """First KVM_RUN of a vCPU: checks, trap calculation, KVM_ARCH_FLAG_HAS_RAN_ONCE."""
    vcpu = world.vcpu(ctx)
    if not vcpu.initialized:
        return world, -errno.ENOEXEC
    if not kvm_arm_vcpu_is_finalized(world, vcpu):
        return world, -errno.EPERM
    if vcpu.has_run:
        return world, 0
    vm = world.vm(vcpu.vm)
    if not vm.has_ran_once:
        world = world.with_vm(replace(vm, has_ran_once=True, id_regs_at_first_run=vm.id_regs))
    vcpu = replace(world.vcpu(ctx), has_run=True)
    return world.with_vcpu(replace(vcpu, hcrx_el2=kvm_calculate_traps(world, vcpu))), 0


def kvm_arch_vcpu_load(world: KvmWorld, ctx: str, cpu: int) -> KvmWorld:
    """kvm_arch_vcpu_load() on ``cpu`` (FP part: kvm_arch_vcpu_load_fp())."""
    vcpu = world.vcpu(ctx)
    world = run_step(world, vcpu, "vcpu_load" if vcpu.run != VCPU_PREEMPTED else "resume")
    world = world.with_vcpu(replace(world.vcpu(ctx), cpu=cpu))
    return kvm_arch_vcpu_load_fp(world, ctx)


def kvm_arch_vcpu_put(world: KvmWorld, ctx: str, preempt: bool = False) -> KvmWorld:
    """kvm_arch_vcpu_put() (FP part: kvm_arch_vcpu_put_fp())."""
    vcpu = world.vcpu(ctx)
    world = run_step(world, vcpu, "preempt" if preempt else "vcpu_put")
    world = kvm_arch_vcpu_put_fp(world, ctx)
    cpu = vcpu.cpu
    assert cpu is not None
    world = world.with_hyp(cpu, replace(world.hyp[cpu], guest=None))
    return world.with_vcpu(replace(world.vcpu(ctx), cpu=None))


def kvm_run(world: KvmWorld, ctx: str) -> tuple[KvmWorld, int]:
    """KVM_RUN entry: the VMM (in user mode) makes the syscall; first-run checks; load."""
    cpu = world.vmm_cpu()
    host = entry_common.syscall_enter(world.host, cpu)
    world, ret = kvm_arch_vcpu_run_pid_change(world.with_host(host), ctx)
    if ret:
        return world.with_host(entry_common.syscall_exit(world.host, cpu)), ret
    return kvm_arch_vcpu_load(world, ctx, cpu), 0


def enter_guest(world: KvmWorld, ctx: str) -> KvmWorld:
    """One iteration's entry: ctxflush (irqs off), traps, lazy switch, ERET to the guest."""
    vcpu = world.vcpu(ctx)
    world = run_step(world, vcpu, "enter")
    world = kvm_arch_vcpu_ctxflush_fp(world, ctx)
    world = update_traps(world, world.vcpu(ctx))
    world = fpsimd_lazy_switch_to_guest(world, ctx)
    cpu = vcpu.cpu
    assert cpu is not None
    return world.with_hyp(cpu, replace(world.hyp[cpu], guest=ctx))


def exit_guest(world: KvmWorld, ctx: str) -> KvmWorld:
    """A guest exit handled in the host: lazy switch back, then ctxsync."""
    world = run_step(world, world.vcpu(ctx), "exit")
    world = fpsimd_lazy_switch_to_host(world, ctx)
    world = kvm_arch_vcpu_ctxsync_fp(world, ctx)
    cpu = world.vcpu(ctx).cpu
    assert cpu is not None
    return world.with_hyp(cpu, replace(world.hyp[cpu], guest=None))


def return_to_user(world: KvmWorld, ctx: str) -> KvmWorld:
    """KVM_RUN returns: vcpu_put, then the VMM's syscall exit restores its FP state."""
    cpu = world.vcpu(ctx).cpu
    assert cpu is not None
    world = kvm_arch_vcpu_put(world, ctx)
    return world.with_host(entry_common.syscall_exit(world.host, cpu))


def host_softirq_neon(world: KvmWorld, ctx: str) -> KvmWorld:
    """A softirq uses kernel-mode NEON between two exits of the vCPU's run loop."""
    vcpu = world.vcpu(ctx)
    world = run_step(world, vcpu, "host_op")
    assert vcpu.cpu is not None
    return world.with_host(host_fpsimd.kernel_neon(world.host, vcpu.cpu, softirq=True))


def preempt_vcpu(world: KvmWorld, ctx: str, nxt: str | None) -> KvmWorld:
    """The VMM thread is preempted inside KVM_RUN: preempt notifier put, then the switch.
    IllegalEvent (VCPU_RUN) unless the vCPU is loaded between two guest runs."""
    cpu = world.vcpu(ctx).cpu
    world = kvm_arch_vcpu_put(world, ctx, preempt=True)
    assert cpu is not None
    return world.with_host(host_fpsimd.schedule(world.host, cpu, nxt))


def resume_vcpu(world: KvmWorld, ctx: str, cpu: int) -> KvmWorld:
    """The VMM thread is scheduled back in on ``cpu`` (whose current task is in the kernel
    or idle): the switch, then the preempt notifier's kvm_arch_vcpu_load()."""
    cur = world.host.current(cpu)
    if cur is not None and cur.mode != TASK_KERNEL:
        raise IllegalEvent("task", cur.mode, "schedule_out", f"{cur.name} is in user mode")
    world = world.with_host(host_fpsimd.schedule(world.host, cpu, world.vmm))
    return kvm_arch_vcpu_load(world, ctx, cpu)


def run_guest(world: KvmWorld, ctx: str, ops: list[str | tuple[str, int | str]]) -> KvmWorld:
    """Convenience: KVM_RUN, enter, the guest ops, exit, return to userspace.  Raises
    IllegalEvent carrying the errno if KVM_RUN refuses to run."""
    world, ret = kvm_run(world, ctx)
    if ret:
        raise IllegalEvent("KVM_RUN", "refused", ctx, f"KVM_RUN returned {ret}")
    world = enter_guest(world, ctx)
    for op in ops:
        name, arg = (op, None) if isinstance(op, str) else op
        world = guest_op(world, ctx, name, arg)
    return return_to_user(exit_guest(world, ctx), ctx)
