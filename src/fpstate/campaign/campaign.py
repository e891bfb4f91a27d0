"""The campaign file: a matrix of explorations, its validation, and the cells it expands to.

Format
------
A campaign is one YAML mapping::

    name: x86-seeds                       # names the report (letters, digits, . _ -)
    description: free text                # optional
    model: x86                            # x86 (kernel + KVM) or arm64 (host + KVM/arm64)
    matrix:
      profiles: all                       # CPU profiles: 'all' (every bundled one) or a list
      kernels: [6.18]                     # x86 only: kernel versions ('all' or a list;
                                          #   default: the newest modelled)
      variants: [none, seeds]             # 'none' = the kernel's design; a variant name;
                                          #   'seeds' (the seed variants) or 'all' of the model
      configurations:                     # the worlds to explore (a list, each one named)
        - name: 1cpu-1task-1vcpu
          cpus: 1                         # any configuration key of the model (the scenario
          processes: {p0: 1}              #   'config:' keys) except cpu and kernel, which
          vms: {vm0: {vmm: p0.t0, vcpus: 1}}   # come from the matrix
          actions: [run, idle, write]     # optional: only these actions are explored
    explore:
      mode: exhaustive                    # exhaustive (breadth-first to 'depth') or random
      depth: 4                            # exhaustive: the bound, in actions from boot
      stop: bound                         # exhaustive: 'bound' or 'first-violation' (stop
                                          #   after the level of the first violation)
      seeds: [0, 1, 2, 3]                 # random: a list, or {first: 0, count: 8}
      walks: 20                           # random: walks per seed
      walk_length: 30                     # random: actions per walk
    budget:                               # optional, per cell
      states: 200000                      # stop after the level (exhaustive) or seed (random)
      seconds: 600                        #   that reaches it

Every cell of the matrix is one (profile, kernel, variant, configuration) exploration. Bad
input raises `CampaignError` with one line naming the file and the field
(``campaigns/x.yaml: matrix.variants[2]: unknown variant 'foo' (known: ...)``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fpstate.check import variants as variant_registry
from fpstate.check.explore import Job
from fpstate.check.scenario import MODELS, world_class
from fpstate.check.world import StepError
from fpstate.errors import FpstateError
from fpstate.inputs import read_text, reason

TOP_KEYS = ("name", "description", "model", "matrix", "explore", "budget")
MATRIX_KEYS = ("profiles", "kernels", "variants", "configurations")
EXPLORE_KEYS = ("mode", "depth", "stop", "seeds", "walks", "walk_length")
BUDGET_KEYS = ("states", "seconds")
MODES = ("exhaustive", "random")
STOPS = ("bound", "first-violation")
#: The variant name of the kernel's own design in a matrix.
NO_VARIANT = "none"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class CampaignError(FpstateError):
    """A campaign file that cannot be run: one line naming the file and the field."""


@dataclass(frozen=True, slots=True)
class Configuration:
    """One named world configuration of the matrix (model config keys and an action filter)."""

    name: str
    settings: Mapping[str, Any]
    actions: tuple[str, ...] | None = None  #: None: every action of the model


@dataclass(frozen=True, slots=True)
class Cell:
    """One exploration of the matrix."""

    model: str
    profile: str
    kernel: str | None
    variant: str | None  #: None: the kernel's design
    configuration: Configuration

    @property
    def id(self) -> str:
        """A file-name-safe identifier, unique within the campaign."""
        parts = [self.profile, self.kernel or "-", self.variant or NO_VARIANT,
                 self.configuration.name]
        return "__".join(re.sub(r"[^A-Za-z0-9._-]", "_", p) for p in parts)

    @property
    def config(self) -> dict[str, Any]:
        """The world configuration (the scenario ``config:`` mapping) of this cell."""
        cfg: dict[str, Any] = {"cpu": self.profile}
        if self.kernel is not None:
            cfg["kernel"] = self.kernel
        cfg.update(self.configuration.settings)
        return cfg

    def job(self) -> Job:
        return Job(self.model, self.config, self.variant)

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "model": self.model, "profile": self.profile,
                "kernel": self.kernel, "variant": self.variant,
                "configuration": self.configuration.name,
                "config": self.config,
                "actions": list(self.configuration.actions)
                if self.configuration.actions is not None else None}


@dataclass(frozen=True, slots=True)
class Exploration:
    mode: str
    depth: int = 4
    stop: str = "bound"
    seeds: tuple[int, ...] = (0,)
    walks: int = 10
    walk_length: int = 30


@dataclass(frozen=True, slots=True)
class Budget:
    states: int | None = None
    seconds: float | None = None


@dataclass(frozen=True, slots=True)
class Campaign:
    name: str
    model: str
    cells: tuple[Cell, ...]
    explore: Exploration
    budget: Budget = field(default_factory=Budget)
    description: str = ""
    path: str = ""
    source: str = ""  #: the YAML text, kept in the report so that it can be resumed alone

    @property
    def fingerprint(self) -> str:
        """A hash of what determines the results (the parsed matrix and settings)."""
        doc = {"model": self.model, "cells": [c.describe() for c in self.cells],
               "explore": _asdict(self.explore), "budget": _asdict(self.budget)}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _asdict(obj: Any) -> dict[str, Any]:
    return {k: getattr(obj, k) for k in obj.__slots__}


# -- parsing ---------------------------------------------------------------------------------


def load(path: str | Path) -> Campaign:
    """Read and validate a campaign file (CampaignError: one line naming the field)."""
    p = Path(path)
    try:
        text = read_text(p)
    except (OSError, UnicodeDecodeError) as e:
        raise CampaignError(f"{p}: {reason(e)}") from None
    return loads(text, str(p))


def loads(text: str, path: str = "<campaign>") -> Campaign:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise CampaignError(f"{path}: bad YAML{where}: {problem}") from None
    return parse(doc, path, text)


def parse(doc: Any, path: str = "<campaign>", source: str = "") -> Campaign:
    """Validate a loaded YAML document and expand its matrix into cells."""

    def fail(where: str, msg: str) -> CampaignError:
        return CampaignError(f"{path}: {where}: {msg}")

    if not isinstance(doc, Mapping):
        raise CampaignError(f"{path}: a campaign is a YAML mapping, not {_kind(doc)}")
    _no_unknown(doc, TOP_KEYS, "", fail)
    name = doc.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise fail("name", "required: letters, digits, '.', '_' or '-' "
                   f"(got {name!r})")
    description = doc.get("description", "")
    if not isinstance(description, str):
        raise fail("description", f"must be text, not {_kind(description)}")
    model = doc.get("model", "x86")
    if not isinstance(model, str) or model not in MODELS:
        raise fail("model", f"unknown model {model!r} (known: {', '.join(MODELS)})")
    cls = world_class(model)

    matrix = doc.get("matrix")
    if not isinstance(matrix, Mapping):
        raise fail("matrix", f"required: a mapping with {', '.join(MATRIX_KEYS)}")
    _no_unknown(matrix, MATRIX_KEYS, "matrix.", fail)
    profiles = _profiles(model, matrix.get("profiles"), fail)
    kernels = _kernels(model, cls, matrix.get("kernels"), fail)
    variants = _variants(model, matrix.get("variants", [NO_VARIANT]), fail)
    configurations = _configurations(cls, matrix.get("configurations"), fail)

    explore = _explore(doc.get("explore"), fail)
    budget = _budget(doc.get("budget"), fail)
    cells = tuple(Cell(model, p, k, v, c) for p in profiles for k in kernels for v in variants
                  for c in configurations)
    return Campaign(name, model, cells, explore, budget, description, path, source)


def _kind(x: Any) -> str:
    return "nothing" if x is None else type(x).__name__


def _no_unknown(doc: Mapping[str, Any], keys: Sequence[str], prefix: str, fail: Any) -> None:
    for k in doc:
        if k not in keys:
            raise fail(f"{prefix}{k}", f"unknown key (keys: {', '.join(keys)})")


def _names(raw: Any, where: str, fail: Any) -> list[Any]:
    """A list of names (a single name is a list of one)."""
    if isinstance(raw, (str, int, float)) and not isinstance(raw, bool):
        return [raw]
    if not isinstance(raw, list) or not raw:
        raise fail(where, f"must be a name or a non-empty list of names, not {_kind(raw)}")
    return list(raw)


def _profiles(model: str, raw: Any, fail: Any) -> list[str]:
    if model == "x86":
        from fpstate.x86.profiles import list_profiles
        known = list_profiles()
    else:
        from fpstate.arm64.cpu import bundled_profile_names
        known = bundled_profile_names()
    if raw is None:
        raise fail("matrix.profiles", f"required: 'all' or a list of {', '.join(known)}")
    if raw == "all":
        return known
    out = []
    for n, p in enumerate(_names(raw, "matrix.profiles", fail)):
        if not isinstance(p, str) or p not in known:
            raise fail(f"matrix.profiles[{n}]", f"unknown {model} profile {p!r} (bundled: "
                       f"{', '.join(known)})")
        out.append(p)
    return _unique(out, "matrix.profiles", fail)


def _kernels(model: str, cls: Any, raw: Any, fail: Any) -> list[str | None]:
    if "kernel" not in cls.CONFIG_KEYS:
        if raw is not None:
            raise fail("matrix.kernels", f"model {model} has no kernel versions")
        return [None]
    from fpstate.kernel.x86.versions import NEWEST, VERSION_NAMES
    if raw is None:
        return [NEWEST]
    if raw == "all":
        return list(VERSION_NAMES)
    out: list[str | None] = []
    for n, k in enumerate(_names(raw, "matrix.kernels", fail)):
        # YAML reads 6.1 as a float and 6.10 as 6.1: only strings are unambiguous.
        if not isinstance(k, str):
            raise fail(f"matrix.kernels[{n}]", f"write the version as a string ('{k}'): YAML "
                       "reads 6.10 as 6.1")
        if k not in VERSION_NAMES:
            raise fail(f"matrix.kernels[{n}]", f"unknown kernel version {k!r} (known: "
                       f"{', '.join(VERSION_NAMES)})")
        out.append(k)
    return _unique(out, "matrix.kernels", fail)


def _variants(model: str, raw: Any, fail: Any) -> list[str | None]:
    of_model = [v.name for v in variant_registry.VARIANTS if v.model == model]
    seeds = [v for v in variant_registry.SEED_VARIANTS if v in of_model]
    out: list[str | None] = []
    for n, v in enumerate(_names(raw, "matrix.variants", fail)):
        where = f"matrix.variants[{n}]"
        if not isinstance(v, str):
            raise fail(where, f"must be a variant name, not {_kind(v)}")
        if v == NO_VARIANT:
            out.append(None)
        elif v == "seeds":
            out.extend(seeds)
        elif v == "all":
            out.extend(of_model)
        elif v not in variant_registry.BY_NAME:
            raise fail(where, f"unknown variant {v!r} (known: none, seeds, all, "
                       f"{', '.join(variant_registry.BY_NAME)})")
        elif variant_registry.BY_NAME[v].model != model:
            raise fail(where, f"{v} is a variant of model "
                       f"{variant_registry.BY_NAME[v].model}, the campaign's is {model}")
        else:
            out.append(v)
    return list(dict.fromkeys(out))


def _configurations(cls: Any, raw: Any, fail: Any) -> list[Configuration]:
    if not isinstance(raw, list) or not raw:
        raise fail("matrix.configurations", "required: a non-empty list of named "
                   "configurations")
    allowed = [k for k in cls.CONFIG_KEYS if k not in ("cpu", "kernel")]
    out = []
    for n, entry in enumerate(raw):
        where = f"matrix.configurations[{n}]"
        if not isinstance(entry, Mapping):
            raise fail(where, f"must be a mapping, not {_kind(entry)}")
        name = entry.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise fail(f"{where}.name", f"required: letters, digits, '.', '_' or '-' "
                       f"(got {name!r})")
        settings: dict[str, Any] = {}
        actions: tuple[str, ...] | None = None
        for k, v in entry.items():
            if k == "name":
                continue
            if k == "actions":
                actions = _actions(cls, v, f"{where}.actions", fail)
            elif k in ("cpu", "kernel"):
                raise fail(f"{where}.{k}", f"comes from the matrix (matrix.{k}s)")
            elif k not in allowed:
                raise fail(f"{where}.{k}", f"unknown configuration key for model {cls.model} "
                           f"(keys: name, actions, {', '.join(allowed)})")
            else:
                settings[k] = v
        out.append(Configuration(name, settings, actions))
    names = [c.name for c in out]
    dup = next((x for x in names if names.count(x) > 1), None)
    if dup is not None:
        raise fail("matrix.configurations", f"two configurations are named {dup!r}")
    return out


def _actions(cls: Any, raw: Any, where: str, fail: Any) -> tuple[str, ...]:
    names = _names(raw, where, fail)
    for n, a in enumerate(names):
        if not isinstance(a, str) or a not in cls.SPECS:
            raise fail(f"{where}[{n}]", f"unknown action {a!r} of model {cls.model} "
                       f"(known: {', '.join(sorted(cls.SPECS))})")
    return tuple(dict.fromkeys(names))


def _int(raw: Any, where: str, fail: Any, low: int = 0) -> int:
    if not isinstance(raw, int) or isinstance(raw, bool) or raw < low:
        raise fail(where, f"must be an integer >= {low}, not {raw!r}")
    return raw


def _explore(raw: Any, fail: Any) -> Exploration:
    if not isinstance(raw, Mapping):
        raise fail("explore", "required: a mapping with 'mode' (exhaustive or random)")
    _no_unknown(raw, EXPLORE_KEYS, "explore.", fail)
    mode = raw.get("mode")
    if not isinstance(mode, str) or mode not in MODES:
        raise fail("explore.mode", f"must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "exhaustive":
        for k in ("seeds", "walks", "walk_length"):
            if k in raw:
                raise fail(f"explore.{k}", "only for mode random")
        if "depth" not in raw:
            raise fail("explore.depth", "required for mode exhaustive (the bound in actions)")
        depth = _int(raw["depth"], "explore.depth", fail, 1)
        stop = raw.get("stop", "bound")
        if not isinstance(stop, str) or stop not in STOPS:
            raise fail("explore.stop", f"must be one of {', '.join(STOPS)}, not {stop!r}")
        return Exploration("exhaustive", depth=depth, stop=stop)
    for k in ("depth", "stop"):
        if k in raw:
            raise fail(f"explore.{k}", "only for mode exhaustive")
    seeds = _seeds(raw.get("seeds", [0]), fail)
    return Exploration("random", seeds=seeds,
                       walks=_int(raw.get("walks", 10), "explore.walks", fail, 1),
                       walk_length=_int(raw.get("walk_length", 30), "explore.walk_length",
                                        fail, 1))


def _seeds(raw: Any, fail: Any) -> tuple[int, ...]:
    if isinstance(raw, Mapping):
        _no_unknown(raw, ("first", "count"), "explore.seeds.", fail)
        first = _int(raw.get("first", 0), "explore.seeds.first", fail)
        count = _int(raw.get("count"), "explore.seeds.count", fail, 1)
        return tuple(range(first, first + count))
    if not isinstance(raw, list) or not raw:
        raise fail("explore.seeds", "must be a list of integers or {first: N, count: N}")
    out = [_int(s, f"explore.seeds[{n}]", fail) for n, s in enumerate(raw)]
    return tuple(_unique(out, "explore.seeds", fail))


def _budget(raw: Any, fail: Any) -> Budget:
    if raw is None:
        return Budget()
    if not isinstance(raw, Mapping):
        raise fail("budget", f"must be a mapping with {', '.join(BUDGET_KEYS)}")
    _no_unknown(raw, BUDGET_KEYS, "budget.", fail)
    states = _int(raw["states"], "budget.states", fail, 1) if "states" in raw else None
    seconds = raw.get("seconds")
    if seconds is not None and (isinstance(seconds, bool)
                                or not isinstance(seconds, (int, float)) or seconds <= 0):
        raise fail("budget.seconds", f"must be a positive number, not {seconds!r}")
    return Budget(states, float(seconds) if seconds is not None else None)


def _unique(items: list[Any], where: str, fail: Any) -> list[Any]:
    dup = next((x for x in items if items.count(x) > 1), None)
    if dup is not None:
        raise fail(where, f"{dup!r} is listed twice")
    return items


# -- checking the worlds ---------------------------------------------------------------------


def check_worlds(campaign: Campaign) -> None:
    """Boot the world of every configuration once (on its first profile and kernel, without a
    variant): a configuration the model refuses (a VMM task that does not exist) is a
    CampaignError naming it, before any cell runs."""
    from fpstate.check.scenario import make_world

    seen: set[str] = set()
    for cell in campaign.cells:
        c = cell.configuration
        if c.name in seen:
            continue
        seen.add(c.name)
        n = next(i for i, x in enumerate(_configs(campaign)) if x.name == c.name)
        try:
            make_world(cell.model, cell.config, None)
        except (StepError, FpstateError) as e:
            raise CampaignError(f"{campaign.path}: matrix.configurations[{n}] ({c.name}): "
                                f"{e}") from None
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise CampaignError(f"{campaign.path}: matrix.configurations[{n}] ({c.name}): "
                                f"the model cannot boot it: {type(e).__name__}: {e}") from None


def _configs(campaign: Campaign) -> list[Configuration]:
    """The configurations in the order of the file."""
    return list({c.configuration.name: c.configuration for c in campaign.cells}.values())


__all__ = ["NO_VARIANT", "Budget", "Campaign", "CampaignError", "Cell", "Configuration",
           "Exploration", "check_worlds", "load", "loads", "parse"]
