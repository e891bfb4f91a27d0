"""The report directory as the campaign's memory: interrupt a campaign, resume it later.

Layout of a report directory::

    campaign.yaml            the campaign file as it was run (so the directory resumes alone)
    campaign.json            name, fingerprint, engine, cells (id and status), totals
    summary.md, plots/*.png  the summary (report.py), rewritten after every cell
    cells/<cell id>/cell.json                 a finished cell (written last, atomically)
    cells/<cell id>/violations/<invariant>.yaml   its shrunk counterexamples
    cells/<cell id>/errors/<n>.yaml               paths on which the model crashed
    cells/<cell id>/spill/p<N>.digests        the visited digests while the cell runs

A cell is finished exactly when its ``cell.json`` exists: it is written after its scenario
files, through a temporary file and a rename, so an interrupted campaign (Ctrl-C, a killed
driver, a lost machine) loses at most the cells that were running. Running the same campaign
with the same report directory skips the finished cells; a directory that holds another
campaign (another fingerprint: the matrix or the exploration settings changed) is refused
rather than mixed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from fpstate.campaign.campaign import Campaign, CampaignError, loads

CAMPAIGN_FILE = "campaign.yaml"
INDEX_FILE = "campaign.json"
CELL_FILE = "cell.json"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` so that ``path`` is either absent, the old file, or complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_report_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / CAMPAIGN_FILE).is_file() and (p / INDEX_FILE).is_file()


def load_from_report(path: str | Path) -> Campaign:
    """The campaign a report directory was made by (``fpstate campaign DIR`` resumes it)."""
    p = Path(path)
    try:
        text = (p / CAMPAIGN_FILE).read_text()
    except OSError as e:
        raise CampaignError(f"{p}: not a campaign report directory ({e.strerror})") from None
    return loads(text, str(p / CAMPAIGN_FILE))


class ReportDir:
    """A campaign's report directory (see the module docstring)."""

    def __init__(self, root: str | Path, campaign: Campaign, *, fresh: bool = False) -> None:
        self.root = Path(root)
        self.campaign = campaign
        index = self.root / INDEX_FILE
        if index.is_file():
            try:
                old = json.loads(index.read_text())
            except (OSError, ValueError) as e:
                raise CampaignError(f"{index}: unreadable ({e}); use another --report") from None
            if old.get("fingerprint") != campaign.fingerprint and not fresh:
                raise CampaignError(
                    f"{self.root}: holds the report of campaign {old.get('name')!r} "
                    f"(fingerprint {old.get('fingerprint')}, this one is "
                    f"{campaign.fingerprint}): use another --report, or --fresh to replace it")
        elif self.root.exists() and any(self.root.iterdir()) and not fresh:
            raise CampaignError(f"{self.root}: exists and is not a campaign report directory; "
                                "use another --report")
        if fresh and self.root.exists():
            for sub in ("cells", "plots"):
                shutil.rmtree(self.root / sub, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.root / CAMPAIGN_FILE, campaign.source or _regenerate(campaign))
        if fresh or not index.is_file():
            self.write_index({"name": campaign.name, "fingerprint": campaign.fingerprint,
                              "cells": []})

    def cell_dir(self, cell_id: str) -> Path:
        return self.root / "cells" / cell_id

    def spill_dir(self, cell_id: str) -> Path:
        return self.cell_dir(cell_id) / "spill"

    def finished(self) -> dict[str, dict[str, Any]]:
        """The finished cells' reports, by cell id (cells of this campaign only)."""
        out = {}
        ids = {c.id for c in self.campaign.cells}
        for cid in ids:
            f = self.cell_dir(cid) / CELL_FILE
            if f.is_file():
                try:
                    out[cid] = json.loads(f.read_text())
                except ValueError:
                    continue
        return out

    def begin_cell(self, cell_id: str) -> Path:
        """Clear what an interrupted run of the cell left and return its directory."""
        d = self.cell_dir(cell_id)
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        return d

    def write_file(self, cell_id: str, rel: str, text: str) -> str:
        """A file of a cell (a scenario); its path relative to the report root."""
        path = self.cell_dir(cell_id) / rel
        write_atomic(path, text)
        return str(path.relative_to(self.root))

    def finish_cell(self, cell_id: str, report: dict[str, Any]) -> None:
        shutil.rmtree(self.spill_dir(cell_id), ignore_errors=True)
        write_atomic(self.cell_dir(cell_id) / CELL_FILE, json.dumps(report, indent=1) + "\n")

    def write_index(self, index: dict[str, Any]) -> None:
        write_atomic(self.root / INDEX_FILE, json.dumps(index, indent=1) + "\n")


def _regenerate(campaign: Campaign) -> str:
    raise CampaignError(f"{campaign.path}: campaign without its source text cannot be "
                        "stored for resuming (load it with fpstate.campaign.campaign.load)")


__all__ = ["CAMPAIGN_FILE", "CELL_FILE", "INDEX_FILE", "ReportDir", "is_report_dir",
           "load_from_report", "write_atomic"]
