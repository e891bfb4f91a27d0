"""Inputs users name are read whole when they are regular files and refused past a bound when
they are streams that may never end (a decode of /dev/zero used to read forever)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fpstate import inputs
from fpstate.cli import main


def test_a_regular_file_is_read_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inputs, "STREAM_LIMIT", 8)
    f = tmp_path / "blob"
    f.write_bytes(bytes(range(100)))
    assert inputs.read_bytes(f) == bytes(range(100))  # the stream bound does not apply


def test_a_stream_past_the_bound_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inputs, "STREAM_LIMIT", 5000)
    with pytest.raises(OSError) as e:
        inputs.read_bytes("/dev/zero")
    assert e.value.strerror == "not a regular file, and more than 5000 bytes"
    assert e.value.filename == "/dev/zero"


def test_a_short_stream_is_read(tmp_path: Path) -> None:
    r, w = os.pipe()
    os.write(w, b"0123456789")
    os.close(w)
    try:
        assert inputs.read_bytes(f"/dev/fd/{r}") == b"0123456789"
    finally:
        os.close(r)


def test_decode_of_an_endless_device_is_a_one_line_error(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(inputs, "STREAM_LIMIT", 1 << 20)
    assert main(["decode", "/dev/zero"]) == 2
    assert capsys.readouterr().err.strip() == (
        "fpstate: error: cannot read /dev/zero: not a regular file, and more than 1 MiB")
