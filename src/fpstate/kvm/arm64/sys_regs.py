"""KVM/arm64 system registers for FP state: arch/arm64/kvm/sys_regs.c (v6.17).

* The VM's ID registers start from __kvm_read_sanitised_id_reg() (the host's sanitised
  value with what KVM cannot virtualise removed: SVE unless the vCPU has SVE, SME always,
  ID_AA64PFR2_EL1 reduced to FPMR, ID_AA64ZFR0_EL1 RAZ without SVE, ID_AA64SMFR0_EL1 RAZ).
* Userspace may write them only before the first KVM_RUN of any vCPU (set_id_reg(): later
  writes of a different value fail with -EBUSY, of the same value succeed), and only to
  lower a writable field (arm64_check_features(): -E2BIG, reported as -EINVAL); fields
  outside the writable mask must equal the limit, RAZ registers accept only 0.
* A register whose visibility() says REG_HIDDEN is neither listed by KVM_GET_REG_LIST nor
  accessible (-ENOENT): ZCR_EL1 without SVE (sve_visibility), FPMR unless kvm_has_fpmr()
  (fp8_visibility), SVCR and TPIDR2_EL0 unless the VM has SME, which it never has.
* kvm_calculate_traps() derives HCRX_EL2 from the frozen ID registers at the first run:
  EnFPM iff kvm_has_fpmr() (vcpu_set_hcrx()).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from fpstate.arm64.idregs import (
    ID_AA64FPFR0_EL1,
    ID_AA64PFR0_EL1,
    ID_AA64PFR1_EL1,
    ID_AA64PFR2_EL1,
    ID_AA64ZFR0_EL1,
    ID_REG_DEFS,
    IdRegs,
    reg_def,
)
from fpstate.arm64.regs import FP_SYSREGS, Tok
from fpstate.arm64.statemachine import replace
from fpstate.kernel.arm64.state import HostCaps, Observation
from fpstate.kvm.arm64.config import FPMR_UNGATED
from fpstate.kvm.arm64.kvm_host import KvmWorld, Vcpu, kvm_has_fpmr, vcpu_has_sve
from fpstate.kvm.arm64.uapi import arm64_sys_reg

E2BIG = 7

HCRX_EL2_SMPME = 1 << 5
HCRX_EL2_MCE2 = 1 << 10
HCRX_EL2_MSCEN = 1 << 11
HCRX_EL2_TCR2EN = 1 << 14
HCRX_EL2_ENFPM = 1 << 23   #: arch/arm64/tools/sysreg: HCRX_EL2 Field 23 EnFPM


def _mask(reg: object, *names: str) -> int:
    m = 0
    for n in names:
        m |= reg.field(n).mask  # type: ignore[attr-defined]
    return m


#: The ``.val`` of each ID register's sys_reg_desc: the fields userspace may change (v6.17's
#: ID_FILTERED/ID_WRITABLE entries; RAS and GIC of ID_AA64PFR0_EL1, and DF2 and RAS_frac of
#: ID_AA64PFR1_EL1, became writable in v6.14-v6.16, so that a VM can move between hosts
#: with and without RAS).
ID_WRITABLE_MASK: dict[str, int] = {
    "ID_AA64PFR0_EL1": ID_AA64PFR0_EL1.defined_mask & ~_mask(
        ID_AA64PFR0_EL1, "AMU", "MPAM", "SVE", "AdvSIMD", "FP"),
    "ID_AA64PFR1_EL1": ID_AA64PFR1_EL1.defined_mask & ~_mask(
        ID_AA64PFR1_EL1, "PFAR", "MTEX", "THE", "GCS", "MTE_frac", "NMI",
        "RNDR_trap", "SME", "MPAM_frac", "MTE"),
    "ID_AA64PFR2_EL1": _mask(ID_AA64PFR2_EL1, "FPMR", "MTEFAR", "MTESTOREONLY"),
    "ID_AA64ZFR0_EL1": ID_AA64ZFR0_EL1.defined_mask,
    "ID_AA64SMFR0_EL1": 0,                       # ID_HIDDEN
    "ID_AA64FPFR0_EL1": ID_AA64FPFR0_EL1.defined_mask,
}


def sysreg_visible_as_raz(reg: str, has_sve: bool) -> bool:
    """id_visibility()/raz_visibility(): ZFR0 is RAZ without SVE, SMFR0 always (ID_HIDDEN)."""
    return reg == "ID_AA64SMFR0_EL1" or (reg == "ID_AA64ZFR0_EL1" and not has_sve)


def kvm_read_sanitised_id_reg(caps: HostCaps, reg: str, has_sve: bool) -> int:
    """__kvm_read_sanitised_id_reg(): the limit userspace may lower the VM's value from."""
    if sysreg_visible_as_raz(reg, has_sve):
        return 0
    val = caps.profile.id_regs.get(reg)
    if reg == "ID_AA64PFR0_EL1":   # sanitise_id_aa64pfr0_el1()
        if not has_sve:
            val = ID_AA64PFR0_EL1.field("SVE").put(val, 0)
        # CSV2 = IMP when arm64_get_spectre_v2_state() is SPECTRE_UNAFFECTED, CSV3 = IMP when
        # arm64_get_meltdown_state() is: a CPU that reports CSV2 (CSV3) is; the kernel's MIDR
        # lists of other unaffected CPUs are not modelled.
        for name in ("CSV2", "CSV3"):
            if ID_AA64PFR0_EL1.field(name).get(val) >= 1:
                val = ID_AA64PFR0_EL1.field(name).put(val, 1)
        val = ID_AA64PFR0_EL1.field("GIC").put(val, 1)            # VGIC_V3
        val = ID_AA64PFR0_EL1.field("AMU").put(val, 0)
        val = ID_AA64PFR0_EL1.field("MPAM").put(val, 0)
    elif reg == "ID_AA64PFR1_EL1":   # sanitise_id_aa64pfr1_el1() (v6.17; the model has no MTE)
        for name in ("MTE", "MTE_frac", "SME", "RNDR_trap", "NMI", "GCS", "THE", "MTEX",
                     "PFAR", "MPAM_frac"):
            val = ID_AA64PFR1_EL1.field(name).put(val, 0)
        # RAS_frac only with ARM64_HAS_RASV1P1_EXTN: RAS = IMP and RAS_frac >= 1 on the host
        pfr0 = caps.profile.id_regs.get("ID_AA64PFR0_EL1")
        if not (ID_AA64PFR0_EL1.field("RAS").get(pfr0) == 1
                and ID_AA64PFR1_EL1.field("RAS_frac").get(val) >= 1):
            val = ID_AA64PFR1_EL1.field("RAS_frac").put(val, 0)
    elif reg == "ID_AA64PFR2_EL1":
        val &= ID_AA64PFR2_EL1.field("FPMR").mask   # "We only expose FPMR"
    return val


def kvm_sanitised_id_regs(caps: HostCaps, has_sve: bool) -> IdRegs:
    regs = IdRegs()
    for name in ID_REG_DEFS:
        regs = regs.with_reg(name, kvm_read_sanitised_id_reg(caps, name, has_sve))
    return regs


def arm64_check_features(caps: HostCaps, reg: str, val: int, has_sve: bool) -> int:
    """arm64_check_features(): 0 if ``val`` promises no more than the KVM limit, else -E2BIG.

    For each field wholly inside the writable mask: equal to the limit, or the arm64 safe
    value of (val, limit) must be val (LOWER_SAFE: not above the limit; EXACT: equal).
    Every other bit must equal the limit.  (A pure function of its arguments: memoised.)"""
    k = (id(caps), reg, val, has_sve)
    hit = _CHECKED.get(k)
    if hit is not None and hit[0] is caps:
        return hit[1]
    ret = _arm64_check_features(caps, reg, val, has_sve)
    if len(_CHECKED) > 4096:
        _CHECKED.clear()
    _CHECKED[k] = (caps, ret)
    return ret


#: (id(caps), register, value, has_sve) -> (caps, arm64_check_features()).
_CHECKED: dict[tuple[int, str, int, bool], tuple[HostCaps, int]] = {}


def _arm64_check_features(caps: HostCaps, reg: str, val: int, has_sve: bool) -> int:
    limit = kvm_read_sanitised_id_reg(caps, reg, has_sve)
    if sysreg_visible_as_raz(reg, has_sve):
        return -E2BIG if val else 0
    writable, checked = ID_WRITABLE_MASK[reg], 0
    for f in reg_def(reg).fields:
        if f.mask & writable != f.mask:
            continue
        checked |= f.mask
        fv, fl = f.get(val), f.get(limit)
        if fv == fl:
            continue
        safe = min(fv, fl) if f.safe == "LOWER" else fl
        if safe != fv:
            return -E2BIG
    if (val & ~checked) != (limit & ~checked):
        return -E2BIG
    return 0


def kvm_reset_id_regs(world: KvmWorld, vm_name: str, has_sve: bool) -> KvmWorld:
    """kvm_reset_sys_regs() on the VM's first vCPU reset: ID regs from sanitised values,
    once (KVM_ARCH_FLAG_ID_REGS_INITIALIZED)."""
    vm = world.vm(vm_name)
    if vm.id_regs_initialized:
        return world
    return world.with_vm(replace(vm, id_regs=kvm_sanitised_id_regs(world.host.caps, has_sve),
                                 id_regs_initialized=True))


def set_id_reg(world: KvmWorld, vcpu: Vcpu, reg: str, val: int) -> tuple[KvmWorld, int]:
    """set_id_reg(): -EBUSY after the VM ran (unless unchanged), -EINVAL if not a subset.
    ID_AA64PFR0_EL1 goes through set_id_aa64pfr0_el1() first: -EINVAL for EL0 or EL1 = 0
    ("Fail the guest's request to disable the AA64 ISA at EL{0,1}"; the model has no NV, so
    EL2 is not checked)."""
    vm = world.vm(vcpu.vm)
    # set_id_aa64pfr0_el1() runs before set_id_reg(), so this -EINVAL comes first.
    if reg == "ID_AA64PFR0_EL1" and not (ID_AA64PFR0_EL1.field("EL0").get(val)
                                        and ID_AA64PFR0_EL1.field("EL1").get(val)):
        return world, -errno.EINVAL
    if vm.has_ran_once:
        return world, (0 if val == vm.id_regs.get(reg) else -errno.EBUSY)
    ret = arm64_check_features(world.host.caps, reg, val, vcpu_has_sve(world, vcpu))
    if ret:
        return world, -errno.EINVAL
    return world.with_vm(replace(vm, id_regs=vm.id_regs.with_reg(reg, val))), 0


@dataclass(frozen=True, slots=True)
class SysRegDesc:
    """The FP-related rows of sys_reg_descs[]: guest access handler, backing storage,
    visibility."""

    name: str
    access: str        #: "id" (access_id_reg), "undef" (undef_access), "direct" (no trap)
    visibility: str    #: "always", "id", "sve", "sme", "fp8"
    backed: bool       #: has .reg or .get_user: listed by KVM_GET_REG_LIST unless hidden
    reset: int = 0

    @property
    def feature(self) -> str:
        return {"sve": "SVE", "sme": "SME", "fp8": "FPMR"}.get(self.visibility, "FP")


SYS_REG_DESCS: tuple[SysRegDesc, ...] = tuple(
    [SysRegDesc(n, "id", "id", True) for n in ID_REG_DEFS] + [
        SysRegDesc("ZCR_EL1", "direct", "sve", True),
        SysRegDesc("SMPRI_EL1", "undef", "always", False),
        SysRegDesc("SMCR_EL1", "undef", "always", False),
        SysRegDesc("SMIDR_EL1", "undef", "always", False),
        SysRegDesc("SVCR", "undef", "sme", True),
        SysRegDesc("TPIDR2_EL0", "undef", "sme", True),
        SysRegDesc("FPMR", "undef", "fp8", True),
        SysRegDesc("FPEXC32_EL2", "undef", "always", True, 0x700),
    ])
DESC_BY_NAME = {d.name: d for d in SYS_REG_DESCS}


def fp8_visible(world: KvmWorld, vcpu: Vcpu) -> bool:
    """fp8_visibility(): kvm_has_fpmr(); under fpmr-ungated the host capability alone."""
    if world.config.variant == FPMR_UNGATED:
        return world.host.caps.fpmr
    return kvm_has_fpmr(world, world.vm(vcpu.vm))


def sysreg_hidden(world: KvmWorld, vcpu: Vcpu, desc: SysRegDesc) -> bool:
    """REG_HIDDEN from the descriptor's visibility() callback."""
    if desc.visibility == "sve":
        return not vcpu_has_sve(world, vcpu)
    if desc.visibility == "sme":   # sme_visibility(): kvm_has_feat(PFR1, SME, IMP): never
        return world.vm(vcpu.vm).id_regs.field("ID_AA64PFR1_EL1", "SME") < 1
    if desc.visibility == "fp8":
        return not fp8_visible(world, vcpu)
    return False


def sysreg_one_reg_id(name: str) -> int:
    """ARM64_SYS_REG(op0, op1, crn, crm, op2) of uapi/asm/kvm.h (size U64)."""
    if name in ID_REG_DEFS:
        return arm64_sys_reg(*ID_REG_DEFS[name].enc)
    e = FP_SYSREGS[name]
    return arm64_sys_reg(e.op0, e.op1, e.crn, e.crm, e.op2)


def walk_sys_regs(world: KvmWorld, vcpu: Vcpu) -> list[str]:
    """walk_one_sys_reg() for KVM_GET_REG_LIST: backed and not hidden."""
    return [d.name for d in SYS_REG_DESCS if d.backed and not sysreg_hidden(world, vcpu, d)]


def _read_backing(world: KvmWorld, vcpu: Vcpu, name: str) -> int | Tok:
    if name in ID_REG_DEFS:
        return world.vm(vcpu.vm).id_regs.get(name)
    if name == "ZCR_EL1":
        return vcpu.zcr_el1
    if name == "FPEXC32_EL2":
        return vcpu.fpexc32_el2
    st = world.host.store(vcpu.store)
    return {"FPMR": st.fpmr, "SVCR": st.svcr}.get(name, 0)


def kvm_sys_reg_get_user(world: KvmWorld, vcpu: Vcpu,
                         name: str) -> tuple[KvmWorld, int, int | Tok | None]:
    """kvm_sys_reg_get_user(): -ENOENT for unknown or hidden registers."""
    desc = DESC_BY_NAME.get(name)
    who = f"user:{vcpu.ctx}"
    if desc is None or not desc.backed or sysreg_hidden(world, vcpu, desc):
        obs = Observation(who, name, desc.feature if desc else "FP", "ENOENT")
        return world.with_host(world.host.observe(obs)), -errno.ENOENT, None
    val = _read_backing(world, vcpu, name)
    what = "FPMR" if name == "FPMR" else name
    obs = Observation(who, what, desc.feature, "read", val)
    return world.with_host(world.host.observe(obs)), 0, val


def kvm_sys_reg_set_user(world: KvmWorld, vcpu: Vcpu, name: str,
                         value: int | Tok) -> tuple[KvmWorld, int]:
    """kvm_sys_reg_set_user(): ID registers through set_id_reg(), others stored."""
    desc = DESC_BY_NAME.get(name)
    if desc is None or not desc.backed or sysreg_hidden(world, vcpu, desc):
        obs = Observation(f"user:{vcpu.ctx}", name, desc.feature if desc else "FP", "ENOENT")
        return world.with_host(world.host.observe(obs)), -errno.ENOENT
    if name in ID_REG_DEFS:
        assert isinstance(value, int)
        return set_id_reg(world, vcpu, name, value)
    if name == "ZCR_EL1":
        # No .set_user: the 64-bit value is stored as given (and read back so); only LEN
        # reaches the hardware when hyp writes ZCR_EL1 (__hyp_sve_restore_guest()).
        assert isinstance(value, int)
        return world.with_vcpu(replace(vcpu, zcr_el1=value & ((1 << 64) - 1))), 0
    if name == "FPEXC32_EL2":
        assert isinstance(value, int)
        return world.with_vcpu(replace(vcpu, fpexc32_el2=value)), 0
    st = world.host.store(vcpu.store)
    if name == "FPMR":
        assert isinstance(value, Tok)
        host = world.host.with_store(vcpu.store, replace(st, fpmr=value))
        return world.with_host(host.expect(vcpu.ctx, {"FPMR": value})), 0
    assert isinstance(value, int)
    return world.with_host(world.host.with_store(vcpu.store, replace(st, svcr=value))), 0


def kvm_calculate_traps(world: KvmWorld, vcpu: Vcpu) -> int:
    """vcpu_set_hcrx(): SMPME (its effect is not guest-observable), then EnFPM iff
    kvm_has_fpmr() (fpmr-ungated: always, as the fixed HCRX_GUEST_FLAGS did)."""
    hcrx = HCRX_EL2_SMPME
    if world.config.variant == FPMR_UNGATED or kvm_has_fpmr(world, world.vm(vcpu.vm)):
        hcrx |= HCRX_EL2_ENFPM
    return hcrx


def emulate_guest_sys_reg(world: KvmWorld, vcpu: Vcpu, name: str,
                          is_write: bool) -> tuple[str, int | None]:
    """A trapped guest MRS/MSR (EC 0x18) through the sys_reg table: ("undef", None) when
    undef_access() (or write_to_read_only()) injects UNDEF, else ("read", value)."""
    desc = DESC_BY_NAME.get(name)
    if desc is None or desc.access == "undef":
        return "undef", None
    if desc.access == "id":
        if is_write:
            return "undef", None
        return "read", int(_read_backing(world, vcpu, name))  # type: ignore[arg-type]
    raise AssertionError(f"{name} is not trapped")
