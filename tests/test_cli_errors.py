"""Numeric arguments out of range and output paths that cannot be written are one-line errors
with exit status 2 (a negative time budget used to run the explorer anyway, a negative depth
to report an empty search as complete, an unwritable --plot was a traceback)."""

from __future__ import annotations

import pytest

from fpstate.cli import main

SECONDS = "is not a positive number of seconds"
CASES = [
    (["explore", "--seconds", "0"], f"argument --seconds: 0 {SECONDS}"),
    (["explore", "--seconds", "-1"], f"argument --seconds: -1 {SECONDS}"),
    (["explore", "--seconds", "inf"], f"argument --seconds: inf {SECONDS}"),
    (["explore", "--seconds", "soon"], "argument --seconds: 'soon' is not a number"),
    (["explore", "--workers", "0"], "argument --workers: 0 is not at least 1"),
    (["explore", "--mode", "exhaustive", "--depth", "-1"],
     "argument --depth: -1 is not at least 1"),
    (["check", "--budget", "0"], f"argument --budget: 0 {SECONDS}"),
    (["check", "--samples", "2.5"], "argument --samples: '2.5' is not an integer"),
    (["check", "--key-walks", "0"], "argument --key-walks: 0 is not at least 1"),
    (["conform", "--samples", "0"], "argument --samples: 0 is not at least 1"),
    (["campaign", "campaigns/small.yaml", "--workers", "-2"],
     "argument --workers: -2 is not at least 1"),
]


@pytest.mark.parametrize(("argv", "message"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_out_of_range_numbers_are_one_line_errors(argv: list[str], message: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"fpstate: error: {message}"
    assert "Traceback" not in "\n".join(err)


def test_an_output_path_that_cannot_be_written_is_a_one_line_error(
        tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    out = blocker / "timeline.png"
    code = main(["run", "scenarios/seed-004-pasid-write.yaml", "--plot", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    # The timeline's directory is made first: the file in the way is what is named.
    assert err == [f"fpstate: error: {blocker}: File exists"]


@pytest.mark.parametrize("command", ["run", "campaign"])
def test_a_binary_file_is_a_one_line_error(command: str, tmp_path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "blob.yaml"
    f.write_bytes(b"model: x86\n\xff\xfe")
    assert main([command, str(f)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"fpstate: error: {f}: not UTF-8 text (byte 11: 0xff)"]


def test_a_scenario_beyond_what_a_pkru_value_can_name_is_a_one_line_error(
        tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """A PKRU value names its writer and generation in 32 bits: the 4096th WRPKRU of one task
    is refused with the limits named, not a traceback."""
    import yaml

    steps = [{"run": {"task": "p0.t0", "cpu": 0}}]
    steps += [{"write": {"task": "p0.t0", "component": "pkru"}}] * 4096
    f = tmp_path / "many.yaml"
    f.write_text(yaml.safe_dump({"name": "many PKRU writes", "model": "x86", "steps": steps,
                                 "config": {"cpu": "sapphire-rapids", "cpus": 1,
                                            "processes": {"p0": 1}, "vms": {}}}))
    assert main(["run", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fpstate: error: a PKRU value names its writer in 32 bits: ")
    assert err[-1].endswith(" at generation 4096")
    assert "Traceback" not in "\n".join(err)
