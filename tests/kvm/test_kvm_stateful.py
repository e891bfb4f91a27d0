"""A VMM driving the model of KVM in any order: hypothesis state machines over fpstate.kvm.x86.

Rules are what a VMM does (STYLE.md rule 13): create a VM and vCPUs, ARCH_REQ_XCOMP_GUEST_PERM
and ARCH_REQ_XCOMP_PERM (then use AMX tiles itself, seed 000), KVM_SET_CPUID2, KVM_SET_XCRS,
KVM_SET_XSAVE / KVM_GET_XSAVE2 / KVM_GET_XSAVE, KVM_RUN with a guest that writes components,
sets XCR0 and the XSAVE MSRs, and INIT. Each rule checks its own postcondition (the errno the
kernel's rules give, what a refusal leaves unchanged, what INIT keeps); the invariants are the
kernel's standing rules:

- guest_fpstate_covers_guest_features: the guest fpstate is at least the size its xfeatures
  need, holds every feature the guest may enable (guest_supported_xcr0), and uabi_size covers
  the standard format of its user features (fpu_enable_guest_xfd_features, seed 000);
- cet_kernel_only_in_guest_fpstates: no host fpstate (task, init_fpstate) carries CET_KERNEL,
  every guest fpstate does where the CPU has it (seed 001, guest_default_cfg);
- guest XCR0 within guest_supported_xcr0 | FP (__kvm_set_xcr), the guest FPU swapped out
  between ioctls, the guest permission locked once a vCPU exists, the VMM's own registers
  untouched by every ioctl (seed 000), and no violation or WARN recorded by the model.

Three configurations: Sapphire Rapids under VMX (AMX, XFD, PKRU, CET), Skylake-SP under VMX
(MPX: what INIT clears) and this machine's CPU (Zen 5) under the PVM vendor that the real
/dev/kvm here is.
"""

from __future__ import annotations

import struct
import traceback
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from fpstate.kernel.x86.types import FPU_GUEST_PERM_LOCKED, XFEATURE_MASK_GUEST_SUPERVISOR
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
    XSAVES,
    CpuidEntry2,
    kvm_check_cpuid_dynamic,
    supported_cpuid_leaf_0xd,
    xstate_required_size,
)
from fpstate.kvm.x86.fpu import host_fpstates_with_guest_only_state
from fpstate.kvm.x86.vcpu import GuestOp, KvmVcpu, model_vmm
from fpstate.x86.layout import compacted_size, standard_size
from fpstate.x86.profiles import load_profile
from fpstate.x86.xfeatures import XFEATURE_MASK_FPSSE, XFEATURE_MASK_PKRU, bits

XTILE_DATA = 18
FP_SSE_YMM = 0x7
#: XCR0 values a VMM or a guest may try: valid ones of the three CPUs, and each XCR0 rule broken.
XCR0S = (0x1, 0x3, 0x7, 0x1F, 0xE7, 0xFF, 0x207, 0x2E7, 0x602E7, 0x202E7, 0x402E7,
         0x0, 0x2, 0x5, 0x67, 0xC7, 0x9, 0x1E7, 0x800, 1 << 63)
#: guest ops: (kind, number, value)
GUEST_WRITES = (1, 2, 3, 5, 6, 7, 9, 17, 18)
MSR_WRITES = ((x86.MSR_IA32_XFD, 0), (x86.MSR_IA32_XFD, 1 << 18), (x86.MSR_IA32_XFD_ERR, 0),
              (x86.MSR_IA32_XSS, 0), (x86.MSR_IA32_XSS, 0x800), (x86.MSR_IA32_XSS, 0x1800),
              (x86.MSR_IA32_U_CET, 0x1), (x86.MSR_IA32_PL0_SSP, 0x1000))
LEAF7_CET = CpuidEntry2(7, 0, 1, 0, 0, 1 << 7, 1 << 20)  # SHSTK (ECX[7]) and IBT (EDX[20])


def _with_d(entries: tuple, index: int, **regs: int) -> tuple:
    return tuple(replace(e, **regs) if (e.function, e.index) == (0xD, index) else e
                 for e in entries)


class VmmModel(RuleBasedStateMachine):
    """One VMM process on a booted kernel model with KVM loaded (the subclasses pick the CPU
    and the vendor module)."""

    PROFILE = "zen5"
    VENDOR = "pvm"
    VARIANTS: tuple[str, ...] = ()

    @initialize(perm_first=st.booleans())
    def boot(self, perm_first: bool) -> None:
        """The VMM process, its own AVX state, one VM with one vCPU (``perm_first``: after
        asking for guest AMX permission, as QEMU does)."""
        self.profile = load_profile(self.PROFILE)
        self.v = model_vmm(self.profile, vendor=self.VENDOR, variants=self.VARIANTS)
        self.system = self.v.m.system
        self.caps = self.v.kvm.caps
        self.vms: list = []
        self.vcpus: list[KvmVcpu] = []
        self.permitted = False  # guest permission for XTILE_DATA granted
        if perm_first:
            self.request_guest_perm(XTILE_DATA)
        # The VMM's own state, which no KVM ioctl may change (seed 000).
        assert self.v.m.user_write(self.v.nr, 2) is None
        self.vmm_state = {2: self.v.m.user_read(self.v.nr, 2)}
        full = supported_cpuid_leaf_0xd(self.caps, self.profile, (1 << 64) - 1)
        self.create_vm()
        self.vcpus.append(self.v.create_vcpu(self.vms[0], 0))
        self.v.set_cr4(self.vcpus[0], osxsave=True)
        self.tables = {
            "supported": full,
            "supported+cet": (*full, LEAF7_CET),
            "fp-sse-avx": _with_d(full, 0, eax=FP_SSE_YMM, edx=0),
            "fp-sse": _with_d(full, 0, eax=0x3, edx=0),
            "no-xsaves": _with_d(full, 1, eax=full[1].eax & ~XSAVES if len(full) > 1 else 0),
            "claims-amx": _with_d(full, 0, eax=full[0].eax | 0x60000),
            "claims-pkru-mpx": _with_d(full, 0, eax=full[0].eax | 0x218),
        }

    # -- helpers --

    def _get(self, vcpu: KvmVcpu) -> bytes:
        out = self.v.get_xsave2(vcpu)
        assert len(out) == vcpu.arch.guest_fpu.uabi_size
        return out

    def _vcpu(self, data: st.DataObject) -> KvmVcpu:
        return self.vcpus[data.draw(st.integers(0, len(self.vcpus) - 1), label="vcpu")]

    def _locked(self) -> bool:
        return bool(self.v.task.fpu.guest_perm.state_perm & FPU_GUEST_PERM_LOCKED)

    # -- rules --

    @precondition(lambda self: len(self.vms) < 2)
    @rule()
    def create_vm(self) -> None:
        self.vms.append(self.v.create_vm())

    @precondition(lambda self: self.vms and len(self.vcpus) < 3)
    @rule(data=st.data(), osxsave=st.booleans())
    def create_vcpu(self, data: st.DataObject, osxsave: bool) -> None:
        vm = self.vms[data.draw(st.integers(0, len(self.vms) - 1), label="vm")]
        vcpu = self.v.create_vcpu(vm, len(vm.vcpus))
        self.v.set_cr4(vcpu, osxsave=osxsave)
        fps = vcpu.arch.guest_fpu.fpstate
        assert fps.is_guest and fps.xstate_bv == 0 and vcpu.arch.xcr0 == 1  # RESET
        self.vcpus.append(vcpu)

    @rule(xfeature=st.sampled_from((XTILE_DATA, 17, 2)))
    def request_guest_perm(self, xfeature: int) -> None:
        """ARCH_REQ_XCOMP_GUEST_PERM: EOPNOTSUPP for a feature outside xstate_prctl_req[]
        (only XTILE_DATA here) or one the host lacks, 0 once granted, EBUSY for a new grant
        after the first vCPU locked the permission."""
        had = self.permitted
        locked = self._locked()
        ret = self.v.arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, xfeature)
        if xfeature != XTILE_DATA or not self.system.user.max_features >> xfeature & 1:
            assert ret == -EOPNOTSUPP
        else:
            assert ret == (-EBUSY if locked and not had else 0)
            self.permitted = ret == 0

    @precondition(lambda self: not hasattr(self, "tiles"))
    @rule()
    def vmm_uses_amx(self) -> None:
        """Seed 000: the VMM thread takes AMX permission and uses tiles; its fpstate grows."""
        ret = self.v.arch_prctl(ARCH_REQ_XCOMP_PERM, XTILE_DATA)
        if not self.system.user.max_features >> XTILE_DATA & 1:
            assert ret == -EOPNOTSUPP
            self.tiles = None
            return
        assert ret == 0
        self.v.m.user_write(self.v.nr, XTILE_DATA)  # first use: XFD #NM, reallocation
        assert self.v.task.fpu.fpstate.xfeatures >> XTILE_DATA & 1
        self.tiles = self.v.m.user_read(self.v.nr, XTILE_DATA)
        self.vmm_state[XTILE_DATA] = self.tiles

    @precondition(lambda self: self.vcpus)
    @rule(data=st.data(), name=st.sampled_from(("supported", "supported+cet", "fp-sse-avx",
                                                "fp-sse", "no-xsaves", "claims-amx",
                                                "claims-pkru-mpx")))
    def set_cpuid2(self, data: st.DataObject, name: str) -> None:
        vcpu = self._vcpu(data)
        table = self.tables[name]
        before = (vcpu.arch.cpuid, vcpu.arch.guest_supported_xcr0, vcpu.arch.guest_fpu.fpstate)
        ret = self.v.set_cpuid2(vcpu, table)
        if vcpu.last_vmentry_cpu != -1:
            assert ret == (0 if table == before[0] else -EINVAL)
        elif kvm_check_cpuid_dynamic(table) & ~vcpu.arch.guest_fpu.xfeatures:
            assert ret == (0 if self.permitted else -EPERM)
        else:
            assert ret == 0
        if ret:
            assert (vcpu.arch.cpuid, vcpu.arch.guest_supported_xcr0,
                    vcpu.arch.guest_fpu.fpstate) == before  # a refusal changes nothing

    @precondition(lambda self: self.vcpus)
    @rule(data=st.data(), xcr0=st.sampled_from(XCR0S))
    def set_xcrs(self, data: st.DataObject, xcr0: int) -> None:
        vcpu = self._vcpu(data)
        old = vcpu.arch.xcr0
        ret = self.v.set_xcrs(vcpu, [(0, xcr0)])
        assert ret in (0, -EINVAL)
        if xcr0 & ~(vcpu.arch.guest_supported_xcr0 | 1) or not xcr0 & 1:
            assert ret == -EINVAL  # __kvm_set_xcr: outside guest_supported_xcr0, or no x87
        assert self.v.get_xcrs(vcpu) == {0: xcr0 if ret == 0 else old}

    @precondition(lambda self: self.vcpus)
    @rule(data=st.data(),
          xstate_bv=st.sampled_from((0, 0x2, 0x3, 0x7, 0xE7, 0x1F, 0x203, 0x60003, 0x20003,
                                     0x803, 1 << 63 | 3)),
          fault=st.sampled_from((None, None, "xcomp_bv", "reserved", "mxcsr")),
          fill=st.integers(0, 255))
    def set_xsave(self, data: st.DataObject, xstate_bv: int, fault: str | None,
                  fill: int) -> None:
        """KVM_SET_XSAVE of the current buffer with every component filled with ``fill`` and
        one header field chosen; then KVM_GET_XSAVE2. Refused (-EINVAL) exactly by the
        kernel's rules, and then nothing changed; accepted: every component the header names
        and the guest may see reads back as written."""
        vcpu = self._vcpu(data)
        before = self._get(vcpu)
        buf = bytearray(before)
        buf[160:416] = bytes([fill]) * 256
        buf[576:] = bytes([fill]) * (len(buf) - 576)
        struct.pack_into("<QQ", buf, 512, xstate_bv, 0)
        mxcsr = 0x1F80
        if fault == "xcomp_bv":
            struct.pack_into("<Q", buf, 520, 1 << 63 | xstate_bv)
        elif fault == "reserved":
            buf[540] = 1
        elif fault == "mxcsr":
            mxcsr = 1 << 31
        struct.pack_into("<I", buf, 24, mxcsr)
        fps = vcpu.arch.guest_fpu.fpstate
        refused = bool(
            xstate_bv & ~self.caps.supported_xcr0 or xstate_bv & ~fps.user_xfeatures
            or fault in ("xcomp_bv", "reserved")
            or (fault == "mxcsr" and xstate_bv & FP_SSE_YMM))
        ret = self.v.set_xsave(vcpu, bytes(buf))
        assert ret == (-EINVAL if refused else 0), (hex(xstate_bv), fault)
        after = self._get(vcpu)
        if refused:
            assert after == before
            return
        visible = xstate_bv & (vcpu.arch.guest_supported_xcr0 | XFEATURE_MASK_FPSSE)
        for i in bits(visible & ~0x3):
            c = self.profile.component(i)
            size = 4 if 1 << i == XFEATURE_MASK_PKRU else c.size  # PKRU: a u32 + padding
            assert after[c.offset:c.offset + size] == buf[c.offset:c.offset + size], i
        if visible & 0x2:
            assert after[160:416] == buf[160:416]

    @precondition(lambda self: self.vcpus)
    @rule(data=st.data())
    def get_xsave(self, data: st.DataObject) -> None:
        """KVM_GET_XSAVE: the first 4096 bytes of KVM_GET_XSAVE2 while uabi_size is 4096,
        -EINVAL once a dynamic feature made it larger."""
        vcpu = self._vcpu(data)
        legacy = self.v.get_xsave(vcpu)
        if vcpu.arch.guest_fpu.uabi_size > 4096:
            assert legacy == -EINVAL
        else:
            assert legacy == self._get(vcpu)
        header = struct.unpack_from("<QQ", self._get(vcpu), 512)
        assert header[0] & ~(vcpu.arch.guest_supported_xcr0 | XFEATURE_MASK_FPSSE) == 0
        assert header[1] == 0

    @precondition(lambda self: self.vcpus)
    @rule(data=st.data(), ops=st.lists(st.one_of(
        st.builds(lambda i: GuestOp("write", i), st.sampled_from(GUEST_WRITES)),
        st.builds(lambda x, cpl: GuestOp("xsetbv", 0, x, cpl=cpl), st.sampled_from(XCR0S),
                  st.sampled_from((0, 0, 3))),
        st.builds(lambda m: GuestOp("wrmsr", m[0], m[1]), st.sampled_from(MSR_WRITES)),
        st.builds(lambda m: GuestOp("rdmsr", m), st.sampled_from(
            (x86.MSR_IA32_XFD, x86.MSR_IA32_XFD_ERR, x86.MSR_IA32_XSS))),
        st.builds(lambda m: GuestOp("release", 0, m), st.sampled_from((0x4, 0x60000, 0xE0))),
        st.just(GuestOp("init"))), max_size=4))
    def kvm_run(self, data: st.DataObject, ops: list[GuestOp]) -> None:
        vcpu = self._vcpu(data)
        r = self.v.run(vcpu, ops)
        assert r.overflow is None
        assert len(r.results) == len(ops)
        for op, res in zip(ops, r.results, strict=True):
            if op.kind == "xsetbv" and op.cpl == 3:
                assert res is not None and res.vector in ("#GP", "#UD")

    @precondition(lambda self: self.vcpus)
    @rule(data=st.data())
    def init(self, data: st.DataObject) -> None:
        """INIT zeroes exactly the MPX and CET components KVM supports (seed 003); XCR0 and
        every other byte of KVM_GET_XSAVE2 survive (the header keeps its bits: memset only)."""
        vcpu = self._vcpu(data)
        before, xcr0 = self._get(vcpu), vcpu.arch.xcr0
        cleared = self.v.init(vcpu)
        assert cleared == ((self.caps.supported_xcr0 | self.caps.supported_xss)
                           & x86.XSTATE_CLEAR_ON_INIT)
        after = self._get(vcpu)
        assert vcpu.arch.xcr0 == xcr0
        keep = bytearray(after)
        for i in bits(cleared & vcpu.arch.guest_supported_xcr0):
            c = self.profile.component(i)
            assert after[c.offset:c.offset + c.size] == bytes(c.size)
            keep[c.offset:c.offset + c.size] = before[c.offset:c.offset + c.size]
        assert bytes(keep) == before

    # -- invariants --

    @invariant()
    def guest_fpstate_covers_guest_features(self) -> None:
        for vcpu in getattr(self, "vcpus", ()):
            gfpu = vcpu.arch.guest_fpu
            fps = gfpu.fpstate
            assert not fps.freed and fps.is_guest and not fps.in_use
            size = (compacted_size if self.system.xcompacted else standard_size)
            need = size(self.profile, fps.xfeatures if self.system.xcompacted
                        else fps.xfeatures & ~XFEATURE_MASK_GUEST_SUPERVISOR)
            assert fps.size >= need, (fps, need)
            assert gfpu.xfeatures & ~fps.xfeatures == 0
            assert vcpu.arch.guest_supported_xcr0 & ~fps.xfeatures == 0
            assert gfpu.uabi_size >= max(4096, xstate_required_size(
                self.caps, fps.user_xfeatures & self.caps.supported_xcr0, False))

    @invariant()
    def cet_kernel_only_in_guest_fpstates(self) -> None:
        if not hasattr(self, "v"):
            return
        assert host_fpstates_with_guest_only_state(self.v.m) == []
        guest_only = self.system.guest.features & XFEATURE_MASK_GUEST_SUPERVISOR
        for vcpu in self.vcpus:
            assert vcpu.arch.guest_fpu.fpstate.xfeatures & guest_only == guest_only

    @invariant()
    def guest_xcr0_is_one_kvm_allows(self) -> None:
        """x87 always, and only what KVM supports. (Not necessarily within the current
        guest_supported_xcr0: a KVM_SET_CPUID2 that narrows leaf 0xD before the first run does
        not revisit an XCR0 accepted under the old table -- kvm_set_cpuid() has no such check.)"""
        for vcpu in getattr(self, "vcpus", ()):
            xcr0 = vcpu.arch.xcr0
            assert xcr0 & 1 and xcr0 & ~(self.caps.supported_xcr0 | 1) == 0

    @invariant()
    def the_vmm_keeps_its_own_state(self) -> None:
        if not hasattr(self, "v"):
            return
        fpu = self.v.task.fpu
        assert fpu.task_fpstate is None and not fpu.fpstate.is_guest
        for i, value in self.vmm_state.items():
            assert self.v.m.user_read(self.v.nr, i) == value, i
        if self.vcpus:
            assert self._locked()

    @invariant()
    def no_violation_or_warning(self) -> None:
        if hasattr(self, "v"):
            assert self.v.kvm.violations == [] and self.v.kvm.warnings == []


class SapphireRapidsVmx(VmmModel):
    PROFILE, VENDOR = "sapphire-rapids", "vmx"


class SkylakeVmx(VmmModel):
    PROFILE, VENDOR = "skylake-sp", "vmx"


class Zen5Pvm(VmmModel):
    PROFILE, VENDOR = "zen5", "pvm"


@pytest.mark.parametrize(("profile", "vendor", "variant", "rule"), [
    ("sapphire-rapids", "vmx", "kvm-save-min-size", "kvm_run"),
    ("sapphire-rapids", "vmx", "init-keeps-cet", "init"),
    ("zen5", "svm", "guest-only-in-host-fpstate", "cet_kernel_only_in_guest_fpstates"),
])
def test_each_rejected_design_breaks_the_machine(profile: str, vendor: str, variant: str,
                                                 rule: str) -> None:
    """The same machine under each rejected design of the seeds fails, and in the rule or
    invariant that design breaks (so the machine can fail, and fails for the right reason)."""
    machine = type(f"{variant}-machine", (VmmModel,),
                   {"PROFILE": profile, "VENDOR": vendor, "VARIANTS": (variant,)})
    with pytest.raises(AssertionError) as e:
        run_state_machine_as_test(machine, settings=settings(
            max_examples=200, stateful_step_count=20, deadline=None, database=None,
            phases=[Phase.generate], suppress_health_check=list(HealthCheck)))
    assert any(f.name == rule for f in traceback.extract_tb(e.value.__traceback__)), \
        traceback.format_tb(e.value.__traceback__)[-2:]


_SETTINGS = settings(max_examples=60, stateful_step_count=25, deadline=None)
SapphireRapidsVmx.TestCase.settings = _SETTINGS
SkylakeVmx.TestCase.settings = _SETTINGS
Zen5Pvm.TestCase.settings = _SETTINGS
test_vmm_on_sapphire_rapids_vmx = SapphireRapidsVmx.TestCase
test_vmm_on_skylake_vmx = SkylakeVmx.TestCase
test_vmm_on_zen5_pvm = Zen5Pvm.TestCase
