"""Named invariants of the arm64 host + KVM FP model, each quoting the rule it encodes.

Each predicate takes a `KvmWorld` and returns the list of problems it finds (empty: the
invariant holds).  `check` runs all of them; the checker collects `INVARIANTS`.  The pair
predicate `same_advertised_same_registers` compares two VMs (a migration source and its
destination).  Observation-based predicates look at ``world.host.obs``: what the last event
let a context see.

Where a quote comes from seed 002 it is Marc Zyngier's review of "KVM: arm64: Support
FEAT_FPMR for guests" (v3 15/21, 7 Dec 2023); kernel quotes are v6.17 comments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fpstate.arm64.regs import COMPONENTS, Tok
from fpstate.kernel.arm64.state import Observation
from fpstate.kvm.arm64.fpsimd import activate_cptr_traps, cptr_traps
from fpstate.kvm.arm64.guest import kvm_arm_copy_reg_indices, reg_name, restore_vcpu_regs
from fpstate.kvm.arm64.guest import save_vcpu_regs as _save
from fpstate.kvm.arm64.kvm_host import (
    FP_STATE_GUEST_OWNED,
    VCPU_LOADED,
    VCPU_OUT,
    KvmWorld,
    Vcpu,
    advertised_features,
    kvm_has_fpmr,
    vcpu_has_sve,
)
from fpstate.kvm.arm64.reset import kvm_arm_vcpu_is_finalized, vcpu_sve_state_size
from fpstate.kvm.arm64.sys_regs import DESC_BY_NAME, HCRX_EL2_ENFPM, kvm_calculate_traps
from fpstate.kvm.arm64.uapi import KVM_REG_ARM64_SVE_VLS

SEED = "seed 002 (Marc Zyngier, KVM FPMR review, 2023-12-07)"


@dataclass(frozen=True, slots=True)
class Invariant:
    name: str
    quote: str
    source: str
    check: Callable[[KvmWorld], list[str]]


@dataclass(frozen=True, slots=True)
class Violation:
    invariant: str
    detail: str

    def __str__(self) -> str:
        return f"{self.invariant}: {self.detail}"


def _context(world: KvmWorld, who: str) -> tuple[str, Vcpu | None, bool]:
    """(context, its vCPU if any, observed through one_reg)."""
    user = who.startswith("user:")
    ctx = who[5:] if user else who
    return ctx, world.vcpus.get(ctx), user


def _reads(world: KvmWorld) -> list[tuple[Observation, str, Vcpu | None, bool]]:
    """Each observation of the last event with (context, its vCPU, through one_reg); the
    last world's are kept, as four predicates ask in a row."""
    obs, vcpus = world.host.obs, world.vcpus
    last = _LAST_READS
    if last[0] is obs and last[1] is vcpus:
        return last[2]  # type: ignore[no-any-return]
    out = [(o, *_context(world, o.who)) for o in obs]
    last[:] = [obs, vcpus, out]
    return out


_LAST_READS: list[object] = [None, None, None]


def _reg_feature(reg_id: int) -> str:
    name = reg_name(reg_id)
    if name in DESC_BY_NAME:
        return DESC_BY_NAME[name].feature
    if name[0] in "ZP" or name.startswith(("FFR", "KVM_REG_ARM64_SVE")):
        return "SVE"
    return "FP"


# --- predicates ------------------------------------------------------------------------------
def guest_observes_only_advertised(world: KvmWorld) -> list[str]:
    """The guest reads or writes no state of a feature its VM does not advertise."""
    out: list[str] = []
    if not world.host.obs:
        return out
    for o, _ctx, vcpu, user in _reads(world):
        if vcpu is None or user or o.action not in ("read", "write"):
            continue
        if o.feature not in advertised_features(world, vcpu):
            out.append(f"guest {o.who} could {o.action} {o.what} ({o.feature} not advertised)")
    return out


def userspace_observes_only_advertised(world: KvmWorld) -> list[str]:
    """Neither KVM_GET_REG_LIST nor KVM_GET/SET_ONE_REG exposes a register of a feature the
    VM does not advertise."""
    out = []
    if world.host.obs:
        for o, _ctx, vcpu, user in _reads(world):
            if vcpu is not None and user and o.action in ("read", "write") and (
                    o.feature not in advertised_features(world, vcpu)):
                out.append(f"userspace could {o.action} {o.what} of {vcpu.ctx} ({o.feature} "
                           "not advertised)")
    for vcpu in world.vcpus.values():
        if vcpu.run != VCPU_OUT or not vcpu.initialized:
            continue
        out += _reg_list_beyond_advertised(world, vcpu)
    return out


#: What KVM_GET_REG_LIST lists, and so the problems found in it, depends on nothing but the
#: vCPU's context, INIT and finalize flags, its VM's features and ID registers, the host's
#: capabilities and the configuration: memoised by those (caps and config by identity).
_REG_LIST_MEMO: dict[tuple[object, ...], list[str]] = {}


def _reg_list_beyond_advertised(world: KvmWorld, vcpu: Vcpu) -> list[str]:
    """The registers KVM_GET_REG_LIST lists for a finalized ``vcpu`` whose feature the VM
    does not advertise."""
    vm = world.vm(vcpu.vm)
    k = (vcpu.ctx, vcpu.initialized, vcpu.sve_finalized, vm.features, vm.id_regs,
         id(world.host.caps), id(world.config))
    out = _REG_LIST_MEMO.get(k)
    if out is not None:
        return out
    out = []
    if kvm_arm_vcpu_is_finalized(world, vcpu):
        _, ids = kvm_arm_copy_reg_indices(world, vcpu.ctx)
        adv = advertised_features(world, vcpu)
        for reg_id in ids:
            if _reg_feature(reg_id) not in adv:
                out.append(f"KVM_GET_REG_LIST of {vcpu.ctx} lists {reg_name(reg_id)} "
                           f"({_reg_feature(reg_id)} not advertised)")
    if len(_REG_LIST_MEMO) > 4096:
        _REG_LIST_MEMO.clear()
    _REG_LIST_MEMO[k] = out
    _KEEP.update({id(world.host.caps): world.host.caps, id(world.config): world.config})
    return out


#: The objects whose ids key `_REG_LIST_MEMO`, kept alive so that their ids stay theirs.
_KEEP: dict[int, object] = {}


def no_context_observes_another(world: KvmWorld) -> list[str]:
    """A context (host task, guest, or the VMM reading a vCPU) never reads a value another
    context wrote."""
    out: list[str] = []
    if not world.host.obs:
        return out
    for o, ctx, _vcpu, _user in _reads(world):
        if o.action == "read" and isinstance(o.value, Tok) and o.value.writer not in ("", ctx):
            out.append(f"{o.who} read {o.what} = {o.value} written by {o.value.writer}")
    return out


def context_reads_own_latest(world: KvmWorld) -> list[str]:
    """A context reads back exactly the value it last wrote (or the architecture left)."""
    out: list[str] = []
    if not world.host.obs:
        return out
    for o, ctx, _vcpu, _user in _reads(world):
        if o.action == "read" and isinstance(o.value, Tok) and o.what in COMPONENTS:
            want = world.host.expected(ctx, o.what)
            if o.value != want:
                out.append(f"{o.who} read {o.what} = {o.value}, expected {want}")
    return out


def traps_iff_not_owned(world: KvmWorld) -> list[str]:
    """FP traps armed iff the guest does not own the registers; SVE traps unless it owns
    them and has SVE; SME traps always."""
    out = []
    for cpu, hyp in enumerate(world.hyp):
        if hyp.guest is None:
            continue
        vcpu = world.vcpu(hyp.guest)
        owned = hyp.fp_owner == FP_STATE_GUEST_OWNED
        want = cptr_traps(world.config, activate_cptr_traps(world.config, owned,
                                                            vcpu_has_sve(world, vcpu)))
        have = cptr_traps(world.config, hyp.cptr)
        if have != want or not have["SME"] or have["FP"] == owned:
            out.append(f"CPU {cpu}: traps {have} with fp_owner {hyp.fp_owner}")
    return out


def guest_owned_state_bound(world: KvmWorld) -> list[str]:
    """Between two guest runs (vCPU loaded, host side), GUEST_OWNED with TIF_FOREIGN_FPSTATE
    clear for the VMM means fpsimd_last_state points at the vCPU's storage."""
    out = []
    vmm = world.vmm_task()
    for cpu, hyp in enumerate(world.hyp):
        c = world.host.cpus[cpu]
        if hyp.fp_owner != FP_STATE_GUEST_OWNED or c.current != vmm.name or (
                vmm.tif_foreign_fpstate):
            continue
        loaded = [v for v in world.vcpus.values() if v.cpu == cpu and v.run == VCPU_LOADED]
        if loaded and c.last.st != loaded[0].store:
            out.append(f"CPU {cpu}: guest owns the registers but {c.last.st} is bound")
    return out


def traps_follow_advertised(world: KvmWorld) -> list[str]:
    """HCRX_EL2.EnFPM is set only if the host has FPMR and the VM advertises it."""
    out = []
    for vcpu in world.vcpus.values():
        if vcpu.has_run and vcpu.hcrx_el2 & HCRX_EL2_ENFPM and world.host.caps.fpmr and (
                not kvm_has_fpmr(world, world.vm(vcpu.vm))):
            out.append(f"{vcpu.ctx}: HCRX_EL2.EnFPM set, ID_AA64PFR2_EL1.FPMR not advertised")
    return out


def host_state_in_own_storage(world: KvmWorld) -> list[str]:
    """Host FP state is saved into the fields that hold it, never through an address
    computed from an assumed layout, and loaded from within the buffer that holds it."""
    out = [f"{t.name}: thread_struct {', '.join(sorted(t.clobbered))} overwritten"
           for t in world.host.tasks.values() if t.clobbered]
    out += [f"{t.name}: task_fpsimd_load() read {t.overread} bytes past sve_state"
            for t in world.host.tasks.values() if t.overread]
    out += [f"{t.name}: fpsimd_save_user_state() wrote {t.overwrite} bytes past sve_state"
            + (" (none allocated: through a NULL pointer)" if not world.host.store(
                t.store).sve_size else "")
            for t in world.host.tasks.values() if t.overwrite]
    return out


def host_traps_follow_tif(world: KvmWorld) -> list[str]:
    """A CPU running a host task in user mode whose registers it holds (TIF_FOREIGN_FPSTATE
    clear) lets EL0 use SVE exactly when the task has TIF_SVE and SME exactly when it has
    TIF_SME, as fpsimd_bind_task_to_cpu() set them: SVE registers written with TIF_SVE
    clear are not saved, and a trap taken with TIF_SVE set is a WARN."""
    host = world.host
    caps = host.caps
    out: list[str] = []
    for c in host.cpus:
        t = None if c.current is None else host.tasks[c.current]
        if t is None or t.mode != "user" or t.tif_foreign_fpstate:
            continue
        if caps.sve and c.el0_sve != t.tif_sve:
            out.append(f"CPU {c.idx}: EL0 SVE {'enabled' if c.el0_sve else 'trapped'} for "
                       f"{t.name} with TIF_SVE {'set' if t.tif_sve else 'clear'}")
        if caps.sme and c.el0_sme != t.tif_sme:
            out.append(f"CPU {c.idx}: EL0 SME {'enabled' if c.el0_sme else 'trapped'} for "
                       f"{t.name} with TIF_SME {'set' if t.tif_sme else 'clear'}")
    return out


def host_never_warns(world: KvmWorld) -> list[str]:
    """No host task reaches a state the kernel's own WARN_ON()s call impossible."""
    return [f"{t.name}: {t.warned}" for t in world.host.tasks.values() if t.warned]


def id_regs_frozen_after_run(world: KvmWorld) -> list[str]:
    """Once any vCPU has run, the VM's ID registers never change."""
    return [f"VM {vm.name}: ID registers changed after the first KVM_RUN"
            for vm in world.vms.values()
            if vm.has_ran_once and vm.id_regs is not vm.id_regs_at_first_run
            and vm.id_regs != vm.id_regs_at_first_run]


def vcpu_sve_state_at_max_vl(world: KvmWorld) -> list[str]:
    """The vCPU's sve_state is laid out for its maximum VL, and no save ever happens at a
    live VL other than the bound one (which would SIGKILL the VMM)."""
    out = [f"{t.name} killed: {t.killed}" for t in world.host.tasks.values()
           if t.killed == "SIGKILL"]  # a bad signal frame's SIGSEGV is the ABI's
    for vcpu in world.vcpus.values():
        if not vcpu.sve_finalized:
            continue
        st = world.host.store(vcpu.store)
        if st.sve_size != vcpu_sve_state_size(vcpu) or st.sve_vl != vcpu.sve_max_vl:
            out.append(f"{vcpu.ctx}: sve_state {st.sve_size} bytes at VL {st.sve_vl}, "
                       f"max VL {vcpu.sve_max_vl}")
    return out


def no_streaming_or_za_in_guest(world: KvmWorld) -> list[str]:
    """PSTATE.SM and PSTATE.ZA are 0 whenever a vCPU runs."""
    return [f"CPU {cpu}: guest {hyp.guest} runs with SM={regs.sm} ZA={regs.za_on}"
            for cpu, hyp in enumerate(world.hyp)
            if hyp.guest is not None
            and ((regs := world.host.cpus[cpu].regs).sm or regs.za_on)]


INVARIANTS: tuple[Invariant, ...] = (
    Invariant("guest_observes_only_advertised",
              "Which means that we don't stuff that isn't advertised to the guest, and instead "
              "make these things UNDEF. Just like on any real CPU implementation.", SEED,
              guest_observes_only_advertised),
    Invariant("userspace_observes_only_advertised",
              "At the very least, userspace shouldn't be able to observe the state that a "
              "guest isn't supposed to generate, and we should be mindful of not creating "
              "covert channels.", SEED, userspace_observes_only_advertised),
    Invariant("no_context_observes_another",
              "no context observes another's state (issue 5); fpsimd.c: the state must be "
              "saved back to memory before the registers are given to another context",
              "arch/arm64/kernel/fpsimd.c", no_context_observes_another),
    Invariant("context_reads_own_latest",
              "TIF_FOREIGN_FPSTATE ... the flag is set unless the FPSIMD registers of this "
              "CPU currently contain the most recent userland FPSIMD state of the current "
              "task", "arch/arm64/kernel/fpsimd.c", context_reads_own_latest),
    Invariant("traps_iff_not_owned",
              "If we have managed to run anything using FP while we were preemptible ..., "
              "then neither the host nor the guest own the FP hardware",
              "arch/arm64/kvm/fpsimd.c kvm_arch_vcpu_ctxflush_fp()", traps_iff_not_owned),
    Invariant("guest_owned_state_bound",
              "If the guest FPSIMD state was loaded, update the host's context tracking data "
              "mark the CPU FPSIMD regs as dirty and belonging to vcpu",
              "arch/arm64/kvm/fpsimd.c kvm_arch_vcpu_ctxsync_fp()", guest_owned_state_bound),
    Invariant("traps_follow_advertised",
              "The intention is that *everything* becomes conditional, based on both the "
              "host CPU support and the feature set advertised to the guest.", SEED,
              traps_follow_advertised),
    Invariant("host_state_in_own_storage",
              "I won't take this sort of pointer arithmetic that assumes some pre-defined "
              "layout.", SEED, host_state_in_own_storage),
    Invariant("id_regs_frozen_after_run",
              "Once the VM has started the ID registers are immutable. Reject any write "
              "that does not match the final register value.",
              "arch/arm64/kvm/sys_regs.c set_id_reg()", id_regs_frozen_after_run),
    Invariant("vcpu_sve_state_at_max_vl",
              "Can't save the user regs, so current would re-enter user with corrupt state. "
              "There's no way to recover, so kill it",
              "arch/arm64/kernel/fpsimd.c fpsimd_save_user_state()", vcpu_sve_state_at_max_vl),
    Invariant("no_streaming_or_za_in_guest",
              "When the host may use SME, fpsimd_save_and_flush_cpu_state() ensures that "
              "PSTATE.{SM,ZA} == {0,0}.",
              "arch/arm64/kvm/fpsimd.c kvm_arch_vcpu_load_fp()", no_streaming_or_za_in_guest),
    Invariant("host_traps_follow_tif",
              "Toggle SVE and SME trapping for userspace if needed (by TIF_SVE and TIF_SME, "
              "when a task's state is bound to the CPU)",
              "arch/arm64/kernel/fpsimd.c fpsimd_bind_task_to_cpu()", host_traps_follow_tif),
    Invariant("host_never_warns",
              "an invalid state where (non-streaming) SVE register data is stored in "
              "FP_STATE_SVE format but TIF_SVE is clear",
              "arch/arm64/kernel/fpsimd.c task_fpsimd_load() WARN_ON_ONCE(); 128a7494a9f1",
              host_never_warns),
)


def check(world: KvmWorld) -> list[Violation]:
    """Every single-world invariant; the violations found."""
    return [Violation(inv.name, d) for inv in INVARIANTS for d in inv.check(world)]


# --- migration ---------------------------------------------------------------------------
SAME_ADVERTISED_QUOTE = ("It is high time that we stop enabling everything by default, "
                         "because this totally breaks VM migration.")


def guest_accessible(world: KvmWorld, vcpu: Vcpu) -> frozenset[str]:
    """The state components the guest of ``vcpu`` can reach without UNDEF, from the host's
    features and the traps KVM computes (kvm_calculate_traps(), vcpu_has_sve())."""
    comps = {"V", "FPSR"}
    if vcpu_has_sve(world, vcpu):
        comps |= {"ZHI", "P"}
    if world.host.caps.fpmr and kvm_calculate_traps(world, vcpu) & HCRX_EL2_ENFPM:
        comps.add("FPMR")
    return frozenset(comps)


def same_advertised(src: KvmWorld, src_ctx: str, dst: KvmWorld, dst_ctx: str) -> bool:
    s, d = src.vcpu(src_ctx), dst.vcpu(dst_ctx)
    return (src.vm(s.vm).id_regs == dst.vm(d.vm).id_regs and s.features == d.features
            and s.sve_max_vl == d.sve_max_vl)


def same_advertised_same_registers(src: KvmWorld, src_ctx: str, dst: KvmWorld,
                                   dst_ctx: str) -> list[str]:
    """A VM restored on a host with the same advertised features observes the same
    registers: same KVM_GET_REG_LIST, every saved register accepted, same guest-reachable
    state.  Vacuous (no problems) when the advertised features differ."""
    if not same_advertised(src, src_ctx, dst, dst_ctx):
        return []
    out = []
    _, src_ids = kvm_arm_copy_reg_indices(src, src_ctx)
    _, dst_ids = kvm_arm_copy_reg_indices(dst, dst_ctx)
    for rid in sorted(set(src_ids) ^ set(dst_ids)):
        side = "source" if rid in src_ids else "destination"
        out.append(f"{reg_name(rid)} listed only on the {side}")
    _, saved = _save(src, src_ctx)
    if dst.vcpu(dst_ctx).sve_finalized:   # the VL set is part of `same_advertised`
        saved = [(rid, v) for rid, v in saved if rid != KVM_REG_ARM64_SVE_VLS]
    _, failures = restore_vcpu_regs(dst, dst_ctx, saved)
    out += [f"restore of {reg_name(rid)} failed with {ret}" for rid, ret in failures]
    a = guest_accessible(src, src.vcpu(src_ctx))
    b = guest_accessible(dst, dst.vcpu(dst_ctx))
    if a != b:
        out.append(f"guest reaches {sorted(a)} on the source, {sorted(b)} on the destination")
    return out


PAIR_INVARIANTS: tuple[tuple[str, str, str], ...] = (
    ("same_advertised_same_registers", SAME_ADVERTISED_QUOTE, SEED),
)
