"""The kernel-log reader (fpstate.host.dmesg) and the boot-lines differential case.

The parser is tested everywhere (fixed logs in each format, hypothesis fuzzing); the
differential case, fpu__init_system_xstate() on this CPU for the running kernel against the
``x86/fpu:`` lines of this kernel's log, runs on the host and skips with the reason where the
log cannot be read (kernel.dmesg_restrict, no /dev/kmsg) or no longer holds the boot lines.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fpstate.cli import main
from fpstate.errors import HostUnavailable
from fpstate.host import native
from fpstate.host.dmesg import _read_kmsg, compare_boot_lines, fpu_lines, message_of

ENABLED = ("x86/fpu: Enabled xstate features 0x18e7, context size is 2472 bytes, using "
           "'compacted' format.")

DMESG = f"""\
[    0.000000] Linux version 6.18.44 (gcc) #1 SMP
[    0.000000] x86/fpu: Supporting XSAVE feature 0x001: 'x87 floating point registers'
[    0.000000] x86/fpu: xstate_offset[2]:  576, xstate_sizes[2]:  256
[    0.000000] x86/fpu: {ENABLED[9:]}
[    0.001234] signal: max sigframe size: 3376
"""

KMSG = f"""\
6,1,0,-;Linux version 6.18.44 (gcc) #1 SMP
6,12,0,-;x86/fpu: Supporting XSAVE feature 0x001: 'x87 floating point registers'
 SUBSYSTEM=cpu
6,13,0,-,caller=T0;x86/fpu: xstate_offset[2]:  576, xstate_sizes[2]:  256
6,14,0,c;{ENABLED}
"""

EXPECTED = (
    "x86/fpu: Supporting XSAVE feature 0x001: 'x87 floating point registers'",
    "x86/fpu: xstate_offset[2]:  576, xstate_sizes[2]:  256",
    ENABLED,
)


@pytest.mark.parametrize("text", [
    DMESG,
    KMSG,
    DMESG.replace("[    0.000000] ", "[Tue Nov 19 19:51:02 2025] "),  # dmesg -T
    DMESG.replace("[    0.000000] ", "[    0.000000][    T0] "),  # CONFIG_PRINTK_CALLER
    DMESG.replace("[    0.000000] ", "<6>[    0.000000] "),  # dmesg -r
])
def test_fpu_lines_of_every_log_format(text: str) -> None:
    assert fpu_lines(text) == EXPECTED


def test_message_of_keeps_the_text_after_the_timestamp() -> None:
    assert message_of("[   12.345678] x86/fpu: a [b] c\n") == "x86/fpu: a [b] c"
    assert message_of("4,99,123456,-;x86/fpu: xfeatures modified") == "x86/fpu: xfeatures modified"
    assert fpu_lines("x86/fpux: not ours\nfoo x86/fpu: not at the start\n") == ()


_MESSAGE = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=60).filter(
    lambda m: not m.startswith(("[", "<", " ")) and m == m.rstrip())


@given(ts=st.floats(0, 99999, allow_nan=False), msg=_MESSAGE)
def test_timestamp_is_stripped_from_any_message(ts: float, msg: str) -> None:
    assert message_of(f"[{ts:12.6f}] {msg}") == msg


@given(st.text(max_size=400))
def test_fpu_lines_never_fails_and_only_returns_fpu_lines(text: str) -> None:
    lines = fpu_lines(text)
    assert all(line.startswith("x86/fpu: ") and "\n" not in line for line in lines)


def test_unreadable_kmsg_is_host_unavailable_with_the_path() -> None:
    with pytest.raises(HostUnavailable, match=r"cannot open /nonexistent/kmsg: No such file"):
        _read_kmsg("/nonexistent/kmsg")


# -- the differential case: model against this kernel ------------------------------------------


@pytest.fixture(scope="module")
def boot_lines() -> tuple[tuple[str, ...], tuple[str, ...]]:
    if not native.is_x86_64():
        pytest.skip(f"host is {os.uname().machine}, not x86-64: no CPUID to model")
    try:
        return compare_boot_lines()
    except HostUnavailable as e:
        pytest.skip(str(e))


@pytest.mark.host
def test_model_boot_lines_equal_this_kernels_dmesg(
        boot_lines: tuple[tuple[str, ...], tuple[str, ...]]) -> None:
    model, host = boot_lines
    assert model == host
    assert host[-1].startswith("x86/fpu: Enabled xstate features ")


@pytest.mark.host
def test_boot_log_compare_exits_0_on_this_host(
        boot_lines: tuple[tuple[str, ...], tuple[str, ...]],
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["boot-log", "--compare"]) == 0
    assert capsys.readouterr().out.startswith(f"identical: {len(boot_lines[1])} x86/fpu lines")
