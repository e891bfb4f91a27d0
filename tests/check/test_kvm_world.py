"""The checker's KVM world (fpstate.check.actions_kvm): its bookkeeping of what each guest
should see, with several VMMs at once."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fpstate.check.scenario import make_world
from fpstate.check.world import Action

A = Action.of
TWO_VMS = {"cpus": 2, "processes": {"p0": 1, "p1": 1},
           "vms": {"vm0": {"vmm": "p1.t0", "vcpus": 1}, "vm1": {"vmm": "p0.t0", "vcpus": 1}}}


def _set_xsave_dropping_avx(monkeypatch) -> None:
    """KVM_SET_XSAVE from now on cuts AVX from the XSTATE_BV of the buffer it copies (a broken
    restore, or a VMM that forgot the bit): the guest's AVX value is lost."""
    from fpstate.kvm.x86 import x86 as kx86

    real = kx86.kvm_arch_vcpu_ioctl_set_xsave

    def drops_avx(c, vcpu, buf):
        cut = bytearray(buf)
        cut[512:520] = (int.from_bytes(cut[512:520], "little") & ~0x4).to_bytes(8, "little")
        return real(c, vcpu, bytes(cut))

    monkeypatch.setattr(kx86, "kvm_arch_vcpu_ioctl_set_xsave", drops_avx)


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
        A("kvm_finish", task="p1.t0"), A("kvm_finish", task="p1.t0", irq=True)]
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
    w = _guest_mxcsr_world()
    w.step(A("kvm_run", task="vmm.t0", vcpu="vm0.v0", guest="write avx"))
    _set_xsave_dropping_avx(monkeypatch)
    r = w.step(A("set_xsave", task="vmm.t0", vcpu="vm0.v0"))
    assert {v.invariant for v in r.violations} == {"no-lost-write"}
    assert "avx" in str(r.violations[0]).lower()


# -- KVM_GET/SET_XSAVE between vCPUs offered different features (migrate_xsave) --------------

#: One VMM with two VMs: "big" offered every supported feature, "small" a CPU model with x87,
#: SSE and AVX only (its CPUID.(0DH,0) cut to them, as QEMU's -cpu of an older CPU does).
MIGRATION = {"cpu": "sapphire-rapids", "cpus": 1, "processes": {"vmm": 1},
             "vms": {"big": {"vmm": "vmm.t0", "vcpus": 1},
                     "small": {"vmm": "vmm.t0", "vcpus": 1, "xcr0": "x87|sse|avx"}}}


def _migration_world(variant: str | None = None):
    w = make_world("x86", MIGRATION, variant)
    w.step(A("run", task="vmm.t0", cpu=0))
    return w


def test_a_vms_xcr0_cuts_the_guest_cpuid_and_its_actions() -> None:
    """``xcr0`` cuts CPUID.(0DH,0) before KVM_SET_CPUID2: KVM derives guest_supported_xcr0
    0x7 from it (0x2e7 for the other VM on Sapphire Rapids: x87, SSE, AVX, AVX-512, PKRU), the
    guest's XSETBV takes that, and the explorer offers the small guest no opmask write."""
    w = _migration_world()
    assert w.vcpus["small.v0"].arch.guest_supported_xcr0 == 0x7
    assert w.vcpus["big.v0"].arch.guest_supported_xcr0 == 0x2E7
    runs = {a.get("guest") for a in w.enabled_actions()
            if a.name == "kvm_run" and a.get("vcpu") == "small.v0"}
    assert "write avx" in runs and "write opmask" not in runs and "xsetbv; write pkru" not in runs
    r = w.step(A("kvm_run", task="vmm.t0", vcpu="small.v0", guest="xsetbv; write avx"))
    assert not r.violations and w.vcpus["small.v0"].arch.xcr0 == 0x7


def test_a_bad_xcr0_in_the_configuration_is_named() -> None:
    import pytest

    from fpstate.check.world import ScenarioError

    for bad, words in (("x87|ymm", "'ymm' is neither a number nor a component name"),
                       (True, "a mask (an int, or names"), (-1, "not a 64-bit mask")):
        cfg = {**MIGRATION, "vms": {"small": {"vmm": "vmm.t0", "xcr0": bad}}}
        with pytest.raises(ScenarioError, match=r"config\.vms\.small\.xcr0") as e:
            make_world("x86", cfg, None)
        assert words in str(e.value)


def test_migrate_xsave_carries_what_the_destination_can_use() -> None:
    """big -> small: KVM_GET_XSAVE2 of big holds AVX and opmask (XSTATE_BV 0x224 with the
    host PKRU saved into the guest fpstate); KVM_SET_XSAVE checks only kvm_caps.supported_xcr0,
    so small takes it (0) and its guest sees big's AVX. small -> big: the buffer has no opmask
    (masked with small's guest_supported_xcr0), so big's opmask returns to its initial
    configuration -- what a guest migrated from a smaller CPU model must see."""
    w = _migration_world()
    for prog, vcpu in (("write avx; write opmask", "big.v0"), ("write avx", "small.v0")):
        assert not w.step(A("kvm_run", task="vmm.t0", vcpu=vcpu, guest=prog)).violations
    assert w.do_observe_vcpu("big.v0")["opmask"] == "big.v0#2"
    r = w.step(A("migrate_xsave", task="vmm.t0", vcpu="small.v0", src="big.v0"))
    assert not r.violations and r.observed == {"ret": 0, "xstate_bv": 0x224}
    seen = w.do_observe_vcpu("small.v0")
    assert seen["avx"] == "big.v0#1" and "opmask" not in seen
    r = w.step(A("migrate_xsave", task="vmm.t0", vcpu="big.v0", src="small.v0"))
    assert not r.violations and r.observed["ret"] == 0
    assert not r.observed["xstate_bv"] & 0x20
    seen = w.do_observe_vcpu("big.v0")
    assert seen["avx"] == "big.v0#1" and seen["opmask"] == "init"
    # Both guests run on from what they were given.
    r = w.step(A("kvm_run", task="vmm.t0", vcpu="small.v0", guest="read avx"))
    assert not r.violations


def test_migrate_xsave_without_pkru_in_the_buffer_keeps_the_destinations_pkru() -> None:
    """KVM's ABI (fpu_copy_uabi_to_guest_fpstate: a NULL PKRU pointer when the header lacks
    PKRU): a never-run vCPU's buffer (XSTATE_BV 0) restored into a vCPU whose guest wrote PKRU
    leaves that PKRU; every other component goes to its initial configuration."""
    cfg = {**MIGRATION, "vms": {"a": {"vmm": "vmm.t0", "vcpus": 2}}}
    w = make_world("x86", cfg, None)
    w.step(A("run", task="vmm.t0", cpu=0))
    assert not w.step(A("kvm_run", task="vmm.t0", vcpu="a.v1",
                        guest="xsetbv; write pkru; write avx")).violations
    r = w.step(A("migrate_xsave", task="vmm.t0", vcpu="a.v1", src="a.v0"))
    assert not r.violations and r.observed == {"ret": 0, "xstate_bv": 0}
    seen = w.do_observe_vcpu("a.v1")
    assert seen["pkru"] == "a.v1#1" and seen["avx"] == "init"


def test_migrate_xsave_refuses_itself_and_foreign_vms() -> None:
    import pytest

    from fpstate.check.world import StepError

    w = _migration_world()
    with pytest.raises(StepError, match="src must be another vCPU"):
        w.step(A("migrate_xsave", task="vmm.t0", vcpu="big.v0", src="big.v0"))
    two = make_world("x86", TWO_VMS, None)
    two.step(A("run", task="p1.t0", cpu=0))
    r = two.step(A("migrate_xsave", task="p1.t0", vcpu="vm0.v0", src="vm1.v0"))
    assert r.observed == {"ret": -5, "errno": "EIO"}  # vm1 belongs to p0's mm
    assert not [a for a in two.enabled_actions() if a.name == "migrate_xsave"]


def test_a_migration_that_drops_a_component_is_a_lost_write(monkeypatch) -> None:
    """A KVM_SET_XSAVE that cut AVX from the header it copies loses the source guest's AVX
    value in the destination: no-lost-write names it."""
    w = _migration_world()
    w.step(A("kvm_run", task="vmm.t0", vcpu="big.v0", guest="write avx"))
    _set_xsave_dropping_avx(monkeypatch)
    r = w.step(A("migrate_xsave", task="vmm.t0", vcpu="small.v0", src="big.v0"))
    assert {v.invariant for v in r.violations} == {"no-lost-write"}
    assert "guest small.v0 would see avx = init (expected big.v0#1" in str(r.violations[0])


def test_get_xsave_unmasked_shows_pkru_and_carries_foreign_state() -> None:
    """Variant get-xsave-unmasked (KVM from v5.16 until ad856280ddea): a guest whose CPU model
    lacks PKRU gets PKRU in its KVM_GET_XSAVE2 header (the host's PKRU was saved into its
    fpstate) -- what made a destination without PKRU refuse the migration; and opmask a
    migration put in the small guest's fpstate goes back to the big one, over its own."""
    w = _migration_world("get-xsave-unmasked")
    w.step(A("kvm_run", task="vmm.t0", vcpu="small.v0", guest="write avx"))
    r = w.step(A("get_xsave", task="vmm.t0", vcpu="small.v0"))
    assert r.observed["xstate_bv"] == 0x204
    assert [v.invariant for v in r.violations] == ["nothing-beyond-advertised"]
    assert "XSTATE_BV 0x204 shows pkru beyond the guest's CPUID" in str(r.violations[0])
    w = _migration_world("get-xsave-unmasked")
    w.step(A("kvm_run", task="vmm.t0", vcpu="big.v0", guest="write opmask"))
    w.step(A("migrate_xsave", task="vmm.t0", vcpu="small.v0", src="big.v0"))
    w.step(A("kvm_run", task="vmm.t0", vcpu="big.v0", guest="write opmask"))
    r = w.step(A("migrate_xsave", task="vmm.t0", vcpu="big.v0", src="small.v0"))
    assert {v.invariant for v in r.violations} == {"nothing-beyond-advertised", "no-lost-write"}
    assert w.do_observe_vcpu("big.v0")["opmask"] == "big.v0#1"


def test_migrate_xsave_of_an_empty_header_keeps_mxcsr_on_a_standard_format_kernel() -> None:
    """Found by the explorer on Haswell (3 steps): a never-run vCPU's buffer (XSTATE_BV 0,
    MXCSR 1F80H in the buffer) restored into a vCPU whose guest ran LDMXCSR. copy_uabi_to_xstate
    copies MXCSR only with x87, SSE or AVX in the header, so the image keeps the guest's
    MXCSR; a standard-format XRSTOR (Haswell: no XSAVES) loads MXCSR from the image whatever
    XSTATE_BV says, and the guest runs on with its old MXCSR, while a compacted XRSTORS
    (Sapphire Rapids) puts 1F80H. The world's contract holds the kernel's rule. KVM_GET_XSAVE2
    then shows 1F80H on both (copy_feature: init_fpstate's MXCSR without SSE or YMM in the
    header): on Haswell not what the guest runs with, a rule of the kernel that
    regset-view-shows-the-task states (a 12 s campaign cell on Haswell found it once that
    invariant read KVM_GET_XSAVE2 views)."""
    seen = {}
    for cpu in ("haswell", "sapphire-rapids"):
        cfg = {**MIGRATION, "cpu": cpu, "vms": {"a": {"vmm": "vmm.t0", "vcpus": 2}}}
        w = make_world("x86", cfg, None)
        w.step(A("run", task="vmm.t0", cpu=0))
        assert not w.step(A("kvm_run", task="vmm.t0", vcpu="a.v1", guest="ldmxcsr")).violations
        r = w.step(A("migrate_xsave", task="vmm.t0", vcpu="a.v1", src="a.v0"))
        assert not r.violations and r.observed == {"ret": 0, "xstate_bv": 0}
        seen[cpu] = w.do_observe_vcpu("a.v1")["mxcsr"]
        r = w.step(A("get_xsave", task="vmm.t0", vcpu="a.v1"))
        assert not r.violations and r.observed["xstate_bv"] == 0, r
    assert seen == {"haswell": 0x3F00, "sapphire-rapids": 0x1F80}


def test_migrate_xsave_of_an_empty_header_under_the_mxcsr_fix() -> None:
    """The same migration with the proposed fix mxcsr_by_format: the buffer's MXCSR (the
    never-run vCPU's 1F80H) is stored whatever the header says, so both formats give the
    guest 1F80H, and KVM_GET_XSAVE2 shows what it runs with (campaign x86-kernels found the
    contract still stating the unfixed rule, Haswell with two vCPUs)."""
    for cpu in ("haswell", "sapphire-rapids"):
        cfg = {**MIGRATION, "cpu": cpu, "vms": {"a": {"vmm": "vmm.t0", "vcpus": 2}},
               "fixes": ["mxcsr_by_format", "mxcsr_flip_inits_xmm"]}
        w = make_world("x86", cfg, None)
        w.step(A("run", task="vmm.t0", cpu=0))
        assert not w.step(A("kvm_run", task="vmm.t0", vcpu="a.v1", guest="ldmxcsr")).violations
        r = w.step(A("migrate_xsave", task="vmm.t0", vcpu="a.v1", src="a.v0"))
        assert not r.violations and r.observed == {"ret": 0, "xstate_bv": 0}
        assert w.do_observe_vcpu("a.v1")["mxcsr"] == 0x1F80, cpu
        r = w.step(A("get_xsave", task="vmm.t0", vcpu="a.v1"))
        assert not r.violations, r


def test_user_xfeatures_guest_only_loses_a_pre_xsave_guests_legacy_state() -> None:
    """Variant user-xfeatures-guest-only (KVM from ad856280ddea until legacy FP/SSE were
    always allowed): a guest offered no XSAVE features has user_xfeatures 0, so its round trip
    loses MXCSR (KVM_GET_XSAVE2's header drops SSE) and a buffer with x87/SSE from another vCPU
    is refused (-EINVAL); under the kernel's design the header keeps SSE and the buffer is
    taken."""
    cfg = {**MIGRATION, "vms": {"new": {"vmm": "vmm.t0", "vcpus": 1},
                                "old": {"vmm": "vmm.t0", "vcpus": 1, "xcr0": 0}}}
    got = {}
    for variant in (None, "user-xfeatures-guest-only"):
        w = make_world("x86", cfg, variant)
        assert w.vcpus["old.v0"].arch.guest_supported_xcr0 == 0
        w.step(A("run", task="vmm.t0", cpu=0))
        w.step(A("kvm_run", task="vmm.t0", vcpu="new.v0", guest="write avx"))
        w.step(A("kvm_run", task="vmm.t0", vcpu="old.v0", guest="ldmxcsr"))
        r = w.step(A("set_xsave", task="vmm.t0", vcpu="old.v0"))
        m = w.step(A("migrate_xsave", task="vmm.t0", vcpu="old.v0", src="new.v0"))
        got[variant] = (r.observed["xstate_bv"], [v.invariant for v in r.violations],
                        m.observed["ret"])
    # The variant's buffer already shows the guest initial MXCSR (regset-view-shows-the-task),
    # and the round trip then loses it (no-lost-write).
    assert got == {None: (0x2, [], 0),
                   "user-xfeatures-guest-only": (0x0, ["regset-view-shows-the-task",
                                                       "no-lost-write"], -22)}


def test_edit_xsave_gives_the_guest_the_vmms_values() -> None:
    """A VMM's debugger stub writes guest registers through the buffer: KVM_GET_XSAVE2, a
    component replaced and its XSTATE_BV bit set, KVM_SET_XSAVE. The guest then sees the
    VMM's values, PKRU through vcpu->arch.pkru; components it was not offered are refused by
    name."""
    import pytest

    from fpstate.check.world import StepError

    w = _migration_world()
    comps = {a.get("component") for a in w.enabled_actions()
             if a.name == "edit_xsave" and a.get("vcpu") == "small.v0"}
    assert comps == {"x87", "sse", "avx"}
    for comp, bv in (("avx", 0x4), ("pkru", 0x204)):
        r = w.step(A("edit_xsave", task="vmm.t0", vcpu="big.v0", component=comp))
        assert not r.violations and r.observed["ret"] == 0
        assert r.observed["xstate_bv"] & bv == bv
    seen = w.do_observe_vcpu("big.v0")
    assert seen["avx"] == "vmm.t0#1" and seen["pkru"] == "vmm.t0#2"
    assert not w.step(A("kvm_run", task="vmm.t0", vcpu="big.v0", guest="read avx")).violations
    with pytest.raises(StepError, match=r"opmask is not a user component small\.v0"):
        w.step(A("edit_xsave", task="vmm.t0", vcpu="small.v0", component="opmask"))


def test_an_edit_that_set_xsave_drops_is_a_lost_write(monkeypatch) -> None:
    """A KVM_SET_XSAVE that cleared the edited component's XSTATE_BV bit (as a VMM that
    forgot to set it would see) leaves the guest its old value: no-lost-write."""
    w = _migration_world()
    _set_xsave_dropping_avx(monkeypatch)
    r = w.step(A("edit_xsave", task="vmm.t0", vcpu="big.v0", component="avx"))
    assert {v.invariant for v in r.violations} == {"no-lost-write"}
    assert "guest big.v0 would see avx = init (expected vmm.t0#1" in str(r.violations[0])


def test_an_edit_of_sse_gives_the_guest_the_mxcsr_its_buffer_held(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """scenarios/kvm-edit-sse-stale-mxcsr.yaml: with the proposed fix mxcsr_by_format the
    buffer shows the guest's 1F80H and the edit leaves it; every release (variant
    uabi-mxcsr-by-ymm) shows the stale 0x3f80 at the KVM_GET_XSAVE2. Past that view, the
    write-back follows the kernel's rule (`_mxcsr_after_uabi_set`: the buffer's MXCSR comes
    back); the naive expectation -- the guest keeps its own 1F80H -- breaks no-lost-write."""
    from pathlib import Path

    from fpstate.check import scenario as scn
    from fpstate.check.actions_x86 import X86World
    from fpstate.check.world import no_memos

    path = Path(__file__).resolve().parents[2] / "scenarios" / "kvm-edit-sse-stale-mxcsr.yaml"
    assert scn.run(scn.load(path)).ok
    report = scn.run(scn.load(path), variant="uabi-mxcsr-by-ymm")
    assert report.violation is not None
    assert report.violation[1].invariant == "regset-view-shows-the-task"
    assert "KVM_GET_XSAVE2 of vm0.v0 shows MXCSR = MXCSR 0x3f80" in report.violation[1].detail
    sc = scn.load(path)
    w = make_world(sc.model, {**sc.config, "fixes": []}, None)
    for step in sc.steps[:3]:
        w.step(step.action)
    edit = sc.steps[4].action
    assert w.clone().step(edit).violations[0].invariant == "regset-view-shows-the-task"
    monkeypatch.setattr(X86World, "_mxcsr_after_uabi_set", lambda self, name, mxcsr, bv: None)
    with no_memos():
        r = w.step(edit)
    assert {v.invariant for v in r.violations} == {"regset-view-shows-the-task",
                                                    "no-lost-write"}, r.violations


def test_set_fpu_reaches_the_guest_only_through_the_header(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """scenarios/kvm-set-fpu-lost-write.yaml holds under KVM's rule (the guest takes
    KVM_SET_FPU's x87 and XMM values only where XSTATE_BV has x87 and SSE); the naive
    contract -- the guest always takes them -- breaks no-lost-write at the first observation
    of a new vCPU, whose header is empty, naming the VMM's value the guest never got."""
    from pathlib import Path

    from fpstate.check import scenario as scn
    from fpstate.check.actions_kvm import KvmX86World
    from fpstate.check.world import no_memos

    path = Path(__file__).resolve().parents[2] / "scenarios" / "kvm-set-fpu-lost-write.yaml"
    assert scn.run(scn.load(path)).ok

    def naive(self, name: str, v, hdr: int, x87: bytes, sse: bytes) -> None:
        self.expected[name][0], self.expected[name][1] = x87, sse

    monkeypatch.setattr(KvmX86World, "_set_fpu_contract", naive)
    with no_memos():
        report = scn.run(scn.load(path))
    assert report.violation is not None
    step, violation = report.violation
    assert step == 2 and violation.invariant == "no-lost-write"
    assert "guest vm0.v0 would see x87 = init (expected vmm.t0#1" in str(violation)


# -- a guest's XFD (guest programs wrmsr/rdmsr) ---------------------------------------------------

AMX_VM = {"cpus": 2, "processes": {"vmm": 1},
          "vms": {"vm0": {"vmm": "vmm.t0", "vcpus": 1, "guest_amx": True}},
          "fixes": ["guest_xfd_clears_xstate_bv"]}
ARM = "wrmsr xfd 0x40000"
HANDLER = "rdmsr xfd_err; wrmsr xfd_err 0; wrmsr xfd 0; write xtiledata"


def _amx_world(variant=None, steps=()):
    w = make_world("x86", AMX_VM, variant)
    for a in [A("run", task="vmm.t0", cpu=0), *steps]:
        r = w.step(a)
        assert not r.violations, (a, r.violations)
    return w


def _run(guest: str, **kw) -> Action:
    return A("kvm_run", task="vmm.t0", vcpu="vm0.v0", guest=guest, **kw)


@pytest.mark.parametrize("program, message", [
    ("wrmsr pkru 1", "guest op 'wrmsr pkru 1': unknown MSR 'pkru' (known: xfd, xfd_err)"),
    ("wrmsr xfd", "guest op 'wrmsr xfd': wrmsr needs an MSR name and an integer value "
                  "(e.g. 'wrmsr xfd 0x40000')"),
    ("wrmsr xfd arm", "guest op 'wrmsr xfd arm': wrmsr needs an MSR name and an integer value "
                      "(e.g. 'wrmsr xfd 0x40000')"),
    ("wrmsr xfd -1", "guest op 'wrmsr xfd -1': -0x1 is not a 64-bit MSR value"),
    ("rdmsr xfd_err 0", "guest op 'rdmsr xfd_err 0': rdmsr takes an MSR name only"),
])
def test_a_bad_guest_msr_op_is_named(program: str, message: str) -> None:
    from fpstate.check.world import StepError

    w = _amx_world()
    with pytest.raises(StepError) as e:
        w.step(_run(program))
    assert str(e.value) == message


def test_the_guests_xfd_programs_are_offered_with_guest_amx_only() -> None:
    w = _amx_world()
    progs = {(a.get("guest"), a.get("irq_at")) for a in w.enabled_actions()
             if a.name == "kvm_run" and a.task == "vmm.t0"}
    assert {(ARM, None), (HANDLER, None), (ARM + "; write xtiledata", None), (ARM, "exit"),
            (ARM, "xfd"), ("write avx; xsetbv", "exit")} <= progs
    plain = make_world("x86", {**AMX_VM, "vms": {"vm0": {"vmm": "vmm.t0", "vcpus": 1}}}, None)
    plain.step(A("run", task="vmm.t0", cpu=0))
    progs = {a.get("guest") for a in plain.enabled_actions() if a.name == "kvm_run"}
    assert "write avx" in progs and not any("xfd" in p for p in progs)


def test_a_guests_xfd_err_read_must_be_what_its_nm_and_its_write_left() -> None:
    w = _amx_world(steps=[_run(ARM), _run("write xtiledata")])
    assert w.guest_xfd_err["vm0.v0"] == 1 << 18
    assert w.do_observe_vcpu("vm0.v0")["xfd_err"] == 1 << 18
    r = w.step(_run(HANDLER))
    assert not r.violations and r.observed["faults"] == "none"
    assert w.guest_xfd_err["vm0.v0"] == 0
    # A KVM that loses the guest's XFD_ERR across an exit: the next read breaks no-lost-write.
    w.step(_run(ARM + "; write xtiledata"))
    w.vcpus["vm0.v0"].arch.guest_fpu.xfd_err = 0
    r = w.step(_run("rdmsr xfd_err"))
    assert [(v.invariant, v.detail) for v in r.violations] == [
        ("no-lost-write", "guest vm0.v0 read IA32_XFD_ERR = 0x0 instead of its 0x40000")]


def test_arming_a_component_that_holds_a_value_lets_it_read_back_initial() -> None:
    # The exit's XSAVE under the armed XFD records TILEDATA as initial: allowed (guest_loose),
    # and a VMM's KVM_GET_XSAVE2 that shows it so is right too.
    w = _amx_world(steps=[_run("write xtiledata"), _run(ARM)])
    own = w.expected["vm0.v0"][18]
    assert w.guest_loose["vm0.v0"] == {18: own}
    assert w.do_observe_vcpu("vm0.v0")["xtiledata"] == "init"
    r = w.step(A("get_xsave", task="vmm.t0", vcpu="vm0.v0"))
    assert not r.violations and not r.observed["xstate_bv"] & 1 << 18
    # Another writer's value would still be foreign; the guest's next write ends the allowance.
    r = w.step(_run(HANDLER))
    assert not r.violations and w.guest_loose["vm0.v0"] == {}
    assert w.do_observe_vcpu("vm0.v0")["xtiledata"].startswith("vm0.v0#")


def test_a_vmms_edit_of_an_armed_component_gives_the_guest_its_initial_configuration() -> None:
    w = _amx_world(steps=[_run(ARM)])
    r = w.step(A("edit_xsave", task="vmm.t0", vcpu="vm0.v0", component="xtiledata"))
    assert not r.violations and r.observed["ret"] == 0
    assert 18 not in w.expected["vm0.v0"]
    assert not w.vcpus["vm0.v0"].arch.guest_fpu.fpstate.xstate_bv & 1 << 18
    r = w.step(_run(HANDLER))
    assert not r.violations


def test_a_migration_from_a_vcpu_that_holds_a_component_loosely_loosens_it() -> None:
    """Found by campaign x86-kernels (Emerald Rapids, two vCPUs): the guest of v0 writes tile
    data and the VMM arms its XFD (KVM_SET_MSRS), which may drop the value from v0's image
    (`guest_loose`); here it does (b45f72177594 with the guest_xfd_host_write amendment). A
    migration of v0's buffer to v1 then carries TILEDATA initial, and v1 -- whose XFD is not
    armed -- may read either, as v0 may: not a lost write."""
    w = make_world("x86", {**AMX_VM, "vms": {"vm0": {"vmm": "vmm.t0", "vcpus": 2,
                                                      "guest_amx": True}},
                           "fixes": ["guest_xfd_clears_xstate_bv", "guest_xfd_host_write"]},
                   None)
    for a in [A("run", task="vmm.t0", cpu=0), _run("write xtiledata"),
              A("set_xfd_msr", task="vmm.t0", vcpu="vm0.v0")]:
        assert not w.step(a).violations
    own = w.expected["vm0.v0"][18]
    assert w.guest_loose["vm0.v0"] == {18: own}
    r = w.step(A("migrate_xsave", task="vmm.t0", vcpu="vm0.v1", src="vm0.v0"))
    assert not r.violations and not r.observed["xstate_bv"] & 1 << 18
    assert w.expected["vm0.v1"][18] == own and w.guest_loose["vm0.v1"] == {18: own}
    assert w.do_observe_vcpu("vm0.v1")["xtiledata"] == "init"


def test_the_code_before_b45f72177594_stores_the_armed_bit() -> None:
    w = _amx_world("guest-xfd-keeps-xstate-bv", steps=[_run(ARM)])
    r = w.step(A("edit_xsave", task="vmm.t0", vcpu="vm0.v0", component="xtiledata"))
    assert "no-lost-write" in {v.invariant for v in r.violations}
    assert w.vcpus["vm0.v0"].arch.guest_fpu.fpstate.xstate_bv & 1 << 18
    w = _amx_world("guest-xfd-keeps-xstate-bv", steps=[_run("write xtiledata")])
    r = w.step(_run(ARM, irq=True, irq_at="exit"))
    assert [v.invariant for v in r.violations] == ["kernel-warn"]
    assert "XSTATE_BV loads" in r.violations[0].detail


def test_kvm_enter_at_an_exit_holds_the_guest_to_what_ran_before_it() -> None:
    """kvm_enter(at: exit) stops while KVM handles the program's first intercepted exit: the
    guest's AVX write before it is its own value already (the contract of the ops done), the
    rest is judged at kvm_finish; a program that exits nowhere runs to its end."""
    w = _amx_world()
    r = w.step(A("kvm_enter", task="vmm.t0", vcpu="vm0.v0", guest="write avx; xsetbv",
                 at="exit"))
    assert not r.violations and r.observed == {"stopped": True}
    assert w.expected["vm0.v0"][2] == w.guest_seen("vm0.v0")[2]
    assert w._pending_run["vmm.t0"][4:] == ("exit", 1)
    for a in [A("idle", cpu=0), A("run", task="vmm.t0", cpu=1),
              A("kvm_finish", task="vmm.t0")]:
        r = w.step(a)
        assert not r.violations, (a, r.violations)
    assert r.observed["faults"] == "none"
    assert w.do_observe_vcpu("vm0.v0")["avx"].startswith("vm0.v0#")
    r = w.step(A("kvm_enter", task="vmm.t0", vcpu="vm0.v0", guest="write avx", at="exit"))
    assert r.observed == {"stopped": False, "faults": "none", "overflow": 0}
    assert "vmm.t0" not in w._pending_run


def test_the_two_positions_of_a_suspended_run_have_different_keys() -> None:
    entry, exit_ = _amx_world(), _amx_world()
    entry.step(A("kvm_enter", task="vmm.t0", vcpu="vm0.v0", guest="wrmsr xfd 0x40000"))
    exit_.step(A("kvm_enter", task="vmm.t0", vcpu="vm0.v0", guest="wrmsr xfd 0x40000",
                 at="exit"))
    assert entry.key() != exit_.key()


def test_a_thread_group_that_dies_while_kvm_run_is_preempted_at_an_exit() -> None:
    """As kill-while-preempted-in-kvm-run.yaml, at the exit's preemption point: p1.t1 takes
    an AMX #NM without permission (SIGSEGV kills the group) while p1.t0 is switched out inside
    KVM's handling of its guest's XSETBV. p1.t0 leaves the run without re-entering: the
    guest FPU is put back, and the guest keeps the AVX it wrote before the exit."""
    w = make_world("x86", {"cpus": 2, "processes": {"p0": 1, "p1": 2},
                           "vms": {"vm0": {"vmm": "p1.t0", "vcpus": 1}}}, None)
    steps = [A("run", task="p1.t0", cpu=0),
             A("kvm_enter", task="p1.t0", vcpu="vm0.v0", guest="write avx; xsetbv; read avx",
               at="exit"),
             A("run", task="p0.t0", cpu=0), A("run", task="p1.t1", cpu=1),
             A("write", task="p1.t1", component="xtiledata"),
             A("run", task="p1.t0", cpu=1)]
    for a in steps:
        r = w.step(a)
        assert not r.violations, (a, r.violations)
    r = w.step(A("kvm_finish", task="p1.t0"))
    assert not r.violations
    v = w.vcpus["vm0.v0"]
    assert not v.wants_to_run and not v.arch.guest_fpu.fpstate.in_use
    assert w.do_observe_vcpu("vm0.v0")["avx"] == "vm0.v0#1"


_WORDS = st.sampled_from(["write", "read", "release", "wrmsr", "rdmsr", "xfd", "xfd_err",
                          "avx", "xtiledata", "0x40000", "0", "-1", "0x1_0000_0000_0000_0000",
                          "zz", "xsetbv", "init", "ldmxcsr", "pkru", "avx|zz", ";", " "])


@settings(max_examples=120, deadline=None)
@given(st.lists(_WORDS, max_size=8))
def test_a_guest_program_either_runs_or_is_refused_by_name(words: list[str]) -> None:
    """Fuzz the guest program grammar: any text runs, or fails with a StepError (one line
    naming what is wrong), never another exception."""
    from fpstate.check.world import StepError

    w = _FUZZ_WORLD.clone()
    try:
        w.step(_run(" ".join(words)))
    except StepError as e:
        assert "\n" not in str(e) and str(e)


_FUZZ_WORLD = _amx_world()


def test_a_vmms_xfd_write_holds_the_guest_to_the_armed_rules() -> None:
    """set_xfd_msr: KVM_SET_MSRS of IA32_XFD from the VMM. With the proposed amendment of
    b45f72177594 the guest's tile data goes to its initial configuration (allowed: it holds a
    value of its own in an armed component); with the merged fix alone (the unfixed variant)
    the guest fpstate cannot be restored."""
    fixes = {**AMX_VM, "fixes": ["guest_xfd_clears_xstate_bv", "guest_xfd_host_write"]}
    w = make_world("x86", fixes, None)
    for a in [A("run", task="vmm.t0", cpu=0), _run("write xtiledata")]:
        w.step(a)
    assert A("set_xfd_msr", task="vmm.t0", vcpu="vm0.v0") in w.enabled_actions()
    r = w.step(A("set_xfd_msr", task="vmm.t0", vcpu="vm0.v0"))
    assert not r.violations and r.observed == {"ret": 1}
    assert w.guest_loose["vm0.v0"] == {18: w.expected["vm0.v0"][18]}
    assert w.do_observe_vcpu("vm0.v0")["xtiledata"] == "init"
    assert not w.step(_run(HANDLER)).violations
    w = make_world("x86", fixes, "guest-xfd-host-write-keeps-xstate-bv")
    for a in [A("run", task="vmm.t0", cpu=0), _run("write xtiledata")]:
        w.step(a)
    r = w.step(A("set_xfd_msr", task="vmm.t0", vcpu="vm0.v0"))
    assert "no-lost-write" in {v.invariant for v in r.violations}
