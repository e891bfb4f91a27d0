"""What a guest FP/SVE/SME/FPMR access does: the architecture's trap checks, then hyp
(hyp/include/hyp/switch.h) or the exit handlers (arch/arm64/kvm/handle_exit.c, sys_regs.c).

For each guest operation, in the architecture's priority order (Arm ARM pseudo-code for
MRS/MSR FPMR and CheckSVEEnabled()/CheckFPAdvSIMDEnabled64()):

* FPMR and FP8: the encoding is UNDEFINED without FEAT_FPMR on the PE; with HCRX_EL2.EnFPM
  clear the access traps to EL2 with EC 0x18 (before any FP trap) and sys_regs.c's
  undef_access() injects UNDEF, and FP8 instructions are UNDEFINED; otherwise the FP trap
  (EC 0x07) applies.
* SVE and ZCR_EL1: UNDEFINED without FEAT_SVE; CPTR_EL2.TZ / ZEN trap with EC 0x19:
  kvm_hyp_handle_fpsimd() for an SVE vCPU, handle_sve() -> UNDEF otherwise.
* FP/AdvSIMD: CPTR_EL2.TFP / FPEN trap with EC 0x07: kvm_hyp_handle_fpsimd().
* SME instructions: CPTR_EL2.TSM / SMEN trap with EC 0x1D, which has no handler:
  kvm_handle_unknown_ec() -> UNDEF.  SVCR, SMCR_EL1, SMPRI_EL1, SMIDR_EL1, TPIDR2_EL0:
  EC 0x18 (or fine-grained UNDEF) -> undef_access().
* ID registers: HCR_EL2.TID3 traps reads to access_id_reg(): the VM's value.

A guest operation that executes records what it read or wrote as an Observation of the
vCPU context; one that is refused records ``undef``.
"""

from __future__ import annotations

from fpstate.arm64.idregs import ID_REG_DEFS
from fpstate.arm64.regs import FPMR, FPSR, ZERO, ZHI, P, V
from fpstate.arm64.statemachine import IllegalEvent, replace
from fpstate.kernel.arm64.state import Observation
from fpstate.kvm.arm64.fpsimd import cptr_traps, kvm_hyp_handle_fpsimd, run_step
from fpstate.kvm.arm64.kvm_host import KvmWorld, Vcpu
from fpstate.kvm.arm64.sys_regs import HCRX_EL2_ENFPM, emulate_guest_sys_reg

#: guest op -> (feature, trap class)
GUEST_OPS: dict[str, tuple[str, str]] = {
    "fpsimd_write": ("FP", "fp"), "fpsimd_read": ("FP", "fp"),
    "sve_write": ("SVE", "sve"), "sve_read": ("SVE", "sve"),
    "zcr_write": ("SVE", "sve"), "zcr_read": ("SVE", "sve"),
    "fpmr_write": ("FPMR", "fpmr"), "fpmr_read": ("FPMR", "fpmr"), "fp8_op": ("FPMR", "fpmr"),
    "smstart": ("SME", "sme"),
    "svcr_read": ("SME", "SVCR"), "smcr_read": ("SME", "SMCR_EL1"),
    "smpri_read": ("SME", "SMPRI_EL1"), "smidr_read": ("SME", "SMIDR_EL1"),
    "tpidr2_read": ("SME", "TPIDR2_EL0"),
    "id_read": ("FP", "id"),
}


def _undef(world: KvmWorld, vcpu: Vcpu, what: str, feature: str) -> KvmWorld:
    return world.with_host(world.host.observe(Observation(vcpu.ctx, what, feature, "undef")))


def _trap_fp_class(world: KvmWorld, vcpu: Vcpu, ec: str) -> tuple[KvmWorld, bool]:
    """Take the FP (or SVE) trap if armed; False if it ends in UNDEF."""
    cpu = vcpu.cpu
    assert cpu is not None
    traps = cptr_traps(world.config, world.hyp[cpu].cptr)
    if not traps[ec]:
        return world, True
    return kvm_hyp_handle_fpsimd(world, vcpu.ctx, ec)


def guest_op(world: KvmWorld, ctx: str, op: str, arg: int | str | None = None) -> KvmWorld:
    """The running guest of vCPU ``ctx`` executes ``op`` (see GUEST_OPS).  ``arg`` is the
    ZCR_EL1.LEN for zcr_write and the register name for id_read."""
    vcpu = world.vcpu(ctx)
    if op not in GUEST_OPS:
        raise IllegalEvent("guest", vcpu.run, op, f"unknown guest op (known: {list(GUEST_OPS)})")
    world = run_step(world, vcpu, "guest_op")
    world = world.with_host(world.host.clear_obs())
    vcpu = world.vcpu(ctx)
    cpu = vcpu.cpu
    assert cpu is not None
    caps = world.host.caps
    feature, klass = GUEST_OPS[op]

    if klass == "id":
        name = str(arg)
        if name not in ID_REG_DEFS:
            raise IllegalEvent("guest", "in-guest", op, f"{name!r} is not a modelled ID register")
        _, val = emulate_guest_sys_reg(world, vcpu, name, False)
        return world.with_host(world.host.observe(Observation(ctx, name, "FP", "read", val)))
    if klass == "sme":
        return _undef(world, vcpu, "SMSTART", feature)       # EC 0x1D: unknown EC -> UNDEF
    if klass not in ("fp", "sve", "fpmr"):
        result, _ = emulate_guest_sys_reg(world, vcpu, klass, False)
        assert result == "undef", f"{klass} must UNDEF for guests"
        return _undef(world, vcpu, klass, feature)
    if klass == "fpmr":
        if not caps.fpmr:
            return _undef(world, vcpu, FPMR, feature)        # FEAT_FPMR not implemented
        if not world.hyp[cpu].hcrx & HCRX_EL2_ENFPM:
            return _undef(world, vcpu, FPMR, feature)        # EC 0x18 -> undef_access()
        world, ok = _trap_fp_class(world, vcpu, "FP")
    elif klass == "sve":
        if not caps.sve:
            return _undef(world, vcpu, ZHI, feature)         # FEAT_SVE not implemented
        world, ok = _trap_fp_class(world, vcpu, "SVE")
        if ok:
            world, ok = _trap_fp_class(world, world.vcpu(ctx), "FP")
    else:
        world, ok = _trap_fp_class(world, vcpu, "FP")
    if not ok:
        return _undef(world, world.vcpu(ctx), ZHI if klass == "sve" else V, feature)
    return _execute(world, world.vcpu(ctx), op, feature, arg)


def _execute(world: KvmWorld, vcpu: Vcpu, op: str, feature: str,
             arg: int | str | None) -> KvmWorld:
    """The instruction runs on the hardware registers (guest-owned now)."""
    cpu = vcpu.cpu
    assert cpu is not None
    host, ctx = world.host, vcpu.ctx
    regs = host.cpus[cpu].regs
    if op.endswith("_read") and op != "zcr_read":
        comps = {"fpsimd_read": (V, FPSR), "sve_read": (V, ZHI, P),
                 "fpmr_read": (FPMR,)}[op]
        return world.with_host(host.observe(
            *(Observation(ctx, c, feature, "read", regs.get(c)) for c in comps)))
    if op == "zcr_read":
        return world.with_host(host.observe(Observation(ctx, "ZCR_EL1", feature, "read",
                                                        regs.zcr_len)))
    if op == "zcr_write":
        length = int(arg or 0) & 0xF
        host = host.with_regs(cpu, replace(regs, zcr_len=length))
        return world.with_host(host.observe(Observation(ctx, "ZCR_EL1", feature, "write",
                                                        length)))
    tok = host.next_token(ctx)
    read: tuple[Observation, ...] = ()
    if op == "fp8_op":
        read = (Observation(ctx, FPMR, feature, "read", regs.fpmr),)
        values = {V: tok, ZHI: ZERO}
    elif op == "fpsimd_write":
        values = {V: tok, ZHI: ZERO, FPSR: tok}
    elif op == "sve_write":
        values = {V: tok, ZHI: tok, P: tok, FPSR: tok}
    else:
        values = {FPMR: tok}
    what = FPMR if op == "fpmr_write" else V
    return world.with_host(host.write(cpu, regs.put(**values), ctx, values,
                                      (*read, Observation(ctx, what, feature, "write", tok))))
