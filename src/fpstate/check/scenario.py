"""Scenarios: a YAML file of actions and expectations, run against a model with its invariants.

Format
------
A scenario is one YAML mapping::

    name: seed 004 -- IA32_PASID written while the registers are only a cached copy
    description: |                      # optional, free text
      ...
    model: x86                          # x86 (kernel + KVM) or arm64 (host + KVM/arm64)
    config:                             # the model's configuration (optional)
      cpu: sapphire-rapids              #   x86: a CPU profile name or path
      cpus: 2
      processes: {p0: 1}                #   x86: process -> threads (p0.t0, p0.t1, ...)
    variants:                           # optional: rejected design -> invariant it breaks
      pasid-write-incoherent: valid-registers-match-memory
    steps:
      - run: {task: p0.t0, cpu: 0}      # one action per step: {action: {field: value}}
      - write: {task: p0.t0, component: avx}
        expect: {fault: none}           # optional: observed values the step must return
      - idle: {cpu: 0}
      - note: any free text             # optional, printed in the trace

Actions and their fields are the vocabulary of the model (``fpstate run --list-actions``,
docs/scenarios.md). An ``expect`` mapping names values the action returns; a string without
``#`` matches a writer whatever its generation (``avx: p0.t0`` matches ``p0.t0#3``).

Running
-------
Every step runs the action on the model and then checks every invariant of the model
(fpstate.check.invariants). The run stops at the first violated invariant or failed
expectation. `load` raises `ScenarioError` (one line) for bad YAML, an unknown key, action or
field; `run` raises `StepError` for an action the model refuses in its state.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fpstate.check import variants as variant_registry
from fpstate.check.invariants import BY_NAME as INVARIANT_NAMES
from fpstate.check.world import (
    Action,
    Frame,
    ScenarioError,
    StepError,
    Value,
    Violation,
    World,
)
from fpstate.inputs import read_text, reason

#: model name -> "module:class" of its world (imported on first use).
MODELS: dict[str, str] = {
    "x86": "fpstate.check.actions_kvm:KvmX86World",
    "arm64": "fpstate.check.actions_arm64:Arm64World",
}
TOP_KEYS = ("name", "description", "model", "config", "variants", "steps")


def world_class(model: str) -> type[World]:
    try:
        target = MODELS[model]
    except KeyError:
        raise ScenarioError(f"unknown model {model!r} (known: {', '.join(MODELS)})") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


@dataclass(frozen=True, slots=True)
class Step:
    action: Action
    expect: Mapping[str, Value] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    model: str
    config: Mapping[str, Any]
    steps: tuple[Step, ...]
    variants: Mapping[str, str] = field(default_factory=dict)
    description: str = ""
    path: str = ""

    def to_yaml(self) -> str:
        """The scenario in the file format (what the explorer writes)."""
        doc: dict[str, Any] = {"name": self.name}
        if self.description:
            doc["description"] = self.description
        doc["model"] = self.model
        doc["config"] = dict(self.config)
        if self.variants:
            doc["variants"] = dict(self.variants)
        steps = []
        for s in self.steps:
            entry: dict[str, Any] = s.action.as_dict()
            if s.expect:
                entry["expect"] = dict(s.expect)
            if s.note:
                entry["note"] = s.note
            steps.append(entry)
        doc["steps"] = steps
        return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=100)


def _where(path: str, n: int | None = None) -> str:
    return f"{path}: step {n}" if n is not None else path


def parse(doc: Any, path: str = "<scenario>") -> Scenario:
    """Validate a loaded YAML document; ScenarioError naming the first problem."""
    if not isinstance(doc, Mapping):
        raise ScenarioError(f"{path}: a scenario is a YAML mapping, not {type(doc).__name__}")
    unknown = [k for k in doc if k not in TOP_KEYS]
    if unknown:
        raise ScenarioError(f"{path}: unknown key {unknown[0]!r} (keys: {', '.join(TOP_KEYS)})")
    model = doc.get("model")
    if not isinstance(model, str):
        raise ScenarioError(f"{path}: 'model' is required ({', '.join(MODELS)})")
    cls = world_class(model)
    config = doc.get("config") or {}
    if not isinstance(config, Mapping):
        raise ScenarioError(f"{path}: 'config' must be a mapping")
    try:
        cls.validate_config(config)
    except ScenarioError as e:
        raise ScenarioError(f"{path}: {e}") from None
    vmap = doc.get("variants") or {}
    if not isinstance(vmap, Mapping):
        raise ScenarioError(f"{path}: 'variants' must map variant names to invariant names")
    for vname, inv in vmap.items():
        v = variant_registry.BY_NAME.get(vname)
        if v is None:
            raise ScenarioError(f"{path}: variants: unknown variant {vname!r}")
        if v.model != model:
            raise ScenarioError(f"{path}: variants: {vname} is a variant of model {v.model}")
        if inv not in INVARIANT_NAMES:
            raise ScenarioError(f"{path}: variants: {vname}: unknown invariant {inv!r}")
    raw_steps = doc.get("steps")
    if not isinstance(raw_steps, list):
        raise ScenarioError(f"{path}: 'steps' must be a list")
    steps = []
    for n, raw in enumerate(raw_steps, 1):
        steps.append(_parse_step(cls, raw, _where(path, n)))
    name = doc.get("name", Path(path).stem)
    description = doc.get("description", "")
    if not isinstance(name, str) or not isinstance(description, str):
        raise ScenarioError(f"{path}: 'name' and 'description' must be strings")
    return Scenario(name, model, dict(config), tuple(s for s in steps if s is not None),
                    dict(vmap), description, path)


def _parse_step(cls: type[World], raw: Any, where: str) -> Step | None:
    if not isinstance(raw, Mapping):
        raise ScenarioError(f"{where}: a step is a mapping {{action: {{field: value}}}}")
    keys = [k for k in raw if k not in ("expect", "note")]
    if not keys:
        if "note" in raw:
            return None
        raise ScenarioError(f"{where}: no action")
    if len(keys) > 1:
        raise ScenarioError(f"{where}: one action per step, got {', '.join(map(str, keys))}")
    name = keys[0]
    spec = cls.spec(str(name), where)
    action = spec.validate(raw[name] or {}, where)
    expect = raw.get("expect") or {}
    if not isinstance(expect, Mapping) or not all(
            isinstance(v, (str, int, bool)) for v in expect.values()):
        raise ScenarioError(f"{where}: 'expect' must map names to strings, ints or booleans")
    note = raw.get("note", "")
    return Step(action, dict(expect), str(note))


def load(path: str | Path) -> Scenario:
    """Read and validate a scenario file."""
    p = Path(path)
    try:
        text = read_text(p)
    except (OSError, UnicodeDecodeError) as e:
        raise ScenarioError(f"{p}: {reason(e)}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ScenarioError(f"{p}: bad YAML{where}: {problem}") from None
    return parse(doc, str(p))


# -- running -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mismatch:
    key: str
    expected: Value
    observed: Value | None


@dataclass(slots=True)
class StepRecord:
    n: int
    action: Action
    observed: Mapping[str, Value]
    violations: tuple[Violation, ...] = ()
    mismatches: tuple[Mismatch, ...] = ()
    note: str = ""


@dataclass(slots=True)
class Report:
    scenario: Scenario
    variant: str | None
    records: list[StepRecord]
    frames: list[Frame]
    initial: tuple[Violation, ...] = ()

    @property
    def violation(self) -> tuple[int, Violation] | None:
        if self.initial:
            return 0, self.initial[0]
        for r in self.records:
            if r.violations:
                return r.n, r.violations[0]
        return None

    @property
    def failed_expectation(self) -> StepRecord | None:
        return next((r for r in self.records if r.mismatches), None)

    @property
    def ok(self) -> bool:
        return self.violation is None and self.failed_expectation is None


def matches(expected: Value, observed: Value | None) -> bool:
    if isinstance(expected, str) and isinstance(observed, str) and "#" not in expected \
            and "#" in observed:
        return observed.split("#")[0] == expected
    if isinstance(expected, bool) or isinstance(observed, bool):
        return expected is observed
    if isinstance(expected, str) and isinstance(observed, int):  # "0x3e80", quoted in YAML
        try:
            return int(expected, 0) == observed
        except ValueError:
            return False
    return expected == observed


def make_world(model: str, config: Mapping[str, Any], variant: str | None) -> World:
    """A fresh world of ``model`` (ScenarioError when ``variant`` is not one of its)."""
    cls = world_class(model)
    if variant is not None:
        v = variant_registry.get(variant)
        if v.model != model:
            raise ScenarioError(f"variant {variant} is for model {v.model}, the scenario is "
                                f"{model}")
    cls.validate_config(config)
    return cls(dict(config), variant)


def run(scn: Scenario, variant: str | None = None, frames: bool = False) -> Report:
    """Run ``scn`` (under ``variant``), stopping at the first violation or mismatch."""
    world = make_world(scn.model, scn.config, variant)
    report = Report(scn, variant, [], [])
    report.initial = tuple(world.check())
    if frames:
        report.frames.append(world.frame("(configuration)", _first(report.initial),
                                         _detail(report.initial)))
    if report.initial:
        return report
    for n, step in enumerate(scn.steps, 1):
        try:
            result = world.step(step.action)
        except StepError as e:
            raise StepError(f"{scn.path or scn.name}: step {n} {step.action}: {e}") from None
        mismatches = tuple(Mismatch(k, v, result.observed.get(k)) for k, v in step.expect.items()
                           if not matches(v, result.observed.get(k)))
        rec = StepRecord(n, step.action, result.observed, result.violations, mismatches,
                         step.note)
        report.records.append(rec)
        if frames:
            report.frames.append(world.frame(str(step.action), _first(result.violations),
                                             _detail(result.violations)))
        if result.violations or mismatches:
            break
    return report


def _first(vs: Sequence[Violation]) -> str | None:
    return vs[0].invariant if vs else None


def _detail(vs: Sequence[Violation]) -> str:
    return vs[0].detail if vs else ""


def format_report(report: Report) -> list[str]:
    """The trace printed by ``fpstate run``: one line per step, then the verdict."""
    scn = report.scenario
    head = f"scenario: {scn.name} (model {scn.model}"
    head += f", variant {report.variant})" if report.variant else ", the kernel's design)"
    lines = [head]
    for v in report.initial:
        lines.append(f"  0  (configuration)\n     VIOLATION {v.invariant}: {v.detail}")
    for r in report.records:
        obs = "  ".join(f"{k}={_fmt(v)}" for k, v in r.observed.items())
        lines.append(f"{r.n:3}  {r.action}" + (f"  -> {obs}" if obs else ""))
        if r.note:
            lines.append(f"     # {r.note}")
        for m in r.mismatches:
            lines.append(f"     EXPECTATION FAILED {m.key}: expected {_fmt(m.expected)}, "
                         f"observed {_fmt(m.observed)}")
        for v in r.violations:
            lines.append(f"     VIOLATION {v.invariant}: {v.detail}")
    found = report.violation
    if found is not None:
        n, v = found
        lines.append(f"FAIL: invariant {v.invariant} violated at step {n}")
    elif report.failed_expectation is not None:
        lines.append(f"FAIL: expectation failed at step {report.failed_expectation.n}")
    else:
        lines.append(f"OK: {len(report.records)} steps, every invariant held")
    return lines


def _fmt(v: Any) -> str:
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) > 4096:
        return f"{v:#x}"
    return str(v)


__all__ = ["MODELS", "Report", "Scenario", "Step", "format_report", "load", "make_world",
           "matches", "parse", "run", "world_class"]
