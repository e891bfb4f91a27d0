"""Shared campaigns for the campaign tests (fixtures: importlib mode has no test imports).

``small(depth, ...)`` is campaigns/small.yaml (Sapphire Rapids, one CPU, one task that is the
VMM of one vCPU) with another bound and variants: at depth 2 the kernel's design has 43 states
and the seed-004 variant (pasid-write-incoherent) one violating transition, found in 2 steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from fpstate.campaign.campaign import Campaign, parse

ROOT = Path(__file__).resolve().parents[2]
SMALL = ROOT / "campaigns" / "small.yaml"


def small(depth: int = 2, variants: list[str] | None = None, **explore: Any) -> Campaign:
    doc = yaml.safe_load(SMALL.read_text())
    doc["explore"] = {"mode": "exhaustive", "depth": depth, **explore}
    if variants is not None:
        doc["matrix"]["variants"] = variants
    text = yaml.safe_dump(doc)
    return parse(yaml.safe_load(text), "small-test.yaml", text)


def random_small(seeds: list[int], walks: int = 4, walk_length: int = 8,
                 variants: list[str] | None = None) -> Campaign:
    doc = yaml.safe_load(SMALL.read_text())
    doc["explore"] = {"mode": "random", "seeds": seeds, "walks": walks,
                      "walk_length": walk_length}
    if variants is not None:
        doc["matrix"]["variants"] = variants
    text = yaml.safe_dump(doc)
    return parse(yaml.safe_load(text), "small-random.yaml", text)


def outcome_facts(cells: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What must not depend on the engine: per cell, the counts and every violation with its
    counterexample."""
    return [(c["cell"]["id"], c["states"], c["transitions"], c["illegal"], c.get("levels"),
             tuple(sorted(c["coverage"].items())),
             tuple((v["invariant"], v["count"], tuple(v["path"])) for v in c["violations"]),
             c["complete"], c["stopped_by"])
            for c in cells]


@pytest.fixture(scope="session")
def campaigns() -> Any:
    """The builders: ``campaigns.small(depth, variants)``, ``campaigns.random_small(seeds)``,
    ``campaigns.facts(cells)``."""
    from types import SimpleNamespace

    return SimpleNamespace(small=small, random_small=random_small, facts=outcome_facts,
                           root=ROOT)
