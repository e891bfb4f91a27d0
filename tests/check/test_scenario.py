"""Scenario files: the format, its one-line errors, the seed scenarios, the `fpstate run` trace."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fpstate.check import scenario as scn
from fpstate.check.variants import VARIANTS
from fpstate.check.world import ScenarioError, StepError
from fpstate.cli import main

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = sorted((ROOT / "scenarios").glob("*.yaml"))
SEEDS = [p for p in SCENARIOS if p.name.startswith("seed-")]
WITH_VARIANT = sorted(set(SEEDS) | {p for p in SCENARIOS if "\nvariants:\n" in p.read_text()})


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text(text)
    return p


MINIMAL = """
model: x86
config: {cpu: sapphire-rapids, cpus: 1, processes: {p0: 1}, vms: {}}
steps:
  - run: {task: p0.t0, cpu: 0}
  - write: {task: p0.t0, component: avx}
    expect: {fault: none}
"""


def test_every_seed_has_a_scenario() -> None:
    """One per seed, and seed 002 has one for each of its two rejected designs."""
    assert sorted({p.name[:8] for p in SEEDS}) == [f"seed-00{n}" for n in range(5)]
    assert len([p for p in SEEDS if p.name.startswith("seed-002")]) == 2


def test_every_variant_is_shown_by_a_scenario() -> None:
    """Each rejected design has a scenario that breaks its invariant (the test below runs
    it), also those the explorer reaches only in some runs (Variant.explorer_finds)."""
    named = {v for p in WITH_VARIANT for v in scn.load(p).variants}
    assert sorted(v.name for v in VARIANTS if v.name not in named) == []


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.name)
def test_scenarios_hold_under_the_kernels_design(path: Path) -> None:
    report = scn.run(scn.load(path))
    assert report.ok, "\n".join(scn.format_report(report))
    assert len(report.records) == len(scn.load(path).steps)


@pytest.mark.parametrize("path", WITH_VARIANT, ids=lambda p: p.name)
def test_each_seed_scenario_breaks_its_invariant_under_the_rejected_design(path: Path) -> None:
    """Every seed scenario, and every other scenario that names a rejected design."""
    s = scn.load(path)
    assert len(s.variants) == 1
    (variant, invariant), = s.variants.items()
    report = scn.run(s, variant)
    assert report.violation is not None
    step, _ = report.violation
    first = (report.initial if step == 0
             else next(r.violations for r in report.records if r.n == step))
    assert invariant in {v.invariant for v in first}


#: Variants whose fixing commit is a mainline release (versions.py rows): the last listed
#: kernel that shipped the bug, and the first without it.
VERSIONED = {
    "hardirq-fpu-in-fpregs-lock": ("5.17", "5.18"),
    "req-perm-overwrites": ("5.17", "5.18"),
    "ptrace-pkru-ignored": ("6.1", "6.2"),
    "exec-fpu-drop": ("6.3", "6.5"),
    "xfd-state-stale-on-online": ("6.6", "6.9"),
    # 6.12 fixed it with a bug of its own on AMD (pkru-sigframe-no-xstate-bv; below)
    "sigframe-under-user-pkru": ("6.11", "6.13"),
    "pkru-sigframe-no-xstate-bv": ("6.12", "6.13"),
    "sigframe-magic2-at-user-size": ("6.17", "6.18"),
}
#: Scenarios where another bug of the old kernel breaks its invariant first: 5.17's
#: ARCH_REQ_XCOMP_PERM revokes the default features before the interrupt comes.
OTHER_BUG_FIRST = {"hardirq-fpu-in-guest-xfd-update.yaml": "permission-keeps-defaults",
                   "hardirq-fpu-in-xfd-realloc.yaml": "permission-keeps-defaults"}
BY_VERSION = [(p, v) for p in WITH_VARIANT for v in scn.load(p).variants if v in VERSIONED]


def _first_violation(report: scn.Report) -> set[str]:
    assert report.violation is not None, "no violation"
    step, _ = report.violation
    first = (report.initial if step == 0
             else next(r.violations for r in report.records if r.n == step))
    return {v.invariant for v in first}


def _at(s: scn.Scenario, kernel: str) -> scn.Scenario:
    return scn.Scenario(s.name, s.model, {**s.config, "kernel": kernel}, s.steps, s.variants)


@pytest.mark.parametrize(("path", "variant"), BY_VERSION,
                         ids=lambda x: x.name if isinstance(x, Path) else x)
def test_a_kernel_that_shipped_a_bug_runs_it(path: Path, variant: str) -> None:
    """The scenario of a variant with a mainline fix breaks the variant's invariant under the
    kernel's design of the last kernel that shipped the bug, and holds on the first without."""
    s = scn.load(path)
    old, new = VERSIONED[variant]
    assert _first_violation(scn.run(_at(s, old))) >= {
        OTHER_BUG_FIRST.get(path.name, s.variants[variant])}
    assert scn.run(_at(s, new)).ok


def test_the_pkru_frame_fix_of_6_12_broke_sigreturn_on_amd() -> None:
    """Zen 4, a key-protected sigaltstack: 6.11 cannot write the frame (SIGSEGV), 6.12 writes
    it with every key open and stores the old PKRU without XSTATE_BV[PKRU], which an AMD
    XSAVE after WRPKRU 0 leaves 0, so sigreturn loses the task's PKRU; 6.13 sets the bit."""
    s = scn.load(ROOT / "scenarios" / "pkey-altstack-signal.yaml")
    assert s.config["cpu"] == "zen4"
    assert _first_violation(scn.run(_at(s, "6.11"))) == {"sigframe-delivered-with-room"}
    assert _first_violation(scn.run(_at(s, "6.12"))) == {"no-lost-write"}
    assert scn.run(_at(s, "6.13")).ok


def test_run_prints_the_trace_and_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", str(write(tmp_path, MINIMAL))]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "  1  run(cpu=0, task=p0.t0)"
    assert out[2].startswith("  2  write(component=avx, task=p0.t0)  -> fault=none")
    assert out[-1] == "OK: 2 steps, every invariant held"


def test_a_violation_exits_1_naming_the_invariant(capsys: pytest.CaptureFixture) -> None:
    path = ROOT / "scenarios" / "seed-004-pasid-write.yaml"
    assert main(["run", str(path), "--variant", "pasid-write-incoherent"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: invariant valid-registers-match-memory violated at step 6" in out
    assert "pasid is 0x80000007 in the registers and init in fpstate" in out


def test_a_failed_expectation_shows_expected_and_observed(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text = MINIMAL.replace("expect: {fault: none}", "expect: {fault: '#NM'}")
    assert main(["run", str(write(tmp_path, text))]) == 1
    out = capsys.readouterr().out
    assert "EXPECTATION FAILED fault: expected #NM, observed none" in out
    assert out.splitlines()[-1] == "FAIL: expectation failed at step 2"


def test_writer_expectations_match_any_generation(tmp_path: Path) -> None:
    text = MINIMAL + "  - observe: {task: p0.t0}\n    expect: {avx: p0.t0, sse: init}\n"
    assert scn.run(scn.load(write(tmp_path, text))).ok
    text = MINIMAL + "  - observe: {task: p0.t0}\n    expect: {avx: p0.t0#2}\n"
    assert not scn.run(scn.load(write(tmp_path, text))).ok


def test_quoted_numbers_match_numbers() -> None:
    """An expectation written "0x3e80" (quoted in YAML, a string) matches the observed int
    0x3e80; a string that is no number matches no int."""
    assert scn.matches("0x3e80", 0x3E80) and scn.matches("15", 15)
    assert not scn.matches("0x3e81", 0x3E80) and not scn.matches("init", 0)


@pytest.mark.parametrize(("text", "message"), [
    ("model: x86\nsteps: [\n", "bad YAML (line 3)"),
    ("- 1\n- 2\n", "a scenario is a YAML mapping"),
    ("steps: []\n", "'model' is required"),
    ("model: riscv\nsteps: []\n", "unknown model 'riscv'"),
    ("model: x86\nsteps: []\ncolour: red\n", "unknown key 'colour'"),
    ("model: x86\nconfig: {cpus: 2, ram: 4}\nsteps: []\n", "config: unknown key 'ram'"),
    ("model: x86\nsteps: {run: 1}\n", "'steps' must be a list"),
    ("model: x86\nsteps:\n  - fly: {task: a}\n", "step 1: unknown action 'fly'"),
    ("model: x86\nsteps:\n  - run: {task: a}\n", "step 1: run: missing field 'cpu'"),
    ("model: x86\nsteps:\n  - run: {task: a, cpu: zero}\n",
     "step 1: run: field 'cpu' must be int, not 'zero'"),
    ("model: x86\nsteps:\n  - run: {task: a, cpu: 0, prio: 1}\n",
     "step 1: run: unknown field 'prio'"),
    ("model: x86\nsteps:\n  - run: {task: a, cpu: 0}\n    idle: {cpu: 0}\n",
     "step 1: one action per step"),
    ("model: x86\nsteps:\n  - arch_prctl: {task: a, option: frob}\n",
     "field 'option' = 'frob' is not one of"),
    ("model: x86\nsteps:\n  - suspend: {task: a, state: freeze}\n",
     "step 1: suspend: field 'state' = 'freeze' is not one of mem, disk"),
    ("model: x86\nvariants: {fpmr-ungated: no-lost-write}\nsteps: []\n",
     "fpmr-ungated is a variant of model arm64"),
    ("model: x86\nvariants: {pasid-write-incoherent: be-nice}\nsteps: []\n",
     "unknown invariant 'be-nice'"),
])
def test_bad_files_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture,
                                           text: str, message: str) -> None:
    assert main(["run", str(write(tmp_path, text))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fpstate: error: ")
    assert message in err


def test_an_illegal_step_is_one_line_and_exit_2(tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    text = MINIMAL.replace("  - run: {task: p0.t0, cpu: 0}\n", "")
    assert main(["run", str(write(tmp_path, text))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "step 1 write(component=avx, task=p0.t0): task p0.t0 is not running in user mode" in err


def test_an_unknown_variant_and_a_missing_file_exit_2(tmp_path: Path) -> None:
    assert main(["run", str(write(tmp_path, MINIMAL)), "--variant", "nope"]) == 2
    assert main(["run", str(tmp_path / "absent.yaml")]) == 2
    assert main(["run", str(write(tmp_path, MINIMAL)), "--variant", "fpmr-ungated"]) == 2


def test_to_yaml_round_trips(tmp_path: Path) -> None:
    s = scn.load(ROOT / "scenarios" / "seed-003-init-clears-cet.yaml")
    again = scn.parse(yaml.safe_load(s.to_yaml()))
    assert again.steps == s.steps and again.config == s.config and again.variants == s.variants


def test_list_actions_names_every_action(capsys: pytest.CaptureFixture) -> None:
    assert main(["run", "--list-actions"]) == 0
    out = capsys.readouterr().out
    for name in ("pasid_write(task: str, pasid?: int, irq?: bool)",
                 "kvm_init(task: str, vcpu: str)", "guest_op(vcpu: str, op: str, arg?: str)"):
        assert name in out


_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.text(max_size=6))
_DOC = st.recursive(_VALUE, lambda kids: st.one_of(
    st.lists(kids, max_size=3), st.dictionaries(st.sampled_from(
        ["model", "steps", "config", "run", "task", "cpu", "write", "expect", "x86", "arm64",
         "variants", "note", "component", "p0.t0"]), kids, max_size=4)), max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(_DOC)
def test_the_parser_only_raises_scenario_errors(doc: object) -> None:
    try:
        scn.parse(doc, "fuzz")
    except ScenarioError:
        pass


def test_steps_error_on_unknown_names() -> None:
    w = scn.make_world("x86", {"cpu": "sapphire-rapids", "processes": {"p0": 1}, "vms": {}},
                       None)
    from fpstate.check.world import Action

    with pytest.raises(StepError, match="no live task 'zz'"):
        w.step(Action.of("run", task="zz", cpu=0))
    with pytest.raises(StepError, match="no CPU 9"):
        w.step(Action.of("run", task="p0.t0", cpu=9))
