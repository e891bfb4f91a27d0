"""Reports (per-cell JSON, counterexample scenarios, summary with plots) and resuming an
interrupted campaign from its report directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fpstate.campaign.campaign import CampaignError
from fpstate.campaign.engines import LocalEngine
from fpstate.campaign.resume import CELL_FILE, is_report_dir, load_from_report
from fpstate.campaign.runner import run_campaign
from fpstate.check import scenario as scn
from fpstate.cli import main


@pytest.fixture(scope="module")
def finished(campaigns, tmp_path_factory):
    """The small campaign at depth 2 (kernel's design, seed 004), run once in one process."""
    c = campaigns.small(2, ["none", "pasid-write-incoherent"])
    root = tmp_path_factory.mktemp("report")
    return c, run_campaign(c, LocalEngine(1), str(root / "r")), root / "r"


def test_cell_report_holds_counts_coverage_and_violations(finished) -> None:
    c, out, root = finished
    assert out.ran == 2 and out.total == 2
    kernel, pasid = (json.loads((root / "cells" / cell.id / CELL_FILE).read_text())
                     for cell in c.cells)
    assert kernel == out.cells[0]
    assert kernel["cell"]["variant"] is None and kernel["expected"] is None
    assert kernel["caught"] is None
    assert kernel["states"] == sum(kernel["levels"]) and kernel["depth"] == 2
    assert kernel["transitions"] == sum(kernel["coverage"].values())
    assert "run" in kernel["coverage"] and "sigreturn" in kernel["not_covered"]
    assert kernel["complete"] and kernel["stopped_by"] == "bound"
    assert pasid["expected"] == "valid-registers-match-memory" and pasid["caught"] is True
    (v,) = pasid["violations"]
    assert v["count"] == 1 and v["steps"] == 2 and v["path"][-1].startswith("pasid_write(")


def test_counterexample_scenario_replays_the_violation(finished) -> None:
    _, out, root = finished
    v = out.cells[1]["violations"][0]
    s = scn.load(root / v["scenario"])
    assert s.variants == {"pasid-write-incoherent": "valid-registers-match-memory"}
    # Loading fills in the fields left at their defaults (pasid_write's pasid=1).
    assert [step.action.name for step in s.steps] == [x.split("(")[0] for x in v["path"]]
    report = scn.run(s, "pasid-write-incoherent")
    assert report.violation is not None
    assert report.violation[1].invariant == "valid-registers-match-memory"
    assert scn.run(s, None).violation is None  # the kernel's design survives the same steps


def test_summary_and_plots(finished) -> None:
    c, _, root = finished
    text = (root / "summary.md").read_text()
    assert text.startswith("# Campaign small\n")
    assert "| pasid-write-incoherent (valid-registers-match-memory) | yes (2) |" in text
    for cell in c.cells:
        assert f"`{cell.id}`" in text
    for name in ("states", "levels", "violations"):
        png = root / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(plots/{name}.png)" in text
    index = json.loads((root / "campaign.json").read_text())
    assert index["fingerprint"] == c.fingerprint
    assert [x["status"] for x in index["cells"]] == ["done", "done"]
    assert is_report_dir(root) and load_from_report(root).fingerprint == c.fingerprint


def test_interrupted_campaign_resumes_without_losing_finished_cells(finished, campaigns,
                                                                   tmp_path: Path) -> None:
    c, ref, _ = finished
    root = tmp_path / "r"

    def interrupt(event: str, info: dict) -> None:
        if event == "round" and info["level"] == 1 and info.get("new") is not None \
                and len(list((root / "cells").glob(f"*/{CELL_FILE}"))) == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_campaign(c, LocalEngine(1), str(root), progress=interrupt)
    index = json.loads((root / "campaign.json").read_text())
    assert [x["status"] for x in index["cells"]] == ["done", "pending"]
    assert (root / "summary.md").is_file()
    # The second cell left its directory without a cell.json: it is run again, alone.
    assert (root / "cells" / c.cells[1].id).is_dir()
    assert not (root / "cells" / c.cells[1].id / CELL_FILE).exists()
    started = []
    out = run_campaign(c, LocalEngine(1), str(root),
                       progress=lambda e, i: started.append(i["id"]) if e == "cell-start"
                       else None)
    assert started == [c.cells[1].id] and out.ran == 1
    assert campaigns.facts(out.cells) == campaigns.facts(ref.cells)


def test_a_report_of_another_campaign_is_refused(finished, campaigns) -> None:
    _, _, root = finished
    other = campaigns.small(3, ["none", "pasid-write-incoherent"])
    with pytest.raises(CampaignError, match=r"holds the report of campaign .small.*--fresh"):
        run_campaign(other, LocalEngine(1), str(root))


def test_command_resumes_from_the_report_directory(finished, capsys) -> None:
    _, ref, root = finished
    assert main(["campaign", str(root), "--json"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert [c["states"] for c in doc["cells"]] == [c["states"] for c in ref.cells]
    assert "0 cells run, 2 already finished" in captured.err
    assert "violations under the kernel's design: 0, under variants: 1" in captured.err


def test_command_runs_a_file_into_a_new_report(campaigns, tmp_path: Path, capsys) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(campaigns.small(1, ["init-keeps-cet"]).source)
    assert main(["campaign", str(f), "--report", str(tmp_path / "r"), "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "campaign small: 1 cells, exhaustive, on local, 1 worker" in err
    assert "[1/1] sapphire-rapids__6.18__init-keeps-cet__1cpu-1task-1vcpu: 4 states" in err
    assert "(expected init-clears-architectural: NOT found)" in err
