"""``fpstate variants``, ``fpstate explore``, ``fpstate check`` and the counterexample picture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fpstate.check import scenario as scn
from fpstate.check.timeline import draw, plot_paths
from fpstate.check.variants import SEED_VARIANTS, UNFIXED_VARIANTS, VARIANTS
from fpstate.check.world import Action
from fpstate.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_variants_lists_one_line_each(capsys: pytest.CaptureFixture) -> None:
    assert main(["variants"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(VARIANTS)
    for name in SEED_VARIANTS:
        line = next(x for x in lines if x.startswith(name))
        assert "breaks " in line and "seed 00" in line and "some runs only" not in line
    rare = next(x for x in lines if x.startswith("sigreturn-za-without-sve-state"))
    assert rare.endswith("(the explorer reaches it in some runs only)")
    assert main(["variants", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {d["name"] for d in data} == {v.name for v in VARIANTS}
    rare = {d["name"] for d in data if not d["explorer_finds"]}
    assert rare == {"sigreturn-za-without-sve-state", "sigreturn-sm-without-tif-sme"}
    assert not rare & set(SEED_VARIANTS)
    # what a variant's search leaves out of the default configuration is shown with it
    uabi = next(d for d in data if d["name"] == "uabi-mxcsr-by-ymm")
    assert uabi["config"]["vms"] == {} and "fork" not in uabi["config"]["omit"]


def test_explore_json_writes_a_runnable_counterexample(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cx.yaml"
    rc = main(["explore", "--variant", "pasid-write-incoherent", "--seconds", "30",
               "--workers", "1", "--json", "--out", str(out)])
    assert rc == 1
    data = json.loads(capsys.readouterr().out)
    assert set(data) >= {"violations", "states", "transitions", "seconds"}
    (v,) = data["violations"]
    assert v["invariant"] == "valid-registers-match-memory"
    assert v["scenario_file"] == str(out) and v["steps"] >= 2
    s = scn.load(out)
    assert s.variants == {"pasid-write-incoherent": "valid-registers-match-memory"}
    assert main(["run", str(out), "--variant", "pasid-write-incoherent"]) == 1
    assert main(["run", str(out)]) == 0


def test_explore_without_violation_prints_coverage(capsys: pytest.CaptureFixture) -> None:
    assert main(["explore", "--model", "arm64", "--seconds", "2", "--workers", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("no violation: model arm64 (the kernel's design, cpu fvp-aem-fpmr)")
    assert out[1].split()[0] == "states" and int(out[1].split()[1]) > 0


def test_explore_names_the_proposed_fixes_and_finds_linux_6_18_without_them(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The default x86 configuration runs Linux 6.18 with the proposed fixes of
    kernel-findings 10 and 6 and 6.19's fix of guest XFD (b45f72177594), and says so; without
    them the explorer finds the suspending
    task's PKRU 0 in two steps, a scenario that fails under the kernel as released; with
    autosleep configured, in one step the worker's suspend that makes fpu__resume_cpu()
    dereference x86_task_fpu()'s NULL for a kernel thread (10d)."""
    assert main(["explore", "--seconds", "1", "--workers", "1"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("no violation: model x86 (the kernel's design, cpu "
                            "sapphire-rapids, proposed fixes resume_pkru, resume_xfd_set_state, "
                            "mxcsr_by_format, mxcsr_flip_inits_xmm, guest_xfd_host_write, later "
                            "fixes guest_xfd_clears_xstate_bv)")
    out = tmp_path / "cx.yaml"
    assert main(["explore", "--config", "{fixes: []}", "--seconds", "30", "--workers", "1",
                 "--json", "--out", str(out)]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["fixes"] == []
    (v,) = data["violations"]
    assert (v["invariant"], v["steps"]) == ("no-lost-write", 2)
    s = scn.load(out)
    # a task put on CPU 0 (run, or switch_in: which one depends on the walks), then suspend
    first, second = (step.action.name for step in s.steps)
    assert first in ("run", "switch_in") and second == "suspend"
    assert main(["run", str(out)]) == 1
    capsys.readouterr()
    assert main(["explore", "--config", "{fixes: [], autosleep: true}", "--seconds", "30",
                 "--workers", "1", "--json", "--out", str(out)]) == 1
    (v,) = json.loads(capsys.readouterr().out)["violations"]
    assert (v["invariant"], v["steps"]) == ("kernel-warn", 1)
    assert v["detail"].startswith("x86-task-fpu-kthread: fpu__resume_cpu() on ")
    s = scn.load(out)
    assert [(step.action.name, step.action.get("autosleep")) for step in s.steps] == [
        ("suspend", True)]


def test_explore_rejects_a_variant_of_another_model(capsys: pytest.CaptureFixture) -> None:
    assert main(["explore", "--model", "x86", "--variant", "fpmr-ungated"]) == 2
    assert "variant of model arm64" in capsys.readouterr().err


def test_explore_config_merges_keys_over_the_default(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    """--config: a 32-bit p0 (inline), then a world of one 32-bit process from a file, where
    the variant of ia32 sigreturn is found; the scenario it writes keeps that configuration
    and runs."""
    assert main(["explore", "--config", "{compat: [p0], cpus: 1}", "--seconds", "2",
                 "--workers", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["violations"] == [] and res["per_action"]["sigreturn"] > 0
    cfg = tmp_path / "c.yaml"
    cfg.write_text("processes: {p0: 1}\ncompat: [p0]\nvms: {}\n")
    out = tmp_path / "cx.yaml"
    assert main(["explore", "--variant", "ia32-sigreturn-no-supervisor-save", "--config",
                 str(cfg), "--seconds", "30", "--workers", "1", "--out", str(out)]) == 1
    capsys.readouterr()
    s = scn.load(out)
    assert s.config["compat"] == ["p0"] and s.config["processes"] == {"p0": 1}
    assert main(["run", str(out), "--variant", "ia32-sigreturn-no-supervisor-save"]) == 1


@pytest.mark.parametrize("text,message", [
    ("{compat: [p9]}", "config.compat: 'p9' is not a process of config.processes"),
    ("[1, 2]", "--config: must be a mapping of configuration keys, not [1, 2]"),
    ("{compat: [p0", "--config: not YAML"),
    ("{nosuch: 1}", "config: unknown key 'nosuch' for model x86"),
])
def test_explore_config_errors_are_one_line(text: str, message: str,
                                            capsys: pytest.CaptureFixture) -> None:
    assert main(["explore", "--config", text, "--seconds", "1", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_plot_writes_png_and_svg(tmp_path: Path) -> None:
    report = scn.run(scn.load(ROOT / "scenarios" / "seed-004-pasid-write.yaml"),
                     "pasid-write-incoherent", frames=True)
    assert [f.violation for f in report.frames][-1] == "valid-registers-match-memory"
    both = draw(report.frames, str(tmp_path / "t"), "seed 004")
    assert [p.suffix for p in both] == [".png", ".svg"]
    assert both[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = both[1].read_text()
    assert "valid-registers-match-memory" in svg and "<svg" in svg
    assert plot_paths(str(tmp_path / "x.svg")) == [tmp_path / "x.svg"]


def test_run_plot_option(tmp_path: Path) -> None:
    target = tmp_path / "seed0.png"
    assert main(["run", str(ROOT / "scenarios" / "seed-000-kvm-save-min-size.yaml"),
                 "--variant", "kvm-save-min-size", "--plot", str(target)]) == 1
    assert target.exists() and target.stat().st_size > 10_000


def test_check_runs_everything_and_prints_one_table(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    rc = main(["check", "--seconds", "1", "--budget", "60", "--no-conform", "--json",
               "--workers", "1", "--out", str(tmp_path)])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0, [r for r in data["rows"] if not r["ok"]]
    kinds = [r["kind"] for r in data["rows"]]
    assert kinds.count("variant") == len(SEED_VARIANTS) + len(UNFIXED_VARIANTS)
    assert kinds.count("scenario") >= 10 and "explore" in kinds
    keys = [r for r in data["rows"] if r["kind"] == "keys"]
    assert {r["cpu"] for r in keys} >= {"sapphire-rapids", "fvp-aem-fpmr"}
    assert all(r["outcome"].endswith("pairs of histories compared, no mismatch") for r in keys)
    assert {p.name for p in tmp_path.glob("*.yaml")} == {
        f"{v}.yaml" for v in SEED_VARIANTS + UNFIXED_VARIANTS}


#: sigframe-magic2-at-user-size's counterexample before shrinking (found by fpstate explore).
MAGIC2_PATH = (
    Action.of("switch_in", cpu=0, task="p0.t0"), Action.of("return_to_user", cpu=0),
    Action.of("sigaction", onstack=True, task="p0.t0"),
    Action.of("write", component="x87", task="p0.t0"),
    Action.of("write", component="pkru", task="p0.t0"), Action.of("signal", task="p0.t0"),
    Action.of("ldmxcsr", task="p0.t0"), Action.of("frame_resize", task="p0.t0"),
    Action.of("ldmxcsr", task="p0.t0"), Action.of("frame_clear", component="x87", task="p0.t0"),
    Action.of("sigreturn", task="p0.t0"))


def _old_frame_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Put back the signal-frame key of before session 24: x87 and SSE bytes outside the
    frame's XSTATE_BV left out of it."""
    from fpstate.check import statekey

    real = statekey._frame_values

    def old_key(system, data, lo, kind):
        if statekey.FRAME_SC.get(kind) is None:  # a 64-bit frame
            at = statekey.SC_FPSTATE_OFFSET
            fp = int.from_bytes(data[at:at + 8], "little") - lo
            if 0 <= fp and fp + 576 <= len(data):
                bv = int.from_bytes(data[fp + 512:fp + 520], "little")
                b = bytearray(data)
                if not bv & 1:
                    b[fp:fp + 24] = bytes(24)
                    b[fp + 32:fp + 160] = bytes(128)
                if not bv & 2:
                    b[fp + 160:fp + 416] = bytes(256)
                data = bytes(b)
        return real(system, data, lo, kind)

    monkeypatch.setattr(statekey, "_frame_values", old_key)
    monkeypatch.setattr(statekey, "_FRAMES", {})


def test_audited_shrinking_catches_the_old_frame_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shrinking sigframe-magic2-at-user-size's counterexample with every memo answer
    recomputed: with the old frame key a sigreturn's successor differs from the one the memo
    holds for the same key; with the current key no answer is contradicted."""
    from fpstate.check import variants as vreg
    from fpstate.check.explore import Job, default_config, shrink
    from fpstate.check.world import audited_memos

    v = vreg.get("sigframe-magic2-at-user-size")
    job = Job("x86", {**default_config("x86"), **v.config}, v.name)
    with audited_memos() as contradicted:
        shrink(job, MAGIC2_PATH, "no-lost-write")
    assert contradicted == []
    _old_frame_key(monkeypatch)
    with audited_memos() as contradicted:
        shrink(job, MAGIC2_PATH, "no-lost-write")
    assert contradicted and contradicted[0].kind == "successor"
    assert contradicted[0].second[-1] == Action.of("sigreturn", task="p0.t0")


def test_check_fails_a_variant_row_whose_shrinking_contradicts_the_memo(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fpstate check` shrinks each variant's counterexample audited: with the old frame key,
    sigframe-magic2-at-user-size's row fails and names the contradiction, though the variant
    is found (the search is given its counterexample, so that the row does not depend on
    where a timed search stops)."""
    from collections import Counter

    from fpstate.check.executor import SerialExecutor
    from fpstate.check.explore import Found, Result
    from fpstate.commands import check as check_cmd

    def found(job, ex, **kw):
        return Result(job, "random", 11, 11, 0.1, Counter(),
                      found=Found("no-lost-write", "x87", MAGIC2_PATH, ("no-lost-write",)))

    monkeypatch.setattr(check_cmd, "explore", found)
    (row,) = check_cmd.check_variants(SerialExecutor(), 60.0, tmp_path, "sapphire-rapids",
                                      ("sigframe-magic2-at-user-size",))
    assert row.ok and "found no-lost-write" in row.outcome
    _old_frame_key(monkeypatch)
    (row,) = check_cmd.check_variants(SerialExecutor(), 60.0, tmp_path, "sapphire-rapids",
                                      ("sigframe-magic2-at-user-size",))
    assert not row.ok and "found no-lost-write" in row.outcome
    assert "MEMO CONTRADICTED (successor)" in row.outcome
