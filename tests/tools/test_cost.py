"""The cost of FPU management policies: per-class memory and bytes from the models, the command,
the workload file, and the plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fpstate.cli import main
from fpstate.errors import FpstateError
from fpstate.tools.cost import (
    Mix,
    class_costs,
    cost_table,
    restore_bytes,
    save_bytes,
)
from fpstate.x86.profiles import bundled_profile

SPR = bundled_profile("sapphire-rapids")
ZEN4 = bundled_profile("zen4")


def test_on_demand_amx_thread_keeps_its_embedded_buffer() -> None:
    """fpstate_realloc() vzalloc()s 64 + 10752 bytes (three pages) and the embedded 2560-byte
    default fpstate (plus its 64-byte header) stays in task_struct."""
    cc = class_costs(SPR, "on-demand", "guests-only")
    assert cc["plain"].memory == 64 + 2560
    assert cc["amx"].memory == 64 + 2560 + 3 * 4096
    assert cc["amx"].rfbm & (1 << 18) and not cc["plain"].rfbm & (1 << 18)
    assert class_costs(SPR, "always-max", "guests-only")["plain"].memory == 64 + 10752


def test_cet_supervisor_space_costs_24_bytes_on_zen4_and_nothing_on_spr() -> None:
    """Seed 001's 'CET-S space for all tasks': on Zen 4 the default buffer grows by
    CET_KERNEL's 24 bytes; on Sapphire Rapids TILECFG's 64-byte alignment absorbs them."""
    up, every = (class_costs(ZEN4, "on-demand", c)["plain"] for c in ("guests-only",
                                                                      "every-thread"))
    assert every.memory - up.memory == 24 and every.rfbm & ~up.rfbm == 1 << 12
    up, every = (class_costs(SPR, "on-demand", c)["plain"] for c in ("guests-only",
                                                                     "every-thread"))
    assert every.memory == up.memory and every.rfbm & ~up.rfbm == 1 << 12


def test_optimisations() -> None:
    """An AVX-512 thread on SPR: SSE+AVX+opmask+ZMM_Hi256+Hi16_ZMM = 2112 bytes in use; XSAVE
    writes every RFBM component, XSAVEC the in-use ones, XSAVES the modified share of them;
    XRSTORS reads the in-use ones."""
    c = class_costs(SPR, "on-demand", "guests-only")["avx512"]
    assert restore_bytes(SPR, c) == 64 + 2112
    assert save_bytes(SPR, c, True, False, 0.5) == 64 + 2112
    assert save_bytes(SPR, c, True, True, 0.5) == 64 + 1056
    full = 64 + 160 + 256 + 256 + 64 + 512 + 1024 + 8 + 8 + 16 + 64
    assert save_bytes(SPR, c, False, False, 0.5) == full


def test_always_max_without_init_optimisation_moves_the_tiles_every_switch() -> None:
    rows = cost_table(SPR, (Mix("w", 100, 0.0, 0.0, 0),))
    by = {(r.policy.allocation, r.policy.cet, r.policy.init_opt, r.policy.modified_opt):
          r.bytes_per_switch for r in rows}
    assert by[("always-max", "guests-only", False, False)] > 8192
    assert by[("on-demand", "guests-only", False, False)] < 4096
    assert by[("always-max", "guests-only", True, True)] == \
        by[("on-demand", "guests-only", True, True)]
    assert len(rows) == 16


def test_mix_validation() -> None:
    with pytest.raises(FpstateError, match="exceeds 1"):
        Mix("m", 10, 0.7, 0.5, 0)
    with pytest.raises(FpstateError, match="no threads"):
        Mix("m", 0, 0.0, 0.0, 0)
    with pytest.raises(FpstateError, match=r"must be in \[0, 1\]"):
        Mix("m", 10, 1.5, 0.0, 0)


def test_command_with_workload_and_plots(tmp_path: Path, capsys) -> None:
    wl = tmp_path / "w.yaml"
    wl.write_text("cpu: zen4\nmixes:\n  - {name: db, threads: 200, avx512_share: 0.5}\n"
                  "  - {name: vms, threads: 4, vcpus: 8, modified_fraction: 0.25}\n")
    assert main(["cost", "--workload", str(wl), "--plot", str(tmp_path / "p"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 * 16 and {r["mix"] for r in rows} == {"db", "vms"}
    for name in ("cost-memory", "cost-switch"):
        png = (tmp_path / "p" / f"{name}.png").read_bytes()
        svg = (tmp_path / "p" / f"{name}.svg").read_text()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and "<svg" in svg
    assert main(["cost"]) == 0
    assert "inference: 64 threads, 25% AMX on sapphire-rapids" in capsys.readouterr().out


@pytest.mark.parametrize("text, message", [
    ("mixes: []", "non-empty 'mixes'"),
    ("mixes: [{threads: 1, colour: red}]", "unknown field(s) colour"),
    ("mixes: [{threads: -1}]", "threads must be a count"),
    ("{", "not YAML/JSON"),
])
def test_bad_workload_is_exit_2(tmp_path: Path, capsys, text: str, message: str) -> None:
    wl = tmp_path / "w.yaml"
    wl.write_text(text)
    assert main(["cost", "--workload", str(wl)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
