"""KVM/arm64 userspace API for FP state: register ids, one_reg visibility and errnos, the
SVE vector-length and finalize rules, ID register writes (guest.c, sys_regs.c, reset.c)."""

import errno

import pytest

from fpstate.arm64.regs import Tok
from fpstate.arm64.statemachine import IllegalEvent
from fpstate.kernel.arm64 import entry_common as e
from fpstate.kvm.arm64 import arm, guest, reset
from fpstate.kvm.arm64 import uapi as u
from fpstate.kvm.arm64.handle_exit import guest_op
from fpstate.kvm.arm64.reset import SVE_VCPU_CONFIG_TABLE
from fpstate.kvm.arm64.sys_regs import kvm_read_sanitised_id_reg, sysreg_one_reg_id

ENOENT, EPERM, EINVAL, EBUSY, ENOEXEC = (-errno.ENOENT, -errno.EPERM, -errno.EINVAL,
                                         -errno.EBUSY, -errno.ENOEXEC)


def test_register_ids_match_uapi_kvm_h():
    assert u.core_vreg(0) == 0x6040000000100054
    assert u.core_vreg(31) == 0x60400000001000D0
    assert u.CORE_FPSR_ID == 0x60200000001000D4 and u.CORE_FPCR_ID == 0x60200000001000D5
    assert u.KVM_REG_ARM64_SVE_VLS == 0x606000000015FFFF
    assert u.sve_zreg(0) == 0x6080000000150000 and u.sve_zreg(31, 0) == 0x60800000001503E0
    assert u.sve_preg(0) == 0x6050000000150400 and u.sve_ffr(0) == 0x6050000000150600
    assert sysreg_one_reg_id("FPMR") == 0x603000000013DA22
    assert sysreg_one_reg_id("ZCR_EL1") == 0x603000000013C090
    assert sysreg_one_reg_id("ID_AA64PFR2_EL1") == 0x603000000013C022
    assert u.kvm_reg_size(u.sve_zreg(0)) == 256 and u.kvm_reg_size(u.sve_preg(3)) == 32
    assert u.KVM_ARM64_SVE_VLS_WORDS == 8
    assert u.vqs_from_vls(u.vls_from_vqs({1, 2, 4, 64, 512})) == {1, 2, 4, 64, 512}


def names(w, c):
    ret, ids = guest.kvm_arm_copy_reg_indices(w, c)
    assert ret == 0
    return [guest.reg_name(i) for i in ids]


def test_reg_list_of_an_sve_vcpu_with_fpmr(kvm):
    w, c = kvm.make_vm()
    n = names(w, c)
    assert n[:3] == ["FPSR", "FPCR", "KVM_REG_ARM64_SVE_VLS"]     # VLS before Z/P/FFR
    assert "V0" not in n and "Z31" in n and "P15" in n and "FFR" in n
    assert {"ZCR_EL1", "FPMR", "FPEXC32_EL2", "ID_AA64SMFR0_EL1"} <= set(n)
    assert "SVCR" not in n and "TPIDR2_EL0" not in n and "SMCR_EL1" not in n
    assert len(n) == 2 + 50 + 9


def test_reg_list_of_a_plain_fpsimd_vcpu(kvm):
    w, c = kvm.make_vm("neoverse-n1", sve=False)
    n = names(w, c)
    assert n[:32] == [f"V{i}" for i in range(32)] and len(n) == 32 + 2 + 6 + 1
    assert "ZCR_EL1" not in n and "FPMR" not in n


def test_reg_list_needs_init_and_finalize(kvm):
    w = reset.kvm_create_vm(kvm.make_vm()[0], "vm1")
    w, c = reset.kvm_create_vcpu(w, "vm1")
    assert guest.kvm_arm_copy_reg_indices(w, c)[0] == ENOEXEC
    w, _ = reset.kvm_arm_vcpu_init(w, c, frozenset({"SVE"}))
    assert guest.kvm_arm_copy_reg_indices(w, c)[0] == EPERM


def test_core_v_registers_are_refused_on_sve_vcpus(kvm):
    w, c = kvm.make_vm()
    assert guest.kvm_arm_get_reg(w, c, u.core_vreg(3))[1] == EINVAL
    w, c = kvm.make_vm(sve=False)
    w, ret = guest.kvm_arm_set_reg(w, c, u.core_vreg(3), Tok(c, 99))
    assert ret == 0 and guest.kvm_arm_get_reg(w, c, u.core_vreg(3))[2] == Tok(c, 99)


def test_core_register_size_and_range(kvm):
    w, c = kvm.make_vm(sve=False)
    fpsr_u64 = (u.CORE_FPSR_ID & ~u.KVM_REG_SIZE_MASK) | u.KVM_REG_SIZE_U64
    assert guest.kvm_arm_get_reg(w, c, fpsr_u64)[1] == EINVAL
    beyond = u.KVM_REG_ARM64 | u.KVM_REG_SIZE_U32 | u.KVM_REG_ARM_CORE | 216
    assert guest.kvm_arm_get_reg(w, c, beyond)[1] == ENOENT
    misaligned = (u.core_vreg(0) + 1)
    assert guest.kvm_arm_get_reg(w, c, misaligned)[1] == EINVAL
    assert guest.kvm_arm_get_reg(w, c, 0x4000000000000000)[1] == EINVAL   # not arm64


def test_sve_register_regions(kvm):
    w, c = kvm.make_vm("neoverse-v1")                        # max VL 32 bytes: vq 2
    v = w.vcpu(c)
    assert guest.sve_reg_to_region(w, v, u.sve_zreg(5)) == (0, ("Z", 5, 160, 32, 224))
    assert guest.sve_reg_to_region(w, v, u.sve_preg(3)) == (0, ("P", 3, 1036, 4, 28))
    assert guest.sve_reg_to_region(w, v, u.sve_ffr()) == (0, ("FFR", 16, 1088, 4, 28))
    assert guest.sve_reg_to_region(w, v, u.sve_zreg(5, 1))[0] == ENOENT   # slice 1
    assert guest.kvm_arm_get_reg(w, c, u.sve_zreg(5, 1))[1] == ENOENT


def test_sve_registers_before_finalize_and_without_sve(kvm):
    w, c = kvm.make_vm(finalize=False)
    assert guest.kvm_arm_get_reg(w, c, u.sve_zreg(0))[1] == EPERM
    w, c = kvm.make_vm(sve=False)
    assert guest.kvm_arm_get_reg(w, c, u.sve_zreg(0))[1] == ENOENT
    assert guest.kvm_arm_get_reg(w, c, u.KVM_REG_ARM64_SVE_VLS)[1] == ENOENT


def test_z_register_round_trip(kvm):
    w, c = kvm.make_vm()
    val = (Tok(c, 5), Tok(c, 6))
    w, ret = guest.kvm_arm_set_reg(w, c, u.sve_zreg(7), val)
    assert ret == 0 and guest.kvm_arm_get_reg(w, c, u.sve_zreg(7))[2] == val


@pytest.mark.parametrize("profile,vqs,want", [
    ("fvp-aem-fpmr", {1}, 0), ("fvp-aem-fpmr", {1, 2}, 0),
    ("fvp-aem-fpmr", {2}, EINVAL),            # 1 missing: VLs cannot be hidden one by one
    ("fvp-aem-fpmr", {1, 2, 3}, EINVAL),      # 3 not implemented
    ("neoverse-v1", {1, 2, 4}, EINVAL),       # above kvm_sve_max_vl
    ("fvp-aem-fpmr", set(), EINVAL),          # no VL at all
])
def test_sve_vls_rules(kvm, profile, vqs, want):
    w, c = kvm.make_vm(profile, finalize=False)
    w, ret = guest.kvm_arm_set_reg(w, c, u.KVM_REG_ARM64_SVE_VLS, u.vls_from_vqs(vqs))
    assert ret == want
    if want == 0:
        assert w.vcpu(c).sve_max_vl == 16 * max(vqs)
        w, ret = reset.kvm_arm_vcpu_finalize(w, c)
        assert ret == 0 and w.host.store(w.vcpu(c).store).sve_size == reset.vcpu_sve_state_size(
            w.vcpu(c))


def test_vls_reads_the_host_vqs_up_to_the_max_and_freezes(kvm):
    w, c = kvm.make_vm()
    _, ret, words = guest.kvm_arm_get_reg(w, c, u.KVM_REG_ARM64_SVE_VLS)
    assert ret == 0 and u.vqs_from_vls(words) == {1, 2, 4}
    w, ret = guest.kvm_arm_set_reg(w, c, u.KVM_REG_ARM64_SVE_VLS, u.vls_from_vqs({1}))
    assert ret == EPERM                                      # "too late!"


def test_finalize_rules(kvm):
    w = reset.kvm_create_vm(kvm.make_vm()[0], "vm1")
    w, c = reset.kvm_create_vcpu(w, "vm1")
    assert reset.kvm_arm_vcpu_finalize(w, c)[1] == ENOEXEC
    w, _ = reset.kvm_arm_vcpu_init(w, c, frozenset({"SVE"}))
    assert reset.kvm_arm_vcpu_finalize(w, c, "PMU")[1] == EINVAL
    w, ret = reset.kvm_arm_vcpu_finalize(w, c)
    assert ret == 0 and reset.kvm_arm_vcpu_finalize(w, c)[1] == EPERM
    w2, c2 = kvm.make_vm(sve=False)
    assert reset.kvm_arm_vcpu_finalize(w2, c2)[1] == EINVAL


def test_vcpu_init_feature_rules(kvm):
    w, _ = kvm.make_vm("neoverse-n1", sve=False)
    w2 = reset.kvm_create_vm(w, "vm1")
    w2, c2 = reset.kvm_create_vcpu(w2, "vm1")
    assert reset.kvm_arm_vcpu_init(w2, c2, frozenset({"SVE"}))[1] == EINVAL   # host: no SVE
    assert reset.kvm_arm_vcpu_init(w2, c2, frozenset({"PMU_V9"}))[1] == EINVAL
    w, _ = kvm.make_vm()
    w, c2 = reset.kvm_create_vcpu(w, "vm0")
    assert reset.kvm_arm_vcpu_init(w, c2, frozenset())[1] == EINVAL     # must match vm0/0
    assert reset.kvm_arm_vcpu_init(w, c2, frozenset({"SVE"}))[1] == 0


def _drive(kvm, state, ioctl):
    """Bring an SVE vCPU to ``state`` and issue ``ioctl``: (return, new state)."""
    w = reset.kvm_create_vm(kvm.make_vm()[0], "vmx")
    w, c = reset.kvm_create_vcpu(w, "vmx")
    order = ["CREATED", "INIT", "FINALIZED", "RAN"]
    if order.index(state) >= 1:
        w, _ = reset.kvm_arm_vcpu_init(w, c, frozenset({"SVE"}))
    if order.index(state) >= 2:
        w, _ = reset.kvm_arm_vcpu_finalize(w, c)
    if order.index(state) >= 3:
        w, _ = arm.kvm_run(w, c)
        w = arm.kvm_arch_vcpu_put(w, c)
        w = w.with_host(e.syscall_exit(w.host, 0))
    if ioctl == "INIT":
        w, ret = reset.kvm_arm_vcpu_init(w, c, frozenset({"SVE"}))
    elif ioctl == "SET_SVE_VLS":
        w, ret = guest.kvm_arm_set_reg(w, c, u.KVM_REG_ARM64_SVE_VLS, u.vls_from_vqs({1}))
    elif ioctl == "FINALIZE":
        w, ret = reset.kvm_arm_vcpu_finalize(w, c)
    elif ioctl == "GET_ZREG":
        w, ret, _ = guest.kvm_arm_get_reg(w, c, u.sve_zreg(0))
    elif ioctl == "GET_REG_LIST":
        ret = guest.kvm_arm_copy_reg_indices(w, c)[0]
    else:
        w, ret = arm.kvm_run(w, c)
    v = w.vcpu(c)
    now = ("RAN" if v.has_run else "FINALIZED" if v.sve_finalized else
           "INIT" if v.initialized else "CREATED")
    return ret, now


@pytest.mark.parametrize("state,ioctl", sorted(SVE_VCPU_CONFIG_TABLE))
def test_sve_vcpu_configuration_table(kvm, state, ioctl):
    assert _drive(kvm, state, ioctl) == SVE_VCPU_CONFIG_TABLE[(state, ioctl)]


def test_one_reg_needs_an_initialised_vcpu_outside_kvm_run(kvm):
    w = reset.kvm_create_vm(kvm.make_vm()[0], "vm1")
    w, c = reset.kvm_create_vcpu(w, "vm1")
    assert guest.kvm_arm_get_reg(w, c, u.CORE_FPSR_ID)[1] == ENOEXEC
    w, c = kvm.make_vm()
    w = kvm.run(c)(w)
    with pytest.raises(IllegalEvent, match="KVM_GET_ONE_REG"):
        guest.kvm_arm_get_reg(w, c, u.CORE_FPSR_ID)


# --- ID registers -----------------------------------------------------------------------------
def test_sanitised_id_registers(kvm):
    w, _ = kvm.make_vm()
    caps = w.host.caps
    regs = w.vm("vm0").id_regs
    assert regs.field("ID_AA64PFR1_EL1", "SME") == 0            # never for guests
    assert regs.field("ID_AA64PFR0_EL1", "AMU") == 0 and regs.field("ID_AA64PFR0_EL1", "GIC") == 1
    # Neoverse V2 reports CSV2 = 2 (FEAT_CSV2_2); v6.17's KVM gives an unaffected CPU's guests
    # CSV2 = IMP (sanitise_id_aa64pfr0_el1).
    w2, _ = kvm.make_vm("neoverse-v2")
    assert w2.vm("vm0").id_regs.field("ID_AA64PFR0_EL1", "CSV2") == 1
    assert regs.pfr2 == 1 << 32                                   # FPMR only
    assert regs.smfr0 == 0 and regs.fpfr0 == 0xF0000003
    assert kvm_read_sanitised_id_reg(caps, "ID_AA64ZFR0_EL1", has_sve=False) == 0
    assert kvm_read_sanitised_id_reg(caps, "ID_AA64PFR0_EL1", has_sve=False) >> 32 & 0xF == 0
    w, _ = kvm.make_vm(sve=False)
    assert w.vm("vm0").id_regs.zfr0 == 0                         # RAZ without SVE


@pytest.mark.parametrize("ras,ras_frac,df2,want_frac", [
    (1, 1, 1, 1),    # RAS IMP + RAS_frac 1: ARM64_HAS_RASV1P1_EXTN, RAS_frac kept
    (2, 1, 1, 0),    # RAS V1P1: RAS_frac cleared
    (1, 0, 1, 0),
])
def test_pfr1_sanitised_as_v6_17(ras, ras_frac, df2, want_frac):
    """sanitise_id_aa64pfr1_el1() (v6.17): DF2 passes through, RAS_frac only with the RASv1p1
    extension (RAS = IMP, RAS_frac >= 1); SME never."""
    from fpstate.arm64.cpu import load_profile
    from fpstate.arm64.idregs import ID_AA64PFR0_EL1, ID_AA64PFR1_EL1
    from fpstate.arm64.statemachine import replace

    p = load_profile("neoverse-v2")
    pfr0 = ID_AA64PFR0_EL1.field("RAS").put(p.id_regs.get("ID_AA64PFR0_EL1"), ras)
    pfr1 = p.id_regs.get("ID_AA64PFR1_EL1")
    pfr1 = ID_AA64PFR1_EL1.field("RAS_frac").put(pfr1, ras_frac)
    pfr1 = ID_AA64PFR1_EL1.field("DF2").put(pfr1, df2)
    p = replace(p, id_regs=p.id_regs.with_reg("ID_AA64PFR0_EL1", pfr0)
                .with_reg("ID_AA64PFR1_EL1", pfr1))
    caps = reset.kvm_init(p).host.caps
    got = kvm_read_sanitised_id_reg(caps, "ID_AA64PFR1_EL1", has_sve=True)
    assert ID_AA64PFR1_EL1.field("DF2").get(got) == df2
    assert ID_AA64PFR1_EL1.field("RAS_frac").get(got) == want_frac


def set_id(w, c, reg, val):
    return guest.kvm_arm_set_reg(w, c, sysreg_one_reg_id(reg), val)


@pytest.mark.parametrize("profile,reg,val,want", [
    ("fvp-aem-fpmr", "ID_AA64PFR2_EL1", 0, 0),                    # hide FPMR
    ("fvp-aem-fpmr", "ID_AA64ZFR0_EL1", 0x0000110101210021, 0),   # SVE2p1 -> SVE2
    ("fvp-aem-fpmr", "ID_AA64FPFR0_EL1", 0x80000000, 0),          # keep only F8CVT
    ("neoverse-v2", "ID_AA64PFR2_EL1", 1 << 32, EINVAL),          # cannot promise FPMR
    ("neoverse-v1", "ID_AA64ZFR0_EL1", 0x0000100000100001, EINVAL),   # SVE2 on V1
    ("fvp-aem-fpmr", "ID_AA64PFR0_EL1", 0x1101101021111111, EINVAL),  # SVE: not writable
    ("fvp-aem-fpmr", "ID_AA64PFR0_EL1", 0x11011011211F1111, EINVAL),  # FP: not writable
    ("fvp-aem-fpmr", "ID_AA64PFR0_EL1", 0x1101001121111111, 0),       # DIT lowered 1 -> 0
    ("fvp-aem-fpmr", "ID_AA64PFR0_EL1", 0x1101001111111111, 0),       # RAS V1P1 -> IMP
    ("fvp-aem-fpmr", "ID_AA64PFR0_EL1", 0x1101001121111110, EINVAL),  # EL0 = 0: AA64 off
    ("fvp-aem-fpmr", "ID_AA64PFR0_EL1", 0x1101001121111101, EINVAL),  # EL1 = 0
    ("fvp-aem-fpmr", "ID_AA64PFR0_EL1", 0x1101001120111111, EINVAL),  # GIC: exact
    ("fvp-aem-fpmr", "ID_AA64PFR1_EL1", 0x2000021, EINVAL),       # SME cannot be enabled
    ("fvp-aem-fpmr", "ID_AA64PFR2_EL1", (1 << 32) | (1 << 40), EINVAL),   # RES0 bit
    ("fvp-aem-fpmr", "ID_AA64SMFR0_EL1", 1 << 63, EINVAL),        # RAZ: only 0
    ("fvp-aem-fpmr", "ID_AA64SMFR0_EL1", 0, 0),
])
def test_id_register_writes_may_only_lower(kvm, profile, reg, val, want):
    w, c = kvm.make_vm(profile)
    w, ret = set_id(w, c, reg, val)
    assert ret == want
    if want == 0:
        assert w.vm("vm0").id_regs.get(reg) == val


def test_id_registers_freeze_at_the_first_run(kvm):
    w, c = kvm.make_vm()
    w = kvm.leave(c)(kvm.run(c)(w))
    assert set_id(w, c, "ID_AA64PFR2_EL1", 0)[1] == EBUSY
    assert set_id(w, c, "ID_AA64PFR2_EL1", 1 << 32)[1] == 0          # unchanged value: fine
    # set_id_aa64pfr0_el1() refuses EL0 = 0 before set_id_reg() looks at the run
    assert set_id(w, c, "ID_AA64PFR0_EL1", 0x1101001121111110)[1] == EINVAL


def test_fpmr_one_reg_follows_pfr2(kvm):
    w, c = kvm.make_vm()
    fpmr = sysreg_one_reg_id("FPMR")
    assert guest.kvm_arm_get_reg(w, c, fpmr)[1] == 0
    w, _ = set_id(w, c, "ID_AA64PFR2_EL1", 0)
    assert guest.kvm_arm_get_reg(w, c, fpmr)[1] == ENOENT
    assert guest.kvm_arm_set_reg(w, c, fpmr, Tok(c, 1))[1] == ENOENT
    assert "FPMR" not in names(w, c)
    w, _ = set_id(w, c, "ID_AA64PFR2_EL1", 1 << 32)                 # before the run: back
    assert guest.kvm_arm_get_reg(w, c, fpmr)[1] == 0


@pytest.mark.parametrize("reg,sve,want", [
    ("ZCR_EL1", False, ENOENT), ("ZCR_EL1", True, 0), ("SVCR", True, ENOENT),
    ("TPIDR2_EL0", True, ENOENT), ("SMCR_EL1", True, ENOENT), ("SMPRI_EL1", True, ENOENT),
    ("FPEXC32_EL2", False, 0),
])
def test_sysreg_visibility(kvm, reg, sve, want):
    w, c = kvm.make_vm(sve=sve)
    _, ret, val = guest.kvm_arm_get_reg(w, c, sysreg_one_reg_id(reg))
    assert ret == want
    if reg == "FPEXC32_EL2":
        assert val == 0x700


def test_zcr_el1_one_reg_stores_the_value_and_the_guest_gets_len(kvm):
    """ZCR_EL1's sys_reg_desc has no set_user: the value is stored and read back as written;
    hyp loads it into ZCR_EL1, whose bits [63:4] are RES0, so after the guest ran with the
    FP registers the hardware's value (LEN) is what the exit saved."""
    w, c = kvm.make_vm()
    zcr = sysreg_one_reg_id("ZCR_EL1")
    w, ret = guest.kvm_arm_set_reg(w, c, zcr, 0x1F2)
    assert ret == 0 and guest.kvm_arm_get_reg(w, c, zcr)[2] == 0x1F2
    w = guest_op(kvm.run(c)(w), c, "zcr_read")
    assert w.host.obs[-1].value == 2                     # LEN 2: VQ 3 asked for
    w = kvm.leave(c)(w)
    assert guest.kvm_arm_get_reg(w, c, zcr)[2] == 2
