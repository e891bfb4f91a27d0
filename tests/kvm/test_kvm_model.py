"""The model of KVM's x86 guest FPU (fpstate.kvm.x86): concrete expectations from the kernel's
rules, on bundled CPUs that have what this host lacks (AMX, XFD, XSAVES in guests, MPX, CET).

Each test states a behaviour of arch/x86/kvm/{x86.c,cpuid.c} and arch/x86/kernel/fpu/core.c
(v6.18): an errno, a size, a mask, which bytes a buffer holds, which variant breaks which rule.
"""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest

from fpstate.errors import FpstateError, ProgramError
from fpstate.kernel.x86 import core
from fpstate.kernel.x86.sched import Machine
from fpstate.kernel.x86.types import FPU_GUEST_PERM_LOCKED, KernelBug
from fpstate.kernel.x86.xstate_prctl import (
    ARCH_REQ_XCOMP_GUEST_PERM,
    ARCH_REQ_XCOMP_PERM,
    EBUSY,
    EINVAL,
    EOPNOTSUPP,
    EPERM,
)
from fpstate.kvm.x86 import x86
from fpstate.kvm.x86.cpuid import (
    XFD,
    CpuidEntry2,
    KvmCaps,
    find_cpuid,
    kvm_get_filtered_xcr0,
    xstate_required_size,
)
from fpstate.kvm.x86.fpu import default_configs, host_fpstates_with_guest_only_state
from fpstate.kvm.x86.vcpu import (
    GuestOp,
    KvmConfig,
    Vmm,
    guest_hardware_profile,
    model_config,
    model_system,
    model_vmm,
    run_guest_program,
)
from fpstate.x86.profiles import load_profile
from fpstate.x86.program import Buffer, Insn, Program

SPR = load_profile("sapphire-rapids")
SKX = load_profile("skylake-sp")
ZEN5 = load_profile("zen5")
XTILE_DATA, XTILE_CFG = 1 << 18, 1 << 17
CET = (1 << 11) | (1 << 12)


def vmm(profile, **kw) -> Vmm:
    return model_vmm(profile, **kw)


def vcpu_with_cpuid(v: Vmm, entries=None):
    vm = v.create_vm()
    vcpu = v.create_vcpu(vm)
    entries = v.supported_cpuid_0xd() if entries is None else entries
    assert v.set_cpuid2(vcpu, entries) == 0
    v.set_cr4(vcpu, osxsave=True)
    return vcpu


def with_leaf(entries, index, **regs):
    return tuple(replace(e, **regs) if e.function == 0xD and e.index == index else e
                 for e in entries)


def uabi(xstate_bv=0, mxcsr=0x1F80, size=4096, xcomp_bv=0, fill=None):
    """A UABI (standard format) buffer: FCW 037FH, MXCSR, the header; ``fill`` {offset: bytes}."""
    b = bytearray(size)
    struct.pack_into("<H", b, 0, 0x037F)
    struct.pack_into("<I", b, 24, mxcsr)
    struct.pack_into("<QQ", b, 512, xstate_bv, xcomp_bv)
    for off, data in (fill or {}).items():
        b[off:off + len(data)] = data
    return bytes(b)


# -- KVM_GET_SUPPORTED_CPUID, KVM_CAP_XSAVE2 and the guest permission flow ----------------------


def test_supported_cpuid_hides_amx_until_the_process_has_guest_permission() -> None:
    v = vmm(SPR)
    d0 = find_cpuid(v.supported_cpuid_0xd(), 0xD, 0)
    assert (d0.eax, d0.ebx, d0.ecx) == (0x2E7, 2696, 2696)  # no XTILE_CFG without DATA
    assert find_cpuid(v.supported_cpuid_0xd(), 0xD, 18) is None
    assert v.cap_xsave2() == 4096
    assert v.xcomp_guest_supp() == 0x602E7  # unfiltered by permission
    assert v.arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, 18) == 0
    sup = v.supported_cpuid_0xd()
    assert (find_cpuid(sup, 0xD, 0).eax, find_cpuid(sup, 0xD, 0).ebx) == (0x602E7, 11008)
    d18 = find_cpuid(sup, 0xD, 18)
    assert (d18.eax, d18.ebx, d18.ecx & 4) == (8192, 2816, 4)  # XFD-capable (VMX has XFD)
    assert find_cpuid(sup, 0xD, 1).ebx == 10752  # compacted, with XSS CET_U|CET_S
    assert v.cap_xsave2() == 11008


def test_filtered_xcr0_drops_xtile_cfg_when_xtile_data_is_not_permitted() -> None:
    caps = vmm(SPR).kvm.caps
    assert kvm_get_filtered_xcr0(caps, 0x21EE7) == 0x2E7  # guest default perm has CFG only
    assert kvm_get_filtered_xcr0(caps, 0x61EE7) == 0x602E7


def test_required_size_aligns_tile_components_in_the_compacted_format() -> None:
    caps = vmm(SPR).kvm.caps
    assert xstate_required_size(caps, 0x2E7, True) == 2440
    assert xstate_required_size(caps, 0x202E7, True) == 2560  # CFG rounded up to 2496
    assert xstate_required_size(caps, 0x602E7, False) == 11008


def test_vcpu_creation_locks_the_guest_permission() -> None:
    v = vmm(SPR)
    v.create_vcpu(v.create_vm())
    assert v.task.fpu.guest_perm.state_perm & FPU_GUEST_PERM_LOCKED
    assert v.arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, 18) == -EBUSY
    assert v.arch_prctl(ARCH_REQ_XCOMP_PERM, 18) == 0  # the host permission is not locked


def test_guest_permission_taken_before_the_vcpu_stays_granted() -> None:
    v = vmm(SPR)
    assert v.arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, 18) == 0
    v.create_vcpu(v.create_vm())
    assert v.arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, 18) == 0  # already permitted: no lock check


def test_guest_permission_for_amx_on_a_cpu_without_amx_is_eopnotsupp() -> None:
    v = vmm(ZEN5)
    assert v.arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, 18) == -EOPNOTSUPP
    assert v.cap_xsave2() == 4096


@pytest.mark.parametrize("kernel", ["5.16", "5.18"])
def test_kvm_offers_guests_amx_from_v5_17(kernel: str) -> None:
    """Versions row kvm_amx: before v5.17 arch_prctl() has no guest-permission options
    (-EINVAL), KVM_SUPPORTED_XCR0 has no tile components and kvm_cpu_caps no XFD, so a guest
    that arms IA32_XFD takes #GP and KVM_SET_MSRS refuses the tile bit. (5.18, not 5.17: the
    next test.)"""
    system = model_system(SPR, kernel=kernel)
    v = Vmm(Machine(system, 1), model_config(system))
    new = kernel == "5.18"
    assert v.arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, 18) == (0 if new else -EINVAL)
    assert v.kvm.caps.supported_xcr0 == (0x602E7 if new else 0x2E7)
    assert v.kvm.caps.cap(XFD) is new
    sup = v.supported_cpuid_0xd()
    assert find_cpuid(sup, 0xD, 0).eax == (0x602E7 if new else 0x2E7)
    assert bool(find_cpuid(sup, 0xD, 1).eax & XFD) is new
    vcpu = vcpu_with_cpuid(v)
    r = v.run(vcpu, [GuestOp("wrmsr", x86.MSR_IA32_XFD, XTILE_DATA)])
    assert r.results[0] is None if new else r.results[0].vector == "#GP"
    assert v.set_msrs(vcpu, [(x86.MSR_IA32_XFD, XTILE_DATA)]) == (1 if new else 0)
    assert v.arch_prctl(ARCH_REQ_XCOMP_PERM, 18) == 0  # the host's own permission: v5.16


def test_v5_17s_guest_permission_request_hides_the_default_features_from_the_vmm() -> None:
    """v5.17's __xstate_request_perm() stored the requested bits alone (063452fd94d1 fixed it
    in v5.18; versions row req_perm_adds), for guest permissions too: after a VMM's
    ARCH_REQ_XCOMP_GUEST_PERM(18) the guest permission is XTILE_DATA alone, and
    KVM_GET_SUPPORTED_CPUID -- which masks leaf 0xD with it -- offers the guest nothing else:
    no x87, SSE or AVX. A VMM that builds the guest's CPUID from it gives a guest whose CPUID
    has no FP/SSE in XCR0, which a Linux guest refuses to run XSAVE with."""
    system = model_system(SPR, kernel="5.17")
    v = Vmm(Machine(system, 1), model_config(system))
    assert find_cpuid(v.supported_cpuid_0xd(), 0xD, 0).eax == 0x2E7
    assert v.arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, 18) == 0
    assert v.task.fpu.guest_perm.state_perm == XTILE_DATA
    d0 = find_cpuid(v.supported_cpuid_0xd(), 0xD, 0)
    assert (d0.eax, d0.ebx) == (XTILE_DATA, 11008)
    assert v.cap_xsave2() == 11008
    assert v.xcomp_guest_supp() == 0x602E7  # KVM_GET_DEVICE_ATTR is not filtered


# -- KVM_SET_CPUID2 -----------------------------------------------------------------------------


def test_set_cpuid2_with_amx_needs_guest_permission() -> None:
    v = vmm(SPR)
    vcpu = v.create_vcpu(v.create_vm())
    fps = vcpu.arch.guest_fpu.fpstate
    amx = with_leaf(v.supported_cpuid_0xd(), 0, eax=0x602E7)
    assert v.set_cpuid2(vcpu, amx) == -EPERM
    assert vcpu.arch.cpuid == () and vcpu.arch.guest_supported_xcr0 == 0
    assert vcpu.arch.guest_fpu.fpstate is fps


def test_set_cpuid2_with_amx_reallocates_the_guest_fpstate() -> None:
    v = vmm(SPR)
    assert v.arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, 18) == 0
    vcpu = v.create_vcpu(v.create_vm())
    old = vcpu.arch.guest_fpu.fpstate
    assert (old.size, vcpu.arch.guest_fpu.uabi_size) == (2560, 4096)
    assert v.set_cpuid2(vcpu, v.supported_cpuid_0xd()) == 0
    gfpu = vcpu.arch.guest_fpu
    assert old.freed and gfpu.fpstate is not old
    assert gfpu.fpstate.size == v.task.fpu.guest_perm.state_size == 10752
    assert gfpu.uabi_size == 11008 and gfpu.xfeatures & XTILE_DATA
    assert gfpu.fpstate.is_guest and gfpu.fpstate.xfd == 0
    assert vcpu.arch.guest_supported_xcr0 == 0x602E7
    assert v.get_xsave(vcpu) == -EINVAL  # struct kvm_xsave is only 4096 bytes
    assert len(v.get_xsave2(vcpu)) == 11008


def test_set_cpuid2_after_the_vcpu_ran_must_be_identical() -> None:
    v = vmm(ZEN5)
    vcpu = vcpu_with_cpuid(v)
    v.run(vcpu)
    same = vcpu.arch.cpuid
    assert v.set_cpuid2(vcpu, same) == 0
    assert v.set_cpuid2(vcpu, with_leaf(same, 0, eax=0x7)) == -EINVAL
    assert vcpu.arch.guest_supported_xcr0 == 0x2E7


def test_guest_supported_xcr0_is_guest_cpuid_and_kvm_supported() -> None:
    v = vmm(ZEN5)
    vcpu = vcpu_with_cpuid(v, with_leaf(v.supported_cpuid_0xd(), 0, eax=0x800FF))
    assert vcpu.arch.guest_supported_xcr0 == 0xE7  # MPX and APX bits are not KVM-supported


# -- XCR0 ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("xcr0", "ok"), [
    (0x1, True), (0x3, True), (0x7, True), (0xE7, True), (0x2E7, True), (0x602E7, True),
    (0x0, False), (0x2, False), (0x5, False), (0x27, False), (0xE3, False), (0x67, False),
    (0x202E7, False), (0x402E7, False), (0x800E7, False), (0x1 | 1 << 63, False),
])
def test_kvm_set_xcrs_applies_the_xcr0_rules(xcr0: int, ok: bool) -> None:
    v = vmm(SPR)
    assert v.arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, 18) == 0
    vcpu = vcpu_with_cpuid(v)
    assert v.set_xcrs(vcpu, [(0, xcr0)]) == (0 if ok else -EINVAL)
    assert v.get_xcrs(vcpu) == {0: xcr0 if ok else 1}


@pytest.mark.parametrize(("xcr0", "ok"), [(0x1F, True), (0xF, False), (0x17, False),
                                          (0x2FF, True)])
def test_mpx_components_must_be_enabled_together(xcr0: int, ok: bool) -> None:
    v = vmm(SKX)
    vcpu = vcpu_with_cpuid(v)
    assert v.set_xcrs(vcpu, [(0, xcr0)]) == (0 if ok else -EINVAL)


def test_kvm_set_xcrs_entry_rules() -> None:
    v = vmm(ZEN5)
    vcpu = vcpu_with_cpuid(v)
    assert v.set_xcrs(vcpu, [(1, 0)] * 17) == -EINVAL
    assert v.set_xcrs(vcpu, [(0, 7)], flags=1) == -EINVAL
    assert v.set_xcrs(vcpu, [(1, 0x3), (0, 0x7), (0, 0xE7)]) == 0
    assert v.get_xcrs(vcpu) == {0: 0x7}  # only the first XCR0 entry counts
    assert v.set_xcrs(vcpu, [(1, 0x55)]) == 0 and v.get_xcrs(vcpu) == {0: 0x7}


def test_guest_xsetbv_faults_and_successes() -> None:
    v = vmm(ZEN5)
    vcpu = vcpu_with_cpuid(v)
    vcpu.arch.cpuid_dynamic_bits_dirty = False
    r = v.run(vcpu, [GuestOp("xsetbv", 0, 0x7, cpl=3), GuestOp("xsetbv", 0, 0x5),
                     GuestOp("xsetbv", 1, 0x7), GuestOp("xsetbv", 0, 0xE7)])
    assert [f.vector if f else None for f in r.results] == ["#GP", "#GP", "#GP", None]
    assert v.get_xcrs(vcpu) == {0: 0xE7} and vcpu.arch.cpuid_dynamic_bits_dirty
    v.set_cr4(vcpu, osxsave=False)
    assert v.run(vcpu, [GuestOp("xsetbv", 0, 0x7)]).results[0].vector == "#UD"


def test_guest_xcr0_is_loaded_around_vm_entry_only() -> None:
    v = vmm(ZEN5)
    vcpu = vcpu_with_cpuid(v)
    assert v.set_xcrs(vcpu, [(0, 0x3)]) == 0
    r = v.run(vcpu, [GuestOp("write", 2), GuestOp("write", 1)])
    assert r.results[0].vector == "#UD" and r.results[1] is None  # AVX off in the guest's XCR0
    assert v.m.cpus[v.nr].regs.xcr0 == v.m.system.xcr0  # the host's XCR0 is back


@pytest.mark.parametrize("variants,host_after,guest_after", [
    ((), 0x55555554, 0x1234567C), (("kvm-pkru-cr4-pke-only",), 0x1234567C, 0)])
def test_a_guest_xrstor_of_pkru_with_cr4_pke_clear(variants, host_after, guest_after) -> None:
    """PKRU in the guest's XCR0, CR4.PKE clear: the guest writes PKRU (XRSTOR). KVM saves it
    into vcpu->arch.pkru and puts the host's back; VMX before 37486135d3a7 (variant
    kvm-pkru-cr4-pke-only) switched PKRU on CR4.PKE alone, so the host thread kept the guest's
    PKRU and vcpu->arch.pkru its old 0."""
    v = vmm(SPR, variants=variants)
    vcpu = vcpu_with_cpuid(v)
    regs = v.m.cpus[v.nr].regs
    regs.wrpkru(0x55555554)  # the VMM thread's PKRU (init_pkru_value)
    xcr0 = vcpu.arch.guest_supported_xcr0 | 1
    assert xcr0 & 1 << 9 and not vcpu.arch.cr4_pke and vcpu.arch.pkru == 0
    data = (0x1234567C).to_bytes(4, "little") + bytes(4)
    r = v.run(vcpu, [GuestOp("xsetbv", 0, xcr0), GuestOp("write", 9, data=data)])
    assert r.results == (None, None)
    assert int.from_bytes(regs.component(9)[:4], "little") == host_after
    assert vcpu.arch.pkru == guest_after


def test_a_guest_write_of_a_component_the_cpu_lacks_is_ud() -> None:
    """BNDMOV on Sapphire Rapids (no MPX): XCR0[3] can never be set, so #UD -- found by the
    state machine (tests/kvm/test_kvm_stateful.py), where it used to raise ProfileError."""
    v = vmm(SPR)
    vcpu = vcpu_with_cpuid(v)
    (fault,) = v.run(vcpu, [GuestOp("write", 3)]).results
    assert (fault.vector, fault.reason) == ("#UD", "XCR0[3] = 0")


# -- IA32_XSS, IA32_XFD, IA32_XFD_ERR -------------------------------------------------------------


def test_ia32_xss_follows_the_guest_cpuid() -> None:
    v = vmm(SPR)
    vcpu = vcpu_with_cpuid(v)
    assert vcpu.arch.guest_supported_xss == 0x1800
    assert v.set_msrs(vcpu, [(x86.MSR_IA32_XSS, 0x1800)]) == 1
    assert v.set_msrs(vcpu, [(x86.MSR_IA32_XSS, 0x400)]) == 0  # PASID: not KVM-supported
    assert v.get_msrs(vcpu, [x86.MSR_IA32_XSS]) == {x86.MSR_IA32_XSS: 0x1800}
    no_xsaves = with_leaf(v.supported_cpuid_0xd(), 1, eax=0x17)
    other = vcpu_with_cpuid(v, no_xsaves)
    assert v.set_msrs(other, [(x86.MSR_IA32_XSS, 0)]) == 1  # advertised: a zero write passes
    assert v.set_msrs(other, [(x86.MSR_IA32_XSS, 0x800)]) == 0


def test_ia32_xss_zero_write_is_refused_where_kvm_supports_no_xss() -> None:
    v = vmm(ZEN5, vendor="pvm")  # no XSAVES for guests, hence supported_xss = 0
    vcpu = vcpu_with_cpuid(v)
    assert v.kvm.caps.supported_xss == 0
    assert v.set_msrs(vcpu, [(x86.MSR_IA32_XSS, 0)]) == 0
    assert v.get_msrs(vcpu, [x86.MSR_IA32_XSS]) == {x86.MSR_IA32_XSS: 0}
    assert v.set_msrs(vcpu, [(x86.MSR_IA32_XFD, 0)]) == 1  # host writes pass the CPUID check
    assert v.set_msrs(vcpu, [(x86.MSR_IA32_XFD, XTILE_DATA)]) == 0


def test_guest_xfd_nm_is_intercepted_and_the_buffer_is_never_reallocated() -> None:
    v = vmm(SPR)
    assert v.arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, 18) == 0
    vcpu = vcpu_with_cpuid(v)
    assert v.set_xcrs(vcpu, [(0, 0x602E7)]) == 0
    fps = vcpu.arch.guest_fpu.fpstate
    r = v.run(vcpu, [
        GuestOp("wrmsr", x86.MSR_IA32_XFD, XTILE_DATA),  # emulated, then passed through
        GuestOp("write", 18),  # #NM: intercepted, XFD_ERR saved, re-injected
        GuestOp("rdmsr", x86.MSR_IA32_XFD_ERR),
        GuestOp("wrmsr", x86.MSR_IA32_XFD_ERR, 0),
        GuestOp("wrmsr", x86.MSR_IA32_XFD, 0),  # not intercepted any more
        GuestOp("write", 18),
    ])
    assert r.results[0] is None and r.results[1].vector == "#NM"
    assert r.results[2] == XTILE_DATA and r.results[3:] == (None, None, None)
    assert vcpu.arch.xfd_no_write_intercept
    assert vcpu.arch.guest_fpu.fpstate is fps and fps.xfd == 0  # synced at VM exit
    assert vcpu.arch.guest_fpu.xfd_err == 0
    assert v.m.cpus[v.nr].regs.xfd_err == 0  # the host never keeps the guest's XFD_ERR
    assert fps.xstate_bv & XTILE_DATA


def test_xfd_writes_outside_the_guests_dynamic_features_are_refused() -> None:
    v = vmm(SPR)
    vcpu = vcpu_with_cpuid(v)  # no AMX in the guest CPUID (no permission)
    r = v.run(vcpu, [GuestOp("wrmsr", x86.MSR_IA32_XFD, XTILE_DATA)])
    assert r.results[0].vector == "#GP"
    assert v.set_msrs(vcpu, [(x86.MSR_IA32_XFD, XTILE_DATA)]) == 0


# -- KVM_GET_XSAVE / KVM_GET_XSAVE2 / KVM_SET_XSAVE --------------------------------------------


def test_a_new_vcpus_xsave_buffer() -> None:
    v = vmm(SPR)
    vcpu = vcpu_with_cpuid(v)
    buf = v.get_xsave(vcpu)
    assert len(buf) == 4096
    assert buf[0:2] == b"\x7f\x03" and struct.unpack_from("<II", buf, 24) == (0x1F80, 0xFFFF)
    assert struct.unpack_from("<Q", buf, 464)[0] == 0x602E7  # xstate_fx_sw_bytes: host XCR0
    assert buf[512:576] == bytes(64) and buf[576:] == bytes(4096 - 576)


@pytest.mark.parametrize(("what", "buf"), [
    ("bit outside KVM's supported XCR0", uabi(xstate_bv=0x3 | 1 << 19)),
    ("a supervisor bit", uabi(xstate_bv=0x3 | 1 << 11)),
    ("XCOMP_BV", uabi(xstate_bv=0x3, xcomp_bv=1 << 63 | 0x3)),
    ("a reserved header byte", uabi(xstate_bv=0x3, fill={540: b"\x01"})),
    ("MXCSR bit outside MXCSR_MASK", uabi(xstate_bv=0x2, mxcsr=0x10000)),
    ("MXCSR with only YMM", uabi(xstate_bv=0x4, mxcsr=1 << 31)),
])
def test_kvm_set_xsave_rejects_with_einval(what: str, buf: bytes) -> None:
    v = vmm(SPR)
    vcpu = vcpu_with_cpuid(v)
    before = bytes(vcpu.arch.guest_fpu.fpstate.regs)
    assert v.set_xsave(vcpu, buf) == -EINVAL, what
    assert bytes(vcpu.arch.guest_fpu.fpstate.regs) == before  # nothing changed


def test_kvm_set_xsave_ignores_mxcsr_without_fp_sse_ymm_and_needs_uabi_size_bytes() -> None:
    v = vmm(SPR)
    vcpu = vcpu_with_cpuid(v)
    assert v.set_xsave(vcpu, uabi(xstate_bv=0x20, mxcsr=0xFFFFFFFF)) == 0
    assert v.set_xsave(vcpu, uabi()[:4000]) == -14  # memdup_user of 4096 bytes faults


def test_set_checks_kvm_wide_xcr0_but_get_masks_with_the_guests() -> None:
    v = vmm(SPR)
    vcpu = vcpu_with_cpuid(v, with_leaf(v.supported_cpuid_0xd(), 0, eax=0x207))  # no AVX-512
    k1 = bytes(range(8))
    assert v.set_xsave(vcpu, uabi(xstate_bv=0x27, fill={1088: k1})) == 0  # opmask at 1088
    out = v.get_xsave(vcpu)
    assert struct.unpack_from("<Q", out, 512)[0] == 0x7 and out[1088:1096] == bytes(8)
    assert vcpu.arch.guest_fpu.fpstate.xstate_bv & 0x20  # the state is there, only hidden


def test_pkru_lives_in_vcpu_arch_pkru() -> None:
    v = vmm(SPR)
    vcpu = vcpu_with_cpuid(v)
    pkru = struct.pack("<II", 0x55555554, 0)
    assert v.set_xsave(vcpu, uabi(xstate_bv=0x203, fill={2688: pkru})) == 0
    assert vcpu.arch.pkru == 0x55555554
    assert v.set_xsave(vcpu, uabi(xstate_bv=0x3)) == 0
    assert vcpu.arch.pkru == 0x55555554  # PKRU bit clear: KVM's ABI keeps vcpu->arch.pkru
    out = v.get_xsave(vcpu)
    assert struct.unpack_from("<QI", out, 512)[0] == 0x3 and out[2688:2696] == bytes(8)
    assert v.set_xsave(vcpu, uabi(xstate_bv=0x203, fill={2688: pkru})) == 0
    vcpu.arch.pkru = 0x12345678  # as a guest WRPKRU leaves it after VM exit
    out = v.get_xsave(vcpu)
    assert struct.unpack_from("<I", out, 2688)[0] == 0x12345678  # from arch.pkru, not memory


def test_set_then_get_round_trips_the_guest_visible_components() -> None:
    v = vmm(ZEN5)
    vcpu = vcpu_with_cpuid(v)
    fill = {160: bytes(range(256)), 576: bytes(range(255, -1, -1)), 832: bytes(range(64))}
    buf = uabi(xstate_bv=0x27, mxcsr=0x1F00, fill=fill)
    assert v.set_xsave(vcpu, buf) == 0
    out = v.get_xsave(vcpu)
    assert out[160:416] == fill[160] and out[576:832] == fill[576] and out[832:896] == fill[832]
    assert struct.unpack_from("<IQ", out, 24)[0] == 0x1F00
    assert struct.unpack_from("<Q", out, 512)[0] == 0x27


# -- INIT and RESET (seed 003) ----------------------------------------------------------------


def test_reset_needs_nothing_the_buffer_is_zero_allocated() -> None:
    v = vmm(SKX)
    vcpu = v.create_vcpu(v.create_vm())
    fps = vcpu.arch.guest_fpu.fpstate
    assert fps.xstate_bv == 0 and bytes(fps.regs[576:]) == bytes(fps.size - 576)
    assert v.call(x86.kvm_xstate_reset, vcpu, False) == 0


def test_init_zeroes_mpx_and_keeps_everything_else() -> None:
    v = vmm(SKX)
    vcpu = vcpu_with_cpuid(v)
    assert v.set_xcrs(vcpu, [(0, 0x1F)]) == 0
    v.run(vcpu, [GuestOp("write", 2), GuestOp("write", 3), GuestOp("write", 4)])
    fps = vcpu.arch.guest_fpu.fpstate
    ymm = core.fpstate_read_component(v.m.system, fps, 2)
    reloads = vcpu.stat_fpu_reload
    assert v.init(vcpu) == 0x18
    assert core.fpstate_read_component(v.m.system, fps, 3) == bytes(64)
    assert core.fpstate_read_component(v.m.system, fps, 4) == bytes(64)
    assert fps.xstate_bv & 0x18 == 0x18  # memset only: the header bits stay
    assert core.fpstate_read_component(v.m.system, fps, 2) == ymm
    assert vcpu.stat_fpu_reload == reloads  # the FPU was not loaded: no put/load
    assert v.get_xcrs(vcpu) == {0: 0x1F}  # XCR0 survives INIT


def test_init_inside_kvm_run_puts_and_reloads_the_guest_fpu() -> None:
    v = vmm(SKX)
    vcpu = vcpu_with_cpuid(v)
    assert v.set_xcrs(vcpu, [(0, 0x1F)]) == 0
    r = v.run(vcpu, [GuestOp("write", 3), GuestOp("read", 3), GuestOp("init"),
                     GuestOp("read", 3)])
    assert r.results[1] != bytes(64) and r.results[2] == 0x18
    assert r.results[3] == bytes(64)  # the registers were reloaded from the cleared buffer
    assert vcpu.stat_fpu_reload == 2 and not v.kvm.warnings


def cet_cpuid(v: Vmm) -> tuple:
    """The supported leaf 0xD plus CPUID.7.0 with SHSTK (ECX[7]) and IBT (EDX[20])."""
    leaf7 = CpuidEntry2(7, 0, 1, 0, 0, 1 << 7, 1 << 20)
    return (*v.supported_cpuid_0xd(), leaf7)


def test_cet_msrs_live_in_the_guest_registers() -> None:
    v = vmm(SPR)
    vcpu = vcpu_with_cpuid(v, cet_cpuid(v))
    msrs = [(x86.MSR_IA32_U_CET, 0x1), (x86.MSR_IA32_PL3_SSP, 0x7FF8),
            (x86.MSR_IA32_PL0_SSP, 0x1000), (x86.MSR_IA32_PL2_SSP, 0x2000)]
    assert v.set_msrs(vcpu, msrs) == 4
    assert vcpu.stat_fpu_reload == 1  # one load/put around the whole batch
    fps = vcpu.arch.guest_fpu.fpstate
    assert core.fpstate_read_component(v.m.system, fps, 11) == struct.pack("<QQ", 0x1, 0x7FF8)
    assert core.fpstate_read_component(v.m.system, fps, 12)[0:8] == struct.pack("<Q", 0x1000)
    assert v.get_msrs(vcpu, [i for i, _ in msrs]) == dict(msrs)


@pytest.mark.parametrize(("index", "value"), [
    (x86.MSR_IA32_U_CET, 1 << 6),  # reserved
    (x86.MSR_IA32_U_CET, 1 << 10 | 1 << 11),  # SUPPRESS with WAIT_ENDBR
    (x86.MSR_IA32_PL0_SSP, 0x1001),  # not 4-byte aligned
    (x86.MSR_IA32_PL3_SSP, 1 << 47),  # not canonical
])
def test_bad_cet_msr_values_are_refused(index: int, value: int) -> None:
    v = vmm(SPR)
    vcpu = vcpu_with_cpuid(v, cet_cpuid(v))
    assert v.set_msrs(vcpu, [(index, value)]) == 0


def test_cet_msrs_need_the_guest_capability() -> None:
    v = vmm(SPR)
    vcpu = vcpu_with_cpuid(v)  # no CPUID.7 SHSTK/IBT
    assert v.set_msrs(vcpu, [(x86.MSR_IA32_U_CET, 0x1)]) == 0
    assert v.set_msrs(vcpu, [(x86.MSR_IA32_U_CET, 0)]) == 1  # advertised: zero write ignored
    assert v.get_msrs(vcpu, [x86.MSR_IA32_PL0_SSP]) == {x86.MSR_IA32_PL0_SSP: 0}


def test_init_zeroes_cet_unless_the_rejected_variant() -> None:
    msrs = [(x86.MSR_IA32_U_CET, 0x1), (x86.MSR_IA32_PL3_SSP, 0x7FF8),
            (x86.MSR_IA32_PL0_SSP, 0x1000)]
    for variants, expected in (((), {i: 0 for i, _ in msrs}), (("init-keeps-cet",), dict(msrs))):
        v = vmm(SPR, variants=variants)
        vcpu = vcpu_with_cpuid(v, cet_cpuid(v))
        assert v.set_msrs(vcpu, msrs) == 3
        assert v.init(vcpu) == (0 if variants else CET)
        assert v.get_msrs(vcpu, [i for i, _ in msrs]) == expected


# -- seed 000: the task's buffer grows for AMX before KVM_RUN ---------------------------------


@pytest.mark.parametrize("variant", [None, "kvm-save-min-size"])
def test_amx_user_then_kvm_run(variant: str | None) -> None:
    v = vmm(SPR, variants=(variant,) if variant else ())
    vcpu = vcpu_with_cpuid(v)
    assert v.arch_prctl(ARCH_REQ_XCOMP_PERM, 18) == 0
    assert v.m.user_write(v.nr, 18).vector == "#NM"  # first use: XFD #NM, reallocation
    assert v.task.fpu.fpstate.size == 10752
    tiles = v.m.user_read(v.nr, 18)
    r = v.run(vcpu, [GuestOp("write", 2)])
    assert v.m.user_read(v.nr, 18) == tiles
    if variant is None:
        assert r.overflow is None and not v.kvm.violations
    else:
        assert (r.overflow.alloc, r.overflow.end, r.overflow.bytes_beyond) == (2560, 10752, 8192)
        assert [x.name for x in v.kvm.violations] == ["xsave-out-of-bounds"]


def test_kvm_run_preempted_with_the_guest_fpu_loaded() -> None:
    system = model_system(ZEN5)
    m = Machine(system, 1)
    v = Vmm(m, model_config(system))
    vcpu = vcpu_with_cpuid(v)
    assert v.set_xcrs(vcpu, [(0, 0xE7)]) == 0
    ymm = bytes(range(32)) * 8
    assert v.set_xsave(vcpu, uabi(xstate_bv=0x7, fill={576: ymm})) == 0
    assert v.m.user_write(0, 2, bytes(256)) is None
    other = m.spawn("other")
    from fpstate.kvm.x86.vcpu import kvm_arch_vcpu_ioctl_run

    m.enter_kernel(0)
    m.start(0, kvm_arch_vcpu_ioctl_run, vcpu, (GuestOp("read", 2),))  # stops after loading
    m.run(0, other)
    assert m.user_write(0, 2, bytes([0xEE]) * 256) is None  # the other task clobbers YMM
    m.preempt(0, v.task)
    result = m.finish(0)
    m.exit_to_user_mode(0)
    assert result.results[0] == ymm  # restored from the guest fpstate after the switch
    assert m.user_read(0, 2) == bytes(256)  # and the VMM's own state from its fpstate


# -- seed 001: guest-only supervisor state ----------------------------------------------------


def test_guest_default_features_and_sizes_next_to_the_hosts() -> None:
    spr = default_configs(model_system(SPR))
    assert (spr.host_features, spr.guest_features, spr.guest_only) == (0x20EE7, 0x21EE7, 1 << 12)
    assert (spr.host_size, spr.guest_size) == (2560, 2560)  # padding absorbs the 24 bytes
    zen = default_configs(model_system(ZEN5))
    assert (zen.host_size, zen.guest_size) == (2456, 2480)  # the 24 bytes of CET_S


def test_cet_kernel_only_ever_in_guest_fpstates() -> None:
    v = vmm(ZEN5)
    vcpu = vcpu_with_cpuid(v)
    v.run(vcpu, [GuestOp("write", 2)])
    assert vcpu.arch.guest_fpu.fpstate.xcomp_bv & 1 << 12
    assert not v.task.fpu.fpstate.xcomp_bv & 1 << 12
    assert host_fpstates_with_guest_only_state(v.m) == []


def test_variant_guest_only_in_host_fpstate_is_caught() -> None:
    v = vmm(ZEN5, variants=("guest-only-in-host-fpstate",))
    assert v.m.system.kernel.default_size == 2480
    bad = host_fpstates_with_guest_only_state(v.m)
    assert bad and bad[0].startswith("init_fpstate") and any("qemu" in b for b in bad)


# -- configuration ----------------------------------------------------------------------------


def test_unknown_variants_and_vendors_are_refused() -> None:
    system = model_system(ZEN5)
    caps = model_config(system).caps
    with pytest.raises(FpstateError, match="unknown KVM model variant"):
        KvmConfig(caps, ZEN5, frozenset({"no-such"}))
    with pytest.raises(FpstateError, match="unknown KVM vendor"):
        model_config(system, vendor="hyperv")


def test_kvm_caps_from_what_a_kvm_reports() -> None:
    v = vmm(ZEN5, vendor="pvm")
    sup = v.supported_cpuid_0xd()
    caps = KvmCaps.from_kvm(v.xcomp_guest_supp(), sup, ZEN5)
    assert (caps.supported_xcr0, caps.supported_xss, caps.d1_eax) == (0x2E7, 0, 0)
    assert caps.xstate == v.kvm.caps.xstate


def test_guest_hardware_has_no_xsaves_unless_kvm_enables_it() -> None:
    v = vmm(SPR)
    with_xsaves = vcpu_with_cpuid(v)
    without = vcpu_with_cpuid(v, with_leaf(v.supported_cpuid_0xd(), 1, eax=0x17))
    assert guest_hardware_profile(with_xsaves).has("XSAVES")
    assert not guest_hardware_profile(without).has("XSAVES")
    assert guest_hardware_profile(without).has("XSAVEC")  # not interceptable
    assert guest_hardware_profile(with_xsaves).xss_supported == 0x1800


# -- guest programs where KVM enables XSAVES (this host's KVM does not) --------------------------


def _xsaves_program(cpl: int) -> Program:
    start = uabi(size=576)
    ones = (1 << 64) - 1
    return Program(start, (Insn("XSAVES", buf=0, mask=ones), Insn("XRSTORS", buf=0, mask=ones)),
                   (Buffer(),), cpl=cpl)


def test_guest_xsaves_with_cet_in_ia32_xss() -> None:
    v = vmm(SPR)
    vcpu = vcpu_with_cpuid(v)
    outcomes = run_guest_program(vcpu, _xsaves_program(0), xcr0=0x2E7, xss=0x1800)
    for o in outcomes:  # (they differ only in what a preemption would change)
        xstate_bv, xcomp_bv = struct.unpack_from("<QQ", o.buffers[0], 512)
        assert o.fault is None and xcomp_bv == 1 << 63 | 0x1AE7
        assert xstate_bv & ~0x2 == 0  # CET_U and CET_S are in their initial configuration
    assert v.get_msrs(vcpu, [x86.MSR_IA32_XSS]) == {x86.MSR_IA32_XSS: 0x1800}
    (o,) = run_guest_program(vcpu, _xsaves_program(3), xcr0=0x2E7, xss=0x1800)
    assert (o.fault.vector, o.fault_step) == ("#GP", 0)


def test_guest_xsaves_is_ud_and_ia32_xss_refused_without_the_cap() -> None:
    v = vmm(SPR)
    vcpu = vcpu_with_cpuid(v, with_leaf(v.supported_cpuid_0xd(), 1, eax=0x17))
    (o,) = run_guest_program(vcpu, _xsaves_program(0), xcr0=0x2E7)
    assert (o.fault.vector, o.fault_step) == ("#UD", 0)
    with pytest.raises(ProgramError, match="needs XSAVES"):
        run_guest_program(vcpu, _xsaves_program(0), xcr0=0x2E7, xss=0x800)
    other = vcpu_with_cpuid(v)
    with pytest.raises(ProgramError, match="IA32_XSS 0x400"):
        run_guest_program(other, _xsaves_program(0), xcr0=0x2E7, xss=0x400)  # PASID


# -- AMX under XFD in a guest program (this host's KVM offers neither) -------------------------


def _amx_program(cpl: int = 0) -> Program:
    cfg = bytearray(64)
    cfg[0], cfg[48] = 1, 16
    struct.pack_into("<H", cfg, 16, 64)
    return Program(uabi(size=576), (Insn("LDTILECFG", data=bytes(cfg)),
                                    Insn("TILEZERO", reg=0)), cpl=cpl)


def test_guest_amx_under_xfd_is_nm_and_the_guest_fpstate_keeps_its_size() -> None:
    v = vmm(SPR)
    assert v.arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, 18) == 0
    vcpu = vcpu_with_cpuid(v)
    size = vcpu.arch.guest_fpu.fpstate.size
    (o,) = run_guest_program(vcpu, _amx_program(), xcr0=0x602E7, preempt=False)
    assert o.fault is None
    (o,) = run_guest_program(vcpu, _amx_program(), xcr0=0x602E7, xfd=1 << 18, preempt=False)
    assert (o.fault.vector, o.fault_step) == ("#NM", 1)  # TILEZERO touches tile data
    assert v.get_msrs(vcpu, [x86.MSR_IA32_XFD]) == {x86.MSR_IA32_XFD: 1 << 18}
    assert vcpu.arch.xfd_no_write_intercept  # the first nonzero guest write (vmx_set_msr)
    assert vcpu.arch.guest_fpu.fpstate.size == size  # sized at KVM_SET_CPUID2, never on #NM
    (o,) = run_guest_program(vcpu, _amx_program(), xcr0=0x602E7, preempt=False)
    assert o.fault is None  # the next run disarms XFD again


def test_guest_xfd_needs_the_guest_xfd_cap() -> None:
    v = vmm(ZEN5, vendor="svm")  # no XFD on AMD
    vcpu = vcpu_with_cpuid(v)
    with pytest.raises(ProgramError, match=r"EAX\[4\]=0"):
        run_guest_program(vcpu, _amx_program(), xcr0=0xE7, xfd=1 << 18)


def test_kvm_get_xsave2_can_report_an_mxcsr_the_guest_does_not_hold() -> None:
    """KVM_SET_XSAVE with XSTATE_BV = YMM only stores its MXCSR ("SSE and YMM require MXCSR even
    when FP is not in use", copy_uabi_to_xstate); KVM_RUN's XRSTORS then gives the guest
    MXCSR = 1F80H (SSE in its initial state), and its XSAVES does not write MXCSR (SSE not in
    use), so KVM_GET_XSAVE2 -- which copies MXCSR whenever YMM is in the header -- reports the
    stale value. Measured the same on this machine's KVM (where no host event re-saves SSE)."""
    v = vmm(ZEN5)
    vcpu = vcpu_with_cpuid(v)
    buf = uabi(xstate_bv=0x4, mxcsr=0x25F36, fill={576: bytes([3]) * 256})
    assert v.set_xsave(vcpu, buf) == 0
    v.run(vcpu, [GuestOp("xsetbv", 0, 0xE7)])
    fps = vcpu.arch.guest_fpu.fpstate
    assert fps.xstate_bv & 0x7 == 0x4  # saved with SSE not in use: the guest's MXCSR was 1F80H
    out = v.get_xsave2(vcpu)
    assert struct.unpack_from("<Q", out, 512)[0] & 0x7 == 0x4
    assert struct.unpack_from("<I", out, 24)[0] == 0x25F36  # what KVM_SET_XSAVE left


# -- the legacy KVM_GET_FPU / KVM_SET_FPU ------------------------------------------------------


def _kvm_fpu(fcw: int, st0: bytes, xmm0: bytes, mxcsr: int = 0x1FA0) -> bytes:
    """struct kvm_fpu: fpr[0] = ``st0``, FCW, XMM0 = ``xmm0``, MXCSR (which KVM ignores)."""
    import struct

    out = bytearray(416)
    out[0:10] = st0
    struct.pack_into("<H", out, 128, fcw)
    out[152:168] = xmm0
    struct.pack_into("<I", out, 408, mxcsr)
    return bytes(out)


def test_kvm_set_fpu_without_x87_and_sse_in_xstate_bv_is_lost_to_the_guest() -> None:
    """kvm_arch_vcpu_ioctl_set_fpu() writes the guest fpstate's legacy area and not its header:
    on a new vCPU (XSTATE_BV 0) KVM_GET_FPU reads the write back while KVM_GET_XSAVE2 -- and
    the guest, whose XRSTOR follows the header -- see x87 and SSE initial (FCW 037FH, XMM0
    zero). MXCSR is in neither direction (KVM_GET_FPU reports 0)."""
    v = vmm(SPR)
    vcpu = vcpu_with_cpuid(v)
    fpu = _kvm_fpu(0x027F, b"\x11" * 10, b"\x22" * 16)
    assert v.set_fpu(vcpu, fpu) == 0
    got = v.get_fpu(vcpu)
    assert got[:408] == fpu[:408] and got[408:412] == bytes(4)
    buf = v.get_xsave2(vcpu)
    assert buf[512:520] == bytes(8)
    assert buf[0:2] == (0x037F).to_bytes(2, "little") and buf[160:176] == bytes(16)
    assert buf[24:28] == (0x1F80).to_bytes(4, "little")


def test_kvm_set_fpu_with_x87_and_sse_in_xstate_bv_reaches_the_guest() -> None:
    """With x87 and SSE in the header (a KVM_SET_XSAVE put them there) KVM_SET_FPU's values
    are what KVM_GET_XSAVE2 returns: FCW at byte 0, ST0 at 32, XMM0 at 160; MXCSR stays the
    buffer's."""
    v = vmm(SPR)
    vcpu = vcpu_with_cpuid(v)
    assert v.set_xsave(vcpu, uabi(xstate_bv=0x3, mxcsr=0x1F80)) == 0
    assert v.set_fpu(vcpu, _kvm_fpu(0x027F, b"\x11" * 10, b"\x22" * 16)) == 0
    buf = v.get_xsave2(vcpu)
    assert int.from_bytes(buf[512:520], "little") == 0x3
    assert buf[0:2] == (0x027F).to_bytes(2, "little")
    assert buf[32:42] == b"\x11" * 10 and buf[160:176] == b"\x22" * 16
    assert buf[24:28] == (0x1F80).to_bytes(4, "little")


# -- guest XFD_ERR across exits (vcpu_enter_guest's XFD lines) ----------------------------------


def _xfd_guest(variants=(), ncpus: int = 1, kernel_variants=(), fixes=()):
    v = vmm(SPR, variants=variants, ncpus=ncpus)
    if kernel_variants or fixes:  # the kernel model's variants and fixes: booted in
        system = v.m.system.with_options(variants=frozenset(kernel_variants), fixes=fixes)
        v = Vmm(Machine(system, ncpus), model_config(system, "vmx", variants))
    assert v.arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, 18) == 0
    vcpu = vcpu_with_cpuid(v)
    assert v.set_xcrs(vcpu, [(0, 0x602E7)]) == 0
    return v, vcpu


def test_a_second_xfd_nm_before_the_guest_clears_xfd_err_keeps_it() -> None:
    # The second #NM exits with guest_fpu.xfd_err still set: handle_exit_irqoff() reads the
    # MSR before vcpu_enter_guest() writes 0 to it, so the guest still reads bit 18.
    v, vcpu = _xfd_guest()
    r = v.run(vcpu, [GuestOp("wrmsr", x86.MSR_IA32_XFD, XTILE_DATA), GuestOp("write", 18),
                     GuestOp("write", 18), GuestOp("rdmsr", x86.MSR_IA32_XFD_ERR)])
    assert [getattr(x, "vector", x) for x in r.results] == [None, "#NM", "#NM", XTILE_DATA]
    assert vcpu.arch.guest_fpu.xfd_err == XTILE_DATA
    assert v.m.cpus[v.nr].regs.xfd_err == 0


def _arm_in_the_guest_then_fault(v: Vmm, vcpu) -> None:
    """Arm XFD (emulated: the first nonzero write), disarm it with the write passed through,
    exit (fps->xfd synced to 0); then arm it again in the guest and take the #NM in the same
    entry."""
    v.run(vcpu, [GuestOp("wrmsr", x86.MSR_IA32_XFD, XTILE_DATA),
                 GuestOp("wrmsr", x86.MSR_IA32_XFD, 0)])
    assert vcpu.arch.xfd_no_write_intercept and vcpu.arch.guest_fpu.fpstate.xfd == 0
    r = v.run(vcpu, [GuestOp("wrmsr", x86.MSR_IA32_XFD, XTILE_DATA), GuestOp("write", 18)])
    assert r.results[1].vector == "#NM"
    assert vcpu.arch.guest_fpu.fpstate.xfd == XTILE_DATA  # synced at the exit either way


@pytest.mark.parametrize("variants", [(), ("xfd-sync-after-irqoff",)])
def test_xfd_err_of_a_guest_armed_xfd_follows_the_vcpu_to_another_cpu(variants) -> None:
    v, vcpu = _xfd_guest(variants, ncpus=2)
    _arm_in_the_guest_then_fault(v, vcpu)
    late = bool(variants)
    # The kernel's order syncs fps->xfd before handle_nm_fault_irqoff(), which saves
    # XFD_ERR and clears the MSR; v3's order tests the stale fps->xfd = 0 and saves nothing.
    assert vcpu.arch.guest_fpu.xfd_err == (0 if late else XTILE_DATA)
    assert v.m.cpus[0].regs.xfd_err == (XTILE_DATA if late else 0)
    v.m.idle(0)
    v.m.run(1, v.task)
    r = v.run(vcpu, [GuestOp("rdmsr", x86.MSR_IA32_XFD_ERR)])
    assert r.results == ((0 if late else XTILE_DATA),)


def test_an_interrupt_while_kvm_handles_an_exit_saves_the_guest_and_reentry_reloads() -> None:
    # handle_exit() runs with interrupts on: the handler's kernel_fpu_begin() saves the guest's
    # registers into the guest fpstate and sets TIF_NEED_FPU_LOAD; vcpu_enter_guest() reloads
    # them before the guest runs on, so the guest reads its own AVX after the interrupt.
    v, vcpu = _xfd_guest()
    c = v.m.cpus[v.nr]
    c.irq_in_lock, c.irq_in_lock_site = 1 << 2, "handle_exit"
    value = bytes(range(256))  # YMM_Hi128: 16 x 16 bytes
    r = v.run(vcpu, [GuestOp("write", 2, data=value), GuestOp("rdmsr", x86.MSR_IA32_XSS),
                     GuestOp("read", 2)])
    assert c.irq_in_lock == 0 and c.irq_in_lock_used is True
    assert r.results[2] == value
    assert not v.task.need_fpu_load


@pytest.mark.parametrize("variants", [(), ("hardirq-fpu-in-fpregs-lock",)])
def test_an_interrupt_inside_fpu_update_guest_xfd(variants) -> None:
    # The first nonzero guest WRMSR IA32_XFD is emulated: fpu_update_guest_xfd() sets fps->xfd
    # and then the MSR, under fpregs_lock(). Since v5.18 an interrupt between the two takes
    # its scalar path, and the guest reads its own AVX after the re-entry. v5.17 let it take
    # the FPU: its kernel_fpu_begin() XSAVES the guest fpstate, current's, while IA32_XFD
    # still has the old value -- xfd_validate_state() WARNs (and the reload would XRSTORS
    # tile data the image holds with XFD armed: #NM in the kernel).
    v, vcpu = _xfd_guest(kernel_variants=variants)
    c = v.m.cpus[v.nr]
    c.irq_in_lock, c.irq_in_lock_site = 1 << 2, "fpu_update_guest_xfd"
    value = bytes(range(256))
    ops = [GuestOp("write", 2, data=value), GuestOp("wrmsr", x86.MSR_IA32_XFD, XTILE_DATA),
           GuestOp("read", 2)]
    if variants:
        with pytest.raises(KernelBug, match="IA32_XFD 0x0 differs from current's fpstate "
                                            "xfd 0x40000"):
            v.run(vcpu, ops)
        assert c.irq_in_lock == 0
        return
    r = v.run(vcpu, ops)
    assert c.irq_in_lock == 0 and c.irq_in_lock_used is False
    assert r.results[2] == value and c.regs.xfd == XTILE_DATA


# -- KVM_RUN preempted while KVM handles an exit -------------------------------------------------


def _preempted_at_exit(v: Vmm, vcpu, ops, move: bool = True):
    """KVM_RUN of ``ops`` stopped at its first intercepted exit's preemption point, the
    thread switched out and run again on CPU 1 (``move``) or 0; the run's result."""
    from fpstate.kvm.x86.vcpu import kvm_arch_vcpu_ioctl_run

    m = v.m
    m.enter_kernel(0)
    m.start(0, kvm_arch_vcpu_ioctl_run, vcpu, tuple(ops), "exit")
    assert v.task.kpath is not None  # stopped inside the program
    m.idle(0)
    nr = 1 if move else 0
    m.run(nr, v.task)
    result = m.finish(nr)
    m.exit_to_user_mode(nr)
    return result


def test_a_run_preempted_at_an_exit_goes_on_with_the_guests_registers_on_another_cpu() -> None:
    v, vcpu = _xfd_guest(ncpus=2)
    value = bytes(range(256))
    r = _preempted_at_exit(v, vcpu, [GuestOp("write", 2, data=value), GuestOp(
        "xsetbv", 0, 0x602E7), GuestOp("read", 2)])
    assert r.results == (None, None, value)
    assert vcpu.last_vmentry_cpu == 1


@pytest.mark.parametrize("variants", [(), ("guest-xfd-keeps-xstate-bv",)])
def test_preempted_before_fpu_update_guest_xfd(variants) -> None:
    # b45f72177594's "similar scenarios involving preemption on preemptible kernels": the
    # context switch saved XSTATE_BV[18] = 1 under XFD 0; arming XFD must clear it first.
    # The fix is applied by name (6.18 as released runs the variant's code).
    v, vcpu = _xfd_guest(ncpus=2, kernel_variants=variants,
                         fixes={"guest_xfd_clears_xstate_bv"})
    v.run(vcpu, [GuestOp("write", 18)])
    if variants:
        with pytest.raises(KernelBug, match="XSTATE_BV loads"):
            _preempted_at_exit(v, vcpu, [GuestOp("wrmsr", x86.MSR_IA32_XFD, XTILE_DATA)])
        return
    r = _preempted_at_exit(v, vcpu, [GuestOp("wrmsr", x86.MSR_IA32_XFD, XTILE_DATA)])
    assert r.results == (None,)
    fps = vcpu.arch.guest_fpu.fpstate
    assert fps.xfd == XTILE_DATA and not fps.xstate_bv & XTILE_DATA


@pytest.mark.parametrize("variants", [(), ("nm-xfd-err-read-irqs-on",)])
def test_xfd_err_is_saved_before_the_exit_can_be_preempted(variants) -> None:
    v, vcpu = _xfd_guest(variants, ncpus=2)
    v.run(vcpu, [GuestOp("wrmsr", x86.MSR_IA32_XFD, XTILE_DATA)])
    r = _preempted_at_exit(v, vcpu, [GuestOp("write", 18),
                                     GuestOp("rdmsr", x86.MSR_IA32_XFD_ERR)])
    assert r.results[0].vector == "#NM"
    # Read with interrupts on, after the move, the MSR is CPU 1's 0.
    assert r.results[1] == (0 if variants else XTILE_DATA)


def test_linux_6_18_as_released_stores_an_armed_component_from_kvm_set_xsave() -> None:
    """KVM_SET_XSAVE of a buffer with XSTATE_BV[18] into a guest whose XFD arms it: 6.18 as
    released copies the bit and the next KVM_RUN's XRSTORS takes #NM in the host; with
    b45f72177594 (fix guest_xfd_clears_xstate_bv) KVM clears it first."""
    for fixes, stored in (((), True), ({"guest_xfd_clears_xstate_bv"}, False)):
        v, vcpu = _xfd_guest(fixes=fixes)
        v.run(vcpu, [GuestOp("write", 18), GuestOp("wrmsr", x86.MSR_IA32_XFD, XTILE_DATA)])
        buf = bytearray(v.get_xsave2(vcpu))
        assert not int.from_bytes(buf[512:520], "little") & XTILE_DATA  # saved as initial
        buf[512:520] = (int.from_bytes(buf[512:520], "little") | XTILE_DATA).to_bytes(8, "little")
        assert v.set_xsave(vcpu, bytes(buf)) == 0
        fps = vcpu.arch.guest_fpu.fpstate
        assert bool(fps.xstate_bv & XTILE_DATA) is stored
        if stored:
            with pytest.raises(KernelBug, match="unexpected-nm"):
                v.run(vcpu, [])
        else:
            assert v.run(vcpu, []).results == ()


def test_the_fix_refuses_an_armed_component_that_reaches_the_copy() -> None:
    # fpu_copy_uabi_to_guest_fpstate()'s WARN_ON_ONCE(xfeatures & xfd): KVM_SET_XSAVE clears
    # the bits before, so only a caller that skips that reaches it.
    from fpstate.kvm.x86.fpu_api import fpu_copy_uabi_to_guest_fpstate

    v, vcpu = _xfd_guest(fixes={"guest_xfd_clears_xstate_bv"})
    v.run(vcpu, [GuestOp("wrmsr", x86.MSR_IA32_XFD, XTILE_DATA)])
    buf = bytearray(v.get_xsave2(vcpu))
    buf[512:520] = (int.from_bytes(buf[512:520], "little") | XTILE_DATA).to_bytes(8, "little")
    with pytest.raises(KernelBug, match="xfd-armed-in-uabi-buffer"):
        fpu_copy_uabi_to_guest_fpstate(v.m.cpus[0], vcpu.arch.guest_fpu, bytes(buf),
                                       v.kvm.caps.supported_xcr0, [0])


# -- the #NM bit of the exception bitmap ---------------------------------------------------------


def test_a_host_initiated_nonzero_xfd_write_also_passes_xfd_writes_through() -> None:
    """vmx_set_msr() disables XFD write interception on any successful nonzero write, a
    VMM's KVM_SET_MSRS (a migration restoring XFD) included, and traps #NM from then on."""
    v, vcpu = _xfd_guest()
    assert v.set_msrs(vcpu, [(x86.MSR_IA32_XFD, 0)]) == 1  # KVM_SET_MSRS: the count set
    assert not vcpu.arch.xfd_no_write_intercept and not vcpu.arch.nm_intercepted
    assert v.set_msrs(vcpu, [(x86.MSR_IA32_XFD, XTILE_DATA)]) == 1
    assert vcpu.arch.xfd_no_write_intercept and vcpu.arch.nm_intercepted
    r = v.run(vcpu, [GuestOp("write", 18), GuestOp("rdmsr", x86.MSR_IA32_XFD_ERR)])
    assert r.results[0].vector == "#NM" and r.results[1] == XTILE_DATA
    assert vcpu.arch.guest_fpu.xfd_err == XTILE_DATA  # saved at the intercepted #NM


@pytest.mark.parametrize("variants", [(), ("nm-intercept-follows-xfd",)])
def test_the_nm_intercept_after_an_init_with_xfd_disarmed(variants) -> None:
    v, vcpu = _xfd_guest(variants)
    v.run(vcpu, [GuestOp("wrmsr", x86.MSR_IA32_XFD, XTILE_DATA),
                 GuestOp("wrmsr", x86.MSR_IA32_XFD, 0), GuestOp("init")])
    # kvm_vcpu_reset() brought the bitmap up to date while the guest's XFD was 0.
    assert vcpu.arch.nm_intercepted is not bool(variants)
    r = v.run(vcpu, [GuestOp("wrmsr", x86.MSR_IA32_XFD, XTILE_DATA), GuestOp("write", 18)])
    assert r.results[1].vector == "#NM"
    # Not trapped, the #NM leaves XFD_ERR in the CPU's MSR, which the host then keeps.
    assert vcpu.arch.guest_fpu.xfd_err == (0 if variants else XTILE_DATA)
    assert v.m.cpus[0].regs.xfd_err == (XTILE_DATA if variants else 0)


@pytest.mark.parametrize("fixes, stored", [
    ({"guest_xfd_clears_xstate_bv"}, True),  # b45f72177594 as merged
    ({"guest_xfd_clears_xstate_bv", "guest_xfd_host_write"}, False),
])
def test_a_vmms_xfd_write_outside_kvm_run_with_the_guests_tile_data(fixes, stored) -> None:
    """fpu_update_guest_xfd() from a VMM's KVM_SET_MSRS, outside KVM_RUN: current is the VMM
    thread, whose TIF_NEED_FPU_LOAD is clear -- its own registers are live -- while the guest
    fpstate, not swapped in, holds XSTATE_BV[18] = 1. The merged fix tests the flag alone and
    keeps the bit: the next KVM_RUN's XRSTORS takes #NM in the host. The proposed amendment
    tests !fpstate->in_use too."""
    v, vcpu = _xfd_guest(fixes=fixes)
    v.run(vcpu, [GuestOp("write", 18)])
    fps = vcpu.arch.guest_fpu.fpstate
    assert fps.xstate_bv & XTILE_DATA and not fps.in_use and not v.task.need_fpu_load
    assert v.set_msrs(vcpu, [(x86.MSR_IA32_XFD, XTILE_DATA)]) == 1
    assert bool(fps.xstate_bv & XTILE_DATA) is stored
    if stored:
        with pytest.raises(KernelBug, match="unexpected-nm"):
            v.run(vcpu, [])
    else:
        r = v.run(vcpu, [GuestOp("wrmsr", x86.MSR_IA32_XFD, 0), GuestOp("read", 18)])
        assert r.results[1] == bytes(8192)  # TILEDATA's initial configuration
