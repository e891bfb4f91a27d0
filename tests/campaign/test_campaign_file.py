"""The campaign file: the matrix it expands to, and one-line errors that name the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fpstate.campaign.campaign import CampaignError, check_worlds, load, loads, parse
from fpstate.check.variants import SEED_VARIANTS
from fpstate.x86.profiles import list_profiles

ROOT = Path(__file__).resolve().parents[2]

GOOD = """
name: t
model: x86
matrix:
  profiles: [zen5, sapphire-rapids]
  kernels: ["6.1", "6.18"]
  variants: [none, seeds]
  configurations:
    - {name: a, cpus: 1, processes: {p0: 1}, vms: {vm0: {vmm: p0.t0, vcpus: 1}}}
    - {name: b, cpus: 2, actions: [run, idle, write]}
explore: {mode: exhaustive, depth: 3, stop: first-violation}
budget: {states: 1000, seconds: 30}
"""


def test_matrix_expands_to_every_cell() -> None:
    c = loads(GOOD, "good.yaml")
    x86_seeds = [v for v in SEED_VARIANTS if v != "fpmr-ungated"]  # fpmr-ungated is arm64
    assert len(c.cells) == 2 * 2 * (1 + len(x86_seeds)) * 2
    first = c.cells[0]
    assert first.id == "zen5__6.1__none__a"
    assert first.config == {"cpu": "zen5", "kernel": "6.1", "cpus": 1, "processes": {"p0": 1},
                            "vms": {"vm0": {"vmm": "p0.t0", "vcpus": 1}}}
    assert first.variant is None
    assert {cell.variant for cell in c.cells} == {None, *x86_seeds}
    b = next(cell for cell in c.cells if cell.configuration.name == "b")
    assert b.configuration.actions == ("run", "idle", "write")
    assert c.explore.stop == "first-violation" and c.explore.depth == 3
    assert c.budget.states == 1000 and c.budget.seconds == 30.0
    assert len({cell.id for cell in c.cells}) == len(c.cells)


def test_all_profiles_and_random_seeds() -> None:
    doc = yaml.safe_load(GOOD)
    doc["matrix"]["profiles"] = "all"
    doc["explore"] = {"mode": "random", "seeds": {"first": 5, "count": 3}, "walks": 2}
    c = parse(doc, "x.yaml")
    assert sorted({cell.profile for cell in c.cells}) == list_profiles()
    assert c.explore.seeds == (5, 6, 7) and c.explore.walks == 2 and c.explore.walk_length == 30


def test_fingerprint_follows_the_matrix_not_the_text() -> None:
    a = loads(GOOD, "a.yaml")
    b = loads(GOOD.replace("name: t\n", "name: t\n# a comment\n"), "b.yaml")
    assert a.fingerprint == b.fingerprint
    c = loads(GOOD.replace("depth: 3", "depth: 4"), "c.yaml")
    assert c.fingerprint != a.fingerprint


BAD = [
    ("name: t\nmatrix: [", "bad.yaml: bad YAML (line"),
    ("- 1\n", "bad.yaml: a campaign is a YAML mapping, not list"),
    (GOOD.replace("model: x86", "model: mips"), "bad.yaml: model: unknown model 'mips'"),
    (GOOD.replace("name: t", "name: 't t'"), "bad.yaml: name: required"),
    (GOOD + "extra: 1\n", "bad.yaml: extra: unknown key"),
    (GOOD.replace("zen5, sapphire", "zen9, sapphire"),
     "bad.yaml: matrix.profiles[0]: unknown x86 profile 'zen9'"),
    (GOOD.replace('"6.1", "6.18"', '"6.18", 6.1'),
     "bad.yaml: matrix.kernels[1]: write the version as a string"),
    (GOOD.replace('"6.1", "6.18"', '"6.18", "4.19"'),
     "bad.yaml: matrix.kernels[1]: unknown kernel version '4.19'"),
    (GOOD.replace("[none, seeds]", "[none, fpmr-ungated]"),
     "bad.yaml: matrix.variants[1]: fpmr-ungated is a variant of model arm64"),
    (GOOD.replace("[none, seeds]", "[nope]"), "bad.yaml: matrix.variants[0]: unknown variant"),
    (GOOD.replace("cpus: 2,", "cpus: 2, vcpus: 3,"),
     "bad.yaml: matrix.configurations[1].vcpus: unknown configuration key for model x86"),
    (GOOD.replace("{name: b, cpus: 2,", "{name: b, cpu: zen4,"),
     "bad.yaml: matrix.configurations[1].cpu: comes from the matrix"),
    (GOOD.replace("[run, idle, write]", "[run, fly]"),
     "bad.yaml: matrix.configurations[1].actions[1]: unknown action 'fly'"),
    (GOOD.replace("name: b", "name: a"),
     "bad.yaml: matrix.configurations: two configurations are named 'a'"),
    (GOOD.replace("mode: exhaustive, depth: 3,", "mode: bfs, depth: 3,"),
     "bad.yaml: explore.mode: must be one of exhaustive, random"),
    (GOOD.replace("depth: 3, ", ""), "bad.yaml: explore.depth: required for mode exhaustive"),
    (GOOD.replace("depth: 3", "depth: 0"), "bad.yaml: explore.depth: must be an integer >= 1"),
    (GOOD.replace("stop: first-violation", "seeds: [1]"),
     "bad.yaml: explore.seeds: only for mode random"),
    (GOOD.replace("seconds: 30", "seconds: -1"),
     "bad.yaml: budget.seconds: must be a positive number"),
    (GOOD.replace("states: 1000", "states: many"),
     "bad.yaml: budget.states: must be an integer >= 1"),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[m.split(": ")[1] for _, m in BAD])
def test_bad_file_is_one_line_naming_the_field(text: str, message: str) -> None:
    with pytest.raises(CampaignError) as e:
        loads(text, "bad.yaml")
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_a_configuration_the_model_refuses_is_named_before_any_cell_runs() -> None:
    # The default VM's VMM is p1.t0, which a configuration with one process does not have.
    c = loads(GOOD.replace("vms: {vm0: {vmm: p0.t0, vcpus: 1}}", "cpus: 1"), "v.yaml")
    with pytest.raises(CampaignError) as e:
        check_worlds(c)
    assert str(e.value) == ("v.yaml: matrix.configurations[0] (a): config.vms: the default "
                            "VM's VMM is p1.t0, which these processes do not have (tasks: "
                            "p0.t0); give vms, or vms: {} for none")


def test_bad_file_on_the_command_line_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("[none, seeds]", "[none, kvm-save-max-size]"))
    r = subprocess.run([sys.executable, "-m", "fpstate.cli", "campaign", str(bad),
                        "--report", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"fpstate: error: {bad}: matrix.variants[1]: unknown variant "
                               "'kvm-save-max-size'")
    assert not (tmp_path / "r").exists()


def test_bundled_campaigns_are_valid() -> None:
    files = sorted((ROOT / "campaigns").glob("*.yaml"))
    assert files
    for f in files:
        c = load(f)
        assert c.cells, f


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 10), st.text(max_size=6),
                     st.sampled_from(["all", "none", "seeds", "zen5", "6.18", "exhaustive",
                                      "random", "run", "first-violation"]))
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(["name", "mode", "depth", "profiles", "kernels",
                                     "variants", "configurations", "cpus", "actions", "seeds",
                                     "states", "seconds", "first", "count", "stop"]),
                    inner, max_size=4)), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({}, optional={
    "name": _values, "model": _values, "explore": _values, "budget": _values,
    "matrix": st.fixed_dictionaries({}, optional={
        "profiles": _values, "kernels": _values, "variants": _values,
        "configurations": _values})}))
def test_fuzzed_documents_raise_only_campaign_errors(doc: dict) -> None:
    try:
        parse(doc, "fuzz.yaml")
    except CampaignError as e:
        assert str(e).startswith("fuzz.yaml: ")
        assert "\n" not in str(e)
