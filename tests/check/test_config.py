"""World configurations are validated before a model boots: a bad value is a ScenarioError
naming the key and what it must be (a traceback from deep in the model before)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fpstate.check.scenario import make_world
from fpstate.check.world import ScenarioError
from fpstate.errors import FpstateError

X86 = [
    ({"cpu": 5}, "config.cpu: must be a non-empty string, not 5"),
    ({"cpus": 0}, "config.cpus: must be an integer from 1 to 64, not 0"),
    ({"cpus": True}, "config.cpus: must be an integer from 1 to 64, not True"),
    ({"kernel": 6.1}, 'config.kernel: must be a version string such as "6.18" (quoted: YAML '
                      "reads 6.10 as the number 6.1), not 6.1"),
    ({"processes": {"p0": 0}, "vms": {}},
     "config.processes.p0: must be an integer from 1 to 16, not 0"),
    ({"processes": ["p0"]}, "config.processes: must be a mapping with names as keys, "
                            "not ['p0']"),
    ({"max_tasks": "x"}, "config.max_tasks: must be an integer from 1 to 64, not 'x'"),
    ({"processes": {"p0": 1}},
     "config.vms: the default VM's VMM is p1.t0, which these processes do not have (tasks: "
     "p0.t0); give vms, or vms: {} for none"),
    ({"vms": {"vm0": {"vmm": "p9.t0"}}},
     "config.vms.vm0.vmm: no task 'p9.t0' (tasks: p0.t0, p0.t1, p1.t0, p1.t1)"),
    ({"vms": {"vm0": {"vmm": "p1.t0", "vcpu": 1}}},
     "config.vms.vm0: unknown key 'vcpu' (keys: vmm, vcpus, guest_amx, xcr0)"),
    ({"vms": {"vm0": {"vmm": "p1.t0", "vcpus": -1}}},
     "config.vms.vm0.vcpus: must be an integer from 0 to 16, not -1"),
    ({"vms": {"vm0": {"vmm": "p1.t0", "guest_amx": "yes"}}},
     "config.vms.vm0.guest_amx: must be true or false, not 'yes'"),
    ({"vms": {"vm0": {"vmm": "p1.t0", "xcr0": 1.5}}},
     "config.vms.vm0.xcr0: a mask (an int, or names such as 'x87|sse|avx'), not 1.5"),
    ({"vms": {"vm0": {"vmm": "p1.t0", "xcr0": "0x1ffffffffffffffff"}}},
     "config.vms.vm0.xcr0: mask '0x1ffffffffffffffff' is not a 64-bit value"),
    ({"kvm_vendor": "tdx"}, "config.kvm_vendor: must be one of vmx, svm, not 'tdx'"),
    ({"autosleep": "mem"}, "config.autosleep: must be true or false, not 'mem'"),
    ({"vms": {f"vm{n}": {"vmm": "p1.t0"} for n in range(65)}},
     "config.vms: at most 64 VMs, not 65"),
    ({"nosuch": 1}, "config: unknown key 'nosuch' for model x86 (keys: cpu, kernel, cpus, "
                    "processes, max_tasks, compat, fixes, autosleep, vms, kvm_vendor, omit)"),
    ({"fixes": "resume_pkru"}, "config.fixes: must be a list of fix names, not "
                               "'resume_pkru'"),
    ({"fixes": ["xfd_state_synced"]}, "config.fixes: 'xfd_state_synced' is not a fix the model "
                                      "applies by name (known: guest_xfd_clears_xstate_bv, "
                                      "guest_xfd_host_write, mxcsr_by_format, "
                                      "mxcsr_flip_inits_xmm, resume_pkru, "
                                      "resume_xfd_set_state)"),
    ({"fixes": ["guest_xfd_host_write"]}, "config.fixes: 'guest_xfd_host_write' amends "
                                          "'guest_xfd_clears_xstate_bv', which is not listed"),
    ({"fixes": ["mxcsr_flip_inits_xmm"]}, "config.fixes: 'mxcsr_flip_inits_xmm' amends "
                                          "'mxcsr_by_format', which is not listed"),
    ({"omit": "fork"}, "config.omit: must be a list of action names, not 'fork'"),
    ({"compat": ["p7"]}, "config.compat: 'p7' is not a process of config.processes (p0, p1)"),
]
ARM64 = [
    ({"cpus": 65}, "config.cpus: must be an integer from 1 to 64, not 65"),
    ({"tasks": "other"}, "config.tasks: must be a list of task names, not 'other'"),
    ({"tasks": ["a", "a"]}, "config.tasks: names must differ: ['a', 'a']"),
    ({"tasks": ["vmm"]}, "config.tasks: 'vmm' is the VMM task's name, there already"),
    ({"vms": {"vm0": {"vcpus": -2}}}, "config.vms.vm0.vcpus: must be an integer from 0 to 16, "
                                      "not -2"),
    ({"vms": {"vm0": {"sve": 1}}}, "config.vms.vm0.sve: must be true or false, not 1"),
    ({"vhe": "no"}, "config.vhe: must be true or false, not 'no'"),
    ({"omit": ["fork"]}, "config.omit: unknown action 'fork' for model arm64 (known: clone, "
                         "cpu_pm, enter_guest, exec, exit_guest, finalize, get_reg, guest_op, "
                         "hide_fpmr, host_softirq_neon, hotplug, idle, kernel_neon, kvm_run, "
                         "neon_begin, neon_end, preempt_vcpu, ptrace_get, ptrace_set, "
                         "resume_vcpu, return_to_user, run, set_reg, set_vl, signal, "
                         "sigreturn, syscall, syscall_enter, syscall_exit, trap, "
                         "trap_handle, trap_return, user_op, vcpu_init)"),
]


def test_omitted_actions_are_never_enabled_for_the_explorer() -> None:
    w = make_world("arm64", {"vms": {}, "omit": ["exec", "user_op"]}, None)
    names = {a.name for a in w.enabled_actions()}
    assert "syscall" in names and not names & {"exec", "user_op"}
    # a scenario may still take them
    from fpstate.check.world import Action
    w.step(Action.of("user_op", task="vmm", op="fpsimd_write"))


@pytest.mark.parametrize(("model", "config", "message"),
                         [("x86", c, m) for c, m in X86] + [("arm64", c, m) for c, m in ARM64])
def test_a_bad_configuration_names_its_key(model: str, config: dict, message: str) -> None:
    with pytest.raises(ScenarioError) as e:
        make_world(model, config, None)
    assert str(e.value) == message


def test_good_configurations_boot() -> None:
    w = make_world("x86", {"processes": {"p0": 1}, "vms": {"vm0": {"vmm": "p0.t0",
                                                                  "vcpus": 2}}}, None)
    assert sorted(w.vcpus) == ["vm0.v0", "vm0.v1"]
    assert sorted(w.tasks) == ["p0.t0"]
    w = make_world("x86", {"processes": {"p0": 1}, "vms": None}, None)
    assert w.vcpus == {}
    a = make_world("arm64", {"tasks": ["a", "b"], "vms": {"vm0": {"vcpus": 2, "sve": True}},
                             "vhe": False}, None)
    assert a.config["vhe"] is False


# -- fuzz: any YAML-like configuration boots or is refused with the package's error ----------

_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 70), st.floats(allow_nan=True),
                     st.sampled_from(["", "p0.t0", "p1.t0", "vmx", "svm", "zen5", "6.18",
                                      "other", "vmm", "nosuch", "x87|sse", "0x2e7", "avx|",
                                      "0x1ffffffffffffffff"]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(["p0", "p1", "vm0", "vmm", "vcpus", "guest_amx", "sve",
                                     "xcr0", "x"]), inner, max_size=3)), max_leaves=6)


@settings(max_examples=150, deadline=None)
@given(model=st.sampled_from(["x86", "arm64"]),
       config=st.dictionaries(st.sampled_from(["cpu", "kernel", "cpus", "processes",
                                               "max_tasks", "vms", "kvm_vendor", "tasks",
                                               "vhe", "other"]), _VALUES, max_size=4))
def test_any_configuration_boots_or_is_refused_cleanly(model: str, config: dict) -> None:
    try:
        w = make_world(model, config, None)
    except FpstateError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert not w.check()  # a configuration that boots starts in a clean state
